//! The node against the real directory, in process: both servers on 127.0.0.1 ephemeral ports over real
//! mutual TLS with real sled stores in temporary folders.
//!
//! Covers: registration while the directory comes up late, the catalog file published after the first
//! registration, publishing through the node (own department only; the directory's field violations
//! passed back unchanged), NodeStatus, re-registration when the directory lost the lease, a refused catalog
//! file reported and not retried, the role check at start, health, and graceful shutdown.

mod common;

use std::time::Duration;

use client_sdk::catalog::CatalogFile;
use client_sdk::identity::Role;
use client_sdk::tls;
use exchange_node::NodeError;
use exchange_proto::v1::*;
use tokio::net::TcpListener;
use tonic::Code;
use tonic_types::StatusExt;

use common::*;

#[tokio::test]
async fn node_registers_publishes_forwards_and_reregisters() {
    let pki = Pki::new();
    let directory_data = tempfile::tempdir().unwrap();
    let node_data = tempfile::tempdir().unwrap();
    // Reserve the directory's port, but start the node first: it must keep retrying until the directory is up.
    let directory_listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let directory_addr = directory_listener.local_addr().unwrap().to_string();
    drop(directory_listener);

    let node = TestNode::start(|addr| {
        node_config(&pki, "tax", &directory_addr, node_data.path(), Some(sample_catalog("tax")), addr)
    })
    .await;
    let operator = pki.identity("tax", Role::Operator);
    let status = node.client(&operator).node_status(NodeStatusRequest {}).await.unwrap().into_inner();
    assert!(!status.registered);
    tokio::time::sleep(Duration::from_millis(300)).await;

    let dir = TestDirectory::start(&pki, directory_data.path(), TcpListener::bind(&directory_addr).await.unwrap()).await;
    let mut central = client_sdk::client::directory_client(&directory_addr, &pki.identity("central", Role::Operator)).unwrap();

    // Registered with the address from the config, department and name from the certificate; the catalog
    // file published in full.
    let info = wait_for("the tax node online", Duration::from_secs(15), || {
        let mut c = central.clone();
        async move { node_online(&mut c, "tax").await }
    })
    .await;
    assert_eq!(info.address, node.addr);
    assert_eq!(info.node_name, "tax-node");
    let file_entries = CatalogFile::load_entries(&sample_catalog("tax")).unwrap().len() as u64;
    wait_for("the catalog file published", Duration::from_secs(15), || {
        let mut c = central.clone();
        async move { (provider_total(&mut c, "tax").await == file_entries).then_some(()) }
    })
    .await;

    // An app of the node's department publishes through the node.
    let app = pki.identity("tax", Role::App);
    let mut extra = CatalogFile::load_entries(&sample_catalog("tax")).unwrap().remove(0);
    extra.resource_code = "101002/000099".into();
    extra.name = "测试新增纳税人登记信息".into();
    let published = node
        .client(&app)
        .publish_catalog(PublishEntriesRequest { entries: vec![extra.clone()] })
        .await
        .expect("own department's app may publish through the node")
        .into_inner();
    assert_eq!(published.entry_versions.len(), 1);
    let got = central.get_entry(GetEntryRequest { resource_code: "101002/000099".into(), include_withdrawn: false }).await.unwrap();
    assert_eq!(got.into_inner().provider_code, "tax");

    // Another department's app may not use this node.
    let commerce_app = pki.identity("commerce", Role::App);
    let err = node
        .client(&commerce_app)
        .publish_catalog(PublishEntriesRequest { entries: vec![extra.clone()] })
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::PermissionDenied, "{err:?}");

    // The directory's field violations come back unchanged.
    let mut bad = extra.clone();
    bad.resource_code = "101002/000100".into();
    bad.share_type = ShareType::Conditional as i32;
    bad.share_condition.clear();
    let err = node.client(&app).publish_catalog(PublishEntriesRequest { entries: vec![bad] }).await.unwrap_err();
    assert_eq!(err.code(), Code::InvalidArgument, "{err:?}");
    let violations = err.get_details_bad_request().expect("BadRequest details passed through").field_violations;
    assert!(violations.iter().any(|v| v.field.starts_with("entries[0].share_condition")), "{violations:?}");

    // Withdraw through the node.
    node.client(&app)
        .withdraw_catalog(WithdrawEntriesRequest { resource_codes: vec!["101002/000099".into()] })
        .await
        .unwrap();
    let err = central
        .get_entry(GetEntryRequest { resource_code: "101002/000099".into(), include_withdrawn: false })
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::NotFound);

    // NodeStatus: operators of the department only.
    let status = node.client(&operator).node_status(NodeStatusRequest {}).await.unwrap().into_inner();
    assert!(status.registered);
    assert_eq!(status.department, "tax");
    assert_eq!(status.published_entries, file_entries + 1);
    assert!(status.catalog_version > file_entries);
    assert!(status.last_heartbeat_ok_unix_ms > 0);
    let err = node.client(&app).node_status(NodeStatusRequest {}).await.unwrap_err();
    assert_eq!(err.code(), Code::PermissionDenied);

    // Health over mTLS.
    let channel = tls::connect_lazy(&node.addr, tls::client_config(&app, &[Role::Node]).unwrap()).unwrap();
    let health = tonic_health::pb::health_client::HealthClient::new(channel)
        .check(tonic_health::pb::HealthCheckRequest { service: "govexchange.v1.ExchangeNode".into() })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(health.status, tonic_health::pb::health_check_response::ServingStatus::Serving as i32);

    // A certificate revoked at the directory is refused by the node too, once it refreshed the list.
    let revoked_app = pki.identity("tax", Role::App);
    central
        .revoke_certificate(RevokeCertificateRequest {
            serial_hex: revoked_app.identity.serial_hex.clone(),
            reason: "test".into(),
            ..Default::default()
        })
        .await
        .unwrap();
    wait_for("the node to refuse the revoked app certificate", Duration::from_secs(10), || {
        let channel = tls::connect_lazy(&node.addr, tls::client_config(&revoked_app, &[Role::Node]).unwrap()).unwrap();
        async move {
            let check = tonic_health::pb::health_client::HealthClient::new(channel)
                .check(tonic_health::pb::HealthCheckRequest { service: String::new() })
                .await;
            check.is_err().then_some(())
        }
    })
    .await;

    // The directory comes back without its state: the heartbeat is refused and the node registers again.
    dir.stop().await;
    let fresh = tempfile::tempdir().unwrap();
    let dir = TestDirectory::start(&pki, fresh.path(), TcpListener::bind(&directory_addr).await.unwrap()).await;
    let central = client_sdk::client::directory_client(&directory_addr, &pki.identity("central", Role::Operator)).unwrap();
    wait_for("the node registered again", Duration::from_secs(15), || {
        let mut c = central.clone();
        async move { node_online(&mut c, "tax").await }
    })
    .await;
    // ...and publishes its catalog file again into the empty directory.
    wait_for("the catalog file published again", Duration::from_secs(15), || {
        let mut c = central.clone();
        async move { (provider_total(&mut c, "tax").await == file_entries).then_some(()) }
    })
    .await;

    node.stop().await.expect("graceful shutdown");
    dir.stop().await;
}

