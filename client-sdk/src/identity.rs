//! Who a certificate says its holder is.
//!
//! A gov-exchange certificate carries exactly one URI subject alternative name of the form
//! `spiffe://gov-exchange/dept/<department>/role/<role>` (SPIFFE-style, so stock tooling can show it).
//! The department and role are read back from the peer's leaf certificate on every call; a request field
//! never decides who the caller is.

use std::fmt;
use std::str::FromStr;

use x509_parser::prelude::*;

/// The URI SAN prefix every gov-exchange identity starts with.
pub const IDENTITY_URI_PREFIX: &str = "spiffe://gov-exchange/";

/// What a certificate holder may do.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Role {
    /// The central directory server.
    Directory,
    /// A department's exchange node.
    Node,
    /// A department application (loads and queries records through its own node).
    App,
    /// A person operating a node or the directory.
    Operator,
}

impl Role {
    pub const ALL: [Role; 4] = [Role::Directory, Role::Node, Role::App, Role::Operator];

    pub fn as_str(self) -> &'static str {
        match self {
            Role::Directory => "directory",
            Role::Node => "node",
            Role::App => "app",
            Role::Operator => "operator",
        }
    }
}

impl fmt::Display for Role {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl FromStr for Role {
    type Err = IdentityError;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Role::ALL
            .into_iter()
            .find(|r| r.as_str() == s)
            .ok_or_else(|| IdentityError::BadRole(s.to_string()))
    }
}

/// The identity a certificate carries.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PeerIdentity {
    pub department: String,
    pub role: Role,
    /// The certificate's common name (e.g. `tax-node-1`).
    pub name: String,
    /// Certificate serial number, lower-case hex without separators: the key of the revocation list.
    pub serial_hex: String,
    /// Expiry, seconds since the Unix epoch.
    pub not_after_unix: i64,
}

impl fmt::Display for PeerIdentity {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}/{} (serial {})", self.department, self.role, self.name, self.serial_hex)
    }
}

#[derive(Debug, thiserror::Error)]
pub enum IdentityError {
    #[error("certificate cannot be parsed: {0}")]
    Parse(String),
    #[error("certificate carries no gov-exchange identity URI (expected {IDENTITY_URI_PREFIX}dept/<code>/role/<role>)")]
    Missing,
    #[error("certificate carries more than one gov-exchange identity URI")]
    Ambiguous,
    #[error("malformed identity URI {0:?}")]
    BadUri(String),
    #[error("unknown role {0:?} (expected directory, node, app or operator)")]
    BadRole(String),
    #[error("invalid department code {0:?}: 2-32 characters of a-z, 0-9 and '-', starting with a letter")]
    BadDepartment(String),
}

/// A department code: short, lower-case, stable (`tax`, `commerce`, `quality`, `police`).
pub fn validate_department(code: &str) -> Result<(), IdentityError> {
    let ok = (2..=32).contains(&code.len())
        && code.starts_with(|c: char| c.is_ascii_lowercase())
        && code.chars().all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '-');
    if ok {
        Ok(())
    } else {
        Err(IdentityError::BadDepartment(code.to_string()))
    }
}

/// The URI SAN written into a certificate for this department and role.
pub fn identity_uri(department: &str, role: Role) -> String {
    format!("{IDENTITY_URI_PREFIX}dept/{department}/role/{role}")
}

fn parse_identity_uri(uri: &str) -> Result<(String, Role), IdentityError> {
    let rest = uri
        .strip_prefix(IDENTITY_URI_PREFIX)
        .ok_or_else(|| IdentityError::BadUri(uri.to_string()))?;
    let parts: Vec<&str> = rest.split('/').collect();
    match parts.as_slice() {
        ["dept", dept, "role", role] => {
            validate_department(dept)?;
            Ok((dept.to_string(), role.parse()?))
        }
        _ => Err(IdentityError::BadUri(uri.to_string())),
    }
}

/// Reads the identity out of a DER certificate.
pub fn identity_from_der(der: &[u8]) -> Result<PeerIdentity, IdentityError> {
    let (_, cert) = X509Certificate::from_der(der).map_err(|e| IdentityError::Parse(e.to_string()))?;
    let mut found = None;
    if let Ok(Some(san)) = cert.subject_alternative_name() {
        for name in &san.value.general_names {
            if let GeneralName::URI(uri) = name {
                if uri.starts_with(IDENTITY_URI_PREFIX) {
                    if found.is_some() {
                        return Err(IdentityError::Ambiguous);
                    }
                    found = Some(parse_identity_uri(uri)?);
                }
            }
        }
    }
    let (department, role) = found.ok_or(IdentityError::Missing)?;
    let name = cert
        .subject()
        .iter_common_name()
        .next()
        .and_then(|cn| cn.as_str().ok())
        .unwrap_or_default()
        .to_string();
    Ok(PeerIdentity {
        department,
        role,
        name,
        serial_hex: serial_hex(cert.raw_serial()),
        not_after_unix: cert.validity().not_after.timestamp(),
    })
}

/// Canonical text form of a serial number: lower-case hex, leading zero bytes dropped.
pub fn serial_hex(raw: &[u8]) -> String {
    let trimmed: &[u8] = match raw.iter().position(|b| *b != 0) {
        Some(i) => &raw[i..],
        None => &raw[raw.len().saturating_sub(1)..],
    };
    hex::encode(trimmed)
}

/// Normalises a serial typed by an operator (`0A:1B:..`, `0a1b..`) to [`serial_hex`] form.
pub fn normalize_serial(text: &str) -> Option<String> {
    let cleaned: String = text.chars().filter(|c| *c != ':' && !c.is_whitespace()).collect();
    let bytes = hex::decode(if cleaned.len() % 2 == 1 { format!("0{cleaned}") } else { cleaned }).ok()?;
    if bytes.is_empty() {
        return None;
    }
    Some(serial_hex(&bytes))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn uri_round_trip() {
        let uri = identity_uri("tax", Role::Node);
        assert_eq!(uri, "spiffe://gov-exchange/dept/tax/role/node");
        assert_eq!(parse_identity_uri(&uri).unwrap(), ("tax".to_string(), Role::Node));
        assert!(parse_identity_uri("spiffe://gov-exchange/dept/TAX/role/node").is_err());
        assert!(parse_identity_uri("spiffe://gov-exchange/dept/tax/role/root").is_err());
        assert!(parse_identity_uri("spiffe://other/dept/tax/role/node").is_err());
    }

    #[test]
    fn serials_normalise() {
        assert_eq!(serial_hex(&[0, 0, 0x0a, 0xff]), "0aff");
        assert_eq!(normalize_serial("0A:FF").unwrap(), "0aff");
        assert_eq!(normalize_serial("00:0a:ff").unwrap(), "0aff");
        assert!(normalize_serial("zz").is_none());
    }
}
