//! `exchangectl status|top|peers|outbox|admin` against the real `directory` and `exchange-node` binaries
//! with admin ports, over HTTPS with the test CA: relayed traffic and a refusal show up in the rates and
//! the totals, a subscription backlog shows up in the outbox, maintenance mode flips readiness, and the
//! admin port lets in an operator certificate of its own department or its token, nothing else.

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use client_sdk::admin::client::{AdminAuth, AdminClient};
use e2e_tests::procs::{free_port, wait_for, Proc};
use serde_json::Value;

const REGISTRATION: &str = "101001/000001"; // commerce's enterprise registration, unconditional
const PENALTIES: &str = "302001/000001"; // commerce's administrative penalties, conditional: needs a grant
const COMPANY: &str = "91350100M000100Y43";
const TOKEN: &str = "ops-cli-test-token-8c41d2a9f0e7b3";

fn repo_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).parent().expect("repo root").to_path_buf()
}

/// What one exchangectl run left behind.
struct Run {
    code: Option<i32>,
    stdout: String,
    stderr: String,
}

impl Run {
    fn ok(&self) -> bool {
        self.code == Some(0)
    }

    fn json(&self) -> Value {
        serde_json::from_str(&self.stdout).unwrap_or_else(|e| panic!("not one JSON document ({e}):\n{}\n{}", self.stdout, self.stderr))
    }
}

/// A directory and the commerce and tax nodes, each with an admin port that one token file opens.
struct Site {
    home: tempfile::TempDir,
    directory_port: u16,
    directory_admin: u16,
    ports: [(u16, u16); 2],
}

const DEPTS: [&str; 2] = ["commerce", "tax"];

