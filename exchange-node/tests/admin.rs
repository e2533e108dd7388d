//! The admin port of a node and of the directory, over real HTTPS on ephemeral ports: who gets in
//! (operator certificate of the department, token; not another department, not a wrong token, not
//! nobody), health and readiness with named checks, the maintenance switch mirrored in the gRPC health
//! service, Prometheus metrics per peer department and resource (and never a record key in them), the
//! refused-request list, the backlog alarm, reload and backup.

mod common;

use std::path::Path;
use std::time::Duration;

use client_sdk::admin::api::{
    CatalogReport, GrantsReport, MaintenanceRequest, OutboxReport, PeersReport, Readiness, RefusedReport, ReloadReport,
    StatusReport, TrafficReport,
};
use client_sdk::admin::client::{AdminAuth, AdminClient, AdminClientError};
use client_sdk::admin::AdminConfig;
use client_sdk::identity::Role;
use client_sdk::ids::{validate_identity_number, validate_uscc, IdError};
use exchange_node::config::Config;
use exchange_proto::v1::*;
use tokio::net::TcpListener;
use tokio::sync::oneshot;
use tonic::Code;
use tonic_health::pb::health_check_response::ServingStatus;
use tonic_health::pb::health_client::HealthClient;
use tonic_health::pb::HealthCheckRequest;

use common::*;

const ENTERPRISE_REGISTRATION: &str = "101001/000001"; // commerce, unconditional
const PENALTIES: &str = "302001/000001"; // commerce, conditional
const POPULATION: &str = "102001/000001"; // police, conditional
const TOKEN: &str = "0123456789abcdef-admin-token";

fn uscc(first17: &str) -> String {
    match validate_uscc(&format!("{first17}0")) {
        Ok(()) => format!("{first17}0"),
        Err(IdError::Check { expected, .. }) => format!("{first17}{expected}"),
        Err(e) => panic!("{first17}: {e}"),
    }
}

fn identity_number(first17: &str) -> String {
    match validate_identity_number(&format!("{first17}0")) {
        Ok(()) => format!("{first17}0"),
        Err(IdError::Check { expected, .. }) => format!("{first17}{expected}"),
        Err(e) => panic!("{first17}: {e}"),
    }
}

fn record(key: &str, items: &[(&str, &str)]) -> Record {
    Record { key: key.into(), items: items.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect(), ..Default::default() }
}

/// A node with an admin port on an ephemeral port, a token file and the given backlog alarm.
struct AdminNode {
    node: TestNode,
    admin_addr: String,
}

async fn start_node(pki: &Pki, dept: &str, directory: &str, data: &Path, token_file: &Path, backlog_alarm: u64) -> AdminNode {
    let admin = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let admin_addr = admin.local_addr().unwrap().to_string();
    let mut admin_config = AdminConfig::new(admin_addr.parse().unwrap());
    admin_config.token_file = Some(token_file.to_path_buf());
    admin_config.backlog_alarm_events = backlog_alarm;
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap().to_string();
    let mut config: Config = node_config(pki, dept, directory, data, Some(sample_catalog(dept)), &addr);
    config.admin = Some(admin_config);
    let node = TestNode::start_on(listener, Some(admin), config).await;
    AdminNode { node, admin_addr }
}

fn admin(pki: &Pki, addr: &str, as_operator_of: Option<&str>, token: Option<&str>) -> AdminClient {
    AdminClient::connect(
        addr,
        AdminAuth {
            ca: pki.paths("directory").ca,
            client: as_operator_of.map(|d| pki.identity(d, Role::Operator)),
            token: token.map(str::to_string),
        },
    )
    .unwrap()
}

fn status_of(e: AdminClientError) -> u16 {
    match e {
        AdminClientError::Status { status, .. } => status,
        other => panic!("expected an HTTP error status, got {other}"),
    }
}

