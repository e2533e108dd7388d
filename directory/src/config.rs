//! The directory's configuration file (TOML), read into one typed [`Config`].
//!
//! ```toml
//! listen = "0.0.0.0:7443"            # where the directory accepts mutual-TLS gRPC
//! data_dir = "/var/lib/gov-exchange/directory"
//! lease_ttl_seconds = 15             # optional; a node is OFFLINE this long after its last heartbeat
//! max_connections = 1024             # optional; further clients wait in the kernel backlog
//! max_connection_age_seconds = 1800  # optional; then a client is asked to reconnect (see below)
//! log_format = "text"                # optional; "text" or "json"
//!
//! [tls]                              # the directory's own certificate must have role `directory`
//! ca = "pki/ca.crt"
//! cert = "pki/directory.crt"
//! key = "pki/directory.key"
//!
//! [store]                            # optional; the default is sled in data_dir
//! backend = "postgres"               # several replicas over one database (docs/OPERATOR-GUIDE.md)
//! [store.postgres]
//! url = "postgresql://gx_directory@db.example:5432/gx_directory"
//! password_file = "secrets/db-password"
//! ```
//!
//! With `backend = "postgres"` the directory keeps nothing on local disk (its search index is in memory,
//! rebuilt from the database at start), so `data_dir` may be left out.
//!
//! Relative paths in a file read with [`Config::from_file`] are resolved against the file's own folder, so a
//! config works the same from any working directory (and under a service manager). Unknown keys are
//! refused, so a misspelt option is an error instead of a silent default.

use std::path::{Path, PathBuf};

use client_sdk::tls::TlsPaths;
use serde::Deserialize;

/// The default node lease: a node that misses heartbeats for this long is shown OFFLINE.
pub const DEFAULT_LEASE_TTL_SECONDS: u32 = 15;
/// The default limit of simultaneously open client connections.
pub const DEFAULT_MAX_CONNECTIONS: usize = 1024;
/// The default of [`Config::max_connection_age_seconds`]: half an hour.
pub const DEFAULT_MAX_CONNECTION_AGE_SECONDS: u64 = 1800;

#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("cannot read config {path}: {source}")]
    Read { path: PathBuf, source: std::io::Error },
    #[error("config {path}: {message}")]
    Parse { path: PathBuf, message: String },
    #[error("config: {0}")]
    Invalid(String),
}

pub use client_sdk::process::LogFormat;

/// Everything the directory server needs to start.
#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Config {
    /// `host:port` to listen on (used by the binary; [`crate::server::run`] takes a bound listener).
    pub listen: String,
    /// Folder of the sled database; created if missing. Not used with the PostgreSQL backend.
    #[serde(default)]
    pub data_dir: PathBuf,
    /// The directory's CA, certificate and key.
    pub tls: TlsPaths,
    /// Node lease length: a node is ONLINE until this long after its last heartbeat or registration.
    #[serde(default = "default_lease_ttl")]
    pub lease_ttl_seconds: u32,
    /// Most client connections open at once.
    #[serde(default = "default_max_connections")]
    pub max_connections: usize,
    /// How long a client connection may stay open before the directory asks the client to reconnect
    /// (an HTTP/2 GOAWAY: calls and watch streams in progress finish on the old connection, new calls
    /// open a new one). A node that rotated its certificate keeps presenting the old one to the
    /// directory until it reconnects, so this bounds how long to wait before revoking the old serial.
    #[serde(default = "default_max_connection_age")]
    pub max_connection_age_seconds: u64,
    #[serde(default)]
    pub log_format: LogFormat,
    /// Where the directory's state lives (`[store]`): sled in `data_dir` unless it says otherwise.
    #[serde(default)]
    pub store: StoreConfig,
    /// The admin port (`[admin]`): metrics, health, console, operator API. None: no admin port.
    #[serde(default)]
    pub admin: Option<client_sdk::admin::AdminConfig>,
    /// OpenTelemetry trace export (`[telemetry]`); absent: none. Read at start only.
    #[serde(default)]
    pub telemetry: client_sdk::telemetry::TelemetryConfig,
    /// The file this configuration was read from (SIGHUP re-reads the `[tls]` paths from it); not a TOML key.
    #[serde(skip)]
    pub source: Option<PathBuf>,
}

