//! The benchmark harness. Every figure is printed next to a baseline measured in the same run on the same
//! machine, because ratios hold on a noisy 2-core box and absolute times do not.
//!
//! ```sh
//! cargo run --release -p e2e-tests --bin bench                 # full run (100,000 entries)
//! cargo run --release -p e2e-tests --bin bench -- --entries 20000 --seconds 3
//! cargo run --release -p e2e-tests --bin bench -- --only catalog   # echo, publish, search, restart
//! cargo run --release -p e2e-tests --bin bench -- --only relay     # record relay vs a bare forwarder
//! cargo run --release -p e2e-tests --bin bench -- --only relay-steps --seconds 5   # relay cost breakdown
//! cargo run --release -p e2e-tests --bin bench -- --only events    # sustained event delivery, node to node
//! cargo run --release -p e2e-tests --bin bench -- --only sync      # bulk sync of 1,000,000 records
//! cargo build --release -p exchange-node --bins && \
//!   cargo run --release -p e2e-tests --bin bench -- --only backlog # provider memory, 1,000,000-event backlog
//! cargo run --release -p e2e-tests --bin bench -- --only ops       # backup, metrics and scrape costs
//! cargo run --release -p e2e-tests --bin bench -- --only directory-ha --entries 20000   # sled vs PostgreSQL, 1 and 2 replicas
//! ```
//!
//! The three event sections (issue 4, `e2e_tests::events_bench`) are not in the default run: they take
//! minutes each and write gigabytes. Nor is the operations section (issue 5, `e2e_tests::ops_bench`).
//!
//! Everything runs in this process over real mutual TLS on 127.0.0.1 (client and servers share the cores,
//! as they would on a single test box), with sled in a temporary directory.

use std::sync::Arc;

// The same allocator the server binaries use, so in-process figures match what they would see.
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;
use std::time::{Duration, Instant};

use clap::{Parser, ValueEnum};
use client_sdk::identity::Role;
use client_sdk::tls::{self, TlsIdentity};
use e2e_tests::events_bench;
use e2e_tests::federation;
use e2e_tests::forwarder::{self, Backend, ForwarderPair, Steps};
use e2e_tests::load::{self, LoadStats, OpenLoopStats};
use e2e_tests::ops_bench;
use e2e_tests::pki::TestPki;
use e2e_tests::workload;
use exchange_proto::v1::directory_client::DirectoryClient;
use exchange_proto::v1::bench_records_client::BenchRecordsClient;
use exchange_proto::v1::echo_client::EchoClient;
use exchange_proto::v1::exchange_node_client::ExchangeNodeClient;
use exchange_proto::v1::{
    EchoMessage, PublishEntriesRequest, PutRecordsRequest, QueryRecordsRequest, QueryRecordsResponse,
    SearchCatalogRequest, ShareType,
};
use prost::Message;
use tokio::net::TcpListener;
use tokio::sync::oneshot;
use tonic::transport::Channel;

