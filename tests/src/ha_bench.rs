//! `bench --only directory-ha` (issue 6): what a highly available directory costs. Catalog publish and
//! search throughput of the real directory, served in this process over mutual TLS, in three set-ups
//! measured in the same run with the same load:
//!
//! - **sled**: one directory on its embedded store (the baseline);
//! - **PostgreSQL, 1 replica**: one directory on a PostgreSQL database;
//! - **PostgreSQL, 2 replicas**: two directories on one database, the clients spread over both.
//!
//! The PostgreSQL server runs on this machine with durable commits (fsync and synchronous_commit on),
//! as sled flushes before every acknowledgement. Everything shares the same cores: server(s), database and
//! load generator, so the figures are ratios to the sled baseline of the same run, not capacities.

use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, Instant};

use client_sdk::client::DirectoryChannel;
use client_sdk::identity::Role;
use exchange_proto::v1::directory_client::DirectoryClient;
use exchange_proto::v1::{CatalogEntry, PublishEntriesRequest, SearchCatalogRequest};

use crate::events_bench::Figure;
use crate::federation::{start_directory_replica, wait_for, Running};
use crate::load::{self, OthersMeter};
use crate::pki::TestPki;
use crate::workload;

pub struct Options<'a> {
    /// Catalog entries published (and then searched) in each set-up.
    pub entries: usize,
    /// Entries per publish call in the bulk phase.
    pub batch: usize,
    /// Length of the single-entry publish phase and of the search phase.
    pub seconds: u64,
    /// Calls in flight in the single-entry publish and search phases.
    pub concurrency: usize,
    /// The PostgreSQL server to create the benchmark databases on (durable settings).
    pub postgres: &'a crate::postgres::TestPostgres,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Setup {
    Sled,
    Postgres(usize),
}

impl Setup {
    fn name(self) -> String {
        match self {
            Setup::Sled => "sled".into(),
            Setup::Postgres(1) => "PostgreSQL, 1 replica".into(),
            Setup::Postgres(n) => format!("PostgreSQL, {n} replicas"),
        }
    }
}

#[derive(Debug, Default)]
struct Measured {
    bulk_entries_per_s: f64,
    single_calls_per_s: f64,
    single_p99: Duration,
    searches_per_s: f64,
    search_p99: Duration,
    errors: u64,
    others_share: Option<f64>,
}

type Client = DirectoryClient<DirectoryChannel>;

fn client(addr: &str, pki: &TestPki, dept: &str, role: Role, name: &str) -> anyhow::Result<Client> {
    Ok(client_sdk::client::directory_client(addr, &pki.identity(dept, role, name))?)
}

async fn start(setup: Setup, pki: &TestPki, tmp: &Path, options: &Options<'_>) -> anyhow::Result<Vec<Running<directory::ServerError>>> {
    match setup {
        Setup::Sled => {
            let data = tmp.join(format!("sled-{}", std::process::id()));
            Ok(vec![crate::federation::start_directory(pki, &data).await?])
        }
        Setup::Postgres(n) => {
            let url = options.postgres.fresh_database();
            let mut replicas = Vec::new();
            for _ in 0..n {
                replicas.push(start_directory_replica(pki, &url, 100).await?);
            }
            Ok(replicas)
        }
    }
}

