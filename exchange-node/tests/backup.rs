//! Backup and restore of a node's store, in process: the real directory and two department nodes (police
//! provides population records; tax holds a grant and a push subscription) on 127.0.0.1 ephemeral ports
//! over real mutual TLS, real sled stores in temp folders. The backup is taken through police's admin
//! port (`GET /api/backup`) while a writer keeps publishing, restored into a new folder, and a node
//! started there: records, change log and outbox (the subscriber receives its pending events), audit
//! chain and catalog copy all survive, as of one moment. Damaged and truncated files change nothing.

mod common;

use std::path::Path;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use client_sdk::admin::client::{AdminAuth, AdminClient};
use client_sdk::admin::AdminConfig;
use client_sdk::backup::{self, BackupError, RestoreOptions, ServerKind};
use client_sdk::identity::Role;
use client_sdk::ids::{validate_identity_number, IdError};
use client_sdk::tls::RevocationSet;
use exchange_node::audit::{self, PUBLIC_KEY_FILE};
use exchange_node::config::Config;
use exchange_node::events::Outbox;
use exchange_node::policy::Policy;
use exchange_node::records::sled::SledRecordStore;
use exchange_node::records::RecordStore;
use exchange_node::NodeError;
use exchange_proto::v1::exchange_node_client::ExchangeNodeClient;
use exchange_proto::v1::*;
use tokio::net::TcpListener;
use tokio::sync::oneshot;
use tokio::task::JoinHandle;
use tonic::transport::Channel;

use common::*;

const POPULATION: &str = "102001/000001"; // police, conditional, push_subscription

/// The `n`-th valid identity number of a test series: born 1960 onwards, one of 900 sequence numbers
/// per day, check character computed by the validator.
fn identity_number(n: u64) -> String {
    let day = n / 900;
    let (year, month, dom) = (1960 + day / 336, day / 28 % 12 + 1, day % 28 + 1);
    let first17 = format!("110105{year:04}{month:02}{dom:02}{:03}", n % 900 + 100);
    match validate_identity_number(&format!("{first17}0")) {
        Ok(()) => format!("{first17}0"),
        Err(IdError::Check { expected, .. }) => format!("{first17}{expected}"),
        Err(e) => panic!("{first17}: {e}"),
    }
}

fn person(n: u64) -> Record {
    Record {
        key: identity_number(n),
        items: [("姓名", format!("测试人员{n}")), ("民族", "汉族".to_string())]
            .into_iter()
            .map(|(k, v)| (k.to_string(), v))
            .collect(),
        ..Default::default()
    }
}

/// `count` new people from number `from` on, in one batch.
async fn put_people(app: &mut ExchangeNodeClient<Channel>, from: u64, count: u64) {
    app.put_records(PutRecordsRequest {
        resource_code: POPULATION.into(),
        records: (from..from + count).map(person).collect(),
        ..Default::default()
    })
    .await
    .unwrap();
}

/// A node served in process with its admin port on an ephemeral port too.
struct AdminNode {
    addr: String,
    admin_addr: String,
    stop: Option<oneshot::Sender<()>>,
    handle: JoinHandle<Result<(), NodeError>>,
}

impl AdminNode {
    async fn start(config: impl FnOnce(&str) -> Config) -> Self {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let admin_listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap().to_string();
        let admin = admin_listener.local_addr().unwrap();
        let mut config = config(&addr);
        config.admin = Some(AdminConfig::new(admin));
        let (stop, stopped) = oneshot::channel::<()>();
        let handle = tokio::spawn(exchange_node::server::run_with_admin(
            listener,
            Some(admin_listener),
            config,
            fast_timing(),
            async {
                let _ = stopped.await;
            },
        ));
        AdminNode { addr, admin_addr: admin.to_string(), stop: Some(stop), handle }
    }

    async fn stop(mut self) {
        let _ = self.stop.take().unwrap().send(());
        tokio::time::timeout(Duration::from_secs(20), self.handle).await.expect("node stops").unwrap().unwrap();
    }
}

