//! The node's audit trail: every relayed request is one [`AuditRecord`], appended to a hash chain and
//! sealed from time to time with the node's Ed25519 signing key, so [`verify`] can tell exactly where an
//! entry was edited, removed or reordered, or the tail cut off.
//!
//! Chain: entry `n` stores `hash(n) = SHA-256("gx-audit-v1" ‖ n ‖ hash(n-1) ‖ record)`, with `hash(0)` all
//! zeros. Editing a record breaks its own hash; recomputing that hash breaks the next entry's link;
//! rewriting the whole rest of the chain breaks the last seal, which only the node's key can make.
//! Removing an entry leaves a gap in the sequence numbers; cutting the tail leaves a seal pointing past
//! the end.
//!
//! Records never hold a raw record key (a citizen identity number, say): [`KeyHasher`] turns it into an
//! HMAC-SHA-256 under a node secret, so the same key can be found in the log without being readable
//! from it.
//!
//! Issue 3 wires this into the relay; this module is the storage and verification half, on its own trees
//! of the node's sled database.

use std::sync::Mutex;

use ed25519_dalek::{Signature, Signer, SigningKey, Verifier, VerifyingKey};
use hmac::{Hmac, KeyInit, Mac};
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

const ENTRY_DOMAIN: &[u8] = b"gx-audit-v1";
const SEAL_DOMAIN: &[u8] = b"gx-audit-seal-v1";

/// Which end of a relay wrote the record.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Side {
    Consumer,
    Provider,
}

/// One relayed request, as X-Road's operational monitoring records it: the shared message id, both
/// parties, what was asked and returned, the outcome, sizes and four timestamps (µs since the epoch).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct AuditRecord {
    pub message_id: String,
    pub side: Side,
    pub consumer: String,
    pub provider: String,
    pub resource_code: String,
    /// [`KeyHasher::hash`] of the record key; never the key itself.
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
}

/// A stored chain entry.
#[derive(Clone, Debug, Serialize, Deserialize)]
struct ChainEntry {
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
    #[error("seal up to entry {upto_seq} does not match the chain: entries up to it were rewritten")]
    SealMismatch { upto_seq: u64 },
    #[error("seal up to entry {upto_seq} has an invalid signature")]
    BadSignature { upto_seq: u64 },
    #[error("the log ends at entry {last} but a seal covers up to {upto_seq}: entries were cut off the end")]
    Truncated { last: u64, upto_seq: u64 },
    #[error("entry stored under key {key} is unreadable")]
    Unreadable { key: String },
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
}

/// 32 fresh random bytes, for a new signing key or HMAC key.
pub fn random_key() -> [u8; 32] {
    let mut key = [0u8; 32];
    getrandom::fill(&mut key).expect("OS randomness");
    key
}

