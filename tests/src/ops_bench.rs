//! Operations under load (issue 5), driven by `bench --only ops`: what backups, metrics and scrapes cost a
//! running node, each next to a baseline measured in the same run.
//!
//! One federation in this process (directory, commerce's and tax's nodes, default configuration, real
//! mutual TLS on 127.0.0.1, sled in temporary folders), `--ops-records` enterprise records loaded into
//! commerce. Then:
//!
//! - **relay baseline**: tax's application queries commerce's records through both nodes, one key per
//!   query, a few thousand queries back to back: the mean latency of a relayed request.
//! - **metrics cost**: `Metrics::relay` + `Metrics::grpc_call` (what each node records for each relayed
//!   request) called 1,000,000 times over 50 peer/resource label sets on a fresh registry, on one thread
//!   and on two at once; a relayed request pays that pair twice (consumer and provider node).
//! - **scrape**: peer departments' nodes (certificates made here) query commerce's resources over the
//!   node-to-node `Relay` service until commerce's registry holds about 2,000 label sets; then
//!   `GET /metrics` against `GET /healthz` on the same admin port (each a fresh HTTPS connection).
//! - **backup**: `GET /api/backup` on commerce's admin port, once quiet and twice while an application
//!   keeps writing one record per `PutRecords`; the writer pause is the node's own `writes_paused_ms`
//!   (caught from its "backup written" log event) and, seen from outside, the writes' latency. After the
//!   nodes stop, the **baseline**: a raw scan of commerce's sled database (every tree, every key and value);
//!   then the quiet backup restored into a new folder (`client_sdk::backup::restore_into`).

use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use client_sdk::admin::client::{AdminAuth, AdminClient};
use client_sdk::admin::metrics::{Direction, GaugeText, Metrics};
use client_sdk::backup::{restore_into, RestoreOptions, ServerKind};
use client_sdk::identity::Role;
use client_sdk::tls;
use exchange_node::records::sled::SledRecordStore;
use exchange_node::records::RecordStore;
use exchange_proto::v1::exchange_node_client::ExchangeNodeClient;
use exchange_proto::v1::relay_client::RelayClient;
use exchange_proto::v1::{FetchRecordsRequest, PutRecordsRequest, QueryRecordsRequest, Record};
use tonic::transport::Channel;
use tracing_subscriber::layer::{Context, SubscriberExt};
use tracing_subscriber::Layer;

use crate::events_bench::{self, Figure};
use crate::federation;
use crate::load::{self, OthersMeter};
use crate::pki::TestPki;

/// Commerce's 企业登记信息 (unconditional): the records every part of the section reads and writes.
const RESOURCE: &str = "101001/000001";
const PURPOSE: &str = "企业信用核查";
/// Resources of commerce's sample catalog a peer department asks for: the loaded one (answered) and the
/// conditional and unshared ones (refused without a grant). Each keeps its own label, as real traffic does.
const PEER_RESOURCES: &[&str] = &[RESOURCE, "302001/000001", "302001/000002", "302001/000003"];
/// Label sets commerce's registry should hold when it is scraped.
const TARGET_LABEL_SETS: usize = 2_000;
/// Relayed queries timed for the baseline (after a warm-up of a tenth as many).
const RELAY_QUERIES: usize = 3_000;
/// Calls of the metrics pair timed.
const METRICS_CALLS: usize = 1_000_000;
/// Peer departments × resources in the metrics micro-benchmark: 10 × 5 = 50 label sets.
const METRICS_PEERS: usize = 10;
const METRICS_RESOURCES: usize = 5;
/// Each of `/healthz` and `/metrics`, alternating.
const SCRAPES: usize = 100;
/// Loaded records the writer updates during the backups, in turn.
const PROBE_KEYS: usize = 5_000;
/// The writer's pace: slow enough to leave the store the size that was loaded (about 200 updates a
/// second), fast enough that a write lands in every pause.
const PROBE_EVERY: Duration = Duration::from_millis(5);
/// Backups taken while the writer runs (one more is taken quiet first).
const BACKUPS_UNDER_WRITES: usize = 2;

/// What the section is asked to do.
#[derive(Clone, Debug)]
pub struct Options {
    /// Enterprise records loaded into commerce's node before anything is measured.
    pub records: usize,
}

fn fig(figure: impl Into<String>, value: impl Into<String>, baseline: impl Into<String>, ratio: impl Into<String>, target: impl Into<String>) -> Figure {
    Figure { figure: figure.into(), value: value.into(), baseline: baseline.into(), ratio: ratio.into(), target: target.into() }
}

fn ms(d: Duration) -> String {
    format!("{:.1} ms", d.as_secs_f64() * 1e3)
}

fn secs(d: Duration) -> String {
    format!("{:.2} s", d.as_secs_f64())
}

