//! Prometheus metrics (the `prometheus` crate: lock-free counters and histograms once a
//! handle is resolved): the registry and every metric keygate exports. A leaf: it depends on
//! nothing else in the crate; `health` serves it over HTTP and `authz::record` feeds the checks.
//! Names and labels are the contract operators build dashboards on (SPEC §6).
//! The hot path only touches pre-resolved handles: no lock, allocation or label formatting.

use std::sync::LazyLock;

use prometheus::{
    Gauge, Histogram, HistogramOpts, IntCounter, IntCounterVec, IntGauge, IntGaugeVec, Opts,
    Registry,
};

/// Every metric keygate exports.
#[cfg_attr(not(feature = "server"), allow(dead_code))]
pub struct Metrics {
    pub registry: Registry,
    /// `keygate_checks_total{result, reason}` (denial handles are resolved by `authz::record`).
    pub checks: IntCounterVec,
    allowed: IntCounter,
    errors: IntCounter,
    pub check_duration: Histogram,
    pub consumer_requests: IntCounterVec,
    pub(crate) snapshot_version: IntGauge,
    pub(crate) snapshot_age: Gauge,
    pub(crate) snapshot_build: Gauge,
    pub(crate) snapshot_entries: IntGaugeVec,
    pub(crate) subscribers: IntGauge,
    pub(crate) staleness: Gauge,
    /// Data planes: snapshot stream messages refused, by reason (registered with `staleness`).
    pub(crate) snapshot_rejected: IntCounterVec,
    /// Control planes: new epochs this process started (registered with the control plane's
    /// metrics).
    pub(crate) epoch_changes: IntCounter,
    pub secret_refresh_failures: IntCounterVec,
    /// Data planes: metered success responses that gave no token counts, by reason.
    pub usage_unparsed: IntCounterVec,
    /// Data planes: usage reports the control plane did not acknowledge (sent again).
    pub usage_report_failures: IntCounter,
    /// Data planes: usage rows not yet acknowledged by the control plane.
    pub usage_pending_rows: IntGauge,
    /// Control planes: applied usage (SPEC §8.2), per consumer and model service; counted
    /// by `admin::usage`.
    pub usage_tokens: IntCounterVec,
    pub usage_cost: IntCounterVec,
    pub usage_unpriced: IntCounterVec,
    pub usage_reports: IntCounterVec,
    /// Budgets usage brought to exhaustion or re-opened, and refreshes that failed.
    pub budget_changes: IntCounterVec,
    /// Data planes with `--rate-limit-redis`: 1 while counts are shared, 0 while local only.
    pub rate_limit_shared: IntGauge,
    /// Data planes with `--rate-limit-redis`: synchronisations that failed.
    pub rate_limit_sync_failures: IntCounter,
}

