//! What the node tells its admin port ([`client_sdk::admin`]): readiness checks, state gauges, status,
//! peers, outbox, catalog, grants, reload and backup.

use client_sdk::client::DirectoryChannel;
use std::collections::BTreeMap;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use client_sdk::admin::api::{
    BacklogSummary, CatalogReport, CatalogRow, CertificateInfo, DirectoryState, GrantRow, GrantsReport, HealthCheck,
    IdentityInfo, OutboxReport, OutboxRow, PeerInfo, PeersReport, ReloadReport, StatusReport,
};
use client_sdk::admin::health::{certificate_check, days_left, sled_store_check};
use client_sdk::admin::metrics::{GaugeText, Metrics};
use client_sdk::admin::server::AdminSource;
use client_sdk::admin::AdminConfig;
use client_sdk::tls::TlsIdentity;
use exchange_proto::v1::directory_client::DirectoryClient;
use exchange_proto::v1::{GrantStatus, ListNodesRequest, NodeStatus};

use crate::events::Events;
use crate::relay::Exchange;
use crate::state::{now_unix_ms, NodeState};
use crate::state::SOFTWARE_VERSION;

/// How long the admin port waits for the directory when listing peers.
const DIRECTORY_TIMEOUT: Duration = Duration::from_secs(2);

/// The node's side of the admin port.
pub struct NodeAdmin {
    pub tls: TlsIdentity,
    pub admin: AdminConfig,
    pub grpc_address: String,
    pub directory_address: String,
    pub data_dir: PathBuf,
    pub db: sled::Db,
    pub exchange: Arc<Exchange>,
    pub events: Arc<Events>,
    pub state: Arc<NodeState>,
    pub metrics: Arc<Metrics>,
    pub directory: DirectoryClient<DirectoryChannel>,
    /// Re-reads what SIGHUP re-reads (certificate, quotas).
    pub reload: Arc<dyn Fn() -> Result<ReloadReport, String> + Send + Sync>,
    /// What a backup reads (`GET /api/backup`).
    pub backup: Arc<crate::backup::NodeBackupSource>,
}

fn seconds_since(unix_ms: i64, now: i64) -> f64 {
    if unix_ms <= 0 {
        return 0.0;
    }
    ((now - unix_ms).max(0) as f64) / 1000.0
}

impl NodeAdmin {
    fn directory_state(&self) -> DirectoryState {
        let now = now_unix_ms();
        let policy = &self.exchange.policy;
        let status = self.state.status();
        DirectoryState {
            address: self.directory_address.clone(),
            registered: status.registered,
            state_age_seconds: policy.directory_state_age(now).as_secs_f64(),
            max_staleness_seconds: policy.max_staleness().as_secs(),
            stale: policy.is_stale(now),
            last_error: status.last_directory_error,
        }
    }

    /// Both sides' subscriptions, with how long the oldest undelivered event has waited.
    fn outbox_rows(&self) -> Vec<OutboxRow> {
        let Ok(list) = self.events.list() else { return Vec::new() };
        let now = now_unix_ms();
        let mut rows = Vec::new();
        for s in &list.as_provider {
            let oldest = if s.active && s.backlog > 0 {
                self.exchange
                    .records
                    .events_after(&s.resource_code, s.received_upto_seq, 1)
                    .ok()
                    .and_then(|e| e.first().map(|e| seconds_since(e.published_at_unix_ms, now)))
                    .unwrap_or(0.0)
            } else {
                0.0
            };
            rows.push(OutboxRow {
                side: "provider".into(),
                department: s.consumer_code.clone(),
                resource: s.resource_code.clone(),
                state: if s.active { "active".into() } else { format!("ended: {}", s.ended_reason) },
                head_seq: s.head_seq,
                acked_seq: s.received_upto_seq,
                backlog_events: s.backlog,
                oldest_undelivered_seconds: oldest,
                connected: s.connected,
            });
        }
        for s in &list.as_consumer {
            rows.push(OutboxRow {
                side: "consumer".into(),
                department: s.provider_code.clone(),
                resource: s.resource_code.clone(),
                state: if s.active { "active".into() } else { format!("ended: {}", s.ended_reason) },
                head_seq: s.received_upto_seq,
                acked_seq: s.acked_upto_seq,
                backlog_events: s.backlog,
                oldest_undelivered_seconds: 0.0,
                connected: s.connected,
            });
        }
        rows
    }

