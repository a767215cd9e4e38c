//! The scopes of consumers and consumer keys: a `scope_mode` column on the owner and, for a
//! list, ordered `scope_entries` rows naming model services and ordered `scope_models` rows
//! naming a service and a model pattern (SPEC §8.1). Both by service id, so a rename shows
//! through. Depends on `domain`.

use super::lookup::find;
use super::mutation::Mutation;
use super::rows::{SqlCode, fixed_scope, model_grant, named, scope_mode, table_of};
use super::{Result, StoreError};
use crate::domain::model::split_entry;
use crate::domain::{
    ModelGrant, Named, ResourceKind, RuleError, Scope, ScopeInput, ScopePatch, Selector,
};

/// Resolves a scope's service names (or ids) and model entries to the stored services;
/// `field` names the request field in a `NOT_FOUND`.
pub(super) async fn resolve_scope(
    conn: &mut sqlx::AnyConnection,
    field: &str,
    scope: &ScopeInput,
) -> Result<Scope> {
    Ok(match scope {
        ScopeInput::Unset => Scope::Unset,
        ScopeInput::All => Scope::All,
        ScopeInput::List { services, models } => Scope::List {
            services: resolve_services(conn, field, services).await?,
            models: resolve_models(conn, field, models).await?,
        },
    })
}

/// The service a scope names, or `NOT_FOUND` saying where the scope named it.
async fn resolve_service(
    conn: &mut sqlx::AnyConnection,
    name: &str,
    named_in: &str,
) -> Result<Named> {
    let sel = Selector::IdOrName(name.to_string());
    match find(conn, ResourceKind::ModelService, &sel).await {
        Err(StoreError::Rule(RuleError::NotFound { .. })) => Err(RuleError::NotFound {
            kind: ResourceKind::ModelService,
            selector: format!("{name:?} (named in {named_in})"),
        }
        .into()),
        other => other,
    }
}

/// A `model_services` list resolved, duplicates dropped, in the order given.
async fn resolve_services(
    conn: &mut sqlx::AnyConnection,
    field: &str,
    names: &[String],
) -> Result<Vec<Named>> {
    let mut out: Vec<Named> = Vec::with_capacity(names.len());
    for n in names {
        let service = resolve_service(conn, n, field).await?;
        if !out.iter().any(|x| x.id == service.id) {
            out.push(service);
        }
    }
    Ok(out)
}

/// A `models` list resolved (`"<service>/<pattern>"` entries, already validated), duplicates
/// dropped, in the order given.
async fn resolve_models(
    conn: &mut sqlx::AnyConnection,
    field: &str,
    entries: &[String],
) -> Result<Vec<ModelGrant>> {
    let mut out: Vec<ModelGrant> = Vec::with_capacity(entries.len());
    for (i, entry) in entries.iter().enumerate() {
        let f = format!("{field}.models[{i}]");
        let (service, pattern) = split_entry(&f, entry).map_err(|v| RuleError::Invalid(vec![v]))?;
        let grant = ModelGrant {
            service: resolve_service(conn, service, &f).await?,
            pattern: pattern.to_string(),
        };
        if !out.contains(&grant) {
            out.push(grant);
        }
    }
    Ok(out)
}

/// The scope a list update leaves: each list given replaces the stored one, a list not given
/// is kept (an unset or `all` scope has none). A scope left with no list at all is refused:
/// it would read back as unset (every service), which a list update never means.
async fn with_lists(
    conn: &mut sqlx::AnyConnection,
    field: &str,
    current: Scope,
    services: Option<&[String]>,
    models: Option<&[String]>,
) -> Result<Scope> {
    let (kept_services, kept_models) = match current {
        Scope::List { services, models } => (services, models),
        Scope::Unset | Scope::All => (Vec::new(), Vec::new()),
    };
    let services = match services {
        Some(names) => resolve_services(conn, field, names).await?,
        None => kept_services,
    };
    let models = match models {
        Some(entries) => resolve_models(conn, field, entries).await?,
        None => kept_models,
    };
    if services.is_empty() && models.is_empty() {
        return Err(RuleError::FailedPrecondition(format!(
            "{field} would list no model service and no model, which reads as an unset scope \
             (every service); to unset a scope, name the update_mask path \"scope\""
        ))
        .into());
    }
    Ok(Scope::List { services, models })
}

