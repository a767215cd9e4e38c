//! Wiring: data directory, master key and admin token, store, snapshot builder, and the gRPC
//! listeners (ext_authz with health; KeyAdmin with health and reflection), with graceful
//! shutdown: signal → health NOT_SERVING → stop accepting → drain within a grace period.

use std::future::Future;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use tokio::net::TcpListener;
use tokio::sync::watch;
use tokio::task::JoinHandle;
use tonic::transport::{Certificate, Endpoint, Identity, Server, ServerTlsConfig};
use tonic_health::ServingStatus;

use crate::admin::{AdminAuth, AdminService};
use crate::authz::{DecisionConfig, ExtAuthzService};
use crate::config::{AuthzArgs, ControlPlaneArgs, ServeArgs, ServerTlsArgs, StoreArgs};
use crate::crypto::{self, MasterKey, Secret, credentials_equal};
use crate::distribution::subscriber::{ClientTls, EndpointFields};
use crate::distribution::{
    DistributionService, Subscriber, SubscriberAuth, SubscriberConfig, SubscriberStatus,
};
use crate::domain::Limits;
use crate::snapshot::{SnapshotBuilder, SnapshotCell};
use crate::store::{Store, StoreError};

/// The ext_authz service name Envoy health-checks.
pub const AUTHZ_SERVICE: &str = "envoy.service.auth.v3.Authorization";
pub const ADMIN_SERVICE: &str = "keygate.admin.v1.KeyAdmin";
pub const DISTRIBUTION_SERVICE: &str = "keygate.snapshot.v1.SnapshotDistribution";

#[derive(Debug, thiserror::Error)]
pub enum StartError {
    /// Bad configuration or state an operator must fix (exit code 64).
    #[error("{0}")]
    Config(String),
    #[error("{context}: {source}")]
    Io {
        context: String,
        #[source]
        source: std::io::Error,
    },
    #[error(transparent)]
    Store(StoreError),
    #[error("building the first snapshot: {0}")]
    Snapshot(crate::snapshot::BuildError),
}

impl StartError {
    pub fn exit_code(&self) -> i32 {
        match self {
            StartError::Config(_) => 64,
            StartError::Store(
                StoreError::MasterKeyMismatch { .. } | StoreError::UnsupportedUrl(_),
            ) => 64,
            _ => 1,
        }
    }
}

fn io_err(context: impl Into<String>) -> impl FnOnce(std::io::Error) -> StartError {
    let context = context.into();
    move |source| StartError::Io { context, source }
}

/// Creates the data directory (mode 0700) if it is missing.
fn ensure_data_dir(dir: &Path) -> Result<(), StartError> {
    if dir.exists() {
        if !dir.is_dir() {
            return Err(StartError::Config(format!(
                "--data-dir {} exists and is not a directory",
                dir.display()
            )));
        }
        return Ok(());
    }
    crypto::create_private_dir(dir)
        .map_err(io_err(format!("creating data dir {}", dir.display())))?;
    tracing::info!(path = %dir.display(), "created data directory");
    Ok(())
}

fn load_master_key(args: &StoreArgs) -> Result<MasterKey, StartError> {
    match &args.master_key_file {
        Some(p) => MasterKey::load(p).map_err(|e| StartError::Config(e.to_string())),
        None => {
            let p = args.data_dir.join("master.key");
            let (key, created) =
                MasterKey::load_or_create(&p).map_err(|e| StartError::Config(e.to_string()))?;
            if created {
                tracing::warn!(path = %p.display(), "generated a new master key; back it up: without it, model keys cannot be decrypted and consumer keys cannot be verified");
            }
            Ok(key)
        }
    }
}

fn read_token_file(p: &Path) -> Result<Secret, StartError> {
    let raw = std::fs::read_to_string(p)
        .map_err(io_err(format!("reading admin token file {}", p.display())))?;
    let token = raw.trim().to_string();
    if token.len() < 16 {
        return Err(StartError::Config(format!(
            "admin token in {} must be at least 16 characters",
            p.display()
        )));
    }
    Ok(Secret::new(token))
}

