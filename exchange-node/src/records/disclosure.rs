//! Field-level disclosure: what of a record leaves the provider's node for one consumer.
//!
//! The unit is the data item (信息项). [`disclosure()`] works out, from the catalog entry and the
//! consumer's grant, which items the consumer may see and which of them only masked; [`apply`] cuts a
//! stored record down to that. Both are pure: the relay looks up the grant, calls [`disclosure()`] once
//! per request and [`apply`] once per record, and copies `data_items` / `masked_items` into its answer.
//!
//! Rules:
//! - Unconditional (无条件共享): every data item, whatever the grant says.
//! - Conditional (有条件共享) with a grant: the granted items that are data items of the entry; names
//!   the entry does not have (any more) are ignored. Without a grant: nothing.
//! - Not shared (不予共享), or an unknown share type: nothing.
//! - Population entries: when the consumer may see some items but not the key item (公民身份号码), the
//!   key item is still returned, masked (first 6 and last 4 characters: `110105********002X`), and so is
//!   the record key. It is listed both in `data_items` and in `masked_items`.
//! - A disclosure with no items discloses nothing at all; the relay should refuse such a request rather
//!   than answer with empty records ([`Disclosure::is_empty`]).
//! - Items are always listed in catalog order.

use std::collections::HashSet;

use client_sdk::ids::mask_identity_number;
use exchange_proto::v1::{CatalogEntry, Record, RecordKind, ShareType};

use super::key_item;

/// The data items one consumer gets from one resource.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Disclosure {
    /// Every item returned, masked or not, in catalog order.
    pub data_items: Vec<String>,
    /// The items of `data_items` returned masked.
    pub masked_items: Vec<String>,
}

impl Disclosure {
    /// True when nothing at all may be disclosed.
    pub fn is_empty(&self) -> bool {
        self.data_items.is_empty()
    }
}

/// What a consumer may see of `entry`'s records. `granted_items` is the consumer's grant of data items
/// for this resource (`None`: no grant).
pub fn disclosure(entry: &CatalogEntry, granted_items: Option<&[String]>) -> Disclosure {
    let allowed: Vec<String> = match ShareType::try_from(entry.share_type) {
        Ok(ShareType::Unconditional) => entry.data_items.iter().map(|d| d.name.clone()).collect(),
        Ok(ShareType::Conditional) => match granted_items {
            Some(granted) => {
                let granted: HashSet<&str> = granted.iter().map(String::as_str).collect();
                entry.data_items.iter().filter(|d| granted.contains(d.name.as_str())).map(|d| d.name.clone()).collect()
            }
            None => Vec::new(),
        },
        Ok(ShareType::NotShared | ShareType::Unspecified) | Err(_) => Vec::new(),
    };
    if allowed.is_empty() {
        return Disclosure::default();
    }
    let mut masked_items = Vec::new();
    let mut data_items = allowed;
    if entry.record_kind == RecordKind::Population as i32 {
        if let Some(key) = key_item(entry) {
            if !data_items.iter().any(|n| n == key) && entry.data_items.iter().any(|d| d.name == key) {
                masked_items.push(key.to_string());
                // Back into catalog order.
                let position = |name: &str| entry.data_items.iter().position(|d| d.name == name);
                data_items.push(key.to_string());
                data_items.sort_by_key(|n| position(n));
            }
        }
    }
    Disclosure { data_items, masked_items }
}

/// `record` as it may leave the node: only the items of `d`, masked ones masked, and the key masked too
/// when it is an identity number the consumer may not see in full.
pub fn apply(d: &Disclosure, entry: &CatalogEntry, mut record: Record) -> Record {
    // Everything disclosed, nothing masked: stored records hold only the entry's items (validate_batch
    // refuses others), so there is nothing to cut. The common case for unconditional resources; it
    // saves a set and a pass over every record.
    if d.masked_items.is_empty() && d.data_items.len() == entry.data_items.len() {
        return record;
    }
    let allowed: HashSet<&str> = d.data_items.iter().map(String::as_str).collect();
    record.items.retain(|name, _| allowed.contains(name.as_str()));
    for name in &d.masked_items {
        if let Some(value) = record.items.get_mut(name) {
            *value = mask_identity_number(value);
        }
    }
    let key = key_item(entry);
    let key_masked = key.is_some_and(|k| d.masked_items.iter().any(|n| n == k));
    // A population key leaves the node in clear only with a grant of the key item itself, even if the
    // disclosure was built for an entry whose key item is missing from its data items.
    let key_in_clear = key.is_some_and(|k| d.data_items.iter().any(|n| n == k)) && !key_masked;
    if key_masked || (entry.record_kind == RecordKind::Population as i32 && !key_in_clear) {
        record.key = mask_identity_number(&record.key);
    }
    record
}

#[cfg(test)]
mod tests {
    use std::collections::HashMap;

    use super::*;
    use crate::records::test_support::*;
    use crate::records::POPULATION_KEY_ITEM;

