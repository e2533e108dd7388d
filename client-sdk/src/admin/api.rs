//! The admin port's JSON documents, shared by the servers that write them and by `exchangectl` and the
//! console that read them. Every field has a default, so an older `exchangectl` reads a newer server.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

/// One named readiness check (`/readyz`).
#[derive(Clone, Debug, Default, Serialize, Deserialize, PartialEq)]
#[serde(default)]
pub struct HealthCheck {
    pub name: String,
    pub ok: bool,
    pub detail: String,
}

/// `GET /readyz`.
#[derive(Clone, Debug, Default, Serialize, Deserialize)]
#[serde(default)]
pub struct Readiness {
    pub ready: bool,
    pub maintenance: bool,
    pub checks: Vec<HealthCheck>,
}

/// Who the server is, from its certificate.
#[derive(Clone, Debug, Default, Serialize, Deserialize)]
#[serde(default)]
pub struct IdentityInfo {
    pub department: String,
    pub role: String,
    pub name: String,
    pub serial_hex: String,
}

/// The server certificate in use now (after any rotation).
#[derive(Clone, Debug, Default, Serialize, Deserialize)]
#[serde(default)]
pub struct CertificateInfo {
    pub serial_hex: String,
    pub not_after_unix: i64,
    /// Whole days until expiry; negative once expired.
    pub days_left: i64,
    /// Readiness fails when `days_left` is below this.
    pub warning_days: i64,
}

/// A node's view of the directory.
#[derive(Clone, Debug, Default, Serialize, Deserialize)]
#[serde(default)]
pub struct DirectoryState {
    pub address: String,
    pub registered: bool,
    /// Seconds since the node's copy of grants, revocations and addresses was last known fresh.
    pub state_age_seconds: f64,
    pub max_staleness_seconds: u64,
    pub stale: bool,
    pub last_error: String,
}

/// Totals since the server started.
#[derive(Clone, Debug, Default, Serialize, Deserialize)]
#[serde(default)]
pub struct TrafficTotals {
    pub requests: u64,
    pub errors: u64,
    pub refused: u64,
    pub rate_limited: u64,
}

/// The outbox and inbox in one line.
#[derive(Clone, Debug, Default, Serialize, Deserialize)]
#[serde(default)]
pub struct BacklogSummary {
    pub subscriptions: u64,
    pub outbox_events: u64,
    pub inbox_events: u64,
    pub oldest_undelivered_seconds: f64,
    /// `/readyz` fails when one subscriber's outbox backlog is above this.
    pub alarm_events: u64,
}

/// `GET /api/status`: one screen of `exchangectl status`.
#[derive(Clone, Debug, Default, Serialize, Deserialize)]
#[serde(default)]
pub struct StatusReport {
    /// `exchange-node` or `directory`.
    pub server: String,
    pub version: String,
    pub identity: IdentityInfo,
    pub grpc_address: String,
    pub started_unix_ms: i64,
    pub uptime_seconds: u64,
    pub readiness: Readiness,
    pub certificate: CertificateInfo,
    /// Nodes only.
    pub directory: Option<DirectoryState>,
    pub traffic: TrafficTotals,
    /// Nodes only.
    pub backlog: Option<BacklogSummary>,
    pub store_bytes: u64,
    /// Directory only: nodes online/offline and catalog size.
    pub nodes_online: u64,
    pub nodes_offline: u64,
    pub catalog_entries: u64,
}

/// Traffic of one (direction, peer department, resource or method) since start. Rates are the reader's
/// business: it diffs two reports by `at_unix_ms`.
#[derive(Clone, Debug, Default, Serialize, Deserialize, PartialEq)]
#[serde(default)]
pub struct TrafficRow {
    /// `inbound` (others call this server), `outbound` (this node relays to a provider) or `api` (every
    /// gRPC method served, by method).
    pub direction: String,
    pub peer: String,
    /// A resource code for relayed traffic, a gRPC method for `api` rows.
    pub resource: String,
    pub requests: u64,
    pub errors: u64,
    /// Calls by gRPC status name (`OK`, `PERMISSION_DENIED`, ...).
    pub by_code: BTreeMap<String, u64>,
    pub latency_ms_sum: f64,
    pub latency_ms_max: f64,
    pub last_unix_ms: i64,
}

/// `GET /api/traffic`.
#[derive(Clone, Debug, Default, Serialize, Deserialize)]
#[serde(default)]
pub struct TrafficReport {
    pub at_unix_ms: i64,
    pub rows: Vec<TrafficRow>,
}

/// A request the server refused (permission, authentication, quota, bad input).
#[derive(Clone, Debug, Default, Serialize, Deserialize, PartialEq)]
#[serde(default)]
pub struct RefusedRequest {
    pub at_unix_ms: i64,
    /// `department/role/name` of the caller, or the remote address when it had no certificate.
    pub peer: String,
    pub method: String,
    pub code: String,
    /// The status message the caller got (identity numbers in it are already masked).
    pub message: String,
}

/// `GET /api/refused`: newest first.
#[derive(Clone, Debug, Default, Serialize, Deserialize)]
#[serde(default)]
pub struct RefusedReport {
    pub refused: Vec<RefusedRequest>,
}

