//! Consumer side: `Subscribe`, `Unsubscribe`, the delivery task of each subscription, the application's
//! `ReceiveEvents` / `AckEvents`, and `SyncSnapshot` through this node.
//!
//! The delivery task keeps one `StreamEvents` stream open to the provider's node. It sends the inbox's
//! high-water mark first, stores each delivery in the inbox (flushed, duplicates dropped), then
//! acknowledges. Deliveries that are already waiting are stored together (one flush for several). A
//! broken stream is reopened with capped exponential backoff; a stream the provider ends (grant revoked,
//! resource withdrawn) ends the subscription.

use std::sync::Arc;
use std::time::Duration;

use client_sdk::identity::PeerIdentity;
use client_sdk::tls;
use exchange_proto::v1::relay_client::RelayClient;
use exchange_proto::v1::{
    AckEventsRequest, AckEventsResponse, EventAck, FetchSnapshotRequest, ReceiveEventsRequest, ReceivedEvents,
    RelaySubscribeRequest, RelayUnsubscribeRequest, ResolveResourceResponse, SnapshotPage, SubscribeRequest,
    SubscribeResponse, Subscription, SyncSnapshotRequest, UnsubscribeRequest, UnsubscribeResponse,
};
use futures::FutureExt;
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;
use tonic::transport::Channel;
use tonic::{Request, Status};

use super::inbox::Appended;
use super::{blocking, check_code, EventStream, Events};
use crate::audit::Side;
use crate::error::NodeError;
use crate::state::now_unix_ms;

/// Most events stored in one inbox write when deliveries queue up.
const COALESCE_EVENTS: usize = 5_000;
/// Events read from the inbox at once, then sent to the application `max_batch` at a time.
const READ_EVENTS: usize = 5_000;

/// How a delivery stream ended.
enum StreamEnd {
    /// The provider ended the subscription.
    Ended(String),
    /// The stream closed (provider restarting, shutdown): reconnect.
    Closed,
}

/// Whether a provider's refusal ends the subscription for good (rather than being retried).
fn ends(s: &Status) -> bool {
    matches!(s.code(), tonic::Code::FailedPrecondition | tonic::Code::NotFound | tonic::Code::DataLoss)
        && std::error::Error::source(s).is_none()
}

impl Events {
    /// The provider nodes of a resource, online first.
    async fn providers(&self, code: &str, fresh: bool) -> Result<(Arc<ResolveResourceResponse>, Vec<(String, String)>), NodeError> {
        let resolved = self.consumer.resolve(code, fresh).await?;
        let entry = resolved.entry.clone().unwrap_or_default();
        if entry.withdrawn {
            return Err(NodeError::NotFound(format!("resource {code} has been withdrawn")));
        }
        let nodes = resolved
            .providers
            .iter()
            .filter(|n| n.department == entry.provider_code)
            .map(|n| (n.department.clone(), n.address.clone()))
            .collect::<Vec<_>>();
        if nodes.is_empty() {
            return Err(NodeError::Unavailable(format!(
                "department {} has no registered node serving resource {code}",
                entry.provider_code
            )));
        }
        Ok((resolved, nodes))
    }

    /// Calls `call` on the provider's nodes in turn until one answers (a status it sent is its answer).
    async fn call_provider<T, F, Fut>(&self, code: &str, call: F) -> Result<T, NodeError>
    where
        F: Fn(RelayClient<Channel>) -> Fut,
        Fut: std::future::Future<Output = Result<T, Status>>,
    {
        let mut last_error = String::new();
        for fresh in [false, true] {
            let (_, nodes) = self.providers(code, fresh).await?;
            for (department, address) in nodes {
                let client = self.consumer.peer(&department, &address)?;
                match call(client).await {
                    Ok(v) => return Ok(v),
                    Err(s) if std::error::Error::source(&s).is_none() && s.code() != tonic::Code::Unavailable => {
                        return Err(NodeError::Peer(s))
                    }
                    Err(s) => last_error = format!("{address}: {}", tls::error_chain(&s)),
                }
            }
            self.consumer.forget(code);
        }
        Err(NodeError::Unavailable(format!("no node of the provider of {code} could be reached: {last_error}")))
    }

