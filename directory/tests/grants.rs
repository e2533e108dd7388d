//! Grants and the grant and revocation watches over real mutual TLS: the request → decide → revoke
//! lifecycle, who may do each step, every refused request, expiry computed on read, who sees which grant,
//! the change feeds, and what a restart keeps.

mod common;

use std::time::Duration;

use client_sdk::identity::Role;
use common::*;
use exchange_proto::v1::directory_client::DirectoryClient;
use exchange_proto::v1::*;
use client_sdk::client::DirectoryChannel;
use tonic::{Code, Status};

type Client = DirectoryClient<DirectoryChannel>;

/// The data items of a [`conditional`] entry.
const ITEMS: [&str; 3] = ["统一社会信用代码", "企业名称", "法定代表人"];

/// A conditionally shared entry of `department` with the three [`ITEMS`].
fn conditional(department: &str, seq: u32) -> CatalogEntry {
    let mut e = entry(department, seq);
    e.share_type = ShareType::Conditional as i32;
    e.share_condition = "仅用于企业身份核验，需经提供方审批".into();
    e.data_items.push(DataItem {
        name: ITEMS[2].into(),
        data_type: DataType::String as i32,
        description: String::new(),
    });
    e
}

fn code(seq: u32) -> String {
    format!("101001/{seq:06}")
}

fn strings(items: &[&str]) -> Vec<String> {
    items.iter().map(|s| s.to_string()).collect()
}

fn status_of(grant: &Grant) -> GrantStatus {
    GrantStatus::try_from(grant.status).unwrap()
}

fn ids(grants: &[Grant]) -> Vec<&str> {
    grants.iter().map(|g| g.grant_id.as_str()).collect()
}

async fn request_with(client: &mut Client, req: RequestGrantRequest) -> Result<Grant, Status> {
    client.request_grant(req).await.map(|r| r.into_inner())
}

async fn request(client: &mut Client, resource_code: &str, items: &[&str]) -> Result<Grant, Status> {
    request_with(
        client,
        RequestGrantRequest {
            resource_code: resource_code.into(),
            data_items: strings(items),
            purpose: "企业开办一件事：核验企业身份".into(),
            legal_basis: String::new(),
        },
    )
    .await
}

async fn decide(client: &mut Client, req: DecideGrantRequest) -> Result<Grant, Status> {
    client.decide_grant(req).await.map(|r| r.into_inner())
}

async fn approve(
    client: &mut Client,
    grant_id: &str,
    items: &[&str],
    expires_at_unix_ms: i64,
) -> Result<Grant, Status> {
    decide(
        client,
        DecideGrantRequest {
            grant_id: grant_id.into(),
            approve: true,
            granted_items: strings(items),
            expires_at_unix_ms,
            reason: "同意".into(),
        },
    )
    .await
}

async fn reject(client: &mut Client, grant_id: &str, reason: &str) -> Result<Grant, Status> {
    decide(client, DecideGrantRequest { grant_id: grant_id.into(), reason: reason.into(), ..Default::default() }).await
}

async fn revoke(client: &mut Client, grant_id: &str, reason: &str) -> Result<Grant, Status> {
    client
        .revoke_grant(RevokeGrantRequest { grant_id: grant_id.into(), reason: reason.into() })
        .await
        .map(|r| r.into_inner())
}

async fn list(client: &mut Client, req: ListGrantsRequest) -> Vec<Grant> {
    client.list_grants(req).await.unwrap().into_inner().grants
}

async fn list_all(client: &mut Client) -> Vec<Grant> {
    list(client, ListGrantsRequest::default()).await
}

/// The next message of a stream, within `within`.
async fn next_within<T>(stream: &mut tonic::Streaming<T>, within: Duration) -> T {
    tokio::time::timeout(within, stream.message())
        .await
        .expect("a message in time")
        .expect("stream healthy")
        .expect("stream open")
}

async fn next<T>(stream: &mut tonic::Streaming<T>) -> T {
    next_within(stream, Duration::from_secs(5)).await
}

async fn nothing_for<T: std::fmt::Debug>(stream: &mut tonic::Streaming<T>, wait: Duration) {
    if let Ok(msg) = tokio::time::timeout(wait, stream.message()).await {
        panic!("expected nothing further, got {msg:?}");
    }
}

/// A directory where tax publishes conditional entries 1 and 2, an unconditional entry 3 and a not-shared
/// entry 4.
async fn with_catalog() -> Fixture {
    let f = Fixture::start().await;
    let mut tax = f.client_as("tax", Role::Node);
    let mut not_shared = entry("tax", 4);
    not_shared.share_type = ShareType::NotShared as i32;
    not_shared.share_condition = "涉及商业秘密，依《政务数据共享条例》不予共享".into();
    publish(&mut tax, vec![conditional("tax", 1), conditional("tax", 2), entry("tax", 3), not_shared]).await.unwrap();
    f
}

