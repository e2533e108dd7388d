//! The default storage backend: one embedded sled database in the directory's data dir.
//!
//! Layout (values are protobuf-encoded messages of `exchange_proto::v1`, so the wire contract is the disk
//! format and no second serialisation has to be kept in step):
//!
//! | tree          | key                                   | value                                   |
//! |---------------|---------------------------------------|-----------------------------------------|
//! | `catalog`     | `e/<resource code>`                   | `CatalogEntry` (live or tombstone)      |
//! | `catalog`     | `c/<version, 8 bytes big-endian>`     | `CatalogChange` (entry after the change) |
//! | `catalog`     | `m/version`                           | latest version, 8 bytes big-endian      |
//! | `catalog`     | `m/schema`                            | layout version, 8 bytes big-endian      |
//! | `nodes`       | `<department> NUL <node name>`        | `NodeInfo` (status not stored)          |
//! | `revocations` | `s/<serial hex>`                      | `Revocation` (with its version)         |
//! | `revocations` | `c/<version, 8 bytes big-endian>`     | `Revocation`                            |
//! | `revocations` | `m/version`, `m/schema`               | as in `catalog`                         |
//! | `grants`      | `g/<sequence, 8 bytes big-endian>`    | `Grant` (current state)                 |
//! | `grants`      | `c/<version, 8 bytes big-endian>`     | `GrantChange` (grant after the change)  |
//! | `grants`      | `i/<consumer> NUL <resource> NUL <sequence, 8 bytes>` | empty: the (consumer, resource) index |
//! | `grants`      | `m/version`, `m/seq`, `m/schema`      | latest version, last grant sequence, layout |
//!
//! Records, change records and the counters of one write live in one tree so a single `apply_batch` writes
//! them atomically; big-endian version keys make a change log scan in version order, and big-endian grant
//! sequence keys keep grants in request order however many digits the ids grow to.
//!
//! Revocations from before the revocation log (stored under the bare serial, without a version) are given
//! versions in serial order and moved under `s/` when the store opens, in one batch.
//!
//! Durability: sled flushes in the background every 500 ms; catalog writes, registrations, revocations and
//! grant writes `flush_async().await` before returning. Readers of a change log never see past the last
//! *flushed* version, so a watcher cannot observe a change that a crash would then lose and a later change
//! reuse.

use std::ops::Bound;
use std::path::Path;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use async_trait::async_trait;
use exchange_proto::v1::{
    AuditSeal, CatalogChange, CatalogEntry, ChangeKind, Grant, GrantChange, GrantStatus, NodeInfo, Revocation,
};
use prost::Message;

use super::{
    grant_id, parse_grant_id, CatalogStore, GrantStore, NodeRecord, NodeStore, RevocationStore, StoreError, Stores,
};

const ENTRY_PREFIX: &[u8] = b"e/";
const CHANGE_PREFIX: &[u8] = b"c/";
const SERIAL_PREFIX: &[u8] = b"s/";
const GRANT_PREFIX: &[u8] = b"g/";
const PAIR_PREFIX: &[u8] = b"i/";
const VERSION_KEY: &[u8] = b"m/version";
const SEQ_KEY: &[u8] = b"m/seq";
const SCHEMA_KEY: &[u8] = b"m/schema";
const SCHEMA_VERSION: u64 = 1;

fn backend(e: impl std::fmt::Display) -> StoreError {
    StoreError::Backend(e.to_string())
}

fn entry_key(code: &str) -> Vec<u8> {
    [ENTRY_PREFIX, code.as_bytes()].concat()
}

fn change_key(version: u64) -> Vec<u8> {
    [CHANGE_PREFIX, &version.to_be_bytes()[..]].concat()
}

fn serial_key(serial_hex: &str) -> Vec<u8> {
    [SERIAL_PREFIX, serial_hex.as_bytes()].concat()
}

fn grant_key(seq: u64) -> Vec<u8> {
    [GRANT_PREFIX, &seq.to_be_bytes()[..]].concat()
}

fn pair_prefix(consumer_code: &str, resource_code: &str) -> Vec<u8> {
    // Department codes are [a-z0-9-] and resource codes digits and '/': NUL ends each.
    [PAIR_PREFIX, consumer_code.as_bytes(), b"\0", resource_code.as_bytes(), b"\0"].concat()
}

fn pair_key(consumer_code: &str, resource_code: &str, seq: u64) -> Vec<u8> {
    [pair_prefix(consumer_code, resource_code), seq.to_be_bytes().to_vec()].concat()
}

fn node_key(department: &str, node_name: &str) -> Vec<u8> {
    // Department codes are [a-z0-9-], so the first NUL always ends the department.
    [department.as_bytes(), b"\0", node_name.as_bytes()].concat()
}

fn decode<M: Message + Default>(key: &[u8], bytes: &[u8]) -> Result<M, StoreError> {
    M::decode(bytes)
        .map_err(|e| StoreError::Corrupt { key: String::from_utf8_lossy(key).into_owned(), reason: e.to_string() })
}

fn read_u64(key: &[u8], bytes: &[u8]) -> Result<u64, StoreError> {
    let arr: [u8; 8] = bytes.try_into().map_err(|_| StoreError::Corrupt {
        key: String::from_utf8_lossy(key).into_owned(),
        reason: format!("expected 8 bytes, found {}", bytes.len()),
    })?;
    Ok(u64::from_be_bytes(arr))
}

/// Runs a blocking sled call (scans, batches) off the async worker threads.
async fn blocking<T: Send + 'static>(
    f: impl FnOnce() -> Result<T, StoreError> + Send + 'static,
) -> Result<T, StoreError> {
    tokio::task::spawn_blocking(f).await.map_err(|e| StoreError::Backend(format!("storage task failed: {e}")))?
}

