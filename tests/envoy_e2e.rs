//! End to end through a real Envoy: the shipped `envoy/envoy.yaml` (ext_authz) and
//! `envoy/module.yaml` (the keygate dynamic module), only ports and paths rewritten,
//! in front of a real `keygate serve`, with a recording HTTP upstream standing in for the model
//! vendors. Requests are plain HTTP/1.1 from a minimal client, so what is asserted is exactly
//! what a client and a vendor would see on the wire.
//!
//! Every test has its own keygate, Envoy (unique `--base-id`) and upstream, so tests run in
//! parallel. Nothing sleeps to wait for a state: everything is polled with a bound.

mod common;

use std::collections::BTreeSet;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use keygate::proto::admin::v1 as pb;

use common::admin::{
    bearer, create_consumer_key, create_model_key, create_service, disable_consumer_key,
    disable_model_key,
};
use common::envoy::{HttpResponse, Recorded, UPSTREAM_BODY};
use common::gateway::{Gateway, Plane};
use common::{Admin, poll_until};

// ---------------------------------------------------------------------------------------------
// Vendor keys the tests create (CUSTOM model keys) and expect the upstream to receive.

const OPENAI_KEY: &str = "sk-proj-e2eOpenAiPrimary0000000000000001";
const OPENAI_KEY_2: &str = "sk-proj-e2eOpenAiSecondary000000000000002";
const ANTHROPIC_KEY: &str = "sk-ant-api03-e2eAnthropic00000000000000003";
const AZURE_KEY: &str = "0123456789abcdef0123456789abcdef";

const ALL_VENDOR_VALUES: [&str; 4] = [OPENAI_KEY, OPENAI_KEY_2, ANTHROPIC_KEY, AZURE_KEY];

on_both_planes!(
    valid_key_in_every_credential_form_reaches_every_vendor_with_only_the_vendor_key,
    credential_query_parameter_is_accepted_and_removed_before_the_vendor,
    an_encoded_credential_parameter_name_is_refused_and_never_forwarded,
    routes_match_the_normalised_path_and_encoded_slashes_are_refused,
    refused_credentials_all_get_the_same_openai_style_401,
    address_scope_route_and_model_key_denials,
    disabled_consumer_key_is_refused_through_envoy_within_one_second,
    requests_rotate_over_enabled_model_keys_and_skip_a_disabled_one,
);

// ---------------------------------------------------------------------------------------------
// Admin API helpers.

fn bound_key(name: &str) -> pb::CreateConsumerKeyRequest {
    pb::CreateConsumerKeyRequest {
        name: name.into(),
        consumer: "billing-app".into(),
        ..Default::default()
    }
}

/// The three model services of the routes in envoy.yaml, one model key each, the consumer
/// `billing-app` and its key `billing-prod`. Returns the consumer key's value.
async fn provision(admin: &mut Admin) -> String {
    // OpenAI: the defaults, `authorization: Bearer {key}`.
    create_service(admin, "openai", "", "").await;
    create_service(admin, "anthropic", "x-api-key", "{key}").await;
    create_service(admin, "azure", "api-key", "{key}").await;
    create_model_key(admin, "openai-primary", OPENAI_KEY, "openai").await;
    create_model_key(admin, "anthropic-main", ANTHROPIC_KEY, "anthropic").await;
    create_model_key(admin, "azure-main", AZURE_KEY, "azure").await;
    admin
        .create_consumer(pb::CreateConsumerRequest {
            name: "billing-app".into(),
            description: "the billing service".into(),
            ..Default::default()
        })
        .await
        .unwrap();
    create_consumer_key(admin, bound_key("billing-prod")).await
}
/// The (header, value) a vendor route must deliver upstream, and the credential headers that
/// must be absent there.
fn vendor_expectation(service: &str) -> (&'static str, String) {
    match service {
        "openai" => ("authorization", bearer(OPENAI_KEY)),
        "anthropic" => ("x-api-key", ANTHROPIC_KEY.to_string()),
        "azure" => ("api-key", AZURE_KEY.to_string()),
        _ => unreachable!(),
    }
}

