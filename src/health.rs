//! Health and readiness of a keygate process: the gauges refreshed at scrape time from the
//! live snapshot (and, on a data plane, its subscription), `/readyz`'s answer, and the HTTP
//! listener for `/metrics`, `/healthz` and `/readyz`. Depends on `metrics`, `snapshot` and
//! `distribution` (a data plane's staleness); a control plane passes in its failing secret
//! references.

use std::sync::Arc;
use std::time::SystemTime;

use prometheus::{Encoder, TextEncoder};

use crate::distribution::SubscriberStatus;
use crate::metrics::METRICS;
use crate::snapshot::SnapshotCell;

/// Lists failing secret references as `(reference, why)`.
pub type SecretFailures = Arc<dyn Fn() -> Vec<(String, String)> + Send + Sync>;

/// What `/readyz` and the gauges read at scrape time.
#[derive(Clone, Default)]
pub struct HealthSources {
    pub cell: SnapshotCell,
    pub subscriber: Option<Arc<SubscriberStatus>>,
    pub subscribers: Option<Arc<dyn Fn() -> i64 + Send + Sync>>,
    /// A control plane's failing secret references `(reference, why)`, named in `/readyz`.
    pub secret_failures: Option<SecretFailures>,
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
            let _ = m.registry.register(Box::new(m.snapshot_rejected.clone()));
            // Every reason from 0, so an alert on any increase sees the first one.
            for r in crate::distribution::subscriber::Rejected::ALL {
                m.snapshot_rejected(r.reason());
            }
        } else {
            // A control plane (its snapshot builder starts epochs).
            let _ = m.registry.register(Box::new(m.epoch_changes.clone()));
        }
        HealthSources {
            cell,
            subscriber,
            subscribers,
            secret_failures: None,
        }
    }

    /// Name failing secret references in `/readyz`'s detail.
    pub fn with_secret_failures(mut self, failures: SecretFailures) -> Self {
        self.secret_failures = Some(failures);
        self
    }

    /// One line per failing secret reference (readiness is unchanged: each keeps its last
    /// good value, or its key is left out).
    fn secret_detail(&self) -> String {
        let Some(failures) = &self.secret_failures else {
            return String::new();
        };
        failures()
            .into_iter()
            .map(|(r, why)| format!("secret_ref ({r}) failing: {why}\n"))
            .collect()
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
                Ok(format!(
                    "ready version={}{staleness}\n{}",
                    s.version,
                    self.secret_detail()
                ))
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
