//! Starting and stopping the node: check the identity, open the store, start registration, serve gRPC
//! over mutual TLS until the shutdown future resolves, then drain.

use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use client_sdk::auth::IdentityInterceptor;
use client_sdk::catalog::CatalogFile;
use client_sdk::identity::Role;
use client_sdk::tls::{self, RevocationSet, TlsIdentity};
use exchange_proto::limits::MAX_MESSAGE_BYTES;
use exchange_proto::v1::exchange_node_server::ExchangeNodeServer;
use tokio::net::TcpListener;
use tokio::sync::{oneshot, watch};
use tonic::service::interceptor::InterceptedService;
use tonic::transport::Server;

use client_sdk::admin::health::Health;
use client_sdk::admin::metrics::{GrpcMetricsLayer, Metrics};
use client_sdk::admin::server::{self as admin, AdminSource, AdminState};
use client_sdk::admin::AdminConfig;

use crate::admin::NodeAdmin;
use crate::audit::{self, AuditKeys, AuditLog};
use crate::config::Config;
use crate::consumer::{Consumer, ConsumerSettings};
use crate::error::NodeError;
use crate::events::{EventSettings, Events};
use crate::policy::Policy;
use crate::quota::QuotaTable;
use crate::records::sled::SledRecordStore;
use crate::records::RecordStore;
use crate::registration::{CatalogToPublish, Registrar, Timing};
use crate::relay::{Exchange, RelayService};
use crate::reload;
use crate::service::NodeService;
use crate::state::NodeState;
use crate::store::{NodeStore, SledStore};
use crate::sync::DirectorySync;
use exchange_proto::v1::relay_server::RelayServer;

/// The gRPC name of the ExchangeNode service, as health checks ask for it.
pub const NODE_SERVICE_NAME: &str = "govexchange.v1.ExchangeNode";
/// The gRPC name of the node-to-node Relay service.
pub const RELAY_SERVICE_NAME: &str = "govexchange.v1.Relay";

