//! A small certificate authority for gov-exchange: a root CA and leaf certificates whose URI SAN carries
//! the holder's department and role (see [`crate::identity`]).
//!
//! Files are PEM: `DIR/ca.crt`, `DIR/ca.key`, `DIR/<name>.crt`, `DIR/<name>.key`. Keys are written with
//! mode 0600 and never overwritten by accident.

use std::fs;
use std::io::Write;
use std::net::IpAddr;
use std::path::{Path, PathBuf};

use rcgen::{
    BasicConstraints, CertificateParams, DistinguishedName, DnType, ExtendedKeyUsagePurpose, IsCa, Issuer,
    KeyPair, KeyUsagePurpose, SanType, SerialNumber,
};
use time::{Duration, OffsetDateTime};

use crate::identity::{identity_uri, validate_department, Role};

#[derive(Debug, thiserror::Error)]
pub enum PkiError {
    #[error("{path}: {source}")]
    Io { path: PathBuf, source: std::io::Error },
    #[error("{0} already exists; refusing to overwrite it (remove it first, or use another name)")]
    Exists(PathBuf),
    #[error("certificate generation failed: {0}")]
    Rcgen(#[from] rcgen::Error),
    #[error("{0}")]
    Invalid(String),
}

fn io_err(path: &Path) -> impl FnOnce(std::io::Error) -> PkiError + '_ {
    move |source| PkiError::Io { path: path.to_path_buf(), source }
}

/// Paths of a certificate and its key.
#[derive(Clone, Debug)]
pub struct IssuedFiles {
    pub cert: PathBuf,
    pub key: PathBuf,
    pub serial_hex: String,
}

pub fn ca_cert_path(dir: &Path) -> PathBuf {
    dir.join("ca.crt")
}
pub fn ca_key_path(dir: &Path) -> PathBuf {
    dir.join("ca.key")
}

fn random_serial() -> SerialNumber {
    let mut bytes = [0u8; 16];
    getrandom_fill(&mut bytes);
    bytes[0] &= 0x7f; // positive
    bytes[0] |= 0x01; // no leading zero byte, so the hex form is stable
    SerialNumber::from_slice(&bytes)
}

fn getrandom_fill(buf: &mut [u8]) {
    // A fresh key pair is 32+ bytes of OS randomness; hash it down rather than pulling in another RNG crate.
    use sha2::{Digest, Sha256};
    let kp = KeyPair::generate().expect("OS randomness");
    let digest = Sha256::digest(kp.serialize_der());
    buf.copy_from_slice(&digest[..buf.len()]);
}

fn write_file(path: &Path, contents: &str, private: bool) -> Result<(), PkiError> {
    if path.exists() {
        return Err(PkiError::Exists(path.to_path_buf()));
    }
    let mut opts = fs::OpenOptions::new();
    opts.write(true).create_new(true);
    #[cfg(unix)]
    {
        use std::os::unix::fs::OpenOptionsExt;
        opts.mode(if private { 0o600 } else { 0o644 });
    }
    let mut f = opts.open(path).map_err(io_err(path))?;
    f.write_all(contents.as_bytes()).map_err(io_err(path))?;
    f.sync_all().map_err(io_err(path))
}

/// Creates `DIR/ca.crt` and `DIR/ca.key` (valid `days` days).
pub fn init_ca(dir: &Path, common_name: &str, days: i64) -> Result<IssuedFiles, PkiError> {
    fs::create_dir_all(dir).map_err(io_err(dir))?;
    let (cert_path, key_path) = (ca_cert_path(dir), ca_key_path(dir));
    for p in [&cert_path, &key_path] {
        if p.exists() {
            return Err(PkiError::Exists(p.clone()));
        }
    }
    let mut params = CertificateParams::default();
    let mut dn = DistinguishedName::new();
    dn.push(DnType::CommonName, common_name);
    dn.push(DnType::OrganizationName, "gov-exchange");
    params.distinguished_name = dn;
    params.is_ca = IsCa::Ca(BasicConstraints::Constrained(0));
    params.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign, KeyUsagePurpose::DigitalSignature];
    let now = OffsetDateTime::now_utc();
    params.not_before = now - Duration::minutes(5);
    params.not_after = now + Duration::days(days);
    let serial = random_serial();
    params.serial_number = Some(serial.clone());
    let key = KeyPair::generate()?;
    let cert = params.self_signed(&key)?;
    write_file(&key_path, &key.serialize_pem(), true)?;
    write_file(&cert_path, &cert.pem(), false)?;
    Ok(IssuedFiles { cert: cert_path, key: key_path, serial_hex: crate::identity::serial_hex(serial.as_ref()) })
}

/// What to put in a leaf certificate.
#[derive(Clone, Debug)]
pub struct LeafRequest {
    pub department: String,
    pub role: Role,
    /// Common name and file stem (`DIR/<name>.crt`).
    pub name: String,
    /// DNS names and IP addresses the holder serves on (servers only need them); `localhost` and
    /// `127.0.0.1` are always added.
    pub hosts: Vec<String>,
    /// Validity start offset from now (negative backdates; tests use it to make expired certificates).
    pub not_before_offset: Duration,
    pub validity: Duration,
}

