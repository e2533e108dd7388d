//! What the directory tells its admin port ([`client_sdk::admin`]): readiness checks, gauges, status,
//! the registered nodes as peers, the catalog, grants, reload and backup.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::sync::Arc;

use client_sdk::admin::api::{
    CatalogReport, CatalogRow, CertificateInfo, GrantRow, GrantsReport, HealthCheck, IdentityInfo, OutboxReport,
    PeerInfo, PeersReport, ReloadReport, StatusReport,
};
use client_sdk::admin::health::{certificate_check, days_left};
use client_sdk::admin::metrics::{GaugeText, Metrics};
use client_sdk::admin::server::AdminSource;
use client_sdk::admin::AdminConfig;
use client_sdk::tls::TlsIdentity;
use exchange_proto::v1::NodeStatus;

use crate::backup::DirectoryBackupSource;
use crate::follow::{ChangeFollower, Log};
use crate::search::CatalogIndex;
use crate::service::now_unix_ms;
use crate::store::{Database, Stores};

/// Rows the console lists at most (catalog entries, grants): it is a view, not an export.
const LIST_LIMIT: usize = 500;
const SOFTWARE_VERSION: &str = concat!("directory/", env!("CARGO_PKG_VERSION"));

/// The directory's side of the admin port.
pub struct DirectoryAdmin {
    pub tls: TlsIdentity,
    pub admin: AdminConfig,
    pub grpc_address: String,
    pub data_dir: PathBuf,
    pub stores: Stores,
    pub index: Arc<CatalogIndex>,
    /// What this replica has applied of each change log (the store may be ahead: other replicas' writes).
    pub follower: Arc<ChangeFollower>,
    pub database: Database,
    pub metrics: Arc<Metrics>,
    /// None with the PostgreSQL backend: the database is backed up with its own tools.
    pub backup: Option<Arc<DirectoryBackupSource>>,
    /// Re-reads the certificate and key files (what SIGHUP does).
    pub reload: Arc<dyn Fn() -> Result<ReloadReport, String> + Send + Sync>,
}

impl DirectoryAdmin {
    async fn node_counts(&self) -> (u64, u64) {
        let now = now_unix_ms();
        match self.stores.nodes.list(None).await {
            Ok(nodes) => {
                let online = nodes.iter().filter(|n| n.status_at(now) == NodeStatus::Online).count() as u64;
                (online, nodes.len() as u64 - online)
            }
            Err(_) => (0, 0),
        }
    }
}

#[async_trait::async_trait]
impl AdminSource for DirectoryAdmin {
    async fn checks(&self) -> Vec<HealthCheck> {
        let id = self.tls.current();
        vec![
            certificate_check(id.not_after_unix, self.admin.cert_expiry_warning_days),
            self.database.check(&self.data_dir).await,
        ]
    }

    async fn gauges(&self, g: &mut GaugeText) {
        let id = self.tls.current();
        let (online, offline) = self.node_counts().await;
        let store_bytes = self.database.size_bytes().await;
        // Applied here against written to the store, per change log: the difference is how far this
        // replica's index, revoked set and watchers trail the other replicas' writes.
        for (log, name, written) in [
            (Log::Catalog, "catalog", self.stores.catalog.current_version().await),
            (Log::Grants, "grants", self.stores.grants.current_version().await),
            (Log::Revocations, "revocations", self.stores.revocations.current_version().await),
        ] {
            g.gauge("gx_directory_applied_version", "Change-log version this replica has applied", &[("log", name)], self.follower.latest(log).current() as f64);
            if let Ok(written) = written {
                g.gauge("gx_directory_store_version", "Change-log version in the store", &[("log", name)], written as f64);
            }
        }
        g.gauge("gx_build_info", "Always 1; the labels say what runs", &[("server", "directory"), ("version", SOFTWARE_VERSION), ("department", &id.department)], 1.0)
            .gauge("gx_directory_nodes", "Registered nodes by lease status", &[("status", "online")], online as f64)
            .gauge("gx_directory_nodes", "Registered nodes by lease status", &[("status", "offline")], offline as f64)
            .gauge("gx_catalog_entries", "Live catalog entries in the search index", &[], self.index.len() as f64)
            .gauge("gx_store_size_bytes", "Size of the directory's store (sled on disk, or the PostgreSQL database)", &[], store_bytes as f64)
            .gauge("gx_certificate_expiry_days", "Days until the server certificate expires", &[], days_left(id.not_after_unix) as f64);
    }

    async fn status(&self) -> StatusReport {
        let id = self.tls.current();
        let (online, offline) = self.node_counts().await;
        StatusReport {
            server: "directory".into(),
            version: SOFTWARE_VERSION.into(),
            identity: IdentityInfo::from(&id),
            grpc_address: self.grpc_address.clone(),
            certificate: CertificateInfo::of(&id, self.admin.cert_expiry_warning_days),
            store_bytes: self.database.size_bytes().await,
            nodes_online: online,
            nodes_offline: offline,
            catalog_entries: self.index.len(),
            ..StatusReport::default()
        }
    }

    /// Every registered node is a peer of the directory; calls are counted per department.
    async fn peers(&self) -> PeersReport {
        let now = now_unix_ms();
        let mut peers: BTreeMap<String, PeerInfo> = BTreeMap::new();
        for n in self.stores.nodes.list(None).await.unwrap_or_default() {
            let online = n.status_at(now) == NodeStatus::Online;
            let p = peers.entry(n.department.clone()).or_insert_with(|| PeerInfo {
                department: n.department.clone(),
                status: "offline".into(),
                ..PeerInfo::default()
            });
            if online || p.address.is_empty() {
                p.address = n.address.clone();
            }
            if online {
                p.status = "online".into();
            }
            p.last_seen_unix_ms = p.last_seen_unix_ms.max(n.last_heartbeat_unix_ms);
        }
        for row in self.metrics.traffic_report().rows {
            if let Some(p) = peers.get_mut(&row.peer) {
                p.inbound_requests += row.requests;
                p.errors += row.errors;
            }
        }
        PeersReport { peers: peers.into_values().collect() }
    }

    async fn outbox(&self) -> OutboxReport {
        OutboxReport::default()
    }

    async fn catalog(&self) -> CatalogReport {
        let entries = self.stores.catalog.live_entries_after(None, LIST_LIMIT).await.unwrap_or_default();
        CatalogReport { entries: entries.iter().map(CatalogRow::from).collect() }
    }

    async fn grants(&self) -> GrantsReport {
        let mut grants = self.stores.grants.list(None).await.unwrap_or_default();
        grants.truncate(LIST_LIMIT);
        GrantsReport { grants: grants.into_iter().map(GrantRow::from).collect() }
    }

    async fn reload(&self) -> Result<ReloadReport, String> {
        let reload = self.reload.clone();
        tokio::task::spawn_blocking(move || reload()).await.map_err(|e| e.to_string())?
    }

    async fn backup(&self) -> Result<PathBuf, String> {
        let source = self.backup.clone().ok_or_else(|| self.backup_unsupported().unwrap_or_default())?;
        crate::backup::backup_to_temp_file(source).await.map(|(path, _)| path).map_err(|e| e.to_string())
    }

    fn backup_unsupported(&self) -> Option<String> {
        self.backup.is_none().then(|| {
            "this directory's store is PostgreSQL, shared by its replicas: back it up with pg_dump or the \
             database's own backup (docs/OPERATOR-GUIDE.md)"
                .to_string()
        })
    }
}
