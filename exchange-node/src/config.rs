//! The node's configuration: one TOML file, one typed [`Config`]. See
//! `deploy/config/node.example.toml` for a commented example.
//!
//! Relative paths in the file (`data_dir`, `catalog_file`, the `[tls]` files) are taken relative to the
//! folder of the config file, not the working directory, so a deployment folder can be moved or started
//! from anywhere.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};

use client_sdk::tls::TlsPaths;
use serde::Deserialize;

use crate::error::NodeError;
use crate::quota::{QuotaRule, QuotaTable};

/// Connections served at once before further clients wait in the kernel's backlog.
pub const DEFAULT_MAX_CONNECTIONS: usize = 1024;
/// How long in-flight calls may take to finish after a shutdown signal.
pub const DEFAULT_SHUTDOWN_GRACE_SECONDS: u64 = 30;

#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Config {
    /// Where the node's gRPC server listens, e.g. `0.0.0.0:7401`.
    pub listen: SocketAddr,
    /// `host:port` other nodes and the department's applications reach this node at; registered with the
    /// directory. Must be a name or address in the node certificate (`exchangectl pki issue --host`).
    pub advertise_address: String,
    /// The directory, `host:port`. A directory run as several replicas is given as all their addresses,
    /// a TOML array (`["dir-a:7443", "dir-b:7443"]`) or one string separated by commas
    /// (`"dir-a:7443,dir-b:7443"`): the node uses one replica at a time and fails over to the next when
    /// it fails (see `client_sdk::client::DirectoryChannel`). Kept as one comma-separated string.
    #[serde(deserialize_with = "one_or_more_addresses")]
    pub directory_address: String,
    /// The node's own store (sled), created if missing.
    pub data_dir: PathBuf,
    /// The node's CA, certificate (role `node`) and key.
    pub tls: TlsPaths,
    /// A catalog file (`[[entries]]`, see `deploy/local/catalog/`) published after the first successful
    /// registration.
    #[serde(default)]
    pub catalog_file: Option<PathBuf>,
    #[serde(default = "default_max_connections")]
    pub max_connections: usize,
    #[serde(default = "default_grace")]
    pub shutdown_grace_seconds: u64,
    /// `text` or `json`; the level comes from `RUST_LOG` (default `info`).
    #[serde(default)]
    pub log_format: LogFormat,
    /// Relay settings (`[relay]`).
    #[serde(default)]
    pub relay: RelayConfig,
    /// Rate limits this node sets as a provider (`[[quotas]]`), per consumer department and resource.
    /// Re-read on SIGHUP without a restart.
    #[serde(default)]
    pub quotas: Vec<QuotaRule>,
    /// The admin port (`[admin]`): metrics, health, console, operator API. None: no admin port.
    #[serde(default)]
    pub admin: Option<client_sdk::admin::AdminConfig>,
    /// OpenTelemetry trace export (`[telemetry]`); absent: none. Read at start only.
    #[serde(default)]
    pub telemetry: client_sdk::telemetry::TelemetryConfig,
    /// The file this configuration was read from (for reloads); not a TOML key.
    #[serde(skip)]
    pub source: Option<PathBuf>,
}

/// `[relay]`: how this node calls other departments' nodes, and how often it seals its audit trail.
#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct RelayConfig {
    /// Deadline of a call to a provider's node (and of a resolution by the directory).
    pub call_timeout_seconds: u64,
    /// How long a resolved provider address is reused before asking the directory again (a catalog
    /// change drops it at once).
    pub resolve_cache_seconds: u64,
    /// How often the audit trail is sealed (signed) when it has new entries.
    pub audit_seal_seconds: u64,
    /// How old the node's copy of the directory's state (grants, revocations, its catalog entries, the
    /// provider addresses it resolved) may get while the directory is unreachable before the node stops
    /// relaying. The copy is fresh while the node's three watch streams are connected; its age counts from
    /// the moment they were last all connected.
    pub max_directory_staleness_seconds: u64,
}

