//! `exchangectl`, the operator CLI, as a library so its parsing and output are unit-tested; the binary
//! (`src/bin/exchangectl.rs`) only parses, runs [`run`] and reports the error.
//!
//! # Layout
//! - [`args`]: the clap definitions (commands, flags, environment variables).
//! - [`output`]: JSON views and the human text made from them.
//! - [`table`]: aligned columns that measure CJK text by display width.
//! - `pki_cmd`, `catalog_cmd`, `nodes_cmd`, `records_cmd`, `events_cmd`, `grants_cmd`, `audit_cmd`: the
//!   commands; `ops_cmd`: status, top, peers, outbox and admin switches over the admin port; `backup_cmd`: backup and restore; `sync_file`: the resumable JSON-lines file of `records sync`.

pub mod args;
mod audit_cmd;
mod backup_cmd;
mod catalog_cmd;
mod events_cmd;
mod grants_cmd;
mod nodes_cmd;
mod ops_cmd;
mod records_cmd;
pub mod output;
mod pki_cmd;
pub mod sync_file;
pub mod table;

use std::path::PathBuf;
use std::time::Duration;

use exchange_proto::v1::directory_client::DirectoryClient;
use exchange_proto::v1::exchange_node_client::ExchangeNodeClient;
use serde::Serialize;
use tonic::transport::Channel;

pub use args::Cli;
use args::{CatalogCommand, Command, GlobalOpts};
use output::Printer;

use crate::catalog::CatalogError;
use crate::client::{self, BatchPublishError, DirectoryChannel};
use crate::error::{ClientError, FieldViolation};
use crate::pki::PkiError;
use crate::records::ExchangeClient;
use crate::tls::{TlsIdentity, TlsPaths};