fn megabytes(bytes: u64) -> String {
    format!("{:.1} MB", bytes as f64 / 1e6)
}

fn times(v: f64, base: f64) -> String {
    format!("{:.2}×", v / base.max(1e-12))
}

fn percentile(sorted: &[Duration], p: f64) -> Duration {
    if sorted.is_empty() {
        return Duration::ZERO;
    }
    sorted[((sorted.len() - 1) as f64 * p / 100.0).round() as usize]
}

fn mean(v: &[Duration]) -> Duration {
    if v.is_empty() {
        return Duration::ZERO;
    }
    v.iter().sum::<Duration>() / v.len() as u32
}

/// The whole `ops` section; returns the rows of the harness's table.
pub async fn ops(pki: &TestPki, tmp: &Path, options: &Options) -> anyhow::Result<Vec<Figure>> {
    anyhow::ensure!(options.records > 0, "--ops-records must be at least 1");
    let pauses = PauseCapture::install();
    let section = OthersMeter::start();
    let mut figures = Vec::new();
    println!("ops: {} records of {RESOURCE} at commerce; backup, metrics and scrape costs", options.records);

    // ---- federation, records ----
    let setup = Instant::now();
    let directory = federation::start_directory(pki, &tmp.join("ops-directory")).await?;
    let commerce_dir = tmp.join("ops-commerce");
    let commerce =
        federation::start_node(pki, "commerce", &directory.addr, &commerce_dir, Some(federation::sample_catalog("commerce")))
            .await?;
    let tax = federation::start_node(pki, "tax", &directory.addr, &tmp.join("ops-tax"), Some(federation::sample_catalog("tax")))
        .await?;
    events_bench::wait_ready(pki, &directory.addr).await?;
    let ready = setup.elapsed();

    let records = federation::enterprise_records(options.records, 2026);
    let commerce_app = pki.identity("commerce", Role::App, "commerce-app");
    let loader = client_sdk::client::node_client(&commerce.addr, &commerce_app)?;
    let load_started = Instant::now();
    load_records(&loader, &records).await?;
    let load_time = load_started.elapsed();
    println!(
        "federation ready in {:.2} s; {} records loaded in {:.2} s ({:.0} records/s)",
        ready.as_secs_f64(),
        records.len(),
        load_time.as_secs_f64(),
        records.len() as f64 / load_time.as_secs_f64()
    );
    let keys: Vec<String> = records.iter().map(|r| r.key.clone()).collect();

    // ---- metrics cost per relayed request, against a relayed request's latency ----
    let tax_app = pki.identity("tax", Role::App, "tax-app");
    let tax_client = client_sdk::client::node_client(&tax.addr, &tax_app)?;
    let meter = OthersMeter::start();
    let cpu_before = load::process_cpu_time();
    let relay = relay_latency(&tax_client, &keys).await?;
    // The whole process (app, both nodes, directory) per query; the warm-up's queries count too.
    let relay_cpu = load::process_cpu_time()
        .zip(cpu_before)
        .map(|(after, before)| (after - before) / (relay.len() + relay.len() / 10) as u32);
    let relay_mean = mean(&relay);
    let mut sorted = relay.clone();
    sorted.sort_unstable();
    println!(
        "relayed query (tax's app → tax → commerce, 1 key, {} back to back): mean {:.0} µs, p50 {:.0} µs, p99 {:.0} µs, CPU {} per query (whole process); others used {}",
        relay.len(),
        relay_mean.as_secs_f64() * 1e6,
        percentile(&sorted, 50.0).as_secs_f64() * 1e6,
        percentile(&sorted, 99.0).as_secs_f64() * 1e6,
        relay_cpu.map_or("?".into(), |c| format!("{:.0} µs", c.as_secs_f64() * 1e6)),
        share(&meter)
    );
    let meter = OthersMeter::start();
    let one_thread = tokio::task::spawn_blocking(|| metrics_pair_cost(METRICS_CALLS, 1)).await?;
    let two_threads = tokio::task::spawn_blocking(|| metrics_pair_cost(METRICS_CALLS, 2)).await?;
    println!(
        "Metrics::relay + grpc_call, {METRICS_CALLS} calls over {} label sets: {:.0} ns per pair on 1 thread, {:.0} ns on 2 threads at once; others used {}",
        METRICS_PEERS * METRICS_RESOURCES,
        one_thread.per_pair.as_secs_f64() * 1e9,
        two_threads.per_pair.as_secs_f64() * 1e9,
        share(&meter)
    );
    println!(
        "  unscraped, the registry kept every histogram sample: process RSS +{} over the {METRICS_CALLS} pairs (1 thread); the first render (it drains them) took {}",
        one_thread.rss_growth_kb.map_or("?".into(), |kb| megabytes(kb * 1024)),
        ms(one_thread.first_render)
    );
    // Both nodes of a relayed request record the pair: the consumer (its app's call, outbound) and the
    // provider (the node's call, inbound).
    for (threads, cost) in [(1, one_thread.per_pair), (2, two_threads.per_pair)] {
        let per_request = 2.0 * cost.as_secs_f64();
        figures.push(fig(
            format!("metrics per relayed request: Metrics::relay + grpc_call, ×2 nodes ({threads} thread{})", if threads == 1 { "" } else { "s at once" }),
            format!("{:.0} ns ({:.0} ns per node)", per_request * 1e9, cost.as_secs_f64() * 1e9),
            format!(
                "relayed query: mean {:.0} µs ({} back to back), CPU {}",
                relay_mean.as_secs_f64() * 1e6,
                relay.len(),
                relay_cpu.map_or("?".into(), |c| format!("{:.0} µs", c.as_secs_f64() * 1e6))
            ),
            format!(
                "{:.1}% of its latency, {} of its CPU",
                100.0 * per_request / relay_mean.as_secs_f64().max(1e-12),
                relay_cpu.map_or("?".into(), |c| format!("{:.1}%", 100.0 * per_request / c.as_secs_f64().max(1e-12)))
            ),
            "",
        ));
    }
    figures.push(fig(
        format!("  registry growth while nobody scrapes: process RSS after {METRICS_CALLS} pairs"),
        one_thread.rss_growth_kb.map_or("?".into(), |kb| format!("+{}", megabytes(kb * 1024))),
        format!("2 histogram samples per pair; first render {}", ms(one_thread.first_render)),
        one_thread.rss_growth_kb.map_or(String::new(), |kb| format!("{:.0} B per pair", kb as f64 * 1024.0 / METRICS_CALLS as f64)),
        "",
    ));

    // ---- scrape of a registry with ~2,000 label sets, against /healthz on the same port ----
    let operator = pki.identity("commerce", Role::Operator, "commerce-operator");
    let admin = AdminClient::connect(
        &commerce.admin_addr,
        AdminAuth { ca: pki.dir.join("ca.crt"), client: Some(operator), token: None },
    )?
    .with_timeout(Duration::from_secs(120));
    let traffic_started = Instant::now();
    let (peers, label_sets) = fill_registry(pki, &commerce.addr, &admin, &keys[0]).await?;
    println!(
        "{peers} peer departments queried {} resources each in {:.1} s: commerce's registry holds {label_sets} label sets",
        PEER_RESOURCES.len(),
        traffic_started.elapsed().as_secs_f64()
    );
    let meter = OthersMeter::start();
    let scrape = scrape_vs_healthz(&admin).await?;
    let spread = |v: &[Duration]| {
        format!(
            "p50 {} p90 {} max {} mean {}",
            ms(percentile(v, 50.0)),
            ms(percentile(v, 90.0)),
            ms(v.last().copied().unwrap_or_default()),
            ms(mean(v))
        )
    };
    println!(
        "GET /metrics ({} B, {} lines): {}\n  GET /healthz right after each: {}\n  GET /healthz alone, back to back: {}\n  others used {}",
        scrape.metrics_bytes,
        scrape.metrics_lines,
        spread(&scrape.metrics),
        spread(&scrape.healthz),
        spread(&scrape.healthz_alone),
        share(&meter)
    );
    let (render_sets, render_bytes, render) = tokio::task::spawn_blocking(move || render_cost(peers)).await?;
    println!(
        "  Metrics::render alone, in process, of a registry of the same shape ({render_sets} label sets, {render_bytes} B): median {}",
        ms(render)
    );
    let (m50, h50) = (percentile(&scrape.metrics, 50.0), percentile(&scrape.healthz, 50.0));
    let alone50 = percentile(&scrape.healthz_alone, 50.0);
    figures.push(fig(
        format!("GET /metrics, {label_sets} label sets ({:.0} kB), p50 of {SCRAPES} (fresh HTTPS connection each)", scrape.metrics_bytes as f64 / 1e3),
        format!("{} (mean {})", ms(m50), ms(mean(&scrape.metrics))),
        format!("GET /healthz {} right after each scrape; {} back to back", ms(h50), ms(alone50)),
        format!("{} · {}", times(m50.as_secs_f64(), h50.as_secs_f64()), times(m50.as_secs_f64(), alone50.as_secs_f64())),
        "",
    ));
    figures.push(fig(
        format!("  of which Metrics::render alone, in process ({render_sets} label sets, same shape)"),
        ms(render),
        format!("GET /metrics {}", ms(m50)),
        format!("{:.0}%", 100.0 * render.as_secs_f64() / m50.as_secs_f64().max(1e-12)),
        "",
    ));

    // ---- backups of the running node ----
    let backups_dir = tmp.join("ops-backups");
    std::fs::create_dir_all(&backups_dir)?;
    let meter = OthersMeter::start();
    let quiet_file = backups_dir.join("quiet.gxbak");
    let started = Instant::now();
    let quiet_bytes = admin.download("/api/backup", &quiet_file).await?;
    let quiet_time = started.elapsed();
    let mut totals = vec![quiet_time];
    let mut windows = Vec::new();
    let writer = ProbeWriter::start(loader.clone(), records[..PROBE_KEYS.min(records.len())].to_vec());
    // Writes before the first backup give the writer's own latency outside backups.
    tokio::time::sleep(Duration::from_secs(1)).await;
    for n in 0..BACKUPS_UNDER_WRITES {
        let file = backups_dir.join(format!("under-writes-{n}.gxbak"));
        let started = Instant::now();
        admin.download("/api/backup", &file).await?;
        windows.push((started, Instant::now()));
        totals.push(started.elapsed());
        std::fs::remove_file(&file)?;
        tokio::time::sleep(Duration::from_secs(1)).await;
    }
    let writes = writer.stop().await?;
    let backup_share = share(&meter);
    let paused = pauses.taken();
    let (during, outside) = writes.split(&windows);
    println!(
        "backups: {} in total ({} quiet, then {} while writing), file {} ; writes paused (node's summary): {}; others used {backup_share}",
        totals.iter().map(|t| secs(*t)).collect::<Vec<_>>().join(", "),
        secs(quiet_time),
        BACKUPS_UNDER_WRITES,
        megabytes(quiet_bytes),
        if paused.is_empty() { "not caught".to_string() } else { paused.iter().map(|p| format!("{p} ms")).collect::<Vec<_>>().join(", ") },
    );
    println!(
        "PutRecords of 1 record every {} ms: {} during the backups (max {}), {} outside (p50 {}, max {}), {} failed",
        PROBE_EVERY.as_millis(),
        during.len(),
        ms(during.last().copied().unwrap_or_default()),
        outside.len(),
        ms(percentile(&outside, 50.0)),
        ms(outside.last().copied().unwrap_or_default()),
        writes.errors
    );
    anyhow::ensure!(writes.errors == 0, "{} writes failed during the backups", writes.errors);

    drop(loader);
    drop(tax_client);
    tax.stop().await?;
    commerce.stop().await?;
    directory.stop().await?;

    // ---- baseline: a raw scan of the same database; then the restore ----
    let db_path = commerce_dir.join(ServerKind::ExchangeNode.db_dir());
    let scan = tokio::task::spawn_blocking(move || raw_scan(&db_path)).await??;
    println!(
        "raw scan of commerce's sled database ({} trees, {} keys, {}): {} then {} (open {})",
        scan.trees,
        scan.keys,
        megabytes(scan.bytes),
        secs(scan.first),
        secs(scan.second),
        secs(scan.open)
    );
    println!(
        "  RecordStore::count over the same database ({} records; the node's scrape runs it for gx_records_stored): {}",
        scan.records,
        ms(scan.records_count)
    );
    let base = scan.first.min(scan.second);
    let base_text = format!("raw scan {} ({} keys, {})", secs(base), scan.keys, megabytes(scan.bytes));
    let restored_dir = tmp.join("ops-restored");
    let restore_file = quiet_file.clone();
    let started = Instant::now();
    let restored = tokio::task::spawn_blocking(move || {
        restore_into(&restore_file, &restored_dir, &RestoreOptions { expect_server: Some(ServerKind::ExchangeNode), force: false })
    })
    .await??;
    let restore_time = started.elapsed();
    println!("restore of the quiet backup ({} keys): {}", restored.backup.keys, secs(restore_time));

    let total_text = |t: &[Duration]| t.iter().map(|t| secs(*t)).collect::<Vec<_>>().join(" · ");
    figures.push(fig(
        format!("  of which (measured after the nodes stop) the scrape's gx_records_stored walk of {} records", scan.records),
        ms(scan.records_count),
        format!("GET /metrics {}", ms(m50)),
        format!("{:.0}%", 100.0 * scan.records_count.as_secs_f64() / m50.as_secs_f64().max(1e-12)),
        "",
    ));
    figures.push(fig(
        format!("backup of the running node, {} records: GET /api/backup until the file is saved (quiet)", options.records),
        secs(quiet_time),
        base_text.clone(),
        times(quiet_time.as_secs_f64(), base.as_secs_f64()),
        "",
    ));
    figures.push(fig(
        format!("  the same while an app updates 1 record per PutRecords every {} ms", PROBE_EVERY.as_millis()),
        total_text(&totals[1..]),
        base_text.clone(),
        totals[1..].iter().map(|t| times(t.as_secs_f64(), base.as_secs_f64())).collect::<Vec<_>>().join(" · "),
        "",
    ));
    figures.push(fig(
        "  writers paused (the node's writes_paused_ms; quiet, then under writes)",
        if paused.is_empty() { "not caught".into() } else { paused.iter().map(|p| format!("{p} ms")).collect::<Vec<_>>().join(" · ") },
        base_text.clone(),
        paused.iter().map(|p| times(*p as f64 / 1e3, base.as_secs_f64())).collect::<Vec<_>>().join(" · "),
        "",
    ));
    figures.push(fig(
        "  a PutRecords issued during a backup: slowest",
        ms(during.last().copied().unwrap_or_default()),
        format!("outside backups p50 {}, max {} ({} writes)", ms(percentile(&outside, 50.0)), ms(outside.last().copied().unwrap_or_default()), outside.len()),
        times(
            during.last().copied().unwrap_or_default().as_secs_f64(),
            percentile(&outside, 50.0).as_secs_f64(),
        ),
        "",
    ));
    figures.push(fig(
        format!("  backup file ({} keys)", restored.backup.keys),
        megabytes(quiet_bytes),
        format!("raw keys + values {}", megabytes(scan.bytes)),
        times(quiet_bytes as f64, scan.bytes as f64),
        "",
    ));
    figures.push(fig(
        "restore of that file into a new folder (verify, import, read back)",
        secs(restore_time),
        base_text,
        times(restore_time.as_secs_f64(), base.as_secs_f64()),
        "",
    ));
    figures.push(fig(
        "(noise) other processes' share of the 2 cores during the section",
        share(&section),
        format!("during the backups {backup_share}"),
        "",
        "0% on a quiet machine",
    ));
    Ok(figures)
}

