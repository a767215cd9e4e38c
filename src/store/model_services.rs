//! Model services: create, read, list, update and delete (refused while keys are bound or
//! scopes name the service). Depends on `domain`.

use sqlx::any::AnyRow;

use super::audit::Audit;
use super::lifecycle::refuse_while_referenced;
use super::lookup::{ensure_unique_name, find};
use super::mutation::{rename_and_describe, set_text, touch};
use super::rows::{
    SERVICE_COLUMNS, encode_list, encode_pricing, named, new_id, service_base, table_of,
};
use super::usage::remember_deleted_name;
use super::{Actor, Page, PageRequest, Result, Store};
use crate::domain::input::{ModelServicePatch, NewModelService};
use crate::domain::usage::parse_pricing;
use crate::domain::{ModelService, Named, ResourceKind, RuleError, Selector};

const KIND: ResourceKind = ResourceKind::ModelService;

impl Store {
    pub async fn create_model_service(
        &self,
        actor: &Actor,
        mut req: NewModelService,
    ) -> Result<ModelService> {
        req.normalize()?;
        let pricing = parse_pricing("pricing", &req.pricing).map_err(RuleError::Invalid)?;
        let mut m = self.begin(actor).await?;
        ensure_unique_name(&mut m.tx, KIND, &req.name, None).await?;
        let id = new_id();
        sqlx::query(
            "INSERT INTO model_services (id, name, description, provider, auth_header, auth_value_template, models, model_source, pricing, create_time, update_time) \
             VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $10)",
        )
        .bind(&id)
        .bind(&req.name)
        .bind(&req.description)
        .bind(&req.provider)
        .bind(&req.auth_header)
        .bind(&req.auth_value_template)
        .bind(encode_list(&req.models))
        .bind(req.model_source.code())
        .bind(encode_pricing(&pricing))
        .bind(m.now.0)
        .execute(&mut *m.tx)
        .await?;
        let fields = [
            "name",
            "description",
            "provider",
            "auth_header",
            "auth_value_template",
            "models",
            "model_source",
            "pricing",
        ];
        let audit = Audit::new("CreateModelService", KIND, &id, &req.name, &fields);
        self.commit(m, audit).await?;
        self.get_model_service(&Selector::Id(id)).await
    }

    pub async fn get_model_service(&self, sel: &Selector) -> Result<ModelService> {
        let mut conn = self.pool.acquire().await?;
        let id = find(&mut conn, KIND, sel).await?.id;
        let row = sqlx::query(&format!(
            "SELECT {SERVICE_COLUMNS} FROM model_services WHERE id = $1"
        ))
        .bind(&id)
        .fetch_one(&mut *conn)
        .await?;
        service_from_row(&mut conn, &row).await
    }

    pub async fn list_model_services(&self, page: &PageRequest) -> Result<Page<ModelService>> {
        let mut conn = self.pool.acquire().await?;
        let rows = sqlx::query(&format!(
            "SELECT {SERVICE_COLUMNS} FROM model_services WHERE name > $1 ORDER BY name LIMIT $2"
        ))
        .bind(page.cursor())
        .bind(page.limit())
        .fetch_all(&mut *conn)
        .await?;
        let (rows, more) = page.split(rows);
        let mut items = Vec::with_capacity(rows.len());
        for row in &rows {
            items.push(service_from_row(&mut conn, row).await?);
        }
        Ok(Page::new(items, more, |s| s.name.clone()))
    }

