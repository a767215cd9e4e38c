//! Metered usage on a data plane (SPEC §8.2): every allowed request's response adds its
//! counts to a [`Tally`] (a sharded map, one short lock per response, never held across
//! anything else), and the reporter task sends the sums to the control plane every interval
//! and at shutdown.
//!
//! Exactly once: a data plane has a random id for its life and numbers its reports 1, 2, 3…;
//! one report is outstanding at a time and an undelivered one is sent again unchanged (same
//! sequence, same rows) until its control plane — any of them: they share the store —
//! acknowledges it; the store applies a (data plane, sequence) once. Usage recorded while a
//! report is outstanding waits for the next one. A report holds at most [`MAX_ROWS`] rows;
//! the rest follows at once in the next.

use std::collections::HashMap;
use std::future::Future;
use std::hash::{BuildHasher, Hash};
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use uuid::Uuid;

use crate::domain::Timestamp;

/// The most rows one report carries.
pub const MAX_ROWS: usize = 10_000;

/// How long a data plane keeps trying to deliver its last reports at shutdown.
pub const SHUTDOWN_DEADLINE: Duration = Duration::from_secs(5);

/// What usage is summed per.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct UsageKey {
    pub consumer_key: Uuid,
    /// The consumer the key was bound to when it was used.
    pub consumer: Option<Uuid>,
    pub model_service: Uuid,
    /// The request's model, else the response's; empty when neither was known.
    pub model: String,
}

/// A [`UsageKey`] with its model borrowed: what a response is recorded under, owned only the
/// first time a tally sees it. Hashes exactly as the [`UsageKey`] it stands for.
#[derive(Clone, Copy, Debug, Hash)]
pub struct UsageKeyRef<'a> {
    pub consumer_key: Uuid,
    pub consumer: Option<Uuid>,
    pub model_service: Uuid,
    pub model: &'a str,
}

impl UsageKeyRef<'_> {
    fn to_owned_key(self) -> UsageKey {
        UsageKey {
            consumer_key: self.consumer_key,
            consumer: self.consumer,
            model_service: self.model_service,
            model: self.model.to_owned(),
        }
    }
}

impl hashbrown::Equivalent<UsageKey> for UsageKeyRef<'_> {
    fn equivalent(&self, key: &UsageKey) -> bool {
        self.consumer_key == key.consumer_key
            && self.consumer == key.consumer
            && self.model_service == key.model_service
            && self.model == key.model
    }
}

/// Counts for one [`UsageKey`]. `input_tokens` includes `cached_input_tokens`.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Counts {
    pub requests: u64,
    /// Responses with a 4xx or 5xx status.
    pub error_responses: u64,
    /// Success responses that gave no token counts (unreadable, or without usage).
    pub unparsed: u64,
    pub input_tokens: u64,
    pub output_tokens: u64,
    pub cached_input_tokens: u64,
}

impl Counts {
    pub fn add(&mut self, o: &Counts) {
        self.requests = self.requests.saturating_add(o.requests);
        self.error_responses = self.error_responses.saturating_add(o.error_responses);
        self.unparsed = self.unparsed.saturating_add(o.unparsed);
        self.input_tokens = self.input_tokens.saturating_add(o.input_tokens);
        self.output_tokens = self.output_tokens.saturating_add(o.output_tokens);
        self.cached_input_tokens = self
            .cached_input_tokens
            .saturating_add(o.cached_input_tokens);
    }
}

impl Counts {
    /// The counts as a report may carry them (the store refuses a whole report with a row
    /// beyond its rules, so one absurd vendor answer must not cost every other row): each at
    /// most [`REPORT_MAX_COUNT`], cached input within input.
    ///
    /// [`REPORT_MAX_COUNT`]: crate::domain::usage::REPORT_MAX_COUNT
    pub fn within_report_rules(self) -> Counts {
        use crate::domain::usage::REPORT_MAX_COUNT as MAX;
        let input_tokens = self.input_tokens.min(MAX);
        Counts {
            requests: self.requests.min(MAX),
            error_responses: self.error_responses.min(MAX),
            unparsed: self.unparsed.min(MAX),
            input_tokens,
            output_tokens: self.output_tokens.min(MAX),
            cached_input_tokens: self.cached_input_tokens.min(input_tokens),
        }
    }
}

const SHARDS: usize = 16;

/// The data plane's running sums since the last drain.
pub struct Tally {
    hasher: foldhash::fast::RandomState,
    shards: [Mutex<TallyMap>; SHARDS],
}

/// One shard's sums (a fast seeded hash: the keys are keygate's ids and checked model names).
type TallyMap = hashbrown::HashMap<UsageKey, Counts, foldhash::fast::RandomState>;

impl Default for Tally {
    fn default() -> Self {
        Tally {
            hasher: Default::default(),
            shards: std::array::from_fn(|_| Mutex::new(TallyMap::default())),
        }
    }
}

impl std::fmt::Debug for Tally {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Tally").finish_non_exhaustive()
    }
}

impl Tally {
    /// Adds one response's counts.
    pub fn record(&self, key: UsageKey, counts: Counts) {
        self.record_ref(
            UsageKeyRef {
                consumer_key: key.consumer_key,
                consumer: key.consumer,
                model_service: key.model_service,
                model: &key.model,
            },
            counts,
        );
    }

