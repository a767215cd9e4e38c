//! Exactly once (SPEC §8.2, issue 16): 10,000 metered requests through a real Envoy running the
//! shipped `envoy/split.yaml` in front of two `keygate authz` data planes, each reporting its
//! metered usage to its own `keygate control-plane`, both control planes on one fresh PostgreSQL
//! database. Mid-run control plane 1 is killed (SIGKILL) at the worst moment — it has applied a
//! report of data plane A in the store but its answer has not reached A — and later restarted on
//! the same port; control plane 2 stays up. Afterwards `GetUsage` must show exactly what the
//! recording vendor sent, per consumer key, service and model and in total, to the token and to
//! the picodollar: nothing lost (A resends what was not acknowledged), nothing doubled (the
//! report applied before the kill comes back as a duplicate).
//!
//! The worst moment is made certain rather than hoped for: data plane A reaches control plane 1
//! through a TCP relay that can hold back what the control plane sends. The test holds it, polls
//! control plane 1's `keygate_usage_reports_total{result="applied"}` until a report is applied
//! whose answer is therefore held, and kills control plane 1 then: the answer dies with the
//! connection. The restarted control plane must count that report's resend as a duplicate.
//!
//! A second test stops a data plane (SIGTERM) while a response is still streaming to its
//! ExternalProcessor: the stream's usage must be in its last report.
//!
//! `KEYGATE_EXACTLY_ONCE_REQUESTS` (default 10000, at least 1000) scales the load. Nothing sleeps
//! to wait for a state: everything is polled with a bound.

mod common;

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use envoy_types::pb::envoy::config::core::v3::{HeaderMap, HeaderValue, Metadata};
use envoy_types::pb::envoy::service::ext_proc::v3::external_processor_client::ExternalProcessorClient;
use envoy_types::pb::envoy::service::ext_proc::v3::{
    HttpBody, HttpHeaders, ProcessingRequest, processing_request,
};
use http_body_util::{BodyExt, Full};
use hyper::body::Bytes;
use hyper_util::rt::TokioIo;
use keygate::proto::admin::v1 as pb;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::watch;

use common::admin::{
    create_bound_key, create_consumer, create_priced_vendor_services, latest_revision,
};
use common::envoy::{Envoy, MODEL_RATE_LIMITED, Recorded, Upstream, http_get};
use common::split::{
    ControlPlane, ControlPlaneOptions, DataPlane, DataPlaneOptions, drop_postgres_database,
    fresh_postgres_database, subscriber_token,
};
use common::{Admin, metrics_addr, poll_until, tail};

const OPENAI_KEY: &str = "sk-proj-exactlyOnceOpenAi0000000000000001";
const ANTHROPIC_KEY: &str = "sk-ant-api03-exactlyOnceAnthropic00000002";

/// Upper bound for anything that only waits for processes to talk to each other.
const SETTLE: Duration = Duration::from_secs(30);

/// Requests in flight at once (each client task keeps one HTTP/1.1 connection alive).
const CONCURRENCY: usize = 24;

/// Prices in micro-USD per million tokens, as the test computes cost: (input, output, cached).
const GPT_4O_MINI: (u64, u64, u64) = (150_000, 600_000, 75_000);
const CLAUDE: (u64, u64, u64) = (3_000_000, 15_000_000, 300_000);

/// The consumer keys (name, consumer).
const KEYS: [(&str, &str); 4] = [
    ("a1", "team-a"),
    ("a2", "team-a"),
    ("b1", "team-b"),
    ("b2", "team-b"),
];

/// The calls the load cycles through: (model service, model, streamed). gpt-4o has no price.
const CALLS: [(&str, &str, bool); 6] = [
    ("openai", "gpt-4o-mini", false),
    ("openai", "gpt-4o-mini", true),
    ("openai", "gpt-4o", false),
    ("anthropic", "claude-sonnet-4-5", false),
    ("anthropic", "claude-haiku-4-5", true),
    ("anthropic", "claude-sonnet-4-5", true),
];

/// Every `RATE_LIMITED_EVERY`th request asks for the model the vendor answers 429: a metered
/// error response, without tokens.
const RATE_LIMITED_EVERY: usize = 50;

