//! Consumers: create, read, list, update and delete (refused while keys are bound).
//! Depends on `domain`.

use sqlx::Row;
use sqlx::any::AnyRow;

use super::audit::Audit;
use super::lifecycle::refuse_while_referenced;
use super::limits::{spend_of, write_limits};
use super::lookup::{ensure_unique_name, find};
use super::mutation::{rename_and_describe, touch};
use super::rows::{CONSUMER_COLUMNS, consumer_base, named, new_id, scope_mode};
use super::scopes::{read_scope, resolve_scope, update_scope, write_scope};
use super::usage::remember_deleted_name;
use super::{Actor, Page, PageRequest, Result, Store};
use crate::domain::input::{ConsumerPatch, NewConsumer};
use crate::domain::{Consumer, Named, ResourceKind, RuleError, Scope, Selector, Timestamp};

const KIND: ResourceKind = ResourceKind::Consumer;

impl Store {
    pub async fn create_consumer(&self, actor: &Actor, req: NewConsumer) -> Result<Consumer> {
        req.validate()?;
        let limits = req.limits.parse("limits").map_err(RuleError::Invalid)?;
        let mut m = self.begin(actor).await?;
        ensure_unique_name(&mut m.tx, KIND, &req.name, None).await?;
        let scope = resolve_scope(&mut m.tx, "scope", &req.scope).await?;
        let id = new_id();
        sqlx::query(
            "INSERT INTO consumers (id, name, description, scope_mode, create_time, update_time) VALUES ($1, $2, $3, $4, $5, $5)",
        )
        .bind(&id)
        .bind(&req.name)
        .bind(&req.description)
        .bind(scope_mode(&scope))
        .bind(m.now.0)
        .execute(&mut *m.tx)
        .await?;
        write_scope(&mut m.tx, KIND, &id, &scope).await?;
        let mut fields = vec!["name", "description"];
        if scope != Scope::Unset {
            fields.push("scope");
        }
        if !limits.is_unlimited() {
            write_limits(&mut m, KIND, &id, &limits).await?;
            fields.push("limits");
        }
        let audit = Audit::new("CreateConsumer", KIND, &id, &req.name, &fields);
        self.commit(m, audit).await?;
        self.get_consumer(&Selector::Id(id)).await
    }

    pub async fn get_consumer(&self, sel: &Selector) -> Result<Consumer> {
        let mut conn = self.pool.acquire().await?;
        let id = find(&mut conn, KIND, sel).await?.id;
        let row = sqlx::query(&format!(
            "SELECT {CONSUMER_COLUMNS} FROM consumers WHERE id = $1"
        ))
        .bind(&id)
        .fetch_one(&mut *conn)
        .await?;
        consumer_from_row(&mut conn, &row).await
    }

    pub async fn list_consumers(&self, page: &PageRequest) -> Result<Page<Consumer>> {
        let mut conn = self.pool.acquire().await?;
        let rows = sqlx::query(&format!(
            "SELECT {CONSUMER_COLUMNS} FROM consumers WHERE name > $1 ORDER BY name LIMIT $2"
        ))
        .bind(page.cursor())
        .bind(page.limit())
        .fetch_all(&mut *conn)
        .await?;
        let (rows, more) = page.split(rows);
        let mut items = Vec::with_capacity(rows.len());
        for row in &rows {
            items.push(consumer_from_row(&mut conn, row).await?);
        }
        Ok(Page::new(items, more, |c| c.name.clone()))
    }

    pub async fn update_consumer(
        &self,
        actor: &Actor,
        sel: &Selector,
        patch: ConsumerPatch,
    ) -> Result<Consumer> {
        patch.validate()?;
        let limits = patch
            .limits
            .as_ref()
            .map(|l| l.parse("consumer.limits").map_err(RuleError::Invalid))
            .transpose()?;
        let mut m = self.begin(actor).await?;
        let found = find(&mut m.tx, KIND, sel).await?;
        let id = found.id;
        let mut fields = Vec::new();
        let (name, description) = (patch.name.as_deref(), patch.description.as_deref());
        rename_and_describe(&mut m, KIND, &id, name, description, &mut fields).await?;
        if let Some(s) = &patch.scope {
            update_scope(&mut m, KIND, &id, "consumer.scope", s, &mut fields).await?;
        }
        if let Some(l) = &limits {
            write_limits(&mut m, KIND, &id, l).await?;
            fields.push("limits");
        }
        touch(&mut m, KIND, &id).await?;
        let name = patch.name.clone().unwrap_or(found.name);
        let audit = Audit::new("UpdateConsumer", KIND, &id, &name, &fields);
        self.commit(m, audit).await?;
        self.get_consumer(&Selector::Id(id)).await
    }

    pub async fn delete_consumer(&self, actor: &Actor, sel: &Selector) -> Result<()> {
        let mut m = self.begin(actor).await?;
        let consumer = find(&mut m.tx, KIND, sel).await?;
        let keys = consumer_keys(&mut m.tx, &consumer.id).await?;
        let deps = keys.into_iter().map(|k| (ResourceKind::ConsumerKey, k));
        refuse_while_referenced(KIND, &consumer.name, deps)?;
        write_scope(&mut m.tx, KIND, &consumer.id, &Scope::Unset).await?;
        sqlx::query("DELETE FROM consumers WHERE id = $1")
            .bind(&consumer.id)
            .execute(&mut *m.tx)
            .await?;
        remember_deleted_name(&mut m.tx, KIND, &consumer.id, &consumer.name, m.now).await?;
        let audit = Audit::new("DeleteConsumer", KIND, &consumer.id, &consumer.name, &[]);
        self.commit(m, audit).await?;
        Ok(())
    }
}

/// A consumer with its scope and the keys bound to it.
async fn consumer_from_row(conn: &mut sqlx::AnyConnection, row: &AnyRow) -> Result<Consumer> {
    let id: String = row.try_get("id")?;
    let scope = read_scope(conn, &id, row.try_get("scope_mode")?).await?;
    let mut consumer = consumer_base(row, scope)?;
    consumer.consumer_keys = consumer_keys(conn, &id).await?;
    consumer.spend = spend_of(conn, KIND, &id, &consumer.limits, Timestamp::now()).await?;
    Ok(consumer)
}

/// The consumer keys bound to a consumer, by name.
async fn consumer_keys(conn: &mut sqlx::AnyConnection, consumer_id: &str) -> Result<Vec<Named>> {
    let rows =
        sqlx::query("SELECT id, name FROM consumer_keys WHERE consumer_id = $1 ORDER BY name")
            .bind(consumer_id)
            .fetch_all(&mut *conn)
            .await?;
    rows.iter().map(named).collect()
}
