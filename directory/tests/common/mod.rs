//! Shared set-up of the directory integration tests: a throw-away CA with certificates issued on demand,
//! a real directory server on 127.0.0.1:0 over a real sled database in a temporary folder, clients over
//! real mutual TLS, and valid catalog entries to publish.
#![allow(dead_code)] // each test binary uses a different part

use std::path::{Path, PathBuf};
use std::time::Duration;

use client_sdk::client::DirectoryChannel;
use client_sdk::identity::Role;
use client_sdk::pki::{init_ca, issue, LeafRequest};
use client_sdk::tls::{self, TlsIdentity, TlsPaths};
use directory::{Config, LoadedDirectory, ServerError};
use exchange_proto::v1::directory_client::DirectoryClient;
use exchange_proto::v1::*;
use tempfile::TempDir;
use tokio::net::TcpListener;
use tokio::sync::oneshot;
use tokio::task::JoinHandle;
use tonic::transport::Channel;

/// The department of the directory's certificate: its operators are the central team.
pub const CENTRAL: &str = "central";

pub fn init_logs() {
    let _ = tracing_subscriber::fmt()
        .with_env_filter(tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "warn".into()))
        .with_test_writer()
        .try_init();
}

/// A CA in a temporary folder, with the directory's certificate already issued.
pub struct Pki {
    pub dir: TempDir,
}

impl Pki {
    pub fn new() -> Self {
        init_logs();
        let dir = tempfile::tempdir().unwrap();
        init_ca(dir.path(), "test CA", 30).unwrap();
        issue(dir.path(), &LeafRequest::new(CENTRAL, Role::Directory, "directory")).unwrap();
        Pki { dir }
    }

    pub fn paths(&self, name: &str) -> TlsPaths {
        TlsPaths::in_dir(self.dir.path(), name)
    }

    /// Issues `name` (if not yet issued) and loads it.
    pub fn identity(&self, department: &str, role: Role, name: &str) -> TlsIdentity {
        if !self.dir.path().join(format!("{name}.crt")).exists() {
            issue(self.dir.path(), &LeafRequest::new(department, role, name)).unwrap();
        }
        TlsIdentity::load(&self.paths(name)).unwrap()
    }

    /// Issues a certificate from a custom request; returns the identity and its serial.
    pub fn issue_with(&self, req: &LeafRequest) -> (TlsIdentity, String) {
        let files = issue(self.dir.path(), req).unwrap();
        (TlsIdentity::load(&self.paths(&req.name)).unwrap(), files.serial_hex)
    }

    pub fn cert_der(&self, name: &str) -> Vec<u8> {
        use rustls::pki_types::pem::PemObject;
        rustls::pki_types::CertificateDer::from_pem_file(self.paths(name).cert).unwrap().to_vec()
    }

    pub fn config(&self, data_dir: &Path) -> Config {
        Config::new("127.0.0.1:0", data_dir, self.paths("directory"))
    }
}

/// A running directory; stop it with [`TestDirectory::stop`].
pub struct TestDirectory {
    pub addr: String,
    stop: Option<oneshot::Sender<()>>,
    handle: Option<JoinHandle<Result<(), ServerError>>>,
}

impl TestDirectory {
    /// Loads (index rebuilt, revocations loaded) and serves; ready when this returns.
    pub async fn start(config: Config) -> Self {
        let loaded = LoadedDirectory::load(config).await.expect("directory loads");
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap().to_string();
        let (stop, stopped) = oneshot::channel::<()>();
        let handle = tokio::spawn(loaded.serve(listener, async {
            let _ = stopped.await;
        }));
        TestDirectory { addr, stop: Some(stop), handle: Some(handle) }
    }

    /// Shuts down gracefully and waits until the server (and its database) is released.
    pub async fn stop(mut self) {
        let _ = self.stop.take().unwrap().send(());
        let handle = self.handle.take().unwrap();
        tokio::time::timeout(Duration::from_secs(10), handle)
            .await
            .expect("directory stops within 10 s")
            .unwrap()
            .expect("directory ran without error");
    }

    /// A client presenting `id` on a connection of its own.
    pub fn client(&self, id: &TlsIdentity) -> DirectoryClient<DirectoryChannel> {
        client_sdk::client::directory_client(&self.addr, id).unwrap()
    }

