//! `keygate bench load`: drives `Authorization/Check` over gRPC at a fixed concurrency and
//! reports throughput and latency percentiles, optionally in alternating rounds against a
//! baseline server. Depends on `config` (its arguments), `server` (start-up errors) and the
//! Envoy protos.

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use envoy_types::ext_authz::v3::pb::CheckRequest;
use envoy_types::pb::envoy::service::auth::v3::authorization_client::AuthorizationClient;
use hdrhistogram::Histogram;
use tonic::transport::{Channel, Endpoint};

use super::requests::{check_request, seeded_key};
use crate::config::LoadArgs;
use crate::server::StartError;

/// How to drive the load.
#[derive(Clone, Debug)]
pub struct LoadConfig {
    pub target: SocketAddr,
    pub connections: usize,
    pub in_flight: usize,
    pub duration: Duration,
    pub warmup: Duration,
    /// Requests sent round-robin by each worker.
    pub requests: Arc<Vec<CheckRequest>>,
}

/// What a run measured. Latencies in microseconds.
#[derive(Clone, Debug)]
pub struct LoadReport {
    pub requests: u64,
    pub allowed: u64,
    pub denied: u64,
    pub errors: u64,
    pub elapsed: Duration,
    pub p50_us: f64,
    pub p99_us: f64,
    pub p999_us: f64,
    pub max_us: f64,
}

impl LoadReport {
    pub fn throughput(&self) -> f64 {
        self.requests as f64 / self.elapsed.as_secs_f64()
    }
}

impl std::fmt::Display for LoadReport {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "{:.0} req/s  p50 {:.0} µs  p99 {:.0} µs  p99.9 {:.0} µs  max {:.0} µs  (requests {}, allowed {}, denied {}, errors {})",
            self.throughput(),
            self.p50_us,
            self.p99_us,
            self.p999_us,
            self.max_us,
            self.requests,
            self.allowed,
            self.denied,
            self.errors
        )
    }
}

/// One HTTP/2 connection to `target` (also the admin connection of `bench churn`).
pub(super) async fn connect(target: SocketAddr) -> Result<Channel, tonic::transport::Error> {
    Endpoint::from_shared(format!("http://{target}"))
        .expect("socket address URI")
        .tcp_nodelay(true)
        .connect()
        .await
}

/// Drives `Check` at `cfg.in_flight` concurrent requests over `cfg.connections` HTTP/2
/// connections for `cfg.warmup + cfg.duration`, measuring only after the warm-up.
pub async fn run_load(cfg: &LoadConfig) -> Result<LoadReport, tonic::transport::Error> {
    assert!(!cfg.requests.is_empty(), "at least one request");
    let mut channels = Vec::with_capacity(cfg.connections.max(1));
    for _ in 0..cfg.connections.max(1) {
        channels.push(connect(cfg.target).await?);
    }
    let start = Instant::now();
    let measure_from = start + cfg.warmup;
    let end = measure_from + cfg.duration;
    let counts = Arc::new([AtomicU64::new(0), AtomicU64::new(0), AtomicU64::new(0)]);
    let mut workers = Vec::with_capacity(cfg.in_flight);
    for w in 0..cfg.in_flight.max(1) {
        let mut client = AuthorizationClient::new(channels[w % channels.len()].clone());
        let requests = cfg.requests.clone();
        let counts = counts.clone();
        workers.push(tokio::spawn(async move {
            let mut hist =
                Histogram::<u64>::new_with_bounds(1, 60_000_000, 3).expect("histogram bounds");
            let mut i = w;
            loop {
                let sent = Instant::now();
                if sent >= end {
                    break;
                }
                let req = requests[i % requests.len()].clone();
                i += 1;
                let res = client.check(req).await;
                let done = Instant::now();
                if sent < measure_from {
                    continue;
                }
                let slot = match &res {
                    Ok(r) if r.get_ref().status.as_ref().map(|s| s.code).unwrap_or(0) == 0 => 0,
                    Ok(_) => 1,
                    Err(_) => 2,
                };
                counts[slot].fetch_add(1, Ordering::Relaxed);
                let _ = hist.record((done - sent).as_micros().max(1) as u64);
            }
            hist
        }));
    }
    let mut hist = Histogram::<u64>::new_with_bounds(1, 60_000_000, 3).expect("histogram bounds");
    for w in workers {
        if let Ok(h) = w.await {
            let _ = hist.add(h);
        }
    }
    let elapsed = Instant::now()
        .saturating_duration_since(measure_from)
        .min(cfg.duration)
        .max(Duration::from_millis(1));
    let [a, d, e] = &*counts;
    let (allowed, denied, errors) = (
        a.load(Ordering::Relaxed),
        d.load(Ordering::Relaxed),
        e.load(Ordering::Relaxed),
    );
    Ok(LoadReport {
        requests: allowed + denied + errors,
        allowed,
        denied,
        errors,
        elapsed,
        p50_us: hist.value_at_quantile(0.5) as f64,
        p99_us: hist.value_at_quantile(0.99) as f64,
        p999_us: hist.value_at_quantile(0.999) as f64,
        max_us: hist.max() as f64,
    })
}

