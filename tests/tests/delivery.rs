//! Push subscriptions with store-and-forward delivery under faults, with the REAL binaries (issue 4):
//! the `directory` and two `exchange-node` processes (commerce provides 101001/000001 企业登记信息,
//! unconditional; tax consumes), over mutual TLS on 127.0.0.1, sled stores in a temporary folder, a PKI
//! made with the code of `exchangectl pki` ([`e2e_tests::pki::TestPki`]).
//!
//! In every stream scenario, commerce's application publishes change events in batches with
//! `PublishEvents`, and tax's application reads `ReceiveEvents` from the last seq it processed,
//! acknowledging each message and reconnecting with backoff. A batch whose call failed is retried after
//! asking the node (once it answers again) whether it landed: its head seq says so, since a batch is one
//! atomic, flushed write. A batch that had not landed is sent with other content (a change never
//! acknowledged did not happen), so an event that left the provider before its batch was durable and was
//! lost with it would show up as a mismatch. Faults, at random points (`GX_DELIVERY_SEED` replays them):
//! kill -9 of the provider's node (twice in a 100,000-event stream), kill -9 of the consumer's node
//! (likewise), a graceful stop of the consumer's node for 3 s while publishing goes on, the directory
//! stopped (and both nodes restarted without it). Afterwards the application must hold every event
//! exactly once, in seq order and in order per key: same count, no duplicate, no gap, each event equal
//! to what was published under its seq, and the same 128-bit checksum over (seq, kind, key, sorted
//! items) as what the publisher was acknowledged (each change mapped to its seq by `first_seq`).
//!
//! The bulk-sync scenario interrupts `SyncSnapshot` (the application drops the stream twice; later the
//! consumer's node is killed in the middle of one) and resumes with `after_key`; the union must be every
//! record exactly once (count, checksum); a replica built from a snapshot taken while updates are
//! published, plus the change stream subscribed before it (a record or event applied only when its
//! seq/version is greater than the held version), must equal a final snapshot.
//!
//! The scenarios share the two cores of a CI machine, so they run one at a time (a lock), each on its own
//! ports and folders. Binaries: `cargo build --workspace --bins` first (scripts/test.sh does).

use std::collections::{BTreeMap, HashMap};
use std::hash::{Hash, Hasher};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use client_sdk::identity::Role;
use client_sdk::ids::{validate_uscc, IdError};
use client_sdk::tls::TlsIdentity;
use e2e_tests::pki::TestPki;
use e2e_tests::procs::{free_port, Proc};
use exchange_proto::v1::directory_client::DirectoryClient;
use exchange_proto::v1::exchange_node_client::ExchangeNodeClient;
use exchange_proto::v1::*;
use futures::StreamExt;
use tokio::sync::watch;
use tonic::transport::Channel;
use tonic::Code;

/// commerce's enterprise registration (企业登记信息): unconditional, so tax needs no grant.
const REG: &str = "101001/000001";
const PROVIDER: &str = "commerce";
const CONSUMER: &str = "tax";

/// One scenario at a time: each starts three processes, and CI has two cores.
static SERIAL: Mutex<()> = Mutex::new(());

/// Runs a scenario on its own runtime, one scenario at a time.
fn run(scenario: impl std::future::Future<Output = ()>) {
    let _one_at_a_time = SERIAL.lock().unwrap_or_else(|poisoned| poisoned.into_inner());
    let runtime = tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build().expect("runtime");
    runtime.block_on(scenario);
}

fn repo_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).parent().expect("repo root").to_path_buf()
}

// ---------------------------------------------------------------------------------------------------
// The installation: PKI, configs, data and logs in one temporary folder; the real binaries.
// ---------------------------------------------------------------------------------------------------

struct Site {
    home: tempfile::TempDir,
    pki: TestPki,
    directory_port: u16,
    ports: HashMap<&'static str, u16>,
}

impl Site {
    fn new() -> Site {
        let home = tempfile::Builder::new().prefix("gx-delivery-").tempdir().expect("tempdir");
        for d in ["pki", "config", "data", "logs"] {
            std::fs::create_dir_all(home.path().join(d)).unwrap();
        }
        let pki = TestPki::new(&home.path().join("pki"));
        pki.issue("central", Role::Directory, "directory");
        pki.issue("central", Role::Operator, "central-operator");
        let mut ports = HashMap::new();
        for dept in [PROVIDER, CONSUMER] {
            pki.issue(dept, Role::Node, &format!("{dept}-node"));
            pki.issue(dept, Role::App, &format!("{dept}-app"));
            ports.insert(dept, free_port());
        }
        let site = Site { home, pki, directory_port: free_port(), ports };
        site.write_configs();
        site
    }

    fn path(&self, rel: &str) -> PathBuf {
        self.home.path().join(rel)
    }

    fn directory_addr(&self) -> String {
        format!("127.0.0.1:{}", self.directory_port)
    }

    fn node_addr(&self, dept: &str) -> String {
        format!("127.0.0.1:{}", self.ports[dept])
    }

    fn write_configs(&self) {
        let pki = self.path("pki");
        std::fs::write(
            self.path("config/directory.toml"),
            format!(
                "listen = \"{addr}\"\ndata_dir = \"{data}\"\nlease_ttl_seconds = 10\n\n[tls]\nca = \"{ca}\"\ncert = \"{cert}\"\nkey = \"{key}\"\n",
                addr = self.directory_addr(),
                data = self.path("data/directory").display(),
                ca = pki.join("ca.crt").display(),
                cert = pki.join("directory.crt").display(),
                key = pki.join("directory.key").display(),
            ),
        )
        .unwrap();
        for dept in [PROVIDER, CONSUMER] {
            let port = self.ports[dept];
            std::fs::write(
                self.path(&format!("config/{dept}-node.toml")),
                format!(
                    "listen = \"127.0.0.1:{port}\"\nadvertise_address = \"127.0.0.1:{port}\"\ndirectory_address = \"{dir}\"\n\
                     data_dir = \"{data}\"\ncatalog_file = \"{catalog}\"\nshutdown_grace_seconds = 5\n\n\
                     [tls]\nca = \"{ca}\"\ncert = \"{cert}\"\nkey = \"{key}\"\n\n\
                     [relay]\ncall_timeout_seconds = 5\naudit_seal_seconds = 2\n",
                    dir = self.directory_addr(),
                    data = self.path(&format!("data/{dept}-node")).display(),
                    catalog = repo_root().join(format!("deploy/local/catalog/{dept}.toml")).display(),
                    ca = pki.join("ca.crt").display(),
                    cert = pki.join(format!("{dept}-node.crt")).display(),
                    key = pki.join(format!("{dept}-node.key")).display(),
                ),
            )
            .unwrap();
        }
    }

