//! Benchmark tooling shipped in the binary (`keygate bench …`): a load generator for
//! `Authorization/Check` over gRPC, a null ext_authz server (answers OK, does nothing: the
//! ceiling of this architecture on a machine), and a seeder that loads many keys at once.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use envoy_types::ext_authz::v3::pb::{
    Authorization, AuthorizationServer, CheckRequest, CheckResponse,
};
use envoy_types::pb::envoy::config::core::v3::{Address, SocketAddress, address};
use envoy_types::pb::envoy::service::auth::v3::attribute_context::{HttpRequest, Peer, Request};
use envoy_types::pb::envoy::service::auth::v3::{AttributeContext, authorization_client::AuthorizationClient};
use envoy_types::pb::google::rpc;
use hdrhistogram::Histogram;
use tokio_stream::wrappers::TcpListenerStream;
use tonic::transport::{Channel, Endpoint, Server};

/// The value of the i-th seeded bench key (deterministic, so the load generator can
/// present keys without a file of secrets).
pub fn seeded_key(i: u64) -> String {
    format!("kg-bench-{i:020}-0123456789abcdef")
}

/// A `CheckRequest` as Envoy sends it for `authorization: Bearer <key>` on a route whose
/// model service is `service`, from `peer`.
pub fn check_request(key: &str, service: &str, peer: &str) -> CheckRequest {
    let mut headers = HashMap::new();
    headers.insert("authorization".to_string(), format!("Bearer {key}"));
    headers.insert(":method".to_string(), "POST".to_string());
    headers.insert(":path".to_string(), "/v1/chat/completions".to_string());
    headers.insert("content-type".to_string(), "application/json".to_string());
    headers.insert("x-request-id".to_string(), "4f6a1c2e-bench".to_string());
    let mut ext = HashMap::new();
    ext.insert("model_service".to_string(), service.to_string());
    CheckRequest {
        attributes: Some(AttributeContext {
            source: Some(Peer {
                address: Some(Address {
                    address: Some(address::Address::SocketAddress(SocketAddress {
                        address: peer.to_string(),
                        ..Default::default()
                    })),
                }),
                ..Default::default()
            }),
            request: Some(Request {
                http: Some(HttpRequest {
                    method: "POST".into(),
                    path: "/v1/chat/completions".into(),
                    host: "gateway.local".into(),
                    protocol: "HTTP/1.1".into(),
                    headers,
                    ..Default::default()
                }),
                ..Default::default()
            }),
            context_extensions: ext,
            ..Default::default()
        }),
    }
}

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

