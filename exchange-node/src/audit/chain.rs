//! The hash chain on sled: appending, sealing, anchors, and the periodic sealer.

use super::*;

// Chain

pub(super) fn entry_domain(format: u32) -> Option<&'static [u8]> {
    match format {
        1 => Some(b"gx-audit-v1"),
        2 => Some(b"gx-audit-v2"),
        _ => None,
    }
}

pub(super) fn entry_hash_json(domain: &[u8], seq: u64, prev_hash: &str, record_json: &[u8]) -> String {
    let mut h = Sha256::new();
    h.update(domain);
    h.update(seq.to_be_bytes());
    h.update(prev_hash.as_bytes());
    h.update(record_json);
    hex::encode(h.finalize())
}

/// The hash an entry of format `format` must carry, or `None` for an unknown format.
pub(super) fn entry_hash(format: u32, seq: u64, prev_hash: &str, record: &AuditRecord) -> Option<String> {
    let domain = entry_domain(format)?;
    Some(entry_hash_json(domain, seq, prev_hash, &serde_json::to_vec(record).expect("records serialize")))
}

pub(super) fn seal_message(upto_seq: u64, chain_hash: &str) -> Vec<u8> {
    let mut m = SEAL_DOMAIN.to_vec();
    m.extend_from_slice(&upto_seq.to_be_bytes());
    m.extend_from_slice(chain_hash.as_bytes());
    m
}

pub(super) const GENESIS: &str = "0000000000000000000000000000000000000000000000000000000000000000";

/// The append-only log on two sled trees (`audit`, `audit_seals`) of the node's database.
pub struct AuditLog {
    pub(super) entries: sled::Tree,
    pub(super) seals: sled::Tree,
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

    /// Holds appends back while a backup copies the log; the guard shows the head (last seq, its hash).
    /// Seals need no pause: a seal covers at most the head, and the head cannot move meanwhile.
    pub(crate) fn pause_appends(&self) -> std::sync::MutexGuard<'_, (u64, String)> {
        self.head.lock().expect("audit head lock")
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

pub(super) fn decode_entry(key: &[u8], value: &[u8]) -> Result<ChainEntry, AuditError> {
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

