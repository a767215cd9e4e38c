//! Persistence: one `Store` over SQLite (embedded default) or PostgreSQL, with the same
//! queries on both. Every mutation is one transaction that first bumps the store revision (on
//! PostgreSQL that row lock also serialises quota, bind and delete checks across replicas),
//! then appends an audit row and a change record, and commits before returning.
//! Depends on `domain` and `crypto`.
//!
//! One file per resource and per concern: `consumers`, `model_services`, `consumer_keys`,
//! `model_keys` (each resource's lifecycle), `lifecycle` (rules both key kinds share),
//! `secret_values` (SECRET_REF values and their rotation), `import` (bulk consumer keys),
//! `mutation` (begin/commit), `audit`, `changes` and `contents` (what the snapshot builder
//! reads), `lookup` and `scopes` (resolving names), `rows` (SQL codes and row decoding),
//! `listen` (commit notifications), `epoch` (which history of revisions the store is in), `schema` (migrations), `admin_tokens` (named admin
//! credentials, SPEC §9), `usage` (usage reports applied exactly once, the usage query, SPEC §8.2),
//! `limits` (budgets and rate limits, and the spend of a budget's period, SPEC §8.3).

mod admin_tokens;
mod audit;
mod changes;
mod consumer_keys;
mod consumers;
mod contents;
mod epoch;
mod import;
mod lifecycle;
mod limits;
mod listen;
mod lookup;
mod model_keys;
mod model_services;
mod mutation;
mod rows;
mod schema;
mod scopes;
mod secret_values;
mod usage;

use std::sync::Arc;
use std::time::Duration;

use sqlx::any::AnyPoolOptions;
use sqlx::{AnyPool, Executor, Row};
use tokio::sync::watch;

use crate::crypto::{CryptoError, Keys};
use crate::domain::{Limits, RuleError};

pub use audit::AuditFilter;
pub use changes::{Changes, Increment};
pub use consumer_keys::{ConsumerKeyFilter, CreatedConsumerKey, RotatedConsumerKey};
pub use contents::{EncryptedModelKeys, KeyRow, StoreContents};
pub use epoch::EPOCH_ACTOR;
pub use limits::{BUDGET_ACTOR, BudgetChange};
pub use lookup::{Page, PageRequest};
pub use model_keys::ModelKeyFilter;
pub use secret_values::{Refreshed, SECRET_REFRESH_ACTOR, SecretKey};
pub use usage::USAGE_CURSOR_IDLE_MICROS;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Backend {
    Sqlite,
    Postgres,
}

#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error(transparent)]
    Rule(#[from] RuleError),
    #[error("database error: {0}")]
    Database(#[from] sqlx::Error),
    #[error("migration failed: {0}")]
    Migrate(#[from] sqlx::migrate::MigrateError),
    #[error(transparent)]
    Crypto(#[from] CryptoError),
    #[error(
        "the master key does not match this store (store expects key fingerprint {expected}, this process has {actual}): every replica and data plane must use the same master key"
    )]
    MasterKeyMismatch { expected: String, actual: String },
    #[error("unsupported store URL scheme {0:?}: use sqlite://PATH or postgres://…")]
    UnsupportedUrl(String),
    #[error("corrupt record: {0}")]
    Corrupt(String),
}

pub type Result<T, E = StoreError> = std::result::Result<T, E>;

/// Who made a change: the name of the admin credential (SPEC §9), never its value.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Actor(pub String);

#[derive(Clone)]
pub struct Store {
    pool: AnyPool,
    backend: Backend,
    store_id: String,
    keys: Keys,
    limits: Limits,
    committed: Arc<watch::Sender<i64>>,
    /// PostgreSQL URL, for LISTEN (other replicas' commits).
    listen_url: Option<String>,
}

impl std::fmt::Debug for Store {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Store")
            .field("backend", &self.backend)
            .field("store_id", &self.store_id)
            .finish_non_exhaustive()
    }
}

/// Names every model service whose `models` list, informational before schema version 4, was
/// moved aside by that migration and not set again: it is not enforced (see V4).
async fn warn_legacy_models(pool: &sqlx::AnyPool) -> Result<()> {
    let rows =
        sqlx::query("SELECT name, legacy_models FROM model_services WHERE legacy_models <> '[]'")
            .fetch_all(pool)
            .await?;
    for row in rows {
        let name: String = sqlx::Row::try_get(&row, "name")?;
        let legacy: String = sqlx::Row::try_get(&row, "legacy_models")?;
        tracing::warn!(
            model_service = %name,
            informational_models = %legacy,
            "this model service's models list was informational before model-level scope and is \
             not enforced; set it with UpdateModelService (update_mask models) to enforce it"
        );
    }
    Ok(())
}

