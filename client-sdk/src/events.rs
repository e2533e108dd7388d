//! Push subscriptions and bulk sync, as an application uses them: publish changes of your department's
//! records, subscribe to another department's changes, read them exactly once with
//! [`EventSubscription`], copy a whole resource with [`SnapshotReader`], and keep a local copy exact with
//! [`Replica`].
//!
//! # How the pieces fit
//! The provider's node gives every change of a resource a seq (from 1, without gaps, per resource); a
//! record carries the seq of its last change as its `version`. The consumer's node keeps the
//! subscription's events in its inbox (on disk) until the application acknowledges them.
//!
//! To build a replica of another department's resource:
//! 1. [`ExchangeClient::subscribe`] first: from then on every change is kept for you.
//! 2. Copy the records with [`ExchangeClient::sync_snapshot`] (or [`SnapshotReader`]) into a [`Replica`]
//!    ([`Replica::apply_snapshot_page`]).
//! 3. Apply the events from [`EventSubscription::next_batch`] with [`Replica::apply_event`]: an event is
//!    applied to a key only if its seq is greater than the version held, so the events that the snapshot
//!    already contains are ignored and none is applied twice.
//!
//! ```no_run
//! # async fn demo(client: client_sdk::records::ExchangeClient) -> Result<(), client_sdk::error::ClientError> {
//! use client_sdk::events::Replica;
//! let resource = "101001/000001";
//! client.subscribe(resource).await?;
//! let mut replica = Replica::new();
//! let mut snapshot = client.snapshot_reader(resource, "", "企业信息同步");
//! while let Some(page) = snapshot.next_page().await? {
//!     replica.apply_snapshot_page(&page);
//! }
//! let mut events = client.event_subscription(resource);
//! while let Some(batch) = events.next_batch().await? {
//!     for event in &batch {
//!         replica.apply_event(event);
//!     }
//!     // The batch is acknowledged when the next one is asked for (AckMode::OnNextBatch).
//! }
//! println!("subscription ended: {}", events.ended_reason().unwrap_or_default());
//! # Ok(()) }
//! ```
//!
//! # Acknowledgement
//! [`EventSubscription`] acknowledges a batch when the application asks for the next one
//! ([`AckMode::OnNextBatch`], the default): asking for more says the previous batch was processed. A
//! process that stops while processing a batch therefore sees that batch again when it starts over from
//! the node's position (at least once). For exactly once across restarts, keep the last seq you processed
//! together with your own data and start with [`ExchangeClient::resume_subscription`] from it.
//! [`AckMode::Manual`] leaves acknowledging to [`EventSubscription::ack`] / [`EventSubscription::ack_upto`].

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use exchange_proto::v1::{
    AckEventsRequest, ListSubscriptionsRequest, PublishEventsRequest, ReceiveEventsRequest, ReceivedEvents,
    SubscribeRequest, SyncSnapshotRequest, UnsubscribeRequest,
};
pub use exchange_proto::v1::{
    ListSubscriptionsResponse, Record, RecordChange, RecordChangeKind, RecordEvent, SnapshotPage, SubscribeResponse,
    Subscription,
};
use futures::Stream;
use prost::Message as _;
use sha2::{Digest, Sha256};
use tonic::{Code, Status, Streaming};

use crate::catalog::EnumWords;
use crate::error::{ClientError, FieldViolation};
use crate::records::{check_not_empty, ok_or_invalid, shift_indexes, size_batches, violation, ExchangeClient};

/// Change kind words, as files and `exchangectl events publish --kind` write them.
pub const CHANGE_KINDS: EnumWords<RecordChangeKind> = EnumWords {
    field: "kind",
    words: &[
        ("created", RecordChangeKind::Created),
        ("updated", RecordChangeKind::Updated),
        ("deregistered", RecordChangeKind::Deregistered),
    ],
};

/// What a publish was acknowledged with: the seqs the changes became (consecutive within a batch).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Published {
    pub changes: u64,
    /// 0 when nothing was published.
    pub first_seq: u64,
    pub last_seq: u64,
    /// Batches the node had applied already (a retry after a lost answer): not applied again.
    pub duplicate_batches: u32,
}

/// Attempts of one publish batch when the node cannot be reached or the answer is lost; every attempt
/// carries the same `batch_id`, so the node applies the batch at most once.
pub const PUBLISH_ATTEMPTS: u32 = 3;

/// A batch id unique to this process and call: `sdk-<time>-<pid>-<counter>:<batch>` (the node accepts 1 to
/// 64 letters, digits, `-_.:`).
fn batch_id_prefix() -> String {
    use std::sync::atomic::{AtomicU64, Ordering};
    static COUNTER: AtomicU64 = AtomicU64::new(0);
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_nanos() as u64)
        .unwrap_or(0);
    format!("sdk-{nanos:x}-{:x}-{}", std::process::id(), COUNTER.fetch_add(1, Ordering::Relaxed))
}

// ---- retrying ----

/// Whether a failed call or stream is worth repeating: the node could not be reached, the connection broke
/// (tonic reports a broken HTTP/2 connection as UNKNOWN, CANCELLED or INTERNAL "h2 protocol error"), a
/// deadline passed, or a quota asks to wait.
pub fn is_transient(status: &Status) -> bool {
    match status.code() {
        Code::Unavailable
        | Code::Unknown
        | Code::Cancelled
        | Code::DeadlineExceeded
        | Code::Aborted
        | Code::ResourceExhausted => true,
        Code::Internal => {
            std::error::Error::source(status).is_some() || status.message().starts_with("h2 protocol error")
        }
        _ => false,
    }
}

/// [`is_transient`] for an error already decoded.
pub fn is_transient_error(error: &ClientError) -> bool {
    matches!(
        error.code(),
        Code::Unavailable | Code::Unknown | Code::Cancelled | Code::DeadlineExceeded | Code::Aborted | Code::ResourceExhausted
    )
}

/// Capped exponential backoff: `start`, `2·start`, `4·start`... up to `max`.
#[derive(Clone, Debug)]
pub struct Backoff {
    start: Duration,
    max: Duration,
    next: Duration,
}