impl Metrics {
    fn new() -> Metrics {
        let registry = Registry::new();
        let checks = IntCounterVec::new(
            Opts::new(
                "keygate_checks_total",
                "Authorization checks by result and reason.",
            ),
            &["result", "reason"],
        )
        .expect("valid metric");
        let allowed = checks.with_label_values(&["allowed", "ok"]);
        let errors = checks.with_label_values(&["error", "internal"]);
        let check_duration = Histogram::with_opts(
            HistogramOpts::new(
                "keygate_check_duration_seconds",
                "Time keygate spends deciding one check (from request decoded to response built).",
            )
            .buckets(vec![
                0.000_001, 0.000_002, 0.000_005, 0.000_01, 0.000_02, 0.000_05, 0.000_1, 0.000_25,
                0.000_5, 0.001, 0.005, 0.01,
            ]),
        )
        .expect("valid metric");
        let consumer_requests = IntCounterVec::new(
            Opts::new(
                "keygate_consumer_requests_total",
                "Allowed requests per consumer and model service (usage attribution).",
            ),
            &["consumer", "model_service"],
        )
        .expect("valid metric");
        let snapshot_version = IntGauge::new(
            "keygate_snapshot_version",
            "Store revision of the live snapshot.",
        )
        .expect("valid metric");
        let snapshot_age = Gauge::new(
            "keygate_snapshot_age_seconds",
            "Seconds since the live snapshot was built.",
        )
        .expect("valid metric");
        let snapshot_build = Gauge::new(
            "keygate_snapshot_build_seconds",
            "How long the last snapshot update took to apply.",
        )
        .expect("valid metric");
        let snapshot_entries = IntGaugeVec::new(
            Opts::new(
                "keygate_snapshot_entries",
                "Entries in the live snapshot by kind.",
            ),
            &["kind"],
        )
        .expect("valid metric");
        let subscribers = IntGauge::new(
            "keygate_subscribers",
            "Data planes subscribed to this control plane.",
        )
        .expect("valid metric");
        let staleness = Gauge::new(
            "keygate_snapshot_staleness_seconds",
            "Seconds since this data plane last heard from its control plane.",
        )
        .expect("valid metric");
        let snapshot_rejected = IntCounterVec::new(
            Opts::new(
                "keygate_snapshot_messages_rejected_total",
                "Snapshot stream messages this data plane refused, by reason (mac, malformed, \
                 stale, digest); the served snapshot is kept and the data plane resubscribes.",
            ),
            &["reason"],
        )
        .expect("valid metric");
        let epoch_changes = IntCounter::new(
            "keygate_store_epoch_changes_total",
            "New epochs this control plane started: the store's revision went back (a restore \
             or a failover to a lagging replica); every data plane reloads in full.",
        )
        .expect("valid metric");
        let secret_refresh_failures = IntCounterVec::new(
            Opts::new(
                "keygate_secret_refresh_failures_total",
                "Failed secret reference refreshes by provider.",
            ),
            &["provider"],
        )
        .expect("valid metric");
        let usage_unparsed = IntCounterVec::new(
            Opts::new(
                "keygate_usage_unparsed_total",
                "Metered success responses that gave no token counts (counted as requests with \
                 zero tokens), by reason: unreadable (malformed, compressed, not JSON or SSE) or \
                 no_usage (readable, without counts).",
            ),
            &["reason"],
        )
        .expect("valid metric");
        let usage_report_failures = IntCounter::new(
            "keygate_usage_report_failures_total",
            "Usage reports the control plane did not acknowledge; each is sent again unchanged.",
        )
        .expect("valid metric");
        let usage_pending_rows = IntGauge::new(
            "keygate_usage_pending_rows",
            "Usage rows (consumer key x model service x model) not yet acknowledged by the \
             control plane.",
        )
        .expect("valid metric");
        let usage_tokens = IntCounterVec::new(
            Opts::new(
                "keygate_usage_tokens_total",
                "Tokens of applied usage reports per consumer and model service; kind input \
                 (cached input included), output or cached_input.",
            ),
            &["consumer", "model_service", "kind"],
        )
        .expect("valid metric");
        let usage_cost = IntCounterVec::new(
            Opts::new(
                "keygate_usage_cost_microusd_total",
                "Cost of applied usage in whole micro-USD per consumer and model service (the \
                 picodollars below one are carried to the next report).",
            ),
            &["consumer", "model_service"],
        )
        .expect("valid metric");
        let usage_unpriced = IntCounterVec::new(
            Opts::new(
                "keygate_usage_unpriced_requests_total",
                "Requests of applied usage whose model the model service has no price for.",
            ),
            &["model_service"],
        )
        .expect("valid metric");
        let usage_reports = IntCounterVec::new(
            Opts::new(
                "keygate_usage_reports_total",
                "Usage reports from data planes: applied, duplicate (applied before) or refused.",
            ),
            &["result"],
        )
        .expect("valid metric");
        let budget_changes = IntCounterVec::new(
            Opts::new(
                "keygate_budget_changes_total",
                "Budgets of consumers and consumer keys that usage brought to exhaustion \
                 (exhausted) or that re-opened in a new period (reopened), as published in the \
                 snapshot by this control plane; failed: a refresh the store could not make \
                 (the next usage report of the key retries it).",
            ),
            &["state"],
        )
        .expect("valid metric");
        let rate_limit_shared = IntGauge::new(
            "keygate_rate_limit_shared",
            "1 while this data plane shares rate-limit counts through Redis, 0 while Redis cannot \
             be reached and it enforces its own counts only.",
        )
        .expect("valid metric");
        let rate_limit_sync_failures = IntCounter::new(
            "keygate_rate_limit_sync_failures_total",
            "Rate-limit count synchronisations with Redis that failed (unreachable, late, or an \
             unexpected reply).",
        )
        .expect("valid metric");
        for c in [
            Box::new(checks.clone()) as Box<dyn prometheus::core::Collector>,
            Box::new(rate_limit_shared.clone()),
            Box::new(rate_limit_sync_failures.clone()),
            Box::new(usage_unparsed.clone()),
            Box::new(usage_report_failures.clone()),
            Box::new(usage_pending_rows.clone()),
            Box::new(check_duration.clone()),
            Box::new(consumer_requests.clone()),
            Box::new(snapshot_version.clone()),
            Box::new(snapshot_age.clone()),
            Box::new(snapshot_build.clone()),
            Box::new(snapshot_entries.clone()),
            Box::new(secret_refresh_failures.clone()),
            // Vectors without children are not exported: only control planes applying usage
            // show these.
            Box::new(usage_tokens.clone()),
            Box::new(usage_cost.clone()),
            Box::new(usage_unpriced.clone()),
            Box::new(usage_reports.clone()),
            Box::new(budget_changes.clone()),
        ] {
            registry.register(c).expect("unique metric names");
        }
        #[cfg(target_os = "linux")]
        registry
            .register(Box::new(
                prometheus::process_collector::ProcessCollector::for_self(),
            ))
            .expect("unique metric names");
        Metrics {
            registry,
            checks,
            allowed,
            errors,
            check_duration,
            consumer_requests,
            snapshot_version,
            snapshot_age,
            snapshot_build,
            snapshot_entries,
            subscribers,
            staleness,
            snapshot_rejected,
            epoch_changes,
            secret_refresh_failures,
            usage_unparsed,
            usage_report_failures,
            usage_pending_rows,
            usage_tokens,
            usage_cost,
            usage_unpriced,
            usage_reports,
            budget_changes,
            rate_limit_shared,
            rate_limit_sync_failures,
        }
    }

    /// The refused-message counter for `reason`.
    pub fn snapshot_rejected(&self, reason: &str) -> IntCounter {
        self.snapshot_rejected.with_label_values(&[reason])
    }

    /// Counts a new epoch this control plane started.
    pub fn epoch_changed(&self) {
        self.epoch_changes.inc();
    }

    #[inline]
    pub fn allowed(&self) {
        self.allowed.inc();
    }

    #[inline]
    pub fn error(&self) {
        self.errors.inc();
    }

    /// The counter for `consumer` on `model_service` (resolved once per consumer entry and
    /// service, then cached by the caller).
    pub fn consumer_counter(&self, consumer: &str, model_service: &str) -> IntCounter {
        self.consumer_requests
            .with_label_values(&[consumer, model_service])
    }
}

/// The process's metrics.
pub static METRICS: LazyLock<Metrics> = LazyLock::new(Metrics::new);
