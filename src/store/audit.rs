//! The audit trail: the row every mutation appends (who did what to which resource, never a
//! value), its log line, and listing the trail newest first. Depends on `domain`.

use super::rows::{SqlCode, audit_event};
use super::{Actor, Page, PageRequest, Result, Store};
use crate::domain::{AuditEvent, ResourceKind, RuleError, Timestamp};

#[derive(Clone, Debug, Default)]
pub struct AuditFilter {
    pub kind: Option<ResourceKind>,
    pub name: Option<String>,
    pub start: Option<Timestamp>,
    pub end: Option<Timestamp>,
}

/// What a mutation did, as its audit row says.
pub(super) struct Audit<'a> {
    pub action: &'a str,
    pub kind: ResourceKind,
    pub id: &'a str,
    pub name: &'a str,
    pub fields: &'a [&'a str],
    /// What happened, for changes no admin request made; empty otherwise.
    pub details: &'a str,
}

impl<'a> Audit<'a> {
    pub fn new(
        action: &'a str,
        kind: ResourceKind,
        id: &'a str,
        name: &'a str,
        fields: &'a [&'a str],
    ) -> Self {
        Audit {
            action,
            kind,
            id,
            name,
            fields,
            details: "",
        }
    }

    /// With `details` (never a value).
    pub fn with_details(mut self, details: &'a str) -> Self {
        self.details = details;
        self
    }

    /// Appends the audit row inside the mutation's transaction.
    pub async fn write(
        &self,
        conn: &mut sqlx::AnyConnection,
        revision: i64,
        now: Timestamp,
        actor: &Actor,
    ) -> Result<()> {
        sqlx::query(
            "INSERT INTO audit_events (revision, time, actor, action, kind, resource_id, resource_name, changed_fields, details) \
             VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9)",
        )
        .bind(revision)
        .bind(now.0)
        .bind(&actor.0)
        .bind(self.action)
        .bind(self.kind.code())
        .bind(self.id)
        .bind(self.name)
        .bind(self.fields.join(","))
        .bind(self.details)
        .execute(&mut *conn)
        .await?;
        Ok(())
    }

    /// The log line of a committed change.
    pub fn log(&self, actor: &Actor, revision: i64) {
        tracing::info!(
            action = self.action,
            kind = %self.kind,
            resource_id = self.id,
            resource_name = self.name,
            changed_fields = %self.fields.join(","),
            actor = %actor.0,
            revision,
            "admin change committed"
        );
    }
}

impl Store {
    /// Audit events newest first; the page cursor is the last revision shown.
    pub async fn list_audit_events(
        &self,
        filter: &AuditFilter,
        page: &PageRequest,
    ) -> Result<Page<AuditEvent>> {
        let before: i64 = match &page.after {
            Some(t) => t.parse().map_err(|_| {
                RuleError::invalid("page_token", "is not a token from a previous page")
            })?,
            None => i64::MAX,
        };
        let rows = sqlx::query(
            "SELECT revision, time, actor, action, kind, resource_id, resource_name, changed_fields, details FROM audit_events \
             WHERE revision < $1 AND ($2 = 0 OR kind = $2) AND ($3 = '' OR resource_name = $3) \
             AND time >= $4 AND time <= $5 ORDER BY revision DESC LIMIT $6",
        )
        .bind(before)
        .bind(filter.kind.map(|k| k.code()).unwrap_or(0))
        .bind(filter.name.clone().unwrap_or_default())
        .bind(filter.start.map(|t| t.0).unwrap_or(i64::MIN))
        .bind(filter.end.map(|t| t.0).unwrap_or(i64::MAX))
        .bind(page.limit())
        .fetch_all(&self.pool)
        .await?;
        let (rows, more) = page.split(rows);
        let items = rows.iter().map(audit_event).collect::<Result<Vec<_>>>()?;
        Ok(Page::new(items, more, |e| e.revision.to_string()))
    }
}
