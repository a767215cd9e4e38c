//! Model keys (the vendor credentials keygate injects): create (the value encrypted under
//! the master key, or only a reference for SECRET_REF), read, list, update, enable and
//! disable, bind to and unbind from model services, delete (disabled and unbound first).
//! Depends on `domain` and `crypto`.

use sqlx::any::AnyRow;

use super::audit::Audit;
use super::lifecycle::refuse_key_delete;
use super::lookup::{ensure_unique_name, find, find_ref};
use super::mutation::{Mutation, rename_and_describe, touch};
use super::rows::{MODEL_KEY_COLUMNS, SqlCode, model_key_base, named, new_id};
use super::secret_values::{point_model_key, resolved};
use super::{Actor, Page, PageRequest, Result, Store};
use crate::crypto::Secret;
use crate::domain::input::{KeySource, ModelKeyPatch, NewModelKey};
use crate::domain::{
    KeyStatus, ModelKey, Named, ResourceKind, RuleError, SecretRef, Selector, mask,
};

const KIND: ResourceKind = ResourceKind::ModelKey;

#[derive(Clone, Debug, Default)]
pub struct ModelKeyFilter {
    pub model_service: Option<String>,
    pub status: Option<KeyStatus>,
}

impl Store {
    pub async fn create_model_key(&self, actor: &Actor, req: NewModelKey) -> Result<ModelKey> {
        req.validate()?;
        let (value, reference) = match &req.source {
            KeySource::Custom(v) => (v.clone(), None),
            KeySource::SecretRef(r, v) => (resolved(r, v)?, Some(r)),
            KeySource::Auto => unreachable!("validate() refuses AUTO model keys"),
        };
        let mut m = self.begin(actor).await?;
        ensure_unique_name(&mut m.tx, KIND, &req.name, None).await?;
        let mut services: Vec<Named> = Vec::new();
        for s in &req.model_services {
            let found = find_ref(&mut m.tx, ResourceKind::ModelService, s).await?;
            if !services.contains(&found) {
                services.push(found);
            }
        }
        let id = new_id();
        self.insert_key(&mut m, &id, &req, &value, reference)
            .await?;
        for s in &services {
            insert_binding(&mut m, &id, &s.id).await?;
        }
        let value_field = if reference.is_some() {
            "secret_ref"
        } else {
            "value"
        };
        let mut fields = vec!["name", "description", "generation_method", value_field];
        if !services.is_empty() {
            fields.push("model_services");
        }
        let audit = Audit::new("CreateModelKey", KIND, &id, &req.name, &fields);
        self.commit(m, audit).await?;
        self.get_model_key(&Selector::Id(id)).await
    }

    async fn insert_key(
        &self,
        m: &mut Mutation,
        id: &str,
        req: &NewModelKey,
        value: &Secret,
        reference: Option<&SecretRef>,
    ) -> Result<()> {
        sqlx::query(
            "INSERT INTO model_keys (id, name, description, status, generation_method, ciphertext, masked_value, create_time, update_time, \
             secret_provider, secret_name, secret_version) \
             VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $8, $9, $10, $11)",
        )
        .bind(id)
        .bind(&req.name)
        .bind(&req.description)
        .bind(KeyStatus::Enabled.code())
        .bind(req.source.method().code())
        // A SECRET_REF key stores its reference, never the value (not even encrypted).
        .bind(match reference {
            None => Some(self.keys.cipher.encrypt(id, value)),
            Some(_) => None,
        })
        .bind(mask(value.expose()))
        .bind(m.now.0)
        .bind(reference.map(|r| r.provider.clone()))
        .bind(reference.map(|r| r.name.clone()))
        .bind(reference.map(|r| r.version.clone()))
        .execute(&mut *m.tx)
        .await?;
        Ok(())
    }

