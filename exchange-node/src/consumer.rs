//! The consumer side of the relay: an application of this department asks for another department's
//! records; this node finds the provider, calls the provider's node over mutual TLS with its own node
//! certificate, records the call in its audit trail and hands back the answer.
//!
//! - **Resolution** (resource → catalog entry and provider nodes) comes from the directory and is kept
//!   for `resolve_cache_seconds`, and dropped at once when the catalog watch reports a change to the
//!   entry. The last answer is also kept on disk and used when the directory cannot be reached, as long
//!   as the node's copy of the directory's state is within `relay.max_directory_staleness_seconds`
//!   ([`crate::policy::Policy::check_fresh`]); past it, the node does not relay.
//! - **Connections** to provider nodes are pooled per (department, address): HTTP/2 multiplexes every
//!   concurrent query over one TLS connection. The provider must present a `node` certificate of the
//!   department the catalog names, not merely any valid certificate at that address.
//! - Keys are checked here too, against the record kind, so a malformed key is refused before anything
//!   is relayed.

use client_sdk::client::DirectoryChannel;
use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use client_sdk::identity::PeerIdentity;
use client_sdk::tls::{self, RevocationSet, TlsIdentity};
use exchange_proto::limits::MAX_MESSAGE_BYTES;
use exchange_proto::v1::directory_client::DirectoryClient;
use exchange_proto::v1::relay_client::RelayClient;
use exchange_proto::v1::{
    FetchRecordsRequest, QueryRecordsRequest, QueryRecordsResponse, ResolveResourceRequest,
    ResolveResourceResponse,
};
use prost::Message;
use tonic::transport::Channel;
use tonic::Request;
use tracing::Instrument;

use crate::audit::{AuditRecord, Side};
use crate::error::NodeError;
use crate::relay::{check_keys, check_request, now_us, Exchange};
use crate::state::now_unix_ms;

const TREE_RESOLVED: &str = "consumer_resolved";

/// Consumer-side settings (from the node config's `[relay]` table).
#[derive(Clone, Debug)]
pub struct ConsumerSettings {
    /// For error messages: where the directory was asked.
    pub directory_address: String,
    pub call_timeout: Duration,
    pub resolve_cache: Duration,
}

pub struct Consumer {
    exchange: Arc<Exchange>,
    directory: DirectoryClient<DirectoryChannel>,
    tls_identity: TlsIdentity,
    revoked: RevocationSet,
    settings: ConsumerSettings,
    resolved: Mutex<HashMap<String, (Arc<ResolveResourceResponse>, Instant)>>,
    resolved_disk: sled::Tree,
    peers: Mutex<HashMap<(String, String), RelayClient<Channel>>>,
}

pub(crate) fn random_message_id() -> String {
    let mut bytes = [0u8; 16];
    getrandom::fill(&mut bytes).expect("the OS random source");
    hex::encode(bytes)
}

impl Consumer {
    pub fn new(
        exchange: Arc<Exchange>,
        directory: DirectoryClient<DirectoryChannel>,
        tls_identity: TlsIdentity,
        revoked: RevocationSet,
        settings: ConsumerSettings,
        db: &sled::Db,
    ) -> Result<Self, NodeError> {
        Ok(Consumer {
            exchange,
            directory,
            tls_identity,
            revoked,
            settings,
            resolved: Mutex::default(),
            resolved_disk: db.open_tree(TREE_RESOLVED)?,
            peers: Mutex::default(),
        })
    }

    /// Drops the cached resolution of `resource_code` (its catalog entry changed).
    pub fn forget(&self, resource_code: &str) {
        self.resolved.lock().expect("resolve cache").remove(resource_code);
    }

