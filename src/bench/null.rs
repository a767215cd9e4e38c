//! `keygate bench null`: an ext_authz server that allows everything and does nothing else,
//! the baseline the load generator compares a real data plane with. Depends on `server`
//! (listener set-up, shutdown signal, start-up errors) and the Envoy protos.

use std::net::SocketAddr;

use envoy_types::ext_authz::v3::pb::{
    Authorization, AuthorizationServer, CheckRequest, CheckResponse,
};
use envoy_types::pb::google::rpc;
use tonic::transport::Server;

use crate::server::StartError;

/// An ext_authz server that allows everything and does nothing else.
#[derive(Clone, Copy, Debug, Default)]
pub struct NullAuthz;

#[tonic::async_trait]
impl Authorization for NullAuthz {
    async fn check(
        &self,
        _req: tonic::Request<CheckRequest>,
    ) -> Result<tonic::Response<CheckResponse>, tonic::Status> {
        Ok(tonic::Response::new(CheckResponse {
            status: Some(rpc::Status::default()),
            ..Default::default()
        }))
    }
}

/// Serves the null ext_authz on `listener` until `shutdown` resolves.
pub async fn serve_null(
    listener: tokio::net::TcpListener,
    shutdown: impl std::future::Future<Output = ()>,
) -> Result<(), tonic::transport::Error> {
    Server::builder()
        .add_service(AuthorizationServer::new(NullAuthz))
        .serve_with_incoming_shutdown(crate::server::incoming(listener), shutdown)
        .await
}

/// `keygate bench null --addr …`: binds, logs the address, serves until a shutdown signal.
pub(super) async fn run(addr: SocketAddr) -> Result<(), StartError> {
    let listener = tokio::net::TcpListener::bind(addr)
        .await
        .map_err(|source| StartError::Io {
            context: format!("binding {addr}"),
            source,
        })?;
    let local = listener.local_addr().map_err(|source| StartError::Io {
        context: "null ext_authz address".into(),
        source,
    })?;
    tracing::info!(addr = %local, "null ext_authz ready");
    serve_null(listener, crate::server::shutdown_signal())
        .await
        .map_err(|e| StartError::Config(format!("null ext_authz: {e}")))
}
