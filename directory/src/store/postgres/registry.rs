//! The node registry (`gx_nodes`) and revoked certificates (`gx_revocations`, with the `revocations`
//! head in `gx_log_heads`).

use std::sync::Arc;

use async_trait::async_trait;
use exchange_proto::v1::{AuditSeal, Revocation};
use prost::Message;
use tokio_postgres::Row;

use super::{
    after_bound, decode, head_version, limit_of, to_bigint, tx_execute, tx_query, version_of, Pg,
    Transaction, TxError,
};
use crate::store::{NodeRecord, NodeStore, RevocationStore, StoreError};

pub(crate) struct PgNodeStore {
    pg: Arc<Pg>,
}

impl PgNodeStore {
    pub(crate) fn new(pg: Arc<Pg>) -> Self {
        PgNodeStore { pg }
    }
}

const NODE_COLUMNS: &str = "department, node_name, address, software_version, registered_at_unix_ms, \
                            last_heartbeat_unix_ms, lease_expires_unix_ms, audit_verifying_key_hex, audit_anchor";

fn node_from_row(row: &Row) -> Result<NodeRecord, StoreError> {
    let department: String = row.get(0);
    let node_name: String = row.get(1);
    let anchor: Option<&[u8]> = row.get(8);
    let audit_anchor = anchor
        .map(|bytes| {
            decode::<AuditSeal>(
                || format!("gx_nodes/{department}/{node_name}/audit_anchor"),
                bytes,
            )
        })
        .transpose()?;
    Ok(NodeRecord {
        address: row.get(2),
        software_version: row.get(3),
        registered_at_unix_ms: row.get(4),
        last_heartbeat_unix_ms: row.get(5),
        lease_expires_unix_ms: row.get(6),
        audit_verifying_key_hex: row.get(7),
        audit_anchor,
        department,
        node_name,
    })
}

/// The anchor's `upto_seq` (compared in SQL) and the seal itself.
fn anchor_columns(seal: Option<&AuditSeal>) -> Result<(Option<i64>, Option<Vec<u8>>), StoreError> {
    match seal {
        Some(seal) => Ok((
            Some(to_bigint("audit seal upto_seq", seal.upto_seq)?),
            Some(seal.encode_to_vec()),
        )),
        None => Ok((None, None)),
    }
}

#[async_trait]
impl NodeStore for PgNodeStore {
    async fn register(&self, node: NodeRecord) -> Result<(), StoreError> {
        let (upto_seq, anchor) = anchor_columns(node.audit_anchor.as_ref())?;
        self.pg
            .query(
                "register a node",
                "INSERT INTO gx_nodes (department, node_name, address, software_version, registered_at_unix_ms, \
                 last_heartbeat_unix_ms, lease_expires_unix_ms, audit_verifying_key_hex, anchor_upto_seq, \
                 audit_anchor) VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10) \
                 ON CONFLICT (department, node_name) DO UPDATE SET address = EXCLUDED.address, \
                 software_version = EXCLUDED.software_version, registered_at_unix_ms = EXCLUDED.registered_at_unix_ms, \
                 last_heartbeat_unix_ms = EXCLUDED.last_heartbeat_unix_ms, \
                 lease_expires_unix_ms = EXCLUDED.lease_expires_unix_ms, \
                 audit_verifying_key_hex = EXCLUDED.audit_verifying_key_hex, \
                 anchor_upto_seq = EXCLUDED.anchor_upto_seq, audit_anchor = EXCLUDED.audit_anchor",
                &[
                    &node.department,
                    &node.node_name,
                    &node.address,
                    &node.software_version,
                    &node.registered_at_unix_ms,
                    &node.last_heartbeat_unix_ms,
                    &node.lease_expires_unix_ms,
                    &node.audit_verifying_key_hex,
                    &upto_seq,
                    &anchor,
                ],
            )
            .await?;
        Ok(())
    }

    async fn heartbeat(
        &self,
        department: &str,
        node_name: &str,
        now_unix_ms: i64,
        lease_expires_unix_ms: i64,
        audit_seal: Option<AuditSeal>,
    ) -> Result<Option<NodeRecord>, StoreError> {
        let (upto_seq, anchor) = anchor_columns(audit_seal.as_ref())?;
        // One statement, so a heartbeat racing a re-registration or another heartbeat cannot write back a
        // stale row; every SET reads the row as it was, so both anchor columns move together or not at all.
        let sql = format!(
            "UPDATE gx_nodes SET last_heartbeat_unix_ms = $3, lease_expires_unix_ms = $4, \
             audit_anchor = CASE WHEN $5::BIGINT IS NOT NULL AND (anchor_upto_seq IS NULL OR anchor_upto_seq < $5) \
                 THEN $6::BYTEA ELSE audit_anchor END, \
             anchor_upto_seq = CASE WHEN $5::BIGINT IS NOT NULL AND (anchor_upto_seq IS NULL OR anchor_upto_seq < $5) \
                 THEN $5 ELSE anchor_upto_seq END \
             WHERE department = $1 AND node_name = $2 RETURNING {NODE_COLUMNS}"
        );
        let rows = self
            .pg
            .query(
                "renew a node's lease",
                &sql,
                &[
                    &department,
                    &node_name,
                    &now_unix_ms,
                    &lease_expires_unix_ms,
                    &upto_seq,
                    &anchor,
                ],
            )
            .await?;
        rows.first().map(node_from_row).transpose()
    }

