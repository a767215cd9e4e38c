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
use std::time::Instant;

use keygate::authz::decision::{Body, path_without_param};
use keygate::authz::metering::StreamMetering;
use keygate::authz::outcome::{
    METADATA_FIELDS, METADATA_NAMESPACE, METERED_ACCEPT_ENCODING, MetadataSelection,
    REPLY_CONTENT_TYPE,
};
use keygate::authz::{
    Admit, Decision, DecisionConfig, MetaValue, Outcome, OutcomeRecorder, Refusal, RequestView,
    decide,
};
use keygate::domain::Timestamp;

use ffi::{BodyStatus, ConfigEnvoy, CounterId, FilterModule, GaugeId, HeadersStatus, Request};
use settings::{FilterSettings, RouteSettings};

/// The module: what the FFI hooks dispatch to.
pub struct Module;

ffi::declare_filter_module!(Module);

/// One filter config (one per listener config; all share the process's feed).
pub struct FilterConfig {
    feed: Arc<feed::Feed>,
    decision: DecisionConfig,
    /// Records every outcome (keygate's metrics, last use, denial log), as `keygate authz` does.
    recorder: OutcomeRecorder,
    /// Envoy stats `keygate_allowed` / `keygate_denied` (plain counters: an atomic add).
    /// The full breakdown — by reason, per consumer, check latency — is keygate's own
    /// `/metrics` on `metrics_addr`, as `keygate authz` exports it.
    allowed: Option<CounterId>,
    denied: Option<CounterId>,
    /// `keygate_snapshot_version`: the version workers decide from (set when it changes).
    snapshot_version: Option<GaugeId>,
    reported_version: AtomicI64,
    /// Which of `METADATA_FIELDS` an allowed request gets.
    metadata_fields: MetadataSelection,
    /// Whether allowed requests' responses are metered.
    metering: bool,
}

/// A route's settings.
pub struct RouteConfig {
    model_service: Option<Box<str>>,
    /// The route's fixed model (it wins over the body and the path).
    model: Option<Box<str>>,
}

/// One request's state: whether its headers are held until the body is in (the decision
/// needs the model and the service reads it from the body), and an allowed request's
/// metering.
#[derive(Default)]
pub struct Stream {
    awaiting_body: bool,
    metering: Option<Metering>,
}

/// An allowed request's metering and the tally it goes to: recorded once, at the end of the
/// response or, if the stream is torn down first (client gone, reset), when it is dropped.
struct Metering {
    stream: Option<StreamMetering>,
    tally: Arc<keygate::usage::Tally>,
}

impl Metering {
    fn finish(&mut self) {
        if let Some(m) = self.stream.take() {
            m.finish(&self.tally);
        }
    }
}

impl Drop for Metering {
    fn drop(&mut self) {
        self.finish();
    }
}

/// What a check did with the request. (The metering is small: its response meter is boxed
/// only once the response starts.)
enum Checked {
    /// Allowed (headers edited): let it go on, metered when metering is on.
    Continue(Option<StreamMetering>),
    /// Refused with a local reply.
    Replied,
    /// The decision needs the body: hold the request until it is all in.
    NeedBody,
}

