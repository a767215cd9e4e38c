//! Persistence: one `Store` over SQLite (embedded default) or PostgreSQL, with the same
//! queries on both. Every mutation is one transaction that first bumps the store revision (on
//! PostgreSQL that row lock also serialises quota, bind and delete checks across replicas),
//! then appends an audit row and a change record, and commits before returning.
//! Depends on `domain` and `crypto`.

mod schema;

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use ipnet::IpNet;
use sqlx::any::{AnyPoolOptions, AnyRow};
use sqlx::{Any, AnyPool, Executor, Row, Transaction};
use tokio::sync::watch;

use crate::crypto::{self, CryptoError, KeyHash, Keys, Secret};
use crate::domain::input::{
    ConsumerKeyPatch, ConsumerPatch, KeySource, ModelKeyPatch, ModelServicePatch, NewConsumer,
    NewConsumerKey, NewModelKey, NewModelService,
};
use crate::domain::validate::ip_entry_display;
use crate::domain::{
    AuditEvent, Consumer, ConsumerKey, GenerationMethod, KeyStatus, Limits, ModelKey, ModelService,
    Named, ResourceKind, RuleError, Scope, ScopeInput, SecretRef, Selector, Timestamp,
    dependency_error, mask,
};

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

/// Who made a change: a non-secret fingerprint of the credential.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Actor(pub String);

/// One page of a listing.
#[derive(Clone, Debug)]
pub struct Page<T> {
    pub items: Vec<T>,
    /// Where the next page starts; `None` on the last page.
    pub next: Option<String>,
}

/// A page request: `after` is the opaque cursor from a previous page.
#[derive(Clone, Debug, Default)]
pub struct PageRequest {
    pub size: usize,
    pub after: Option<String>,
}

#[derive(Clone, Debug, Default)]
pub struct ConsumerKeyFilter {
    pub consumer: Option<String>,
    pub status: Option<KeyStatus>,
}

#[derive(Clone, Debug, Default)]
pub struct ModelKeyFilter {
    pub model_service: Option<String>,
    pub status: Option<KeyStatus>,
}

#[derive(Clone, Debug, Default)]
pub struct AuditFilter {
    pub kind: Option<ResourceKind>,
    pub name: Option<String>,
    pub start: Option<Timestamp>,
    pub end: Option<Timestamp>,
}

/// Everything the data plane needs, read in one consistent transaction.
#[derive(Debug)]
pub struct StoreContents {
    pub store_id: String,
    pub revision: i64,
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
}

const KEY_ROW_COLUMNS: &str = "k.id, k.name, k.status, k.key_hash, k.consumer_id, k.scope_mode, k.ip_allowlist, k.expire_time";

/// A `KeyRow` from a row of `KEY_ROW_COLUMNS`; `None` for a key with no value yet.
fn key_row(r: &AnyRow, scope: Scope) -> Result<Option<KeyRow>> {
    let Some(hash) = r
        .try_get::<Option<Vec<u8>>, _>("key_hash")?
        .and_then(|h| <KeyHash>::try_from(h.as_slice()).ok())
    else {
        return Ok(None);
    };
    let allowlist: String = r.try_get("ip_allowlist")?;
    Ok(Some(KeyRow {
        id: r.try_get("id")?,
        name: r.try_get("name")?,
        status: status_of(r)?,
        hash,
        consumer_id: r.try_get("consumer_id")?,
        scope,
        expire_time: r.try_get::<Option<i64>, _>("expire_time")?.map(Timestamp),
        ip_allowlist: if allowlist.is_empty() {
            Vec::new()
        } else {
            allowlist.split(',').map(str::to_string).collect()
        },
    }))
}

/// The audit actor of changes the background secret refresh makes.
pub const SECRET_REFRESH_ACTOR: &str = "keygate:secret-refresh";

/// What `Store::secret_value_changed` did.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Refreshed {
    /// The key now has the new value (a new revision).
    Applied,
    /// Nothing to do: the key is gone, re-pointed, already holds the value, or was changed
    /// by someone else since the caller read it.
    Skipped,
    /// Another consumer key holds the value: this key's old HMAC was dropped and it
    /// authorizes nothing until its secret changes.
    Collision,
}

/// A SECRET_REF key as the background refresh sees it.
#[derive(Clone, Debug)]
pub struct SecretKey {
    pub kind: ResourceKind,
    pub id: String,
    pub name: String,
    pub reference: SecretRef,
    /// A consumer key's stored HMAC (of the value last resolved).
    pub key_hash: Option<KeyHash>,
}

/// The result of creating a consumer key: the record and the one-time value.
#[derive(Debug)]
pub struct CreatedConsumerKey {
    pub key: ConsumerKey,
    pub value: Option<Secret>,
}

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

const CONSUMER_KEY_COLUMNS: &str = "k.id, k.name, k.description, k.status, k.generation_method, \
     k.masked_value, k.secret_provider, k.secret_name, k.secret_version, k.consumer_id, \
     c.name AS consumer_name, k.scope_mode, k.ip_allowlist, k.expire_time, k.create_time, \
     k.update_time, k.last_used_time";

const MODEL_KEY_COLUMNS: &str = "id, name, description, status, generation_method, masked_value, \
     secret_provider, secret_name, secret_version, create_time, update_time";

const CONSUMER_COLUMNS: &str = "id, name, description, scope_mode, create_time, update_time";

