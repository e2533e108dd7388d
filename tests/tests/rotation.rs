//! Certificate rotation with the REAL binaries: the `directory` and two `exchange-node` processes
//! (commerce provides 101001/000001 企业登记信息, tax consumes it) over mutual TLS on 127.0.0.1, sled stores
//! and a PKI ([`e2e_tests::pki::TestPki`]) in a temporary folder.
//!
//! With tax's application querying commerce's records without pause (one long-lived channel, and a new
//! connection for every query on another task), each server's certificate and key files are replaced
//! (new files renamed over the old ones) and the process gets `kill -HUP`: the directory, then commerce's
//! node, then tax's. After each, a new TLS connection to that process presents the new serial. Then the
//! nodes' old serials are revoked and the queries and heartbeats carry on. Not one query may fail.
//!
//! Binaries: `cargo build --workspace --bins` first (scripts/test.sh does).

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use client_sdk::identity::{identity_from_der, Role};
use client_sdk::ids::{validate_uscc, IdError};
use client_sdk::pki::{self, LeafRequest};
use client_sdk::tls::{self, TlsIdentity, TlsPaths};
use e2e_tests::federation::wait_for;
use e2e_tests::pki::TestPki;
use e2e_tests::procs::{free_port, Proc};
use exchange_proto::v1::*;
use rustls::pki_types::ServerName;
use tokio::net::TcpStream;
use tokio::task::JoinHandle;

/// commerce's enterprise registration (企业登记信息): unconditional, so tax needs no grant.
const REG: &str = "101001/000001";
const LEASE_TTL_SECONDS: i64 = 3;

fn repo_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).parent().expect("repo root").to_path_buf()
}

fn uscc(first17: &str) -> String {
    match validate_uscc(&format!("{first17}0")) {
        Ok(()) => format!("{first17}0"),
        Err(IdError::Check { expected, .. }) => format!("{first17}{expected}"),
        Err(e) => panic!("{first17}: {e}"),
    }
}

fn now_ms() -> i64 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().as_millis() as i64
}

async fn eventually<T, F, Fut>(what: &str, timeout: Duration, f: F) -> T
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Option<T>>,
{
    wait_for(what, timeout, f).await.unwrap_or_else(|e| panic!("{e}"))
}

/// PKI, configs, data and logs in one temporary folder.
struct Site {
    home: tempfile::TempDir,
    pki: TestPki,
    directory_port: u16,
    commerce_port: u16,
    tax_port: u16,
}

impl Site {
    fn new() -> Site {
        let home = tempfile::Builder::new().prefix("gx-rotation-").tempdir().expect("tempdir");
        for d in ["pki", "config", "data", "logs"] {
            std::fs::create_dir_all(home.path().join(d)).unwrap();
        }
        let pki = TestPki::new(&home.path().join("pki"));
        pki.issue("central", Role::Directory, "directory");
        pki.issue("central", Role::Operator, "central-operator");
        for dept in ["commerce", "tax"] {
            pki.issue(dept, Role::Node, &format!("{dept}-node"));
            pki.issue(dept, Role::App, &format!("{dept}-app"));
        }
        let site = Site { home, pki, directory_port: free_port(), commerce_port: free_port(), tax_port: free_port() };
        site.write_configs();
        site
    }

    fn path(&self, rel: &str) -> PathBuf {
        self.home.path().join(rel)
    }

    fn addr(port: u16) -> String {
        format!("127.0.0.1:{port}")
    }

    fn tls(&self, name: &str) -> TlsPaths {
        TlsPaths::in_dir(&self.path("pki"), name)
    }

    fn tls_table(&self, name: &str) -> String {
        let t = self.tls(name);
        format!("[tls]\nca = \"{}\"\ncert = \"{}\"\nkey = \"{}\"\n", t.ca.display(), t.cert.display(), t.key.display())
    }

    fn write_configs(&self) {
        // Clients are asked to reconnect every 2 s, so the nodes' directory connections take up their
        // rotated certificates within seconds (the default is half an hour).
        std::fs::write(
            self.path("config/directory.toml"),
            format!(
                "listen = \"{}\"\ndata_dir = \"{}\"\nlease_ttl_seconds = {LEASE_TTL_SECONDS}\nmax_connection_age_seconds = 2\n\n{}",
                Self::addr(self.directory_port),
                self.path("data/directory").display(),
                self.tls_table("directory"),
            ),
        )
        .unwrap();
        for (dept, port) in [("commerce", self.commerce_port), ("tax", self.tax_port)] {
            std::fs::write(
                self.path(&format!("config/{dept}-node.toml")),
                format!(
                    "listen = \"127.0.0.1:{port}\"\nadvertise_address = \"127.0.0.1:{port}\"\ndirectory_address = \"{}\"\n\
                     data_dir = \"{}\"\ncatalog_file = \"{}\"\nshutdown_grace_seconds = 5\n\n{}",
                    Self::addr(self.directory_port),
                    self.path(&format!("data/{dept}-node")).display(),
                    repo_root().join(format!("deploy/local/catalog/{dept}.toml")).display(),
                    self.tls_table(&format!("{dept}-node")),
                ),
            )
            .unwrap();
        }
    }

