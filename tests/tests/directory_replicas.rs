//! Two directory replicas over one real PostgreSQL database, served in this process over mutual TLS on
//! ephemeral ports: whatever is written through one replica is seen through the other — by watchers (in
//! version order, without gaps), by searches, by grant watchers, in node leases, and in the revoked
//! serials the other replica's TLS refuses.
//!
//! PostgreSQL comes from `e2e_tests::postgres::TestPostgres` (scripts/test.sh starts one; otherwise one is
//! started from the installed binaries; the tests fail, never skip, when there is none).

use std::collections::BTreeMap;
use std::time::Duration;

use client_sdk::identity::Role;
use client_sdk::tls::TlsIdentity;
use e2e_tests::federation::{start_directory_replica, wait_for, Running};
use e2e_tests::pki::TestPki;
use e2e_tests::postgres::TestPostgres;
use exchange_proto::v1::directory_client::DirectoryClient;
use exchange_proto::v1::*;
use futures::StreamExt;
use tonic::Code;

type Client = DirectoryClient<client_sdk::client::DirectoryChannel>;

/// Poll interval of the replicas: how soon one sees the other's writes.
const POLL_MS: u64 = 50;

struct Pair {
    _tmp: tempfile::TempDir,
    /// The database both replicas use.
    url: String,
    pki: TestPki,
    a: Running<directory::ServerError>,
    b: Running<directory::ServerError>,
}

impl Pair {
    async fn start() -> Pair {
        let tmp = tempfile::tempdir().unwrap();
        let pki = TestPki::new(&tmp.path().join("pki"));
        let url = TestPostgres::shared().fresh_database();
        // One after the other, then both at once would also work (migrations are race-safe; see the
        // store contract tests); here B starts on a database A already migrated.
        let a = start_directory_replica(&pki, &url, POLL_MS).await.unwrap();
        let b = start_directory_replica(&pki, &url, POLL_MS).await.unwrap();
        let pair = Pair { _tmp: tmp, url, pki, a, b };
        for addr in [pair.a.addr.clone(), pair.b.addr.clone()] {
            let id = pair.pki.identity("central", Role::Operator, "central-operator");
            wait_for("a replica to answer", Duration::from_secs(30), || {
                let mut c = client_on(&addr, &id);
                async move { c.list_nodes(ListNodesRequest::default()).await.ok() }
            })
            .await
            .unwrap();
        }
        pair
    }

    fn identity(&self, department: &str, role: Role) -> TlsIdentity {
        self.pki.identity(department, role, &format!("{department}-{role}"))
    }

    /// A client of one replica only (no failover: these tests are about what each replica shows).
    fn on(&self, replica: &Running<directory::ServerError>, department: &str, role: Role) -> Client {
        client_on(&replica.addr, &self.identity(department, role))
    }
}

/// A replica's admin port, as the central operator.
fn admin_of(pair: &Pair, replica: &Running<directory::ServerError>) -> client_sdk::admin::client::AdminClient {
    client_sdk::admin::client::AdminClient::connect(
        &replica.admin_addr,
        client_sdk::admin::client::AdminAuth {
            ca: pair.pki.dir.join("ca.crt"),
            client: Some(pair.identity("central", Role::Operator)),
            token: None,
        },
    )
    .unwrap()
}

fn client_on(addr: &str, id: &TlsIdentity) -> Client {
    client_sdk::client::directory_client(addr, id).unwrap()
}

fn entry(department: &str, code: &str) -> CatalogEntry {
    CatalogEntry {
        resource_code: code.into(),
        name: format!("企业登记信息{code}"),
        summary: "市场主体登记的基本信息，供各部门核验企业身份".into(),
        provider_code: department.into(),
        provider_name: format!("{department} 局"),
        classification: "101001".into(),
        format: "database table".into(),
        data_items: vec![
            DataItem { name: "统一社会信用代码".into(), data_type: DataType::String as i32, description: String::new() },
            DataItem { name: "企业名称".into(), data_type: DataType::String as i32, description: "全称".into() },
        ],
        share_type: ShareType::Unconditional as i32,
        share_methods: vec![ShareMethod::PullQuery as i32],
        open_attribute: OpenAttribute::NotOpen as i32,
        update_cycle: UpdateCycle::Daily as i32,
        publish_date: "2024-03-01".into(),
        record_kind: RecordKind::Enterprise as i32,
        ..Default::default()
    }
}

