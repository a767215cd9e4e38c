//! Response metering in the ext_authz shape (SPEC §8.2): Envoy's External Processing API
//! (`envoy.service.ext_proc.v3.ExternalProcessor`), served on the authz listener beside
//! `Check`. Envoy's ext_proc filter, in observability mode, streams each response to it —
//! headers, then the body chunk by chunk — without waiting for answers, so metering never
//! delays a response; the request is correlated with its ext_authz decision through the
//! dynamic metadata ext_authz set (`consumer_key_id`, `consumer_id`, `model_service`,
//! `model`), which the filter forwards (`metadata_options.forwarding_namespaces`).
//!
//! The bytes go through the same [`StreamMetering`] as the module's, into the data plane's
//! [`Tally`]. A stream whose metadata is a refusal's (`deny_reason`) or lacks the fields is
//! not metered. Outside observability mode (a misconfiguration) every message is answered with
//! "continue, unchanged", so a request is never held.

use std::pin::Pin;
use std::sync::Arc;

use envoy_types::pb::envoy::config::core::v3::{HeaderMap, Metadata};
use envoy_types::pb::envoy::service::ext_proc::v3::external_processor_server::ExternalProcessor;
use envoy_types::pb::envoy::service::ext_proc::v3::{
    BodyResponse, HeadersResponse, ProcessingRequest, ProcessingResponse, TrailersResponse,
    processing_request::Request as Msg, processing_response::Response as Answer,
};
use envoy_types::pb::google::protobuf::{Struct, value::Kind};
use futures::Stream;
use tokio_stream::StreamExt;
use tonic::{Request, Response, Status, Streaming};
use uuid::Uuid;

use super::metering::{METERING_TAG_FIELD, StreamMetering, TOKEN_LIMITED_FIELD, metering_tag};
use super::model::ModelName;
use super::ratelimit::RateLimiter;
use crate::crypto::{KeyHasher, credentials_equal};
use crate::snapshot::SnapshotCell;
use crate::usage::Tally;

pub use envoy_types::pb::envoy::service::ext_proc::v3::external_processor_server::ExternalProcessorServer;

/// Where Envoy's ext_authz filter puts the metadata of its decisions.
pub const EXT_AUTHZ_NAMESPACE: &str = "envoy.filters.http.ext_authz";

/// The ext_proc service: meters responses into `tally`.
#[derive(Clone)]
pub struct ExtProcService {
    cell: SnapshotCell,
    hasher: KeyHasher,
    tally: Arc<Tally>,
    limiter: Option<Arc<RateLimiter>>,
}

impl ExtProcService {
    /// `hasher`: the same keyed hasher the ext_authz service signs its metering tags with.
    pub fn new(cell: SnapshotCell, hasher: KeyHasher, tally: Arc<Tally>) -> Self {
        ExtProcService {
            cell,
            hasher,
            tally,
            limiter: None,
        }
    }

    /// Charges each response's tokens to the rate limits that admitted it (the limiter the
    /// ext_authz service admits with).
    pub fn with_rate_limiter(mut self, limiter: Arc<RateLimiter>) -> Self {
        self.limiter = Some(limiter);
        self
    }

    /// The metering of the request a stream's metadata describes, if keygate allowed it: the
    /// fields must carry the tag ext_authz signed them with (anything else reaching this
    /// listener cannot attribute usage to a key), and name a valid model and a service of the
    /// served snapshot.
    fn metering_for(&self, metadata: &Metadata) -> Option<StreamMetering> {
        let fields = metadata.filter_metadata.get(EXT_AUTHZ_NAMESPACE)?;
        if string(fields, "deny_reason").is_some() {
            return None;
        }
        let key = Uuid::parse_str(string(fields, "consumer_key_id")?).ok()?;
        let consumer = match string(fields, "consumer_id") {
            Some(c) => Some(Uuid::parse_str(c).ok()?),
            None => None,
        };
        let service_name = string(fields, "model_service")?;
        let model = string(fields, "model");
        if let Some(m) = model {
            ModelName::new(m)?;
        }
        let expected = metering_tag(
            &self.hasher,
            key,
            consumer,
            service_name,
            model.unwrap_or(""),
        );
        let tag = string(fields, METERING_TAG_FIELD)?;
        if !credentials_equal(tag.as_bytes(), expected.as_bytes()) {
            crate::metrics::METRICS
                .usage_unparsed
                .with_label_values(&["untrusted"])
                .inc();
            return None;
        }
        let service = {
            let guard = self.cell.load_guard();
            guard.as_ref()?.service(service_name)?.id
        };
        let metering = StreamMetering::new(key, consumer, service, model);
        // Only answers of keys with a token limit are charged (ext_authz says which; the tag
        // already proves which key the answer is billed to).
        let token_limited = string(fields, TOKEN_LIMITED_FIELD) == Some("1");
        Some(match &self.limiter {
            Some(l) if token_limited => metering.charging(l.clone()),
            _ => metering,
        })
    }
}

