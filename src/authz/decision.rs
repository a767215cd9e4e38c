//! The decision of SPEC §2 as a pure function over a snapshot: no I/O, no locks, no
//! allocation on the allow path. Every data plane (ext_authz, the Envoy module) calls this.

use std::borrow::Cow;
use std::net::IpAddr;

use super::model::{ModelName, model_from_json, model_from_path};
use crate::domain::ModelSource;
use crate::domain::Timestamp;
use crate::domain::validate::ip_allowed;
use crate::snapshot::{ConsumerEntry, Grant, InjectedKey, KeyEntry, ServiceEntry, Snapshot};

/// The route's context extension naming the model service (set in Envoy route config).
pub const MODEL_SERVICE_EXTENSION: &str = "model_service";
/// The route's context extension fixing the model (it wins over the body and the path).
pub const MODEL_EXTENSION: &str = "model";

/// Where the client address comes from.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub enum ClientIpSource {
    /// Envoy's downstream peer (`attributes.source.address`).
    #[default]
    Peer,
    /// The N-th address from the right of `x-forwarded-for` (1 = the rightmost, appended by
    /// the nearest trusted proxy).
    ForwardedFor(usize),
}

impl std::str::FromStr for ClientIpSource {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        if s == "peer" {
            return Ok(ClientIpSource::Peer);
        }
        if let Some(n) = s.strip_prefix("xff:") {
            return match n.parse::<usize>() {
                Ok(n) if n >= 1 => Ok(ClientIpSource::ForwardedFor(n)),
                _ => Err(format!(
                    "{s:?}: xff:N needs N >= 1 (the number of trusted proxy hops)"
                )),
            };
        }
        Err(format!("{s:?}: expected \"peer\" or \"xff:N\""))
    }
}

/// How the data plane reads credentials and client addresses.
#[derive(Clone, Debug)]
pub struct DecisionConfig {
    /// Credential headers in order of preference, lower case. `authorization` is read as
    /// `Bearer <key>`; any other header carries the key as its whole value.
    pub credential_headers: Vec<String>,
    /// Optional query parameter carrying the key (off by default).
    pub credential_query_param: Option<String>,
    pub client_ip: ClientIpSource,
}

impl DecisionConfig {
    /// Validated settings: header names lower-cased, de-duplicated and checked as HTTP
    /// tokens; at least one credential source. An error names the setting
    /// (`credential_headers` or `credential_query_param`) and the rule.
    pub fn new(
        credential_headers: &[String],
        credential_query_param: Option<String>,
        client_ip: ClientIpSource,
    ) -> Result<Self, (&'static str, String)> {
        let mut headers = Vec::new();
        for h in credential_headers {
            let h = h.trim().to_ascii_lowercase();
            if h.is_empty() {
                continue;
            }
            if !h.bytes().all(crate::domain::validate::is_tchar) {
                return Err((
                    "credential_headers",
                    format!("{h:?} is not an HTTP header name"),
                ));
            }
            if !headers.contains(&h) {
                headers.push(h);
            }
        }
        if let Some(p) = &credential_query_param {
            if p.is_empty() {
                return Err(("credential_query_param", "must not be empty".into()));
            }
            // Matched as written on the wire (SPEC §9), so it must be a name no client
            // needs to encode.
            if !p.bytes().all(is_unreserved) {
                return Err((
                    "credential_query_param",
                    format!(
                        "{p:?}: use only letters, digits, '-', '.', '_' and '~' \
                         (the name is matched as written, never decoded)"
                    ),
                ));
            }
        }
        if headers.is_empty() && credential_query_param.is_none() {
            return Err((
                "credential_headers",
                "at least one header (or a credential query parameter) is required".into(),
            ));
        }
        Ok(DecisionConfig {
            credential_headers: headers,
            credential_query_param,
            client_ip,
        })
    }
}

impl Default for DecisionConfig {
    fn default() -> Self {
        DecisionConfig {
            credential_headers: vec!["authorization".into(), "x-api-key".into(), "api-key".into()],
            credential_query_param: None,
            client_ip: ClientIpSource::Peer,
        }
    }
}

/// What the decision needs from a request; each data plane adapts its own request type.
pub trait RequestView {
    /// A request header by lower-case name.
    fn header(&self, name: &str) -> Option<&str>;
    /// The raw query string (after `?`), empty when there is none.
    fn query(&self) -> &str;
    /// The downstream peer address as Envoy saw it.
    fn peer_ip(&self) -> Option<IpAddr>;
    /// The route's `model_service` (never from a client-controlled header).
    fn model_service(&self) -> Option<&str>;
    /// Whether the request carries the header at all (whatever its bytes).
    fn has_header(&self, name: &str) -> bool {
        self.header(name).is_some()
    }
    /// The route's fixed model, if it has one (never from a client-controlled header).
    fn route_model(&self) -> Option<&str> {
        None
    }
    /// The request's `:path` (for services whose requests name the model in the path).
    fn path(&self) -> Option<&str> {
        self.header(":path")
    }
    /// The request body, as far as the data plane has it.
    fn body(&self) -> Body<'_> {
        Body::Unread
    }
}

