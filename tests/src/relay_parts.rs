//! Where a relayed query's time goes: the node's per-call steps timed one by one, in process, with the
//! node's own code (record store, audit trail, key hasher, disclosure, certificate parsing), so the
//! benchmark can print a breakdown next to the end-to-end figures.
//!
//! Each figure is a mean over many calls on one thread (or one task), on the same 2-core machine the
//! end-to-end load runs on, so compare them with each other and with the per-query CPU budget of the
//! end-to-end run (2 cores ÷ queries per second), not as absolute truths.

use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, Instant};

use exchange_node::audit::{AuditKeys, AuditLog, AuditRecord, Side};
use exchange_node::records::{disclosure, RecordStore, SledRecordStore};
use exchange_proto::v1::{CatalogEntry, FetchRecordsResponse, Record};
use prost::Message;

/// One step: what it is, mean time per call, and how many calls were timed.
#[derive(Clone, Debug)]
pub struct Part {
    pub name: String,
    pub per_call: Duration,
    pub calls: u64,
    /// The slowest single call (or batch), when it says something (a flush).
    pub max: Option<Duration>,
}

fn part(name: &str, total: Duration, calls: u64) -> Part {
    Part { name: name.to_string(), per_call: total / calls.max(1) as u32, calls, max: None }
}

/// A realistic audit record of one relayed single-key query.
pub fn audit_record(i: u64, side: Side, key_hash: String, data_items: &[String]) -> AuditRecord {
    AuditRecord {
        message_id: format!("{:032x}", i),
        side,
        consumer: "tax".into(),
        provider: "commerce".into(),
        resource_code: "101001/000001".into(),
        key_hash,
        data_items: data_items.to_vec(),
        result_code: 0,
        request_bytes: 55,
        response_bytes: 903,
        request_in_us: 1_700_000_000_000_000 + i as i64,
        request_out_us: 1_700_000_000_000_010 + i as i64,
        response_in_us: 1_700_000_000_000_300 + i as i64,
        response_out_us: 1_700_000_000_000_320 + i as i64,
        caller: if side == Side::Consumer { "tax-app".into() } else { "tax-node".into() },
        purpose: "企业信用核查".into(),
        error: String::new(),
    }
}

fn key_at(i: u64, n: usize) -> usize {
    (i.wrapping_mul(0x9E37_79B9_7F4A_7C15) >> 17) as usize % n
}