const SERVICE_COLUMNS: &str = "id, name, description, provider, auth_header, auth_value_template, \
     models, create_time, update_time";

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
        let backend = if url.starts_with("sqlite:") {
            Backend::Sqlite
        } else if url.starts_with("postgres:") || url.starts_with("postgresql:") {
            Backend::Postgres
        } else {
            // Only the scheme: the rest may hold a password.
            let scheme = url.split_once("://").map_or("(none)", |(s, _)| s);
            return Err(StoreError::UnsupportedUrl(scheme.to_string()));
        };
        let url = match backend {
            Backend::Sqlite if !url.contains("mode=") => {
                let sep = if url.contains('?') { '&' } else { '?' };
                format!("{url}{sep}mode=rwc")
            }
            _ => url.to_string(),
        };
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
        let pool = opts.connect(&url).await?;
        schema::migrator(backend).run(&pool).await?;

        let new_id = uuid::Uuid::new_v4().to_string();
        sqlx::query(
            "INSERT INTO store_meta (id, store_id, revision, master_key_fingerprint) \
             VALUES (1, $1, 0, $2) ON CONFLICT (id) DO NOTHING",
        )
        .bind(&new_id)
        .bind(master_fingerprint)
        .execute(&pool)
        .await?;
        let row = sqlx::query(
            "SELECT store_id, revision, master_key_fingerprint FROM store_meta WHERE id = 1",
        )
        .fetch_one(&pool)
        .await?;
        let store_id: String = row.try_get("store_id")?;
        let revision: i64 = row.try_get("revision")?;
        let expected: String = row.try_get("master_key_fingerprint")?;
        if expected != master_fingerprint {
            return Err(StoreError::MasterKeyMismatch {
                expected,
                actual: master_fingerprint.to_string(),
            });
        }
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

    /// The latest revision this process committed; wakes the snapshot builder.
    pub fn subscribe_commits(&self) -> watch::Receiver<i64> {
        self.committed.subscribe()
    }

    /// On PostgreSQL: LISTENs for commits made through other replicas and wakes this
    /// process's snapshot builder (the revision stays the truth: a missed notification is
    /// caught by the builder's periodic check). Runs until `shutdown` resolves.
    pub async fn listen_for_changes(self, shutdown: impl std::future::Future<Output = ()>) {
        let Some(url) = self.listen_url.clone() else {
            return;
        };
        tokio::pin!(shutdown);
        let mut backoff = Duration::from_millis(100);
        loop {
            let listener = async {
                let mut l = sqlx::postgres::PgListener::connect(&url).await?;
                l.listen("keygate_changes").await?;
                Ok::<_, sqlx::Error>(l)
            };
            let mut l = tokio::select! {
                _ = &mut shutdown => return,
                l = listener => match l {
                    Ok(l) => l,
                    Err(e) => {
                        tracing::warn!(error = %e, "LISTEN for store changes failed; retrying");
                        tokio::select! {
                            _ = &mut shutdown => return,
                            _ = tokio::time::sleep(backoff) => {}
                        }
                        backoff = (backoff * 2).min(Duration::from_secs(5));
                        continue;
                    }
                },
            };
            backoff = Duration::from_millis(100);
            loop {
                let n = tokio::select! {
                    _ = &mut shutdown => return,
                    n = l.recv() => n,
                };
                match n {
                    Ok(n) => match n.payload().parse::<i64>() {
                        Ok(rev) => {
                            self.committed.send_if_modified(|r| {
                                if rev > *r {
                                    *r = rev;
                                    true
                                } else {
                                    false
                                }
                            });
                        }
                        Err(_) => self.committed.send_modify(|_| ()),
                    },
                    Err(e) => {
                        tracing::warn!(error = %e, "store change notifications interrupted; reconnecting");
                        break;
                    }
                }
            }
        }
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

    async fn begin(&self, actor: &Actor) -> Result<Mutation> {
        let mut tx = self.pool.begin().await?;
        let revision: i64 = sqlx::query_scalar(
            "UPDATE store_meta SET revision = revision + 1 WHERE id = 1 RETURNING revision",
        )
        .fetch_one(&mut *tx)
        .await?;
        Ok(Mutation {
            tx,
            revision,
            actor: actor.clone(),
            changed: Vec::new(),
            full_reload: false,
            removed_hashes: Vec::new(),
            now: Timestamp::now(),
        })
    }

    async fn commit(&self, m: Mutation, audit: Audit<'_>) -> Result<i64> {
        let Mutation {
            mut tx,
            revision,
            actor,
            mut changed,
            full_reload,
            removed_hashes,
            now,
        } = m;
        sqlx::query(
            "INSERT INTO audit_events (revision, time, actor, action, kind, resource_id, resource_name, changed_fields) \
             VALUES ($1, $2, $3, $4, $5, $6, $7, $8)",
        )
        .bind(revision)
        .bind(now.0)
        .bind(&actor.0)
        .bind(audit.action)
        .bind(audit.kind.as_i64())
        .bind(audit.id)
        .bind(audit.name)
        .bind(audit.fields.join(","))
        .execute(&mut *tx)
        .await?;
        changed.push((audit.kind, audit.id.to_string()));
        changed.sort();
        changed.dedup();
        if full_reload {
            changed.clear();
            sqlx::query("INSERT INTO changes (revision, kind, resource_id) VALUES ($1, 0, '')")
                .bind(revision)
                .execute(&mut *tx)
                .await?;
        }
        for (kind, id) in &changed {
            sqlx::query("INSERT INTO changes (revision, kind, resource_id) VALUES ($1, $2, $3)")
                .bind(revision)
                .bind(kind.as_i64())
                .bind(id)
                .execute(&mut *tx)
                .await?;
        }
        for hash in removed_hashes {
            sqlx::query(
                "INSERT INTO changes (revision, kind, resource_id, key_hash) VALUES ($1, $2, '', $3)",
            )
            .bind(revision)
            .bind(ResourceKind::ConsumerKey.as_i64())
            .bind(hash)
            .execute(&mut *tx)
            .await?;
        }
        if self.backend == Backend::Postgres {
            // Delivered at commit: wakes every replica's snapshot builder.
            sqlx::query("SELECT pg_notify('keygate_changes', $1)")
                .bind(revision.to_string())
                .execute(&mut *tx)
                .await?;
        }
        tx.commit().await?;
        self.committed.send_if_modified(|r| {
            if revision > *r {
                *r = revision;
                true
            } else {
                false
            }
        });
        tracing::info!(
            action = audit.action,
            kind = %audit.kind,
            resource_id = audit.id,
            resource_name = audit.name,
            changed_fields = %audit.fields.join(","),
            actor = %actor.0,
            revision,
            "admin change committed"
        );
        Ok(revision)
    }

    // ------------------------------------------------------------------ resolution helpers

    async fn find_id(
        &self,
        conn: &mut sqlx::AnyConnection,
        kind: ResourceKind,
        sel: &Selector,
    ) -> Result<(String, String)> {
        let table = table_of(kind);
        let row = match sel {
            Selector::Id(id) => {
                sqlx::query(&format!("SELECT id, name FROM {table} WHERE id = $1"))
                    .bind(id)
                    .fetch_optional(&mut *conn)
                    .await?
            }
            Selector::Name(n) => {
                sqlx::query(&format!("SELECT id, name FROM {table} WHERE name = $1"))
                    .bind(n)
                    .fetch_optional(&mut *conn)
                    .await?
            }
            Selector::IdOrName(v) => {
                sqlx::query(&format!(
                    "SELECT id, name FROM {table} WHERE id = $1 OR name = $1 ORDER BY CASE WHEN id = $1 THEN 0 ELSE 1 END"
                ))
                .bind(v)
                .fetch_optional(&mut *conn)
                .await?
            }
        };
        match row {
            Some(r) => Ok((r.try_get("id")?, r.try_get("name")?)),
            None => Err(RuleError::not_found(kind, sel).into()),
        }
    }

    /// Sets a resource's `update_time` to the mutation's time.
    async fn touch(&self, m: &mut Mutation, kind: ResourceKind, id: &str) -> Result<()> {
        sqlx::query(&format!(
            "UPDATE {} SET update_time = $1 WHERE id = $2",
            table_of(kind)
        ))
        .bind(m.now.0)
        .bind(id)
        .execute(&mut *m.tx)
        .await?;
        Ok(())
    }

    /// The name and description every resource has: a rename checks uniqueness.
    async fn rename_and_describe(
        &self,
        m: &mut Mutation,
        kind: ResourceKind,
        id: &str,
        name: Option<&str>,
        description: Option<&str>,
        fields: &mut Vec<&'static str>,
    ) -> Result<()> {
        let table = table_of(kind);
        if let Some(name) = name {
            self.ensure_unique_name(&mut m.tx, kind, name, Some(id))
                .await?;
            sqlx::query(&format!("UPDATE {table} SET name = $1 WHERE id = $2"))
                .bind(name)
                .bind(id)
                .execute(&mut *m.tx)
                .await?;
            fields.push("name");
        }
        if let Some(d) = description {
            sqlx::query(&format!(
                "UPDATE {table} SET description = $1 WHERE id = $2"
            ))
            .bind(d)
            .bind(id)
            .execute(&mut *m.tx)
            .await?;
            fields.push("description");
        }
        Ok(())
    }

    async fn ensure_unique_name(
        &self,
        conn: &mut sqlx::AnyConnection,
        kind: ResourceKind,
        name: &str,
        except_id: Option<&str>,
    ) -> Result<()> {
        let table = table_of(kind);
        let existing: Option<String> =
            sqlx::query_scalar(&format!("SELECT id FROM {table} WHERE name = $1"))
                .bind(name)
                .fetch_optional(&mut *conn)
                .await?;
        match existing {
            Some(id) if Some(id.as_str()) != except_id => Err(RuleError::AlreadyExists {
                kind,
                name: name.to_string(),
            }
            .into()),
            _ => Ok(()),
        }
    }

    /// Resolves a scope's service names (or ids) to the stored services.
    async fn resolve_scope(
        &self,
        conn: &mut sqlx::AnyConnection,
        field: &str,
        scope: &ScopeInput,
    ) -> Result<Scope> {
        Ok(match scope {
            ScopeInput::Unset => Scope::Unset,
            ScopeInput::All => Scope::All,
            ScopeInput::Services(names) => {
                let mut out: Vec<Named> = Vec::with_capacity(names.len());
                for n in names {
                    let sel = Selector::IdOrName(n.clone());
                    let (id, name) =
                        match self.find_id(conn, ResourceKind::ModelService, &sel).await {
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
                    if !out.iter().any(|x| x.id == id) {
                        out.push(Named { id, name });
                    }
                }
                Scope::Services(out)
            }
        })
    }

    async fn write_scope(
        &self,
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
                .bind(owner_kind.as_i64())
                .bind(owner_id)
                .bind(&s.id)
                .bind(i as i64)
                .execute(&mut *conn)
                .await?;
            }
        }
        Ok(())
    }

    async fn read_scope(
        &self,
        conn: &mut sqlx::AnyConnection,
        owner_id: &str,
        mode: i64,
    ) -> Result<Scope> {
        Ok(match mode {
            0 => Scope::Unset,
            1 => Scope::All,
            _ => {
                let rows = sqlx::query(
                    "SELECT m.id, m.name FROM scope_entries s JOIN model_services m ON m.id = s.model_service_id \
                     WHERE s.owner_id = $1 ORDER BY s.position",
                )
                .bind(owner_id)
                .fetch_all(&mut *conn)
                .await?;
                Scope::Services(rows.iter().map(named).collect::<Result<_>>()?)
            }
        })
    }

    // ------------------------------------------------------------------ consumers

    pub async fn create_consumer(&self, actor: &Actor, req: NewConsumer) -> Result<Consumer> {
        req.validate()?;
        let mut m = self.begin(actor).await?;
        self.ensure_unique_name(&mut m.tx, ResourceKind::Consumer, &req.name, None)
            .await?;
        let scope = self.resolve_scope(&mut m.tx, "scope", &req.scope).await?;
        let id = new_id();
        sqlx::query(
            "INSERT INTO consumers (id, name, description, scope_mode, create_time, update_time) VALUES ($1, $2, $3, $4, $5, $5)",
        )
        .bind(&id)
        .bind(&req.name)
        .bind(&req.description)
        .bind(scope.mode())
        .bind(m.now.0)
        .execute(&mut *m.tx)
        .await?;
        self.write_scope(&mut m.tx, ResourceKind::Consumer, &id, &scope)
            .await?;
        let mut fields = vec!["name", "description"];
        if scope != Scope::Unset {
            fields.push("scope");
        }
        self.commit(
            m,
            Audit::new(
                "CreateConsumer",
                ResourceKind::Consumer,
                &id,
                &req.name,
                &fields,
            ),
        )
        .await?;
        self.get_consumer(&Selector::Id(id)).await
    }

    pub async fn get_consumer(&self, sel: &Selector) -> Result<Consumer> {
        let mut conn = self.pool.acquire().await?;
        let (id, _) = self.find_id(&mut conn, ResourceKind::Consumer, sel).await?;
        let row = sqlx::query(&format!(
            "SELECT {CONSUMER_COLUMNS} FROM consumers WHERE id = $1"
        ))
        .bind(&id)
        .fetch_one(&mut *conn)
        .await?;
        self.consumer_from_row(&mut conn, &row).await
    }

    async fn consumer_from_row(
        &self,
        conn: &mut sqlx::AnyConnection,
        row: &AnyRow,
    ) -> Result<Consumer> {
        let id: String = row.try_get("id")?;
        let scope = self
            .read_scope(conn, &id, row.try_get("scope_mode")?)
            .await?;
        let keys =
            sqlx::query("SELECT id, name FROM consumer_keys WHERE consumer_id = $1 ORDER BY name")
                .bind(&id)
                .fetch_all(&mut *conn)
                .await?;
        Ok(Consumer {
            name: row.try_get("name")?,
            description: row.try_get("description")?,
            scope,
            consumer_keys: keys.iter().map(named).collect::<Result<_>>()?,
            create_time: Timestamp(row.try_get("create_time")?),
            update_time: Timestamp(row.try_get("update_time")?),
            id,
        })
    }

    pub async fn list_consumers(&self, page: &PageRequest) -> Result<Page<Consumer>> {
        let mut conn = self.pool.acquire().await?;
        let rows = sqlx::query(&format!(
            "SELECT {CONSUMER_COLUMNS} FROM consumers WHERE name > $1 ORDER BY name LIMIT $2"
        ))
        .bind(page.after.clone().unwrap_or_default())
        .bind(page.size as i64 + 1)
        .fetch_all(&mut *conn)
        .await?;
        let mut items = Vec::with_capacity(rows.len());
        for row in rows.iter().take(page.size) {
            items.push(self.consumer_from_row(&mut conn, row).await?);
        }
        Ok(paged(items, rows.len() > page.size, |c: &Consumer| {
            c.name.clone()
        }))
    }

    pub async fn update_consumer(
        &self,
        actor: &Actor,
        sel: &Selector,
        patch: ConsumerPatch,
    ) -> Result<Consumer> {
        patch.validate()?;
        let mut m = self.begin(actor).await?;
        let (id, old_name) = self.find_id(&mut m.tx, ResourceKind::Consumer, sel).await?;
        let mut fields = Vec::new();
        self.rename_and_describe(
            &mut m,
            ResourceKind::Consumer,
            &id,
            patch.name.as_deref(),
            patch.description.as_deref(),
            &mut fields,
        )
        .await?;
        if let Some(s) = &patch.scope {
            let scope = self.resolve_scope(&mut m.tx, "consumer.scope", s).await?;
            sqlx::query("UPDATE consumers SET scope_mode = $1 WHERE id = $2")
                .bind(scope.mode())
                .bind(&id)
                .execute(&mut *m.tx)
                .await?;
            self.write_scope(&mut m.tx, ResourceKind::Consumer, &id, &scope)
                .await?;
            fields.push("scope");
        }
        self.touch(&mut m, ResourceKind::Consumer, &id).await?;
        let name = patch.name.clone().unwrap_or(old_name);
        self.commit(
            m,
            Audit::new(
                "UpdateConsumer",
                ResourceKind::Consumer,
                &id,
                &name,
                &fields,
            ),
        )
        .await?;
        self.get_consumer(&Selector::Id(id)).await
    }

    pub async fn delete_consumer(&self, actor: &Actor, sel: &Selector) -> Result<()> {
        let mut m = self.begin(actor).await?;
        let (id, name) = self.find_id(&mut m.tx, ResourceKind::Consumer, sel).await?;
        let keys: Vec<String> = sqlx::query_scalar(
            "SELECT name FROM consumer_keys WHERE consumer_id = $1 ORDER BY name",
        )
        .bind(&id)
        .fetch_all(&mut *m.tx)
        .await?;
        if !keys.is_empty() {
            let deps: Vec<_> = keys
                .into_iter()
                .map(|k| (ResourceKind::ConsumerKey, k))
                .collect();
            return Err(dependency_error(ResourceKind::Consumer, &name, &deps).into());
        }
        sqlx::query("DELETE FROM scope_entries WHERE owner_id = $1")
            .bind(&id)
            .execute(&mut *m.tx)
            .await?;
        sqlx::query("DELETE FROM consumers WHERE id = $1")
            .bind(&id)
            .execute(&mut *m.tx)
            .await?;
        self.commit(
            m,
            Audit::new("DeleteConsumer", ResourceKind::Consumer, &id, &name, &[]),
        )
        .await?;
        Ok(())
    }

    // ------------------------------------------------------------------ model services

    pub async fn create_model_service(
        &self,
        actor: &Actor,
        mut req: NewModelService,
    ) -> Result<ModelService> {
        req.normalize()?;
        let mut m = self.begin(actor).await?;
        self.ensure_unique_name(&mut m.tx, ResourceKind::ModelService, &req.name, None)
            .await?;
        let id = new_id();
        sqlx::query(
            "INSERT INTO model_services (id, name, description, provider, auth_header, auth_value_template, models, create_time, update_time) \
             VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $8)",
        )
        .bind(&id)
        .bind(&req.name)
        .bind(&req.description)
        .bind(&req.provider)
        .bind(&req.auth_header)
        .bind(&req.auth_value_template)
        .bind(encode_list(&req.models))
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
        ];
        self.commit(
            m,
            Audit::new(
                "CreateModelService",
                ResourceKind::ModelService,
                &id,
                &req.name,
                &fields,
            ),
        )
        .await?;
        self.get_model_service(&Selector::Id(id)).await
    }

    pub async fn get_model_service(&self, sel: &Selector) -> Result<ModelService> {
        let mut conn = self.pool.acquire().await?;
        let (id, _) = self
            .find_id(&mut conn, ResourceKind::ModelService, sel)
            .await?;
        let row = sqlx::query(&format!(
            "SELECT {SERVICE_COLUMNS} FROM model_services WHERE id = $1"
        ))
        .bind(&id)
        .fetch_one(&mut *conn)
        .await?;
        self.service_from_row(&mut conn, &row).await
    }

    async fn service_from_row(
        &self,
        conn: &mut sqlx::AnyConnection,
        row: &AnyRow,
    ) -> Result<ModelService> {
        let id: String = row.try_get("id")?;
        let keys = sqlx::query(
            "SELECT k.id, k.name FROM model_key_bindings b JOIN model_keys k ON k.id = b.model_key_id \
             WHERE b.model_service_id = $1 ORDER BY k.name",
        )
        .bind(&id)
        .fetch_all(&mut *conn)
        .await?;
        let mut s = service_base(row)?;
        s.model_keys = keys.iter().map(named).collect::<Result<_>>()?;
        Ok(s)
    }

    pub async fn list_model_services(&self, page: &PageRequest) -> Result<Page<ModelService>> {
        let mut conn = self.pool.acquire().await?;
        let rows = sqlx::query(&format!(
            "SELECT {SERVICE_COLUMNS} FROM model_services WHERE name > $1 ORDER BY name LIMIT $2"
        ))
        .bind(page.after.clone().unwrap_or_default())
        .bind(page.size as i64 + 1)
        .fetch_all(&mut *conn)
        .await?;
        let mut items = Vec::with_capacity(rows.len());
        for row in rows.iter().take(page.size) {
            items.push(self.service_from_row(&mut conn, row).await?);
        }
        Ok(paged(items, rows.len() > page.size, |s: &ModelService| {
            s.name.clone()
        }))
    }

    pub async fn update_model_service(
        &self,
        actor: &Actor,
        sel: &Selector,
        patch: ModelServicePatch,
    ) -> Result<ModelService> {
        patch.validate()?;
        let mut m = self.begin(actor).await?;
        let (id, old_name) = self
            .find_id(&mut m.tx, ResourceKind::ModelService, sel)
            .await?;
        let mut fields = Vec::new();
        if let Some(name) = &patch.name {
            self.ensure_unique_name(&mut m.tx, ResourceKind::ModelService, name, Some(&id))
                .await?;
        }
        let text_fields: [(&str, Option<String>); 5] = [
            ("name", patch.name.clone()),
            ("description", patch.description.clone()),
            ("provider", patch.provider.clone()),
            ("auth_header", patch.auth_header.clone()),
            ("auth_value_template", patch.auth_value_template.clone()),
        ];
        for (col, val) in text_fields {
            if let Some(v) = val {
                sqlx::query(&format!(
                    "UPDATE model_services SET {col} = $1 WHERE id = $2"
                ))
                .bind(v)
                .bind(&id)
                .execute(&mut *m.tx)
                .await?;
                fields.push(col);
            }
        }
        if let Some(models) = &patch.models {
            sqlx::query("UPDATE model_services SET models = $1 WHERE id = $2")
                .bind(encode_list(models))
                .bind(&id)
                .execute(&mut *m.tx)
                .await?;
            fields.push("models");
        }
        self.touch(&mut m, ResourceKind::ModelService, &id).await?;
        let name = patch.name.clone().unwrap_or(old_name);
        self.commit(
            m,
            Audit::new(
                "UpdateModelService",
                ResourceKind::ModelService,
                &id,
                &name,
                &fields,
            ),
        )
        .await?;
        self.get_model_service(&Selector::Id(id)).await
    }

    pub async fn delete_model_service(&self, actor: &Actor, sel: &Selector) -> Result<()> {
        let mut m = self.begin(actor).await?;
        let (id, name) = self
            .find_id(&mut m.tx, ResourceKind::ModelService, sel)
            .await?;
        let deps = self.service_references(&mut m.tx, &id).await?;
        if !deps.is_empty() {
            let deps: Vec<_> = deps.into_iter().map(|(k, n)| (k, n.name)).collect();
            return Err(dependency_error(ResourceKind::ModelService, &name, &deps).into());
        }
        sqlx::query("DELETE FROM model_services WHERE id = $1")
            .bind(&id)
            .execute(&mut *m.tx)
            .await?;
        self.commit(
            m,
            Audit::new(
                "DeleteModelService",
                ResourceKind::ModelService,
                &id,
                &name,
                &[],
            ),
        )
        .await?;
        Ok(())
    }

    /// Bound model keys, then consumers and consumer keys whose scope names the service.
    async fn service_references(
        &self,
        conn: &mut sqlx::AnyConnection,
        id: &str,
    ) -> Result<Vec<(ResourceKind, Named)>> {
        let mut out = Vec::new();
        let keys = sqlx::query(
            "SELECT k.id, k.name FROM model_key_bindings b JOIN model_keys k ON k.id = b.model_key_id \
             WHERE b.model_service_id = $1 ORDER BY k.name",
        )
        .bind(id)
        .fetch_all(&mut *conn)
        .await?;
        for r in &keys {
            out.push((ResourceKind::ModelKey, named(r)?));
        }
        let consumers = sqlx::query(
            "SELECT c.id, c.name FROM scope_entries s JOIN consumers c ON c.id = s.owner_id \
             WHERE s.model_service_id = $1 ORDER BY c.name",
        )
        .bind(id)
        .fetch_all(&mut *conn)
        .await?;
        for r in &consumers {
            out.push((ResourceKind::Consumer, named(r)?));
        }
        let ckeys = sqlx::query(
            "SELECT k.id, k.name FROM scope_entries s JOIN consumer_keys k ON k.id = s.owner_id \
             WHERE s.model_service_id = $1 ORDER BY k.name",
        )
        .bind(id)
        .fetch_all(&mut *conn)
        .await?;
        for r in &ckeys {
            out.push((ResourceKind::ConsumerKey, named(r)?));
        }
        Ok(out)
    }

    // ------------------------------------------------------------------ consumer keys

    pub async fn create_consumer_key(
        &self,
        actor: &Actor,
        req: NewConsumerKey,
    ) -> Result<CreatedConsumerKey> {
        let allowlist = req.validate(&self.limits, Timestamp::now())?;
        let (value, reference) = match &req.source {
            KeySource::Auto => (crypto::generate_consumer_key(), None),
            KeySource::Custom(v) => (v.clone(), None),
            KeySource::SecretRef(r, v) => (resolved(r, v)?, Some(r)),
        };
        let hash = self.keys.hasher.hash(value.expose().as_bytes());
        let mut m = self.begin(actor).await?;
        self.ensure_unique_name(&mut m.tx, ResourceKind::ConsumerKey, &req.name, None)
            .await?;
        if self.value_in_use(&mut m.tx, &hash, None).await? {
            // Never say which key holds the value: that would confirm a guessed key.
            return Err(match reference {
                None => RuleError::invalid(
                    "value",
                    "this value is already in use by another consumer key; choose another",
                ),
                Some(r) => value_in_use_error(r),
            }
            .into());
        }
        let consumer = match &req.consumer {
            Some(c) => Some(
                self.find_id(
                    &mut m.tx,
                    ResourceKind::Consumer,
                    &Selector::IdOrName(c.clone()),
                )
                .await?,
            ),
            None => None,
        };
        if let Some((cid, cname)) = &consumer {
            self.check_key_quota(&mut m.tx, cid, cname).await?;
        }
        let scope = self.resolve_scope(&mut m.tx, "scope", &req.scope).await?;
        let id = new_id();
        sqlx::query(
            "INSERT INTO consumer_keys (id, name, description, status, generation_method, key_hash, masked_value, \
             consumer_id, scope_mode, ip_allowlist, expire_time, create_time, update_time, \
             secret_provider, secret_name, secret_version) \
             VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, $12, $12, $13, $14, $15)",
        )
        .bind(&id)
        .bind(&req.name)
        .bind(&req.description)
        .bind(KeyStatus::Enabled.as_i64())
        .bind(req.source.method().as_i64())
        .bind(hash.to_vec())
        .bind(mask(value.expose()))
        .bind(consumer.as_ref().map(|c| c.0.clone()))
        .bind(scope.mode())
        .bind(encode_allowlist(&allowlist))
        .bind(req.expire_time.map(|t| t.0))
        .bind(m.now.0)
        .bind(reference.map(|r| r.provider.clone()))
        .bind(reference.map(|r| r.name.clone()))
        .bind(reference.map(|r| r.version.clone()))
        .execute(&mut *m.tx)
        .await?;
        self.write_scope(&mut m.tx, ResourceKind::ConsumerKey, &id, &scope)
            .await?;
        let mut fields = vec![
            "name",
            "description",
            "generation_method",
            if reference.is_some() {
                "secret_ref"
            } else {
                "value"
            },
        ];
        if consumer.is_some() {
            fields.push("consumer");
        }
        if scope != Scope::Unset {
            fields.push("scope");
        }
        if !allowlist.is_empty() {
            fields.push("ip_allowlist");
        }
        if req.expire_time.is_some() {
            fields.push("expire_time");
        }
        // Read inside the transaction: once it commits, nothing may stand between the caller
        // and the only copy of a generated value.
        let key = self.consumer_key_by_id(&mut m.tx, &id).await?;
        self.commit(
            m,
            Audit::new(
                "CreateConsumerKey",
                ResourceKind::ConsumerKey,
                &id,
                &req.name,
                &fields,
            ),
        )
        .await?;
        // Only a value keygate generated is shown: a CUSTOM value came from the operator and
        // a SECRET_REF value lives in their secret store.
        let shown = match req.source {
            KeySource::Auto => Some(value),
            _ => None,
        };
        Ok(CreatedConsumerKey { key, value: shown })
    }

    async fn check_key_quota(
        &self,
        conn: &mut sqlx::AnyConnection,
        consumer_id: &str,
        consumer_name: &str,
    ) -> Result<()> {
        let n: i64 =
            sqlx::query_scalar("SELECT COUNT(*) FROM consumer_keys WHERE consumer_id = $1")
                .bind(consumer_id)
                .fetch_one(&mut *conn)
                .await?;
        if n as usize >= self.limits.max_keys_per_consumer {
            return Err(RuleError::ResourceExhausted(format!(
                "consumer {consumer_name:?} already has {n} consumer keys; at most {} are allowed",
                self.limits.max_keys_per_consumer
            ))
            .into());
        }
        Ok(())
    }

    pub async fn get_consumer_key(&self, sel: &Selector) -> Result<ConsumerKey> {
        let mut conn = self.pool.acquire().await?;
        let (id, _) = self
            .find_id(&mut conn, ResourceKind::ConsumerKey, sel)
            .await?;
        self.consumer_key_by_id(&mut conn, &id).await
    }

    async fn consumer_key_by_id(
        &self,
        conn: &mut sqlx::AnyConnection,
        id: &str,
    ) -> Result<ConsumerKey> {
        let row = sqlx::query(&format!(
            "SELECT {CONSUMER_KEY_COLUMNS} FROM consumer_keys k LEFT JOIN consumers c ON c.id = k.consumer_id WHERE k.id = $1"
        ))
        .bind(id)
        .fetch_one(&mut *conn)
        .await?;
        let mut key = consumer_key_base(&row)?;
        key.scope = self
            .read_scope(conn, &key.id, row.try_get("scope_mode")?)
            .await?;
        Ok(key)
    }

    pub async fn list_consumer_keys(
        &self,
        filter: &ConsumerKeyFilter,
        page: &PageRequest,
    ) -> Result<Page<ConsumerKey>> {
        let mut conn = self.pool.acquire().await?;
        let consumer_id = match &filter.consumer {
            Some(c) => Some(
                self.find_id(
                    &mut conn,
                    ResourceKind::Consumer,
                    &Selector::IdOrName(c.clone()),
                )
                .await?
                .0,
            ),
            None => None,
        };
        let rows = sqlx::query(&format!(
            "SELECT {CONSUMER_KEY_COLUMNS} FROM consumer_keys k LEFT JOIN consumers c ON c.id = k.consumer_id \
             WHERE k.name > $1 AND ($2 = '' OR k.consumer_id = $2) AND ($3 = 0 OR k.status = $3) \
             ORDER BY k.name LIMIT $4"
        ))
        .bind(page.after.clone().unwrap_or_default())
        .bind(consumer_id.unwrap_or_default())
        .bind(filter.status.map(|s| s.as_i64()).unwrap_or(0))
        .bind(page.size as i64 + 1)
        .fetch_all(&mut *conn)
        .await?;
        let mut items = Vec::with_capacity(rows.len());
        for row in rows.iter().take(page.size) {
            let mut key = consumer_key_base(row)?;
            key.scope = self
                .read_scope(&mut conn, &key.id, row.try_get("scope_mode")?)
                .await?;
            items.push(key);
        }
        Ok(paged(items, rows.len() > page.size, |k: &ConsumerKey| {
            k.name.clone()
        }))
    }

    pub async fn update_consumer_key(
        &self,
        actor: &Actor,
        sel: &Selector,
        patch: ConsumerKeyPatch,
    ) -> Result<ConsumerKey> {
        let allowlist = patch.validate(&self.limits, Timestamp::now())?;
        let mut m = self.begin(actor).await?;
        let (id, old_name) = self
            .find_id(&mut m.tx, ResourceKind::ConsumerKey, sel)
            .await?;
        let mut fields = Vec::new();
        self.rename_and_describe(
            &mut m,
            ResourceKind::ConsumerKey,
            &id,
            patch.name.as_deref(),
            patch.description.as_deref(),
            &mut fields,
        )
        .await?;
        if let Some(s) = &patch.scope {
            let scope = self
                .resolve_scope(&mut m.tx, "consumer_key.scope", s)
                .await?;
            sqlx::query("UPDATE consumer_keys SET scope_mode = $1 WHERE id = $2")
                .bind(scope.mode())
                .bind(&id)
                .execute(&mut *m.tx)
                .await?;
            self.write_scope(&mut m.tx, ResourceKind::ConsumerKey, &id, &scope)
                .await?;
            fields.push("scope");
        }
        if let Some(list) = &allowlist {
            sqlx::query("UPDATE consumer_keys SET ip_allowlist = $1 WHERE id = $2")
                .bind(encode_allowlist(list))
                .bind(&id)
                .execute(&mut *m.tx)
                .await?;
            fields.push("ip_allowlist");
        }
        if let Some(exp) = patch.expire_time {
            sqlx::query("UPDATE consumer_keys SET expire_time = $1 WHERE id = $2")
                .bind(exp.map(|t| t.0))
                .bind(&id)
                .execute(&mut *m.tx)
                .await?;
            fields.push("expire_time");
        }
        if let Some((r, value)) = &patch.secret_ref {
            self.point_consumer_key(&mut m, &id, r, value).await?;
            fields.push("secret_ref");
        }
        self.touch(&mut m, ResourceKind::ConsumerKey, &id).await?;
        let name = patch.name.clone().unwrap_or(old_name);
        self.commit(
            m,
            Audit::new(
                "UpdateConsumerKey",
                ResourceKind::ConsumerKey,
                &id,
                &name,
                &fields,
            ),
        )
        .await?;
        self.get_consumer_key(&Selector::Id(id)).await
    }

    pub async fn set_consumer_key_status(
        &self,
        actor: &Actor,
        sel: &Selector,
        status: KeyStatus,
    ) -> Result<ConsumerKey> {
        let id = self
            .set_status(actor, ResourceKind::ConsumerKey, sel, status)
            .await?;
        self.get_consumer_key(&Selector::Id(id)).await
    }

    pub async fn set_model_key_status(
        &self,
        actor: &Actor,
        sel: &Selector,
        status: KeyStatus,
    ) -> Result<ModelKey> {
        let id = self
            .set_status(actor, ResourceKind::ModelKey, sel, status)
            .await?;
        self.get_model_key(&Selector::Id(id)).await
    }

    async fn set_status(
        &self,
        actor: &Actor,
        kind: ResourceKind,
        sel: &Selector,
        status: KeyStatus,
    ) -> Result<String> {
        let table = table_of(kind);
        let mut m = self.begin(actor).await?;
        let (id, name) = self.find_id(&mut m.tx, kind, sel).await?;
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
        if current == status.as_i64() {
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
        .bind(status.as_i64())
        .bind(m.now.0)
        .bind(&id)
        .execute(&mut *m.tx)
        .await?;
        self.commit(m, Audit::new(action, kind, &id, &name, &["status"]))
            .await?;
        Ok(id)
    }

    pub async fn bind_consumer_key(
        &self,
        actor: &Actor,
        key: &str,
        consumer: &str,
    ) -> Result<ConsumerKey> {
        let mut m = self.begin(actor).await?;
        let (kid, kname) = self
            .find_id(
                &mut m.tx,
                ResourceKind::ConsumerKey,
                &Selector::IdOrName(key.to_string()),
            )
            .await?;
        let (cid, cname) = self
            .find_id(
                &mut m.tx,
                ResourceKind::Consumer,
                &Selector::IdOrName(consumer.to_string()),
            )
            .await?;
        let bound: Option<String> = sqlx::query_scalar(
            "SELECT c.name FROM consumer_keys k JOIN consumers c ON c.id = k.consumer_id WHERE k.id = $1",
        )
        .bind(&kid)
        .fetch_optional(&mut *m.tx)
        .await?;
        if let Some(current) = bound {
            return Err(RuleError::FailedPrecondition(format!(
                "consumer key {kname:?} is already bound to consumer {current:?}: unbind it first"
            ))
            .into());
        }
        self.check_key_quota(&mut m.tx, &cid, &cname).await?;
        sqlx::query("UPDATE consumer_keys SET consumer_id = $1, update_time = $2 WHERE id = $3")
            .bind(&cid)
            .bind(m.now.0)
            .bind(&kid)
            .execute(&mut *m.tx)
            .await?;
        self.commit(
            m,
            Audit::new(
                "BindConsumerKey",
                ResourceKind::ConsumerKey,
                &kid,
                &kname,
                &["consumer"],
            ),
        )
        .await?;
        self.get_consumer_key(&Selector::Id(kid)).await
    }

    pub async fn unbind_consumer_key(&self, actor: &Actor, key: &str) -> Result<ConsumerKey> {
        let mut m = self.begin(actor).await?;
        let (kid, kname) = self
            .find_id(
                &mut m.tx,
                ResourceKind::ConsumerKey,
                &Selector::IdOrName(key.to_string()),
            )
            .await?;
        let bound: Option<Option<String>> =
            sqlx::query_scalar("SELECT consumer_id FROM consumer_keys WHERE id = $1")
                .bind(&kid)
                .fetch_optional(&mut *m.tx)
                .await?;
        let Some(Some(_)) = bound else {
            return Err(RuleError::FailedPrecondition(format!(
                "consumer key {kname:?} is not bound to a consumer"
            ))
            .into());
        };
        sqlx::query("UPDATE consumer_keys SET consumer_id = NULL, update_time = $1 WHERE id = $2")
            .bind(m.now.0)
            .bind(&kid)
            .execute(&mut *m.tx)
            .await?;
        self.commit(
            m,
            Audit::new(
                "UnbindConsumerKey",
                ResourceKind::ConsumerKey,
                &kid,
                &kname,
                &["consumer"],
            ),
        )
        .await?;
        self.get_consumer_key(&Selector::Id(kid)).await
    }

    pub async fn delete_consumer_key(&self, actor: &Actor, sel: &Selector) -> Result<()> {
        let mut m = self.begin(actor).await?;
        let (id, name) = self
            .find_id(&mut m.tx, ResourceKind::ConsumerKey, sel)
            .await?;
        let row = sqlx::query(
            "SELECT k.status, k.key_hash, c.name AS consumer_name FROM consumer_keys k LEFT JOIN consumers c ON c.id = k.consumer_id WHERE k.id = $1",
        )
        .bind(&id)
        .fetch_one(&mut *m.tx)
        .await?;
        let status: i64 = row.try_get("status")?;
        let consumer: Option<String> = row.try_get("consumer_name")?;
        let mut problems = Vec::new();
        if status == KeyStatus::Enabled.as_i64() {
            problems.push("the key is ENABLED: disable the key first".to_string());
        }
        if let Some(c) = consumer {
            problems.push(format!(
                "it still has dependencies: consumer {c:?} (unbind the key first)"
            ));
        }
        if !problems.is_empty() {
            return Err(RuleError::FailedPrecondition(format!(
                "cannot delete consumer key {name:?}: {}",
                problems.join("; ")
            ))
            .into());
        }
        sqlx::query("DELETE FROM scope_entries WHERE owner_id = $1")
            .bind(&id)
            .execute(&mut *m.tx)
            .await?;
        sqlx::query("DELETE FROM consumer_keys WHERE id = $1")
            .bind(&id)
            .execute(&mut *m.tx)
            .await?;
        if let Some(h) = row.try_get::<Option<Vec<u8>>, _>("key_hash")? {
            m.removed_hashes.push(h);
        }
        self.commit(
            m,
            Audit::new(
                "DeleteConsumerKey",
                ResourceKind::ConsumerKey,
                &id,
                &name,
                &[],
            ),
        )
        .await?;
        Ok(())
    }

    // ------------------------------------------------------------------ model keys

    pub async fn create_model_key(&self, actor: &Actor, req: NewModelKey) -> Result<ModelKey> {
        req.validate()?;
        let (value, reference) = match &req.source {
            KeySource::Custom(v) => (v.clone(), None),
            KeySource::SecretRef(r, v) => (resolved(r, v)?, Some(r)),
            KeySource::Auto => unreachable!("validate() refuses AUTO model keys"),
        };
        let mut m = self.begin(actor).await?;
        self.ensure_unique_name(&mut m.tx, ResourceKind::ModelKey, &req.name, None)
            .await?;
        let mut services = Vec::new();
        for s in &req.model_services {
            let found = self
                .find_id(
                    &mut m.tx,
                    ResourceKind::ModelService,
                    &Selector::IdOrName(s.clone()),
                )
                .await?;
            if !services.contains(&found) {
                services.push(found);
            }
        }
        let id = new_id();
        sqlx::query(
            "INSERT INTO model_keys (id, name, description, status, generation_method, ciphertext, masked_value, create_time, update_time, \
             secret_provider, secret_name, secret_version) \
             VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $8, $9, $10, $11)",
        )
        .bind(&id)
        .bind(&req.name)
        .bind(&req.description)
        .bind(KeyStatus::Enabled.as_i64())
        .bind(req.source.method().as_i64())
        // A SECRET_REF key stores its reference, never the value (not even encrypted).
        .bind(match reference {
            None => Some(self.keys.cipher.encrypt(&id, &value)),
            Some(_) => None,
        })
        .bind(mask(value.expose()))
        .bind(m.now.0)
        .bind(reference.map(|r| r.provider.clone()))
        .bind(reference.map(|r| r.name.clone()))
        .bind(reference.map(|r| r.version.clone()))
        .execute(&mut *m.tx)
        .await?;
        for (sid, _) in &services {
            self.insert_binding(&mut m.tx, &id, sid, m.now).await?;
            m.changed.push((ResourceKind::ModelService, sid.clone()));
        }
        let mut fields = vec![
            "name",
            "description",
            "generation_method",
            if reference.is_some() {
                "secret_ref"
            } else {
                "value"
            },
        ];
        if !services.is_empty() {
            fields.push("model_services");
        }
        self.commit(
            m,
            Audit::new(
                "CreateModelKey",
                ResourceKind::ModelKey,
                &id,
                &req.name,
                &fields,
            ),
        )
        .await?;
        self.get_model_key(&Selector::Id(id)).await
    }

    async fn insert_binding(
        &self,
        conn: &mut sqlx::AnyConnection,
        key_id: &str,
        service_id: &str,
        now: Timestamp,
    ) -> Result<()> {
        sqlx::query("INSERT INTO model_key_bindings (model_key_id, model_service_id, create_time) VALUES ($1, $2, $3)")
            .bind(key_id)
            .bind(service_id)
            .bind(now.0)
            .execute(&mut *conn)
            .await?;
        Ok(())
    }

    pub async fn get_model_key(&self, sel: &Selector) -> Result<ModelKey> {
        let mut conn = self.pool.acquire().await?;
        let (id, _) = self.find_id(&mut conn, ResourceKind::ModelKey, sel).await?;
        let row = sqlx::query(&format!(
            "SELECT {MODEL_KEY_COLUMNS} FROM model_keys WHERE id = $1"
        ))
        .bind(&id)
        .fetch_one(&mut *conn)
        .await?;
        self.model_key_from_row(&mut conn, &row).await
    }

    async fn model_key_from_row(
        &self,
        conn: &mut sqlx::AnyConnection,
        row: &AnyRow,
    ) -> Result<ModelKey> {
        let mut key = model_key_base(row)?;
        let services = sqlx::query(
            "SELECT s.id, s.name FROM model_key_bindings b JOIN model_services s ON s.id = b.model_service_id \
             WHERE b.model_key_id = $1 ORDER BY s.name",
        )
        .bind(&key.id)
        .fetch_all(&mut *conn)
        .await?;
        key.model_services = services.iter().map(named).collect::<Result<_>>()?;
        Ok(key)
    }

    pub async fn list_model_keys(
        &self,
        filter: &ModelKeyFilter,
        page: &PageRequest,
    ) -> Result<Page<ModelKey>> {
        let mut conn = self.pool.acquire().await?;
        let service_id = match &filter.model_service {
            Some(s) => Some(
                self.find_id(
                    &mut conn,
                    ResourceKind::ModelService,
                    &Selector::IdOrName(s.clone()),
                )
                .await?
                .0,
            ),
            None => None,
        };
        let rows = sqlx::query(&format!(
            "SELECT {MODEL_KEY_COLUMNS} FROM model_keys WHERE name > $1 \
             AND ($2 = '' OR id IN (SELECT model_key_id FROM model_key_bindings WHERE model_service_id = $2)) \
             AND ($3 = 0 OR status = $3) ORDER BY name LIMIT $4"
        ))
        .bind(page.after.clone().unwrap_or_default())
        .bind(service_id.unwrap_or_default())
        .bind(filter.status.map(|s| s.as_i64()).unwrap_or(0))
        .bind(page.size as i64 + 1)
        .fetch_all(&mut *conn)
        .await?;
        let mut items = Vec::with_capacity(rows.len());
        for row in rows.iter().take(page.size) {
            items.push(self.model_key_from_row(&mut conn, row).await?);
        }
        Ok(paged(items, rows.len() > page.size, |k: &ModelKey| {
            k.name.clone()
        }))
    }

    pub async fn update_model_key(
        &self,
        actor: &Actor,
        sel: &Selector,
        patch: ModelKeyPatch,
    ) -> Result<ModelKey> {
        patch.validate()?;
        let mut m = self.begin(actor).await?;
        let (id, old_name) = self.find_id(&mut m.tx, ResourceKind::ModelKey, sel).await?;
        let mut fields = Vec::new();
        self.rename_and_describe(
            &mut m,
            ResourceKind::ModelKey,
            &id,
            patch.name.as_deref(),
            patch.description.as_deref(),
            &mut fields,
        )
        .await?;
        if let Some((r, value)) = &patch.secret_ref {
            self.require_secret_ref(&mut m.tx, ResourceKind::ModelKey, &id)
                .await?;
            sqlx::query(
                "UPDATE model_keys SET secret_provider = $1, secret_name = $2, secret_version = $3, masked_value = $4 WHERE id = $5",
            )
            .bind(&r.provider)
            .bind(&r.name)
            .bind(&r.version)
            .bind(mask(value.expose()))
            .bind(&id)
            .execute(&mut *m.tx)
            .await?;
            fields.push("secret_ref");
        }
        self.touch(&mut m, ResourceKind::ModelKey, &id).await?;
        let name = patch.name.clone().unwrap_or(old_name);
        self.commit(
            m,
            Audit::new(
                "UpdateModelKey",
                ResourceKind::ModelKey,
                &id,
                &name,
                &fields,
            ),
        )
        .await?;
        self.get_model_key(&Selector::Id(id)).await
    }

    pub async fn bind_model_key(
        &self,
        actor: &Actor,
        key: &str,
        service: &str,
    ) -> Result<ModelKey> {
        let mut m = self.begin(actor).await?;
        let (kid, kname) = self
            .find_id(
                &mut m.tx,
                ResourceKind::ModelKey,
                &Selector::IdOrName(key.to_string()),
            )
            .await?;
        let (sid, sname) = self
            .find_id(
                &mut m.tx,
                ResourceKind::ModelService,
                &Selector::IdOrName(service.to_string()),
            )
            .await?;
        if self.is_bound(&mut m.tx, &kid, &sid).await? {
            return Err(RuleError::FailedPrecondition(format!(
                "model key {kname:?} is already bound to model service {sname:?}"
            ))
            .into());
        }
        self.insert_binding(&mut m.tx, &kid, &sid, m.now).await?;
        m.changed.push((ResourceKind::ModelService, sid));
        self.commit(
            m,
            Audit::new(
                "BindModelKey",
                ResourceKind::ModelKey,
                &kid,
                &kname,
                &["model_services"],
            ),
        )
        .await?;
        self.get_model_key(&Selector::Id(kid)).await
    }

    pub async fn unbind_model_key(
        &self,
        actor: &Actor,
        key: &str,
        service: &str,
    ) -> Result<ModelKey> {
        let mut m = self.begin(actor).await?;
        let (kid, kname) = self
            .find_id(
                &mut m.tx,
                ResourceKind::ModelKey,
                &Selector::IdOrName(key.to_string()),
            )
            .await?;
        let (sid, sname) = self
            .find_id(
                &mut m.tx,
                ResourceKind::ModelService,
                &Selector::IdOrName(service.to_string()),
            )
            .await?;
        if !self.is_bound(&mut m.tx, &kid, &sid).await? {
            return Err(RuleError::FailedPrecondition(format!(
                "model key {kname:?} is not bound to model service {sname:?}"
            ))
            .into());
        }
        sqlx::query(
            "DELETE FROM model_key_bindings WHERE model_key_id = $1 AND model_service_id = $2",
        )
        .bind(&kid)
        .bind(&sid)
        .execute(&mut *m.tx)
        .await?;
        m.changed.push((ResourceKind::ModelService, sid));
        self.commit(
            m,
            Audit::new(
                "UnbindModelKey",
                ResourceKind::ModelKey,
                &kid,
                &kname,
                &["model_services"],
            ),
        )
        .await?;
        self.get_model_key(&Selector::Id(kid)).await
    }

    async fn is_bound(&self, conn: &mut sqlx::AnyConnection, kid: &str, sid: &str) -> Result<bool> {
        let n: i64 = sqlx::query_scalar(
            "SELECT COUNT(*) FROM model_key_bindings WHERE model_key_id = $1 AND model_service_id = $2",
        )
        .bind(kid)
        .bind(sid)
        .fetch_one(&mut *conn)
        .await?;
        Ok(n > 0)
    }

    pub async fn delete_model_key(&self, actor: &Actor, sel: &Selector) -> Result<()> {
        let mut m = self.begin(actor).await?;
        let (id, name) = self.find_id(&mut m.tx, ResourceKind::ModelKey, sel).await?;
        let status: i64 = sqlx::query_scalar("SELECT status FROM model_keys WHERE id = $1")
            .bind(&id)
            .fetch_one(&mut *m.tx)
            .await?;
        let services: Vec<String> = sqlx::query_scalar(
            "SELECT s.name FROM model_key_bindings b JOIN model_services s ON s.id = b.model_service_id \
             WHERE b.model_key_id = $1 ORDER BY s.name",
        )
        .bind(&id)
        .fetch_all(&mut *m.tx)
        .await?;
        let mut problems = Vec::new();
        if status == KeyStatus::Enabled.as_i64() {
            problems.push("the key is ENABLED: disable the key first".to_string());
        }
        if !services.is_empty() {
            let list = services
                .iter()
                .map(|s| format!("model service {s:?}"))
                .collect::<Vec<_>>()
                .join(", ");
            problems.push(format!(
                "it still has dependencies: {list} (unbind the key from each first)"
            ));
        }
        if !problems.is_empty() {
            return Err(RuleError::FailedPrecondition(format!(
                "cannot delete model key {name:?}: {}",
                problems.join("; ")
            ))
            .into());
        }
        sqlx::query("DELETE FROM model_keys WHERE id = $1")
            .bind(&id)
            .execute(&mut *m.tx)
            .await?;
        self.commit(
            m,
            Audit::new("DeleteModelKey", ResourceKind::ModelKey, &id, &name, &[]),
        )
        .await?;
        Ok(())
    }

    /// Imports many consumer keys bound to one consumer in one transaction (one revision, one
    /// audit row): for migrations and benchmarks. Values are validated and stored as HMACs like
    /// any CUSTOM key; the consumer's quota still applies (`--max-keys-per-consumer`).
    pub async fn import_consumer_keys(
        &self,
        actor: &Actor,
        consumer: &str,
        keys: Vec<(String, Secret)>,
    ) -> Result<i64> {
        for (i, (name, value)) in keys.iter().enumerate() {
            crate::domain::validate::name(&format!("keys[{i}].name"), name)
                .and_then(|_| {
                    crate::domain::validate::key_value(&format!("keys[{i}].value"), value.expose())
                })
                .map_err(|v| RuleError::Invalid(vec![v]))?;
        }
        let mut m = self.begin(actor).await?;
        let (cid, cname) = self
            .find_id(
                &mut m.tx,
                ResourceKind::Consumer,
                &Selector::IdOrName(consumer.to_string()),
            )
            .await?;
        let existing: i64 =
            sqlx::query_scalar("SELECT COUNT(*) FROM consumer_keys WHERE consumer_id = $1")
                .bind(&cid)
                .fetch_one(&mut *m.tx)
                .await?;
        if existing as usize + keys.len() > self.limits.max_keys_per_consumer {
            return Err(RuleError::ResourceExhausted(format!(
                "consumer {cname:?} would hold {} consumer keys; at most {} are allowed",
                existing as usize + keys.len(),
                self.limits.max_keys_per_consumer
            ))
            .into());
        }
        const ROWS: usize = 1000;
        for chunk in keys.chunks(ROWS) {
            let mut sql = String::from(
                "INSERT INTO consumer_keys (id, name, description, status, generation_method, key_hash, masked_value, \
                 consumer_id, scope_mode, ip_allowlist, expire_time, create_time, update_time) VALUES ",
            );
            for i in 0..chunk.len() {
                let b = i * 6;
                if i > 0 {
                    sql.push(',');
                }
                sql.push_str(&format!(
                    "(${}, ${}, '', {}, {}, ${}, ${}, ${}, 0, '', NULL, ${}, ${})",
                    b + 1,
                    b + 2,
                    KeyStatus::Enabled.as_i64(),
                    GenerationMethod::Custom.as_i64(),
                    b + 3,
                    b + 4,
                    b + 5,
                    b + 6,
                    b + 6
                ));
            }
            let mut q = sqlx::query(&sql);
            for (name, value) in chunk {
                q = q
                    .bind(new_id())
                    .bind(name.clone())
                    .bind(self.keys.hasher.hash(value.expose().as_bytes()).to_vec())
                    .bind(mask(value.expose()))
                    .bind(cid.clone())
                    .bind(m.now.0);
            }
            q.execute(&mut *m.tx).await.map_err(|e| match &e {
                sqlx::Error::Database(d) if d.is_unique_violation() => {
                    StoreError::Rule(RuleError::invalid(
                        "keys",
                        "a name or value is already in use by another consumer key",
                    ))
                }
                _ => StoreError::Database(e),
            })?;
        }
        m.full_reload = true;
        self.commit(
            m,
            Audit::new(
                "ImportConsumerKeys",
                ResourceKind::Consumer,
                &cid,
                &cname,
                &["consumer_keys"],
            ),
        )
        .await
    }

    // ------------------------------------------------------------------ references, audit

    /// What references a resource: a key's consumer or services, a consumer's keys, a
    /// service's keys and the scopes naming it. Also the key's secret reference, if any.
    pub async fn references(
        &self,
        kind: ResourceKind,
        sel: &Selector,
    ) -> Result<(Vec<(ResourceKind, Named)>, Option<SecretRef>)> {
        Ok(match kind {
            ResourceKind::ConsumerKey => {
                let k = self.get_consumer_key(sel).await?;
                let refs = k
                    .consumer
                    .into_iter()
                    .map(|c| (ResourceKind::Consumer, c))
                    .collect();
                (refs, k.secret_ref)
            }
            ResourceKind::ModelKey => {
                let k = self.get_model_key(sel).await?;
                let refs = k
                    .model_services
                    .into_iter()
                    .map(|s| (ResourceKind::ModelService, s))
                    .collect();
                (refs, k.secret_ref)
            }
            ResourceKind::Consumer => {
                let c = self.get_consumer(sel).await?;
                let refs = c
                    .consumer_keys
                    .into_iter()
                    .map(|k| (ResourceKind::ConsumerKey, k))
                    .collect();
                (refs, None)
            }
            ResourceKind::ModelService => {
                // One connection, taken only here: the getters above take their own.
                let mut conn = self.pool.acquire().await?;
                let (id, _) = self.find_id(&mut conn, kind, sel).await?;
                (self.service_references(&mut conn, &id).await?, None)
            }
        })
    }

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
            "SELECT revision, time, actor, action, kind, resource_id, resource_name, changed_fields FROM audit_events \
             WHERE revision < $1 AND ($2 = 0 OR kind = $2) AND ($3 = '' OR resource_name = $3) \
             AND time >= $4 AND time <= $5 ORDER BY revision DESC LIMIT $6",
        )
        .bind(before)
        .bind(filter.kind.map(|k| k.as_i64()).unwrap_or(0))
        .bind(filter.name.clone().unwrap_or_default())
        .bind(filter.start.map(|t| t.0).unwrap_or(i64::MIN))
        .bind(filter.end.map(|t| t.0).unwrap_or(i64::MAX))
        .bind(page.size as i64 + 1)
        .fetch_all(&self.pool)
        .await?;
        let mut items = Vec::with_capacity(rows.len());
        for r in rows.iter().take(page.size) {
            let fields: String = r.try_get("changed_fields")?;
            items.push(AuditEvent {
                revision: r.try_get("revision")?,
                time: Timestamp(r.try_get("time")?),
                actor: r.try_get("actor")?,
                action: r.try_get("action")?,
                kind: ResourceKind::from_i64(r.try_get("kind")?)
                    .ok_or_else(|| StoreError::Corrupt("audit kind".into()))?,
                resource_id: r.try_get("resource_id")?,
                resource_name: r.try_get("resource_name")?,
                changed_fields: fields
                    .split(',')
                    .filter(|s| !s.is_empty())
                    .map(str::to_string)
                    .collect(),
            });
        }
        let more = rows.len() > page.size;
        let next = if more {
            items.last().map(|e| e.revision.to_string())
        } else {
            None
        };
        Ok(Page { items, next })
    }

    // ------------------------------------------------------------------ secret references

    /// Refuses a reference change on a key whose value is not a SECRET_REF: every other key's
    /// value is fixed for life.
    async fn require_secret_ref(
        &self,
        conn: &mut sqlx::AnyConnection,
        kind: ResourceKind,
        id: &str,
    ) -> Result<()> {
        let method: i64 = sqlx::query_scalar(&format!(
            "SELECT generation_method FROM {} WHERE id = $1",
            table_of(kind)
        ))
        .bind(id)
        .fetch_one(&mut *conn)
        .await?;
        if method != GenerationMethod::SecretRef.as_i64() {
            let field = match kind {
                ResourceKind::ModelKey => "model_key.secret_ref",
                _ => "consumer_key.secret_ref",
            };
            return Err(RuleError::invalid(
                field,
                "only a SECRET_REF key has a reference to change; any other key's value is never editable (create a new key to rotate)",
            )
            .into());
        }
        Ok(())
    }

    /// Points a SECRET_REF consumer key at `r` (whose value is `value`): the key's HMAC and
    /// mask follow, and the old HMAC is recorded so data planes drop it.
    async fn point_consumer_key(
        &self,
        m: &mut Mutation,
        id: &str,
        r: &SecretRef,
        value: &Secret,
    ) -> Result<()> {
        self.require_secret_ref(&mut m.tx, ResourceKind::ConsumerKey, id)
            .await?;
        let old = self.stored_hash(&mut m.tx, id).await?;
        if self.set_consumer_key_value(m, id, old, value).await? == ValueSet::InUse {
            return Err(value_in_use_error(r).into());
        }
        sqlx::query(
            "UPDATE consumer_keys SET secret_provider = $1, secret_name = $2, secret_version = $3 WHERE id = $4",
        )
        .bind(&r.provider)
        .bind(&r.name)
        .bind(&r.version)
        .bind(id)
        .execute(&mut *m.tx)
        .await?;
        Ok(())
    }

    /// The stored HMAC of a consumer key (none: it has no value).
    async fn stored_hash(
        &self,
        conn: &mut sqlx::AnyConnection,
        id: &str,
    ) -> Result<Option<Vec<u8>>> {
        Ok(
            sqlx::query_scalar("SELECT key_hash FROM consumer_keys WHERE id = $1")
                .bind(id)
                .fetch_one(&mut *conn)
                .await?,
        )
    }

    /// Whether another consumer key (any but `except`) holds the value hashing to `hash`.
    async fn value_in_use(
        &self,
        conn: &mut sqlx::AnyConnection,
        hash: &KeyHash,
        except: Option<&str>,
    ) -> Result<bool> {
        let found: Option<i64> =
            sqlx::query_scalar("SELECT 1 FROM consumer_keys WHERE key_hash = $1 AND id <> $2")
                .bind(hash.to_vec())
                .bind(except.unwrap_or(""))
                .fetch_optional(&mut *conn)
                .await?;
        Ok(found.is_some())
    }

    /// Gives a consumer key (whose stored HMAC is `old`) the HMAC and mask of `value`.
    async fn set_consumer_key_value(
        &self,
        m: &mut Mutation,
        id: &str,
        old: Option<Vec<u8>>,
        value: &Secret,
    ) -> Result<ValueSet> {
        let hash = self.keys.hasher.hash(value.expose().as_bytes());
        if old.as_deref() == Some(&hash[..]) {
            return Ok(ValueSet::Unchanged);
        }
        if self.value_in_use(&mut m.tx, &hash, Some(id)).await? {
            return Ok(ValueSet::InUse);
        }
        sqlx::query("UPDATE consumer_keys SET key_hash = $1, masked_value = $2 WHERE id = $3")
            .bind(hash.to_vec())
            .bind(mask(value.expose()))
            .bind(id)
            .execute(&mut *m.tx)
            .await?;
        if let Some(h) = old {
            m.removed_hashes.push(h);
        }
        Ok(ValueSet::Set)
    }

    /// Every SECRET_REF key with its reference (what the background refresh reads).
    pub async fn secret_keys(&self) -> Result<Vec<SecretKey>> {
        let mut out = Vec::new();
        for kind in [ResourceKind::ConsumerKey, ResourceKind::ModelKey] {
            let rows = sqlx::query(&format!(
                "SELECT id, name, secret_provider, secret_name, secret_version, {} FROM {} \
                 WHERE generation_method = $1 AND secret_provider IS NOT NULL",
                if kind == ResourceKind::ConsumerKey {
                    "key_hash"
                } else {
                    "NULL AS key_hash"
                },
                table_of(kind)
            ))
            .bind(GenerationMethod::SecretRef.as_i64())
            .fetch_all(&self.pool)
            .await?;
            for r in rows {
                out.push(SecretKey {
                    kind,
                    id: r.try_get("id")?,
                    name: r.try_get("name")?,
                    reference: secret_ref_of(&r)?
                        .ok_or_else(|| StoreError::Corrupt("secret reference".into()))?,
                    key_hash: r
                        .try_get::<Option<Vec<u8>>, _>("key_hash")
                        .ok()
                        .flatten()
                        .and_then(|h| <KeyHash>::try_from(h.as_slice()).ok()),
                });
            }
        }
        Ok(out)
    }

    /// The secret behind a SECRET_REF key changed (a background refresh saw a new value):
    /// a system change, audited and distributed like any other, so every replica and data
    /// plane takes the new value. Nothing is written when the key no longer uses
    /// `reference` or (consumer keys) the value is the one already stored. True when a change
    /// was committed.
    ///
    /// `expected_hash` (consumer keys): the HMAC the caller saw stored when it read the
    /// secret; if another change (an admin update, another replica) has replaced it since,
    /// nothing is written. A value another consumer key already holds is a collision: this
    /// key's HMAC is cleared (the old value must stop authorizing; the key authorizes nothing
    /// until its secret changes again) and `Collision` is answered.
    pub async fn secret_value_changed(
        &self,
        kind: ResourceKind,
        id: &str,
        reference: &SecretRef,
        value: &Secret,
        expected_hash: Option<KeyHash>,
    ) -> Result<Refreshed> {
        let actor = Actor(SECRET_REFRESH_ACTOR.to_string());
        let mut m = self.begin(&actor).await?;
        let row = sqlx::query(&format!(
            "SELECT name, secret_provider, secret_name, secret_version FROM {} WHERE id = $1",
            table_of(kind)
        ))
        .bind(id)
        .fetch_optional(&mut *m.tx)
        .await?;
        let Some(row) = row else {
            return Ok(Refreshed::Skipped);
        };
        if secret_ref_of(&row)?.as_ref() != Some(reference) {
            return Ok(Refreshed::Skipped); // re-pointed meanwhile: that change brought its own value
        }
        let name: String = row.try_get("name")?;
        let mut outcome = Refreshed::Applied;
        match kind {
            ResourceKind::ConsumerKey => {
                let stored = self.stored_hash(&mut m.tx, id).await?;
                if stored.as_deref() != expected_hash.as_ref().map(|h| &h[..]) {
                    return Ok(Refreshed::Skipped);
                }
                match self
                    .set_consumer_key_value(&mut m, id, stored.clone(), value)
                    .await?
                {
                    ValueSet::Set => {}
                    ValueSet::Unchanged => return Ok(Refreshed::Skipped),
                    ValueSet::InUse => {
                        let Some(old) = stored else {
                            return Ok(Refreshed::Collision); // already cleared
                        };
                        sqlx::query("UPDATE consumer_keys SET key_hash = NULL WHERE id = $1")
                            .bind(id)
                            .execute(&mut *m.tx)
                            .await?;
                        m.removed_hashes.push(old);
                        outcome = Refreshed::Collision;
                    }
                }
            }
            ResourceKind::ModelKey => {
                sqlx::query("UPDATE model_keys SET masked_value = $1 WHERE id = $2")
                    .bind(mask(value.expose()))
                    .bind(id)
                    .execute(&mut *m.tx)
                    .await?;
            }
            _ => return Ok(Refreshed::Skipped),
        }
        self.touch(&mut m, kind, id).await?;
        self.commit(m, Audit::new("RefreshSecret", kind, id, &name, &["value"]))
            .await?;
        Ok(outcome)
    }

    // ------------------------------------------------------------------ snapshot source

    /// What changed after revision `since`, read in one consistent transaction. More than
    /// `max_changes` changed resources (or a bulk change) answers with everything instead.
    pub async fn load_changes(&self, since: i64, max_changes: usize) -> Result<Changes> {
        let mut tx: Transaction<'_, Any> = self.pool.begin().await?;
        if self.backend == Backend::Postgres {
            sqlx::query("SET TRANSACTION ISOLATION LEVEL REPEATABLE READ, READ ONLY")
                .execute(&mut *tx)
                .await?;
        }
        let revision: i64 = sqlx::query_scalar("SELECT revision FROM store_meta WHERE id = 1")
            .fetch_one(&mut *tx)
            .await?;
        if revision == since {
            return Ok(Changes::UpToDate { revision });
        }
        if revision < since {
            // A store restored from an older backup: start over.
            tx.commit().await?;
            return Ok(Changes::Full);
        }
        let rows = sqlx::query(
            "SELECT kind, resource_id, key_hash FROM changes WHERE revision > $1 AND revision <= $2 LIMIT $3",
        )
        .bind(since)
        .bind(revision)
        .bind(max_changes as i64 + 1)
        .fetch_all(&mut *tx)
        .await?;
        let oldest: Option<i64> = sqlx::query_scalar("SELECT MIN(revision) FROM changes")
            .fetch_one(&mut *tx)
            .await?;
        let history_gone = oldest.is_none_or(|o| o > since + 1);
        let full = history_gone
            || rows.len() > max_changes
            || rows
                .iter()
                .any(|r| r.try_get::<i64, _>("kind").map(|k| k == 0).unwrap_or(true));
        if full {
            tx.commit().await?;
            return Ok(Changes::Full);
        }
        let mut key_ids = Vec::new();
        let mut removed_key_hashes = Vec::new();
        let mut consumer_ids = Vec::new();
        let mut services_changed = false;
        for r in &rows {
            let id: String = r.try_get("resource_id")?;
            match ResourceKind::from_i64(r.try_get("kind")?) {
                Some(ResourceKind::ConsumerKey) => {
                    match r.try_get::<Option<Vec<u8>>, _>("key_hash")? {
                        Some(h) => removed_key_hashes.push(
                            <KeyHash>::try_from(h.as_slice())
                                .map_err(|_| StoreError::Corrupt("change key hash".into()))?,
                        ),
                        None => key_ids.push(id),
                    }
                }
                Some(ResourceKind::Consumer) => consumer_ids.push(id),
                Some(ResourceKind::ModelService | ResourceKind::ModelKey) => {
                    services_changed = true
                }
                None => return Err(StoreError::Corrupt("change kind".into())),
            }
        }
        key_ids.sort();
        key_ids.dedup();
        consumer_ids.sort();
        consumer_ids.dedup();

        let mut consumer_keys = Vec::with_capacity(key_ids.len());
        for id in &key_ids {
            let row = sqlx::query(&format!(
                "SELECT {KEY_ROW_COLUMNS} FROM consumer_keys k WHERE k.id = $1"
            ))
            .bind(id)
            .fetch_optional(&mut *tx)
            .await?;
            let Some(row) = row else { continue }; // deleted: its hash is in removed_key_hashes
            let scope = self
                .read_scope(&mut tx, id, row.try_get("scope_mode")?)
                .await?;
            if let Some(k) = key_row(&row, scope)? {
                consumer_keys.push(k);
            }
        }
        let mut consumers = Vec::new();
        let mut removed_consumer_ids = Vec::new();
        for id in consumer_ids {
            let row = sqlx::query(&format!(
                "SELECT {CONSUMER_COLUMNS} FROM consumers WHERE id = $1"
            ))
            .bind(&id)
            .fetch_optional(&mut *tx)
            .await?;
            match row {
                // The snapshot needs the consumer's own fields, never its (maybe millions of) keys.
                Some(row) => consumers.push(Consumer {
                    scope: self
                        .read_scope(&mut tx, &id, row.try_get("scope_mode")?)
                        .await?,
                    id: row.try_get("id")?,
                    name: row.try_get("name")?,
                    description: row.try_get("description")?,
                    consumer_keys: Vec::new(),
                    create_time: Timestamp(row.try_get("create_time")?),
                    update_time: Timestamp(row.try_get("update_time")?),
                }),
                None => removed_consumer_ids.push(id),
            }
        }
        let services = if services_changed {
            Some(load_services(&mut tx).await?)
        } else {
            None
        };
        tx.commit().await?;
        Ok(Changes::Incremental(Increment {
            store_id: self.store_id.clone(),
            revision,
            consumer_keys,
            removed_key_hashes,
            consumers,
            removed_consumer_ids,
            services,
        }))
    }

    /// Records consumer keys' last use (never moves a time backwards). Not a change of
    /// configuration: no revision, no audit row, no snapshot update.
    pub async fn record_last_used(&self, batch: &[(uuid::Uuid, Timestamp)]) -> Result<()> {
        let mut tx = self.pool.begin().await?;
        for (id, t) in batch {
            sqlx::query(
                "UPDATE consumer_keys SET last_used_time = $1 WHERE id = $2 AND (last_used_time IS NULL OR last_used_time < $1)",
            )
            .bind(t.0)
            .bind(id.to_string())
            .execute(&mut *tx)
            .await?;
        }
        tx.commit().await?;
        Ok(())
    }

    /// Forgets change records older than `keep` revisions (snapshots further behind reload).
    pub async fn prune_changes(&self, keep: i64) -> Result<u64> {
        let revision = self.revision().await?;
        let r = sqlx::query("DELETE FROM changes WHERE revision <= $1")
            .bind(revision - keep)
            .execute(&self.pool)
            .await?;
        Ok(r.rows_affected())
    }

    /// Reads every resource the data plane needs, in one consistent read. Consumer keys are
    /// streamed to `on_key` (never all held as rows at once: there may be millions).
    pub async fn load_contents(
        &self,
        mut on_key: impl FnMut(KeyRow) -> std::result::Result<(), String>,
    ) -> Result<StoreContents> {
        let mut tx: Transaction<'_, Any> = self.pool.begin().await?;
        if self.backend == Backend::Postgres {
            sqlx::query("SET TRANSACTION ISOLATION LEVEL REPEATABLE READ, READ ONLY")
                .execute(&mut *tx)
                .await?;
        }
        let revision: i64 = sqlx::query_scalar("SELECT revision FROM store_meta WHERE id = 1")
            .fetch_one(&mut *tx)
            .await?;

        let mut scopes: HashMap<String, Vec<Named>> = HashMap::new();
        for r in sqlx::query(
            "SELECT s.owner_id, m.id, m.name FROM scope_entries s JOIN model_services m ON m.id = s.model_service_id \
             ORDER BY s.owner_id, s.position",
        )
        .fetch_all(&mut *tx)
        .await?
        {
            scopes.entry(r.try_get("owner_id")?).or_default().push(named(&r)?);
        }
        let scope_of = |scopes: &mut HashMap<String, Vec<Named>>, id: &str, mode: i64| match mode {
            0 => Scope::Unset,
            1 => Scope::All,
            _ => Scope::Services(scopes.remove(id).unwrap_or_default()),
        };

        let mut consumers = Vec::new();
        for r in sqlx::query(&format!("SELECT {CONSUMER_COLUMNS} FROM consumers"))
            .fetch_all(&mut *tx)
            .await?
        {
            let id: String = r.try_get("id")?;
            consumers.push(Consumer {
                scope: scope_of(&mut scopes, &id, r.try_get("scope_mode")?),
                name: r.try_get("name")?,
                description: r.try_get("description")?,
                consumer_keys: Vec::new(),
                create_time: Timestamp(r.try_get("create_time")?),
                update_time: Timestamp(r.try_get("update_time")?),
                id,
            });
        }

        let (model_services, model_keys) = load_services(&mut tx).await?;

        {
            use futures::TryStreamExt;
            let sql = format!("SELECT {KEY_ROW_COLUMNS} FROM consumer_keys k");
            let mut rows = sqlx::query(&sql).fetch(&mut *tx);
            while let Some(r) = rows.try_next().await? {
                let scope = scope_of(
                    &mut scopes,
                    &r.try_get::<String, _>("id")?,
                    r.try_get("scope_mode")?,
                );
                if let Some(k) = key_row(&r, scope)? {
                    on_key(k).map_err(StoreError::Corrupt)?;
                }
            }
        }
        tx.commit().await?;
        Ok(StoreContents {
            store_id: self.store_id.clone(),
            revision,
            consumers,
            model_services,
            model_keys,
        })
    }
}

