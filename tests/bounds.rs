//! Resources one bad file or one credential holder can exhaust (issue 14, M4 and M5): a FIFO
//! or a device in the secrets directory fails its reference — named in `secret_status`,
//! `/readyz` and the failure metric — and stalls no snapshot update; Subscribe streams the
//! snapshot lazily, caps concurrent subscriptions and drops subscribers that do not read.

mod common;

use std::path::Path;
use std::time::Duration;

use tonic::Code;

use common::admin::{create_bound_key, create_consumer, create_service, disable_consumer_key};
use common::envoy::http_get;
use common::secrets::{create_secret_model_key, file_ref, get_model_key};
use common::split;
use common::{Keygate, Options, check_code, metrics_addr, poll_until};

const V1: &str = "sk-proj-boundsVersionOne0000000000000001";
/// Normal propagation: well under this.
const PROPAGATION: Duration = Duration::from_secs(10);

async fn start(secrets: &Path) -> Keygate {
    Keygate::start_with(Options {
        args: vec![
            "--secrets-dir".into(),
            secrets.display().to_string(),
            // Re-read every 200 ms, so the bad file is met by the refresh as well.
            "--secret-ttl".into(),
            "1s".into(),
        ],
        ..Default::default()
    })
    .await
}

/// `openai` served by the model key `openai-main` on `file:openai-prod` (latest), and a
/// consumer key `leaked` allowed on it. Returns the consumer key.
async fn serve_openai(kg: &Keygate) -> String {
    let mut admin = kg.admin().await;
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
    let key = create_bound_key(&mut admin, "leaked", "billing-app").await;
    poll_until(PROPAGATION, "the key is allowed", || async {
        (check_code(kg.authz_addr, &key, "openai").await == 0).then_some(())
    })
    .await;
    key
}

/// Polls until `openai-main`'s `secret_status.last_error` contains `what`; returns it.
async fn until_status_names(kg: &Keygate, what: &str) -> String {
    let admin = kg.admin().await;
    poll_until(PROPAGATION, "secret_status names the problem", || {
        let mut admin = admin.clone();
        async move {
            let k = get_model_key(&mut admin, "openai-main").await;
            let e = k.secret_status?.last_error;
            e.contains(what).then_some(e)
        }
    })
    .await
}

#[tokio::test]
async fn a_fifo_as_the_latest_version_stalls_no_update_and_is_named_everywhere() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::create_dir(dir.path().join("openai-prod")).unwrap();
    std::fs::write(dir.path().join("openai-prod/1"), V1).unwrap();
    let kg = start(dir.path()).await;
    let key = serve_openai(&kg).await;

    // A FIFO without a writer becomes the latest version.
    let made = std::process::Command::new("mkfifo")
        .arg(dir.path().join("openai-prod/2"))
        .status()
        .unwrap();
    assert!(made.success());
    // A change that makes the builder take the model keys again, then the revocation.
    let mut admin = kg.admin().await;
    create_service(&mut admin, "anthropic", "x-api-key", "{key}").await;
    disable_consumer_key(&mut admin, "leaked").await;
    poll_until(PROPAGATION, "the disabled key is refused", || async {
        (check_code(kg.authz_addr, &key, "openai").await != 0).then_some(())
    })
    .await;

    let error = until_status_names(&kg, "not a regular file").await;
    assert!(error.contains("openai-prod"), "{error}");
    assert!(!error.contains(V1));
    let metrics = metrics_addr(&kg.logs());
    let ready = http_get(metrics, "/readyz", &[]).await.unwrap();
    assert_eq!(
        ready.status, 200,
        "a failing reference keeps its last value"
    );
    let text = ready.text();
    assert!(text.contains("name \"openai-prod\""), "{text}");
    assert!(text.contains("not a regular file"), "{text}");
    let m = http_get(metrics, "/metrics", &[]).await.unwrap().text();
    let failures = m
        .lines()
        .find(|l| l.starts_with("keygate_secret_refresh_failures_total{provider=\"file\"}"))
        .unwrap_or_else(|| panic!("no failure counter:\n{m}"));
    let n: f64 = failures.rsplit(' ').next().unwrap().parse().unwrap();
    assert!(n >= 1.0, "{failures}");
}

#[tokio::test]
async fn a_symlink_to_dev_zero_is_refused_and_the_last_good_value_stays() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::create_dir(dir.path().join("openai-prod")).unwrap();
    std::fs::write(dir.path().join("openai-prod/1"), V1).unwrap();
    std::os::unix::fs::symlink("/dev/zero", dir.path().join("endless")).unwrap();
    let kg = start(dir.path()).await;
    let key = serve_openai(&kg).await;
    let mut admin = kg.admin().await;

    // The latest version of a served reference becomes the device: every refresh is refused
    // at once, and the key keeps being served with its last good value.
    std::os::unix::fs::symlink("/dev/zero", dir.path().join("openai-prod/2")).unwrap();
    until_status_names(&kg, "not a regular file").await;
    assert_eq!(check_code(kg.authz_addr, &key, "openai").await, 0);
    // A new reference to the device: refused before anything is committed.
    let e = create_secret_model_key(&mut admin, "endless-key", file_ref("endless", ""), "openai")
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::FailedPrecondition, "{e:?}");
    assert!(e.message().contains("not a regular file"), "{e:?}");

    // Updates still flow.
    disable_consumer_key(&mut admin, "leaked").await;
    poll_until(PROPAGATION, "the disabled key is refused", || async {
        (check_code(kg.authz_addr, &key, "openai").await != 0).then_some(())
    })
    .await;
}

