//! The node's errors, and the one place they become gRPC statuses ([`From<NodeError> for Status`]).

use std::error::Error as _;

use client_sdk::catalog::CatalogError;
use client_sdk::identity::Role;
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
    /// The caller may not do this here.
    #[error("{0}")]
    PermissionDenied(String),
    /// The directory answered with an error; it goes back to the caller as the directory sent it.
    #[error("directory: {}", .0.message())]
    Directory(Status),
    /// The directory could not be reached (connection refused, TLS failure, timeout on connect).
    #[error("directory at {addr} is unreachable: {reason}")]
    DirectoryUnreachable { addr: String, reason: String },
}

impl NodeError {
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

impl From<sled::Error> for NodeError {
    fn from(e: sled::Error) -> Self {
        NodeError::Store(e.to_string())
    }
}

impl From<NodeError> for Status {
    fn from(e: NodeError) -> Status {
        match e {
            NodeError::PermissionDenied(msg) => Status::permission_denied(msg),
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
