//! Starting and stopping the directory: open the stores, rebuild the search index, load revocations, then
//! serve the Directory, health and reflection services over mutual TLS until shut down.
//!
//! Two entry points:
//! - [`run`]: everything in one call (what the binary does).
//! - [`LoadedDirectory::load`] then [`LoadedDirectory::serve`]: for embedders and tests that want to know
//!   when the directory is ready (after `load`) or how long the index rebuild took.
//!
//! What clients meet at the transport:
//! - Mutual TLS only ([`client_sdk::tls::server_config`]): no client certificate, a foreign CA, an expired
//!   or revoked certificate, or plaintext HTTP/2 fail the handshake. A certificate revoked while its
//!   connection is open fails its next call with `UNAUTHENTICATED` (the interceptor checks every call).
//! - Messages larger than [`MAX_MESSAGE_BYTES`] are refused by tonic's codec from the length prefix,
//!   before the body is decoded or a handler runs, with `OUT_OF_RANGE` ("decoded message length too
//!   large"); an oversized response fails the same way on the encoding side.
//! - Health (`grpc.health.v1.Health`): `SERVING` for "" and `govexchange.v1.Directory` once loaded,
//!   `NOT_SERVING` from the moment shutdown starts.
//! - Reflection v1 and v1alpha (grpcurl builds differ in which one they speak), listing the Directory and
//!   Health services.
//!
//! Shutdown: when the `shutdown` future completes, the listener closes, catalog, grant and revocation watch
//! streams end with `UNAVAILABLE` and health watch streams end after reporting `NOT_SERVING` (streams that never finish
//! would otherwise hold the drain forever), in-flight calls run to completion, and `serve` returns once
//! every connection has closed.

use std::future::Future;
use std::sync::Arc;
use std::time::{Duration, Instant};

use client_sdk::auth::IdentityInterceptor;
use client_sdk::identity::Role;
use client_sdk::tls::{self, RevocationSet, TlsIdentity};
use exchange_proto::limits::MAX_MESSAGE_BYTES;
use exchange_proto::v1::directory_server::DirectoryServer;
use tokio::net::TcpListener;
use tokio::sync::watch;
use tonic::service::interceptor::InterceptedService;

use client_sdk::admin::health::Health;
use client_sdk::admin::metrics::{GrpcMetricsLayer, Metrics};
use client_sdk::admin::server::{self as admin, AdminSource, AdminState};
use client_sdk::admin::AdminConfig;

use crate::admin::DirectoryAdmin;
use crate::backup::DirectoryBackupSource;
use crate::config::{Config, ConfigError};
use crate::reload::Reloadable;
use crate::revocation::{AuthorityError, RevocationAuthority};
use crate::search::{CatalogIndex, SearchError};
use crate::config::StoreBackend;
use crate::follow::{ChangeFollower, StartVersions};
use crate::service::{DirectoryService, ServiceSettings};
use crate::store::{Database, StoreError, Stores};

/// The gRPC name of the Directory service (as health checks and reflection know it).
pub const DIRECTORY_SERVICE_NAME: &str = <DirectoryServer<DirectoryService> as tonic::server::NamedService>::NAME;

/// Entries read from the store per page while rebuilding the index.
const REBUILD_PAGE: usize = 10_000;

