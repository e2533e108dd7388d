//! Provider side of the `Relay` event calls: `Subscribe`, `Unsubscribe`, `StreamEvents`, `FetchSnapshot`.
//!
//! The consumer's node opens `StreamEvents`; this node pushes the change log from the consumer's
//! high-water mark on, up to `window_events` ahead of its acknowledgements, cut to the consumer's data
//! items. Before every batch it decides again ([`crate::policy::Policy::authorize`]): a revoked grant or
//! a withdrawn resource ends the subscription, and no event leaves after that. Each delivered batch and
//! each snapshot is appended to the audit trail before it is sent.

use std::sync::Arc;
use std::time::Duration;

use client_sdk::identity::{PeerIdentity, Role};
use exchange_proto::v1::{
    EventAck, EventDelivery, FetchSnapshotRequest, RelaySubscribeRequest, RelaySubscribeResponse,
    RelayUnsubscribeRequest, RelayUnsubscribeResponse, SnapshotPage, Subscription,
};
use prost::Message;
use tokio::sync::{mpsc, watch};
use tokio_stream::wrappers::ReceiverStream;
use tonic::{Status, Streaming};

use super::{blocking, check_code, EventStream, Events};
use crate::audit::{AuditRecord, Side};
use crate::error::NodeError;
use crate::policy::Decision;
use crate::records::{disclosure, RecordStoreError};
use crate::relay::{now_us, MAX_PURPOSE_CHARS};
use crate::state::now_unix_ms;

/// How often an idle stream re-checks the consumer's grant (a revocation ends it within this).
const RECHECK: Duration = Duration::from_millis(500);
/// Events read from the change log at once (a log entry holds up to one `PutRecords` batch, 5,000).
const READ_EVENTS: usize = 5000;

fn require_node(id: &PeerIdentity, call: &str) -> Result<(), NodeError> {
    if id.role != Role::Node {
        return Err(NodeError::PermissionDenied(format!(
            "{call} is node-to-node: it needs a node certificate; {} has role {}. \
             Applications subscribe through their own department's node",
            id.name, id.role
        )));
    }
    Ok(())
}

/// Whether a refusal of `authorize` ends a subscription (rather than pausing it).
fn ends_subscription(e: &NodeError) -> bool {
    matches!(e, NodeError::PermissionDenied(_) | NodeError::NotFound(_))
}

fn store_err(e: RecordStoreError) -> NodeError {
    match e {
        RecordStoreError::Trimmed { resource_code, after_seq, first_kept } => NodeError::DataLoss(format!(
            "events of {resource_code} after seq {after_seq} are no longer kept by the provider (its log starts at seq \
             {first_kept}): subscribe again and resynchronize with a snapshot"
        )),
        e => NodeError::Store(e.to_string()),
    }
}

impl Events {
    /// This node's decision for `consumer` on one of its resources now.
    async fn decide(&self, consumer: &str, resource_code: &str) -> Result<Decision, NodeError> {
        self.fresh()?;
        let entry = self.x.own_entry(resource_code, &self.directory).await?;
        self.x.policy.authorize(consumer, entry, now_unix_ms())
    }

    fn audit_record(&self, node: &PeerIdentity, resource_code: &str, purpose: String) -> AuditRecord {
        self.x.open_audit(
            &crate::consumer::random_message_id(),
            Side::Provider,
            &node.department,
            &self.x.me.department,
            resource_code,
            &[],
            0,
            node,
            &purpose,
        )
    }

    /// Ends a subscription for `reason` (kept, inactive, so the consumer learns why).
    pub(crate) fn end_subscription(&self, consumer: &str, resource_code: &str, reason: &str) -> Result<(), NodeError> {
        let mut ended = false;
        self.outbox.update(consumer, resource_code, true, |sub| {
            ended = sub.active;
            if sub.active {
                sub.active = false;
                sub.ended_reason = reason.to_string();
            }
            ended
        })?;
        if ended {
            tracing::info!(consumer, resource = %resource_code, reason, "subscription ended");
        }
        Ok(())
    }

    pub async fn relay_subscribe(
        &self,
        node: &PeerIdentity,
        req: RelaySubscribeRequest,
    ) -> Result<RelaySubscribeResponse, NodeError> {
        let audit = self.audit_record(node, &req.resource_code, "subscribe".into());
        let result = self.relay_subscribe_inner(node, &req).await;
        self.x.close_audit(audit, result, |r| r.data_items.clone())
    }

