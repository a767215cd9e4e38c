//! Model-level scope (SPEC §8.1, issue 15) through a real Envoy on both data planes: the
//! shipped `envoy/envoy.yaml` (ext_authz, the body sent with the check on the routes that need
//! it) and `envoy/module.yaml` (the module holds and buffers a body only when the decision
//! needs its model), in front of a real `keygate serve` set up through the admin gRPC API.
//! Clients are the vendors' own Python SDKs (`openai`, `anthropic`) where an application would
//! use them, and a raw HTTP/1.1 client where the bytes on the wire matter (a model after a
//! large array, a duplicated key, a body sent in chunks, a body over the buffer limit).
//!
//! Every test has its own keygate, Envoy and recording upstream, and runs once per data plane.
//! Nothing sleeps to wait for a state: everything is polled with a bound.

mod common;

use std::time::Duration;

use keygate::proto::admin::v1 as pb;

use common::admin::{bearer, create_consumer_key, create_model_key, create_service};
use common::envoy::{HttpResponse, Recorded, UPSTREAM_REPLY_TEXT};
use common::gateway::{Gateway, Plane};
use common::sdk::{Sdk, SdkResult, sdk_calls};
use common::{Admin, poll_until};

on_both_planes!(
    openai_sdk_with_a_key_scoped_to_one_model,
    anthropic_sdk_with_a_consumer_scoped_to_claude_models,
    a_service_models_list_binds_every_key_including_scope_all,
    path_services_are_decided_from_the_path_never_the_body,
    a_route_with_a_fixed_model_ignores_the_body,
    a_body_the_decision_does_not_need_streams_to_the_vendor_before_the_client_finishes,
    a_model_scoped_body_is_held_until_complete_then_forwarded_once,
    a_body_over_the_routes_buffer_limit_gets_413_and_never_reaches_the_vendor,
    the_access_log_names_the_model_read_and_the_model_refusals,
);

// ---------------------------------------------------------------------------------------------
// Vendor keys (CUSTOM model keys) the upstream must receive, never the consumer keys.

const OPENAI_KEY: &str = "sk-proj-modelScopeOpenAi000000000000001";
const ANTHROPIC_KEY: &str = "sk-ant-api03-modelScopeAnthropic000000002";
const AZURE_KEY: &str = "fedcba9876543210fedcba9876543210";
const GEMINI_KEY: &str = "AIzaModelScopeGemini0000000000000000004";

const CHAT: &str = "/openai/v1/chat/completions";

/// The four model services of the shipped routes (openai and anthropic read the model from
/// the body, the default; azure and gemini from the path), one model key each, and the
/// consumer `app` (scope unset: every service).
async fn provision(admin: &mut Admin) {
    use pb::model_service::ModelSource;
    create_service(admin, "openai", "", "").await;
    create_service(admin, "anthropic", "x-api-key", "{key}").await;
    for (name, header) in [("azure", "api-key"), ("gemini", "x-goog-api-key")] {
        admin
            .create_model_service(pb::CreateModelServiceRequest {
                name: name.into(),
                provider: name.into(),
                auth_header: header.into(),
                auth_value_template: "{key}".into(),
                model_source: ModelSource::Path as i32,
                ..Default::default()
            })
            .await
            .unwrap_or_else(|e| panic!("CreateModelService {name}: {e}"));
    }
    create_model_key(admin, "openai-main", OPENAI_KEY, "openai").await;
    create_model_key(admin, "anthropic-main", ANTHROPIC_KEY, "anthropic").await;
    create_model_key(admin, "azure-main", AZURE_KEY, "azure").await;
    create_model_key(admin, "gemini-main", GEMINI_KEY, "gemini").await;
    admin
        .create_consumer(pb::CreateConsumerRequest {
            name: "app".into(),
            ..Default::default()
        })
        .await
        .unwrap();
}

/// A key of consumer `app` limited to the model entries `models` ("<service>/<pattern>").
async fn model_key(admin: &mut Admin, name: &str, models: &[&str]) -> String {
    create_consumer_key(
        admin,
        pb::CreateConsumerKeyRequest {
            name: name.into(),
            consumer: "app".into(),
            scope: Some(pb::Scope {
                all: false,
                model_services: vec![],
                models: models.iter().map(|m| m.to_string()).collect(),
            }),
            ..Default::default()
        },
    )
    .await
}

