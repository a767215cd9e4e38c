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
use common::{Keygate, Options, metrics_addr, poll_until};

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

/// The ext_authz answer's gRPC code for `key` on `service` (0 = allowed).
async fn check_code(authz: std::net::SocketAddr, key: &str, service: &str) -> i32 {
    use envoy_types::pb::envoy::service::auth::v3::authorization_client::AuthorizationClient;
    let mut client = AuthorizationClient::connect(format!("http://{authz}"))
        .await
        .unwrap();
    client
        .check(keygate::bench::check_request(key, service, "127.0.0.1"))
        .await
        .unwrap()
        .into_inner()
        .status
        .map(|s| s.code)
        .unwrap_or(-1)
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
