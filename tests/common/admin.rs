//! Admin API shorthands the suites share: each call panics with the RPC's name on failure.

use std::time::Duration;

use keygate::proto::admin::v1 as pb;

use super::{Admin, poll_until};

/// The store revision of the last commit: the newest audit event's.
pub async fn latest_revision(admin: &mut Admin) -> u64 {
    admin
        .list_audit_events(pb::ListAuditEventsRequest {
            page_size: 1,
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner()
        .items
        .first()
        .expect("an audit event")
        .revision
}

/// Waits (bounded by `limit`) until the control plane's snapshot includes `revision`;
/// answers that snapshot's version. `what` names the wait in the timeout panic.
pub async fn snapshot_reaches(admin: &Admin, revision: u64, limit: Duration, what: &str) -> u64 {
    let admin = admin.clone();
    poll_until(limit, what, || {
        let mut admin = admin.clone();
        async move {
            let v = admin
                .get_snapshot_status(pb::GetSnapshotStatusRequest {})
                .await
                .ok()?
                .into_inner()
                .version;
            (v >= revision).then_some(v)
        }
    })
    .await
}

pub async fn create_service(admin: &mut Admin, name: &str, header: &str, template: &str) {
    admin
        .create_model_service(pb::CreateModelServiceRequest {
            name: name.into(),
            provider: name.into(),
            auth_header: header.into(),
            auth_value_template: template.into(),
            ..Default::default()
        })
        .await
        .unwrap_or_else(|e| panic!("CreateModelService {name}: {e}"));
}

/// A CUSTOM model key bound to `service`.
pub async fn create_model_key(admin: &mut Admin, name: &str, value: &str, service: &str) {
    admin
        .create_model_key(pb::CreateModelKeyRequest {
            name: name.into(),
            generation_method: pb::GenerationMethod::Custom as i32,
            value: value.into(),
            model_services: vec![service.into()],
            ..Default::default()
        })
        .await
        .unwrap_or_else(|e| panic!("CreateModelKey {name}: {e}"));
}

pub async fn create_consumer(admin: &mut Admin, name: &str) {
    admin
        .create_consumer(pb::CreateConsumerRequest {
            name: name.into(),
            ..Default::default()
        })
        .await
        .unwrap_or_else(|e| panic!("CreateConsumer {name}: {e}"));
}

/// Creates a consumer key (AUTO) and returns its value (shown only here).
pub async fn create_consumer_key(admin: &mut Admin, req: pb::CreateConsumerKeyRequest) -> String {
    let name = req.name.clone();
    let value = admin
        .create_consumer_key(pb::CreateConsumerKeyRequest {
            generation_method: pb::GenerationMethod::Auto as i32,
            ..req
        })
        .await
        .unwrap_or_else(|e| panic!("CreateConsumerKey {name}: {e}"))
        .into_inner()
        .value;
    assert!(
        !value.is_empty(),
        "CreateConsumerKey {name} returned no value"
    );
    value
}

/// A consumer key (AUTO) bound to `consumer`; returns its value.
pub async fn create_bound_key(admin: &mut Admin, name: &str, consumer: &str) -> String {
    create_consumer_key(
        admin,
        pb::CreateConsumerKeyRequest {
            name: name.into(),
            consumer: consumer.into(),
            ..Default::default()
        },
    )
    .await
}

pub async fn disable_consumer_key(admin: &mut Admin, name: &str) {
    admin
        .disable_consumer_key(pb::DisableConsumerKeyRequest {
            selector: Some(pb::disable_consumer_key_request::Selector::Name(
                name.into(),
            )),
        })
        .await
        .unwrap_or_else(|e| panic!("DisableConsumerKey {name}: {e}"));
}

pub async fn disable_model_key(admin: &mut Admin, name: &str) {
    admin
        .disable_model_key(pb::DisableModelKeyRequest {
            selector: Some(pb::disable_model_key_request::Selector::Name(name.into())),
        })
        .await
        .unwrap_or_else(|e| panic!("DisableModelKey {name}: {e}"));
}

pub fn bearer(key: &str) -> String {
    format!("Bearer {key}")
}

/// The metering suites' two vendor services, with prices (openai: gpt-4o-mini at 0.15 / 0.60 /
/// 0.075 USD per million input / output / cached input tokens; anthropic: claude-* at 3 / 15 /
/// 0.30), and one CUSTOM model key each (`openai-main`, `anthropic-main`).
pub async fn create_priced_vendor_services(
    admin: &mut Admin,
    openai_key: &str,
    anthropic_key: &str,
) {
    let price = |model: &str, i: &str, o: &str, c: &str| pb::ModelPrice {
        model: model.into(),
        input_per_mtok: i.into(),
        output_per_mtok: o.into(),
        cached_input_per_mtok: c.into(),
    };
    for (name, header, template, pricing) in [
        (
            "openai",
            "",
            "",
            vec![price("gpt-4o-mini", "0.15", "0.60", "0.075")],
        ),
        (
            "anthropic",
            "x-api-key",
            "{key}",
            vec![price("claude-*", "3", "15.00", "0.30")],
        ),
    ] {
        admin
            .create_model_service(pb::CreateModelServiceRequest {
                name: name.into(),
                provider: name.into(),
                auth_header: header.into(),
                auth_value_template: template.into(),
                pricing,
                ..Default::default()
            })
            .await
            .unwrap_or_else(|e| panic!("CreateModelService {name}: {e}"));
    }
    create_model_key(admin, "openai-main", openai_key, "openai").await;
    create_model_key(admin, "anthropic-main", anthropic_key, "anthropic").await;
}