impl FilterModule for Module {
    type Config = FilterConfig;
    type PerRoute = RouteConfig;
    type Stream = Stream;

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
            recorder: OutcomeRecorder::new(Some(feed.usage.clone())),
            feed,
            decision,
            allowed: envoy.define_counter("keygate_allowed"),
            denied: envoy.define_counter("keygate_denied"),
            snapshot_version: envoy.define_gauge("keygate_snapshot_version"),
            reported_version: AtomicI64::new(-1),
            metadata_fields,
            metering: settings.metering.unwrap_or(true),
        })
    }

    fn new_per_route(_name: &str, config: &[u8]) -> Result<RouteConfig, String> {
        let r = RouteSettings::parse(config)?;
        Ok(RouteConfig {
            model_service: r.model_service.map(String::into_boxed_str),
            model: r.model.map(String::into_boxed_str),
        })
    }

    /// Decides from the headers unless the decision needs a model named in the body (a
    /// model-narrowed scope or a service model list on this route, SPEC §8.1): then the
    /// request is held and decided once its whole body is in Envoy's buffer. A request with
    /// no body is decided here with an empty one.
    fn on_request_headers(
        config: &FilterConfig,
        stream: &mut Stream,
        req: &mut Request<'_, RouteConfig>,
        end_of_stream: bool,
    ) -> HeadersStatus {
        let body = if end_of_stream {
            Body::Complete(&[])
        } else {
            Body::Unread
        };
        match config.check(req, body) {
            Checked::Continue(m) => {
                config.meter(stream, m);
                HeadersStatus::Continue
            }
            Checked::Replied => HeadersStatus::StopIteration,
            Checked::NeedBody => {
                stream.awaiting_body = true;
                HeadersStatus::StopIteration
            }
        }
    }

    /// Buffers a held request's body (Envoy answers 413 past the stream's buffer limit) and
    /// decides at its end; every other request's chunks pass untouched.
    fn on_request_body(
        config: &FilterConfig,
        stream: &mut Stream,
        req: &mut Request<'_, RouteConfig>,
        end_of_stream: bool,
    ) -> BodyStatus {
        if !stream.awaiting_body {
            return BodyStatus::Continue;
        }
        if !end_of_stream {
            return BodyStatus::StopIterationAndBuffer;
        }
        stream.awaiting_body = false;
        match config.check_body(req) {
            Checked::Continue(m) => {
                config.meter(stream, m);
                BodyStatus::Continue
            }
            _ => BodyStatus::StopIterationNoBuffer,
        }
    }

    /// A held request that ends with trailers is decided here (its body is all buffered).
    fn on_request_trailers(
        config: &FilterConfig,
        stream: &mut Stream,
        req: &mut Request<'_, RouteConfig>,
    ) -> HeadersStatus {
        if !stream.awaiting_body {
            return HeadersStatus::Continue;
        }
        stream.awaiting_body = false;
        match config.check_body(req) {
            Checked::Continue(m) => {
                config.meter(stream, m);
                HeadersStatus::Continue
            }
            _ => HeadersStatus::StopIteration,
        }
    }

    /// Starts reading a metered response (status, content type and encoding); the request is
    /// recorded here when the response has no body.
    fn on_response_headers(
        _config: &FilterConfig,
        stream: &mut Stream,
        req: &mut Request<'_, RouteConfig>,
        end_of_stream: bool,
    ) -> HeadersStatus {
        if let Some(m) = &mut stream.metering {
            if let Some(s) = &mut m.stream {
                let [status, content_type, content_encoding] =
                    req.response_headers([":status", "content-type", "content-encoding"]);
                let status = status
                    .and_then(|v| std::str::from_utf8(v).ok()?.parse::<u16>().ok())
                    .unwrap_or(0);
                s.response_headers(status, content_type, content_encoding);
            }
            if end_of_stream {
                m.finish();
            }
        }
        HeadersStatus::Continue
    }

    /// Reads each chunk of a metered response as it passes (never held, never buffered) and
    /// records the request at its end.
    fn on_response_body(
        _config: &FilterConfig,
        stream: &mut Stream,
        req: &mut Request<'_, RouteConfig>,
        end_of_stream: bool,
    ) -> BodyStatus {
        if let Some(m) = &mut stream.metering {
            if let Some(s) = &mut m.stream {
                req.received_response_body(|chunk| s.response_body(chunk));
            }
            if end_of_stream {
                m.finish();
            }
        }
        BodyStatus::Continue
    }
}

/// The request as `decide()` sees it.
struct View<'r, 'a> {
    req: &'r Request<'a, RouteConfig>,
    route: Option<&'a RouteConfig>,
    body: Body<'r>,
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

    fn has_header(&self, name: &str) -> bool {
        self.req.header_count(name) > 0
    }

    fn route_model(&self) -> Option<&str> {
        self.route?.model.as_deref()
    }

    fn body(&self) -> Body<'_> {
        self.body
    }
}

impl FilterConfig {
    /// Keeps an allowed request's metering in its stream.
    fn meter(&self, stream: &mut Stream, m: Option<StreamMetering>) {
        if let Some(m) = m {
            stream.metering = Some(Metering {
                stream: Some(m),
                tally: self.feed.tally.clone(),
            });
        }
    }

