//! Records as an application sees them: typed enterprise and population records, and [`ExchangeClient`],
//! an application's connection to its own department's node (and, for grants, to the directory).
//!
//! # Records on the wire
//! A [`Record`] is a key and a map of data item (信息项) names to values as text:
//!
//! | data type | text | Rust |
//! |---|---|---|
//! | string | as is | `String` |
//! | decimal | `-?digits[.digits]` (no exponent, no thousands separator) | [`Decimal`] |
//! | date | `YYYY-MM-DD` | [`time::Date`] |
//! | datetime | RFC 3339 (`2025-03-03T08:00:00+08:00`) | [`time::OffsetDateTime`] |
//!
//! Field-level sharing means a consumer sees only the items it is granted, so every field of
//! [`EnterpriseRecord`] and [`PopulationRecord`] except the key is an `Option`. An empty value is read as
//! absent. Items the types do not name (a department may add data items) are kept in `other_items`, so a
//! round trip through a typed record loses nothing. The key is also written as its own item
//! (统一社会信用代码 / 公民身份号码), as the catalog lists it among the data items.
//!
//! An identity number that the consumer is not granted in full arrives masked (`110105********002X`):
//! see [`PopulationRecord::identity_number_masked`].
//!
//! # Client
//! ```no_run
//! # async fn demo() -> Result<(), Box<dyn std::error::Error>> {
//! use client_sdk::records::ExchangeClient;
//! use client_sdk::tls::{TlsIdentity, TlsPaths};
//!
//! let id = TlsIdentity::load(&TlsPaths::in_dir("pki".as_ref(), "tax-app"))?;
//! let client = ExchangeClient::connect("127.0.0.1:7401", None, &id)?;
//! let company = client.query_enterprise("101001/000001", "91350100M000100Y43", "纳税人登记核验").await?;
//! println!("{company}");
//! # Ok(()) }
//! ```
//!
//! Keys are checked before anything is sent (credit codes with [`ids::validate_uscc`], identity numbers with
//! [`ids::validate_identity_number`]); a bad one comes back as [`ClientError::InvalidArgument`] with a
//! field violation, exactly as the node would name it (`keys[0]`, `records[3].key`).

use std::collections::{BTreeMap, HashMap};
use std::fmt;
use std::future::Future;
use std::str::FromStr;
use std::time::Duration;

use exchange_proto::limits::{MAX_BATCH_RECORDS, MAX_MESSAGE_BYTES, MAX_QUERY_KEYS};
use exchange_proto::v1::directory_client::DirectoryClient;
use exchange_proto::v1::exchange_node_client::ExchangeNodeClient;
use exchange_proto::v1::{
    DecideGrantRequest, PutRecordsRequest, QueryAuditResponse, QueryRecordsRequest, QueryRecordsResponse,
    RequestGrantRequest, RevokeGrantRequest, VerifyAuditRequest, VerifyAuditResponse,
};
pub use exchange_proto::v1::{Grant, GrantStatus, ListGrantsRequest, QueryAuditRequest, Record};
use prost::Message as _;
use time::format_description::well_known::Rfc3339;
use time::macros::format_description;
use time::{Date, OffsetDateTime};
use tonic::transport::Channel;
use tonic::{Code, Status};
use unicode_width::UnicodeWidthStr;

use crate::catalog::EnumWords;
use crate::client::{self, DirectoryChannel};
use crate::error::{ClientError, FieldViolation};
use crate::ids::{self, IdError};
use crate::tls::TlsIdentity;

// ---- item names ----

/// Data item names (信息项) of enterprise registration records (企业登记信息).
pub mod enterprise_items {
    /// 统一社会信用代码: the key (GB 32100-2015).
    pub const CREDIT_CODE: &str = "统一社会信用代码";
    pub const NAME: &str = "企业名称";
    pub const LEGAL_REPRESENTATIVE: &str = "法定代表人";
    pub const ENTERPRISE_TYPE: &str = "企业类型";
    /// In 万元 (ten thousand yuan), decimal text.
    pub const REGISTERED_CAPITAL: &str = "注册资本";
    /// `YYYY-MM-DD`.
    pub const ESTABLISHED_ON: &str = "成立日期";
    pub const ADDRESS: &str = "住所";
    pub const BUSINESS_SCOPE: &str = "经营范围";
    /// One of the [`super::EnterpriseStatus`] words.
    pub const STATUS: &str = "登记状态";
    pub const REGISTRATION_AUTHORITY: &str = "登记机关";
    pub const INDUSTRY: &str = "所属行业";
    /// RFC 3339.
    pub const UPDATED_AT: &str = "更新时间";
    /// Every item, in catalog order.
    pub const ALL: [&str; 12] = [
        CREDIT_CODE,
        NAME,
        LEGAL_REPRESENTATIVE,
        ENTERPRISE_TYPE,
        REGISTERED_CAPITAL,
        ESTABLISHED_ON,
        ADDRESS,
        BUSINESS_SCOPE,
        STATUS,
        REGISTRATION_AUTHORITY,
        INDUSTRY,
        UPDATED_AT,
    ];
}

/// Data item names (信息项) of population records (人口基础信息).
pub mod population_items {
    /// 公民身份号码: the key (GB 11643-1999); masked when not granted in full.
    pub const IDENTITY_NUMBER: &str = "公民身份号码";
    pub const NAME: &str = "姓名";
    /// 男 or 女.
    pub const SEX: &str = "性别";
    /// `YYYY-MM-DD`.
    pub const BIRTH_DATE: &str = "出生日期";
    pub const ETHNICITY: &str = "民族";
    pub const ADDRESS: &str = "住址";
    pub const HOUSEHOLD_REGISTRATION: &str = "户籍地";
    /// Free text (正常, 死亡, 迁出...).
    pub const STATUS: &str = "人员状态";
    /// Every item, in catalog order.
    pub const ALL: [&str; 8] =
        [IDENTITY_NUMBER, NAME, SEX, BIRTH_DATE, ETHNICITY, ADDRESS, HOUSEHOLD_REGISTRATION, STATUS];
}

// ---- value types ----

/// Why a record could not be read into a typed record.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum RecordError {
    /// Neither the record's key nor its key item holds a value.
    #[error("record without a key (neither `key` nor item {item} is set)")]
    MissingKey { item: &'static str },
    /// An item's value is not in its data type's format.
    #[error("record {key}: items[{item}] = {value:?}: {reason}")]
    BadItem { key: String, item: String, value: String, reason: String },
}

impl RecordError {
    /// The violation path as servers name it, for the record at `index` of a batch
    /// (`records[3].items[成立日期]`).
    pub fn field(&self, index: usize) -> String {
        match self {
            RecordError::MissingKey { .. } => format!("records[{index}].key"),
            RecordError::BadItem { item, .. } => format!("records[{index}].items[{item}]"),
        }
    }
}

/// A word that is not one of an enumeration's values (登记状态, 性别).
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[error("{value:?} is not one of {expected}")]
pub struct UnknownValue {
    pub value: String,
    pub expected: &'static str,
}

/// A decimal number kept as the text it was given (`500`, `1234.5`, `-0.25`), checked on construction.
/// 注册资本 is in 万元. No exponent, no `+`, no thousands separators, digits on both sides of the point.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct Decimal(String);

