//! Shared harness of the node's integration tests: a PKI in a temp folder, the real directory and real
//! nodes served in process on 127.0.0.1 ephemeral ports over mutual TLS, on sled stores in temp folders.
#![allow(dead_code)]

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use client_sdk::identity::Role;
use client_sdk::pki::{init_ca, issue, LeafRequest};
use client_sdk::tls::{TlsIdentity, TlsPaths};
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

pub fn init_logs() {
    let _ = tracing_subscriber::fmt()
        .with_env_filter(tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "warn".into()))
        .with_test_writer()
        .try_init();
}

pub fn sample_catalog(dept: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join(format!("../deploy/local/catalog/{dept}.toml"))
}

pub struct Pki {
    pub dir: tempfile::TempDir,
}

impl Pki {
    pub fn new() -> Self {
        init_logs();
        let dir = tempfile::tempdir().unwrap();
        init_ca(dir.path(), "test CA", 30).unwrap();
        issue(dir.path(), &LeafRequest::new("central", Role::Directory, "directory")).unwrap();
        Pki { dir }
    }

    pub fn paths(&self, name: &str) -> TlsPaths {
        TlsPaths::in_dir(self.dir.path(), name)
    }

    /// `<dept>-<role>`, issued on first use.
    pub fn identity(&self, dept: &str, role: Role) -> TlsIdentity {
        let name = format!("{dept}-{role}");
        if !self.dir.path().join(format!("{name}.crt")).exists() {
            issue(self.dir.path(), &LeafRequest::new(dept, role, &name)).unwrap();
        }
        TlsIdentity::load(&self.paths(&name)).unwrap()
    }
}

/// A directory served in process; stopped on drop.
pub struct TestDirectory {
    stop: Option<oneshot::Sender<()>>,
    handle: Option<JoinHandle<Result<(), directory::ServerError>>>,
}

impl TestDirectory {
    pub async fn start(pki: &Pki, data: &Path, listener: TcpListener) -> Self {
        let mut config = directory::Config::new("127.0.0.1:0", data, pki.paths("directory"));
        config.lease_ttl_seconds = 3;
        let (stop, stopped) = oneshot::channel::<()>();
        let handle = tokio::spawn(directory::run(listener, config, async {
            let _ = stopped.await;
        }));
        TestDirectory { stop: Some(stop), handle: Some(handle) }
    }

    pub async fn stop(mut self) {
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

pub struct TestNode {
    pub addr: String,
    stop: Option<oneshot::Sender<()>>,
    handle: JoinHandle<Result<(), NodeError>>,
}

pub fn fast_timing() -> Timing {
    Timing {
        backoff_start: Duration::from_millis(50),
        backoff_max: Duration::from_millis(400),
        default_heartbeat: Duration::from_secs(1),
        call_timeout: Duration::from_secs(5),
    }
}

/// A node config for `<dept>-node` (issued on first use).
pub fn node_config(pki: &Pki, dept: &str, directory_addr: &str, data: &Path, catalog: Option<PathBuf>, addr: &str) -> Config {
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
        relay: exchange_node::config::RelayConfig { audit_seal_seconds: 1, ..Default::default() },
        quotas: Vec::new(),
        admin: None,
        telemetry: Default::default(),
        source: None,
    }
}

impl TestNode {
    pub async fn start(config: impl FnOnce(&str) -> Config) -> Self {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap().to_string();
        let (stop, stopped) = oneshot::channel::<()>();
        let handle = tokio::spawn(exchange_node::server::run_with_timing(listener, config(&addr), fast_timing(), async {
            let _ = stopped.await;
        }));
        TestNode { addr, stop: Some(stop), handle }
    }

    /// A node on `listener` (and the admin port on `admin`, if given) with `config` as is.
    pub async fn start_on(listener: TcpListener, admin: Option<TcpListener>, config: Config) -> Self {
        let addr = listener.local_addr().unwrap().to_string();
        let (stop, stopped) = oneshot::channel::<()>();
        let handle = tokio::spawn(exchange_node::server::run_with_admin(listener, admin, config, fast_timing(), async {
            let _ = stopped.await;
        }));
        TestNode { addr, stop: Some(stop), handle }
    }

    pub fn client(&self, id: &TlsIdentity) -> ExchangeNodeClient<Channel> {
        client_sdk::client::node_client(&self.addr, id).unwrap()
    }

    pub async fn stop(mut self) -> Result<(), NodeError> {
        let _ = self.stop.take().unwrap().send(());
        tokio::time::timeout(Duration::from_secs(10), self.handle).await.expect("node stops within 10 s").unwrap()
    }
}

pub async fn wait_for<T, F, Fut>(what: &str, timeout: Duration, mut f: F) -> T
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

pub async fn node_online(directory: &mut DirectoryClient<client_sdk::client::DirectoryChannel>, dept: &str) -> Option<NodeInfo> {
    let nodes = directory.list_nodes(ListNodesRequest { department: dept.into() }).await.ok()?.into_inner().nodes;
    nodes.into_iter().find(|n| n.status == NodeStatus::Online as i32)
}

pub async fn provider_total(directory: &mut DirectoryClient<client_sdk::client::DirectoryChannel>, dept: &str) -> u64 {
    directory
        .search_catalog(SearchCatalogRequest { provider_code: dept.into(), page_size: 1, ..Default::default() })
        .await
        .map(|r| r.into_inner().total_hits)
        .unwrap_or(0)
}

/// Waits until each department's catalog is searchable in the directory and its node is online.
#[allow(dead_code)]
pub async fn wait_published_and_online(pki: &Pki, directory_addr: &str, depts: &[&str]) {
    let central = client_sdk::client::directory_client(directory_addr, &pki.identity("central", Role::Operator)).unwrap();
    for dept in depts {
        wait_for(&format!("{dept}'s catalog"), Duration::from_secs(20), || {
            let mut c = central.clone();
            async move { (provider_total(&mut c, dept).await > 0).then_some(()) }
        })
        .await;
        wait_for(&format!("{dept} online"), Duration::from_secs(20), || {
            let mut c = central.clone();
            async move { node_online(&mut c, dept).await }
        })
        .await;
    }
}