    pub async fn subscribe(self: &Arc<Self>, app: &PeerIdentity, req: SubscribeRequest) -> Result<SubscribeResponse, NodeError> {
        check_code(&req.resource_code)?;
        let code = req.resource_code.clone();
        self.fresh()?;
        let (resolved, _) = self.providers(&code, false).await?;
        let provider = resolved.entry.clone().unwrap_or_default().provider_code;
        if provider == self.x.me.department {
            return Err(NodeError::FailedPrecondition(format!(
                "resource {code} is this department's own: its changes are published here, not subscribed to"
            )));
        }
        let timeout = self.settings.call_timeout;
        let resp = self
            .call_provider(&code, |mut client| {
                let code = code.clone();
                async move {
                    let mut r = Request::new(RelaySubscribeRequest { resource_code: code });
                    r.set_timeout(timeout);
                    client.subscribe(r).await.map(|r| r.into_inner())
                }
            })
            .await?;
        let existing = self.inbox.subscription(&code)?;
        let sub = match existing {
            // Same subscription at the provider: keep the inbox and positions.
            Some(s) if s.active && resp.existed && s.received_upto_seq >= resp.start_seq => s,
            _ => {
                let sub = Subscription {
                    resource_code: code.clone(),
                    provider_code: provider.clone(),
                    consumer_code: self.x.me.department.clone(),
                    received_upto_seq: resp.start_seq,
                    acked_upto_seq: resp.start_seq,
                    start_seq: resp.start_seq,
                    active: true,
                    ..Default::default()
                };
                let inbox_sub = sub.clone();
                let this = self.clone();
                blocking(move || this.inbox.start(&inbox_sub)).await?;
                tracing::info!(caller = %app, resource = %code, provider = %provider, start_seq = resp.start_seq, "subscribed");
                sub
            }
        };
        self.spawn_receiver(&code);
        Ok(SubscribeResponse {
            provider_code: provider,
            start_seq: sub.start_seq,
            existed: resp.existed,
            data_items: resp.data_items,
            masked_items: resp.masked_items,
        })
    }

    pub async fn unsubscribe(&self, app: &PeerIdentity, req: UnsubscribeRequest) -> Result<UnsubscribeResponse, NodeError> {
        check_code(&req.resource_code)?;
        let code = req.resource_code.clone();
        let Some(mut sub) = self.inbox.subscription(&code)?.filter(|s| s.active) else {
            return Ok(UnsubscribeResponse { existed: false });
        };
        let timeout = self.settings.call_timeout;
        self.call_provider(&code, |mut client| {
            let code = code.clone();
            async move {
                let mut r = Request::new(RelayUnsubscribeRequest { resource_code: code });
                r.set_timeout(timeout);
                client.unsubscribe(r).await.map(|r| r.into_inner())
            }
        })
        .await?;
        if let Some(task) = self.tasks.lock().expect("event tasks").remove(&code) {
            task.abort();
        }
        self.update_consumer_live(&code, |l| l.connected = false);
        if let Some(ended) = self.inbox.end(&code, &format!("unsubscribed by {}", app.name))? {
            sub = ended;
        }
        self.notify_received(&code, sub.received_upto_seq);
        tracing::info!(caller = %app, resource = %code, "unsubscribed");
        Ok(UnsubscribeResponse { existed: true })
    }

    /// Starts the delivery task of a subscription unless it runs.
    pub(crate) fn spawn_receiver(self: &Arc<Self>, code: &str) {
        let mut tasks = self.tasks.lock().expect("event tasks");
        if tasks.get(code).is_some_and(|t| !t.is_finished()) {
            return;
        }
        let this = self.clone();
        let c = code.to_string();
        tasks.insert(code.to_string(), tokio::spawn(async move { this.receive_loop(c).await }));
    }

    async fn receive_loop(self: Arc<Self>, code: String) {
        let mut shutdown = self.shutdown.clone();
        let mut backoff = Duration::from_millis(100);
        loop {
            if *shutdown.borrow() {
                return;
            }
            match self.inbox.subscription(&code) {
                Ok(Some(s)) if s.active => {}
                _ => return,
            }
            let result = self.receive_stream(&code, &mut backoff).await;
            self.update_consumer_live(&code, |l| l.connected = false);
            match result {
                Ok(StreamEnd::Ended(reason)) => {
                    if let Err(e) = self.end_local(&code, &reason) {
                        tracing::error!(resource = %code, error = %e, "could not record the end of a subscription");
                    }
                    return;
                }
                Ok(StreamEnd::Closed) => {}
                Err(e) => {
                    tracing::warn!(resource = %code, error = %e, retry_in_ms = backoff.as_millis() as u64, "event stream failed");
                    self.update_consumer_live(&code, |l| l.last_error = e.to_string());
                }
            }
            tokio::select! {
                _ = tokio::time::sleep(backoff) => {}
                _ = shutdown.changed() => return,
            }
            backoff = (backoff * 2).min(self.settings.max_backoff);
        }
    }

    fn end_local(&self, code: &str, reason: &str) -> Result<(), NodeError> {
        if let Some(sub) = self.inbox.end(code, reason)? {
            self.notify_received(code, sub.received_upto_seq);
            tracing::info!(resource = %code, reason, "subscription ended by the provider");
        }
        Ok(())
    }

