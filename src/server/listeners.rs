//! The gRPC listeners' common parts: binding, TLS, HTTP/2 keep-alives, reflection, health,
//! and serving a router until shutdown (health NOT_SERVING first, then stop accepting and
//! drain), plus the ext_authz listener `serve` and `authz` share.
//! Depends on `authz`, `snapshot`, `proto` and the rest of `server`.

use std::net::SocketAddr;
use std::path::Path;
use std::time::Duration;

use tokio::net::TcpListener;
use tonic::transport::server::Router;
use tonic::transport::{Certificate, Identity, Server, ServerTlsConfig};
use tonic_health::ServingStatus;
use tonic_health::pb::health_server::HealthServer;
use tonic_health::server::{HealthReporter, HealthService};

use super::authz_listener::AuthzListener;
use super::shutdown::Shutdown;
use super::{AUTHZ_SERVICE, StartError};
use crate::authz::ExtAuthzService;
use crate::config::ServerTlsArgs;
use crate::snapshot::SnapshotCell;

/// Accepted connections with TCP_NODELAY: without it, small gRPC answers wait ~40 ms for
/// Nagle and delayed ACKs (measured through Envoy: 44 ms per allowed request).
pub fn incoming(listener: TcpListener) -> tonic::transport::server::TcpIncoming {
    tonic::transport::server::TcpIncoming::from(listener).with_nodelay(Some(true))
}

/// A bound listener and the address it got (the port may have been 0).
pub(super) async fn bind(
    addr: SocketAddr,
    what: &str,
) -> Result<(TcpListener, SocketAddr), StartError> {
    let io = |source| StartError::Io {
        context: format!("binding the {what} listener on {addr}"),
        source,
    };
    let listener = TcpListener::bind(addr).await.map_err(io)?;
    let local = listener.local_addr().map_err(|source| StartError::Io {
        context: format!("{what} address"),
        source,
    })?;
    Ok((listener, local))
}

fn read_pem(p: &Path, what: &str) -> Result<Vec<u8>, StartError> {
    std::fs::read(p).map_err(|e| StartError::Config(format!("{what} {}: {e}", p.display())))
}

