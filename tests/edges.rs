//! Small trust edges of SPEC §9 against a real `keygate serve`: who may reach the ext_authz
//! listener (loopback, a Unix socket through a real Envoy, or mTLS; anything else refused at
//! start), what a subscriber-token holder can write into the store (clamped usage times) and
//! into the logs (escaped names).

mod common;

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use keygate::proto::admin::v1 as pb;
use keygate::proto::snapshot::v1 as spb;
use spb::snapshot_distribution_client::SnapshotDistributionClient;
use tonic::Request;
use tonic::transport::Channel;

use common::admin::{
    bearer, create_consumer, create_consumer_key, create_model_key, create_service,
};
use common::envoy::{Envoy, Upstream, http_get, render_single_pipe};
use common::{Keygate, Options, Proc, admin_client, poll_until, read_admin_token};

const SUBSCRIBER_TOKEN: &str = "edges-subscriber-token-0123456789abcdef";

async fn start() -> Keygate {
    Keygate::start_with(Options {
        env: vec![("KEYGATE_SUBSCRIBER_TOKEN".into(), SUBSCRIBER_TOKEN.into())],
        ..Default::default()
    })
    .await
}

async fn distribution(kg: &Keygate) -> SnapshotDistributionClient<Channel> {
    let channel = Channel::from_shared(format!("http://{}", kg.admin_addr))
        .unwrap()
        .connect()
        .await
        .unwrap();
    SnapshotDistributionClient::new(channel)
}

fn authorized<T>(msg: T) -> Request<T> {
    let mut r = Request::new(msg);
    r.metadata_mut().insert(
        "authorization",
        format!("Bearer {SUBSCRIBER_TOKEN}").parse().unwrap(),
    );
    r
}

fn now_us() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_micros() as i64
}

/// L4: a usage report from the future is recorded as "now" (the control plane's clock), not
/// as year 9999, so a key's `last_used_time` never lies about the future.
#[tokio::test]
async fn reported_usage_times_are_clamped_to_the_control_planes_clock() {
    let kg = start().await;
    let mut admin = kg.admin().await;
    let key = admin
        .create_consumer_key(pb::CreateConsumerKeyRequest {
            name: "clamped".into(),
            generation_method: pb::GenerationMethod::Auto as i32,
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner()
        .key
        .unwrap();
    let id = uuid::Uuid::parse_str(&key.id).unwrap();
    // 9999-12-31T00:00:00Z in µs.
    let year_9999 = 253_402_214_400_000_000i64;
    let before = now_us();
    distribution(&kg)
        .await
        .report_usage(authorized(spb::UsageReport {
            items: vec![spb::KeyUsage {
                consumer_key_id: id.as_bytes().to_vec(),
                last_used_time_us: year_9999,
            }],
            ..Default::default()
        }))
        .await
        .unwrap();
    let after = now_us();
    let got = admin
        .get_consumer_key(pb::GetConsumerKeyRequest {
            selector: Some(pb::get_consumer_key_request::Selector::Name(
                "clamped".into(),
            )),
        })
        .await
        .unwrap()
        .into_inner()
        .last_used_time
        .expect("a last_used_time");
    let got_us = got.seconds * 1_000_000 + i64::from(got.nanos / 1000);
    assert!(
        (before - 1_000_000..=after + 1_000_000).contains(&got_us),
        "last_used_time {got:?} is not the control plane's clock (between {before} and {after} µs)"
    );
}

/// L6: a subscriber name is client input; a newline in it must not start a log line.
#[tokio::test]
async fn a_subscriber_name_cannot_forge_a_log_line() {
    let kg = start().await;
    let forged = "2026-01-01T00:00:00.000000Z  INFO keygate: FORGED admin token accepted";
    let name = format!("dp-1\n{forged}\r\n{}", "x".repeat(10_000));
    let mut stream = distribution(&kg)
        .await
        .subscribe(authorized(spb::SubscribeRequest {
            subscriber: name,
            ..Default::default()
        }))
        .await
        .unwrap()
        .into_inner();
    let _first = stream.message().await.unwrap();
    // The test harness logs JSON (which escapes on its own); what is checked is the value the
    // log line carries, which the text format prints as it is.
    let subscribed = poll_until(Duration::from_secs(10), "the subscription log line", || {
        let line = kg
            .logs()
            .lines()
            .find(|l| l.contains("data plane subscribed"))
            .map(str::to_string);
        async move { line }
    })
    .await;
    let v: serde_json::Value = serde_json::from_str(&subscribed).unwrap();
    let logged = v["fields"]["subscriber"]
        .as_str()
        .expect("a subscriber field");
    assert!(
        !logged.chars().any(char::is_control),
        "a control character in the logged name: {logged:?}"
    );
    assert!(logged.starts_with("dp-1\\n2026-01-01"), "{logged:?}");
    assert!(
        logged.chars().count() <= 200,
        "an unbounded logged name: {} characters",
        logged.chars().count()
    );
}

fn serve_args(data_dir: &std::path::Path, authz_addr: &str) -> Vec<String> {
    [
        "serve",
        "--data-dir",
        &data_dir.display().to_string(),
        "--authz-addr",
        authz_addr,
        "--admin-addr",
        "127.0.0.1:0",
    ]
    .map(String::from)
    .to_vec()
}

/// M2: a non-loopback ext_authz listener without client certificates is refused at start
/// (exit 64, naming the flag and the ways out); the explicit flag lets it start.
#[tokio::test]
async fn a_non_loopback_authz_addr_without_client_certificates_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    for addr in ["0.0.0.0:0", "[::]:0"] {
        let mut p = Proc::spawn("keygate serve", &serve_args(&data, addr), &[]);
        assert_eq!(
            p.wait_exit(Duration::from_secs(30)).await,
            Some(64),
            "{}",
            p.logs()
        );
        let logs = p.logs();
        assert!(logs.contains("--authz-addr"), "{logs}");
        assert!(logs.contains("--tls-client-ca"), "{logs}");
        assert!(logs.contains("--allow-unauthenticated-authz"), "{logs}");
    }
    let mut args = serve_args(&data, "0.0.0.0:0");
    args.push("--allow-unauthenticated-authz".into());
    let mut p = Proc::spawn("keygate serve", &args, &[]);
    p.wait_ready().await;
    assert!(p.authz_addr.is_some(), "{}", p.logs());
}

/// M2: `--authz-addr unix:/path` serves ext_authz on a Unix socket (mode 0660), and the
/// shipped envoy.yaml with its commented `pipe` example reaches it through a real Envoy.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn envoy_calls_keygate_over_a_unix_socket() {
    use std::os::unix::fs::PermissionsExt;
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    let socket = dir.path().join("authz.sock");
    let mut kg = Proc::spawn(
        "keygate serve",
        &serve_args(&data, &format!("unix:{}", socket.display())),
        &[],
    );
    kg.wait_ready().await;
    let mode = std::fs::metadata(&socket).unwrap().permissions().mode() & 0o777;
    assert_eq!(mode, 0o660, "the socket's mode");
    let mut admin = admin_client(kg.admin_addr.unwrap(), Some(read_admin_token(&data))).await;
    create_service(&mut admin, "openai", "", "").await;
    create_model_key(
        &mut admin,
        "openai-primary",
        "sk-proj-udsVendorKey000000000001",
        "openai",
    )
    .await;
    create_consumer(&mut admin, "app").await;
    let ck = create_consumer_key(
        &mut admin,
        pb::CreateConsumerKeyRequest {
            name: "app-key".into(),
            consumer: "app".into(),
            ..Default::default()
        },
    )
    .await;

    let upstream = Upstream::start().await;
    let envoy = Envoy::start_rendered(|listener, admin_port| {
        render_single_pipe(&socket, listener, upstream.addr.port(), admin_port)
    })
    .await;
    let auth = bearer(&ck);
    let r = poll_until(
        Duration::from_secs(10),
        "an allowed request over the socket",
        || {
            let auth = auth.clone();
            let envoy = &envoy;
            async move {
                let r = http_get(
                    envoy.listener,
                    "/openai/v1/models",
                    &[("authorization", &auth)],
                )
                .await
                .ok()?;
                (r.status == 200).then_some(r)
            }
        },
    )
    .await;
    assert_eq!(r.status, 200);
    assert_eq!(
        upstream.last().values("authorization"),
        vec!["Bearer sk-proj-udsVendorKey000000000001"]
    );
    let r = http_get(envoy.listener, "/openai/v1/models", &[])
        .await
        .unwrap();
    assert_eq!(r.status, 401, "keygate's refusal over the socket");
}

