//! End-to-end: the real `directory`, `exchange-node` and `exchangectl` binaries, a PKI made with
//! `exchangectl pki`, three department nodes publishing the sample catalogs, all over mutual TLS on
//! 127.0.0.1 with sled stores in a temporary directory.

use std::path::{Path, PathBuf};
use std::time::Duration;

use e2e_tests::procs::{bin_path, free_port, wait_for, Proc};
use serde_json::Value;

const DEPTS: [&str; 3] = ["tax", "commerce", "quality"];

fn repo_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).parent().expect("repo root").to_path_buf()
}

/// A temporary installation: PKI, configs, data and logs under one folder.
struct Site {
    home: tempfile::TempDir,
    directory_port: u16,
}

impl Site {
    fn new() -> Site {
        let site = Site { home: tempfile::tempdir().expect("tempdir"), directory_port: free_port() };
        for d in ["pki", "config", "data", "logs"] {
            std::fs::create_dir_all(site.path(d)).unwrap();
        }
        site
    }

    fn path(&self, rel: &str) -> PathBuf {
        self.home.path().join(rel)
    }

    fn pki(&self) -> String {
        self.path("pki").display().to_string()
    }

    fn directory_addr(&self) -> String {
        format!("127.0.0.1:{}", self.directory_port)
    }

    /// Runs exchangectl as certificate `identity`; returns (success, stdout, stderr).
    fn ctl(&self, identity: &str, args: &[&str]) -> (bool, String, String) {
        let pki = self.pki();
        let dir = self.directory_addr();
        let mut all = vec!["--pki-dir", &pki, "--identity", identity, "--directory", &dir];
        all.extend_from_slice(args);
        let out = e2e_tests::procs::exchangectl(&all);
        (
            out.status.success(),
            String::from_utf8_lossy(&out.stdout).into_owned(),
            String::from_utf8_lossy(&out.stderr).into_owned(),
        )
    }

    /// exchangectl --json as `identity`, which must succeed; the parsed document.
    fn ctl_json(&self, identity: &str, args: &[&str]) -> Value {
        let mut all = vec!["--json"];
        all.extend_from_slice(args);
        let (ok, out, err) = self.ctl(identity, &all);
        assert!(ok, "exchangectl {args:?} failed:\n{out}\n{err}");
        serde_json::from_str(&out).unwrap_or_else(|e| panic!("exchangectl {args:?}: not JSON ({e}):\n{out}"))
    }

    fn issue(&self, dept: &str, role: &str, name: &str) {
        let pki = self.pki();
        let out = e2e_tests::procs::exchangectl(&["pki", "issue", "--dir", &pki, "--dept", dept, "--role", role, "--name", name]);
        assert!(out.status.success(), "pki issue {name}: {}", String::from_utf8_lossy(&out.stderr));
    }

    fn init_pki(&self) {
        let pki = self.pki();
        let out = e2e_tests::procs::exchangectl(&["pki", "init", "--dir", &pki]);
        assert!(out.status.success(), "pki init: {}", String::from_utf8_lossy(&out.stderr));
        self.issue("central", "directory", "directory");
        self.issue("central", "operator", "central-operator");
        for d in DEPTS {
            self.issue(d, "node", &format!("{d}-node"));
            self.issue(d, "operator", &format!("{d}-operator"));
            self.issue(d, "app", &format!("{d}-app"));
        }
    }

    fn write_directory_config(&self, cert_name: &str, lease_ttl: u32) -> PathBuf {
        let pki = self.path("pki");
        let path = self.path("config/directory.toml");
        std::fs::write(
            &path,
            format!(
                "listen = \"{addr}\"\ndata_dir = \"{data}\"\nlease_ttl_seconds = {lease_ttl}\n\n[tls]\nca = \"{ca}\"\ncert = \"{cert}\"\nkey = \"{key}\"\n",
                addr = self.directory_addr(),
                data = self.path("data/directory").display(),
                ca = pki.join("ca.crt").display(),
                cert = pki.join(format!("{cert_name}.crt")).display(),
                key = pki.join(format!("{cert_name}.key")).display(),
            ),
        )
        .unwrap();
        path
    }

