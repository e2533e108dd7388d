//! The admin port's HTTPS server: authentication, and the routes both servers share. What differs
//! between a node and the directory comes from their [`AdminSource`].

use std::convert::Infallible;
use std::future::Future;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use axum::body::Body;
use axum::extract::{Query, State};
use axum::http::{header, HeaderMap, HeaderValue, Request, StatusCode};
use axum::response::{IntoResponse, Redirect, Response};
use axum::routing::{get, post};
use axum::{Extension, Json, Router};
use hyper_util::rt::{TokioExecutor, TokioIo};
use hyper_util::server::conn::auto;
use serde::Deserialize;
use tokio::net::TcpListener;
use tokio::sync::Semaphore;

use super::api::{
    CatalogReport, ErrorBody, GrantsReport, HealthCheck, MaintenanceRequest, OutboxReport, PeersReport, ReloadReport,
    StatusReport,
};
use super::config::AdminConfig;
use super::health::Health;
use super::metrics::{GaugeText, Metrics};
use crate::identity::{identity_from_der, PeerIdentity, Role};
use crate::tls::{self, RevocationSet, TlsIdentity};

/// What a server tells its admin port. Implemented by `exchange_node::admin::NodeAdmin` and
/// `directory::admin::DirectoryAdmin`.
#[async_trait::async_trait]
pub trait AdminSource: Send + Sync + 'static {
    /// The named readiness checks (certificate, store, directory, backlog, ...).
    async fn checks(&self) -> Vec<HealthCheck>;
    /// State gauges for this scrape (backlog, staleness, store size, certificate expiry, ...).
    async fn gauges(&self, out: &mut GaugeText);
    /// The server-specific part of the status; the admin server fills in traffic, uptime and readiness.
    async fn status(&self) -> StatusReport;
    async fn peers(&self) -> PeersReport;
    async fn outbox(&self) -> OutboxReport;
    async fn catalog(&self) -> CatalogReport;
    async fn grants(&self) -> GrantsReport;
    /// Re-reads the certificate and key files (rotation) and whatever else is reloadable.
    async fn reload(&self) -> Result<ReloadReport, String>;
    /// Writes a consistent backup to a new temporary file and returns its path; the caller streams it
    /// and removes it.
    async fn backup(&self) -> Result<PathBuf, String>;
    /// Why this server's store cannot be backed up through the admin port (e.g. it lives in a shared
    /// database with backup tools of its own), or `None`.
    fn backup_unsupported(&self) -> Option<String> {
        None
    }
}

/// Most admin connections open at once: the admin port serves a few operators and scrapers.
const MAX_ADMIN_CONNECTIONS: usize = 64;
/// How long open admin requests (a backup download) may run on after shutdown begins.
const ADMIN_DRAIN: Duration = Duration::from_secs(5);
/// The console's cookie is `gx_admin_<department>`: cookies are per host, not per port, so servers of
/// several departments on one host (a test bed, the quick start) must not overwrite each other's.
const COOKIE_PREFIX: &str = "gx_admin_";

const INDEX_HTML: &str = include_str!("console/index.html");
const LOGIN_HTML: &str = include_str!("console/login.html");
const CONSOLE_JS: &str = include_str!("console/console.js");
const CONSOLE_CSS: &str = include_str!("console/console.css");

/// Everything the routes need.
#[derive(Clone)]
pub struct AdminState {
    pub source: Arc<dyn AdminSource>,
    pub metrics: Arc<Metrics>,
    pub health: Arc<Health>,
    /// The server's own department: operator certificates must be of it.
    pub department: String,
    pub token: Option<Arc<String>>,
    pub open_probes: bool,
}

/// Who is calling, from the connection.
#[derive(Clone, Debug)]
struct ConnPeer {
    addr: SocketAddr,
    identity: Option<PeerIdentity>,
}