    async fn relay_subscribe_inner(
        &self,
        node: &PeerIdentity,
        req: &RelaySubscribeRequest,
    ) -> Result<RelaySubscribeResponse, NodeError> {
        require_node(node, "Subscribe")?;
        check_code(&req.resource_code)?;
        let decision = self.decide(&node.department, &req.resource_code).await?;
        let d = disclosure::disclosure(&decision.entry, decision.granted_items.as_deref());
        let mut resp = RelaySubscribeResponse { data_items: d.data_items, masked_items: d.masked_items, ..Default::default() };
        if let Some(sub) = self.outbox.get(&node.department, &req.resource_code)? {
            if sub.active {
                resp.start_seq = sub.received_upto_seq;
                resp.existed = true;
                return Ok(resp);
            }
        }
        let store = self.x.records.clone();
        let code = req.resource_code.clone();
        let head = blocking(move || store.head_seq(&code).map_err(store_err)).await?;
        let sub = Subscription {
            resource_code: req.resource_code.clone(),
            provider_code: self.x.me.department.clone(),
            consumer_code: node.department.clone(),
            received_upto_seq: head,
            start_seq: head,
            active: true,
            ..Default::default()
        };
        self.outbox.put(&sub, true)?;
        tracing::info!(consumer = %node.department, resource = %req.resource_code, start_seq = head, "subscription started");
        resp.start_seq = head;
        Ok(resp)
    }

    pub async fn relay_unsubscribe(
        &self,
        node: &PeerIdentity,
        req: RelayUnsubscribeRequest,
    ) -> Result<RelayUnsubscribeResponse, NodeError> {
        require_node(node, "Unsubscribe")?;
        check_code(&req.resource_code)?;
        let existed = self.outbox.get(&node.department, &req.resource_code)?.is_some_and(|s| s.active);
        self.end_subscription(&node.department, &req.resource_code, "unsubscribed by the consumer")?;
        self.trim_outbox(&req.resource_code);
        Ok(RelayUnsubscribeResponse { existed })
    }

    pub async fn stream_events(
        self: &Arc<Self>,
        node: &PeerIdentity,
        mut acks: Streaming<EventAck>,
    ) -> Result<EventStream<EventDelivery>, NodeError> {
        require_node(node, "StreamEvents")?;
        let open = match tokio::time::timeout(Duration::from_secs(10), acks.message()).await {
            Ok(Ok(Some(open))) => open,
            Ok(Err(s)) => return Err(NodeError::Peer(s)),
            _ => {
                return Err(NodeError::invalid(
                    "resource_code",
                    "the first message of StreamEvents names the resource and the consumer's high-water mark",
                ))
            }
        };
        check_code(&open.resource_code)?;
        let consumer = node.department.clone();
        let code = open.resource_code.clone();
        let Some(sub) = self.outbox.get(&consumer, &code)? else {
            return Err(NodeError::NotFound(format!(
                "department {consumer} has no subscription to {code} at department {}: subscribe first",
                self.x.me.department
            )));
        };
        if !sub.active {
            return Err(NodeError::FailedPrecondition(format!("subscription ended: {}", sub.ended_reason)));
        }
        if let Err(e) = self.decide(&consumer, &code).await {
            if ends_subscription(&e) {
                self.end_subscription(&consumer, &code, &e.to_string())?;
                return Err(NodeError::FailedPrecondition(format!("subscription ended: {e}")));
            }
            return Err(e);
        }
        let store = self.x.records.clone();
        let c = code.clone();
        let head = blocking(move || store.head_seq(&c).map_err(store_err)).await?;
        let from = open.received_upto_seq;
        if from > head {
            // The consumer holds events this node no longer has: the provider's store was restored from a
            // backup older than what was delivered. Going on would reuse the seqs in between for other
            // changes, which the consumer would drop as duplicates; end the subscription instead, so the
            // consumer resubscribes and resyncs with a snapshot.
            return Err(NodeError::DataLoss(format!(
                "the subscriber has received {code} up to event {from}, but this node's change log ends at {head}: \
                 the provider's store was restored from an earlier backup; resubscribe and take a snapshot"
            )));
        }
        if from < sub.start_seq {
            return Err(NodeError::invalid(
                "received_upto_seq",
                format!("{from} is before the subscription's start ({})", sub.start_seq),
            ));
        }
        if from < sub.received_upto_seq {
            tracing::warn!(consumer = %consumer, resource = %code, from, acknowledged = sub.received_upto_seq, "the consumer asks again for events it acknowledged");
        }
        let (tx, rx) = mpsc::channel(4);
        let (acked_tx, acked_rx) = watch::channel(from);
        // Acknowledgements arrive on their own task, so the sender never stops to read them.
        let this = self.clone();
        let (c2, r2) = (consumer.clone(), code.clone());
        tokio::spawn(async move {
            while let Ok(Some(ack)) = acks.message().await {
                let upto = ack.received_upto_seq;
                if upto > *acked_tx.borrow() {
                    acked_tx.send_replace(upto);
                    this.record_ack(&c2, &r2, upto).await;
                }
            }
            // Dropping acked_tx tells the sender the consumer is gone.
        });
        let this = self.clone();
        let node = node.clone();
        tokio::spawn(async move {
            this.outbox.update_live(&consumer, &code, |l| {
                l.connected = true;
                l.last_error.clear();
            });
            let result = this.push(&node, &code, from, head, acked_rx, &tx).await;
            if let Err(e) = result {
                this.outbox.update_live(&consumer, &code, |l| l.last_error = e.to_string());
                let _ = tx.send(Err(Status::from(e))).await;
            }
            this.outbox.update_live(&consumer, &code, |l| l.connected = false);
        });
        Ok(Box::pin(ReceiverStream::new(rx)))
    }

