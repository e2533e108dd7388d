//! `exchange-node audit verify --data-dir DIR`: the offline check.

use super::*;

// Offline verification (`exchange-node audit verify`)

/// Exit status of `exchange-node audit verify`: the log is intact.
pub const EXIT_INTACT: i32 = 0;
/// The log was tampered with.
pub const EXIT_TAMPERED: i32 = 1;
/// The check could not be made (no database, database in use, no key, unreadable storage).
pub const EXIT_ERROR: i32 = 2;

/// `exchange-node audit verify --data-dir DIR [--public-key HEX|FILE]`: verifies a stopped node's log
/// and writes the verdict to `out`, warnings and errors to `err`; returns the exit status
/// ([`EXIT_INTACT`], [`EXIT_TAMPERED`] or [`EXIT_ERROR`]).
///
/// Without `public_key` it uses `audit-seal.pub` from `data_dir`, which proves less: whoever can rewrite
/// the log on that disk can replace that file too. The key the node registered with the directory
/// (`NodeInfo.audit_verifying_key_hex`) is the one to check against.
pub fn run_verify_command(
    data_dir: &Path,
    public_key: Option<&str>,
    out: &mut dyn std::io::Write,
    err: &mut dyn std::io::Write,
) -> i32 {
    match verify_command(data_dir, public_key, out, err) {
        Ok(code) => code,
        Err(message) => {
            let _ = writeln!(err, "error: {message}");
            EXIT_ERROR
        }
    }
}

pub use crate::store::{is_lock_error, open_db_waiting};

pub(super) fn verify_command(
    data_dir: &Path,
    public_key: Option<&str>,
    out: &mut dyn std::io::Write,
    err: &mut dyn std::io::Write,
) -> Result<i32, String> {
    let pub_file = data_dir.join(PUBLIC_KEY_FILE);
    let key = match public_key {
        Some(arg) => {
            let key = match parse_verifying_key(arg) {
                Ok(key) => key,
                Err(hex_problem) => {
                    let text = std::fs::read_to_string(arg).map_err(|e| {
                        format!("--public-key {arg}: not a public key ({hex_problem}), nor a readable file ({e})")
                    })?;
                    parse_verifying_key(&text).map_err(|e| format!("--public-key file {arg}: {e}"))?
                }
            };
            if let Ok(on_disk) = std::fs::read_to_string(&pub_file) {
                if parse_verifying_key(&on_disk).ok() != Some(key) {
                    let _ = writeln!(
                        err,
                        "warning: {} holds a different key than --public-key: the node's key was replaced, or this \
                         is another node's data directory",
                        pub_file.display()
                    );
                }
            }
            key
        }
        None => {
            let text = std::fs::read_to_string(&pub_file).map_err(|e| {
                format!(
                    "{}: {e}; pass --public-key with the node's key as registered with the directory",
                    pub_file.display()
                )
            })?;
            let key = parse_verifying_key(&text).map_err(|e| format!("{}: {e}", pub_file.display()))?;
            let _ = writeln!(
                err,
                "warning: checking against {}, which sits on the same disk as the log: whoever could rewrite the log \
                 could have replaced it too. For a check that proves more, pass --public-key with the key the node \
                 registered with the directory (NodeInfo.audit_verifying_key_hex).",
                pub_file.display()
            );
            key
        }
    };

    let db_path = data_dir.join(DB_DIR);
    if !db_path.is_dir() {
        return Err(format!(
            "no node database at {}: --data-dir must be the node's data_dir (the folder holding {DB_DIR})",
            db_path.display()
        ));
    }
    let db = open_db_waiting(&db_path, Duration::from_secs(3)).map_err(|e| {
        let text = e.to_string();
        if is_lock_error(&e) {
            format!(
                "the database {} is in use: stop the node first (its database admits one process at a time), \
                 or verify a running node with its VerifyAudit API",
                db_path.display()
            )
        } else {
            format!("cannot open {}: {text}", db_path.display())
        }
    })?;
    let key_hex = hex::encode(key.to_bytes());
    match verify(&db, &key).map_err(|e| format!("cannot read the audit log: {e}"))? {
        Ok(v) => {
            let _ = writeln!(
                out,
                "intact: {} entries, {} seals, {} unsealed (verified with key {key_hex})",
                v.entries, v.seals, v.unsealed
            );
            if v.unsealed > 0 {
                let _ = writeln!(
                    out,
                    "note: the last {} entries are chained but not covered by a seal (the node stopped without its \
                     final seal?): a rewrite of only those entries could not be detected",
                    v.unsealed
                );
            }
            if v.entries == 0 {
                let _ = writeln!(out, "note: the log is empty");
            }
            Ok(EXIT_INTACT)
        }
        Err(t) => {
            let _ = writeln!(out, "TAMPERED: {t}");
            let _ = writeln!(out, "first entry concerned: {} (verified with key {key_hex})", t.first_seq());
            Ok(EXIT_TAMPERED)
        }
    }
}

