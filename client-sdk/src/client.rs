//! Typed connections to the directory and to a department node over mutual TLS.

use std::sync::Arc;

use exchange_proto::limits::MAX_MESSAGE_BYTES;
use exchange_proto::v1::directory_client::DirectoryClient;
use exchange_proto::v1::exchange_node_client::ExchangeNodeClient;
use tonic::transport::Channel;

use crate::identity::Role;
use crate::tls::{self, TlsError, TlsIdentity};

/// A directory client; the server must present a certificate with role `directory`.
pub fn directory_client(addr: &str, id: &TlsIdentity) -> Result<DirectoryClient<Channel>, TlsError> {
    let channel = tls::connect_lazy(addr, tls::client_config(id, &[Role::Directory])?)?;
    Ok(directory_client_on(channel))
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
