//! Verification: where a trail was edited, removed, reordered or cut off.

use super::*;

// Verification

pub(super) fn existing_tree(db: &sled::Db, name: &str) -> Result<Option<sled::Tree>, AuditError> {
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

pub(super) fn verify_trees(
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

pub(super) fn report(result: Result<Result<Verified, Tampering>, AuditError>, key: &VerifyingKey) -> VerifyAuditResponse {
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

