//! Record validation: a `PutRecords` batch against the catalog entry of its resource.
//!
//! [`validate_batch`] checks *every* record of a batch and collects *every* problem, one
//! [`FieldViolation`] per bad field, named by its path in the request (`records[3].key`,
//! `records[3].items[成立日期]`), so the loading job can fix a whole batch in one round. It is a pure
//! function (today's date is a parameter). Nothing of a batch with a problem may be stored.
//!
//! Decisions the references leave open (also in `docs/RECORDS.md`):
//! - An empty value means "no value" and is accepted for every data type, except for the key item, whose
//!   value must equal the record key.
//! - Values are checked, never rewritten: a lower-case credit code or identity check letter, a `TRUE`, a
//!   date `2024-5-1` are refused, not repaired. Normalization only adds the key item when it is missing
//!   and clears `updated_at_unix_ms` (the store sets it).
//! - An `other` key must not start or end with whitespace (a classic loading bug that later shows up as
//!   "not found"), and when the key item's data type is not string the key must also be a valid value
//!   of that type.
//! - Violation texts never quote a citizen identity number: population keys are shown masked
//!   (`110105********002X`) where they are shown at all, and the values of population records are not
//!   quoted (they are personal data); enterprise and other values are quoted, cut to 40 characters.
//! - Lengths are counted in characters (Unicode scalar values), not bytes.

use std::collections::HashMap;

use exchange_proto::limits::MAX_BATCH_RECORDS;
use exchange_proto::v1::{CatalogEntry, DataType, Record, RecordKind};
use time::format_description::well_known::Rfc3339;

use client_sdk::ids::{mask_identity_number, validate_identity_number_on, validate_uscc, IdError};

use super::key_item;

/// Most characters in a string value.
pub const STRING_MAX_CHARS: usize = 4000;
/// Most characters in the key of an `other` record.
pub const OTHER_KEY_MAX_CHARS: usize = 128;
/// Most significant digits in a decimal value.
pub const DECIMAL_MAX_DIGITS: usize = 30;
/// Most bytes a binary value may decode to (1 MiB).
pub const BINARY_MAX_BYTES: usize = 1024 * 1024;

/// Population data item checked against the birth date in the identity number.
pub const BIRTH_DATE_ITEM: &str = "出生日期";
/// Population data item checked against the sex encoded in the identity number (digit 17: odd 男, even 女).
pub const SEX_ITEM: &str = "性别";
/// Enterprise data item whose value must be one of [`REGISTRATION_STATUSES`].
pub const REGISTRATION_STATUS_ITEM: &str = "登记状态";
/// The registration statuses (登记状态) an enterprise record may carry.
pub const REGISTRATION_STATUSES: &[&str] = &["存续", "在业", "迁入", "迁出", "停业", "清算", "注销", "吊销", "撤销"];

/// Longest quotation of a value in a violation.
const QUOTE_MAX_CHARS: usize = 40;

/// One bad field of a `PutRecords` request: a path like `records[3].items[成立日期]` and what is wrong.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct FieldViolation {
    pub field: String,
    pub description: String,
}

impl FieldViolation {
    pub fn new(field: impl Into<String>, description: impl Into<String>) -> Self {
        FieldViolation { field: field.into(), description: description.into() }
    }
}

/// `value` in quotes for a message, cut to [`QUOTE_MAX_CHARS`] characters.
fn quote(value: &str) -> String {
    let n = value.chars().count();
    if n <= QUOTE_MAX_CHARS {
        format!("{value:?}")
    } else {
        let head: String = value.chars().take(QUOTE_MAX_CHARS).collect();
        format!("{head:?}… ({n} characters)")
    }
}

/// The first control character of `value` not allowed (line feed and tab allowed when `multiline`).
fn control_char(value: &str, multiline: bool) -> Option<String> {
    value
        .chars()
        .enumerate()
        .find(|(_, c)| c.is_control() && !(multiline && (*c == '\n' || *c == '\t')))
        .map(|(pos, ch)| format!("contains control character U+{:04X} at character {}", ch as u32, pos + 1))
}

