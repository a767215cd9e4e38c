//! Operator identities (SPEC §9) through the real grpcurl: named admin tokens with roles, the
//! role matrix, revocation, expiry, the audit actor, the bootstrap token and
//! `--no-bootstrap-token`, and that a token's value is shown once and nowhere else. Runs on
//! SQLite and (KEYGATE_TEST_STORE=postgres) on PostgreSQL.

mod common;

use std::process::Command;
use std::time::Duration;

use common::postgres::{drop_postgres_database, fresh_postgres_database};
use common::{Keygate, Options, Proc, grpcurl_bin, poll_until, postgres_for};
use keygate::admin::AdminAuth;
use keygate::crypto::MasterKey;
use keygate::domain::{Limits, NewAdminToken, Role, Timestamp};
use keygate::store::{Actor, Store};
use serde_json::{Value, json};

/// One grpcurl call as an operator types it; `Ok(json)` or `Err(stderr)`.
fn call(kg: &Keygate, token: &str, method: &str, body: Value) -> Result<Value, String> {
    let out = Command::new(grpcurl_bin())
        .args([
            "-plaintext",
            "-H",
            &format!("authorization: Bearer {token}"),
        ])
        .args(["-d", &body.to_string(), &kg.admin_addr.to_string()])
        .arg(format!("keygate.admin.v1.KeyAdmin/{method}"))
        .output()
        .expect("run grpcurl");
    if out.status.success() {
        Ok(serde_json::from_slice(&out.stdout).expect("grpcurl prints JSON"))
    } else {
        Err(String::from_utf8_lossy(&out.stderr).into_owned())
    }
}

fn ok(kg: &Keygate, token: &str, method: &str, body: Value) -> Value {
    call(kg, token, method, body).unwrap_or_else(|e| panic!("{method} failed: {e}"))
}

/// The call fails with `code` (grpcurl's spelling, e.g. "PermissionDenied"); answers stderr.
fn refused(kg: &Keygate, token: &str, method: &str, body: Value, code: &str) -> String {
    match call(kg, token, method, body) {
        Ok(v) => panic!("{method} succeeded, expected {code}: {v}"),
        Err(e) => {
            assert!(e.contains(&format!("Code: {code}")), "{method}: {e}");
            e
        }
    }
}

/// Creates a named token; answers (the whole response as printed, its value).
fn create_token(kg: &Keygate, by: &str, name: &str, role: &str) -> (String, String) {
    let out = ok(
        kg,
        by,
        "CreateAdminToken",
        json!({"name": name, "role": role}),
    );
    let value = out["value"]
        .as_str()
        .expect("value shown at create")
        .to_string();
    (out.to_string(), value)
}

fn actors(kg: &Keygate, token: &str) -> Vec<(String, String)> {
    let out = ok(kg, token, "ListAuditEvents", json!({}));
    out["items"]
        .as_array()
        .unwrap()
        .iter()
        .map(|e| {
            let s = |k: &str| e[k].as_str().unwrap_or_default().to_string();
            (s("action"), s("actor"))
        })
        .collect()
}

