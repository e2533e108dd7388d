//! [`Metrics`]: one server's Prometheus registry, its traffic table and its list of refused requests, and
//! [`GrpcMetricsLayer`], the tower layer that counts every gRPC call.
//!
//! Each server owns its own recorder instead of installing a process-wide one: tests run a directory and
//! several nodes in one process, and each must report only its own traffic.
//!
//! Gauges that describe state (backlog, staleness, store size, certificate expiry) are not kept in the
//! registry: the server computes them when scraped and [`GaugeText`] appends them, so a subscription that
//! is gone is gone from the metrics too.

use std::collections::{HashMap, VecDeque};
use std::fmt::Write as _;
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, OnceLock};
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use http_body::{Body as HttpBody, Frame, SizeHint};
use metrics_exporter_prometheus::{PrometheusBuilder, PrometheusHandle, PrometheusRecorder};
use tower::{Layer, Service};

use super::api::{RefusedReport, RefusedRequest, TrafficReport, TrafficRow, TrafficTotals};

/// Latency buckets, in seconds: a relayed query takes about a millisecond on a LAN, a slow provider
/// seconds.
const LATENCY_BUCKETS: &[f64] =
    &[0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0];
/// Refused requests kept for the console and `exchangectl status`.
const REFUSED_KEPT: usize = 100;
/// Distinct (direction, peer, resource) rows kept before new ones are folded into `(other)`: label
/// values come from certificates and catalog codes, but a bound keeps a misbehaving peer from growing
/// the table without end.
const TRAFFIC_ROWS_MAX: usize = 2000;
/// Histogram samples are kept until the registry's upkeep folds them into buckets; a scrape does that,
/// but a node nobody scrapes would keep every sample. Upkeep also runs after this many recordings.
const UPKEEP_EVERY: u64 = 4096;

/// Which way a relayed request went.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Direction {
    /// Another department's node asked this node (we are the provider).
    Inbound,
    /// This node asked another department's node for its application (we are the consumer).
    Outbound,
}

impl Direction {
    pub fn as_str(self) -> &'static str {
        match self {
            Direction::Inbound => "inbound",
            Direction::Outbound => "outbound",
        }
    }
}

/// The gRPC status name Prometheus labels and the console show (`PERMISSION_DENIED`, ...).
pub fn code_name(code: tonic::Code) -> &'static str {
    use tonic::Code::*;
    match code {
        Ok => "OK",
        Cancelled => "CANCELLED",
        Unknown => "UNKNOWN",
        InvalidArgument => "INVALID_ARGUMENT",
        DeadlineExceeded => "DEADLINE_EXCEEDED",
        NotFound => "NOT_FOUND",
        AlreadyExists => "ALREADY_EXISTS",
        PermissionDenied => "PERMISSION_DENIED",
        ResourceExhausted => "RESOURCE_EXHAUSTED",
        FailedPrecondition => "FAILED_PRECONDITION",
        Aborted => "ABORTED",
        OutOfRange => "OUT_OF_RANGE",
        Unimplemented => "UNIMPLEMENTED",
        Internal => "INTERNAL",
        Unavailable => "UNAVAILABLE",
        DataLoss => "DATA_LOSS",
        Unauthenticated => "UNAUTHENTICATED",
    }
}

/// A refusal the console lists: the caller was not let in, or asked for something it may not have.
fn is_refusal(code: tonic::Code) -> bool {
    matches!(
        code,
        tonic::Code::PermissionDenied
            | tonic::Code::Unauthenticated
            | tonic::Code::ResourceExhausted
            | tonic::Code::InvalidArgument
    )
}

fn now_unix_ms() -> i64 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map(|d| d.as_millis() as i64).unwrap_or(0)
}

/// One server's metrics.
pub struct Metrics {
    recorder: PrometheusRecorder,
    handle: PrometheusHandle,
    traffic: Mutex<HashMap<(&'static str, String, String), TrafficRow>>,
    refused: Mutex<VecDeque<RefusedRequest>>,
    requests: AtomicU64,
    errors: AtomicU64,
    refusals: AtomicU64,
    rate_limited: AtomicU64,
    recordings: AtomicU64,
    started: Instant,
    started_unix_ms: i64,
}

impl std::fmt::Debug for Metrics {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Metrics").field("requests", &self.requests.load(Ordering::Relaxed)).finish_non_exhaustive()
    }
}

