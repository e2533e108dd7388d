//! The directory over time: the change feed, node leases, restarts, health, reflection and shutdown.

mod common;

use std::time::{Duration, Instant};

use client_sdk::identity::Role;
use common::*;
use exchange_proto::v1::*;
use tonic::Code;

async fn next_change(stream: &mut tonic::Streaming<CatalogChange>) -> CatalogChange {
    tokio::time::timeout(Duration::from_secs(5), stream.message())
        .await
        .expect("a change within 5 s")
        .expect("stream healthy")
        .expect("stream open")
}

async fn no_change_for(stream: &mut tonic::Streaming<CatalogChange>, wait: Duration) {
    if let Ok(msg) = tokio::time::timeout(wait, stream.message()).await {
        panic!("expected no further change, got {msg:?}");
    }
}

#[tokio::test]
async fn watch_replays_in_order_follows_live_and_resumes_without_gaps() {
    let f = Fixture::start().await;
    let mut tax = f.client_as("tax", Role::Node);
    publish(&mut tax, (1..=3).map(|i| entry("tax", i)).collect()).await.unwrap();
    publish(&mut tax, (4..=5).map(|i| entry("tax", i)).collect()).await.unwrap();
    tax.withdraw_entries(WithdrawEntriesRequest { resource_codes: vec!["101001/000002".into()] }).await.unwrap();

    let mut app = f.client_as("police", Role::App);
    let mut stream = app.watch_catalog(WatchCatalogRequest { from_version: 0 }).await.unwrap().into_inner();
    let mut seen = Vec::new();
    for _ in 0..6 {
        seen.push(next_change(&mut stream).await);
    }
    let versions: Vec<u64> = seen.iter().map(|c| c.version).collect();
    assert_eq!(versions, [1, 2, 3, 4, 5, 6]);
    let codes: Vec<&str> = seen.iter().map(|c| c.entry.as_ref().unwrap().resource_code.as_str()).collect();
    assert_eq!(
        codes,
        ["101001/000001", "101001/000002", "101001/000003", "101001/000004", "101001/000005", "101001/000002"]
    );
    assert!(seen[..5].iter().all(|c| c.kind == ChangeKind::Upsert as i32 && !c.entry.as_ref().unwrap().withdrawn));
    assert_eq!(seen[5].kind, ChangeKind::Withdraw as i32);
    assert!(seen[5].entry.as_ref().unwrap().withdrawn);
    // every change carries the entry as it was after that change
    assert!(seen.iter().all(|c| c.entry.as_ref().unwrap().version == c.version));

    // live
    publish(&mut tax, vec![entry("tax", 6)]).await.unwrap();
    assert_eq!(next_change(&mut stream).await.version, 7);
    no_change_for(&mut stream, Duration::from_millis(200)).await;

    // disconnect; changes happen meanwhile; resume from the last version seen
    drop(stream);
    drop(app);
    publish(&mut tax, (7..=8).map(|i| entry("tax", i)).collect()).await.unwrap();
    tax.withdraw_entries(WithdrawEntriesRequest { resource_codes: vec!["101001/000007".into()] }).await.unwrap();
    let mut app = f.client_as("police", Role::App);
    let mut resumed = app.watch_catalog(WatchCatalogRequest { from_version: 7 }).await.unwrap().into_inner();
    let mut rest = Vec::new();
    for _ in 0..3 {
        rest.push(next_change(&mut resumed).await.version);
    }
    assert_eq!(rest, [8, 9, 10]);
    no_change_for(&mut resumed, Duration::from_millis(300)).await;

    // resuming at the current version: nothing until the next change
    let mut at_head = app.watch_catalog(WatchCatalogRequest { from_version: 10 }).await.unwrap().into_inner();
    no_change_for(&mut at_head, Duration::from_millis(200)).await;
    publish(&mut tax, vec![entry("tax", 9)]).await.unwrap();
    assert_eq!(next_change(&mut at_head).await.version, 11);
}

