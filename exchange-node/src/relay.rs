//! The provider side of the relay: the `Relay` service other departments' nodes call.
//!
//! Order of a `FetchRecords` call, each step refusing with its own status:
//! 1. the caller must be a `node` certificate (an application cannot reach another department's data
//!    except through its own node, which records the call); its department is the consumer;
//! 2. the request is checked (INVALID_ARGUMENT, nothing read);
//! 3. [`Policy::authorize`]: the catalog entry's share type and the consumer's grant;
//! 4. the provider's quota for this consumer and resource (RESOURCE_EXHAUSTED with RetryInfo);
//! 5. the keys are checked against the record kind (a malformed identity number is never looked up);
//! 6. the records are read and cut down to the allowed items, identity numbers masked where not granted;
//! 7. the call is appended to the audit trail — whatever the outcome. If the audit trail cannot be
//!    written, the answer is withheld: nothing leaves the node unrecorded.

use std::sync::Arc;
use std::time::Duration;

use tracing::Instrument;

use client_sdk::auth::caller;
use client_sdk::identity::{PeerIdentity, Role};
use exchange_proto::limits::MAX_QUERY_KEYS;
use exchange_proto::v1::relay_server::Relay;
use exchange_proto::v1::{
    CatalogEntry, EventAck, EventDelivery, FetchRecordsRequest, FetchRecordsResponse, FetchSnapshotRequest, RecordKind,
    RelaySubscribeRequest, RelaySubscribeResponse, RelayUnsubscribeRequest, RelayUnsubscribeResponse, SnapshotPage,
};
use prost::Message;
use tonic::{Request, Response, Status, Streaming};

use crate::events::{EventStream, Events};

use crate::audit::{AuditLog, AuditRecord, KeyHasher, Side};
use crate::error::{NodeError, Violation};
use crate::policy::Policy;
use crate::quota::QuotaTable;
use crate::records::disclosure;
use crate::records::RecordStore;
use crate::state::now_unix_ms;

/// Longest message id accepted (the consumer's node picks it; 32 hex characters in practice).
const MAX_MESSAGE_ID_CHARS: usize = 64;
/// Requests with at most this many keys read the record store on the async thread.
const INLINE_READ_KEYS: usize = 16;
/// Longest purpose text accepted.
pub const MAX_PURPOSE_CHARS: usize = 500;

pub fn now_us() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_micros() as i64)
        .unwrap_or(0)
}

/// What both sides of the relay need to check, read and record.
pub struct Exchange {
    pub me: PeerIdentity,
    pub policy: Arc<Policy>,
    pub records: Arc<dyn RecordStore>,
    pub audit: Arc<AuditLog>,
    pub hasher: Arc<KeyHasher>,
    pub quotas: Arc<QuotaTable>,
    /// Relayed traffic per peer department and resource, for the admin port.
    pub metrics: Arc<client_sdk::admin::metrics::Metrics>,
}

impl Exchange {
    /// This department's catalog entry for `resource_code`, from the node's copy or else the directory.
    pub async fn own_entry(
        &self,
        resource_code: &str,
        directory: &exchange_proto::v1::directory_client::DirectoryClient<client_sdk::client::DirectoryChannel>,
    ) -> Result<Arc<CatalogEntry>, NodeError> {
        if let Some(e) = self.policy.own_entry(resource_code) {
            return Ok(e);
        }
        // Not (yet) in the node's copy: the catalog watch may not have caught up since the entry was
        // published. Ask the directory once; the answer is kept.
        let not_ours = || {
            NodeError::NotFound(format!(
                "resource {resource_code} is not published by department {}",
                self.me.department
            ))
        };
        let mut req = Request::new(exchange_proto::v1::GetEntryRequest {
            resource_code: resource_code.to_string(),
            include_withdrawn: true,
        });
        req.set_timeout(std::time::Duration::from_secs(5));
        match directory.clone().get_entry(req).await {
            Ok(resp) => {
                let entry = resp.into_inner();
                if entry.provider_code != self.me.department {
                    return Err(NodeError::PermissionDenied(format!(
                        "resource {resource_code} is published by department {}, not {}: a node serves and stores \
                         only its own department's records",
                        entry.provider_code, self.me.department
                    )));
                }
                self.policy.learn_entry(entry)
            }
            Err(s) if s.code() == tonic::Code::NotFound => Err(not_ours()),
            Err(s) if s.code() == tonic::Code::InvalidArgument => {
                Err(NodeError::invalid("resource_code", s.message().to_string()))
            }
            Err(s) => Err(NodeError::Unavailable(format!(
                "resource {resource_code} is not in this node's copy of the catalog and the directory cannot be asked: {}",
                s.message()
            ))),
        }
    }