const APPLIED: &str = r#"keygate_usage_reports_total{result="applied"}"#;
const DUPLICATE: &str = r#"keygate_usage_reports_total{result="duplicate"}"#;
const FAILURES: &str = "keygate_usage_report_failures_total";

fn requests_to_make() -> usize {
    let n = std::env::var("KEYGATE_EXACTLY_ONCE_REQUESTS")
        .ok()
        .map(|v| {
            v.parse::<usize>()
                .unwrap_or_else(|_| panic!("KEYGATE_EXACTLY_ONCE_REQUESTS={v:?}: not a number"))
        })
        .unwrap_or(10_000);
    assert!(
        n >= 1000,
        "KEYGATE_EXACTLY_ONCE_REQUESTS={n}: at least 1000, so the kill falls inside the load"
    );
    n
}

// ---------------------------------------------------------------------------------------------
// The relay between data plane A and control plane 1.

/// A TCP relay that passes what the client sends and can hold back what the server sends. What
/// it holds is written when the hold is released, or dropped with the connection if the server
/// goes away first. A connection it cannot open to the server is closed at once.
struct Relay {
    addr: SocketAddr,
    hold: watch::Sender<bool>,
    task: tokio::task::JoinHandle<()>,
}

impl Relay {
    async fn start(server: SocketAddr) -> Relay {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let hold = watch::Sender::new(false);
        let held = hold.subscribe();
        let task = tokio::spawn(async move {
            while let Ok((client, _)) = listener.accept().await {
                tokio::spawn(relay_connection(client, server, held.clone()));
            }
        });
        Relay { addr, hold, task }
    }

    fn hold(&self, on: bool) {
        self.hold.send_replace(on);
    }
}

impl Drop for Relay {
    fn drop(&mut self) {
        self.task.abort();
    }
}

async fn relay_connection(client: TcpStream, server: SocketAddr, mut held: watch::Receiver<bool>) {
    let Ok(server) = TcpStream::connect(server).await else {
        return;
    };
    let _ = (client.set_nodelay(true), server.set_nodelay(true));
    let (mut client_rd, mut client_wr) = client.into_split();
    let (mut server_rd, mut server_wr) = server.into_split();
    let upward = tokio::spawn(async move {
        let _ = tokio::io::copy(&mut client_rd, &mut server_wr).await;
        let _ = server_wr.shutdown().await;
    });
    let mut buf = vec![0u8; 64 * 1024];
    let mut pending = Vec::new();
    loop {
        tokio::select! {
            r = server_rd.read(&mut buf) => match r {
                Ok(0) | Err(_) => break,
                Ok(n) => pending.extend_from_slice(&buf[..n]),
            },
            changed = held.changed() => if changed.is_err() { break },
        }
        if !*held.borrow_and_update() && !pending.is_empty() {
            if client_wr.write_all(&pending).await.is_err() {
                break;
            }
            pending.clear();
        }
    }
    // The server is gone (or the client): what was held is lost, both sides are closed.
    upward.abort();
}

// ---------------------------------------------------------------------------------------------
// Metrics.

/// The value of `series` (name and labels, exactly as exposed) on a `/metrics` listener; 0 when
/// the series does not exist yet.
async fn metric(addr: SocketAddr, series: &str) -> u64 {
    let r = http_get(addr, "/metrics", &[])
        .await
        .unwrap_or_else(|e| panic!("GET http://{addr}/metrics: {e}"));
    assert_eq!(r.status, 200, "GET http://{addr}/metrics: {}", r.text());
    r.text()
        .lines()
        .find_map(|l| {
            l.strip_prefix(series)?
                .strip_prefix(' ')?
                .trim()
                .parse::<f64>()
                .ok()
        })
        .map_or(0, |v| v as u64)
}

/// Holds control plane 1's answers to data plane A until control plane 1 has applied a report
/// whose answer is held: A has not learnt, and never will, that it was applied. Answers the
/// applied count then. (If a report was applied around the moment the hold began, its answer
/// may or may not be held, and A sends nothing more until it is answered: the hold is released
/// and tried again.)
async fn hold_an_applied_report(relay: &Relay, cp_metrics: SocketAddr) -> u64 {
    for _ in 0..10 {
        let before = metric(cp_metrics, APPLIED).await;
        relay.hold(true);
        let holding_from = metric(cp_metrics, APPLIED).await;
        if holding_from == before {
            // Any report counted from now on was applied after the hold began, and a control
            // plane counts a report before it answers: its answer is held.
            let deadline = Instant::now() + Duration::from_secs(3);
            while Instant::now() < deadline {
                let applied = metric(cp_metrics, APPLIED).await;
                if applied > holding_from {
                    return applied;
                }
                tokio::time::sleep(Duration::from_millis(2)).await;
            }
        }
        relay.hold(false);
    }
    panic!("control plane 1 applied no report of data plane A while its answers were held");
}

