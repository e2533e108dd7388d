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

// ---------------------------------------------------------------------------------------------------
// Keys on disk

/// The node's two audit secrets, loaded from (or created in) its `data_dir`. See the module docs for why
/// they are files beside the database rather than records in it.
pub struct AuditKeys {
    signing: SigningKey,
    hasher: KeyHasher,
}

impl fmt::Debug for AuditKeys {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("AuditKeys").field("verifying_key", &self.verifying_key_hex()).finish_non_exhaustive()
    }
}

const SEAL_KEY_HEADER: &str = "# gov-exchange audit seal key: Ed25519 secret key, hex. Keep it private (mode 0600) and backed up:\n\
# without it this node cannot seal its audit log; with it anyone can forge seals. Public half: audit-seal.pub.";
const HASH_KEY_HEADER: &str = "# gov-exchange audit hash key: HMAC-SHA-256 secret for record keys in the audit log, hex. Keep it\n\
# private (mode 0600) and backed up: without it, audit entries can no longer be searched by record key.";

impl AuditKeys {
    /// Loads `audit-seal.key` and `audit-hash.key` from `data_dir`, creating both (mode 0600, never
    /// overwriting) on the node's first start, and (re)writes `audit-seal.pub`.
    ///
    /// Refuses — with an error saying how to fix it — a key file that is unreadable, malformed, readable
    /// or writable by group or others, or present without its twin (one key alone means the other was
    /// lost: generating a fresh one would silently break verification or record-key search).
    pub fn load_or_create(data_dir: &Path) -> Result<AuditKeys, AuditError> {
        std::fs::create_dir_all(data_dir)
            .map_err(|e| key_error(data_dir, format!("cannot create the data directory: {e}")))?;
        let seal_path = data_dir.join(SEAL_KEY_FILE);
        let hash_path = data_dir.join(HASH_KEY_FILE);
        match (file_exists(&seal_path)?, file_exists(&hash_path)?) {
            (true, false) => return Err(missing_twin(&hash_path, &seal_path)),
            (false, true) => return Err(missing_twin(&seal_path, &hash_path)),
            _ => {}
        }
        let seal = load_or_create_secret(&seal_path, SEAL_KEY_HEADER)?;
        let hash = load_or_create_secret(&hash_path, HASH_KEY_HEADER)?;
        let keys = AuditKeys { signing: SigningKey::from_bytes(&seal), hasher: KeyHasher::new(hash) };
        keys.write_public_key(&data_dir.join(PUBLIC_KEY_FILE))?;
        Ok(keys)
    }

    /// Keys held in memory only (tests, tools).
    pub fn from_secrets(seal: [u8; 32], hash: [u8; 32]) -> AuditKeys {
        AuditKeys { signing: SigningKey::from_bytes(&seal), hasher: KeyHasher::new(hash) }
    }

    /// The seal key, for [`AuditLog::open`] (which takes a copy).
    pub fn signing_key(&self) -> &SigningKey {
        &self.signing
    }

    /// The record-key hasher, for the relay and for [`query`].
    pub fn hasher(&self) -> &KeyHasher {
        &self.hasher
    }

    pub fn verifying_key(&self) -> VerifyingKey {
        self.signing.verifying_key()
    }

    /// The seal key's public half, hex: what `audit-seal.pub` holds and the node registers with the
    /// directory (`RegisterNodeRequest.audit_verifying_key_hex`).
    pub fn verifying_key_hex(&self) -> String {
        hex::encode(self.verifying_key().to_bytes())
    }

    fn write_public_key(&self, path: &Path) -> Result<(), AuditError> {
        let text = format!("{}\n", self.verifying_key_hex());
        match std::fs::read_to_string(path) {
            Ok(existing) if existing == text => return Ok(()),
            Ok(_) => tracing::warn!(file = %path.display(), "replacing an audit-seal.pub that did not match audit-seal.key"),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => tracing::warn!(file = %path.display(), error = %e, "replacing an unreadable audit-seal.pub"),
        }
        // Through a temporary file and a rename, so a reader never sees half a key.
        let tmp = path.with_extension("pub.tmp");
        let write = || -> std::io::Result<()> {
            let mut f = std::fs::File::create(&tmp)?;
            f.write_all(text.as_bytes())?;
            f.sync_all()?;
            std::fs::rename(&tmp, path)
        };
        write().map_err(|e| key_error(path, format!("cannot write the public key: {e}")))
    }
}

fn key_error(path: &Path, reason: impl Into<String>) -> AuditError {
    AuditError::Key { path: path.to_path_buf(), reason: reason.into() }
}

fn missing_twin(missing: &Path, present: &Path) -> AuditError {
    key_error(
        missing,
        format!(
            "missing, but {} exists: restore it from the backup of this data directory. Only if this node has \
             never written audit entries, delete {} too and start again to create a fresh pair",
            present.display(),
            present.display()
        ),
    )
}

fn file_exists(path: &Path) -> Result<bool, AuditError> {
    match std::fs::symlink_metadata(path) {
        Ok(_) => Ok(true),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(false),
        Err(e) => Err(key_error(path, format!("cannot check it: {e}"))),
    }
}

fn load_or_create_secret(path: &Path, header: &str) -> Result<[u8; 32], AuditError> {
    if file_exists(path)? {
        return load_secret(path);
    }
    let key = random_key();
    let text = format!("{header}\n{}\n", hex::encode(key));
    // Written in full to a private temporary file, then linked into place: the key file appears
    // complete or not at all, and a link never replaces an existing file.
    let file_name = path.file_name().and_then(|n| n.to_str()).unwrap_or("audit.key");
    let tmp = path.with_file_name(format!(".{file_name}.tmp"));
    let io = |e: std::io::Error| key_error(path, format!("cannot create it: {e}"));
    match std::fs::remove_file(&tmp) {
        Ok(()) => {}
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
        Err(e) => return Err(io(e)),
    }
    let mut options = std::fs::OpenOptions::new();
    options.write(true).create_new(true);
    #[cfg(unix)]
    {
        use std::os::unix::fs::OpenOptionsExt;
        options.mode(0o600);
    }
    let mut f = options.open(&tmp).map_err(io)?;
    f.write_all(text.as_bytes()).and_then(|()| f.sync_all()).map_err(io)?;
    drop(f);
    let linked = std::fs::hard_link(&tmp, path);
    let _ = std::fs::remove_file(&tmp);
    match linked {
        Ok(()) => {}
        // Another process created it meanwhile: use theirs.
        Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => return load_secret(path),
        Err(e) => return Err(io(e)),
    }
    if let Some(dir) = path.parent() {
        // Make the new directory entry durable too (best effort: not every platform can open a folder).
        if let Ok(d) = std::fs::File::open(dir) {
            let _ = d.sync_all();
        }
    }
    tracing::info!(file = %path.display(), "created a new audit key");
    Ok(key)
}

fn load_secret(path: &Path) -> Result<[u8; 32], AuditError> {
    let meta = std::fs::metadata(path).map_err(|e| key_error(path, format!("cannot read it: {e}")))?;
    if !meta.is_file() {
        return Err(key_error(path, "is not a regular file: replace it with the key file from your backup"));
    }
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        let mode = meta.permissions().mode() & 0o777;
        if mode & 0o077 != 0 {
            return Err(key_error(
                path,
                format!(
                    "has mode {mode:04o}, so users other than the node's can read or change it: run `chmod 600 {}` \
                     (and check nobody copied it meanwhile)",
                    path.display()
                ),
            ));
        }
    }
    let text = std::fs::read_to_string(path).map_err(|e| {
        key_error(path, format!("cannot read it: {e} (it must be readable by the user the node runs as)"))
    })?;
    parse_hex_key(&text).ok_or_else(|| {
        key_error(
            path,
            "is malformed: expected 64 hex digits (32 bytes) after optional `#` comment lines. Restore it from \
             your backup; only if this node has never written audit entries, delete both audit-*.key files to \
             create new ones",
        )
    })
}

/// 32 bytes from hex text, ignoring blank lines and `#` comment lines.
fn parse_hex_key(text: &str) -> Option<[u8; 32]> {
    let digits: String = text
        .lines()
        .map(str::trim)
        .filter(|l| !l.is_empty() && !l.starts_with('#'))
        .collect();
    let bytes = hex::decode(digits).ok()?;
    bytes.try_into().ok()
}

/// An Ed25519 public key from hex text (`#` comment lines allowed); weak (small-order) keys are refused.
pub fn parse_verifying_key(text: &str) -> Result<VerifyingKey, String> {
    let bytes = parse_hex_key(text).ok_or("expected 64 hex digits (an Ed25519 public key)")?;
    let key = VerifyingKey::from_bytes(&bytes).map_err(|e| format!("not a valid Ed25519 public key: {e}"))?;
    if key.is_weak() {
        return Err("a weak (small-order) Ed25519 key, which would accept forged seals".into());
    }
    Ok(key)
}

// ---------------------------------------------------------------------------------------------------
// Chain

fn entry_domain(format: u32) -> Option<&'static [u8]> {
    match format {
        1 => Some(b"gx-audit-v1"),
        2 => Some(b"gx-audit-v2"),
        _ => None,
    }
}

fn entry_hash_json(domain: &[u8], seq: u64, prev_hash: &str, record_json: &[u8]) -> String {
    let mut h = Sha256::new();
    h.update(domain);
    h.update(seq.to_be_bytes());
    h.update(prev_hash.as_bytes());
    h.update(record_json);
    hex::encode(h.finalize())
}

