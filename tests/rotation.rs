//! `RotateConsumerKey` (SPEC §8.4, issue 17) through the admin API of the real binary: AUTO and
//! CUSTOM rotation, the new value shown once, the previous value's mask and expiry on Get, an
//! overlap of "0s" ending the old value at once (checked through the ext_authz listener), a
//! second rotation ending the older previous value, SECRET_REF keys refused, errors naming
//! their fields and writing nothing, the audit row without values, and the OPERATOR role.
//! Runs on SQLite and (KEYGATE_TEST_STORE=postgres) on PostgreSQL. And through a real Envoy
//! on both data planes: the old value working for a short overlap and refused 401 from its
//! instant, a third value ending the second at once, and usage of every value on one key.
//!
//! Nothing sleeps to wait for a state: snapshots are polled with a bound.

mod common;

use std::time::Duration;

use common::admin::{create_model_key, create_service, latest_revision, snapshot_reaches};
use common::gateway::{Gateway, Plane};
use common::{Admin, Keygate, Options, check_code};
use keygate::domain::mask;
use keygate::proto::admin::v1 as pb;
use pb::GenerationMethod;
use prost::Message;
use tonic::{Code, Status};
use tonic_types::StatusExt;

const HOUR: i64 = 3600;
/// ext_authz answers: allowed, and refused as an unknown key (UNAUTHENTICATED).
const ALLOWED: i32 = 0;
const UNAUTHENTICATED: i32 = 16;

fn by_name(name: &str) -> Option<pb::rotate_consumer_key_request::Selector> {
    Some(pb::rotate_consumer_key_request::Selector::Name(name.into()))
}

fn overlap(seconds: i64) -> Option<prost_types::Duration> {
    Some(prost_types::Duration { seconds, nanos: 0 })
}

fn rotation(name: &str, overlap_s: Option<i64>, value: &str) -> pb::RotateConsumerKeyRequest {
    pb::RotateConsumerKeyRequest {
        selector: by_name(name),
        overlap: overlap_s.and_then(overlap),
        value: value.into(),
    }
}

async fn rotate(
    admin: &mut Admin,
    req: pb::RotateConsumerKeyRequest,
) -> pb::RotateConsumerKeyResponse {
    let what = format!("{req:?}");
    admin
        .rotate_consumer_key(req)
        .await
        .unwrap_or_else(|e| panic!("RotateConsumerKey {what}: {e}"))
        .into_inner()
}

async fn refused(admin: &mut Admin, req: pb::RotateConsumerKeyRequest, code: Code) -> Status {
    let what = format!("{req:?}");
    let s = admin
        .rotate_consumer_key(req)
        .await
        .err()
        .unwrap_or_else(|| panic!("RotateConsumerKey {what}: expected {code:?}, it succeeded"));
    assert_eq!(s.code(), code, "{what}: {}", s.message());
    s
}

/// INVALID_ARGUMENT with a BadRequest violation on exactly `field`, named in the message.
async fn refused_on(admin: &mut Admin, req: pb::RotateConsumerKeyRequest, field: &str) -> String {
    let s = refused(admin, req, Code::InvalidArgument).await;
    let bad = s
        .get_details_bad_request()
        .unwrap_or_else(|| panic!("no BadRequest details: {}", s.message()));
    assert!(
        bad.field_violations.iter().any(|v| v.field == field),
        "expected a violation on {field:?}: {:?}",
        bad.field_violations
    );
    assert!(s.message().contains(field), "{}", s.message());
    s.message().to_string()
}

async fn get(admin: &mut Admin, name: &str) -> pb::ConsumerKey {
    admin
        .get_consumer_key(pb::GetConsumerKeyRequest {
            selector: Some(pb::get_consumer_key_request::Selector::Name(name.into())),
        })
        .await
        .unwrap_or_else(|e| panic!("GetConsumerKey {name}: {e}"))
        .into_inner()
}

