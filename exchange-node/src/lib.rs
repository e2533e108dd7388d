//! A department's exchange node: its gateway to gov-exchange.
//!
//! The node registers with the central directory and keeps its lease alive, publishes the department's
//! catalog file, keeps the department's records (the 前置库), and relays records between departments: its
//! applications query other departments through it (consumer side), and other departments' nodes query
//! it (provider side), where it enforces the share type, grants, field-level sharing, masking and quotas
//! from its own copy of the directory's rules, and records every request in a signed audit trail.
//!
//! # Layout
//! - [`config`]: the TOML configuration ([`config::Config`], `[relay]`, `[[quotas]]`).
//! - [`server`]: [`server::run`] — start-up checks, the mTLS gRPC server (ExchangeNode, Relay, health,
//!   reflection), graceful shutdown.
//! - [`registration`]: register, heartbeat (with the latest audit seal), re-register, publish the catalog file.
//! - [`sync`]: the directory's catalog, grant and revocation watch streams, feeding [`policy`].
//! - [`policy`]: the node's stored copy of the rules and the provider-side access decision.
//! - [`records`]: the record store, record validation, field-level disclosure and masking.
//! - [`relay`]: the node-to-node `Relay` service (provider side) and what both sides share ([`relay::Exchange`]).
//! - [`consumer`]: `QueryRecords` for the department's applications (consumer side).
//! - [`service`]: the `ExchangeNode` service and its authorization (own department only).
//! - [`audit`]: the hash-chained, signed audit trail, its keys, query and verification.
//! - [`quota`]: per-consumer, per-resource rate limits (governor); [`reload`] swaps them, and the node's
//!   certificate and key (rotation without downtime), on SIGHUP and on the admin port's reload.
//! - [`backup`]: a consistent backup of the running node's store (the admin port's `GET /api/backup`).
//! - [`admin`]: what the node shows on its admin port (`client_sdk::admin`): checks, gauges, status, peers,
//!   outbox, catalog, grants, reload and backup.
//! - [`state`]: the node's live status, shared by registration and `NodeStatus`.
//! - [`store`]: the registration that survives a restart, and the one sled database ([`store::NodeStore`]).
//! - [`error`]: [`error::NodeError`] and its one mapping to gRPC statuses.
//! - `src/main.rs`: `exchange-node --config FILE` (logging, binding, signals) and
//!   `exchange-node audit verify --data-dir DIR` (offline check).
//!
//! # Invariants
//! - The node runs only with a certificate of role `node`; every directory call is made with it, so the
//!   directory sees the node's department, never a caller's claim.
//! - TLS is configured only through `client_sdk::tls`; every `ExchangeNode` call passes
//!   `client_sdk::auth::IdentityInterceptor` (revocation checked per call).
//! - Directory errors reach the node's callers with the directory's code, message and details; a
//!   provider node's errors reach the application the same way.
//! - Nothing leaves the node unaudited: a relayed answer is sent only after its audit entry is appended.
//! - Citizen identity numbers are never logged or audited in clear: audit entries carry keyed hashes of
//!   record keys, and errors quote identity numbers only masked.

pub mod admin;
pub mod audit;
pub mod backup;
pub mod config;
pub mod consumer;
pub mod error;
pub mod events;
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
