//! `TlsIdentity::reload`: what it refuses (and that a refusal changes nothing), and what a good rotation
//! does to real mutual-TLS connections on 127.0.0.1: new handshakes on both sides present the new
//! certificate through configs built before the rotation, while a connection opened before it keeps
//! working.

use std::sync::Arc;
use std::time::Duration;

use client_sdk::identity::{identity_from_der, Role};
use client_sdk::pki::{self, LeafRequest};
use client_sdk::tls::{self, RevocationSet, RotationCheck, TlsError, TlsIdentity, TlsPaths};
use futures::StreamExt;
use rustls_pki_types::ServerName;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::mpsc;
use tonic::transport::server::Connected;

struct Pki {
    dir: tempfile::TempDir,
}

impl Pki {
    fn new() -> Self {
        let dir = tempfile::tempdir().unwrap();
        pki::init_ca(dir.path(), "test CA", 30).unwrap();
        Pki { dir }
    }

    fn issue(&self, req: LeafRequest) -> TlsPaths {
        pki::issue(self.dir.path(), &req).unwrap();
        TlsPaths::in_dir(self.dir.path(), &req.name)
    }

    fn node(&self, dept: &str, name: &str) -> TlsPaths {
        self.issue(LeafRequest::new(dept, Role::Node, name))
    }
}

fn serial_of(paths: &TlsPaths) -> String {
    use rustls_pki_types::pem::PemObject;
    let der = rustls_pki_types::CertificateDer::from_pem_file(&paths.cert).unwrap();
    identity_from_der(&der).unwrap().serial_hex
}

fn refused_by(result: Result<tls::Rotation, TlsError>) -> (RotationCheck, String) {
    match result {
        Err(TlsError::Rotation { check, reason }) => (check, reason),
        other => panic!("expected a refused rotation, got {other:?}"),
    }
}

/// A refused reload leaves the identity as it was.
fn assert_unchanged(id: &TlsIdentity, serial: &str) {
    assert_eq!(id.current().serial_hex, serial);
    assert_eq!(id.identity.serial_hex, serial);
}

#[test]
fn reload_refuses_another_department_or_role() {
    let pki = Pki::new();
    let id = TlsIdentity::load(&pki.node("tax", "tax-node")).unwrap();
    let serial = id.current().serial_hex;

    let (check, reason) = refused_by(id.reload(&pki.node("commerce", "commerce-node")));
    assert_eq!(check, RotationCheck::Identity);
    assert!(reason.contains("commerce/node") && reason.contains("tax/node"), "{reason}");
    assert_unchanged(&id, &serial);

    let (check, reason) = refused_by(id.reload(&pki.issue(LeafRequest::new("tax", Role::Operator, "tax-op"))));
    assert_eq!(check, RotationCheck::Identity);
    assert!(reason.contains("tax/operator"), "{reason}");
    assert_unchanged(&id, &serial);
}

#[test]
fn reload_refuses_a_key_that_is_not_the_certificates() {
    let pki = Pki::new();
    let id = TlsIdentity::load(&pki.node("tax", "tax-node")).unwrap();
    let serial = id.current().serial_hex;
    let a = pki.node("tax", "tax-node-a");
    let b = pki.node("tax", "tax-node-b");
    let (check, reason) = refused_by(id.reload(&TlsPaths { ca: a.ca.clone(), cert: a.cert.clone(), key: b.key.clone() }));
    assert_eq!(check, RotationCheck::Key);
    assert!(reason.contains("tax-node-b.key") && reason.contains("does not belong"), "{reason}");
    assert_unchanged(&id, &serial);
}

#[test]
fn reload_refuses_a_certificate_of_another_ca() {
    let pki = Pki::new();
    let id = TlsIdentity::load(&pki.node("tax", "tax-node")).unwrap();
    let serial = id.current().serial_hex;
    // Same department, role and name, valid, but signed by a CA this server does not trust.
    let foreign = Pki::new();
    let (check, reason) = refused_by(id.reload(&foreign.node("tax", "tax-node")));
    assert_eq!(check, RotationCheck::Chain);
    assert!(reason.contains("does not verify against the CA in use"), "{reason}");
    assert_unchanged(&id, &serial);
}

