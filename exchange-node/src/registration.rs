//! Keeping the node known to the directory: register, heartbeat, re-register when the lease is lost,
//! and publish the configured catalog file after each registration. (Revocations and grants arrive by
//! watch streams: see `sync`.)
//!
//! The directory takes the node's department and name from its certificate; the request only carries the
//! address others reach the node at. Every directory call uses the node's own identity.
//!
//! Two tasks run until shutdown:
//! - the lease task: register (retrying with capped exponential backoff), then heartbeat every
//!   `heartbeat_interval_seconds` the directory returned. A heartbeat answered with FAILED_PRECONDITION or
//!   NOT_FOUND means the directory no longer holds the lease (it expired, or the directory lost it):
//!   register again. Any other failure is retried with backoff, never slower than the heartbeat interval,
//!   so a short directory outage does not cost the lease.
//! - the catalog task (only with `catalog_file`): after each successful registration (the first, and any
//!   after a lost lease, when the directory may have lost its state) publishes the file in batches,
//!   resuming after the last accepted batch on transient errors. A file the directory refuses
//!   (INVALID_ARGUMENT, PERMISSION_DENIED, OUT_OF_RANGE) is logged with every field violation and not
//!   retried: the same bytes would be refused again.

use client_sdk::client::DirectoryChannel;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use client_sdk::client::{self, BatchPublishError};
use client_sdk::error::ClientError;
use exchange_proto::v1::directory_client::DirectoryClient;
use exchange_proto::v1::{
    AuditSeal, CatalogEntry, HeartbeatRequest, HeartbeatResponse, RegisterNodeRequest,
    RegisterNodeResponse,
};
use tokio::sync::watch;
use tokio::task::JoinHandle;
use tonic::{Code, Status};

use crate::audit::AuditLog;
use crate::error::NodeError;
use crate::state::{NodeState, SOFTWARE_VERSION};
use crate::store::NodeStore;

/// Delays of the lease and catalog tasks. Tests shorten them.
#[derive(Clone, Debug)]
pub struct Timing {
    pub backoff_start: Duration,
    pub backoff_max: Duration,
    /// Used when the directory returns a heartbeat interval of 0.
    pub default_heartbeat: Duration,
    /// Deadline of each directory call.
    pub call_timeout: Duration,
}

impl Default for Timing {
    fn default() -> Self {
        Timing {
            backoff_start: Duration::from_millis(500),
            backoff_max: Duration::from_secs(30),
            default_heartbeat: Duration::from_secs(10),
            call_timeout: Duration::from_secs(15),
        }
    }
}

/// Capped exponential backoff with up to 25% jitter, so nodes that lost the directory together do not
/// all come back in the same instant.
#[derive(Debug)]
pub struct Backoff {
    start: Duration,
    max: Duration,
    current: Duration,
}

impl Backoff {
    pub fn new(start: Duration, max: Duration) -> Self {
        Backoff { start, max, current: start }
    }

    pub fn next_delay(&mut self) -> Duration {
        let base = self.current;
        self.current = (self.current * 2).min(self.max);
        let nanos = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.subsec_nanos())
            .unwrap_or(0);
        let jitter = base.mul_f64(f64::from(nanos % 1000) / 4000.0);
        (base + jitter).min(self.max)
    }

    pub fn reset(&mut self) {
        self.current = self.start;
    }
}

/// The catalog file to publish, read and checked at start-up.
#[derive(Clone, Debug)]
pub struct CatalogToPublish {
    pub path: PathBuf,
    pub entries: Vec<CatalogEntry>,
}

/// Everything the two tasks need.
pub struct Registrar {
    pub directory: DirectoryClient<DirectoryChannel>,
    pub directory_address: String,
    pub state: Arc<NodeState>,
    pub store: Arc<dyn NodeStore>,
    /// The node's audit seal key (hex), registered so others can check the node's audit trail.
    pub audit_verifying_key_hex: String,
    /// The node's audit trail, whose latest seal each heartbeat reports.
    pub audit: Option<Arc<AuditLog>>,
    pub catalog: Option<CatalogToPublish>,
    pub timing: Timing,
}

/// Resolves when `shutdown` turns true (or its sender is gone).
async fn stopped(shutdown: &mut watch::Receiver<bool>) {
    let _ = shutdown.wait_for(|stop| *stop).await;
}

/// Runs `call` unless shutdown comes first (`None`): shutdown never waits for a slow directory.
async fn unless_stopped<F: std::future::Future>(call: F, shutdown: &mut watch::Receiver<bool>) -> Option<F::Output> {
    tokio::select! {
        _ = stopped(shutdown) => None,
        out = call => Some(out),
    }
}

/// Sleeps `d`; returns `true` if shutdown came first.
async fn sleep_or_stop(d: Duration, shutdown: &mut watch::Receiver<bool>) -> bool {
    tokio::select! {
        _ = stopped(shutdown) => true,
        _ = tokio::time::sleep(d) => false,
    }
}

