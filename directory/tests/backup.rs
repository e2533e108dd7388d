//! Backup and restore of the directory's store: a real directory on 127.0.0.1 ephemeral ports (gRPC and
//! admin port) over real mutual TLS and a sled database in a temp folder. The backup is downloaded from
//! the admin port while a writer keeps publishing entries and requesting grants; restored into a new
//! folder, the catalog (live entries and tombstones), grants in every state and revocations all come back,
//! as of one moment across the catalog and grant stores.

mod common;

use std::collections::HashSet;
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use client_sdk::admin::client::{AdminAuth, AdminClient};
use client_sdk::admin::AdminConfig;
use client_sdk::backup::{self, BackupError, RestoreOptions, ServerKind};
use client_sdk::identity::Role;
use directory::{Config, LoadedDirectory, ServerError};
use exchange_proto::v1::directory_client::DirectoryClient;
use exchange_proto::v1::*;
use tokio::net::TcpListener;
use tokio::sync::oneshot;
use tokio::task::JoinHandle;
use client_sdk::client::DirectoryChannel;

use common::*;

/// A directory served with its admin port.
struct AdminDirectory {
    addr: String,
    admin_addr: String,
    stop: Option<oneshot::Sender<()>>,
    handle: JoinHandle<Result<(), ServerError>>,
}

impl AdminDirectory {
    async fn start(mut config: Config) -> Self {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let admin_listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap().to_string();
        let admin = admin_listener.local_addr().unwrap();
        config.admin = Some(AdminConfig::new(admin));
        let loaded = LoadedDirectory::load(config).await.expect("directory loads");
        let (stop, stopped) = oneshot::channel::<()>();
        let handle = tokio::spawn(loaded.serve_with_admin(listener, Some(admin_listener), async {
            let _ = stopped.await;
        }));
        AdminDirectory { addr, admin_addr: admin.to_string(), stop: Some(stop), handle }
    }

    fn client(&self, pki: &Pki, department: &str, role: Role) -> DirectoryClient<DirectoryChannel> {
        let id = pki.identity(department, role, &format!("{department}-{role}"));
        client_sdk::client::directory_client(&self.addr, &id).unwrap()
    }

    async fn stop(mut self) {
        let _ = self.stop.take().unwrap().send(());
        tokio::time::timeout(Duration::from_secs(20), self.handle).await.expect("directory stops").unwrap().unwrap();
    }
}

fn conditional(seq: u32) -> CatalogEntry {
    let mut e = entry("tax", seq);
    e.share_type = ShareType::Conditional as i32;
    e.share_condition = "仅用于企业身份核验，需经提供方审批".into();
    e
}

fn grant_request(seq: u32) -> RequestGrantRequest {
    RequestGrantRequest {
        resource_code: format!("101001/{seq:06}"),
        data_items: vec!["统一社会信用代码".into(), "企业名称".into()],
        purpose: "企业开办一件事：核验企业身份".into(),
        legal_basis: String::new(),
    }
}

