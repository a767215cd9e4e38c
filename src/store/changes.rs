//! The change log: what each revision touched (written by `commit`), read back by the
//! snapshot builder as the current state of everything changed since its revision, so data
//! planes update incrementally. Depends on `domain` and `crypto`.

use sqlx::Row;
use sqlx::any::AnyRow;

use super::contents::{EncryptedModelKeys, KeyRow, load_services, revision_mark};
use super::rows::{CONSUMER_COLUMNS, KEY_ROW_COLUMNS, SqlCode, consumer_base, decode, key_row};
use super::scopes::read_scope;
use super::{Result, Store, StoreError};
use crate::crypto::KeyHash;
use crate::domain::{Consumer, ModelService, ResourceKind};

/// What changed since a revision, as `Store::load_changes` reports it.
#[derive(Debug)]
pub enum Changes {
    /// Nothing committed since.
    UpToDate {
        revision: i64,
    },
    /// The store holds the revision asked from, in the same epoch, but not the history it
    /// was published from: restored (epoch row included) and changed back up to or past it
    /// between two reads. Like `WentBack`: a new epoch, then everything.
    Diverged {
        epoch: String,
        revision: i64,
    },
    /// Too much changed, the history is gone or the epoch is another: reload everything
    /// (`load_contents`).
    Full,
    /// The store is in the same epoch but below the revision asked from (restored from an
    /// older backup): start a new epoch (`bump_epoch`), then reload everything.
    WentBack {
        epoch: String,
        revision: i64,
    },
    Incremental(Increment),
}

/// The current state of everything that changed in `(since, revision]`.
#[derive(Debug)]
pub struct Increment {
    pub store_id: String,
    pub epoch: String,
    pub revision: i64,
    /// The history mark of `revision` (see `revision_mark`).
    pub mark: i64,
    /// Changed consumer keys as they are now.
    pub consumer_keys: Vec<KeyRow>,
    /// HMACs to drop (deleted keys).
    pub removed_key_hashes: Vec<KeyHash>,
    pub consumers: Vec<Consumer>,
    pub removed_consumer_ids: Vec<String>,
    /// All services and model keys, when any of them changed.
    pub services: Option<(Vec<ModelService>, EncryptedModelKeys)>,
}

/// The change records of one revision: each changed resource, a removed consumer key HMAC
/// per deleted key, or (`full_reload`) one record that makes data planes reload everything.
pub(super) async fn record(
    conn: &mut sqlx::AnyConnection,
    revision: i64,
    mut changed: Vec<(ResourceKind, String)>,
    full_reload: bool,
    removed_hashes: Vec<Vec<u8>>,
) -> Result<()> {
    changed.sort();
    changed.dedup();
    if full_reload {
        changed.clear();
        sqlx::query("INSERT INTO changes (revision, kind, resource_id) VALUES ($1, 0, '')")
            .bind(revision)
            .execute(&mut *conn)
            .await?;
    }
    for (kind, id) in &changed {
        sqlx::query("INSERT INTO changes (revision, kind, resource_id) VALUES ($1, $2, $3)")
            .bind(revision)
            .bind(kind.code())
            .bind(id)
            .execute(&mut *conn)
            .await?;
    }
    for hash in removed_hashes {
        sqlx::query(
            "INSERT INTO changes (revision, kind, resource_id, key_hash) VALUES ($1, $2, '', $3)",
        )
        .bind(revision)
        .bind(ResourceKind::ConsumerKey.code())
        .bind(hash)
        .execute(&mut *conn)
        .await?;
    }
    Ok(())
}

/// The change records of a range, sorted by what they ask the snapshot to reload.
#[derive(Default)]
struct Touched {
    key_ids: Vec<String>,
    removed_key_hashes: Vec<KeyHash>,
    consumer_ids: Vec<String>,
    services: bool,
}

