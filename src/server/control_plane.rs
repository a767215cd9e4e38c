//! `keygate control-plane` (and `keygate serve`, which adds an ext_authz listener): the data
//! dir, master key and tokens; the store and the first snapshot; the control plane's tasks
//! (snapshot builder, secret refresh, PostgreSQL change listener); and the listeners: admin
//! (KeyAdmin, health, reflection, and the snapshot stream unless it has its own), the
//! dedicated distribution listener, ext_authz and metrics.
//! Depends on `admin`, `authz`, `config`, `distribution`, `metrics`, `secret`, `snapshot`,
//! `store`, `usage` and the rest of `server`.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use tokio::net::TcpListener;
use tokio::sync::broadcast;
use tonic::transport::ServerTlsConfig;
use tonic_health::ServingStatus;

use super::authz_listener::{AuthzListener, bind_authz, start_rate_limits};
use super::data_dir::open_store;
use super::listeners::{Health, bind, grpc_server, reflection, serve, serve_authz, server_tls};
use super::secret_refresh::run_refresh;
use super::shutdown::Shutdown;
use super::{ADMIN_SERVICE, ControlPlane, DISTRIBUTION_SERVICE, Role, Running, StartError, tokens};
use crate::admin::{AdminAuth, AdminService};
use crate::authz::{DecisionConfig, ExtAuthzService};
use crate::config::{AuthzAddr, ControlPlaneArgs, DataPlaneArgs};
use crate::crypto::Secret;
use crate::distribution::usage_wire::{MeteredError, MeteredSink};
use crate::distribution::{DistributionService, SubscriberAuth};
use crate::domain::Limits;
use crate::secret::Secrets;
use crate::snapshot::{Published, SeenAhead, SnapshotBuilder, SnapshotCell};
use crate::store::{Backend, Store};
use crate::usage::UsageSink;

/// Starts the control plane (and, for `serve`, an ext_authz listener beside it): returns
/// once every listener is bound.
pub async fn start_control_plane(
    args: &ControlPlaneArgs,
    authz: Option<(AuthzAddr, DecisionConfig, DataPlaneArgs)>,
) -> Result<Running, StartError> {
    let limits = args.limits().map_err(StartError::Config)?;
    let tls = server_tls(&args.tls)?;
    let identities = tokens::admin_identities(args)?;
    let Opened {
        store,
        admin_token,
        subscriber_token,
        fingerprint,
    } = open(args, limits).await?;
    let snapshots = Snapshots::build(&store, args).await?;
    let listeners = Listeners::bind(args, authz.as_ref().map(|(addr, _, _)| addr)).await?;
    let addrs = listeners.addrs;
    let mut shutdown = Shutdown::new(args.shutdown_grace);
    spawn_tasks(
        snapshots.builder,
        snapshots.secrets.clone(),
        &store,
        &mut shutdown,
    );
    // Whatever records last-used times (ext_authz here, data planes' reports) writes here.
    let usage = store_usage_sink(&store);
    // The store holds the sub-keys derived when it opened: no second derivation.
    let keys = store.keys().clone();
    if let (Some(listener), Some((_, decision, data_plane))) = (listeners.authz, authz) {
        let (recorder, flusher) =
            crate::usage::start(usage.clone(), Duration::from_secs(1), shutdown.recv());
        shutdown.spawn(flusher);
        let limiter = start_rate_limits(&data_plane, &mut shutdown)?;
        let svc = ExtAuthzService::new(snapshots.cell.clone(), keys.hasher.clone(), decision)
            .with_usage(recorder)
            .with_rate_limiter(limiter.clone());
        // Usage metered here is applied to the store directly, exactly once like a data
        // plane's (the same reporter, with this process as the data plane).
        // Its last report after the drain, as a data plane's (`data_plane::start_authz`).
        let tally = Arc::new(crate::usage::Tally::default());
        let drained = shutdown.drained();
        shutdown.spawn_last(crate::usage::metered::start_reporter(
            tally.clone(),
            store_report_sink(&store),
            data_plane.usage_report_interval,
            drained,
        ));
        let metering = crate::authz::ext_proc::ExtProcService::new(
            snapshots.cell.clone(),
            keys.hasher.clone(),
            tally,
        )
        .with_rate_limiter(limiter);
        serve_authz(
            listener,
            svc,
            metering,
            snapshots.cell.clone(),
            &tls,
            &mut shutdown,
        )
        .await?;
    }
    let distribution = subscriber_token.map(|token| {
        let svc = DistributionService::new(
            snapshots.cell.clone(),
            snapshots.updates,
            fingerprint,
            keys.stream.clone(),
        )
        .with_max_subscribers(args.max_subscribers as usize)
        .with_usage(usage)
        .with_metered(store_metered_sink(&store))
        .with_seen_ahead(snapshots.seen_ahead);
        (svc, SubscriberAuth::new(token))
    });
    serve_metrics(
        listeners.metrics,
        snapshots.cell.clone(),
        snapshots.secrets.clone(),
        distribution.as_ref().map(|(svc, _)| svc),
        &mut shutdown,
    );
    let auth = AdminAuth::new(store.clone(), admin_token, identities);
    let admin = AdminService::new(
        store.clone(),
        snapshots.cell.clone(),
        snapshots.secrets,
        auth,
    );
    serve_admin(
        listeners.admin,
        admin,
        distribution,
        listeners.distribution,
        &tls,
        &mut shutdown,
    )
    .await?;
    addrs.log_ready();
    Ok(addrs.running(store, snapshots.cell, shutdown))
}