impl Site {
    fn new() -> Site {
        let site = Site {
            home: tempfile::tempdir().expect("tempdir"),
            directory_port: free_port(),
            directory_admin: free_port(),
            ports: [(free_port(), free_port()), (free_port(), free_port())],
        };
        for d in ["pki", "config", "data", "logs"] {
            std::fs::create_dir_all(site.path(d)).unwrap();
        }
        std::fs::write(site.path("config/admin.token"), format!("{TOKEN}\n")).unwrap();
        std::fs::write(site.path("config/wrong.token"), "not-the-token-of-this-server\n").unwrap();
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

    fn grpc(&self, dept: &str) -> String {
        format!("127.0.0.1:{}", self.ports[DEPTS.iter().position(|d| *d == dept).unwrap()].0)
    }

    fn admin(&self, dept: &str) -> String {
        match dept {
            "central" => format!("127.0.0.1:{}", self.directory_admin),
            _ => format!("127.0.0.1:{}", self.ports[DEPTS.iter().position(|d| *d == dept).unwrap()].1),
        }
    }

    /// exchangectl with `args` as they are (no identity added).
    fn run(&self, args: &[&str]) -> Run {
        let out = e2e_tests::procs::exchangectl(args);
        Run {
            code: out.status.code(),
            stdout: String::from_utf8_lossy(&out.stdout).into_owned(),
            stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
        }
    }

    /// exchangectl as certificate `identity`, against the admin port of `admin_of`'s server.
    fn ctl(&self, identity: &str, admin_of: &str, args: &[&str]) -> Run {
        let (pki, dir, admin) = (self.pki(), self.directory_addr(), self.admin(admin_of));
        let node = if admin_of == "central" { self.grpc("tax") } else { self.grpc(admin_of) };
        let mut all = vec!["--pki-dir", &pki, "--identity", identity, "--directory", &dir, "--node", &node, "--admin", &admin];
        all.extend_from_slice(args);
        self.run(&all)
    }

    /// exchangectl --json as `identity` that must succeed.
    fn ctl_json(&self, identity: &str, admin_of: &str, args: &[&str]) -> Value {
        let run = self.ctl(identity, admin_of, &[&["--json"], args].concat());
        assert!(run.ok(), "exchangectl {args:?} as {identity} failed ({:?}):\n{}\n{}", run.code, run.stdout, run.stderr);
        run.json()
    }

    /// exchangectl with only the CA and a token file: no certificate at all.
    fn with_token(&self, token_file: &str, admin_of: &str, args: &[&str]) -> Run {
        let (ca, token, admin) = (self.path("pki/ca.crt"), self.path(token_file), self.admin(admin_of));
        let mut all = vec!["--ca", ca.to_str().unwrap(), "--admin-token-file", token.to_str().unwrap(), "--admin", &admin];
        all.extend_from_slice(args);
        self.run(&all)
    }

    fn init_pki(&self) {
        let pki = self.pki();
        assert!(self.run(&["pki", "init", "--dir", &pki]).ok());
        let mut identities = vec![("central", "directory", "directory".to_string()), ("central", "operator", "central-operator".into())];
        for d in DEPTS {
            identities.extend([(d, "node", format!("{d}-node")), (d, "operator", format!("{d}-operator")), (d, "app", format!("{d}-app"))]);
        }
        for (dept, role, name) in identities {
            let run = self.run(&["pki", "issue", "--dir", &pki, "--dept", dept, "--role", role, "--name", &name]);
            assert!(run.ok(), "pki issue {name}: {}", run.stderr);
        }
    }

    /// `[tls]` and `[admin]` of server certificate `cert`; the token file is relative to the config file.
    fn tls_and_admin(&self, cert: &str, admin: &str) -> String {
        let pki = self.path("pki");
        format!(
            "\n[tls]\nca = \"{ca}\"\ncert = \"{crt}\"\nkey = \"{key}\"\n\n[admin]\nlisten = \"{admin}\"\ntoken_file = \"admin.token\"\n",
            ca = pki.join("ca.crt").display(),
            crt = pki.join(format!("{cert}.crt")).display(),
            key = pki.join(format!("{cert}.key")).display(),
        )
    }

    fn start_directory(&self) -> Proc {
        let config = self.path("config/directory.toml");
        let text = format!(
            "listen = \"{addr}\"\ndata_dir = \"{data}\"\nlease_ttl_seconds = 15\n{tables}",
            addr = self.directory_addr(),
            data = self.path("data/directory").display(),
            tables = self.tls_and_admin("directory", &self.admin("central")),
        );
        std::fs::write(&config, text).unwrap();
        let proc = Proc::start("directory", "directory", &["--config", config.to_str().unwrap()], &self.path("logs/directory.log"));
        wait_for("the directory to answer", Duration::from_secs(30), || self.ctl("central-operator", "central", &["whoami"]).ok().then_some(()));
        proc
    }

    fn start_node(&self, dept: &str) -> Proc {
        let config = self.path(&format!("config/{dept}-node.toml"));
        let grpc = self.grpc(dept);
        let text = format!(
            "listen = \"{grpc}\"\nadvertise_address = \"{grpc}\"\ndirectory_address = \"{dir}\"\ndata_dir = \"{data}\"\ncatalog_file = \"{catalog}\"\n{tables}",
            dir = self.directory_addr(),
            data = self.path(&format!("data/{dept}-node")).display(),
            catalog = repo_root().join(format!("deploy/local/catalog/{dept}.toml")).display(),
            tables = self.tls_and_admin(&format!("{dept}-node"), &self.admin(dept)),
        );
        std::fs::write(&config, text).unwrap();
        Proc::start(&format!("{dept}-node"), "exchange-node", &["--config", config.to_str().unwrap()], &self.path(&format!("logs/{dept}-node.log")))
    }

    fn node_online(&self, dept: &str) -> bool {
        let run = self.ctl("central-operator", "central", &["--json", "nodes"]);
        let nodes: Value = if run.ok() { serde_json::from_str(&run.stdout).unwrap_or_default() } else { Value::Null };
        nodes["nodes"].as_array().is_some_and(|list| list.iter().any(|n| n["department"] == dept && n["status"] == "online"))
    }

    /// tax's application asks for a commerce record through the tax node (relayed to commerce).
    fn relayed_query(&self, resource: &str) -> Run {
        self.ctl("tax-app", "tax", &["records", "get", "--resource", resource, COMPANY, "--purpose", "运维测试"])
    }
}

/// tax's application querying commerce's registration in a loop until dropped, so rates have something to
/// measure.
struct Traffic {
    stop: Arc<AtomicBool>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl Traffic {
    fn start(site: &Site) -> Traffic {
        let stop = Arc::new(AtomicBool::new(false));
        let done = Arc::new(AtomicU64::new(0));
        let args: Vec<String> = ["--pki-dir", &site.pki(), "--identity", "tax-app", "--node", &site.grpc("tax")]
            .into_iter()
            .map(String::from)
            .chain(["records", "get", "--resource", REGISTRATION, COMPANY, "--purpose", "运维测试"].map(String::from))
            .collect();
        let thread = {
            let (stop, done) = (stop.clone(), done.clone());
            std::thread::spawn(move || {
                let args: Vec<&str> = args.iter().map(String::as_str).collect();
                while !stop.load(Ordering::Relaxed) {
                    if e2e_tests::procs::exchangectl(&args).status.success() {
                        done.fetch_add(1, Ordering::Relaxed);
                    }
                }
            })
        };
        // Wait for the first call, so a window that opens now sees traffic.
        wait_for("the first background query", Duration::from_secs(20), || (done.load(Ordering::Relaxed) > 0).then_some(()));
        Traffic { stop, thread: Some(thread) }
    }
}

impl Drop for Traffic {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

/// `GET /readyz` without any credential, as a load balancer asks it.
fn probe_readyz(site: &Site, dept: &str) -> (u16, Value) {
    client_sdk::tls::install_crypto_provider();
    let auth = AdminAuth { ca: site.path("pki/ca.crt"), client: None, token: None };
    let client = AdminClient::connect(&site.admin(dept), auth).expect("admin client");
    let runtime = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
    let (status, body) = runtime.block_on(client.get_text("/readyz")).expect("readyz answers");
    (status, serde_json::from_str(&body).unwrap_or_else(|e| panic!("/readyz is not JSON ({e}): {body}")))
}

#[test]
fn status_top_peers_outbox_and_admin_switches_over_the_admin_port() {
    let site = Site::new();
    site.init_pki();
    let _directory = site.start_directory();
    let _commerce = site.start_node("commerce");
    let mut tax = site.start_node("tax");
    for dept in DEPTS {
        wait_for(&format!("{dept} online"), Duration::from_secs(30), || site.node_online(dept).then_some(()));
    }

    // Commerce loads its registrations (its catalog may still be on its way to the directory: retry).
    let file = repo_root().join("deploy/local/records/commerce-enterprises.json");
    wait_for("commerce's records stored", Duration::from_secs(30), || {
        site.ctl("commerce-app", "commerce", &["records", "put", "--resource", REGISTRATION, "--file", file.to_str().unwrap()]).ok().then_some(())
    });
    // Relayed traffic, and a refusal: penalties need a grant tax does not have.
    let first = wait_for("a relayed query answered", Duration::from_secs(20), || {
        let run = site.relayed_query(REGISTRATION);
        run.ok().then_some(run)
    });
    assert!(first.stdout.contains("福州市闽江数据科技有限公司"), "{}", first.stdout);
    let refused = site.relayed_query(PENALTIES);
    assert!(!refused.ok() && format!("{}{}", refused.stdout, refused.stderr).contains("grant"), "{}{}", refused.stdout, refused.stderr);

    // status, with traffic flowing during its window: rates overall and for commerce, the refusal, the
    // directory state, the certificate.
    let traffic = Traffic::start(&site);
    let status = site.ctl_json("tax-operator", "tax", &["status", "--interval-ms", "2000"]);
    assert_eq!(status["server"], "exchange-node", "{status}");
    assert_eq!(status["identity"]["department"], "tax");
    assert_eq!(status["identity"]["name"], "tax-node");
    assert_eq!(status["grpc_address"], site.grpc("tax"));
    assert_eq!(status["readiness"]["ready"], true, "{status}");
    assert_eq!(status["directory"]["registered"], true, "{status}");
    assert_eq!(status["directory"]["stale"], false);
    assert!(status["certificate"]["days_left"].as_i64().unwrap() > 300, "{status}");
    assert!(status["traffic"]["requests"].as_u64().unwrap() >= 2, "{status}");
    assert!(status["traffic"]["refused"].as_u64().unwrap() >= 1, "the refusal is counted: {status}");
    let window = status["rates"]["window_seconds"].as_f64().unwrap();
    assert!((1.5..5.0).contains(&window), "about --interval-ms: {window}");
    assert!(status["rates"]["relayed_out"]["window_requests"].as_u64().unwrap() > 0, "{status}");
    assert!(status["rates"]["by_peer"]["commerce"]["requests_per_second"].as_f64().unwrap() > 0.0, "{status}");
    let commerce = status["peers"].as_array().unwrap().iter().find(|p| p["department"] == "commerce").unwrap_or_else(|| panic!("{status}"));
    assert!(commerce["outbound_requests"].as_u64().unwrap() >= 1, "{commerce}");
    assert_eq!(commerce["status"], "online", "{commerce}");
    assert!(status["recent_refused"].to_string().contains("PERMISSION_DENIED"), "{status}");
    assert!(!status.to_string().contains(COMPANY), "no record key on the admin port: {status}");

    // The same screen as text: one screen, aligned.
    let text = site.ctl("tax-operator", "tax", &["status", "--interval-ms", "500"]);
    assert!(text.ok(), "{}", text.stderr);
    for expected in ["exchange-node tax/tax-node (node)", "ready        yes", "certificate  serial", "directory    127.0.0.1:", "registered, state current", "traffic      served ", "since start", "backlog      outbox", "commerce", "latest refused requests", "PERMISSION_DENIED"] {
        assert!(text.stdout.contains(expected), "`{expected}` missing:\n{}", text.stdout);
    }

    // top: two refreshes as JSON lines, then as text, which has no terminal escapes when piped.
    let top = site.ctl("tax-operator", "tax", &["--json", "top", "--iterations", "2", "--interval", "1"]);
    assert!(top.ok(), "{}", top.stderr);
    let frames: Vec<Value> = top.stdout.lines().map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("{e}: {l}"))).collect();
    assert_eq!(frames.len(), 2, "{}", top.stdout);
    let relayed = |f: &Value| {
        f["rows"].as_array().unwrap().iter().any(|r| {
            r["direction"] == "outbound" && r["peer"] == "commerce" && r["resource"] == REGISTRATION && r["window_requests"].as_u64() > Some(0)
        })
    };
    assert!(frames.iter().any(relayed), "a frame with commerce's registration relayed: {}", top.stdout);
    let rates: Vec<f64> = frames[1]["rows"].as_array().unwrap().iter().map(|r| r["requests_per_second"].as_f64().unwrap()).collect();
    assert!(rates.windows(2).all(|w| w[0] >= w[1]), "busiest first: {rates:?}");
    let top = site.ctl("tax-operator", "tax", &["top", "--iterations", "2", "--interval", "0.5"]);
    assert!(top.ok(), "{}", top.stderr);
    assert!(!top.stdout.contains('\x1b'), "no escape codes when stdout is not a terminal: {:?}", top.stdout);
    assert_eq!(top.stdout.matches("direction  peer").count(), 2, "{}", top.stdout);
    assert!(top.stdout.contains("outbound") && top.stdout.contains(REGISTRATION), "{}", top.stdout);
    drop(traffic);
    // Ctrl-C ends a live top cleanly.
    let (pki, admin) = (site.pki(), site.admin("tax"));
    let log = site.path("logs/top.log");
    let mut live = Proc::start("top", "exchangectl", &["--pki-dir", &pki, "--identity", "tax-operator", "--admin", &admin, "top", "--interval", "0.3"], &log);
    wait_for("a frame of top", Duration::from_secs(20), || std::fs::read_to_string(&log).ok().filter(|t| t.contains("direction  peer")).map(|_| ()));
    let interrupted = std::process::Command::new("kill").args(["-INT", &live.pid().to_string()]).status().unwrap();
    assert!(interrupted.success());
    let status = wait_for("top to exit after Ctrl-C", Duration::from_secs(10), || live.child.as_mut().unwrap().try_wait().unwrap());
    assert!(status.success(), "Ctrl-C is a clean end: {status:?}\n{}", live.log_text());
    live.child = None;

