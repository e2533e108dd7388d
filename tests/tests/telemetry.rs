//! Logs and traces end to end: the real `directory` and three `exchange-node` binaries with
//! `log_format = "json"` and `[telemetry]` pointing at an OTLP/gRPC collector served by this test. A relayed
//! query must show up as one trace: a `relay` span from the consumer's node and one from the provider's,
//! both with the request's message id, the provider's a child of the consumer's (W3C trace context); and
//! both nodes' JSON logs must carry the same message id. A query by citizen identity number must leave the
//! number in no log line and no exported span.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use e2e_tests::procs::{bin_path, free_port, wait_for, Proc};
use opentelemetry_proto::tonic::collector::trace::v1::trace_service_server::{TraceService, TraceServiceServer};
use opentelemetry_proto::tonic::collector::trace::v1::{ExportTraceServiceRequest, ExportTraceServiceResponse};
use opentelemetry_proto::tonic::common::v1::any_value::Value as AnyValue;
use opentelemetry_proto::tonic::common::v1::KeyValue;
use serde_json::Value;

const REGISTRATION: &str = "101001/000001"; // commerce's enterprise registration, unconditional
const COMPANY: &str = "91350100M000100Y43";
const POPULATION: &str = "102001/000001"; // police's population register, conditional: tax has no grant
const IDENTITY_NUMBER: &str = "11010519491231002X";
const NODE_LOG_FILTER: &str = "info,exchange_node=debug";

/// One exported span, flattened: which service sent it and its string attributes.
#[derive(Clone, Debug)]
struct ReceivedSpan {
    service: String,
    name: String,
    trace_id: Vec<u8>,
    span_id: Vec<u8>,
    parent_span_id: Vec<u8>,
    attributes: BTreeMap<String, String>,
}

/// What a real collector would receive: every export request, kept whole (for the identity-number check)
/// and flattened into spans.
#[derive(Clone, Default)]
struct Collector {
    requests: Arc<Mutex<Vec<ExportTraceServiceRequest>>>,
}

#[tonic::async_trait]
impl TraceService for Collector {
    async fn export(
        &self,
        request: tonic::Request<ExportTraceServiceRequest>,
    ) -> Result<tonic::Response<ExportTraceServiceResponse>, tonic::Status> {
        self.requests.lock().unwrap().push(request.into_inner());
        Ok(tonic::Response::new(ExportTraceServiceResponse { partial_success: None }))
    }
}

fn text_of(kv: &KeyValue) -> String {
    match kv.value.as_ref().and_then(|v| v.value.as_ref()) {
        Some(AnyValue::StringValue(s)) => s.clone(),
        Some(AnyValue::IntValue(i)) => i.to_string(),
        Some(AnyValue::BoolValue(b)) => b.to_string(),
        Some(AnyValue::DoubleValue(d)) => d.to_string(),
        other => format!("{other:?}"),
    }
}

impl Collector {
    fn spans(&self) -> Vec<ReceivedSpan> {
        let mut out = Vec::new();
        for request in self.requests.lock().unwrap().iter() {
            for rs in &request.resource_spans {
                let service = rs
                    .resource
                    .as_ref()
                    .and_then(|r| r.attributes.iter().find(|kv| kv.key == "service.name"))
                    .map(text_of)
                    .unwrap_or_default();
                for span in rs.scope_spans.iter().flat_map(|ss| &ss.spans) {
                    out.push(ReceivedSpan {
                        service: service.clone(),
                        name: span.name.clone(),
                        trace_id: span.trace_id.clone(),
                        span_id: span.span_id.clone(),
                        parent_span_id: span.parent_span_id.clone(),
                        attributes: span.attributes.iter().map(|kv| (kv.key.clone(), text_of(kv))).collect(),
                    });
                }
            }
        }
        out
    }

    /// The `relay` spans of the request with `message_id`, by service.
    fn relay_spans(&self, message_id: &str) -> BTreeMap<String, ReceivedSpan> {
        self.spans()
            .into_iter()
            .filter(|s| s.name == "relay" && s.attributes.get("message_id").map(String::as_str) == Some(message_id))
            .map(|s| (s.service.clone(), s))
            .collect()
    }

    /// Everything received, as text: the identity-number check looks at attributes, events and resources.
    fn dump(&self) -> String {
        format!("{:?}", self.requests.lock().unwrap())
    }
}

struct Site {
    home: tempfile::TempDir,
    directory_port: u16,
    collector: String,
}

impl Site {
    fn path(&self, rel: &str) -> PathBuf {
        self.home.path().join(rel)
    }

