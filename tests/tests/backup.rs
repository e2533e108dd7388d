//! Backup and restore with the real binaries: `exchangectl backup` downloads consistent backups from the
//! admin ports of a running `exchange-node` (operator certificate) and a running `directory` (bearer
//! token) while records keep arriving; `exchangectl restore` refuses a server that still runs, a damaged
//! file and the wrong kind of backup, then restores both stores, and the servers start on them with their
//! records, audit trail and catalog.

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU32, Ordering};
use std::sync::Arc;
use std::time::Duration;

use client_sdk::ids::{validate_uscc, IdError};
use e2e_tests::procs::{exchangectl, free_port, wait_for, Proc};
use serde_json::Value;

const REGISTRATION: &str = "101001/000001"; // commerce's enterprise registration, unconditional
const TOKEN: &str = "backup-test-token-0c41d8e9a7b2f6";

fn repo_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).parent().expect("repo root").to_path_buf()
}

/// The `n`-th valid credit code of a test series.
fn uscc(n: u32) -> String {
    let first17 = format!("91350100M{n:08}");
    match validate_uscc(&format!("{first17}0")) {
        Ok(()) => format!("{first17}0"),
        Err(IdError::Check { expected, .. }) => format!("{first17}{expected}"),
        Err(e) => panic!("{first17}: {e}"),
    }
}

/// A records file of companies `from..from + count`.
fn records_file(path: &Path, from: u32, count: u32) {
    let records: Vec<Value> = (from..from + count)
        .map(|n| {
            serde_json::json!({
                "key": uscc(n),
                "items": { "企业名称": format!("备份测试企业{n}有限公司"), "登记状态": "存续", "注册资本": format!("{n}.00") }
            })
        })
        .collect();
    std::fs::write(path, serde_json::to_vec(&records).unwrap()).unwrap();
}

struct Site {
    home: tempfile::TempDir,
    directory_port: u16,
}

impl Site {
    fn new() -> Site {
        let site = Site { home: tempfile::tempdir().expect("tempdir"), directory_port: free_port() };
        for d in ["pki", "config", "data", "logs", "backups", "work"] {
            std::fs::create_dir_all(site.path(d)).unwrap();
        }
        std::fs::write(site.path("config/admin.token"), format!("{TOKEN}\n")).unwrap();
        let pki = site.path("pki").display().to_string();
        let out = exchangectl(&["pki", "init", "--dir", &pki]);
        assert!(out.status.success(), "pki init: {}", String::from_utf8_lossy(&out.stderr));
        let mut identities = vec![("central", "directory", "directory".to_string()), ("central", "operator", "central-operator".into())];
        for d in ["commerce", "quality"] {
            identities.extend([(d, "node", format!("{d}-node")), (d, "operator", format!("{d}-operator")), (d, "app", format!("{d}-app"))]);
        }
        for (dept, role, name) in identities {
            let out = exchangectl(&["pki", "issue", "--dir", &pki, "--dept", dept, "--role", role, "--name", &name]);
            assert!(out.status.success(), "pki issue {name}: {}", String::from_utf8_lossy(&out.stderr));
        }
        site
    }

    fn path(&self, rel: &str) -> PathBuf {
        self.home.path().join(rel)
    }

    fn directory_addr(&self) -> String {
        format!("127.0.0.1:{}", self.directory_port)
    }

    /// exchangectl as certificate `identity`: (success, stdout, stderr).
    fn ctl(&self, identity: &str, args: &[&str]) -> (bool, String, String) {
        let pki = self.path("pki").display().to_string();
        let dir = self.directory_addr();
        let mut all = vec!["--pki-dir", &pki, "--identity", identity, "--directory", &dir];
        all.extend_from_slice(args);
        let out = exchangectl(&all);
        (out.status.success(), String::from_utf8_lossy(&out.stdout).into_owned(), String::from_utf8_lossy(&out.stderr).into_owned())
    }

    fn tables(&self, cert: &str, admin_port: Option<u16>) -> String {
        let pki = self.path("pki");
        let mut text = format!(
            "\n[tls]\nca = \"{ca}\"\ncert = \"{crt}\"\nkey = \"{key}\"\n",
            ca = pki.join("ca.crt").display(),
            crt = pki.join(format!("{cert}.crt")).display(),
            key = pki.join(format!("{cert}.key")).display(),
        );
        if let Some(port) = admin_port {
            text.push_str(&format!("\n[admin]\nlisten = \"127.0.0.1:{port}\"\ntoken_file = \"admin.token\"\n"));
        }
        text
    }

    fn start_directory(&self, admin_port: u16) -> Proc {
        let config = self.path("config/directory.toml");
        let text = format!(
            "listen = \"{addr}\"\ndata_dir = \"{data}\"\nlease_ttl_seconds = 15\n{tables}",
            addr = self.directory_addr(),
            data = self.path("data/directory").display(),
            tables = self.tables("directory", Some(admin_port)),
        );
        std::fs::write(&config, text).unwrap();
        let proc = Proc::start("directory", "directory", &["--config", config.to_str().unwrap()], &self.path("logs/directory.log"));
        wait_for("the directory to answer", Duration::from_secs(30), || self.ctl("central-operator", &["whoami"]).0.then_some(()));
        proc
    }

