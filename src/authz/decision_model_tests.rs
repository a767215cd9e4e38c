//! Unit tests of model-level scope in the decision (SPEC §8.1): effective scope per (service,
//! model), service model lists, where the model is read from (body, path, route), and that
//! the body is asked for only when the decision depends on it.
//!
//! The snapshot is built through the public update path, as in `decision_tests`.

use super::*;

use std::collections::HashMap;
use std::sync::{Arc, LazyLock};

use proptest::prelude::*;
use uuid::Uuid;

use crate::authz::outcome::{ALL_METADATA, Outcome};
use crate::crypto::{Keys, MasterKey, Secret};
use crate::domain::ModelSource;
use crate::domain::model::pattern_matches;
use crate::snapshot::{
    ConsumerRecord, KeyEntry, ModelKeyRecord, ModelRule, ScopeList, ScopeSet, ServiceRecord, Update,
};

const NOW: Timestamp = Timestamp(1_700_000_000_000_000);

fn id(n: u128) -> Uuid {
    Uuid::from_u128(n)
}

// Services.
const OPENAI: u128 = 0x10; // BODY, any model
const ANTHROPIC: u128 = 0x11; // BODY, any model
const AZURE: u128 = 0x12; // PATH (deployments)
const GEMINI: u128 = 0x13; // PATH (models/…:)
const LISTED: u128 = 0x14; // BODY, models ["gpt-4o-mini", "o3-*"]
const SILENT: u128 = 0x15; // NONE
// Consumers.
const C_ALL: u128 = 0x20;
const C_CLAUDE: u128 = 0x21; // models ["anthropic/claude-*"]

// Consumer keys.
const K_ALL: &str = "kg-all-Qm7xV2pLr9TzW4nB8c";
const K_MINI: &str = "kg-mini-Jd3KsZ8qWv1MxP6rT";
const K_CLAUDE_CONSUMER: &str = "kg-claude-Hb5NcR2yLq7VzX9m";
const K_CLAUDE3_KEY: &str = "kg-claude3-Pf4GtY7wQs2KxM8";
const K_AZURE: &str = "kg-azure-Wn6DzL3hVq9TcR1xK";
const K_GEMINI: &str = "kg-gemini-Rc8MvT1zNq5XwB7k";
const K_MIXED: &str = "kg-mixed-Ty2BqW9kMz4RxV6nD";
const K_SILENT: &str = "kg-silent-Lx9PwN4vKr2ZqT7m";

fn rule(service: u128, pattern: &str) -> ModelRule {
    ModelRule {
        service: id(service),
        pattern: pattern.into(),
    }
}

fn list(services: &[u128], models: Vec<ModelRule>) -> ScopeSet {
    ScopeSet::Only(Arc::new(ScopeList {
        services: services.iter().map(|s| id(*s)).collect(),
        models: models.into(),
    }))
}

struct World {
    keys: Keys,
    snap: Snapshot,
}

