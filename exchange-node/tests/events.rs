//! Push subscriptions and bulk sync, in process: the real directory and three department nodes
//! (commerce provides; tax and quality consume) on 127.0.0.1 ephemeral ports over real mutual TLS, real
//! sled stores in temp folders.

mod common;

use std::collections::HashMap;
use std::time::Duration;

use client_sdk::identity::Role;
use client_sdk::tls;
use exchange_proto::v1::relay_client::RelayClient;
use tonic_types::StatusExt;
use client_sdk::ids::{validate_uscc, IdError};
use exchange_proto::v1::directory_client::DirectoryClient;
use exchange_proto::v1::exchange_node_client::ExchangeNodeClient;
use exchange_proto::v1::*;
use tokio::net::TcpListener;
use tonic::transport::Channel;
use tonic::Code;

use common::*;

const ENTERPRISE_REGISTRATION: &str = "101001/000001"; // commerce, unconditional
const PENALTIES: &str = "302001/000001"; // commerce, conditional

/// The `n`-th valid credit code of a test series.
fn uscc(n: u32) -> String {
    let first17 = format!("91350100M{n:08}");
    match validate_uscc(&format!("{first17}0")) {
        Ok(()) => format!("{first17}0"),
        Err(IdError::Check { expected, .. }) => format!("{first17}{expected}"),
        Err(e) => panic!("{first17}: {e}"),
    }
}

fn enterprise(n: u32, status: &str) -> Record {
    Record {
        key: uscc(n),
        items: [("企业名称", format!("测试企业{n}有限公司")), ("登记状态", status.to_string()), ("注册资本", format!("{n}.00"))]
            .into_iter()
            .map(|(k, v)| (k.to_string(), v))
            .collect(),
        ..Default::default()
    }
}

fn penalty(n: u32) -> Record {
    Record {
        key: uscc(n),
        items: [("当事人名称", format!("测试企业{n}有限公司")), ("处罚种类", "罚款".to_string()), ("罚没金额", "20000".to_string())]
            .into_iter()
            .map(|(k, v)| (k.to_string(), v))
            .collect(),
        ..Default::default()
    }
}

struct Federation {
    pki: Pki,
    _data: Vec<tempfile::TempDir>,
    directory_addr: String,
    _directory: TestDirectory,
    nodes: HashMap<&'static str, TestNode>,
}

impl Federation {
    async fn start() -> Self {
        let pki = Pki::new();
        let mut data = Vec::new();
        let dir_data = tempfile::tempdir().unwrap();
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let directory_addr = listener.local_addr().unwrap().to_string();
        let directory = TestDirectory::start(&pki, dir_data.path(), listener).await;
        data.push(dir_data);
        let mut nodes = HashMap::new();
        for dept in ["commerce", "tax", "quality"] {
            let node_data = tempfile::tempdir().unwrap();
            let node = TestNode::start(|addr| {
                node_config(&pki, dept, &directory_addr, node_data.path(), Some(sample_catalog(dept)), addr)
            })
            .await;
            data.push(node_data);
            nodes.insert(dept, node);
        }
        wait_published_and_online(&pki, &directory_addr, &["commerce", "tax", "quality"]).await;
        Federation { pki, _data: data, directory_addr, _directory: directory, nodes }
    }

    fn app(&self, dept: &str) -> ExchangeNodeClient<Channel> {
        self.nodes[dept].client(&self.pki.identity(dept, Role::App))
    }

    fn directory_as(&self, dept: &str, role: Role) -> DirectoryClient<client_sdk::client::DirectoryChannel> {
        client_sdk::client::directory_client(&self.directory_addr, &self.pki.identity(dept, role)).unwrap()
    }
}

