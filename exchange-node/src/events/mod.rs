//! Push subscriptions and bulk sync: durable store-and-forward delivery of record changes.
//!
//! (Being written; see docs/EVENTS.md.)

use std::pin::Pin;

use client_sdk::identity::PeerIdentity;
use exchange_proto::v1::*;
use futures::Stream;
use tonic::{Status, Streaming};

use crate::error::NodeError;

pub type EventStream<T> = Pin<Box<dyn Stream<Item = Result<T, Status>> + Send + 'static>>;

/// Both sides of event delivery on one node.
pub struct Events {}

fn todo<T>() -> Result<T, NodeError> {
    Err(NodeError::FailedPrecondition("not implemented yet".into()))
}

impl Events {
    pub async fn publish(&self, _app: &PeerIdentity, _req: PublishEventsRequest, _action: &str) -> Result<PublishEventsResponse, NodeError> {
        todo()
    }
    pub async fn subscribe(&self, _app: &PeerIdentity, _req: SubscribeRequest) -> Result<SubscribeResponse, NodeError> {
        todo()
    }
    pub async fn unsubscribe(&self, _app: &PeerIdentity, _req: UnsubscribeRequest) -> Result<UnsubscribeResponse, NodeError> {
        todo()
    }
    pub fn list(&self) -> Result<ListSubscriptionsResponse, NodeError> {
        todo()
    }
    pub async fn receive(&self, _req: ReceiveEventsRequest) -> Result<EventStream<ReceivedEvents>, NodeError> {
        todo()
    }
    pub async fn ack(&self, _req: AckEventsRequest) -> Result<AckEventsResponse, NodeError> {
        todo()
    }
    pub async fn sync_snapshot(&self, _app: &PeerIdentity, _req: SyncSnapshotRequest, _allowed: Result<(), NodeError>) -> Result<EventStream<SnapshotPage>, NodeError> {
        todo()
    }
    pub async fn relay_subscribe(&self, _node: &PeerIdentity, _req: RelaySubscribeRequest) -> Result<RelaySubscribeResponse, NodeError> {
        todo()
    }
    pub async fn relay_unsubscribe(&self, _node: &PeerIdentity, _req: RelayUnsubscribeRequest) -> Result<RelayUnsubscribeResponse, NodeError> {
        todo()
    }
    pub async fn stream_events(&self, _node: &PeerIdentity, _acks: Streaming<EventAck>) -> Result<EventStream<EventDelivery>, NodeError> {
        todo()
    }
    pub async fn fetch_snapshot(&self, _node: &PeerIdentity, _req: FetchSnapshotRequest) -> Result<EventStream<SnapshotPage>, NodeError> {
        todo()
    }
}
