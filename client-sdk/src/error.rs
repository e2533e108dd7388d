//! Errors as typed values: a gRPC `Status` from any gov-exchange server becomes a [`ClientError`], with the
//! field violations of `INVALID_ARGUMENT` (google.rpc.BadRequest) and the retry delay of
//! `RESOURCE_EXHAUSTED` (google.rpc.RetryInfo) decoded.
//!
//! The SDK's own checks (a bad key refused before anything is sent, see [`crate::records`]) produce the
//! same variants a server would, so a caller handles one error type either way.

use std::time::Duration;

use tonic::{Code, Status};
use tonic_types::StatusExt;

/// One bad field, as the server named it (`entries[3].resource_code`) and why.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct FieldViolation {
    pub field: String,
    pub description: String,
}

#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    #[error("invalid argument: {message}{}", fmt_violations(.violations))]
    InvalidArgument { message: String, violations: Vec<FieldViolation> },
    /// The message names what is missing (a resource, a record, a grant).
    #[error("not found: {0}")]
    NotFound(String),
    /// The message is the server's reason (no grant, wrong department, role not allowed...).
    #[error("permission denied: {0}")]
    PermissionDenied(String),
    #[error("unauthenticated: {0}")]
    Unauthenticated(String),
    /// A quota is used up; `retry_after` is the server's google.rpc.RetryInfo, when it sent one.
    #[error("rate limited: {message}{}", fmt_retry(.retry_after))]
    ResourceExhausted { message: String, retry_after: Option<Duration> },
    #[error("unavailable: {0}")]
    Unavailable(String),
    #[error("{code:?}: {message}")]
    Other { code: Code, message: String },
    #[error("{0}")]
    Tls(#[from] crate::tls::TlsError),
    /// A record in an answer does not have the format its items promise (a bad date, an unknown status).
    #[error("malformed record in the answer: {0}")]
    BadRecord(Box<crate::records::RecordError>),
}

impl From<crate::records::RecordError> for ClientError {
    fn from(e: crate::records::RecordError) -> Self {
        ClientError::BadRecord(Box::new(e))
    }
}

fn fmt_retry(retry_after: &Option<Duration>) -> String {
    match retry_after {
        Some(d) => format!(" (retry after {:.1}s)", d.as_secs_f64()),
        None => String::new(),
    }
}

fn fmt_violations(v: &[FieldViolation]) -> String {
    v.iter().map(|f| format!("\n  - {}: {}", f.field, f.description)).collect()
}

impl ClientError {
    /// The gRPC code this error came from (`Unavailable` for connection failures).
    pub fn code(&self) -> Code {
        match self {
            ClientError::InvalidArgument { .. } => Code::InvalidArgument,
            ClientError::NotFound(_) => Code::NotFound,
            ClientError::PermissionDenied(_) => Code::PermissionDenied,
            ClientError::Unauthenticated(_) => Code::Unauthenticated,
            ClientError::ResourceExhausted { .. } => Code::ResourceExhausted,
            ClientError::Unavailable(_) | ClientError::Tls(_) => Code::Unavailable,
            ClientError::Other { code, .. } => *code,
            ClientError::BadRecord(_) => Code::Internal,
        }
    }

    /// Adds a sentence to the error's message (kept as is for TLS set-up errors, which have none).
    pub(crate) fn append_note(&mut self, note: &str) {
        match self {
            ClientError::InvalidArgument { message, .. }
            | ClientError::ResourceExhausted { message, .. }
            | ClientError::Other { message, .. }
            | ClientError::NotFound(message)
            | ClientError::PermissionDenied(message)
            | ClientError::Unauthenticated(message)
            | ClientError::Unavailable(message) => {
                message.push_str(note);
            }
            ClientError::Tls(_) | ClientError::BadRecord(_) => {}
        }
    }
}

/// `first: source: source's source...`, leaving out parts already said (transport errors repeat their
/// cause at every level).
fn distinct_chain(first: &str, source: &(dyn std::error::Error + 'static)) -> String {
    let mut parts: Vec<String> = vec![first.to_string()];
    let mut cur = Some(source);
    while let Some(e) = cur {
        let text = e.to_string();
        if !parts.iter().any(|p| p.contains(&text)) {
            parts.push(text);
        }
        cur = e.source();
    }
    parts.retain(|p| !p.is_empty());
    parts.join(": ")
}

impl From<Status> for ClientError {
    fn from(status: Status) -> Self {
        // A status our own client made up from a transport failure (refused connection, TLS alert) says
        // only "transport error"; the reason is in its source chain.
        let message = match std::error::Error::source(&status) {
            Some(source) => distinct_chain(status.message(), source),
            None => status.message().to_string(),
        };
        match status.code() {
            Code::InvalidArgument => {
                let violations = status
                    .get_details_bad_request()
                    .map(|br| {
                        br.field_violations
                            .into_iter()
                            .map(|v| FieldViolation { field: v.field, description: v.description })
                            .collect()
                    })
                    .unwrap_or_default();
                ClientError::InvalidArgument { message, violations }
            }
            Code::NotFound => ClientError::NotFound(message),
            Code::PermissionDenied => ClientError::PermissionDenied(message),
            Code::Unauthenticated => ClientError::Unauthenticated(message),
            Code::ResourceExhausted => {
                let retry_after = status.get_details_retry_info().and_then(|r| r.retry_delay);
                ClientError::ResourceExhausted { message, retry_after }
            }
            Code::Unavailable => ClientError::Unavailable(message),
            code => ClientError::Other { code, message },
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[derive(Debug, thiserror::Error)]
    #[error("transport error")]
    struct Transport(#[source] std::io::Error);

    #[test]
    fn transport_failures_keep_their_reason_once() {
        let io = std::io::Error::new(std::io::ErrorKind::ConnectionRefused, "Connection refused");
        let status = Status::from_error(Box::new(Transport(io)));
        let err = ClientError::from(status);
        assert_eq!(err.code(), Code::Unknown);
        let text = err.to_string();
        assert!(text.contains("transport error") && text.contains("Connection refused"), "{text}");
        assert_eq!(text.matches("Connection refused").count(), 1, "{text}");
    }

    #[test]
    fn rate_limit_text_says_when_to_retry() {
        let details = tonic_types::ErrorDetails::with_retry_info(Some(Duration::from_millis(1500)));
        let status = Status::with_error_details(Code::ResourceExhausted, "quota of tax on 101001/000001", details);
        let err = ClientError::from(status);
        assert!(matches!(err, ClientError::ResourceExhausted { retry_after: Some(_), .. }));
        assert!(err.to_string().contains("(retry after 1.5s)"), "{err}");
        let err = ClientError::ResourceExhausted { message: "slow down".into(), retry_after: None };
        assert_eq!(err.to_string(), "rate limited: slow down");
    }
}
