//! The admin gRPC API `keygate.admin.v1.KeyAdmin` against the real binary: the lifecycle and
//! field rules of SPEC §1 with their gRPC codes, secrecy of key values (API, disk, logs),
//! persistence across a restart, admin-token authentication, paging, filters, references
//! and the audit trail (SPEC §3, Appendix A).

mod common;

use std::collections::BTreeSet;
use std::time::{Duration, SystemTime};

use common::{Admin, Keygate, Options, all_file_bytes, contains_bytes, poll_until};
use keygate::proto::admin::v1 as pb;
use pb::{GenerationMethod, KeyStatus, ResourceKind};
use prost::Message;
use tonic::{Code, Status};
use tonic_types::StatusExt;

// ---------------------------------------------------------------------------- helpers

/// `Some(<module>::Selector::Name(..))` for a request's `oneof selector`.
macro_rules! by_name {
    ($module:ident, $name:expr) => {
        Some(pb::$module::Selector::Name(String::from($name)))
    };
}

/// `Some(<module>::Selector::Id(..))` for a request's `oneof selector`.
macro_rules! by_id {
    ($module:ident, $id:expr) => {
        Some(pb::$module::Selector::Id(String::from($id)))
    };
}

/// The refusal of a call that must fail.
fn refused<T>(r: Result<tonic::Response<T>, Status>, what: &str) -> Status {
    match r {
        Ok(_) => panic!("{what}: expected a refusal, but the call succeeded"),
        Err(s) => s,
    }
}

fn assert_code(s: &Status, code: Code, what: &str) {
    assert_eq!(
        s.code(),
        code,
        "{what}: expected {code:?}, got {:?}: {}",
        s.code(),
        s.message()
    );
}

/// INVALID_ARGUMENT carrying a google.rpc.BadRequest violation for `field` (exactly, as an
/// element `field[i]` / `field.sub`, or nested as `<resource>.field`), with the field named in the
/// message too. Returns the violation's description.
fn assert_field_violation(s: &Status, field: &str, what: &str) -> String {
    assert_code(s, Code::InvalidArgument, what);
    let bad = s.get_details_bad_request().unwrap_or_else(|| {
        panic!(
            "{what}: INVALID_ARGUMENT without BadRequest details: {}",
            s.message()
        )
    });
    let hit = bad.field_violations.iter().find(|v| {
        v.field == field
            || v.field.starts_with(&format!("{field}["))
            || v.field.starts_with(&format!("{field}."))
            || v.field.ends_with(&format!(".{field}"))
    });
    let Some(v) = hit else {
        panic!(
            "{what}: no field violation for {field:?}; got {:?}",
            bad.field_violations
                .iter()
                .map(|v| (&v.field, &v.description))
                .collect::<Vec<_>>()
        );
    };
    assert!(
        !v.description.is_empty(),
        "{what}: violation for {field:?} has no description"
    );
    assert!(
        s.message().contains(field),
        "{what}: the message should name the field {field:?}: {}",
        s.message()
    );
    v.description.clone()
}

/// The message names `kind` and `name` together, e.g. `model key "mk-1"`.
fn assert_names(msg: &str, kind: &str, name: &str) {
    assert!(
        msg.contains(&format!("{kind} \"{name}\"")) || msg.contains(&format!("{kind} {name}")),
        "message should name {kind} {name:?}: {msg}"
    );
}

async fn create_consumer(admin: &mut Admin, name: &str) -> pb::Consumer {
    admin
        .create_consumer(pb::CreateConsumerRequest {
            name: name.into(),
            ..Default::default()
        })
        .await
        .unwrap_or_else(|e| panic!("create consumer {name}: {e:?}"))
        .into_inner()
}

async fn create_service(admin: &mut Admin, name: &str) -> pb::ModelService {
    admin
        .create_model_service(pb::CreateModelServiceRequest {
            name: name.into(),
            provider: "openai".into(),
            ..Default::default()
        })
        .await
        .unwrap_or_else(|e| panic!("create model service {name}: {e:?}"))
        .into_inner()
}

/// An AUTO consumer key, bound to `consumer` unless it is empty.
async fn create_auto_key(
    admin: &mut Admin,
    name: &str,
    consumer: &str,
) -> pb::CreateConsumerKeyResponse {
    admin
        .create_consumer_key(pb::CreateConsumerKeyRequest {
            name: name.into(),
            generation_method: GenerationMethod::Auto as i32,
            consumer: consumer.into(),
            ..Default::default()
        })
        .await
        .unwrap_or_else(|e| panic!("create consumer key {name}: {e:?}"))
        .into_inner()
}

async fn create_custom_key(
    admin: &mut Admin,
    name: &str,
    value: &str,
    consumer: &str,
) -> pb::CreateConsumerKeyResponse {
    admin
        .create_consumer_key(pb::CreateConsumerKeyRequest {
            name: name.into(),
            generation_method: GenerationMethod::Custom as i32,
            value: value.into(),
            consumer: consumer.into(),
            ..Default::default()
        })
        .await
        .unwrap_or_else(|e| panic!("create consumer key {name}: {e:?}"))
        .into_inner()
}

async fn create_model_key(
    admin: &mut Admin,
    name: &str,
    value: &str,
    services: &[&str],
) -> pb::ModelKey {
    admin
        .create_model_key(pb::CreateModelKeyRequest {
            name: name.into(),
            generation_method: GenerationMethod::Custom as i32,
            value: value.into(),
            model_services: services.iter().map(|s| s.to_string()).collect(),
            ..Default::default()
        })
        .await
        .unwrap_or_else(|e| panic!("create model key {name}: {e:?}"))
        .into_inner()
}

async fn get_consumer_key(admin: &mut Admin, name: &str) -> Result<pb::ConsumerKey, Status> {
    admin
        .get_consumer_key(pb::GetConsumerKeyRequest {
            selector: by_name!(get_consumer_key_request, name),
        })
        .await
        .map(|r| r.into_inner())
}

async fn get_model_key(admin: &mut Admin, name: &str) -> Result<pb::ModelKey, Status> {
    admin
        .get_model_key(pb::GetModelKeyRequest {
            selector: by_name!(get_model_key_request, name),
        })
        .await
        .map(|r| r.into_inner())
}

async fn get_consumer(admin: &mut Admin, name: &str) -> Result<pb::Consumer, Status> {
    admin
        .get_consumer(pb::GetConsumerRequest {
            selector: by_name!(get_consumer_request, name),
        })
        .await
        .map(|r| r.into_inner())
}

async fn get_service(admin: &mut Admin, name: &str) -> Result<pb::ModelService, Status> {
    admin
        .get_model_service(pb::GetModelServiceRequest {
            selector: by_name!(get_model_service_request, name),
        })
        .await
        .map(|r| r.into_inner())
}

async fn disable_consumer_key(admin: &mut Admin, name: &str) -> Result<pb::ConsumerKey, Status> {
    admin
        .disable_consumer_key(pb::DisableConsumerKeyRequest {
            selector: by_name!(disable_consumer_key_request, name),
        })
        .await
        .map(|r| r.into_inner())
}

async fn enable_consumer_key(admin: &mut Admin, name: &str) -> Result<pb::ConsumerKey, Status> {
    admin
        .enable_consumer_key(pb::EnableConsumerKeyRequest {
            selector: by_name!(enable_consumer_key_request, name),
        })
        .await
        .map(|r| r.into_inner())
}

async fn disable_model_key(admin: &mut Admin, name: &str) -> Result<pb::ModelKey, Status> {
    admin
        .disable_model_key(pb::DisableModelKeyRequest {
            selector: by_name!(disable_model_key_request, name),
        })
        .await
        .map(|r| r.into_inner())
}

async fn enable_model_key(admin: &mut Admin, name: &str) -> Result<pb::ModelKey, Status> {
    admin
        .enable_model_key(pb::EnableModelKeyRequest {
            selector: by_name!(enable_model_key_request, name),
        })
        .await
        .map(|r| r.into_inner())
}

async fn delete_consumer_key(admin: &mut Admin, name: &str) -> Result<(), Status> {
    admin
        .delete_consumer_key(pb::DeleteConsumerKeyRequest {
            selector: by_name!(delete_consumer_key_request, name),
        })
        .await
        .map(|_| ())
}

async fn delete_model_key(admin: &mut Admin, name: &str) -> Result<(), Status> {
    admin
        .delete_model_key(pb::DeleteModelKeyRequest {
            selector: by_name!(delete_model_key_request, name),
        })
        .await
        .map(|_| ())
}

async fn delete_consumer(admin: &mut Admin, name: &str) -> Result<(), Status> {
    admin
        .delete_consumer(pb::DeleteConsumerRequest {
            selector: by_name!(delete_consumer_request, name),
        })
        .await
        .map(|_| ())
}

async fn delete_service(admin: &mut Admin, name: &str) -> Result<(), Status> {
    admin
        .delete_model_service(pb::DeleteModelServiceRequest {
            selector: by_name!(delete_model_service_request, name),
        })
        .await
        .map(|_| ())
}

async fn bind_consumer_key(
    admin: &mut Admin,
    key: &str,
    consumer: &str,
) -> Result<pb::ConsumerKey, Status> {
    admin
        .bind_consumer_key(pb::BindConsumerKeyRequest {
            key: key.into(),
            consumer: consumer.into(),
        })
        .await
        .map(|r| r.into_inner())
}

async fn unbind_consumer_key(admin: &mut Admin, key: &str) -> Result<pb::ConsumerKey, Status> {
    admin
        .unbind_consumer_key(pb::UnbindConsumerKeyRequest { key: key.into() })
        .await
        .map(|r| r.into_inner())
}

async fn unbind_model_key(
    admin: &mut Admin,
    key: &str,
    service: &str,
) -> Result<pb::ModelKey, Status> {
    admin
        .unbind_model_key(pb::UnbindModelKeyRequest {
            key: key.into(),
            model_service: service.into(),
        })
        .await
        .map(|r| r.into_inner())
}

async fn list_consumer_key_names(
    admin: &mut Admin,
    consumer: &str,
    status: KeyStatus,
) -> BTreeSet<String> {
    admin
        .list_consumer_keys(pb::ListConsumerKeysRequest {
            consumer: consumer.into(),
            status: status as i32,
            ..Default::default()
        })
        .await
        .unwrap_or_else(|e| panic!("list consumer keys: {e:?}"))
        .into_inner()
        .items
        .into_iter()
        .map(|k| k.name)
        .collect()
}

async fn references(
    admin: &mut Admin,
    kind: ResourceKind,
    name: &str,
) -> pb::GetKeyReferencesResponse {
    admin
        .get_key_references(pb::GetKeyReferencesRequest {
            kind: kind as i32,
            selector: by_name!(get_key_references_request, name),
        })
        .await
        .unwrap_or_else(|e| panic!("references of {name}: {e:?}"))
        .into_inner()
}

async fn snapshot_status(admin: &mut Admin) -> pb::GetSnapshotStatusResponse {
    admin
        .get_snapshot_status(pb::GetSnapshotStatusRequest {})
        .await
        .expect("GetSnapshotStatus")
        .into_inner()
}

/// The newest audit event's revision: the store revision of the last mutation.
async fn latest_revision(admin: &mut Admin) -> u64 {
    admin
        .list_audit_events(pb::ListAuditEventsRequest {
            page_size: 1,
            ..Default::default()
        })
        .await
        .expect("ListAuditEvents")
        .into_inner()
        .items
        .first()
        .expect("at least one audit event")
        .revision
}

/// Waits (bounded) until the live snapshot includes every committed mutation.
async fn settled_snapshot(admin: &Admin) -> pb::GetSnapshotStatusResponse {
    let mut a = admin.clone();
    let revision = latest_revision(&mut a).await;
    poll_until(Duration::from_secs(10), "the snapshot to catch up", || {
        let mut a = a.clone();
        async move {
            let s = snapshot_status(&mut a).await;
            (s.version >= revision).then_some(s)
        }
    })
    .await
}

fn ts(t: SystemTime) -> prost_types::Timestamp {
    prost_types::Timestamp::from(t)
}

fn mask_of(v: &str) -> String {
    format!("{}***{}", &v[..5], &v[v.len() - 4..])
}

fn mask(paths: &[&str]) -> Option<prost_types::FieldMask> {
    Some(prost_types::FieldMask {
        paths: paths.iter().map(|p| p.to_string()).collect(),
    })
}

// ---------------------------------------------------------------------------- lifecycle

#[tokio::test]
async fn enabling_an_enabled_key_and_disabling_a_disabled_key_are_failed_preconditions() {
    let kg = Keygate::start().await;
    let mut admin = kg.admin().await;
    create_service(&mut admin, "svc").await;
    create_auto_key(&mut admin, "ck", "").await;
    create_model_key(&mut admin, "mk", "sk-model-key-value-0123456789", &[]).await;

    // New keys are ENABLED.
    assert_eq!(
        get_consumer_key(&mut admin, "ck").await.unwrap().status,
        KeyStatus::Enabled as i32
    );
    assert_eq!(
        get_model_key(&mut admin, "mk").await.unwrap().status,
        KeyStatus::Enabled as i32
    );

    let s = refused(
        admin
            .enable_consumer_key(pb::EnableConsumerKeyRequest {
                selector: by_name!(enable_consumer_key_request, "ck"),
            })
            .await,
        "enable an enabled consumer key",
    );
    assert_code(
        &s,
        Code::FailedPrecondition,
        "enable an enabled consumer key",
    );
    assert!(
        s.message().contains("ck") && s.message().contains("enabled"),
        "{}",
        s.message()
    );

    let s = refused(
        admin
            .enable_model_key(pb::EnableModelKeyRequest {
                selector: by_name!(enable_model_key_request, "mk"),
            })
            .await,
        "enable an enabled model key",
    );
    assert_code(&s, Code::FailedPrecondition, "enable an enabled model key");
    assert!(
        s.message().contains("mk") && s.message().contains("enabled"),
        "{}",
        s.message()
    );

    let k = disable_consumer_key(&mut admin, "ck").await.unwrap();
    assert_eq!(k.status, KeyStatus::Disabled as i32);
    let m = disable_model_key(&mut admin, "mk").await.unwrap();
    assert_eq!(m.status, KeyStatus::Disabled as i32);

    let s = refused(
        admin
            .disable_consumer_key(pb::DisableConsumerKeyRequest {
                selector: by_name!(disable_consumer_key_request, "ck"),
            })
            .await,
        "disable a disabled consumer key",
    );
    assert_code(
        &s,
        Code::FailedPrecondition,
        "disable a disabled consumer key",
    );
    assert!(s.message().contains("disabled"), "{}", s.message());

    let s = refused(
        admin
            .disable_model_key(pb::DisableModelKeyRequest {
                selector: by_name!(disable_model_key_request, "mk"),
            })
            .await,
        "disable a disabled model key",
    );
    assert_code(&s, Code::FailedPrecondition, "disable a disabled model key");
    assert!(s.message().contains("disabled"), "{}", s.message());

    // And back again: the transitions themselves work and are persisted.
    assert_eq!(
        enable_consumer_key(&mut admin, "ck").await.unwrap().status,
        KeyStatus::Enabled as i32
    );
    assert_eq!(
        enable_model_key(&mut admin, "mk").await.unwrap().status,
        KeyStatus::Enabled as i32
    );
    assert_eq!(
        get_consumer_key(&mut admin, "ck").await.unwrap().status,
        KeyStatus::Enabled as i32
    );
    assert_eq!(
        get_model_key(&mut admin, "mk").await.unwrap().status,
        KeyStatus::Enabled as i32
    );
}

