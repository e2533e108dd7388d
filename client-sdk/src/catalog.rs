//! Catalog entries as people write and read them: TOML files a department maintains
//! (`deploy/local/catalog/*.toml`) and the `--json` output of `exchangectl`.
//!
//! The wire type [`CatalogEntry`] stores enums as `i32`; here they are lower-case English words
//! (`share_type = "conditional"`), so a file can be read and reviewed without the proto at hand. The
//! spec keeps those words as plain strings and checks them in the conversion to [`CatalogEntry`] rather
//! than in serde: the error then names the entry and the field (`entry 101/000001: share_type
//! "condtional" is not one of ...`) instead of a line and column, and one pass reports every bad value
//! in a file at once.
//!
//! Only the enums are checked here. Everything else (code format, required conditions, dates, the
//! provider matching the certificate) is the directory's job: it is the one place the rules live, and it
//! answers with a field violation per problem.
//!
//! A file looks like this:
//!
//! ```toml
//! [[entries]]
//! resource_code = "101/000001"
//! name = "企业登记信息"
//! summary = "..."
//! provider_code = "commerce"
//! provider_name = "市市场监督管理局"
//! classification = "101"
//! format = "database table"
//! share_type = "unconditional"
//! share_methods = ["pull_query", "bulk_file"]
//! open_attribute = "open"
//! update_cycle = "daily"
//! publish_date = "2025-03-01"      # a bare TOML date (2025-03-01) works too
//! record_kind = "enterprise"
//!
//! [[entries.data_items]]
//! name = "统一社会信用代码"
//! data_type = "string"
//! ```

use std::fmt;
use std::path::{Path, PathBuf};

use exchange_proto::v1::{
    CatalogEntry, DataItem, DataType, OpenAttribute, RecordKind, ShareMethod, ShareType, UpdateCycle,
};
use serde::{Deserialize, Deserializer, Serialize};

/// A table from the words used in files to a proto enum, with the list of accepted words for messages.
pub struct EnumWords<E: 'static> {
    /// The field name as it appears in files, used in error messages.
    pub field: &'static str,
    pub words: &'static [(&'static str, E)],
}

impl<E: Copy + PartialEq + Into<i32>> EnumWords<E> {
    /// The enum value for `word`; only the exact lower-case words are accepted.
    pub fn parse(&self, word: &str) -> Option<E> {
        self.words.iter().find(|(w, _)| *w == word).map(|(_, e)| *e)
    }

    /// The word for a wire value; `unspecified` for 0 and `unknown(N)` for values this build does not know
    /// (a newer directory may send them), so displaying an entry never fails.
    pub fn word(&self, value: i32) -> String {
        match self.words.iter().find(|(_, e)| (*e).into() == value) {
            Some((w, _)) => (*w).to_string(),
            None if value == 0 => "unspecified".to_string(),
            None => format!("unknown({value})"),
        }
    }

    /// The accepted words, `a|b|c`, for help texts and errors.
    pub fn choices(&self) -> String {
        self.words.iter().map(|(w, _)| *w).collect::<Vec<_>>().join("|")
    }

    fn parse_field(&self, entry: &str, field: String, word: &str) -> Result<E, CatalogError> {
        self.parse(word).ok_or_else(|| CatalogError::UnknownWord {
            entry: entry.to_string(),
            field,
            value: word.to_string(),
            expected: self.choices(),
        })
    }
}

pub const SHARE_TYPES: EnumWords<ShareType> = EnumWords {
    field: "share_type",
    words: &[
        ("unconditional", ShareType::Unconditional),
        ("conditional", ShareType::Conditional),
        ("not_shared", ShareType::NotShared),
    ],
};

pub const SHARE_METHODS: EnumWords<ShareMethod> = EnumWords {
    field: "share_methods",
    words: &[
        ("pull_query", ShareMethod::PullQuery),
        ("push_subscription", ShareMethod::PushSubscription),
        ("bulk_file", ShareMethod::BulkFile),
    ],
};