    /// Starts the directory (does not wait for it).
    fn start_directory(&self, generation: u32) -> Proc {
        let config = self.path("config/directory.toml");
        let log = self.path(&format!("logs/directory.{generation}.log"));
        Proc::start("directory", "directory", &["--config", config.to_str().unwrap()], &log)
    }

    /// Starts `dept`'s node on its fixed port and data folder (does not wait for it). Each start logs to
    /// its own file, so the log of the run before a crash is kept.
    fn start_node(&self, dept: &str, generation: u32) -> Proc {
        let config = self.path(&format!("config/{dept}-node.toml"));
        let log = self.path(&format!("logs/{dept}-node.{generation}.log"));
        Proc::start(&format!("{dept}-node#{generation}"), "exchange-node", &["--config", config.to_str().unwrap()], &log)
    }

    fn identity(&self, dept: &str, role: Role) -> TlsIdentity {
        let name = match role {
            Role::Operator if dept == "central" => "central-operator".to_string(),
            _ => format!("{dept}-{role}"),
        };
        self.pki.identity(dept, role, &name)
    }

    /// A fresh client of `dept`'s node as `dept`'s application (a new channel: no state from a crashed peer).
    fn app(&self, dept: &str) -> ExchangeNodeClient<Channel> {
        client_sdk::client::node_client(&self.node_addr(dept), &self.identity(dept, Role::App)).expect("node client")
    }

    fn central(&self) -> DirectoryClient<client_sdk::client::DirectoryChannel> {
        client_sdk::client::directory_client(&self.directory_addr(), &self.identity("central", Role::Operator)).expect("directory client")
    }

    /// Every log of the site, for a failure message.
    fn logs_tail(&self, lines: usize) -> String {
        let mut out = String::new();
        let mut files: Vec<_> = std::fs::read_dir(self.path("logs")).unwrap().filter_map(|e| e.ok()).map(|e| e.path()).collect();
        files.sort();
        for f in files {
            let text = std::fs::read_to_string(&f).unwrap_or_default();
            let all: Vec<&str> = text.lines().collect();
            let from = all.len().saturating_sub(lines);
            out.push_str(&format!("---- {} (last {} of {} lines) ----\n", f.display(), all.len() - from, all.len()));
            for l in &all[from..] {
                out.push_str(l);
                out.push('\n');
            }
        }
        out
    }
}

/// Polls `f` every 100 ms until it returns `Some`, or panics with `what` after `timeout`.
async fn eventually<T, F, Fut>(what: &str, timeout: Duration, f: F) -> T
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Option<T>>,
{
    e2e_tests::federation::wait_for(what, timeout, f).await.unwrap_or_else(|e| panic!("{e}"))
}

/// A running federation: the directory and both nodes, restartable.
struct Fed {
    site: Arc<Site>,
    directory: Proc,
    nodes: HashMap<&'static str, Proc>,
    generation: u32,
    started: Instant,
}

impl Fed {
    /// Starts everything and waits until commerce's catalog is in the directory and both nodes answer.
    async fn start() -> Fed {
        let started = Instant::now();
        let site = Arc::new(Site::new());
        let directory = site.start_directory(0);
        let mut nodes = HashMap::new();
        for dept in [PROVIDER, CONSUMER] {
            nodes.insert(dept, site.start_node(dept, 0));
        }
        let fed = Fed { site, directory, nodes, generation: 0, started };
        fed.wait_directory().await;
        let central = fed.site.central();
        eventually("commerce's catalog in the directory", Duration::from_secs(60), || {
            let mut c = central.clone();
            async move {
                let hits = c
                    .search_catalog(SearchCatalogRequest { provider_code: PROVIDER.into(), page_size: 1, ..Default::default() })
                    .await
                    .ok()?
                    .into_inner()
                    .total_hits;
                (hits > 0).then_some(())
            }
        })
        .await;
        for dept in [PROVIDER, CONSUMER] {
            fed.wait_node(dept).await;
        }
        fed
    }

    async fn wait_directory(&self) {
        let central = self.site.central();
        eventually("the directory to answer", Duration::from_secs(30), || {
            let mut c = central.clone();
            async move { c.list_nodes(ListNodesRequest::default()).await.ok().map(|_| ()) }
        })
        .await;
    }

    async fn wait_node(&self, dept: &str) {
        let site = &self.site;
        eventually(&format!("{dept}'s node to answer"), Duration::from_secs(30), || async move {
            site.app(dept).list_subscriptions(ListSubscriptionsRequest {}).await.ok().map(|_| ())
        })
        .await;
    }

    fn kill_node(&mut self, dept: &'static str) {
        let mut p = self.nodes.remove(dept).expect("node running");
        p.kill();
        self.nodes.insert(dept, p);
    }

    /// SIGTERM; returns whether the node exited cleanly.
    fn stop_node(&mut self, dept: &'static str) -> bool {
        let p = self.nodes.get_mut(dept).expect("node");
        tokio::task::block_in_place(|| p.stop())
    }

    async fn restart_node(&mut self, dept: &'static str) {
        self.generation += 1;
        let p = self.site.start_node(dept, self.generation);
        self.nodes.insert(dept, p);
        self.wait_node(dept).await;
    }

    fn stop_directory(&mut self) -> bool {
        tokio::task::block_in_place(|| self.directory.stop())
    }

    async fn restart_directory(&mut self) {
        self.generation += 1;
        self.directory = self.site.start_directory(self.generation);
        self.wait_directory().await;
    }

    /// Subscribes tax to the resource (retried until commerce's node and the directory know each other).
    async fn subscribe(&self) -> SubscribeResponse {
        let site = &self.site;
        eventually("tax's subscription", Duration::from_secs(30), || async move {
            site.app(CONSUMER).subscribe(SubscribeRequest { resource_code: REG.into() }).await.ok().map(|r| r.into_inner())
        })
        .await
    }

    /// Stops everything gracefully; every process must exit cleanly.
    fn shutdown(mut self) {
        for dept in [CONSUMER, PROVIDER] {
            let p = self.nodes.get_mut(dept).unwrap();
            let name = p.name.clone();
            assert!(tokio::task::block_in_place(|| p.stop()), "{name} exits cleanly on SIGTERM:\n{}", p.log_text());
        }
        assert!(self.stop_directory(), "the directory exits cleanly");
    }
}

