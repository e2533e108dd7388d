//! Push subscriptions and bulk sync under load (issue 4), driven by `bench --only events|sync|backlog`:
//!
//! - [`events`]: sustained event delivery node to node with durability on: an application publishes
//!   enterprise change events to commerce's node (`PublishEvents`, several publishers), tax's node
//!   receives them over `StreamEvents` into its inbox, tax's application reads `ReceiveEvents` and acks.
//! - [`sync`]: bulk sync of a large resource: the records loaded into commerce's node, then tax's
//!   application runs `SyncSnapshot` through tax's node (two hops over mutual TLS).
//! - [`backlog`]: the provider's memory with a large backlog: commerce's and tax's nodes as separate
//!   processes (the real `exchange-node` binary), tax subscribed and stopped, the events published, peak
//!   RSS of commerce read from `/proc`; then tax started again and the backlog drained.
//!
//! Every figure comes with a disk baseline measured in the same run on the same data (raw sled batches
//! flushed per batch, or a raw sled scan), because absolute figures move by a third on this shared
//! 2-core machine and ratios much less. Figures are returned as [`Figure`]s for the harness's table.

use std::collections::VecDeque;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use client_sdk::identity::Role;
use client_sdk::tls::TlsIdentity;
use exchange_node::records::sled::SledRecordStore;
use exchange_node::records::RecordStore;
use exchange_proto::v1::exchange_node_client::ExchangeNodeClient;
use exchange_proto::v1::{
    AckEventsRequest, ListSubscriptionsRequest, PublishEventsRequest, ReceiveEventsRequest, Record, RecordChange,
    RecordChangeKind, SubscribeRequest, SyncSnapshotRequest,
};
use prost::Message;
use tokio::sync::watch;
use tonic::transport::Channel;

use crate::federation;
use crate::pki::TestPki;
use crate::procs::{free_port, Proc};

/// The resource every section uses: commerce's 企业登记信息 (unconditional, so tax needs no grant).
pub const RESOURCE: &str = "101001/000001";

/// One line of the harness's result table.
pub struct Figure {
    pub figure: String,
    pub value: String,
    pub baseline: String,
    pub ratio: String,
    pub target: String,
}

fn fig(figure: impl Into<String>, value: impl Into<String>, baseline: impl Into<String>, ratio: impl Into<String>, target: impl Into<String>) -> Figure {
    Figure { figure: figure.into(), value: value.into(), baseline: baseline.into(), ratio: ratio.into(), target: target.into() }
}

/// What the sections are asked to do.
#[derive(Clone, Debug)]
pub struct Options {
    /// Events published in the `events` section.
    pub events: usize,
    /// Records per `PublishEvents` call (and per raw sled batch in the baselines).
    pub batch: usize,
    /// Concurrent publishers, each on its own connection.
    pub publishers: usize,
    /// Records loaded and synced in the `sync` section.
    pub sync_records: usize,
    /// Events left unacknowledged in the `backlog` section.
    pub backlog_events: usize,
    /// The application acknowledges the latest event it has at most this often (zero: after every
    /// message it receives).
    pub ack_every: Duration,
}

fn rate(n: usize, d: Duration) -> f64 {
    n as f64 / d.as_secs_f64().max(1e-9)
}

fn secs(d: Duration) -> String {
    format!("{:.2} s", d.as_secs_f64())
}

fn mb(kb: u64) -> String {
    format!("{:.0} MB", kb as f64 / 1024.0)
}

fn pct(v: f64, base: f64) -> String {
    format!("{:.0}%", 100.0 * v / base.max(1e-9))
}

// ---------------------------------------------------------------------------------------------------
// Data

/// `n` enterprise records of [`RESOURCE`], record indexes `start..start + n`: the values of
/// [`federation::enterprise_records`] (every data item filled) repeated over 20,000 templates, each with
/// its own valid credit code (the index in the organisation-code digits), so any index range is unique
/// and generating a million records takes seconds.
pub fn enterprise_records(start: usize, n: usize, seed: u64) -> Vec<Record> {
    const TEMPLATES: usize = 20_000;
    let templates = federation::enterprise_records(TEMPLATES.min(start + n), seed);
    (start..start + n)
        .map(|i| {
            let mut r = templates[i % templates.len()].clone();
            if i >= templates.len() {
                // "91" + the template's region code, then the index as federation's generator does.
                r.key = federation::uscc(&format!("{}{:09}", &r.key[..8], i * 7 + 1));
            }
            r
        })
        .collect()
}

/// [`enterprise_records`] a batch at a time from a few templates held in memory, for a process whose
/// own memory is measured (generating all records first would dwarf what is measured).
pub struct RecordGen {
    templates: Vec<Record>,
}

impl RecordGen {
    pub fn new(templates: usize, seed: u64) -> Self {
        RecordGen { templates: federation::enterprise_records(templates.max(1), seed) }
    }

    /// Records with indexes `start..start + n` (keys unique across any index range).
    pub fn batch(&self, start: usize, n: usize) -> Vec<Record> {
        (start..start + n)
            .map(|i| {
                let mut r = self.templates[i % self.templates.len()].clone();
                r.key = federation::uscc(&format!("{}{:09}", &r.key[..8], i * 7 + 1));
                r
            })
            .collect()
    }
}

/// What the memory baseline writes: see [`sled_memory_child`].
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum MemoryMode {
    /// Raw sled: the records, one `apply_batch` + flush per batch.
    Records,
    /// Raw sled: the records, and written again as values of 500 records (the change log's size and
    /// value size).
    RecordsAndLog,
    /// The node's record store (`SledRecordStore::apply_changes`), no gRPC.
    Store,
}

impl MemoryMode {
    pub fn name(self) -> &'static str {
        match self {
            MemoryMode::Records => "records",
            MemoryMode::RecordsAndLog => "records-log",
            MemoryMode::Store => "store",
        }
    }

    pub fn parse(s: &str) -> Option<Self> {
        [MemoryMode::Records, MemoryMode::RecordsAndLog, MemoryMode::Store].into_iter().find(|m| m.name() == s)
    }
}