/// The hash an entry of format `format` must carry, or `None` for an unknown format.
fn entry_hash(format: u32, seq: u64, prev_hash: &str, record: &AuditRecord) -> Option<String> {
    let domain = entry_domain(format)?;
    Some(entry_hash_json(domain, seq, prev_hash, &serde_json::to_vec(record).expect("records serialize")))
}

fn seal_message(upto_seq: u64, chain_hash: &str) -> Vec<u8> {
    let mut m = SEAL_DOMAIN.to_vec();
    m.extend_from_slice(&upto_seq.to_be_bytes());
    m.extend_from_slice(chain_hash.as_bytes());
    m
}

const GENESIS: &str = "0000000000000000000000000000000000000000000000000000000000000000";

/// The append-only log on two sled trees (`audit`, `audit_seals`) of the node's database.
pub struct AuditLog {
    entries: sled::Tree,
    seals: sled::Tree,
    signer: SigningKey,
    /// (last sequence number, its hash): appends are serialised so the chain stays linear.
    head: Mutex<(u64, String)>,
}

impl AuditLog {
    pub fn open(db: &sled::Db, signer: SigningKey) -> Result<Self, AuditError> {
        let entries = db.open_tree(ENTRIES_TREE)?;
        let seals = db.open_tree(SEALS_TREE)?;
        let head = match entries.last()? {
            Some((key, value)) => {
                let entry = decode_entry(&key, &value)?;
                (entry.seq, entry.hash)
            }
            None => (0, GENESIS.to_string()),
        };
        Ok(AuditLog { entries, seals, signer, head: Mutex::new(head) })
    }

    /// The key that verifies this log's seals.
    pub fn verifying_key(&self) -> VerifyingKey {
        self.signer.verifying_key()
    }

    /// The last sequence number (the number of entries, in an intact log).
    pub fn last_seq(&self) -> u64 {
        self.head.lock().expect("audit head lock").0
    }

    /// Entries in the log: [`AuditLog::last_seq`] (for `NodeStatus.audit_entries`; no scan).
    pub fn len(&self) -> u64 {
        self.last_seq()
    }

    pub fn is_empty(&self) -> bool {
        self.last_seq() == 0
    }

    /// Appends a record; returns its sequence number. Cheap enough for every relayed request: no flush
    /// (sled writes it out within 500 ms; [`AuditLog::seal`] and [`AuditLog::flush`] make it durable).
    pub fn append(&self, record: AuditRecord) -> Result<u64, AuditError> {
        // Serialise outside the lock; inside it only the hash and the insert.
        let record_json = serde_json::to_vec(&record).expect("records serialize");
        let domain = entry_domain(CURRENT_FORMAT).expect("the current format has a domain");
        let mut head = self.head.lock().expect("audit head lock");
        let seq = head.0 + 1;
        let hash = entry_hash_json(domain, seq, &head.1, &record_json);
        // The same JSON serde would write for `ChainEntry`, without serialising the record twice.
        let mut value = Vec::with_capacity(record_json.len() + 200);
        write!(
            value,
            r#"{{"v":{CURRENT_FORMAT},"seq":{seq},"prev_hash":"{}","hash":"{hash}","record":"#,
            head.1
        )
        .expect("writing to a Vec");
        value.extend_from_slice(&record_json);
        value.push(b'}');
        self.entries.insert(seq.to_be_bytes(), value)?;
        *head = (seq, hash);
        Ok(seq)
    }

    /// Makes every append so far durable.
    pub async fn flush(&self) -> Result<(), AuditError> {
        self.entries.flush_async().await?;
        Ok(())
    }

    /// Signs the chain up to its current head, if anything was appended since the last seal, and flushes
    /// the database (entries and seal). Blocks on the disk: call it from a blocking thread in async code.
    pub fn seal(&self, now_us: i64) -> Result<Option<Seal>, AuditError> {
        let head = self.head.lock().expect("audit head lock").clone();
        let last_sealed = match self.seals.last()? {
            Some((key, _)) => seq_of_key(&key),
            None => 0,
        };
        if head.0 == 0 || head.0 == last_sealed {
            return Ok(None);
        }
        let signature = self.signer.sign(&seal_message(head.0, &head.1));
        let seal = Seal {
            upto_seq: head.0,
            chain_hash: head.1,
            sealed_at_us: now_us,
            signature: hex::encode(signature.to_bytes()),
        };
        self.seals.insert(head.0.to_be_bytes(), serde_json::to_vec(&seal).expect("seals serialize"))?;
        // One flush for the whole database: the entries up to the seal become durable with it.
        self.seals.flush()?;
        Ok(Some(seal))
    }

    /// The latest seal, if any (sent to the directory with each heartbeat as an anchor).
    pub fn last_seal(&self) -> Result<Option<Seal>, AuditError> {
        match self.seals.last()? {
            None => Ok(None),
            Some((key, value)) => serde_json::from_slice(&value).map(Some).map_err(|e| AuditError::Corrupt {
                key: format!("seal {}", seq_of_key(&key)),
                reason: e.to_string(),
            }),
        }
    }

    /// Checks an anchor the directory holds (a seal this node reported earlier) against the local trail:
    /// its signature must be this node's, the entry it covers must still exist, and the chain hash there
    /// must be the anchored one. `Err` describes the tampering.
    pub fn check_anchor(&self, anchor: &Seal) -> Result<(), AnchorMismatch> {
        let signature = hex::decode(&anchor.signature)
            .ok()
            .and_then(|b| <[u8; 64]>::try_from(b.as_slice()).ok())
            .map(|b| Signature::from_bytes(&b));
        let signed = signature.is_some_and(|sig| {
            self.verifying_key().verify_strict(&seal_message(anchor.upto_seq, &anchor.chain_hash), &sig).is_ok()
        });
        if !signed {
            return Err(AnchorMismatch::NotOurs { upto_seq: anchor.upto_seq });
        }
        let stored = self.entries.get(anchor.upto_seq.to_be_bytes()).ok().flatten();
        let Some(stored) = stored else {
            return Err(AnchorMismatch::Cut { upto_seq: anchor.upto_seq, last: self.last_seq() });
        };
        let hash = serde_json::from_slice::<ChainEntry>(&stored).map(|e| e.hash).unwrap_or_default();
        if hash != anchor.chain_hash {
            return Err(AnchorMismatch::Rewritten { upto_seq: anchor.upto_seq });
        }
        Ok(())
    }

    /// Records in sequence order.
    pub fn records(&self) -> impl Iterator<Item = Result<(u64, AuditRecord), AuditError>> + '_ {
        self.entries.iter().map(|kv| {
            let (k, v) = kv?;
            decode_entry(&k, &v).map(|e| (e.seq, e.record))
        })
    }
}

fn decode_entry(key: &[u8], value: &[u8]) -> Result<ChainEntry, AuditError> {
    serde_json::from_slice(value).map_err(|e| AuditError::Corrupt { key: hex::encode(key), reason: e.to_string() })
}

/// Seals `log` every `every` when something was appended since the last seal, and once more when
/// `shutdown` turns true (or its sender is dropped); then the task ends. Await the handle after the relay
/// has stopped appending, so the final seal covers every entry. Seal errors are logged, not fatal: the
/// entries stay chained and the next seal covers them.
pub fn spawn_sealer(log: Arc<AuditLog>, every: Duration, mut shutdown: watch::Receiver<bool>) -> JoinHandle<()> {
    let every = every.max(Duration::from_millis(10));
    tokio::spawn(async move {
        let mut ticks = tokio::time::interval_at(tokio::time::Instant::now() + every, every);
        ticks.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            if *shutdown.borrow_and_update() {
                break;
            }
            tokio::select! {
                _ = ticks.tick() => seal_off_thread(&log).await,
                changed = shutdown.changed() => {
                    if changed.is_err() {
                        break;
                    }
                }
            }
        }
        seal_off_thread(&log).await;
    })
}

async fn seal_off_thread(log: &Arc<AuditLog>) {
    let log = Arc::clone(log);
    match tokio::task::spawn_blocking(move || log.seal(now_us())).await {
        Ok(Ok(Some(seal))) => tracing::debug!(upto_seq = seal.upto_seq, "audit log sealed"),
        Ok(Ok(None)) => {}
        Ok(Err(e)) => tracing::error!(error = %e, "sealing the audit log failed; the next seal will cover these entries"),
        Err(e) => tracing::error!(error = %e, "the audit sealer's blocking task failed"),
    }
}

// ---------------------------------------------------------------------------------------------------
// Verification

fn existing_tree(db: &sled::Db, name: &str) -> Result<Option<sled::Tree>, AuditError> {
    // Checked first so that verifying a database never creates trees in it.
    if db.tree_names().iter().any(|n| n.as_ref() == name.as_bytes()) {
        Ok(Some(db.open_tree(name)?))
    } else {
        Ok(None)
    }
}

/// Checks the whole log: every entry's hash, every link, no gaps, every seal's signature and chain hash.
/// Stops at the first problem and says where it is. Does not write to the database.
pub fn verify(db: &sled::Db, key: &VerifyingKey) -> Result<Result<Verified, Tampering>, AuditError> {
    verify_trees(existing_tree(db, ENTRIES_TREE)?.as_ref(), existing_tree(db, SEALS_TREE)?.as_ref(), key)
}

