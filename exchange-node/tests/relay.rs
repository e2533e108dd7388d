//! Record exchange end to end, in process: the real directory and four department nodes (commerce,
//! tax, quality, police) on 127.0.0.1 ephemeral ports over real mutual TLS, real sled stores in temp
//! folders, the sample catalogs of `deploy/local/catalog/`.
//!
//! Covers: loading records (validation, all-or-nothing, own department only), pull relay for
//! unconditional / conditional / not-shared resources, grants learned by watch within seconds
//! (approve with fewer items, revoke), field-level sharing and identity-number masking, NOT_FOUND and
//! batches with missing keys, malformed keys refused before relaying, an app certificate calling the
//! node-to-node API, another department calling a node's application API, quotas, both audit trails
//! sharing a message id and never holding a raw identity number, a tampered audit trail, a revoked node
//! certificate, and a provider that is not the department the catalog names.

mod common;

use std::collections::HashMap;
use std::time::Duration;

use client_sdk::identity::Role;
use client_sdk::ids::{validate_identity_number, validate_uscc, IdError};
use client_sdk::tls::{self, TlsIdentity};
use exchange_node::quota::QuotaRule;
use exchange_proto::v1::directory_client::DirectoryClient;
use exchange_proto::v1::exchange_node_client::ExchangeNodeClient;
use exchange_proto::v1::relay_client::RelayClient;
use exchange_proto::v1::*;
use tokio::net::TcpListener;
use tonic::transport::Channel;
use tonic::Code;
use tonic_types::StatusExt;

use common::*;

/// A valid credit code from its first 17 characters (the check character computed by the validator).
fn uscc(first17: &str) -> String {
    match validate_uscc(&format!("{first17}0")) {
        Ok(()) => format!("{first17}0"),
        Err(IdError::Check { expected, .. }) => format!("{first17}{expected}"),
        Err(e) => panic!("{first17}: {e}"),
    }
}

/// A valid identity number from its first 17 characters.
fn identity_number(first17: &str) -> String {
    match validate_identity_number(&format!("{first17}0")) {
        Ok(()) => format!("{first17}0"),
        Err(IdError::Check { expected, .. }) => format!("{first17}{expected}"),
        Err(e) => panic!("{first17}: {e}"),
    }
}

fn record(key: &str, items: &[(&str, &str)]) -> Record {
    Record {
        key: key.to_string(),
        items: items.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect(),
        updated_at_unix_ms: 0,
        version: 0,
    }
}

const ENTERPRISE_REGISTRATION: &str = "101001/000001"; // commerce, unconditional
const PENALTIES: &str = "302001/000001"; // commerce, conditional
const POPULATION: &str = "102001/000001"; // police, conditional
const MIGRATIONS: &str = "304001/000001"; // police, not shared

struct Federation {
    pki: Pki,
    _data: Vec<tempfile::TempDir>,
    directory_addr: String,
    directory: Option<TestDirectory>,
    nodes: HashMap<&'static str, TestNode>,
}

impl Federation {
    /// The directory and one node per department, each publishing its sample catalog; waits until every
    /// catalog is searchable.
    async fn start(quotas: Vec<QuotaRule>) -> Self {
        let pki = Pki::new();
        let mut data = Vec::new();
        let dir_data = tempfile::tempdir().unwrap();
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let directory_addr = listener.local_addr().unwrap().to_string();
        let directory = TestDirectory::start(&pki, dir_data.path(), listener).await;
        data.push(dir_data);
        let mut nodes = HashMap::new();
        for dept in ["commerce", "tax", "quality", "police"] {
            let node_data = tempfile::tempdir().unwrap();
            let quotas = quotas.clone();
            let node = TestNode::start(|addr| {
                let mut c = node_config(&pki, dept, &directory_addr, node_data.path(), Some(sample_catalog(dept)), addr);
                c.quotas = quotas;
                c
            })
            .await;
            data.push(node_data);
            nodes.insert(dept, node);
        }
        wait_published_and_online(&pki, &directory_addr, &["commerce", "tax", "quality", "police"]).await;
        Federation { pki, _data: data, directory_addr, directory: Some(directory), nodes }
    }

