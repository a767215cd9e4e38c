//! Observability (SPEC §6): `/metrics` counted through a real Envoy and parsed by a real
//! Prometheus text-format parser (`prometheus_client` in the test venv), `last_used_time`,
//! and `/healthz` / `/readyz` in `serve` and on a data plane.

mod common;

use std::collections::HashMap;
use std::net::SocketAddr;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use common::envoy::{Envoy, Upstream, free_port, http_get};
use common::{Keygate, Options, Proc, metrics_addr, poll_until, test_tool};
use envoy_types::ext_authz::v3::pb::CheckRequest;
use envoy_types::pb::envoy::service::auth::v3::authorization_client::AuthorizationClient;
use keygate::proto::admin::v1 as pb;

/// One sample: (name, labels) → value.
type Samples = HashMap<(String, Vec<(String, String)>), f64>;

/// Scrapes `/metrics` and parses it with Python's `prometheus_client` parser.
async fn scrape(addr: SocketAddr) -> Samples {
    let resp = http_get(addr, "/metrics", &[]).await.expect("GET /metrics");
    assert_eq!(resp.status, 200);
    assert!(
        resp.values("content-type")
            .iter()
            .any(|v| v.starts_with("text/plain")),
        "Prometheus text format"
    );
    let python = test_tool("python3", "KEYGATE_TEST_PYTHON");
    let mut child = Command::new(python)
        .arg("-c")
        .arg(
            "import sys, json\n\
             from prometheus_client.parser import text_string_to_metric_families as parse\n\
             out = [[s.name, sorted(s.labels.items()), s.value] for f in parse(sys.stdin.read()) for s in f.samples]\n\
             print(json.dumps(out))",
        )
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("run the venv's python (./scripts/test installs prometheus-client)");
    {
        use std::io::Write;
        child
            .stdin
            .take()
            .unwrap()
            .write_all(resp.text().as_bytes())
            .unwrap();
    }
    let out = child.wait_with_output().unwrap();
    assert!(
        out.status.success(),
        "parser failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    type Row = (String, Vec<(String, String)>, f64);
    let rows: Vec<Row> = serde_json::from_slice(&out.stdout).unwrap();
    rows.into_iter().map(|(n, l, v)| ((n, l), v)).collect()
}

fn sample(s: &Samples, name: &str, labels: &[(&str, &str)]) -> f64 {
    let mut l: Vec<(String, String)> = labels
        .iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect();
    l.sort();
    s.get(&(name.to_string(), l)).copied().unwrap_or(0.0)
}

fn delta(before: &Samples, after: &Samples, name: &str, labels: &[(&str, &str)]) -> f64 {
    sample(after, name, labels) - sample(before, name, labels)
}

async fn setup(admin: &mut common::Admin) -> HashMap<&'static str, String> {
    for (name, header, template) in [("openai", "", ""), ("anthropic", "x-api-key", "{key}")] {
        admin
            .create_model_service(pb::CreateModelServiceRequest {
                name: name.into(),
                auth_header: header.into(),
                auth_value_template: template.into(),
                ..Default::default()
            })
            .await
            .unwrap();
        admin
            .create_model_key(pb::CreateModelKeyRequest {
                name: format!("{name}-vendor"),
                generation_method: pb::GenerationMethod::Custom as i32,
                value: format!("sk-{name}-vendor-0123456789abcdef"),
                model_services: vec![name.into()],
                ..Default::default()
            })
            .await
            .unwrap();
    }
    admin
        .create_consumer(pb::CreateConsumerRequest {
            name: "team-a".into(),
            ..Default::default()
        })
        .await
        .unwrap();
    admin
        .create_consumer(pb::CreateConsumerRequest {
            name: "team-b".into(),
            scope: Some(pb::Scope {
                all: false,
                model_services: vec!["openai".into()],
                ..Default::default()
            }),
            ..Default::default()
        })
        .await
        .unwrap();
    let mut values = HashMap::new();
    for (key, consumer) in [
        ("a-key", "team-a"),
        ("b-key", "team-b"),
        ("a-off", "team-a"),
    ] {
        let r = admin
            .create_consumer_key(pb::CreateConsumerKeyRequest {
                name: key.into(),
                consumer: consumer.into(),
                ..Default::default()
            })
            .await
            .unwrap()
            .into_inner();
        values.insert(key, r.value);
    }
    admin
        .disable_consumer_key(pb::DisableConsumerKeyRequest {
            selector: Some(pb::disable_consumer_key_request::Selector::Name(
                "a-off".into(),
            )),
        })
        .await
        .unwrap();
    values
}