    fn start_directory(&self) -> Proc {
        let config = self.path("config/directory.toml");
        let proc = Proc::start("directory", "directory", &["--config", config.to_str().unwrap()], &self.path("logs/directory.log"));
        wait_for("the directory to answer", Duration::from_secs(30), || self.ctl("central-operator", &["whoami"]).0.then_some(()));
        proc
    }

    fn start_node(&self, dept: &str, port: u16) -> Proc {
        self.write_node_config(dept, port, "");
        let path = self.path(&format!("config/{dept}-node.toml"));
        Proc::start(&format!("{dept}-node"), "exchange-node", &["--config", path.to_str().unwrap()], &self.path(&format!("logs/{dept}-node.log")))
    }

    /// Writes `config/<dept>-node.toml`; `extra` (TOML tables such as `[[quotas]]`) goes at the end.
    fn write_node_config(&self, dept: &str, port: u16, extra: &str) {
        let pki = self.path("pki");
        let path = self.path(&format!("config/{dept}-node.toml"));
        std::fs::write(
            &path,
            format!(
                "listen = \"127.0.0.1:{port}\"\nadvertise_address = \"127.0.0.1:{port}\"\ndirectory_address = \"{dir}\"\ndata_dir = \"{data}\"\ncatalog_file = \"{catalog}\"\n\n[tls]\nca = \"{ca}\"\ncert = \"{cert}\"\nkey = \"{key}\"\n{extra}",
                dir = self.directory_addr(),
                data = self.path(&format!("data/{dept}-node")).display(),
                catalog = repo_root().join(format!("deploy/local/catalog/{dept}.toml")).display(),
                ca = pki.join("ca.crt").display(),
                cert = pki.join(format!("{dept}-node.crt")).display(),
                key = pki.join(format!("{dept}-node.key")).display(),
            ),
        )
        .unwrap();
    }

    fn node_status(&self, dept: &str) -> Option<String> {
        let nodes = self.ctl_json("central-operator", &["nodes"]);
        nodes["nodes"].as_array()?.iter().find(|n| n["department"] == dept).map(|n| n["status"].as_str().unwrap_or("").to_string())
    }
}

fn sample_entry_count() -> u64 {
    DEPTS
        .iter()
        .map(|d| {
            let text = std::fs::read_to_string(repo_root().join(format!("deploy/local/catalog/{d}.toml"))).unwrap();
            text.lines().filter(|l| l.trim() == "[[entries]]").count() as u64
        })
        .sum()
}

fn codes(search: &Value) -> Vec<String> {
    search["hits"].as_array().unwrap().iter().map(|h| h["entry"]["resource_code"].as_str().unwrap().to_string()).collect()
}