fn string<'a>(s: &'a Struct, field: &str) -> Option<&'a str> {
    match s.fields.get(field)?.kind.as_ref()? {
        Kind::StringValue(v) if !v.is_empty() => Some(v),
        _ => None,
    }
}

/// First value of `name` (lower case) in an ext_proc header map (`raw_value`, or `value`).
fn header<'a>(map: &'a Option<HeaderMap>, name: &str) -> Option<&'a [u8]> {
    let h = map.as_ref()?.headers.iter().find(|h| h.key == name)?;
    Some(if h.raw_value.is_empty() {
        h.value.as_bytes()
    } else {
        &h.raw_value
    })
}

/// What a stream's metering is, as its messages arrive.
enum State {
    /// No message with metadata yet.
    Unknown,
    /// (Boxed: one allocation per metered stream, against the gRPC stream's own.)
    Metering(Box<StreamMetering>),
    /// Not an allowed, correlated request.
    Ignored,
}

type Answers = Pin<Box<dyn Stream<Item = Result<ProcessingResponse, Status>> + Send>>;

#[tonic::async_trait]
impl ExternalProcessor for ExtProcService {
    type ProcessStream = Answers;

    async fn process(
        &self,
        req: Request<Streaming<ProcessingRequest>>,
    ) -> Result<Response<Self::ProcessStream>, Status> {
        let mut inbound = req.into_inner();
        let svc = self.clone();
        let (tx, rx) = tokio::sync::mpsc::channel::<Result<ProcessingResponse, Status>>(4);
        tokio::spawn(async move {
            let mut state = State::Unknown;
            let mut done = false;
            // Ends when Envoy closes its side (or the stream breaks): what was read is recorded.
            while let Some(Ok(m)) = inbound.next().await {
                if let State::Unknown = state
                    && let Some(md) = &m.metadata_context
                {
                    state = match svc.metering_for(md) {
                        Some(s) => State::Metering(Box::new(s)),
                        None => State::Ignored,
                    };
                }
                let observe = m.observability_mode;
                let Some(msg) = m.request else { continue };
                let answer = match msg {
                    Msg::ResponseHeaders(h) => {
                        if let State::Metering(s) = &mut state {
                            let status = header(&h.headers, ":status")
                                .and_then(|v| std::str::from_utf8(v).ok()?.parse::<u16>().ok())
                                .unwrap_or(0);
                            s.response_headers(
                                status,
                                header(&h.headers, "content-type"),
                                header(&h.headers, "content-encoding"),
                            );
                        }
                        done |= h.end_of_stream;
                        Answer::ResponseHeaders(HeadersResponse::default())
                    }
                    Msg::ResponseBody(b) => {
                        if let State::Metering(s) = &mut state {
                            s.response_body(&b.body);
                        }
                        done |= b.end_of_stream;
                        Answer::ResponseBody(BodyResponse::default())
                    }
                    Msg::ResponseTrailers(_) => {
                        done = true;
                        Answer::ResponseTrailers(TrailersResponse::default())
                    }
                    Msg::RequestHeaders(_) => Answer::RequestHeaders(HeadersResponse::default()),
                    Msg::RequestBody(_) => Answer::RequestBody(BodyResponse::default()),
                    Msg::RequestTrailers(_) => Answer::RequestTrailers(TrailersResponse::default()),
                };
                if !observe {
                    let reply = ProcessingResponse {
                        response: Some(answer),
                        ..Default::default()
                    };
                    if tx.send(Ok(reply)).await.is_err() {
                        break;
                    }
                }
                if done {
                    break;
                }
            }
            if let State::Metering(s) = state {
                s.finish(&svc.tally);
            }
            // Dropping `tx` ends the answer stream: Envoy sees the processor close.
        });
        let answers = tokio_stream::wrappers::ReceiverStream::new(rx);
        Ok(Response::new(Box::pin(answers)))
    }
}
