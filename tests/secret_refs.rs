//! SECRET_REF keys through the admin API (SPEC §4, issue 8): resolution before commit, the
//! refusals that change nothing, the `env` provider, rotation by update mask, `secret_status`
//! and `GetKeyReferences`, and no resolved value in the store, the logs or the audit rows.
//! Runs on SQLite and (KEYGATE_TEST_STORE=postgres) on PostgreSQL.

mod common;

use std::path::Path;

use keygate::proto::admin::v1 as pb;
use tonic::Code;

use common::admin::{create_consumer, create_service};
use common::secrets::{
    create_secret_consumer_key, create_secret_model_key, file_ref, get_model_key, masked,
    point_model_key,
};
use common::{Admin, Keygate, Options, all_file_bytes, check_code, contains_bytes};

const V1: &str = "sk-proj-secretVersionOne000000000000001";
const V2: &str = "sk-proj-secretVersionTwo000000000000002";
const ENV_VALUE: &str = "sk-ant-fromTheEnvironment0000000000003";
const CONSUMER_VALUE: &str = "kg-consumer-from-the-secret-store-0004";

/// `<dir>/openai-prod/{1,2}` (versioned) and `<dir>/billing-consumer` (unversioned).
fn write_secrets(dir: &Path) {
    std::fs::create_dir_all(dir.join("openai-prod")).unwrap();
    std::fs::write(dir.join("openai-prod/1"), format!("{V1}\n")).unwrap();
    std::fs::write(dir.join("openai-prod/2"), format!("{V2}\n")).unwrap();
    std::fs::write(dir.join("billing-consumer"), CONSUMER_VALUE).unwrap();
}

async fn start(secrets: &Path) -> Keygate {
    Keygate::start_with(Options {
        args: vec![
            "--secrets-dir".into(),
            secrets.display().to_string(),
            "--secret-ttl".into(),
            "1h".into(),
        ],
        env: vec![("KEYGATE_ENV_SECRET_ANTHROPIC_MAIN".into(), ENV_VALUE.into())],
        ..Default::default()
    })
    .await
}

fn model_key_sel(name: &str) -> Option<pb::get_model_key_request::Selector> {
    Some(pb::get_model_key_request::Selector::Name(name.into()))
}