/// A request body as a data plane holds it when deciding.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Body<'b> {
    /// Not read: the data plane reads it only when the decision asks ([`Decision::NeedBody`]).
    Unread,
    /// The whole body (empty when the request has none).
    Complete(&'b [u8]),
    /// Only a prefix of it (a body over Envoy's limit with partial messages allowed): a model
    /// is never decided from part of a body.
    Partial,
}

/// Why a request was refused (also the `reason` label of metrics).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum DenyReason {
    MissingCredential,
    UnknownKey,
    Disabled,
    Expired,
    Unbound,
    IpNotAllowed,
    RouteNotConfigured,
    ModelServiceNotAllowed,
    NoModelKey,
    NotReady,
    /// The model is outside the effective scope or the service's model list.
    ModelNotAllowed,
    /// The decision needed the model and the request did not name one it could read.
    ModelUnknown,
    /// The key's or its consumer's budget is spent for the period (SPEC §8.3).
    InsufficientQuota,
    /// A requests-per-minute limit of the key or its consumer (decided by the rate limiter,
    /// after the decision).
    RequestRateLimited,
    /// A tokens-per-minute limit of the key or its consumer is spent.
    TokenRateLimited,
}

const BODY_401: &str = r#"{"error":{"message":"Invalid API key provided.","type":"authentication_error","code":"invalid_api_key"}}"#;
const BODY_IP: &str = r#"{"error":{"message":"Requests from this address are not allowed for this API key.","type":"permission_error","code":"ip_not_allowed"}}"#;
const BODY_SCOPE: &str = r#"{"error":{"message":"This API key is not allowed to use this model service.","type":"permission_error","code":"model_service_not_allowed"}}"#;
const BODY_ROUTE: &str = r#"{"error":{"message":"This route is not configured for a model service.","type":"permission_error","code":"route_not_configured"}}"#;
const BODY_NO_KEY: &str = r#"{"error":{"message":"No upstream credential is available for this model service.","type":"service_unavailable","code":"no_model_key"}}"#;
const BODY_MODEL: &str = r#"{"error":{"message":"This API key is not allowed to use this model.","type":"permission_error","code":"model_not_allowed"}}"#;
const BODY_MODEL_UNKNOWN: &str = r#"{"error":{"message":"This API key is limited to certain models, and the request does not name its model in a way the gateway can read.","type":"permission_error","code":"model_not_allowed"}}"#;
const BODY_QUOTA: &str = r#"{"error":{"message":"The budget of this API key (or of its consumer) is spent for the current period.","type":"insufficient_quota","code":"insufficient_quota"}}"#;
const BODY_RPM: &str = r#"{"error":{"message":"Rate limit reached for requests per minute on this API key or its consumer.","type":"requests","code":"rate_limit_exceeded"}}"#;
const BODY_TPM: &str = r#"{"error":{"message":"Rate limit reached for tokens per minute on this API key or its consumer.","type":"tokens","code":"rate_limit_exceeded"}}"#;
const BODY_NOT_READY: &str = r#"{"error":{"message":"The gateway is starting and cannot authorize requests yet.","type":"service_unavailable","code":"keygate_not_ready"}}"#;

impl DenyReason {
    pub const ALL: [DenyReason; 15] = [
        DenyReason::MissingCredential,
        DenyReason::UnknownKey,
        DenyReason::Disabled,
        DenyReason::Expired,
        DenyReason::Unbound,
        DenyReason::IpNotAllowed,
        DenyReason::RouteNotConfigured,
        DenyReason::ModelServiceNotAllowed,
        DenyReason::NoModelKey,
        DenyReason::NotReady,
        DenyReason::ModelNotAllowed,
        DenyReason::ModelUnknown,
        DenyReason::InsufficientQuota,
        DenyReason::RequestRateLimited,
        DenyReason::TokenRateLimited,
    ];

