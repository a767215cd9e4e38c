//! KeyAdmin handlers for model services: request → domain input, store call, domain →
//! response. Depends on `domain`, `store` and `proto`.

use tonic::Request;

use super::auth::actor;
use super::convert::{
    OUTPUT_ONLY, UpdateMask, model_source_in, page, page_token, pricing_in, selector, service_out,
};
use super::{AdminService, R, ok};
use crate::domain::Selector;
use crate::domain::input::{
    DEFAULT_AUTH_HEADER, DEFAULT_AUTH_VALUE_TEMPLATE, ModelServicePatch, NewModelService,
};
use crate::domain::text::nfc_owned;
use crate::proto::admin::v1 as pb;

/// Fields of a model service that UpdateModelService does not change, and why.
const ELSEWHERE: &[(&str, &str)] = &[
    ("id", OUTPUT_ONLY),
    ("create_time", OUTPUT_ONLY),
    ("update_time", OUTPUT_ONLY),
    ("model_keys", "bind keys with BindModelKey / UnbindModelKey"),
];

pub(super) async fn create(
    svc: &AdminService,
    req: Request<pb::CreateModelServiceRequest>,
) -> R<pb::ModelService> {
    let actor = actor(&req)?;
    let r = req.into_inner();
    let new = NewModelService {
        name: nfc_owned(r.name),
        description: r.description,
        provider: r.provider,
        auth_header: r.auth_header,
        auth_value_template: r.auth_value_template,
        models: r.models,
        model_source: model_source_in("model_source", r.model_source)?,
        pricing: pricing_in(r.pricing),
    };
    ok(service_out(
        svc.store.create_model_service(&actor, new).await?,
    ))
}

pub(super) async fn get(
    svc: &AdminService,
    req: Request<pb::GetModelServiceRequest>,
) -> R<pb::ModelService> {
    let sel = selector(req.into_inner().selector, Selector::from)?;
    ok(service_out(svc.store.get_model_service(&sel).await?))
}

pub(super) async fn list(
    svc: &AdminService,
    req: Request<pb::ListModelServicesRequest>,
) -> R<pb::ListModelServicesResponse> {
    let r = req.into_inner();
    let p = svc
        .store
        .list_model_services(&page(r.page_size, &r.page_token)?)
        .await?;
    ok(pb::ListModelServicesResponse {
        items: p.items.into_iter().map(service_out).collect(),
        next_page_token: page_token(p.next),
    })
}

pub(super) async fn update(
    svc: &AdminService,
    req: Request<pb::UpdateModelServiceRequest>,
) -> R<pb::ModelService> {
    let actor = actor(&req)?;
    let r = req.into_inner();
    let sel = selector(r.selector, Selector::from)?;
    let s = r.model_service.unwrap_or_default();
    let mask = UpdateMask::new(
        r.update_mask,
        &[
            ("name", !s.name.is_empty()),
            ("description", !s.description.is_empty()),
            ("provider", !s.provider.is_empty()),
            ("auth_header", !s.auth_header.is_empty()),
            ("auth_value_template", !s.auth_value_template.is_empty()),
            ("models", !s.models.is_empty()),
            ("model_source", s.model_source != 0),
            ("pricing", !s.pricing.is_empty()),
        ],
        &[
            "name",
            "description",
            "provider",
            "auth_header",
            "auth_value_template",
            "models",
            "model_source",
            "pricing",
        ],
        ELSEWHERE,
    )?;
    // An empty header or template in the mask restores the default.
    let or_default = |v: &str, default: &str| if v.is_empty() { default } else { v }.to_string();
    let patch = ModelServicePatch {
        name: mask.has("name").then(|| nfc_owned(s.name.clone())),
        description: mask.has("description").then(|| s.description.clone()),
        provider: mask.has("provider").then(|| s.provider.clone()),
        auth_header: mask
            .has("auth_header")
            .then(|| or_default(&s.auth_header, DEFAULT_AUTH_HEADER)),
        auth_value_template: mask
            .has("auth_value_template")
            .then(|| or_default(&s.auth_value_template, DEFAULT_AUTH_VALUE_TEMPLATE)),
        models: mask.has("models").then(|| s.models.clone()),
        // Unspecified in the mask restores the default, BODY.
        model_source: if mask.has("model_source") {
            Some(model_source_in(
                "model_service.model_source",
                s.model_source,
            )?)
        } else {
            None
        },
        // The path replaces the whole list (empty: no prices).
        pricing: mask.has("pricing").then(|| pricing_in(s.pricing.clone())),
    };
    ok(service_out(
        svc.store.update_model_service(&actor, &sel, patch).await?,
    ))
}

pub(super) async fn delete(
    svc: &AdminService,
    req: Request<pb::DeleteModelServiceRequest>,
) -> R<pb::DeleteResponse> {
    let actor = actor(&req)?;
    let sel = selector(req.into_inner().selector, Selector::from)?;
    svc.store.delete_model_service(&actor, &sel).await?;
    ok(pb::DeleteResponse {})
}