    async fn record_ack(&self, consumer: &str, resource_code: &str, upto: u64) {
        let mut moved = false;
        // Not flushed: an acknowledgement lost in a crash only means events are sent again, and the
        // consumer drops them.
        let result = self
            .outbox
            .update(consumer, resource_code, false, |sub| {
                moved = upto > sub.received_upto_seq;
                if moved {
                    sub.received_upto_seq = upto;
                    sub.last_delivery_unix_ms = now_unix_ms();
                }
                moved
            })
            .map(|_| moved);
        match result {
            Ok(true) => self.trim_outbox(resource_code),
            Ok(false) => {}
            Err(e) => tracing::warn!(consumer, resource = %resource_code, error = %e, "could not record an acknowledgement"),
        }
    }

    /// The sending half of `StreamEvents`.
    async fn push(
        &self,
        node: &PeerIdentity,
        code: &str,
        from: u64,
        head: u64,
        mut acked: watch::Receiver<u64>,
        tx: &mpsc::Sender<Result<EventDelivery, Status>>,
    ) -> Result<(), NodeError> {
        let consumer = node.department.as_str();
        let mut heads = self.outbox.head_watch(code, head);
        let mut shutdown = self.shutdown.clone();
        let mut sent = from;
        let mut recheck = tokio::time::interval(RECHECK);
        recheck.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            if *shutdown.borrow() {
                return Ok(());
            }
            let head = *heads.borrow_and_update();
            let in_flight = sent.saturating_sub(*acked.borrow());
            // Decide again before anything leaves: a revocation stops delivery at once.
            let decision = match self.decide(consumer, code).await {
                Ok(d) => d,
                Err(e) if ends_subscription(&e) => {
                    let reason = e.to_string();
                    self.end_subscription(consumer, code, &reason)?;
                    let _ = tx.send(Ok(EventDelivery { events: Vec::new(), ended_reason: reason })).await;
                    return Ok(());
                }
                Err(e) => return Err(e),
            };
            if sent < head && in_flight < self.settings.window_events as u64 {
                let store = self.x.records.clone();
                let c = code.to_string();
                // One read of up to a log entry's worth (a decoded entry is used whole), sent as
                // messages of `batch_events`.
                let n = READ_EVENTS.min(self.settings.window_events - in_flight as usize);
                let events = blocking(move || store.events_after(&c, sent, n).map_err(store_err)).await?;
                let Some(last) = events.last().map(|e| e.seq) else { continue };
                let first = sent + 1;
                let d = disclosure::disclosure(&decision.entry, decision.granted_items.as_deref());
                let mut deliveries = Vec::with_capacity(events.len() / self.settings.batch_events + 1);
                let mut bytes = 0;
                let mut events = events.into_iter().peekable();
                while events.peek().is_some() {
                    let chunk: Vec<_> = events
                        .by_ref()
                        .take(self.settings.batch_events)
                        .map(|mut e| {
                            e.record = e.record.map(|r| disclosure::apply(&d, &decision.entry, r));
                            e
                        })
                        .collect();
                    let delivery = EventDelivery { events: chunk, ended_reason: String::new() };
                    bytes += delivery.encoded_len();
                    deliveries.push(delivery);
                }
                // Recorded before it leaves: nothing leaves the node unaudited.
                let mut audit = self.audit_record(node, code, format!("events {first}-{last}"));
                audit.data_items = d.data_items.clone();
                audit.request_out_us = now_us();
                audit.response_bytes = bytes as u64;
                audit.response_out_us = now_us();
                let log = self.x.audit.clone();
                blocking(move || log.append(audit).map(|_| ()).map_err(|e| NodeError::Audit(e.to_string()))).await?;
                for delivery in deliveries {
                    if tx.send(Ok(delivery)).await.is_err() {
                        return Ok(());
                    }
                }
                sent = last;
                self.outbox.update_live(consumer, code, |l| l.last_delivery_unix_ms = now_unix_ms());
                continue;
            }
            tokio::select! {
                changed = acked.changed() => if changed.is_err() { return Ok(()) },
                _ = heads.changed() => {}
                _ = recheck.tick() => {}
                _ = shutdown.changed() => {}
                _ = tx.closed() => return Ok(()),
            }
        }
    }

    pub async fn fetch_snapshot(
        self: &Arc<Self>,
        node: &PeerIdentity,
        req: FetchSnapshotRequest,
    ) -> Result<EventStream<SnapshotPage>, NodeError> {
        let mut audit = self.x.open_audit(
            &req.message_id,
            Side::Provider,
            &node.department,
            &self.x.me.department,
            &req.resource_code,
            &[],
            req.encoded_len(),
            node,
            &format!("snapshot after {:?}: {}", if req.after_key.is_empty() { "start" } else { "key" }, req.purpose),
        );
        let header = self.snapshot_header(node, &req).await;
        audit.response_out_us = now_us();
        // Recorded before the first page leaves.
        let (header, decision) = match header {
            Ok((h, d)) => (self.x.close_audit(audit, Ok(h), |h| h.data_items.clone())?, d),
            Err(e) => return Err(self.x.close_audit::<SnapshotPage>(audit, Err(e), |_| Vec::new()).unwrap_err()),
        };
        let (tx, rx) = mpsc::channel(2);
        let this = self.clone();
        let code = req.resource_code.clone();
        let page_records = match req.page_records as usize {
            0 => self.settings.snapshot_page_records,
            n => n.min(self.settings.snapshot_page_records),
        };
        let mut after = req.after_key.clone();
        tokio::spawn(async move {
            let d = disclosure::disclosure(&decision.entry, decision.granted_items.as_deref());
            let mut first = Some(header);
            let mut shutdown = this.shutdown.clone();
            loop {
                if *shutdown.borrow_and_update() {
                    let _ = tx.send(Err(Status::unavailable("the provider's node is shutting down; resume the snapshot"))).await;
                    return;
                }
                let store = this.x.records.clone();
                let (c, a) = (code.clone(), after.clone());
                let records = match blocking(move || store.scan(&c, &a, page_records).map_err(store_err)).await {
                    Ok(r) => r,
                    Err(e) => {
                        let _ = tx.send(Err(Status::from(e))).await;
                        return;
                    }
                };
                let done = records.len() < page_records;
                let mut page = first.take().unwrap_or_default();
                page.last_key = records.last().map_or_else(|| after.clone(), |r| r.key.clone());
                after = page.last_key.clone();
                page.records = records.into_iter().map(|r| disclosure::apply(&d, &decision.entry, r)).collect();
                page.done = done;
                if tx.send(Ok(page)).await.is_err() || done {
                    return;
                }
            }
        });
        Ok(Box::pin(ReceiverStream::new(rx)))
    }

    async fn snapshot_header(
        &self,
        node: &PeerIdentity,
        req: &FetchSnapshotRequest,
    ) -> Result<(SnapshotPage, Decision), NodeError> {
        require_node(node, "FetchSnapshot")?;
        check_code(&req.resource_code)?;
        if req.purpose.chars().count() > MAX_PURPOSE_CHARS {
            return Err(NodeError::invalid("purpose", format!("at most {MAX_PURPOSE_CHARS} characters")));
        }
        if req.after_key.chars().count() > 128 {
            return Err(NodeError::invalid("after_key", "at most 128 characters (a record key)"));
        }
        let decision = self.decide(&node.department, &req.resource_code).await?;
        self.x.check_quota(&node.department, &req.resource_code)?;
        let d = disclosure::disclosure(&decision.entry, decision.granted_items.as_deref());
        let store = self.x.records.clone();
        let code = req.resource_code.clone();
        // The head first: every change up to it is in the snapshot (later ones may be too; their
        // versions say so).
        let (head_seq, total_records) = blocking(move || {
            let head = store.head_seq(&code).map_err(store_err)?;
            let total = store.count_resource(&code).map_err(store_err)?;
            Ok((head, total))
        })
        .await?;
        let page = SnapshotPage {
            total_records,
            head_seq,
            data_items: d.data_items,
            masked_items: d.masked_items,
            ..Default::default()
        };
        Ok((page, decision))
    }
}
