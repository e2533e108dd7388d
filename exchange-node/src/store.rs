//! The node's own durable state, behind [`NodeStore`] so the sled engine can be swapped (sled is beta).
//!
//! It holds the last registration the directory granted (to report it and to notice a changed address).
//! The node's other state lives in its own trees of the same sled database: the directory's rules
//! (`policy`), the record store (`records`) and the audit trail (`audit`); [`SledStore::db`] hands the
//! database to them.
//! Records are protobuf-encoded so the format is shared with the wire and evolves the same way.

use std::path::Path;
use std::time::Duration;

use exchange_proto::v1::RegisterNodeResponse;
use prost::Message;

use crate::error::NodeError;

/// sled's page cache. Its default (1 GiB) would let a large backlog or a bulk sync grow the node's memory
/// far past what a department server can spare; the store works from disk beyond this.
pub const CACHE_BYTES: u64 = 64 * 1024 * 1024;

/// Whether sled refused to open because another holder still has the file lock.
pub fn is_lock_error(e: &sled::Error) -> bool {
    e.to_string().contains("could not acquire lock")
}

/// Opens a sled database, waiting up to `wait` for another holder's lock to go: sled lets go of its file
/// lock a moment after the database is closed (background writes finish first), also in a node that
/// has just been stopped.
pub fn open_db_waiting(path: &Path, wait: Duration) -> sled::Result<sled::Db> {
    let deadline = std::time::Instant::now() + wait;
    loop {
        match sled::Config::new().path(path).cache_capacity(CACHE_BYTES).open() {
            Err(e) if is_lock_error(&e) && std::time::Instant::now() < deadline => {
                std::thread::sleep(Duration::from_millis(50));
            }
            result => return result,
        }
    }
}

/// What the node remembers across restarts.
pub trait NodeStore: Send + Sync + 'static {
    fn last_registration(&self) -> Result<Option<RegisterNodeResponse>, NodeError>;
    fn save_registration(&self, registration: &RegisterNodeResponse) -> Result<(), NodeError>;
    /// Makes every write so far durable (called on shutdown).
    fn flush(&self) -> Result<(), NodeError>;
}

const KEY_REGISTRATION: &[u8] = b"registration";

/// [`NodeStore`] on a sled database in `data_dir`.
///
/// Writes are not flushed one by one: nothing is acknowledged to a peer on the strength of them, and
/// sled flushes in the background every 500 ms. [`NodeStore::flush`] runs on shutdown.
pub struct SledStore {
    db: sled::Db,
}

impl SledStore {
    /// The database, for the other modules' trees (one database per node: one lock file, one flusher).
    pub fn db(&self) -> &sled::Db {
        &self.db
    }

    pub fn open(data_dir: &Path) -> Result<Self, NodeError> {
        std::fs::create_dir_all(data_dir)
            .map_err(|e| NodeError::Store(format!("{}: {e}", data_dir.display())))?;
        let db = open_db_waiting(&data_dir.join("node.sled"), std::time::Duration::from_secs(5))
            .map_err(|e| NodeError::Store(format!("{}: {e}", data_dir.display())))?;
        Ok(SledStore { db })
    }

    fn get<M: Message + Default>(&self, key: &[u8]) -> Result<Option<M>, NodeError> {
        match self.db.get(key)? {
            None => Ok(None),
            Some(bytes) => M::decode(bytes.as_ref())
                .map(Some)
                .map_err(|e| NodeError::Store(format!("record {:?} is corrupt: {e}", String::from_utf8_lossy(key)))),
        }
    }

    fn put<M: Message>(&self, key: &[u8], value: &M) -> Result<(), NodeError> {
        self.db.insert(key, value.encode_to_vec())?;
        Ok(())
    }
}

impl NodeStore for SledStore {
    fn last_registration(&self) -> Result<Option<RegisterNodeResponse>, NodeError> {
        self.get(KEY_REGISTRATION)
    }
    fn save_registration(&self, registration: &RegisterNodeResponse) -> Result<(), NodeError> {
        self.put(KEY_REGISTRATION, registration)
    }
    fn flush(&self) -> Result<(), NodeError> {
        self.db.flush()?;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use exchange_proto::v1::NodeInfo;

    #[test]
    fn records_survive_reopening() {
        let dir = tempfile::tempdir().unwrap();
        {
            let store = SledStore::open(dir.path()).unwrap();
            assert!(store.last_registration().unwrap().is_none());
            let reg = RegisterNodeResponse {
                node: Some(NodeInfo { address: "tax:7401".into(), ..Default::default() }),
                lease_ttl_seconds: 30,
                heartbeat_interval_seconds: 10,
            };
            store.save_registration(&reg).unwrap();
            store.flush().unwrap();
        }
        let store = SledStore::open(dir.path()).unwrap();
        assert_eq!(store.last_registration().unwrap().unwrap().node.unwrap().address, "tax:7401");
    }
}
