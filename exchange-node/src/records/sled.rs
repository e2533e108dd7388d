//! [`RecordStore`] on the node's sled database, in its own tree `records`: the records and, beside them,
//! each resource's change log, so a batch of records and its events are one atomic sled batch.
//!
//! - Record: resource code bytes ‖ `0x00` ‖ record key bytes → the prost-encoded [`Record`]. A resource
//!   code never contains NUL (refused here, and the catalog's codes are `<digits>/<6 digits>`), so the
//!   prefix `code ‖ 0x00` selects exactly one resource's records: `101001/000001` never picks up the
//!   records of `101001/0000010`.
//! - Change log entry: `0xFF ‖ 'e' ‖ code ‖ 0x00 ‖ first seq (8 bytes, big-endian)` → an [`EventDelivery`]
//!   holding up to 500 consecutive events of one applied batch. One sled value per 500 events rather than
//!   per event keeps the log's cost per record small; not one per whole batch, because sled keeps large
//!   values in memory beyond its cache's accounting (a 5,000-event entry is ~3 MB; a million-event
//!   backlog in such entries took the store to 470 MB, in 500-event entries to 250 MB).
//! - Head: `0xFF ‖ 'h' ‖ code` → the resource's latest seq (8 bytes, big-endian).
//! - Batch id: `0xFF ‖ 'b' ‖ code ‖ 0x00 ‖ id` → the seqs it became and when (idempotent publishing).
//!
//! `0xFF` never occurs in UTF-8, so no resource code starts with it: the log and heads sort after every
//! record and never mix with them.

use std::collections::{HashMap, HashSet};
use std::sync::Mutex;
use std::time::{SystemTime, UNIX_EPOCH};

use exchange_proto::v1::{EventDelivery, Record, RecordChangeKind, RecordEvent};
use prost::Message;

use super::{Applied, RecordStore, RecordStoreError};

/// The records of the resources this node's department publishes, in the tree `records` of the node's
/// sled database.
pub struct SledRecordStore {
    tree: sled::Tree,
    /// Seqs are assigned by read-head-then-write: one writer at a time. Held from the write until its
    /// flush, so whoever holds it sees no batch that is not yet durable.
    writer: Mutex<()>,
    /// Each resource's latest seq that is durable. sled makes a batch visible when it is applied, before
    /// the flush; an event read between the two could be sent and then lost in a crash, and its seq
    /// reused for another change. Readers of the log stop here.
    durable_heads: Mutex<HashMap<String, u64>>,
}

impl SledRecordStore {
    /// The tree name in the node's database.
    pub const TREE: &'static str = "records";

    /// Opens (or creates) the `records` tree of the node's database.
    pub fn open(db: &sled::Db) -> Result<Self, RecordStoreError> {
        Ok(SledRecordStore { tree: db.open_tree(Self::TREE)?, writer: Mutex::new(()), durable_heads: Mutex::default() })
    }
}

impl SledRecordStore {
    /// The head as stored (possibly not yet flushed): for assigning seqs under the writer's lock.
    fn stored_head(&self, resource_code: &str) -> Result<u64, RecordStoreError> {
        Ok(match self.tree.get(head_key(resource_code))? {
            Some(v) if v.len() == 8 => u64::from_be_bytes(v.as_ref().try_into().expect("8 bytes")),
            Some(_) => {
                return Err(RecordStoreError::Corrupt {
                    resource_code: resource_code.to_string(),
                    reason: "change log head".into(),
                })
            }
            None => 0,
        })
    }