fn load_admin_token(args: &ControlPlaneArgs) -> Result<Secret, StartError> {
    if let Ok(t) = std::env::var("KEYGATE_ADMIN_TOKEN") {
        let t = t.trim().to_string();
        if t.len() < 16 {
            return Err(StartError::Config(
                "KEYGATE_ADMIN_TOKEN must be at least 16 characters".into(),
            ));
        }
        return Ok(Secret::new(t));
    }
    if let Some(p) = &args.admin_token_file {
        return read_token_file(p);
    }
    let p = args.store.data_dir.join("admin.token");
    if p.exists() {
        return read_token_file(&p);
    }
    let token = Secret::new(format!("kgadm-{}", crypto::random_token()));
    crypto::write_private_file(&p, format!("{}\n", token.expose()).as_bytes())
        .map_err(io_err(format!("writing admin token file {}", p.display())))?;
    tracing::info!(path = %p.display(), "generated an admin token; grpcurl needs it as \"authorization: Bearer $(cat <path>)\"");
    Ok(token)
}

/// Opens the store named by `args` (creating the data dir and master key on first start).
pub async fn open_store(
    args: &StoreArgs,
    limits: Limits,
) -> Result<(Store, MasterKey), StartError> {
    ensure_data_dir(&args.data_dir)?;
    let master = load_master_key(args)?;
    let url = match &args.store {
        Some(u) => u.clone(),
        None => {
            // Created owner-only before SQLite opens it (its -wal/-shm files follow its mode).
            let db = sqlite_path(&args.data_dir);
            if !db.exists() {
                crypto::write_private_file(&db, b"")
                    .map_err(io_err(format!("creating {}", db.display())))?;
            }
            format!("sqlite://{}", db.display())
        }
    };
    let store = Store::open(&url, &master.fingerprint(), master.keys(), limits)
        .await
        .map_err(StartError::Store)?;
    Ok((store, master))
}

/// A running keygate (any shape).
pub struct Running {
    pub authz_addr: Option<SocketAddr>,
    pub admin_addr: Option<SocketAddr>,
    pub distribution_addr: Option<SocketAddr>,
    pub store: Option<Store>,
    pub snapshots: SnapshotCell,
    /// The data plane's feed, in `keygate authz`.
    pub subscriber: Option<Arc<SubscriberStatus>>,
    shutdown: watch::Sender<bool>,
    tasks: Vec<JoinHandle<()>>,
    grace: Duration,
    fatal: Option<tokio::sync::oneshot::Receiver<StartError>>,
}

impl Running {
    /// Graceful stop: NOT_SERVING, stop accepting, drain within the grace period.
    pub async fn stop(self) {
        let _ = self.shutdown.send(true);
        let drain = futures::future::join_all(self.tasks);
        if tokio::time::timeout(self.grace, drain).await.is_err() {
            tracing::warn!(grace = ?self.grace, "in-flight requests did not finish within the grace period");
        }
        if let Some(store) = &self.store {
            store.close().await;
        }
        tracing::info!("keygate stopped");
    }

    /// Resolves with an error that must stop the process (e.g. a master key mismatch found
    /// by the subscriber); never resolves otherwise.
    pub async fn fatal(&mut self) -> StartError {
        match self.fatal.as_mut() {
            Some(rx) => match rx.await {
                Ok(e) => e,
                Err(_) => std::future::pending().await,
            },
            None => std::future::pending().await,
        }
    }
}

/// Accepted connections with TCP_NODELAY: without it, small gRPC answers wait ~40 ms for
/// Nagle and delayed ACKs (measured through Envoy: 44 ms per allowed request).
pub fn incoming(listener: TcpListener) -> tonic::transport::server::TcpIncoming {
    tonic::transport::server::TcpIncoming::from(listener).with_nodelay(Some(true))
}

