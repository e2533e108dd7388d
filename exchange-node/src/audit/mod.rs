//! The node's audit trail: every relayed request is one [`AuditRecord`], appended to a hash chain and
//! sealed from time to time with the node's Ed25519 signing key, so [`verify`] can tell exactly where an
//! entry was edited, removed or reordered, or the tail cut off.
//!
//! Chain: entry `n` stores `hash(n) = SHA-256("gx-audit-v<format>" ‖ n ‖ hash(n-1) ‖ record)`, with
//! `hash(0)` all zeros. Editing a record breaks its own hash; recomputing that hash breaks the next
//! entry's link; rewriting the whole rest of the chain breaks the last seal, which only the node's key can
//! make. Removing an entry leaves a gap in the sequence numbers; cutting the tail leaves a seal pointing
//! past the end. Entries after the last seal are chained but not signed: the sealer
//! ([`spawn_sealer`]) keeps that window short and closes it on shutdown.
//!
//! Records never hold a raw record key (a citizen identity number, say): [`KeyHasher`] turns it into an
//! HMAC-SHA-256 under a node secret, so the same key can be found in the log ([`query`] with
//! `record_key`) without being readable from it.
//!
//! # Format versions
//! Each stored entry carries its format version `v` (absent = 1), which selects the hash's domain tag.
//! - v1: the first format (record without `caller`, `purpose`, `error`).
//! - v2 (written now): the record may also carry `caller`, `purpose` and `error`. They are left out of the
//!   record's JSON when empty, so a v1 record decodes unchanged and hashes to the same bytes.
//!
//! A verifier meets an unknown version as [`Tampering::UnknownFormat`], never as a silent pass.
//!
//! # Keys
//! [`AuditKeys`] lives in two files beside the sled database, not in it: `audit-seal.key` (the Ed25519
//! secret that signs seals) and `audit-hash.key` (the HMAC secret of [`KeyHasher`]). Someone who can edit
//! the database, or a copy of it, still cannot re-seal a rewritten chain without the seal key, and backups
//! or copies of the database handed to an auditor carry neither secret. The public half is written to
//! `audit-seal.pub` for operators and registered with the directory
//! (`RegisterNodeRequest.audit_verifying_key_hex`), so a log can be checked against a key the node cannot
//! quietly replace: `exchange-node audit verify --data-dir DIR --public-key HEX` ([`run_verify_command`]).
//!
//! # Cost
//! [`AuditLog::append`] is on the relay's hot path: one serialisation, one SHA-256, one sled insert under
//! the chain-head lock, no flush (sled flushes every 500 ms; a crash may lose the last half second of
//! entries, which a seal never covered). [`AuditLog::seal`] signs and flushes; [`spawn_sealer`] runs it
//! periodically. [`query`] scans the log newest first and stops as soon as it has `limit + 1` matches:
//! a selective filter over a large log reads the whole log (there is no index; acceptable at the sizes a
//! node keeps, and it keeps the log append-only).

use std::fmt;
use std::io::Write as _;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use ed25519_dalek::{Signature, Signer, SigningKey, VerifyingKey};
use exchange_proto::v1::{AuditEntry, QueryAuditRequest, QueryAuditResponse, VerifyAuditResponse};
use hmac::{Hmac, KeyInit, Mac};
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};
use tokio::sync::watch;
use tokio::task::JoinHandle;

// Layout: `chain` (the hash chain on sled, seals, anchors, the sealer), `keys` (the secrets on disk),
// `verify` (where a trail was tampered with), `query` (`QueryAudit`), `cli` (the offline check); the
// record type, errors and the key hasher are here.
mod chain;
mod cli;
mod keys;
mod query;
mod verify;

pub use chain::*;
pub use cli::*;
pub use keys::*;
pub use query::*;
pub use verify::*;

const SEAL_DOMAIN: &[u8] = b"gx-audit-seal-v1";
/// The format new entries are written in (see the module docs).
pub const CURRENT_FORMAT: u32 = 2;

const ENTRIES_TREE: &str = "audit";
const SEALS_TREE: &str = "audit_seals";

/// The sled database's folder inside the node's `data_dir` (as [`crate::store::SledStore`] opens it).
pub const DB_DIR: &str = "node.sled";
/// The Ed25519 secret that signs seals, hex, in `data_dir`.
pub const SEAL_KEY_FILE: &str = "audit-seal.key";
/// The HMAC secret of [`KeyHasher`], hex, in `data_dir`.
pub const HASH_KEY_FILE: &str = "audit-hash.key";
/// The seal key's public half, hex, in `data_dir`, for operators.
pub const PUBLIC_KEY_FILE: &str = "audit-seal.pub";

