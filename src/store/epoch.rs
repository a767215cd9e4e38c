//! The store's epoch (SPEC §5 "Versions", §9): a random id in the meta row that names one
//! history of revisions. A store restored from a backup (or failed over to a lagging replica)
//! gets an older revision back while its store id stays; the snapshot builder notices (the
//! revision is below what it published, or a data plane presents a version the store never
//! reached) and starts a new epoch, so every snapshot and data plane compares versions only
//! within one (store id, epoch) and takes the restored state in full. A new epoch is audited
//! (`StartEpoch` on the `STORE`, by `keygate:control-plane`, the old and new epoch in its
//! details) in the same transaction. Depends on `domain`.

use super::audit::Audit;
use super::{Actor, Result, Store, changes};
use crate::domain::{ResourceKind, Timestamp};

/// The audit actor of a new epoch: the control plane's snapshot builder, not an admin.
pub const EPOCH_ACTOR: &str = "keygate:control-plane";

impl Store {
    /// The store's current epoch and revision, read together.
    pub async fn epoch(&self) -> Result<(String, i64)> {
        let row: (String, i64) =
            sqlx::query_as("SELECT epoch, revision FROM store_meta WHERE id = 1")
                .fetch_one(&self.pool)
                .await?;
        Ok(row)
    }

    /// Starts a new epoch if the store is still in `expected` (compare-and-set; another
    /// replica may have done it first: then nothing changes and `None` is answered). The
    /// revision moves too, with a change record that makes every snapshot reload, so every
    /// replica's builder notices through its normal change path, and an audit event says
    /// why (`reason`, no value). Answers the new epoch.
    pub async fn bump_epoch(&self, expected: &str, reason: &str) -> Result<Option<String>> {
        let mut tx = self.pool.begin().await?;
        let new = uuid::Uuid::new_v4().to_string();
        let revision: Option<i64> = sqlx::query_scalar(
            "UPDATE store_meta SET revision = revision + 1, epoch = $1 \
             WHERE id = 1 AND epoch = $2 RETURNING revision",
        )
        .bind(&new)
        .bind(expected)
        .fetch_optional(&mut *tx)
        .await?;
        let Some(revision) = revision else {
            tx.rollback().await?;
            return Ok(None);
        };
        changes::record(&mut tx, revision, vec![], true, vec![]).await?;
        let details = format!(
            "epoch {} -> {new} at revision {revision}: {reason}",
            if expected.is_empty() {
                "(first)"
            } else {
                expected
            }
        );
        Audit::new(
            "StartEpoch",
            ResourceKind::Store,
            &self.store_id,
            &self.store_id,
            &["epoch"],
        )
        .with_details(&details)
        .write(
            &mut tx,
            revision,
            Timestamp::now(),
            &Actor(EPOCH_ACTOR.to_string()),
        )
        .await?;
        self.notify_at_commit(&mut tx, revision).await?;
        tx.commit().await?;
        self.note_committed(revision);
        Ok(Some(new))
    }
}
