//! The benchmark harness. Every figure is printed next to a baseline measured in the same run on the same
//! machine, because ratios hold on a noisy 2-core box and absolute times do not.
//!
//! ```sh
//! cargo run --release -p e2e-tests --bin bench                 # full run (100,000 entries)
//! cargo run --release -p e2e-tests --bin bench -- --entries 20000 --seconds 3
//! ```
//!
//! Everything runs in this process over real mutual TLS on 127.0.0.1 (client and servers share the cores,
//! as they would on a single test box), with sled in a temporary directory.

use std::sync::Arc;

// The same allocator the server binaries use, so in-process figures match what they would see.
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;
use std::time::{Duration, Instant};

use clap::Parser;
use client_sdk::identity::Role;
use client_sdk::tls::{self, TlsIdentity};
use e2e_tests::load::{self, LoadStats};
use e2e_tests::pki::TestPki;
use e2e_tests::workload;
use exchange_proto::v1::directory_client::DirectoryClient;
use exchange_proto::v1::echo_client::EchoClient;
use exchange_proto::v1::{EchoMessage, PublishEntriesRequest, SearchCatalogRequest, ShareType};
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
}

struct Row {
    figure: String,
    value: String,
    baseline: String,
    ratio: String,
    target: String,
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
    let config = tls::client_config(id, &[Role::Directory])?;
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
    tls::install_crypto_provider();
    let tmp = tempfile::tempdir()?;
    let pki = TestPki::new(&tmp.path().join("pki"));
    let dir_paths = pki.issue("central", Role::Directory, "directory");
    let reader = pki.identity("central", Role::Operator, "bench-reader");
    let phase = Duration::from_secs(args.seconds);
    let mut rows: Vec<Row> = Vec::new();
    println!("gov-exchange benchmark: {} entries, {} s per phase, {} cores", args.entries, args.seconds, num_cpus());

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
    let sled_rate = sled_baseline(&tmp.path().join("sled-baseline"), &dept_batches.concat())?;
    let in_process = index_only_search(&dept_batches, phase)?;

    let data_dir = tmp.path().join("directory");
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

    println!("\n| figure | measured | baseline (same run) | ratio | target |\n|---|---|---|---|---|");
    for r in rows {
        println!("| {} | {} | {} | {} | {} |", r.figure, r.value, r.baseline, r.ratio, r.target);
    }
    Ok(())
}

fn num_cpus() -> usize {
    std::thread::available_parallelism().map(|n| n.get()).unwrap_or(1)
}
