//! The `ExchangeNode` gRPC service: what the department's own applications and operators call.
//!
//! Catalog writes are forwarded to the directory under the node's identity. The node only lets its own
//! department's `app` and `operator` certificates do that: the directory cannot tell who stood behind
//! the node, so the node is where that check has to happen. What the directory answers (including
//! INVALID_ARGUMENT with its field violations) goes back to the caller unchanged.

use client_sdk::client::DirectoryChannel;
use std::sync::Arc;
use std::time::Duration;

use client_sdk::auth::{caller, require_role};
use client_sdk::identity::{PeerIdentity, Role};
use exchange_proto::v1::directory_client::DirectoryClient;
use exchange_proto::v1::exchange_node_server::ExchangeNode;
use exchange_proto::v1::{
    AckEventsRequest, AckEventsResponse, ListSubscriptionsRequest, ListSubscriptionsResponse, PublishEventsRequest,
    PublishEventsResponse, ReceiveEventsRequest, ReceivedEvents, SnapshotPage, SubscribeRequest, SubscribeResponse,
    SyncSnapshotRequest, UnsubscribeRequest, UnsubscribeResponse,
    NodeStatusRequest, NodeStatusResponse, RecordChange, RecordChangeKind, PublishEntriesRequest, PublishEntriesResponse, PutRecordsRequest,
    PutRecordsResponse, QueryAuditRequest, QueryAuditResponse, QueryRecordsRequest, QueryRecordsResponse,
    VerifyAuditRequest, VerifyAuditResponse, WithdrawEntriesRequest, WithdrawEntriesResponse,
};
use tonic::{Request, Response, Status};

use crate::audit;
use crate::consumer::Consumer;
use crate::events::{EventStream, Events};
use crate::error::NodeError;
use crate::relay::Exchange;
use crate::state::NodeState;

/// Deadline of a forwarded call to the directory (a large batch is validated and made durable there).
const FORWARD_TIMEOUT: Duration = Duration::from_secs(60);

pub struct NodeService {
    directory: DirectoryClient<DirectoryChannel>,
    directory_address: String,
    state: Arc<NodeState>,
    exchange: Arc<Exchange>,
    consumer: Arc<Consumer>,
    events: Arc<Events>,
}

impl NodeService {
    pub fn new(
        directory: DirectoryClient<DirectoryChannel>,
        directory_address: String,
        state: Arc<NodeState>,
        exchange: Arc<Exchange>,
        consumer: Arc<Consumer>,
        events: Arc<Events>,
    ) -> Self {
        NodeService { directory, directory_address, state, exchange, consumer, events }
    }

    /// Refuses callers of another department, and roles other than `roles`.
    fn authorize(&self, id: &PeerIdentity, roles: &[Role], action: &str) -> Result<(), Status> {
        require_role(id, roles, action)?;
        let own = &self.state.identity.department;
        if &id.department != own {
            return Err(NodeError::PermissionDenied(format!(
                "{action}: this node serves department {own}; caller {} is of department {}",
                id.name, id.department
            ))
            .into());
        }
        Ok(())
    }

    /// The audit seal of this node the directory holds (its anchor), or why it could not be read.
    async fn audit_anchor(&self) -> Result<Option<exchange_proto::v1::AuditSeal>, String> {
        let me = &self.state.identity;
        let mut req = Request::new(exchange_proto::v1::ListNodesRequest { department: me.department.clone() });
        req.set_timeout(Duration::from_secs(5));
        match self.directory.clone().list_nodes(req).await {
            Ok(resp) => Ok(resp.into_inner().nodes.into_iter().find(|n| n.node_name == me.name).and_then(|n| n.audit_anchor)),
            Err(s) => Err(format!("the directory's anchor could not be read: {}", s.message())),
        }
    }

    fn forward<T>(&self, message: T) -> Request<T> {
        let mut req = Request::new(message);
        req.set_timeout(FORWARD_TIMEOUT);
        req
    }

    fn directory_error(&self, status: Status) -> Status {
        NodeError::from_directory(&self.directory_address, status).into()
    }
}

#[tonic::async_trait]
impl ExchangeNode for NodeService {
    async fn publish_catalog(
        &self,
        request: Request<PublishEntriesRequest>,
    ) -> Result<Response<PublishEntriesResponse>, Status> {
        let id = caller(&request)?.clone();
        self.authorize(&id, &[Role::App, Role::Operator], "PublishCatalog")?;
        let body = request.into_inner();
        let count = body.entries.len();
        let resp = self
            .directory
            .clone()
            .publish_entries(self.forward(body))
            .await
            .map_err(|s| self.directory_error(s))?
            .into_inner();
        self.state.published(count, resp.catalog_version);
        tracing::info!(caller = %id, entries = count, catalog_version = resp.catalog_version, "published catalog entries");
        Ok(Response::new(resp))
    }