    fn app(&self, dept: &str) -> ExchangeNodeClient<Channel> {
        self.nodes[dept].client(&self.pki.identity(dept, Role::App))
    }

    fn operator(&self, dept: &str) -> ExchangeNodeClient<Channel> {
        self.nodes[dept].client(&self.pki.identity(dept, Role::Operator))
    }

    fn directory_as(&self, dept: &str, role: Role) -> DirectoryClient<client_sdk::client::DirectoryChannel> {
        client_sdk::client::directory_client(&self.directory_addr, &self.pki.identity(dept, role)).unwrap()
    }

    fn identity(&self, dept: &str, role: Role) -> TlsIdentity {
        self.pki.identity(dept, role)
    }
}

fn query(resource: &str, keys: &[&str]) -> QueryRecordsRequest {
    QueryRecordsRequest {
        resource_code: resource.into(),
        keys: keys.iter().map(|k| k.to_string()).collect(),
        purpose: "企业信用核查".into(),
    }
}

/// The last sequence number in an audit entries tree.
fn entries_before_cut(entries: &sled::Tree) -> u64 {
    entries.last().unwrap().map(|(k, _)| u64::from_be_bytes(k.as_ref().try_into().unwrap())).unwrap_or(0)
}

/// Loads one penalty record of `company` into commerce's conditional resource.
async fn commerce_records(f: &Federation, company: &str) {
    f.app("commerce")
        .put_records(PutRecordsRequest {
            resource_code: PENALTIES.into(),
            records: vec![record(company, &[("当事人名称", "配额测试公司"), ("处罚种类", "警告")])],
            ..Default::default()
        })
        .await
        .unwrap();
}

fn fields(status: &tonic::Status) -> Vec<String> {
    status.get_details_bad_request().map(|b| b.field_violations.into_iter().map(|v| v.field).collect()).unwrap_or_default()
}

