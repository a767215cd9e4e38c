//! The split deployment of SPEC §5 with real processes: `keygate control-plane` (admin API,
//! store, snapshot stream on the admin port) and `keygate authz` data planes subscribed to it,
//! behind a real Envoy 1.40 running the shipped `envoy/split.yaml` (only its ports rewritten),
//! with a recording upstream standing in for the model vendor.
//!
//! What is proven: fail static while the control plane is down (and a data plane restarting
//! from its encrypted cache meanwhile), catch-up after a data plane was away, propagation
//! between two control planes sharing one PostgreSQL database, no plaintext key in the cache or
//! on the stream, separate subscriber and admin credentials, fail closed before the first
//! snapshot, and refusal of a foreign master key.
//!
//! Every test has its own processes, ports, data dirs (and database), so tests run in
//! parallel. Nothing sleeps to wait for a state: everything is polled with a bound.

mod common;

use std::path::Path;
use std::time::{Duration, Instant};

use keygate::proto::admin::v1 as pb;
use keygate::proto::snapshot::v1 as snap;
use keygate::proto::snapshot::v1::snapshot_distribution_client::SnapshotDistributionClient;
use prost::Message;
use tonic::Code;
use tonic::transport::Channel;
use tonic_health::pb::health_check_response::ServingStatus;

use common::admin::{
    bearer, create_bound_key, create_consumer, create_model_key, create_service,
    disable_consumer_key,
};
use common::envoy::{Envoy, HttpResponse, Upstream, free_port, http_get};
use common::split::{
    AUTHZ_SERVICE, ControlPlane, ControlPlaneOptions, DataPlane, DataPlaneOptions, Verdict,
    drop_postgres_database, fresh_postgres_database, subscriber_token, write_master_key,
};
use common::{Admin, BearerToken, all_file_bytes, contains_bytes, poll_until, tail};

// ---------------------------------------------------------------------------------------------
// Values the tests create and must never find in plaintext where they do not belong.

const OPENAI_KEY: &str = "sk-proj-splitOpenAiPrimary00000000000000001";
const ANTHROPIC_KEY: &str = "sk-ant-api03-splitAnthropic0000000000000002";
const CUSTOM_CONSUMER_KEY: &str = "kg-custom-split-consumer-key-000000000000000001";

/// Upper bound for anything that only waits for processes to talk to each other.
const SETTLE: Duration = Duration::from_secs(15);

// ---------------------------------------------------------------------------------------------
// Admin API helpers.

/// Waits (bounded) until the control plane's snapshot includes its last commit (the newest
/// audit event's revision); returns that snapshot version.
async fn settle(admin: &mut Admin) -> u64 {
    let revision = common::admin::latest_revision(admin).await;
    common::admin::snapshot_reaches(
        admin,
        revision,
        SETTLE,
        "the control plane's snapshot to reach the last commit",
    )
    .await
}

/// The model service `openai` (a route in envoy/split.yaml names it; default header
/// `authorization: Bearer {key}`), its model key, the consumer `billing-app` and its bound key
/// `billing-prod`. Returns the consumer key's value.
async fn provision(admin: &mut Admin) -> String {
    create_service(admin, "openai", "", "").await;
    create_model_key(admin, "openai-primary", OPENAI_KEY, "openai").await;
    create_consumer(admin, "billing-app").await;
    create_bound_key(admin, "billing-prod", "billing-app").await
}
// ---------------------------------------------------------------------------------------------
// Assertions on decisions.

/// Allowed, injecting exactly the OpenAI model key.
fn assert_allowed(v: &Verdict, what: &str) {
    assert!(v.allowed(), "{what}: expected an allow, got {v:?}");
    assert_eq!(
        v.header("authorization"),
        vec![bearer(OPENAI_KEY).as_str()],
        "{what}: the allow injects the model key"
    );
}

/// Refused as an unknown key: 401 `invalid_api_key`, gRPC UNAUTHENTICATED.
fn is_refused(v: &Verdict) -> bool {
    v.grpc_code == 16 && v.http_status == 401 && v.error_code() == "invalid_api_key"
}

