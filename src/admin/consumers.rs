//! KeyAdmin handlers for consumers: request → domain input, store call, domain → response.
//! Depends on `domain`, `store` and `proto`.

use tonic::Request;

use super::auth::actor;
use super::convert::{
    OUTPUT_ONLY, UpdateMask, consumer_out, limits_in, page, page_token, scope_input, scope_patch,
    selector,
};
use super::{AdminService, R, ok};
use crate::domain::Selector;
use crate::domain::input::{ConsumerPatch, NewConsumer};
use crate::domain::text::nfc_owned;
use crate::proto::admin::v1 as pb;

/// Fields of a consumer that UpdateConsumer does not change, and why.
const ELSEWHERE: &[(&str, &str)] = &[
    ("id", OUTPUT_ONLY),
    ("create_time", OUTPUT_ONLY),
    ("update_time", OUTPUT_ONLY),
    ("spend", OUTPUT_ONLY),
    (
        "consumer_keys",
        "bind keys with BindConsumerKey / UnbindConsumerKey",
    ),
];

pub(super) async fn create(
    svc: &AdminService,
    req: Request<pb::CreateConsumerRequest>,
) -> R<pb::Consumer> {
    let actor = actor(&req)?;
    let r = req.into_inner();
    let new = NewConsumer {
        name: nfc_owned(r.name),
        description: r.description,
        scope: scope_input("scope", r.scope)?,
        limits: limits_in(r.limits),
    };
    ok(consumer_out(svc.store.create_consumer(&actor, new).await?))
}

pub(super) async fn get(
    svc: &AdminService,
    req: Request<pb::GetConsumerRequest>,
) -> R<pb::Consumer> {
    let sel = selector(req.into_inner().selector, Selector::from)?;
    ok(consumer_out(svc.store.get_consumer(&sel).await?))
}

pub(super) async fn list(
    svc: &AdminService,
    req: Request<pb::ListConsumersRequest>,
) -> R<pb::ListConsumersResponse> {
    let r = req.into_inner();
    let p = svc
        .store
        .list_consumers(&page(r.page_size, &r.page_token)?)
        .await?;
    ok(pb::ListConsumersResponse {
        items: p.items.into_iter().map(consumer_out).collect(),
        next_page_token: page_token(p.next),
    })
}

pub(super) async fn update(
    svc: &AdminService,
    req: Request<pb::UpdateConsumerRequest>,
) -> R<pb::Consumer> {
    let actor = actor(&req)?;
    let r = req.into_inner();
    let sel = selector(r.selector, Selector::from)?;
    let c = r.consumer.unwrap_or_default();
    let mask = UpdateMask::new(
        r.update_mask,
        &[
            ("name", !c.name.is_empty()),
            ("description", !c.description.is_empty()),
            ("scope", c.scope.is_some()),
            ("limits", c.limits.is_some()),
        ],
        &[
            "name",
            "description",
            "scope",
            "scope.model_services",
            "scope.models",
            "limits",
        ],
        ELSEWHERE,
    )?;
    let patch = ConsumerPatch {
        name: mask.has("name").then(|| nfc_owned(c.name.clone())),
        description: mask.has("description").then(|| c.description.clone()),
        scope: scope_patch(&mask, "consumer.scope", c.scope.clone())?,
        limits: mask.has("limits").then(|| limits_in(c.limits.clone())),
    };
    ok(consumer_out(
        svc.store.update_consumer(&actor, &sel, patch).await?,
    ))
}

pub(super) async fn delete(
    svc: &AdminService,
    req: Request<pb::DeleteConsumerRequest>,
) -> R<pb::DeleteResponse> {
    let actor = actor(&req)?;
    let sel = selector(req.into_inner().selector, Selector::from)?;
    svc.store.delete_consumer(&actor, &sel).await?;
    ok(pb::DeleteResponse {})
}