    /// A channel presenting `id` (for health and reflection clients).
    pub fn channel(&self, id: &TlsIdentity) -> Channel {
        tls::connect_lazy(&self.addr, tls::client_config(id, &[Role::Directory]).unwrap()).unwrap()
    }
}

impl Drop for TestDirectory {
    fn drop(&mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
    }
}

/// A temporary data folder and a running directory over it, with the usual identities.
pub struct Fixture {
    pub pki: Pki,
    pub data: TempDir,
    pub dir: TestDirectory,
}

impl Fixture {
    pub async fn start() -> Self {
        Self::start_with(|_| {}).await
    }

    pub async fn start_with(tune: impl FnOnce(&mut Config)) -> Self {
        let pki = Pki::new();
        let data = tempfile::tempdir().unwrap();
        let mut config = pki.config(data.path());
        tune(&mut config);
        let dir = TestDirectory::start(config).await;
        Fixture { pki, data, dir }
    }

    /// A client with a certificate `<department>-<role>` of that department and role.
    pub fn client_as(&self, department: &str, role: Role) -> DirectoryClient<DirectoryChannel> {
        let id = self.pki.identity(department, role, &format!("{department}-{role}"));
        self.dir.client(&id)
    }

    pub fn data_dir(&self) -> PathBuf {
        self.data.path().to_path_buf()
    }
}

/// A valid enterprise entry of `department` with resource code `101001/<seq>`, named so a search for
/// 登记 finds it.
pub fn entry(department: &str, seq: u32) -> CatalogEntry {
    CatalogEntry {
        resource_code: format!("101001/{seq:06}"),
        name: format!("企业登记信息{seq}"),
        summary: "市场主体登记的基本信息，供各部门核验企业身份".into(),
        provider_code: department.into(),
        provider_name: format!("{department} 局"),
        classification: "101001".into(),
        format: "database table".into(),
        data_items: vec![
            DataItem {
                name: "统一社会信用代码".into(),
                data_type: DataType::String as i32,
                description: String::new(),
            },
            DataItem { name: "企业名称".into(), data_type: DataType::String as i32, description: "全称".into() },
        ],
        share_type: ShareType::Unconditional as i32,
        share_methods: vec![ShareMethod::PullQuery as i32],
        open_attribute: OpenAttribute::NotOpen as i32,
        update_cycle: UpdateCycle::Daily as i32,
        publish_date: "2024-03-01".into(),
        record_kind: RecordKind::Enterprise as i32,
        ..Default::default()
    }
}

pub async fn publish(
    client: &mut DirectoryClient<DirectoryChannel>,
    entries: Vec<CatalogEntry>,
) -> Result<PublishEntriesResponse, tonic::Status> {
    client.publish_entries(PublishEntriesRequest { entries }).await.map(|r| r.into_inner())
}

/// The catalog version as the directory reports it.
pub async fn catalog_version(client: &mut DirectoryClient<DirectoryChannel>) -> u64 {
    client
        .search_catalog(SearchCatalogRequest { page_size: 1, ..Default::default() })
        .await
        .unwrap()
        .into_inner()
        .catalog_version
}

pub async fn get(
    client: &mut DirectoryClient<DirectoryChannel>,
    code: &str,
    include_withdrawn: bool,
) -> Result<CatalogEntry, tonic::Status> {
    client.get_entry(GetEntryRequest { resource_code: code.into(), include_withdrawn }).await.map(|r| r.into_inner())
}

/// Resource codes and versions of a search's hits, in rank order.
pub async fn search_codes(client: &mut DirectoryClient<DirectoryChannel>, query: &str) -> Vec<(String, u64)> {
    let resp = client
        .search_catalog(SearchCatalogRequest { query: query.into(), page_size: 200, ..Default::default() })
        .await
        .unwrap()
        .into_inner();
    resp.hits
        .into_iter()
        .map(|h| {
            let e = h.entry.unwrap();
            (e.resource_code, e.version)
        })
        .collect()
}

/// The fields of an `INVALID_ARGUMENT` status's google.rpc.BadRequest, in order.
pub fn violation_fields(status: &tonic::Status) -> Vec<String> {
    use tonic_types::StatusExt;
    assert_eq!(status.code(), tonic::Code::InvalidArgument, "{status:?}");
    status
        .get_details_bad_request()
        .expect("INVALID_ARGUMENT carries google.rpc.BadRequest")
        .field_violations
        .into_iter()
        .map(|v| v.field)
        .collect()
}