/// Checks (or, in a new tree, writes) the layout version of `tree`.
fn check_schema(tree: &sled::Tree, name: &str) -> Result<(), StoreError> {
    match tree.get(SCHEMA_KEY).map_err(backend)? {
        Some(v) => {
            let schema = read_u64(SCHEMA_KEY, &v)?;
            if schema != SCHEMA_VERSION {
                return Err(StoreError::Corrupt {
                    key: format!("{name}/m/schema"),
                    reason: format!("data directory has layout version {schema}, this build reads {SCHEMA_VERSION}"),
                });
            }
        }
        None => {
            tree.insert(SCHEMA_KEY, &SCHEMA_VERSION.to_be_bytes()[..]).map_err(backend)?;
        }
    }
    Ok(())
}

/// The version counter of the change log in `tree`, checked against the log's last record (they are
/// written in one batch, so a mismatch means a damaged directory).
fn log_head(tree: &sled::Tree, name: &str) -> Result<u64, StoreError> {
    let version = match tree.get(VERSION_KEY).map_err(backend)? {
        Some(v) => read_u64(VERSION_KEY, &v)?,
        None => 0,
    };
    let last_change = last_u64_key(tree, CHANGE_PREFIX)?;
    if last_change != version {
        return Err(StoreError::Corrupt {
            key: format!("{name}/m/version"),
            reason: format!("version counter is {version} but the change log ends at {last_change}"),
        });
    }
    Ok(version)
}

/// The number in the last `<prefix><8 bytes big-endian>` key of `tree` (0 when there is none).
fn last_u64_key(tree: &sled::Tree, prefix: &[u8]) -> Result<u64, StoreError> {
    tree.scan_prefix(prefix)
        .next_back()
        .transpose()
        .map_err(backend)?
        .map(|(k, _)| read_u64(&k, &k[prefix.len()..]))
        .transpose()
        .map(Option::unwrap_or_default)
}

/// Up to `limit` change records of `tree` with version in `after_version + 1 ..= durable`.
async fn read_log<M: Message + Default + Send + 'static>(
    tree: &sled::Tree,
    durable: u64,
    after_version: u64,
    limit: usize,
) -> Result<Vec<M>, StoreError> {
    if after_version >= durable || limit == 0 {
        return Ok(Vec::new());
    }
    let tree = tree.clone();
    blocking(move || {
        tree.range(change_key(after_version + 1)..=change_key(durable))
            .take(limit)
            .map(|kv| {
                let (k, v) = kv.map_err(backend)?;
                decode::<M>(&k, &v)
            })
            .collect()
    })
    .await
}

/// Opens (or creates) the sled database in `dir` and returns the stores over it. Fails if another process
/// holds the database (sled locks it).
pub fn open(dir: &Path) -> Result<Stores, StoreError> {
    open_with_database(dir).map(|(stores, _)| stores)
}

/// The open database and its writers' locks, for a backup of the running directory ([`crate::backup`]).
/// Cheap to clone.
#[derive(Clone)]
pub struct SledDatabase {
    db: sled::Db,
    catalog: Arc<SledCatalogStore>,
    revocations: Arc<SledRevocationStore>,
    grants: Arc<SledGrantStore>,
}

/// While alive, the catalog, grant and revocation stores apply no write ([`SledDatabase::pause_writes`]).
#[must_use = "writes resume as soon as this is dropped"]
pub struct WritesPaused<'a> {
    _catalog: tokio::sync::MutexGuard<'a, u64>,
    _grants: tokio::sync::MutexGuard<'a, GrantCounters>,
    _revocations: tokio::sync::MutexGuard<'a, u64>,
}

impl SledDatabase {
    pub fn db(&self) -> &sled::Db {
        &self.db
    }

    /// Holds every catalog, grant and revocation write back until the guard is dropped, so each tree's
    /// entries, change log and counters are copied as of one moment (an iteration sees writes applied
    /// while it runs). Node registrations and heartbeats go on: each is one key, complete on its own.
    /// Locks are taken in one fixed order (no write path holds two of them).
    pub async fn pause_writes(&self) -> WritesPaused<'_> {
        WritesPaused {
            _catalog: self.catalog.write_lock.lock().await,
            _grants: self.grants.write_lock.lock().await,
            _revocations: self.revocations.write_lock.lock().await,
        }
    }
}

/// [`open`], also returning the database handle a backup needs.
pub fn open_with_database(dir: &Path) -> Result<(Stores, SledDatabase), StoreError> {
    std::fs::create_dir_all(dir).map_err(|e| StoreError::Backend(format!("{}: {e}", dir.display())))?;
    // sled lets go of its file lock a moment after a database is closed (its background threads finish
    // first), so a quick restart in the same process (tests) or right after a previous process can find it
    // still held: wait a little before giving up.
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(5);
    let db = loop {
        match sled::Config::new().path(dir).open() {
            Err(e) if e.to_string().contains("could not acquire lock") && std::time::Instant::now() < deadline => {
                std::thread::sleep(std::time::Duration::from_millis(50));
            }
            result => {
                break result
                    .map_err(|e| StoreError::Backend(format!("cannot open sled database in {}: {e}", dir.display())))?
            }
        }
    };
    let catalog = Arc::new(SledCatalogStore::open(&db)?);
    let nodes = SledNodeStore { tree: db.open_tree("nodes").map_err(backend)? };
    let revocations = Arc::new(SledRevocationStore::open(&db)?);
    let grants = Arc::new(SledGrantStore::open(&db)?);
    let stores = Stores {
        catalog: catalog.clone(),
        nodes: Arc::new(nodes),
        revocations: revocations.clone(),
        grants: grants.clone(),
    };
    Ok((stores, SledDatabase { db, catalog, revocations, grants }))
}

/// Catalog entries and change log in the `catalog` tree.
pub struct SledCatalogStore {
    tree: sled::Tree,
    /// Serialises writers and holds the last version handed out (applied, maybe not yet flushed).
    write_lock: tokio::sync::Mutex<u64>,
    /// The last version known to be on disk: the upper bound of what readers of the change log see.
    durable: AtomicU64,
}