impl Backoff {
    pub fn new(start: Duration, max: Duration) -> Self {
        let start = start.max(Duration::from_millis(1));
        let max = max.max(start);
        Backoff { start, max, next: start }
    }

    /// The wait before the next attempt; each call doubles the following one, up to the cap.
    pub fn next_wait(&mut self) -> Duration {
        let wait = self.next;
        self.next = (self.next * 2).min(self.max);
        wait
    }

    /// After a success: the next failure waits `start` again.
    pub fn reset(&mut self) {
        self.next = self.start;
    }

    pub fn max(&self) -> Duration {
        self.max
    }
}

/// The wait after `status`: the server's RetryInfo for a quota, else the backoff's next step.
fn wait_after(status: &Status, backoff: &mut Backoff) -> Duration {
    let step = backoff.next_wait();
    match ClientError::from(status.clone()) {
        ClientError::ResourceExhausted { retry_after: Some(d), .. } => d.max(step),
        _ => step,
    }
}

// ---- the client calls ----

impl ExchangeClient {
    /// Applies changes to records of a resource this department publishes and sends them to every
    /// subscriber (role app or operator of the node's department). Each call is all or nothing and durable
    /// before it is acknowledged; large lists are sent in several calls (as [`ExchangeClient::put_records`]),
    /// field violations are numbered by position in `changes` (`changes[3].record.items[住所]`).
    ///
    /// Each batch carries a `batch_id`, and a batch whose call failed in a way worth retrying (node
    /// unreachable, answer lost) is sent again with the same id, up to [`PUBLISH_ATTEMPTS`] times: the
    /// node applies it at most once.
    pub async fn publish(&self, resource: &str, changes: Vec<RecordChange>) -> Result<Published, ClientError> {
        self.publish_with_progress(resource, changes, |_| {}).await
    }

    /// Publishes `records` as changes of one kind ([`RecordChangeKind::Unspecified`]: created if the key is
    /// new, updated otherwise).
    pub async fn publish_records(
        &self,
        resource: &str,
        records: Vec<Record>,
        kind: RecordChangeKind,
    ) -> Result<Published, ClientError> {
        let changes = records.into_iter().map(|r| RecordChange { record: Some(r), kind: kind as i32 }).collect();
        self.publish(resource, changes).await
    }

    /// As [`ExchangeClient::publish`], calling `progress` with the size of each acknowledged batch.
    pub async fn publish_with_progress(
        &self,
        resource: &str,
        changes: Vec<RecordChange>,
        mut progress: impl FnMut(usize),
    ) -> Result<Published, ClientError> {
        let mut violations: Vec<FieldViolation> =
            check_not_empty("resource_code", resource, "a resource code").into_iter().collect();
        for (i, c) in changes.iter().enumerate() {
            match &c.record {
                None => violations.push(violation(format!("changes[{i}].record"), "a record is required")),
                Some(r) => violations.extend(check_not_empty(&format!("changes[{i}].record.key"), &r.key, "a key")),
            }
        }
        ok_or_invalid(violations)?;
        let ranges = size_batches(changes.iter().map(|c| c.encoded_len()));
        let mut rest = changes.into_iter();
        let mut published = Published::default();
        let prefix = batch_id_prefix();
        for (n, range) in ranges.into_iter().enumerate() {
            let batch: Vec<RecordChange> = rest.by_ref().take(range.len()).collect();
            let message = PublishEventsRequest {
                resource_code: resource.to_string(),
                changes: batch,
                batch_id: format!("{prefix}:{n}"),
            };
            let mut backoff = Backoff::new(Duration::from_millis(200), Duration::from_secs(2));
            let mut attempt = 1;
            let result = loop {
                let mut node = self.node();
                match self.unary(node.publish_events(self.request(message.clone()))).await {
                    Err(e) if attempt < PUBLISH_ATTEMPTS && is_transient_error(&e) => {
                        tracing::warn!(resource, batch_id = %message.batch_id, error = %e, "publish failed; sending the batch again");
                        attempt += 1;
                        tokio::time::sleep(backoff.next_wait()).await;
                    }
                    other => break other,
                }
            };
            match result {
                Ok(resp) => {
                    if resp.duplicate {
                        published.duplicate_batches += 1;
                    }
                    if published.first_seq == 0 {
                        published.first_seq = resp.first_seq;
                    }
                    published.last_seq = resp.last_seq;
                    published.changes += range.len() as u64;
                    progress(range.len());
                }
                Err(mut error) => {
                    shift_indexes(&mut error, "changes", range.start);
                    if published.changes > 0 {
                        error.append_note(&format!(
                            " (the first {} changes were published, seq {}-{}, before this batch was refused)",
                            published.changes, published.first_seq, published.last_seq
                        ));
                    }
                    return Err(error);
                }
            }
        }
        Ok(published)
    }

    /// Subscribes this department to another department's resource (role app or operator). Idempotent:
    /// subscribing again keeps the subscription and its position (`existed`). From the answer's
    /// `start_seq` on, the node keeps every change in its inbox, also while no application reads.
    pub async fn subscribe(&self, resource: &str) -> Result<SubscribeResponse, ClientError> {
        ok_or_invalid(check_not_empty("resource_code", resource, "a resource code").into_iter().collect())?;
        let request = self.request(SubscribeRequest { resource_code: resource.to_string() });
        let mut node = self.node();
        self.unary(node.subscribe(request)).await
    }

    /// Ends this department's subscription; false when there was no active one.
    pub async fn unsubscribe(&self, resource: &str) -> Result<bool, ClientError> {
        ok_or_invalid(check_not_empty("resource_code", resource, "a resource code").into_iter().collect())?;
        let request = self.request(UnsubscribeRequest { resource_code: resource.to_string() });
        let mut node = self.node();
        self.unary(node.unsubscribe(request)).await.map(|r| r.existed)
    }

    /// The node's subscriptions, both sides, with positions, backlog and connection state.
    pub async fn list_subscriptions(&self) -> Result<ListSubscriptionsResponse, ClientError> {
        let request = self.request(ListSubscriptionsRequest {});
        let mut node = self.node();
        self.unary(node.list_subscriptions(request)).await
    }

