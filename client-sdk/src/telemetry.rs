//! Logs and traces of the server binaries: `tracing` to stderr (text or JSON, `log_format`) and, when the
//! `[telemetry]` table names a collector, the same spans exported over OTLP/gRPC; W3C trace context carried
//! in gRPC metadata from a consumer's node to the provider's, so one relayed request is one trace.
//!
//! Without `otlp_endpoint` no OpenTelemetry layer, exporter or propagator is installed: the context helpers
//! return at once.

use std::io::IsTerminal;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use opentelemetry::propagation::{Extractor, Injector, TextMapPropagator};
use opentelemetry::trace::TracerProvider as _;
use opentelemetry_otlp::WithExportConfig;
use opentelemetry_sdk::propagation::TraceContextPropagator;
use opentelemetry_sdk::trace::{Sampler, SdkTracerProvider};
use serde::Deserialize;
use tonic::metadata::{KeyRef, MetadataKey, MetadataMap, MetadataValue};
use tracing_opentelemetry::OpenTelemetrySpanExt;
use tracing_subscriber::filter::{LevelFilter, Targets};
use tracing_subscriber::layer::SubscriberExt;
use tracing_subscriber::util::SubscriberInitExt;
use tracing_subscriber::{EnvFilter, Layer};

use crate::process::LogFormat;

/// Longest `service_name` accepted; collectors index it, and a typo pasted twice is not a name.
const MAX_SERVICE_NAME_CHARS: usize = 128;
/// How long one export (and the flush at exit) may wait for the collector: a collector that is down must
/// not hold a node's shutdown for long.
const EXPORT_TIMEOUT: Duration = Duration::from_secs(5);

/// Set once an exporter is installed, so the per-call context helpers cost nothing otherwise.
static EXPORTING: AtomicBool = AtomicBool::new(false);

/// `[telemetry]` in a server's config. Absent, or without `otlp_endpoint`: nothing is exported.
#[derive(Clone, Debug, PartialEq, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct TelemetryConfig {
    /// The OTLP/gRPC collector, `http://host:port` (usually an agent on the same host, port 4317).
    pub otlp_endpoint: Option<String>,
    /// `service.name` of the exported spans; default `exchange-node-<department>` or `directory`.
    pub service_name: Option<String>,
    /// Share of traces exported when no caller decided (0.0 to 1.0). A provider follows the consumer's
    /// decision carried in the trace context, so a relayed request is exported whole or not at all.
    pub sample_ratio: f64,
}

impl Default for TelemetryConfig {
    fn default() -> Self {
        TelemetryConfig { otlp_endpoint: None, service_name: None, sample_ratio: 1.0 }
    }
}

impl TelemetryConfig {
    /// Whether spans are to be exported.
    pub fn enabled(&self) -> bool {
        self.otlp_endpoint.is_some()
    }

    /// Checks what serde cannot, so a bad table stops the server at start-up with the key named.
    pub fn validate(&self) -> Result<(), String> {
        if let Some(endpoint) = &self.otlp_endpoint {
            check_endpoint(endpoint)?;
        }
        if let Some(name) = &self.service_name {
            if name.trim().is_empty() || name.chars().count() > MAX_SERVICE_NAME_CHARS {
                return Err(format!(
                    "telemetry.service_name = {name:?}: must be 1 to {MAX_SERVICE_NAME_CHARS} characters"
                ));
            }
        }
        if !(0.0..=1.0).contains(&self.sample_ratio) {
            return Err(format!("telemetry.sample_ratio = {}: must be between 0.0 and 1.0", self.sample_ratio));
        }
        Ok(())
    }
}

fn check_endpoint(endpoint: &str) -> Result<(), String> {
    let expected = "expected http://host:port of an OTLP/gRPC collector, e.g. \"http://127.0.0.1:4317\"";
    let uri: http::Uri =
        endpoint.parse().map_err(|e| format!("telemetry.otlp_endpoint = {endpoint:?}: {e}; {expected}"))?;
    match uri.scheme_str() {
        Some("http") => {}
        // The exporter would need its own trust store for a collector's certificate; a collector agent
        // on the host (or a sidecar) takes plain OTLP on loopback and forwards it over TLS.
        Some("https") => {
            return Err(format!(
                "telemetry.otlp_endpoint = {endpoint:?}: https is not supported; run a collector agent on \
                 this host and point at it over http://127.0.0.1:4317"
            ))
        }
        _ => return Err(format!("telemetry.otlp_endpoint = {endpoint:?}: {expected}")),
    }
    let host_and_port = uri.authority().is_some_and(|a| !a.host().is_empty() && a.port_u16().is_some_and(|p| p != 0));
    if !host_and_port {
        return Err(format!("telemetry.otlp_endpoint = {endpoint:?}: needs a host and a port; {expected}"));
    }
    if !matches!(uri.path(), "" | "/") || uri.query().is_some() {
        return Err(format!(
            "telemetry.otlp_endpoint = {endpoint:?}: OTLP/gRPC takes no path (the service path is fixed); {expected}"
        ));
    }
    Ok(())
}