    pub async fn update_model_service(
        &self,
        actor: &Actor,
        sel: &Selector,
        patch: ModelServicePatch,
    ) -> Result<ModelService> {
        patch.validate()?;
        let pricing = patch
            .pricing
            .as_deref()
            .map(|p| parse_pricing("model_service.pricing", p).map_err(RuleError::Invalid))
            .transpose()?;
        let mut m = self.begin(actor).await?;
        let found = find(&mut m.tx, KIND, sel).await?;
        let id = found.id;
        let mut fields = Vec::new();
        let (name, description) = (patch.name.as_deref(), patch.description.as_deref());
        rename_and_describe(&mut m, KIND, &id, name, description, &mut fields).await?;
        let text_fields = [
            ("provider", patch.provider.clone()),
            ("auth_header", patch.auth_header.clone()),
            ("auth_value_template", patch.auth_value_template.clone()),
            ("models", patch.models.as_deref().map(encode_list)),
            ("pricing", pricing.as_deref().map(encode_pricing)),
        ];
        for (column, value) in text_fields {
            if let Some(v) = value {
                set_text(&mut m, KIND, &id, column, &v).await?;
                fields.push(column);
            }
        }
        if patch.models.is_some() {
            // A list set now replaces one moved aside by the V4 migration.
            set_text(&mut m, KIND, &id, "legacy_models", "[]").await?;
        }
        if let Some(source) = patch.model_source {
            sqlx::query("UPDATE model_services SET model_source = $1 WHERE id = $2")
                .bind(source.code())
                .bind(&id)
                .execute(&mut *m.tx)
                .await?;
            fields.push("model_source");
        }
        touch(&mut m, KIND, &id).await?;
        let name = patch.name.clone().unwrap_or(found.name);
        let audit = Audit::new("UpdateModelService", KIND, &id, &name, &fields);
        self.commit(m, audit).await?;
        self.get_model_service(&Selector::Id(id)).await
    }

    pub async fn delete_model_service(&self, actor: &Actor, sel: &Selector) -> Result<()> {
        let mut m = self.begin(actor).await?;
        let service = find(&mut m.tx, KIND, sel).await?;
        let deps = service_references(&mut m.tx, &service.id).await?;
        refuse_while_referenced(KIND, &service.name, deps)?;
        sqlx::query("DELETE FROM model_services WHERE id = $1")
            .bind(&service.id)
            .execute(&mut *m.tx)
            .await?;
        remember_deleted_name(&mut m.tx, KIND, &service.id, &service.name, m.now).await?;
        let audit = Audit::new("DeleteModelService", KIND, &service.id, &service.name, &[]);
        self.commit(m, audit).await?;
        Ok(())
    }
}

/// A model service with the keys bound to it.
async fn service_from_row(conn: &mut sqlx::AnyConnection, row: &AnyRow) -> Result<ModelService> {
    let mut s = service_base(row)?;
    s.model_keys = bound_keys(conn, &s.id).await?;
    Ok(s)
}

/// The model keys bound to a service, by name.
async fn bound_keys(conn: &mut sqlx::AnyConnection, service_id: &str) -> Result<Vec<Named>> {
    let rows = sqlx::query(
        "SELECT k.id, k.name FROM model_key_bindings b JOIN model_keys k ON k.id = b.model_key_id \
         WHERE b.model_service_id = $1 ORDER BY k.name",
    )
    .bind(service_id)
    .fetch_all(&mut *conn)
    .await?;
    rows.iter().map(named).collect()
}

/// Bound model keys, then consumers and consumer keys whose scope names the service (in
/// `model_services` or in a `models` entry; each owner once).
pub(super) async fn service_references(
    conn: &mut sqlx::AnyConnection,
    id: &str,
) -> Result<Vec<(ResourceKind, Named)>> {
    let mut out: Vec<_> = bound_keys(conn, id)
        .await?
        .into_iter()
        .map(|k| (ResourceKind::ModelKey, k))
        .collect();
    for kind in [ResourceKind::Consumer, ResourceKind::ConsumerKey] {
        let rows = sqlx::query(&format!(
            "SELECT o.id, o.name FROM {} o WHERE o.id IN \
             (SELECT owner_id FROM scope_entries WHERE model_service_id = $1 \
              UNION SELECT owner_id FROM scope_models WHERE model_service_id = $1) \
             ORDER BY o.name",
            table_of(kind)
        ))
        .bind(id)
        .fetch_all(&mut *conn)
        .await?;
        for r in &rows {
            out.push((kind, named(r)?));
        }
    }
    Ok(out)
}
