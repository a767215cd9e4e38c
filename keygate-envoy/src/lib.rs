//! keygate inside Envoy: an Envoy 1.40 dynamic module (`libkeygate_envoy.so`) that makes the
//! ext_authz service's decision in-process. It calls the same code (`keygate::authz::decide`
//! over the same snapshot type, fed by the same subscriber), so SPEC §2 has one implementation
//! and two adapters; this one applies the decision through Envoy's filter ABI: the vendor key
//! header set (one value), the consumer credential removed (headers and query parameter),
//! dynamic metadata under `keygate`, or the local reply with SPEC §2's JSON body.
//!
//! Only `ffi` may use `unsafe`. Nothing here blocks or locks on a worker thread: the snapshot
//! is read through an atomic pointer, counters go to Envoy's own stats.
#![deny(unsafe_code)]

mod feed;
mod ffi;
mod http;
mod settings;

use std::net::IpAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicI64, Ordering};

use keygate::authz::decision::{Decision, DenyReason, path_without_param};
use keygate::authz::{DecisionConfig, RequestView, decide};
use keygate::domain::Timestamp;
use keygate::metrics::METRICS;

use ffi::{ConfigEnvoy, CounterId, FilterModule, GaugeId, HeadersStatus, LogLevel, Request};
use settings::{FilterSettings, METADATA_FIELDS, RouteSettings};

/// The dynamic-metadata namespace of SPEC §2 step 7 (`%DYNAMIC_METADATA(keygate:consumer)%`).
pub const METADATA_NAMESPACE: &str = "keygate";

/// The module: what the FFI hooks dispatch to.
pub struct Module;

ffi::declare_filter_module!(Module);

/// One filter config (one per listener config; all share the process's feed).
pub struct FilterConfig {
    feed: Arc<feed::Feed>,
    decision: DecisionConfig,
    /// Envoy stats `keygate_allowed` / `keygate_denied` (plain counters: an atomic add).
    /// The full breakdown — by reason, per consumer, check latency — is keygate's own
    /// `/metrics` on `metrics_addr`, as `keygate authz` exports it.
    allowed: Option<CounterId>,
    denied: Option<CounterId>,
    /// `keygate_snapshot_version`: the version workers decide from (set when it changes).
    snapshot_version: Option<GaugeId>,
    reported_version: AtomicI64,
    /// Which of `METADATA_FIELDS` an allowed request gets.
    metadata_fields: [bool; 6],
}

/// A route's settings.
pub struct RouteConfig {
    model_service: Option<Box<str>>,
}

impl FilterModule for Module {
    type Config = FilterConfig;
    type PerRoute = RouteConfig;

    fn program_init() -> bool {
        logging::init();
        true
    }

    fn new_config(
        _name: &str,
        config: &[u8],
        envoy: &mut ConfigEnvoy<'_>,
    ) -> Result<FilterConfig, String> {
        let settings = FilterSettings::parse(config)?;
        let decision = settings.decision()?;
        let metadata_fields = settings.metadata_fields()?;
        let feed = feed::feed_for(&settings)?;
        Ok(FilterConfig {
            feed,
            decision,
            allowed: envoy.define_counter("keygate_allowed"),
            denied: envoy.define_counter("keygate_denied"),
            snapshot_version: envoy.define_gauge("keygate_snapshot_version"),
            reported_version: AtomicI64::new(-1),
            metadata_fields,
        })
    }

    fn new_per_route(_name: &str, config: &[u8]) -> Result<RouteConfig, String> {
        let r = RouteSettings::parse(config)?;
        Ok(RouteConfig {
            model_service: r.model_service.map(String::into_boxed_str),
        })
    }

    fn on_request_headers(
        config: &FilterConfig,
        req: &mut Request<'_, RouteConfig>,
        _end_of_stream: bool,
    ) -> HeadersStatus {
        config.check(req)
    }
}

/// The request as `decide()` sees it.
struct View<'r, 'a> {
    req: &'r Request<'a, RouteConfig>,
    route: Option<&'a RouteConfig>,
}

