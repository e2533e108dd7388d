//! `exchange-node audit verify` as an operator runs it: the real binary against a node's data directory.

use std::path::Path;
use std::process::{Command, Output};

use std::time::Duration;

use exchange_node::audit::{now_us, open_db_waiting, AuditKeys, AuditLog, AuditRecord, Side, DB_DIR};

/// Opens the data directory's database, waiting for the lock of one closed a moment ago (sled lets go
/// of it asynchronously).
fn open_db(data_dir: &Path) -> sled::Db {
    open_db_waiting(&data_dir.join(DB_DIR), Duration::from_secs(10)).unwrap()
}

fn verify_cmd(data_dir: &Path, public_key: Option<&str>) -> Output {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_exchange-node"));
    cmd.args(["audit", "verify", "--data-dir"]).arg(data_dir).env_remove("EXCHANGE_NODE_CONFIG");
    if let Some(key) = public_key {
        cmd.args(["--public-key", key]);
    }
    cmd.output().expect("run exchange-node")
}

fn text(out: &Output) -> String {
    format!("status {:?}\nstdout:\n{}\nstderr:\n{}", out.status, String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr))
}

/// A stopped node's data directory: its audit keys, and 8 entries sealed after 4 and after 8.
fn node_data_dir() -> (tempfile::TempDir, String) {
    let dir = tempfile::tempdir().unwrap();
    let keys = AuditKeys::load_or_create(dir.path()).unwrap();
    let db = sled::open(dir.path().join(DB_DIR)).unwrap();
    let log = AuditLog::open(&db, keys.signing_key().clone()).unwrap();
    for i in 1..=8u64 {
        let t = 1_700_000_000_000_000 + i as i64 * 1_000;
        log.append(AuditRecord {
            message_id: format!("msg-{i}"),
            side: Side::Provider,
            consumer: "tax".into(),
            provider: "police".into(),
            resource_code: "102001/000001".into(),
            key_hash: keys.hasher().hash_keys(&["11010519491231002X".into()]),
            data_items: vec!["姓名".into()],
            result_code: 0,
            request_bytes: 100,
            response_bytes: 300,
            request_in_us: t,
            request_out_us: t + 10,
            response_in_us: t + 20,
            response_out_us: t + 30,
            caller: "tax-node".into(),
            purpose: "稽查".into(),
            error: String::new(),
        })
        .unwrap();
        if i % 4 == 0 {
            log.seal(now_us()).unwrap().unwrap();
        }
    }
    (dir, keys.verifying_key_hex())
}

#[test]
fn audit_verify_intact_log_exits_0() {
    let (dir, key) = node_data_dir();
    let out = verify_cmd(dir.path(), Some(&key));
    assert_eq!(out.status.code(), Some(0), "{}", text(&out));
    assert!(String::from_utf8_lossy(&out.stdout).contains("intact: 8 entries, 2 seals, 0 unsealed"), "{}", text(&out));

    // Without --public-key: audit-seal.pub from the data directory, with a warning.
    let out = verify_cmd(dir.path(), None);
    assert_eq!(out.status.code(), Some(0), "{}", text(&out));
    assert!(String::from_utf8_lossy(&out.stderr).contains("same disk"), "{}", text(&out));
}

#[test]
fn audit_verify_tampered_entry_exits_1_and_names_it() {
    let (dir, key) = node_data_dir();
    {
        // Edit entry 6 in place, as someone with access to the database would.
        let db = open_db(dir.path());
        let tree = db.open_tree("audit").unwrap();
        let raw = tree.get(6u64.to_be_bytes()).unwrap().expect("entry 6");
        let mut entry: serde_json::Value = serde_json::from_slice(&raw).unwrap();
        entry["record"]["consumer"] = "quality".into();
        tree.insert(6u64.to_be_bytes(), serde_json::to_vec(&entry).unwrap()).unwrap();
        db.flush().unwrap();
    }
    let out = verify_cmd(dir.path(), Some(&key));
    assert_eq!(out.status.code(), Some(1), "{}", text(&out));
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(stdout.contains("entry 6 was edited"), "{}", text(&out));
    assert!(stdout.contains("first entry concerned: 6"), "{}", text(&out));
}

#[test]
fn audit_verify_errors_exit_2() {
    let empty = tempfile::tempdir().unwrap();
    let some_key = AuditKeys::from_secrets([1; 32], [2; 32]).verifying_key_hex();
    let out = verify_cmd(empty.path(), Some(&some_key));
    assert_eq!(out.status.code(), Some(2), "{}", text(&out));
    assert!(String::from_utf8_lossy(&out.stderr).contains("no node database"), "{}", text(&out));

    let (dir, key) = node_data_dir();
    let _node_running = open_db(dir.path());
    let out = verify_cmd(dir.path(), Some(&key));
    assert_eq!(out.status.code(), Some(2), "{}", text(&out));
    assert!(String::from_utf8_lossy(&out.stderr).contains("stop the node"), "{}", text(&out));
}

#[test]
fn audit_node_mode_still_needs_a_config() {
    let out = Command::new(env!("CARGO_BIN_EXE_exchange-node")).env_remove("EXCHANGE_NODE_CONFIG").output().unwrap();
    assert_eq!(out.status.code(), Some(2), "{}", text(&out));
    assert!(String::from_utf8_lossy(&out.stderr).contains("--config"), "{}", text(&out));
    let out = Command::new(env!("CARGO_BIN_EXE_exchange-node")).args(["--config", "/nonexistent/node.toml"]).output().unwrap();
    assert_ne!(out.status.code(), Some(0), "{}", text(&out));
    assert!(String::from_utf8_lossy(&out.stderr).contains("/nonexistent/node.toml"), "{}", text(&out));
}