    fn start_node(&self, dept: &str, port: u16, admin_port: Option<u16>) -> Proc {
        let config = self.path(&format!("config/{dept}-node.toml"));
        let text = format!(
            "listen = \"127.0.0.1:{port}\"\nadvertise_address = \"127.0.0.1:{port}\"\ndirectory_address = \"{dir}\"\ndata_dir = \"{data}\"\ncatalog_file = \"{catalog}\"\n{tables}",
            dir = self.directory_addr(),
            data = self.path(&format!("data/{dept}-node")).display(),
            catalog = repo_root().join(format!("deploy/local/catalog/{dept}.toml")).display(),
            tables = self.tables(&format!("{dept}-node"), admin_port),
        );
        std::fs::write(&config, text).unwrap();
        let log = self.path(&format!("logs/{dept}-node.log"));
        Proc::start(&format!("{dept}-node"), "exchange-node", &["--config", config.to_str().unwrap()], &log)
    }

    fn wait_online(&self, dept: &str) {
        wait_for(&format!("{dept} online"), Duration::from_secs(30), || {
            let (ok, out, _) = self.ctl("central-operator", &["--json", "nodes"]);
            let nodes: Value = if ok { serde_json::from_str(&out).unwrap_or_default() } else { Value::Null };
            nodes["nodes"]
                .as_array()
                .is_some_and(|list| list.iter().any(|n| n["department"] == dept && n["status"] == "online"))
                .then_some(())
        });
    }
}