async fn bind(addr: SocketAddr, what: &str) -> Result<TcpListener, StartError> {
    TcpListener::bind(addr)
        .await
        .map_err(io_err(format!("binding the {what} listener on {addr}")))
}

fn read_pem(p: &Path, what: &str) -> Result<Vec<u8>, StartError> {
    std::fs::read(p).map_err(|e| StartError::Config(format!("{what} {}: {e}", p.display())))
}

/// rustls server TLS from the flags (mTLS with a client CA), or none.
fn server_tls(args: &ServerTlsArgs) -> Result<Option<ServerTlsConfig>, StartError> {
    let (Some(cert), Some(key)) = (&args.tls_cert, &args.tls_key) else {
        return Ok(None);
    };
    let mut tls = ServerTlsConfig::new().identity(Identity::from_pem(
        read_pem(cert, "--tls-cert")?,
        read_pem(key, "--tls-key")?,
    ));
    if let Some(ca) = &args.tls_client_ca {
        tls = tls.client_ca_root(Certificate::from_pem(read_pem(ca, "--tls-client-ca")?));
    }
    Ok(Some(tls))
}

fn grpc_server(tls: &Option<ServerTlsConfig>) -> Result<Server, StartError> {
    let b = Server::builder()
        .http2_keepalive_interval(Some(Duration::from_secs(10)))
        .http2_keepalive_timeout(Some(Duration::from_secs(5)));
    match tls {
        Some(t) => b
            .tls_config(t.clone())
            .map_err(|e| StartError::Config(format!("TLS: {e}"))),
        None => Ok(b),
    }
}

fn load_secret_token(
    env: &str,
    file: &Option<PathBuf>,
    flag: &str,
) -> Result<Option<Secret>, StartError> {
    if let Ok(t) = std::env::var(env) {
        let t = t.trim().to_string();
        if t.len() < 16 {
            return Err(StartError::Config(format!(
                "{env} must be at least 16 characters"
            )));
        }
        return Ok(Some(Secret::new(t)));
    }
    match file {
        Some(p) => {
            let raw = std::fs::read_to_string(p)
                .map_err(|e| StartError::Config(format!("{flag} {}: {e}", p.display())))?;
            let t = raw.trim().to_string();
            if t.len() < 16 {
                return Err(StartError::Config(format!(
                    "{flag} {}: the token must be at least 16 characters",
                    p.display()
                )));
            }
            Ok(Some(Secret::new(t)))
        }
        None => Ok(None),
    }
}

type Stopped = std::pin::Pin<Box<dyn Future<Output = ()> + Send>>;

fn stop_signal(rx: &watch::Receiver<bool>) -> impl Fn() -> Stopped + use<> {
    let rx = rx.clone();
    move || {
        let mut rx = rx.clone();
        Box::pin(async move {
            let _ = rx.wait_for(|s| *s).await;
        })
    }
}

/// The ext_authz listener: health NOT_SERVING until a snapshot is live, then SERVING, and
/// NOT_SERVING again at shutdown.
async fn spawn_authz(
    listener: TcpListener,
    authz: ExtAuthzService,
    cell: SnapshotCell,
    tls: &Option<ServerTlsConfig>,
    stopped: &(impl Fn() -> Stopped + Send),
    tasks: &mut Vec<JoinHandle<()>>,
) -> Result<(), StartError> {
    let (health, health_svc) = tonic_health::server::health_reporter();
    health
        .set_service_status("", ServingStatus::NotServing)
        .await;
    health
        .set_service_status(AUTHZ_SERVICE, ServingStatus::NotServing)
        .await;
    {
        let health = health.clone();
        let stop = stopped();
        tasks.push(tokio::spawn(async move {
            tokio::select! {
                _ = cell.wait_for(i64::MIN) => {
                    health.set_service_status("", ServingStatus::Serving).await;
                    health.set_service_status(AUTHZ_SERVICE, ServingStatus::Serving).await;
                }
                _ = stop => {}
            }
        }));
    }
    let (reflection_v1, reflection_v1alpha) = reflection(&[tonic_health::pb::FILE_DESCRIPTOR_SET])?;
    let server = grpc_server(tls)?
        .add_service(health_svc)
        .add_service(reflection_v1)
        .add_service(reflection_v1alpha)
        .add_service(envoy_types::ext_authz::v3::pb::AuthorizationServer::new(
            authz,
        ));
    tasks.push(spawn_serving(
        server,
        listener,
        health,
        &[AUTHZ_SERVICE],
        "ext_authz",
        stopped(),
    ));
    Ok(())
}