    /// Adds one response's counts under a borrowed key (its model copied only when the
    /// shard has not seen it since its last drain).
    pub fn record_ref(&self, key: UsageKeyRef<'_>, counts: Counts) {
        let shard = (self.hasher.hash_one(key.consumer_key) as usize) % SHARDS;
        let mut map = self.shards[shard]
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner());
        match map.get_mut(&key) {
            Some(sum) => sum.add(&counts),
            None => {
                map.insert(key.to_owned_key(), counts);
            }
        }
    }

    /// Takes every sum, adding them to `into`.
    pub fn drain_into(&self, into: &mut HashMap<UsageKey, Counts>) {
        for shard in &self.shards {
            let taken = std::mem::take(
                &mut *shard
                    .lock()
                    .unwrap_or_else(|poisoned| poisoned.into_inner()),
            );
            for (k, c) in taken {
                into.entry(k).or_default().add(&c);
            }
        }
    }
}

/// One report: the sums of an interval, numbered.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Report {
    pub data_plane: Uuid,
    pub sequence: u64,
    /// The data plane's clock when the report was made (the control plane buckets by it,
    /// never later than its own clock).
    pub time: Timestamp,
    pub rows: Vec<(UsageKey, Counts)>,
}

impl Report {
    /// The report as the store applies it.
    pub fn to_input(&self) -> crate::domain::usage::UsageReportInput {
        crate::domain::usage::UsageReportInput {
            data_plane: self.data_plane,
            sequence: self.sequence,
            time: self.time,
            rows: self
                .rows
                .iter()
                .map(|(k, c)| crate::domain::usage::UsageDelta {
                    consumer_key: k.consumer_key,
                    consumer: k.consumer,
                    model_service: k.model_service,
                    model: k.model.clone(),
                    requests: c.requests,
                    error_responses: c.error_responses,
                    unparsed: c.unparsed,
                    input_tokens: c.input_tokens,
                    output_tokens: c.output_tokens,
                    cached_input_tokens: c.cached_input_tokens,
                })
                .collect(),
        }
    }
}

/// Where reports go: the control plane, or (in `keygate serve`) the store. `Ok` means
/// applied or already applied; `Err` means send it again.
pub type ReportSink =
    Arc<dyn Fn(Report) -> Pin<Box<dyn Future<Output = Result<(), String>> + Send>> + Send + Sync>;

/// The reporter: numbers and sends reports, one outstanding at a time.
pub struct Reporter {
    tally: Arc<Tally>,
    sink: ReportSink,
    data_plane: Uuid,
    sequence: u64,
    /// Drained but not yet in a report.
    waiting: HashMap<UsageKey, Counts>,
    /// Made but not yet acknowledged.
    outstanding: Option<Report>,
}

impl Reporter {
    pub fn new(tally: Arc<Tally>, sink: ReportSink) -> Self {
        Reporter {
            tally,
            sink,
            data_plane: Uuid::new_v4(),
            sequence: 0,
            waiting: HashMap::new(),
            outstanding: None,
        }
    }

    pub fn data_plane(&self) -> Uuid {
        self.data_plane
    }

    /// Rows drained or reported but not yet acknowledged.
    pub fn pending_rows(&self) -> usize {
        self.waiting.len() + self.outstanding.as_ref().map_or(0, |r| r.rows.len())
    }

    /// Drains the tally and sends until everything is acknowledged or a send fails.
    /// Answers whether everything was delivered.
    pub async fn flush(&mut self, now: Timestamp) -> bool {
        self.tally.drain_into(&mut self.waiting);
        loop {
            if self.outstanding.is_none() {
                if self.waiting.is_empty() {
                    return true;
                }
                self.sequence += 1;
                let take = self.waiting.len().min(MAX_ROWS);
                let keys: Vec<UsageKey> = self.waiting.keys().take(take).cloned().collect();
                let rows = keys
                    .into_iter()
                    .filter_map(|k| self.waiting.remove_entry(&k))
                    .map(|(k, c)| (k, c.within_report_rules()))
                    .collect();
                self.outstanding = Some(Report {
                    data_plane: self.data_plane,
                    sequence: self.sequence,
                    time: now,
                    rows,
                });
            }
            let report = self.outstanding.clone().expect("made above");
            let (sequence, rows) = (report.sequence, report.rows.len());
            match (self.sink)(report).await {
                Ok(()) => {
                    tracing::debug!(sequence, rows, "usage report delivered");
                    self.outstanding = None;
                }
                Err(e) => {
                    crate::metrics::METRICS.usage_report_failures.inc();
                    tracing::warn!(sequence, rows, error = %e, "usage report not delivered; sending it again");
                    return false;
                }
            }
        }
    }
}

/// The reporter task: a flush every `interval` and, after `shutdown`, until everything is
/// delivered or [`SHUTDOWN_DEADLINE`] passes. `shutdown` must resolve only once nothing more
/// can be recorded in the tally (the servers' in-flight responses have drained,
/// `Shutdown::drained`): what is recorded after the last flush is lost.
pub fn start_reporter(
    tally: Arc<Tally>,
    sink: ReportSink,
    interval: Duration,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> impl Future<Output = ()> + Send + 'static {
    let mut reporter = Reporter::new(tally, sink);
    async move {
        tokio::pin!(shutdown);
        let mut tick = tokio::time::interval(interval);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                _ = &mut shutdown => break,
                _ = tick.tick() => {}
            }
            reporter.flush(Timestamp::now()).await;
            crate::metrics::METRICS
                .usage_pending_rows
                .set(reporter.pending_rows() as i64);
        }
        let last = async {
            let mut backoff = Duration::from_millis(50);
            while !reporter.flush(Timestamp::now()).await {
                tokio::time::sleep(backoff).await;
                backoff = (backoff * 2).min(Duration::from_secs(1));
            }
        };
        if tokio::time::timeout(SHUTDOWN_DEADLINE, last).await.is_err() {
            tracing::error!(
                rows = reporter.pending_rows(),
                "usage not delivered at shutdown: the control plane did not answer in time"
            );
        }
    }
}

#[cfg(test)]
#[path = "metered_tests.rs"]
mod tests;