fn code(n: u32) -> String {
    format!("101001/{n:06}")
}

/// The next `n` changes of a catalog watch, each within 10 s.
async fn take_changes(stream: &mut tonic::Streaming<CatalogChange>, n: usize) -> Vec<CatalogChange> {
    let mut out = Vec::with_capacity(n);
    while out.len() < n {
        let next = tokio::time::timeout(Duration::from_secs(10), stream.next())
            .await
            .unwrap_or_else(|_| panic!("change {} of {n} did not come within 10 s", out.len() + 1));
        out.push(next.expect("stream open").expect("change"));
    }
    out
}

async fn next_grant(s: &mut tonic::Streaming<GrantChange>) -> GrantChange {
    tokio::time::timeout(Duration::from_secs(10), s.next()).await.expect("grant change within 10 s").unwrap().unwrap()
}

/// How many live entries a search for `query` finds.
async fn total_hits(client: &mut Client, query: &str) -> u64 {
    let resp = client
        .search_catalog(SearchCatalogRequest { query: query.into(), page_size: 1, ..Default::default() })
        .await
        .unwrap()
        .into_inner();
    resp.total_hits
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn catalog_writes_through_either_replica_reach_both_watchers_in_order_and_both_indexes() {
    let pair = Pair::start().await;
    let mut watch_a = pair.on(&pair.a, "central", Role::Operator);
    let mut watch_b = pair.on(&pair.b, "central", Role::Operator);
    let mut stream_a = watch_a.watch_catalog(WatchCatalogRequest { from_version: 0 }).await.unwrap().into_inner();
    let mut stream_b = watch_b.watch_catalog(WatchCatalogRequest { from_version: 0 }).await.unwrap().into_inner();

    // tax writes through A while commerce writes through B, at the same time: 2 × 20 batches of 3.
    const BATCHES: u32 = 20;
    const PER_BATCH: u32 = 3;
    let writer = |mut client: Client, department: &'static str, base: u32| async move {
        let mut acknowledged = Vec::new();
        for b in 0..BATCHES {
            let entries: Vec<_> = (0..PER_BATCH).map(|i| entry(department, &code(base + b * PER_BATCH + i))).collect();
            let r = client.publish_entries(PublishEntriesRequest { entries }).await.unwrap().into_inner();
            acknowledged.extend(r.entry_versions);
        }
        acknowledged
    };
    let (tax_versions, commerce_versions) = tokio::join!(
        writer(pair.on(&pair.a, "tax", Role::Node), "tax", 1),
        writer(pair.on(&pair.b, "commerce", Role::Node), "commerce", 1001),
    );
    let total = (2 * BATCHES * PER_BATCH) as usize;
    assert_eq!(tax_versions.len() + commerce_versions.len(), total);

    let seen_a = take_changes(&mut stream_a, total).await;
    let seen_b = take_changes(&mut stream_b, total).await;
    let versions: Vec<u64> = seen_a.iter().map(|c| c.version).collect();
    assert_eq!(versions, (1..=total as u64).collect::<Vec<_>>(), "replica A's watcher: every version once, in order");
    let key = |cs: &[CatalogChange]| -> Vec<(u64, String)> {
        cs.iter().map(|c| (c.version, c.entry.as_ref().unwrap().resource_code.clone())).collect()
    };
    assert_eq!(key(&seen_a), key(&seen_b), "both replicas' watchers see the same log");
    // Every acknowledged version is the one the watchers saw for that writer's entries.
    let by_version: BTreeMap<u64, String> = key(&seen_a).into_iter().collect();
    for v in &tax_versions {
        assert!(by_version[v].starts_with("101001/000"), "version {v} acknowledged to tax is {}", by_version[v]);
    }
    for v in &commerce_versions {
        assert!(by_version[v].starts_with("101001/001"), "version {v} acknowledged to commerce is {}", by_version[v]);
    }

    // Both indexes hold all of them: a watcher's version is searchable on its replica.
    let mut search_a = pair.on(&pair.a, "quality", Role::Node);
    let mut search_b = pair.on(&pair.b, "quality", Role::Node);
    let tax_code = code(1);
    for client in [&mut search_a, &mut search_b] {
        assert_eq!(total_hits(client, "企业登记").await, total as u64, "every entry is searchable on both replicas");
    }

    // Each replica's admin port says how far it has applied each change log, next to the store's head.
    let metrics = admin_of(&pair, &pair.b).get_text("/metrics").await.unwrap().1;
    for line in [
        format!("gx_directory_applied_version{{log=\"catalog\"}} {total}"),
        format!("gx_directory_store_version{{log=\"catalog\"}} {total}"),
    ] {
        assert!(metrics.lines().any(|l| l == line), "{line} not in B's metrics:\n{metrics}");
    }

    // A withdrawal through B: A's watcher gets the tombstone next, and A's search drops the entry.
    let mut tax_on_b = pair.on(&pair.b, "tax", Role::Node);
    tax_on_b.withdraw_entries(WithdrawEntriesRequest { resource_codes: vec![tax_code.clone()] }).await.unwrap();
    let tomb = take_changes(&mut stream_a, 1).await.remove(0);
    assert_eq!((tomb.version, tomb.entry.as_ref().unwrap().withdrawn), (total as u64 + 1, true));
    let get = search_a
        .get_entry(GetEntryRequest { resource_code: tax_code.clone(), include_withdrawn: false })
        .await
        .unwrap_err();
    assert_eq!(get.code(), Code::NotFound);
    assert_eq!(total_hits(&mut search_a, "企业登记").await, total as u64 - 1, "withdrawn through B, gone from A's index");

    // A code is its first publisher's, even when two departments publish it through different
    // replicas at the same moment: exactly one wins.
    for n in 5000..5010 {
        let contested = code(n);
        let mut tax_on_a = pair.on(&pair.a, "tax", Role::Node);
        let mut commerce_on_b = pair.on(&pair.b, "commerce", Role::Node);
        let (t, c) = tokio::join!(
            tax_on_a.publish_entries(PublishEntriesRequest { entries: vec![entry("tax", &contested)] }),
            commerce_on_b.publish_entries(PublishEntriesRequest { entries: vec![entry("commerce", &contested)] }),
        );
        match (t, c) {
            (Ok(_), Err(e)) | (Err(e), Ok(_)) => {
                assert_eq!(e.code(), Code::PermissionDenied, "{e:?}");
                assert!(e.message().contains("already belongs to department"), "{}", e.message());
            }
            other => panic!("{contested}: exactly one publisher must win, got {other:?}"),
        }
        let owner = search_a
            .get_entry(GetEntryRequest { resource_code: contested.clone(), include_withdrawn: false })
            .await
            .unwrap()
            .into_inner()
            .provider_code;
        let owner_b = search_b
            .get_entry(GetEntryRequest { resource_code: contested.clone(), include_withdrawn: false })
            .await
            .unwrap()
            .into_inner()
            .provider_code;
        assert_eq!(owner, owner_b);
    }

    pair.a.stop().await.unwrap();
    pair.b.stop().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn grants_leases_and_revocations_made_through_one_replica_hold_on_the_other() {
    let pair = Pair::start().await;

    // A conditional resource of tax, published through A.
    let mut resource = entry("tax", &code(7));
    resource.share_type = ShareType::Conditional as i32;
    resource.share_condition = "仅用于企业身份核验，需经提供方审批".into();
    pair.on(&pair.a, "tax", Role::Node).publish_entries(PublishEntriesRequest { entries: vec![resource] }).await.unwrap();

    // tax's node watches its grants through A; commerce requests through B (once B has the entry).
    let mut tax_watch = pair.on(&pair.a, "tax", Role::Node);
    let mut grants_a = tax_watch.watch_grants(WatchGrantsRequest { from_version: 0 }).await.unwrap().into_inner();
    let mut commerce_b = pair.on(&pair.b, "commerce", Role::Operator);
    let request = RequestGrantRequest {
        resource_code: code(7),
        data_items: vec!["统一社会信用代码".into()],
        purpose: "企业开办一件事：核验企业身份".into(),
        legal_basis: String::new(),
    };
    let pending = commerce_b.request_grant(request.clone()).await.unwrap().into_inner();
    assert_eq!(pending.status, GrantStatus::Pending as i32);
    let seen = next_grant(&mut grants_a).await;
    assert_eq!(seen.grant.as_ref().unwrap().grant_id, pending.grant_id, "A's watcher sees B's grant request");

    // The second request through A is refused: one pending request per consumer and resource, whichever
    // replica it reaches.
    let mut commerce_a = pair.on(&pair.a, "commerce", Role::Operator);
    let dup = commerce_a.request_grant(request.clone()).await.unwrap_err();
    assert_eq!(dup.code(), Code::AlreadyExists, "{dup:?}");

    // Two requests at once through both replicas after a rejection: exactly one is stored.
    let mut tax_operator_b = pair.on(&pair.b, "tax", Role::Operator);
    tax_operator_b
        .decide_grant(DecideGrantRequest { grant_id: pending.grant_id.clone(), approve: false, reason: "先补充材料".into(), ..Default::default() })
        .await
        .unwrap();
    let (r1, r2) = tokio::join!(commerce_a.request_grant(request.clone()), commerce_b.request_grant(request.clone()));
    let (won, lost) = match (r1, r2) {
        (Ok(g), Err(e)) | (Err(e), Ok(g)) => (g.into_inner(), e),
        other => panic!("exactly one of two simultaneous requests must be stored, got {other:?}"),
    };
    assert_eq!(lost.code(), Code::AlreadyExists, "{lost:?}");

    // Approved through B; seen through A in order: rejected, then the new request, then approved.
    tax_operator_b
        .decide_grant(DecideGrantRequest { grant_id: won.grant_id.clone(), approve: true, ..Default::default() })
        .await
        .unwrap();
    let statuses: Vec<(String, i32)> = {
        let mut v = Vec::new();
        for _ in 0..3 {
            let g = next_grant(&mut grants_a).await.grant.unwrap();
            v.push((g.grant_id, g.status));
        }
        v
    };
    assert_eq!(
        statuses,
        vec![
            (pending.grant_id.clone(), GrantStatus::Rejected as i32),
            (won.grant_id.clone(), GrantStatus::Pending as i32),
            (won.grant_id.clone(), GrantStatus::Approved as i32),
        ]
    );

    // Node leases: registered through A, heartbeats through B, listed as online by both.
    let mut tax_node_a = pair.on(&pair.a, "tax", Role::Node);
    tax_node_a
        .register_node(RegisterNodeRequest { address: "tax-node.example:7401".into(), software_version: "test/1".into(), ..Default::default() })
        .await
        .unwrap();
    let mut tax_node_b = pair.on(&pair.b, "tax", Role::Node);
    let beat = tax_node_b.heartbeat(HeartbeatRequest::default()).await.unwrap().into_inner();
    for replica in [&pair.a, &pair.b] {
        let nodes = pair.on(replica, "central", Role::Operator).list_nodes(ListNodesRequest::default()).await.unwrap().into_inner().nodes;
        let tax = nodes.iter().find(|n| n.department == "tax").expect("tax's node listed");
        assert_eq!(tax.status, NodeStatus::Online as i32);
        assert_eq!(tax.lease_expires_unix_ms, beat.lease_expires_unix_ms, "the lease B renewed, as every replica sees it");
    }

    // A certificate revoked through A is refused by B's TLS: the quality node works on B until then.
    let quality = pair.identity("quality", Role::Node);
    client_on(&pair.b.addr, &quality).list_nodes(ListNodesRequest::default()).await.unwrap();
    let mut revocations_b = pair
        .on(&pair.b, "central", Role::Operator)
        .watch_revocations(WatchRevocationsRequest { from_version: 0 })
        .await
        .unwrap()
        .into_inner();
    pair.on(&pair.a, "central", Role::Operator)
        .revoke_certificate(RevokeCertificateRequest {
            serial_hex: quality.identity.serial_hex.clone(),
            reason: "key compromised".into(),
            ..Default::default()
        })
        .await
        .unwrap();
    let revoked = tokio::time::timeout(Duration::from_secs(10), revocations_b.next()).await.unwrap().unwrap().unwrap();
    assert_eq!(revoked.serial_hex, quality.identity.serial_hex);
    // B's watcher saw it, so B's revoked set holds it (the follower applies before it announces). TLS 1.3
    // clients finish their handshake first, so the refusal shows as a closed connection, whatever its code.
    let refused = client_on(&pair.b.addr, &quality).list_nodes(ListNodesRequest::default()).await.unwrap_err();
    assert!(matches!(refused.code(), Code::Unavailable | Code::Unauthenticated | Code::Unknown | Code::Cancelled), "{refused:?}");

    // The admin port's backup is the sled store's; on PostgreSQL it is refused with the way to do it.
    let admin = admin_of(&pair, &pair.a);
    let out = pair._tmp.path().join("directory.gxbak");
    match admin.download("/api/backup", &out).await {
        Err(client_sdk::admin::client::AdminClientError::Status { status, message }) => {
            assert_eq!(status, 501, "{message}");
            assert!(message.contains("pg_dump"), "{message}");
        }
        other => panic!("a backup of a PostgreSQL directory through its admin port: {other:?}"),
    }
    assert!(!out.exists(), "nothing written");

    pair.a.stop().await.unwrap();
    pair.b.stop().await.unwrap();
}

/// What a database restart or failover does to the replicas: every connection they hold is cut by the
/// server. Their next calls must still succeed, on fresh connections.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn replicas_ride_out_the_database_dropping_every_connection() {
    let pair = Pair::start().await;
    let mut tax_a = pair.on(&pair.a, "tax", Role::Node);
    let mut reader_b = pair.on(&pair.b, "quality", Role::Node);
    tax_a.publish_entries(PublishEntriesRequest { entries: vec![entry("tax", &code(1))] }).await.unwrap();
    wait_for("replica B to index the entry", Duration::from_secs(10), || {
        let mut c = reader_b.clone();
        async move { (total_hits(&mut c, "").await == 1).then_some(()) }
    })
    .await
    .unwrap();

    let database = pair.url.rsplit('/').next().unwrap().split('?').next().unwrap().to_string();
    let (admin, connection) =
        tokio_postgres::connect(TestPostgres::shared().admin_url(), tokio_postgres::NoTls).await.unwrap();
    tokio::spawn(connection);
    let cut = admin
        .query(
            "SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE datname = $1 AND pid <> pg_backend_pid()",
            &[&database],
        )
        .await
        .unwrap();
    assert!(!cut.is_empty(), "the replicas held connections to {database}");

    // Reads, an idempotent heartbeat-like write and a versioned write, through both replicas.
    tax_a.publish_entries(PublishEntriesRequest { entries: vec![entry("tax", &code(2))] }).await.unwrap();
    reader_b.list_nodes(ListNodesRequest::default()).await.unwrap();
    pair.on(&pair.b, "tax", Role::Node)
        .get_entry(GetEntryRequest { resource_code: code(2), include_withdrawn: false })
        .await
        .unwrap();
    wait_for("replica B to index the entry published after the cut", Duration::from_secs(10), || {
        let mut c = reader_b.clone();
        async move { (total_hits(&mut c, "").await == 2).then_some(()) }
    })
    .await
    .unwrap();

    pair.a.stop().await.unwrap();
    pair.b.stop().await.unwrap();
}