#[derive(Parser, Debug)]
#[command(about = "gov-exchange benchmark harness")]
struct Args {
    /// Catalog entries to publish (spread over five departments).
    #[arg(long, default_value_t = 100_000)]
    entries: usize,
    /// Entries per publish call.
    #[arg(long, default_value_t = 1_000)]
    batch: usize,
    /// Seconds per timed load phase.
    #[arg(long, default_value_t = 10)]
    seconds: u64,
    /// Calls in flight for the throughput phases.
    #[arg(long, default_value_t = 32)]
    concurrency: usize,
    /// Calls in flight for the latency phases (a moderate load, so latency is not queueing).
    #[arg(long, default_value_t = 4)]
    light_concurrency: usize,
    /// Connections the load is spread over.
    #[arg(long, default_value_t = 4)]
    connections: usize,
    /// Run one section only (default: all).
    #[arg(long, value_enum)]
    only: Option<Section>,
    /// Records loaded into the provider's node for the relay section.
    #[arg(long, default_value_t = 10_000)]
    records: usize,
    /// Offered load (queries/s, open loop) for the latency phase of `--only relay-steps`.
    #[arg(long, default_value_t = 2_000.0)]
    steps_rate: f64,
    /// Events published in `--only events`.
    #[arg(long, default_value_t = 300_000)]
    events: usize,
    /// Records per PublishEvents call in the event sections (and per batch of their sled baselines).
    #[arg(long, default_value_t = 5_000)]
    event_batch: usize,
    /// Concurrent publishers (one connection each) in the event sections.
    #[arg(long, default_value_t = 2)]
    publishers: usize,
    /// Records loaded into commerce and bulk-synced by tax in `--only sync`.
    #[arg(long, default_value_t = 1_000_000)]
    sync_records: usize,
    /// Unacknowledged events published in `--only backlog`.
    #[arg(long, default_value_t = 1_000_000)]
    backlog_events: usize,
    /// In the event sections, the application acknowledges at most this often (ms; 0 = after every
    /// message it receives, as exchange-node/tests/events.rs does).
    #[arg(long, default_value_t = 1_000)]
    ack_every_ms: u64,
    /// Records loaded into commerce's node before `--only ops` measures backups, metrics and scrapes.
    #[arg(long, default_value_t = 100_000)]
    ops_records: usize,
    /// Internal (`--only sled-memory`): what the memory baseline writes (records, records-log, store).
    #[arg(long, hide = true, default_value = "records")]
    memory_mode: String,
    /// Internal (`--only sled-memory`): the database folder.
    #[arg(long, hide = true)]
    memory_dir: Option<std::path::PathBuf>,
    /// Experiment (`--only sled-memory --memory-mode records-log`): log values of this many records
    /// (0: one value per batch, as the node writes).
    #[arg(long, hide = true, default_value_t = 0)]
    memory_log_chunk: usize,
    /// Experiment (`--only sled-memory`): sled cache capacity in MB instead of the node's.
    #[arg(long, hide = true)]
    memory_cache_mb: Option<u64>,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
enum Section {
    /// Echo baseline, publish, search, restart (the directory's catalog).
    Catalog,
    /// Record relay between two department nodes, against a bare two-hop forwarder.
    Relay,
    /// Not in the default run: the relay's per-call steps added one at a time to the bare forwarder
    /// (where the relay's time goes, end to end).
    RelaySteps,
    /// Not in the default run: sustained event delivery node to node with durability on (issue 4).
    Events,
    /// Not in the default run: bulk sync of `--sync-records` records through both nodes (issue 4).
    Sync,
    /// Not in the default run: the provider node's memory (a separate process) with a
    /// `--backlog-events` backlog, then the drain (issue 4). Needs `target/release/exchange-node`.
    Backlog,
    /// Not in the default run: what backups, metrics and scrapes cost a running node (issue 5).
    Ops,
    /// Not in the default run: publish and search throughput on sled, and on PostgreSQL with one and two
    /// directory replicas (issue 6). Starts its own PostgreSQL server (durable settings).
    DirectoryHa,
    /// Internal: the memory baseline `--only backlog` runs in a child process of its own.
    #[value(hide = true)]
    SledMemory,
}

struct Row {
    figure: String,
    value: String,
    baseline: String,
    ratio: String,
    target: String,
}

impl From<events_bench::Figure> for Row {
    fn from(f: events_bench::Figure) -> Row {
        Row { figure: f.figure, value: f.value, baseline: f.baseline, ratio: f.ratio, target: f.target }
    }
}

fn ms(d: Duration) -> String {
    format!("{:.2} ms", d.as_secs_f64() * 1e3)
}

fn latency_row(name: &str, s: &LoadStats, base: &LoadStats, p: f64, target: &str) -> Row {
    let (v, b) = (s.percentile(p), base.percentile(p));
    Row {
        figure: format!("{name} p{p}"),
        value: ms(v),
        baseline: format!("echo {}", ms(b)),
        ratio: format!("{:.2}×", v.as_secs_f64() / b.as_secs_f64().max(1e-9)),
        target: target.to_string(),
    }
}

fn rate_row(name: &str, value: f64, unit: &str, base_name: &str, base: f64, target: &str) -> Row {
    Row {
        figure: name.to_string(),
        value: format!("{value:.0} {unit}"),
        baseline: format!("{base_name} {base:.0}/s"),
        ratio: format!("{:.0}%", 100.0 * value / base.max(1e-9)),
        target: target.to_string(),
    }
}

async fn channels(addr: &str, id: &TlsIdentity, n: usize) -> anyhow::Result<Vec<Channel>> {
    channels_to(addr, id, &[Role::Directory], n).await
}

/// `n` channels (one TLS connection each) to a server with one of `roles`.
async fn channels_to(addr: &str, id: &TlsIdentity, roles: &[Role], n: usize) -> anyhow::Result<Vec<Channel>> {
    let config = tls::client_config(id, roles)?;
    let mut out = Vec::new();
    for _ in 0..n {
        out.push(tls::connect(addr, config.clone()).await?);
    }
    Ok(out)
}

fn directory_clients(chs: &[Channel]) -> Vec<DirectoryClient<Channel>> {
    chs.iter().cloned().map(client_sdk::client::directory_client_on).collect()
}

struct RunningDirectory {
    addr: String,
    stop: oneshot::Sender<()>,
    task: tokio::task::JoinHandle<anyhow::Result<()>>,
}

async fn start_directory(config: directory::config::Config) -> anyhow::Result<(RunningDirectory, Duration)> {
    let started = Instant::now();
    let loaded = directory::server::LoadedDirectory::load(config).await?;
    let load_time = started.elapsed();
    let listener = TcpListener::bind("127.0.0.1:0").await?;
    let addr = listener.local_addr()?.to_string();
    let (stop, stopped) = oneshot::channel::<()>();
    let task = tokio::spawn(async move {
        loaded.serve(listener, async { let _ = stopped.await; }).await?;
        Ok(())
    });
    Ok((RunningDirectory { addr, stop, task }, load_time))
}

impl RunningDirectory {
    async fn shutdown(self) -> anyhow::Result<()> {
        let _ = self.stop.send(());
        self.task.await??;
        Ok(())
    }
}

/// The disk-write baseline: the same encoded entries into a raw sled tree, same batch size, flushed per batch.
fn sled_baseline(dir: &std::path::Path, batches: &[Vec<exchange_proto::v1::CatalogEntry>]) -> anyhow::Result<f64> {
    let db = sled::open(dir)?;
    let tree = db.open_tree("baseline")?;
    let start = Instant::now();
    let mut n = 0usize;
    for batch in batches {
        let mut b = sled::Batch::default();
        for e in batch {
            b.insert(e.resource_code.as_bytes(), e.encode_to_vec());
            n += 1;
        }
        tree.apply_batch(b)?;
        db.flush()?;
    }
    Ok(n as f64 / start.elapsed().as_secs_f64())
}

/// The same searches straight against the index, one thread, no network, no store: separates the index's
/// cost from the service's.
fn index_only_search(
    dept_batches: &[Vec<Vec<exchange_proto::v1::CatalogEntry>>],
    phase: Duration,
) -> anyhow::Result<LoadStats> {
    let index = directory::search::CatalogIndex::new()?;
    let all: Vec<_> = dept_batches.iter().flatten().flatten().cloned().collect();
    index.upsert(&all)?;
    let queries = workload::queries();
    let started = Instant::now();
    let mut latencies = Vec::new();
    let mut i = 0usize;
    while started.elapsed() < phase {
        let t = Instant::now();
        index.search(&search_request(i as u64, &queries))?;
        latencies.push(t.elapsed());
        i += 1;
    }
    latencies.sort_unstable();
    Ok(LoadStats { calls: latencies.len() as u64, errors: 0, elapsed: started.elapsed(), latencies })
}

/// Search `i` of the benchmark mix: the query list in turn; every fourth search also filters, as portal
/// users do.
fn search_request(i: u64, queries: &[String]) -> SearchCatalogRequest {
    let mut req = SearchCatalogRequest { query: queries[i as usize % queries.len()].clone(), ..Default::default() };
    if i % 4 == 1 {
        req.share_type = ShareType::Conditional as i32;
    } else if i % 4 == 3 {
        req.provider_code = "commerce".into();
    }
    req
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    if args.only == Some(Section::SledMemory) {
        // A child of `--only backlog`: nothing else in this process, so its peak RSS is the baseline's.
        let mode = events_bench::MemoryMode::parse(&args.memory_mode)
            .ok_or_else(|| anyhow::anyhow!("--memory-mode: records, records-log or store"))?;
        let dir = args.memory_dir.clone().ok_or_else(|| anyhow::anyhow!("--memory-dir is required"))?;
        let cache = args.memory_cache_mb.map(|mb| mb * 1024 * 1024);
        return events_bench::sled_memory_child(&dir, mode, args.backlog_events, args.event_batch, args.memory_log_chunk, cache);
    }
    tls::install_crypto_provider();
    let tmp = tempfile::tempdir()?;
    let pki = TestPki::new(&tmp.path().join("pki"));
    let mut rows: Vec<Row> = Vec::new();
    println!("gov-exchange benchmark: {} s per phase, {} cores", args.seconds, num_cpus());
    if args.only.is_none_or(|s| s == Section::Catalog) {
        catalog_section(&args, &pki, tmp.path(), &mut rows).await?;
    }
    if args.only.is_none_or(|s| s == Section::Relay) {
        relay_section(&args, &pki, tmp.path(), &mut rows).await?;
    }
    if args.only == Some(Section::RelaySteps) {
        relay_steps_section(&args, &pki, tmp.path(), &mut rows).await?;
    }
    if let Some(section @ (Section::Events | Section::Sync | Section::Backlog)) = args.only {
        let options = events_bench::Options {
            events: args.events,
            batch: args.event_batch,
            publishers: args.publishers,
            sync_records: args.sync_records,
            backlog_events: args.backlog_events,
            ack_every: Duration::from_millis(args.ack_every_ms),
        };
        let figures = match section {
            Section::Events => events_bench::events(&pki, tmp.path(), &options).await?,
            Section::Sync => events_bench::sync(&pki, tmp.path(), &options).await?,
            _ => events_bench::backlog(&pki, tmp.path(), &options).await?,
        };
        rows.extend(figures.into_iter().map(Row::from));
    }
    if args.only == Some(Section::DirectoryHa) {
        let postgres = e2e_tests::postgres::TestPostgres::start_private_durable();
        let options = e2e_tests::ha_bench::Options {
            entries: args.entries,
            batch: args.batch,
            seconds: args.seconds,
            concurrency: args.concurrency,
            postgres: &postgres,
        };
        rows.extend(e2e_tests::ha_bench::directory_ha(&pki, tmp.path(), &options).await?.into_iter().map(Row::from));
    }
    if args.only == Some(Section::Ops) {
        let figures = ops_bench::ops(&pki, tmp.path(), &ops_bench::Options { records: args.ops_records }).await?;
        rows.extend(figures.into_iter().map(Row::from));
    }

    println!("\n| figure | measured | baseline (same run) | ratio | target |\n|---|---|---|---|---|");
    for r in rows {
        println!("| {} | {} | {} | {} | {} |", r.figure, r.value, r.baseline, r.ratio, r.target);
    }
    Ok(())
}

/// Echo baseline, publish, search and restart of the directory's catalog.
async fn catalog_section(args: &Args, pki: &TestPki, tmp: &std::path::Path, rows: &mut Vec<Row>) -> anyhow::Result<()> {
    let dir_paths = pki.issue("central", Role::Directory, "directory");
    let reader = pki.identity("central", Role::Operator, "bench-reader");
    let phase = Duration::from_secs(args.seconds);
    println!("catalog: {} entries", args.entries);

    // Baseline: a bare mTLS echo of 300 bytes on the same TLS stack.
    let echo_listener = TcpListener::bind("127.0.0.1:0").await?;
    let echo_addr = echo_listener.local_addr()?.to_string();
    let echo_id = TlsIdentity::load(&dir_paths)?;
    let (echo_stop, echo_stopped) = oneshot::channel::<()>();
    let echo_task = tokio::spawn(async move {
        e2e_tests::echo::run_echo(echo_listener, &echo_id, async { let _ = echo_stopped.await; }).await
    });
    let echo_channels = channels(&echo_addr, &reader, args.connections).await?;
    let echo_clients: Arc<Vec<EchoClient<Channel>>> =
        Arc::new(echo_channels.iter().cloned().map(EchoClient::new).collect());
    let payload = vec![7u8; 300];
    let echo_call = {
        let clients = echo_clients.clone();
        move |i: u64| {
            let mut c = clients[i as usize % clients.len()].clone();
            let payload = payload.clone();
            async move { c.echo(EchoMessage { payload }).await.map(|_| ()) }
        }
    };
    let _ = load::run(8, 2_000, phase, echo_call.clone()).await; // warm-up
    let echo_heavy = load::run(args.concurrency, u64::MAX, phase, echo_call.clone()).await;
    let echo_light = load::run(args.light_concurrency, u64::MAX, phase, echo_call.clone()).await;
    println!("echo baseline: {:.0}/s at {} in flight; p50 {} p99 {} at {} in flight",
        echo_heavy.per_second(), args.concurrency, ms(echo_light.percentile(50.0)), ms(echo_light.percentile(99.0)), args.light_concurrency);

    // Publish: five departments in parallel, each in batches, each with its own operator certificate.
    let depts = workload::DEPARTMENTS.len();
    let per_dept = args.entries / depts;
    let mut dept_batches: Vec<Vec<Vec<exchange_proto::v1::CatalogEntry>>> = Vec::new();
    for d in 0..depts {
        let all = workload::entries(d, 0, per_dept, 42);
        dept_batches.push(all.chunks(args.batch).map(|c| c.to_vec()).collect());
    }
    let total_entries = per_dept * depts;
    let sled_rate = sled_baseline(&tmp.join("sled-baseline"), &dept_batches.concat())?;
    let in_process = index_only_search(&dept_batches, phase)?;

    let data_dir = tmp.join("directory");
    let config = directory::config::Config::new("127.0.0.1:0", &data_dir, dir_paths.clone());
    let (running, _) = start_directory(config.clone()).await?;
    let started = Instant::now();
    let mut publishers = Vec::new();
    for (d, batches) in dept_batches.into_iter().enumerate() {
        let (dept, _) = workload::DEPARTMENTS[d];
        let id = pki.identity(dept, Role::Operator, &format!("{dept}-bench-operator"));
        let chs = channels(&running.addr, &id, 1).await?;
        let mut client = directory_clients(&chs).remove(0);
        publishers.push(tokio::spawn(async move {
            for batch in batches {
                client.publish_entries(PublishEntriesRequest { entries: batch }).await?;
            }
            Ok::<_, tonic::Status>(())
        }));
    }
    for p in publishers {
        p.await??;
    }
    let publish_time = started.elapsed();
    let publish_rate = total_entries as f64 / publish_time.as_secs_f64();
    println!("published {total_entries} entries in {:.2} s", publish_time.as_secs_f64());
    rows.push(rate_row(
        &format!("publish ({}-entry batches, durable)", args.batch),
        publish_rate,
        "entries/s",
        "raw sled batch+flush",
        sled_rate,
        "≥ 10,000 entries/s",
    ));

    // Search at full size, once the index has merged the segments the publish batches left (the
    // directory merges in the background; a catalog is searched far more than it is bulk-loaded).
    tokio::time::sleep(Duration::from_secs(3)).await;
    let search_channels = channels(&running.addr, &reader, args.connections).await?;
    let search_clients = Arc::new(directory_clients(&search_channels));
    let queries = Arc::new(workload::queries());
    let search_call = {
        let clients = search_clients.clone();
        let queries = queries.clone();
        move |i: u64| {
            let mut c = clients[i as usize % clients.len()].clone();
            let req = search_request(i, &queries);
            async move {
                let resp = c.search_catalog(req).await?.into_inner();
                if resp.total_hits > 0 && resp.hits.is_empty() {
                    return Err(tonic::Status::internal("hits missing"));
                }
                Ok::<_, tonic::Status>(())
            }
        }
    };
    let _ = load::run(8, 2_000, phase, search_call.clone()).await; // warm-up
    let search_heavy = load::run(args.concurrency, u64::MAX, phase, search_call.clone()).await;
    let search_light = load::run(args.light_concurrency, u64::MAX, phase, search_call.clone()).await;
    println!("search: {:.0}/s at {} in flight ({} errors); p50 {} p99 {} at {} in flight",
        search_heavy.per_second(), args.concurrency, search_heavy.errors,
        ms(search_light.percentile(50.0)), ms(search_light.percentile(99.0)), args.light_concurrency);
    rows.push(rate_row(
        &format!("search throughput at {total_entries} entries ({} in flight)", args.concurrency),
        search_heavy.per_second(),
        "searches/s",
        "echo",
        echo_heavy.per_second(),
        "≥ 2,000 searches/s",
    ));
    rows.push(latency_row(&format!("search latency ({} in flight)", args.light_concurrency), &search_light, &echo_light, 50.0, ""));
    rows.push(latency_row(&format!("search latency ({} in flight)", args.light_concurrency), &search_light, &echo_light, 99.0, "≤ 10 ms"));
    rows.push(latency_row(&format!("search latency ({} in flight)", args.concurrency), &search_heavy, &echo_heavy, 99.0, "(saturated)"));

    rows.push(Row {
        figure: "search, index only (in process, 1 thread): p50 / p99".into(),
        value: format!("{} / {}", ms(in_process.percentile(50.0)), ms(in_process.percentile(99.0))),
        baseline: format!("{:.0} searches/s on one core", in_process.per_second()),
        ratio: String::new(),
        target: String::new(),
    });

    // Restart: stop, reopen the same store, time until the first search answers with every entry.
    drop(search_clients);
    drop(search_channels);
    running.shutdown().await?;
    let restart_started = Instant::now();
    let (running, load_time) = start_directory(config).await?;
    let mut client = directory_clients(&channels(&running.addr, &reader, 1).await?).remove(0);
    let all = client.search_catalog(SearchCatalogRequest::default()).await?.into_inner();
    let ready = restart_started.elapsed();
    anyhow::ensure!(all.total_hits as usize == total_entries, "after restart {} of {total_entries} entries", all.total_hits);
    rows.push(Row {
        figure: format!("restart with {total_entries} entries until first full search"),
        value: format!("{:.2} s", ready.as_secs_f64()),
        baseline: format!("store open + index rebuild {:.2} s", load_time.as_secs_f64()),
        ratio: String::new(),
        target: "≤ 5 s".into(),
    });
    running.shutdown().await?;
    let _ = echo_stop.send(());
    let _ = echo_task.await;
    Ok(())
}

fn num_cpus() -> usize {
    std::thread::available_parallelism().map(|n| n.get()).unwrap_or(1)
}

// ---------------------------------------------------------------------------------------------------
// Record relay (issue 3)

/// The unconditional resource of the commerce sample catalog the relay section reads (企业登记信息).
const RELAY_RESOURCE: &str = "101001/000001";
const RELAY_PURPOSE: &str = "企业信用核查";

/// Record `i` of a run: a pseudo-random key index (splitmix64), the same sequence for both systems.
/// Clients of a bare forwarder and the keys to ask for: call `i` asks for one key, clients round-robin.
#[derive(Clone)]
struct ForwarderLoad {
    clients: Arc<Vec<BenchRecordsClient<Channel>>>,
    keys: Arc<Vec<String>>,
}

impl ForwarderLoad {
    async fn connect(addr: &str, id: &TlsIdentity, connections: usize, keys: Arc<Vec<String>>) -> anyhow::Result<Self> {
        let channels = channels_to(addr, id, &[Role::Node], connections).await?;
        Ok(ForwarderLoad { clients: Arc::new(channels.into_iter().map(forwarder::client_on).collect()), keys })
    }

