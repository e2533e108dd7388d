//! The record relay's baseline: a bare two-hop gRPC forwarder over the same mutual-TLS stack as the real
//! nodes, with no application logic.
//!
//! client → [`Forwarder`] (mTLS server) → one pooled tonic channel (mTLS) → [`Backend`] (mTLS server),
//! which answers from an in-memory `HashMap` of records → back. Both serve `BenchRecords.QueryRecords`
//! with the application API's own `QueryRecordsRequest` / `QueryRecordsResponse`, so a call carries the
//! same bytes as a relayed query. The forwarder does nothing but pass the request on and the answer back:
//! no identity check, no authorization, no audit, no store.

use std::collections::HashMap;
use std::future::Future;
use std::sync::atomic::{AtomicU64, Ordering};

use client_sdk::tls::{self, RevocationSet, TlsIdentity};
use exchange_proto::limits::MAX_MESSAGE_BYTES;
use exchange_proto::v1::bench_records_client::BenchRecordsClient;
use exchange_proto::v1::bench_records_server::{BenchRecords, BenchRecordsServer};
use exchange_proto::v1::{QueryRecordsRequest, QueryRecordsResponse, Record};
use tokio::net::TcpListener;
use tonic::transport::Channel;
use tonic::{Request, Response, Status};

/// The backend: records by key, answered as the provider's node answers an unconditional resource.
pub struct Backend {
    records: HashMap<String, Record>,
    provider_code: String,
    data_items: Vec<String>,
    next_id: AtomicU64,
}

impl Backend {
    pub fn new(records: impl IntoIterator<Item = Record>, provider_code: &str, data_items: Vec<String>) -> Self {
        Backend {
            records: records.into_iter().map(|r| (r.key.clone(), r)).collect(),
            provider_code: provider_code.to_string(),
            data_items,
            next_id: AtomicU64::new(1),
        }
    }
}

#[tonic::async_trait]
impl BenchRecords for Backend {
    async fn query_records(
        &self,
        request: Request<QueryRecordsRequest>,
    ) -> Result<Response<QueryRecordsResponse>, Status> {
        let body = request.into_inner();
        let mut resp = QueryRecordsResponse {
            // 32 hex characters, like the relay's message ids.
            message_id: format!("{:032x}", self.next_id.fetch_add(1, Ordering::Relaxed)),
            provider_code: self.provider_code.clone(),
            data_items: self.data_items.clone(),
            ..Default::default()
        };
        for (i, key) in body.keys.iter().enumerate() {
            match self.records.get(key) {
                Some(r) => resp.records.push(r.clone()),
                None => resp.not_found.push(i as u32),
            }
        }
        if body.keys.len() == 1 && resp.records.is_empty() {
            return Err(Status::not_found("no record with this key"));
        }
        Ok(Response::new(resp))
    }
}

/// The forwarder: every call goes on to the backend over one shared channel (HTTP/2 multiplexes the
/// concurrent calls over one TLS connection, as a node's pooled connection to a peer node does).
pub struct Forwarder {
    backend: BenchRecordsClient<Channel>,
}

impl Forwarder {
    pub fn new(backend: Channel) -> Self {
        Forwarder {
            backend: BenchRecordsClient::new(backend)
                .max_decoding_message_size(MAX_MESSAGE_BYTES)
                .max_encoding_message_size(MAX_MESSAGE_BYTES),
        }
    }
}

#[tonic::async_trait]
impl BenchRecords for Forwarder {
    async fn query_records(
        &self,
        request: Request<QueryRecordsRequest>,
    ) -> Result<Response<QueryRecordsResponse>, Status> {
        let answer = self.backend.clone().query_records(request.into_inner()).await?;
        Ok(Response::new(answer.into_inner()))
    }
}

/// Serves `service` on `listener` over mutual TLS (the servers' TLS config and accept loop) until
/// `shutdown` resolves.
pub async fn serve<S: BenchRecords>(
    listener: TcpListener,
    id: &TlsIdentity,
    service: S,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> anyhow::Result<()> {
    let config = tls::server_config(id, RevocationSet::default())?;
    let incoming = tls::serve_incoming(listener, config, 1024);
    tonic::transport::Server::builder()
        .add_service(
            BenchRecordsServer::new(service)
                .max_decoding_message_size(MAX_MESSAGE_BYTES)
                .max_encoding_message_size(MAX_MESSAGE_BYTES),
        )
        .serve_with_incoming_shutdown(incoming, shutdown)
        .await?;
    Ok(())
}

/// A running backend + forwarder pair; [`ForwarderPair::addr`] is where clients call.
pub struct ForwarderPair {
    pub addr: String,
    pub backend_addr: String,
    stops: Vec<tokio::sync::oneshot::Sender<()>>,
    tasks: Vec<tokio::task::JoinHandle<anyhow::Result<()>>>,
}

impl ForwarderPair {
    /// Starts the backend (as `backend_id`, a node certificate of `provider_code`) and the forwarder (as
    /// `forwarder_id`, which dials the backend with a node-to-node client config, as a consumer node does).
    pub async fn start(
        backend_id: TlsIdentity,
        forwarder_id: TlsIdentity,
        backend: Backend,
    ) -> anyhow::Result<ForwarderPair> {
        let provider = backend.provider_code.clone();
        let mut stops = Vec::new();
        let mut tasks = Vec::new();

        let listener = TcpListener::bind("127.0.0.1:0").await?;
        let backend_addr = listener.local_addr()?.to_string();
        let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
        stops.push(stop);
        tasks.push(tokio::spawn(async move {
            serve(listener, &backend_id, backend, async { let _ = stopped.await; }).await
        }));

        let channel = tls::connect_lazy(
            &backend_addr,
            tls::peer_node_client_config(&forwarder_id, &provider, RevocationSet::default())?,
        )?;
        let listener = TcpListener::bind("127.0.0.1:0").await?;
        let addr = listener.local_addr()?.to_string();
        let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
        stops.push(stop);
        tasks.push(tokio::spawn(async move {
            serve(listener, &forwarder_id, Forwarder::new(channel), async { let _ = stopped.await; }).await
        }));
        Ok(ForwarderPair { addr, backend_addr, stops, tasks })
    }

    pub async fn shutdown(self) -> anyhow::Result<()> {
        for s in self.stops {
            let _ = s.send(());
        }
        for t in self.tasks {
            t.await??;
        }
        Ok(())
    }
}

/// A client of the forwarder (or the backend) on `channel`.
pub fn client_on(channel: Channel) -> BenchRecordsClient<Channel> {
    BenchRecordsClient::new(channel)
        .max_decoding_message_size(MAX_MESSAGE_BYTES)
        .max_encoding_message_size(MAX_MESSAGE_BYTES)
}