impl Touched {
    fn of(rows: &[AnyRow]) -> Result<Touched> {
        let mut t = Touched::default();
        for r in rows {
            let id: String = r.try_get("resource_id")?;
            match decode(r.try_get("kind")?, "change kind")? {
                ResourceKind::ConsumerKey => match r.try_get::<Option<Vec<u8>>, _>("key_hash")? {
                    Some(h) => t.removed_key_hashes.push(
                        <KeyHash>::try_from(h.as_slice())
                            .map_err(|_| StoreError::Corrupt("change key hash".into()))?,
                    ),
                    None => t.key_ids.push(id),
                },
                ResourceKind::Consumer => t.consumer_ids.push(id),
                ResourceKind::ModelService | ResourceKind::ModelKey => t.services = true,
                // Admin credentials and the store's own rows are not in snapshots.
                ResourceKind::AdminToken | ResourceKind::Store => {}
            }
        }
        t.key_ids.sort();
        t.key_ids.dedup();
        t.consumer_ids.sort();
        t.consumer_ids.dedup();
        Ok(t)
    }
}

impl Store {
    /// What changed after revision `since` of epoch `since_epoch`, read in one consistent
    /// transaction. Another epoch, more than `max_changes` changed resources (or a bulk
    /// change) answers with everything instead; a revision below `since` in the same epoch
    /// with `WentBack`; a revision `since` whose history mark is not `since_mark` (when
    /// given) with `Diverged`.
    pub async fn load_changes(
        &self,
        since_epoch: &str,
        since: i64,
        since_mark: Option<i64>,
        max_changes: usize,
    ) -> Result<Changes> {
        let (mut tx, revision, epoch) = self.begin_read().await?;
        if epoch != since_epoch {
            tx.commit().await?;
            return Ok(Changes::Full);
        }
        if revision < since {
            // A store restored from an older backup: a new epoch, then everything.
            tx.commit().await?;
            return Ok(Changes::WentBack { epoch, revision });
        }
        if let Some(expected) = since_mark
            && revision_mark(&mut tx, since).await? != expected
        {
            tx.commit().await?;
            return Ok(Changes::Diverged { epoch, revision });
        }
        if revision == since {
            tx.commit().await?;
            return Ok(Changes::UpToDate { revision });
        }
        let mark = revision_mark(&mut tx, revision).await?;
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
        let touched = Touched::of(&rows)?;
        let consumer_keys = load_key_rows(&mut tx, &touched.key_ids).await?;
        let (consumers, removed_consumer_ids) =
            load_consumers(&mut tx, touched.consumer_ids).await?;
        let services = if touched.services {
            Some(load_services(&mut tx).await?)
        } else {
            None
        };
        tx.commit().await?;
        Ok(Changes::Incremental(Increment {
            store_id: self.store_id.clone(),
            epoch,
            revision,
            mark,
            consumer_keys,
            removed_key_hashes: touched.removed_key_hashes,
            consumers,
            removed_consumer_ids,
            services,
        }))
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
}

/// The consumer keys `ids` as they are now; a deleted one is skipped (its HMAC is among the
/// removed hashes), as is one with no value.
async fn load_key_rows(conn: &mut sqlx::AnyConnection, ids: &[String]) -> Result<Vec<KeyRow>> {
    let mut out = Vec::with_capacity(ids.len());
    for id in ids {
        let row = sqlx::query(&format!(
            "SELECT {KEY_ROW_COLUMNS} FROM consumer_keys k WHERE k.id = $1"
        ))
        .bind(id)
        .fetch_optional(&mut *conn)
        .await?;
        let Some(row) = row else { continue };
        let scope = read_scope(conn, id, row.try_get("scope_mode")?).await?;
        if let Some(k) = key_row(&row, scope)? {
            out.push(k);
        }
    }
    Ok(out)
}

/// The consumers `ids` as they are now, and those of them that are gone. The snapshot needs
/// a consumer's own fields, never its (maybe millions of) keys.
async fn load_consumers(
    conn: &mut sqlx::AnyConnection,
    ids: Vec<String>,
) -> Result<(Vec<Consumer>, Vec<String>)> {
    let mut consumers = Vec::new();
    let mut removed = Vec::new();
    for id in ids {
        let row = sqlx::query(&format!(
            "SELECT {CONSUMER_COLUMNS} FROM consumers WHERE id = $1"
        ))
        .bind(&id)
        .fetch_optional(&mut *conn)
        .await?;
        match row {
            Some(row) => {
                let scope = read_scope(conn, &id, row.try_get("scope_mode")?).await?;
                consumers.push(consumer_base(&row, scope)?);
            }
            None => removed.push(id),
        }
    }
    Ok((consumers, removed))
}
