//! [`Health`]: whether the server is ready to serve, from named checks and the maintenance switch, told
//! the same way to `/readyz` and to the gRPC health service.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use tokio::sync::watch;
use tonic_health::server::HealthReporter;
use tonic_health::ServingStatus;

use super::api::{HealthCheck, Readiness};
use super::server::AdminSource;

/// How often the gRPC health service is brought in step with the checks.
pub const HEALTH_REFRESH: Duration = Duration::from_secs(1);

/// The maintenance switch and the gRPC health reporter of one server.
pub struct Health {
    maintenance: AtomicBool,
    reporter: HealthReporter,
    /// The gRPC service names the health service reports on ("" is the server as a whole).
    services: Vec<&'static str>,
    /// Set once shutdown began: the reporter is then left alone (the server clears it itself).
    stopping: AtomicBool,
}

impl std::fmt::Debug for Health {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Health").field("maintenance", &self.maintenance.load(Ordering::Relaxed)).finish_non_exhaustive()
    }
}

impl Health {
    pub fn new(reporter: HealthReporter, services: Vec<&'static str>) -> Arc<Health> {
        Arc::new(Health { maintenance: AtomicBool::new(false), reporter, services, stopping: AtomicBool::new(false) })
    }

    pub fn maintenance(&self) -> bool {
        self.maintenance.load(Ordering::Relaxed)
    }

    /// Turns maintenance on or off and tells the gRPC health service at once.
    pub async fn set_maintenance(&self, on: bool, source: &dyn AdminSource) -> Readiness {
        let was = self.maintenance.swap(on, Ordering::Relaxed);
        if was != on {
            tracing::warn!(maintenance = on, "maintenance switched {}", if on { "on: readiness fails, load balancers drain this server" } else { "off" });
        }
        self.refresh(source).await
    }

    /// Runs the checks: ready when every check passes and maintenance is off.
    pub async fn readiness(&self, source: &dyn AdminSource) -> Readiness {
        let checks = source.checks().await;
        let maintenance = self.maintenance();
        Readiness { ready: !maintenance && checks.iter().all(|c| c.ok), maintenance, checks }
    }

    /// Runs the checks and sets the gRPC health status to match.
    pub async fn refresh(&self, source: &dyn AdminSource) -> Readiness {
        let readiness = self.readiness(source).await;
        if !self.stopping.load(Ordering::Relaxed) {
            let status = if readiness.ready { ServingStatus::Serving } else { ServingStatus::NotServing };
            for name in &self.services {
                self.reporter.set_service_status(*name, status).await;
            }
        }
        readiness
    }

    /// Stops touching the reporter: the server is shutting down and owns it now.
    pub fn stop(&self) {
        self.stopping.store(true, Ordering::Relaxed);
    }

    /// Keeps the gRPC health service in step with the checks until `stop` turns true.
    pub fn spawn_refresher(self: &Arc<Self>, source: Arc<dyn AdminSource>, mut stop: watch::Receiver<bool>) -> tokio::task::JoinHandle<()> {
        let health = self.clone();
        tokio::spawn(async move {
            let mut tick = tokio::time::interval(HEALTH_REFRESH);
            tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            loop {
                tokio::select! {
                    _ = tick.tick() => {}
                    _ = stop.changed() => {}
                }
                if *stop.borrow() {
                    health.stop();
                    return;
                }
                health.refresh(source.as_ref()).await;
            }
        })
    }
}

/// The certificate check both servers run: valid now, and not expiring within `warning_days`.
pub fn certificate_check(not_after_unix: i64, warning_days: i64) -> HealthCheck {
    let now = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map(|d| d.as_secs() as i64).unwrap_or(0);
    let left = not_after_unix - now;
    let days = days_left(not_after_unix);
    let (ok, detail) = if left <= 0 {
        (false, "the certificate has expired".to_string())
    } else if days < warning_days {
        (false, format!("the certificate expires in {days} days (warning at {warning_days}): rotate it"))
    } else {
        (true, format!("valid for {days} more days"))
    };
    HealthCheck { name: "certificate".into(), ok, detail }
}

/// Whole days until `not_after_unix` (negative once past).
pub fn days_left(not_after_unix: i64) -> i64 {
    let now = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map(|d| d.as_secs() as i64).unwrap_or(0);
    (not_after_unix - now).div_euclid(86_400)
}

/// The `store` check of a server on sled: a write that must reach the disk (sled reports I/O errors,
/// a full disk or a read-only mount, when it flushes).
pub fn sled_store_check(db: &sled::Db, data_dir: &std::path::Path) -> HealthCheck {
    let now = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map(|d| d.as_millis() as i64).unwrap_or(0);
    let probe = (|| -> Result<(), sled::Error> {
        let tree = db.open_tree("admin_probe")?;
        tree.insert(b"last", &now.to_be_bytes())?;
        tree.flush()?;
        Ok(())
    })();
    match probe {
        Ok(()) => HealthCheck { name: "store".into(), ok: true, detail: format!("writable ({})", data_dir.display()) },
        Err(e) => HealthCheck { name: "store".into(), ok: false, detail: format!("cannot write the store: {e}") },
    }
}