/// The resident set of process `pid` in bytes (`VmRSS` in /proc/<pid>/status).
fn rss_bytes(pid: u32) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    let kb: u64 = status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.split_whitespace().next())
        .and_then(|v| v.parse().ok())
        .unwrap_or_else(|| panic!("no VmRSS in /proc/{pid}/status"));
    kb * 1024
}

type SnapshotClient =
    keygate::proto::snapshot::v1::snapshot_distribution_client::SnapshotDistributionClient<
        tonic::service::interceptor::InterceptedService<
            tonic::transport::Channel,
            common::BearerToken,
        >,
    >;

/// A Subscribe on a connection of its own, from scratch (a full snapshot is due).
async fn subscribe(
    url: &str,
    token: &str,
    name: &str,
) -> Result<tonic::Streaming<keygate::proto::snapshot::v1::SnapshotMessage>, tonic::Status> {
    let channel = tonic::transport::Channel::from_shared(url.to_string())
        .unwrap()
        .connect()
        .await
        .unwrap();
    let mut client: SnapshotClient =
        keygate::proto::snapshot::v1::snapshot_distribution_client::SnapshotDistributionClient::with_interceptor(
            channel,
            common::BearerToken(Some(token.to_string())),
        );
    client
        .subscribe(keygate::proto::snapshot::v1::SubscribeRequest {
            subscriber: name.into(),
            ..Default::default()
        })
        .await
        .map(|r| r.into_inner())
}

#[tokio::test]
async fn subscribers_that_never_read_cost_bounded_memory_and_the_cap_refuses_more() {
    const KEYS: u64 = 100_000;
    const STALLED: usize = 40;
    const BOUND: u64 = 300 * 1024 * 1024;
    let tmp = tempfile::tempdir().unwrap();
    let data = tmp.path().join("cp");
    let seeded = std::process::Command::new(common::keygate_bin())
        .args(["bench", "seed", "--keys", &KEYS.to_string(), "--data-dir"])
        .arg(&data)
        .env("KEYGATE_LOG", "warn")
        .output()
        .unwrap();
    assert!(
        seeded.status.success(),
        "{}",
        String::from_utf8_lossy(&seeded.stderr)
    );
    let token = split::subscriber_token();
    let mut opts = split::ControlPlaneOptions::new(&data, &token);
    // The stalled subscribers and one data plane.
    opts.args = vec!["--max-subscribers".into(), (STALLED + 1).to_string()];
    let cp = split::ControlPlane::start(&opts).await;
    let pid = cp.proc.pid().unwrap();
    let before = rss_bytes(pid);

    // Subscriptions that never read a byte, each on its own connection.
    let mut stalled = Vec::new();
    for i in 0..STALLED {
        stalled.push(
            subscribe(&cp.url(), &token, &format!("stalled-{i}"))
                .await
                .unwrap_or_else(|e| panic!("stalled subscription {i}: {e:?}")),
        );
    }

    // A normal data plane still syncs, and takes changes.
    let dp_dir = tmp.path().join("dp");
    let dp = split::DataPlane::start(&split::DataPlaneOptions::new(
        "data plane",
        &cp.url(),
        &dp_dir,
        &cp.master_key_file(),
        &token,
    ))
    .await;
    let key = keygate::bench::seeded_key(7);
    poll_until(
        Duration::from_secs(60),
        "the data plane allows a seeded key",
        || async { dp.verdict(&key, "bench").await.allowed().then_some(()) },
    )
    .await;
    let mut admin = cp.admin().await;
    disable_consumer_key(&mut admin, "bench-7").await;
    poll_until(
        PROPAGATION,
        "the data plane refuses the disabled key",
        || async { (!dp.verdict(&key, "bench").await.allowed()).then_some(()) },
    )
    .await;

    // Every subscriber has been served its first chunks by now; the control plane holds no
    // copy of the snapshot per subscriber.
    let after = rss_bytes(pid);
    assert!(
        after < before + BOUND,
        "{STALLED} stalled subscribers took the control plane from {} MB to {} MB",
        before / (1024 * 1024),
        after / (1024 * 1024)
    );

    // The cap: one more is refused, and says why.
    let e = subscribe(&cp.url(), &token, "one-too-many")
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::ResourceExhausted, "{e:?}");
    assert!(e.message().contains("--max-subscribers"), "{e:?}");
    drop(stalled);
}
