//! KeyAdmin handlers that look across resources: what references a resource, the audit
//! trail, and the snapshot this control plane serves. Depends on `domain`, `store`,
//! `snapshot` and `proto`.

use tonic::{Request, Status};

use super::convert::{audit_out, kind_in, kind_out, page, secret_ref_out, selector, ts_in, ts_out};
use super::{AdminService, R, ok};
use crate::domain::{Selector, Timestamp};
use crate::proto::admin::v1 as pb;
use crate::store::{AuditFilter, PageRequest};

pub(super) async fn references(
    svc: &AdminService,
    req: Request<pb::GetKeyReferencesRequest>,
) -> R<pb::GetKeyReferencesResponse> {
    let r = req.into_inner();
    let kind = kind_in("kind", r.kind, true)?.expect("required kind");
    let sel = selector(r.selector, Selector::from)?;
    let (refs, secret_ref) = svc.store.references(kind, &sel).await?;
    ok(pb::GetKeyReferencesResponse {
        count: refs.len() as u32,
        references: refs
            .into_iter()
            .map(|(k, n)| pb::Reference {
                kind: kind_out(k),
                id: n.id,
                name: n.name,
            })
            .collect(),
        secret_ref: secret_ref_out(&secret_ref),
    })
}

pub(super) async fn audit_events(
    svc: &AdminService,
    req: Request<pb::ListAuditEventsRequest>,
) -> R<pb::ListAuditEventsResponse> {
    let r = req.into_inner();
    let size = page(r.page_size, "")?.size;
    let filter = AuditFilter {
        kind: kind_in("kind", r.kind, false)?,
        name: super::convert::optional_reference(r.name),
        start: r
            .start_time
            .as_ref()
            .map(|t| ts_in("start_time", t))
            .transpose()?,
        end: r
            .end_time
            .as_ref()
            .map(|t| ts_in("end_time", t))
            .transpose()?,
    };
    // The audit trail's cursor is a revision, passed as is (not a name to encode).
    let p = PageRequest {
        size,
        after: (!r.page_token.is_empty()).then_some(r.page_token),
    };
    let page = svc.store.list_audit_events(&filter, &p).await?;
    ok(pb::ListAuditEventsResponse {
        items: page.items.into_iter().map(audit_out).collect(),
        next_page_token: page.next.unwrap_or_default(),
    })
}

pub(super) async fn snapshot_status(svc: &AdminService) -> R<pb::GetSnapshotStatusResponse> {
    let Some(s) = svc.snapshots.load() else {
        return Err(Status::unavailable("no snapshot has been built yet"));
    };
    ok(pb::GetSnapshotStatusResponse {
        version: s.version as u64,
        build_time: Some(ts_out(Timestamp::from_system(s.build_time))),
        consumer_keys: s.counts().consumer_keys,
        model_keys: s.counts().model_keys,
        model_services: s.counts().model_services,
        store_id: s.store_id.clone(),
    })
}