impl Store {
    /// Opens (and migrates) the store at `url`. `fingerprint` is the master key's: a store
    /// created under another key refuses to open.
    pub async fn open(
        url: &str,
        master_fingerprint: &str,
        keys: Keys,
        limits: Limits,
    ) -> Result<Store> {
        sqlx::any::install_default_drivers();
        let backend = backend_of(url)?;
        let url = match backend {
            Backend::Sqlite if !url.contains("mode=") => {
                let sep = if url.contains('?') { '&' } else { '?' };
                format!("{url}{sep}mode=rwc")
            }
            _ => url.to_string(),
        };
        let pool = connect(backend, &url).await?;
        schema::migrator(backend).run(&pool).await?;
        warn_legacy_models(&pool).await?;
        let (store_id, revision) = claim_meta(&pool, master_fingerprint).await?;
        let (tx, _) = watch::channel(revision);
        let listen_url = (backend == Backend::Postgres).then(|| url.clone());
        Ok(Store {
            listen_url,
            pool,
            backend,
            store_id,
            keys,
            limits,
            committed: Arc::new(tx),
        })
    }

    pub fn backend(&self) -> Backend {
        self.backend
    }

    pub fn store_id(&self) -> &str {
        &self.store_id
    }

    pub fn keys(&self) -> &Keys {
        &self.keys
    }

    pub fn limits(&self) -> &Limits {
        &self.limits
    }

    pub async fn revision(&self) -> Result<i64> {
        Ok(
            sqlx::query_scalar("SELECT revision FROM store_meta WHERE id = 1")
                .fetch_one(&self.pool)
                .await?,
        )
    }

    pub async fn close(&self) {
        self.pool.close().await;
    }
}

fn backend_of(url: &str) -> Result<Backend> {
    if url.starts_with("sqlite:") {
        Ok(Backend::Sqlite)
    } else if url.starts_with("postgres:") || url.starts_with("postgresql:") {
        Ok(Backend::Postgres)
    } else {
        // Only the scheme: the rest may hold a password.
        let scheme = url.split_once("://").map_or("(none)", |(s, _)| s);
        Err(StoreError::UnsupportedUrl(scheme.to_string()))
    }
}

async fn connect(backend: Backend, url: &str) -> Result<AnyPool> {
    let mut opts = AnyPoolOptions::new()
        .max_connections(match backend {
            Backend::Sqlite => 4,
            Backend::Postgres => 8,
        })
        .acquire_timeout(Duration::from_secs(10));
    if backend == Backend::Sqlite {
        opts = opts.after_connect(|conn, _meta| {
            Box::pin(async move {
                conn.execute("PRAGMA journal_mode = WAL").await?;
                conn.execute("PRAGMA foreign_keys = ON").await?;
                conn.execute("PRAGMA busy_timeout = 10000").await?;
                conn.execute("PRAGMA synchronous = FULL").await?;
                Ok(())
            })
        });
    }
    Ok(opts.connect(url).await?)
}

/// The store's id and revision; a new store is stamped with this master key's fingerprint,
/// an existing one must carry it.
async fn claim_meta(pool: &AnyPool, master_fingerprint: &str) -> Result<(String, i64)> {
    let new_id = uuid::Uuid::new_v4().to_string();
    sqlx::query(
        "INSERT INTO store_meta (id, store_id, revision, master_key_fingerprint) \
         VALUES (1, $1, 0, $2) ON CONFLICT (id) DO NOTHING",
    )
    .bind(&new_id)
    .bind(master_fingerprint)
    .execute(pool)
    .await?;
    let row = sqlx::query(
        "SELECT store_id, revision, master_key_fingerprint FROM store_meta WHERE id = 1",
    )
    .fetch_one(pool)
    .await?;
    let expected: String = row.try_get("master_key_fingerprint")?;
    if expected != master_fingerprint {
        return Err(StoreError::MasterKeyMismatch {
            expected,
            actual: master_fingerprint.to_string(),
        });
    }
    Ok((row.try_get("store_id")?, row.try_get("revision")?))
}