#[tokio::test]
async fn deleting_an_enabled_key_is_refused_with_disable_first() {
    let kg = Keygate::start().await;
    let mut admin = kg.admin().await;
    create_auto_key(&mut admin, "ck", "").await;
    create_model_key(&mut admin, "mk", "sk-model-key-value-0123456789", &[]).await;

    let s = refused(
        admin
            .delete_consumer_key(pb::DeleteConsumerKeyRequest {
                selector: by_name!(delete_consumer_key_request, "ck"),
            })
            .await,
        "delete an enabled consumer key",
    );
    assert_code(
        &s,
        Code::FailedPrecondition,
        "delete an enabled consumer key",
    );
    assert!(
        s.message().to_lowercase().contains("disable"),
        "{}",
        s.message()
    );
    assert!(
        get_consumer_key(&mut admin, "ck").await.is_ok(),
        "the key must survive the refusal"
    );

    let s = refused(
        admin
            .delete_model_key(pb::DeleteModelKeyRequest {
                selector: by_name!(delete_model_key_request, "mk"),
            })
            .await,
        "delete an enabled model key",
    );
    assert_code(&s, Code::FailedPrecondition, "delete an enabled model key");
    assert!(
        s.message().to_lowercase().contains("disable"),
        "{}",
        s.message()
    );
    assert!(
        get_model_key(&mut admin, "mk").await.is_ok(),
        "the key must survive the refusal"
    );

    // Disabled and without dependencies: deleted, and gone.
    disable_consumer_key(&mut admin, "ck").await.unwrap();
    disable_model_key(&mut admin, "mk").await.unwrap();
    delete_consumer_key(&mut admin, "ck").await.unwrap();
    delete_model_key(&mut admin, "mk").await.unwrap();
    assert_code(
        &get_consumer_key(&mut admin, "ck").await.unwrap_err(),
        Code::NotFound,
        "deleted consumer key",
    );
    assert_code(
        &get_model_key(&mut admin, "mk").await.unwrap_err(),
        Code::NotFound,
        "deleted model key",
    );
}

#[tokio::test]
async fn deleting_a_bound_consumer_key_names_its_consumer() {
    let kg = Keygate::start().await;
    let mut admin = kg.admin().await;
    create_consumer(&mut admin, "billing-app").await;
    create_auto_key(&mut admin, "ck", "billing-app").await;

    // Enabled and bound: both problems are named.
    let s = delete_consumer_key(&mut admin, "ck").await.unwrap_err();
    assert_code(
        &s,
        Code::FailedPrecondition,
        "delete an enabled, bound consumer key",
    );
    assert!(
        s.message().to_lowercase().contains("disable"),
        "{}",
        s.message()
    );
    assert_names(s.message(), "consumer", "billing-app");

    disable_consumer_key(&mut admin, "ck").await.unwrap();
    let s = delete_consumer_key(&mut admin, "ck").await.unwrap_err();
    assert_code(
        &s,
        Code::FailedPrecondition,
        "delete a disabled, bound consumer key",
    );
    assert_names(s.message(), "consumer", "billing-app");
    assert!(get_consumer_key(&mut admin, "ck").await.is_ok());

    let k = unbind_consumer_key(&mut admin, "ck").await.unwrap();
    assert_eq!(k.consumer, "");
    delete_consumer_key(&mut admin, "ck").await.unwrap();
    assert_code(
        &get_consumer_key(&mut admin, "ck").await.unwrap_err(),
        Code::NotFound,
        "deleted key",
    );
}

#[tokio::test]
async fn deleting_a_model_key_bound_to_two_services_lists_both() {
    let kg = Keygate::start().await;
    let mut admin = kg.admin().await;
    create_service(&mut admin, "openai-prod").await;
    create_service(&mut admin, "azure-east").await;
    let mk = create_model_key(
        &mut admin,
        "mk",
        "sk-model-key-value-0123456789",
        &["openai-prod", "azure-east"],
    )
    .await;
    let bound: BTreeSet<_> = mk.model_services.iter().cloned().collect();
    assert_eq!(
        bound,
        BTreeSet::from(["azure-east".to_string(), "openai-prod".to_string()])
    );
    disable_model_key(&mut admin, "mk").await.unwrap();

    let s = delete_model_key(&mut admin, "mk").await.unwrap_err();
    assert_code(
        &s,
        Code::FailedPrecondition,
        "delete a model key bound to two services",
    );
    assert_names(s.message(), "model service", "openai-prod");
    assert_names(s.message(), "model service", "azure-east");

    // One binding left: still refused, naming the remaining one only.
    unbind_model_key(&mut admin, "mk", "openai-prod")
        .await
        .unwrap();
    let s = delete_model_key(&mut admin, "mk").await.unwrap_err();
    assert_code(
        &s,
        Code::FailedPrecondition,
        "delete a model key bound to one service",
    );
    assert_names(s.message(), "model service", "azure-east");
    assert!(!s.message().contains("openai-prod"), "{}", s.message());

    unbind_model_key(&mut admin, "mk", "azure-east")
        .await
        .unwrap();
    delete_model_key(&mut admin, "mk").await.unwrap();
    assert_code(
        &get_model_key(&mut admin, "mk").await.unwrap_err(),
        Code::NotFound,
        "deleted model key",
    );
}

#[tokio::test]
async fn deleting_a_consumer_with_keys_lists_every_key() {
    let kg = Keygate::start().await;
    let mut admin = kg.admin().await;
    create_consumer(&mut admin, "mobile-app").await;
    create_auto_key(&mut admin, "ios-key", "mobile-app").await;
    create_auto_key(&mut admin, "android-key", "mobile-app").await;
    let c = get_consumer(&mut admin, "mobile-app").await.unwrap();
    let keys: BTreeSet<_> = c.consumer_keys.iter().cloned().collect();
    assert_eq!(
        keys,
        BTreeSet::from(["android-key".to_string(), "ios-key".to_string()])
    );

    let s = delete_consumer(&mut admin, "mobile-app").await.unwrap_err();
    assert_code(&s, Code::FailedPrecondition, "delete a consumer with keys");
    assert_names(s.message(), "consumer key", "ios-key");
    assert_names(s.message(), "consumer key", "android-key");
    assert!(get_consumer(&mut admin, "mobile-app").await.is_ok());

    unbind_consumer_key(&mut admin, "ios-key").await.unwrap();
    unbind_consumer_key(&mut admin, "android-key")
        .await
        .unwrap();
    delete_consumer(&mut admin, "mobile-app").await.unwrap();
    assert_code(
        &get_consumer(&mut admin, "mobile-app").await.unwrap_err(),
        Code::NotFound,
        "deleted consumer",
    );
    // The keys survive their consumer, unbound.
    assert_eq!(
        get_consumer_key(&mut admin, "ios-key")
            .await
            .unwrap()
            .consumer,
        ""
    );
}

#[tokio::test]
async fn deleting_a_model_service_lists_bound_keys_and_every_scope_naming_it() {
    let kg = Keygate::start().await;
    let mut admin = kg.admin().await;
    create_service(&mut admin, "anthropic").await;
    create_service(&mut admin, "other").await;
    create_model_key(
        &mut admin,
        "claude-key",
        "sk-ant-model-key-0123456789",
        &["anthropic"],
    )
    .await;
    admin
        .create_consumer(pb::CreateConsumerRequest {
            name: "research".into(),
            scope: Some(pb::Scope {
                all: false,
                model_services: vec!["anthropic".into(), "other".into()],
                ..Default::default()
            }),
            ..Default::default()
        })
        .await
        .unwrap();
    admin
        .create_consumer_key(pb::CreateConsumerKeyRequest {
            name: "scoped-key".into(),
            generation_method: GenerationMethod::Auto as i32,
            scope: Some(pb::Scope {
                all: false,
                model_services: vec!["anthropic".into()],
                ..Default::default()
            }),
            ..Default::default()
        })
        .await
        .unwrap();

    let s = delete_service(&mut admin, "anthropic").await.unwrap_err();
    assert_code(
        &s,
        Code::FailedPrecondition,
        "delete a model service with dependencies",
    );
    assert_names(s.message(), "model key", "claude-key");
    assert_names(s.message(), "consumer", "research");
    assert_names(s.message(), "consumer key", "scoped-key");
    assert!(get_service(&mut admin, "anthropic").await.is_ok());

    // Remove each dependency; the delete then succeeds.
    unbind_model_key(&mut admin, "claude-key", "anthropic")
        .await
        .unwrap();
    admin
        .update_consumer(pb::UpdateConsumerRequest {
            selector: by_name!(update_consumer_request, "research"),
            consumer: Some(pb::Consumer {
                scope: Some(pb::Scope {
                    all: false,
                    model_services: vec!["other".into()],
                    ..Default::default()
                }),
                ..Default::default()
            }),
            update_mask: mask(&["scope"]),
        })
        .await
        .unwrap();
    let s = delete_service(&mut admin, "anthropic").await.unwrap_err();
    assert_code(
        &s,
        Code::FailedPrecondition,
        "delete a model service still in a key's scope",
    );
    assert_names(s.message(), "consumer key", "scoped-key");
    assert!(!s.message().contains("research"), "{}", s.message());

    admin
        .update_consumer_key(pb::UpdateConsumerKeyRequest {
            selector: by_name!(update_consumer_key_request, "scoped-key"),
            consumer_key: Some(pb::ConsumerKey {
                scope: Some(pb::Scope {
                    all: true,
                    model_services: vec![],
                    ..Default::default()
                }),
                ..Default::default()
            }),
            update_mask: mask(&["scope"]),
        })
        .await
        .unwrap();
    delete_service(&mut admin, "anthropic").await.unwrap();
    assert_code(
        &get_service(&mut admin, "anthropic").await.unwrap_err(),
        Code::NotFound,
        "deleted service",
    );
}

#[tokio::test]
async fn binding_an_already_bound_consumer_key_is_refused() {
    let kg = Keygate::start().await;
    let mut admin = kg.admin().await;
    create_consumer(&mut admin, "first").await;
    create_consumer(&mut admin, "second").await;
    let created = create_auto_key(&mut admin, "ck", "").await;
    let k = bind_consumer_key(&mut admin, "ck", "first").await.unwrap();
    assert_eq!(k.consumer, "first");

    let s = bind_consumer_key(&mut admin, "ck", "second")
        .await
        .unwrap_err();
    assert_code(
        &s,
        Code::FailedPrecondition,
        "bind a bound key to another consumer",
    );
    assert!(
        s.message().contains("first"),
        "the refusal should name the current consumer: {}",
        s.message()
    );

    // Also by id, and to the same consumer again.
    let by_id = created.key.unwrap().id;
    let s = bind_consumer_key(&mut admin, &by_id, "first")
        .await
        .unwrap_err();
    assert_code(
        &s,
        Code::FailedPrecondition,
        "bind a bound key to its own consumer",
    );

    assert_eq!(
        get_consumer_key(&mut admin, "ck").await.unwrap().consumer,
        "first"
    );
    assert!(
        get_consumer(&mut admin, "second")
            .await
            .unwrap()
            .consumer_keys
            .is_empty()
    );

    // Unbind, then the other consumer may take it.
    unbind_consumer_key(&mut admin, "ck").await.unwrap();
    assert_eq!(
        bind_consumer_key(&mut admin, "ck", "second")
            .await
            .unwrap()
            .consumer,
        "second"
    );
}

#[tokio::test]
async fn duplicate_names_are_already_exists_for_every_kind() {
    let kg = Keygate::start().await;
    let mut admin = kg.admin().await;
    create_consumer(&mut admin, "dup").await;
    create_service(&mut admin, "dup").await; // names are unique per kind only
    create_auto_key(&mut admin, "dup", "").await;
    create_model_key(&mut admin, "dup", "sk-model-key-value-0123456789", &[]).await;

    let s = admin
        .create_consumer(pb::CreateConsumerRequest {
            name: "dup".into(),
            ..Default::default()
        })
        .await
        .unwrap_err();
    assert_code(&s, Code::AlreadyExists, "duplicate consumer");
    assert!(s.message().contains("dup"), "{}", s.message());

    let s = admin
        .create_model_service(pb::CreateModelServiceRequest {
            name: "dup".into(),
            ..Default::default()
        })
        .await
        .unwrap_err();
    assert_code(&s, Code::AlreadyExists, "duplicate model service");

    let s = admin
        .create_consumer_key(pb::CreateConsumerKeyRequest {
            name: "dup".into(),
            generation_method: GenerationMethod::Auto as i32,
            ..Default::default()
        })
        .await
        .unwrap_err();
    assert_code(&s, Code::AlreadyExists, "duplicate consumer key");

    let s = admin
        .create_model_key(pb::CreateModelKeyRequest {
            name: "dup".into(),
            generation_method: GenerationMethod::Custom as i32,
            value: "sk-another-model-key-0123456789".into(),
            ..Default::default()
        })
        .await
        .unwrap_err();
    assert_code(&s, Code::AlreadyExists, "duplicate model key");

    // A rename onto a taken name is refused the same way.
    create_consumer(&mut admin, "other").await;
    let s = admin
        .update_consumer(pb::UpdateConsumerRequest {
            selector: by_name!(update_consumer_request, "other"),
            consumer: Some(pb::Consumer {
                name: "dup".into(),
                ..Default::default()
            }),
            update_mask: mask(&["name"]),
        })
        .await
        .unwrap_err();
    assert_code(
        &s,
        Code::AlreadyExists,
        "rename a consumer onto a taken name",
    );
    assert!(get_consumer(&mut admin, "other").await.is_ok());
}