    /// The metrics / log name of the reason.
    pub fn as_str(self) -> &'static str {
        match self {
            DenyReason::MissingCredential => "missing_credential",
            DenyReason::UnknownKey => "unknown_key",
            DenyReason::Disabled => "disabled",
            DenyReason::Expired => "expired",
            DenyReason::Unbound => "unbound",
            DenyReason::IpNotAllowed => "ip_not_allowed",
            DenyReason::RouteNotConfigured => "route_not_configured",
            DenyReason::ModelServiceNotAllowed => "model_service_not_allowed",
            DenyReason::NoModelKey => "no_model_key",
            DenyReason::NotReady => "not_ready",
            DenyReason::ModelNotAllowed => "model_not_allowed",
            DenyReason::ModelUnknown => "model_unknown",
            DenyReason::InsufficientQuota => "insufficient_quota",
            DenyReason::RequestRateLimited => "rate_limit_requests",
            DenyReason::TokenRateLimited => "rate_limit_tokens",
        }
    }

    /// The HTTP status Envoy sends to the client.
    pub fn http_status(self) -> u16 {
        match self {
            DenyReason::MissingCredential
            | DenyReason::UnknownKey
            | DenyReason::Disabled
            | DenyReason::Expired
            | DenyReason::Unbound => 401,
            DenyReason::IpNotAllowed
            | DenyReason::RouteNotConfigured
            | DenyReason::ModelServiceNotAllowed
            | DenyReason::ModelNotAllowed
            | DenyReason::ModelUnknown => 403,
            DenyReason::InsufficientQuota
            | DenyReason::RequestRateLimited
            | DenyReason::TokenRateLimited => 429,
            DenyReason::NoModelKey | DenyReason::NotReady => 503,
        }
    }

    /// The OpenAI-style JSON body. Every 401 body is identical: it never tells a caller
    /// whether a key exists.
    pub fn body(self) -> &'static str {
        match self.http_status() {
            401 => BODY_401,
            _ => match self {
                DenyReason::IpNotAllowed => BODY_IP,
                DenyReason::ModelServiceNotAllowed => BODY_SCOPE,
                DenyReason::RouteNotConfigured => BODY_ROUTE,
                DenyReason::NoModelKey => BODY_NO_KEY,
                DenyReason::ModelNotAllowed => BODY_MODEL,
                DenyReason::ModelUnknown => BODY_MODEL_UNKNOWN,
                DenyReason::InsufficientQuota => BODY_QUOTA,
                DenyReason::RequestRateLimited => BODY_RPM,
                DenyReason::TokenRateLimited => BODY_TPM,
                _ => BODY_NOT_READY,
            },
        }
    }
}

/// Which request field carried the consumer key.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum CredentialSource<'c> {
    Header(&'c str),
    Query(&'c str),
}

#[derive(Debug)]
pub struct Allowed<'s> {
    pub key: &'s KeyEntry,
    pub consumer: &'s ConsumerEntry,
    pub service: &'s ServiceEntry,
    pub model_key: &'s InjectedKey,
    /// The requested model, when known (the route's, the path's, or the body's when the
    /// decision read it).
    pub model: Option<ModelName>,
}

impl Allowed<'_> {
    /// Whether the key or its consumer has a tokens-per-minute limit: the answer's tokens are
    /// then charged to the rate limiter when it ends (SPEC §8.3).
    pub fn token_limited(&self) -> bool {
        self.key.limits.tokens_per_minute.is_some()
            || self.consumer.limits.tokens_per_minute.is_some()
    }
}

#[derive(Debug)]
pub struct Denied<'s> {
    pub reason: DenyReason,
    /// The presented key's record when it was recognised (for logs and metadata).
    pub key: Option<&'s KeyEntry>,
    /// The requested model, when it was read (a `model_not_allowed` refusal says which).
    pub model: Option<ModelName>,
}

#[derive(Debug)]
pub enum Decision<'s> {
    Allow(Allowed<'s>),
    Deny(Denied<'s>),
    /// The decision needs the model and it is in the body, which the data plane has not read
    /// ([`Body::Unread`]): read the whole body and decide again with it.
    NeedBody,
}

impl Decision<'_> {
    /// The refusal reason (`NeedBody` counts as `model_unknown`: a data plane that cannot read
    /// the body refuses).
    pub fn deny_reason(&self) -> Option<DenyReason> {
        match self {
            Decision::Allow(_) => None,
            Decision::Deny(d) => Some(d.reason),
            Decision::NeedBody => Some(DenyReason::ModelUnknown),
        }
    }
}

fn deny(reason: DenyReason, key: Option<&KeyEntry>) -> Decision<'_> {
    Decision::Deny(Denied {
        reason,
        key,
        model: None,
    })
}

