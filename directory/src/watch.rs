//! The change feeds: `WatchCatalog`, `WatchGrants` and `WatchRevocations` are one implementation, a
//! [`feed`] over a store's change log.
//!
//! The store's change log is the only source of changes; nothing is queued per watcher. A watcher keeps a
//! cursor (the last version it passed) and repeatedly reads `changes_since(cursor, BATCH)`, up to the
//! version announced on a `tokio::sync::watch<u64>` ([`LatestVersion`]) — the version this replica has
//! applied (`crate::follow`) — and when it has caught up it sleeps on that announcement. Because the watcher marks the current watch value as seen *before* reading the store, a
//! write that lands between the read and the sleep still wakes it, so no change is missed; because it only
//! ever asks for versions above its cursor and checks that they follow on without a gap, none is repeated
//! or skipped.
//!
//! A feed may show a watcher only some changes (`keep`: the grants of its own department). The cursor and
//! the gap check run over the full log, before the filter, so a filtered feed is exactly as gap-free as an
//! unfiltered one.
//!
//! Back-pressure: the stream is pulled by the connection (HTTP/2 flow control), so a slow client holds at
//! most one batch in memory and never blocks writers. On shutdown the stream ends with `UNAVAILABLE` so
//! clients reconnect and resume from the last version they saw.

use std::collections::VecDeque;
use std::future::Future;
use std::pin::Pin;

use exchange_proto::v1::{CatalogChange, GrantChange, Revocation};
use futures::Stream;
use tokio::sync::watch;
use tonic::Status;

use crate::error::DirectoryError;
use crate::store::StoreError;

/// Changes read from the store per round trip.
pub const BATCH: usize = 1000;

/// A server stream of changes.
pub type Feed<T> = Pin<Box<dyn Stream<Item = Result<T, Status>> + Send + 'static>>;

/// The stream type of `WatchCatalog`.
pub type ChangeStream = Feed<CatalogChange>;

/// A change-log record: its position in the log.
pub trait Versioned {
    fn version(&self) -> u64;
}

impl Versioned for CatalogChange {
    fn version(&self) -> u64 {
        self.version
    }
}

impl Versioned for GrantChange {
    fn version(&self) -> u64 {
        self.version
    }
}

impl Versioned for Revocation {
    fn version(&self) -> u64 {
        self.version
    }
}

/// The latest durable version of one change log: writers [`advance`](Self::advance) it after each durable
/// write, feeds sleep on a [`subscribe`](Self::subscribe)d receiver.
#[derive(Debug)]
pub struct LatestVersion(watch::Sender<u64>);

impl LatestVersion {
    /// `current`: the log's version at start.
    pub fn new(current: u64) -> Self {
        LatestVersion(watch::channel(current).0)
    }

    /// Announces `version` (wakes the feeds if it is newer than what they were told).
    pub fn advance(&self, version: u64) {
        self.0.send_if_modified(|v| {
            if version > *v {
                *v = version;
                true
            } else {
                false
            }
        });
    }

    /// The version announced last.
    pub fn current(&self) -> u64 {
        *self.0.borrow()
    }

    pub fn subscribe(&self) -> watch::Receiver<u64> {
        self.0.subscribe()
    }
}

struct FeedState<T, R, K> {
    read: R,
    keep: K,
    versions: watch::Receiver<u64>,
    shutdown: watch::Receiver<bool>,
    cursor: u64,
    buffered: VecDeque<T>,
    finished: bool,
}

/// A stream of the changes with version `> from_version` for which `keep` is true, in version order,
/// forever (until the client leaves or the directory shuts down).
///
/// `read(after, limit)` reads up to `limit` changes with version `> after` from the log, in version order
/// (a store's `changes_since`); `versions` carries the log's latest durable version; `shutdown` turns true
/// on shutdown.
pub fn feed<T, R, Fut, K>(
    read: R,
    keep: K,
    versions: watch::Receiver<u64>,
    shutdown: watch::Receiver<bool>,
    from_version: u64,
) -> Feed<T>
where
    T: Versioned + Send + 'static,
    R: Fn(u64, usize) -> Fut + Send + Sync + 'static,
    Fut: Future<Output = Result<Vec<T>, StoreError>> + Send + 'static,
    K: Fn(&T) -> bool + Send + Sync + 'static,
{
    let state =
        FeedState { read, keep, versions, shutdown, cursor: from_version, buffered: VecDeque::new(), finished: false };
    Box::pin(futures::stream::unfold(state, |mut s| async move {
        let item = next_change(&mut s).await?;
        Some((item, s))
    }))
}