/// Replaces the scope rows of `owner_id` with those of `scope` (none unless a list).
pub(super) async fn write_scope(
    conn: &mut sqlx::AnyConnection,
    owner_kind: ResourceKind,
    owner_id: &str,
    scope: &Scope,
) -> Result<()> {
    for table in ["scope_entries", "scope_models"] {
        sqlx::query(&format!("DELETE FROM {table} WHERE owner_id = $1"))
            .bind(owner_id)
            .execute(&mut *conn)
            .await?;
    }
    let Scope::List { services, models } = scope else {
        return Ok(());
    };
    for (i, s) in services.iter().enumerate() {
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
    for (i, g) in models.iter().enumerate() {
        sqlx::query(
            "INSERT INTO scope_models (owner_kind, owner_id, model_service_id, pattern, position) VALUES ($1, $2, $3, $4, $5)",
        )
        .bind(owner_kind.code())
        .bind(owner_id)
        .bind(&g.service.id)
        .bind(&g.pattern)
        .bind(i as i64)
        .execute(&mut *conn)
        .await?;
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
    let services = sqlx::query(
        "SELECT m.id, m.name FROM scope_entries s JOIN model_services m ON m.id = s.model_service_id \
         WHERE s.owner_id = $1 ORDER BY s.position",
    )
    .bind(owner_id)
    .fetch_all(&mut *conn)
    .await?;
    let models = sqlx::query(
        "SELECT m.id, m.name, s.pattern FROM scope_models s JOIN model_services m ON m.id = s.model_service_id \
         WHERE s.owner_id = $1 ORDER BY s.position",
    )
    .bind(owner_id)
    .fetch_all(&mut *conn)
    .await?;
    Ok(Scope::List {
        services: services.iter().map(named).collect::<Result<_>>()?,
        models: models.iter().map(model_grant).collect::<Result<_>>()?,
    })
}

/// An update's new scope: resolved (`field` names it in errors) against the stored one,
/// stored, and its update mask path(s) added to the audit's changed fields.
pub(super) async fn update_scope(
    m: &mut Mutation,
    kind: ResourceKind,
    id: &str,
    field: &str,
    patch: &ScopePatch,
    fields: &mut Vec<&'static str>,
) -> Result<()> {
    let table = table_of(kind);
    let scope = match patch {
        ScopePatch::Replace(input) => resolve_scope(&mut m.tx, field, input).await?,
        ScopePatch::Lists { services, models } => {
            let mode: i64 =
                sqlx::query_scalar(&format!("SELECT scope_mode FROM {table} WHERE id = $1"))
                    .bind(id)
                    .fetch_one(&mut *m.tx)
                    .await?;
            let current = read_scope(&mut m.tx, id, mode).await?;
            let (services, models) = (services.as_deref(), models.as_deref());
            with_lists(&mut m.tx, field, current, services, models).await?
        }
    };
    sqlx::query(&format!("UPDATE {table} SET scope_mode = $1 WHERE id = $2"))
        .bind(scope_mode(&scope))
        .bind(id)
        .execute(&mut *m.tx)
        .await?;
    write_scope(&mut m.tx, kind, id, &scope).await?;
    fields.extend(patch_paths(patch));
    Ok(())
}

/// The update mask paths a scope patch stands for, as the audit names them.
fn patch_paths(patch: &ScopePatch) -> Vec<&'static str> {
    match patch {
        ScopePatch::Replace(_) => vec!["scope"],
        ScopePatch::Lists { services, models } => [
            ("scope.model_services", services.is_some()),
            ("scope.models", models.is_some()),
        ]
        .into_iter()
        .filter(|(_, given)| *given)
        .map(|(path, _)| path)
        .collect(),
    }
}
