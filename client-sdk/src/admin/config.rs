//! `[admin]`: the admin port's settings, the same table in the directory's and the node's config.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};

use serde::Deserialize;

/// Default of [`AdminConfig::cert_expiry_warning_days`].
pub const DEFAULT_CERT_EXPIRY_WARNING_DAYS: i64 = 14;
/// Default of [`AdminConfig::backlog_alarm_events`].
pub const DEFAULT_BACKLOG_ALARM_EVENTS: u64 = 100_000;

#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AdminConfig {
    /// Where the admin port listens (HTTPS), e.g. `127.0.0.1:9401`.
    pub listen: SocketAddr,
    /// A file whose first line is a bearer token that opens the admin port (for the console in a browser
    /// and for scrapers without a certificate). Operators with a certificate need none. Keep it 0600.
    #[serde(default)]
    pub token_file: Option<PathBuf>,
    /// `/healthz` and `/readyz` answer without credentials (kubelets and load balancers present none);
    /// the check details are shown only to an authenticated caller.
    #[serde(default = "yes")]
    pub open_probes: bool,
    /// Readiness fails when the server certificate expires within this many days.
    #[serde(default = "default_warning_days")]
    pub cert_expiry_warning_days: i64,
    /// Node only: readiness fails when one subscriber's outbox holds more undelivered events than this.
    #[serde(default = "default_backlog_alarm")]
    pub backlog_alarm_events: u64,
}

fn yes() -> bool {
    true
}
fn default_warning_days() -> i64 {
    DEFAULT_CERT_EXPIRY_WARNING_DAYS
}
fn default_backlog_alarm() -> u64 {
    DEFAULT_BACKLOG_ALARM_EVENTS
}

impl AdminConfig {
    /// An admin port on `listen` with every default (tests and embedding).
    pub fn new(listen: SocketAddr) -> Self {
        AdminConfig {
            listen,
            token_file: None,
            open_probes: true,
            cert_expiry_warning_days: DEFAULT_CERT_EXPIRY_WARNING_DAYS,
            backlog_alarm_events: DEFAULT_BACKLOG_ALARM_EVENTS,
        }
    }

    /// Resolves a relative `token_file` against the config file's folder.
    pub fn resolve_paths(&mut self, base: &Path) {
        if let Some(p) = self.token_file.as_mut() {
            if p.is_relative() {
                *p = base.join(&*p);
            }
        }
    }

    /// Checks what serde cannot.
    pub fn validate(&self) -> Result<(), String> {
        if self.cert_expiry_warning_days < 0 {
            return Err("admin.cert_expiry_warning_days must not be negative".into());
        }
        if self.backlog_alarm_events == 0 {
            return Err("admin.backlog_alarm_events must be at least 1".into());
        }
        Ok(())
    }

    /// Reads the token file, if one is configured. A missing or empty file stops the start: an admin port
    /// the operator believes protected by a token must not come up without one.
    pub fn load_token(&self) -> Result<Option<String>, String> {
        let Some(path) = &self.token_file else { return Ok(None) };
        let text = std::fs::read_to_string(path).map_err(|e| format!("admin.token_file {}: {e}", path.display()))?;
        let token = text.lines().next().unwrap_or("").trim().to_string();
        if token.len() < 16 {
            return Err(format!(
                "admin.token_file {}: the token must be at least 16 characters (e.g. `openssl rand -hex 24`)",
                path.display()
            ));
        }
        Ok(Some(token))
    }
}