fn share(meter: &OthersMeter) -> String {
    meter.others_share().map_or("?".into(), |s| format!("{:.0}%", s * 100.0))
}

/// `records` into commerce's node, 1,000 per durable `PutRecords`.
async fn load_records(loader: &ExchangeNodeClient<Channel>, records: &[Record]) -> anyhow::Result<()> {
    for (b, batch) in records.chunks(1_000).enumerate() {
        let req = PutRecordsRequest { resource_code: RESOURCE.into(), records: batch.to_vec(), ..Default::default() };
        if b == 0 {
            // The node may not hold its own catalog entry yet; it asks the directory, which may lag.
            federation::wait_for("commerce's node to accept records", Duration::from_secs(60), || {
                let (mut l, req) = (loader.clone(), req.clone());
                async move {
                    match l.put_records(req).await {
                        Ok(_) => Some(Ok(())),
                        Err(e) if e.code() == tonic::Code::InvalidArgument => Some(Err(e)),
                        Err(_) => None,
                    }
                }
            })
            .await?
            .map_err(|e| anyhow::anyhow!("records refused: {}", e.message()))?;
        } else {
            loader.clone().put_records(req).await?;
        }
    }
    Ok(())
}

fn one_key_query(key: &str) -> QueryRecordsRequest {
    QueryRecordsRequest { resource_code: RESOURCE.into(), keys: vec![key.to_string()], purpose: PURPOSE.into() }
}