    fn directory_addr(&self) -> String {
        format!("127.0.0.1:{}", self.directory_port)
    }

    /// `exchangectl` as certificate `identity`: (success, stdout, stderr).
    fn ctl(&self, identity: &str, args: &[&str]) -> (bool, String, String) {
        let pki = self.path("pki").display().to_string();
        let dir = self.directory_addr();
        let mut all = vec!["--pki-dir", pki.as_str(), "--identity", identity, "--directory", dir.as_str()];
        all.extend_from_slice(args);
        let out = e2e_tests::procs::exchangectl(&all);
        (
            out.status.success(),
            String::from_utf8_lossy(&out.stdout).into_owned(),
            String::from_utf8_lossy(&out.stderr).into_owned(),
        )
    }

    fn pki(&self, args: &[&str]) {
        let out = e2e_tests::procs::exchangectl(args);
        assert!(out.status.success(), "exchangectl {args:?}: {}", String::from_utf8_lossy(&out.stderr));
    }

    fn issue(&self, dept: &str, role: &str, name: &str) {
        let pki = self.path("pki").display().to_string();
        self.pki(&["pki", "issue", "--dir", &pki, "--dept", dept, "--role", role, "--name", name]);
    }

    fn telemetry_table(&self) -> String {
        format!("\n[telemetry]\notlp_endpoint = \"{}\"\n", self.collector)
    }

    fn tls_table(&self, name: &str) -> String {
        let pki = self.path("pki");
        format!(
            "\n[tls]\nca = \"{}\"\ncert = \"{}\"\nkey = \"{}\"\n",
            pki.join("ca.crt").display(),
            pki.join(format!("{name}.crt")).display(),
            pki.join(format!("{name}.key")).display()
        )
    }

    /// Starts `bin` with `config` and `RUST_LOG=rust_log`; output to `logs/<name>.log`.
    fn start(&self, name: &str, bin: &str, config: &Path, rust_log: &str) -> Proc {
        let log = self.path(&format!("logs/{name}.log"));
        let out = std::fs::File::create(&log).unwrap();
        let err = out.try_clone().unwrap();
        let child = Command::new(bin_path(bin))
            .args(["--config", config.to_str().unwrap()])
            .env("RUST_LOG", rust_log)
            .stdin(Stdio::null())
            .stdout(out)
            .stderr(err)
            .spawn()
            .unwrap_or_else(|e| panic!("start {bin}: {e}"));
        Proc { name: name.to_string(), child: Some(child), log }
    }

    fn start_directory(&self) -> Proc {
        let config = self.path("config/directory.toml");
        std::fs::write(
            &config,
            format!(
                "listen = \"{}\"\ndata_dir = \"{}\"\nlog_format = \"json\"\n{}{}",
                self.directory_addr(),
                self.path("data/directory").display(),
                self.tls_table("directory"),
                self.telemetry_table()
            ),
        )
        .unwrap();
        let proc = self.start("directory", "directory", &config, "info");
        wait_for("the directory to answer", Duration::from_secs(30), || {
            self.ctl("central-operator", &["whoami"]).0.then_some(())
        });
        proc
    }

    fn start_node(&self, dept: &str, port: u16) -> Proc {
        let config = self.path(&format!("config/{dept}-node.toml"));
        let catalog = Path::new(env!("CARGO_MANIFEST_DIR")).join(format!("../deploy/local/catalog/{dept}.toml"));
        std::fs::write(
            &config,
            format!(
                "listen = \"127.0.0.1:{port}\"\nadvertise_address = \"127.0.0.1:{port}\"\ndirectory_address = \"{}\"\n\
                 data_dir = \"{}\"\ncatalog_file = \"{}\"\nlog_format = \"json\"\n{}{}",
                self.directory_addr(),
                self.path(&format!("data/{dept}-node")).display(),
                catalog.display(),
                self.tls_table(&format!("{dept}-node")),
                self.telemetry_table()
            ),
        )
        .unwrap();
        self.start(&format!("{dept}-node"), "exchange-node", &config, NODE_LOG_FILTER)
    }

    fn online(&self, dept: &str) -> bool {
        let (ok, out, _) = self.ctl("central-operator", &["--json", "nodes"]);
        let Ok(nodes) = serde_json::from_str::<Value>(&out) else { return false };
        ok && nodes["nodes"]
            .as_array()
            .is_some_and(|a| a.iter().any(|n| n["department"] == dept && n["status"] == "online"))
    }
}