#[tokio::test]
async fn refused_catalog_file_is_reported_not_retried_and_wrong_role_refuses_to_start() {
    let pki = Pki::new();
    let directory_data = tempfile::tempdir().unwrap();
    let node_data = tempfile::tempdir().unwrap();
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let directory_addr = listener.local_addr().unwrap().to_string();
    let dir = TestDirectory::start(&pki, directory_data.path(), listener).await;

    // The tax node with commerce's catalog: the directory refuses it (provider is not the certificate's).
    let node = TestNode::start(|addr| {
        node_config(&pki, "tax", &directory_addr, node_data.path(), Some(sample_catalog("commerce")), addr)
    })
    .await;
    let operator = pki.identity("tax", Role::Operator);
    let status = wait_for("the refusal recorded", Duration::from_secs(15), || {
        let mut c = node.client(&operator);
        async move {
            let s = c.node_status(NodeStatusRequest {}).await.ok()?.into_inner();
            s.last_directory_error.contains("refused").then_some(s)
        }
    })
    .await;
    assert!(status.registered, "a refused catalog does not affect the lease: {status:?}");
    assert_eq!(status.published_entries, 0);
    let mut central = client_sdk::client::directory_client(&directory_addr, &pki.identity("central", Role::Operator)).unwrap();
    assert_eq!(provider_total(&mut central, "commerce").await, 0);
    node.stop().await.unwrap();

    // A certificate of another role: the node does not start.
    let wrong = tempfile::tempdir().unwrap();
    let _ = pki.identity("tax", Role::App);
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap().to_string();
    let mut config = node_config(&pki, "tax", &directory_addr, wrong.path(), None, &addr);
    config.tls = pki.paths("tax-app");
    let err = exchange_node::server::run(listener, config, std::future::pending()).await.unwrap_err();
    assert!(matches!(err, NodeError::WrongRole { role: Role::App, .. }), "{err}");
    assert!(err.to_string().contains("role"), "{err}");

    dir.stop().await;
}