#[test]
fn three_departments_register_publish_search_and_survive_restart() {
    let site = Site::new();
    site.init_pki();
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        for key in ["ca.key", "tax-node.key", "central-operator.key"] {
            let mode = std::fs::metadata(site.path("pki").join(key)).unwrap().permissions().mode() & 0o777;
            assert_eq!(mode, 0o600, "{key} must be private");
        }
    }
    site.write_directory_config("directory", 3);
    let mut directory = site.start_directory();
    let ports: Vec<u16> = DEPTS.iter().map(|_| free_port()).collect();
    let mut nodes: Vec<Proc> = DEPTS.iter().zip(&ports).map(|(d, p)| site.start_node(d, *p)).collect();

    // Every node registers and publishes its sample catalog.
    let expected = sample_entry_count();
    wait_for("three nodes online and every sample entry published", Duration::from_secs(60), || {
        let online = DEPTS.iter().all(|d| site.node_status(d).as_deref() == Some("online"));
        let all = site.ctl_json("central-operator", &["catalog", "search", "--page-size", "1"]);
        (online && all["total_hits"].as_u64() == Some(expected)).then_some(())
    });

    // Chinese full text with word segmentation: `企业 登记` finds 企业登记信息.
    let found = site.ctl_json("tax-app", &["catalog", "search", "企业 登记"]);
    assert!(codes(&found).contains(&"101001/000001".to_string()), "{found}");
    assert_eq!(found["hits"][0]["entry"]["resource_code"], "101001/000001", "best match first: {found}");
    let entry = site.ctl_json("quality-app", &["catalog", "get", "101001/000001"]);
    assert_eq!(entry["provider_code"], "commerce");
    assert_eq!(entry["name"], "企业登记信息");
    let resolved = site.ctl_json("tax-app", &["catalog", "resolve", "101001/000001"]);
    assert_eq!(resolved["provider_code"], "commerce");
    assert_eq!(resolved["providers"][0]["address"], format!("127.0.0.1:{}", ports[1]));
    assert_eq!(resolved["providers"][0]["status"], "online");
    let (ok, _, err) = site.ctl("tax-app", &["catalog", "resolve", "199999/000001"]);
    assert!(!ok && err.to_lowercase().contains("not found"), "{err}");
    let conditional = site.ctl_json("tax-app", &["catalog", "search", "--provider", "commerce", "--share-type", "conditional"]);
    assert!(conditional["total_hits"].as_u64().unwrap() > 0);
    for hit in conditional["hits"].as_array().unwrap() {
        assert_eq!(hit["entry"]["provider_code"], "commerce");
        assert_eq!(hit["entry"]["share_type"], "conditional");
    }

    // An app publishes through its own node; another department's app may not use that node.
    let extra = site.path("config/extra.toml");
    let tax_catalog = std::fs::read_to_string(repo_root().join("deploy/local/catalog/tax.toml")).unwrap();
    let first = tax_catalog.split("[[entries]]").nth(1).unwrap();
    let new_entry = first.replacen("101002/000001", "101002/000099", 1).replacen("name = \"", "name = \"测试新增", 1);
    std::fs::write(&extra, format!("[[entries]]{new_entry}")).unwrap();
    let tax_node = format!("127.0.0.1:{}", ports[0]);
    let published = site.ctl_json("tax-app", &["catalog", "publish", "--file", extra.to_str().unwrap(), "--node", &tax_node]);
    assert!(published["catalog_version"].as_u64().unwrap() > expected - 1);
    assert_eq!(site.ctl_json("commerce-app", &["catalog", "get", "101002/000099"])["provider_code"], "tax");
    let (ok, _, err) = site.ctl("commerce-app", &["catalog", "publish", "--file", extra.to_str().unwrap(), "--node", &tax_node]);
    assert!(!ok && err.to_lowercase().contains("permission"), "{err}");
    // A forged provider: commerce's operator publishing tax's file directly.
    let (ok, _, err) = site.ctl("commerce-operator", &["catalog", "publish", "--file", extra.to_str().unwrap()]);
    assert!(!ok && err.to_lowercase().contains("permission"), "{err}");

    // A crashed node's lease lapses and the directory shows it offline.
    nodes[2].kill();
    wait_for("quality node offline", Duration::from_secs(20), || (site.node_status("quality").as_deref() == Some("offline")).then_some(()));
    // (a 2 s lease on a loaded CI box can lapse for a moment, so the live node gets a moment to renew)
    wait_for("tax node online", Duration::from_secs(10), || (site.node_status("tax").as_deref() == Some("online")).then_some(()));

    // Restart the directory: same entries, same version, same search results.
    let before = site.ctl_json("central-operator", &["catalog", "search", "企业 登记"]);
    assert!(directory.stop(), "directory exits cleanly on SIGTERM:\n{}", directory.log_text());
    let mut directory = site.start_directory();
    let after = site.ctl_json("central-operator", &["catalog", "search", "企业 登记"]);
    assert_eq!(codes(&before), codes(&after));
    assert_eq!(before["catalog_version"], after["catalog_version"]);
    let added = site.ctl_json("central-operator", &["catalog", "get", "101002/000099"]);
    assert!(added["name"].as_str().unwrap().starts_with("测试新增"), "{added}");

    // Revocation by the central operator: the tax app is refused from then on.
    assert!(site.ctl("tax-app", &["whoami"]).0);
    let cert = site.path("pki/tax-app.crt");
    let revoked = site.ctl_json("central-operator", &["pki", "revoke", "--cert-file", cert.to_str().unwrap(), "--reason", "test"]);
    assert!(revoked.to_string().contains("tax"), "{revoked}");
    let (ok, _, err) = site.ctl("tax-app", &["whoami"]);
    assert!(!ok, "a revoked certificate must be refused: {err}");
    // ...while the tax node keeps working.
    wait_for("tax node online", Duration::from_secs(10), || (site.node_status("tax").as_deref() == Some("online")).then_some(()));

    for n in nodes.iter_mut().take(2) {
        assert!(n.stop(), "{} exits cleanly on SIGTERM:\n{}", n.name, n.log_text());
    }
    assert!(directory.stop());
}

