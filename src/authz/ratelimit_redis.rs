//! Sharing rate-limit counts between data planes through Redis (`--rate-limit-redis`, the
//! module's `rate_limit_redis`; SPEC §8.3). A task, never the request path: every interval it
//! sends, in one pipeline, what this data plane took from each active subject (`INCRBY` on the
//! subject's counter for the current UTC minute, which expires three minutes later) and takes
//! the others' share the answers reveal ([`SharedCounts`]). No request waits on Redis: while it
//! cannot be reached (or answers late), each data plane enforces its own counts, the counts
//! taken meanwhile are not shared, and `keygate_rate_limit_shared` reads 0.

use std::sync::Arc;
use std::time::Duration;

use super::ratelimit::{LimitKind, RateLimiter, SharedCounts, Subject, window};
use crate::domain::Timestamp;

/// How long one synchronisation may take before it counts as failed.
const SYNC_TIMEOUT: Duration = Duration::from_secs(1);
/// A counter's life after its last addition (its minute, and slack for clocks).
const COUNTER_TTL_SECS: u64 = 180;

/// The Redis key of a subject's counter of `kind` for minute `window`.
pub fn counter_key(prefix: &str, subject: Subject, kind: LimitKind, window: i64) -> String {
    let (s, id) = match subject {
        Subject::Key(id) => ("k", id),
        Subject::Consumer(id) => ("c", id),
    };
    let k = match kind {
        LimitKind::Requests => "r",
        LimitKind::Tokens => "t",
    };
    format!("{prefix}rl:{s}:{}:{k}:{window}", id.simple())
}

/// The synchronisation task's state.
pub struct RedisSync {
    client: redis::Client,
    prefix: String,
    conn: Option<redis::aio::MultiplexedConnection>,
    shared: SharedCounts,
}

impl RedisSync {
    /// `url`: `redis://host:port[/db]` or `redis+unix:///path`. Checked here; connected lazily.
    pub fn new(url: &str, prefix: &str) -> Result<Self, String> {
        let client = redis::Client::open(url)
            .map_err(|e| format!("rate_limit_redis: {url:?} is not a Redis URL ({e})"))?;
        Ok(RedisSync {
            client,
            prefix: prefix.to_string(),
            conn: None,
            shared: SharedCounts::default(),
        })
    }

    /// One synchronisation at `now`: answers whether the counts were shared.
    pub async fn sync(&mut self, limiter: &RateLimiter, now: Timestamp) -> bool {
        let batch = limiter.take_unsynced();
        let w = window(now.0);
        let mut sent: Vec<(Subject, LimitKind, u64)> = Vec::new();
        let mut pipe = redis::pipe();
        for u in &batch {
            for (kind, n) in [
                (LimitKind::Requests, u.requests),
                (LimitKind::Tokens, u.tokens),
            ] {
                let Some(n) = n else { continue };
                let key = counter_key(&self.prefix, u.subject, kind, w);
                pipe.cmd("INCRBY").arg(&key).arg(n);
                pipe.cmd("EXPIRE").arg(&key).arg(COUNTER_TTL_SECS).ignore();
                sent.push((u.subject, kind, n));
            }
        }
        self.shared
            .retain(|s| batch.iter().any(|u| u.subject == *s));
        if sent.is_empty() {
            return self.conn.is_some();
        }
        let totals = tokio::time::timeout(SYNC_TIMEOUT, async {
            if self.conn.is_none() {
                self.conn = Some(self.client.get_multiplexed_async_connection().await?);
            }
            let conn = self.conn.as_mut().expect("connected above");
            pipe.query_async::<Vec<i64>>(conn).await
        })
        .await;
        let totals = match totals {
            Ok(Ok(t)) if t.len() == sent.len() => t,
            Ok(Ok(_)) => {
                tracing::warn!(
                    "rate-limit counters: Redis answered an unexpected reply; counting locally"
                );
                self.conn = None;
                return false;
            }
            Ok(Err(e)) => {
                tracing::warn!(error = %e, "rate-limit counters: Redis unreachable; counting locally");
                self.conn = None;
                return false;
            }
            Err(_) => {
                tracing::warn!(
                    "rate-limit counters: Redis did not answer in time; counting locally"
                );
                self.conn = None;
                return false;
            }
        };
        for ((subject, kind, own), total) in sent.into_iter().zip(totals) {
            let total = u64::try_from(total).unwrap_or(0);
            let others = self.shared.others(subject, kind, w, own, total);
            if others > 0 {
                let (r, t) = match kind {
                    LimitKind::Requests => (others, 0),
                    LimitKind::Tokens => (0, others),
                };
                limiter.take_remote(subject, r, t, now.0);
            }
        }
        true
    }
}

/// The task: a synchronisation every `interval` until `shutdown`; idle subjects are forgotten
/// every few seconds whether or not Redis is used.
pub async fn run(
    limiter: Arc<RateLimiter>,
    mut sync: Option<RedisSync>,
    interval: Duration,
    shutdown: impl std::future::Future<Output = ()>,
) {
    tokio::pin!(shutdown);
    let mut tick = tokio::time::interval(interval);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut last_forget = tokio::time::Instant::now();
    loop {
        tokio::select! {
            _ = &mut shutdown => return,
            _ = tick.tick() => {}
        }
        let now = Timestamp::now();
        if let Some(s) = &mut sync {
            let shared = s.sync(&limiter, now).await;
            crate::metrics::METRICS
                .rate_limit_shared
                .set(i64::from(shared));
            if !shared {
                crate::metrics::METRICS.rate_limit_sync_failures.inc();
            }
        }
        if last_forget.elapsed() >= Duration::from_secs(5) {
            limiter.forget_idle(now.0);
            last_forget = tokio::time::Instant::now();
        }
    }
}