#[test]
fn exchangectl_backs_up_running_servers_and_restores_them() {
    let site = Site::new();
    let (directory_admin, commerce_port, commerce_admin, quality_port) = (free_port(), free_port(), free_port(), free_port());
    let mut directory = site.start_directory(directory_admin);
    let mut commerce = site.start_node("commerce", commerce_port, Some(commerce_admin));
    let mut quality = site.start_node("quality", quality_port, None);
    site.wait_online("commerce");
    site.wait_online("quality");
    let commerce_grpc = format!("127.0.0.1:{commerce_port}");
    let quality_grpc = format!("127.0.0.1:{quality_port}");
    let commerce_admin_addr = format!("127.0.0.1:{commerce_admin}");
    let directory_admin_addr = format!("127.0.0.1:{directory_admin}");
    let put = |from: u32, count: u32| {
        let file = site.path(&format!("work/records-{from}.json"));
        records_file(&file, from, count);
        let (ok, _, err) =
            site.ctl("commerce-app", &["--node", &commerce_grpc, "records", "put", "--resource", REGISTRATION, "--file", file.to_str().unwrap()]);
        assert!(ok, "records put: {err}");
    };
    wait_for("commerce's catalog", Duration::from_secs(30), || {
        site.ctl("central-operator", &["catalog", "get", REGISTRATION]).0.then_some(())
    });
    put(0, 500);

    // ---- backups while a writer keeps putting records ----
    let stop = Arc::new(AtomicBool::new(false));
    let batches = Arc::new(AtomicU32::new(0));
    let node_backup = site.path("backups/commerce.gxbak");
    let directory_backup = site.path("backups/directory.gxbak");
    let token_file = site.path("config/admin.token").display().to_string();
    std::thread::scope(|scope| {
        let writer = scope.spawn(|| {
            while !stop.load(Ordering::SeqCst) {
                let n = batches.fetch_add(1, Ordering::SeqCst);
                put(1000 + n * 50, 50);
            }
        });
        wait_for("the writer's first batches", Duration::from_secs(30), || (batches.load(Ordering::SeqCst) >= 3).then_some(()));
        let (ok, out, err) = site.ctl(
            "commerce-operator",
            &["--admin", &commerce_admin_addr, "--json", "backup", "--out", node_backup.to_str().unwrap()],
        );
        assert!(ok, "node backup: {err}{out}");
        let summary: Value = serde_json::from_str(&out).unwrap();
        assert_eq!(summary["header"]["server"], "exchange-node");
        assert_eq!(summary["header"]["department"], "commerce");
        assert_eq!(summary["sha256"], client_sdk::backup::sha256_file(&node_backup).unwrap());
        assert_eq!(summary["bytes"], std::fs::metadata(&node_backup).unwrap().len());
        assert!(summary["files"].as_array().unwrap().iter().any(|f| f == "audit-seal.key"), "{summary}");
        assert!(summary["keys"].as_u64().unwrap() > 500);
        // The directory's admin port, with the bearer token instead of a certificate.
        let (ok, out, err) = site.ctl(
            "central-operator",
            &["--admin", &directory_admin_addr, "--admin-token-file", &token_file, "backup", "--out", directory_backup.to_str().unwrap()],
        );
        assert!(ok, "directory backup: {err}{out}");
        assert!(out.contains("directory backup of central (directory)") && out.contains("(verified)"), "{out}");
        // Never over an existing file.
        let (ok, _, err) = site.ctl("commerce-operator", &["--admin", &commerce_admin_addr, "backup", "--out", node_backup.to_str().unwrap()]);
        assert!(!ok && err.contains("already exists"), "{err}");
        stop.store(true, Ordering::SeqCst);
        writer.join().unwrap();
    });
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        assert_eq!(std::fs::metadata(&node_backup).unwrap().permissions().mode() & 0o777, 0o600);
    }
    let commerce_data = site.path("data/commerce-node").display().to_string();
    let node_file = node_backup.display().to_string();

    // ---- restore refuses a running server, the wrong kind of backup, a damaged file ----
    let (ok, _, err) = site.ctl("commerce-operator", &["restore", "--file", &node_file, "--data-dir", &commerce_data, "--force"]);
    assert!(!ok && err.contains("in use") && err.contains("Stop the server"), "{err}");
    assert!(commerce.stop(), "commerce stops cleanly");
    let (ok, _, err) = site.ctl("commerce-operator", &["restore", "--file", &node_file, "--data-dir", &commerce_data, "--server", "directory"]);
    assert!(!ok && err.contains("not a directory backup"), "{err}");
    let mut bytes = std::fs::read(&node_backup).unwrap();
    let middle = bytes.len() / 2;
    bytes[middle] ^= 0x40;
    let damaged = site.path("backups/damaged.gxbak");
    std::fs::write(&damaged, &bytes).unwrap();
    let elsewhere = site.path("data/elsewhere").display().to_string();
    let (ok, _, err) = site.ctl("commerce-operator", &["restore", "--file", damaged.to_str().unwrap(), "--data-dir", &elsewhere]);
    assert!(!ok && err.contains("corrupt"), "{err}");
    assert!(!Path::new(&elsewhere).exists(), "nothing is written from a damaged file");
    let (ok, _, err) = site.ctl("commerce-operator", &["restore", "--file", &node_file, "--data-dir", &commerce_data]);
    assert!(!ok && err.contains("not empty") && err.contains("--force"), "{err}");

    // ---- restore the node and start it on the restored data ----
    let (ok, out, err) =
        site.ctl("commerce-operator", &["--json", "restore", "--file", &node_file, "--data-dir", &commerce_data, "--server", "node", "--force"]);
    assert!(ok, "restore: {err}{out}");
    let restored: Value = serde_json::from_str(&out).unwrap();
    let aside = PathBuf::from(restored["moved_aside"].as_str().expect("the old folder was moved aside"));
    assert!(aside.join("node.sled").exists(), "the old data is kept at {}", aside.display());
    let mut commerce = site.start_node("commerce", commerce_port, Some(commerce_admin));
    site.wait_online("commerce");
    let (ok, out, err) = site.ctl("commerce-operator", &["--node", &commerce_grpc, "audit", "verify"]);
    assert!(ok, "the restored audit trail verifies: {err}{out}");
    let (ok, out, err) = site.ctl("commerce-operator", &["--node", &commerce_grpc, "--json", "node-status"]);
    assert!(ok, "{err}");
    let status: Value = serde_json::from_str(&out).unwrap();
    let stored = status["records_stored"].as_u64().expect("records_stored");
    assert!(stored >= 600 && stored <= 500 + 50 * u64::from(batches.load(Ordering::SeqCst)), "{stored} records");
    assert_eq!((stored - 500) % 50, 0, "whole batches only: {stored}");
    let newest = uscc(1000 + (stored as u32 - 500) - 1);
    let (ok, out, err) = wait_for("quality's query answered by the restored node", Duration::from_secs(30), || {
        let r = site.ctl("quality-app", &["--node", &quality_grpc, "records", "get", "--resource", REGISTRATION, &newest]);
        r.0.then_some(r)
    });
    assert!(ok && out.contains(&format!("备份测试企业{}有限公司", 1000 + (stored as u32 - 500) - 1)), "{err}{out}");

    // ---- restore the directory into a fresh folder and start it there ----
    assert!(directory.stop(), "the directory stops cleanly");
    let restored_directory = site.path("data/directory-restored");
    let (ok, out, err) = site.ctl(
        "central-operator",
        &["restore", "--file", directory_backup.to_str().unwrap(), "--data-dir", restored_directory.to_str().unwrap(), "--server", "directory"],
    );
    assert!(ok, "{err}{out}");
    assert!(out.contains("restored into"), "{out}");
    std::fs::rename(site.path("data/directory"), site.path("data/directory-old")).unwrap();
    std::fs::rename(&restored_directory, site.path("data/directory")).unwrap();
    let mut directory = site.start_directory(directory_admin);
    let (ok, out, err) = site.ctl("central-operator", &["catalog", "get", REGISTRATION]);
    assert!(ok && out.contains("企业登记信息"), "{err}{out}");
    site.wait_online("commerce");

    assert!(commerce.stop());
    assert!(quality.stop());
    assert!(directory.stop());
}