#[tokio::test]
async fn roles_allow_what_they_name_and_refuse_the_rest_with_permission_denied() {
    let kg = Keygate::start().await;
    let boot = kg.admin_token();
    let (_, viewer) = create_token(&kg, &boot, "vera", "VIEWER");
    let (_, operator) = create_token(&kg, &boot, "otto", "OPERATOR");
    let (_, admin) = create_token(&kg, &boot, "ada", "ADMIN");
    for v in [&viewer, &operator, &admin] {
        assert!(v.starts_with("kga-"), "recognisable prefix: {v}");
    }

    // OPERATOR runs the key lifecycle.
    ok(&kg, &operator, "CreateConsumer", json!({"name": "app"}));
    ok(
        &kg,
        &operator,
        "CreateConsumerKey",
        json!({"name": "k1", "consumer": "app"}),
    );
    // VIEWER reads, and nothing else.
    for (method, body) in [
        ("ListConsumers", json!({})),
        ("GetConsumerKey", json!({"name": "k1"})),
        (
            "GetKeyReferences",
            json!({"kind": "CONSUMER_KEY", "name": "k1"}),
        ),
        ("ListAuditEvents", json!({})),
        ("GetSnapshotStatus", json!({})),
        ("GetUsage", json!({"group_by": ["consumer_key", "model"]})),
    ] {
        ok(&kg, &viewer, method, body);
    }
    // Rotating a key and changing its budget are the key lifecycle: OPERATOR's.
    let budget = json!({"name": "k1", "consumer_key": {"limits": {"requests_per_minute": 5}},
                        "update_mask": {"paths": ["limits"]}});
    for (method, body) in [
        ("RotateConsumerKey", json!({"name": "k1"})),
        ("UpdateConsumerKey", budget.clone()),
    ] {
        let e = refused(&kg, &viewer, method, body.clone(), "PermissionDenied");
        assert!(e.contains("needs role OPERATOR"), "{method}: {e}");
        ok(&kg, &operator, method, body);
    }
    let e = refused(
        &kg,
        &viewer,
        "DisableConsumerKey",
        json!({"name": "k1"}),
        "PermissionDenied",
    );
    assert!(e.contains("needs role OPERATOR"), "{e}");
    refused(
        &kg,
        &viewer,
        "ListAdminTokens",
        json!({}),
        "PermissionDenied",
    );
    ok(&kg, &operator, "DisableConsumerKey", json!({"name": "k1"}));
    // Admin tokens are ADMIN's alone.
    let e = refused(
        &kg,
        &operator,
        "CreateAdminToken",
        json!({"name": "x", "role": "VIEWER"}),
        "PermissionDenied",
    );
    assert!(e.contains("needs role ADMIN"), "{e}");
    refused(
        &kg,
        &operator,
        "RevokeAdminToken",
        json!({"name": "vera"}),
        "PermissionDenied",
    );
    create_token(&kg, &admin, "second-admin", "ADMIN");
    ok(&kg, &admin, "EnableConsumerKey", json!({"name": "k1"}));

    // The audit actor is the credential's name; the bootstrap token is "bootstrap".
    let trail = actors(&kg, &viewer);
    let expect = |action: &str, actor: &str| {
        assert!(
            trail.iter().any(|(a, b)| a == action && b == actor),
            "{action} by {actor} in {trail:?}"
        );
    };
    expect("CreateAdminToken", "bootstrap");
    expect("CreateConsumer", "otto");
    expect("DisableConsumerKey", "otto");
    expect("CreateAdminToken", "ada");
    expect("EnableConsumerKey", "ada");
    assert!(
        !trail.iter().any(|(_, actor)| actor == "vera"),
        "reads are not audited"
    );
}

#[tokio::test]
async fn a_token_value_is_shown_once_and_never_in_list_audit_or_logs() {
    let kg = Keygate::start().await;
    let boot = kg.admin_token();
    let (created, value) = create_token(&kg, &boot, "carol", "OPERATOR");
    assert!(created.contains("maskedValue"), "{created}");
    ok(&kg, &value, "CreateConsumer", json!({"name": "used-once"}));
    let list = ok(&kg, &boot, "ListAdminTokens", json!({}));
    let items = list["items"].as_array().unwrap();
    assert_eq!(items.len(), 1, "{list}");
    let t = &items[0];
    assert_eq!(
        (t["name"].as_str(), t["role"].as_str()),
        (Some("carol"), Some("OPERATOR"))
    );
    let masked = t["maskedValue"].as_str().unwrap();
    assert!(
        masked.starts_with("kga-") && masked.contains("***"),
        "{masked}"
    );
    assert!(
        t["createTime"].is_string() && t["lastUsedTime"].is_string(),
        "{t}"
    );
    let audit = ok(
        &kg,
        &boot,
        "ListAuditEvents",
        json!({"kind": "ADMIN_TOKEN"}),
    );
    let events = audit["items"].as_array().unwrap();
    assert_eq!(events.len(), 1, "{audit}");
    assert_eq!(events[0]["action"], "CreateAdminToken");
    assert_eq!(events[0]["resourceName"], "carol");
    for (what, text) in [
        ("ListAdminTokens", list.to_string()),
        ("ListAuditEvents", audit.to_string()),
        ("the logs", kg.logs()),
    ] {
        assert!(!text.contains(&value), "{what} shows the token value");
    }
    // Same name twice, a past expiry, a missing role.
    refused(
        &kg,
        &boot,
        "CreateAdminToken",
        json!({"name": "carol", "role": "VIEWER"}),
        "AlreadyExists",
    );
    let past = json!({"name": "late", "role": "VIEWER", "expire_time": "2020-01-01T00:00:00Z"});
    refused(&kg, &boot, "CreateAdminToken", past, "InvalidArgument");
    refused(
        &kg,
        &boot,
        "CreateAdminToken",
        json!({"name": "norole"}),
        "InvalidArgument",
    );
}

