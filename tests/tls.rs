//! TLS between data planes and control planes: a control plane with `--tls-cert/--tls-key`
//! and `--tls-client-ca` (mTLS); a data plane with `--control-plane https://…`,
//! `--control-plane-ca`, `--client-cert`, `--client-key` syncs and authorizes; one without a
//! client certificate never gets a snapshot; the Envoy module with the same settings as
//! `filter_config` keys syncs and authorizes.

mod common;

use std::path::Path;
use std::time::Duration;

use common::envoy::{Envoy, EnvoyRun, ModuleFiles, Upstream, free_port, http_get};
use common::{Proc, poll_until};
use envoy_types::pb::envoy::service::auth::v3::authorization_client::AuthorizationClient;
use keygate::proto::admin::v1 as pb;
use keygate::proto::admin::v1::key_admin_client::KeyAdminClient;
use rcgen::{BasicConstraints, CertificateParams, IsCa, Issuer, KeyPair};
use tonic::transport::{Certificate, ClientTlsConfig, Endpoint, Identity};

struct Pki {
    ca: String,
}

/// Writes `<name>.pem` and `<name>.key` signed by the CA; returns (cert, key) PEM.
fn issue(dir: &Path, name: &str, sans: Vec<String>, ca: &Issuer<'_, KeyPair>) -> (String, String) {
    let key = KeyPair::generate().unwrap();
    let cert = CertificateParams::new(sans)
        .unwrap()
        .signed_by(&key, ca)
        .unwrap();
    let (c, k) = (cert.pem(), key.serialize_pem());
    std::fs::write(dir.join(format!("{name}.pem")), &c).unwrap();
    std::fs::write(dir.join(format!("{name}.key")), &k).unwrap();
    (c, k)
}

fn pki(dir: &Path) -> (Pki, (String, String)) {
    let ca_key = KeyPair::generate().unwrap();
    let mut params = CertificateParams::new(Vec::<String>::new()).unwrap();
    params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    let ca_cert = params.self_signed(&ca_key).unwrap();
    std::fs::write(dir.join("ca.pem"), ca_cert.pem()).unwrap();
    let issuer = Issuer::new(params, ca_key);
    issue(dir, "server", vec!["localhost".into()], &issuer);
    let admin = issue(dir, "admin", vec!["operator".into()], &issuer);
    issue(dir, "dp", vec!["data-plane".into()], &issuer);
    (Pki { ca: ca_cert.pem() }, admin)
}

fn s(p: &Path) -> String {
    p.display().to_string()
}