#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[error("{0:?} is not a decimal number (digits with an optional leading minus and decimal point, e.g. 500 or 1234.56)")]
pub struct DecimalError(pub String);

impl Decimal {
    pub fn new(text: impl Into<String>) -> Result<Self, DecimalError> {
        let text = text.into();
        let digits = text.strip_prefix('-').unwrap_or(&text);
        let (int, frac) = match digits.split_once('.') {
            Some((i, f)) => (i, Some(f)),
            None => (digits, None),
        };
        let all_digits = |s: &str| !s.is_empty() && s.bytes().all(|b| b.is_ascii_digit());
        if all_digits(int) && frac.is_none_or(all_digits) {
            Ok(Decimal(text))
        } else {
            Err(DecimalError(text))
        }
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }

    pub fn into_string(self) -> String {
        self.0
    }
}

impl FromStr for Decimal {
    type Err = DecimalError;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Decimal::new(s)
    }
}

impl fmt::Display for Decimal {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

/// 登记状态, the registration status of an enterprise.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum EnterpriseStatus {
    /// 存续
    Existing,
    /// 在业
    Operating,
    /// 迁入
    MovedIn,
    /// 迁出
    MovedOut,
    /// 停业
    Suspended,
    /// 清算
    Liquidating,
    /// 注销 (deregistered)
    Deregistered,
    /// 吊销 (business licence revoked)
    LicenceRevoked,
    /// 撤销 (registration cancelled)
    Cancelled,
}

const ENTERPRISE_STATUS_WORDS: &str = "存续|在业|迁入|迁出|停业|清算|注销|吊销|撤销";

impl EnterpriseStatus {
    pub const ALL: [EnterpriseStatus; 9] = [
        EnterpriseStatus::Existing,
        EnterpriseStatus::Operating,
        EnterpriseStatus::MovedIn,
        EnterpriseStatus::MovedOut,
        EnterpriseStatus::Suspended,
        EnterpriseStatus::Liquidating,
        EnterpriseStatus::Deregistered,
        EnterpriseStatus::LicenceRevoked,
        EnterpriseStatus::Cancelled,
    ];

    /// The word as registers write it (存续, 注销...).
    pub fn as_str(self) -> &'static str {
        match self {
            EnterpriseStatus::Existing => "存续",
            EnterpriseStatus::Operating => "在业",
            EnterpriseStatus::MovedIn => "迁入",
            EnterpriseStatus::MovedOut => "迁出",
            EnterpriseStatus::Suspended => "停业",
            EnterpriseStatus::Liquidating => "清算",
            EnterpriseStatus::Deregistered => "注销",
            EnterpriseStatus::LicenceRevoked => "吊销",
            EnterpriseStatus::Cancelled => "撤销",
        }
    }
}

impl FromStr for EnterpriseStatus {
    type Err = UnknownValue;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        EnterpriseStatus::ALL
            .into_iter()
            .find(|v| v.as_str() == s)
            .ok_or_else(|| UnknownValue { value: s.to_string(), expected: ENTERPRISE_STATUS_WORDS })
    }
}

impl fmt::Display for EnterpriseStatus {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// 性别.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Sex {
    /// 男
    Male,
    /// 女
    Female,
}

impl Sex {
    pub fn as_str(self) -> &'static str {
        match self {
            Sex::Male => "男",
            Sex::Female => "女",
        }
    }
}

impl FromStr for Sex {
    type Err = UnknownValue;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "男" => Ok(Sex::Male),
            "女" => Ok(Sex::Female),
            _ => Err(UnknownValue { value: s.to_string(), expected: "男|女" }),
        }
    }
}

impl fmt::Display for Sex {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

const DATE_FORMAT: &[time::format_description::BorrowedFormatItem<'static>] =
    format_description!("[year]-[month]-[day]");

/// A date item's text: `YYYY-MM-DD`.
pub fn format_date(date: Date) -> String {
    date.format(DATE_FORMAT).unwrap_or_else(|_| date.to_string())
}

/// Reads a date item (`YYYY-MM-DD`, a real calendar date).
pub fn parse_date(text: &str) -> Result<Date, String> {
    Date::parse(text, DATE_FORMAT).map_err(|e| format!("not a date in the form YYYY-MM-DD ({e})"))
}

/// A datetime item's text: RFC 3339, in the offset it carries (UTC when that offset cannot be written).
pub fn format_datetime(t: OffsetDateTime) -> String {
    t.format(&Rfc3339).or_else(|_| t.to_offset(time::UtcOffset::UTC).format(&Rfc3339)).unwrap_or_else(|_| t.to_string())
}

/// Reads a datetime item (RFC 3339, e.g. `2025-03-03T08:00:00+08:00` or `2025-03-03T00:00:00Z`).
pub fn parse_datetime(text: &str) -> Result<OffsetDateTime, String> {
    OffsetDateTime::parse(text, &Rfc3339).map_err(|e| format!("not an RFC 3339 date and time ({e})"))
}

// ---- typed records ----

/// Takes items out of a record one by one; what is left over goes to `other_items`.
struct ItemReader {
    key: String,
    items: BTreeMap<String, String>,
}

impl ItemReader {
    fn new(record: &Record, key_item: &'static str) -> Result<Self, RecordError> {
        let mut items: BTreeMap<String, String> = record.items.iter().map(|(k, v)| (k.clone(), v.clone())).collect();
        let key_value = items.remove(key_item).filter(|v| !v.is_empty());
        let key = if record.key.is_empty() { key_value } else { Some(record.key.clone()) };
        let key = key.ok_or(RecordError::MissingKey { item: key_item })?;
        Ok(ItemReader { key, items })
    }

    fn text(&mut self, item: &str) -> Option<String> {
        self.items.remove(item).filter(|v| !v.is_empty())
    }

    fn parsed<T>(
        &mut self,
        item: &str,
        parse: impl FnOnce(&str) -> Result<T, String>,
    ) -> Result<Option<T>, RecordError> {
        match self.text(item) {
            None => Ok(None),
            Some(value) => parse(&value).map(Some).map_err(|reason| RecordError::BadItem {
                key: self.key.clone(),
                item: item.to_string(),
                value,
                reason,
            }),
        }
    }
}

/// Builds a record's items: the key item first, then each field that has a value.
struct ItemWriter(HashMap<String, String>);

impl ItemWriter {
    fn new(key_item: &str, key: &str, other_items: &BTreeMap<String, String>) -> Self {
        let mut items: HashMap<String, String> = other_items.iter().map(|(k, v)| (k.clone(), v.clone())).collect();
        if !key.is_empty() {
            items.insert(key_item.to_string(), key.to_string());
        }
        ItemWriter(items)
    }

    fn put(&mut self, item: &str, value: Option<impl ToString>) {
        if let Some(v) = value {
            self.0.insert(item.to_string(), v.to_string());
        }
    }
}

/// Writes `item  value` lines in `order`, then any other items, names padded by display width.
fn write_items(f: &mut fmt::Formatter<'_>, order: &[&str], record: &Record) -> fmt::Result {
    let mut rows: Vec<(&str, &str)> =
        order.iter().filter_map(|name| record.items.get(*name).map(|v| (*name, v.as_str()))).collect();
    let mut others: Vec<(&str, &str)> = record
        .items
        .iter()
        .filter(|(k, _)| !order.contains(&k.as_str()))
        .map(|(k, v)| (k.as_str(), v.as_str()))
        .collect();
    others.sort();
    rows.extend(others);
    let width = rows.iter().map(|(k, _)| k.width()).max().unwrap_or(0);
    for (name, value) in rows {
        writeln!(f, "{name}{}  {value}", " ".repeat(width - name.width()))?;
    }
    Ok(())
}

/// An enterprise registration record (企业登记信息), keyed by 统一社会信用代码.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct EnterpriseRecord {
    /// 统一社会信用代码 (the key).
    pub credit_code: String,
    /// 企业名称
    pub name: Option<String>,
    /// 法定代表人
    pub legal_representative: Option<String>,
    /// 企业类型
    pub enterprise_type: Option<String>,
    /// 注册资本, in 万元.
    pub registered_capital: Option<Decimal>,
    /// 成立日期
    pub established_on: Option<Date>,
    /// 住所
    pub address: Option<String>,
    /// 经营范围
    pub business_scope: Option<String>,
    /// 登记状态
    pub status: Option<EnterpriseStatus>,
    /// 登记机关
    pub registration_authority: Option<String>,
    /// 所属行业
    pub industry: Option<String>,
    /// 更新时间: when the register last changed the record.
    pub updated_at: Option<OffsetDateTime>,
    /// Items this type does not name, as they came.
    pub other_items: BTreeMap<String, String>,
    /// When the provider's node stored the record (`Record.updated_at_unix_ms`); 0 for one not stored yet.
    pub stored_at_unix_ms: i64,
}

impl EnterpriseRecord {
    /// A record with only its key set.
    pub fn new(credit_code: impl Into<String>) -> Self {
        EnterpriseRecord { credit_code: credit_code.into(), ..Default::default() }
    }