/// Polls a data plane (bounded) until `key` is refused; returns when it was first seen.
async fn wait_refused(dp: &DataPlane, key: &str, limit: Duration) -> Instant {
    let what = format!("{} to refuse the disabled key", dp.opts.what);
    poll_until(limit, &what, || async {
        let v = dp.verdict(key, "openai").await;
        if !v.allowed() {
            assert!(is_refused(&v), "{what}: unexpected denial {v:?}");
            return Some(Instant::now());
        }
        None
    })
    .await
}

/// Polls a data plane (bounded) until `key` is allowed.
async fn wait_allowed(dp: &DataPlane, key: &str, limit: Duration) {
    let what = format!("{} to allow the key", dp.opts.what);
    let v = poll_until(limit, &what, || async {
        let v = dp.verdict(key, "openai").await;
        v.allowed().then_some(v)
    })
    .await;
    assert_allowed(&v, &what);
}

async fn get(envoy: &Envoy, target: &str, headers: &[(&str, &str)]) -> HttpResponse {
    http_get(envoy.listener, target, headers)
        .await
        .unwrap_or_else(|e| {
            panic!(
                "GET {target} through Envoy failed: {e}\n--- Envoy stderr:\n{}",
                envoy.stderr()
            )
        })
}

/// How many checks Envoy has sent to the data plane at `host` (`/clusters` rq_total).
async fn envoy_checks(envoy: &Envoy, host: std::net::SocketAddr) -> u64 {
    envoy
        .host_stat("keygate_authz", host, "rq_total")
        .await
        .and_then(|v| v.parse().ok())
        .unwrap_or(0)
}

/// Polls (bounded) until Envoy's health check has the data plane at `host` healthy and Envoy
/// sends it checks; every request meanwhile must get a 200.
async fn wait_in_rotation(envoy: &Envoy, host: std::net::SocketAddr, auth: &str, what: &str) {
    poll_until(
        Duration::from_secs(10),
        &format!("Envoy to mark {what} healthy"),
        || async {
            let flags = envoy
                .host_stat("keygate_authz", host, "health_flags")
                .await?;
            (flags == "healthy").then_some(())
        },
    )
    .await;
    let before = envoy_checks(envoy, host).await;
    poll_until(
        Duration::from_secs(10),
        &format!("Envoy to send checks to {what}"),
        || async {
            let r = get(
                envoy,
                "/openai/v1/chat/completions",
                &[("authorization", auth)],
            )
            .await;
            assert_eq!(
                r.status,
                200,
                "waiting for {what} to take checks: {}",
                r.text()
            );
            (envoy_checks(envoy, host).await > before).then_some(())
        },
    )
    .await;
}

/// Envoy's view of the data planes (the `keygate_authz` lines of `/clusters`), for messages.
async fn authz_cluster(envoy: &Envoy) -> String {
    envoy
        .admin_get("/clusters")
        .await
        .lines()
        .filter(|l| l.starts_with("keygate_authz::"))
        .collect::<Vec<_>>()
        .join("\n")
}

// ---------------------------------------------------------------------------------------------
// A split deployment: one control plane, two data planes (SQLite unless told otherwise).

struct Split {
    // Dropped (killed) in this order: data planes, then the control plane, then the dirs.
    dps: Vec<DataPlane>,
    cp: ControlPlane,
    token: String,
    _dir: tempfile::TempDir,
}

impl Split {
    async fn start(data_planes: usize) -> Split {
        let dir = tempfile::tempdir().unwrap();
        let token = subscriber_token();
        let cp =
            ControlPlane::start(&ControlPlaneOptions::new(&dir.path().join("cp"), &token)).await;
        let mut dps = Vec::new();
        for i in 1..=data_planes {
            let dp = DataPlane::start(&Split::dp_options(&cp, dir.path(), i, &token)).await;
            dp.wait_serving(SETTLE).await;
            dps.push(dp);
        }
        Split {
            dps,
            cp,
            token,
            _dir: dir,
        }
    }

    fn dp_options(cp: &ControlPlane, dir: &Path, i: usize, token: &str) -> DataPlaneOptions {
        DataPlaneOptions::new(
            &format!("data plane {i}"),
            &cp.url(),
            &dir.join(format!("dp{i}")),
            &cp.master_key_file(),
            token,
        )
    }

    fn diagnostics(&self) -> String {
        let mut out = format!(
            "--- control plane log (tail):\n{}",
            tail(&self.cp.logs(), 30)
        );
        for dp in &self.dps {
            out.push_str(&format!(
                "\n--- {} log (tail):\n{}",
                dp.opts.what,
                tail(&dp.logs(), 30)
            ));
        }
        out
    }
}