/// Exactly the vendor header of `service`, once; no other credential header; no consumer key.
fn assert_vendor_request(rec: &Recorded, service: &str, consumer_key: &str) {
    let (header, value) = vendor_expectation(service);
    assert_eq!(
        rec.values(header),
        vec![value],
        "{service}: the upstream must receive exactly one {header} value, the model key"
    );
    for other in ["authorization", "x-api-key", "api-key"] {
        if other != header {
            assert!(
                rec.values(other).is_empty(),
                "{service}: the upstream received a {other} header: {:?}",
                rec.values(other)
            );
        }
    }
    rec.assert_never_carries(consumer_key, "consumer key");
    // No other vendor's key either.
    for v in ALL_VENDOR_VALUES {
        if !vendor_expectation(service).1.contains(v) {
            rec.assert_never_carries(v, "another service's model key");
        }
    }
}

fn assert_error_body(r: &HttpResponse, status: u16, kind: &str, code: &str) {
    assert_eq!(r.status, status, "{}", r.text());
    assert_eq!(
        r.values("content-type"),
        vec!["application/json"],
        "denials carry exactly one content-type, application/json"
    );
    let v = r.json();
    assert_eq!(v["error"]["type"], kind, "body: {}", r.text());
    assert_eq!(v["error"]["code"], code, "body: {}", r.text());
    assert!(v["error"]["message"].is_string(), "body: {}", r.text());
}

// ---------------------------------------------------------------------------------------------
// 1. Valid keys.

async fn valid_key_in_every_credential_form_reaches_every_vendor_with_only_the_vendor_key(
    plane: Plane,
) {
    let mut gw = Gateway::start(plane).await;
    let ck = provision(&mut gw.admin).await;
    gw.settle().await;
    let auth = bearer(&ck);
    let forms: [(&str, &str); 3] = [
        ("authorization", &auth),
        ("x-api-key", &ck),
        ("api-key", &ck),
    ];

    for (form, value) in forms {
        for service in ["openai", "anthropic", "azure"] {
            let target = format!("/{service}/v1/chat/completions?stream=false");
            let before = gw.upstream.count();
            let r = gw.expect(&target, &[(form, value)], 200).await;
            assert_eq!(
                r.text(),
                UPSTREAM_BODY,
                "the client gets the vendor's answer"
            );
            assert_eq!(
                gw.upstream.count(),
                before + 1,
                "exactly one upstream request"
            );
            let rec = gw.upstream.last();
            assert_eq!(rec.method, "GET");
            assert_eq!(
                rec.target, target,
                "path and query reach the vendor unchanged"
            );
            assert_vendor_request(&rec, service, &ck);
        }
    }

    // A client that presents the consumer key in two forms at once: both are stripped.
    let r = gw
        .expect(
            "/anthropic/v1/messages",
            &[("authorization", &auth), ("api-key", &ck)],
            200,
        )
        .await;
    assert_eq!(r.text(), UPSTREAM_BODY);
    assert_vendor_request(&gw.upstream.last(), "anthropic", &ck);

    // The access log names who called which service (names from keygate's dynamic metadata)
    // and never contains a key value.
    let log = gw.envoy.access_log();
    let stdout_has_line = |log: &[serde_json::Value]| {
        log.iter().any(|l| {
            l["response_code"] == 200
                && l["consumer"] == "billing-app"
                && l["consumer_key"] == "billing-prod"
                && l["model_service"] == "azure"
                && l["model_key"] == "azure-main"
                && l["consumer_id"].as_str().is_some_and(|id| id.len() == 36)
                && l["method"] == "GET"
                && l["path"] == "/azure/v1/chat/completions"
        })
    };
    if !stdout_has_line(&log) {
        let envoy = &gw.envoy;
        poll_until(
            Duration::from_secs(15),
            "the access log line of an allowed request",
            || {
                let found = stdout_has_line(&envoy.access_log());
                async move { found.then_some(()) }
            },
        )
        .await;
    }
    let denied_logged = gw
        .envoy
        .access_log()
        .into_iter()
        .any(|l| l["response_code"] == 401 && l["deny_reason"] == "missing_credential");
    assert!(
        denied_logged,
        "the readiness probe's 401 is logged with its deny_reason:\n{}",
        gw.envoy.stdout()
    );
    let out = gw.envoy.stdout() + &gw.envoy.stderr();
    assert!(
        !out.contains(&ck),
        "Envoy's output contains the consumer key"
    );
    for v in ALL_VENDOR_VALUES {
        assert!(!out.contains(v), "Envoy's output contains a model key");
    }
}

