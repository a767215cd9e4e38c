//! Everything the data plane needs, read in one consistent transaction: what the snapshot
//! builder loads at start-up and whenever an incremental update will not do. Depends on
//! `domain` and `crypto`.

use std::collections::HashMap;

use futures::TryStreamExt;
use sqlx::{Any, Row, Transaction};

use super::rows::{
    CONSUMER_COLUMNS, KEY_ROW_COLUMNS, MODEL_KEY_COLUMNS, SERVICE_COLUMNS, consumer_base,
    fixed_scope, key_row, model_grant, model_key_base, named, service_base,
};
use super::{Backend, Result, Store, StoreError};
use crate::crypto::KeyHash;
use crate::domain::limits::Limits;
use crate::domain::{
    Consumer, KeyStatus, ModelGrant, ModelKey, ModelService, Named, Scope, Timestamp,
};

/// Everything the data plane needs, read in one consistent transaction.
#[derive(Debug)]
pub struct StoreContents {
    pub store_id: String,
    /// The store's epoch at `revision` (see `epoch`).
    pub epoch: String,
    pub revision: i64,
    /// The history mark of `revision` (see `Store::revision_mark`).
    pub mark: i64,
    pub consumers: Vec<Consumer>,
    pub model_services: Vec<ModelService>,
    /// Model keys with their ciphertext (decrypted by the snapshot builder).
    pub model_keys: Vec<(ModelKey, Vec<u8>)>,
}

/// A consumer key as the data plane needs it: no description, mask or times.
#[derive(Debug)]
pub struct KeyRow {
    pub id: String,
    pub name: String,
    pub status: KeyStatus,
    pub hash: KeyHash,
    pub consumer_id: Option<String>,
    pub scope: Scope,
    pub expire_time: Option<Timestamp>,
    /// Canonical allowlist entries.
    pub ip_allowlist: Vec<String>,
    /// Its budgets and rate limits.
    pub limits: Limits,
    /// Until when its budget refuses (SPEC §8.3), kept by the control plane.
    pub budget_exhausted_until: Option<Timestamp>,
    /// After a rotation: the previous value's HMAC and the instant it stops authorizing (kept
    /// after that instant, until the next rotation; data planes compare with their clock).
    pub previous: Option<(KeyHash, Timestamp)>,
}

/// Model keys with their ciphertext.
pub type EncryptedModelKeys = Vec<(ModelKey, Vec<u8>)>;

/// The history mark of a revision: the commit time (µs) of the audit row every revision
/// writes in its transaction, 0 for none (revision 0). Two histories of one store (a restore
/// changed back up to a revision) have other rows at that revision, so other marks: what a
/// control plane checks its published revision against (`Changes::Diverged`). Audit rows
/// are never deleted: a retention that removed them would have to keep the marks.
pub(super) async fn revision_mark(conn: &mut sqlx::AnyConnection, revision: i64) -> Result<i64> {
    let time: Option<i64> = sqlx::query_scalar("SELECT time FROM audit_events WHERE revision = $1")
        .bind(revision)
        .fetch_optional(&mut *conn)
        .await?;
    Ok(time.unwrap_or(0))
}

impl Store {
    /// A read-only transaction that sees one revision throughout (on PostgreSQL, repeatable
    /// read; SQLite's single writer gives the same), that revision and the store's epoch.
    pub(super) async fn begin_read(&self) -> Result<(Transaction<'static, Any>, i64, String)> {
        let mut tx = self.pool.begin().await?;
        if self.backend == Backend::Postgres {
            sqlx::query("SET TRANSACTION ISOLATION LEVEL REPEATABLE READ, READ ONLY")
                .execute(&mut *tx)
                .await?;
        }
        let (revision, epoch): (i64, String) =
            sqlx::query_as("SELECT revision, epoch FROM store_meta WHERE id = 1")
                .fetch_one(&mut *tx)
                .await?;
        Ok((tx, revision, epoch))
    }

