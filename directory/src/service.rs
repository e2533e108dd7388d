//! The `govexchange.v1.Directory` gRPC service.
//!
//! Each RPC authenticates through the caller's certificate (the `IdentityInterceptor` attached the
//! [`PeerIdentity`]), checks the caller's role, validates, and then works on the stores. Handlers return
//! [`DirectoryError`]; the conversion to `Status` happens in `error.rs` only.
//!
//! Catalog writes (publish, withdraw) run under one write lock, so the ownership check, the versions the
//! store assigns and the index update happen in one order for everyone. The order of a write is: store
//! (durable) → search index → notify watchers; a watcher that sees version `n` can already find it by
//! search. Writes and revocations run in a spawned task: a client that hangs up mid-call cancels its handler,
//! and a durable write must not be left half-applied (stored but not indexed, or not announced to watchers).

use std::sync::Arc;
use std::time::{SystemTime, UNIX_EPOCH};

use client_sdk::auth::{caller, require_role};
use client_sdk::identity::{PeerIdentity, Role};
use client_sdk::tls::RevocationSet;
use exchange_proto::v1::directory_server::Directory;
use exchange_proto::v1::*;
use tokio::sync::{watch, Mutex, Semaphore};
use tonic::{Request, Response, Status};

use crate::error::{DirectoryError, Violation};
use crate::revocation::RevocationAuthority;
use crate::search::CatalogIndex;
use crate::store::{NodeRecord, Stores};
use crate::validate;
use crate::watch::{change_stream, ChangeStream};

type Result<T, E = DirectoryError> = std::result::Result<T, E>;

/// Wall-clock time in Unix milliseconds.
pub fn now_unix_ms() -> i64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map(|d| d.as_millis() as i64).unwrap_or(0)
}

/// Settings the service needs from the configuration.
#[derive(Clone, Debug)]
pub struct ServiceSettings {
    pub lease_ttl_seconds: u32,
    pub heartbeat_interval_seconds: u32,
}

/// Everything a handler needs; shared by the service and the write tasks it spawns.
struct Core {
    stores: Stores,
    index: Arc<CatalogIndex>,
    revoked: RevocationSet,
    authority: RevocationAuthority,
    settings: ServiceSettings,
    /// Serialises catalog writes (publish, withdraw).
    write_lock: Mutex<()>,
    /// The latest durable catalog version; watchers sleep on it.
    versions: watch::Sender<u64>,
    /// Turns true when the server starts shutting down; ends watch streams.
    shutdown: watch::Receiver<bool>,
    /// Index calls running at once: one per core. Searches are CPU-bound; letting every in-flight call
    /// run its own blocking thread only adds context switches and cache misses under load.
    index_slots: Semaphore,
}

/// The Directory service implementation. Cheap to clone.
#[derive(Clone)]
pub struct DirectoryService {
    core: Arc<Core>,
}

impl DirectoryService {
    /// `current_version`: the store's version at start (watchers are woken from there on).
    pub fn new(
        stores: Stores,
        index: Arc<CatalogIndex>,
        revoked: RevocationSet,
        authority: RevocationAuthority,
        settings: ServiceSettings,
        current_version: u64,
        shutdown: watch::Receiver<bool>,
    ) -> Self {
        let (versions, _) = watch::channel(current_version);
        DirectoryService {
            core: Arc::new(Core {
                stores,
                index,
                revoked,
                authority,
                settings,
                write_lock: Mutex::new(()),
                versions,
                shutdown,
                index_slots: Semaphore::new(std::thread::available_parallelism().map_or(2, |n| n.get())),
            }),
        }
    }
}

fn identity<T>(req: &Request<T>) -> Result<PeerIdentity> {
    caller(req).cloned().map_err(DirectoryError::Auth)
}

fn allow(id: &PeerIdentity, roles: &[Role], action: &str) -> Result<()> {
    require_role(id, roles, action).map_err(DirectoryError::Auth)
}

fn invalid_if_any(violations: Vec<Violation>) -> Result<()> {
    if violations.is_empty() {
        Ok(())
    } else {
        Err(DirectoryError::InvalidArgument { violations })
    }
}

fn task_failed(e: tokio::task::JoinError) -> DirectoryError {
    DirectoryError::Internal(format!("task failed: {e}"))
}

