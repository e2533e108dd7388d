//! Tests of the audit trail: chain, seals, anchors, keys, queries, verification.

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
    let db = crate::store::open_db_waiting(std::path::Path::new(&dir.path()), std::time::Duration::from_secs(10)).unwrap();
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
    let db = crate::store::open_db_waiting(std::path::Path::new(&dir.path()), std::time::Duration::from_secs(10)).unwrap();
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
    let db = crate::store::open_db_waiting(std::path::Path::new(&dir.path()), std::time::Duration::from_secs(10)).unwrap();
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
    let db = crate::store::open_db_waiting(std::path::Path::new(&dir.path()), std::time::Duration::from_secs(10)).unwrap();
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
    let db = crate::store::open_db_waiting(std::path::Path::new(&dir.path()), std::time::Duration::from_secs(10)).unwrap();
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
    let db = crate::store::open_db_waiting(std::path::Path::new(&dir.path()), std::time::Duration::from_secs(10)).unwrap();
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
    let db = crate::store::open_db_waiting(std::path::Path::new(&dir.path()), std::time::Duration::from_secs(10)).unwrap();
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
    let db = crate::store::open_db_waiting(std::path::Path::new(&dir.path()), std::time::Duration::from_secs(10)).unwrap();
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
    let db = crate::store::open_db_waiting(std::path::Path::new(&dir.path()), std::time::Duration::from_secs(10)).unwrap();
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
