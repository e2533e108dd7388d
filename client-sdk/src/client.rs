//! Typed connections to the directory and to a department node over mutual TLS.

use std::future::Future;
use std::sync::atomic::{AtomicUsize, Ordering};
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

/// A directory client over a [`DirectoryChannel`] to `addrs`: one `host:port`, or the directory's
/// replicas as a comma-separated list (`dir-a:7443,dir-b:7443`) to fail over between. The server must
/// present a certificate with role `directory`. Nothing is dialled until the first call.
pub fn directory_client(addrs: &str, id: &TlsIdentity) -> Result<DirectoryClient<DirectoryChannel>, TlsError> {
    Ok(DirectoryChannel::new(addrs, id)?.client())
}

/// A channel to the directory's replicas that fails over between them, and can be re-dialled.
///
/// The directory may run as several replicas over one database; clients are given all their addresses.
/// - **One replica at a time.** Every clone sends to the replica in use until a call to it fails, so one
///   client's calls see one replica's search index. Which replica a client starts on comes from its
///   certificate's serial ([`first_replica`]): clients spread over the list, each the same way every time.
/// - **Lazy dialling** with [`tls::connect_lazy`]'s connect timeout (5 s for TCP and TLS together), so a
///   vanished host holds a call that long at most before the next replica is tried.
/// - **Failover inside the call.** When the replica in use fails a call, the channel moves to the next
///   one and sends the call there (each replica at most once per call), so the caller sees no error
///   while one replica answers. A replica *fails* a call when the transport fails (no answer came) or it
///   answers `UNAVAILABLE` without a response (a replica shutting down). Any other answer, `NOT_FOUND`
///   or `INVALID_ARGUMENT` included, is the answer. When every replica failed, the call ends with
///   `UNAVAILABLE` naming each address and what happened there.
/// - **Sent again only when safe.** A request the replica never got (connection refused or timed out, TLS
///   failed, stream refused or started after the replica's GOAWAY) goes to the next replica whatever it
///   is. One the replica may have processed goes on only if repeating it is harmless ([`safe_to_repeat`]:
///   every Directory method but `RequestGrant`, `DecideGrant` and `RevokeGrant`); those three end with
///   `UNAVAILABLE` saying the outcome is unknown, to be checked with `ListGrants`.
/// - **Streams are not replayed.** A watch whose stream breaks after it began ends with that error; the
///   caller resumes it from its last version, and that new call goes to the next replica.
///
/// Re-dialling: a node's connection to the directory lives for hours, and a TLS connection keeps the
/// certificate it was opened with. After a certificate rotation the node calls
/// [`DirectoryChannel::redial`], so its next calls present the new certificate (to every replica) and the
/// old serial can be revoked at once. Calls and streams already running finish on the old connections,
/// which close when the last of them ends.
#[derive(Clone)]
pub struct DirectoryChannel {
    inner: Arc<Replicas>,
}

struct Replicas {
    addrs: Vec<String>,
    config: Arc<rustls::ClientConfig>,
    /// One lazily dialled channel per address, in the same order; `redial` replaces them all at once.
    channels: std::sync::RwLock<Vec<Channel>>,
    /// Index in `addrs` of the replica in use, shared by every clone.
    in_use: AtomicUsize,
}

impl std::fmt::Debug for DirectoryChannel {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("DirectoryChannel")
            .field("addrs", &self.inner.addrs)
            .field("in_use", &self.address())
            .finish_non_exhaustive()
    }
}

impl DirectoryChannel {
    /// A lazily connected channel to the directory at `addrs`: one `host:port` or a comma-separated list
    /// of replicas ([`directory_addresses`]). The server must have role `directory`.
    pub fn new(addrs: &str, id: &TlsIdentity) -> Result<Self, TlsError> {
        Self::with_addresses(&directory_addresses(addrs)?, id)
    }

    /// Like [`DirectoryChannel::new`], with the replicas' addresses already split.
    pub fn with_addresses(addrs: &[String], id: &TlsIdentity) -> Result<Self, TlsError> {
        check_directory_addresses(addrs)?;
        let config = tls::client_config(id, &[Role::Directory])?;
        let channels = dial_all(addrs, &config)?;
        let first = first_replica(&id.current().serial_hex, addrs.len());
        Ok(DirectoryChannel {
            inner: Arc::new(Replicas {
                addrs: addrs.to_vec(),
                config,
                channels: std::sync::RwLock::new(channels),
                in_use: AtomicUsize::new(first),
            }),
        })
    }