    fn apply(
        &self,
        resource_code: &str,
        batch_id: Option<&str>,
        changes: Vec<(Record, RecordChangeKind)>,
    ) -> Result<Applied, RecordStoreError> {
        let prefix = prefix(resource_code)?;
        if changes.is_empty() {
            return Ok(Applied { first_seq: 0, last_seq: 0, duplicate: false });
        }
        let _writer = self.writer.lock().expect("record store writer");
        let id_key = batch_id.map(|id| batch_id_key(resource_code, id));
        if let Some(k) = &id_key {
            if let Some(v) = self.tree.get(k)? {
                if v.len() == 24 {
                    let first_seq = u64::from_be_bytes(v[0..8].try_into().expect("8 bytes"));
                    let last_seq = u64::from_be_bytes(v[8..16].try_into().expect("8 bytes"));
                    return Ok(Applied { first_seq, last_seq, duplicate: true });
                }
            }
        }
        let head = self.stored_head(resource_code)?;
        let now = now_unix_ms();
        let first = head + 1;
        let mut batch = sled::Batch::default();
        let mut events = Vec::with_capacity(changes.len());
        // Keys earlier in this batch: a repeated key's later change is an update of the earlier one.
        let mut seen: HashSet<Vec<u8>> = HashSet::new();
        for (i, (mut record, kind)) in changes.into_iter().enumerate() {
            let seq = first + i as u64;
            let key = storage_key(&prefix, &record.key);
            let kind = match kind {
                RecordChangeKind::Unspecified => {
                    if seen.contains(&key) || self.tree.contains_key(&key)? {
                        RecordChangeKind::Updated
                    } else {
                        RecordChangeKind::Created
                    }
                }
                k => k,
            };
            record.updated_at_unix_ms = now;
            record.version = seq;
            batch.insert(key.clone(), record.encode_to_vec());
            seen.insert(key);
            events.push(RecordEvent { seq, kind: kind as i32, record: Some(record), published_at_unix_ms: now });
        }
        let last = first + events.len() as u64 - 1;
        let log = log_prefix(resource_code);
        insert_log_entries(&mut batch, &log, events);
        batch.insert(head_key(resource_code), last.to_be_bytes().to_vec());
        if let Some(k) = id_key {
            let mut v = Vec::with_capacity(24);
            v.extend_from_slice(&first.to_be_bytes());
            v.extend_from_slice(&last.to_be_bytes());
            v.extend_from_slice(&now.to_be_bytes());
            batch.insert(k, v);
        }
        // One atomic batch: after a crash the records, their events and the head are all there or none.
        self.tree.apply_batch(batch)?;
        // Durable before the caller acknowledges it.
        self.tree.flush()?;
        self.durable_heads.lock().expect("durable heads").insert(resource_code.to_string(), last);
        Ok(Applied { first_seq: first, last_seq: last, duplicate: false })
    }

}

/// Most events in one change log entry.
const LOG_ENTRY_EVENTS: usize = 500;

fn prefix(resource_code: &str) -> Result<Vec<u8>, RecordStoreError> {
    if resource_code.is_empty() || resource_code.contains('\0') {
        return Err(RecordStoreError::InvalidResourceCode(resource_code.to_string()));
    }
    let mut p = Vec::with_capacity(resource_code.len() + 1 + 18);
    p.extend_from_slice(resource_code.as_bytes());
    p.push(0);
    Ok(p)
}

fn storage_key(prefix: &[u8], record_key: &str) -> Vec<u8> {
    let mut k = Vec::with_capacity(prefix.len() + record_key.len());
    k.extend_from_slice(prefix);
    k.extend_from_slice(record_key.as_bytes());
    k
}

/// `0xFF 'e' code 0x00`: the prefix of a resource's change log.
fn log_prefix(resource_code: &str) -> Vec<u8> {
    let mut k = Vec::with_capacity(resource_code.len() + 11);
    k.extend_from_slice(&[0xFF, b'e']);
    k.extend_from_slice(resource_code.as_bytes());
    k.push(0);
    k
}

fn log_key(log_prefix: &[u8], first_seq: u64) -> Vec<u8> {
    let mut k = log_prefix.to_vec();
    k.extend_from_slice(&first_seq.to_be_bytes());
    k
}