#[tokio::test]
async fn request_approve_reject_and_revoke() {
    let f = with_catalog().await;
    let mut police_app = f.client_as("police", Role::App);
    let mut police_op = f.client_as("police", Role::Operator);
    let mut tax_op = f.client_as("tax", Role::Operator);

    let before = directory::service::now_unix_ms();
    let g1 = request(&mut police_app, &code(1), &ITEMS).await.unwrap();
    assert_eq!(g1.grant_id, "G00000001");
    assert_eq!(status_of(&g1), GrantStatus::Pending);
    assert_eq!(
        (g1.resource_code.as_str(), g1.consumer_code.as_str(), g1.provider_code.as_str()),
        ("101001/000001", "police", "tax")
    );
    assert_eq!(g1.requested_items, strings(&ITEMS));
    assert!(g1.granted_items.is_empty());
    assert_eq!(g1.requested_by, "police-app");
    assert!(g1.requested_at_unix_ms >= before);
    assert_eq!(g1.version, 1);
    assert_eq!((g1.decided_by.as_str(), g1.decided_at_unix_ms), ("", 0));

    // approve fewer items, with an expiry
    let expires = directory::service::now_unix_ms() + 3_600_000;
    let approved = approve(&mut tax_op, "G00000001", &[ITEMS[1], ITEMS[0]], expires).await.unwrap();
    assert_eq!(status_of(&approved), GrantStatus::Approved);
    assert_eq!(approved.granted_items, strings(&[ITEMS[1], ITEMS[0]]));
    assert_eq!(approved.requested_items, strings(&ITEMS));
    assert_eq!(approved.expires_at_unix_ms, expires);
    assert_eq!((approved.decided_by.as_str(), approved.decision_reason.as_str()), ("tax-operator", "同意"));
    assert!(approved.decided_at_unix_ms >= approved.requested_at_unix_ms);
    assert_eq!(approved.version, 2);
    // deciding twice is refused, saying the status
    let status = approve(&mut tax_op, "G00000001", &[], 0).await.unwrap_err();
    assert_eq!(status.code(), Code::FailedPrecondition, "{status:?}");
    assert!(status.message().contains("approved"), "{}", status.message());

    // an operator may request too; a rejection needs a reason and keeps no items
    let g2 = request(&mut police_op, &code(2), &[ITEMS[0]]).await.unwrap();
    assert_eq!((g2.grant_id.as_str(), g2.requested_by.as_str()), ("G00000002", "police-operator"));
    let rejected = reject(&mut tax_op, "G00000002", "用途与共享条件不符").await.unwrap();
    assert_eq!(status_of(&rejected), GrantStatus::Rejected);
    assert!(rejected.granted_items.is_empty());
    assert_eq!(rejected.decision_reason, "用途与共享条件不符");
    let status = revoke(&mut tax_op, "G00000002", "no").await.unwrap_err();
    assert_eq!(status.code(), Code::FailedPrecondition);
    assert!(status.message().contains("rejected"), "{}", status.message());

    // revoke the approved grant: the revoker, time and reason are recorded
    let revoked = revoke(&mut tax_op, "G00000001", "合作协议到期").await.unwrap();
    assert_eq!(status_of(&revoked), GrantStatus::Revoked);
    assert_eq!((revoked.decided_by.as_str(), revoked.decision_reason.as_str()), ("tax-operator", "合作协议到期"));
    assert!(revoked.decided_at_unix_ms >= approved.decided_at_unix_ms);
    assert_eq!(revoked.granted_items, approved.granted_items);
    let status = revoke(&mut tax_op, "G00000001", "again").await.unwrap_err();
    assert_eq!(status.code(), Code::FailedPrecondition);
    assert!(status.message().contains("revoked"), "{}", status.message());

    // approval with no items named grants everything requested, without expiry
    let g3 = request(&mut police_app, &code(1), &[ITEMS[2], ITEMS[0]]).await.unwrap();
    assert_eq!(g3.grant_id, "G00000003");
    let all = approve(&mut tax_op, "G00000003", &[], 0).await.unwrap();
    assert_eq!(all.granted_items, strings(&[ITEMS[2], ITEMS[0]]));
    assert_eq!(all.expires_at_unix_ms, 0);

    // both sides see the same history, newest request first
    let seen = list_all(&mut police_app).await;
    assert_eq!(ids(&seen), ["G00000003", "G00000002", "G00000001"]);
    assert_eq!(seen[2], revoked);
    assert_eq!(list_all(&mut tax_op).await, seen);

    // unknown and malformed ids
    let status = approve(&mut tax_op, "G00000099", &[], 0).await.unwrap_err();
    assert_eq!(status.code(), Code::NotFound);
    assert_eq!(revoke(&mut tax_op, "G00000099", "x").await.unwrap_err().code(), Code::NotFound);
    assert_eq!(violation_fields(&approve(&mut tax_op, "99", &[], 0).await.unwrap_err()), ["grant_id"]);
}

