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
