//! Reloading the directory's certificate and key while it runs.
//!
//! `kill -HUP <pid>` (or `systemctl reload`), and the admin port's `POST /api/reload`, call
//! [`Reloadable::reload_all`]: the `[tls]` cert and key files are read again (the paths from the re-read
//! config file, or the ones the directory started with when the file cannot be read) and checked by
//! `client_sdk::tls::TlsIdentity::reload` (same department and role, valid now, chain to the CA in use, key
//! matches). On success new connections handshake with the new certificate; open ones keep their session.
//! A refused certificate is logged at error level and the one in use stays. Nothing else is reloaded: the
//! other settings, and the CA, need a restart.
//!
//! [`Reloadable`] comes from [`crate::LoadedDirectory::reloadable`]; its `tls` field is the directory's one
//! `TlsIdentity`, shared by every TLS config the directory builds.

use std::path::PathBuf;

use client_sdk::admin::api::ReloadReport;
use client_sdk::tls::{TlsIdentity, TlsPaths};
use tokio::sync::watch;

use crate::config::Config;

/// Everything a reload reaches into; cheap to clone.
#[derive(Clone, Debug)]
pub struct Reloadable {
    /// The config file the directory was started from; None when started from a `Config` value (tests).
    pub source: Option<PathBuf>,
    /// The `[tls]` files the directory started with: used when the config file cannot be read again.
    pub tls_paths: TlsPaths,
    /// The directory's TLS identity: its listeners read the certificate here at each handshake.
    pub tls: TlsIdentity,
}

impl Reloadable {
    /// Reloads the certificate; Err says which check refused it (the certificate in use then stays).
    /// Blocking (file reads): call it off the async workers.
    pub fn reload_all(&self) -> Result<ReloadReport, String> {
        let mut notes = Vec::new();
        let paths = match self.source.as_ref().map(|p| Config::from_file(p)) {
            Some(Ok(c)) => {
                if c.tls.ca != self.tls_paths.ca {
                    tracing::warn!(running = %self.tls_paths.ca.display(), configured = %c.tls.ca.display(), "tls.ca changed in the config file: the CA is not reloaded, restart to change it");
                    notes.push("tls.ca changed in the config file: the CA is only read at start".to_string());
                }
                c.tls
            }
            Some(Err(e)) => {
                tracing::warn!(error = %e, "config file unreadable; reloading the certificate from the paths in use");
                notes.push(format!("config file not read ({e}); the certificate paths in use were reloaded"));
                self.tls_paths.clone()
            }
            None => self.tls_paths.clone(),
        };
        client_sdk::admin::reload_certificate(&self.tls, &paths, || {})
            .map(|report| ReloadReport { notes, ..report })
    }
}

/// Runs until `stop` turns true: reloads on SIGHUP ([`Reloadable::reload_all`]).
pub async fn reload_task(reloadable: Reloadable, mut stop: watch::Receiver<bool>) {
    #[cfg(unix)]
    let mut hangups = match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::hangup()) {
        Ok(s) => s,
        Err(e) => {
            tracing::warn!(error = %e, "cannot listen for SIGHUP; certificate reloads need the admin port or a restart");
            return;
        }
    };
    loop {
        #[cfg(unix)]
        let hangup = hangups.recv();
        #[cfg(not(unix))]
        let hangup = std::future::pending::<Option<()>>();
        // The guard `wait_for` returns must not live across the reload's await below.
        let stopping = async {
            let _ = stop.wait_for(|s| *s).await;
        };
        tokio::select! {
            _ = stopping => return,
            _ = hangup => {
                tracing::info!("SIGHUP: reloading the certificate");
                let r = reloadable.clone();
                let _ = tokio::task::spawn_blocking(move || r.reload_all()).await;
            }
        }
    }
}
