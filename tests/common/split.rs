//! The split deployment (SPEC §5) as real processes: `keygate control-plane` and
//! `keygate authz`, started through [`Proc`], plus gRPC clients for a data plane's ext_authz
//! and health services (a fresh PostgreSQL database per test: `postgres`, re-exported here).

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use envoy_types::ext_authz::v3::pb::{CheckRequest, CheckResponse};
use envoy_types::pb::envoy::service::auth::v3::authorization_client::AuthorizationClient;
use envoy_types::pb::envoy::service::auth::v3::check_response::HttpResponse as CheckHttp;
use tonic::transport::Channel;
use tonic_health::pb::health_client::HealthClient;
use tonic_health::pb::{HealthCheckRequest, health_check_response::ServingStatus};

// Where the split suites import them from (not every test crate does: hence the allow).
#[allow(unused_imports)]
pub use super::postgres::{drop_postgres_database, fresh_postgres_database};
use super::{Admin, Proc, admin_client, header_values, read_admin_token};

/// The gRPC service name Envoy health-checks on a data plane.
pub const AUTHZ_SERVICE: &str = "envoy.service.auth.v3.Authorization";

/// A fresh subscriber token (≥ 16 characters, unlike any admin token).
pub fn subscriber_token() -> String {
    format!("kgsub-{}", uuid::Uuid::new_v4().simple())
}

/// Writes a new random master key (64 hex characters) to `path`.
pub fn write_master_key(path: &Path) {
    let hex = format!(
        "{}{}",
        uuid::Uuid::new_v4().simple(),
        uuid::Uuid::new_v4().simple()
    );
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir).unwrap();
    }
    super::write_private(path, hex + "\n");
}

// ---------------------------------------------------------------------------------------------
// keygate control-plane

#[derive(Clone, Debug)]
pub struct ControlPlaneOptions {
    /// For panic messages, e.g. "control plane A".
    pub what: String,
    pub data_dir: PathBuf,
    /// A fixed admin listener (restarts on the same address); an ephemeral port otherwise.
    pub admin_addr: Option<SocketAddr>,
    /// `--store` (e.g. `postgres://…`); the SQLite file in the data dir otherwise.
    pub store: Option<String>,
    /// `--master-key-file`; `<data_dir>/master.key` (created on first start) otherwise.
    pub master_key_file: Option<PathBuf>,
    /// `KEYGATE_SUBSCRIBER_TOKEN`; none: no data plane can subscribe.
    pub subscriber_token: Option<String>,
    /// Further flags after the subcommand's own.
    pub args: Vec<String>,
}

impl ControlPlaneOptions {
    pub fn new(data_dir: &Path, subscriber_token: &str) -> Self {
        ControlPlaneOptions {
            what: "control plane".into(),
            data_dir: data_dir.to_path_buf(),
            admin_addr: None,
            store: None,
            master_key_file: None,
            subscriber_token: Some(subscriber_token.to_string()),
            args: vec![],
        }
    }

    fn command(&self) -> (Vec<String>, Vec<(String, String)>) {
        let mut args: Vec<String> = vec![
            "control-plane".into(),
            "--data-dir".into(),
            self.data_dir.display().to_string(),
            "--admin-addr".into(),
            super::addr_arg(self.admin_addr),
        ];
        if let Some(s) = &self.store {
            args.extend(["--store".into(), s.clone()]);
        }
        if let Some(k) = &self.master_key_file {
            args.extend(["--master-key-file".into(), k.display().to_string()]);
        }
        args.extend(self.args.iter().cloned());
        let env = self
            .subscriber_token
            .iter()
            .map(|t| ("KEYGATE_SUBSCRIBER_TOKEN".to_string(), t.clone()))
            .collect();
        (args, env)
    }
}

/// A running `keygate control-plane`: admin API, store and the snapshot stream (on the admin
/// listener). Killed on drop.
pub struct ControlPlane {
    pub proc: Proc,
    pub opts: ControlPlaneOptions,
    pub admin_addr: SocketAddr,
}

impl ControlPlane {
    /// Starts it and waits (bounded) for its "keygate ready" line.
    pub async fn start(opts: &ControlPlaneOptions) -> ControlPlane {
        let (args, env) = opts.command();
        let mut proc = Proc::spawn(&opts.what, &args, &env);
        proc.wait_ready().await;
        let admin_addr = proc.admin_addr.unwrap_or_else(|| {
            panic!(
                "{}: the ready line names no admin_addr:\n{}",
                opts.what,
                proc.logs()
            )
        });
        assert!(
            proc.authz_addr.is_none(),
            "{}: a control plane has no ext_authz listener, yet its ready line names one",
            opts.what
        );
        ControlPlane {
            proc,
            opts: opts.clone(),
            admin_addr,
        }
    }

