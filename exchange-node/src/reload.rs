//! Reloading what may change while the node runs: the quotas and the node's certificate and key.
//!
//! `kill -HUP <pid>` (or `systemctl reload`), and the admin port's `POST /api/reload`, call
//! [`Reloadable::reload_all`]:
//! - **Certificate**: the `[tls]` cert and key files are read again (the paths from the re-read config file,
//!   or the ones the node started with when the file cannot be read) and checked by
//!   `client_sdk::tls::TlsIdentity::reload` (same department and role, valid now, chain to the CA in use,
//!   key matches). On success every listener and outgoing connection of the node handshakes with the new
//!   certificate from then on; open connections keep their session. The node's pooled connections to other
//!   nodes are dropped (their calls in flight finish), so the next relayed call opens a connection that
//!   presents the new certificate: the old serial can then be revoked without cutting the node off. A
//!   refused certificate is logged at error level and the one in use stays. The CA is not reloaded.
//! - **Quotas**: a file that no longer parses, or whose quotas are invalid, is refused whole and the
//!   running rules stay.
//!
//! Either way the outcome is logged. Other settings (addresses, data_dir, the CA) need a restart.
//!
//! [`Reloadable`] is built by `server::run`, which hands a clone to the reload task (SIGHUP) and one to the
//! admin port; its `tls` field is the node's one `TlsIdentity`, shared by every TLS config of the node.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use client_sdk::admin::api::ReloadReport;
use client_sdk::tls::{TlsIdentity, TlsPaths};
use tokio::sync::watch;

use crate::config::Config;
use crate::consumer::Consumer;
use crate::quota::QuotaTable;

/// Idle buckets are dropped this often (a dropped bucket would have refilled anyway).
const BUCKET_SWEEP: Duration = Duration::from_secs(60);

/// Everything a reload reaches into; cheap to clone.
#[derive(Clone)]
pub struct Reloadable {
    /// The config file the node was started from; None when it was started from a `Config` value (tests),
    /// and then only the certificate can be reloaded.
    pub source: Option<PathBuf>,
    /// The `[tls]` files the node started with: used when the config file cannot be read again.
    pub tls_paths: TlsPaths,
    /// The node's TLS identity; every server and client config of the node reads its certificate here.
    pub tls: TlsIdentity,
    pub quotas: Arc<QuotaTable>,
    /// Holds the pooled connections to other nodes, dropped after a rotation.
    pub consumer: Arc<Consumer>,
    /// The node's channel to the directory, re-dialled after a rotation.
    pub directory: client_sdk::client::DirectoryChannel,
}

impl Reloadable {
    /// Reloads the certificate and the quotas. Ok when nothing was refused; otherwise Err saying what was
    /// refused and what was applied all the same (the two are independent: a config file that no longer
    /// parses does not stop a certificate rotation). Blocking (file reads): call it off the async workers.
    pub fn reload_all(&self) -> Result<ReloadReport, String> {
        let config = self.source.as_ref().map(|path| Config::load(path).map_err(|e| e.to_string()));
        let tls_paths = match &config {
            Some(Ok(c)) => {
                if c.tls.ca != self.tls_paths.ca {
                    tracing::warn!(running = %self.tls_paths.ca.display(), configured = %c.tls.ca.display(), "tls.ca changed in the config file: the CA is not reloaded, restart to change it");
                }
                c.tls.clone()
            }
            _ => self.tls_paths.clone(),
        };
        let certificate = self.reload_certificate(&tls_paths);
        let quotas = config.map(|c| {
            let outcome = c.and_then(|c| self.quotas.replace_rules(&c.quotas).map(|_| c.quotas.len()).map_err(|e| e.to_string()));
            match &outcome {
                Ok(n) => tracing::info!(rules = n, "configuration reloaded: quotas replaced"),
                Err(e) => tracing::error!(error = %e, "configuration reload refused; the running quotas stay"),
            }
            outcome
        });
        let quota_note = match &quotas {
            None => "quotas: not reloaded (the node was not started from a config file)".to_string(),
            Some(Ok(n)) => format!("quotas: {n} rules in force"),
            Some(Err(e)) => format!("quotas unchanged: {e}"),
        };
        match (certificate, quotas) {
            (Ok(report), None | Some(Ok(_))) => Ok(ReloadReport { notes: vec![quota_note], ..report }),
            (Ok(report), Some(Err(_))) => Err(format!("{}; {quota_note}", describe(&report))),
            (Err(e), _) => Err(format!("{e}; {quota_note}")),
        }
    }

    /// The certificate half of [`Reloadable::reload_all`].
    pub fn reload_certificate(&self, paths: &TlsPaths) -> Result<ReloadReport, String> {
        client_sdk::admin::reload_certificate(&self.tls, paths, || {
            // New calls to other nodes open new connections, which present the new certificate.
            self.consumer.drop_connections();
            // And to the directory: heartbeats and resolutions then present the new certificate, so the old
            // serial can be revoked at once (the directory's connection age is not waited for).
            if let Err(e) = self.directory.redial() {
                tracing::error!(error = %e, "cannot re-dial the directory after the rotation");
            }
        })
    }
}

fn describe(report: &ReloadReport) -> String {
    if report.certificate_changed {
        format!("certificate rotated: serial {} -> {}", report.old_serial_hex, report.new_serial_hex)
    } else {
        format!("certificate unchanged (serial {})", report.new_serial_hex)
    }
}

/// Runs until `shutdown`: reloads on SIGHUP ([`Reloadable::reload_all`]) and sweeps idle quota buckets.
pub async fn reload_task(reloadable: Reloadable, mut shutdown: watch::Receiver<bool>) {
    #[cfg(unix)]
    let mut hangups = match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::hangup()) {
        Ok(s) => Some(s),
        Err(e) => {
            tracing::warn!(error = %e, "cannot listen for SIGHUP; reloads need the admin port or a restart");
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
        // The guard `wait_for` returns must not live across the reload's await below.
        let stopping = async {
            let _ = shutdown.wait_for(|s| *s).await;
        };
        tokio::select! {
            _ = stopping => return,
            _ = sweep.tick() => reloadable.quotas.retain_recent(BUCKET_SWEEP),
            _ = hangup => {
                tracing::info!("SIGHUP: reloading the certificate and the quotas");
                // File reads and signature checks: off the async workers.
                let r = reloadable.clone();
                let _ = tokio::task::spawn_blocking(move || r.reload_all()).await;
            }
        }
    }
}