#[derive(Debug, thiserror::Error)]
pub enum ServerError {
    #[error(transparent)]
    Config(#[from] ConfigError),
    #[error("TLS: {0}")]
    Tls(#[from] tls::TlsError),
    #[error("{path}: the directory's certificate has role {role}; it needs role directory (issue one with `exchangectl pki issue --role directory`)")]
    WrongRole { path: std::path::PathBuf, role: Role },
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error("search index: {0}")]
    Search(#[from] SearchError),
    #[error(transparent)]
    Authority(#[from] AuthorityError),
    #[error("reflection service: {0}")]
    Reflection(#[from] tonic_reflection::server::Error),
    #[error("gRPC server: {0}")]
    Transport(#[from] tonic::transport::Error),
    #[error("start-up task failed: {0}")]
    Task(#[from] tokio::task::JoinError),
}

/// A directory whose state is loaded (stores open, index rebuilt, revocations loaded) and which is ready to
/// serve.
pub struct LoadedDirectory {
    config: Config,
    identity: TlsIdentity,
    stores: Stores,
    /// The database under `stores`, for the admin port (backup, size, the store check).
    database: Database,
    index: Arc<CatalogIndex>,
    revoked: RevocationSet,
    authority: RevocationAuthority,
    catalog_version: u64,
    grant_version: u64,
    revocation_version: u64,
    indexed_entries: u64,
    startup_time: Duration,
}

impl std::fmt::Debug for LoadedDirectory {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("LoadedDirectory")
            .field("identity", &self.identity.identity)
            .field("catalog_version", &self.catalog_version)
            .field("indexed_entries", &self.indexed_entries)
            .field("startup_time", &self.startup_time)
            .finish_non_exhaustive()
    }
}

impl LoadedDirectory {
    /// Checks the config and the directory's own certificate (it must have role `directory`), opens the
    /// configured store (sled in `data_dir`, or PostgreSQL: migrated to this version's schema first),
    /// rebuilds the search index from every live entry and loads revocations.
    pub async fn load(config: Config) -> Result<Self, ServerError> {
        tls::install_crypto_provider();
        config.validate()?;
        let identity = TlsIdentity::load(&config.tls)?;
        if identity.identity.role != Role::Directory {
            return Err(ServerError::WrongRole { path: config.tls.cert.clone(), role: identity.identity.role });
        }
        let authority = RevocationAuthority::new(&config.tls.ca, &identity.identity.department)?;
        let started = Instant::now();
        // The two cores work in parallel: the empty index is created (jieba loads its dictionary) while
        // sled opens and the live entries are read.
        let new_index = tokio::task::spawn_blocking(CatalogIndex::new);
        let (stores, database) = match (config.store.backend, &config.store.postgres) {
            (StoreBackend::Postgres, Some(pg)) => {
                let (stores, db) = crate::store::postgres::open(pg).await?;
                (stores, Database::Postgres(db))
            }
            _ => {
                let data_dir = config.data_dir.clone();
                let (stores, db) =
                    tokio::task::spawn_blocking(move || crate::store::sled::open_with_database(&data_dir)).await??;
                (stores, Database::Sled(db))
            }
        };
        let open_time = started.elapsed();

        // Versions first, then the state: other replicas may write meanwhile, and the change follower
        // replays everything after these versions (applying a change twice leaves the same state).
        let revocation_version = stores.revocations.current_version().await?;
        let grant_version = stores.grants.current_version().await?;
        let catalog_version = stores.catalog.current_version().await?;
        let revoked = RevocationSet::default();
        let revocations = stores.revocations.list().await?;
        revoked.replace_all(revocations.into_iter().map(|r| r.serial_hex));
        let mut live = Vec::new();
        let mut after: Option<String> = None;
        loop {
            let page = stores.catalog.live_entries_after(after.as_deref(), REBUILD_PAGE).await?;
            let Some(last) = page.last() else { break };
            after = Some(last.resource_code.clone());
            live.extend(page);
        }
        let read_time = started.elapsed() - open_time;
        let index = new_index.await??;
        let index_started = Instant::now();
        // One upsert, so the whole catalog costs one index commit.
        let (index, indexed_entries) = tokio::task::spawn_blocking(move || -> Result<_, SearchError> {
            if !live.is_empty() {
                index.upsert(&live)?;
            }
            let n = index.len();
            Ok((index, n))
        })
        .await??;
        let index_time = index_started.elapsed();
        let startup_time = started.elapsed();
        tracing::info!(
            entries = indexed_entries,
            catalog_version,
            grant_version,
            revocation_version,
            revocations = revoked.len(),
            open_ms = open_time.as_millis() as u64,
            read_ms = read_time.as_millis() as u64,
            index_ms = index_time.as_millis() as u64,
            total_ms = startup_time.as_millis() as u64,
            "search index rebuilt from the store"
        );
        Ok(LoadedDirectory {
            config,
            identity,
            stores,
            database,
            index: Arc::new(index),
            revoked,
            authority,
            catalog_version,
            grant_version,
            revocation_version,
            indexed_entries,
            startup_time,
        })
    }

    /// The catalog version found on disk.
    pub fn catalog_version(&self) -> u64 {
        self.catalog_version
    }

    /// The grant log version found on disk.
    pub fn grant_version(&self) -> u64 {
        self.grant_version
    }

    /// The revocation log version found on disk.
    pub fn revocation_version(&self) -> u64 {
        self.revocation_version
    }

    /// Live entries in the rebuilt index.
    pub fn indexed_entries(&self) -> u64 {
        self.indexed_entries
    }

    /// How long opening the store, reading the live entries and rebuilding the index took (the phases
    /// are logged separately).
    pub fn startup_time(&self) -> Duration {
        self.startup_time
    }

    /// How often the change follower looks for other replicas' writes. A sled store has no other writer,
    /// so the follower then only runs when this replica writes (the slow tick is a safety net).
    fn change_poll_interval(&self) -> Duration {
        match (&self.config.store.backend, &self.config.store.postgres) {
            (StoreBackend::Postgres, Some(pg)) => Duration::from_millis(pg.poll_interval_ms),
            _ => Duration::from_secs(1),
        }
    }

    /// What SIGHUP and the admin port's `POST /api/reload` call: its `tls` is the directory's TLS identity,
    /// whose certificate every listener reads at each handshake.
    pub fn reloadable(&self) -> Reloadable {
        Reloadable { source: self.config.source.clone(), tls_paths: self.config.tls.clone(), tls: self.identity.clone() }
    }

    /// Serves on `listener` until `shutdown` completes, then drains (see the module docs). With an
    /// `[admin]` table in the config, the admin port is bound and served too.
    pub async fn serve(
        self,
        listener: TcpListener,
        shutdown: impl Future<Output = ()> + Send,
    ) -> Result<(), ServerError> {
        self.serve_with_admin(listener, None, shutdown).await
    }

    /// [`LoadedDirectory::serve`] with the admin port's listener bound by the caller (tests bind port 0).
    pub async fn serve_with_admin(
        self,
        listener: TcpListener,
        admin_listener: Option<TcpListener>,
        shutdown: impl Future<Output = ()> + Send,
    ) -> Result<(), ServerError> {
        let admin_listener = match (admin_listener, &self.config.admin) {
            (Some(l), _) => Some(l),
            (None, Some(admin)) => Some(TcpListener::bind(admin.listen).await.map_err(|e| {
                ServerError::Config(ConfigError::Invalid(format!("cannot listen on admin.listen {}: {e}", admin.listen)))
            })?),
            (None, None) => None,
        };
        let admin_config = match (&admin_listener, &self.config.admin) {
            (None, _) => None,
            (Some(_), Some(a)) => Some(a.clone()),
            (Some(l), None) => Some(AdminConfig::new(l.local_addr().map_err(|e| ServerError::Config(ConfigError::Invalid(e.to_string())))?)),
        };
        let admin_token = match &admin_config {
            Some(a) => a.load_token().map_err(|e| ServerError::Config(ConfigError::Invalid(e)))?,
            None => None,
        };
        let metrics = Metrics::new();
        let local = listener.local_addr().ok();
        let server_tls = tls::server_config(&self.identity, self.revoked.clone())?;
        let incoming = tls::serve_incoming(listener, server_tls, self.config.max_connections);
        let (stop_tx, stop_rx) = watch::channel(false);
        // Ends when shutdown begins (or the server fails and drops the sender).
        tokio::spawn(crate::reload::reload_task(self.reloadable(), stop_rx.clone()));
        let reloadable = self.reloadable();
        let follower = ChangeFollower::start(
            self.stores.clone(),
            self.index.clone(),
            self.revoked.clone(),
            StartVersions {
                catalog: self.catalog_version,
                grants: self.grant_version,
                revocations: self.revocation_version,
            },
            self.change_poll_interval(),
        );
        let service = DirectoryService::new(
            self.stores.clone(),
            self.index.clone(),
            self.revoked.clone(),
            self.authority,
            ServiceSettings {
                lease_ttl_seconds: self.config.lease_ttl_seconds,
                heartbeat_interval_seconds: self.config.heartbeat_interval_seconds(),
            },
            follower.clone(),
            stop_rx.clone(),
        );
        let directory = DirectoryServer::new(service)
            .max_decoding_message_size(MAX_MESSAGE_BYTES)
            .max_encoding_message_size(MAX_MESSAGE_BYTES);

        let (health, health_service) = tonic_health::server::health_reporter();
        health.set_serving::<DirectoryServer<DirectoryService>>().await;
        let health_state = Health::new(health.clone(), vec!["", DIRECTORY_SERVICE_NAME]);
        let admin_task = match (admin_listener, admin_config) {
            (Some(admin_listener), Some(admin_config)) => {
                let source: Arc<dyn AdminSource> = Arc::new(DirectoryAdmin {
                    follower: follower.clone(),
                    tls: self.identity.clone(),
                    admin: admin_config.clone(),
                    grpc_address: local.map(|a| a.to_string()).unwrap_or_default(),
                    data_dir: self.config.data_dir.clone(),
                    stores: self.stores.clone(),
                    index: self.index.clone(),
                    database: self.database.clone(),
                    metrics: metrics.clone(),
                    backup: match &self.database {
                        Database::Sled(database) => Some(Arc::new(DirectoryBackupSource {
                            database: database.clone(),
                            data_dir: self.config.data_dir.clone(),
                            identity: self.identity.identity.clone(),
                        })),
                        Database::Postgres(_) => None,
                    },
                    reload: Arc::new(move || reloadable.reload_all()),
                });
                let state = AdminState {
                    source: source.clone(),
                    metrics: metrics.clone(),
                    health: health_state.clone(),
                    department: self.identity.identity.department.clone(),
                    token: admin_token.map(Arc::new),
                    open_probes: admin_config.open_probes,
                };
                let refresher = health_state.spawn_refresher(source, stop_rx.clone());
                let tls_identity = self.identity.clone();
                let revoked = self.revoked.clone();
                let mut admin_stop = stop_rx.clone();
                let serve = tokio::spawn(async move {
                    let stopped = async move {
                        let _ = admin_stop.wait_for(|s| *s).await;
                    };
                    if let Err(e) = admin::serve(admin_listener, &tls_identity, revoked, &admin_config, state, stopped).await {
                        tracing::error!(error = %e, "admin port failed");
                    }
                });
                Some((serve, refresher))
            }
            _ => None,
        };

        let reflection_v1 = tonic_reflection::server::Builder::configure()
            .register_encoded_file_descriptor_set(exchange_proto::FILE_DESCRIPTOR_SET)
            .register_encoded_file_descriptor_set(tonic_health::pb::FILE_DESCRIPTOR_SET)
            .build_v1()?;
        let reflection_v1alpha = tonic_reflection::server::Builder::configure()
            .register_encoded_file_descriptor_set(exchange_proto::FILE_DESCRIPTOR_SET)
            .register_encoded_file_descriptor_set(tonic_health::pb::FILE_DESCRIPTOR_SET)
            .build_v1alpha()?;

        // Every service authenticates each call, so a revoked certificate cannot even probe health.
        let interceptor = IdentityInterceptor::new(self.revoked.clone());
        let mut health = health;
        let health_for_signal = health_state.clone();
        let signal = async move {
            shutdown.await;
            tracing::info!("shutting down: refusing new connections, draining calls");
            let _ = stop_tx.send(true);
            health_for_signal.stop();
            // Health watchers see NOT_SERVING, then their streams end (clearing drops the status sender):
            // like catalog watches, they would otherwise keep the drain waiting forever.
            for name in ["", DIRECTORY_SERVICE_NAME] {
                health.set_service_status(name, tonic_health::ServingStatus::NotServing).await;
                health.clear_service_status(name).await;
            }
        };

        tracing::info!(
            addr = ?local,
            identity = %self.identity.identity,
            lease_ttl_seconds = self.config.lease_ttl_seconds,
            max_connections = self.config.max_connections,
            "directory serving"
        );
        let served = tonic::transport::Server::builder()
            .layer(GrpcMetricsLayer::new(metrics.clone()))
            .http2_keepalive_interval(Some(Duration::from_secs(30)))
            .http2_keepalive_timeout(Some(Duration::from_secs(10)))
            // Clients reconnect now and then, so a node that rotated its certificate presents the new one
            // here too (and the old serial can be revoked); see Config::max_connection_age_seconds.
            .max_connection_age(Duration::from_secs(self.config.max_connection_age_seconds))
            .add_service(InterceptedService::new(directory, interceptor.clone()))
            .add_service(InterceptedService::new(health_service, interceptor.clone()))
            .add_service(InterceptedService::new(reflection_v1, interceptor.clone()))
            .add_service(InterceptedService::new(reflection_v1alpha, interceptor))
            .serve_with_incoming_shutdown(incoming, signal)
            .await;
        if let Some((serve, refresher)) = admin_task {
            let _ = refresher.await;
            let _ = serve.await;
        }
        served?;
        tracing::info!("directory stopped");
        Ok(())
    }
}

/// Loads the directory described by `config` and serves it on `listener` until `shutdown` completes.
///
/// `config.listen` is not used here: the caller binds (tests bind `127.0.0.1:0` and read the port first).
/// Returns once every connection has closed; the data directory is released when this returns.
pub async fn run(
    listener: TcpListener,
    config: Config,
    shutdown: impl Future<Output = ()> + Send,
) -> Result<(), ServerError> {
    LoadedDirectory::load(config).await?.serve(listener, shutdown).await
}

/// [`run`] with the admin port's listener bound by the caller (tests bind `127.0.0.1:0`).
pub async fn run_with_admin(
    listener: TcpListener,
    admin_listener: Option<TcpListener>,
    config: Config,
    shutdown: impl Future<Output = ()> + Send,
) -> Result<(), ServerError> {
    LoadedDirectory::load(config).await?.serve_with_admin(listener, admin_listener, shutdown).await
}