fn seq_of_log_key(key: &[u8]) -> u64 {
    let n = key.len();
    u64::from_be_bytes(key[n - 8..].try_into().expect("8 bytes"))
}

/// `0xFF 'b' code 0x00 batch id` → first seq, last seq, applied at (unix ms), 8 bytes each.
fn batch_id_prefix(resource_code: &str) -> Vec<u8> {
    let mut k = vec![0xFF, b'b'];
    k.extend_from_slice(resource_code.as_bytes());
    k.push(0);
    k
}

fn batch_id_key(resource_code: &str, batch_id: &str) -> Vec<u8> {
    let mut k = batch_id_prefix(resource_code);
    k.extend_from_slice(batch_id.as_bytes());
    k
}

fn head_key(resource_code: &str) -> Vec<u8> {
    let mut k = vec![0xFF, b'h'];
    k.extend_from_slice(resource_code.as_bytes());
    k
}

fn now_unix_ms() -> i64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map_or(0, |d| i64::try_from(d.as_millis()).unwrap_or(i64::MAX))
}

impl RecordStore for SledRecordStore {
    fn apply_changes(
        &self,
        resource_code: &str,
        changes: Vec<(Record, RecordChangeKind)>,
    ) -> Result<(u64, u64), RecordStoreError> {
        let applied = self.apply(resource_code, None, changes)?;
        Ok((applied.first_seq, applied.last_seq))
    }

    fn apply_changes_once(
        &self,
        resource_code: &str,
        batch_id: &str,
        changes: Vec<(Record, RecordChangeKind)>,
    ) -> Result<Applied, RecordStoreError> {
        self.apply(resource_code, Some(batch_id), changes)
    }

    fn prune_batch_ids(&self, resource_code: &str, before_unix_ms: i64) -> Result<u64, RecordStoreError> {
        prefix(resource_code)?;
        // Under the writer's lock like every write, so `pause_writes` holds this back too.
        let _writer = self.writer.lock().expect("record store writer");
        let mut batch = sled::Batch::default();
        let mut n = 0;
        for item in self.tree.scan_prefix(batch_id_prefix(resource_code)) {
            let (k, v) = item?;
            if v.len() == 24 && i64::from_be_bytes(v[16..24].try_into().expect("8 bytes")) < before_unix_ms {
                batch.remove(k);
                n += 1;
            }
        }
        if n > 0 {
            self.tree.apply_batch(batch)?;
        }
        Ok(n)
    }

    fn get_many(&self, resource_code: &str, keys: &[String]) -> Result<Vec<Option<Record>>, RecordStoreError> {
        let prefix = prefix(resource_code)?;
        keys.iter()
            .map(|key| match self.tree.get(storage_key(&prefix, key))? {
                None => Ok(None),
                Some(bytes) => Record::decode(bytes.as_ref()).map(Some).map_err(|e| RecordStoreError::Corrupt {
                    resource_code: resource_code.to_string(),
                    reason: e.to_string(),
                }),
            })
            .collect()
    }

    fn scan(&self, resource_code: &str, after_key: &str, limit: usize) -> Result<Vec<Record>, RecordStoreError> {
        let prefix = prefix(resource_code)?;
        let end = prefix_end(&prefix);
        let start = storage_key(&prefix, after_key);
        let range = if after_key.is_empty() {
            self.tree.range(start..end)
        } else {
            self.tree.range((std::ops::Bound::Excluded(start), std::ops::Bound::Excluded(end)))
        };
        let mut out = Vec::with_capacity(limit.min(4096));
        // Under the writer's lock: a snapshot must not show a record whose batch is not yet durable (its
        // version could be reused after a crash, and a replica would then skip the real change).
        let _writer = self.writer.lock().expect("record store writer");
        for item in range.take(limit) {
            let (_, v) = item?;
            out.push(Record::decode(v.as_ref()).map_err(|e| RecordStoreError::Corrupt {
                resource_code: resource_code.to_string(),
                reason: e.to_string(),
            })?);
        }
        Ok(out)
    }

