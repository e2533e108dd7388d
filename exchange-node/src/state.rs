//! What the node knows about itself right now, shared by the registration task (which writes it) and
//! the `NodeStatus` call (which reads it).

use std::sync::Mutex;

use client_sdk::identity::PeerIdentity;
use exchange_proto::v1::NodeStatusResponse;

/// The software version registered with the directory and reported by `NodeStatus`.
pub const SOFTWARE_VERSION: &str = concat!("exchange-node/", env!("CARGO_PKG_VERSION"));

#[derive(Debug)]
pub struct NodeState {
    /// Who this node is, from its certificate.
    pub identity: PeerIdentity,
    pub advertise_address: String,
    pub started_at_unix_ms: i64,
    live: Mutex<Live>,
}

#[derive(Debug, Default, Clone)]
struct Live {
    registered: bool,
    last_heartbeat_ok_unix_ms: i64,
    last_directory_error: String,
    published_entries: u64,
    catalog_version: u64,
}

pub fn now_unix_ms() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis() as i64)
        .unwrap_or(0)
}

impl NodeState {
    pub fn new(identity: PeerIdentity, advertise_address: String) -> Self {
        NodeState { identity, advertise_address, started_at_unix_ms: now_unix_ms(), live: Mutex::default() }
    }

    fn update(&self, f: impl FnOnce(&mut Live)) {
        f(&mut self.live.lock().expect("node state lock"));
    }

    /// The directory granted (or renewed) the registration.
    pub fn registered(&self) {
        self.update(|l| {
            l.registered = true;
            l.last_heartbeat_ok_unix_ms = now_unix_ms();
            l.last_directory_error.clear();
        });
    }

    /// The lease is gone (heartbeat refused); registration starts over.
    pub fn unregistered(&self, why: String) {
        self.update(|l| {
            l.registered = false;
            l.last_directory_error = why;
        });
    }

    pub fn heartbeat_ok(&self, catalog_version: u64) {
        self.update(|l| {
            l.last_heartbeat_ok_unix_ms = now_unix_ms();
            l.catalog_version = l.catalog_version.max(catalog_version);
            l.last_directory_error.clear();
        });
    }

    pub fn directory_error(&self, error: String) {
        self.update(|l| l.last_directory_error = error);
    }

    /// Entries the directory accepted from this node (catalog file or `PublishCatalog`).
    pub fn published(&self, entries: usize, catalog_version: u64) {
        self.update(|l| {
            l.published_entries += entries as u64;
            l.catalog_version = l.catalog_version.max(catalog_version);
        });
    }

    pub fn catalog_version_seen(&self, catalog_version: u64) {
        self.update(|l| l.catalog_version = l.catalog_version.max(catalog_version));
    }

    pub fn is_registered(&self) -> bool {
        self.live.lock().expect("node state lock").registered
    }

    pub fn status(&self) -> NodeStatusResponse {
        let live = self.live.lock().expect("node state lock").clone();
        NodeStatusResponse {
            department: self.identity.department.clone(),
            node_name: self.identity.name.clone(),
            address: self.advertise_address.clone(),
            software_version: SOFTWARE_VERSION.to_string(),
            started_at_unix_ms: self.started_at_unix_ms,
            registered: live.registered,
            last_heartbeat_ok_unix_ms: live.last_heartbeat_ok_unix_ms,
            last_directory_error: live.last_directory_error,
            published_entries: live.published_entries,
            catalog_version: live.catalog_version,
            ..Default::default()
        }
    }
}