    pub(crate) async fn resolve(&self, resource_code: &str, fresh: bool) -> Result<Arc<ResolveResourceResponse>, NodeError> {
        if !fresh {
            if let Some((r, at)) = self.resolved.lock().expect("resolve cache").get(resource_code) {
                if at.elapsed() < self.settings.resolve_cache {
                    return Ok(r.clone());
                }
            }
        }
        let mut req = Request::new(ResolveResourceRequest { resource_code: resource_code.to_string() });
        req.set_timeout(self.settings.call_timeout);
        match self.directory.clone().resolve_resource(req).await {
            Ok(resp) => {
                let resp = Arc::new(resp.into_inner());
                if let Err(e) = self.resolved_disk.insert(resource_code.as_bytes(), resp.encode_to_vec()) {
                    tracing::warn!(error = %e, "could not keep the resolution on disk");
                }
                self.resolved.lock().expect("resolve cache").insert(resource_code.to_string(), (resp.clone(), Instant::now()));
                Ok(resp)
            }
            Err(s) if s.code() == tonic::Code::NotFound => {
                Err(NodeError::NotFound(format!("resource {resource_code} is not in the catalog")))
            }
            Err(s) if s.code() == tonic::Code::InvalidArgument => {
                Err(NodeError::Directory(s))
            }
            Err(s) => {
                // The directory is unreachable or failing: fall back to the last answer, as long as the node's
                // copy of the directory's state is within relay.max_directory_staleness_seconds.
                let now = now_unix_ms();
                if self.exchange.policy.is_stale(now) {
                    let stale = self.exchange.policy.check_fresh(now).err().map(|e| e.to_string()).unwrap_or_default();
                    let directory = NodeError::from_directory(&self.settings.directory_address, s);
                    return Err(NodeError::Unavailable(format!("{directory}; {stale}")));
                }
                let from_memory = self.resolved.lock().expect("resolve cache").get(resource_code).map(|(r, _)| r.clone());
                let cached = match from_memory {
                    Some(r) => Some(r),
                    None => self
                        .resolved_disk
                        .get(resource_code.as_bytes())?
                        .and_then(|v| ResolveResourceResponse::decode(v.as_ref()).ok())
                        .map(Arc::new),
                };
                match cached {
                    Some(r) => {
                        tracing::warn!(resource = %resource_code, error = %s.message(), "directory unavailable; using the cached provider address");
                        Ok(r)
                    }
                    None => Err(NodeError::from_directory(&self.settings.directory_address, s)),
                }
            }
        }
    }

    /// Forgets the pooled connections to other nodes (after a certificate rotation): the next call opens a
    /// new one, which presents the node's new certificate. Calls in flight keep their connection until they
    /// finish; it closes when the last of them drops it.
    pub fn drop_connections(&self) {
        self.peers.lock().expect("peer pool").clear();
    }

    pub(crate) fn peer(&self, department: &str, address: &str) -> Result<RelayClient<Channel>, NodeError> {
        let key = (department.to_string(), address.to_string());
        let mut peers = self.peers.lock().expect("peer pool");
        if let Some(c) = peers.get(&key) {
            return Ok(c.clone());
        }
        let config = tls::peer_node_client_config(&self.tls_identity, department, self.revoked.clone())?;
        let channel = tls::connect_lazy(address, config)?;
        let client = RelayClient::new(channel)
            .max_decoding_message_size(MAX_MESSAGE_BYTES)
            .max_encoding_message_size(MAX_MESSAGE_BYTES);
        peers.insert(key, client.clone());
        Ok(client)
    }

    /// `QueryRecords` for `app`; always audited, a refused caller too (`allowed` is the service's
    /// authorization of the caller: this node's department, role app or operator).
    pub async fn query(
        &self,
        app: &PeerIdentity,
        body: QueryRecordsRequest,
        allowed: Result<(), NodeError>,
    ) -> Result<QueryRecordsResponse, NodeError> {
        let x = &self.exchange;
        let message_id = random_message_id();
        let mut audit = x.open_audit(
            &message_id,
            Side::Consumer,
            // The caller's department: this node's own, unless the call is refused for coming from another.
            &app.department,
            "",
            &body.resource_code,
            &body.keys,
            body.encoded_len(),
            app,
            &body.purpose,
        );
        // Every log line of this request, here and at the provider (which gets the same id), carries the
        // message id, so one request can be followed across departments.
        let span = tracing::info_span!("relay", message_id = %message_id, side = "consumer", resource = %audit.resource_code);
        let result = match allowed {
            Ok(()) => self.relay(&message_id, &body, &mut audit).instrument(span.clone()).await,
            Err(e) => Err(e),
        };
        let _entered = span.enter();
        let result = x.close_audit(audit, result, |r| r.data_items.clone());
        if result.is_ok() {
            tracing::debug!("relayed request answered");
        }
        result
    }

