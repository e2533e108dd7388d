//! Reloading the parts of the configuration that may change while the node runs: the quotas.
//!
//! `kill -HUP <pid>` (or `systemctl reload`) re-reads the config file. A file that no longer parses, or
//! whose quotas are invalid, is refused whole and the running rules stay; either way the outcome is
//! logged. Other settings (addresses, TLS files, data_dir) need a restart; a reload that changes them
//! says so in the log rather than half-applying them.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use tokio::sync::watch;

use crate::config::Config;
use crate::quota::QuotaTable;

/// Idle buckets are dropped this often (a dropped bucket would have refilled anyway).
const BUCKET_SWEEP: Duration = Duration::from_secs(60);

/// Runs until `shutdown`: reloads quotas from `source` on SIGHUP and sweeps idle quota buckets.
pub async fn reload_task(source: Option<PathBuf>, quotas: Arc<QuotaTable>, mut shutdown: watch::Receiver<bool>) {
    #[cfg(unix)]
    let mut hangups = match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::hangup()) {
        Ok(s) => Some(s),
        Err(e) => {
            tracing::warn!(error = %e, "cannot listen for SIGHUP; quota reloads need a restart");
            None
        }
    };
    let mut sweep = tokio::time::interval(BUCKET_SWEEP);
    loop {
        #[cfg(unix)]
        let hangup = async {
            match hangups.as_mut() {
                Some(h) => h.recv().await,
                None => std::future::pending().await,
            }
        };
        #[cfg(not(unix))]
        let hangup = std::future::pending::<Option<()>>();
        tokio::select! {
            _ = shutdown.wait_for(|s| *s) => return,
            _ = sweep.tick() => quotas.retain_recent(BUCKET_SWEEP),
            _ = hangup => {
                let _ = reload(source.as_ref(), &quotas);
            }
        }
    }
}

/// Re-reads the quotas from `source`; returns the number of rules now in force, or why nothing changed.
pub fn reload(source: Option<&PathBuf>, quotas: &QuotaTable) -> Result<usize, String> {
    let outcome = match source {
        None => Err("the node was not started from a config file".to_string()),
        Some(path) => Config::load(path)
            .map_err(|e| e.to_string())
            .and_then(|c| quotas.replace_rules(&c.quotas).map(|_| c.quotas.len()).map_err(|e| e.to_string())),
    };
    match &outcome {
        Ok(n) => tracing::info!(rules = n, "configuration reloaded: quotas replaced"),
        Err(e) => tracing::error!(error = %e, "configuration reload refused; the running quotas stay"),
    }
    outcome
}
