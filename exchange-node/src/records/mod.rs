//! The node's record store (前置库), record validation, and field-level disclosure.
//!
//! A department's application loads the records of the resources its department publishes into its own
//! node (`PutRecords`); other departments' nodes fetch them by key (`FetchRecords`), and this node returns
//! only the data items (信息项) the consumer may see. The rules are written up in `docs/RECORDS.md`.
//!
//! # Layout
//! - [`validate`]: [`validate_batch`] checks a whole batch against the resource's catalog entry and
//!   returns the normalized records, or every problem as a [`FieldViolation`].
//! - [`RecordStore`] and its sled implementation [`SledRecordStore`] ([`sled`](mod@self::sled)).
//! - [`disclosure`](mod@disclosure): [`disclosure()`] decides which data items leave the node (and which
//!   of them masked) for one consumer; [`apply`] cuts a record down to that.
//!
//! # Design
//! - **Values are text.** A record is `key` + `items` (data item name → value as text), the value in the
//!   format of the item's catalog data type (`DATA_TYPE_DATE` → `2024-05-01`, ...). The wire contract and
//!   the stored form therefore do not change when a department adds or retypes a data item: the catalog
//!   entry is the schema, and [`validate_batch`] enforces it at the one door records come in by. Text also
//!   keeps values exact (a 注册资本 of `100.50` stays `100.50`, with no float rounding) and readable in
//!   audit and support work.
//! - **A batch is all-or-nothing.** A department loads records from its own systems, usually by a job
//!   that re-sends the same batch until it is accepted. If part of a batch were stored, the job could not
//!   tell which rows to correct and resend, and consumers would see a half-updated resource. So every
//!   record of a batch is validated first and every problem of every record is reported (one violation
//!   per field, named by its path `records[3].items[成立日期]`); only a batch without a single problem is
//!   written, in one atomic sled batch.
//! - **Durable before acknowledged.** [`RecordStore::put_batch`] flushes before it returns, so a batch the
//!   node acknowledged survives a crash (sled itself only flushes every 500 ms). The store calls are
//!   synchronous (sled is): call them from `tokio::task::spawn_blocking` on a serving path.
//! - **Canonical values, no silent rewriting.** Identifiers must arrive in their canonical form (an
//!   upper-case `X` check character, upper-case credit codes); normalization only adds the key item to a
//!   record that lacks it and clears `updated_at_unix_ms`, which the store sets.
//! - **Masking happens here**, at the provider's node, before a record leaves it: a consumer without a
//!   grant for the full 公民身份号码 sees `110105********002X`.
//! - sled is beta, so storage sits behind the small [`RecordStore`] trait.

pub mod disclosure;
pub mod sled;
pub mod validate;

use exchange_proto::v1::{CatalogEntry, Record, RecordChangeKind, RecordEvent, RecordKind};

pub use self::disclosure::{apply, disclosure, Disclosure};
pub use self::sled::SledRecordStore;
pub use self::validate::{check_value, validate_batch, FieldViolation, REGISTRATION_STATUSES};

/// The data item that keys an enterprise record (unified social credit code).
pub const ENTERPRISE_KEY_ITEM: &str = "统一社会信用代码";
/// The data item that keys a population record (citizen identity number).
pub const POPULATION_KEY_ITEM: &str = "公民身份号码";

/// The data item that keys the entry's records: the entry's `key_item` when set (the directory allows an
/// enterprise or population entry to name its own), otherwise 统一社会信用代码 for enterprise and
/// 公民身份号码 for population records. `None` for an entry without a usable record kind or key item
/// (the directory never publishes one).
pub fn key_item(entry: &CatalogEntry) -> Option<&str> {
    let explicit = (!entry.key_item.is_empty()).then_some(entry.key_item.as_str());
    match RecordKind::try_from(entry.record_kind) {
        Ok(RecordKind::Enterprise) => Some(explicit.unwrap_or(ENTERPRISE_KEY_ITEM)),
        Ok(RecordKind::Population) => Some(explicit.unwrap_or(POPULATION_KEY_ITEM)),
        Ok(RecordKind::Other) => explicit,
        Ok(RecordKind::Unspecified) | Err(_) => None,
    }
}

/// Why the record store failed. Messages never carry a record key (it may be an identity number).
#[derive(Debug, thiserror::Error)]
pub enum RecordStoreError {
    #[error("record store: {0}")]
    Store(#[from] ::sled::Error),
    #[error("resource code {0:?} cannot key records: it must be non-empty and contain no NUL character")]
    InvalidResourceCode(String),
    #[error("a stored record of {resource_code} is unreadable: {reason}")]
    Corrupt { resource_code: String, reason: String },
    #[error("events of {resource_code} after seq {after_seq} are no longer kept: the log starts at seq {first_kept}")]
    Trimmed { resource_code: String, after_seq: u64, first_kept: u64 },
}

/// What [`RecordStore::apply_changes_once`] did.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Applied {
    pub first_seq: u64,
    pub last_seq: u64,
    /// The batch id was applied before; nothing was written now.
    pub duplicate: bool,
}