// ---------------------------------------------------------------------------------------------
// 1. Fail static: the control plane goes away, Envoy and the data planes carry on.

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn fail_static_while_the_control_plane_is_down_then_changes_resume() {
    let mut split = Split::start(2).await;
    let upstream = Upstream::start().await;
    let envoy = Envoy::start_split(
        [split.dps[0].authz_addr, split.dps[1].authz_addr],
        upstream.addr,
    )
    .await;

    let mut admin = split.cp.admin().await;
    let ck = provision(&mut admin).await;
    let auth = bearer(&ck);
    let path = "/openai/v1/chat/completions";

    // Through Envoy: poll until the key works, then every data plane must allow it directly.
    poll_until(SETTLE, "a 200 through Envoy", || async {
        (get(&envoy, path, &[("authorization", &auth)]).await.status == 200).then_some(())
    })
    .await;
    for dp in &split.dps {
        wait_allowed(dp, &ck, SETTLE).await;
    }
    let rec = upstream.last();
    assert_eq!(rec.values("authorization"), vec![bearer(OPENAI_KEY)]);
    rec.assert_never_carries(&ck, "consumer key");

    // Both caches hold the current snapshot before anything is taken away.
    let version = settle(&mut admin).await;
    for dp in &split.dps {
        dp.wait_cache_written(version, SETTLE).await;
    }

    // Hard kill of the control plane: no goodbye on the stream.
    split.cp.kill();
    let down = Instant::now();
    let mut sent = 0;
    while down.elapsed() < Duration::from_secs(2) || sent < 10 {
        let r = get(&envoy, path, &[("authorization", &auth)]).await;
        assert_eq!(
            r.status,
            200,
            "request {sent} with the control plane down ({:?} after the kill): {}\n{}",
            down.elapsed(),
            r.text(),
            split.diagnostics()
        );
        for dp in &split.dps {
            assert_allowed(&dp.verdict(&ck, "openai").await, &dp.opts.what);
        }
        sent += 1;
        tokio::task::yield_now().await;
    }
    for dp in &split.dps {
        assert_eq!(
            dp.health(AUTHZ_SERVICE).await.unwrap(),
            ServingStatus::Serving
        );
    }
    println!(
        "fail static: {sent} requests through Envoy over {:?} with the control plane down, all 200",
        down.elapsed()
    );

    // Restart data plane 1 while the control plane is still down: it serves from its cache.
    let dp1_addr = split.dps[0].authz_addr;
    split.dps[0].proc.kill();
    // Envoy keeps answering with one data plane gone: a check sent to the dead one is retried
    // on the other (split.yaml's retry_policy), and the health check takes it out.
    let retries_before = envoy.stat("cluster.keygate_authz.upstream_rq_retry").await;
    for i in 0..20 {
        let r = get(&envoy, path, &[("authorization", &auth)]).await;
        assert_eq!(
            r.status,
            200,
            "request {i} with data plane 1 down: {}\n{}",
            r.text(),
            split.diagnostics()
        );
    }
    let retried = envoy.stat("cluster.keygate_authz.upstream_rq_retry").await - retries_before;
    poll_until(
        Duration::from_secs(10),
        "Envoy to mark data plane 1 unhealthy",
        || async {
            let flags = envoy
                .host_stat("keygate_authz", dp1_addr, "health_flags")
                .await?;
            flags.contains("failed_active_hc").then_some(())
        },
    )
    .await;
    println!(
        "data plane 1 down: 20 requests through Envoy, all 200 ({retried} checks retried on data plane 2)"
    );
    split.dps[0].restart().await;
    let dp1 = &split.dps[0];
    assert!(
        !dp1.proc
            .log_messages("serving the cached snapshot until the control plane answers")
            .is_empty(),
        "data plane 1 restarted without its cache:\n{}",
        dp1.logs()
    );
    dp1.wait_serving(Duration::from_secs(5)).await;
    assert_allowed(
        &dp1.verdict(&ck, "openai").await,
        "data plane 1 from its cache",
    );
    assert!(
        is_refused(
            &dp1.verdict("kg-not-a-real-key-000000000000000000", "openai")
                .await
        ),
        "data plane 1 from its cache still refuses unknown keys"
    );
    // Envoy's health check brings it back (SERVING from the cache alone) and sends it checks
    // (the first one may come up to a health-check interval after the flag turns healthy).
    wait_in_rotation(
        &envoy,
        dp1_addr,
        &auth,
        "data plane 1 (restarted from its cache)",
    )
    .await;
    let dp1_before = envoy_checks(&envoy, dp1_addr).await;
    for i in 0..10 {
        let r = get(&envoy, path, &[("authorization", &auth)]).await;
        assert_eq!(
            r.status,
            200,
            "request {i} after data plane 1 restarted from its cache: {}\n{}",
            r.text(),
            split.diagnostics()
        );
    }
    let dp1_served = envoy_checks(&envoy, dp1_addr).await - dp1_before;
    assert!(
        dp1_served >= 3,
        "round robin over two healthy data planes: the restarted one answered only {dp1_served} of 10 checks\n{}",
        authz_cluster(&envoy).await
    );

    // The control plane comes back on the same data dir and port; a change reaches everyone.
    split.cp.restart().await;
    let mut admin = split.cp.admin().await;
    disable_consumer_key(&mut admin, "billing-prod").await;
    let disabled = Instant::now();
    let mut seen = Vec::new();
    for dp in &split.dps {
        let t = wait_refused(dp, &ck, Duration::from_secs(20)).await;
        seen.push((dp.opts.what.clone(), t - disabled));
    }
    // Through Envoy (round robin over both): the first 401, then ten more in a row.
    poll_until(
        Duration::from_secs(20),
        "Envoy to refuse the disabled key",
        || async {
            (get(&envoy, path, &[("authorization", &auth)]).await.status == 401).then_some(())
        },
    )
    .await;
    seen.push(("Envoy".into(), disabled.elapsed()));
    for i in 0..10 {
        let r = get(&envoy, path, &[("authorization", &auth)]).await;
        assert_eq!(r.status, 401, "request {i} after the disable: {}", r.text());
        assert_eq!(r.json()["error"]["code"], "invalid_api_key");
    }
    println!(
        "recovery after the control plane restart (DisableConsumerKey → first refusal): {seen:?}"
    );
    for (who, took) in &seen {
        assert!(
            *took < Duration::from_secs(10),
            "{who} refused the disabled key only after {took:?} (limit 10 s)\n{}",
            split.diagnostics()
        );
    }
}