#[test]
fn directory_refuses_to_start_with_a_non_directory_certificate() {
    let site = Site::new();
    site.init_pki();
    site.write_directory_config("tax-node", 15);
    let config = site.path("config/directory.toml");
    let out = std::process::Command::new(bin_path("directory")).args(["--config", config.to_str().unwrap()]).output().unwrap();
    assert!(!out.status.success());
    let text = format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
    assert!(text.contains("role"), "the error names the role problem: {text}");
}

#[test]
fn catalog_watch_streams_every_change_in_order_and_resumes() {
    let site = Site::new();
    site.init_pki();
    site.write_directory_config("directory", 15);
    let _directory = site.start_directory();
    let watch_log = site.path("logs/watch.log");
    let pki = site.pki();
    let dir = site.directory_addr();
    let mut watch = Proc::start(
        "watch",
        "exchangectl",
        &["--pki-dir", &pki, "--identity", "tax-app", "--directory", &dir, "--json", "catalog", "watch", "--from", "0"],
        &watch_log,
    );
    for d in ["tax", "commerce"] {
        let file = repo_root().join(format!("deploy/local/catalog/{d}.toml"));
        site.ctl_json(&format!("{d}-operator"), &["catalog", "publish", "--file", file.to_str().unwrap()]);
    }
    let (ok, _, err) = site.ctl("tax-operator", &["catalog", "withdraw", "101002/000001"]);
    assert!(ok, "{err}");
    let total = site.ctl_json("tax-app", &["catalog", "search", "--page-size", "1"])["catalog_version"].as_u64().unwrap();
    let versions = |text: &str| -> Vec<u64> {
        text.lines().filter_map(|l| serde_json::from_str::<Value>(l).ok()).filter_map(|v| v["version"].as_u64()).collect()
    };
    let seen = wait_for("the watcher to see every change", Duration::from_secs(20), || {
        let v = versions(&std::fs::read_to_string(&watch_log).unwrap_or_default());
        (v.len() as u64 == total).then_some(v)
    });
    assert_eq!(seen, (1..=total).collect::<Vec<_>>(), "every version once, in order");
    let text = std::fs::read_to_string(&watch_log).unwrap();
    let last: Value = serde_json::from_str(text.lines().rfind(|l| l.starts_with('{')).unwrap()).unwrap();
    assert_eq!(last["kind"], "withdraw");
    watch.kill();

    // Resume from the middle: exactly the rest.
    let resume_log = site.path("logs/watch2.log");
    let from = (total / 2).to_string();
    let mut resumed = Proc::start(
        "watch-resume",
        "exchangectl",
        &["--pki-dir", &pki, "--identity", "tax-app", "--directory", &dir, "--json", "catalog", "watch", "--from", &from],
        &resume_log,
    );
    let rest = wait_for("the resumed watcher", Duration::from_secs(20), || {
        let v = versions(&std::fs::read_to_string(&resume_log).unwrap_or_default());
        (v.len() as u64 == total - total / 2).then_some(v)
    });
    assert_eq!(rest, (total / 2 + 1..=total).collect::<Vec<_>>());
    resumed.kill();

    // A version that does not exist yet is refused.
    let future = (total + 100).to_string();
    let (ok, _, err) = site.ctl("tax-app", &["catalog", "watch", "--from", &future]);
    assert!(!ok, "watch from a future version must fail");
    assert!(err.to_lowercase().contains("range") || err.contains("version"), "{err}");
}

