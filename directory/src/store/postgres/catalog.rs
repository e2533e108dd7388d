//! Catalog entries and the catalog change log: `gx_catalog_entries`, `gx_catalog_changes`, and the
//! `catalog` head in `gx_log_heads`.

use std::collections::HashMap;
use std::sync::Arc;

use async_trait::async_trait;
use exchange_proto::v1::{CatalogChange, CatalogEntry, ChangeKind};
use prost::Message;

use super::{
    after_bound, decode, head_version, limit_of, take_versions, to_bigint, tx_execute, tx_query,
    Pg, Transaction, TxError,
};
use crate::store::{CatalogStore, StoreError};

pub(crate) struct PgCatalogStore {
    pg: Arc<Pg>,
}

impl PgCatalogStore {
    pub(crate) fn new(pg: Arc<Pg>) -> Self {
        PgCatalogStore { pg }
    }
}

fn entry_key(code: &str) -> impl FnOnce() -> String + '_ {
    move || format!("gx_catalog_entries/{code}")
}

fn owned_elsewhere(code: &str, owner: &str) -> StoreError {
    StoreError::Conflict(format!(
        "resource code {code} already belongs to department {owner}"
    ))
}

/// The stored entries (live or tombstones) among `codes`, by code.
async fn stored_entries(
    tx: &Transaction<'_>,
    codes: &[&str],
) -> Result<HashMap<String, CatalogEntry>, TxError> {
    let rows = tx_query(
        tx,
        "SELECT resource_code, entry FROM gx_catalog_entries WHERE resource_code = ANY($1)",
        &[&codes],
    )
    .await?;
    let mut out = HashMap::with_capacity(rows.len());
    for row in rows {
        let code: String = row.get(0);
        let entry = decode(entry_key(&code), row.get(1))?;
        out.insert(code, entry);
    }
    Ok(out)
}

/// Writes each changed entry's new state and every change record. A code changed twice in one batch is
/// written once, in its last state (one statement cannot update a row twice).
async fn write_changes(tx: &Transaction<'_>, changes: &[CatalogChange]) -> Result<(), TxError> {
    let mut last_state: HashMap<&str, usize> = HashMap::with_capacity(changes.len());
    let mut states: Vec<&CatalogEntry> = Vec::with_capacity(changes.len());
    for change in changes {
        let entry = change.entry.as_ref().expect("a change carries its entry");
        match last_state.get(entry.resource_code.as_str()) {
            Some(&i) => states[i] = entry,
            None => {
                last_state.insert(&entry.resource_code, states.len());
                states.push(entry);
            }
        }
    }
    let codes: Vec<&str> = states.iter().map(|e| e.resource_code.as_str()).collect();
    let providers: Vec<&str> = states.iter().map(|e| e.provider_code.as_str()).collect();
    let withdrawn: Vec<bool> = states.iter().map(|e| e.withdrawn).collect();
    let versions = states
        .iter()
        .map(|e| to_bigint("catalog version", e.version))
        .collect::<Result<Vec<_>, _>>()?;
    let bodies: Vec<Vec<u8>> = states.iter().map(|e| e.encode_to_vec()).collect();
    tx_execute(
        tx,
        "INSERT INTO gx_catalog_entries (resource_code, provider_code, withdrawn, version, entry) \
         SELECT * FROM UNNEST($1::TEXT[], $2::TEXT[], $3::BOOLEAN[], $4::BIGINT[], $5::BYTEA[]) \
         ON CONFLICT (resource_code) DO UPDATE SET provider_code = EXCLUDED.provider_code, \
         withdrawn = EXCLUDED.withdrawn, version = EXCLUDED.version, entry = EXCLUDED.entry",
        &[&codes, &providers, &withdrawn, &versions, &bodies],
    )
    .await?;
    let change_versions = changes
        .iter()
        .map(|c| to_bigint("catalog version", c.version))
        .collect::<Result<Vec<_>, _>>()?;
    let change_bodies: Vec<Vec<u8>> = changes.iter().map(|c| c.encode_to_vec()).collect();
    tx_execute(
        tx,
        "INSERT INTO gx_catalog_changes (version, change) SELECT * FROM UNNEST($1::BIGINT[], $2::BYTEA[])",
        &[&change_versions, &change_bodies],
    )
    .await?;
    Ok(())
}

async fn upsert_in(
    tx: &Transaction<'_>,
    entries: &[CatalogEntry],
) -> Result<Vec<CatalogEntry>, TxError> {
    let first = take_versions(tx, "catalog", entries.len()).await?;
    let codes: Vec<&str> = entries.iter().map(|e| e.resource_code.as_str()).collect();
    let rows = tx_query(
        tx,
        "SELECT resource_code, provider_code FROM gx_catalog_entries WHERE resource_code = ANY($1)",
        &[&codes],
    )
    .await?;
    let owners: HashMap<String, String> = rows.iter().map(|r| (r.get(0), r.get(1))).collect();
    for entry in entries {
        if let Some(owner) = owners
            .get(&entry.resource_code)
            .filter(|o| **o != entry.provider_code)
        {
            return Err(owned_elsewhere(&entry.resource_code, owner).into());
        }
    }
    let changes: Vec<CatalogChange> = entries
        .iter()
        .zip(first..)
        .map(|(entry, version)| {
            let entry = CatalogEntry {
                version,
                withdrawn: false,
                ..entry.clone()
            };
            CatalogChange {
                version,
                kind: ChangeKind::Upsert as i32,
                entry: Some(entry),
            }
        })
        .collect();
    write_changes(tx, &changes).await?;
    Ok(changes.into_iter().filter_map(|c| c.entry).collect())
}