/// The checks `bench load` presents: up to 100,000 of the seeded keys 0..`args.keys`, spread
/// evenly, with every `100 / unknown_percent`-th replaced by a key no store holds.
fn requests_for(args: &LoadArgs) -> Vec<CheckRequest> {
    let unknown_every = if args.unknown_percent == 0 {
        0
    } else {
        (100 / args.unknown_percent.min(100) as u64).max(1)
    };
    (0..args.keys.clamp(1, 100_000))
        .map(|i| {
            let key = if unknown_every > 0 && i % unknown_every == 0 {
                format!("kg-unknown-{i:020}-0123456789abcdef")
            } else {
                seeded_key(i * (args.keys / args.keys.clamp(1, 100_000)).max(1))
            };
            check_request(&key, &args.model_service, "127.0.0.1")
        })
        .collect()
}

/// `keygate bench load`: runs the rounds, prints each, then the medians (and the
/// target/baseline ratios when a baseline is given).
pub(super) async fn run(args: LoadArgs) -> Result<(), StartError> {
    let requests = Arc::new(requests_for(&args));
    let cfg = |target| LoadConfig {
        target,
        connections: args.connections,
        in_flight: args.in_flight,
        duration: args.duration,
        warmup: args.warmup,
        requests: requests.clone(),
    };
    let mut target_runs = Vec::new();
    let mut base_runs = Vec::new();
    for round in 0..args.rounds.max(1) {
        // Alternate which goes first, so neither always runs on a warmer machine.
        let order: Vec<(bool, SocketAddr)> = match args.baseline {
            Some(b) if round % 2 == 1 => vec![(false, b), (true, args.target)],
            Some(b) => vec![(true, args.target), (false, b)],
            None => vec![(true, args.target)],
        };
        for (is_target, addr) in order {
            let r = run_load(&cfg(addr))
                .await
                .map_err(|e| StartError::Config(format!("connecting to {addr}: {e}")))?;
            println!(
                "round {round} {} {addr}: {r}",
                if is_target { "target  " } else { "baseline" }
            );
            if is_target {
                target_runs.push(r)
            } else {
                base_runs.push(r)
            }
        }
    }
    print_medians(&target_runs, &base_runs);
    Ok(())
}

fn print_medians(target_runs: &[LoadReport], base_runs: &[LoadReport]) {
    let median = |runs: &[LoadReport], f: fn(&LoadReport) -> f64| {
        let mut v: Vec<f64> = runs.iter().map(f).collect();
        v.sort_by(f64::total_cmp);
        v[v.len() / 2]
    };
    let t = median(target_runs, LoadReport::throughput);
    let t99 = median(target_runs, |r| r.p99_us);
    println!("target   median: {t:.0} req/s, p99 {t99:.0} µs");
    if !base_runs.is_empty() {
        let b = median(base_runs, LoadReport::throughput);
        let b99 = median(base_runs, |r| r.p99_us);
        println!("baseline median: {b:.0} req/s, p99 {b99:.0} µs");
        println!(
            "ratio target/baseline: throughput {:.3}, p99 {:.3}",
            t / b,
            t99 / b99
        );
    }
}
