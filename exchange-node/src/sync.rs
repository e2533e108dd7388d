//! Following the directory: three watch streams (catalog, grants, revocations) keep [`Policy`] current
//! within moments of a change, with no polling loop.
//!
//! Each stream resumes from the version the node last applied (kept on disk by [`Policy`]), so a
//! reconnect or a restart neither misses nor needs to re-read anything. A broken stream is reopened with
//! capped exponential backoff; meanwhile the node keeps deciding with what it has (the cached copy), and
//! `NodeStatus` shows the watches as disconnected.
//!
//! Each stream reports to [`Policy::set_connected`] as it opens and drops (the copy is fresh while all three
//! are open), and a ticker calls [`Policy::touch`] every [`TOUCH_INTERVAL`]: it writes down the time the
//! copy was last fresh, and notices when a copy kept too long without the directory goes stale
//! (`relay.max_directory_staleness_seconds`).

use client_sdk::client::DirectoryChannel;
use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use exchange_proto::v1::directory_client::DirectoryClient;
use exchange_proto::v1::{WatchCatalogRequest, WatchGrantsRequest, WatchRevocationsRequest};
use tokio::sync::watch;
use tokio::task::JoinHandle;
use tonic::{Status, Streaming};

use crate::error::NodeError;
use crate::policy::{Feed, Policy};
use crate::registration::{Backoff, Timing};
use crate::state::{now_unix_ms, NodeState};

/// How often the sync task calls [`Policy::touch`].
pub const TOUCH_INTERVAL: Duration = Duration::from_secs(5);

/// Called with the resource code of another department's entry whenever it changes, so cached
/// resolutions of it are dropped.
pub type OnForeignChange = Arc<dyn Fn(&str) + Send + Sync>;

pub struct DirectorySync {
    pub directory: DirectoryClient<DirectoryChannel>,
    pub directory_address: String,
    pub policy: Arc<Policy>,
    pub state: Arc<NodeState>,
    pub timing: Timing,
    pub on_foreign_change: OnForeignChange,
}

impl DirectorySync {
    /// Starts the three followers; they end when `shutdown` turns true.
    pub fn spawn(self, shutdown: watch::Receiver<bool>) -> JoinHandle<()> {
        self.policy.set_directory_address(&self.directory_address);
        let this = Arc::new(self);
        let ticker = tokio::spawn({
            let policy = this.policy.clone();
            let mut shutdown = shutdown.clone();
            async move {
                let mut every = tokio::time::interval(TOUCH_INTERVAL);
                every.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
                loop {
                    tokio::select! {
                        _ = shutdown.wait_for(|s| *s) => return,
                        _ = every.tick() => policy.touch(now_unix_ms()),
                    }
                }
            }
        });
        let catalog = tokio::spawn({
            let this = this.clone();
            let shutdown = shutdown.clone();
            async move {
                this.follow(
                    Feed::Catalog,
                    shutdown,
                    |mut dir, from| async move { dir.watch_catalog(WatchCatalogRequest { from_version: from }).await },
                    |this, change| {
                        if let Some(code) = this.policy.apply_catalog_change(&change)? {
                            (this.on_foreign_change)(&code);
                        }
                        Ok(())
                    },
                    |p| p.catalog_version(),
                )
                .await
            }
        });
        let grants = tokio::spawn({
            let this = this.clone();
            let shutdown = shutdown.clone();
            async move {
                this.follow(
                    Feed::Grants,
                    shutdown,
                    |mut dir, from| async move { dir.watch_grants(WatchGrantsRequest { from_version: from }).await },
                    |this, change| {
                        if let Some(g) = &change.grant {
                            tracing::info!(grant = %g.grant_id, resource = %g.resource_code, consumer = %g.consumer_code, status = ?g.status(), "grant changed");
                        }
                        this.policy.apply_grant_change(&change)
                    },
                    |p| p.grants_version(),
                )
                .await
            }
        });
        let revocations = tokio::spawn({
            let this = this.clone();
            async move {
                this.follow(
                    Feed::Revocations,
                    shutdown,
                    |mut dir, from| async move {
                        dir.watch_revocations(WatchRevocationsRequest { from_version: from }).await
                    },
                    |this, revocation| this.policy.apply_revocation(&revocation),
                    |p| p.revocations_version(),
                )
                .await
            }
        });
        tokio::spawn(async move {
            let _ = tokio::join!(catalog, grants, revocations, ticker);
        })
    }

    async fn follow<T, Open, Fut>(
        self: Arc<Self>,
        feed: Feed,
        mut shutdown: watch::Receiver<bool>,
        open: Open,
        apply: impl Fn(&Self, T) -> Result<(), NodeError>,
        cursor: impl Fn(&Policy) -> u64,
    ) where
        Open: Fn(DirectoryClient<DirectoryChannel>, u64) -> Fut,
        Fut: Future<Output = Result<tonic::Response<Streaming<T>>, Status>>,
    {
        let mut backoff = Backoff::new(self.timing.backoff_start, self.timing.backoff_max);
        loop {
            let from = cursor(&self.policy);
            let opened = tokio::select! {
                _ = shutdown.wait_for(|s| *s) => return,
                r = open(self.directory.clone(), from) => r,
            };
            let failure = match opened {
                Ok(resp) => {
                    self.policy.set_connected(feed, true);
                    tracing::debug!(?feed, from_version = from, "following the directory");
                    let opened_at = std::time::Instant::now();
                    let mut stream = resp.into_inner();
                    let outcome = loop {
                        let next = tokio::select! {
                            _ = shutdown.wait_for(|s| *s) => {
                                self.policy.set_connected(feed, false);
                                return;
                            }
                            n = stream.message() => n,
                        };
                        match next {
                            Ok(Some(item)) => {
                                if let Err(e) = apply(&self, item) {
                                    break format!("could not apply a change: {e}");
                                }
                                backoff.reset();
                            }
                            Ok(None) => break "the directory ended the stream".to_string(),
                            Err(status) => {
                                break NodeError::from_directory(&self.directory_address, status).to_string()
                            }
                        }
                    };
                    self.policy.set_connected(feed, false);
                    // A stream that stayed up a while broke because its replica went away, not because the
                    // directory keeps failing: reopen after the shortest delay (the call lands on the next
                    // replica), not one grown by failures long past; the copy ages until the stream is back.
                    if opened_at.elapsed() >= self.timing.backoff_max {
                        backoff.reset();
                    }
                    outcome
                }
                Err(status) if status.code() == tonic::Code::OutOfRange && from > 0 => {
                    // The directory's log ends below our position: it was restored from an earlier backup.
                    // Read its whole log again rather than wait for it to pass our position and skip the
                    // changes it numbers in between.
                    tracing::error!(?feed, from_version = from, directory = %status.message(), "the directory is behind this node's copy (restored from a backup?): dropping the copy and reading it again from the start");
                    match self.policy.restart_feed(feed) {
                        Ok(()) => continue,
                        Err(e) => format!("could not restart the {feed:?} copy: {e}"),
                    }
                }
                Err(status) => NodeError::from_directory(&self.directory_address, status).to_string(),
            };
            let delay = backoff.next_delay();
            tracing::warn!(?feed, error = %failure, retry_in = ?delay, "directory watch interrupted; using the cached copy meanwhile");
            self.state.directory_error(failure);
            tokio::select! {
                _ = shutdown.wait_for(|s| *s) => return,
                _ = tokio::time::sleep(delay) => {}
            }
        }
    }
}
