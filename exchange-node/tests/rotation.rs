//! Certificate rotation without downtime, in process: the real directory and two department nodes
//! (commerce provides, tax consumes) on 127.0.0.1 ephemeral ports over real mutual TLS, sled stores in
//! temp folders.
//!
//! While tax's application queries commerce's records without pause (over one long-lived channel, and
//! over new connections opened all the time), both nodes' certificate and key files are replaced and each
//! node reloads them (`Reloadable::reload_all`, what SIGHUP and the admin port call). Not one query may
//! fail. Then: a new TLS connection to each node presents the new serial; each node has re-dialled the
//! directory with its new certificate, so the old serials are revoked right away (the directory keeps its
//! default connection age of half an hour) and the nodes keep relaying and heartbeating, while the old
//! certificate is refused.

mod common;

use std::path::Path;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use client_sdk::identity::{identity_from_der, Role};
use client_sdk::ids::{validate_uscc, IdError};
use client_sdk::pki::{issue, LeafRequest};
use client_sdk::tls::{self, TlsIdentity, TlsPaths};
use exchange_node::reload::Reloadable;
use exchange_node::NodeError;
use exchange_proto::v1::directory_client::DirectoryClient;
use exchange_proto::v1::*;
use rustls::pki_types::ServerName;
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::oneshot;
use tokio::task::JoinHandle;

use common::*;

const ENTERPRISE_REGISTRATION: &str = "101001/000001"; // commerce, unconditional

fn uscc(first17: &str) -> String {
    match validate_uscc(&format!("{first17}0")) {
        Ok(()) => format!("{first17}0"),
        Err(IdError::Check { expected, .. }) => format!("{first17}{expected}"),
        Err(e) => panic!("{first17}: {e}"),
    }
}

/// A node served in process whose reload handle the test holds.
struct RotatingNode {
    addr: String,
    paths: TlsPaths,
    reload: Reloadable,
    stop: Option<oneshot::Sender<()>>,
    handle: JoinHandle<Result<(), NodeError>>,
}

impl RotatingNode {
    async fn start(pki: &Pki, dept: &str, directory_addr: &str, data: &Path) -> Self {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap().to_string();
        let config = node_config(pki, dept, directory_addr, data, Some(sample_catalog(dept)), &addr);
        let paths = config.tls.clone();
        let (reload_tx, reload_rx) = oneshot::channel();
        let (stop, stopped) = oneshot::channel::<()>();
        let handle = tokio::spawn(exchange_node::server::run_with_reload(
            listener,
            None,
            config,
            fast_timing(),
            Some(reload_tx),
            async {
                let _ = stopped.await;
            },
        ));
        let reload = reload_rx.await.expect("the node hands out its reload handle");
        RotatingNode { addr, paths, reload, stop: Some(stop), handle }
    }

    /// Replaces the node's certificate and key files with a new pair of the same department and role (as
    /// an operator does: new files renamed over the old ones), keeping copies of the old pair; then
    /// reloads. Returns the old files' copies and the new serial.
    async fn rotate(&self, pki: &Pki, dept: &str, new_name: &str) -> (TlsPaths, String) {
        let dir = pki.dir.path();
        let old = TlsPaths { ca: self.paths.ca.clone(), cert: dir.join(format!("{new_name}-old.crt")), key: dir.join(format!("{new_name}-old.key")) };
        std::fs::copy(&self.paths.cert, &old.cert).unwrap();
        std::fs::copy(&self.paths.key, &old.key).unwrap();
        let fresh = issue(dir, &LeafRequest::new(dept, Role::Node, new_name)).unwrap();
        std::fs::rename(&fresh.key, &self.paths.key).unwrap();
        std::fs::rename(&fresh.cert, &self.paths.cert).unwrap();
        let reload = self.reload.clone();
        let report = tokio::task::spawn_blocking(move || reload.reload_all()).await.unwrap().expect("reload accepted");
        assert!(report.certificate_changed, "{report:?}");
        assert_eq!(report.new_serial_hex, fresh.serial_hex);
        (old, fresh.serial_hex)
    }

    async fn stop(mut self) {
        let _ = self.stop.take().unwrap().send(());
        tokio::time::timeout(Duration::from_secs(10), self.handle).await.expect("node stops").unwrap().unwrap();
    }
}

/// The serial of the certificate a server at `addr` presents to a brand-new TLS connection.
async fn presented_serial(addr: &str, id: &TlsIdentity) -> String {
    let config = tls::client_config(id, &[Role::Node]).unwrap();
    let tcp = TcpStream::connect(addr).await.unwrap();
    let stream = tokio_rustls::TlsConnector::from(config)
        .connect(ServerName::try_from("127.0.0.1").unwrap(), tcp)
        .await
        .unwrap();
    identity_from_der(&stream.get_ref().1.peer_certificates().unwrap()[0]).unwrap().serial_hex
}

/// Relayed queries from tax's application, without pause, until stopped: one task on a long-lived
/// channel, one opening a new connection for every query.
struct QueryLoad {
    running: Arc<AtomicBool>,
    ok: Arc<AtomicU64>,
    failures: Arc<Mutex<Vec<String>>>,
    tasks: Vec<JoinHandle<()>>,
}

