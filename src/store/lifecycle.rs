//! Lifecycle rules more than one resource shares: enabling and disabling a key (either
//! kind), and what blocks a delete — references from other resources, and for a key its
//! ENABLED status or its bindings. Depends on `domain`.

use super::audit::Audit;
use super::lookup::find;
use super::rows::{SqlCode, table_of};
use super::{Actor, Result, Store};
use crate::domain::{KeyStatus, Named, ResourceKind, RuleError, Selector, dependency_error};

impl Store {
    /// Enables or disables a key of `kind`; answers its id. Refused when it already is.
    pub(super) async fn set_status(
        &self,
        actor: &Actor,
        kind: ResourceKind,
        sel: &Selector,
        status: KeyStatus,
    ) -> Result<String> {
        let table = table_of(kind);
        let mut m = self.begin(actor).await?;
        let Named { id, name } = find(&mut m.tx, kind, sel).await?;
        let current: i64 = sqlx::query_scalar(&format!("SELECT status FROM {table} WHERE id = $1"))
            .bind(&id)
            .fetch_one(&mut *m.tx)
            .await?;
        let (word, action) = match (kind, status) {
            (ResourceKind::ConsumerKey, KeyStatus::Enabled) => ("enabled", "EnableConsumerKey"),
            (ResourceKind::ConsumerKey, KeyStatus::Disabled) => ("disabled", "DisableConsumerKey"),
            (_, KeyStatus::Enabled) => ("enabled", "EnableModelKey"),
            (_, KeyStatus::Disabled) => ("disabled", "DisableModelKey"),
        };
        if current == status.code() {
            let rule = match status {
                KeyStatus::Enabled => "enable requires a DISABLED key",
                KeyStatus::Disabled => "disable requires an ENABLED key",
            };
            return Err(RuleError::FailedPrecondition(format!(
                "{kind} {name:?} is already {word}: {rule}"
            ))
            .into());
        }
        sqlx::query(&format!(
            "UPDATE {table} SET status = $1, update_time = $2 WHERE id = $3"
        ))
        .bind(status.code())
        .bind(m.now.0)
        .bind(&id)
        .execute(&mut *m.tx)
        .await?;
        self.commit(m, Audit::new(action, kind, &id, &name, &["status"]))
            .await?;
        Ok(id)
    }
}

/// Refuses deleting a consumer or model service that other resources still reference.
pub(super) fn refuse_while_referenced(
    kind: ResourceKind,
    name: &str,
    deps: impl IntoIterator<Item = (ResourceKind, Named)>,
) -> Result<()> {
    let deps: Vec<_> = deps.into_iter().map(|(k, n)| (k, n.name)).collect();
    if deps.is_empty() {
        return Ok(());
    }
    Err(dependency_error(kind, name, &deps).into())
}

/// Refuses deleting a key that is still ENABLED or still bound: disable it and unbind it
/// (`unbind` says how) first. Every reason is named at once.
pub(super) fn refuse_key_delete(
    kind: ResourceKind,
    name: &str,
    status: i64,
    bound_to: &[(ResourceKind, String)],
    unbind: &str,
) -> Result<()> {
    let mut problems = Vec::new();
    if status == KeyStatus::Enabled.code() {
        problems.push("the key is ENABLED: disable the key first".to_string());
    }
    if !bound_to.is_empty() {
        let list = bound_to
            .iter()
            .map(|(k, n)| format!("{k} {n:?}"))
            .collect::<Vec<_>>()
            .join(", ");
        problems.push(format!("it still has dependencies: {list} ({unbind})"));
    }
    if problems.is_empty() {
        return Ok(());
    }
    Err(RuleError::FailedPrecondition(format!(
        "cannot delete {kind} {name:?}: {}",
        problems.join("; ")
    ))
    .into())
}
