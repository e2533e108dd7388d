//! Building error statuses that carry google.rpc details, shared by every server so a client sees the same
//! shape from the directory and from any node.

use std::time::Duration;

use tonic::{Code, Status};
use tonic_types::{ErrorDetails, FieldViolation, StatusExt};

/// gRPC status code names as the gRPC spec writes them, indexed by code (`GRPC_CODE_NAMES[7]` is
/// `PERMISSION_DENIED`).
pub const GRPC_CODE_NAMES: [&str; 17] = [
    "OK",
    "CANCELLED",
    "UNKNOWN",
    "INVALID_ARGUMENT",
    "DEADLINE_EXCEEDED",
    "NOT_FOUND",
    "ALREADY_EXISTS",
    "PERMISSION_DENIED",
    "RESOURCE_EXHAUSTED",
    "FAILED_PRECONDITION",
    "ABORTED",
    "OUT_OF_RANGE",
    "UNIMPLEMENTED",
    "INTERNAL",
    "UNAVAILABLE",
    "DATA_LOSS",
    "UNAUTHENTICATED",
];

/// One bad request field: a path like `entries[3].data_items[0].name` or `records[2].items[注册资本]`,
/// and what is wrong with it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Violation {
    pub field: String,
    pub description: String,
}

impl Violation {
    pub fn new(field: impl Into<String>, description: impl Into<String>) -> Self {
        Violation { field: field.into(), description: description.into() }
    }
}

/// "invalid request: FIELD: WHY (and N more field violations)".
pub fn invalid_message(violations: &[Violation]) -> String {
    match violations {
        [] => "invalid request".to_string(),
        [one] => format!("invalid request: {}: {}", one.field, one.description),
        [first, rest @ ..] => format!(
            "invalid request: {}: {} (and {} more field violations)",
            first.field,
            first.description,
            rest.len()
        ),
    }
}

/// Budget for the field violations sent in one status. Details travel base64-encoded in the
/// `grpc-status-details-bin` trailer, and HTTP/2 peers refuse header blocks over 16 KiB by default (the
/// call then fails with a bare PROTOCOL_ERROR instead of INVALID_ARGUMENT), so a batch of thousands of
/// bad rows reports the first violations that fit and says how many there were.
pub const DETAILS_BUDGET_BYTES: usize = 6 * 1024;

/// `INVALID_ARGUMENT` with a google.rpc.BadRequest listing the violations (as many as fit the budget).
pub fn bad_request(violations: Vec<Violation>) -> Status {
    let message = invalid_message(&violations);
    let total = violations.len();
    let mut used = 0;
    let fvs: Vec<FieldViolation> = violations
        .into_iter()
        .take_while(|v| {
            used += v.field.len() + v.description.len() + 8;
            used <= DETAILS_BUDGET_BYTES
        })
        .map(|v| FieldViolation::new(v.field, v.description))
        .collect();
    let message = if fvs.len() < total {
        format!("{message}; the details list the first {} of {total} violations", fvs.len())
    } else {
        message
    };
    Status::with_error_details(Code::InvalidArgument, message, ErrorDetails::with_bad_request(fvs))
}

/// `RESOURCE_EXHAUSTED` with a google.rpc.RetryInfo saying when to retry.
pub fn resource_exhausted(message: impl Into<String>, retry_after: Duration) -> Status {
    // Round up to whole milliseconds so a client that waits exactly this long is not refused again.
    let retry = Duration::from_millis(retry_after.as_millis() as u64 + 1);
    Status::with_error_details(Code::ResourceExhausted, message, ErrorDetails::with_retry_info(Some(retry)))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn thousands_of_violations_fit_in_a_trailer() {
        let many = (0..5000).map(|i| Violation::new(format!("records[{i}].key"), "bad check character")).collect();
        let s = bad_request(many);
        assert_eq!(s.code(), Code::InvalidArgument);
        let bad = s.get_details_bad_request().unwrap();
        assert!(bad.field_violations.len() < 5000 && !bad.field_violations.is_empty());
        assert!(s.message().contains("of 5000 violations"), "{}", s.message());
    }

    #[test]
    fn retry_info_is_attached() {
        let s = resource_exhausted("slow down", Duration::from_millis(250));
        let retry = s.get_details_retry_info().unwrap();
        assert!(retry.retry_delay.unwrap() >= Duration::from_millis(250));
    }
}