/// Checks a non-empty value against its data type; the message says what the value must look like (it
/// never quotes the value: the caller decides whether it may). An empty value is "no value" and passes.
/// An unknown or unspecified data type is checked as a string.
pub fn check_value(data_type: DataType, value: &str) -> Result<(), String> {
    if value.is_empty() {
        return Ok(());
    }
    match data_type {
        DataType::String | DataType::Unspecified => {
            let n = value.chars().count();
            if n > STRING_MAX_CHARS {
                return Err(format!("must be at most {STRING_MAX_CHARS} characters, got {n}"));
            }
            match control_char(value, true) {
                Some(e) => Err(format!("{e} (only line feed and tab are allowed)")),
                None => Ok(()),
            }
        }
        DataType::Integer => value
            .parse::<i64>()
            .map(drop)
            .map_err(|_| "must be a whole number (optional sign, digits only) within the 64-bit range, e.g. 42".into()),
        DataType::Decimal => check_decimal(value),
        DataType::Date => check_date(value).map(drop),
        DataType::Datetime => {
            const SHAPE: &str = "must be an RFC 3339 date-time with a UTC offset, e.g. 2024-05-01T08:30:00+08:00";
            // The time crate takes any separator and a lower-case z; the exchange holds one form: T and Z.
            if value.as_bytes().get(10) != Some(&b'T') || value.ends_with('z') {
                return Err(format!("{SHAPE} (upper-case T between date and time, Z or ±hh:mm for the offset)"));
            }
            time::OffsetDateTime::parse(value, &Rfc3339).map(drop).map_err(|e| format!("{SHAPE} ({e})"))
        }
        DataType::Boolean => match value {
            "true" | "false" => Ok(()),
            _ => Err("must be true or false (lower case)".into()),
        },
        DataType::Binary => check_base64(value),
    }
}

fn check_decimal(value: &str) -> Result<(), String> {
    const SHAPE: &str = "must be a decimal number: optional sign, digits, optional fraction, e.g. -1250.50";
    let unsigned = value.strip_prefix(['+', '-']).unwrap_or(value);
    let (int, frac) = match unsigned.split_once('.') {
        Some((i, f)) => (i, Some(f)),
        None => (unsigned, None),
    };
    let digits = |s: &str| !s.is_empty() && s.bytes().all(|b| b.is_ascii_digit());
    if !digits(int) || frac.is_some_and(|f| !digits(f)) {
        return Err(SHAPE.into());
    }
    let significant = format!("{int}{}", frac.unwrap_or("")).trim_start_matches('0').len();
    if significant > DECIMAL_MAX_DIGITS {
        return Err(format!("has {significant} significant digits; at most {DECIMAL_MAX_DIGITS}"));
    }
    Ok(())
}

/// `YYYY-MM-DD`, a real calendar date.
fn check_date(value: &str) -> Result<time::Date, String> {
    let b = value.as_bytes();
    let shape_ok = b.len() == 10
        && b[4] == b'-'
        && b[7] == b'-'
        && b.iter().enumerate().all(|(i, c)| i == 4 || i == 7 || c.is_ascii_digit());
    if !shape_ok {
        return Err("must be a date YYYY-MM-DD, e.g. 2024-05-01".into());
    }
    let year: i32 = value[0..4].parse().expect("digits");
    let month: u8 = value[5..7].parse().expect("digits");
    let day: u8 = value[8..10].parse().expect("digits");
    time::Month::try_from(month)
        .ok()
        .and_then(|m| time::Date::from_calendar_date(year, m, day).ok())
        .ok_or_else(|| "is not a real calendar date".into())
}