impl RequestView for View<'_, '_> {
    fn header(&self, name: &str) -> Option<&str> {
        std::str::from_utf8(self.req.header(name)?).ok()
    }

    fn query(&self) -> &str {
        self.header(":path")
            .and_then(|p| p.split_once('?'))
            .map(|(_, q)| q)
            .unwrap_or("")
    }

    fn peer_ip(&self) -> Option<IpAddr> {
        self.req.downstream_remote_ip()
    }

    fn model_service(&self) -> Option<&str> {
        self.route?.model_service.as_deref()
    }
}

/// A UUID as text on the stack (no allocation per request).
fn uuid_text<'b>(id: &uuid::Uuid, buf: &'b mut [u8; 36]) -> &'b str {
    id.hyphenated().encode_lower(buf)
}

impl FilterConfig {
    fn check(&self, req: &mut Request<'_, RouteConfig>) -> HeadersStatus {
        let started = std::time::Instant::now();
        let status = self.decide_and_apply(req);
        METRICS
            .check_duration
            .observe(started.elapsed().as_secs_f64());
        status
    }

    fn decide_and_apply(&self, req: &mut Request<'_, RouteConfig>) -> HeadersStatus {
        let now = Timestamp::now();
        let guard = self.feed.cell.load_guard();
        let Some(snap) = guard.as_ref() else {
            return self.deny(req, DenyReason::NotReady, None);
        };
        if let Some(g) = self.snapshot_version
            && self.reported_version.load(Ordering::Relaxed) != snap.version
        {
            self.reported_version.store(snap.version, Ordering::Relaxed);
            req.set_gauge(g, snap.version.max(0) as u64);
        }
        let route = req.per_route();
        let decision = {
            let view = View { req, route };
            decide(snap, &self.decision, &view, now, |k| {
                self.feed.hasher.hash(k)
            })
        };
        let a = match decision {
            Decision::Allow(a) => a,
            Decision::Deny(d) => return self.deny(req, d.reason, d.key),
        };
        // The credential query parameter, cut from :path (allocates only when present).
        let new_path = self
            .decision
            .credential_query_param
            .as_deref()
            .and_then(|p| {
                let path = std::str::from_utf8(req.header(":path")?).ok()?;
                path_without_param(path, p)
            });
        // Overwrite: exactly one value of the vendor header reaches the upstream. If Envoy
        // refuses any of these edits the consumer key could travel on: fail closed.
        let mut edited = req.set_header(
            &a.service.auth_header,
            a.model_key.header_value.expose().as_bytes(),
        );
        for h in &self.decision.credential_headers {
            if h.as_str() != &*a.service.auth_header && req.header_count(h) > 0 {
                edited &= req.remove_header(h);
            }
        }
        if let Some(p) = new_path {
            edited &= req.set_header(":path", p.as_bytes());
        }
        if !edited {
            METRICS.error();
            req.send_local_reply(
                500,
                &[("content-type", "application/json")],
                ffi::INTERNAL_ERROR_BODY.as_bytes(),
                "keygate_header_edit_failed",
            );
            return HeadersStatus::StopIteration;
        }
        let on = self.metadata_fields;
        let (mut b1, mut b2) = ([0u8; 36], [0u8; 36]);
        let values: [&str; 6] = [
            &a.consumer.name,
            if on[1] {
                uuid_text(&a.consumer.id, &mut b1)
            } else {
                ""
            },
            &a.key.name,
            if on[3] {
                uuid_text(&a.key.id, &mut b2)
            } else {
                ""
            },
            &a.service.name,
            &a.model_key.name,
        ];
        let mut chosen = [("", ""); 6];
        let mut n = 0;
        for ((name, value), on) in METADATA_FIELDS.into_iter().zip(values).zip(on) {
            if on {
                chosen[n] = (name, value);
                n += 1;
            }
        }
        if n > 0 {
            req.set_metadata_strings(METADATA_NAMESPACE, &chosen[..n]);
        }
        METRICS.allowed();
        if let Some(c) = a.consumer.usage.counter(&a.service.id, || {
            METRICS.consumer_counter(&a.consumer.name, &a.service.name)
        }) {
            c.inc();
        }
        if let Some(c) = self.allowed {
            req.increment_counter(c, 1);
        }
        self.feed.usage.record(a.key, now);
        HeadersStatus::Continue
    }