    /// The wire form: absent fields are left out of `items`.
    pub fn to_record(&self) -> Record {
        use enterprise_items as i;
        let mut w = ItemWriter::new(i::CREDIT_CODE, &self.credit_code, &self.other_items);
        w.put(i::NAME, self.name.as_ref());
        w.put(i::LEGAL_REPRESENTATIVE, self.legal_representative.as_ref());
        w.put(i::ENTERPRISE_TYPE, self.enterprise_type.as_ref());
        w.put(i::REGISTERED_CAPITAL, self.registered_capital.as_ref());
        w.put(i::ESTABLISHED_ON, self.established_on.map(format_date));
        w.put(i::ADDRESS, self.address.as_ref());
        w.put(i::BUSINESS_SCOPE, self.business_scope.as_ref());
        w.put(i::STATUS, self.status);
        w.put(i::REGISTRATION_AUTHORITY, self.registration_authority.as_ref());
        w.put(i::INDUSTRY, self.industry.as_ref());
        w.put(i::UPDATED_AT, self.updated_at.map(format_datetime));
        Record { key: self.credit_code.clone(), items: w.0, updated_at_unix_ms: self.stored_at_unix_ms, version: 0 }
    }

    /// Reads a wire record. Missing items become `None`; an item in the wrong format is an error. The key
    /// is taken as it is (see [`EnterpriseRecord::validate_key`]).
    pub fn from_record(record: &Record) -> Result<Self, RecordError> {
        use enterprise_items as i;
        let mut r = ItemReader::new(record, i::CREDIT_CODE)?;
        let registered_capital = r.parsed(i::REGISTERED_CAPITAL, |v| Decimal::new(v).map_err(|e| e.to_string()))?;
        let established_on = r.parsed(i::ESTABLISHED_ON, parse_date)?;
        let status = r.parsed(i::STATUS, |v| v.parse::<EnterpriseStatus>().map_err(|e| e.to_string()))?;
        let updated_at = r.parsed(i::UPDATED_AT, parse_datetime)?;
        Ok(EnterpriseRecord {
            name: r.text(i::NAME),
            legal_representative: r.text(i::LEGAL_REPRESENTATIVE),
            enterprise_type: r.text(i::ENTERPRISE_TYPE),
            registered_capital,
            established_on,
            address: r.text(i::ADDRESS),
            business_scope: r.text(i::BUSINESS_SCOPE),
            status,
            registration_authority: r.text(i::REGISTRATION_AUTHORITY),
            industry: r.text(i::INDUSTRY),
            updated_at,
            credit_code: r.key,
            other_items: r.items,
            stored_at_unix_ms: record.updated_at_unix_ms,
        })
    }

    /// Checks the credit code (GB 32100-2015), as [`ExchangeClient::put_enterprises`] does before sending.
    pub fn validate_key(&self) -> Result<(), IdError> {
        ids::validate_uscc(&self.credit_code)
    }
}

impl fmt::Display for EnterpriseRecord {
    /// One `item  value` line per item that has a value, in catalog order.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write_items(f, &enterprise_items::ALL, &self.to_record())
    }
}

/// A population record (人口基础信息), keyed by 公民身份号码.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct PopulationRecord {
    /// 公民身份号码 (the key); masked (`110105********002X`) when the consumer is not granted it in full.
    pub identity_number: String,
    /// 姓名
    pub name: Option<String>,
    /// 性别
    pub sex: Option<Sex>,
    /// 出生日期
    pub birth_date: Option<Date>,
    /// 民族
    pub ethnicity: Option<String>,
    /// 住址
    pub address: Option<String>,
    /// 户籍地
    pub household_registration: Option<String>,
    /// 人员状态
    pub status: Option<String>,
    /// Items this type does not name, as they came.
    pub other_items: BTreeMap<String, String>,
    /// When the provider's node stored the record (`Record.updated_at_unix_ms`); 0 for one not stored yet.
    pub stored_at_unix_ms: i64,
}

impl PopulationRecord {
    /// A record with only its key set.
    pub fn new(identity_number: impl Into<String>) -> Self {
        PopulationRecord { identity_number: identity_number.into(), ..Default::default() }
    }

    /// The wire form: absent fields are left out of `items`.
    pub fn to_record(&self) -> Record {
        use population_items as i;
        let mut w = ItemWriter::new(i::IDENTITY_NUMBER, &self.identity_number, &self.other_items);
        w.put(i::NAME, self.name.as_ref());
        w.put(i::SEX, self.sex);
        w.put(i::BIRTH_DATE, self.birth_date.map(format_date));
        w.put(i::ETHNICITY, self.ethnicity.as_ref());
        w.put(i::ADDRESS, self.address.as_ref());
        w.put(i::HOUSEHOLD_REGISTRATION, self.household_registration.as_ref());
        w.put(i::STATUS, self.status.as_ref());
        Record { key: self.identity_number.clone(), items: w.0, updated_at_unix_ms: self.stored_at_unix_ms, version: 0 }
    }

    /// Reads a wire record. Missing items become `None`; an item in the wrong format is an error. The key
    /// is taken as it is, masked or not.
    pub fn from_record(record: &Record) -> Result<Self, RecordError> {
        use population_items as i;
        let mut r = ItemReader::new(record, i::IDENTITY_NUMBER)?;
        let sex = r.parsed(i::SEX, |v| v.parse::<Sex>().map_err(|e| e.to_string()))?;
        let birth_date = r.parsed(i::BIRTH_DATE, parse_date)?;
        Ok(PopulationRecord {
            name: r.text(i::NAME),
            sex,
            birth_date,
            ethnicity: r.text(i::ETHNICITY),
            address: r.text(i::ADDRESS),
            household_registration: r.text(i::HOUSEHOLD_REGISTRATION),
            status: r.text(i::STATUS),
            identity_number: r.key,
            other_items: r.items,
            stored_at_unix_ms: record.updated_at_unix_ms,
        })
    }

