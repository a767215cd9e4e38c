//! KeyAdmin handlers for model keys: request → domain input (a SECRET_REF resolved before
//! anything is committed), store call, domain → response. Depends on `domain`, `store` and
//! `proto`.

use tonic::Request;

use super::auth::actor;
use super::convert::{
    OUTPUT_ONLY, UpdateMask, names_in, optional_reference, page, page_token, reference, selector,
    status_filter,
};
use super::secret_refs::key_source;
use super::{AdminService, R, ok};
use crate::domain::input::{ModelKeyPatch, NewModelKey};
use crate::domain::text::nfc_owned;
use crate::domain::{KeyStatus, Selector};
use crate::proto::admin::v1 as pb;
use crate::store::{Actor, ModelKeyFilter};

/// Fields of a model key that UpdateModelKey does not change, and why.
const ELSEWHERE: &[(&str, &str)] = &[
    ("id", OUTPUT_ONLY),
    ("create_time", OUTPUT_ONLY),
    ("update_time", OUTPUT_ONLY),
    (
        "masked_value",
        "a key's value is never editable: create a new key to rotate",
    ),
    (
        "generation_method",
        "a key's value is never editable: create a new key to rotate",
    ),
    ("secret_status", OUTPUT_ONLY),
    ("status", "use EnableModelKey / DisableModelKey"),
    ("model_services", "use BindModelKey / UnbindModelKey"),
];

pub(super) async fn create(
    svc: &AdminService,
    req: Request<pb::CreateModelKeyRequest>,
) -> R<pb::ModelKey> {
    let actor = actor(&req)?;
    let r = req.into_inner();
    let source = key_source(r.generation_method, r.value, r.secret_ref, false)?;
    let mut new = NewModelKey {
        name: nfc_owned(r.name),
        description: r.description,
        source,
        model_services: names_in(r.model_services),
    };
    new.validate()?;
    new.source = svc.resolve_source(new.source).await?;
    ok(svc.model_key_out(svc.store.create_model_key(&actor, new).await?))
}

pub(super) async fn get(
    svc: &AdminService,
    req: Request<pb::GetModelKeyRequest>,
) -> R<pb::ModelKey> {
    let sel = selector(req.into_inner().selector, Selector::from)?;
    ok(svc.model_key_out(svc.store.get_model_key(&sel).await?))
}

pub(super) async fn list(
    svc: &AdminService,
    req: Request<pb::ListModelKeysRequest>,
) -> R<pb::ListModelKeysResponse> {
    let r = req.into_inner();
    let filter = ModelKeyFilter {
        model_service: optional_reference(r.model_service),
        status: status_filter(r.status)?,
    };
    let p = svc
        .store
        .list_model_keys(&filter, &page(r.page_size, &r.page_token)?)
        .await?;
    ok(pb::ListModelKeysResponse {
        items: p.items.into_iter().map(|k| svc.model_key_out(k)).collect(),
        next_page_token: page_token(p.next),
    })
}

pub(super) async fn update(
    svc: &AdminService,
    req: Request<pb::UpdateModelKeyRequest>,
) -> R<pb::ModelKey> {
    let actor = actor(&req)?;
    let r = req.into_inner();
    let sel = selector(r.selector, Selector::from)?;
    let k = r.model_key.unwrap_or_default();
    let mask = UpdateMask::new(
        r.update_mask,
        &[
            ("name", !k.name.is_empty()),
            ("description", !k.description.is_empty()),
            ("status", k.status != 0),
            ("model_services", !k.model_services.is_empty()),
            ("secret_ref", k.secret_ref.is_some()),
        ],
        &["name", "description", "secret_ref"],
        ELSEWHERE,
    )?;
    let secret_ref = if mask.has("secret_ref") {
        let method = svc.store.get_model_key(&sel).await?.generation_method;
        let field = "model_key.secret_ref";
        Some(
            svc.resolve_update_ref(field, method, k.secret_ref.clone())
                .await?,
        )
    } else {
        None
    };
    let patch = ModelKeyPatch {
        name: mask.has("name").then(|| nfc_owned(k.name.clone())),
        description: mask.has("description").then(|| k.description.clone()),
        secret_ref,
    };
    ok(svc.model_key_out(svc.store.update_model_key(&actor, &sel, patch).await?))
}

/// EnableModelKey and DisableModelKey: `sel` takes the request's selector.
pub(super) async fn set_status<T>(
    svc: &AdminService,
    req: Request<T>,
    sel: impl FnOnce(T) -> Option<Selector>,
    status: KeyStatus,
) -> R<pb::ModelKey> {
    let actor = actor(&req)?;
    let sel = selector(sel(req.into_inner()), |s| s)?;
    let k = svc.store.set_model_key_status(&actor, &sel, status).await?;
    ok(svc.model_key_out(k))
}

pub(super) async fn bind(
    svc: &AdminService,
    req: Request<pb::BindModelKeyRequest>,
) -> R<pb::ModelKey> {
    let actor = actor(&req)?;
    let r = req.into_inner();
    set_binding(svc, actor, &r.key, &r.model_service, true).await
}

pub(super) async fn unbind(
    svc: &AdminService,
    req: Request<pb::UnbindModelKeyRequest>,
) -> R<pb::ModelKey> {
    let actor = actor(&req)?;
    let r = req.into_inner();
    set_binding(svc, actor, &r.key, &r.model_service, false).await
}

/// BindModelKey (`bind`) and UnbindModelKey, whose requests name the same two fields.
async fn set_binding(
    svc: &AdminService,
    actor: Actor,
    key: &str,
    service: &str,
    bind: bool,
) -> R<pb::ModelKey> {
    let key = reference("key", key)?;
    let service = reference("model_service", service)?;
    let k = if bind {
        svc.store.bind_model_key(&actor, &key, &service).await?
    } else {
        svc.store.unbind_model_key(&actor, &key, &service).await?
    };
    ok(svc.model_key_out(k))
}

pub(super) async fn delete(
    svc: &AdminService,
    req: Request<pb::DeleteModelKeyRequest>,
) -> R<pb::DeleteResponse> {
    let actor = actor(&req)?;
    let sel = selector(req.into_inner().selector, Selector::from)?;
    svc.store.delete_model_key(&actor, &sel).await?;
    ok(pb::DeleteResponse {})
}
