//! Request validation: the catalog field rules of `shared/reference/catalog-metadata.md` (GB/T 21063), node
//! addresses and search filters.
//!
//! Validators collect *every* problem rather than stopping at the first, one [`Violation`] per bad field,
//! named by its path in the request (`entries[3].data_items[0].name`), so a publisher fixes a whole batch in
//! one round. They are pure functions (today's date is a parameter) so they are unit-tested here.
//!
//! Decisions the reference leaves open:
//! - `version` from a publisher is ignored (the store sets it), so an entry read with `GetEntry` can be
//!   edited and published back; `withdrawn = true` is refused, since silently publishing a live entry when
//!   the caller meant to withdraw it would be worse than an error (use `WithdrawEntries`).
//! - "Non-empty" means not blank: whitespace-only text counts as empty.
//! - Control characters are refused everywhere, except line feed and tab in the free-text fields
//!   (summary, conditions, data item descriptions).
//! - Lengths are counted in characters (Unicode scalar values), not bytes, since most text is Chinese.
//! - Upper bounds the reference does not give: provider name and format 200, share/open conditions and data
//!   item descriptions 2000, related resource codes 100.
//! - "Not in the future" for `publish_date` is judged in China Standard Time (UTC+8), the publishers' clock.

use std::collections::HashMap;

use chrono::NaiveDate;
use exchange_proto::limits::MAX_BATCH_ENTRIES;
use exchange_proto::v1::{
    CatalogEntry, DataType, OpenAttribute, RecordKind, SearchCatalogRequest, ShareMethod, ShareType, UpdateCycle,
};

use crate::error::Violation;

pub const NAME_MAX_CHARS: usize = 200;
pub const SUMMARY_MAX_CHARS: usize = 2000;
pub const PROVIDER_NAME_MAX_CHARS: usize = 200;
pub const FORMAT_MAX_CHARS: usize = 200;
pub const CONDITION_MAX_CHARS: usize = 2000;
pub const DATA_ITEMS_MAX: usize = 500;
pub const DATA_ITEM_NAME_MAX_CHARS: usize = 64;
pub const DATA_ITEM_DESCRIPTION_MAX_CHARS: usize = 2000;
pub const RELATED_CODES_MAX: usize = 100;
pub const SOFTWARE_VERSION_MAX_CHARS: usize = 64;

/// The data item that keys an enterprise record (unified social credit code).
pub const ENTERPRISE_KEY_ITEM: &str = "统一社会信用代码";
/// The data item that keys a population record (citizen identity number).
pub const POPULATION_KEY_ITEM: &str = "公民身份号码";

/// Today's date in China Standard Time.
pub fn today_cst() -> NaiveDate {
    (chrono::Utc::now() + chrono::Duration::hours(8)).date_naive()
}

/// Checks a classification code: 1, 3, 6 or 9 ASCII digits, the first 1 (base), 2 (thematic) or
/// 3 (departmental).
pub fn check_classification(c: &str) -> Result<(), String> {
    if !matches!(c.len(), 1 | 3 | 6 | 9) || !c.bytes().all(|b| b.is_ascii_digit()) {
        return Err(format!("must be 1, 3, 6 or 9 digits (class, item, category, sub-category), got {c:?}"));
    }
    if !matches!(c.as_bytes()[0], b'1' | b'2' | b'3') {
        return Err(format!("must start with 1 (base), 2 (thematic) or 3 (departmental), got {c:?}"));
    }
    Ok(())
}

/// Splits a resource code `<classification>/<6-digit sequence>` into its classification, checking both parts.
pub fn parse_resource_code(code: &str) -> Result<&str, String> {
    let Some((class, seq)) = code.split_once('/') else {
        return Err(format!("must be <classification>/<6-digit sequence>, e.g. 101001/000001; got {code:?}"));
    };
    check_classification(class).map_err(|e| format!("classification part {e}"))?;
    if seq.len() != 6 || !seq.bytes().all(|b| b.is_ascii_digit()) {
        return Err(format!("sequence part must be exactly 6 digits, got {seq:?}"));
    }
    Ok(class)
}