    /// Walks the records (sled keeps no count): fine for status pages, not for a hot path.
    fn count(&self) -> Result<u64, RecordStoreError> {
        let mut n = 0u64;
        for key in self.tree.range(..[0xFFu8].as_slice()).keys() {
            key?;
            n += 1;
        }
        Ok(n)
    }

    fn count_resource(&self, resource_code: &str) -> Result<u64, RecordStoreError> {
        let prefix = prefix(resource_code)?;
        let mut n = 0u64;
        for key in self.tree.scan_prefix(prefix).keys() {
            key?;
            n += 1;
        }
        Ok(n)
    }

    fn head_seq(&self, resource_code: &str) -> Result<u64, RecordStoreError> {
        prefix(resource_code)?;
        if let Some(h) = self.durable_heads.lock().expect("durable heads").get(resource_code) {
            return Ok(*h);
        }
        // Not written in this run: what is stored is what survived the last one, so it is durable —
        // unless a write is applied and not yet flushed right now; the writer's lock rules that out.
        let _writer = self.writer.lock().expect("record store writer");
        let head = self.stored_head(resource_code)?;
        Ok(*self.durable_heads.lock().expect("durable heads").entry(resource_code.to_string()).or_insert(head))
    }

    fn events_after(
        &self,
        resource_code: &str,
        after_seq: u64,
        max_events: usize,
    ) -> Result<Vec<RecordEvent>, RecordStoreError> {
        prefix(resource_code)?;
        let head = self.head_seq(resource_code)?;
        read_log(&self.tree, &log_prefix(resource_code), head, after_seq, max_events).map_err(|e| e.into_store_error(resource_code))
    }

    fn trim_events(&self, resource_code: &str, upto_seq: u64) -> Result<u64, RecordStoreError> {
        prefix(resource_code)?;
        let head = self.head_seq(resource_code)?;
        // After `head_seq`, which may take the writer's lock itself. Under it, a backup copying the log
        // cannot see some of a trim's removals and not others (a gap in the copied log).
        let _writer = self.writer.lock().expect("record store writer");
        Ok(trim_log(&self.tree, &log_prefix(resource_code), head, upto_seq)?)
    }

    fn pause_writes(&self) -> super::WritesPaused<'_> {
        super::WritesPaused { _held: self.writer.lock().expect("record store writer") }
    }
}

/// Why [`read_log`] failed.
#[derive(Debug)]
pub enum LogError {
    Store(sled::Error),
    /// `after_seq + 1` is no longer in the log; it starts at `first_kept`.
    Trimmed { after_seq: u64, first_kept: u64 },
    Corrupt(String),
}

impl From<sled::Error> for LogError {
    fn from(e: sled::Error) -> Self {
        LogError::Store(e)
    }
}

impl LogError {
    pub fn into_store_error(self, resource_code: &str) -> RecordStoreError {
        match self {
            LogError::Store(e) => RecordStoreError::Store(e),
            LogError::Trimmed { after_seq, first_kept } => {
                RecordStoreError::Trimmed { resource_code: resource_code.to_string(), after_seq, first_kept }
            }
            LogError::Corrupt(reason) => RecordStoreError::Corrupt { resource_code: resource_code.to_string(), reason },
        }
    }
}

fn prefix_end(prefix: &[u8]) -> Vec<u8> {
    let mut end = prefix.to_vec();
    *end.last_mut().expect("log prefix ends with NUL") = 1;
    end
}