#[tokio::test]
async fn metrics_count_every_decision_through_envoy() {
    let kg = Keygate::start().await;
    let mut admin = kg.admin().await;
    let keys = setup(&mut admin).await;
    let upstream = Upstream::start().await;
    let envoy = Envoy::start(kg.authz_addr, upstream.addr).await;
    let bearer = |k: &str| format!("Bearer {}", keys[k]);
    // Ready: the newest key authorizes through Envoy.
    poll_until(
        Duration::from_secs(20),
        "an allowed request through Envoy",
        || async {
            let r = http_get(
                envoy.listener,
                "/openai/v1/models",
                &[("authorization", &bearer("b-key"))],
            )
            .await
            .ok()?;
            (r.status == 200).then_some(())
        },
    )
    .await;
    let maddr = metrics_addr(&kg.logs());
    let before = scrape(maddr).await;

    let script: &[(&str, Option<String>, u16)] = &[
        ("/openai/v1/chat/completions", Some(bearer("a-key")), 200),
        ("/openai/v1/chat/completions", Some(bearer("a-key")), 200),
        ("/openai/v1/chat/completions", Some(bearer("a-key")), 200),
        ("/anthropic/v1/messages", Some(bearer("a-key")), 200),
        ("/anthropic/v1/messages", Some(bearer("a-key")), 200),
        ("/openai/v1/chat/completions", Some(bearer("b-key")), 200),
        ("/openai/v1/chat/completions", Some(bearer("b-key")), 200),
        ("/openai/v1/chat/completions", Some(bearer("b-key")), 200),
        ("/openai/v1/chat/completions", Some(bearer("b-key")), 200),
        ("/openai/v1/models", None, 401),
        ("/openai/v1/models", None, 401),
        (
            "/openai/v1/models",
            Some("Bearer kg-not-a-key-0123456789abcdef".into()),
            401,
        ),
        ("/openai/v1/models", Some(bearer("a-off")), 401),
        ("/anthropic/v1/messages", Some(bearer("b-key")), 403),
        ("/unconfigured/x", Some(bearer("a-key")), 403),
    ];
    for (path, auth, want) in script {
        let headers: Vec<(&str, &str)> = auth
            .as_deref()
            .map(|a| vec![("authorization", a)])
            .unwrap_or_default();
        let r = http_get(envoy.listener, path, &headers).await.unwrap();
        assert_eq!(r.status, *want, "{path} {auth:?}: {}", r.text());
    }
    let after = scrape(maddr).await;

    let checks = "keygate_checks_total";
    assert_eq!(
        delta(
            &before,
            &after,
            checks,
            &[("result", "allowed"), ("reason", "ok")]
        ),
        9.0
    );
    assert_eq!(
        delta(
            &before,
            &after,
            checks,
            &[("result", "denied"), ("reason", "missing_credential")]
        ),
        2.0
    );
    assert_eq!(
        delta(
            &before,
            &after,
            checks,
            &[("result", "denied"), ("reason", "unknown_key")]
        ),
        1.0
    );
    assert_eq!(
        delta(
            &before,
            &after,
            checks,
            &[("result", "denied"), ("reason", "disabled")]
        ),
        1.0
    );
    assert_eq!(
        delta(
            &before,
            &after,
            checks,
            &[
                ("result", "denied"),
                ("reason", "model_service_not_allowed")
            ]
        ),
        1.0
    );
    assert_eq!(
        delta(
            &before,
            &after,
            checks,
            &[("result", "denied"), ("reason", "route_not_configured")]
        ),
        1.0
    );
    assert_eq!(
        delta(
            &before,
            &after,
            checks,
            &[("result", "denied"), ("reason", "ip_not_allowed")]
        ),
        0.0
    );
    assert_eq!(
        delta(
            &before,
            &after,
            checks,
            &[("result", "error"), ("reason", "internal")]
        ),
        0.0
    );
    let usage = "keygate_consumer_requests_total";
    assert_eq!(
        delta(
            &before,
            &after,
            usage,
            &[("consumer", "team-a"), ("model_service", "openai")]
        ),
        3.0
    );
    assert_eq!(
        delta(
            &before,
            &after,
            usage,
            &[("consumer", "team-a"), ("model_service", "anthropic")]
        ),
        2.0
    );
    assert_eq!(
        delta(
            &before,
            &after,
            usage,
            &[("consumer", "team-b"), ("model_service", "openai")]
        ),
        4.0
    );
    assert_eq!(
        delta(
            &before,
            &after,
            usage,
            &[("consumer", "team-b"), ("model_service", "anthropic")]
        ),
        0.0
    );
    assert_eq!(
        delta(&before, &after, "keygate_check_duration_seconds_count", &[]),
        15.0
    );
    assert!(
        sample(
            &after,
            "keygate_check_duration_seconds_bucket",
            &[("le", "+Inf")]
        ) >= 15.0
    );
    // Snapshot gauges.
    let version = sample(&after, "keygate_snapshot_version", &[]);
    assert!(version >= 10.0, "version {version}");
    assert_eq!(
        sample(
            &after,
            "keygate_snapshot_entries",
            &[("kind", "consumer_key")]
        ),
        3.0
    );
    assert_eq!(
        sample(
            &after,
            "keygate_snapshot_entries",
            &[("kind", "model_service")]
        ),
        2.0
    );
    assert!(sample(&after, "process_resident_memory_bytes", &[]) > 0.0);
    // No secret in the metrics text.
    let text = http_get(maddr, "/metrics", &[]).await.unwrap().text();
    for v in keys.values() {
        assert!(!text.contains(v.as_str()));
    }
    drop(envoy);
}

