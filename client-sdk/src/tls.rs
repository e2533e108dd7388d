//! Mutual TLS, set up here and nowhere else.
//!
//! Servers: [`server_config`] builds a rustls `ServerConfig` whose client verifier checks the chain against
//! the gov-exchange CA, requires a gov-exchange identity in the certificate and refuses revoked serials;
//! [`serve_incoming`] turns a `TcpListener` into a stream of TLS connections (handshakes in parallel, a
//! connection limit) for tonic's `serve_with_incoming_shutdown`. A certificate revoked while its connection
//! is open is caught per call by [`crate::auth::IdentityInterceptor`].
//!
//! Clients: [`client_config`] presents the caller's certificate and checks that the server's certificate
//! carries the expected role; [`connect`] opens a tonic `Channel` over it.
//!
//! Rotation: every config built from a [`TlsIdentity`] reads its certificate and key at each handshake,
//! so [`TlsIdentity::reload`] (after checking the new files) switches new connections, server and client
//! side, to the new pair while open connections keep theirs. The CA is fixed for the process's life.
//!
//! There is no plaintext mode.

use std::collections::HashSet;
use std::fmt;
use std::io;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, Once, RwLock};
use std::task::{Context, Poll};
use std::time::Duration;

use futures::Stream;
use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::server::danger::{ClientCertVerified, ClientCertVerifier};
use rustls::server::{ClientHello, ResolvesServerCert, ServerSessionMemoryCache, StoresServerSessions, WebPkiClientVerifier};
use rustls::client::{ClientSessionMemoryCache, ClientSessionStore, ResolvesClientCert, Resumption, WebPkiServerVerifier};
use rustls::sign::CertifiedKey;
use rustls::{CertificateError, DigitallySignedStruct, DistinguishedName, RootCertStore, SignatureScheme};
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, PrivateKeyDer, ServerName, UnixTime};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{mpsc, OwnedSemaphorePermit, Semaphore};
use tonic::transport::server::Connected;
use tonic::transport::{Channel, Endpoint};

use crate::identity::{identity_from_der, PeerIdentity, Role};

static PROVIDER: Once = Once::new();

/// Installs ring as the process-wide rustls crypto provider. Idempotent; every entry point calls it first.
pub fn install_crypto_provider() {
    PROVIDER.call_once(|| {
        let _ = rustls::crypto::ring::default_provider().install_default();
    });
}

fn provider() -> Arc<rustls::crypto::CryptoProvider> {
    install_crypto_provider();
    Arc::new(rustls::crypto::ring::default_provider())
}

#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    #[error("{path}: {reason}")]
    File { path: PathBuf, reason: String },
    #[error("TLS configuration: {0}")]
    Config(String),
    #[error("{0}")]
    Identity(#[from] crate::identity::IdentityError),
    #[error("cannot connect to {addr}: {reason}")]
    Connect { addr: String, reason: String },
    #[error("certificate reload refused ({check} check): {reason}; the running certificate stays")]
    Rotation { check: RotationCheck, reason: String },
}

/// Which check of [`TlsIdentity::reload`] refused the new certificate.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum RotationCheck {
    /// The certificate or key file cannot be read or parsed.
    Files,
    /// The certificate carries no gov-exchange identity, or another department or role than the one in use.
    Identity,
    /// The certificate is expired or not yet valid.
    Validity,
    /// The chain does not verify against the CA in use, or the certificate may not be used for TLS.
    Chain,
    /// The key is not the certificate's.
    Key,
}

impl fmt::Display for RotationCheck {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            RotationCheck::Files => "files",
            RotationCheck::Identity => "identity",
            RotationCheck::Validity => "validity",
            RotationCheck::Chain => "chain",
            RotationCheck::Key => "key",
        })
    }
}

/// Where a holder's CA, certificate and key live (the `[tls]` table of every config).
#[derive(Clone, Debug, serde::Deserialize, serde::Serialize)]
pub struct TlsPaths {
    pub ca: PathBuf,
    pub cert: PathBuf,
    pub key: PathBuf,
}

impl TlsPaths {
    /// The conventional layout of `exchangectl pki`: `DIR/ca.crt`, `DIR/NAME.crt`, `DIR/NAME.key`.
    pub fn in_dir(dir: &Path, name: &str) -> Self {
        TlsPaths { ca: dir.join("ca.crt"), cert: dir.join(format!("{name}.crt")), key: dir.join(format!("{name}.key")) }
    }
}

