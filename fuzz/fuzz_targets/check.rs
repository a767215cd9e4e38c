//! Fuzzes the Check path: arbitrary headers, path and query, peer address and route context
//! into `ExtAuthzService::check_sync` (which runs `decide()`, the `Outcome` and the Envoy
//! response). Input: lines, each `<tag> <rest>`; `@0`..`@7` stand for the snapshot's keys.
//!   h <name>: <value>   a header (raw; Envoy itself lower-cases names)
//!   p <path>            the path, with or without `?query`
//!   q <query>           appended to the path as its query
//!   a <address>         the peer's socket address
//!   s <service>         the route's model_service context extension
//!   m <model>           the route's fixed model context extension
//!   b <bytes>           the request body as Envoy sends it (`body`; `\n` written as `\\n`)
//!   r                   send the body as `raw_body` instead (pack_as_bytes)
//!   c <digits>          configuration: 1st digit bit 0 = query param `key`, bit 1 = xff
//!                       (2nd digit = hops), bit 2 = custom header list; 3rd digit bit 0 =
//!                       Envoy also fills the `query` field
//!   t <n>               seconds after NOW
//! Invariants: never panics; an OK response sets exactly one vendor header (overwrite, a
//! model key's value) and, after Envoy applies its removals, the forwarded request carries no
//! credential this configuration would accept; every 401 body is the same bytes; no model
//! key in a denial; an allowed request of the model-scoped key (`@8`) names a model its scope
//! grants (gpt-4o-mini on openai, prod-* on azure), and one on anthropic a `claude-*` model
//! (the service's list), in the `model` metadata.
#![no_main]

use std::collections::HashMap;
use std::sync::LazyLock;

use envoy_types::ext_authz::v3::pb::{CheckRequest, CheckResponse};
use envoy_types::pb::envoy::config::core::v3::{Address, SocketAddress, address};
use envoy_types::pb::envoy::service::auth::v3::AttributeContext;
use envoy_types::pb::envoy::service::auth::v3::attribute_context::{HttpRequest, Peer, Request};
use envoy_types::pb::envoy::service::auth::v3::check_response::HttpResponse;
use keygate::authz::decision::extract_credential;
use keygate::authz::{ClientIpSource, DecisionConfig, ExtAuthzService, RequestView};
use keygate::crypto::KeyHasher;
use keygate::domain::Timestamp;
use keygate::snapshot::SnapshotCell;
use keygate_fuzz::{KEYS, MODEL_KEYS, MODEL_SCOPED, NOW};
use libfuzzer_sys::fuzz_target;

struct World {
    hasher: KeyHasher,
    cell: SnapshotCell,
    /// The 401 body of a request without any credential: every 401 must be these bytes.
    body_401: String,
}

static WORLD: LazyLock<World> = LazyLock::new(|| {
    let keys = keygate_fuzz::keys();
    let cell = SnapshotCell::new();
    cell.publish(std::sync::Arc::new(keygate_fuzz::snapshot(&keys)));
    let svc = ExtAuthzService::new(cell.clone(), keys.hasher.clone(), DecisionConfig::default());
    let r = svc.check_sync(&CheckRequest::default(), NOW);
    let Some(HttpResponse::DeniedResponse(d)) = r.http_response else {
        panic!("an empty request is refused")
    };
    World {
        hasher: keys.hasher,
        cell,
        body_401: d.body,
    }
});

#[derive(Default)]
struct Input {
    headers: HashMap<String, String>,
    path: String,
    query: Option<String>,
    peer: Option<String>,
    service: Option<String>,
    model: Option<String>,
    body: Option<String>,
    raw_body: bool,
    config: [u8; 3],
    later_s: i64,
}

fn expand(s: &str) -> String {
    let mut out = s.to_string();
    for (i, k) in KEYS.iter().enumerate() {
        out = out.replace(&format!("@{i}"), k);
    }
    out
}