async fn audit(node: &mut ExchangeNodeClient<Channel>, filter: QueryAuditRequest) -> Vec<AuditEntry> {
    node.query_audit(filter).await.unwrap().into_inner().entries
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn records_relay_with_grants_masking_and_audit() {
    let f = Federation::start(Vec::new()).await;
    let company = uscc("91350100M000100Y4");
    let other_company = uscc("91110108MA01ABCD1");

    // ---- loading records: own department only, validated, all or nothing ----
    let mut commerce_app = f.app("commerce");
    let good = record(
        &company,
        &[
            ("企业名称", "福州市闽江数据科技有限公司"),
            ("法定代表人", "林海"),
            ("注册资本", "1000.50"),
            ("成立日期", "2015-06-18"),
            ("登记状态", "存续"),
            ("所属行业", "软件和信息技术服务业"),
            ("更新时间", "2026-11-01T08:30:00+08:00"),
        ],
    );
    let bad_batch = PutRecordsRequest {
        resource_code: ENTERPRISE_REGISTRATION.into(),
        records: vec![
            good.clone(),
            record("91310115MA1H8R7C6D", &[("企业名称", "校验位错误的公司")]),
            record(&other_company, &[("注册资本", "一千万"), ("成立日期", "2019-02-30"), ("不存在的信息项", "x")]),
        ],
        ..Default::default()
    };
    let err = commerce_app.put_records(bad_batch).await.unwrap_err();
    assert_eq!(err.code(), Code::InvalidArgument, "{err:?}");
    let bad_fields = fields(&err);
    for expected in ["records[1].key", "records[2].items[注册资本]", "records[2].items[成立日期]", "records[2].items[不存在的信息项]"] {
        assert!(bad_fields.iter().any(|f| f == expected), "{expected} missing from {bad_fields:?}");
    }
    assert!(!bad_fields.iter().any(|f| f.starts_with("records[0]")), "{bad_fields:?}");
    let mut commerce_op = f.operator("commerce");
    assert_eq!(commerce_op.node_status(NodeStatusRequest {}).await.unwrap().into_inner().records_stored, 0, "nothing stored");

    let stored = commerce_app
        .put_records(PutRecordsRequest {
            resource_code: ENTERPRISE_REGISTRATION.into(),
            records: vec![good.clone(), record(&other_company, &[("企业名称", "北京另一家公司"), ("登记状态", "吊销")])],
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner()
        .stored;
    assert_eq!(stored, 2);
    commerce_app
        .put_records(PutRecordsRequest {
            resource_code: PENALTIES.into(),
            records: vec![record(
                &company,
                &[("当事人名称", "福州市闽江数据科技有限公司"), ("处罚种类", "罚款"), ("罚没金额", "20000")],
            )],
            ..Default::default()
        })
        .await
        .unwrap();
    // Tax cannot load records of commerce's resource.
    let err = f
        .app("tax")
        .put_records(PutRecordsRequest { resource_code: ENTERPRISE_REGISTRATION.into(), records: vec![good.clone()], ..Default::default() })
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::PermissionDenied, "{err:?}");

    // ---- unconditional: tax reads commerce's enterprise registration ----
    let mut tax_app = f.app("tax");
    let answer = tax_app.query_records(query(ENTERPRISE_REGISTRATION, &[&company])).await.unwrap().into_inner();
    assert_eq!(answer.provider_code, "commerce");
    assert_eq!(answer.records.len(), 1);
    let r = &answer.records[0];
    assert_eq!(r.key, company);
    assert_eq!(r.items["企业名称"], "福州市闽江数据科技有限公司");
    assert_eq!(r.items["统一社会信用代码"], company, "the key item is stored with the record");
    assert!(answer.masked_items.is_empty());
    let message_id = answer.message_id.clone();
    assert_eq!(message_id.len(), 32);

    // A batch: found ones in order, missing ones by index; a single unknown key is NOT_FOUND.
    let unknown = uscc("91440300MA5FUNKN0");
    let batch = tax_app
        .query_records(query(ENTERPRISE_REGISTRATION, &[&other_company, &unknown, &company]))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(batch.records.iter().map(|r| r.key.as_str()).collect::<Vec<_>>(), vec![other_company.as_str(), company.as_str()]);
    assert_eq!(batch.not_found, vec![1]);
    let err = tax_app.query_records(query(ENTERPRISE_REGISTRATION, &[&unknown])).await.unwrap_err();
    assert_eq!(err.code(), Code::NotFound, "{err:?}");

    // A malformed key is refused by tax's own node; nothing reaches commerce.
    let err = tax_app.query_records(query(ENTERPRISE_REGISTRATION, &["91310115MA1H8R7C6D"])).await.unwrap_err();
    assert_eq!(err.code(), Code::InvalidArgument);
    assert_eq!(fields(&err), vec!["keys[0]".to_string()]);

    // ---- both audit trails carry the same message id ----
    let mut tax_op = f.operator("tax");
    let consumer_side = audit(&mut tax_op, QueryAuditRequest { message_id: message_id.clone(), ..Default::default() }).await;
    let provider_side = audit(&mut commerce_op, QueryAuditRequest { message_id: message_id.clone(), ..Default::default() }).await;
    assert_eq!(consumer_side.len(), 1);
    assert_eq!(provider_side.len(), 1);
    let (c, p) = (&consumer_side[0], &provider_side[0]);
    assert_eq!((c.side.as_str(), p.side.as_str()), ("consumer", "provider"));
    assert_eq!((c.consumer.as_str(), c.provider.as_str()), ("tax", "commerce"));
    assert_eq!((p.consumer.as_str(), p.provider.as_str()), ("tax", "commerce"));
    assert_eq!(c.caller, "tax-app");
    assert_eq!(p.caller, "tax-node");
    assert!(c.request_in_us <= c.request_out_us && c.request_out_us <= c.response_in_us && c.response_in_us <= c.response_out_us);
    assert!(p.request_in_us <= p.request_out_us && p.request_out_us <= p.response_in_us && p.response_in_us <= p.response_out_us);
    assert!(c.request_out_us <= p.request_in_us + 1_000_000, "clocks of one machine");
    assert!(!c.key_hash.contains(&company) && !p.key_hash.contains(&company));
    assert_eq!(p.data_items, c.data_items);
    assert!(p.response_bytes > 0 && p.request_bytes > 0);
    // The invalid query is audited by tax (it reached tax's node) and never reached commerce.
    let refused = audit(&mut tax_op, QueryAuditRequest { result: "INVALID_ARGUMENT".into(), ..Default::default() }).await;
    assert_eq!(refused.len(), 1);
    let by_key = audit(&mut commerce_op, QueryAuditRequest { record_key: company.clone(), ..Default::default() }).await;
    assert!(by_key.iter().any(|e| e.message_id == message_id), "a record key finds its entries through the keyed hash");

    // ---- conditional: quality is refused until commerce approves, then gets only the granted items ----
    let mut quality_app = f.app("quality");
    let err = quality_app.query_records(query(PENALTIES, &[&company])).await.unwrap_err();
    assert_eq!(err.code(), Code::PermissionDenied, "{err:?}");
    assert!(err.message().contains("no grant"), "{}", err.message());
    let mut quality_dir = f.directory_as("quality", Role::App);
    let grant = quality_dir
        .request_grant(RequestGrantRequest {
            resource_code: PENALTIES.into(),
            data_items: vec!["统一社会信用代码".into(), "当事人名称".into(), "处罚种类".into(), "罚没金额".into()],
            purpose: "产品质量监督抽查对象信用核查".into(),
            legal_basis: "《产品质量法》第十五条".into(),
        })
        .await
        .unwrap()
        .into_inner();
    // Commerce's node hears of the request by watch; until the decision, the refusal says it is pending.
    wait_for("commerce's node to know the request is pending", Duration::from_secs(5), || {
        let mut q = quality_app.clone();
        let company = company.clone();
        async move {
            let err = q.query_records(query(PENALTIES, &[&company])).await.unwrap_err();
            assert_eq!(err.code(), Code::PermissionDenied);
            err.message().contains("pending").then_some(())
        }
    })
    .await;
    let mut commerce_dir = f.directory_as("commerce", Role::Operator);
    commerce_dir
        .decide_grant(DecideGrantRequest {
            grant_id: grant.grant_id.clone(),
            approve: true,
            granted_items: vec!["统一社会信用代码".into(), "当事人名称".into(), "处罚种类".into()],
            expires_at_unix_ms: 0,
            reason: "同意，金额不予共享".into(),
        })
        .await
        .unwrap();
    let served = wait_for("the approval to reach commerce's node", Duration::from_secs(5), || {
        let mut q = quality_app.clone();
        let company = company.clone();
        async move { q.query_records(query(PENALTIES, &[&company])).await.ok().map(|r| r.into_inner()) }
    })
    .await;
    let items: Vec<&str> = served.records[0].items.keys().map(|k| k.as_str()).collect();
    assert!(items.contains(&"处罚种类") && items.contains(&"当事人名称"), "{items:?}");
    assert!(!items.contains(&"罚没金额"), "an item not granted never leaves commerce: {items:?}");
    assert_eq!(served.data_items, vec!["统一社会信用代码", "当事人名称", "处罚种类"]);

    // Revoking stops it within seconds.
    commerce_dir
        .revoke_grant(RevokeGrantRequest { grant_id: grant.grant_id.clone(), reason: "核查结束".into() })
        .await
        .unwrap();
    let err = wait_for("the revocation to reach commerce's node", Duration::from_secs(5), || {
        let mut q = quality_app.clone();
        let company = company.clone();
        async move { q.query_records(query(PENALTIES, &[&company])).await.err() }
    })
    .await;
    assert_eq!(err.code(), Code::PermissionDenied);
    assert!(err.message().contains("revoked"), "{}", err.message());

    // ---- population: the identity number leaves police masked unless granted ----
    let person = identity_number("11010519491231002");
    let mut police_app = f.app("police");
    police_app
        .put_records(PutRecordsRequest {
            resource_code: POPULATION.into(),
            records: vec![record(
                &person,
                &[("姓名", "张三"), ("性别", "女"), ("出生日期", "1949-12-31"), ("民族", "汉族"), ("户籍地", "北京市朝阳区")],
            )],
            ..Default::default()
        })
        .await
        .unwrap();
    // A sex that contradicts the number is refused, without quoting the number.
    let err = police_app
        .put_records(PutRecordsRequest {
            resource_code: POPULATION.into(),
            records: vec![record(&person, &[("性别", "男")])],
            ..Default::default()
        })
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::InvalidArgument);
    assert!(!format!("{err:?}").contains(&person), "no raw identity number in errors");
    let mut tax_dir = f.directory_as("tax", Role::App);
    let grant = tax_dir
        .request_grant(RequestGrantRequest {
            resource_code: POPULATION.into(),
            data_items: vec!["姓名".into(), "性别".into(), "出生日期".into()],
            purpose: "个人所得税汇算清缴身份核验".into(),
            legal_basis: String::new(),
        })
        .await
        .unwrap()
        .into_inner();
    f.directory_as("police", Role::Operator)
        .decide_grant(DecideGrantRequest { grant_id: grant.grant_id, approve: true, ..Default::default() })
        .await
        .unwrap();
    let answer = wait_for("police's grant", Duration::from_secs(5), || {
        let mut t = tax_app.clone();
        let person = person.clone();
        async move { t.query_records(query(POPULATION, &[&person])).await.ok().map(|r| r.into_inner()) }
    })
    .await;
    let r = &answer.records[0];
    assert_eq!(r.key, "110105********002X");
    assert_eq!(r.items["公民身份号码"], "110105********002X");
    assert_eq!(r.items["姓名"], "张三");
    assert!(!r.items.contains_key("户籍地"));
    assert_eq!(answer.masked_items, vec!["公民身份号码"]);
    // Neither audit trail holds the number.
    for dept in ["tax", "police"] {
        let entries = audit(&mut f.operator(dept), QueryAuditRequest { limit: 1000, ..Default::default() }).await;
        assert!(!format!("{entries:?}").contains(&person), "{dept}'s audit trail holds a raw identity number");
    }

    // ---- not shared: nobody ----
    let err = tax_app.query_records(query(MIGRATIONS, &[&person])).await.unwrap_err();
    assert_eq!(err.code(), Code::PermissionDenied);
    assert!(err.message().contains("not shared"), "{}", err.message());

    // ---- wrong callers ----
    // An application certificate calling the node-to-node API directly.
    let channel = tls::connect_lazy(
        &f.nodes["commerce"].addr,
        tls::client_config(&f.identity("tax", Role::App), &[Role::Node]).unwrap(),
    )
    .unwrap();
    let err = RelayClient::new(channel)
        .fetch_records(FetchRecordsRequest {
            message_id: "m1".into(),
            resource_code: ENTERPRISE_REGISTRATION.into(),
            keys: vec![company.clone()],
            purpose: String::new(),
        })
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::PermissionDenied, "{err:?}");
    let refused = audit(&mut commerce_op, QueryAuditRequest { message_id: "m1".into(), ..Default::default() }).await;
    assert_eq!(refused[0].result_code, Code::PermissionDenied as i32, "refusals are audited where they reach a node");
    // Another department's application on commerce's application API.
    let err = f.nodes["commerce"]
        .client(&f.identity("tax", Role::App))
        .query_records(query(ENTERPRISE_REGISTRATION, &[&company]))
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::PermissionDenied);
    let refused = audit(&mut commerce_op, QueryAuditRequest { result: "PERMISSION_DENIED".into(), ..Default::default() }).await;
    assert!(refused.iter().any(|e| e.side == "consumer" && e.caller == "tax-app"), "the attempt is audited where it arrived");
    // A node certificate of quality, asking commerce as if it were tax: the consumer is the certificate.
    let channel = tls::connect_lazy(
        &f.nodes["commerce"].addr,
        tls::peer_node_client_config(&f.identity("quality", Role::Node), "commerce", Default::default()).unwrap(),
    )
    .unwrap();
    let err = RelayClient::new(channel)
        .fetch_records(FetchRecordsRequest {
            message_id: "m2".into(),
            resource_code: PENALTIES.into(),
            keys: vec![company.clone()],
            purpose: "我是税务局".into(),
        })
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::PermissionDenied);
    // A node that is not of the department the catalog names is refused by the caller's TLS check.
    let channel = tls::connect(
        &f.nodes["quality"].addr,
        tls::peer_node_client_config(&f.identity("tax", Role::Node), "commerce", Default::default()).unwrap(),
    )
    .await;
    assert!(channel.is_err(), "quality's node must not pass as commerce's");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn quotas_revoked_certificates_and_a_tampered_audit_trail() {
    let rule = QuotaRule { consumer: "tax".into(), resource: ENTERPRISE_REGISTRATION.into(), per_second: 1, burst: Some(2) };
    let f = Federation::start(vec![rule]).await;
    let company = uscc("91350100M000100Y4");
    f.app("commerce")
        .put_records(PutRecordsRequest {
            resource_code: ENTERPRISE_REGISTRATION.into(),
            records: vec![record(&company, &[("企业名称", "配额测试公司")])],
            ..Default::default()
        })
        .await
        .unwrap();

    // ---- quota: two at once, then RESOURCE_EXHAUSTED with when to retry ----
    let mut tax_app = f.app("tax");
    for _ in 0..2 {
        tax_app.query_records(query(ENTERPRISE_REGISTRATION, &[&company])).await.unwrap();
    }
    let err = tax_app.query_records(query(ENTERPRISE_REGISTRATION, &[&company])).await.unwrap_err();
    assert_eq!(err.code(), Code::ResourceExhausted, "{err:?}");
    let retry = err.get_details_retry_info().and_then(|r| r.retry_delay).expect("RetryInfo");
    assert!(retry > Duration::ZERO && retry <= Duration::from_secs(1), "{retry:?}");
    // Quality has no rule: not limited.
    for _ in 0..5 {
        f.app("quality").query_records(query(ENTERPRISE_REGISTRATION, &[&company])).await.unwrap();
    }
    tokio::time::sleep(retry).await;
    tax_app.query_records(query(ENTERPRISE_REGISTRATION, &[&company])).await.unwrap();

    // ---- an expired grant: served until its expiry, refused after, saying so ----
    commerce_records(&f, &company).await;
    let grant = f
        .directory_as("tax", Role::App)
        .request_grant(RequestGrantRequest {
            resource_code: PENALTIES.into(),
            data_items: vec!["当事人名称".into()],
            purpose: "欠税企业处罚情况核查".into(),
            legal_basis: String::new(),
        })
        .await
        .unwrap()
        .into_inner();
    let expires = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().as_millis() as i64 + 4_000;
    f.directory_as("commerce", Role::Operator)
        .decide_grant(DecideGrantRequest { grant_id: grant.grant_id, approve: true, expires_at_unix_ms: expires, ..Default::default() })
        .await
        .unwrap();
    wait_for("the expiring grant to reach commerce", Duration::from_secs(3), || {
        let mut t = tax_app.clone();
        let company = company.clone();
        async move { t.query_records(query(PENALTIES, &[&company])).await.ok() }
    })
    .await;
    let err = wait_for("the grant to expire", Duration::from_secs(8), || {
        let mut t = tax_app.clone();
        let company = company.clone();
        async move { t.query_records(query(PENALTIES, &[&company])).await.err() }
    })
    .await;
    assert_eq!(err.code(), Code::PermissionDenied);
    assert!(err.message().contains("expired"), "{}", err.message());

    // ---- a revoked node certificate is refused by the provider within seconds ----
    let quality_node = f.identity("quality", Role::Node);
    let serial = quality_node.identity.serial_hex.clone();
    f.directory_as("central", Role::Operator)
        .revoke_certificate(RevokeCertificateRequest { serial_hex: serial, certificate_der: vec![], reason: "key compromised".into() })
        .await
        .unwrap();
    let commerce_addr = f.nodes["commerce"].addr.clone();
    wait_for("commerce to refuse quality's revoked node certificate", Duration::from_secs(5), || {
        let id = quality_node.clone();
        let addr = commerce_addr.clone();
        let company = company.clone();
        async move {
            let config = tls::peer_node_client_config(&id, "commerce", Default::default()).unwrap();
            let Ok(channel) = tls::connect(&addr, config).await else { return Some(()) };
            let result = RelayClient::new(channel)
                .fetch_records(FetchRecordsRequest {
                    message_id: "after-revocation".into(),
                    resource_code: ENTERPRISE_REGISTRATION.into(),
                    keys: vec![company],
                    purpose: String::new(),
                })
                .await;
            result.is_err().then_some(())
        }
    })
    .await;
    let status = f.operator("commerce").node_status(NodeStatusRequest {}).await.unwrap().into_inner();
    assert!(status.revocations_version >= 1);

    // ---- a tampered audit trail is found, and where ----
    let mut commerce_op = f.operator("commerce");
    let report = commerce_op.verify_audit(VerifyAuditRequest {}).await.unwrap().into_inner();
    assert!(report.intact, "{report:?}");
    assert!(report.entries >= 3);
    // The directory holds an anchor: the latest seal, reported with the heartbeats.
    let entries = report.entries;
    let mut central = f.directory_as("central", Role::Operator);
    wait_for("the directory to anchor commerce's audit trail", Duration::from_secs(10), || {
        let mut c = central.clone();
        async move {
            let nodes = c.list_nodes(ListNodesRequest { department: "commerce".into() }).await.ok()?.into_inner().nodes;
            nodes.into_iter().find_map(|n| n.audit_anchor).filter(|a| a.upto_seq >= entries)
        }
    })
    .await;
    let _ = &mut central;
    let mut nodes = f.nodes;
    let commerce = nodes.remove("commerce").unwrap();
    let data_dir = f._data[1].path().to_path_buf();
    commerce.stop().await.unwrap();
    let directory_addr = f.directory_addr.clone();
    let pki = f.pki;

    // Cutting sealed entries off the end, seals and all, leaves a chain that checks out locally; the
    // directory's anchor gives it away.
    {
        let db = exchange_node::audit::open_db_waiting(&data_dir.join("node.sled"), Duration::from_secs(10)).unwrap();
        let entries = db.open_tree("audit").unwrap();
        for seq in 4..=entries_before_cut(&entries) {
            entries.remove(seq.to_be_bytes()).unwrap();
        }
        db.open_tree("audit_seals").unwrap().clear().unwrap();
        db.flush().unwrap();
    }
    let restarted = TestNode::start(|addr| node_config(&pki, "commerce", &directory_addr, &data_dir, None, addr)).await;
    let report = restarted.client(&pki.identity("commerce", Role::Operator)).verify_audit(VerifyAuditRequest {}).await.unwrap().into_inner();
    assert!(!report.intact && report.anchor_checked, "{report:?}");
    assert!(report.problem.contains("cut off"), "{}", report.problem);
    assert_eq!(report.problem_seq, 4);
    restarted.stop().await.unwrap();

    {
        let db = exchange_node::audit::open_db_waiting(&data_dir.join("node.sled"), Duration::from_secs(10)).unwrap();
        // What someone with access to the disk might do: turn a refusal into a success.
        let entries = db.open_tree("audit").unwrap();
        let key = 2u64.to_be_bytes();
        let mut entry: serde_json::Value = serde_json::from_slice(&entries.get(key).unwrap().unwrap()).unwrap();
        entry["record"]["result_code"] = serde_json::json!(0);
        entry["record"]["response_bytes"] = serde_json::json!(1);
        entries.insert(key, serde_json::to_vec(&entry).unwrap()).unwrap();
        db.flush().unwrap();
    }
    let restarted = TestNode::start(|addr| node_config(&pki, "commerce", &directory_addr, &data_dir, None, addr)).await;
    let report = restarted.client(&pki.identity("commerce", Role::Operator)).verify_audit(VerifyAuditRequest {}).await.unwrap().into_inner();
    assert!(!report.intact);
    assert_eq!(report.problem_seq, 2, "{report:?}");
    assert!(report.problem.contains('2'), "{}", report.problem);
}

