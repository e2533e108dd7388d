//! A replica of a two-replica directory (the real `directory` binary, twice, over one real PostgreSQL
//! database) is killed with SIGKILL while applications publish and search through the SDK with both
//! addresses, and while a real `exchange-node` configured with both addresses heartbeats. Checked:
//! no application call fails (the SDK fails over), every acknowledged publish is in the database and in
//! the surviving replica's change log at the version it was acknowledged with, the log has no gap, the
//! node stays online through the other replica, and the killed replica, started again, catches up.

use std::collections::BTreeMap;
use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use client_sdk::identity::Role;
use client_sdk::tls::TlsPaths;
use e2e_tests::pki::TestPki;
use e2e_tests::postgres::TestPostgres;
use e2e_tests::procs::{free_port, Proc};
use e2e_tests::workload;
use exchange_proto::v1::*;
use futures::StreamExt;

/// Node lease on the test directory: short, so "still online" after the kill means "heartbeating
/// through the other replica".
const LEASE_SECONDS: u64 = 3;

fn toml_str(p: &Path) -> String {
    format!("{:?}", p.to_string_lossy())
}

fn tls_table(tls: &TlsPaths) -> String {
    format!("[tls]\nca = {}\ncert = {}\nkey = {}\n", toml_str(&tls.ca), toml_str(&tls.cert), toml_str(&tls.key))
}

fn start_replica(home: &Path, pki: &TestPki, url: &str, name: &str, port: u16) -> Proc {
    let tls = pki.issue("central", Role::Directory, "directory");
    let config = home.join(format!("{name}.toml"));
    std::fs::write(
        &config,
        format!(
            "listen = \"127.0.0.1:{port}\"\nlease_ttl_seconds = {LEASE_SECONDS}\n{}\
             [store]\nbackend = \"postgres\"\n[store.postgres]\nurl = {url:?}\npool_size = 8\npoll_interval_ms = 50\n",
            tls_table(&tls)
        ),
    )
    .unwrap();
    Proc::start(name, "directory", &["--config", config.to_str().unwrap()], &home.join(format!("{name}.log")))
}

fn now_ms() -> i64 {
    SystemTime::now().duration_since(UNIX_EPOCH).unwrap().as_millis() as i64
}