/// A loaded TLS identity: trust roots, our own chain and key, and who the chain says we are.
///
/// The chain and key can be replaced while servers and clients run ([`TlsIdentity::reload`]): every rustls
/// config built from this identity, or from any clone of it, reads the pair in use at each handshake, so
/// new connections present the new certificate and open ones keep their session. The CA cannot change.
#[derive(Clone)]
pub struct TlsIdentity {
    roots: Arc<RootCertStore>,
    current: Arc<RwLock<Arc<CurrentCert>>>,
    /// Counts rotations; session caches built from this identity start over when it moves (see
    /// [`RotatingSessions`]).
    rotations: Arc<AtomicU64>,
    /// Who the certificate said we were when loaded. Department and role never change ([`TlsIdentity::reload`]
    /// refuses that); serial, expiry and name may: [`TlsIdentity::current`] has those.
    pub identity: PeerIdentity,
}

/// The certificate and key in use, and the identity read from that certificate.
#[derive(Debug)]
struct CurrentCert {
    key: Arc<CertifiedKey>,
    identity: PeerIdentity,
}

/// What a successful [`TlsIdentity::reload`] replaced.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Rotation {
    pub old: PeerIdentity,
    pub new: PeerIdentity,
}

impl Rotation {
    /// False when the files still held the certificate in use (a reload without a rotation).
    pub fn changed(&self) -> bool {
        self.old.serial_hex != self.new.serial_hex
    }
}

impl fmt::Display for Rotation {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "serial {} (not after {}) -> serial {} (not after {})",
            self.old.serial_hex,
            unix_date(self.old.not_after_unix),
            self.new.serial_hex,
            unix_date(self.new.not_after_unix)
        )
    }
}

/// RFC 3339 in UTC, for messages; the raw number if out of range.
fn unix_date(unix: i64) -> String {
    time::OffsetDateTime::from_unix_timestamp(unix)
        .ok()
        .and_then(|t| t.format(&time::format_description::well_known::Rfc3339).ok())
        .unwrap_or_else(|| unix.to_string())
}

impl fmt::Debug for TlsIdentity {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("TlsIdentity").field("identity", &self.identity).finish_non_exhaustive()
    }
}

impl TlsIdentity {
    pub fn load(paths: &TlsPaths) -> Result<Self, TlsError> {
        install_crypto_provider();
        let roots = load_roots(&paths.ca)?;
        let (chain, key) = read_pair(paths)?;
        let identity = identity_from_der(&chain[0])?;
        let key = certified_key(chain, key).map_err(|(_, reason)| TlsError::File { path: paths.key.clone(), reason })?;
        Ok(TlsIdentity {
            roots,
            current: Arc::new(RwLock::new(Arc::new(CurrentCert { key, identity: identity.clone() }))),
            rotations: Arc::new(AtomicU64::new(0)),
            identity,
        })
    }

    /// Who the certificate in use says we are (after a rotation: the new serial, expiry and name).
    pub fn current(&self) -> PeerIdentity {
        self.current.read().expect("certificate lock").identity.clone()
    }