/// Checks a text field: not blank when required, within `max` characters, no control characters (line
/// feed and tab allowed when `multiline`).
fn check_text(value: &str, required: bool, max: usize, multiline: bool) -> Result<(), String> {
    if required && value.trim().is_empty() {
        return Err("is required".into());
    }
    let count = value.chars().count();
    if count > max {
        return Err(format!("must be at most {max} characters, got {count}"));
    }
    if let Some((pos, ch)) =
        value.chars().enumerate().find(|(_, c)| c.is_control() && !(multiline && (*c == '\n' || *c == '\t')))
    {
        return Err(format!("contains control character U+{:04X} at character {pos}", ch as u32));
    }
    Ok(())
}

/// Collects violations under a common path prefix.
struct Collector<'a> {
    prefix: String,
    out: &'a mut Vec<Violation>,
}

impl Collector<'_> {
    fn check(&mut self, field: &str, result: Result<(), String>) {
        if let Err(description) = result {
            self.push(field, description);
        }
    }
    fn push(&mut self, field: &str, description: impl Into<String>) {
        self.out.push(Violation::new(format!("{}.{field}", self.prefix), description));
    }
}

/// A set enum: known and not UNSPECIFIED.
fn check_enum<E: TryFrom<i32>>(value: i32, what: &str) -> Result<E, String> {
    if value == 0 {
        return Err(format!("must be set (the {what} is UNSPECIFIED)"));
    }
    E::try_from(value).map_err(|_| format!("unknown {what} value {value}"))
}

fn check_date_not_future(date: &str, today: NaiveDate) -> Result<(), String> {
    let b = date.as_bytes();
    let shape_ok = b.len() == 10
        && b[4] == b'-'
        && b[7] == b'-'
        && b.iter().enumerate().all(|(i, c)| i == 4 || i == 7 || c.is_ascii_digit());
    if !shape_ok {
        return Err(format!("must be a date YYYY-MM-DD, got {date:?}"));
    }
    let parsed = NaiveDate::parse_from_str(date, "%Y-%m-%d").map_err(|_| format!("{date} is not a calendar date"))?;
    if parsed > today {
        return Err(format!("{date} is in the future (today is {today} in China Standard Time)"));
    }
    Ok(())
}