#[tokio::test]
async fn unknown_resources_and_unknown_names_in_requests_are_not_found() {
    let kg = Keygate::start().await;
    let mut admin = kg.admin().await;
    create_service(&mut admin, "svc").await;
    create_consumer(&mut admin, "app").await;
    create_auto_key(&mut admin, "ck", "").await;
    create_model_key(&mut admin, "mk", "sk-model-key-value-0123456789", &[]).await;

    // The selected resource does not exist, by name and by id.
    assert_code(
        &get_consumer(&mut admin, "ghost").await.unwrap_err(),
        Code::NotFound,
        "get consumer",
    );
    assert_code(
        &get_service(&mut admin, "ghost").await.unwrap_err(),
        Code::NotFound,
        "get model service",
    );
    assert_code(
        &get_consumer_key(&mut admin, "ghost").await.unwrap_err(),
        Code::NotFound,
        "get consumer key",
    );
    assert_code(
        &get_model_key(&mut admin, "ghost").await.unwrap_err(),
        Code::NotFound,
        "get model key",
    );
    let s = admin
        .get_consumer(pb::GetConsumerRequest {
            selector: by_id!(get_consumer_request, "00000000-0000-0000-0000-000000000000"),
        })
        .await
        .unwrap_err();
    assert_code(&s, Code::NotFound, "get consumer by unknown id");
    assert_code(
        &enable_consumer_key(&mut admin, "ghost").await.unwrap_err(),
        Code::NotFound,
        "enable unknown key",
    );
    assert_code(
        &disable_model_key(&mut admin, "ghost").await.unwrap_err(),
        Code::NotFound,
        "disable unknown key",
    );
    assert_code(
        &delete_consumer(&mut admin, "ghost").await.unwrap_err(),
        Code::NotFound,
        "delete unknown consumer",
    );
    assert_code(
        &delete_service(&mut admin, "ghost").await.unwrap_err(),
        Code::NotFound,
        "delete unknown service",
    );

    // A consumer named in a request does not exist.
    let s = admin
        .create_consumer_key(pb::CreateConsumerKeyRequest {
            name: "orphan".into(),
            generation_method: GenerationMethod::Auto as i32,
            consumer: "ghost-app".into(),
            ..Default::default()
        })
        .await
        .unwrap_err();
    assert_code(&s, Code::NotFound, "create a key for an unknown consumer");
    assert!(s.message().contains("ghost-app"), "{}", s.message());
    assert_code(
        &get_consumer_key(&mut admin, "orphan").await.unwrap_err(),
        Code::NotFound,
        "nothing created",
    );

    let s = bind_consumer_key(&mut admin, "ck", "ghost-app")
        .await
        .unwrap_err();
    assert_code(&s, Code::NotFound, "bind to an unknown consumer");
    assert!(s.message().contains("ghost-app"), "{}", s.message());
    let s = bind_consumer_key(&mut admin, "ghost-key", "app")
        .await
        .unwrap_err();
    assert_code(&s, Code::NotFound, "bind an unknown key");

    let s = admin
        .list_consumer_keys(pb::ListConsumerKeysRequest {
            consumer: "ghost-app".into(),
            ..Default::default()
        })
        .await
        .unwrap_err();
    assert_code(&s, Code::NotFound, "list keys of an unknown consumer");

    // A model service named in a request or scope does not exist.
    let s = admin
        .create_consumer(pb::CreateConsumerRequest {
            name: "scoped".into(),
            scope: Some(pb::Scope {
                all: false,
                model_services: vec!["svc".into(), "ghost-svc".into()],
                ..Default::default()
            }),
            ..Default::default()
        })
        .await
        .unwrap_err();
    assert_code(
        &s,
        Code::NotFound,
        "consumer scope naming an unknown service",
    );
    assert!(s.message().contains("ghost-svc"), "{}", s.message());
    assert_code(
        &get_consumer(&mut admin, "scoped").await.unwrap_err(),
        Code::NotFound,
        "nothing created",
    );

    let s = admin
        .create_consumer_key(pb::CreateConsumerKeyRequest {
            name: "scoped-key".into(),
            generation_method: GenerationMethod::Auto as i32,
            scope: Some(pb::Scope {
                all: false,
                model_services: vec!["ghost-svc".into()],
                ..Default::default()
            }),
            ..Default::default()
        })
        .await
        .unwrap_err();
    assert_code(&s, Code::NotFound, "key scope naming an unknown service");
    assert!(s.message().contains("ghost-svc"), "{}", s.message());

    let s = admin
        .update_consumer_key(pb::UpdateConsumerKeyRequest {
            selector: by_name!(update_consumer_key_request, "ck"),
            consumer_key: Some(pb::ConsumerKey {
                scope: Some(pb::Scope {
                    all: false,
                    model_services: vec!["ghost-svc".into()],
                    ..Default::default()
                }),
                ..Default::default()
            }),
            update_mask: mask(&["scope"]),
        })
        .await
        .unwrap_err();
    assert_code(
        &s,
        Code::NotFound,
        "update a key's scope to an unknown service",
    );

    let s = admin
        .create_model_key(pb::CreateModelKeyRequest {
            name: "mk2".into(),
            generation_method: GenerationMethod::Custom as i32,
            value: "sk-model-key-value-abcdefghij".into(),
            model_services: vec!["ghost-svc".into()],
            ..Default::default()
        })
        .await
        .unwrap_err();
    assert_code(
        &s,
        Code::NotFound,
        "model key bound at creation to an unknown service",
    );
    assert!(s.message().contains("ghost-svc"), "{}", s.message());
    assert_code(
        &get_model_key(&mut admin, "mk2").await.unwrap_err(),
        Code::NotFound,
        "nothing created",
    );

    let s = admin
        .bind_model_key(pb::BindModelKeyRequest {
            key: "mk".into(),
            model_service: "ghost-svc".into(),
        })
        .await
        .unwrap_err();
    assert_code(&s, Code::NotFound, "bind a model key to an unknown service");
}

// ---------------------------------------------------------------------------- field rules

#[tokio::test]
async fn invalid_names_and_descriptions_are_invalid_argument_with_field_violations() {
    let kg = Keygate::start().await;
    let mut admin = kg.admin().await;
    let long = "a".repeat(61);
    for bad in ["1abc", "abc-", "_abc", "has space", long.as_str()] {
        let s = admin
            .create_consumer(pb::CreateConsumerRequest {
                name: bad.into(),
                ..Default::default()
            })
            .await
            .unwrap_err();
        assert_field_violation(&s, "name", &format!("consumer name {bad:?}"));

        let s = admin
            .create_model_service(pb::CreateModelServiceRequest {
                name: bad.into(),
                ..Default::default()
            })
            .await
            .unwrap_err();
        assert_field_violation(&s, "name", &format!("model service name {bad:?}"));

        let s = admin
            .create_consumer_key(pb::CreateConsumerKeyRequest {
                name: bad.into(),
                generation_method: GenerationMethod::Auto as i32,
                ..Default::default()
            })
            .await
            .unwrap_err();
        assert_field_violation(&s, "name", &format!("consumer key name {bad:?}"));

        let s = admin
            .create_model_key(pb::CreateModelKeyRequest {
                name: bad.into(),
                generation_method: GenerationMethod::Custom as i32,
                value: "sk-model-key-value-0123456789".into(),
                ..Default::default()
            })
            .await
            .unwrap_err();
        assert_field_violation(&s, "name", &format!("model key name {bad:?}"));
    }
    let long_desc = "d".repeat(201);
    let s = admin
        .create_consumer(pb::CreateConsumerRequest {
            name: "app".into(),
            description: long_desc.clone(),
            ..Default::default()
        })
        .await
        .unwrap_err();
    let why = assert_field_violation(&s, "description", "201-character description");
    assert!(why.contains("200"), "the rule should be named: {why}");
    let s = admin
        .create_consumer_key(pb::CreateConsumerKeyRequest {
            name: "ck".into(),
            description: long_desc.clone(),
            ..Default::default()
        })
        .await
        .unwrap_err();
    assert_field_violation(&s, "description", "201-character key description");

    // Rename and description updates follow the same rules.
    create_consumer(&mut admin, "app").await;
    let s = admin
        .update_consumer(pb::UpdateConsumerRequest {
            selector: by_name!(update_consumer_request, "app"),
            consumer: Some(pb::Consumer {
                name: "9lives".into(),
                description: long_desc,
                ..Default::default()
            }),
            update_mask: mask(&["name", "description"]),
        })
        .await
        .unwrap_err();
    assert_field_violation(&s, "name", "rename to an invalid name");
    assert_field_violation(&s, "description", "update to a long description");

    // Nothing was created or changed by any refusal.
    let all = admin
        .list_consumers(pb::ListConsumersRequest::default())
        .await
        .unwrap()
        .into_inner()
        .items;
    assert_eq!(
        all.iter().map(|c| c.name.as_str()).collect::<Vec<_>>(),
        ["app"]
    );
    assert_eq!(all[0].description, "");
}