/// The JSON log lines of `log` that carry `message_id`, as a field of the line or of its span.
fn log_lines_with(log: &str, message_id: &str) -> Vec<Value> {
    log.lines()
        .filter_map(|l| serde_json::from_str::<Value>(l).ok())
        .filter(|l| l["fields"]["message_id"] == message_id || l["span"]["message_id"] == message_id)
        .collect()
}

#[test]
fn a_relayed_request_is_one_trace_across_two_departments_and_one_message_id_in_both_logs() {
    let runtime = tokio::runtime::Builder::new_multi_thread().worker_threads(1).enable_all().build().unwrap();
    let collector = Collector::default();
    let listener = runtime.block_on(tokio::net::TcpListener::bind("127.0.0.1:0")).unwrap();
    let collector_addr: SocketAddr = listener.local_addr().unwrap();
    // Plain OTLP on loopback, as a collector agent on the host takes it.
    runtime.spawn(
        tonic::transport::Server::builder()
            .add_service(TraceServiceServer::new(collector.clone()))
            .serve_with_incoming(tokio_stream::wrappers::TcpListenerStream::new(listener)),
    );

    let site = Site {
        home: tempfile::tempdir().unwrap(),
        directory_port: free_port(),
        collector: format!("http://{collector_addr}"),
    };
    for d in ["pki", "config", "data", "logs"] {
        std::fs::create_dir_all(site.path(d)).unwrap();
    }
    let pki = site.path("pki").display().to_string();
    site.pki(&["pki", "init", "--dir", &pki]);
    site.issue("central", "directory", "directory");
    site.issue("central", "operator", "central-operator");
    for dept in ["commerce", "tax", "police"] {
        site.issue(dept, "node", &format!("{dept}-node"));
        site.issue(dept, "app", &format!("{dept}-app"));
    }

    let mut directory = site.start_directory();
    let ports: BTreeMap<&str, u16> = ["commerce", "tax", "police"].into_iter().map(|d| (d, free_port())).collect();
    let mut nodes: BTreeMap<&str, Proc> = ports.iter().map(|(d, p)| (*d, site.start_node(d, *p))).collect();
    for dept in ports.keys() {
        wait_for(&format!("{dept} online"), Duration::from_secs(30), || site.online(dept).then_some(()));
    }
    let at = |identity: &str, dept: &str, args: &[&str]| {
        let node = format!("127.0.0.1:{}", ports[dept]);
        site.ctl(identity, &[&["--node", node.as_str()], args].concat())
    };

    // Commerce loads its registrations (its catalog may still be on its way to the directory: retry).
    let records = Path::new(env!("CARGO_MANIFEST_DIR")).join("../deploy/local/records/commerce-enterprises.json");
    wait_for("commerce's records stored", Duration::from_secs(30), || {
        at(
            "commerce-app",
            "commerce",
            &["records", "put", "--resource", REGISTRATION, "--file", records.to_str().unwrap()],
        )
        .0
        .then_some(())
    });

    // Tax reads one registration through its node; the answer names the request's message id.
    let (ok, out, err) = at(
        "tax-app",
        "tax",
        &["--json", "records", "get", "--resource", REGISTRATION, COMPANY, "--purpose", "登记信息核对"],
    );
    assert!(ok, "{out}{err}");
    let answer: Value = serde_json::from_str(&out).unwrap();
    let message_id = answer["message_id"]
        .as_str()
        .filter(|m| !m.is_empty())
        .unwrap_or_else(|| panic!("no message id: {answer}"))
        .to_string();

    // (a) Both nodes exported a `relay` span with that id, in one trace, the provider's under the consumer's.
    let spans = wait_for("both relay spans at the collector", Duration::from_secs(30), || {
        let spans = collector.relay_spans(&message_id);
        (spans.contains_key("exchange-node-tax") && spans.contains_key("exchange-node-commerce")).then_some(spans)
    });
    let (consumer, provider) = (&spans["exchange-node-tax"], &spans["exchange-node-commerce"]);
    assert_eq!(consumer.attributes.get("side").map(String::as_str), Some("consumer"), "{consumer:?}");
    assert_eq!(provider.attributes.get("side").map(String::as_str), Some("provider"), "{provider:?}");
    assert_eq!(provider.attributes.get("consumer").map(String::as_str), Some("tax"), "{provider:?}");
    assert_eq!(provider.attributes.get("resource").map(String::as_str), Some(REGISTRATION), "{provider:?}");
    assert_eq!(provider.trace_id, consumer.trace_id, "one trace across the two departments");
    assert_eq!(provider.parent_span_id, consumer.span_id, "the provider's span is a child of the consumer's");
    assert!(!collector.dump().contains(COMPANY), "record keys are not span attributes");

    // (b) Both nodes' JSON logs have a line of this request, found by its message id alone.
    for (proc, what) in [(&nodes["tax"], "relayed request answered"), (&nodes["commerce"], "relayed request served")] {
        let lines = log_lines_with(&proc.log_text(), &message_id);
        assert!(
            lines.iter().any(|l| l["fields"]["message"] == what),
            "{}: no {what:?} line with message id {message_id}:\n{}",
            proc.name,
            proc.log_text()
        );
    }

    // A refused query by identity number: tax has no grant to police's population register (police's
    // catalog may still be on its way: retry until police itself refuses).
    let refusal = wait_for("police to refuse tax", Duration::from_secs(30), || {
        let (ok, out, err) =
            at("tax-app", "tax", &["--json", "records", "get", "--resource", POPULATION, IDENTITY_NUMBER]);
        let text = format!("{out}{err}");
        (!ok && text.contains("has no grant")).then_some(text)
    });
    let refused_span = wait_for("the refused request's provider span", Duration::from_secs(30), || {
        collector.spans().into_iter().find(|s| {
            s.service == "exchange-node-police"
                && s.name == "relay"
                && s.attributes.get("consumer").map(String::as_str) == Some("tax")
        })
    });
    let refused_id = refused_span.attributes["message_id"].clone();
    // The consumer's span ends after the provider's answer, so it may come in a later batch.
    wait_for("the refused request's consumer span", Duration::from_secs(30), || {
        collector.relay_spans(&refused_id).contains_key("exchange-node-tax").then_some(())
    });
    for proc in [&nodes["police"], &nodes["tax"]] {
        let lines = log_lines_with(&proc.log_text(), &refused_id);
        assert!(
            lines.iter().any(|l| l["fields"]["message"] == "relay request refused"),
            "{}: no refusal line with message id {refused_id} (client saw: {refusal}):\n{}",
            proc.name,
            proc.log_text()
        );
    }

    // Graceful stops flush what is still queued; then nothing anywhere holds the identity number.
    for node in nodes.values_mut() {
        assert!(node.stop(), "{} stops cleanly", node.name);
    }
    assert!(directory.stop(), "the directory stops cleanly");
    assert!(!collector.dump().contains(IDENTITY_NUMBER), "an identity number reached the collector");
    for proc in nodes.values().chain([&directory]) {
        let log = proc.log_text();
        assert!(!log.contains(IDENTITY_NUMBER), "{} logged an identity number:\n{log}", proc.name);
        assert!(
            log.lines().all(|l| serde_json::from_str::<Value>(l).is_ok()),
            "{}: log_format = \"json\" writes one JSON object per line:\n{log}",
            proc.name
        );
        assert!(log.contains("exporting traces over OTLP"), "{}: telemetry was not switched on:\n{log}", proc.name);
    }
}

