//! `WatchCatalog`: every change after a version, in version order, then live changes.
//!
//! The store's change log is the only source of changes; nothing is queued per watcher. A watcher keeps a
//! cursor (the last version it sent) and repeatedly reads `changes_since(cursor, BATCH)`; when it has caught
//! up it sleeps on a `tokio::sync::watch<u64>` that publishers bump after each durable write. Because the
//! watcher marks the current watch value as seen *before* reading the store, a write that lands between
//! the read and the sleep still wakes it, so no change is missed; because it only ever asks for versions
//! above its cursor and checks that they follow on without a gap, none is repeated or skipped.
//!
//! Back-pressure: the stream is pulled by the connection (HTTP/2 flow control), so a slow client holds at
//! most one batch in memory and never blocks publishers. On shutdown the stream ends with `UNAVAILABLE`
//! so clients reconnect and resume from the last version they saw.

use std::collections::VecDeque;
use std::pin::Pin;
use std::sync::Arc;

use exchange_proto::v1::CatalogChange;
use futures::Stream;
use tokio::sync::watch;
use tonic::Status;

use crate::error::DirectoryError;
use crate::store::CatalogStore;

/// Changes read from the store per round trip.
pub const BATCH: usize = 1000;

/// The stream type of `WatchCatalog`.
pub type ChangeStream = Pin<Box<dyn Stream<Item = Result<CatalogChange, Status>> + Send + 'static>>;

struct FeedState {
    catalog: Arc<dyn CatalogStore>,
    versions: watch::Receiver<u64>,
    shutdown: watch::Receiver<bool>,
    cursor: u64,
    buffered: VecDeque<CatalogChange>,
    finished: bool,
}

/// A stream of the changes with version `> from_version`, forever (until the client leaves or the
/// directory shuts down). `versions` carries the latest durable version; `shutdown` turns true on shutdown.
pub fn change_stream(
    catalog: Arc<dyn CatalogStore>,
    versions: watch::Receiver<u64>,
    shutdown: watch::Receiver<bool>,
    from_version: u64,
) -> ChangeStream {
    let state =
        FeedState { catalog, versions, shutdown, cursor: from_version, buffered: VecDeque::new(), finished: false };
    Box::pin(futures::stream::unfold(state, |mut s| async move {
        let item = next_change(&mut s).await?;
        Some((item, s))
    }))
}

async fn next_change(s: &mut FeedState) -> Option<Result<CatalogChange, Status>> {
    if s.finished {
        return None;
    }
    let end = |s: &mut FeedState, status: Status| {
        s.finished = true;
        Some(Err(status))
    };
    loop {
        if *s.shutdown.borrow() {
            let cursor = s.cursor;
            return end(
                s,
                Status::unavailable(format!("the directory is shutting down; resume from version {cursor}")),
            );
        }
        if let Some(change) = s.buffered.pop_front() {
            if change.version != s.cursor + 1 {
                let msg = format!("change log gap: expected version {}, found {}", s.cursor + 1, change.version);
                return end(s, DirectoryError::Internal(msg).into());
            }
            s.cursor = change.version;
            return Some(Ok(change));
        }
        // Mark the current version seen *before* reading, so a write landing after the read still wakes us.
        s.versions.borrow_and_update();
        match s.catalog.changes_since(s.cursor, BATCH).await {
            Err(e) => return end(s, DirectoryError::Store(e).into()),
            Ok(changes) if !changes.is_empty() => s.buffered.extend(changes),
            Ok(_) => {
                tokio::select! {
                    changed = s.versions.changed() => {
                        if changed.is_err() {
                            return end(s, DirectoryError::ShuttingDown.into());
                        }
                    }
                    changed = s.shutdown.changed() => {
                        if changed.is_err() {
                            // The server is gone without saying so: end rather than spin on a closed channel.
                            return end(s, DirectoryError::ShuttingDown.into());
                        }
                    }
                }
            }
        }
    }
}