impl Metrics {
    pub fn new() -> Arc<Metrics> {
        let recorder = PrometheusBuilder::new()
            .set_buckets(LATENCY_BUCKETS)
            .expect("latency buckets are not empty")
            .build_recorder();
        let handle = recorder.handle();
        Arc::new(Metrics {
            recorder,
            handle,
            traffic: Mutex::default(),
            refused: Mutex::default(),
            requests: AtomicU64::new(0),
            errors: AtomicU64::new(0),
            refusals: AtomicU64::new(0),
            rate_limited: AtomicU64::new(0),
            recordings: AtomicU64::new(0),
            started: Instant::now(),
            started_unix_ms: now_unix_ms(),
        })
    }

    pub fn started_unix_ms(&self) -> i64 {
        self.started_unix_ms
    }

    pub fn uptime(&self) -> Duration {
        self.started.elapsed()
    }

    /// A gRPC call served, counted by [`GrpcMetricsLayer`]. `elapsed` runs to the response headers: the
    /// whole call for a unary method, the time to open the stream for a streaming one.
    pub fn grpc_call(&self, service: &str, method: &str, peer: &str, code: tonic::Code, elapsed: Duration) {
        let code_label = code_name(code);
        metrics::with_local_recorder(&self.recorder, || {
            metrics::counter!("gx_requests_total", "service" => service.to_string(), "method" => method.to_string(),
                "peer_department" => peer.to_string(), "code" => code_label)
            .increment(1);
            metrics::histogram!("gx_request_duration_seconds", "service" => service.to_string(),
                "method" => method.to_string(), "peer_department" => peer.to_string())
            .record(elapsed.as_secs_f64());
        });
        self.requests.fetch_add(1, Ordering::Relaxed);
        if code != tonic::Code::Ok {
            self.errors.fetch_add(1, Ordering::Relaxed);
        }
        self.add_row("api", peer, &format!("{service}/{method}"), code_label, elapsed);
        self.upkeep_now_and_then();
    }

    fn upkeep_now_and_then(&self) {
        if self.recordings.fetch_add(1, Ordering::Relaxed) % UPKEEP_EVERY == UPKEEP_EVERY - 1 {
            self.handle.run_upkeep();
        }
    }

    /// A relayed record query, per peer department and resource.
    pub fn relay(&self, direction: Direction, peer: &str, resource: &str, code: tonic::Code, elapsed: Duration) {
        let code_label = code_name(code);
        metrics::with_local_recorder(&self.recorder, || {
            metrics::counter!("gx_relay_requests_total", "direction" => direction.as_str(),
                "peer_department" => peer.to_string(), "resource" => resource.to_string(), "code" => code_label)
            .increment(1);
            metrics::histogram!("gx_relay_duration_seconds", "direction" => direction.as_str(),
                "peer_department" => peer.to_string(), "resource" => resource.to_string())
            .record(elapsed.as_secs_f64());
        });
        if code == tonic::Code::ResourceExhausted && direction == Direction::Inbound {
            self.rate_limited(peer, resource);
        }
        self.add_row(direction.as_str(), peer, resource, code_label, elapsed);
        self.upkeep_now_and_then();
    }

    /// A consumer's request refused by this provider's quota.
    pub fn rate_limited(&self, peer: &str, resource: &str) {
        metrics::with_local_recorder(&self.recorder, || {
            metrics::counter!("gx_rate_limited_total", "peer_department" => peer.to_string(),
                "resource" => resource.to_string())
            .increment(1);
        });
        self.rate_limited.fetch_add(1, Ordering::Relaxed);
    }

    /// A caller of the admin port without valid credentials.
    pub fn admin_auth_failure(&self) {
        metrics::with_local_recorder(&self.recorder, || metrics::counter!("gx_admin_auth_failures_total").increment(1));
    }

    /// Adds a refusal to the list the console shows.
    pub fn refused(&self, request: RefusedRequest) {
        self.refusals.fetch_add(1, Ordering::Relaxed);
        let mut list = self.refused.lock().expect("refused list");
        if list.len() >= REFUSED_KEPT {
            list.pop_back();
        }
        list.push_front(request);
    }