// ---------------------------------------------------------------------------------------------
// 2. Changes made while a data plane was away arrive when it comes back.

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn changes_made_while_a_data_plane_was_away_arrive_after_its_restart() {
    let mut split = Split::start(1).await;
    let mut admin = split.cp.admin().await;
    let old_key = provision(&mut admin).await;
    wait_allowed(&split.dps[0], &old_key, SETTLE).await;
    let cached = settle(&mut admin).await;
    split.dps[0].wait_cache_written(cached, SETTLE).await;

    // Graceful stop (SIGTERM): exit code 0.
    assert_eq!(
        split.dps[0].proc.stop(),
        Some(0),
        "data plane SIGTERM exit code"
    );

    // Meanwhile: disable the old key, add a new one, and move the old key off its consumer.
    disable_consumer_key(&mut admin, "billing-prod").await;
    let new_key = create_bound_key(&mut admin, "billing-next", "billing-app").await;
    admin
        .unbind_consumer_key(pb::UnbindConsumerKeyRequest {
            key: "billing-prod".into(),
        })
        .await
        .unwrap();
    let current = settle(&mut admin).await;
    assert!(current > cached);

    // Back, on the same data dir: it starts from the older cache, then catches up.
    let restarted = Instant::now();
    split.dps[0].restart().await;
    let dp = &split.dps[0];
    let from_cache = dp
        .proc
        .log_messages("serving the cached snapshot until the control plane answers");
    assert_eq!(
        from_cache.len(),
        1,
        "the data plane must start from its cache:\n{}",
        dp.logs()
    );
    assert_eq!(
        from_cache[0]["fields"]["version"].as_u64(),
        Some(cached),
        "it starts from the cached (older) version"
    );
    let refused_at = wait_refused(dp, &old_key, SETTLE).await;
    wait_allowed(dp, &new_key, SETTLE).await;
    println!(
        "catch-up: cached version {cached}, control plane at {current}; the change made while away was applied {:?} after the restart",
        refused_at - restarted
    );
    // And the cache follows.
    dp.wait_cache_written(current, SETTLE).await;
}