    fn backlog(&self, rows: &[OutboxRow]) -> BacklogSummary {
        let provider = rows.iter().filter(|r| r.side == "provider" && r.state == "active");
        BacklogSummary {
            subscriptions: rows.iter().filter(|r| r.state == "active").count() as u64,
            outbox_events: provider.clone().map(|r| r.backlog_events).sum(),
            inbox_events: rows.iter().filter(|r| r.side == "consumer").map(|r| r.backlog_events).sum(),
            oldest_undelivered_seconds: provider.map(|r| r.oldest_undelivered_seconds).fold(0.0, f64::max),
            alarm_events: self.admin.backlog_alarm_events,
        }
    }
}

#[async_trait::async_trait]
impl AdminSource for NodeAdmin {
    async fn checks(&self) -> Vec<HealthCheck> {
        let id = self.tls.current();
        let mut checks = vec![certificate_check(id.not_after_unix, self.admin.cert_expiry_warning_days)];
        let d = self.directory_state();
        checks.push(HealthCheck {
            name: "directory".into(),
            ok: !d.stale,
            detail: if d.stale {
                format!(
                    "the directory at {} has been unreachable for {:.0} s, beyond the bound of {} s: relaying has stopped",
                    d.address, d.state_age_seconds, d.max_staleness_seconds
                )
            } else if self.exchange.policy.all_connected() {
                format!("in step with the directory at {}", d.address)
            } else {
                format!(
                    "the directory at {} is unreachable; cached state is {:.0} s old (bound {} s)",
                    d.address, d.state_age_seconds, d.max_staleness_seconds
                )
            },
        });
        let store = tokio::task::block_in_place(|| sled_store_check(&self.db, &self.data_dir));
        checks.push(store);
        let rows = tokio::task::block_in_place(|| self.outbox_rows());
        let worst = rows.iter().filter(|r| r.side == "provider" && r.state == "active").max_by_key(|r| r.backlog_events);
        let alarm = self.admin.backlog_alarm_events;
        checks.push(match worst {
            Some(r) if r.backlog_events > alarm => HealthCheck {
                name: "backlog".into(),
                ok: false,
                detail: format!(
                    "department {}'s subscription to {} has {} undelivered events (alarm at {alarm})",
                    r.department, r.resource, r.backlog_events
                ),
            },
            Some(r) => HealthCheck {
                name: "backlog".into(),
                ok: true,
                detail: format!("largest backlog {} events (alarm at {alarm})", r.backlog_events),
            },
            None => HealthCheck { name: "backlog".into(), ok: true, detail: "no subscriptions to this node".into() },
        });
        checks
    }

    async fn gauges(&self, g: &mut GaugeText) {
        let now = now_unix_ms();
        let policy = &self.exchange.policy;
        let id = self.tls.current();
        g.gauge("gx_build_info", "Always 1; the labels say what runs", &[("server", "exchange-node"), ("version", SOFTWARE_VERSION), ("department", &id.department)], 1.0)
            .gauge("gx_directory_state_age_seconds", "Age of the node's copy of grants, revocations and addresses", &[], policy.directory_state_age(now).as_secs_f64())
            .gauge("gx_directory_state_stale", "1 when that copy is older than the bound and relaying has stopped", &[], policy.is_stale(now) as u8 as f64)
            .gauge("gx_directory_staleness_bound_seconds", "relay.max_directory_staleness_seconds", &[], policy.max_staleness().as_secs_f64())
            .gauge("gx_store_size_bytes", "Size of the node's sled store on disk", &[], self.db.size_on_disk().unwrap_or(0) as f64)
            .gauge("gx_certificate_expiry_days", "Days until the server certificate expires", &[], days_left(id.not_after_unix) as f64)
            .gauge("gx_audit_entries", "Entries in the audit trail", &[], self.exchange.audit.len() as f64);
        let rows = tokio::task::block_in_place(|| self.outbox_rows());
        for r in rows.iter().filter(|r| r.state == "active") {
            if r.side == "provider" {
                let labels = [("subscriber", r.department.as_str()), ("resource", r.resource.as_str())];
                g.gauge("gx_outbox_backlog_events", "Events not yet acknowledged by the subscriber", &labels, r.backlog_events as f64);
                g.gauge("gx_outbox_oldest_undelivered_seconds", "Age of the oldest event the subscriber has not acknowledged", &labels, r.oldest_undelivered_seconds);
            } else {
                let labels = [("provider", r.department.as_str()), ("resource", r.resource.as_str())];
                g.gauge("gx_inbox_backlog_events", "Events received but not yet acknowledged by the application", &labels, r.backlog_events as f64);
            }
        }
    }