/// An event log in `tree` under `log_prefix`: keys `log_prefix ‖ first seq (8 bytes, big-endian)`, values
/// [`EventDelivery`]s of consecutive events, `head` the latest seq. Up to `max_events` consecutive
/// events from `after_seq + 1`. Shared by the provider's change log and the consumer's inbox.
pub fn read_log(
    tree: &sled::Tree,
    log_prefix: &[u8],
    head: u64,
    after_seq: u64,
    max_events: usize,
) -> Result<Vec<RecordEvent>, LogError> {
    if after_seq >= head || max_events == 0 {
        return Ok(Vec::new());
    }
    let want = after_seq + 1;
    // The entry holding `want` is the last one starting at or before it.
    let start = match tree.range(log_key(log_prefix, 0)..=log_key(log_prefix, want)).next_back() {
        Some(item) => item?.0.to_vec(),
        None => log_key(log_prefix, want),
    };
    let mut out = Vec::new();
    for item in tree.range(start..prefix_end(log_prefix)) {
        let (k, v) = item?;
        let first = seq_of_log_key(&k);
        if out.is_empty() && first > want {
            return Err(LogError::Trimmed { after_seq, first_kept: first });
        }
        let entry = EventDelivery::decode(v.as_ref()).map_err(|e| LogError::Corrupt(format!("event log entry: {e}")))?;
        for event in entry.events {
            if event.seq > head {
                // Beyond the durable head: not to be read yet.
                return Ok(out);
            }
            if event.seq >= want {
                if event.seq != want + out.len() as u64 {
                    return Err(LogError::Corrupt(format!("event log gap before seq {}", event.seq)));
                }
                out.push(event);
                if out.len() == max_events {
                    return Ok(out);
                }
            }
        }
    }
    if out.is_empty() {
        // The head says there is more, but the log has nothing from `want` on: it was trimmed.
        return Err(LogError::Trimmed { after_seq, first_kept: head + 1 });
    }
    Ok(out)
}

/// Drops the entries of the log whose events are all at or below `upto_seq`; returns how many.
pub fn trim_log(tree: &sled::Tree, log_prefix: &[u8], head: u64, upto_seq: u64) -> Result<u64, sled::Error> {
    let mut batch = sled::Batch::default();
    let mut dropped = 0;
    let mut previous: Option<sled::IVec> = None;
    // An entry's last seq is the next entry's first seq - 1 (the head for the newest).
    for key in tree.range(log_key(log_prefix, 0)..prefix_end(log_prefix)).keys() {
        let key = key?;
        let first = seq_of_log_key(&key);
        if let Some(prev) = previous.take() {
            if first - 1 <= upto_seq {
                batch.remove(prev);
                dropped += 1;
            } else {
                break;
            }
        }
        if first > upto_seq {
            break;
        }
        previous = Some(key);
    }
    if let Some(prev) = previous {
        // The newest entry ends at the head.
        if head <= upto_seq {
            batch.remove(prev);
            dropped += 1;
        }
    }
    if dropped > 0 {
        tree.apply_batch(batch)?;
    }
    Ok(dropped)
}

/// Adds consecutive `events` to `batch` as log entries of at most [`LOG_ENTRY_EVENTS`] under
/// `log_prefix`: sled keeps large values whole in memory, beyond its page cache's accounting (one
/// 5,000-event entry is ~3 MB), and a reader decodes a whole entry.
pub fn insert_log_entries(batch: &mut sled::Batch, log_prefix: &[u8], events: Vec<RecordEvent>) {
    let mut events = events.into_iter().peekable();
    while let Some(first) = events.peek().map(|e| e.seq) {
        let chunk: Vec<RecordEvent> = events.by_ref().take(LOG_ENTRY_EVENTS).collect();
        batch.insert(log_key(log_prefix, first), EventDelivery { events: chunk, ended_reason: String::new() }.encode_to_vec());
    }

}

#[cfg(test)]
mod tests {
    use std::collections::HashMap;

    use super::*;
    use crate::records::test_support::*;