fn build_world() -> World {
    let keys = MasterKey::generate().keys();
    let service = |n: u128, name: &str, models: &[&str], source: ModelSource| {
        let mk = n + 0x100;
        ServiceRecord {
            id: id(n),
            name: name.into(),
            auth_header: "authorization".into(),
            auth_value_template: "Bearer {key}".into(),
            model_keys: vec![ModelKeyRecord {
                id: id(mk),
                name: format!("{name}-key"),
                ciphertext: keys
                    .cipher
                    .encrypt(&id(mk).to_string(), &Secret::new(format!("sk-{name}"))),
            }],
            models: models.iter().map(|m| m.to_string()).collect(),
            model_source: source,
        }
    };
    let services = vec![
        service(OPENAI, "openai", &[], ModelSource::Body),
        service(ANTHROPIC, "anthropic", &[], ModelSource::Body),
        service(AZURE, "azure", &[], ModelSource::Path),
        service(GEMINI, "gemini", &[], ModelSource::Path),
        service(
            LISTED,
            "listed",
            &["gpt-4o-mini", "o3-*"],
            ModelSource::Body,
        ),
        service(SILENT, "silent", &[], ModelSource::None),
    ];
    let consumers = vec![
        ConsumerRecord {
            id: id(C_ALL),
            name: "all".into(),
            scope: ScopeSet::All,
            limits: Default::default(),
        },
        ConsumerRecord {
            id: id(C_CLAUDE),
            name: "claude-only".into(),
            scope: list(&[], vec![rule(ANTHROPIC, "claude-*")]),
            limits: Default::default(),
        },
    ];
    let mut records = Vec::new();
    let mut add = |n: u128, value: &str, consumer: u128, scope: ScopeSet| {
        records.push((
            keys.hasher.hash(value.as_bytes()),
            KeyEntry {
                id: id(0x400 + n),
                consumer: Some(id(consumer)),
                enabled: true,
                expire_time: None,
                name: format!("key-{n}").into(),
                scope,
                ip_allowlist: Box::new([]),
                limits: Default::default(),
                usage: Default::default(),
                previous: None,
            },
        ));
    };
    add(0, K_ALL, C_ALL, ScopeSet::All);
    add(
        1,
        K_MINI,
        C_ALL,
        list(
            &[],
            vec![rule(OPENAI, "gpt-4o-mini"), rule(SILENT, "gpt-4o-mini")],
        ),
    );
    add(2, K_CLAUDE_CONSUMER, C_CLAUDE, ScopeSet::All);
    add(
        3,
        K_CLAUDE3_KEY,
        C_CLAUDE,
        list(&[], vec![rule(ANTHROPIC, "claude-3-*")]),
    );
    add(4, K_AZURE, C_ALL, list(&[], vec![rule(AZURE, "prod-mini")]));
    add(
        5,
        K_GEMINI,
        C_ALL,
        list(&[], vec![rule(GEMINI, "gemini-2.5-*")]),
    );
    add(
        6,
        K_MIXED,
        C_ALL,
        list(&[ANTHROPIC], vec![rule(OPENAI, "gpt-4o-mini")]),
    );
    add(7, K_SILENT, C_ALL, list(&[], vec![rule(SILENT, "fixed-*")]));
    let update = Update {
        store_id: "test-store".into(),
        version: 1,
        full: true,
        keys: records,
        consumers,
        services: Some(services),
        model_key_count: 6,
        ..Default::default()
    };
    let snap = Snapshot::from_full(update, &keys).expect("a well-formed update applies");
    World { keys, snap }
}

static WORLD: LazyLock<World> = LazyLock::new(build_world);

/// A request for the model decision: a credential, a route, and what the data plane has of
/// the body.
#[derive(Clone, Debug)]
struct Req {
    headers: HashMap<String, String>,
    service: String,
    route_model: Option<String>,
    path: String,
    body: Option<Vec<u8>>,
    partial: bool,
}

impl Req {
    fn new(key: &str, service: &str) -> Self {
        Req {
            headers: HashMap::from([("authorization".into(), format!("Bearer {key}"))]),
            service: service.into(),
            route_model: None,
            path: "/v1/chat/completions".into(),
            body: None,
            partial: false,
        }
    }
    fn body(mut self, b: &str) -> Self {
        self.body = Some(b.as_bytes().to_vec());
        self
    }
    fn model(self, m: &str) -> Self {
        self.body(&format!(
            r#"{{"model":"{m}","messages":[{{"role":"user","content":"hi"}}]}}"#
        ))
    }
    fn path(mut self, p: &str) -> Self {
        self.path = p.into();
        self
    }
    fn route_model(mut self, m: &str) -> Self {
        self.route_model = Some(m.into());
        self
    }
}

impl RequestView for Req {
    fn header(&self, name: &str) -> Option<&str> {
        self.headers.get(name).map(String::as_str)
    }
    fn query(&self) -> &str {
        ""
    }
    fn peer_ip(&self) -> Option<std::net::IpAddr> {
        None
    }
    fn model_service(&self) -> Option<&str> {
        Some(&self.service)
    }
    fn route_model(&self) -> Option<&str> {
        self.route_model.as_deref()
    }
    fn path(&self) -> Option<&str> {
        Some(&self.path)
    }
    fn body(&self) -> Body<'_> {
        match (&self.body, self.partial) {
            (_, true) => Body::Partial,
            (Some(b), false) => Body::Complete(b),
            (None, false) => Body::Unread,
        }
    }
}

