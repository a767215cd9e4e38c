//! Sharing rate-limit counts between data planes through Redis (`--rate-limit-redis`, the
//! module's `rate_limit_redis`; SPEC §8.3). A task, never the request path: every interval it
//! sends, in one pipeline, what this data plane took from each active subject (`HINCRBY` of its
//! own field in the subject's hash for the current UTC minute, which expires three minutes
//! later, then `HGETALL`) and takes the other fields' growth from its buckets
//! ([`SharedCounts`]). No request waits on Redis: while it
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

/// The most one synchronisation adds to a counter (Redis counters are signed 64-bit).
const MAX_ADD: u64 = 1 << 60;

/// The synchronisation task's state.
pub struct RedisSync {
    client: redis::Client,
    prefix: String,
    /// This data plane's field in every counter (random per process).
    field: String,
    conn: Option<redis::aio::MultiplexedConnection>,
    shared: SharedCounts,
    /// Whether the last synchronisation shared (`None` before the first): the log says when
    /// it changes, not at every interval.
    sharing: Option<bool>,
}

impl RedisSync {
    /// `url`: `redis://host:port[/db]` or `redis+unix:///path`. Checked here; connected lazily.
    pub fn new(url: &str, prefix: &str) -> Result<Self, String> {
        let client = redis::Client::open(url).map_err(|e| {
            format!(
                "rate_limit_redis: {:?} is not a Redis URL ({e})",
                crate::crypto::SecretUrl::new(url).redacted()
            )
        })?;
        Ok(RedisSync {
            client,
            prefix: prefix.to_string(),
            field: uuid::Uuid::new_v4().simple().to_string(),
            conn: None,
            shared: SharedCounts::default(),
            sharing: None,
        })
    }

    /// A failed synchronisation: the connection is dropped (the next one reconnects), and the
    /// log says so once, until Redis answers again.
    fn failed(&mut self, why: String) -> bool {
        self.conn = None;
        if self.sharing != Some(false) {
            tracing::warn!(
                error = %why,
                "rate-limit counters: not shared; each data plane counts locally until Redis answers"
            );
            self.sharing = Some(false);
        }
        false
    }

    /// One synchronisation at `now`: answers whether the counts were shared.
    pub async fn sync(&mut self, limiter: &RateLimiter, now: Timestamp) -> bool {
        let batch = limiter.take_unsynced(now.0);
        let w = window(now.0);
        let mut sent: Vec<(Subject, LimitKind)> = Vec::new();
        let mut pipe = redis::pipe();
        for u in &batch {
            for (kind, n) in [
                (LimitKind::Requests, u.requests),
                (LimitKind::Tokens, u.tokens),
            ] {
                let Some(n) = n else { continue };
                let key = counter_key(&self.prefix, u.subject, kind, w);
                pipe.cmd("HINCRBY")
                    .arg(&key)
                    .arg(&self.field)
                    .arg(n.min(MAX_ADD))
                    .ignore();
                pipe.cmd("EXPIRE").arg(&key).arg(COUNTER_TTL_SECS).ignore();
                pipe.cmd("HGETALL").arg(&key);
                sent.push((u.subject, kind));
            }
        }
        self.shared.forget_before(w);
        // Nothing to send: still make sure Redis answers (an idle data plane reports the
        // state it would share in, not a failure).
        if sent.is_empty() {
            pipe.cmd("PING").ignore();
        }
        let answers = tokio::time::timeout(SYNC_TIMEOUT, async {
            if self.conn.is_none() {
                self.conn = Some(self.client.get_multiplexed_async_connection().await?);
            }
            let conn = self.conn.as_mut().expect("connected above");
            pipe.query_async::<Vec<std::collections::HashMap<String, i64>>>(conn)
                .await
        })
        .await;
        let fields = match answers {
            Ok(Ok(f)) if f.len() == sent.len() => f,
            Ok(Ok(_)) => return self.failed("Redis answered an unexpected reply".into()),
            Ok(Err(e)) => return self.failed(format!("Redis unreachable: {e}")),
            Err(_) => return self.failed("Redis did not answer within 1 s".into()),
        };
        if self.sharing != Some(true) {
            tracing::info!("rate-limit counters: shared through Redis");
            self.sharing = Some(true);
        }
        for ((subject, kind), fields) in sent.into_iter().zip(fields) {
            let others_total: u64 = fields
                .iter()
                .filter(|(f, _)| **f != self.field)
                .map(|(_, n)| u64::try_from(*n).unwrap_or(0))
                .fold(0, u64::saturating_add);
            let others = self.shared.others(subject, kind, w, others_total);
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
            if sync.is_none() {
                // Shared with no one: what was taken needs no synchronisation.
                limiter.clear_unsynced();
            }
            limiter.forget_idle(now.0);
            last_forget = tokio::time::Instant::now();
        }
    }
}