/// One department this server exchanges with.
#[derive(Clone, Debug, Default, Serialize, Deserialize)]
#[serde(default)]
pub struct PeerInfo {
    pub department: String,
    /// The peer node's address as the directory gave it, when known.
    pub address: String,
    /// `online`, `offline` or `unknown`.
    pub status: String,
    pub inbound_requests: u64,
    pub outbound_requests: u64,
    pub errors: u64,
    pub last_seen_unix_ms: i64,
    /// Grants that let this peer read our resources / let us read theirs.
    pub grants_to_peer: u64,
    pub grants_from_peer: u64,
}

/// `GET /api/peers`.
#[derive(Clone, Debug, Default, Serialize, Deserialize)]
#[serde(default)]
pub struct PeersReport {
    pub peers: Vec<PeerInfo>,
}

/// One subscription seen from this node: `provider` rows are other departments subscribed to our
/// resources (our outbox), `consumer` rows are our subscriptions to theirs (our inbox).
#[derive(Clone, Debug, Default, Serialize, Deserialize)]
#[serde(default)]
pub struct OutboxRow {
    pub side: String,
    /// The other department.
    pub department: String,
    pub resource: String,
    pub state: String,
    pub head_seq: u64,
    pub acked_seq: u64,
    pub backlog_events: u64,
    pub oldest_undelivered_seconds: f64,
    pub connected: bool,
}

/// `GET /api/outbox`.
#[derive(Clone, Debug, Default, Serialize, Deserialize)]
#[serde(default)]
pub struct OutboxReport {
    pub rows: Vec<OutboxRow>,
}

/// One catalog entry, as the console lists it.
#[derive(Clone, Debug, Default, Serialize, Deserialize)]
#[serde(default)]
pub struct CatalogRow {
    pub code: String,
    pub name: String,
    pub share_type: String,
    pub items: u64,
    pub version: u64,
    pub withdrawn: bool,
}

/// `GET /api/catalog`.
#[derive(Clone, Debug, Default, Serialize, Deserialize)]
#[serde(default)]
pub struct CatalogReport {
    pub entries: Vec<CatalogRow>,
}

/// One grant that concerns this department.
#[derive(Clone, Debug, Default, Serialize, Deserialize)]
#[serde(default)]
pub struct GrantRow {
    pub id: String,
    pub resource: String,
    pub provider: String,
    pub consumer: String,
    pub state: String,
    pub items: Vec<String>,
    pub expires_unix_ms: i64,
}

/// `GET /api/grants`.
#[derive(Clone, Debug, Default, Serialize, Deserialize)]
#[serde(default)]
pub struct GrantsReport {
    pub grants: Vec<GrantRow>,
}

/// `POST /api/maintenance`.
#[derive(Clone, Debug, Default, Serialize, Deserialize)]
#[serde(default)]
pub struct MaintenanceRequest {
    pub on: bool,
}

/// `POST /api/reload`.
#[derive(Clone, Debug, Default, Serialize, Deserialize)]
#[serde(default)]
pub struct ReloadReport {
    pub certificate_changed: bool,
    pub old_serial_hex: String,
    pub new_serial_hex: String,
    pub not_after_unix: i64,
    /// What else was re-read (quota rules, ...), one line each.
    pub notes: Vec<String>,
}

/// Every error answer of the admin port: `{"error": "..."}` with a 4xx/5xx status.
#[derive(Clone, Debug, Default, Serialize, Deserialize)]
#[serde(default)]
pub struct ErrorBody {
    pub error: String,
}

impl From<&exchange_proto::v1::CatalogEntry> for CatalogRow {
    fn from(e: &exchange_proto::v1::CatalogEntry) -> Self {
        CatalogRow {
            code: e.resource_code.clone(),
            name: e.name.clone(),
            share_type: exchange_proto::v1::ShareType::try_from(e.share_type)
                .map(|s| s.as_str_name().to_string())
                .unwrap_or_default(),
            items: e.data_items.len() as u64,
            version: e.version,
            withdrawn: e.withdrawn,
        }
    }
}

impl From<exchange_proto::v1::Grant> for GrantRow {
    fn from(g: exchange_proto::v1::Grant) -> Self {
        GrantRow {
            state: exchange_proto::v1::GrantStatus::try_from(g.status)
                .map(|s| s.as_str_name().to_string())
                .unwrap_or_default(),
            // Approved grants list what was granted; pending ones what was asked for.
            items: if g.granted_items.is_empty() { g.requested_items } else { g.granted_items },
            id: g.grant_id,
            resource: g.resource_code,
            provider: g.provider_code,
            consumer: g.consumer_code,
            expires_unix_ms: g.expires_at_unix_ms,
        }
    }
}

impl From<&crate::identity::PeerIdentity> for IdentityInfo {
    fn from(id: &crate::identity::PeerIdentity) -> Self {
        IdentityInfo {
            department: id.department.clone(),
            role: id.role.to_string(),
            name: id.name.clone(),
            serial_hex: id.serial_hex.clone(),
        }
    }
}

impl CertificateInfo {
    /// The certificate `id` describes, with readiness failing under `warning_days` days left.
    pub fn of(id: &crate::identity::PeerIdentity, warning_days: i64) -> Self {
        CertificateInfo {
            serial_hex: id.serial_hex.clone(),
            not_after_unix: id.not_after_unix,
            days_left: super::health::days_left(id.not_after_unix),
            warning_days,
        }
    }
}