/// Standard base64 (RFC 4648 alphabet `A-Z a-z 0-9 + /`, `=` padding, canonical: unused bits zero).
// `usize::is_multiple_of` needs Rust 1.87; the workspace's rust-version is 1.85.
#[allow(clippy::manual_is_multiple_of)]
fn check_base64(value: &str) -> Result<(), String> {
    let pad = value.bytes().rev().take_while(|b| *b == b'=').count();
    let body = &value[..value.len() - pad];
    if let Some((pos, ch)) =
        body.chars().enumerate().find(|(_, c)| !(c.is_ascii_alphanumeric() || *c == '+' || *c == '/'))
    {
        return Err(format!(
            "must be standard base64: character {} ({ch:?}) is not in the alphabet A-Z a-z 0-9 + / (= only as padding at the end)",
            pos + 1
        ));
    }
    if pad > 2 || value.len() % 4 != 0 {
        return Err(format!(
            "must be standard base64 with = padding: the length must be a multiple of 4, got {}",
            value.len()
        ));
    }
    let sextet = |c: u8| match c {
        b'A'..=b'Z' => c - b'A',
        b'a'..=b'z' => c - b'a' + 26,
        b'0'..=b'9' => c - b'0' + 52,
        b'+' => 62,
        _ => 63,
    };
    let last = body.as_bytes().last().copied().map_or(0, sextet);
    let unused_bits_mask = match pad {
        1 => 0b0011,
        2 => 0b1111,
        _ => 0,
    };
    if last & unused_bits_mask != 0 {
        return Err("is not canonical base64: the unused bits before the padding must be zero".into());
    }
    let decoded = value.len() / 4 * 3 - pad;
    if decoded > BINARY_MAX_BYTES {
        return Err(format!("decodes to {decoded} bytes; at most {BINARY_MAX_BYTES} (1 MiB)"));
    }
    Ok(())
}

/// How a record's key is checked.
#[derive(Clone, Copy, PartialEq, Eq)]
enum KeyKind {
    Enterprise,
    Population,
    Other,
}

/// The key's problem, if any, as a violation description.
fn check_key(kind: KeyKind, key: &str, key_item: &str, key_type: Option<DataType>, today: time::Date) -> Option<String> {
    match kind {
        KeyKind::Enterprise => validate_uscc(key)
            .err()
            .map(|e| format!("{} is not a valid unified social credit code ({key_item}): {e}", quote(key))),
        KeyKind::Population => validate_identity_number_on(key, today).err().map(|e| {
            // The key is not quoted, not even masked: with a date error, the masked form plus the birth
            // date quoted by IdError would spell the whole number. The field path finds the row.
            let hint = match e {
                IdError::Character { pos: 18, ch: 'x', .. } => {
                    "; only an upper-case X is a valid check character, a lower-case x is refused"
                }
                _ => "",
            };
            format!("is not a valid citizen identity number ({key_item}): {e}{hint}")
        }),
        KeyKind::Other => {
            if key.trim().is_empty() {
                return Some(format!("is required: the value of the key item {key_item}"));
            }
            let n = key.chars().count();
            if n > OTHER_KEY_MAX_CHARS {
                return Some(format!("must be at most {OTHER_KEY_MAX_CHARS} characters, got {n}"));
            }
            if let Some(e) = control_char(key, false) {
                return Some(e);
            }
            if key.trim() != key {
                return Some(format!("{} must not start or end with whitespace", quote(key)));
            }
            let t = key_type.unwrap_or(DataType::String);
            check_value(t, key).err().map(|e| format!("{} is not a valid {key_item} value: {e}", quote(key)))
        }
    }
}

/// `YYYY-MM-DD` of the birth date in a valid identity number.
fn birth_date_of(id: &str) -> String {
    format!("{}-{}-{}", &id[6..10], &id[10..12], &id[12..14])
}

/// 男 or 女, from the sequence digit (character 17) of a valid identity number.
fn sex_of(id: &str) -> &'static str {
    if (id.as_bytes()[16] - b'0') % 2 == 1 {
        "男"
    } else {
        "女"
    }
}