#[tokio::test]
async fn only_the_right_roles_and_departments_may_act() {
    let f = with_catalog().await;
    let mut police_app = f.client_as("police", Role::App);
    let mut police_op = f.client_as("police", Role::Operator);
    let mut police_node = f.client_as("police", Role::Node);
    let mut tax_app = f.client_as("tax", Role::App);
    let mut tax_node = f.client_as("tax", Role::Node);
    let mut tax_op = f.client_as("tax", Role::Operator);
    let mut commerce_op = f.client_as("commerce", Role::Operator);
    let mut central_op = f.client_as(CENTRAL, Role::Operator);

    // a node does not request
    let status = request(&mut police_node, &code(1), &ITEMS).await.unwrap_err();
    assert_eq!(status.code(), Code::PermissionDenied, "{status:?}");
    let g = request(&mut police_app, &code(1), &ITEMS).await.unwrap();

    let denied = |r: Result<Grant, Status>| {
        let status = r.unwrap_err();
        assert_eq!(status.code(), Code::PermissionDenied, "{status:?}");
        status
    };
    // deciding: only an operator of the provider department
    denied(approve(&mut tax_app, &g.grant_id, &[], 0).await);
    denied(approve(&mut tax_node, &g.grant_id, &[], 0).await);
    let status = denied(approve(&mut commerce_op, &g.grant_id, &[], 0).await);
    assert!(status.message().contains("tax"), "{}", status.message());
    denied(approve(&mut police_op, &g.grant_id, &[], 0).await); // the consumer cannot approve its own request
    denied(reject(&mut central_op, &g.grant_id, "no").await); // nor the central team
    denied(reject(&mut police_app, &g.grant_id, "no").await);
    // still pending after all that
    assert_eq!(status_of(&list_all(&mut tax_op).await[0]), GrantStatus::Pending);

    approve(&mut tax_op, &g.grant_id, &[], 0).await.unwrap();
    // revoking: only an operator of the provider department
    denied(revoke(&mut tax_app, &g.grant_id, "x").await);
    denied(revoke(&mut tax_node, &g.grant_id, "x").await);
    denied(revoke(&mut commerce_op, &g.grant_id, "x").await);
    denied(revoke(&mut police_op, &g.grant_id, "x").await);
    denied(revoke(&mut central_op, &g.grant_id, "x").await);
    assert_eq!(status_of(&list_all(&mut tax_op).await[0]), GrantStatus::Approved);

    // watching grants takes a node (or operator) certificate
    let status = police_app.watch_grants(WatchGrantsRequest { from_version: 0 }).await.unwrap_err();
    assert_eq!(status.code(), Code::PermissionDenied, "{status:?}");
    police_node.watch_grants(WatchGrantsRequest { from_version: 0 }).await.unwrap();
    police_op.watch_grants(WatchGrantsRequest { from_version: 0 }).await.unwrap();
}

#[tokio::test]
async fn bad_input_names_each_field_and_stores_nothing() {
    let f = with_catalog().await;
    let mut app = f.client_as("police", Role::App);
    let mut tax_op = f.client_as("tax", Role::Operator);
    let base = RequestGrantRequest {
        resource_code: code(1),
        data_items: strings(&ITEMS),
        purpose: "核验".into(),
        legal_basis: String::new(),
    };
    let fields = |r: Result<Grant, Status>| violation_fields(&r.unwrap_err());

    let cases: Vec<(RequestGrantRequest, Vec<&str>)> = vec![
        (RequestGrantRequest { data_items: vec![], ..base.clone() }, vec!["data_items"]),
        (
            RequestGrantRequest { data_items: strings(&[ITEMS[0], ITEMS[1], ITEMS[0]]), ..base.clone() },
            vec!["data_items[2]"],
        ),
        (
            RequestGrantRequest { data_items: strings(&[ITEMS[0], "身份证号", ITEMS[1], ""]), ..base.clone() },
            vec!["data_items[1]", "data_items[3]"],
        ),
        (RequestGrantRequest { purpose: " ".into(), legal_basis: String::new(), ..base.clone() }, vec!["purpose"]),
        (RequestGrantRequest { purpose: "用".repeat(501), ..base.clone() }, vec!["purpose"]),
        (RequestGrantRequest { legal_basis: "第一条\n第二条".into(), ..base.clone() }, vec!["legal_basis"]),
        (RequestGrantRequest { resource_code: "101001-1".into(), ..base.clone() }, vec!["resource_code"]),
        (
            RequestGrantRequest {
                resource_code: "nonsense".into(),
                data_items: strings(&["a", "a"]),
                purpose: "\u{7}".into(),
                legal_basis: "x".repeat(501),
            },
            vec!["resource_code", "data_items[1]", "purpose", "legal_basis"],
        ),
    ];
    for (req, expected) in cases {
        assert_eq!(fields(request_with(&mut app, req.clone()).await), expected, "{req:?}");
    }
    // the limits are inclusive, and a legal basis alone is enough
    let g = request_with(
        &mut app,
        RequestGrantRequest { purpose: String::new(), legal_basis: "依".repeat(500), ..base.clone() },
    )
    .await
    .unwrap();
    assert_eq!(g.grant_id, "G00000001", "no refused request took an id");
    assert_eq!(g.version, 1, "no refused request took a version");

    // DecideGrant
    let d = |granted: &[&str], expires: i64| DecideGrantRequest {
        grant_id: g.grant_id.clone(),
        approve: true,
        granted_items: strings(granted),
        expires_at_unix_ms: expires,
        reason: String::new(),
    };
    let now = directory::service::now_unix_ms();
    let cases: Vec<(DecideGrantRequest, Vec<&str>)> = vec![
        (d(&[ITEMS[0], "身份证号"], 0), vec!["granted_items[1]"]),
        (d(&[ITEMS[0], ITEMS[0]], 0), vec!["granted_items[1]"]),
        (d(&[], now - 1000), vec!["expires_at_unix_ms"]),
        (d(&[], -5), vec!["expires_at_unix_ms"]),
        (DecideGrantRequest { reason: "\u{0}".into(), ..d(&[], 0) }, vec!["reason"]),
        (DecideGrantRequest { grant_id: "".into(), ..d(&[], now - 1) }, vec!["grant_id", "expires_at_unix_ms"]),
        (DecideGrantRequest { grant_id: g.grant_id.clone(), ..Default::default() }, vec!["reason"]),
        (
            DecideGrantRequest { approve: false, reason: "  ".into(), ..d(&[ITEMS[0]], now + 10_000) },
            vec!["reason", "granted_items", "expires_at_unix_ms"],
        ),
        (DecideGrantRequest { approve: false, reason: "否".repeat(501), ..d(&[], 0) }, vec!["reason"]),
    ];
    for (req, expected) in cases {
        assert_eq!(fields(decide(&mut tax_op, req.clone()).await), expected, "{req:?}");
    }
    // RevokeGrant (on an approved grant, so only the input is wrong)
    approve(&mut tax_op, &g.grant_id, &[], 0).await.unwrap();
    assert_eq!(fields(revoke(&mut tax_op, &g.grant_id, "").await), ["reason"]);
    assert_eq!(fields(revoke(&mut tax_op, &g.grant_id, "a\tb").await), ["reason"]);
    assert_eq!(fields(revoke(&mut tax_op, "G1", "x").await), ["grant_id"]);
    let stored = list_all(&mut app).await;
    assert_eq!(stored.len(), 1);
    assert_eq!((status_of(&stored[0]), stored[0].version), (GrantStatus::Approved, 2));

    // ListGrants
    let status = app.list_grants(ListGrantsRequest { side: "both".into(), ..Default::default() }).await.unwrap_err();
    assert_eq!(violation_fields(&status), ["side"]);
    let status = app
        .list_grants(ListGrantsRequest { status: 99, resource_code: "x".into(), side: String::new() })
        .await
        .unwrap_err();
    assert_eq!(violation_fields(&status), ["resource_code", "status"]);
}

