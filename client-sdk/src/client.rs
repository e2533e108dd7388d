//! Typed connections to the directory and to a department node over mutual TLS.

use std::future::Future;
use std::sync::Arc;

use exchange_proto::limits::{MAX_BATCH_ENTRIES, MAX_MESSAGE_BYTES};
use exchange_proto::v1::directory_client::DirectoryClient;
use exchange_proto::v1::exchange_node_client::ExchangeNodeClient;
use exchange_proto::v1::{CatalogEntry, PublishEntriesRequest, PublishEntriesResponse};
use tonic::transport::Channel;
use tonic::Status;

use crate::error::ClientError;
use crate::identity::Role;
use crate::tls::{self, TlsError, TlsIdentity};

/// A directory client; the server must present a certificate with role `directory`.
pub fn directory_client(addr: &str, id: &TlsIdentity) -> Result<DirectoryClient<Channel>, TlsError> {
    let channel = tls::connect_lazy(addr, tls::client_config(id, &[Role::Directory])?)?;
    Ok(directory_client_on(channel))
}

/// A channel to the directory that can be re-dialled: every clone shares the connection in use, and
/// [`DirectoryChannel::redial`] makes all of them move to a fresh one.
///
/// A node's connection to the directory lives for hours, and a TLS connection keeps the certificate it
/// was opened with. After a certificate rotation the node re-dials, so its next calls present the new
/// certificate and the old serial can be revoked at once. Calls and streams already running finish on
/// the old connection, which closes when the last of them ends.
#[derive(Clone)]
pub struct DirectoryChannel {
    inner: Arc<DirectoryChannelInner>,
}

struct DirectoryChannelInner {
    addr: String,
    config: Arc<rustls::ClientConfig>,
    current: std::sync::RwLock<Channel>,
}

impl std::fmt::Debug for DirectoryChannel {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("DirectoryChannel").field("addr", &self.inner.addr).finish_non_exhaustive()
    }
}

impl DirectoryChannel {
    /// A lazily connected channel to the directory at `addr`; the server must have role `directory`.
    pub fn new(addr: &str, id: &TlsIdentity) -> Result<Self, TlsError> {
        let config = tls::client_config(id, &[Role::Directory])?;
        let channel = tls::connect_lazy(addr, config.clone())?;
        Ok(DirectoryChannel {
            inner: Arc::new(DirectoryChannelInner { addr: addr.to_string(), config, current: std::sync::RwLock::new(channel) }),
        })
    }

    /// Moves every clone's next call to a new connection (dialled lazily, with the certificate in use now).
    pub fn redial(&self) -> Result<(), TlsError> {
        let fresh = tls::connect_lazy(&self.inner.addr, self.inner.config.clone())?;
        *self.inner.current.write().expect("directory channel lock") = fresh;
        Ok(())
    }

    pub fn address(&self) -> &str {
        &self.inner.addr
    }

    /// A directory client over this channel (message limits set as the servers set them).
    pub fn client(&self) -> DirectoryClient<DirectoryChannel> {
        DirectoryClient::new(self.clone())
            .max_decoding_message_size(MAX_MESSAGE_BYTES)
            .max_encoding_message_size(MAX_MESSAGE_BYTES)
    }
}

impl tower::Service<http::Request<tonic::body::Body>> for DirectoryChannel {
    type Response = http::Response<tonic::body::Body>;
    type Error = tonic::transport::Error;
    type Future = std::pin::Pin<Box<dyn Future<Output = Result<Self::Response, Self::Error>> + Send>>;

    fn poll_ready(&mut self, _cx: &mut std::task::Context<'_>) -> std::task::Poll<Result<(), Self::Error>> {
        // Readiness is the channel's, checked in `call` on the channel in use at that moment.
        std::task::Poll::Ready(Ok(()))
    }

    fn call(&mut self, request: http::Request<tonic::body::Body>) -> Self::Future {
        let mut channel = self.inner.current.read().expect("directory channel lock").clone();
        Box::pin(async move {
            use tower::ServiceExt;
            channel.ready().await?;
            tower::Service::call(&mut channel, request).await
        })
    }
}

/// A directory client on an existing channel (message limits set as the servers set them).
pub fn directory_client_on(channel: Channel) -> DirectoryClient<Channel> {
    DirectoryClient::new(channel)
        .max_decoding_message_size(MAX_MESSAGE_BYTES)
        .max_encoding_message_size(MAX_MESSAGE_BYTES)
}

/// A client of a department node's application API; the server must present a `node` certificate.
pub fn node_client(addr: &str, id: &TlsIdentity) -> Result<ExchangeNodeClient<Channel>, TlsError> {
    let channel = tls::connect_lazy(addr, tls::client_config(id, &[Role::Node])?)?;
    Ok(ExchangeNodeClient::new(channel)
        .max_decoding_message_size(MAX_MESSAGE_BYTES)
        .max_encoding_message_size(MAX_MESSAGE_BYTES))
}

/// A client config for callers that build their own channels (shared by many connections).
pub fn client_tls(id: &TlsIdentity, server_roles: &[Role]) -> Result<Arc<rustls::ClientConfig>, TlsError> {
    tls::client_config(id, server_roles)
}