async fn credential_query_parameter_is_accepted_and_removed_before_the_vendor(plane: Plane) {
    let mut gw = Gateway::start_with(plane, &[("credential_query_param", "key")]).await;
    let ck = provision(&mut gw.admin).await;
    gw.settle().await;

    // The key alone, then beside other parameters (which must survive).
    let r = gw
        .expect(&format!("/openai/v1/models?key={ck}"), &[], 200)
        .await;
    assert_eq!(r.text(), UPSTREAM_BODY);
    let rec = gw.upstream.last();
    assert_eq!(
        rec.target, "/openai/v1/models",
        "the credential parameter reached the vendor"
    );
    assert_vendor_request(&rec, "openai", &ck);

    gw.expect(
        &format!("/anthropic/v1/messages?limit=5&key={ck}&beta=true"),
        &[],
        200,
    )
    .await;
    let rec = gw.upstream.last();
    assert!(
        !rec.target.contains("key="),
        "the credential parameter reached the vendor: {}",
        rec.target
    );
    assert!(
        rec.target.starts_with("/anthropic/v1/messages?")
            && rec.target.contains("limit=5")
            && rec.target.contains("beta=true"),
        "other query parameters must reach the vendor: {}",
        rec.target
    );
    assert_vendor_request(&rec, "anthropic", &ck);

    // Headers keep working beside the query parameter.
    gw.expect("/azure/v1/deployments", &[("api-key", &ck)], 200)
        .await;
    assert_vendor_request(&gw.upstream.last(), "azure", &ck);

    // An unknown key in the query parameter is refused like any other.
    let before = gw.upstream.count();
    let r = gw
        .get("/openai/v1/models?key=kg-notAKeyThatExists0000000000", &[])
        .await;
    assert_error_body(&r, 401, "authentication_error", "invalid_api_key");
    assert_eq!(gw.upstream.count(), before);
}

/// SPEC §9 "Credentials accepted are credentials removed": Envoy's `query_parameters_to_remove`
/// matches the literal name, so a percent-encoded spelling of it is no credential in either data
/// plane; and a literal one beside it is the one read and removed.
async fn an_encoded_credential_parameter_name_is_refused_and_never_forwarded(plane: Plane) {
    let mut gw = Gateway::start_with(plane, &[("credential_query_param", "key")]).await;
    let ck = provision(&mut gw.admin).await;
    gw.settle().await;

    let before = gw.upstream.count();
    for target in [
        format!("/openai/v1/models?ke%79={ck}"),
        format!("/openai/v1/models?%6B%65%79={ck}"),
        format!("/openai/v1/models?a=1&k%65y={ck}"),
    ] {
        let r = gw.get(&target, &[]).await;
        assert_error_body(&r, 401, "authentication_error", "invalid_api_key");
    }
    assert_eq!(
        gw.upstream.count(),
        before,
        "a refused request reached the vendor"
    );

    // The literal name is read and cut; the encoded spelling is left as an ordinary parameter.
    gw.expect(&format!("/openai/v1/models?ke%79=other&key={ck}"), &[], 200)
        .await;
    let rec = gw.upstream.last();
    assert_eq!(rec.target, "/openai/v1/models?ke%79=other");
    assert_vendor_request(&rec, "openai", &ck);
    for r in gw.upstream.all() {
        assert!(
            !r.target.contains(&ck),
            "the consumer key reached the vendor: {}",
            r.target
        );
    }
}

/// SPEC §9 / L5: the shipped configs route on the normalised path. `/openai/../anthropic/…` is
/// the anthropic route (its scope, its vendor key, its path upstream), never the openai route
/// carrying a path that reaches anthropic on a shared upstream.
async fn routes_match_the_normalised_path_and_encoded_slashes_are_refused(plane: Plane) {
    let mut gw = Gateway::start(plane).await;
    let ck = provision(&mut gw.admin).await;
    gw.settle().await;
    let auth = bearer(&ck);
    let auth = [("authorization", auth.as_str())];

    gw.expect("/openai/../anthropic/v1/messages", &auth, 200)
        .await;
    let rec = gw.upstream.last();
    assert_eq!(rec.target, "/anthropic/v1/messages");
    assert_vendor_request(&rec, "anthropic", &ck);

    gw.expect("/openai//v1///models", &auth, 200).await;
    let rec = gw.upstream.last();
    assert_eq!(rec.target, "/openai/v1/models");
    assert_vendor_request(&rec, "openai", &ck);

    let before = gw.upstream.count();
    for target in [
        "/openai/v1%2F..%2F..%2Fanthropic/v1/messages",
        "/openai/v1%2f..%2f..%2fanthropic/v1/messages",
        "/openai/v1%5C..%5C..%5Canthropic/v1/messages",
    ] {
        let r = gw.get(target, &auth).await;
        assert_eq!(r.status, 400, "{target}: {}", r.text());
    }
    assert_eq!(
        gw.upstream.count(),
        before,
        "an encoded slash reached the vendor"
    );
}

