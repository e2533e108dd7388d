//! Grants and their change log: `gx_grants`, `gx_grant_changes`, and the `grants` (versions) and
//! `grant_ids` (sequence numbers) heads in `gx_log_heads`. Every grant write takes the `grants` head
//! first and `grant_ids` only after it, so grant writers queue on one row and never deadlock.

use std::collections::HashMap;
use std::sync::Arc;

use async_trait::async_trait;
use exchange_proto::v1::{Grant, GrantChange, GrantStatus};
use prost::Message;
use tokio_postgres::Row;

use super::{
    after_bound, decode, head_version, limit_of, take_versions, to_bigint, tx_execute, tx_query,
    Pg, Transaction, TxError,
};
use crate::store::{grant_id, parse_grant_id, GrantStore, StoreError};

pub(crate) struct PgGrantStore {
    pg: Arc<Pg>,
}

impl PgGrantStore {
    pub(crate) fn new(pg: Arc<Pg>) -> Self {
        PgGrantStore { pg }
    }
}

fn grant_from_row(row: &Row) -> Result<Grant, StoreError> {
    let seq: i64 = row.get(0);
    decode(|| format!("gx_grants/{seq}"), row.get(1))
}

fn pending_exists(pending: &Grant) -> StoreError {
    StoreError::Conflict(format!(
        "grant {} of department {} for {} is pending already",
        pending.grant_id, pending.consumer_code, pending.resource_code
    ))
}

fn changed_since_read(grant_id: &str, read: u64, now: u64) -> StoreError {
    StoreError::Conflict(format!(
        "grant {grant_id} changed since it was read (version {read} read, {now} stored)"
    ))
}

/// Appends the change records of `grants` (each with its new version set).
async fn log_changes(tx: &Transaction<'_>, grants: &[Grant]) -> Result<(), TxError> {
    let versions = grants
        .iter()
        .map(|g| to_bigint("grant version", g.version))
        .collect::<Result<Vec<_>, _>>()?;
    let bodies: Vec<Vec<u8>> = grants
        .iter()
        .map(|g| {
            GrantChange {
                version: g.version,
                grant: Some(g.clone()),
            }
            .encode_to_vec()
        })
        .collect();
    tx_execute(
        tx,
        "INSERT INTO gx_grant_changes (version, change) SELECT * FROM UNNEST($1::BIGINT[], $2::BYTEA[])",
        &[&versions, &bodies],
    )
    .await?;
    Ok(())
}

async fn insert_in(tx: &Transaction<'_>, grant: &Grant) -> Result<Grant, TxError> {
    let version = take_versions(tx, "grants", 1).await?;
    let pending = tx_query(
        tx,
        "SELECT seq, grant_state FROM gx_grants WHERE consumer_code = $1 AND resource_code = $2 AND status = $3 \
         ORDER BY seq LIMIT 1",
        &[&grant.consumer_code, &grant.resource_code, &i64::from(GrantStatus::Pending as i32)],
    )
    .await?;
    if let Some(row) = pending.first() {
        return Err(pending_exists(&grant_from_row(row)?).into());
    }
    let seq = take_versions(tx, "grant_ids", 1).await?;
    let stored = Grant {
        grant_id: grant_id(seq),
        version,
        ..grant.clone()
    };
    tx_execute(
        tx,
        "INSERT INTO gx_grants (seq, grant_id, consumer_code, resource_code, provider_code, status, version, \
         grant_state) VALUES ($1, $2, $3, $4, $5, $6, $7, $8)",
        &[
            &to_bigint("grant sequence", seq)?,
            &stored.grant_id,
            &stored.consumer_code,
            &stored.resource_code,
            &stored.provider_code,
            &i64::from(stored.status),
            &to_bigint("grant version", version)?,
            &stored.encode_to_vec(),
        ],
    )
    .await?;
    log_changes(tx, std::slice::from_ref(&stored)).await?;
    Ok(stored)
}

