//! Envoy's `envoy.service.auth.v3.Authorization/Check`: converts the request for
//! `decide()` and its [`Outcome`] into Envoy's response. No decision logic lives here.

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

use super::decision::{
    Body, DecisionConfig, MODEL_EXTENSION, MODEL_SERVICE_EXTENSION, RequestView, decide,
};
use super::outcome::{
    ALL_METADATA, Admit, METERED_ACCEPT_ENCODING, MetaValue, Outcome, REPLY_CONTENT_TYPE, Refusal,
};
use super::ratelimit::RateLimiter;
use super::record::OutcomeRecorder;
use crate::crypto::KeyHasher;
use crate::domain::Timestamp;
use crate::snapshot::SnapshotCell;

/// gRPC codes carried in `CheckResponse.status` (a non-OK status is a denial, not an error).
const CODE_OK: i32 = 0;
const CODE_PERMISSION_DENIED: i32 = 7;
const CODE_RESOURCE_EXHAUSTED: i32 = 8;
const CODE_UNAVAILABLE: i32 = 14;
const CODE_UNAUTHENTICATED: i32 = 16;

/// The ext_authz server: decides from the live snapshot.
#[derive(Clone)]
pub struct ExtAuthzService {
    cell: SnapshotCell,
    hasher: KeyHasher,
    config: Arc<DecisionConfig>,
    recorder: OutcomeRecorder,
    limiter: Arc<RateLimiter>,
}

impl ExtAuthzService {
    pub fn new(cell: SnapshotCell, hasher: KeyHasher, config: DecisionConfig) -> Self {
        ExtAuthzService {
            cell,
            hasher,
            config: Arc::new(config),
            recorder: OutcomeRecorder::new(None),
            limiter: Default::default(),
        }
    }

    /// Rate limits counted in `limiter` (shared with the response metering, which charges the
    /// tokens, and with the Redis synchronisation when there is one).
    pub fn with_rate_limiter(mut self, limiter: Arc<RateLimiter>) -> Self {
        self.limiter = limiter;
        self
    }

    /// Also record each allowed key's last use.
    pub fn with_usage(mut self, usage: crate::usage::UsageRecorder) -> Self {
        self.recorder = OutcomeRecorder::new(Some(usage));
        self
    }

    /// The whole check, synchronous: what `Check` runs and benchmarks call.
    pub fn check_sync(&self, req: &CheckRequest, now: Timestamp) -> CheckResponse {
        self.recorder.timed(|| self.respond(req, now))
    }

    fn respond(&self, req: &CheckRequest, now: Timestamp) -> CheckResponse {
        let view = CheckView::new(req);
        let guard = self.cell.load_guard();
        let outcome = match guard.as_ref() {
            None => Outcome::not_ready(),
            Some(snap) => Outcome::of(
                decide(snap, &self.config, &view, now, |k| self.hasher.hash(k)),
                &self.config,
            )
            .rate_limited(&self.limiter, now),
        };
        match outcome {
            Outcome::Admit(a) => {
                self.recorder.allowed(&a.allowed, now);
                let al = &a.allowed;
                let tag = super::metering::metering_tag(
                    &self.hasher,
                    al.key.id,
                    al.key.consumer,
                    &al.service.name,
                    al.model.as_ref().map_or("", |m| m.as_str()),
                );
                allowed_response(&a, &view, &tag)
            }
            Outcome::Refuse(r) => {
                self.recorder.refused(
                    &r,
                    view.http.map(|h| h.id.as_str()).unwrap_or(""),
                    view.header("x-request-id").unwrap_or(""),
                );
                denied_response(&r)
            }
        }
    }
}