    fn call(&self, i: u64) -> impl std::future::Future<Output = Result<(), tonic::Status>> + Send + 'static {
        let mut c = self.clients[i as usize % self.clients.len()].clone();
        let key = self.keys[key_index(i, self.keys.len())].clone();
        async move {
            let resp = c.query_records(one_key_query(&key)).await?.into_inner();
            check_answer(&resp, &key)
        }
    }
}

fn key_index(i: u64, n: usize) -> usize {
    let mut z = i.wrapping_add(0x9E37_79B9_7F4A_7C15);
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    ((z ^ (z >> 31)) % n as u64) as usize
}

fn one_key_query(key: &str) -> QueryRecordsRequest {
    QueryRecordsRequest { resource_code: RELAY_RESOURCE.into(), keys: vec![key.to_string()], purpose: RELAY_PURPOSE.into() }
}

fn check_answer(resp: &QueryRecordsResponse, key: &str) -> Result<(), tonic::Status> {
    match resp.records.first() {
        Some(r) if resp.records.len() == 1 && r.key == key && !r.items.is_empty() => Ok(()),
        _ => Err(tonic::Status::internal(format!("unexpected answer for {key}: {} records", resp.records.len()))),
    }
}

fn open_loop_line(name: &str, o: &OpenLoopStats) -> String {
    format!(
        "{name}: {:.0}/s offered (open loop), {} of {} answered, {} errors, {} not sent (overload); p50 {} p99 {} p99.9 {} max {}",
        o.rate,
        o.stats.calls,
        o.scheduled,
        o.stats.errors,
        o.dropped,
        ms(o.stats.percentile(50.0)),
        ms(o.stats.percentile(99.0)),
        ms(o.stats.percentile(99.9)),
        ms(o.stats.latencies.last().copied().unwrap_or_default()),
    )
}

