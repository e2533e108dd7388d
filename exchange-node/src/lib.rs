//! A department's exchange node: its gateway to gov-exchange.
//!
//! For now the node registers with the central directory and keeps its lease alive, publishes the
//! department's catalog file, and offers the department's applications and operators a gRPC API
//! (`ExchangeNode`) to publish and withdraw catalog entries and to see the node's status. Record relay
//! and audit come later and will sit beside these modules.
//!
//! # Layout
//! - [`config`]: the TOML configuration ([`config::Config`]).
//! - [`server`]: [`server::run`] — start-up checks, the mTLS gRPC server (ExchangeNode, health,
//!   reflection), graceful shutdown.
//! - [`registration`]: register, heartbeat, re-register, publish the catalog file, refresh revocations.
//! - [`service`]: the `ExchangeNode` service and its authorization (own department only).
//! - [`state`]: the node's live status, shared by registration and `NodeStatus`.
//! - [`store`]: what survives a restart ([`store::NodeStore`], on sled).
//! - [`error`]: [`error::NodeError`] and its one mapping to gRPC statuses.
//! - [`audit`]: the hash-chained, signed audit trail and its verification (storage half; the relay that
//!   writes to it comes with the record-exchange issue).
//! - [`quota`]: per-consumer, per-resource rate limits (governor), reloadable (the relay that enforces
//!   them comes with the record-exchange issue).
//! - `src/main.rs`: `exchange-node --config FILE`: logging, binding, signals.
//!
//! # Invariants
//! - The node runs only with a certificate of role `node`; every directory call is made with it, so the
//!   directory sees the node's department, never a caller's claim.
//! - TLS is configured only through `client_sdk::tls`; every `ExchangeNode` call passes
//!   `client_sdk::auth::IdentityInterceptor` (revocation checked per call).
//! - Directory errors reach the node's callers with the directory's code, message and details.

pub mod audit;
pub mod config;
pub mod consumer;
pub mod error;
pub mod policy;
pub mod quota;
pub mod records;
pub mod registration;
pub mod relay;
pub mod reload;
pub mod server;
pub mod service;
pub mod state;
pub mod store;
pub mod sync;

pub use config::Config;
pub use error::NodeError;