    pub async fn get_model_key(&self, sel: &Selector) -> Result<ModelKey> {
        let mut conn = self.pool.acquire().await?;
        let id = find(&mut conn, KIND, sel).await?.id;
        let row = sqlx::query(&format!(
            "SELECT {MODEL_KEY_COLUMNS} FROM model_keys WHERE id = $1"
        ))
        .bind(&id)
        .fetch_one(&mut *conn)
        .await?;
        model_key_from_row(&mut conn, &row).await
    }

    pub async fn list_model_keys(
        &self,
        filter: &ModelKeyFilter,
        page: &PageRequest,
    ) -> Result<Page<ModelKey>> {
        let mut conn = self.pool.acquire().await?;
        let service_id = match &filter.model_service {
            Some(s) => find_ref(&mut conn, ResourceKind::ModelService, s).await?.id,
            None => String::new(),
        };
        let rows = sqlx::query(&format!(
            "SELECT {MODEL_KEY_COLUMNS} FROM model_keys WHERE name > $1 \
             AND ($2 = '' OR id IN (SELECT model_key_id FROM model_key_bindings WHERE model_service_id = $2)) \
             AND ($3 = 0 OR status = $3) ORDER BY name LIMIT $4"
        ))
        .bind(page.cursor())
        .bind(service_id)
        .bind(filter.status.map(|s| s.code()).unwrap_or(0))
        .bind(page.limit())
        .fetch_all(&mut *conn)
        .await?;
        let (rows, more) = page.split(rows);
        let mut items = Vec::with_capacity(rows.len());
        for row in &rows {
            items.push(model_key_from_row(&mut conn, row).await?);
        }
        Ok(Page::new(items, more, |k| k.name.clone()))
    }

    pub async fn update_model_key(
        &self,
        actor: &Actor,
        sel: &Selector,
        patch: ModelKeyPatch,
    ) -> Result<ModelKey> {
        patch.validate()?;
        let mut m = self.begin(actor).await?;
        let found = find(&mut m.tx, KIND, sel).await?;
        let id = found.id;
        let mut fields = Vec::new();
        let (name, description) = (patch.name.as_deref(), patch.description.as_deref());
        rename_and_describe(&mut m, KIND, &id, name, description, &mut fields).await?;
        if let Some((r, value)) = &patch.secret_ref {
            point_model_key(&mut m, &id, r, value).await?;
            fields.push("secret_ref");
        }
        touch(&mut m, KIND, &id).await?;
        let name = patch.name.clone().unwrap_or(found.name);
        let audit = Audit::new("UpdateModelKey", KIND, &id, &name, &fields);
        self.commit(m, audit).await?;
        self.get_model_key(&Selector::Id(id)).await
    }

    pub async fn set_model_key_status(
        &self,
        actor: &Actor,
        sel: &Selector,
        status: KeyStatus,
    ) -> Result<ModelKey> {
        let id = self.set_status(actor, KIND, sel, status).await?;
        self.get_model_key(&Selector::Id(id)).await
    }

    pub async fn bind_model_key(
        &self,
        actor: &Actor,
        key: &str,
        service: &str,
    ) -> Result<ModelKey> {
        self.set_binding(actor, key, service, true).await
    }

    pub async fn unbind_model_key(
        &self,
        actor: &Actor,
        key: &str,
        service: &str,
    ) -> Result<ModelKey> {
        self.set_binding(actor, key, service, false).await
    }