/// Serves the admin port on `listener` until `shutdown` resolves; open requests get [`ADMIN_DRAIN`] to
/// finish.
pub async fn serve(
    listener: TcpListener,
    tls_identity: &TlsIdentity,
    revoked: RevocationSet,
    config: &AdminConfig,
    state: AdminState,
    shutdown: impl Future<Output = ()> + Send,
) -> Result<(), String> {
    let server_tls = tls::admin_server_config(tls_identity, revoked).map_err(|e| e.to_string())?;
    let acceptor = tokio_rustls::TlsAcceptor::from(server_tls);
    let router = router(state);
    let limit = Arc::new(Semaphore::new(MAX_ADMIN_CONNECTIONS));
    let graceful = hyper_util::server::graceful::GracefulShutdown::new();
    let local = listener.local_addr().map_err(|e| e.to_string())?;
    tracing::info!(admin = %local, token = config.token_file.is_some(), "admin port serving (metrics, health, console)");
    tokio::pin!(shutdown);
    loop {
        let permit = tokio::select! {
            p = limit.clone().acquire_owned() => p.expect("semaphore never closed"),
            _ = &mut shutdown => break,
        };
        let (tcp, addr) = tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok(x) => x,
                Err(e) => {
                    tracing::warn!(error = %e, "admin accept failed");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            },
            _ = &mut shutdown => break,
        };
        // Small request/response exchanges: without it, delayed acknowledgements add ~40 ms per request.
        let _ = tcp.set_nodelay(true);
        let acceptor = acceptor.clone();
        let router = router.clone();
        let watcher = graceful.watcher();
        tokio::spawn(async move {
            let _permit = permit;
            let stream = match tokio::time::timeout(Duration::from_secs(10), acceptor.accept(tcp)).await {
                Ok(Ok(s)) => s,
                Ok(Err(e)) => {
                    tracing::info!(peer = %addr, error = %e, "admin TLS handshake refused");
                    return;
                }
                Err(_) => return,
            };
            let identity = stream
                .get_ref()
                .1
                .peer_certificates()
                .and_then(|c| c.first())
                .and_then(|leaf| identity_from_der(leaf).ok());
            let peer = ConnPeer { addr, identity };
            let service = hyper::service::service_fn(move |mut req: Request<hyper::body::Incoming>| {
                req.extensions_mut().insert(peer.clone());
                let mut router = router.clone();
                async move {
                    let response = tower::Service::call(&mut router, req.map(Body::new)).await;
                    Ok::<_, Infallible>(response.unwrap_or_else(|e: Infallible| match e {}))
                }
            });
            let builder = auto::Builder::new(TokioExecutor::new());
            let connection = builder.serve_connection_with_upgrades(TokioIo::new(stream), service);
            let _ = watcher.watch(connection.into_owned()).await;
        });
    }
    drop(listener);
    tokio::select! {
        _ = graceful.shutdown() => {}
        _ = tokio::time::sleep(ADMIN_DRAIN) => tracing::warn!("admin requests still open at shutdown were cut"),
    }
    Ok(())
}

/// The routes. Everything but the probes, the login page and the static assets needs an operator.
pub fn router(state: AdminState) -> Router {
    let protected = Router::new()
        .route("/metrics", get(metrics))
        .route("/api/status", get(status))
        .route("/api/traffic", get(|State(s): State<AdminState>| async move { Json(s.metrics.traffic_report()) }))
        .route("/api/refused", get(|State(s): State<AdminState>| async move { Json(s.metrics.refused_report()) }))
        .route("/api/peers", get(|State(s): State<AdminState>| async move { Json(s.source.peers().await) }))
        .route("/api/outbox", get(|State(s): State<AdminState>| async move { Json(s.source.outbox().await) }))
        .route("/api/catalog", get(|State(s): State<AdminState>| async move { Json(s.source.catalog().await) }))
        .route("/api/grants", get(|State(s): State<AdminState>| async move { Json(s.source.grants().await) }))
        .route("/api/maintenance", post(maintenance))
        .route("/api/reload", post(reload))
        .route("/api/backup", get(backup))
        .route_layer(axum::middleware::from_fn_with_state(state.clone(), require_operator));
    Router::new()
        .route("/", get(index))
        .route("/login", get(login_get).post(login_post))
        .route("/healthz", get(|| async { "ok\n" }))
        .route("/readyz", get(readyz))
        // Open: the login page needs its style sheet, and neither file holds any data.
        .route("/assets/console.js", get(|| async { asset("text/javascript; charset=utf-8", CONSOLE_JS) }))
        .route("/assets/console.css", get(|| async { asset("text/css; charset=utf-8", CONSOLE_CSS) }))
        .merge(protected)
        .fallback(|| async { error(StatusCode::NOT_FOUND, "no such page on the admin port") })
        .with_state(state)
}