/// Validates one entry; `prefix` is its path in the request (`entries[3]`).
pub fn check_entry(entry: &CatalogEntry, prefix: &str, today: NaiveDate, out: &mut Vec<Violation>) {
    let mut c = Collector { prefix: prefix.to_string(), out };

    let class_ok = check_classification(&entry.classification);
    let class_valid = class_ok.is_ok();
    c.check("classification", class_ok);
    match parse_resource_code(&entry.resource_code) {
        Err(e) => c.push("resource_code", e),
        Ok(class) if class_valid && class != entry.classification => c.push(
            "resource_code",
            format!(
                "must start with the entry's classification {:?} followed by '/', got {:?}",
                entry.classification, entry.resource_code
            ),
        ),
        Ok(_) => {}
    }

    c.check("name", check_text(&entry.name, true, NAME_MAX_CHARS, false));
    c.check("summary", check_text(&entry.summary, true, SUMMARY_MAX_CHARS, true));
    c.check(
        "provider_code",
        client_sdk::identity::validate_department(&entry.provider_code).map_err(|e| e.to_string()),
    );
    c.check("provider_name", check_text(&entry.provider_name, true, PROVIDER_NAME_MAX_CHARS, false));
    c.check("format", check_text(&entry.format, true, FORMAT_MAX_CHARS, false));

    // Data items.
    if entry.data_items.is_empty() {
        c.push("data_items", "at least one data item is required");
    } else if entry.data_items.len() > DATA_ITEMS_MAX {
        c.push("data_items", format!("at most {DATA_ITEMS_MAX} data items, got {}", entry.data_items.len()));
    }
    let mut item_names: HashMap<&str, usize> = HashMap::new();
    for (i, item) in entry.data_items.iter().enumerate() {
        let f = |name: &str| format!("data_items[{i}].{name}");
        match check_text(&item.name, true, DATA_ITEM_NAME_MAX_CHARS, false) {
            Err(e) => c.push(&f("name"), e),
            Ok(()) => {
                if let Some(first) = item_names.insert(item.name.as_str(), i) {
                    item_names.insert(item.name.as_str(), first);
                    c.push(&f("name"), format!("duplicate data item name {:?} (also data_items[{first}])", item.name));
                }
            }
        }
        c.check(&f("data_type"), check_enum::<DataType>(item.data_type, "data type").map(drop));
        c.check(&f("description"), check_text(&item.description, false, DATA_ITEM_DESCRIPTION_MAX_CHARS, true));
    }

    // Sharing terms.
    let share_type = check_enum::<ShareType>(entry.share_type, "share type");
    let condition_needed = matches!(share_type, Ok(ShareType::Conditional | ShareType::NotShared));
    c.check("share_type", share_type.as_ref().map(drop).map_err(Clone::clone));
    let condition = check_text(&entry.share_condition, condition_needed, CONDITION_MAX_CHARS, true).map_err(|e| {
        if condition_needed && entry.share_condition.trim().is_empty() {
            "is required for conditional sharing (the condition) and for not-shared resources (the legal basis)"
                .to_string()
        } else {
            e
        }
    });
    c.check("share_condition", condition);
    let not_shared = matches!(share_type, Ok(ShareType::NotShared));
    if entry.share_methods.is_empty() && !not_shared {
        c.push("share_methods", "at least one share method is required unless the resource is not shared");
    }
    for (i, m) in entry.share_methods.iter().enumerate() {
        let field = format!("share_methods[{i}]");
        match check_enum::<ShareMethod>(*m, "share method") {
            Err(e) => c.push(&field, e),
            Ok(_) => {
                if let Some(first) = entry.share_methods[..i].iter().position(|x| x == m) {
                    c.push(&field, format!("duplicate of share_methods[{first}]"));
                }
            }
        }
    }

    let open = check_enum::<OpenAttribute>(entry.open_attribute, "open attribute");
    let open_condition_needed = matches!(open, Ok(OpenAttribute::ConditionallyOpen));
    c.check("open_attribute", open.map(drop));
    let open_condition =
        check_text(&entry.open_condition, open_condition_needed, CONDITION_MAX_CHARS, true).map_err(|e| {
            if open_condition_needed && entry.open_condition.trim().is_empty() {
                "is required when the resource is conditionally open".to_string()
            } else {
                e
            }
        });
    c.check("open_condition", open_condition);

    c.check("update_cycle", check_enum::<UpdateCycle>(entry.update_cycle, "update cycle").map(drop));
    c.check("publish_date", check_date_not_future(&entry.publish_date, today));

    // Related resources.
    if entry.related_resource_codes.len() > RELATED_CODES_MAX {
        c.push(
            "related_resource_codes",
            format!("at most {RELATED_CODES_MAX} related codes, got {}", entry.related_resource_codes.len()),
        );
    }
    for (i, code) in entry.related_resource_codes.iter().enumerate() {
        let field = format!("related_resource_codes[{i}]");
        if let Err(e) = parse_resource_code(code) {
            c.push(&field, e);
        } else if code == &entry.resource_code {
            c.push(&field, "an entry cannot be related to itself");
        } else if let Some(first) = entry.related_resource_codes[..i].iter().position(|x| x == code) {
            c.push(&field, format!("duplicate of related_resource_codes[{first}]"));
        }
    }

    // Record kind and the key item.
    let names_item = |name: &str| entry.data_items.iter().any(|d| d.name == name);
    let key_item_ok = check_text(&entry.key_item, false, DATA_ITEM_NAME_MAX_CHARS, false);
    if let Err(e) = key_item_ok {
        c.push("key_item", e);
    } else if !entry.key_item.is_empty() && !names_item(&entry.key_item) {
        c.push("key_item", format!("{:?} is not one of this entry's data items", entry.key_item));
    }
    match check_enum::<RecordKind>(entry.record_kind, "record kind") {
        Err(e) => c.push("record_kind", e),
        Ok(RecordKind::Enterprise) if entry.key_item.is_empty() && !names_item(ENTERPRISE_KEY_ITEM) => {
            c.push(
                "key_item",
                format!("enterprise records need a data item named {ENTERPRISE_KEY_ITEM}, or key_item naming the data item that keys a record"),
            )
        }
        Ok(RecordKind::Population) if entry.key_item.is_empty() && !names_item(POPULATION_KEY_ITEM) => {
            c.push(
                "key_item",
                format!("population records need a data item named {POPULATION_KEY_ITEM}, or key_item naming the data item that keys a record"),
            )
        }
        Ok(RecordKind::Other) if entry.key_item.is_empty() => {
            c.push("key_item", "is required for RECORD_KIND_OTHER: the data item that keys a record")
        }
        Ok(_) => {}
    }

    if entry.withdrawn {
        c.push("withdrawn", "must be false: withdraw entries with WithdrawEntries");
    }
}

