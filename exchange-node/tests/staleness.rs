//! The bound on how long a node relays from its copy of the directory's state while the directory is
//! unreachable (`relay.max_directory_staleness_seconds`), end to end in process: the real directory and
//! two department nodes (commerce provides, tax consumes) over real mutual TLS, the bound set to 3 s.
//!
//! Within the bound a query is still relayed without the directory; past it both sides refuse with
//! UNAVAILABLE naming the bound (tax's node for its application, commerce's node for a node calling it
//! directly), and `NodeStatus` says how old the copy is; once the directory is back (same data, same
//! port), relaying resumes. Event delivery follows the same bound: a change is delivered from the
//! cached state within it, held in the provider's outbox past it, and delivered once the directory is back.

mod common;

use std::time::{Duration, Instant};

use client_sdk::identity::Role;
use client_sdk::ids::{validate_uscc, IdError};
use client_sdk::tls;
use exchange_proto::v1::exchange_node_client::ExchangeNodeClient;
use exchange_proto::v1::relay_client::RelayClient;
use exchange_proto::v1::*;
use tokio::net::TcpListener;
use tonic::transport::Channel;
use tonic::Code;

use common::*;

const ENTERPRISE_REGISTRATION: &str = "101001/000001"; // commerce, unconditional
const BOUND_SECONDS: u64 = 3;

/// A valid credit code from its first 17 characters.
fn uscc(first17: &str) -> String {
    match validate_uscc(&format!("{first17}0")) {
        Ok(()) => format!("{first17}0"),
        Err(IdError::Check { expected, .. }) => format!("{first17}{expected}"),
        Err(e) => panic!("{first17}: {e}"),
    }
}

fn query(company: &str) -> QueryRecordsRequest {
    QueryRecordsRequest {
        resource_code: ENTERPRISE_REGISTRATION.into(),
        keys: vec![company.to_string()],
        purpose: "企业信用核查".into(),
    }
}

fn fetch(message_id: &str, company: &str) -> FetchRecordsRequest {
    FetchRecordsRequest {
        message_id: message_id.into(),
        resource_code: ENTERPRISE_REGISTRATION.into(),
        keys: vec![company.to_string()],
        purpose: String::new(),
    }
}

/// Binds `addr` again once the previous listener on it is gone.
async fn rebind(addr: &str) -> TcpListener {
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        match TcpListener::bind(addr).await {
            Ok(l) => return l,
            Err(_) if Instant::now() < deadline => tokio::time::sleep(Duration::from_millis(50)).await,
            Err(e) => panic!("rebinding {addr}: {e}"),
        }
    }
}