    /// Replaces the certificate and key with those in `paths.cert` and `paths.key` (`paths.ca` is not
    /// read: the CA in use stays). New handshakes of every config built from this identity use the new
    /// pair; open connections keep their session.
    ///
    /// Checked first, in this order, and nothing changes when one fails (the error names it, see
    /// [`RotationCheck`]): both files parse; the certificate carries this identity's department and role
    /// (the name may change); it is valid now; its chain verifies against the CA in use and it may serve
    /// TLS; the key is the certificate's.
    pub fn reload(&self, paths: &TlsPaths) -> Result<Rotation, TlsError> {
        let refuse = |check: RotationCheck, reason: String| TlsError::Rotation { check, reason };
        let (chain, key) = read_pair(paths).map_err(|e| refuse(RotationCheck::Files, e.to_string()))?;
        let cert_file = paths.cert.display();

        let new = identity_from_der(&chain[0]).map_err(|e| refuse(RotationCheck::Identity, format!("{cert_file}: {e}")))?;
        if new.department != self.identity.department || new.role != self.identity.role {
            return Err(refuse(
                RotationCheck::Identity,
                format!(
                    "{cert_file} is a certificate of {}/{}, this server runs as {}/{}: a rotation cannot change the department or role",
                    new.department, new.role, self.identity.department, self.identity.role
                ),
            ));
        }

        let (_, leaf) = x509_parser::parse_x509_certificate(&chain[0])
            .map_err(|e| refuse(RotationCheck::Files, format!("{cert_file}: {e}")))?;
        let (not_before, not_after) = (leaf.validity().not_before.timestamp(), leaf.validity().not_after.timestamp());
        let now = UnixTime::now().as_secs() as i64;
        if now < not_before {
            return Err(refuse(
                RotationCheck::Validity,
                format!("{cert_file} is not valid before {} (serial {})", unix_date(not_before), new.serial_hex),
            ));
        }
        if now > not_after {
            return Err(refuse(
                RotationCheck::Validity,
                format!("{cert_file} expired at {} (serial {})", unix_date(not_after), new.serial_hex),
            ));
        }

        let verifier = WebPkiClientVerifier::builder_with_provider(self.roots.clone(), provider())
            .build()
            .map_err(|e| TlsError::Config(e.to_string()))?;
        verifier.verify_client_cert(&chain[0], &chain[1..], UnixTime::now()).map_err(|e| {
            refuse(RotationCheck::Chain, format!("{cert_file} does not verify against the CA in use: {e}"))
        })?;
        // Servers present the same certificate to their clients: without serverAuth every handshake would fail.
        if let Ok(Some(eku)) = leaf.extended_key_usage() {
            if !eku.value.any && !eku.value.server_auth {
                return Err(refuse(
                    RotationCheck::Chain,
                    format!("{cert_file} may not be used by a TLS server (its extended key usage lacks serverAuth)"),
                ));
            }
        }

        let key = certified_key(chain, key).map_err(|(check, reason)| {
            refuse(check, format!("{}: {reason}", paths.key.display()))
        })?;
        let old = {
            let mut current = self.current.write().expect("certificate lock");
            let old = current.identity.clone();
            *current = Arc::new(CurrentCert { key, identity: new.clone() });
            old
        };
        let rotation = Rotation { old, new };
        if rotation.changed() {
            self.rotations.fetch_add(1, Ordering::SeqCst);
        }
        Ok(rotation)
    }

    fn cert_resolver(&self) -> Arc<CurrentCertResolver> {
        Arc::new(CurrentCertResolver(self.current.clone()))
    }

    fn server_sessions(&self) -> Arc<RotatingSessions<ServerSessionMemoryCache>> {
        Arc::new(RotatingSessions::new(self.rotations.clone(), || ServerSessionMemoryCache::new(SESSION_CACHE_ENTRIES)))
    }

    fn client_sessions(&self) -> Arc<RotatingSessions<ClientSessionMemoryCache>> {
        Arc::new(RotatingSessions::new(self.rotations.clone(), || Arc::new(ClientSessionMemoryCache::new(SESSION_CACHE_ENTRIES))))
    }
}

/// The certificate chain and private key of `paths`, parsed (not yet checked against each other).
fn read_pair(paths: &TlsPaths) -> Result<(Vec<CertificateDer<'static>>, PrivateKeyDer<'static>), TlsError> {
    let file_err = |path: &Path, reason: String| TlsError::File { path: path.to_path_buf(), reason };
    let chain: Vec<CertificateDer<'static>> = CertificateDer::pem_file_iter(&paths.cert)
        .map_err(|e| file_err(&paths.cert, e.to_string()))?
        .collect::<Result<_, _>>()
        .map_err(|e| file_err(&paths.cert, e.to_string()))?;
    if chain.is_empty() {
        return Err(file_err(&paths.cert, "no certificate in file".into()));
    }
    let key = PrivateKeyDer::from_pem_file(&paths.key).map_err(|e| file_err(&paths.key, e.to_string()))?;
    Ok((chain, key))
}

/// The pair as rustls signs with it; refused when the key is unusable or not the certificate's.
fn certified_key(
    chain: Vec<CertificateDer<'static>>,
    key: PrivateKeyDer<'static>,
) -> Result<Arc<CertifiedKey>, (RotationCheck, String)> {
    match CertifiedKey::from_der(chain, key, &provider()) {
        Ok(k) => Ok(Arc::new(k)),
        Err(rustls::Error::InconsistentKeys(_)) => {
            Err((RotationCheck::Key, "the private key does not belong to the certificate".into()))
        }
        Err(e) => Err((RotationCheck::Files, format!("unusable private key: {e}"))),
    }
}