/// The memory baseline, run in a child process of its own (`bench --only sled-memory`): `n` records
/// written in batches of `batch` into a sled database opened as the node opens it (64 MB cache), records
/// generated a batch at a time; prints `peak_rss_kb=… rss_kb=… secs=…` for the parent.
///
/// `log_chunk` > 0 writes a batch's log as values of that many records (the parent passes 500, as the
/// node writes them; 0 is one value per batch); `cache_bytes` replaces the node's cache capacity.
pub fn sled_memory_child(
    dir: &Path,
    mode: MemoryMode,
    n: usize,
    batch: usize,
    log_chunk: usize,
    cache_bytes: Option<u64>,
) -> anyhow::Result<()> {
    let gen = RecordGen::new(1_000, 13);
    let db = match cache_bytes {
        Some(c) => sled::Config::new().path(dir).cache_capacity(c).open()?,
        None => exchange_node::store::open_db_waiting(dir, Duration::from_secs(5))?,
    };
    let tree = db.open_tree(SledRecordStore::TREE)?;
    let store = SledRecordStore::open(&db)?;
    let started = Instant::now();
    let mut start = 0;
    let mut i = 0u64;
    while start < n {
        let records = federation::as_stored(&gen.batch(start, batch.min(n - start)), 1_800_000_000_000);
        start += records.len();
        match mode {
            MemoryMode::Store => {
                let changes = records.into_iter().map(|r| (r, RecordChangeKind::Unspecified)).collect();
                store.apply_changes(RESOURCE, changes)?;
            }
            _ => {
                let mut b = sled::Batch::default();
                let mut log = Vec::new();
                let chunk = if log_chunk == 0 { usize::MAX } else { log_chunk };
                let mut in_chunk = 0;
                for r in &records {
                    let v = r.encode_to_vec();
                    if mode == MemoryMode::RecordsAndLog {
                        log.extend_from_slice(&v);
                        in_chunk += 1;
                        if in_chunk == chunk {
                            let mut k = vec![0xFF, b'e'];
                            k.extend_from_slice(&i.to_be_bytes());
                            b.insert(k, std::mem::take(&mut log));
                            in_chunk = 0;
                            i += 1;
                        }
                    }
                    b.insert(storage_key(&r.key), v);
                }
                if mode == MemoryMode::RecordsAndLog && !log.is_empty() {
                    let mut k = vec![0xFF, b'e'];
                    k.extend_from_slice(&i.to_be_bytes());
                    b.insert(k, log);
                }
                tree.apply_batch(b)?;
                tree.flush()?;
            }
        }
        i += 1;
    }
    let secs = started.elapsed().as_secs_f64();
    let me = std::process::id();
    println!(
        "peak_rss_kb={} rss_kb={} secs={secs:.2}",
        status_kb(me, "VmHWM").unwrap_or(0),
        status_kb(me, "VmRSS").unwrap_or(0)
    );
    Ok(())
}

/// Runs [`sled_memory_child`] in a child process (this executable) and returns (peak RSS kB, seconds).
pub fn sled_memory_baseline(dir: &Path, mode: MemoryMode, n: usize, batch: usize) -> anyhow::Result<(u64, f64)> {
    let _ = std::fs::remove_dir_all(dir);
    let out = std::process::Command::new(std::env::current_exe()?)
        .args(["--only", "sled-memory", "--memory-mode", mode.name(), "--memory-dir"])
        .arg(dir)
        .args(["--backlog-events", &n.to_string(), "--event-batch", &batch.to_string()])
        // The log's values as the node writes them: at most 500 events each.
        .args(["--memory-log-chunk", "500"])
        .stderr(std::process::Stdio::inherit())
        .output()?;
    let _ = std::fs::remove_dir_all(dir);
    let text = String::from_utf8_lossy(&out.stdout);
    anyhow::ensure!(out.status.success(), "memory baseline ({}) failed:\n{text}", mode.name());
    let field = |name: &str| {
        text.split_whitespace().find_map(|w| w.strip_prefix(&format!("{name}=")).map(str::to_string)).unwrap_or_default()
    };
    Ok((field("peak_rss_kb").parse()?, field("secs").parse()?))
}

/// The records as `PublishEvents` calls of `batch` changes each (kind unspecified: CREATED or UPDATED
/// as the store finds them, exactly what `PutRecords` does).
pub fn publish_requests(records: Vec<Record>, batch: usize) -> Vec<PublishEventsRequest> {
    let mut out = Vec::with_capacity(records.len().div_ceil(batch.max(1)));
    let mut changes = Vec::with_capacity(batch);
    for r in records {
        changes.push(RecordChange { record: Some(r), kind: RecordChangeKind::Unspecified as i32 });
        if changes.len() == batch {
            out.push(PublishEventsRequest { resource_code: RESOURCE.into(), changes: std::mem::take(&mut changes), ..Default::default() });
        }
    }
    if !changes.is_empty() {
        out.push(PublishEventsRequest { resource_code: RESOURCE.into(), changes, ..Default::default() });
    }
    out
}

/// The records as the provider's node stores them (key item added), batch by batch: what the disk
/// baselines write.
fn stored_batches(requests: &[PublishEventsRequest]) -> Vec<Vec<Record>> {
    requests
        .iter()
        .map(|r| {
            let records: Vec<Record> = r.changes.iter().filter_map(|c| c.record.clone()).collect();
            federation::as_stored(&records, 1_800_000_000_000)
        })
        .collect()
}

fn storage_key(record_key: &str) -> Vec<u8> {
    let mut k = RESOURCE.as_bytes().to_vec();
    k.push(0);
    k.extend_from_slice(record_key.as_bytes());
    k
}

/// The disk-write baseline: the same encoded records into a raw sled tree (the node's cache setting),
/// one `apply_batch` per batch, flushed per batch; records/s. The folder is removed afterwards.
pub fn raw_sled_insert(dir: &Path, batches: &[Vec<Record>]) -> anyhow::Result<(f64, Duration)> {
    raw_sled_insert_as(dir, batches, false)
}

/// [`raw_sled_insert`]; with `with_log`, each batch also writes all its encoded records again as one
/// more value (what a change log beside the records costs the disk, without anything else).
pub fn raw_sled_insert_as(dir: &Path, batches: &[Vec<Record>], with_log: bool) -> anyhow::Result<(f64, Duration)> {
    let _ = std::fs::remove_dir_all(dir);
    let n: usize = batches.iter().map(Vec::len).sum();
    let elapsed = {
        let db = exchange_node::store::open_db_waiting(dir, Duration::from_secs(5))?;
        let tree = db.open_tree("records")?;
        let started = Instant::now();
        for (i, batch) in batches.iter().enumerate() {
            let mut b = sled::Batch::default();
            let mut log = Vec::new();
            for r in batch {
                let v = r.encode_to_vec();
                if with_log {
                    log.extend_from_slice(&v);
                }
                b.insert(storage_key(&r.key), v);
            }
            if with_log {
                let mut k = vec![0xFF, b'e'];
                k.extend_from_slice(&(i as u64).to_be_bytes());
                b.insert(k, log);
            }
            tree.apply_batch(b)?;
            tree.flush()?;
        }
        started.elapsed()
    };
    let _ = std::fs::remove_dir_all(dir);
    Ok((rate(n, elapsed), elapsed))
}

/// The node's record store alone (`SledRecordStore::apply_changes`: records, change-kind lookups, the
/// change-log entry, the head, one flush), in process, without validation, gRPC or delivery; records/s.
pub fn store_only(dir: &Path, batches: &[Vec<Record>]) -> anyhow::Result<f64> {
    let _ = std::fs::remove_dir_all(dir);
    let n: usize = batches.iter().map(Vec::len).sum();
    let elapsed = {
        let db = exchange_node::store::open_db_waiting(dir, Duration::from_secs(5))?;
        let store = SledRecordStore::open(&db)?;
        let started = Instant::now();
        for batch in batches {
            let changes = batch.iter().cloned().map(|r| (r, RecordChangeKind::Unspecified)).collect();
            store.apply_changes(RESOURCE, changes)?;
        }
        started.elapsed()
    };
    let _ = std::fs::remove_dir_all(dir);
    Ok(rate(n, elapsed))
}

/// The read baseline: every record of [`RESOURCE`] in a node's sled database, scanned in key order and
/// decoded, one thread, no network; (records, time).
pub fn raw_sled_scan(db_path: &Path) -> anyhow::Result<(u64, Duration)> {
    let db = exchange_node::store::open_db_waiting(db_path, Duration::from_secs(10))?;
    let tree = db.open_tree(SledRecordStore::TREE)?;
    let mut prefix = RESOURCE.as_bytes().to_vec();
    prefix.push(0);
    let started = Instant::now();
    let mut n = 0u64;
    for item in tree.scan_prefix(&prefix) {
        let (_, v) = item?;
        let r = Record::decode(v.as_ref())?;
        std::hint::black_box(&r);
        n += 1;
    }
    Ok((n, started.elapsed()))
}