#[derive(Debug, thiserror::Error)]
pub enum TelemetryError {
    #[error("{0}")]
    Config(String),
    #[error("telemetry needs a Tokio runtime: call init_telemetry from inside #[tokio::main]")]
    NoRuntime,
    #[error("cannot set up the OTLP exporter for {endpoint}: {message}")]
    Exporter { endpoint: String, message: String },
    #[error("a tracing subscriber is already installed: {0}")]
    AlreadyInstalled(String),
}

/// Keeps the exporter alive; dropping it exports the spans still queued (waiting at most a few seconds for
/// the collector). Hold it in `main` until the server has stopped.
#[must_use = "dropping the guard shuts the exporter down"]
pub struct TelemetryGuard {
    provider: Option<SdkTracerProvider>,
}

impl TelemetryGuard {
    /// Whether spans are being exported.
    pub fn exporting(&self) -> bool {
        self.provider.is_some()
    }
}

impl Drop for TelemetryGuard {
    fn drop(&mut self) {
        if let Some(provider) = self.provider.take() {
            EXPORTING.store(false, Ordering::Relaxed);
            if let Err(e) = provider.shutdown_with_timeout(EXPORT_TIMEOUT) {
                // The subscriber may be gone by now: stderr is the one place left to say so.
                eprintln!("telemetry: spans still queued at exit may be lost: {e}");
            }
        }
    }
}

/// Installs the process's tracing subscriber: logs to stderr in `format`, filtered by `RUST_LOG` (default
/// `info`), and, if `config` names a collector, spans at INFO and above of this program exported as
/// `service_name` (else `default_service_name`). Must run inside a Tokio runtime when exporting: the gRPC
/// channel to the collector lives on it.
pub fn init_telemetry(
    format: LogFormat,
    config: &TelemetryConfig,
    default_service_name: &str,
) -> Result<TelemetryGuard, TelemetryError> {
    config.validate().map_err(TelemetryError::Config)?;
    let provider = match &config.otlp_endpoint {
        Some(endpoint) => {
            let name = config.service_name.as_deref().unwrap_or(default_service_name);
            Some(tracer_provider(endpoint, name, config.sample_ratio)?)
        }
        None => None,
    };
    let otel_layer = provider
        .as_ref()
        .map(|p| tracing_opentelemetry::layer().with_tracer(p.tracer("gov-exchange")).with_filter(exported_spans()));
    let log_filter = EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("info"));
    let ansi = std::io::stderr().is_terminal();
    let log_layer = match format {
        LogFormat::Text => tracing_subscriber::fmt::layer().with_writer(std::io::stderr).with_ansi(ansi).boxed(),
        LogFormat::Json => {
            tracing_subscriber::fmt::layer().json().with_writer(std::io::stderr).with_ansi(false).boxed()
        }
    };
    tracing_subscriber::registry()
        .with(otel_layer)
        .with(log_layer.with_filter(log_filter))
        .try_init()
        .map_err(|e| TelemetryError::AlreadyInstalled(e.to_string()))?;
    if provider.is_some() {
        opentelemetry::global::set_text_map_propagator(TraceContextPropagator::new());
        EXPORTING.store(true, Ordering::Relaxed);
        tracing::info!(endpoint = config.otlp_endpoint.as_deref().unwrap_or_default(), "exporting traces over OTLP");
    }
    Ok(TelemetryGuard { provider })
}

fn tracer_provider(endpoint: &str, service_name: &str, sample_ratio: f64) -> Result<SdkTracerProvider, TelemetryError> {
    if tokio::runtime::Handle::try_current().is_err() {
        return Err(TelemetryError::NoRuntime);
    }
    let exporter = opentelemetry_otlp::SpanExporter::builder()
        .with_tonic()
        .with_endpoint(endpoint)
        .with_timeout(EXPORT_TIMEOUT)
        .build()
        .map_err(|e| TelemetryError::Exporter { endpoint: endpoint.to_string(), message: e.to_string() })?;
    let resource = opentelemetry_sdk::Resource::builder().with_service_name(service_name.to_string()).build();
    Ok(SdkTracerProvider::builder()
        .with_batch_exporter(exporter)
        .with_sampler(Sampler::ParentBased(Box::new(Sampler::TraceIdRatioBased(sample_ratio))))
        .with_resource(resource)
        .build())
}

/// What becomes an OpenTelemetry span: this program's INFO spans (such as `relay`), independent of
/// `RUST_LOG`. The gRPC stack is left out, above all because the exporter's own calls to the collector
/// would otherwise be traced and exported in turn.
fn exported_spans() -> Targets {
    Targets::new()
        .with_default(LevelFilter::INFO)
        .with_target("h2", LevelFilter::OFF)
        .with_target("hyper", LevelFilter::OFF)
        .with_target("hyper_util", LevelFilter::OFF)
        .with_target("tonic", LevelFilter::OFF)
        .with_target("tower", LevelFilter::OFF)
        .with_target("opentelemetry", LevelFilter::OFF)
        .with_target("opentelemetry_sdk", LevelFilter::OFF)
        .with_target("opentelemetry_otlp", LevelFilter::OFF)
}