    fn record(key: &str, name: &str) -> Record {
        Record {
            key: key.into(),
            items: HashMap::from([("企业名称".to_string(), name.to_string()), ("统一社会信用代码".to_string(), key.to_string())]),
            updated_at_unix_ms: 0,
            version: 0,
        }
    }

    #[test]
    fn put_and_get_round_trip_in_request_order() {
        let dir = tempfile::tempdir().unwrap();
        let db = crate::store::open_db_waiting(dir.path(), std::time::Duration::from_secs(10)).unwrap();
        let store = SledRecordStore::open(&db).unwrap();
        let second = uscc("91110105MA0000001");
        let before = now_unix_ms();
        let n = store
            .put_batch("101001/000001", vec![record(VALID_USCC, "甲公司"), record(&second, "乙公司")])
            .unwrap();
        assert_eq!(n, 2);
        let keys = [second.clone(), "91350100M000100Y44".to_string(), VALID_USCC.to_string()];
        let got = store.get_many("101001/000001", &keys).unwrap();
        assert_eq!(got.len(), 3);
        let b = got[0].as_ref().unwrap();
        assert_eq!((b.key.as_str(), b.items["企业名称"].as_str()), (second.as_str(), "乙公司"));
        assert!(got[1].is_none());
        let a = got[2].as_ref().unwrap();
        assert_eq!(a.items["企业名称"], "甲公司");
        assert!(a.updated_at_unix_ms >= before, "updated_at set by the store");
        assert_eq!(a.updated_at_unix_ms, b.updated_at_unix_ms, "one timestamp per batch");

        // A put replaces the record whole.
        let mut renamed = record(VALID_USCC, "甲公司（新）");
        renamed.items.remove("统一社会信用代码");
        store.put_batch("101001/000001", vec![renamed]).unwrap();
        let a = store.get_many("101001/000001", &[VALID_USCC.to_string()]).unwrap().remove(0).unwrap();
        assert_eq!(a.items.len(), 1);
        assert_eq!(a.items["企业名称"], "甲公司（新）");
        assert_eq!(store.count().unwrap(), 2);
    }

    #[test]
    fn records_survive_reopening_the_database() {
        let dir = tempfile::tempdir().unwrap();
        {
            let db = crate::store::open_db_waiting(dir.path(), std::time::Duration::from_secs(10)).unwrap();
            let store = SledRecordStore::open(&db).unwrap();
            store.put_batch("101001/000001", vec![record(VALID_USCC, "甲公司")]).unwrap();
            // No explicit flush and no clean shutdown: put_batch already made it durable.
        }
        let db = crate::store::open_db_waiting(dir.path(), std::time::Duration::from_secs(10)).unwrap();
        let store = SledRecordStore::open(&db).unwrap();
        let got = store.get_many("101001/000001", &[VALID_USCC.to_string()]).unwrap();
        assert_eq!(got[0].as_ref().unwrap().items["企业名称"], "甲公司");
        assert_eq!(store.count().unwrap(), 1);
    }

    #[test]
    fn resources_are_kept_apart_and_counted_exactly() {
        let dir = tempfile::tempdir().unwrap();
        let db = crate::store::open_db_waiting(dir.path(), std::time::Duration::from_secs(10)).unwrap();
        let store = SledRecordStore::open(&db).unwrap();
        // Two codes where one is a byte prefix of the other; and a record key that starts like a code.
        store.put_batch("101001/000001", vec![record("A", "a"), record("B", "b")]).unwrap();
        store.put_batch("101001/0000010", vec![record("A", "other")]).unwrap();
        assert_eq!(store.count_resource("101001/000001").unwrap(), 2);
        assert_eq!(store.count_resource("101001/0000010").unwrap(), 1);
        assert_eq!(store.count_resource("101001/000002").unwrap(), 0);
        assert_eq!(store.count().unwrap(), 3);
        let got = store.get_many("101001/0000010", &["A".to_string(), "B".to_string()]).unwrap();
        assert_eq!(got[0].as_ref().unwrap().items["企业名称"], "other");
        assert!(got[1].is_none());
        // The node's other trees are not counted.
        db.insert(b"registration", b"x".to_vec()).unwrap();
        assert_eq!(store.count().unwrap(), 3);
    }