impl Drop for Fed {
    /// On a failure, the end of every log, earlier runs of a restarted process included (the running
    /// processes' whole logs follow, as `Proc` prints them).
    fn drop(&mut self) {
        if std::thread::panicking() {
            eprintln!("{}", self.site.logs_tail(40));
        }
    }
}

// ---------------------------------------------------------------------------------------------------
// Records and checksums.
// ---------------------------------------------------------------------------------------------------

/// The `n`-th valid unified social credit code of the test series.
fn uscc(n: u64) -> String {
    let first17 = format!("91350100M{n:08}");
    match validate_uscc(&format!("{first17}0")) {
        Ok(()) => format!("{first17}0"),
        Err(IdError::Check { expected, .. }) => format!("{first17}{expected}"),
        Err(e) => panic!("{first17}: {e}"),
    }
}

/// How a stream's changes map to keys: change `i` is about key number `i * stride % keys` (`stride`
/// coprime with `keys`, so a batch of at most `keys` consecutive changes has distinct keys, as a batch must).
#[derive(Clone, Copy, Debug)]
struct Keys {
    keys: u64,
    stride: u64,
}

impl Keys {
    fn of(&self, i: u64) -> u64 {
        (i % self.keys) * self.stride % self.keys
    }
}

/// The `i`-th change of a stream: its registered capital carries `i` (so the per-key order can be read
/// back), every 50th a deregistration.
fn change(i: u64, keys: Keys) -> RecordChange {
    let k = keys.of(i);
    let deregistered = i % 50 == 49;
    let status = if deregistered { "注销" } else { "存续" };
    let key = uscc(k);
    let record = Record {
        key: key.clone(),
        items: [
            // The key item too, as the node stores it.
            ("统一社会信用代码", key),
            ("企业名称", format!("测试企业{k}有限公司")),
            ("登记状态", status.to_string()),
            ("注册资本", format!("{i}.00")),
            ("法定代表人", format!("法人{}", i % 997)),
        ]
        .into_iter()
        .map(|(a, b)| (a.to_string(), b))
        .collect(),
        ..Default::default()
    };
    let kind = if deregistered { RecordChangeKind::Deregistered } else { RecordChangeKind::Unspecified };
    RecordChange { record: Some(record), kind: kind as i32 }
}

/// A hash of a record's items, independent of map order.
fn items_hash(items: &HashMap<String, String>) -> u64 {
    let sorted: BTreeMap<&String, &String> = items.iter().collect();
    let mut h = std::collections::hash_map::DefaultHasher::new();
    sorted.hash(&mut h);
    h.finish()
}

/// The publish index carried in 注册资本 (`i.00`).
fn index_of(items: &HashMap<String, String>) -> u64 {
    items.get("注册资本").and_then(|v| v.strip_suffix(".00")).and_then(|v| v.parse().ok()).unwrap_or(u64::MAX)
}

/// One event as the test knows it: published (expected) or received.
#[derive(Clone, Debug, PartialEq, Eq)]
struct Ev {
    seq: u64,
    kind: i32,
    key: String,
    items: u64,
    index: u64,
}

impl Ev {
    fn received(e: &RecordEvent) -> Ev {
        let r = e.record.clone().unwrap_or_default();
        Ev { seq: e.seq, kind: e.kind, key: r.key.clone(), items: items_hash(&r.items), index: index_of(&r.items) }
    }
}

/// An order-dependent 128-bit checksum (two independently seeded SipHash chains; e2e-tests has no
/// SHA-2 dependency) over (seq, kind, key, items hash) of every event.
#[derive(Default)]
struct Checksum {
    a: u64,
    b: u64,
}

impl Checksum {
    fn add(&mut self, seq: u64, kind: i32, key: &str, items: u64) {
        for (lane, seed) in [(&mut self.a, 0x9e37_79b9_7f4a_7c15u64), (&mut self.b, 0xc2b2_ae3d_27d4_eb4fu64)] {
            let mut h = std::collections::hash_map::DefaultHasher::new();
            (seed, *lane, seq, kind, key, items).hash(&mut h);
            *lane = h.finish();
        }
    }

    fn of(events: &[Ev]) -> String {
        let mut c = Checksum::default();
        for e in events {
            c.add(e.seq, e.kind, &e.key, e.items);
        }
        format!("{:016x}{:016x}", c.a, c.b)
    }
}

// ---------------------------------------------------------------------------------------------------
// The publishing application (commerce) and the receiving application (tax).
// ---------------------------------------------------------------------------------------------------

/// The provider's latest seq of the resource, as its node reports it to its application.
async fn provider_head(site: &Site) -> Result<u64, tonic::Status> {
    let list = site.app(PROVIDER).list_subscriptions(ListSubscriptionsRequest {}).await?.into_inner();
    list.as_provider
        .iter()
        .filter(|s| s.resource_code == REG)
        .map(|s| s.head_seq)
        .max()
        .ok_or_else(|| tonic::Status::failed_precondition("no subscriber: the node reports no head"))
}

/// Whether a failed publish may be retried (the node is down or went down during the call).
fn transient(s: &tonic::Status) -> bool {
    // A node stopping sends GOAWAY; a call caught by it surfaces as INTERNAL "h2 protocol error", the
    // transport's failure rather than the server's answer, which the SDK's rule already counts.
    client_sdk::events::is_transient(s) && s.code() != Code::ResourceExhausted
}

#[derive(Default)]
struct Published {
    /// Every acknowledged (or found landed) change, by seq.
    events: Vec<Ev>,
    batches: usize,
    /// Failed calls whose batch had not landed (sent again).
    resent: usize,
    /// Failed calls whose batch had landed (the answer was lost in the crash; not sent again).
    landed_unacknowledged: usize,
    head: u64,
}

