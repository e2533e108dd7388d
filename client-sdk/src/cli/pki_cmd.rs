//! `exchangectl pki ...`: a CA and certificates on disk, revocation at the directory.

use std::path::Path;

use exchange_proto::v1::RevokeCertificateRequest;
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::CertificateDer;
use x509_parser::prelude::{FromDer, X509Certificate};

use super::args::PkiCommand;
use super::output::{now_unix_ms, CertView, IssuedView, RevocationView};
use super::{CliError, Ctx};
use crate::identity::{identity_from_der, identity_uri, normalize_serial, serial_hex, Role};
use crate::pki::{self, LeafRequest};

pub(super) async fn run(ctx: &Ctx, cmd: PkiCommand) -> Result<(), CliError> {
    match cmd {
        PkiCommand::Init { dir, days, cn } => {
            let files = pki::init_ca(&dir, &cn, days)?;
            let view = IssuedView {
                cert: files.cert.display().to_string(),
                key: files.key.display().to_string(),
                serial_hex: files.serial_hex,
                identity_uri: String::new(),
            };
            ctx.out.emit(&view, || view.human());
        }
        PkiCommand::Issue { dir, dept, role, name, hosts, days } => {
            let role: Role = role.parse().map_err(|e: crate::identity::IdentityError| CliError::Usage(e.to_string()))?;
            let mut req = LeafRequest::new(&dept, role, &name);
            req.hosts = hosts;
            req.validity = time::Duration::days(days);
            let files = pki::issue(&dir, &req)?;
            let view = IssuedView {
                cert: files.cert.display().to_string(),
                key: files.key.display().to_string(),
                serial_hex: files.serial_hex,
                identity_uri: identity_uri(&dept, role),
            };
            ctx.out.emit(&view, || view.human());
        }
        PkiCommand::Revoke { serial, cert_file, reason } => {
            let mut request = RevokeCertificateRequest { reason, ..Default::default() };
            if let Some(path) = cert_file {
                let der = read_cert(&path)?;
                request.serial_hex = serial_of(&path, &der)?;
                request.certificate_der = der.to_vec();
            } else if let Some(text) = serial {
                request.serial_hex = normalize_serial(&text)
                    .ok_or_else(|| CliError::Usage(format!("--serial {text:?} is not a hexadecimal serial number")))?;
            }
            let mut directory = ctx.directory()?;
            let resp = directory.revoke_certificate(ctx.request(request)).await.map_err(|s| CliError::Client(s.into()))?;
            let view = RevocationView::from(resp.into_inner().revocation.unwrap_or_default());
            ctx.out.emit(&view, || view.human());
        }
        PkiCommand::Show { path } => {
            let der = read_cert(&path)?;
            let id = identity_from_der(&der).map_err(|e| CliError::File { path: path.clone(), reason: e.to_string() })?;
            let view = CertView {
                path: path.display().to_string(),
                identity_uri: identity_uri(&id.department, id.role),
                department: id.department,
                role: id.role.to_string(),
                name: id.name,
                serial_hex: id.serial_hex,
                not_after_unix: id.not_after_unix,
                expired: id.not_after_unix * 1000 < now_unix_ms(),
            };
            ctx.out.emit(&view, || view.human());
        }
    }
    Ok(())
}

/// The first certificate of a PEM file, as DER.
fn read_cert(path: &Path) -> Result<CertificateDer<'static>, CliError> {
    CertificateDer::from_pem_file(path).map_err(|e| CliError::File { path: path.to_path_buf(), reason: e.to_string() })
}

/// The serial of any X.509 certificate, even one without a gov-exchange identity (so a wrongly issued
/// certificate can still be revoked).
fn serial_of(path: &Path, der: &[u8]) -> Result<String, CliError> {
    let (_, cert) = X509Certificate::from_der(der)
        .map_err(|e| CliError::File { path: path.to_path_buf(), reason: format!("not an X.509 certificate: {e}") })?;
    Ok(serial_hex(cert.raw_serial()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn serial_of_an_issued_certificate_matches_what_issue_printed() {
        let dir = tempfile::tempdir().unwrap();
        pki::init_ca(dir.path(), "test CA", 30).unwrap();
        let files = pki::issue(dir.path(), &LeafRequest::new("tax", Role::Operator, "tax-operator")).unwrap();
        let der = read_cert(&files.cert).unwrap();
        assert_eq!(serial_of(&files.cert, &der).unwrap(), files.serial_hex);
        assert!(matches!(read_cert(&dir.path().join("missing.crt")), Err(CliError::File { .. })));
    }
}
