//! [`AdminClient`]: HTTPS to a server's admin port, as `exchangectl status|top|peers|outbox|backup|admin`
//! use it. The server's certificate is checked against the gov-exchange CA (role `node` or `directory`);
//! the caller proves itself with an operator certificate, a bearer token, or both.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use http::{Method, Request, StatusCode};
use http_body_util::{BodyExt, Full};
use hyper::body::Bytes;
use hyper_util::rt::TokioIo;
use serde::de::DeserializeOwned;
use serde::Serialize;
use tokio::io::AsyncWriteExt;
use tokio::net::TcpStream;

use super::api::ErrorBody;
use crate::identity::Role;
use crate::tls::{self, TlsError, TlsIdentity};

/// How the caller proves itself to the admin port.
#[derive(Clone, Debug)]
pub struct AdminAuth {
    /// The gov-exchange CA the server's certificate must chain to.
    pub ca: PathBuf,
    /// An operator certificate of the server's department.
    pub client: Option<TlsIdentity>,
    /// The token of the server's `[admin] token_file`.
    pub token: Option<String>,
}

#[derive(Debug, thiserror::Error)]
pub enum AdminClientError {
    #[error("{0}")]
    Tls(#[from] TlsError),
    #[error("cannot reach the admin port {addr}: {reason}")]
    Connect { addr: String, reason: String },
    /// The server answered with an error status (401 wrong credentials, 400 bad request, ...).
    #[error("admin port answered {status}: {message}")]
    Status { status: u16, message: String },
    #[error("unexpected answer from the admin port: {0}")]
    Decode(String),
    #[error("{path}: {reason}")]
    File { path: PathBuf, reason: String },
}

/// A client of one server's admin port. Each call opens a fresh connection: the CLI makes few calls,
/// and a fresh handshake always uses the server's current certificate.
#[derive(Clone)]
pub struct AdminClient {
    addr: String,
    config: Arc<rustls::ClientConfig>,
    token: Option<String>,
    timeout: Duration,
}

impl std::fmt::Debug for AdminClient {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("AdminClient").field("addr", &self.addr).field("token", &self.token.as_ref().map(|_| "…")).finish()
    }
}

impl AdminClient {
    /// Prepares a client of the admin port at `addr` (`host:port`); nothing is dialled yet.
    pub fn connect(addr: &str, auth: AdminAuth) -> Result<AdminClient, AdminClientError> {
        let config = tls::admin_client_config(&auth.ca, auth.client.as_ref(), &[Role::Node, Role::Directory])?;
        Ok(AdminClient { addr: addr.to_string(), config, token: auth.token, timeout: Duration::from_secs(30) })
    }

    /// Deadline of each request (a download's deadline covers only its first byte).
    pub fn with_timeout(mut self, timeout: Duration) -> Self {
        self.timeout = timeout;
        self
    }

    pub fn address(&self) -> &str {
        &self.addr
    }

    /// `GET path` and decode the JSON answer.
    pub async fn get_json<T: DeserializeOwned>(&self, path: &str) -> Result<T, AdminClientError> {
        let (_, body) = self.call(Method::GET, path, None, true).await?;
        serde_json::from_slice(&body).map_err(|e| AdminClientError::Decode(e.to_string()))
    }

    /// `POST path` with a JSON body and decode the JSON answer.
    pub async fn post_json<B: Serialize, T: DeserializeOwned>(&self, path: &str, body: &B) -> Result<T, AdminClientError> {
        let bytes = serde_json::to_vec(body).map_err(|e| AdminClientError::Decode(e.to_string()))?;
        let (_, body) = self.call(Method::POST, path, Some(bytes), true).await?;
        serde_json::from_slice(&body).map_err(|e| AdminClientError::Decode(e.to_string()))
    }

    /// `GET path` as text, with the status, whatever it is (for `/readyz`, `/metrics`).
    pub async fn get_text(&self, path: &str) -> Result<(u16, String), AdminClientError> {
        let (status, body) = self.call(Method::GET, path, None, false).await?;
        Ok((status.as_u16(), String::from_utf8_lossy(&body).into_owned()))
    }