async fn create_key(
    admin: &mut Admin,
    name: &str,
    value: &str,
    consumer: &str,
) -> pb::CreateConsumerKeyResponse {
    admin
        .create_consumer_key(pb::CreateConsumerKeyRequest {
            name: name.into(),
            generation_method: if value.is_empty() {
                GenerationMethod::Auto
            } else {
                GenerationMethod::Custom
            } as i32,
            value: value.into(),
            consumer: consumer.into(),
            ..Default::default()
        })
        .await
        .unwrap_or_else(|e| panic!("CreateConsumerKey {name}: {e}"))
        .into_inner()
}

async fn audit_events(admin: &mut Admin) -> Vec<pb::AuditEvent> {
    admin
        .list_audit_events(pb::ListAuditEventsRequest {
            page_size: 1000,
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner()
        .items
}

fn seconds(t: &Option<prost_types::Timestamp>) -> (i64, i32) {
    let t = t.as_ref().expect("a timestamp");
    (t.seconds, t.nanos)
}

/// `t` plus `s` seconds.
fn plus(t: &Option<prost_types::Timestamp>, s: i64) -> (i64, i32) {
    let (sec, nanos) = seconds(t);
    (sec + s, nanos)
}

/// Waits (bounded) until keygate's snapshot holds every committed change.
async fn settle(admin: &mut Admin) {
    let revision = latest_revision(admin).await;
    snapshot_reaches(admin, revision, Duration::from_secs(10), "the snapshot").await;
}

/// A consumer `app`, a model service `openai` with a model key: what a Check needs.
async fn provision(admin: &mut Admin) {
    admin
        .create_consumer(pb::CreateConsumerRequest {
            name: "app".into(),
            ..Default::default()
        })
        .await
        .unwrap();
    create_service(admin, "openai", "", "").await;
    create_model_key(
        admin,
        "openai-main",
        "sk-vendor-rotation-0123456789",
        "openai",
    )
    .await;
}

#[tokio::test]
async fn an_auto_key_keeps_everything_but_its_value_which_is_shown_once() {
    let kg = Keygate::start().await;
    let mut admin = kg.admin().await;
    provision(&mut admin).await;
    let created = admin
        .create_consumer_key(pb::CreateConsumerKeyRequest {
            name: "k".into(),
            description: "billing, production".into(),
            consumer: "app".into(),
            scope: Some(pb::Scope {
                model_services: vec!["openai".into()],
                ..Default::default()
            }),
            ip_allowlist: vec!["10.0.0.0/8".into()],
            expire_time: Some(prost_types::Timestamp {
                seconds: 4_102_444_800,
                nanos: 0,
            }),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    let old = created.value.clone();
    let before = created.key.unwrap();

    let r = rotate(&mut admin, rotation("k", Some(HOUR), "")).await;
    let new = r.value.clone();
    assert!(
        new.starts_with("kg-") && new.len() == 46,
        "generated like at create"
    );
    assert_ne!(new, old);
    let key = r.key.clone().unwrap();
    // The same key: id, name, description, consumer, scope, allowlist, expiry, creation.
    for (what, a, b) in [
        ("id", &before.id, &key.id),
        ("name", &before.name, &key.name),
        ("description", &before.description, &key.description),
        ("consumer", &before.consumer, &key.consumer),
        ("consumer_id", &before.consumer_id, &key.consumer_id),
    ] {
        assert_eq!(a, b, "{what} kept");
    }
    assert_eq!(before.scope, key.scope);
    assert_eq!(before.ip_allowlist, key.ip_allowlist);
    assert_eq!(before.expire_time, key.expire_time);
    assert_eq!(before.create_time, key.create_time);
    assert_eq!(
        (key.status, key.generation_method),
        (before.status, before.generation_method)
    );
    // A new mask; the previous value's mask and expiry (the rotation's time + the overlap).
    assert_eq!(key.masked_value, mask(&new));
    assert_eq!(key.previous_masked_value, before.masked_value);
    assert_eq!(
        seconds(&key.previous_value_expire_time),
        plus(&key.update_time, HOUR)
    );

    // Get shows the same, and the value is nowhere but in the rotation's answer.
    let got = get(&mut admin, "k").await;
    assert_eq!(got, key);
    let listed = admin
        .list_consumer_keys(pb::ListConsumerKeysRequest::default())
        .await
        .unwrap()
        .into_inner();
    assert_eq!(listed.items, vec![key.clone()]);
    for bytes in [got.encode_to_vec(), listed.encode_to_vec()] {
        for v in [&new, &old] {
            assert!(
                !bytes.windows(v.len()).any(|w| w == v.as_bytes()),
                "a value is shown only once"
            );
        }
    }
    assert!(!format!("{r:?}").contains(&new), "Debug redacts the value");

    // Without an overlap the previous value authorizes for 24 h.
    let r = rotate(&mut admin, rotation("k", None, "")).await;
    let key = r.key.unwrap();
    assert_eq!(
        key.previous_masked_value,
        mask(&new),
        "the value just replaced"
    );
    assert_eq!(
        seconds(&key.previous_value_expire_time),
        plus(&key.update_time, 24 * HOUR)
    );
}

#[tokio::test]
async fn a_custom_key_takes_a_new_value_that_no_key_holds_or_held() {
    let kg = Keygate::start().await;
    let mut admin = kg.admin().await;
    provision(&mut admin).await;
    let (v1, v2, w) = (
        "custom-value-one-0123456789abcdef",
        "custom-value-two-0123456789abcdef",
        "other-keys-value-0123456789abcdef",
    );
    create_key(&mut admin, "c", v1, "app").await;
    create_key(&mut admin, "other", w, "app").await;
    let auto = create_key(&mut admin, "a", "", "app").await.value;

    // The new value is required, checked like at create, and must be new to this key.
    let m = refused_on(&mut admin, rotation("c", Some(HOUR), ""), "value").await;
    assert!(m.contains("CUSTOM"), "{m}");
    refused_on(&mut admin, rotation("c", Some(HOUR), "too-short"), "value").await;
    refused_on(
        &mut admin,
        rotation("c", Some(HOUR), "has a space 0123456789"),
        "value",
    )
    .await;
    let m = refused_on(&mut admin, rotation("c", Some(HOUR), v1), "value").await;
    assert!(m.contains("current and previous"), "{m}");
    // Another key's value: ALREADY_EXISTS, never saying which key holds it.
    let s = refused(
        &mut admin,
        rotation("c", Some(HOUR), w),
        Code::AlreadyExists,
    )
    .await;
    assert!(s.message().contains("value"), "{}", s.message());
    assert!(
        !s.message().contains("\"other\"") && !s.message().contains(w),
        "{}",
        s.message()
    );
    let s = refused(
        &mut admin,
        rotation("c", Some(HOUR), &auto),
        Code::AlreadyExists,
    )
    .await;
    assert!(!s.message().contains(&auto));
    // An AUTO key's new value is generated: a value in the request is refused.
    let m = refused_on(&mut admin, rotation("a", Some(HOUR), v2), "value").await;
    assert!(m.contains("AUTO"), "{m}");
    assert_eq!(
        get(&mut admin, "c").await.masked_value,
        mask(v1),
        "nothing written"
    );

    let r = rotate(&mut admin, rotation("c", Some(HOUR), v2)).await;
    assert_eq!(r.value, "", "a CUSTOM value is the operator's: not echoed");
    let key = r.key.unwrap();
    assert_eq!(
        (
            key.masked_value.as_str(),
            key.previous_masked_value.as_str()
        ),
        (mask(v2).as_str(), mask(v1).as_str())
    );
    // Its own previous value, and another key's previous value, are taken too.
    let m = refused_on(&mut admin, rotation("c", Some(HOUR), v1), "value").await;
    assert!(m.contains("previous"), "{m}");
    let s = refused(
        &mut admin,
        rotation("other", Some(HOUR), v1),
        Code::AlreadyExists,
    )
    .await;
    assert!(!s.message().contains(" c ") && !s.message().contains("\"c\""));
    let s = admin
        .create_consumer_key(pb::CreateConsumerKeyRequest {
            name: "reuse".into(),
            generation_method: GenerationMethod::Custom as i32,
            value: v1.into(),
            ..Default::default()
        })
        .await
        .unwrap_err();
    assert_eq!(s.code(), Code::InvalidArgument, "{}", s.message());
    assert!(s.message().contains("already in use"), "{}", s.message());
}

#[tokio::test]
async fn overlap_zero_ends_the_old_value_at_once_and_a_second_rotation_ends_the_older_one() {
    let kg = Keygate::start().await;
    let mut admin = kg.admin().await;
    provision(&mut admin).await;
    let v0 = create_key(&mut admin, "k", "", "app").await.value;
    settle(&mut admin).await;
    assert_eq!(check_code(kg.authz_addr, &v0, "openai").await, ALLOWED);

    // "0s": no previous value at all, and the old value is refused with the next snapshot.
    let r = admin
        .rotate_consumer_key(pb::RotateConsumerKeyRequest {
            selector: by_name("k"),
            overlap: Some(prost_types::Duration {
                seconds: 0,
                nanos: 0,
            }),
            value: String::new(),
        })
        .await
        .unwrap()
        .into_inner();
    let v1 = r.value;
    let key = r.key.unwrap();
    assert_eq!(key.previous_masked_value, "");
    assert_eq!(key.previous_value_expire_time, None);
    assert_eq!(get(&mut admin, "k").await, key);
    settle(&mut admin).await;
    assert_eq!(
        check_code(kg.authz_addr, &v0, "openai").await,
        UNAUTHENTICATED
    );
    assert_eq!(check_code(kg.authz_addr, &v1, "openai").await, ALLOWED);

    // Two rotations with an hour's overlap: only the value the second replaced is previous.
    let v2 = rotate(&mut admin, rotation("k", Some(HOUR), ""))
        .await
        .value;
    settle(&mut admin).await;
    for v in [&v1, &v2] {
        assert_eq!(check_code(kg.authz_addr, v, "openai").await, ALLOWED);
    }
    let r = rotate(&mut admin, rotation("k", Some(HOUR), "")).await;
    let v3 = r.value;
    let key = r.key.unwrap();
    assert_eq!(key.previous_masked_value, mask(&v2));
    assert_eq!(
        seconds(&key.previous_value_expire_time),
        plus(&key.update_time, HOUR)
    );
    settle(&mut admin).await;
    assert_eq!(
        check_code(kg.authz_addr, &v1, "openai").await,
        UNAUTHENTICATED
    );
    for v in [&v2, &v3] {
        assert_eq!(check_code(kg.authz_addr, v, "openai").await, ALLOWED);
    }
    // One key throughout.
    let status = admin
        .get_snapshot_status(pb::GetSnapshotStatusRequest {})
        .await
        .unwrap()
        .into_inner();
    assert_eq!(status.consumer_keys, 1);
}

#[tokio::test]
async fn bad_requests_name_their_field_and_write_nothing() {
    let kg = Keygate::start().await;
    let mut admin = kg.admin().await;
    provision(&mut admin).await;
    let created = create_key(&mut admin, "k", "", "app").await;
    let id = created.key.unwrap().id;
    let events = audit_events(&mut admin).await.len();

    let m = refused_on(&mut admin, rotation("k", Some(-1), ""), "overlap").await;
    assert!(m.contains("negative"), "{m}");
    let m = refused_on(
        &mut admin,
        rotation("k", Some(30 * 24 * HOUR + 1), ""),
        "overlap",
    )
    .await;
    assert!(m.contains("30 days"), "{m}");
    let bad_duration = pb::RotateConsumerKeyRequest {
        selector: by_name("k"),
        overlap: Some(prost_types::Duration {
            seconds: 1,
            nanos: -5,
        }),
        value: String::new(),
    };
    refused_on(&mut admin, bad_duration, "overlap").await;
    let no_selector = pb::RotateConsumerKeyRequest {
        selector: None,
        ..rotation("k", Some(HOUR), "")
    };
    refused_on(&mut admin, no_selector, "selector").await;
    refused_on(&mut admin, rotation("", Some(HOUR), ""), "name").await;
    let s = refused(&mut admin, rotation("nope", Some(HOUR), ""), Code::NotFound).await;
    assert!(s.message().contains("nope"), "{}", s.message());

    let untouched = get(&mut admin, "k").await;
    assert_eq!(untouched.previous_masked_value, "");
    assert_eq!(
        audit_events(&mut admin).await.len(),
        events,
        "no audit row for a refusal"
    );

    // The bounds themselves are accepted; so is selecting by id.
    rotate(&mut admin, rotation("k", Some(30 * 24 * HOUR), "")).await;
    let by_id = pb::RotateConsumerKeyRequest {
        selector: Some(pb::rotate_consumer_key_request::Selector::Id(id.clone())),
        ..rotation("", Some(HOUR), "")
    };
    assert_eq!(rotate(&mut admin, by_id).await.key.unwrap().id, id);
}

#[tokio::test]
async fn a_secret_ref_key_rotates_through_its_secret_and_is_refused_here() {
    let value = "secret-ref-consumer-value-0123456789";
    let kg = Keygate::start_with(Options {
        env: vec![("KEYGATE_ENV_SECRET_CK_SECRET".into(), value.into())],
        ..Default::default()
    })
    .await;
    let mut admin = kg.admin().await;
    admin
        .create_consumer_key(pb::CreateConsumerKeyRequest {
            name: "by-ref".into(),
            generation_method: GenerationMethod::SecretRef as i32,
            secret_ref: Some(pb::SecretRef {
                provider: "env".into(),
                name: "ck-secret".into(),
                version: String::new(),
            }),
            ..Default::default()
        })
        .await
        .unwrap();
    let events = audit_events(&mut admin).await.len();
    for value in ["", "a-new-value-for-the-ref-key-0123"] {
        let s = refused(
            &mut admin,
            rotation("by-ref", Some(HOUR), value),
            Code::FailedPrecondition,
        )
        .await;
        assert!(s.message().contains("SECRET_REF"), "{}", s.message());
        assert!(s.message().contains("secret"), "{}", s.message());
        assert!(s.message().contains("by-ref"), "{}", s.message());
    }
    assert_eq!(audit_events(&mut admin).await.len(), events);
    assert_eq!(get(&mut admin, "by-ref").await.masked_value, mask(value));
}

#[tokio::test]
async fn rotation_is_audited_without_values_and_needs_the_operator_role() {
    let kg = Keygate::start().await;
    let mut admin = kg.admin().await;
    provision(&mut admin).await;
    let old = create_key(&mut admin, "k", "", "app").await.value;
    let custom_old = "custom-audited-value-0123456789ab";
    let custom_new = "custom-audited-value-new-456789ab";
    create_key(&mut admin, "c", custom_old, "app").await;

    // VIEWER may not rotate: PERMISSION_DENIED naming the role needed; nothing written.
    let token = |role: pb::admin_token::Role, name: &str| pb::CreateAdminTokenRequest {
        name: name.into(),
        role: role as i32,
        expire_time: None,
    };
    let viewer = admin
        .create_admin_token(token(pb::admin_token::Role::Viewer, "vera"))
        .await
        .unwrap()
        .into_inner()
        .value;
    let operator = admin
        .create_admin_token(token(pb::admin_token::Role::Operator, "otto"))
        .await
        .unwrap()
        .into_inner()
        .value;
    let mut as_viewer = kg.admin_with_token(Some(viewer)).await;
    let s = refused(
        &mut as_viewer,
        rotation("k", Some(HOUR), ""),
        Code::PermissionDenied,
    )
    .await;
    assert!(s.message().contains("OPERATOR"), "{}", s.message());
    assert_eq!(get(&mut admin, "k").await.previous_masked_value, "");

    // OPERATOR may.
    let mut as_operator = kg.admin_with_token(Some(operator)).await;
    let new = rotate(&mut as_operator, rotation("k", Some(HOUR), ""))
        .await
        .value;
    rotate(&mut as_operator, rotation("c", Some(0), custom_new)).await;

    let events = audit_events(&mut admin).await;
    let rotations: Vec<&pb::AuditEvent> = events
        .iter()
        .filter(|e| e.action == "RotateConsumerKey")
        .collect();
    assert_eq!(rotations.len(), 2, "{events:?}");
    let (c, k) = (rotations[0], rotations[1]);
    assert_eq!(
        (c.resource_name.as_str(), k.resource_name.as_str()),
        ("c", "k")
    );
    for e in [c, k] {
        assert_eq!(e.actor, "otto");
        assert_eq!(e.kind, pb::ResourceKind::ConsumerKey as i32);
    }
    assert_eq!(k.changed_fields, ["value", "previous_value_expire_time"]);
    assert_eq!(
        c.changed_fields,
        ["value"],
        "no overlap and none before: no previous value"
    );
    let bytes = pb::ListAuditEventsResponse {
        items: events.clone(),
        next_page_token: String::new(),
    }
    .encode_to_vec();
    let logs = kg.logs();
    for v in [old.as_str(), new.as_str(), custom_old, custom_new] {
        assert!(
            !bytes.windows(v.len()).any(|w| w == v.as_bytes()),
            "a value in the audit trail"
        );
        assert!(!logs.contains(v), "a value in the logs");
    }
    assert!(logs.contains("RotateConsumerKey"), "the mutation is logged");
}

// ------------------------------------------------------------- through a real Envoy

on_both_planes!(through_envoy_the_old_value_works_for_the_overlap_and_usage_stays_on_one_key);

/// Reports every 200 ms, so usage arrives without waiting a second per step.
const METERED: &[(&str, &str)] = &[("usage_report_interval", "200ms")];
/// The short overlap: long enough to see the old value work after the snapshot moved.
const SHORT_OVERLAP_S: i64 = 5;
const CHAT: &str = "/openai/v1/chat/completions";
const CHAT_BODY: &[u8] = br#"{"model":"gpt-4o-mini","messages":[{"role":"user","content":"hi"}]}"#;

fn timestamp_of(t: &Option<prost_types::Timestamp>) -> std::time::SystemTime {
    std::time::SystemTime::try_from(t.expect("a timestamp")).unwrap()
}

async fn through_envoy_the_old_value_works_for_the_overlap_and_usage_stays_on_one_key(
    plane: Plane,
) {
    use common::admin::{bearer, create_consumer_key};
    use std::time::{Instant, SystemTime};

    let mut gw = Gateway::start_with(plane, METERED).await;
    provision(&mut gw.admin).await;
    let v0 = create_consumer_key(
        &mut gw.admin,
        pb::CreateConsumerKeyRequest {
            name: "k".into(),
            consumer: "app".into(),
            ..Default::default()
        },
    )
    .await;
    gw.settle().await;
    // Every answer the gateway let through is counted here, whichever value made it.
    let allowed = std::cell::Cell::new(0u64);
    let unknown_401 = gw
        .post_expect(
            CHAT,
            &[("authorization", &bearer("kg-never-issued-000000000000000"))],
            CHAT_BODY,
            401,
        )
        .await
        .body;
    let post = async |gw: &Gateway, value: &str, status: u16| {
        let r = gw
            .post_expect(
                CHAT,
                &[("authorization", &bearer(value))],
                CHAT_BODY,
                status,
            )
            .await;
        if status == 200 {
            allowed.set(allowed.get() + 1);
        } else {
            assert_eq!(r.body, unknown_401, "refused exactly like an unknown key");
        }
    };
    post(&gw, &v0, 200).await;

    // A short overlap: the new value works at once, the old one until its instant.
    let r = rotate(&mut gw.admin, rotation("k", Some(SHORT_OVERLAP_S), "")).await;
    let v1 = r.value;
    let key = r.key.unwrap();
    let until = timestamp_of(&key.previous_value_expire_time);
    gw.settle().await;
    post(&gw, &v1, 200).await;
    assert!(
        SystemTime::now() < until,
        "the snapshot took the whole overlap to arrive: {}",
        gw.diagnostics()
    );
    post(&gw, &v0, 200).await;
    // Then (bounded) refused with 401 from the instant on, never before, never after again.
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let sent = SystemTime::now();
        let r = gw
            .post(CHAT, &[("authorization", &bearer(&v0))], CHAT_BODY)
            .await;
        match r.status {
            200 => {
                assert!(sent < until, "the old value worked after its instant");
                allowed.set(allowed.get() + 1);
            }
            401 => {
                assert!(SystemTime::now() >= until, "the old value stopped early");
                assert_eq!(r.body, unknown_401, "refused exactly like an unknown key");
                break;
            }
            s => panic!("unexpected {s}: {}\n{}", r.text(), gw.diagnostics()),
        }
        assert!(
            Instant::now() < deadline,
            "the old value still works after 30 s"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    post(&gw, &v0, 401).await;
    post(&gw, &v1, 200).await;

    // A long overlap, then a third value: the second value stops at once (once the snapshot
    // has it), the third and the one before it work.
    let v2 = rotate(&mut gw.admin, rotation("k", Some(HOUR), ""))
        .await
        .value;
    gw.settle().await;
    post(&gw, &v1, 200).await;
    post(&gw, &v2, 200).await;
    let v3 = rotate(&mut gw.admin, rotation("k", Some(HOUR), ""))
        .await
        .value;
    gw.settle().await;
    post(&gw, &v1, 401).await;
    post(&gw, &v2, 200).await;
    post(&gw, &v3, 200).await;

    // Usage of every value lands on the one key: one row, every allowed request, the tokens
    // the vendor reported for all of them.
    let allowed = allowed.get();
    assert_eq!(gw.upstream.count() as u64, allowed);
    let sent: (u64, u64) = gw
        .upstream
        .all()
        .iter()
        .filter_map(|r| r.usage)
        .fold((0, 0), |(i, o), u| (i + u.input, o + u.output));
    let admin = gw.admin.clone();
    let rows = common::poll_until(
        Duration::from_secs(30),
        &format!("usage to reach {allowed} requests"),
        || {
            let mut admin = admin.clone();
            async move {
                let rows = admin
                    .get_usage(pb::GetUsageRequest {
                        group_by: vec!["consumer_key".into()],
                        ..Default::default()
                    })
                    .await
                    .expect("GetUsage")
                    .into_inner()
                    .rows;
                (rows.iter().map(|r| r.requests).sum::<u64>() >= allowed).then_some(rows)
            }
        },
    )
    .await;
    assert_eq!(rows.len(), 1, "one key: {rows:?}");
    let row = &rows[0];
    assert_eq!(
        (row.consumer_key_id.as_str(), row.consumer_key.as_str()),
        (key.id.as_str(), "k")
    );
    assert_eq!(row.requests, allowed, "{row:?}");
    assert_eq!((row.input_tokens, row.output_tokens), sent, "{row:?}");
}