fn verify_trees(
    entries: Option<&sled::Tree>,
    seals_tree: Option<&sled::Tree>,
    key: &VerifyingKey,
) -> Result<Result<Verified, Tampering>, AuditError> {
    // Seals first: entries appended meanwhile (a live log) are then at worst counted as unsealed.
    let mut seals: Vec<Seal> = Vec::new();
    for kv in seals_tree.into_iter().flat_map(|t| t.iter()) {
        let (k, v) = kv?;
        let Ok(seal) = serde_json::from_slice::<Seal>(&v) else {
            return Ok(Err(Tampering::UnreadableSeal { key: hex::encode(&k) }));
        };
        seals.push(seal);
    }
    for seal in &seals {
        let sig = hex::decode(&seal.signature).ok().and_then(|b| Signature::from_slice(&b).ok());
        let valid =
            sig.is_some_and(|sig| key.verify_strict(&seal_message(seal.upto_seq, &seal.chain_hash), &sig).is_ok());
        if !valid {
            return Ok(Err(Tampering::BadSignature { upto_seq: seal.upto_seq }));
        }
    }
    let mut prev_seq = 0u64;
    let mut prev_hash = GENESIS.to_string();
    let mut last_good_seal = 0u64;
    let mut seal_iter = seals.iter().peekable();
    let mut count = 0u64;
    for kv in entries.into_iter().flat_map(|t| t.iter()) {
        let (k, v) = kv?;
        let key_seq = seq_of_key(&k);
        let Ok(entry) = serde_json::from_slice::<ChainEntry>(&v) else {
            return Ok(Err(Tampering::Unreadable { seq: key_seq, key: hex::encode(&k) }));
        };
        if entry.seq != key_seq {
            return Ok(Err(Tampering::BrokenLink { seq: key_seq, prev: prev_seq }));
        }
        if entry.seq > prev_seq + 1 {
            return Ok(Err(Tampering::Removed { from: prev_seq + 1, to: entry.seq - 1 }));
        }
        let Some(expected) = entry_hash(entry.v, entry.seq, &entry.prev_hash, &entry.record) else {
            return Ok(Err(Tampering::UnknownFormat { seq: entry.seq, version: entry.v }));
        };
        if expected != entry.hash {
            return Ok(Err(Tampering::Edited { seq: entry.seq }));
        }
        if entry.prev_hash != prev_hash {
            return Ok(Err(Tampering::BrokenLink { seq: entry.seq, prev: prev_seq }));
        }
        while let Some(seal) = seal_iter.peek() {
            if seal.upto_seq > entry.seq {
                break;
            }
            if seal.upto_seq == entry.seq {
                if seal.chain_hash != entry.hash {
                    return Ok(Err(Tampering::SealMismatch { from: last_good_seal + 1, upto_seq: seal.upto_seq }));
                }
                last_good_seal = seal.upto_seq;
            }
            seal_iter.next();
        }
        prev_seq = entry.seq;
        prev_hash = entry.hash;
        count += 1;
    }
    if let Some(seal) = seal_iter.next() {
        return Ok(Err(Tampering::Truncated { last: prev_seq, upto_seq: seal.upto_seq }));
    }
    let last_sealed = seals.last().map_or(0, |s| s.upto_seq);
    Ok(Ok(Verified { entries: count, seals: seals.len() as u64, unsealed: prev_seq - last_sealed.min(prev_seq) }))
}

/// [`verify`] as the `VerifyAudit` API answers it. A log that cannot be read at all (a storage error) is
/// reported as not intact, with the error as the problem and `problem_seq` 0.
pub fn verify_report(db: &sled::Db, key: &VerifyingKey) -> VerifyAuditResponse {
    report(verify(db, key), key)
}

fn report(result: Result<Result<Verified, Tampering>, AuditError>, key: &VerifyingKey) -> VerifyAuditResponse {
    let verifying_key_hex = hex::encode(key.to_bytes());
    match result {
        Ok(Ok(v)) => VerifyAuditResponse {
            intact: true,
            entries: v.entries,
            seals: v.seals,
            unsealed: v.unsealed,
            verifying_key_hex,
            ..Default::default()
        },
        Ok(Err(t)) => VerifyAuditResponse {
            intact: false,
            problem: t.to_string(),
            problem_seq: t.first_seq(),
            verifying_key_hex,
            ..Default::default()
        },
        Err(e) => {
            tracing::error!(error = %e, "the audit log could not be read for verification");
            VerifyAuditResponse {
                intact: false,
                problem: format!("the audit log could not be read: {e}"),
                verifying_key_hex,
                ..Default::default()
            }
        }
    }
}

impl AuditLog {
    /// [`verify`] of this (live) log against its own key. Entries appended while it runs count as unsealed.
    pub fn verify(&self) -> Result<Result<Verified, Tampering>, AuditError> {
        verify_trees(Some(&self.entries), Some(&self.seals), &self.verifying_key())
    }

    /// [`verify_report`] of this (live) log against its own key (the response names the key, for
    /// comparison with the one registered at the directory).
    pub fn verify_report(&self) -> VerifyAuditResponse {
        report(self.verify(), &self.verifying_key())
    }
}

// ---------------------------------------------------------------------------------------------------
// Query

/// What [`query`] reads: the node's database, or an open [`AuditLog`] (also behind an `Arc`).
pub trait AuditSource {
    fn audit_entries(&self) -> Result<sled::Tree, AuditError>;
}

impl AuditSource for sled::Db {
    fn audit_entries(&self) -> Result<sled::Tree, AuditError> {
        Ok(self.open_tree(ENTRIES_TREE)?)
    }
}

impl AuditSource for AuditLog {
    fn audit_entries(&self) -> Result<sled::Tree, AuditError> {
        Ok(self.entries.clone())
    }
}

impl<T: AuditSource + ?Sized> AuditSource for Arc<T> {
    fn audit_entries(&self) -> Result<sled::Tree, AuditError> {
        (**self).audit_entries()
    }
}

/// The `QueryAudit` filter is the request itself: every non-empty / non-zero field must match.
/// - `from_unix_ms` / `to_unix_ms`: `request_in_us` in `[from, to)` (Unix ms; 0 = open on that side).
/// - `peer`: the other side's department (the provider in a consumer-side entry, the consumer in a
///   provider-side one).
/// - `resource_code`, `message_id`: equal.
/// - `result`: `ok` (code 0), `error` (any other code), or a gRPC code name such as `PERMISSION_DENIED`
///   (case-insensitive); anything else is [`AuditError::InvalidFilter`].
/// - `record_key`: a key in clear, hashed with the node's [`KeyHasher`]; matches an entry whose `key_hash`
///   (one hash, or several joined by `,`, see [`KeyHasher::hash_keys`]) contains it.
/// - `limit`: 0 = [`DEFAULT_QUERY_LIMIT`]; at most [`MAX_QUERY_LIMIT`] (larger ones are lowered).
pub type AuditFilter = QueryAuditRequest;

use client_sdk::status::GRPC_CODE_NAMES as GRPC_CODES;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum ResultFilter {
    Any,
    Ok,
    Error,
    Code(i32),
}

impl ResultFilter {
    fn parse(text: &str) -> Result<Self, AuditError> {
        let t = text.trim();
        if t.is_empty() {
            return Ok(ResultFilter::Any);
        }
        if t.eq_ignore_ascii_case("ok") {
            return Ok(ResultFilter::Ok);
        }
        if t.eq_ignore_ascii_case("error") {
            return Ok(ResultFilter::Error);
        }
        match GRPC_CODES.iter().position(|c| c.eq_ignore_ascii_case(t)) {
            Some(code) => Ok(ResultFilter::Code(code as i32)),
            None => Err(AuditError::InvalidFilter {
                field: "result",
                reason: format!(
                    "{text:?} is not \"ok\", \"error\" or a gRPC code name ({})",
                    GRPC_CODES.join(", ")
                ),
            }),
        }
    }

    fn matches(self, code: i32) -> bool {
        match self {
            ResultFilter::Any => true,
            ResultFilter::Ok => code == 0,
            ResultFilter::Error => code != 0,
            ResultFilter::Code(c) => code == c,
        }
    }
}

/// An [`AuditFilter`] checked and ready to match.
struct Matcher<'a> {
    from_us: Option<i64>,
    to_us: Option<i64>,
    filter: &'a AuditFilter,
    result: ResultFilter,
    key_hash: Option<String>,
}

impl<'a> Matcher<'a> {
    fn new(filter: &'a AuditFilter, hasher: &KeyHasher) -> Result<Self, AuditError> {
        let from_us = (filter.from_unix_ms > 0).then(|| filter.from_unix_ms.saturating_mul(1000));
        let to_us = (filter.to_unix_ms > 0).then(|| filter.to_unix_ms.saturating_mul(1000));
        if let (Some(from), Some(to)) = (from_us, to_us) {
            if from > to {
                return Err(AuditError::InvalidFilter {
                    field: "from_unix_ms",
                    reason: format!("{} is after to_unix_ms {}", filter.from_unix_ms, filter.to_unix_ms),
                });
            }
        }
        Ok(Matcher {
            from_us,
            to_us,
            filter,
            result: ResultFilter::parse(&filter.result)?,
            key_hash: (!filter.record_key.is_empty()).then(|| hasher.hash(&filter.record_key)),
        })
    }