/// Serves `router` on `listener` until `stop`, turning health NOT_SERVING (for "" and
/// `services`) as shutdown begins, then draining in-flight requests.
fn spawn_serving(
    router: tonic::transport::server::Router,
    listener: TcpListener,
    health: tonic_health::server::HealthReporter,
    services: &'static [&'static str],
    what: &'static str,
    stop: Stopped,
) -> JoinHandle<()> {
    tokio::spawn(async move {
        let shutdown = async move {
            stop.await;
            for s in std::iter::once(&"").chain(services) {
                health
                    .set_service_status(*s, ServingStatus::NotServing)
                    .await;
            }
        };
        if let Err(e) = router
            .serve_with_incoming_shutdown(incoming(listener), shutdown)
            .await
        {
            tracing::error!(error = %e, server = what, "gRPC server failed");
        }
    })
}

/// Starts `keygate serve`: returns once every listener is bound.
pub async fn start(args: ServeArgs) -> Result<Running, StartError> {
    let decision = args
        .data_plane
        .decision_config()
        .map_err(StartError::Config)?;
    start_control_plane(&args.control_plane, Some((args.authz_addr, decision))).await
}

/// Starts the control plane (and, for `serve`, an ext_authz listener beside it).
pub async fn start_control_plane(
    args: &ControlPlaneArgs,
    authz: Option<(SocketAddr, DecisionConfig)>,
) -> Result<Running, StartError> {
    let limits = args.limits().map_err(StartError::Config)?;
    let tls = server_tls(&args.tls)?;
    let subscriber_token = load_secret_token(
        "KEYGATE_SUBSCRIBER_TOKEN",
        &args.subscriber_token_file,
        "--subscriber-token-file",
    )?;
    let (store, master) = open_store(&args.store, limits).await?;
    let token = load_admin_token(args)?;
    if let Some(s) = &subscriber_token
        && credentials_equal(s.expose().as_bytes(), token.expose().as_bytes())
    {
        return Err(StartError::Config(
            "the subscriber token must differ from the admin token".into(),
        ));
    }
    // The store holds the sub-keys derived when it opened: no second derivation.
    let keys = store.keys().clone();
    let fingerprint = master.fingerprint();
    drop(master);
    tracing::info!(backend = ?store.backend(), store_id = store.store_id(), "store open");

    let cell = SnapshotCell::new();
    let (updates_tx, _) = tokio::sync::broadcast::channel(1024);
    let secrets = crate::secret::Secrets::builtin(args.secrets_dir.clone(), args.secret_ttl);
    let builder = SnapshotBuilder::new(store.clone(), cell.clone())
        .with_updates(updates_tx.clone())
        .with_secrets(secrets.clone());
    builder.refresh().await.map_err(StartError::Snapshot)?;

    let (shutdown_tx, shutdown_rx) = watch::channel(false);
    let stopped = stop_signal(&shutdown_rx);
    let mut tasks = Vec::new();

    let authz_listener = match &authz {
        Some((addr, _)) => Some(bind(*addr, "ext_authz").await?),
        None => None,
    };
    let admin_listener = bind(args.admin_addr, "admin").await?;
    let dist_listener = match args.distribution_addr {
        Some(a) => Some(bind(a, "distribution").await?),
        None => None,
    };
    let metrics_listener = bind(args.metrics_addr, "metrics").await?;
    let metrics_addr = metrics_listener
        .local_addr()
        .map_err(io_err("metrics address"))?;
    let authz_addr = authz_listener.as_ref().and_then(|l| l.local_addr().ok());
    let admin_addr = admin_listener
        .local_addr()
        .map_err(io_err("admin address"))?;
    let distribution_addr = dist_listener.as_ref().and_then(|l| l.local_addr().ok());

    tasks.push(tokio::spawn(builder.run(stopped())));
    tasks.push(tokio::spawn(crate::secret::run_refresh(
        store.clone(),
        secrets.clone(),
        stopped(),
    )));
    if store.backend() == crate::store::Backend::Postgres {
        tasks.push(tokio::spawn(store.clone().listen_for_changes(stopped())));
    }

    let store_sink: crate::usage::UsageSink = {
        let store = store.clone();
        Arc::new(move |batch| {
            let store = store.clone();
            Box::pin(async move {
                store
                    .record_last_used(&batch)
                    .await
                    .map_err(|e| e.to_string())
            })
        })
    };
    if let (Some(listener), Some((_, decision))) = (authz_listener, authz) {
        let (recorder, flusher) =
            crate::usage::start(store_sink.clone(), Duration::from_secs(1), stopped());
        tasks.push(tokio::spawn(flusher));
        let svc =
            ExtAuthzService::new(cell.clone(), keys.hasher.clone(), decision).with_usage(recorder);
        spawn_authz(listener, svc, cell.clone(), &tls, &stopped, &mut tasks).await?;
    }

    let distribution = subscriber_token.map(|t| {
        (
            DistributionService::new(cell.clone(), updates_tx.clone(), fingerprint.clone())
                .with_usage(store_sink.clone()),
            SubscriberAuth::new(t),
        )
    });
    {
        let count = distribution.as_ref().map(|(svc, _)| {
            let svc = svc.clone();
            Arc::new(move || svc.subscriber_count()) as Arc<dyn Fn() -> i64 + Send + Sync>
        });
        let sources = crate::health::HealthSources::new(cell.clone(), None, count);
        tasks.push(tokio::spawn(crate::health::serve(
            metrics_listener,
            sources,
            stopped(),
        )));
    }
    if distribution.is_none() {
        tracing::info!(
            "no subscriber token (KEYGATE_SUBSCRIBER_TOKEN / --subscriber-token-file): data planes cannot subscribe"
        );
    }

    // Admin listener: KeyAdmin (token required), health and reflection (open), and the
    // snapshot stream unless it has a listener of its own.
    let (admin_health, admin_health_svc) = tonic_health::server::health_reporter();
    admin_health
        .set_service_status(ADMIN_SERVICE, ServingStatus::Serving)
        .await;
    let (reflection_v1, reflection_v1alpha) = reflection(&[
        crate::proto::FILE_DESCRIPTOR_SET,
        tonic_health::pb::FILE_DESCRIPTOR_SET,
    ])?;
    let admin = AdminService::new(store.clone(), cell.clone(), secrets);
    let auth = AdminAuth::new(token, &keys);
    let mut router = grpc_server(&tls)?
        .add_service(admin_health_svc)
        .add_service(reflection_v1)
        .add_service(reflection_v1alpha)
        .add_service(admin.into_server(auth));
    if let Some(listener) = dist_listener {
        if let Some((svc, auth)) = distribution.clone() {
            let (h, h_svc) = tonic_health::server::health_reporter();
            h.set_service_status(DISTRIBUTION_SERVICE, ServingStatus::Serving)
                .await;
            let server = grpc_server(&tls)?
                .add_service(h_svc)
                .add_service(svc.into_server(auth));
            let stop = stopped();
            tasks.push(tokio::spawn(async move {
                if let Err(e) = server
                    .serve_with_incoming_shutdown(incoming(listener), stop)
                    .await
                {
                    tracing::error!(error = %e, "distribution server failed");
                }
            }));
        }
    } else if let Some((svc, auth)) = distribution {
        admin_health
            .set_service_status(DISTRIBUTION_SERVICE, ServingStatus::Serving)
            .await;
        router = router.add_service(svc.into_server(auth));
    }
    tasks.push(spawn_serving(
        router,
        admin_listener,
        admin_health.clone(),
        &[ADMIN_SERVICE, DISTRIBUTION_SERVICE],
        "admin",
        stopped(),
    ));

    tracing::info!(
        authz_addr = authz_addr.map(|a| a.to_string()),
        admin_addr = %admin_addr,
        metrics_addr = %metrics_addr,
        distribution_addr = distribution_addr.map(|a| a.to_string()),
        "keygate ready"
    );
    Ok(Running {
        authz_addr,
        admin_addr: Some(admin_addr),
        distribution_addr,
        store: Some(store),
        snapshots: cell,
        subscriber: None,
        shutdown: shutdown_tx,
        tasks,
        grace: args.shutdown_grace,
        fatal: None,
    })
}