    /// Starts it again on the same data dir, store and admin address.
    pub async fn restart(&mut self) {
        self.proc.kill();
        let mut opts = self.opts.clone();
        opts.admin_addr = Some(self.admin_addr);
        *self = ControlPlane::start(&opts).await;
    }

    /// What a data plane's `--control-plane` names.
    pub fn url(&self) -> String {
        format!("http://{}", self.admin_addr)
    }

    /// `<data_dir>/master.key`, or the `--master-key-file` it was given.
    pub fn master_key_file(&self) -> PathBuf {
        self.opts
            .master_key_file
            .clone()
            .unwrap_or_else(|| self.opts.data_dir.join("master.key"))
    }

    pub fn admin_token(&self) -> String {
        read_admin_token(&self.opts.data_dir)
    }

    pub async fn admin(&self) -> Admin {
        admin_client(self.admin_addr, Some(self.admin_token())).await
    }

    pub async fn admin_with_token(&self, token: Option<String>) -> Admin {
        admin_client(self.admin_addr, token).await
    }

    pub fn logs(&self) -> String {
        self.proc.logs()
    }

    /// SIGKILL: no graceful shutdown.
    pub fn kill(&mut self) {
        self.proc.kill()
    }
}

// ---------------------------------------------------------------------------------------------
// keygate authz

#[derive(Clone, Debug)]
pub struct DataPlaneOptions {
    /// For panic messages, e.g. "data plane 1".
    pub what: String,
    /// `--control-plane`, e.g. `http://127.0.0.1:9002`.
    pub control_plane: String,
    /// A fixed ext_authz listener (restarts, Envoy configs); an ephemeral port otherwise.
    pub authz_addr: Option<SocketAddr>,
    /// `--data-dir`: the snapshot cache lives here.
    pub data_dir: PathBuf,
    pub master_key_file: PathBuf,
    pub subscriber_token: String,
    /// Further flags after the subcommand's own.
    pub args: Vec<String>,
}

impl DataPlaneOptions {
    pub fn new(
        what: &str,
        control_plane: &str,
        data_dir: &Path,
        master_key_file: &Path,
        subscriber_token: &str,
    ) -> Self {
        DataPlaneOptions {
            what: what.into(),
            control_plane: control_plane.into(),
            authz_addr: None,
            data_dir: data_dir.to_path_buf(),
            master_key_file: master_key_file.to_path_buf(),
            subscriber_token: subscriber_token.into(),
            args: vec![],
        }
    }

    fn command(&self) -> (Vec<String>, Vec<(String, String)>) {
        let mut args: Vec<String> = vec![
            "authz".into(),
            "--control-plane".into(),
            self.control_plane.clone(),
            "--authz-addr".into(),
            super::addr_arg(self.authz_addr),
            "--data-dir".into(),
            self.data_dir.display().to_string(),
            "--master-key-file".into(),
            self.master_key_file.display().to_string(),
        ];
        args.extend(self.args.iter().cloned());
        let env = vec![(
            "KEYGATE_SUBSCRIBER_TOKEN".to_string(),
            self.subscriber_token.clone(),
        )];
        (args, env)
    }

    /// Spawns the data plane without waiting for anything (for processes expected to exit).
    pub fn spawn(&self) -> Proc {
        let (args, env) = self.command();
        Proc::spawn(&self.what, &args, &env)
    }
}

/// A running `keygate authz` data plane with gRPC clients on its ext_authz port. Killed on drop.
pub struct DataPlane {
    pub proc: Proc,
    pub opts: DataPlaneOptions,
    pub authz_addr: SocketAddr,
    channel: Channel,
}

impl DataPlane {
    /// Starts it and waits (bounded) for its "keygate ready" line (listener bound; not
    /// necessarily holding a snapshot: see [`DataPlane::wait_serving`]).
    pub async fn start(opts: &DataPlaneOptions) -> DataPlane {
        let mut proc = opts.spawn();
        proc.wait_ready().await;
        let authz_addr = proc.authz_addr.unwrap_or_else(|| {
            panic!(
                "{}: the ready line names no authz_addr:\n{}",
                opts.what,
                proc.logs()
            )
        });
        assert!(
            proc.admin_addr.is_none(),
            "{}: a data plane has no admin listener, yet its ready line names one",
            opts.what
        );
        let channel = Channel::from_shared(format!("http://{authz_addr}"))
            .unwrap()
            .connect_timeout(Duration::from_secs(2))
            .timeout(Duration::from_secs(5))
            .connect_lazy();
        DataPlane {
            proc,
            opts: opts.clone(),
            authz_addr,
            channel,
        }
    }

    /// Kills it (SIGKILL) and starts it again on the same port and data dir.
    pub async fn restart(&mut self) {
        self.proc.kill();
        let mut opts = self.opts.clone();
        opts.authz_addr = Some(self.authz_addr);
        *self = DataPlane::start(&opts).await;
    }