    #[test]
    fn unusable_resource_codes_are_refused() {
        let dir = tempfile::tempdir().unwrap();
        let db = crate::store::open_db_waiting(dir.path(), std::time::Duration::from_secs(10)).unwrap();
        let store = SledRecordStore::open(&db).unwrap();
        for code in ["", "101001\0/000001"] {
            assert!(matches!(
                store.put_batch(code, vec![record("A", "a")]),
                Err(RecordStoreError::InvalidResourceCode(_))
            ));
            assert!(matches!(store.count_resource(code), Err(RecordStoreError::InvalidResourceCode(_))));
        }
        assert_eq!(store.put_batch("101001/000001", vec![]).unwrap(), 0);
        assert_eq!(store.count().unwrap(), 0);
    }

    #[test]
    fn every_write_is_a_change_event_with_its_seq_as_the_records_version() {
        let dir = tempfile::tempdir().unwrap();
        let db = crate::store::open_db_waiting(dir.path(), std::time::Duration::from_secs(10)).unwrap();
        let store = SledRecordStore::open(&db).unwrap();
        let code = "101001/000001";
        assert_eq!(store.head_seq(code).unwrap(), 0);
        assert_eq!(store.put_batch(code, vec![record("A", "a"), record("B", "b"), record("A", "a2")]).unwrap(), 3);
        let (first, last) = store
            .apply_changes(code, vec![(record("B", "b-gone"), RecordChangeKind::Deregistered), (record("C", "c"), RecordChangeKind::Unspecified)])
            .unwrap();
        assert_eq!((first, last), (4, 5));
        assert_eq!(store.head_seq(code).unwrap(), 5);
        let events = store.events_after(code, 0, 100).unwrap();
        let kinds: Vec<(u64, RecordChangeKind)> = events.iter().map(|e| (e.seq, e.kind())).collect();
        assert_eq!(
            kinds,
            vec![
                (1, RecordChangeKind::Created),
                (2, RecordChangeKind::Created),
                (3, RecordChangeKind::Updated),
                (4, RecordChangeKind::Deregistered),
                (5, RecordChangeKind::Created),
            ]
        );
        // Across log entries, from the middle of one, limited.
        let some = store.events_after(code, 2, 2).unwrap();
        assert_eq!(some.iter().map(|e| e.seq).collect::<Vec<_>>(), vec![3, 4]);
        assert!(store.events_after(code, 5, 10).unwrap().is_empty());
        // The stored record carries the version of its last change.
        let got = store.get_many(code, &["A".to_string(), "B".to_string()]).unwrap();
        assert_eq!(got[0].as_ref().unwrap().version, 3);
        assert_eq!(got[1].as_ref().unwrap().version, 4);
        // The log is not counted as records, and scanning sees records only, in key order.
        assert_eq!(store.count().unwrap(), 3);
        let scanned = store.scan(code, "", 10).unwrap();
        assert_eq!(scanned.iter().map(|r| r.key.as_str()).collect::<Vec<_>>(), vec!["A", "B", "C"]);
        let after_a = store.scan(code, "A", 1).unwrap();
        assert_eq!(after_a.iter().map(|r| r.key.as_str()).collect::<Vec<_>>(), vec!["B"]);
        assert!(store.scan(code, "C", 10).unwrap().is_empty());
        assert!(store.scan("101001/0000010", "", 10).unwrap().is_empty());
    }

