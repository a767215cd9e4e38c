//! The one place that records what a data plane decided, whichever adapter applied it: the
//! check counters and latency, the per-consumer attribution counter, the key's last use and
//! the denial log line. Depends on `metrics` (registry handles), `usage` and `snapshot`.
//! Everything here is an atomic add or a non-blocking enqueue: no lock, no I/O.

use std::sync::LazyLock;
use std::time::Instant;

use prometheus::IntCounter;

use super::decision::{Allowed, DenyReason};
use super::outcome::Refusal;
use crate::domain::Timestamp;
use crate::metrics::METRICS;
use crate::usage::UsageRecorder;

/// `keygate_checks_total{result="denied",reason=…}`, one handle per reason, resolved once.
static DENIED: LazyLock<[IntCounter; DenyReason::ALL.len()]> = LazyLock::new(|| {
    DenyReason::ALL.map(|r| METRICS.checks.with_label_values(&["denied", r.as_str()]))
});

fn reason_index(r: DenyReason) -> usize {
    DenyReason::ALL
        .iter()
        .position(|x| *x == r)
        .expect("every reason is listed")
}

/// Records outcomes. Cheap to clone; one per adapter instance.
#[derive(Clone, Debug, Default)]
pub struct OutcomeRecorder {
    usage: Option<UsageRecorder>,
}

impl OutcomeRecorder {
    /// A recorder; `usage` also stamps each allowed key's last use. Resolves every counter
    /// now, so `/metrics` lists each reason from the start.
    pub fn new(usage: Option<UsageRecorder>) -> Self {
        LazyLock::force(&DENIED);
        OutcomeRecorder { usage }
    }

    /// Runs one whole check (decide and apply) and observes its duration.
    #[inline]
    pub fn timed<T>(&self, check: impl FnOnce() -> T) -> T {
        let started = Instant::now();
        let out = check();
        self.observe_since(started);
        out
    }

    /// Observes one check that began at `started` (for a check the adapter times itself, e.g.
    /// one that turned out to need the body and is observed once, when decided).
    #[inline]
    pub fn observe_since(&self, started: Instant) {
        METRICS
            .check_duration
            .observe(started.elapsed().as_secs_f64());
    }

    /// An allowed request: counters, per-consumer attribution, last use.
    #[inline]
    pub fn allowed(&self, a: &Allowed<'_>, now: Timestamp) {
        METRICS.allowed();
        if let Some(c) = a.consumer.usage.counter(&a.service.id, || {
            METRICS.consumer_counter(&a.consumer.name, &a.service.name)
        }) {
            c.inc();
        }
        if let Some(u) = &self.usage {
            u.record(a.key, now);
        }
    }

    /// A refused request: the counter of its reason and a debug line naming the reason, the
    /// recognised key's name (never a value) and the request's id.
    pub fn refused(&self, r: &Refusal<'_>, request_id: &str, x_request_id: &str) {
        DENIED[reason_index(r.reason)].inc();
        tracing::debug!(
            reason = r.reason.as_str(),
            consumer_key = r.key.map(|k| &*k.name),
            request_id,
            x_request_id,
            "check denied"
        );
    }

    /// A check that failed inside keygate (the adapter fails closed).
    pub fn error(&self) {
        METRICS.error();
    }
}