pub const OPEN_ATTRIBUTES: EnumWords<OpenAttribute> = EnumWords {
    field: "open_attribute",
    words: &[
        ("open", OpenAttribute::Open),
        ("conditionally_open", OpenAttribute::ConditionallyOpen),
        ("not_open", OpenAttribute::NotOpen),
    ],
};

pub const UPDATE_CYCLES: EnumWords<UpdateCycle> = EnumWords {
    field: "update_cycle",
    words: &[
        ("real_time", UpdateCycle::RealTime),
        ("daily", UpdateCycle::Daily),
        ("weekly", UpdateCycle::Weekly),
        ("monthly", UpdateCycle::Monthly),
        ("quarterly", UpdateCycle::Quarterly),
        ("yearly", UpdateCycle::Yearly),
        ("irregular", UpdateCycle::Irregular),
    ],
};

pub const RECORD_KINDS: EnumWords<RecordKind> = EnumWords {
    field: "record_kind",
    words: &[
        ("enterprise", RecordKind::Enterprise),
        ("population", RecordKind::Population),
        ("other", RecordKind::Other),
    ],
};

pub const DATA_TYPES: EnumWords<DataType> = EnumWords {
    field: "data_type",
    words: &[
        ("string", DataType::String),
        ("integer", DataType::Integer),
        ("decimal", DataType::Decimal),
        ("date", DataType::Date),
        ("datetime", DataType::Datetime),
        ("boolean", DataType::Boolean),
        ("binary", DataType::Binary),
    ],
};

#[derive(Debug, thiserror::Error)]
pub enum CatalogError {
    /// An enum field holds a word that is not one of the accepted ones.
    #[error("entry {entry}: {field} {value:?} is not one of {expected}")]
    UnknownWord { entry: String, field: String, value: String, expected: String },
    #[error("{path}: {reason}")]
    File { path: PathBuf, reason: String },
    /// Several problems in one file, each on its own line.
    #[error("{path}: {} problem(s):{}", .errors.len(), fmt_list(.errors))]
    Invalid { path: PathBuf, errors: Vec<CatalogError> },
}

fn fmt_list(errors: &[CatalogError]) -> String {
    errors.iter().map(|e| format!("\n  - {e}")).collect()
}

/// One information item (信息项) of an entry.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DataItemSpec {
    pub name: String,
    /// `string|integer|decimal|date|datetime|boolean|binary`
    pub data_type: String,
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub description: String,
}

/// One catalog entry (政务信息资源目录条目) as written in a file or printed with `--json`.
///
/// Unknown field names are refused: in a hand-edited file a misspelt optional field
/// (`share_conditon`) would otherwise vanish silently.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CatalogEntrySpec {
    /// 信息资源代码, `<classification>/<6-digit sequence>`.
    pub resource_code: String,
    /// 名称
    pub name: String,
    /// 摘要
    #[serde(default)]
    pub summary: String,
    /// Department code; must equal the department in the publisher's certificate.
    pub provider_code: String,
    /// 提供方, e.g. 市税务局
    #[serde(default)]
    pub provider_name: String,
    /// 分类: 1, 3, 6 or 9 digits; the resource code starts with it.
    pub classification: String,
    /// 格式: `database table`, `API`, `file`...
    #[serde(default)]
    pub format: String,
    #[serde(default)]
    pub data_items: Vec<DataItemSpec>,
    /// `unconditional|conditional|not_shared`
    pub share_type: String,
    /// What a requester must state or hold (conditional), or the legal basis (not_shared).
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub share_condition: String,
    /// `pull_query|push_subscription|bulk_file`
    #[serde(default)]
    pub share_methods: Vec<String>,
    /// `open|conditionally_open|not_open`
    pub open_attribute: String,
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub open_condition: String,
    /// `real_time|daily|weekly|monthly|quarterly|yearly|irregular`
    pub update_cycle: String,
    /// `YYYY-MM-DD`. In TOML either a string or a bare date.
    #[serde(deserialize_with = "date_string")]
    pub publish_date: String,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub related_resource_codes: Vec<String>,
    /// `enterprise|population|other`
    pub record_kind: String,
    /// For `record_kind = "other"`: the data item that keys a record.
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub key_item: String,
    /// Set by the directory (shown in output, ignored when publishing).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub version: Option<u64>,
    /// Set by the directory on a withdrawal tombstone (shown in output, ignored when publishing).
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub withdrawn: bool,
}

