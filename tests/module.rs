//! The keygate Envoy dynamic module beyond the shared end-to-end suite (issue 9): the ABI
//! handshake, config errors refusing Envoy's load, fail static with the control plane down
//! (and across an Envoy restart, from the module's cache), catching up when it returns, 503
//! `keygate_not_ready` with nothing to decide from, no plaintext key in the module's cache or
//! Envoy's output, decisions counted on the module's `/metrics` and in Envoy's stats, and a
//! `.so` without the store.

mod common;

use std::path::Path;
use std::time::Duration;

use common::admin::{
    bearer, create_bound_key, create_consumer, create_model_key, create_service,
    disable_consumer_key,
};
use common::envoy::{
    Envoy, EnvoyRun, HttpResponse, ModuleFiles, Upstream, http_get, module_dir, render_module,
};
use common::split::{ControlPlane, ControlPlaneOptions, subscriber_token};
use common::{Admin, all_file_bytes, contains_bytes, poll_until, tail};

const OPENAI_KEY: &str = "sk-proj-moduleOpenAiKey000000000000001";

/// A control plane (`keygate control-plane`) and the files an Envoy with the module needs.
struct Setup {
    cp: ControlPlane,
    files: ModuleFiles,
    dir: tempfile::TempDir,
}

impl Setup {
    async fn start() -> Setup {
        let dir = tempfile::tempdir().unwrap();
        let token = subscriber_token();
        let cp =
            ControlPlane::start(&ControlPlaneOptions::new(&dir.path().join("cp"), &token)).await;
        let token_file = dir.path().join("subscriber.token");
        common::write_private(&token_file, &token);
        let files = ModuleFiles {
            control_plane: cp.url(),
            master_key_file: cp.master_key_file(),
            data_dir: dir.path().join("module-data"),
            subscriber_token_file: token_file,
            extra_settings: String::new(),
        };
        Setup { cp, files, dir }
    }

    /// The openai service with a model key, and a consumer with one key; returns its value.
    async fn provision(&self) -> (Admin, String) {
        let mut admin = self.cp.admin().await;
        create_service(&mut admin, "openai", "", "").await;
        create_model_key(&mut admin, "openai-main", OPENAI_KEY, "openai").await;
        create_consumer(&mut admin, "billing-app").await;
        let key = create_bound_key(&mut admin, "billing-prod", "billing-app").await;
        (admin, key)
    }
}

async fn get(envoy: &Envoy, key: &str) -> HttpResponse {
    http_get(
        envoy.listener,
        "/openai/v1/models",
        &[("authorization", &bearer(key))],
    )
    .await
    .unwrap_or_else(|e| panic!("GET through Envoy: {e}\n{}", tail(&envoy.stderr(), 30)))
}

/// Polls (bounded) until a request with `key` gets `status`.
async fn wait_status(envoy: &Envoy, key: &str, status: u16, what: &str) {
    poll_until(Duration::from_secs(10), what, || async {
        (get(envoy, key).await.status == status).then_some(())
    })
    .await;
}