/// Validates a `PutRecords` batch for `entry`'s resource, as of `today` (identity numbers with a birth
/// date after it are refused). All or nothing: `Ok` holds the normalized records (each carrying its key
/// item, `updated_at_unix_ms` cleared) only when no record has any problem; otherwise `Err` lists every
/// problem of every record, in record order.
pub fn validate_batch(
    entry: &CatalogEntry,
    records: Vec<Record>,
    today: time::Date,
) -> Result<Vec<Record>, Vec<FieldViolation>> {
    if records.is_empty() {
        return Err(vec![FieldViolation::new("records", "must not be empty: send at least one record")]);
    }
    if records.len() > MAX_BATCH_RECORDS {
        return Err(vec![FieldViolation::new(
            "records",
            format!("at most {MAX_BATCH_RECORDS} records per batch, got {}; split the batch", records.len()),
        )]);
    }
    let kind = match RecordKind::try_from(entry.record_kind) {
        Ok(RecordKind::Enterprise) => KeyKind::Enterprise,
        Ok(RecordKind::Population) => KeyKind::Population,
        _ => KeyKind::Other,
    };
    let Some(key_item) = key_item(entry) else {
        return Err(vec![FieldViolation::new(
            "records",
            format!(
                "the catalog entry {} has no record kind or no key item, so its records cannot be keyed; check the catalog entry",
                entry.resource_code
            ),
        )]);
    };
    // Name → (catalog position, data type).
    let items: HashMap<&str, (usize, DataType)> = entry
        .data_items
        .iter()
        .enumerate()
        .map(|(i, d)| (d.name.as_str(), (i, DataType::try_from(d.data_type).unwrap_or(DataType::Unspecified))))
        .collect();
    let key_type = items.get(key_item).map(|(_, t)| *t);
    // Quote values, or (population records: personal data) only say what is wrong.
    let got = |value: &str| if kind == KeyKind::Population { String::new() } else { format!(", got {}", quote(value)) };

    let mut out = Vec::new();
    let mut normalized = Vec::with_capacity(records.len());
    let mut seen: HashMap<String, usize> = HashMap::with_capacity(records.len());
    for (i, mut record) in records.into_iter().enumerate() {
        let key_field = format!("records[{i}].key");
        let key_problem = check_key(kind, &record.key, key_item, key_type, today);
        let key_ok = key_problem.is_none();
        if let Some(description) = key_problem {
            out.push(FieldViolation::new(&key_field, description));
        }
        if !record.key.is_empty() {
            if let Some(&first) = seen.get(&record.key) {
                out.push(FieldViolation::new(
                    &key_field,
                    format!("duplicate key: records[{first}] has the same key; a batch holds one record per key"),
                ));
            } else {
                seen.insert(record.key.clone(), i);
            }
        }

        // Items in catalog order, unknown names last (by name), so the violations read in a stable order.
        let mut names: Vec<(&str, Option<(usize, DataType)>)> =
            record.items.keys().map(|n| (n.as_str(), items.get(n.as_str()).copied())).collect();
        names.sort_by(|a, b| (a.1.map_or(usize::MAX, |x| x.0), a.0).cmp(&(b.1.map_or(usize::MAX, |x| x.0), b.0)));
        for (name, known) in names {
            let value = record.items[name].as_str();
            let field = format!("records[{i}].items[{name}]");
            if name == key_item {
                if value != record.key {
                    let description = match kind {
                        // An invalid identity number's violation may quote its birth date; with the masked
                        // form next to it, the whole number could be read back. Quote nothing then.
                        KeyKind::Population if !key_ok => "must equal the record key".to_string(),
                        KeyKind::Population => format!(
                            "must equal the record key: the item holds {} but the key is {} (both shown masked)",
                            mask_identity_number(value),
                            mask_identity_number(&record.key)
                        ),
                        _ => format!(
                            "must equal the record key: the item holds {} but the key is {}",
                            quote(value),
                            quote(&record.key)
                        ),
                    };
                    out.push(FieldViolation::new(field, description));
                }
                continue;
            }
            let Some((_, data_type)) = known else {
                out.push(FieldViolation::new(
                    field,
                    format!(
                        "{name:?} is not a data item of {} (its catalog entry has {} data items); check the catalog entry for the exact item names",
                        entry.resource_code,
                        entry.data_items.len()
                    ),
                ));
                continue;
            };
            if let Err(e) = check_value(data_type, value) {
                out.push(FieldViolation::new(field, format!("{e}{}", got(value))));
                continue;
            }
            if value.is_empty() {
                continue;
            }
            // Cross-checks.
            match (kind, name) {
                (KeyKind::Population, BIRTH_DATE_ITEM) if key_ok && value != birth_date_of(&record.key) => {
                    out.push(FieldViolation::new(
                        field,
                        format!(
                            "does not match the birth date encoded in the identity number {} (characters 7-14, written YYYY-MM-DD)",
                            mask_identity_number(&record.key)
                        ),
                    ));
                }
                (KeyKind::Population, SEX_ITEM) => {
                    if value != "男" && value != "女" {
                        out.push(FieldViolation::new(field, "must be 男 or 女"));
                    } else if key_ok && value != sex_of(&record.key) {
                        out.push(FieldViolation::new(
                            field,
                            format!(
                                "is {value} but the identity number {} encodes {} (character 17: odd 男, even 女)",
                                mask_identity_number(&record.key),
                                sex_of(&record.key)
                            ),
                        ));
                    }
                }
                (KeyKind::Enterprise, REGISTRATION_STATUS_ITEM) if !REGISTRATION_STATUSES.contains(&value) => {
                    out.push(FieldViolation::new(
                        field,
                        format!("must be one of {}{}", REGISTRATION_STATUSES.join(" "), got(value)),
                    ));
                }
                _ => {}
            }
        }

        if out.is_empty() {
            record.items.entry(key_item.to_string()).or_insert_with(|| record.key.clone());
            record.updated_at_unix_ms = 0;
            normalized.push(record);
        }
    }
    if out.is_empty() {
        Ok(normalized)
    } else {
        Err(out)
    }
}