// ---------------------------------------------------------------------------------------------
// 3. Two control planes on one PostgreSQL database: a change through A reaches a data plane
//    subscribed to B.

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_change_through_one_control_plane_reaches_a_data_plane_of_another_within_a_second() {
    let db = fresh_postgres_database("kg_split").await;
    let dir = tempfile::tempdir().unwrap();
    let token = subscriber_token();

    let mut a_opts = ControlPlaneOptions::new(&dir.path().join("a"), &token);
    a_opts.what = "control plane A".into();
    a_opts.store = Some(db.clone());
    let a = ControlPlane::start(&a_opts).await;
    let mut b_opts = ControlPlaneOptions::new(&dir.path().join("b"), &token);
    b_opts.what = "control plane B".into();
    b_opts.store = Some(db.clone());
    b_opts.master_key_file = Some(a.master_key_file());
    let b = ControlPlane::start(&b_opts).await;
    let dp = DataPlane::start(&DataPlaneOptions::new(
        "data plane (of B)",
        &b.url(),
        &dir.path().join("dp"),
        &a.master_key_file(),
        &token,
    ))
    .await;
    dp.wait_serving(SETTLE).await;

    let mut admin_a = a.admin().await;
    create_service(&mut admin_a, "openai", "", "").await;
    create_model_key(&mut admin_a, "openai-primary", OPENAI_KEY, "openai").await;
    create_consumer(&mut admin_a, "billing-app").await;
    let mut keys = Vec::new();
    for i in 0..5 {
        let name = format!("billing-{i}");
        let value = create_bound_key(&mut admin_a, &name, "billing-app").await;
        keys.push((name, value));
    }
    for (_, value) in &keys {
        wait_allowed(&dp, value, SETTLE).await;
    }

    let mut figures = Vec::new();
    for (name, value) in &keys {
        disable_consumer_key(&mut admin_a, name).await;
        let returned = Instant::now();
        // A tight loop of Checks against the data plane (bounded by the assertion below).
        let took = loop {
            let v = dp.verdict(value, "openai").await;
            if !v.allowed() {
                assert!(is_refused(&v), "unexpected denial {v:?}");
                break returned.elapsed();
            }
            assert!(
                returned.elapsed() < Duration::from_secs(5),
                "{name} still allowed by B's data plane 5 s after A disabled it\n--- A:\n{}\n--- B:\n{}\n--- data plane:\n{}",
                tail(&a.logs(), 30),
                tail(&b.logs(), 30),
                tail(&dp.logs(), 30)
            );
            tokio::time::sleep(Duration::from_millis(1)).await;
        };
        figures.push(took);
    }
    println!(
        "A's DisableConsumerKey → first refusal by B's data plane: {:?} (max {:?})",
        figures,
        figures.iter().max().unwrap()
    );
    for (took, (name, _)) in figures.iter().zip(&keys) {
        assert!(
            *took < Duration::from_secs(1),
            "{name}: {took:?} from A's DisableConsumerKey to the refusal by B's data plane (limit 1 s)"
        );
    }

    drop(dp);
    drop(b);
    drop(a);
    drop_postgres_database(&db).await;
}

// ---------------------------------------------------------------------------------------------
// 4. Secrecy: no plaintext key in the data plane's cache or on the stream; separate credentials.

async fn subscribe(
    cp: &ControlPlane,
    token: Option<String>,
) -> Result<tonic::Streaming<snap::SnapshotMessage>, tonic::Status> {
    let channel = Channel::from_shared(cp.url())
        .unwrap()
        .connect()
        .await
        .unwrap();
    let mut client = SnapshotDistributionClient::with_interceptor(channel, BearerToken(token));
    client
        .subscribe(snap::SubscribeRequest {
            subscriber: "split-deployment-test".into(),
            ..Default::default()
        })
        .await
        .map(|r| r.into_inner())
}