fn error(status: StatusCode, message: impl Into<String>) -> Response {
    (status, no_store(), Json(ErrorBody { error: message.into() })).into_response()
}

fn no_store() -> [(header::HeaderName, HeaderValue); 2] {
    [
        (header::CACHE_CONTROL, HeaderValue::from_static("no-store")),
        (header::X_CONTENT_TYPE_OPTIONS, HeaderValue::from_static("nosniff")),
    ]
}

/// Pages: no framing, scripts only from this origin, no external fetches.
fn page_headers() -> [(header::HeaderName, HeaderValue); 5] {
    [
        (header::CONTENT_TYPE, HeaderValue::from_static("text/html; charset=utf-8")),
        (header::CACHE_CONTROL, HeaderValue::from_static("no-store")),
        (header::X_FRAME_OPTIONS, HeaderValue::from_static("DENY")),
        (header::X_CONTENT_TYPE_OPTIONS, HeaderValue::from_static("nosniff")),
        (
            header::CONTENT_SECURITY_POLICY,
            HeaderValue::from_static(
                "default-src 'none'; script-src 'self'; style-src 'self'; connect-src 'self'; img-src 'self' data:; form-action 'self'; frame-ancestors 'none'",
            ),
        ),
    ]
}

fn asset(content_type: &'static str, body: &'static str) -> Response {
    ([(header::CONTENT_TYPE, HeaderValue::from_static(content_type)), (header::CACHE_CONTROL, HeaderValue::from_static("no-cache"))], body)
        .into_response()
}

/// How a request proved itself, or why it did not.
enum Auth {
    Operator,
    Token,
    /// No credentials at all.
    Missing,
    /// A certificate that is not an operator of this department.
    WrongCertificate(String),
    /// A token that does not match.
    WrongToken,
}

fn authenticate(state: &AdminState, peer: Option<&ConnPeer>, headers: &HeaderMap) -> Auth {
    let presented = bearer(headers).or_else(|| cookie(headers, &cookie_name(&state.department)));
    if let (Some(presented), Some(token)) = (&presented, &state.token) {
        if constant_time_eq(presented.as_bytes(), token.as_bytes()) {
            return Auth::Token;
        }
    }
    if let Some(id) = peer.and_then(|p| p.identity.as_ref()) {
        if id.role == Role::Operator && id.department == state.department {
            return Auth::Operator;
        }
        if presented.is_none() {
            return Auth::WrongCertificate(format!(
                "certificate {}/{}/{} is not an operator certificate of department {}",
                id.department, id.role, id.name, state.department
            ));
        }
    }
    if presented.is_some() {
        Auth::WrongToken
    } else {
        Auth::Missing
    }
}

fn bearer(headers: &HeaderMap) -> Option<String> {
    let value = headers.get(header::AUTHORIZATION)?.to_str().ok()?;
    value.strip_prefix("Bearer ").map(|t| t.trim().to_string())
}

fn cookie_name(department: &str) -> String {
    let safe: String = department.chars().map(|c| if c.is_ascii_alphanumeric() { c } else { '_' }).collect();
    format!("{COOKIE_PREFIX}{safe}")
}

fn cookie(headers: &HeaderMap, name: &str) -> Option<String> {
    headers.get_all(header::COOKIE).iter().filter_map(|v| v.to_str().ok()).flat_map(|v| v.split(';')).find_map(|c| {
        let (n, value) = c.trim().split_once('=')?;
        (n == name).then(|| value.to_string())
    })
}

fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    // Compare digests, so neither the length nor the position of the first difference shows in timing.
    use sha2::{Digest, Sha256};
    let (da, db) = (Sha256::digest(a), Sha256::digest(b));
    da.iter().zip(db.iter()).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