impl Registrar {
    /// Starts the lease task and, with a catalog file, the catalog task. Both end when `shutdown` turns
    /// true; await the handle to know they have.
    pub fn spawn(self, shutdown: watch::Receiver<bool>) -> JoinHandle<()> {
        let this = Arc::new(self);
        // Counts registrations: the catalog task publishes after each, so a directory that lost its state
        // (and so this node's lease) gets the catalog back along with the registration.
        let (registered_tx, registered_rx) = watch::channel(0u64);
        let lease = tokio::spawn(this.clone().lease_task(shutdown.clone(), registered_tx));
        let catalog = this.catalog.clone().map(|c| tokio::spawn(this.clone().catalog_task(c, registered_rx, shutdown)));
        tokio::spawn(async move {
            let _ = lease.await;
            if let Some(c) = catalog {
                let _ = c.await;
            }
        })
    }

    fn request<T>(&self, message: T) -> tonic::Request<T> {
        let mut req = tonic::Request::new(message);
        req.set_timeout(self.timing.call_timeout);
        req
    }

    fn describe(&self, status: Status) -> NodeError {
        NodeError::from_directory(&self.directory_address, status)
    }

    async fn register(&self) -> Result<RegisterNodeResponse, Status> {
        let req = RegisterNodeRequest {
            address: self.state.advertise_address.clone(),
            software_version: SOFTWARE_VERSION.to_string(),
            audit_verifying_key_hex: self.audit_verifying_key_hex.clone(),
        };
        self.directory.clone().register_node(self.request(req)).await.map(|r| r.into_inner())
    }

    async fn heartbeat(&self) -> Result<HeartbeatResponse, Status> {
        // The latest audit seal goes along, so the directory holds an anchor of this node's audit trail.
        let audit_seal = match self.audit.as_ref().map(|a| a.last_seal()) {
            Some(Ok(Some(seal))) => Some(AuditSeal {
                upto_seq: seal.upto_seq,
                chain_hash: seal.chain_hash,
                sealed_at_us: seal.sealed_at_us,
                signature: seal.signature,
            }),
            Some(Err(e)) => {
                tracing::error!(error = %e, "cannot read the latest audit seal");
                None
            }
            _ => None,
        };
        self.directory.clone().heartbeat(self.request(HeartbeatRequest { audit_seal })).await.map(|r| r.into_inner())
    }

    async fn lease_task(self: Arc<Self>, mut shutdown: watch::Receiver<bool>, registered: watch::Sender<u64>) {
        let mut backoff = Backoff::new(self.timing.backoff_start, self.timing.backoff_max);
        'register: loop {
            let grant = loop {
                let Some(result) = unless_stopped(self.register(), &mut shutdown).await else { return };
                match result {
                    Ok(grant) => break grant,
                    Err(status) => {
                        let code = status.code();
                        let error = self.describe(status);
                        let delay = backoff.next_delay();
                        if matches!(code, Code::PermissionDenied | Code::Unauthenticated | Code::InvalidArgument) {
                            // Retrying cannot fix this by itself, but an operator can (directory config,
                            // certificate): keep trying at the capped rate.
                            tracing::error!(%error, retry_in = ?delay, "the directory refused to register this node");
                        } else {
                            tracing::warn!(%error, retry_in = ?delay, "registration failed");
                        }
                        self.state.directory_error(error.to_string());
                        if sleep_or_stop(delay, &mut shutdown).await {
                            return;
                        }
                    }
                }
            };
            backoff.reset();
            let interval = heartbeat_interval(&grant, self.timing.default_heartbeat);
            tracing::info!(
                address = %self.state.advertise_address,
                lease_ttl_seconds = grant.lease_ttl_seconds,
                heartbeat_interval_seconds = interval.as_secs(),
                "registered with the directory"
            );
            self.state.registered();
            if let Err(e) = self.store.save_registration(&grant) {
                tracing::warn!(error = %e, "could not remember the registration");
            }
            registered.send_modify(|n| *n += 1);

            let mut wait = interval;
            loop {
                if sleep_or_stop(wait, &mut shutdown).await {
                    return;
                }
                let Some(result) = unless_stopped(self.heartbeat(), &mut shutdown).await else { return };
                match result {
                    Ok(beat) => {
                        self.state.heartbeat_ok(beat.catalog_version);
                        backoff.reset();
                        wait = interval;
                    }
                    Err(status) if matches!(status.code(), Code::FailedPrecondition | Code::NotFound) => {
                        tracing::warn!(reason = %status.message(), "the directory no longer holds this node's lease; registering again");
                        self.state.unregistered(format!("lease lost: {}", status.message()));
                        continue 'register;
                    }
                    Err(status) => {
                        let error = self.describe(status);
                        wait = backoff.next_delay().min(interval);
                        tracing::warn!(%error, retry_in = ?wait, "heartbeat failed");
                        self.state.directory_error(error.to_string());
                    }
                }
            }
        }
    }

    async fn catalog_task(
        self: Arc<Self>,
        catalog: CatalogToPublish,
        mut registered: watch::Receiver<u64>,
        mut shutdown: watch::Receiver<bool>,
    ) {
        let mut published_for = 0u64;
        loop {
            let registration = tokio::select! {
                _ = stopped(&mut shutdown) => return,
                next = registered.wait_for(|n| *n > published_for) => match next {
                    Ok(n) => *n,
                    Err(_) => return,
                },
            };
            if published_for > 0 {
                tracing::info!("registered again: publishing the catalog file again");
            }
            published_for = registration;
            if !self.publish_catalog(&catalog, &mut shutdown).await {
                return;
            }
        }
    }

    /// Publishes the catalog file until it is accepted or refused for good. False when shutting down.
    async fn publish_catalog(&self, catalog: &CatalogToPublish, shutdown: &mut watch::Receiver<bool>) -> bool {
        let file = catalog.path.display().to_string();
        let total = catalog.entries.len();
        let mut backoff = Backoff::new(self.timing.backoff_start, self.timing.backoff_max);
        let mut accepted = 0;
        loop {
            let publish = client::publish_batches(
                &catalog.entries[accepted..],
                accepted,
                |req| {
                    let mut directory = self.directory.clone();
                    let req = self.request(req);
                    async move { directory.publish_entries(req).await }
                },
                |n| self.state.published(n, 0),
            );
            let Some(result) = unless_stopped(publish, shutdown).await else { return false };
            match result {
                Ok(outcome) => {
                    self.state.catalog_version_seen(outcome.catalog_version);
                    tracing::info!(%file, entries = total, catalog_version = outcome.catalog_version, "catalog published");
                    return true;
                }
                Err(BatchPublishError { accepted: newly, error }) => {
                    accepted += newly;
                    if matches!(error.code(), Code::InvalidArgument | Code::PermissionDenied | Code::OutOfRange) {
                        log_rejected_catalog(&file, &catalog.entries, accepted, &error);
                        self.state.directory_error(format!("catalog file {file} refused: {error}"));
                        return true;
                    }
                    let delay = match &error {
                        ClientError::ResourceExhausted { retry_after: Some(d), .. } => *d,
                        _ => backoff.next_delay(),
                    };
                    tracing::warn!(%file, %error, accepted, total, retry_in = ?delay, "catalog publish failed; will retry");
                    self.state.directory_error(error.to_string());
                    if sleep_or_stop(delay, shutdown).await {
                        return false;
                    }
                }
            }
        }
    }
}

