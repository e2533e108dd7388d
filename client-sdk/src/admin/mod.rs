//! The admin port every server runs beside its gRPC port: Prometheus metrics, liveness and readiness,
//! the live console, and the operator API that `exchangectl status|top|peers|outbox|backup|admin` use.
//!
//! It is HTTPS with the server's own certificate. A caller is let in with an `operator` certificate of
//! the server's department, or with the bearer token of `[admin] token_file`; `/healthz` and `/readyz`
//! answer anyone when `open_probes` is on, because kubelets and load balancers present neither.
//!
//! # Layout
//! - [`config`]: the `[admin]` table both servers' configs share ([`AdminConfig`]).
//! - [`api`]: the JSON documents of the operator API.
//! - [`metrics`]: [`metrics::Metrics`], the per-server Prometheus registry and traffic table, and the
//!   tower layer that counts every gRPC call by method, peer department and status.
//! - [`health`]: [`health::Health`]: maintenance switch, readiness checks, and the gRPC health service
//!   kept in step with `/readyz`.
//! - [`server`]: the HTTPS server, authentication, and the routes both servers share; each server adds
//!   its own routes (`exchange_node::admin`, `directory::admin`).
//! - [`client`]: [`client::AdminClient`] for the CLI.
//! - `console/`: the web console's page, script and style, compiled into the binary.

pub mod api;
pub mod client;
pub mod config;
pub mod health;
pub mod metrics;
pub mod server;

pub use config::AdminConfig;

/// Re-reads the certificate and key in `paths` into `tls` (what SIGHUP and `POST /api/reload` do on
/// either server), runs `on_rotated` when the certificate changed (a node re-dials its peers there), and
/// logs the outcome. A certificate that fails a check is refused and the one in use stays.
pub fn reload_certificate(
    tls: &crate::tls::TlsIdentity,
    paths: &crate::tls::TlsPaths,
    on_rotated: impl FnOnce(),
) -> Result<api::ReloadReport, String> {
    match tls.reload(paths) {
        Ok(rotation) => {
            if rotation.changed() {
                on_rotated();
                tracing::info!(
                    old_serial = %rotation.old.serial_hex,
                    old_not_after = rotation.old.not_after_unix,
                    new_serial = %rotation.new.serial_hex,
                    new_not_after = rotation.new.not_after_unix,
                    name = %rotation.new.name,
                    "certificate rotated: new connections use the new certificate"
                );
            } else {
                tracing::info!(serial = %rotation.new.serial_hex, "certificate files unchanged");
            }
            Ok(api::ReloadReport {
                certificate_changed: rotation.changed(),
                old_serial_hex: rotation.old.serial_hex,
                new_serial_hex: rotation.new.serial_hex,
                not_after_unix: rotation.new.not_after_unix,
                notes: Vec::new(),
            })
        }
        Err(e) => {
            tracing::error!(error = %e, serial = %tls.current().serial_hex, "certificate reload refused; the certificate in use stays");
            Err(format!("certificate not replaced: {e}"))
        }
    }
}