/// Latencies of [`RELAY_QUERIES`] relayed queries back to back (a warm-up first), keys spread over the
/// loaded records.
async fn relay_latency(tax: &ExchangeNodeClient<Channel>, keys: &[String]) -> anyhow::Result<Vec<Duration>> {
    // The consumer resolves the provider through the directory on first use.
    federation::wait_for("the first relayed answer", Duration::from_secs(30), || {
        let mut c = tax.clone();
        let req = one_key_query(&keys[0]);
        async move { c.query_records(req).await.ok() }
    })
    .await?;
    let mut c = tax.clone();
    let mut latencies = Vec::with_capacity(RELAY_QUERIES);
    for i in 0..RELAY_QUERIES / 10 + RELAY_QUERIES {
        // A stride coprime with most record counts, so the keys wander over the whole store.
        let key = &keys[(i * 7_919) % keys.len()];
        let started = Instant::now();
        let resp = c.query_records(one_key_query(key)).await?.into_inner();
        let took = started.elapsed();
        anyhow::ensure!(resp.records.len() == 1 && &resp.records[0].key == key, "relayed query for {key}: {} records", resp.records.len());
        if i >= RELAY_QUERIES / 10 {
            latencies.push(took);
        }
    }
    Ok(latencies)
}

struct MetricsCost {
    /// Wall time × threads / pairs.
    per_pair: Duration,
    /// The process's resident memory after the pairs, less before (the registry is not scraped meanwhile).
    rss_growth_kb: Option<u64>,
    /// The first `render` after the pairs.
    first_render: Duration,
}