/// Session cache entries per config (rustls' default size).
const SESSION_CACHE_ENTRIES: usize = 256;

/// Hands every handshake the certificate in use, for servers and for clients alike.
#[derive(Debug)]
struct CurrentCertResolver(Arc<RwLock<Arc<CurrentCert>>>);

impl CurrentCertResolver {
    fn key(&self) -> Arc<CertifiedKey> {
        self.0.read().expect("certificate lock").key.clone()
    }
}

impl ResolvesServerCert for CurrentCertResolver {
    fn resolve(&self, _client_hello: ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        Some(self.key())
    }
}

impl ResolvesClientCert for CurrentCertResolver {
    fn resolve(&self, _root_hint_subjects: &[&[u8]], _sigschemes: &[SignatureScheme]) -> Option<Arc<CertifiedKey>> {
        Some(self.key())
    }
    fn has_certs(&self) -> bool {
        true
    }
}

/// A TLS session cache that starts empty after each rotation of its identity. A resumed session skips the
/// certificate exchange and carries the certificates of the session it resumes: without this, a connection
/// opened after a rotation could still present the old certificate, and be refused once it is revoked.
#[derive(Debug)]
struct RotatingSessions<C> {
    rotations: Arc<AtomicU64>,
    make: fn() -> Arc<C>,
    cache: Mutex<(u64, Arc<C>)>,
}

impl<C> RotatingSessions<C> {
    fn new(rotations: Arc<AtomicU64>, make: fn() -> Arc<C>) -> Self {
        let seen = rotations.load(Ordering::SeqCst);
        RotatingSessions { rotations, make, cache: Mutex::new((seen, make())) }
    }

    fn cache(&self) -> Arc<C> {
        let now = self.rotations.load(Ordering::SeqCst);
        let mut cache = self.cache.lock().expect("session cache lock");
        if cache.0 != now {
            *cache = (now, (self.make)());
        }
        cache.1.clone()
    }
}

impl StoresServerSessions for RotatingSessions<ServerSessionMemoryCache> {
    fn put(&self, key: Vec<u8>, value: Vec<u8>) -> bool {
        self.cache().put(key, value)
    }
    fn get(&self, key: &[u8]) -> Option<Vec<u8>> {
        self.cache().get(key)
    }
    fn take(&self, key: &[u8]) -> Option<Vec<u8>> {
        self.cache().take(key)
    }
    fn can_cache(&self) -> bool {
        true
    }
}

impl ClientSessionStore for RotatingSessions<ClientSessionMemoryCache> {
    fn set_kx_hint(&self, server_name: ServerName<'static>, group: rustls::NamedGroup) {
        self.cache().set_kx_hint(server_name, group)
    }
    fn kx_hint(&self, server_name: &ServerName<'_>) -> Option<rustls::NamedGroup> {
        self.cache().kx_hint(server_name)
    }
    fn set_tls12_session(&self, server_name: ServerName<'static>, value: rustls::client::Tls12ClientSessionValue) {
        self.cache().set_tls12_session(server_name, value)
    }
    fn tls12_session(&self, server_name: &ServerName<'_>) -> Option<rustls::client::Tls12ClientSessionValue> {
        self.cache().tls12_session(server_name)
    }
    fn remove_tls12_session(&self, server_name: &ServerName<'static>) {
        self.cache().remove_tls12_session(server_name)
    }
    fn insert_tls13_ticket(&self, server_name: ServerName<'static>, value: rustls::client::Tls13ClientSessionValue) {
        self.cache().insert_tls13_ticket(server_name, value)
    }
    fn take_tls13_ticket(&self, server_name: &ServerName<'static>) -> Option<rustls::client::Tls13ClientSessionValue> {
        self.cache().take_tls13_ticket(server_name)
    }
}

/// Serials the holder refuses. Shared between the handshake verifier and the per-call check, so a
/// revocation takes effect on new and on open connections at once.
#[derive(Clone, Default)]
pub struct RevocationSet(Arc<RwLock<HashSet<String>>>);

