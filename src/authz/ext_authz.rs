//! Envoy's `envoy.service.auth.v3.Authorization/Check`: converts the request for
//! `decide()` and the decision into Envoy's response. No decision logic lives here.

use std::net::IpAddr;
use std::sync::Arc;

use envoy_types::ext_authz::v3::pb::{
    Authorization, CheckRequest, CheckResponse, DeniedHttpResponse, HeaderValue, HeaderValueOption,
    HttpResponse, HttpStatus, OkHttpResponse,
};
use envoy_types::pb::envoy::service::auth::v3::attribute_context::HttpRequest;
use envoy_types::pb::google::protobuf::{BoolValue, Struct, Value, value::Kind};
use envoy_types::pb::google::rpc;
use tonic::{Request, Response, Status};

use super::decision::{self, Decision, DecisionConfig, MODEL_SERVICE_EXTENSION, RequestView};
use crate::crypto::KeyHasher;
use crate::domain::Timestamp;
use crate::metrics::METRICS;
use crate::snapshot::{KeyEntry, SnapshotCell};
use std::time::Instant;

/// gRPC codes carried in `CheckResponse.status` (a non-OK status is a denial, not an error).
const CODE_OK: i32 = 0;
const CODE_PERMISSION_DENIED: i32 = 7;
const CODE_UNAVAILABLE: i32 = 14;
const CODE_UNAUTHENTICATED: i32 = 16;

/// The ext_authz server: decides from the live snapshot.
#[derive(Clone)]
pub struct ExtAuthzService {
    cell: SnapshotCell,
    hasher: KeyHasher,
    config: Arc<DecisionConfig>,
    usage: Option<crate::usage::UsageRecorder>,
}

impl ExtAuthzService {
    pub fn new(cell: SnapshotCell, hasher: KeyHasher, config: DecisionConfig) -> Self {
        ExtAuthzService {
            cell,
            hasher,
            config: Arc::new(config),
            usage: None,
        }
    }

    /// Also record each allowed key's last use.
    pub fn with_usage(mut self, usage: crate::usage::UsageRecorder) -> Self {
        self.usage = Some(usage);
        self
    }

    /// The whole check, synchronous: what `Check` runs and benchmarks call.
    pub fn check_sync(&self, req: &CheckRequest, now: Timestamp) -> CheckResponse {
        let started = Instant::now();
        let response = self.respond(req, now);
        METRICS
            .check_duration
            .observe(started.elapsed().as_secs_f64());
        response
    }

    fn respond(&self, req: &CheckRequest, now: Timestamp) -> CheckResponse {
        let view = CheckView::new(req);
        let guard = self.cell.load_guard();
        let Some(snap) = guard.as_ref() else {
            METRICS.denied(decision::DenyReason::NotReady);
            return denied_response(decision::DenyReason::NotReady, None);
        };
        let d = decision::decide(snap, &self.config, &view, now, |k| self.hasher.hash(k));
        match d {
            Decision::Allow(a) => {
                METRICS.allowed();
                if let Some(u) = &self.usage {
                    u.record(a.key, now);
                }
                if let Some(c) = a.consumer.usage.counter(&a.service.id, || {
                    METRICS.consumer_counter(&a.consumer.name, &a.service.name)
                }) {
                    c.inc();
                }
                let (remove, param) =
                    decision::credentials_to_remove(&self.config, &view, &a.service.auth_header);
                let fields = [
                    ("consumer", a.consumer.name.to_string()),
                    ("consumer_id", a.consumer.id.to_string()),
                    ("consumer_key", a.key.name.to_string()),
                    ("consumer_key_id", a.key.id.to_string()),
                    ("model_service", a.service.name.to_string()),
                    ("model_key", a.model_key.name.to_string()),
                ];
                CheckResponse {
                    status: Some(rpc::Status {
                        code: CODE_OK,
                        ..Default::default()
                    }),
                    dynamic_metadata: Some(metadata(fields)),
                    http_response: Some(HttpResponse::OkResponse(OkHttpResponse {
                        headers: vec![overwrite_header(
                            &a.service.auth_header,
                            a.model_key.header_value.expose(),
                        )],
                        headers_to_remove: remove.into_iter().map(str::to_string).collect(),
                        query_parameters_to_remove: param.into_iter().map(str::to_string).collect(),
                        ..Default::default()
                    })),
                }
            }
            Decision::Deny(d) => {
                METRICS.denied(d.reason);
                tracing::debug!(
                    reason = d.reason.as_str(),
                    consumer_key = d.key.map(|k| &*k.name),
                    request_id = view.http.map(|h| h.id.as_str()).unwrap_or(""),
                    x_request_id = view.header("x-request-id").unwrap_or(""),
                    "check denied"
                );
                denied_response(d.reason, d.key)
            }
        }
    }
}