async fn measure(setup: Setup, pki: &TestPki, tmp: &Path, options: &Options<'_>) -> anyhow::Result<Measured> {
    let replicas = start(setup, pki, tmp, options).await?;
    let addrs: Vec<String> = replicas.iter().map(|r| r.addr.clone()).collect();
    // Each client talks to one replica (the clients, not a balancer, spread the load).
    let on = |i: usize| addrs[i % addrs.len()].clone();
    for addr in &addrs {
        let mut c = client(addr, pki, "central", Role::Operator, "bench-reader")?;
        wait_for("a replica to answer", Duration::from_secs(30), || {
            let mut c = c.clone();
            async move { c.search_catalog(SearchCatalogRequest::default()).await.ok() }
        })
        .await?;
        c.search_catalog(SearchCatalogRequest::default()).await?;
    }
    let others = OthersMeter::start();
    let mut m = Measured::default();

    // Bulk: five departments at once, each its share in batches, each through its own replica.
    let depts = workload::DEPARTMENTS.len();
    let per_dept = options.entries / depts;
    let started = Instant::now();
    let mut publishers = Vec::new();
    for d in 0..depts {
        let (dept, _) = workload::DEPARTMENTS[d];
        let mut c = client(&on(d), pki, dept, Role::Operator, &format!("{dept}-bench-operator"))?;
        let batches: Vec<Vec<CatalogEntry>> =
            workload::entries(d, 0, per_dept, 42).chunks(options.batch).map(|c| c.to_vec()).collect();
        publishers.push(tokio::spawn(async move {
            for batch in batches {
                c.publish_entries(PublishEntriesRequest { entries: batch }).await?;
            }
            Ok::<_, tonic::Status>(())
        }));
    }
    for p in publishers {
        p.await??;
    }
    let total = per_dept * depts;
    m.bulk_entries_per_s = total as f64 / started.elapsed().as_secs_f64();

    // Single-entry publishes: each call one durable write, `concurrency` in flight over all replicas.
    let single_clients: Arc<Vec<(Client, Vec<CatalogEntry>)>> = Arc::new(
        (0..options.concurrency)
            .map(|i| {
                let d = i % depts;
                let (dept, _) = workload::DEPARTMENTS[d];
                let c = client(&on(i), pki, dept, Role::Operator, &format!("{dept}-bench-operator"))?;
                Ok((c, workload::entries(d, 0, per_dept.min(200), 42)))
            })
            .collect::<anyhow::Result<_>>()?,
    );
    let single = {
        let clients = single_clients.clone();
        move |i: u64| {
            let (c, entries) = &clients[i as usize % clients.len()];
            let mut c = c.clone();
            let entry = entries[(i as usize / clients.len()) % entries.len()].clone();
            async move { c.publish_entries(PublishEntriesRequest { entries: vec![entry] }).await.map(|_| ()) }
        }
    };
    let phase = Duration::from_secs(options.seconds);
    let stats = load::run(options.concurrency, u64::MAX, phase, single).await;
    m.single_calls_per_s = stats.per_second();
    m.single_p99 = stats.percentile(99.0);
    m.errors += stats.errors;

    // Search, once every replica's index holds the whole catalog.
    for addr in &addrs {
        let c = client(addr, pki, "central", Role::Operator, "bench-reader")?;
        wait_for("every replica to index the catalog", Duration::from_secs(60), || {
            let mut c = c.clone();
            async move {
                let n = c.search_catalog(SearchCatalogRequest::default()).await.ok()?.into_inner().total_hits;
                (n as usize >= total).then_some(())
            }
        })
        .await?;
    }
    // As in the catalog section: let the index merge the segments the publishes left before searching.
    tokio::time::sleep(Duration::from_secs(3)).await;
    let search_clients: Arc<Vec<Client>> = Arc::new(
        (0..options.concurrency)
            .map(|i| client(&on(i), pki, "central", Role::Operator, "bench-reader"))
            .collect::<anyhow::Result<_>>()?,
    );
    let queries = Arc::new(workload::queries());
    let search = {
        let clients = search_clients.clone();
        move |i: u64| {
            let mut c = clients[i as usize % clients.len()].clone();
            let req = SearchCatalogRequest {
                query: queries[i as usize % queries.len()].clone(),
                page_size: 10,
                ..Default::default()
            };
            async move { c.search_catalog(req).await.map(|_| ()) }
        }
    };
    let _ = load::run(8, 2_000, phase, search.clone()).await; // warm-up
    let stats = load::run(options.concurrency, u64::MAX, phase, search).await;
    m.searches_per_s = stats.per_second();
    m.search_p99 = stats.percentile(99.0);
    m.errors += stats.errors;
    m.others_share = others.others_share();

    drop(search_clients);
    drop(single_clients);
    for r in replicas {
        r.stop().await?;
    }
    Ok(m)
}

fn ratio(value: f64, base: f64) -> String {
    if base > 0.0 {
        format!("{:.2}×", value / base)
    } else {
        String::new()
    }
}

fn ms(d: Duration) -> String {
    format!("{:.1} ms", d.as_secs_f64() * 1000.0)
}

/// Runs the three set-ups one after the other and returns one row per figure and set-up.
pub async fn directory_ha(pki: &TestPki, tmp: &Path, options: &Options<'_>) -> anyhow::Result<Vec<Figure>> {
    let setups = [Setup::Sled, Setup::Postgres(1), Setup::Postgres(2)];
    let mut measured = Vec::new();
    for setup in setups {
        println!("directory-ha: {} ...", setup.name());
        let m = measure(setup, pki, tmp, options).await?;
        println!(
            "  bulk {:.0} entries/s; single {:.0} calls/s (p99 {}); search {:.0}/s (p99 {}); {} errors; others used {}",
            m.bulk_entries_per_s,
            m.single_calls_per_s,
            ms(m.single_p99),
            m.searches_per_s,
            ms(m.search_p99),
            m.errors,
            m.others_share.map_or("?".into(), |s| format!("{:.0}%", s * 100.0)),
        );
        anyhow::ensure!(m.errors == 0, "{}: {} calls failed", setup.name(), m.errors);
        measured.push((setup, m));
    }
    let base = &measured[0].1;
    let mut rows = Vec::new();
    for (setup, m) in &measured {
        let fig = |figure: String, value: String, baseline: String, ratio: String| Figure {
            figure,
            value,
            baseline,
            ratio,
            target: String::new(),
        };
        rows.push(fig(
            format!("publish, {}-entry batches, 5 departments — {}", options.batch, setup.name()),
            format!("{:.0} entries/s", m.bulk_entries_per_s),
            format!("sled {:.0} entries/s", base.bulk_entries_per_s),
            ratio(m.bulk_entries_per_s, base.bulk_entries_per_s),
        ));
        rows.push(fig(
            format!("publish, 1 entry per call, {} in flight — {}", options.concurrency, setup.name()),
            format!("{:.0} calls/s (p99 {})", m.single_calls_per_s, ms(m.single_p99)),
            format!("sled {:.0} calls/s", base.single_calls_per_s),
            ratio(m.single_calls_per_s, base.single_calls_per_s),
        ));
        rows.push(fig(
            format!("search at {} entries, {} in flight — {}", options.entries, options.concurrency, setup.name()),
            format!("{:.0} searches/s (p99 {})", m.searches_per_s, ms(m.search_p99)),
            format!("sled {:.0} searches/s", base.searches_per_s),
            ratio(m.searches_per_s, base.searches_per_s),
        ));
    }
    Ok(rows)
}
