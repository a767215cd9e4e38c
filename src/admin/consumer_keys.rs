//! KeyAdmin handlers for consumer keys: request → domain input (a SECRET_REF resolved
//! before anything is committed), store call, domain → response. Depends on `domain`,
//! `store` and `proto`.

use tonic::Request;

use super::auth::actor;
use super::convert::{
    OUTPUT_ONLY, UpdateMask, duration_in, limits_in, optional_reference, page, page_token,
    reference, scope_input, scope_patch, selector, status_filter, ts_in,
};
use super::secret_refs::key_source;
use super::{AdminService, R, ok};
use crate::crypto::Secret;
use crate::domain::input::{
    ConsumerKeyPatch, DEFAULT_ROTATION_OVERLAP_US, NewConsumerKey, Rotation,
};
use crate::domain::text::nfc_owned;
use crate::domain::{KeyStatus, Selector, Timestamp};
use crate::proto::admin::v1 as pb;
use crate::store::ConsumerKeyFilter;

/// Fields of a consumer key that UpdateConsumerKey does not change, and why.
const ELSEWHERE: &[(&str, &str)] = &[
    ("id", OUTPUT_ONLY),
    ("create_time", OUTPUT_ONLY),
    ("update_time", OUTPUT_ONLY),
    ("last_used_time", OUTPUT_ONLY),
    ("expired", OUTPUT_ONLY),
    (
        "masked_value",
        "a key's value is changed only by RotateConsumerKey",
    ),
    (
        "value",
        "a key's value is changed only by RotateConsumerKey",
    ),
    (
        "generation_method",
        "a key's generation method is fixed at creation",
    ),
    ("secret_status", OUTPUT_ONLY),
    (
        "previous_masked_value",
        "it is output only (set by RotateConsumerKey)",
    ),
    (
        "previous_value_expire_time",
        "it is output only (set by RotateConsumerKey)",
    ),
    ("spend", OUTPUT_ONLY),
    ("status", "use EnableConsumerKey / DisableConsumerKey"),
    ("consumer", "use BindConsumerKey / UnbindConsumerKey"),
    ("consumer_id", "use BindConsumerKey / UnbindConsumerKey"),
];

pub(super) async fn create(
    svc: &AdminService,
    req: Request<pb::CreateConsumerKeyRequest>,
) -> R<pb::CreateConsumerKeyResponse> {
    let actor = actor(&req)?;
    let r = req.into_inner();
    let source = key_source(r.generation_method, r.value, r.secret_ref, true)?;
    let mut new = NewConsumerKey {
        name: nfc_owned(r.name),
        description: r.description,
        source,
        consumer: optional_reference(r.consumer),
        scope: scope_input("scope", r.scope)?,
        ip_allowlist: r.ip_allowlist,
        expire_time: r
            .expire_time
            .as_ref()
            .map(|t| ts_in("expire_time", t))
            .transpose()?,
        limits: limits_in(r.limits),
    };
    // Every other rule first: a reference is only read for a request that is otherwise good.
    new.validate(svc.store.limits(), Timestamp::now())?;
    new.source = svc.resolve_source(new.source).await?;
    let created = svc.store.create_consumer_key(&actor, new).await?;
    ok(pb::CreateConsumerKeyResponse {
        key: Some(svc.consumer_key_out(created.key, Timestamp::now())),
        value: created
            .value
            .map(|v| v.expose().to_string())
            .unwrap_or_default(),
    })
}

pub(super) async fn get(
    svc: &AdminService,
    req: Request<pb::GetConsumerKeyRequest>,
) -> R<pb::ConsumerKey> {
    let sel = selector(req.into_inner().selector, Selector::from)?;
    let k = svc.store.get_consumer_key(&sel).await?;
    ok(svc.consumer_key_out(k, Timestamp::now()))
}

pub(super) async fn list(
    svc: &AdminService,
    req: Request<pb::ListConsumerKeysRequest>,
) -> R<pb::ListConsumerKeysResponse> {
    let r = req.into_inner();
    let filter = ConsumerKeyFilter {
        consumer: optional_reference(r.consumer),
        status: status_filter(r.status)?,
    };
    let p = svc
        .store
        .list_consumer_keys(&filter, &page(r.page_size, &r.page_token)?)
        .await?;
    let now = Timestamp::now();
    ok(pb::ListConsumerKeysResponse {
        items: p
            .items
            .into_iter()
            .map(|k| svc.consumer_key_out(k, now))
            .collect(),
        next_page_token: page_token(p.next),
    })
}