#[test]
fn stock_grpc_tools_see_health_and_reflection_over_mtls() {
    let python = std::env::var("GX_PYTHON").expect(
        "GX_PYTHON must name a python with grpcio, grpcio-health-checking and grpcio-reflection \
         (scripts/test.sh sets it up in .venv)",
    );
    let site = Site::new();
    site.init_pki();
    site.write_directory_config("directory", 15);
    let _directory = site.start_directory();
    let node_port = free_port();
    let _node = site.start_node("tax", node_port);
    let pki = site.path("pki");
    let script = repo_root().join("tests/python/stock_grpc_tools.py");
    let check = |addr: &str, service: &str| {
        wait_for(&format!("{service} on {addr}"), Duration::from_secs(30), || {
            let out = std::process::Command::new(&python)
                .arg(&script)
                .args([addr, pki.join("ca.crt").to_str().unwrap()])
                .args([pki.join("tax-app.crt").to_str().unwrap(), pki.join("tax-app.key").to_str().unwrap(), service])
                .output()
                .expect("run python");
            out.status.success().then(|| String::from_utf8_lossy(&out.stdout).into_owned())
        })
    };
    let dir = check(&site.directory_addr(), "govexchange.v1.Directory");
    assert!(dir.contains("grpc.health.v1.Health"), "{dir}");
    let node = check(&format!("127.0.0.1:{node_port}"), "govexchange.v1.ExchangeNode");
    assert!(node.contains("grpc.reflection.v1.ServerReflection") || node.contains("grpc.reflection.v1alpha"), "{node}");

    // Without a client certificate, stock grpcio is refused at the handshake.
    let code = format!(
        "import grpc,sys\nfrom grpc_health.v1 import health_pb2, health_pb2_grpc\n\
         c=grpc.secure_channel('{}', grpc.ssl_channel_credentials(open('{}','rb').read()), options=[('grpc.ssl_target_name_override','localhost')])\n\
         try:\n    health_pb2_grpc.HealthStub(c).Check(health_pb2.HealthCheckRequest(), timeout=5); sys.exit(0)\n\
         except grpc.RpcError as e:\n    print(e.code()); sys.exit(3)\n",
        site.directory_addr(),
        pki.join("ca.crt").display()
    );
    let out = std::process::Command::new(&python).args(["-c", &code]).output().unwrap();
    assert_eq!(out.status.code(), Some(3), "a client without a certificate must be refused: {}", String::from_utf8_lossy(&out.stderr));
}

const REGISTRATION: &str = "101001/000001"; // commerce's enterprise registration, unconditional
const PENALTIES: &str = "302001/000001"; // commerce's administrative penalties, conditional
const COMPANY: &str = "91350100M000100Y43";

fn quota_rule(consumer: &str, per_second: u32) -> String {
    format!("\n[[quotas]]\nconsumer = \"{consumer}\"\nresource = \"{PENALTIES}\"\nper_second = {per_second}\nburst = {per_second}\n")
}