/// What changed since a revision, as `Store::load_changes` reports it.
#[derive(Debug)]
pub enum Changes {
    /// Nothing committed since.
    UpToDate {
        revision: i64,
    },
    /// Too much changed (or the history is gone): reload everything (`load_contents`).
    Full,
    Incremental(Increment),
}

/// The current state of everything that changed in `(since, revision]`.
#[derive(Debug)]
pub struct Increment {
    pub store_id: String,
    pub revision: i64,
    /// Changed consumer keys as they are now.
    pub consumer_keys: Vec<KeyRow>,
    /// HMACs to drop (deleted keys).
    pub removed_key_hashes: Vec<KeyHash>,
    pub consumers: Vec<Consumer>,
    pub removed_consumer_ids: Vec<String>,
    /// All services and model keys, when any of them changed.
    pub services: Option<(Vec<ModelService>, EncryptedModelKeys)>,
}

/// An open mutation: the transaction, its revision, and the resources it touched.
struct Mutation {
    tx: Transaction<'static, Any>,
    revision: i64,
    actor: Actor,
    changed: Vec<(ResourceKind, String)>,
    /// The change is too large to apply incrementally: data planes reload everything.
    full_reload: bool,
    /// Consumer key HMACs this mutation removed (so snapshots can drop them).
    removed_hashes: Vec<Vec<u8>>,
    now: Timestamp,
}

