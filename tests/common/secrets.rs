//! Admin API shorthands for SECRET_REF keys (tests/secret_refs.rs, tests/secret_envoy.rs).
//! Each returns the RPC's result: the suites assert refusals as well as successes.

use keygate::proto::admin::v1 as pb;
use tonic::Status;

use super::Admin;

/// A `file` provider reference (`version` empty = the latest).
pub fn file_ref(name: &str, version: &str) -> Option<pb::SecretRef> {
    Some(pb::SecretRef {
        provider: "file".into(),
        name: name.into(),
        version: version.into(),
    })
}

/// What `Get*Key` shows as `masked_value` for `v`.
pub fn masked(v: &str) -> String {
    format!("{}***{}", &v[..5], &v[v.len() - 4..])
}

/// CreateModelKey with SECRET_REF, bound to `service`.
pub async fn create_secret_model_key(
    admin: &mut Admin,
    name: &str,
    secret_ref: Option<pb::SecretRef>,
    service: &str,
) -> Result<pb::ModelKey, Status> {
    admin
        .create_model_key(pb::CreateModelKeyRequest {
            name: name.into(),
            generation_method: pb::GenerationMethod::SecretRef as i32,
            secret_ref,
            model_services: vec![service.into()],
            ..Default::default()
        })
        .await
        .map(|r| r.into_inner())
}

/// CreateConsumerKey with SECRET_REF, bound to `consumer` (none when empty).
pub async fn create_secret_consumer_key(
    admin: &mut Admin,
    name: &str,
    secret_ref: Option<pb::SecretRef>,
    consumer: &str,
) -> Result<pb::CreateConsumerKeyResponse, Status> {
    admin
        .create_consumer_key(pb::CreateConsumerKeyRequest {
            name: name.into(),
            generation_method: pb::GenerationMethod::SecretRef as i32,
            secret_ref,
            consumer: consumer.into(),
            ..Default::default()
        })
        .await
        .map(|r| r.into_inner())
}

/// UpdateModelKey with `update_mask: {paths: ["secret_ref"]}`: rotation.
pub async fn point_model_key(
    admin: &mut Admin,
    name: &str,
    secret_ref: Option<pb::SecretRef>,
) -> Result<pb::ModelKey, Status> {
    admin
        .update_model_key(pb::UpdateModelKeyRequest {
            selector: Some(pb::update_model_key_request::Selector::Name(name.into())),
            model_key: Some(pb::ModelKey {
                secret_ref,
                ..Default::default()
            }),
            update_mask: Some(prost_types::FieldMask {
                paths: vec!["secret_ref".into()],
            }),
        })
        .await
        .map(|r| r.into_inner())
}

pub async fn get_model_key(admin: &mut Admin, name: &str) -> pb::ModelKey {
    admin
        .get_model_key(pb::GetModelKeyRequest {
            selector: Some(pb::get_model_key_request::Selector::Name(name.into())),
        })
        .await
        .unwrap_or_else(|e| panic!("GetModelKey {name}: {e}"))
        .into_inner()
}

pub async fn get_consumer_key(admin: &mut Admin, name: &str) -> pb::ConsumerKey {
    admin
        .get_consumer_key(pb::GetConsumerKeyRequest {
            selector: Some(pb::get_consumer_key_request::Selector::Name(name.into())),
        })
        .await
        .unwrap_or_else(|e| panic!("GetConsumerKey {name}: {e}"))
        .into_inner()
}