/// The record exchange as operators and developers use it: `exchangectl records|grants|audit` against the
/// real binaries, the Python example (stock grpcio, stubs generated from proto/), and a quota changed by
/// editing the config and sending SIGHUP.
#[test]
fn records_exchange_and_push_events_through_the_cli_the_python_example_and_a_quota_reload() {
    let site = Site::new();
    site.init_pki();
    site.write_directory_config("directory", 15);
    let _directory = site.start_directory();
    let mut ports = std::collections::HashMap::new();
    let mut nodes = Vec::new();
    for dept in DEPTS {
        let port = free_port();
        ports.insert(dept, port);
        let extra = if dept == "commerce" { quota_rule("quality", 1000) } else { String::new() };
        site.write_node_config(dept, port, &extra);
        let path = site.path(&format!("config/{dept}-node.toml"));
        nodes.push(Proc::start(&format!("{dept}-node"), "exchange-node", &["--config", path.to_str().unwrap()], &site.path(&format!("logs/{dept}-node.log"))));
    }
    for dept in DEPTS {
        wait_for(&format!("{dept} online"), Duration::from_secs(30), || (site.node_status(dept).as_deref() == Some("online")).then_some(()));
    }
    let node = |dept: &str| format!("127.0.0.1:{}", ports[dept]);
    let at = |identity: &str, dept: &str, args: &[&str]| {
        let addr = node(dept);
        let mut all = vec!["--node", addr.as_str()];
        all.extend_from_slice(args);
        site.ctl(identity, &all)
    };
    let at_json = |identity: &str, dept: &str, args: &[&str]| -> Value {
        let (ok, out, err) = at(identity, dept, &[&["--json"], args].concat());
        assert!(ok, "exchangectl {args:?} as {identity} failed:\n{out}\n{err}");
        serde_json::from_str(&out).unwrap_or_else(|e| panic!("not JSON ({e}): {out}"))
    };

    // Commerce loads its records (the catalog may still be on its way to the directory: retry).
    let records = repo_root().join("deploy/local/records");
    for (resource, file) in [(REGISTRATION, "commerce-enterprises.json"), (PENALTIES, "commerce-penalties.json")] {
        let file = records.join(file);
        let out = wait_for("commerce's records stored", Duration::from_secs(30), || {
            let (ok, out, _) = at("commerce-app", "commerce", &["records", "put", "--resource", resource, "--file", file.to_str().unwrap()]);
            ok.then_some(out)
        });
        assert!(out.contains("stored") || out.contains('2') || out.contains('4'), "{out}");
    }
    // A file with a bad record is refused whole, naming the record and the field.
    let bad = site.path("bad-records.json");
    std::fs::write(&bad, format!(r#"[{{"key":"{COMPANY}","items":{{"企业名称":"好的"}}}},{{"key":"91310115MA1H8R7C6D","items":{{"成立日期":"2019-02-30"}}}}]"#)).unwrap();
    let (ok, out, err) = at("commerce-app", "commerce", &["records", "put", "--resource", REGISTRATION, "--file", bad.to_str().unwrap()]);
    assert!(!ok);
    let text = format!("{out}{err}");
    assert!(text.contains("records[1]") && text.contains(".key") && text.contains("成立日期"), "{text}");

    // Tax reads commerce's registration through its own node.
    let answer = at_json("tax-app", "tax", &["records", "get", "--resource", REGISTRATION, COMPANY, "--purpose", "登记信息核对"]);
    assert_eq!(answer["records"][0]["items"]["企业名称"], "福州市闽江数据科技有限公司", "{answer}");
    assert_eq!(answer["provider_code"], "commerce");

    // The Python example, as a tax application, from a clean interpreter with only grpcio and grpcio-tools.
    let python = std::env::var("GX_PYTHON").expect("GX_PYTHON (scripts/test.sh sets it up in .venv)");
    let pki = site.path("pki");
    let out = std::process::Command::new(&python)
        .arg(repo_root().join("client-sdk/examples/python/query_record.py"))
        .args(["--node", &node("tax"), "--ca", pki.join("ca.crt").to_str().unwrap()])
        .args(["--cert", pki.join("tax-app.crt").to_str().unwrap(), "--key", pki.join("tax-app.key").to_str().unwrap()])
        .args(["--resource", REGISTRATION, "--purpose", "python example", COMPANY])
        .output()
        .expect("run the Python example");
    assert!(out.status.success(), "python example failed: {}\n{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
    let doc: Value = serde_json::from_slice(&out.stdout).expect("the example prints JSON");
    assert_eq!(doc["records"][0]["items"]["企业名称"], "福州市闽江数据科技有限公司", "{doc}");
    // ... and a refusal comes back as exit code 2 with the gRPC code.
    let out = std::process::Command::new(&python)
        .arg(repo_root().join("client-sdk/examples/python/query_record.py"))
        .args(["--node", &node("quality"), "--ca", pki.join("ca.crt").to_str().unwrap()])
        .args(["--cert", pki.join("quality-app.crt").to_str().unwrap(), "--key", pki.join("quality-app.key").to_str().unwrap()])
        .args(["--resource", PENALTIES, COMPANY])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2), "{}", String::from_utf8_lossy(&out.stderr));
    assert!(String::from_utf8_lossy(&out.stdout).contains("PERMISSION_DENIED"));

    // The Rust example program, as application developers run it.
    let example = bin_path("examples/query_enterprise");
    let out = std::process::Command::new(&example)
        .args(["--node", &node("tax"), "--ca", pki.join("ca.crt").to_str().unwrap()])
        .args(["--cert", pki.join("tax-app.crt").to_str().unwrap(), "--key", pki.join("tax-app.key").to_str().unwrap()])
        .args([REGISTRATION, COMPANY])
        .output()
        .expect("run the Rust example");
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success() && text.contains("福州市闽江数据科技有限公司"), "{text}\n{}", String::from_utf8_lossy(&out.stderr));

    // Quality is refused, asks, commerce approves fewer items, quality is served those only.
    let (ok, out, err) = at("quality-app", "quality", &["records", "get", "--resource", PENALTIES, COMPANY]);
    assert!(!ok && format!("{out}{err}").contains("grant"), "{out}{err}");
    let grant = at_json(
        "quality-app",
        "quality",
        &["grants", "request", "--resource", PENALTIES, "--items", "统一社会信用代码,当事人名称,罚没金额", "--purpose", "抽查对象信用核查"],
    );
    let id = grant["grant_id"].as_str().or_else(|| grant["grant"]["grant_id"].as_str()).unwrap_or_else(|| panic!("{grant}")).to_string();
    let pending = at_json("commerce-operator", "commerce", &["grants", "list", "--side", "provider", "--status", "pending"]);
    assert!(pending.to_string().contains(&id), "{pending}");
    let (ok, out, err) = at("commerce-operator", "commerce", &["grants", "approve", &id, "--items", "统一社会信用代码,当事人名称"]);
    assert!(ok, "{out}{err}");
    let served = wait_for("quality served after the approval", Duration::from_secs(10), || {
        let (ok, out, _) = at("quality-app", "quality", &["--json", "records", "get", "--resource", PENALTIES, COMPANY]);
        ok.then(|| serde_json::from_str::<Value>(&out).unwrap())
    });
    let items = &served["records"][0]["items"];
    assert!(items.get("当事人名称").is_some() && items.get("罚没金额").is_none(), "{served}");

    // Push: tax subscribes, takes a bulk sync to a file, and receives commerce's deregistration event.
    let (ok, out, err) = at("tax-app", "tax", &["events", "subscribe", "--resource", REGISTRATION]);
    assert!(ok && out.contains("commerce"), "{out}{err}");
    let synced = site.path("tax-enterprises.jsonl");
    let sync = |extra: &[&str]| {
        let mut args = vec!["records", "sync", "--resource", REGISTRATION, "--out", synced.to_str().unwrap(), "--purpose", "初始化"];
        args.extend_from_slice(extra);
        at("tax-app", "tax", &args)
    };
    let (ok, out, err) = sync(&[]);
    assert!(ok && format!("{out}{err}").contains("synced"), "{out}{err}");
    let full = std::fs::read_to_string(&synced).unwrap();
    assert_eq!(full.lines().count(), 4, "{full}");
    // An interrupted sync (two lines and half a third) resumes to the same file.
    let lines: Vec<&str> = full.lines().collect();
    std::fs::write(&synced, format!("{}\n{}\n{}", lines[0], lines[1], &lines[2][..lines[2].len() / 2])).unwrap();
    let (ok, out, err) = sync(&[]);
    assert!(ok, "{out}{err}");
    assert_eq!(std::fs::read_to_string(&synced).unwrap(), full, "the resumed sync equals a whole one");
    let (ok, out, err) = at(
        "commerce-app",
        "commerce",
        &["events", "publish", "--resource", REGISTRATION, "--kind", "deregistered", "--file", records.join("commerce-deregistration.json").to_str().unwrap()],
    );
    assert!(ok, "{out}{err}");
    let event = wait_for("tax's application to receive the deregistration", Duration::from_secs(15), || {
        let (ok, out, _) = at("tax-app", "tax", &["events", "receive", "--resource", REGISTRATION, "--max", "1"]);
        (ok && out.contains("deregistered")).then_some(out)
    });
    let event: Value = serde_json::from_str(event.lines().next().unwrap()).unwrap();
    assert_eq!(event["kind"], "deregistered", "{event}");
    assert_eq!(event["items"]["登记状态"], "注销", "{event}");
    let subs = at_json("commerce-operator", "commerce", &["events", "list"]);
    assert!(subs.to_string().contains("\"tax\""), "{subs}");
    let (ok, out, err) = at("tax-operator", "tax", &["node-status"]);
    assert!(ok && out.to_lowercase().contains("subscri"), "{out}{err}");

    // The quota: edit commerce's config to 1 call per second for quality, SIGHUP, and the second quick call
    // is refused with RESOURCE_EXHAUSTED; no restart.
    let commerce_pid = nodes[1].pid();
    site.write_node_config("commerce", ports["commerce"], &quota_rule("quality", 1));
    let hup = std::process::Command::new("kill").args(["-HUP", &commerce_pid.to_string()]).status().unwrap();
    assert!(hup.success());
    wait_for("the reload to be logged", Duration::from_secs(10), || nodes[1].log_text().contains("configuration reloaded").then_some(()));
    let refused = wait_for("quality to hit the new quota", Duration::from_secs(10), || {
        let runs: Vec<(bool, String)> = (0..3)
            .map(|_| {
                let (ok, out, err) = at("quality-app", "quality", &["records", "get", "--resource", PENALTIES, COMPANY]);
                (ok, format!("{out}{err}"))
            })
            .collect();
        runs.into_iter().find(|(ok, _)| !ok).map(|(_, text)| text)
    });
    assert!(refused.contains("RESOURCE_EXHAUSTED") || refused.to_lowercase().contains("quota"), "{refused}");
    assert!(nodes[1].running(), "the node kept running through the reload");

    // The audit trail: intact, and it has tax's and quality's calls.
    let (ok, out, err) = at("commerce-operator", "commerce", &["audit", "verify"]);
    assert!(ok && out.contains("intact"), "{out}{err}");
    let entries = at_json("commerce-operator", "commerce", &["audit", "query", "--peer", "quality", "--result", "RESOURCE_EXHAUSTED"]);
    assert!(entries.to_string().contains("quality"), "{entries}");
    // The directory lists each node's audit seal key, for checking its trail independently of the node.
    let listed = site.ctl_json("central-operator", &["nodes"]);
    let commerce = listed["nodes"].as_array().unwrap().iter().find(|n| n["department"] == "commerce").unwrap().clone();
    assert_eq!(commerce["audit_verifying_key_hex"].as_str().map(str::len), Some(64), "{commerce}");
    for mut n in nodes {
        assert!(n.stop(), "{} stops cleanly", n.name);
    }
}