    fn start(&self, name: &str, bin: &str) -> Proc {
        let config = self.path(&format!("config/{name}.toml"));
        Proc::start(name, bin, &["--config", config.to_str().unwrap()], &self.path(&format!("logs/{name}.log")))
    }

    fn identity(&self, dept: &str, role: Role, name: &str) -> TlsIdentity {
        self.pki.identity(dept, role, name)
    }

    /// Replaces `name`'s certificate and key with a new pair of the same department and role, as an
    /// operator does (new files renamed over the old ones); returns the new serial.
    fn replace_files(&self, dept: &str, role: Role, name: &str, new_name: &str) -> String {
        let issued = pki::issue(&self.path("pki"), &LeafRequest::new(dept, role, new_name)).unwrap();
        let target = self.tls(name);
        std::fs::rename(&issued.key, &target.key).unwrap();
        std::fs::rename(&issued.cert, &target.cert).unwrap();
        issued.serial_hex
    }
}

fn hang_up(proc: &Proc) {
    let status = std::process::Command::new("kill").args(["-HUP", &proc.pid().to_string()]).status().unwrap();
    assert!(status.success(), "kill -HUP {}", proc.pid());
}

/// The serial of the certificate a server presents to a brand-new TLS connection, if it accepts one.
async fn presented_serial(addr: &str, id: &TlsIdentity, role: Role) -> Option<String> {
    let config = tls::client_config(id, &[role]).unwrap();
    let tcp = TcpStream::connect(addr).await.ok()?;
    let stream =
        tokio_rustls::TlsConnector::from(config).connect(ServerName::try_from("127.0.0.1").unwrap(), tcp).await.ok()?;
    let certs = stream.get_ref().1.peer_certificates()?;
    Some(identity_from_der(&certs[0]).ok()?.serial_hex)
}

/// Waits until new connections to `addr` show `serial` (the process reloads after the signal arrives).
async fn wait_presented(addr: &str, id: &TlsIdentity, role: Role, serial: &str, what: &str) {
    eventually(what, Duration::from_secs(15), || async move {
        (presented_serial(addr, id, role).await.as_deref() == Some(serial)).then_some(())
    })
    .await;
}