    /// Tells the node that every event of the subscription up to `upto` was processed: it may drop them.
    /// Returns the node's acknowledged position (never lower than before).
    pub async fn ack(&self, resource: &str, upto: u64) -> Result<u64, ClientError> {
        ok_or_invalid(check_not_empty("resource_code", resource, "a resource code").into_iter().collect())?;
        let request = self.request(AckEventsRequest { resource_code: resource.to_string(), upto_seq: upto });
        let mut node = self.node();
        self.unary(node.ack_events(request)).await.map(|r| r.acked_upto_seq)
    }

    /// The raw `ReceiveEvents` stream (events after `after_seq`; 0 = after the node's acknowledged
    /// position). Most applications want [`ExchangeClient::event_subscription`] instead, which resumes and
    /// acknowledges.
    pub async fn receive_events(
        &self,
        resource: &str,
        after_seq: u64,
        max_batch: u32,
    ) -> Result<Streaming<ReceivedEvents>, ClientError> {
        ok_or_invalid(check_not_empty("resource_code", resource, "a resource code").into_iter().collect())?;
        self.open_receive(resource, after_seq, max_batch).await.map_err(ClientError::from)
    }

    /// Opens `ReceiveEvents`. A stream has no deadline (it would end it); the opening is bounded here.
    async fn open_receive(&self, resource: &str, after_seq: u64, max_batch: u32) -> Result<Streaming<ReceivedEvents>, Status> {
        let request = tonic::Request::new(ReceiveEventsRequest { resource_code: resource.to_string(), after_seq, max_batch });
        let mut node = self.node();
        match tokio::time::timeout(self.timeout(), node.receive_events(request)).await {
            Ok(result) => result.map(tonic::Response::into_inner),
            Err(_) => Err(Status::deadline_exceeded(format!(
                "ReceiveEvents: no answer within {:.1}s",
                self.timeout().as_secs_f64()
            ))),
        }
    }

    /// A reader of the subscription's events from the node's acknowledged position, with the default
    /// [`SubscriptionOptions`].
    pub fn event_subscription(&self, resource: &str) -> EventSubscription {
        EventSubscription::new(self.clone(), resource, EventCursor::default(), SubscriptionOptions::default())
    }

    /// A reader of the subscription's events after `after_seq`, the last seq the application processed
    /// (kept with its own data): the way to see every event exactly once across restarts.
    pub fn resume_subscription(&self, resource: &str, after_seq: u64, options: SubscriptionOptions) -> EventSubscription {
        EventSubscription::new(self.clone(), resource, EventCursor::starting_after(after_seq), options)
    }

    /// A resumable reader of every record of a resource, page by page, through the node (role app or
    /// operator; audited on both nodes with `purpose`). `after_key` "" starts at the first key, else after
    /// that key (a previous page's `last_key`).
    pub fn snapshot_reader(&self, resource: &str, after_key: &str, purpose: &str) -> SnapshotReader {
        SnapshotReader::new(self.clone(), resource, after_key, purpose)
    }

    /// The snapshot as a stream of pages (see [`ExchangeClient::snapshot_reader`]); a broken connection is
    /// resumed after the last page received, a few times, before the error ends the stream.
    pub fn sync_snapshot(
        &self,
        resource: &str,
        after_key: &str,
        purpose: &str,
    ) -> impl Stream<Item = Result<SnapshotPage, ClientError>> + Send + 'static {
        self.snapshot_reader(resource, after_key, purpose).into_stream()
    }

    async fn open_snapshot(&self, resource: &str, after_key: &str, purpose: &str) -> Result<Streaming<SnapshotPage>, Status> {
        let request = tonic::Request::new(SyncSnapshotRequest {
            resource_code: resource.to_string(),
            after_key: after_key.to_string(),
            purpose: purpose.to_string(),
        });
        let mut node = self.node();
        match tokio::time::timeout(self.timeout(), node.sync_snapshot(request)).await {
            Ok(result) => result.map(tonic::Response::into_inner),
            Err(_) => Err(Status::deadline_exceeded(format!(
                "SyncSnapshot: no answer within {:.1}s",
                self.timeout().as_secs_f64()
            ))),
        }
    }
}

// ---- reading events ----

/// Where an event reader stands: the last seq handed to the application and the last one acknowledged.
/// Pure arithmetic, kept apart from the network so it is tested on its own.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct EventCursor {
    handed_out: u64,
    acked: u64,
}

/// Events that do not continue the cursor: some were skipped. The node's inbox has no gaps, so this means
/// the subscription was made anew (its earlier events are gone) or a node misbehaves; either way a replica
/// built from the events is no longer exact: resynchronize from a snapshot.
#[derive(Clone, Copy, Debug, PartialEq, Eq, thiserror::Error)]
#[error("events {expected}..{} were skipped: the next event received is seq {got}; resynchronize from a snapshot", .got - 1)]
pub struct SeqGap {
    pub expected: u64,
    pub got: u64,
}

impl EventCursor {
    /// A cursor for an application that has processed every event up to `seq` (0: nothing yet, start from
    /// the node's acknowledged position). That position is acknowledged with the first batch.
    pub fn starting_after(seq: u64) -> Self {
        EventCursor { handed_out: seq, acked: 0 }
    }

    /// The last seq handed out (0: none yet).
    pub fn last_handed_out(&self) -> u64 {
        self.handed_out
    }

    /// The last seq the node confirmed as acknowledged by this reader (0: none).
    pub fn acked(&self) -> u64 {
        self.acked
    }

    /// The `after_seq` of a (re)opened stream: right after the last seq handed out, so nothing is seen
    /// twice and nothing skipped; 0 (nothing handed out yet) lets the node start after its acknowledged
    /// position.
    pub fn resume_after(&self) -> u64 {
        self.handed_out
    }