struct Audit<'a> {
    action: &'a str,
    kind: ResourceKind,
    id: &'a str,
    name: &'a str,
    fields: &'a [&'a str],
}

impl<'a> Audit<'a> {
    fn new(
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
        }
    }
}

/// Model keys with their ciphertext.
pub type EncryptedModelKeys = Vec<(ModelKey, Vec<u8>)>;

/// Every model service with its bound keys, and every model key with its ciphertext.
async fn load_services(
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

fn table_of(kind: ResourceKind) -> &'static str {
    match kind {
        ResourceKind::Consumer => "consumers",
        ResourceKind::ConsumerKey => "consumer_keys",
        ResourceKind::ModelService => "model_services",
        ResourceKind::ModelKey => "model_keys",
    }
}

fn new_id() -> String {
    uuid::Uuid::now_v7().to_string()
}

fn named(r: &AnyRow) -> Result<Named> {
    Ok(Named {
        id: r.try_get("id")?,
        name: r.try_get("name")?,
    })
}

fn paged<T>(items: Vec<T>, more: bool, cursor: impl Fn(&T) -> String) -> Page<T> {
    let next = if more { items.last().map(cursor) } else { None };
    Page { items, next }
}

fn encode_list(items: &[String]) -> String {
    serde_json::to_string(items).expect("a list of strings serialises")
}