impl Core {
    /// Runs a blocking index call off the async workers.
    async fn with_index<T: Send + 'static>(
        &self,
        f: impl FnOnce(&CatalogIndex) -> Result<T, crate::search::SearchError> + Send + 'static,
    ) -> Result<T> {
        let _slot = self.index_slots.acquire().await.map_err(|_| DirectoryError::ShuttingDown)?;
        let index = self.index.clone();
        Ok(tokio::task::spawn_blocking(move || f(&index)).await.map_err(task_failed)??)
    }

    fn notify(&self, version: u64) {
        self.versions.send_if_modified(|v| {
            if version > *v {
                *v = version;
                true
            } else {
                false
            }
        });
    }

    // ---- nodes ----

    async fn register_node(&self, id: PeerIdentity, req: RegisterNodeRequest) -> Result<RegisterNodeResponse> {
        allow(&id, &[Role::Node], "RegisterNode")?;
        let mut violations = Vec::new();
        if let Err(e) = validate::check_address(&req.address) {
            violations.push(Violation::new("address", e));
        }
        if let Err(e) = validate::check_software_version(&req.software_version) {
            violations.push(Violation::new("software_version", e));
        }
        invalid_if_any(violations)?;
        let now = now_unix_ms();
        let node = NodeRecord {
            department: id.department.clone(),
            node_name: id.name.clone(),
            address: req.address,
            software_version: req.software_version,
            registered_at_unix_ms: now,
            last_heartbeat_unix_ms: now,
            lease_expires_unix_ms: now + i64::from(self.settings.lease_ttl_seconds) * 1000,
        };
        self.stores.nodes.register(node.clone()).await?;
        tracing::info!(node = %id, address = %node.address, "node registered");
        Ok(RegisterNodeResponse {
            node: Some(node.to_info(now)),
            lease_ttl_seconds: self.settings.lease_ttl_seconds,
            heartbeat_interval_seconds: self.settings.heartbeat_interval_seconds,
        })
    }

    async fn heartbeat(&self, id: PeerIdentity) -> Result<HeartbeatResponse> {
        allow(&id, &[Role::Node], "Heartbeat")?;
        let now = now_unix_ms();
        let lease = now + i64::from(self.settings.lease_ttl_seconds) * 1000;
        match self.stores.nodes.heartbeat(&id.department, &id.name, now, lease).await? {
            Some(node) => Ok(HeartbeatResponse {
                lease_expires_unix_ms: node.lease_expires_unix_ms,
                catalog_version: self.stores.catalog.current_version().await?,
            }),
            None => Err(DirectoryError::FailedPrecondition(format!(
                "node {}/{} is not registered: register first (RegisterNode), then heartbeat",
                id.department, id.name
            ))),
        }
    }

    async fn list_nodes(&self, req: ListNodesRequest) -> Result<ListNodesResponse> {
        let filter = (!req.department.is_empty()).then_some(req.department.as_str());
        if let Some(d) = filter {
            client_sdk::identity::validate_department(d)
                .map_err(|e| DirectoryError::invalid("department", e.to_string()))?;
        }
        let now = now_unix_ms();
        let nodes = self.stores.nodes.list(filter).await?.iter().map(|n| n.to_info(now)).collect();
        Ok(ListNodesResponse { nodes })
    }

    // ---- catalog writes ----

    /// Validation and the provider check; no store access, so it runs before taking the write lock.
    fn check_publish(&self, id: &PeerIdentity, entries: &[CatalogEntry]) -> Result<()> {
        allow(id, &[Role::Node, Role::Operator], "PublishEntries")?;
        invalid_if_any(validate::check_publish(entries, validate::today_cst()))?;
        if let Some((i, e)) = entries.iter().enumerate().find(|(_, e)| e.provider_code != id.department) {
            return Err(DirectoryError::PermissionDenied(format!(
                "entries[{i}] ({}): provider_code {:?} is not the caller's department {:?} (from its certificate); \
                 a department publishes only its own resources",
                e.resource_code, e.provider_code, id.department
            )));
        }
        Ok(())
    }

    /// Ownership check, durable write, index, notify. Runs in its own task (see the module docs).
    async fn commit_publish(
        self: Arc<Self>,
        id: PeerIdentity,
        entries: Vec<CatalogEntry>,
    ) -> Result<PublishEntriesResponse> {
        let _write = self.write_lock.lock().await;
        let codes: Vec<String> = entries.iter().map(|e| e.resource_code.clone()).collect();
        let existing = self.stores.catalog.get_many(&codes).await?;
        for (i, old) in existing.iter().enumerate() {
            if let Some(old) = old.as_ref().filter(|old| old.provider_code != id.department) {
                return Err(DirectoryError::PermissionDenied(format!(
                    "entries[{i}]: resource code {} already belongs to department {}",
                    old.resource_code, old.provider_code
                )));
            }
        }
        let count = entries.len();
        let stored = self.stores.catalog.upsert(entries).await?;
        let entry_versions: Vec<u64> = stored.iter().map(|e| e.version).collect();
        let catalog_version = entry_versions.last().copied().unwrap_or_default();
        let indexed = self.with_index(move |index| index.upsert(&stored)).await;
        // Announce even if indexing failed: the change is durable and watchers must not miss it.
        self.notify(catalog_version);
        indexed?;
        tracing::info!(caller = %id, entries = count, catalog_version, "published catalog entries");
        Ok(PublishEntriesResponse { catalog_version, entry_versions })
    }

    async fn commit_withdraw(self: Arc<Self>, id: PeerIdentity, codes: Vec<String>) -> Result<WithdrawEntriesResponse> {
        let _write = self.write_lock.lock().await;
        let existing = self.stores.catalog.get_many(&codes).await?;
        let mut live = Vec::with_capacity(codes.len());
        for (i, (code, old)) in codes.iter().zip(&existing).enumerate() {
            let Some(old) = old else {
                return Err(DirectoryError::NotFound(format!("resource_codes[{i}]: no catalog entry {code}")));
            };
            if old.provider_code != id.department {
                return Err(DirectoryError::PermissionDenied(format!(
                    "resource_codes[{i}]: {code} belongs to department {}, not the caller's department {}",
                    old.provider_code, id.department
                )));
            }
            // Withdrawing a tombstone again is a no-op, so a retried withdrawal succeeds.
            if !old.withdrawn {
                live.push(code.clone());
            }
        }
        if live.is_empty() {
            return Ok(WithdrawEntriesResponse { catalog_version: self.stores.catalog.current_version().await? });
        }
        let count = live.len();
        let tombstones = self.stores.catalog.withdraw(live.clone()).await?;
        let catalog_version = tombstones.last().map(|e| e.version).unwrap_or_default();
        let unindexed = self.with_index(move |index| index.remove(&live)).await;
        self.notify(catalog_version);
        unindexed?;
        tracing::info!(caller = %id, entries = count, catalog_version, "withdrew catalog entries");
        Ok(WithdrawEntriesResponse { catalog_version })
    }

    // ---- catalog reads ----

    async fn live_entry(&self, code: &str) -> Result<CatalogEntry> {
        invalid_if_any(validate::check_lookup_code(code))?;
        match self.stores.catalog.get(code).await? {
            Some(e) if !e.withdrawn => Ok(e),
            Some(e) => Err(DirectoryError::NotFound(format!(
                "catalog entry {code} was withdrawn (version {}); ask with include_withdrawn to see the tombstone",
                e.version
            ))),
            None => Err(DirectoryError::NotFound(format!("no catalog entry {code}"))),
        }
    }

    async fn get_entry(&self, req: GetEntryRequest) -> Result<CatalogEntry> {
        if req.include_withdrawn {
            invalid_if_any(validate::check_lookup_code(&req.resource_code))?;
            return self
                .stores
                .catalog
                .get(&req.resource_code)
                .await?
                .ok_or_else(|| DirectoryError::NotFound(format!("no catalog entry {}", req.resource_code)));
        }
        self.live_entry(&req.resource_code).await
    }

    async fn search(&self, req: SearchCatalogRequest) -> Result<SearchCatalogResponse> {
        invalid_if_any(validate::check_search(&req))?;
        let catalog_version = self.stores.catalog.current_version().await?;
        let page = self.with_index(move |index| index.search(&req)).await?;
        let codes: Vec<String> = page.hits.iter().map(|(code, _)| code.clone()).collect();
        let entries = self.stores.catalog.get_many(&codes).await?;
        // The index trails the store by one write at most; drop a hit withdrawn in between.
        let hits = page
            .hits
            .iter()
            .zip(entries)
            .filter_map(|((_, score), entry)| {
                entry.filter(|e| !e.withdrawn).map(|entry| SearchHit { entry: Some(entry), score: *score })
            })
            .collect();
        let facets =
            |f: Vec<(String, u64)>| f.into_iter().map(|(value, count)| FacetCount { value, count }).collect::<Vec<_>>();
        Ok(SearchCatalogResponse {
            hits,
            total_hits: page.total_hits,
            next_page_token: page.next_page_token,
            provider_facets: facets(page.provider_facets),
            share_type_facets: facets(page.share_type_facets),
            classification_facets: facets(page.classification_facets),
            catalog_version,
        })
    }

    async fn resolve(&self, req: ResolveResourceRequest) -> Result<ResolveResourceResponse> {
        let entry = self.live_entry(&req.resource_code).await?;
        let now = now_unix_ms();
        let mut providers: Vec<NodeInfo> =
            self.stores.nodes.list(Some(&entry.provider_code)).await?.iter().map(|n| n.to_info(now)).collect();
        // Online first, then by name, so a caller can simply try them in order.
        providers.sort_by(|a, b| {
            let online = |n: &NodeInfo| n.status != NodeStatus::Online as i32;
            online(a).cmp(&online(b)).then_with(|| a.node_name.cmp(&b.node_name))
        });
        Ok(ResolveResourceResponse { entry: Some(entry), providers })
    }

    async fn watch(&self, req: WatchCatalogRequest) -> Result<ChangeStream> {
        let current = self.stores.catalog.current_version().await?;
        if req.from_version > current {
            return Err(DirectoryError::OutOfRange(format!(
                "from_version {} is ahead of the catalog (current version {current}); resume from a version you \
                 received from this directory, or 0 for everything",
                req.from_version
            )));
        }
        Ok(change_stream(
            self.stores.catalog.clone(),
            self.versions.subscribe(),
            self.shutdown.clone(),
            req.from_version,
        ))
    }

    // ---- revocations ----

    async fn revoke(
        self: Arc<Self>,
        id: PeerIdentity,
        req: RevokeCertificateRequest,
    ) -> Result<RevokeCertificateResponse> {
        allow(&id, &[Role::Operator], "RevokeCertificate")?;
        let approved = self.authority.approve(&id, &req.serial_hex, &req.certificate_der, &req.reason)?;
        let revocation = Revocation {
            serial_hex: approved.serial_hex,
            department: approved.department.unwrap_or_default(),
            reason: req.reason,
            revoked_by: id.to_string(),
            revoked_at_unix_ms: now_unix_ms(),
            version: 0, // assigned by the store
        };
        let stored = self.stores.revocations.revoke(revocation).await?;
        self.revoked.insert(stored.serial_hex.clone());
        tracing::warn!(
            serial = %stored.serial_hex,
            department = %stored.department,
            revoked_by = %stored.revoked_by,
            reason = %stored.reason,
            "certificate revoked"
        );
        Ok(RevokeCertificateResponse { revocation: Some(stored) })
    }
}

