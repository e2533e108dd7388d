//! Keeping one directory replica's in-memory state current with the store's change logs.
//!
//! A replica holds three things that are not in the store: the search index, the set of revoked serials
//! its TLS layer refuses, and the versions that wake its watchers. Several replicas may write to one store
//! (PostgreSQL), so a replica cannot learn about changes from its own write path alone. The
//! [`ChangeFollower`] is the one way changes reach that state, whoever made them: it reads each change log
//! from the version it has applied, applies what it finds in version order (index, revoked set), and only
//! then announces the new version to the watchers. So on every replica a watcher that sees version `n` can
//! already find it by search, and a certificate revoked through any replica is refused by every replica.
//!
//! It wakes when a write on this replica asks it to ([`ChangeFollower::wait_applied`], so the writer's
//! own call returns only once its change is searchable here), and every `poll` interval to pick up other
//! replicas' writes. Many writes landing between two wake-ups are applied as one index commit.

use std::sync::{Arc, Weak};
use std::time::Duration;

use client_sdk::tls::RevocationSet;
use tokio::sync::Notify;

use crate::search::CatalogIndex;
use crate::store::{StoreError, Stores};
use crate::watch::{LatestVersion, BATCH};

/// How long a writer waits for its change to be applied here before answering anyway (its change is
/// durable; only this replica's index or watchers lag, and the follower keeps retrying).
const APPLY_WAIT: Duration = Duration::from_secs(5);

/// One of the store's change logs.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Log {
    Catalog,
    Grants,
    Revocations,
}

/// The versions applied on this replica at start (what the index and revoked set were loaded at).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct StartVersions {
    pub catalog: u64,
    pub grants: u64,
    pub revocations: u64,
}

/// See the module docs. Shared behind an `Arc`; its task ends when the last other holder drops it.
pub struct ChangeFollower {
    stores: Stores,
    index: Arc<CatalogIndex>,
    revoked: RevocationSet,
    catalog: LatestVersion,
    grants: LatestVersion,
    revocations: LatestVersion,
    nudge: Arc<Notify>,
}

impl ChangeFollower {
    /// Starts following from `start`, waking every `poll` (and at once when a local write asks).
    pub fn start(
        stores: Stores,
        index: Arc<CatalogIndex>,
        revoked: RevocationSet,
        start: StartVersions,
        poll: Duration,
    ) -> Arc<Self> {
        let nudge = Arc::new(Notify::new());
        let follower = Arc::new(ChangeFollower {
            stores,
            index,
            revoked,
            catalog: LatestVersion::new(start.catalog),
            grants: LatestVersion::new(start.grants),
            revocations: LatestVersion::new(start.revocations),
            nudge: nudge.clone(),
        });
        tokio::spawn(follow(Arc::downgrade(&follower), nudge, poll));
        follower
    }

    /// The version of `log` applied on this replica; watchers sleep on it.
    pub fn latest(&self, log: Log) -> &LatestVersion {
        match log {
            Log::Catalog => &self.catalog,
            Log::Grants => &self.grants,
            Log::Revocations => &self.revocations,
        }
    }

    /// Returns once `version` of `log` (a write just made) is applied here, or after [`APPLY_WAIT`].
    pub async fn wait_applied(&self, log: Log, version: u64) {
        let mut applied = self.latest(log).subscribe();
        self.nudge.notify_one();
        let waited = tokio::time::timeout(APPLY_WAIT, applied.wait_for(|v| *v >= version)).await;
        if waited.is_err() {
            tracing::warn!(?log, version, "a durable write is not yet applied on this replica; answering anyway");
        }
    }

    /// Applies everything each log holds beyond what this replica applied.
    async fn catch_up(&self) -> Result<(), StoreError> {
        self.catch_up_revocations().await?;
        self.catch_up_catalog().await?;
        let grants = self.stores.grants.current_version().await?;
        self.grants.advance(grants);
        Ok(())
    }

    async fn catch_up_revocations(&self) -> Result<(), StoreError> {
        loop {
            let applied = self.revocations.current();
            let changes = self.stores.revocations.changes_since(applied, BATCH).await?;
            let Some(last) = changes.last().map(|r| r.version) else { return Ok(()) };
            check_follows(Log::Revocations, applied, changes.iter().map(|r| r.version))?;
            for r in &changes {
                if self.revoked.insert(r.serial_hex.clone()) {
                    tracing::warn!(serial = %r.serial_hex, department = %r.department, "certificate revoked (through another replica)");
                }
            }
            self.revocations.advance(last);
        }
    }

    async fn catch_up_catalog(&self) -> Result<(), StoreError> {
        loop {
            let applied = self.catalog.current();
            let changes = self.stores.catalog.changes_since(applied, BATCH).await?;
            let Some(last) = changes.last().map(|c| c.version) else { return Ok(()) };
            check_follows(Log::Catalog, applied, changes.iter().map(|c| c.version))?;
            // Each change carries the entry as it was after it (a tombstone for a withdrawal), and the
            // index applies a batch in order: one commit for the lot.
            let entries: Vec<_> = changes.into_iter().filter_map(|c| c.entry).collect();
            let index = self.index.clone();
            let indexed = tokio::task::spawn_blocking(move || index.upsert(&entries)).await;
            match indexed {
                Ok(Ok(())) => {}
                // Announce anyway: the changes are durable and watchers must not stall on the index.
                Ok(Err(e)) => tracing::error!(error = %e, upto = last, "search index update failed"),
                Err(e) => tracing::error!(error = %e, upto = last, "search index task failed"),
            }
            self.catalog.advance(last);
        }
    }
}

fn check_follows(log: Log, applied: u64, versions: impl Iterator<Item = u64>) -> Result<(), StoreError> {
    let mut expected = applied + 1;
    for v in versions {
        if v != expected {
            return Err(StoreError::Corrupt {
                key: format!("{log:?} change log"),
                reason: format!("gap: expected version {expected}, found {v}"),
            });
        }
        expected += 1;
    }
    Ok(())
}

async fn follow(follower: Weak<ChangeFollower>, nudge: Arc<Notify>, poll: Duration) {
    let mut failures = 0u32;
    loop {
        tokio::select! {
            _ = nudge.notified() => {}
            _ = tokio::time::sleep(poll) => {}
        }
        let Some(follower) = follower.upgrade() else { return };
        match follower.catch_up().await {
            Ok(()) => failures = 0,
            Err(e) => {
                failures += 1;
                // A store outage would log on every poll; say it once, then now and then.
                if failures == 1 || failures % 100 == 0 {
                    tracing::error!(error = %e, failures, "cannot read the store's change logs; retrying");
                }
            }
        }
    }
}