    /// Reads every resource the data plane needs, in one consistent read. Consumer keys are
    /// streamed to `on_key` (never all held as rows at once: there may be millions).
    pub async fn load_contents(
        &self,
        mut on_key: impl FnMut(KeyRow) -> std::result::Result<(), String>,
    ) -> Result<StoreContents> {
        let (mut tx, revision, epoch) = self.begin_read().await?;
        let mark = revision_mark(&mut tx, revision).await?;
        let mut scopes = load_scope_lists(&mut tx).await?;
        let mut scope_of = |id: &str, mode: i64| {
            fixed_scope(mode).unwrap_or_else(|| {
                let (services, models) = scopes.remove(id).unwrap_or_default();
                Scope::List { services, models }
            })
        };
        let mut consumers = Vec::new();
        for r in sqlx::query(&format!("SELECT {CONSUMER_COLUMNS} FROM consumers"))
            .fetch_all(&mut *tx)
            .await?
        {
            let scope = scope_of(&r.try_get::<String, _>("id")?, r.try_get("scope_mode")?);
            consumers.push(consumer_base(&r, scope)?);
        }
        let (model_services, model_keys) = load_services(&mut tx).await?;
        {
            let sql = format!("SELECT {KEY_ROW_COLUMNS} FROM consumer_keys k");
            let mut rows = sqlx::query(&sql).fetch(&mut *tx);
            while let Some(r) = rows.try_next().await? {
                let scope = scope_of(&r.try_get::<String, _>("id")?, r.try_get("scope_mode")?);
                if let Some(k) = key_row(&r, scope)? {
                    on_key(k).map_err(StoreError::Corrupt)?;
                }
            }
        }
        tx.commit().await?;
        Ok(StoreContents {
            store_id: self.store_id.clone(),
            epoch,
            revision,
            mark,
            consumers,
            model_services,
            model_keys,
        })
    }
}

/// A listed scope's services and model entries.
type ScopeLists = (Vec<Named>, Vec<ModelGrant>);

/// Every listed scope, by owner id, each list in its order.
async fn load_scope_lists(conn: &mut sqlx::AnyConnection) -> Result<HashMap<String, ScopeLists>> {
    let mut scopes: HashMap<String, ScopeLists> = HashMap::new();
    for r in sqlx::query(
        "SELECT s.owner_id, m.id, m.name FROM scope_entries s JOIN model_services m ON m.id = s.model_service_id \
         ORDER BY s.owner_id, s.position",
    )
    .fetch_all(&mut *conn)
    .await?
    {
        scopes
            .entry(r.try_get("owner_id")?)
            .or_default()
            .0
            .push(named(&r)?);
    }
    for r in sqlx::query(
        "SELECT s.owner_id, m.id, m.name, s.pattern FROM scope_models s JOIN model_services m ON m.id = s.model_service_id \
         ORDER BY s.owner_id, s.position",
    )
    .fetch_all(&mut *conn)
    .await?
    {
        scopes
            .entry(r.try_get("owner_id")?)
            .or_default()
            .1
            .push(model_grant(&r)?);
    }
    Ok(scopes)
}

/// Every model service with its bound keys, and every model key with its ciphertext.
pub(super) async fn load_services(
    conn: &mut sqlx::AnyConnection,
) -> Result<(Vec<ModelService>, EncryptedModelKeys)> {
    let mut bindings: HashMap<String, Vec<Named>> = HashMap::new();
    let mut service_keys: HashMap<String, Vec<Named>> = HashMap::new();
    for r in sqlx::query(
        "SELECT b.model_key_id, b.model_service_id, s.name AS service_name, k.name AS key_name \
             FROM model_key_bindings b JOIN model_services s ON s.id = b.model_service_id \
             JOIN model_keys k ON k.id = b.model_key_id ORDER BY b.create_time",
    )
    .fetch_all(&mut *conn)
    .await?
    {
        let kid: String = r.try_get("model_key_id")?;
        let sid: String = r.try_get("model_service_id")?;
        bindings.entry(kid.clone()).or_default().push(Named {
            id: sid.clone(),
            name: r.try_get("service_name")?,
        });
        service_keys.entry(sid).or_default().push(Named {
            id: kid,
            name: r.try_get("key_name")?,
        });
    }

    let mut model_services = Vec::new();
    for r in sqlx::query(&format!("SELECT {SERVICE_COLUMNS} FROM model_services"))
        .fetch_all(&mut *conn)
        .await?
    {
        let mut s = service_base(&r)?;
        s.model_keys = service_keys.remove(&s.id).unwrap_or_default();
        model_services.push(s);
    }

    let mut model_keys = Vec::new();
    for r in sqlx::query(&format!(
        "SELECT {MODEL_KEY_COLUMNS}, ciphertext FROM model_keys"
    ))
    .fetch_all(&mut *conn)
    .await?
    {
        let mut k = model_key_base(&r)?;
        k.model_services = bindings.remove(&k.id).unwrap_or_default();
        let ct: Option<Vec<u8>> = r.try_get("ciphertext")?;
        model_keys.push((k, ct.unwrap_or_default()));
    }

    Ok((model_services, model_keys))
}