fn seq_of(code: &str) -> u32 {
    code.rsplit('/').next().unwrap().parse().unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn the_directorys_catalog_grants_and_revocations_survive_a_backup_taken_while_writing() {
    let pki = Pki::new();
    let data = tempfile::tempdir().unwrap();
    let dir = AdminDirectory::start(pki.config(data.path())).await;
    let mut tax = dir.client(&pki, "tax", Role::Operator);
    let mut police = dir.client(&pki, "police", Role::App);
    let mut central = dir.client(&pki, CENTRAL, Role::Operator);

    // ---- state: live entries and a tombstone, grants in every state, a revocation ----
    publish(&mut tax, (1..=20).map(|s| entry("tax", s)).collect()).await.unwrap();
    publish(&mut tax, (21..=24).map(conditional).collect()).await.unwrap();
    tax.withdraw_entries(WithdrawEntriesRequest { resource_codes: vec!["101001/000005".into()] }).await.unwrap();
    let approved = police.request_grant(grant_request(21)).await.unwrap().into_inner();
    tax.decide_grant(DecideGrantRequest { grant_id: approved.grant_id.clone(), approve: true, ..Default::default() })
        .await
        .unwrap();
    let rejected = police.request_grant(grant_request(22)).await.unwrap().into_inner();
    tax.decide_grant(DecideGrantRequest { grant_id: rejected.grant_id.clone(), reason: "用途不符".into(), ..Default::default() })
        .await
        .unwrap();
    let pending = police.request_grant(grant_request(23)).await.unwrap().into_inner();
    let revoked_grant = police.request_grant(grant_request(24)).await.unwrap().into_inner();
    tax.decide_grant(DecideGrantRequest { grant_id: revoked_grant.grant_id.clone(), approve: true, ..Default::default() })
        .await
        .unwrap();
    tax.revoke_grant(RevokeGrantRequest { grant_id: revoked_grant.grant_id.clone(), reason: "协议到期".into() })
        .await
        .unwrap();
    let spare = pki.identity("police", Role::Node, "police-spare");
    central
        .revoke_certificate(RevokeCertificateRequest {
            serial_hex: spare.identity.serial_hex.clone(),
            reason: "key compromised".into(),
            ..Default::default()
        })
        .await
        .unwrap();

    // ---- a writer: 20 new conditional entries, then a grant request for the first of them ----
    let batches = Arc::new(AtomicU32::new(0));
    let (stop_writer, mut writer_stopped) = oneshot::channel::<()>();
    let writer = {
        let (mut tax, mut police, batches) = (tax.clone(), police.clone(), batches.clone());
        tokio::spawn(async move {
            while writer_stopped.try_recv().is_err() {
                let first = 1000 + batches.load(Ordering::SeqCst) * 20;
                publish(&mut tax, (first..first + 20).map(conditional).collect()).await.unwrap();
                police.request_grant(grant_request(first)).await.unwrap();
                batches.fetch_add(1, Ordering::SeqCst);
            }
        })
    };
    let wait_batches = |at_least: u32| {
        let batches = batches.clone();
        async move {
            let deadline = Instant::now() + Duration::from_secs(60);
            while batches.load(Ordering::SeqCst) < at_least {
                assert!(Instant::now() < deadline, "the writer stalled");
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
        }
    };
    wait_batches(5).await;
    let files = tempfile::tempdir().unwrap();
    let file = files.path().join("directory.gxbak");
    let auth = AdminAuth {
        ca: pki.dir.path().join("ca.crt"),
        client: Some(pki.identity(CENTRAL, Role::Operator, "central-operator")),
        token: None,
    };
    let admin = AdminClient::connect(&dir.admin_addr, auth).unwrap();
    admin.download("/api/backup", &file).await.unwrap();
    let during = batches.load(Ordering::SeqCst);
    wait_batches(during + 3).await;
    let _ = stop_writer.send(());
    writer.await.unwrap();
    let written_batches = batches.load(Ordering::SeqCst);
    let summary = backup::verify_file(&file).unwrap();
    assert_eq!(summary.header.server, ServerKind::Directory);
    assert_eq!((summary.header.department.as_str(), summary.header.certificate.as_str()), (CENTRAL, "directory"));
    assert!(summary.files.is_empty());
    let leftovers: Vec<_> = std::fs::read_dir(data.path())
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .filter(|n| n.contains("backup"))
        .collect();
    assert!(leftovers.is_empty(), "{leftovers:?}");
    dir.stop().await;

    // ---- restore: a node backup is refused, a non-empty folder needs --force ----
    let target = files.path().join("restored");
    let as_node = RestoreOptions { expect_server: Some(ServerKind::ExchangeNode), force: false };
    assert!(matches!(backup::restore_into(&file, &target, &as_node).unwrap_err(), BackupError::WrongServer { .. }));
    let err = backup::restore_into(&file, data.path(), &RestoreOptions::default()).unwrap_err();
    assert!(matches!(err, BackupError::TargetNotEmpty(_)), "{err}");
    let restored = backup::restore_into(&file, &target, &RestoreOptions { expect_server: Some(ServerKind::Directory), force: false })
        .unwrap();
    assert!(restored.moved_aside.is_none());

    // ---- the restored directory: same catalog, grants and revocations ----
    let dir = AdminDirectory::start(pki.config(&target)).await;
    let mut tax = dir.client(&pki, "tax", Role::Operator);
    let version = catalog_version(&mut tax).await;
    // Every writer batch is 20 versions; the backup caught whole batches only (the store's lock).
    let base = 24 + 1;
    assert_eq!((version - base) % 20, 0, "catalog version {version}");
    let caught = ((version - base) / 20) as u32;
    assert!(caught >= 5 && caught < written_batches, "{caught} of {written_batches} writer batches");
    assert!(get(&mut tax, "101001/000005", true).await.unwrap().withdrawn);
    assert!(get(&mut tax, "101001/000006", false).await.is_ok());
    assert!(get(&mut tax, &format!("101001/{:06}", 1000 + caught * 20), true).await.is_err(), "nothing after the moment");
    let hits = tax
        .search_catalog(SearchCatalogRequest { query: "登记".into(), page_size: 1, ..Default::default() })
        .await
        .unwrap()
        .into_inner()
        .total_hits;
    assert_eq!(hits, 19 + 4 + u64::from(caught) * 20, "the index is rebuilt from the restored catalog");

    let grants = tax
        .list_grants(ListGrantsRequest { side: "provider".into(), ..Default::default() })
        .await
        .unwrap()
        .into_inner()
        .grants;
    let status = |id: &str| grants.iter().find(|g| g.grant_id == id).map(|g| GrantStatus::try_from(g.status).unwrap());
    assert_eq!(status(&approved.grant_id), Some(GrantStatus::Approved));
    assert_eq!(status(&rejected.grant_id), Some(GrantStatus::Rejected));
    assert_eq!(status(&pending.grant_id), Some(GrantStatus::Pending));
    assert_eq!(status(&revoked_grant.grant_id), Some(GrantStatus::Revoked));
    // One moment across both stores: a grant request for every batch caught, at most one batch without.
    let writer_grants: HashSet<u32> =
        grants.iter().map(|g| seq_of(&g.resource_code)).filter(|s| *s >= 1000).collect();
    assert!(writer_grants.iter().all(|s| *s < 1000 + caught * 20), "a grant for an entry not in the copy");
    assert!(writer_grants.len() as u32 == caught || writer_grants.len() as u32 + 1 == caught, "{} grants, {caught} batches", writer_grants.len());

    let revocations = tax.list_revocations(ListRevocationsRequest {}).await.unwrap().into_inner().revocations;
    assert!(revocations.iter().any(|r| r.serial_hex == spare.identity.serial_hex && r.reason == "key compromised"));
    let refused = client_sdk::client::directory_client(&dir.addr, &spare).unwrap().who_am_i(WhoAmIRequest {}).await;
    assert!(refused.is_err(), "the revoked certificate is refused by the restored directory");
    dir.stop().await;
}