/// `[store]`: which backend holds the catalog, nodes, grants and revocations.
#[derive(Clone, Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct StoreConfig {
    #[serde(default)]
    pub backend: StoreBackend,
    /// Required when `backend = "postgres"`.
    #[serde(default)]
    pub postgres: Option<crate::store::postgres::PostgresConfig>,
}

#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum StoreBackend {
    /// sled in `data_dir`: one directory process.
    #[default]
    Sled,
    /// A PostgreSQL database shared by any number of directory replicas.
    Postgres,
}

fn default_lease_ttl() -> u32 {
    DEFAULT_LEASE_TTL_SECONDS
}
fn default_max_connections() -> usize {
    DEFAULT_MAX_CONNECTIONS
}
fn default_max_connection_age() -> u64 {
    DEFAULT_MAX_CONNECTION_AGE_SECONDS
}

impl Config {
    /// A config with defaults for the optional fields (for tests and embedding).
    pub fn new(listen: impl Into<String>, data_dir: impl Into<PathBuf>, tls: TlsPaths) -> Self {
        Config {
            listen: listen.into(),
            data_dir: data_dir.into(),
            tls,
            lease_ttl_seconds: DEFAULT_LEASE_TTL_SECONDS,
            max_connections: DEFAULT_MAX_CONNECTIONS,
            max_connection_age_seconds: DEFAULT_MAX_CONNECTION_AGE_SECONDS,
            log_format: LogFormat::Text,
            store: StoreConfig::default(),
            admin: None,
            telemetry: Default::default(),
            source: None,
        }
    }

    /// Reads and validates a TOML file; relative paths are taken relative to the file's folder.
    pub fn from_file(path: &Path) -> Result<Self, ConfigError> {
        let text =
            std::fs::read_to_string(path).map_err(|source| ConfigError::Read { path: path.to_path_buf(), source })?;
        let mut config = Self::from_toml_str(&text).map_err(|e| match e {
            ConfigError::Parse { message, .. } => ConfigError::Parse { path: path.to_path_buf(), message },
            other => other,
        })?;
        let base = path.parent().unwrap_or_else(|| Path::new("."));
        for p in [&mut config.data_dir, &mut config.tls.ca, &mut config.tls.cert, &mut config.tls.key] {
            if p.is_relative() {
                *p = base.join(&*p);
            }
        }
        if let Some(admin) = config.admin.as_mut() {
            admin.resolve_paths(base);
        }
        if let Some(pg) = config.store.postgres.as_mut() {
            pg.resolve_paths(base);
        }
        config.source = Some(path.to_path_buf());
        Ok(config)
    }

    /// Parses and validates TOML text (paths are left as written).
    pub fn from_toml_str(text: &str) -> Result<Self, ConfigError> {
        let config: Config =
            toml::from_str(text).map_err(|e| ConfigError::Parse { path: PathBuf::new(), message: e.to_string() })?;
        config.validate()?;
        Ok(config)
    }

    /// Checks the values serde cannot.
    pub fn validate(&self) -> Result<(), ConfigError> {
        if !(1..=86_400).contains(&self.lease_ttl_seconds) {
            return Err(ConfigError::Invalid(format!(
                "lease_ttl_seconds must be 1-86400, got {}",
                self.lease_ttl_seconds
            )));
        }
        if self.max_connections == 0 {
            return Err(ConfigError::Invalid("max_connections must be at least 1".into()));
        }
        if !(1..=604_800).contains(&self.max_connection_age_seconds) {
            return Err(ConfigError::Invalid(format!(
                "max_connection_age_seconds must be 1-604800 (a week), got {}",
                self.max_connection_age_seconds
            )));
        }
        match (self.store.backend, &self.store.postgres) {
            (StoreBackend::Sled, Some(_)) => {
                return Err(ConfigError::Invalid(
                    "[store.postgres] is set but store.backend is \"sled\": set backend = \"postgres\" to use it".into(),
                ))
            }
            (StoreBackend::Sled, None) if self.data_dir.as_os_str().is_empty() => {
                return Err(ConfigError::Invalid("data_dir is required with the sled store (the default)".into()))
            }
            (StoreBackend::Postgres, None) => {
                return Err(ConfigError::Invalid("store.backend = \"postgres\" needs a [store.postgres] table with url".into()))
            }
            (StoreBackend::Postgres, Some(pg)) => {
                pg.validate().map_err(|e| ConfigError::Invalid(format!("store.postgres: {e}")))?
            }
            (StoreBackend::Sled, None) => {}
        }
        if self.listen.trim().is_empty() {
            return Err(ConfigError::Invalid("listen must be host:port".into()));
        }
        if let Some(admin) = &self.admin {
            admin.validate().map_err(ConfigError::Invalid)?;
            if admin.listen.to_string() == self.listen {
                return Err(ConfigError::Invalid(format!("admin.listen {} is the gRPC listen address too", admin.listen)));
            }
        }
        self.telemetry.validate().map_err(ConfigError::Invalid)?;
        Ok(())
    }