    /// `GET path` streamed into the file `out` (written as `out.part`, renamed when complete, mode 0600).
    /// Returns the bytes written.
    pub async fn download(&self, path: &str, out: &Path) -> Result<u64, AdminClientError> {
        let response = tokio::time::timeout(self.timeout, self.send(Method::GET, path, None))
            .await
            .map_err(|_| self.connect_error("no answer before the deadline"))??;
        let status = response.status();
        let mut body = response.into_body();
        if !status.is_success() {
            let bytes = body.collect().await.map(|b| b.to_bytes()).unwrap_or_default();
            return Err(status_error(status, &bytes));
        }
        let part = out.with_extension("part");
        let file_err = |reason: String| AdminClientError::File { path: part.clone(), reason };
        let mut options = tokio::fs::OpenOptions::new();
        options.write(true).create(true).truncate(true);
        #[cfg(unix)]
        options.mode(0o600);
        let mut file = options.open(&part).await.map_err(|e| file_err(e.to_string()))?;
        let mut written = 0u64;
        while let Some(frame) = body.frame().await {
            let frame = frame.map_err(|e| self.connect_error(&e.to_string()))?;
            if let Some(data) = frame.data_ref() {
                file.write_all(data).await.map_err(|e| file_err(e.to_string()))?;
                written += data.len() as u64;
            }
        }
        file.sync_all().await.map_err(|e| file_err(e.to_string()))?;
        drop(file);
        tokio::fs::rename(&part, out)
            .await
            .map_err(|e| AdminClientError::File { path: out.to_path_buf(), reason: e.to_string() })?;
        Ok(written)
    }

    async fn call(
        &self,
        method: Method,
        path: &str,
        body: Option<Vec<u8>>,
        require_success: bool,
    ) -> Result<(StatusCode, Bytes), AdminClientError> {
        let work = async {
            let response = self.send(method, path, body).await?;
            let status = response.status();
            let bytes = response
                .into_body()
                .collect()
                .await
                .map_err(|e| self.connect_error(&e.to_string()))?
                .to_bytes();
            Ok::<_, AdminClientError>((status, bytes))
        };
        let (status, bytes) =
            tokio::time::timeout(self.timeout, work).await.map_err(|_| self.connect_error("no answer before the deadline"))??;
        if require_success && !status.is_success() {
            return Err(status_error(status, &bytes));
        }
        Ok((status, bytes))
    }

    async fn send(
        &self,
        method: Method,
        path: &str,
        body: Option<Vec<u8>>,
    ) -> Result<http::Response<hyper::body::Incoming>, AdminClientError> {
        let (host, server_name) = tls::split_host_port(&self.addr)?;
        let tcp = TcpStream::connect(&self.addr).await.map_err(|e| self.connect_error(&e.to_string()))?;
        let _ = tcp.set_nodelay(true);
        let stream = tokio_rustls::TlsConnector::from(self.config.clone())
            .connect(server_name, tcp)
            .await
            .map_err(|e| self.connect_error(&tls::error_chain(&e)))?;
        let (mut sender, connection) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
            .await
            .map_err(|e| self.connect_error(&tls::error_chain(&e)))?;
        tokio::spawn(async move {
            let _ = connection.await;
        });
        let mut request = Request::builder().method(method).uri(path).header(http::header::HOST, host);
        if let Some(token) = &self.token {
            request = request.header(http::header::AUTHORIZATION, format!("Bearer {token}"));
        }
        let request = match body {
            Some(bytes) => request.header(http::header::CONTENT_TYPE, "application/json").body(Full::new(Bytes::from(bytes))),
            None => request.body(Full::new(Bytes::new())),
        }
        .map_err(|e| AdminClientError::Decode(e.to_string()))?;
        sender.send_request(request).await.map_err(|e| self.connect_error(&tls::error_chain(&e)))
    }

    fn connect_error(&self, reason: &str) -> AdminClientError {
        AdminClientError::Connect { addr: self.addr.clone(), reason: reason.to_string() }
    }
}

fn status_error(status: StatusCode, body: &[u8]) -> AdminClientError {
    let message = serde_json::from_slice::<ErrorBody>(body)
        .map(|b| b.error)
        .unwrap_or_else(|_| String::from_utf8_lossy(body).trim().to_string());
    AdminClientError::Status { status: status.as_u16(), message }
}

/// Reads a token file: the first line, trimmed; an empty file is an error (an empty token would match
/// an empty header).
pub fn read_token_file(path: &Path) -> Result<String, AdminClientError> {
    let text = std::fs::read_to_string(path)
        .map_err(|e| AdminClientError::File { path: path.to_path_buf(), reason: e.to_string() })?;
    let token = text.lines().next().unwrap_or("").trim().to_string();
    if token.is_empty() {
        return Err(AdminClientError::File { path: path.to_path_buf(), reason: "the token file is empty".into() });
    }
    Ok(token)
}