/// A header set with overwrite semantics. Envoy 1.40 reads the deprecated `append` bool in
/// ext_authz responses (an unset `append_action` would mean append in other versions), so it
/// is set to false explicitly: the upstream must receive exactly one value.
#[allow(deprecated)]
fn overwrite_header(key: &str, value: &str) -> HeaderValueOption {
    HeaderValueOption {
        header: Some(HeaderValue {
            key: key.to_string(),
            value: value.to_string(),
            ..Default::default()
        }),
        append: Some(BoolValue { value: false }),
        ..Default::default()
    }
}

fn metadata(fields: impl IntoIterator<Item = (&'static str, String)>) -> Struct {
    Struct {
        fields: fields
            .into_iter()
            .map(|(k, v)| {
                (
                    k.to_string(),
                    Value {
                        kind: Some(Kind::StringValue(v)),
                    },
                )
            })
            .collect(),
    }
}

fn denied_response(reason: decision::DenyReason, key: Option<&KeyEntry>) -> CheckResponse {
    let http = reason.http_status();
    let code = match http {
        401 => CODE_UNAUTHENTICATED,
        403 => CODE_PERMISSION_DENIED,
        _ => CODE_UNAVAILABLE,
    };
    let mut fields = vec![("deny_reason", reason.as_str().to_string())];
    if let Some(k) = key {
        fields.push(("consumer_key", k.name.to_string()));
        fields.push(("consumer_key_id", k.id.to_string()));
    }
    CheckResponse {
        status: Some(rpc::Status {
            code,
            ..Default::default()
        }),
        dynamic_metadata: Some(metadata(fields)),
        http_response: Some(HttpResponse::DeniedResponse(DeniedHttpResponse {
            status: Some(HttpStatus { code: http as i32 }),
            headers: vec![overwrite_header("content-type", "application/json")],
            body: reason.body().to_string(),
        })),
    }
}

/// `CheckRequest` as the decision sees it.
struct CheckView<'a> {
    http: Option<&'a HttpRequest>,
    req: &'a CheckRequest,
}

impl<'a> CheckView<'a> {
    fn new(req: &'a CheckRequest) -> Self {
        let http = req
            .attributes
            .as_ref()
            .and_then(|a| a.request.as_ref())
            .and_then(|r| r.http.as_ref());
        CheckView { http, req }
    }
}

impl RequestView for CheckView<'_> {
    fn header(&self, name: &str) -> Option<&str> {
        self.http?.headers.get(name).map(String::as_str)
    }

    fn query(&self) -> &str {
        let Some(http) = self.http else { return "" };
        if !http.query.is_empty() {
            return &http.query;
        }
        http.path.split_once('?').map(|(_, q)| q).unwrap_or("")
    }

    fn peer_ip(&self) -> Option<IpAddr> {
        use envoy_types::pb::envoy::config::core::v3::address::Address as A;
        let addr = self
            .req
            .attributes
            .as_ref()?
            .source
            .as_ref()?
            .address
            .as_ref()?;
        match addr.address.as_ref()? {
            A::SocketAddress(sa) => sa.address.parse().ok(),
            _ => None,
        }
    }

    fn model_service(&self) -> Option<&str> {
        self.req
            .attributes
            .as_ref()?
            .context_extensions
            .get(MODEL_SERVICE_EXTENSION)
            .map(String::as_str)
    }
}

#[tonic::async_trait]
impl Authorization for ExtAuthzService {
    async fn check(
        &self,
        request: Request<CheckRequest>,
    ) -> Result<Response<CheckResponse>, Status> {
        Ok(Response::new(
            self.check_sync(request.get_ref(), Timestamp::now()),
        ))
    }
}