    async fn list(&self, department: Option<&str>) -> Result<Vec<NodeRecord>, StoreError> {
        let rows = match department {
            Some(department) => {
                let sql =
                    format!("SELECT {NODE_COLUMNS} FROM gx_nodes WHERE department = $1 ORDER BY department, node_name");
                self.pg.query("list nodes", &sql, &[&department]).await?
            }
            None => {
                let sql =
                    format!("SELECT {NODE_COLUMNS} FROM gx_nodes ORDER BY department, node_name");
                self.pg.query("list nodes", &sql, &[]).await?
            }
        };
        rows.iter().map(node_from_row).collect()
    }
}

pub(crate) struct PgRevocationStore {
    pg: Arc<Pg>,
}

impl PgRevocationStore {
    pub(crate) fn new(pg: Arc<Pg>) -> Self {
        PgRevocationStore { pg }
    }
}

fn revocation_key(serial_hex: &str) -> impl FnOnce() -> String + '_ {
    move || format!("gx_revocations/{serial_hex}")
}

async fn stored_revocation(
    tx: &Transaction<'_>,
    serial_hex: &str,
) -> Result<Option<Revocation>, TxError> {
    let rows = tx_query(
        tx,
        "SELECT revocation FROM gx_revocations WHERE serial_hex = $1",
        &[&serial_hex],
    )
    .await?;
    Ok(rows
        .first()
        .map(|r| decode(revocation_key(serial_hex), r.get(0)))
        .transpose()?)
}

async fn revoke_in(tx: &Transaction<'_>, revocation: &Revocation) -> Result<Revocation, TxError> {
    // The head row first: it serialises revokers, so the check below and the insert see the same state.
    let rows = tx_query(
        tx,
        "SELECT version FROM gx_log_heads WHERE log = 'revocations' FOR UPDATE",
        &[],
    )
    .await?;
    let head = rows.first().ok_or_else(|| StoreError::Corrupt {
        key: "gx_log_heads/revocations".into(),
        reason: "row missing".into(),
    })?;
    let head = version_of("gx_log_heads/revocations", head.get(0))?;
    if let Some(first) = stored_revocation(tx, &revocation.serial_hex).await? {
        return Ok(first);
    }
    let version = head + 1;
    let stored = Revocation {
        version,
        ..revocation.clone()
    };
    let version_column = to_bigint("revocation version", version)?;
    tx_execute(
        tx,
        "UPDATE gx_log_heads SET version = $1 WHERE log = 'revocations'",
        &[&version_column],
    )
    .await?;
    tx_execute(
        tx,
        "INSERT INTO gx_revocations (serial_hex, version, revocation) VALUES ($1, $2, $3)",
        &[&stored.serial_hex, &version_column, &stored.encode_to_vec()],
    )
    .await?;
    Ok(stored)
}

/// Rows of `(serial_hex, revocation)`, decoded.
fn revocations_of(rows: &[tokio_postgres::Row]) -> Result<Vec<Revocation>, StoreError> {
    rows.iter()
        .map(|r| {
            let serial: &str = r.get(0);
            decode(revocation_key(serial), r.get(1))
        })
        .collect()
}

#[async_trait]
impl RevocationStore for PgRevocationStore {
    async fn revoke(&self, revocation: Revocation) -> Result<Revocation, StoreError> {
        // Most repeated revokes end here, without taking the head lock. A committed row is durable.
        let rows = self
            .pg
            .query(
                "read a revocation",
                "SELECT revocation FROM gx_revocations WHERE serial_hex = $1",
                &[&revocation.serial_hex],
            )
            .await?;
        if let Some(row) = rows.first() {
            return decode(revocation_key(&revocation.serial_hex), row.get(0));
        }
        self.pg
            .write("revoke a certificate", &revocation, |tx, r| {
                Box::pin(revoke_in(tx, r))
            })
            .await
    }

    async fn list(&self) -> Result<Vec<Revocation>, StoreError> {
        let rows = self
            .pg
            .query(
                "list revocations",
                "SELECT serial_hex, revocation FROM gx_revocations ORDER BY serial_hex",
                &[],
            )
            .await?;
        revocations_of(&rows)
    }

    async fn changes_since(
        &self,
        after_version: u64,
        limit: usize,
    ) -> Result<Vec<Revocation>, StoreError> {
        if limit == 0 {
            return Ok(Vec::new());
        }
        let rows = self
            .pg
            .query(
                "read the revocation log",
                "SELECT serial_hex, revocation FROM gx_revocations WHERE version > $1 ORDER BY version LIMIT $2",
                &[&after_bound(after_version), &limit_of(limit)],
            )
            .await?;
        revocations_of(&rows)
    }

    async fn current_version(&self) -> Result<u64, StoreError> {
        head_version(&self.pg, "revocations").await
    }
}
