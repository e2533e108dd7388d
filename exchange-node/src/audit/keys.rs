//! The audit trail's two secrets in files beside the database: the Ed25519 seal key and the HMAC key for record keys.

use super::*;

// Keys on disk

/// The node's two audit secrets, loaded from (or created in) its `data_dir`. See the module docs for why
/// they are files beside the database rather than records in it.
pub struct AuditKeys {
    signing: SigningKey,
    hasher: KeyHasher,
}

impl fmt::Debug for AuditKeys {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("AuditKeys").field("verifying_key", &self.verifying_key_hex()).finish_non_exhaustive()
    }
}

pub(super) const SEAL_KEY_HEADER: &str = "# gov-exchange audit seal key: Ed25519 secret key, hex. Keep it private (mode 0600) and backed up:\n\
# without it this node cannot seal its audit log; with it anyone can forge seals. Public half: audit-seal.pub.";
pub(super) const HASH_KEY_HEADER: &str = "# gov-exchange audit hash key: HMAC-SHA-256 secret for record keys in the audit log, hex. Keep it\n\
# private (mode 0600) and backed up: without it, audit entries can no longer be searched by record key.";

impl AuditKeys {
    /// Loads `audit-seal.key` and `audit-hash.key` from `data_dir`, creating both (mode 0600, never
    /// overwriting) on the node's first start, and (re)writes `audit-seal.pub`.
    ///
    /// Refuses — with an error saying how to fix it — a key file that is unreadable, malformed, readable
    /// or writable by group or others, or present without its twin (one key alone means the other was
    /// lost: generating a fresh one would silently break verification or record-key search).
    pub fn load_or_create(data_dir: &Path) -> Result<AuditKeys, AuditError> {
        std::fs::create_dir_all(data_dir)
            .map_err(|e| key_error(data_dir, format!("cannot create the data directory: {e}")))?;
        let seal_path = data_dir.join(SEAL_KEY_FILE);
        let hash_path = data_dir.join(HASH_KEY_FILE);
        match (file_exists(&seal_path)?, file_exists(&hash_path)?) {
            (true, false) => return Err(missing_twin(&hash_path, &seal_path)),
            (false, true) => return Err(missing_twin(&seal_path, &hash_path)),
            _ => {}
        }
        let seal = load_or_create_secret(&seal_path, SEAL_KEY_HEADER)?;
        let hash = load_or_create_secret(&hash_path, HASH_KEY_HEADER)?;
        let keys = AuditKeys { signing: SigningKey::from_bytes(&seal), hasher: KeyHasher::new(hash) };
        keys.write_public_key(&data_dir.join(PUBLIC_KEY_FILE))?;
        Ok(keys)
    }

    /// Keys held in memory only (tests, tools).
    pub fn from_secrets(seal: [u8; 32], hash: [u8; 32]) -> AuditKeys {
        AuditKeys { signing: SigningKey::from_bytes(&seal), hasher: KeyHasher::new(hash) }
    }

    /// The seal key, for [`AuditLog::open`] (which takes a copy).
    pub fn signing_key(&self) -> &SigningKey {
        &self.signing
    }

    /// The record-key hasher, for the relay and for [`query`].
    pub fn hasher(&self) -> &KeyHasher {
        &self.hasher
    }

    pub fn verifying_key(&self) -> VerifyingKey {
        self.signing.verifying_key()
    }

    /// The seal key's public half, hex: what `audit-seal.pub` holds and the node registers with the
    /// directory (`RegisterNodeRequest.audit_verifying_key_hex`).
    pub fn verifying_key_hex(&self) -> String {
        hex::encode(self.verifying_key().to_bytes())
    }

    fn write_public_key(&self, path: &Path) -> Result<(), AuditError> {
        let text = format!("{}\n", self.verifying_key_hex());
        match std::fs::read_to_string(path) {
            Ok(existing) if existing == text => return Ok(()),
            Ok(_) => tracing::warn!(file = %path.display(), "replacing an audit-seal.pub that did not match audit-seal.key"),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => tracing::warn!(file = %path.display(), error = %e, "replacing an unreadable audit-seal.pub"),
        }
        // Through a temporary file and a rename, so a reader never sees half a key.
        let tmp = path.with_extension("pub.tmp");
        let write = || -> std::io::Result<()> {
            let mut f = std::fs::File::create(&tmp)?;
            f.write_all(text.as_bytes())?;
            f.sync_all()?;
            std::fs::rename(&tmp, path)
        };
        write().map_err(|e| key_error(path, format!("cannot write the public key: {e}")))
    }
}

