//! The node against the real directory, in process: both servers on 127.0.0.1 ephemeral ports over real
//! mutual TLS with real sled stores in temporary folders.
//!
//! Covers: registration while the directory comes up late, the catalog file published after the first
//! registration, publishing through the node (own department only; the directory's field violations
//! passed back unchanged), NodeStatus, re-registration when the directory lost the lease, a refused catalog
//! file reported and not retried, the role check at start, health, and graceful shutdown.

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use client_sdk::catalog::CatalogFile;
use client_sdk::identity::Role;
use client_sdk::pki::{init_ca, issue, LeafRequest};
use client_sdk::tls::{self, TlsIdentity, TlsPaths};
use exchange_node::config::{Config, LogFormat};
use exchange_node::registration::Timing;
use exchange_node::NodeError;
use exchange_proto::v1::directory_client::DirectoryClient;
use exchange_proto::v1::exchange_node_client::ExchangeNodeClient;
use exchange_proto::v1::*;
use tokio::net::TcpListener;
use tokio::sync::oneshot;
use tokio::task::JoinHandle;
use tonic::transport::Channel;
use tonic::Code;
use tonic_types::StatusExt;

fn init_logs() {
    let _ = tracing_subscriber::fmt()
        .with_env_filter(tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "warn".into()))
        .with_test_writer()
        .try_init();
}

fn sample_catalog(dept: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join(format!("../deploy/local/catalog/{dept}.toml"))
}

struct Pki {
    dir: tempfile::TempDir,
}

impl Pki {
    fn new() -> Self {
        init_logs();
        let dir = tempfile::tempdir().unwrap();
        init_ca(dir.path(), "test CA", 30).unwrap();
        issue(dir.path(), &LeafRequest::new("central", Role::Directory, "directory")).unwrap();
        Pki { dir }
    }

    fn paths(&self, name: &str) -> TlsPaths {
        TlsPaths::in_dir(self.dir.path(), name)
    }

    /// `<dept>-<role>`, issued on first use.
    fn identity(&self, dept: &str, role: Role) -> TlsIdentity {
        let name = format!("{dept}-{role}");
        if !self.dir.path().join(format!("{name}.crt")).exists() {
            issue(self.dir.path(), &LeafRequest::new(dept, role, &name)).unwrap();
        }
        TlsIdentity::load(&self.paths(&name)).unwrap()
    }
}

/// A directory served in process; stopped on drop.
struct TestDirectory {
    stop: Option<oneshot::Sender<()>>,
    handle: Option<JoinHandle<Result<(), directory::ServerError>>>,
}

impl TestDirectory {
    async fn start(pki: &Pki, data: &Path, listener: TcpListener) -> Self {
        let mut config = directory::Config::new("127.0.0.1:0", data, pki.paths("directory"));
        config.lease_ttl_seconds = 3;
        let (stop, stopped) = oneshot::channel::<()>();
        let handle = tokio::spawn(directory::run(listener, config, async {
            let _ = stopped.await;
        }));
        TestDirectory { stop: Some(stop), handle: Some(handle) }
    }

    async fn stop(mut self) {
        let _ = self.stop.take().unwrap().send(());
        let handle = self.handle.take().unwrap();
        tokio::time::timeout(Duration::from_secs(10), handle).await.expect("directory stops").unwrap().unwrap();
    }
}

impl Drop for TestDirectory {
    fn drop(&mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
    }
}

struct TestNode {
    addr: String,
    stop: Option<oneshot::Sender<()>>,
    handle: JoinHandle<Result<(), NodeError>>,
}

fn fast_timing() -> Timing {
    Timing {
        backoff_start: Duration::from_millis(50),
        backoff_max: Duration::from_millis(400),
        default_heartbeat: Duration::from_secs(1),
        revocation_refresh: Duration::from_secs(1),
        call_timeout: Duration::from_secs(5),
    }
}

/// A node config for `<dept>-node` (issued on first use).
fn node_config(pki: &Pki, dept: &str, directory_addr: &str, data: &Path, catalog: Option<PathBuf>, addr: &str) -> Config {
    let _ = pki.identity(dept, Role::Node);
    Config {
        listen: addr.parse().unwrap(),
        advertise_address: addr.to_string(),
        directory_address: directory_addr.to_string(),
        data_dir: data.to_path_buf(),
        tls: pki.paths(&format!("{dept}-node")),
        catalog_file: catalog,
        max_connections: 64,
        shutdown_grace_seconds: 5,
        log_format: LogFormat::Text,
    }
}

impl TestNode {
    async fn start(config: impl FnOnce(&str) -> Config) -> Self {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap().to_string();
        let (stop, stopped) = oneshot::channel::<()>();
        let handle = tokio::spawn(exchange_node::server::run_with_timing(listener, config(&addr), fast_timing(), async {
            let _ = stopped.await;
        }));
        TestNode { addr, stop: Some(stop), handle }
    }

    fn client(&self, id: &TlsIdentity) -> ExchangeNodeClient<Channel> {
        client_sdk::client::node_client(&self.addr, id).unwrap()
    }

    async fn stop(mut self) -> Result<(), NodeError> {
        let _ = self.stop.take().unwrap().send(());
        tokio::time::timeout(Duration::from_secs(10), self.handle).await.expect("node stops within 10 s").unwrap()
    }
}

async fn wait_for<T, F, Fut>(what: &str, timeout: Duration, mut f: F) -> T
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Option<T>>,
{
    let deadline = Instant::now() + timeout;
    loop {
        if let Some(v) = f().await {
            return v;
        }
        assert!(Instant::now() < deadline, "timed out after {timeout:?} waiting for {what}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

async fn node_online(directory: &mut DirectoryClient<Channel>, dept: &str) -> Option<NodeInfo> {
    let nodes = directory.list_nodes(ListNodesRequest { department: dept.into() }).await.ok()?.into_inner().nodes;
    nodes.into_iter().find(|n| n.status == NodeStatus::Online as i32)
}

async fn provider_total(directory: &mut DirectoryClient<Channel>, dept: &str) -> u64 {
    directory
        .search_catalog(SearchCatalogRequest { provider_code: dept.into(), page_size: 1, ..Default::default() })
        .await
        .map(|r| r.into_inner().total_hits)
        .unwrap_or(0)
}

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