fn parse(data: &[u8]) -> Input {
    let text = String::from_utf8_lossy(data);
    let mut input = Input::default();
    for line in text.split('\n') {
        // `get`, not `split_at`: a line may start with a multi-byte character.
        if line == "r" {
            input.raw_body = true;
            continue;
        }
        let (Some(tag), Some(rest)) = (line.get(..2), line.get(2..)) else {
            continue;
        };
        let rest = expand(rest);
        match tag {
            "h " => {
                let (n, v) = rest.split_once(':').unwrap_or((&rest, ""));
                let v = v.strip_prefix(' ').unwrap_or(v);
                input
                    .headers
                    .entry(n.to_string())
                    .and_modify(|old| {
                        old.push(',');
                        old.push_str(v)
                    })
                    .or_insert_with(|| v.to_string());
            }
            "p " => input.path = rest,
            "q " => input.query = Some(rest),
            "a " => input.peer = Some(rest),
            "s " => input.service = Some(rest),
            "m " => input.model = Some(rest),
            "b " => input.body = Some(rest.replace("\\n", "\n")),
            "r" | "r " => input.raw_body = true,
            "c " => {
                for (d, b) in input.config.iter_mut().zip(rest.bytes()) {
                    *d = b.wrapping_sub(b'0');
                }
            }
            "t " => input.later_s = rest.trim().parse().unwrap_or(0),
            _ => {}
        }
    }
    input
}

fn config(c: [u8; 3]) -> DecisionConfig {
    let headers: Vec<String> = if c[0] & 4 != 0 {
        vec!["x-goog-api-key".into(), "authorization".into()]
    } else {
        DecisionConfig::default().credential_headers
    };
    let param = (c[0] & 1 != 0).then(|| "key".to_string());
    let ip = if c[0] & 2 != 0 {
        ClientIpSource::ForwardedFor(usize::from(c[1] % 4) + 1)
    } else {
        ClientIpSource::Peer
    };
    DecisionConfig::new(&headers, param, ip).expect("a valid configuration")
}

fn request(input: &Input) -> CheckRequest {
    let path = match &input.query {
        Some(q) => format!("{}?{q}", input.path),
        None => input.path.clone(),
    };
    let query = if input.config[2] & 1 != 0 {
        path.split_once('?')
            .map(|(_, q)| q.to_string())
            .unwrap_or_default()
    } else {
        String::new()
    };
    CheckRequest {
        attributes: Some(AttributeContext {
            source: input.peer.as_ref().map(|a| Peer {
                address: Some(Address {
                    address: Some(address::Address::SocketAddress(SocketAddress {
                        address: a.clone(),
                        ..Default::default()
                    })),
                }),
                ..Default::default()
            }),
            request: Some(Request {
                http: Some(HttpRequest {
                    method: "POST".into(),
                    path,
                    query,
                    headers: input.headers.clone(),
                    body: if input.raw_body {
                        String::new()
                    } else {
                        input.body.clone().unwrap_or_default()
                    },
                    raw_body: if input.raw_body {
                        input.body.clone().unwrap_or_default().into_bytes()
                    } else {
                        Vec::new()
                    },
                    ..Default::default()
                }),
                ..Default::default()
            }),
            context_extensions: input
                .service
                .iter()
                .map(|s| ("model_service".to_string(), s.clone()))
                .chain(input.model.iter().map(|m| ("model".to_string(), m.clone())))
                .collect(),
            ..Default::default()
        }),
    }
}

/// The request as the upstream sees it after Envoy applied an OK response, without the
/// vendor header: headers removed by name, query parameters removed by their literal name.
struct Forwarded {
    headers: HashMap<String, String>,
    query: String,
}

impl RequestView for Forwarded {
    fn header(&self, name: &str) -> Option<&str> {
        self.headers.get(name).map(String::as_str)
    }
    fn query(&self) -> &str {
        &self.query
    }
    fn peer_ip(&self) -> Option<std::net::IpAddr> {
        None
    }
    fn model_service(&self) -> Option<&str> {
        None
    }
}

/// The string metadata field `name` of a response.
fn meta_field(resp: &CheckResponse, name: &str) -> Option<String> {
    use envoy_types::pb::google::protobuf::value::Kind;
    match resp.dynamic_metadata.as_ref()?.fields.get(name)?.kind.as_ref()? {
        Kind::StringValue(s) => Some(s.clone()),
        _ => None,
    }
}