impl SledCatalogStore {
    fn open(db: &sled::Db) -> Result<Self, StoreError> {
        let tree = db.open_tree("catalog").map_err(backend)?;
        check_schema(&tree, "catalog")?;
        let version = log_head(&tree, "catalog")?;
        Ok(SledCatalogStore { tree, write_lock: tokio::sync::Mutex::new(version), durable: AtomicU64::new(version) })
    }

    fn get_sync(tree: &sled::Tree, code: &str) -> Result<Option<CatalogEntry>, StoreError> {
        let key = entry_key(code);
        tree.get(&key).map_err(backend)?.map(|v| decode(&key, &v)).transpose()
    }

    /// Applies a batch of new entry states (each with its version set) plus their change records and the
    /// new counter, then flushes. Called with the write lock held.
    async fn commit(&self, last_handed_out: &mut u64, changes: Vec<CatalogChange>) -> Result<(), StoreError> {
        let Some(last) = changes.last().map(|c| c.version) else { return Ok(()) };
        let tree = self.tree.clone();
        blocking(move || {
            let mut batch = sled::Batch::default();
            for change in &changes {
                let entry = change.entry.as_ref().expect("change carries its entry");
                batch.insert(entry_key(&entry.resource_code), entry.encode_to_vec());
                batch.insert(change_key(change.version), change.encode_to_vec());
            }
            batch.insert(VERSION_KEY, &last.to_be_bytes()[..]);
            tree.apply_batch(batch).map_err(backend)
        })
        .await?;
        // Applied: these numbers are taken whether or not the flush below succeeds.
        *last_handed_out = last;
        self.tree.flush_async().await.map_err(backend)?;
        self.durable.store(*last_handed_out, Ordering::Release);
        Ok(())
    }
}

#[async_trait]
impl CatalogStore for SledCatalogStore {
    async fn upsert(&self, entries: Vec<CatalogEntry>) -> Result<Vec<CatalogEntry>, StoreError> {
        let mut version = self.write_lock.lock().await;
        let tree = self.tree.clone();
        let owners: Vec<(String, String)> =
            entries.iter().map(|e| (e.resource_code.clone(), e.provider_code.clone())).collect();
        blocking(move || {
            for (code, provider) in &owners {
                if let Some(held) = SledCatalogStore::get_sync(&tree, code)?.filter(|e| &e.provider_code != provider) {
                    return Err(owned_elsewhere(code, &held.provider_code));
                }
            }
            Ok(())
        })
        .await?;
        let mut next = *version;
        let changes: Vec<CatalogChange> = entries
            .into_iter()
            .map(|mut entry| {
                next += 1;
                entry.version = next;
                entry.withdrawn = false;
                CatalogChange { version: next, kind: ChangeKind::Upsert as i32, entry: Some(entry) }
            })
            .collect();
        let stored = changes.iter().filter_map(|c| c.entry.clone()).collect();
        self.commit(&mut version, changes).await?;
        Ok(stored)
    }

    async fn withdraw(&self, resource_codes: Vec<String>) -> Result<Vec<CatalogEntry>, StoreError> {
        let mut version = self.write_lock.lock().await;
        let tree = self.tree.clone();
        let base = *version;
        let changes = blocking(move || {
            let mut next = base;
            let mut changes: Vec<CatalogChange> = Vec::with_capacity(resource_codes.len());
            for code in &resource_codes {
                // A code named twice in one batch tombstones the tombstone of this batch, not the stored entry.
                let pending = changes.iter().rev().find_map(|c| c.entry.as_ref().filter(|e| &e.resource_code == code));
                let mut entry = match pending {
                    Some(e) => e.clone(),
                    None => SledCatalogStore::get_sync(&tree, code)?
                        .ok_or_else(|| StoreError::MissingEntry(code.clone()))?,
                };
                next += 1;
                entry.version = next;
                entry.withdrawn = true;
                changes.push(CatalogChange { version: next, kind: ChangeKind::Withdraw as i32, entry: Some(entry) });
            }
            Ok(changes)
        })
        .await?;
        let tombstones = changes.iter().filter_map(|c| c.entry.clone()).collect();
        self.commit(&mut version, changes).await?;
        Ok(tombstones)
    }

    async fn get(&self, resource_code: &str) -> Result<Option<CatalogEntry>, StoreError> {
        Self::get_sync(&self.tree, resource_code)
    }

    async fn get_many(&self, resource_codes: &[String]) -> Result<Vec<Option<CatalogEntry>>, StoreError> {
        let tree = self.tree.clone();
        let codes = resource_codes.to_vec();
        blocking(move || codes.iter().map(|c| Self::get_sync(&tree, c)).collect()).await
    }

    async fn changes_since(&self, after_version: u64, limit: usize) -> Result<Vec<CatalogChange>, StoreError> {
        read_log(&self.tree, self.durable.load(Ordering::Acquire), after_version, limit).await
    }

    async fn current_version(&self) -> Result<u64, StoreError> {
        Ok(self.durable.load(Ordering::Acquire))
    }

    async fn live_entries_after(
        &self,
        after_code: Option<&str>,
        limit: usize,
    ) -> Result<Vec<CatalogEntry>, StoreError> {
        if limit == 0 {
            return Ok(Vec::new());
        }
        let tree = self.tree.clone();
        let start = match after_code {
            Some(code) => Bound::Excluded(entry_key(code)),
            None => Bound::Included(ENTRY_PREFIX.to_vec()),
        };
        blocking(move || {
            // "e0" is the first key after every "e/..." key ('0' follows '/').
            let end = Bound::Excluded(b"e0".to_vec());
            let mut out = Vec::with_capacity(limit.min(10_000));
            for kv in tree.range::<Vec<u8>, _>((start, end)) {
                let (k, v) = kv.map_err(backend)?;
                let entry: CatalogEntry = decode(&k, &v)?;
                if !entry.withdrawn {
                    out.push(entry);
                    if out.len() >= limit {
                        break;
                    }
                }
            }
            Ok(out)
        })
        .await
    }
}