/// Spawns `f` so a cancelled call cannot interrupt it, and waits for its result.
async fn run_detached<T: Send + 'static>(
    f: impl std::future::Future<Output = Result<T>> + Send + 'static,
) -> Result<T> {
    tokio::spawn(f).await.map_err(task_failed)?
}

fn reply<T>(r: Result<T>) -> std::result::Result<Response<T>, Status> {
    r.map(Response::new).map_err(Status::from)
}

#[tonic::async_trait]
impl Directory for DirectoryService {
    async fn register_node(
        &self,
        req: Request<RegisterNodeRequest>,
    ) -> std::result::Result<Response<RegisterNodeResponse>, Status> {
        reply(async { self.core.register_node(identity(&req)?, req.into_inner()).await }.await)
    }

    async fn heartbeat(
        &self,
        req: Request<HeartbeatRequest>,
    ) -> std::result::Result<Response<HeartbeatResponse>, Status> {
        reply(async { self.core.heartbeat(identity(&req)?).await }.await)
    }

    async fn list_nodes(
        &self,
        req: Request<ListNodesRequest>,
    ) -> std::result::Result<Response<ListNodesResponse>, Status> {
        reply(
            async {
                identity(&req)?;
                self.core.list_nodes(req.into_inner()).await
            }
            .await,
        )
    }