impl fmt::Debug for RevocationSet {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "RevocationSet({} serials)", self.len())
    }
}

impl RevocationSet {
    pub fn is_revoked(&self, serial_hex: &str) -> bool {
        self.0.read().expect("revocation lock").contains(serial_hex)
    }
    /// Adds a serial; false if it was revoked already.
    pub fn insert(&self, serial_hex: String) -> bool {
        self.0.write().expect("revocation lock").insert(serial_hex)
    }
    pub fn replace_all(&self, serials: impl IntoIterator<Item = String>) {
        *self.0.write().expect("revocation lock") = serials.into_iter().collect();
    }
    pub fn len(&self) -> usize {
        self.0.read().expect("revocation lock").len()
    }
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

/// The client verifier: webpki chain validation (CA, validity period, key usage), then a gov-exchange
/// identity and a revocation check on the leaf.
struct IdentityClientVerifier {
    inner: Arc<dyn ClientCertVerifier>,
    revoked: RevocationSet,
}

impl fmt::Debug for IdentityClientVerifier {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("IdentityClientVerifier")
    }
}

impl ClientCertVerifier for IdentityClientVerifier {
    // rustls' defaults make a certificate mandatory; the inner verifier knows whether it is (the admin
    // port's is optional, for token holders).
    fn offer_client_auth(&self) -> bool {
        self.inner.offer_client_auth()
    }
    fn client_auth_mandatory(&self) -> bool {
        self.inner.client_auth_mandatory()
    }
    fn root_hint_subjects(&self) -> &[DistinguishedName] {
        self.inner.root_hint_subjects()
    }
    fn verify_client_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        now: UnixTime,
    ) -> Result<ClientCertVerified, rustls::Error> {
        self.inner.verify_client_cert(end_entity, intermediates, now)?;
        let id = identity_from_der(end_entity)
            .map_err(|e| rustls::Error::InvalidCertificate(CertificateError::Other(rustls::OtherError(Arc::new(e)))))?;
        if self.revoked.is_revoked(&id.serial_hex) {
            tracing::warn!(peer = %id, "refused revoked client certificate");
            return Err(rustls::Error::InvalidCertificate(CertificateError::Revoked));
        }
        Ok(ClientCertVerified::assertion())
    }
    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.inner.verify_tls12_signature(message, cert, dss)
    }
    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.inner.verify_tls13_signature(message, cert, dss)
    }
    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.inner.supported_verify_schemes()
    }
}

/// The server verifier on the client side: webpki (CA, validity, host name), then the server's role.
struct RoleServerVerifier {
    inner: Arc<WebPkiServerVerifier>,
    expected: Vec<Role>,
    /// When set, the server must belong to this department (a node relaying to another department's node
    /// must reach that department, whatever address the directory gave).
    department: Option<String>,
    /// When set, a revoked server certificate is refused too.
    revoked: Option<RevocationSet>,
}

impl fmt::Debug for RoleServerVerifier {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "RoleServerVerifier({:?})", self.expected)
    }
}

impl ServerCertVerifier for RoleServerVerifier {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        server_name: &ServerName<'_>,
        ocsp_response: &[u8],
        now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        self.inner.verify_server_cert(end_entity, intermediates, server_name, ocsp_response, now)?;
        let id = identity_from_der(end_entity)
            .map_err(|e| rustls::Error::InvalidCertificate(CertificateError::Other(rustls::OtherError(Arc::new(e)))))?;
        if !self.expected.is_empty() && !self.expected.contains(&id.role) {
            return Err(rustls::Error::InvalidCertificate(CertificateError::ApplicationVerificationFailure));
        }
        if let Some(dept) = &self.department {
            if &id.department != dept {
                tracing::warn!(peer = %id, expected_department = %dept, "refused server: wrong department");
                return Err(rustls::Error::InvalidCertificate(CertificateError::ApplicationVerificationFailure));
            }
        }
        if self.revoked.as_ref().is_some_and(|r| r.is_revoked(&id.serial_hex)) {
            tracing::warn!(peer = %id, "refused revoked server certificate");
            return Err(rustls::Error::InvalidCertificate(CertificateError::Revoked));
        }
        Ok(ServerCertVerified::assertion())
    }
    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.inner.verify_tls12_signature(message, cert, dss)
    }
    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.inner.verify_tls13_signature(message, cert, dss)
    }
    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.inner.supported_verify_schemes()
    }
}

