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
//! There is no plaintext mode.

use std::collections::HashSet;
use std::fmt;
use std::io;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::pin::Pin;
use std::sync::{Arc, Once, RwLock};
use std::task::{Context, Poll};
use std::time::Duration;

use futures::Stream;
use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::server::danger::{ClientCertVerified, ClientCertVerifier};
use rustls::server::WebPkiClientVerifier;
use rustls::client::WebPkiServerVerifier;
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
#[derive(Clone)]
pub struct TlsIdentity {
    roots: Arc<RootCertStore>,
    chain: Vec<CertificateDer<'static>>,
    key: Arc<PrivateKeyDer<'static>>,
    pub identity: PeerIdentity,
}

impl fmt::Debug for TlsIdentity {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("TlsIdentity").field("identity", &self.identity).finish_non_exhaustive()
    }
}

impl TlsIdentity {
    pub fn load(paths: &TlsPaths) -> Result<Self, TlsError> {
        install_crypto_provider();
        let file_err = |path: &Path, reason: String| TlsError::File { path: path.to_path_buf(), reason };
        let mut roots = RootCertStore::empty();
        let ca_certs: Vec<CertificateDer<'static>> = CertificateDer::pem_file_iter(&paths.ca)
            .map_err(|e| file_err(&paths.ca, e.to_string()))?
            .collect::<Result<_, _>>()
            .map_err(|e| file_err(&paths.ca, e.to_string()))?;
        if ca_certs.is_empty() {
            return Err(file_err(&paths.ca, "no certificate in file".into()));
        }
        for c in ca_certs {
            roots.add(c).map_err(|e| file_err(&paths.ca, e.to_string()))?;
        }
        let chain: Vec<CertificateDer<'static>> = CertificateDer::pem_file_iter(&paths.cert)
            .map_err(|e| file_err(&paths.cert, e.to_string()))?
            .collect::<Result<_, _>>()
            .map_err(|e| file_err(&paths.cert, e.to_string()))?;
        let leaf = chain.first().ok_or_else(|| file_err(&paths.cert, "no certificate in file".into()))?;
        let identity = identity_from_der(leaf)?;
        let key = PrivateKeyDer::from_pem_file(&paths.key).map_err(|e| file_err(&paths.key, e.to_string()))?;
        Ok(TlsIdentity { roots: Arc::new(roots), chain, key: Arc::new(key), identity })
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
    pub fn insert(&self, serial_hex: String) {
        self.0.write().expect("revocation lock").insert(serial_hex);
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
    let inner = WebPkiClientVerifier::builder_with_provider(id.roots.clone(), provider())
        .build()
        .map_err(|e| TlsError::Config(e.to_string()))?;
    let verifier = Arc::new(IdentityClientVerifier { inner, revoked });
    let mut config = rustls::ServerConfig::builder_with_provider(provider())
        .with_safe_default_protocol_versions()
        .map_err(|e| TlsError::Config(e.to_string()))?
        .with_client_cert_verifier(verifier)
        .with_single_cert(id.chain.clone(), id.key.clone_key())
        .map_err(|e| TlsError::Config(e.to_string()))?;
    config.alpn_protocols = vec![b"h2".to_vec()];
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
        .with_client_auth_cert(id.chain.clone(), id.key.clone_key())
        .map_err(|e| TlsError::Config(e.to_string()))?;
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

/// Formats an error with all its sources (tonic's transport errors hide the useful part in the chain).
pub fn error_chain(e: &dyn std::error::Error) -> String {
    let mut s = e.to_string();
    let mut cur = e.source();
    while let Some(src) = cur {
        s.push_str(": ");
        s.push_str(&src.to_string());
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