#[tokio::test]
async fn revoked_unknown_and_expired_tokens_are_unauthenticated() {
    let kg = Keygate::start().await;
    let boot = kg.admin_token();
    let (_, by_name) = create_token(&kg, &boot, "temp", "VIEWER");
    let (created, by_id) = create_token(&kg, &boot, "temp2", "VIEWER");
    // Used first, so the cache holds them when they are revoked.
    ok(&kg, &by_name, "ListConsumers", json!({}));
    ok(&kg, &by_id, "ListConsumers", json!({}));
    ok(&kg, &boot, "RevokeAdminToken", json!({"name": "temp"}));
    let id = serde_json::from_str::<Value>(&created).unwrap()["token"]["id"]
        .as_str()
        .unwrap()
        .to_string();
    ok(&kg, &boot, "RevokeAdminToken", json!({"id": id}));
    refused(&kg, &by_name, "ListConsumers", json!({}), "Unauthenticated");
    refused(&kg, &by_id, "ListConsumers", json!({}), "Unauthenticated");
    refused(
        &kg,
        &boot,
        "RevokeAdminToken",
        json!({"name": "temp"}),
        "NotFound",
    );
    refused(
        &kg,
        "kga-not-a-token-at-all-0123456789",
        "ListConsumers",
        json!({}),
        "Unauthenticated",
    );
    let trail = actors(&kg, &boot);
    assert_eq!(
        trail
            .iter()
            .filter(|(a, _)| a == "RevokeAdminToken")
            .count(),
        2
    );

    // Expiry on a running server: a token that expires two seconds from now stops working.
    let soon = Timestamp(Timestamp::now().0 + 2_000_000);
    let expire = humantime::format_rfc3339_seconds(soon.to_system()).to_string();
    let out = ok(
        &kg,
        &boot,
        "CreateAdminToken",
        json!({"name": "brief", "role": "VIEWER", "expire_time": expire}),
    );
    let brief = out["value"].as_str().unwrap().to_string();
    poll_until(Duration::from_secs(30), "the token to expire", || async {
        call(&kg, &brief, "ListConsumers", json!({}))
            .err()
            .filter(|e| e.contains("Code: Unauthenticated") && e.contains("expired"))
    })
    .await;
}

/// Expiry with time as an input: the same token is accepted before its expiry instant and
/// refused from it, without waiting.
#[tokio::test]
async fn expiry_is_decided_by_the_time_given() {
    let tmp = tempfile::tempdir().unwrap();
    let url = format!("sqlite://{}", tmp.path().join("store.db").display());
    let master = MasterKey::generate();
    let store = Store::open(
        &url,
        &master.fingerprint(),
        master.keys(),
        Limits::default(),
    )
    .await
    .unwrap();
    let expire = Timestamp(Timestamp::now().0 + 3_600_000_000);
    let new = NewAdminToken {
        name: "hour".into(),
        role: Role::Operator,
        expire_time: Some(expire),
    };
    let (_, value) = store
        .create_admin_token(&Actor("bootstrap".into()), new)
        .await
        .unwrap();
    let auth = AdminAuth::new(store.clone(), None, None);
    let before = auth
        .identify(value.expose(), Timestamp(expire.0 - 1))
        .await
        .unwrap();
    assert_eq!(
        (before.name.as_str(), before.role),
        ("hour", Role::Operator)
    );
    let at = auth.identify(value.expose(), expire).await.unwrap_err();
    assert_eq!(at.code(), tonic::Code::Unauthenticated);
    assert!(at.message().contains("expired"), "{}", at.message());
}