/// Reads `want` events from the subscription (after `after`), acknowledging each message.
async fn receive(app: &mut ExchangeNodeClient<Channel>, code: &str, after: u64, want: usize) -> Vec<RecordEvent> {
    let mut stream = app
        .receive_events(ReceiveEventsRequest { resource_code: code.into(), after_seq: after, max_batch: 0 })
        .await
        .unwrap()
        .into_inner();
    let mut got = Vec::new();
    while got.len() < want {
        let msg = tokio::time::timeout(Duration::from_secs(20), stream.message())
            .await
            .unwrap_or_else(|_| panic!("only {} of {want} events arrived", got.len()))
            .unwrap()
            .expect("stream open");
        assert!(msg.ended_reason.is_empty(), "ended: {}", msg.ended_reason);
        let last = msg.events.last().map(|e| e.seq).unwrap();
        got.extend(msg.events);
        app.ack_events(AckEventsRequest { resource_code: code.into(), upto_seq: last }).await.unwrap();
    }
    got
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn subscriptions_deliver_exactly_once_with_granted_items_and_end_on_revocation() {
    let f = Federation::start().await;
    let mut commerce = f.app("commerce");
    let mut tax = f.app("tax");

    // Records before the subscription are not events for it.
    commerce
        .put_records(PutRecordsRequest { resource_code: ENTERPRISE_REGISTRATION.into(), records: vec![enterprise(0, "存续")], ..Default::default() })
        .await
        .unwrap();
    let sub = tax.subscribe(SubscribeRequest { resource_code: ENTERPRISE_REGISTRATION.into() }).await.unwrap().into_inner();
    assert_eq!(sub.provider_code, "commerce");
    assert_eq!(sub.start_seq, 1);
    assert!(!sub.existed);
    // Subscribing again is harmless.
    let again = tax.subscribe(SubscribeRequest { resource_code: ENTERPRISE_REGISTRATION.into() }).await.unwrap().into_inner();
    assert!(again.existed);
    assert_eq!(again.start_seq, 1);

    // Three batches: new records, an update, a deregistration.
    let first: Vec<Record> = (1..=2500).map(|n| enterprise(n, "存续")).collect();
    for chunk in first.chunks(1000) {
        commerce
            .put_records(PutRecordsRequest { resource_code: ENTERPRISE_REGISTRATION.into(), records: chunk.to_vec(), ..Default::default() })
            .await
            .unwrap();
    }
    let deregistration = PublishEventsRequest {
        resource_code: ENTERPRISE_REGISTRATION.into(),
        changes: vec![
            RecordChange { record: Some(enterprise(7, "存续")), kind: RecordChangeKind::Unspecified as i32 },
            RecordChange { record: Some(enterprise(8, "注销")), kind: RecordChangeKind::Deregistered as i32 },
        ],
        batch_id: "registry-job-2026-11-22-001".into(),
    };
    let published = commerce.publish_events(deregistration.clone()).await.unwrap().into_inner();
    assert!(!published.duplicate);
    // The same batch again (as after a lost answer): not applied twice.
    let again = commerce.publish_events(deregistration).await.unwrap().into_inner();
    assert!(again.duplicate);
    assert_eq!((again.first_seq, again.last_seq), (published.first_seq, published.last_seq));
    assert_eq!((published.first_seq, published.last_seq), (2502, 2503));

    let events = receive(&mut tax, ENTERPRISE_REGISTRATION, 0, 2502).await;
    let seqs: Vec<u64> = events.iter().map(|e| e.seq).collect();
    assert_eq!(seqs, (2..=2503).collect::<Vec<_>>(), "every event once, in order");
    assert_eq!(events[0].kind(), RecordChangeKind::Created);
    assert_eq!(events[2500].kind(), RecordChangeKind::Updated);
    assert_eq!(events[2501].kind(), RecordChangeKind::Deregistered);
    assert_eq!(events[2501].record.as_ref().unwrap().items["登记状态"], "注销");
    assert_eq!(events[2501].record.as_ref().unwrap().version, 2503);

    // Acknowledged: a new stream from the node's position has nothing old.
    let list = tax.list_subscriptions(ListSubscriptionsRequest {}).await.unwrap().into_inner();
    let s = &list.as_consumer[0];
    assert_eq!((s.received_upto_seq, s.acked_upto_seq, s.backlog), (2503, 2503, 0));
    let commerce_list = commerce.list_subscriptions(ListSubscriptionsRequest {}).await.unwrap().into_inner();
    let p = &commerce_list.as_provider[0];
    assert_eq!((p.consumer_code.as_str(), p.head_seq), ("tax", 2503));
    // Re-reading from an earlier seq still held is allowed only while the inbox keeps it.
    let err = tax
        .receive_events(ReceiveEventsRequest { resource_code: ENTERPRISE_REGISTRATION.into(), after_seq: 5, max_batch: 0 })
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::OutOfRange, "{err:?}");

    // ---- conditional resource: grant needed, only granted items, revocation ends it ----
    let mut quality = f.app("quality");
    let err = quality.subscribe(SubscribeRequest { resource_code: PENALTIES.into() }).await.unwrap_err();
    assert_eq!(err.code(), Code::PermissionDenied, "{err:?}");
    let grant = f
        .directory_as("quality", Role::App)
        .request_grant(RequestGrantRequest {
            resource_code: PENALTIES.into(),
            data_items: vec!["统一社会信用代码".into(), "当事人名称".into(), "处罚种类".into()],
            purpose: "质量抽查".into(),
            legal_basis: "《产品质量法》第十五条".into(),
        })
        .await
        .unwrap()
        .into_inner();
    let mut commerce_dir = f.directory_as("commerce", Role::Operator);
    commerce_dir
        .decide_grant(DecideGrantRequest { grant_id: grant.grant_id.clone(), approve: true, ..Default::default() })
        .await
        .unwrap();
    let sub = wait_for("the grant to reach commerce", Duration::from_secs(10), || {
        let mut q = quality.clone();
        async move { q.subscribe(SubscribeRequest { resource_code: PENALTIES.into() }).await.ok() }
    })
    .await
    .into_inner();
    assert!(!sub.data_items.contains(&"罚没金额".to_string()), "{:?}", sub.data_items);
    commerce
        .put_records(PutRecordsRequest { resource_code: PENALTIES.into(), records: (1..=10).map(penalty).collect(), ..Default::default() })
        .await
        .unwrap();
    let events = receive(&mut quality, PENALTIES, 0, 10).await;
    assert_eq!(events.len(), 10);
    for e in &events {
        let items = &e.record.as_ref().unwrap().items;
        assert!(items.contains_key("处罚种类") && !items.contains_key("罚没金额"), "{items:?}");
    }

    commerce_dir
        .revoke_grant(RevokeGrantRequest { grant_id: grant.grant_id, reason: "核查结束".into() })
        .await
        .unwrap();
    wait_for("the subscription to end", Duration::from_secs(10), || {
        let mut q = quality.clone();
        async move {
            let l = q.list_subscriptions(ListSubscriptionsRequest {}).await.unwrap().into_inner();
            let s = l.as_consumer.iter().find(|s| s.resource_code == PENALTIES).unwrap().clone();
            (!s.active).then_some(s)
        }
    })
    .await;
    // Nothing published after the revocation reaches quality; its stream ends with the reason.
    commerce
        .put_records(PutRecordsRequest { resource_code: PENALTIES.into(), records: vec![penalty(11)], ..Default::default() })
        .await
        .unwrap();
    let mut stream = quality
        .receive_events(ReceiveEventsRequest { resource_code: PENALTIES.into(), after_seq: 0, max_batch: 0 })
        .await
        .unwrap()
        .into_inner();
    let last = tokio::time::timeout(Duration::from_secs(5), stream.message()).await.unwrap().unwrap().unwrap();
    assert!(last.events.is_empty());
    assert!(last.ended_reason.contains("revoked"), "{}", last.ended_reason);

    // ---- bulk sync: every record, with versions, in key order ----
    let mut snapshot = tax
        .sync_snapshot(SyncSnapshotRequest { resource_code: ENTERPRISE_REGISTRATION.into(), after_key: String::new(), purpose: "初始化".into() })
        .await
        .unwrap()
        .into_inner();
    let mut records = Vec::new();
    let mut total = 0;
    while let Some(page) = snapshot.message().await.unwrap() {
        if total == 0 {
            total = page.total_records;
            assert_eq!(page.head_seq, 2503);
        }
        records.extend(page.records);
        if page.done {
            break;
        }
    }
    assert_eq!(total, 2501);
    assert_eq!(records.len(), 2501);
    assert!(records.windows(2).all(|w| w[0].key < w[1].key));
    let r8 = records.iter().find(|r| r.key == uscc(8)).unwrap();
    assert_eq!((r8.version, r8.items["登记状态"].as_str()), (2503, "注销"));

    // ---- withdrawing the resource ends its subscriptions ----
    commerce
        .withdraw_catalog(WithdrawEntriesRequest { resource_codes: vec![ENTERPRISE_REGISTRATION.into()] })
        .await
        .unwrap();
    let ended = wait_for("tax's subscription to end with the withdrawal", Duration::from_secs(10), || {
        let mut t = tax.clone();
        async move {
            let l = t.list_subscriptions(ListSubscriptionsRequest {}).await.unwrap().into_inner();
            let s = l.as_consumer.iter().find(|s| s.resource_code == ENTERPRISE_REGISTRATION).unwrap().clone();
            (!s.active).then_some(s)
        }
    })
    .await;
    assert!(ended.ended_reason.contains("withdrawn"), "{}", ended.ended_reason);
}