/// The store and the control plane's credentials.
struct Opened {
    store: Store,
    /// The bootstrap admin token; `None` under `--no-bootstrap-token`.
    admin_token: Option<Secret>,
    subscriber_token: Option<Secret>,
    /// The master key's (sent to data planes, which refuse a different key).
    fingerprint: String,
}

/// Reads the subscriber token, opens the store (creating the data dir and master key on
/// first start), then reads or generates the admin token there.
async fn open(args: &ControlPlaneArgs, limits: Limits) -> Result<Opened, StartError> {
    let subscriber_token = tokens::subscriber_token(args.subscriber_token_file.as_deref())?;
    let (store, master) = open_store(&args.store, limits).await?;
    let admin_token = tokens::bootstrap_token(args, &store).await?;
    if let Some(admin) = &admin_token {
        tokens::check_distinct(admin, subscriber_token.as_ref())?;
    }
    let fingerprint = master.fingerprint();
    drop(master);
    tracing::info!(backend = ?store.backend(), store_id = store.store_id(), "store open");
    Ok(Opened {
        store,
        admin_token,
        subscriber_token,
        fingerprint,
    })
}

/// The published snapshot and what keeps it in step with the store.
struct Snapshots {
    cell: SnapshotCell,
    /// Every update the builder applies, for the snapshot stream.
    updates: broadcast::Sender<Published>,
    secrets: Secrets,
    builder: SnapshotBuilder,
    /// Subscribers ahead of the store's history, for the builder to check.
    seen_ahead: tokio::sync::mpsc::Sender<SeenAhead>,
}

impl Snapshots {
    /// Builds the first snapshot (so nothing is served before the store's contents are).
    async fn build(store: &Store, args: &ControlPlaneArgs) -> Result<Snapshots, StartError> {
        let cell = SnapshotCell::new();
        let (updates, _) = broadcast::channel(1024);
        let secrets = Secrets::builtin(args.secrets_dir.clone(), args.secret_ttl);
        super::secret_refresh::prime(store, &secrets)
            .await
            .map_err(|e| StartError::Snapshot(e.into()))?;
        let (seen_ahead, seen_rx) = tokio::sync::mpsc::channel(16);
        let builder = SnapshotBuilder::new(store.clone(), cell.clone())
            .with_updates(updates.clone())
            .with_secrets(secrets.clone())
            .with_seen_ahead(seen_rx);
        builder.refresh().await.map_err(StartError::Snapshot)?;
        Ok(Snapshots {
            cell,
            updates,
            secrets,
            builder,
            seen_ahead,
        })
    }
}

/// The control plane's background tasks: the snapshot builder, the secret refresh and (on
/// PostgreSQL) the listener for other replicas' commits.
fn spawn_tasks(builder: SnapshotBuilder, secrets: Secrets, store: &Store, shutdown: &mut Shutdown) {
    let builder = builder.run(shutdown.recv());
    shutdown.spawn(builder);
    let refresh = run_refresh(store.clone(), secrets, shutdown.recv());
    shutdown.spawn(refresh);
    if store.backend() == Backend::Postgres {
        shutdown.spawn(store.clone().listen_for_changes(shutdown.recv()));
    }
}