async fn next_change<T, R, Fut, K>(s: &mut FeedState<T, R, K>) -> Option<Result<T, Status>>
where
    T: Versioned,
    R: Fn(u64, usize) -> Fut,
    Fut: Future<Output = Result<Vec<T>, StoreError>>,
    K: Fn(&T) -> bool,
{
    if s.finished {
        return None;
    }
    loop {
        if *s.shutdown.borrow() {
            let cursor = s.cursor;
            return s.end(Status::unavailable(format!("the directory is shutting down; resume from version {cursor}")));
        }
        if let Some(change) = s.buffered.pop_front() {
            let version = change.version();
            if version != s.cursor + 1 {
                let msg = format!("change log gap: expected version {}, found {version}", s.cursor + 1);
                return s.end(DirectoryError::Internal(msg).into());
            }
            s.cursor = version;
            if (s.keep)(&change) {
                return Some(Ok(change));
            }
            continue;
        }
        // Mark the current version seen *before* reading, so a write landing after the read still wakes us.
        // Only what was announced is passed on: the log may already hold later versions that this
        // replica has not applied (indexed) yet, and a watcher must be able to find what it saw.
        let announced = *s.versions.borrow_and_update();
        let read = if s.cursor < announced { (s.read)(s.cursor, BATCH).await } else { Ok(Vec::new()) };
        match read {
            Err(e) => return s.end(DirectoryError::Store(e).into()),
            Ok(changes) if changes.first().is_some_and(|c| c.version() <= announced) => {
                s.buffered.extend(changes.into_iter().take_while(|c| c.version() <= announced))
            }
            Ok(_) => {
                tokio::select! {
                    changed = s.versions.changed() => {
                        if changed.is_err() {
                            return s.end(DirectoryError::ShuttingDown.into());
                        }
                    }
                    changed = s.shutdown.changed() => {
                        if changed.is_err() {
                            // The server is gone without saying so: end rather than spin on a closed channel.
                            return s.end(DirectoryError::ShuttingDown.into());
                        }
                    }
                }
            }
        }
    }
}

impl<T, R, K> FeedState<T, R, K> {
    /// Ends the stream with `status` (the next poll returns `None`).
    fn end(&mut self, status: Status) -> Option<Result<T, Status>> {
        self.finished = true;
        Some(Err(status))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use futures::StreamExt;
    use std::sync::{Arc, Mutex};
    use std::time::Duration;

    #[derive(Clone, Debug, PartialEq)]
    struct Change(u64, &'static str);
    impl Versioned for Change {
        fn version(&self) -> u64 {
            self.0
        }
    }

    type Log = Arc<Mutex<Vec<Change>>>;

    fn reader(log: Log) -> impl Fn(u64, usize) -> futures::future::Ready<Result<Vec<Change>, StoreError>> {
        move |after, limit| {
            let all = log.lock().unwrap();
            futures::future::ready(Ok(all.iter().filter(|c| c.0 > after).take(limit).cloned().collect()))
        }
    }

    async fn next(f: &mut Feed<Change>) -> Result<Change, Status> {
        tokio::time::timeout(Duration::from_secs(5), f.next()).await.expect("item within 5 s").expect("open")
    }

    #[tokio::test]
    async fn filtered_feed_replays_follows_live_and_ends_on_shutdown() {
        let log: Log = Arc::new(Mutex::new(vec![Change(1, "a"), Change(2, "b"), Change(3, "a")]));
        let latest = LatestVersion::new(3);
        let (stop, stopped) = watch::channel(false);
        let mut f = feed(reader(log.clone()), |c: &Change| c.1 == "a", latest.subscribe(), stopped, 0);
        assert_eq!(next(&mut f).await.unwrap(), Change(1, "a"));
        assert_eq!(next(&mut f).await.unwrap(), Change(3, "a"));
        // live: a filtered-out change advances the cursor silently
        log.lock().unwrap().extend([Change(4, "b"), Change(5, "a")]);
        latest.advance(5);
        assert_eq!(next(&mut f).await.unwrap(), Change(5, "a"));
        stop.send(true).unwrap();
        let status = next(&mut f).await.unwrap_err();
        assert_eq!(status.code(), tonic::Code::Unavailable);
        assert!(status.message().contains("resume from version 5"), "{}", status.message());
        assert!(f.next().await.is_none());
    }

    #[tokio::test]
    async fn a_change_in_the_log_is_passed_on_only_once_announced() {
        // Version 3 is durable in the log but not yet applied (announced) on this replica.
        let log: Log = Arc::new(Mutex::new(vec![Change(1, "a"), Change(2, "a"), Change(3, "a")]));
        let latest = LatestVersion::new(2);
        let (_stop, stopped) = watch::channel(false);
        let mut f = feed(reader(log), |_: &Change| true, latest.subscribe(), stopped, 0);
        assert_eq!(next(&mut f).await.unwrap(), Change(1, "a"));
        assert_eq!(next(&mut f).await.unwrap(), Change(2, "a"));
        assert!(tokio::time::timeout(Duration::from_millis(200), f.next()).await.is_err(), "3 is not announced yet");
        latest.advance(3);
        assert_eq!(next(&mut f).await.unwrap(), Change(3, "a"));
    }

    #[tokio::test]
    async fn a_gap_in_the_log_ends_the_feed_even_where_filtered_out() {
        let log: Log = Arc::new(Mutex::new(vec![Change(1, "a"), Change(3, "b")]));
        let latest = LatestVersion::new(3);
        let (_stop, stopped) = watch::channel(false);
        let mut f = feed(reader(log), |c: &Change| c.1 == "a", latest.subscribe(), stopped, 0);
        assert_eq!(next(&mut f).await.unwrap(), Change(1, "a"));
        assert_eq!(next(&mut f).await.unwrap_err().code(), tonic::Code::Internal);
        assert!(f.next().await.is_none());
    }
}