    fn add_row(&self, direction: &'static str, peer: &str, resource: &str, code: &'static str, elapsed: Duration) {
        let mut table = self.traffic.lock().expect("traffic table");
        let mut key = (direction, peer.to_string(), resource.to_string());
        if !table.contains_key(&key) && table.len() >= TRAFFIC_ROWS_MAX {
            key = (direction, "(other)".to_string(), "(other)".to_string());
        }
        let row = table.entry(key).or_insert_with_key(|(d, p, r)| TrafficRow {
            direction: d.to_string(),
            peer: p.clone(),
            resource: r.clone(),
            ..TrafficRow::default()
        });
        let ms = elapsed.as_secs_f64() * 1000.0;
        row.requests += 1;
        if code != "OK" {
            row.errors += 1;
        }
        *row.by_code.entry(code.to_string()).or_default() += 1;
        row.latency_ms_sum += ms;
        row.latency_ms_max = row.latency_ms_max.max(ms);
        row.last_unix_ms = now_unix_ms();
    }

    pub fn traffic_report(&self) -> TrafficReport {
        let mut rows: Vec<TrafficRow> = self.traffic.lock().expect("traffic table").values().cloned().collect();
        rows.sort_by(|a, b| (&a.direction, &a.peer, &a.resource).cmp(&(&b.direction, &b.peer, &b.resource)));
        TrafficReport { at_unix_ms: now_unix_ms(), rows }
    }

    pub fn refused_report(&self) -> RefusedReport {
        RefusedReport { refused: self.refused.lock().expect("refused list").iter().cloned().collect() }
    }

    pub fn totals(&self) -> TrafficTotals {
        TrafficTotals {
            requests: self.requests.load(Ordering::Relaxed),
            errors: self.errors.load(Ordering::Relaxed),
            refused: self.refusals.load(Ordering::Relaxed),
            rate_limited: self.rate_limited.load(Ordering::Relaxed),
        }
    }

    /// The Prometheus exposition: the registry, then the gauges the server computed for this scrape.
    pub fn render(&self, gauges: &GaugeText) -> String {
        self.handle.run_upkeep();
        let mut text = self.handle.render();
        text.push_str(&gauges.text);
        text
    }
}

/// Gauges written straight in the exposition format, computed fresh at each scrape.
#[derive(Debug, Default)]
pub struct GaugeText {
    text: String,
    declared: std::collections::HashSet<&'static str>,
}

impl GaugeText {
    /// Adds one sample of gauge `name`; `help` is written with the first sample of each name. Label
    /// values are escaped as the format requires.
    pub fn gauge(&mut self, name: &'static str, help: &str, labels: &[(&str, &str)], value: f64) -> &mut Self {
        if self.declared.insert(name) {
            let _ = writeln!(self.text, "# HELP {name} {help}");
            let _ = writeln!(self.text, "# TYPE {name} gauge");
        }
        self.text.push_str(name);
        if !labels.is_empty() {
            self.text.push('{');
            for (i, (k, v)) in labels.iter().enumerate() {
                if i > 0 {
                    self.text.push(',');
                }
                let escaped = v.replace('\\', "\\\\").replace('"', "\\\"").replace('\n', "\\n");
                let _ = write!(self.text, "{k}=\"{escaped}\"");
            }
            self.text.push('}');
        }
        let _ = writeln!(self.text, " {value}");
        self
    }
}

/// Where the identity interceptor leaves the caller's department for [`GrpcMetricsLayer`], which runs
/// outside it and so cannot read the identity itself without parsing the certificate a second time.
#[derive(Clone, Debug, Default)]
pub struct PeerSlot(pub Arc<OnceLock<PeerLabel>>);

/// The caller as the metrics and the refused list name it.
#[derive(Clone, Debug)]
pub struct PeerLabel {
    pub department: String,
    /// `department/role/name`.
    pub full: String,
}

impl PeerSlot {
    fn department(&self) -> String {
        self.0.get().map(|p| p.department.clone()).unwrap_or_else(|| "unauthenticated".to_string())
    }
    fn full(&self) -> String {
        self.0.get().map(|p| p.full.clone()).unwrap_or_else(|| "unauthenticated".to_string())
    }
}