/// What a catalog publish, possibly split in batches, was acknowledged with.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct PublishOutcome {
    /// The catalog version after the last batch.
    pub catalog_version: u64,
    /// One version per published entry, in the order given.
    pub entry_versions: Vec<u64>,
}

/// A batch was refused; the batches before it were accepted and are durable in the directory.
#[derive(Debug, thiserror::Error)]
#[error("{error}{}", accepted_note(*.accepted))]
pub struct BatchPublishError {
    /// How many entries (from the start of the slice given) the directory had accepted before the failure:
    /// retry from `entries[accepted..]` with `index_offset + accepted`.
    pub accepted: usize,
    /// The refusal; field violations are numbered by position in the whole list, not in the batch.
    pub error: ClientError,
}

fn accepted_note(accepted: usize) -> String {
    if accepted == 0 {
        String::new()
    } else {
        format!("\n  (the first {accepted} entries were accepted before this batch was refused)")
    }
}

/// Publishes `entries` in batches of at most [`MAX_BATCH_ENTRIES`] through `send` (a directory's
/// `PublishEntries` or a node's `PublishCatalog`; both take the same messages), calling `progress` with
/// the size of each accepted batch.
///
/// The directory names a bad field by its index in the batch (`entries[3].name`); those indexes are
/// renumbered to the position in `entries` plus `index_offset`, so a message points at the right entry of
/// the file however the file was split.
pub async fn publish_batches<F, Fut>(
    entries: &[CatalogEntry],
    index_offset: usize,
    mut send: F,
    mut progress: impl FnMut(usize),
) -> Result<PublishOutcome, BatchPublishError>
where
    F: FnMut(PublishEntriesRequest) -> Fut,
    Fut: Future<Output = Result<tonic::Response<PublishEntriesResponse>, Status>>,
{
    let mut outcome = PublishOutcome::default();
    let mut accepted = 0;
    for batch in entries.chunks(MAX_BATCH_ENTRIES) {
        let request = PublishEntriesRequest { entries: batch.to_vec() };
        match send(request).await {
            Ok(resp) => {
                let resp = resp.into_inner();
                outcome.catalog_version = resp.catalog_version;
                outcome.entry_versions.extend(resp.entry_versions);
                accepted += batch.len();
                progress(batch.len());
            }
            Err(status) => {
                let mut error = ClientError::from(status);
                renumber_violations(&mut error, index_offset + accepted);
                return Err(BatchPublishError { accepted, error });
            }
        }
    }
    Ok(outcome)
}

/// Shifts `entries[N]` in field violation names by `offset` (see [`publish_batches`]).
pub fn renumber_violations(error: &mut ClientError, offset: usize) {
    if offset == 0 {
        return;
    }
    if let ClientError::InvalidArgument { violations, .. } = error {
        for v in violations {
            if let Some(index) = v.field.strip_prefix("entries[").and_then(|rest| rest.split_once(']')) {
                if let Ok(n) = index.0.parse::<usize>() {
                    v.field = format!("entries[{}]{}", n + offset, index.1);
                }
            }
        }
    }
}

/// The index of the entry a field violation is about (`entries[12].name` → 12), to show its resource code.
pub fn violation_entry_index(field: &str) -> Option<usize> {
    field.strip_prefix("entries[")?.split_once(']')?.0.parse().ok()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::error::FieldViolation;

    #[test]
    fn violations_are_renumbered_to_the_whole_list() {
        let mut e = ClientError::InvalidArgument {
            message: "bad".into(),
            violations: vec![
                FieldViolation { field: "entries[3].name".into(), description: "empty".into() },
                FieldViolation { field: "entries".into(), description: "too many".into() },
            ],
        };
        renumber_violations(&mut e, 5000);
        let ClientError::InvalidArgument { violations, .. } = e else { unreachable!() };
        assert_eq!(violations[0].field, "entries[5003].name");
        assert_eq!(violations[1].field, "entries");
        assert_eq!(violation_entry_index("entries[5003].name"), Some(5003));
        assert_eq!(violation_entry_index("entries"), None);
    }

    #[tokio::test]
    async fn publish_splits_into_batches_and_reports_partial_acceptance() {
        let entries = vec![CatalogEntry::default(); MAX_BATCH_ENTRIES + 3];
        let mut sizes = Vec::new();
        let mut calls = 0;
        let result = publish_batches(
            &entries,
            0,
            |req| {
                calls += 1;
                let n = req.entries.len();
                let call = calls;
                async move {
                    if call == 2 {
                        let details = tonic_types::ErrorDetails::with_bad_request_violation("entries[1].name", "empty");
                        use tonic_types::StatusExt;
                        Err(Status::with_error_details(tonic::Code::InvalidArgument, "bad entry", details))
                    } else {
                        Ok(tonic::Response::new(PublishEntriesResponse {
                            catalog_version: 10,
                            entry_versions: vec![10; n],
                        }))
                    }
                }
            },
            |n| sizes.push(n),
        )
        .await;
        let err = result.unwrap_err();
        assert_eq!(sizes, [MAX_BATCH_ENTRIES]);
        assert_eq!(err.accepted, MAX_BATCH_ENTRIES);
        let ClientError::InvalidArgument { violations, .. } = &err.error else { panic!("{err}") };
        assert_eq!(violations[0].field, format!("entries[{}].name", MAX_BATCH_ENTRIES + 1));
    }
}