#[tokio::test]
async fn requests_that_cannot_be_granted() {
    let f = with_catalog().await;
    let mut app = f.client_as("police", Role::App);
    let mut tax = f.client_as("tax", Role::Node);
    let mut tax_op = f.client_as("tax", Role::Operator);
    let precondition = |r: Result<Grant, Status>| {
        let status = r.unwrap_err();
        assert_eq!(status.code(), Code::FailedPrecondition, "{status:?}");
        status.message().to_string()
    };

    let msg = precondition(request(&mut app, &code(3), &ITEMS[..2]).await);
    assert!(msg.contains("unconditional resources need no grant"), "{msg}");
    let msg = precondition(request(&mut app, &code(4), &ITEMS[..2]).await);
    assert!(msg.contains("不予共享"), "quotes the share condition: {msg}");
    // the provider's own department needs no grant
    let mut tax_app = f.client_as("tax", Role::App);
    let msg = precondition(request(&mut tax_app, &code(1), &ITEMS).await);
    assert!(msg.contains("own department"), "{msg}");
    // unknown and withdrawn entries
    assert_eq!(request(&mut app, &code(9), &ITEMS).await.unwrap_err().code(), Code::NotFound);
    tax.withdraw_entries(WithdrawEntriesRequest { resource_codes: vec![code(2)] }).await.unwrap();
    let msg = precondition(request(&mut app, &code(2), &ITEMS).await);
    assert!(msg.contains("withdrawn"), "{msg}");

    // one pending request per consumer and resource
    let g = request(&mut app, &code(1), &ITEMS[..1]).await.unwrap();
    let other_app = f.pki.identity("police", Role::App, "police-app-2");
    let mut other = f.dir.client(&other_app);
    let status = request(&mut other, &code(1), &ITEMS).await.unwrap_err();
    assert_eq!(status.code(), Code::AlreadyExists, "{status:?}");
    assert!(status.message().contains(&g.grant_id), "{}", status.message());
    // ... another department may still ask, and once decided the consumer may ask again
    request(&mut f.client_as("health", Role::App), &code(1), &ITEMS).await.unwrap();
    reject(&mut tax_op, &g.grant_id, "请补充法律依据").await.unwrap();
    let again = request(&mut other, &code(1), &ITEMS).await.unwrap();
    assert_eq!((again.grant_id.as_str(), again.requested_by.as_str()), ("G00000003", "police-app-2"));

    // concurrent identical requests: exactly one is stored
    let mut tasks = Vec::new();
    for _ in 0..6 {
        let mut c = f.client_as("commerce", Role::App);
        let resource = code(1);
        tasks.push(tokio::spawn(async move { request(&mut c, &resource, &ITEMS).await }));
    }
    let mut created = 0;
    for t in tasks {
        match t.await.unwrap() {
            Ok(_) => created += 1,
            Err(status) => assert_eq!(status.code(), Code::AlreadyExists, "{status:?}"),
        }
    }
    assert_eq!(created, 1);
    let commerce = list(
        &mut f.client_as("commerce", Role::App),
        ListGrantsRequest { side: "consumer".into(), ..Default::default() },
    )
    .await;
    assert_eq!(commerce.len(), 1);
}