    async fn withdraw_catalog(
        &self,
        request: Request<WithdrawEntriesRequest>,
    ) -> Result<Response<WithdrawEntriesResponse>, Status> {
        let id = caller(&request)?.clone();
        self.authorize(&id, &[Role::App, Role::Operator], "WithdrawCatalog")?;
        let body = request.into_inner();
        let codes = body.resource_codes.len();
        let resp = self
            .directory
            .clone()
            .withdraw_entries(self.forward(body))
            .await
            .map_err(|s| self.directory_error(s))?
            .into_inner();
        self.state.catalog_version_seen(resp.catalog_version);
        tracing::info!(caller = %id, entries = codes, catalog_version = resp.catalog_version, "withdrew catalog entries");
        Ok(Response::new(resp))
    }

    async fn node_status(&self, request: Request<NodeStatusRequest>) -> Result<Response<NodeStatusResponse>, Status> {
        let id = caller(&request)?;
        self.authorize(id, &[Role::Operator], "NodeStatus")?;
        let x = &self.exchange;
        let mut status = self.state.status();
        status.grants_version = x.policy.grants_version();
        status.revocations_version = x.policy.revocations_version();
        status.catalog_version = status.catalog_version.max(x.policy.catalog_version());
        status.provided_resources = x.policy.provided_resources();
        status.active_grants = x.policy.active_grants(crate::state::now_unix_ms());
        status.directory_watch_connected = x.policy.all_connected();
        status.audit_entries = x.audit.len();
        status.records_stored = x.records.count().unwrap_or(0);
        let now = crate::state::now_unix_ms();
        status.directory_state_age_seconds = x.policy.directory_state_age(now).as_secs();
        status.directory_max_staleness_seconds = x.policy.max_staleness().as_secs();
        status.directory_state_stale = x.policy.is_stale(now);
        let (as_provider, as_consumer, outbox, inbox) = self.events.status_counts();
        status.subscriptions_as_provider = as_provider;
        status.subscriptions_as_consumer = as_consumer;
        status.outbox_backlog = outbox;
        status.inbox_backlog = inbox;
        Ok(Response::new(status))
    }

    async fn put_records(&self, request: Request<PutRecordsRequest>) -> Result<Response<PutRecordsResponse>, Status> {
        let id = caller(&request)?.clone();
        self.authorize(&id, &[Role::App, Role::Operator], "PutRecords")?;
        let body = request.into_inner();
        let stored = body.records.len() as u64;
        // A put is a publish whose change kinds the store works out (CREATED or UPDATED).
        let changes = body
            .records
            .into_iter()
            .map(|record| RecordChange { record: Some(record), kind: RecordChangeKind::Unspecified as i32 })
            .collect();
        let resp = self
            .events
            .publish(&id, PublishEventsRequest { resource_code: body.resource_code, changes, batch_id: body.batch_id }, "PutRecords")
            .await?;
        let stored = if resp.duplicate { 0 } else { stored };
        Ok(Response::new(PutRecordsResponse { stored, first_seq: resp.first_seq, last_seq: resp.last_seq, duplicate: resp.duplicate }))
    }

    async fn publish_events(
        &self,
        request: Request<PublishEventsRequest>,
    ) -> Result<Response<PublishEventsResponse>, Status> {
        let id = caller(&request)?.clone();
        self.authorize(&id, &[Role::App, Role::Operator], "PublishEvents")?;
        Ok(Response::new(self.events.publish(&id, request.into_inner(), "PublishEvents").await?))
    }

    async fn subscribe(&self, request: Request<SubscribeRequest>) -> Result<Response<SubscribeResponse>, Status> {
        let id = caller(&request)?.clone();
        self.authorize(&id, &[Role::App, Role::Operator], "Subscribe")?;
        Ok(Response::new(self.events.subscribe(&id, request.into_inner()).await?))
    }

    async fn unsubscribe(&self, request: Request<UnsubscribeRequest>) -> Result<Response<UnsubscribeResponse>, Status> {
        let id = caller(&request)?.clone();
        self.authorize(&id, &[Role::App, Role::Operator], "Unsubscribe")?;
        Ok(Response::new(self.events.unsubscribe(&id, request.into_inner()).await?))
    }

