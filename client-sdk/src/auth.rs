//! Per-call identity: every gRPC call's caller is read from its TLS peer certificate, checked against the
//! revocation set (so a certificate revoked while its connection is open stops working at its next call),
//! and put in the request's extensions as a [`PeerIdentity`] for handlers to authorize on.

use std::collections::HashMap;
use std::sync::{Arc, RwLock};

use tonic::{Request, Status};

use crate::identity::{identity_from_der, PeerIdentity, Role};
use crate::tls::RevocationSet;

/// A tonic interceptor that authenticates every call; wrap each service with it.
#[derive(Clone, Debug)]
pub struct IdentityInterceptor {
    revoked: RevocationSet,
    /// Identities already read from certificates (DER → identity). Parsing X.509 on every call of a
    /// long-lived connection was a measurable share of a relayed request; the revocation check still runs
    /// on every call.
    parsed: Arc<RwLock<HashMap<Vec<u8>, PeerIdentity>>>,
}

/// Certificates remembered by an interceptor before it starts over (a bound, not an expected size).
const PARSED_CACHE_LIMIT: usize = 4096;

impl IdentityInterceptor {
    pub fn new(revoked: RevocationSet) -> Self {
        IdentityInterceptor { revoked, parsed: Arc::default() }
    }

    fn identify<T>(&self, req: &Request<T>) -> Result<PeerIdentity, Status> {
        let certs = req
            .peer_certs()
            .ok_or_else(|| Status::unauthenticated("no client certificate on this connection"))?;
        let leaf = certs.first().ok_or_else(|| Status::unauthenticated("empty client certificate chain"))?;
        let known = self.parsed.read().expect("identity cache").get(leaf.as_ref()).cloned();
        let id = match known {
            Some(id) => id,
            None => {
                let id = identity_from_der(leaf).map_err(|e| Status::unauthenticated(e.to_string()))?;
                let mut parsed = self.parsed.write().expect("identity cache");
                if parsed.len() >= PARSED_CACHE_LIMIT {
                    parsed.clear();
                }
                parsed.insert(leaf.to_vec(), id.clone());
                id
            }
        };
        check_revoked(id, &self.revoked)
    }
}

impl tonic::service::Interceptor for IdentityInterceptor {
    fn call(&mut self, mut req: Request<()>) -> Result<Request<()>, Status> {
        let id = self.identify(&req)?;
        // The metrics layer outside this interceptor labels the call with the caller's department.
        if let Some(slot) = req.extensions().get::<crate::admin::metrics::PeerSlot>() {
            let _ = slot.0.set(crate::admin::metrics::PeerLabel {
                department: id.department.clone(),
                full: format!("{}/{}/{}", id.department, id.role, id.name),
            });
        }
        req.extensions_mut().insert(id);
        Ok(req)
    }
}

fn check_revoked(id: PeerIdentity, revoked: &RevocationSet) -> Result<PeerIdentity, Status> {
    if revoked.is_revoked(&id.serial_hex) {
        tracing::warn!(peer = %id, "refused call: certificate revoked");
        return Err(Status::unauthenticated(format!("certificate {} has been revoked", id.serial_hex)));
    }
    Ok(id)
}

/// Reads and checks the caller's identity from the connection's peer certificate.
pub fn authenticate<T>(req: &Request<T>, revoked: &RevocationSet) -> Result<PeerIdentity, Status> {
    let certs = req
        .peer_certs()
        .ok_or_else(|| Status::unauthenticated("no client certificate on this connection"))?;
    let leaf = certs.first().ok_or_else(|| Status::unauthenticated("empty client certificate chain"))?;
    let id = identity_from_der(leaf).map_err(|e| Status::unauthenticated(e.to_string()))?;
    check_revoked(id, revoked)
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