async fn connect(target: SocketAddr) -> Result<Channel, tonic::transport::Error> {
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
            let mut hist = Histogram::<u64>::new_with_bounds(1, 60_000_000, 3).expect("histogram bounds");
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
    let elapsed = Instant::now().saturating_duration_since(measure_from).min(cfg.duration).max(Duration::from_millis(1));
    let [a, d, e] = &*counts;
    let (allowed, denied, errors) = (a.load(Ordering::Relaxed), d.load(Ordering::Relaxed), e.load(Ordering::Relaxed));
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

/// An ext_authz server that allows everything and does nothing else.
#[derive(Clone, Copy, Debug, Default)]
pub struct NullAuthz;

#[tonic::async_trait]
impl Authorization for NullAuthz {
    async fn check(&self, _req: tonic::Request<CheckRequest>) -> Result<tonic::Response<CheckResponse>, tonic::Status> {
        Ok(tonic::Response::new(CheckResponse {
            status: Some(rpc::Status::default()),
            ..Default::default()
        }))
    }
}

/// Serves the null ext_authz on `listener` until `shutdown` resolves.
pub async fn serve_null(
    listener: tokio::net::TcpListener,
    shutdown: impl std::future::Future<Output = ()>,
) -> Result<(), tonic::transport::Error> {
    Server::builder()
        .add_service(AuthorizationServer::new(NullAuthz))
        .serve_with_incoming_shutdown(TcpListenerStream::new(listener), shutdown)
        .await
}

/// Runs one `keygate bench …` command.
pub async fn run(cmd: crate::config::BenchCommand) -> Result<(), crate::server::StartError> {
    use crate::config::BenchCommand;
    use crate::server::StartError;
    match cmd {
        BenchCommand::Null { addr } => {
            let listener = tokio::net::TcpListener::bind(addr).await.map_err(|source| StartError::Io {
                context: format!("binding {addr}"),
                source,
            })?;
            let local = listener.local_addr().map_err(|source| StartError::Io {
                context: "null ext_authz address".into(),
                source,
            })?;
            tracing::info!(addr = %local, "null ext_authz ready");
            serve_null(listener, crate::server::shutdown_signal())
                .await
                .map_err(|e| StartError::Config(format!("null ext_authz: {e}")))
        }
        BenchCommand::Seed(args) => seed(args).await,
        BenchCommand::Load(args) => {
            let mut requests = Vec::new();
            let unknown_every = if args.unknown_percent == 0 { 0 } else { (100 / args.unknown_percent.min(100) as u64).max(1) };
            for i in 0..args.keys.clamp(1, 100_000) {
                let key = if unknown_every > 0 && i % unknown_every == 0 {
                    format!("kg-unknown-{i:020}-0123456789abcdef")
                } else {
                    seeded_key(i * (args.keys / args.keys.clamp(1, 100_000)).max(1))
                };
                requests.push(check_request(&key, &args.model_service, "127.0.0.1"));
            }
            let requests = Arc::new(requests);
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
                    println!("round {round} {} {addr}: {r}", if is_target { "target  " } else { "baseline" });
                    if is_target { target_runs.push(r) } else { base_runs.push(r) }
                }
            }
            let median = |runs: &[LoadReport], f: fn(&LoadReport) -> f64| {
                let mut v: Vec<f64> = runs.iter().map(f).collect();
                v.sort_by(f64::total_cmp);
                v[v.len() / 2]
            };
            let t = median(&target_runs, LoadReport::throughput);
            let t99 = median(&target_runs, |r| r.p99_us);
            println!("target   median: {t:.0} req/s, p99 {t99:.0} µs");
            if !base_runs.is_empty() {
                let b = median(&base_runs, LoadReport::throughput);
                let b99 = median(&base_runs, |r| r.p99_us);
                println!("baseline median: {b:.0} req/s, p99 {b99:.0} µs");
                println!("ratio target/baseline: throughput {:.3}, p99 {:.3}", t / b, t99 / b99);
            }
            Ok(())
        }
    }
}

async fn seed(args: crate::config::SeedArgs) -> Result<(), crate::server::StartError> {
    use crate::domain::input::{KeySource, NewConsumer, NewModelKey, NewModelService};
    use crate::domain::{Limits, RuleError, Selector};
    use crate::server::StartError;
    use crate::store::{Actor, StoreError};
    let limits = Limits {
        max_keys_per_consumer: usize::MAX,
        ..Limits::default()
    };
    let (store, _master) = crate::server::open_store(&args.store, limits).await?;
    let actor = Actor("bench-seed".into());
    let err = |e: StoreError| StartError::Store(e);
    let exists = |r: Result<(), StoreError>| match r {
        Ok(()) | Err(StoreError::Rule(RuleError::AlreadyExists { .. })) => Ok(()),
        Err(e) => Err(e),
    };
    exists(
        store
            .create_consumer(&actor, NewConsumer { name: args.consumer.clone(), ..Default::default() })
            .await
            .map(drop),
    )
    .map_err(err)?;
    exists(
        store
            .create_model_service(&actor, NewModelService { name: args.model_service.clone(), ..Default::default() })
            .await
            .map(drop),
    )
    .map_err(err)?;
    exists(
        store
            .create_model_key(
                &actor,
                NewModelKey {
                    name: format!("{}-vendor", args.model_service),
                    description: String::new(),
                    source: KeySource::Custom(crate::crypto::Secret::new("sk-bench-0123456789abcdef0123456789".into())),
                    model_services: vec![args.model_service.clone()],
                },
            )
            .await
            .map(drop),
    )
    .map_err(err)?;
    let have = store
        .get_consumer(&Selector::Name(args.consumer.clone()))
        .await
        .map_err(err)?;
    let _ = have;
    let started = Instant::now();
    const BATCH: u64 = 50_000;
    let mut i = 0;
    while i < args.keys {
        let end = (i + BATCH).min(args.keys);
        let keys = (i..end)
            .map(|k| (format!("bench-{k}"), crate::crypto::Secret::new(seeded_key(k))))
            .collect();
        store.import_consumer_keys(&actor, &args.consumer, keys).await.map_err(err)?;
        i = end;
    }
    println!("seeded {} consumer keys in {:.1} s", args.keys, started.elapsed().as_secs_f64());
    store.close().await;
    Ok(())
}