    /// True when the identity number arrived masked (the consumer is not granted it in full).
    pub fn identity_number_masked(&self) -> bool {
        self.identity_number.contains('*')
    }

    /// Checks the identity number (GB 11643-1999), as [`ExchangeClient::put_population`] does before sending.
    pub fn validate_key(&self) -> Result<(), IdError> {
        ids::validate_identity_number(&self.identity_number)
    }
}

impl fmt::Display for PopulationRecord {
    /// One `item  value` line per item that has a value, in catalog order.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write_items(f, &population_items::ALL, &self.to_record())
    }
}

// ---- key checks (before anything is sent) ----

fn invalid(violations: Vec<FieldViolation>) -> ClientError {
    let n = violations.len();
    let message =
        format!("{n} invalid field{} (checked before sending; nothing was sent)", if n == 1 { "" } else { "s" });
    ClientError::InvalidArgument { message, violations }
}

pub(crate) fn violation(field: impl Into<String>, description: impl Into<String>) -> FieldViolation {
    FieldViolation { field: field.into(), description: description.into() }
}

/// The violation for a bad unified social credit code, if it is bad.
pub fn check_credit_code(field: &str, code: &str) -> Option<FieldViolation> {
    ids::validate_uscc(code)
        .err()
        .map(|e| violation(field, format!("{} {code:?} is not valid: {e}", enterprise_items::CREDIT_CODE)))
}

/// The violation for a bad citizen identity number, if it is bad. A masked number is bad: only a full
/// number can be stored or asked for.
pub fn check_identity_number(field: &str, id: &str) -> Option<FieldViolation> {
    let item = population_items::IDENTITY_NUMBER;
    if id.contains('*') {
        return Some(violation(field, format!("{item} {id:?} is masked; a full number is needed")));
    }
    ids::validate_identity_number(id).err().map(|e| violation(field, format!("{item} {id:?} is not valid: {e}")))
}

pub(crate) fn check_not_empty(field: &str, value: &str, what: &str) -> Option<FieldViolation> {
    value.trim().is_empty().then(|| violation(field, format!("{what} is required")))
}

fn check_keys(keys: &[&str]) -> Vec<FieldViolation> {
    if keys.is_empty() {
        return vec![violation("keys", "at least one key is required")];
    }
    if keys.len() > MAX_QUERY_KEYS {
        return vec![violation("keys", format!("at most {MAX_QUERY_KEYS} keys per query, got {}", keys.len()))];
    }
    keys.iter().enumerate().filter_map(|(i, k)| check_not_empty(&format!("keys[{i}]"), k, "a key")).collect()
}

pub(crate) fn ok_or_invalid(violations: Vec<FieldViolation>) -> Result<(), ClientError> {
    if violations.is_empty() {
        Ok(())
    } else {
        Err(invalid(violations))
    }
}

// ---- query results ----

/// What a query answered (`QueryRecordsResponse`).
#[derive(Clone, Debug, Default, PartialEq)]
pub struct QueryResult {
    /// The relay's message id, as both departments' audit trails record it.
    pub message_id: String,
    pub provider_code: String,
    /// The records found, in the order of the keys asked for (not-found keys left out).
    pub records: Vec<Record>,
    /// Indexes, into the keys asked for, of keys without a record.
    pub not_found: Vec<u32>,
    /// The data items this consumer may see, in catalog order.
    pub data_items: Vec<String>,
    /// Items that came masked (the identity number when not granted in full).
    pub masked_items: Vec<String>,
}

impl From<QueryRecordsResponse> for QueryResult {
    fn from(r: QueryRecordsResponse) -> Self {
        QueryResult {
            message_id: r.message_id,
            provider_code: r.provider_code,
            records: r.records,
            not_found: r.not_found,
            data_items: r.data_items,
            masked_items: r.masked_items,
        }
    }
}

impl QueryResult {
    /// Each key asked for with its record, or `None` when it was not found. Records are matched by
    /// position, not by key text: a masked key would not compare equal.
    pub fn pair_with_keys<'k>(&self, keys: &[&'k str]) -> Vec<(&'k str, Option<&Record>)> {
        let mut records = self.records.iter();
        keys.iter()
            .enumerate()
            .map(|(i, k)| {
                let missing = self.not_found.contains(&(i as u32));
                (*k, if missing { None } else { records.next() })
            })
            .collect()
    }

    /// True when `item` came masked.
    pub fn is_masked(&self, item: &str) -> bool {
        self.masked_items.iter().any(|m| m == item)
    }

    /// The records as enterprise records.
    pub fn enterprises(&self) -> Result<Vec<EnterpriseRecord>, RecordError> {
        self.records.iter().map(EnterpriseRecord::from_record).collect()
    }

    /// The records as population records.
    pub fn population(&self) -> Result<Vec<PopulationRecord>, RecordError> {
        self.records.iter().map(PopulationRecord::from_record).collect()
    }
}

// ---- grants ----

/// Grant status words, as `exchangectl grants list --status` takes them.
pub const GRANT_STATUSES: EnumWords<GrantStatus> = EnumWords {
    field: "status",
    words: &[
        ("pending", GrantStatus::Pending),
        ("approved", GrantStatus::Approved),
        ("rejected", GrantStatus::Rejected),
        ("revoked", GrantStatus::Revoked),
        ("expired", GrantStatus::Expired),
        ("superseded", GrantStatus::Superseded),
    ],
};

// ---- the client ----

/// How long a call may take unless [`ExchangeClient::with_timeout`] says otherwise.
pub const DEFAULT_TIMEOUT: Duration = Duration::from_secs(30);

/// Most bytes of records sent in one `PutRecords` call: the message limit, less room for the envelope.
const PUT_BATCH_BYTES: usize = MAX_MESSAGE_BYTES - 64 * 1024;

/// An application's connection to its own department's node, and optionally to the directory (for
/// grants). Cheap to clone; clones share the connections. Every call has a deadline
/// ([`DEFAULT_TIMEOUT`] unless set), sent to the server and enforced here as well.
#[derive(Clone, Debug)]
pub struct ExchangeClient {
    node: ExchangeNodeClient<Channel>,
    directory: Option<DirectoryClient<DirectoryChannel>>,
    timeout: Duration,
}

impl ExchangeClient {
    /// Sets up connections to the node at `node_addr` (its certificate must have role `node`) and, if given,
    /// to the directory (role `directory`; one `host:port` or its replicas separated by commas, failed over
    /// as [`DirectoryChannel`] describes). Nothing is dialled yet: the first call connects, and a broken
    /// connection is re-dialled on the next call. Must be called inside a Tokio runtime.
    pub fn connect(node_addr: &str, directory_addr: Option<&str>, identity: &TlsIdentity) -> Result<Self, ClientError> {
        let node = client::node_client(node_addr, identity)?;
        let directory = directory_addr.map(|addr| client::directory_client(addr, identity)).transpose()?;
        Ok(ExchangeClient::from_clients(node, directory))
    }

