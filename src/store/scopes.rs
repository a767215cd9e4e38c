//! The scopes of consumers and consumer keys: a `scope_mode` column on the owner and, for a
//! list, ordered `scope_entries` rows naming model services. Depends on `domain`.

use super::lookup::find;
use super::mutation::Mutation;
use super::rows::{SqlCode, fixed_scope, named, scope_mode, table_of};
use super::{Result, StoreError};
use crate::domain::{Named, ResourceKind, RuleError, Scope, ScopeInput, Selector};

/// Resolves a scope's service names (or ids) to the stored services; `field` names the
/// request field in a `NOT_FOUND`.
pub(super) async fn resolve_scope(
    conn: &mut sqlx::AnyConnection,
    field: &str,
    scope: &ScopeInput,
) -> Result<Scope> {
    let names = match scope {
        ScopeInput::Unset => return Ok(Scope::Unset),
        ScopeInput::All => return Ok(Scope::All),
        ScopeInput::Services(names) => names,
    };
    let mut out: Vec<Named> = Vec::with_capacity(names.len());
    for n in names {
        let sel = Selector::IdOrName(n.clone());
        let service = match find(conn, ResourceKind::ModelService, &sel).await {
            Ok(v) => v,
            Err(StoreError::Rule(RuleError::NotFound { .. })) => {
                return Err(RuleError::NotFound {
                    kind: ResourceKind::ModelService,
                    selector: format!("{n:?} (named in {field})"),
                }
                .into());
            }
            Err(e) => return Err(e),
        };
        if !out.iter().any(|x| x.id == service.id) {
            out.push(service);
        }
    }
    Ok(Scope::Services(out))
}

/// Replaces the scope entries of `owner_id` with those of `scope` (none unless a list).
pub(super) async fn write_scope(
    conn: &mut sqlx::AnyConnection,
    owner_kind: ResourceKind,
    owner_id: &str,
    scope: &Scope,
) -> Result<()> {
    sqlx::query("DELETE FROM scope_entries WHERE owner_id = $1")
        .bind(owner_id)
        .execute(&mut *conn)
        .await?;
    if let Scope::Services(list) = scope {
        for (i, s) in list.iter().enumerate() {
            sqlx::query(
                "INSERT INTO scope_entries (owner_kind, owner_id, model_service_id, position) VALUES ($1, $2, $3, $4)",
            )
            .bind(owner_kind.code())
            .bind(owner_id)
            .bind(&s.id)
            .bind(i as i64)
            .execute(&mut *conn)
            .await?;
        }
    }
    Ok(())
}

/// The scope of `owner_id`, whose `scope_mode` is `mode`.
pub(super) async fn read_scope(
    conn: &mut sqlx::AnyConnection,
    owner_id: &str,
    mode: i64,
) -> Result<Scope> {
    if let Some(scope) = fixed_scope(mode) {
        return Ok(scope);
    }
    let rows = sqlx::query(
        "SELECT m.id, m.name FROM scope_entries s JOIN model_services m ON m.id = s.model_service_id \
         WHERE s.owner_id = $1 ORDER BY s.position",
    )
    .bind(owner_id)
    .fetch_all(&mut *conn)
    .await?;
    Ok(Scope::Services(
        rows.iter().map(named).collect::<Result<_>>()?,
    ))
}

/// An update's new scope: resolved (`field` names it in errors), stored, and added to the
/// audit's changed fields.
pub(super) async fn update_scope(
    m: &mut Mutation,
    kind: ResourceKind,
    id: &str,
    field: &str,
    input: &ScopeInput,
    fields: &mut Vec<&'static str>,
) -> Result<()> {
    let scope = resolve_scope(&mut m.tx, field, input).await?;
    sqlx::query(&format!(
        "UPDATE {} SET scope_mode = $1 WHERE id = $2",
        table_of(kind)
    ))
    .bind(scope_mode(&scope))
    .bind(id)
    .execute(&mut *m.tx)
    .await?;
    write_scope(&mut m.tx, kind, id, &scope).await?;
    fields.push("scope");
    Ok(())
}