    /// Binds (`bind`) or unbinds a key and a service; refused when they already are (not).
    async fn set_binding(
        &self,
        actor: &Actor,
        key: &str,
        service: &str,
        bind: bool,
    ) -> Result<ModelKey> {
        let mut m = self.begin(actor).await?;
        let key = find_ref(&mut m.tx, KIND, key).await?;
        let service = find_ref(&mut m.tx, ResourceKind::ModelService, service).await?;
        if is_bound(&mut m.tx, &key.id, &service.id).await? == bind {
            let already = if bind { "already" } else { "not" };
            return Err(RuleError::FailedPrecondition(format!(
                "model key {:?} is {already} bound to model service {:?}",
                key.name, service.name
            ))
            .into());
        }
        let action = if bind {
            insert_binding(&mut m, &key.id, &service.id).await?;
            "BindModelKey"
        } else {
            delete_binding(&mut m, &key.id, &service.id).await?;
            "UnbindModelKey"
        };
        let audit = Audit::new(action, KIND, &key.id, &key.name, &["model_services"]);
        self.commit(m, audit).await?;
        self.get_model_key(&Selector::Id(key.id)).await
    }

    pub async fn delete_model_key(&self, actor: &Actor, sel: &Selector) -> Result<()> {
        let mut m = self.begin(actor).await?;
        let key = find(&mut m.tx, KIND, sel).await?;
        let status: i64 = sqlx::query_scalar("SELECT status FROM model_keys WHERE id = $1")
            .bind(&key.id)
            .fetch_one(&mut *m.tx)
            .await?;
        let bound_to: Vec<_> = bound_services(&mut m.tx, &key.id)
            .await?
            .into_iter()
            .map(|s| (ResourceKind::ModelService, s.name))
            .collect();
        let unbind = "unbind the key from each first";
        refuse_key_delete(KIND, &key.name, status, &bound_to, unbind)?;
        sqlx::query("DELETE FROM model_keys WHERE id = $1")
            .bind(&key.id)
            .execute(&mut *m.tx)
            .await?;
        let audit = Audit::new("DeleteModelKey", KIND, &key.id, &key.name, &[]);
        self.commit(m, audit).await?;
        Ok(())
    }
}

/// Binds a key to a service; the service changes for the data plane (so does unbinding).
async fn insert_binding(m: &mut Mutation, key_id: &str, service_id: &str) -> Result<()> {
    sqlx::query("INSERT INTO model_key_bindings (model_key_id, model_service_id, create_time) VALUES ($1, $2, $3)")
        .bind(key_id)
        .bind(service_id)
        .bind(m.now.0)
        .execute(&mut *m.tx)
        .await?;
    m.changed
        .push((ResourceKind::ModelService, service_id.to_string()));
    Ok(())
}

async fn delete_binding(m: &mut Mutation, key_id: &str, service_id: &str) -> Result<()> {
    sqlx::query("DELETE FROM model_key_bindings WHERE model_key_id = $1 AND model_service_id = $2")
        .bind(key_id)
        .bind(service_id)
        .execute(&mut *m.tx)
        .await?;
    m.changed
        .push((ResourceKind::ModelService, service_id.to_string()));
    Ok(())
}

async fn is_bound(conn: &mut sqlx::AnyConnection, key_id: &str, service_id: &str) -> Result<bool> {
    let n: i64 = sqlx::query_scalar(
        "SELECT COUNT(*) FROM model_key_bindings WHERE model_key_id = $1 AND model_service_id = $2",
    )
    .bind(key_id)
    .bind(service_id)
    .fetch_one(&mut *conn)
    .await?;
    Ok(n > 0)
}

/// The services a key is bound to, by name.
async fn bound_services(conn: &mut sqlx::AnyConnection, key_id: &str) -> Result<Vec<Named>> {
    let rows = sqlx::query(
        "SELECT s.id, s.name FROM model_key_bindings b JOIN model_services s ON s.id = b.model_service_id \
         WHERE b.model_key_id = $1 ORDER BY s.name",
    )
    .bind(key_id)
    .fetch_all(&mut *conn)
    .await?;
    rows.iter().map(named).collect()
}

/// A model key with the services it is bound to.
async fn model_key_from_row(conn: &mut sqlx::AnyConnection, row: &AnyRow) -> Result<ModelKey> {
    let mut key = model_key_base(row)?;
    key.model_services = bound_services(conn, &key.id).await?;
    Ok(key)
}