    fn deny(
        &self,
        req: &mut Request<'_, RouteConfig>,
        reason: DenyReason,
        key: Option<&keygate::snapshot::KeyEntry>,
    ) -> HeadersStatus {
        let mut b = [0u8; 36];
        match key {
            Some(k) => req.set_metadata_strings(
                METADATA_NAMESPACE,
                &[
                    ("deny_reason", reason.as_str()),
                    ("consumer_key", &k.name),
                    ("consumer_key_id", uuid_text(&k.id, &mut b)),
                ],
            ),
            None => {
                req.set_metadata_strings(METADATA_NAMESPACE, &[("deny_reason", reason.as_str())])
            }
        }
        METRICS.denied(reason);
        if let Some(c) = self.denied {
            req.increment_counter(c, 1);
        }
        if ffi::log_enabled(LogLevel::Debug) {
            let request_id = req
                .header("x-request-id")
                .and_then(|v| std::str::from_utf8(v).ok())
                .unwrap_or("");
            ffi::log(
                LogLevel::Debug,
                &format!(
                    "keygate: check denied reason={} consumer_key={} x_request_id={request_id}",
                    reason.as_str(),
                    key.map(|k| &*k.name).unwrap_or("")
                ),
            );
        }
        req.send_local_reply(
            reason.http_status() as u32,
            &[("content-type", "application/json")],
            reason.body().as_bytes(),
            reason.as_str(),
        );
        HeadersStatus::StopIteration
    }
}

/// `tracing` events of the shared keygate code (the subscriber, the cache) go to Envoy's log.
mod logging {
    use std::io::Write;

    use tracing::Level;
    use tracing_subscriber::fmt::MakeWriter;

    use crate::ffi::{LogLevel, log};

    /// One event's text, written to Envoy's log at the event's level when dropped.
    pub struct EnvoyLine {
        level: LogLevel,
        buf: Vec<u8>,
    }

    impl Write for EnvoyLine {
        fn write(&mut self, b: &[u8]) -> std::io::Result<usize> {
            self.buf.extend_from_slice(b);
            Ok(b.len())
        }
        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }

    impl Drop for EnvoyLine {
        fn drop(&mut self) {
            let text = String::from_utf8_lossy(&self.buf);
            let text = text.trim_end();
            if !text.is_empty() {
                log(self.level, &format!("keygate: {text}"));
            }
        }
    }

    pub struct EnvoyLog;

    impl<'a> MakeWriter<'a> for EnvoyLog {
        type Writer = EnvoyLine;
        fn make_writer(&'a self) -> EnvoyLine {
            EnvoyLine {
                level: LogLevel::Info,
                buf: Vec::new(),
            }
        }
        fn make_writer_for(&'a self, meta: &tracing::Metadata<'_>) -> EnvoyLine {
            let level = match *meta.level() {
                Level::ERROR => LogLevel::Error,
                Level::WARN => LogLevel::Warn,
                Level::INFO => LogLevel::Info,
                Level::DEBUG => LogLevel::Debug,
                Level::TRACE => LogLevel::Trace,
            };
            EnvoyLine {
                level,
                buf: Vec::new(),
            }
        }
    }

    /// Installs the forwarding subscriber (once per process; info and above).
    pub fn init() {
        let subscriber = tracing_subscriber::fmt()
            .with_writer(EnvoyLog)
            .with_ansi(false)
            .without_time()
            .with_target(false)
            .with_level(false)
            .with_max_level(Level::INFO)
            .finish();
        let _ = tracing::subscriber::set_global_default(subscriber);
    }
}