/// Where the node keeps the records of the resources its department publishes, and the change log
/// (outbox) of each resource: every write is a change event with a per-resource seq.
pub trait RecordStore: Send + Sync + 'static {
    /// Applies validated changes (see [`validate_batch`]) atomically: each record replaces any stored
    /// record with its key as a whole, stamped with `updated_at_unix_ms` = now and `version` = its event's
    /// seq, and the batch's events are appended to the resource's change log in the same write. A kind
    /// left unspecified becomes CREATED for a new key and UPDATED otherwise. Durable before it returns.
    /// Returns the seqs of the first and last event (`(0, 0)` for an empty batch).
    fn apply_changes(
        &self,
        resource_code: &str,
        changes: Vec<(Record, RecordChangeKind)>,
    ) -> Result<(u64, u64), RecordStoreError>;
    /// [`RecordStore::apply_changes`] at most once per `batch_id` (per resource): a batch whose id was
    /// applied before is not applied again, and the first application's seqs are returned with
    /// `duplicate`. The id is stored in the same atomic write as the batch.
    fn apply_changes_once(
        &self,
        resource_code: &str,
        batch_id: &str,
        changes: Vec<(Record, RecordChangeKind)>,
    ) -> Result<Applied, RecordStoreError>;
    /// Forgets batch ids applied before `before_unix_ms`; returns how many.
    fn prune_batch_ids(&self, resource_code: &str, before_unix_ms: i64) -> Result<u64, RecordStoreError>;
    /// [`RecordStore::apply_changes`] with every kind unspecified; returns the number of records written.
    fn put_batch(&self, resource_code: &str, records: Vec<Record>) -> Result<u64, RecordStoreError> {
        let n = records.len() as u64;
        self.apply_changes(resource_code, records.into_iter().map(|r| (r, RecordChangeKind::Unspecified)).collect())?;
        Ok(n)
    }
    /// The stored records for `keys`, in the same order; `None` where there is none.
    fn get_many(&self, resource_code: &str, keys: &[String]) -> Result<Vec<Option<Record>>, RecordStoreError>;
    /// Up to `limit` records of a resource in key order, starting after `after_key` ("" = the first).
    fn scan(&self, resource_code: &str, after_key: &str, limit: usize) -> Result<Vec<Record>, RecordStoreError>;
    /// Records stored, all resources together.
    fn count(&self) -> Result<u64, RecordStoreError>;
    /// Records stored for one resource.
    fn count_resource(&self, resource_code: &str) -> Result<u64, RecordStoreError>;
    /// The seq of the resource's latest change event (0: none yet).
    fn head_seq(&self, resource_code: &str) -> Result<u64, RecordStoreError>;
    /// Up to `max_events` consecutive events from `after_seq + 1` (fewer at the head). Fails with
    /// [`RecordStoreError::Trimmed`] when `after_seq + 1` was already dropped from the log.
    fn events_after(&self, resource_code: &str, after_seq: u64, max_events: usize)
        -> Result<Vec<RecordEvent>, RecordStoreError>;
    /// Drops the log's events up to `upto_seq` (whole log entries only: some may stay). Returns how many
    /// log entries were dropped.
    fn trim_events(&self, resource_code: &str, upto_seq: u64) -> Result<u64, RecordStoreError>;
    /// Holds every write (records, change log, trimming) back until the guard is dropped, so a backup
    /// copies records, change log and heads as of one moment. Reads go on.
    fn pause_writes(&self) -> WritesPaused<'_>;
}

/// While alive, the record store applies no write ([`RecordStore::pause_writes`]).
#[must_use = "writes resume as soon as this is dropped"]
pub struct WritesPaused<'a> {
    pub(crate) _held: std::sync::MutexGuard<'a, ()>,
}

#[cfg(test)]
pub(crate) mod test_support {
    //! Catalog entries and identifiers shared by the tests of this module.

    use exchange_proto::v1::{CatalogEntry, DataItem, DataType, RecordKind, ShareType};

    pub const VALID_USCC: &str = "91350100M000100Y43";
    pub const BAD_CHECK_USCC: &str = "91310115MA1H8R7C6D";
    pub const ID_1949: &str = "11010519491231002X";
    pub const ID_1880: &str = "440524188001010014";
    pub const ID_BAD_CHECK: &str = "110101199003077777";
    pub const ID_30_FEB: &str = "110105194902300020";
    pub const ID_FUTURE: &str = "110105209912310029";

    /// A record with these items.
    pub fn record(key: &str, items: &[(&str, &str)]) -> exchange_proto::v1::Record {
        exchange_proto::v1::Record {
            key: key.into(),
            items: items.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect(),
            updated_at_unix_ms: 0,
            version: 0,
        }
    }

    pub fn today() -> time::Date {
        time::Date::from_calendar_date(2026, time::Month::November, 22).unwrap()
    }