/// Publishes changes `from..to` in batches of `batch`, after seq `head` (the provider's head now); key
/// numbers below `existing` are already stored. `progress` counts changes acknowledged. `pause` is slept
/// between batches.
#[allow(clippy::too_many_arguments)]
async fn publish(
    site: Arc<Site>,
    from: u64,
    to: u64,
    keys: Keys,
    existing: u64,
    batch: u64,
    mut head: u64,
    pause: Duration,
    progress: Arc<AtomicUsize>,
) -> Published {
    let mut out = Published { head, ..Default::default() };
    let mut seen_keys: std::collections::HashSet<u64> = (0..existing).collect();
    let mut start = from;
    let mut client = site.app(PROVIDER);
    while start < to {
        let end = (start + batch).min(to);
        let mut changes: Vec<RecordChange> = (start..end).map(|i| change(i, keys)).collect();
        let n = changes.len() as u64;
        let mut attempt = 0;
        let (first, last) = loop {
            attempt += 1;
            let req = PublishEventsRequest { resource_code: REG.into(), changes: changes.clone(), ..Default::default() };
            match client.publish_events(req).await {
                Ok(r) => {
                    let r = r.into_inner();
                    break (r.first_seq, r.last_seq);
                }
                Err(s) if transient(&s) && attempt < 200 => {
                    // The node is down (or went down during the call). When it answers again, its head says
                    // whether this batch was applied: a batch is one atomic write, acknowledged once flushed.
                    let back_by = Instant::now() + Duration::from_secs(60);
                    let now = loop {
                        tokio::time::sleep(Duration::from_millis(200)).await;
                        match provider_head(&site).await {
                            Ok(h) => break h,
                            Err(e) => assert!(Instant::now() < back_by, "the provider's node did not come back in 60 s: {e:?}"),
                        }
                    };
                    client = site.app(PROVIDER);
                    if now == head + n {
                        eprintln!("publisher: batch {start}..{end} failed ({:?}) but had landed (seqs {}..={now})", s.code(), head + 1);
                        out.landed_unacknowledged += 1;
                        break (head + 1, now);
                    }
                    assert_eq!(
                        now, head,
                        "after a failed batch of {n} changes published after seq {head}, the provider's head is {now}: \
                         neither the whole batch nor nothing ({s:?})"
                    );
                    eprintln!("publisher: batch {start}..{end} failed ({:?}: {}); not applied; sending again", s.code(), s.message());
                    out.resent += 1;
                    // A change never acknowledged did not happen: the application may send something else
                    // now. It does (another legal representative), so an event that left the provider's
                    // node before its batch was durable, and was lost with it, would show as a mismatch.
                    for c in &mut changes {
                        c.record.as_mut().unwrap().items.insert("法定代表人".into(), format!("重发{attempt}"));
                    }
                }
                Err(s) => panic!("publishing changes {start}..{end} failed: {s:?}"),
            }
        };
        assert_eq!((first, last), (head + 1, head + n), "a batch's seqs follow the head without gaps");
        for (j, c) in changes.iter().enumerate() {
            let r = c.record.as_ref().unwrap();
            let i = start + j as u64;
            let kind = match RecordChangeKind::try_from(c.kind).unwrap() {
                RecordChangeKind::Unspecified if seen_keys.contains(&keys.of(i)) => RecordChangeKind::Updated,
                RecordChangeKind::Unspecified => RecordChangeKind::Created,
                k => k,
            };
            seen_keys.insert(keys.of(i));
            out.events.push(Ev { seq: first + j as u64, kind: kind as i32, key: r.key.clone(), items: items_hash(&r.items), index: i });
        }
        head = last;
        out.head = head;
        out.batches += 1;
        progress.fetch_add(n as usize, Ordering::SeqCst);
        start = end;
        if !pause.is_zero() {
            tokio::time::sleep(pause).await;
        }
    }
    out
}

#[derive(Default)]
struct Received {
    events: Vec<Ev>,
    /// Streams opened (1 + reconnections).
    streams: usize,
    stream_errors: Vec<String>,
    ack_errors: usize,
    /// Out-of-order deliveries as they happened (a duplicate or a gap), for the failure message.
    problems: Vec<String>,
    last: u64,
}

