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
//!
//! Grant writes (request, decide, revoke) run the same way under a write lock of their own: the checks that
//! read the grant store (one pending request per consumer and resource, the grant is still pending) and the
//! write happen in one order for everyone; store (durable) → notify grant watchers. Rules: docs/GRANTS.md.
//!
//! The three change feeds (catalog, grants, revocations) are [`crate::watch::feed`]s over the stores' change
//! logs, each woken by the version the [`ChangeFollower`] applied on this replica.
//!
//! Several replicas may share one store, so the in-process write locks order only this replica's writers;
//! what must hold across replicas at the moment of writing (a code stays its publisher's, one pending grant
//! request per consumer and resource, a grant decided as it was read) the store checks
//! ([`StoreError::Conflict`]), and the service then reads again and re-checks ([`retry_conflicts`]). The
//! search index and the revoked-serial set are updated by the follower from the change logs, whoever wrote.

use std::collections::{HashMap, HashSet};
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
use crate::follow::{ChangeFollower, Log};
use crate::revocation::RevocationAuthority;
use crate::search::CatalogIndex;
use crate::store::StoreError;
use crate::store::{parse_grant_id, NodeRecord, Stores};
use crate::validate;
use crate::watch::{feed, ChangeStream, Feed};

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
    /// Serialises grant writes (request, decide, revoke).
    grant_lock: Mutex<()>,
    /// Applies every change log to this replica (index, revoked set) and wakes the watchers.
    follower: Arc<ChangeFollower>,
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
    /// `follower` keeps `index` and `revoked` current with the stores.
    #[allow(clippy::too_many_arguments)]
    pub fn new(
        stores: Stores,
        index: Arc<CatalogIndex>,
        revoked: RevocationSet,
        authority: RevocationAuthority,
        settings: ServiceSettings,
        follower: Arc<ChangeFollower>,
        shutdown: watch::Receiver<bool>,
    ) -> Self {
        DirectoryService {
            core: Arc::new(Core {
                stores,
                index,
                revoked,
                authority,
                settings,
                write_lock: Mutex::new(()),
                grant_lock: Mutex::new(()),
                follower,
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

/// Attempts at a write that conflicted with another replica's before the caller gets `ABORTED`.
const CONFLICT_ATTEMPTS: usize = 5;

/// Runs a check-and-write again when the store found that another replica wrote in between
/// ([`StoreError::Conflict`]): the next attempt reads what that writer left, so it either succeeds or
/// fails with the proper domain error (the code is another department's, a request is pending already).
async fn retry_conflicts<T, F, Fut>(mut attempt: F) -> Result<T>
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Result<T>>,
{
    for _ in 1..CONFLICT_ATTEMPTS {
        match attempt().await {
            Err(DirectoryError::Store(StoreError::Conflict(why))) => {
                tracing::debug!(%why, "a write conflicted with another replica's; checking again");
                tokio::task::yield_now().await;
            }
            other => return other,
        }
    }
    attempt().await
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
        let audit_key = req.audit_verifying_key_hex.to_ascii_lowercase();
        if !audit_key.is_empty() && (audit_key.len() != 64 || !audit_key.bytes().all(|b| b.is_ascii_hexdigit())) {
            violations.push(Violation::new(
                "audit_verifying_key_hex",
                format!(
                    "must be empty or an Ed25519 public key as 64 hexadecimal characters; got {} characters",
                    audit_key.chars().count()
                ),
            ));
        }
        invalid_if_any(violations)?;
        let previous = self.stores.nodes.list(Some(&id.department)).await?.into_iter().find(|n| n.node_name == id.name);
        let previous_key = previous.as_ref().map(|n| n.audit_verifying_key_hex.clone()).unwrap_or_default();
        if !previous_key.is_empty() && previous_key != audit_key {
            // Allowed (keys get rotated), but never quietly: audit trails sealed with the old key need it.
            tracing::warn!(node = %id, old = %previous_key, new = %audit_key, "node changed its audit verifying key");
        }
        // The anchor stays across re-registrations with the same key: a node cannot shed it by registering again.
        let audit_anchor = previous.filter(|p| p.audit_verifying_key_hex == audit_key).and_then(|p| p.audit_anchor);
        let now = now_unix_ms();
        let node = NodeRecord {
            department: id.department.clone(),
            node_name: id.name.clone(),
            address: req.address,
            software_version: req.software_version,
            registered_at_unix_ms: now,
            last_heartbeat_unix_ms: now,
            lease_expires_unix_ms: now + i64::from(self.settings.lease_ttl_seconds) * 1000,
            audit_verifying_key_hex: audit_key,
            audit_anchor,
        };
        self.stores.nodes.register(node.clone()).await?;
        tracing::info!(node = %id, address = %node.address, "node registered");
        Ok(RegisterNodeResponse {
            node: Some(node.to_info(now)),
            lease_ttl_seconds: self.settings.lease_ttl_seconds,
            heartbeat_interval_seconds: self.settings.heartbeat_interval_seconds,
        })
    }

    async fn heartbeat(&self, id: PeerIdentity, req: HeartbeatRequest) -> Result<HeartbeatResponse> {
        allow(&id, &[Role::Node], "Heartbeat")?;
        let now = now_unix_ms();
        let lease = now + i64::from(self.settings.lease_ttl_seconds) * 1000;
        let seal = req.audit_seal.filter(|s| s.upto_seq > 0);
        if let Some(s) = &seal {
            if s.chain_hash.len() != 64 || s.signature.len() != 128 {
                return Err(DirectoryError::invalid("audit_seal", "chain_hash is 64 and signature 128 hex characters"));
            }
        }
        match self.stores.nodes.heartbeat(&id.department, &id.name, now, lease, seal.clone()).await? {
            Some(node)
                if seal.as_ref().zip(node.audit_anchor.as_ref()).is_some_and(|(s, a)| s.upto_seq < a.upto_seq) =>
            {
                // The node's newest seal is older than one it reported before: its trail lost sealed entries.
                tracing::error!(node = %id, reported = seal.map(|s| s.upto_seq), anchored = node.audit_anchor.map(|a| a.upto_seq), "a node's audit trail went backwards: sealed entries were removed");
                Ok(HeartbeatResponse {
                    lease_expires_unix_ms: node.lease_expires_unix_ms,
                    catalog_version: self.stores.catalog.current_version().await?,
                })
            }
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
        retry_conflicts(|| self.try_publish(&id, &entries)).await
    }

    async fn try_publish(&self, id: &PeerIdentity, entries: &[CatalogEntry]) -> Result<PublishEntriesResponse> {
        let write = self.write_lock.lock().await;
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
        let stored = self.stores.catalog.upsert(entries.to_vec()).await?;
        let entry_versions: Vec<u64> = stored.iter().map(|e| e.version).collect();
        let catalog_version = entry_versions.last().copied().unwrap_or_default();
        // The next writer may go on while this one waits: their changes are then applied together.
        drop(write);
        // Searchable here (and announced to this replica's watchers) before the caller hears back.
        self.follower.wait_applied(Log::Catalog, catalog_version).await;
        tracing::info!(caller = %id, entries = count, catalog_version, "published catalog entries");
        Ok(PublishEntriesResponse { catalog_version, entry_versions })
    }

    async fn commit_withdraw(self: Arc<Self>, id: PeerIdentity, codes: Vec<String>) -> Result<WithdrawEntriesResponse> {
        retry_conflicts(|| self.try_withdraw(&id, &codes)).await
    }

    async fn try_withdraw(&self, id: &PeerIdentity, codes: &[String]) -> Result<WithdrawEntriesResponse> {
        let write = self.write_lock.lock().await;
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
        let tombstones = self.stores.catalog.withdraw(live).await?;
        let catalog_version = tombstones.last().map(|e| e.version).unwrap_or_default();
        // The next writer may go on while this one waits: their changes are then applied together.
        drop(write);
        self.follower.wait_applied(Log::Catalog, catalog_version).await;
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
        // The version this replica's index reflects (no store round trip), from which a watch goes on.
        let catalog_version = self.follower.latest(Log::Catalog).current();
        let page = self.with_index(move |index| index.search(&req)).await?;
        let codes: Vec<String> = page.hits.iter().map(|(code, _)| code.clone()).collect();
        let entries = self.stores.catalog.get_many(&codes).await?;
        // The index may trail the store (by the writes this replica has not applied yet); drop a hit
        // withdrawn in between.
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
        check_from_version("catalog", req.from_version, self.stores.catalog.current_version().await?)?;
        let store = self.stores.catalog.clone();
        Ok(feed(
            move |after, limit| {
                let store = store.clone();
                async move { store.changes_since(after, limit).await }
            },
            |_| true,
            self.follower.latest(Log::Catalog).subscribe(),
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
        // At once on this replica; the follower brings it to the others.
        self.revoked.insert(stored.serial_hex.clone());
        self.follower.wait_applied(Log::Revocations, stored.version).await;
        tracing::warn!(
            serial = %stored.serial_hex,
            department = %stored.department,
            revoked_by = %stored.revoked_by,
            reason = %stored.reason,
            "certificate revoked"
        );
        Ok(RevokeCertificateResponse { revocation: Some(stored) })
    }

    async fn watch_revocations(&self, req: WatchRevocationsRequest) -> Result<Feed<Revocation>> {
        check_from_version("revocation log", req.from_version, self.stores.revocations.current_version().await?)?;
        let store = self.stores.revocations.clone();
        Ok(feed(
            move |after, limit| {
                let store = store.clone();
                async move { store.changes_since(after, limit).await }
            },
            |_| true,
            self.follower.latest(Log::Revocations).subscribe(),
            self.shutdown.clone(),
            req.from_version,
        ))
    }

    // ---- grants ----

    /// Operators of the directory's own department see every grant.
    fn is_central_operator(&self, id: &PeerIdentity) -> bool {
        id.role == Role::Operator && id.department == self.authority.central_department()
    }

    /// Checks a grant request against the catalog and the pending requests, then stores it. Runs in its own
    /// task under the grant write lock.
    async fn commit_request_grant(self: Arc<Self>, id: PeerIdentity, req: RequestGrantRequest) -> Result<Grant> {
        retry_conflicts(|| self.try_request_grant(&id, req.clone())).await
    }

    async fn try_request_grant(&self, id: &PeerIdentity, req: RequestGrantRequest) -> Result<Grant> {
        let write = self.grant_lock.lock().await;
        let code = req.resource_code.as_str();
        let entry = self
            .stores
            .catalog
            .get(code)
            .await?
            .ok_or_else(|| DirectoryError::NotFound(format!("no catalog entry {code}")))?;
        if entry.withdrawn {
            return Err(DirectoryError::FailedPrecondition(format!(
                "catalog entry {code} was withdrawn (version {}); there is nothing to grant",
                entry.version
            )));
        }
        match ShareType::try_from(entry.share_type) {
            Ok(ShareType::Conditional) => {}
            Ok(ShareType::Unconditional) => {
                return Err(DirectoryError::FailedPrecondition(format!(
                    "{code} is shared unconditionally: unconditional resources need no grant"
                )))
            }
            Ok(ShareType::NotShared) => {
                return Err(DirectoryError::FailedPrecondition(format!(
                    "{code} is not shared, so it cannot be granted: {}",
                    entry.share_condition
                )))
            }
            _ => {
                return Err(DirectoryError::FailedPrecondition(format!(
                    "{code} has no share type, so it cannot be granted"
                )))
            }
        }
        if entry.provider_code == id.department {
            return Err(DirectoryError::FailedPrecondition(format!(
                "{code} is provided by the caller's own department {}; a department needs no grant for its own \
                 resources",
                id.department
            )));
        }
        let items: HashSet<&str> = entry.data_items.iter().map(|d| d.name.as_str()).collect();
        let violations = req
            .data_items
            .iter()
            .enumerate()
            .filter(|(_, item)| !items.contains(item.as_str()))
            .map(|(i, item)| {
                let known: Vec<&str> = entry.data_items.iter().map(|d| d.name.as_str()).collect();
                Violation::new(
                    format!("data_items[{i}]"),
                    format!("{item:?} is not a data item of {code} (its items: {})", known.join(", ")),
                )
            })
            .collect();
        invalid_if_any(violations)?;
        let existing = self.stores.grants.for_consumer(&id.department, code).await?;
        if let Some(pending) = existing.iter().find(|g| g.status == GrantStatus::Pending as i32) {
            return Err(DirectoryError::AlreadyExists(format!(
                "grant {} of department {} for {code} is already pending (requested by {}); wait for the \
                 provider's decision",
                pending.grant_id, pending.consumer_code, pending.requested_by
            )));
        }
        let grant = Grant {
            resource_code: req.resource_code,
            consumer_code: id.department.clone(),
            provider_code: entry.provider_code,
            requested_items: req.data_items,
            purpose: req.purpose,
            legal_basis: req.legal_basis,
            status: GrantStatus::Pending as i32,
            requested_by: id.name.clone(),
            requested_at_unix_ms: now_unix_ms(),
            ..Default::default()
        };
        let stored = self.stores.grants.insert(grant).await?;
        // The next writer may go on while this one waits: their changes are then applied together.
        drop(write);
        self.follower.wait_applied(Log::Grants, stored.version).await;
        tracing::info!(
            caller = %id,
            grant = %stored.grant_id,
            resource = %stored.resource_code,
            provider = %stored.provider_code,
            version = stored.version,
            "grant requested"
        );
        Ok(stored)
    }

    /// The grant `grant_id`, if the caller is of its provider department.
    async fn provider_grant(&self, id: &PeerIdentity, grant_id: &str, action: &str) -> Result<Grant> {
        let grant = self
            .stores
            .grants
            .get(grant_id)
            .await?
            .ok_or_else(|| DirectoryError::NotFound(format!("no grant {grant_id}")))?;
        if grant.provider_code != id.department {
            return Err(DirectoryError::PermissionDenied(format!(
                "grant {grant_id} is for {}, a resource of department {}; only that department's operators may {action} \
                 it, and caller {} is of department {}",
                grant.resource_code, grant.provider_code, id.name, id.department
            )));
        }
        Ok(grant)
    }

    /// Approves or rejects a pending grant; an approval supersedes the consumer's earlier approved grants
    /// for the resource in the same store write. Runs in its own task under the grant write lock.
    async fn commit_decide_grant(self: Arc<Self>, id: PeerIdentity, req: DecideGrantRequest) -> Result<Grant> {
        retry_conflicts(|| self.try_decide_grant(&id, req.clone())).await
    }

    async fn try_decide_grant(&self, id: &PeerIdentity, req: DecideGrantRequest) -> Result<Grant> {
        let write = self.grant_lock.lock().await;
        let mut grant = self.provider_grant(&id, &req.grant_id, "decide").await?;
        let now = now_unix_ms();
        if grant.status != GrantStatus::Pending as i32 {
            return Err(DirectoryError::FailedPrecondition(format!(
                "grant {} is {}; only a pending grant can be decided",
                grant.grant_id,
                status_name(effective_status(&grant, now))
            )));
        }
        let mut writes = Vec::new();
        if req.approve {
            let requested: HashSet<&str> = grant.requested_items.iter().map(String::as_str).collect();
            let violations = req
                .granted_items
                .iter()
                .enumerate()
                .filter(|(_, item)| !requested.contains(item.as_str()))
                .map(|(i, item)| {
                    Violation::new(
                        format!("granted_items[{i}]"),
                        format!("{item:?} was not requested (requested: {})", grant.requested_items.join(", ")),
                    )
                })
                .collect();
            invalid_if_any(violations)?;
            grant.granted_items =
                if req.granted_items.is_empty() { grant.requested_items.clone() } else { req.granted_items };
            grant.status = GrantStatus::Approved as i32;
            grant.expires_at_unix_ms = req.expires_at_unix_ms;
            // Supersede first: a node applying the changes one by one never sees two approved grants at once.
            for mut earlier in self.stores.grants.for_consumer(&grant.consumer_code, &grant.resource_code).await? {
                if earlier.status == GrantStatus::Approved as i32 && earlier.grant_id != grant.grant_id {
                    earlier.status = GrantStatus::Superseded as i32;
                    writes.push(earlier);
                }
            }
        } else {
            grant.status = GrantStatus::Rejected as i32;
        }
        grant.decided_by = id.name.clone();
        grant.decided_at_unix_ms = now;
        grant.decision_reason = req.reason;
        writes.push(grant);
        let superseded: Vec<String> = writes[..writes.len() - 1].iter().map(|g| g.grant_id.clone()).collect();
        let stored = self.stores.grants.update(writes).await?;
        let decided = stored.last().cloned().ok_or_else(|| DirectoryError::Internal("empty grant update".into()))?;
        // The next writer may go on while this one waits: their changes are then applied together.
        drop(write);
        self.follower.wait_applied(Log::Grants, decided.version).await;
        tracing::info!(
            caller = %id,
            grant = %decided.grant_id,
            status = %status_name(decided.status),
            ?superseded,
            version = decided.version,
            "grant decided"
        );
        Ok(as_seen(decided, now_unix_ms()))
    }

    /// Ends an approved grant. Runs in its own task under the grant write lock.
    async fn commit_revoke_grant(self: Arc<Self>, id: PeerIdentity, req: RevokeGrantRequest) -> Result<Grant> {
        retry_conflicts(|| self.try_revoke_grant(&id, req.clone())).await
    }

    async fn try_revoke_grant(&self, id: &PeerIdentity, req: RevokeGrantRequest) -> Result<Grant> {
        let write = self.grant_lock.lock().await;
        let mut grant = self.provider_grant(&id, &req.grant_id, "revoke").await?;
        let now = now_unix_ms();
        if grant.status != GrantStatus::Approved as i32 {
            return Err(DirectoryError::FailedPrecondition(format!(
                "grant {} is {}; only an approved grant (expired or not) can be revoked",
                grant.grant_id,
                status_name(effective_status(&grant, now))
            )));
        }
        grant.status = GrantStatus::Revoked as i32;
        grant.decided_by = id.name.clone();
        grant.decided_at_unix_ms = now;
        grant.decision_reason = req.reason;
        let stored = self.stores.grants.update(vec![grant]).await?;
        let revoked = stored.into_iter().next().ok_or_else(|| DirectoryError::Internal("empty grant update".into()))?;
        // The next writer may go on while this one waits: their changes are then applied together.
        drop(write);
        self.follower.wait_applied(Log::Grants, revoked.version).await;
        tracing::info!(caller = %id, grant = %revoked.grant_id, version = revoked.version, "grant revoked");
        Ok(revoked)
    }

    async fn list_grants(&self, id: &PeerIdentity, req: ListGrantsRequest) -> Result<ListGrantsResponse> {
        let mut violations = Vec::new();
        if !req.resource_code.is_empty() {
            violations.extend(validate::check_lookup_code(&req.resource_code));
        }
        if GrantStatus::try_from(req.status).is_err() {
            violations.push(Violation::new("status", format!("unknown grant status {}", req.status)));
        }
        let side = match req.side.as_str() {
            "" => None,
            "provider" => Some(true),
            "consumer" => Some(false),
            other => {
                violations.push(Violation::new(
                    "side",
                    format!("must be \"provider\", \"consumer\" or empty (both), got {other:?}"),
                ));
                None
            }
        };
        invalid_if_any(violations)?;
        let scope = (!self.is_central_operator(id)).then_some(id.department.as_str());
        let now = now_unix_ms();
        let grants = self
            .stores
            .grants
            .list(scope)
            .await?
            .into_iter()
            .map(|g| as_seen(g, now))
            .filter(|g| req.resource_code.is_empty() || g.resource_code == req.resource_code)
            .filter(|g| req.status == GrantStatus::Unspecified as i32 || g.status == req.status)
            .filter(|g| match side {
                None => true,
                Some(true) => g.provider_code == id.department,
                Some(false) => g.consumer_code == id.department,
            })
            .collect();
        Ok(ListGrantsResponse { grants })
    }

    async fn watch_grants(&self, id: &PeerIdentity, req: WatchGrantsRequest) -> Result<Feed<GrantChange>> {
        allow(id, &[Role::Node, Role::Operator], "WatchGrants")?;
        check_from_version("grant log", req.from_version, self.stores.grants.current_version().await?)?;
        let department = (!self.is_central_operator(id)).then(|| id.department.clone());
        let store = self.stores.grants.clone();
        Ok(feed(
            move |after, limit| {
                let store = store.clone();
                async move { store.changes_since(after, limit).await }
            },
            // Filtered after reading, so the feed's gap check still runs over the whole log.
            move |change: &GrantChange| match (&department, &change.grant) {
                (None, _) => true,
                (Some(d), Some(g)) => &g.provider_code == d || &g.consumer_code == d,
                (Some(_), None) => false,
            },
            self.follower.latest(Log::Grants).subscribe(),
            self.shutdown.clone(),
            req.from_version,
        ))
    }
}

/// Refuses to watch from a version the log has not reached (a cursor from another directory, or a typo).
fn check_from_version(log: &str, from_version: u64, current: u64) -> Result<()> {
    if from_version > current {
        return Err(DirectoryError::OutOfRange(format!(
            "from_version {from_version} is ahead of the {log} (current version {current}); resume from a version \
             you received from this directory, or 0 for everything"
        )));
    }
    Ok(())
}

/// Longest purpose, legal basis or decision reason of a grant, in characters.
pub const GRANT_TEXT_MAX_CHARS: usize = 500;

/// A grant text field: `required` says why it is needed (`None`: optional); at most
/// [`GRANT_TEXT_MAX_CHARS`] characters; no control characters.
fn check_grant_text(field: &str, value: &str, required: Option<&str>, out: &mut Vec<Violation>) {
    if let Some(why) = required.filter(|_| value.trim().is_empty()) {
        out.push(Violation::new(field, why));
        return;
    }
    let count = value.chars().count();
    if count > GRANT_TEXT_MAX_CHARS {
        out.push(Violation::new(field, format!("must be at most {GRANT_TEXT_MAX_CHARS} characters, got {count}")));
    }
    if let Some((pos, ch)) = value.chars().enumerate().find(|(_, c)| c.is_control()) {
        out.push(Violation::new(field, format!("contains control character U+{:04X} at character {pos}", ch as u32)));
    }
}

fn check_grant_id(grant_id: &str, out: &mut Vec<Violation>) {
    if parse_grant_id(grant_id).is_none() {
        out.push(Violation::new(
            "grant_id",
            format!("must be G followed by 8 digits, e.g. G00000001; got {grant_id:?}"),
        ));
    }
}

/// One violation per repeated name in `items`, pointing at its first occurrence.
fn check_unique(field: &str, items: &[String], out: &mut Vec<Violation>) {
    let mut first: HashMap<&str, usize> = HashMap::new();
    for (i, item) in items.iter().enumerate() {
        match first.get(item.as_str()) {
            Some(j) => out.push(Violation::new(format!("{field}[{i}]"), format!("duplicate of {field}[{j}]"))),
            None => {
                first.insert(item, i);
            }
        }
    }
}

/// Role and request checks of RequestGrant that need no store.
fn check_request_grant(id: &PeerIdentity, req: &RequestGrantRequest) -> Result<()> {
    allow(id, &[Role::App, Role::Operator], "RequestGrant")?;
    let mut v = validate::check_lookup_code(&req.resource_code);
    if req.data_items.is_empty() {
        v.push(Violation::new("data_items", "name at least one data item of the entry"));
    }
    check_unique("data_items", &req.data_items, &mut v);
    if req.purpose.trim().is_empty() && req.legal_basis.trim().is_empty() {
        v.push(Violation::new("purpose", "give a purpose, a legal basis (legal_basis), or both"));
    }
    check_grant_text("purpose", &req.purpose, None, &mut v);
    check_grant_text("legal_basis", &req.legal_basis, None, &mut v);
    invalid_if_any(v)
}

/// Role and request checks of DecideGrant that need no store.
fn check_decide_grant(id: &PeerIdentity, req: &DecideGrantRequest, now: i64) -> Result<()> {
    allow(id, &[Role::Operator], "DecideGrant")?;
    let mut v = Vec::new();
    check_grant_id(&req.grant_id, &mut v);
    if req.approve {
        check_unique("granted_items", &req.granted_items, &mut v);
        if req.expires_at_unix_ms < 0 || (req.expires_at_unix_ms != 0 && req.expires_at_unix_ms <= now) {
            v.push(Violation::new(
                "expires_at_unix_ms",
                format!("must be 0 (no expiry) or a time in the future in Unix milliseconds (now is {now})"),
            ));
        }
        check_grant_text("reason", &req.reason, None, &mut v);
    } else {
        check_grant_text("reason", &req.reason, Some("is required to reject a grant"), &mut v);
        if !req.granted_items.is_empty() {
            v.push(Violation::new("granted_items", "only an approval grants items (approve is false)"));
        }
        if req.expires_at_unix_ms != 0 {
            v.push(Violation::new("expires_at_unix_ms", "only an approval has an expiry (approve is false)"));
        }
    }
    invalid_if_any(v)
}

/// Role and request checks of RevokeGrant that need no store.
fn check_revoke_grant(id: &PeerIdentity, req: &RevokeGrantRequest) -> Result<()> {
    allow(id, &[Role::Operator], "RevokeGrant")?;
    let mut v = Vec::new();
    check_grant_id(&req.grant_id, &mut v);
    check_grant_text("reason", &req.reason, Some("is required to revoke a grant"), &mut v);
    invalid_if_any(v)
}

/// The status a reader sees: an approved grant whose expiry has passed is `EXPIRED`. Computed when read,
/// never stored, so no sweeper is needed.
pub fn effective_status(grant: &Grant, now_unix_ms: i64) -> i32 {
    if grant.status == GrantStatus::Approved as i32
        && grant.expires_at_unix_ms != 0
        && grant.expires_at_unix_ms <= now_unix_ms
    {
        GrantStatus::Expired as i32
    } else {
        grant.status
    }
}

fn as_seen(mut grant: Grant, now_unix_ms: i64) -> Grant {
    grant.status = effective_status(&grant, now_unix_ms);
    grant
}

/// `pending`, `approved`, ... for messages.
fn status_name(status: i32) -> String {
    match GrantStatus::try_from(status) {
        Ok(s) => s.as_str_name().trim_start_matches("GRANT_STATUS_").to_ascii_lowercase(),
        Err(_) => format!("in unknown status {status}"),
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
        reply(async { self.core.heartbeat(identity(&req)?, req.into_inner()).await }.await)
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

    type WatchRevocationsStream = Feed<Revocation>;

    async fn watch_revocations(
        &self,
        req: Request<WatchRevocationsRequest>,
    ) -> std::result::Result<Response<Self::WatchRevocationsStream>, Status> {
        reply(
            async {
                let id = identity(&req)?;
                let req = req.into_inner();
                tracing::debug!(caller = %id, from_version = req.from_version, "revocation watch started");
                self.core.watch_revocations(req).await
            }
            .await,
        )
    }

    async fn request_grant(&self, req: Request<RequestGrantRequest>) -> std::result::Result<Response<Grant>, Status> {
        reply(
            async {
                let id = identity(&req)?;
                let req = req.into_inner();
                check_request_grant(&id, &req)?;
                run_detached(self.core.clone().commit_request_grant(id, req)).await
            }
            .await,
        )
    }

    async fn decide_grant(&self, req: Request<DecideGrantRequest>) -> std::result::Result<Response<Grant>, Status> {
        reply(
            async {
                let id = identity(&req)?;
                let req = req.into_inner();
                check_decide_grant(&id, &req, now_unix_ms())?;
                run_detached(self.core.clone().commit_decide_grant(id, req)).await
            }
            .await,
        )
    }

    async fn revoke_grant(&self, req: Request<RevokeGrantRequest>) -> std::result::Result<Response<Grant>, Status> {
        reply(
            async {
                let id = identity(&req)?;
                let req = req.into_inner();
                check_revoke_grant(&id, &req)?;
                run_detached(self.core.clone().commit_revoke_grant(id, req)).await
            }
            .await,
        )
    }

    async fn list_grants(
        &self,
        req: Request<ListGrantsRequest>,
    ) -> std::result::Result<Response<ListGrantsResponse>, Status> {
        reply(
            async {
                let id = identity(&req)?;
                self.core.list_grants(&id, req.into_inner()).await
            }
            .await,
        )
    }

    type WatchGrantsStream = Feed<GrantChange>;

    async fn watch_grants(
        &self,
        req: Request<WatchGrantsRequest>,
    ) -> std::result::Result<Response<Self::WatchGrantsStream>, Status> {
        reply(
            async {
                let id = identity(&req)?;
                let req = req.into_inner();
                tracing::debug!(caller = %id, from_version = req.from_version, "grant watch started");
                self.core.watch_grants(&id, req).await
            }
            .await,
        )
    }
}