    /// How often nodes are told to heartbeat: three beats per lease, so one lost beat does not expire it.
    pub fn heartbeat_interval_seconds(&self) -> u32 {
        (self.lease_ttl_seconds / 3).max(1)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn defaults_and_relative_paths() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("directory.toml");
        std::fs::write(
            &path,
            "listen = \"127.0.0.1:7443\"\ndata_dir = \"data\"\n[tls]\nca = \"pki/ca.crt\"\ncert = \"/abs/d.crt\"\nkey = \"pki/d.key\"\n",
        )
        .unwrap();
        let c = Config::from_file(&path).unwrap();
        assert_eq!(c.lease_ttl_seconds, 15);
        assert_eq!(c.max_connections, 1024);
        assert_eq!(c.log_format, LogFormat::Text);
        assert_eq!(c.data_dir, dir.path().join("data"));
        assert_eq!(c.tls.ca, dir.path().join("pki/ca.crt"));
        assert_eq!(c.tls.cert, PathBuf::from("/abs/d.crt"));
        assert_eq!(c.heartbeat_interval_seconds(), 5);
    }

    #[test]
    fn the_shipped_example_parses() {
        let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("../deploy/config/directory.example.toml");
        let c = Config::from_file(&path).expect("deploy/config/directory.example.toml must stay valid");
        c.validate().expect("example validates");
        assert_eq!(c.lease_ttl_seconds, 15);
    }

    #[test]
    fn refuses_unknown_keys_and_bad_values() {
        let base = "listen = \"x:1\"\ndata_dir = \"d\"\n[tls]\nca = \"a\"\ncert = \"b\"\nkey = \"c\"\n";
        assert!(Config::from_toml_str(base).is_ok());
        assert!(Config::from_toml_str(&format!("lease_ttl = 3\n{base}")).is_err());
        assert!(Config::from_toml_str(&format!("lease_ttl_seconds = 0\n{base}")).is_err());
        assert_eq!(Config::from_toml_str(base).unwrap().max_connection_age_seconds, DEFAULT_MAX_CONNECTION_AGE_SECONDS);
        assert_eq!(Config::from_toml_str(&format!("max_connection_age_seconds = 60\n{base}")).unwrap().max_connection_age_seconds, 60);
        let never = Config::from_toml_str(&format!("max_connection_age_seconds = 0\n{base}")).unwrap_err().to_string();
        assert!(never.contains("max_connection_age_seconds must be 1-604800"), "{never}");
        assert!(Config::from_toml_str(&format!("log_format = \"xml\"\n{base}")).is_err());
        let json = Config::from_toml_str(&format!("log_format = \"json\"\n{base}")).unwrap();
        assert_eq!(json.log_format, LogFormat::Json);
    }

    #[test]
    fn telemetry_table_is_optional_and_a_bad_endpoint_is_refused() {
        let base = "listen = \"x:1\"\ndata_dir = \"d\"\n[tls]\nca = \"a\"\ncert = \"b\"\nkey = \"c\"\n";
        assert!(!Config::from_toml_str(base).unwrap().telemetry.enabled());
        let on = format!("{base}[telemetry]\notlp_endpoint = \"http://127.0.0.1:4317\"\nservice_name = \"directory-east\"\n");
        let c = Config::from_toml_str(&on).unwrap();
        assert_eq!(c.telemetry.service_name.as_deref(), Some("directory-east"));
        let err = Config::from_toml_str(&on.replace("http://127.0.0.1:4317", "https://collector:4317")).unwrap_err();
        assert!(err.to_string().contains("telemetry.otlp_endpoint"), "{err}");
    }
}