    /// On clients set up elsewhere (shared channels, tests).
    pub fn from_clients(node: ExchangeNodeClient<Channel>, directory: Option<DirectoryClient<DirectoryChannel>>) -> Self {
        ExchangeClient { node, directory, timeout: DEFAULT_TIMEOUT }
    }

    /// The deadline of each call.
    pub fn with_timeout(mut self, timeout: Duration) -> Self {
        self.timeout = timeout;
        self
    }

    pub fn timeout(&self) -> Duration {
        self.timeout
    }

    /// The generated node client, for calls this type does not wrap.
    pub fn node(&self) -> ExchangeNodeClient<Channel> {
        self.node.clone()
    }

    pub(crate) fn request<T>(&self, message: T) -> tonic::Request<T> {
        let mut req = tonic::Request::new(message);
        req.set_timeout(self.timeout);
        req
    }

    /// Runs one call with the deadline enforced on this side too (a server that never answers, a
    /// connection that hangs).
    pub(crate) async fn unary<T>(&self, call: impl Future<Output = Result<tonic::Response<T>, Status>>) -> Result<T, ClientError> {
        // A little longer than the deadline sent, so a server that honours it answers DEADLINE_EXCEEDED itself.
        match tokio::time::timeout(self.timeout + Duration::from_millis(500), call).await {
            Ok(result) => result.map(tonic::Response::into_inner).map_err(ClientError::from),
            Err(_) => Err(ClientError::Other {
                code: Code::DeadlineExceeded,
                message: format!("no answer within {:.1}s", self.timeout.as_secs_f64()),
            }),
        }
    }

    fn directory(&self) -> Result<DirectoryClient<DirectoryChannel>, ClientError> {
        self.directory.clone().ok_or_else(|| ClientError::Other {
            code: Code::FailedPrecondition,
            message: "grants are kept by the directory: pass its address to ExchangeClient::connect".into(),
        })
    }

    // ---- records ----

    /// Stores records of a resource this department publishes; returns how many were stored.
    ///
    /// Large lists are sent in several calls (at most [`MAX_BATCH_RECORDS`] records and about 4 MiB each).
    /// Each call is all or nothing; when one is refused, the calls before it stay stored, the error's message
    /// says how many records that was, and its field violations are numbered by position in `records`.
    pub async fn put_records(&self, resource: &str, records: Vec<Record>) -> Result<u64, ClientError> {
        self.put_records_with_progress(resource, records, |_| {}).await
    }

    /// As [`ExchangeClient::put_records`], calling `progress` with the size of each stored batch.
    pub async fn put_records_with_progress(
        &self,
        resource: &str,
        records: Vec<Record>,
        mut progress: impl FnMut(usize),
    ) -> Result<u64, ClientError> {
        let mut violations: Vec<FieldViolation> =
            check_not_empty("resource_code", resource, "a resource code").into_iter().collect();
        violations.extend(
            records
                .iter()
                .enumerate()
                .filter_map(|(i, r)| check_not_empty(&format!("records[{i}].key"), &r.key, "a key")),
        );
        ok_or_invalid(violations)?;
        let ranges = put_batches(&records);
        let mut rest = records.into_iter();
        let (mut stored, mut accepted) = (0u64, 0usize);
        for range in ranges {
            let batch: Vec<Record> = rest.by_ref().take(range.len()).collect();
            let request = self.request(PutRecordsRequest { resource_code: resource.to_string(), records: batch, ..Default::default() });
            let mut node = self.node.clone();
            match self.unary(node.put_records(request)).await {
                Ok(resp) => {
                    stored += resp.stored;
                    accepted += range.len();
                    progress(range.len());
                }
                Err(mut error) => {
                    shift_indexes(&mut error, "records", range.start);
                    if accepted > 0 {
                        error.append_note(&format!(
                            " (the first {accepted} records were stored before this batch was refused)"
                        ));
                    }
                    return Err(error);
                }
            }
        }
        Ok(stored)
    }

    /// Stores enterprise records; every credit code is checked first, and one bad code sends nothing.
    pub async fn put_enterprises(&self, resource: &str, records: &[EnterpriseRecord]) -> Result<u64, ClientError> {
        ok_or_invalid(
            records
                .iter()
                .enumerate()
                .filter_map(|(i, r)| check_credit_code(&format!("records[{i}].key"), &r.credit_code))
                .collect(),
        )?;
        self.put_records(resource, records.iter().map(EnterpriseRecord::to_record).collect()).await
    }

    /// Stores population records; every identity number is checked first (masked ones are refused), and
    /// one bad number sends nothing.
    pub async fn put_population(&self, resource: &str, records: &[PopulationRecord]) -> Result<u64, ClientError> {
        ok_or_invalid(
            records
                .iter()
                .enumerate()
                .filter_map(|(i, r)| check_identity_number(&format!("records[{i}].key"), &r.identity_number))
                .collect(),
        )?;
        self.put_records(resource, records.iter().map(PopulationRecord::to_record).collect()).await
    }

    /// Records of another department's resource, by key (at most [`MAX_QUERY_KEYS`]). `purpose` is why the
    /// application asks; both departments' audit trails record it. A single key without a record is
    /// [`ClientError::NotFound`]; in a batch, missing keys are listed in [`QueryResult::not_found`].
    ///
    /// Keys are only checked for presence here, since the resource's kind of key is not known; use
    /// [`ExchangeClient::query_enterprise`] / [`ExchangeClient::query_population`] for checked keys.
    pub async fn query(&self, resource: &str, keys: &[&str], purpose: &str) -> Result<QueryResult, ClientError> {
        let mut violations: Vec<FieldViolation> =
            check_not_empty("resource_code", resource, "a resource code").into_iter().collect();
        violations.extend(check_keys(keys));
        ok_or_invalid(violations)?;
        let request = self.request(QueryRecordsRequest {
            resource_code: resource.to_string(),
            keys: keys.iter().map(|k| k.to_string()).collect(),
            purpose: purpose.to_string(),
        });
        let mut node = self.node.clone();
        self.unary(node.query_records(request)).await.map(QueryResult::from)
    }

    /// One enterprise record by credit code (checked before sending).
    pub async fn query_enterprise(
        &self,
        resource: &str,
        credit_code: &str,
        purpose: &str,
    ) -> Result<EnterpriseRecord, ClientError> {
        ok_or_invalid(check_credit_code("keys[0]", credit_code).into_iter().collect())?;
        let result = self.query(resource, &[credit_code], purpose).await?;
        let record = result.records.first().ok_or_else(|| not_found(resource, credit_code))?;
        Ok(EnterpriseRecord::from_record(record)?)
    }

    /// One population record by identity number (checked before sending). The answer's number is masked
    /// when this department is not granted it in full.
    pub async fn query_population(
        &self,
        resource: &str,
        identity_number: &str,
        purpose: &str,
    ) -> Result<PopulationRecord, ClientError> {
        ok_or_invalid(check_identity_number("keys[0]", identity_number).into_iter().collect())?;
        let result = self.query(resource, &[identity_number], purpose).await?;
        let record =
            result.records.first().ok_or_else(|| not_found(resource, &ids::mask_identity_number(identity_number)))?;
        Ok(PopulationRecord::from_record(record)?)
    }

    // ---- grants (directory) ----