impl QueryLoad {
    fn start(addr: &str, app: &TlsIdentity, key: &str) -> Self {
        let running = Arc::new(AtomicBool::new(true));
        let ok = Arc::new(AtomicU64::new(0));
        let failures = Arc::new(Mutex::new(Vec::new()));
        let request = QueryRecordsRequest {
            resource_code: ENTERPRISE_REGISTRATION.into(),
            keys: vec![key.to_string()],
            purpose: "证书轮换期间的企业信用核查".into(),
        };
        let mut tasks = Vec::new();
        for fresh_connections in [false, true] {
            let (running, ok, failures, request) = (running.clone(), ok.clone(), failures.clone(), request.clone());
            let (addr, app) = (addr.to_string(), app.clone());
            tasks.push(tokio::spawn(async move {
                let long_lived = client_sdk::client::node_client(&addr, &app).unwrap();
                while running.load(Ordering::SeqCst) {
                    let mut client =
                        if fresh_connections { client_sdk::client::node_client(&addr, &app).unwrap() } else { long_lived.clone() };
                    match client.query_records(request.clone()).await {
                        Ok(r) if r.get_ref().records.len() == 1 => {
                            ok.fetch_add(1, Ordering::SeqCst);
                        }
                        Ok(r) => failures.lock().unwrap().push(format!("answer without the record: {:?}", r.into_inner())),
                        Err(s) => failures.lock().unwrap().push(format!("{:?}: {}", s.code(), s.message())),
                    }
                    tokio::time::sleep(Duration::from_millis(5)).await;
                }
            }));
        }
        QueryLoad { running, ok, failures, tasks }
    }

    fn ok(&self) -> u64 {
        self.ok.load(Ordering::SeqCst)
    }

    /// Waits until `n` more queries have succeeded.
    async fn advance(&self, n: u64, what: &str) {
        let target = self.ok() + n;
        wait_for(what, Duration::from_secs(20), || async move { (self.ok() >= target).then_some(()) }).await;
    }

    async fn stop(self) -> (u64, Vec<String>) {
        self.running.store(false, Ordering::SeqCst);
        for t in self.tasks {
            t.await.unwrap();
        }
        let failures = self.failures.lock().unwrap().clone();
        (self.ok.load(Ordering::SeqCst), failures)
    }
}

