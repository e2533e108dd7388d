//! The record relay's baseline: a bare two-hop gRPC forwarder over the same mutual-TLS stack as the real
//! nodes, with no application logic.
//!
//! client → [`Forwarder`] (mTLS server) → one pooled tonic channel (mTLS) → [`Backend`] (mTLS server),
//! which answers from an in-memory `HashMap` of records → back. Both serve `BenchRecords.QueryRecords`
//! with the application API's own `QueryRecordsRequest` / `QueryRecordsResponse`, so a call carries the
//! same bytes as a relayed query. The forwarder does nothing but pass the request on and the answer back:
//! no identity check, no authorization, no audit, no store.
//!
//! For the relay's cost breakdown (`bench --only relay-steps`), [`Steps`] adds the nodes' per-call steps
//! back one at a time — the per-call certificate check, an audit append on each side, a sled read through
//! `spawn_blocking` — with the nodes' own code. [`Steps::default`] is the bare baseline.

use std::collections::HashMap;
use std::future::Future;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use client_sdk::auth::IdentityInterceptor;
use client_sdk::tls::{self, RevocationSet, TlsIdentity};
use exchange_node::audit::{AuditKeys, AuditLog, KeyHasher, Side};
use exchange_node::records::{RecordStore, SledRecordStore};
use exchange_proto::limits::MAX_MESSAGE_BYTES;
use exchange_proto::v1::bench_records_client::BenchRecordsClient;
use exchange_proto::v1::bench_records_server::{BenchRecords, BenchRecordsServer};
use exchange_proto::v1::{QueryRecordsRequest, QueryRecordsResponse, Record};
use tokio::net::TcpListener;
use tonic::service::interceptor::InterceptedService;
use tonic::transport::Channel;
use tonic::{Request, Response, Status};

/// Per-call steps of the real nodes, added to the bare pair for the relay's cost breakdown.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Steps {
    /// Both servers parse the caller's certificate on every call (`client_sdk::auth::IdentityInterceptor`).
    pub identity: bool,
    /// Both servers append an audit record per call to their own audit trail (`AuditLog::append`, on the
    /// runtime thread, as the nodes do), with the key hashed (`KeyHasher`).
    pub audit: bool,
    /// The backend reads the record from a sled record store (`SledRecordStore::get_many`) ...
    pub sled: bool,
    /// ... through `tokio::task::spawn_blocking`, as the provider's node does (else on the runtime thread).
    pub blocking: bool,
}

impl Steps {
    pub fn describe(&self) -> String {
        if *self == Steps::default() {
            return "bare forwarder".into();
        }
        let mut parts = Vec::new();
        if self.identity {
            parts.push("identity check");
        }
        if self.audit {
            parts.push("audit append");
        }
        if self.sled {
            parts.push(if self.blocking { "sled read via spawn_blocking" } else { "sled read inline" });
        }
        format!("forwarder + {}", parts.join(" + "))
    }
}

/// One side's audit trail (its own sled database, as each node has).
struct Audit {
    log: AuditLog,
    hasher: KeyHasher,
    data_items: Vec<String>,
    side: Side,
    next: AtomicU64,
    _db: sled::Db,
}

impl Audit {
    fn open(dir: &std::path::Path, side: Side, data_items: Vec<String>) -> anyhow::Result<Arc<Self>> {
        let db = sled::open(dir)?;
        let keys = AuditKeys::from_secrets([3u8; 32], [5u8; 32]);
        Ok(Arc::new(Audit {
            log: AuditLog::open(&db, keys.signing_key().clone())?,
            hasher: keys.hasher().clone(),
            data_items,
            side,
            next: AtomicU64::new(1),
            _db: db,
        }))
    }

    fn append(&self, keys: &[String]) -> Result<(), Status> {
        let i = self.next.fetch_add(1, Ordering::Relaxed);
        let record = crate::relay_parts::audit_record(i, self.side, self.hasher.hash_keys(keys), &self.data_items);
        self.log.append(record).map(|_| ()).map_err(|e| Status::internal(e.to_string()))
    }
}

/// The backend: records by key, answered as the provider's node answers an unconditional resource.
pub struct Backend {
    records: HashMap<String, Record>,
    provider_code: String,
    data_items: Vec<String>,
    next_id: AtomicU64,
    store: Option<(Arc<SledRecordStore>, String, bool)>,
    audit: Option<Arc<Audit>>,
}

impl Backend {
    pub fn new(records: impl IntoIterator<Item = Record>, provider_code: &str, data_items: Vec<String>) -> Self {
        Backend {
            records: records.into_iter().map(|r| (r.key.clone(), r)).collect(),
            provider_code: provider_code.to_string(),
            data_items,
            next_id: AtomicU64::new(1),
            store: None,
            audit: None,
        }
    }