#[cfg(test)]
mod tests {

    use exchange_proto::v1::ShareType;

    use super::*;
    use crate::records::test_support::*;
    use crate::records::{ENTERPRISE_KEY_ITEM, POPULATION_KEY_ITEM};


    fn violations(entry: &CatalogEntry, records: Vec<Record>) -> Vec<FieldViolation> {
        validate_batch(entry, records, today()).expect_err("the batch must be refused")
    }

    fn fields(v: &[FieldViolation]) -> Vec<&str> {
        v.iter().map(|v| v.field.as_str()).collect()
    }

    fn assert_no_raw_ids(v: &[FieldViolation]) {
        for v in v {
            for id in [ID_1949, ID_1880, ID_BAD_CHECK, ID_30_FEB, ID_FUTURE, "11010519491231002x"] {
                assert!(!v.description.contains(id), "{} quotes a raw identity number: {}", v.field, v.description);
            }
        }
    }

    #[test]
    fn a_valid_enterprise_batch_is_normalized() {
        let entry = enterprise(ShareType::Unconditional);
        let second = uscc("91110105MA0000001");
        let mut first = record(
            VALID_USCC,
            &[
                ("企业名称", "福州某某科技有限公司"),
                ("法定代表人", "王五"),
                ("注册资本", "100.50"),
                ("成立日期", "2015-06-30"),
                ("登记状态", "存续"),
                ("经营范围", "软件开发；\n信息技术咨询服务"),
                ("更新时间", "2024-05-01T08:30:00+08:00"),
            ],
        );
        first.updated_at_unix_ms = 42;
        let batch = vec![first, record(&second, &[(ENTERPRISE_KEY_ITEM, &second), ("登记状态", "注销")])];
        let out = validate_batch(&entry, batch, today()).unwrap();
        assert_eq!(out.len(), 2);
        assert_eq!(out[0].items[ENTERPRISE_KEY_ITEM], VALID_USCC, "key item added");
        assert_eq!(out[0].items["注册资本"], "100.50", "values kept as sent");
        assert_eq!(out[0].items.len(), 8);
        assert_eq!(out[0].updated_at_unix_ms, 0, "the store sets it");
        assert_eq!(out[1].items[ENTERPRISE_KEY_ITEM], second);
        assert_eq!(out[1].items.len(), 2);
    }

    #[test]
    fn a_valid_population_batch_is_normalized() {
        let entry = population(ShareType::Conditional);
        let batch = vec![
            record(ID_1949, &[("姓名", "张三"), ("性别", "女"), ("出生日期", "1949-12-31"), ("民族", "汉族")]),
            record(ID_1880, &[(POPULATION_KEY_ITEM, ID_1880), ("性别", "男"), ("出生日期", "1880-01-01")]),
        ];
        let out = validate_batch(&entry, batch, today()).unwrap();
        assert_eq!(out[0].items[POPULATION_KEY_ITEM], ID_1949);
        assert_eq!(out[1].items[POPULATION_KEY_ITEM], ID_1880);
        assert_eq!(out[0].items["姓名"], "张三");
    }