    /// One `envoy.service.auth.v3.Authorization/Check`.
    pub async fn check(&self, req: CheckRequest) -> Result<CheckResponse, tonic::Status> {
        AuthorizationClient::new(self.channel.clone())
            .check(req)
            .await
            .map(|r| r.into_inner())
    }

    /// The verdict on `authorization: Bearer <key>` for a route of `service`.
    pub async fn verdict(&self, key: &str, service: &str) -> Verdict {
        let r = self
            .check(keygate::bench::check_request(key, service, "127.0.0.1"))
            .await
            .unwrap_or_else(|e| {
                panic!(
                    "{}: Check failed at the gRPC level: {e}\n{}",
                    self.opts.what,
                    super::tail(&self.proc.logs(), 30)
                )
            });
        Verdict::of(&r)
    }

    /// `grpc.health.v1.Health/Check` for `service`.
    pub async fn health(&self, service: &str) -> Result<ServingStatus, tonic::Status> {
        let r = HealthClient::new(self.channel.clone())
            .check(HealthCheckRequest {
                service: service.into(),
            })
            .await?
            .into_inner();
        Ok(ServingStatus::try_from(r.status).unwrap_or(ServingStatus::Unknown))
    }

    /// Polls (bounded) until both health names ("" and the ext_authz service) say SERVING.
    pub async fn wait_serving(&self, limit: Duration) {
        let what = format!("{} to report SERVING", self.opts.what);
        super::poll_until(limit, &what, || async {
            for s in ["", AUTHZ_SERVICE] {
                if self.health(s).await.ok()? != ServingStatus::Serving {
                    return None;
                }
            }
            Some(())
        })
        .await;
    }

    pub fn logs(&self) -> String {
        self.proc.logs()
    }

    /// The path of its encrypted snapshot cache.
    pub fn cache_file(&self) -> PathBuf {
        self.opts.data_dir.join("snapshot.cache")
    }

    /// Polls (bounded) until its log says the snapshot cache was written at `version` or later.
    pub async fn wait_cache_written(&self, version: u64, limit: Duration) {
        let what = format!("{} to write its cache at version {version}", self.opts.what);
        super::poll_until(limit, &what, || async {
            self.proc
                .log_messages("snapshot cache written")
                .iter()
                .any(|l| {
                    l["fields"]["version"]
                        .as_u64()
                        .is_some_and(|v| v >= version)
                })
                .then_some(())
        })
        .await;
    }
}

/// What a `CheckResponse` decided, as Envoy would turn it into HTTP.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Verdict {
    /// `CheckResponse.status.code` (0 OK, 7 PERMISSION_DENIED, 14 UNAVAILABLE, 16 UNAUTHENTICATED).
    pub grpc_code: i32,
    /// 200 when allowed; the denied response's status otherwise.
    pub http_status: i32,
    /// The denied response's body (empty when allowed).
    pub body: String,
    /// The headers the response sets (allowed: the model key header; denied: content-type).
    pub headers: Vec<(String, String)>,
}

impl Verdict {
    pub fn of(r: &CheckResponse) -> Verdict {
        let grpc_code = r.status.as_ref().map(|s| s.code).unwrap_or(0);
        let header_pairs =
            |hs: &[envoy_types::pb::envoy::config::core::v3::HeaderValueOption]| {
                hs.iter()
                    .filter_map(|h| h.header.as_ref())
                    .map(|h| (h.key.clone(), h.value.clone()))
                    .collect::<Vec<_>>()
            };
        match &r.http_response {
            Some(CheckHttp::DeniedResponse(d)) => Verdict {
                grpc_code,
                http_status: d.status.as_ref().map(|s| s.code).unwrap_or(403),
                body: d.body.clone(),
                headers: header_pairs(&d.headers),
            },
            Some(CheckHttp::OkResponse(ok)) => Verdict {
                grpc_code,
                http_status: if grpc_code == 0 { 200 } else { 403 },
                body: String::new(),
                headers: header_pairs(&ok.headers),
            },
            Some(CheckHttp::ErrorResponse(e)) => Verdict {
                grpc_code,
                http_status: e.status.as_ref().map(|s| s.code).unwrap_or(403),
                body: e.body.clone(),
                headers: header_pairs(&e.headers),
            },
            None => Verdict {
                grpc_code,
                http_status: if grpc_code == 0 { 200 } else { 403 },
                body: String::new(),
                headers: vec![],
            },
        }
    }

    pub fn allowed(&self) -> bool {
        self.grpc_code == 0
    }

    /// The denial body's `error.code` (e.g. `invalid_api_key`, `keygate_not_ready`).
    pub fn error_code(&self) -> String {
        serde_json::from_str::<serde_json::Value>(&self.body)
            .ok()
            .and_then(|v| v["error"]["code"].as_str().map(str::to_string))
            .unwrap_or_default()
    }

    pub fn header(&self, name: &str) -> Vec<&str> {
        header_values(&self.headers, name)
    }
}