    /// The provider's quota for `consumer` on `resource_code` (RESOURCE_EXHAUSTED with when to retry).
    pub fn check_quota(&self, consumer: &str, resource_code: &str) -> Result<(), NodeError> {
        self.quotas.check(consumer, resource_code).map_err(|wait| NodeError::ResourceExhausted {
            message: format!(
                "department {consumer} has used its quota for resource {resource_code} at department {}; retry in {} ms",
                self.me.department,
                wait.as_millis() + 1
            ),
            retry_after: wait,
        })
    }

    /// The audit entry of a call that arrived now; the relay fills in the rest as it goes.
    #[allow(clippy::too_many_arguments)]
    pub fn open_audit(
        &self,
        message_id: &str,
        side: Side,
        consumer: &str,
        provider: &str,
        resource_code: &str,
        keys: &[String],
        request_bytes: usize,
        caller: &PeerIdentity,
        purpose: &str,
    ) -> AuditRecord {
        AuditRecord {
            message_id: message_id.chars().take(MAX_MESSAGE_ID_CHARS).collect(),
            side,
            consumer: consumer.to_string(),
            provider: provider.to_string(),
            // Bounded: the fields come from the caller and may be refused as too long.
            resource_code: resource_code.chars().take(64).collect(),
            key_hash: self.hasher.hash_keys(keys),
            data_items: Vec::new(),
            result_code: 0,
            request_bytes: request_bytes as u64,
            response_bytes: 0,
            request_in_us: now_us(),
            request_out_us: 0,
            response_in_us: 0,
            response_out_us: 0,
            caller: caller.name.clone(),
            purpose: purpose.chars().take(MAX_PURPOSE_CHARS).collect(),
            error: String::new(),
        }
    }

    /// Completes `audit` with the outcome and appends it. An answer that cannot be recorded is withheld:
    /// the append's failure replaces the result.
    pub fn close_audit<T: Message>(
        &self,
        mut audit: AuditRecord,
        result: Result<T, NodeError>,
        data_items: impl FnOnce(&T) -> Vec<String>,
    ) -> Result<T, NodeError> {
        match &result {
            Ok(resp) => {
                audit.response_bytes = resp.encoded_len() as u64;
                audit.data_items = data_items(resp);
            }
            Err(e) => {
                audit.result_code = status_code_of(e) as i32;
                audit.error = e.to_string();
                tracing::info!(message_id = %audit.message_id, side = audit.side.as_str(), consumer = %audit.consumer, resource = %audit.resource_code, error = %e, "relay request refused");
            }
        }
        audit.response_out_us = now_us();
        self.count(&audit);
        self.audit.append(audit).map_err(|e| NodeError::Audit(e.to_string()))?;
        result
    }

    /// Counts a relayed call for the metrics, from its audit entry (which has side, peer, resource,
    /// outcome and timing already).
    fn count(&self, audit: &AuditRecord) {
        use client_sdk::admin::metrics::Direction;
        let (direction, peer) = match audit.side {
            Side::Provider => (Direction::Inbound, &audit.consumer),
            Side::Consumer => (Direction::Outbound, &audit.provider),
        };
        let code = tonic::Code::from_i32(audit.result_code);
        // A resource code the caller made up must not become a metric label: bad or unknown resources are
        // counted under one name.
        let resource = match code {
            tonic::Code::InvalidArgument | tonic::Code::NotFound => "(unknown)",
            _ => audit.resource_code.as_str(),
        };
        let peer = if peer.is_empty() { "(unresolved)" } else { peer.as_str() };
        let elapsed = Duration::from_micros((audit.response_out_us - audit.request_in_us).max(0) as u64);
        self.metrics.relay(direction, peer, resource, code, elapsed);
    }
}