/// Checks a batch size against `MAX_BATCH_ENTRIES` (and non-empty).
fn check_batch_size(len: usize, field: &str) -> Option<Violation> {
    if len == 0 {
        Some(Violation::new(field, "must not be empty"))
    } else if len > MAX_BATCH_ENTRIES {
        Some(Violation::new(field, format!("at most {MAX_BATCH_ENTRIES} per batch, got {len}; split the batch")))
    } else {
        None
    }
}

/// Validates a whole publish batch. Empty result = valid.
pub fn check_publish(entries: &[CatalogEntry], today: NaiveDate) -> Vec<Violation> {
    if let Some(v) = check_batch_size(entries.len(), "entries") {
        return vec![v];
    }
    let mut out = Vec::new();
    let mut seen: HashMap<&str, usize> = HashMap::new();
    for (i, entry) in entries.iter().enumerate() {
        let prefix = format!("entries[{i}]");
        let before = out.len();
        check_entry(entry, &prefix, today, &mut out);
        let code_already_bad = out[before..].iter().any(|v| v.field.ends_with(".resource_code"));
        if let Some(first) = seen.insert(entry.resource_code.as_str(), i) {
            seen.insert(entry.resource_code.as_str(), first);
            if !code_already_bad {
                out.push(Violation::new(
                    format!("{prefix}.resource_code"),
                    format!("duplicate resource code {} (also entries[{first}])", entry.resource_code),
                ));
            }
        }
    }
    out
}

/// Validates the codes of a withdrawal batch.
pub fn check_withdraw(codes: &[String]) -> Vec<Violation> {
    if let Some(v) = check_batch_size(codes.len(), "resource_codes") {
        return vec![v];
    }
    let mut out = Vec::new();
    let mut seen: HashMap<&str, usize> = HashMap::new();
    for (i, code) in codes.iter().enumerate() {
        let field = format!("resource_codes[{i}]");
        if let Err(e) = parse_resource_code(code) {
            out.push(Violation::new(field, e));
        } else if let Some(first) = seen.insert(code.as_str(), i) {
            seen.insert(code.as_str(), first);
            out.push(Violation::new(field, format!("duplicate of resource_codes[{first}]")));
        }
    }
    out
}

/// Validates a lookup key (`GetEntry`, `ResolveResource`).
pub fn check_lookup_code(code: &str) -> Vec<Violation> {
    parse_resource_code(code).err().map(|e| Violation::new("resource_code", e)).into_iter().collect()
}