    async fn status(&self) -> StatusReport {
        let id = self.tls.current();
        let rows = tokio::task::block_in_place(|| self.outbox_rows());
        StatusReport {
            server: "exchange-node".into(),
            version: SOFTWARE_VERSION.into(),
            identity: IdentityInfo::from(&id),
            grpc_address: self.grpc_address.clone(),
            certificate: CertificateInfo::of(&id, self.admin.cert_expiry_warning_days),
            directory: Some(self.directory_state()),
            backlog: Some(self.backlog(&rows)),
            store_bytes: self.db.size_on_disk().unwrap_or(0),
            catalog_entries: self.exchange.policy.provided_resources(),
            ..StatusReport::default()
        }
    }

    async fn peers(&self) -> PeersReport {
        let me = &self.exchange.me.department;
        let mut peers: BTreeMap<String, PeerInfo> = BTreeMap::new();
        fn peer<'a>(peers: &'a mut BTreeMap<String, PeerInfo>, d: &str) -> &'a mut PeerInfo {
            peers.entry(d.to_string()).or_insert_with(|| PeerInfo { department: d.to_string(), status: "unknown".into(), ..PeerInfo::default() })
        }
        for row in self.metrics.traffic_report().rows {
            if row.direction == "api" || row.peer == *me || row.peer == "unauthenticated" {
                continue;
            }
            let p = peer(&mut peers, &row.peer);
            if row.direction == "inbound" {
                p.inbound_requests += row.requests;
            } else {
                p.outbound_requests += row.requests;
            }
            p.errors += row.errors;
            p.last_seen_unix_ms = p.last_seen_unix_ms.max(row.last_unix_ms);
        }
        let now = now_unix_ms();
        for g in self.exchange.policy.grants() {
            let live = g.status == GrantStatus::Approved as i32 && (g.expires_at_unix_ms == 0 || g.expires_at_unix_ms > now);
            if !live {
                continue;
            }
            if g.provider_code == *me && g.consumer_code != *me {
                peer(&mut peers, &g.consumer_code).grants_to_peer += 1;
            } else if g.consumer_code == *me && g.provider_code != *me {
                peer(&mut peers, &g.provider_code).grants_from_peer += 1;
            }
        }
        // Addresses and liveness from the directory, when it answers quickly; the rest stands without.
        let mut directory = self.directory.clone();
        let mut request = tonic::Request::new(ListNodesRequest::default());
        request.set_timeout(DIRECTORY_TIMEOUT);
        if let Ok(Ok(nodes)) = tokio::time::timeout(DIRECTORY_TIMEOUT, directory.list_nodes(request)).await {
            for n in nodes.into_inner().nodes {
                if let Some(p) = peers.get_mut(&n.department) {
                    let online = n.status == NodeStatus::Online as i32;
                    if p.address.is_empty() || online {
                        p.address = n.address.clone();
                    }
                    if p.status != "online" {
                        p.status = if online { "online".into() } else { "offline".into() };
                    }
                }
            }
        }
        PeersReport { peers: peers.into_values().collect() }
    }

    async fn outbox(&self) -> OutboxReport {
        OutboxReport { rows: tokio::task::block_in_place(|| self.outbox_rows()) }
    }

    async fn catalog(&self) -> CatalogReport {
        CatalogReport { entries: self.exchange.policy.own_entries().iter().map(|e| CatalogRow::from(e.as_ref())).collect() }
    }

    async fn grants(&self) -> GrantsReport {
        GrantsReport { grants: self.exchange.policy.grants().into_iter().map(GrantRow::from).collect() }
    }

    async fn reload(&self) -> Result<ReloadReport, String> {
        let reload = self.reload.clone();
        tokio::task::spawn_blocking(move || reload()).await.map_err(|e| e.to_string())?
    }

    async fn backup(&self) -> Result<PathBuf, String> {
        // Runs to completion in its own task: a download cancelled mid-backup leaves no file (it holds the
        // audit keys) behind.
        crate::backup::backup_to_temp_file(self.backup.clone()).await.map(|(path, _)| path).map_err(|e| e.to_string())
    }
}