/// The value of the sample of `name` whose labels include every `labels` pair (0 if none).
fn sample(text: &str, name: &str, labels: &[(&str, &str)]) -> f64 {
    text.lines()
        .filter(|l| l.starts_with(&format!("{name}{{")) || l.starts_with(&format!("{name} ")))
        .filter(|l| {
            labels
                .iter()
                .all(|(k, v)| l.contains(&format!("{k}=\"{v}\"")))
        })
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .next()
        .unwrap_or(0.0)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_module_loads_with_a_matched_abi_and_counts_its_decisions() {
    let mut setup = Setup::start().await;
    let metrics_port = common::envoy::free_port();
    setup.files.extra_settings = format!("\"metrics_addr\":\"127.0.0.1:{metrics_port}\"");
    let (_admin, key) = setup.provision().await;
    let upstream = Upstream::start().await;
    let envoy = Envoy::start_module(&setup.files, upstream.addr, &EnvoyRun::module()).await;
    wait_status(&envoy, &key, 200, "the key to be allowed").await;

    // Envoy's stderr is read by a thread of its own: wait (bounded) for the line to arrive.
    let matched = poll_until(
        Duration::from_secs(10),
        "Envoy's ABI handshake line",
        || {
            let text = envoy.stderr();
            async move {
                text.contains("Dynamic module ABI version")
                    .then(|| text.contains("Dynamic module ABI version v0.2.0 matched"))
            }
        },
    )
    .await;
    assert!(
        matched,
        "Envoy must log the ABI handshake as matched:\n{}",
        tail(&envoy.stderr(), 30)
    );
    assert_eq!(
        upstream.last().values("authorization"),
        vec![bearer(OPENAI_KEY)]
    );
    for _ in 0..3 {
        assert_eq!(
            get(&envoy, "kg-not-a-key-0000000000000000").await.status,
            401
        );
    }

    // keygate's own metrics, as `keygate authz` names them, from the module's thread.
    let metrics = std::net::SocketAddr::from(([127, 0, 0, 1], metrics_port));
    let text = http_get(metrics, "/metrics", &[]).await.unwrap().text();
    let checks = |result, reason| {
        sample(
            &text,
            "keygate_checks_total",
            &[("result", result), ("reason", reason)],
        )
    };
    assert!(checks("allowed", "ok") >= 1.0, "{text}");
    assert!(checks("denied", "unknown_key") >= 3.0, "{text}");
    assert!(
        sample(
            &text,
            "keygate_consumer_requests_total",
            &[("consumer", "billing-app"), ("model_service", "openai")]
        ) >= 1.0,
        "{text}"
    );
    assert!(sample(&text, "keygate_check_duration_seconds_count", &[]) >= 4.0);
    assert!(
        sample(&text, "keygate_snapshot_version", &[]) >= 1.0,
        "{text}"
    );
    let ready = http_get(metrics, "/readyz", &[]).await.unwrap();
    assert_eq!(ready.status, 200);
    assert!(ready.text().starts_with("ready version="));
    // And plain totals in Envoy's own stats.
    assert!(envoy.stat("dynamicmodulescustom.keygate_allowed").await >= 1);
    assert!(envoy.stat("dynamicmodulescustom.keygate_denied").await >= 3);

    // What `cargo build -p keygate-envoy` links: the data-plane core, not the store, the
    // admin API or keygate's servers (their crates and source paths are absent).
    let so = std::fs::read(module_dir().join("libkeygate_envoy.so")).unwrap();
    // (Symbol names, as the debug build keeps them: `_ZN7keygate5store…` is keygate::store.)
    // (Needles a codegen-unit hash, [0-9a-z]+, can never contain: a mangled path start or a
    // crate's source directory, never the bare crate name.)
    for absent in [
        "_ZN4sqlx",
        "sqlx-core-",
        "tonic_health",
        "tonic_reflection",
        "7keygate5store",
        "7keygate5admin",
        "7keygate6server",
        "7keygate6secret",
    ] {
        assert!(
            !contains_bytes(&so, absent.as_bytes()),
            "libkeygate_envoy.so contains {absent}"
        );
    }
    // …while the shared decision is in it.
    assert!(contains_bytes(&so, b"7keygate5authz8decision"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_invalid_config_refuses_envoys_load_naming_the_key() {
    let setup = Setup::start().await;
    let upstream = Upstream::start().await;
    for (extra, named) in [
        (
            r#""credential_headers":["bad header"]"#,
            "credential_headers",
        ),
        (r#""client_ip_from":"xff:0""#, "client_ip_from"),
        (r#""colour":"blue""#, "colour"),
    ] {
        let files = ModuleFiles {
            extra_settings: extra.to_string(),
            ..setup.files.clone()
        };
        let err = match Envoy::try_start(
            |listener, admin| render_module(&files, listener, upstream.addr.port(), admin),
            &EnvoyRun::module(),
        )
        .await
        {
            Ok(_) => panic!("Envoy accepted a config with {extra}"),
            Err(e) => e,
        };
        assert!(
            err.contains(named) && err.contains("keygate filter_config"),
            "the refusal names {named}:\n{}",
            tail(&err, 20)
        );
    }
    // A missing master key file is refused too, naming the key.
    let files = ModuleFiles {
        master_key_file: setup.dir.path().join("no-such.key"),
        ..setup.files.clone()
    };
    let err = Envoy::try_start(
        |listener, admin| render_module(&files, listener, upstream.addr.port(), admin),
        &EnvoyRun::module(),
    )
    .await
    .err()
    .expect("Envoy refuses a config whose master key file is missing");
    assert!(err.contains("master_key_file"), "{}", tail(&err, 20));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn with_no_control_plane_and_no_cache_the_module_answers_503_not_ready_never_200() {
    let dir = tempfile::tempdir().unwrap();
    let key_file = dir.path().join("master.key");
    common::split::write_master_key(&key_file);
    let token_file = dir.path().join("subscriber.token");
    common::write_private(&token_file, subscriber_token());
    let files = ModuleFiles {
        // Nothing listens here.
        control_plane: format!("http://127.0.0.1:{}", common::envoy::free_port()),
        master_key_file: key_file,
        data_dir: dir.path().join("module-data"),
        subscriber_token_file: token_file,
        extra_settings: String::new(),
    };
    let upstream = Upstream::start().await;
    let run = EnvoyRun {
        ready_status: 503,
        ..EnvoyRun::module()
    };
    let envoy = Envoy::start_module(&files, upstream.addr, &run).await;
    for key in ["", "kg-anything-0000000000000000000000"] {
        for _ in 0..5 {
            let headers: Vec<(&str, String)> = if key.is_empty() {
                vec![]
            } else {
                vec![("authorization", bearer(key))]
            };
            let headers: Vec<(&str, &str)> =
                headers.iter().map(|(k, v)| (*k, v.as_str())).collect();
            let r = http_get(envoy.listener, "/openai/v1/models", &headers)
                .await
                .unwrap();
            assert_eq!(r.status, 503, "{}", r.text());
            assert_eq!(r.json()["error"]["code"], "keygate_not_ready");
            assert_eq!(r.json()["error"]["type"], "service_unavailable");
        }
    }
    assert_eq!(upstream.count(), 0, "nothing reached the upstream");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn the_module_serves_through_a_control_plane_outage_and_an_envoy_restart_then_catches_up() {
    let mut setup = Setup::start().await;
    let (mut admin, key) = setup.provision().await;
    let second = create_bound_key(&mut admin, "billing-second", "billing-app").await;
    let upstream = Upstream::start().await;
    let mut envoy = Envoy::start_module(&setup.files, upstream.addr, &EnvoyRun::module()).await;
    wait_status(&envoy, &key, 200, "the key to be allowed").await;
    wait_status(&envoy, &second, 200, "the second key to be allowed").await;
    // The module has written its cache (at most every 5 s) and the cache's high-water mark
    // (written right after it; a cache without its mark is refused at start).
    poll_until(
        Duration::from_secs(15),
        "the module's snapshot cache and its high-water mark",
        || async {
            let files = all_file_bytes(&setup.files.data_dir);
            let written = |name: &str| {
                files
                    .iter()
                    .any(|(p, b)| p.file_name().is_some_and(|f| f == name) && !b.is_empty())
            };
            (written("snapshot.cache") && written("snapshot.highwater")).then_some(())
        },
    )
    .await;

    // The control plane goes away: Envoy with the module keeps authorizing.
    setup.cp.kill();
    for _ in 0..5 {
        let r = get(&envoy, &key).await;
        assert_eq!(r.status, 200, "{}", r.text());
        assert_eq!(
            upstream.last().values("authorization"),
            vec![bearer(OPENAI_KEY)]
        );
    }

    // Envoy restarted with the control plane still down: decisions from the module's cache.
    envoy.kill();
    let envoy = Envoy::start_module(&setup.files, upstream.addr, &EnvoyRun::module()).await;
    for _ in 0..5 {
        assert_eq!(get(&envoy, &key).await.status, 200);
    }
    assert_eq!(
        get(&envoy, "kg-not-a-key-0000000000000000").await.status,
        401
    );

    // The control plane comes back; a change made there reaches the running module.
    setup.cp.restart().await;
    let mut admin = setup.cp.admin().await;
    disable_consumer_key(&mut admin, "billing-second").await;
    wait_status(
        &envoy,
        &second,
        401,
        "the module to catch up with the restarted control plane",
    )
    .await;
    assert_eq!(get(&envoy, &key).await.status, 200);

    // No plaintext key in the module's cache or anywhere in Envoy's output.
    let cache = all_file_bytes(&setup.files.data_dir);
    assert!(!cache.is_empty());
    for secret in [OPENAI_KEY, key.as_str(), second.as_str()] {
        for (path, bytes) in &cache {
            assert!(
                !contains_bytes(bytes, secret.as_bytes()),
                "{} holds a key in plaintext",
                path.display()
            );
        }
        let out = envoy.stdout() + &envoy.stderr();
        assert!(
            !out.contains(secret),
            "Envoy's output holds a key in plaintext"
        );
    }
    check_private(&setup.files.data_dir);
}

/// The module's data dir is private to Envoy's user.
fn check_private(dir: &Path) {
    use std::os::unix::fs::PermissionsExt;
    let mode = std::fs::metadata(dir).unwrap().permissions().mode();
    assert_eq!(mode & 0o077, 0, "{} is mode {mode:o}", dir.display());
}

/// `envoy/module.yaml` with its listener twice (the second on `second_port`): two filter
/// configs with the same settings in one Envoy.
fn render_two_listeners(
    files: &ModuleFiles,
    second_port: u16,
    listener: u16,
    upstream: u16,
    admin: u16,
) -> String {
    let c = render_module(files, listener, upstream, admin);
    let start = c.find("  - name: gateway\n").expect("the gateway listener");
    let end = c.find("  clusters:\n").expect("the clusters");
    let second = c[start..end]
        .replacen("  - name: gateway\n", "  - name: gateway2\n", 1)
        .replacen(
            &format!("port_value: {listener}\n"),
            &format!("port_value: {second_port}\n"),
            1,
        );
    format!("{}{second}{}", &c[..end], &c[end..])
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_envoy_process_holds_one_subscription_whatever_its_filter_configs() {
    let setup = Setup::start().await;
    let (_admin, key) = setup.provision().await;
    let upstream = Upstream::start().await;
    let second = common::envoy::free_port();
    let envoy = Envoy::start_rendered_with(
        |listener, admin| {
            render_two_listeners(&setup.files, second, listener, upstream.addr.port(), admin)
        },
        &EnvoyRun::module(),
    )
    .await;
    wait_status(
        &envoy,
        &key,
        200,
        "the key to be allowed on the first listener",
    )
    .await;
    let second_addr = std::net::SocketAddr::from(([127, 0, 0, 1], second));
    let r = http_get(
        second_addr,
        "/openai/v1/models",
        &[("authorization", &bearer(&key))],
    )
    .await
    .unwrap();
    assert_eq!(r.status, 200, "the second listener's filter decides too");

    // The control plane counts its subscribers: this Envoy is one.
    let cp_metrics = common::metrics_addr(&setup.cp.logs());
    let text = http_get(cp_metrics, "/metrics", &[]).await.unwrap().text();
    assert_eq!(sample(&text, "keygate_subscribers", &[]), 1.0, "{text}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dynamic_metadata_can_be_limited_to_the_fields_an_operator_uses() {
    let mut setup = Setup::start().await;
    setup.files.extra_settings = r#""dynamic_metadata":["consumer_id","model_service"]"#.into();
    let (_admin, key) = setup.provision().await;
    let upstream = Upstream::start().await;
    let envoy = Envoy::start_module(&setup.files, upstream.addr, &EnvoyRun::module()).await;
    wait_status(&envoy, &key, 200, "the key to be allowed").await;
    let line = poll_until(
        Duration::from_secs(15),
        "the access log line of an allowed request",
        || async {
            envoy
                .access_log()
                .into_iter()
                .find(|l| l["response_code"] == 200)
        },
    )
    .await;
    assert_eq!(line["model_service"], "openai", "{line}");
    assert!(
        line["consumer_id"]
            .as_str()
            .is_some_and(|id| id.len() == 36),
        "{line}"
    );
    for absent in ["consumer", "consumer_key", "model_key"] {
        assert_ne!(line[absent], "billing-app", "{line}");
        assert!(
            line[absent]
                .as_str()
                .is_none_or(|v| v.is_empty() || v == "-"),
            "{absent} was not asked for: {line}"
        );
    }
    // Denials still say why.
    assert_eq!(
        get(&envoy, "kg-not-a-key-0000000000000000").await.status,
        401
    );
    poll_until(
        Duration::from_secs(15),
        "the denial's deny_reason",
        || async {
            envoy
                .access_log()
                .into_iter()
                .any(|l| l["deny_reason"] == "unknown_key")
                .then_some(())
        },
    )
    .await;
}