#[tokio::test]
async fn no_bootstrap_token_needs_a_named_admin_and_then_turns_the_bootstrap_token_off() {
    let tmp = tempfile::tempdir().unwrap();
    let data_dir = tmp.path().join("data");
    let opts = Options {
        data_dir: Some(data_dir.clone()),
        ..Default::default()
    };

    // A fresh store has no named ADMIN: refused at start, exit 64.
    let mut args: Vec<String> = ["serve", "--data-dir", &data_dir.display().to_string()]
        .map(String::from)
        .into();
    args.extend(["--authz-addr", "127.0.0.1:0", "--admin-addr", "127.0.0.1:0"].map(String::from));
    args.push("--no-bootstrap-token".into());
    if std::env::var("KEYGATE_TEST_STORE").as_deref() == Ok("postgres") {
        args.push("--store".into());
        args.push(postgres_for(&data_dir).await);
    }
    let mut refused_start = Proc::spawn("keygate", &args, &[]);
    let code = refused_start.wait_exit(Duration::from_secs(30)).await;
    assert_eq!(code, Some(64), "{}", refused_start.logs());
    assert!(
        refused_start.logs().contains("no named ADMIN token"),
        "{}",
        refused_start.logs()
    );

    // With the bootstrap token, create a named ADMIN (and a VIEWER that expires at once is
    // not enough: only an unexpired ADMIN counts).
    let mut kg = Keygate::start_with(opts.clone()).await;
    let boot = kg.admin_token();
    let (_, root) = create_token(&kg, &boot, "root", "ADMIN");
    assert_eq!(kg.stop(), Some(0));

    let kg = Keygate::start_with(Options {
        args: vec!["--no-bootstrap-token".into()],
        ..opts
    })
    .await;
    refused(&kg, &boot, "ListConsumers", json!({}), "Unauthenticated");
    ok(
        &kg,
        &root,
        "CreateConsumer",
        json!({"name": "after-bootstrap"}),
    );
    let trail = actors(&kg, &root);
    assert_eq!(trail[0], ("CreateConsumer".to_string(), "root".to_string()));
}

/// Two control planes on one PostgreSQL store: a token revoked through one stops working on
/// the other although the other had it cached, well within the cache's 30 s bound (the
/// revision change delivered by LISTEN empties the cache).
#[tokio::test]
async fn a_revoke_through_one_replica_reaches_another_replicas_cache() {
    let url = fresh_postgres_database("kg_identities").await;
    let master = MasterKey::generate();
    let fingerprint = master.fingerprint();
    let open = || Store::open(&url, &fingerprint, master.keys(), Limits::default());
    let (a, b) = (open().await.unwrap(), open().await.unwrap());
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    tokio::spawn(b.clone().listen_for_changes(async move {
        let _ = stopped.await;
    }));
    let boot = Actor("bootstrap".into());
    let new = |name: &str| NewAdminToken {
        name: name.into(),
        role: Role::Viewer,
        expire_time: None,
    };
    // B hears A's commits (LISTEN is up) before the token under test is cached: A commits a
    // probe until B has seen one (LISTEN may start after the first).
    let commits = b.subscribe_commits();
    let probes = std::sync::atomic::AtomicUsize::new(0);
    poll_until(
        Duration::from_secs(30),
        "replica B to hear A's commits",
        || async {
            let n = probes.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
            if n > 0 && *commits.borrow() > 0 {
                return Some(());
            }
            let probe = new(&format!("probe-{n}"));
            a.create_admin_token(&boot, probe).await.unwrap();
            None
        },
    )
    .await;
    let (_, value) = a.create_admin_token(&boot, new("shared")).await.unwrap();
    let auth_b = AdminAuth::new(b.clone(), None, None);
    let who = poll_until(Duration::from_secs(10), "B to know the token", || async {
        auth_b.identify(value.expose(), Timestamp::now()).await.ok()
    })
    .await;
    assert_eq!(who.name, "shared");
    a.revoke_admin_token(&boot, &keygate::domain::Selector::Name("shared".into()))
        .await
        .unwrap();
    let refused = poll_until(
        Duration::from_secs(10),
        "B to refuse the revoked token",
        || {
            let auth = auth_b.clone();
            let value = value.expose().to_string();
            async move { auth.identify(&value, Timestamp::now()).await.err() }
        },
    )
    .await;
    assert_eq!(refused.code(), tonic::Code::Unauthenticated);
    let _ = stop.send(());
    a.close().await;
    b.close().await;
    drop_postgres_database(&url).await;
}

/// The real grpcurl over mTLS, presenting `<cert>.pem` and, when given, a token.
fn call_tls(
    kg: &Keygate,
    dir: &std::path::Path,
    cert: &str,
    token: Option<&str>,
    method: &str,
    body: Value,
) -> Result<Value, String> {
    let p = |f: String| dir.join(f).display().to_string();
    let mut cmd = Command::new(grpcurl_bin());
    cmd.args(["-cacert", &p("ca.pem".into()), "-servername", "localhost"])
        .args([
            "-cert",
            &p(format!("{cert}.pem")),
            "-key",
            &p(format!("{cert}.key")),
        ]);
    if let Some(t) = token {
        cmd.args(["-H", &format!("authorization: Bearer {t}")]);
    }
    let out = cmd
        .args(["-d", &body.to_string(), &kg.admin_addr.to_string()])
        .arg(format!("keygate.admin.v1.KeyAdmin/{method}"))
        .output()
        .expect("run grpcurl");
    if out.status.success() {
        Ok(serde_json::from_slice(&out.stdout).expect("grpcurl prints JSON"))
    } else {
        Err(String::from_utf8_lossy(&out.stderr).into_owned())
    }
}