fn decode_list(s: &str) -> Result<Vec<String>> {
    serde_json::from_str(s).map_err(|e| StoreError::Corrupt(format!("models list: {e}")))
}

fn encode_allowlist(list: &[IpNet]) -> String {
    list.iter()
        .map(ip_entry_display)
        .collect::<Vec<_>>()
        .join(",")
}

/// A SECRET_REF consumer key whose secret holds another consumer key's value.
fn value_in_use_error(r: &SecretRef) -> RuleError {
    RuleError::FailedPrecondition(format!(
        "secret_ref ({}) resolves to a value already in use by another consumer key",
        crate::secret::describe(r)
    ))
}

/// What `Store::set_consumer_key_value` did.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum ValueSet {
    Unchanged,
    Set,
    /// Another consumer key holds the value: nothing written.
    InUse,
}

/// The value of a SECRET_REF source; the caller must have resolved it first.
fn resolved(r: &SecretRef, v: &Option<Secret>) -> Result<Secret> {
    v.clone().ok_or_else(|| {
        RuleError::FailedPrecondition(format!(
            "secret_ref ({}) was not resolved before the change",
            crate::secret::describe(r)
        ))
        .into()
    })
}

fn secret_ref_of(r: &AnyRow) -> Result<Option<SecretRef>> {
    let provider: Option<String> = r.try_get("secret_provider")?;
    Ok(match provider {
        Some(provider) => Some(SecretRef {
            provider,
            name: r
                .try_get::<Option<String>, _>("secret_name")?
                .unwrap_or_default(),
            version: r
                .try_get::<Option<String>, _>("secret_version")?
                .unwrap_or_default(),
        }),
        None => None,
    })
}

