//! Shared parts of the end-to-end tests and the benchmark harness.
//!
//! # Layout
//! - [`pki`]: a throw-away CA with certificates for a directory, department nodes, apps and operators.
//! - [`procs`]: finding and starting the real binaries (`directory`, `exchange-node`, `exchangectl`)
//!   with generated configs, and stopping them (gracefully or with SIGKILL).
//! - [`workload`]: realistic generated catalog entries (Chinese names, summaries, data items).
//! - [`load`]: closed-loop and open-loop load generators with exact latency percentiles.
//! - [`echo`]: the bare mutual-TLS echo server every benchmark figure is compared with.
//! - [`forwarder`]: the bare two-hop mutual-TLS forwarder the record relay is compared with.
//! - [`federation`]: the real directory and department nodes served in process, and generated
//!   enterprise records to load into them.
//! - [`postgres`]: the PostgreSQL server the directory's PostgreSQL tests run on, a fresh database each.
//! - [`store_contract`]: the directory storage traits' behaviour tests, run for every backend.
//! - [`ha_bench`]: `bench --only directory-ha`: publish and search on sled, and on PostgreSQL with one and
//!   two directory replicas.
//! - [`ops_bench`]: `bench --only ops`: what backups, metrics and scrapes cost a running node.
//! - [`relay_parts`]: the node's per-call relay steps timed one by one (where a relayed query's time goes).

pub mod echo;
pub mod events_bench;
pub mod federation;
pub mod forwarder;
pub mod ha_bench;
pub mod load;
pub mod ops_bench;
pub mod pki;
pub mod postgres;
pub mod procs;
pub mod relay_parts;
pub mod store_contract;
pub mod workload;