#[tokio::test]
async fn a_new_approval_supersedes_the_earlier_one_in_one_write() {
    let f = with_catalog().await;
    let mut app = f.client_as("police", Role::App);
    let mut tax_op = f.client_as("tax", Role::Operator);
    let mut tax_node = f.client_as("tax", Role::Node);

    let g1 = request(&mut app, &code(1), &ITEMS[..1]).await.unwrap();
    approve(&mut tax_op, &g1.grant_id, &[], 0).await.unwrap();
    // another resource and another consumer are not affected
    let other_resource = request(&mut app, &code(2), &ITEMS[..1]).await.unwrap();
    approve(&mut tax_op, &other_resource.grant_id, &[], 0).await.unwrap();
    let other_consumer = request(&mut f.client_as("health", Role::App), &code(1), &ITEMS).await.unwrap();
    approve(&mut tax_op, &other_consumer.grant_id, &[], 0).await.unwrap();

    let g2 = request(&mut app, &code(1), &ITEMS).await.unwrap();
    let before = g2.version;
    let approved = approve(&mut tax_op, &g2.grant_id, &[], 0).await.unwrap();
    assert_eq!(approved.version, before + 2, "one version for the superseded grant, one for the approval");

    let by_id = |grants: &[Grant], id: &str| grants.iter().find(|g| g.grant_id == id).cloned().unwrap();
    let all = list_all(&mut tax_op).await;
    let old = by_id(&all, &g1.grant_id);
    assert_eq!(status_of(&old), GrantStatus::Superseded);
    assert_eq!(old.version, before + 1);
    assert_eq!(old.granted_items, strings(&ITEMS[..1]), "a superseded grant keeps what it granted");
    assert_eq!(status_of(&by_id(&all, &g2.grant_id)), GrantStatus::Approved);
    assert_eq!(status_of(&by_id(&all, &other_resource.grant_id)), GrantStatus::Approved);
    assert_eq!(status_of(&by_id(&all, &other_consumer.grant_id)), GrantStatus::Approved);
    // a superseded grant can no longer be revoked
    assert_eq!(revoke(&mut tax_op, &g1.grant_id, "x").await.unwrap_err().code(), Code::FailedPrecondition);

    // the provider's node sees the supersession before the approval, in consecutive versions
    let mut stream = tax_node.watch_grants(WatchGrantsRequest { from_version: before }).await.unwrap().into_inner();
    let a = next(&mut stream).await;
    let b = next(&mut stream).await;
    assert_eq!((a.version, b.version), (before + 1, before + 2));
    let (ga, gb) = (a.grant.unwrap(), b.grant.unwrap());
    assert_eq!((ga.grant_id.as_str(), status_of(&ga)), (g1.grant_id.as_str(), GrantStatus::Superseded));
    assert_eq!((gb.grant_id.as_str(), status_of(&gb)), (g2.grant_id.as_str(), GrantStatus::Approved));
}

#[tokio::test]
async fn expiry_is_computed_when_read() {
    let f = with_catalog().await;
    let mut app = f.client_as("police", Role::App);
    let mut tax_op = f.client_as("tax", Role::Operator);
    let g = request(&mut app, &code(1), &ITEMS).await.unwrap();
    let expires = directory::service::now_unix_ms() + 1000;
    assert_eq!(status_of(&approve(&mut tax_op, &g.grant_id, &[], expires).await.unwrap()), GrantStatus::Approved);
    let approved = ListGrantsRequest { status: GrantStatus::Approved as i32, ..Default::default() };
    let expired = ListGrantsRequest { status: GrantStatus::Expired as i32, ..Default::default() };
    assert_eq!(list(&mut app, approved.clone()).await.len(), 1);
    assert!(list(&mut app, expired.clone()).await.is_empty());

    tokio::time::sleep(Duration::from_millis(1300)).await;
    let all = list_all(&mut app).await;
    assert_eq!(status_of(&all[0]), GrantStatus::Expired);
    assert_eq!(all[0].expires_at_unix_ms, expires);
    assert!(list(&mut app, approved).await.is_empty());
    assert_eq!(ids(&list(&mut tax_op, expired).await), [g.grant_id.as_str()]);
    // the stored grant did not change: the watch still carries it as approved, with its expiry
    let mut node = f.client_as("tax", Role::Node);
    let mut stream = node.watch_grants(WatchGrantsRequest { from_version: 1 }).await.unwrap().into_inner();
    let change = next(&mut stream).await.grant.unwrap();
    assert_eq!((status_of(&change), change.expires_at_unix_ms), (GrantStatus::Approved, expires));
    // an expired grant can still be revoked, and cannot be decided again
    let status = approve(&mut tax_op, &g.grant_id, &[], 0).await.unwrap_err();
    assert!(status.message().contains("expired"), "{}", status.message());
    let revoked = revoke(&mut tax_op, &g.grant_id, "到期后撤销").await.unwrap();
    assert_eq!(status_of(&revoked), GrantStatus::Revoked);
    assert_eq!(status_of(&list_all(&mut app).await[0]), GrantStatus::Revoked);
}

