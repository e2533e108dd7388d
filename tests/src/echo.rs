//! The benchmark baseline: a gRPC echo over the same TLS stack, runtime and accept loop as the real
//! servers, with no application logic.

use std::future::Future;

use client_sdk::tls::{self, RevocationSet, TlsIdentity};
use exchange_proto::v1::echo_server::{Echo, EchoServer};
use exchange_proto::v1::EchoMessage;
use tokio::net::TcpListener;
use tonic::{Request, Response, Status};

struct EchoService;

#[tonic::async_trait]
impl Echo for EchoService {
    async fn echo(&self, req: Request<EchoMessage>) -> Result<Response<EchoMessage>, Status> {
        Ok(Response::new(req.into_inner()))
    }
}

/// Serves the echo service on `listener` over mutual TLS until `shutdown` resolves.
pub async fn run_echo(
    listener: TcpListener,
    id: &TlsIdentity,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> anyhow::Result<()> {
    let config = tls::server_config(id, RevocationSet::default())?;
    let incoming = tls::serve_incoming(listener, config, 4096);
    tonic::transport::Server::builder()
        .add_service(EchoServer::new(EchoService))
        .serve_with_incoming_shutdown(incoming, shutdown)
        .await?;
    Ok(())
}
