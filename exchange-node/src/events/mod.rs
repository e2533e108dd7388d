//! Push subscriptions and bulk sync: durable store-and-forward delivery of record changes between
//! departments. The design and its guarantees are written up in `docs/EVENTS.md`.
//!
//! # Layout
//! - [`Events`]: both sides on one node, and the application-facing calls (`PublishEvents`,
//!   `Subscribe`, `ReceiveEvents`, `AckEvents`, `SyncSnapshot`, ...).
//! - [`outbox`]: provider side: the subscription table and per-subscriber cursors. The events are the
//!   resource's change log in the record store, written in the same atomic batch as the records.
//! - [`deliver`]: provider side of `Relay`: `Subscribe`, `StreamEvents` (push with a window of
//!   unacknowledged events), `FetchSnapshot`.
//! - [`inbox`]: consumer side: subscriptions and their inboxes (on disk), duplicates dropped by seq.
//! - [`receive`]: consumer side: one task per subscription keeps a `StreamEvents` stream open to the
//!   provider (reconnecting with backoff), appends to the inbox, acknowledges; the application stream.
//!
//! # Guarantees
//! - Every write to a provider's record store is an event with a per-resource seq, in the same atomic,
//!   flushed write as the record: no change without its event, and no event without its change.
//! - The provider keeps events until every active subscriber's node acknowledged them; a consumer node
//!   acknowledges only what is flushed to its inbox. Re-sent events (after a lost acknowledgement or a
//!   crash) are dropped by seq. So every event reaches the inbox exactly once, in seq order (which is
//!   also per-key order).
//! - The application reads the inbox by seq and acknowledges; resuming after the last seq it processed
//!   gives it every event exactly once across crashes of either node.

pub mod deliver;
pub mod inbox;
pub mod outbox;
pub mod receive;

use client_sdk::client::DirectoryChannel;
use std::collections::HashMap;
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use client_sdk::identity::PeerIdentity;
use exchange_proto::limits::MAX_BATCH_RECORDS;
use exchange_proto::v1::directory_client::DirectoryClient;
use exchange_proto::v1::*;
use futures::Stream;
use tokio::sync::watch;
use tokio::task::JoinHandle;
use tonic::Status;

use crate::consumer::Consumer;
use crate::error::{NodeError, Violation};
use crate::records::{validate_batch, Applied};
use crate::relay::Exchange;
use crate::state::now_unix_ms;

pub use self::inbox::Inbox;
pub use self::outbox::Outbox;

pub type EventStream<T> = Pin<Box<dyn Stream<Item = Result<T, Status>> + Send + 'static>>;

/// Delivery settings.
#[derive(Clone, Debug)]
pub struct EventSettings {
    /// Events per delivery message (provider → consumer) and per application message.
    pub batch_events: usize,
    /// Most events sent and not yet acknowledged on one stream.
    pub window_events: usize,
    /// Records per snapshot page.
    pub snapshot_page_records: usize,
    /// Longest wait between reconnection attempts.
    pub max_backoff: Duration,
    pub call_timeout: Duration,
}

impl Default for EventSettings {
    fn default() -> Self {
        EventSettings {
            batch_events: 1000,
            window_events: 16_000,
            snapshot_page_records: 2000,
            max_backoff: Duration::from_secs(5),
            call_timeout: Duration::from_secs(10),
        }
    }
}

/// Both sides of event delivery on one node.
pub struct Events {
    pub(crate) x: Arc<Exchange>,
    pub(crate) consumer: Arc<Consumer>,
    pub(crate) directory: DirectoryClient<DirectoryChannel>,
    pub(crate) outbox: Outbox,
    pub(crate) inbox: Inbox,
    pub(crate) settings: EventSettings,
    pub(crate) shutdown: watch::Receiver<bool>,
    /// Consumer side: resource → the inbox's high-water mark, so application streams wake.
    received: Mutex<HashMap<String, watch::Sender<u64>>>,
    /// Consumer side: the delivery task of each active subscription.
    tasks: Mutex<HashMap<String, JoinHandle<()>>>,
    /// Consumer side: connection state and last error of each subscription's stream.
    consumer_live: Mutex<HashMap<String, outbox::Live>>,
    /// Provider side: when old batch ids of each resource were last pruned.
    pruned: Mutex<HashMap<String, std::time::Instant>>,
}