    // peers, on both sides of the relay.
    let peers = site.ctl("tax-operator", "tax", &["peers"]);
    assert!(peers.ok() && peers.stdout.starts_with("peer "), "{}{}", peers.stdout, peers.stderr);
    assert!(peers.stdout.lines().any(|l| l.starts_with("commerce") && l.contains("online")), "{}", peers.stdout);
    let peers = site.ctl_json("commerce-operator", "commerce", &["peers"]);
    let tax_peer = peers["peers"].as_array().unwrap().iter().find(|p| p["department"] == "tax").unwrap_or_else(|| panic!("{peers}"));
    assert!(tax_peer["inbound_requests"].as_u64().unwrap() >= 2, "{tax_peer}");
    assert!(tax_peer["errors"].as_u64().unwrap() >= 1, "the refused relay: {tax_peer}");

    // A subscription backlog: tax subscribes and receives one event its applications have not
    // acknowledged (inbox), then stops; what commerce publishes meanwhile waits in commerce's outbox.
    let run = site.ctl("tax-app", "tax", &["events", "subscribe", "--resource", REGISTRATION]);
    assert!(run.ok(), "{}{}", run.stdout, run.stderr);
    let change = repo_root().join("deploy/local/records/commerce-deregistration.json");
    let publish = || {
        let run = site.ctl("commerce-app", "commerce", &["events", "publish", "--resource", REGISTRATION, "--kind", "deregistered", "--file", change.to_str().unwrap()]);
        assert!(run.ok(), "{}{}", run.stdout, run.stderr);
    };
    publish();
    let inbox = wait_for("tax's inbox to hold the event", Duration::from_secs(20), || {
        let outbox = site.ctl_json("tax-operator", "tax", &["outbox"]);
        let row = outbox["rows"].as_array()?.iter().find(|r| r["side"] == "consumer" && r["resource"] == REGISTRATION)?.clone();
        (row["backlog_events"].as_u64() > Some(0)).then_some(row)
    });
    assert_eq!(inbox["department"], "commerce", "{inbox}");
    let text = site.ctl("tax-operator", "tax", &["outbox"]);
    assert!(text.stdout.contains("inbox: our subscriptions") && text.stdout.contains(REGISTRATION), "{}", text.stdout);
    assert!(tax.stop(), "tax stops cleanly");
    publish();
    publish();
    let row = wait_for("commerce's outbox to hold tax's backlog", Duration::from_secs(20), || {
        let outbox = site.ctl_json("commerce-operator", "commerce", &["outbox"]);
        let row = outbox["rows"].as_array()?.iter().find(|r| r["side"] == "provider" && r["department"] == "tax")?.clone();
        (row["backlog_events"].as_u64() >= Some(2) && row["connected"] == false).then_some(row)
    });
    assert_eq!(row["resource"], REGISTRATION, "{row}");
    let text = site.ctl("commerce-operator", "commerce", &["outbox"]);
    assert!(text.stdout.starts_with("outbox: other departments subscribed to ours"), "{}", text.stdout);
    let line = text.stdout.lines().find(|l| l.starts_with("tax ")).unwrap_or_else(|| panic!("{}", text.stdout));
    assert!(line.contains(REGISTRATION) && line.ends_with("no"), "subscriber tax, not connected: {line}");
    let status = site.ctl_json("commerce-operator", "commerce", &["status", "--interval-ms", "200"]);
    assert!(status["backlog"]["outbox_events"].as_u64().unwrap() >= 2, "{status}");