impl LeafRequest {
    pub fn new(department: &str, role: Role, name: &str) -> Self {
        LeafRequest {
            department: department.to_string(),
            role,
            name: name.to_string(),
            hosts: Vec::new(),
            not_before_offset: Duration::minutes(-5),
            validity: Duration::days(365),
        }
    }
}

fn validate_name(name: &str) -> Result<(), PkiError> {
    let ok = !name.is_empty()
        && name.len() <= 64
        && name.chars().all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_' || c == '.')
        && !name.starts_with('.')
        && name != "ca";
    if ok {
        Ok(())
    } else {
        Err(PkiError::Invalid(format!(
            "invalid certificate name {name:?}: 1-64 characters of A-Z, a-z, 0-9, '-', '_', '.', not 'ca'"
        )))
    }
}

/// Issues `DIR/<name>.crt` and `DIR/<name>.key`, signed by the CA in `DIR`.
pub fn issue(dir: &Path, req: &LeafRequest) -> Result<IssuedFiles, PkiError> {
    validate_department(&req.department).map_err(|e| PkiError::Invalid(e.to_string()))?;
    validate_name(&req.name)?;
    let cert_path = dir.join(format!("{}.crt", req.name));
    let key_path = dir.join(format!("{}.key", req.name));
    for p in [&cert_path, &key_path] {
        if p.exists() {
            return Err(PkiError::Exists(p.clone()));
        }
    }
    let ca_pem = fs::read_to_string(ca_cert_path(dir)).map_err(io_err(&ca_cert_path(dir)))?;
    let ca_key_pem = fs::read_to_string(ca_key_path(dir)).map_err(io_err(&ca_key_path(dir)))?;
    let ca_key = KeyPair::from_pem(&ca_key_pem)?;
    let issuer = Issuer::from_ca_cert_pem(&ca_pem, ca_key)?;

    let mut params = CertificateParams::default();
    let mut dn = DistinguishedName::new();
    dn.push(DnType::CommonName, req.name.as_str());
    dn.push(DnType::OrganizationName, "gov-exchange");
    dn.push(DnType::OrganizationalUnitName, req.department.as_str());
    params.distinguished_name = dn;
    let mut sans = vec![SanType::URI(identity_uri(&req.department, req.role).try_into()?)];
    let mut hosts = vec!["localhost".to_string(), "127.0.0.1".to_string()];
    for h in &req.hosts {
        if !hosts.contains(h) {
            hosts.push(h.clone());
        }
    }
    for h in hosts {
        match h.parse::<IpAddr>() {
            Ok(ip) => sans.push(SanType::IpAddress(ip)),
            Err(_) => sans.push(SanType::DnsName(h.try_into()?)),
        }
    }
    params.subject_alt_names = sans;
    params.is_ca = IsCa::ExplicitNoCa;
    params.key_usages = vec![KeyUsagePurpose::DigitalSignature, KeyUsagePurpose::KeyEncipherment];
    params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth, ExtendedKeyUsagePurpose::ClientAuth];
    params.use_authority_key_identifier_extension = true;
    let now = OffsetDateTime::now_utc();
    params.not_before = now + req.not_before_offset;
    params.not_after = params.not_before + req.validity;
    let serial = random_serial();
    params.serial_number = Some(serial.clone());
    let key = KeyPair::generate()?;
    let cert = params.signed_by(&key, &issuer)?;
    write_file(&key_path, &key.serialize_pem(), true)?;
    write_file(&cert_path, &cert.pem(), false)?;
    Ok(IssuedFiles { cert: cert_path, key: key_path, serial_hex: crate::identity::serial_hex(serial.as_ref()) })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::identity::identity_from_der;
    use rustls_pki_types::{pem::PemObject, CertificateDer};

    #[test]
    fn issued_certificate_carries_identity_and_private_key_is_0600() {
        let dir = tempfile::tempdir().unwrap();
        init_ca(dir.path(), "test CA", 30).unwrap();
        let files = issue(dir.path(), &LeafRequest::new("tax", Role::Node, "tax-node")).unwrap();
        let der = CertificateDer::from_pem_file(&files.cert).unwrap();
        let id = identity_from_der(&der).unwrap();
        assert_eq!(id.department, "tax");
        assert_eq!(id.role, Role::Node);
        assert_eq!(id.name, "tax-node");
        assert_eq!(id.serial_hex, files.serial_hex);
        #[cfg(unix)]
        {
            use std::os::unix::fs::PermissionsExt;
            let mode = fs::metadata(&files.key).unwrap().permissions().mode() & 0o777;
            assert_eq!(mode, 0o600);
            let mode = fs::metadata(ca_key_path(dir.path())).unwrap().permissions().mode() & 0o777;
            assert_eq!(mode, 0o600);
        }
        // never overwrites
        assert!(matches!(issue(dir.path(), &LeafRequest::new("tax", Role::Node, "tax-node")), Err(PkiError::Exists(_))));
        assert!(matches!(init_ca(dir.path(), "again", 30), Err(PkiError::Exists(_))));
        assert!(issue(dir.path(), &LeafRequest::new("TAX", Role::Node, "x")).is_err());
        assert!(issue(dir.path(), &LeafRequest::new("tax", Role::Node, "../evil")).is_err());
    }
}