/// How long a batch id is remembered (a retry after longer applies the batch again).
pub const BATCH_ID_RETENTION: Duration = Duration::from_secs(7 * 24 * 3600);

/// A resource code as the event calls take it (the catalog checks its form; this bounds what is looked up).
pub(crate) fn check_code(code: &str) -> Result<(), NodeError> {
    if code.is_empty() || code.len() > 64 || code.chars().any(char::is_control) {
        return Err(NodeError::invalid("resource_code", "required: a catalog resource code (at most 64 characters)"));
    }
    Ok(())
}

/// A blocking store call off the async threads.
pub(crate) async fn blocking<T: Send + 'static>(
    f: impl FnOnce() -> Result<T, NodeError> + Send + 'static,
) -> Result<T, NodeError> {
    tokio::task::spawn_blocking(f).await.map_err(|e| NodeError::Store(format!("store task: {e}")))?
}

/// `records[2].items[x]` (the shape validate_batch reports) as `changes[2].record.items[x]`.
fn change_field(field: String) -> String {
    match field.strip_prefix("records[").and_then(|rest| rest.split_once(']')) {
        Some((i, rest)) => format!("changes[{i}].record{rest}"),
        None if field == "records" => "changes".to_string(),
        None => field,
    }
}

impl Events {
    pub fn new(
        x: Arc<Exchange>,
        consumer: Arc<Consumer>,
        directory: DirectoryClient<DirectoryChannel>,
        db: &sled::Db,
        settings: EventSettings,
        shutdown: watch::Receiver<bool>,
    ) -> Result<Arc<Self>, NodeError> {
        Ok(Arc::new(Events {
            x,
            consumer,
            directory,
            outbox: Outbox::open(db)?,
            inbox: Inbox::open(db)?,
            settings,
            shutdown,
            received: Mutex::default(),
            tasks: Mutex::default(),
            consumer_live: Mutex::default(),
            pruned: Mutex::default(),
        }))
    }

    /// Starts the delivery task of every active subscription of this node (consumer side).
    pub fn start(self: &Arc<Self>) -> Result<(), NodeError> {
        for sub in self.inbox.all()? {
            if sub.active {
                self.spawn_receiver(&sub.resource_code);
            }
        }
        Ok(())
    }

    /// Waits for the delivery tasks to end (after shutdown was signalled).
    pub async fn stopped(&self) {
        let tasks: Vec<JoinHandle<()>> = self.tasks.lock().expect("event tasks").drain().map(|(_, t)| t).collect();
        for t in tasks {
            let _ = t.await;
        }
    }

    /// Relaying and delivering stop when the node's copy of the directory's rules is too old.
    pub(crate) fn fresh(&self) -> Result<(), NodeError> {
        self.x.policy.check_fresh(now_unix_ms())
    }

    // ---- provider side, for this department's applications ----