    #[test]
    fn trimming_drops_whole_entries_up_to_the_seq_and_later_reads_say_so() {
        let dir = tempfile::tempdir().unwrap();
        let db = crate::store::open_db_waiting(dir.path(), std::time::Duration::from_secs(10)).unwrap();
        let store = SledRecordStore::open(&db).unwrap();
        let code = "101001/000001";
        store.put_batch(code, vec![record("A", "1"), record("B", "2")]).unwrap(); // 1-2
        store.put_batch(code, vec![record("C", "3"), record("D", "4")]).unwrap(); // 3-4
        store.put_batch(code, vec![record("E", "5")]).unwrap(); // 5
        // Up to 3: only the first entry (1-2) is wholly acknowledged.
        assert_eq!(store.trim_events(code, 3).unwrap(), 1);
        assert_eq!(store.events_after(code, 2, 10).unwrap().len(), 3);
        assert!(matches!(store.events_after(code, 0, 10), Err(RecordStoreError::Trimmed { first_kept: 3, .. })));
        assert_eq!(store.trim_events(code, 5).unwrap(), 2);
        assert!(store.events_after(code, 5, 10).unwrap().is_empty());
        assert!(matches!(store.events_after(code, 4, 10), Err(RecordStoreError::Trimmed { .. })));
        // Records stay; new events go on from the head.
        assert_eq!(store.count().unwrap(), 5);
        assert_eq!(store.put_batch(code, vec![record("F", "6")]).unwrap(), 1);
        assert_eq!(store.events_after(code, 5, 10).unwrap()[0].seq, 6);
    }

    #[test]
    fn the_log_and_head_survive_reopening() {
        let dir = tempfile::tempdir().unwrap();
        let code = "101001/000001";
        {
            let db = crate::store::open_db_waiting(dir.path(), std::time::Duration::from_secs(10)).unwrap();
            let store = SledRecordStore::open(&db).unwrap();
            store.put_batch(code, vec![record("A", "1"), record("B", "2")]).unwrap();
        }
        let db = crate::store::open_db_waiting(dir.path(), std::time::Duration::from_secs(10)).unwrap();
        let store = SledRecordStore::open(&db).unwrap();
        assert_eq!(store.head_seq(code).unwrap(), 2);
        assert_eq!(store.events_after(code, 0, 10).unwrap().len(), 2);
        assert_eq!(store.apply_changes(code, vec![(record("A", "3"), RecordChangeKind::Unspecified)]).unwrap(), (3, 3));
    }

    #[test]
    fn a_batch_id_is_applied_once_and_forgotten_after_pruning() {
        let dir = tempfile::tempdir().unwrap();
        let db = crate::store::open_db_waiting(dir.path(), std::time::Duration::from_secs(10)).unwrap();
        let store = SledRecordStore::open(&db).unwrap();
        let code = "101001/000001";
        let changes = || vec![(record("A", "1"), RecordChangeKind::Unspecified), (record("B", "2"), RecordChangeKind::Unspecified)];
        let first = store.apply_changes_once(code, "job-7", changes()).unwrap();
        assert_eq!(first, Applied { first_seq: 1, last_seq: 2, duplicate: false });
        let again = store.apply_changes_once(code, "job-7", changes()).unwrap();
        assert_eq!(again, Applied { first_seq: 1, last_seq: 2, duplicate: true });
        assert_eq!(store.head_seq(code).unwrap(), 2, "nothing applied the second time");
        // Ids are per resource; another id applies.
        assert!(!store.apply_changes_once("101001/000002", "job-7", changes()).unwrap().duplicate);
        assert_eq!(store.apply_changes_once(code, "job-8", changes()).unwrap().first_seq, 3);
        // Batch ids are neither records nor events.
        assert_eq!(store.count_resource(code).unwrap(), 2);
        assert_eq!(store.prune_batch_ids(code, 0).unwrap(), 0, "younger than the cut-off");
        assert_eq!(store.prune_batch_ids(code, i64::MAX).unwrap(), 2);
        assert!(!store.apply_changes_once(code, "job-7", changes()).unwrap().duplicate);
    }
}
