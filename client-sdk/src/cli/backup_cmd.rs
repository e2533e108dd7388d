//! `exchangectl backup` (download a running server's backup from its admin port and verify it) and
//! `exchangectl restore` (verify a backup file and restore it into a stopped server's data directory).
//! The file format and the restore itself are [`crate::backup`]'s.

use std::path::{Path, PathBuf};

use serde::Serialize;

use super::output::format_unix;
use super::table::{Align, Table};
use super::{CliError, Ctx};
use crate::admin::client::AdminClientError;
use crate::backup::{self, BackupError, BackupSummary, RestoreOptions, RestoreSummary, ServerKind};

/// The admin port's backup route.
const BACKUP_PATH: &str = "/api/backup";

fn backup_error(path: &Path, e: BackupError) -> CliError {
    CliError::File { path: path.to_path_buf(), reason: e.to_string() }
}

/// Where the download lands until it is verified: beside `out`, so the final rename stays on one disk.
fn unverified_path(out: &Path) -> PathBuf {
    let name = out.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_else(|| "backup".into());
    out.with_file_name(format!(".{name}.unverified"))
}

pub async fn backup(ctx: &Ctx, out: PathBuf) -> Result<(), CliError> {
    if out.exists() {
        return Err(CliError::File {
            path: out,
            reason: "already exists: name a new file (a backup is never written over another)".into(),
        });
    }
    let admin = ctx.admin()?;
    let download = unverified_path(&out);
    admin.download(BACKUP_PATH, &download).await.map_err(|e| match e {
        AdminClientError::Status { status: 401, message } => CliError::Admin(AdminClientError::Status {
            status: 401,
            message: format!(
                "{message}; the admin port takes an operator certificate of the server's department \
                 (--pki-dir/--identity or --cert/--key) or its bearer token (--admin-token-file)"
            ),
        }),
        other => CliError::Admin(other),
    })?;
    let checked = download.clone();
    let verified = tokio::task::spawn_blocking(move || backup::verify_file(&checked))
        .await
        .map_err(|e| CliError::File { path: download.clone(), reason: format!("verification task: {e}") })?;
    let summary = match verified {
        Ok(summary) => summary,
        Err(e) => {
            // A damaged download is of no use, and it may hold the node's audit keys.
            let _ = std::fs::remove_file(&download);
            return Err(CliError::File {
                path: out,
                reason: format!("the downloaded backup failed verification and was deleted: {e}"),
            });
        }
    };
    std::fs::rename(&download, &out).map_err(|e| CliError::File { path: out.clone(), reason: e.to_string() })?;
    let view = BackupView { file: out, summary };
    ctx.out.emit(&view, || view.human());
    Ok(())
}

pub async fn restore(
    ctx: &Ctx,
    file: PathBuf,
    data_dir: PathBuf,
    server: Option<ServerKind>,
    force: bool,
) -> Result<(), CliError> {
    let options = RestoreOptions { expect_server: server, force };
    let (f, d) = (file.clone(), data_dir.clone());
    let restored = tokio::task::spawn_blocking(move || backup::restore_into(&f, &d, &options))
        .await
        .map_err(|e| CliError::File { path: file.clone(), reason: format!("restore task: {e}") })?;
    let summary = restored.map_err(|e| match e {
        // About the target, not the file.
        e @ (BackupError::TargetNotEmpty(_) | BackupError::Locked(_)) => CliError::Usage(e.to_string()),
        e => backup_error(&file, e),
    })?;
    let view = RestoreView { file, restored: summary };
    ctx.out.emit(&view, || view.human());
    Ok(())
}

fn size_text(bytes: u64) -> String {
    const UNITS: [&str; 4] = ["KiB", "MiB", "GiB", "TiB"];
    if bytes < 1024 {
        return format!("{bytes} B");
    }
    let mut v = bytes as f64 / 1024.0;
    let mut unit = 0;
    while v >= 1024.0 && unit < UNITS.len() - 1 {
        v /= 1024.0;
        unit += 1;
    }
    format!("{v:.1} {}", UNITS[unit])
}

/// The summary both commands print: what the file is, what it holds.
fn summary_human(file: &Path, s: &BackupSummary) -> String {
    let h = &s.header;
    let mut text = format!(
        "{} backup of {} ({}), made {} by version {}\n",
        h.server,
        h.department,
        h.certificate,
        format_unix(h.created_unix_ms / 1000),
        h.software_version
    );
    text.push_str(&format!("  file      {} ({})\n", file.display(), size_text(s.bytes)));
    text.push_str(&format!("  sha256    {}\n", s.sha256));
    text.push_str(&format!("  checksum  {} (verified)\n", s.checksum));
    text.push_str(&format!("  contents  {} trees, {} keys, {} files\n", s.trees.len(), s.keys, s.files.len()));
    if !s.files.is_empty() {
        text.push_str(&format!("  files     {}\n", s.files.join(", ")));
    }
    let mut t = Table::new(&["tree", "keys"]).align(1, Align::Right);
    for tree in &s.trees {
        t.row([tree.name.clone(), tree.keys.to_string()]);
    }
    text.push('\n');
    text.push_str(&t.render());
    text
}