    /// `PublishEvents` (and `PutRecords`): validate, apply with the change log, wake the streams.
    pub async fn publish(
        &self,
        app: &PeerIdentity,
        req: PublishEventsRequest,
        action: &str,
    ) -> Result<PublishEventsResponse, NodeError> {
        let put = action == "PutRecords";
        let rename = |f: String| if put { f } else { change_field(f) };
        if req.resource_code.is_empty() {
            return Err(NodeError::invalid("resource_code", "required"));
        }
        if !req.batch_id.is_empty()
            && (req.batch_id.len() > 64
                || !req.batch_id.chars().all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.' | ':')))
        {
            return Err(NodeError::invalid("batch_id", "1 to 64 characters: letters, digits, - _ . :"));
        }
        if req.changes.len() > MAX_BATCH_RECORDS {
            return Err(NodeError::invalid(
                rename("records".into()),
                format!("at most {MAX_BATCH_RECORDS} per batch, got {}; split the batch", req.changes.len()),
            ));
        }
        let x = &self.x;
        let entry = x.own_entry(&req.resource_code, &self.directory).await?;
        if entry.withdrawn {
            return Err(NodeError::FailedPrecondition(format!(
                "resource {} has been withdrawn; publish it again before loading records",
                req.resource_code
            )));
        }
        let mut kinds = Vec::with_capacity(req.changes.len());
        let mut bad_kinds = Vec::new();
        let mut records = Vec::with_capacity(req.changes.len());
        for (i, change) in req.changes.into_iter().enumerate() {
            match RecordChangeKind::try_from(change.kind) {
                Ok(k) => kinds.push(k),
                Err(_) => bad_kinds.push(Violation::new(
                    format!("changes[{i}].kind"),
                    format!("unknown change kind {}: CREATED, UPDATED or DEREGISTERED (or unspecified)", change.kind),
                )),
            }
            records.push(change.record.unwrap_or_default());
        }
        let today = time::OffsetDateTime::now_utc().date();
        let count = records.len();
        let validated = validate_batch(&entry, records, today);
        let records = match (validated, bad_kinds.is_empty()) {
            (Ok(records), true) => records,
            (result, _) => {
                let mut violations: Vec<Violation> = result
                    .err()
                    .unwrap_or_default()
                    .into_iter()
                    .map(|v| Violation::new(rename(v.field), v.description))
                    .collect();
                violations.extend(bad_kinds);
                tracing::info!(caller = %app, resource = %req.resource_code, records = count, violations = violations.len(), "record batch refused");
                return Err(NodeError::InvalidArgument(violations));
            }
        };
        let store = x.records.clone();
        let code = req.resource_code.clone();
        let changes: Vec<_> = records.into_iter().zip(kinds).collect();
        let batch_id = req.batch_id.clone();
        let applied = blocking(move || {
            let applied = if batch_id.is_empty() {
                store.apply_changes(&code, changes).map(|(first_seq, last_seq)| Applied { first_seq, last_seq, duplicate: false })
            } else {
                store.apply_changes_once(&code, &batch_id, changes)
            };
            applied.map_err(|e| NodeError::Store(e.to_string()))
        })
        .await?;
        let Applied { first_seq, last_seq, duplicate } = applied;
        if duplicate {
            tracing::info!(caller = %app, resource = %req.resource_code, batch_id = %req.batch_id, first_seq, last_seq, "batch applied before; not applied again");
        } else {
            self.outbox.notify_head(&req.resource_code, last_seq);
            self.trim_outbox(&req.resource_code);
            self.prune_batch_ids(&req.resource_code);
            tracing::info!(caller = %app, resource = %req.resource_code, records = count, first_seq, last_seq, "records stored");
        }
        Ok(PublishEventsResponse { first_seq, last_seq, duplicate })
    }

    /// Forgets batch ids older than [`BATCH_ID_RETENTION`], at most once an hour per resource.
    fn prune_batch_ids(&self, resource_code: &str) {
        {
            let mut pruned = self.pruned.lock().expect("prune times");
            let now = std::time::Instant::now();
            match pruned.get(resource_code) {
                Some(at) if now.duration_since(*at) < Duration::from_secs(3600) => return,
                _ => {
                    pruned.insert(resource_code.to_string(), now);
                }
            }
        }
        let before = now_unix_ms() - BATCH_ID_RETENTION.as_millis() as i64;
        if let Err(e) = self.x.records.prune_batch_ids(resource_code, before) {
            tracing::warn!(resource = %resource_code, error = %e, "could not prune old batch ids");
        }
    }

    /// Drops the change log's events every active subscriber has acknowledged (all of it when there is
    /// no subscriber: a new subscription starts at the head, and a snapshot reads the records).
    pub(crate) fn trim_outbox(&self, resource_code: &str) {
        // The head before the subscriptions: a subscription made after this read starts at or after it,
        // so trimming up to it never drops an event a subscriber still needs.
        let trimmed = (|| -> Result<u64, NodeError> {
            let head = self.x.records.head_seq(resource_code).map_err(|e| NodeError::Store(e.to_string()))?;
            let upto = self.outbox.low_water(resource_code)?.map_or(head, |low| low.min(head));
            self.x.records.trim_events(resource_code, upto).map_err(|e| NodeError::Store(e.to_string()))
        })();
        if let Err(e) = trimmed {
            tracing::warn!(resource = %resource_code, error = %e, "outbox: could not trim the change log");
        }
    }

    /// `ListSubscriptions`: both sides, with positions and backlog.
    pub fn list(&self) -> Result<ListSubscriptionsResponse, NodeError> {
        let mut as_consumer = self.inbox.all()?;
        for s in &mut as_consumer {
            s.backlog = s.received_upto_seq.saturating_sub(s.acked_upto_seq);
            let live = self.consumer_live(&s.resource_code);
            s.connected = live.connected;
            s.last_error = live.last_error;
        }
        let mut as_provider = self.outbox.all()?;
        for s in &mut as_provider {
            s.head_seq = self.x.records.head_seq(&s.resource_code).unwrap_or(0);
            s.backlog = if s.active { s.head_seq.saturating_sub(s.received_upto_seq) } else { 0 };
            let live = self.outbox.live(&s.consumer_code, &s.resource_code);
            s.connected = live.connected;
            s.last_error = live.last_error;
            s.last_delivery_unix_ms = s.last_delivery_unix_ms.max(live.last_delivery_unix_ms);
        }
        Ok(ListSubscriptionsResponse { as_consumer, as_provider })
    }

    /// For `NodeStatus`: (subscriptions as provider, as consumer, outbox backlog, inbox backlog).
    pub fn status_counts(&self) -> (u64, u64, u64, u64) {
        match self.list() {
            Ok(l) => {
                let active_p: Vec<_> = l.as_provider.iter().filter(|s| s.active).collect();
                let active_c: Vec<_> = l.as_consumer.iter().filter(|s| s.active).collect();
                (
                    active_p.len() as u64,
                    active_c.len() as u64,
                    active_p.iter().map(|s| s.backlog).sum(),
                    l.as_consumer.iter().map(|s| s.backlog).sum(),
                )
            }
            Err(_) => (0, 0, 0, 0),
        }
    }

    pub(crate) fn consumer_live(&self, resource_code: &str) -> outbox::Live {
        self.consumer_live.lock().expect("consumer live").get(resource_code).cloned().unwrap_or_default()
    }

    pub(crate) fn update_consumer_live(&self, resource_code: &str, f: impl FnOnce(&mut outbox::Live)) {
        f(self.consumer_live.lock().expect("consumer live").entry(resource_code.to_string()).or_default());
    }

    /// Follows the inbox's high-water mark of a resource.
    pub(crate) fn received_watch(&self, resource_code: &str, current: u64) -> watch::Receiver<u64> {
        self.received
            .lock()
            .expect("received watches")
            .entry(resource_code.to_string())
            .or_insert_with(|| watch::channel(current).0)
            .subscribe()
    }

    /// Wakes the application streams of a resource (new events, or the subscription ended).
    pub(crate) fn notify_received(&self, resource_code: &str, hwm: u64) {
        if let Some(tx) = self.received.lock().expect("received watches").get(resource_code) {
            tx.send_modify(|h| *h = (*h).max(hwm));
        }
    }
}