async fn node_info(directory: &DirectoryClient<client_sdk::client::DirectoryChannel>, dept: &str) -> Option<NodeInfo> {
    node_online(&mut directory.clone(), dept).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn both_nodes_rotate_under_load_without_a_failed_query_then_the_old_serials_are_revoked() {
    let pki = Pki::new();
    let dir_data = tempfile::tempdir().unwrap();
    let (commerce_data, tax_data) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());

    // The directory keeps its default connection age (half an hour): the nodes must re-dial it themselves.
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let directory_addr = listener.local_addr().unwrap().to_string();
    let mut dir_config = directory::Config::new("127.0.0.1:0", dir_data.path(), pki.paths("directory"));
    dir_config.lease_ttl_seconds = 3;
    let (dir_stop, dir_stopped) = oneshot::channel::<()>();
    let dir_task = tokio::spawn(directory::run(listener, dir_config, async {
        let _ = dir_stopped.await;
    }));

    let commerce = RotatingNode::start(&pki, "commerce", &directory_addr, commerce_data.path()).await;
    let tax = RotatingNode::start(&pki, "tax", &directory_addr, tax_data.path()).await;
    wait_published_and_online(&pki, &directory_addr, &["commerce", "tax"]).await;
    let central = client_sdk::client::directory_client(&directory_addr, &pki.identity("central", Role::Operator)).unwrap();

    let company = uscc("91350100M000100Y4");
    client_sdk::client::node_client(&commerce.addr, &pki.identity("commerce", Role::App))
        .unwrap()
        .put_records(PutRecordsRequest {
            resource_code: ENTERPRISE_REGISTRATION.into(),
            records: vec![Record {
                key: company.clone(),
                items: [("企业名称", "福州市闽江数据科技有限公司"), ("登记状态", "存续")]
                    .into_iter()
                    .map(|(k, v)| (k.to_string(), v.to_string()))
                    .collect(),
                updated_at_unix_ms: 0,
                version: 0,
            }],
            ..Default::default()
        })
        .await
        .unwrap();

    let observer = pki.identity("tax", Role::App);
    let commerce_serial = presented_serial(&commerce.addr, &observer).await;
    let tax_serial = presented_serial(&tax.addr, &observer).await;
    assert_eq!(commerce_serial, commerce.reload.tls.current().serial_hex);

    let load = QueryLoad::start(&tax.addr, &pki.identity("tax", Role::App), &company);
    load.advance(50, "queries before the rotation").await;

    // ---- the provider rotates, then the consumer, with queries running throughout ----
    let (commerce_old, commerce_new) = commerce.rotate(&pki, "commerce", "commerce-node-2").await;
    load.advance(50, "queries after the provider's rotation").await;
    let (tax_old, tax_new) = tax.rotate(&pki, "tax", "tax-node-2").await;
    load.advance(50, "queries after the consumer's rotation").await;
    assert_ne!(commerce_new, commerce_serial);
    assert_ne!(tax_new, tax_serial);

    // A new connection to each node presents its new certificate.
    assert_eq!(presented_serial(&commerce.addr, &observer).await, commerce_new);
    assert_eq!(presented_serial(&tax.addr, &observer).await, tax_new);
    assert_eq!(commerce.reload.tls.current().serial_hex, commerce_new);
    assert_eq!(commerce.reload.tls.identity.department, "commerce");

    // A reload of files that fail a check changes nothing, and the node carries on.
    let foreign = issue(pki.dir.path(), &LeafRequest::new("police", Role::Node, "police-node")).unwrap();
    let refused = commerce.reload.reload_certificate(&TlsPaths { ca: commerce.paths.ca.clone(), cert: foreign.cert, key: foreign.key });
    let message = refused.unwrap_err();
    assert!(message.contains("identity") && message.contains("police/node"), "{message}");
    assert_eq!(presented_serial(&commerce.addr, &observer).await, commerce_new);

    // ---- the old serials are revoked right after the rotation ----
    // No waiting: each node re-dialled the directory when it rotated, so its next calls use the new
    // certificate and the old serials can be revoked at once.
    for serial in [&commerce_serial, &tax_serial] {
        central
            .clone()
            .revoke_certificate(RevokeCertificateRequest {
                serial_hex: serial.to_string(),
                certificate_der: vec![],
                reason: "superseded by a rotated certificate".into(),
            })
            .await
            .unwrap();
    }
    let revoked_at = now_ms();

    // The old certificate is refused now: by the directory, and by the provider's node.
    let old_tax = TlsIdentity::load(&tax_old).unwrap();
    let mut old_client = client_sdk::client::directory_client(&directory_addr, &old_tax).unwrap();
    let refused = old_client.list_nodes(ListNodesRequest { department: "tax".into() }).await.unwrap_err();
    assert_refused_as_revoked(&refused);
    wait_for("commerce's node to refuse tax's old node certificate", Duration::from_secs(10), || {
        let (old_tax, addr) = (old_tax.clone(), commerce.addr.clone());
        async move {
            let config = tls::peer_node_client_config(&old_tax, "commerce", Default::default()).unwrap();
            let Ok(channel) = tls::connect(&addr, config).await else { return Some(()) };
            let fetched = exchange_proto::v1::relay_client::RelayClient::new(channel)
                .fetch_records(FetchRecordsRequest {
                    message_id: "rotation-old-cert".into(),
                    resource_code: ENTERPRISE_REGISTRATION.into(),
                    keys: vec![uscc("91350100M000100Y4")],
                    purpose: "旧证书".into(),
                })
                .await;
            fetched.is_err().then_some(())
        }
    })
    .await;
    let old_commerce = TlsIdentity::load(&commerce_old).unwrap();
    let refused = client_sdk::client::directory_client(&directory_addr, &old_commerce)
        .unwrap()
        .list_nodes(ListNodesRequest { department: "commerce".into() })
        .await
        .unwrap_err();
    assert_refused_as_revoked(&refused);

    // Both nodes keep working: queries still succeed, and both keep heartbeating on new connections
    // (a heartbeat with a revoked certificate would be refused and the lease would lapse in 3 s).
    load.advance(100, "queries after the old serials were revoked").await;
    for dept in ["commerce", "tax"] {
        let beat = wait_for(&format!("a heartbeat of {dept} after the revocation"), Duration::from_secs(10), || {
            let central = central.clone();
            async move { node_info(&central, dept).await.filter(|n| n.last_heartbeat_unix_ms > revoked_at + 3_000) }
        })
        .await;
        assert_eq!(beat.status, NodeStatus::Online as i32);
    }

    let (succeeded, failures) = load.stop().await;
    assert!(failures.is_empty(), "{} of {} queries failed: {:?}", failures.len(), succeeded + failures.len() as u64, failures);
    assert!(succeeded >= 250, "{succeeded}");

    tax.stop().await;
    commerce.stop().await;
    let _ = dir_stop.send(());
    tokio::time::timeout(Duration::from_secs(10), dir_task).await.expect("directory stops").unwrap().unwrap();
}

/// A revoked certificate is refused at the handshake (TLS 1.3 reports that to the client as the revoked
/// alert or, when the alert loses the race, as the connection closing) or, on a connection opened before
/// the revocation, at the call.
fn assert_refused_as_revoked(status: &tonic::Status) {
    let chain = tls::error_chain(status);
    let refused = status.code() == tonic::Code::Unauthenticated
        || chain.contains("CertificateRevoked")
        || chain.contains("connection closed")
        || chain.contains("connection reset");
    assert!(refused, "expected a refusal of a revoked certificate, got {chain}");
}

fn now_ms() -> i64 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().as_millis() as i64
}