#[tokio::test]
async fn watch_sees_every_change_of_concurrent_publishers_exactly_once() {
    let f = Fixture::start().await;
    let mut app = f.client_as("police", Role::App);
    let mut stream = app.watch_catalog(WatchCatalogRequest { from_version: 0 }).await.unwrap().into_inner();
    let mut publishers = Vec::new();
    for (p, dept) in ["tax", "commerce", "quality"].into_iter().enumerate() {
        let mut client = f.client_as(dept, Role::Node);
        publishers.push(tokio::spawn(async move {
            for i in 0..15u32 {
                let mut e = entry(dept, p as u32 * 1000 + i);
                e.resource_code = format!("101001/{:06}", p as u32 * 1000 + i);
                publish(&mut client, vec![e]).await.unwrap();
            }
        }));
    }
    let mut versions = Vec::new();
    for _ in 0..45 {
        versions.push(next_change(&mut stream).await.version);
    }
    for p in publishers {
        p.await.unwrap();
    }
    assert_eq!(versions, (1..=45).collect::<Vec<u64>>());
    no_change_for(&mut stream, Duration::from_millis(200)).await;
}

#[tokio::test]
async fn watch_from_a_future_version_is_out_of_range() {
    let f = Fixture::start().await;
    let mut tax = f.client_as("tax", Role::Node);
    publish(&mut tax, vec![entry("tax", 1)]).await.unwrap();
    let status = tax.watch_catalog(WatchCatalogRequest { from_version: 2 }).await.unwrap_err();
    assert_eq!(status.code(), Code::OutOfRange);
    assert!(status.message().contains("current version 1"), "{}", status.message());
}

#[tokio::test]
async fn node_lease_lapses_to_offline_and_heartbeat_renews_it() {
    let f = Fixture::start_with(|c| c.lease_ttl_seconds = 1).await;
    let mut node = f.client_as("tax", Role::Node);

    let status = node.heartbeat(HeartbeatRequest::default()).await.unwrap_err();
    assert_eq!(status.code(), Code::FailedPrecondition);
    assert!(status.message().contains("register first"), "{}", status.message());

    let status = node
        .register_node(RegisterNodeRequest { address: "0.0.0.0:7443".into(), ..Default::default() })
        .await
        .unwrap_err();
    assert_eq!(status.code(), Code::InvalidArgument);

    let reg = node
        .register_node(RegisterNodeRequest { address: "127.0.0.1:7443".into(), software_version: "test".into(), ..Default::default() })
        .await
        .unwrap()
        .into_inner();
    assert_eq!((reg.lease_ttl_seconds, reg.heartbeat_interval_seconds), (1, 1));
    let info = reg.node.unwrap();
    assert_eq!((info.department.as_str(), info.node_name.as_str()), ("tax", "tax-node"));

    let mut app = f.client_as("police", Role::App);
    let status_of = |nodes: ListNodesResponse| nodes.nodes.iter().map(|n| n.status).collect::<Vec<_>>();
    let list = app.list_nodes(ListNodesRequest { department: "tax".into() }).await.unwrap().into_inner();
    assert_eq!(status_of(list), [NodeStatus::Online as i32]);

    tokio::time::sleep(Duration::from_millis(1300)).await;
    let list = app.list_nodes(ListNodesRequest::default()).await.unwrap().into_inner();
    assert_eq!(status_of(list), [NodeStatus::Offline as i32]);

    let hb = node.heartbeat(HeartbeatRequest::default()).await.unwrap().into_inner();
    assert!(hb.lease_expires_unix_ms > directory::service::now_unix_ms());
    let list = app.list_nodes(ListNodesRequest::default()).await.unwrap().into_inner();
    assert_eq!(status_of(list), [NodeStatus::Online as i32]);
    assert!(app
        .list_nodes(ListNodesRequest { department: "police".into() })
        .await
        .unwrap()
        .into_inner()
        .nodes
        .is_empty());
}