/// Runs the node on `listener` until `shutdown` resolves, then stops heartbeats, lets in-flight calls
/// finish (at most `shutdown_grace_seconds`) and flushes the store.
///
/// Refuses to start (returns an error at once) when the certificate does not have role `node`, the TLS
/// files or the catalog file cannot be read, or the store cannot be opened.
pub async fn run(
    listener: TcpListener,
    config: Config,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> Result<(), NodeError> {
    run_with_timing(listener, config, Timing::default(), shutdown).await
}

/// [`run`] with the registration delays given (tests shorten them).
pub async fn run_with_timing(
    listener: TcpListener,
    config: Config,
    timing: Timing,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> Result<(), NodeError> {
    run_with_admin(listener, None, config, timing, shutdown).await
}

/// [`run_with_timing`] with the admin port's listener bound by the caller (tests bind port 0). Without
/// one, the node binds `[admin] listen` itself when the config has an `[admin]` table.
pub async fn run_with_admin(
    listener: TcpListener,
    admin_listener: Option<TcpListener>,
    config: Config,
    timing: Timing,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> Result<(), NodeError> {
    run_with_reload(listener, admin_listener, config, timing, None, shutdown).await
}

/// [`run_with_admin`] that also hands the node's [`reload::Reloadable`] to `reload_out` once the node is
/// set up (before it serves): what SIGHUP and `POST /api/reload` call, for embedders and tests that rotate
/// the certificate in process.
pub async fn run_with_reload(
    listener: TcpListener,
    admin_listener: Option<TcpListener>,
    config: Config,
    timing: Timing,
    reload_out: Option<oneshot::Sender<reload::Reloadable>>,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> Result<(), NodeError> {
    let admin_listener = match (admin_listener, &config.admin) {
        (Some(l), _) => Some(l),
        (None, Some(admin)) => Some(
            TcpListener::bind(admin.listen)
                .await
                .map_err(|e| NodeError::Serve(format!("cannot listen on admin.listen {}: {e}", admin.listen)))?,
        ),
        (None, None) => None,
    };
    let admin_config = match (&admin_listener, &config.admin) {
        (None, _) => None,
        (Some(_), Some(a)) => Some(a.clone()),
        (Some(l), None) => Some(AdminConfig::new(l.local_addr().map_err(|e| NodeError::Serve(e.to_string()))?)),
    };
    let admin_token = match &admin_config {
        Some(a) => a.load_token().map_err(NodeError::Config)?,
        None => None,
    };
    let metrics = Metrics::new();
    let tls_identity = TlsIdentity::load(&config.tls)?;
    let me = tls_identity.identity.clone();
    if me.role != Role::Node {
        return Err(NodeError::WrongRole { role: me.role, name: me.name });
    }

    // Read the catalog file before anything else: a broken file stops the start, where it is noticed.
    let catalog = match &config.catalog_file {
        Some(path) => {
            let entries = CatalogFile::load_entries(path)?;
            tracing::info!(file = %path.display(), entries = entries.len(), "catalog file read");
            Some(CatalogToPublish { path: path.clone(), entries })
        }
        None => None,
    };

    let sled_store = SledStore::open(&config.data_dir)?;
    let db = sled_store.db().clone();
    let store: Arc<dyn NodeStore> = Arc::new(sled_store);
    if let Some(previous) = store.last_registration()?.and_then(|r| r.node) {
        if previous.address != config.advertise_address {
            tracing::info!(previous = %previous.address, now = %config.advertise_address, "advertise address changed since the last registration");
        }
    }
    // The node's copy of the directory's rules; loading it fills the revocation set, so certificates
    // revoked before a restart stay refused even if the directory is unreachable now.
    let revocations = RevocationSet::default();
    let policy = Arc::new(Policy::open(&db, &me.department, revocations.clone())?);
    policy.set_max_staleness(Duration::from_secs(config.relay.max_directory_staleness_seconds));
    let records: Arc<dyn RecordStore> =
        Arc::new(SledRecordStore::open(&db).map_err(|e| NodeError::Store(e.to_string()))?);
    let keys = AuditKeys::load_or_create(&config.data_dir).map_err(|e| NodeError::Store(e.to_string()))?;
    let audit_log = Arc::new(AuditLog::open(&db, keys.signing_key().clone()).map_err(|e| NodeError::Store(e.to_string()))?);
    let quotas = Arc::new(QuotaTable::new(&config.quotas).map_err(|e| NodeError::Config(e.to_string()))?);
    tracing::info!(
        provided_resources = policy.provided_resources(),
        grants_version = policy.grants_version(),
        revoked = revocations.len(),
        audit_entries = audit_log.len(),
        quota_rules = config.quotas.len(),
        "node state loaded"
    );

    let server_tls = tls::server_config(&tls_identity, revocations.clone())?;
    let directory_channel = client_sdk::client::DirectoryChannel::new(&config.directory_address, &tls_identity)?;
    let directory = directory_channel.client();
    let state = Arc::new(NodeState::new(me.clone(), config.advertise_address.clone()));
    let exchange = Arc::new(Exchange {
        me: me.clone(),
        policy: policy.clone(),
        records,
        audit: audit_log.clone(),
        hasher: Arc::new(keys.hasher().clone()),
        quotas: quotas.clone(),
        metrics: metrics.clone(),
    });
    let consumer = Arc::new(Consumer::new(
        exchange.clone(),
        directory.clone(),
        tls_identity.clone(),
        revocations.clone(),
        ConsumerSettings {
            directory_address: config.directory_address.clone(),
            call_timeout: Duration::from_secs(config.relay.call_timeout_seconds),
            resolve_cache: Duration::from_secs(config.relay.resolve_cache_seconds),
        },
        &db,
    )?);

    let (stop_tx, stop_rx) = watch::channel(false);
    let events = Events::new(
        exchange.clone(),
        consumer.clone(),
        directory.clone(),
        &db,
        EventSettings { call_timeout: Duration::from_secs(config.relay.call_timeout_seconds), ..EventSettings::default() },
        stop_rx.clone(),
    )?;
    events.start()?;
    let registration = Registrar {
        directory: directory.clone(),
        directory_address: config.directory_address.clone(),
        state: state.clone(),
        store: store.clone(),
        audit_verifying_key_hex: keys.verifying_key_hex(),
        audit: Some(audit_log.clone()),
        catalog,
        timing: timing.clone(),
    }
    .spawn(stop_rx.clone());
    let forget = consumer.clone();
    let sync = DirectorySync {
        directory: directory.clone(),
        directory_address: config.directory_address.clone(),
        policy: policy.clone(),
        state: state.clone(),
        timing,
        on_foreign_change: Arc::new(move |code: &str| forget.forget(code)),
    }
    .spawn(stop_rx.clone());
    let sealer = audit::spawn_sealer(audit_log.clone(), Duration::from_secs(config.relay.audit_seal_seconds), stop_rx.clone());
    let reloadable = reload::Reloadable {
        source: config.source.clone(),
        tls_paths: config.tls.clone(),
        tls: tls_identity.clone(),
        quotas: quotas.clone(),
        consumer: consumer.clone(),
        directory: directory_channel.clone(),
    };
    if let Some(out) = reload_out {
        let _ = out.send(reloadable.clone());
    }
    let reloader = tokio::spawn(reload::reload_task(reloadable.clone(), stop_rx.clone()));

    let (health, health_service) = tonic_health::server::health_reporter();
    health.set_service_status(NODE_SERVICE_NAME, tonic_health::ServingStatus::Serving).await;
    health.set_service_status(RELAY_SERVICE_NAME, tonic_health::ServingStatus::Serving).await;
    let reflection = |b: tonic_reflection::server::Builder<'static>| {
        b.register_encoded_file_descriptor_set(exchange_proto::FILE_DESCRIPTOR_SET)
            .register_encoded_file_descriptor_set(tonic_health::pb::FILE_DESCRIPTOR_SET)
    };
    let reflection_v1 = reflection(tonic_reflection::server::Builder::configure())
        .build_v1()
        .map_err(|e| NodeError::Serve(e.to_string()))?;
    let reflection_v1alpha = reflection(tonic_reflection::server::Builder::configure())
        .build_v1alpha()
        .map_err(|e| NodeError::Serve(e.to_string()))?;

    let health_state = Health::new(health.clone(), vec!["", NODE_SERVICE_NAME, RELAY_SERVICE_NAME]);
    let admin_task = match (admin_listener, admin_config) {
        (Some(admin_listener), Some(admin_config)) => {
            let source_admin: Arc<dyn AdminSource> = Arc::new(NodeAdmin {
                tls: tls_identity.clone(),
                admin: admin_config.clone(),
                grpc_address: config.advertise_address.clone(),
                directory_address: config.directory_address.clone(),
                data_dir: config.data_dir.clone(),
                db: db.clone(),
                exchange: exchange.clone(),
                events: events.clone(),
                state: state.clone(),
                metrics: metrics.clone(),
                directory: directory.clone(),
                reload: Arc::new(move || reloadable.reload_all()),
                backup: Arc::new(crate::backup::NodeBackupSource {
                    db: db.clone(),
                    events: events.clone(),
                    data_dir: config.data_dir.clone(),
                }),
            });
            let admin_state = AdminState {
                source: source_admin.clone(),
                metrics: metrics.clone(),
                health: health_state.clone(),
                department: me.department.clone(),
                token: admin_token.map(Arc::new),
                open_probes: admin_config.open_probes,
            };
            let refresher = health_state.spawn_refresher(source_admin, stop_rx.clone());
            let admin_tls = tls_identity.clone();
            let admin_revoked = revocations.clone();
            let mut admin_stop = stop_rx.clone();
            let serve = tokio::spawn(async move {
                let stopped = async move {
                    let _ = admin_stop.wait_for(|s| *s).await;
                };
                if let Err(e) = admin::serve(admin_listener, &admin_tls, admin_revoked, &admin_config, admin_state, stopped).await {
                    tracing::error!(error = %e, "admin port failed");
                }
            });
            Some((serve, refresher))
        }
        _ => None,
    };
    let relay_service = RelayServer::new(RelayService::new(exchange.clone(), directory.clone(), events.clone()))
        .max_decoding_message_size(MAX_MESSAGE_BYTES)
        .max_encoding_message_size(MAX_MESSAGE_BYTES);
    let node_service =
        ExchangeNodeServer::new(NodeService::new(directory, config.directory_address.clone(), state, exchange, consumer, events.clone()))
            .max_decoding_message_size(MAX_MESSAGE_BYTES)
            .max_encoding_message_size(MAX_MESSAGE_BYTES);
    // Health and reflection pass the same per-call check: a revoked certificate cannot even probe them.
    let interceptor = IdentityInterceptor::new(revocations);

    let local = listener.local_addr().map_err(|e| NodeError::Serve(e.to_string()))?;
    let incoming = tls::serve_incoming(listener, server_tls, config.max_connections);

    // The shutdown signal: mark the node not serving, stop heartbeats, then let tonic drain.
    let (signalled_tx, signalled_rx) = oneshot::channel::<()>();
    let stop_for_signal = stop_tx.clone();
    let health_for_signal = health_state.clone();
    let mut health = health;
    let signal = async move {
        shutdown.await;
        tracing::info!("shutting down: stopping heartbeats, draining in-flight calls");
        let _ = stop_for_signal.send(true);
        health_for_signal.stop();
        // Health watchers see NOT_SERVING, then their streams end (clearing drops the status sender);
        // an open health watch would otherwise hold the drain until the grace period runs out.
        for name in ["", NODE_SERVICE_NAME, RELAY_SERVICE_NAME] {
            health.set_service_status(name, tonic_health::ServingStatus::NotServing).await;
            health.clear_service_status(name).await;
        }
        let _ = signalled_tx.send(());
    };

    tracing::info!(
        listen = %local,
        node = %me,
        advertise = %config.advertise_address,
        directory = %config.directory_address,
        "exchange node serving"
    );
    let serve = Server::builder()
        .layer(GrpcMetricsLayer::new(metrics.clone()))
        .http2_keepalive_interval(Some(Duration::from_secs(30)))
        .http2_keepalive_timeout(Some(Duration::from_secs(10)))
        .add_service(InterceptedService::new(node_service, interceptor.clone()))
        .add_service(InterceptedService::new(relay_service, interceptor.clone()))
        .add_service(InterceptedService::new(health_service, interceptor.clone()))
        .add_service(InterceptedService::new(reflection_v1, interceptor.clone()))
        .add_service(InterceptedService::new(reflection_v1alpha, interceptor))
        .serve_with_incoming_shutdown(incoming, signal);
    let grace = Duration::from_secs(config.shutdown_grace_seconds);
    let drain_deadline = async move {
        if signalled_rx.await.is_err() {
            std::future::pending::<()>().await;
        }
        tokio::time::sleep(grace).await;
    };
    let served = tokio::select! {
        result = serve => result.map_err(|e| NodeError::Serve(tls::error_chain(&e))),
        _ = drain_deadline => {
            tracing::warn!(grace_seconds = grace.as_secs(), "in-flight calls did not finish in time; closing them");
            Ok(())
        }
    };

    let _ = stop_tx.send(true);
    let _ = registration.await;
    let _ = sync.await;
    let _ = reloader.await;
    let _ = sealer.await;
    if let Some((serve, refresher)) = admin_task {
        let _ = refresher.await;
        let _ = serve.await;
    }
    events.stopped().await;
    // The sealer stopped when draining began; calls that finished since appended entries: seal them too,
    // so every entry of this run is covered by a signature.
    if let Err(e) = audit_log.seal(audit::now_us()) {
        tracing::error!(error = %e, "could not seal the audit trail on shutdown");
    }
    store.flush()?;
    tracing::info!("exchange node stopped");
    served
}

#[cfg(test)]
mod tests {
    use super::*;
    use tonic::server::NamedService;

    #[test]
    fn health_uses_the_generated_service_name() {
        assert_eq!(NODE_SERVICE_NAME, <ExchangeNodeServer<NodeService> as NamedService>::NAME);
        assert_eq!(RELAY_SERVICE_NAME, <RelayServer<RelayService> as NamedService>::NAME);
    }
}
