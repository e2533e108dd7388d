//! Who may revoke which certificate.
//!
//! - An operator of the directory's own department (the central team) may revoke any serial.
//! - A department operator may revoke only its own department's certificates, and proves that by sending
//!   the certificate itself (`certificate_der`). The certificate must chain to this exchange's CA: the
//!   department in it is only evidence if the CA signed it, otherwise anyone could forge a certificate
//!   naming their own department with another department's serial.
//!
//! Serials are compared in the canonical form of [`client_sdk::identity::serial_hex`].

use std::sync::Arc;

use client_sdk::identity::{identity_from_der, normalize_serial, PeerIdentity};
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, UnixTime};
use rustls::server::danger::ClientCertVerifier;
use rustls::server::WebPkiClientVerifier;
use rustls::RootCertStore;

use crate::error::{DirectoryError, Violation};

/// Longest accepted revocation reason, in characters.
pub const REASON_MAX_CHARS: usize = 500;

#[derive(Debug, thiserror::Error)]
#[error("revocation authority: {0}")]
pub struct AuthorityError(String);

/// A revocation the caller is allowed to make.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ApprovedRevocation {
    pub serial_hex: String,
    /// The certificate's department, when the certificate was sent.
    pub department: Option<String>,
}

/// Decides revocation requests; built once at start from the directory's CA and own department.
pub struct RevocationAuthority {
    central_department: String,
    verifier: Arc<dyn ClientCertVerifier>,
}

impl std::fmt::Debug for RevocationAuthority {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RevocationAuthority").field("central_department", &self.central_department).finish()
    }
}

impl RevocationAuthority {
    /// `ca_pem`: the exchange CA file; `central_department`: the directory certificate's department.
    pub fn new(ca_pem: &std::path::Path, central_department: &str) -> Result<Self, AuthorityError> {
        client_sdk::tls::install_crypto_provider();
        let mut roots = RootCertStore::empty();
        let certs =
            CertificateDer::pem_file_iter(ca_pem).map_err(|e| AuthorityError(format!("{}: {e}", ca_pem.display())))?;
        for cert in certs {
            let cert = cert.map_err(|e| AuthorityError(format!("{}: {e}", ca_pem.display())))?;
            roots.add(cert).map_err(|e| AuthorityError(format!("{}: {e}", ca_pem.display())))?;
        }
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let verifier = WebPkiClientVerifier::builder_with_provider(Arc::new(roots), provider)
            .build()
            .map_err(|e| AuthorityError(e.to_string()))?;
        Ok(RevocationAuthority { central_department: central_department.to_string(), verifier })
    }

    /// The department whose operators may revoke anything.
    pub fn central_department(&self) -> &str {
        &self.central_department
    }

    /// Checks a request from `caller` (already known to be an operator) and returns what to revoke.
    pub fn approve(
        &self,
        caller: &PeerIdentity,
        serial_hex: &str,
        certificate_der: &[u8],
        reason: &str,
    ) -> Result<ApprovedRevocation, DirectoryError> {
        let mut violations = Vec::new();
        let serial = if serial_hex.trim().is_empty() {
            None
        } else {
            match normalize_serial(serial_hex) {
                Some(s) => Some(s),
                None => {
                    violations.push(Violation::new(
                        "serial_hex",
                        format!("{serial_hex:?} is not a hexadecimal serial number"),
                    ));
                    None
                }
            }
        };
        let certified = if certificate_der.is_empty() {
            None
        } else {
            match self.verify(certificate_der) {
                Ok(id) => Some(id),
                Err(e) => {
                    violations.push(Violation::new("certificate_der", e));
                    None
                }
            }
        };
        if reason.chars().count() > REASON_MAX_CHARS || reason.chars().any(char::is_control) {
            violations.push(Violation::new(
                "reason",
                format!("must be at most {REASON_MAX_CHARS} characters without control characters"),
            ));
        }
        if serial_hex.trim().is_empty() && certificate_der.is_empty() {
            violations.push(Violation::new("serial_hex", "give serial_hex, certificate_der, or both"));
        }
        if let (Some(s), Some(id)) = (&serial, &certified) {
            if s != &id.serial_hex {
                violations.push(Violation::new(
                    "serial_hex",
                    format!("{s} is not the serial of certificate_der ({})", id.serial_hex),
                ));
            }
        }
        if !violations.is_empty() {
            return Err(DirectoryError::InvalidArgument { violations });
        }

        if caller.department != self.central_department {
            let Some(id) = &certified else {
                return Err(DirectoryError::PermissionDenied(format!(
                    "operators of department {} may revoke only their own department's certificates, and must send \
                     the certificate (certificate_der) to show whose it is; revoking by serial alone needs an \
                     operator of the central department {}",
                    caller.department, self.central_department
                )));
            };
            if id.department != caller.department {
                return Err(DirectoryError::PermissionDenied(format!(
                    "certificate {} belongs to department {}; operators of department {} may revoke only their own \
                     department's certificates",
                    id.serial_hex, id.department, caller.department
                )));
            }
        }
        let serial_hex = certified.as_ref().map(|id| id.serial_hex.clone()).or(serial).expect("one was given");
        Ok(ApprovedRevocation { serial_hex, department: certified.map(|id| id.department) })
    }

