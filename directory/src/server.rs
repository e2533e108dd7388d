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

use crate::config::{Config, ConfigError};
use crate::revocation::{AuthorityError, RevocationAuthority};
use crate::search::{CatalogIndex, SearchError};
use crate::service::{DirectoryService, ServiceSettings, StartVersions};
use crate::store::{StoreError, Stores};

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
    /// sled database in `data_dir` (catalog, nodes, revocations, grants), rebuilds the search index from
    /// every live entry and loads revocations.
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
        let data_dir = config.data_dir.clone();
        let stores = tokio::task::spawn_blocking(move || crate::store::sled::open(&data_dir)).await??;
        let open_time = started.elapsed();

        let revoked = RevocationSet::default();
        let revocations = stores.revocations.list().await?;
        revoked.replace_all(revocations.into_iter().map(|r| r.serial_hex));
        let revocation_version = stores.revocations.current_version().await?;
        let grant_version = stores.grants.current_version().await?;

        let catalog_version = stores.catalog.current_version().await?;
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

    /// Serves on `listener` until `shutdown` completes, then drains (see the module docs).
    pub async fn serve(
        self,
        listener: TcpListener,
        shutdown: impl Future<Output = ()> + Send,
    ) -> Result<(), ServerError> {
        let local = listener.local_addr().ok();
        let server_tls = tls::server_config(&self.identity, self.revoked.clone())?;
        let incoming = tls::serve_incoming(listener, server_tls, self.config.max_connections);
        let (stop_tx, stop_rx) = watch::channel(false);
        let service = DirectoryService::new(
            self.stores.clone(),
            self.index.clone(),
            self.revoked.clone(),
            self.authority,
            ServiceSettings {
                lease_ttl_seconds: self.config.lease_ttl_seconds,
                heartbeat_interval_seconds: self.config.heartbeat_interval_seconds(),
            },
            StartVersions {
                catalog: self.catalog_version,
                grants: self.grant_version,
                revocations: self.revocation_version,
            },
            stop_rx,
        );
        let directory = DirectoryServer::new(service)
            .max_decoding_message_size(MAX_MESSAGE_BYTES)
            .max_encoding_message_size(MAX_MESSAGE_BYTES);

        let (health, health_service) = tonic_health::server::health_reporter();
        health.set_serving::<DirectoryServer<DirectoryService>>().await;

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
        let signal = async move {
            shutdown.await;
            tracing::info!("shutting down: refusing new connections, draining calls");
            let _ = stop_tx.send(true);
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
        tonic::transport::Server::builder()
            .http2_keepalive_interval(Some(Duration::from_secs(30)))
            .http2_keepalive_timeout(Some(Duration::from_secs(10)))
            .add_service(InterceptedService::new(directory, interceptor.clone()))
            .add_service(InterceptedService::new(health_service, interceptor.clone()))
            .add_service(InterceptedService::new(reflection_v1, interceptor.clone()))
            .add_service(InterceptedService::new(reflection_v1alpha, interceptor))
            .serve_with_incoming_shutdown(incoming, signal)
            .await?;
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