/// Starts `keygate authz`: an ext_authz data plane fed by a control plane.
pub async fn start_authz(args: AuthzArgs) -> Result<Running, StartError> {
    let decision = args
        .data_plane
        .decision_config()
        .map_err(StartError::Config)?;
    let tls = server_tls(&args.tls)?;
    let token = load_secret_token(
        "KEYGATE_SUBSCRIBER_TOKEN",
        &args.subscriber_token_file,
        "--subscriber-token-file",
    )?
    .ok_or_else(|| {
        StartError::Config(
            "a subscriber token is required: KEYGATE_SUBSCRIBER_TOKEN or --subscriber-token-file"
                .into(),
        )
    })?;
    ensure_data_dir(&args.data_dir)?;
    let key_path = args
        .master_key_file
        .clone()
        .unwrap_or_else(|| args.data_dir.join("master.key"));
    if !key_path.exists() {
        return Err(StartError::Config(format!(
            "the control plane's master key is required: --master-key-file (no {} either)",
            key_path.display()
        )));
    }
    let master = MasterKey::load(&key_path).map_err(|e| StartError::Config(e.to_string()))?;
    let keys = master.keys();
    let fingerprint = master.fingerprint();
    drop(master);
    let endpoint = control_plane_endpoint(&args)?;
    let usage_sink = crate::distribution::subscriber::usage_sink(&endpoint, &token);

    let cell = SnapshotCell::new();
    let subscriber = Subscriber::new(
        SubscriberConfig {
            endpoint,
            token: Arc::new(token),
            data_dir: args.data_dir.clone(),
            name: crate::distribution::subscriber::hostname()
                .unwrap_or_else(|| "data-plane".into()),
            min_backoff: Duration::from_millis(100),
            max_backoff: Duration::from_secs(10),
        },
        cell.clone(),
        keys.clone(),
        fingerprint,
    );
    subscriber.load_cache();
    let status = subscriber.status.clone();

    let (shutdown_tx, shutdown_rx) = watch::channel(false);
    let stopped = stop_signal(&shutdown_rx);
    let mut tasks = Vec::new();
    let listener = bind(args.authz_addr, "ext_authz").await?;
    let authz_addr = listener.local_addr().map_err(io_err("ext_authz address"))?;
    let metrics_listener = bind(args.metrics_addr, "metrics").await?;
    let metrics_addr = metrics_listener
        .local_addr()
        .map_err(io_err("metrics address"))?;
    let sources = crate::health::HealthSources::new(cell.clone(), Some(status.clone()), None);
    tasks.push(tokio::spawn(crate::health::serve(
        metrics_listener,
        sources,
        stopped(),
    )));
    let (recorder, flusher) = crate::usage::start(usage_sink, Duration::from_secs(1), stopped());
    tasks.push(tokio::spawn(flusher));
    let svc =
        ExtAuthzService::new(cell.clone(), keys.hasher.clone(), decision).with_usage(recorder);
    spawn_authz(listener, svc, cell.clone(), &tls, &stopped, &mut tasks).await?;

    let (fatal_tx, fatal_rx) = tokio::sync::oneshot::channel();
    let stop = stopped();
    tasks.push(tokio::spawn(async move {
        if let Err(e) = subscriber.run(stop).await {
            let _ = fatal_tx.send(StartError::Config(e.to_string()));
        }
    }));
    tracing::info!(authz_addr = %authz_addr, metrics_addr = %metrics_addr, control_plane = %args.control_plane, "keygate ready");
    Ok(Running {
        authz_addr: Some(authz_addr),
        admin_addr: None,
        distribution_addr: None,
        store: None,
        snapshots: cell,
        subscriber: Some(status),
        shutdown: shutdown_tx,
        tasks,
        grace: args.shutdown_grace,
        fatal: Some(fatal_rx),
    })
}