fn decide_req(req: &Req) -> Decision<'static> {
    let w = &*WORLD;
    decide(&w.snap, &DecisionConfig::default(), req, NOW, |k| {
        w.keys.hasher.hash(k)
    })
}

/// `Ok(model)` for an allowed request, `Err(reason)` for a refused one, `NeedBody` as
/// `Err(None)`.
fn verdict(req: &Req) -> Result<Option<String>, Option<DenyReason>> {
    match decide_req(req) {
        Decision::Allow(a) => Ok(a.model.map(|m| m.as_str().to_string())),
        Decision::Deny(d) => Err(Some(d.reason)),
        Decision::NeedBody => Err(None),
    }
}

fn allowed_with(req: &Req, model: &str) {
    assert_eq!(verdict(req), Ok(Some(model.to_string())), "{req:?}");
}

fn refused(req: &Req, reason: DenyReason) {
    assert_eq!(verdict(req), Err(Some(reason)), "{req:?}");
}

#[test]
fn service_wide_keys_are_decided_from_headers_without_the_body() {
    // Body unread: a service-wide key on a service with no model list never asks for it.
    assert_eq!(verdict(&Req::new(K_ALL, "openai")), Ok(None));
    assert_eq!(
        verdict(&Req::new(K_CLAUDE_CONSUMER, "openai")),
        Err(Some(DenyReason::ModelServiceNotAllowed))
    );
    // A key listing anthropic whole is service-wide there, model-narrowed on openai.
    assert_eq!(verdict(&Req::new(K_MIXED, "anthropic")), Ok(None));
    assert_eq!(verdict(&Req::new(K_MIXED, "openai")), Err(None));
    // And a key with no entry for a service is refused before any body.
    refused(
        &Req::new(K_MINI, "anthropic"),
        DenyReason::ModelServiceNotAllowed,
    );
}

#[test]
fn a_model_scoped_key_asks_for_the_body_then_decides_on_the_model() {
    assert_eq!(verdict(&Req::new(K_MINI, "openai")), Err(None));
    allowed_with(
        &Req::new(K_MINI, "openai").model("gpt-4o-mini"),
        "gpt-4o-mini",
    );
    refused(
        &Req::new(K_MINI, "openai").model("gpt-4o"),
        DenyReason::ModelNotAllowed,
    );
    refused(
        &Req::new(K_MINI, "openai").model("gpt-4o-mini-2024"),
        DenyReason::ModelNotAllowed,
    );
    // The refusal names the model it read (for logs and metadata).
    match decide_req(&Req::new(K_MINI, "openai").model("gpt-4o")) {
        Decision::Deny(d) => assert_eq!(
            d.model.map(|m| m.as_str().to_string()).as_deref(),
            Some("gpt-4o")
        ),
        other => panic!("expected a refusal, got {other:?}"),
    }
}

