//! `last_used_time`: stamped on the hot path with one atomic store (a key is queued for the
//! next flush only the first time it is used after a flush), flushed in batches (default
//! every second, and at shutdown) to the store or, on a data plane, to its control plane.
//! A flush never blocks a Check and never changes the snapshot.

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;

use tokio::sync::mpsc;
use uuid::Uuid;

use crate::domain::Timestamp;
use crate::snapshot::{KeyEntry, UsageStamp};

/// Where batches go: the store, or the control plane.
pub type UsageSink = Arc<
    dyn Fn(Vec<(Uuid, Timestamp)>) -> Pin<Box<dyn Future<Output = Result<(), String>> + Send>>
        + Send
        + Sync,
>;

/// Undelivered last-used times kept for retry, at most.
const MAX_PENDING: usize = 1_000_000;

/// The hot path's handle.
#[derive(Clone, Debug)]
pub struct UsageRecorder {
    tx: mpsc::Sender<(Uuid, Arc<UsageStamp>)>,
}

impl UsageRecorder {
    /// Records that `key` authorized a request at `now`: an atomic store, plus (first use
    /// since the last flush only) a non-blocking enqueue.
    #[inline]
    pub fn record(&self, key: &KeyEntry, now: Timestamp) {
        let stamp = key.usage.stamp();
        stamp.last_used_us.store(now.0, Ordering::Relaxed);
        if !stamp.queued.load(Ordering::Relaxed)
            && !stamp.queued.swap(true, Ordering::AcqRel)
            && self.tx.try_send((key.id, stamp.clone())).is_err()
        {
            // Queue full: the next use retries.
            stamp.queued.store(false, Ordering::Release);
        }
    }
}

/// Creates the recorder and the flusher task's future. The flusher runs until `shutdown`,
/// then flushes once more.
pub fn start(
    sink: UsageSink,
    interval: Duration,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> (UsageRecorder, impl Future<Output = ()> + Send + 'static) {
    let (tx, mut rx) = mpsc::channel::<(Uuid, Arc<UsageStamp>)>(65_536);
    let task = async move {
        tokio::pin!(shutdown);
        let mut tick = tokio::time::interval(interval);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        // Batches that could not be delivered (e.g. control plane down), retried next time.
        let mut pending: std::collections::HashMap<Uuid, Timestamp> =
            std::collections::HashMap::new();
        loop {
            let last = tokio::select! {
                _ = &mut shutdown => true,
                _ = tick.tick() => false,
            };
            while let Ok((id, stamp)) = rx.try_recv() {
                stamp.queued.store(false, Ordering::Release);
                let t = Timestamp(stamp.last_used_us.load(Ordering::Relaxed));
                if t.0 > 0 {
                    let e = pending.entry(id).or_insert(t);
                    *e = (*e).max(t);
                }
            }
            if !pending.is_empty() {
                let batch: Vec<(Uuid, Timestamp)> = pending.iter().map(|(k, v)| (*k, *v)).collect();
                let n = batch.len();
                match sink(batch).await {
                    Ok(()) => {
                        pending.clear();
                        tracing::debug!(keys = n, "last-used times flushed");
                    }
                    Err(e) => {
                        tracing::warn!(keys = n, error = %e, "last-used times not flushed; retrying with the next batch");
                        if pending.len() > MAX_PENDING {
                            pending.clear();
                        }
                    }
                }
            }
            if last {
                return;
            }
        }
    };
    (UsageRecorder { tx }, task)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Mutex;

    fn key(n: u128) -> KeyEntry {
        KeyEntry {
            id: Uuid::from_u128(n),
            consumer: None,
            enabled: true,
            expire_time: None,
            name: "k".into(),
            scope: crate::snapshot::ScopeSet::All,
            ip_allowlist: Box::new([]),
            limits: Default::default(),
            usage: Default::default(),
            previous: None,
        }
    }

    #[tokio::test(start_paused = true)]
    async fn uses_are_batched_per_interval_with_the_latest_time() {
        type Batches = Arc<Mutex<Vec<Vec<(Uuid, Timestamp)>>>>;
        let got: Batches = Arc::default();
        let g = got.clone();
        let sink: UsageSink = Arc::new(move |b| {
            g.lock().unwrap().push(b);
            Box::pin(async { Ok(()) })
        });
        let (stop_tx, stop_rx) = tokio::sync::oneshot::channel::<()>();
        let (rec, task) = start(sink, Duration::from_secs(1), async {
            let _ = stop_rx.await;
        });
        let handle = tokio::spawn(task);
        let (a, b) = (key(1), key(2));
        rec.record(&a, Timestamp(10));
        rec.record(&a, Timestamp(20));
        rec.record(&b, Timestamp(15));
        tokio::time::sleep(Duration::from_millis(1500)).await;
        {
            let batches = got.lock().unwrap();
            let all: Vec<_> = batches.iter().flatten().cloned().collect();
            assert_eq!(all.len(), 2, "one entry per key per flush: {all:?}");
            assert!(all.contains(&(Uuid::from_u128(1), Timestamp(20))));
            assert!(all.contains(&(Uuid::from_u128(2), Timestamp(15))));
        }
        // A use after the flush is queued again; shutdown flushes it.
        rec.record(&a, Timestamp(30));
        let _ = stop_tx.send(());
        handle.await.unwrap();
        let batches = got.lock().unwrap();
        assert_eq!(
            batches.last().unwrap(),
            &vec![(Uuid::from_u128(1), Timestamp(30))]
        );
    }
}