async fn withdraw_in(tx: &Transaction<'_>, codes: &[String]) -> Result<Vec<CatalogEntry>, TxError> {
    let first = take_versions(tx, "catalog", codes.len()).await?;
    let wanted: Vec<&str> = codes.iter().map(String::as_str).collect();
    let stored = stored_entries(tx, &wanted).await?;
    let mut changes: Vec<CatalogChange> = Vec::with_capacity(codes.len());
    for (code, version) in codes.iter().zip(first..) {
        // A code named twice in one batch tombstones the tombstone of this batch, not the stored entry.
        let pending = changes
            .iter()
            .rev()
            .find_map(|c| c.entry.as_ref().filter(|e| &e.resource_code == code));
        let mut entry = match pending.or_else(|| stored.get(code)) {
            Some(e) => e.clone(),
            None => return Err(StoreError::MissingEntry(code.clone()).into()),
        };
        entry.version = version;
        entry.withdrawn = true;
        changes.push(CatalogChange {
            version,
            kind: ChangeKind::Withdraw as i32,
            entry: Some(entry),
        });
    }
    write_changes(tx, &changes).await?;
    Ok(changes.into_iter().filter_map(|c| c.entry).collect())
}

#[async_trait]
impl CatalogStore for PgCatalogStore {
    async fn upsert(&self, entries: Vec<CatalogEntry>) -> Result<Vec<CatalogEntry>, StoreError> {
        if entries.is_empty() {
            return Ok(Vec::new());
        }
        self.pg
            .write("publish catalog entries", &entries[..], |tx, entries| {
                Box::pin(upsert_in(tx, entries))
            })
            .await
    }

    async fn withdraw(&self, resource_codes: Vec<String>) -> Result<Vec<CatalogEntry>, StoreError> {
        if resource_codes.is_empty() {
            return Ok(Vec::new());
        }
        self.pg
            .write(
                "withdraw catalog entries",
                &resource_codes[..],
                |tx, codes| Box::pin(withdraw_in(tx, codes)),
            )
            .await
    }

    async fn get(&self, resource_code: &str) -> Result<Option<CatalogEntry>, StoreError> {
        let rows = self
            .pg
            .query(
                "read a catalog entry",
                "SELECT entry FROM gx_catalog_entries WHERE resource_code = $1",
                &[&resource_code],
            )
            .await?;
        rows.first()
            .map(|r| decode(entry_key(resource_code), r.get(0)))
            .transpose()
    }

    async fn get_many(
        &self,
        resource_codes: &[String],
    ) -> Result<Vec<Option<CatalogEntry>>, StoreError> {
        if resource_codes.is_empty() {
            return Ok(Vec::new());
        }
        let rows = self
            .pg
            .query(
                "read catalog entries",
                "SELECT resource_code, entry FROM gx_catalog_entries WHERE resource_code = ANY($1)",
                &[&resource_codes],
            )
            .await?;
        let mut found: HashMap<String, CatalogEntry> = HashMap::with_capacity(rows.len());
        for row in rows {
            let code: String = row.get(0);
            let entry = decode(entry_key(&code), row.get(1))?;
            found.insert(code, entry);
        }
        Ok(resource_codes
            .iter()
            .map(|c| found.get(c).cloned())
            .collect())
    }

    async fn changes_since(
        &self,
        after_version: u64,
        limit: usize,
    ) -> Result<Vec<CatalogChange>, StoreError> {
        if limit == 0 {
            return Ok(Vec::new());
        }
        let rows = self
            .pg
            .query(
                "read the catalog change log",
                "SELECT version, change FROM gx_catalog_changes WHERE version > $1 ORDER BY version LIMIT $2",
                &[&after_bound(after_version), &limit_of(limit)],
            )
            .await?;
        rows.iter()
            .map(|r| {
                let version: i64 = r.get(0);
                decode(|| format!("gx_catalog_changes/{version}"), r.get(1))
            })
            .collect()
    }

    async fn current_version(&self) -> Result<u64, StoreError> {
        head_version(&self.pg, "catalog").await
    }

    async fn live_entries_after(
        &self,
        after_code: Option<&str>,
        limit: usize,
    ) -> Result<Vec<CatalogEntry>, StoreError> {
        if limit == 0 {
            return Ok(Vec::new());
        }
        let rows = match after_code {
            Some(after) => {
                self.pg
                    .query(
                        "page through live catalog entries",
                        "SELECT resource_code, entry FROM gx_catalog_entries \
                         WHERE NOT withdrawn AND resource_code > $1 ORDER BY resource_code LIMIT $2",
                        &[&after, &limit_of(limit)],
                    )
                    .await?
            }
            None => {
                self.pg
                    .query(
                        "page through live catalog entries",
                        "SELECT resource_code, entry FROM gx_catalog_entries \
                         WHERE NOT withdrawn ORDER BY resource_code LIMIT $1",
                        &[&limit_of(limit)],
                    )
                    .await?
            }
        };
        rows.iter()
            .map(|r| {
                let code: &str = r.get(0);
                decode(entry_key(code), r.get(1))
            })
            .collect()
    }
}