/// The node registry in the `nodes` tree.
pub struct SledNodeStore {
    tree: sled::Tree,
}

fn node_to_bytes(n: &NodeRecord) -> Vec<u8> {
    // Status is computed at read time; store it unset.
    let mut info = n.to_info(0);
    info.status = 0;
    info.encode_to_vec()
}

fn node_from_bytes(key: &[u8], bytes: &[u8]) -> Result<NodeRecord, StoreError> {
    let info: NodeInfo = decode(key, bytes)?;
    Ok(NodeRecord {
        department: info.department,
        node_name: info.node_name,
        address: info.address,
        software_version: info.software_version,
        registered_at_unix_ms: info.registered_at_unix_ms,
        last_heartbeat_unix_ms: info.last_heartbeat_unix_ms,
        lease_expires_unix_ms: info.lease_expires_unix_ms,
        audit_verifying_key_hex: info.audit_verifying_key_hex,
        audit_anchor: info.audit_anchor,
    })
}

#[async_trait]
impl NodeStore for SledNodeStore {
    async fn register(&self, node: NodeRecord) -> Result<(), StoreError> {
        self.tree.insert(node_key(&node.department, &node.node_name), node_to_bytes(&node)).map_err(backend)?;
        self.tree.flush_async().await.map_err(backend)?;
        Ok(())
    }

    async fn heartbeat(
        &self,
        department: &str,
        node_name: &str,
        now_unix_ms: i64,
        lease_expires_unix_ms: i64,
        audit_seal: Option<AuditSeal>,
    ) -> Result<Option<NodeRecord>, StoreError> {
        let key = node_key(department, node_name);
        let mut corrupt = None;
        // update_and_fetch is atomic, so a heartbeat racing a re-registration cannot write back a stale address.
        let updated = self
            .tree
            .update_and_fetch(&key, |old| {
                let old = old?;
                match node_from_bytes(&key, old) {
                    Ok(mut node) => {
                        node.last_heartbeat_unix_ms = now_unix_ms;
                        node.lease_expires_unix_ms = lease_expires_unix_ms;
                        if let Some(seal) = &audit_seal {
                            if node.audit_anchor.as_ref().is_none_or(|a| seal.upto_seq > a.upto_seq) {
                                node.audit_anchor = Some(seal.clone());
                            }
                        }
                        Some(node_to_bytes(&node))
                    }
                    Err(e) => {
                        corrupt = Some(e);
                        Some(old.to_vec())
                    }
                }
            })
            .map_err(backend)?;
        if let Some(e) = corrupt {
            return Err(e);
        }
        updated.map(|v| node_from_bytes(&key, &v)).transpose()
    }

    async fn list(&self, department: Option<&str>) -> Result<Vec<NodeRecord>, StoreError> {
        let tree = self.tree.clone();
        let prefix = department.map(|d| node_key(d, "")).unwrap_or_default();
        blocking(move || {
            tree.scan_prefix(prefix)
                .map(|kv| {
                    let (k, v) = kv.map_err(backend)?;
                    node_from_bytes(&k, &v)
                })
                .collect()
        })
        .await
    }
}

/// Revoked serials and the revocation log in the `revocations` tree.
pub struct SledRevocationStore {
    tree: sled::Tree,
    /// Serialises writers and holds the last version handed out (applied, maybe not yet flushed).
    write_lock: tokio::sync::Mutex<u64>,
    /// The last version known to be on disk: the upper bound of what readers of the log see.
    durable: AtomicU64,
}

impl SledRevocationStore {
    fn open(db: &sled::Db) -> Result<Self, StoreError> {
        let tree = db.open_tree("revocations").map_err(backend)?;
        check_schema(&tree, "revocations")?;
        let version = Self::migrate_unversioned(&tree, log_head(&tree, "revocations")?)?;
        Ok(SledRevocationStore { tree, write_lock: tokio::sync::Mutex::new(version), durable: AtomicU64::new(version) })
    }

    /// Revocations stored before the log existed sit under the bare serial (hex, so never a `/` in the key)
    /// without a version. Gives them versions after `version`, in serial order, and moves them under `s/`,
    /// in one batch; returns the new head version.
    fn migrate_unversioned(tree: &sled::Tree, mut version: u64) -> Result<u64, StoreError> {
        let mut batch = sled::Batch::default();
        let (mut legacy, mut moved) = (0usize, 0usize);
        for kv in tree.iter() {
            let (k, v) = kv.map_err(backend)?;
            if k.contains(&b'/') {
                continue;
            }
            legacy += 1;
            let mut revocation: Revocation = decode(&k, &v)?;
            batch.remove(k);
            let key = serial_key(&revocation.serial_hex);
            if tree.get(&key).map_err(backend)?.is_some() {
                continue; // already in the log: drop the stale copy
            }
            version += 1;
            revocation.version = version;
            batch.insert(key, revocation.encode_to_vec());
            batch.insert(change_key(version), revocation.encode_to_vec());
            moved += 1;
        }
        if legacy == 0 {
            return Ok(version);
        }
        batch.insert(VERSION_KEY, &version.to_be_bytes()[..]);
        tree.apply_batch(batch).map_err(backend)?;
        tree.flush().map_err(backend)?;
        tracing::info!(revocations = moved, version, "gave versions to revocations stored before the log");
        Ok(version)
    }
}