#[test]
fn the_model_after_a_large_messages_array_is_found() {
    let filler = "x".repeat(100 * 1024);
    let body = |m: &str| {
        format!(r#"{{"messages":[{{"role":"user","content":"{filler}"}}],"model":"{m}"}}"#)
    };
    allowed_with(
        &Req::new(K_MINI, "openai").body(&body("gpt-4o-mini")),
        "gpt-4o-mini",
    );
    refused(
        &Req::new(K_MINI, "openai").body(&body("gpt-4o")),
        DenyReason::ModelNotAllowed,
    );
}

#[test]
fn a_model_that_cannot_be_read_is_refused_never_guessed() {
    for body in [
        r#"{"model":"gpt-4o-mini","model":"gpt-4o"}"#,
        r#"{"model":"gpt-4o","model":"gpt-4o-mini"}"#,
        r#"{"messages":[]}"#,
        r#"{"model":42}"#,
        r#"{"model":"gpt-4o-mini""#,
        "model=gpt-4o-mini",
        "",
        r#"[{"model":"gpt-4o-mini"}]"#,
        r#"{"input":{"model":"gpt-4o-mini"}}"#,
    ] {
        refused(
            &Req::new(K_MINI, "openai").body(body),
            DenyReason::ModelUnknown,
        );
    }
    let mut partial = Req::new(K_MINI, "openai").model("gpt-4o-mini");
    partial.partial = true;
    refused(&partial, DenyReason::ModelUnknown);
}

#[test]
fn consumer_scope_narrows_every_key_of_the_consumer() {
    let r = |m: &str| Req::new(K_CLAUDE_CONSUMER, "anthropic").model(m);
    assert_eq!(
        verdict(&Req::new(K_CLAUDE_CONSUMER, "anthropic")),
        Err(None)
    );
    allowed_with(&r("claude-sonnet-4-5"), "claude-sonnet-4-5");
    allowed_with(&r("claude-3-opus"), "claude-3-opus");
    refused(&r("gpt-4o"), DenyReason::ModelNotAllowed);
    refused(&r("Claude-sonnet"), DenyReason::ModelNotAllowed);
    // Consumer ∩ key: the key narrows further.
    let k = |m: &str| Req::new(K_CLAUDE3_KEY, "anthropic").model(m);
    allowed_with(&k("claude-3-haiku"), "claude-3-haiku");
    refused(&k("claude-sonnet-4-5"), DenyReason::ModelNotAllowed);
}

#[test]
fn the_service_model_list_binds_every_key() {
    let r = |k: &str, m: &str| Req::new(k, "listed").model(m);
    // Even a key of scope all now needs the model.
    assert_eq!(verdict(&Req::new(K_ALL, "listed")), Err(None));
    allowed_with(&r(K_ALL, "gpt-4o-mini"), "gpt-4o-mini");
    allowed_with(&r(K_ALL, "o3-mini"), "o3-mini");
    refused(&r(K_ALL, "gpt-4o"), DenyReason::ModelNotAllowed);
    refused(&r(K_ALL, "o1"), DenyReason::ModelNotAllowed);
    refused(
        &Req::new(K_ALL, "listed").body("{}"),
        DenyReason::ModelUnknown,
    );
}

#[test]
fn path_services_are_decided_from_the_path_without_the_body() {
    let azure = |p: &str| Req::new(K_AZURE, "azure").path(p);
    allowed_with(
        &azure("/openai/deployments/prod-mini/chat/completions?api-version=2024-10-21"),
        "prod-mini",
    );
    refused(
        &azure("/openai/deployments/prod-4o/chat/completions"),
        DenyReason::ModelNotAllowed,
    );
    refused(&azure("/openai/chat/completions"), DenyReason::ModelUnknown);
    // The body never matters there (it is not even read: `Unread` is fine).
    refused(
        &azure("/openai/deployments/prod-4o/chat/completions").model("prod-mini"),
        DenyReason::ModelNotAllowed,
    );
    let gemini = |p: &str| Req::new(K_GEMINI, "gemini").path(p);
    allowed_with(
        &gemini("/v1beta/models/gemini-2.5-pro:generateContent"),
        "gemini-2.5-pro",
    );
    allowed_with(
        &gemini("/v1beta/models/gemini-2.5-flash:streamGenerateContent?alt=sse"),
        "gemini-2.5-flash",
    );
    refused(
        &gemini("/v1beta/models/gemini-1.5-pro:generateContent"),
        DenyReason::ModelNotAllowed,
    );
    // A service-wide key on a path service still learns the model (metadata), for free.
    allowed_with(
        &Req::new(K_ALL, "gemini").path("/v1beta/models/gemini-1.5-pro:generateContent"),
        "gemini-1.5-pro",
    );
}

#[test]
fn a_route_fixed_model_wins_over_body_and_path() {
    // Body says gpt-4o; the route says gpt-4o-mini: the route wins, the body is not read.
    allowed_with(
        &Req::new(K_MINI, "openai")
            .route_model("gpt-4o-mini")
            .model("gpt-4o"),
        "gpt-4o-mini",
    );
    allowed_with(
        &Req::new(K_MINI, "openai").route_model("gpt-4o-mini"),
        "gpt-4o-mini",
    );
    refused(
        &Req::new(K_MINI, "openai")
            .route_model("gpt-4o")
            .model("gpt-4o-mini"),
        DenyReason::ModelNotAllowed,
    );
    refused(
        &Req::new(K_AZURE, "azure")
            .route_model("prod-4o")
            .path("/openai/deployments/prod-mini/chat/completions"),
        DenyReason::ModelNotAllowed,
    );
}

#[test]
fn a_service_whose_requests_name_no_model_needs_a_route_model() {
    refused(
        &Req::new(K_SILENT, "silent").model("fixed-a"),
        DenyReason::ModelUnknown,
    );
    allowed_with(
        &Req::new(K_SILENT, "silent").route_model("fixed-a"),
        "fixed-a",
    );
    refused(
        &Req::new(K_SILENT, "silent").route_model("other"),
        DenyReason::ModelNotAllowed,
    );
    // Service-wide keys are unaffected.
    assert_eq!(verdict(&Req::new(K_ALL, "silent")), Ok(None));
}

#[test]
fn outcomes_carry_the_model_in_metadata_and_the_reply_body() {
    let cfg = DecisionConfig::default();
    let req = Req::new(K_MINI, "openai").model("gpt-4o-mini");
    match Outcome::of(decide_req(&req), &cfg) {
        Outcome::Admit(a) => {
            let mut buf = [0; 36];
            let fields: Vec<(&str, String)> = a
                .metadata(&ALL_METADATA)
                .map(|(k, v)| (k, v.as_str(&mut buf).to_string()))
                .collect();
            assert!(
                fields.contains(&("model", "gpt-4o-mini".into())),
                "{fields:?}"
            );
        }
        Outcome::Refuse(r) => panic!("refused: {:?}", r.reason),
    }
    // A service-wide allow whose body was never read has no model field.
    match Outcome::of(decide_req(&Req::new(K_ALL, "openai")), &cfg) {
        Outcome::Admit(a) => assert!(a.metadata(&ALL_METADATA).all(|(k, _)| k != "model")),
        Outcome::Refuse(r) => panic!("refused: {:?}", r.reason),
    }
    let req = Req::new(K_MINI, "openai").model("gpt-4o");
    match Outcome::of(decide_req(&req), &cfg) {
        Outcome::Refuse(r) => {
            assert_eq!(r.status(), 403);
            let v: serde_json::Value = serde_json::from_str(r.body()).unwrap();
            assert_eq!(v["error"]["code"], "model_not_allowed");
            assert_eq!(v["error"]["type"], "permission_error");
            let mut buf = [0; 36];
            let fields: Vec<(&str, String)> = r
                .metadata()
                .map(|(k, v)| (k, v.as_str(&mut buf).to_string()))
                .collect();
            assert!(fields.contains(&("deny_reason", "model_not_allowed".into())));
            assert!(fields.contains(&("model", "gpt-4o".into())));
        }
        Outcome::Admit(_) => panic!("allowed gpt-4o"),
    }
    // A data plane that cannot read the body refuses rather than allows.
    match Outcome::of(decide_req(&Req::new(K_MINI, "openai")), &cfg) {
        Outcome::Refuse(r) => assert_eq!(r.reason, DenyReason::ModelUnknown),
        Outcome::Admit(_) => panic!("allowed without a model"),
    }
}

/// The rule a case's decision must follow, written directly.
type ModelRuleFn = dyn Fn(&str) -> bool;

proptest! {
    #![proptest_config(ProptestConfig::with_cases(256))]

    /// For any model name, the decision equals the rule written directly: the service list
    /// (if any), the consumer's grant and the key's grant all admit it.
    #[test]
    fn decisions_follow_the_scope_rule(model in "[a-z0-9.:-]{1,24}|(gpt-4o|o3-|claude-3-|claude-)[a-z0-9-]{0,8}") {
        let cases: [(&str, &str, &ModelRuleFn); 4] = [
            (K_MINI, "openai", &|m| m == "gpt-4o-mini"),
            (K_ALL, "listed", &|m| pattern_matches("gpt-4o-mini", m) || pattern_matches("o3-*", m)),
            (K_CLAUDE_CONSUMER, "anthropic", &|m| m.starts_with("claude-")),
            (K_CLAUDE3_KEY, "anthropic", &|m| m.starts_with("claude-3-")),
        ];
        for (key, service, rule) in cases {
            let got = verdict(&Req::new(key, service).model(&model));
            if rule(&model) {
                prop_assert_eq!(got, Ok(Some(model.clone())));
            } else {
                prop_assert_eq!(got, Err(Some(DenyReason::ModelNotAllowed)));
            }
        }
    }
}
