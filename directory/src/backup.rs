//! A consistent backup of the directory's store while it runs: what the admin port's `GET /api/backup`
//! streams (file format: [`client_sdk::backup`]; operations: docs/OPERATIONS.md).
//!
//! sled has no snapshots, so the catalog, grant and revocation writers are held back
//! ([`SledDatabase::pause_writes`]) while the trees are copied; each tree's entries, change log and
//! counters are then copied as of one moment. Searches, resolves and watches go on meanwhile. The search
//! index is not copied: it is derived state, rebuilt from the catalog when the directory starts.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Instant;

use client_sdk::backup::{write_backup_file, BackupHeader, BackupSummary, ServerKind};
use client_sdk::identity::PeerIdentity;

use crate::store::sled::SledDatabase;
use crate::store::StoreError;

/// What a backup of the running directory reads. Built where the stores are opened
/// ([`crate::store::sled::open_with_database`]).
#[derive(Clone)]
pub struct DirectoryBackupSource {
    pub database: SledDatabase,
    /// Where the admin port's temporary backup files go ([`temp_backup_path`]).
    pub data_dir: PathBuf,
    /// The directory's own certificate identity (department and name go into the file's header).
    pub identity: PeerIdentity,
}

/// A fresh name for a backup file in `data_dir` (the admin port writes there, streams, then removes it).
pub use client_sdk::backup::temp_backup_path;

fn backup_error(e: impl std::fmt::Display) -> StoreError {
    StoreError::Backend(format!("backup: {e}"))
}

/// Writes a consistent backup of the running directory to `out` (mode 0600; written under a temporary
/// name and renamed when complete). Writers are paused only while the trees are copied, not while the
/// file is synced and hashed.
///
/// Called by the admin port's `GET /api/backup` (through `AdminSource::backup`). Not cancel-safe (a
/// dropped future lets writers resume while the copy is still running): the admin port should call
/// [`backup_to_temp_file`], which runs to completion in its own task.
pub async fn write_backup(source: &DirectoryBackupSource, out: &Path) -> Result<BackupSummary, StoreError> {
    let header = BackupHeader::new(ServerKind::Directory, &source.identity.department, &source.identity.name);
    let db = source.database.db().clone();
    let path = out.to_path_buf();
    let paused = source.database.pause_writes().await;
    let started = Instant::now();
    let (copied_tx, copied_rx) = tokio::sync::oneshot::channel::<()>();
    let task = tokio::task::spawn_blocking(move || {
        write_backup_file(&path, header, |w| {
            let copied = w.db(&db, &[]);
            let _ = copied_tx.send(());
            copied
        })
    });
    // Resolves when the trees are copied, or when the task ended without (its sender dropped).
    let _ = copied_rx.await;
    drop(paused);
    let paused_ms = started.elapsed().as_millis() as u64;
    let summary = task.await.map_err(backup_error)?.map_err(backup_error)?;
    let summary = BackupSummary { writes_paused_ms: Some(paused_ms), ..summary };
    tracing::info!(
        file = %out.display(),
        trees = summary.trees.len(),
        keys = summary.keys,
        bytes = summary.bytes,
        writes_paused_ms = paused_ms,
        sha256 = %summary.sha256,
        "backup written"
    );
    Ok(summary)
}

/// [`write_backup`] to a fresh file in `data_dir`, in a task of its own: if the caller goes away
/// (a download cancelled before it started), the backup still finishes cleanly and its file is removed.
/// Returns the file's path (the caller streams and removes it) and the summary.
pub async fn backup_to_temp_file(source: Arc<DirectoryBackupSource>) -> Result<(PathBuf, BackupSummary), StoreError> {
    let out = temp_backup_path(&source.data_dir);
    let (done_tx, done_rx) = tokio::sync::oneshot::channel();
    tokio::spawn(async move {
        let result = write_backup(&source, &out).await.map(|summary| (out.clone(), summary));
        if let Err(Ok(_)) = done_tx.send(result) {
            let _ = std::fs::remove_file(&out);
        }
    });
    done_rx.await.map_err(backup_error)?
}
