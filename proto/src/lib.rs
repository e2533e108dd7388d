//! The gov-exchange wire contract, generated from `proto/govexchange/v1/*.proto`.
//!
//! # Layout
//! - [`v1`]: messages and the `Directory` / `ExchangeNode` services (client and server stubs).
//! - [`FILE_DESCRIPTOR_SET`]: for gRPC server reflection.
//!
//! This crate does no I/O; limits shared by every server live in [`limits`].

pub mod v1 {
    tonic::include_proto!("govexchange.v1");
}

/// Encoded descriptors of every service, registered with server reflection.
pub const FILE_DESCRIPTOR_SET: &[u8] = tonic::include_file_descriptor_set!("govexchange_descriptor");

/// Limits every server enforces, in one place so clients and docs agree.
pub mod limits {
    /// Largest gRPC message a server accepts or sends (bytes). Larger ones are refused with `OUT_OF_RANGE`
    /// before they are decoded.
    pub const MAX_MESSAGE_BYTES: usize = 4 * 1024 * 1024;
    /// Most entries in one publish or withdraw batch.
    pub const MAX_BATCH_ENTRIES: usize = 5_000;
    /// Most records in one `PutRecords` batch.
    pub const MAX_BATCH_RECORDS: usize = 5_000;
    /// Most keys in one `QueryRecords` / `FetchRecords` call.
    pub const MAX_QUERY_KEYS: usize = 1_000;
}