/// Time per `Metrics::relay` + `Metrics::grpc_call` pair on a fresh registry, `calls` pairs over 50 label
/// sets, split over `threads` threads running at once.
fn metrics_pair_cost(calls: usize, threads: usize) -> MetricsCost {
    let metrics = Metrics::new();
    let departments = ["tax", "quality", "police", "civil-affairs", "social-security", "housing", "health", "education", "transport", "statistics"];
    let resources = ["101001/000001", "101001/000002", "101001/000003", "104001/000001", "104001/000002"];
    let labels: Arc<Vec<(String, String)>> = Arc::new(
        departments[..METRICS_PEERS]
            .iter()
            .flat_map(|d| resources[..METRICS_RESOURCES].iter().map(move |r| (d.to_string(), r.to_string())))
            .collect(),
    );
    // Every label set exists before timing: the figure is the steady state, not first-use registration.
    for (peer, resource) in labels.iter() {
        metrics.relay(Direction::Inbound, peer, resource, tonic::Code::Ok, Duration::from_micros(500));
        metrics.grpc_call("Relay", "FetchRecords", peer, tonic::Code::Ok, Duration::from_micros(500));
    }
    let per_thread = calls / threads;
    let rss_before = rss_kb();
    let started = Instant::now();
    std::thread::scope(|s| {
        for t in 0..threads {
            let (metrics, labels) = (metrics.clone(), labels.clone());
            s.spawn(move || {
                for i in 0..per_thread {
                    let (peer, resource) = &labels[(i + t) % labels.len()];
                    // Latencies spread over the histogram's buckets, as real ones are.
                    let elapsed = Duration::from_micros(200 + (i as u64 * 37) % 20_000);
                    metrics.relay(Direction::Inbound, peer, resource, tonic::Code::Ok, elapsed);
                    metrics.grpc_call("Relay", "FetchRecords", peer, tonic::Code::Ok, elapsed);
                }
            });
        }
    });
    let wall = started.elapsed();
    let rss_growth_kb = rss_kb().zip(rss_before).map(|(after, before)| after.saturating_sub(before));
    let total = metrics.totals().requests as usize;
    assert_eq!(total, labels.len() + per_thread * threads, "every call counted");
    let started = Instant::now();
    let text = metrics.render(&GaugeText::default());
    let first_render = started.elapsed();
    assert!(text.contains("gx_relay_duration_seconds_bucket"), "the histograms are rendered");
    MetricsCost { per_pair: wall * threads as u32 / (per_thread * threads) as u32, rss_growth_kb, first_render }
}