fn check(key: &str, service: &str) -> CheckRequest {
    keygate::bench::check_request(key, service, "127.0.0.1")
}

#[tokio::test]
async fn last_used_time_appears_within_5s_and_survives_a_restart() {
    let mut kg = Keygate::start().await;
    let mut admin = kg.admin().await;
    let keys = setup(&mut admin).await;
    let get = |admin: &mut common::Admin| {
        let mut admin = admin.clone();
        async move {
            admin
                .get_consumer_key(pb::GetConsumerKeyRequest {
                    selector: Some(pb::get_consumer_key_request::Selector::Name("a-key".into())),
                })
                .await
                .unwrap()
                .into_inner()
        }
    };
    assert!(
        get(&mut admin).await.last_used_time.is_none(),
        "never used yet"
    );
    let mut authz = AuthorizationClient::connect(format!("http://{}", kg.authz_addr))
        .await
        .unwrap();
    let used_at = std::time::SystemTime::now();
    poll_until(Duration::from_secs(5), "the key to be live", || {
        let mut authz = authz.clone();
        let req = check(&keys["a-key"], "openai");
        async move {
            let r = authz.check(req).await.ok()?.into_inner();
            (r.status.map(|s| s.code) == Some(0)).then_some(())
        }
    })
    .await;
    let _ = authz.check(check(&keys["a-key"], "openai")).await.unwrap();
    let started = Instant::now();
    let stamped = poll_until(
        Duration::from_secs(5),
        "last_used_time on GetConsumerKey",
        || {
            let fut = get(&mut admin);
            async move { fut.await.last_used_time }
        },
    )
    .await;
    eprintln!(
        "last_used_time visible {:?} after the request",
        started.elapsed()
    );
    let stamped_s =
        std::time::UNIX_EPOCH + Duration::new(stamped.seconds as u64, stamped.nanos as u32);
    assert!(
        stamped_s + Duration::from_secs(1) >= used_at,
        "stamped at the use, not before"
    );
    // Other keys stay unused; List shows the same time.
    let list = admin
        .list_consumer_keys(pb::ListConsumerKeysRequest::default())
        .await
        .unwrap()
        .into_inner();
    for k in &list.items {
        match k.name.as_str() {
            "a-key" => assert_eq!(k.last_used_time, Some(stamped)),
            _ => assert!(k.last_used_time.is_none(), "{} was never used", k.name),
        }
    }
    // Graceful restart: still there.
    assert_eq!(kg.stop(), Some(0));
    let tmp = kg.take_tempdir();
    let kg2 = Keygate::start_with(Options {
        data_dir: Some(kg.data_dir.clone()),
        ..Default::default()
    })
    .await;
    let mut admin2 = kg2.admin().await;
    assert_eq!(get(&mut admin2).await.last_used_time, Some(stamped));
    drop(tmp);
}