/// The interval the directory asked for; without one, a third of the lease (so two beats may be lost
/// before the lease lapses), or `default` when the directory sent neither.
fn heartbeat_interval(grant: &RegisterNodeResponse, default: Duration) -> Duration {
    match (grant.heartbeat_interval_seconds, grant.lease_ttl_seconds) {
        (0, 0) => default,
        (0, ttl) => Duration::from_millis(u64::from(ttl) * 1000 / 3).max(Duration::from_millis(200)),
        (s, _) => Duration::from_secs(u64::from(s)),
    }
}

/// One log line per field violation, naming the entry by resource code, so the operator can fix the file.
fn log_rejected_catalog(file: &str, entries: &[CatalogEntry], accepted: usize, error: &ClientError) {
    tracing::error!(
        %file,
        code = ?error.code(),
        accepted_before_refusal = accepted,
        "the directory refused the catalog file; not retrying: fix the file and restart the node"
    );
    match error {
        ClientError::InvalidArgument { message, violations } if !violations.is_empty() => {
            for v in violations {
                let entry = client::violation_entry_index(&v.field)
                    .and_then(|i| entries.get(i))
                    .map(|e| e.resource_code.as_str())
                    .unwrap_or("-");
                tracing::error!(%file, entry, field = %v.field, "{}", v.description);
            }
            tracing::error!(%file, "{message}");
        }
        other => tracing::error!(%file, "{other}"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn heartbeat_interval_follows_the_directory() {
        let grant = |interval, ttl| RegisterNodeResponse { node: None, lease_ttl_seconds: ttl, heartbeat_interval_seconds: interval };
        let default = Duration::from_secs(10);
        assert_eq!(heartbeat_interval(&grant(5, 15), default), Duration::from_secs(5));
        assert_eq!(heartbeat_interval(&grant(0, 3), default), Duration::from_secs(1));
        assert_eq!(heartbeat_interval(&grant(0, 0), default), default);
    }

    #[test]
    fn backoff_doubles_to_the_cap_and_resets() {
        let mut b = Backoff::new(Duration::from_millis(100), Duration::from_secs(1));
        let delays: Vec<Duration> = (0..8).map(|_| b.next_delay()).collect();
        assert!(delays[0] >= Duration::from_millis(100) && delays[0] <= Duration::from_millis(125));
        assert!(delays[1] >= Duration::from_millis(200) && delays[1] <= Duration::from_millis(250));
        assert!(delays.iter().all(|d| *d <= Duration::from_secs(1)));
        assert_eq!(delays[7], Duration::from_secs(1));
        b.reset();
        assert!(b.next_delay() <= Duration::from_millis(125));
    }
}
