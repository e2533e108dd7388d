//! Transport security and revocation over real mutual TLS: who can connect at all, and how a revocation
//! cuts off new and already-open connections.

mod common;

use std::time::Duration;

use client_sdk::client::DirectoryChannel;
use client_sdk::identity::Role;
use client_sdk::pki::{init_ca, issue, LeafRequest};
use client_sdk::tls::{TlsIdentity, TlsPaths};
use common::*;
use exchange_proto::v1::directory_client::DirectoryClient;
use exchange_proto::v1::*;
use tonic::Code;

/// Calls WhoAmI with a deadline, so a refused connection fails fast whatever the failure looks like.
async fn who_am_i(client: &mut DirectoryClient<DirectoryChannel>) -> Result<WhoAmIResponse, tonic::Status> {
    let mut req = tonic::Request::new(WhoAmIRequest {});
    req.set_timeout(Duration::from_secs(5));
    client.who_am_i(req).await.map(|r| r.into_inner())
}

#[tokio::test]
async fn plaintext_client_is_refused() {
    let f = Fixture::start().await;
    let attempt = async {
        let channel = tonic::transport::Endpoint::from_shared(format!("http://{}", f.dir.addr))
            .unwrap()
            .connect_timeout(Duration::from_secs(3))
            .timeout(Duration::from_secs(3))
            .connect()
            .await
            .map_err(|e| tonic::Status::unavailable(e.to_string()))?;
        DirectoryClient::new(channel).who_am_i(WhoAmIRequest {}).await.map(|r| r.into_inner())
    };
    let result = attempt.await;
    assert!(result.is_err(), "a plaintext call must fail: {result:?}");
    // the server is still fine for TLS clients
    let mut ok = f.client_as("tax", Role::App);
    who_am_i(&mut ok).await.unwrap();
}

#[tokio::test]
async fn foreign_ca_certificate_is_refused_at_the_handshake() {
    let f = Fixture::start().await;
    let foreign = tempfile::tempdir().unwrap();
    init_ca(foreign.path(), "someone else's CA", 30).unwrap();
    issue(foreign.path(), &LeafRequest::new("tax", Role::Operator, "intruder")).unwrap();
    // trusts our CA for the server, but presents a certificate of the foreign CA
    let id = TlsIdentity::load(&TlsPaths {
        ca: f.pki.paths("directory").ca,
        cert: foreign.path().join("intruder.crt"),
        key: foreign.path().join("intruder.key"),
    })
    .unwrap();
    let status = who_am_i(&mut f.dir.client(&id)).await.unwrap_err();
    assert!(matches!(status.code(), Code::Unavailable | Code::Unknown | Code::Cancelled), "{status:?}");
}

#[tokio::test]
async fn expired_certificate_is_refused_at_the_handshake() {
    let f = Fixture::start().await;
    let mut req = LeafRequest::new("tax", Role::Node, "expired-node");
    req.not_before_offset = time::Duration::days(-10);
    req.validity = time::Duration::days(1);
    let (id, _) = f.pki.issue_with(&req);
    let status = who_am_i(&mut f.dir.client(&id)).await.unwrap_err();
    assert!(matches!(status.code(), Code::Unavailable | Code::Unknown | Code::Cancelled), "{status:?}");
}

#[tokio::test]
async fn revoked_certificate_is_refused_on_new_and_open_connections() {
    let f = Fixture::start().await;
    let node = f.pki.identity("tax", Role::Node, "tax-node");
    let mut open = f.dir.client(&node);
    let me = who_am_i(&mut open).await.unwrap();

    let mut central = f.client_as(CENTRAL, Role::Operator);
    let revoked = central
        .revoke_certificate(RevokeCertificateRequest {
            // as an operator might type it: upper case with colons
            serial_hex: me
                .serial_hex
                .to_uppercase()
                .as_bytes()
                .chunks(2)
                .map(|c| std::str::from_utf8(c).unwrap())
                .collect::<Vec<_>>()
                .join(":"),
            certificate_der: vec![],
            reason: "key compromised".into(),
        })
        .await
        .unwrap()
        .into_inner()
        .revocation
        .unwrap();
    assert_eq!(revoked.serial_hex, me.serial_hex);
    assert!(revoked.revoked_by.contains("central-operator"));

    // the already-open connection: refused at its next call
    let status = who_am_i(&mut open).await.unwrap_err();
    assert_eq!(status.code(), Code::Unauthenticated, "{status:?}");
    // a new connection: refused at the handshake
    let status = who_am_i(&mut f.dir.client(&node)).await.unwrap_err();
    assert!(matches!(status.code(), Code::Unavailable | Code::Unknown | Code::Cancelled), "{status:?}");

    let list = central.list_revocations(ListRevocationsRequest {}).await.unwrap().into_inner();
    assert_eq!(list.revocations.len(), 1);
    assert_eq!(list.revocations[0].reason, "key compromised");
    // others are unaffected
    who_am_i(&mut f.client_as("tax", Role::App)).await.unwrap();
}

#[tokio::test]
async fn department_operator_revokes_only_its_own_department() {
    let f = Fixture::start().await;
    f.pki.identity("police", Role::Node, "police-node");
    let tax_node = f.pki.identity("tax", Role::Node, "tax-node");
    let mut tax_op = f.client_as("tax", Role::Operator);

    // another department's certificate, with or without proof
    let status = tax_op
        .revoke_certificate(RevokeCertificateRequest {
            certificate_der: f.pki.cert_der("police-node"),
            ..Default::default()
        })
        .await
        .unwrap_err();
    assert_eq!(status.code(), Code::PermissionDenied, "{status:?}");
    let police_serial = TlsIdentity::load(&f.pki.paths("police-node")).unwrap().identity.serial_hex;
    let status = tax_op
        .revoke_certificate(RevokeCertificateRequest { serial_hex: police_serial, ..Default::default() })
        .await
        .unwrap_err();
    assert_eq!(status.code(), Code::PermissionDenied, "{status:?}");
    assert!(tax_op.list_revocations(ListRevocationsRequest {}).await.unwrap().into_inner().revocations.is_empty());

    // its own department's certificate, proven by sending it
    let rev = tax_op
        .revoke_certificate(RevokeCertificateRequest {
            serial_hex: tax_node.identity.serial_hex.clone(),
            certificate_der: f.pki.cert_der("tax-node"),
            reason: "node decommissioned".into(),
        })
        .await
        .unwrap()
        .into_inner()
        .revocation
        .unwrap();
    assert_eq!(rev.department, "tax");
    assert!(who_am_i(&mut f.dir.client(&tax_node)).await.is_err(), "the revoked node can no longer connect");
}

#[tokio::test]
async fn directory_refuses_to_start_with_a_certificate_of_another_role() {
    let pki = Pki::new();
    pki.identity("central", Role::Node, "not-a-directory");
    let data = tempfile::tempdir().unwrap();
    let config = directory::Config::new("127.0.0.1:0", data.path(), pki.paths("not-a-directory"));
    let err = directory::LoadedDirectory::load(config).await.unwrap_err();
    assert!(matches!(err, directory::ServerError::WrongRole { role: Role::Node, .. }), "{err}");
}