/// Why a command failed. Every variant's text is complete on its own: the binary prints it as is.
#[derive(Debug, thiserror::Error)]
pub enum CliError {
    /// A server refused the call, or could not be reached.
    #[error("{0}")]
    Client(#[from] ClientError),
    /// A publish batch was refused; `entry_codes` names the entries the violations point at.
    #[error("{}", publish_error_text(.error, .entry_codes))]
    Publish { error: BatchPublishError, entry_codes: Vec<String> },
    #[error("{0}")]
    Pki(#[from] PkiError),
    #[error("{0}")]
    Catalog(#[from] CatalogError),
    #[error("{path}: {reason}")]
    File { path: PathBuf, reason: String },
    /// The admin port refused the request or could not be reached.
    #[error("{0}")]
    Admin(#[from] crate::admin::client::AdminClientError),
    /// The command line is usable by clap but not by us (missing certificate options, bad filter word).
    #[error("{0}")]
    Usage(String),
    /// `audit verify` found the trail tampered with; the command has printed the verification already.
    #[error("the audit trail is NOT intact: {problem} (first entry concerned: seq {seq})")]
    AuditTampered { problem: String, seq: u64 },
    /// Ctrl-C stopped a long command; the message says how to continue.
    #[error("{0}")]
    Interrupted(String),
    /// `admin ready` found the server not ready; the command has printed the readiness already.
    #[error("the server is not ready: {0}")]
    NotReady(String),
}

fn publish_error_text(error: &BatchPublishError, codes: &[String]) -> String {
    let mut text = match &error.error {
        ClientError::InvalidArgument { message, violations } => ClientError::InvalidArgument {
            message: message.clone(),
            violations: violations
                .iter()
                .map(|v| FieldViolation { field: annotate_field(&v.field, codes), description: v.description.clone() })
                .collect(),
        }
        .to_string(),
        other => other.to_string(),
    };
    if error.accepted > 0 {
        text.push_str(&format!(
            "\n  (the first {} entries were accepted before this batch was refused)",
            error.accepted
        ));
    }
    text
}

/// Adds the resource code to a violation that points at an entry (`entries[3].name` →
/// `entries[3] (101001/000004).name`), so the operator can find the entry in the file.
fn annotate_field(field: &str, codes: &[String]) -> String {
    annotate_indexed(field, "entries", codes)
}

/// Adds `labels[i]` after `list[i]` at the start of a violation's field (`records[3].items[住所]` →
/// `records[3] (91350100M000100Y43).items[住所]`).
pub(crate) fn annotate_indexed(field: &str, list: &str, labels: &[String]) -> String {
    let index = field
        .strip_prefix(list)
        .and_then(|rest| rest.strip_prefix('['))
        .and_then(|rest| rest.split_once(']'))
        .and_then(|(n, _)| n.parse::<usize>().ok());
    match (index.and_then(|i| labels.get(i)), field.split_once(']')) {
        (Some(label), Some((head, tail))) if !label.is_empty() => format!("{head}] ({label}){tail}"),
        _ => field.to_string(),
    }
}

impl CliError {
    /// Process exit status: 2 for usage errors (as clap), 3 when a server could not be reached (worth a
    /// retry), 1 for everything else.
    pub fn exit_code(&self) -> u8 {
        match self {
            CliError::Usage(_) => 2,
            CliError::AuditTampered { .. } => 1,
            CliError::Interrupted(_) => EXIT_INTERRUPTED,
            CliError::Client(e) if e.code() == tonic::Code::Unavailable => EXIT_UNREACHABLE,
            CliError::Publish { error, .. } if error.error.code() == tonic::Code::Unavailable => EXIT_UNREACHABLE,
            CliError::Admin(crate::admin::client::AdminClientError::Connect { .. }) => EXIT_UNREACHABLE,
            _ => 1,
        }
    }

    /// The `--json` form of the error, printed to stdout so a script always reads one JSON document.
    pub fn to_json(&self) -> serde_json::Value {
        #[derive(Serialize)]
        struct Violation<'a> {
            field: &'a str,
            description: &'a str,
        }
        let (kind, violations, accepted) = match self {
            CliError::Client(e) => (format!("{:?}", e.code()), violations_of(e), None),
            CliError::Publish { error, entry_codes } => {
                let violations =
                    violations_of(&error.error).into_iter().map(|(f, d)| (annotate_field(&f, entry_codes), d)).collect();
                (format!("{:?}", error.error.code()), violations, Some(error.accepted))
            }
            CliError::Pki(_) => ("Pki".into(), vec![], None),
            CliError::Catalog(_) => ("CatalogFile".into(), vec![], None),
            CliError::File { .. } => ("File".into(), vec![], None),
            CliError::Usage(_) => ("Usage".into(), vec![], None),
            CliError::AuditTampered { .. } => ("AuditTampered".into(), vec![], None),
            CliError::Interrupted(_) => ("Interrupted".into(), vec![], None),
            CliError::NotReady(_) => ("NotReady".into(), vec![], None),
            CliError::Admin(_) => ("Admin".into(), vec![], None),
        };
        let violations: Vec<Violation> =
            violations.iter().map(|(f, d)| Violation { field: f, description: d }).collect();
        let mut error = serde_json::json!({ "code": kind, "message": self.to_string() });
        if let CliError::Client(ClientError::ResourceExhausted { retry_after: Some(d), .. }) = self {
            error["retry_after_ms"] = (d.as_millis() as u64).into();
        }
        if !violations.is_empty() {
            error["violations"] = serde_json::to_value(violations).expect("serializes");
        }
        if let Some(accepted) = accepted {
            error["accepted_entries"] = accepted.into();
        }
        serde_json::json!({ "error": error })
    }
}

fn violations_of(e: &ClientError) -> Vec<(String, String)> {
    match e {
        ClientError::InvalidArgument { violations, .. } => {
            violations.iter().map(|v| (v.field.clone(), v.description.clone())).collect()
        }
        _ => vec![],
    }
}

/// What every command has at hand: the global options and the printer.
pub(crate) struct Ctx {
    pub global: GlobalOpts,
    pub out: Printer,
}

impl Ctx {
    /// The certificate files to use, from --ca/--cert/--key or --pki-dir + --identity.
    pub fn tls_paths(&self) -> Result<TlsPaths, CliError> {
        resolve_tls_paths(&self.global)
    }

    pub fn identity(&self) -> Result<TlsIdentity, CliError> {
        TlsIdentity::load(&self.tls_paths()?).map_err(|e| CliError::Client(e.into()))
    }

    pub fn directory(&self) -> Result<DirectoryClient<DirectoryChannel>, CliError> {
        client::directory_client(&self.global.directory, &self.identity()?).map_err(|e| CliError::Client(e.into()))
    }

    pub fn node(&self, addr: &str) -> Result<ExchangeNodeClient<Channel>, CliError> {
        client::node_client(addr, &self.identity()?).map_err(|e| CliError::Client(e.into()))
    }

    /// The SDK client: `--node` for records and audit, `--directory` for grants, `--timeout` per call.
    pub fn exchange(&self) -> Result<ExchangeClient, CliError> {
        let client = ExchangeClient::connect(self.global.node_addr(), Some(&self.global.directory), &self.identity()?)?;
        Ok(client.with_timeout(self.timeout()))
    }

    /// The admin port of `--admin`: with the token of `--admin-token-file` when given, else with the
    /// operator certificate (the CA is always needed, to check the server).
    pub fn admin(&self) -> Result<crate::admin::client::AdminClient, CliError> {
        use crate::admin::client::{read_token_file, AdminAuth, AdminClient};
        let paths = self.tls_paths();
        let (ca, client, token) = match &self.global.admin_token_file {
            Some(file) => {
                let ca = match &paths {
                    Ok(p) => p.ca.clone(),
                    Err(_) => self
                        .global
                        .ca
                        .clone()
                        .or_else(|| self.global.pki_dir.as_ref().map(|d| d.join("ca.crt")))
                        .ok_or_else(|| CliError::Usage("the admin port's certificate is checked against the CA: pass --ca or --pki-dir".into()))?,
                };
                // A certificate is presented too when one is configured: the server accepts either.
                let client = paths.ok().and_then(|p| TlsIdentity::load(&p).ok());
                (ca, client, Some(read_token_file(file)?))
            }
            None => {
                let id = self.identity()?;
                (paths?.ca, Some(id), None)
            }
        };
        Ok(AdminClient::connect(self.global.admin_addr(), AdminAuth { ca, client, token })?.with_timeout(self.timeout()))
    }

    fn timeout(&self) -> Duration {
        Duration::from_secs(self.global.timeout.max(1))
    }

    /// A unary request with the `--timeout` deadline.
    pub fn request<T>(&self, message: T) -> tonic::Request<T> {
        let mut req = tonic::Request::new(message);
        req.set_timeout(self.timeout());
        req
    }
}

/// Explicit files win; otherwise `--pki-dir` with `--identity` gives the `pki issue` layout.
pub fn resolve_tls_paths(g: &GlobalOpts) -> Result<TlsPaths, CliError> {
    let from_dir = |what: &str| -> Result<PathBuf, CliError> {
        let dir = g.pki_dir.as_ref().ok_or_else(|| {
            CliError::Usage(format!(
                "no {what}: pass --ca, --cert and --key (or EXCHANGE_CA, EXCHANGE_CERT, EXCHANGE_KEY), \
                 or --pki-dir DIR with --identity NAME (EXCHANGE_PKI_DIR, EXCHANGE_IDENTITY)"
            ))
        })?;
        if what == "CA certificate" {
            return Ok(dir.join("ca.crt"));
        }
        let name = g.identity.as_ref().ok_or_else(|| {
            CliError::Usage(format!(
                "no {what}: --pki-dir {} needs --identity NAME (the certificate's file stem), \
                 or pass --cert and --key",
                dir.display()
            ))
        })?;
        Ok(dir.join(format!("{name}.{}", if what == "certificate" { "crt" } else { "key" })))
    };
    Ok(TlsPaths {
        ca: g.ca.clone().map(Ok).unwrap_or_else(|| from_dir("CA certificate"))?,
        cert: g.cert.clone().map(Ok).unwrap_or_else(|| from_dir("certificate"))?,
        key: g.key.clone().map(Ok).unwrap_or_else(|| from_dir("private key"))?,
    })
}

/// Runs one parsed command line.
pub async fn run(cli: Cli) -> Result<(), CliError> {
    crate::tls::install_crypto_provider();
    let ctx = Ctx { out: Printer { json: cli.global.json }, global: cli.global };
    // catalog publish/withdraw go through a node only when one is named (--node or EXCHANGE_NODE).
    let via_node = ctx.global.node.clone();
    match cli.command {
        Command::Pki(cmd) => pki_cmd::run(&ctx, cmd).await,
        Command::Catalog(cmd) => match cmd {
            CatalogCommand::Search(args) => catalog_cmd::search(&ctx, args).await,
            CatalogCommand::Get { code, include_withdrawn } => catalog_cmd::get(&ctx, code, include_withdrawn).await,
            CatalogCommand::Resolve { code } => catalog_cmd::resolve(&ctx, code).await,
            CatalogCommand::Publish { file, dry_run } => {
                catalog_cmd::publish(&ctx, &file, via_node.as_deref(), dry_run).await
            }
            CatalogCommand::Withdraw { codes } => catalog_cmd::withdraw(&ctx, codes, via_node.as_deref()).await,
            CatalogCommand::Watch { from } => catalog_cmd::watch(&ctx, from).await,
        },
        Command::Nodes { dept } => nodes_cmd::nodes(&ctx, dept).await,
        Command::NodeStatus => nodes_cmd::node_status(&ctx, ctx.global.node_addr()).await,
        Command::Whoami => nodes_cmd::whoami(&ctx).await,
        Command::Records(cmd) => records_cmd::run(&ctx, cmd).await,
        Command::Events(cmd) => events_cmd::run(&ctx, cmd).await,
        Command::Grants(cmd) => grants_cmd::run(&ctx, cmd).await,
        Command::Audit(cmd) => audit_cmd::run(&ctx, cmd).await,
        Command::Status { interval_ms } => ops_cmd::status(&ctx, interval_ms).await,
        Command::Top { interval, iterations } => ops_cmd::top(&ctx, interval, iterations).await,
        Command::Peers => ops_cmd::peers(&ctx).await,
        Command::Outbox => ops_cmd::outbox(&ctx).await,
        Command::Admin(cmd) => ops_cmd::admin(&ctx, cmd).await,
        Command::Backup { out } => backup_cmd::backup(&ctx, out).await,
        Command::Restore { file, data_dir, server, force } => {
            let server = server.map(|s| s.parse::<crate::backup::ServerKind>()).transpose().map_err(CliError::Usage)?;
            backup_cmd::restore(&ctx, file, data_dir, server, force).await
        }
    }
}

/// The exit status when a server could not be reached (1 is any other error, 2 a usage error).
pub const EXIT_UNREACHABLE: u8 = 3;

/// The exit status after Ctrl-C (128 + SIGINT, as shells report it).
pub const EXIT_INTERRUPTED: u8 = 130;

/// Prints a failed command's error: always as text on stderr, and with `--json` also as a JSON document
/// on stdout (unless the command printed its result document already). Returns the exit status.
pub fn report_error(error: &CliError, json: bool) -> u8 {
    if json && !matches!(error, CliError::AuditTampered { .. } | CliError::NotReady(_)) {
        println!("{}", serde_json::to_string_pretty(&error.to_json()).expect("serializes"));
    }
    eprintln!("error: {error}");
    error.exit_code()
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::Parser;

    fn global(args: &[&str]) -> GlobalOpts {
        Cli::try_parse_from(["exchangectl"].iter().chain(args).chain(&["whoami"])).unwrap().global
    }

    #[test]
    fn tls_paths_from_dir_and_identity_or_explicit_files() {
        let p = resolve_tls_paths(&global(&["--pki-dir", "pki", "--identity", "tax-operator"])).unwrap();
        assert_eq!(p.ca, PathBuf::from("pki/ca.crt"));
        assert_eq!(p.cert, PathBuf::from("pki/tax-operator.crt"));
        assert_eq!(p.key, PathBuf::from("pki/tax-operator.key"));
        let p = resolve_tls_paths(&global(&["--pki-dir", "pki", "--identity", "x", "--cert", "/c.pem"])).unwrap();
        assert_eq!(p.cert, PathBuf::from("/c.pem"));
        assert_eq!(p.key, PathBuf::from("pki/x.key"));
        let p = resolve_tls_paths(&global(&["--ca", "a", "--cert", "b", "--key", "c"])).unwrap();
        assert_eq!((p.ca, p.cert, p.key), ("a".into(), "b".into(), "c".into()));
    }

    #[test]
    fn missing_certificate_options_are_a_usage_error() {
        // Only meaningful when the environment does not supply them.
        if std::env::var_os("EXCHANGE_PKI_DIR").is_some() || std::env::var_os("EXCHANGE_CERT").is_some() {
            return;
        }
        let err = resolve_tls_paths(&global(&[])).unwrap_err();
        assert_eq!(err.exit_code(), 2);
        assert!(err.to_string().contains("--pki-dir"), "{err}");
        let err = resolve_tls_paths(&global(&["--pki-dir", "pki"])).unwrap_err();
        assert!(err.to_string().contains("--identity"), "{err}");
    }

    #[test]
    fn publish_errors_name_the_entry_of_each_violation() {
        let error = BatchPublishError {
            accepted: 0,
            error: ClientError::InvalidArgument {
                message: "2 invalid fields".into(),
                violations: vec![
                    FieldViolation { field: "entries[1].share_condition".into(), description: "required for conditional".into() },
                    FieldViolation { field: "entries".into(), description: "duplicate codes".into() },
                ],
            },
        };
        let err = CliError::Publish { error, entry_codes: vec!["101001/000001".into(), "302001/000001".into()] };
        let text = err.to_string();
        assert!(text.contains("entries[1] (302001/000001).share_condition: required for conditional"), "{text}");
        assert!(text.contains("  - entries: duplicate codes"), "{text}");
        let json = err.to_json();
        assert_eq!(json["error"]["code"], "InvalidArgument");
        assert_eq!(json["error"]["violations"][0]["field"], "entries[1] (302001/000001).share_condition");
        assert_eq!(json["error"]["accepted_entries"], 0);
        assert_eq!(err.exit_code(), 1);
    }

    #[test]
    fn put_violations_name_the_record_key() {
        let keys = vec!["91350100M000100Y43".to_string(), String::new()];
        assert_eq!(
            annotate_indexed("records[0].items[注册资本]", "records", &keys),
            "records[0] (91350100M000100Y43).items[注册资本]"
        );
        assert_eq!(annotate_indexed("records[1].key", "records", &keys), "records[1].key", "no empty label");
        assert_eq!(annotate_indexed("records[7].key", "records", &keys), "records[7].key");
        assert_eq!(annotate_indexed("resource_code", "records", &keys), "resource_code");
        assert_eq!(annotate_indexed("entries[0].name", "records", &keys), "entries[0].name");
    }

    #[test]
    fn rate_limits_carry_the_retry_delay_in_json() {
        let err = CliError::Client(ClientError::ResourceExhausted {
            message: "quota".into(),
            retry_after: Some(Duration::from_millis(2500)),
        });
        assert_eq!(err.to_json()["error"]["retry_after_ms"], 2500);
        assert!(err.to_string().contains("retry after 2.5s"), "{err}");
        assert_eq!(err.exit_code(), 1);
    }

    #[test]
    fn tampered_audit_exits_1() {
        let err = CliError::AuditTampered { problem: "hash chain broken".into(), seq: 42 };
        assert_eq!(err.exit_code(), 1);
        assert!(err.to_string().contains("seq 42"), "{err}");
    }

    #[test]
    fn unreachable_server_exits_3() {
        let err = CliError::Client(ClientError::Unavailable("connection refused".into()));
        assert_eq!(err.exit_code(), 3);
        assert_eq!(err.to_json()["error"]["code"], "Unavailable");
    }
}
