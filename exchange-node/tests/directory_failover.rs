//! A node given two directory replicas keeps its lease and its watches when the one it uses stops: the
//! real node and two real directories in process over mutual TLS. The replicas have separate databases
//! here, so on the second one the node registers again and reads the (empty) change logs from the start;
//! with one shared database it would simply carry on.

mod common;

use std::time::Duration;

use client_sdk::client::first_replica;
use client_sdk::identity::Role;
use exchange_proto::v1::*;
use tokio::net::TcpListener;

use common::*;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_node_moves_its_heartbeats_and_watches_to_the_next_replica() {
    let pki = Pki::new();
    let (a_data, b_data, node_data) =
        (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
    let (a_listener, b_listener) =
        (TcpListener::bind("127.0.0.1:0").await.unwrap(), TcpListener::bind("127.0.0.1:0").await.unwrap());
    let a_addr = a_listener.local_addr().unwrap().to_string();
    let b_addr = b_listener.local_addr().unwrap().to_string();
    let a = TestDirectory::start(&pki, a_data.path(), a_listener).await;
    let b = TestDirectory::start(&pki, b_data.path(), b_listener).await;

    // The node starts on the replica its certificate's serial picks: list them so that it is A.
    let serial = pki.identity("tax", Role::Node).current().serial_hex;
    let list = if first_replica(&serial, 2) == 0 { format!("{a_addr},{b_addr}") } else { format!("{b_addr},{a_addr}") };
    let node = TestNode::start(|addr| node_config(&pki, "tax", &list, node_data.path(), None, addr)).await;
    let central = pki.identity("central", Role::Operator);
    let (on_a, on_b) = (
        client_sdk::client::directory_client(&a_addr, &central).unwrap(),
        client_sdk::client::directory_client(&b_addr, &central).unwrap(),
    );
    let operator = node.client(&pki.identity("tax", Role::Operator));
    let status = || {
        let mut c = operator.clone();
        async move { c.node_status(NodeStatusRequest {}).await.unwrap().into_inner() }
    };
    wait_for("tax online on A", Duration::from_secs(10), || {
        let mut c = on_a.clone();
        async move { node_online(&mut c, "tax").await }
    })
    .await;
    wait_for("the watches connected", Duration::from_secs(10), || async {
        status().await.directory_watch_connected.then_some(())
    })
    .await;
    let mut on_b_now = on_b.clone();
    assert!(node_online(&mut on_b_now, "tax").await.is_none(), "the node used A only");

    a.stop().await;

    wait_for("tax online on B", Duration::from_secs(15), || {
        let mut c = on_b.clone();
        async move { node_online(&mut c, "tax").await }
    })
    .await;
    // The watches follow B: a revocation made there reaches the node.
    let revoked = pki.identity("tax", Role::App).current().serial_hex;
    on_b.clone()
        .revoke_certificate(RevokeCertificateRequest {
            serial_hex: revoked,
            certificate_der: vec![],
            reason: "test".into(),
        })
        .await
        .unwrap();
    wait_for("the revocation made on B applied by the node", Duration::from_secs(10), || async {
        let s = status().await;
        (s.directory_watch_connected && s.revocations_version >= 1).then_some(())
    })
    .await;
    let s = status().await;
    assert!(s.registered && s.directory_state_age_seconds == 0 && !s.directory_state_stale, "{s:?}");
    let last_beat = s.last_heartbeat_ok_unix_ms;
    wait_for("heartbeats going on against B", Duration::from_secs(10), || async {
        (status().await.last_heartbeat_ok_unix_ms > last_beat).then_some(())
    })
    .await;

    node.stop().await.expect("graceful shutdown");
    b.stop().await;
}