    async fn publish_entries(
        &self,
        req: Request<PublishEntriesRequest>,
    ) -> std::result::Result<Response<PublishEntriesResponse>, Status> {
        reply(
            async {
                let id = identity(&req)?;
                let entries = req.into_inner().entries;
                self.core.check_publish(&id, &entries)?;
                run_detached(self.core.clone().commit_publish(id, entries)).await
            }
            .await,
        )
    }

    async fn withdraw_entries(
        &self,
        req: Request<WithdrawEntriesRequest>,
    ) -> std::result::Result<Response<WithdrawEntriesResponse>, Status> {
        reply(
            async {
                let id = identity(&req)?;
                allow(&id, &[Role::Node, Role::Operator], "WithdrawEntries")?;
                let codes = req.into_inner().resource_codes;
                invalid_if_any(validate::check_withdraw(&codes))?;
                run_detached(self.core.clone().commit_withdraw(id, codes)).await
            }
            .await,
        )
    }

    async fn get_entry(&self, req: Request<GetEntryRequest>) -> std::result::Result<Response<CatalogEntry>, Status> {
        reply(
            async {
                identity(&req)?;
                self.core.get_entry(req.into_inner()).await
            }
            .await,
        )
    }

    async fn search_catalog(
        &self,
        req: Request<SearchCatalogRequest>,
    ) -> std::result::Result<Response<SearchCatalogResponse>, Status> {
        reply(
            async {
                identity(&req)?;
                self.core.search(req.into_inner()).await
            }
            .await,
        )
    }

