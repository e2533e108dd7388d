//! The `ExchangeNode` gRPC service: what the department's own applications and operators call.
//!
//! Catalog writes are forwarded to the directory under the node's identity. The node only lets its own
//! department's `app` and `operator` certificates do that: the directory cannot tell who stood behind
//! the node, so the node is where that check has to happen. What the directory answers (including
//! INVALID_ARGUMENT with its field violations) goes back to the caller unchanged.

use std::sync::Arc;
use std::time::Duration;

use client_sdk::auth::{caller, require_role};
use client_sdk::identity::{PeerIdentity, Role};
use exchange_proto::v1::directory_client::DirectoryClient;
use exchange_proto::v1::exchange_node_server::ExchangeNode;
use exchange_proto::v1::{
    NodeStatusRequest, NodeStatusResponse, PublishEntriesRequest, PublishEntriesResponse, PutRecordsRequest,
    PutRecordsResponse, QueryAuditRequest, QueryAuditResponse, QueryRecordsRequest, QueryRecordsResponse,
    VerifyAuditRequest, VerifyAuditResponse, WithdrawEntriesRequest, WithdrawEntriesResponse,
};
use tonic::transport::Channel;
use tonic::{Request, Response, Status};

use crate::error::NodeError;
use crate::state::NodeState;

/// Deadline of a forwarded call to the directory (a large batch is validated and made durable there).
const FORWARD_TIMEOUT: Duration = Duration::from_secs(60);

pub struct NodeService {
    directory: DirectoryClient<Channel>,
    directory_address: String,
    state: Arc<NodeState>,
}

impl NodeService {
    pub fn new(directory: DirectoryClient<Channel>, directory_address: String, state: Arc<NodeState>) -> Self {
        NodeService { directory, directory_address, state }
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
        Ok(Response::new(self.state.status()))
    }

    async fn put_records(&self, _r: Request<PutRecordsRequest>) -> Result<Response<PutRecordsResponse>, Status> {
        Err(Status::unimplemented("TODO"))
    }
    async fn query_records(&self, _r: Request<QueryRecordsRequest>) -> Result<Response<QueryRecordsResponse>, Status> {
        Err(Status::unimplemented("TODO"))
    }
    async fn query_audit(&self, _r: Request<QueryAuditRequest>) -> Result<Response<QueryAuditResponse>, Status> {
        Err(Status::unimplemented("TODO"))
    }
    async fn verify_audit(&self, _r: Request<VerifyAuditRequest>) -> Result<Response<VerifyAuditResponse>, Status> {
        Err(Status::unimplemented("TODO"))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tonic::Code;

    fn identity(dept: &str, role: Role) -> PeerIdentity {
        PeerIdentity { department: dept.into(), role, name: format!("{dept}-{role}"), serial_hex: "01".into(), not_after_unix: 0 }
    }

    fn service() -> NodeService {
        // A lazy channel: nothing dials unless a call is forwarded.
        let channel = tonic::transport::Endpoint::from_static("http://127.0.0.1:1").connect_lazy();
        let state = Arc::new(NodeState::new(identity("tax", Role::Node), "127.0.0.1:7401".into()));
        NodeService::new(client_sdk::client::directory_client_on(channel), "127.0.0.1:1".into(), state)
    }

    fn with_caller<T>(message: T, id: PeerIdentity) -> Request<T> {
        let mut req = Request::new(message);
        req.extensions_mut().insert(id);
        req
    }

    #[tokio::test]
    async fn other_departments_and_roles_are_refused() {
        let svc = service();
        for id in [identity("commerce", Role::Operator), identity("tax", Role::Node), identity("tax", Role::Directory)] {
            let err = svc.publish_catalog(with_caller(PublishEntriesRequest::default(), id.clone())).await.unwrap_err();
            assert_eq!(err.code(), Code::PermissionDenied, "{id}");
            let err = svc.withdraw_catalog(with_caller(WithdrawEntriesRequest::default(), id.clone())).await.unwrap_err();
            assert_eq!(err.code(), Code::PermissionDenied, "{id}");
        }
        let err = svc.node_status(with_caller(NodeStatusRequest {}, identity("tax", Role::App))).await.unwrap_err();
        assert_eq!(err.code(), Code::PermissionDenied);
        let err = svc.node_status(with_caller(NodeStatusRequest {}, identity("commerce", Role::Operator))).await.unwrap_err();
        assert_eq!(err.code(), Code::PermissionDenied);
    }

    #[tokio::test]
    async fn own_operator_gets_status() {
        let svc = service();
        let status = svc.node_status(with_caller(NodeStatusRequest {}, identity("tax", Role::Operator))).await.unwrap();
        let status = status.into_inner();
        assert_eq!(status.department, "tax");
        assert_eq!(status.address, "127.0.0.1:7401");
        assert!(!status.registered);
    }

    #[tokio::test]
    async fn unreachable_directory_is_unavailable() {
        let svc = service();
        let err = svc
            .publish_catalog(with_caller(PublishEntriesRequest::default(), identity("tax", Role::App)))
            .await
            .unwrap_err();
        assert_eq!(err.code(), Code::Unavailable, "{err:?}");
        assert!(err.message().contains("unreachable"), "{}", err.message());
    }
}