/// A `[telemetry]` table the exporter could not use stops either server at start-up, naming the key.
#[test]
fn a_bad_collector_endpoint_stops_both_servers_at_start_with_the_key_named() {
    let home = tempfile::tempdir().unwrap();
    let tls = "[tls]\nca = \"ca.crt\"\ncert = \"x.crt\"\nkey = \"x.key\"\n";
    let telemetry = "[telemetry]\notlp_endpoint = \"collector.internal:4317\"\n";
    let node = home.path().join("node.toml");
    std::fs::write(
        &node,
        format!("listen = \"127.0.0.1:0\"\nadvertise_address = \"127.0.0.1:7401\"\ndirectory_address = \"127.0.0.1:7400\"\ndata_dir = \"data\"\n{tls}{telemetry}"),
    )
    .unwrap();
    let directory = home.path().join("directory.toml");
    std::fs::write(&directory, format!("listen = \"127.0.0.1:0\"\ndata_dir = \"data\"\n{tls}{telemetry}")).unwrap();
    for (bin, config) in [("exchange-node", &node), ("directory", &directory)] {
        let out = Command::new(bin_path(bin))
            .args(["--config", config.to_str().unwrap()])
            .stdin(Stdio::null())
            .output()
            .unwrap();
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(!out.status.success(), "{bin} started with a bad endpoint: {stderr}");
        assert!(
            stderr.contains("telemetry.otlp_endpoint")
                && stderr.contains("collector.internal:4317")
                && stderr.contains("http://host:port"),
            "{bin}: {stderr}"
        );
    }
}