    fn matches(&self, r: &AuditRecord) -> bool {
        let f = self.filter;
        self.from_us.is_none_or(|from| r.request_in_us >= from)
            && self.to_us.is_none_or(|to| r.request_in_us < to)
            && (f.peer.is_empty() || r.peer() == f.peer)
            && (f.resource_code.is_empty() || r.resource_code == f.resource_code)
            && (f.message_id.is_empty() || r.message_id == f.message_id)
            && self.result.matches(r.result_code)
            && self.key_hash.as_ref().is_none_or(|h| r.key_hash.split(',').any(|k| k == h))
    }
}

/// `QueryAudit`: entries matching `filter`, newest first, at most `limit` of them; whether more matched
/// (`truncated`); and the log's size (its last sequence number, which is the number of entries in an
/// intact log).
///
/// Scans the log from the newest entry backwards and stops at the first match past the limit, so a recent
/// or unselective query is quick and a selective one over a big log reads all of it (no index). Entries
/// that cannot be decoded are skipped with a warning (`VerifyAudit` reports them).
pub fn query(
    source: &(impl AuditSource + ?Sized),
    filter: &AuditFilter,
    hasher: &KeyHasher,
) -> Result<(Vec<AuditEntry>, bool, u64), AuditError> {
    let matcher = Matcher::new(filter, hasher)?;
    let limit = match filter.limit {
        0 => DEFAULT_QUERY_LIMIT,
        n => n.min(MAX_QUERY_LIMIT),
    } as usize;
    let tree = source.audit_entries()?;
    let total = tree.last()?.map_or(0, |(k, _)| seq_of_key(&k));
    let mut found = Vec::new();
    let mut truncated = false;
    for kv in tree.iter().rev() {
        let (k, v) = kv?;
        let entry = match decode_entry(&k, &v) {
            Ok(entry) => entry,
            Err(e) => {
                tracing::warn!(error = %e, "skipping an unreadable audit entry");
                continue;
            }
        };
        if !matcher.matches(&entry.record) {
            continue;
        }
        if found.len() == limit {
            truncated = true;
            break;
        }
        found.push(entry.record.to_entry(entry.seq));
    }
    Ok((found, truncated, total))
}

/// [`query`] as the `QueryAudit` API answers it.
pub fn query_response(
    source: &(impl AuditSource + ?Sized),
    request: &QueryAuditRequest,
    hasher: &KeyHasher,
) -> Result<QueryAuditResponse, AuditError> {
    let (entries, truncated, total_entries) = query(source, request, hasher)?;
    Ok(QueryAuditResponse { entries, total_entries, truncated })
}

// ---------------------------------------------------------------------------------------------------
// Offline verification (`exchange-node audit verify`)

/// Exit status of `exchange-node audit verify`: the log is intact.
pub const EXIT_INTACT: i32 = 0;
/// The log was tampered with.
pub const EXIT_TAMPERED: i32 = 1;
/// The check could not be made (no database, database in use, no key, unreadable storage).
pub const EXIT_ERROR: i32 = 2;

/// `exchange-node audit verify --data-dir DIR [--public-key HEX|FILE]`: verifies a stopped node's log
/// and writes the verdict to `out`, warnings and errors to `err`; returns the exit status
/// ([`EXIT_INTACT`], [`EXIT_TAMPERED`] or [`EXIT_ERROR`]).
///
/// Without `public_key` it uses `audit-seal.pub` from `data_dir`, which proves less: whoever can rewrite
/// the log on that disk can replace that file too. The key the node registered with the directory
/// (`NodeInfo.audit_verifying_key_hex`) is the one to check against.
pub fn run_verify_command(
    data_dir: &Path,
    public_key: Option<&str>,
    out: &mut dyn std::io::Write,
    err: &mut dyn std::io::Write,
) -> i32 {
    match verify_command(data_dir, public_key, out, err) {
        Ok(code) => code,
        Err(message) => {
            let _ = writeln!(err, "error: {message}");
            EXIT_ERROR
        }
    }
}

pub use crate::store::{is_lock_error, open_db_waiting};

