//! The gov-exchange central directory: node registry, catalog, search, grants, revocations, served as the
//! `govexchange.v1.Directory` gRPC service over mutual TLS. It records the rules; the provider's node
//! enforces them.
//!
//! # Layout
//! - [`admin`]: what the directory shows on its admin port (`client_sdk::admin`).
//! - [`backup`]: a consistent backup of the running directory's store (the admin port's `GET /api/backup`).
//! - [`config`]: the TOML configuration ([`config::Config`]).
//! - [`server`]: start-up (open stores, rebuild the index, load revocations) and serving with health,
//!   reflection, graceful shutdown ([`server::run`], [`server::LoadedDirectory`]).
//! - [`follow`]: the change follower: applies the store's change logs to this replica's search index and
//!   revoked-serial set and wakes its watchers, whoever wrote (several replicas may share one store).
//! - [`service`]: the Directory RPCs: roles, ownership, the write path (store → index → watchers).
//! - [`validate`]: request validation (catalog field rules, addresses, search filters), one field violation
//!   per bad field.
//! - [`error`]: [`error::DirectoryError`] and its mapping to gRPC status codes, the only such mapping.
//! - [`store`]: storage traits ([`store::CatalogStore`], [`store::NodeStore`], [`store::RevocationStore`],
//!   [`store::GrantStore`]), the sled backend ([`store::sled`], the default) and the PostgreSQL backend
//!   ([`store::postgres`], for several replicas).
//! - [`watch`]: one change feed over a store's change log, serving `WatchCatalog`, `WatchGrants` and
//!   `WatchRevocations`.
//! - [`revocation`]: who may revoke which certificate.
//! - [`reload`]: SIGHUP (and the admin port's reload) re-reads the certificate and key: rotation without
//!   downtime.
//! - [`search`]: the full-text catalog index (tantivy + jieba).
//! - `main.rs`: the `directory --config FILE` binary.
//!
//! Identity comes only from the caller's certificate (`client_sdk::auth`); TLS is configured only in
//! `client_sdk::tls`.

pub mod admin;
pub mod backup;
pub mod config;
pub mod error;
pub mod follow;
pub mod revocation;
pub mod search;
pub mod reload;
pub mod server;
pub mod service;
pub mod store;
pub mod validate;
pub mod watch;

pub use config::Config;
pub use server::{run, LoadedDirectory, ServerError};