/// Every listener, bound before anything is served (a taken port fails the start).
struct Listeners {
    authz: Option<AuthzListener>,
    admin: TcpListener,
    distribution: Option<TcpListener>,
    metrics: TcpListener,
    addrs: Addrs,
}

/// The addresses the listeners got (ports may have been 0).
#[derive(Clone)]
struct Addrs {
    authz: Option<AuthzAddr>,
    admin: SocketAddr,
    distribution: Option<SocketAddr>,
    metrics: SocketAddr,
}

impl Listeners {
    async fn bind(
        args: &ControlPlaneArgs,
        authz: Option<&AuthzAddr>,
    ) -> Result<Listeners, StartError> {
        let authz = match authz {
            Some(addr) => Some(bind_authz(addr).await?),
            None => None,
        };
        let admin = bind(args.admin_addr, "admin").await?;
        let distribution = match args.distribution_addr {
            Some(addr) => Some(bind(addr, "distribution").await?),
            None => None,
        };
        let metrics = bind(args.metrics_addr, "metrics").await?;
        let addrs = Addrs {
            authz: authz.as_ref().map(|(_, a)| a.clone()),
            admin: admin.1,
            distribution: distribution.as_ref().map(|(_, a)| *a),
            metrics: metrics.1,
        };
        Ok(Listeners {
            authz: authz.map(|(l, _)| l),
            admin: admin.0,
            distribution: distribution.map(|(l, _)| l),
            metrics: metrics.0,
            addrs,
        })
    }
}

impl Addrs {
    /// What `start_control_plane` returns: `serve` when it has an ext_authz listener.
    fn running(self, store: Store, snapshots: SnapshotCell, shutdown: Shutdown) -> Running {
        let control_plane = ControlPlane {
            admin_addr: self.admin,
            distribution_addr: self.distribution,
            store,
        };
        Running {
            snapshots,
            metrics_addr: self.metrics,
            role: match self.authz {
                Some(authz_addr) => Role::Serve {
                    control_plane,
                    authz_addr,
                },
                None => Role::ControlPlane(control_plane),
            },
            shutdown,
        }
    }

    fn log_ready(&self) {
        tracing::info!(
            authz_addr = self.authz.as_ref().map(|a| a.to_string()),
            admin_addr = %self.admin,
            metrics_addr = %self.metrics,
            distribution_addr = self.distribution.map(|a| a.to_string()),
            "keygate ready"
        );
    }
}

/// Writes last-used batches to the store.
fn store_usage_sink(store: &Store) -> UsageSink {
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
}

/// Applies data planes' metered-usage reports to the store (exactly once) and counts them.
fn store_metered_sink(store: &Store) -> MeteredSink {
    let store = store.clone();
    Arc::new(move |report| {
        let store = store.clone();
        Box::pin(async move {
            let now = crate::domain::Timestamp::now();
            match crate::admin::apply_usage_report_and_count(&store, &report, now).await {
                Ok(_) => Ok(()),
                Err(crate::store::StoreError::Rule(rule)) => {
                    Err(MeteredError::Refused(rule.to_string()))
                }
                Err(e) => Err(MeteredError::Unavailable(e.to_string())),
            }
        })
    })
}

/// The embedded data plane's metered usage, applied to the store like a data plane's report.
/// A report the store refuses by its rules is dropped (logged by the store's counting).
fn store_report_sink(store: &Store) -> crate::usage::ReportSink {
    let sink = store_metered_sink(store);
    Arc::new(move |report| {
        let applied = sink(report.to_input());
        Box::pin(async move {
            match applied.await {
                Ok(()) | Err(MeteredError::Refused(_)) => Ok(()),
                Err(MeteredError::Unavailable(e)) => Err(e),
            }
        })
    })
}

/// `/metrics`, `/healthz` and `/readyz`, with the subscriber count when data planes can
/// subscribe and the failing secret references in `/readyz`'s detail.
fn serve_metrics(
    listener: TcpListener,
    cell: SnapshotCell,
    secrets: Secrets,
    distribution: Option<&DistributionService>,
    shutdown: &mut Shutdown,
) {
    let count = distribution.map(|svc| {
        let svc = svc.clone();
        Arc::new(move || svc.subscriber_count()) as Arc<dyn Fn() -> i64 + Send + Sync>
    });
    let failures: crate::health::SecretFailures = Arc::new(move || secrets.failing());
    let sources =
        crate::health::HealthSources::new(cell, None, count).with_secret_failures(failures);
    shutdown.spawn(crate::health::serve(listener, sources, shutdown.recv()));
}