    #[test]
    fn a_bad_batch_lists_every_bad_record_and_field() {
        let entry = enterprise(ShareType::Unconditional);
        let good = uscc("91110105MA0000001");
        let batch = vec![
            record(BAD_CHECK_USCC, &[("注册资本", "一百万")]),
            record(&good, &[("企业名称", "乙公司")]),
            record(VALID_USCC, &[("成立日期", "2015-02-30"), ("法人", "王五"), ("登记状态", "正常")]),
            record("91350100m000100Y43", &[(ENTERPRISE_KEY_ITEM, VALID_USCC), ("更新时间", "2024-05-01 08:30")]),
        ];
        let v = violations(&entry, batch);
        assert_eq!(
            fields(&v),
            [
                "records[0].key",
                "records[0].items[注册资本]",
                "records[2].items[成立日期]",
                "records[2].items[登记状态]",
                "records[2].items[法人]",
                "records[3].key",
                "records[3].items[统一社会信用代码]",
                "records[3].items[更新时间]",
            ]
        );
        assert!(v[0].description.contains("expected '7'"), "{}", v[0].description);
        assert!(v[1].description.contains("一百万"), "{}", v[1].description);
        assert!(v[2].description.contains("not a real calendar date"), "{}", v[2].description);
        assert!(v[3].description.contains("存续"), "{}", v[3].description);
        assert!(v[4].description.contains("has 12 data items") && v[4].description.contains("check the catalog entry"));
        assert!(v[5].description.contains("character 9"), "{}", v[5].description);
        assert!(v[6].description.contains("must equal the record key"), "{}", v[6].description);
        assert!(v[7].description.contains("RFC 3339"), "{}", v[7].description);
    }

    #[test]
    fn identity_number_keys_use_the_reference_vectors() {
        let entry = population(ShareType::Conditional);
        let batch = vec![
            record(ID_BAD_CHECK, &[]),
            record(ID_30_FEB, &[]),
            record(ID_FUTURE, &[]),
            record("11010519491231002x", &[]),
            record("1101051949123100", &[]),
            record(ID_1949, &[]),
        ];
        let v = violations(&entry, batch);
        assert_eq!(fields(&v), ["records[0].key", "records[1].key", "records[2].key", "records[3].key", "records[4].key"]);
        assert!(v[0].description.contains("expected '4'"), "{}", v[0].description);
        assert!(v[1].description.contains("not a real calendar date"), "{}", v[1].description);
        assert!(v[2].description.contains("in the future"), "{}", v[2].description);
        assert!(v[3].description.contains("lower-case x is refused"), "{}", v[3].description);
        assert!(v[4].description.contains("18 characters, got 16"), "{}", v[4].description);
        assert_no_raw_ids(&v);
        // The future vector is valid once its date has come.
        let later = time::Date::from_calendar_date(2100, time::Month::January, 1).unwrap();
        assert!(validate_batch(&entry, vec![record(ID_FUTURE, &[])], later).is_ok());
    }

    #[test]
    fn population_values_are_never_quoted_and_keys_only_masked() {
        let entry = population(ShareType::Conditional);
        let batch = vec![
            record(ID_1949, &[(POPULATION_KEY_ITEM, ID_1880), ("出生日期", "1949-12-30"), ("性别", "男")]),
            record(ID_1880, &[("姓名", "李四\u{7}"), ("出生日期", "18800101")]),
            // An invalid date is quoted by the key's violation: the masked key must not appear beside it.
            record(ID_30_FEB, &[(POPULATION_KEY_ITEM, "110105194902300021")]),
        ];
        let v = violations(&entry, batch);
        assert_eq!(
            fields(&v),
            [
                "records[0].items[公民身份号码]",
                "records[0].items[性别]",
                "records[0].items[出生日期]",
                "records[1].items[姓名]",
                "records[1].items[出生日期]",
                "records[2].key",
                "records[2].items[公民身份号码]",
            ]
        );
        assert!(v[0].description.contains("110105********002X") && v[0].description.contains("440524********0014"));
        assert!(v[5].description.contains("19490230"), "{}", v[5].description);
        assert_eq!(v[6].description, "must equal the record key");
        assert!(!v[3].description.contains("李四"), "{}", v[3].description);
        assert!(!v[4].description.contains("18800101"), "{}", v[4].description);
        assert_no_raw_ids(&v);
    }