#[test]
fn reload_refuses_expired_and_not_yet_valid_certificates() {
    let pki = Pki::new();
    let id = TlsIdentity::load(&pki.node("tax", "tax-node")).unwrap();
    let serial = id.current().serial_hex;

    let mut expired = LeafRequest::new("tax", Role::Node, "tax-node-expired");
    expired.not_before_offset = time::Duration::days(-10);
    expired.validity = time::Duration::days(1);
    let (check, reason) = refused_by(id.reload(&pki.issue(expired)));
    assert_eq!(check, RotationCheck::Validity);
    assert!(reason.contains("expired at"), "{reason}");
    assert_unchanged(&id, &serial);

    let mut future = LeafRequest::new("tax", Role::Node, "tax-node-future");
    future.not_before_offset = time::Duration::days(2);
    let (check, reason) = refused_by(id.reload(&pki.issue(future)));
    assert_eq!(check, RotationCheck::Validity);
    assert!(reason.contains("not valid before"), "{reason}");
    assert_unchanged(&id, &serial);
}

#[test]
fn reload_refuses_missing_or_garbled_files() {
    let pki = Pki::new();
    let id = TlsIdentity::load(&pki.node("tax", "tax-node")).unwrap();
    let serial = id.current().serial_hex;
    let good = pki.node("tax", "tax-node-2");

    let missing = TlsPaths { ca: good.ca.clone(), cert: pki.dir.path().join("nowhere.crt"), key: good.key.clone() };
    let (check, reason) = refused_by(id.reload(&missing));
    assert_eq!(check, RotationCheck::Files);
    assert!(reason.contains("nowhere.crt"), "{reason}");

    let garbled = pki.dir.path().join("garbled.key");
    std::fs::write(&garbled, "-----BEGIN PRIVATE KEY-----\nbm90IGEga2V5\n-----END PRIVATE KEY-----\n").unwrap();
    let (check, reason) = refused_by(id.reload(&TlsPaths { key: garbled, ..good }));
    assert_eq!(check, RotationCheck::Files, "{reason}");
    assert_unchanged(&id, &serial);
}

#[test]
fn reload_of_unchanged_files_is_not_a_rotation() {
    let pki = Pki::new();
    let paths = pki.node("tax", "tax-node");
    let id = TlsIdentity::load(&paths).unwrap();
    let rotation = id.reload(&paths).unwrap();
    assert!(!rotation.changed());
    assert_eq!(rotation.old, rotation.new);
}

/// A mutual-TLS echo server whose every accepted connection reports the client's serial.
async fn echo_server(id: &TlsIdentity) -> (String, mpsc::UnboundedReceiver<String>) {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap().to_string();
    let mut incoming = Box::pin(tls::serve_incoming(listener, tls::server_config(id, RevocationSet::default()).unwrap(), 16));
    let (tx, rx) = mpsc::unbounded_channel();
    tokio::spawn(async move {
        while let Some(Ok(mut conn)) = incoming.next().await {
            let certs = conn.connect_info().peer_certs().expect("client certificate");
            let _ = tx.send(identity_from_der(&certs[0]).unwrap().serial_hex);
            tokio::spawn(async move {
                let mut buf = [0u8; 64];
                while let Ok(n) = conn.read(&mut buf).await {
                    if n == 0 || conn.write_all(&buf[..n]).await.is_err() {
                        break;
                    }
                }
            });
        }
    });
    (addr, rx)
}

/// Connects, checks the echo, and returns the server's serial and the open connection.
async fn connect(
    addr: &str,
    config: &Arc<rustls::ClientConfig>,
) -> (String, tokio_rustls::client::TlsStream<TcpStream>) {
    let tcp = TcpStream::connect(addr).await.unwrap();
    let mut tls = tokio_rustls::TlsConnector::from(config.clone())
        .connect(ServerName::try_from("localhost").unwrap(), tcp)
        .await
        .unwrap();
    echo(&mut tls).await;
    let serial = identity_from_der(&tls.get_ref().1.peer_certificates().unwrap()[0]).unwrap().serial_hex;
    (serial, tls)
}