/// The admin listener: KeyAdmin (token required), health and reflection (open), and the
/// snapshot stream unless it has a listener of its own.
async fn serve_admin(
    listener: TcpListener,
    admin: AdminService,
    distribution: Option<(DistributionService, SubscriberAuth)>,
    distribution_listener: Option<TcpListener>,
    tls: &Option<ServerTlsConfig>,
    shutdown: &mut Shutdown,
) -> Result<(), StartError> {
    let mut health = Health::new();
    health.report(ADMIN_SERVICE, ServingStatus::Serving).await;
    let (reflection_v1, reflection_v1alpha) = reflection(&[
        crate::proto::FILE_DESCRIPTOR_SET,
        tonic_health::pb::FILE_DESCRIPTOR_SET,
    ])?;
    let mut router = grpc_server(tls)?
        .add_service(health.service())
        .add_service(reflection_v1)
        .add_service(reflection_v1alpha)
        .add_service(admin.into_server());
    match (distribution, distribution_listener) {
        (Some((svc, auth)), Some(own)) => {
            serve_distribution(own, svc, auth, tls, shutdown).await?;
        }
        (Some((svc, auth)), None) => {
            health
                .report(DISTRIBUTION_SERVICE, ServingStatus::Serving)
                .await;
            router = router.add_service(svc.into_server(auth));
        }
        (None, _) => tracing::info!(
            "no subscriber token (KEYGATE_SUBSCRIBER_TOKEN / --subscriber-token-file): data planes cannot subscribe"
        ),
    }
    serve(router, listener, health, "admin", shutdown);
    Ok(())
}

/// The snapshot stream on its own listener (`--distribution-addr`), with its own health.
async fn serve_distribution(
    listener: TcpListener,
    svc: DistributionService,
    auth: SubscriberAuth,
    tls: &Option<ServerTlsConfig>,
    shutdown: &mut Shutdown,
) -> Result<(), StartError> {
    let mut health = Health::new();
    health
        .report(DISTRIBUTION_SERVICE, ServingStatus::Serving)
        .await;
    let router = grpc_server(tls)?
        .add_service(health.service())
        .add_service(svc.into_server(auth));
    serve(router, listener, health, "distribution", shutdown);
    Ok(())
}

#[cfg(test)]
mod tests {
    use clap::Parser;
    use tonic_health::pb::HealthCheckRequest;
    use tonic_health::pb::health_check_response::ServingStatus as Status;
    use tonic_health::pb::health_client::HealthClient;

    use super::*;
    use crate::config::{Cli, Command};

    #[tokio::test]
    async fn the_dedicated_distribution_listener_turns_not_serving_at_shutdown() {
        let dir = tempfile::tempdir().unwrap();
        let token = dir.path().join("subscriber.token");
        crate::crypto::write_private_file(&token, b"subscriber-token-0123456789abcdef\n").unwrap();
        let cli = Cli::try_parse_from([
            "keygate",
            "control-plane",
            "--data-dir",
            &dir.path().join("data").display().to_string(),
            "--admin-addr=127.0.0.1:0",
            "--distribution-addr=127.0.0.1:0",
            "--metrics-addr=127.0.0.1:0",
            "--shutdown-grace=1s",
            "--subscriber-token-file",
            &token.display().to_string(),
        ])
        .unwrap();
        let Command::ControlPlane(args) = cli.command else {
            unreachable!()
        };
        let running = start_control_plane(&args, None).await.unwrap();
        let Role::ControlPlane(cp) = &running.role else {
            panic!("a control plane")
        };
        let addr = cp.distribution_addr.expect("its own listener");
        let channel = tonic::transport::Endpoint::from_shared(format!("http://{addr}"))
            .unwrap()
            .connect()
            .await
            .unwrap();
        let mut health = HealthClient::new(channel);
        let watch = HealthCheckRequest {
            service: DISTRIBUTION_SERVICE.into(),
        };
        let mut updates = health.watch(watch).await.unwrap().into_inner();
        let first = updates.message().await.unwrap().unwrap();
        assert_eq!(first.status, Status::Serving as i32);
        let stopping = tokio::spawn(running.stop());
        let next = updates.message().await.unwrap().unwrap();
        assert_eq!(next.status, Status::NotServing as i32);
        stopping.await.unwrap();
    }
}