// ---------------------------------------------------------------------------------------------
// Provisioning.

async fn provision(admin: &mut Admin) -> BTreeMap<&'static str, String> {
    create_priced_vendor_services(admin, OPENAI_KEY, ANTHROPIC_KEY).await;
    create_consumer(admin, "team-a").await;
    create_consumer(admin, "team-b").await;
    let mut values = BTreeMap::new();
    for (name, consumer) in KEYS {
        values.insert(name, create_bound_key(admin, name, consumer).await);
    }
    values
}

/// Waits (bounded) until the control plane's snapshot includes `revision`.
async fn snapshot_at(admin: &Admin, revision: u64, what: &str) {
    common::admin::snapshot_reaches(admin, revision, SETTLE, what).await;
}

// ---------------------------------------------------------------------------------------------
// The load.

/// Request `i`: (consumer key index, model service, model, streamed, expected status).
fn call(i: usize) -> (usize, &'static str, &'static str, bool, u16) {
    let key = (i + i / CALLS.len()) % KEYS.len();
    if i % RATE_LIMITED_EVERY == RATE_LIMITED_EVERY - 1 {
        return (key, "openai", MODEL_RATE_LIMITED, false, 429);
    }
    let (service, model, stream) = CALLS[i % CALLS.len()];
    (key, service, model, stream, 200)
}

/// Request `i` as the vendors' SDKs send it. The body names the consumer key (`user`,
/// `metadata.user_id`) so the vendor's records can be attributed; its length varies, and with
/// it the tokens the vendor reports.
fn request(i: usize, keys: &BTreeMap<&'static str, String>) -> (hyper::Request<Full<Bytes>>, u16) {
    let (key, service, model, stream, status) = call(i);
    let (name, _) = KEYS[key];
    let prompt = format!("Request {i}: say hello.{}", " Again.".repeat(i % 37));
    let messages = serde_json::json!([{"role": "user", "content": prompt}]);
    let builder = hyper::Request::post(if service == "openai" {
        "/openai/v1/chat/completions"
    } else {
        "/anthropic/v1/messages"
    })
    .header("host", "gateway.test")
    .header("content-type", "application/json");
    let (builder, body) = if service == "openai" {
        let mut body = serde_json::json!({"model": model, "messages": messages, "user": name});
        if stream {
            body["stream"] = true.into();
            body["stream_options"] = serde_json::json!({"include_usage": true});
        }
        (
            builder.header("authorization", format!("Bearer {}", keys[name])),
            body,
        )
    } else {
        let mut body = serde_json::json!({
            "model": model, "max_tokens": 256, "messages": messages,
            "metadata": {"user_id": name},
        });
        if stream {
            body["stream"] = true.into();
        }
        (
            builder
                .header("x-api-key", &keys[name])
                .header("anthropic-version", "2023-06-01"),
            body,
        )
    };
    let req = builder
        .body(Full::new(Bytes::from(body.to_string())))
        .unwrap();
    (req, status)
}

type Sender = hyper::client::conn::http1::SendRequest<Full<Bytes>>;