/// A key of consumer `app` with its scope unset (the consumer's: every service, every model).
async fn service_wide_key(admin: &mut Admin, name: &str) -> String {
    create_consumer_key(
        admin,
        pb::CreateConsumerKeyRequest {
            name: name.into(),
            consumer: "app".into(),
            ..Default::default()
        },
    )
    .await
}

/// A chat request body naming `model`.
fn chat(model: &str) -> String {
    format!(r#"{{"model":"{model}","messages":[{{"role":"user","content":"Say hello."}}]}}"#)
}

// ---------------------------------------------------------------------------------------------
// Assertions.

/// A refusal with SPEC §2's body: `status`, `type`, `code`, one JSON content type.
fn assert_refusal(r: &HttpResponse, status: u16, kind: &str, code: &str) {
    assert_eq!(r.status, status, "{}", r.text());
    assert_eq!(
        r.values("content-type"),
        vec!["application/json"],
        "refusals carry exactly one content-type, application/json"
    );
    let v = r.json();
    assert_eq!(v["error"]["type"], kind, "body: {}", r.text());
    assert_eq!(v["error"]["code"], code, "body: {}", r.text());
    assert!(v["error"]["message"].is_string(), "body: {}", r.text());
}

fn assert_model_refusal(r: &HttpResponse) {
    assert_refusal(r, 403, "permission_error", "model_not_allowed");
}

/// What the vendor received: exactly one `header` carrying the model key `value`, no other
/// credential header, the consumer key nowhere (path, headers, body), and `body` unchanged.
fn assert_vendor_got(rec: &Recorded, header: &str, value: &str, consumer_key: &str, body: &[u8]) {
    assert_eq!(
        rec.values(header),
        vec![value.to_string()],
        "{}: the upstream must receive exactly one {header}, the model key",
        rec.target
    );
    for other in ["authorization", "x-api-key", "api-key", "x-goog-api-key"] {
        if other != header {
            assert!(
                rec.values(other).is_empty(),
                "{}: the upstream received a {other} header: {:?}",
                rec.target,
                rec.values(other)
            );
        }
    }
    rec.assert_never_carries(consumer_key, "consumer key");
    assert!(
        !common::contains_bytes(&rec.body, consumer_key.as_bytes()),
        "the consumer key reached the vendor in the body"
    );
    assert!(
        rec.body == body,
        "{}: the body reached the vendor changed ({} bytes sent, {} received): {:?}",
        rec.target,
        body.len(),
        rec.body.len(),
        String::from_utf8_lossy(&rec.body[..rec.body.len().min(200)])
    );
}

/// An SDK call that the SDK reports refused with `PermissionDeniedError`, 403, and `code`.
/// (The openai SDK's `e.body` is the `error` object of the reply, the anthropic SDK's the whole
/// reply.)
fn assert_sdk_refused(r: &SdkResult, code: &str) {
    assert!(!r.ok(), "the SDK call succeeded: {}", r.0);
    assert_eq!(r.0["error"], "PermissionDeniedError", "{}", r.0);
    assert_eq!(r.0["status"], 403, "{}", r.0);
    let body = &r.0["body"];
    let error = if body["error"].is_object() {
        &body["error"]
    } else {
        body
    };
    assert_eq!(error["code"], code, "{}", r.0);
    assert_eq!(error["type"], "permission_error", "{}", r.0);
}

/// An SDK call that got the vendor's answer, parsed into the SDK's types, for `model`.
fn assert_sdk_answered(r: &SdkResult, model: &str) {
    assert!(r.ok(), "the SDK call was refused: {}", r.0);
    assert_eq!(r.0["model"], model, "{}", r.0);
    assert_eq!(r.0["text"], UPSTREAM_REPLY_TEXT, "{}", r.0);
}

// ---------------------------------------------------------------------------------------------
// 1. A key for one model, through the openai SDK and on the wire.

async fn openai_sdk_with_a_key_scoped_to_one_model(plane: Plane) {
    let mut gw = Gateway::start(plane).await;
    provision(&mut gw.admin).await;
    let mini = model_key(&mut gw.admin, "mini", &["openai/gpt-4o-mini"]).await;
    gw.settle().await;

    let results = sdk_calls(
        Sdk::OpenAi,
        gw.listener(),
        "/openai/v1",
        &mini,
        &["gpt-4o-mini", "gpt-4o"],
    )
    .await;
    assert_sdk_answered(&results[0], "gpt-4o-mini");
    let refused = &results[1];
    assert_sdk_refused(refused, "model_not_allowed");
    assert_eq!(
        refused.0["code"], "model_not_allowed",
        "openai.PermissionDeniedError.code: {}",
        refused.0
    );
    let seen = gw.upstream.all();
    assert_eq!(
        seen.len(),
        1,
        "the upstream receives the allowed call only: {:?}",
        seen.iter().map(|r| &r.target).collect::<Vec<_>>()
    );
    let rec = &seen[0];
    assert_eq!((rec.method.as_str(), rec.target.as_str()), ("POST", CHAT));
    assert_vendor_got(
        rec,
        "authorization",
        &bearer(OPENAI_KEY),
        &mini,
        results[0].sent().as_bytes(),
    );
    assert_eq!(rec.json()["model"], "gpt-4o-mini");

    // On the wire: the model after a 100 KB messages array is found.
    let filler = "x".repeat(100 * 1024);
    let late_model = |m: &str| {
        format!(r#"{{"messages":[{{"role":"user","content":"{filler}"}}],"model":"{m}"}}"#)
    };
    let auth = bearer(&mini);
    let auth = [("authorization", auth.as_str())];
    let body = late_model("gpt-4o-mini");
    gw.post_expect(CHAT, &auth, body.as_bytes(), 200).await;
    assert_vendor_got(
        &gw.upstream.last(),
        "authorization",
        &bearer(OPENAI_KEY),
        &mini,
        body.as_bytes(),
    );
    let before = gw.upstream.count();
    let r = gw.post(CHAT, &auth, late_model("gpt-4o").as_bytes()).await;
    assert_model_refusal(&r);

    // A duplicated top-level `model` names no model keygate can trust: refused, never guessed.
    let r = gw
        .post(CHAT, &auth, br#"{"model":"gpt-4o-mini","model":"gpt-4o"}"#)
        .await;
    assert_model_refusal(&r);
    assert_eq!(
        gw.upstream.count(),
        before,
        "a refused request reached the vendor"
    );
    gw.access_log_line("refusing the duplicated model as model_unknown", |l| {
        l["response_code"] == 403 && l["deny_reason"] == "model_unknown" && l["path"] == CHAT
    })
    .await;
}

// ---------------------------------------------------------------------------------------------
// 2. A consumer for claude-* models, through the anthropic SDK.

async fn anthropic_sdk_with_a_consumer_scoped_to_claude_models(plane: Plane) {
    let mut gw = Gateway::start(plane).await;
    provision(&mut gw.admin).await;
    gw.admin
        .create_consumer(pb::CreateConsumerRequest {
            name: "claude-app".into(),
            scope: Some(pb::Scope {
                all: false,
                model_services: vec![],
                models: vec!["anthropic/claude-*".into()],
            }),
            ..Default::default()
        })
        .await
        .unwrap();
    // The key's scope is unset: the consumer's applies.
    let key = create_consumer_key(
        &mut gw.admin,
        pb::CreateConsumerKeyRequest {
            name: "claude-key".into(),
            consumer: "claude-app".into(),
            ..Default::default()
        },
    )
    .await;
    gw.settle().await;

    let results = sdk_calls(
        Sdk::Anthropic,
        gw.listener(),
        "/anthropic",
        &key,
        &["claude-sonnet-4-5", "gpt-4o"],
    )
    .await;
    assert_sdk_answered(&results[0], "claude-sonnet-4-5");
    assert_sdk_refused(&results[1], "model_not_allowed");
    let seen = gw.upstream.all();
    assert_eq!(
        seen.len(),
        1,
        "the upstream receives the allowed call only: {:?}",
        seen.iter().map(|r| &r.target).collect::<Vec<_>>()
    );
    let rec = &seen[0];
    assert_eq!(
        (rec.method.as_str(), rec.target.as_str()),
        ("POST", "/anthropic/v1/messages")
    );
    assert_vendor_got(
        rec,
        "x-api-key",
        ANTHROPIC_KEY,
        &key,
        results[0].sent().as_bytes(),
    );
    assert_eq!(rec.json()["model"], "claude-sonnet-4-5");

    // The same key on the openai route: the consumer has no grant on that service at all.
    let results = sdk_calls(Sdk::OpenAi, gw.listener(), "/openai/v1", &key, &["gpt-4o"]).await;
    assert_sdk_refused(&results[0], "model_service_not_allowed");
    assert_eq!(gw.upstream.count(), 1, "a refused call reached the vendor");
}

// ---------------------------------------------------------------------------------------------
// 3. The service's own model list.

async fn a_service_models_list_binds_every_key_including_scope_all(plane: Plane) {
    let mut gw = Gateway::start(plane).await;
    provision(&mut gw.admin).await;
    let unset = service_wide_key(&mut gw.admin, "unset").await;
    let all = create_consumer_key(
        &mut gw.admin,
        pb::CreateConsumerKeyRequest {
            name: "all".into(),
            consumer: "app".into(),
            scope: Some(pb::Scope {
                all: true,
                ..Default::default()
            }),
            ..Default::default()
        },
    )
    .await;
    let mini = model_key(&mut gw.admin, "mini", &["openai/gpt-4o-mini"]).await;
    let updated = gw
        .admin
        .update_model_service(pb::UpdateModelServiceRequest {
            selector: Some(pb::update_model_service_request::Selector::Name(
                "openai".into(),
            )),
            model_service: Some(pb::ModelService {
                models: vec!["gpt-4o-mini".into(), "o3-*".into()],
                ..Default::default()
            }),
            update_mask: Some(prost_types::FieldMask {
                paths: vec!["models".into()],
            }),
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(updated.models, vec!["gpt-4o-mini", "o3-*"]);
    gw.settle().await;

    for key in [&unset, &all] {
        let auth = bearer(key);
        let auth = [("authorization", auth.as_str())];
        for model in ["o3-mini", "gpt-4o-mini"] {
            let body = chat(model);
            gw.post_expect(CHAT, &auth, body.as_bytes(), 200).await;
            assert_vendor_got(
                &gw.upstream.last(),
                "authorization",
                &bearer(OPENAI_KEY),
                key,
                body.as_bytes(),
            );
        }
        let before = gw.upstream.count();
        for model in ["gpt-4o", "o1", "O3-mini"] {
            assert_model_refusal(&gw.post(CHAT, &auth, chat(model).as_bytes()).await);
        }
        // No model to check against the list: refused.
        assert_model_refusal(&gw.post(CHAT, &auth, br#"{"messages":[]}"#).await);
        assert_eq!(
            gw.upstream.count(),
            before,
            "a refused request reached the vendor"
        );
        // The list is openai's: anthropic's requests are not bound by it.
        let body = chat("claude-sonnet-4-5");
        gw.post_expect(
            "/anthropic/v1/messages",
            &[("x-api-key", key)],
            body.as_bytes(),
            200,
        )
        .await;
    }
    // A model-scoped key needs both its scope and the list.
    let auth = bearer(&mini);
    let auth = [("authorization", auth.as_str())];
    gw.post_expect(CHAT, &auth, chat("gpt-4o-mini").as_bytes(), 200)
        .await;
    assert_model_refusal(&gw.post(CHAT, &auth, chat("o3-mini").as_bytes()).await);
    // Through the SDK, for the key of scope all.
    let results = sdk_calls(
        Sdk::OpenAi,
        gw.listener(),
        "/openai/v1",
        &all,
        &["o3-mini", "gpt-4o"],
    )
    .await;
    assert_sdk_answered(&results[0], "o3-mini");
    assert_sdk_refused(&results[1], "model_not_allowed");
}

// ---------------------------------------------------------------------------------------------
// 4. Azure-style and Gemini-style paths.

async fn path_services_are_decided_from_the_path_never_the_body(plane: Plane) {
    let mut gw = Gateway::start(plane).await;
    provision(&mut gw.admin).await;
    let key = model_key(
        &mut gw.admin,
        "paths",
        &["azure/prod-mini", "gemini/gemini-2.5-*"],
    )
    .await;
    gw.settle().await;

    // Azure: the deployment in the path is the model; the body's `model` is ignored.
    let azure = "/azure/openai/deployments/prod-mini/chat/completions?api-version=2024-10-21";
    let body = chat("gpt-4o");
    gw.post_expect(azure, &[("api-key", &key)], body.as_bytes(), 200)
        .await;
    let rec = gw.upstream.last();
    assert_eq!(
        rec.target, azure,
        "path and query reach the vendor unchanged"
    );
    assert_vendor_got(&rec, "api-key", AZURE_KEY, &key, body.as_bytes());
    let before = gw.upstream.count();
    let r = gw
        .post(
            "/azure/openai/deployments/prod-4o/chat/completions?api-version=2024-10-21",
            &[("api-key", &key)],
            chat("prod-mini").as_bytes(),
        )
        .await;
    assert_model_refusal(&r);
    assert_eq!(gw.upstream.count(), before);

    // Gemini: the segment after /models/ up to ':'.
    let gemini = "/gemini/v1beta/models/gemini-2.5-pro:generateContent";
    let body = br#"{"model":"gemini-1.5-pro","contents":[{"parts":[{"text":"Say hello."}]}]}"#;
    gw.post_expect(gemini, &[("x-api-key", &key)], body, 200)
        .await;
    let rec = gw.upstream.last();
    assert_eq!(rec.target, gemini);
    assert_vendor_got(&rec, "x-goog-api-key", GEMINI_KEY, &key, body);
    let before = gw.upstream.count();
    let r = gw
        .post(
            "/gemini/v1beta/models/gemini-1.5-pro:generateContent",
            &[("x-api-key", &key)],
            br#"{"model":"gemini-2.5-pro","contents":[]}"#,
        )
        .await;
    assert_model_refusal(&r);
    // A path that names no model, for a model-scoped key: refused.
    let r = gw
        .post(
            "/azure/openai/chat/completions",
            &[("api-key", &key)],
            chat("prod-mini").as_bytes(),
        )
        .await;
    assert_model_refusal(&r);
    assert_eq!(gw.upstream.count(), before);
    gw.access_log_line("of the Gemini refusal naming the path's model", |l| {
        l["response_code"] == 403
            && l["deny_reason"] == "model_not_allowed"
            && l["model"] == "gemini-1.5-pro"
    })
    .await;
}

// ---------------------------------------------------------------------------------------------
// 5. A route with a fixed model.

async fn a_route_with_a_fixed_model_ignores_the_body(plane: Plane) {
    let mut gw = Gateway::start(plane).await;
    provision(&mut gw.admin).await;
    let mini = model_key(&mut gw.admin, "mini", &["azure/gpt-4o-mini"]).await;
    let only_4o = model_key(&mut gw.admin, "only-4o", &["azure/gpt-4o"]).await;
    gw.settle().await;

    // The route rewrites to the gpt-4o-mini deployment, which serves that model whatever the
    // body asks: the body's model is not read.
    let target = "/azure-mini/chat/completions?api-version=2024-10-21";
    let body = chat("gpt-4o");
    gw.post_expect(target, &[("api-key", &mini)], body.as_bytes(), 200)
        .await;
    let rec = gw.upstream.last();
    assert_eq!(
        rec.target,
        "/openai/deployments/gpt-4o-mini/chat/completions?api-version=2024-10-21"
    );
    assert_vendor_got(&rec, "api-key", AZURE_KEY, &mini, body.as_bytes());
    // (The access log shows the path as forwarded, after the route's rewrite; a refused
    // request is never rewritten.)
    gw.access_log_line("of the fixed-model route naming gpt-4o-mini", |l| {
        l["response_code"] == 200
            && l["path"] == "/openai/deployments/gpt-4o-mini/chat/completions"
            && l["consumer_key"] == "mini"
            && l["model"] == "gpt-4o-mini"
    })
    .await;
    // Not even read: a body that is no JSON at all is fine there.
    gw.post_expect(target, &[("api-key", &mini)], b"not json", 200)
        .await;

    let before = gw.upstream.count();
    let r = gw
        .post(target, &[("api-key", &only_4o)], body.as_bytes())
        .await;
    assert_model_refusal(&r);
    assert_eq!(gw.upstream.count(), before);
    gw.access_log_line("of the fixed-model route's refusal", |l| {
        l["response_code"] == 403
            && l["path"] == "/azure-mini/chat/completions"
            && l["consumer_key"] == "only-4o"
            && l["deny_reason"] == "model_not_allowed"
            && l["model"] == "gpt-4o-mini"
    })
    .await;
}

// ---------------------------------------------------------------------------------------------
// 6. Bodies: streamed when the decision does not need them, held whole when it does.

const FIRST: &[u8] = br#"{"model":"gpt-4o-mini","messages":[{"role":"user","content":"#;
const REST: &[u8] = br#""Say hello."}]}"#;

/// A request of a service-wide key is decided from its headers: its body streams to the vendor
/// as the client sends it. Module: every route; ext_authz: the routes that send no body with the
/// check (`/azure/`, `/gemini/`, `/azure-mini/`; `/openai/` and `/anthropic/` buffer it for the
/// check). A model-scoped key streams too where the model is not in the body (a fixed-model
/// route, a path service).
async fn a_body_the_decision_does_not_need_streams_to_the_vendor_before_the_client_finishes(
    plane: Plane,
) {
    let mut gw = Gateway::start(plane).await;
    provision(&mut gw.admin).await;
    let wide = service_wide_key(&mut gw.admin, "wide").await;
    let mini = model_key(
        &mut gw.admin,
        "mini",
        &["azure/gpt-4o-mini", "azure/prod-mini"],
    )
    .await;
    gw.settle().await;

    const AZURE_PROD: &str =
        "/azure/openai/deployments/prod-mini/chat/completions?api-version=2024-10-21";
    const GEMINI: &str = "/gemini/v1beta/models/gemini-2.5-pro:streamGenerateContent";
    const FIXED: &str = "/azure-mini/chat/completions";
    const FIXED_UPSTREAM: &str = "/openai/deployments/gpt-4o-mini/chat/completions";
    // (what the client asks for, what the vendor receives, the key)
    let mut cases = vec![
        (AZURE_PROD, AZURE_PROD, &wide),
        (GEMINI, GEMINI, &wide),
        (FIXED, FIXED_UPSTREAM, &wide),
        (FIXED, FIXED_UPSTREAM, &mini),
        (AZURE_PROD, AZURE_PROD, &mini),
    ];
    if plane == Plane::Module {
        cases.extend([
            (CHAT, CHAT, &wide),
            ("/anthropic/v1/messages", "/anthropic/v1/messages", &wide),
        ]);
    }
    for (target, upstream_target, key) in cases {
        let before = gw.upstream.arriving().len();
        let mut req = gw.chunked_post(target, &[("x-api-key", key)]).await;
        req.send(FIRST).await.unwrap();
        let upstream = &gw.upstream;
        poll_until(
            Duration::from_secs(10),
            &format!("{target}: the vendor to receive the first chunk"),
            || {
                let seen = upstream
                    .arriving()
                    .get(before)
                    .is_some_and(|a| a.target == upstream_target && a.body == FIRST && !a.ended);
                async move { seen.then_some(()) }
            },
        )
        .await;
        req.send(REST).await.unwrap();
        let r = req.finish().await.unwrap();
        assert_eq!(
            r.status,
            200,
            "{target}: {}\n{}",
            r.text(),
            gw.diagnostics()
        );
        let rec = gw.upstream.last();
        assert_eq!(rec.target, upstream_target);
        assert_eq!(
            rec.body,
            [FIRST, REST].concat(),
            "{target}: the whole body arrives"
        );
        rec.assert_never_carries(key, "consumer key");
    }
}

/// A model-scoped key's request is decided on its body's model: the vendor sees nothing of it
/// before the body is complete, then the whole body, once.
async fn a_model_scoped_body_is_held_until_complete_then_forwarded_once(plane: Plane) {
    let mut gw = Gateway::start(plane).await;
    provision(&mut gw.admin).await;
    let mini = model_key(&mut gw.admin, "mini", &["openai/gpt-4o-mini"]).await;
    gw.settle().await;
    let auth = bearer(&mini);

    let rx_before = gw.envoy_rx_bytes().await;
    let mut req = gw
        .chunked_post(CHAT, &[("authorization", auth.as_str())])
        .await;
    req.send(FIRST).await.unwrap();
    // Envoy has read the head and the first chunk and handed them to its filters...
    gw.envoy_has_handled(rx_before + req.sent).await;
    // ...and the vendor has seen nothing of the request.
    assert!(
        gw.upstream.arriving().is_empty(),
        "the vendor received part of a request whose model was not yet read: {:?}",
        gw.upstream.arriving()
    );
    let second: &[u8] = br#""Say "#;
    req.send(second).await.unwrap();
    req.send(br#"hello."}]}"#).await.unwrap();
    let r = req.finish().await.unwrap();
    assert_eq!(r.status, 200, "{}\n{}", r.text(), gw.diagnostics());
    let arrived = gw.upstream.arriving();
    assert_eq!(arrived.len(), 1, "one request upstream: {arrived:?}");
    let whole = [FIRST, second, br#"hello."}]}"#].concat();
    assert!(arrived[0].ended);
    assert_vendor_got(
        &gw.upstream.last(),
        "authorization",
        &bearer(OPENAI_KEY),
        &mini,
        &whole,
    );

    // The same, refused: its model is read at the end and the vendor never sees it.
    let mut req = gw
        .chunked_post(CHAT, &[("authorization", auth.as_str())])
        .await;
    req.send(br#"{"messages":[],"#).await.unwrap();
    req.send(br#""model":"gpt-4o"}"#).await.unwrap();
    assert_model_refusal(&req.finish().await.unwrap());
    assert_eq!(
        gw.upstream.arriving().len(),
        1,
        "a refused request reached the vendor"
    );
}

/// The most a model-scoped request's body can be is the route's buffer: 8 MiB on `/openai/`
/// (the module: `request_body_buffer_limit`; ext_authz: `with_request_body.max_request_bytes`).
/// Just under it, the model at the very end is read and the body arrives whole; just over it,
/// Envoy answers 413 and the vendor sees nothing. (About 8 MiB each way: well under a second
/// through a local Envoy.)
async fn a_body_over_the_routes_buffer_limit_gets_413_and_never_reaches_the_vendor(plane: Plane) {
    const LIMIT: usize = 8 * 1024 * 1024;
    let mut gw = Gateway::start(plane).await;
    provision(&mut gw.admin).await;
    let mini = model_key(&mut gw.admin, "mini", &["openai/gpt-4o-mini"]).await;
    gw.settle().await;
    let auth = bearer(&mini);
    let auth = [("authorization", auth.as_str())];

    let sized = |len: usize| {
        let head = r#"{"messages":[{"role":"user","content":""#;
        let tail = r#""}],"model":"gpt-4o-mini"}"#;
        let filler = "x".repeat(len - head.len() - tail.len());
        format!("{head}{filler}{tail}").into_bytes()
    };

    let under = sized(LIMIT - 1024);
    gw.post_expect(CHAT, &auth, &under, 200).await;
    assert_vendor_got(
        &gw.upstream.last(),
        "authorization",
        &bearer(OPENAI_KEY),
        &mini,
        &under,
    );

    let over = sized(LIMIT + 1024);
    let r = gw.post(CHAT, &auth, &over).await;
    assert_eq!(
        r.status,
        413,
        "a body over the route's buffer limit: {}\n{}",
        r.text(),
        gw.diagnostics()
    );
    assert_eq!(
        gw.upstream.arriving().len(),
        1,
        "the vendor received part of a request over the buffer limit"
    );

    // A service-wide key's body is never held by the module: it streams, whatever its size.
    // ext_authz's `/openai/` route sends every body with the check, so the limit is the
    // route's for every key there (envoy.yaml: leave `with_request_body` out of routes where
    // no key is model-scoped).
    let wide = service_wide_key(&mut gw.admin, "wide").await;
    gw.settle().await;
    let r = gw.post(CHAT, &[("x-api-key", &wide)], &over).await;
    match plane {
        Plane::Module => {
            assert_eq!(r.status, 200, "{}\n{}", r.text(), gw.diagnostics());
            assert_vendor_got(
                &gw.upstream.last(),
                "authorization",
                &bearer(OPENAI_KEY),
                &wide,
                &over,
            );
        }
        Plane::ExtAuthz => {
            assert_eq!(r.status, 413, "{}\n{}", r.text(), gw.diagnostics());
            assert_eq!(gw.upstream.arriving().len(), 1);
        }
    }
}

// ---------------------------------------------------------------------------------------------
// 7. The access log.

async fn the_access_log_names_the_model_read_and_the_model_refusals(plane: Plane) {
    let mut gw = Gateway::start(plane).await;
    provision(&mut gw.admin).await;
    let mini = model_key(&mut gw.admin, "mini", &["openai/gpt-4o-mini"]).await;
    let wide = service_wide_key(&mut gw.admin, "wide").await;
    gw.settle().await;
    let mini_auth = bearer(&mini);
    let mini_auth = [("authorization", mini_auth.as_str())];

    // Allowed, the model read from the body.
    gw.post_expect(CHAT, &mini_auth, chat("gpt-4o-mini").as_bytes(), 200)
        .await;
    // Refused: a model outside the scope; a body with no readable model.
    let r = gw
        .post(
            "/openai/v1/responses",
            &mini_auth,
            chat("gpt-4o").as_bytes(),
        )
        .await;
    assert_model_refusal(&r);
    let r = gw
        .post("/openai/v1/embeddings", &mini_auth, b"model=gpt-4o-mini")
        .await;
    assert_model_refusal(&r);
    // Allowed, the model read from the path (a service-wide key learns it for free).
    gw.post_expect(
        "/gemini/v1beta/models/gemini-1.5-pro:generateContent",
        &[("x-api-key", &wide)],
        b"{}",
        200,
    )
    .await;
    // Allowed, service-wide on a body route: the model did not matter and is not claimed.
    gw.post_expect(
        "/openai/v1/completions",
        &[("x-api-key", &wide)],
        chat("gpt-4o").as_bytes(),
        200,
    )
    .await;

    let l = gw
        .access_log_line("of the allowed body-model request", |l| l["path"] == CHAT)
        .await;
    assert_eq!(
        (&l["response_code"], &l["model"], &l["consumer_key"]),
        (&200.into(), &"gpt-4o-mini".into(), &"mini".into()),
        "{l}"
    );
    assert!(l["deny_reason"].is_null(), "{l}");
    let l = gw
        .access_log_line("of the refused model", |l| {
            l["path"] == "/openai/v1/responses"
        })
        .await;
    assert_eq!(
        (&l["response_code"], &l["deny_reason"], &l["model"]),
        (&403.into(), &"model_not_allowed".into(), &"gpt-4o".into()),
        "{l}"
    );
    let l = gw
        .access_log_line("of the unreadable model", |l| {
            l["path"] == "/openai/v1/embeddings"
        })
        .await;
    assert_eq!(
        (&l["response_code"], &l["deny_reason"]),
        (&403.into(), &"model_unknown".into()),
        "{l}"
    );
    assert!(l["model"].is_null(), "no model was read: {l}");
    let l = gw
        .access_log_line("of the path-model request", |l| {
            l["path"] == "/gemini/v1beta/models/gemini-1.5-pro:generateContent"
        })
        .await;
    assert_eq!(
        (&l["response_code"], &l["model"], &l["model_service"]),
        (&200.into(), &"gemini-1.5-pro".into(), &"gemini".into()),
        "{l}"
    );
    let l = gw
        .access_log_line("of the service-wide request", |l| {
            l["path"] == "/openai/v1/completions"
        })
        .await;
    assert_eq!(l["response_code"], 200, "{l}");
    assert!(
        l["model"].is_null(),
        "the body's model was not read for a service-wide key: {l}"
    );
}
