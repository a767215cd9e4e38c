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
use envoy_types::pb::envoy::service::auth::v3::{
    AttributeContext, authorization_client::AuthorizationClient,
};
use envoy_types::pb::google::rpc;
use hdrhistogram::Histogram;
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

/// An ext_authz server that allows everything and does nothing else.
#[derive(Clone, Copy, Debug, Default)]
pub struct NullAuthz;

#[tonic::async_trait]
impl Authorization for NullAuthz {
    async fn check(
        &self,
        _req: tonic::Request<CheckRequest>,
    ) -> Result<tonic::Response<CheckResponse>, tonic::Status> {
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
        .serve_with_incoming_shutdown(crate::server::incoming(listener), shutdown)
        .await
}

/// Runs one `keygate bench …` command.
pub async fn run(cmd: crate::config::BenchCommand) -> Result<(), crate::server::StartError> {
    use crate::config::BenchCommand;
    use crate::server::StartError;
    match cmd {
        BenchCommand::Null { addr } => {
            let listener = tokio::net::TcpListener::bind(addr)
                .await
                .map_err(|source| StartError::Io {
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
        BenchCommand::Snapshot { keys } => {
            snapshot_bench(keys);
            Ok(())
        }
        BenchCommand::Churn(args) => churn(args).await,
        BenchCommand::Load(args) => {
            let mut requests = Vec::new();
            let unknown_every = if args.unknown_percent == 0 {
                0
            } else {
                (100 / args.unknown_percent.min(100) as u64).max(1)
            };
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
                println!(
                    "ratio target/baseline: throughput {:.3}, p99 {:.3}",
                    t / b,
                    t99 / b99
                );
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
            .create_consumer(
                &actor,
                NewConsumer {
                    name: args.consumer.clone(),
                    ..Default::default()
                },
            )
            .await
            .map(drop),
    )
    .map_err(err)?;
    exists(
        store
            .create_model_service(
                &actor,
                NewModelService {
                    name: args.model_service.clone(),
                    ..Default::default()
                },
            )
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
                    source: KeySource::Custom(crate::crypto::Secret::new(
                        "sk-bench-0123456789abcdef0123456789".into(),
                    )),
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
            .map(|k| {
                (
                    format!("bench-{k}"),
                    crate::crypto::Secret::new(seeded_key(k)),
                )
            })
            .collect();
        store
            .import_consumer_keys(&actor, &args.consumer, keys)
            .await
            .map_err(err)?;
        i = end;
    }
    println!(
        "seeded {} consumer keys in {:.1} s",
        args.keys,
        started.elapsed().as_secs_f64()
    );
    store.close().await;
    Ok(())
}

/// A full update with `n` synthetic consumer keys bound to one consumer, and one service
/// with no model keys: what snapshot build and memory benchmarks measure.
pub fn synthetic_update(n: u64) -> crate::snapshot::Update {
    use crate::snapshot::{ConsumerRecord, KeyEntry, ScopeSet, ServiceRecord, Update};
    use sha2::{Digest, Sha256};
    let consumer = uuid::Uuid::from_u128(1);
    let keys = (0..n)
        .map(|i| {
            (
                <[u8; 32]>::from(Sha256::digest(i.to_le_bytes())),
                KeyEntry {
                    id: uuid::Uuid::from_u128(
                        0x0190_0000_0000_7000_8000_0000_0000_0000 | i as u128,
                    ),
                    consumer: Some(consumer),
                    enabled: true,
                    expire_time: None,
                    name: format!("bench-{i}").into_boxed_str(),
                    scope: ScopeSet::All,
                    ip_allowlist: Box::new([]),
                    usage: Default::default(),
                },
            )
        })
        .collect();
    Update {
        store_id: "bench".into(),
        version: 1,
        full: true,
        keys,
        consumers: vec![ConsumerRecord {
            id: consumer,
            name: "bench".into(),
            scope: None,
        }],
        services: Some(vec![ServiceRecord {
            id: uuid::Uuid::from_u128(2),
            name: "bench".into(),
            auth_header: "authorization".into(),
            auth_value_template: "Bearer {key}".into(),
            model_keys: vec![],
        }]),
        ..Default::default()
    }
}

/// Resident set size of this process (Linux `/proc/self/statm`), in bytes.
pub fn resident_bytes() -> Option<u64> {
    let statm = std::fs::read_to_string("/proc/self/statm").ok()?;
    let pages: u64 = statm.split_whitespace().nth(1)?.parse().ok()?;
    Some(pages * 4096)
}

fn snapshot_bench(n: u64) {
    let keys = crate::crypto::MasterKey::generate().keys();
    let before = resident_bytes().unwrap_or(0);
    let update = synthetic_update(n);
    let with_update = resident_bytes().unwrap_or(0);
    let started = Instant::now();
    let snap =
        crate::snapshot::Snapshot::from_full(update, &keys).expect("synthetic update applies");
    let built = started.elapsed();
    let after = resident_bytes().unwrap_or(0);
    println!(
        "{n} keys: snapshot built in {:.3} s; resident {:.0} MB for the update records, {:.0} MB more after the build ({:.0} bytes/key for records + snapshot); {} keys indexed",
        built.as_secs_f64(),
        (with_update.saturating_sub(before)) as f64 / 1e6,
        (after.saturating_sub(with_update)) as f64 / 1e6,
        (after.saturating_sub(before)) as f64 / n.max(1) as f64,
        snap.counts().consumer_keys,
    );
}

async fn churn(args: crate::config::ChurnArgs) -> Result<(), crate::server::StartError> {
    use crate::proto::admin::v1 as pb;
    use crate::proto::admin::v1::key_admin_client::KeyAdminClient;
    use crate::server::StartError;
    let token = std::fs::read_to_string(&args.admin_token_file)
        .map_err(|source| StartError::Io {
            context: format!("reading {}", args.admin_token_file.display()),
            source,
        })?
        .trim()
        .to_string();
    let bearer: tonic::metadata::MetadataValue<_> = format!("Bearer {token}")
        .parse()
        .map_err(|_| StartError::Config("admin token is not a valid header value".into()))?;
    let channel = connect(args.admin)
        .await
        .map_err(|e| StartError::Config(format!("connecting to {}: {e}", args.admin)))?;
    let mut admin = KeyAdminClient::with_interceptor(channel, move |mut r: tonic::Request<()>| {
        r.metadata_mut().insert("authorization", bearer.clone());
        Ok(r)
    });
    let fail = |e: tonic::Status| StartError::Config(format!("admin call failed: {e}"));
    let run_id = uuid::Uuid::new_v4().simple().to_string();
    let sel = |name: &str| {
        Some(pb::disable_consumer_key_request::Selector::Name(
            name.to_string(),
        ))
    };

    if args.rate > 0 {
        // Several togglers, each on its own key, so the rate does not depend on one RPC's
        // latency (a commit waits for fsync).
        const WORKERS: u32 = 4;
        let per = (args.rate as f64 / WORKERS as f64).max(0.1);
        let end = Instant::now() + args.duration;
        let started = Instant::now();
        let mut tasks = Vec::new();
        for w in 0..WORKERS {
            let name = format!("churn-{}-{w}", &run_id[..8]);
            admin
                .create_consumer_key(pb::CreateConsumerKeyRequest {
                    name: name.clone(),
                    consumer: args.consumer.clone(),
                    ..Default::default()
                })
                .await
                .map_err(fail)?;
            let mut admin = admin.clone();
            tasks.push(tokio::spawn(async move {
                let mut tick = tokio::time::interval(Duration::from_secs_f64(1.0 / per));
                tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Burst);
                let mut changes = 0u64;
                let mut enabled = true;
                while Instant::now() < end {
                    tick.tick().await;
                    let r = if enabled {
                        admin
                            .disable_consumer_key(pb::DisableConsumerKeyRequest {
                                selector: Some(pb::disable_consumer_key_request::Selector::Name(
                                    name.clone(),
                                )),
                            })
                            .await
                            .map(drop)
                    } else {
                        admin
                            .enable_consumer_key(pb::EnableConsumerKeyRequest {
                                selector: Some(pb::enable_consumer_key_request::Selector::Name(
                                    name.clone(),
                                )),
                            })
                            .await
                            .map(drop)
                    };
                    if r.is_ok() {
                        enabled = !enabled;
                        changes += 1;
                    }
                }
                changes
            }));
        }
        let mut changes = 0;
        for t in tasks {
            changes += t.await.unwrap_or(0);
        }
        println!(
            "churn: {changes} admin changes in {:.1} s ({:.0}/s)",
            started.elapsed().as_secs_f64(),
            changes as f64 / started.elapsed().as_secs_f64()
        );
    }

    if args.trials > 0 {
        let channel = connect(args.authz)
            .await
            .map_err(|e| StartError::Config(format!("connecting to {}: {e}", args.authz)))?;
        let mut authz = AuthorizationClient::new(channel);
        let mut samples = Vec::with_capacity(args.trials as usize);
        for t in 0..args.trials {
            let name = format!("prop-{}-{t}", &run_id[..8]);
            let created = admin
                .create_consumer_key(pb::CreateConsumerKeyRequest {
                    name: name.clone(),
                    consumer: args.consumer.clone(),
                    ..Default::default()
                })
                .await
                .map_err(fail)?
                .into_inner();
            let req = check_request(&created.value, &args.model_service, "127.0.0.1");
            let allowed = |r: &CheckResponse| r.status.as_ref().map(|s| s.code).unwrap_or(0) == 0;
            // Wait (bounded) until the new key is live, then disable and time the first deny.
            let live_by = Instant::now() + Duration::from_secs(10);
            loop {
                let r = authz.check(req.clone()).await.map_err(fail)?.into_inner();
                if allowed(&r) {
                    break;
                }
                if Instant::now() > live_by {
                    return Err(StartError::Config(format!("key {name} never became live")));
                }
            }
            admin
                .disable_consumer_key(pb::DisableConsumerKeyRequest {
                    selector: sel(&name),
                })
                .await
                .map_err(fail)?;
            let disabled_at = Instant::now();
            loop {
                let r = authz.check(req.clone()).await.map_err(fail)?.into_inner();
                if !allowed(&r) {
                    break;
                }
                if disabled_at.elapsed() > Duration::from_secs(10) {
                    return Err(StartError::Config(format!(
                        "key {name} still allowed 10 s after disable"
                    )));
                }
            }
            samples.push(disabled_at.elapsed());
        }
        samples.sort();
        let q = |p: f64| {
            samples[((samples.len() - 1) as f64 * p).round() as usize].as_secs_f64() * 1000.0
        };
        println!(
            "disable→first deny over {} trials: p50 {:.2} ms, p99 {:.2} ms, max {:.2} ms",
            samples.len(),
            q(0.5),
            q(0.99),
            q(1.0)
        );
    }
    Ok(())
}
