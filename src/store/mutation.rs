//! The mutation protocol every change follows: `begin` opens a transaction and bumps the
//! store revision (on PostgreSQL that row lock serialises concurrent checks across replicas);
//! the change writes its rows; `commit` appends the audit row and the change records,
//! notifies other replicas and wakes this process's snapshot builder. Also the writes every
//! resource shares: its update time, name and description. Depends on `domain`.

use sqlx::{Any, Transaction};

use super::audit::Audit;
use super::lookup::ensure_unique_name;
use super::rows::table_of;
use super::{Actor, Backend, Result, Store, changes};

impl Store {
    /// On PostgreSQL, queues the notice of `revision` in `tx`: delivered at commit, it wakes
    /// every replica's snapshot builder (SQLite has one process, which `note_committed` wakes).
    pub(super) async fn notify_at_commit(
        &self,
        tx: &mut Transaction<'static, Any>,
        revision: i64,
    ) -> Result<()> {
        if self.backend == Backend::Postgres {
            sqlx::query("SELECT pg_notify('keygate_changes', $1)")
                .bind(revision.to_string())
                .execute(&mut **tx)
                .await?;
        }
        Ok(())
    }
}
use crate::domain::{ResourceKind, Timestamp};

/// An open mutation: the transaction, its revision, and the resources it touched.
pub(super) struct Mutation {
    pub tx: Transaction<'static, Any>,
    pub revision: i64,
    pub actor: Actor,
    /// Resources changed besides the audited one (e.g. the services a binding touches).
    pub changed: Vec<(ResourceKind, String)>,
    /// The change is too large to apply incrementally: data planes reload everything.
    pub full_reload: bool,
    /// Consumer key HMACs this mutation removed (so snapshots can drop them).
    pub removed_hashes: Vec<Vec<u8>>,
    pub now: Timestamp,
}

impl Store {
    pub(super) async fn begin(&self, actor: &Actor) -> Result<Mutation> {
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

    /// Audits and records the change, commits, and answers the new revision.
    pub(super) async fn commit(&self, m: Mutation, audit: Audit<'_>) -> Result<i64> {
        let Mutation {
            mut tx,
            revision,
            actor,
            mut changed,
            full_reload,
            removed_hashes,
            now,
        } = m;
        audit.write(&mut tx, revision, now, &actor).await?;
        changed.push((audit.kind, audit.id.to_string()));
        changes::record(&mut tx, revision, changed, full_reload, removed_hashes).await?;
        self.notify_at_commit(&mut tx, revision).await?;
        tx.commit().await?;
        self.note_committed(revision);
        audit.log(&actor, revision);
        Ok(revision)
    }
}

impl Store {
    /// Records and commits a mutation that wrote its own audit rows (changes no admin
    /// request made, e.g. budget exhaustion).
    pub(super) async fn commit_unaudited(&self, m: Mutation) -> Result<i64> {
        let Mutation {
            mut tx,
            revision,
            changed,
            full_reload,
            removed_hashes,
            ..
        } = m;
        changes::record(&mut tx, revision, changed, full_reload, removed_hashes).await?;
        self.notify_at_commit(&mut tx, revision).await?;
        tx.commit().await?;
        self.note_committed(revision);
        Ok(revision)
    }
}

/// Sets a resource's `update_time` to the mutation's time.
pub(super) async fn touch(m: &mut Mutation, kind: ResourceKind, id: &str) -> Result<()> {
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

/// The name and description every resource has: a rename checks uniqueness. Each field set
/// is added to the audit's changed fields.
pub(super) async fn rename_and_describe(
    m: &mut Mutation,
    kind: ResourceKind,
    id: &str,
    name: Option<&str>,
    description: Option<&str>,
    fields: &mut Vec<&'static str>,
) -> Result<()> {
    if let Some(name) = name {
        ensure_unique_name(&mut m.tx, kind, name, Some(id)).await?;
    }
    for (column, value) in [("name", name), ("description", description)] {
        if let Some(v) = value {
            set_text(m, kind, id, column, v).await?;
            fields.push(column);
        }
    }
    Ok(())
}

/// Sets one text column of a resource.
pub(super) async fn set_text(
    m: &mut Mutation,
    kind: ResourceKind,
    id: &str,
    column: &str,
    value: &str,
) -> Result<()> {
    sqlx::query(&format!(
        "UPDATE {} SET {column} = $1 WHERE id = $2",
        table_of(kind)
    ))
    .bind(value)
    .bind(id)
    .execute(&mut *m.tx)
    .await?;
    Ok(())
}
