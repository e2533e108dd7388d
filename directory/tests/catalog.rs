//! Catalog behaviour over real mutual TLS: publish, read, search, resolve, withdraw, and every way a
//! write is refused without storing anything.

mod common;

use client_sdk::identity::Role;
use common::*;
use exchange_proto::limits::MAX_BATCH_ENTRIES;
use exchange_proto::v1::directory_client::DirectoryClient;
use exchange_proto::v1::*;
use tonic::Code;

#[tokio::test]
async fn publish_get_search_resolve_round_trip() {
    let f = Fixture::start().await;
    let mut tax = f.client_as("tax", Role::Node);
    let mut app = f.client_as("police", Role::App);

    let who = tax.who_am_i(WhoAmIRequest {}).await.unwrap().into_inner();
    assert_eq!((who.department.as_str(), who.role.as_str(), who.name.as_str()), ("tax", "node", "tax-node"));

    let mut second = entry("tax", 2);
    second.name = "纳税人信用等级".into();
    second.summary = "纳税信用评价结果".into();
    let resp = publish(&mut tax, vec![entry("tax", 1), second]).await.unwrap();
    assert_eq!(resp.entry_versions, vec![1, 2]);
    assert_eq!(resp.catalog_version, 2);

    let got = get(&mut app, "101001/000001", false).await.unwrap();
    assert_eq!(got, CatalogEntry { version: 1, ..entry("tax", 1) });

    let found = search_codes(&mut app, "登记").await;
    assert_eq!(found, vec![("101001/000001".to_string(), 1)]);
    let all = app
        .search_catalog(SearchCatalogRequest { provider_code: "tax".into(), ..Default::default() })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(all.total_hits, 2);
    assert_eq!(all.catalog_version, 2);
    assert_eq!(all.provider_facets, vec![FacetCount { value: "tax".into(), count: 2 }]);

    // resolve: the entry and the provider department's nodes
    let resolved = app
        .resolve_resource(ResolveResourceRequest { resource_code: "101001/000002".into() })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(resolved.entry.unwrap().name, "纳税人信用等级");
    assert!(resolved.providers.is_empty());
    tax.register_node(RegisterNodeRequest {
        address: "tax-node.gov.local:7443".into(),
        software_version: "1.0".into(),
        ..Default::default()
    })
    .await
    .unwrap();
    let resolved = app
        .resolve_resource(ResolveResourceRequest { resource_code: "101001/000002".into() })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(resolved.providers.len(), 1);
    assert_eq!(resolved.providers[0].address, "tax-node.gov.local:7443");
    assert_eq!(resolved.providers[0].status, NodeStatus::Online as i32);

    // republishing replaces the entry with a new version; an operator of the department may publish too
    let mut op = f.client_as("tax", Role::Operator);
    let mut changed = entry("tax", 1);
    changed.summary = "更新后的摘要".into();
    let resp = publish(&mut op, vec![changed]).await.unwrap();
    assert_eq!(resp.entry_versions, vec![3]);
    assert_eq!(get(&mut app, "101001/000001", false).await.unwrap().summary, "更新后的摘要");
}

#[tokio::test]
async fn invalid_batch_reports_every_bad_field_and_stores_nothing() {
    let f = Fixture::start().await;
    let mut tax = f.client_as("tax", Role::Node);

    let mut bad_name = entry("tax", 2);
    bad_name.name = String::new();
    bad_name.data_items[1].name = String::new();
    let mut future = entry("tax", 3);
    future.publish_date = "2999-01-01".into();
    let mut wrong_class = entry("tax", 4);
    wrong_class.resource_code = "102001/000004".into();
    wrong_class.share_methods = vec![42];
    let status =
        publish(&mut tax, vec![entry("tax", 1), bad_name, future, wrong_class, entry("tax", 1)]).await.unwrap_err();
    assert_eq!(status.code(), Code::InvalidArgument, "{status:?}");
    assert_eq!(
        violation_fields(&status),
        [
            "entries[1].name",
            "entries[1].data_items[1].name",
            "entries[2].publish_date",
            "entries[3].resource_code",
            "entries[3].share_methods[0]",
            "entries[4].resource_code",
        ]
    );
    // nothing of the batch was stored, not even the valid first entry
    assert_eq!(catalog_version(&mut tax).await, 0);
    assert_eq!(get(&mut tax, "101001/000001", false).await.unwrap_err().code(), Code::NotFound);

    // the client library decodes the violations too
    let err = client_sdk::error::ClientError::from(status);
    assert!(
        matches!(err, client_sdk::error::ClientError::InvalidArgument { ref violations, .. } if violations.len() == 6)
    );

    let empty = publish(&mut tax, vec![]).await.unwrap_err();
    assert_eq!(violation_fields(&empty), ["entries"]);
}