/// The directory is down: the consumer's node still finds the provider (its stored resolution) and the
/// provider's node, even restarted, still enforces the grant from its stored copy of the rules.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn relaying_goes_on_from_the_stored_rules_while_the_directory_is_down() {
    let mut f = Federation::start(Vec::new()).await;
    let company = uscc("91350100M000100Y4");
    commerce_records(&f, &company).await;
    let grant = f
        .directory_as("quality", Role::App)
        .request_grant(RequestGrantRequest {
            resource_code: PENALTIES.into(),
            data_items: vec!["当事人名称".into()],
            purpose: "抽查对象信用核查".into(),
            legal_basis: String::new(),
        })
        .await
        .unwrap()
        .into_inner();
    f.directory_as("commerce", Role::Operator)
        .decide_grant(DecideGrantRequest { grant_id: grant.grant_id, approve: true, ..Default::default() })
        .await
        .unwrap();
    let mut quality_app = f.app("quality");
    wait_for("the grant to reach commerce", Duration::from_secs(5), || {
        let mut q = quality_app.clone();
        let company = company.clone();
        async move { q.query_records(query(PENALTIES, &[&company])).await.ok() }
    })
    .await;
    // Tax has no grant; remember that too.
    assert_eq!(f.app("tax").query_records(query(PENALTIES, &[&company])).await.unwrap_err().code(), Code::PermissionDenied);

    f.directory.take().unwrap().stop().await;
    // Through quality's node, which still knows where commerce is.
    let served = quality_app.query_records(query(PENALTIES, &[&company])).await.expect("relayed without the directory");
    assert_eq!(served.into_inner().data_items, vec!["当事人名称"]);

    // Commerce restarts while the directory is still down: it decides from the rules it stored. (It comes back
    // on a new ephemeral port that nobody can look up now, so ask it directly, node to node, as quality's and
    // tax's nodes would.)
    let commerce = f.nodes.remove("commerce").unwrap();
    let commerce_data = f._data[1].path().to_path_buf();
    commerce.stop().await.unwrap();
    let (pki, directory_addr) = (&f.pki, f.directory_addr.clone());
    let restarted = TestNode::start(|addr| node_config(pki, "commerce", &directory_addr, &commerce_data, None, addr)).await;
    let channel = tls::connect_lazy(
        &restarted.addr,
        tls::peer_node_client_config(&pki.identity("quality", Role::Node), "commerce", Default::default()).unwrap(),
    )
    .unwrap();
    let answer = RelayClient::new(channel.clone())
        .fetch_records(FetchRecordsRequest {
            message_id: "offline-1".into(),
            resource_code: PENALTIES.into(),
            keys: vec![company.clone()],
            purpose: String::new(),
        })
        .await
        .expect("the grant is enforced from the stored copy")
        .into_inner();
    assert_eq!(answer.data_items, vec!["当事人名称"]);
    let channel = tls::connect_lazy(
        &restarted.addr,
        tls::peer_node_client_config(&pki.identity("tax", Role::Node), "commerce", Default::default()).unwrap(),
    )
    .unwrap();
    let err = RelayClient::new(channel)
        .fetch_records(FetchRecordsRequest {
            message_id: "offline-2".into(),
            resource_code: PENALTIES.into(),
            keys: vec![company.clone()],
            purpose: String::new(),
        })
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::PermissionDenied, "no grant stays no grant: {err:?}");
    let status = restarted.client(&pki.identity("commerce", Role::Operator)).node_status(NodeStatusRequest {}).await.unwrap().into_inner();
    assert!(!status.directory_watch_connected);
    assert_eq!(status.active_grants, 1);
}