    #[test]
    fn population_cross_checks() {
        let entry = population(ShareType::Conditional);
        // 11010519491231002X: sequence 002 → 女; 440524188001010014: sequence 001 → 男.
        let ok = vec![
            record(ID_1949, &[("性别", "女"), ("出生日期", "1949-12-31")]),
            record(ID_1880, &[("性别", "男"), ("出生日期", "1880-01-01")]),
        ];
        assert!(validate_batch(&entry, ok, today()).is_ok());
        let bad = vec![
            record(ID_1949, &[("性别", "男"), ("出生日期", "1949-12-30")]),
            record(ID_1880, &[("性别", "M")]),
            // With a bad key the cross-checks cannot run: only the key is reported.
            record(ID_BAD_CHECK, &[("性别", "女"), ("出生日期", "1990-03-07")]),
        ];
        let v = violations(&entry, bad);
        assert_eq!(
            fields(&v),
            ["records[0].items[性别]", "records[0].items[出生日期]", "records[1].items[性别]", "records[2].key"]
        );
        assert!(v[0].description.contains("encodes 女"), "{}", v[0].description);
        assert!(v[1].description.contains("birth date"), "{}", v[1].description);
        assert_eq!(v[2].description, "must be 男 or 女");
    }

    #[test]
    fn registration_status_must_be_a_known_one() {
        let entry = enterprise(ShareType::Unconditional);
        for status in REGISTRATION_STATUSES {
            assert!(validate_batch(&entry, vec![record(VALID_USCC, &[("登记状态", status)])], today()).is_ok());
        }
        let v = violations(&entry, vec![record(VALID_USCC, &[("登记状态", "开业")])]);
        assert_eq!(fields(&v), ["records[0].items[登记状态]"]);
        assert!(v[0].description.contains("开业") && v[0].description.contains("吊销"));
    }

    #[test]
    fn duplicate_keys_name_the_earlier_record() {
        let entry = enterprise(ShareType::Unconditional);
        let other = uscc("91110105MA0000001");
        let batch = vec![
            record(VALID_USCC, &[]),
            record(&other, &[]),
            record(VALID_USCC, &[]),
            record(VALID_USCC, &[]),
        ];
        let v = violations(&entry, batch);
        assert_eq!(fields(&v), ["records[2].key", "records[3].key"]);
        assert!(v[0].description.contains("records[0]") && v[1].description.contains("records[0]"));
    }

    #[test]
    fn empty_and_oversized_batches() {
        let entry = enterprise(ShareType::Unconditional);
        let v = violations(&entry, vec![]);
        assert_eq!(fields(&v), ["records"]);
        let too_many = (0..=MAX_BATCH_RECORDS).map(|_| record("x", &[])).collect();
        let v = violations(&entry, too_many);
        assert_eq!(fields(&v), ["records"], "one violation, not one per record");
        assert!(v[0].description.contains("split the batch"));
    }