    // Maintenance with the token file alone (no certificate): readiness flips, for probes too.
    let on = site.with_token("config/admin.token", "commerce", &["--json", "admin", "maintenance", "on"]);
    assert!(on.ok(), "{}{}", on.stdout, on.stderr);
    assert_eq!(on.json()["maintenance"], true, "{}", on.stdout);
    let ready = site.with_token("config/admin.token", "commerce", &["admin", "ready"]);
    assert_eq!(ready.code, Some(1), "not ready exits 1: {}{}", ready.stdout, ready.stderr);
    assert!(ready.stdout.starts_with("NOT READY: maintenance mode is on"), "{}", ready.stdout);
    assert!(ready.stderr.contains("not ready"), "{}", ready.stderr);
    let ready = site.with_token("config/admin.token", "commerce", &["--json", "admin", "ready"]);
    assert_eq!(ready.code, Some(1));
    assert_eq!(ready.json()["ready"], false, "one JSON document, the readiness: {}", ready.stdout);
    let (code, body) = probe_readyz(&site, "commerce");
    assert_eq!((code, &body["maintenance"]), (503, &Value::Bool(true)), "{body}");
    let off = site.ctl("commerce-operator", "commerce", &["admin", "maintenance", "off"]);
    assert!(off.ok() && off.stdout.starts_with("maintenance off"), "{}{}", off.stdout, off.stderr);
    let ready = site.ctl("commerce-operator", "commerce", &["admin", "ready"]);
    assert!(ready.ok() && ready.stdout.starts_with("ready\n"), "{}{}", ready.stdout, ready.stderr);
    assert_eq!(probe_readyz(&site, "commerce").0, 200);