/// This process's resident memory (`VmRSS`), in kB.
fn rss_kb() -> Option<u64> {
    let status = std::fs::read_to_string("/proc/self/status").ok()?;
    let line = status.lines().find(|l| l.starts_with("VmRSS:"))?;
    line.split_whitespace().nth(1)?.parse().ok()
}

/// `Metrics::render` alone, in process, of a registry filled as [`fill_registry`]'s traffic fills
/// commerce's (`peers` departments × [`PEER_RESOURCES`], answered or refused): the scrape's cost without
/// HTTPS and without the node's gauges and readiness checks. Returns the label sets, the bytes and the
/// median of 21 renders.
fn render_cost(peers: usize) -> (usize, usize, Duration) {
    let metrics = Metrics::new();
    for p in 0..peers {
        let peer = format!("peer-{p:04}");
        for resource in PEER_RESOURCES {
            let code = if *resource == RESOURCE { tonic::Code::Ok } else { tonic::Code::PermissionDenied };
            metrics.relay(Direction::Inbound, &peer, resource, code, Duration::from_micros(400));
            metrics.grpc_call("Relay", "FetchRecords", &peer, code, Duration::from_micros(450));
        }
    }
    let mut text = metrics.render(&GaugeText::default());
    let mut times = Vec::new();
    for _ in 0..21 {
        let started = Instant::now();
        text = metrics.render(&GaugeText::default());
        times.push(started.elapsed());
    }
    times.sort_unstable();
    (label_sets(&text), text.len(), times[times.len() / 2])
}

/// Series in a Prometheus exposition: every sample line, a histogram counted once (its `_count`).
fn label_sets(exposition: &str) -> usize {
    exposition
        .lines()
        .filter(|l| !l.is_empty() && !l.starts_with('#'))
        .filter(|l| {
            let name = l.split(['{', ' ']).next().unwrap_or("");
            !name.ends_with("_bucket") && !name.ends_with("_sum")
        })
        .count()
}