// ---------------------------------------------------------------------------------------------
// 2. Denials.

async fn refused_credentials_all_get_the_same_openai_style_401(plane: Plane) {
    let mut gw = Gateway::start(plane).await;
    let good = provision(&mut gw.admin).await;
    let disabled = create_consumer_key(&mut gw.admin, bound_key("billing-old")).await;
    disable_consumer_key(&mut gw.admin, "billing-old").await;
    let unbound = create_consumer_key(
        &mut gw.admin,
        pb::CreateConsumerKeyRequest {
            name: "spare".into(),
            ..Default::default()
        },
    )
    .await;
    // Expires ~2 s from now (the data plane refuses it from that instant; no change is pushed).
    let expiry = SystemTime::now() + Duration::from_secs(2);
    let since_epoch = expiry.duration_since(UNIX_EPOCH).unwrap();
    let expiring = create_consumer_key(
        &mut gw.admin,
        pb::CreateConsumerKeyRequest {
            expire_time: Some(prost_types::Timestamp {
                seconds: since_epoch.as_secs() as i64,
                nanos: since_epoch.subsec_nanos() as i32,
            }),
            ..bound_key("billing-temp")
        },
    )
    .await;
    gw.settle().await;

    // The expiring key works now...
    gw.expect(
        "/openai/v1/models",
        &[("authorization", &bearer(&expiring))],
        200,
    )
    .await;
    gw.expect(
        "/openai/v1/models",
        &[("authorization", &bearer(&good))],
        200,
    )
    .await;
    // ...and is refused once it has expired.
    let expired_401 = poll_until(
        Duration::from_secs(10),
        "the expiring key to be refused",
        || {
            let gw = &gw;
            let expiring = &expiring;
            async move {
                let r = gw
                    .get("/openai/v1/models", &[("authorization", &bearer(expiring))])
                    .await;
                match r.status {
                    200 => None,
                    401 => Some(r),
                    s => panic!("unexpected HTTP {s} for the expiring key: {}", r.text()),
                }
            }
        },
    )
    .await;
    assert!(
        SystemTime::now() >= expiry,
        "refused before its expire_time"
    );
    let expired_view = gw
        .admin
        .get_consumer_key(pb::GetConsumerKeyRequest {
            selector: Some(pb::get_consumer_key_request::Selector::Name(
                "billing-temp".into(),
            )),
        })
        .await
        .unwrap()
        .into_inner();
    assert!(expired_view.expired, "GetConsumerKey shows expired: true");
    assert_eq!(
        expired_view.status,
        pb::KeyStatus::Enabled as i32,
        "an expired key keeps its status"
    );

    let upstream_before = gw.upstream.count();
    let unknown = "kg-ThisKeyWasNeverIssuedByKeygate000000000000";
    let basic = format!("Basic {good}");
    let cases: Vec<(&str, Vec<(&str, String)>)> = vec![
        ("missing", vec![]),
        ("empty bearer", vec![("authorization", "Bearer ".into())]),
        ("not a bearer", vec![("authorization", basic)]),
        (
            "unknown (authorization)",
            vec![("authorization", bearer(unknown))],
        ),
        ("unknown (x-api-key)", vec![("x-api-key", unknown.into())]),
        ("unknown (api-key)", vec![("api-key", unknown.into())]),
        ("disabled", vec![("authorization", bearer(&disabled))]),
        (
            "disabled (x-api-key)",
            vec![("x-api-key", disabled.clone())],
        ),
        ("expired", vec![("authorization", bearer(&expiring))]),
        ("unbound", vec![("authorization", bearer(&unbound))]),
        ("unbound (api-key)", vec![("api-key", unbound.clone())]),
    ];
    let mut bodies = vec![("expired (first refusal)", expired_401.body.clone())];
    assert_error_body(&expired_401, 401, "authentication_error", "invalid_api_key");
    for (case, headers) in &cases {
        let headers: Vec<(&str, &str)> = headers.iter().map(|(k, v)| (*k, v.as_str())).collect();
        for service in ["openai", "anthropic", "azure"] {
            let r = gw
                .get(&format!("/{service}/v1/chat/completions"), &headers)
                .await;
            assert_eq!(
                r.status,
                401,
                "{case} on /{service}/: {}\n{}",
                r.text(),
                gw.diagnostics()
            );
            assert_error_body(&r, 401, "authentication_error", "invalid_api_key");
            for secret in [&good, &disabled, &unbound, &expiring] {
                assert!(
                    !r.text().contains(secret.as_str()),
                    "{case}: the 401 body echoes a key"
                );
            }
            bodies.push((case, r.body));
        }
    }
    let (first_case, first) = &bodies[0];
    for (case, body) in &bodies {
        assert_eq!(
            body,
            first,
            "every 401 body is byte-identical ({case} differs from {first_case}): {:?} vs {:?}",
            String::from_utf8_lossy(body),
            String::from_utf8_lossy(first)
        );
    }
    assert_eq!(
        gw.upstream.count(),
        upstream_before,
        "the upstream received a refused request"
    );
}

