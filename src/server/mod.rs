//! Wiring: each deployment shape started from its configuration and stopped gracefully.
//! `keygate serve` and `keygate control-plane` (`control_plane`: data dir, master key, tokens,
//! store, snapshot builder, secret refresh, the admin, distribution, ext_authz and metrics
//! listeners), `keygate authz` (`data_plane`: the data-plane bootstrap shared with the Envoy
//! module, the subscriber, ext_authz and metrics), the listeners' common parts (`listeners`)
//! and one shutdown pattern (`shutdown`): signal → health NOT_SERVING → stop accepting → drain
//! within a grace period. Depends on every room below it; only `main` depends on it.

mod authz_listener;
mod control_plane;
mod data_dir;
mod data_plane;
mod listeners;
mod secret_refresh;
mod shutdown;
mod tokens;

use std::future::Future;
use std::net::SocketAddr;
use std::sync::Arc;

use tokio::sync::oneshot;

use crate::config::{AuthzAddr, ServeArgs};
use crate::distribution::SubscriberStatus;
use crate::distribution::bootstrap::BootstrapError;
use crate::distribution::token::TokenError;
use crate::snapshot::SnapshotCell;
use crate::store::{Store, StoreError};

pub use control_plane::start_control_plane;
pub use data_dir::open_store;
pub use data_plane::start_authz;
pub use listeners::incoming;
pub use shutdown::{Shutdown, Signal, shutdown_signal};

/// The ext_authz service name Envoy health-checks.
pub const AUTHZ_SERVICE: &str = "envoy.service.auth.v3.Authorization";
pub const ADMIN_SERVICE: &str = "keygate.admin.v1.KeyAdmin";
pub const DISTRIBUTION_SERVICE: &str = "keygate.snapshot.v1.SnapshotDistribution";

#[derive(Debug, thiserror::Error)]
pub enum StartError {
    /// Bad configuration or state an operator must fix (exit code 64).
    #[error("{0}")]
    Config(String),
    /// A bad admin or subscriber token (exit code 64).
    #[error(transparent)]
    Token(#[from] TokenError),
    /// A data plane that cannot start (exit code 64, 1 when its data dir cannot be made).
    #[error(transparent)]
    DataPlane(#[from] BootstrapError),
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
            StartError::Config(_) | StartError::Token(_) => 64,
            StartError::DataPlane(BootstrapError::DataDir { .. }) => 1,
            StartError::DataPlane(_) => 64,
            StartError::Store(
                StoreError::MasterKeyMismatch { .. } | StoreError::UnsupportedUrl(_),
            ) => 64,
            _ => 1,
        }
    }
}

/// A running keygate: the snapshot it serves, what it is, and how it stops.
pub struct Running {
    /// The live snapshot (built from the store, or received from a control plane).
    pub snapshots: SnapshotCell,
    /// Where `/metrics`, `/healthz` and `/readyz` are served.
    pub metrics_addr: SocketAddr,
    pub role: Role,
    shutdown: Shutdown,
}

/// Which deployment shape is running, with what only that shape has.
pub enum Role {
    /// `keygate serve`: a control plane with an ext_authz listener beside it.
    Serve {
        control_plane: ControlPlane,
        authz_addr: AuthzAddr,
    },
    /// `keygate control-plane`.
    ControlPlane(ControlPlane),
    /// `keygate authz`.
    DataPlane(DataPlane),
}

/// What a running control plane has.
pub struct ControlPlane {
    pub admin_addr: SocketAddr,
    /// The snapshot stream's own listener (`--distribution-addr`); else it is on the admin one.
    pub distribution_addr: Option<SocketAddr>,
    pub store: Store,
}

/// What a running `keygate authz` has.
pub struct DataPlane {
    pub authz_addr: AuthzAddr,
    /// Its subscription to the control plane (for health, metrics and logs).
    pub subscriber: Arc<SubscriberStatus>,
    /// An error that must stop the process (a master key that differs from the control
    /// plane's), sent by the subscriber.
    fatal: oneshot::Receiver<StartError>,
}

impl Running {
    /// The ext_authz listener's TCP address, where there is one (`None` on a Unix socket).
    pub fn authz_addr(&self) -> Option<SocketAddr> {
        match &self.role {
            Role::Serve { authz_addr, .. } | Role::DataPlane(DataPlane { authz_addr, .. }) => {
                match authz_addr {
                    AuthzAddr::Tcp(a) => Some(*a),
                    AuthzAddr::Unix(_) => None,
                }
            }
            Role::ControlPlane(_) => None,
        }
    }

    /// Graceful stop: NOT_SERVING, stop accepting, drain within the grace period.
    pub async fn stop(self) {
        self.shutdown.drain().await;
        if let Role::Serve { control_plane, .. } | Role::ControlPlane(control_plane) = &self.role {
            control_plane.store.close().await;
        }
        tracing::info!("keygate stopped");
    }

    /// Resolves with an error that must stop the process (e.g. a master key mismatch found
    /// by the subscriber); never resolves otherwise.
    pub async fn fatal(&mut self) -> StartError {
        match &mut self.role {
            Role::DataPlane(d) => match (&mut d.fatal).await {
                Ok(e) => e,
                Err(_) => std::future::pending().await,
            },
            _ => std::future::pending().await,
        }
    }
}

/// Starts `keygate serve`: returns once every listener is bound.
pub async fn start(args: ServeArgs) -> Result<Running, StartError> {
    let decision = args
        .data_plane
        .decision_config()
        .map_err(StartError::Config)?;
    let client_ca = args.control_plane.tls.tls_client_ca.is_some();
    authz_listener::check_exposure(&args.authz, client_ca)?;
    start_control_plane(
        &args.control_plane,
        Some((args.authz.authz_addr, decision, args.data_plane)),
    )
    .await
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