    /// One stream's life: open, store and acknowledge deliveries until it ends.
    async fn receive_stream(self: &Arc<Self>, code: &str, backoff: &mut Duration) -> Result<StreamEnd, NodeError> {
        self.fresh()?;
        let Some(sub) = self.inbox.subscription(code)? else { return Ok(StreamEnd::Ended("gone".into())) };
        // Each attempt needs its own acknowledgement channel: a request stream is consumed by its call.
        let first_ack = EventAck { resource_code: code.to_string(), received_upto_seq: sub.received_upto_seq };
        let ack_tx = std::sync::Mutex::new(None);
        let opened = self
            .call_provider(code, |mut client| {
                let (tx, rx) = mpsc::channel::<EventAck>(64);
                let _ = tx.try_send(first_ack.clone());
                *ack_tx.lock().expect("ack sender") = Some(tx);
                async move { client.stream_events(ReceiverStream::new(rx)).await.map(|r| r.into_inner()) }
            })
            .await;
        let mut stream = match opened {
            Ok(s) => s,
            Err(NodeError::Peer(s)) if ends(&s) => return Ok(StreamEnd::Ended(s.message().to_string())),
            Err(e) => return Err(e),
        };
        // The stream opened, so the attempt that opened it left its sender.
        let ack_tx = ack_tx.into_inner().expect("ack sender").expect("an attempt was made");
        self.update_consumer_live(code, |l| {
            l.connected = true;
            l.last_error.clear();
        });
        *backoff = Duration::from_millis(100);
        let provider = sub.provider_code.clone();
        let mut shutdown = self.shutdown.clone();
        loop {
            let message = tokio::select! {
                m = stream.message() => m,
                _ = shutdown.changed() => return Ok(StreamEnd::Closed),
            };
            let delivery = match message {
                Ok(Some(d)) => d,
                Ok(None) => return Ok(StreamEnd::Closed),
                Err(s) if ends(&s) => return Ok(StreamEnd::Ended(s.message().to_string())),
                Err(s) => return Err(NodeError::Peer(s)),
            };
            if !delivery.ended_reason.is_empty() {
                return Ok(StreamEnd::Ended(delivery.ended_reason));
            }
            let mut events = delivery.events;
            let mut ended = None;
            // Deliveries already here go into the same inbox write.
            while events.len() < COALESCE_EVENTS {
                match stream.message().now_or_never() {
                    Some(Ok(Some(more))) => {
                        events.extend(more.events);
                        if !more.ended_reason.is_empty() {
                            ended = Some(more.ended_reason);
                            break;
                        }
                    }
                    _ => break,
                }
            }
            if !events.is_empty() {
                let (first, last, n) = (events[0].seq, events[events.len() - 1].seq, events.len());
                let mut audit = self.x.open_audit(
                    &crate::consumer::random_message_id(),
                    Side::Consumer,
                    &self.x.me.department,
                    &provider,
                    code,
                    &[],
                    0,
                    &self.x.me,
                    &format!("events {first}-{last}"),
                );
                let this = self.clone();
                let c = code.to_string();
                let appended = blocking(move || this.inbox.append(&c, events, now_unix_ms())).await?;
                let hwm = match appended {
                    Appended::Stored(hwm) => {
                        audit.response_in_us = crate::relay::now_us();
                        audit.response_out_us = audit.response_in_us;
                        audit.data_items = Vec::new();
                        audit.request_bytes = n as u64;
                        self.x.audit.append(audit).map_err(|e| NodeError::Audit(e.to_string()))?;
                        hwm
                    }
                    Appended::Duplicate(hwm) => hwm,
                };
                self.notify_received(code, hwm);
                self.update_consumer_live(code, |l| l.last_delivery_unix_ms = now_unix_ms());
                if ack_tx.send(EventAck { resource_code: code.to_string(), received_upto_seq: hwm }).await.is_err() {
                    return Ok(StreamEnd::Closed);
                }
            }
            if let Some(reason) = ended {
                return Ok(StreamEnd::Ended(reason));
            }
        }
    }