/// Finds the presented consumer key: the first configured source that is present.
pub fn extract_credential<'r, 'c>(
    cfg: &'c DecisionConfig,
    req: &'r impl RequestView,
) -> Option<(Cow<'r, str>, CredentialSource<'c>)> {
    for name in &cfg.credential_headers {
        let Some(v) = req.header(name) else { continue };
        let v = if name == "authorization" {
            match v.split_once(' ') {
                Some((scheme, rest)) if scheme.eq_ignore_ascii_case("bearer") => rest.trim(),
                _ => continue,
            }
        } else {
            v.trim()
        };
        if !v.is_empty() {
            return Some((Cow::Borrowed(v), CredentialSource::Header(name)));
        }
    }
    if let Some(param) = &cfg.credential_query_param {
        for pair in query_pairs_named(req.query(), param) {
            // The value is form-decoded; the name was compared as written.
            let Some((_, v)) = form_urlencoded::parse(pair.as_bytes()).next() else {
                continue;
            };
            if !v.is_empty() {
                return Some((v, CredentialSource::Query(param)));
            }
        }
    }
    None
}

/// The `name=value` pairs of `query` whose name is exactly `name` as written on the wire: no
/// percent- or `+`-decoding of the name, which is how Envoy's `query_parameters_to_remove`
/// matches. Accepting `ke%79=` would accept what Envoy leaves in place (SPEC §9).
fn query_pairs_named<'q, 'n>(
    query: &'q str,
    name: &'n str,
) -> impl Iterator<Item = &'q str> + use<'q, 'n> {
    query
        .split('&')
        .filter(move |pair| pair.split('=').next() == Some(name))
}

/// RFC 3986 unreserved characters: what a query parameter name can be written with unencoded.
fn is_unreserved(b: u8) -> bool {
    b.is_ascii_alphanumeric() || matches!(b, b'-' | b'.' | b'_' | b'~')
}

/// The client address used for the allowlist.
pub fn client_ip(cfg: &DecisionConfig, req: &impl RequestView) -> Option<IpAddr> {
    match cfg.client_ip {
        ClientIpSource::Peer => req.peer_ip(),
        ClientIpSource::ForwardedFor(n) => {
            let xff = req.header("x-forwarded-for")?;
            xff.rsplit(',').nth(n - 1)?.trim().parse().ok()
        }
    }
}

/// Decides one request. `hash` turns a presented key into its stored HMAC.
pub fn decide<'s>(
    snap: &'s Snapshot,
    cfg: &DecisionConfig,
    req: &impl RequestView,
    now: Timestamp,
    hash: impl FnOnce(&[u8]) -> [u8; 32],
) -> Decision<'s> {
    // 1. Credential.
    let Some((presented, _source)) = extract_credential(cfg, req) else {
        return deny(DenyReason::MissingCredential, None);
    };
    // 2. Look up HMAC(key): a key's value, or a rotated key's previous value, which stops at
    // its expiry and is then answered exactly like a value in no snapshot.
    let presented = hash(presented.as_bytes());
    let Some(key) = snap.key(&presented) else {
        return deny(DenyReason::UnknownKey, None);
    };
    if key.previous_expired(&presented, now) {
        return deny(DenyReason::UnknownKey, None);
    }
    if !key.enabled {
        return deny(DenyReason::Disabled, Some(key));
    }
    if key.expire_time.is_some_and(|t| t <= now) {
        return deny(DenyReason::Expired, Some(key));
    }
    let Some(consumer) = key.consumer.and_then(|id| snap.consumer(&id)) else {
        return deny(DenyReason::Unbound, Some(key));
    };
    // 3. Client address.
    if !key.ip_allowlist.is_empty() {
        match client_ip(cfg, req) {
            Some(ip) if ip_allowed(&key.ip_allowlist, ip) => {}
            _ => return deny(DenyReason::IpNotAllowed, Some(key)),
        }
    }
    // 4. The route's model service.
    let Some(service) = req.model_service().and_then(|name| snap.service(name)) else {
        return deny(DenyReason::RouteNotConfigured, Some(key));
    };
    // 5. Effective scope = consumer scope ∩ key scope, on this service...
    let consumer_grant = consumer.scope.grant(&service.id);
    let key_grant = key.scope.grant(&service.id);
    if consumer_grant == Grant::Nothing || key_grant == Grant::Nothing {
        return deny(DenyReason::ModelServiceNotAllowed, Some(key));
    }
    // ... and on the requested model, read only when something here depends on it.
    let needs_model =
        !service.models.is_empty() || consumer_grant.needs_model() || key_grant.needs_model();
    let model = match requested_model(service, req, needs_model) {
        Ok(model) => model,
        Err(NeedBody) => return Decision::NeedBody,
    };
    if needs_model {
        let Some(name) = model else {
            return deny(DenyReason::ModelUnknown, Some(key));
        };
        let m = name.as_str();
        if !(service.admits_model(m) && consumer_grant.allows(m) && key_grant.allows(m)) {
            return Decision::Deny(Denied {
                reason: DenyReason::ModelNotAllowed,
                key: Some(key),
                model,
            });
        }
    }
    // 6. An enabled model key bound to the service.
    let Some(model_key) = service.pick() else {
        return deny(DenyReason::NoModelKey, Some(key));
    };
    // 7. A budget left, the key's and its consumer's (spent until the period's end).
    if key.limits.budget_exhausted(now) || consumer.limits.budget_exhausted(now) {
        return Decision::Deny(Denied {
            reason: DenyReason::InsufficientQuota,
            key: Some(key),
            model,
        });
    }
    // 8. Allow: the adapter injects `model_key` and strips the credentials.
    Decision::Allow(Allowed {
        key,
        consumer,
        service,
        model_key,
        model,
    })
}