/// Relayed queries from tax's application without pause until stopped: one task on a long-lived
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
        let request = QueryRecordsRequest { resource_code: REG.into(), keys: vec![key.to_string()], purpose: "证书轮换演练".into() };
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
                        Err(s) => failures.lock().unwrap().push(format!("{:?}: {}", s.code(), tls::error_chain(&s))),
                    }
                    tokio::time::sleep(Duration::from_millis(10)).await;
                }
            }));
        }
        QueryLoad { running, ok, failures, tasks }
    }

    fn ok(&self) -> u64 {
        self.ok.load(Ordering::SeqCst)
    }

    async fn advance(&self, n: u64, what: &str) {
        let target = self.ok() + n;
        eventually(what, Duration::from_secs(30), || async move { (self.ok() >= target).then_some(()) }).await;
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

#[test]
fn sighup_rotates_the_directory_and_both_nodes_under_load_then_the_old_serials_are_revoked() {
    let runtime = tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build().expect("runtime");
    runtime.block_on(scenario());
}

async fn scenario() {
    let site = Site::new();
    let directory = site.start("directory", "directory");
    let commerce = site.start("commerce-node", "exchange-node");
    let tax = site.start("tax-node", "exchange-node");
    let (directory_addr, commerce_addr, tax_addr) =
        (Site::addr(site.directory_port), Site::addr(site.commerce_port), Site::addr(site.tax_port));

    let central = client_sdk::client::directory_client(&directory_addr, &site.identity("central", Role::Operator, "central-operator")).unwrap();
    let online = |dept: &'static str| {
        let central = central.clone();
        async move {
            let nodes = central.clone().list_nodes(ListNodesRequest { department: dept.into() }).await.ok()?.into_inner().nodes;
            nodes.into_iter().find(|n| n.status == NodeStatus::Online as i32)
        }
    };
    for dept in ["commerce", "tax"] {
        eventually(&format!("{dept}'s node online"), Duration::from_secs(60), || online(dept)).await;
    }
    let company = uscc("91350100M000100Y4");
    let commerce_app = site.identity("commerce", Role::App, "commerce-app");
    eventually("commerce's records loaded", Duration::from_secs(30), || {
        let (addr, app, key) = (commerce_addr.clone(), commerce_app.clone(), company.clone());
        async move {
            let record = Record {
                key,
                items: [("企业名称".to_string(), "福州市闽江数据科技有限公司".to_string())].into_iter().collect(),
                updated_at_unix_ms: 0,
                version: 0,
            };
            let put = PutRecordsRequest { resource_code: REG.into(), records: vec![record], ..Default::default() };
            client_sdk::client::node_client(&addr, &app).unwrap().put_records(put).await.ok().map(|_| ())
        }
    })
    .await;
    let tax_app = site.identity("tax", Role::App, "tax-app");
    eventually("a first relayed query", Duration::from_secs(30), || {
        let (addr, app, key) = (tax_addr.clone(), tax_app.clone(), company.clone());
        async move {
            let q = QueryRecordsRequest { resource_code: REG.into(), keys: vec![key], purpose: "证书轮换演练".into() };
            client_sdk::client::node_client(&addr, &app).unwrap().query_records(q).await.ok().map(|_| ())
        }
    })
    .await;

    let observer = site.identity("tax", Role::App, "tax-app");
    let old_commerce = presented_serial(&commerce_addr, &observer, Role::Node).await.unwrap();
    let old_tax = presented_serial(&tax_addr, &observer, Role::Node).await.unwrap();
    let old_directory = presented_serial(&directory_addr, &observer, Role::Directory).await.unwrap();

    let load = QueryLoad::start(&tax_addr, &tax_app, &company);
    load.advance(30, "queries before any rotation").await;

    // ---- the directory, then the provider's node, then the consumer's node; queries throughout ----
    let new_directory = site.replace_files("central", Role::Directory, "directory", "directory-2");
    hang_up(&directory);
    wait_presented(&directory_addr, &observer, Role::Directory, &new_directory, "the directory's new certificate").await;
    load.advance(30, "queries after the directory's rotation").await;

    let new_commerce = site.replace_files("commerce", Role::Node, "commerce-node", "commerce-node-2");
    hang_up(&commerce);
    wait_presented(&commerce_addr, &observer, Role::Node, &new_commerce, "commerce's new certificate").await;
    load.advance(30, "queries after commerce's rotation").await;

    let new_tax = site.replace_files("tax", Role::Node, "tax-node", "tax-node-2");
    hang_up(&tax);
    wait_presented(&tax_addr, &observer, Role::Node, &new_tax, "tax's new certificate").await;
    load.advance(30, "queries after tax's rotation").await;
    for (old, new) in [(&old_directory, &new_directory), (&old_commerce, &new_commerce), (&old_tax, &new_tax)] {
        assert_ne!(old, new);
    }

    // A refused reload: files of another department; the process says so and keeps its certificate.
    let refused_files = pki::issue(&site.path("pki"), &LeafRequest::new("police", Role::Node, "police-node")).unwrap();
    std::fs::copy(&refused_files.cert, site.tls("commerce-node").cert).unwrap();
    std::fs::copy(&refused_files.key, site.tls("commerce-node").key).unwrap();
    hang_up(&commerce);
    eventually("commerce's node to refuse the police certificate", Duration::from_secs(15), || async {
        commerce.log_text().contains("certificate reload refused").then_some(())
    })
    .await;
    assert_eq!(presented_serial(&commerce_addr, &observer, Role::Node).await.as_deref(), Some(new_commerce.as_str()));

    // ---- the old node serials go, once the directory's connections have been recycled (2 s) ----
    tokio::time::sleep(Duration::from_secs(4)).await;
    for serial in [&old_commerce, &old_tax] {
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
    load.advance(60, "queries after the revocation").await;
    for dept in ["commerce", "tax"] {
        eventually(&format!("a heartbeat of {dept} well after the revocation"), Duration::from_secs(15), || async {
            online(dept).await.filter(|n| n.last_heartbeat_unix_ms > revoked_at + LEASE_TTL_SECONDS * 1000)
        })
        .await;
    }

    let (succeeded, failures) = load.stop().await;
    assert!(failures.is_empty(), "{} of {} queries failed: {:?}", failures.len(), succeeded + failures.len() as u64, failures);
    for (name, proc, serial) in [("directory", &directory, &new_directory), ("commerce", &commerce, &new_commerce), ("tax", &tax, &new_tax)] {
        let log = proc.log_text();
        assert!(log.contains("certificate rotated") && log.contains(serial.as_str()), "{name}'s log names the new serial:\n{log}");
    }

    let mut procs = [tax, commerce, directory];
    for p in procs.iter_mut() {
        let name = p.name.clone();
        assert!(tokio::task::block_in_place(|| p.stop()), "{name} exits cleanly on SIGTERM");
    }
}