/// Nodes of new peer departments query commerce's resources over `Relay.FetchRecords` until commerce's
/// registry holds [`TARGET_LABEL_SETS`]; returns the peers used and the label sets reached.
async fn fill_registry(pki: &TestPki, commerce_addr: &str, admin: &AdminClient, key: &str) -> anyhow::Result<(usize, usize)> {
    const PEERS_PER_ROUND: usize = 10;
    const MAX_PEERS: usize = 1_000;
    let mut peers = 0;
    let mut sets = label_sets(&scrape(admin).await?);
    while sets < TARGET_LABEL_SETS {
        anyhow::ensure!(peers < MAX_PEERS, "{peers} peers gave only {sets} label sets");
        let mut round = Vec::new();
        for _ in 0..PEERS_PER_ROUND {
            let dept = format!("peer-{peers:04}");
            peers += 1;
            let id = pki.identity(&dept, Role::Node, &format!("{dept}-node"));
            let channel = tls::connect(commerce_addr, tls::client_config(&id, &[Role::Node])?).await?;
            let key = key.to_string();
            round.push(tokio::spawn(async move {
                let mut relay = RelayClient::new(channel);
                for (n, resource) in PEER_RESOURCES.iter().enumerate() {
                    let req = FetchRecordsRequest {
                        message_id: format!("{dept}-{n}"),
                        resource_code: resource.to_string(),
                        keys: vec![key.clone()],
                        purpose: PURPOSE.into(),
                    };
                    match (relay.fetch_records(req).await, *resource == RESOURCE) {
                        (Ok(_), true) | (Err(_), false) => {}
                        (Err(e), true) => anyhow::bail!("{dept} could not read {resource}: {e}"),
                        (Ok(_), false) => anyhow::bail!("{dept} was answered for {resource} without a grant"),
                    }
                }
                Ok(())
            }));
        }
        for task in round {
            task.await??;
        }
        sets = label_sets(&scrape(admin).await?);
    }
    Ok((peers, sets))
}

async fn scrape(admin: &AdminClient) -> anyhow::Result<String> {
    let (status, body) = admin.get_text("/metrics").await?;
    anyhow::ensure!(status == 200, "GET /metrics answered {status}: {body}");
    Ok(body)
}

struct ScrapeTimes {
    /// Sorted.
    metrics: Vec<Duration>,
    /// Sorted; each right after a `/metrics`.
    healthz: Vec<Duration>,
    /// Sorted; `/healthz` back to back, before any scrape of this phase.
    healthz_alone: Vec<Duration>,
    metrics_bytes: usize,
    metrics_lines: usize,
}

/// [`SCRAPES`] of each, alternating so drift on the machine hits both; a few of each first as warm-up.
async fn scrape_vs_healthz(admin: &AdminClient) -> anyhow::Result<ScrapeTimes> {
    let mut t = ScrapeTimes { metrics: Vec::new(), healthz: Vec::new(), healthz_alone: Vec::new(), metrics_bytes: 0, metrics_lines: 0 };
    for i in 0..SCRAPES + 5 {
        let started = Instant::now();
        let (status, body) = admin.get_text("/healthz").await?;
        let healthz = started.elapsed();
        anyhow::ensure!(status == 200, "GET /healthz answered {status}: {body}");
        if i >= 5 {
            t.healthz_alone.push(healthz);
        }
    }
    for i in 0..SCRAPES + 5 {
        let started = Instant::now();
        let (status, body) = admin.get_text("/healthz").await?;
        let healthz = started.elapsed();
        anyhow::ensure!(status == 200, "GET /healthz answered {status}: {body}");
        let started = Instant::now();
        let body = scrape(admin).await?;
        let metrics = started.elapsed();
        if i >= 5 {
            t.healthz.push(healthz);
            t.metrics.push(metrics);
            t.metrics_bytes = body.len();
            t.metrics_lines = body.lines().count();
        }
    }
    t.metrics.sort_unstable();
    t.healthz.sort_unstable();
    t.healthz_alone.sort_unstable();
    Ok(t)
}

/// An application updating one record per `PutRecords` every [`PROBE_EVERY`] (sooner after a slow
/// write: the pace is not made up), until stopped.
struct ProbeWriter {
    stop: Arc<AtomicBool>,
    task: tokio::task::JoinHandle<Writes>,
}

/// When each write started and how long it took.
struct Writes {
    calls: Vec<(Instant, Duration)>,
    errors: usize,
}

impl Writes {
    /// Latencies of the writes that overlapped one of `windows`, and of the others; both sorted.
    fn split(&self, windows: &[(Instant, Instant)]) -> (Vec<Duration>, Vec<Duration>) {
        let (mut during, mut outside) = (Vec::new(), Vec::new());
        for &(start, took) in &self.calls {
            let end = start + took;
            if windows.iter().any(|&(from, to)| start < to && end > from) {
                during.push(took);
            } else {
                outside.push(took);
            }
        }
        during.sort_unstable();
        outside.sort_unstable();
        (during, outside)
    }
}