async fn address_scope_route_and_model_key_denials(plane: Plane) {
    let mut gw = Gateway::start(plane).await;
    let good = provision(&mut gw.admin).await;
    let office_only = create_consumer_key(
        &mut gw.admin,
        pb::CreateConsumerKeyRequest {
            ip_allowlist: vec!["10.0.0.0/8".into(), "2001:db8::/32".into()],
            ..bound_key("office-only")
        },
    )
    .await;
    let loopback_only = create_consumer_key(
        &mut gw.admin,
        pb::CreateConsumerKeyRequest {
            ip_allowlist: vec!["127.0.0.1/32".into()],
            ..bound_key("loopback-only")
        },
    )
    .await;
    let openai_only = create_consumer_key(
        &mut gw.admin,
        pb::CreateConsumerKeyRequest {
            scope: Some(pb::Scope {
                all: false,
                model_services: vec!["openai".into()],
                ..Default::default()
            }),
            ..bound_key("openai-only")
        },
    )
    .await;
    // Azure's only model key is disabled: nothing to inject there.
    disable_model_key(&mut gw.admin, "azure-main").await;
    gw.settle().await;

    let mut allowed = 0;

    // IP allowlist: Envoy's downstream peer is 127.0.0.1.
    let r = gw
        .get(
            "/openai/v1/models",
            &[("authorization", &bearer(&office_only))],
        )
        .await;
    assert_error_body(&r, 403, "permission_error", "ip_not_allowed");
    gw.expect(
        "/openai/v1/models",
        &[("authorization", &bearer(&loopback_only))],
        200,
    )
    .await;
    allowed += 1;
    assert_vendor_request(&gw.upstream.last(), "openai", &loopback_only);
    // A spoofed x-forwarded-for does not move the address keygate checks (default: peer).
    let r = gw
        .get(
            "/openai/v1/models",
            &[
                ("authorization", &bearer(&office_only)),
                ("x-forwarded-for", "10.1.2.3"),
            ],
        )
        .await;
    assert_error_body(&r, 403, "permission_error", "ip_not_allowed");

    // Scope: a key scoped to openai.
    gw.expect("/openai/v1/models", &[("x-api-key", &openai_only)], 200)
        .await;
    allowed += 1;
    assert_vendor_request(&gw.upstream.last(), "openai", &openai_only);
    let r = gw
        .get("/anthropic/v1/messages", &[("x-api-key", &openai_only)])
        .await;
    assert_error_body(&r, 403, "permission_error", "model_service_not_allowed");

    // A route without a model_service.
    let r = gw
        .get(
            "/unconfigured/v1/models",
            &[("authorization", &bearer(&good))],
        )
        .await;
    assert_error_body(&r, 403, "permission_error", "route_not_configured");
    // A client header cannot supply the model service either.
    let r = gw
        .get(
            "/unconfigured/v1/models",
            &[
                ("authorization", &bearer(&good)),
                ("model_service", "openai"),
                ("x-model-service", "openai"),
            ],
        )
        .await;
    assert_error_body(&r, 403, "permission_error", "route_not_configured");

    // A service whose only model key is disabled.
    let r = gw
        .get("/azure/v1/chat/completions", &[("api-key", &good)])
        .await;
    assert_error_body(&r, 503, "service_unavailable", "no_model_key");

    let seen = gw.upstream.all();
    assert_eq!(
        seen.len(),
        allowed,
        "the upstream received a refused request: {seen:?}"
    );
    assert!(
        seen.iter().all(|r| r.target.starts_with("/openai/")),
        "{seen:?}"
    );
}

// ---------------------------------------------------------------------------------------------
// 3. Propagation of a disable.