/// Default of [`RelayConfig::max_directory_staleness_seconds`]: one hour.
pub const DEFAULT_MAX_DIRECTORY_STALENESS_SECONDS: u64 = 3600;

impl Default for RelayConfig {
    fn default() -> Self {
        RelayConfig {
            call_timeout_seconds: 10,
            resolve_cache_seconds: 30,
            audit_seal_seconds: 10,
            max_directory_staleness_seconds: DEFAULT_MAX_DIRECTORY_STALENESS_SECONDS,
        }
    }
}

pub use client_sdk::process::LogFormat;

fn default_max_connections() -> usize {
    DEFAULT_MAX_CONNECTIONS
}
fn default_grace() -> u64 {
    DEFAULT_SHUTDOWN_GRACE_SECONDS
}

/// `directory_address`: a string, or an array of strings joined with commas (the list form of
/// [`client_sdk::client::directory_addresses`]).
fn one_or_more_addresses<'de, D: serde::Deserializer<'de>>(deserializer: D) -> Result<String, D::Error> {
    struct Addresses;
    impl<'de> serde::de::Visitor<'de> for Addresses {
        type Value = String;

        fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
            f.write_str("\"host:port\", \"host:port,host:port\" or an array of \"host:port\" strings")
        }

        fn visit_str<E: serde::de::Error>(self, v: &str) -> Result<String, E> {
            Ok(v.to_string())
        }

        fn visit_seq<A: serde::de::SeqAccess<'de>>(self, mut seq: A) -> Result<String, A::Error> {
            let mut addrs = Vec::new();
            while let Some(addr) = seq.next_element::<String>()? {
                addrs.push(addr);
            }
            Ok(addrs.join(","))
        }
    }
    deserializer.deserialize_any(Addresses)
}

impl Config {
    /// The directory's addresses: one, or each replica's (see [`Config::directory_address`]).
    pub fn directory_addresses(&self) -> Vec<String> {
        client_sdk::client::directory_addresses(&self.directory_address).unwrap_or_default()
    }

    /// Reads, parses and checks the file, and resolves relative paths against its folder.
    pub fn load(path: &Path) -> Result<Config, NodeError> {
        let text = std::fs::read_to_string(path)
            .map_err(|e| NodeError::Config(format!("{}: {e}", path.display())))?;
        let base = path.parent().unwrap_or(Path::new("."));
        let mut config =
            Config::from_toml(&text, base).map_err(|e| NodeError::Config(format!("{}: {e}", path.display())))?;
        config.source = Some(path.to_path_buf());
        Ok(config)
    }

    /// Parses and checks TOML text; relative paths are resolved against `base`.
    pub fn from_toml(text: &str, base: &Path) -> Result<Config, String> {
        let mut config: Config = toml::from_str(text).map_err(|e| e.to_string())?;
        config.resolve_paths(base);
        config.validate()?;
        Ok(config)
    }

    fn resolve_paths(&mut self, base: &Path) {
        let resolve = |p: &mut PathBuf| {
            if p.is_relative() {
                *p = base.join(&*p);
            }
        };
        resolve(&mut self.data_dir);
        resolve(&mut self.tls.ca);
        resolve(&mut self.tls.cert);
        resolve(&mut self.tls.key);
        if let Some(p) = self.catalog_file.as_mut() {
            resolve(p);
        }
        if let Some(admin) = self.admin.as_mut() {
            admin.resolve_paths(base);
        }
    }