#[async_trait]
impl RevocationStore for SledRevocationStore {
    async fn revoke(&self, mut revocation: Revocation) -> Result<Revocation, StoreError> {
        let mut last = self.write_lock.lock().await;
        let key = serial_key(&revocation.serial_hex);
        let stored = match self.tree.get(&key).map_err(backend)? {
            Some(bytes) => decode(&key, &bytes)?,
            None => {
                let version = *last + 1;
                revocation.version = version;
                let mut batch = sled::Batch::default();
                batch.insert(key, revocation.encode_to_vec());
                batch.insert(change_key(version), revocation.encode_to_vec());
                batch.insert(VERSION_KEY, &version.to_be_bytes()[..]);
                self.tree.apply_batch(batch).map_err(backend)?;
                *last = version;
                revocation
            }
        };
        // Flush in both cases: a repeated revoke also confirms that the first one is on disk.
        self.tree.flush_async().await.map_err(backend)?;
        self.durable.store(*last, Ordering::Release);
        Ok(stored)
    }

    async fn list(&self) -> Result<Vec<Revocation>, StoreError> {
        let tree = self.tree.clone();
        blocking(move || {
            tree.scan_prefix(SERIAL_PREFIX)
                .map(|kv| {
                    let (k, v) = kv.map_err(backend)?;
                    decode(&k, &v)
                })
                .collect()
        })
        .await
    }

    async fn changes_since(&self, after_version: u64, limit: usize) -> Result<Vec<Revocation>, StoreError> {
        read_log(&self.tree, self.durable.load(Ordering::Acquire), after_version, limit).await
    }

    async fn current_version(&self) -> Result<u64, StoreError> {
        Ok(self.durable.load(Ordering::Acquire))
    }
}

/// The counters a grant write advances.
struct GrantCounters {
    /// Last version handed out (applied, maybe not yet flushed).
    version: u64,
    /// Last grant sequence number handed out.
    seq: u64,
}

/// Grants, their (consumer, resource) index and change log in the `grants` tree.
pub struct SledGrantStore {
    tree: sled::Tree,
    /// Serialises writers.
    write_lock: tokio::sync::Mutex<GrantCounters>,
    /// The last version known to be on disk: the upper bound of what readers of the change log see.
    durable: AtomicU64,
}

impl SledGrantStore {
    fn open(db: &sled::Db) -> Result<Self, StoreError> {
        let tree = db.open_tree("grants").map_err(backend)?;
        check_schema(&tree, "grants")?;
        let version = log_head(&tree, "grants")?;
        let seq = match tree.get(SEQ_KEY).map_err(backend)? {
            Some(v) => read_u64(SEQ_KEY, &v)?,
            None => 0,
        };
        let last_grant = last_u64_key(&tree, GRANT_PREFIX)?;
        if last_grant != seq {
            return Err(StoreError::Corrupt {
                key: "grants/m/seq".into(),
                reason: format!("grant sequence is {seq} but the last grant is number {last_grant}"),
            });
        }
        Ok(SledGrantStore {
            tree,
            write_lock: tokio::sync::Mutex::new(GrantCounters { version, seq }),
            durable: AtomicU64::new(version),
        })
    }

    fn for_consumer_sync(tree: &sled::Tree, consumer_code: &str, resource_code: &str) -> Result<Vec<Grant>, StoreError> {
        let prefix = pair_prefix(consumer_code, resource_code);
        let mut out = Vec::new();
        for kv in tree.scan_prefix(&prefix) {
            let (k, _) = kv.map_err(backend)?;
            let seq = read_u64(&k, &k[prefix.len()..])?;
            let grant = Self::get_sync(tree, seq)?.ok_or_else(|| StoreError::Corrupt {
                key: String::from_utf8_lossy(&k).into_owned(),
                reason: format!("indexes grant {} which does not exist", grant_id(seq)),
            })?;
            out.push(grant);
        }
        Ok(out)
    }

    fn get_sync(tree: &sled::Tree, seq: u64) -> Result<Option<Grant>, StoreError> {
        let key = grant_key(seq);
        tree.get(&key).map_err(backend)?.map(|v| decode(&key, &v)).transpose()
    }

    /// Adds the counters to `batch`, applies it and flushes. Called with the write lock held.
    async fn commit(
        &self,
        counters: &mut GrantCounters,
        mut batch: sled::Batch,
        version: u64,
        seq: u64,
    ) -> Result<(), StoreError> {
        batch.insert(VERSION_KEY, &version.to_be_bytes()[..]);
        batch.insert(SEQ_KEY, &seq.to_be_bytes()[..]);
        let tree = self.tree.clone();
        blocking(move || tree.apply_batch(batch).map_err(backend)).await?;
        // Applied: these numbers are taken whether or not the flush below succeeds.
        counters.version = version;
        counters.seq = seq;
        self.tree.flush_async().await.map_err(backend)?;
        self.durable.store(version, Ordering::Release);
        Ok(())
    }
}

fn owned_elsewhere(code: &str, owner: &str) -> StoreError {
    StoreError::Conflict(format!("resource code {code} already belongs to department {owner}"))
}

fn pending_exists(pending: &Grant) -> StoreError {
    StoreError::Conflict(format!(
        "grant {} of department {} for {} is pending already",
        pending.grant_id, pending.consumer_code, pending.resource_code
    ))
}

fn changed_since_read(grant_id: &str, read: u64, now: u64) -> StoreError {
    StoreError::Conflict(format!("grant {grant_id} changed since it was read (version {read} read, {now} stored)"))
}

fn grant_change(grant: &Grant) -> Vec<u8> {
    GrantChange { version: grant.version, grant: Some(grant.clone()) }.encode_to_vec()
}