/// [`query`]'s limit when the request gives none.
pub const DEFAULT_QUERY_LIMIT: u32 = 100;
/// [`query`]'s largest limit; larger ones are lowered to it.
pub const MAX_QUERY_LIMIT: u32 = 10_000;

/// Which end of a relay wrote the record.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Side {
    Consumer,
    Provider,
}

impl Side {
    /// `"consumer"` or `"provider"`, as [`AuditEntry::side`] has it.
    pub fn as_str(self) -> &'static str {
        match self {
            Side::Consumer => "consumer",
            Side::Provider => "provider",
        }
    }
}

/// One relayed request, as X-Road's operational monitoring records it: the shared message id, both
/// parties, what was asked and returned, the outcome, sizes and four timestamps (µs since the epoch).
///
/// Field order is part of the chain format (the hash covers the record's JSON): add fields at the end,
/// with `#[serde(default, skip_serializing_if = ...)]`, and bump [`CURRENT_FORMAT`].
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct AuditRecord {
    pub message_id: String,
    pub side: Side,
    pub consumer: String,
    pub provider: String,
    pub resource_code: String,
    /// [`KeyHasher::hash`] of the record key, or [`KeyHasher::hash_keys`] of several; never a key itself.
    pub key_hash: String,
    pub data_items: Vec<String>,
    /// gRPC status code of the answer (0 = OK).
    pub result_code: i32,
    pub request_bytes: u64,
    pub response_bytes: u64,
    pub request_in_us: i64,
    pub request_out_us: i64,
    pub response_in_us: i64,
    pub response_out_us: i64,
    /// The calling certificate's name: an app on the consumer side, a node on the provider side. (v2)
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub caller: String,
    /// Why the application asked. (v2)
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub purpose: String,
    /// The refusal's message when `result_code` is not 0. (v2)
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub error: String,
}

impl AuditRecord {
    /// The record as the `QueryAudit` API returns it.
    pub fn to_entry(&self, seq: u64) -> AuditEntry {
        AuditEntry {
            seq,
            message_id: self.message_id.clone(),
            side: self.side.as_str().to_string(),
            consumer: self.consumer.clone(),
            provider: self.provider.clone(),
            resource_code: self.resource_code.clone(),
            key_hash: self.key_hash.clone(),
            data_items: self.data_items.clone(),
            result_code: self.result_code,
            request_bytes: self.request_bytes,
            response_bytes: self.response_bytes,
            request_in_us: self.request_in_us,
            request_out_us: self.request_out_us,
            response_in_us: self.response_in_us,
            response_out_us: self.response_out_us,
            caller: self.caller.clone(),
            purpose: self.purpose.clone(),
            error: self.error.clone(),
        }
    }

    /// The department on the other side of the relay from this node's.
    pub fn peer(&self) -> &str {
        match self.side {
            Side::Consumer => &self.provider,
            Side::Provider => &self.consumer,
        }
    }
}

fn format_v1() -> u32 {
    1
}

/// A stored chain entry. Its JSON is built by hand in [`AuditLog::append`] (same layout as serde's).
#[derive(Clone, Debug, Serialize, Deserialize)]
struct ChainEntry {
    #[serde(default = "format_v1")]
    v: u32,
    seq: u64,
    prev_hash: String,
    hash: String,
    record: AuditRecord,
}

/// A signature over the chain up to `upto_seq`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Seal {
    pub upto_seq: u64,
    pub chain_hash: String,
    pub sealed_at_us: i64,
    pub signature: String,
}