/// The record relay: application → tax's node → commerce's node (authorization, disclosure, audit on
/// both) → record store → back, against a bare two-hop mTLS forwarder answering the same records from a
/// `HashMap`; closed-loop throughput at `concurrency` in flight, then open-loop latency at half of each
/// system's own peak.
async fn relay_section(args: &Args, pki: &TestPki, tmp: &std::path::Path, rows: &mut Vec<Row>) -> anyhow::Result<()> {
    let phase = Duration::from_secs(args.seconds);
    let warm_up = Duration::from_secs(2.min(args.seconds));
    println!("relay: {} records of {RELAY_RESOURCE} at commerce, queried by tax, one random key per call", args.records);

    let entry = client_sdk::catalog::CatalogFile::load_entries(&federation::sample_catalog("commerce"))?
        .into_iter()
        .find(|e| e.resource_code == RELAY_RESOURCE)
        .expect("the sample catalog has the resource");

    // ---- the real federation: directory, commerce (provider), tax (consumer) ----
    let setup = Instant::now();
    let directory = federation::start_directory(pki, &tmp.join("relay-directory")).await?;
    let commerce = federation::start_node(
        pki,
        "commerce",
        &directory.addr,
        &tmp.join("relay-commerce"),
        Some(federation::sample_catalog("commerce")),
    )
    .await?;
    let tax =
        federation::start_node(pki, "tax", &directory.addr, &tmp.join("relay-tax"), Some(federation::sample_catalog("tax")))
            .await?;
    events_bench::wait_ready(pki, &directory.addr).await?;
    let ready = setup.elapsed();

    // ---- load the records through commerce's node (validated, durable per batch) ----
    let records = federation::enterprise_records(args.records, 2026);
    let commerce_app = pki.identity("commerce", Role::App, "commerce-app");
    let mut loader = client_sdk::client::node_client(&commerce.addr, &commerce_app)?;
    let load_started = Instant::now();
    for (b, batch) in records.chunks(1_000).enumerate() {
        let req = PutRecordsRequest { resource_code: RELAY_RESOURCE.into(), records: batch.to_vec(), ..Default::default() };
        if b == 0 {
            // The node may not hold its own catalog entry yet; it asks the directory, which may lag.
            federation::wait_for("commerce's node to accept records", Duration::from_secs(30), || {
                let (mut l, req) = (loader.clone(), req.clone());
                async move {
                    match l.put_records(req).await {
                        Ok(_) => Some(()),
                        Err(e) if e.code() == tonic::Code::InvalidArgument => panic!("records refused: {e:?}"),
                        Err(_) => None,
                    }
                }
            })
            .await?;
        } else {
            loader.put_records(req).await?;
        }
    }
    let load_time = load_started.elapsed();
    println!(
        "federation ready in {:.2} s; {} records loaded in {:.2} s ({:.0} records/s, 1,000 per durable batch)",
        ready.as_secs_f64(),
        records.len(),
        load_time.as_secs_f64(),
        records.len() as f64 / load_time.as_secs_f64()
    );

    // ---- the baseline: forwarder → backend with the same records, as the provider stores them ----
    let stored = federation::as_stored(&records, now_unix_ms());
    // The entry's data items in catalog order, as the provider's node lists them for an unconditional
    // resource.
    let data_items: Vec<String> = entry.data_items.iter().map(|d| d.name.clone()).collect();
    let pair = ForwarderPair::start(
        pki.identity("commerce", Role::Node, "bench-backend-commerce"),
        pki.identity("tax", Role::Node, "bench-forwarder-tax"),
        Backend::new(stored, "commerce", data_items),
    )
    .await?;

    // ---- clients: the same application certificate, the same number of connections, for both ----
    let tax_app = pki.identity("tax", Role::App, "tax-app");
    let keys: Arc<Vec<String>> = Arc::new(records.iter().map(|r| r.key.clone()).collect());
    let relay_clients: Arc<Vec<ExchangeNodeClient<Channel>>> = Arc::new(
        channels_to(&tax.addr, &tax_app, &[Role::Node], args.connections)
            .await?
            .into_iter()
            .map(|c| {
                ExchangeNodeClient::new(c)
                    .max_decoding_message_size(exchange_proto::limits::MAX_MESSAGE_BYTES)
                    .max_encoding_message_size(exchange_proto::limits::MAX_MESSAGE_BYTES)
            })
            .collect(),
    );
    let forwarder_load = ForwarderLoad::connect(&pair.addr, &tax_app, args.connections, keys.clone()).await?;
    let relay_call = {
        let (clients, keys) = (relay_clients.clone(), keys.clone());
        move |i: u64| {
            let mut c = clients[i as usize % clients.len()].clone();
            let key = keys[key_index(i, keys.len())].clone();
            async move {
                let resp = c.query_records(one_key_query(&key)).await?.into_inner();
                check_answer(&resp, &key)
            }
        }
    };
    let forwarder_call = {
        let load = forwarder_load.clone();
        move |i: u64| load.call(i)
    };

    // The relay works end to end (the consumer resolves the provider through the directory on first use).
    let first = federation::wait_for("the first relayed answer", Duration::from_secs(30), || {
        let mut c = relay_clients[0].clone();
        let key = keys[0].clone();
        async move { c.query_records(one_key_query(&key)).await.ok().map(|r| r.into_inner()) }
    })
    .await?;
    let mut f = forwarder_load.clients[0].clone();
    let base = f.query_records(one_key_query(&keys[0])).await?.into_inner();
    check_answer(&first, &keys[0]).map_err(|e| anyhow::anyhow!("{e:?}"))?;
    check_answer(&base, &keys[0]).map_err(|e| anyhow::anyhow!("{e:?}"))?;
    anyhow::ensure!(
        first.records[0].items == base.records[0].items && first.data_items == base.data_items,
        "the forwarder's backend answers differently from the relay"
    );
    use prost::Message as _;
    println!(
        "answer sizes: relay {} B, forwarder {} B (request {} B)",
        first.encoded_len(),
        base.encoded_len(),
        one_key_query(&keys[0]).encoded_len()
    );

    // ---- throughput, closed loop; the two systems alternate so drift on the machine hits both ----
    // CPU per query: the whole process (load generator and servers alike) over the phase.
    let cpu_per_call = |before: Option<Duration>, s: &LoadStats| match (before, load::process_cpu_time()) {
        (Some(b), Some(a)) if s.calls > 0 => Some((a - b) / s.calls as u32),
        _ => None,
    };
    let us = |d: Option<Duration>| d.map_or("?".to_string(), |d| format!("{:.0} µs", d.as_secs_f64() * 1e6));
    let others = |m: &load::OthersMeter| m.others_share().map_or("?".into(), |s| format!("{:.0}%", s * 100.0));
    let section = load::OthersMeter::start();
    let _ = load::run(8, u64::MAX, warm_up, forwarder_call.clone()).await;
    let (cpu, meter) = (load::process_cpu_time(), load::OthersMeter::start());
    let fwd_heavy = load::run(args.concurrency, u64::MAX, phase, forwarder_call.clone()).await;
    let fwd_cpu = cpu_per_call(cpu, &fwd_heavy);
    println!("forwarder: {:.0}/s at {} in flight ({} errors), {} CPU per query; other processes used {} of the machine",
        fwd_heavy.per_second(), args.concurrency, fwd_heavy.errors, us(fwd_cpu), others(&meter));
    let _ = load::run(8, u64::MAX, warm_up, relay_call.clone()).await;
    let (cpu, meter) = (load::process_cpu_time(), load::OthersMeter::start());
    let relay_heavy = load::run(args.concurrency, u64::MAX, phase, relay_call.clone()).await;
    let relay_cpu = cpu_per_call(cpu, &relay_heavy);
    println!("relay: {:.0}/s at {} in flight ({} errors), {} CPU per query; other processes used {} of the machine",
        relay_heavy.per_second(), args.concurrency, relay_heavy.errors, us(relay_cpu), others(&meter));

    // ---- latency, open loop at half of each system's own peak ----
    let fwd_rate = (fwd_heavy.per_second() / 2.0).max(1.0);
    let relay_rate = (relay_heavy.per_second() / 2.0).max(1.0);
    let max_outstanding = 4 * args.concurrency.max(64);
    let meter = load::OthersMeter::start();
    let fwd_open = load::run_open(fwd_rate, phase, max_outstanding, forwarder_call.clone()).await;
    println!("{}; other processes used {} of the machine", open_loop_line("forwarder", &fwd_open), others(&meter));
    let meter = load::OthersMeter::start();
    let relay_open = load::run_open(relay_rate, phase, max_outstanding, relay_call.clone()).await;
    println!("{}; other processes used {} of the machine", open_loop_line("relay", &relay_open), others(&meter));
    let others_share = section.others_share();
    for (name, o) in [("forwarder", &fwd_open), ("relay", &relay_open)] {
        let slow = o.slow_periods(Duration::from_millis(100), Duration::from_millis(5));
        let calls: usize = slow.iter().map(|p| p.1).sum();
        let list: Vec<String> = slow
            .iter()
            .take(15)
            .map(|(at, n, max)| format!("{:.1}s:{n}/{}", at.as_secs_f64(), ms(*max)))
            .collect();
        println!("{name}: {calls} calls over 5 ms, in {} periods of 100 ms (start:calls/slowest): {}", slow.len(), list.join(" "));
    }

    rows.push(rate_row(
        &format!("relay throughput, 1 key per query ({} in flight, {} connections)", args.concurrency, args.connections),
        relay_heavy.per_second(),
        "queries/s",
        "forwarder",
        fwd_heavy.per_second(),
        "≥ 60% of forwarder",
    ));
    for (p, target) in [(50.0, ""), (99.0, "≤ 5 ms"), (99.9, "")] {
        let (v, b) = (relay_open.stats.percentile(p), fwd_open.stats.percentile(p));
        rows.push(Row {
            figure: format!("relay latency p{p} at half its peak ({:.0}/s, open loop)", relay_open.rate),
            value: ms(v),
            baseline: format!("forwarder {} at {:.0}/s", ms(b), fwd_open.rate),
            ratio: format!("{:.2}×", v.as_secs_f64() / b.as_secs_f64().max(1e-9)),
            target: target.into(),
        });
    }
    if let (Some(r), Some(f)) = (relay_cpu, fwd_cpu) {
        rows.push(Row {
            figure: "CPU per query, whole process (client + servers), at 32 in flight".into(),
            value: us(relay_cpu),
            baseline: format!("forwarder {}", us(fwd_cpu)),
            ratio: format!("{:.2}×", r.as_secs_f64() / f.as_secs_f64().max(1e-9)),
            target: String::new(),
        });
    }
    rows.push(Row {
        figure: "(noise) other processes' share of the 2 cores during the relay measurements".into(),
        value: others_share.map_or("?".into(), |s| format!("{:.0}%", s * 100.0)),
        baseline: String::new(),
        ratio: String::new(),
        target: "0% on a quiet machine".into(),
    });
    for (name, o) in [("relay", &relay_open), ("forwarder", &fwd_open)] {
        if o.stats.errors > 0 || o.dropped > 0 {
            println!("warning: {name} open loop had {} errors and {} calls not sent", o.stats.errors, o.dropped);
        }
    }

    drop(relay_clients);
    drop(forwarder_load);
    pair.shutdown().await?;
    tax.stop().await?;
    commerce.stop().await?;
    directory.stop().await?;

    // Where a relayed query's time goes: the node's per-call steps one by one, on the same records.
    let stored = federation::as_stored(&records, now_unix_ms());
    let cert = pki.issue("tax", Role::App, "tax-app").cert;
    let parts = e2e_tests::relay_parts::measure(&tmp.join("relay-parts"), &entry, &stored, &cert).await?;
    println!("\nper-call steps of the relay, timed one by one in process (mean per call):");
    for p in parts {
        let max = p.max.map(|m| format!(" (max {})", ms(m))).unwrap_or_default();
        println!("  {:<70} {:>9.1} µs{max}", p.name, p.per_call.as_secs_f64() * 1e6);
    }
    Ok(())
}