    /// Asks the provider of a conditional resource for access to `items` (this department is the consumer).
    /// The grant comes back pending.
    pub async fn request_access(
        &self,
        resource: &str,
        items: &[&str],
        purpose: &str,
        legal_basis: &str,
    ) -> Result<Grant, ClientError> {
        let mut violations: Vec<FieldViolation> =
            check_not_empty("resource_code", resource, "a resource code").into_iter().collect();
        if items.is_empty() {
            violations.push(violation("data_items", "at least one data item is required"));
        }
        ok_or_invalid(violations)?;
        let request = self.request(RequestGrantRequest {
            resource_code: resource.to_string(),
            data_items: items.iter().map(|s| s.to_string()).collect(),
            purpose: purpose.to_string(),
            legal_basis: legal_basis.to_string(),
        });
        let mut directory = self.directory()?;
        self.unary(directory.request_grant(request)).await
    }

    /// Grants where this department is provider or consumer (newest request first).
    pub async fn list_grants(&self, request: ListGrantsRequest) -> Result<Vec<Grant>, ClientError> {
        let mut directory = self.directory()?;
        let request = self.request(request);
        self.unary(directory.list_grants(request)).await.map(|r| r.grants)
    }

    /// Approves a pending grant (operator of the provider department): `items` empty grants every requested
    /// item, else that subset; `expires_at` `None` never expires.
    pub async fn approve_grant(
        &self,
        grant_id: &str,
        items: &[&str],
        expires_at: Option<OffsetDateTime>,
    ) -> Result<Grant, ClientError> {
        ok_or_invalid(check_not_empty("grant_id", grant_id, "a grant id").into_iter().collect())?;
        let request = self.request(DecideGrantRequest {
            grant_id: grant_id.to_string(),
            approve: true,
            granted_items: items.iter().map(|s| s.to_string()).collect(),
            expires_at_unix_ms: expires_at.map(unix_ms).unwrap_or(0),
            reason: String::new(),
        });
        let mut directory = self.directory()?;
        self.unary(directory.decide_grant(request)).await
    }

    /// Rejects a pending grant (operator of the provider department); a reason is required.
    pub async fn reject_grant(&self, grant_id: &str, reason: &str) -> Result<Grant, ClientError> {
        ok_or_invalid(check_grant_and_reason(grant_id, reason))?;
        let request = self.request(DecideGrantRequest {
            grant_id: grant_id.to_string(),
            approve: false,
            reason: reason.to_string(),
            ..Default::default()
        });
        let mut directory = self.directory()?;
        self.unary(directory.decide_grant(request)).await
    }

    /// Ends an approved grant (operator of the provider department); a reason is required.
    pub async fn revoke_grant(&self, grant_id: &str, reason: &str) -> Result<Grant, ClientError> {
        ok_or_invalid(check_grant_and_reason(grant_id, reason))?;
        let request = self.request(RevokeGrantRequest { grant_id: grant_id.to_string(), reason: reason.to_string() });
        let mut directory = self.directory()?;
        self.unary(directory.revoke_grant(request)).await
    }

    // ---- audit (operator of the node's department) ----

    /// Entries of the node's audit trail, newest first.
    pub async fn query_audit(&self, request: QueryAuditRequest) -> Result<QueryAuditResponse, ClientError> {
        let request = self.request(request);
        let mut node = self.node.clone();
        self.unary(node.query_audit(request)).await
    }

    /// Checks the node's audit trail (hash chain and seals).
    pub async fn verify_audit(&self) -> Result<VerifyAuditResponse, ClientError> {
        let request = self.request(VerifyAuditRequest {});
        let mut node = self.node.clone();
        self.unary(node.verify_audit(request)).await
    }
}

fn check_grant_and_reason(grant_id: &str, reason: &str) -> Vec<FieldViolation> {
    check_not_empty("grant_id", grant_id, "a grant id")
        .into_iter()
        .chain(check_not_empty("reason", reason, "a reason"))
        .collect()
}

fn not_found(resource: &str, key: &str) -> ClientError {
    ClientError::NotFound(format!("no record with key {key} in {resource}"))
}

/// Milliseconds since the Unix epoch.
pub fn unix_ms(t: OffsetDateTime) -> i64 {
    (t.unix_timestamp_nanos() / 1_000_000) as i64
}

/// Splits records into `PutRecords` calls: at most [`MAX_BATCH_RECORDS`] records and [`PUT_BATCH_BYTES`]
/// encoded bytes each (a single larger record goes alone, for the node to refuse).
fn put_batches(records: &[Record]) -> Vec<std::ops::Range<usize>> {
    size_batches(records.iter().map(|r| r.encoded_len()))
}

/// Splits a list of messages of the given encoded sizes into calls of at most [`MAX_BATCH_RECORDS`]
/// messages and [`PUT_BATCH_BYTES`] bytes each (a single larger message goes alone, for the node to refuse).
pub(crate) fn size_batches(sizes: impl ExactSizeIterator<Item = usize>) -> Vec<std::ops::Range<usize>> {
    let mut batches = Vec::new();
    let count = sizes.len();
    let (mut start, mut bytes) = (0, 0);
    for (i, size) in sizes.enumerate() {
        let len = size + 8; // field tag and length prefix
        if i > start && (i - start >= MAX_BATCH_RECORDS || bytes + len > PUT_BATCH_BYTES) {
            batches.push(start..i);
            (start, bytes) = (i, 0);
        }
        bytes += len;
    }
    if start < count {
        batches.push(start..count);
    }
    batches
}

/// Renumbers `list[N]` by `offset` in an error's field violations and message, so a refusal of a later
/// batch points at the right position of the whole list.
pub(crate) fn shift_indexes(error: &mut ClientError, list: &str, offset: usize) {
    if offset == 0 {
        return;
    }
    if let ClientError::InvalidArgument { message, violations } = error {
        *message = shift_in_text(message, list, offset);
        for v in violations {
            v.field = shift_in_text(&v.field, list, offset);
        }
    }
}