#[async_trait]
impl GrantStore for SledGrantStore {
    async fn insert(&self, mut grant: Grant) -> Result<Grant, StoreError> {
        let mut counters = self.write_lock.lock().await;
        let tree = self.tree.clone();
        let pair = (grant.consumer_code.clone(), grant.resource_code.clone());
        blocking(move || match Self::for_consumer_sync(&tree, &pair.0, &pair.1)?
            .into_iter()
            .find(|g| g.status == GrantStatus::Pending as i32)
        {
            Some(pending) => Err(pending_exists(&pending)),
            None => Ok(()),
        })
        .await?;
        let (version, seq) = (counters.version + 1, counters.seq + 1);
        grant.grant_id = grant_id(seq);
        grant.version = version;
        let mut batch = sled::Batch::default();
        batch.insert(grant_key(seq), grant.encode_to_vec());
        batch.insert(pair_key(&grant.consumer_code, &grant.resource_code, seq), &[][..]);
        batch.insert(change_key(version), grant_change(&grant));
        self.commit(&mut counters, batch, version, seq).await?;
        Ok(grant)
    }

    async fn update(&self, grants: Vec<Grant>) -> Result<Vec<Grant>, StoreError> {
        let mut counters = self.write_lock.lock().await;
        let mut version = counters.version;
        let mut batch = sled::Batch::default();
        let mut stored = Vec::with_capacity(grants.len());
        for mut grant in grants {
            let bad = |why: &str| StoreError::BadGrantUpdate(grant.grant_id.clone(), why.to_string());
            let seq = parse_grant_id(&grant.grant_id).ok_or_else(|| bad("not a grant id"))?;
            let old = Self::get_sync(&self.tree, seq)?.ok_or_else(|| bad("no such grant"))?;
            if (&old.resource_code, &old.consumer_code, &old.provider_code)
                != (&grant.resource_code, &grant.consumer_code, &grant.provider_code)
            {
                return Err(bad("resource, consumer and provider of a grant cannot change"));
            }
            // Within one call, a grant named twice is checked against its first write here.
            let read_as = stored.iter().rev().find(|g: &&Grant| g.grant_id == grant.grant_id).map_or(old.version, |g| g.version);
            if grant.version != read_as {
                return Err(changed_since_read(&grant.grant_id, grant.version, read_as));
            }
            version += 1;
            grant.version = version;
            batch.insert(grant_key(seq), grant.encode_to_vec());
            batch.insert(change_key(version), grant_change(&grant));
            stored.push(grant);
        }
        if !stored.is_empty() {
            let seq = counters.seq;
            self.commit(&mut counters, batch, version, seq).await?;
        }
        Ok(stored)
    }

    async fn get(&self, grant_id: &str) -> Result<Option<Grant>, StoreError> {
        match parse_grant_id(grant_id) {
            Some(seq) => Self::get_sync(&self.tree, seq),
            None => Ok(None),
        }
    }

    async fn for_consumer(&self, consumer_code: &str, resource_code: &str) -> Result<Vec<Grant>, StoreError> {
        let tree = self.tree.clone();
        let (consumer, resource) = (consumer_code.to_string(), resource_code.to_string());
        blocking(move || Self::for_consumer_sync(&tree, &consumer, &resource)).await
    }

    async fn list(&self, department: Option<&str>) -> Result<Vec<Grant>, StoreError> {
        let tree = self.tree.clone();
        let department = department.map(str::to_string);
        blocking(move || {
            let mut out = Vec::new();
            for kv in tree.scan_prefix(GRANT_PREFIX).rev() {
                let (k, v) = kv.map_err(backend)?;
                let grant: Grant = decode(&k, &v)?;
                let visible =
                    department.as_deref().is_none_or(|d| grant.provider_code == d || grant.consumer_code == d);
                if visible {
                    out.push(grant);
                }
            }
            Ok(out)
        })
        .await
    }

    async fn changes_since(&self, after_version: u64, limit: usize) -> Result<Vec<GrantChange>, StoreError> {
        read_log(&self.tree, self.durable.load(Ordering::Acquire), after_version, limit).await
    }