    #[test]
    fn every_data_type() {
        use DataType::*;
        let long = "字".repeat(STRING_MAX_CHARS);
        let cases: &[(DataType, &str, bool)] = &[
            (String, "多行\n文本\t制表", true),
            (String, &long, true),
            (String, "响铃\u{7}", false),
            (String, "回车\r", false),
            (Integer, "42", true),
            (Integer, "-9223372036854775808", true),
            (Integer, "+7", true),
            (Integer, "9223372036854775808", false),
            (Integer, "4.2", false),
            (Integer, " 42", false),
            (Decimal, "100.50", true),
            (Decimal, "-0.000123", true),
            (Decimal, "+12", true),
            (Decimal, "123456789012345678901234567890", true),
            (Decimal, "0000123456789012345678901234567890.0", false),
            (Decimal, "1234567890123456789012345678901", false),
            (Decimal, "1.", false),
            (Decimal, ".5", false),
            (Decimal, "1e5", false),
            (Decimal, "1,000", false),
            (Decimal, "-", false),
            (Date, "2024-02-29", true),
            (Date, "2023-02-29", false),
            (Date, "2024-5-1", false),
            (Date, "2024/05/01", false),
            (Date, "2024-13-01", false),
            (Datetime, "2024-05-01T08:30:00+08:00", true),
            (Datetime, "2024-05-01T00:30:00.123Z", true),
            (Datetime, "2024-05-01T08:30:00", false),
            (Datetime, "2024-05-01 08:30:00+08:00", false),
            (Datetime, "2024-02-30T08:30:00Z", false),
            (Datetime, "2024-05-01t08:30:00Z", false),
            (Datetime, "2024-05-01X08:30:00Z", false),
            (Datetime, "2024-05-01T08:30:00z", false),
            (Datetime, "2024-05-01T08:30:00.5-05:00", true),
            (Boolean, "true", true),
            (Boolean, "false", true),
            (Boolean, "TRUE", false),
            (Boolean, "1", false),
            (Binary, "aGVsbG8=", true),
            (Binary, "aGVsbA==", true),
            (Binary, "aGVs", true),
            (Binary, "aGVsbG8", false),
            (Binary, "aGVsbG9=", false),
            (Binary, "aGVsbB==", false),
            (Binary, "aGV_bG8=", false),
            (Binary, "a===", false),
            (Binary, "aG=sbG8=", false),
        ];
        for (t, value, ok) in cases {
            assert_eq!(check_value(*t, value).is_ok(), *ok, "{t:?} {value:?}: {:?}", check_value(*t, value));
        }
        assert!(check_value(String, &format!("{long}字")).unwrap_err().contains("at most 4000"));
        let big = "A".repeat((BINARY_MAX_BYTES / 3 + 1) * 4);
        assert!(check_value(Binary, &big).unwrap_err().contains("1 MiB"));
        assert!(check_value(Binary, &"A".repeat(BINARY_MAX_BYTES / 3 * 4)).is_ok());

        // The same through a batch: one violation per bad item, with the value quoted.
        let entry = other();
        let good = record(
            "1",
            &[
                ("文本", "x"),
                ("数量", "3"),
                ("金额", "9.99"),
                ("日期", "2024-05-01"),
                ("时间", "2024-05-01T08:30:00+08:00"),
                ("有效", "true"),
                ("附件", "aGVsbG8="),
            ],
        );
        let bad = record(
            "2",
            &[
                ("文本", "\u{0}"),
                ("数量", "三"),
                ("金额", "9,99"),
                ("日期", "2024-05-32"),
                ("时间", "yesterday"),
                ("有效", "yes"),
                ("附件", "!!!!"),
            ],
        );
        let v = violations(&entry, vec![good, bad]);
        assert_eq!(
            fields(&v),
            [
                "records[1].items[文本]",
                "records[1].items[数量]",
                "records[1].items[金额]",
                "records[1].items[日期]",
                "records[1].items[时间]",
                "records[1].items[有效]",
                "records[1].items[附件]",
            ]
        );
        assert!(v[1].description.ends_with("got \"三\""), "{}", v[1].description);
    }

    #[test]
    fn empty_values_mean_no_value_except_for_the_key_item() {
        let entry = other();
        let items = ["文本", "数量", "金额", "日期", "时间", "有效", "附件"].map(|n| (n, ""));
        let out = validate_batch(&entry, vec![record("1", &items)], today()).unwrap();
        assert_eq!(out[0].items["数量"], "");
        assert_eq!(out[0].items["编号"], "1");
        let v = violations(&entry, vec![record("1", &[("编号", "")])]);
        assert_eq!(fields(&v), ["records[0].items[编号]"]);
        let population = population(ShareType::Conditional);
        let ok = vec![record(ID_1949, &[("性别", ""), ("出生日期", "")])];
        assert!(validate_batch(&population, ok, today()).is_ok(), "no cross-check on an absent value");
    }

    #[test]
    fn other_keys() {
        let entry = other(); // keyed by 编号, an integer
        let v = violations(
            &entry,
            vec![
                record("", &[]),
                record(" 7", &[]),
                record("7\u{0}", &[]),
                record("七", &[]),
                record(&"1".repeat(OTHER_KEY_MAX_CHARS + 1), &[]),
                record("7", &[]),
            ],
        );
        assert_eq!(fields(&v), ["records[0].key", "records[1].key", "records[2].key", "records[3].key", "records[4].key"]);
        assert!(v[0].description.contains("is required"));
        assert!(v[1].description.contains("whitespace"));
        assert!(v[2].description.contains("control character"));
        assert!(v[3].description.contains("whole number"));
        assert!(v[4].description.contains("at most 128"));
        // A string key item takes any text.
        let mut text_keyed = other();
        text_keyed.key_item = "文本".into();
        let out = validate_batch(&text_keyed, vec![record("粤B·12345", &[])], today()).unwrap();
        assert_eq!(out[0].items["文本"], "粤B·12345");
        // An entry without a usable key item cannot take records.
        let mut broken = other();
        broken.key_item.clear();
        assert_eq!(fields(&violations(&broken, vec![record("1", &[])])), ["records"]);
    }
}