/// Counts every gRPC call by service, method, caller department and status; refused calls go to the
/// console's list. Put it outermost (`Server::builder().layer(...)`).
#[derive(Clone, Debug)]
pub struct GrpcMetricsLayer {
    metrics: Arc<Metrics>,
}

impl GrpcMetricsLayer {
    pub fn new(metrics: Arc<Metrics>) -> Self {
        GrpcMetricsLayer { metrics }
    }
}

impl<S> Layer<S> for GrpcMetricsLayer {
    type Service = GrpcMetricsService<S>;
    fn layer(&self, inner: S) -> Self::Service {
        GrpcMetricsService { inner, metrics: self.metrics.clone() }
    }
}

#[derive(Clone, Debug)]
pub struct GrpcMetricsService<S> {
    inner: S,
    metrics: Arc<Metrics>,
}

/// What is known of a call when its response starts; finished when its status is known.
struct CallRecord {
    metrics: Arc<Metrics>,
    service: String,
    method: String,
    peer: PeerSlot,
    elapsed: Duration,
}

impl CallRecord {
    fn finish(self, code: tonic::Code, message: Option<String>) {
        let peer = self.peer.department();
        self.metrics.grpc_call(&self.service, &self.method, &peer, code, self.elapsed);
        if is_refusal(code) {
            self.metrics.refused(RefusedRequest {
                at_unix_ms: now_unix_ms(),
                peer: self.peer.full(),
                method: format!("{}/{}", self.service, self.method),
                code: code_name(code).to_string(),
                message: message.unwrap_or_default(),
            });
        }
    }
}

fn split_path(path: &str) -> (String, String) {
    let path = path.trim_start_matches('/');
    let (service, method) = path.split_once('/').unwrap_or((path, ""));
    let service = service.rsplit('.').next().unwrap_or(service);
    (service.to_string(), method.to_string())
}

fn status_of(headers: &http::HeaderMap) -> Option<(tonic::Code, Option<String>)> {
    let code = headers.get("grpc-status")?.to_str().ok()?.parse::<i32>().ok()?;
    let message = headers.get("grpc-message").and_then(|m| m.to_str().ok()).map(percent_decode);
    Some((tonic::Code::from_i32(code), message))
}

/// grpc-message is percent-encoded UTF-8.
fn percent_decode(s: &str) -> String {
    let bytes = s.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        if bytes[i] == b'%' && i + 2 < bytes.len() {
            if let Some(b) = std::str::from_utf8(&bytes[i + 1..i + 3]).ok().and_then(|h| u8::from_str_radix(h, 16).ok()) {
                out.push(b);
                i += 3;
                continue;
            }
        }
        out.push(bytes[i]);
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}

impl<S, ReqBody, ResBody> Service<http::Request<ReqBody>> for GrpcMetricsService<S>
where
    S: Service<http::Request<ReqBody>, Response = http::Response<ResBody>> + Clone + Send + 'static,
    S::Future: Send + 'static,
    ReqBody: Send + 'static,
{
    type Response = http::Response<MetricsBody<ResBody>>;
    type Error = S::Error;
    type Future = Pin<Box<dyn std::future::Future<Output = Result<Self::Response, S::Error>> + Send>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, mut req: http::Request<ReqBody>) -> Self::Future {
        let (service, method) = split_path(req.uri().path());
        let peer = PeerSlot::default();
        req.extensions_mut().insert(peer.clone());
        let metrics = self.metrics.clone();
        let started = Instant::now();
        // The clone that was made ready is the one called (tower's rule for cloned services).
        let clone = self.inner.clone();
        let mut inner = std::mem::replace(&mut self.inner, clone);
        Box::pin(async move {
            let result = inner.call(req).await;
            let elapsed = started.elapsed();
            let record = CallRecord { metrics, service, method, peer, elapsed };
            match result {
                Ok(response) => {
                    // A trailers-only response (most errors) has its status in the headers.
                    let (parts, body) = response.into_parts();
                    let pending = match status_of(&parts.headers) {
                        Some((code, message)) => {
                            record.finish(code, message);
                            None
                        }
                        None => Some(record),
                    };
                    Ok(http::Response::from_parts(parts, MetricsBody { inner: body, pending }))
                }
                Err(e) => {
                    record.finish(tonic::Code::Unknown, None);
                    Err(e)
                }
            }
        })
    }
}

