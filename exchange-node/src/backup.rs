//! A consistent backup of the node's store while the node runs: what the admin port's `GET /api/backup`
//! streams (file format: [`client_sdk::backup`]; operations: docs/OPERATIONS.md).
//!
//! sled has no snapshots: an iteration sees writes applied while it runs. A point-in-time copy therefore
//! holds the writers back while the trees are copied, taking their locks in one fixed order: the record
//! store (records, change log, heads, trims), the outbox, the inbox, the audit head. Readers go on;
//! writers wait for the copy (0.2–0.27 s for 100,000 records with their change log, a 76 MB file, on
//! the reference machine: docs/OPERATIONS.md). What no lock covers is ordered instead: the policy copy's cursor tree is
//! copied before the policy trees, so a restored cursor can only lag its data (the directory's changes
//! are then replayed, which is harmless), never run ahead of it.
//!
//! The audit keys (`audit-seal.key`, `audit-hash.key`) and `audit-seal.pub` go into the file too: a
//! restored node must keep sealing the same chain and finding the same record-key hashes. The file is
//! therefore a secret (written 0600).

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use client_sdk::backup::{write_backup_file, BackupHeader, BackupSummary, ServerKind};

use crate::audit::{HASH_KEY_FILE, PUBLIC_KEY_FILE, SEAL_KEY_FILE};
use crate::error::NodeError;
use crate::events::Events;

/// Trees that record how far other trees are applied: copied first (see the module docs).
const CURSOR_TREES: &[&str] = &["policy_meta"];
/// The plain files of `data_dir` a restored node needs.
const DATA_FILES: &[&str] = &[SEAL_KEY_FILE, HASH_KEY_FILE, PUBLIC_KEY_FILE];

/// What a backup of a running node reads: the database, the stores whose writers it pauses (through
/// `events`: the record store, audit log, outbox and inbox, and the node's identity), and `data_dir`
/// for the key files. Built in `server::run` from what it already holds.
#[derive(Clone)]
pub struct NodeBackupSource {
    pub db: sled::Db,
    pub events: Arc<Events>,
    pub data_dir: PathBuf,
}

/// A fresh name for a backup file in `data_dir` (the admin port writes there, streams, then removes it).
/// Hidden, and never picked up by a later backup, which copies only the database and the key files.
pub use client_sdk::backup::temp_backup_path;

/// Writes a consistent backup of the running node to `out` (mode 0600; written under a temporary name
/// and renamed when complete). Blocks on locks and the disk: call it from a blocking thread (or use
/// [`backup_to_temp_file`]).
///
/// Called by the admin port's `GET /api/backup` (through `AdminSource::backup`).
pub fn write_backup(parts: &NodeBackupSource, out: &Path) -> Result<BackupSummary, NodeError> {
    let me = &parts.events.x.me;
    let header = BackupHeader::new(ServerKind::ExchangeNode, &me.department, &me.name);
    // Read before the pause: the key files never change while the node runs.
    let mut files = Vec::new();
    for name in DATA_FILES {
        let path = parts.data_dir.join(name);
        match std::fs::read(&path) {
            Ok(bytes) => files.push((*name, file_mode(&path), bytes)),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => return Err(NodeError::Store(format!("backup: {}: {e}", path.display()))),
        }
    }
    let mut paused = Duration::ZERO;
    let mut audit_head = 0;
    let summary = write_backup_file(out, header, |w| {
        for (name, mode, bytes) in &files {
            w.file(name, *mode, bytes)?;
        }
        let started = Instant::now();
        let records = parts.events.x.records.pause_writes();
        let outbox = parts.events.outbox.pause_writes();
        let inbox = parts.events.inbox.pause_writes();
        let audit = parts.events.x.audit.pause_appends();
        audit_head = audit.0;
        let copied = w.db(&parts.db, CURSOR_TREES);
        drop(audit);
        drop(inbox);
        drop(outbox);
        drop(records);
        paused = started.elapsed();
        copied
    })
    .map_err(|e| NodeError::Store(format!("backup: {e}")))?;
    let summary = BackupSummary { writes_paused_ms: Some(paused.as_millis() as u64), ..summary };
    tracing::info!(
        file = %out.display(),
        trees = summary.trees.len(),
        keys = summary.keys,
        bytes = summary.bytes,
        audit_entries = audit_head,
        writes_paused_ms = paused.as_millis() as u64,
        sha256 = %summary.sha256,
        "backup written"
    );
    Ok(summary)
}

/// [`write_backup`] to a fresh file in the node's `data_dir`, on a blocking thread. If the caller goes
/// away (a download cancelled before it started), the backup still finishes and its file is removed.
/// Returns the file's path (the caller streams and removes it) and the summary.
pub async fn backup_to_temp_file(parts: Arc<NodeBackupSource>) -> Result<(PathBuf, BackupSummary), NodeError> {
    let out = temp_backup_path(&parts.data_dir);
    let (done_tx, done_rx) = tokio::sync::oneshot::channel();
    tokio::task::spawn_blocking(move || {
        let result = write_backup(&parts, &out).map(|summary| (out.clone(), summary));
        if let Err(Ok(_)) = done_tx.send(result) {
            let _ = std::fs::remove_file(&out);
        }
    });
    done_rx.await.map_err(|e| NodeError::Store(format!("backup task: {e}")))?
}

fn file_mode(path: &Path) -> u32 {
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        if let Ok(meta) = std::fs::metadata(path) {
            return meta.permissions().mode() & 0o777;
        }
    }
    let _ = path;
    0o600
}