/// `keygate serve` on `data`, expected to refuse to start (exit 64) naming `what` and `fix`.
async fn refused_at_start(args: &[String], env: &[(String, String)], what: &str, fix: &str) {
    let mut p = Proc::spawn("keygate", args, env);
    assert_eq!(
        p.wait_exit(Duration::from_secs(30)).await,
        Some(64),
        "expected exit 64 for {what}:\n{}",
        p.logs()
    );
    let logs = p.logs();
    assert!(
        logs.contains(what) && logs.contains(fix),
        "{what} / {fix}:\n{logs}"
    );
}

/// L1: as ssh does, keygate refuses a data dir others can write to or another user owns, and a
/// master key or token file others can read, naming the file and the fix (exit 64).
#[tokio::test]
async fn files_others_can_read_or_change_are_refused_at_start() {
    use std::os::unix::fs::PermissionsExt;
    let chmod = |p: &std::path::Path, m| {
        std::fs::set_permissions(p, std::fs::Permissions::from_mode(m)).unwrap()
    };
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    std::fs::create_dir(&data).unwrap();
    let args = serve_args(&data, "127.0.0.1:0");
    let data_s = data.display().to_string();

    chmod(&data, 0o777);
    refused_at_start(&args, &[], &data_s, "chmod 700").await;
    chmod(&data, 0o700);
    if std::os::unix::fs::chown(&data, Some(65534), None).is_ok() {
        refused_at_start(&args, &[], &data_s, "chown").await;
        std::os::unix::fs::chown(&data, Some(0), None).unwrap();
    }

    // A first start creates the master key and admin token (0600); loosened, they are refused.
    let mut p = Proc::spawn("keygate", &args, &[]);
    p.wait_ready().await;
    assert_eq!(p.stop(), Some(0));
    let key = data.join("master.key");
    chmod(&key, 0o644);
    refused_at_start(&args, &[], &key.display().to_string(), "chmod 600").await;
    chmod(&key, 0o600);
    let token = data.join("admin.token");
    chmod(&token, 0o640);
    refused_at_start(&args, &[], &token.display().to_string(), "chmod 600").await;
    chmod(&token, 0o600);

    // A data plane's subscriber token file.
    let token_file = dir.path().join("subscriber.token");
    std::fs::write(&token_file, SUBSCRIBER_TOKEN).unwrap();
    chmod(&token_file, 0o644);
    let authz = [
        "authz",
        "--control-plane",
        "http://127.0.0.1:9",
        "--authz-addr",
        "127.0.0.1:0",
        "--data-dir",
        &dir.path().join("dp").display().to_string(),
        "--master-key-file",
        &key.display().to_string(),
        "--subscriber-token-file",
        &token_file.display().to_string(),
    ]
    .map(String::from);
    refused_at_start(&authz, &[], &token_file.display().to_string(), "chmod 600").await;
}