    /// `ReceiveEvents`: the inbox from `after_seq` on, then live; ends after the last event of an ended
    /// subscription with its reason.
    pub async fn receive(self: &Arc<Self>, req: ReceiveEventsRequest) -> Result<EventStream<ReceivedEvents>, NodeError> {
        check_code(&req.resource_code)?;
        let code = req.resource_code.clone();
        let Some(sub) = self.inbox.subscription(&code)? else {
            return Err(NodeError::NotFound(format!(
                "this node has no subscription to {code}: subscribe first (exchangectl events subscribe)"
            )));
        };
        let max = match req.max_batch {
            0 => self.settings.batch_events,
            n => (n as usize).min(self.settings.batch_events),
        };
        let mut after = if req.after_seq == 0 { sub.acked_upto_seq } else { req.after_seq };
        // Check the start now, so a position already dropped is an error of the call, not of the stream.
        let this = self.clone();
        let (s, a) = (sub.clone(), after);
        let mut pending = Some(blocking(move || this.inbox.read_after(&s, a, READ_EVENTS.max(max))).await?);
        let mut wake = self.received_watch(&code, sub.received_upto_seq);
        let (tx, rx) = mpsc::channel(4);
        let this = self.clone();
        tokio::spawn(async move {
            let mut shutdown = this.shutdown.clone();
            loop {
                wake.borrow_and_update();
                let events = match pending.take() {
                    Some(e) => Ok(e),
                    None => {
                        let t = this.clone();
                        let c = code.clone();
                        blocking(move || match t.inbox.subscription(&c)? {
                            Some(s) => t.inbox.read_after(&s, after, READ_EVENTS.max(max)),
                            None => Ok(Vec::new()),
                        })
                        .await
                    }
                };
                let events = match events {
                    Ok(e) => e,
                    Err(e) => {
                        let _ = tx.send(Err(Status::from(e))).await;
                        return;
                    }
                };
                if let Some(last) = events.last().map(|e| e.seq) {
                    after = last;
                    let mut events = events.into_iter().peekable();
                    while events.peek().is_some() {
                        let chunk: Vec<_> = events.by_ref().take(max).collect();
                        if tx.send(Ok(ReceivedEvents { resource_code: code.clone(), events: chunk, ended_reason: String::new() })).await.is_err() {
                            return;
                        }
                    }
                    continue;
                }
                match this.inbox.subscription(&code) {
                    Ok(Some(s)) if !s.active && after >= s.received_upto_seq => {
                        let _ = tx
                            .send(Ok(ReceivedEvents { resource_code: code.clone(), events: Vec::new(), ended_reason: s.ended_reason }))
                            .await;
                        return;
                    }
                    Ok(None) => return,
                    _ => {}
                }
                tokio::select! {
                    r = wake.changed() => if r.is_err() { return },
                    _ = shutdown.changed() => return,
                    _ = tx.closed() => return,
                }
            }
        });
        Ok(Box::pin(ReceiverStream::new(rx)))
    }

    pub async fn ack(self: &Arc<Self>, req: AckEventsRequest) -> Result<AckEventsResponse, NodeError> {
        check_code(&req.resource_code)?;
        let this = self.clone();
        let acked_upto_seq = blocking(move || this.inbox.ack(&req.resource_code, req.upto_seq)).await?;
        Ok(AckEventsResponse { acked_upto_seq })
    }

    /// `SyncSnapshot`: the provider's pages, passed through; the call is audited here as well.
    pub async fn sync_snapshot(
        &self,
        app: &PeerIdentity,
        req: SyncSnapshotRequest,
        allowed: Result<(), NodeError>,
    ) -> Result<EventStream<SnapshotPage>, NodeError> {
        let x = &self.x;
        let message_id = crate::consumer::random_message_id();
        let mut audit = x.open_audit(
            &message_id,
            Side::Consumer,
            &app.department,
            "",
            &req.resource_code,
            &[],
            0,
            app,
            &format!("snapshot: {}", req.purpose),
        );
        let opened = async {
            allowed?;
            check_code(&req.resource_code)?;
            self.fresh()?;
            let (resolved, _) = self.providers(&req.resource_code, false).await?;
            audit.provider = resolved.entry.clone().unwrap_or_default().provider_code;
            audit.request_out_us = crate::relay::now_us();
            let fetch = FetchSnapshotRequest {
                message_id: message_id.clone(),
                resource_code: req.resource_code.clone(),
                after_key: req.after_key.clone(),
                purpose: req.purpose.clone(),
                page_records: 0,
            };
            self.call_provider(&req.resource_code, |mut client| {
                let fetch = fetch.clone();
                async move { client.fetch_snapshot(fetch).await.map(|r| r.into_inner()) }
            })
            .await
        }
        .await;
        audit.response_in_us = crate::relay::now_us();
        match opened {
            Ok(stream) => {
                x.close_audit(audit, Ok(SnapshotPage::default()), |_| Vec::new())?;
                Ok(Box::pin(stream))
            }
            Err(e) => Err(x.close_audit::<SnapshotPage>(audit, Err(e), |_| Vec::new()).unwrap_err()),
        }
    }
}