async fn disabled_consumer_key_is_refused_through_envoy_within_one_second(plane: Plane) {
    let mut gw = Gateway::start(plane).await;
    let ck = provision(&mut gw.admin).await;
    gw.settle().await;
    let auth = bearer(&ck);
    gw.expect(
        "/openai/v1/chat/completions",
        &[("authorization", &auth)],
        200,
    )
    .await;

    disable_consumer_key(&mut gw.admin, "billing-prod").await;
    let returned = Instant::now();
    let mut requests = 0u32;
    let elapsed = loop {
        let r = gw
            .get("/openai/v1/chat/completions", &[("authorization", &auth)])
            .await;
        requests += 1;
        match r.status {
            401 => break returned.elapsed(),
            200 => {}
            s => panic!(
                "unexpected HTTP {s} while waiting for the disable: {}",
                r.text()
            ),
        }
        assert!(
            returned.elapsed() < Duration::from_secs(10),
            "the disabled key was still accepted 10 s after DisableConsumerKey returned"
        );
    };
    eprintln!(
        "disable→deny through Envoy ({plane:?}): {:.1} ms from DisableConsumerKey returning to the first 401 ({requests} request(s))",
        elapsed.as_secs_f64() * 1000.0
    );
    assert!(
        elapsed < Duration::from_secs(1),
        "a disabled key must be refused within 1 s; took {elapsed:?}"
    );
    // And it stays refused.
    let r = gw
        .get("/anthropic/v1/messages", &[("x-api-key", &ck)])
        .await;
    assert_error_body(&r, 401, "authentication_error", "invalid_api_key");
}

// ---------------------------------------------------------------------------------------------
// 4. Several model keys on one service.

async fn requests_rotate_over_enabled_model_keys_and_skip_a_disabled_one(plane: Plane) {
    let mut gw = Gateway::start(plane).await;
    let ck = provision(&mut gw.admin).await;
    create_model_key(&mut gw.admin, "openai-secondary", OPENAI_KEY_2, "openai").await;
    gw.settle().await;
    let auth = bearer(&ck);

    let mut seen = BTreeSet::new();
    for _ in 0..20 {
        gw.expect(
            "/openai/v1/chat/completions",
            &[("authorization", &auth)],
            200,
        )
        .await;
        let rec = gw.upstream.last();
        let values = rec.values("authorization");
        assert_eq!(
            values.len(),
            1,
            "exactly one authorization value: {values:?}"
        );
        seen.insert(values[0].clone());
    }
    let both: BTreeSet<String> = [bearer(OPENAI_KEY), bearer(OPENAI_KEY_2)].into();
    assert_eq!(
        seen, both,
        "over 20 requests the upstream sees both model keys"
    );

    disable_model_key(&mut gw.admin, "openai-primary").await;
    gw.settle().await;
    for _ in 0..20 {
        gw.expect(
            "/openai/v1/chat/completions",
            &[("authorization", &auth)],
            200,
        )
        .await;
        assert_eq!(
            gw.upstream.last().values("authorization"),
            vec![bearer(OPENAI_KEY_2)],
            "a disabled model key is no longer injected"
        );
    }
}

// ---------------------------------------------------------------------------------------------
// 5. Fail closed.

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn envoy_fails_closed_when_keygate_is_down() {
    // ext_authz only: the module is fail-static by design (its own suite shows it keeps
    // deciding from its last snapshot with the control plane down).
    let mut gw = Gateway::start(Plane::ExtAuthz).await;
    let ck = provision(&mut gw.admin).await;
    gw.settle().await;
    let auth = bearer(&ck);
    gw.expect(
        "/openai/v1/chat/completions",
        &[("authorization", &auth)],
        200,
    )
    .await;
    let before = gw.upstream.count();

    gw.keygate.kill();

    for service in ["openai", "anthropic", "azure", "unconfigured"] {
        for headers in [vec![("authorization", auth.as_str())], vec![]] {
            let r = gw
                .get(&format!("/{service}/v1/chat/completions"), &headers)
                .await;
            assert_ne!(
                r.status, 200,
                "/{service}/ was let through with keygate down"
            );
            assert_eq!(
                r.status,
                503,
                "status_on_error in envoy.yaml: 503 with keygate down, got {} {}",
                r.status,
                r.text()
            );
            assert_ne!(r.text(), UPSTREAM_BODY);
        }
    }
    assert_eq!(
        gw.upstream.count(),
        before,
        "the upstream received a request while keygate was down"
    );
}