/// Model scope: what the decision allowed is what the scope and service lists grant.
fn check_model_rules(input: &Input, resp: &CheckResponse) {
    let model = meta_field(resp, "model");
    let service = meta_field(resp, "model_service").expect("an allowed request names its service");
    if service == "anthropic" {
        let m = model.as_deref().expect("anthropic's model list needs the model");
        assert!(m.starts_with("claude-"), "anthropic allowed {m:?}");
    }
    let key_id = meta_field(resp, "consumer_key").expect("an allowed request names its key");
    if key_id == format!("key-{MODEL_SCOPED}") {
        let m = model.as_deref().expect("a model-scoped key needs the model");
        match service.as_str() {
            "openai" => assert_eq!(m, "gpt-4o-mini", "{:?}", input.body),
            "azure" => assert!(m.starts_with("prod-"), "azure allowed {m:?}"),
            other => panic!("the model-scoped key was allowed on {other}"),
        }
    }
}

fn check_allowed(req: &CheckRequest, resp: &CheckResponse, cfg: &DecisionConfig) {
    let Some(HttpResponse::OkResponse(ok)) = &resp.http_response else {
        panic!("an OK status without an OK response")
    };
    assert_eq!(ok.headers.len(), 1, "exactly one vendor header");
    #[allow(deprecated)]
    let overwrite = ok.headers[0].append.as_ref().map(|b| b.value);
    assert_eq!(overwrite, Some(false), "the vendor header overwrites");
    let vendor = ok.headers[0].header.as_ref().expect("a header");
    assert!(
        MODEL_KEYS.iter().any(|k| vendor.value.ends_with(k)),
        "the vendor header carries a model key"
    );
    let http = req
        .attributes
        .as_ref()
        .unwrap()
        .request
        .as_ref()
        .unwrap()
        .http
        .as_ref()
        .unwrap();
    let mut headers = http.headers.clone();
    for h in &ok.headers_to_remove {
        headers.remove(h);
    }
    headers.remove(&vendor.key);
    let query = http.path.split_once('?').map(|(_, q)| q).unwrap_or("");
    let query = query
        .split('&')
        .filter(|p| {
            !ok.query_parameters_to_remove
                .iter()
                .any(|r| p.split('=').next() == Some(r))
        })
        .collect::<Vec<_>>()
        .join("&");
    let fwd = Forwarded { headers, query };
    assert!(
        extract_credential(cfg, &fwd).is_none(),
        "a credential survives Envoy's removals: {:?} {:?}",
        ok.headers_to_remove,
        ok.query_parameters_to_remove
    );
}

fn check_denied(resp: &CheckResponse, w: &World) {
    let Some(HttpResponse::DeniedResponse(d)) = &resp.http_response else {
        panic!("a non-OK status without a denied response")
    };
    let status = d.status.as_ref().map(|s| s.code).unwrap_or(0);
    if status == 401 {
        assert_eq!(d.body, w.body_401, "every 401 body is the same bytes");
    }
    let meta = format!("{:?}", resp.dynamic_metadata);
    for k in MODEL_KEYS {
        assert!(
            !d.body.contains(k) && !meta.contains(k),
            "a model key in a denial"
        );
    }
}

fuzz_target!(|data: &[u8]| {
    let w = &*WORLD;
    let input = parse(data);
    let cfg = config(input.config);
    let svc = ExtAuthzService::new(w.cell.clone(), w.hasher.clone(), cfg.clone());
    let req = request(&input);
    let now = Timestamp(
        NOW.0
            .saturating_add(input.later_s.saturating_mul(1_000_000)),
    );
    let resp = svc.check_sync(&req, now);
    let code = resp.status.as_ref().map(|s| s.code).unwrap_or(-1);
    if code == 0 {
        check_allowed(&req, &resp, &cfg);
        check_model_rules(&input, &resp);
    } else {
        check_denied(&resp, w);
    }
});