/// rustls server TLS from the flags (mTLS with a client CA), or none.
pub(super) fn server_tls(args: &ServerTlsArgs) -> Result<Option<ServerTlsConfig>, StartError> {
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

/// A gRPC server with keep-alives (a dead peer is noticed within seconds) and `tls`.
pub(super) fn grpc_server(tls: &Option<ServerTlsConfig>) -> Result<Server, StartError> {
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

/// A listener's `grpc.health.v1` service: the server as a whole ("", SERVING unless set
/// otherwise) and the services reported on it, all turned NOT_SERVING when shutdown begins.
pub(super) struct Health {
    reporter: HealthReporter,
    services: Vec<&'static str>,
}

impl Health {
    pub fn new() -> Self {
        Health {
            reporter: HealthReporter::new(),
            services: Vec::new(),
        }
    }

    /// The gRPC service to add to the listener's router.
    pub fn service(&self) -> HealthServer<HealthService> {
        HealthServer::new(HealthService::from_health_reporter(self.reporter.clone()))
    }

    /// Reports `service` (or "" for the server) as `status`; it goes NOT_SERVING at shutdown.
    pub async fn report(&mut self, service: &'static str, status: ServingStatus) {
        self.reporter.set_service_status(service, status).await;
        if !service.is_empty() && !self.services.contains(&service) {
            self.services.push(service);
        }
    }

    async fn not_serving(&self) {
        for s in std::iter::once(&"").chain(&self.services) {
            self.reporter
                .set_service_status(*s, ServingStatus::NotServing)
                .await;
        }
    }
}

/// Serves `router` on `listener` until shutdown: health NOT_SERVING as shutdown begins,
/// then stop accepting and drain in-flight requests (within `shutdown`'s grace period).
pub(super) fn serve(
    router: Router,
    listener: TcpListener,
    health: Health,
    what: &'static str,
    shutdown: &mut Shutdown,
) {
    serve_incoming(router, incoming(listener), health, what, shutdown)
}

/// [`serve`] over any stream of accepted connections (TCP or a Unix domain socket).
fn serve_incoming<I, IO, IE>(
    router: Router,
    connections: I,
    health: Health,
    what: &'static str,
    shutdown: &mut Shutdown,
) where
    I: futures::Stream<Item = Result<IO, IE>> + Send + 'static,
    IO: tokio::io::AsyncRead
        + tokio::io::AsyncWrite
        + tonic::transport::server::Connected
        + Unpin
        + Send
        + 'static,
    IO::ConnectInfo: Clone + Send + Sync + 'static,
    IE: Into<Box<dyn std::error::Error + Send + Sync>>,
{
    let begun = shutdown.recv();
    shutdown.spawn(async move {
        let stop_accepting = async move {
            begun.await;
            health.not_serving().await;
        };
        if let Err(e) = router
            .serve_with_incoming_shutdown(connections, stop_accepting)
            .await
        {
            tracing::error!(error = %e, server = what, "gRPC server failed");
        }
    });
}

/// The largest `CheckRequest` accepted: room for a request body buffered by a route's
/// `with_request_body` (its `max_request_bytes` must stay below this) plus headers. gRPC's
/// default, 4 MiB, would refuse a model-scoped request with a large prompt.
pub const MAX_CHECK_REQUEST_BYTES: usize = 32 * 1024 * 1024;

/// The ext_authz listener: health NOT_SERVING until a snapshot is live, then SERVING, and
/// NOT_SERVING again at shutdown.
pub(super) async fn serve_authz(
    listener: AuthzListener,
    authz: ExtAuthzService,
    metering: crate::authz::ext_proc::ExtProcService,
    cell: SnapshotCell,
    tls: &Option<ServerTlsConfig>,
    shutdown: &mut Shutdown,
) -> Result<(), StartError> {
    let mut health = Health::new();
    health.report("", ServingStatus::NotServing).await;
    health
        .report(AUTHZ_SERVICE, ServingStatus::NotServing)
        .await;
    let reporter = health.reporter.clone();
    let begun = shutdown.recv();
    shutdown.spawn(async move {
        tokio::select! {
            _ = cell.wait_for(i64::MIN) => {
                reporter.set_service_status("", ServingStatus::Serving).await;
                reporter.set_service_status(AUTHZ_SERVICE, ServingStatus::Serving).await;
            }
            _ = begun => {}
        }
    });
    let (reflection_v1, reflection_v1alpha) = reflection(&[tonic_health::pb::FILE_DESCRIPTOR_SET])?;
    let router = grpc_server(tls)?
        .add_service(health.service())
        .add_service(reflection_v1)
        .add_service(reflection_v1alpha)
        .add_service(
            envoy_types::ext_authz::v3::pb::AuthorizationServer::new(authz)
                .max_decoding_message_size(MAX_CHECK_REQUEST_BYTES),
        )
        .add_service(
            crate::authz::ext_proc::ExternalProcessorServer::new(metering)
                .max_decoding_message_size(MAX_CHECK_REQUEST_BYTES),
        );
    match listener {
        AuthzListener::Tcp(l) => serve(router, l, health, "ext_authz", shutdown),
        AuthzListener::Unix(l) => serve_incoming(
            router,
            tokio_stream::wrappers::UnixListenerStream::new(l),
            health,
            "ext_authz",
            shutdown,
        ),
    }
    Ok(())
}

/// gRPC reflection, v1 and v1alpha (grpcurl 1.8.6 speaks v1alpha), each listing every
/// service on the port: the given descriptor sets plus both reflection services.
#[allow(clippy::type_complexity)]
pub(super) fn reflection(
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
