//! The real grpcurl (1.8.6, reflection v1alpha) against a real keygate: service listing by
//! reflection, and the README's operator walkthrough run verbatim.

mod common;

use std::process::Command;

use common::{Keygate, Options, grpcurl_bin};
use keygate::proto::admin::v1::GetConsumerKeyRequest;
use keygate::proto::admin::v1::get_consumer_key_request::Selector;

/// The shell block between the walkthrough markers in README.md.
fn readme_walkthrough() -> String {
    readme_block("walkthrough")
}

/// The shell block between `<!-- {name}:start -->` and `<!-- {name}:end -->` in README.md.
fn readme_block(name: &str) -> String {
    let readme =
        std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/README.md")).unwrap();
    let start = readme
        .find(&format!("<!-- {name}:start -->"))
        .expect("walkthrough start marker");
    let end = readme
        .find(&format!("<!-- {name}:end -->"))
        .expect("walkthrough end marker");
    let block = &readme[start..end];
    let body_start = block.find("```sh\n").expect("sh block") + "```sh\n".len();
    let body_end = block[body_start..].find("```").expect("end of sh block") + body_start;
    block[body_start..body_end].to_string()
}

async fn keygate_in(dir: &std::path::Path) -> Keygate {
    Keygate::start_with(Options {
        data_dir: Some(dir.join("keygate-data")),
        ..Default::default()
    })
    .await
}