#[tokio::test]
async fn each_department_sees_its_own_grants_and_the_central_team_all() {
    let f = Fixture::start().await;
    publish(&mut f.client_as("tax", Role::Node), vec![conditional("tax", 1), conditional("tax", 2)]).await.unwrap();
    let mut e = conditional("police", 3);
    e.resource_code = code(3);
    publish(&mut f.client_as("police", Role::Node), vec![e]).await.unwrap();

    let mut police = f.client_as("police", Role::App);
    let mut health = f.client_as("health", Role::App);
    let mut tax = f.client_as("tax", Role::App);
    let g1 = request(&mut police, &code(1), &ITEMS).await.unwrap(); // police ← tax
    let g2 = request(&mut health, &code(2), &ITEMS).await.unwrap(); // health ← tax
    let g3 = request(&mut tax, &code(3), &ITEMS).await.unwrap(); // tax ← police
    reject(&mut f.client_as("tax", Role::Operator), &g2.grant_id, "no").await.unwrap();

    let (i1, i2, i3) = (g1.grant_id.as_str(), g2.grant_id.as_str(), g3.grant_id.as_str());
    assert_eq!(ids(&list_all(&mut police).await), [i3, i1]);
    assert_eq!(ids(&list_all(&mut health).await), [i2]);
    assert_eq!(ids(&list_all(&mut tax).await), [i3, i2, i1]);
    // any role may list, but a department that is no party sees nothing
    assert!(list_all(&mut f.client_as("commerce", Role::Operator)).await.is_empty());
    assert!(list_all(&mut f.client_as("commerce", Role::Node)).await.is_empty());
    // the central team's operators see everything; its other roles do not
    assert_eq!(ids(&list_all(&mut f.client_as(CENTRAL, Role::Operator)).await), [i3, i2, i1]);
    assert!(list_all(&mut f.client_as(CENTRAL, Role::App)).await.is_empty());

    // filters: side, resource, status
    let side = |s: &str| ListGrantsRequest { side: s.into(), ..Default::default() };
    assert_eq!(ids(&list(&mut tax, side("provider")).await), [i2, i1]);
    assert_eq!(ids(&list(&mut tax, side("consumer")).await), [i3]);
    assert_eq!(ids(&list(&mut police, side("provider")).await), [i3]);
    let by_code = ListGrantsRequest { resource_code: code(2), ..Default::default() };
    assert_eq!(ids(&list(&mut tax, by_code).await), [i2]);
    let pending =
        ListGrantsRequest { status: GrantStatus::Pending as i32, side: "provider".into(), ..Default::default() };
    assert_eq!(ids(&list(&mut tax, pending).await), [i1]);
}

/// The next `n` grant changes; each carries the grant as it was after that change.
async fn changes(stream: &mut tonic::Streaming<GrantChange>, n: usize) -> Vec<GrantChange> {
    let mut out = Vec::new();
    for _ in 0..n {
        let c = next(stream).await;
        assert_eq!(c.version, c.grant.as_ref().unwrap().version, "the grant as it was after the change");
        out.push(c);
    }
    out
}