    // Reload with an operator certificate: the same files, so the same certificate.
    let reload = site.ctl("commerce-operator", "commerce", &["admin", "reload"]);
    assert!(reload.ok() && reload.stdout.starts_with("certificate unchanged: serial"), "{}{}", reload.stdout, reload.stderr);

    // Refused: a wrong token, another department's operator; both say what the port takes.
    let wrong = site.with_token("config/wrong.token", "commerce", &["status"]);
    assert_eq!(wrong.code, Some(1), "{}{}", wrong.stdout, wrong.stderr);
    assert!(wrong.stderr.contains("401") && wrong.stderr.contains("--admin-token-file"), "{}", wrong.stderr);
    assert!(!wrong.stderr.contains(TOKEN) && !wrong.stderr.contains("not-the-token"), "tokens are never echoed: {}", wrong.stderr);
    let other = site.ctl("tax-operator", "commerce", &["admin", "maintenance", "on"]);
    assert_eq!(other.code, Some(1), "{}{}", other.stdout, other.stderr);
    assert!(other.stderr.contains("operator certificate"), "{}", other.stderr);
    assert_eq!(probe_readyz(&site, "commerce").0, 200, "the refused switch changed nothing");

    // The directory's admin port: nodes instead of a directory state.
    let status = site.ctl_json("central-operator", "central", &["status", "--interval-ms", "200"]);
    assert_eq!(status["server"], "directory", "{status}");
    assert_eq!(status["identity"]["department"], "central");
    assert!(status["nodes_online"].as_u64().unwrap() + status["nodes_offline"].as_u64().unwrap() >= 2, "{status}");
    let text = site.ctl("central-operator", "central", &["status", "--interval-ms", "200"]);
    assert!(text.stdout.contains("nodes        ") && text.stdout.contains("catalog"), "{}", text.stdout);

    // An admin port nobody listens on: exit status 3.
    let closed = format!("127.0.0.1:{}", free_port());
    let pki = site.pki();
    let run = site.run(&["--pki-dir", &pki, "--identity", "tax-operator", "--admin", &closed, "status"]);
    assert_eq!(run.code, Some(3), "{}{}", run.stdout, run.stderr);
    assert!(run.stderr.contains(&closed), "{}", run.stderr);
}