    /// A valid credit code: `prefix` (17 characters) plus the check character that makes it valid.
    pub fn uscc(prefix: &str) -> String {
        "0123456789ABCDEFGHJKLMNPQRTUWXY"
            .chars()
            .map(|c| format!("{prefix}{c}"))
            .find(|c| client_sdk::ids::validate_uscc(c).is_ok())
            .expect("some check character fits")
    }

    fn entry(code: &str, kind: RecordKind, share: ShareType, items: &[(&str, DataType)]) -> CatalogEntry {
        CatalogEntry {
            resource_code: code.into(),
            name: "test resource".into(),
            classification: code.split('/').next().unwrap().into(),
            data_items: items
                .iter()
                .map(|(name, t)| DataItem { name: (*name).into(), data_type: *t as i32, description: String::new() })
                .collect(),
            share_type: share as i32,
            record_kind: kind as i32,
            ..Default::default()
        }
    }

    pub fn enterprise(share: ShareType) -> CatalogEntry {
        use DataType::*;
        entry(
            "101001/000001",
            RecordKind::Enterprise,
            share,
            &[
                ("统一社会信用代码", String),
                ("企业名称", String),
                ("法定代表人", String),
                ("企业类型", String),
                ("注册资本", Decimal),
                ("成立日期", Date),
                ("住所", String),
                ("经营范围", String),
                ("登记状态", String),
                ("登记机关", String),
                ("所属行业", String),
                ("更新时间", Datetime),
            ],
        )
    }

    pub fn population(share: ShareType) -> CatalogEntry {
        use DataType::*;
        entry(
            "102001/000001",
            RecordKind::Population,
            share,
            &[
                ("公民身份号码", String),
                ("姓名", String),
                ("性别", String),
                ("出生日期", Date),
                ("民族", String),
                ("住址", String),
                ("户籍地", String),
                ("人员状态", String),
            ],
        )
    }

    /// An `other` entry keyed by an integer 编号, with one item of every data type.
    pub fn other() -> CatalogEntry {
        use DataType::*;
        let mut e = entry(
            "301001/000001",
            RecordKind::Other,
            ShareType::Unconditional,
            &[
                ("编号", Integer),
                ("文本", String),
                ("数量", Integer),
                ("金额", Decimal),
                ("日期", Date),
                ("时间", Datetime),
                ("有效", Boolean),
                ("附件", Binary),
            ],
        );
        e.key_item = "编号".into();
        e
    }
}

#[cfg(test)]
mod tests {

    use exchange_proto::v1::ShareType;

    use super::test_support::*;
    use super::*;


    #[test]
    fn key_item_follows_the_record_kind() {
        assert_eq!(key_item(&enterprise(ShareType::Unconditional)), Some(ENTERPRISE_KEY_ITEM));
        assert_eq!(key_item(&population(ShareType::Unconditional)), Some(POPULATION_KEY_ITEM));
        assert_eq!(key_item(&other()), Some("编号"));
        let mut e = other();
        e.key_item.clear();
        assert_eq!(key_item(&e), None);
        e.record_kind = 0;
        assert_eq!(key_item(&e), None);
    }

    /// The node's PutRecords flow: validate the whole batch, store only if it is clean.
    fn put_records(
        store: &dyn RecordStore,
        entry: &CatalogEntry,
        records: Vec<Record>,
    ) -> Result<u64, Vec<FieldViolation>> {
        let records = validate_batch(entry, records, today())?;
        Ok(store.put_batch(&entry.resource_code, records).expect("store"))
    }

    #[test]
    fn a_batch_with_bad_records_is_refused_whole_and_nothing_is_stored() {
        let dir = tempfile::tempdir().unwrap();
        let db = ::sled::open(dir.path()).unwrap();
        let store = SledRecordStore::open(&db).unwrap();
        let entry = population(ShareType::Conditional);
        let batch = vec![
            record(ID_1949, &[("姓名", "张三"), ("性别", "女")]),
            record(ID_BAD_CHECK, &[("姓名", "李四")]),
            record(ID_1880, &[("出生日期", "1880-01-02")]),
            record(ID_30_FEB, &[]),
        ];
        let violations = put_records(&store, &entry, batch).unwrap_err();
        let fields: Vec<&str> = violations.iter().map(|v| v.field.as_str()).collect();
        assert_eq!(fields, ["records[1].key", "records[2].items[出生日期]", "records[3].key"]);
        assert_eq!(store.count().unwrap(), 0);
        assert_eq!(store.count_resource(&entry.resource_code).unwrap(), 0);

        // Corrected, the same batch goes in whole.
        let batch = vec![
            record(ID_1949, &[("姓名", "张三"), ("性别", "女")]),
            record(ID_1880, &[("出生日期", "1880-01-01")]),
        ];
        assert_eq!(put_records(&store, &entry, batch), Ok(2));
        let got = store.get_many(&entry.resource_code, &[ID_1880.to_string()]).unwrap();
        assert_eq!(got[0].as_ref().unwrap().items[POPULATION_KEY_ITEM], ID_1880);
    }
}