async fn audit_count(admin: &mut Admin) -> usize {
    admin
        .list_audit_events(pb::ListAuditEventsRequest {
            page_size: 1000,
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner()
        .items
        .len()
}

#[tokio::test]
async fn a_model_key_on_a_file_secret_resolves_rotates_by_version_and_reports_its_reference() {
    let dir = tempfile::tempdir().unwrap();
    write_secrets(dir.path());
    let kg = start(dir.path()).await;
    let mut admin = kg.admin().await;
    create_service(&mut admin, "openai", "", "").await;

    let k = create_secret_model_key(
        &mut admin,
        "openai-main",
        file_ref("openai-prod", "1"),
        "openai",
    )
    .await
    .unwrap();
    assert_eq!(k.generation_method, pb::GenerationMethod::SecretRef as i32);
    assert_eq!(k.masked_value, masked(V1), "the mask of the resolved value");
    assert_eq!(k.secret_ref, file_ref("openai-prod", "1"));
    let status = k.secret_status.expect("secret_status on a SECRET_REF key");
    assert!(status.last_refresh_time.is_some());
    assert_eq!(status.last_error, "");

    // Rotation: point the key at version 2 with the update mask.
    let k = point_model_key(&mut admin, "openai-main", file_ref("openai-prod", "2"))
        .await
        .unwrap();
    assert_eq!(k.secret_ref, file_ref("openai-prod", "2"));
    assert_eq!(k.masked_value, masked(V2));

    // GetKeyReferences names the key's own reference beside its dependencies.
    let refs = admin
        .get_key_references(pb::GetKeyReferencesRequest {
            kind: pb::ResourceKind::ModelKey as i32,
            selector: Some(pb::get_key_references_request::Selector::Name(
                "openai-main".into(),
            )),
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(refs.secret_ref, file_ref("openai-prod", "2"));
    assert_eq!(refs.count, 1, "bound to openai: {refs:?}");

    // Audit rows name the field, never the value; the store keeps no value, not even
    // encrypted, for a SECRET_REF key.
    let events = admin
        .list_audit_events(pb::ListAuditEventsRequest {
            page_size: 100,
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner()
        .items;
    let update = events
        .iter()
        .find(|e| e.action == "UpdateModelKey")
        .unwrap();
    assert_eq!(update.changed_fields, vec!["secret_ref"]);
    let text = format!("{events:?}");
    for v in [V1, V2] {
        assert!(!text.contains(v), "an audit row carries a secret");
        assert!(!kg.logs().contains(v), "keygate's log carries a secret");
        for (path, bytes) in all_file_bytes(&kg.data_dir) {
            assert!(
                !contains_bytes(&bytes, v.as_bytes()),
                "{} holds a resolved secret in plaintext",
                path.display()
            );
        }
    }
}

#[tokio::test]
async fn unresolvable_references_are_refused_and_change_nothing() {
    let dir = tempfile::tempdir().unwrap();
    write_secrets(dir.path());
    let kg = start(dir.path()).await;
    let mut admin = kg.admin().await;
    create_service(&mut admin, "openai", "", "").await;
    create_secret_model_key(
        &mut admin,
        "openai-main",
        file_ref("openai-prod", "1"),
        "openai",
    )
    .await
    .unwrap();
    let before = audit_count(&mut admin).await;

    // A missing secret at create: FAILED_PRECONDITION naming provider, name and version.
    let e = create_secret_model_key(
        &mut admin,
        "openai-missing",
        file_ref("no-such", "7"),
        "openai",
    )
    .await
    .unwrap_err();
    assert_eq!(e.code(), Code::FailedPrecondition, "{e:?}");
    for part in ["\"file\"", "\"no-such\"", "\"7\""] {
        assert!(e.message().contains(part), "{part} in {:?}", e.message());
    }
    let e = admin
        .get_model_key(pb::GetModelKeyRequest {
            selector: model_key_sel("openai-missing"),
        })
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::NotFound, "nothing was created");

    // A missing version at update: refused, the key keeps its reference and value.
    let e = point_model_key(&mut admin, "openai-main", file_ref("openai-prod", "3"))
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::FailedPrecondition, "{e:?}");
    assert!(e.message().contains("\"3\""), "{}", e.message());
    let k = get_model_key(&mut admin, "openai-main").await;
    assert_eq!(k.secret_ref, file_ref("openai-prod", "1"));
    assert_eq!(k.masked_value, masked(V1));

    // Path traversal and malformed names: INVALID_ARGUMENT naming the field.
    for (name, version, field) in [
        ("../openai-prod", "", "secret_ref.name"),
        ("openai-prod/1", "", "secret_ref.name"),
        ("..data", "", "secret_ref.name"),
        ("openai-prod", "../1", "secret_ref.version"),
        ("openai-prod", "..", "secret_ref.version"),
    ] {
        let e =
            create_secret_model_key(&mut admin, "openai-bad", file_ref(name, version), "openai")
                .await
                .unwrap_err();
        assert_eq!(
            e.code(),
            Code::InvalidArgument,
            "{name:?} {version:?}: {e:?}"
        );
        assert!(
            e.message().contains(field),
            "{name:?} {version:?}: {}",
            e.message()
        );
    }
    // An unknown provider is a missing provider: FAILED_PRECONDITION.
    let e = create_secret_model_key(
        &mut admin,
        "openai-vault",
        Some(pb::SecretRef {
            provider: "vault".into(),
            name: "openai".into(),
            version: String::new(),
        }),
        "openai",
    )
    .await
    .unwrap_err();
    assert_eq!(e.code(), Code::FailedPrecondition, "{e:?}");
    assert!(e.message().contains("\"vault\""), "{}", e.message());

    // A CUSTOM key's value never changes: secret_ref in its mask is refused.
    admin
        .create_model_key(pb::CreateModelKeyRequest {
            name: "openai-custom".into(),
            generation_method: pb::GenerationMethod::Custom as i32,
            value: "sk-proj-customValue00000000000000000009".into(),
            ..Default::default()
        })
        .await
        .unwrap();
    let before_custom = audit_count(&mut admin).await;
    let e = point_model_key(&mut admin, "openai-custom", file_ref("openai-prod", "2"))
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::InvalidArgument, "{e:?}");
    assert!(
        e.message().contains("model_key.secret_ref"),
        "{}",
        e.message()
    );
    assert_eq!(audit_count(&mut admin).await, before_custom);

    // Nothing refused above left a trace but the one CUSTOM key created in between.
    assert_eq!(audit_count(&mut admin).await, before + 1);
    let keys = admin
        .list_model_keys(pb::ListModelKeysRequest::default())
        .await
        .unwrap()
        .into_inner()
        .items;
    let names: Vec<_> = keys.iter().map(|k| k.name.as_str()).collect();
    assert_eq!(names, vec!["openai-custom", "openai-main"]);
}

#[tokio::test]
async fn the_env_provider_reads_only_its_own_variable_and_has_no_versions() {
    let dir = tempfile::tempdir().unwrap();
    write_secrets(dir.path());
    let kg = start(dir.path()).await;
    let mut admin = kg.admin().await;
    create_service(&mut admin, "openai", "", "").await;

    let env_ref = |name: &str, version: &str| {
        Some(pb::SecretRef {
            provider: "env".into(),
            name: name.into(),
            version: version.into(),
        })
    };
    let k = create_secret_model_key(
        &mut admin,
        "anthropic-main",
        env_ref("anthropic-main", ""),
        "openai",
    )
    .await
    .unwrap();
    assert_eq!(k.masked_value, masked(ENV_VALUE));

    let e = create_secret_model_key(
        &mut admin,
        "anthropic-v1",
        env_ref("anthropic-main", "1"),
        "openai",
    )
    .await
    .unwrap_err();
    assert_eq!(e.code(), Code::InvalidArgument, "{e:?}");
    assert!(
        e.message().contains("secret_ref.version"),
        "{}",
        e.message()
    );

    // keygate's own configuration is not reachable as a secret.
    let e = create_secret_model_key(
        &mut admin,
        "stolen",
        env_ref("KEYGATE_DATA_DIR", ""),
        "openai",
    )
    .await
    .unwrap_err();
    assert_eq!(e.code(), Code::FailedPrecondition, "{e:?}");
    assert!(e.message().contains("KEYGATE_DATA_DIR"), "{}", e.message());
}

#[tokio::test]
async fn a_consumer_key_by_reference_is_hashed_masked_and_never_shown() {
    let dir = tempfile::tempdir().unwrap();
    write_secrets(dir.path());
    let kg = start(dir.path()).await;
    let mut admin = kg.admin().await;
    create_consumer(&mut admin, "billing-app").await;

    let created = create_secret_consumer_key(
        &mut admin,
        "billing-prod",
        file_ref("billing-consumer", ""),
        "billing-app",
    )
    .await
    .unwrap();
    assert_eq!(
        created.value, "",
        "the value lives in the operator's secret store; keygate never echoes it"
    );
    let k = created.key.unwrap();
    assert_eq!(k.masked_value, masked(CONSUMER_VALUE));
    assert_eq!(k.secret_ref, file_ref("billing-consumer", ""));
    assert_eq!(k.secret_status.unwrap().last_error, "");

    // A second key on the same secret would hold the same value: refused.
    let e = create_secret_consumer_key(
        &mut admin,
        "billing-copy",
        file_ref("billing-consumer", ""),
        "",
    )
    .await
    .unwrap_err();
    assert_eq!(e.code(), Code::FailedPrecondition, "{e:?}");
    assert!(!e.message().contains(CONSUMER_VALUE));

    // An AUTO key cannot be turned into a reference.
    admin
        .create_consumer_key(pb::CreateConsumerKeyRequest {
            name: "billing-auto".into(),
            generation_method: pb::GenerationMethod::Auto as i32,
            ..Default::default()
        })
        .await
        .unwrap();
    let e = admin
        .update_consumer_key(pb::UpdateConsumerKeyRequest {
            selector: Some(pb::update_consumer_key_request::Selector::Name(
                "billing-auto".into(),
            )),
            consumer_key: Some(pb::ConsumerKey {
                secret_ref: file_ref("billing-consumer", ""),
                ..Default::default()
            }),
            update_mask: Some(prost_types::FieldMask {
                paths: vec!["secret_ref".into()],
            }),
        })
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::InvalidArgument, "{e:?}");

    assert!(!kg.logs().contains(CONSUMER_VALUE));
    for (path, bytes) in all_file_bytes(&kg.data_dir) {
        assert!(
            !contains_bytes(&bytes, CONSUMER_VALUE.as_bytes()),
            "{} holds the consumer key in plaintext",
            path.display()
        );
    }
}

#[tokio::test]
async fn a_consumer_secret_changed_to_another_keys_value_stops_its_old_value_and_says_why() {
    const VALUE_A: &str = "kg-secret-consumer-a-0000000000000001";
    const VALUE_B: &str = "kg-secret-consumer-b-0000000000000002";
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("ck-a"), VALUE_A).unwrap();
    std::fs::write(dir.path().join("ck-b"), VALUE_B).unwrap();
    std::fs::write(dir.path().join("openai"), V1).unwrap();
    let kg = Keygate::start_with(Options {
        args: vec![
            "--secrets-dir".into(),
            dir.path().display().to_string(),
            "--secret-ttl".into(),
            "1s".into(),
        ],
        ..Default::default()
    })
    .await;
    let mut admin = kg.admin().await;
    create_service(&mut admin, "openai", "", "").await;
    create_secret_model_key(&mut admin, "openai-main", file_ref("openai", ""), "openai")
        .await
        .unwrap();
    create_consumer(&mut admin, "billing-app").await;
    for (name, secret) in [("key-a", "ck-a"), ("key-b", "ck-b")] {
        create_secret_consumer_key(&mut admin, name, file_ref(secret, ""), "billing-app")
            .await
            .unwrap();
    }
    common::poll_until(
        std::time::Duration::from_secs(10),
        "key-b to be live",
        || async { (check_code(kg.authz_addr, VALUE_B, "openai").await == 0).then_some(()) },
    )
    .await;

    // key-b's secret now holds key-a's value: two keys cannot share one value, and key-b's old
    // value must stop authorizing all the same.
    std::fs::write(dir.path().join("ck-b"), VALUE_A).unwrap();
    let status = common::poll_until(
        std::time::Duration::from_secs(10),
        "the collision to show on key-b",
        || {
            let mut admin = admin.clone();
            async move {
                let k = admin
                    .get_consumer_key(pb::GetConsumerKeyRequest {
                        selector: Some(pb::get_consumer_key_request::Selector::Name(
                            "key-b".into(),
                        )),
                    })
                    .await
                    .ok()?
                    .into_inner();
                let s = k.secret_status?;
                s.last_error.contains("already used").then_some(s)
            }
        },
    )
    .await;
    assert!(!status.last_error.contains(VALUE_A));
    common::poll_until(
        std::time::Duration::from_secs(10),
        "key-b's old value to stop authorizing",
        || async { (check_code(kg.authz_addr, VALUE_B, "openai").await == 16).then_some(()) },
    )
    .await;
    assert_eq!(
        check_code(kg.authz_addr, VALUE_A, "openai").await,
        0,
        "key-a is untouched"
    );
}