#[tokio::test]
async fn batch_over_the_limit_is_refused() {
    let f = Fixture::start().await;
    let mut tax = f.client_as("tax", Role::Node);
    let batch: Vec<CatalogEntry> = (1..=MAX_BATCH_ENTRIES as u32 + 1).map(|i| entry("tax", i)).collect();
    let status = publish(&mut tax, batch).await.unwrap_err();
    assert_eq!(status.code(), Code::InvalidArgument);
    assert_eq!(violation_fields(&status), ["entries"]);
    assert!(status.message().contains("5000"), "{}", status.message());
    assert_eq!(catalog_version(&mut tax).await, 0);
}

#[tokio::test]
async fn oversized_message_is_refused_before_decoding_and_stores_nothing() {
    let f = Fixture::start().await;
    let id = f.pki.identity("tax", Role::Node, "tax-node");
    // A client willing to send more than the directory accepts.
    let channel = client_sdk::client::DirectoryChannel::new(&f.dir.addr, &id).unwrap();
    let mut big_sender = DirectoryClient::new(channel).max_encoding_message_size(64 << 20);
    let mut huge = entry("tax", 1);
    huge.summary = "x".repeat(exchange_proto::limits::MAX_MESSAGE_BYTES + 1024);
    let status = publish(&mut big_sender, vec![huge]).await.unwrap_err();
    assert_eq!(status.code(), Code::OutOfRange, "{status:?}");
    let mut tax = f.dir.client(&id);
    assert_eq!(catalog_version(&mut tax).await, 0);
    assert_eq!(get(&mut tax, "101001/000001", true).await.unwrap_err().code(), Code::NotFound);
}

#[tokio::test]
async fn publishing_for_another_department_is_permission_denied() {
    let f = Fixture::start().await;
    let mut tax = f.client_as("tax", Role::Node);
    let mut commerce = f.client_as("commerce", Role::Node);

    // forged provider code
    let status = publish(&mut tax, vec![entry("tax", 1), entry("commerce", 2)]).await.unwrap_err();
    assert_eq!(status.code(), Code::PermissionDenied);
    assert!(status.message().contains("entries[1]"), "{}", status.message());
    assert_eq!(catalog_version(&mut tax).await, 0);

    // a resource code that belongs to another department, even once withdrawn
    publish(&mut commerce, vec![entry("commerce", 7)]).await.unwrap();
    let status = publish(&mut tax, vec![entry("tax", 7)]).await.unwrap_err();
    assert_eq!(status.code(), Code::PermissionDenied);
    assert!(status.message().contains("commerce"), "{}", status.message());
    let status = tax
        .withdraw_entries(WithdrawEntriesRequest { resource_codes: vec!["101001/000007".into()] })
        .await
        .unwrap_err();
    assert_eq!(status.code(), Code::PermissionDenied);
    commerce.withdraw_entries(WithdrawEntriesRequest { resource_codes: vec!["101001/000007".into()] }).await.unwrap();
    assert_eq!(publish(&mut tax, vec![entry("tax", 7)]).await.unwrap_err().code(), Code::PermissionDenied);
    assert_eq!(catalog_version(&mut tax).await, 2);
}

#[tokio::test]
async fn app_certificate_may_read_but_not_write() {
    let f = Fixture::start().await;
    let mut app = f.client_as("tax", Role::App);
    let status = publish(&mut app, vec![entry("tax", 1)]).await.unwrap_err();
    assert_eq!(status.code(), Code::PermissionDenied, "{status:?}");
    let status = app
        .withdraw_entries(WithdrawEntriesRequest { resource_codes: vec!["101001/000001".into()] })
        .await
        .unwrap_err();
    assert_eq!(status.code(), Code::PermissionDenied);
    let status =
        app.register_node(RegisterNodeRequest { address: "a:1".into(), ..Default::default() }).await.unwrap_err();
    assert_eq!(status.code(), Code::PermissionDenied);
    let status = app
        .revoke_certificate(RevokeCertificateRequest { serial_hex: "01".into(), ..Default::default() })
        .await
        .unwrap_err();
    assert_eq!(status.code(), Code::PermissionDenied);
    assert_eq!(catalog_version(&mut app).await, 0);
    app.list_nodes(ListNodesRequest::default()).await.unwrap();
    app.list_revocations(ListRevocationsRequest {}).await.unwrap();
}