pub(super) fn key_error(path: &Path, reason: impl Into<String>) -> AuditError {
    AuditError::Key { path: path.to_path_buf(), reason: reason.into() }
}

pub(super) fn missing_twin(missing: &Path, present: &Path) -> AuditError {
    key_error(
        missing,
        format!(
            "missing, but {} exists: restore it from the backup of this data directory. Only if this node has \
             never written audit entries, delete {} too and start again to create a fresh pair",
            present.display(),
            present.display()
        ),
    )
}

pub(super) fn file_exists(path: &Path) -> Result<bool, AuditError> {
    match std::fs::symlink_metadata(path) {
        Ok(_) => Ok(true),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(false),
        Err(e) => Err(key_error(path, format!("cannot check it: {e}"))),
    }
}

pub(super) fn load_or_create_secret(path: &Path, header: &str) -> Result<[u8; 32], AuditError> {
    if file_exists(path)? {
        return load_secret(path);
    }
    let key = random_key();
    let text = format!("{header}\n{}\n", hex::encode(key));
    // Written in full to a private temporary file, then linked into place: the key file appears
    // complete or not at all, and a link never replaces an existing file.
    let file_name = path.file_name().and_then(|n| n.to_str()).unwrap_or("audit.key");
    let tmp = path.with_file_name(format!(".{file_name}.tmp"));
    let io = |e: std::io::Error| key_error(path, format!("cannot create it: {e}"));
    match std::fs::remove_file(&tmp) {
        Ok(()) => {}
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
        Err(e) => return Err(io(e)),
    }
    let mut options = std::fs::OpenOptions::new();
    options.write(true).create_new(true);
    #[cfg(unix)]
    {
        use std::os::unix::fs::OpenOptionsExt;
        options.mode(0o600);
    }
    let mut f = options.open(&tmp).map_err(io)?;
    f.write_all(text.as_bytes()).and_then(|()| f.sync_all()).map_err(io)?;
    drop(f);
    let linked = std::fs::hard_link(&tmp, path);
    let _ = std::fs::remove_file(&tmp);
    match linked {
        Ok(()) => {}
        // Another process created it meanwhile: use theirs.
        Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => return load_secret(path),
        Err(e) => return Err(io(e)),
    }
    if let Some(dir) = path.parent() {
        // Make the new directory entry durable too (best effort: not every platform can open a folder).
        if let Ok(d) = std::fs::File::open(dir) {
            let _ = d.sync_all();
        }
    }
    tracing::info!(file = %path.display(), "created a new audit key");
    Ok(key)
}

pub(super) fn load_secret(path: &Path) -> Result<[u8; 32], AuditError> {
    let meta = std::fs::metadata(path).map_err(|e| key_error(path, format!("cannot read it: {e}")))?;
    if !meta.is_file() {
        return Err(key_error(path, "is not a regular file: replace it with the key file from your backup"));
    }
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        let mode = meta.permissions().mode() & 0o777;
        if mode & 0o077 != 0 {
            return Err(key_error(
                path,
                format!(
                    "has mode {mode:04o}, so users other than the node's can read or change it: run `chmod 600 {}` \
                     (and check nobody copied it meanwhile)",
                    path.display()
                ),
            ));
        }
    }
    let text = std::fs::read_to_string(path).map_err(|e| {
        key_error(path, format!("cannot read it: {e} (it must be readable by the user the node runs as)"))
    })?;
    parse_hex_key(&text).ok_or_else(|| {
        key_error(
            path,
            "is malformed: expected 64 hex digits (32 bytes) after optional `#` comment lines. Restore it from \
             your backup; only if this node has never written audit entries, delete both audit-*.key files to \
             create new ones",
        )
    })
}

/// 32 bytes from hex text, ignoring blank lines and `#` comment lines.
pub(super) fn parse_hex_key(text: &str) -> Option<[u8; 32]> {
    let digits: String = text
        .lines()
        .map(str::trim)
        .filter(|l| !l.is_empty() && !l.starts_with('#'))
        .collect();
    let bytes = hex::decode(digits).ok()?;
    bytes.try_into().ok()
}

/// An Ed25519 public key from hex text (`#` comment lines allowed); weak (small-order) keys are refused.
pub fn parse_verifying_key(text: &str) -> Result<VerifyingKey, String> {
    let bytes = parse_hex_key(text).ok_or("expected 64 hex digits (an Ed25519 public key)")?;
    let key = VerifyingKey::from_bytes(&bytes).map_err(|e| format!("not a valid Ed25519 public key: {e}"))?;
    if key.is_weak() {
        return Err("a weak (small-order) Ed25519 key, which would accept forged seals".into());
    }
    Ok(key)
}