#[tokio::test]
async fn restart_keeps_entries_versions_search_results_nodes_and_revocations() {
    let pki = Pki::new();
    let data = tempfile::tempdir().unwrap();
    let dir = TestDirectory::start(pki.config(data.path())).await;
    let tax_id = pki.identity("tax", Role::Node, "tax-node");
    let app_id = pki.identity("police", Role::App, "police-app");
    let doomed = pki.identity("police", Role::App, "doomed-app");
    let op_id = pki.identity(CENTRAL, Role::Operator, "central-op");

    let mut tax = dir.client(&tax_id);
    publish(&mut tax, (1..=10).map(|i| entry("tax", i)).collect()).await.unwrap();
    tax.withdraw_entries(WithdrawEntriesRequest { resource_codes: vec!["101001/000004".into()] }).await.unwrap();
    tax.register_node(RegisterNodeRequest { address: "tax.local:7443".into(), ..Default::default() }).await.unwrap();
    dir.client(&op_id)
        .revoke_certificate(RevokeCertificateRequest {
            serial_hex: doomed.identity.serial_hex.clone(),
            ..Default::default()
        })
        .await
        .unwrap();

    let mut app = dir.client(&app_id);
    let version = catalog_version(&mut app).await;
    let searched = search_codes(&mut app, "登记").await;
    let listed = search_codes(&mut app, "").await;
    let tomb = get(&mut app, "101001/000004", true).await.unwrap();
    let one = get(&mut app, "101001/000007", false).await.unwrap();
    assert_eq!((version, searched.len(), listed.len()), (11, 9, 9));
    dir.stop().await;

    let dir = TestDirectory::start(pki.config(data.path())).await;
    let mut app = dir.client(&app_id);
    assert_eq!(catalog_version(&mut app).await, version);
    assert_eq!(search_codes(&mut app, "登记").await, searched);
    assert_eq!(search_codes(&mut app, "").await, listed);
    assert_eq!(get(&mut app, "101001/000004", true).await.unwrap(), tomb);
    assert_eq!(get(&mut app, "101001/000004", false).await.unwrap_err().code(), Code::NotFound);
    assert_eq!(get(&mut app, "101001/000007", false).await.unwrap(), one);
    let nodes = app.list_nodes(ListNodesRequest::default()).await.unwrap().into_inner().nodes;
    assert_eq!(nodes.len(), 1);
    assert_eq!(nodes[0].address, "tax.local:7443");
    let revs = app.list_revocations(ListRevocationsRequest {}).await.unwrap().into_inner().revocations;
    assert_eq!(revs.len(), 1);
    assert!(dir.client(&doomed).who_am_i(WhoAmIRequest {}).await.is_err(), "revocations are loaded at start");
    // the change log is intact: a watcher from 0 replays all 11 changes
    let mut stream = app.watch_catalog(WatchCatalogRequest { from_version: 0 }).await.unwrap().into_inner();
    for v in 1..=version {
        assert_eq!(next_change(&mut stream).await.version, v);
    }
    // and new versions continue from there
    let mut tax = dir.client(&tax_id);
    assert_eq!(publish(&mut tax, vec![entry("tax", 11)]).await.unwrap().entry_versions, [version + 1]);
    assert_eq!(next_change(&mut stream).await.version, version + 1);
    drop(stream);
    dir.stop().await;
}

#[tokio::test]
async fn health_is_serving_and_reflection_lists_the_services() {
    use tonic_health::pb::health_check_response::ServingStatus;
    use tonic_health::pb::health_client::HealthClient;
    use tonic_health::pb::HealthCheckRequest;

    let f = Fixture::start().await;
    let id = f.pki.identity("tax", Role::App, "tax-app");
    let mut health = HealthClient::new(f.dir.channel(&id));
    for service in ["", "govexchange.v1.Directory"] {
        let resp = health.check(HealthCheckRequest { service: service.into() }).await.unwrap().into_inner();
        assert_eq!(resp.status, ServingStatus::Serving as i32, "{service:?}");
    }

    // reflection v1
    {
        use tonic_reflection::pb::v1::server_reflection_client::ServerReflectionClient;
        use tonic_reflection::pb::v1::server_reflection_request::MessageRequest;
        use tonic_reflection::pb::v1::server_reflection_response::MessageResponse;
        use tonic_reflection::pb::v1::ServerReflectionRequest;
        let mut client = ServerReflectionClient::new(f.dir.channel(&id));
        let req = ServerReflectionRequest {
            host: String::new(),
            message_request: Some(MessageRequest::ListServices(String::new())),
        };
        let mut stream = client.server_reflection_info(futures::stream::iter([req])).await.unwrap().into_inner();
        let resp = stream.message().await.unwrap().unwrap();
        let Some(MessageResponse::ListServicesResponse(list)) = resp.message_response else { panic!("{resp:?}") };
        let names: Vec<String> = list.service.into_iter().map(|s| s.name).collect();
        assert!(names.contains(&"govexchange.v1.Directory".to_string()), "{names:?}");
        assert!(names.contains(&"grpc.health.v1.Health".to_string()), "{names:?}");
    }
    // reflection v1alpha
    {
        use tonic_reflection::pb::v1alpha::server_reflection_client::ServerReflectionClient;
        use tonic_reflection::pb::v1alpha::server_reflection_request::MessageRequest;
        use tonic_reflection::pb::v1alpha::server_reflection_response::MessageResponse;
        use tonic_reflection::pb::v1alpha::ServerReflectionRequest;
        let mut client = ServerReflectionClient::new(f.dir.channel(&id));
        let req = ServerReflectionRequest {
            host: String::new(),
            message_request: Some(MessageRequest::ListServices(String::new())),
        };
        let mut stream = client.server_reflection_info(futures::stream::iter([req])).await.unwrap().into_inner();
        let resp = stream.message().await.unwrap().unwrap();
        let Some(MessageResponse::ListServicesResponse(list)) = resp.message_response else { panic!("{resp:?}") };
        assert!(list.service.iter().any(|s| s.name == "govexchange.v1.Directory"));
    }
}

