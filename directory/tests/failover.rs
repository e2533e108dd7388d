//! Clients failing over between directory replicas (`client_sdk::client::DirectoryChannel`), against real
//! directories over real mutual TLS. Each replica here has a sled database of its own (they need not share
//! data for what is tested: which replica answers, and what the caller sees).

mod common;

use std::time::Duration;

use client_sdk::client::{first_replica, DirectoryChannel};
use client_sdk::identity::Role;
use client_sdk::tls::{self, RevocationSet, TlsIdentity};
use common::*;
use exchange_proto::v1::*;
use tokio::io::AsyncReadExt;
use tokio::net::TcpListener;
use tonic::Code;

/// A replica pair, each on its own temporary database, with one CA.
struct Pair {
    pki: Pki,
    _data: (tempfile::TempDir, tempfile::TempDir),
    a: TestDirectory,
    b: TestDirectory,
}

impl Pair {
    async fn start() -> Self {
        let pki = Pki::new();
        let data = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
        let a = TestDirectory::start(pki.config(data.0.path())).await;
        let b = TestDirectory::start(pki.config(data.1.path())).await;
        Pair { pki, _data: data, a, b }
    }
}

/// A channel over `first` and `second` on which `first` is the replica in use: the order is chosen for
/// `id`'s start offset.
fn channel_starting_at(first: &str, second: &str, id: &TlsIdentity) -> DirectoryChannel {
    let forward = [first.to_string(), second.to_string()];
    let backward = [second.to_string(), first.to_string()];
    let order = if forward[first_replica(&id.current().serial_hex, 2)] == first { forward } else { backward };
    let channel = DirectoryChannel::with_addresses(&order, id).unwrap();
    assert_eq!(channel.address(), first);
    channel
}

/// An address nothing listens on (connections are refused).
async fn dead_address() -> String {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    listener.local_addr().unwrap().to_string()
}

/// A "replica" that completes the TLS handshake as the directory, reads the call, and closes the
/// connection without answering: a replica dying with the request in its hands.
async fn replica_dying_mid_call(pki: &Pki) -> String {
    let id = TlsIdentity::load(&pki.paths("directory")).unwrap();
    let acceptor = tokio_rustls::TlsAcceptor::from(tls::server_config(&id, RevocationSet::default()).unwrap());
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap().to_string();
    tokio::spawn(async move {
        while let Ok((tcp, _)) = listener.accept().await {
            let acceptor = acceptor.clone();
            tokio::spawn(async move {
                let Ok(mut stream) = acceptor.accept(tcp).await else { return };
                // The client writes its preface, settings and the whole call at once; it has it all once
                // it goes quiet.
                let mut buf = vec![0u8; 64 * 1024];
                while let Ok(Ok(n)) = tokio::time::timeout(Duration::from_millis(300), stream.read(&mut buf)).await {
                    if n == 0 {
                        break;
                    }
                }
            });
        }
    });
    addr
}

fn node_registration() -> RegisterNodeRequest {
    RegisterNodeRequest {
        address: "tax-node.gov.local:7443".into(),
        software_version: "1.0".into(),
        ..Default::default()
    }
}

async fn who_am_i(channel: &DirectoryChannel) -> Result<WhoAmIResponse, tonic::Status> {
    let mut req = tonic::Request::new(WhoAmIRequest {});
    req.set_timeout(Duration::from_secs(10));
    channel.client().who_am_i(req).await.map(|r| r.into_inner())
}

#[tokio::test]
async fn calls_and_watches_move_to_the_next_replica_when_one_stops() {
    let pair = Pair::start().await;
    let node = pair.pki.identity("tax", Role::Node, "tax-node");
    // The same node known to both replicas, as with one shared database.
    for addr in [&pair.a.addr, &pair.b.addr] {
        client_sdk::client::directory_client(addr, &node).unwrap().register_node(node_registration()).await.unwrap();
    }
    let channel = channel_starting_at(&pair.a.addr, &pair.b.addr, &node);
    let mut directory = channel.client();
    directory.heartbeat(HeartbeatRequest::default()).await.unwrap();
    assert_eq!(channel.address(), pair.a.addr, "a working replica is kept");
    let mut watch = directory.watch_catalog(WatchCatalogRequest { from_version: 0 }).await.unwrap().into_inner();

    pair.a.stop().await;

    // The open watch ends (streams are not replayed); everything after goes to B without an error.
    let ended = tokio::time::timeout(Duration::from_secs(10), watch.message()).await.expect("the watch ends with A");
    assert!(!matches!(ended, Ok(Some(_))), "{ended:?}");
    directory.heartbeat(HeartbeatRequest::default()).await.expect("the heartbeat goes to B");
    assert_eq!(channel.address(), pair.b.addr);
    let nodes = directory.list_nodes(ListNodesRequest { department: "tax".into() }).await.unwrap().into_inner().nodes;
    assert_eq!(nodes.len(), 1);
    let resumed = directory.watch_catalog(WatchCatalogRequest { from_version: 0 }).await;
    assert!(resumed.is_ok(), "a watch reopened after the break lands on B: {resumed:?}");
    assert_eq!(who_am_i(&channel).await.unwrap().department, "tax");

    // A certificate rotation's re-dial keeps the replica in use and every address.
    channel.redial().unwrap();
    assert_eq!(channel.address(), pair.b.addr);
    assert_eq!(channel.addresses().len(), 2);
    directory.heartbeat(HeartbeatRequest::default()).await.unwrap();

    // An application error is B's answer, not a reason to move on.
    let missing = directory
        .get_entry(GetEntryRequest { resource_code: "101001/999999".into(), include_withdrawn: false })
        .await
        .unwrap_err();
    assert_eq!(missing.code(), Code::NotFound, "{missing:?}");
    assert_eq!(channel.address(), pair.b.addr);
    pair.b.stop().await;
}