    /// Moves every clone's next call to new connections, one per replica (dialled lazily, with the
    /// certificate in use now).
    pub fn redial(&self) -> Result<(), TlsError> {
        let fresh = dial_all(&self.inner.addrs, &self.inner.config)?;
        *self.inner.channels.write().expect("directory channel lock") = fresh;
        Ok(())
    }

    /// The address of the replica in use: calls go there until it fails.
    pub fn address(&self) -> &str {
        &self.inner.addrs[self.inner.in_use.load(Ordering::Relaxed)]
    }

    /// Every replica's address, in the order given.
    pub fn addresses(&self) -> &[String] {
        &self.inner.addrs
    }

    /// A directory client over this channel (message limits set as the servers set them).
    pub fn client(&self) -> DirectoryClient<DirectoryChannel> {
        DirectoryClient::new(self.clone())
            .max_decoding_message_size(MAX_MESSAGE_BYTES)
            .max_encoding_message_size(MAX_MESSAGE_BYTES)
    }
}

fn dial_all(addrs: &[String], config: &Arc<rustls::ClientConfig>) -> Result<Vec<Channel>, TlsError> {
    addrs.iter().map(|addr| tls::connect_lazy(addr, config.clone())).collect()
}

/// Splits a directory address list, `host:port` or several separated by commas (spaces around them
/// allowed), and checks each: none empty, each `host:port`, none twice.
pub fn directory_addresses(list: &str) -> Result<Vec<String>, TlsError> {
    let addrs: Vec<String> =
        if list.trim().is_empty() { Vec::new() } else { list.split(',').map(|a| a.trim().to_string()).collect() };
    check_directory_addresses(&addrs)?;
    Ok(addrs)
}

fn check_directory_addresses(addrs: &[String]) -> Result<(), TlsError> {
    let refuse = |reason: String| TlsError::Connect { addr: format!("{:?}", addrs.join(",")), reason };
    if addrs.is_empty() {
        return Err(refuse("no directory address given (expected host:port, or several separated by commas)".into()));
    }
    for (i, addr) in addrs.iter().enumerate() {
        if addr.trim().is_empty() {
            return Err(refuse(format!(
                "directory address {} of {} is empty (expected host:port, or several separated by commas)",
                i + 1,
                addrs.len()
            )));
        }
        if let Err(e) = tls::split_host_port(addr) {
            let reason = match e {
                TlsError::Connect { reason, .. } => reason,
                other => other.to_string(),
            };
            return Err(refuse(format!("directory address {addr:?}: {reason}")));
        }
        if addrs[..i].contains(addr) {
            return Err(refuse(format!("directory address {addr} is listed twice")));
        }
    }
    Ok(())
}

/// The replica (an index below `replicas`) a client whose certificate has serial `serial_hex` starts on.
///
/// A hash of the serial, so clients spread evenly over the replicas and each starts on the same one
/// every time. FNV-1a with a final mix, not `DefaultHasher`, whose output may change between Rust releases.
pub fn first_replica(serial_hex: &str, replicas: usize) -> usize {
    if replicas <= 1 {
        return 0;
    }
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for b in serial_hex.trim().bytes().map(|b| b.to_ascii_lowercase()) {
        h ^= u64::from(b);
        h = h.wrapping_mul(0x0000_0100_0000_01b3);
    }
    // FNV's low bits depend on few input bits; the spread modulo a small count needs them mixed.
    h ^= h >> 33;
    h = h.wrapping_mul(0xff51_afd7_ed55_8ccd);
    h ^= h >> 33;
    (h % replicas as u64) as usize
}

/// Whether a directory call may be sent again after it may have reached a replica (the connection broke
/// mid-call, or the replica answered `UNAVAILABLE`).
///
/// Reads and watches are reads; publishing, withdrawing, revoking a certificate, registering and
/// heartbeats set a state, so a repeat is an idempotent upsert. A grant request, decision or revocation
/// is not: repeated, it could file a second request or meet the state its first attempt left. Calls to
/// other services (health, reflection) are not repeated either.
pub fn safe_to_repeat(path: &str) -> bool {
    let Some(method) =
        path.strip_prefix('/').and_then(|p| p.strip_prefix(DIRECTORY_SERVICE)).and_then(|p| p.strip_prefix('/'))
    else {
        return false;
    };
    !matches!(method, "RequestGrant" | "DecideGrant" | "RevokeGrant")
}