    async fn list_subscriptions(
        &self,
        request: Request<ListSubscriptionsRequest>,
    ) -> Result<Response<ListSubscriptionsResponse>, Status> {
        let id = caller(&request)?.clone();
        self.authorize(&id, &[Role::App, Role::Operator], "ListSubscriptions")?;
        Ok(Response::new(self.events.list()?))
    }

    type ReceiveEventsStream = EventStream<ReceivedEvents>;

    async fn receive_events(
        &self,
        request: Request<ReceiveEventsRequest>,
    ) -> Result<Response<Self::ReceiveEventsStream>, Status> {
        let id = caller(&request)?.clone();
        self.authorize(&id, &[Role::App, Role::Operator], "ReceiveEvents")?;
        Ok(Response::new(self.events.receive(request.into_inner()).await?))
    }

    async fn ack_events(&self, request: Request<AckEventsRequest>) -> Result<Response<AckEventsResponse>, Status> {
        let id = caller(&request)?.clone();
        self.authorize(&id, &[Role::App, Role::Operator], "AckEvents")?;
        Ok(Response::new(self.events.ack(request.into_inner()).await?))
    }

    type SyncSnapshotStream = EventStream<SnapshotPage>;

    async fn sync_snapshot(
        &self,
        request: Request<SyncSnapshotRequest>,
    ) -> Result<Response<Self::SyncSnapshotStream>, Status> {
        let id = caller(&request)?.clone();
        // A refused caller is audited too, as for QueryRecords.
        let allowed = self
            .authorize(&id, &[Role::App, Role::Operator], "SyncSnapshot")
            .map_err(|s| NodeError::PermissionDenied(s.message().to_string()));
        Ok(Response::new(self.events.sync_snapshot(&id, request.into_inner(), allowed).await?))
    }

    async fn query_records(
        &self,
        request: Request<QueryRecordsRequest>,
    ) -> Result<Response<QueryRecordsResponse>, Status> {
        let id = caller(&request)?.clone();
        // A refused caller is audited too: the attempt reached this node.
        let allowed = self
            .authorize(&id, &[Role::App, Role::Operator], "QueryRecords")
            .map_err(|s| NodeError::PermissionDenied(s.message().to_string()));
        let resp = self.consumer.query(&id, request.into_inner(), allowed).await?;
        Ok(Response::new(resp))
    }

    async fn query_audit(&self, request: Request<QueryAuditRequest>) -> Result<Response<QueryAuditResponse>, Status> {
        let id = caller(&request)?.clone();
        self.authorize(&id, &[Role::Operator], "QueryAudit")?;
        let body = request.into_inner();
        let audit = self.exchange.audit.clone();
        let hasher = self.exchange.hasher.clone();
        let (entries, truncated, total_entries) = tokio::task::spawn_blocking(move || audit::query(&*audit, &body, &hasher))
            .await
            .map_err(|e| NodeError::Store(format!("audit task: {e}")))?
            .map_err(NodeError::from)?;
        Ok(Response::new(QueryAuditResponse { entries, total_entries, truncated }))
    }

    async fn verify_audit(&self, request: Request<VerifyAuditRequest>) -> Result<Response<VerifyAuditResponse>, Status> {
        let id = caller(&request)?.clone();
        self.authorize(&id, &[Role::Operator], "VerifyAudit")?;
        let audit = self.exchange.audit.clone();
        let anchor = self.audit_anchor().await;
        let report = tokio::task::spawn_blocking(move || {
            let mut report = audit.verify_report();
            match anchor {
                Ok(Some(seal)) => {
                    report.anchor_checked = true;
                    report.anchored_upto_seq = seal.upto_seq;
                    let seal = audit::Seal {
                        upto_seq: seal.upto_seq,
                        chain_hash: seal.chain_hash,
                        sealed_at_us: seal.sealed_at_us,
                        signature: seal.signature,
                    };
                    if let Err(mismatch) = audit.check_anchor(&seal) {
                        // The local chain may verify on its own and still have lost sealed entries.
                        if report.intact || mismatch.seq() < report.problem_seq {
                            report.problem_seq = mismatch.seq();
                            report.problem = mismatch.to_string();
                        }
                        report.intact = false;
                    }
                }
                Ok(None) => report.anchor_note = "the directory holds no audit seal of this node yet".into(),
                Err(why) => report.anchor_note = why,
            }
            report
        })
        .await
        .map_err(|e| NodeError::Store(format!("audit task: {e}")))?;
        if !report.intact {
            tracing::error!(problem = %report.problem, seq = report.problem_seq, caller = %id, "audit trail verification failed");
        }
        Ok(Response::new(report))
    }
}