#[tokio::test]
async fn a_replica_refusing_connections_is_skipped_and_all_down_names_every_address() {
    let pki = Pki::new();
    let data = tempfile::tempdir().unwrap();
    let b = TestDirectory::start(pki.config(data.path())).await;
    let id = pki.identity("tax", Role::App, "tax-app");
    let dead = dead_address().await;

    let channel = channel_starting_at(&dead, &b.addr, &id);
    assert_eq!(who_am_i(&channel).await.unwrap().department, "tax");
    assert_eq!(channel.address(), b.addr, "the channel stays on the replica that answered");

    // Through the SDK's client and its list syntax too.
    let list = format!("{dead},{}", b.addr);
    let mut client = client_sdk::client::directory_client(&list, &id).unwrap();
    client.who_am_i(WhoAmIRequest {}).await.unwrap();

    b.stop().await;
    let other_dead = dead_address().await;
    let channel = channel_starting_at(&dead, &other_dead, &id);
    let status = who_am_i(&channel).await.unwrap_err();
    assert_eq!(status.code(), Code::Unavailable, "{status:?}");
    assert!(status.message().contains(&dead) && status.message().contains(&other_dead), "{status:?}");
}

#[tokio::test]
async fn a_grant_request_cut_off_mid_call_is_not_sent_again_but_a_read_is() {
    let pki = Pki::new();
    let data = tempfile::tempdir().unwrap();
    let b = TestDirectory::start(pki.config(data.path())).await;
    let dying = replica_dying_mid_call(&pki).await;
    let provider = pki.identity("tax", Role::Operator, "tax-operator");
    let consumer = pki.identity("police", Role::App, "police-app");
    let mut entry = entry("tax", 1);
    entry.share_type = ShareType::Conditional as i32;
    entry.share_condition = "仅用于企业身份核验，需经提供方审批".into();
    let mut on_b = client_sdk::client::directory_client(&b.addr, &consumer).unwrap();
    publish(&mut client_sdk::client::directory_client(&b.addr, &provider).unwrap(), vec![entry]).await.unwrap();

    let channel = channel_starting_at(&dying, &b.addr, &consumer);
    let request = RequestGrantRequest {
        resource_code: "101001/000001".into(),
        data_items: vec!["统一社会信用代码".into()],
        purpose: "企业开办一件事：核验企业身份".into(),
        legal_basis: String::new(),
    };
    let status = channel.client().request_grant(request.clone()).await.unwrap_err();
    assert_eq!(status.code(), Code::Unavailable, "{status:?}");
    assert!(status.message().contains("outcome is unknown") && status.message().contains("ListGrants"), "{status:?}");
    assert!(status.message().contains(&dying), "{status:?}");
    let grants = on_b.list_grants(ListGrantsRequest::default()).await.unwrap().into_inner().grants;
    assert!(grants.is_empty(), "the request was not repeated on B: {grants:?}");
    assert_eq!(channel.address(), b.addr, "the next call goes to B");
    channel.client().request_grant(request).await.expect("B takes the request once asked again");

    // A read caught the same way is simply asked of B.
    let channel = channel_starting_at(&dying, &b.addr, &consumer);
    let grants = channel.client().list_grants(ListGrantsRequest::default()).await.unwrap().into_inner().grants;
    assert_eq!(grants.len(), 1);
    b.stop().await;
}

#[tokio::test]
async fn clients_start_on_the_replica_their_serial_picks() {
    let pki = Pki::new();
    let addrs = ["dir-a.example:7443".to_string(), "dir-b.example:7443".to_string()];
    let mut seen = std::collections::BTreeSet::new();
    for n in 0..40 {
        let id = pki.identity("tax", Role::App, &format!("tax-app-{n}"));
        let channel = DirectoryChannel::with_addresses(&addrs, &id).unwrap();
        assert_eq!(channel.address(), addrs[first_replica(&id.current().serial_hex, 2)]);
        let again = DirectoryChannel::new(&addrs.join(","), &id).unwrap();
        assert_eq!(again.address(), channel.address(), "the same certificate starts on the same replica");
        seen.insert(channel.address().to_string());
        if seen.len() == 2 {
            return;
        }
    }
    panic!("40 certificates all started on {seen:?}");
}

#[test]
fn bad_address_lists_are_refused_up_front() {
    let pki = Pki::new();
    let id = pki.identity("tax", Role::App, "tax-app");
    for (list, says) in
        [("", "no directory address given"), ("a:7443,,b:7443", "2 of 3 is empty"), ("a:7443,b", "expected host:port")]
    {
        let err = DirectoryChannel::new(list, &id).unwrap_err().to_string();
        assert!(err.contains(says), "{list:?}: {err}");
    }
    let err = DirectoryChannel::with_addresses(&[], &id).unwrap_err().to_string();
    assert!(err.contains("no directory address given"), "{err}");
}
