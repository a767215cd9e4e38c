//! KeyAdmin handlers for named admin credentials (SPEC §9, ADMIN role only): create (the
//! value is in the answer, once), list, revoke. Depends on `domain`, `store` and `proto`.

use tonic::{Request, Status};

use super::auth::actor;
use super::convert::{invalid, page, page_token, selector, ts_in, ts_out};
use super::{AdminService, R, ok};
use crate::domain::{AdminToken, NewAdminToken, Role, Selector, Timestamp};
use crate::proto::admin::v1 as pb;
use pb::admin_token::Role as PbRole;

pub(super) async fn create(
    svc: &AdminService,
    req: Request<pb::CreateAdminTokenRequest>,
) -> R<pb::CreateAdminTokenResponse> {
    let actor = actor(&req)?;
    let r = req.into_inner();
    let new = NewAdminToken {
        name: r.name,
        role: role_in(r.role)?,
        expire_time: r
            .expire_time
            .as_ref()
            .map(|t| ts_in("expire_time", t))
            .transpose()?,
    };
    let (token, value) = svc.store.create_admin_token(&actor, new).await?;
    ok(pb::CreateAdminTokenResponse {
        token: Some(admin_token_out(token, Timestamp::now())),
        value: value.expose().to_string(),
    })
}

pub(super) async fn list(
    svc: &AdminService,
    req: Request<pb::ListAdminTokensRequest>,
) -> R<pb::ListAdminTokensResponse> {
    let r = req.into_inner();
    let p = svc
        .store
        .list_admin_tokens(&page(r.page_size, &r.page_token)?)
        .await?;
    let now = Timestamp::now();
    ok(pb::ListAdminTokensResponse {
        items: p
            .items
            .into_iter()
            .map(|t| admin_token_out(t, now))
            .collect(),
        next_page_token: page_token(p.next),
    })
}

pub(super) async fn revoke(
    svc: &AdminService,
    req: Request<pb::RevokeAdminTokenRequest>,
) -> R<pb::DeleteResponse> {
    let actor = actor(&req)?;
    let sel = selector(req.into_inner().selector, |s| match s {
        pb::revoke_admin_token_request::Selector::Id(v) => Selector::Id(v),
        pb::revoke_admin_token_request::Selector::Name(v) => Selector::Name(v),
    })?;
    svc.store.revoke_admin_token(&actor, &sel).await?;
    ok(pb::DeleteResponse {})
}

#[allow(clippy::result_large_err)]
fn role_in(v: i32) -> Result<Role, Status> {
    match PbRole::try_from(v) {
        Ok(PbRole::Viewer) => Ok(Role::Viewer),
        Ok(PbRole::Operator) => Ok(Role::Operator),
        Ok(PbRole::Admin) => Ok(Role::Admin),
        Ok(PbRole::Unspecified) => Err(invalid("role", "is required: VIEWER, OPERATOR or ADMIN")),
        Err(_) => Err(invalid(
            "role",
            "is not a known role: VIEWER, OPERATOR or ADMIN",
        )),
    }
}

fn role_out(r: Role) -> i32 {
    (match r {
        Role::Viewer => PbRole::Viewer,
        Role::Operator => PbRole::Operator,
        Role::Admin => PbRole::Admin,
    }) as i32
}

fn admin_token_out(t: AdminToken, now: Timestamp) -> pb::AdminToken {
    pb::AdminToken {
        expired: t.expired_at(now),
        id: t.id,
        name: t.name,
        role: role_out(t.role),
        masked_value: t.masked_value,
        expire_time: t.expire_time.map(ts_out),
        create_time: Some(ts_out(t.create_time)),
        last_used_time: t.last_used_time.map(ts_out),
    }
}