/// Validates a node's reachable address: `host:port` with a DNS name, IPv4 address or `[IPv6]` address, and
/// a port 1-65535. Wildcard addresses are refused: other nodes could not dial them.
pub fn check_address(addr: &str) -> Result<(), String> {
    const HINT: &str = "must be host:port where other nodes reach this node, e.g. tax-node.gov.local:7443";
    if addr.is_empty() {
        return Err(format!("is required: {HINT}"));
    }
    if addr.len() > 261 {
        return Err(format!("is too long: {HINT}"));
    }
    let (host, port) = if let Some(rest) = addr.strip_prefix('[') {
        let (h, p) = rest.split_once("]:").ok_or_else(|| format!("{addr:?}: {HINT}"))?;
        let ip: std::net::Ipv6Addr = h.parse().map_err(|_| format!("{h:?} is not an IPv6 address"))?;
        if ip.is_unspecified() {
            return Err(format!("{addr:?} is a wildcard address: {HINT}"));
        }
        (None, p)
    } else {
        let (h, p) = addr.rsplit_once(':').ok_or_else(|| format!("{addr:?} has no port: {HINT}"))?;
        (Some(h), p)
    };
    if port.is_empty() || !port.bytes().all(|b| b.is_ascii_digit()) || !matches!(port.parse::<u16>(), Ok(1..)) {
        return Err(format!("port {port:?} must be a number 1-65535"));
    }
    if let Some(host) = host {
        if let Ok(ip) = host.parse::<std::net::Ipv4Addr>() {
            if ip.is_unspecified() {
                return Err(format!("{addr:?} is a wildcard address: {HINT}"));
            }
        } else {
            let label_ok = |l: &str| {
                (1..=63).contains(&l.len())
                    && l.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-')
                    && !l.starts_with('-')
                    && !l.ends_with('-')
            };
            if host.is_empty() || host.len() > 253 || !host.split('.').all(label_ok) {
                return Err(format!("host {host:?} is not a DNS name or IP address: {HINT}"));
            }
        }
    }
    Ok(())
}

/// Validates the free-form parts of a node registration other than the address.
pub fn check_software_version(v: &str) -> Result<(), String> {
    check_text(v, false, SOFTWARE_VERSION_MAX_CHARS, false)
}