    /// Takes a message's events: drops the ones already handed out (a re-sent message), checks that the
    /// rest continue the cursor without a gap, and moves the cursor to the last one.
    pub fn accept(&mut self, mut events: Vec<RecordEvent>) -> Result<Vec<RecordEvent>, SeqGap> {
        let after = self.handed_out;
        events.retain(|e| e.seq > after);
        let Some(first) = events.first().map(|e| e.seq) else { return Ok(events) };
        // With nothing handed out yet, the node's acknowledged position (unknown here) is the start.
        let mut expected = if after == 0 { first } else { after + 1 };
        for e in &events {
            if e.seq != expected {
                return Err(SeqGap { expected, got: e.seq });
            }
            expected += 1;
        }
        self.handed_out = expected - 1;
        Ok(events)
    }

    /// The seq to acknowledge now, if anything handed out is not acknowledged yet.
    pub fn to_ack(&self) -> Option<u64> {
        (self.handed_out > self.acked).then_some(self.handed_out)
    }

    /// Whether `upto` may be acknowledged: only what was handed out.
    pub fn can_ack(&self, upto: u64) -> bool {
        upto <= self.handed_out
    }

    /// The node confirmed an acknowledgement up to `upto`.
    pub fn acked_upto(&mut self, upto: u64) {
        self.acked = self.acked.max(upto);
    }
}

/// When [`EventSubscription`] acknowledges.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum AckMode {
    /// A batch is acknowledged when the next one is asked for (the application has processed it), and on
    /// [`EventSubscription::ack`].
    #[default]
    OnNextBatch,
    /// Only [`EventSubscription::ack`] and [`EventSubscription::ack_upto`] acknowledge.
    Manual,
}

#[derive(Clone, Debug)]
pub struct SubscriptionOptions {
    pub ack: AckMode,
    /// Most events per batch (0: the node's default, 1000, which is also its maximum).
    pub max_batch: u32,
    /// First and longest wait between reconnection attempts.
    pub backoff_start: Duration,
    pub backoff_max: Duration,
}

impl Default for SubscriptionOptions {
    fn default() -> Self {
        SubscriptionOptions {
            ack: AckMode::OnNextBatch,
            max_batch: 0,
            backoff_start: Duration::from_millis(100),
            backoff_max: Duration::from_secs(10),
        }
    }
}

/// A resumable, exactly-once reader of a subscription's events (see the module documentation).
///
/// It remembers the last seq it handed out; when the stream breaks (node restarting, network), it
/// reconnects with capped exponential backoff and asks for the events after that seq, so nothing is seen
/// twice and nothing is skipped. Errors that a reconnect cannot fix (no such subscription, a position the
/// node no longer holds, permission) are returned.
///
/// [`EventSubscription::next_batch`] is cancel-safe: it can be raced in `tokio::select!` or put under a
/// timeout without losing or repeating events.
pub struct EventSubscription {
    client: ExchangeClient,
    resource: String,
    options: SubscriptionOptions,
    cursor: EventCursor,
    stream: Option<Streaming<ReceivedEvents>>,
    opened_at: Option<Instant>,
    backoff: Backoff,
    ended: Option<String>,
    reconnects: u64,
    last_error: Option<String>,
}

impl EventSubscription {
    pub fn new(client: ExchangeClient, resource: &str, cursor: EventCursor, options: SubscriptionOptions) -> Self {
        EventSubscription {
            client,
            resource: resource.to_string(),
            backoff: Backoff::new(options.backoff_start, options.backoff_max),
            options,
            cursor,
            stream: None,
            opened_at: None,
            ended: None,
            reconnects: 0,
            last_error: None,
        }
    }

    pub fn resource(&self) -> &str {
        &self.resource
    }

    /// The last seq handed out by [`EventSubscription::next_batch`] (or the starting position).
    pub fn last_seq(&self) -> u64 {
        self.cursor.last_handed_out()
    }

    /// The last seq the node confirmed acknowledged by this reader.
    pub fn acked_seq(&self) -> u64 {
        self.cursor.acked()
    }

    pub fn cursor(&self) -> EventCursor {
        self.cursor
    }

    /// Why the subscription ended (grant revoked, resource withdrawn, unsubscribed), once
    /// [`EventSubscription::next_batch`] returned `None`.
    pub fn ended_reason(&self) -> Option<&str> {
        self.ended.as_deref()
    }

    /// How many times the stream was reopened after a failure.
    pub fn reconnects(&self) -> u64 {
        self.reconnects
    }

    /// The last failure that was retried (a reconnect, an acknowledgement that will be repeated).
    pub fn last_error(&self) -> Option<&str> {
        self.last_error.as_deref()
    }

    pub fn is_connected(&self) -> bool {
        self.stream.is_some()
    }

    /// Opens the stream now, returning the first failure as it is (without retrying): lets a caller fail
    /// fast when the node is unreachable or has no such subscription. Optional; `next_batch` opens it too.
    pub async fn connect(&mut self) -> Result<(), ClientError> {
        if self.stream.is_none() && self.ended.is_none() {
            let stream = self.open().await.map_err(ClientError::from)?;
            self.stream = Some(stream);
        }
        Ok(())
    }

    async fn open(&self) -> Result<Streaming<ReceivedEvents>, Status> {
        if self.resource.trim().is_empty() {
            return Err(Status::invalid_argument("resource_code: a resource code is required"));
        }
        self.client.open_receive(&self.resource, self.cursor.resume_after(), self.options.max_batch).await
    }