pin_project_lite::pin_project! {
    /// A response body that reads the status from the trailers when the call ends; a body dropped before
    /// its trailers (the client went away) counts as CANCELLED.
    pub struct MetricsBody<B> {
        #[pin]
        inner: B,
        pending: Option<CallRecord>,
    }

    impl<B> PinnedDrop for MetricsBody<B> {
        fn drop(this: Pin<&mut Self>) {
            if let Some(record) = this.project().pending.take() {
                record.finish(tonic::Code::Cancelled, None);
            }
        }
    }
}

impl<B: HttpBody> HttpBody for MetricsBody<B> {
    type Data = B::Data;
    type Error = B::Error;

    fn poll_frame(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Result<Frame<Self::Data>, Self::Error>>> {
        let this = self.project();
        let polled = this.inner.poll_frame(cx);
        match &polled {
            Poll::Ready(Some(Ok(frame))) => {
                if let Some(trailers) = frame.trailers_ref() {
                    if let Some(record) = this.pending.take() {
                        let (code, message) = status_of(trailers).unwrap_or((tonic::Code::Ok, None));
                        record.finish(code, message);
                    }
                }
            }
            Poll::Ready(Some(Err(_))) => {
                if let Some(record) = this.pending.take() {
                    record.finish(tonic::Code::Internal, None);
                }
            }
            Poll::Ready(None) => {
                if let Some(record) = this.pending.take() {
                    record.finish(tonic::Code::Ok, None);
                }
            }
            Poll::Pending => {}
        }
        polled
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn paths_split_into_service_and_method() {
        assert_eq!(split_path("/govexchange.v1.Relay/FetchRecords"), ("Relay".into(), "FetchRecords".into()));
        assert_eq!(split_path("/grpc.health.v1.Health/Check"), ("Health".into(), "Check".into()));
    }

    #[test]
    fn grpc_messages_are_percent_decoded() {
        assert_eq!(percent_decode("no%20grant%20for%20101001%2F000001"), "no grant for 101001/000001");
        assert_eq!(percent_decode("%E4%BC%81%E4%B8%9A"), "企业");
        assert_eq!(percent_decode("50%"), "50%");
    }

    #[test]
    fn gauges_escape_label_values_and_declare_once() {
        let mut g = GaugeText::default();
        g.gauge("gx_x", "x", &[("a", "q\"b")], 1.0).gauge("gx_x", "x", &[("a", "c")], 2.0);
        assert_eq!(g.text, "# HELP gx_x x\n# TYPE gx_x gauge\ngx_x{a=\"q\\\"b\"} 1\ngx_x{a=\"c\"} 2\n");
    }

    #[test]
    fn traffic_rows_accumulate_per_peer_and_resource() {
        let m = Metrics::new();
        m.relay(Direction::Inbound, "tax", "101001/000001", tonic::Code::Ok, Duration::from_millis(2));
        m.relay(Direction::Inbound, "tax", "101001/000001", tonic::Code::PermissionDenied, Duration::from_millis(4));
        m.relay(Direction::Inbound, "tax", "101001/000001", tonic::Code::ResourceExhausted, Duration::from_millis(1));
        let report = m.traffic_report();
        assert_eq!(report.rows.len(), 1);
        let row = &report.rows[0];
        assert_eq!((row.requests, row.errors), (3, 2));
        assert_eq!(row.by_code["PERMISSION_DENIED"], 1);
        assert_eq!(m.totals().rate_limited, 1);
        let text = m.render(&GaugeText::default());
        assert!(text.contains("gx_relay_requests_total{direction=\"inbound\",peer_department=\"tax\",resource=\"101001/000001\",code=\"OK\"} 1"), "{text}");
        assert!(text.contains("gx_rate_limited_total"), "{text}");
        assert!(text.contains("gx_relay_duration_seconds_bucket"), "{text}");
    }
}
