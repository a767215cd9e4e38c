//! SECRET_REF keys end to end through a real Envoy (issue 8): rotation by version, a secret
//! replaced on disk (atomic rename and Kubernetes' `..data` swap), a deleted secret, a consumer
//! key by reference, and a split deployment whose data plane never sees a plaintext value and
//! keeps serving with its control plane down. Every wait is polled with a bound.

mod common;

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use keygate::proto::admin::v1 as pb;

use common::admin::{bearer, create_bound_key, create_consumer, create_service};
use common::envoy::{Envoy, HttpResponse, Upstream, http_get};
use common::secrets::{
    create_secret_consumer_key, create_secret_model_key, file_ref, get_consumer_key, get_model_key,
    masked, point_model_key,
};
use common::split::{
    ControlPlane, ControlPlaneOptions, DataPlane, DataPlaneOptions, subscriber_token,
};
use common::{
    Admin, Keygate, Options, all_file_bytes, contains_bytes, metrics_addr, poll_until, tail,
};

const V1: &str = "sk-proj-envoySecretVersionOne0000000001";
const V2: &str = "sk-proj-envoySecretVersionTwo0000000002";
const V3: &str = "sk-proj-envoySecretRenamedIn00000000003";
const K8S_1: &str = "sk-ant-api03-kubernetesFirst00000000004";
const K8S_2: &str = "sk-ant-api03-kubernetesSecond0000000005";
const CONSUMER_1: &str = "kg-consumer-secret-first-000000000006";
const CONSUMER_2: &str = "kg-consumer-secret-second-00000000007";

/// Writes `value` to `path` the way secret writers do: a temporary file renamed over it.
fn atomic_write(path: &Path, value: &str) {
    let tmp = path.with_extension("tmp-write");
    std::fs::write(&tmp, value).unwrap();
    std::fs::rename(&tmp, path).unwrap();
}

/// A Kubernetes Secret volume: `<dir>/..<ts>/<key>` files, `..data` → the current
/// timestamped dir, and `<key>` → `..data/<key>`. Updates swap `..data` atomically.
struct K8sVolume {
    dir: PathBuf,
    generation: u32,
}

impl K8sVolume {
    fn new(dir: &Path, key: &str, value: &str) -> K8sVolume {
        let mut v = K8sVolume {
            dir: dir.to_path_buf(),
            generation: 0,
        };
        v.publish(key, value);
        std::os::unix::fs::symlink(format!("..data/{key}"), dir.join(key)).unwrap();
        v
    }

    /// What the kubelet does on an update: a new timestamped dir, then `..data` renamed over.
    fn publish(&mut self, key: &str, value: &str) {
        self.generation += 1;
        let ts = format!(
            "..2026_11_23_05_00_0{}.000{}",
            self.generation, self.generation
        );
        std::fs::create_dir(self.dir.join(&ts)).unwrap();
        std::fs::write(self.dir.join(&ts).join(key), value).unwrap();
        let tmp = self.dir.join("..data_tmp");
        std::os::unix::fs::symlink(&ts, &tmp).unwrap();
        std::fs::rename(&tmp, self.dir.join("..data")).unwrap();
    }
}

/// keygate serve (secrets in a temp dir, the given TTL) + recording upstream + Envoy.
struct Gateway {
    envoy: Envoy,
    keygate: Keygate,
    upstream: Upstream,
    admin: Admin,
    secrets: tempfile::TempDir,
}

impl Gateway {
    async fn start(ttl: &str, prepare: impl FnOnce(&Path)) -> Gateway {
        let secrets = tempfile::tempdir().unwrap();
        prepare(secrets.path());
        let keygate = Keygate::start_with(Options {
            args: vec![
                "--secrets-dir".into(),
                secrets.path().display().to_string(),
                "--secret-ttl".into(),
                ttl.into(),
            ],
            ..Default::default()
        })
        .await;
        let admin = keygate.admin().await;
        let upstream = Upstream::start().await;
        let envoy = Envoy::start(keygate.authz_addr, upstream.addr).await;
        Gateway {
            envoy,
            keygate,
            upstream,
            admin,
            secrets,
        }
    }

    fn diagnostics(&self) -> String {
        format!(
            "--- Envoy stderr:\n{}\n--- keygate log (tail):\n{}",
            tail(&self.envoy.stderr(), 20),
            tail(&self.keygate.logs(), 40)
        )
    }

    async fn get(&self, path: &str, key: &str) -> HttpResponse {
        http_get(
            self.envoy.listener,
            path,
            &[("authorization", &bearer(key))],
        )
        .await
        .unwrap_or_else(|e| panic!("GET {path}: {e}\n{}", self.diagnostics()))
    }