    /// The next batch of events (consecutive seqs, oldest first), waiting for one if need be; `None` once
    /// the subscription has ended and every event before the end was handed out
    /// ([`EventSubscription::ended_reason`] says why). With [`AckMode::OnNextBatch`], the previous batch
    /// is acknowledged first.
    pub async fn next_batch(&mut self) -> Result<Option<Vec<RecordEvent>>, ClientError> {
        if self.options.ack == AckMode::OnNextBatch {
            self.ack_pending().await?;
        }
        loop {
            if self.ended.is_some() {
                return Ok(None);
            }
            let failure = match self.stream.as_mut() {
                None => match self.open().await {
                    Ok(stream) => {
                        self.stream = Some(stream);
                        self.opened_at = Some(Instant::now());
                        continue;
                    }
                    Err(status) => status,
                },
                Some(stream) => match stream.message().await {
                    Ok(Some(msg)) => {
                        self.backoff.reset();
                        let events = match self.cursor.accept(msg.events) {
                            Ok(events) => events,
                            Err(gap) => {
                                self.stream = None;
                                return Err(ClientError::Other { code: Code::DataLoss, message: gap.to_string() });
                            }
                        };
                        if !msg.ended_reason.is_empty() {
                            self.ended = Some(msg.ended_reason);
                            self.stream = None;
                        }
                        if events.is_empty() {
                            continue;
                        }
                        return Ok(Some(events));
                    }
                    Ok(None) => Status::unavailable("the node closed the event stream"),
                    Err(status) => status,
                },
            };
            self.stream = None;
            if !is_transient(&failure) {
                return Err(failure.into());
            }
            // A stream that stayed up a while was healthy: start the backoff over.
            if self.opened_at.take().is_some_and(|t| t.elapsed() >= self.backoff.max()) {
                self.backoff.reset();
            }
            let wait = wait_after(&failure, &mut self.backoff);
            let error = ClientError::from(failure);
            tracing::warn!(resource = %self.resource, after_seq = self.cursor.resume_after(), error = %error,
                retry_in_ms = wait.as_millis() as u64, "event stream interrupted; resuming");
            self.last_error = Some(error.to_string());
            self.reconnects += 1;
            tokio::time::sleep(wait).await;
        }
    }

    /// Acknowledges what was handed out and not acknowledged yet; a failure worth retrying is kept for
    /// the next time.
    async fn ack_pending(&mut self) -> Result<(), ClientError> {
        let Some(upto) = self.cursor.to_ack() else { return Ok(()) };
        match self.client.ack(&self.resource, upto).await {
            Ok(_) => {
                self.cursor.acked_upto(upto);
                Ok(())
            }
            Err(e) if is_transient_error(&e) => {
                tracing::warn!(resource = %self.resource, upto, error = %e, "acknowledgement failed; will repeat it");
                self.last_error = Some(e.to_string());
                Ok(())
            }
            Err(e) => Err(e),
        }
    }

    /// Acknowledges every event handed out so far; returns the node's acknowledged position.
    pub async fn ack(&mut self) -> Result<u64, ClientError> {
        let upto = self.cursor.last_handed_out();
        self.ack_upto(upto).await
    }

    /// Acknowledges the events up to `upto`, which must have been handed out.
    pub async fn ack_upto(&mut self, upto: u64) -> Result<u64, ClientError> {
        if !self.cursor.can_ack(upto) {
            return Err(ClientError::InvalidArgument {
                message: format!(
                    "cannot acknowledge up to seq {upto}: only events up to {} were handed out (nothing was sent)",
                    self.cursor.last_handed_out()
                ),
                violations: vec![violation("upto_seq", "beyond the last event handed out")],
            });
        }
        if upto == 0 {
            return Ok(self.cursor.acked());
        }
        let acked = self.client.ack(&self.resource, upto).await?;
        self.cursor.acked_upto(upto);
        Ok(acked)
    }
}

// ---- bulk sync ----

/// Consecutive failures of a snapshot stream that are retried before the error is returned.
pub const SNAPSHOT_RETRIES: u32 = 5;

/// Every record of a resource, page by page, through the node, resumable: it remembers the last key
/// received and, when the stream breaks after the first page, opens a new one after that key (up to
/// [`SNAPSHOT_RETRIES`] times in a row, with backoff). A failure before the first page (node unreachable,
/// no access) is returned at once. A process that stops can start a new reader with `after_key` =
/// [`SnapshotReader::after_key`].
///
/// The totals are those of the first page of the first stream: the resource's record count and latest
/// change seq when the snapshot started.
pub struct SnapshotReader {
    client: ExchangeClient,
    resource: String,
    purpose: String,
    after_key: String,
    stream: Option<Streaming<SnapshotPage>>,
    first_page: bool,
    total_records: Option<u64>,
    head_seq: Option<u64>,
    data_items: Vec<String>,
    masked_items: Vec<String>,
    records_read: u64,
    done: bool,
    failures: u32,
    backoff: Backoff,
    max_retries: u32,
}

impl SnapshotReader {
    pub fn new(client: ExchangeClient, resource: &str, after_key: &str, purpose: &str) -> Self {
        SnapshotReader {
            client,
            resource: resource.to_string(),
            purpose: purpose.to_string(),
            after_key: after_key.to_string(),
            stream: None,
            first_page: true,
            total_records: None,
            head_seq: None,
            data_items: Vec::new(),
            masked_items: Vec::new(),
            records_read: 0,
            done: false,
            failures: 0,
            backoff: Backoff::new(Duration::from_millis(500), Duration::from_secs(10)),
            max_retries: SNAPSHOT_RETRIES,
        }
    }

    /// How many failures in a row are retried (0: none).
    pub fn with_retries(mut self, retries: u32) -> Self {
        self.max_retries = retries;
        self
    }

    /// Resume point: the last key received ("" before the first record).
    pub fn after_key(&self) -> &str {
        &self.after_key
    }

    pub fn total_records(&self) -> Option<u64> {
        self.total_records
    }

    pub fn head_seq(&self) -> Option<u64> {
        self.head_seq
    }

    /// The data items this department sees (from the first page).
    pub fn data_items(&self) -> &[String] {
        &self.data_items
    }

    pub fn masked_items(&self) -> &[String] {
        &self.masked_items
    }

    pub fn records_read(&self) -> u64 {
        self.records_read
    }

    /// The last page was received.
    pub fn is_done(&self) -> bool {
        self.done
    }