async fn update_in(tx: &Transaction<'_>, grants: &[Grant]) -> Result<Vec<Grant>, TxError> {
    let first = take_versions(tx, "grants", grants.len()).await?;
    let seqs: Vec<i64> = grants
        .iter()
        .filter_map(|g| parse_grant_id(&g.grant_id))
        .filter_map(|s| i64::try_from(s).ok())
        .collect();
    let rows = tx_query(
        tx,
        "SELECT seq, grant_state FROM gx_grants WHERE seq = ANY($1)",
        &[&seqs],
    )
    .await?;
    let mut old_by_seq: HashMap<u64, Grant> = HashMap::with_capacity(rows.len());
    for row in &rows {
        let seq: i64 = row.get(0);
        old_by_seq.insert(seq as u64, grant_from_row(row)?);
    }
    let mut stored: Vec<Grant> = Vec::with_capacity(grants.len());
    for (grant, version) in grants.iter().zip(first..) {
        let bad = |why: &str| StoreError::BadGrantUpdate(grant.grant_id.clone(), why.to_string());
        let seq = parse_grant_id(&grant.grant_id).ok_or_else(|| bad("not a grant id"))?;
        let old = old_by_seq.get(&seq).ok_or_else(|| bad("no such grant"))?;
        if (&old.resource_code, &old.consumer_code, &old.provider_code)
            != (
                &grant.resource_code,
                &grant.consumer_code,
                &grant.provider_code,
            )
        {
            return Err(bad("resource, consumer and provider of a grant cannot change").into());
        }
        // Within one call, a grant named twice is checked against its first write here.
        let read_as = stored
            .iter()
            .rev()
            .find(|g| g.grant_id == grant.grant_id)
            .map_or(old.version, |g| g.version);
        if grant.version != read_as {
            return Err(changed_since_read(&grant.grant_id, grant.version, read_as).into());
        }
        stored.push(Grant {
            version,
            ..grant.clone()
        });
    }
    // One row per grant, in its last state (one statement cannot update a row twice).
    let mut last_state: HashMap<&str, usize> = HashMap::with_capacity(stored.len());
    let mut states: Vec<&Grant> = Vec::with_capacity(stored.len());
    for grant in &stored {
        match last_state.get(grant.grant_id.as_str()) {
            Some(&i) => states[i] = grant,
            None => {
                last_state.insert(&grant.grant_id, states.len());
                states.push(grant);
            }
        }
    }
    let state_seqs: Vec<i64> = states
        .iter()
        .map(|g| {
            to_bigint(
                "grant sequence",
                parse_grant_id(&g.grant_id).unwrap_or_default(),
            )
        })
        .collect::<Result<_, _>>()?;
    let statuses: Vec<i64> = states.iter().map(|g| i64::from(g.status)).collect();
    let versions = states
        .iter()
        .map(|g| to_bigint("grant version", g.version))
        .collect::<Result<Vec<_>, _>>()?;
    let bodies: Vec<Vec<u8>> = states.iter().map(|g| g.encode_to_vec()).collect();
    tx_execute(
        tx,
        "UPDATE gx_grants AS g SET status = u.status, version = u.version, grant_state = u.grant_state \
         FROM UNNEST($1::BIGINT[], $2::BIGINT[], $3::BIGINT[], $4::BYTEA[]) AS u(seq, status, version, grant_state) \
         WHERE g.seq = u.seq",
        &[&state_seqs, &statuses, &versions, &bodies],
    )
    .await?;
    log_changes(tx, &stored).await?;
    Ok(stored)
}

#[async_trait]
impl GrantStore for PgGrantStore {
    async fn insert(&self, grant: Grant) -> Result<Grant, StoreError> {
        self.pg
            .write("store a grant", &grant, |tx, grant| {
                Box::pin(insert_in(tx, grant))
            })
            .await
    }

    async fn update(&self, grants: Vec<Grant>) -> Result<Vec<Grant>, StoreError> {
        if grants.is_empty() {
            return Ok(Vec::new());
        }
        self.pg
            .write("update grants", &grants[..], |tx, grants| {
                Box::pin(update_in(tx, grants))
            })
            .await
    }

    async fn get(&self, grant_id: &str) -> Result<Option<Grant>, StoreError> {
        let Some(seq) = parse_grant_id(grant_id).and_then(|s| i64::try_from(s).ok()) else {
            return Ok(None);
        };
        let rows = self
            .pg
            .query(
                "read a grant",
                "SELECT seq, grant_state FROM gx_grants WHERE seq = $1",
                &[&seq],
            )
            .await?;
        rows.first().map(grant_from_row).transpose()
    }

    async fn for_consumer(
        &self,
        consumer_code: &str,
        resource_code: &str,
    ) -> Result<Vec<Grant>, StoreError> {
        let rows = self
            .pg
            .query(
                "read a consumer's grants",
                "SELECT seq, grant_state FROM gx_grants WHERE consumer_code = $1 AND resource_code = $2 ORDER BY seq",
                &[&consumer_code, &resource_code],
            )
            .await?;
        rows.iter().map(grant_from_row).collect()
    }

    async fn list(&self, department: Option<&str>) -> Result<Vec<Grant>, StoreError> {
        let rows = match department {
            Some(department) => {
                self.pg
                    .query(
                        "list grants",
                        "SELECT seq, grant_state FROM gx_grants WHERE provider_code = $1 OR consumer_code = $1 \
                         ORDER BY seq DESC",
                        &[&department],
                    )
                    .await?
            }
            None => {
                self.pg.query("list grants", "SELECT seq, grant_state FROM gx_grants ORDER BY seq DESC", &[]).await?
            }
        };
        rows.iter().map(grant_from_row).collect()
    }

    async fn changes_since(
        &self,
        after_version: u64,
        limit: usize,
    ) -> Result<Vec<GrantChange>, StoreError> {
        if limit == 0 {
            return Ok(Vec::new());
        }
        let rows = self
            .pg
            .query(
                "read the grant change log",
                "SELECT version, change FROM gx_grant_changes WHERE version > $1 ORDER BY version LIMIT $2",
                &[&after_bound(after_version), &limit_of(limit)],
            )
            .await?;
        rows.iter()
            .map(|r| {
                let version: i64 = r.get(0);
                decode(|| format!("gx_grant_changes/{version}"), r.get(1))
            })
            .collect()
    }

    async fn current_version(&self) -> Result<u64, StoreError> {
        head_version(&self.pg, "grants").await
    }
}