async fn connect(addr: SocketAddr) -> Sender {
    let stream = TcpStream::connect(addr)
        .await
        .unwrap_or_else(|e| panic!("connecting to Envoy at {addr}: {e}"));
    stream.set_nodelay(true).unwrap();
    let (sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
        .await
        .unwrap();
    tokio::spawn(conn);
    sender
}

/// What the load saw.
#[derive(Default)]
struct LoadOutcome {
    /// Requests answered as expected (200, or the vendor's 429).
    ok: usize,
    /// Anything else, described (the first few).
    failures: Vec<String>,
    failed: usize,
}

/// Makes requests `0..n` through Envoy from `CONCURRENCY` keep-alive connections; `done`
/// counts the answered ones.
async fn run_load(
    envoy: SocketAddr,
    keys: Arc<BTreeMap<&'static str, String>>,
    n: usize,
    done: Arc<AtomicUsize>,
) -> LoadOutcome {
    let next = Arc::new(AtomicUsize::new(0));
    let outcome = Arc::new(Mutex::new(LoadOutcome::default()));
    let mut tasks = Vec::new();
    for _ in 0..CONCURRENCY {
        let (keys, next, done, outcome) =
            (keys.clone(), next.clone(), done.clone(), outcome.clone());
        tasks.push(tokio::spawn(async move {
            let mut sender = connect(envoy).await;
            loop {
                let i = next.fetch_add(1, Ordering::Relaxed);
                if i >= n {
                    break;
                }
                if sender.ready().await.is_err() {
                    sender = connect(envoy).await;
                }
                let (req, want) = request(i, &keys);
                let streamed = call(i).3;
                let result = async {
                    let resp = sender.send_request(req).await.map_err(|e| e.to_string())?;
                    let status = resp.status().as_u16();
                    let body = resp
                        .into_body()
                        .collect()
                        .await
                        .map_err(|e| e.to_string())?
                        .to_bytes();
                    let text = String::from_utf8_lossy(&body);
                    if status != want {
                        return Err(format!("HTTP {status} (expected {want}): {text}"));
                    }
                    // A stream must have arrived whole.
                    if streamed && !(text.contains("[DONE]") || text.contains("message_stop")) {
                        return Err(format!("a stream cut short: {text}"));
                    }
                    Ok(())
                }
                .await;
                let mut o = outcome.lock().unwrap();
                match result {
                    Ok(()) => o.ok += 1,
                    Err(e) => {
                        o.failed += 1;
                        if o.failures.len() < 5 {
                            o.failures.push(format!("request {i}: {e}"));
                        }
                    }
                }
                done.fetch_add(1, Ordering::Relaxed);
            }
        }));
    }
    for t in tasks {
        t.await.unwrap();
    }
    Arc::try_unwrap(outcome)
        .ok()
        .expect("every client task ended")
        .into_inner()
        .unwrap()
}

// ---------------------------------------------------------------------------------------------
// What the vendor sent, and what GetUsage says.

/// One usage row's figures.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
struct Figures {
    requests: u64,
    error_responses: u64,
    unparsed: u64,
    input: u64,
    output: u64,
    cached: u64,
    unpriced: u64,
    /// Picodollars.
    cost: u128,
}

impl Figures {
    fn add(&mut self, o: &Figures) {
        self.requests += o.requests;
        self.error_responses += o.error_responses;
        self.unparsed += o.unparsed;
        self.input += o.input;
        self.output += o.output;
        self.cached += o.cached;
        self.unpriced += o.unpriced;
        self.cost += o.cost;
    }
}

/// (consumer key, model service, model).
type RowKey = (String, String, String);

/// The price of `model` of `service`, as provisioned.
fn price_of(service: &str, model: &str) -> Option<(u64, u64, u64)> {
    match (service, model) {
        ("openai", "gpt-4o-mini") => Some(GPT_4O_MINI),
        ("anthropic", m) if m.starts_with("claude-") => Some(CLAUDE),
        _ => None,
    }
}

/// What the vendor answered, per (consumer key, service, model) as keygate attributes it: a
/// 429 names no model (and keygate's ext_authz shape does not read the request's), so its row
/// has the empty model.
fn vendor_figures(recorded: &[Recorded]) -> BTreeMap<RowKey, Figures> {
    let mut rows: BTreeMap<RowKey, Figures> = BTreeMap::new();
    for r in recorded {
        let body = r.json();
        let (service, key) = if r.target.split('?').next().unwrap().ends_with("/messages") {
            ("anthropic", body["metadata"]["user_id"].as_str())
        } else {
            ("openai", body["user"].as_str())
        };
        let key = key.unwrap_or_else(|| panic!("a request without its key's name: {r:?}"));
        let mut f = Figures {
            requests: 1,
            ..Default::default()
        };
        let model = if r.status == 200 {
            let u = r
                .usage
                .unwrap_or_else(|| panic!("the vendor reported no usage for {r:?}"));
            (f.input, f.output, f.cached) = (u.input, u.output, u.cached_input);
            body["model"].as_str().unwrap().to_string()
        } else {
            assert_eq!(r.status, 429, "{r:?}");
            f.error_responses = 1;
            String::new()
        };
        match price_of(service, &model) {
            Some((input, output, cached)) => {
                f.cost = u128::from(f.input - f.cached) * u128::from(input)
                    + u128::from(f.cached) * u128::from(cached)
                    + u128::from(f.output) * u128::from(output);
            }
            None => f.unpriced = f.requests,
        }
        rows.entry((key.to_string(), service.to_string(), model))
            .or_default()
            .add(&f);
    }
    rows
}

/// A decimal USD string as an exact count of picodollars.
fn picodollars(usd: &str) -> u128 {
    let (whole, frac) = usd.split_once('.').unwrap_or((usd, ""));
    assert!(frac.len() <= 12, "more than 12 fractional digits: {usd}");
    let frac = format!("{frac:0<12}");
    whole.parse::<u128>().unwrap() * 1_000_000_000_000 + frac.parse::<u128>().unwrap()
}

fn figures_of(row: &pb::UsageRow) -> Figures {
    Figures {
        requests: row.requests,
        error_responses: row.error_responses,
        unparsed: row.unparsed_responses,
        input: row.input_tokens,
        output: row.output_tokens,
        cached: row.cached_input_tokens,
        unpriced: row.unpriced_requests,
        cost: picodollars(&row.cost_usd),
    }
}

async fn get_usage(admin: &mut Admin, group_by: &[&str]) -> Vec<pb::UsageRow> {
    admin
        .get_usage(pb::GetUsageRequest {
            group_by: group_by.iter().map(|g| g.to_string()).collect(),
            ..Default::default()
        })
        .await
        .expect("GetUsage")
        .into_inner()
        .rows
}

/// GetUsage per (consumer key, service, model).
async fn usage_rows(admin: &mut Admin) -> BTreeMap<RowKey, Figures> {
    get_usage(admin, &["consumer_key", "model_service", "model"])
        .await
        .iter()
        .map(|r| {
            (
                (
                    r.consumer_key.clone(),
                    r.model_service.clone(),
                    r.model.clone(),
                ),
                figures_of(r),
            )
        })
        .collect()
}

/// GetUsage's grand total.
async fn usage_total(admin: &mut Admin) -> Figures {
    let rows = get_usage(admin, &[]).await;
    assert!(rows.len() <= 1, "one total row: {rows:?}");
    rows.first().map(figures_of).unwrap_or_default()
}

// ---------------------------------------------------------------------------------------------
// The test.

/// The processes' last log lines, for failure messages.
fn diagnostics(cp1: &ControlPlane, cp2: &ControlPlane, a: &DataPlane, b: &DataPlane) -> String {
    format!(
        "--- control plane 1 (restarted):\n{}\n--- control plane 2:\n{}\n--- data plane A:\n{}\n--- data plane B:\n{}",
        log_tail(&cp1.logs()),
        log_tail(&cp2.logs()),
        log_tail(&a.logs()),
        log_tail(&b.logs())
    )
}

/// The last 30 lines of a log, without the store's statements and the HTTP/2 frames (sqlx and
/// h2 log each at debug).
fn log_tail(logs: &str) -> String {
    let lines: Vec<&str> = logs
        .lines()
        .filter(|l| !l.contains("\"db.statement\"") && !l.contains("\"target\":\"h2::"))
        .collect();
    tail(&lines.join("\n"), 30)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn metered_usage_is_counted_exactly_once_across_a_control_plane_kill_and_restart() {
    let started = Instant::now();
    let n = requests_to_make();
    let db = fresh_postgres_database("kg_once").await;
    let dir = tempfile::tempdir().unwrap();
    let token = subscriber_token();

    let mut cp1_opts = ControlPlaneOptions::new(&dir.path().join("cp1"), &token);
    cp1_opts.what = "control plane 1".into();
    cp1_opts.store = Some(db.clone());
    let mut cp1 = ControlPlane::start(&cp1_opts).await;
    let mut cp2_opts = ControlPlaneOptions::new(&dir.path().join("cp2"), &token);
    cp2_opts.what = "control plane 2".into();
    cp2_opts.store = Some(db.clone());
    cp2_opts.master_key_file = Some(cp1.master_key_file());
    let cp2 = ControlPlane::start(&cp2_opts).await;

    // Data plane A reports to control plane 1 through the relay; B to control plane 2.
    let relay = Relay::start(cp1.admin_addr).await;
    let dp_options = |what: &str, url: String, sub: &str| {
        let mut o = DataPlaneOptions::new(
            what,
            &url,
            &dir.path().join(sub),
            &cp1.master_key_file(),
            &token,
        );
        o.args = vec!["--usage-report-interval".into(), "100ms".into()];
        o
    };
    let mut dp_a = DataPlane::start(&dp_options(
        "data plane A",
        format!("http://{}", relay.addr),
        "dp-a",
    ))
    .await;
    let mut dp_b = DataPlane::start(&dp_options("data plane B", cp2.url(), "dp-b")).await;
    dp_a.wait_serving(SETTLE).await;
    dp_b.wait_serving(SETTLE).await;

    let mut admin = cp2.admin().await;
    let keys = provision(&mut admin).await;
    let revision = latest_revision(&mut admin).await;
    snapshot_at(&cp1.admin().await, revision, "control plane 1's snapshot").await;
    snapshot_at(&admin, revision, "control plane 2's snapshot").await;
    for dp in [&dp_a, &dp_b] {
        for (name, value) in &keys {
            for service in ["openai", "anthropic"] {
                let what = format!("{} to allow {name} for {service}", dp.opts.what);
                poll_until(SETTLE, &what, || async {
                    dp.verdict(value, service).await.allowed().then_some(())
                })
                .await;
            }
        }
    }
    let upstream = Upstream::start().await;
    let envoy = Envoy::start_split([dp_a.authz_addr, dp_b.authz_addr], upstream.addr).await;
    let ready = started.elapsed();

    // The load, and control plane 1's death and restart in the middle of it.
    let done = Arc::new(AtomicUsize::new(0));
    let load_started = Instant::now();
    let load = tokio::spawn(run_load(
        envoy.listener,
        Arc::new(keys.clone()),
        n,
        done.clone(),
    ));
    let reached = |count: usize| {
        let done = done.clone();
        let what = format!("{count} requests answered");
        async move {
            poll_until(Duration::from_secs(120), &what, || {
                let done = done.clone();
                async move { (done.load(Ordering::Relaxed) >= count).then_some(()) }
            })
            .await
        }
    };
    reached(n * 3 / 10).await;
    let cp1_metrics = metrics_addr(&cp1.logs());
    let applied_by_cp1 = hold_an_applied_report(&relay, cp1_metrics).await;
    cp1.kill();
    // The hold is released only once control plane 1 is back: released right after the kill,
    // the relay could pass on the held answer before it has seen the dead server's connection
    // close, and A would learn the report was applied (no duplicate to count).
    let killed_at = done.load(Ordering::Relaxed);
    reached(n * 6 / 10).await;
    let restarting_at = done.load(Ordering::Relaxed);
    let mut restart_opts = cp1_opts.clone();
    restart_opts.admin_addr = Some(cp1.admin_addr);
    cp1 = ControlPlane::start(&restart_opts).await;
    relay.hold(false);
    let restarted_at = done.load(Ordering::Relaxed);
    let outcome = load.await.unwrap();
    let load_took = load_started.elapsed();
    assert!(
        outcome.failed == 0 && outcome.ok == n,
        "{} of {n} requests failed, e.g. {:#?}\n--- Envoy stderr (tail):\n{}",
        outcome.failed,
        outcome.failures,
        tail(&envoy.stderr(), 20)
    );

    // Every request reached the vendor once.
    let recorded = upstream.all();
    assert_eq!(recorded.len(), n, "requests the vendor answered");
    let vendor = vendor_figures(&recorded);
    let mut vendor_total = Figures::default();
    for f in vendor.values() {
        vendor_total.add(f);
    }

    // Everything reported: both data planes deliver what they hold and the count reaches the
    // vendor's. Then the data planes stop (SIGTERM: a last report each), and the figures must
    // be the vendor's exactly, through either control plane.
    let mut admin2 = cp2.admin().await;
    let deadline = Instant::now() + SETTLE;
    let counted = loop {
        let t = usage_total(&mut admin2).await;
        if t.requests >= vendor_total.requests || Instant::now() > deadline {
            break t;
        }
        tokio::time::sleep(Duration::from_millis(5)).await;
    };
    assert_eq!(
        counted.requests,
        vendor_total.requests,
        "requests counted (left; {SETTLE:?} after the load) against the vendor's (right)\n{}",
        diagnostics(&cp1, &cp2, &dp_a, &dp_b)
    );
    let a_failures = metric(metrics_addr(&dp_a.logs()), FAILURES).await;
    let b_failures = metric(metrics_addr(&dp_b.logs()), FAILURES).await;
    assert_eq!(dp_a.proc.stop(), Some(0), "data plane A's exit");
    assert_eq!(dp_b.proc.stop(), Some(0), "data plane B's exit");
    let mut admin1 = cp1.admin().await;
    for (which, admin) in [
        ("control plane 1", &mut admin1),
        ("control plane 2", &mut admin2),
    ] {
        let rows = usage_rows(admin).await;
        for (key, want) in &vendor {
            let got = rows.get(key).copied().unwrap_or_default();
            assert_eq!(
                got,
                *want,
                "{which}: GetUsage for {key:?} (left) against what the vendor sent (right)\n{}",
                diagnostics(&cp1, &cp2, &dp_a, &dp_b)
            );
        }
        let extra: Vec<_> = rows.keys().filter(|k| !vendor.contains_key(*k)).collect();
        assert!(
            extra.is_empty(),
            "{which}: rows the vendor never sent: {extra:?}"
        );
        assert_eq!(
            usage_total(admin).await,
            vendor_total,
            "{which}: GetUsage's total (left) against what the vendor sent (right)"
        );
    }

    // The retries were real: A's sends failed while control plane 1 was down, and the report
    // control plane 1 applied just before its death came again and was recognised.
    let cp1_metrics = metrics_addr(&cp1.logs());
    let cp1_duplicates = metric(cp1_metrics, DUPLICATE).await;
    assert!(
        a_failures >= 1 && cp1_duplicates >= 1,
        "data plane A's failed sends: {a_failures}; duplicates at the restarted control plane 1: \
         {cp1_duplicates} (the report whose answer was lost)\n{}",
        diagnostics(&cp1, &cp2, &dp_a, &dp_b)
    );
    let cp1_applied = metric(cp1_metrics, APPLIED).await;
    let cp2_metrics = metrics_addr(&cp2.logs());
    let cp2_applied = metric(cp2_metrics, APPLIED).await;
    let cp2_duplicates = metric(cp2_metrics, DUPLICATE).await;
    println!(
        "exactly once: {n} requests in {load_took:?} ({:.0}/s, {CONCURRENCY} connections); set up in {ready:?}, {:?} in all\n\
         control plane 1 killed after {killed_at} answers, holding the answer to an applied report \
         ({applied_by_cp1} applied by then); restarted between {restarting_at} and {restarted_at} answers\n\
         vendor: {vendor_total:?} in {} rows\n\
         reports: the restarted control plane 1 applied {cp1_applied}, duplicates {cp1_duplicates}; \
         control plane 2 applied {cp2_applied}, duplicates {cp2_duplicates}; \
         failed sends: data plane A {a_failures}, data plane B {b_failures}",
        n as f64 / load_took.as_secs_f64(),
        started.elapsed(),
        vendor.len(),
    );

    drop(envoy);
    drop(cp1);
    drop(cp2);
    drop_postgres_database(&db).await;
}

// ---------------------------------------------------------------------------------------------
// A data plane told to stop while a response is still streaming.

/// One ext_proc message as Envoy's filter sends it in observability mode, with the ext_authz
/// decision's metadata.
fn ext_proc_message(
    metadata: &envoy_types::pb::google::protobuf::Struct,
    request: processing_request::Request,
) -> ProcessingRequest {
    ProcessingRequest {
        request: Some(request),
        metadata_context: Some(Metadata {
            filter_metadata: [("envoy.filters.http.ext_authz".to_string(), metadata.clone())]
                .into(),
            ..Default::default()
        }),
        observability_mode: true,
        ..Default::default()
    }
}

/// SIGTERM while Envoy is still streaming a response to the data plane's ExternalProcessor
/// (a long LLM answer): the data plane drains the stream, and its last report, after the drain,
/// carries the stream's usage.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_data_plane_stopping_mid_stream_reports_the_stream_it_was_metering() {
    let dir = tempfile::tempdir().unwrap();
    let token = subscriber_token();
    let cp = ControlPlane::start(&ControlPlaneOptions::new(&dir.path().join("cp"), &token)).await;
    let mut opts = DataPlaneOptions::new(
        "data plane",
        &cp.url(),
        &dir.path().join("dp"),
        &cp.master_key_file(),
        &token,
    );
    opts.args = vec!["--usage-report-interval".into(), "100ms".into()];
    let mut dp = DataPlane::start(&opts).await;
    dp.wait_serving(SETTLE).await;
    let mut admin = cp.admin().await;
    let keys = provision(&mut admin).await;

    // The metadata of the ext_authz decision, which Envoy forwards to the ExternalProcessor.
    let metadata = poll_until(SETTLE, "the data plane to allow a1", || async {
        let r = dp
            .check(keygate::bench::check_request(
                &keys["a1"],
                "openai",
                "127.0.0.1",
            ))
            .await
            .ok()?;
        (r.status.as_ref().map_or(0, |s| s.code) == 0).then_some(r.dynamic_metadata?)
    })
    .await;
    let request = br#"{"model":"gpt-4o-mini","messages":[{"role":"user","content":"Tell me a long story."}],"stream":true,"stream_options":{"include_usage":true}}"#;
    let reply = common::envoy::vendor_reply("POST", "/openai/v1/chat/completions", request);
    let sent = reply.usage.expect("the vendor reports usage");
    let (first, rest) = reply.chunks.split_at(2);

    let (tx, rx) = tokio::sync::mpsc::channel(16);
    let mut client = ExternalProcessorClient::connect(format!("http://{}", dp.authz_addr))
        .await
        .unwrap();
    let header = |k: &str, v: &str| HeaderValue {
        key: k.into(),
        raw_value: v.as_bytes().to_vec(),
        ..Default::default()
    };
    tx.send(ext_proc_message(
        &metadata,
        processing_request::Request::ResponseHeaders(HttpHeaders {
            headers: Some(HeaderMap {
                headers: vec![
                    header(":status", "200"),
                    header("content-type", reply.content_type),
                ],
            }),
            ..Default::default()
        }),
    ))
    .await
    .unwrap();
    let body = |chunk: &String, end_of_stream: bool| {
        ext_proc_message(
            &metadata,
            processing_request::Request::ResponseBody(HttpBody {
                body: chunk.as_bytes().to_vec(),
                end_of_stream,
                ..Default::default()
            }),
        )
    };
    for c in first {
        tx.send(body(c, false)).await.unwrap();
    }
    let mut answers = client
        .process(tokio_stream::wrappers::ReceiverStream::new(rx))
        .await
        .expect("the ExternalProcessor stream")
        .into_inner();

    // Told to stop mid-stream; the rest of the answer arrives during the drain.
    let pid = dp.proc.pid().unwrap().to_string();
    assert!(
        std::process::Command::new("kill")
            .args(["-TERM", &pid])
            .status()
            .unwrap()
            .success()
    );
    poll_until(SETTLE, "the data plane to begin shutting down", || async {
        (!dp.proc.log_messages("shutting down").is_empty()).then_some(())
    })
    .await;
    for (i, c) in rest.iter().enumerate() {
        tx.send(body(c, i + 1 == rest.len())).await.unwrap();
    }
    drop(tx);
    // The data plane ends the stream once it has read the end of the response.
    while let Ok(Some(_)) = answers.message().await {}
    assert_eq!(dp.proc.wait_exit(SETTLE).await, Some(0), "{}", dp.logs());

    let rows = usage_rows(&mut admin).await;
    let got = rows
        .get(&(
            "a1".to_string(),
            "openai".to_string(),
            "gpt-4o-mini".to_string(),
        ))
        .copied()
        .unwrap_or_default();
    assert_eq!(
        (got.requests, got.input, got.output, got.cached),
        (1, sent.input, sent.output, sent.cached_input),
        "the stream's usage (left) against what the vendor sent (right): {rows:?}\n{}",
        log_tail(&dp.logs())
    );
}