#[tokio::test]
async fn grant_watch_replays_resumes_and_follows_live_for_its_department() {
    let f = Fixture::start().await;
    publish(&mut f.client_as("tax", Role::Node), vec![conditional("tax", 1)]).await.unwrap();
    let mut police = f.client_as("police", Role::App);
    let mut health = f.client_as("health", Role::App);
    let mut tax_op = f.client_as("tax", Role::Operator);

    let g1 = request(&mut police, &code(1), &ITEMS).await.unwrap(); // v1
    request(&mut health, &code(1), &ITEMS).await.unwrap(); // v2
    approve(&mut tax_op, &g1.grant_id, &ITEMS[..1], 0).await.unwrap(); // v3

    let summary =
        |cs: &[GrantChange]| cs.iter().map(|c| (c.version, status_of(c.grant.as_ref().unwrap()))).collect::<Vec<_>>();

    // the provider's node sees everything about its resources
    let mut tax_node = f.client_as("tax", Role::Node);
    let mut tax_stream = tax_node.watch_grants(WatchGrantsRequest { from_version: 0 }).await.unwrap().into_inner();
    let seen = changes(&mut tax_stream, 3).await;
    assert_eq!(summary(&seen), [(1, GrantStatus::Pending), (2, GrantStatus::Pending), (3, GrantStatus::Approved)]);
    assert_eq!(seen[2].grant.as_ref().unwrap().granted_items, strings(&ITEMS[..1]));
    // a consumer's node only its own department's grants
    let mut police_node = f.client_as("police", Role::Node);
    let mut police_stream =
        police_node.watch_grants(WatchGrantsRequest { from_version: 0 }).await.unwrap().into_inner();
    let seen = changes(&mut police_stream, 2).await;
    assert_eq!(summary(&seen), [(1, GrantStatus::Pending), (3, GrantStatus::Approved)]);
    // a department that is no party sees nothing, until it is one
    let mut commerce_node = f.client_as("commerce", Role::Node);
    let mut commerce_stream =
        commerce_node.watch_grants(WatchGrantsRequest { from_version: 0 }).await.unwrap().into_inner();
    nothing_for(&mut commerce_stream, Duration::from_millis(300)).await;
    nothing_for(&mut police_stream, Duration::from_millis(100)).await;

    // live, within a second
    let g3 = request(&mut f.client_as("commerce", Role::App), &code(1), &ITEMS).await.unwrap(); // v4
    let live = next_within(&mut commerce_stream, Duration::from_secs(1)).await;
    assert_eq!((live.version, live.grant.unwrap().grant_id), (4, g3.grant_id.clone()));
    assert_eq!(next_within(&mut tax_stream, Duration::from_secs(1)).await.version, 4);
    revoke(&mut tax_op, &g1.grant_id, "停止合作").await.unwrap(); // v5
    let live = next_within(&mut police_stream, Duration::from_secs(1)).await;
    assert_eq!((live.version, status_of(live.grant.as_ref().unwrap())), (5, GrantStatus::Revoked));
    assert_eq!(next_within(&mut tax_stream, Duration::from_secs(1)).await.version, 5);
    nothing_for(&mut commerce_stream, Duration::from_millis(200)).await;

    // resume from a version: only later changes, still filtered
    drop(police_stream);
    let mut resumed = police_node.watch_grants(WatchGrantsRequest { from_version: 3 }).await.unwrap().into_inner();
    assert_eq!(next(&mut resumed).await.version, 5);
    nothing_for(&mut resumed, Duration::from_millis(200)).await;
    // a central operator watches everything
    let mut central = f.client_as(CENTRAL, Role::Operator);
    let mut all = central.watch_grants(WatchGrantsRequest { from_version: 2 }).await.unwrap().into_inner();
    assert_eq!(summary(&changes(&mut all, 3).await).iter().map(|c| c.0).collect::<Vec<_>>(), [3, 4, 5]);
    // a version the log has not reached
    let status = tax_node.watch_grants(WatchGrantsRequest { from_version: 6 }).await.unwrap_err();
    assert_eq!(status.code(), Code::OutOfRange);
    assert!(status.message().contains("current version 5"), "{}", status.message());
}