#[tokio::test]
async fn shutdown_ends_catalog_and_health_watches_and_releases_the_database() {
    let pki = Pki::new();
    let data = tempfile::tempdir().unwrap();
    let dir = TestDirectory::start(pki.config(data.path())).await;
    let app_id = pki.identity("police", Role::App, "police-app");
    let mut app = dir.client(&app_id);
    let mut stream = app.watch_catalog(WatchCatalogRequest { from_version: 0 }).await.unwrap().into_inner();
    let reader = tokio::spawn(async move { stream.message().await });
    let mut health = tonic_health::pb::health_client::HealthClient::new(dir.channel(&app_id));
    let mut health_watch =
        health.watch(tonic_health::pb::HealthCheckRequest { service: String::new() }).await.unwrap().into_inner();
    let serving = health_watch.message().await.unwrap().unwrap().status;
    assert_eq!(serving, tonic_health::pb::health_check_response::ServingStatus::Serving as i32);
    let health_reader = tokio::spawn(async move {
        let mut last = None;
        while let Ok(Some(msg)) = health_watch.message().await {
            last = Some(msg.status);
        }
        last
    });
    tokio::time::sleep(Duration::from_millis(100)).await;
    let started = Instant::now();
    dir.stop().await; // panics if the server does not stop within 10 s
    assert!(started.elapsed() < Duration::from_secs(5), "drained in {:?}", started.elapsed());
    match reader.await.unwrap() {
        Err(status) => assert_eq!(status.code(), Code::Unavailable, "{status:?}"),
        Ok(None) => {}
        Ok(Some(change)) => panic!("unexpected change {change:?}"),
    }
    let last_health = health_reader.await.unwrap();
    assert_eq!(last_health, Some(tonic_health::pb::health_check_response::ServingStatus::NotServing as i32));
    // the database is released: the same folder opens again
    let dir = TestDirectory::start(pki.config(data.path())).await;
    dir.stop().await;
}

/// The start-up bound of the brief: 100,000 entries ready within 5 s (release build). Run with
/// `cargo test --release -p directory --test lifecycle -- --ignored --nocapture`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "scale check: run in release mode"]
async fn restart_with_100k_entries_is_ready_within_5_s() {
    let pki = Pki::new();
    let data = tempfile::tempdir().unwrap();
    let written = Instant::now();
    {
        let stores = directory::store::sled::open(data.path()).unwrap();
        let mut seq = 0u32;
        for _ in 0..20 {
            let batch: Vec<CatalogEntry> = (0..5_000)
                .map(|_| {
                    seq += 1;
                    let mut e = entry("tax", seq % 1_000_000);
                    e.resource_code = format!("101001/{:06}", seq);
                    e.summary = format!("第{seq}号资源：市场主体登记的基本信息，供各部门核验企业身份");
                    e
                })
                .collect();
            stores.catalog.upsert(batch).await.unwrap();
        }
    }
    println!("wrote 100,000 entries in {:?}", written.elapsed());
    let started = Instant::now();
    let loaded = directory::LoadedDirectory::load(pki.config(data.path())).await.unwrap();
    let ready = started.elapsed();
    println!(
        "ready in {ready:?} (store open + read + index rebuild {:?}), {} entries indexed, catalog version {}",
        loaded.startup_time(),
        loaded.indexed_entries(),
        loaded.catalog_version()
    );
    assert_eq!(loaded.indexed_entries(), 100_000);
    assert_eq!(loaded.catalog_version(), 100_000);
    assert!(ready < Duration::from_secs(5), "ready in {ready:?}");
}