    /// Checks that `der` is a currently valid certificate of this exchange's CA carrying an identity.
    fn verify(&self, der: &[u8]) -> Result<PeerIdentity, String> {
        let id = identity_from_der(der).map_err(|e| e.to_string())?;
        let cert = CertificateDer::from(der.to_vec());
        self.verifier.verify_client_cert(&cert, &[], UnixTime::now()).map_err(|e| {
            format!(
                "is not a valid certificate of this exchange's CA ({e}); an expired certificate needs no revocation"
            )
        })?;
        Ok(id)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use client_sdk::identity::Role;
    use client_sdk::pki::{init_ca, issue, LeafRequest};

    fn der(path: &std::path::Path) -> Vec<u8> {
        CertificateDer::from_pem_file(path).unwrap().to_vec()
    }

    #[test]
    fn central_and_department_operators() {
        let dir = tempfile::tempdir().unwrap();
        init_ca(dir.path(), "ca", 30).unwrap();
        let other = tempfile::tempdir().unwrap();
        init_ca(other.path(), "foreign", 30).unwrap();
        let tax_node = issue(dir.path(), &LeafRequest::new("tax", Role::Node, "tax-node")).unwrap();
        let police_node = issue(dir.path(), &LeafRequest::new("police", Role::Node, "police-node")).unwrap();
        let forged = issue(other.path(), &LeafRequest::new("tax", Role::Node, "forged")).unwrap();
        let authority = RevocationAuthority::new(&dir.path().join("ca.crt"), "central").unwrap();
        let op = |dept: &str| PeerIdentity {
            department: dept.into(),
            role: Role::Operator,
            name: "op".into(),
            serial_hex: "01".into(),
            not_after_unix: 0,
        };

        // central: by serial alone, normalised
        let ok = authority.approve(&op("central"), "0A:FF", &[], "lost").unwrap();
        assert_eq!(ok, ApprovedRevocation { serial_hex: "0aff".into(), department: None });
        // department operator: own certificate with proof
        let ok = authority.approve(&op("tax"), "", &der(&tax_node.cert), "").unwrap();
        assert_eq!(ok.serial_hex, tax_node.serial_hex);
        assert_eq!(ok.department.as_deref(), Some("tax"));
        // ... but not by serial alone, nor another department's
        assert!(matches!(
            authority.approve(&op("tax"), &tax_node.serial_hex, &[], ""),
            Err(DirectoryError::PermissionDenied(_))
        ));
        assert!(matches!(
            authority.approve(&op("tax"), "", &der(&police_node.cert), ""),
            Err(DirectoryError::PermissionDenied(_))
        ));
        // a certificate from another CA proves nothing
        assert!(matches!(
            authority.approve(&op("tax"), "", &der(&forged.cert), ""),
            Err(DirectoryError::InvalidArgument { .. })
        ));
        // serial and certificate must agree; something must be given
        assert!(matches!(
            authority.approve(&op("tax"), &police_node.serial_hex, &der(&tax_node.cert), ""),
            Err(DirectoryError::InvalidArgument { .. })
        ));
        assert!(matches!(authority.approve(&op("central"), "", &[], ""), Err(DirectoryError::InvalidArgument { .. })));
        assert!(matches!(
            authority.approve(&op("central"), "xyz", &[], ""),
            Err(DirectoryError::InvalidArgument { .. })
        ));
    }
}