/// Checks a key against the record kind: USCC for enterprises, identity number for population records.
/// The description never quotes an identity number.
pub fn check_key(kind: i32, key: &str) -> Result<(), String> {
    match RecordKind::try_from(kind) {
        Ok(RecordKind::Enterprise) => client_sdk::ids::validate_uscc(key).map_err(|e| e.to_string()),
        Ok(RecordKind::Population) => client_sdk::ids::validate_identity_number(key).map_err(|e| e.to_string()),
        _ => {
            if key.is_empty() || key.chars().count() > 128 || key.chars().any(char::is_control) {
                Err("a key is 1 to 128 characters without control characters".into())
            } else {
                Ok(())
            }
        }
    }
}

/// Checks the shape of a relay request (message id, resource code, key count, purpose).
pub fn check_request(message_id: Option<&str>, resource_code: &str, keys: &[String], purpose: &str) -> Vec<Violation> {
    let mut v = Vec::new();
    if let Some(id) = message_id {
        if id.is_empty()
            || id.len() > MAX_MESSAGE_ID_CHARS
            || !id.chars().all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_')
        {
            v.push(Violation::new("message_id", "1 to 64 characters: letters, digits, - and _"));
        }
    }
    if resource_code.is_empty() {
        v.push(Violation::new("resource_code", "required"));
    }
    if keys.is_empty() {
        v.push(Violation::new("keys", "at least one key is required"));
    } else if keys.len() > MAX_QUERY_KEYS {
        v.push(Violation::new("keys", format!("at most {MAX_QUERY_KEYS} keys per call; got {}", keys.len())));
    }
    if purpose.chars().count() > MAX_PURPOSE_CHARS {
        v.push(Violation::new("purpose", format!("at most {MAX_PURPOSE_CHARS} characters")));
    }
    v
}

/// The key violations of `keys` for `entry`'s record kind (`keys[i]`).
pub fn check_keys(entry: &CatalogEntry, keys: &[String]) -> Vec<Violation> {
    keys.iter()
        .enumerate()
        .filter_map(|(i, k)| check_key(entry.record_kind, k).err().map(|why| Violation::new(format!("keys[{i}]"), why)))
        .collect()
}

/// The `Relay` gRPC service.
pub struct RelayService {
    exchange: Arc<Exchange>,
    directory: exchange_proto::v1::directory_client::DirectoryClient<client_sdk::client::DirectoryChannel>,
    events: Arc<Events>,
}

impl RelayService {
    pub fn new(
        exchange: Arc<Exchange>,
        directory: exchange_proto::v1::directory_client::DirectoryClient<client_sdk::client::DirectoryChannel>,
        events: Arc<Events>,
    ) -> Self {
        RelayService { exchange, directory, events }
    }

    async fn serve(
        &self,
        id: &PeerIdentity,
        body: &FetchRecordsRequest,
        audit: &mut AuditRecord,
    ) -> Result<FetchRecordsResponse, NodeError> {
        let x = &self.exchange;
        if id.role != Role::Node {
            return Err(NodeError::PermissionDenied(format!(
                "FetchRecords is node-to-node: it needs a node certificate; {} has role {}. \
                 Applications query through their own department's node (QueryRecords)",
                id.name, id.role
            )));
        }
        let violations = check_request(Some(&body.message_id), &body.resource_code, &body.keys, &body.purpose);
        if !violations.is_empty() {
            return Err(NodeError::InvalidArgument(violations));
        }
        // Rules kept too long without the directory may no longer hold (relay.max_directory_staleness_seconds).
        x.policy.check_fresh(now_unix_ms())?;
        let entry = x.own_entry(&body.resource_code, &self.directory).await?;
        let decision = x.policy.authorize(&id.department, entry, now_unix_ms())?;
        x.check_quota(&id.department, &body.resource_code)?;
        let violations = check_keys(&decision.entry, &body.keys);
        if !violations.is_empty() {
            return Err(NodeError::InvalidArgument(violations));
        }

        audit.request_out_us = now_us();
        // A few keys are a few microseconds of sled reads (from its cache, usually): cheaper inline than the
        // hand-off to the blocking pool, which cost more than the reads themselves. Large batches go there.
        let found = if body.keys.len() <= INLINE_READ_KEYS {
            x.records.get_many(&body.resource_code, &body.keys)
        } else {
            let records = x.records.clone();
            let code = body.resource_code.clone();
            let keys = body.keys.clone();
            tokio::task::spawn_blocking(move || records.get_many(&code, &keys))
                .await
                .map_err(|e| NodeError::Store(format!("record store task: {e}")))?
        }
        .map_err(|e| NodeError::Store(e.to_string()))?;
        audit.response_in_us = now_us();

        let d = disclosure::disclosure(&decision.entry, decision.granted_items.as_deref());
        let mut response = FetchRecordsResponse {
            data_items: d.data_items.clone(),
            masked_items: d.masked_items.clone(),
            ..Default::default()
        };
        for (i, record) in found.into_iter().enumerate() {
            match record {
                Some(r) => response.records.push(disclosure::apply(&d, &decision.entry, r)),
                None => response.not_found.push(i as u32),
            }
        }
        if body.keys.len() == 1 && response.records.is_empty() {
            return Err(NodeError::NotFound(format!(
                "no record with this key in resource {} at department {}",
                body.resource_code, x.me.department
            )));
        }
        Ok(response)
    }
}

