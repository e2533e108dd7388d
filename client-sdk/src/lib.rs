//! The gov-exchange client library: what applications, operators and the servers themselves use to speak
//! to the exchange over mutual TLS.
//!
//! # Layout
//! - [`identity`]: the department and role a certificate carries (URI SAN), read from DER.
//! - [`pki`]: a small CA: `exchangectl pki init|issue` write certificates with identities in them.
//! - [`tls`]: the one place TLS is configured: server and client rustls configs, the revocation set,
//!   the TLS accept loop with a connection limit, and channel set-up.
//! - [`auth`]: per-call authentication (tonic interceptor) and role checks for servers.
//! - [`backup`]: the checksummed backup file of a server's store: writing, verifying, restoring.
//! - [`ids`]: validation of unified social credit codes and citizen identity numbers, and masking.
//! - [`client`]: typed connections to the directory and to a node, and batched catalog publishing.
//! - [`records`]: what applications use: typed enterprise and population records (item names, formats,
//!   masking) and `ExchangeClient` (put and query records through the department's node, grants at the
//!   directory, the node's audit trail), with keys checked before anything is sent.
//! - [`events`]: push subscriptions and bulk sync: publish changes, subscribe, `EventSubscription` (a
//!   resumable exactly-once reader of a subscription's events), `SnapshotReader` (resumable bulk sync) and
//!   `Replica` (an in-memory copy kept exact by versions).
//! - [`process`]: what every server binary shares: log set-up and the shutdown signal.
//! - [`telemetry`]: logs plus optional OpenTelemetry trace export (`[telemetry]`), and W3C trace context
//!   in gRPC metadata.
//! - [`catalog`]: catalog entries as TOML/JSON people edit and read, and their conversion to the wire type.
//! - [`error`]: turns a gRPC `Status` (with google.rpc details) into a typed [`error::ClientError`].
//! - [`cli`]: the operator CLI `exchangectl` (commands, output, tables); `src/bin/exchangectl.rs` only
//!   parses and runs it.

pub mod admin;
pub mod auth;
pub mod backup;
pub mod catalog;
pub mod cli;
pub mod client;
pub mod error;
pub mod events;
pub mod identity;
pub mod ids;
pub mod pki;
pub mod process;
pub mod records;
pub mod status;
pub mod telemetry;
pub mod tls;

pub use exchange_proto as proto;