struct MetadataInjector<'a>(&'a mut MetadataMap);

impl Injector for MetadataInjector<'_> {
    fn set(&mut self, key: &str, value: String) {
        if let (Ok(key), Ok(value)) = (MetadataKey::from_bytes(key.as_bytes()), MetadataValue::try_from(value)) {
            self.0.insert(key, value);
        }
    }
}

struct MetadataExtractor<'a>(&'a MetadataMap);

impl Extractor for MetadataExtractor<'_> {
    fn get(&self, key: &str) -> Option<&str> {
        self.0.get(key).and_then(|v| v.to_str().ok())
    }

    fn keys(&self) -> Vec<&str> {
        self.0
            .keys()
            .filter_map(|k| match k {
                KeyRef::Ascii(k) => Some(k.as_str()),
                KeyRef::Binary(_) => None,
            })
            .collect()
    }
}

/// Puts `span`'s trace context (W3C `traceparent`) into an outgoing call's metadata, so the callee's spans
/// join the same trace. Nothing when not exporting.
pub fn inject_trace_context(span: &tracing::Span, metadata: &mut MetadataMap) {
    if !EXPORTING.load(Ordering::Relaxed) {
        return;
    }
    TraceContextPropagator::new().inject_context(&span.context(), &mut MetadataInjector(metadata));
}

/// Makes `span` a child of the trace context an incoming call carries, if any. Call before the span is
/// first entered. Nothing when not exporting, or when the caller sent no (or a malformed) context.
pub fn set_remote_parent(span: &tracing::Span, metadata: &MetadataMap) {
    if !EXPORTING.load(Ordering::Relaxed) {
        return;
    }
    let parent = TraceContextPropagator::new().extract(&MetadataExtractor(metadata));
    if opentelemetry::trace::TraceContextExt::span(&parent).span_context().is_valid() {
        let _ = span.set_parent(parent);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn with_endpoint(endpoint: &str) -> TelemetryConfig {
        TelemetryConfig { otlp_endpoint: Some(endpoint.to_string()), ..Default::default() }
    }

    #[test]
    fn absent_table_exports_nothing_and_samples_everything_when_on() {
        let c: TelemetryConfig = toml::from_str("").unwrap();
        assert!(!c.enabled());
        assert_eq!(c.sample_ratio, 1.0);
        c.validate().unwrap();
        let on: TelemetryConfig = toml::from_str("otlp_endpoint = \"http://127.0.0.1:4317\"").unwrap();
        assert!(on.enabled());
        on.validate().unwrap();
    }

    #[test]
    fn bad_endpoints_are_refused_with_the_key_named() {
        for (endpoint, says) in [
            ("127.0.0.1:4317", "expected http://host:port"),
            ("localhost", "expected http://host:port"),
            ("grpc://collector:4317", "expected http://host:port"),
            ("https://collector:4317", "https is not supported"),
            ("http://collector", "needs a host and a port"),
            ("http://collector:0", "needs a host and a port"),
            ("http://collector:4317/v1/traces", "takes no path"),
            ("http://col lector:4317", "telemetry.otlp_endpoint"),
            ("", "telemetry.otlp_endpoint"),
        ] {
            let err = with_endpoint(endpoint).validate().unwrap_err();
            assert!(err.contains("telemetry.otlp_endpoint") && err.contains(says), "{endpoint:?}: {err}");
        }
        with_endpoint("http://otel-agent.internal:4317/").validate().unwrap();
    }

    #[test]
    fn ratio_and_name_are_checked() {
        let c = TelemetryConfig { sample_ratio: 1.5, ..Default::default() };
        assert!(c.validate().unwrap_err().contains("telemetry.sample_ratio"));
        let c = TelemetryConfig { sample_ratio: f64::NAN, ..Default::default() };
        assert!(c.validate().is_err());
        let c = TelemetryConfig { service_name: Some(" ".into()), ..Default::default() };
        assert!(c.validate().unwrap_err().contains("telemetry.service_name"));
        assert!(toml::from_str::<TelemetryConfig>("endpoint = \"http://x:1\"").is_err(), "unknown keys are refused");
    }

    #[test]
    fn context_helpers_do_nothing_when_not_exporting() {
        let mut metadata = MetadataMap::new();
        inject_trace_context(&tracing::Span::none(), &mut metadata);
        assert!(metadata.is_empty());
        set_remote_parent(&tracing::Span::none(), &metadata);
    }

    #[test]
    fn trace_context_round_trips_through_grpc_metadata() {
        let traceparent = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01";
        let mut incoming = MetadataMap::new();
        incoming.insert("traceparent", traceparent.parse().unwrap());
        let cx = TraceContextPropagator::new().extract(&MetadataExtractor(&incoming));
        let mut outgoing = MetadataMap::new();
        TraceContextPropagator::new().inject_context(&cx, &mut MetadataInjector(&mut outgoing));
        assert_eq!(outgoing.get("traceparent").unwrap().to_str().unwrap(), traceparent);
    }
}