fn fields(status: &tonic::Status) -> Vec<String> {
    status.get_details_bad_request().map(|b| b.field_violations.into_iter().map(|v| v.field).collect()).unwrap_or_default()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn bad_input_and_wrong_callers_are_refused_and_nothing_is_stored() {
    let f = Federation::start().await;
    let mut commerce = f.app("commerce");
    let mut tax = f.app("tax");

    // A batch with one bad record and one unknown kind: refused whole, each problem named.
    let mut bad = enterprise(2, "存续");
    bad.items.insert("成立日期".into(), "2019-02-30".into());
    let err = commerce
        .publish_events(PublishEventsRequest {
            resource_code: ENTERPRISE_REGISTRATION.into(),
            changes: vec![
                RecordChange { record: Some(enterprise(1, "存续")), kind: RecordChangeKind::Created as i32 },
                RecordChange { record: Some(bad), kind: 9 },
            ],
            ..Default::default()
        })
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::InvalidArgument, "{err:?}");
    let bad_fields = fields(&err);
    assert!(bad_fields.contains(&"changes[1].record.items[成立日期]".to_string()), "{bad_fields:?}");
    assert!(bad_fields.contains(&"changes[1].kind".to_string()), "{bad_fields:?}");
    let status = f.nodes["commerce"].client(&f.pki.identity("commerce", Role::Operator)).node_status(NodeStatusRequest {}).await.unwrap().into_inner();
    assert_eq!(status.records_stored, 0, "nothing stored");

    // Tax cannot publish commerce's resource; an unknown resource cannot be subscribed to.
    let err = tax
        .publish_events(PublishEventsRequest {
            resource_code: ENTERPRISE_REGISTRATION.into(),
            changes: vec![RecordChange { record: Some(enterprise(1, "存续")), kind: 0 }],
            ..Default::default()
        })
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::PermissionDenied, "{err:?}");
    let err = tax.subscribe(SubscribeRequest { resource_code: "101001/999999".into() }).await.unwrap_err();
    assert_eq!(err.code(), Code::NotFound, "{err:?}");
    let err = tax.subscribe(SubscribeRequest { resource_code: String::new() }).await.unwrap_err();
    assert_eq!(err.code(), Code::InvalidArgument, "{err:?}");
    // Receiving or acknowledging without a subscription.
    let err = tax
        .receive_events(ReceiveEventsRequest { resource_code: ENTERPRISE_REGISTRATION.into(), after_seq: 0, max_batch: 0 })
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::NotFound, "{err:?}");
    // Commerce cannot subscribe to its own resource.
    let err = commerce.subscribe(SubscribeRequest { resource_code: ENTERPRISE_REGISTRATION.into() }).await.unwrap_err();
    assert_eq!(err.code(), Code::FailedPrecondition, "{err:?}");

    tax.subscribe(SubscribeRequest { resource_code: ENTERPRISE_REGISTRATION.into() }).await.unwrap();
    let err = tax.ack_events(AckEventsRequest { resource_code: ENTERPRISE_REGISTRATION.into(), upto_seq: 99 }).await.unwrap_err();
    assert_eq!(err.code(), Code::InvalidArgument, "{err:?}");

    // Another department's application cannot use tax's node.
    let err = f.nodes["tax"]
        .client(&f.pki.identity("quality", Role::App))
        .receive_events(ReceiveEventsRequest { resource_code: ENTERPRISE_REGISTRATION.into(), after_seq: 0, max_batch: 0 })
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::PermissionDenied, "{err:?}");

    // An application certificate calling the node-to-node calls directly.
    let channel = tls::connect_lazy(
        &f.nodes["commerce"].addr,
        tls::client_config(&f.pki.identity("tax", Role::App), &[Role::Node]).unwrap(),
    )
    .unwrap();
    let mut relay = RelayClient::new(channel);
    let err = relay.subscribe(RelaySubscribeRequest { resource_code: ENTERPRISE_REGISTRATION.into() }).await.unwrap_err();
    assert_eq!(err.code(), Code::PermissionDenied, "{err:?}");
    let err = relay
        .fetch_snapshot(FetchSnapshotRequest { resource_code: ENTERPRISE_REGISTRATION.into(), message_id: "m2".into(), ..Default::default() })
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::PermissionDenied, "{err:?}");
    let opened = relay
        .stream_events(tokio_stream::iter(vec![EventAck { resource_code: ENTERPRISE_REGISTRATION.into(), received_upto_seq: 0 }]))
        .await;
    let err = match opened {
        Err(e) => e,
        Ok(mut s) => s.get_mut().message().await.unwrap_err(),
    };
    assert_eq!(err.code(), Code::PermissionDenied, "{err:?}");

    // Tax's node claiming to have received events commerce never wrote (what a provider restored from an
    // older backup sees): DATA_LOSS, which ends the subscription, not a silent skip of the seqs between.
    let channel = tls::connect_lazy(
        &f.nodes["commerce"].addr,
        tls::client_config(&f.pki.identity("tax", Role::Node), &[Role::Node]).unwrap(),
    )
    .unwrap();
    let opened = RelayClient::new(channel)
        .stream_events(tokio_stream::iter(vec![EventAck {
            resource_code: ENTERPRISE_REGISTRATION.into(),
            received_upto_seq: 1_000_000,
        }]))
        .await;
    let err = match opened {
        Err(e) => e,
        Ok(mut s) => s.get_mut().message().await.unwrap_err(),
    };
    assert_eq!(err.code(), Code::DataLoss, "{err:?}");
    assert!(err.message().contains("restored from an earlier backup"), "{err:?}");
}