    async fn relay(
        &self,
        message_id: &str,
        body: &QueryRecordsRequest,
        audit: &mut AuditRecord,
    ) -> Result<QueryRecordsResponse, NodeError> {
        let violations = check_request(None, &body.resource_code, &body.keys, &body.purpose);
        if !violations.is_empty() {
            return Err(NodeError::InvalidArgument(violations));
        }
        // Provider addresses and revocations kept too long without the directory may no longer hold.
        self.exchange.policy.check_fresh(now_unix_ms())?;
        let mut resolved = self.resolve(&body.resource_code, false).await?;
        let entry = resolved.entry.clone().unwrap_or_default();
        audit.provider = entry.provider_code.clone();
        if entry.withdrawn {
            return Err(NodeError::NotFound(format!("resource {} has been withdrawn", body.resource_code)));
        }
        let violations = check_keys(&entry, &body.keys);
        if !violations.is_empty() {
            return Err(NodeError::InvalidArgument(violations));
        }
        let request = FetchRecordsRequest {
            message_id: message_id.to_string(),
            resource_code: body.resource_code.clone(),
            keys: body.keys.clone(),
            purpose: body.purpose.clone(),
        };
        // Try the provider's nodes, online first; on a connection failure re-resolve once (the provider
        // may have moved) and go on to the next address.
        let mut last_error = None;
        let mut re_resolved = false;
        loop {
            // The directory lists online nodes first.
            let candidates: Vec<(String, String)> = resolved
                .providers
                .iter()
                .filter(|n| n.department == entry.provider_code)
                .map(|n| (n.department.clone(), n.address.clone()))
                .collect();
            if candidates.is_empty() && last_error.is_none() {
                return Err(NodeError::Unavailable(format!(
                    "department {} has no registered node serving resource {}",
                    entry.provider_code, body.resource_code
                )));
            }
            for (department, address) in candidates {
                let mut client = self.peer(&department, &address)?;
                let mut req = Request::new(request.clone());
                req.set_timeout(self.settings.call_timeout);
                // The provider's `relay` span joins this one's trace (W3C traceparent; only when exporting).
                client_sdk::telemetry::inject_trace_context(&tracing::Span::current(), req.metadata_mut());
                audit.request_out_us = now_us();
                let answer = client.fetch_records(req).await;
                audit.response_in_us = now_us();
                match answer {
                    Ok(resp) => {
                        let resp = resp.into_inner();
                        return Ok(QueryRecordsResponse {
                            message_id: message_id.to_string(),
                            provider_code: entry.provider_code.clone(),
                            records: resp.records,
                            not_found: resp.not_found,
                            data_items: resp.data_items,
                            masked_items: resp.masked_items,
                        });
                    }
                    // A status the provider sent (it has a message and no transport source): pass it on.
                    Err(s) if std::error::Error::source(&s).is_none() && s.code() != tonic::Code::Unavailable => {
                        return Err(NodeError::Peer(s));
                    }
                    Err(s) => {
                        tracing::warn!(provider = %department, %address, error = %tls::error_chain(&s), "provider node unreachable");
                        last_error = Some(format!("{address}: {}", tls::error_chain(&s)));
                    }
                }
            }
            if re_resolved {
                break;
            }
            re_resolved = true;
            self.forget(&body.resource_code);
            resolved = self.resolve(&body.resource_code, true).await?;
        }
        Err(NodeError::Unavailable(format!(
            "no node of department {} could be reached for resource {}: {}",
            entry.provider_code,
            body.resource_code,
            last_error.unwrap_or_default()
        )))
    }
}