async fn grpc_health(pki: &Pki, addr: &str) -> ServingStatus {
    let config = client_sdk::tls::client_config(&pki.identity("commerce", Role::Operator), &[Role::Node]).unwrap();
    let channel = client_sdk::tls::connect(addr, config).await.unwrap();
    let status = HealthClient::new(channel).check(HealthCheckRequest { service: String::new() }).await.unwrap();
    ServingStatus::try_from(status.into_inner().status).unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn node_and_directory_admin_ports() {
    let pki = Pki::new();
    let dirs: Vec<_> = (0..4).map(|_| tempfile::tempdir().unwrap()).collect();
    let token_file = dirs[3].path().join("admin.token");
    std::fs::write(&token_file, format!("{TOKEN}\n")).unwrap();

    // The directory, with its admin port.
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let directory_addr = listener.local_addr().unwrap().to_string();
    let dir_admin = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let dir_admin_addr = dir_admin.local_addr().unwrap().to_string();
    let mut dir_config = directory::Config::new("127.0.0.1:0", dirs[0].path(), pki.paths("directory"));
    dir_config.lease_ttl_seconds = 3;
    let (dir_stop, dir_stopped) = oneshot::channel::<()>();
    let directory = tokio::spawn(directory::server::run_with_admin(listener, Some(dir_admin), dir_config, async {
        let _ = dir_stopped.await;
    }));

    // Commerce provides; its backlog alarm is at 3 events so the test can trip it.
    let commerce = start_node(&pki, "commerce", &directory_addr, dirs[1].path(), &token_file, 3).await;
    let tax = start_node(&pki, "tax", &directory_addr, dirs[2].path(), &token_file, 100_000).await;
    wait_published_and_online(&pki, &directory_addr, &["commerce", "tax"]).await;

    // ---- who gets in ----
    let anonymous = admin(&pki, &commerce.admin_addr, None, None);
    assert_eq!(anonymous.get_text("/healthz").await.unwrap(), (200, "ok\n".to_string()));
    assert_eq!(status_of(anonymous.get_json::<StatusReport>("/api/status").await.unwrap_err()), 401);
    let (code, metrics_text) = anonymous.get_text("/metrics").await.unwrap();
    assert_eq!(code, 401, "{metrics_text}");
    let wrong = admin(&pki, &commerce.admin_addr, None, Some("not-the-token-at-all"));
    assert_eq!(status_of(wrong.get_json::<StatusReport>("/api/status").await.unwrap_err()), 401);
    let other_department = admin(&pki, &commerce.admin_addr, Some("tax"), None);
    let e = other_department.get_json::<StatusReport>("/api/status").await.unwrap_err();
    assert!(e.to_string().contains("not an operator certificate of department commerce"), "{e}");
    let commerce_op = admin(&pki, &commerce.admin_addr, Some("commerce"), None);
    let commerce_token = admin(&pki, &commerce.admin_addr, None, Some(TOKEN));
    let status: StatusReport = commerce_op.get_json("/api/status").await.unwrap();
    assert_eq!((status.server.as_str(), status.identity.department.as_str()), ("exchange-node", "commerce"));
    assert!(status.certificate.days_left > 0);
    assert!(status.directory.as_ref().unwrap().registered);
    let by_token: StatusReport = commerce_token.get_json("/api/status").await.unwrap();
    assert_eq!(by_token.identity.serial_hex, status.identity.serial_hex);
    assert_eq!(status_of(commerce_op.get_json::<StatusReport>("/api/nothing-here").await.unwrap_err()), 404);

    // ---- readiness: named checks, details for operators only ----
    let (code, body) = anonymous.get_text("/readyz").await.unwrap();
    assert_eq!(code, 200, "{body}");
    let open: Readiness = serde_json::from_str(&body).unwrap();
    let names: Vec<_> = open.checks.iter().map(|c| c.name.as_str()).collect();
    assert_eq!(names, ["certificate", "directory", "store", "backlog"]);
    assert!(open.checks.iter().all(|c| c.detail.is_empty()), "{open:?}");
    let (_, body) = commerce_op.get_text("/readyz").await.unwrap();
    let full: Readiness = serde_json::from_str(&body).unwrap();
    assert!(full.ready && full.checks.iter().all(|c| !c.detail.is_empty()), "{full:?}");

    // ---- traffic: tax reads commerce's records; quality (no node, no grant) is refused ----
    let company = uscc("91350100M000100Y4");
    let person = identity_number("11010519491231002");
    commerce
        .node
        .client(&pki.identity("commerce", Role::App))
        .put_records(PutRecordsRequest {
            resource_code: ENTERPRISE_REGISTRATION.into(),
            records: vec![record(&company, &[("企业名称", "福州市闽江数据科技有限公司"), ("登记状态", "存续")])],
            ..Default::default()
        })
        .await
        .unwrap();
    let mut tax_app = tax.node.client(&pki.identity("tax", Role::App));
    for _ in 0..3 {
        let got = tax_app
            .query_records(QueryRecordsRequest {
                resource_code: ENTERPRISE_REGISTRATION.into(),
                keys: vec![company.clone()],
                purpose: "纳税信用评价".into(),
            })
            .await
            .unwrap()
            .into_inner();
        assert_eq!(got.records.len(), 1);
    }
    // Refused at commerce: a conditional resource without a grant.
    let refused = tax_app
        .query_records(QueryRecordsRequest { resource_code: PENALTIES.into(), keys: vec![company.clone()], purpose: "核查".into() })
        .await
        .unwrap_err();
    assert_eq!(refused.code(), Code::PermissionDenied, "{refused:?}");
    // A population query with an identity number: police has no node here, so it fails at tax; the
    // number must not show up in any metric or admin document.
    let _ = tax_app
        .query_records(QueryRecordsRequest { resource_code: POPULATION.into(), keys: vec![person.clone()], purpose: "核查".into() })
        .await;

    let metrics = commerce_op.get_text("/metrics").await.unwrap().1;
    for expected in [
        "gx_relay_requests_total{direction=\"inbound\",peer_department=\"tax\",resource=\"101001/000001\",code=\"OK\"} 3",
        "gx_relay_requests_total{direction=\"inbound\",peer_department=\"tax\",resource=\"302001/000001\",code=\"PERMISSION_DENIED\"} 1",
        "gx_requests_total{service=\"Relay\",method=\"FetchRecords\",peer_department=\"tax\",code=\"OK\"} 3",
        "gx_relay_duration_seconds_bucket{direction=\"inbound\",peer_department=\"tax\",resource=\"101001/000001\"",
        "gx_request_duration_seconds_bucket{service=\"ExchangeNode\",method=\"PutRecords\",peer_department=\"commerce\"",
        "gx_certificate_expiry_days ",
        "gx_store_size_bytes ",
        "gx_directory_state_age_seconds ",
        "gx_directory_state_stale 0",
        "gx_ready 1",
        "gx_maintenance 0",
        "gx_check_ok{check=\"store\"} 1",
        "gx_build_info{server=\"exchange-node\"",
        "gx_admin_auth_failures_total ",
    ] {
        assert!(metrics.contains(expected), "commerce metrics lack {expected}:\n{metrics}");
    }
    let tax_op = admin(&pki, &tax.admin_addr, Some("tax"), None);
    let tax_metrics = tax_op.get_text("/metrics").await.unwrap().1;
    assert!(
        tax_metrics.contains("gx_relay_requests_total{direction=\"outbound\",peer_department=\"commerce\",resource=\"101001/000001\",code=\"OK\"} 3"),
        "{tax_metrics}"
    );
    for text in [&metrics, &tax_metrics] {
        assert!(!text.contains(&person) && !text.contains(&company), "a record key leaked into the metrics");
    }
    let tax_traffic = serde_json::to_string(&tax_op.get_json::<TrafficReport>("/api/traffic").await.unwrap()).unwrap();
    assert!(!tax_traffic.contains(&person), "identity number in /api/traffic");

    let refused: RefusedReport = commerce_op.get_json("/api/refused").await.unwrap();
    let r = refused.refused.iter().find(|r| r.code == "PERMISSION_DENIED").expect("the refusal is listed");
    assert_eq!(r.method, "Relay/FetchRecords");
    assert!(r.peer.starts_with("tax/node/"), "{r:?}");
    let traffic: TrafficReport = commerce_op.get_json("/api/traffic").await.unwrap();
    let row = traffic.rows.iter().find(|r| r.direction == "inbound" && r.resource == ENTERPRISE_REGISTRATION).unwrap();
    assert_eq!((row.peer.as_str(), row.requests, row.errors), ("tax", 3, 0));
    let peers: PeersReport = commerce_op.get_json("/api/peers").await.unwrap();
    let tax_peer = peers.peers.iter().find(|p| p.department == "tax").expect("tax is a peer");
    assert_eq!((tax_peer.inbound_requests, tax_peer.status.as_str()), (4, "online"));
    let catalog: CatalogReport = commerce_op.get_json("/api/catalog").await.unwrap();
    assert!(catalog.entries.iter().any(|e| e.code == ENTERPRISE_REGISTRATION && !e.name.is_empty()));
    let _: GrantsReport = commerce_op.get_json("/api/grants").await.unwrap();

    // ---- maintenance: /readyz and the gRPC health service both say not ready ----
    let bad = commerce_op.post_json::<_, Readiness>("/api/maintenance", &serde_json::json!({"on": "yes"})).await.unwrap_err();
    assert_eq!(status_of(bad), 400);
    let r: Readiness = commerce_op.post_json("/api/maintenance", &MaintenanceRequest { on: true }).await.unwrap();
    assert!(r.maintenance && !r.ready);
    assert_eq!(anonymous.get_text("/readyz").await.unwrap().0, 503);
    assert_eq!(grpc_health(&pki, &commerce.node.addr).await, ServingStatus::NotServing);
    let r: Readiness = commerce_token.post_json("/api/maintenance", &MaintenanceRequest { on: false }).await.unwrap();
    assert!(r.ready);
    assert_eq!(grpc_health(&pki, &commerce.node.addr).await, ServingStatus::Serving);

    // ---- reload (same files: no rotation) and backup ----
    let reload: ReloadReport = commerce_op.post_json("/api/reload", &serde_json::json!({})).await.unwrap();
    assert!(!reload.certificate_changed);
    assert_eq!(reload.new_serial_hex, status.identity.serial_hex);
    let file = dirs[3].path().join("commerce.gxb");
    let bytes = commerce_op.download("/api/backup", &file).await.unwrap();
    assert!(bytes > 0 && std::fs::metadata(&file).unwrap().len() == bytes);
    assert_eq!(status_of(anonymous.download("/api/backup", &dirs[3].path().join("x")).await.unwrap_err()), 401);

    // ---- the backlog alarm: tax subscribes, goes away, commerce publishes past the alarm ----
    tax_app.subscribe(SubscribeRequest { resource_code: ENTERPRISE_REGISTRATION.into() }).await.unwrap();
    wait_for("commerce to see tax's subscription", Duration::from_secs(10), || async {
        let o: OutboxReport = commerce_op.get_json("/api/outbox").await.ok()?;
        o.rows.iter().any(|r| r.side == "provider" && r.department == "tax" && r.state == "active").then_some(())
    })
    .await;
    tax.node.stop().await.unwrap();
    let records: Vec<Record> =
        (0..5).map(|i| record(&uscc(&format!("91350100M0002{i:04}")), &[("企业名称", "积压测试公司"), ("登记状态", "存续")])).collect();
    commerce
        .node
        .client(&pki.identity("commerce", Role::App))
        .put_records(PutRecordsRequest { resource_code: ENTERPRISE_REGISTRATION.into(), records, ..Default::default() })
        .await
        .unwrap();
    let readiness = wait_for("the backlog alarm", Duration::from_secs(10), || async {
        let (code, body) = commerce_op.get_text("/readyz").await.ok()?;
        (code == 503).then(|| serde_json::from_str::<Readiness>(&body).unwrap())
    })
    .await;
    let backlog = readiness.checks.iter().find(|c| c.name == "backlog").unwrap();
    assert!(!backlog.ok && backlog.detail.contains("tax"), "{backlog:?}");
    let metrics = commerce_op.get_text("/metrics").await.unwrap().1;
    assert!(metrics.contains("gx_outbox_backlog_events{subscriber=\"tax\",resource=\"101001/000001\"} 5"), "{metrics}");
    assert!(metrics.contains("gx_outbox_oldest_undelivered_seconds{subscriber=\"tax\",resource=\"101001/000001\"}"), "{metrics}");
    assert!(metrics.contains("gx_check_ok{check=\"backlog\"} 0"), "{metrics}");

    // ---- the directory's admin port ----
    let central = admin(&pki, &dir_admin_addr, Some("central"), None);
    let status: StatusReport = central.get_json("/api/status").await.unwrap();
    assert_eq!(status.server, "directory");
    assert!(status.catalog_entries > 0 && status.nodes_online >= 1, "{status:?}");
    let metrics = central.get_text("/metrics").await.unwrap().1;
    for expected in ["gx_directory_nodes{status=\"online\"}", "gx_catalog_entries ", "gx_requests_total{service=\"Directory\",method=\"RegisterNode\",peer_department=\"commerce\",code=\"OK\"}"] {
        assert!(metrics.contains(expected), "directory metrics lack {expected}:\n{metrics}");
    }
    let e = admin(&pki, &dir_admin_addr, Some("commerce"), None).get_json::<StatusReport>("/api/status").await.unwrap_err();
    assert_eq!(status_of(e), 403);
    let peers: PeersReport = central.get_json("/api/peers").await.unwrap();
    assert!(peers.peers.iter().any(|p| p.department == "commerce" && p.status == "online"), "{peers:?}");
    assert!(central.download("/api/backup", &dirs[3].path().join("directory.gxb")).await.unwrap() > 0);

    commerce.node.stop().await.unwrap();
    let _ = dir_stop.send(());
    directory.await.unwrap().unwrap();
}