/// A server's rustls config: mutual TLS is mandatory, HTTP/2 only.
pub fn server_config(id: &TlsIdentity, revoked: RevocationSet) -> Result<Arc<rustls::ServerConfig>, TlsError> {
    build_server_config(id, revoked, true, vec![b"h2".to_vec()])
}

/// The one server config builder: the client verifier (webpki, then a gov-exchange identity that is not
/// revoked), the rotating certificate, and the session cache a rotation clears.
fn build_server_config(
    id: &TlsIdentity,
    revoked: RevocationSet,
    client_certificate_required: bool,
    alpn: Vec<Vec<u8>>,
) -> Result<Arc<rustls::ServerConfig>, TlsError> {
    let builder = WebPkiClientVerifier::builder_with_provider(id.roots.clone(), provider());
    let builder = if client_certificate_required { builder } else { builder.allow_unauthenticated() };
    let inner = builder.build().map_err(|e| TlsError::Config(e.to_string()))?;
    let verifier = Arc::new(IdentityClientVerifier { inner, revoked });
    let mut config = rustls::ServerConfig::builder_with_provider(provider())
        .with_safe_default_protocol_versions()
        .map_err(|e| TlsError::Config(e.to_string()))?
        .with_client_cert_verifier(verifier)
        .with_cert_resolver(id.cert_resolver());
    config.session_storage = id.server_sessions();
    config.alpn_protocols = alpn;
    Ok(Arc::new(config))
}

/// A client's rustls config: presents `id`, accepts only servers whose certificate has one of `server_roles`.
pub fn client_config(id: &TlsIdentity, server_roles: &[Role]) -> Result<Arc<rustls::ClientConfig>, TlsError> {
    build_client_config(id, server_roles.to_vec(), None, None)
}

/// A node's client config for calling another department's node: the server must present a `node`
/// certificate of `department` that is not in `revoked`.
pub fn peer_node_client_config(
    id: &TlsIdentity,
    department: &str,
    revoked: RevocationSet,
) -> Result<Arc<rustls::ClientConfig>, TlsError> {
    build_client_config(id, vec![Role::Node], Some(department.to_string()), Some(revoked))
}

fn build_client_config(
    id: &TlsIdentity,
    expected: Vec<Role>,
    department: Option<String>,
    revoked: Option<RevocationSet>,
) -> Result<Arc<rustls::ClientConfig>, TlsError> {
    let inner = WebPkiServerVerifier::builder_with_provider(id.roots.clone(), provider())
        .build()
        .map_err(|e| TlsError::Config(e.to_string()))?;
    let verifier = Arc::new(RoleServerVerifier { inner, expected, department, revoked });
    let mut config = rustls::ClientConfig::builder_with_provider(provider())
        .with_safe_default_protocol_versions()
        .map_err(|e| TlsError::Config(e.to_string()))?
        .dangerous()
        .with_custom_certificate_verifier(verifier)
        .with_client_cert_resolver(id.cert_resolver());
    config.resumption = Resumption::store(id.client_sessions());
    config.alpn_protocols = vec![b"h2".to_vec()];
    Ok(Arc::new(config))
}

fn split_host(addr: &str) -> Result<(String, ServerName<'static>), TlsError> {
    let bad = |reason: &str| TlsError::Connect { addr: addr.to_string(), reason: reason.to_string() };
    let host = match addr.rsplit_once(':') {
        Some((h, port)) if !h.is_empty() && port.parse::<u16>().is_ok() => h.trim_start_matches('[').trim_end_matches(']'),
        _ => return Err(bad("expected host:port")),
    };
    let name = ServerName::try_from(host.to_string()).map_err(|_| bad("invalid host name"))?;
    Ok((host.to_string(), name))
}

/// A channel to `addr` (`host:port`) over mutual TLS. Connects lazily: the first call dials, and a
/// broken connection is re-dialled on the next call.
pub fn connect_lazy(addr: &str, config: Arc<rustls::ClientConfig>) -> Result<Channel, TlsError> {
    endpoint(addr, config).map(|(ep, conn)| ep.connect_with_connector_lazy(conn))
}