/// Accepts `"2025-03-01"` and, in TOML, the bare date `2025-03-01`, which people write naturally and
/// which TOML parses as a date rather than a string.
fn date_string<'de, D: Deserializer<'de>>(d: D) -> Result<String, D::Error> {
    #[derive(Deserialize)]
    #[serde(untagged)]
    enum DateOrString {
        Text(String),
        Date(toml::value::Datetime),
    }
    Ok(match DateOrString::deserialize(d)? {
        DateOrString::Text(s) => s,
        DateOrString::Date(dt) => dt.to_string(),
    })
}

impl CatalogEntrySpec {
    /// How an entry is named in messages: its resource code, or its name when the code is missing.
    pub fn label(&self) -> String {
        if !self.resource_code.is_empty() {
            self.resource_code.clone()
        } else if !self.name.is_empty() {
            format!("{:?}", self.name)
        } else {
            "(no resource code)".to_string()
        }
    }

    /// Converts to the wire type, collecting every bad enum word instead of stopping at the first.
    pub fn to_entry(&self) -> Result<CatalogEntry, Vec<CatalogError>> {
        let label = self.label();
        let mut errors = Vec::new();
        let mut check = |r: Result<i32, CatalogError>| match r {
            Ok(v) => v,
            Err(e) => {
                errors.push(e);
                0
            }
        };
        let share_type =
            check(SHARE_TYPES.parse_field(&label, SHARE_TYPES.field.into(), &self.share_type).map(Into::into));
        let share_methods = self
            .share_methods
            .iter()
            .enumerate()
            .map(|(i, w)| {
                check(SHARE_METHODS.parse_field(&label, format!("share_methods[{i}]"), w).map(Into::into))
            })
            .collect();
        let open_attribute = check(
            OPEN_ATTRIBUTES.parse_field(&label, OPEN_ATTRIBUTES.field.into(), &self.open_attribute).map(Into::into),
        );
        let update_cycle = check(
            UPDATE_CYCLES.parse_field(&label, UPDATE_CYCLES.field.into(), &self.update_cycle).map(Into::into),
        );
        let record_kind =
            check(RECORD_KINDS.parse_field(&label, RECORD_KINDS.field.into(), &self.record_kind).map(Into::into));
        let data_items = self
            .data_items
            .iter()
            .enumerate()
            .map(|(i, item)| DataItem {
                name: item.name.clone(),
                data_type: check(
                    DATA_TYPES
                        .parse_field(&label, format!("data_items[{i}].data_type"), &item.data_type)
                        .map(Into::into),
                ),
                description: item.description.clone(),
            })
            .collect();
        if !errors.is_empty() {
            return Err(errors);
        }
        Ok(CatalogEntry {
            resource_code: self.resource_code.clone(),
            name: self.name.clone(),
            summary: self.summary.clone(),
            provider_code: self.provider_code.clone(),
            provider_name: self.provider_name.clone(),
            classification: self.classification.clone(),
            format: self.format.clone(),
            data_items,
            share_type,
            share_condition: self.share_condition.clone(),
            share_methods,
            open_attribute,
            open_condition: self.open_condition.clone(),
            update_cycle,
            publish_date: self.publish_date.clone(),
            related_resource_codes: self.related_resource_codes.clone(),
            record_kind,
            key_item: self.key_item.clone(),
            // Set by the directory; a file made from `--json` output may carry them, they mean nothing here.
            version: 0,
            withdrawn: false,
        })
    }
}

/// The first bad enum word of the entry; [`CatalogEntrySpec::to_entry`] gives all of them.
impl TryFrom<CatalogEntrySpec> for CatalogEntry {
    type Error = CatalogError;
    fn try_from(spec: CatalogEntrySpec) -> Result<Self, Self::Error> {
        spec.to_entry().map_err(|mut errors| errors.remove(0))
    }
}