fn admin_client(pki: &Pki, dept: &str, addr: &str) -> AdminClient {
    let auth = AdminAuth { ca: pki.dir.path().join("ca.crt"), client: Some(pki.identity(dept, Role::Operator)), token: None };
    AdminClient::connect(addr, auth).unwrap().with_timeout(Duration::from_secs(60))
}

/// sled lets go of its lock a moment after a node stops.
fn open_db(path: &Path) -> sled::Db {
    exchange_node::store::open_db_waiting(path, Duration::from_secs(10)).unwrap()
}

async fn as_consumer(app: &mut ExchangeNodeClient<Channel>, code: &str) -> Option<Subscription> {
    let list = app.list_subscriptions(ListSubscriptionsRequest {}).await.ok()?.into_inner();
    list.as_consumer.into_iter().find(|s| s.resource_code == code)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_running_nodes_backup_restores_records_outbox_audit_and_catalog_as_of_one_moment() {
    let pki = Pki::new();
    let dir_data = tempfile::tempdir().unwrap();
    let police_data = tempfile::tempdir().unwrap();
    let tax_data = tempfile::tempdir().unwrap();
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let directory_addr = listener.local_addr().unwrap().to_string();
    let _directory = TestDirectory::start(&pki, dir_data.path(), listener).await;
    let police = AdminNode::start(|addr| {
        node_config(&pki, "police", &directory_addr, police_data.path(), Some(sample_catalog("police")), addr)
    })
    .await;
    let tax_config =
        |addr: &str| node_config(&pki, "tax", &directory_addr, tax_data.path(), Some(sample_catalog("tax")), addr);
    let tax = TestNode::start(tax_config).await;
    wait_published_and_online(&pki, &directory_addr, &["police", "tax"]).await;
    let police_client = |role| client_sdk::client::node_client(&police.addr, &pki.identity("police", role)).unwrap();
    let mut police_app = police_client(Role::App);

    // ---- state worth keeping: records, a granted consumer with a subscription, audit entries, seals ----
    put_people(&mut police_app, 0, 500).await;
    put_people(&mut police_app, 500, 500).await;
    let mut tax_directory = client_sdk::client::directory_client(&directory_addr, &pki.identity("tax", Role::App)).unwrap();
    let grant = tax_directory
        .request_grant(RequestGrantRequest {
            resource_code: POPULATION.into(),
            data_items: vec!["姓名".into(), "民族".into()],
            purpose: "个人所得税汇算清缴身份核验".into(),
            legal_basis: String::new(),
        })
        .await
        .unwrap()
        .into_inner();
    client_sdk::client::directory_client(&directory_addr, &pki.identity("police", Role::Operator))
        .unwrap()
        .decide_grant(DecideGrantRequest { grant_id: grant.grant_id.clone(), approve: true, ..Default::default() })
        .await
        .unwrap();
    let mut tax_app = tax.client(&pki.identity("tax", Role::App));
    let first_person = identity_number(0);
    wait_for("police's grant to reach police's node", Duration::from_secs(10), || {
        let mut t = tax_app.clone();
        let key = first_person.clone();
        async move {
            let q = QueryRecordsRequest { resource_code: POPULATION.into(), keys: vec![key], purpose: "核验".into() };
            t.query_records(q).await.ok().filter(|r| r.get_ref().records.len() == 1)
        }
    })
    .await;
    let sub = tax_app.subscribe(SubscribeRequest { resource_code: POPULATION.into() }).await.unwrap().into_inner();
    assert_eq!(sub.provider_code, "police");
    put_people(&mut police_app, 1000, 300).await;
    wait_for("tax's inbox to catch up", Duration::from_secs(20), || {
        let mut t = tax_app.clone();
        async move { as_consumer(&mut t, POPULATION).await.filter(|s| s.received_upto_seq == 1300) }
    })
    .await;
    // The subscriber goes away: what is published from now on waits in police's outbox.
    tax.stop().await.unwrap();
    put_people(&mut police_app, 1300, 200).await;
    // Seals (every second in these tests) cover the relayed queries' audit entries.
    tokio::time::sleep(Duration::from_millis(1500)).await;

    // ---- a backup while a writer keeps publishing ----
    let written = Arc::new(AtomicU64::new(1500));
    let (stop_writer, mut writer_stopped) = oneshot::channel::<()>();
    let writer = {
        let mut app = police_app.clone();
        let written = written.clone();
        tokio::spawn(async move {
            loop {
                if writer_stopped.try_recv().is_ok() {
                    break;
                }
                let from = written.load(Ordering::SeqCst);
                put_people(&mut app, from, 200).await;
                written.store(from + 200, Ordering::SeqCst);
            }
        })
    };
    let wait_written = |at_least: u64| {
        let written = written.clone();
        async move {
            let deadline = Instant::now() + Duration::from_secs(60);
            while written.load(Ordering::SeqCst) < at_least {
                assert!(Instant::now() < deadline, "the writer stalled");
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
        }
    };
    wait_written(2100).await;
    let files = tempfile::tempdir().unwrap();
    let file = files.path().join("police.gxbak");
    let admin = admin_client(&pki, "police", &police.admin_addr);
    let started = Instant::now();
    let bytes = admin.download("/api/backup", &file).await.unwrap();
    let took = started.elapsed();
    let during = written.load(Ordering::SeqCst);
    wait_written(during + 400).await;
    let _ = stop_writer.send(());
    writer.await.unwrap();
    let final_count = written.load(Ordering::SeqCst);

    let summary = backup::verify_file(&file).unwrap();
    assert_eq!(summary.bytes, bytes);
    assert_eq!(summary.header.server, ServerKind::ExchangeNode);
    assert_eq!((summary.header.department.as_str(), summary.header.certificate.as_str()), ("police", "police-node"));
    assert!(summary.files.iter().any(|f| f == "audit-seal.key"), "{:?}", summary.files);
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        assert_eq!(std::fs::metadata(&file).unwrap().permissions().mode() & 0o777, 0o600);
    }
    eprintln!("backup: {} keys, {} bytes in {took:?}", summary.keys, summary.bytes);
    // Nothing left behind in the node's data_dir.
    let leftovers: Vec<_> = std::fs::read_dir(police_data.path())
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .filter(|n| n.contains("backup"))
        .collect();
    assert!(leftovers.is_empty(), "{leftovers:?}");

    police.stop().await;

    // ---- damaged files change nothing ----
    let original = std::fs::read(&file).unwrap();
    let target = files.path().join("restored");
    let mut flipped = original.clone();
    let middle = flipped.len() / 2;
    flipped[middle] ^= 0x01;
    let damaged = files.path().join("flipped.gxbak");
    std::fs::write(&damaged, &flipped).unwrap();
    let err = backup::restore_into(&damaged, &target, &RestoreOptions::default()).unwrap_err();
    assert!(matches!(err, BackupError::ChecksumMismatch { .. } | BackupError::Corrupt { .. }), "{err}");
    assert!(err.to_string().contains("corrupt"), "{err}");
    assert!(!target.exists(), "nothing restored from a damaged file");
    let truncated = files.path().join("truncated.gxbak");
    std::fs::write(&truncated, &original[..original.len() - 1000]).unwrap();
    let err = backup::restore_into(&truncated, &target, &RestoreOptions::default()).unwrap_err();
    assert!(matches!(err, BackupError::Truncated { .. }), "{err}");
    assert!(err.to_string().contains("truncated"), "{err}");
    assert!(!target.exists(), "nothing restored from a truncated file");
    let staging: Vec<_> = std::fs::read_dir(files.path())
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .filter(|n| n.contains("restoring"))
        .collect();
    assert!(staging.is_empty(), "{staging:?}");
    let wrong = RestoreOptions { expect_server: Some(ServerKind::Directory), force: false };
    assert!(matches!(backup::restore_into(&file, &target, &wrong).unwrap_err(), BackupError::WrongServer { .. }));

    // ---- restore, then check the copy offline: one consistent moment ----
    let restored = backup::restore_into(&file, &target, &RestoreOptions { expect_server: Some(ServerKind::ExchangeNode), force: false }).unwrap();
    assert_eq!(restored.data_dir, target);
    let head = {
        let db = open_db(&target.join("node.sled"));
        let records = SledRecordStore::open(&db).unwrap();
        let head = records.head_seq(POPULATION).unwrap();
        // Every write was a new person: as many records as events, whatever moment the copy caught.
        assert_eq!(records.count_resource(POPULATION).unwrap(), head, "records match the change log head");
        assert!(head >= 2100 && head < final_count, "the copy is of a moment during the writes: head {head}, {final_count} written");
        assert_eq!(head % 100, 0, "whole batches only");
        let last = records.get_many(POPULATION, &[identity_number(head - 1)]).unwrap();
        assert_eq!(last[0].as_ref().map(|r| r.version), Some(head), "the newest record is the head's");
        assert!(records.get_many(POPULATION, &[identity_number(head)]).unwrap()[0].is_none());
        // The outbox: tax's cursor, and every event after it still in the change log.
        let subs = Outbox::open(&db).unwrap().all().unwrap();
        let tax_sub = subs.iter().find(|s| s.consumer_code == "tax" && s.resource_code == POPULATION).expect("tax's subscription");
        assert!(tax_sub.active);
        let acked = tax_sub.received_upto_seq;
        assert!(acked > 0 && acked <= 1300, "tax acknowledged {acked}");
        let pending = records.events_after(POPULATION, acked, 1_000_000).unwrap();
        assert_eq!(pending.len() as u64, head - acked, "every undelivered event is kept");
        assert_eq!(pending.last().unwrap().seq, head);
        // The audit chain verifies with the restored public key, seals included.
        let key = audit::parse_verifying_key(&std::fs::read_to_string(target.join(PUBLIC_KEY_FILE)).unwrap()).unwrap();
        let verified = audit::verify(&db, &key).unwrap().expect("the restored audit chain is intact");
        assert!(verified.entries > 0 && verified.seals > 0, "{verified:?}");
        // The node's copy of the directory's rules: its catalog entries and tax's grant.
        let policy = Policy::open(&db, "police", RevocationSet::default()).unwrap();
        assert!(policy.own_entries().iter().any(|e| e.resource_code == POPULATION));
        assert!(policy.grants().iter().any(|g| g.grant_id == grant.grant_id && g.status == GrantStatus::Approved as i32));
        head
    };

    // ---- a node on the restored folder: the subscriber gets its pending events, queries work ----
    let police = AdminNode::start(|addr| {
        node_config(&pki, "police", &directory_addr, &target, Some(sample_catalog("police")), addr)
    })
    .await;
    let tax = TestNode::start(tax_config).await;
    let tax_app = tax.client(&pki.identity("tax", Role::App));
    wait_for("tax to receive the pending events from the restored node", Duration::from_secs(30), || {
        let mut t = tax_app.clone();
        async move { as_consumer(&mut t, POPULATION).await.filter(|s| s.received_upto_seq == head) }
    })
    .await;
    let newest = identity_number(head - 1);
    let q = QueryRecordsRequest { resource_code: POPULATION.into(), keys: vec![newest], purpose: "核验".into() };
    let answer = wait_for("a query answered by the restored node", Duration::from_secs(20), || {
        let mut t = tax_app.clone();
        let q = q.clone();
        async move { t.query_records(q).await.ok() }
    })
    .await
    .into_inner();
    assert_eq!(answer.records.len(), 1);
    assert_eq!(answer.records[0].items["姓名"], format!("测试人员{}", head - 1));
    let verified = client_sdk::client::node_client(&police.addr, &pki.identity("police", Role::Operator))
        .unwrap()
        .verify_audit(VerifyAuditRequest {})
        .await
        .unwrap()
        .into_inner();
    assert!(verified.intact, "{}", verified.problem);
    assert!(verified.entries > 0);
    tax.stop().await.unwrap();
    police.stop().await;
}
