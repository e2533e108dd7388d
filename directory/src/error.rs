//! Every way a directory call can fail, and the one place those failures become gRPC statuses.
//!
//! Handlers return `Result<_, DirectoryError>`; `From<DirectoryError> for Status` is the only mapping, so
//! a client sees the same code for the same problem on every method:
//!
//! | variant | code | details |
//! |---|---|---|
//! | `InvalidArgument` | `INVALID_ARGUMENT` | google.rpc.BadRequest, one field violation per bad field |
//! | `PermissionDenied` | `PERMISSION_DENIED` | |
//! | `NotFound` | `NOT_FOUND` | |
//! | `AlreadyExists` | `ALREADY_EXISTS` | |
//! | `FailedPrecondition` | `FAILED_PRECONDITION` | |
//! | `OutOfRange` | `OUT_OF_RANGE` | |
//! | `Auth` | as produced by `client_sdk::auth` | passed through |
//! | `Store`, `Internal`, `Search(Index)` | `INTERNAL` | message logged, generic text sent |
//! | `Search(InvalidArgument)` | `INVALID_ARGUMENT` | one field violation |
//! | `ShuttingDown` | `UNAVAILABLE` | |
//! | `Store(Conflict)` | `ABORTED` | other replicas' writes kept winning; try again |

use tonic::Status;

use crate::search::SearchError;
use crate::store::StoreError;

/// One bad request field: a path like `entries[3].data_items[0].name` and what is wrong with it.
pub use client_sdk::status::Violation;
use client_sdk::status::{bad_request, invalid_message};

#[derive(Debug, thiserror::Error)]
pub enum DirectoryError {
    /// The request is malformed; `violations` is never empty.
    #[error("{}", invalid_message(.violations))]
    InvalidArgument { violations: Vec<Violation> },
    #[error("{0}")]
    PermissionDenied(String),
    #[error("{0}")]
    NotFound(String),
    /// What the request would create exists already (a pending grant request of the same consumer for the
    /// same resource); the message names it.
    #[error("{0}")]
    AlreadyExists(String),
    #[error("{0}")]
    FailedPrecondition(String),
    #[error("{0}")]
    OutOfRange(String),
    /// A status already produced by `client_sdk::auth` (role checks, a missing interceptor).
    #[error("{}", .0.message())]
    Auth(Status),
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error(transparent)]
    Search(#[from] SearchError),
    #[error("internal error: {0}")]
    Internal(String),
    #[error("the directory is shutting down")]
    ShuttingDown,
}

impl DirectoryError {
    /// A single bad field.
    pub fn invalid(field: impl Into<String>, description: impl Into<String>) -> Self {
        DirectoryError::InvalidArgument { violations: vec![Violation::new(field, description)] }
    }
}

impl From<DirectoryError> for Status {
    fn from(err: DirectoryError) -> Status {
        match err {
            DirectoryError::InvalidArgument { violations } => bad_request(violations),
            DirectoryError::PermissionDenied(m) => Status::permission_denied(m),
            DirectoryError::NotFound(m) => Status::not_found(m),
            DirectoryError::AlreadyExists(m) => Status::already_exists(m),
            DirectoryError::FailedPrecondition(m) => Status::failed_precondition(m),
            DirectoryError::OutOfRange(m) => Status::out_of_range(m),
            DirectoryError::Auth(status) => status,
            DirectoryError::Search(SearchError::InvalidArgument { field, reason }) => {
                bad_request(vec![Violation::new(field, reason)])
            }
            DirectoryError::ShuttingDown => Status::unavailable("the directory is shutting down; retry"),
            DirectoryError::Store(StoreError::Conflict(why)) => Status::aborted(format!(
                "{why}: other directory replicas' writes kept conflicting with this one; try again"
            )),
            e @ (DirectoryError::Store(_)
            | DirectoryError::Search(SearchError::Index(_))
            | DirectoryError::Internal(_)) => {
                // The detail may name disk paths or engine internals: log it, send a generic message.
                tracing::error!(error = %e, "request failed");
                Status::internal("internal directory error (logged on the directory)")
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use client_sdk::status::DETAILS_BUDGET_BYTES;
    use tonic::Code;
    use tonic_types::StatusExt;

    #[test]
    fn invalid_argument_carries_one_field_violation_per_field() {
        let status: Status = DirectoryError::InvalidArgument {
            violations: vec![Violation::new("entries[0].name", "empty"), Violation::new("entries[1].summary", "empty")],
        }
        .into();
        assert_eq!(status.code(), Code::InvalidArgument);
        let br = status.get_details_bad_request().expect("bad request details");
        let fields: Vec<&str> = br.field_violations.iter().map(|v| v.field.as_str()).collect();
        assert_eq!(fields, ["entries[0].name", "entries[1].summary"]);
        assert!(status.message().contains("1 more"));
    }

    #[test]
    fn thousands_of_violations_fit_in_an_http2_trailer() {
        let violations = (0..5000)
            .map(|i| Violation::new(format!("entries[{i}].share_condition"), "is required for conditional resources"))
            .collect();
        let status: Status = DirectoryError::InvalidArgument { violations }.into();
        assert!(status.details().len() < DETAILS_BUDGET_BYTES + 1024, "{} bytes", status.details().len());
        let br = status.get_details_bad_request().expect("bad request details");
        assert!(br.field_violations.len() > 50, "still lists many: {}", br.field_violations.len());
        assert!(status.message().contains("of 5000 violations"), "{}", status.message());
    }

    #[test]
    fn internal_errors_do_not_leak_details() {
        let status: Status = DirectoryError::Store(StoreError::Backend("/secret/path: EIO".into())).into();
        assert_eq!(status.code(), Code::Internal);
        assert!(!status.message().contains("/secret"));
    }
}