/// A CA and, signed by it, the server's certificate and three client certificates: one
/// mapped by SAN, one by subject CN, one not mapped.
fn mtls_pki(dir: &std::path::Path) {
    use rcgen::{BasicConstraints, CertificateParams, DnType, IsCa, Issuer, KeyPair};
    let ca_key = KeyPair::generate().unwrap();
    let mut ca = CertificateParams::new(Vec::<String>::new()).unwrap();
    ca.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    std::fs::write(dir.join("ca.pem"), ca.self_signed(&ca_key).unwrap().pem()).unwrap();
    let issuer = Issuer::new(ca, ca_key);
    for (name, cn, san) in [
        ("server", "keygate", "localhost"),
        ("ops", "someone", "ops.example"),
        ("viewer", "vee.person", "unmapped.example"),
        ("stranger", "stranger", "stranger.example"),
    ] {
        let key = KeyPair::generate().unwrap();
        let mut params = CertificateParams::new(vec![san.to_string()]).unwrap();
        params.distinguished_name.push(DnType::CommonName, cn);
        let cert = params.signed_by(&key, &issuer).unwrap();
        std::fs::write(dir.join(format!("{name}.pem")), cert.pem()).unwrap();
        std::fs::write(dir.join(format!("{name}.key")), key.serialize_pem()).unwrap();
    }
}

#[tokio::test]
async fn admin_identities_map_client_certificates_to_names_and_roles() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path();
    mtls_pki(dir);
    let ids = dir.join("admin-identities");
    std::fs::write(
        &ids,
        "# match            name      role\nsan:ops.example    ops-cert  OPERATOR\ncn:vee.person      vee       VIEWER\n",
    )
    .unwrap();
    let f = |n: &str| dir.join(n).display().to_string();
    let tls: Vec<String> = vec![
        "--tls-cert".into(),
        f("server.pem"),
        "--tls-key".into(),
        f("server.key"),
        "--tls-client-ca".into(),
        f("ca.pem"),
        "--admin-identities".into(),
        f("admin-identities"),
    ];
    let kg = Keygate::start_with(Options {
        args: tls.clone(),
        ..Default::default()
    })
    .await;
    let call = |cert: &str, token: Option<&str>, method: &str, body: Value| {
        call_tls(&kg, dir, cert, token, method, body)
    };
    // Mapped by SAN: an OPERATOR, no token needed; the audit actor is the mapped name.
    call("ops", None, "CreateConsumer", json!({"name": "by-cert"})).unwrap();
    // Mapped by CN: a VIEWER reads and may not write.
    let listed = call("viewer", None, "ListConsumers", json!({})).unwrap();
    assert_eq!(listed["items"][0]["name"], "by-cert");
    let e = call("viewer", None, "CreateConsumer", json!({"name": "x"})).unwrap_err();
    assert!(
        e.contains("Code: PermissionDenied") && e.contains("OPERATOR"),
        "{e}"
    );
    // Not mapped: a token is still needed, and still works.
    let e = call("stranger", None, "ListConsumers", json!({})).unwrap_err();
    assert!(e.contains("Code: Unauthenticated"), "{e}");
    let boot = kg.admin_token();
    let trail = call("stranger", Some(&boot), "ListAuditEvents", json!({})).unwrap();
    assert_eq!(trail["items"][0]["actor"], "ops-cert", "{trail}");

    // The mapping without verified client certificates means nothing: refused at start.
    let data_dir = dir.join("no-ca");
    let mut args: Vec<String> = ["serve", "--data-dir", &data_dir.display().to_string()]
        .map(String::from)
        .into();
    args.extend(["--authz-addr", "127.0.0.1:0", "--admin-addr", "127.0.0.1:0"].map(String::from));
    args.extend(["--admin-identities".to_string(), f("admin-identities")]);
    let mut refused_start = Proc::spawn("keygate", &args, &[]);
    let code = refused_start.wait_exit(Duration::from_secs(30)).await;
    assert_eq!(code, Some(64), "{}", refused_start.logs());
    assert!(
        refused_start.logs().contains("--tls-client-ca"),
        "{}",
        refused_start.logs()
    );
}
