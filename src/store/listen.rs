//! How this process learns of commits: its own (`note_committed`, from `commit`) and, on
//! PostgreSQL, other replicas' (LISTEN on `keygate_changes`). Either wakes the snapshot
//! builder through `subscribe_commits`. Depends on nothing outside the store.

use std::time::Duration;

use tokio::sync::watch;

use super::Store;

impl Store {
    /// The latest revision this process committed; wakes the snapshot builder.
    pub fn subscribe_commits(&self) -> watch::Receiver<i64> {
        self.committed.subscribe()
    }

    /// Moves the committed revision forward (never back) and wakes its subscribers.
    pub(super) fn note_committed(&self, revision: i64) {
        self.committed.send_if_modified(|r| {
            if revision > *r {
                *r = revision;
                true
            } else {
                false
            }
        });
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
                        Ok(rev) => self.note_committed(rev),
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
}
