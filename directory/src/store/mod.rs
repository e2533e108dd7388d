//! Storage traits of the directory and the types they share.
//!
//! The service only ever sees `Arc<dyn CatalogStore>`, `Arc<dyn NodeStore>`, `Arc<dyn RevocationStore>` and
//! `Arc<dyn GrantStore>`, so a backend is a module implementing these four traits ([`sled`] is the default;
//! [`postgres`] serves several directory replicas over one database). The traits are written so that any
//! transactional backend can honour them, with several writers at once (replicas):
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
//! - **Revocations and grants have change logs of their own**, with the same rules as the catalog's: the
//!   store assigns their versions (1, 2, 3, ... without gaps), a record and its log entry are written in one
//!   atomic, durable step, and `changes_since` never returns a version that is not yet durable.
//! - **Checks that must hold at the moment of writing are the store's**, because another replica may write
//!   between the service's read and its write: a resource code stays bound to the department that first
//!   published it, one consumer has at most one pending grant request per resource, and a grant update
//!   applies only to the grant as the writer read it. A write that would break one fails with
//!   [`StoreError::Conflict`] and writes nothing; the service then reads again and re-checks.

pub mod postgres;
pub mod sled;

use async_trait::async_trait;
use exchange_proto::v1::{AuditSeal, CatalogChange, CatalogEntry, Grant, GrantChange, NodeInfo, NodeStatus, Revocation};

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
    /// An update named a grant the store does not hold, or tried to change what a grant is about (its
    /// resource, consumer or provider). The service checks first, so this means a bug.
    #[error("grant {0}: {1}")]
    BadGrantUpdate(String, String),
    /// Another writer (another replica) changed what this write was checked against; nothing was written.
    /// The service reads again, re-checks and retries; the text says what changed.
    #[error("conflicting write: {0}")]
    Conflict(String),
}

/// Catalog entries, their versions and the change log.
#[async_trait]
pub trait CatalogStore: Send + Sync {
    /// Adds or replaces `entries` (by resource code). Each entry gets the next catalog version, in order,
    /// and `withdrawn = false`; returns the stored entries (with versions) in the same order. Atomic and
    /// durable when it returns. An entry whose resource code is stored (live or withdrawn) under another
    /// `provider_code` fails the whole call with [`StoreError::Conflict`]: a code stays its first
    /// publisher's.
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
    /// The node's audit seal key (Ed25519 public key, 64 lower-case hex characters), or empty.
    pub audit_verifying_key_hex: String,
    /// The highest audit seal the node reported (its anchor outside the node), if any.
    pub audit_anchor: Option<AuditSeal>,
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
            audit_verifying_key_hex: self.audit_verifying_key_hex.clone(),
            audit_anchor: self.audit_anchor.clone(),
        }
    }
}

/// The node registry.
#[async_trait]
pub trait NodeStore: Send + Sync {
    /// Adds or replaces the node keyed by (department, node name). Durable when it returns.
    async fn register(&self, node: NodeRecord) -> Result<(), StoreError>;

    /// Renews a lease: sets the last heartbeat and lease expiry, and the audit anchor to `audit_seal` if
    /// that covers more entries than the anchor held (an anchor never moves back). `None` if the node
    /// never registered. Need not be durable.
    async fn heartbeat(
        &self,
        department: &str,
        node_name: &str,
        now_unix_ms: i64,
        lease_expires_unix_ms: i64,
        audit_seal: Option<AuditSeal>,
    ) -> Result<Option<NodeRecord>, StoreError>;

    /// All nodes, or those of one department, ordered by department then node name.
    async fn list(&self, department: Option<&str>) -> Result<Vec<NodeRecord>, StoreError>;
}

/// Revoked certificate serials and the revocation log.
#[async_trait]
pub trait RevocationStore: Send + Sync {
    /// Records a revocation keyed by `serial_hex`. If the serial is already revoked, the first record is
    /// kept and returned and no version is taken; otherwise `revocation` gets the next revocation version
    /// (consecutive from 1, whatever `revocation.version` said) and is stored with its log entry in one
    /// atomic step. Durable when it returns.
    async fn revoke(&self, revocation: Revocation) -> Result<Revocation, StoreError>;

    /// Every revocation (with its version), ordered by serial.
    async fn list(&self) -> Result<Vec<Revocation>, StoreError>;

    /// Up to `limit` revocations with version `> after_version`, in version order, without gaps.
    async fn changes_since(&self, after_version: u64, limit: usize) -> Result<Vec<Revocation>, StoreError>;