fn now_unix_ms() -> i64 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map(|d| d.as_millis() as i64).unwrap_or(0)
}

/// The relay's per-call steps added one at a time to the bare forwarder, each variant measured like the
/// relay section measures (closed loop at `concurrency` in flight, CPU per query; then open loop at
/// `--steps-rate`), so each step's end-to-end cost shows on its own.
async fn relay_steps_section(args: &Args, pki: &TestPki, tmp: &std::path::Path, rows: &mut Vec<Row>) -> anyhow::Result<()> {
    let phase = Duration::from_secs(args.seconds);
    let warm_up = Duration::from_secs(1.min(args.seconds));
    let entry = client_sdk::catalog::CatalogFile::load_entries(&federation::sample_catalog("commerce"))?
        .into_iter()
        .find(|e| e.resource_code == RELAY_RESOURCE)
        .expect("the sample catalog has the resource");
    let data_items: Vec<String> = entry.data_items.iter().map(|d| d.name.clone()).collect();
    let records = federation::enterprise_records(args.records, 2026);
    let keys: Arc<Vec<String>> = Arc::new(records.iter().map(|r| r.key.clone()).collect());
    let tax_app = pki.identity("tax", Role::App, "tax-app");
    let variants = [
        Steps::default(),
        Steps { identity: true, ..Default::default() },
        Steps { audit: true, ..Default::default() },
        Steps { sled: true, ..Default::default() },
        Steps { sled: true, blocking: true, ..Default::default() },
        Steps { identity: true, audit: true, sled: true, blocking: true },
    ];
    println!("relay steps: each added alone to the bare forwarder, then all together; {} s closed loop at {} in flight, {} s open loop at {}/s",
        args.seconds, args.concurrency, args.seconds, args.steps_rate);
    let mut bare: Option<(f64, Duration)> = None;
    for (n, steps) in variants.into_iter().enumerate() {
        let dir = tmp.join(format!("steps-{n}"));
        std::fs::create_dir_all(&dir)?;
        let backend = Backend::new(federation::as_stored(&records, now_unix_ms()), "commerce", data_items.clone())
            .with_steps(steps, &dir, RELAY_RESOURCE)?;
        let pair = ForwarderPair::start_with(
            pki.identity("commerce", Role::Node, "bench-backend-commerce"),
            pki.identity("tax", Role::Node, "bench-forwarder-tax"),
            backend,
            steps,
            Some(&dir),
        )
        .await?;
        let load = ForwarderLoad::connect(&pair.addr, &tax_app, args.connections, keys.clone()).await?;
        let call = {
            let load = load.clone();
            move |i: u64| load.call(i)
        };
        let _ = load::run(8, u64::MAX, warm_up, call.clone()).await;
        let (cpu, meter) = (load::process_cpu_time(), load::OthersMeter::start());
        let heavy = load::run(args.concurrency, u64::MAX, phase, call.clone()).await;
        let cpu = match (cpu, load::process_cpu_time()) {
            (Some(b), Some(a)) if heavy.calls > 0 => (a - b) / heavy.calls as u32,
            _ => Duration::ZERO,
        };
        let open = load::run_open(args.steps_rate, phase, 4 * args.concurrency.max(64), call.clone()).await;
        println!(
            "{:<70} {:>6.0}/s, {:>4.0} µs CPU per query; at {:.0}/s: p50 {} p99 {} p99.9 {} ({} errors, {} not sent; others used {:.0}%)",
            steps.describe(),
            heavy.per_second(),
            cpu.as_secs_f64() * 1e6,
            open.rate,
            ms(open.stats.percentile(50.0)),
            ms(open.stats.percentile(99.0)),
            ms(open.stats.percentile(99.9)),
            heavy.errors + open.stats.errors,
            open.dropped,
            meter.others_share().unwrap_or(f64::NAN) * 100.0,
        );
        let (base_rate, base_cpu) = *bare.get_or_insert((heavy.per_second(), cpu));
        rows.push(Row {
            figure: steps.describe(),
            value: format!("{:.0}/s, {:.0} µs CPU/query", heavy.per_second(), cpu.as_secs_f64() * 1e6),
            baseline: format!("bare {:.0}/s, {:.0} µs", base_rate, base_cpu.as_secs_f64() * 1e6),
            ratio: format!("{:.0}%, +{:.0} µs", 100.0 * heavy.per_second() / base_rate.max(1e-9),
                (cpu.as_secs_f64() - base_cpu.as_secs_f64()) * 1e6),
            target: format!("p99 {} at {:.0}/s", ms(open.stats.percentile(99.0)), open.rate),
        });
        drop(load);
        pair.shutdown().await?;
    }
    Ok(())
}