#[tokio::test]
async fn data_planes_sync_over_mtls_and_need_a_client_certificate() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path();
    let (pki, (admin_cert, admin_key)) = pki(dir);
    let token = "subscriber-token-0123456789abcdef".to_string();
    let cp_port = free_port();
    let cp_dir = dir.join("cp");
    let mut cp = Proc::spawn(
        "control plane",
        &[
            "control-plane".into(),
            "--data-dir".into(),
            s(&cp_dir),
            "--admin-addr".into(),
            format!("127.0.0.1:{cp_port}"),
            "--tls-cert".into(),
            s(&dir.join("server.pem")),
            "--tls-key".into(),
            s(&dir.join("server.key")),
            "--tls-client-ca".into(),
            s(&dir.join("ca.pem")),
        ],
        &[("KEYGATE_SUBSCRIBER_TOKEN".into(), token.clone())],
    );
    cp.wait_ready().await;

    // The admin API is behind the same mTLS listener.
    let channel = Endpoint::from_shared(format!("https://localhost:{cp_port}"))
        .unwrap()
        .tls_config(
            ClientTlsConfig::new()
                .ca_certificate(Certificate::from_pem(&pki.ca))
                .identity(Identity::from_pem(&admin_cert, &admin_key)),
        )
        .unwrap()
        .connect()
        .await
        .expect("admin over mTLS");
    let admin_token = common::read_admin_token(&cp_dir);
    let mut admin =
        KeyAdminClient::with_interceptor(channel, common::BearerToken(Some(admin_token)));
    admin
        .create_model_service(pb::CreateModelServiceRequest {
            name: "openai".into(),
            ..Default::default()
        })
        .await
        .unwrap();
    admin
        .create_model_key(pb::CreateModelKeyRequest {
            name: "vendor".into(),
            generation_method: pb::GenerationMethod::Custom as i32,
            value: "sk-vendor-0123456789abcdef".into(),
            model_services: vec!["openai".into()],
            ..Default::default()
        })
        .await
        .unwrap();
    admin
        .create_consumer(pb::CreateConsumerRequest {
            name: "app".into(),
            ..Default::default()
        })
        .await
        .unwrap();
    let value = admin
        .create_consumer_key(pb::CreateConsumerKeyRequest {
            name: "app-key".into(),
            consumer: "app".into(),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner()
        .value;

    let dp_args = |name: &str, with_cert: bool| {
        let mut a = vec![
            "authz".to_string(),
            "--control-plane".into(),
            format!("https://localhost:{cp_port}"),
            "--control-plane-ca".into(),
            s(&dir.join("ca.pem")),
            "--authz-addr".into(),
            "127.0.0.1:0".into(),
            "--data-dir".into(),
            s(&dir.join(name)),
            "--master-key-file".into(),
            s(&cp_dir.join("master.key")),
        ];
        if with_cert {
            a.extend([
                "--client-cert".into(),
                s(&dir.join("dp.pem")),
                "--client-key".into(),
                s(&dir.join("dp.key")),
            ]);
        }
        a
    };
    let env = [("KEYGATE_SUBSCRIBER_TOKEN".to_string(), token)];
    let mut dp = Proc::spawn("data plane", &dp_args("dp", true), &env);
    dp.wait_ready().await;
    let mut authz = AuthorizationClient::connect(format!("http://{}", dp.authz_addr.unwrap()))
        .await
        .unwrap();
    poll_until(
        Duration::from_secs(15),
        "the data plane to authorize over mTLS",
        || {
            let mut authz = authz.clone();
            let req = keygate::bench::check_request(&value, "openai", "127.0.0.1");
            async move {
                let r = authz.check(req).await.ok()?.into_inner();
                (r.status.map(|s| s.code) == Some(0)).then_some(())
            }
        },
    )
    .await;
    let _ = authz
        .check(keygate::bench::check_request(&value, "openai", "127.0.0.1"))
        .await;

    // Without a client certificate the handshake fails: no snapshot, never an allow.
    let dp_metrics = free_port();
    let mut args = dp_args("dp-nocert", false);
    args.extend(["--metrics-addr".into(), format!("127.0.0.1:{dp_metrics}")]);
    let mut bad = Proc::spawn("data plane without a client cert", &args, &env);
    bad.wait_ready().await;
    poll_until(
        Duration::from_secs(15),
        "the refused subscription to be logged",
        || {
            let logs = bad.logs();
            async move {
                (logs.contains("control plane unreachable")
                    || logs.contains("subscription refused")
                    || logs.contains("snapshot stream broke"))
                .then_some(())
            }
        },
    )
    .await;
    let r = http_get(
        format!("127.0.0.1:{dp_metrics}").parse().unwrap(),
        "/readyz",
        &[],
    )
    .await
    .unwrap();
    assert_eq!(r.status, 503, "{}", r.text());
    let mut bad_authz = AuthorizationClient::connect(format!("http://{}", bad.authz_addr.unwrap()))
        .await
        .unwrap();
    let r = bad_authz
        .check(keygate::bench::check_request(&value, "openai", "127.0.0.1"))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(
        r.status.map(|s| s.code),
        Some(14),
        "keygate_not_ready, never allowed"
    );

    // The Envoy module with the same TLS settings as filter_config keys.
    let token_file = dir.join("subscriber.token");
    common::write_private(&token_file, &env[0].1);
    let files = ModuleFiles {
        control_plane: format!("https://localhost:{cp_port}"),
        master_key_file: cp_dir.join("master.key"),
        data_dir: dir.join("module"),
        subscriber_token_file: token_file,
        extra_settings: format!(
            r#""control_plane_ca":"{}","client_cert":"{}","client_key":"{}""#,
            s(&dir.join("ca.pem")),
            s(&dir.join("dp.pem")),
            s(&dir.join("dp.key"))
        ),
    };
    let upstream = Upstream::start().await;
    let envoy = Envoy::start_module(&files, upstream.addr, &EnvoyRun::module()).await;
    poll_until(
        Duration::from_secs(15),
        "the module to authorize over mTLS",
        || async {
            let r = http_get(
                envoy.listener,
                "/openai/v1/models",
                &[("authorization", &format!("Bearer {value}"))],
            )
            .await
            .ok()?;
            (r.status == 200).then_some(())
        },
    )
    .await;
    assert_eq!(
        upstream.last().values("authorization"),
        vec!["Bearer sk-vendor-0123456789abcdef".to_string()]
    );
    drop(cp);
}