#[tokio::test]
async fn readyz_follows_the_snapshot_in_serve_and_on_a_data_plane() {
    // serve: ready once its snapshot is live (at start).
    let kg = Keygate::start().await;
    let m = metrics_addr(&kg.logs());
    let r = http_get(m, "/readyz", &[]).await.unwrap();
    assert_eq!(r.status, 200, "{}", r.text());
    assert!(r.text().starts_with("ready version="), "{}", r.text());
    assert_eq!(http_get(m, "/healthz", &[]).await.unwrap().status, 200);

    // A data plane with no reachable control plane and no cache: alive, not ready.
    let tmp = tempfile::tempdir().unwrap();
    let cp_dir = tmp.path().join("cp");
    std::fs::create_dir_all(&cp_dir).unwrap();
    // The control plane's master key, as `control-plane` would create it in its data dir.
    let key_file = cp_dir.join("master.key");
    keygate::crypto::MasterKey::load_or_create(&key_file).unwrap();
    let token = "subscriber-token-0123456789abcdef".to_string();
    let cp_port = free_port();
    let dp_metrics = free_port();
    let mut dp = Proc::spawn(
        "data plane",
        &[
            "authz".into(),
            "--control-plane".into(),
            format!("http://127.0.0.1:{cp_port}"),
            "--authz-addr".into(),
            "127.0.0.1:0".into(),
            "--metrics-addr".into(),
            format!("127.0.0.1:{dp_metrics}"),
            "--data-dir".into(),
            tmp.path().join("dp").display().to_string(),
            "--master-key-file".into(),
            key_file.display().to_string(),
        ],
        &[("KEYGATE_SUBSCRIBER_TOKEN".into(), token.clone())],
    );
    dp.wait_ready().await;
    let dpm: SocketAddr = format!("127.0.0.1:{dp_metrics}").parse().unwrap();
    let r = http_get(dpm, "/readyz", &[]).await.unwrap();
    assert_eq!(r.status, 503, "{}", r.text());
    assert!(r.text().starts_with("not ready"), "{}", r.text());
    assert_eq!(http_get(dpm, "/healthz", &[]).await.unwrap().status, 200);

    // The control plane comes up on that address: the data plane syncs and is ready.
    let mut cp = Proc::spawn(
        "control plane",
        &[
            "control-plane".into(),
            "--data-dir".into(),
            cp_dir.display().to_string(),
            "--admin-addr".into(),
            format!("127.0.0.1:{cp_port}"),
        ],
        &[("KEYGATE_SUBSCRIBER_TOKEN".into(), token)],
    );
    cp.wait_ready().await;
    poll_until(
        Duration::from_secs(15),
        "the data plane to become ready",
        || async {
            let r = http_get(dpm, "/readyz", &[]).await.ok()?;
            (r.status == 200).then_some(())
        },
    )
    .await;
    assert_eq!(http_get(dpm, "/healthz", &[]).await.unwrap().status, 200);
    // Role metrics: staleness on the data plane, subscribers on the control plane.
    let dps = scrape(dpm).await;
    assert!(
        dps.keys()
            .any(|(n, _)| n == "keygate_snapshot_staleness_seconds")
    );
    let cpm = metrics_addr(&cp.logs());
    poll_until(
        Duration::from_secs(10),
        "keygate_subscribers = 1",
        || async { (sample(&scrape(cpm).await, "keygate_subscribers", &[]) == 1.0).then_some(()) },
    )
    .await;
}