/// Times the node's per-call steps with `records` (as the provider stores them) of `entry`, in a fresh
/// sled database under `dir`. `cert_pem` is a client certificate, as the per-call identity check parses it.
pub async fn measure(dir: &Path, entry: &CatalogEntry, records: &[Record], cert_pem: &Path) -> anyhow::Result<Vec<Part>> {
    use rustls::pki_types::pem::PemObject;
    let n = 20_000u64;
    let mut parts = Vec::new();
    let db = sled::open(dir.join("node.sled"))?;
    let store = Arc::new(SledRecordStore::open(&db)?);
    for chunk in records.chunks(1_000) {
        store.put_batch(&entry.resource_code, chunk.to_vec())?;
    }
    let keys: Vec<String> = records.iter().map(|r| r.key.clone()).collect();

    // Record store read (sled get + prost decode), on the calling thread.
    let t = Instant::now();
    for i in 0..n {
        let k = &keys[key_at(i, keys.len())];
        let got = store.get_many(&entry.resource_code, std::slice::from_ref(k))?;
        assert!(got[0].is_some());
    }
    parts.push(part("record store get_many, 1 key (sled get + decode)", t.elapsed(), n));

    // The same read through spawn_blocking, awaited, as the provider does it: adds the hand-off to a
    // blocking thread and the wake-up back.
    let t = Instant::now();
    for i in 0..n {
        let (store, code, key) = (store.clone(), entry.resource_code.clone(), keys[key_at(i, keys.len())].clone());
        let got = tokio::task::spawn_blocking(move || store.get_many(&code, &[key])).await??;
        assert!(got[0].is_some());
    }
    parts.push(part("same read via spawn_blocking + await", t.elapsed(), n));

    // Disclosure (unconditional: every item) and the answer's encoding, per record.
    let d = disclosure::disclosure(entry, None);
    let t = Instant::now();
    let mut bytes = 0usize;
    for i in 0..n {
        let r = records[key_at(i, records.len())].clone();
        let resp = FetchRecordsResponse {
            records: vec![disclosure::apply(&d, entry, r)],
            data_items: d.data_items.clone(),
            ..Default::default()
        };
        bytes += resp.encode_to_vec().len();
    }
    assert!(bytes > 0);
    parts.push(part("disclosure + apply + encode the answer", t.elapsed(), n));

    // Per-call identity check (each node's interceptor parses the caller's certificate).
    let der = rustls::pki_types::CertificateDer::from_pem_file(cert_pem)?;
    let t = Instant::now();
    for _ in 0..n {
        let id = client_sdk::identity::identity_from_der(&der)?;
        assert!(!id.name.is_empty());
    }
    parts.push(part("identity_from_der (per-call identity check)", t.elapsed(), n));

    // Audit: key hash, then append (JSON, SHA-256, sled insert under the chain-head lock).
    let keys_ = AuditKeys::from_secrets([7u8; 32], [9u8; 32]);
    let hasher = keys_.hasher().clone();
    let t = Instant::now();
    let mut hashes = Vec::with_capacity(n as usize);
    for i in 0..n {
        hashes.push(hasher.hash_keys(std::slice::from_ref(&keys[key_at(i, keys.len())])));
    }
    parts.push(part("audit key hash (HMAC-SHA-256)", t.elapsed(), n));
    let log = Arc::new(AuditLog::open(&db, keys_.signing_key().clone())?);
    let items = d.data_items.clone();
    let t = Instant::now();
    for (i, h) in hashes.iter().enumerate() {
        log.append(audit_record(i as u64, Side::Provider, h.clone(), &items))?;
    }
    parts.push(part("audit append (one thread)", t.elapsed(), n));

    // Two threads appending at once (the two runtime workers of a node under load).
    let t = Instant::now();
    std::thread::scope(|s| {
        for th in 0..2u64 {
            let (log, items, hashes) = (&log, &items, &hashes);
            s.spawn(move || {
                for i in 0..n / 2 {
                    log.append(audit_record(n + th * n + i, Side::Consumer, hashes[i as usize].clone(), items)).unwrap();
                }
            });
        }
    });
    parts.push(part("audit append (two threads at once)", t.elapsed(), n));

    // Sealing: sign the head and flush the whole database (every 10 s by default, off the runtime).
    let t = Instant::now();
    log.seal(exchange_node::relay::now_us())?;
    let mut p = part(&format!("audit seal + flush after {} appends", 2 * n), t.elapsed(), 1);
    p.max = Some(t.elapsed());
    parts.push(p);

    // Appends while a seal+flush runs on another thread: does the flush stall the hot path?
    let stop = std::sync::atomic::AtomicBool::new(false);
    let (mut worst, mut count, mut total) = (Duration::ZERO, 0u64, Duration::ZERO);
    std::thread::scope(|s| {
        let (log, stop) = (&log, &stop);
        s.spawn(move || {
            for _ in 0..5 {
                std::thread::sleep(Duration::from_millis(20));
                // Appends between seals, so each seal has something to flush.
                let _ = log.seal(exchange_node::relay::now_us());
            }
            stop.store(true, std::sync::atomic::Ordering::Relaxed);
        });
        let mut i = 0u64;
        while !stop.load(std::sync::atomic::Ordering::Relaxed) {
            let t = Instant::now();
            log.append(audit_record(10 * n + i, Side::Consumer, hashes[(i % n) as usize].clone(), &items)).unwrap();
            let e = t.elapsed();
            worst = worst.max(e);
            total += e;
            count += 1;
            i += 1;
        }
    });
    let mut p = part("audit append while seals flush (mean; max = worst single append)", total, count);
    p.max = Some(worst);
    parts.push(p);

    // Appends at a relay's pace (one every 250 µs, 4,000/s: two workers' worth at 2,000 queries/s)
    // for 3 s, with sled's own background flush (every 500 ms) and the node's seal every 1 s: what a
    // single append costs the runtime thread it runs on, in the tail.
    let mut lat = Vec::new();
    let started = Instant::now();
    let mut next_seal = started + Duration::from_secs(1);
    let mut i = 0u64;
    while started.elapsed() < Duration::from_secs(3) {
        let due = started + Duration::from_micros(250 * i);
        let now = Instant::now();
        if due > now {
            std::thread::sleep(due - now);
        }
        if Instant::now() >= next_seal {
            // On its own thread, as spawn_blocking runs it in the node.
            let log = log.clone();
            std::thread::spawn(move || log.seal(exchange_node::relay::now_us()));
            next_seal += Duration::from_secs(1);
        }
        let t = Instant::now();
        log.append(audit_record(20 * n + i, Side::Consumer, hashes[(i % n) as usize].clone(), &items))?;
        lat.push(t.elapsed());
        i += 1;
    }
    lat.sort_unstable();
    let pct = |p: f64| lat[((lat.len() - 1) as f64 * p / 100.0).round() as usize];
    let slow = lat.iter().filter(|d| **d > Duration::from_millis(1)).count();
    parts.push(Part {
        name: format!(
            "audit append at 4,000/s for 3 s with flushes: p50 {:.0} µs, p99 {:.0} µs, p99.9 {:.0} µs, {} of {} > 1 ms",
            pct(50.0).as_secs_f64() * 1e6,
            pct(99.0).as_secs_f64() * 1e6,
            pct(99.9).as_secs_f64() * 1e6,
            slow,
            lat.len()
        ),
        per_call: lat.iter().sum::<Duration>() / lat.len() as u32,
        calls: lat.len() as u64,
        max: lat.last().copied(),
    });

    drop(log);
    drop(store);
    db.flush()?;
    Ok(parts)
}