    /// Polls (bounded) until a request with `key` on `path` reaches the upstream carrying
    /// exactly `expected` in `header`. Returns how long that took.
    async fn wait_upstream_value(
        &self,
        path: &str,
        key: &str,
        header: &str,
        expected: &str,
        limit: Duration,
    ) -> Duration {
        let started = Instant::now();
        let what = format!("{path} to reach the upstream with {header} = the expected value");
        poll_until(limit, &what, || async {
            let r = self.get(path, key).await;
            (r.status == 200 && self.upstream.last().values(header) == vec![expected.to_string()])
                .then_some(())
        })
        .await;
        started.elapsed()
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rotating_a_model_key_to_a_new_version_reaches_the_upstream_within_a_second() {
    let mut gw = Gateway::start("5m", |d| {
        std::fs::create_dir(d.join("openai-prod")).unwrap();
        std::fs::write(d.join("openai-prod/1"), format!("{V1}\n")).unwrap();
        std::fs::write(d.join("openai-prod/2"), format!("{V2}\n")).unwrap();
    })
    .await;
    let admin = &mut gw.admin;
    create_service(admin, "openai", "", "").await;
    create_secret_model_key(admin, "openai-main", file_ref("openai-prod", "1"), "openai")
        .await
        .unwrap();
    create_consumer(admin, "billing-app").await;
    let key = create_bound_key(admin, "billing-prod", "billing-app").await;

    gw.wait_upstream_value(
        "/openai/v1/models",
        &key,
        "authorization",
        &bearer(V1),
        Duration::from_secs(10),
    )
    .await;

    let started = Instant::now();
    point_model_key(&mut gw.admin, "openai-main", file_ref("openai-prod", "2"))
        .await
        .unwrap();
    gw.wait_upstream_value(
        "/openai/v1/models",
        &key,
        "authorization",
        &bearer(V2),
        Duration::from_secs(1),
    )
    .await;
    eprintln!(
        "measured: UpdateModelKey to version 2 → upstream receives it after {:?}",
        started.elapsed()
    );
    let last = gw.upstream.last();
    last.assert_never_carries(V1, "the previous version");
    last.assert_never_carries(&key, "the consumer key");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_secret_replaced_on_disk_is_served_after_the_next_refresh() {
    let mut k8s = None;
    let gw = Gateway::start("1s", |d| {
        std::fs::write(d.join("openai-prod"), format!("{V1}\n")).unwrap();
        k8s = Some(K8sVolume::new(d, "anthropic-key", K8S_1));
    })
    .await;
    let mut k8s = k8s.unwrap();
    let mut admin = gw.admin.clone();
    create_service(&mut admin, "openai", "", "").await;
    create_service(&mut admin, "anthropic", "x-api-key", "{key}").await;
    create_secret_model_key(
        &mut admin,
        "openai-main",
        file_ref("openai-prod", ""),
        "openai",
    )
    .await
    .unwrap();
    create_secret_model_key(
        &mut admin,
        "anthropic-main",
        file_ref("anthropic-key", ""),
        "anthropic",
    )
    .await
    .unwrap();
    create_consumer(&mut admin, "billing-app").await;
    let key = create_bound_key(&mut admin, "billing-prod", "billing-app").await;
    let limit = Duration::from_secs(10);

    gw.wait_upstream_value(
        "/openai/v1/models",
        &key,
        "authorization",
        &bearer(V1),
        limit,
    )
    .await;
    gw.wait_upstream_value("/anthropic/v1/messages", &key, "x-api-key", K8S_1, limit)
        .await;

    // A writer's atomic rename.
    atomic_write(&gw.secrets.path().join("openai-prod"), V3);
    let took = gw
        .wait_upstream_value(
            "/openai/v1/models",
            &key,
            "authorization",
            &bearer(V3),
            limit,
        )
        .await;
    eprintln!("measured: renamed secret served after {took:?} (TTL 1s)");

    // The kubelet's `..data` swap.
    k8s.publish("anthropic-key", K8S_2);
    let took = gw
        .wait_upstream_value("/anthropic/v1/messages", &key, "x-api-key", K8S_2, limit)
        .await;
    eprintln!("measured: Kubernetes ..data swap served after {took:?} (TTL 1s)");

    // Each change is a store change made by the refresh, audited by field name only.
    let events = admin
        .list_audit_events(pb::ListAuditEventsRequest {
            page_size: 100,
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner()
        .items;
    let refreshed: Vec<_> = events
        .iter()
        .filter(|e| e.action == "RefreshSecret")
        .map(|e| {
            (
                e.resource_name.as_str(),
                e.actor.as_str(),
                e.changed_fields.clone(),
            )
        })
        .collect();
    assert!(
        refreshed.contains(&(
            "openai-main",
            "keygate:secret-refresh",
            vec!["value".to_string()]
        )) && refreshed.iter().any(|r| r.0 == "anthropic-main"),
        "{refreshed:?}"
    );
    let get = get_model_key(&mut admin, "openai-main").await;
    assert_eq!(get.masked_value, masked(V3));
    let logs = gw.keygate.logs();
    for v in [V1, V3, K8S_1, K8S_2] {
        assert!(!logs.contains(v), "keygate logged a secret value");
    }
}

/// `keygate_secret_refresh_failures_total{provider="file"}` from `/metrics` (0 when absent).
async fn refresh_failures(metrics: std::net::SocketAddr) -> u64 {
    let r = http_get(metrics, "/metrics", &[])
        .await
        .expect("GET /metrics");
    r.text()
        .lines()
        .find(|l| l.starts_with("keygate_secret_refresh_failures_total{provider=\"file\"}"))
        .and_then(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .map(|v| v as u64)
        .unwrap_or(0)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_deleted_secret_keeps_its_last_good_value_and_shows_the_failure_until_restored() {
    let gw = Gateway::start("1s", |d| {
        std::fs::write(d.join("openai-prod"), V1).unwrap();
    })
    .await;
    let mut admin = gw.admin.clone();
    create_service(&mut admin, "openai", "", "").await;
    create_secret_model_key(
        &mut admin,
        "openai-main",
        file_ref("openai-prod", ""),
        "openai",
    )
    .await
    .unwrap();
    create_consumer(&mut admin, "billing-app").await;
    let key = create_bound_key(&mut admin, "billing-prod", "billing-app").await;
    let limit = Duration::from_secs(10);
    gw.wait_upstream_value(
        "/openai/v1/models",
        &key,
        "authorization",
        &bearer(V1),
        limit,
    )
    .await;
    let metrics = metrics_addr(&gw.keygate.logs());
    let failures_before = refresh_failures(metrics).await;

    std::fs::remove_file(gw.secrets.path().join("openai-prod")).unwrap();
    let status = poll_until(limit, "the failed refresh to show on the key", || {
        let mut admin = admin.clone();
        async move {
            let s = get_model_key(&mut admin, "openai-main")
                .await
                .secret_status?;
            (!s.last_error.is_empty()).then_some(s)
        }
    })
    .await;
    assert!(
        status.last_error.contains("openai-prod") && !status.last_error.contains(V1),
        "{status:?}"
    );
    assert!(
        status.last_refresh_time.is_some(),
        "the last good resolution stays shown"
    );
    poll_until(limit, "the failure to be counted on /metrics", || async {
        (refresh_failures(metrics).await > failures_before).then_some(())
    })
    .await;
    // The last good value keeps being served.
    for _ in 0..3 {
        gw.wait_upstream_value(
            "/openai/v1/models",
            &key,
            "authorization",
            &bearer(V1),
            Duration::from_secs(2),
        )
        .await;
    }
    assert!(
        gw.keygate
            .logs()
            .lines()
            .any(|l| l.contains("secret refresh failed") && l.contains("openai-prod")),
        "the failure is logged by reference"
    );

    // Restored: the next refresh clears the error.
    std::fs::write(gw.secrets.path().join("openai-prod"), V1).unwrap();
    poll_until(limit, "the restored secret to clear last_error", || {
        let mut admin = admin.clone();
        async move {
            let s = get_model_key(&mut admin, "openai-main")
                .await
                .secret_status?;
            s.last_error.is_empty().then_some(())
        }
    })
    .await;
    gw.wait_upstream_value(
        "/openai/v1/models",
        &key,
        "authorization",
        &bearer(V1),
        limit,
    )
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_consumer_key_by_reference_authorizes_and_follows_the_secret_content() {
    let gw = Gateway::start("1s", |d| {
        std::fs::write(d.join("openai-prod"), V1).unwrap();
        std::fs::write(d.join("billing-consumer"), format!("{CONSUMER_1}\n")).unwrap();
    })
    .await;
    let mut admin = gw.admin.clone();
    create_service(&mut admin, "openai", "", "").await;
    create_secret_model_key(
        &mut admin,
        "openai-main",
        file_ref("openai-prod", ""),
        "openai",
    )
    .await
    .unwrap();
    create_consumer(&mut admin, "billing-app").await;
    let k = create_secret_consumer_key(
        &mut admin,
        "billing-prod",
        file_ref("billing-consumer", ""),
        "billing-app",
    )
    .await
    .unwrap()
    .key
    .unwrap();
    assert_eq!(k.masked_value, masked(CONSUMER_1));
    let limit = Duration::from_secs(10);
    gw.wait_upstream_value(
        "/openai/v1/models",
        CONSUMER_1,
        "authorization",
        &bearer(V1),
        limit,
    )
    .await;
    gw.upstream
        .last()
        .assert_never_carries(CONSUMER_1, "the consumer key");
    assert_eq!(gw.get("/openai/v1/models", CONSUMER_2).await.status, 401);

    // The secret's content changes: the new value authorizes, the old one stops.
    atomic_write(&gw.secrets.path().join("billing-consumer"), CONSUMER_2);
    let took = gw
        .wait_upstream_value(
            "/openai/v1/models",
            CONSUMER_2,
            "authorization",
            &bearer(V1),
            limit,
        )
        .await;
    eprintln!("measured: consumer secret changed → new value authorizes after {took:?} (TTL 1s)");
    assert_eq!(gw.get("/openai/v1/models", CONSUMER_1).await.status, 401);
    let k = get_consumer_key(&mut admin, "billing-prod").await;
    assert_eq!(k.masked_value, masked(CONSUMER_2));
    assert_eq!(k.secret_status.unwrap().last_error, "");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_data_plane_holds_no_plaintext_and_serves_secret_keys_with_the_control_plane_down() {
    let dir = tempfile::tempdir().unwrap();
    let secrets = dir.path().join("secrets");
    std::fs::create_dir_all(secrets.join("openai-prod")).unwrap();
    std::fs::write(secrets.join("openai-prod/1"), V1).unwrap();
    std::fs::write(secrets.join("billing-consumer"), CONSUMER_1).unwrap();
    let token = subscriber_token();
    let mut cp_opts = ControlPlaneOptions::new(&dir.path().join("cp"), &token);
    cp_opts.args = vec![
        "--secrets-dir".into(),
        secrets.display().to_string(),
        "--secret-ttl".into(),
        "1s".into(),
    ];
    let mut cp = ControlPlane::start(&cp_opts).await;
    let mut admin = cp.admin().await;
    create_service(&mut admin, "openai", "", "").await;
    create_secret_model_key(
        &mut admin,
        "openai-main",
        file_ref("openai-prod", "1"),
        "openai",
    )
    .await
    .unwrap();
    create_consumer(&mut admin, "billing-app").await;
    create_secret_consumer_key(
        &mut admin,
        "billing-prod",
        file_ref("billing-consumer", ""),
        "billing-app",
    )
    .await
    .unwrap();

    let dp_dir = dir.path().join("dp");
    let dp = DataPlane::start(&DataPlaneOptions::new(
        "data plane",
        &cp.url(),
        &dp_dir,
        &cp.master_key_file(),
        &token,
    ))
    .await;
    let upstream = Upstream::start().await;
    let envoy = Envoy::start(dp.authz_addr, upstream.addr).await;
    let wait_served = |limit: Duration| {
        let envoy = &envoy;
        let upstream = &upstream;
        async move {
            poll_until(
                limit,
                "the secret-ref keys to be served by the data plane",
                || async {
                    let r = http_get(
                        envoy.listener,
                        "/openai/v1/models",
                        &[("authorization", &bearer(CONSUMER_1))],
                    )
                    .await
                    .ok()?;
                    (r.status == 200 && upstream.last().values("authorization") == vec![bearer(V1)])
                        .then_some(())
                },
            )
            .await
        }
    };
    wait_served(Duration::from_secs(10)).await;
    // The data plane has written its cache by now (at most every 5 s).
    poll_until(
        Duration::from_secs(10),
        "the data plane's snapshot cache",
        || async {
            all_file_bytes(&dp_dir)
                .iter()
                .any(|(p, b)| !b.is_empty() && !p.ends_with("master.key"))
                .then_some(())
        },
    )
    .await;

    // The control plane goes away: the data plane keeps serving both secret-ref keys.
    cp.kill();
    for _ in 0..5 {
        wait_served(Duration::from_secs(2)).await;
    }

    // No resolved value in plaintext: the control plane's data dir (its SQLite store with the
    // audit rows, and the WAL), the data plane's cache, and every log.
    let mut places: Vec<(String, Vec<u8>)> = Vec::new();
    for d in [dir.path().join("cp"), dp_dir.clone()] {
        for (p, b) in all_file_bytes(&d) {
            places.push((p.display().to_string(), b));
        }
    }
    places.push(("control plane log".into(), cp.logs().into_bytes()));
    places.push(("data plane log".into(), dp.logs().into_bytes()));
    places.push(("Envoy stderr".into(), envoy.stderr().into_bytes()));
    places.push(("Envoy access log".into(), envoy.stdout().into_bytes()));
    for v in [V1, CONSUMER_1] {
        for (what, bytes) in &places {
            assert!(
                !contains_bytes(bytes, v.as_bytes()),
                "{what} holds a resolved secret value in plaintext"
            );
        }
    }
}