    /// The version of the latest revocation (0 when there is none).
    async fn current_version(&self) -> Result<u64, StoreError>;
}

/// Formats grant sequence number `seq` as a grant id: `G` + at least 8 digits (`G00000001`).
pub fn grant_id(seq: u64) -> String {
    format!("G{seq:08}")
}

/// The sequence number of a well-formed grant id (the exact form [`grant_id`] produces), else `None`.
pub fn parse_grant_id(id: &str) -> Option<u64> {
    let digits = id.strip_prefix('G')?;
    if digits.len() < 8 || !digits.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    let seq: u64 = digits.parse().ok()?;
    (seq > 0 && grant_id(seq) == id).then_some(seq)
}

/// Grants (access of a consumer department to a provider's conditional resource) and their change log.
///
/// - **The store assigns grant ids and versions.** Ids come from a sequence of their own (`G00000001`,
///   `G00000002`, ...; see [`grant_id`]); every insert or update of one grant takes the next grant version,
///   consecutively, in call order. Both counters survive restarts.
/// - A write (the grants, their change-log records and the counters) is **one atomic step, durable when the
///   call returns**; `changes_since` never returns a version that is not durable yet.
/// - **The change log keeps the grant as it was after each change** (with `version` set to that change's
///   version), so replaying it from any version gives exactly what a live watcher saw.
/// - The stored status is the one last written: `EXPIRED` is never stored (it is computed when read).
#[async_trait]
pub trait GrantStore: Send + Sync {
    /// Stores a new grant: sets `grant_id` to the next id and `version` to the next version (whatever they
    /// said) and returns the stored grant. Atomic and durable when it returns. If the consumer already has
    /// a `PENDING` grant for the resource, fails with [`StoreError::Conflict`] and stores nothing.
    async fn insert(&self, grant: Grant) -> Result<Grant, StoreError>;

    /// Replaces existing grants (by `grant_id`); each gets the next version, in order. Resource, consumer
    /// and provider of a grant never change. If any grant is unknown or changes those, nothing is written
    /// ([`StoreError::BadGrantUpdate`]). Each grant's `version` must be the version stored now (the one the
    /// caller read): if another write came in between, nothing is written ([`StoreError::Conflict`]).
    /// Returns the stored grants in the same order. Atomic and durable when it returns.
    async fn update(&self, grants: Vec<Grant>) -> Result<Vec<Grant>, StoreError>;

    /// The grant with this id.
    async fn get(&self, grant_id: &str) -> Result<Option<Grant>, StoreError>;

    /// Every grant of `consumer_code` for `resource_code`, oldest request first.
    async fn for_consumer(&self, consumer_code: &str, resource_code: &str) -> Result<Vec<Grant>, StoreError>;

    /// Every grant, or those where `department` is provider or consumer; newest request first.
    async fn list(&self, department: Option<&str>) -> Result<Vec<Grant>, StoreError>;

    /// Up to `limit` changes with version `> after_version`, in version order, without gaps.
    async fn changes_since(&self, after_version: u64, limit: usize) -> Result<Vec<GrantChange>, StoreError>;

    /// The version of the latest change (0 when there is none).
    async fn current_version(&self) -> Result<u64, StoreError>;
}

/// The database under the [`Stores`], for what the admin port shows and does (size, the store check,
/// backup).
#[derive(Clone)]
pub enum Database {
    Sled(sled::SledDatabase),
    Postgres(postgres::PgDatabase),
}

impl Database {
    /// Bytes the store takes (0 when the backend cannot say).
    pub async fn size_bytes(&self) -> u64 {
        match self {
            Database::Sled(db) => db.db().size_on_disk().unwrap_or(0),
            Database::Postgres(db) => db.size_bytes().await.unwrap_or(0),
        }
    }

    /// The `store` readiness check: a write that reaches the disk (sled) or the database (PostgreSQL).
    pub async fn check(&self, data_dir: &std::path::Path) -> client_sdk::admin::api::HealthCheck {
        match self {
            Database::Sled(db) => {
                tokio::task::block_in_place(|| client_sdk::admin::health::sled_store_check(db.db(), data_dir))
            }
            Database::Postgres(db) => db.check().await,
        }
    }
}

/// The stores a directory runs on.
#[derive(Clone)]
pub struct Stores {
    pub catalog: std::sync::Arc<dyn CatalogStore>,
    pub nodes: std::sync::Arc<dyn NodeStore>,
    pub revocations: std::sync::Arc<dyn RevocationStore>,
    pub grants: std::sync::Arc<dyn GrantStore>,
}