fn assert_names_the_bound(message: &str) {
    assert!(
        message.contains("max_directory_staleness_seconds") && message.contains("bound of 3s"),
        "the refusal should name the bound: {message}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn relaying_stops_past_the_staleness_bound_and_resumes_with_the_directory() {
    let pki = Pki::new();
    let dir_data = tempfile::tempdir().unwrap();
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let directory_addr = listener.local_addr().unwrap().to_string();
    let directory = TestDirectory::start(&pki, dir_data.path(), listener).await;

    let (commerce_data, tax_data) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
    let start = |dept: &'static str, data: std::path::PathBuf, catalog: Option<std::path::PathBuf>| {
        let (pki, directory_addr) = (&pki, directory_addr.clone());
        TestNode::start(move |addr| {
            let mut c = node_config(pki, dept, &directory_addr, &data, catalog, addr);
            c.relay.max_directory_staleness_seconds = BOUND_SECONDS;
            c
        })
    };
    let commerce = start("commerce", commerce_data.path().to_path_buf(), Some(sample_catalog("commerce"))).await;
    let tax = start("tax", tax_data.path().to_path_buf(), None).await;
    let central = client_sdk::client::directory_client(&directory_addr, &pki.identity("central", Role::Operator)).unwrap();
    wait_for("commerce's catalog", Duration::from_secs(10), || {
        let mut c = central.clone();
        async move { (provider_total(&mut c, "commerce").await > 0).then_some(()) }
    })
    .await;
    for dept in ["commerce", "tax"] {
        wait_for(&format!("{dept} online"), Duration::from_secs(10), || {
            let mut c = central.clone();
            async move { node_online(&mut c, dept).await }
        })
        .await;
    }

    let company = uscc("91350100M000200Y4");
    commerce
        .client(&pki.identity("commerce", Role::App))
        .put_records(PutRecordsRequest {
            resource_code: ENTERPRISE_REGISTRATION.into(),
            records: vec![Record {
                key: company.clone(),
                items: [("企业名称".to_string(), "时效测试公司".to_string())].into(),
                ..Default::default()
            }],
            ..Default::default()
        })
        .await
        .unwrap();
    let tax_app = tax.client(&pki.identity("tax", Role::App));
    let tax_operator = tax.client(&pki.identity("tax", Role::Operator));
    let status = |mut c: ExchangeNodeClient<Channel>| async move {
        c.node_status(NodeStatusRequest {}).await.unwrap().into_inner()
    };
    wait_for("tax to relay commerce's record with every watch connected", Duration::from_secs(10), || {
        let (mut t, operator, company) = (tax_app.clone(), tax_operator.clone(), company.clone());
        async move {
            t.query_records(query(&company)).await.ok()?;
            status(operator).await.directory_watch_connected.then_some(())
        }
    })
    .await;
    let s = status(tax_operator.clone()).await;
    assert_eq!((s.directory_state_age_seconds, s.directory_state_stale), (0, false), "{s:?}");
    assert_eq!(s.directory_max_staleness_seconds, BOUND_SECONDS, "{s:?}");
    // Tax subscribes to the resource's changes.
    let commerce_app = commerce.client(&pki.identity("commerce", Role::App));
    let start = tax_app.clone().subscribe(SubscribeRequest { resource_code: ENTERPRISE_REGISTRATION.into() }).await.unwrap().into_inner().start_seq;
    let change = |n: u32| {
        let mut app = commerce_app.clone();
        let company = company.clone();
        async move {
            let record = Record {
                key: company.clone(),
                items: [("企业名称".to_string(), format!("时效测试公司（第{n}次变更）"))].into(),
                ..Default::default()
            };
            app.put_records(PutRecordsRequest { resource_code: ENTERPRISE_REGISTRATION.into(), records: vec![record], ..Default::default() })
                .await
                .unwrap()
                .into_inner()
                .last_seq
        }
    };
    let received = |upto: u64| {
        let t = tax_app.clone();
        async move {
            let l = t.clone().list_subscriptions(ListSubscriptionsRequest {}).await.unwrap().into_inner();
            (l.as_consumer[0].received_upto_seq >= upto).then_some(())
        }
    };

    // ---- the directory goes away: within the bound, relaying goes on from the cached state ----
    let stopped_at = Instant::now();
    directory.stop().await;
    let served = tax_app.clone().query_records(query(&company)).await;
    assert!(stopped_at.elapsed() < Duration::from_secs(BOUND_SECONDS), "the directory took too long to stop");
    let served = served.expect("relayed within the bound without the directory").into_inner();
    assert_eq!(served.records.len(), 1);
    // A change is delivered too, from the cached state.
    let first_change = change(1).await;
    assert!(first_change > start);
    wait_for("a change delivered without the directory", Duration::from_secs(BOUND_SECONDS), || received(first_change)).await;
    assert!(!status(tax_operator.clone()).await.directory_state_stale);

    // ---- past the bound: the consumer's node refuses, saying why ----
    let err = wait_for("tax's node to refuse past the bound", Duration::from_secs(BOUND_SECONDS + 5), || {
        let (mut t, company) = (tax_app.clone(), company.clone());
        async move { t.query_records(query(&company)).await.err() }
    })
    .await;
    assert!(stopped_at.elapsed() >= Duration::from_secs(BOUND_SECONDS), "refused before the bound: {err:?}");
    assert_eq!(err.code(), Code::Unavailable, "{err:?}");
    assert_names_the_bound(err.message());
    assert!(err.message().contains(&directory_addr), "names the directory: {}", err.message());
    // The refusal is in tax's audit trail like any other.
    let refused = tax_operator
        .clone()
        .query_audit(QueryAuditRequest { result: "UNAVAILABLE".into(), ..Default::default() })
        .await
        .unwrap()
        .into_inner()
        .entries;
    assert!(refused.iter().any(|e| e.error.contains("max_directory_staleness_seconds")), "{refused:?}");

    // ... and so does the provider's node, asked directly by a node (as tax's node would).
    let channel = tls::connect_lazy(
        &commerce.addr,
        tls::peer_node_client_config(&pki.identity("tax", Role::Node), "commerce", Default::default()).unwrap(),
    )
    .unwrap();
    let err = RelayClient::new(channel.clone()).fetch_records(fetch("stale-1", &company)).await.unwrap_err();
    assert_eq!(err.code(), Code::Unavailable, "{err:?}");
    assert_names_the_bound(err.message());

    // Past the bound, a change waits in commerce's outbox: delivery stops too.
    let second_change = change(2).await;
    tokio::time::sleep(Duration::from_millis(1500)).await;
    assert!(received(second_change).await.is_none(), "delivered past the bound");

    let s = status(tax_operator.clone()).await;
    assert!(!s.directory_watch_connected);
    assert!(s.directory_state_stale, "{s:?}");
    assert!(s.directory_state_age_seconds >= BOUND_SECONDS, "{s:?}");
    assert_eq!(s.directory_max_staleness_seconds, BOUND_SECONDS);

    // ---- the directory is back (same data, same address): relaying resumes ----
    let directory = TestDirectory::start(&pki, dir_data.path(), rebind(&directory_addr).await).await;
    wait_for("tax to relay again once the directory is back", Duration::from_secs(10), || {
        let (mut t, company) = (tax_app.clone(), company.clone());
        async move { t.query_records(query(&company)).await.ok() }
    })
    .await;
    RelayClient::new(channel).fetch_records(fetch("fresh-again", &company)).await.expect("commerce serves again");
    wait_for("the held change delivered once the directory is back", Duration::from_secs(10), || received(second_change)).await;
    let s = status(tax_operator.clone()).await;
    assert!(!s.directory_state_stale && s.directory_state_age_seconds == 0, "{s:?}");

    tax.stop().await.unwrap();
    commerce.stop().await.unwrap();
    directory.stop().await;
}