/// Logs and counts a refused admin request, and answers it.
fn refuse(state: &AdminState, peer: Option<&ConnPeer>, path: &str, auth: Auth) -> Response {
    let addr = peer.map(|p| p.addr.to_string()).unwrap_or_default();
    state.metrics.admin_auth_failure();
    match auth {
        Auth::WrongToken => {
            tracing::warn!(peer = %addr, path, "admin request refused: wrong token");
            error(StatusCode::UNAUTHORIZED, "wrong admin token")
        }
        Auth::WrongCertificate(why) => {
            tracing::warn!(peer = %addr, path, reason = %why, "admin request refused");
            error(StatusCode::FORBIDDEN, why)
        }
        _ => {
            tracing::info!(peer = %addr, path, "admin request refused: no credentials");
            error(
                StatusCode::UNAUTHORIZED,
                "the admin port needs an operator certificate of this department or the token of [admin] token_file",
            )
        }
    }
}

async fn require_operator(
    State(state): State<AdminState>,
    request: Request<Body>,
    next: axum::middleware::Next,
) -> Response {
    let peer = request.extensions().get::<ConnPeer>().cloned();
    match authenticate(&state, peer.as_ref(), request.headers()) {
        Auth::Operator | Auth::Token => next.run(request).await,
        other => refuse(&state, peer.as_ref(), request.uri().path(), other),
    }
}

async fn index(State(state): State<AdminState>, peer: Option<Extension<ConnPeer>>, headers: HeaderMap) -> Response {
    match authenticate(&state, peer.as_deref(), &headers) {
        Auth::Operator | Auth::Token => (page_headers(), INDEX_HTML).into_response(),
        _ => (page_headers(), login_page("")).into_response(),
    }
}

fn login_page(message: &str) -> String {
    let escaped = message.replace('&', "&amp;").replace('<', "&lt;").replace('>', "&gt;").replace('"', "&quot;");
    let html = if escaped.is_empty() { String::new() } else { format!("<p class=\"error\" id=\"login-error\">{escaped}</p>") };
    LOGIN_HTML.replace("<!--ERROR-->", &html)
}

#[derive(Deserialize)]
struct TokenForm {
    token: String,
}

async fn login_get(
    state: State<AdminState>,
    peer: Option<Extension<ConnPeer>>,
    Query(query): Query<std::collections::HashMap<String, String>>,
) -> Response {
    match query.get("token") {
        Some(token) => login(state, peer, token.clone()).await,
        None => (page_headers(), login_page("")).into_response(),
    }
}

async fn login_post(state: State<AdminState>, peer: Option<Extension<ConnPeer>>, form: axum::extract::Form<TokenForm>) -> Response {
    login(state, peer, form.0.token).await
}

async fn login(State(state): State<AdminState>, peer: Option<Extension<ConnPeer>>, token: String) -> Response {
    let token = token.trim().to_string();
    let valid = state.token.as_ref().is_some_and(|t| constant_time_eq(token.as_bytes(), t.as_bytes()));
    if !valid {
        state.metrics.admin_auth_failure();
        let addr = peer.map(|p| p.addr.to_string()).unwrap_or_default();
        tracing::warn!(peer = %addr, "admin console login refused: wrong token");
        let mut response = (page_headers(), login_page("wrong token")).into_response();
        *response.status_mut() = StatusCode::UNAUTHORIZED;
        return response;
    }
    let cookie = format!("{}={token}; Path=/; HttpOnly; Secure; SameSite=Strict", cookie_name(&state.department));
    let mut response = Redirect::to("/").into_response();
    if let Ok(v) = HeaderValue::from_str(&cookie) {
        response.headers_mut().insert(header::SET_COOKIE, v);
    }
    response
}

async fn readyz(State(state): State<AdminState>, peer: Option<Extension<ConnPeer>>, headers: HeaderMap) -> Response {
    let auth = authenticate(&state, peer.as_deref(), &headers);
    let authenticated = matches!(auth, Auth::Operator | Auth::Token);
    if !state.open_probes && !authenticated {
        return refuse(&state, peer.as_deref(), "/readyz", auth);
    }
    let mut readiness = state.health.readiness(state.source.as_ref()).await;
    if !authenticated {
        // Anyone may learn whether the server is ready and which check fails; the details may name
        // departments, addresses or paths, so they are for operators only.
        for c in &mut readiness.checks {
            c.detail.clear();
        }
    }
    let code = if readiness.ready { StatusCode::OK } else { StatusCode::SERVICE_UNAVAILABLE };
    (code, no_store(), Json(readiness)).into_response()
}