    /// Adds the backend's share of `steps`, with its stores under `dir` (records of `resource_code`).
    pub fn with_steps(mut self, steps: Steps, dir: &std::path::Path, resource_code: &str) -> anyhow::Result<Self> {
        if steps.sled {
            let db = sled::open(dir.join("records"))?;
            let store = SledRecordStore::open(&db)?;
            let all: Vec<Record> = self.records.values().cloned().collect();
            for chunk in all.chunks(1_000) {
                store.put_batch(resource_code, chunk.to_vec())?;
            }
            self.store = Some((Arc::new(store), resource_code.to_string(), steps.blocking));
        }
        if steps.audit {
            self.audit = Some(Audit::open(&dir.join("backend-audit"), Side::Provider, self.data_items.clone())?);
        }
        Ok(self)
    }

    async fn lookup(&self, keys: &[String]) -> Result<Vec<Option<Record>>, Status> {
        match &self.store {
            None => Ok(keys.iter().map(|k| self.records.get(k).cloned()).collect()),
            Some((store, code, blocking)) => {
                let internal = |e: &dyn std::fmt::Display| Status::internal(e.to_string());
                if *blocking {
                    let (store, code, keys) = (store.clone(), code.clone(), keys.to_vec());
                    tokio::task::spawn_blocking(move || store.get_many(&code, &keys))
                        .await
                        .map_err(|e| internal(&e))?
                        .map_err(|e| internal(&e))
                } else {
                    store.get_many(code, keys).map_err(|e| internal(&e))
                }
            }
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
        for (i, record) in self.lookup(&body.keys).await?.into_iter().enumerate() {
            match record {
                Some(r) => resp.records.push(r),
                None => resp.not_found.push(i as u32),
            }
        }
        if let Some(audit) = &self.audit {
            audit.append(&body.keys)?;
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
    audit: Option<Arc<Audit>>,
}

impl Forwarder {
    pub fn new(backend: Channel) -> Self {
        Forwarder {
            backend: BenchRecordsClient::new(backend)
                .max_decoding_message_size(MAX_MESSAGE_BYTES)
                .max_encoding_message_size(MAX_MESSAGE_BYTES),
            audit: None,
        }
    }
}

#[tonic::async_trait]
impl BenchRecords for Forwarder {
    async fn query_records(
        &self,
        request: Request<QueryRecordsRequest>,
    ) -> Result<Response<QueryRecordsResponse>, Status> {
        let Some(audit) = &self.audit else {
            let answer = self.backend.clone().query_records(request.into_inner()).await?;
            return Ok(Response::new(answer.into_inner()));
        };
        let body = request.into_inner();
        let keys = body.keys.clone();
        let answer = self.backend.clone().query_records(body).await;
        audit.append(&keys)?;
        Ok(Response::new(answer?.into_inner()))
    }
}

/// Serves `service` on `listener` over mutual TLS (the servers' TLS config and accept loop) until
/// `shutdown` resolves.
pub async fn serve<S: BenchRecords>(
    listener: TcpListener,
    id: &TlsIdentity,
    service: S,
    identity_check: bool,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> anyhow::Result<()> {
    let config = tls::server_config(id, RevocationSet::default())?;
    let incoming = tls::serve_incoming(listener, config, 1024);
    let service = BenchRecordsServer::new(service)
        .max_decoding_message_size(MAX_MESSAGE_BYTES)
        .max_encoding_message_size(MAX_MESSAGE_BYTES);
    let mut builder = tonic::transport::Server::builder();
    if identity_check {
        let interceptor = IdentityInterceptor::new(RevocationSet::default());
        builder
            .add_service(InterceptedService::new(service, interceptor))
            .serve_with_incoming_shutdown(incoming, shutdown)
            .await?;
    } else {
        builder.add_service(service).serve_with_incoming_shutdown(incoming, shutdown).await?;
    }
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
        Self::start_with(backend_id, forwarder_id, backend, Steps::default(), None).await
    }

    /// [`ForwarderPair::start`] with the relay's per-call `steps` added (the backend's already added with
    /// [`Backend::with_steps`]); the forwarder's audit trail goes under `dir`.
    pub async fn start_with(
        backend_id: TlsIdentity,
        forwarder_id: TlsIdentity,
        backend: Backend,
        steps: Steps,
        dir: Option<&std::path::Path>,
    ) -> anyhow::Result<ForwarderPair> {
        let provider = backend.provider_code.clone();
        let forwarder_audit = match (steps.audit, dir) {
            (true, Some(dir)) => Some(Audit::open(&dir.join("forwarder-audit"), Side::Consumer, backend.data_items.clone())?),
            (true, None) => anyhow::bail!("audit steps need a folder"),
            _ => None,
        };
        let mut stops = Vec::new();
        let mut tasks = Vec::new();

        let listener = TcpListener::bind("127.0.0.1:0").await?;
        let backend_addr = listener.local_addr()?.to_string();
        let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
        stops.push(stop);
        tasks.push(tokio::spawn(async move {
            serve(listener, &backend_id, backend, steps.identity, async { let _ = stopped.await; }).await
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
            let mut forwarder = Forwarder::new(channel);
            forwarder.audit = forwarder_audit;
            serve(listener, &forwarder_id, forwarder, steps.identity, async { let _ = stopped.await; }).await
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