    fn names(v: &[&str]) -> Vec<String> {
        v.iter().map(|s| s.to_string()).collect()
    }

    fn person() -> Record {
        Record {
            key: ID_1949.into(),
            items: HashMap::from(
                [(POPULATION_KEY_ITEM, ID_1949), ("姓名", "张三"), ("性别", "女"), ("出生日期", "1949-12-31"), ("住址", "北京市朝阳区")]
                    .map(|(k, v)| (k.to_string(), v.to_string())),
            ),
            updated_at_unix_ms: 1_700_000_000_000,
            version: 0,
        }
    }

    #[test]
    fn unconditional_discloses_every_item() {
        let entry = enterprise(ShareType::Unconditional);
        let all: Vec<String> = entry.data_items.iter().map(|d| d.name.clone()).collect();
        let d = disclosure(&entry, None);
        assert_eq!(d.data_items, all);
        assert!(d.masked_items.is_empty());
        // A grant does not narrow an unconditional resource.
        assert_eq!(disclosure(&entry, Some(&names(&["企业名称"]))).data_items, all);
        let record = Record {
            key: VALID_USCC.into(),
            items: HashMap::from([("统一社会信用代码".into(), VALID_USCC.into()), ("企业名称".into(), "甲公司".into())]),
            updated_at_unix_ms: 5,
            version: 0,
        };
        assert_eq!(apply(&d, &entry, record.clone()), record);
    }

    #[test]
    fn conditional_gives_the_granted_items_in_catalog_order() {
        let entry = enterprise(ShareType::Conditional);
        let d = disclosure(&entry, Some(&names(&["登记状态", "企业名称", "不存在的项", "企业名称"])));
        assert_eq!(d.data_items, names(&["企业名称", "登记状态"]));
        assert!(d.masked_items.is_empty());
        let record = Record {
            key: VALID_USCC.into(),
            items: HashMap::from([
                ("统一社会信用代码".into(), VALID_USCC.into()),
                ("企业名称".into(), "甲公司".into()),
                ("住所".into(), "福州市".into()),
            ]),
            updated_at_unix_ms: 5,
            version: 0,
        };
        let out = apply(&d, &entry, record);
        assert_eq!(out.key, VALID_USCC, "a credit code is never masked");
        assert_eq!(out.items, HashMap::from([("企业名称".into(), "甲公司".into())]));
        assert_eq!(out.updated_at_unix_ms, 5);
    }

    #[test]
    fn population_without_the_identity_number_gets_it_masked() {
        let entry = population(ShareType::Conditional);
        let d = disclosure(&entry, Some(&names(&["姓名", "出生日期"])));
        assert_eq!(d.data_items, names(&[POPULATION_KEY_ITEM, "姓名", "出生日期"]));
        assert_eq!(d.masked_items, names(&[POPULATION_KEY_ITEM]));
        let out = apply(&d, &entry, person());
        assert_eq!(out.key, "110105********002X");
        assert_eq!(out.items[POPULATION_KEY_ITEM], "110105********002X");
        assert_eq!(out.items["姓名"], "张三");
        assert_eq!(out.items.len(), 3, "性别 and 住址 stay behind");
        assert!(!format!("{out:?}").contains(ID_1949));
    }

    #[test]
    fn population_granted_in_full_is_returned_in_clear() {
        let entry = population(ShareType::Conditional);
        let d = disclosure(&entry, Some(&names(&["姓名", POPULATION_KEY_ITEM])));
        assert_eq!(d.data_items, names(&[POPULATION_KEY_ITEM, "姓名"]));
        assert!(d.masked_items.is_empty());
        let out = apply(&d, &entry, person());
        assert_eq!(out.key, ID_1949);
        assert_eq!(out.items[POPULATION_KEY_ITEM], ID_1949);
        assert_eq!(out.items.len(), 2);

        let all = disclosure(&entry, Some(&entry.data_items.iter().map(|d| d.name.clone()).collect::<Vec<_>>()));
        assert_eq!(apply(&all, &entry, person()), person());
        let unconditional = population(ShareType::Unconditional);
        assert_eq!(apply(&disclosure(&unconditional, None), &unconditional, person()), person());
    }

    #[test]
    fn nothing_without_a_grant_or_for_a_resource_not_shared() {
        let conditional = population(ShareType::Conditional);
        assert!(disclosure(&conditional, None).is_empty());
        assert!(disclosure(&conditional, Some(&[])).is_empty());
        assert!(disclosure(&conditional, Some(&names(&["不存在的项"]))).is_empty());
        let not_shared = enterprise(ShareType::NotShared);
        assert!(disclosure(&not_shared, Some(&names(&["企业名称"]))).is_empty());
        // Applied anyway, an empty disclosure leaks nothing, not even the identity number.
        let out = apply(&Disclosure::default(), &conditional, person());
        assert!(out.items.is_empty());
        assert_eq!(out.key, "110105********002X");
    }
}