    async fn current_version(&self) -> Result<u64, StoreError> {
        Ok(self.durable.load(Ordering::Acquire))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn entry(code: &str) -> CatalogEntry {
        CatalogEntry { resource_code: code.into(), provider_code: "tax".into(), name: "n".into(), ..Default::default() }
    }

    #[tokio::test]
    async fn versions_change_log_and_tombstones_survive_reopen() {
        let dir = tempfile::tempdir().unwrap();
        {
            let stores = open(dir.path()).unwrap();
            let stored = stores.catalog.upsert(vec![entry("1/000001"), entry("1/000002")]).await.unwrap();
            assert_eq!(stored.iter().map(|e| e.version).collect::<Vec<_>>(), vec![1, 2]);
            let tomb = stores.catalog.withdraw(vec!["1/000001".into()]).await.unwrap();
            assert_eq!((tomb[0].version, tomb[0].withdrawn), (3, true));
            assert!(matches!(stores.catalog.withdraw(vec!["1/000009".into()]).await, Err(StoreError::MissingEntry(_))));
            assert_eq!(stores.catalog.current_version().await.unwrap(), 3);
        }
        let stores = open(dir.path()).unwrap();
        assert_eq!(stores.catalog.current_version().await.unwrap(), 3);
        let changes = stores.catalog.changes_since(0, 100).await.unwrap();
        assert_eq!(changes.iter().map(|c| c.version).collect::<Vec<_>>(), vec![1, 2, 3]);
        assert_eq!(changes[2].kind, ChangeKind::Withdraw as i32);
        assert_eq!(stores.catalog.changes_since(1, 1).await.unwrap()[0].version, 2);
        assert!(stores.catalog.changes_since(3, 10).await.unwrap().is_empty());
        let live = stores.catalog.live_entries_after(None, 10).await.unwrap();
        assert_eq!(live.iter().map(|e| e.resource_code.as_str()).collect::<Vec<_>>(), vec!["1/000002"]);
        assert!(stores.catalog.get("1/000001").await.unwrap().unwrap().withdrawn);
        let next = stores.catalog.upsert(vec![entry("1/000001")]).await.unwrap();
        assert_eq!((next[0].version, next[0].withdrawn), (4, false));
    }

    #[tokio::test]
    async fn live_entries_page_in_code_order() {
        let dir = tempfile::tempdir().unwrap();
        let stores = open(dir.path()).unwrap();
        let codes: Vec<String> = (1..=25).map(|i| format!("1/{i:06}")).collect();
        stores.catalog.upsert(codes.iter().map(|c| entry(c)).collect()).await.unwrap();
        stores.catalog.withdraw(vec![codes[3].clone()]).await.unwrap();
        let mut seen = Vec::new();
        let mut after: Option<String> = None;
        loop {
            let page = stores.catalog.live_entries_after(after.as_deref(), 7).await.unwrap();
            if page.is_empty() {
                break;
            }
            after = page.last().map(|e| e.resource_code.clone());
            seen.extend(page.into_iter().map(|e| e.resource_code));
        }
        let expected: Vec<String> = codes.iter().filter(|c| *c != &codes[3]).cloned().collect();
        assert_eq!(seen, expected);
    }

    #[tokio::test]
    async fn nodes_and_revocations() {
        let dir = tempfile::tempdir().unwrap();
        let stores = open(dir.path()).unwrap();
        assert!(stores.nodes.heartbeat("tax", "n1", 5, 10, None).await.unwrap().is_none());
        let rec = NodeRecord {
            department: "tax".into(),
            node_name: "n1".into(),
            address: "h:1".into(),
            software_version: "v".into(),
            registered_at_unix_ms: 1,
            last_heartbeat_unix_ms: 1,
            lease_expires_unix_ms: 2,
            audit_verifying_key_hex: "ab".repeat(32),
            audit_anchor: None,
        };
        stores.nodes.register(rec.clone()).await.unwrap();
        stores.nodes.register(NodeRecord { department: "taxi".into(), ..rec.clone() }).await.unwrap();
        let seal = |n| AuditSeal { upto_seq: n, chain_hash: format!("h{n}"), ..Default::default() };
        let hb = stores.nodes.heartbeat("tax", "n1", 5, 10, Some(seal(7))).await.unwrap().unwrap();
        assert_eq!((hb.last_heartbeat_unix_ms, hb.lease_expires_unix_ms, hb.address.as_str()), (5, 10, "h:1"));
        let hb = stores.nodes.heartbeat("tax", "n1", 6, 11, Some(seal(3))).await.unwrap().unwrap();
        assert_eq!(hb.audit_anchor.unwrap().upto_seq, 7, "an anchor never moves back");
        let hb = stores.nodes.heartbeat("tax", "n1", 7, 12, None).await.unwrap().unwrap();
        assert_eq!(hb.audit_anchor.unwrap().chain_hash, "h7");
        assert_eq!(hb.audit_verifying_key_hex, "ab".repeat(32));
        assert_eq!(stores.nodes.list(Some("tax")).await.unwrap().len(), 1);
        assert_eq!(stores.nodes.list(None).await.unwrap().len(), 2);

        let r = Revocation { serial_hex: "0a".into(), reason: "first".into(), ..Default::default() };
        assert_eq!(stores.revocations.revoke(r.clone()).await.unwrap().reason, "first");
        let again = Revocation { reason: "second".into(), ..r };
        assert_eq!(stores.revocations.revoke(again).await.unwrap().reason, "first");
        assert_eq!(stores.revocations.list().await.unwrap().len(), 1);
    }

    fn revocation(serial: &str) -> Revocation {
        Revocation { serial_hex: serial.into(), reason: format!("r{serial}"), version: 99, ..Default::default() }
    }

    #[tokio::test]
    async fn revocation_versions_are_consecutive_and_survive_reopen() {
        let dir = tempfile::tempdir().unwrap();
        {
            let stores = open(dir.path()).unwrap();
            assert_eq!(stores.revocations.current_version().await.unwrap(), 0);
            assert_eq!(stores.revocations.revoke(revocation("0b")).await.unwrap().version, 1);
            assert_eq!(stores.revocations.revoke(revocation("0a")).await.unwrap().version, 2);
            // a repeated revoke returns the first record and takes no version
            let again = stores.revocations.revoke(Revocation { reason: "again".into(), ..revocation("0b") }).await;
            assert_eq!((again.as_ref().unwrap().version, again.unwrap().reason.as_str()), (1, "r0b"));
            assert_eq!(stores.revocations.current_version().await.unwrap(), 2);
        }
        let stores = open(dir.path()).unwrap();
        assert_eq!(stores.revocations.current_version().await.unwrap(), 2);
        let by_serial = stores.revocations.list().await.unwrap();
        assert_eq!(
            by_serial.iter().map(|r| (r.serial_hex.as_str(), r.version)).collect::<Vec<_>>(),
            [("0a", 2), ("0b", 1)]
        );
        let log = stores.revocations.changes_since(0, 10).await.unwrap();
        assert_eq!(log.iter().map(|r| (r.serial_hex.as_str(), r.version)).collect::<Vec<_>>(), [("0b", 1), ("0a", 2)]);
        assert_eq!(stores.revocations.changes_since(1, 10).await.unwrap().len(), 1);
        assert!(stores.revocations.changes_since(2, 10).await.unwrap().is_empty());
        assert_eq!(stores.revocations.revoke(revocation("0c")).await.unwrap().version, 3);
    }

    #[tokio::test]
    async fn revocations_stored_without_versions_get_them_in_serial_order() {
        let dir = tempfile::tempdir().unwrap();
        {
            // The layout before the revocation log: the bare serial as key, no version.
            let db = sled::Config::new().path(dir.path()).open().unwrap();
            let tree = db.open_tree("revocations").unwrap();
            for serial in ["ff01", "0a", "1c"] {
                let r = Revocation { version: 0, ..revocation(serial) };
                tree.insert(serial.as_bytes(), r.encode_to_vec()).unwrap();
            }
            db.flush().unwrap();
        }
        for _ in 0..2 {
            // the second open finds nothing left to migrate
            let stores = open(dir.path()).unwrap();
            assert_eq!(stores.revocations.current_version().await.unwrap(), 3);
            let log = stores.revocations.changes_since(0, 10).await.unwrap();
            let got: Vec<(&str, u64)> = log.iter().map(|r| (r.serial_hex.as_str(), r.version)).collect();
            assert_eq!(got, [("0a", 1), ("1c", 2), ("ff01", 3)]);
            assert_eq!(stores.revocations.list().await.unwrap().len(), 3);
            assert_eq!(stores.revocations.revoke(revocation("1c")).await.unwrap().version, 2);
        }
    }

    fn pending(consumer: &str, resource: &str) -> Grant {
        Grant {
            resource_code: resource.into(),
            consumer_code: consumer.into(),
            provider_code: "tax".into(),
            requested_items: vec!["a".into()],
            status: exchange_proto::v1::GrantStatus::Pending as i32,
            ..Default::default()
        }
    }

    #[tokio::test]
    async fn grants_ids_versions_index_and_log_survive_reopen() {
        use exchange_proto::v1::GrantStatus;
        let dir = tempfile::tempdir().unwrap();
        {
            let stores = open(dir.path()).unwrap();
            // Approved, so the second request of the same pair (g3) is allowed: one pending request per pair.
            let g1 = stores.grants.insert(Grant { status: GrantStatus::Approved as i32, ..pending("police", "1/000001") }).await.unwrap();
            assert_eq!((g1.grant_id.as_str(), g1.version), ("G00000001", 1));
            let g2 = stores.grants.insert(pending("health", "1/000001")).await.unwrap();
            let g3 = stores.grants.insert(pending("police", "1/000001")).await.unwrap();
            assert_eq!((g2.grant_id.as_str(), g3.grant_id.as_str(), g3.version), ("G00000002", "G00000003", 3));

            // one atomic update of two grants: consecutive versions, in order
            let approved = Grant { status: GrantStatus::Approved as i32, ..g1.clone() };
            let rejected = Grant { status: GrantStatus::Rejected as i32, ..g3.clone() };
            let stored = stores.grants.update(vec![approved, rejected]).await.unwrap();
            assert_eq!(stored.iter().map(|g| g.version).collect::<Vec<_>>(), [4, 5]);

            // an unknown grant or a changed consumer writes nothing
            let unknown = Grant { grant_id: "G00000009".into(), ..g1.clone() };
            let moved = Grant { consumer_code: "health".into(), ..g1.clone() };
            for bad in [vec![g2.clone(), unknown], vec![moved]] {
                assert!(matches!(stores.grants.update(bad).await, Err(StoreError::BadGrantUpdate(..))));
            }
            assert_eq!(stores.grants.current_version().await.unwrap(), 5);
        }
        let stores = open(dir.path()).unwrap();
        assert_eq!(stores.grants.current_version().await.unwrap(), 5);
        let police: Vec<(String, i32)> = stores
            .grants
            .for_consumer("police", "1/000001")
            .await
            .unwrap()
            .into_iter()
            .map(|g| (g.grant_id, g.status))
            .collect();
        assert_eq!(
            police,
            [("G00000001".into(), GrantStatus::Approved as i32), ("G00000003".into(), GrantStatus::Rejected as i32)]
        );
        assert!(stores.grants.for_consumer("police", "1/000002").await.unwrap().is_empty());
        let ids = |gs: Vec<Grant>| gs.into_iter().map(|g| g.grant_id).collect::<Vec<_>>();
        assert_eq!(ids(stores.grants.list(None).await.unwrap()), ["G00000003", "G00000002", "G00000001"]);
        assert_eq!(ids(stores.grants.list(Some("health")).await.unwrap()), ["G00000002"]);
        assert_eq!(ids(stores.grants.list(Some("tax")).await.unwrap()).len(), 3);
        assert!(stores.grants.list(Some("commerce")).await.unwrap().is_empty());
        // the log keeps every state, each with its version
        let log = stores.grants.changes_since(0, 100).await.unwrap();
        let states: Vec<(u64, &str, i32, u64)> = log
            .iter()
            .map(|c| {
                let g = c.grant.as_ref().unwrap();
                (c.version, g.grant_id.as_str(), g.status, g.version)
            })
            .collect();
        let (p, a, r) = (GrantStatus::Pending as i32, GrantStatus::Approved as i32, GrantStatus::Rejected as i32);
        assert_eq!(
            states,
            [
                (1, "G00000001", a, 1),
                (2, "G00000002", p, 2),
                (3, "G00000003", p, 3),
                (4, "G00000001", a, 4),
                (5, "G00000003", r, 5)
            ]
        );
        assert_eq!(stores.grants.changes_since(3, 1).await.unwrap()[0].version, 4);
        assert_eq!(stores.grants.get("G00000002").await.unwrap().unwrap().consumer_code, "health");
        assert!(stores.grants.get("G00000004").await.unwrap().is_none());
        assert!(stores.grants.get("nonsense").await.unwrap().is_none());
        // ids and versions continue
        let g4 = stores.grants.insert(pending("police", "1/000002")).await.unwrap();
        assert_eq!((g4.grant_id.as_str(), g4.version), ("G00000004", 6));
    }

    #[test]
    fn grant_ids() {
        use crate::store::{grant_id, parse_grant_id};
        assert_eq!(grant_id(1), "G00000001");
        assert_eq!(grant_id(123_456_789), "G123456789");
        assert_eq!(parse_grant_id("G00000042"), Some(42));
        assert_eq!(parse_grant_id("G123456789"), Some(123_456_789));
        for bad in ["", "G", "G0000001", "g00000001", "G00000000", "G0000000a", "G000000001", "00000001", "G+0000001"] {
            assert_eq!(parse_grant_id(bad), None, "{bad}");
        }
    }
}