impl From<&CatalogEntry> for CatalogEntrySpec {
    fn from(e: &CatalogEntry) -> Self {
        CatalogEntrySpec {
            resource_code: e.resource_code.clone(),
            name: e.name.clone(),
            summary: e.summary.clone(),
            provider_code: e.provider_code.clone(),
            provider_name: e.provider_name.clone(),
            classification: e.classification.clone(),
            format: e.format.clone(),
            data_items: e
                .data_items
                .iter()
                .map(|d| DataItemSpec {
                    name: d.name.clone(),
                    data_type: DATA_TYPES.word(d.data_type),
                    description: d.description.clone(),
                })
                .collect(),
            share_type: SHARE_TYPES.word(e.share_type),
            share_condition: e.share_condition.clone(),
            share_methods: e.share_methods.iter().map(|m| SHARE_METHODS.word(*m)).collect(),
            open_attribute: OPEN_ATTRIBUTES.word(e.open_attribute),
            open_condition: e.open_condition.clone(),
            update_cycle: UPDATE_CYCLES.word(e.update_cycle),
            publish_date: e.publish_date.clone(),
            related_resource_codes: e.related_resource_codes.clone(),
            record_kind: RECORD_KINDS.word(e.record_kind),
            key_item: e.key_item.clone(),
            version: (e.version != 0).then_some(e.version),
            withdrawn: e.withdrawn,
        }
    }
}

impl From<CatalogEntry> for CatalogEntrySpec {
    fn from(e: CatalogEntry) -> Self {
        CatalogEntrySpec::from(&e)
    }
}

/// A catalog file: `[[entries]]` tables, each with `[[entries.data_items]]`.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CatalogFile {
    #[serde(default)]
    pub entries: Vec<CatalogEntrySpec>,
}

impl CatalogFile {
    /// Parses TOML text.
    pub fn from_toml(text: &str) -> Result<Self, toml::de::Error> {
        toml::from_str(text)
    }

    /// Reads and parses a TOML file.
    pub fn load(path: &Path) -> Result<Self, CatalogError> {
        let file_err = |reason: String| CatalogError::File { path: path.to_path_buf(), reason };
        let text = std::fs::read_to_string(path).map_err(|e| file_err(e.to_string()))?;
        Self::from_toml(&text).map_err(|e| file_err(e.to_string()))
    }

    /// Converts every entry to the wire type, or reports every bad enum word in the file (`path` is only
    /// used to name the file in the error).
    pub fn to_entries(&self, path: &Path) -> Result<Vec<CatalogEntry>, CatalogError> {
        let mut entries = Vec::with_capacity(self.entries.len());
        let mut errors = Vec::new();
        for spec in &self.entries {
            match spec.to_entry() {
                Ok(e) => entries.push(e),
                Err(mut errs) => errors.append(&mut errs),
            }
        }
        if errors.is_empty() {
            Ok(entries)
        } else {
            Err(CatalogError::Invalid { path: path.to_path_buf(), errors })
        }
    }

    /// [`CatalogFile::load`] then [`CatalogFile::to_entries`]: what `exchangectl catalog publish` and the
    /// node's `catalog_file` do.
    pub fn load_entries(path: &Path) -> Result<Vec<CatalogEntry>, CatalogError> {
        Self::load(path)?.to_entries(path)
    }
}

impl fmt::Display for CatalogEntrySpec {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{} {}", self.resource_code, self.name)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const SAMPLE: &str = r#"
[[entries]]
resource_code = "101/000001"
name = "企业登记信息"
summary = "企业设立、变更、注销登记的基本信息"
provider_code = "commerce"
provider_name = "市市场监督管理局"
classification = "101"
format = "database table"
share_type = "conditional"
share_condition = "需提供行政执法依据"
share_methods = ["pull_query", "bulk_file"]
open_attribute = "conditionally_open"
open_condition = "仅开放企业名称与登记状态"
update_cycle = "daily"
publish_date = 2025-03-01
related_resource_codes = ["101/000002"]
record_kind = "enterprise"

[[entries.data_items]]
name = "统一社会信用代码"
data_type = "string"
description = "GB 32100-2015"

[[entries.data_items]]
name = "成立日期"
data_type = "date"
"#;

