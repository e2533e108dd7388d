//! [`RecordStore`] on the node's sled database, in its own tree `records`.
//!
//! Key: resource code bytes ‖ `0x00` ‖ record key bytes. A resource code never contains NUL (refused
//! here, and the catalog's codes are `<digits>/<6 digits>`), so the prefix `code ‖ 0x00` selects exactly
//! one resource's records: `101001/000001` never picks up the records of `101001/0000010`.
//! Value: the prost-encoded [`Record`], the wire form, so the stored form evolves with the contract.

use std::time::{SystemTime, UNIX_EPOCH};

use exchange_proto::v1::Record;
use prost::Message;

use super::{RecordStore, RecordStoreError};

/// The records of the resources this node's department publishes, in the tree `records` of the node's
/// sled database.
pub struct SledRecordStore {
    tree: sled::Tree,
}

impl SledRecordStore {
    /// The tree name in the node's database.
    pub const TREE: &'static str = "records";

    /// Opens (or creates) the `records` tree of the node's database.
    pub fn open(db: &sled::Db) -> Result<Self, RecordStoreError> {
        Ok(SledRecordStore { tree: db.open_tree(Self::TREE)? })
    }
}

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

fn now_unix_ms() -> i64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map_or(0, |d| i64::try_from(d.as_millis()).unwrap_or(i64::MAX))
}

impl RecordStore for SledRecordStore {
    fn put_batch(&self, resource_code: &str, records: Vec<Record>) -> Result<u64, RecordStoreError> {
        let prefix = prefix(resource_code)?;
        if records.is_empty() {
            return Ok(0);
        }
        let now = now_unix_ms();
        let written = records.len() as u64;
        let mut batch = sled::Batch::default();
        for mut record in records {
            record.updated_at_unix_ms = now;
            batch.insert(storage_key(&prefix, &record.key), record.encode_to_vec());
        }
        // One atomic batch: after a crash either all of it is there or none of it.
        self.tree.apply_batch(batch)?;
        // Durable before the caller acknowledges it.
        self.tree.flush()?;
        Ok(written)
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

    /// Walks the whole tree (sled keeps no count): fine for status pages, not for a hot path.
    fn count(&self) -> Result<u64, RecordStoreError> {
        Ok(self.tree.len() as u64)
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
        let db = sled::open(dir.path()).unwrap();
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
            let db = sled::open(dir.path()).unwrap();
            let store = SledRecordStore::open(&db).unwrap();
            store.put_batch("101001/000001", vec![record(VALID_USCC, "甲公司")]).unwrap();
            // No explicit flush and no clean shutdown: put_batch already made it durable.
        }
        let db = sled::open(dir.path()).unwrap();
        let store = SledRecordStore::open(&db).unwrap();
        let got = store.get_many("101001/000001", &[VALID_USCC.to_string()]).unwrap();
        assert_eq!(got[0].as_ref().unwrap().items["企业名称"], "甲公司");
        assert_eq!(store.count().unwrap(), 1);
    }

    #[test]
    fn resources_are_kept_apart_and_counted_exactly() {
        let dir = tempfile::tempdir().unwrap();
        let db = sled::open(dir.path()).unwrap();
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
        let db = sled::open(dir.path()).unwrap();
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
}