const DIRECTORY_SERVICE: &str = exchange_proto::v1::directory_server::SERVICE_NAME;

/// Whether a failed request may have reached the replica.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Delivery {
    /// It cannot have been processed: the connection never came up, the stream was refused, or it was
    /// opened after the replica's GOAWAY. Any call may go to the next replica.
    NotProcessed,
    /// It may have been processed: the connection broke with the call under way, or the replica answered
    /// `UNAVAILABLE`.
    MaybeProcessed,
}

/// Reads a transport error's source chain for where the request got to.
fn delivery_of(error: &(dyn std::error::Error + 'static)) -> Delivery {
    let mut seen_http = false;
    let mut cause = Some(error);
    while let Some(e) = cause {
        if e.is::<tonic::ConnectError>() {
            return Delivery::NotProcessed;
        }
        if let Some(h2) = e.downcast_ref::<h2::Error>() {
            // A GOAWAY fails only the streams above the last one the server took, and any opened after it.
            let unprocessed = h2.reason() == Some(h2::Reason::REFUSED_STREAM) || (h2.is_go_away() && h2.is_remote());
            return if unprocessed { Delivery::NotProcessed } else { Delivery::MaybeProcessed };
        }
        if let Some(hyper) = e.downcast_ref::<hyper::Error>() {
            // Canceled: the request was still queued for a connection that closed, never written.
            if hyper.is_canceled() {
                return Delivery::NotProcessed;
            }
            seen_http = true;
        }
        if let Some(io) = e.downcast_ref::<std::io::Error>() {
            // Outside an HTTP/2 error, an I/O error is the dial's: tonic's connect timeout reports itself so.
            if !seen_http && matches!(io.kind(), std::io::ErrorKind::TimedOut | std::io::ErrorKind::ConnectionRefused) {
                return Delivery::NotProcessed;
            }
        }
        cause = e.source();
    }
    Delivery::MaybeProcessed
}

/// Why a response counts as the replica failing the call rather than answering it: a trailers-only
/// `UNAVAILABLE`, or the gateway statuses gRPC reads as `UNAVAILABLE` (a proxy in front of a replica).
fn unavailable_answer(response: &http::Response<tonic::body::Body>) -> Option<String> {
    if let Some(status) = Status::from_header_map(response.headers()) {
        return (status.code() == tonic::Code::Unavailable)
            .then(|| format!("answered UNAVAILABLE: {}", status.message()));
    }
    matches!(
        response.status(),
        http::StatusCode::BAD_GATEWAY | http::StatusCode::SERVICE_UNAVAILABLE | http::StatusCode::GATEWAY_TIMEOUT
    )
    .then(|| format!("answered HTTP {}", response.status()))
}

fn copy_request(parts: &http::request::Parts, body: prost::bytes::Bytes) -> http::Request<tonic::body::Body> {
    let mut request = http::Request::new(tonic::body::Body::new(http_body_util::Full::new(body)));
    *request.method_mut() = parts.method.clone();
    *request.uri_mut() = parts.uri.clone();
    *request.version_mut() = parts.version;
    *request.headers_mut() = parts.headers.clone();
    *request.extensions_mut() = parts.extensions.clone();
    request
}

impl Replicas {
    fn channel(&self, index: usize) -> Channel {
        self.channels.read().expect("directory channel lock")[index].clone()
    }

    /// Moves the channel off `failed`, unless another call already did.
    fn move_on(&self, failed: usize) -> usize {
        let next = (failed + 1) % self.addrs.len();
        let _ = self.in_use.compare_exchange(failed, next, Ordering::AcqRel, Ordering::Relaxed);
        next
    }

    async fn send(
        &self,
        request: http::Request<tonic::body::Body>,
    ) -> Result<http::Response<tonic::body::Body>, tonic::codegen::StdError> {
        use http_body_util::BodyExt;
        use tower::ServiceExt;

        let n = self.addrs.len();
        if n == 1 {
            let mut channel = self.channel(0);
            channel.ready().await?;
            return Ok(tower::Service::call(&mut channel, request).await?);
        }
        let (parts, body) = request.into_parts();
        // A directory request is one message (unary or server-streaming), so it can be held to send again.
        let body = body.collect().await.map_err(|status| Box::new(status) as tonic::codegen::StdError)?.to_bytes();
        let path = parts.uri.path();
        let method = path.rsplit('/').next().unwrap_or(path);
        let start = self.in_use.load(Ordering::Relaxed);
        let mut failures = Vec::with_capacity(n);
        for attempt in 0..n {
            let index = (start + attempt) % n;
            let addr = &self.addrs[index];
            let mut channel = self.channel(index);
            let (delivery, reason) = match channel.ready().await {
                Err(e) => (Delivery::NotProcessed, tls::error_chain(&e)),
                Ok(_) => match tower::Service::call(&mut channel, copy_request(&parts, body.clone())).await {
                    Ok(response) => match unavailable_answer(&response) {
                        None => return Ok(response),
                        Some(reason) => (Delivery::MaybeProcessed, reason),
                    },
                    Err(e) => (delivery_of(&e), tls::error_chain(&e)),
                },
            };
            let next = self.move_on(index);
            if delivery == Delivery::MaybeProcessed && !safe_to_repeat(path) {
                tracing::warn!(replica = %addr, method, error = %reason, "directory replica failed during a call that is not safe to repeat; not sending it again");
                return Err(Box::new(Status::unavailable(format!(
                    "directory replica {addr} failed during {method} ({reason}); the outcome is unknown: check with ListGrants before trying again"
                ))));
            }
            failures.push(format!("{addr}: {reason}"));
            if attempt + 1 < n {
                tracing::warn!(from = %addr, to = %self.addrs[next], method, error = %reason, "directory replica failed; sending the call to the next one");
            }
        }
        Err(Box::new(Status::unavailable(format!("no directory replica answered ({})", failures.join("; ")))))
    }
}

impl tower::Service<http::Request<tonic::body::Body>> for DirectoryChannel {
    type Response = http::Response<tonic::body::Body>;
    type Error = tonic::codegen::StdError;
    type Future = std::pin::Pin<Box<dyn Future<Output = Result<Self::Response, Self::Error>> + Send>>;

    fn poll_ready(&mut self, _cx: &mut std::task::Context<'_>) -> std::task::Poll<Result<(), Self::Error>> {
        // Readiness is each replica channel's, checked in `call` on the one about to be used.
        std::task::Poll::Ready(Ok(()))
    }

    fn call(&mut self, request: http::Request<tonic::body::Body>) -> Self::Future {
        let replicas = self.inner.clone();
        Box::pin(async move { replicas.send(request).await })
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

    #[test]
    fn directory_address_lists_are_split_and_checked() {
        assert_eq!(directory_addresses("dir.example:7443").unwrap(), ["dir.example:7443"]);
        assert_eq!(directory_addresses("dir-a:7443, dir-b:7443").unwrap(), ["dir-a:7443", "dir-b:7443"]);
        assert_eq!(directory_addresses("[::1]:7443,10.0.0.2:7443").unwrap(), ["[::1]:7443", "10.0.0.2:7443"]);
        let refused = |list: &str| directory_addresses(list).unwrap_err().to_string();
        assert!(refused("").contains("no directory address given"), "{}", refused(""));
        assert!(refused(" ").contains("no directory address given"));
        assert!(
            refused("dir-a:7443,,dir-b:7443").contains("directory address 2 of 3 is empty"),
            "{}",
            refused("dir-a:7443,,dir-b:7443")
        );
        assert!(refused("dir-a:7443,").contains("2 of 2 is empty"));
        assert!(
            refused("dir-a:7443,dir-b").contains("\"dir-b\": expected host:port"),
            "{}",
            refused("dir-a:7443,dir-b")
        );
        assert!(refused("dir-a:7443,dir-a:7443").contains("dir-a:7443 is listed twice"));
    }

    #[test]
    fn first_replica_is_stable_in_range_and_spreads() {
        assert_eq!(first_replica("0a1b2c", 1), 0);
        assert_eq!(first_replica("0a1b2c", 0), 0);
        assert_eq!(first_replica("0A1B2C", 3), first_replica("0a1b2c", 3), "case of the hex does not matter");
        for replicas in [2usize, 3, 5] {
            let mut counts = vec![0; replicas];
            for serial in 0..300u32 {
                let index = first_replica(&format!("{:040x}", u128::from(serial) * 0x9e37_79b9_7f4a_7c15), replicas);
                assert_eq!(
                    index,
                    first_replica(&format!("{:040x}", u128::from(serial) * 0x9e37_79b9_7f4a_7c15), replicas)
                );
                counts[index] += 1;
            }
            let even = 300 / replicas;
            assert!(counts.iter().all(|c| *c > even / 2 && *c < even * 3 / 2), "{replicas} replicas: {counts:?}");
        }
    }

    #[test]
    fn only_grant_changes_are_unsafe_to_repeat() {
        for method in [
            "RegisterNode",
            "Heartbeat",
            "ListNodes",
            "PublishEntries",
            "WithdrawEntries",
            "GetEntry",
            "SearchCatalog",
            "ResolveResource",
            "WatchCatalog",
            "RevokeCertificate",
            "ListRevocations",
            "WatchRevocations",
            "WhoAmI",
            "ListGrants",
            "WatchGrants",
        ] {
            assert!(safe_to_repeat(&format!("/govexchange.v1.Directory/{method}")), "{method}");
        }
        for method in ["RequestGrant", "DecideGrant", "RevokeGrant"] {
            assert!(!safe_to_repeat(&format!("/govexchange.v1.Directory/{method}")), "{method}");
        }
        assert!(!safe_to_repeat("/grpc.health.v1.Health/Check"), "other services are not known to be safe");
        assert!(!safe_to_repeat("/govexchange.v1.DirectoryX/ListNodes"));
    }

    /// An error wrapping another, as the transport's layers do.
    #[derive(Debug)]
    struct Wrapped(Box<dyn std::error::Error + Send + Sync>);

    impl std::fmt::Display for Wrapped {
        fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
            f.write_str("transport error")
        }
    }

    impl std::error::Error for Wrapped {
        fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
            Some(&*self.0)
        }
    }

    #[test]
    fn transport_errors_say_whether_the_request_can_have_been_processed() {
        use std::io::{Error as IoError, ErrorKind};
        let delivery = |e: Box<dyn std::error::Error + Send + Sync>| delivery_of(&Wrapped(e));
        let refused = tonic::ConnectError(Box::new(IoError::from(ErrorKind::ConnectionRefused)));
        assert_eq!(delivery(Box::new(refused)), Delivery::NotProcessed);
        let tls_failed = tonic::ConnectError(Box::new(IoError::new(ErrorKind::InvalidData, "bad certificate")));
        assert_eq!(delivery(Box::new(tls_failed)), Delivery::NotProcessed);
        assert_eq!(delivery(Box::new(IoError::new(ErrorKind::TimedOut, "connect timeout"))), Delivery::NotProcessed);
        assert_eq!(delivery(Box::new(h2::Error::from(h2::Reason::REFUSED_STREAM))), Delivery::NotProcessed);
        assert_eq!(delivery(Box::new(h2::Error::from(h2::Reason::INTERNAL_ERROR))), Delivery::MaybeProcessed);
        assert_eq!(delivery(Box::new(h2::Error::from(h2::Reason::CANCEL))), Delivery::MaybeProcessed);
        assert_eq!(delivery(Box::new(IoError::from(ErrorKind::BrokenPipe))), Delivery::MaybeProcessed);
        assert_eq!(delivery(Box::new(IoError::from(ErrorKind::ConnectionReset))), Delivery::MaybeProcessed);
        assert_eq!(delivery("something else".into()), Delivery::MaybeProcessed);
    }

    #[test]
    fn only_a_trailers_only_unavailable_or_a_gateway_error_fails_over() {
        let response = |status: u16, grpc: Option<&str>| {
            let mut r = http::Response::builder().status(status);
            if let Some(code) = grpc {
                r = r.header("grpc-status", code).header("grpc-message", "shutting%20down");
            }
            r.body(tonic::body::Body::empty()).unwrap()
        };
        assert_eq!(
            unavailable_answer(&response(200, Some("14"))).as_deref(),
            Some("answered UNAVAILABLE: shutting down")
        );
        assert_eq!(unavailable_answer(&response(200, Some("5"))), None, "NOT_FOUND is the answer");
        assert_eq!(unavailable_answer(&response(200, Some("3"))), None, "INVALID_ARGUMENT is the answer");
        assert_eq!(unavailable_answer(&response(200, None)), None, "a response whose status comes in trailers");
        assert!(unavailable_answer(&response(503, None)).is_some());
        assert_eq!(unavailable_answer(&response(404, None)), None);
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