    /// One decision, observed in the check-duration histogram once it is final (a check that
    /// asks for the body is observed when the body's check decides).
    fn check(&self, req: &mut Request<'_, RouteConfig>, body: Body<'_>) -> Checked {
        let started = Instant::now();
        let checked = self.decide_and_apply(req, body);
        if !matches!(checked, Checked::NeedBody) {
            self.recorder.observe_since(started);
        }
        checked
    }

    /// The check of a held request, with its whole body.
    fn check_body(&self, req: &mut Request<'_, RouteConfig>) -> Checked {
        let body = req.request_body();
        self.check(req, Body::Complete(&body))
    }

    fn decide_and_apply(&self, req: &mut Request<'_, RouteConfig>, body: Body<'_>) -> Checked {
        let now = Timestamp::now();
        let guard = self.feed.cell.load_guard();
        let Some(snap) = guard.as_ref() else {
            return self.refuse(req, &Refusal::not_ready());
        };
        if let Some(g) = self.snapshot_version
            && self.reported_version.load(Ordering::Relaxed) != snap.version
        {
            self.reported_version.store(snap.version, Ordering::Relaxed);
            req.set_gauge(g, snap.version.max(0) as u64);
        }
        let route = req.per_route();
        let outcome = {
            let view = View { req, route, body };
            let decision = decide(snap, &self.decision, &view, now, |k| {
                self.feed.hasher.hash(k)
            });
            // Held only while the body is unread: with the body in hand, `Outcome::of` refuses
            // what would still need it, so a held request is never left held.
            if matches!(decision, Decision::NeedBody) && body == Body::Unread {
                return Checked::NeedBody;
            }
            Outcome::of(decision, &self.decision).rate_limited(&self.feed.limiter, now)
        };
        match outcome {
            Outcome::Admit(a) => self.admit(req, route, &a, now),
            Outcome::Refuse(r) => self.refuse(req, &r),
        }
    }

    /// Applies an allowed outcome: vendor header, credentials removed, metadata.
    fn admit(
        &self,
        req: &mut Request<'_, RouteConfig>,
        route: Option<&RouteConfig>,
        a: &Admit<'_, '_>,
        now: Timestamp,
    ) -> Checked {
        // What to edit is read before editing (the view borrows the request).
        // (On the stack for up to 8 credential headers; more spill to the heap.)
        let (mut remove, mut more, mut n_remove) = ([""; 8], Vec::new(), 0);
        let new_path = {
            let view = View {
                req,
                route,
                body: Body::Unread,
            };
            for h in a.headers_to_remove(&view) {
                match remove.get_mut(n_remove) {
                    Some(slot) => *slot = h,
                    None => more.push(h),
                }
                n_remove += 1;
            }
            // The credential query parameter, cut from :path (allocates only when present).
            a.query_param_to_remove(&view).and_then(|p| {
                let path = view.header(":path")?;
                path_without_param(path, p)
            })
        };
        // Overwrite: exactly one value of the vendor header reaches the upstream. If Envoy
        // refuses any of these edits the consumer key could travel on: fail closed.
        let (name, value) = a.vendor_header();
        let mut edited = req.set_header(name, value.as_bytes());
        for h in remove[..n_remove.min(remove.len())].iter().chain(&more) {
            edited &= req.remove_header(h);
        }
        if let Some(p) = new_path {
            edited &= req.set_header(":path", p.as_bytes());
        }
        if self.metering {
            let (name, value) = METERED_ACCEPT_ENCODING;
            edited &= req.set_header(name, value.as_bytes());
        }
        if !edited {
            self.recorder.error();
            let (ct, json) = REPLY_CONTENT_TYPE;
            req.send_local_reply(
                500,
                &[(ct, json)],
                ffi::INTERNAL_ERROR_BODY.as_bytes(),
                "keygate_header_edit_failed",
            );
            return Checked::Replied;
        }
        self.set_metadata(req, a.metadata(&self.metadata_fields));
        self.recorder.allowed(&a.allowed, now);
        if let Some(c) = self.allowed {
            req.increment_counter(c, 1);
        }
        Checked::Continue(self.metering.then(|| {
            let m = StreamMetering::of(&a.allowed);
            // Tokens are charged to the rate limits that admitted it, when it has any.
            if a.allowed.token_limited() {
                m.charging(self.feed.limiter.clone())
            } else {
                m
            }
        }))
    }

