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
//! | `revocations` | `<serial hex>`                        | `Revocation`                            |
//!
//! Entries, change records and the version counter of one batch live in one tree so a single
//! `apply_batch` writes them atomically; big-endian version keys make the change log scan in version order.
//!
//! Durability: sled flushes in the background every 500 ms; catalog writes, registrations and revocations
//! `flush_async().await` before returning. Readers of the change log never see past the last *flushed*
//! version, so a watcher cannot observe a change that a crash would then lose and a later change reuse.

use std::ops::Bound;
use std::path::Path;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use async_trait::async_trait;
use exchange_proto::v1::{CatalogChange, CatalogEntry, ChangeKind, NodeInfo, Revocation};
use prost::Message;

use super::{CatalogStore, NodeRecord, NodeStore, RevocationStore, StoreError, Stores};

const ENTRY_PREFIX: &[u8] = b"e/";
const CHANGE_PREFIX: &[u8] = b"c/";
const VERSION_KEY: &[u8] = b"m/version";
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

/// Opens (or creates) the sled database in `dir` and returns the three stores over it. Fails if another
/// process holds the database (sled locks it).
pub fn open(dir: &Path) -> Result<Stores, StoreError> {
    std::fs::create_dir_all(dir).map_err(|e| StoreError::Backend(format!("{}: {e}", dir.display())))?;
    let db = sled::Config::new()
        .path(dir)
        .open()
        .map_err(|e| StoreError::Backend(format!("cannot open sled database in {}: {e}", dir.display())))?;
    let catalog = SledCatalogStore::open(&db)?;
    let nodes = SledNodeStore { tree: db.open_tree("nodes").map_err(backend)? };
    let revocations = SledRevocationStore { tree: db.open_tree("revocations").map_err(backend)? };
    Ok(Stores { catalog: Arc::new(catalog), nodes: Arc::new(nodes), revocations: Arc::new(revocations) })
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
        match tree.get(SCHEMA_KEY).map_err(backend)? {
            Some(v) => {
                let schema = read_u64(SCHEMA_KEY, &v)?;
                if schema != SCHEMA_VERSION {
                    return Err(StoreError::Corrupt {
                        key: "m/schema".into(),
                        reason: format!(
                            "data directory has layout version {schema}, this build reads {SCHEMA_VERSION}"
                        ),
                    });
                }
            }
            None => {
                tree.insert(SCHEMA_KEY, &SCHEMA_VERSION.to_be_bytes()[..]).map_err(backend)?;
            }
        }
        let version = match tree.get(VERSION_KEY).map_err(backend)? {
            Some(v) => read_u64(VERSION_KEY, &v)?,
            None => 0,
        };
        // The counter and the change log are written in one batch; a mismatch means a damaged directory.
        let last_change = tree
            .scan_prefix(CHANGE_PREFIX)
            .next_back()
            .transpose()
            .map_err(backend)?
            .map(|(k, _)| read_u64(&k, &k[CHANGE_PREFIX.len()..]))
            .transpose()?
            .unwrap_or(0);
        if last_change != version {
            return Err(StoreError::Corrupt {
                key: "m/version".into(),
                reason: format!("version counter is {version} but the change log ends at {last_change}"),
            });
        }
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
        let durable = self.durable.load(Ordering::Acquire);
        if after_version >= durable || limit == 0 {
            return Ok(Vec::new());
        }
        let tree = self.tree.clone();
        blocking(move || {
            tree.range(change_key(after_version + 1)..=change_key(durable))
                .take(limit)
                .map(|kv| {
                    let (k, v) = kv.map_err(backend)?;
                    decode::<CatalogChange>(&k, &v)
                })
                .collect()
        })
        .await
    }

    async fn current_version(&self) -> Result<u64, StoreError> {
        Ok(self.durable.load(Ordering::Acquire))
    }

    async fn live_entries_after(
        &self,
        after_code: Option<&str>,
        limit: usize,
    ) -> Result<Vec<CatalogEntry>, StoreError> {
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

/// Revoked serials in the `revocations` tree.
pub struct SledRevocationStore {
    tree: sled::Tree,
}

#[async_trait]
impl RevocationStore for SledRevocationStore {
    async fn revoke(&self, revocation: Revocation) -> Result<Revocation, StoreError> {
        let key = revocation.serial_hex.as_bytes().to_vec();
        let stored = match self
            .tree
            .compare_and_swap(&key, None as Option<&[u8]>, Some(revocation.encode_to_vec()))
            .map_err(backend)?
        {
            Ok(()) => revocation,
            Err(existing) => match existing.current {
                Some(bytes) => decode(&key, &bytes)?,
                None => revocation,
            },
        };
        self.tree.flush_async().await.map_err(backend)?;
        Ok(stored)
    }

    async fn list(&self) -> Result<Vec<Revocation>, StoreError> {
        let tree = self.tree.clone();
        blocking(move || {
            tree.iter()
                .map(|kv| {
                    let (k, v) = kv.map_err(backend)?;
                    decode(&k, &v)
                })
                .collect()
        })
        .await
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
        assert!(stores.nodes.heartbeat("tax", "n1", 5, 10).await.unwrap().is_none());
        let rec = NodeRecord {
            department: "tax".into(),
            node_name: "n1".into(),
            address: "h:1".into(),
            software_version: "v".into(),
            registered_at_unix_ms: 1,
            last_heartbeat_unix_ms: 1,
            lease_expires_unix_ms: 2,
        };
        stores.nodes.register(rec.clone()).await.unwrap();
        stores.nodes.register(NodeRecord { department: "taxi".into(), ..rec.clone() }).await.unwrap();
        let hb = stores.nodes.heartbeat("tax", "n1", 5, 10).await.unwrap().unwrap();
        assert_eq!((hb.last_heartbeat_unix_ms, hb.lease_expires_unix_ms, hb.address.as_str()), (5, 10, "h:1"));
        assert_eq!(stores.nodes.list(Some("tax")).await.unwrap().len(), 1);
        assert_eq!(stores.nodes.list(None).await.unwrap().len(), 2);

        let r = Revocation { serial_hex: "0a".into(), reason: "first".into(), ..Default::default() };
        assert_eq!(stores.revocations.revoke(r.clone()).await.unwrap().reason, "first");
        let again = Revocation { reason: "second".into(), ..r };
        assert_eq!(stores.revocations.revoke(again).await.unwrap().reason, "first");
        assert_eq!(stores.revocations.list().await.unwrap().len(), 1);
    }
}