/// Counts the records of [`RESOURCE`] in a node's sled database by walking their keys; (count, time).
pub fn raw_sled_count(db_path: &Path) -> anyhow::Result<(u64, Duration)> {
    let db = exchange_node::store::open_db_waiting(db_path, Duration::from_secs(10))?;
    let tree = db.open_tree(SledRecordStore::TREE)?;
    let mut prefix = RESOURCE.as_bytes().to_vec();
    prefix.push(0);
    let started = Instant::now();
    let mut n = 0u64;
    for key in tree.scan_prefix(&prefix).keys() {
        key?;
        n += 1;
    }
    Ok((n, started.elapsed()))
}

fn dir_size(path: &Path) -> u64 {
    let Ok(entries) = std::fs::read_dir(path) else { return 0 };
    entries
        .filter_map(Result::ok)
        .map(|e| match e.metadata() {
            Ok(m) if m.is_dir() => dir_size(&e.path()),
            Ok(m) => m.len(),
            Err(_) => 0,
        })
        .sum()
}

// ---------------------------------------------------------------------------------------------------
// Processes: memory and CPU from /proc

/// A field of `/proc/<pid>/status` in kB (`VmRSS`, `VmHWM`).
pub fn status_kb(pid: u32, field: &str) -> Option<u64> {
    let text = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    let line = text.lines().find(|l| l.starts_with(field) && l[field.len()..].starts_with(':'))?;
    line[field.len() + 1..].trim().trim_end_matches("kB").trim().parse().ok()
}

/// Resets the peak RSS (`VmHWM`) of `pid` to its current RSS (Linux: `echo 5 > /proc/PID/clear_refs`).
pub fn reset_peak(pid: u32) -> bool {
    std::fs::write(format!("/proc/{pid}/clear_refs"), "5").is_ok()
}

/// User + system CPU time of `pid` so far (clock ticks of 10 ms).
pub fn pid_cpu_time(pid: u32) -> Option<Duration> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    let rest = &stat[stat.rfind(')')? + 2..];
    let fields: Vec<&str> = rest.split_whitespace().collect();
    let utime: u64 = fields.get(11)?.parse().ok()?;
    let stime: u64 = fields.get(12)?.parse().ok()?;
    Some(Duration::from_millis((utime + stime) * 10))
}

/// Samples `VmRSS` of a process every `every` on its own thread; keeps the highest.
pub struct RssSampler {
    stop: Arc<AtomicBool>,
    max_kb: Arc<AtomicU64>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl RssSampler {
    pub fn start(pid: u32, every: Duration) -> Self {
        let stop = Arc::new(AtomicBool::new(false));
        let max_kb = Arc::new(AtomicU64::new(0));
        let (s, m) = (stop.clone(), max_kb.clone());
        let thread = std::thread::spawn(move || {
            while !s.load(Ordering::Relaxed) {
                if let Some(kb) = status_kb(pid, "VmRSS") {
                    m.fetch_max(kb, Ordering::Relaxed);
                }
                std::thread::sleep(every);
            }
        });
        RssSampler { stop, max_kb, thread: Some(thread) }
    }

    /// Stops sampling; the highest RSS seen (kB).
    pub fn finish(mut self) -> u64 {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
        self.max_kb.load(Ordering::Relaxed)
    }
}

/// CPU used by this process and by `pids` since [`CpuMeter::start`], and by everything else on the
/// machine (a shared 2-core box is only comparable with itself when this is known).
pub struct CpuMeter {
    started: Instant,
    own: Option<Duration>,
    machine: Option<Duration>,
    pids: Vec<(u32, Duration)>,
}

impl CpuMeter {
    pub fn start(pids: &[u32]) -> Self {
        CpuMeter {
            started: Instant::now(),
            own: crate::load::process_cpu_time(),
            machine: crate::load::machine_busy_time(),
            pids: pids.iter().map(|&p| (p, pid_cpu_time(p).unwrap_or_default())).collect(),
        }
    }

    /// CPU of this process since the start.
    pub fn own(&self) -> Option<Duration> {
        crate::load::process_cpu_time()?.checked_sub(self.own?)
    }

    /// CPU of one of the watched processes since the start.
    pub fn of(&self, pid: u32) -> Option<Duration> {
        let (_, before) = self.pids.iter().find(|(p, _)| *p == pid)?;
        pid_cpu_time(pid)?.checked_sub(*before)
    }

    /// The share of all cores (0.0 to 1.0) that processes other than this one and the watched ones used.
    pub fn others_share(&self) -> Option<f64> {
        let cores = std::thread::available_parallelism().map(|n| n.get()).unwrap_or(1) as f64;
        let mut ours = self.own()?;
        for (p, _) in &self.pids {
            ours += self.of(*p).unwrap_or_default();
        }
        let machine = crate::load::machine_busy_time()?.checked_sub(self.machine?)?;
        Some((machine.saturating_sub(ours).as_secs_f64() / (self.started.elapsed().as_secs_f64() * cores)).clamp(0.0, 1.0))
    }

    pub fn others(&self) -> String {
        self.others_share().map_or("?".into(), |s| format!("{:.0}%", s * 100.0))
    }
}

/// Prints a warning when other processes (not this one, nor `pids`) keep the machine busy for a second
/// before a measurement (a compile, say).
pub fn check_quiet(what: &str, pids: &[u32]) {
    let meter = CpuMeter::start(pids);
    std::thread::sleep(Duration::from_secs(1));
    if let Some(share) = meter.others_share() {
        if share > 0.15 {
            println!("warning: other processes keep {:.0}% of the machine busy before {what}: figures may be distorted", share * 100.0);
        }
    }
}

// ---------------------------------------------------------------------------------------------------
// Clients

fn node_client(addr: &str, id: &TlsIdentity) -> anyhow::Result<ExchangeNodeClient<Channel>> {
    Ok(client_sdk::client::node_client(addr, id)?)
}

/// What publishing measured.
pub struct PublishStats {
    pub events: usize,
    pub calls: usize,
    pub elapsed: Duration,
    /// Per call, sorted.
    pub latencies: Vec<Duration>,
    /// Highest seq acknowledged.
    pub last_seq: u64,
}

impl PublishStats {
    pub fn percentile(&self, p: f64) -> Duration {
        if self.latencies.is_empty() {
            return Duration::ZERO;
        }
        self.latencies[((self.latencies.len() as f64 - 1.0) * p / 100.0).round() as usize]
    }
}

/// Publishes `requests` from `publishers` tasks, each on its own connection (made before the clock
/// starts), each taking the next batch when its previous one was acknowledged (durable).
pub async fn publish_all(
    addr: &str,
    app: &TlsIdentity,
    publishers: usize,
    requests: Vec<PublishEventsRequest>,
) -> anyhow::Result<PublishStats> {
    let events: usize = requests.iter().map(|r| r.changes.len()).sum();
    let calls = requests.len();
    let mut clients = Vec::new();
    for _ in 0..publishers.max(1) {
        let mut c = node_client(addr, app)?;
        c.list_subscriptions(ListSubscriptionsRequest {}).await?; // connect now, not on the clock
        clients.push(c);
    }
    let queue = Arc::new(Mutex::new(VecDeque::from(requests)));
    let started = Instant::now();
    let mut tasks = Vec::new();
    for mut c in clients {
        let queue = queue.clone();
        tasks.push(tokio::spawn(async move {
            let mut lat = Vec::new();
            let mut last = 0u64;
            loop {
                let Some(req) = queue.lock().expect("queue").pop_front() else { break };
                let t = Instant::now();
                let resp = c.publish_events(req).await?.into_inner();
                lat.push(t.elapsed());
                last = last.max(resp.last_seq);
            }
            Ok::<_, tonic::Status>((lat, last))
        }));
    }
    let mut latencies = Vec::new();
    let mut last_seq = 0;
    for t in tasks {
        let (lat, last) = t.await??;
        latencies.extend(lat);
        last_seq = last_seq.max(last);
    }
    let elapsed = started.elapsed();
    latencies.sort_unstable();
    Ok(PublishStats { events, calls, elapsed, latencies, last_seq })
}

/// What the application's `ReceiveEvents` stream measured.
#[derive(Default)]
pub struct ReceiveStats {
    pub events: u64,
    pub messages: u64,
    pub acks: u64,
    /// Acknowledgements the node refused (and why).
    pub refused_acks: Vec<String>,
    /// When the event with the target seq arrived.
    pub finished: Option<Instant>,
    /// Per message: now − the last event's `published_at` (ms), for events after `measure_after`.
    pub lags_ms: Vec<i64>,
}

fn now_unix_ms() -> i64 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map(|d| d.as_millis() as i64).unwrap_or(0)
}