/// Durability for real: the `directory` binary is killed with SIGKILL while publishers are writing; after a
/// restart every acknowledged write is there, with the version it was acknowledged with, and the change
/// log has no gap.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn killed_directory_loses_no_acknowledged_write() {
    let pki = Pki::new();
    let data = tempfile::tempdir().unwrap();
    let port = {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        l.local_addr().unwrap().port()
    };
    let config_path = data.path().join("directory.toml");
    let paths = pki.paths("directory");
    std::fs::write(
        &config_path,
        format!(
            "listen = \"127.0.0.1:{port}\"\ndata_dir = \"{}\"\n[tls]\nca = \"{}\"\ncert = \"{}\"\nkey = \"{}\"\n",
            data.path().join("db").display(),
            paths.ca.display(),
            paths.cert.display(),
            paths.key.display()
        ),
    )
    .unwrap();
    let addr = format!("127.0.0.1:{port}");
    let tax_id = pki.identity("tax", Role::Node, "tax-node");
    /// Kills the child even when an assertion fails, so no directory process outlives the test.
    struct KillOnDrop(std::process::Child);
    impl Drop for KillOnDrop {
        fn drop(&mut self) {
            let _ = self.0.kill();
            let _ = self.0.wait();
        }
    }
    let spawn = || {
        KillOnDrop(
            std::process::Command::new(env!("CARGO_BIN_EXE_directory"))
                .arg("--config")
                .arg(&config_path)
                .env("RUST_LOG", "warn")
                .stderr(std::process::Stdio::null())
                .spawn()
                .unwrap(),
        )
    };
    let wait_ready = |addr: String, id: client_sdk::tls::TlsIdentity| async move {
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            let mut c = client_sdk::client::directory_client(&addr, &id).unwrap();
            if c.who_am_i(WhoAmIRequest {}).await.is_ok() {
                return c;
            }
            assert!(Instant::now() < deadline, "directory did not come up");
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    };

    let mut child = spawn();
    let mut tax = wait_ready(addr.clone(), tax_id.clone()).await;
    // Publish batches until the process is killed under us; remember what was acknowledged.
    let writer = tokio::spawn(async move {
        let mut acknowledged: Vec<(String, u64)> = Vec::new();
        for batch in 0..1000u32 {
            let entries: Vec<CatalogEntry> = (0..20).map(|i| entry("tax", batch * 20 + i + 1)).collect();
            let codes: Vec<String> = entries.iter().map(|e| e.resource_code.clone()).collect();
            match publish(&mut tax, entries).await {
                Ok(resp) => acknowledged.extend(codes.into_iter().zip(resp.entry_versions)),
                Err(_) => break,
            }
        }
        acknowledged
    });
    tokio::time::sleep(Duration::from_millis(1500)).await;
    child.0.kill().unwrap(); // SIGKILL: no shutdown, no final flush
    child.0.wait().unwrap();
    let acknowledged = writer.await.unwrap();
    assert!(acknowledged.len() >= 20, "some writes were acknowledged before the kill");

    let child = spawn();
    let mut tax = wait_ready(addr.clone(), tax_id).await;
    let version = catalog_version(&mut tax).await;
    let last_acknowledged = acknowledged.last().unwrap().1;
    // Unacknowledged writes may or may not have made it; acknowledged ones must have.
    assert!(version >= last_acknowledged, "version {version} < last acknowledged {last_acknowledged}");
    for (code, v) in &acknowledged {
        assert_eq!(get(&mut tax, code, false).await.unwrap().version, *v, "{code}");
    }
    let mut stream = tax.watch_catalog(WatchCatalogRequest { from_version: 0 }).await.unwrap().into_inner();
    for v in 1..=version {
        assert_eq!(next_change(&mut stream).await.version, v);
    }
    println!("{} writes acknowledged before SIGKILL; catalog version after restart {version}", acknowledged.len());
    drop(child);
}