async fn next_message(
    stream: &mut tonic::Streaming<snap::SnapshotMessage>,
) -> snap::SnapshotMessage {
    tokio::time::timeout(SETTLE, stream.message())
        .await
        .expect("a snapshot message within the bound")
        .expect("the stream is healthy")
        .expect("the stream is open")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn neither_the_cache_nor_the_stream_carries_a_plaintext_key() {
    let split = Split::start(1).await;
    let dp = &split.dps[0];
    let mut admin = split.cp.admin().await;
    create_service(&mut admin, "openai", "", "").await;
    create_service(&mut admin, "anthropic", "x-api-key", "{key}").await;
    create_model_key(&mut admin, "openai-primary", OPENAI_KEY, "openai").await;
    create_model_key(&mut admin, "anthropic-main", ANTHROPIC_KEY, "anthropic").await;
    create_consumer(&mut admin, "billing-app").await;
    let mut consumer_keys = vec![
        create_bound_key(&mut admin, "billing-auto-1", "billing-app").await,
        create_bound_key(&mut admin, "billing-auto-2", "billing-app").await,
    ];
    admin
        .create_consumer_key(pb::CreateConsumerKeyRequest {
            name: "billing-custom".into(),
            generation_method: pb::GenerationMethod::Custom as i32,
            value: CUSTOM_CONSUMER_KEY.into(),
            consumer: "billing-app".into(),
            ..Default::default()
        })
        .await
        .unwrap();
    consumer_keys.push(CUSTOM_CONSUMER_KEY.to_string());
    let key_names = ["billing-auto-1", "billing-auto-2", "billing-custom"];
    let model_keys = [OPENAI_KEY, ANTHROPIC_KEY];
    let secrets: Vec<&str> = consumer_keys
        .iter()
        .map(String::as_str)
        .chain(model_keys)
        .collect();

    // The data plane holds all of it, and its cache does too.
    for k in &consumer_keys {
        wait_allowed(dp, k, SETTLE).await;
    }
    let version = settle(&mut admin).await;
    dp.wait_cache_written(version, SETTLE).await;
    assert!(dp.cache_file().exists(), "no {}", dp.cache_file().display());

    let files = all_file_bytes(&dp.opts.data_dir);
    assert!(!files.is_empty());
    for (path, bytes) in &files {
        for s in &secrets {
            assert!(
                !contains_bytes(bytes, s.as_bytes()),
                "{} contains a plaintext key",
                path.display()
            );
        }
    }
    for s in &secrets {
        assert!(
            !dp.logs().contains(s),
            "the data plane logged a plaintext key"
        );
        assert!(
            !split.cp.logs().contains(s),
            "the control plane logged a plaintext key"
        );
    }

    // The stream, read as a data plane would.
    let mut stream = subscribe(&split.cp, Some(split.token.clone()))
        .await
        .expect("the subscriber token opens a subscription");
    let mut full = Vec::new();
    loop {
        let m = next_message(&mut stream).await;
        if m.heartbeat && !m.full {
            continue;
        }
        assert!(
            m.full,
            "the first data message on a fresh subscription is a full snapshot: {m:?}"
        );
        let last = m.last_chunk;
        full.push(m);
        if last {
            break;
        }
    }
    assert!(
        !full[0].master_key_fingerprint.is_empty(),
        "the first message carries the master key fingerprint"
    );
    let stream_keys: Vec<&snap::ConsumerKey> = full.iter().flat_map(|m| &m.keys).collect();
    assert_eq!(
        stream_keys.len(),
        consumer_keys.len(),
        "one ConsumerKey entry per key created"
    );
    let mut names: Vec<&str> = stream_keys.iter().map(|k| k.name.as_str()).collect();
    names.sort();
    assert_eq!(names, key_names);
    for k in &stream_keys {
        assert_eq!(k.hash.len(), 32, "{}: an HMAC-SHA256, 32 bytes", k.name);
    }
    let services = full[0]
        .services
        .as_ref()
        .expect("services in the first chunk");
    let stream_model_keys: Vec<&snap::ModelKey> =
        services.items.iter().flat_map(|s| &s.model_keys).collect();
    assert_eq!(stream_model_keys.len(), model_keys.len());
    assert_eq!(full[0].model_key_count, model_keys.len() as u64);

    // A change while subscribed: the incremental message is as clean.
    let later = create_bound_key(&mut admin, "billing-later", "billing-app").await;
    let incremental = loop {
        let m = next_message(&mut stream).await;
        if !m.keys.is_empty() {
            break m;
        }
    };
    assert!(!incremental.full);
    assert_eq!(incremental.keys.len(), 1);
    assert_eq!(incremental.keys[0].name, "billing-later");

    for m in full.iter().chain([&incremental]) {
        let bytes = m.encode_to_vec();
        for s in secrets.iter().copied().chain([later.as_str()]) {
            assert!(
                !contains_bytes(&bytes, s.as_bytes()),
                "a stream message (version {}) contains a plaintext key",
                m.version
            );
        }
    }

    // Separate credentials: the admin token opens no subscription, no token opens none, and the
    // subscriber token opens no KeyAdmin call.
    for (what, token) in [
        ("the admin token", Some(split.cp.admin_token())),
        ("no token", None),
        ("a wrong token", Some(subscriber_token())),
    ] {
        match subscribe(&split.cp, token).await {
            Ok(_) => panic!("{what} opened a subscription"),
            Err(s) => assert_eq!(s.code(), Code::Unauthenticated, "{what}: {s:?}"),
        }
    }
    let mut as_subscriber = split.cp.admin_with_token(Some(split.token.clone())).await;
    let refused = as_subscriber
        .list_consumers(pb::ListConsumersRequest::default())
        .await
        .expect_err("the subscriber token must not open KeyAdmin");
    assert_eq!(refused.code(), Code::Unauthenticated, "{refused:?}");
    let refused = as_subscriber
        .disable_consumer_key(pb::DisableConsumerKeyRequest {
            selector: Some(pb::disable_consumer_key_request::Selector::Name(
                "billing-auto-1".into(),
            )),
        })
        .await
        .expect_err("the subscriber token must not open KeyAdmin");
    assert_eq!(refused.code(), Code::Unauthenticated, "{refused:?}");
}

// ---------------------------------------------------------------------------------------------
// 5. No control plane and no cache: fail closed, then serve once a control plane appears.

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_data_plane_without_any_snapshot_refuses_everything_until_a_control_plane_appears() {
    let dir = tempfile::tempdir().unwrap();
    let token = subscriber_token();
    let master = dir.path().join("master.key");
    write_master_key(&master);
    // An address where nothing listens yet (the control plane comes here later).
    let cp_addr: std::net::SocketAddr = format!("127.0.0.1:{}", free_port()).parse().unwrap();

    let dp = DataPlane::start(&DataPlaneOptions::new(
        "data plane",
        &format!("http://{cp_addr}"),
        &dir.path().join("dp"),
        &master,
        &token,
    ))
    .await;

    // Until it has a snapshot: NOT_SERVING and 503 keygate_not_ready for every request.
    let started = Instant::now();
    let mut checks = 0;
    while started.elapsed() < Duration::from_secs(1) || checks < 10 {
        for service in ["", AUTHZ_SERVICE] {
            assert_eq!(
                dp.health(service).await.unwrap(),
                ServingStatus::NotServing,
                "health {service:?} without a snapshot"
            );
        }
        for key in ["kg-some-key-that-cannot-be-checked-yet-000001", ""] {
            let v = dp.verdict(key, "openai").await;
            assert!(!v.allowed(), "allowed without a snapshot: {v:?}");
            assert_eq!(v.grpc_code, 14, "UNAVAILABLE: {v:?}");
            assert_eq!(v.http_status, 503, "{v:?}");
            assert_eq!(v.header("content-type"), vec!["application/json"]);
            let body: serde_json::Value = serde_json::from_str(&v.body).unwrap();
            assert_eq!(body["error"]["type"], "service_unavailable", "{}", v.body);
            assert_eq!(body["error"]["code"], "keygate_not_ready", "{}", v.body);
            assert!(body["error"]["message"].is_string(), "{}", v.body);
        }
        checks += 1;
    }
    assert!(!dp.cache_file().exists(), "no snapshot, no cache");

    // A control plane appears on that address (with the same master key).
    let mut opts = ControlPlaneOptions::new(&dir.path().join("cp"), &token);
    opts.admin_addr = Some(cp_addr);
    opts.master_key_file = Some(master.clone());
    let cp = ControlPlane::start(&opts).await;
    let appeared = Instant::now();
    let mut admin = cp.admin().await;
    let ck = provision(&mut admin).await;
    dp.wait_serving(SETTLE).await;
    wait_allowed(&dp, &ck, SETTLE).await;
    println!(
        "not ready → serving: {checks} refused checks over {:?}; allowed {:?} after the control plane appeared",
        appeared - started,
        appeared.elapsed()
    );
}

// ---------------------------------------------------------------------------------------------
// 6. A data plane holding another master key refuses to run.

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_data_plane_with_a_different_master_key_exits_64() {
    let dir = tempfile::tempdir().unwrap();
    let token = subscriber_token();
    let cp = ControlPlane::start(&ControlPlaneOptions::new(&dir.path().join("cp"), &token)).await;
    let mut admin = cp.admin().await;
    provision(&mut admin).await;

    let other = dir.path().join("other.key");
    write_master_key(&other);
    let dp_dir = dir.path().join("dp");
    let mut dp = DataPlaneOptions::new(
        "data plane (foreign key)",
        &cp.url(),
        &dp_dir,
        &other,
        &token,
    )
    .spawn();
    let code = dp.wait_exit(Duration::from_secs(30)).await;
    let logs = dp.logs();
    assert_eq!(code, Some(64), "exit code; logs:\n{logs}");
    assert!(
        logs.contains("master key"),
        "the refusal names the master key:\n{logs}"
    );
    assert!(
        !dp_dir.join("snapshot.cache").exists(),
        "nothing from a foreign control plane is cached"
    );
}

// ---------------------------------------------------------------------------------------------
// 7. Envoy's gRPC health checks (envoy/split.yaml) keep checks away from a data plane that has
//    no snapshot, and bring it in once it has one.

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn envoy_sends_checks_only_to_data_planes_that_hold_a_snapshot() {
    let split = Split::start(1).await;
    let mut admin = split.cp.admin().await;
    let ck = provision(&mut admin).await;
    wait_allowed(&split.dps[0], &ck, SETTLE).await;

    // Data plane 2 subscribes to an address where nothing listens: no snapshot, NOT_SERVING.
    let dir = tempfile::tempdir().unwrap();
    let nowhere = format!("http://127.0.0.1:{}", free_port());
    let mut lost = DataPlane::start(&DataPlaneOptions::new(
        "data plane 2 (no control plane)",
        &nowhere,
        &dir.path().join("dp2"),
        &split.cp.master_key_file(),
        &split.token,
    ))
    .await;
    assert_eq!(
        lost.health(AUTHZ_SERVICE).await.unwrap(),
        ServingStatus::NotServing
    );
    let lost_addr = lost.authz_addr;

    let upstream = Upstream::start().await;
    let envoy = Envoy::start_split([split.dps[0].authz_addr, lost_addr], upstream.addr).await;
    let auth = bearer(&ck);
    let path = "/openai/v1/chat/completions";
    let flags = envoy
        .host_stat("keygate_authz", lost_addr, "health_flags")
        .await;
    assert!(
        flags
            .as_deref()
            .is_some_and(|f| f.contains("failed_active_hc")),
        "a NOT_SERVING data plane is unhealthy in Envoy: {flags:?}"
    );
    for i in 0..20 {
        let r = get(&envoy, path, &[("authorization", &auth)]).await;
        assert_eq!(
            r.status,
            200,
            "request {i}: a check reached the data plane without a snapshot? {}\n{}",
            r.text(),
            split.diagnostics()
        );
    }
    assert_eq!(
        envoy_checks(&envoy, lost_addr).await,
        0,
        "Envoy sent checks to a NOT_SERVING data plane"
    );

    // Pointed at the control plane (same port), it gets a snapshot, turns SERVING, and Envoy
    // brings it into the rotation.
    lost.proc.kill();
    let mut opts = lost.opts.clone();
    opts.control_plane = split.cp.url();
    opts.authz_addr = Some(lost_addr);
    let found = DataPlane::start(&opts).await;
    found.wait_serving(SETTLE).await;
    wait_allowed(&found, &ck, SETTLE).await;
    wait_in_rotation(&envoy, lost_addr, &auth, "data plane 2").await;
    let before = envoy_checks(&envoy, lost_addr).await;
    for i in 0..10 {
        let r = get(&envoy, path, &[("authorization", &auth)]).await;
        assert_eq!(
            r.status,
            200,
            "request {i} with both data planes serving: {}",
            r.text()
        );
    }
    let served = envoy_checks(&envoy, lost_addr).await - before;
    assert!(
        served >= 3,
        "data plane 2 answered only {served} of 10 round-robin checks once healthy\n{}",
        authz_cluster(&envoy).await
    );
}