/// Reads the subscription's inbox as an application does (`ReceiveEvents` from after the last
/// acknowledged event, then live) until the event `target_seq` arrived, checking every event arrives
/// once and in order; acknowledges as it goes from a separate task (the latest seq, coalesced: the
/// reading never waits for an acknowledgement's flush). Reports each seq reached on `progress`. Opening
/// the stream is retried for `open_within` (the node may be starting).
pub async fn receive_until(
    client: ExchangeNodeClient<Channel>,
    target_seq: u64,
    measure_after: u64,
    open_within: Duration,
    idle_timeout: Duration,
    ack_every: Duration,
    progress: watch::Sender<u64>,
) -> anyhow::Result<ReceiveStats> {
    let req = ReceiveEventsRequest { resource_code: RESOURCE.into(), after_seq: 0, max_batch: 0 };
    let deadline = Instant::now() + open_within;
    let mut stream = loop {
        let mut c = client.clone();
        match c.receive_events(req.clone()).await {
            Ok(s) => break s.into_inner(),
            Err(e) if Instant::now() < deadline => {
                tracing::debug!(error = %e, "ReceiveEvents not open yet");
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
            Err(e) => anyhow::bail!("ReceiveEvents could not be opened: {e}"),
        }
    };
    let (ack_tx, mut ack_rx) = watch::channel(0u64);
    let mut acker = client.clone();
    // A refused acknowledgement is counted and reported, not fatal (before 3586614 an ack racing with an
    // inbox write could be refused for events the node had just handed out; see docs/BENCHMARKS.md); the
    // next acknowledgement covers it. The last one is retried until it is accepted.
    let ack_task = tokio::spawn(async move {
        let mut acks = 0u64;
        let mut refused = Vec::new();
        let mut done = 0u64;
        loop {
            let closed = ack_rx.changed().await.is_err();
            let upto = *ack_rx.borrow_and_update();
            let mut tries = 0;
            while upto > done {
                match acker.ack_events(AckEventsRequest { resource_code: RESOURCE.into(), upto_seq: upto }).await {
                    Ok(_) => {
                        done = upto;
                        acks += 1;
                        if !closed && !ack_every.is_zero() {
                            // At most one acknowledgement per interval; a seq that arrives meanwhile is
                            // acknowledged next (or when the stream ends).
                            let until = Instant::now() + ack_every;
                            while Instant::now() < until && ack_rx.has_changed().is_ok() {
                                tokio::time::sleep(Duration::from_millis(20)).await;
                            }
                        }
                    }
                    Err(e) if e.code() == tonic::Code::InvalidArgument && tries < 600 => {
                        refused.push(format!("ack of {upto}: {}", e.message()));
                        if !closed {
                            break;
                        }
                        tries += 1;
                        tokio::time::sleep(Duration::from_millis(100)).await;
                    }
                    Err(e) => return Err(e),
                }
            }
            if closed {
                return Ok::<_, tonic::Status>((acks, refused));
            }
        }
    });
    let mut stats = ReceiveStats::default();
    let mut prev: Option<u64> = None;
    while prev.unwrap_or(0) < target_seq {
        let msg = match tokio::time::timeout(idle_timeout, stream.message()).await {
            Ok(Ok(Some(m))) => m,
            Ok(Ok(None)) => anyhow::bail!("ReceiveEvents ended after seq {prev:?} of {target_seq}"),
            Ok(Err(e)) => anyhow::bail!("ReceiveEvents failed after seq {prev:?} of {target_seq}: {e}"),
            Err(_) => anyhow::bail!("no event for {idle_timeout:?} after seq {prev:?} of {target_seq}"),
        };
        anyhow::ensure!(msg.ended_reason.is_empty(), "the subscription ended: {}", msg.ended_reason);
        let now = now_unix_ms();
        for e in &msg.events {
            if let Some(p) = prev {
                anyhow::ensure!(e.seq == p + 1, "event seq {} after {p}: an event lost or repeated", e.seq);
            }
            prev = Some(e.seq);
        }
        stats.events += msg.events.len() as u64;
        stats.messages += 1;
        if let Some(last) = msg.events.last() {
            if last.seq > measure_after {
                stats.lags_ms.push(now - last.published_at_unix_ms);
            }
            let _ = progress.send(last.seq);
            ack_tx.send_replace(last.seq);
        }
    }
    stats.finished = Some(Instant::now());
    drop(ack_tx);
    let (acks, refused) = ack_task.await??;
    stats.acks = acks;
    stats.refused_acks = refused;
    stats.lags_ms.sort_unstable();
    Ok(stats)
}

/// The consumer side's last delivery error of the subscription, if any (a broken stream, a refused write).
async fn consumer_last_error(tax: &ExchangeNodeClient<Channel>) -> Option<String> {
    let list = tax.clone().list_subscriptions(ListSubscriptionsRequest {}).await.ok()?.into_inner();
    list.as_consumer.into_iter().find(|s| s.resource_code == RESOURCE).map(|s| s.last_error).filter(|e| !e.is_empty())
}

fn report_refused(stats: &ReceiveStats) {
    if !stats.refused_acks.is_empty() {
        println!(
            "warning: tax's node refused {} acknowledgements of events it had delivered, first: {}",
            stats.refused_acks.len(),
            stats.refused_acks[0]
        );
    }
}

fn lag(stats: &ReceiveStats, p: f64) -> i64 {
    if stats.lags_ms.is_empty() {
        return 0;
    }
    stats.lags_ms[((stats.lags_ms.len() as f64 - 1.0) * p / 100.0).round() as usize]
}

/// Subscribes tax's application to [`RESOURCE`], retrying while tax's node cannot resolve it yet;
/// returns the subscription's start seq.
async fn subscribe(tax: &ExchangeNodeClient<Channel>) -> anyhow::Result<u64> {
    let resp = federation::wait_for("tax's subscription to 101001/000001", Duration::from_secs(60), || {
        let mut c = tax.clone();
        async move { c.subscribe(SubscribeRequest { resource_code: RESOURCE.into() }).await.ok() }
    })
    .await?;
    Ok(resp.into_inner().start_seq)
}

/// The provider side's view of tax's subscription: (acknowledged upto, head, backlog).
async fn provider_position(commerce: &ExchangeNodeClient<Channel>) -> anyhow::Result<(u64, u64, u64)> {
    let list = commerce.clone().list_subscriptions(ListSubscriptionsRequest {}).await?.into_inner();
    let s = list
        .as_provider
        .iter()
        .find(|s| s.consumer_code == "tax" && s.resource_code == RESOURCE)
        .ok_or_else(|| anyhow::anyhow!("commerce lists no subscription of tax"))?;
    Ok((s.received_upto_seq, s.head_seq, s.backlog))
}

/// Directory, commerce and tax served in this process, commerce's and tax's catalogs in the directory
/// and both nodes online.
async fn in_process_federation(
    pki: &TestPki,
    tmp: &Path,
    tag: &str,
) -> anyhow::Result<(
    federation::Running<directory::ServerError>,
    federation::Running<exchange_node::NodeError>,
    federation::Running<exchange_node::NodeError>,
)> {
    let directory = federation::start_directory(pki, &tmp.join(format!("{tag}-directory"))).await?;
    let commerce = federation::start_node(
        pki,
        "commerce",
        &directory.addr,
        &tmp.join(format!("{tag}-commerce")),
        Some(federation::sample_catalog("commerce")),
    )
    .await?;
    let tax = federation::start_node(pki, "tax", &directory.addr, &tmp.join(format!("{tag}-tax")), Some(federation::sample_catalog("tax")))
        .await?;
    wait_ready(pki, &directory.addr).await?;
    Ok((directory, commerce, tax))
}

/// Waits until commerce's catalog is searchable and both nodes are online.
pub async fn wait_ready(pki: &TestPki, directory_addr: &str) -> anyhow::Result<()> {
    let reader = pki.identity("central", Role::Operator, "bench-reader");
    // A plain channel, the type federation's helpers take; one address, nothing to fail over to.
    let config = client_sdk::tls::client_config(&reader, &[Role::Directory])?;
    let central = client_sdk::client::directory_client_on(client_sdk::tls::connect_lazy(directory_addr, config)?);
    federation::wait_for("commerce's catalog in the directory", Duration::from_secs(60), || {
        let mut c = central.clone();
        async move { (federation::provider_entries(&mut c, "commerce").await > 0).then_some(()) }
    })
    .await?;
    for dept in ["commerce", "tax"] {
        federation::wait_for(&format!("{dept}'s node online"), Duration::from_secs(60), || {
            let mut c = central.clone();
            async move { federation::node_online(&mut c, dept).await.then_some(()) }
        })
        .await?;
    }
    Ok(())
}

/// Waits until commerce's node accepts records of [`RESOURCE`] (it may not hold its own catalog entry
/// yet) by publishing `first`; returns its last seq.
async fn publish_first(commerce: &ExchangeNodeClient<Channel>, first: PublishEventsRequest) -> anyhow::Result<u64> {
    let resp = federation::wait_for("commerce's node to accept records", Duration::from_secs(60), || {
        let (mut c, req) = (commerce.clone(), first.clone());
        async move {
            match c.publish_events(req).await {
                Ok(r) => Some(r.into_inner()),
                Err(e) if e.code() == tonic::Code::InvalidArgument => panic!("records refused: {e:?}"),
                Err(_) => None,
            }
        }
    })
    .await?;
    Ok(resp.last_seq)
}

// ---------------------------------------------------------------------------------------------------
// 1. Sustained delivery

/// Sustained event delivery with durability on: commerce publishes, tax's application receives and acks.
pub async fn events(pki: &TestPki, tmp: &Path, o: &Options) -> anyhow::Result<Vec<Figure>> {
    let n = o.events;
    println!("events: {n} enterprise change events of {RESOURCE}, {} per PublishEvents, {} publishers; tax subscribed, its application receiving and acknowledging", o.batch, o.publishers);
    let warm = o.batch.min(1_000);
    let gen = Instant::now();
    let warm_up = publish_requests(enterprise_records(n, warm, 7), warm).remove(0);
    let requests = publish_requests(enterprise_records(0, n, 7), o.batch);
    let batches = stored_batches(&requests);
    println!(
        "generated in {:.1} s; a {}-change PublishEvents request is {:.2} MB",
        gen.elapsed().as_secs_f64(),
        requests[0].changes.len(),
        requests[0].encoded_len() as f64 / 1e6
    );

    check_quiet("the disk baseline", &[]);
    let (sled_before, _) = raw_sled_insert(&tmp.join("events-sled-baseline"), &batches)?;
    let (sled_log_rate, _) = raw_sled_insert_as(&tmp.join("events-sled-log"), &batches, true)?;
    let store_rate = store_only(&tmp.join("events-store-only"), &batches)?;
    println!("baseline: raw sled apply_batch+flush of the same records, {} per batch: {sled_before:.0} records/s; the same with the batch written a second time as one log value: {sled_log_rate:.0} records/s; the node's record store alone (records + change log, in process): {store_rate:.0} records/s", o.batch);
    drop(batches);

    let (directory, commerce_node, tax_node) = in_process_federation(pki, tmp, "events").await?;
    let commerce_app = pki.identity("commerce", Role::App, "commerce-app");
    let tax_app = pki.identity("tax", Role::App, "tax-app");
    let commerce = node_client(&commerce_node.addr, &commerce_app)?;
    let tax = node_client(&tax_node.addr, &tax_app)?;
    let start_seq = subscribe(&tax).await?;

    // Warm-up: one small batch all the way to the application (connections, resolve, stream open).
    let (progress_tx, mut progress) = watch::channel(0u64);
    let warm_last = start_seq + warm as u64;
    let target = warm_last + n as u64;
    let reader = tokio::spawn(receive_until(
        tax.clone(),
        target,
        warm_last,
        Duration::from_secs(30),
        Duration::from_secs(60),
        o.ack_every,
        progress_tx,
    ));
    let first_last = publish_first(&commerce, warm_up).await?;
    anyhow::ensure!(first_last == warm_last, "the warm-up batch ended at seq {first_last}, expected {warm_last}");
    federation::wait_for("the warm-up events at tax's application", Duration::from_secs(60), || {
        let seen = *progress.borrow_and_update();
        async move { (seen >= warm_last).then_some(()) }
    })
    .await?;

    check_quiet("the delivery measurement", &[]);
    let meter = CpuMeter::start(&[]);
    let started = Instant::now();
    // Tax's node's view: when every event was durable in its inbox (polled every 100 ms).
    let inbox_poller = {
        let tax = tax.clone();
        tokio::spawn(async move {
            loop {
                let list = tax.clone().list_subscriptions(ListSubscriptionsRequest {}).await;
                if let Ok(l) = list {
                    if l.into_inner().as_consumer.iter().any(|s| s.resource_code == RESOURCE && s.received_upto_seq >= target) {
                        return started.elapsed();
                    }
                }
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        })
    };
    let published = publish_all(&commerce_node.addr, &commerce_app, o.publishers, requests).await?;
    let publish_done = started.elapsed();
    let received = reader.await??;
    let end_to_end = received.finished.expect("finished") - started;
    let inbox_done = tokio::time::timeout(Duration::from_secs(10), inbox_poller).await??;
    let cpu = meter.own();
    let others = meter.others();
    anyhow::ensure!(published.last_seq == target, "published up to seq {}, expected {target}", published.last_seq);

    let sled_after = raw_sled_insert(&tmp.join("events-sled-baseline"), &stored_batches(&publish_requests(enterprise_records(0, n, 7), o.batch)))?.0;
    let sled_rate = (sled_before + sled_after) / 2.0;
    let e2e_rate = rate(n, end_to_end);
    let pub_rate = rate(n, publish_done);
    let cpu_per_event = cpu.map(|c| c.as_secs_f64() * 1e6 / n as f64);
    println!(
        "published {n} events in {} ({pub_rate:.0}/s; per {}-change call p50 {:.0} ms, p99 {:.0} ms); the last reached tax's application {} after the first publish ({e2e_rate:.0}/s end to end)",
        secs(publish_done),
        o.batch,
        published.percentile(50.0).as_secs_f64() * 1e3,
        published.percentile(99.0).as_secs_f64() * 1e3,
        secs(end_to_end),
    );
    println!(
        "application: {} messages, {} acknowledgements; delivery lag (published → application) p50 {} ms, p99 {} ms, max {} ms; CPU {} µs per event (whole process: app, nodes, directory); other processes used {others}",
        received.messages,
        received.acks,
        lag(&received, 50.0),
        lag(&received, 99.0),
        received.lags_ms.last().copied().unwrap_or(0),
        cpu_per_event.map_or("?".into(), |c| format!("{c:.1}")),
    );
    report_refused(&received);
    if let Some(e) = consumer_last_error(&tax).await {
        println!("warning: tax's delivery stream reported an error during the run: {e}");
    }
    println!(
        "stages: publishing done after {}, every event in tax's inbox after {} (polled), at tax's application after {}",
        secs(publish_done),
        secs(inbox_done),
        secs(end_to_end)
    );
    println!("baseline after: raw sled {sled_after:.0} records/s (before: {sled_before:.0})");

    drop((commerce, tax));
    tax_node.stop().await?;
    commerce_node.stop().await?;
    directory.stop().await?;

    let base = format!("raw sled batch+flush {sled_rate:.0}/s");
    Ok(vec![
        fig(
            format!("event delivery end to end, durable, {} per batch, {} publishers (events/s)", o.batch, o.publishers),
            format!("{e2e_rate:.0} events/s"),
            base.clone(),
            pct(e2e_rate, sled_rate),
            "≥ 50,000 events/s",
        ),
        fig("publish only, same run (events/s)", format!("{pub_rate:.0} events/s"), base.clone(), pct(pub_rate, sled_rate), ""),
        fig(
            "every event durable in tax's inbox (events/s)",
            format!("{:.0} events/s", rate(n, inbox_done)),
            base.clone(),
            pct(rate(n, inbox_done), sled_rate),
            "",
        ),
        fig(
            "raw sled, each batch also written again as one log value",
            format!("{sled_log_rate:.0} records/s"),
            base.clone(),
            pct(sled_log_rate, sled_rate),
            "",
        ),
        fig("the node's record store alone (records + change log, in process)", format!("{store_rate:.0} records/s"), base, pct(store_rate, sled_rate), ""),
        fig(
            "delivery lag published → application p50 / p99",
            format!("{} / {} ms", lag(&received, 50.0), lag(&received, 99.0)),
            "",
            "",
            "",
        ),
        fig("(noise) other processes' share of the 2 cores during delivery", others, "", "", "0% on a quiet machine"),
    ])
}

// ---------------------------------------------------------------------------------------------------
// 2. Bulk sync

/// Bulk sync of `sync_records` records: loaded into commerce through `PublishEvents`, then synced by tax's
/// application through tax's node (`SyncSnapshot` → `FetchSnapshot`), twice.
pub async fn sync(pki: &TestPki, tmp: &Path, o: &Options) -> anyhow::Result<Vec<Figure>> {
    let m = o.sync_records;
    println!("sync: {m} enterprise records of {RESOURCE} at commerce, synced by tax's application through tax's node");
    let gen = Instant::now();
    let requests = publish_requests(enterprise_records(0, m, 11), o.batch);
    println!("generated in {:.1} s", gen.elapsed().as_secs_f64());

    check_quiet("the disk baseline", &[]);
    let batches = stored_batches(&requests);
    let (sled_rate, sled_time) = raw_sled_insert(&tmp.join("sync-sled-baseline"), &batches)?;
    drop(batches);
    println!("baseline: raw sled apply_batch+flush of the same {m} records, {} per batch: {} ({sled_rate:.0} records/s)", o.batch, secs(sled_time));

    let (directory, commerce_node, tax_node) = in_process_federation(pki, tmp, "sync").await?;
    let commerce_app = pki.identity("commerce", Role::App, "commerce-app");
    let tax_app = pki.identity("tax", Role::App, "tax-app");
    let commerce = node_client(&commerce_node.addr, &commerce_app)?;

    // ---- load (not part of the figure) ----
    let mut requests = VecDeque::from(requests);
    let first = requests.pop_front().expect("records");
    let load_started = Instant::now();
    publish_first(&commerce, first).await?;
    let loaded = publish_all(&commerce_node.addr, &commerce_app, o.publishers, requests.into()).await?;
    let load_time = load_started.elapsed();
    let load_rate = rate(m, load_time);
    println!(
        "loaded {m} records through commerce's node in {} ({load_rate:.0} records/s, {} publishers, {} per durable batch; p99 per call {:.0} ms)",
        secs(load_time),
        o.publishers,
        o.batch,
        loaded.percentile(99.0).as_secs_f64() * 1e3
    );
    let db_size = dir_size(&tmp.join("sync-commerce"));
    println!("commerce's data folder: {:.0} MB", db_size as f64 / 1e6);

    // ---- the sync, twice ----
    let tax = node_client(&tax_node.addr, &tax_app)?;
    let mut runs = Vec::new();
    for run in 1..=2 {
        check_quiet("the sync", &[]);
        let meter = CpuMeter::start(&[]);
        let started = Instant::now();
        let mut stream = tax
            .clone()
            .sync_snapshot(SyncSnapshotRequest { resource_code: RESOURCE.into(), after_key: String::new(), purpose: "税务登记信息初始化".into() })
            .await?
            .into_inner();
        let mut n = 0u64;
        let mut pages = 0u64;
        let mut total = 0u64;
        let mut first_page = None;
        let mut last_key = String::new();
        let mut bytes = 0usize;
        while let Some(page) = stream.message().await? {
            if pages == 0 {
                total = page.total_records;
                first_page = Some(started.elapsed());
            }
            pages += 1;
            bytes += page.encoded_len();
            for r in &page.records {
                anyhow::ensure!(r.key > last_key, "snapshot out of key order at {}", r.key);
                last_key.clone_from(&r.key);
            }
            n += page.records.len() as u64;
            if page.done {
                break;
            }
        }
        let elapsed = started.elapsed();
        anyhow::ensure!(n == m as u64 && total == m as u64, "synced {n} records, snapshot said {total}, loaded {m}");
        let cpu = meter.own().map_or("?".into(), |c| format!("{:.1}", c.as_secs_f64() * 1e6 / n as f64));
        println!(
            "sync {run}: {n} records in {pages} pages ({:.0} MB) in {} ({:.0} records/s; first page after {:.0} ms); CPU {cpu} µs per record (whole process); other processes used {}",
            bytes as f64 / 1e6,
            secs(elapsed),
            rate(n as usize, elapsed),
            first_page.unwrap_or_default().as_secs_f64() * 1e3,
            meter.others()
        );
        runs.push(elapsed);
    }
    drop((commerce, tax));
    tax_node.stop().await?;
    commerce_node.stop().await?;
    directory.stop().await?;

    // ---- the read baseline: the same sled data, scanned raw ----
    let (scanned, scan_time) = raw_sled_scan(&tmp.join("sync-commerce").join("node.sled"))?;
    anyhow::ensure!(scanned == m as u64, "raw scan found {scanned} records");
    let scan_rate = rate(m, scan_time);
    println!("baseline: commerce's sled data scanned raw and decoded, one thread: {m} records in {} ({scan_rate:.0} records/s)", secs(scan_time));
    // What the snapshot's header costs before its first page: the node counts the resource's records
    // by walking their keys (sled keeps no count).
    let (counted, count_time) = raw_sled_count(&tmp.join("sync-commerce").join("node.sled"))?;
    println!("the same data's keys walked to count them (as FetchSnapshot's header does): {counted} in {}", secs(count_time));

    let mut out = Vec::new();
    for (i, t) in runs.iter().enumerate() {
        out.push(fig(
            format!("bulk sync of {m} records through both nodes, run {} (total time)", i + 1),
            format!("{} ({:.0} records/s)", secs(*t), rate(m, *t)),
            format!("raw sled scan {} ({scan_rate:.0}/s)", secs(scan_time)),
            format!("{:.1}× the scan's time", t.as_secs_f64() / scan_time.as_secs_f64().max(1e-9)),
            "≤ 60 s",
        ));
    }
    out.push(fig(
        format!("load of {m} records through commerce's node (not in the figure)"),
        format!("{} ({load_rate:.0} records/s)", secs(load_time)),
        format!("raw sled batch+flush {} ({sled_rate:.0}/s)", secs(sled_time)),
        pct(load_rate, sled_rate),
        "",
    ));
    Ok(out)
}

// ---------------------------------------------------------------------------------------------------
// 3. Backlog: the provider as a separate process

/// `target/<profile>/exchange-node` beside this executable.
fn node_binary() -> anyhow::Result<PathBuf> {
    let exe = std::env::current_exe()?;
    let dir = exe.parent().ok_or_else(|| anyhow::anyhow!("no folder"))?;
    let dir = if dir.ends_with("deps") { dir.parent().unwrap_or(dir) } else { dir };
    let path = dir.join("exchange-node");
    anyhow::ensure!(
        path.exists(),
        "{} not found: build it first (`cargo build --release -p exchange-node --bins`)",
        path.display()
    );
    Ok(path)
}

/// Writes `<dept>-node.toml` for the real binary, as tests/tests/system.rs does.
fn write_node_config(pki: &TestPki, dept: &str, directory_addr: &str, home: &Path, port: u16) -> anyhow::Result<PathBuf> {
    let tls = pki.issue(dept, Role::Node, &format!("{dept}-node"));
    let path = home.join(format!("{dept}-node.toml"));
    std::fs::write(
        &path,
        format!(
            "listen = \"127.0.0.1:{port}\"\nadvertise_address = \"127.0.0.1:{port}\"\ndirectory_address = \"{directory_addr}\"\ndata_dir = \"{data}\"\ncatalog_file = \"{catalog}\"\n\n[tls]\nca = \"{ca}\"\ncert = \"{cert}\"\nkey = \"{key}\"\n",
            data = home.join(format!("{dept}-data")).display(),
            catalog = federation::sample_catalog(dept).display(),
            ca = tls.ca.display(),
            cert = tls.cert.display(),
            key = tls.key.display(),
        ),
    )?;
    Ok(path)
}

fn start_node_proc(dept: &str, config: &Path, home: &Path, run: usize) -> Proc {
    Proc::start(
        &format!("{dept}-node"),
        "exchange-node",
        &["--config", config.to_str().expect("utf-8 path")],
        &home.join(format!("{dept}-node-{run}.log")),
    )
}

/// The provider's memory with a backlog: tax subscribed and stopped, `backlog_events` published to
/// commerce (a separate process), commerce's peak RSS; then tax started again and the backlog drained.
pub async fn backlog(pki: &TestPki, tmp: &Path, o: &Options) -> anyhow::Result<Vec<Figure>> {
    let n = o.backlog_events;
    node_binary()?;
    println!("backlog: commerce's and tax's nodes as separate processes (the exchange-node binary); tax subscribed to {RESOURCE} and stopped; {n} events published; then tax restarted");
    let gen = Instant::now();
    let requests = publish_requests(enterprise_records(0, n, 13), o.batch);
    println!("generated in {:.1} s", gen.elapsed().as_secs_f64());
    check_quiet("the disk baseline", &[]);
    let base_n = requests.len().min(300_000 / o.batch.max(1)).max(1);
    let (sled_rate, _) = raw_sled_insert(&tmp.join("backlog-sled-baseline"), &stored_batches(&requests[..base_n]))?;
    println!("baseline: raw sled apply_batch+flush of the first {} of the records, {} per batch: {sled_rate:.0} records/s", base_n * o.batch, o.batch);

    let home = tmp.join("backlog");
    std::fs::create_dir_all(&home)?;
    let directory = federation::start_directory(pki, &home.join("directory")).await?;
    let (commerce_port, tax_port) = (free_port(), free_port());
    let commerce_config = write_node_config(pki, "commerce", &directory.addr, &home, commerce_port)?;
    let tax_config = write_node_config(pki, "tax", &directory.addr, &home, tax_port)?;
    let mut commerce_proc = start_node_proc("commerce", &commerce_config, &home, 1);
    let mut tax_proc = start_node_proc("tax", &tax_config, &home, 1);
    let commerce_pid = commerce_proc.pid();
    wait_ready(pki, &directory.addr).await?;
    let commerce_app = pki.identity("commerce", Role::App, "commerce-app");
    let tax_app = pki.identity("tax", Role::App, "tax-app");
    let commerce_addr = format!("127.0.0.1:{commerce_port}");
    let tax_addr = format!("127.0.0.1:{tax_port}");
    let commerce = node_client(&commerce_addr, &commerce_app)?;
    let tax = node_client(&tax_addr, &tax_app)?;
    let start_seq = subscribe(&tax).await?;
    let (acked, _, _) = provider_position(&commerce).await?;
    println!("tax subscribed at seq {start_seq}; commerce holds its position at {acked}");
    anyhow::ensure!(tax_proc.stop(), "tax's node did not stop cleanly");
    drop(tax);

    // ---- publish the backlog with nothing acknowledged ----
    tokio::time::sleep(Duration::from_secs(1)).await;
    let idle_kb = status_kb(commerce_pid, "VmRSS").unwrap_or(0);
    let idle_hwm = status_kb(commerce_pid, "VmHWM").unwrap_or(0);
    check_quiet("the backlog publish", &[commerce_pid]);
    let mut requests = VecDeque::from(requests);
    let first = requests.pop_front().expect("events");
    let sampler = RssSampler::start(commerce_pid, Duration::from_millis(50));
    let meter = CpuMeter::start(&[commerce_pid]);
    let started = Instant::now();
    publish_first(&commerce, first).await?;
    let published = publish_all(&commerce_addr, &commerce_app, o.publishers, requests.into()).await?;
    let publish_time = started.elapsed();
    let commerce_cpu = meter.of(commerce_pid);
    let publish_others = meter.others();
    let publish_sampled = sampler.finish();
    let publish_hwm = status_kb(commerce_pid, "VmHWM").unwrap_or(0);
    let after_rss = status_kb(commerce_pid, "VmRSS").unwrap_or(0);
    let (anon, file) = (status_kb(commerce_pid, "RssAnon").unwrap_or(0), status_kb(commerce_pid, "RssFile").unwrap_or(0));
    let (acked, head, backlog) = provider_position(&commerce).await?;
    anyhow::ensure!(head == start_seq + n as u64, "head {head}, expected {}", start_seq + n as u64);
    anyhow::ensure!(backlog == n as u64 && acked == start_seq, "backlog {backlog} (acknowledged {acked}), expected {n}");
    let publish_rate = rate(n, publish_time);
    let data_mb = dir_size(&home.join("commerce-data")) as f64 / 1e6;
    println!(
        "published {n} events to commerce in {} ({publish_rate:.0}/s; commerce CPU {}); backlog at commerce: {backlog} events; commerce's data folder {data_mb:.0} MB",
        secs(publish_time),
        commerce_cpu.map_or("?".into(), |c| format!("{:.1} s", c.as_secs_f64())),
    );
    println!(
        "commerce RSS: idle {} (peak {} since start); during the publish peak {} (VmHWM; sampled every 50 ms: {}); after {} (anonymous {}, file {}); other processes used {publish_others}",
        mb(idle_kb),
        mb(idle_hwm),
        mb(publish_hwm),
        mb(publish_sampled),
        mb(after_rss),
        mb(anon),
        mb(file)
    );
    let _ = published;

    // ---- restart tax and drain ----
    tokio::time::sleep(Duration::from_secs(2)).await;
    let reset = reset_peak(commerce_pid);
    let before_drain = status_kb(commerce_pid, "VmRSS").unwrap_or(0);
    check_quiet("the drain", &[commerce_pid]);
    let commerce_sampler = RssSampler::start(commerce_pid, Duration::from_millis(50));
    let started = Instant::now();
    tax_proc = start_node_proc("tax", &tax_config, &home, 2);
    let tax_pid = tax_proc.pid();
    let tax_sampler = RssSampler::start(tax_pid, Duration::from_millis(50));
    let meter = CpuMeter::start(&[commerce_pid, tax_pid]);
    let tax = node_client(&tax_addr, &tax_app)?;
    let target = start_seq + n as u64;
    let (progress_tx, _progress) = watch::channel(0u64);
    let reader = tokio::spawn(receive_until(
        tax.clone(),
        target,
        0,
        Duration::from_secs(60),
        Duration::from_secs(120),
        o.ack_every,
        progress_tx,
    ));
    // Commerce's view: every event acknowledged by tax's node (durable in its inbox).
    let drained_at = {
        let deadline = Instant::now() + Duration::from_secs(1800);
        loop {
            if let Ok((_, _, 0)) = provider_position(&commerce).await {
                break started.elapsed();
            }
            anyhow::ensure!(Instant::now() < deadline, "the backlog did not drain within 30 minutes");
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    };
    let received = reader.await??;
    report_refused(&received);
    if let Some(e) = consumer_last_error(&tax).await {
        println!("warning: tax's delivery stream reported an error during the drain: {e}");
    }
    let app_done = received.finished.expect("finished") - started;
    let (commerce_cpu, tax_cpu, drain_others) = (meter.of(commerce_pid), meter.of(tax_pid), meter.others());
    let drain_sampled = commerce_sampler.finish();
    let tax_sampled = tax_sampler.finish();
    let drain_hwm = status_kb(commerce_pid, "VmHWM").unwrap_or(0);
    let inbox_rate = rate(n, drained_at);
    let app_rate = rate(n, app_done);
    let cpu = |c: Option<Duration>| c.map_or("?".into(), |c| format!("{:.1} s", c.as_secs_f64()));
    println!(
        "drain: tax's node started; commerce saw every event acknowledged after {} ({inbox_rate:.0}/s); tax's application had all {n} after {} ({app_rate:.0}/s; {} messages, {} acks); CPU commerce {} tax {}; other processes used {drain_others}",
        secs(drained_at),
        secs(app_done),
        received.messages,
        received.acks,
        cpu(commerce_cpu),
        cpu(tax_cpu),
    );
    println!(
        "commerce RSS during the drain: peak {} (VmHWM{}; sampled: {}), {} before; tax's node peak {} (sampled)",
        mb(drain_hwm),
        if reset { ", reset before the drain" } else { " since start: the reset failed" },
        mb(drain_sampled),
        mb(before_drain),
        mb(tax_sampled)
    );

    drop((commerce, tax));
    anyhow::ensure!(tax_proc.stop(), "tax's node did not stop cleanly");
    anyhow::ensure!(commerce_proc.stop(), "commerce's node did not stop cleanly");
    directory.stop().await?;

    // Memory baselines: the same number of records written by a process that does nothing else.
    let mut memory = Vec::new();
    for mode in [MemoryMode::Records, MemoryMode::RecordsAndLog, MemoryMode::Store] {
        let (kb, secs) = sled_memory_baseline(&tmp.join(format!("backlog-memory-{}", mode.name())), mode, n, o.batch)?;
        println!("memory baseline ({}): {n} records in {secs:.1} s, peak RSS {}", mode.name(), mb(kb));
        memory.push((mode, kb));
    }
    let raw_kb = memory[0].1;

    let base = format!("raw sled batch+flush {sled_rate:.0}/s");
    let mut figures = vec![
        fig(
            format!("provider peak RSS while {n} unacknowledged events are published"),
            mb(publish_hwm.max(publish_sampled)),
            format!("idle {}", mb(idle_kb)),
            "",
            "≤ 300 MB",
        ),
        fig(
            format!("provider peak RSS while the {n}-event backlog drains"),
            mb(drain_hwm.max(drain_sampled)),
            format!("before the drain {}", mb(before_drain)),
            "",
            "≤ 300 MB",
        ),
        fig("publish with a stopped subscriber (events/s)", format!("{publish_rate:.0} events/s"), base.clone(), pct(publish_rate, sled_rate), ""),
        fig(
            "backlog drain: provider → tax's inbox, all acknowledged (events/s)",
            format!("{inbox_rate:.0} events/s ({})", secs(drained_at)),
            base.clone(),
            pct(inbox_rate, sled_rate),
            "",
        ),
        fig(
            "backlog drain: all received by tax's application (events/s)",
            format!("{app_rate:.0} events/s ({})", secs(app_done)),
            base,
            pct(app_rate, sled_rate),
            "",
        ),
        fig("consumer (tax) node peak RSS during the drain", mb(tax_sampled), "", "", ""),
    ];
    figures[0].baseline = format!("raw sled, same records, own process: {}", mb(raw_kb));
    figures[0].ratio = format!("{:.1}×", publish_hwm.max(publish_sampled) as f64 / raw_kb.max(1) as f64);
    for (mode, kb) in memory {
        let what = match mode {
            MemoryMode::Records => "raw sled, the records only (batch+flush)",
            MemoryMode::RecordsAndLog => "raw sled, records + written again as log values of 500",
            MemoryMode::Store => "the node's record store alone (apply_changes, no gRPC)",
        };
        figures.push(fig(format!("memory baseline: {what}, {n} records, own process, peak RSS"), mb(kb), "", "", ""));
    }
    Ok(figures)
}