    fn sample_entry() -> CatalogEntry {
        let file = CatalogFile::from_toml(SAMPLE).unwrap();
        file.to_entries(Path::new("sample.toml")).unwrap().remove(0)
    }

    #[test]
    fn toml_parses_to_wire_entry() {
        let e = sample_entry();
        assert_eq!(e.resource_code, "101/000001");
        assert_eq!(e.share_type, ShareType::Conditional as i32);
        assert_eq!(e.share_methods, vec![ShareMethod::PullQuery as i32, ShareMethod::BulkFile as i32]);
        assert_eq!(e.open_attribute, OpenAttribute::ConditionallyOpen as i32);
        assert_eq!(e.update_cycle, UpdateCycle::Daily as i32);
        assert_eq!(e.record_kind, RecordKind::Enterprise as i32);
        assert_eq!(e.publish_date, "2025-03-01", "a bare TOML date becomes YYYY-MM-DD");
        assert_eq!(e.data_items[0].data_type, DataType::String as i32);
        assert_eq!(e.data_items[1].data_type, DataType::Date as i32);
        assert_eq!(e.data_items[0].description, "GB 32100-2015");
    }

    #[test]
    fn round_trip_wire_spec_json_toml() {
        let mut wire = sample_entry();
        wire.version = 42;
        let spec = CatalogEntrySpec::from(&wire);
        assert_eq!(spec.version, Some(42));
        assert!(!spec.withdrawn);

        // JSON (what `--json` prints) parses back to the same spec.
        let json = serde_json::to_string(&spec).unwrap();
        let from_json: CatalogEntrySpec = serde_json::from_str(&json).unwrap();
        assert_eq!(from_json, spec);

        // TOML written from the spec parses back too.
        let file = CatalogFile { entries: vec![spec.clone()] };
        let text = toml::to_string(&file).unwrap();
        assert_eq!(CatalogFile::from_toml(&text).unwrap(), file);

        // Back to the wire: everything but the directory-set fields survives.
        let back = CatalogEntry::try_from(spec).unwrap();
        assert_eq!(back, CatalogEntry { version: 0, ..wire });
    }

    #[test]
    fn tombstone_shows_withdrawn_in_json() {
        let mut wire = sample_entry();
        wire.withdrawn = true;
        wire.version = 7;
        let json = serde_json::to_value(CatalogEntrySpec::from(&wire)).unwrap();
        assert_eq!(json["withdrawn"], true);
        assert_eq!(json["version"], 7);
        assert_eq!(json["share_type"], "conditional");
        assert_eq!(json["data_items"][0]["data_type"], "string");
    }

    #[test]
    fn bad_enum_word_names_entry_and_field() {
        let text = SAMPLE.replace("share_type = \"conditional\"", "share_type = \"condtional\"");
        let spec = CatalogFile::from_toml(&text).unwrap().entries.remove(0);
        let err = CatalogEntry::try_from(spec).unwrap_err();
        let msg = err.to_string();
        assert!(msg.contains("101/000001"), "{msg}");
        assert!(msg.contains("share_type"), "{msg}");
        assert!(msg.contains("condtional"), "{msg}");
        assert!(msg.contains("unconditional|conditional|not_shared"), "{msg}");
    }

    #[test]
    fn every_bad_word_in_a_file_is_reported() {
        let text = SAMPLE
            .replace("\"bulk_file\"", "\"ftp\"")
            .replace("data_type = \"date\"", "data_type = \"Date\"")
            .replace("update_cycle = \"daily\"", "update_cycle = \"UPDATE_CYCLE_DAILY\"");
        let err = CatalogFile::from_toml(&text).unwrap().to_entries(Path::new("x.toml")).unwrap_err();
        let CatalogError::Invalid { errors, .. } = &err else { panic!("{err}") };
        let fields: Vec<String> = errors
            .iter()
            .map(|e| match e {
                CatalogError::UnknownWord { field, .. } => field.clone(),
                other => panic!("{other}"),
            })
            .collect();
        assert_eq!(fields, ["share_methods[1]", "update_cycle", "data_items[1].data_type"]);
        assert!(err.to_string().contains("x.toml: 3 problem(s)"), "{err}");
    }