/// Runs a script the way an operator would: bash, grpcurl on PATH, in the directory that
/// holds `keygate-data`. The README's admin address is the default port; the test's keygate
/// listens on an ephemeral one, so that address is the only thing substituted.
fn run_script(
    dir: &std::path::Path,
    script: &str,
    admin: std::net::SocketAddr,
) -> (bool, String, String) {
    let script = script.replace("127.0.0.1:9002", &admin.to_string());
    let grpcurl_dir = grpcurl_bin().parent().unwrap().to_path_buf();
    let path = format!(
        "{}:{}",
        grpcurl_dir.display(),
        std::env::var("PATH").unwrap_or_default()
    );
    let out = Command::new("bash")
        .arg("-euo")
        .arg("pipefail")
        .arg("-c")
        .arg(&script)
        .current_dir(dir)
        .env("PATH", path)
        .output()
        .expect("run bash");
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

#[tokio::test]
async fn grpcurl_lists_every_admin_service_by_reflection() {
    let tmp = tempfile::tempdir().unwrap();
    let kg = keygate_in(tmp.path()).await;
    let out = Command::new(grpcurl_bin())
        .args(["-plaintext", &kg.admin_addr.to_string(), "list"])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let listed = String::from_utf8_lossy(&out.stdout);
    for svc in [
        "keygate.admin.v1.KeyAdmin",
        "grpc.health.v1.Health",
        "grpc.reflection.v1.ServerReflection",
        "grpc.reflection.v1alpha.ServerReflection",
    ] {
        assert!(
            listed.lines().any(|l| l.trim() == svc),
            "{svc} missing from:\n{listed}"
        );
    }
    // Methods are described too (grpcurl needs them to build requests).
    let out = Command::new(grpcurl_bin())
        .args([
            "-plaintext",
            &kg.admin_addr.to_string(),
            "describe",
            "keygate.admin.v1.KeyAdmin",
        ])
        .output()
        .unwrap();
    let described = String::from_utf8_lossy(&out.stdout);
    assert!(described.contains("rpc DisableConsumerKey"), "{described}");

    // Health on the ext_authz port answers through reflection too, without a token.
    let out = Command::new(grpcurl_bin())
        .args([
            "-plaintext",
            "-d",
            r#"{"service":"envoy.service.auth.v3.Authorization"}"#,
            &kg.authz_addr.to_string(),
            "grpc.health.v1.Health/Check",
        ])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(String::from_utf8_lossy(&out.stdout).contains("SERVING"));
}

#[tokio::test]
async fn readme_walkthrough_runs_verbatim() {
    let tmp = tempfile::tempdir().unwrap();
    let kg = keygate_in(tmp.path()).await;
    let script = readme_walkthrough();
    assert!(script.contains("CreateConsumerKey") && script.contains("DeleteConsumerKey"));
    let (ok, stdout, stderr) = run_script(tmp.path(), &script, kg.admin_addr);
    assert!(
        ok,
        "walkthrough failed:\nstdout:\n{stdout}\nstderr:\n{stderr}"
    );

    // The create response showed the generated value once; the Get afterwards only the mask.
    let value = stdout
        .lines()
        .find_map(|l| l.trim().strip_prefix("\"value\": \""))
        .map(|v| v.trim_end_matches(['"', ',']).to_string())
        .expect("CreateConsumerKey printed the value");
    assert!(value.starts_with("kg-"), "{value}");
    assert_eq!(
        stdout.matches(&value).count(),
        1,
        "the value is shown exactly once"
    );
    let mask = format!("{}***{}", &value[..5], &value[value.len() - 4..]);
    assert!(
        stdout.contains(&mask),
        "GetConsumerKey shows the mask {mask}"
    );
    assert!(stdout.contains("\"status\": \"DISABLED\""), "{stdout}");
    assert!(
        stdout.contains("\"action\": \"DeleteConsumerKey\""),
        "{stdout}"
    );

    // The walkthrough's last lifecycle step deleted the key.
    let mut admin = kg.admin().await;
    let err = admin
        .get_consumer_key(GetConsumerKeyRequest {
            selector: Some(Selector::Name("billing-prod".into())),
        })
        .await
        .unwrap_err();
    assert_eq!(err.code(), tonic::Code::NotFound);

    // The audit trail lists the walkthrough's mutations, newest first, with actor and action,
    // and no secret value in any event.
    let events = admin
        .list_audit_events(keygate::proto::admin::v1::ListAuditEventsRequest {
            page_size: 100,
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner()
        .items;
    let actions: Vec<&str> = events.iter().map(|e| e.action.as_str()).collect();
    assert_eq!(
        actions,
        [
            "DeleteConsumerKey",
            "UnbindConsumerKey",
            "DisableConsumerKey",
            "BindConsumerKey",
            "CreateConsumerKey",
            "CreateModelKey",
            "CreateModelService",
            "CreateConsumer"
        ]
    );
    let token = kg.admin_token();
    for e in &events {
        assert_eq!(
            e.actor, "bootstrap",
            "the bootstrap token acts as \"bootstrap\": {e:?}"
        );
        assert!(e.time.is_some() && !e.resource_id.is_empty() && !e.resource_name.is_empty());
        let dump = format!("{e:?}");
        for secret in [
            value.as_str(),
            "sk-proj-REPLACE-WITH-YOUR-OPENAI-KEY",
            token.as_str(),
        ] {
            assert!(!dump.contains(secret), "audit event leaks a secret: {dump}");
        }
    }
    let times: Vec<_> = events.iter().map(|e| e.revision).collect();
    assert!(times.windows(2).all(|w| w[0] > w[1]), "newest first");

    // The model key's plaintext never comes back from the API, and no secret reached the logs.
    assert!(!stdout.contains("sk-proj-REPLACE-WITH-YOUR-OPENAI-KEY"));
    let logs = kg.logs();
    assert!(!logs.contains(&value));
    assert!(!logs.contains("sk-proj-REPLACE-WITH-YOUR-OPENAI-KEY"));
    assert!(!logs.contains(&kg.admin_token()));
}

/// README's "a key for gpt-4o-mini only": model entries in scopes, a service model list and
/// model source, as grpcurl shows them.
#[tokio::test]
async fn readme_model_scope_walkthrough_runs_verbatim_with_grpcurl() {
    let tmp = tempfile::tempdir().unwrap();
    let kg = keygate_in(tmp.path()).await;
    let (ok, stdout, stderr) = run_script(
        tmp.path(),
        &readme_block("model-walkthrough"),
        kg.admin_addr,
    );
    assert!(
        ok,
        "model walkthrough failed:\nstdout:\n{stdout}\nstderr:\n{stderr}"
    );
    // The key's scope reads back as written, then widened by the one-list update.
    assert!(stdout.contains("\"openai/gpt-4o-mini\""), "{stdout}");
    assert!(stdout.contains("\"openai/o3-*\""), "{stdout}");
    assert!(stdout.contains("\"anthropic/claude-*\""), "{stdout}");
    assert!(stdout.contains("\"modelSource\": \"PATH\""), "{stdout}");
    assert!(stdout.contains("\"gpt-4.1-*\""), "{stdout}");
    // Services created without a source read BODY, never UNSPECIFIED.
    assert!(stdout.contains("\"modelSource\": \"BODY\""), "{stdout}");
    assert!(!stdout.contains("MODEL_SOURCE_UNSPECIFIED"), "{stdout}");
}

/// README's "rotate a key without downtime": an AUTO key rotated with an hour's overlap (the
/// new value printed once, Get showing the previous mask and expiry), a CUSTOM key with "0s".
#[tokio::test]
async fn readme_rotation_walkthrough_runs_verbatim_with_grpcurl() {
    let tmp = tempfile::tempdir().unwrap();
    let kg = keygate_in(tmp.path()).await;
    let (ok, stdout, stderr) = run_script(
        tmp.path(),
        &readme_block("rotation-walkthrough"),
        kg.admin_addr,
    );
    assert!(
        ok,
        "rotation walkthrough failed:\nstdout:\n{stdout}\nstderr:\n{stderr}"
    );
    // Two AUTO values printed (create, rotate), then Get with the previous value's fields.
    assert_eq!(stdout.matches("\"value\": \"kg-").count(), 2, "{stdout}");
    assert!(stdout.contains("\"previousMaskedValue\""), "{stdout}");
    assert!(stdout.contains("\"previousValueExpireTime\""), "{stdout}");
    let mut admin = kg.admin().await;
    let get = |name: &str| GetConsumerKeyRequest {
        selector: Some(Selector::Name(name.into())),
    };
    let k = admin
        .get_consumer_key(get("billing-prod"))
        .await
        .unwrap()
        .into_inner();
    let (expire, updated) = (
        k.previous_value_expire_time.unwrap(),
        k.update_time.unwrap(),
    );
    assert_eq!(
        (expire.seconds, expire.nanos),
        (updated.seconds + 3600, updated.nanos)
    );
    // "0s": the CUSTOM key has a new value and no previous one.
    let p = admin
        .get_consumer_key(get("partner"))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(
        p.masked_value,
        keygate::domain::mask("partner-value-2026-9876543210")
    );
    assert_eq!(p.previous_masked_value, "");
    assert!(p.previous_value_expire_time.is_none());
    for v in [
        "partner-value-2025-0123456789",
        "partner-value-2026-9876543210",
    ] {
        assert!(!stdout.contains(v), "a CUSTOM value is never printed back");
    }
}

#[tokio::test]
async fn grpcurl_shows_field_violations_and_missing_token_refusals() {
    let tmp = tempfile::tempdir().unwrap();
    let kg = keygate_in(tmp.path()).await;
    let (ok, _stdout, stderr) = run_script(
        tmp.path(),
        r#"TOKEN=$(cat keygate-data/admin.token)
grpcurl -plaintext -H "authorization: Bearer $TOKEN" -d '{"name":"1-bad"}' 127.0.0.1:9002 keygate.admin.v1.KeyAdmin/CreateConsumer"#,
        kg.admin_addr,
    );
    assert!(!ok);
    assert!(stderr.contains("InvalidArgument"), "{stderr}");
    assert!(
        stderr.contains("google.rpc.BadRequest") && stderr.contains("\"field\":\"name\""),
        "{stderr}"
    );

    let (ok, _stdout, stderr) = run_script(
        tmp.path(),
        r#"grpcurl -plaintext -d '{}' 127.0.0.1:9002 keygate.admin.v1.KeyAdmin/ListConsumers"#,
        kg.admin_addr,
    );
    assert!(!ok);
    assert!(stderr.contains("Unauthenticated"), "{stderr}");
}

/// README's "who spent what": prices set and replaced with grpcurl, then (after a data
/// plane's usage report, sent here through the distribution API as a data plane sends it) the
/// README's GetUsage queries show the tokens and the exact cost.
#[tokio::test]
async fn readme_usage_walkthrough_runs_verbatim_with_grpcurl() {
    use keygate::proto::admin::v1 as pb;
    use keygate::proto::snapshot::v1 as spb;
    use keygate::proto::snapshot::v1::snapshot_distribution_client::SnapshotDistributionClient;

    const SUBSCRIBER_TOKEN: &str = "readme-usage-subscriber-token-0123456789";
    let tmp = tempfile::tempdir().unwrap();
    let kg = Keygate::start_with(Options {
        data_dir: Some(tmp.path().join("keygate-data")),
        env: vec![("KEYGATE_SUBSCRIBER_TOKEN".into(), SUBSCRIBER_TOKEN.into())],
        ..Default::default()
    })
    .await;
    let setup = readme_block("usage-walkthrough");
    let (ok, stdout, stderr) = run_script(tmp.path(), &setup, kg.admin_addr);
    assert!(
        ok,
        "usage walkthrough failed:\nstdout:\n{stdout}\nstderr:\n{stderr}"
    );
    // Prices read back in canonical decimal form, the replaced list with its third entry.
    assert!(stdout.contains("\"o3*\""), "{stdout}");
    assert!(
        stdout.contains("\"cachedInputPerMtok\": \"0.5\""),
        "{stdout}"
    );

    // 1,000 input tokens (200 cached) and 500 output tokens of gpt-4o-mini on reporting-1.
    let mut admin = kg.admin().await;
    let key = admin
        .get_consumer_key(GetConsumerKeyRequest {
            selector: Some(Selector::Name("reporting-1".into())),
        })
        .await
        .unwrap()
        .into_inner();
    let service = admin
        .get_model_service(pb::GetModelServiceRequest {
            selector: Some(pb::get_model_service_request::Selector::Name(
                "openai".into(),
            )),
        })
        .await
        .unwrap()
        .into_inner();
    let channel = tonic::transport::Channel::from_shared(format!("http://{}", kg.admin_addr))
        .unwrap()
        .connect()
        .await
        .unwrap();
    let uuid = |s: &str| uuid::Uuid::parse_str(s).unwrap().as_bytes().to_vec();
    let mut report = tonic::Request::new(spb::UsageReport {
        data_plane_id: uuid::Uuid::new_v4().as_bytes().to_vec(),
        sequence: 1,
        time_us: keygate::domain::Timestamp::now().0,
        metered: vec![spb::MeteredUsage {
            consumer_key_id: uuid(&key.id),
            consumer_id: uuid(&key.consumer_id),
            model_service_id: uuid(&service.id),
            model: "gpt-4o-mini".into(),
            requests: 3,
            input_tokens: 1000,
            output_tokens: 500,
            cached_input_tokens: 200,
            ..Default::default()
        }],
        ..Default::default()
    });
    report.metadata_mut().insert(
        "authorization",
        format!("Bearer {SUBSCRIBER_TOKEN}").parse().unwrap(),
    );
    let answer = SnapshotDistributionClient::new(channel)
        .report_usage(report)
        .await
        .unwrap()
        .into_inner();
    assert!(answer.metered_applied);

    // The query block, with the walkthrough's `kg` helper (its first lines).
    let helper: String = setup.split("\n\n").next().unwrap().to_string();
    let query = format!("{helper}\n{}", readme_block("usage-query"));
    let (ok, stdout, stderr) = run_script(tmp.path(), &query, kg.admin_addr);
    assert!(
        ok,
        "usage queries failed:\nstdout:\n{stdout}\nstderr:\n{stderr}"
    );
    // (800 × 0.15 + 200 × 0.075 + 500 × 0.60) / 1,000,000 USD, exactly, in both queries.
    assert_eq!(
        stdout.matches("\"costUsd\": \"0.000435\"").count(),
        2,
        "{stdout}"
    );
    assert!(
        stdout.contains("\"consumer\": \"reporting-app\""),
        "{stdout}"
    );
    assert!(
        stdout.contains("\"consumerKey\": \"reporting-1\""),
        "{stdout}"
    );
    assert!(stdout.contains("\"inputTokens\": \"1000\""), "{stdout}");
    assert!(
        stdout.contains("\"cachedInputTokens\": \"200\""),
        "{stdout}"
    );
}