    fn validate(&self) -> Result<(), String> {
        let host_port = |value: &str| match value.rsplit_once(':') {
            Some((host, port)) => !host.is_empty() && port.parse::<u16>().is_ok_and(|p| p != 0),
            None => false,
        };
        if !host_port(&self.advertise_address) {
            return Err(format!("advertise_address = {:?}: expected host:port", self.advertise_address));
        }
        let directory = &self.directory_address;
        let addrs = client_sdk::client::directory_addresses(directory).map_err(|e| match e {
            client_sdk::tls::TlsError::Connect { reason, .. } => format!("directory_address = {directory:?}: {reason}"),
            other => format!("directory_address = {directory:?}: {other}"),
        })?;
        if let Some(bad) = addrs.iter().find(|a| !host_port(a)) {
            return Err(format!("directory_address = {directory:?}: {bad:?} is not host:port"));
        }
        if let Some(admin) = &self.admin {
            admin.validate()?;
            if admin.listen == self.listen {
                return Err(format!("admin.listen {} is the gRPC listen address too: give it a port of its own", admin.listen));
            }
        }
        if self.max_connections == 0 {
            return Err("max_connections must be at least 1".into());
        }
        if self.relay.call_timeout_seconds == 0 || self.relay.audit_seal_seconds == 0 {
            return Err("relay.call_timeout_seconds and relay.audit_seal_seconds must be at least 1".into());
        }
        if self.relay.max_directory_staleness_seconds == 0 {
            return Err("relay.max_directory_staleness_seconds must be at least 1 (default 3600)".into());
        }
        QuotaTable::new(&self.quotas).map_err(|e| e.to_string())?;
        self.telemetry.validate()?;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const MINIMAL: &str = r#"
listen = "127.0.0.1:7401"
advertise_address = "tax-node.example:7401"
directory_address = "127.0.0.1:7400"
data_dir = "data/tax"

[tls]
ca = "pki/ca.crt"
cert = "pki/tax-node.crt"
key = "/etc/keys/tax-node.key"
"#;

    #[test]
    fn minimal_config_gets_defaults_and_resolved_paths() {
        let c = Config::from_toml(MINIMAL, Path::new("/srv/node")).unwrap();
        assert_eq!(c.listen, "127.0.0.1:7401".parse().unwrap());
        assert_eq!(c.data_dir, PathBuf::from("/srv/node/data/tax"));
        assert_eq!(c.tls.ca, PathBuf::from("/srv/node/pki/ca.crt"));
        assert_eq!(c.tls.key, PathBuf::from("/etc/keys/tax-node.key"), "absolute paths stay");
        assert_eq!(c.max_connections, DEFAULT_MAX_CONNECTIONS);
        assert_eq!(c.log_format, LogFormat::Text);
        assert!(c.catalog_file.is_none());
    }

    #[test]
    fn typos_and_bad_addresses_are_refused() {
        let typo = MINIMAL.replace("[tls]", "max_conections = 5\n[tls]");
        let err = Config::from_toml(&typo, Path::new(".")).unwrap_err();
        assert!(err.contains("max_conections"), "{err}");
        let bad = MINIMAL.replace("tax-node.example:7401", "tax-node.example");
        let err = Config::from_toml(&bad, Path::new(".")).unwrap_err();
        assert!(err.contains("advertise_address"), "{err}");
    }

    #[test]
    fn the_directory_may_be_several_replicas() {
        let one = Config::from_toml(MINIMAL, Path::new(".")).unwrap();
        assert_eq!(one.directory_addresses(), ["127.0.0.1:7400"]);
        let comma = MINIMAL.replace("\"127.0.0.1:7400\"", "\"dir-a:7443, dir-b:7443\"");
        let c = Config::from_toml(&comma, Path::new(".")).unwrap();
        assert_eq!(c.directory_addresses(), ["dir-a:7443", "dir-b:7443"]);
        let array = MINIMAL.replace("\"127.0.0.1:7400\"", "[\"dir-a:7443\", \"dir-b:7443\"]");
        let c = Config::from_toml(&array, Path::new(".")).unwrap();
        assert_eq!(c.directory_address, "dir-a:7443,dir-b:7443");
        assert_eq!(c.directory_addresses(), ["dir-a:7443", "dir-b:7443"]);

        let refused = |value: &str| Config::from_toml(&MINIMAL.replace("\"127.0.0.1:7400\"", value), Path::new(".")).unwrap_err();
        let err = refused("[]");
        assert!(err.contains("directory_address") && err.contains("no directory address given"), "{err}");
        let err = refused("[\"dir-a:7443\", \"\"]");
        assert!(err.contains("directory_address") && err.contains("2 of 2 is empty"), "{err}");
        let err = refused("\"dir-a:7443,dir-b\"");
        assert!(err.contains("directory_address") && err.contains("dir-b"), "{err}");
        let err = refused("\"dir-a:7443,dir-b:0\"");
        assert!(err.contains("\"dir-b:0\" is not host:port"), "{err}");
        let err = refused("7400");
        assert!(err.contains("directory_address") && err.contains("array of"), "{err}");
    }

    #[test]
    fn quotas_are_checked_when_read() {
        let with = format!("{MINIMAL}\n[[quotas]]\nconsumer = \"tax\"\nresource = \"*\"\nper_second = 0\n");
        let err = Config::from_toml(&with, Path::new(".")).unwrap_err();
        assert!(err.contains("quotas[0]") && err.contains("per_second"), "{err}");
        let ok = with.replace("per_second = 0", "per_second = 50\nburst = 100");
        let c = Config::from_toml(&ok, Path::new(".")).unwrap();
        assert_eq!(c.quotas[0].burst, Some(100));
        assert_eq!(c.relay.resolve_cache_seconds, 30);
    }

    #[test]
    fn staleness_bound_defaults_to_an_hour_and_cannot_be_zero() {
        let c = Config::from_toml(MINIMAL, Path::new(".")).unwrap();
        assert_eq!(c.relay.max_directory_staleness_seconds, 3600);
        let zero = format!("{MINIMAL}\n[relay]\nmax_directory_staleness_seconds = 0\n");
        let err = Config::from_toml(&zero, Path::new(".")).unwrap_err();
        assert!(err.contains("max_directory_staleness_seconds"), "{err}");
        let set = zero.replace("= 0", "= 600");
        assert_eq!(Config::from_toml(&set, Path::new(".")).unwrap().relay.max_directory_staleness_seconds, 600);
    }

    #[test]
    fn telemetry_is_off_unless_an_endpoint_is_given_and_a_bad_endpoint_stops_the_start() {
        let c = Config::from_toml(MINIMAL, Path::new(".")).unwrap();
        assert!(!c.telemetry.enabled());
        let on = format!("{MINIMAL}\n[telemetry]\notlp_endpoint = \"http://127.0.0.1:4317\"\nsample_ratio = 0.25\n");
        let c = Config::from_toml(&on, Path::new(".")).unwrap();
        assert_eq!(c.telemetry.otlp_endpoint.as_deref(), Some("http://127.0.0.1:4317"));
        assert_eq!(c.telemetry.sample_ratio, 0.25);
        let bad = on.replace("http://127.0.0.1:4317", "127.0.0.1:4317");
        let err = Config::from_toml(&bad, Path::new(".")).unwrap_err();
        assert!(err.contains("telemetry.otlp_endpoint") && err.contains("http://host:port"), "{err}");
        let typo = on.replace("sample_ratio", "sampling");
        let err = Config::from_toml(&typo, Path::new(".")).unwrap_err();
        assert!(err.contains("sampling"), "{err}");
    }

    #[test]
    fn example_config_parses() {
        let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("../deploy/config/node.example.toml");
        let c = Config::load(&path).unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(c.log_format, LogFormat::Json);
        assert!(c.catalog_file.is_some());
        assert_eq!(c.quotas.len(), 2);
        assert_eq!(c.relay.audit_seal_seconds, 10);
        assert_eq!(c.relay.max_directory_staleness_seconds, 3600);
    }
}