#[derive(Default)]
struct Outcome {
    /// Acknowledged catalog version → resource code.
    acknowledged: BTreeMap<u64, String>,
    acknowledged_after_kill: usize,
    searches: usize,
    searches_after_kill: usize,
    errors: Vec<String>,
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn killing_a_replica_under_publish_and_search_load_fails_no_call_and_loses_no_acknowledged_publish() {
    let home = tempfile::tempdir().unwrap();
    let pki = TestPki::new(&home.path().join("pki"));
    let url = TestPostgres::shared().fresh_database();
    let (port_a, port_b) = (free_port(), free_port());
    let (addr_a, addr_b) = (format!("127.0.0.1:{port_a}"), format!("127.0.0.1:{port_b}"));
    let both = format!("{addr_a},{addr_b}");
    let mut replica_a = start_replica(home.path(), &pki, &url, "directory-a", port_a);
    let mut replica_b = start_replica(home.path(), &pki, &url, "directory-b", port_b);
    let operator = pki.identity("central", Role::Operator, "central-operator");
    let only = |addr: &str| client_sdk::client::directory_client(addr, &operator).unwrap();
    for addr in [&addr_a, &addr_b] {
        e2e_tests::federation::wait_for("a replica to answer", Duration::from_secs(30), || {
            let mut c = only(addr);
            async move { c.list_nodes(ListNodesRequest::default()).await.ok() }
        })
        .await
        .unwrap();
    }

    // tax's node, given both replicas.
    let node_port = free_port();
    let node_tls = pki.issue("tax", Role::Node, "tax-node");
    let node_config = home.path().join("tax-node.toml");
    std::fs::write(
        &node_config,
        format!(
            "listen = \"127.0.0.1:{node_port}\"\nadvertise_address = \"127.0.0.1:{node_port}\"\n\
             directory_address = [\"{addr_a}\", \"{addr_b}\"]\ndata_dir = {}\n{}",
            toml_str(&home.path().join("tax-node-data")),
            tls_table(&node_tls),
        ),
    )
    .unwrap();
    let _node = Proc::start("tax-node", "exchange-node", &["--config", node_config.to_str().unwrap()], &home.path().join("tax-node.log"));
    let mut watcher = only(&addr_b);
    e2e_tests::federation::wait_for("tax's node online", Duration::from_secs(30), || {
        let mut c = watcher.clone();
        async move {
            let nodes = c.list_nodes(ListNodesRequest { department: "tax".into() }).await.ok()?.into_inner().nodes;
            nodes.iter().any(|n| n.status == NodeStatus::Online as i32).then_some(())
        }
    })
    .await
    .unwrap();

    // The load: four departments publish batches of 4, two clients search, all through both addresses.
    let stop = Arc::new(AtomicBool::new(false));
    let killed_at: Arc<Mutex<Option<Instant>>> = Arc::new(Mutex::new(None));
    let outcome = Arc::new(Mutex::new(Outcome::default()));
    let mut tasks = Vec::new();
    for (dept_index, dept) in [(0usize, "commerce"), (2, "quality"), (3, "police"), (4, "health")] {
        let id = pki.identity(dept, Role::Node, &format!("{dept}-node"));
        let mut client = client_sdk::client::directory_client(&both, &id).unwrap();
        let (stop, killed_at, outcome) = (stop.clone(), killed_at.clone(), outcome.clone());
        tasks.push(tokio::spawn(async move {
            let mut n = 0;
            while !stop.load(Ordering::Relaxed) {
                let entries = workload::entries(dept_index, n, 4, 11);
                n += 4;
                let codes: Vec<String> = entries.iter().map(|e| e.resource_code.clone()).collect();
                let result = client.publish_entries(PublishEntriesRequest { entries }).await;
                let after_kill = killed_at.lock().unwrap().is_some();
                let mut o = outcome.lock().unwrap();
                match result {
                    Ok(r) => {
                        for (v, code) in r.into_inner().entry_versions.into_iter().zip(codes) {
                            o.acknowledged.insert(v, code);
                            o.acknowledged_after_kill += after_kill as usize;
                        }
                    }
                    Err(e) => o.errors.push(format!("{dept} publish: {e:?}")),
                }
            }
        }));
    }
    for i in 0..2 {
        let id = pki.identity("tax", Role::Operator, &format!("tax-searcher-{i}"));
        let mut client = client_sdk::client::directory_client(&both, &id).unwrap();
        let (stop, killed_at, outcome) = (stop.clone(), killed_at.clone(), outcome.clone());
        let queries = workload::queries();
        tasks.push(tokio::spawn(async move {
            let mut q = i;
            while !stop.load(Ordering::Relaxed) {
                q += 1;
                let req = SearchCatalogRequest { query: queries[q % queries.len()].clone(), page_size: 10, ..Default::default() };
                let result = client.search_catalog(req).await;
                let after_kill = killed_at.lock().unwrap().is_some();
                let mut o = outcome.lock().unwrap();
                match result {
                    Ok(_) => {
                        o.searches += 1;
                        o.searches_after_kill += after_kill as usize;
                    }
                    Err(e) => o.errors.push(format!("search: {e:?}")),
                }
            }
        }));
    }

    tokio::time::sleep(Duration::from_secs(2)).await;
    let before_kill = outcome.lock().unwrap().acknowledged.len();
    replica_a.kill();
    let kill_ms = now_ms();
    *killed_at.lock().unwrap() = Some(Instant::now());
    // Longer than a lease, so the node must have heartbeated through B to be online at the end.
    tokio::time::sleep(Duration::from_secs(LEASE_SECONDS + 2)).await;
    stop.store(true, Ordering::Relaxed);
    for t in tasks {
        t.await.unwrap();
    }
    let outcome = Arc::try_unwrap(outcome).ok().unwrap().into_inner().unwrap();
    eprintln!(
        "acknowledged entries: {} ({before_kill} before the kill, {} after); searches: {} ({} after the kill)",
        outcome.acknowledged.len(),
        outcome.acknowledged_after_kill,
        outcome.searches,
        outcome.searches_after_kill
    );
    assert!(outcome.errors.is_empty(), "application calls failed: {:#?}", outcome.errors);
    assert!(before_kill > 0 && outcome.acknowledged_after_kill > 0, "publishes went on before and after the kill");
    assert!(outcome.searches_after_kill > 0, "searches went on after the kill");

    // Every acknowledged version holds, in the surviving replica's log, the entry acknowledged with it;
    // the log runs 1..=head without a gap.
    let head = outcome.acknowledged.keys().next_back().copied().unwrap();
    let mut log = watcher.watch_catalog(WatchCatalogRequest { from_version: 0 }).await.unwrap().into_inner();
    let mut version_to_code = BTreeMap::new();
    while (version_to_code.len() as u64) < head {
        let c = tokio::time::timeout(Duration::from_secs(10), log.next()).await.expect("change within 10 s").unwrap().unwrap();
        assert_eq!(c.version, version_to_code.len() as u64 + 1, "gap-free log");
        version_to_code.insert(c.version, c.entry.unwrap().resource_code);
    }
    for (v, code) in &outcome.acknowledged {
        assert_eq!(version_to_code.get(v), Some(code), "acknowledged version {v} ({code}) is in the log");
    }

    // tax's node heartbeated through B after A died.
    let nodes = watcher.list_nodes(ListNodesRequest { department: "tax".into() }).await.unwrap().into_inner().nodes;
    let tax = &nodes[0];
    assert_eq!(tax.status, NodeStatus::Online as i32, "{tax:?}");
    assert!(tax.last_heartbeat_unix_ms > kill_ms, "the node's last heartbeat ({}) came after the kill ({kill_ms})", tax.last_heartbeat_unix_ms);

    // A, started again, serves everything B has.
    let mut replica_a = start_replica(home.path(), &pki, &url, "directory-a-again", port_a);
    // Live entries in a replica's search index (an empty query matches all).
    let indexed = |mut c: exchange_proto::v1::directory_client::DirectoryClient<client_sdk::client::DirectoryChannel>| async move {
        c.search_catalog(SearchCatalogRequest { page_size: 1, ..Default::default() }).await.ok().map(|r| r.into_inner().total_hits)
    };
    let on_b = indexed(only(&addr_b)).await.unwrap();
    assert!(on_b >= outcome.acknowledged.values().collect::<std::collections::BTreeSet<_>>().len() as u64);
    e2e_tests::federation::wait_for("the restarted replica to index everything", Duration::from_secs(30), || {
        let c = only(&addr_a);
        async move { indexed(c).await.filter(|n| *n == on_b) }
    })
    .await
    .unwrap();
    let mut a_log = only(&addr_a).watch_catalog(WatchCatalogRequest { from_version: head - 1 }).await.unwrap().into_inner();
    let last = tokio::time::timeout(Duration::from_secs(10), a_log.next()).await.unwrap().unwrap().unwrap();
    assert_eq!((last.version, &last.entry.unwrap().resource_code), (head, &version_to_code[&head]));
    assert!(replica_a.stop(), "replica A stops cleanly");
    assert!(replica_b.stop(), "replica B stops cleanly");
}
