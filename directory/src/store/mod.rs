//! Storage traits of the directory and the types they share.
//!
//! The service only ever sees `Arc<dyn CatalogStore>`, `Arc<dyn NodeStore>` and `Arc<dyn RevocationStore>`,
//! so a backend is a module implementing these three traits ([`sled`] is the default; PostgreSQL comes
//! later). The traits are written so that any transactional backend can honour them:
//!
//! - **The store assigns catalog versions.** A version is a catalog-wide counter: every upsert or withdrawal
//!   of one entry takes the next number, consecutively, in batch order. The entry, its change-log record and
//!   the new counter value are written in one atomic step, and the call returns only once that step is
//!   durable, so an acknowledged publish survives a crash and a watcher can never see version `n + 1`
//!   without `n`.
//! - **Withdrawals are tombstones**: the entry is kept with `withdrawn = true` and a new version, so
//!   watchers learn about it and the resource code stays bound to its department.
//! - **The change log keeps the entry as it was after each change** (not a pointer to the current entry), so
//!   replaying it from any version gives exactly what a live watcher saw.
//! - Node heartbeats need not be durable: losing the last few after a crash only shortens a lease.

pub mod sled;

use async_trait::async_trait;
use exchange_proto::v1::{CatalogChange, CatalogEntry, NodeInfo, NodeStatus, Revocation};

/// A storage backend failed. Mapped to `INTERNAL` by [`crate::error::DirectoryError`]; the text is for logs.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    /// The backend reported an I/O or engine error.
    #[error("storage backend: {0}")]
    Backend(String),
    /// A stored record cannot be decoded (disk corruption or an incompatible data directory).
    #[error("corrupt record {key}: {reason}")]
    Corrupt { key: String, reason: String },
    /// A withdrawal named an entry the store does not hold. The service checks first, so this means a bug
    /// or a concurrent writer outside the service's write lock.
    #[error("no catalog entry {0}")]
    MissingEntry(String),
}

/// Catalog entries, their versions and the change log.
#[async_trait]
pub trait CatalogStore: Send + Sync {
    /// Adds or replaces `entries` (by resource code). Each entry gets the next catalog version, in order,
    /// and `withdrawn = false`; returns the stored entries (with versions) in the same order. Atomic and
    /// durable when it returns.
    async fn upsert(&self, entries: Vec<CatalogEntry>) -> Result<Vec<CatalogEntry>, StoreError>;

    /// Turns the named live entries into tombstones, each with the next version, in order; returns the
    /// tombstones. Every code must exist ([`StoreError::MissingEntry`] otherwise, and nothing is written).
    /// Atomic and durable when it returns.
    async fn withdraw(&self, resource_codes: Vec<String>) -> Result<Vec<CatalogEntry>, StoreError>;

    /// The entry (live or tombstone) with this resource code.
    async fn get(&self, resource_code: &str) -> Result<Option<CatalogEntry>, StoreError>;

    /// Several entries at once, in the order asked; `None` where there is none.
    async fn get_many(&self, resource_codes: &[String]) -> Result<Vec<Option<CatalogEntry>>, StoreError>;

    /// Up to `limit` changes with version `> after_version`, in version order, without gaps.
    async fn changes_since(&self, after_version: u64, limit: usize) -> Result<Vec<CatalogChange>, StoreError>;

    /// The version of the latest change (0 for an empty catalog).
    async fn current_version(&self) -> Result<u64, StoreError>;

    /// Up to `limit` live (not withdrawn) entries whose resource code sorts after `after_code` (all from
    /// the start when `None`), in resource code order. Pages through the catalog for the index rebuild
    /// without holding it all in one backend call.
    async fn live_entries_after(&self, after_code: Option<&str>, limit: usize)
        -> Result<Vec<CatalogEntry>, StoreError>;
}

/// A registered exchange node. Department and name come from the node's certificate.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct NodeRecord {
    pub department: String,
    pub node_name: String,
    pub address: String,
    pub software_version: String,
    pub registered_at_unix_ms: i64,
    pub last_heartbeat_unix_ms: i64,
    pub lease_expires_unix_ms: i64,
}

impl NodeRecord {
    /// Online while the lease runs. Computed at read time, so a node that stops heartbeating goes offline
    /// without any background sweeper.
    pub fn status_at(&self, now_unix_ms: i64) -> NodeStatus {
        if now_unix_ms < self.lease_expires_unix_ms {
            NodeStatus::Online
        } else {
            NodeStatus::Offline
        }
    }

    /// The wire form, with the status as of `now_unix_ms`.
    pub fn to_info(&self, now_unix_ms: i64) -> NodeInfo {
        NodeInfo {
            department: self.department.clone(),
            node_name: self.node_name.clone(),
            address: self.address.clone(),
            status: self.status_at(now_unix_ms) as i32,
            registered_at_unix_ms: self.registered_at_unix_ms,
            last_heartbeat_unix_ms: self.last_heartbeat_unix_ms,
            lease_expires_unix_ms: self.lease_expires_unix_ms,
            software_version: self.software_version.clone(),
            audit_verifying_key_hex: String::new(),
        }
    }
}

/// The node registry.
#[async_trait]
pub trait NodeStore: Send + Sync {
    /// Adds or replaces the node keyed by (department, node name). Durable when it returns.
    async fn register(&self, node: NodeRecord) -> Result<(), StoreError>;

    /// Renews a lease: sets the last heartbeat and lease expiry. `None` if the node never registered.
    /// Need not be durable.
    async fn heartbeat(
        &self,
        department: &str,
        node_name: &str,
        now_unix_ms: i64,
        lease_expires_unix_ms: i64,
    ) -> Result<Option<NodeRecord>, StoreError>;

    /// All nodes, or those of one department, ordered by department then node name.
    async fn list(&self, department: Option<&str>) -> Result<Vec<NodeRecord>, StoreError>;
}

/// Revoked certificate serials.
#[async_trait]
pub trait RevocationStore: Send + Sync {
    /// Records a revocation keyed by `serial_hex`. If the serial is already revoked, the first record is
    /// kept and returned; otherwise `revocation` is stored and returned. Durable when it returns.
    async fn revoke(&self, revocation: Revocation) -> Result<Revocation, StoreError>;

    /// Every revocation, ordered by serial.
    async fn list(&self) -> Result<Vec<Revocation>, StoreError>;
}

/// The three stores a directory runs on.
#[derive(Clone)]
pub struct Stores {
    pub catalog: std::sync::Arc<dyn CatalogStore>,
    pub nodes: std::sync::Arc<dyn NodeStore>,
    pub revocations: std::sync::Arc<dyn RevocationStore>,
}
