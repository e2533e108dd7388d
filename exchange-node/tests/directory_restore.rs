//! A directory restored to an earlier moment, with nodes that have followed it further: the nodes notice
//! (the directory refuses their watch positions with OUT_OF_RANGE), drop their copy of the rules and read
//! the restored log again, so they neither keep a grant the directory no longer has nor skip the changes
//! the restored directory numbers anew.

mod common;

use std::path::Path;
use std::time::{Duration, Instant};

use client_sdk::identity::Role;
use client_sdk::ids::{validate_uscc, IdError};
use exchange_proto::v1::*;
use tokio::net::TcpListener;
use tonic::Code;

use common::*;

const PENALTIES: &str = "302001/000001"; // commerce, conditional

fn uscc(first17: &str) -> String {
    match validate_uscc(&format!("{first17}0")) {
        Ok(()) => format!("{first17}0"),
        Err(IdError::Check { expected, .. }) => format!("{first17}{expected}"),
        Err(e) => panic!("{first17}: {e}"),
    }
}

async fn rebind(addr: &str) -> TcpListener {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        match TcpListener::bind(addr).await {
            Ok(l) => return l,
            Err(_) if Instant::now() < deadline => tokio::time::sleep(Duration::from_millis(50)).await,
            Err(e) => panic!("rebinding {addr}: {e}"),
        }
    }
}

fn copy_dir(from: &Path, to: &Path) {
    std::fs::create_dir_all(to).unwrap();
    for entry in std::fs::read_dir(from).unwrap() {
        let entry = entry.unwrap();
        let target = to.join(entry.file_name());
        if entry.file_type().unwrap().is_dir() {
            copy_dir(&entry.path(), &target);
        } else {
            std::fs::copy(entry.path(), target).unwrap();
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn nodes_follow_a_directory_restored_to_an_earlier_moment() {
    let pki = Pki::new();
    let dir_data = tempfile::tempdir().unwrap();
    let snapshot = tempfile::tempdir().unwrap();
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let directory_addr = listener.local_addr().unwrap().to_string();
    let directory = TestDirectory::start(&pki, dir_data.path(), listener).await;
    let (commerce_data, tax_data) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
    let commerce = TestNode::start(|addr| {
        node_config(&pki, "commerce", &directory_addr, commerce_data.path(), Some(sample_catalog("commerce")), addr)
    })
    .await;
    let tax = TestNode::start(|addr| node_config(&pki, "tax", &directory_addr, tax_data.path(), Some(sample_catalog("tax")), addr)).await;
    wait_published_and_online(&pki, &directory_addr, &["commerce", "tax"]).await;

    // The "backup": the directory's store as it is now, before any grant.
    directory.stop().await;
    copy_dir(&dir_data.path().to_path_buf(), snapshot.path());
    let directory = TestDirectory::start(&pki, dir_data.path(), rebind(&directory_addr).await).await;

    // After the backup: tax is granted commerce's penalties, and reads them.
    let company = uscc("91350100M000300Y4");
    commerce
        .client(&pki.identity("commerce", Role::App))
        .put_records(PutRecordsRequest {
            resource_code: PENALTIES.into(),
            records: vec![Record {
                key: company.clone(),
                items: [("当事人名称".to_string(), "恢复测试公司".to_string()), ("处罚种类".to_string(), "警告".to_string())].into(),
                ..Default::default()
            }],
            ..Default::default()
        })
        .await
        .unwrap();
    let tax_dir = || client_sdk::client::directory_client(&directory_addr, &pki.identity("tax", Role::App)).unwrap();
    let commerce_dir = || client_sdk::client::directory_client(&directory_addr, &pki.identity("commerce", Role::Operator)).unwrap();
    let grant_and_read = || async {
        let grant = wait_for("a grant request", Duration::from_secs(10), || async {
            tax_dir()
                .request_grant(RequestGrantRequest {
                    resource_code: PENALTIES.into(),
                    data_items: vec!["统一社会信用代码".into(), "当事人名称".into()],
                    purpose: "纳税信用核查".into(),
                    legal_basis: "《税收征收管理法》".into(),
                })
                .await
                .ok()
                .map(|g| g.into_inner())
        })
        .await;
        commerce_dir()
            .decide_grant(DecideGrantRequest { grant_id: grant.grant_id.clone(), approve: true, ..Default::default() })
            .await
            .unwrap();
        let tax_app = tax.client(&pki.identity("tax", Role::App));
        wait_for("tax to read commerce's penalties under the grant", Duration::from_secs(10), || {
            let (mut t, company) = (tax_app.clone(), company.clone());
            async move {
                t.query_records(QueryRecordsRequest { resource_code: PENALTIES.into(), keys: vec![company], purpose: "核查".into() })
                    .await
                    .ok()
            }
        })
        .await;
        grant
    };
    let _before = grant_and_read().await;
    let commerce_op = commerce.client(&pki.identity("commerce", Role::Operator));
    let grants_seen = commerce_op.clone().node_status(NodeStatusRequest {}).await.unwrap().into_inner().grants_version;
    assert!(grants_seen >= 2, "commerce followed the request and the approval: {grants_seen}");

    // Restore the directory to the backup: the grant is gone from it, and its grant log restarts at 0.
    directory.stop().await;
    std::fs::remove_dir_all(dir_data.path()).unwrap();
    copy_dir(snapshot.path(), dir_data.path());
    let directory = TestDirectory::start(&pki, dir_data.path(), rebind(&directory_addr).await).await;

    // Commerce's node drops the grant it no longer finds at the directory: tax is refused again.
    let tax_app = tax.client(&pki.identity("tax", Role::App));
    let refused = wait_for("commerce to follow the restored directory", Duration::from_secs(15), || {
        let (mut t, company) = (tax_app.clone(), company.clone());
        async move {
            match t.query_records(QueryRecordsRequest { resource_code: PENALTIES.into(), keys: vec![company], purpose: "核查".into() }).await {
                Err(e) if e.code() == Code::PermissionDenied => Some(e),
                _ => None,
            }
        }
    })
    .await;
    assert!(refused.message().contains("302001/000001"), "{refused:?}");

    // And the changes the restored directory numbers anew reach it: a new grant works, with its first
    // versions below what commerce had seen before the restore.
    let after = grant_and_read().await;
    assert!(after.version <= grants_seen, "the new grant reuses versions the node had seen: {} <= {grants_seen}", after.version);
    let status = commerce_op.clone().node_status(NodeStatusRequest {}).await.unwrap().into_inner();
    assert!(status.directory_watch_connected, "{status:?}");

    tax.stop().await.unwrap();
    commerce.stop().await.unwrap();
    directory.stop().await;
}