    /// The next page; `None` after the last one. Cancel-safe.
    pub async fn next_page(&mut self) -> Result<Option<SnapshotPage>, ClientError> {
        loop {
            if self.done {
                return Ok(None);
            }
            let failure = match self.stream.as_mut() {
                None => {
                    if self.resource.trim().is_empty() {
                        return Err(ClientError::InvalidArgument {
                            message: "a resource code is required (nothing was sent)".into(),
                            violations: vec![violation("resource_code", "a resource code is required")],
                        });
                    }
                    match self.client.open_snapshot(&self.resource, &self.after_key, &self.purpose).await {
                        Ok(stream) => {
                            self.stream = Some(stream);
                            self.first_page = true;
                            continue;
                        }
                        Err(status) => status,
                    }
                }
                Some(stream) => {
                    // A page is read by the provider only when the previous one was taken: each should
                    // come within the call deadline.
                    let timeout = self.client.timeout();
                    match tokio::time::timeout(timeout, stream.message()).await {
                        Ok(Ok(Some(page))) => {
                            self.take_page(&page);
                            return Ok(Some(page));
                        }
                        Ok(Ok(None)) => Status::unavailable("the snapshot stream ended before its last page"),
                        Ok(Err(status)) => status,
                        Err(_) => Status::deadline_exceeded(format!(
                            "no snapshot page within {:.1}s",
                            timeout.as_secs_f64()
                        )),
                    }
                }
            };
            self.stream = None;
            // Before the first page, a failure is the caller's to judge (node down, no access): fail fast.
            let started = self.total_records.is_some();
            if !started || !is_transient(&failure) || self.failures >= self.max_retries {
                return Err(failure.into());
            }
            self.failures += 1;
            let wait = wait_after(&failure, &mut self.backoff);
            tracing::warn!(resource = %self.resource, records = self.records_read, error = %ClientError::from(failure),
                retry_in_ms = wait.as_millis() as u64, "snapshot stream interrupted; resuming after the last key received");
            tokio::time::sleep(wait).await;
        }
    }

    fn take_page(&mut self, page: &SnapshotPage) {
        if self.first_page {
            self.first_page = false;
            if self.total_records.is_none() {
                self.total_records = Some(page.total_records);
                self.head_seq = Some(page.head_seq);
                self.data_items = page.data_items.clone();
                self.masked_items = page.masked_items.clone();
            }
        }
        if let Some(last) = page.records.last() {
            self.after_key = last.key.clone();
        } else if !page.last_key.is_empty() {
            self.after_key = page.last_key.clone();
        }
        self.records_read += page.records.len() as u64;
        self.failures = 0;
        self.backoff.reset();
        if page.done {
            self.done = true;
            self.stream = None;
        }
    }

    /// The pages as a stream (ends after the last page or the first error).
    pub fn into_stream(self) -> impl Stream<Item = Result<SnapshotPage, ClientError>> + Send + 'static {
        futures::stream::unfold(Some(self), |reader| async move {
            let mut reader = reader?;
            match reader.next_page().await {
                Ok(Some(page)) => Some((Ok(page), Some(reader))),
                Ok(None) => None,
                Err(e) => Some((Err(e), None)),
            }
        })
    }
}

// ---- replica ----

/// One record as a [`Replica`] holds it.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct ReplicaRecord {
    /// The seq of the change that last wrote it.
    pub version: u64,
    pub items: BTreeMap<String, String>,
    pub updated_at_unix_ms: i64,
}

/// An in-memory copy of another department's resource: key → (version, items), fed by snapshot pages
/// and events in any interleaving. A record is replaced only by a newer version (a greater seq), so a
/// snapshot and the change stream together give the provider's state exactly, each change applied once.
///
/// Keys are as delivered: an identity number this department is not granted in full arrives masked, and
/// two people may share a masked number; replicate such resources with the key granted.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Replica {
    records: BTreeMap<String, ReplicaRecord>,
    last_event_seq: u64,
}

impl Replica {
    pub fn new() -> Self {
        Replica::default()
    }

    /// Takes a snapshot page's records (each only if newer than what is held); returns how many were
    /// stored.
    pub fn apply_snapshot_page(&mut self, page: &SnapshotPage) -> usize {
        page.records.iter().filter(|r| self.apply_record(r)).count()
    }

    /// Stores `record` at its `version` unless a record of that key is held at the same or a newer one.
    pub fn apply_record(&mut self, record: &Record) -> bool {
        self.put(&record.key, record.version, record)
    }

    /// Applies a change event: the record becomes the event's, at version `event.seq`, if that is newer
    /// than the version held. False when ignored (already applied, or older than what a snapshot gave).
    /// A deregistration keeps the record with its final state, as the provider does.
    pub fn apply_event(&mut self, event: &RecordEvent) -> bool {
        self.last_event_seq = self.last_event_seq.max(event.seq);
        match &event.record {
            Some(record) => self.put(&record.key, event.seq, record),
            None => false,
        }
    }

    fn put(&mut self, key: &str, version: u64, record: &Record) -> bool {
        if self.records.get(key).is_some_and(|held| held.version >= version) {
            return false;
        }
        self.records.insert(
            key.to_string(),
            ReplicaRecord {
                version,
                items: record.items.iter().map(|(k, v)| (k.clone(), v.clone())).collect(),
                updated_at_unix_ms: record.updated_at_unix_ms,
            },
        );
        true
    }

    pub fn get(&self, key: &str) -> Option<&ReplicaRecord> {
        self.records.get(key)
    }

    /// The version held for `key`.
    pub fn version(&self, key: &str) -> Option<u64> {
        self.records.get(key).map(|r| r.version)
    }

    pub fn len(&self) -> usize {
        self.records.len()
    }

    pub fn is_empty(&self) -> bool {
        self.records.is_empty()
    }

    /// Records in key order.
    pub fn iter(&self) -> impl Iterator<Item = (&str, &ReplicaRecord)> {
        self.records.iter().map(|(k, r)| (k.as_str(), r))
    }

    /// The highest event seq seen (applied or not).
    pub fn last_event_seq(&self) -> u64 {
        self.last_event_seq
    }