#[tonic::async_trait]
impl Relay for RelayService {
    async fn fetch_records(
        &self,
        request: Request<FetchRecordsRequest>,
    ) -> Result<Response<FetchRecordsResponse>, Status> {
        let id = caller(&request)?.clone();
        let (metadata, _, body) = request.into_parts();
        let x = &self.exchange;
        let mut audit = x.open_audit(
            &body.message_id,
            Side::Provider,
            &id.department,
            &x.me.department,
            &body.resource_code,
            &body.keys,
            body.encoded_len(),
            &id,
            &body.purpose,
        );
        // The consumer's message id (bounded by open_audit) on every log line of this request.
        let span = tracing::info_span!("relay", message_id = %audit.message_id, side = "provider", consumer = %id.department, resource = %audit.resource_code);
        client_sdk::telemetry::set_remote_parent(&span, &metadata);
        let result = self.serve(&id, &body, &mut audit).instrument(span.clone()).await;
        let _entered = span.enter();
        let result = x.close_audit(audit, result, |r| r.data_items.clone());
        if result.is_ok() {
            tracing::debug!("relayed request served");
        }
        result.map(Response::new).map_err(Status::from)
    }

    async fn subscribe(
        &self,
        request: Request<RelaySubscribeRequest>,
    ) -> Result<Response<RelaySubscribeResponse>, Status> {
        let id = caller(&request)?.clone();
        Ok(Response::new(self.events.relay_subscribe(&id, request.into_inner()).await?))
    }

    async fn unsubscribe(
        &self,
        request: Request<RelayUnsubscribeRequest>,
    ) -> Result<Response<RelayUnsubscribeResponse>, Status> {
        let id = caller(&request)?.clone();
        Ok(Response::new(self.events.relay_unsubscribe(&id, request.into_inner()).await?))
    }

    type StreamEventsStream = EventStream<EventDelivery>;

    async fn stream_events(
        &self,
        request: Request<Streaming<EventAck>>,
    ) -> Result<Response<Self::StreamEventsStream>, Status> {
        let id = caller(&request)?.clone();
        Ok(Response::new(self.events.stream_events(&id, request.into_inner()).await?))
    }

    type FetchSnapshotStream = EventStream<SnapshotPage>;

    async fn fetch_snapshot(
        &self,
        request: Request<FetchSnapshotRequest>,
    ) -> Result<Response<Self::FetchSnapshotStream>, Status> {
        let id = caller(&request)?.clone();
        Ok(Response::new(self.events.fetch_snapshot(&id, request.into_inner()).await?))
    }
}

/// The gRPC code a [`NodeError`] becomes, without building the status (for audit entries).
pub fn status_code_of(e: &NodeError) -> tonic::Code {
    use tonic::Code;
    match e {
        NodeError::InvalidArgument(_) => Code::InvalidArgument,
        NodeError::PermissionDenied(_) => Code::PermissionDenied,
        NodeError::NotFound(_) => Code::NotFound,
        NodeError::FailedPrecondition(_) => Code::FailedPrecondition,
        NodeError::OutOfRange(_) => Code::OutOfRange,
        NodeError::DataLoss(_) => Code::DataLoss,
        NodeError::ResourceExhausted { .. } => Code::ResourceExhausted,
        NodeError::Unavailable(_) | NodeError::DirectoryUnreachable { .. } => Code::Unavailable,
        NodeError::Peer(s) | NodeError::Directory(s) => s.code(),
        _ => Code::Internal,
    }
}