/// The body must be read first.
struct NeedBody;

/// The model the request names: the route's fixed model wins; otherwise where the service
/// says its requests name it. The body is consulted only when `needed` (reading it is the
/// one cost the decision can avoid); the path and the route always are (free). `None`: no
/// model could be determined (no body, not JSON, no or a duplicated `model`, a partial body).
fn requested_model(
    service: &ServiceEntry,
    req: &impl RequestView,
    needed: bool,
) -> Result<Option<ModelName>, NeedBody> {
    if let Some(fixed) = req.route_model() {
        return Ok(ModelName::new(fixed));
    }
    Ok(match service.model_source {
        ModelSource::Path => req
            .path()
            .and_then(model_from_path)
            .and_then(ModelName::new),
        ModelSource::None => None,
        ModelSource::Body if !needed => None,
        ModelSource::Body => match req.body() {
            Body::Unread => return Err(NeedBody),
            Body::Complete(bytes) => model_from_json(bytes).ok().and_then(|m| ModelName::new(&m)),
            Body::Partial => None,
        },
    })
}

/// Every credential header present on the request except `overwritten` (the vendor header,
/// which is set, not removed), and the credential query parameter if present.
pub fn credentials_to_remove<'c>(
    cfg: &'c DecisionConfig,
    req: &impl RequestView,
    overwritten: &str,
) -> (Vec<&'c str>, Option<&'c str>) {
    (
        credential_headers_present(cfg, req, overwritten).collect(),
        credential_param_present(cfg, req),
    )
}

/// The configured credential headers the request carries, except `overwritten`.
pub fn credential_headers_present<'c, 'r, R: RequestView>(
    cfg: &'c DecisionConfig,
    req: &'r R,
    overwritten: &'r str,
) -> impl Iterator<Item = &'c str> + use<'c, 'r, R> {
    cfg.credential_headers
        .iter()
        .filter(move |h| h.as_str() != overwritten && req.has_header(h))
        .map(String::as_str)
}

/// The configured credential query parameter, when the request's query carries it under
/// that exact name (as [`extract_credential`] reads it and Envoy removes it).
pub fn credential_param_present<'c>(
    cfg: &'c DecisionConfig,
    req: &impl RequestView,
) -> Option<&'c str> {
    cfg.credential_query_param
        .as_deref()
        .filter(|p| query_pairs_named(req.query(), p).next().is_some())
}

/// `path` (a request's `:path`) without every occurrence of the query parameter `param`
/// (its exact name as written, like [`extract_credential`]); `None` when it carries none.
/// Other parameters keep their order and encoding.
pub fn path_without_param(path: &str, param: &str) -> Option<String> {
    let (base, query) = path.split_once('?')?;
    let mut removed = false;
    let kept: Vec<&str> = query
        .split('&')
        .filter(|pair| {
            let is_param = pair.split('=').next() == Some(param);
            removed |= is_param;
            !is_param
        })
        .collect();
    if !removed {
        return None;
    }
    let kept: Vec<&str> = kept.into_iter().filter(|p| !p.is_empty()).collect();
    let base = if base.is_empty() { "/" } else { base };
    Some(if kept.is_empty() {
        base.to_string()
    } else {
        format!("{base}?{}", kept.join("&"))
    })
}

#[cfg(test)]
#[path = "decision_tests.rs"]
mod tests;

#[cfg(test)]
#[path = "decision_model_tests.rs"]
mod model_tests;

#[cfg(test)]
#[path = "decision_rotation_tests.rs"]
mod rotation_tests;

#[cfg(test)]
#[path = "decision_limits_tests.rs"]
mod limits_tests;