#[tokio::test]
async fn names_in_any_script_up_to_60_characters_are_accepted() {
    let kg = Keygate::start().await;
    let mut admin = kg.admin().await;
    let c = create_consumer(&mut admin, "计费应用").await;
    assert_eq!(c.name, "计费应用");
    let got = get_consumer(&mut admin, "计费应用").await.unwrap();
    assert_eq!(got.id, c.id);

    let s = create_service(&mut admin, "模型服务").await;
    assert_eq!(s.name, "模型服务");
    let k = create_auto_key(&mut admin, "移动端_密钥-1", "计费应用").await;
    assert_eq!(k.key.unwrap().consumer, "计费应用");

    let sixty = format!("a{}", "b".repeat(59));
    assert_eq!(create_consumer(&mut admin, &sixty).await.name, sixty);
    let sixty_cjk = "计".repeat(60);
    assert_eq!(
        create_consumer(&mut admin, &sixty_cjk).await.name,
        sixty_cjk
    );

    // Descriptions count characters, not bytes: 200 CJK characters fit.
    let desc = "述".repeat(200);
    let c = admin
        .create_consumer(pb::CreateConsumerRequest {
            name: "described".into(),
            description: desc.clone(),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(c.description, desc);
}

#[tokio::test]
async fn names_are_nfc_normalised_and_invisible_characters_refused() {
    let kg = Keygate::start().await;
    let mut admin = kg.admin().await;
    // The same Korean name typed decomposed (conjoining jamo) and precomposed is one name.
    let decomposed = "\u{1112}\u{1161}\u{11AB}-app";
    let precomposed = "\u{D55C}-app";
    let c = create_consumer(&mut admin, decomposed).await;
    assert_eq!(c.name, precomposed, "stored in NFC");
    assert_eq!(
        get_consumer(&mut admin, precomposed).await.unwrap().id,
        c.id
    );
    assert_eq!(get_consumer(&mut admin, decomposed).await.unwrap().id, c.id);
    let dup = refused(
        admin
            .create_consumer(pb::CreateConsumerRequest {
                name: precomposed.into(),
                ..Default::default()
            })
            .await,
        "NFC twin",
    );
    assert_code(&dup, Code::AlreadyExists, "NFC twin");
    // Scope lists and bind references resolve the other spelling too.
    create_service(&mut admin, "\u{D55C}-svc").await;
    let scoped = admin
        .create_consumer(pb::CreateConsumerRequest {
            name: "scoped".into(),
            scope: Some(pb::Scope {
                all: false,
                model_services: vec!["\u{1112}\u{1161}\u{11AB}-svc".into()],
                ..Default::default()
            }),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(scoped.scope.unwrap().model_services, vec!["\u{D55C}-svc"]);

    // Invisible characters are refused, even where they are letters (Hangul filler U+3164).
    for (name, what) in [
        ("ops\u{3164}team", "Hangul filler"),
        ("\u{3164}", "a lone Hangul filler"),
        ("ops\u{200B}team", "zero-width space"),
        ("ops\u{200D}team", "zero-width joiner"),
        ("ops\u{202E}team", "bidi override"),
        ("ops\u{FE0F}team", "variation selector"),
    ] {
        let s = refused(
            admin
                .create_consumer(pb::CreateConsumerRequest {
                    name: name.into(),
                    ..Default::default()
                })
                .await,
            what,
        );
        let rule = assert_field_violation(&s, "name", what);
        assert!(
            rule.contains("invisible or format characters"),
            "{what}: {rule}"
        );
    }
    let list = admin
        .list_consumers(pb::ListConsumersRequest::default())
        .await
        .unwrap()
        .into_inner();
    assert_eq!(list.items.len(), 2, "nothing was written by the refusals");
}

#[tokio::test]
async fn consumer_key_fields_are_validated_with_field_violations() {
    let kg = Keygate::start().await;
    let mut admin = kg.admin().await;
    create_service(&mut admin, "svc").await;

    let key = |name: &str| pb::CreateConsumerKeyRequest {
        name: name.into(),
        generation_method: GenerationMethod::Auto as i32,
        ..Default::default()
    };

    for bad in ["10.0.0.0/33", "not-an-ip", "10.0.0.1/abc", "300.1.1.1"] {
        let s = admin
            .create_consumer_key(pb::CreateConsumerKeyRequest {
                ip_allowlist: vec!["192.168.0.0/16".into(), bad.into()],
                ..key("k1")
            })
            .await
            .unwrap_err();
        assert_field_violation(&s, "ip_allowlist", &format!("CIDR {bad:?}"));
    }

    let s = admin
        .create_consumer_key(pb::CreateConsumerKeyRequest {
            scope: Some(pb::Scope {
                all: true,
                model_services: vec!["svc".into()],
                ..Default::default()
            }),
            ..key("k1")
        })
        .await
        .unwrap_err();
    assert_field_violation(&s, "scope", "all=true together with a list");

    let s = admin
        .create_consumer(pb::CreateConsumerRequest {
            name: "app".into(),
            scope: Some(pb::Scope {
                all: true,
                model_services: vec!["svc".into()],
                ..Default::default()
            }),
            ..Default::default()
        })
        .await
        .unwrap_err();
    assert_field_violation(&s, "scope", "consumer scope all=true together with a list");

    let custom = |value: &str| pb::CreateConsumerKeyRequest {
        name: "k1".into(),
        generation_method: GenerationMethod::Custom as i32,
        value: value.into(),
        ..Default::default()
    };
    let s = admin
        .create_consumer_key(custom("short-value-15c"))
        .await
        .unwrap_err();
    assert_eq!("short-value-15c".len(), 15);
    let why = assert_field_violation(&s, "value", "a 15-character CUSTOM value");
    assert!(why.contains("16"), "the rule should be named: {why}");
    let spaced = "custom key with spaces 0123456789";
    let s = admin.create_consumer_key(custom(spaced)).await.unwrap_err();
    assert_field_violation(&s, "value", "a CUSTOM value with a space");
    assert!(
        !s.message().contains(spaced),
        "the refusal must not echo the value"
    );
    let s = admin
        .create_consumer_key(custom("tab\tinside-the-value-012345"))
        .await
        .unwrap_err();
    assert_field_violation(&s, "value", "a CUSTOM value with a tab");

    // Model keys follow the same value rules.
    let s = admin
        .create_model_key(pb::CreateModelKeyRequest {
            name: "mk".into(),
            generation_method: GenerationMethod::Custom as i32,
            value: "sk-short".into(),
            ..Default::default()
        })
        .await
        .unwrap_err();
    assert_field_violation(&s, "value", "a short model key value");
    let s = admin
        .create_model_key(pb::CreateModelKeyRequest {
            name: "mk".into(),
            generation_method: GenerationMethod::Custom as i32,
            value: "sk-model key-with-space-0123".into(),
            ..Default::default()
        })
        .await
        .unwrap_err();
    assert_field_violation(&s, "value", "a model key value with a space");

    // Exactly 16 visible ASCII characters is enough.
    let ok = admin
        .create_consumer_key(custom("0123456789abcdef"))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(
        ok.key.unwrap().masked_value,
        "***",
        "values under 20 characters show *** alone"
    );

    // Nothing else was created by the refusals.
    let names = list_consumer_key_names(&mut admin, "", KeyStatus::Unspecified).await;
    assert_eq!(names, BTreeSet::from(["k1".to_string()]));
}

#[tokio::test]
async fn model_service_auth_header_and_template_are_validated() {
    let kg = Keygate::start().await;
    let mut admin = kg.admin().await;
    for bad in [
        "Host",
        "host",
        ":path",
        "X-Api-Key",
        "content-length",
        "connection",
        "x api key",
    ] {
        let s = admin
            .create_model_service(pb::CreateModelServiceRequest {
                name: "svc".into(),
                auth_header: bad.into(),
                ..Default::default()
            })
            .await
            .unwrap_err();
        assert_field_violation(&s, "auth_header", &format!("auth_header {bad:?}"));
    }
    for bad in [
        "Bearer",
        "Bearer {key} {key}",
        "Bearer {KEY}",
        "Bearer\t{key}",
    ] {
        let s = admin
            .create_model_service(pb::CreateModelServiceRequest {
                name: "svc".into(),
                auth_value_template: bad.into(),
                ..Default::default()
            })
            .await
            .unwrap_err();
        let why = assert_field_violation(&s, "auth_value_template", &format!("template {bad:?}"));
        if !bad.contains('\t') {
            assert!(why.contains("{key}"), "the rule should be named: {why}");
        }
    }
    assert_code(
        &get_service(&mut admin, "svc").await.unwrap_err(),
        Code::NotFound,
        "nothing created",
    );

    // Defaults, and a valid custom header (Anthropic style).
    let default = create_service(&mut admin, "openai").await;
    assert_eq!(default.auth_header, "authorization");
    assert_eq!(default.auth_value_template, "Bearer {key}");
    let anthropic = admin
        .create_model_service(pb::CreateModelServiceRequest {
            name: "anthropic".into(),
            auth_header: "x-api-key".into(),
            auth_value_template: "{key}".into(),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(anthropic.auth_header, "x-api-key");
    assert_eq!(anthropic.auth_value_template, "{key}");

    // Updates follow the same rules.
    let s = admin
        .update_model_service(pb::UpdateModelServiceRequest {
            selector: by_name!(update_model_service_request, "anthropic"),
            model_service: Some(pb::ModelService {
                auth_header: "host".into(),
                ..Default::default()
            }),
            update_mask: mask(&["auth_header"]),
        })
        .await
        .unwrap_err();
    assert_field_violation(&s, "auth_header", "update auth_header to host");
    assert_eq!(
        get_service(&mut admin, "anthropic")
            .await
            .unwrap()
            .auth_header,
        "x-api-key"
    );
}

// ---------------------------------------------------------------------------- limits

#[tokio::test]
async fn keys_per_consumer_quota_is_resource_exhausted_at_create_and_bind() {
    let kg = Keygate::start_with(Options {
        args: vec!["--max-keys-per-consumer".into(), "2".into()],
        ..Default::default()
    })
    .await;
    let mut admin = kg.admin().await;
    create_consumer(&mut admin, "app").await;
    create_auto_key(&mut admin, "k1", "app").await;
    create_auto_key(&mut admin, "k2", "app").await;

    let s = admin
        .create_consumer_key(pb::CreateConsumerKeyRequest {
            name: "k3".into(),
            generation_method: GenerationMethod::Auto as i32,
            consumer: "app".into(),
            ..Default::default()
        })
        .await
        .unwrap_err();
    assert_code(
        &s,
        Code::ResourceExhausted,
        "third key created for the consumer",
    );
    assert!(
        s.message().contains("app") && s.message().contains('2'),
        "{}",
        s.message()
    );
    assert_code(
        &get_consumer_key(&mut admin, "k3").await.unwrap_err(),
        Code::NotFound,
        "k3 not created",
    );

    // An unbound key is fine; binding it is the third key, refused.
    create_auto_key(&mut admin, "k3", "").await;
    let s = bind_consumer_key(&mut admin, "k3", "app")
        .await
        .unwrap_err();
    assert_code(
        &s,
        Code::ResourceExhausted,
        "third key bound to the consumer",
    );
    assert_eq!(
        get_consumer_key(&mut admin, "k3").await.unwrap().consumer,
        ""
    );
    assert_eq!(
        get_consumer(&mut admin, "app")
            .await
            .unwrap()
            .consumer_keys
            .len(),
        2
    );

    // Disabled keys still count; unbinding frees a slot.
    disable_consumer_key(&mut admin, "k1").await.unwrap();
    assert_code(
        &bind_consumer_key(&mut admin, "k3", "app")
            .await
            .unwrap_err(),
        Code::ResourceExhausted,
        "a disabled key still counts",
    );
    unbind_consumer_key(&mut admin, "k1").await.unwrap();
    assert_eq!(
        bind_consumer_key(&mut admin, "k3", "app")
            .await
            .unwrap()
            .consumer,
        "app"
    );
}

#[tokio::test]
async fn ip_allowlist_beyond_50_entries_is_resource_exhausted() {
    let kg = Keygate::start().await;
    let mut admin = kg.admin().await;
    let entries = |n: usize| {
        (0..n)
            .map(|i| format!("10.0.{}.0/24", i))
            .collect::<Vec<_>>()
    };

    let s = admin
        .create_consumer_key(pb::CreateConsumerKeyRequest {
            name: "k".into(),
            generation_method: GenerationMethod::Auto as i32,
            ip_allowlist: entries(51),
            ..Default::default()
        })
        .await
        .unwrap_err();
    assert_code(
        &s,
        Code::ResourceExhausted,
        "51 allowlist entries at create",
    );
    assert!(s.message().contains("50"), "{}", s.message());

    let k = admin
        .create_consumer_key(pb::CreateConsumerKeyRequest {
            name: "k".into(),
            generation_method: GenerationMethod::Auto as i32,
            ip_allowlist: entries(50),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner()
        .key
        .unwrap();
    assert_eq!(k.ip_allowlist.len(), 50);

    let s = admin
        .update_consumer_key(pb::UpdateConsumerKeyRequest {
            selector: by_name!(update_consumer_key_request, "k"),
            consumer_key: Some(pb::ConsumerKey {
                ip_allowlist: entries(51),
                ..Default::default()
            }),
            update_mask: mask(&["ip_allowlist"]),
        })
        .await
        .unwrap_err();
    assert_code(
        &s,
        Code::ResourceExhausted,
        "51 allowlist entries at update",
    );
    assert_eq!(
        get_consumer_key(&mut admin, "k")
            .await
            .unwrap()
            .ip_allowlist
            .len(),
        50
    );
}

#[tokio::test]
async fn expire_time_in_the_past_is_invalid_argument() {
    let kg = Keygate::start().await;
    let mut admin = kg.admin().await;
    let past = ts(SystemTime::now() - Duration::from_secs(60));
    let future = ts(SystemTime::now() + Duration::from_secs(3600));

    let s = admin
        .create_consumer_key(pb::CreateConsumerKeyRequest {
            name: "k".into(),
            generation_method: GenerationMethod::Auto as i32,
            expire_time: Some(past),
            ..Default::default()
        })
        .await
        .unwrap_err();
    assert_field_violation(&s, "expire_time", "expire_time in the past at create");

    let k = admin
        .create_consumer_key(pb::CreateConsumerKeyRequest {
            name: "k".into(),
            generation_method: GenerationMethod::Auto as i32,
            expire_time: Some(future),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner()
        .key
        .unwrap();
    assert_eq!(k.expire_time.map(|t| t.seconds), Some(future.seconds));
    assert!(!k.expired);

    let s = admin
        .update_consumer_key(pb::UpdateConsumerKeyRequest {
            selector: by_name!(update_consumer_key_request, "k"),
            consumer_key: Some(pb::ConsumerKey {
                expire_time: Some(past),
                ..Default::default()
            }),
            update_mask: mask(&["expire_time"]),
        })
        .await
        .unwrap_err();
    assert_field_violation(&s, "expire_time", "expire_time in the past at update");
    let got = get_consumer_key(&mut admin, "k").await.unwrap();
    assert_eq!(got.expire_time.map(|t| t.seconds), Some(future.seconds));
    assert!(!got.expired);
}

#[tokio::test]
async fn an_expired_key_keeps_its_status_counts_toward_the_quota_and_can_be_extended() {
    let kg = Keygate::start_with(Options {
        args: vec!["--max-keys-per-consumer".into(), "1".into()],
        ..Default::default()
    })
    .await;
    let mut admin = kg.admin().await;
    create_consumer(&mut admin, "app").await;
    // No minimum lead time: a second and a half is accepted.
    let soon = ts(SystemTime::now() + Duration::from_millis(1500));
    admin
        .create_consumer_key(pb::CreateConsumerKeyRequest {
            name: "short-lived".into(),
            generation_method: GenerationMethod::Auto as i32,
            consumer: "app".into(),
            expire_time: Some(soon),
            ..Default::default()
        })
        .await
        .unwrap();

    let expired = poll_until(Duration::from_secs(10), "the key to show expired", || {
        let mut a = admin.clone();
        async move {
            get_consumer_key(&mut a, "short-lived")
                .await
                .ok()
                .filter(|k| k.expired)
        }
    })
    .await;
    assert_eq!(
        expired.status,
        KeyStatus::Enabled as i32,
        "an expired key keeps its status"
    );
    let listed = admin
        .list_consumer_keys(pb::ListConsumerKeysRequest::default())
        .await
        .unwrap()
        .into_inner();
    assert!(
        listed
            .items
            .iter()
            .all(|k| k.name != "short-lived" || k.expired)
    );

    // Still counts toward the quota.
    let s = admin
        .create_consumer_key(pb::CreateConsumerKeyRequest {
            name: "second".into(),
            generation_method: GenerationMethod::Auto as i32,
            consumer: "app".into(),
            ..Default::default()
        })
        .await
        .unwrap_err();
    assert_code(
        &s,
        Code::ResourceExhausted,
        "an expired key still counts toward the quota",
    );

    // Deleted by the usual rules.
    let s = delete_consumer_key(&mut admin, "short-lived")
        .await
        .unwrap_err();
    assert_code(
        &s,
        Code::FailedPrecondition,
        "delete an expired but enabled key",
    );

    // A later expire_time revives it.
    let later = ts(SystemTime::now() + Duration::from_secs(3600));
    let k = admin
        .update_consumer_key(pb::UpdateConsumerKeyRequest {
            selector: by_name!(update_consumer_key_request, "short-lived"),
            consumer_key: Some(pb::ConsumerKey {
                expire_time: Some(later),
                ..Default::default()
            }),
            update_mask: mask(&["expire_time"]),
        })
        .await
        .unwrap()
        .into_inner();
    assert!(!k.expired);
    assert_eq!(k.expire_time.map(|t| t.seconds), Some(later.seconds));
    assert!(
        !get_consumer_key(&mut admin, "short-lived")
            .await
            .unwrap()
            .expired
    );
}

// ---------------------------------------------------------------------------- updates

#[tokio::test]
async fn renames_keep_the_id_for_every_kind() {
    let kg = Keygate::start().await;
    let mut admin = kg.admin().await;
    let c = create_consumer(&mut admin, "old-app").await;
    let s = create_service(&mut admin, "old-svc").await;
    let k = create_auto_key(&mut admin, "old-key", "old-app")
        .await
        .key
        .unwrap();
    let m = create_model_key(
        &mut admin,
        "old-mk",
        "sk-model-key-value-0123456789",
        &["old-svc"],
    )
    .await;

    let c2 = admin
        .update_consumer(pb::UpdateConsumerRequest {
            selector: by_name!(update_consumer_request, "old-app"),
            consumer: Some(pb::Consumer {
                name: "new-app".into(),
                ..Default::default()
            }),
            update_mask: mask(&["name"]),
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(
        (c2.id.as_str(), c2.name.as_str()),
        (c.id.as_str(), "new-app")
    );

    let s2 = admin
        .update_model_service(pb::UpdateModelServiceRequest {
            selector: by_id!(update_model_service_request, &s.id),
            model_service: Some(pb::ModelService {
                name: "new-svc".into(),
                ..Default::default()
            }),
            update_mask: mask(&["name"]),
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(
        (s2.id.as_str(), s2.name.as_str()),
        (s.id.as_str(), "new-svc")
    );

    let k2 = admin
        .update_consumer_key(pb::UpdateConsumerKeyRequest {
            selector: by_name!(update_consumer_key_request, "old-key"),
            consumer_key: Some(pb::ConsumerKey {
                name: "new-key".into(),
                ..Default::default()
            }),
            update_mask: mask(&["name"]),
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(
        (k2.id.as_str(), k2.name.as_str()),
        (k.id.as_str(), "new-key")
    );
    assert_eq!(
        k2.masked_value, k.masked_value,
        "a rename never touches the value"
    );

    let m2 = admin
        .update_model_key(pb::UpdateModelKeyRequest {
            selector: by_name!(update_model_key_request, "old-mk"),
            model_key: Some(pb::ModelKey {
                name: "new-mk".into(),
                ..Default::default()
            }),
            update_mask: mask(&["name"]),
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(
        (m2.id.as_str(), m2.name.as_str()),
        (m.id.as_str(), "new-mk")
    );

    // Old names are gone; relations show the new names.
    assert_code(
        &get_consumer(&mut admin, "old-app").await.unwrap_err(),
        Code::NotFound,
        "old consumer name",
    );
    assert_code(
        &get_consumer_key(&mut admin, "old-key").await.unwrap_err(),
        Code::NotFound,
        "old key name",
    );
    let key = get_consumer_key(&mut admin, "new-key").await.unwrap();
    assert_eq!(
        (key.consumer.as_str(), key.consumer_id.as_str()),
        ("new-app", c.id.as_str())
    );
    assert_eq!(
        get_model_key(&mut admin, "new-mk")
            .await
            .unwrap()
            .model_services,
        ["new-svc"]
    );
    assert_eq!(
        get_service(&mut admin, "new-svc").await.unwrap().model_keys,
        ["new-mk"]
    );
    assert_eq!(
        get_consumer(&mut admin, "new-app")
            .await
            .unwrap()
            .consumer_keys,
        ["new-key"]
    );
}

#[tokio::test]
async fn update_masks_naming_lifecycle_or_output_fields_are_refused_naming_the_rpc() {
    let kg = Keygate::start().await;
    let mut admin = kg.admin().await;
    create_service(&mut admin, "svc").await;
    create_auto_key(&mut admin, "ck", "").await;
    create_model_key(&mut admin, "mk", "sk-model-key-value-0123456789", &[]).await;

    let update_ck = |paths: &[&str]| pb::UpdateConsumerKeyRequest {
        selector: by_name!(update_consumer_key_request, "ck"),
        consumer_key: Some(pb::ConsumerKey {
            description: "changed".into(),
            status: KeyStatus::Disabled as i32,
            ..Default::default()
        }),
        update_mask: mask(paths),
    };

    let s = admin
        .update_consumer_key(update_ck(&["status"]))
        .await
        .unwrap_err();
    assert_code(&s, Code::InvalidArgument, "mask naming status");
    assert!(
        s.message().contains("EnableConsumerKey") && s.message().contains("DisableConsumerKey"),
        "the refusal should name the RPCs to use: {}",
        s.message()
    );
    assert_field_violation(&s, "update_mask", "mask naming status");

    // Refused as a whole: the description in the same mask is not applied either.
    let s = admin
        .update_consumer_key(update_ck(&["description", "status"]))
        .await
        .unwrap_err();
    assert_code(
        &s,
        Code::InvalidArgument,
        "mask naming description and status",
    );
    let k = get_consumer_key(&mut admin, "ck").await.unwrap();
    assert_eq!(
        (k.description.as_str(), k.status),
        ("", KeyStatus::Enabled as i32)
    );

    let s = admin
        .update_consumer_key(update_ck(&["id"]))
        .await
        .unwrap_err();
    assert_code(&s, Code::InvalidArgument, "mask naming id");
    assert!(s.message().contains("id"), "{}", s.message());
    assert!(
        s.message().to_lowercase().contains("output only"),
        "{}",
        s.message()
    );

    for path in ["masked_value", "generation_method", "value"] {
        let s = admin
            .update_consumer_key(update_ck(&[path]))
            .await
            .unwrap_err();
        assert_field_violation(
            &s,
            "update_mask",
            &format!("mask naming {path}: a value is never editable"),
        );
    }

    let s = admin
        .update_consumer_key(update_ck(&["consumer"]))
        .await
        .unwrap_err();
    assert_code(&s, Code::InvalidArgument, "mask naming consumer");
    assert!(s.message().contains("BindConsumerKey"), "{}", s.message());

    let update_mk = |paths: &[&str]| pb::UpdateModelKeyRequest {
        selector: by_name!(update_model_key_request, "mk"),
        model_key: Some(pb::ModelKey::default()),
        update_mask: mask(paths),
    };
    let s = admin
        .update_model_key(update_mk(&["status"]))
        .await
        .unwrap_err();
    assert_code(&s, Code::InvalidArgument, "model key mask naming status");
    assert!(
        s.message().contains("EnableModelKey") && s.message().contains("DisableModelKey"),
        "{}",
        s.message()
    );
    let s = admin
        .update_model_key(update_mk(&["model_services"]))
        .await
        .unwrap_err();
    assert_code(
        &s,
        Code::InvalidArgument,
        "model key mask naming model_services",
    );
    assert!(s.message().contains("BindModelKey"), "{}", s.message());
    let s = admin
        .update_model_key(update_mk(&["id"]))
        .await
        .unwrap_err();
    assert_code(&s, Code::InvalidArgument, "model key mask naming id");

    let app = create_consumer(&mut admin, "app").await;
    let s = admin
        .update_consumer(pb::UpdateConsumerRequest {
            selector: by_name!(update_consumer_request, "app"),
            consumer: Some(pb::Consumer {
                id: "forged-id".into(),
                ..Default::default()
            }),
            update_mask: mask(&["id"]),
        })
        .await
        .unwrap_err();
    assert_field_violation(&s, "update_mask", "consumer mask naming id");
    assert_eq!(get_consumer(&mut admin, "app").await.unwrap().id, app.id);
    let s = admin
        .update_consumer(pb::UpdateConsumerRequest {
            selector: by_name!(update_consumer_request, "app"),
            consumer: Some(pb::Consumer::default()),
            update_mask: mask(&["consumer_keys"]),
        })
        .await
        .unwrap_err();
    assert_code(
        &s,
        Code::InvalidArgument,
        "consumer mask naming consumer_keys",
    );
    assert!(s.message().contains("BindConsumerKey"), "{}", s.message());

    // Without a mask, a status set in the resource is refused too (not silently ignored).
    let s = admin
        .update_consumer_key(pb::UpdateConsumerKeyRequest {
            selector: by_name!(update_consumer_key_request, "ck"),
            consumer_key: Some(pb::ConsumerKey {
                status: KeyStatus::Disabled as i32,
                ..Default::default()
            }),
            update_mask: None,
        })
        .await
        .unwrap_err();
    assert_code(&s, Code::InvalidArgument, "status set without a mask");
    assert!(
        s.message().contains("DisableConsumerKey"),
        "{}",
        s.message()
    );
    assert_eq!(
        get_consumer_key(&mut admin, "ck").await.unwrap().status,
        KeyStatus::Enabled as i32
    );
}

#[tokio::test]
async fn an_omitted_update_mask_updates_exactly_the_fields_set() {
    let kg = Keygate::start().await;
    let mut admin = kg.admin().await;
    admin
        .create_consumer_key(pb::CreateConsumerKeyRequest {
            name: "ck".into(),
            description: "original".into(),
            generation_method: GenerationMethod::Auto as i32,
            ip_allowlist: vec!["10.0.0.0/8".into()],
            ..Default::default()
        })
        .await
        .unwrap();

    let k = admin
        .update_consumer_key(pb::UpdateConsumerKeyRequest {
            selector: by_name!(update_consumer_key_request, "ck"),
            consumer_key: Some(pb::ConsumerKey {
                description: "new description".into(),
                ..Default::default()
            }),
            update_mask: None,
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(k.name, "ck");
    assert_eq!(k.description, "new description");
    assert_eq!(k.ip_allowlist, ["10.0.0.0/8"]);

    let k = admin
        .update_consumer_key(pb::UpdateConsumerKeyRequest {
            selector: by_name!(update_consumer_key_request, "ck"),
            consumer_key: Some(pb::ConsumerKey {
                ip_allowlist: vec!["192.168.1.7".into(), "2001:db8::/32".into()],
                ..Default::default()
            }),
            update_mask: None,
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(k.description, "new description");
    assert_eq!(k.ip_allowlist, ["192.168.1.7", "2001:db8::/32"]);

    admin
        .create_model_service(pb::CreateModelServiceRequest {
            name: "anthropic".into(),
            provider: "anthropic".into(),
            auth_header: "x-api-key".into(),
            auth_value_template: "{key}".into(),
            ..Default::default()
        })
        .await
        .unwrap();
    let s = admin
        .update_model_service(pb::UpdateModelServiceRequest {
            selector: by_name!(update_model_service_request, "anthropic"),
            model_service: Some(pb::ModelService {
                description: "Claude".into(),
                ..Default::default()
            }),
            update_mask: None,
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(s.description, "Claude");
    assert_eq!(s.provider, "anthropic");
    assert_eq!(s.auth_header, "x-api-key");
    assert_eq!(s.auth_value_template, "{key}");

    // Persisted, not just echoed.
    let got = get_consumer_key(&mut admin, "ck").await.unwrap();
    assert_eq!(got.description, "new description");
    assert_eq!(
        get_service(&mut admin, "anthropic")
            .await
            .unwrap()
            .description,
        "Claude"
    );
}

// ---------------------------------------------------------------------------- secrecy

#[tokio::test]
async fn a_consumer_key_value_is_shown_only_in_the_create_response() {
    let kg = Keygate::start().await;
    let mut admin = kg.admin().await;
    create_consumer(&mut admin, "app").await;
    let created = create_auto_key(&mut admin, "auto-key", "app").await;
    let value = created.value.clone();
    assert!(value.starts_with("kg-"), "AUTO keys carry the kg- prefix");
    assert!(
        value.len() >= 43,
        "AUTO keys carry at least 256 bits: {} chars",
        value.len()
    );
    assert!(
        value.bytes().all(|b| (0x21..=0x7e).contains(&b)),
        "visible ASCII only"
    );
    let key = created.key.unwrap();
    assert_eq!(key.masked_value, mask_of(&value));
    assert_eq!(key.generation_method, GenerationMethod::Auto as i32);
    assert_eq!(key.status, KeyStatus::Enabled as i32);

    // Two AUTO keys never share a value.
    let other = create_auto_key(&mut admin, "auto-key-2", "").await.value;
    assert_ne!(other, value);

    let custom_value = "custom-consumer-key-value-0123456789";
    let c = create_custom_key(&mut admin, "custom-key", custom_value, "").await;
    assert_eq!(c.key.unwrap().masked_value, mask_of(custom_value));

    // Get and List show the mask and never the value, anywhere in the message.
    let got = get_consumer_key(&mut admin, "auto-key").await.unwrap();
    assert_eq!(got.masked_value, mask_of(&value));
    let listed = admin
        .list_consumer_keys(pb::ListConsumerKeysRequest::default())
        .await
        .unwrap()
        .into_inner();
    assert_eq!(listed.items.len(), 3);
    let bytes = [got.encode_to_vec(), listed.encode_to_vec()].concat();
    for secret in [value.as_str(), other.as_str(), custom_value] {
        assert!(
            !contains_bytes(&bytes, secret.as_bytes()),
            "a value leaked through Get/List"
        );
    }
    let custom_listed = listed
        .items
        .iter()
        .find(|k| k.name == "custom-key")
        .unwrap();
    assert_eq!(custom_listed.masked_value, mask_of(custom_value));

    // The consumer's view and the references carry no value either.
    let consumer = get_consumer(&mut admin, "app").await.unwrap();
    let refs = references(&mut admin, ResourceKind::ConsumerKey, "auto-key").await;
    let bytes = [consumer.encode_to_vec(), refs.encode_to_vec()].concat();
    assert!(!contains_bytes(&bytes, value.as_bytes()));
}

#[tokio::test]
async fn a_model_key_value_is_never_returned_only_its_mask() {
    let kg = Keygate::start().await;
    let mut admin = kg.admin().await;
    create_service(&mut admin, "openai").await;
    let value = "sk-proj-vendor-secret-0123456789abcdef";
    let created = create_model_key(&mut admin, "mk", value, &["openai"]).await;
    assert_eq!(created.masked_value, mask_of(value));
    assert_eq!(created.generation_method, GenerationMethod::Custom as i32);

    let got = get_model_key(&mut admin, "mk").await.unwrap();
    let listed = admin
        .list_model_keys(pb::ListModelKeysRequest::default())
        .await
        .unwrap()
        .into_inner();
    let service = get_service(&mut admin, "openai").await.unwrap();
    assert_eq!(got.masked_value, mask_of(value));
    let bytes = [
        created.encode_to_vec(),
        got.encode_to_vec(),
        listed.encode_to_vec(),
        service.encode_to_vec(),
    ]
    .concat();
    assert!(
        !contains_bytes(&bytes, value.as_bytes()),
        "a model key value leaked through the API"
    );

    let short = create_model_key(&mut admin, "mk-short", "sk-0123456789abcd", &[]).await;
    assert_eq!(
        short.masked_value, "***",
        "values under 20 characters show *** alone"
    );
}

#[tokio::test]
async fn no_plaintext_key_value_reaches_disk_or_logs() {
    let mut kg = Keygate::start().await;
    let token = kg.admin_token();
    let mut admin = kg.admin().await;
    create_consumer(&mut admin, "app").await;
    create_service(&mut admin, "openai").await;
    let auto_value = create_auto_key(&mut admin, "auto-key", "app").await.value;
    let custom_value = "custom-consumer-secret-0123456789-xyz";
    create_custom_key(&mut admin, "custom-key", custom_value, "app").await;
    let model_value = "sk-vendor-model-secret-9876543210-abc";
    create_model_key(&mut admin, "vendor-key", model_value, &["openai"]).await;

    // Exercise reads, a refused duplicate value (an error path) and an update.
    let dup = admin
        .create_consumer_key(pb::CreateConsumerKeyRequest {
            name: "dup-key".into(),
            generation_method: GenerationMethod::Custom as i32,
            value: custom_value.into(),
            ..Default::default()
        })
        .await
        .unwrap_err();
    assert_field_violation(&dup, "value", "duplicate value");
    get_consumer_key(&mut admin, "auto-key").await.unwrap();
    get_model_key(&mut admin, "vendor-key").await.unwrap();
    admin
        .list_consumer_keys(pb::ListConsumerKeysRequest::default())
        .await
        .unwrap();
    admin
        .list_model_keys(pb::ListModelKeysRequest::default())
        .await
        .unwrap();
    disable_consumer_key(&mut admin, "custom-key")
        .await
        .unwrap();
    // The data plane has the decrypted model key in its snapshot by now.
    let snap = settled_snapshot(&admin).await;
    assert_eq!((snap.consumer_keys, snap.model_keys), (2, 1));

    let secrets = [
        ("AUTO consumer key", auto_value.as_str()),
        ("CUSTOM consumer key", custom_value),
        ("CUSTOM model key", model_value),
    ];
    let data_dir = kg.data_dir.clone();
    if std::env::var("KEYGATE_TEST_STORE").as_deref() == Ok("postgres") {
        // The store is a PostgreSQL database: every row of every table, as text.
        let dump = postgres_dump(&common::postgres_for(&data_dir).await).await;
        assert!(dump.contains("consumer_keys"), "the dump covers the store");
        for (what, secret) in secrets {
            assert!(
                !dump.contains(secret),
                "the {what} value is stored in plaintext"
            );
            assert!(
                !dump.contains(&hex::encode(secret)),
                "the {what} value is stored as plaintext bytes"
            );
        }
    }
    let check_disk = |when: &str| {
        let files = all_file_bytes(&data_dir);
        if std::env::var("KEYGATE_TEST_STORE").as_deref() == Ok("postgres") {
            for (path, bytes) in &files {
                for (what, secret) in secrets {
                    assert!(
                        !contains_bytes(bytes, secret.as_bytes()),
                        "{when}: {what} in {}",
                        path.display()
                    );
                }
            }
            return;
        }
        assert!(
            files
                .iter()
                .any(|(p, _)| p.to_string_lossy().ends_with(".db")),
            "{when}: expected the SQLite store in the data dir, found {:?}",
            files.iter().map(|(p, _)| p).collect::<Vec<_>>()
        );
        for (path, bytes) in &files {
            for (what, secret) in secrets {
                assert!(
                    !contains_bytes(bytes, secret.as_bytes()),
                    "{when}: the {what} value is stored in plaintext in {}",
                    path.display()
                );
            }
        }
    };
    check_disk("while running (with -wal/-shm)");

    let logs = kg.logs();
    assert!(
        logs.contains("admin change committed"),
        "the mutations should be logged at all"
    );
    for (what, secret) in secrets {
        assert!(
            !logs.contains(secret),
            "the {what} value appears in the logs"
        );
    }
    assert!(
        !logs.contains(&token),
        "the admin token appears in the logs"
    );

    kg.stop();
    check_disk("after shutdown");
    let logs = kg.logs();
    for (what, secret) in secrets {
        assert!(
            !logs.contains(secret),
            "the {what} value appears in the logs"
        );
    }
    assert!(
        !logs.contains(&token),
        "the admin token appears in the logs"
    );
}

// ---------------------------------------------------------------------------- persistence

#[tokio::test]
async fn a_restart_on_the_same_data_dir_keeps_every_resource_and_the_key_pepper() {
    let mut kg = Keygate::start().await;
    let mut admin = kg.admin().await;
    let consumer = create_consumer(&mut admin, "app").await;
    let service = create_service(&mut admin, "openai").await;
    let auto = create_auto_key(&mut admin, "auto-key", "app").await;
    let auto_value = auto.value.clone();
    let auto_key = auto.key.unwrap();
    let custom = create_custom_key(
        &mut admin,
        "custom-key",
        "custom-consumer-value-0123456789",
        "",
    )
    .await;
    let model = create_model_key(
        &mut admin,
        "vendor-key",
        "sk-vendor-secret-0123456789abc",
        &["openai"],
    )
    .await;
    disable_consumer_key(&mut admin, "custom-key")
        .await
        .unwrap();
    let before = settled_snapshot(&admin).await;
    assert_eq!(
        (
            before.consumer_keys,
            before.model_keys,
            before.model_services
        ),
        (2, 1, 1)
    );

    assert_eq!(kg.stop(), Some(0), "a clean shutdown on SIGTERM");
    let _tmp = kg.take_tempdir();
    let data_dir = kg.data_dir.clone();
    drop(kg);
    let kg = Keygate::start_with(Options {
        data_dir: Some(data_dir),
        ..Default::default()
    })
    .await;
    let mut admin = kg.admin().await;

    // Every resource is back, with the same ids, relations and status.
    let c = get_consumer(&mut admin, "app").await.unwrap();
    assert_eq!(c.id, consumer.id);
    assert_eq!(c.consumer_keys, ["auto-key"]);
    let s = get_service(&mut admin, "openai").await.unwrap();
    assert_eq!(s.id, service.id);
    assert_eq!(s.model_keys, ["vendor-key"]);
    let k = get_consumer_key(&mut admin, "auto-key").await.unwrap();
    assert_eq!(k.id, auto_key.id);
    assert_eq!(k.masked_value, auto_key.masked_value);
    assert_eq!(
        (k.consumer.as_str(), k.status),
        ("app", KeyStatus::Enabled as i32)
    );
    let ck = get_consumer_key(&mut admin, "custom-key").await.unwrap();
    assert_eq!(ck.id, custom.key.unwrap().id);
    assert_eq!(ck.status, KeyStatus::Disabled as i32);
    let m = get_model_key(&mut admin, "vendor-key").await.unwrap();
    assert_eq!(
        (m.id.as_str(), m.masked_value.as_str()),
        (model.id.as_str(), model.masked_value.as_str())
    );
    assert_eq!(m.model_services, ["openai"]);

    // The snapshot rebuilt from the store reports the same counts.
    let after = settled_snapshot(&admin).await;
    assert_eq!(
        (after.consumer_keys, after.model_keys, after.model_services),
        (
            before.consumer_keys,
            before.model_keys,
            before.model_services
        )
    );
    assert_eq!(after.store_id, before.store_id);
    assert!(after.version >= before.version);

    // The AUTO value still hashes to the stored key: reusing it as a CUSTOM value is refused.
    let s = admin
        .create_consumer_key(pb::CreateConsumerKeyRequest {
            name: "copycat".into(),
            generation_method: GenerationMethod::Custom as i32,
            value: auto_value.clone(),
            ..Default::default()
        })
        .await
        .unwrap_err();
    let why = assert_field_violation(
        &s,
        "value",
        "CUSTOM key reusing the AUTO value after restart",
    );
    assert!(why.contains("already in use"), "{why}");
    assert!(
        !s.message().contains("auto-key"),
        "the refusal must not say which key holds the value"
    );
    assert_code(
        &get_consumer_key(&mut admin, "copycat").await.unwrap_err(),
        Code::NotFound,
        "nothing created",
    );

    // A fresh value is accepted: the refusal above is about the value, not the request.
    let fresh =
        create_custom_key(&mut admin, "copycat", "a-fresh-custom-value-0123456789", "").await;
    assert_eq!(fresh.key.unwrap().name, "copycat");
}

// ---------------------------------------------------------------------------- authentication

#[tokio::test]
async fn keyadmin_requires_the_admin_token_but_health_is_open() {
    let kg = Keygate::start().await;

    let mut anonymous = kg.admin_with_token(None).await;
    let s = anonymous
        .list_consumers(pb::ListConsumersRequest::default())
        .await
        .unwrap_err();
    assert_code(&s, Code::Unauthenticated, "no admin token");
    let s = anonymous
        .create_consumer(pb::CreateConsumerRequest {
            name: "sneaky".into(),
            ..Default::default()
        })
        .await
        .unwrap_err();
    assert_code(&s, Code::Unauthenticated, "no admin token on a mutation");

    let mut wrong = kg
        .admin_with_token(Some("kgadm-not-the-right-token-0123456789".into()))
        .await;
    let s = wrong
        .create_consumer(pb::CreateConsumerRequest {
            name: "sneaky".into(),
            ..Default::default()
        })
        .await
        .unwrap_err();
    assert_code(&s, Code::Unauthenticated, "wrong admin token");
    let s = wrong
        .get_snapshot_status(pb::GetSnapshotStatusRequest {})
        .await
        .unwrap_err();
    assert_code(&s, Code::Unauthenticated, "wrong admin token on a read");
    // A prefix of the right token is still wrong.
    let token = kg.admin_token();
    let mut prefix = kg
        .admin_with_token(Some(token[..token.len() - 1].to_string()))
        .await;
    let s = prefix
        .list_consumers(pb::ListConsumersRequest::default())
        .await
        .unwrap_err();
    assert_code(&s, Code::Unauthenticated, "a truncated admin token");

    // Nothing happened under the refused calls.
    let mut admin = kg.admin().await;
    assert_code(
        &get_consumer(&mut admin, "sneaky").await.unwrap_err(),
        Code::NotFound,
        "no consumer created",
    );

    // Health on the admin port answers without a token.
    use tonic_health::pb::HealthCheckRequest;
    use tonic_health::pb::health_check_response::ServingStatus;
    use tonic_health::pb::health_client::HealthClient;
    let channel = tonic::transport::Channel::from_shared(format!("http://{}", kg.admin_addr))
        .unwrap()
        .connect()
        .await
        .unwrap();
    let mut health = HealthClient::new(channel);
    for service in ["", "keygate.admin.v1.KeyAdmin"] {
        let r = health
            .check(HealthCheckRequest {
                service: service.into(),
            })
            .await
            .unwrap_or_else(|e| panic!("health {service:?} without a token: {e:?}"))
            .into_inner();
        assert_eq!(
            r.status,
            ServingStatus::Serving as i32,
            "health {service:?}"
        );
    }
}

// ---------------------------------------------------------------------------- listings

#[tokio::test]
async fn list_consumers_pages_through_every_consumer_exactly_once() {
    let kg = Keygate::start().await;
    let mut admin = kg.admin().await;
    let names = ["echo", "alpha", "delta", "charlie", "bravo"];
    for n in names {
        create_consumer(&mut admin, n).await;
    }
    let mut seen = Vec::new();
    let mut token = String::new();
    let mut pages = 0;
    loop {
        pages += 1;
        assert!(pages <= 5, "paging does not terminate");
        let page = admin
            .list_consumers(pb::ListConsumersRequest {
                page_size: 2,
                page_token: token.clone(),
            })
            .await
            .unwrap()
            .into_inner();
        assert!(page.items.len() <= 2, "page_size is respected");
        seen.extend(page.items.into_iter().map(|c| c.name));
        if page.next_page_token.is_empty() {
            break;
        }
        token = page.next_page_token;
    }
    assert_eq!(pages, 3);
    let mut sorted = seen.clone();
    sorted.sort();
    sorted.dedup();
    assert_eq!(sorted.len(), seen.len(), "no consumer twice: {seen:?}");
    let mut expected: Vec<_> = names.iter().map(|s| s.to_string()).collect();
    expected.sort();
    assert_eq!(sorted, expected);

    let s = admin
        .list_consumers(pb::ListConsumersRequest {
            page_size: -1,
            ..Default::default()
        })
        .await
        .unwrap_err();
    assert_field_violation(&s, "page_size", "negative page size");
}

#[tokio::test]
async fn list_consumer_keys_filters_by_consumer_and_status() {
    let kg = Keygate::start().await;
    let mut admin = kg.admin().await;
    let a = create_consumer(&mut admin, "app-a").await;
    create_consumer(&mut admin, "app-b").await;
    create_auto_key(&mut admin, "a1", "app-a").await;
    create_auto_key(&mut admin, "a2", "app-a").await;
    create_auto_key(&mut admin, "b1", "app-b").await;
    create_auto_key(&mut admin, "loose", "").await;
    disable_consumer_key(&mut admin, "a2").await.unwrap();
    disable_consumer_key(&mut admin, "loose").await.unwrap();

    let set = |v: &[&str]| v.iter().map(|s| s.to_string()).collect::<BTreeSet<_>>();
    use KeyStatus::{Disabled, Enabled, Unspecified};
    assert_eq!(
        list_consumer_key_names(&mut admin, "", Unspecified).await,
        set(&["a1", "a2", "b1", "loose"])
    );
    assert_eq!(
        list_consumer_key_names(&mut admin, "app-a", Unspecified).await,
        set(&["a1", "a2"])
    );
    assert_eq!(
        list_consumer_key_names(&mut admin, &a.id, Unspecified).await,
        set(&["a1", "a2"])
    );
    assert_eq!(
        list_consumer_key_names(&mut admin, "app-b", Unspecified).await,
        set(&["b1"])
    );
    assert_eq!(
        list_consumer_key_names(&mut admin, "", Enabled).await,
        set(&["a1", "b1"])
    );
    assert_eq!(
        list_consumer_key_names(&mut admin, "", Disabled).await,
        set(&["a2", "loose"])
    );
    assert_eq!(
        list_consumer_key_names(&mut admin, "app-a", Disabled).await,
        set(&["a2"])
    );
    assert_eq!(
        list_consumer_key_names(&mut admin, "app-b", Disabled).await,
        set(&[])
    );

    let listed = admin
        .list_consumer_keys(pb::ListConsumerKeysRequest {
            consumer: "app-a".into(),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    assert!(
        listed
            .items
            .iter()
            .all(|k| k.consumer == "app-a" && k.consumer_id == a.id)
    );
}

#[tokio::test]
async fn get_key_references_counts_what_references_each_resource() {
    let kg = Keygate::start().await;
    let mut admin = kg.admin().await;
    create_consumer(&mut admin, "app").await;
    create_service(&mut admin, "openai").await;
    create_service(&mut admin, "azure").await;
    create_auto_key(&mut admin, "bound-key", "app").await;
    create_auto_key(&mut admin, "loose-key", "").await;
    admin
        .create_consumer_key(pb::CreateConsumerKeyRequest {
            name: "scoped-key".into(),
            generation_method: GenerationMethod::Auto as i32,
            consumer: "app".into(),
            scope: Some(pb::Scope {
                all: false,
                model_services: vec!["openai".into()],
                ..Default::default()
            }),
            ..Default::default()
        })
        .await
        .unwrap();
    create_model_key(
        &mut admin,
        "vendor-key",
        "sk-vendor-secret-0123456789abc",
        &["openai", "azure"],
    )
    .await;

    let pairs = |r: &pb::GetKeyReferencesResponse| {
        r.references
            .iter()
            .map(|x| (ResourceKind::try_from(x.kind).unwrap(), x.name.clone()))
            .collect::<BTreeSet<_>>()
    };

    let r = references(&mut admin, ResourceKind::ConsumerKey, "bound-key").await;
    assert_eq!(r.count, 1);
    assert_eq!(
        pairs(&r),
        BTreeSet::from([(ResourceKind::Consumer, "app".to_string())])
    );
    assert!(
        r.references.iter().all(|x| !x.id.is_empty()),
        "references carry ids"
    );

    let r = references(&mut admin, ResourceKind::ConsumerKey, "loose-key").await;
    assert_eq!((r.count, r.references.len()), (0, 0));

    let r = references(&mut admin, ResourceKind::ModelKey, "vendor-key").await;
    assert_eq!(r.count, 2);
    assert_eq!(
        pairs(&r),
        BTreeSet::from([
            (ResourceKind::ModelService, "azure".to_string()),
            (ResourceKind::ModelService, "openai".to_string()),
        ])
    );

    let r = references(&mut admin, ResourceKind::Consumer, "app").await;
    assert_eq!(r.count, 2);
    assert_eq!(
        pairs(&r),
        BTreeSet::from([
            (ResourceKind::ConsumerKey, "bound-key".to_string()),
            (ResourceKind::ConsumerKey, "scoped-key".to_string()),
        ])
    );

    let r = references(&mut admin, ResourceKind::ModelService, "openai").await;
    assert_eq!(r.count, 2);
    assert_eq!(
        pairs(&r),
        BTreeSet::from([
            (ResourceKind::ModelKey, "vendor-key".to_string()),
            (ResourceKind::ConsumerKey, "scoped-key".to_string()),
        ])
    );
    assert_eq!(r.count as usize, r.references.len());

    let s = admin
        .get_key_references(pb::GetKeyReferencesRequest {
            kind: ResourceKind::ModelKey as i32,
            selector: by_name!(get_key_references_request, "ghost"),
        })
        .await
        .unwrap_err();
    assert_code(&s, Code::NotFound, "references of an unknown key");
}

#[tokio::test]
async fn audit_events_list_newest_first_with_rpc_names_and_no_secrets() {
    let kg = Keygate::start().await;
    let token = kg.admin_token();
    let mut admin = kg.admin().await;
    create_consumer(&mut admin, "app").await;
    let custom_value = "audited-custom-value-0123456789";
    create_custom_key(&mut admin, "audited-key", custom_value, "app").await;
    let auto_value = create_auto_key(&mut admin, "auto-key", "").await.value;
    let model_value = "sk-audited-model-value-0123456789";
    create_model_key(&mut admin, "vendor-key", model_value, &[]).await;
    disable_consumer_key(&mut admin, "audited-key")
        .await
        .unwrap();

    let all = admin
        .list_audit_events(pb::ListAuditEventsRequest::default())
        .await
        .unwrap()
        .into_inner();
    let actions: Vec<_> = all.items.iter().map(|e| e.action.as_str()).collect();
    assert_eq!(
        actions,
        [
            "DisableConsumerKey",
            "CreateModelKey",
            "CreateConsumerKey",
            "CreateConsumerKey",
            "CreateConsumer"
        ]
    );
    let newest = &all.items[0];
    assert_eq!(newest.resource_name, "audited-key");
    assert_eq!(newest.kind, ResourceKind::ConsumerKey as i32);
    assert!(!newest.resource_id.is_empty());
    assert_eq!(newest.changed_fields, ["status"]);
    for pair in all.items.windows(2) {
        let (a, b) = (pair[0].time.unwrap(), pair[1].time.unwrap());
        assert!((a.seconds, a.nanos) >= (b.seconds, b.nanos), "newest first");
        assert!(pair[0].revision > pair[1].revision, "newest first");
    }
    for e in &all.items {
        assert!(!e.actor.is_empty(), "every event names an actor");
        assert_ne!(e.actor, token);
        assert!(
            !e.actor.contains(&token),
            "the actor must not be the token: {}",
            e.actor
        );
        assert_eq!(e.actor, newest.actor, "one credential, one actor");
    }
    let bytes = all.encode_to_vec();
    for secret in [
        custom_value,
        auto_value.as_str(),
        model_value,
        token.as_str(),
    ] {
        assert!(
            !contains_bytes(&bytes, secret.as_bytes()),
            "a secret appears in the audit trail"
        );
    }

    // Filters: kind and name.
    let by_key = admin
        .list_audit_events(pb::ListAuditEventsRequest {
            kind: ResourceKind::ConsumerKey as i32,
            name: "audited-key".into(),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    let actions: Vec<_> = by_key.items.iter().map(|e| e.action.as_str()).collect();
    assert_eq!(actions, ["DisableConsumerKey", "CreateConsumerKey"]);

    let consumers_only = admin
        .list_audit_events(pb::ListAuditEventsRequest {
            kind: ResourceKind::Consumer as i32,
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(consumers_only.items.len(), 1);
    assert_eq!(consumers_only.items[0].action, "CreateConsumer");

    // Paging walks the trail newest first without repeats.
    let mut token_page = String::new();
    let mut walked = Vec::new();
    for _ in 0..10 {
        let p = admin
            .list_audit_events(pb::ListAuditEventsRequest {
                page_size: 2,
                page_token: token_page.clone(),
                ..Default::default()
            })
            .await
            .unwrap()
            .into_inner();
        walked.extend(p.items.into_iter().map(|e| e.revision));
        if p.next_page_token.is_empty() {
            break;
        }
        token_page = p.next_page_token;
    }
    assert_eq!(
        walked,
        all.items.iter().map(|e| e.revision).collect::<Vec<_>>()
    );
}

/// Every row of every table of a PostgreSQL store, as JSON text (bytea as hex).
async fn postgres_dump(url: &str) -> String {
    use sqlx::Connection;
    let mut c = sqlx::PgConnection::connect(url).await.unwrap();
    let tables: Vec<String> = sqlx::query_scalar(
        "SELECT table_name::text FROM information_schema.tables WHERE table_schema = 'public'",
    )
    .fetch_all(&mut c)
    .await
    .unwrap();
    let mut out = String::new();
    for t in tables {
        let rows: Vec<String> =
            sqlx::query_scalar(&format!("SELECT row_to_json(t)::text FROM {t} t"))
                .fetch_all(&mut c)
                .await
                .unwrap();
        out.push_str(&t);
        out.push('\n');
        for r in rows {
            out.push_str(&r);
            out.push('\n');
        }
    }
    out
}

/// SPEC §5: the data dir is created mode 0700; the master key, admin token and store are
/// owner-only files.
#[cfg(unix)]
#[tokio::test]
async fn the_data_dir_and_its_files_are_owner_only() {
    use std::os::unix::fs::PermissionsExt;
    let kg = Keygate::start().await;
    let mode = |p: &std::path::Path| std::fs::metadata(p).unwrap().permissions().mode() & 0o777;
    assert_eq!(mode(&kg.data_dir), 0o700);
    for f in ["master.key", "admin.token"] {
        assert_eq!(mode(&kg.data_dir.join(f)), 0o600, "{f}");
    }
    if std::env::var("KEYGATE_TEST_STORE").as_deref() != Ok("postgres") {
        assert_eq!(mode(&kg.data_dir.join("keygate.db")), 0o600, "keygate.db");
    }
    // The log names the paths, never the values.
    let logs = kg.logs();
    assert!(logs.contains("master.key") && logs.contains("admin.token"));
    assert!(!logs.contains(&kg.admin_token()));
}

// ---------------------------------------------------------------------------- model-level scope

/// A list scope: `model_services` names and `"<service>/<pattern>"` model entries.
fn scope_of(services: &[&str], models: &[&str]) -> Option<pb::Scope> {
    Some(pb::Scope {
        all: false,
        model_services: services.iter().map(|s| s.to_string()).collect(),
        models: models.iter().map(|s| s.to_string()).collect(),
    })
}

/// A scope's two lists, as a response shows them.
fn lists(scope: &Option<pb::Scope>) -> (Vec<String>, Vec<String>) {
    let s = scope.as_ref().expect("a list scope is shown");
    assert!(!s.all, "a list scope is not all: {s:?}");
    (s.model_services.clone(), s.models.clone())
}

fn strings(v: &[&str]) -> Vec<String> {
    v.iter().map(|s| s.to_string()).collect()
}

async fn update_consumer_scope(
    admin: &mut Admin,
    name: &str,
    scope: Option<pb::Scope>,
    paths: &[&str],
) -> Result<pb::Consumer, Status> {
    admin
        .update_consumer(pb::UpdateConsumerRequest {
            selector: by_name!(update_consumer_request, name),
            consumer: Some(pb::Consumer {
                scope,
                ..Default::default()
            }),
            update_mask: mask(paths),
        })
        .await
        .map(|r| r.into_inner())
}

async fn update_key_scope(
    admin: &mut Admin,
    name: &str,
    scope: Option<pb::Scope>,
    paths: &[&str],
) -> Result<pb::ConsumerKey, Status> {
    admin
        .update_consumer_key(pb::UpdateConsumerKeyRequest {
            selector: by_name!(update_consumer_key_request, name),
            consumer_key: Some(pb::ConsumerKey {
                scope,
                ..Default::default()
            }),
            update_mask: mask(paths),
        })
        .await
        .map(|r| r.into_inner())
}

/// The changed fields of the newest audit event of the resource `name` of `kind`.
async fn last_changed_fields(admin: &mut Admin, kind: ResourceKind, name: &str) -> Vec<String> {
    admin
        .list_audit_events(pb::ListAuditEventsRequest {
            kind: kind as i32,
            name: name.into(),
            page_size: 1,
            ..Default::default()
        })
        .await
        .expect("ListAuditEvents")
        .into_inner()
        .items
        .first()
        .unwrap_or_else(|| panic!("no audit event for {name}"))
        .changed_fields
        .clone()
}

#[tokio::test]
async fn model_entries_in_scopes_round_trip_on_consumers_and_keys() {
    let kg = Keygate::start().await;
    let mut admin = kg.admin().await;
    create_service(&mut admin, "openai").await;
    create_service(&mut admin, "anthropic").await;

    // Create: both lists, duplicates collapsed, order kept.
    let c = admin
        .create_consumer(pb::CreateConsumerRequest {
            name: "research".into(),
            scope: scope_of(
                &["openai"],
                &[
                    "anthropic/claude-*",
                    "openai/gpt-4o-mini",
                    "anthropic/claude-*",
                ],
            ),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    let want = (
        strings(&["openai"]),
        strings(&["anthropic/claude-*", "openai/gpt-4o-mini"]),
    );
    assert_eq!(lists(&c.scope), want);
    assert_eq!(
        lists(&get_consumer(&mut admin, "research").await.unwrap().scope),
        want
    );
    let listed = admin
        .list_consumers(pb::ListConsumersRequest::default())
        .await
        .unwrap()
        .into_inner()
        .items;
    assert_eq!(
        lists(&listed[0].scope),
        want,
        "ListConsumers shows them too"
    );
    let fields = last_changed_fields(&mut admin, ResourceKind::Consumer, "research").await;
    assert_eq!(fields, ["name", "description", "scope"]);

    // A key whose scope lists only model entries: a narrowed scope, not an unset one.
    let k = admin
        .create_consumer_key(pb::CreateConsumerKeyRequest {
            name: "mini-only".into(),
            generation_method: GenerationMethod::Auto as i32,
            consumer: "research".into(),
            scope: scope_of(&[], &["openai/gpt-4o-mini"]),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner()
        .key
        .unwrap();
    let want_key = (vec![], strings(&["openai/gpt-4o-mini"]));
    assert_eq!(lists(&k.scope), want_key);
    assert_eq!(
        lists(
            &get_consumer_key(&mut admin, "mini-only")
                .await
                .unwrap()
                .scope
        ),
        want_key
    );
    let listed = admin
        .list_consumer_keys(pb::ListConsumerKeysRequest::default())
        .await
        .unwrap()
        .into_inner()
        .items;
    assert_eq!(lists(&listed[0].scope), want_key);

    // `scope.models` replaces the models, keeping model_services (whatever the resource's
    // model_services say).
    let c = update_consumer_scope(
        &mut admin,
        "research",
        scope_of(&["anthropic"], &["anthropic/claude-sonnet-*"]),
        &["scope.models"],
    )
    .await
    .unwrap();
    assert_eq!(
        lists(&c.scope),
        (
            strings(&["openai"]),
            strings(&["anthropic/claude-sonnet-*"])
        )
    );
    let fields = last_changed_fields(&mut admin, ResourceKind::Consumer, "research").await;
    assert_eq!(fields, ["scope.models"]);

    // `scope.model_services` replaces the services, keeping the models; emptied, only the
    // models remain.
    let c = update_consumer_scope(
        &mut admin,
        "research",
        scope_of(&[], &[]),
        &["scope.model_services"],
    )
    .await
    .unwrap();
    assert_eq!(
        lists(&c.scope),
        (vec![], strings(&["anthropic/claude-sonnet-*"]))
    );
    let fields = last_changed_fields(&mut admin, ResourceKind::Consumer, "research").await;
    assert_eq!(fields, ["scope.model_services"]);

    // Both list paths at once replace both lists.
    let c = update_consumer_scope(
        &mut admin,
        "research",
        scope_of(&["openai"], &["anthropic/claude-*"]),
        &["scope.model_services", "scope.models"],
    )
    .await
    .unwrap();
    assert_eq!(
        lists(&c.scope),
        (strings(&["openai"]), strings(&["anthropic/claude-*"]))
    );
    let fields = last_changed_fields(&mut admin, ResourceKind::Consumer, "research").await;
    assert_eq!(fields, ["scope.model_services", "scope.models"]);

    // `scope` replaces the whole scope, as before.
    let k = update_key_scope(
        &mut admin,
        "mini-only",
        scope_of(&["anthropic"], &[]),
        &["scope"],
    )
    .await
    .unwrap();
    assert_eq!(lists(&k.scope), (strings(&["anthropic"]), vec![]));
    let fields = last_changed_fields(&mut admin, ResourceKind::ConsumerKey, "mini-only").await;
    assert_eq!(fields, ["scope"]);

    // On an `all` scope a list path narrows it to that list.
    update_key_scope(
        &mut admin,
        "mini-only",
        Some(pb::Scope {
            all: true,
            ..Default::default()
        }),
        &["scope"],
    )
    .await
    .unwrap();
    let k = update_key_scope(
        &mut admin,
        "mini-only",
        scope_of(&[], &["openai/o1-*"]),
        &["scope.models"],
    )
    .await
    .unwrap();
    assert_eq!(lists(&k.scope), (vec![], strings(&["openai/o1-*"])));

    // A list path that would leave no list at all is refused (it would read as unset: every
    // service); the scope is untouched.
    let s = update_key_scope(
        &mut admin,
        "mini-only",
        scope_of(&[], &[]),
        &["scope.models"],
    )
    .await
    .unwrap_err();
    assert_code(
        &s,
        Code::FailedPrecondition,
        "a list update that empties the scope",
    );
    assert!(
        s.message().contains("consumer_key.scope"),
        "{}",
        s.message()
    );
    assert!(
        s.message().contains("\"scope\""),
        "names the way: {}",
        s.message()
    );
    assert_eq!(
        lists(
            &get_consumer_key(&mut admin, "mini-only")
                .await
                .unwrap()
                .scope
        ),
        (vec![], strings(&["openai/o1-*"]))
    );

    // `scope` with one of its lists, and `all` through a list path, are refused.
    let s = update_consumer_scope(
        &mut admin,
        "research",
        scope_of(&["openai"], &[]),
        &["scope", "scope.models"],
    )
    .await
    .unwrap_err();
    assert_field_violation(&s, "update_mask", "scope with scope.models");
    let s = update_consumer_scope(
        &mut admin,
        "research",
        Some(pb::Scope {
            all: true,
            ..Default::default()
        }),
        &["scope.model_services"],
    )
    .await
    .unwrap_err();
    assert_field_violation(&s, "consumer.scope.all", "all through a list path");
    assert_eq!(
        lists(&get_consumer(&mut admin, "research").await.unwrap().scope),
        (strings(&["openai"]), strings(&["anthropic/claude-*"])),
        "refused updates change nothing"
    );

    // Unsetting with `scope` clears both lists.
    let c = update_consumer_scope(&mut admin, "research", None, &["scope"])
        .await
        .unwrap();
    assert_eq!(c.scope, None);
}

#[tokio::test]
async fn model_entries_and_model_patterns_are_validated_naming_field_and_rule() {
    let kg = Keygate::start().await;
    let mut admin = kg.admin().await;
    create_service(&mut admin, "openai").await;
    create_consumer(&mut admin, "app").await;

    let long = format!("openai/{}", "m".repeat(129));
    let cases: [(&str, &str); 6] = [
        ("openai/gpt-*-mini", "'*' may only be the last character"),
        ("gpt-4o-mini", "\"<model service>/<model pattern>\""),
        ("openai/", "1 to 128 characters"),
        (&long, "1 to 128 characters (got 129)"),
        ("openai/gpt-4o-ünï", "visible ASCII"),
        ("1openai/gpt-4o", "must not start with a digit"),
    ];
    for (entry, rule) in cases {
        let s = admin
            .create_consumer(pb::CreateConsumerRequest {
                name: "scoped".into(),
                scope: scope_of(&[], &["openai/gpt-4o", entry]),
                ..Default::default()
            })
            .await
            .unwrap_err();
        let why = assert_field_violation(&s, "scope.models[1]", &format!("entry {entry:?}"));
        assert!(
            why.contains(rule),
            "{entry:?}: the rule should be named: {why}"
        );
        let s = update_key_scope_refusal(&mut admin, entry).await;
        let why = assert_field_violation(&s, "consumer_key.scope.models[0]", entry);
        assert!(why.contains(rule), "{entry:?}: {why}");
    }
    // Every broken entry is named at once.
    let s = admin
        .create_consumer(pb::CreateConsumerRequest {
            name: "scoped".into(),
            scope: scope_of(&[], &["openai/a*b", "openai/ok", "openai"]),
            ..Default::default()
        })
        .await
        .unwrap_err();
    let bad = s.get_details_bad_request().unwrap();
    let fields: Vec<_> = bad
        .field_violations
        .iter()
        .map(|v| v.field.as_str())
        .collect();
    assert_eq!(fields, ["scope.models[0]", "scope.models[2]"]);

    // `all` with model entries.
    let s = admin
        .create_consumer(pb::CreateConsumerRequest {
            name: "scoped".into(),
            scope: Some(pb::Scope {
                all: true,
                models: strings(&["openai/gpt-4o"]),
                ..Default::default()
            }),
            ..Default::default()
        })
        .await
        .unwrap_err();
    let why = assert_field_violation(&s, "scope", "all with models");
    assert!(why.contains("all"), "{why}");
    assert_code(
        &get_consumer(&mut admin, "scoped").await.unwrap_err(),
        Code::NotFound,
        "nothing created",
    );

    // A service's models follow the pattern rules; its model_source is BODY, PATH or NONE.
    let s = admin
        .create_model_service(pb::CreateModelServiceRequest {
            name: "azure".into(),
            models: strings(&["gpt-4o", "gpt-*-mini"]),
            ..Default::default()
        })
        .await
        .unwrap_err();
    let why = assert_field_violation(&s, "models[1]", "service model gpt-*-mini");
    assert!(why.contains("'*'"), "{why}");
    let s = admin
        .create_model_service(pb::CreateModelServiceRequest {
            name: "azure".into(),
            model_source: 9,
            ..Default::default()
        })
        .await
        .unwrap_err();
    let why = assert_field_violation(&s, "model_source", "unknown model_source");
    assert!(why.contains("BODY, PATH or NONE"), "{why}");
    assert_code(
        &get_service(&mut admin, "azure").await.unwrap_err(),
        Code::NotFound,
        "nothing created",
    );
    for (field, service) in [
        (
            "model_service.models[0]",
            pb::ModelService {
                models: strings(&["gpt 4o"]),
                ..Default::default()
            },
        ),
        (
            "model_service.model_source",
            pb::ModelService {
                model_source: 7,
                ..Default::default()
            },
        ),
    ] {
        let s = admin
            .update_model_service(pb::UpdateModelServiceRequest {
                selector: by_name!(update_model_service_request, "openai"),
                model_service: Some(service),
                update_mask: mask(&["models", "model_source"]),
            })
            .await
            .unwrap_err();
        assert_field_violation(&s, field, field);
    }
    let openai = get_service(&mut admin, "openai").await.unwrap();
    assert!(openai.models.is_empty());
    assert_eq!(
        openai.model_source,
        pb::model_service::ModelSource::Body as i32
    );
}

/// An update of the key `ck` (created on first use) whose `scope.models` is `[entry]`.
async fn update_key_scope_refusal(admin: &mut Admin, entry: &str) -> Status {
    if get_consumer_key(admin, "ck").await.is_err() {
        create_auto_key(admin, "ck", "").await;
    }
    update_key_scope(admin, "ck", scope_of(&[], &[entry]), &["scope.models"])
        .await
        .unwrap_err()
}

#[tokio::test]
async fn an_unknown_service_in_a_model_entry_is_not_found_and_nothing_is_written() {
    let kg = Keygate::start().await;
    let mut admin = kg.admin().await;
    create_service(&mut admin, "openai").await;
    admin
        .create_consumer(pb::CreateConsumerRequest {
            name: "app".into(),
            scope: scope_of(&["openai"], &["openai/gpt-4o"]),
            ..Default::default()
        })
        .await
        .unwrap();
    create_auto_key(&mut admin, "ck", "").await;
    let revision = latest_revision(&mut admin).await;

    let s = admin
        .create_consumer(pb::CreateConsumerRequest {
            name: "scoped".into(),
            scope: scope_of(&[], &["openai/gpt-4o", "ghost/gpt-4o"]),
            ..Default::default()
        })
        .await
        .unwrap_err();
    assert_code(
        &s,
        Code::NotFound,
        "a model entry naming an unknown service",
    );
    assert!(
        s.message().contains("\"ghost\"") && s.message().contains("scope.models[1]"),
        "names the service and the entry: {}",
        s.message()
    );
    assert_code(
        &get_consumer(&mut admin, "scoped").await.unwrap_err(),
        Code::NotFound,
        "nothing created",
    );

    let s = admin
        .create_consumer_key(pb::CreateConsumerKeyRequest {
            name: "scoped-key".into(),
            generation_method: GenerationMethod::Auto as i32,
            scope: scope_of(&[], &["ghost/claude-*"]),
            ..Default::default()
        })
        .await
        .unwrap_err();
    assert_code(
        &s,
        Code::NotFound,
        "key scope entry naming an unknown service",
    );
    assert!(s.message().contains("ghost"), "{}", s.message());
    assert_code(
        &get_consumer_key(&mut admin, "scoped-key")
            .await
            .unwrap_err(),
        Code::NotFound,
        "nothing created",
    );

    // An update naming the unknown service in a later entry loses nothing already there.
    let s = update_consumer_scope(
        &mut admin,
        "app",
        scope_of(&[], &["openai/o1-*", "ghost/x"]),
        &["scope.models"],
    )
    .await
    .unwrap_err();
    assert_code(&s, Code::NotFound, "update naming an unknown service");
    assert!(
        s.message().contains("consumer.scope.models[1]"),
        "{}",
        s.message()
    );
    let s = update_key_scope(
        &mut admin,
        "ck",
        scope_of(&["openai"], &["ghost/x"]),
        &["scope"],
    )
    .await
    .unwrap_err();
    assert_code(&s, Code::NotFound, "key update naming an unknown service");
    assert_eq!(
        lists(&get_consumer(&mut admin, "app").await.unwrap().scope),
        (strings(&["openai"]), strings(&["openai/gpt-4o"]))
    );
    assert_eq!(
        get_consumer_key(&mut admin, "ck").await.unwrap().scope,
        None
    );
    assert_eq!(
        latest_revision(&mut admin).await,
        revision,
        "a refused request commits nothing and writes no audit event"
    );
}

#[tokio::test]
async fn a_service_named_only_by_model_entries_cannot_be_deleted_and_renames_show_through() {
    let kg = Keygate::start().await;
    let mut admin = kg.admin().await;
    create_service(&mut admin, "anthropic").await;
    create_service(&mut admin, "openai").await;
    admin
        .create_consumer(pb::CreateConsumerRequest {
            name: "research".into(),
            scope: scope_of(&["openai"], &["anthropic/claude-*"]),
            ..Default::default()
        })
        .await
        .unwrap();
    admin
        .create_consumer_key(pb::CreateConsumerKeyRequest {
            name: "sonnet-key".into(),
            generation_method: GenerationMethod::Auto as i32,
            scope: scope_of(&[], &["anthropic/claude-sonnet-4", "anthropic/claude-*"]),
            ..Default::default()
        })
        .await
        .unwrap();

    let s = delete_service(&mut admin, "anthropic").await.unwrap_err();
    assert_code(
        &s,
        Code::FailedPrecondition,
        "delete a service named only by model entries",
    );
    assert_names(s.message(), "consumer", "research");
    assert_names(s.message(), "consumer key", "sonnet-key");
    assert_eq!(
        s.message().matches("sonnet-key").count(),
        1,
        "an owner is listed once however many entries name the service: {}",
        s.message()
    );

    let r = references(&mut admin, ResourceKind::ModelService, "anthropic").await;
    let pairs: BTreeSet<_> = r
        .references
        .iter()
        .map(|x| (ResourceKind::try_from(x.kind).unwrap(), x.name.clone()))
        .collect();
    assert_eq!(
        pairs,
        BTreeSet::from([
            (ResourceKind::Consumer, "research".to_string()),
            (ResourceKind::ConsumerKey, "sonnet-key".to_string()),
        ])
    );
    assert_eq!((r.count, r.references.len()), (2, 2));

    // Entries are stored by service id: a rename shows in every scope that names it.
    admin
        .update_model_service(pb::UpdateModelServiceRequest {
            selector: by_name!(update_model_service_request, "anthropic"),
            model_service: Some(pb::ModelService {
                name: "claude-direct".into(),
                ..Default::default()
            }),
            update_mask: mask(&["name"]),
        })
        .await
        .unwrap();
    assert_eq!(
        lists(&get_consumer(&mut admin, "research").await.unwrap().scope),
        (strings(&["openai"]), strings(&["claude-direct/claude-*"]))
    );
    assert_eq!(
        lists(
            &get_consumer_key(&mut admin, "sonnet-key")
                .await
                .unwrap()
                .scope
        )
        .1,
        strings(&["claude-direct/claude-sonnet-4", "claude-direct/claude-*"])
    );

    // With the entries gone the delete succeeds.
    update_consumer_scope(
        &mut admin,
        "research",
        scope_of(&[], &[]),
        &["scope.models"],
    )
    .await
    .unwrap();
    update_key_scope(&mut admin, "sonnet-key", None, &["scope"])
        .await
        .unwrap();
    delete_service(&mut admin, "claude-direct").await.unwrap();
    assert_eq!(
        lists(&get_consumer(&mut admin, "research").await.unwrap().scope),
        (strings(&["openai"]), vec![])
    );
}

#[tokio::test]
async fn model_source_round_trips_on_model_services() {
    use pb::model_service::ModelSource;
    let kg = Keygate::start().await;
    let mut admin = kg.admin().await;

    // Unspecified is BODY; the response never says unspecified.
    let openai = create_service(&mut admin, "openai").await;
    assert_eq!(openai.model_source, ModelSource::Body as i32);
    let fields = last_changed_fields(&mut admin, ResourceKind::ModelService, "openai").await;
    assert!(
        fields.iter().any(|f| f == "models") && fields.iter().any(|f| f == "model_source"),
        "a create lists its fields: {fields:?}"
    );
    let azure = admin
        .create_model_service(pb::CreateModelServiceRequest {
            name: "azure".into(),
            model_source: ModelSource::Path as i32,
            models: strings(&["gpt-4o", "gpt-4o-mini-*"]),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(azure.model_source, ModelSource::Path as i32);
    assert_eq!(azure.models, ["gpt-4o", "gpt-4o-mini-*"]);
    let got = get_service(&mut admin, "azure").await.unwrap();
    assert_eq!(
        (got.model_source, got.models.clone()),
        (ModelSource::Path as i32, azure.models.clone())
    );
    let listed = admin
        .list_model_services(pb::ListModelServicesRequest::default())
        .await
        .unwrap()
        .into_inner()
        .items;
    let sources: Vec<_> = listed
        .iter()
        .map(|s| (s.name.as_str(), s.model_source))
        .collect();
    assert_eq!(
        sources,
        [
            ("azure", ModelSource::Path as i32),
            ("openai", ModelSource::Body as i32)
        ]
    );

    // With a mask: NONE, then unspecified restores BODY.
    let update = |source: ModelSource, paths: &[&str]| pb::UpdateModelServiceRequest {
        selector: by_name!(update_model_service_request, "azure"),
        model_service: Some(pb::ModelService {
            model_source: source as i32,
            ..Default::default()
        }),
        update_mask: mask(paths),
    };
    let s = admin
        .update_model_service(update(ModelSource::None, &["model_source"]))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(s.model_source, ModelSource::None as i32);
    assert_eq!(s.models, azure.models, "other fields are kept");
    let fields = last_changed_fields(&mut admin, ResourceKind::ModelService, "azure").await;
    assert_eq!(fields, ["model_source"]);
    let s = admin
        .update_model_service(update(ModelSource::Unspecified, &["model_source"]))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(s.model_source, ModelSource::Body as i32);

    // Without a mask a set model_source is updated.
    let s = admin
        .update_model_service(update(ModelSource::Path, &[]))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(s.model_source, ModelSource::Path as i32);

    // Models: the mask path names them in the audit.
    admin
        .update_model_service(pb::UpdateModelServiceRequest {
            selector: by_name!(update_model_service_request, "azure"),
            model_service: Some(pb::ModelService {
                models: strings(&["gpt-4.1"]),
                ..Default::default()
            }),
            update_mask: mask(&["models"]),
        })
        .await
        .unwrap();
    let fields = last_changed_fields(&mut admin, ResourceKind::ModelService, "azure").await;
    assert_eq!(fields, ["models"]);
    let got = get_service(&mut admin, "azure").await.unwrap();
    assert_eq!(
        (got.model_source, got.models),
        (ModelSource::Path as i32, strings(&["gpt-4.1"]))
    );
}