fn entry_hash(seq: u64, prev_hash: &str, record: &AuditRecord) -> String {
    let mut h = Sha256::new();
    h.update(ENTRY_DOMAIN);
    h.update(seq.to_be_bytes());
    h.update(prev_hash.as_bytes());
    h.update(serde_json::to_vec(record).expect("records serialize"));
    hex::encode(h.finalize())
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
        let entries = db.open_tree("audit")?;
        let seals = db.open_tree("audit_seals")?;
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

    /// Appends a record; returns its sequence number. Durable once [`AuditLog::flush`] returns.
    pub fn append(&self, record: AuditRecord) -> Result<u64, AuditError> {
        let mut head = self.head.lock().expect("audit head lock");
        let seq = head.0 + 1;
        let hash = entry_hash(seq, &head.1, &record);
        let entry = ChainEntry { seq, prev_hash: head.1.clone(), hash: hash.clone(), record };
        self.entries.insert(seq.to_be_bytes(), serde_json::to_vec(&entry).expect("entries serialize"))?;
        *head = (seq, hash);
        Ok(seq)
    }

    pub async fn flush(&self) -> Result<(), AuditError> {
        self.entries.flush_async().await?;
        Ok(())
    }

    /// Signs the chain up to its current head, if anything was appended since the last seal.
    pub fn seal(&self, now_us: i64) -> Result<Option<Seal>, AuditError> {
        let head = self.head.lock().expect("audit head lock").clone();
        let last_sealed = match self.seals.last()? {
            Some((key, _)) => u64::from_be_bytes(key.as_ref().try_into().unwrap_or([0; 8])),
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
        self.seals.flush()?;
        Ok(Some(seal))
    }

    /// Records in sequence order (for `exchangectl audit query`).
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

/// Checks the whole log: every entry's hash, every link, no gaps, every seal's signature and chain hash.
/// Stops at the first problem and says where it is.
pub fn verify(db: &sled::Db, key: &VerifyingKey) -> Result<Result<Verified, Tampering>, AuditError> {
    let entries = db.open_tree("audit")?;
    let seals_tree = db.open_tree("audit_seals")?;
    let mut seals: Vec<Seal> = Vec::new();
    for kv in seals_tree.iter() {
        let (k, v) = kv?;
        let seal: Seal = serde_json::from_slice(&v)
            .map_err(|e| AuditError::Corrupt { key: hex::encode(&k), reason: e.to_string() })?;
        seals.push(seal);
    }
    for seal in &seals {
        let sig = hex::decode(&seal.signature).ok().and_then(|b| Signature::from_slice(&b).ok());
        let valid = sig.is_some_and(|sig| key.verify(&seal_message(seal.upto_seq, &seal.chain_hash), &sig).is_ok());
        if !valid {
            return Ok(Err(Tampering::BadSignature { upto_seq: seal.upto_seq }));
        }
    }
    let mut prev_seq = 0u64;
    let mut prev_hash = GENESIS.to_string();
    let mut seal_iter = seals.iter().peekable();
    let mut count = 0u64;
    for kv in entries.iter() {
        let (k, v) = kv?;
        let Ok(entry) = serde_json::from_slice::<ChainEntry>(&v) else {
            return Ok(Err(Tampering::Unreadable { key: hex::encode(&k) }));
        };
        let key_seq = u64::from_be_bytes(k.as_ref().try_into().unwrap_or([0; 8]));
        if entry.seq != key_seq {
            return Ok(Err(Tampering::BrokenLink { seq: key_seq, prev: prev_seq }));
        }
        if entry.seq > prev_seq + 1 {
            return Ok(Err(Tampering::Removed { from: prev_seq + 1, to: entry.seq - 1 }));
        }
        if entry_hash(entry.seq, &entry.prev_hash, &entry.record) != entry.hash {
            return Ok(Err(Tampering::Edited { seq: entry.seq }));
        }
        if entry.prev_hash != prev_hash {
            return Ok(Err(Tampering::BrokenLink { seq: entry.seq, prev: prev_seq }));
        }
        while let Some(seal) = seal_iter.peek() {
            if seal.upto_seq > entry.seq {
                break;
            }
            if seal.upto_seq == entry.seq && seal.chain_hash != entry.hash {
                return Ok(Err(Tampering::SealMismatch { upto_seq: seal.upto_seq }));
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

    fn rewrite(db: &sled::Db, seq: u64, f: impl FnOnce(&mut ChainEntry)) {
        let tree = db.open_tree("audit").unwrap();
        let mut e: ChainEntry = serde_json::from_slice(&tree.get(seq.to_be_bytes()).unwrap().unwrap()).unwrap();
        f(&mut e);
        tree.insert(seq.to_be_bytes(), serde_json::to_vec(&e).unwrap()).unwrap();
    }

    #[test]
    fn intact_log_verifies_and_never_holds_the_raw_key() {
        let (_dir, db, key) = sealed_log();
        assert_eq!(verify(&db, &key).unwrap(), Ok(Verified { entries: 10, seals: 2, unsealed: 0 }));
        let raw = db.open_tree("audit").unwrap().iter().map(|kv| kv.unwrap().1.to_vec()).collect::<Vec<_>>().concat();
        assert!(!String::from_utf8_lossy(&raw).contains("11010519491231002X"));
    }

    #[test]
    fn an_edited_entry_is_found() {
        let (_dir, db, key) = sealed_log();
        rewrite(&db, 4, |e| e.record.result_code = 7);
        assert_eq!(verify(&db, &key).unwrap(), Err(Tampering::Edited { seq: 4 }));
    }

    #[test]
    fn an_edited_and_rehashed_entry_breaks_the_next_link() {
        let (_dir, db, key) = sealed_log();
        rewrite(&db, 4, |e| {
            e.record.consumer = "quality".into();
            e.hash = entry_hash(e.seq, &e.prev_hash, &e.record);
        });
        assert_eq!(verify(&db, &key).unwrap(), Err(Tampering::BrokenLink { seq: 5, prev: 4 }));
    }

    #[test]
    fn a_rewritten_tail_is_caught_by_the_seal() {
        let (_dir, db, key) = sealed_log();
        // Rewrite entries 8..=10 consistently: only the seal's signature still pins the old chain.
        for seq in 8..=10 {
            let prev: ChainEntry =
                serde_json::from_slice(&db.open_tree("audit").unwrap().get((seq - 1u64).to_be_bytes()).unwrap().unwrap()).unwrap();
            rewrite(&db, seq, |e| {
                e.record.data_items.push("住址".into());
                e.prev_hash = prev.hash.clone();
                e.hash = entry_hash(e.seq, &e.prev_hash, &e.record);
            });
        }
        assert_eq!(verify(&db, &key).unwrap(), Err(Tampering::SealMismatch { upto_seq: 10 }));
    }

    #[test]
    fn removed_reordered_and_truncated_entries_are_found() {
        let (_dir, db, key) = sealed_log();
        db.open_tree("audit").unwrap().remove(6u64.to_be_bytes()).unwrap();
        assert_eq!(verify(&db, &key).unwrap(), Err(Tampering::Removed { from: 6, to: 6 }));

        let (_dir, db, key) = sealed_log();
        let tree = db.open_tree("audit").unwrap();
        let (a, b) = (tree.get(2u64.to_be_bytes()).unwrap().unwrap(), tree.get(3u64.to_be_bytes()).unwrap().unwrap());
        tree.insert(2u64.to_be_bytes(), b).unwrap();
        tree.insert(3u64.to_be_bytes(), a).unwrap();
        assert_eq!(verify(&db, &key).unwrap(), Err(Tampering::BrokenLink { seq: 2, prev: 1 }));

        let (_dir, db, key) = sealed_log();
        let tree = db.open_tree("audit").unwrap();
        tree.remove(10u64.to_be_bytes()).unwrap();
        tree.remove(9u64.to_be_bytes()).unwrap();
        assert_eq!(verify(&db, &key).unwrap(), Err(Tampering::Truncated { last: 8, upto_seq: 10 }));
    }

    #[test]
    fn a_forged_seal_and_a_foreign_key_are_refused() {
        let (_dir, db, key) = sealed_log();
        let other = SigningKey::from_bytes(&random_key()).verifying_key();
        assert_eq!(verify(&db, &other).unwrap(), Err(Tampering::BadSignature { upto_seq: 5 }));
        let seals = db.open_tree("audit_seals").unwrap();
        let mut seal: Seal = serde_json::from_slice(&seals.get(10u64.to_be_bytes()).unwrap().unwrap()).unwrap();
        seal.chain_hash = GENESIS.into();
        seals.insert(10u64.to_be_bytes(), serde_json::to_vec(&seal).unwrap()).unwrap();
        assert_eq!(verify(&db, &key).unwrap(), Err(Tampering::BadSignature { upto_seq: 10 }));
    }

    #[test]
    fn reopening_continues_the_chain() {
        let (dir, db, key) = sealed_log();
        drop(db);
        let db = sled::open(dir.path()).unwrap();
        // The same key would come from the node's key file; the chain itself needs only the head.
        let log = AuditLog::open(&db, SigningKey::from_bytes(&random_key())).unwrap();
        assert_eq!(log.append(record(11, &KeyHasher::new([7; 32]))).unwrap(), 11);
        assert_eq!(verify(&db, &key).unwrap(), Ok(Verified { entries: 11, seals: 2, unsealed: 1 }));
    }

    #[test]
    fn keyed_hashes_depend_on_the_key() {
        let a = KeyHasher::new([1; 32]).hash("11010519491231002X");
        assert_eq!(a, KeyHasher::new([1; 32]).hash("11010519491231002X"));
        assert_ne!(a, KeyHasher::new([2; 32]).hash("11010519491231002X"));
        assert_eq!(a.len(), 64);
    }
}