/// Like [`connect_lazy`], but dials now and reports a failure.
pub async fn connect(addr: &str, config: Arc<rustls::ClientConfig>) -> Result<Channel, TlsError> {
    let (ep, conn) = endpoint(addr, config)?;
    ep.connect_with_connector(conn).await.map_err(|e| TlsError::Connect {
        addr: addr.to_string(),
        reason: error_chain(&e),
    })
}

/// Formats an error with all its sources (tonic's transport errors hide the useful part in the chain),
/// each said once: layers often repeat their source's text in their own.
pub fn error_chain(e: &dyn std::error::Error) -> String {
    let mut s = e.to_string();
    let mut cur = e.source();
    while let Some(src) = cur {
        let more = src.to_string();
        if !s.contains(&more) {
            s.push_str(": ");
            s.push_str(&more);
        }
        cur = src.source();
    }
    s
}

type Connector = tower::util::BoxCloneSyncService<http::Uri, hyper_util::rt::TokioIo<tokio_rustls::client::TlsStream<TcpStream>>, io::Error>;

fn endpoint(addr: &str, config: Arc<rustls::ClientConfig>) -> Result<(Endpoint, Connector), TlsError> {
    let (_, server_name) = split_host(addr)?;
    // `http://`, not `https://`: the connector below does the TLS itself. With tonic's TLS feature on, an
    // https URI makes tonic wrap its own TLS around the connector's stream and, having no tonic TLS config,
    // fail every call with "Connecting to HTTPS without TLS enabled".
    let ep = Endpoint::from_shared(format!("http://{addr}"))
        .map_err(|e| TlsError::Connect { addr: addr.to_string(), reason: e.to_string() })?
        .connect_timeout(Duration::from_secs(5))
        .tcp_nodelay(true)
        .http2_keep_alive_interval(Duration::from_secs(30))
        .keep_alive_timeout(Duration::from_secs(10))
        .keep_alive_while_idle(true);
    let target = addr.to_string();
    let connector = tower::service_fn(move |_uri: http::Uri| {
        let config = config.clone();
        let server_name = server_name.clone();
        let target = target.clone();
        async move {
            let tcp = TcpStream::connect(&target).await?;
            tcp.set_nodelay(true)?;
            let tls = tokio_rustls::TlsConnector::from(config).connect(server_name, tcp).await?;
            Ok::<_, io::Error>(hyper_util::rt::TokioIo::new(tls))
        }
    });
    Ok((ep, tower::util::BoxCloneSyncService::new(connector)))
}

/// A server-side TLS connection that holds a slot of the connection limit until it closes.
pub struct TlsConnection {
    stream: tokio_rustls::server::TlsStream<TcpStream>,
    _permit: OwnedSemaphorePermit,
}

impl Connected for TlsConnection {
    type ConnectInfo = <tokio_rustls::server::TlsStream<TcpStream> as Connected>::ConnectInfo;
    fn connect_info(&self) -> Self::ConnectInfo {
        self.stream.connect_info()
    }
}

impl AsyncRead for TlsConnection {
    fn poll_read(mut self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &mut ReadBuf<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.stream).poll_read(cx, buf)
    }
}

impl AsyncWrite for TlsConnection {
    fn poll_write(mut self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &[u8]) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.stream).poll_write(cx, buf)
    }
    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.stream).poll_flush(cx)
    }
    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.stream).poll_shutdown(cx)
    }
    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.stream).poll_write_vectored(cx, bufs)
    }
    fn is_write_vectored(&self) -> bool {
        self.stream.is_write_vectored()
    }
}

/// How long a client may take to finish the TLS handshake before it is dropped.
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);