    #[test]
    fn unknown_field_is_refused() {
        let text = SAMPLE.replace("share_condition =", "share_conditon =");
        let err = CatalogFile::from_toml(&text).unwrap_err().to_string();
        assert!(err.contains("share_conditon"), "{err}");
    }

    #[test]
    fn unknown_wire_values_display_without_failing() {
        assert_eq!(SHARE_TYPES.word(0), "unspecified");
        assert_eq!(SHARE_TYPES.word(99), "unknown(99)");
        assert_eq!(SHARE_TYPES.word(3), "not_shared");
        assert!(SHARE_TYPES.parse("unspecified").is_none());
    }

    fn sample_file(name: &str) -> PathBuf {
        Path::new(env!("CARGO_MANIFEST_DIR")).join("../deploy/local/catalog").join(name)
    }

    /// The shipped sample catalogs parse, convert and follow the conventions the directory enforces, so
    /// a quick start does not fail on them.
    #[test]
    fn sample_catalogs_parse_and_follow_the_rules() {
        let mut codes = std::collections::HashSet::new();
        let mut share_types = std::collections::HashSet::new();
        let samples = [("tax.toml", "tax"), ("commerce.toml", "commerce"), ("quality.toml", "quality"), ("police.toml", "police")];
        for (file, dept) in samples {
            let path = sample_file(file);
            let entries = CatalogFile::load_entries(&path).unwrap_or_else(|e| panic!("{e}"));
            assert!((3..=10).contains(&entries.len()), "{file}: {} entries", entries.len());
            for e in &entries {
                let at = format!("{file} {}", e.resource_code);
                assert_eq!(e.provider_code, dept, "{at}");
                assert!(codes.insert(e.resource_code.clone()), "{at}: duplicate code");
                share_types.insert(e.share_type);
                let class = &e.classification;
                assert!([1, 3, 6, 9].contains(&class.len()) && class.chars().all(|c| c.is_ascii_digit()), "{at}");
                assert!(matches!(&class[..1], "1" | "2" | "3"), "{at}");
                let (prefix, seq) = e.resource_code.split_once('/').expect("code has a slash");
                assert!(prefix.starts_with(class.as_str()), "{at}: code must start with its classification");
                assert!(prefix.len() == class.len(), "{at}: code prefix is the classification");
                assert!(seq.len() == 6 && seq.chars().all(|c| c.is_ascii_digit()), "{at}");
                assert!(!e.data_items.is_empty(), "{at}");
                assert!(e.data_items.iter().all(|d| d.data_type != 0), "{at}");
                let date = &e.publish_date;
                assert!(date.len() == 10 && date.as_str() >= "2025-01-01" && date.as_str() <= "2026-11-22", "{at}");
                if e.share_type != ShareType::Unconditional as i32 {
                    assert!(!e.share_condition.is_empty(), "{at}: condition or legal basis");
                }
                if e.open_attribute == OpenAttribute::ConditionallyOpen as i32 {
                    assert!(!e.open_condition.is_empty(), "{at}");
                }
                if e.record_kind == RecordKind::Enterprise as i32 {
                    assert!(e.data_items.iter().any(|d| d.name == "统一社会信用代码"), "{at}");
                }
                if e.record_kind == RecordKind::Population as i32 {
                    assert!(e.data_items.iter().any(|d| d.name == "公民身份号码"), "{at}");
                }
                if e.record_kind == RecordKind::Other as i32 {
                    assert!(e.data_items.iter().any(|d| d.name == e.key_item), "{at}: key_item is a data item");
                }
                assert!(!e.share_methods.is_empty(), "{at}");
            }
        }
        assert_eq!(share_types.len(), 3, "all three share types appear across the samples");
    }
}