    async fn resolve_resource(
        &self,
        req: Request<ResolveResourceRequest>,
    ) -> std::result::Result<Response<ResolveResourceResponse>, Status> {
        reply(
            async {
                identity(&req)?;
                self.core.resolve(req.into_inner()).await
            }
            .await,
        )
    }

    type WatchCatalogStream = ChangeStream;

    async fn watch_catalog(
        &self,
        req: Request<WatchCatalogRequest>,
    ) -> std::result::Result<Response<Self::WatchCatalogStream>, Status> {
        reply(
            async {
                let id = identity(&req)?;
                let req = req.into_inner();
                tracing::debug!(caller = %id, from_version = req.from_version, "catalog watch started");
                self.core.watch(req).await
            }
            .await,
        )
    }

    async fn revoke_certificate(
        &self,
        req: Request<RevokeCertificateRequest>,
    ) -> std::result::Result<Response<RevokeCertificateResponse>, Status> {
        reply(
            async {
                let id = identity(&req)?;
                run_detached(self.core.clone().revoke(id, req.into_inner())).await
            }
            .await,
        )
    }

    async fn list_revocations(
        &self,
        req: Request<ListRevocationsRequest>,
    ) -> std::result::Result<Response<ListRevocationsResponse>, Status> {
        reply(
            async {
                identity(&req)?;
                Ok(ListRevocationsResponse { revocations: self.core.stores.revocations.list().await? })
            }
            .await,
        )
    }

    async fn who_am_i(&self, req: Request<WhoAmIRequest>) -> std::result::Result<Response<WhoAmIResponse>, Status> {
        reply(identity(&req).map(|id| WhoAmIResponse {
            department: id.department,
            role: id.role.to_string(),
            name: id.name,
            serial_hex: id.serial_hex,
        }))
    }

    type WatchRevocationsStream =
        std::pin::Pin<Box<dyn futures::Stream<Item = std::result::Result<Revocation, Status>> + Send + 'static>>;
    async fn watch_revocations(
        &self,
        _req: Request<WatchRevocationsRequest>,
    ) -> std::result::Result<Response<Self::WatchRevocationsStream>, Status> {
        Err(Status::unimplemented("TODO"))
    }
    async fn request_grant(&self, _req: Request<RequestGrantRequest>) -> std::result::Result<Response<Grant>, Status> {
        Err(Status::unimplemented("TODO"))
    }
    async fn decide_grant(&self, _req: Request<DecideGrantRequest>) -> std::result::Result<Response<Grant>, Status> {
        Err(Status::unimplemented("TODO"))
    }
    async fn revoke_grant(&self, _req: Request<RevokeGrantRequest>) -> std::result::Result<Response<Grant>, Status> {
        Err(Status::unimplemented("TODO"))
    }
    async fn list_grants(
        &self,
        _req: Request<ListGrantsRequest>,
    ) -> std::result::Result<Response<ListGrantsResponse>, Status> {
        Err(Status::unimplemented("TODO"))
    }
    type WatchGrantsStream =
        std::pin::Pin<Box<dyn futures::Stream<Item = std::result::Result<GrantChange, Status>> + Send + 'static>>;
    async fn watch_grants(
        &self,
        _req: Request<WatchGrantsRequest>,
    ) -> std::result::Result<Response<Self::WatchGrantsStream>, Status> {
        Err(Status::unimplemented("TODO"))
    }
}