#[derive(Debug, thiserror::Error)]
pub enum AuditError {
    #[error("audit store: {0}")]
    Store(#[from] sled::Error),
    #[error("audit entry {key}: {reason}")]
    Corrupt { key: String, reason: String },
    /// A key file is missing its twin, unreadable, malformed or too open; `reason` says how to fix it.
    #[error("audit key {}: {reason}", path.display())]
    Key { path: PathBuf, reason: String },
    /// A query the caller got wrong (maps to `INVALID_ARGUMENT`); `field` is the request's field.
    #[error("{field}: {reason}")]
    InvalidFilter { field: &'static str, reason: String },
}

/// How the local trail disagrees with the anchor the directory holds.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum AnchorMismatch {
    #[error("the directory holds a seal of this node up to entry {upto_seq}, but the log ends at entry {last}: sealed entries (and their seals) were cut off")]
    Cut { upto_seq: u64, last: u64 },
    #[error("the directory holds a seal of this node up to entry {upto_seq} that the log no longer matches: entries up to {upto_seq} were rewritten")]
    Rewritten { upto_seq: u64 },
    #[error("the directory's anchor up to entry {upto_seq} is not signed with this node's audit key (the key file was replaced?)")]
    NotOurs { upto_seq: u64 },
}

impl AnchorMismatch {
    /// The entry the mismatch concerns.
    pub fn seq(&self) -> u64 {
        match self {
            AnchorMismatch::Cut { last, .. } => last + 1,
            AnchorMismatch::Rewritten { upto_seq } | AnchorMismatch::NotOurs { upto_seq } => *upto_seq,
        }
    }
}

/// Where and how a log fails verification.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum Tampering {
    #[error("entry {seq} was edited: its contents do not match its hash")]
    Edited { seq: u64 },
    #[error("entry {seq} does not follow entry {prev}: an entry was edited and re-hashed, or entries were reordered")]
    BrokenLink { seq: u64, prev: u64 },
    #[error("entries {from} to {to} are missing")]
    Removed { from: u64, to: u64 },
    #[error("seal up to entry {upto_seq} does not match the chain: entries {from} to {upto_seq} were rewritten")]
    SealMismatch { from: u64, upto_seq: u64 },
    #[error("seal up to entry {upto_seq} has an invalid signature (forged, edited, or not made with this key)")]
    BadSignature { upto_seq: u64 },
    #[error("the log ends at entry {last} but a seal covers up to {upto_seq}: entries were cut off the end")]
    Truncated { last: u64, upto_seq: u64 },
    #[error("entry {seq} is unreadable (stored under key {key})")]
    Unreadable { seq: u64, key: String },
    #[error("entry {seq} has format version {version}, which this exchange-node does not know (edited, or written by a newer version)")]
    UnknownFormat { seq: u64, version: u32 },
    #[error("the seal stored under key {key} is unreadable")]
    UnreadableSeal { key: String },
}

impl Tampering {
    /// The first entry concerned (`VerifyAuditResponse.problem_seq`): the edited, unlinked, first
    /// missing or unreadable entry; for a seal that does not match, the first entry after the previous
    /// good seal; for a seal with a bad signature or an unreadable seal, the entry it claims to cover up to.
    pub fn first_seq(&self) -> u64 {
        match *self {
            Tampering::Edited { seq }
            | Tampering::BrokenLink { seq, .. }
            | Tampering::Unreadable { seq, .. }
            | Tampering::UnknownFormat { seq, .. } => seq,
            Tampering::Removed { from, .. } | Tampering::SealMismatch { from, .. } => from,
            Tampering::BadSignature { upto_seq } => upto_seq,
            Tampering::Truncated { last, .. } => last + 1,
            Tampering::UnreadableSeal { ref key } => seq_of_key(key_bytes(key).as_deref().unwrap_or_default()),
        }
    }
}

fn key_bytes(hex_key: &str) -> Option<Vec<u8>> {
    hex::decode(hex_key).ok()
}

/// The sequence number a tree key stands for (0 if the key is not 8 bytes).
fn seq_of_key(key: &[u8]) -> u64 {
    u64::from_be_bytes(key.try_into().unwrap_or([0; 8]))
}

/// What a clean verification saw.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Verified {
    pub entries: u64,
    pub seals: u64,
    /// Entries after the last seal: intact as a chain, but not yet covered by a signature.
    pub unsealed: u64,
}

/// Keyed hash of record keys (HMAC-SHA-256), so logs and audit entries never carry them in clear.
#[derive(Clone)]
pub struct KeyHasher {
    key: [u8; 32],
}

impl KeyHasher {
    pub fn new(key: [u8; 32]) -> Self {
        KeyHasher { key }
    }

    pub fn hash(&self, record_key: &str) -> String {
        let mut mac = <Hmac<Sha256> as KeyInit>::new_from_slice(&self.key).expect("HMAC takes any key length");
        mac.update(record_key.as_bytes());
        hex::encode(mac.finalize().into_bytes())
    }

    /// [`AuditRecord::key_hash`] of a request for several keys: the hash of each key, in request order,
    /// joined by `,`. A `record_key` query matches an entry when its hash is one of them. (One key gives
    /// the same string as [`KeyHasher::hash`].)
    pub fn hash_keys(&self, record_keys: &[String]) -> String {
        let mut out = String::with_capacity(record_keys.len() * 65);
        for (i, key) in record_keys.iter().enumerate() {
            if i > 0 {
                out.push(',');
            }
            out.push_str(&self.hash(key));
        }
        out
    }
}

impl fmt::Debug for KeyHasher {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("KeyHasher(..)")
    }
}

/// 32 fresh random bytes, for a new signing key or HMAC key.
pub fn random_key() -> [u8; 32] {
    let mut key = [0u8; 32];
    getrandom::fill(&mut key).expect("OS randomness");
    key
}

/// Microseconds since the Unix epoch, now.
pub fn now_us() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| i64::try_from(d.as_micros()).unwrap_or(i64::MAX))
}

#[cfg(test)]
mod tests;