/// Accepts TCP connections on `listener`, completes TLS handshakes concurrently (a slow or hostile client
/// cannot stall the accept loop) and yields the established connections. At most `max_connections` are
/// open at once; further clients wait in the kernel's backlog. Failed handshakes (no certificate, foreign
/// CA, expired, revoked, plaintext) are logged and dropped.
pub fn serve_incoming(
    listener: TcpListener,
    config: Arc<rustls::ServerConfig>,
    max_connections: usize,
) -> impl Stream<Item = Result<TlsConnection, io::Error>> {
    let (tx, rx) = mpsc::channel::<Result<TlsConnection, io::Error>>(64);
    let limit = Arc::new(Semaphore::new(max_connections.max(1)));
    let acceptor = tokio_rustls::TlsAcceptor::from(config);
    tokio::spawn(async move {
        loop {
            let permit = tokio::select! {
                permit = limit.clone().acquire_owned() => permit.expect("semaphore never closed"),
                _ = tx.closed() => return,
            };
            let (tcp, peer) = tokio::select! {
                accepted = listener.accept() => match accepted {
                    Ok(x) => x,
                    Err(e) => {
                        tracing::warn!(error = %e, "accept failed");
                        tokio::time::sleep(Duration::from_millis(50)).await;
                        continue;
                    }
                },
                _ = tx.closed() => return,
            };
            let _ = tcp.set_nodelay(true);
            let acceptor = acceptor.clone();
            let tx = tx.clone();
            tokio::spawn(async move {
                match tokio::time::timeout(HANDSHAKE_TIMEOUT, acceptor.accept(tcp)).await {
                    Ok(Ok(stream)) => {
                        let _ = tx.send(Ok(TlsConnection { stream, _permit: permit })).await;
                    }
                    Ok(Err(e)) => log_refused(peer, &e),
                    Err(_) => tracing::info!(%peer, "TLS handshake timed out"),
                }
            });
        }
    });
    tokio_stream::wrappers::ReceiverStream::new(rx)
}

fn log_refused(peer: SocketAddr, e: &io::Error) {
    tracing::info!(%peer, error = %e, "refused connection: TLS handshake failed");
}

// ---- The admin port (HTTPS: metrics, health, console, operator API) ----

/// `host:port` split into the host (for the `Host` header) and the TLS server name.
pub fn split_host_port(addr: &str) -> Result<(String, ServerName<'static>), TlsError> {
    split_host(addr)
}

/// Reads the CA certificates of a PEM file into trust roots.
fn load_roots(path: &Path) -> Result<Arc<RootCertStore>, TlsError> {
    let file_err = |reason: String| TlsError::File { path: path.to_path_buf(), reason };
    let mut roots = RootCertStore::empty();
    for cert in CertificateDer::pem_file_iter(path).map_err(|e| file_err(e.to_string()))? {
        roots.add(cert.map_err(|e| file_err(e.to_string()))?).map_err(|e| file_err(e.to_string()))?;
    }
    if roots.is_empty() {
        return Err(file_err("no certificate in file".into()));
    }
    Ok(Arc::new(roots))
}

/// The admin port's server config: the same certificate as the gRPC port, HTTP/1.1 and h2 (browsers,
/// Prometheus, kubelet), and a client certificate *optional*: operators present one, a browser or a
/// scraper with a token need not. A certificate that is presented is checked in full (CA, validity,
/// gov-exchange identity, revocation); who may do what is decided per request by the admin server.
pub fn admin_server_config(id: &TlsIdentity, revoked: RevocationSet) -> Result<Arc<rustls::ServerConfig>, TlsError> {
    build_server_config(id, revoked, false, vec![b"h2".to_vec(), b"http/1.1".to_vec()])
}

/// A client config for an admin port: the server must chain to the CA in `ca` and carry one of
/// `server_roles`; the caller presents `client` when given (an operator certificate), else no certificate.
pub fn admin_client_config(
    ca: &Path,
    client: Option<&TlsIdentity>,
    server_roles: &[Role],
) -> Result<Arc<rustls::ClientConfig>, TlsError> {
    let roots = match client {
        Some(id) => id.roots.clone(),
        None => load_roots(ca)?,
    };
    let inner = WebPkiServerVerifier::builder_with_provider(roots, provider())
        .build()
        .map_err(|e| TlsError::Config(e.to_string()))?;
    let verifier = Arc::new(RoleServerVerifier { inner, expected: server_roles.to_vec(), department: None, revoked: None });
    let builder = rustls::ClientConfig::builder_with_provider(provider())
        .with_safe_default_protocol_versions()
        .map_err(|e| TlsError::Config(e.to_string()))?
        .dangerous()
        .with_custom_certificate_verifier(verifier);
    let mut config = match client {
        Some(id) => {
            let mut config = builder.with_client_cert_resolver(id.cert_resolver());
            config.resumption = Resumption::store(id.client_sessions());
            config
        }
        None => builder.with_no_client_auth(),
    };
    config.alpn_protocols = vec![b"http/1.1".to_vec()];
    Ok(Arc::new(config))
}