impl ProbeWriter {
    fn start(client: ExchangeNodeClient<Channel>, records: Vec<Record>) -> Self {
        let stop = Arc::new(AtomicBool::new(false));
        let stopped = stop.clone();
        let task = tokio::spawn(async move {
            let mut client = client;
            let mut writes = Writes { calls: Vec::new(), errors: 0 };
            let mut i = 0;
            let mut pace = tokio::time::interval(PROBE_EVERY);
            pace.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            while !stopped.load(Ordering::Relaxed) {
                pace.tick().await;
                let mut record = records[i % records.len()].clone();
                // The status alternates between two registered values from one pass over the keys to the
                // next, so the writes change records rather than rewrite them as they were.
                let status = if (i / records.len()).is_multiple_of(2) { "在业" } else { "存续" };
                record.items.insert("登记状态".into(), status.into());
                let req = PutRecordsRequest { resource_code: RESOURCE.into(), records: vec![record], ..Default::default() };
                i += 1;
                let started = Instant::now();
                match client.put_records(req).await {
                    Ok(_) => writes.calls.push((started, started.elapsed())),
                    Err(e) => {
                        writes.errors += 1;
                        eprintln!("write during backup failed: {}", e.message());
                    }
                }
            }
            writes
        });
        ProbeWriter { stop, task }
    }

    async fn stop(self) -> anyhow::Result<Writes> {
        self.stop.store(true, Ordering::Relaxed);
        Ok(self.task.await?)
    }
}

struct Scan {
    trees: usize,
    keys: u64,
    bytes: u64,
    open: Duration,
    first: Duration,
    second: Duration,
    /// `RecordStore::count` (what the node's scrape does for `gx_records_stored`): its answer and time.
    records: u64,
    records_count: Duration,
}

/// Every key and value of every tree of the database at `path` read once, twice over (the first pass
/// fills sled's cache, as a running node's is); opened as the node opens it.
fn raw_scan(path: &Path) -> anyhow::Result<Scan> {
    let started = Instant::now();
    let db = exchange_node::store::open_db_waiting(path, Duration::from_secs(10))?;
    let open = started.elapsed();
    let pass = || -> anyhow::Result<(usize, u64, u64, Duration)> {
        let started = Instant::now();
        let (mut keys, mut bytes) = (0u64, 0u64);
        let names = db.tree_names();
        for name in &names {
            for entry in db.open_tree(name)?.iter() {
                let (k, v) = entry?;
                keys += 1;
                bytes += (k.len() + v.len()) as u64;
            }
        }
        Ok((names.len(), keys, bytes, started.elapsed()))
    };
    let (trees, keys, bytes, first) = pass()?;
    let (_, _, _, second) = pass()?;
    let store = SledRecordStore::open(&db)?;
    let started = Instant::now();
    let records = store.count()?;
    let records_count = started.elapsed();
    Ok(Scan { trees, keys, bytes, open, first, second, records, records_count })
}

/// The node's `writes_paused_ms`, read from its "backup written" event: the admin port streams the file
/// but not the summary, and the pause is measured inside the node, where the locks are.
#[derive(Clone, Default)]
struct PauseCapture(Arc<Mutex<Vec<u64>>>);

impl PauseCapture {
    /// Installs the process's tracing subscriber with only this layer, for the node's backup module only
    /// (every other callsite stays disabled, so nothing else pays for it). If a subscriber is already
    /// installed, nothing is caught and the figure says so.
    fn install() -> Self {
        let capture = PauseCapture::default();
        let only_backups = tracing_subscriber::filter::Targets::new().with_target("exchange_node::backup", tracing::Level::INFO);
        let subscriber = tracing_subscriber::registry().with(capture.clone().with_filter(only_backups));
        if tracing::subscriber::set_global_default(subscriber).is_err() {
            println!("warning: a tracing subscriber is already installed; the node's writes_paused_ms will not be caught");
        }
        capture
    }

    fn taken(&self) -> Vec<u64> {
        self.0.lock().expect("pause list").clone()
    }
}

impl<S: tracing::Subscriber> Layer<S> for PauseCapture {
    fn on_event(&self, event: &tracing::Event<'_>, _: Context<'_, S>) {
        let mut field = PausedField(None);
        event.record(&mut field);
        if let Some(ms) = field.0 {
            self.0.lock().expect("pause list").push(ms);
        }
    }
}

struct PausedField(Option<u64>);

impl tracing::field::Visit for PausedField {
    fn record_u64(&mut self, field: &tracing::field::Field, value: u64) {
        if field.name() == "writes_paused_ms" {
            self.0 = Some(value);
        }
    }

    fn record_debug(&mut self, _: &tracing::field::Field, _: &dyn std::fmt::Debug) {}
}