fn verify_command(
    data_dir: &Path,
    public_key: Option<&str>,
    out: &mut dyn std::io::Write,
    err: &mut dyn std::io::Write,
) -> Result<i32, String> {
    let pub_file = data_dir.join(PUBLIC_KEY_FILE);
    let key = match public_key {
        Some(arg) => {
            let key = match parse_verifying_key(arg) {
                Ok(key) => key,
                Err(hex_problem) => {
                    let text = std::fs::read_to_string(arg).map_err(|e| {
                        format!("--public-key {arg}: not a public key ({hex_problem}), nor a readable file ({e})")
                    })?;
                    parse_verifying_key(&text).map_err(|e| format!("--public-key file {arg}: {e}"))?
                }
            };
            if let Ok(on_disk) = std::fs::read_to_string(&pub_file) {
                if parse_verifying_key(&on_disk).ok() != Some(key) {
                    let _ = writeln!(
                        err,
                        "warning: {} holds a different key than --public-key: the node's key was replaced, or this \
                         is another node's data directory",
                        pub_file.display()
                    );
                }
            }
            key
        }
        None => {
            let text = std::fs::read_to_string(&pub_file).map_err(|e| {
                format!(
                    "{}: {e}; pass --public-key with the node's key as registered with the directory",
                    pub_file.display()
                )
            })?;
            let key = parse_verifying_key(&text).map_err(|e| format!("{}: {e}", pub_file.display()))?;
            let _ = writeln!(
                err,
                "warning: checking against {}, which sits on the same disk as the log: whoever could rewrite the log \
                 could have replaced it too. For a check that proves more, pass --public-key with the key the node \
                 registered with the directory (NodeInfo.audit_verifying_key_hex).",
                pub_file.display()
            );
            key
        }
    };

    let db_path = data_dir.join(DB_DIR);
    if !db_path.is_dir() {
        return Err(format!(
            "no node database at {}: --data-dir must be the node's data_dir (the folder holding {DB_DIR})",
            db_path.display()
        ));
    }
    let db = open_db_waiting(&db_path, Duration::from_secs(3)).map_err(|e| {
        let text = e.to_string();
        if is_lock_error(&e) {
            format!(
                "the database {} is in use: stop the node first (its database admits one process at a time), \
                 or verify a running node with its VerifyAudit API",
                db_path.display()
            )
        } else {
            format!("cannot open {}: {text}", db_path.display())
        }
    })?;
    let key_hex = hex::encode(key.to_bytes());
    match verify(&db, &key).map_err(|e| format!("cannot read the audit log: {e}"))? {
        Ok(v) => {
            let _ = writeln!(
                out,
                "intact: {} entries, {} seals, {} unsealed (verified with key {key_hex})",
                v.entries, v.seals, v.unsealed
            );
            if v.unsealed > 0 {
                let _ = writeln!(
                    out,
                    "note: the last {} entries are chained but not covered by a seal (the node stopped without its \
                     final seal?): a rewrite of only those entries could not be detected",
                    v.unsealed
                );
            }
            if v.entries == 0 {
                let _ = writeln!(out, "note: the log is empty");
            }
            Ok(EXIT_INTACT)
        }
        Err(t) => {
            let _ = writeln!(out, "TAMPERED: {t}");
            let _ = writeln!(out, "first entry concerned: {} (verified with key {key_hex})", t.first_seq());
            Ok(EXIT_TAMPERED)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn record(i: u64, hasher: &KeyHasher) -> AuditRecord {
        AuditRecord {
            message_id: format!("msg-{i}"),
            side: Side::Provider,
            consumer: "tax".into(),
            provider: "police".into(),
            resource_code: "102001/000001".into(),
            key_hash: hasher.hash("11010519491231002X"),
            data_items: vec!["姓名".into(), "公民身份号码".into()],
            result_code: 0,
            request_bytes: 120,
            response_bytes: 480,
            request_in_us: 1_000 + i as i64,
            request_out_us: 1_100 + i as i64,
            response_in_us: 1_500 + i as i64,
            response_out_us: 1_600 + i as i64,
            caller: "tax-node".into(),
            purpose: "税务稽查".into(),
            error: String::new(),
        }
    }

    /// A log of 10 entries sealed after 5 and after 10, reopened for tampering.
    fn sealed_log() -> (tempfile::TempDir, sled::Db, VerifyingKey) {
        let dir = tempfile::tempdir().unwrap();
        let db = sled::open(dir.path()).unwrap();
        let hasher = KeyHasher::new([7; 32]);
        let log = AuditLog::open(&db, SigningKey::from_bytes(&random_key())).unwrap();
        for i in 1..=10 {
            assert_eq!(log.append(record(i, &hasher)).unwrap(), i);
            if i == 5 {
                assert!(log.seal(i as i64).unwrap().is_some());
            }
        }
        log.seal(11).unwrap().unwrap();
        assert!(log.seal(12).unwrap().is_none(), "nothing new to seal");
        let key = log.verifying_key();
        (dir, db, key)
    }

    /// Reopens a database closed a moment ago (sled lets go of its lock asynchronously).
    fn reopen(path: &Path) -> sled::Db {
        open_db_waiting(path, Duration::from_secs(10)).unwrap()
    }

    fn get_entry(db: &sled::Db, seq: u64) -> ChainEntry {
        serde_json::from_slice(&db.open_tree(ENTRIES_TREE).unwrap().get(seq.to_be_bytes()).unwrap().unwrap()).unwrap()
    }

    fn rewrite(db: &sled::Db, seq: u64, f: impl FnOnce(&mut ChainEntry)) {
        let mut e = get_entry(db, seq);
        f(&mut e);
        db.open_tree(ENTRIES_TREE).unwrap().insert(seq.to_be_bytes(), serde_json::to_vec(&e).unwrap()).unwrap();
    }

    fn rehash(e: &mut ChainEntry) {
        e.hash = entry_hash(e.v, e.seq, &e.prev_hash, &e.record).unwrap();
    }

    // ---- chain and verification ----

    #[test]
    fn audit_intact_log_verifies_and_never_holds_the_raw_key() {
        let (_dir, db, key) = sealed_log();
        assert_eq!(verify(&db, &key).unwrap(), Ok(Verified { entries: 10, seals: 2, unsealed: 0 }));
        let raw = db.open_tree(ENTRIES_TREE).unwrap().iter().map(|kv| kv.unwrap().1.to_vec()).collect::<Vec<_>>().concat();
        assert!(!String::from_utf8_lossy(&raw).contains("11010519491231002X"));
    }

    #[test]
    fn audit_an_edited_entry_is_found() {
        let (_dir, db, key) = sealed_log();
        rewrite(&db, 4, |e| e.record.result_code = 7);
        assert_eq!(verify(&db, &key).unwrap(), Err(Tampering::Edited { seq: 4 }));
        // The v2 fields are covered by the hash too.
        let (_dir, db, key) = sealed_log();
        rewrite(&db, 3, |e| e.record.purpose = "其他".into());
        assert_eq!(verify(&db, &key).unwrap(), Err(Tampering::Edited { seq: 3 }));
    }

    #[test]
    fn audit_an_edited_and_rehashed_entry_breaks_the_next_link() {
        let (_dir, db, key) = sealed_log();
        rewrite(&db, 4, |e| {
            e.record.consumer = "quality".into();
            rehash(e);
        });
        assert_eq!(verify(&db, &key).unwrap(), Err(Tampering::BrokenLink { seq: 5, prev: 4 }));
    }

    /// Rewrites entries 8..=10 consistently: only the seal's signature still pins the old chain.
    fn rewrite_tail(db: &sled::Db) {
        for seq in 8..=10 {
            let prev = get_entry(db, seq - 1);
            rewrite(db, seq, |e| {
                e.record.data_items.push("住址".into());
                e.prev_hash = prev.hash.clone();
                rehash(e);
            });
        }
    }

    #[test]
    fn audit_a_rewritten_tail_is_caught_by_the_seal() {
        let (_dir, db, key) = sealed_log();
        rewrite_tail(&db);
        assert_eq!(verify(&db, &key).unwrap(), Err(Tampering::SealMismatch { from: 6, upto_seq: 10 }));
    }

    fn remove_entry_6(db: &sled::Db) {
        db.open_tree(ENTRIES_TREE).unwrap().remove(6u64.to_be_bytes()).unwrap();
    }

    fn swap_entries_2_and_3(db: &sled::Db) {
        let tree = db.open_tree(ENTRIES_TREE).unwrap();
        let (a, b) = (tree.get(2u64.to_be_bytes()).unwrap().unwrap(), tree.get(3u64.to_be_bytes()).unwrap().unwrap());
        tree.insert(2u64.to_be_bytes(), b).unwrap();
        tree.insert(3u64.to_be_bytes(), a).unwrap();
    }

    fn cut_entries_9_and_10(db: &sled::Db) {
        let tree = db.open_tree(ENTRIES_TREE).unwrap();
        tree.remove(10u64.to_be_bytes()).unwrap();
        tree.remove(9u64.to_be_bytes()).unwrap();
    }

    #[test]
    fn audit_removed_reordered_and_truncated_entries_are_found() {
        let (_dir, db, key) = sealed_log();
        remove_entry_6(&db);
        assert_eq!(verify(&db, &key).unwrap(), Err(Tampering::Removed { from: 6, to: 6 }));

        let (_dir, db, key) = sealed_log();
        swap_entries_2_and_3(&db);
        assert_eq!(verify(&db, &key).unwrap(), Err(Tampering::BrokenLink { seq: 2, prev: 1 }));

        let (_dir, db, key) = sealed_log();
        cut_entries_9_and_10(&db);
        assert_eq!(verify(&db, &key).unwrap(), Err(Tampering::Truncated { last: 8, upto_seq: 10 }));
    }

    #[test]
    fn audit_a_forged_seal_and_a_foreign_key_are_refused() {
        let (_dir, db, key) = sealed_log();
        let other = SigningKey::from_bytes(&random_key()).verifying_key();
        assert_eq!(verify(&db, &other).unwrap(), Err(Tampering::BadSignature { upto_seq: 5 }));
        let seals = db.open_tree(SEALS_TREE).unwrap();
        let mut seal: Seal = serde_json::from_slice(&seals.get(10u64.to_be_bytes()).unwrap().unwrap()).unwrap();
        seal.chain_hash = GENESIS.into();
        seals.insert(10u64.to_be_bytes(), serde_json::to_vec(&seal).unwrap()).unwrap();
        assert_eq!(verify(&db, &key).unwrap(), Err(Tampering::BadSignature { upto_seq: 10 }));
        seals.insert(10u64.to_be_bytes(), b"not json".to_vec()).unwrap();
        assert_eq!(verify(&db, &key).unwrap(), Err(Tampering::UnreadableSeal { key: hex::encode(10u64.to_be_bytes()) }));
    }

    #[test]
    fn audit_reopening_continues_the_chain() {
        let (dir, db, key) = sealed_log();
        drop(db);
        let db = reopen(dir.path());
        // The same key would come from the node's key file; the chain itself needs only the head.
        let log = AuditLog::open(&db, SigningKey::from_bytes(&random_key())).unwrap();
        assert_eq!(log.len(), 10);
        assert_eq!(log.append(record(11, &KeyHasher::new([7; 32]))).unwrap(), 11);
        assert_eq!(verify(&db, &key).unwrap(), Ok(Verified { entries: 11, seals: 2, unsealed: 1 }));
    }

    #[test]
    fn audit_verifying_never_creates_trees() {
        let dir = tempfile::tempdir().unwrap();
        let db = sled::open(dir.path()).unwrap();
        let key = SigningKey::from_bytes(&random_key()).verifying_key();
        assert_eq!(verify(&db, &key).unwrap(), Ok(Verified { entries: 0, seals: 0, unsealed: 0 }));
        assert!(!db.tree_names().iter().any(|n| n.as_ref() == ENTRIES_TREE.as_bytes()));
    }

    #[test]
    fn audit_keyed_hashes_depend_on_the_key() {
        let a = KeyHasher::new([1; 32]).hash("11010519491231002X");
        assert_eq!(a, KeyHasher::new([1; 32]).hash("11010519491231002X"));
        assert_ne!(a, KeyHasher::new([2; 32]).hash("11010519491231002X"));
        assert_eq!(a.len(), 64);
        let h = KeyHasher::new([1; 32]);
        assert_eq!(h.hash_keys(&["11010519491231002X".into()]), a);
        let two = h.hash_keys(&["11010519491231002X".into(), "110105194912310021".into()]);
        assert_eq!(two, format!("{a},{}", h.hash("110105194912310021")));
        assert_eq!(h.hash_keys(&[]), "");
    }

    // ---- format versions ----

    #[test]
    fn audit_append_writes_what_serde_would() {
        let (_dir, db, _key) = sealed_log();
        let raw = db.open_tree(ENTRIES_TREE).unwrap().get(3u64.to_be_bytes()).unwrap().unwrap();
        let entry: ChainEntry = serde_json::from_slice(&raw).unwrap();
        assert_eq!(entry.v, CURRENT_FORMAT);
        assert_eq!(serde_json::to_vec(&entry).unwrap(), raw.to_vec());
    }

    #[test]
    fn audit_format_v1_entries_still_decode_and_verify() {
        let dir = tempfile::tempdir().unwrap();
        let db = sled::open(dir.path()).unwrap();
        let hasher = KeyHasher::new([7; 32]);
        // Two entries exactly as the v1 code wrote them: no "v", no caller/purpose/error.
        let tree = db.open_tree(ENTRIES_TREE).unwrap();
        let mut prev = GENESIS.to_string();
        for seq in 1..=2u64 {
            let mut r = record(seq, &hasher);
            (r.caller, r.purpose) = (String::new(), String::new());
            let json = serde_json::to_string(&r).unwrap();
            assert!(!json.contains("caller") && !json.contains("purpose") && !json.contains("error"));
            let hash = entry_hash_json(b"gx-audit-v1", seq, &prev, json.as_bytes());
            let value = format!(r#"{{"seq":{seq},"prev_hash":"{prev}","hash":"{hash}","record":{json}}}"#);
            tree.insert(seq.to_be_bytes(), value.as_bytes()).unwrap();
            prev = hash;
        }
        let log = AuditLog::open(&db, SigningKey::from_bytes(&random_key())).unwrap();
        assert_eq!(log.append(record(3, &hasher)).unwrap(), 3);
        log.seal(1).unwrap().unwrap();
        assert_eq!(verify(&db, &log.verifying_key()).unwrap(), Ok(Verified { entries: 3, seals: 1, unsealed: 0 }));
        assert_eq!(get_entry(&db, 1).v, 1);
        assert_eq!(get_entry(&db, 1).record.caller, "");
        // Claiming another format breaks the hash, and an unknown one is named as such.
        rewrite(&db, 1, |e| e.v = 2);
        assert_eq!(verify(&db, &log.verifying_key()).unwrap(), Err(Tampering::Edited { seq: 1 }));
        rewrite(&db, 2, |e| e.v = 9);
        assert_eq!(verify(&db, &log.verifying_key()).unwrap(), Err(Tampering::Edited { seq: 1 }));
        rewrite(&db, 1, |e| e.v = 1);
        assert_eq!(verify(&db, &log.verifying_key()).unwrap(), Err(Tampering::UnknownFormat { seq: 2, version: 9 }));
    }

    #[test]
    fn audit_record_to_entry_carries_every_field() {
        let hasher = KeyHasher::new([7; 32]);
        let mut r = record(4, &hasher);
        r.result_code = 7;
        r.error = "no grant".into();
        let e = r.to_entry(42);
        assert_eq!(e.seq, 42);
        assert_eq!(e.side, "provider");
        assert_eq!((e.consumer.as_str(), e.provider.as_str()), ("tax", "police"));
        assert_eq!(e.key_hash, r.key_hash);
        assert_eq!(e.data_items, r.data_items);
        assert_eq!((e.result_code, e.request_bytes, e.response_bytes), (7, 120, 480));
        assert_eq!((e.request_in_us, e.request_out_us, e.response_in_us, e.response_out_us), (1004, 1104, 1504, 1604));
        assert_eq!((e.caller.as_str(), e.purpose.as_str(), e.error.as_str()), ("tax-node", "税务稽查", "no grant"));
        r.side = Side::Consumer;
        assert_eq!(r.to_entry(1).side, "consumer");
    }

    // ---- verify_report ----

    #[test]
    fn audit_verify_report_intact_and_tampered() {
        let (_dir, db, key) = sealed_log();
        let r = verify_report(&db, &key);
        assert!(r.intact, "{r:?}");
        assert_eq!((r.entries, r.seals, r.unsealed, r.problem_seq), (10, 2, 0, 0));
        assert_eq!(r.verifying_key_hex, hex::encode(key.to_bytes()));
        assert!(r.problem.is_empty());

        type Tamper = fn(&sled::Db);
        let cases: [(Tamper, u64, &str); 6] = [
            (|db| rewrite(db, 4, |e| e.record.result_code = 7), 4, "entry 4 was edited"),
            (|db| rewrite(db, 4, |e| { e.record.consumer = "x".into(); rehash(e) }), 5, "entry 5 does not follow entry 4"),
            (remove_entry_6, 6, "entries 6 to 6 are missing"),
            (swap_entries_2_and_3, 2, "entry 2 does not follow entry 1"),
            (cut_entries_9_and_10, 9, "ends at entry 8"),
            (rewrite_tail, 6, "entries 6 to 10 were rewritten"),
        ];
        for (tamper, seq, text) in cases {
            let (_dir, db, key) = sealed_log();
            tamper(&db);
            let r = verify_report(&db, &key);
            assert!(!r.intact, "{text}");
            assert_eq!(r.problem_seq, seq, "{}", r.problem);
            assert!(r.problem.contains(text), "{} lacks {text}", r.problem);
            assert_eq!(r.verifying_key_hex, hex::encode(key.to_bytes()));
        }
    }

    #[test]
    fn audit_live_log_reports_on_itself() {
        let dir = tempfile::tempdir().unwrap();
        let db = sled::open(dir.path()).unwrap();
        let log = AuditLog::open(&db, SigningKey::from_bytes(&random_key())).unwrap();
        let hasher = KeyHasher::new([7; 32]);
        for i in 1..=3 {
            log.append(record(i, &hasher)).unwrap();
        }
        let r = log.verify_report();
        assert!(r.intact);
        assert_eq!((r.entries, r.seals, r.unsealed), (3, 0, 3));
        assert_eq!(r.verifying_key_hex, hex::encode(log.verifying_key().to_bytes()));
    }

    // ---- query ----

    const K1: &str = "11010519491231002X";
    const K2: &str = "110105194912310021";
    const K3: &str = "110105194912310048";

    /// This node is `tax`. Five entries, one a second (request_in at 1 000 ms, 2 000 ms, …).
    fn varied_log() -> (tempfile::TempDir, sled::Db, Arc<AuditLog>, KeyHasher) {
        let dir = tempfile::tempdir().unwrap();
        let db = sled::open(dir.path()).unwrap();
        let log = Arc::new(AuditLog::open(&db, SigningKey::from_bytes(&random_key())).unwrap());
        let h = KeyHasher::new([9; 32]);
        type Row<'a> = (Side, &'a str, &'a str, &'a str, &'a [&'a str], i32);
        let rows: [Row; 5] = [
            (Side::Consumer, "tax", "police", "R1", &[K1], 0),
            (Side::Provider, "civil", "tax", "R2", &[K2], 7),
            (Side::Consumer, "tax", "police", "R1", &[K1, K3], 5),
            (Side::Provider, "police", "tax", "R1", &[K3], 8),
            (Side::Consumer, "tax", "health", "R3", &[K2], 0),
        ];
        for (i, (side, consumer, provider, resource, keys, code)) in rows.into_iter().enumerate() {
            let i = i as u64 + 1;
            let keys: Vec<String> = keys.iter().map(|k| k.to_string()).collect();
            let mut r = record(i, &h);
            (r.side, r.consumer, r.provider, r.resource_code) = (side, consumer.into(), provider.into(), resource.into());
            r.key_hash = h.hash_keys(&keys);
            r.result_code = code;
            r.request_in_us = i as i64 * 1_000_000;
            log.append(r).unwrap();
        }
        (dir, db, log, h)
    }

    fn seqs(log: &Arc<AuditLog>, h: &KeyHasher, f: AuditFilter) -> Vec<u64> {
        let (entries, truncated, total) = query(log, &f, h).unwrap();
        assert!(!truncated);
        assert_eq!(total, 5);
        entries.iter().map(|e| e.seq).collect()
    }

    #[test]
    fn audit_query_each_filter() {
        let (_dir, _db, log, h) = varied_log();
        let f = AuditFilter::default;
        assert_eq!(seqs(&log, &h, f()), [5, 4, 3, 2, 1], "newest first");
        assert_eq!(seqs(&log, &h, AuditFilter { peer: "police".into(), ..f() }), [4, 3, 1]);
        assert_eq!(seqs(&log, &h, AuditFilter { peer: "tax".into(), ..f() }), [0u64; 0], "peer is the other side");
        assert_eq!(seqs(&log, &h, AuditFilter { peer: "civil".into(), ..f() }), [2]);
        assert_eq!(seqs(&log, &h, AuditFilter { resource_code: "R1".into(), ..f() }), [4, 3, 1]);
        assert_eq!(seqs(&log, &h, AuditFilter { result: "ok".into(), ..f() }), [5, 1]);
        assert_eq!(seqs(&log, &h, AuditFilter { result: "error".into(), ..f() }), [4, 3, 2]);
        assert_eq!(seqs(&log, &h, AuditFilter { result: "PERMISSION_DENIED".into(), ..f() }), [2]);
        assert_eq!(seqs(&log, &h, AuditFilter { result: "not_found".into(), ..f() }), [3]);
        assert_eq!(seqs(&log, &h, AuditFilter { result: "RESOURCE_EXHAUSTED".into(), ..f() }), [4]);
        assert_eq!(seqs(&log, &h, AuditFilter { result: "OK".into(), ..f() }), [5, 1]);
        assert_eq!(seqs(&log, &h, AuditFilter { record_key: K1.into(), ..f() }), [3, 1], "one key of a batch matches");
        assert_eq!(seqs(&log, &h, AuditFilter { record_key: K3.into(), ..f() }), [4, 3]);
        assert_eq!(seqs(&log, &h, AuditFilter { record_key: K2.into(), ..f() }), [5, 2]);
        assert_eq!(seqs(&log, &h, AuditFilter { record_key: "nobody".into(), ..f() }), [0u64; 0]);
        assert_eq!(seqs(&log, &h, AuditFilter { message_id: "msg-3".into(), ..f() }), [3]);
        assert_eq!(seqs(&log, &h, AuditFilter { from_unix_ms: 2_000, to_unix_ms: 4_000, ..f() }), [3, 2], "[from, to)");
        assert_eq!(seqs(&log, &h, AuditFilter { from_unix_ms: 4_000, ..f() }), [5, 4]);
        assert_eq!(seqs(&log, &h, AuditFilter { to_unix_ms: 2_001, ..f() }), [2, 1]);
        assert_eq!(seqs(&log, &h, AuditFilter { peer: "police".into(), result: "error".into(), ..f() }), [4, 3]);
    }

    #[test]
    fn audit_query_limit_and_truncation() {
        let (_dir, db, log, h) = varied_log();
        let (entries, truncated, total) = query(&log, &AuditFilter { limit: 2, ..Default::default() }, &h).unwrap();
        assert_eq!(entries.iter().map(|e| e.seq).collect::<Vec<_>>(), [5, 4]);
        assert!(truncated);
        assert_eq!(total, 5);
        let resp = query_response(&log, &AuditFilter { limit: 2, ..Default::default() }, &h).unwrap();
        assert_eq!((resp.entries.len(), resp.truncated, resp.total_entries), (2, true, 5));
        let (entries, truncated, _) = query(&log, &AuditFilter { limit: 5, ..Default::default() }, &h).unwrap();
        assert_eq!((entries.len(), truncated), (5, false));
        let (entries, truncated, _) = query(&*log, &AuditFilter { limit: 50_000, ..Default::default() }, &h).unwrap();
        assert_eq!((entries.len(), truncated), (5, false));
        // Exactly `limit` matches is not truncated; one more is.
        let errors = AuditFilter { result: "error".into(), limit: 3, ..Default::default() };
        assert!(!query(&db, &errors, &h).unwrap().1);
        assert!(query(&db, &AuditFilter { limit: 2, ..errors }, &h).unwrap().1);
        // The entries come back whole.
        let (entries, _, _) = query(&db, &AuditFilter { message_id: "msg-2".into(), ..Default::default() }, &h).unwrap();
        assert_eq!(entries[0].side, "provider");
        assert_eq!(entries[0].consumer, "civil");
        assert_eq!(entries[0].result_code, 7);
        assert_eq!(entries[0].key_hash, h.hash(K2));
    }

    #[test]
    fn audit_query_default_limit_is_100() {
        let dir = tempfile::tempdir().unwrap();
        let db = sled::open(dir.path()).unwrap();
        let log = AuditLog::open(&db, SigningKey::from_bytes(&random_key())).unwrap();
        let h = KeyHasher::new([9; 32]);
        for i in 1..=150 {
            log.append(record(i, &h)).unwrap();
        }
        let (entries, truncated, total) = query(&log, &AuditFilter::default(), &h).unwrap();
        assert_eq!((entries.len(), truncated, total), (100, true, 150));
        assert_eq!((entries[0].seq, entries[99].seq), (150, 51));
    }

    #[test]
    fn audit_query_bad_filters_are_invalid_arguments() {
        let (_dir, _db, log, h) = varied_log();
        let err = query(&log, &AuditFilter { result: "DENIED".into(), ..Default::default() }, &h).unwrap_err();
        assert!(matches!(err, AuditError::InvalidFilter { field: "result", .. }), "{err}");
        assert!(err.to_string().contains("PERMISSION_DENIED"), "lists the valid names: {err}");
        let status = tonic::Status::from(crate::error::NodeError::from(err));
        assert_eq!(status.code(), tonic::Code::InvalidArgument);
        let err = query(&log, &AuditFilter { from_unix_ms: 5, to_unix_ms: 4, ..Default::default() }, &h).unwrap_err();
        assert!(matches!(err, AuditError::InvalidFilter { field: "from_unix_ms", .. }), "{err}");
        let store = crate::error::NodeError::from(AuditError::Corrupt { key: "00".into(), reason: "x".into() });
        assert_eq!(tonic::Status::from(store).code(), tonic::Code::Internal);
    }

    // ---- keys ----

    #[cfg(unix)]
    fn mode(path: &Path) -> u32 {
        use std::os::unix::fs::PermissionsExt;
        std::fs::metadata(path).unwrap().permissions().mode() & 0o777
    }

    #[cfg(unix)]
    fn set_mode(path: &Path, mode: u32) {
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(path, std::fs::Permissions::from_mode(mode)).unwrap();
    }

    #[test]
    fn audit_keys_are_created_private_and_reload_identical() {
        let dir = tempfile::tempdir().unwrap();
        let data = dir.path().join("data");
        let keys = AuditKeys::load_or_create(&data).unwrap();
        #[cfg(unix)]
        {
            assert_eq!(mode(&data.join(SEAL_KEY_FILE)), 0o600);
            assert_eq!(mode(&data.join(HASH_KEY_FILE)), 0o600);
        }
        let pub_text = std::fs::read_to_string(data.join(PUBLIC_KEY_FILE)).unwrap();
        assert_eq!(pub_text.trim(), keys.verifying_key_hex());
        assert_eq!(parse_verifying_key(&pub_text).unwrap(), keys.verifying_key());
        assert_eq!(keys.verifying_key(), keys.signing_key().verifying_key());
        let seal_text = std::fs::read_to_string(data.join(SEAL_KEY_FILE)).unwrap();
        assert!(seal_text.starts_with('#'), "explains itself");
        let leftovers: Vec<_> = std::fs::read_dir(&data).unwrap().map(|e| e.unwrap().file_name()).collect();
        assert_eq!(leftovers.len(), 3, "no temporary files left: {leftovers:?}");

        let again = AuditKeys::load_or_create(&data).unwrap();
        assert_eq!(again.verifying_key_hex(), keys.verifying_key_hex());
        assert_eq!(again.hasher().hash(K1), keys.hasher().hash(K1));
        assert_eq!(std::fs::read_to_string(data.join(SEAL_KEY_FILE)).unwrap(), seal_text, "never rewritten");
        assert!(!format!("{again:?}").contains(&hex::encode(again.signing_key().to_bytes())), "Debug hides secrets");

        // A different data directory gets different keys; a stale audit-seal.pub is put right.
        let other = AuditKeys::load_or_create(&dir.path().join("other")).unwrap();
        assert_ne!(other.verifying_key_hex(), keys.verifying_key_hex());
        assert_ne!(other.hasher().hash(K1), keys.hasher().hash(K1));
        std::fs::write(data.join(PUBLIC_KEY_FILE), other.verifying_key_hex()).unwrap();
        AuditKeys::load_or_create(&data).unwrap();
        assert_eq!(std::fs::read_to_string(data.join(PUBLIC_KEY_FILE)).unwrap().trim(), keys.verifying_key_hex());
    }

    #[cfg(unix)]
    #[test]
    fn audit_keys_refuse_a_group_or_world_readable_file() {
        let dir = tempfile::tempdir().unwrap();
        AuditKeys::load_or_create(dir.path()).unwrap();
        for (file, bad) in [(SEAL_KEY_FILE, 0o644), (HASH_KEY_FILE, 0o640), (SEAL_KEY_FILE, 0o602)] {
            let path = dir.path().join(file);
            set_mode(&path, bad);
            let err = AuditKeys::load_or_create(dir.path()).unwrap_err().to_string();
            assert!(err.contains(&format!("chmod 600 {}", path.display())), "{err}");
            assert!(err.contains(file), "{err}");
            set_mode(&path, 0o600);
        }
        set_mode(&dir.path().join(SEAL_KEY_FILE), 0o400);
        AuditKeys::load_or_create(dir.path()).expect("read-only for the owner is fine");
    }

    #[test]
    fn audit_keys_refuse_malformed_or_lone_files() {
        let dir = tempfile::tempdir().unwrap();
        let keys = AuditKeys::load_or_create(dir.path()).unwrap();
        let seal_path = dir.path().join(SEAL_KEY_FILE);
        let good = std::fs::read(&seal_path).unwrap();
        for bad in ["", "# only a comment\n", "abcd\n", &"zz".repeat(32)] {
            std::fs::write(&seal_path, bad).unwrap();
            let err = AuditKeys::load_or_create(dir.path()).unwrap_err().to_string();
            assert!(err.contains("malformed") && err.contains("backup"), "{err}");
        }
        std::fs::write(&seal_path, &good).unwrap();
        // A hex key without the comment is accepted too.
        std::fs::write(&seal_path, format!("{}\n", hex::encode(keys.signing_key().to_bytes()))).unwrap();
        assert_eq!(AuditKeys::load_or_create(dir.path()).unwrap().verifying_key_hex(), keys.verifying_key_hex());

        std::fs::remove_file(dir.path().join(HASH_KEY_FILE)).unwrap();
        let err = AuditKeys::load_or_create(dir.path()).unwrap_err().to_string();
        assert!(err.contains(HASH_KEY_FILE) && err.contains("missing") && err.contains("restore"), "{err}");
        assert!(!dir.path().join(HASH_KEY_FILE).exists(), "not recreated behind the operator's back");

        std::fs::create_dir(dir.path().join(HASH_KEY_FILE)).unwrap();
        let err = AuditKeys::load_or_create(dir.path()).unwrap_err().to_string();
        assert!(err.contains("not a regular file"), "{err}");
    }

    #[test]
    fn audit_public_keys_parse_strictly() {
        let k = SigningKey::from_bytes(&random_key()).verifying_key();
        assert_eq!(parse_verifying_key(&hex::encode(k.to_bytes())).unwrap(), k);
        assert_eq!(parse_verifying_key(&format!("# node tax\n{}\n", hex::encode(k.to_bytes()))).unwrap(), k);
        assert!(parse_verifying_key("abc").is_err());
        // The identity point: a weak key that would accept forged seals.
        let mut identity = [0u8; 32];
        identity[0] = 1;
        assert!(parse_verifying_key(&hex::encode(identity)).unwrap_err().contains("weak"));
    }

    // ---- sealer ----

    fn seal_count(log: &AuditLog) -> usize {
        log.seals.len()
    }

    #[tokio::test]
    async fn audit_sealer_seals_on_shutdown() {
        let dir = tempfile::tempdir().unwrap();
        let db = sled::open(dir.path()).unwrap();
        let log = Arc::new(AuditLog::open(&db, SigningKey::from_bytes(&random_key())).unwrap());
        let (tx, rx) = watch::channel(false);
        let sealer = spawn_sealer(log.clone(), Duration::from_secs(3600), rx);
        let hasher = KeyHasher::new([7; 32]);
        for i in 1..=3 {
            log.append(record(i, &hasher)).unwrap();
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
        assert_eq!(seal_count(&log), 0, "the hourly tick has not come");
        tx.send(true).unwrap();
        tokio::time::timeout(Duration::from_secs(10), sealer).await.expect("sealer stops").unwrap();
        assert_eq!(log.verify().unwrap(), Ok(Verified { entries: 3, seals: 1, unsealed: 0 }));

        // A dropped sender also counts as shutdown.
        log.append(record(4, &hasher)).unwrap();
        let (tx, rx) = watch::channel(false);
        let sealer = spawn_sealer(log.clone(), Duration::from_secs(3600), rx);
        drop(tx);
        tokio::time::timeout(Duration::from_secs(10), sealer).await.expect("sealer stops").unwrap();
        assert_eq!(log.verify().unwrap(), Ok(Verified { entries: 4, seals: 2, unsealed: 0 }));
    }

    #[tokio::test]
    async fn audit_sealer_seals_periodically_only_when_needed() {
        let dir = tempfile::tempdir().unwrap();
        let db = sled::open(dir.path()).unwrap();
        let log = Arc::new(AuditLog::open(&db, SigningKey::from_bytes(&random_key())).unwrap());
        let (tx, rx) = watch::channel(false);
        let sealer = spawn_sealer(log.clone(), Duration::from_millis(20), rx);
        let hasher = KeyHasher::new([7; 32]);
        log.append(record(1, &hasher)).unwrap();
        log.append(record(2, &hasher)).unwrap();
        let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
        while seal_count(&log) == 0 {
            assert!(tokio::time::Instant::now() < deadline, "no periodic seal");
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
        assert_eq!(seal_count(&log), 1, "nothing new, no new seal");
        tx.send(true).unwrap();
        sealer.await.unwrap();
        assert_eq!(seal_count(&log), 1);
        assert_eq!(log.verify().unwrap(), Ok(Verified { entries: 2, seals: 1, unsealed: 0 }));
    }

    // ---- offline verification ----

    fn run(data_dir: &Path, public_key: Option<&str>) -> (i32, String, String) {
        let (mut out, mut err) = (Vec::new(), Vec::new());
        let code = run_verify_command(data_dir, public_key, &mut out, &mut err);
        (code, String::from_utf8(out).unwrap(), String::from_utf8(err).unwrap())
    }

    /// A data directory as the node leaves it: keys, and a sealed log of 6 entries in node.sled.
    fn node_data_dir() -> (tempfile::TempDir, AuditKeys) {
        let dir = tempfile::tempdir().unwrap();
        let keys = AuditKeys::load_or_create(dir.path()).unwrap();
        let db = sled::open(dir.path().join(DB_DIR)).unwrap();
        let log = AuditLog::open(&db, keys.signing_key().clone()).unwrap();
        for i in 1..=6 {
            log.append(record(i, keys.hasher())).unwrap();
        }
        log.seal(now_us()).unwrap().unwrap();
        (dir, keys)
    }

    #[test]
    fn audit_verify_command_exit_codes() {
        let (dir, keys) = node_data_dir();
        let (code, out, err) = run(dir.path(), None);
        assert_eq!(code, EXIT_INTACT, "{out}{err}");
        assert!(out.contains("intact: 6 entries, 1 seals, 0 unsealed"), "{out}");
        assert!(err.contains("same disk"), "warns about the key's origin: {err}");

        let hex_key = keys.verifying_key_hex();
        let (code, out, err) = run(dir.path(), Some(&hex_key));
        assert_eq!(code, EXIT_INTACT, "{out}{err}");
        assert!(err.is_empty(), "{err}");
        let key_file = dir.path().join("registered.pub");
        std::fs::write(&key_file, &hex_key).unwrap();
        assert_eq!(run(dir.path(), Some(key_file.to_str().unwrap())).0, EXIT_INTACT);

        let other = SigningKey::from_bytes(&random_key()).verifying_key();
        let (code, out, err) = run(dir.path(), Some(&hex::encode(other.to_bytes())));
        assert_eq!(code, EXIT_TAMPERED, "{out}{err}");
        assert!(out.contains("invalid signature"), "{out}");
        assert!(err.contains("different key"), "{err}");

        let (code, _, err) = run(dir.path(), Some("not-a-key"));
        assert_eq!(code, EXIT_ERROR);
        assert!(err.contains("--public-key"), "{err}");

        let empty = tempfile::tempdir().unwrap();
        let (code, _, err) = run(empty.path(), Some(&hex_key));
        assert_eq!(code, EXIT_ERROR);
        assert!(err.contains("no node database"), "{err}");
        assert!(!empty.path().join(DB_DIR).exists(), "does not create a database");
        let (code, _, err) = run(empty.path(), None);
        assert_eq!(code, EXIT_ERROR);
        assert!(err.contains(PUBLIC_KEY_FILE), "{err}");
    }

    #[test]
    fn audit_verify_command_refuses_a_database_in_use() {
        let (dir, keys) = node_data_dir();
        let _running = reopen(&dir.path().join(DB_DIR));
        let (code, _, err) = run(dir.path(), Some(&keys.verifying_key_hex()));
        assert_eq!(code, EXIT_ERROR);
        assert!(err.contains("stop the node"), "{err}");
    }

    #[test]
    fn audit_verify_command_names_the_tampered_entry() {
        let (dir, keys) = node_data_dir();
        {
            let db = reopen(&dir.path().join(DB_DIR));
            rewrite(&db, 3, |e| e.record.consumer = "quality".into());
        }
        let (code, out, _) = run(dir.path(), Some(&keys.verifying_key_hex()));
        assert_eq!(code, EXIT_TAMPERED);
        assert!(out.contains("TAMPERED: entry 3 was edited"), "{out}");
        assert!(out.contains("first entry concerned: 3"), "{out}");
    }

    // ---- speed ----

    /// `cargo test --release -p exchange-node audit_append_rate -- --ignored --nocapture`
    #[test]
    #[ignore = "micro-benchmark; run in release"]
    fn audit_append_rate() {
        let dir = tempfile::tempdir().unwrap();
        let db = sled::open(dir.path()).unwrap();
        let log = Arc::new(AuditLog::open(&db, SigningKey::from_bytes(&random_key())).unwrap());
        let hasher = KeyHasher::new([7; 32]);
        const N: u64 = 100_000;
        let records: Vec<AuditRecord> = (1..=N).map(|i| record(i, &hasher)).collect();
        let size = serde_json::to_vec(&records[0]).unwrap().len();
        let start = std::time::Instant::now();
        for r in records {
            log.append(r).unwrap();
        }
        let one_thread = N as f64 / start.elapsed().as_secs_f64();
        // Baseline in the same run: bare sled inserts of entries as big, into another tree.
        let bare = db.open_tree("bench_bare").unwrap();
        let value = db.open_tree(ENTRIES_TREE).unwrap().get(1u64.to_be_bytes()).unwrap().unwrap();
        let start = std::time::Instant::now();
        for i in 1..=N {
            bare.insert(i.to_be_bytes(), value.clone()).unwrap();
        }
        let bare_rate = N as f64 / start.elapsed().as_secs_f64();
        db.drop_tree("bench_bare").unwrap();
        let start = std::time::Instant::now();
        log.seal(now_us()).unwrap().unwrap();
        let seal_ms = start.elapsed().as_secs_f64() * 1e3;

        // Four threads appending at once (the relay's shape: many tasks, one chain head).
        let start = std::time::Instant::now();
        std::thread::scope(|s| {
            for t in 0..4u64 {
                let (log, hasher) = (&log, &hasher);
                s.spawn(move || {
                    for i in 0..N / 4 {
                        log.append(record(N + 1 + t * N / 4 + i, hasher)).unwrap();
                    }
                });
            }
        });
        let four_threads = N as f64 / start.elapsed().as_secs_f64();

        let start = std::time::Instant::now();
        // The oldest entry: the whole log is read.
        let hit = AuditFilter { message_id: "msg-1".into(), ..Default::default() };
        let (found, _, total) = query(&db, &hit, &hasher).unwrap();
        let scan_ms = start.elapsed().as_secs_f64() * 1e3;
        assert_eq!((found.len(), total), (1, 2 * N));
        let start = std::time::Instant::now();
        let (recent, _, _) = query(&db, &AuditFilter::default(), &hasher).unwrap();
        let recent_ms = start.elapsed().as_secs_f64() * 1e3;
        assert_eq!(recent.len(), 100);
        let start = std::time::Instant::now();
        assert!(verify(&db, &log.verifying_key()).unwrap().is_ok());
        let verify_ms = start.elapsed().as_secs_f64() * 1e3;
        println!(
            "audit append ({size} B records): {one_thread:.0}/s on one thread, {four_threads:.0}/s on four \
             (bare sled insert of the same {} B entries: {bare_rate:.0}/s); \
             seal + flush {seal_ms:.1} ms; query over {} entries: full scan {scan_ms:.0} ms, newest 100 \
             {recent_ms:.1} ms; verify {verify_ms:.0} ms",
            value.len(),
            2 * N
        );
        if !cfg!(debug_assertions) {
            assert!(one_thread > 20_000.0, "{one_thread:.0}/s");
        }
    }
}