    /// Sets string metadata fields under `keygate` in one call (ids formatted on the stack).
    fn set_metadata<'s>(
        &self,
        req: &mut Request<'_, RouteConfig>,
        fields: impl Iterator<Item = (&'static str, MetaValue<'s>)>,
    ) {
        // The most fields one call sets: every allowed field, or a refusal's reason, key name
        // and id, and model.
        const MAX_FIELDS: usize = METADATA_FIELDS.len();
        let fields: [Option<(&str, MetaValue<'s>)>; MAX_FIELDS] = {
            let mut out = [None; MAX_FIELDS];
            for (slot, f) in out.iter_mut().zip(fields) {
                *slot = Some(f);
            }
            out
        };
        let mut bufs = [[0u8; 36]; MAX_FIELDS];
        let mut chosen = [("", ""); MAX_FIELDS];
        let mut n = 0;
        for ((field, buf), slot) in fields.iter().zip(bufs.iter_mut()).zip(chosen.iter_mut()) {
            if let Some((name, value)) = field {
                *slot = (name, value.as_str(buf));
                n += 1;
            }
        }
        if n > 0 {
            req.set_metadata_strings(METADATA_NAMESPACE, &chosen[..n]);
        }
    }

    /// Applies a refusal: metadata, the local reply with SPEC §2's body.
    fn refuse(&self, req: &mut Request<'_, RouteConfig>, r: &Refusal<'_>) -> Checked {
        self.set_metadata(req, r.metadata());
        let x_request_id = req
            .header("x-request-id")
            .and_then(|v| std::str::from_utf8(v).ok())
            .unwrap_or("");
        self.recorder.refused(r, "", x_request_id);
        if let Some(c) = self.denied {
            req.increment_counter(c, 1);
        }
        let mut buf = itoa::Buffer::new();
        let mut headers = [REPLY_CONTENT_TYPE; 3];
        let mut n = 1;
        for h in r.extra_headers(&mut buf) {
            headers[n] = h;
            n += 1;
        }
        req.send_local_reply(
            r.status() as u32,
            &headers[..n],
            r.body().as_bytes(),
            r.reason.as_str(),
        );
        Checked::Replied
    }
}

/// `tracing` events of the shared keygate code (the subscriber, the cache) go to Envoy's log.
mod logging {
    use std::io::Write;

    use tracing::Level;
    use tracing_subscriber::Layer;
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
            EnvoyLine {
                level: envoy_level(meta.level()),
                buf: Vec::new(),
            }
        }
    }

    /// Envoy's level for a `tracing` level.
    fn envoy_level(level: &Level) -> LogLevel {
        match *level {
            Level::ERROR => LogLevel::Error,
            Level::WARN => LogLevel::Warn,
            Level::INFO => LogLevel::Info,
            Level::DEBUG => LogLevel::Debug,
            Level::TRACE => LogLevel::Trace,
        }
    }

    /// Installs the forwarding subscriber (once per process). Events are formatted only when
    /// Envoy logs their level (`--log-level`, or changed at run time through the admin API), so
    /// a denial's debug line appears exactly when Envoy runs at debug.
    pub fn init() {
        use tracing_subscriber::layer::SubscriberExt;
        let layer = tracing_subscriber::fmt::layer()
            .with_writer(EnvoyLog)
            .with_ansi(false)
            .without_time()
            .with_target(false)
            .with_level(false)
            .with_filter(tracing_subscriber::filter::dynamic_filter_fn(|meta, _| {
                // keygate's own events at any level Envoy logs; dependencies' at info and above.
                (meta.target().starts_with("keygate") || *meta.level() <= Level::INFO)
                    && crate::ffi::log_enabled(envoy_level(meta.level()))
            }));
        let subscriber = tracing_subscriber::registry().with(layer);
        let _ = tracing::subscriber::set_global_default(subscriber);
    }
}