async fn metrics(State(state): State<AdminState>) -> Response {
    let mut gauges = GaugeText::default();
    state.source.gauges(&mut gauges).await;
    let readiness = state.health.readiness(state.source.as_ref()).await;
    gauges
        .gauge("gx_ready", "1 when the server passes every readiness check and is not in maintenance", &[], readiness.ready as u8 as f64)
        .gauge("gx_maintenance", "1 while the maintenance switch is on", &[], readiness.maintenance as u8 as f64)
        .gauge("gx_uptime_seconds", "Seconds since the server started", &[], state.metrics.uptime().as_secs() as f64);
    for check in &readiness.checks {
        gauges.gauge("gx_check_ok", "1 when the named readiness check passes", &[("check", &check.name)], check.ok as u8 as f64);
    }
    (
        [(header::CONTENT_TYPE, HeaderValue::from_static("text/plain; version=0.0.4; charset=utf-8"))],
        state.metrics.render(&gauges),
    )
        .into_response()
}

async fn status(State(state): State<AdminState>) -> Json<StatusReport> {
    let mut report = state.source.status().await;
    report.started_unix_ms = state.metrics.started_unix_ms();
    report.uptime_seconds = state.metrics.uptime().as_secs();
    report.traffic = state.metrics.totals();
    report.readiness = state.health.readiness(state.source.as_ref()).await;
    Json(report)
}

async fn maintenance(State(state): State<AdminState>, body: Result<Json<MaintenanceRequest>, axum::extract::rejection::JsonRejection>) -> Response {
    match body {
        Ok(Json(request)) => Json(state.health.set_maintenance(request.on, state.source.as_ref()).await).into_response(),
        Err(e) => error(StatusCode::BAD_REQUEST, format!("expected {{\"on\": true|false}}: {}", e.body_text())),
    }
}

async fn reload(State(state): State<AdminState>) -> Response {
    match state.source.reload().await {
        Ok(report) => Json(report).into_response(),
        Err(e) => error(StatusCode::UNPROCESSABLE_ENTITY, e),
    }
}

async fn backup(State(state): State<AdminState>) -> Response {
    if let Some(why) = state.source.backup_unsupported() {
        return error(StatusCode::NOT_IMPLEMENTED, why);
    }
    let path = match state.source.backup().await {
        Ok(p) => p,
        Err(e) => return error(StatusCode::INTERNAL_SERVER_ERROR, e),
    };
    let file = match tokio::fs::File::open(&path).await {
        Ok(f) => f,
        Err(e) => return error(StatusCode::INTERNAL_SERVER_ERROR, format!("backup file: {e}")),
    };
    let len = file.metadata().await.map(|m| m.len()).unwrap_or(0);
    // Unlinked now, read through the open handle: nothing is left behind however the download ends.
    let _ = tokio::fs::remove_file(&path).await;
    let stream = tokio_util::io::ReaderStream::with_capacity(file, 256 * 1024);
    let name = path.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_else(|| "backup.gxb".into());
    let mut response = Response::new(Body::from_stream(stream));
    let headers = response.headers_mut();
    headers.insert(header::CONTENT_TYPE, HeaderValue::from_static("application/octet-stream"));
    headers.insert(header::CONTENT_LENGTH, HeaderValue::from(len));
    if let Ok(v) = HeaderValue::from_str(&format!("attachment; filename=\"{name}\"")) {
        headers.insert(header::CONTENT_DISPOSITION, v);
    }
    response
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tokens_compare_whole() {
        assert!(constant_time_eq(b"abc", b"abc"));
        assert!(!constant_time_eq(b"abc", b"abd"));
        assert!(!constant_time_eq(b"abc", b"abcd"));
    }

    #[test]
    fn the_cookie_is_found_among_others() {
        let mut h = HeaderMap::new();
        h.insert(header::COOKIE, HeaderValue::from_static("a=1; gx_admin_tax=other; gx_admin_commerce=secret; b=2"));
        assert_eq!(cookie(&h, &cookie_name("commerce")).as_deref(), Some("secret"));
        assert_eq!(cookie(&h, &cookie_name("quality")), None);
        h.insert(header::AUTHORIZATION, HeaderValue::from_static("Bearer tok"));
        assert_eq!(bearer(&h).as_deref(), Some("tok"));
    }

    #[test]
    fn login_errors_are_escaped() {
        assert!(login_page("<script>").contains("&lt;script&gt;"));
    }
}