fn shift_in_text(text: &str, list: &str, offset: usize) -> String {
    let open = format!("{list}[");
    let mut out = String::with_capacity(text.len());
    let mut rest = text;
    while let Some(pos) = rest.find(&open) {
        let after = &rest[pos + open.len()..];
        out.push_str(&rest[..pos + open.len()]);
        let digits = after.bytes().take_while(u8::is_ascii_digit).count();
        match after[..digits].parse::<usize>() {
            Ok(n) if after[digits..].starts_with(']') => out.push_str(&(n + offset).to_string()),
            _ => out.push_str(&after[..digits]),
        }
        rest = &after[digits..];
    }
    out.push_str(rest);
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use time::macros::{date, datetime};

    const CODE: &str = "91350100M000100Y43";
    const ID: &str = "11010519491231002X";

    fn full_enterprise() -> EnterpriseRecord {
        EnterpriseRecord {
            credit_code: CODE.into(),
            name: Some("福州某某科技有限公司".into()),
            legal_representative: Some("张三".into()),
            enterprise_type: Some("有限责任公司(自然人投资或控股)".into()),
            registered_capital: Some(Decimal::new("1000.50").unwrap()),
            established_on: Some(date!(2015 - 06 - 01)),
            address: Some("福建省福州市鼓楼区某某路1号".into()),
            business_scope: Some("软件开发；信息技术咨询服务".into()),
            status: Some(EnterpriseStatus::Existing),
            registration_authority: Some("福州市鼓楼区市场监督管理局".into()),
            industry: Some("软件和信息技术服务业".into()),
            updated_at: Some(datetime!(2025-03-03 08:00:00 +08:00)),
            other_items: BTreeMap::from([("实缴资本".to_string(), "800".to_string())]),
            stored_at_unix_ms: 1_740_960_000_000,
        }
    }

    #[test]
    fn enterprise_round_trip() {
        let e = full_enterprise();
        let r = e.to_record();
        assert_eq!(r.key, CODE);
        assert_eq!(r.items[enterprise_items::CREDIT_CODE], CODE);
        assert_eq!(r.items[enterprise_items::REGISTERED_CAPITAL], "1000.50");
        assert_eq!(r.items[enterprise_items::ESTABLISHED_ON], "2015-06-01");
        assert_eq!(r.items[enterprise_items::STATUS], "存续");
        assert_eq!(r.items[enterprise_items::UPDATED_AT], "2025-03-03T08:00:00+08:00");
        assert_eq!(r.items["实缴资本"], "800");
        assert_eq!(r.items.len(), 13);
        assert_eq!(EnterpriseRecord::from_record(&r).unwrap(), e);
    }

    #[test]
    fn population_round_trip_and_sex() {
        let p = PopulationRecord {
            identity_number: ID.into(),
            name: Some("李四".into()),
            sex: Some(Sex::Female),
            birth_date: Some(date!(1949 - 12 - 31)),
            ethnicity: Some("汉族".into()),
            address: Some("北京市朝阳区某某街道".into()),
            household_registration: Some("北京市朝阳区".into()),
            status: Some("正常".into()),
            ..Default::default()
        };
        let r = p.to_record();
        assert_eq!(r.items[population_items::SEX], "女");
        assert_eq!(r.items[population_items::BIRTH_DATE], "1949-12-31");
        assert_eq!(r.items[population_items::IDENTITY_NUMBER], ID);
        assert_eq!(PopulationRecord::from_record(&r).unwrap(), p);
        assert!(!p.identity_number_masked());
        assert_eq!("男".parse::<Sex>(), Ok(Sex::Male));
        assert!("M".parse::<Sex>().unwrap_err().to_string().contains("男|女"));
    }

    #[test]
    fn missing_items_are_none_and_empty_values_count_as_missing() {
        let r = Record {
            key: CODE.into(),
            items: HashMap::from([
                (enterprise_items::NAME.to_string(), "某某公司".to_string()),
                (enterprise_items::ESTABLISHED_ON.to_string(), String::new()),
            ]),
            updated_at_unix_ms: 0,
            version: 0,
        };
        let e = EnterpriseRecord::from_record(&r).unwrap();
        assert_eq!(e.name.as_deref(), Some("某某公司"));
        assert_eq!(e.established_on, None);
        assert_eq!(e.status, None);
        assert!(e.other_items.is_empty());
        assert_eq!(EnterpriseRecord { name: Some("某某公司".into()), ..EnterpriseRecord::new(CODE) }, e);
        // Absent fields are left out when writing, the key item is written.
        assert_eq!(e.to_record().items.len(), 2);
    }

    #[test]
    fn key_comes_from_the_key_item_when_the_key_field_is_empty() {
        let r = Record {
            key: String::new(),
            items: HashMap::from([(enterprise_items::CREDIT_CODE.to_string(), CODE.to_string())]),
            updated_at_unix_ms: 0,
            version: 0,
        };
        assert_eq!(EnterpriseRecord::from_record(&r).unwrap().credit_code, CODE);
        let err = PopulationRecord::from_record(&Record::default()).unwrap_err();
        assert_eq!(err, RecordError::MissingKey { item: population_items::IDENTITY_NUMBER });
        assert_eq!(err.field(4), "records[4].key");
    }

    #[test]
    fn bad_formats_are_typed_errors_naming_item_and_value() {
        let bad = |item: &str, value: &str| {
            let mut r = full_enterprise().to_record();
            r.items.insert(item.to_string(), value.to_string());
            EnterpriseRecord::from_record(&r).unwrap_err()
        };
        for (item, value) in [
            (enterprise_items::ESTABLISHED_ON, "2015/06/01"),
            (enterprise_items::ESTABLISHED_ON, "2015-02-30"),
            (enterprise_items::REGISTERED_CAPITAL, "1,000"),
            (enterprise_items::REGISTERED_CAPITAL, "1e3"),
            (enterprise_items::STATUS, "营业"),
            (enterprise_items::UPDATED_AT, "2025-03-03 08:00:00"),
        ] {
            let err = bad(item, value);
            let RecordError::BadItem { key, item: i, value: v, .. } = &err else { panic!("{err}") };
            assert_eq!((key.as_str(), i.as_str(), v.as_str()), (CODE, item, value));
            assert_eq!(err.field(2), format!("records[2].items[{item}]"));
        }
        assert!(bad(enterprise_items::STATUS, "营业").to_string().contains("存续|在业"), "lists the accepted words");
        let mut r = PopulationRecord::new(ID).to_record();
        r.items.insert(population_items::SEX.into(), "M".into());
        assert!(matches!(PopulationRecord::from_record(&r), Err(RecordError::BadItem { .. })));
    }

    #[test]
    fn decimals() {
        for ok in ["0", "500", "1234.56", "-0.25", "007"] {
            assert_eq!(Decimal::new(ok).unwrap().as_str(), ok);
        }
        for bad in ["", "-", ".5", "5.", "+5", "1,000", "1e3", "１２", " 5", "NaN"] {
            assert!(Decimal::new(bad).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn enterprise_statuses_round_trip() {
        for s in EnterpriseStatus::ALL {
            assert_eq!(s.as_str().parse::<EnterpriseStatus>(), Ok(s));
            assert_eq!(s.to_string(), s.as_str());
        }
        assert_eq!("吊销".parse(), Ok(EnterpriseStatus::LicenceRevoked));
    }

    #[test]
    fn datetimes_keep_their_offset() {
        let t = parse_datetime("2025-03-03T00:00:00Z").unwrap();
        assert_eq!(format_datetime(t), "2025-03-03T00:00:00Z");
        let t = parse_datetime("2025-03-03T08:00:00.5+08:00").unwrap();
        assert_eq!(format_datetime(t), "2025-03-03T08:00:00.5+08:00");
        assert_eq!(unix_ms(t), 1_740_960_000_500);
    }

    #[test]
    fn masked_identity_numbers_are_detected() {
        let masked = ids::mask_identity_number(ID);
        assert_eq!(masked, "110105********002X");
        let r = Record {
            key: masked.clone(),
            items: HashMap::from([(population_items::IDENTITY_NUMBER.to_string(), masked.clone())]),
            updated_at_unix_ms: 0,
            version: 0,
        };
        let p = PopulationRecord::from_record(&r).unwrap();
        assert!(p.identity_number_masked());
        assert_eq!(p.identity_number, masked);
        assert!(p.validate_key().is_err());
    }

    #[test]
    fn display_lists_items_in_catalog_order_then_the_others() {
        let text = full_enterprise().to_string();
        let lines: Vec<&str> = text.lines().collect();
        assert_eq!(lines[0], format!("统一社会信用代码  {CODE}"));
        assert!(lines[1].starts_with("企业名称          福州"), "{text}");
        assert_eq!(lines.last().unwrap(), &"实缴资本          800");
    }

    #[test]
    fn key_checks_name_the_field_and_the_reason() {
        let v = check_credit_code("keys[0]", "91310115MA1H8R7C6D").unwrap();
        assert_eq!(v.field, "keys[0]");
        assert!(v.description.contains("expected '7'"), "{}", v.description);
        assert!(check_credit_code("keys[0]", CODE).is_none());
        assert!(check_identity_number("records[0].key", ID).is_none());
        assert!(check_identity_number("k", "110101199003077777").unwrap().description.contains("expected '4'"));
        assert!(check_identity_number("k", "110105********002X").unwrap().description.contains("masked"));
        assert!(check_identity_number("k", "110105209912310029").unwrap().description.contains("future"));
        assert_eq!(check_keys(&[]).len(), 1);
        assert_eq!(check_keys(&["a", ""])[0].field, "keys[1]");
        let many = vec!["k"; MAX_QUERY_KEYS + 1];
        assert!(check_keys(&many)[0].description.contains("at most"));
    }

    #[test]
    fn pairing_keys_with_records_skips_the_not_found() {
        let rec = |k: &str| Record { key: k.into(), ..Default::default() };
        let result = QueryResult { records: vec![rec("a"), rec("c")], not_found: vec![1], ..Default::default() };
        let pairs = result.pair_with_keys(&["a", "b", "c"]);
        assert_eq!(pairs[0].1.unwrap().key, "a");
        assert!(pairs[1].1.is_none());
        assert_eq!(pairs[2].1.unwrap().key, "c");
    }

    #[test]
    fn batches_respect_count_and_bytes() {
        let small = vec![Record { key: CODE.into(), ..Default::default() }; MAX_BATCH_RECORDS * 2 + 1];
        let b = put_batches(&small);
        assert_eq!(
            b,
            vec![
                0..MAX_BATCH_RECORDS,
                MAX_BATCH_RECORDS..2 * MAX_BATCH_RECORDS,
                2 * MAX_BATCH_RECORDS..2 * MAX_BATCH_RECORDS + 1
            ]
        );
        let big = Record {
            key: CODE.into(),
            items: HashMap::from([("经营范围".to_string(), "字".repeat(200_000))]),
            updated_at_unix_ms: 0,
            version: 0,
        };
        let b = put_batches(&vec![big; 10]);
        assert!(b.len() > 1 && b.iter().all(|r| r.len() * 600_000 <= MAX_MESSAGE_BYTES), "{b:?}");
        assert!(put_batches(&[]).is_empty());
    }

    #[test]
    fn later_batches_are_renumbered() {
        let mut e = ClientError::InvalidArgument {
            message: "invalid request: records[2].key: bad (and 1 more field violations)".into(),
            violations: vec![
                violation("records[2].key", "bad"),
                violation("records[3].items[成立日期]", "not a date"),
                violation("resource_code", "x"),
            ],
        };
        shift_indexes(&mut e, "records", 5000);
        let ClientError::InvalidArgument { message, violations } = e else { unreachable!() };
        assert_eq!(message, "invalid request: records[5002].key: bad (and 1 more field violations)");
        assert_eq!(violations[1].field, "records[5003].items[成立日期]");
        assert_eq!(violations[2].field, "resource_code");
        assert_eq!(shift_in_text("records[x] records[", "records", 1), "records[x] records[");
    }

    /// A client whose node cannot be reached: anything that got as far as the network would fail with
    /// UNAVAILABLE (or a deadline), so an INVALID_ARGUMENT proves the check ran before sending.
    fn unreachable_client() -> ExchangeClient {
        crate::tls::install_crypto_provider();
        let dir = tempfile::tempdir().unwrap();
        crate::pki::init_ca(dir.path(), "test CA", 30).unwrap();
        crate::pki::issue(dir.path(), &crate::pki::LeafRequest::new("tax", crate::identity::Role::App, "tax-app"))
            .unwrap();
        let id = TlsIdentity::load(&crate::tls::TlsPaths::in_dir(dir.path(), "tax-app")).unwrap();
        ExchangeClient::connect("127.0.0.1:1", Some("127.0.0.1:1"), &id).unwrap().with_timeout(Duration::from_secs(5))
    }

    fn assert_refused_before_sending(result: Result<impl fmt::Debug, ClientError>, field: &str) {
        match result {
            Err(ClientError::InvalidArgument { message, violations }) => {
                assert!(message.contains("nothing was sent"), "{message}");
                assert!(violations.iter().any(|v| v.field == field), "{violations:?}");
            }
            other => panic!("expected INVALID_ARGUMENT on {field}, got {other:?}"),
        }
    }

    #[tokio::test]
    async fn bad_keys_are_refused_without_a_network_call() {
        let c = unreachable_client();
        let r = "101001/000001";
        assert_refused_before_sending(c.query_enterprise(r, "91310115MA1H8R7C6D", "test").await, "keys[0]");
        assert_refused_before_sending(c.query_enterprise(r, "91350100m000100Y43", "test").await, "keys[0]");
        assert_refused_before_sending(c.query_population(r, "110101199003077777", "test").await, "keys[0]");
        assert_refused_before_sending(c.query_population(r, "110105********002X", "test").await, "keys[0]");
        assert_refused_before_sending(c.query(r, &[], "test").await, "keys");
        assert_refused_before_sending(c.query("", &[CODE], "test").await, "resource_code");
        let records = [EnterpriseRecord::new(CODE), EnterpriseRecord::new("91310115MA1H8R7C6D")];
        assert_refused_before_sending(c.put_enterprises(r, &records).await, "records[1].key");
        assert_refused_before_sending(
            c.put_population(r, &[PopulationRecord::new("110105194902300020")]).await,
            "records[0].key",
        );
        assert_refused_before_sending(c.reject_grant("G00000001", " ").await, "reason");
        assert_refused_before_sending(c.revoke_grant("", "done").await, "grant_id");
        assert_refused_before_sending(c.request_access(r, &[], "", "").await, "data_items");
    }

    #[tokio::test]
    async fn a_good_key_does_reach_for_the_network() {
        let c = unreachable_client();
        let err = c.query_enterprise("101001/000001", CODE, "test").await.unwrap_err();
        assert_ne!(err.code(), Code::InvalidArgument, "{err}");
        assert!(matches!(err.code(), Code::Unavailable | Code::Unknown | Code::DeadlineExceeded), "{err}");
    }

    #[tokio::test]
    async fn grants_need_the_directory_address() {
        let c = unreachable_client();
        let no_dir = ExchangeClient::from_clients(c.node(), None);
        let err = no_dir.list_grants(ListGrantsRequest::default()).await.unwrap_err();
        assert_eq!(err.code(), Code::FailedPrecondition, "{err}");
        assert_eq!(no_dir.timeout(), DEFAULT_TIMEOUT);
    }

    #[test]
    fn grant_status_words() {
        assert_eq!(GRANT_STATUSES.parse("approved"), Some(GrantStatus::Approved));
        assert_eq!(GRANT_STATUSES.word(GrantStatus::Superseded as i32), "superseded");
        assert_eq!(GRANT_STATUSES.choices(), "pending|approved|rejected|revoked|expired|superseded");
    }
}
