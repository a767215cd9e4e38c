//! Prometheus metrics (the `prometheus` crate: lock-free counters and histograms once a
//! handle is resolved) and the HTTP listener for `/metrics`, `/healthz` and `/readyz`.
//! Names and labels are the contract operators build dashboards on (SPEC §6).
//! The hot path only touches pre-resolved handles: no lock, allocation or label formatting.

use std::sync::{Arc, LazyLock};
use std::time::SystemTime;

use prometheus::{
    Encoder, Gauge, Histogram, HistogramOpts, IntCounter, IntCounterVec, IntGauge, IntGaugeVec,
    Opts, Registry, TextEncoder,
};

use crate::authz::DenyReason;
use crate::distribution::SubscriberStatus;
use crate::snapshot::SnapshotCell;

/// Every metric keygate exports.
#[cfg_attr(not(feature = "server"), allow(dead_code))]
pub struct Metrics {
    pub registry: Registry,
    allowed: IntCounter,
    denied: [IntCounter; DenyReason::ALL.len()],
    errors: IntCounter,
    pub check_duration: Histogram,
    pub consumer_requests: IntCounterVec,
    snapshot_version: IntGauge,
    snapshot_age: Gauge,
    snapshot_build: Gauge,
    snapshot_entries: IntGaugeVec,
    subscribers: IntGauge,
    staleness: Gauge,
    pub secret_refresh_failures: IntCounterVec,
}

fn reason_index(r: DenyReason) -> usize {
    DenyReason::ALL
        .iter()
        .position(|x| *x == r)
        .expect("every reason is listed")
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
        let denied = DenyReason::ALL.map(|r| checks.with_label_values(&["denied", r.as_str()]));
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
        let secret_refresh_failures = IntCounterVec::new(
            Opts::new(
                "keygate_secret_refresh_failures_total",
                "Failed secret reference refreshes by provider.",
            ),
            &["provider"],
        )
        .expect("valid metric");
        for c in [
            Box::new(checks) as Box<dyn prometheus::core::Collector>,
            Box::new(check_duration.clone()),
            Box::new(consumer_requests.clone()),
            Box::new(snapshot_version.clone()),
            Box::new(snapshot_age.clone()),
            Box::new(snapshot_build.clone()),
            Box::new(snapshot_entries.clone()),
            Box::new(secret_refresh_failures.clone()),
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
            allowed,
            denied,
            errors,
            check_duration,
            consumer_requests,
            snapshot_version,
            snapshot_age,
            snapshot_build,
            snapshot_entries,
            subscribers,
            staleness,
            secret_refresh_failures,
        }
    }

    #[inline]
    pub fn allowed(&self) {
        self.allowed.inc();
    }

    #[inline]
    pub fn denied(&self, r: DenyReason) {
        self.denied[reason_index(r)].inc();
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

/// What `/readyz` and the gauges read at scrape time.
#[derive(Clone, Default)]
pub struct HealthSources {
    pub cell: SnapshotCell,
    pub subscriber: Option<Arc<SubscriberStatus>>,
    pub subscribers: Option<Arc<dyn Fn() -> i64 + Send + Sync>>,
}

impl HealthSources {
    pub fn new(
        cell: SnapshotCell,
        subscriber: Option<Arc<SubscriberStatus>>,
        subscribers: Option<Arc<dyn Fn() -> i64 + Send + Sync>>,
    ) -> Self {
        let m = &*METRICS;
        // Role-specific gauges appear only where they mean something.
        if subscribers.is_some() {
            let _ = m.registry.register(Box::new(m.subscribers.clone()));
        }
        if subscriber.is_some() {
            let _ = m.registry.register(Box::new(m.staleness.clone()));
        }
        HealthSources {
            cell,
            subscriber,
            subscribers,
        }
    }

    pub fn refresh_gauges(&self) {
        let m = &*METRICS;
        if let Some(s) = self.cell.load() {
            m.snapshot_version.set(s.version);
            m.snapshot_age.set(
                SystemTime::now()
                    .duration_since(s.build_time)
                    .map(|d| d.as_secs_f64())
                    .unwrap_or(0.0),
            );
            m.snapshot_build.set(s.build_duration.as_secs_f64());
            let c = s.counts();
            m.snapshot_entries
                .with_label_values(&["consumer_key"])
                .set(c.consumer_keys as i64);
            m.snapshot_entries
                .with_label_values(&["consumer"])
                .set(c.consumers as i64);
            m.snapshot_entries
                .with_label_values(&["model_service"])
                .set(c.model_services as i64);
            m.snapshot_entries
                .with_label_values(&["model_key"])
                .set(c.model_keys as i64);
        }
        if let Some(f) = &self.subscribers {
            m.subscribers.set(f());
        }
        if let Some(st) = &self.subscriber
            && let Some(s) = st.staleness()
        {
            m.staleness.set(s);
        }
    }
}

impl HealthSources {
    /// The Prometheus text exposition of every metric (gauges refreshed first).
    pub fn render(&self) -> Vec<u8> {
        self.refresh_gauges();
        let mut buf = Vec::new();
        let _ = TextEncoder::new().encode(&METRICS.registry.gather(), &mut buf);
        buf
    }

    /// `/readyz`: Ok with the snapshot version (and staleness), or why not ready.
    pub fn ready(&self) -> Result<String, String> {
        match self.cell.load() {
            Some(s) => {
                let staleness = self
                    .subscriber
                    .as_ref()
                    .and_then(|st| st.staleness())
                    .map(|s| format!(" staleness_seconds={s:.1}"))
                    .unwrap_or_default();
                Ok(format!("ready version={}{staleness}\n", s.version))
            }
            None => Err(
                "not ready: no snapshot yet (waiting for the store or the control plane)\n".into(),
            ),
        }
    }
}

#[cfg(feature = "server")]
pub use http::serve;

/// `/metrics`, `/healthz` and `/readyz` over HTTP (servers only).
#[cfg(feature = "server")]
mod http {
    use axum::Router;
    use axum::extract::State;
    use axum::http::{StatusCode, header};
    use axum::response::IntoResponse;
    use axum::routing::get;

    use super::HealthSources;

    async fn metrics(State(h): State<HealthSources>) -> impl IntoResponse {
        (
            StatusCode::OK,
            [(header::CONTENT_TYPE, prometheus::TEXT_FORMAT)],
            h.render(),
        )
    }

    async fn healthz() -> impl IntoResponse {
        (StatusCode::OK, "ok\n")
    }

    async fn readyz(State(h): State<HealthSources>) -> impl IntoResponse {
        match h.ready() {
            Ok(text) => (StatusCode::OK, text),
            Err(text) => (StatusCode::SERVICE_UNAVAILABLE, text),
        }
    }

    /// Serves `/metrics`, `/healthz` and `/readyz` on `listener` until `shutdown` resolves.
    pub async fn serve(
        listener: tokio::net::TcpListener,
        sources: HealthSources,
        shutdown: impl std::future::Future<Output = ()> + Send + 'static,
    ) {
        let app = Router::new()
            .route("/metrics", get(metrics))
            .route("/healthz", get(healthz))
            .route("/readyz", get(readyz))
            .with_state(sources);
        if let Err(e) = axum::serve(listener, app)
            .with_graceful_shutdown(shutdown)
            .await
        {
            tracing::error!(error = %e, "metrics listener failed");
        }
    }
}