pub(super) async fn update(
    svc: &AdminService,
    req: Request<pb::UpdateConsumerKeyRequest>,
) -> R<pb::ConsumerKey> {
    let actor = actor(&req)?;
    let r = req.into_inner();
    let sel = selector(r.selector, Selector::from)?;
    let k = r.consumer_key.unwrap_or_default();
    let mask = UpdateMask::new(
        r.update_mask,
        &[
            ("name", !k.name.is_empty()),
            ("description", !k.description.is_empty()),
            ("scope", k.scope.is_some()),
            ("ip_allowlist", !k.ip_allowlist.is_empty()),
            ("expire_time", k.expire_time.is_some()),
            ("status", k.status != 0),
            ("consumer", !k.consumer.is_empty()),
            ("secret_ref", k.secret_ref.is_some()),
            ("limits", k.limits.is_some()),
        ],
        &[
            "name",
            "description",
            "scope",
            "scope.model_services",
            "scope.models",
            "ip_allowlist",
            "expire_time",
            "secret_ref",
            "limits",
        ],
        ELSEWHERE,
    )?;
    let secret_ref = if mask.has("secret_ref") {
        let method = svc.store.get_consumer_key(&sel).await?.generation_method;
        let field = "consumer_key.secret_ref";
        Some(
            svc.resolve_update_ref(field, method, k.secret_ref.clone())
                .await?,
        )
    } else {
        None
    };
    let patch = ConsumerKeyPatch {
        name: mask.has("name").then(|| nfc_owned(k.name.clone())),
        description: mask.has("description").then(|| k.description.clone()),
        scope: scope_patch(&mask, "consumer_key.scope", k.scope.clone())?,
        ip_allowlist: mask.has("ip_allowlist").then(|| k.ip_allowlist.clone()),
        expire_time: if mask.has("expire_time") {
            Some(
                k.expire_time
                    .as_ref()
                    .map(|t| ts_in("consumer_key.expire_time", t))
                    .transpose()?,
            )
        } else {
            None
        },
        secret_ref,
        limits: mask.has("limits").then(|| limits_in(k.limits.clone())),
    };
    let k = svc.store.update_consumer_key(&actor, &sel, patch).await?;
    ok(svc.consumer_key_out(k, Timestamp::now()))
}

/// EnableConsumerKey and DisableConsumerKey: `sel` takes the request's selector.
pub(super) async fn set_status<T>(
    svc: &AdminService,
    req: Request<T>,
    sel: impl FnOnce(T) -> Option<Selector>,
    status: KeyStatus,
) -> R<pb::ConsumerKey> {
    let actor = actor(&req)?;
    let sel = selector(sel(req.into_inner()), |s| s)?;
    let k = svc
        .store
        .set_consumer_key_status(&actor, &sel, status)
        .await?;
    ok(svc.consumer_key_out(k, Timestamp::now()))
}

pub(super) async fn bind(
    svc: &AdminService,
    req: Request<pb::BindConsumerKeyRequest>,
) -> R<pb::ConsumerKey> {
    let actor = actor(&req)?;
    let r = req.into_inner();
    let key = reference("key", &r.key)?;
    let consumer = reference("consumer", &r.consumer)?;
    let k = svc.store.bind_consumer_key(&actor, &key, &consumer).await?;
    ok(svc.consumer_key_out(k, Timestamp::now()))
}

pub(super) async fn unbind(
    svc: &AdminService,
    req: Request<pb::UnbindConsumerKeyRequest>,
) -> R<pb::ConsumerKey> {
    let actor = actor(&req)?;
    let key = reference("key", &req.get_ref().key)?;
    let k = svc.store.unbind_consumer_key(&actor, &key).await?;
    ok(svc.consumer_key_out(k, Timestamp::now()))
}

/// RotateConsumerKey (SPEC §8.4): a new value for the same key, the previous one authorizing
/// for `overlap` (default 24 h). The value is shown here only, and only for an AUTO key.
pub(super) async fn rotate(
    svc: &AdminService,
    req: Request<pb::RotateConsumerKeyRequest>,
) -> R<pb::RotateConsumerKeyResponse> {
    let actor = actor(&req)?;
    let r = req.into_inner();
    let sel = selector(r.selector, Selector::from)?;
    let rotation = Rotation {
        overlap_us: match &r.overlap {
            Some(d) => duration_in("overlap", d)?,
            None => DEFAULT_ROTATION_OVERLAP_US,
        },
        value: (!r.value.is_empty()).then(|| Secret::new(r.value)),
    };
    let rotated = svc
        .store
        .rotate_consumer_key(&actor, &sel, rotation)
        .await?;
    ok(pb::RotateConsumerKeyResponse {
        key: Some(svc.consumer_key_out(rotated.key, Timestamp::now())),
        value: rotated
            .value
            .map(|v| v.expose().to_string())
            .unwrap_or_default(),
    })
}

pub(super) async fn delete(
    svc: &AdminService,
    req: Request<pb::DeleteConsumerKeyRequest>,
) -> R<pb::DeleteResponse> {
    let actor = actor(&req)?;
    let sel = selector(req.into_inner().selector, Selector::from)?;
    svc.store.delete_consumer_key(&actor, &sel).await?;
    ok(pb::DeleteResponse {})
}