fn status_of(r: &AnyRow) -> Result<KeyStatus> {
    KeyStatus::from_i64(r.try_get("status")?)
        .ok_or_else(|| StoreError::Corrupt("key status".into()))
}

fn method_of(r: &AnyRow) -> Result<GenerationMethod> {
    GenerationMethod::from_i64(r.try_get("generation_method")?)
        .ok_or_else(|| StoreError::Corrupt("generation method".into()))
}

fn service_base(r: &AnyRow) -> Result<ModelService> {
    Ok(ModelService {
        id: r.try_get("id")?,
        name: r.try_get("name")?,
        description: r.try_get("description")?,
        provider: r.try_get("provider")?,
        auth_header: r.try_get("auth_header")?,
        auth_value_template: r.try_get("auth_value_template")?,
        models: decode_list(&r.try_get::<String, _>("models")?)?,
        model_keys: Vec::new(),
        create_time: Timestamp(r.try_get("create_time")?),
        update_time: Timestamp(r.try_get("update_time")?),
    })
}

fn model_key_base(r: &AnyRow) -> Result<ModelKey> {
    Ok(ModelKey {
        id: r.try_get("id")?,
        name: r.try_get("name")?,
        description: r.try_get("description")?,
        status: status_of(r)?,
        generation_method: method_of(r)?,
        masked_value: r.try_get("masked_value")?,
        secret_ref: secret_ref_of(r)?,
        model_services: Vec::new(),
        create_time: Timestamp(r.try_get("create_time")?),
        update_time: Timestamp(r.try_get("update_time")?),
    })
}

fn consumer_key_base(r: &AnyRow) -> Result<ConsumerKey> {
    let consumer_id: Option<String> = r.try_get("consumer_id")?;
    let consumer_name: Option<String> = r.try_get("consumer_name")?;
    let allowlist: String = r.try_get("ip_allowlist")?;
    Ok(ConsumerKey {
        id: r.try_get("id")?,
        name: r.try_get("name")?,
        description: r.try_get("description")?,
        status: status_of(r)?,
        generation_method: method_of(r)?,
        masked_value: r.try_get("masked_value")?,
        secret_ref: secret_ref_of(r)?,
        consumer: consumer_id
            .zip(consumer_name)
            .map(|(id, name)| Named { id, name }),
        scope: Scope::Unset,
        ip_allowlist: allowlist
            .split(',')
            .filter(|s| !s.is_empty())
            .map(str::to_string)
            .collect(),
        expire_time: r.try_get::<Option<i64>, _>("expire_time")?.map(Timestamp),
        create_time: Timestamp(r.try_get("create_time")?),
        update_time: Timestamp(r.try_get("update_time")?),
        last_used_time: r
            .try_get::<Option<i64>, _>("last_used_time")?
            .map(Timestamp),
    })
}