async fn echo(tls: &mut tokio_rustls::client::TlsStream<TcpStream>) {
    tls.write_all(b"ping").await.unwrap();
    let mut buf = [0u8; 4];
    tokio::time::timeout(Duration::from_secs(5), tls.read_exact(&mut buf)).await.expect("echo in time").unwrap();
    assert_eq!(&buf, b"ping");
}

async fn next_client_serial(rx: &mut mpsc::UnboundedReceiver<String>) -> String {
    tokio::time::timeout(Duration::from_secs(5), rx.recv()).await.expect("accepted in time").unwrap()
}

#[tokio::test]
async fn a_good_rotation_reaches_new_handshakes_on_both_sides_and_spares_open_connections() {
    let pki = Pki::new();
    let server_paths = pki.node("tax", "tax-node");
    let client_paths = pki.node("commerce", "commerce-node");
    let server = TlsIdentity::load(&server_paths).unwrap();
    let client = TlsIdentity::load(&client_paths).unwrap();
    let (old_server, old_client) = (server.current().serial_hex, client.current().serial_hex);

    let (addr, mut accepted) = echo_server(&server).await;
    // Built once, before any rotation: the configs must follow the identity, not copy it.
    let config = tls::peer_node_client_config(&client, "tax", RevocationSet::default()).unwrap();
    let (seen, mut open) = connect(&addr, &config).await;
    assert_eq!(seen, old_server);
    assert_eq!(next_client_serial(&mut accepted).await, old_client);
    // A second connection resumes the first one's TLS session; it still shows the same certificates.
    let (seen, _) = connect(&addr, &config).await;
    assert_eq!(seen, old_server);
    assert_eq!(next_client_serial(&mut accepted).await, old_client);

    // The server's files are replaced the way an operator does it: new files renamed over the old ones.
    let renewed = pki.node("tax", "tax-node-renewed");
    std::fs::rename(&renewed.cert, &server_paths.cert).unwrap();
    std::fs::rename(&renewed.key, &server_paths.key).unwrap();
    let rotation = server.reload(&server_paths).unwrap();
    assert!(rotation.changed());
    assert_eq!(rotation.old.serial_hex, old_server);
    let new_server = rotation.new.serial_hex.clone();
    assert_eq!(new_server, serial_of(&server_paths));
    assert_eq!(rotation.new.name, "tax-node-renewed", "the name may change");
    assert_eq!(server.current().serial_hex, new_server);
    assert_eq!(server.identity.serial_hex, old_server, "the load-time identity stays as loaded");

    let (seen, _) = connect(&addr, &config).await;
    assert_eq!(seen, new_server, "a new connection presents the new server certificate");
    assert_eq!(next_client_serial(&mut accepted).await, old_client);
    echo(&mut open).await;

    // Now the client rotates; its session cache must not resume a session made with the old certificate.
    let client_renewed = pki.node("commerce", "commerce-node-renewed");
    let rotation = client.reload(&client_renewed).unwrap();
    let new_client = rotation.new.serial_hex.clone();
    assert_ne!(new_client, old_client);
    let (seen, _) = connect(&addr, &config).await;
    assert_eq!(seen, new_server);
    assert_eq!(next_client_serial(&mut accepted).await, new_client, "the server sees the new client certificate");
    let (_, _) = connect(&addr, &config).await;
    assert_eq!(next_client_serial(&mut accepted).await, new_client);

    // The connection opened before both rotations still carries data.
    echo(&mut open).await;
    assert_eq!(identity_from_der(&open.get_ref().1.peer_certificates().unwrap()[0]).unwrap().serial_hex, old_server);

    // A refused reload afterwards leaves the rotated certificate in place.
    let bad = pki.node("police", "police-node");
    assert!(matches!(server.reload(&bad), Err(TlsError::Rotation { check: RotationCheck::Identity, .. })));
    let (seen, _) = connect(&addr, &config).await;
    assert_eq!(seen, new_server);
}
