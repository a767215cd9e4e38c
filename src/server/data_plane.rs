//! `keygate authz`: an ext_authz data plane fed by a control plane. Its start-up is the
//! data-plane bootstrap the Envoy module uses too (`distribution::bootstrap`); then the
//! listeners (ext_authz, metrics), the usage flusher and the subscription.
//! Depends on `authz`, `config`, `distribution`, `metrics`, `usage` and the rest of `server`.

use std::sync::Arc;
use std::time::Duration;

use tokio::sync::oneshot;

use super::authz_listener::{bind_authz, check_exposure, start_rate_limits};
use super::listeners::{bind, serve_authz, server_tls};
use super::shutdown::Shutdown;
use super::{DataPlane, Role, Running, StartError};
use crate::authz::ExtAuthzService;
use crate::config::AuthzArgs;
use crate::distribution::bootstrap::{
    DataPlaneFeed, DataPlaneSettings, SettingNames, TokenPrecedence, bootstrap,
};
use crate::distribution::subscriber::{ClientTls, EndpointFields, hostname};

/// How `keygate authz`'s errors name its settings (its flags).
const FLAGS: SettingNames = SettingNames {
    endpoint: EndpointFields {
        url: "--control-plane",
        ca: "--control-plane-ca",
        cert: "--client-cert",
        key: "--client-key",
    },
    token_file: "--subscriber-token-file",
    data_dir: "--data-dir",
    master_key_file: "--master-key-file",
};

/// Starts `keygate authz`: returns once its listeners are bound.
pub async fn start_authz(args: AuthzArgs) -> Result<Running, StartError> {
    let decision = args
        .data_plane
        .decision_config()
        .map_err(StartError::Config)?;
    check_exposure(&args.authz, args.tls.tls_client_ca.is_some())?;
    let tls = server_tls(&args.tls)?;
    let feed = bootstrap_feed(&args)?;
    feed.load_cache();

    let mut shutdown = Shutdown::new(args.shutdown_grace);
    let (listener, authz_addr) = bind_authz(&args.authz.authz_addr).await?;
    let (metrics_listener, metrics_addr) = bind(args.metrics_addr, "metrics").await?;
    let sources =
        crate::health::HealthSources::new(feed.cell.clone(), Some(feed.status.clone()), None);
    shutdown.spawn(crate::health::serve(
        metrics_listener,
        sources,
        shutdown.recv(),
    ));
    let (recorder, flusher) =
        crate::usage::start(feed.usage_sink(), Duration::from_secs(1), shutdown.recv());
    shutdown.spawn(flusher);
    let limiter = start_rate_limits(&args.data_plane, &mut shutdown)?;
    let svc = ExtAuthzService::new(feed.cell.clone(), feed.keys.hasher.clone(), decision)
        .with_usage(recorder)
        .with_rate_limiter(limiter.clone());
    // The last report comes after the drain: responses still streaming when shutdown begins
    // are metered into the tally as they end.
    let tally = Arc::new(crate::usage::Tally::default());
    let drained = shutdown.drained();
    shutdown.spawn_last(crate::usage::metered::start_reporter(
        tally.clone(),
        feed.report_sink(),
        args.data_plane.usage_report_interval,
        drained,
    ));
    let metering = crate::authz::ext_proc::ExtProcService::new(
        feed.cell.clone(),
        feed.keys.hasher.clone(),
        tally,
    )
    .with_rate_limiter(limiter);
    serve_authz(
        listener,
        svc,
        metering,
        feed.cell.clone(),
        &tls,
        &mut shutdown,
    )
    .await?;

    let (fatal_tx, fatal) = oneshot::channel();
    let subscription = feed.subscriber().run(shutdown.recv());
    shutdown.spawn(async move {
        if let Err(e) = subscription.await {
            let _ = fatal_tx.send(StartError::Config(e.to_string()));
        }
    });
    tracing::info!(authz_addr = %authz_addr, metrics_addr = %metrics_addr, control_plane = %args.control_plane, "keygate ready");
    Ok(Running {
        snapshots: feed.cell.clone(),
        metrics_addr,
        role: Role::DataPlane(DataPlane {
            authz_addr,
            subscriber: feed.status.clone(),
            fatal,
        }),
        shutdown,
    })
}

/// The shared data-plane bootstrap, from the flags: the master key defaults to
/// `<data-dir>/master.key` (never generated here: it must be the control plane's).
fn bootstrap_feed(args: &AuthzArgs) -> Result<DataPlaneFeed, StartError> {
    let master_key_file = args
        .master_key_file
        .clone()
        .unwrap_or_else(|| args.data_dir.join("master.key"));
    Ok(bootstrap(&DataPlaneSettings {
        control_plane: &args.control_plane,
        tls: &ClientTls {
            ca: args.control_plane_ca.clone(),
            cert: args.client_cert.clone(),
            key: args.client_key.clone(),
        },
        master_key_file: &master_key_file,
        data_dir: &args.data_dir,
        token_file: args.subscriber_token_file.as_deref(),
        token_precedence: TokenPrecedence::EnvFirst,
        name: hostname().unwrap_or_else(|| "data-plane".into()),
        names: &FLAGS,
    })?)
}