#[tokio::test]
async fn revocation_watch_replays_and_follows_live() {
    let f = Fixture::start().await;
    let mut central = f.client_as(CENTRAL, Role::Operator);
    let revoke_serial = |serial: &str| RevokeCertificateRequest {
        serial_hex: serial.into(),
        certificate_der: vec![],
        reason: format!("lost {serial}"),
    };
    let r1 = central.revoke_certificate(revoke_serial("0b01")).await.unwrap().into_inner().revocation.unwrap();
    let r2 = central.revoke_certificate(revoke_serial("0a02")).await.unwrap().into_inner().revocation.unwrap();
    assert_eq!((r1.version, r2.version), (1, 2));
    // a repeated revocation returns the first record and takes no version
    let again = central.revoke_certificate(revoke_serial("0b01")).await.unwrap().into_inner().revocation.unwrap();
    assert_eq!(again, r1);
    // the list is by serial and carries the versions
    let listed = central.list_revocations(ListRevocationsRequest {}).await.unwrap().into_inner().revocations;
    assert_eq!(listed, [r2.clone(), r1.clone()]);

    // any role may watch
    let mut app = f.client_as("police", Role::App);
    let mut stream = app.watch_revocations(WatchRevocationsRequest { from_version: 0 }).await.unwrap().into_inner();
    assert_eq!(next(&mut stream).await, r1);
    assert_eq!(next(&mut stream).await, r2);
    nothing_for(&mut stream, Duration::from_millis(200)).await;

    // live, within a second, and the department operator's own revocation too
    f.pki.identity("tax", Role::Node, "tax-node");
    let r3 = f
        .client_as("tax", Role::Operator)
        .revoke_certificate(RevokeCertificateRequest {
            certificate_der: f.pki.cert_der("tax-node"),
            reason: "decommissioned".into(),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner()
        .revocation
        .unwrap();
    assert_eq!((r3.version, r3.department.as_str()), (3, "tax"));
    assert_eq!(next_within(&mut stream, Duration::from_secs(1)).await, r3);
    central.revoke_certificate(revoke_serial("0a02")).await.unwrap();
    nothing_for(&mut stream, Duration::from_millis(200)).await;

    let mut resumed = app.watch_revocations(WatchRevocationsRequest { from_version: 2 }).await.unwrap().into_inner();
    assert_eq!(next(&mut resumed).await, r3);
    let status = app.watch_revocations(WatchRevocationsRequest { from_version: 4 }).await.unwrap_err();
    assert_eq!(status.code(), Code::OutOfRange);
}

#[tokio::test]
async fn restart_keeps_grants_ids_versions_and_revocation_versions() {
    let pki = Pki::new();
    let data = tempfile::tempdir().unwrap();
    let dir = TestDirectory::start(pki.config(data.path())).await;
    let tax_node_id = pki.identity("tax", Role::Node, "tax-node");
    let app_id = pki.identity("police", Role::App, "police-app");
    let tax_op_id = pki.identity("tax", Role::Operator, "tax-op");
    let central_id = pki.identity(CENTRAL, Role::Operator, "central-op");

    let mut tax_node = dir.client(&tax_node_id);
    publish(&mut tax_node, vec![conditional("tax", 1), conditional("tax", 2)]).await.unwrap();
    let audit_key = "0123456789ABCDEF".repeat(4);
    let reg = tax_node
        .register_node(RegisterNodeRequest {
            address: "tax.local:7443".into(),
            software_version: "1".into(),
            audit_verifying_key_hex: audit_key.clone(),
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(reg.node.unwrap().audit_verifying_key_hex, audit_key.to_lowercase());
    for bad in ["abc".to_string(), "g".repeat(64), "0".repeat(66)] {
        let status = tax_node
            .register_node(RegisterNodeRequest {
                address: "tax.local:7443".into(),
                software_version: "1".into(),
                audit_verifying_key_hex: bad,
            })
            .await
            .unwrap_err();
        assert_eq!(violation_fields(&status), ["audit_verifying_key_hex"]);
    }

    let mut app = dir.client(&app_id);
    let mut tax_op = dir.client(&tax_op_id);
    let g1 = request(&mut app, &code(1), &ITEMS).await.unwrap();
    approve(&mut tax_op, &g1.grant_id, &ITEMS[..2], 0).await.unwrap();
    request(&mut app, &code(2), &ITEMS).await.unwrap();
    let mut central = dir.client(&central_id);
    for serial in ["01aa", "02bb"] {
        central
            .revoke_certificate(RevokeCertificateRequest { serial_hex: serial.into(), ..Default::default() })
            .await
            .unwrap();
    }
    let grants = list_all(&mut app).await;
    let revocations = app.list_revocations(ListRevocationsRequest {}).await.unwrap().into_inner().revocations;
    assert_eq!((grants.len(), grants[0].version), (2, 3));

    // open watches end with UNAVAILABLE on shutdown, so clients resume elsewhere
    let mut grant_stream = tax_node.watch_grants(WatchGrantsRequest { from_version: 3 }).await.unwrap().into_inner();
    let mut rev_stream = app.watch_revocations(WatchRevocationsRequest { from_version: 2 }).await.unwrap().into_inner();
    let grant_reader = tokio::spawn(async move { grant_stream.message().await });
    let rev_reader = tokio::spawn(async move { rev_stream.message().await });
    tokio::time::sleep(Duration::from_millis(100)).await;
    dir.stop().await;
    let grant_end = grant_reader.await.unwrap().map(|c| c.map(|c| c.version));
    let rev_end = rev_reader.await.unwrap().map(|r| r.map(|r| r.version));
    for ended in [grant_end, rev_end] {
        if let Err(status) = &ended {
            assert_eq!(status.code(), Code::Unavailable, "{status:?}");
        } else {
            assert_eq!(ended.unwrap(), None, "no change was expected");
        }
    }

    let dir = TestDirectory::start(pki.config(data.path())).await;
    let mut app = dir.client(&app_id);
    let mut tax_node = dir.client(&tax_node_id);
    assert_eq!(list_all(&mut app).await, grants);
    assert_eq!(app.list_revocations(ListRevocationsRequest {}).await.unwrap().into_inner().revocations, revocations);
    let nodes = app.list_nodes(ListNodesRequest::default()).await.unwrap().into_inner().nodes;
    assert_eq!(nodes[0].audit_verifying_key_hex, audit_key.to_lowercase());

    // the logs replay in full and go on from where they were
    let mut stream = tax_node.watch_grants(WatchGrantsRequest { from_version: 0 }).await.unwrap().into_inner();
    for v in 1..=3 {
        assert_eq!(next(&mut stream).await.version, v);
    }
    let mut tax_op = dir.client(&tax_op_id);
    let decided = reject(&mut tax_op, &grants[0].grant_id, "重复申请").await.unwrap();
    assert_eq!(decided.version, 4);
    assert_eq!(next_within(&mut stream, Duration::from_secs(1)).await.version, 4);
    let g3 = request(&mut app, &code(2), &ITEMS).await.unwrap();
    assert_eq!((g3.grant_id.as_str(), g3.version), ("G00000003", 5));

    let mut revs = app.watch_revocations(WatchRevocationsRequest { from_version: 0 }).await.unwrap().into_inner();
    assert_eq!(next(&mut revs).await.version, 1);
    assert_eq!(next(&mut revs).await.version, 2);
    let r3 = dir
        .client(&central_id)
        .revoke_certificate(RevokeCertificateRequest { serial_hex: "03cc".into(), ..Default::default() })
        .await
        .unwrap()
        .into_inner()
        .revocation
        .unwrap();
    assert_eq!(r3.version, 3);
    assert_eq!(next_within(&mut revs, Duration::from_secs(1)).await, r3);
    drop((stream, revs));
    dir.stop().await;
}
