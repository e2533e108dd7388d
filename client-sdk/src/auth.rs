//! Per-call identity: every gRPC call's caller is read from its TLS peer certificate, checked against the
//! revocation set (so a certificate revoked while its connection is open stops working at its next call),
//! and put in the request's extensions as a [`PeerIdentity`] for handlers to authorize on.

use tonic::{Request, Status};

use crate::identity::{identity_from_der, PeerIdentity, Role};
use crate::tls::RevocationSet;

/// A tonic interceptor that authenticates every call; wrap each service with it.
#[derive(Clone, Debug)]
pub struct IdentityInterceptor {
    revoked: RevocationSet,
}

impl IdentityInterceptor {
    pub fn new(revoked: RevocationSet) -> Self {
        IdentityInterceptor { revoked }
    }
}

impl tonic::service::Interceptor for IdentityInterceptor {
    fn call(&mut self, mut req: Request<()>) -> Result<Request<()>, Status> {
        let id = authenticate(&req, &self.revoked)?;
        req.extensions_mut().insert(id);
        Ok(req)
    }
}

/// Reads and checks the caller's identity from the connection's peer certificate.
pub fn authenticate<T>(req: &Request<T>, revoked: &RevocationSet) -> Result<PeerIdentity, Status> {
    let certs = req
        .peer_certs()
        .ok_or_else(|| Status::unauthenticated("no client certificate on this connection"))?;
    let leaf = certs.first().ok_or_else(|| Status::unauthenticated("empty client certificate chain"))?;
    let id = identity_from_der(leaf).map_err(|e| Status::unauthenticated(e.to_string()))?;
    if revoked.is_revoked(&id.serial_hex) {
        tracing::warn!(peer = %id, "refused call: certificate revoked");
        return Err(Status::unauthenticated(format!("certificate {} has been revoked", id.serial_hex)));
    }
    Ok(id)
}

/// The identity the interceptor attached to this request.
pub fn caller<T>(req: &Request<T>) -> Result<&PeerIdentity, Status> {
    req.extensions()
        .get::<PeerIdentity>()
        .ok_or_else(|| Status::internal("service is not wrapped in IdentityInterceptor"))
}

/// Refuses the call unless the caller has one of `roles`.
pub fn require_role(id: &PeerIdentity, roles: &[Role], action: &str) -> Result<(), Status> {
    if roles.contains(&id.role) {
        Ok(())
    } else {
        let allowed: Vec<&str> = roles.iter().map(|r| r.as_str()).collect();
        Err(Status::permission_denied(format!(
            "{action} needs a certificate with role {}; caller {} has role {}",
            allowed.join(" or "),
            id.name,
            id.role
        )))
    }
}