#[tokio::test]
async fn unknown_codes_are_not_found() {
    let f = Fixture::start().await;
    let mut tax = f.client_as("tax", Role::Node);
    publish(&mut tax, vec![entry("tax", 1)]).await.unwrap();
    assert_eq!(get(&mut tax, "101001/999999", false).await.unwrap_err().code(), Code::NotFound);
    assert_eq!(get(&mut tax, "101001/999999", true).await.unwrap_err().code(), Code::NotFound);
    let status =
        tax.resolve_resource(ResolveResourceRequest { resource_code: "101001/999999".into() }).await.unwrap_err();
    assert_eq!(status.code(), Code::NotFound);
    // a withdrawal batch naming one unknown code withdraws nothing
    let status = tax
        .withdraw_entries(WithdrawEntriesRequest {
            resource_codes: vec!["101001/000001".into(), "101001/999999".into()],
        })
        .await
        .unwrap_err();
    assert_eq!(status.code(), Code::NotFound);
    assert!(status.message().contains("101001/999999"));
    assert!(!get(&mut tax, "101001/000001", true).await.unwrap().withdrawn);
    // a malformed code is a bad argument, not a missing entry
    let status = get(&mut tax, "nonsense", false).await.unwrap_err();
    assert_eq!(status.code(), Code::InvalidArgument);
    assert_eq!(violation_fields(&status), ["resource_code"]);
}

#[tokio::test]
async fn withdrawal_leaves_a_tombstone_and_bumps_the_version() {
    let f = Fixture::start().await;
    let mut tax = f.client_as("tax", Role::Node);
    publish(&mut tax, vec![entry("tax", 1), entry("tax", 2)]).await.unwrap();
    let resp = tax
        .withdraw_entries(WithdrawEntriesRequest { resource_codes: vec!["101001/000001".into()] })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(resp.catalog_version, 3);

    let status = get(&mut tax, "101001/000001", false).await.unwrap_err();
    assert_eq!(status.code(), Code::NotFound);
    let tomb = get(&mut tax, "101001/000001", true).await.unwrap();
    assert!(tomb.withdrawn);
    assert_eq!(tomb.version, 3);
    assert_eq!(tomb.name, "企业登记信息1");
    let status =
        tax.resolve_resource(ResolveResourceRequest { resource_code: "101001/000001".into() }).await.unwrap_err();
    assert_eq!(status.code(), Code::NotFound);
    assert_eq!(search_codes(&mut tax, "登记").await, vec![("101001/000002".to_string(), 2)]);

    // withdrawing again is a no-op (a retried withdrawal succeeds); republishing revives the entry
    let again = tax
        .withdraw_entries(WithdrawEntriesRequest { resource_codes: vec!["101001/000001".into()] })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(again.catalog_version, 3);
    let revived = publish(&mut tax, vec![entry("tax", 1)]).await.unwrap();
    assert_eq!(revived.entry_versions, vec![4]);
    assert_eq!(search_codes(&mut tax, "登记").await.len(), 2);
}

#[tokio::test]
async fn search_argument_errors_are_field_violations() {
    let f = Fixture::start().await;
    let mut app = f.client_as("tax", Role::App);
    let status = app
        .search_catalog(SearchCatalogRequest { page_token: "garbage".into(), ..Default::default() })
        .await
        .unwrap_err();
    assert_eq!(status.code(), Code::InvalidArgument);
    assert_eq!(violation_fields(&status), ["page_token"]);
    let status = app
        .search_catalog(SearchCatalogRequest { share_type: 99, record_kind: 99, ..Default::default() })
        .await
        .unwrap_err();
    assert_eq!(violation_fields(&status), ["share_type", "record_kind"]);
}