/// Envoy's OK response: the vendor header, the credentials to remove, the metadata.
fn allowed_response(a: &Admit<'_, '_>, view: &CheckView<'_>, metering_tag: &str) -> CheckResponse {
    let (name, value) = a.vendor_header();
    let mut meta = metadata(a.metadata(&ALL_METADATA));
    meta.fields.insert(
        super::metering::METERING_TAG_FIELD.to_string(),
        Value {
            kind: Some(Kind::StringValue(metering_tag.to_string())),
        },
    );
    if a.allowed.token_limited() {
        meta.fields.insert(
            super::metering::TOKEN_LIMITED_FIELD.to_string(),
            Value {
                kind: Some(Kind::StringValue("1".to_string())),
            },
        );
    }
    CheckResponse {
        status: Some(rpc::Status {
            code: CODE_OK,
            ..Default::default()
        }),
        dynamic_metadata: Some(meta),
        http_response: Some(HttpResponse::OkResponse(OkHttpResponse {
            headers: vec![
                overwrite_header(name, value),
                overwrite_header(METERED_ACCEPT_ENCODING.0, METERED_ACCEPT_ENCODING.1),
            ],
            headers_to_remove: a.headers_to_remove(view).map(str::to_string).collect(),
            query_parameters_to_remove: a
                .query_param_to_remove(view)
                .into_iter()
                .map(str::to_string)
                .collect(),
            ..Default::default()
        })),
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

fn metadata<'s>(fields: impl IntoIterator<Item = (&'static str, MetaValue<'s>)>) -> Struct {
    let mut buf = [0u8; 36];
    Struct {
        fields: fields
            .into_iter()
            .map(|(k, v)| {
                (
                    k.to_string(),
                    Value {
                        kind: Some(Kind::StringValue(v.as_str(&mut buf).to_string())),
                    },
                )
            })
            .collect(),
    }
}

fn denied_response(r: &Refusal<'_>) -> CheckResponse {
    let code = match r.status() {
        401 => CODE_UNAUTHENTICATED,
        403 => CODE_PERMISSION_DENIED,
        429 => CODE_RESOURCE_EXHAUSTED,
        _ => CODE_UNAVAILABLE,
    };
    let (ct_name, ct_value) = REPLY_CONTENT_TYPE;
    let mut buf = itoa::Buffer::new();
    let mut headers = vec![overwrite_header(ct_name, ct_value)];
    headers.extend(
        r.extra_headers(&mut buf)
            .map(|(n, v)| overwrite_header(n, v)),
    );
    CheckResponse {
        status: Some(rpc::Status {
            code,
            ..Default::default()
        }),
        dynamic_metadata: Some(metadata(r.metadata())),
        http_response: Some(HttpResponse::DeniedResponse(DeniedHttpResponse {
            status: Some(HttpStatus {
                code: r.status() as i32,
            }),
            headers,
            body: r.body().to_string(),
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
        self.context_extension(MODEL_SERVICE_EXTENSION)
    }

    fn route_model(&self) -> Option<&str> {
        self.context_extension(MODEL_EXTENSION)
    }

    fn path(&self) -> Option<&str> {
        self.http.map(|h| h.path.as_str())
    }

    /// What Envoy sent of the body: `raw_body` (the filter's `pack_as_bytes: true`), else
    /// `body` (UTF-8, which Envoy makes of the bytes by replacing invalid sequences: a model is
    /// visible ASCII, so it reads the same); nothing when the route does not buffer bodies
    /// (`with_request_body` unset), which reads as an empty body. A body Envoy cut at
    /// `max_request_bytes` (`allow_partial_message: true`) is marked partial by Envoy's
    /// `x-envoy-auth-partial-body: true` header.
    fn body(&self) -> Body<'_> {
        let Some(http) = self.http else {
            return Body::Complete(&[]);
        };
        if http
            .headers
            .get(PARTIAL_BODY_HEADER)
            .is_some_and(|v| v.eq_ignore_ascii_case("true"))
        {
            return Body::Partial;
        }
        if !http.raw_body.is_empty() {
            Body::Complete(&http.raw_body)
        } else {
            Body::Complete(http.body.as_bytes())
        }
    }
}

/// The header Envoy's ext_authz filter adds when it sends only part of the body.
const PARTIAL_BODY_HEADER: &str = "x-envoy-auth-partial-body";

impl CheckView<'_> {
    /// A route's `context_extensions` entry (route configuration, never the client's).
    fn context_extension(&self, name: &str) -> Option<&str> {
        self.req
            .attributes
            .as_ref()?
            .context_extensions
            .get(name)
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