/// Validates search filters that the index cannot judge: enum values and the shape of codes. Paging and
/// query syntax are the index's own (`SearchError::InvalidArgument`).
pub fn check_search(req: &SearchCatalogRequest) -> Vec<Violation> {
    let mut out = Vec::new();
    let mut filter = |field: &str, value: i32, ok: bool| {
        if !ok {
            out.push(Violation::new(field, format!("unknown value {value}")));
        }
    };
    filter("share_type", req.share_type, ShareType::try_from(req.share_type).is_ok());
    filter("record_kind", req.record_kind, RecordKind::try_from(req.record_kind).is_ok());
    filter("update_cycle", req.update_cycle, UpdateCycle::try_from(req.update_cycle).is_ok());
    if !req.provider_code.is_empty() {
        if let Err(e) = client_sdk::identity::validate_department(&req.provider_code) {
            out.push(Violation::new("provider_code", e.to_string()));
        }
    }
    let p = &req.classification_prefix;
    if !p.is_empty()
        && (p.len() > 9 || !p.bytes().all(|b| b.is_ascii_digit()) || !matches!(p.as_bytes()[0], b'1'..=b'3'))
    {
        out.push(Violation::new(
            "classification_prefix",
            format!("must be up to 9 digits starting with 1, 2 or 3, got {p:?}"),
        ));
    }
    if let Err(e) = check_text(&req.query, false, crate::search::MAX_QUERY_CHARS, false) {
        out.push(Violation::new("query", e));
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use exchange_proto::v1::DataItem;

    fn today() -> NaiveDate {
        NaiveDate::from_ymd_opt(2026, 11, 22).unwrap()
    }

    pub(crate) fn valid_entry() -> CatalogEntry {
        CatalogEntry {
            resource_code: "101001/000001".into(),
            name: "企业登记信息".into(),
            summary: "市场主体登记的基本信息".into(),
            provider_code: "commerce".into(),
            provider_name: "市市场监督管理局".into(),
            classification: "101001".into(),
            format: "database table".into(),
            data_items: vec![
                DataItem {
                    name: ENTERPRISE_KEY_ITEM.into(),
                    data_type: DataType::String as i32,
                    description: String::new(),
                },
                DataItem {
                    name: "企业名称".into(), data_type: DataType::String as i32, description: "全称".into()
                },
            ],
            share_type: ShareType::Unconditional as i32,
            share_methods: vec![ShareMethod::PullQuery as i32],
            open_attribute: OpenAttribute::NotOpen as i32,
            update_cycle: UpdateCycle::Daily as i32,
            publish_date: "2024-03-01".into(),
            record_kind: RecordKind::Enterprise as i32,
            ..Default::default()
        }
    }

    fn fields(entry: &CatalogEntry) -> Vec<String> {
        let mut out = Vec::new();
        check_entry(entry, "e", today(), &mut out);
        out.into_iter().map(|v| v.field).collect()
    }

    #[test]
    fn a_complete_entry_is_valid() {
        assert_eq!(fields(&valid_entry()), Vec::<String>::new());
    }

    #[test]
    fn codes_and_classifications() {
        assert!(check_classification("1").is_ok());
        assert!(check_classification("101").is_ok());
        assert!(check_classification("301001002").is_ok());
        for bad in ["", "4", "10", "1010", "10a", "０"] {
            assert!(check_classification(bad).is_err(), "{bad}");
        }
        assert_eq!(parse_resource_code("101001/000001"), Ok("101001"));
        for bad in ["101001/00001", "101001-000001", "101001/0000012", "401/000001", "101001/00000a", "/000001"] {
            assert!(parse_resource_code(bad).is_err(), "{bad}");
        }
        let mut e = valid_entry();
        e.resource_code = "101002/000001".into();
        assert_eq!(fields(&e), ["e.resource_code"]);
        e.classification = "5".into();
        assert_eq!(fields(&e), ["e.classification"]);
    }

    #[test]
    fn text_rules() {
        let mut e = valid_entry();
        e.name = "  ".into();
        e.summary = "x".repeat(2001);
        e.provider_name = String::new();
        e.format = "a\u{7}b".into();
        assert_eq!(fields(&e), ["e.name", "e.summary", "e.provider_name", "e.format"]);
        let mut e = valid_entry();
        e.summary = "第一行\n第二行\t".into();
        e.name = "名".repeat(200);
        assert!(fields(&e).is_empty());
        e.name.push('\n');
        assert_eq!(fields(&e), ["e.name"]);
    }

    #[test]
    fn data_items() {
        let mut e = valid_entry();
        e.data_items.push(e.data_items[1].clone());
        e.data_items.push(DataItem { name: "x".repeat(65), data_type: 99, description: String::new() });
        assert_eq!(fields(&e), ["e.data_items[2].name", "e.data_items[3].name", "e.data_items[3].data_type"]);
        e.data_items.clear();
        assert!(fields(&e).contains(&"e.data_items".to_string()));
    }

    #[test]
    fn sharing_terms() {
        let mut e = valid_entry();
        e.share_type = ShareType::Conditional as i32;
        assert_eq!(fields(&e), ["e.share_condition"]);
        e.share_condition = "需说明用途".into();
        assert!(fields(&e).is_empty());
        e.share_type = ShareType::NotShared as i32;
        e.share_methods.clear();
        assert!(fields(&e).is_empty(), "not shared needs no share method");
        e.share_type = ShareType::Unconditional as i32;
        assert_eq!(fields(&e), ["e.share_methods"]);
        e.share_methods = vec![0, 1, 1, 9];
        assert_eq!(fields(&e), ["e.share_methods[0]", "e.share_methods[2]", "e.share_methods[3]"]);
        let mut e = valid_entry();
        e.share_type = 7;
        e.open_attribute = OpenAttribute::ConditionallyOpen as i32;
        e.update_cycle = 0;
        assert_eq!(fields(&e), ["e.share_type", "e.open_condition", "e.update_cycle"]);
    }

    #[test]
    fn dates_and_relations() {
        let mut e = valid_entry();
        for (date, ok) in
            [("2026-11-22", true), ("2026-11-23", false), ("2024-02-30", false), ("2024-2-03", false), ("", false)]
        {
            e.publish_date = date.into();
            assert_eq!(fields(&e).is_empty(), ok, "{date}");
        }
        let mut e = valid_entry();
        e.related_resource_codes =
            vec!["101001/000002".into(), e.resource_code.clone(), "bad".into(), "101001/000002".into()];
        assert_eq!(
            fields(&e),
            ["e.related_resource_codes[1]", "e.related_resource_codes[2]", "e.related_resource_codes[3]"]
        );
    }

    #[test]
    fn record_kinds_need_their_key() {
        let mut e = valid_entry();
        e.data_items.remove(0);
        assert_eq!(fields(&e), ["e.key_item"]);
        e.key_item = "企业名称".into();
        assert!(fields(&e).is_empty());
        e.key_item = "nope".into();
        assert_eq!(fields(&e), ["e.key_item"]);
        e.key_item.clear();
        e.record_kind = RecordKind::Population as i32;
        assert_eq!(fields(&e), ["e.key_item"]);
        e.data_items.push(DataItem { name: POPULATION_KEY_ITEM.into(), data_type: 1, description: String::new() });
        assert!(fields(&e).is_empty());
        e.record_kind = RecordKind::Other as i32;
        assert_eq!(fields(&e), ["e.key_item"]);
        e.key_item = POPULATION_KEY_ITEM.into();
        assert!(fields(&e).is_empty());
        e.record_kind = 0;
        assert_eq!(fields(&e), ["e.record_kind"]);
        e.record_kind = 1;
        e.withdrawn = true;
        e.version = 77; // ignored
        assert_eq!(fields(&e), ["e.withdrawn"]);
    }

    #[test]
    fn batches() {
        assert_eq!(check_publish(&[], today())[0].field, "entries");
        let big = vec![valid_entry(); MAX_BATCH_ENTRIES + 1];
        assert_eq!(check_publish(&big, today()).len(), 1);
        let mut second = valid_entry();
        second.name.clear();
        let v = check_publish(&[valid_entry(), second, valid_entry()], today());
        let f: Vec<&str> = v.iter().map(|v| v.field.as_str()).collect();
        assert_eq!(f, ["entries[1].name", "entries[1].resource_code", "entries[2].resource_code"]);
        let w = check_withdraw(&["101001/000001".into(), "x".into(), "101001/000001".into()]);
        let f: Vec<&str> = w.iter().map(|v| v.field.as_str()).collect();
        assert_eq!(f, ["resource_codes[1]", "resource_codes[2]"]);
    }

    #[test]
    fn addresses() {
        for ok in ["tax-node.gov.local:7443", "127.0.0.1:1", "[::1]:443", "localhost:65535"] {
            assert_eq!(check_address(ok), Ok(()), "{ok}");
        }
        for bad in [
            "",
            "host",
            "host:",
            "host:0",
            "host:65536",
            ":80",
            "0.0.0.0:80",
            "[::]:80",
            "a_b:80",
            "-a:80",
            "h:8x",
            "[::1:80",
        ] {
            assert!(check_address(bad).is_err(), "{bad}");
        }
    }
}