    /// A SHA-256 of the content, lowercase hex: equal replicas (same keys, versions and items) have equal
    /// checksums, whatever order they were built in. Over the records in key order (byte order), each as
    /// key, version, item count, then each item's name and value in name order; strings are written as
    /// their UTF-8 length (8 bytes, big endian) and bytes, numbers as 8 bytes big endian. The stored time
    /// is left out.
    pub fn checksum(&self) -> String {
        let mut h = Sha256::new();
        let put_str = |h: &mut Sha256, s: &str| {
            h.update((s.len() as u64).to_be_bytes());
            h.update(s.as_bytes());
        };
        for (key, r) in &self.records {
            put_str(&mut h, key);
            h.update(r.version.to_be_bytes());
            h.update((r.items.len() as u64).to_be_bytes());
            for (name, value) in &r.items {
                put_str(&mut h, name);
                put_str(&mut h, value);
            }
        }
        hex::encode(h.finalize())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn record(key: &str, version: u64, status: &str) -> Record {
        Record {
            key: key.into(),
            items: [("企业名称".to_string(), format!("{key}公司")), ("登记状态".to_string(), status.to_string())]
                .into_iter()
                .collect(),
            updated_at_unix_ms: 0,
            version,
        }
    }

    fn event(seq: u64, key: &str, status: &str) -> RecordEvent {
        let kind = if status == "注销" { RecordChangeKind::Deregistered } else { RecordChangeKind::Updated };
        RecordEvent { seq, kind: kind as i32, record: Some(record(key, seq, status)), published_at_unix_ms: 0 }
    }

    fn events(seqs: std::ops::RangeInclusive<u64>) -> Vec<RecordEvent> {
        seqs.map(|s| event(s, "K", "存续")).collect()
    }

    fn seqs(events: &[RecordEvent]) -> Vec<u64> {
        events.iter().map(|e| e.seq).collect()
    }

    #[test]
    fn snapshot_then_overlapping_events_are_applied_once() {
        // Subscribed at seq 10; the snapshot started at head 14, so A (v12) and B (v14) already hold the
        // changes 12 and 14 that the stream delivers again.
        let page = SnapshotPage {
            records: vec![record("A", 12, "存续"), record("B", 14, "存续"), record("C", 3, "存续")],
            total_records: 3,
            head_seq: 14,
            last_key: "C".into(),
            done: true,
            ..Default::default()
        };
        let mut replica = Replica::new();
        assert_eq!(replica.apply_snapshot_page(&page), 3);
        let stream = [event(11, "A", "在业"), event(12, "A", "存续"), event(13, "C", "停业"), event(14, "B", "存续"), event(15, "B", "注销")];
        let applied: Vec<bool> = stream.iter().map(|e| replica.apply_event(e)).collect();
        assert_eq!(applied, [false, false, true, false, true]);
        assert_eq!(replica.len(), 3);
        assert_eq!(replica.version("A"), Some(12));
        assert_eq!(replica.get("B").unwrap().items["登记状态"], "注销");
        assert_eq!(replica.get("C").unwrap().items["登记状态"], "停业");
        assert_eq!(replica.last_event_seq(), 15);
        // The same events again (a redelivery) change nothing.
        let before = replica.checksum();
        assert!(stream.iter().all(|e| !replica.apply_event(e)));
        assert_eq!(replica.checksum(), before);
    }

    #[test]
    fn out_of_date_events_and_records_are_ignored() {
        let mut replica = Replica::new();
        assert!(replica.apply_event(&event(20, "A", "注销")));
        assert!(!replica.apply_event(&event(19, "A", "存续")), "older event");
        assert!(!replica.apply_event(&event(20, "A", "存续")), "same seq");
        assert!(!replica.apply_record(&record("A", 18, "存续")), "older snapshot record");
        assert_eq!(replica.get("A").unwrap().items["登记状态"], "注销");
        assert!(replica.apply_record(&record("B", 0, "存续")), "a record without version is taken when new");
        assert!(!replica.apply_record(&record("B", 0, "在业")));
        assert!(!replica.apply_event(&RecordEvent { seq: 30, ..Default::default() }), "no record");
    }

    #[test]
    fn checksum_is_independent_of_order_and_sees_every_field() {
        let mut a = Replica::new();
        let mut b = Replica::new();
        let evs = [event(1, "A", "存续"), event(2, "B", "存续"), event(3, "A", "注销")];
        for e in &evs {
            a.apply_event(e);
        }
        for e in evs.iter().rev() {
            b.apply_event(e);
        }
        assert_eq!(a.checksum(), b.checksum());
        assert_eq!(a.checksum().len(), 64);
        // Built from a snapshot instead of events: same state, same checksum.
        let mut c = Replica::new();
        c.apply_snapshot_page(&SnapshotPage { records: vec![record("B", 2, "存续"), record("A", 3, "注销")], ..Default::default() });
        assert_eq!(c.checksum(), a.checksum());
        // A different version, item or key changes it; so does moving bytes between fields.
        let mut d = c.clone();
        d.apply_record(&record("B", 4, "存续"));
        assert_ne!(d.checksum(), c.checksum());
        let mut x = Replica::new();
        x.apply_record(&Record { key: "ab".into(), items: [("c".into(), "d".into())].into(), ..Default::default() });
        let mut y = Replica::new();
        y.apply_record(&Record { key: "a".into(), items: [("bc".into(), "d".into())].into(), ..Default::default() });
        assert_ne!(x.checksum(), y.checksum());
        assert_eq!(Replica::new().checksum(), hex::encode(Sha256::digest(b"")));
    }

    #[test]
    fn cursor_resumes_after_the_last_seq_handed_out() {
        let mut c = EventCursor::default();
        assert_eq!(c.resume_after(), 0, "nothing yet: the node's acknowledged position");
        assert_eq!(c.to_ack(), None);
        // The node starts wherever its acknowledged position is.
        assert_eq!(seqs(&c.accept(events(5..=7)).unwrap()), [5, 6, 7]);
        assert_eq!((c.last_handed_out(), c.resume_after(), c.to_ack()), (7, 7, Some(7)));
        // After a reconnect the node may repeat a message: the overlap is dropped, the rest kept.
        assert_eq!(seqs(&c.accept(events(6..=9)).unwrap()), [8, 9]);
        assert!(c.accept(events(3..=9)).unwrap().is_empty());
        assert_eq!(c.last_handed_out(), 9);
        c.acked_upto(7);
        assert_eq!(c.to_ack(), Some(9));
        c.acked_upto(9);
        c.acked_upto(4);
        assert_eq!((c.acked(), c.to_ack()), (9, None), "acknowledgements never go back");
        assert!(c.can_ack(9) && !c.can_ack(10));
        // A gap is refused and leaves the cursor where it was.
        assert_eq!(c.accept(events(11..=12)), Err(SeqGap { expected: 10, got: 11 }));
        let mut holes = events(10..=12);
        holes.remove(1);
        assert_eq!(c.accept(holes), Err(SeqGap { expected: 11, got: 12 }));
        assert_eq!(c.last_handed_out(), 9);
        assert!(SeqGap { expected: 10, got: 13 }.to_string().starts_with("events 10..12 were skipped"));
    }

    #[test]
    fn a_resumed_cursor_acknowledges_its_start_with_the_first_batch() {
        let mut c = EventCursor::starting_after(100);
        assert_eq!(c.resume_after(), 100);
        assert_eq!(c.to_ack(), Some(100), "the application processed up to 100");
        assert_eq!(c.accept(events(102..=103)), Err(SeqGap { expected: 101, got: 102 }));
        assert_eq!(seqs(&c.accept(events(99..=103)).unwrap()), [101, 102, 103]);
        assert_eq!(EventCursor::starting_after(0), EventCursor::default());
    }

    #[test]
    fn backoff_doubles_up_to_the_cap_and_resets() {
        let mut b = Backoff::new(Duration::from_millis(100), Duration::from_millis(500));
        let waits: Vec<u128> = (0..5).map(|_| b.next_wait().as_millis()).collect();
        assert_eq!(waits, [100, 200, 400, 500, 500]);
        b.reset();
        assert_eq!(b.next_wait(), Duration::from_millis(100));
        let quota = tonic_types::ErrorDetails::with_retry_info(Some(Duration::from_secs(3)));
        use tonic_types::StatusExt;
        let status = Status::with_error_details(Code::ResourceExhausted, "quota", quota);
        assert_eq!(wait_after(&status, &mut b), Duration::from_secs(3), "the server's RetryInfo wins");
    }

    #[test]
    fn transient_failures() {
        assert!(is_transient(&Status::unavailable("node restarting")));
        assert!(is_transient(&Status::unknown("error reading a body from connection")));
        assert!(is_transient(&Status::internal("h2 protocol error: stream reset")));
        assert!(!is_transient(&Status::internal("store failure")));
        assert!(!is_transient(&Status::not_found("no subscription")));
        assert!(!is_transient(&Status::out_of_range("acknowledged and dropped")));
        assert!(!is_transient(&Status::permission_denied("no grant")));
        assert!(is_transient_error(&ClientError::Unavailable("x".into())));
        assert!(!is_transient_error(&ClientError::NotFound("x".into())));
    }

    #[test]
    fn batch_ids_are_unique_and_what_the_node_accepts() {
        let (a, b) = (batch_id_prefix(), batch_id_prefix());
        assert_ne!(a, b);
        let id = format!("{a}:{}", u32::MAX);
        assert!(id.len() <= 64, "{id}");
        assert!(id.chars().all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.' | ':')), "{id}");
    }

    #[test]
    fn change_kind_words() {
        assert_eq!(CHANGE_KINDS.parse("deregistered"), Some(RecordChangeKind::Deregistered));
        assert_eq!(CHANGE_KINDS.word(RecordChangeKind::Created as i32), "created");
        assert_eq!(CHANGE_KINDS.word(0), "unspecified");
        assert_eq!(CHANGE_KINDS.choices(), "created|updated|deregistered");
    }

    /// A client whose node cannot be reached: a local refusal proves nothing was sent.
    fn unreachable_client() -> (ExchangeClient, tempfile::TempDir) {
        crate::tls::install_crypto_provider();
        let dir = tempfile::tempdir().unwrap();
        crate::pki::init_ca(dir.path(), "test CA", 30).unwrap();
        crate::pki::issue(dir.path(), &crate::pki::LeafRequest::new("tax", crate::identity::Role::App, "tax-app"))
            .unwrap();
        let id = crate::tls::TlsIdentity::load(&crate::tls::TlsPaths::in_dir(dir.path(), "tax-app")).unwrap();
        let client = ExchangeClient::connect("127.0.0.1:1", None, &id).unwrap().with_timeout(Duration::from_secs(5));
        (client, dir)
    }

    #[test]
    fn readers_can_move_between_tasks() {
        fn send<T: Send>(_: &T) {}
        let (c, _dir) = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap()
            .block_on(async { unreachable_client() });
        let mut sub = c.event_subscription("r");
        send(&sub.next_batch());
        send(&sub.ack());
        let mut snap = c.snapshot_reader("r", "", "p");
        send(&snap.next_page());
        send(&c.sync_snapshot("r", "", "p"));
    }

    #[tokio::test]
    async fn local_checks_send_nothing() {
        let (c, _dir) = unreachable_client();
        let bad = vec![
            RecordChange { record: Some(record("A", 0, "存续")), kind: 0 },
            RecordChange { record: Some(record("", 0, "存续")), kind: 0 },
            RecordChange { record: None, kind: 0 },
        ];
        let Err(ClientError::InvalidArgument { violations, .. }) = c.publish("r", bad).await else { panic!() };
        let fields: Vec<&str> = violations.iter().map(|v| v.field.as_str()).collect();
        assert_eq!(fields, ["changes[1].record.key", "changes[2].record"]);
        assert_eq!(c.subscribe(" ").await.unwrap_err().code(), Code::InvalidArgument);
        assert_eq!(c.publish("r", vec![]).await.unwrap(), Published::default());
        let mut sub = c.event_subscription("r");
        let err = sub.ack_upto(5).await.unwrap_err();
        assert_eq!(err.code(), Code::InvalidArgument, "{err}");
        assert_eq!(sub.ack().await.unwrap(), 0, "nothing handed out: nothing to send");
        // The unreachable node: connect reports it instead of retrying.
        let err = sub.connect().await.unwrap_err();
        assert!(is_transient_error(&err), "{err}");
        // Before the first page, an unreachable node is reported at once (no retries).
        let mut snap = c.snapshot_reader("r", "", "test");
        let started = Instant::now();
        assert!(is_transient_error(&snap.next_page().await.unwrap_err()));
        assert!(started.elapsed() < Duration::from_secs(4), "{:?}", started.elapsed());
        assert_eq!(snap.after_key(), "");
    }
}
