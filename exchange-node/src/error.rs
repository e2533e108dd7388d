//! The node's errors, and the one place they become gRPC statuses ([`From<NodeError> for Status`]).

use std::error::Error as _;
use std::time::Duration;

use client_sdk::catalog::CatalogError;
use client_sdk::identity::Role;
pub use client_sdk::status::Violation;
use client_sdk::tls::TlsError;
use tonic::Status;

#[derive(Debug, thiserror::Error)]
pub enum NodeError {
    // ---- start-up: the node refuses to start ----
    #[error("configuration: {0}")]
    Config(String),
    #[error("{0}")]
    Tls(#[from] TlsError),
    #[error("the node's certificate {name} has role {role}; an exchange node needs a certificate with role node")]
    WrongRole { role: Role, name: String },
    #[error("catalog_file: {0}")]
    Catalog(#[from] CatalogError),
    #[error("store: {0}")]
    Store(String),
    #[error("gRPC server: {0}")]
    Serve(String),

    // ---- per call ----
    /// The request is malformed; one violation per bad field. Nothing of it is stored or relayed.
    #[error("{}", client_sdk::status::invalid_message(.0))]
    InvalidArgument(Vec<Violation>),
    /// The caller may not do this here.
    #[error("{0}")]
    PermissionDenied(String),
    #[error("{0}")]
    NotFound(String),
    #[error("{0}")]
    FailedPrecondition(String),
    /// A position (seq) outside what is kept.
    #[error("{0}")]
    OutOfRange(String),
    /// Events that were owed are gone (a subscription must be made again and resynchronized).
    #[error("{0}")]
    DataLoss(String),
    /// A provider's quota for this consumer and resource is used up until `retry_after`.
    #[error("{message}")]
    ResourceExhausted { message: String, retry_after: Duration },
    /// Something the call needs is not available right now (retry later).
    #[error("{0}")]
    Unavailable(String),
    /// The provider's node answered with an error; it goes back to the application as the provider sent it.
    #[error("provider: {}", .0.message())]
    Peer(Status),
    /// The audit trail could not be written: the request is refused rather than served unrecorded.
    #[error("audit trail: {0}")]
    Audit(String),
    /// The directory answered with an error; it goes back to the caller as the directory sent it.
    #[error("directory: {}", .0.message())]
    Directory(Status),
    /// The directory could not be reached (connection refused, TLS failure, timeout on connect).
    #[error("directory at {addr} is unreachable: {reason}")]
    DirectoryUnreachable { addr: String, reason: String },
}

impl NodeError {
    /// A single bad field.
    pub fn invalid(field: impl Into<String>, description: impl Into<String>) -> Self {
        NodeError::InvalidArgument(vec![Violation::new(field, description)])
    }

    /// Sorts a failed directory call: a status the directory sent passes through unchanged; one our own
    /// client made up (it carries the transport error as its source) means the directory was not reached.
    pub fn from_directory(addr: &str, status: Status) -> NodeError {
        if status.source().is_some() {
            NodeError::DirectoryUnreachable { addr: addr.to_string(), reason: client_sdk::tls::error_chain(&status) }
        } else {
            NodeError::Directory(status)
        }
    }
}

impl From<crate::audit::AuditError> for NodeError {
    fn from(e: crate::audit::AuditError) -> Self {
        match e {
            crate::audit::AuditError::InvalidFilter { field, reason } => NodeError::invalid(field, reason),
            e => NodeError::Audit(e.to_string()),
        }
    }
}

impl From<sled::Error> for NodeError {
    fn from(e: sled::Error) -> Self {
        NodeError::Store(e.to_string())
    }
}

impl From<NodeError> for Status {
    fn from(e: NodeError) -> Status {
        match e {
            NodeError::InvalidArgument(violations) => client_sdk::status::bad_request(violations),
            NodeError::PermissionDenied(msg) => Status::permission_denied(msg),
            NodeError::NotFound(msg) => Status::not_found(msg),
            NodeError::FailedPrecondition(msg) => Status::failed_precondition(msg),
            NodeError::OutOfRange(msg) => Status::out_of_range(msg),
            NodeError::DataLoss(msg) => Status::data_loss(msg),
            NodeError::ResourceExhausted { message, retry_after } => {
                client_sdk::status::resource_exhausted(message, retry_after)
            }
            NodeError::Unavailable(msg) => Status::unavailable(msg),
            NodeError::Peer(s) => Status::with_details(s.code(), s.message(), s.details().to_vec().into()),
            // Rebuilt from code, message and details only: the details (google.rpc.BadRequest with the field
            // violations) are what the caller needs; the directory's transport headers are not ours to relay.
            NodeError::Directory(s) => Status::with_details(s.code(), s.message(), s.details().to_vec().into()),
            e @ NodeError::DirectoryUnreachable { .. } => Status::unavailable(e.to_string()),
            e => {
                tracing::error!(error = %e, "internal error");
                Status::internal(e.to_string())
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tonic::Code;
    use tonic_types::{ErrorDetails, StatusExt};

    #[test]
    fn directory_status_passes_back_with_its_field_violations() {
        let details = ErrorDetails::with_bad_request_violation("entries[0].share_condition", "required");
        let from_directory = Status::with_error_details(Code::InvalidArgument, "1 invalid field", details);
        let relayed: Status = NodeError::from_directory("dir:7400", from_directory).into();
        assert_eq!(relayed.code(), Code::InvalidArgument);
        assert_eq!(relayed.message(), "1 invalid field");
        let bad = relayed.get_details_bad_request().expect("details kept");
        assert_eq!(bad.field_violations[0].field, "entries[0].share_condition");
    }

    #[test]
    fn permission_denied_and_internal() {
        let s: Status = NodeError::PermissionDenied("no".into()).into();
        assert_eq!(s.code(), Code::PermissionDenied);
        let s: Status = NodeError::Store("disk full".into()).into();
        assert_eq!(s.code(), Code::Internal);
    }
}