#[derive(Debug, Serialize)]
pub struct BackupView {
    pub file: PathBuf,
    #[serde(flatten)]
    pub summary: BackupSummary,
}

impl BackupView {
    pub fn human(&self) -> String {
        let mut text = summary_human(&self.file, &self.summary);
        if self.summary.files.iter().any(|f| f.ends_with(".key")) {
            text.push_str(
                "\nthis file holds the node's audit keys (who has it can seal a rewritten audit trail): \
                 keep it as private as the node's data directory\n",
            );
        }
        text
    }
}

#[derive(Debug, Serialize)]
pub struct RestoreView {
    pub file: PathBuf,
    #[serde(flatten)]
    pub restored: RestoreSummary,
}

impl RestoreView {
    pub fn human(&self) -> String {
        let r = &self.restored;
        let mut text = summary_human(&self.file, &r.backup);
        text.push_str(&format!("\nrestored into {}\n", r.data_dir.display()));
        if let Some(aside) = &r.moved_aside {
            text.push_str(&format!("the folder that was there is kept at {}\n", aside.display()));
        }
        match r.backup.header.server {
            ServerKind::ExchangeNode => text.push_str(&format!(
                "next: check the audit trail with `exchange-node audit verify --data-dir {}`, then start the node \
                 (it resumes the directory's feeds from the backup's positions)\n",
                r.data_dir.display()
            )),
            ServerKind::Directory => text.push_str(
                "next: start the directory (it rebuilds its search index from the restored catalog); nodes \
                 re-register with their next heartbeat\n",
            ),
        }
        text
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::backup::{BackupHeader, TreeCount};

    #[test]
    fn sizes_read_as_people_write_them() {
        assert_eq!(size_text(512), "512 B");
        assert_eq!(size_text(1536), "1.5 KiB");
        assert_eq!(size_text(5 * 1024 * 1024), "5.0 MiB");
    }

    #[test]
    fn the_summary_names_every_tree_and_warns_about_keys() {
        let summary = BackupSummary {
            header: BackupHeader::new(ServerKind::ExchangeNode, "tax", "tax-node"),
            trees: vec![TreeCount { name: "records".into(), keys: 12 }, TreeCount { name: "audit".into(), keys: 3 }],
            keys: 15,
            files: vec!["audit-seal.key".into()],
            bytes: 2048,
            sha256: "ab".repeat(32),
            checksum: "cd".repeat(32),
            writes_paused_ms: None,
        };
        let text = BackupView { file: "b.gxbak".into(), summary }.human();
        assert!(text.starts_with("exchange-node backup of tax (tax-node)"), "{text}");
        assert!(text.contains("2 trees, 15 keys, 1 files"), "{text}");
        assert!(text.contains("records") && text.contains("audit keys"), "{text}");
    }

    #[test]
    fn command_lines() {
        use crate::cli::args::Command;
        use clap::Parser;
        let parse = |args: &[&str]| crate::cli::Cli::try_parse_from(["exchangectl"].iter().chain(args));
        let cli = parse(&["backup", "--admin", "10.0.0.5:9401", "--out", "tax.gxbak"]).unwrap();
        assert_eq!(cli.global.admin_addr(), "10.0.0.5:9401");
        assert!(matches!(cli.command, Command::Backup { ref out } if out == Path::new("tax.gxbak")));
        assert!(parse(&["backup"]).is_err(), "--out is required");
        let cli = parse(&["restore", "--file", "b", "--data-dir", "d", "--server", "node", "--force"]).unwrap();
        assert!(matches!(cli.command, Command::Restore { ref server, force: true, .. } if server.as_deref() == Some("node")));
        assert!(parse(&["restore", "--file", "b", "--data-dir", "d", "--server", "gateway"]).is_err());
        assert!(parse(&["restore", "--file", "b"]).is_err(), "--data-dir is required");
        assert_eq!("node".parse::<ServerKind>(), Ok(ServerKind::ExchangeNode));
        assert_eq!("directory".parse::<ServerKind>(), Ok(ServerKind::Directory));
    }

    #[test]
    fn downloads_land_beside_the_target_under_a_hidden_name() {
        assert_eq!(unverified_path(Path::new("/b/tax.gxbak")), PathBuf::from("/b/.tax.gxbak.unverified"));
    }
}