fn control_plane_endpoint(args: &AuthzArgs) -> Result<Endpoint, StartError> {
    crate::distribution::subscriber::control_plane_endpoint(
        &args.control_plane,
        &ClientTls {
            ca: args.control_plane_ca.clone(),
            cert: args.client_cert.clone(),
            key: args.client_key.clone(),
        },
        &EndpointFields {
            url: "--control-plane",
            ca: "--control-plane-ca",
            cert: "--client-cert",
            key: "--client-key",
        },
    )
    .map_err(StartError::Config)
}

/// gRPC reflection, v1 and v1alpha (grpcurl 1.8.6 speaks v1alpha), each listing every
/// service on the port: the given descriptor sets plus both reflection services.
#[allow(clippy::type_complexity)]
fn reflection(
    sets: &[&'static [u8]],
) -> Result<
    (
        tonic_reflection::server::v1::ServerReflectionServer<
            impl tonic_reflection::server::v1::ServerReflection,
        >,
        tonic_reflection::server::v1alpha::ServerReflectionServer<
            impl tonic_reflection::server::v1alpha::ServerReflection,
        >,
    ),
    StartError,
> {
    let builder = || {
        let mut b = tonic_reflection::server::Builder::configure()
            .register_encoded_file_descriptor_set(tonic_reflection::pb::v1::FILE_DESCRIPTOR_SET)
            .register_encoded_file_descriptor_set(
                tonic_reflection::pb::v1alpha::FILE_DESCRIPTOR_SET,
            )
            .include_reflection_service(false);
        for s in sets {
            b = b.register_encoded_file_descriptor_set(s);
        }
        b
    };
    let err = |e: tonic_reflection::server::Error| StartError::Config(format!("reflection: {e}"));
    Ok((
        builder().build_v1().map_err(err)?,
        builder().build_v1alpha().map_err(err)?,
    ))
}

fn sqlite_path(data_dir: &Path) -> PathBuf {
    data_dir.join("keygate.db")
}

/// Runs a started keygate until `shutdown` resolves (or a fatal error), then stops gracefully.
pub async fn run_until(
    mut running: Running,
    shutdown: impl Future<Output = ()>,
) -> Result<(), StartError> {
    let fatal = tokio::select! {
        _ = shutdown => None,
        e = running.fatal() => Some(e),
    };
    tracing::info!("shutting down");
    running.stop().await;
    match fatal {
        Some(e) => Err(e),
        None => Ok(()),
    }
}

/// Runs `keygate serve` until `shutdown` resolves, then stops gracefully.
pub async fn run(args: ServeArgs, shutdown: impl Future<Output = ()>) -> Result<(), StartError> {
    run_until(start(args).await?, shutdown).await
}

/// Resolves on SIGINT or SIGTERM.
pub async fn shutdown_signal() {
    let ctrl_c = async {
        let _ = tokio::signal::ctrl_c().await;
    };
    #[cfg(unix)]
    let term = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut s) => {
                s.recv().await;
            }
            Err(_) => std::future::pending::<()>().await,
        }
    };
    #[cfg(not(unix))]
    let term = std::future::pending::<()>();
    tokio::select! {
        _ = ctrl_c => {}
        _ = term => {}
    }
}