/// Tax's application: reads the subscription from `after` on, remembering the last seq it processed and
/// resuming after it on any error; acknowledges each message; stops at `target` (once known).
async fn application(
    site: Arc<Site>,
    after: u64,
    mut target: watch::Receiver<Option<u64>>,
    seen: Arc<AtomicU64>,
    deadline: Instant,
) -> Received {
    let mut out = Received { last: after, ..Default::default() };
    let mut backoff = Duration::from_millis(100);
    'outer: loop {
        let done = |out: &Received, target: &watch::Receiver<Option<u64>>| target.borrow().is_some_and(|t| out.last >= t);
        if done(&out, &target) {
            break;
        }
        if Instant::now() > deadline {
            out.problems.push(format!("deadline passed at seq {}", out.last));
            break;
        }
        let mut client = site.app(CONSUMER);
        out.streams += 1;
        let req = ReceiveEventsRequest { resource_code: REG.into(), after_seq: out.last, max_batch: 0 };
        let mut stream = match client.receive_events(req).await {
            Ok(s) => s.into_inner(),
            Err(s) => {
                out.stream_errors.push(format!("open after {}: {:?} {}", out.last, s.code(), s.message()));
                tokio::time::sleep(backoff).await;
                backoff = (backoff * 2).min(Duration::from_secs(1));
                continue;
            }
        };
        loop {
            let next = tokio::select! {
                m = stream.next() => m,
                _ = target.changed() => {
                    if done(&out, &target) { break 'outer }
                    continue
                }
                _ = tokio::time::sleep(Duration::from_millis(500)) => {
                    if done(&out, &target) { break 'outer }
                    if Instant::now() > deadline { continue 'outer }
                    continue
                }
            };
            let msg = match next {
                Some(Ok(m)) => m,
                Some(Err(s)) => {
                    out.stream_errors.push(format!("stream after {}: {:?} {}", out.last, s.code(), s.message()));
                    break;
                }
                None => {
                    out.stream_errors.push(format!("stream after {} ended", out.last));
                    break;
                }
            };
            assert!(msg.ended_reason.is_empty(), "the subscription ended: {}", msg.ended_reason);
            backoff = Duration::from_millis(100);
            for e in &msg.events {
                if e.seq != out.last + 1 && out.problems.len() < 20 {
                    out.problems.push(format!("seq {} delivered after seq {}", e.seq, out.last));
                }
                out.events.push(Ev::received(e));
                out.last = out.last.max(e.seq);
            }
            seen.store(out.last, Ordering::SeqCst);
            if !msg.events.is_empty() {
                let ack = AckEventsRequest { resource_code: REG.into(), upto_seq: out.last };
                if client.ack_events(ack).await.is_err() {
                    out.ack_errors += 1;
                }
            }
        }
        tokio::time::sleep(backoff).await;
        backoff = (backoff * 2).min(Duration::from_secs(1));
    }
    // The last acknowledgement (a previous one may have been lost with a node).
    let site2 = site.clone();
    let last = out.last;
    let _ = eventually("the final acknowledgement", Duration::from_secs(20), || {
        let site = site2.clone();
        async move { site.app(CONSUMER).ack_events(AckEventsRequest { resource_code: REG.into(), upto_seq: last }).await.ok() }
    })
    .await;
    out
}

/// Exactly once, in order: compares what the application processed with what was published.
fn verify(scenario: &str, start: u64, published: &Published, received: &Received) -> String {
    let p = &published.events;
    let expected_seqs: Vec<u64> = (start + 1..=published.head).collect();
    assert_eq!(p.iter().map(|e| e.seq).collect::<Vec<_>>(), expected_seqs, "{scenario}: the publisher's seqs are contiguous");
    let r = &received.events;
    let mut by_seq: BTreeMap<u64, usize> = BTreeMap::new();
    for e in r {
        *by_seq.entry(e.seq).or_default() += 1;
    }
    let duplicates: Vec<u64> = by_seq.iter().filter(|(_, n)| **n > 1).map(|(s, _)| *s).collect();
    let missing: Vec<u64> = expected_seqs.iter().filter(|s| !by_seq.contains_key(s)).copied().collect();
    let extra: Vec<u64> = by_seq.keys().filter(|s| **s <= start || **s > published.head).copied().collect();
    let in_order = r.windows(2).all(|w| w[0].seq < w[1].seq);
    let summary = |v: &[u64]| -> String {
        if v.is_empty() {
            "none".into()
        } else {
            format!("{} (first {:?})", v.len(), &v[..v.len().min(10)])
        }
    };
    assert!(
        duplicates.is_empty() && missing.is_empty() && extra.is_empty() && in_order,
        "{scenario}: not exactly once in order: received {} of {} events; duplicates {}; missing {}; unexpected {}; \
         in order {in_order}; problems {:?}; stream errors (first 10) {:?}",
        r.len(),
        p.len(),
        summary(&duplicates),
        summary(&missing),
        summary(&extra),
        received.problems,
        &received.stream_errors[..received.stream_errors.len().min(10)],
    );
    // Same content, seq by seq.
    let mismatches: Vec<(&Ev, &Ev)> = p.iter().zip(r).filter(|(a, b)| a != b).collect();
    assert!(
        mismatches.is_empty(),
        "{scenario}: {} events differ from what was published, first: {:?}",
        mismatches.len(),
        &mismatches[..mismatches.len().min(3)]
    );
    // In order per key (the publish index grows along each key's events).
    let mut per_key: HashMap<&str, u64> = HashMap::new();
    for e in r {
        if let Some(prev) = per_key.insert(&e.key, e.index) {
            assert!(prev < e.index, "{scenario}: key {} went from change {prev} to change {}", e.key, e.index);
        }
    }
    let (sent, got) = (Checksum::of(p), Checksum::of(r));
    assert_eq!(sent, got, "{scenario}: checksum");
    assert_eq!(r.len(), p.len(), "{scenario}: count");
    format!("{} events (seqs {}..={}), checksum {got}", r.len(), start + 1, published.head)
}

// ---------------------------------------------------------------------------------------------------
// The stream scenarios.
// ---------------------------------------------------------------------------------------------------

#[derive(Clone, Copy, Debug)]
enum Fault {
    /// kill -9 commerce's node, restart it on the same data and port.
    KillProvider,
    /// kill -9 tax's node, restart it.
    KillConsumer,
    /// SIGTERM tax's node, keep it down while the publisher goes on, restart it.
    StopConsumer(Duration),
    /// SIGTERM the directory; restart both nodes without it; everything must be delivered without it;
    /// restart it at the end.
    StopDirectory,
}

struct Shape {
    events: u64,
    keys: Keys,
    batch: u64,
    /// Inject the fault when the application has processed these shares of the events.
    at: &'static [f64],
    /// Between publish batches, so the publisher is still going when the fault comes.
    pause: Duration,
}

async fn stream_scenario(name: &str, shape: Shape, fault: Fault) {
    let mut fed = Fed::start().await;
    let setup = fed.started.elapsed();
    let sub = fed.subscribe().await;
    let start = sub.start_seq;
    assert_eq!(start, 0, "a fresh provider has no events yet");
    let site = fed.site.clone();

    let t0 = Instant::now();
    let (target_tx, target_rx) = watch::channel(None);
    let seen = Arc::new(AtomicU64::new(start));
    let progress = Arc::new(AtomicUsize::new(0));
    let deadline = Instant::now() + Duration::from_secs(150);
    let app = tokio::spawn(application(site.clone(), start, target_rx, seen.clone(), deadline));
    let publisher = tokio::spawn(publish(site.clone(), 0, shape.events, shape.keys, 0, shape.batch, start, shape.pause, progress.clone()));

    let mut faults = Vec::new();
    let mut note = String::new();
    // A kill lands at a random point of the publisher's and the nodes' work (printed, to replay a failure
    // with GX_DELIVERY_SEED).
    let seed = std::env::var("GX_DELIVERY_SEED").ok().and_then(|s| s.parse().ok()).unwrap_or_else(|| {
        std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().subsec_nanos() as u64
    });
    eprintln!("{name}: GX_DELIVERY_SEED={seed}");
    let mut rng = e2e_tests::workload::Rng::new(seed);
    for at in shape.at {
        let trigger = start + (shape.events as f64 * at) as u64;
        eventually(&format!("the application to reach seq {trigger}"), Duration::from_secs(90), || {
            let s = seen.load(Ordering::SeqCst);
            async move { (s >= trigger).then_some(()) }
        })
        .await;
        faults.push(format!(
            "at {:.1?} (application at seq {}, {} published)",
            t0.elapsed(),
            seen.load(Ordering::SeqCst),
            progress.load(Ordering::SeqCst)
        ));
        let jitter = Duration::from_millis(rng.below(400) as u64);
        match fault {
            Fault::KillProvider => {
                tokio::time::sleep(jitter).await;
                fed.kill_node(PROVIDER);
                tokio::time::sleep(Duration::from_millis(1000)).await;
                fed.restart_node(PROVIDER).await;
            }
            Fault::KillConsumer => {
                tokio::time::sleep(jitter).await;
                fed.kill_node(CONSUMER);
                tokio::time::sleep(Duration::from_millis(1000)).await;
                fed.restart_node(CONSUMER).await;
            }
            Fault::StopConsumer(down) => {
                assert!(fed.stop_node(CONSUMER), "tax's node exits cleanly on SIGTERM");
                let published_at_stop = progress.load(Ordering::SeqCst);
                let seen_at_stop = seen.load(Ordering::SeqCst);
                tokio::time::sleep(down).await;
                // While it was down, the provider kept what tax's node had not acknowledged.
                let list = site.app(PROVIDER).list_subscriptions(ListSubscriptionsRequest {}).await.unwrap().into_inner();
                let p = list.as_provider.iter().find(|s| s.resource_code == REG && s.consumer_code == CONSUMER).unwrap().clone();
                let published_while_down = progress.load(Ordering::SeqCst) - published_at_stop;
                assert!(!p.connected, "no stream while tax's node is down: {p:?}");
                assert!(p.backlog > 0 && published_while_down > 0, "a backlog built up while tax was down: {p:?}");
                assert_eq!(seen.load(Ordering::SeqCst), seen_at_stop, "nothing reaches the application while its node is down");
                note = format!("; {published_while_down} events published while tax's node was down, provider backlog {}", p.backlog);
                fed.restart_node(CONSUMER).await;
            }
            Fault::StopDirectory => {
                assert!(fed.stop_directory(), "the directory exits cleanly on SIGTERM");
                // Without the directory, each node restarts from what it keeps on disk (its copy of the
                // rules, the provider's address): restart tax's node, then commerce's, mid-stream.
                for dept in [CONSUMER, PROVIDER] {
                    let before = seen.load(Ordering::SeqCst);
                    eventually("delivery to go on without the directory", Duration::from_secs(30), || {
                        let s = seen.load(Ordering::SeqCst);
                        async move { (s >= before + 2_000).then_some(()) }
                    })
                    .await;
                    assert!(fed.stop_node(dept), "{dept}'s node exits cleanly on SIGTERM");
                    fed.restart_node(dept).await;
                }
                note = "; both nodes restarted while the directory was down".into();
            }
        }
        faults.last_mut().unwrap().push_str(&format!(" recovered at {:.1?}", t0.elapsed()));
    }

    let published = publisher.await.expect("publisher");
    let head = published.head;
    let _ = target_tx.send(Some(head));
    let received = app.await.expect("application");
    let delivered_at = t0.elapsed();
    if let Fault::StopDirectory = fault {
        // Delivered in full while the directory was down; then it comes back.
        assert!(!fed.directory.running(), "the directory was down all along");
        fed.restart_directory().await;
        note.push_str("; the whole stream was published and delivered while the directory was down");
    }
    let checked = verify(name, start, &published, &received);

    // Both nodes agree: tax's inbox is acknowledged up to the head, commerce's outbox has no backlog.
    eventually("both nodes' positions at the head", Duration::from_secs(20), || {
        let site = site.clone();
        async move {
            let c = site.app(CONSUMER).list_subscriptions(ListSubscriptionsRequest {}).await.ok()?.into_inner();
            let c = c.as_consumer.iter().find(|s| s.resource_code == REG)?.clone();
            let p = site.app(PROVIDER).list_subscriptions(ListSubscriptionsRequest {}).await.ok()?.into_inner();
            let p = p.as_provider.iter().find(|s| s.resource_code == REG)?.clone();
            (c.received_upto_seq == head && c.acked_upto_seq == head && c.backlog == 0 && p.received_upto_seq == head && p.backlog == 0)
                .then_some(())
        }
    })
    .await;
    eprintln!(
        "{name}: {checked}; fault {fault:?} {}; all delivered at {delivered_at:.1?} (setup {setup:.1?}); publisher: {} batches, \
         {} sent again, {} landed without an answer; application: {} streams, {} ack errors{note}",
        faults.join(", "),
        published.batches,
        published.resent,
        published.landed_unacknowledged,
        received.streams,
        received.ack_errors,
    );
    fed.shutdown();
}

const STREAM_KEYS: Keys = Keys { keys: 10_000, stride: 1 };

#[test]
fn provider_killed_mid_stream_of_100k_events_every_event_exactly_once() {
    run(async {
        let shape = Shape { events: 100_000, keys: STREAM_KEYS, batch: 2_000, at: &[0.3, 0.65], pause: Duration::ZERO };
        stream_scenario("provider kill -9", shape, Fault::KillProvider).await;
    });
}

#[test]
fn consumer_killed_mid_stream_of_100k_events_every_event_exactly_once() {
    run(async {
        let shape = Shape { events: 100_000, keys: STREAM_KEYS, batch: 2_000, at: &[0.3, 0.65], pause: Duration::ZERO };
        stream_scenario("consumer kill -9", shape, Fault::KillConsumer).await;
    });
}

#[test]
fn consumer_stopped_for_a_while_drains_its_backlog_exactly_once() {
    run(async {
        let shape = Shape { events: 20_000, keys: STREAM_KEYS, batch: 1_000, at: &[0.2], pause: Duration::from_millis(100) };
        stream_scenario("consumer stopped 3 s", shape, Fault::StopConsumer(Duration::from_secs(3))).await;
    });
}

#[test]
fn directory_stopped_during_delivery_every_event_exactly_once() {
    run(async {
        let shape = Shape { events: 20_000, keys: STREAM_KEYS, batch: 1_000, at: &[0.2], pause: Duration::from_millis(100) };
        stream_scenario("directory stopped", shape, Fault::StopDirectory).await;
    });
}

/// A longer soak, not run by default (`cargo test -p e2e-tests --test delivery -- --ignored`): nine kills
/// of the provider's node at random points of one 100,000-event stream (about 40 s).
#[test]
#[ignore]
fn provider_killed_nine_times_in_one_stream() {
    run(async {
        let at = &[0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9];
        let shape = Shape { events: 100_000, keys: STREAM_KEYS, batch: 2_000, at, pause: Duration::ZERO };
        stream_scenario("provider kill -9 x9", shape, Fault::KillProvider).await;
    });
}

// ---------------------------------------------------------------------------------------------------
// Bulk sync: interrupted and resumed; a replica from a snapshot plus the change stream.
// ---------------------------------------------------------------------------------------------------

/// What a (possibly cut short) snapshot call returned.
#[derive(Default)]
struct Snap {
    records: Vec<Record>,
    pages: usize,
    last_key: String,
    done: bool,
    total_records: u64,
    head_seq: u64,
    /// The error that cut the stream, if one did.
    error: Option<tonic::Status>,
}

/// `SyncSnapshot` through tax's node from `after_key`, reading at most `max_pages` pages, then dropping
/// the stream; `on_page` sees each page as it arrives.
async fn snapshot(site: &Site, after_key: &str, max_pages: usize, mut on_page: impl FnMut(&SnapshotPage)) -> Snap {
    let mut snap = Snap { last_key: after_key.to_string(), ..Default::default() };
    let req = SyncSnapshotRequest { resource_code: REG.into(), after_key: after_key.into(), purpose: "数据同步测试".into() };
    let mut stream = match site.app(CONSUMER).sync_snapshot(req).await {
        Ok(s) => s.into_inner(),
        Err(s) => {
            snap.error = Some(s);
            return snap;
        }
    };
    while snap.pages < max_pages {
        match tokio::time::timeout(Duration::from_secs(30), stream.message()).await.expect("a snapshot page within 30 s") {
            Ok(Some(page)) => {
                if snap.pages == 0 {
                    snap.total_records = page.total_records;
                    snap.head_seq = page.head_seq;
                }
                on_page(&page);
                snap.pages += 1;
                snap.last_key = page.last_key.clone();
                snap.records.extend(page.records);
                if page.done {
                    snap.done = true;
                    break;
                }
            }
            Ok(None) => {
                snap.error = Some(tonic::Status::unavailable("the stream ended before the last page"));
                break;
            }
            Err(s) => {
                snap.error = Some(s);
                break;
            }
        }
    }
    snap
}

/// key → (version, items hash): a replica of the resource, or a snapshot of it.
type Replica = BTreeMap<String, (u64, u64)>;

fn replica_of(records: &[Record]) -> Replica {
    records.iter().map(|r| (r.key.clone(), (r.version, items_hash(&r.items)))).collect()
}

/// Applies a record of version `version` if it is newer than what the replica holds; whether it did.
fn apply_newer(replica: &mut Replica, key: &str, version: u64, items: u64) -> bool {
    match replica.get(key) {
        Some((held, _)) if *held >= version => false,
        _ => {
            replica.insert(key.to_string(), (version, items));
            true
        }
    }
}

/// Tax's application reading its subscription into a replica: resumes after the last seq it applied,
/// acknowledges what it applied.
struct EventReader {
    site: Arc<Site>,
    last: u64,
    stream: Option<(ExchangeNodeClient<Channel>, tonic::Streaming<ReceivedEvents>)>,
    applied: usize,
    skipped: usize,
    reconnects: usize,
}

impl EventReader {
    /// Reads events until `upto` is applied (or, with `upto` 0, until none arrives for 300 ms).
    async fn drain(&mut self, replica: &mut Replica, upto: u64) {
        let deadline = Instant::now() + Duration::from_secs(60);
        loop {
            if upto > 0 && self.last >= upto {
                return;
            }
            assert!(Instant::now() < deadline, "events up to {upto} within 60 s (at {})", self.last);
            if self.stream.is_none() {
                let mut client = self.site.app(CONSUMER);
                let req = ReceiveEventsRequest { resource_code: REG.into(), after_seq: self.last, max_batch: 0 };
                match client.receive_events(req).await {
                    Ok(s) => self.stream = Some((client, s.into_inner())),
                    Err(_) => {
                        self.reconnects += 1;
                        tokio::time::sleep(Duration::from_millis(200)).await;
                        continue;
                    }
                }
            }
            let (client, stream) = self.stream.as_mut().unwrap();
            let wait = if upto > 0 { Duration::from_secs(5) } else { Duration::from_millis(300) };
            let msg = match tokio::time::timeout(wait, stream.next()).await {
                Err(_) if upto == 0 => return,
                Err(_) => continue,
                Ok(Some(Ok(m))) => m,
                Ok(_) => {
                    self.stream = None;
                    self.reconnects += 1;
                    continue;
                }
            };
            assert!(msg.ended_reason.is_empty(), "the subscription ended: {}", msg.ended_reason);
            for e in &msg.events {
                assert_eq!(e.seq, self.last + 1, "events in order, each once");
                self.last = e.seq;
                let r = e.record.as_ref().expect("an event carries its record");
                assert_eq!(r.version, e.seq, "an event's record has its seq as version");
                // The rule: apply only what is newer than the held version.
                if apply_newer(replica, &r.key, e.seq, items_hash(&r.items)) {
                    self.applied += 1;
                } else {
                    self.skipped += 1;
                }
            }
            if !msg.events.is_empty() {
                let _ = client.ack_events(AckEventsRequest { resource_code: REG.into(), upto_seq: self.last }).await;
            }
        }
    }
}

#[test]
fn bulk_sync_interrupted_and_resumed_and_a_replica_equals_the_provider() {
    run(bulk_sync());
}

async fn bulk_sync() {
    let mut fed = Fed::start().await;
    let site = fed.site.clone();
    let t0 = Instant::now();
    const RECORDS: u64 = 20_000;
    /// Key numbers up to RECORDS + NEW are updated; those from RECORDS on are new records.
    const NEW: u64 = 1_000;
    const UPDATES: u64 = 10_000;
    const BATCH: u64 = 500;

    // Commerce loads 20,000 records (seqs 1..=20000), before anyone subscribes.
    let load_keys = Keys { keys: RECORDS, stride: 1 };
    let loaded = publish(site.clone(), 0, RECORDS, load_keys, 0, 2_000, 0, Duration::ZERO, Arc::default()).await;
    assert_eq!(loaded.head, RECORDS);
    let mut expected = Replica::new();
    for e in &loaded.events {
        expected.insert(e.key.clone(), (e.seq, e.items));
    }
    let loaded_at = t0.elapsed();

    // ---- A: the application drops the stream twice; resuming after the last key gives every record once.
    let first = snapshot(&site, "", 3, |_| {}).await;
    assert!(first.error.is_none() && !first.done && first.pages == 3, "{:?}", first.error);
    let second = snapshot(&site, &first.last_key, 2, |_| {}).await;
    assert!(second.error.is_none() && !second.done, "{:?}", second.error);
    let rest = snapshot(&site, &second.last_key, usize::MAX, |_| {}).await;
    assert!(rest.done, "{:?}", rest.error);
    assert_eq!((first.total_records, first.head_seq), (RECORDS, RECORDS));
    let union: Vec<Record> = [first.records, second.records, rest.records].concat();
    assert!(union.windows(2).all(|w| w[0].key < w[1].key), "keys strictly increasing across the resumptions: none twice");
    assert_eq!(union.len() as u64, RECORDS, "count");
    let got = replica_of(&union);
    let sum = |r: &Replica| {
        let evs: Vec<Ev> = r.iter().map(|(k, (v, h))| Ev { seq: *v, kind: 0, key: k.clone(), items: *h, index: 0 }).collect();
        Checksum::of(&evs)
    };
    assert_eq!(sum(&got), sum(&expected), "checksum of the resumed snapshot");
    assert_eq!(got, expected);
    let part_a = format!("{} records in 3+2+{} pages, checksum {}", union.len(), rest.pages, sum(&got));

    // ---- B: subscribe first, then take a snapshot while updates are published (one batch per page), and
    // tax's node is killed in the middle of it; the snapshot is resumed after the last key received.
    let sub = fed.subscribe().await;
    assert_eq!(sub.start_seq, RECORDS, "the subscription starts at the head");
    // Updates scattered over the key range (so both behind and ahead of the snapshot's position), and
    // NEW records with new keys.
    let update_keys = Keys { keys: RECORDS + NEW, stride: 7_919 };
    let publish_batch = |head: u64, next: u64| {
        let site = site.clone();
        async move { publish(site, next, next + BATCH, update_keys, RECORDS, BATCH, head, Duration::ZERO, Arc::default()).await }
    };
    let mut head = RECORDS;
    let mut next = RECORDS;
    let mut replica = Replica::new();
    let mut reader = EventReader { site: site.clone(), last: sub.start_seq, stream: None, applied: 0, skipped: 0, reconnects: 0 };
    let (mut snapshot_records, mut records_skipped, mut interruptions, mut pages, mut calls) = (Vec::new(), 0usize, 0usize, 0usize, 0usize);
    let mut after_key = String::new();
    let mut header_head = 0;
    let mut stream: Option<tonic::Streaming<SnapshotPage>> = None;
    loop {
        if stream.is_none() {
            let req = SyncSnapshotRequest { resource_code: REG.into(), after_key: after_key.clone(), purpose: "副本初始化".into() };
            match site.app(CONSUMER).sync_snapshot(req).await {
                Ok(s) => {
                    stream = Some(s.into_inner());
                    calls += 1;
                }
                Err(e) => {
                    assert!(interruptions > 0, "snapshot refused: {e:?}");
                    tokio::time::sleep(Duration::from_millis(200)).await;
                    continue;
                }
            }
        }
        let page = match tokio::time::timeout(Duration::from_secs(30), stream.as_mut().unwrap().message()).await.expect("a page within 30 s") {
            Ok(Some(page)) => page,
            other => {
                // Only the kill below cuts a snapshot: resume after the last key received.
                assert!(interruptions > 0, "snapshot cut: {other:?}");
                stream = None;
                continue;
            }
        };
        if pages == 0 {
            header_head = page.head_seq;
        }
        pages += 1;
        after_key = page.last_key.clone();
        for r in &page.records {
            if !apply_newer(&mut replica, &r.key, r.version, items_hash(&r.items)) {
                records_skipped += 1;
            }
        }
        snapshot_records.extend(page.records);
        if page.done {
            break;
        }
        // Updates go on while the snapshot is read: a batch per page. The events that came are applied
        // every other page, so some arrive before the page with their key and some after it.
        head = publish_batch(head, next).await.head;
        next += BATCH;
        if pages % 2 == 0 {
            reader.drain(&mut replica, 0).await;
        }
        if pages == 4 {
            // Interrupt the bulk sync the hard way: the consumer's node dies mid-snapshot.
            fed.kill_node(CONSUMER);
            interruptions += 1;
            tokio::time::sleep(Duration::from_millis(500)).await;
            fed.restart_node(CONSUMER).await;
            reader.stream = None;
        }
    }
    drop(stream);
    assert_eq!(header_head, RECORDS, "the snapshot started at the head of the subscription");
    assert!(snapshot_records.windows(2).all(|w| w[0].key < w[1].key), "resumed snapshot: no key twice");
    let snapshot_keys: std::collections::HashSet<&str> = snapshot_records.iter().map(|r| r.key.as_str()).collect();
    assert!(expected.keys().all(|k| snapshot_keys.contains(k.as_str())), "every record of the snapshot's start is in it");
    // The rest of the updates, then every event up to the head.
    while next < RECORDS + UPDATES {
        head = publish_batch(head, next).await.head;
        next += BATCH;
    }
    reader.drain(&mut replica, head).await;
    assert_eq!(reader.last, head);

    // A fresh, uninterrupted snapshot is the provider's final state: the replica equals it.
    let last = snapshot(&site, "", usize::MAX, |_| {}).await;
    assert!(last.done, "{:?}", last.error);
    assert_eq!(last.head_seq, head);
    let all_keys: std::collections::HashSet<u64> = (0..RECORDS).chain((RECORDS..next).map(|i| update_keys.of(i))).collect();
    assert_eq!(last.total_records, all_keys.len() as u64, "the loaded keys and the new ones");
    let final_state = replica_of(&last.records);
    assert_eq!(final_state.len(), all_keys.len());
    let differ: Vec<&String> = final_state.keys().filter(|k| replica.get(*k) != final_state.get(*k)).take(5).collect();
    assert!(differ.is_empty() && replica.len() == final_state.len(), "replica differs from the provider at {differ:?} ({} vs {} keys)", replica.len(), final_state.len());
    assert_eq!(sum(&replica), sum(&final_state), "checksum");
    assert!(records_skipped + reader.skipped > 0, "the version rule was exercised (something arrived twice)");
    eprintln!(
        "bulk sync: loaded {RECORDS} at {loaded_at:.1?}; A: {part_a}; B: snapshot of {} records in {pages} pages with \
         {calls} calls ({interruptions} kill -9 of tax's node), {} batches of updates published during it; {} events to seq {head}: {} applied, \
         {} skipped as not newer; {records_skipped} snapshot records skipped as not newer; replica = provider ({} keys, \
         checksum {}); {:.1?} in all",
        snapshot_records.len(),
        pages.saturating_sub(1),
        head - RECORDS,
        reader.applied,
        reader.skipped,
        replica.len(),
        sum(&replica),
        t0.elapsed(),
    );
    fed.shutdown();
}
