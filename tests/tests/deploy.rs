//! `deploy/` checked the way CI can: no network, no Docker daemon, no cluster.
//!
//! - every server config under deploy/ parses with the servers' own config types;
//! - the systemd units carry their hardening, start binaries with flags those binaries have, keep their
//!   data where `StateDirectory=` puts it, and pass `systemd-analyze verify` (where installed);
//! - the Dockerfile copies only what exists and builds the three binaries; the compose file mounts
//!   configs that exist, probes the admin port those configs name, and its PKI script issues every
//!   certificate they name, idempotently;
//! - the Kubernetes manifests reference only ConfigMaps, Secrets and volumes they define, probe
//!   `/healthz` and `/readyz` on the mounted config's admin port, keep data_dir on a claim, run as
//!   non-root; `kubectl kustomize` builds them (where installed);
//! - the highly available variants (compose-ha.yaml, kubernetes-ha/: two directory replicas over one
//!   PostgreSQL) agree the same way, and also on the database: its address, user and password file, the
//!   replicas' names in the one directory certificate, and the nodes' lists of directory addresses;
//! - the compose configs, moved onto loopback, start real servers whose probes answer without
//!   credentials, whose metrics carry the names the dashboard uses, and that survive SIGHUP; the HA
//!   configs start two directory replicas over a real PostgreSQL database and a node that fails over;
//! - Prometheus configs, alert rules (with promtool's unit tests, where installed) and the Grafana
//!   dashboard use only the metric names the servers export.
//!
//! The config-type check and the cross-checks are separate tests on purpose: the first says whether a
//! file is still a valid config for today's servers, the others whether the files agree with each other.

use std::collections::{BTreeMap, BTreeSet};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::Command;

use client_sdk::admin::client::{AdminAuth, AdminClient};
use client_sdk::tls::{TlsIdentity, TlsPaths};
use e2e_tests::procs::{bin_path, wait_for, Proc};
use serde_yaml_ng::Value as Yaml;

fn repo_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).parent().expect("repo root").to_path_buf()
}

fn deploy(rel: &str) -> PathBuf {
    repo_root().join("deploy").join(rel)
}

fn read(path: &Path) -> String {
    std::fs::read_to_string(path).unwrap_or_else(|e| panic!("{}: {e}", path.display()))
}

/// Whether `program` can be run here (found on PATH and answers `--version`).
fn have(program: &str) -> bool {
    Command::new(program).arg("--version").output().is_ok_and(|o| o.status.success())
}

fn skip(what: &str, why: &str) {
    println!("NOTE: skipped {what}: {why}");
}

// ------------------------------------------------------------------------------------------------------
// Server configs, read as plain TOML for the cross-checks (the typed parse is its own test).

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Server {
    Directory,
    Node,
}

impl Server {
    fn binary(self) -> &'static str {
        match self {
            Server::Directory => "directory",
            Server::Node => "exchange-node",
        }
    }

    fn of_binary(name: &str) -> Server {
        match name {
            "directory" => Server::Directory,
            "exchange-node" => Server::Node,
            other => panic!("unexpected server binary {other:?}: expected directory or exchange-node"),
        }
    }
}

/// A server config file as TOML, with the values the deployment files must agree with.
#[derive(Debug)]
struct ServerConfig {
    path: PathBuf,
    server: Server,
    table: toml::Table,
}

impl ServerConfig {
    fn read(path: &Path) -> ServerConfig {
        let table: toml::Table =
            toml::from_str(&read(path)).unwrap_or_else(|e| panic!("{}: not TOML: {e}", path.display()));
        // Only a node has a directory to talk to.
        let server = if table.contains_key("directory_address") { Server::Node } else { Server::Directory };
        ServerConfig { path: path.to_path_buf(), server, table }
    }

    fn str(&self, key: &str) -> &str {
        self.table
            .get(key)
            .and_then(|v| v.as_str())
            .unwrap_or_else(|| panic!("{}: `{key}` missing or not a string", self.path.display()))
    }

    fn admin(&self) -> &toml::Table {
        self.table
            .get("admin")
            .and_then(|v| v.as_table())
            .unwrap_or_else(|| panic!("{}: no [admin] table", self.path.display()))
    }

    fn admin_port(&self) -> u16 {
        let listen = self.admin().get("listen").and_then(|v| v.as_str()).unwrap_or_else(|| {
            panic!("{}: [admin] listen missing", self.path.display());
        });
        listen
            .parse::<SocketAddr>()
            .unwrap_or_else(|e| panic!("{}: [admin] listen = {listen:?}: {e}", self.path.display()))
            .port()
    }

    /// Probes without credentials (kubelets, compose, load balancers) need this; it defaults to true.
    fn open_probes(&self) -> bool {
        self.admin().get("open_probes").map(|v| v.as_bool() == Some(true)).unwrap_or(true)
    }

    fn grpc_port(&self) -> u16 {
        port_of(self.str("listen"), &self.path)
    }

    fn data_dir(&self) -> &str {
        self.str("data_dir")
    }

    /// `[store.postgres]` of a directory whose `[store] backend` is PostgreSQL.
    fn postgres(&self) -> Option<&toml::Table> {
        let store = self.table.get("store")?.as_table()?;
        if store.get("backend").and_then(|v| v.as_str()) != Some("postgres") {
            return None;
        }
        let postgres = store.get("postgres").and_then(|v| v.as_table());
        Some(
            postgres
                .unwrap_or_else(|| panic!("{}: backend = \"postgres\" without [store.postgres]", self.path.display())),
        )
    }

    /// `[store.postgres] url` parsed, of a directory on PostgreSQL.
    fn postgres_url(&self) -> Option<PostgresUrl> {
        let url = self.postgres()?.get("url").and_then(|v| v.as_str()).expect("[store.postgres] url");
        Some(PostgresUrl::parse(url, &self.path))
    }

    /// `[store.postgres] password_file`, of a directory on PostgreSQL that has one.
    fn password_file(&self) -> Option<&str> {
        self.postgres()?.get("password_file").and_then(|v| v.as_str())
    }

    /// A node's directory replicas: `directory_address` as one address, a comma-separated list, or an array.
    fn directory_addresses(&self) -> Vec<String> {
        let at = self.path.display();
        match self.table.get("directory_address") {
            Some(toml::Value::String(list)) => list.split(',').map(|a| a.trim().to_string()).collect(),
            Some(toml::Value::Array(items)) => items
                .iter()
                .map(|v| v.as_str().unwrap_or_else(|| panic!("{at}: directory_address holds {v:?}")).to_string())
                .collect(),
            other => panic!("{at}: directory_address is {other:?}"),
        }
    }

    fn tls_files(&self) -> Vec<String> {
        let tls = self.table.get("tls").and_then(|v| v.as_table()).expect("[tls]");
        ["ca", "cert", "key"]
            .iter()
            .map(|k| {
                tls.get(*k)
                    .and_then(|v| v.as_str())
                    .unwrap_or_else(|| panic!("{}: [tls] {k} missing", self.path.display()))
                    .to_string()
            })
            .collect()
    }

    /// How long the server may take to stop after SIGTERM: the node's shutdown_grace_seconds, the
    /// directory's fixed 30 s drain.
    fn stop_seconds(&self) -> u64 {
        match self.server {
            Server::Node => self
                .table
                .get("shutdown_grace_seconds")
                .and_then(|v| v.as_integer())
                .map(|v| v as u64)
                .unwrap_or(exchange_node::config::DEFAULT_SHUTDOWN_GRACE_SECONDS),
            Server::Directory => 30,
        }
    }
}

/// `postgresql://USER@HOST:PORT/DATABASE`, the form the shipped configs use.
#[derive(Debug)]
struct PostgresUrl {
    user: String,
    host: String,
    port: u16,
    database: String,
}

impl PostgresUrl {
    fn parse(url: &str, context: &Path) -> PostgresUrl {
        let at = context.display();
        let rest = url
            .strip_prefix("postgresql://")
            .or_else(|| url.strip_prefix("postgres://"))
            .unwrap_or_else(|| panic!("{at}: url {url:?} is not postgresql://USER@HOST:PORT/DATABASE"));
        let (authority, database) =
            rest.split_once('/').unwrap_or_else(|| panic!("{at}: url {url:?} names no database"));
        let (user, host_port) = authority.split_once('@').unwrap_or_else(|| panic!("{at}: url {url:?} names no user"));
        // Configs are copied, logged and committed: the password lives in password_file only.
        assert!(!user.contains(':'), "{at}: url {url:?} carries a password; use password_file");
        let database = database.split('?').next().unwrap().to_string();
        let (host, port) = match host_port.rsplit_once(':') {
            Some((h, p)) => (h.to_string(), p.parse().unwrap_or_else(|_| panic!("{at}: url {url:?}: port"))),
            None => (host_port.to_string(), 5432),
        };
        PostgresUrl { user: user.to_string(), host, port, database }
    }
}

fn port_of(host_port: &str, context: &Path) -> u16 {
    host_port
        .rsplit_once(':')
        .and_then(|(_, p)| p.parse().ok())
        .unwrap_or_else(|| panic!("{}: {host_port:?} is not host:port", context.display()))
}

fn host_of(host_port: &str) -> &str {
    host_port.rsplit_once(':').map(|(h, _)| h).unwrap_or(host_port)
}

/// Whether `path` is `dir` or inside it (paths as written, absolute, `/`-separated).
fn is_within(path: &str, dir: &str) -> bool {
    let dir = dir.trim_end_matches('/');
    path == dir || path.starts_with(&format!("{dir}/"))
}

/// Every server config under deploy/: all TOML files except the sample catalogs in deploy/local/.
fn server_configs() -> Vec<PathBuf> {
    fn walk(dir: &Path, out: &mut Vec<PathBuf>) {
        for entry in std::fs::read_dir(dir).unwrap_or_else(|e| panic!("{}: {e}", dir.display())) {
            let path = entry.expect("dir entry").path();
            if path.is_dir() {
                // Catalog files, not server configs; client_sdk's tests check them.
                if path != deploy("local") {
                    walk(&path, out);
                }
            } else if path.extension().is_some_and(|e| e == "toml") {
                out.push(path);
            }
        }
    }
    let mut out = Vec::new();
    walk(&repo_root().join("deploy"), &mut out);
    out.sort();
    out
}

#[test]
fn every_server_config_under_deploy_parses_with_the_real_config_types() {
    let configs = server_configs();
    let names: BTreeSet<String> =
        configs.iter().map(|p| p.strip_prefix(repo_root().join("deploy")).unwrap().display().to_string()).collect();
    for expected in [
        "config/directory.example.toml",
        "config/node.example.toml",
        "systemd/directory.toml",
        "systemd/node-tax.toml",
        "docker/config/directory.toml",
        "docker/config/tax.toml",
        "docker/config/commerce.toml",
        "docker/config/quality.toml",
        "kubernetes/config/directory.toml",
        "kubernetes/config/node-tax.toml",
        "config/directory-postgres.example.toml",
        "docker/config/directory-ha.toml",
        "docker/config/tax-ha.toml",
        "docker/config/commerce-ha.toml",
        "docker/config/quality-ha.toml",
        "kubernetes-ha/config/directory.toml",
        "kubernetes-ha/config/node-tax.toml",
    ] {
        assert!(names.contains(expected), "deploy/{expected} is gone; found {names:?}");
    }
    let mut failures = Vec::new();
    for path in &configs {
        let plain = ServerConfig::read(path);
        let outcome = match plain.server {
            Server::Directory => {
                directory::config::Config::from_file(path).map_err(|e| e.to_string()).and_then(|typed| {
                    // What the TOML says is what the server makes of it: a PostgreSQL store, or sled.
                    let on_postgres = typed.store.backend == directory::config::StoreBackend::Postgres;
                    match (plain.postgres().is_some(), on_postgres, typed.store.postgres.as_ref()) {
                        (true, true, Some(pg)) if pg.password_file.is_some() == plain.password_file().is_some() => {
                            Ok(())
                        }
                        (false, false, None) => Ok(()),
                        other => Err(format!("the store the server reads is not the one written: {other:?}")),
                    }
                })
            }
            Server::Node => exchange_node::config::Config::load(path).map(|_| ()).map_err(|e| e.to_string()),
        };
        if let Err(e) = outcome {
            failures.push(format!("{}: {e}", path.display()));
        }
    }
    assert!(failures.is_empty(), "configs the servers refuse:\n{}", failures.join("\n"));
}

#[test]
fn postgres_example_shows_every_store_option_the_directory_accepts() {
    // serde lists the keys it accepts when it refuses an unknown one: the list stays current by itself.
    let probe = "listen = \"x:1\"\n[tls]\nca = \"a\"\ncert = \"b\"\nkey = \"c\"\n[store]\nbackend = \"postgres\"\n\
                 [store.postgres]\nurl = \"postgresql://u@h/d\"\nnot_an_option = 1\n";
    let refused = directory::config::Config::from_toml_str(probe).expect_err("an unknown key").to_string();
    let accepted = refused.split_once("expected").map(|(_, keys)| keys).unwrap_or_else(|| panic!("{refused}"));
    let keys: Vec<&str> = accepted.split('`').skip(1).step_by(2).collect();
    assert!(keys.contains(&"url") && keys.contains(&"password_file"), "{refused}");
    let example = read(&deploy("config/directory-postgres.example.toml"));
    let section = example.split("\n[store.postgres]\n").nth(1).expect("a [store.postgres] table in the example");
    for key in keys {
        let shown = section
            .lines()
            .map(|l| l.trim_start_matches('#').trim())
            .any(|l| l.starts_with(&format!("{key} =")) || l.starts_with(&format!("[store.postgres.{key}]")));
        assert!(shown, "config/directory-postgres.example.toml does not show [store.postgres] {key}");
    }
}

#[test]
fn deployment_configs_open_their_probes_and_use_distinct_ports() {
    for path in server_configs() {
        if is_within(&path.display().to_string(), &deploy("config").display().to_string()) {
            continue; // the commented examples predate the admin port and need not have one
        }
        let config = ServerConfig::read(&path);
        assert!(config.open_probes(), "{}: probes without credentials need open_probes = true", path.display());
        assert_ne!(config.admin_port(), config.grpc_port(), "{}: admin and gRPC on one port", path.display());
        if config.postgres().is_some() {
            // Replicas keep nothing locally; a data_dir here would suggest otherwise.
            assert!(!config.table.contains_key("data_dir"), "{}: data_dir with the PostgreSQL store", path.display());
            let password = config.password_file().unwrap_or_else(|| panic!("{}: no password_file", path.display()));
            assert!(password.starts_with('/'), "{}: password_file should be absolute", path.display());
            config.postgres_url();
        } else {
            assert!(config.data_dir().starts_with('/'), "{}: data_dir should be absolute", path.display());
        }
    }
}

// ------------------------------------------------------------------------------------------------------
// systemd

/// A unit file: section → key → every value given (a key may repeat).
struct Unit {
    path: PathBuf,
    sections: BTreeMap<String, BTreeMap<String, Vec<String>>>,
}

impl Unit {
    fn read(path: &Path) -> Unit {
        let mut sections: BTreeMap<String, BTreeMap<String, Vec<String>>> = BTreeMap::new();
        let mut current = None;
        for (n, line) in read(path).lines().enumerate() {
            let line = line.trim();
            if line.is_empty() || line.starts_with('#') || line.starts_with(';') {
                continue;
            }
            assert!(!line.ends_with('\\'), "{}:{}: keep unit lines unbroken", path.display(), n + 1);
            if let Some(name) = line.strip_prefix('[').and_then(|l| l.strip_suffix(']')) {
                current = Some(name.to_string());
                sections.entry(name.to_string()).or_default();
                continue;
            }
            let (key, value) =
                line.split_once('=').unwrap_or_else(|| panic!("{}:{}: not key=value", path.display(), n + 1));
            let section = current.clone().unwrap_or_else(|| panic!("{}: key before any section", path.display()));
            sections
                .entry(section)
                .or_default()
                .entry(key.trim().to_string())
                .or_default()
                .push(value.trim().to_string());
        }
        Unit { path: path.to_path_buf(), sections }
    }

    fn values(&self, key: &str) -> &[String] {
        self.sections.get("Service").and_then(|s| s.get(key)).map(|v| v.as_slice()).unwrap_or(&[])
    }

    fn one(&self, key: &str) -> &str {
        match self.values(key) {
            [v] => v,
            [] => panic!("{}: [Service] {key}= missing", self.path.display()),
            many => panic!("{}: [Service] {key}= given {} times", self.path.display(), many.len()),
        }
    }
}

/// Parses systemd's `45s`, `1min 30s`, `2m` (the forms used here) into seconds.
fn systemd_seconds(value: &str) -> u64 {
    value
        .split_whitespace()
        .map(|part| {
            let digits: String = part.chars().take_while(|c| c.is_ascii_digit()).collect();
            let n: u64 = digits.parse().unwrap_or_else(|_| panic!("time span {value:?}"));
            match &part[digits.len()..] {
                "" | "s" | "sec" => n,
                "m" | "min" => n * 60,
                "h" => n * 3600,
                unit => panic!("time span {value:?}: unit {unit:?}"),
            }
        })
        .sum()
}

/// Every `--flag` the binary's `--help` lists.
fn help_flags(binary: &str) -> BTreeSet<String> {
    let out = Command::new(bin_path(binary)).arg("--help").output().expect("run --help");
    assert!(out.status.success(), "{binary} --help failed");
    String::from_utf8_lossy(&out.stdout)
        .split(|c: char| c.is_whitespace() || c == ',' || c == '[' || c == ']' || c == '=' || c == '<')
        .filter(|w| w.starts_with("--") && w.len() > 2)
        .map(|w| w.to_string())
        .collect()
}

/// (unit file, instance for a template, the config file it starts with, as shipped in deploy/systemd).
const UNITS: [(&str, Option<&str>, &str); 2] = [
    ("gov-exchange-directory.service", None, "directory.toml"),
    ("gov-exchange-node@.service", Some("tax"), "node-tax.toml"),
];

#[test]
fn systemd_units_are_hardened_and_start_the_real_binaries_with_real_flags() {
    for (file, instance, shipped_config) in UNITS {
        let unit = Unit::read(&deploy("systemd").join(file));
        let at = unit.path.display().to_string();
        let expand = |s: &str| match instance {
            Some(i) => s.replace("%i", i),
            None => s.to_string(),
        };

        for (key, want) in [
            ("NoNewPrivileges", "yes"),
            ("ProtectSystem", "strict"),
            ("ProtectHome", "yes"),
            ("PrivateTmp", "yes"),
            ("PrivateDevices", "yes"),
            ("MemoryDenyWriteExecute", "yes"),
            ("RestrictAddressFamilies", "AF_INET AF_INET6 AF_UNIX"),
            ("RestrictNamespaces", "yes"),
            ("RestrictSUIDSGID", "yes"),
            ("LockPersonality", "yes"),
            ("ProtectKernelTunables", "yes"),
            ("ProtectKernelModules", "yes"),
            ("ProtectControlGroups", "yes"),
            ("SystemCallArchitectures", "native"),
            ("CapabilityBoundingSet", ""),
            ("AmbientCapabilities", ""),
            ("Restart", "on-failure"),
            ("ExecReload", "/bin/kill -HUP $MAINPID"),
        ] {
            assert_eq!(unit.one(key), want, "{at}: {key}=");
        }
        assert!(
            unit.values("SystemCallFilter").iter().any(|v| v == "@system-service"),
            "{at}: SystemCallFilter=@system-service"
        );
        let user = unit.values("User").first().map(String::as_str);
        assert!(
            unit.values("DynamicUser").iter().any(|v| v == "yes") || user.is_some_and(|u| u != "root" && u != "0"),
            "{at}: DynamicUser=yes or a dedicated User="
        );

        // ExecStart: a real binary, with flags it has, and the config shipped beside the unit.
        let exec = unit.one("ExecStart");
        let words: Vec<&str> = exec.split_whitespace().collect();
        let binary = Path::new(words[0]).file_name().unwrap().to_str().unwrap();
        let server = Server::of_binary(binary);
        let flags = help_flags(binary);
        for flag in words.iter().filter(|w| w.starts_with("--")) {
            let flag = flag.split('=').next().unwrap();
            assert!(flags.contains(flag), "{at}: {binary} has no {flag} (its --help lists {flags:?})");
        }
        let config_arg = words
            .iter()
            .position(|w| *w == "--config" || *w == "-c")
            .map(|i| expand(words[i + 1]))
            .unwrap_or_else(|| panic!("{at}: ExecStart without --config"));
        assert_eq!(
            Path::new(&config_arg).file_name().unwrap().to_str().unwrap(),
            shipped_config,
            "{at}: starts with {config_arg}, but deploy/systemd ships {shipped_config}"
        );
        let config = ServerConfig::read(&deploy("systemd").join(shipped_config));
        assert_eq!(config.server, server, "{}: a {binary} config", config.path.display());

        // StateDirectory= is the only writable place under ProtectSystem=strict: the store must be there.
        let state = format!("/var/lib/{}", expand(unit.one("StateDirectory")));
        assert!(
            is_within(config.data_dir(), &state),
            "{}: data_dir {} is outside the unit's StateDirectory {state}",
            config.path.display(),
            config.data_dir()
        );
        for tls in config.tls_files() {
            assert!(is_within(&tls, "/etc/gov-exchange"), "{}: {tls} outside /etc/gov-exchange", config.path.display());
        }
        let stop = systemd_seconds(unit.one("TimeoutStopSec"));
        assert!(
            stop > config.stop_seconds(),
            "{at}: TimeoutStopSec={stop}s must exceed the server's {}s drain",
            config.stop_seconds()
        );
    }
}

#[test]
fn systemd_analyze_verify_accepts_the_units() {
    if !have("systemd-analyze") {
        return skip("systemd-analyze verify", "systemd-analyze is not installed");
    }
    // verify checks that ExecStart's binary exists, so the copies start the binaries built for the tests.
    let dir = tempfile::tempdir().expect("tempdir");
    let mut files = Vec::new();
    for (file, instance, _) in UNITS {
        let text = read(&deploy("systemd").join(file))
            .replace("/usr/local/bin/directory", &bin_path("directory").display().to_string())
            .replace("/usr/local/bin/exchange-node", &bin_path("exchange-node").display().to_string());
        let name = match instance {
            Some(i) => file.replace("@.", &format!("@{i}.")),
            None => file.to_string(),
        };
        let path = dir.path().join(&name);
        std::fs::write(&path, text).unwrap();
        files.push(path);
    }
    let out = Command::new("systemd-analyze").arg("verify").args(&files).output().expect("run systemd-analyze");
    let said = format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
    assert!(out.status.success(), "systemd-analyze verify failed:\n{said}");
    // Unknown keys and similar are only warnings to systemd, with the exit status still 0.
    let about_ours: Vec<&str> =
        said.lines().filter(|l| files.iter().any(|f| l.contains(f.file_name().unwrap().to_str().unwrap()))).collect();
    assert!(about_ours.is_empty(), "systemd-analyze verify warns about the units:\n{}", about_ours.join("\n"));
    if !said.trim().is_empty() {
        println!("systemd-analyze verify (not about these units):\n{said}");
    }
}

// ------------------------------------------------------------------------------------------------------
// Docker

/// The Dockerfile's instructions, continuation lines joined, comments dropped.
fn dockerfile_instructions(path: &Path) -> Vec<(String, String)> {
    let mut out = Vec::new();
    let mut pending = String::new();
    for line in read(path).lines() {
        let trimmed = line.trim();
        if pending.is_empty() && (trimmed.is_empty() || trimmed.starts_with('#')) {
            continue;
        }
        if let Some(head) = trimmed.strip_suffix('\\') {
            pending.push_str(head);
            pending.push(' ');
            continue;
        }
        pending.push_str(trimmed);
        let (op, rest) = pending.split_once(char::is_whitespace).unwrap_or((pending.as_str(), ""));
        out.push((op.to_uppercase(), rest.trim().to_string()));
        pending.clear();
    }
    out
}

#[test]
fn dockerfile_copies_only_existing_paths_and_builds_the_three_binaries() {
    let path = deploy("docker/Dockerfile");
    let instructions = dockerfile_instructions(&path);
    let ignored: Vec<String> = read(&deploy("docker/Dockerfile.dockerignore"))
        .lines()
        .map(str::trim)
        .filter(|l| !l.is_empty() && !l.starts_with('#'))
        .map(|l| l.trim_start_matches("**/").trim_end_matches('/').to_string())
        .collect();

    let froms: Vec<&str> = instructions.iter().filter(|(op, _)| op == "FROM").map(|(_, r)| r.as_str()).collect();
    assert_eq!(froms.len(), 2, "a builder and a runtime stage: {froms:?}");
    assert!(froms[0].starts_with("rust:1-bookworm "), "builder: {}", froms[0]);
    let builder = froms[0].split_whitespace().last().unwrap();
    assert!(froms[1].starts_with("debian:bookworm-slim"), "runtime: {}", froms[1]);

    let mut copied_sources = BTreeSet::new();
    let mut runtime_binaries = BTreeSet::new();
    let mut stage = 0;
    let mut user = None;
    for (op, rest) in &instructions {
        match op.as_str() {
            "FROM" => stage += 1,
            "USER" => user = Some(rest.clone()),
            "COPY" | "ADD" => {
                let words: Vec<&str> = rest.split_whitespace().collect();
                let from = words.iter().find_map(|w| w.strip_prefix("--from="));
                let args: Vec<&str> = words.iter().copied().filter(|w| !w.starts_with("--")).collect();
                let (dest, sources) = args.split_last().expect("COPY src... dest");
                match from {
                    None => {
                        for src in sources {
                            let src = src.trim_end_matches('/');
                            assert!(repo_root().join(src).exists(), "{}: COPY {src}: no such path", path.display());
                            assert!(
                                !ignored.iter().any(|i| src == i || src.starts_with(&format!("{i}/"))),
                                "{}: COPY {src} is excluded by Dockerfile.dockerignore",
                                path.display()
                            );
                            copied_sources.insert(src.to_string());
                        }
                    }
                    Some(stage_name) => {
                        assert_eq!(stage_name, builder, "COPY --from={stage_name}");
                        if stage == 2 && *dest == "/usr/local/bin/" {
                            for src in sources {
                                runtime_binaries
                                    .insert(Path::new(src).file_name().unwrap().to_str().unwrap().to_string());
                            }
                        }
                    }
                }
            }
            _ => {}
        }
    }
    let build = instructions
        .iter()
        .find(|(op, rest)| op == "RUN" && rest.contains("cargo build"))
        .map(|(_, r)| r.as_str())
        .expect("a RUN cargo build");
    assert!(build.contains("cargo build --release --locked --bins"), "build command: {build}");

    // `cargo build --locked` in the image needs the manifest, the lock file and every workspace member.
    let manifest: toml::Table = toml::from_str(&read(&repo_root().join("Cargo.toml"))).unwrap();
    let members = manifest["workspace"]["members"].as_array().expect("workspace members");
    for needed in members.iter().map(|m| m.as_str().unwrap()).chain(["Cargo.toml", "Cargo.lock"]) {
        assert!(copied_sources.contains(needed), "the Dockerfile does not COPY {needed}: {copied_sources:?}");
    }
    let wanted: BTreeSet<String> = ["directory", "exchange-node", "exchangectl"].map(String::from).into();
    assert_eq!(runtime_binaries, wanted, "binaries copied into the runtime image");
    for binary in &wanted {
        bin_path(binary); // a binary of the workspace (panics with a hint if it was not built)
    }
    let user = user.expect("USER in the runtime stage");
    assert!(!user.starts_with("root") && !user.starts_with("0"), "runs as {user}");
}

/// The compose files, the gov-exchange servers each starts (directory replicas first) and its other
/// services besides the one-shot `pki`.
const COMPOSE_FILES: [(&str, &[&str], &[&str]); 2] = [
    ("compose.yaml", &["directory", "tax", "commerce", "quality"], &[]),
    ("compose-ha.yaml", &["directory-a", "directory-b", "tax", "commerce", "quality"], &["postgres"]),
];

fn compose(file: &str) -> Yaml {
    let mut doc: Yaml = serde_yaml_ng::from_str(&read(&deploy("docker").join(file)))
        .unwrap_or_else(|e| panic!("{file} is not YAML: {e}"));
    doc.apply_merge().unwrap_or_else(|e| panic!("{file} merge keys: {e}"));
    doc
}

fn yaml_str(v: &Yaml) -> &str {
    v.as_str().unwrap_or_else(|| panic!("expected a string, got {v:?}"))
}

fn yaml_strs(v: &Yaml) -> Vec<String> {
    v.as_sequence()
        .unwrap_or_else(|| panic!("expected a list, got {v:?}"))
        .iter()
        .map(|s| yaml_str(s).to_string())
        .collect()
}

/// A compose short-form volume `SOURCE:TARGET[:ro]`.
struct ComposeMount {
    source: String,
    target: String,
    read_only: bool,
}

impl ComposeMount {
    fn is_named_volume(&self) -> bool {
        !self.source.starts_with('.') && !self.source.starts_with('/')
    }
}

fn compose_mounts(service: &Yaml) -> Vec<ComposeMount> {
    yaml_strs(&service["volumes"])
        .iter()
        .map(|v| {
            let parts: Vec<&str> = v.split(':').collect();
            ComposeMount {
                source: parts[0].to_string(),
                target: parts[1].to_string(),
                read_only: parts.get(2) == Some(&"ro"),
            }
        })
        .collect()
}

/// Where the container path `path` of `service` is kept: the named volume mounted over it (the deepest
/// mount wins) and the path inside that volume.
fn on_volume<'m>(mounts: &'m [ComposeMount], path: &str) -> Option<(&'m ComposeMount, String)> {
    mounts
        .iter()
        .filter(|m| m.is_named_volume() && is_within(path, &m.target))
        .max_by_key(|m| m.target.len())
        .map(|m| (m, path[m.target.trim_end_matches('/').len()..].trim_start_matches('/').to_string()))
}

/// The gov-exchange server a compose service runs, and its config (found through the bind mount of the
/// `--config` file).
fn compose_server(service: &Yaml, at: &str) -> (Server, ServerConfig) {
    let command = yaml_strs(&service["command"]);
    let server = Server::of_binary(&command[0]);
    let target = &command[command.iter().position(|w| w == "--config").unwrap_or_else(|| panic!("{at}: --config")) + 1];
    let mounts = compose_mounts(service);
    let mount =
        mounts.iter().find(|m| &m.target == target).unwrap_or_else(|| panic!("{at}: nothing mounted at {target}"));
    let config = ServerConfig::read(&deploy("docker").join(&mount.source));
    assert_eq!(config.server, server, "{at}: {} is not a {} config", mount.source, server.binary());
    (server, config)
}

/// A compose service's `environment`, as a map.
fn compose_env(service: &Yaml) -> BTreeMap<String, String> {
    service["environment"]
        .as_mapping()
        .into_iter()
        .flatten()
        .map(|(k, v)| (yaml_str(k).to_string(), yaml_str(v).to_string()))
        .collect()
}

#[test]
fn compose_files_mount_real_configs_and_check_their_admin_ports() {
    for (file, servers, others) in COMPOSE_FILES {
        check_compose_file(file, servers, others);
    }
}

fn check_compose_file(file: &str, servers: &[&str], others: &[&str]) {
    let doc = compose(file);
    let services = doc["services"].as_mapping().expect("services");
    let declared_volumes: BTreeSet<String> =
        doc["volumes"].as_mapping().expect("volumes").keys().map(|k| yaml_str(k).to_string()).collect();
    let names: BTreeSet<&str> = services.keys().map(yaml_str).collect();
    let expected: BTreeSet<&str> = ["pki"].iter().chain(servers).chain(others).copied().collect();
    assert_eq!(names, expected, "{file}: services");

    // The PKI service runs the script the image carries.
    let pki = &doc["services"]["pki"];
    assert_eq!(yaml_strs(&pki["command"]), ["gx-pki-init"], "{file}");
    assert!(
        read(&deploy("docker/Dockerfile")).contains("COPY deploy/docker/pki-init.sh /usr/local/bin/gx-pki-init"),
        "the image must carry gx-pki-init"
    );
    let pki_mount = compose_mounts(pki).into_iter().find(|m| m.source == "pki").expect("pki volume on pki");
    assert!(!pki_mount.read_only, "{file}");

    let mut data_volumes = BTreeSet::new();
    let mut host_ports = BTreeSet::new();
    let mut directories = Vec::new();
    let mut nodes = Vec::new();
    for name in servers.iter().chain(others) {
        for published in yaml_strs_opt(&doc["services"][*name]["ports"]) {
            let parts: Vec<&str> = published.split(':').collect();
            assert_eq!(parts.len(), 3, "{file} {name}: publish as 127.0.0.1:HOST:CONTAINER, not {published}");
            assert_eq!(parts[0], "127.0.0.1", "{file} {name}: {published} is published beyond this host");
            assert!(host_ports.insert(parts[1].to_string()), "{file} {name}: host port {} taken twice", parts[1]);
        }
    }
    for name in servers {
        let service = &doc["services"][*name];
        let at = format!("{file} service {name}");
        let (server, config) = compose_server(service, &at);
        let mounts = compose_mounts(service);
        for m in &mounts {
            if m.is_named_volume() {
                assert!(declared_volumes.contains(&m.source), "{at}: volume {} not declared", m.source);
            } else {
                assert!(deploy("docker").join(&m.source).is_file(), "{at}: bind mount {} does not exist", m.source);
                assert!(m.read_only, "{at}: {} should be mounted read-only", m.source);
            }
        }

        // Certificates on the pki volume, read-only; the store on a writable volume of its own.
        let pki = mounts.iter().find(|m| m.source == "pki").unwrap_or_else(|| panic!("{at}: no pki volume"));
        assert!(pki.read_only, "{at}: the pki volume should be read-only here");
        for tls in config.tls_files() {
            assert!(is_within(&tls, &pki.target), "{at}: {tls} is not on the pki volume ({})", pki.target);
        }
        if config.postgres().is_some() {
            // The store is the database: a replica writes no volume, so any number can run.
            let writable: Vec<&str> =
                mounts.iter().filter(|m| m.is_named_volume() && !m.read_only).map(|m| m.source.as_str()).collect();
            assert!(writable.is_empty(), "{at}: a PostgreSQL replica with writable volumes {writable:?}");
        } else {
            let data = mounts
                .iter()
                .find(|m| m.is_named_volume() && m.source != "pki" && is_within(config.data_dir(), &m.target))
                .unwrap_or_else(|| panic!("{at}: data_dir {} is on no volume", config.data_dir()));
            assert!(!data.read_only, "{at}: the data volume is read-only");
            assert!(
                data_volumes.insert(data.source.clone()),
                "{at}: volume {} shared with another server",
                data.source
            );
        }
        if let Some(catalog) = config.table.get("catalog_file").and_then(|v| v.as_str()) {
            assert!(mounts.iter().any(|m| m.target == catalog), "{at}: catalog_file {catalog} is not mounted");
        }

        // The health check asks the admin port the config opens, and the ports are published as configured.
        let admin = config.admin_port();
        assert!(config.open_probes(), "{at}: the health check presents no credentials");
        let check = yaml_strs(&service["healthcheck"]["test"]).join(" ");
        assert!(
            check.contains(&format!("https://localhost:{admin}/readyz"))
                || check.contains(&format!("https://localhost:{admin}/healthz")),
            "{at}: health check {check:?} does not ask https://localhost:{admin}/readyz"
        );
        let cafile = &config.tls_files()[0];
        assert!(check.contains(&format!("--cacert {cafile}")), "{at}: health check should verify with {cafile}");
        let ports = yaml_strs(&service["ports"]);
        for port in [config.grpc_port(), admin] {
            assert!(ports.iter().any(|p| p.ends_with(&format!(":{port}"))), "{at}: port {port} not published");
        }
        assert_eq!(service["depends_on"]["pki"]["condition"].as_str(), Some("service_completed_successfully"), "{at}");
        let stop = systemd_seconds(yaml_str(&service["stop_grace_period"]));
        assert!(
            stop > config.stop_seconds(),
            "{at}: stop_grace_period {stop}s cuts the {}s drain",
            config.stop_seconds()
        );
        assert_eq!(service["read_only"].as_bool(), Some(true), "{at}: read_only root filesystem");
        assert!(yaml_strs(&service["cap_drop"]).contains(&"ALL".to_string()), "{at}: cap_drop ALL");

        match server {
            Server::Directory => directories.push((name.to_string(), config.grpc_port())),
            Server::Node => nodes.push((name, config)),
        }
    }
    assert!(!directories.is_empty(), "{file}: no directory service");
    // Nodes find every directory replica and each other by service name, on the ports they listen on,
    // and start once every replica is ready.
    let replica_addresses: Vec<String> = directories.iter().map(|(name, port)| format!("{name}:{port}")).collect();
    for (name, config) in &nodes {
        assert_eq!(config.directory_addresses(), replica_addresses, "{file} {name}: directory_address");
        assert_eq!(config.str("advertise_address"), format!("{name}:{}", config.grpc_port()), "{file} {name}");
        for (directory, _) in &directories {
            let condition = doc["services"][**name]["depends_on"][directory.as_str()]["condition"].as_str();
            assert_eq!(condition, Some("service_healthy"), "{file} {name}: start once {directory} is ready");
        }
    }
}

#[test]
fn compose_ha_replicas_share_one_postgres_database_and_its_password() {
    let file = "compose-ha.yaml";
    let doc = compose(file);
    let postgres = &doc["services"]["postgres"];
    let at = format!("{file} service postgres");

    // The official image at a pinned major version: a new major needs pg_upgrade, never a silent pull.
    let image = yaml_str(&postgres["image"]);
    let tag = image.strip_prefix("postgres:").unwrap_or_else(|| panic!("{at}: {image} is not the official image"));
    let major = tag.split(['-', '.']).next().unwrap();
    assert!(major.parse::<u32>().is_ok(), "{at}: {image} does not pin a major version");

    let env = compose_env(postgres);
    for literal in ["POSTGRES_PASSWORD", "PGPASSWORD"] {
        assert!(!env.contains_key(literal), "{at}: {literal} puts the password in the compose file");
    }
    let mounts = compose_mounts(postgres);
    let password_path = &env["POSTGRES_PASSWORD_FILE"];
    let (password_mount, password_in_volume) =
        on_volume(&mounts, password_path).unwrap_or_else(|| panic!("{at}: {password_path} is on no volume"));
    assert!(password_mount.read_only, "{at}: the password volume should be read-only");
    let password_at = (password_mount.source.clone(), password_in_volume);

    // The data on a named volume of its own, in a folder below its root (initdb needs to own it).
    let pgdata = env.get("PGDATA").map(String::as_str).unwrap_or("/var/lib/postgresql/data");
    let (data_mount, data_in_volume) =
        on_volume(&mounts, pgdata).unwrap_or_else(|| panic!("{at}: PGDATA is on no volume"));
    assert!(!data_mount.read_only && data_mount.source != password_at.0, "{at}: PGDATA on {}", data_mount.source);
    assert!(!data_in_volume.is_empty(), "{at}: PGDATA should be a folder below the volume's root");
    let user = postgres["user"].as_str().unwrap_or("postgres");
    assert!(!["0", "root"].contains(&user.split(':').next().unwrap()), "{at}: runs as root");
    assert_eq!(postgres["read_only"].as_bool(), Some(true), "{at}: read_only root filesystem");
    assert!(yaml_strs(&postgres["cap_drop"]).contains(&"ALL".to_string()), "{at}: cap_drop ALL");
    assert_eq!(postgres["depends_on"]["pki"]["condition"].as_str(), Some("service_completed_successfully"), "{at}");

    // Healthy once it accepts TCP connections to the directory's database as the directory's user.
    let check = yaml_strs(&postgres["healthcheck"]["test"]);
    assert_eq!(check[..2], ["CMD", "pg_isready"], "{at}: health check");
    let flag = |f: &str| check.iter().position(|w| w == f).map(|i| check[i + 1].clone());
    assert!(flag("-h").is_some(), "{at}: pg_isready over TCP (-h), as the directories connect");
    let (user_name, database) = (&env["POSTGRES_USER"], &env["POSTGRES_DB"]);
    assert_eq!(flag("-U").as_ref(), Some(user_name), "{at}: pg_isready -U");
    assert_eq!(flag("-d").as_ref(), Some(database), "{at}: pg_isready -d");
    let port: u16 = flag("-p").map(|p| p.parse().unwrap()).unwrap_or(5432);

    // The pki service writes the password where postgres and the directories read it.
    let pki = &doc["services"]["pki"];
    let pki_env = compose_env(pki);
    let pki_mounts = compose_mounts(pki);
    let written = &pki_env["DB_PASSWORD_FILE"];
    let (written_mount, written_in_volume) =
        on_volume(&pki_mounts, written).unwrap_or_else(|| panic!("{file} pki: {written} is on no volume"));
    assert_eq!((written_mount.source.clone(), written_in_volume), password_at, "{file} pki: DB_PASSWORD_FILE");

    let mut replicas = BTreeSet::new();
    for (name, service) in doc["services"].as_mapping().unwrap() {
        let name = yaml_str(name);
        if name == "pki" || name == "postgres" {
            continue;
        }
        let at = format!("{file} service {name}");
        let (server, config) = compose_server(service, &at);
        if server != Server::Directory {
            continue;
        }
        replicas.insert(name.to_string());
        let url = config.postgres_url().unwrap_or_else(|| panic!("{at}: not on PostgreSQL"));
        assert_eq!((url.host.as_str(), url.port), ("postgres", port), "{at}: url names the postgres service");
        assert_eq!((&url.user, &url.database), (user_name, database), "{at}: url user and database");
        let password = config.password_file().unwrap_or_else(|| panic!("{at}: no password_file"));
        let mounts = compose_mounts(service);
        let (mount, in_volume) =
            on_volume(&mounts, password).unwrap_or_else(|| panic!("{at}: {password} on no volume"));
        assert!(mount.read_only, "{at}: the password volume should be read-only");
        assert_eq!((mount.source.clone(), in_volume), password_at, "{at}: password_file is not postgres's password");
        assert_eq!(service["depends_on"]["postgres"]["condition"].as_str(), Some("service_healthy"), "{at}");
    }
    assert!(replicas.len() >= 2, "{file}: two directory replicas, found {replicas:?}");
    // All replicas present the one directory certificate: it must name each.
    let hosts: BTreeSet<String> = pki_env["DIRECTORY_HOSTS"].split_whitespace().map(String::from).collect();
    assert_eq!(hosts, replicas, "{file} pki: DIRECTORY_HOSTS");
}

/// Runs a deploy script with the test build's exchangectl first on PATH.
fn run_script(script: &Path, args: &[&str], env: &[(&str, &str)]) -> String {
    let bin_dir = bin_path("exchangectl").parent().unwrap().to_path_buf();
    let path = format!("{}:{}", bin_dir.display(), std::env::var("PATH").unwrap_or_default());
    let out =
        Command::new("sh").arg(script).args(args).env("PATH", path).envs(env.iter().copied()).output().expect("run sh");
    let said = format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
    assert!(out.status.success(), "{} failed:\n{said}", script.display());
    said
}

/// Every file below `dir` (path relative to it → content).
fn snapshot(dir: &Path) -> BTreeMap<String, Vec<u8>> {
    fn walk(base: &Path, dir: &Path, out: &mut BTreeMap<String, Vec<u8>>) {
        for entry in std::fs::read_dir(dir).unwrap() {
            let p = entry.unwrap().path();
            if p.is_dir() {
                walk(base, &p, out);
            } else {
                out.insert(p.strip_prefix(base).unwrap().display().to_string(), std::fs::read(&p).unwrap());
            }
        }
    }
    let mut out = BTreeMap::new();
    walk(dir, dir, &mut out);
    out
}

fn file_mode(path: &Path) -> u32 {
    std::os::unix::fs::PermissionsExt::mode(&std::fs::metadata(path).unwrap().permissions()) & 0o777
}

/// Checks `cert` (issued by the CA in `ca`) for the host name `host` as a TLS client does.
fn certificate_valid_for(cert: &Path, ca: &Path, host: &str) -> Result<(), String> {
    use rustls::client::danger::ServerCertVerifier;
    use rustls::pki_types::{pem::PemObject, CertificateDer, ServerName, UnixTime};
    let mut roots = rustls::RootCertStore::empty();
    roots
        .add(CertificateDer::from_pem_file(ca).map_err(|e| format!("{}: {e}", ca.display()))?)
        .map_err(|e| e.to_string())?;
    let provider = std::sync::Arc::new(rustls::crypto::ring::default_provider());
    let verifier = rustls::client::WebPkiServerVerifier::builder_with_provider(std::sync::Arc::new(roots), provider)
        .build()
        .map_err(|e| e.to_string())?;
    let leaf = CertificateDer::from_pem_file(cert).map_err(|e| format!("{}: {e}", cert.display()))?;
    let name = ServerName::try_from(host.to_string()).map_err(|e| format!("{host}: {e}"))?;
    verifier.verify_server_cert(&leaf, &[], &name, &[], UnixTime::now()).map(|_| ()).map_err(|e| e.to_string())
}

#[test]
fn compose_pki_script_writes_every_file_the_services_read_and_keeps_them() {
    for (file, servers, others) in COMPOSE_FILES {
        check_pki_script(file, servers, others);
    }
}

fn check_pki_script(file: &str, servers: &[&str], others: &[&str]) {
    let doc = compose(file);
    let pki_service = &doc["services"]["pki"];
    let work = tempfile::tempdir().expect("tempdir");
    // Each named volume is a folder here; container paths on a volume map into its folder.
    let volumes = work.path().join("volumes");
    let local = |service: &Yaml, path: &str, at: &str| -> PathBuf {
        let mounts = compose_mounts(service);
        let (mount, inside) = on_volume(&mounts, path).unwrap_or_else(|| panic!("{at}: {path} is on no volume"));
        volumes.join(&mount.source).join(inside)
    };
    let env: Vec<(String, String)> = compose_env(pki_service)
        .into_iter()
        .map(|(key, value)| {
            let moved = match on_volume(&compose_mounts(pki_service), &value) {
                Some(_) => local(pki_service, &value, "pki").display().to_string(),
                None => value,
            };
            (key, moved)
        })
        .collect();
    let env_refs: Vec<(&str, &str)> = env.iter().map(|(k, v)| (k.as_str(), v.as_str())).collect();
    let script = deploy("docker/pki-init.sh");

    let first = run_script(&script, &[], &env_refs);
    assert!(first.contains("CA created"), "{file}: {first}");
    let mut directories = Vec::new();
    let mut password_files = BTreeSet::new();
    for name in servers.iter().chain(others) {
        let service = &doc["services"][*name];
        let at = format!("{file} service {name}");
        let needed: Vec<String> = if service["command"].is_null() {
            // A third-party image (postgres): the files its environment points at.
            compose_env(service).into_iter().filter(|(k, _)| k.ends_with("_FILE")).map(|(_, v)| v).collect()
        } else {
            let (server, config) = compose_server(service, &at);
            if server == Server::Directory {
                let tls = config.tls_files();
                directories.push((name.to_string(), local(service, &tls[1], &at), local(service, &tls[0], &at)));
            }
            config.tls_files().into_iter().chain(config.password_file().map(String::from)).collect()
        };
        for path in needed {
            let here = local(service, &path, &at);
            assert!(here.is_file(), "{at}: the pki service did not write {path} ({})", here.display());
            if path.ends_with(".key") || !path.ends_with(".crt") {
                assert_eq!(file_mode(&here) & 0o077, 0, "{at}: {path} should be private to its owner");
            }
            if !path.ends_with(".key") && !path.ends_with(".crt") {
                password_files.insert(here);
            }
        }
    }
    for password in &password_files {
        let text = read(password);
        assert!(text.len() >= 32 && text.chars().all(|c| c.is_ascii_hexdigit()), "{file}: password {text:?}");
    }
    // Every replica presents the one directory certificate: clients dial it by each replica's name.
    for (name, cert, ca) in &directories {
        if let Err(e) = certificate_valid_for(cert, ca, name) {
            panic!("{file}: the directory certificate is not valid for {name}: {e}");
        }
    }
    if let Some((_, cert, ca)) = directories.first() {
        assert!(certificate_valid_for(cert, ca, "elsewhere.example").is_err(), "the name check checks nothing");
    }

    // Every `docker compose up` runs it again: nothing may change.
    let before = snapshot(&volumes);
    let second = run_script(&script, &[], &env_refs);
    assert!(
        second.contains("CA kept") && !second.contains("issued") && !second.contains("created"),
        "{file}: {second}"
    );
    assert_eq!(snapshot(&volumes), before, "{file}: a second run changed the volumes");
}

/// The compose config `file` made runnable here: the same settings, with the container's paths moved
/// into `home` and its addresses onto loopback ports (`ports`: gRPC, admin; `directory`: the
/// directory's gRPC address, for a node).
fn localize(file: &str, home: &Path, ports: (u16, u16), directory: Option<&str>) -> PathBuf {
    let name = file.trim_end_matches(".toml");
    localize_as(file, name, home, ports, directory.map(toml::Value::from), None)
}

/// [`localize`] for any compose config: written as `home/config/NAME.toml` (one file may run several
/// replicas), `directory` as the node's `directory_address` (a string or a list), and `database` (url,
/// password file) for a directory on PostgreSQL.
fn localize_as(
    file: &str,
    name: &str,
    home: &Path,
    ports: (u16, u16),
    directory: Option<toml::Value>,
    database: Option<(&str, &Path)>,
) -> PathBuf {
    let shipped = ServerConfig::read(&deploy("docker/config").join(file));
    let mut table = shipped.table.clone();
    let moved =
        |path: &str, under: &str| home.join(under).join(Path::new(path).file_name().unwrap()).display().to_string();
    table.insert("listen".into(), format!("127.0.0.1:{}", ports.0).into());
    if table.contains_key("data_dir") {
        table.insert("data_dir".into(), moved(shipped.data_dir(), "data").into());
    }
    let admin = table.get_mut("admin").and_then(|a| a.as_table_mut()).expect("[admin]");
    admin.insert("listen".into(), format!("127.0.0.1:{}", ports.1).into());
    let tls = table.get_mut("tls").and_then(|t| t.as_table_mut()).expect("[tls]");
    for key in ["ca", "cert", "key"] {
        let path = tls[key].as_str().unwrap().to_string();
        tls.insert(key.into(), moved(&path, "pki").into());
    }
    if let Some(directory) = directory {
        let dept = file.trim_end_matches(".toml").trim_end_matches("-ha");
        table.insert("directory_address".into(), directory);
        table.insert("advertise_address".into(), format!("127.0.0.1:{}", ports.0).into());
        let catalog = deploy("local/catalog").join(format!("{dept}.toml"));
        table.insert("catalog_file".into(), catalog.display().to_string().into());
    }
    if let Some((url, password_file)) = database {
        let store = table.get_mut("store").and_then(|s| s.as_table_mut()).expect("[store]");
        let postgres = store.get_mut("postgres").and_then(|p| p.as_table_mut()).expect("[store.postgres]");
        postgres.insert("url".into(), url.into());
        postgres.insert("password_file".into(), password_file.display().to_string().into());
    }
    let path = home.join("config").join(format!("{name}.toml"));
    std::fs::create_dir_all(path.parent().unwrap()).unwrap();
    std::fs::write(&path, toml::to_string(&table).unwrap()).unwrap();
    path
}

/// The metric families in a Prometheus exposition, histogram series folded into their family.
fn exported_families(text: &str) -> BTreeSet<String> {
    text.lines()
        .filter(|l| l.starts_with("gx_"))
        .flat_map(|l| metric_names(l.split(['{', ' ']).next().unwrap()))
        .collect()
}

#[test]
fn shipped_compose_configs_start_real_servers_that_answer_their_probes_and_survive_reload() {
    let home = tempfile::tempdir().expect("tempdir");
    let pki = home.path().join("pki");
    let pki_str = pki.display().to_string();
    run_script(&deploy("docker/pki-init.sh"), &[], &[("PKI_DIR", pki_str.as_str()), ("DEPARTMENTS", "tax")]);
    std::fs::create_dir_all(home.path().join("logs")).unwrap();
    let (dir_grpc, dir_admin, node_grpc, node_admin) = (
        e2e_tests::procs::free_port(),
        e2e_tests::procs::free_port(),
        e2e_tests::procs::free_port(),
        e2e_tests::procs::free_port(),
    );
    let directory_config = localize("directory.toml", home.path(), (dir_grpc, dir_admin), None);
    let directory_address = format!("127.0.0.1:{dir_grpc}");
    let node_config = localize("tax.toml", home.path(), (node_grpc, node_admin), Some(&directory_address));

    let mut directory = Proc::start(
        "directory",
        "directory",
        &["--config", &directory_config.display().to_string()],
        &home.path().join("logs/directory.log"),
    );
    let mut node = Proc::start(
        "tax node",
        "exchange-node",
        &["--config", &node_config.display().to_string()],
        &home.path().join("logs/tax.log"),
    );

    let runtime = tokio::runtime::Runtime::new().expect("runtime");
    let client = |port: u16, operator: Option<&str>| {
        let client = operator.map(|name| TlsIdentity::load(&TlsPaths::in_dir(&pki, name)).expect("operator identity"));
        AdminClient::connect(&format!("127.0.0.1:{port}"), AdminAuth { ca: pki.join("ca.crt"), client, token: None })
            .expect("admin client")
            .with_timeout(std::time::Duration::from_secs(5))
    };
    let get =
        |port: u16, operator: Option<&str>, path: &str| runtime.block_on(client(port, operator).get_text(path)).ok();

    // What the compose health checks and the kubelet ask, without credentials.
    let doc = compose("compose.yaml");
    for (service, port) in [("directory", dir_admin), ("tax", node_admin)] {
        let check = yaml_strs(&doc["services"][service]["healthcheck"]["test"]).join(" ");
        let path = &check[check.rfind('/').expect("a URL path")..];
        wait_for(&format!("{service} {path} answers 200"), std::time::Duration::from_secs(40), || {
            get(port, None, path).filter(|(status, _)| *status == 200)
        });
        let (status, body) = get(port, None, "/healthz").expect("healthz");
        assert_eq!((status, body.trim()), (200, "ok"), "{service} /healthz");
        let (status, _) = get(port, None, "/metrics").expect("metrics");
        assert_eq!(status, 401, "{service}: /metrics without credentials");
    }

    // The families the dashboard and the alerts rely on from the first scrape on.
    let always = [
        "gx_ready",
        "gx_maintenance",
        "gx_build_info",
        "gx_uptime_seconds",
        "gx_store_size_bytes",
        "gx_certificate_expiry_days",
    ];
    for (what, port, operator, extra) in [
        (
            "directory",
            dir_admin,
            "central-operator",
            &["gx_directory_nodes", "gx_catalog_entries", "gx_requests_total", "gx_request_duration_seconds"][..],
        ),
        (
            "tax node",
            node_admin,
            "tax-operator",
            &["gx_directory_state_age_seconds", "gx_directory_state_stale", "gx_directory_staleness_bound_seconds"][..],
        ),
    ] {
        let (status, text) = get(port, Some(operator), "/metrics").expect("metrics");
        assert_eq!(status, 200, "{what} /metrics as {operator}: {text}");
        let families = exported_families(&text);
        for family in always.iter().chain(extra) {
            assert!(METRICS.contains(family), "{family} is not in the test's list of exported metrics");
            assert!(families.contains(*family), "{what} does not export {family}; it exports {families:?}");
        }
    }

    // ExecReload= sends SIGHUP: the servers reload and keep running.
    for proc in [&directory, &node] {
        let status = Command::new("kill").args(["-HUP", &proc.pid().to_string()]).status().expect("kill -HUP");
        assert!(status.success());
    }
    std::thread::sleep(std::time::Duration::from_secs(1));
    assert!(directory.running(), "the directory died of SIGHUP:\n{}", directory.log_text());
    assert!(node.running(), "the node died of SIGHUP:\n{}", node.log_text());
    for port in [dir_admin, node_admin] {
        assert_eq!(get(port, None, "/healthz").map(|(s, _)| s), Some(200), "healthz after SIGHUP");
    }
    // SIGTERM, as systemd, compose and the kubelet stop them: a clean exit within the stop timeout.
    assert!(node.stop(), "the node did not stop cleanly:\n{}", node.log_text());
    assert!(directory.stop(), "the directory did not stop cleanly:\n{}", directory.log_text());
}

/// The node `dept` as the directory at `directory` lists it (`exchangectl nodes --json` as the central
/// operator), if it does.
fn listed_node(pki: &Path, directory: &str, dept: &str) -> Option<serde_json::Value> {
    let pki = pki.display().to_string();
    let out = e2e_tests::procs::exchangectl(&[
        "--pki-dir",
        &pki,
        "--identity",
        "central-operator",
        "--directory",
        directory,
        "--timeout",
        "5",
        "nodes",
        "--json",
    ]);
    if !out.status.success() {
        return None;
    }
    let view: serde_json::Value = serde_json::from_slice(&out.stdout).ok()?;
    view["nodes"].as_array()?.iter().find(|n| n["department"] == dept).cloned()
}

#[test]
fn shipped_ha_configs_run_two_directory_replicas_over_postgres_and_the_node_fails_over() {
    let database = e2e_tests::postgres::TestPostgres::shared().fresh_database();
    let home = tempfile::tempdir().expect("tempdir");
    let pki = home.path().join("pki");
    let password_file = home.path().join("db-secret/db-password");
    // The compose file's PKI: the directory certificate names both replicas, and a database password.
    let hosts = compose_env(&compose("compose-ha.yaml")["services"]["pki"])["DIRECTORY_HOSTS"].clone();
    let (pki_str, password_str) = (pki.display().to_string(), password_file.display().to_string());
    let env = [
        ("PKI_DIR", pki_str.as_str()),
        ("DEPARTMENTS", "tax"),
        ("DIRECTORY_HOSTS", hosts.as_str()),
        ("DB_PASSWORD_FILE", password_str.as_str()),
    ];
    run_script(&deploy("docker/pki-init.sh"), &[], &env);
    std::fs::create_dir_all(home.path().join("logs")).unwrap();

    let free = e2e_tests::procs::free_port;
    let replicas = [("directory-a", free(), free()), ("directory-b", free(), free())];
    let mut configs = Vec::new();
    for (name, grpc, admin) in replicas {
        let config =
            localize_as("directory-ha.toml", name, home.path(), (grpc, admin), None, Some((&database, &password_file)));
        // Leases of 3 s (heartbeats every second) instead of 15, so that the test waits for beats briefly.
        let mut table: toml::Table = toml::from_str(&read(&config)).unwrap();
        table.insert("lease_ttl_seconds".into(), 3.into());
        std::fs::write(&config, toml::to_string(&table).unwrap()).unwrap();
        configs.push(config);
    }
    let addresses: Vec<String> = replicas.iter().map(|(_, grpc, _)| format!("127.0.0.1:{grpc}")).collect();
    let (node_grpc, node_admin) = (free(), free());
    let node_config =
        localize_as("tax-ha.toml", "tax", home.path(), (node_grpc, node_admin), Some(addresses.clone().into()), None);

    let start_replica = |i: usize, log: &str| {
        let name = replicas[i].0;
        let log = home.path().join(format!("logs/{name}-{log}.log"));
        Proc::start(name, "directory", &["--config", &configs[i].display().to_string()], &log)
    };
    // Both at once on the empty database: one runs the migrations, the other finds them done.
    let mut running: Vec<Proc> = (0..2).map(|i| start_replica(i, "first")).collect();
    let runtime = tokio::runtime::Runtime::new().expect("runtime");
    let ready = |port: u16| {
        let client = AdminClient::connect(
            &format!("127.0.0.1:{port}"),
            AdminAuth { ca: pki.join("ca.crt"), client: None, token: None },
        )
        .expect("admin client")
        .with_timeout(std::time::Duration::from_secs(5));
        runtime.block_on(client.get_text("/readyz")).ok().filter(|(status, _)| *status == 200)
    };
    for (i, (name, _, admin)) in replicas.iter().enumerate() {
        wait_for(&format!("{name} /readyz (its database check included)"), std::time::Duration::from_secs(60), || {
            assert!(running[i].running(), "{name} exited:\n{}", running[i].log_text());
            ready(*admin)
        });
    }
    let mut node = Proc::start(
        "tax node",
        "exchange-node",
        &["--config", &node_config.display().to_string()],
        &home.path().join("logs/tax.log"),
    );
    wait_for("tax /readyz", std::time::Duration::from_secs(60), || ready(node_admin));

    // One registration, seen through either replica.
    for address in &addresses {
        wait_for(&format!("tax ONLINE through {address}"), std::time::Duration::from_secs(30), || {
            listed_node(&pki, address, "tax").filter(|n| n["status"] == "online")
        });
    }

    // Each replica in turn goes away (one of them is the replica the node uses): a crash, then a stop.
    // The node's heartbeats then reach the other one, and so does exchangectl given both addresses.
    let both = addresses.join(",");
    for (i, crash) in [(0, true), (1, false)] {
        let (name, _, admin) = replicas[i];
        if crash {
            running[i].kill();
        } else {
            assert!(running[i].stop(), "{name} did not stop cleanly:\n{}", running[i].log_text());
        }
        let gone_at = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().as_millis() as i64;
        let other = &addresses[1 - i];
        wait_for(
            &format!("a heartbeat after {name} went, through {other}"),
            std::time::Duration::from_secs(30),
            || {
                listed_node(&pki, other, "tax").filter(|n| {
                    n["last_heartbeat_unix_ms"].as_i64().is_some_and(|t| t > gone_at) && n["status"] == "online"
                })
            },
        );
        assert!(listed_node(&pki, &both, "tax").is_some(), "exchangectl --directory {both} with {name} down");
        assert!(node.running(), "the node died when {name} went:\n{}", node.log_text());
        assert!(ready(node_admin).is_some(), "the node is not ready with {name} down:\n{}", node.log_text());
        // Back again, from the database alone (no local state): the next round takes the other away.
        running[i] = start_replica(i, "again");
        wait_for(&format!("{name} ready again"), std::time::Duration::from_secs(60), || ready(admin));
        assert!(listed_node(&pki, &addresses[i], "tax").is_some(), "{name} restarted without the node's registration");
    }
    assert!(node.stop(), "the node did not stop cleanly:\n{}", node.log_text());
    for (i, replica) in running.iter_mut().enumerate() {
        assert!(replica.stop(), "{} did not stop cleanly:\n{}", replicas[i].0, replica.log_text());
    }
}

// ------------------------------------------------------------------------------------------------------
// Kubernetes

/// The kustomize sets: the base, and the highly available directory as an overlay of it.
const KUSTOMIZATIONS: [&str; 2] = ["kubernetes", "kubernetes-ha"];

/// Every YAML document of a file (`---`-separated), empty ones dropped.
fn yaml_documents(path: &Path) -> Vec<Yaml> {
    let text = read(path);
    let mut docs = Vec::new();
    let mut current = String::new();
    for line in text.lines().chain(std::iter::once("---")) {
        if line.trim_end() == "---" {
            if !current.trim().is_empty() {
                let doc: Yaml =
                    serde_yaml_ng::from_str(&current).unwrap_or_else(|e| panic!("{}: not YAML: {e}", path.display()));
                if !doc.is_null() {
                    docs.push(doc);
                }
            }
            current.clear();
        } else {
            current.push_str(line);
            current.push('\n');
        }
    }
    docs
}

/// Generator entries (`KEY=FILE` or `FILE`) of a kustomize ConfigMap/Secret: key → file, below `dir`.
fn generator_files(entry: &Yaml, dir: &Path) -> BTreeMap<String, PathBuf> {
    yaml_strs(&entry["files"])
        .into_iter()
        .map(|f| match f.split_once('=') {
            Some((k, v)) => (k.to_string(), dir.join(v)),
            None => (Path::new(&f).file_name().unwrap().to_string_lossy().into_owned(), dir.join(&f)),
        })
        .collect()
}

/// The manifests as a kustomization assembles them.
#[derive(Default)]
struct Kustomized {
    namespace: String,
    objects: Vec<Yaml>,
    /// ConfigMap name → key → file (generated ones; literal ones have empty paths).
    config_maps: BTreeMap<String, BTreeMap<String, PathBuf>>,
    /// Secret name → keys.
    secrets: BTreeMap<String, BTreeSet<String>>,
    /// The files the secretGenerators read: written by the scripts beside them, never committed.
    secret_files: BTreeSet<PathBuf>,
}

/// deploy/`folder` assembled as kustomize does, for what these files use: resources (files and bases),
/// generators (a `behavior: replace` one must replace a base's), and patches, each of which must find its
/// target. Where kubectl is installed, `kubectl kustomize` is compared with this.
fn kustomized(folder: &str) -> Kustomized {
    kustomize_dir(&deploy(folder))
}

fn kustomize_dir(dir: &Path) -> Kustomized {
    let at = dir.join("kustomization.yaml");
    let k: Yaml = serde_yaml_ng::from_str(&read(&at)).unwrap_or_else(|e| panic!("{}: {e}", at.display()));
    let at = at.display();
    let mut out = Kustomized { namespace: yaml_str(&k["namespace"]).to_string(), ..Kustomized::default() };
    for resource in yaml_strs(&k["resources"]) {
        let path = dir.join(&resource);
        if path.is_dir() {
            let base = kustomize_dir(&path);
            assert_eq!(base.namespace, out.namespace, "{at}: base {resource} is for another namespace");
            out.objects.extend(base.objects);
            out.config_maps.extend(base.config_maps);
            out.secrets.extend(base.secrets);
            out.secret_files.extend(base.secret_files);
        } else {
            assert!(path.is_file(), "{at}: resource {resource} does not exist");
            out.objects.extend(yaml_documents(&path));
        }
    }
    for entry in k["configMapGenerator"].as_sequence().into_iter().flatten() {
        let name = yaml_str(&entry["name"]).to_string();
        let files = generator_files(entry, dir);
        for file in files.values() {
            assert!(file.is_file(), "{at}: configMapGenerator {name}: no file {}", file.display());
        }
        let behavior = entry["behavior"].as_str().unwrap_or("create");
        match (behavior, out.config_maps.contains_key(&name)) {
            ("create", false) => {}
            ("replace" | "merge", true) => {}
            (behavior, exists) => panic!("{at}: configMapGenerator {name}: behavior {behavior}, base has it: {exists}"),
        }
        if behavior == "merge" {
            out.config_maps.get_mut(&name).unwrap().extend(files);
        } else {
            out.config_maps.insert(name, files);
        }
    }
    for entry in k["secretGenerator"].as_sequence().into_iter().flatten() {
        let name = yaml_str(&entry["name"]).to_string();
        let files = generator_files(entry, dir);
        let behavior = entry["behavior"].as_str().unwrap_or("create");
        assert_eq!(behavior == "create", !out.secrets.contains_key(&name), "{at}: secretGenerator {name}: {behavior}");
        out.secret_files.extend(files.values().cloned());
        out.secrets.insert(name, files.keys().cloned().collect());
    }
    for patch in k["patches"].as_sequence().into_iter().flatten() {
        let file = dir.join(yaml_str(&patch["path"]));
        assert!(patch["target"].is_null(), "{at}: patches name their target inside the file");
        for doc in yaml_documents(&file) {
            apply_patch(&mut out.objects, &doc, &file);
        }
    }
    for o in &out.objects {
        let name = yaml_str(&o["metadata"]["name"]).to_string();
        match yaml_str(&o["kind"]) {
            "ConfigMap" => {
                let keys = o["data"]
                    .as_mapping()
                    .map(|m| m.keys().map(|k| (yaml_str(k).to_string(), PathBuf::new())).collect());
                out.config_maps.insert(name, keys.unwrap_or_default());
            }
            "Secret" => {
                let keys = ["data", "stringData"]
                    .iter()
                    .filter_map(|f| o[*f].as_mapping())
                    .flat_map(|m| m.keys().map(|k| yaml_str(k).to_string()))
                    .collect();
                out.secrets.insert(name, keys);
            }
            _ => {}
        }
    }
    out
}

/// A strategic-merge patch of one object (or its deletion, `$patch: delete`); the target must exist.
fn apply_patch(objects: &mut Vec<Yaml>, patch: &Yaml, from: &Path) {
    let (kind, name) = (yaml_str(&patch["kind"]), yaml_str(&patch["metadata"]["name"]));
    let position = objects
        .iter()
        .position(|o| o["kind"].as_str() == Some(kind) && o["metadata"]["name"].as_str() == Some(name))
        .unwrap_or_else(|| panic!("{}: patches {kind} {name}, which is not among the resources", from.display()));
    if patch["$patch"].as_str() == Some("delete") {
        objects.remove(position);
    } else {
        strategic_merge(&mut objects[position], patch, &format!("{}: {kind} {name}", from.display()));
    }
}

/// Strategic merge as Kubernetes does it for the fields patched here: maps merge key by key; lists of
/// objects merge element by element on `name` (volume mounts on `mountPath`), with `$patch: delete`
/// removing the element, which must exist; anything else is replaced.
fn strategic_merge(target: &mut Yaml, patch: &Yaml, at: &str) {
    fn merge_key(item: &Yaml) -> Option<(&'static str, Yaml)> {
        ["name", "mountPath"].into_iter().find_map(|k| item.get(k).map(|v| (k, v.clone())))
    }
    match (target, patch) {
        (Yaml::Mapping(t), Yaml::Mapping(p)) => {
            for (key, value) in p {
                match t.get_mut(key) {
                    Some(existing) => strategic_merge(existing, value, at),
                    None => {
                        t.insert(key.clone(), value.clone());
                    }
                }
            }
        }
        (Yaml::Sequence(t), Yaml::Sequence(p)) if p.iter().all(|item| merge_key(item).is_some()) => {
            for item in p {
                let (key, value) = merge_key(item).unwrap();
                let position = t.iter().position(|e| e.get(key) == Some(&value));
                if item.get("$patch").and_then(|v| v.as_str()) == Some("delete") {
                    let i = position.unwrap_or_else(|| panic!("{at}: deletes {key} {value:?}, which is not there"));
                    t.remove(i);
                } else if let Some(i) = position {
                    strategic_merge(&mut t[i], item, at);
                } else {
                    t.push(item.clone());
                }
            }
        }
        (t, p) => *t = p.clone(),
    }
}

impl Kustomized {
    fn named(&self, kind: &str) -> BTreeMap<String, &Yaml> {
        self.objects
            .iter()
            .filter(|o| yaml_str(&o["kind"]) == kind)
            .map(|o| (yaml_str(&o["metadata"]["name"]).to_string(), o))
            .collect()
    }

    /// Deployments and StatefulSets.
    fn workloads(&self) -> impl Iterator<Item = &Yaml> {
        self.objects.iter().filter(|o| matches!(o["kind"].as_str(), Some("Deployment" | "StatefulSet")))
    }

    /// Whether `host` is the in-cluster name of Service `service` (`NAME.NAMESPACE[.svc[.cluster.local]]`).
    fn names_service(&self, host: &str, service: &str) -> bool {
        let ns = &self.namespace;
        [format!("{service}.{ns}"), format!("{service}.{ns}.svc"), format!("{service}.{ns}.svc.cluster.local")]
            .contains(&host.to_string())
    }
}

/// A container port given by name or number, as a number.
fn container_port(container: &Yaml, port: &Yaml) -> u16 {
    if let Some(n) = port.as_u64() {
        return n as u16;
    }
    let name = yaml_str(port);
    container["ports"]
        .as_sequence()
        .into_iter()
        .flatten()
        .find(|p| p["name"].as_str() == Some(name))
        .and_then(|p| p["containerPort"].as_u64())
        .unwrap_or_else(|| panic!("container port {name:?} not declared")) as u16
}

/// Whether a label selector (`matchLabels` or a Service's `selector`) picks pods with `labels`.
fn selects(selector: &Yaml, labels: &serde_yaml_ng::Mapping) -> bool {
    selector.as_mapping().is_some_and(|sel| !sel.is_empty() && sel.iter().all(|(k, v)| labels.get(k) == Some(v)))
}

/// The Services in front of `port` (a container port) of pods with `labels`: (Service, its port).
fn services_to(k: &Kustomized, labels: &serde_yaml_ng::Mapping, container: &Yaml, port: u16) -> Vec<(String, u16)> {
    let mut found = Vec::new();
    for (name, service) in k.named("Service") {
        if !selects(&service["spec"]["selector"], labels) {
            continue;
        }
        for p in service["spec"]["ports"].as_sequence().expect("service ports") {
            let target = if p["targetPort"].is_null() { &p["port"] } else { &p["targetPort"] };
            if container_port(container, target) == port {
                found.push((name.clone(), p["port"].as_u64().expect("port") as u16));
            }
        }
    }
    found
}

/// A volume mount of a container: (volume, path).
fn volume_mounts(container: &Yaml) -> Vec<(&str, &str)> {
    container["volumeMounts"]
        .as_sequence()
        .expect("volumeMounts")
        .iter()
        .map(|m| (yaml_str(&m["name"]), yaml_str(&m["mountPath"])))
        .collect()
}

/// The Secret and key a file path of `container` comes from (None: not on a Secret mount).
fn secret_key_of(pod: &Yaml, container: &Yaml, path: &str) -> Option<(String, String)> {
    let (volume, dir) =
        volume_mounts(container).into_iter().filter(|(_, dir)| is_within(path, dir)).max_by_key(|(_, d)| d.len())?;
    let v = pod["volumes"].as_sequence()?.iter().find(|v| v["name"].as_str() == Some(volume))?;
    let secret = v["secret"]["secretName"].as_str()?;
    Some((secret.to_string(), path.strip_prefix(&format!("{dir}/"))?.to_string()))
}

#[test]
fn kubernetes_manifests_reference_only_what_they_define_and_probe_the_admin_port() {
    for folder in KUSTOMIZATIONS {
        check_manifests(folder, &kustomized(folder));
    }
}

fn check_manifests(folder: &str, k: &Kustomized) {
    let namespaces = k.named("Namespace");
    assert!(namespaces.contains_key(&k.namespace), "{folder}: Namespace {} is not among the manifests", k.namespace);
    let pvcs = k.named("PersistentVolumeClaim");
    let services = k.named("Service");
    let budgets = k.named("PodDisruptionBudget");
    let mut workloads = 0;
    let mut node_configs = Vec::new();
    let mut directory_services = BTreeSet::new();
    let mut database_urls = Vec::new();

    for o in k.workloads() {
        let kind = yaml_str(&o["kind"]);
        workloads += 1;
        let name = yaml_str(&o["metadata"]["name"]);
        let at = format!("{folder}: {kind} {name}");
        let spec = &o["spec"];
        let pod = &spec["template"]["spec"];
        let replicas = spec["replicas"].as_u64().unwrap_or(1);
        let labels = spec["template"]["metadata"]["labels"].as_mapping().expect("pod labels");
        assert!(selects(&spec["selector"]["matchLabels"], labels), "{at}: selector does not match the pod labels");

        // Volumes: each refers to a ConfigMap, Secret or claim the manifests define.
        let mut volumes: BTreeMap<String, &Yaml> = BTreeMap::new();
        let mut on_claim_volume = false;
        for v in pod["volumes"].as_sequence().into_iter().flatten() {
            let vname = yaml_str(&v["name"]).to_string();
            if let Some(cm) = v["configMap"]["name"].as_str() {
                assert!(k.config_maps.contains_key(cm), "{at}: volume {vname}: no ConfigMap {cm}");
            } else if let Some(secret) = v["secret"]["secretName"].as_str() {
                assert!(k.secrets.contains_key(secret), "{at}: volume {vname}: no Secret {secret}");
            } else if let Some(claim) = v["persistentVolumeClaim"]["claimName"].as_str() {
                assert!(pvcs.contains_key(claim), "{at}: volume {vname}: no PersistentVolumeClaim {claim}");
                assert_eq!(replicas, 1, "{at}: one pod per ReadWriteOnce claim");
                assert_eq!(
                    spec["strategy"]["type"].as_str(),
                    Some("Recreate"),
                    "{at}: sled allows one process per store"
                );
                on_claim_volume = true;
            } else {
                assert!(!v["emptyDir"].is_null(), "{at}: volume {vname} of an unexpected type");
            }
            volumes.insert(vname, v);
        }
        let claim_templates: BTreeSet<String> = spec["volumeClaimTemplates"]
            .as_sequence()
            .into_iter()
            .flatten()
            .map(|t| yaml_str(&t["metadata"]["name"]).to_string())
            .collect();
        if kind == "StatefulSet" {
            assert!(!claim_templates.is_empty(), "{at}: no volumeClaimTemplates");
            let governing = yaml_str(&spec["serviceName"]);
            let service = services.get(governing).unwrap_or_else(|| panic!("{at}: no Service {governing}"));
            assert_eq!(service["spec"]["clusterIP"].as_str(), Some("None"), "{at}: the governing Service is headless");
        }
        // Several replicas: rolled one at a time, and never all evicted at once.
        if replicas > 1 {
            assert!(!on_claim_volume && kind == "Deployment", "{at}: {replicas} replicas of a stateful pod");
            assert_eq!(spec["strategy"]["type"].as_str(), Some("RollingUpdate"), "{at}: strategy");
            assert_eq!(
                spec["strategy"]["rollingUpdate"]["maxUnavailable"].as_u64(),
                Some(0),
                "{at}: a rolling update must not take a ready replica away before its successor is ready"
            );
            let budget = budgets
                .values()
                .find(|b| selects(&b["spec"]["selector"]["matchLabels"], labels))
                .unwrap_or_else(|| panic!("{at}: no PodDisruptionBudget selects its pods"));
            let min = budget["spec"]["minAvailable"].as_u64().expect("minAvailable as a number");
            assert!(min >= 1 && min < replicas, "{at}: PodDisruptionBudget minAvailable {min} of {replicas}");
        }

        let pod_security = &pod["securityContext"];
        assert_eq!(pod["automountServiceAccountToken"].as_bool(), Some(false), "{at}: the servers need no API token");
        let containers = pod["containers"].as_sequence().expect("containers");
        for c in containers {
            let cname = yaml_str(&c["name"]);
            let at = format!("{at} container {cname}");
            let security = &c["securityContext"];
            assert!(
                security["runAsNonRoot"].as_bool() == Some(true)
                    || pod_security["runAsNonRoot"].as_bool() == Some(true),
                "{at}: runAsNonRoot"
            );
            for uid in [&security["runAsUser"], &pod_security["runAsUser"]] {
                assert_ne!(uid.as_u64(), Some(0), "{at}: runs as root");
            }
            assert_eq!(security["readOnlyRootFilesystem"].as_bool(), Some(true), "{at}: readOnlyRootFilesystem");
            assert_eq!(security["allowPrivilegeEscalation"].as_bool(), Some(false), "{at}: allowPrivilegeEscalation");
            assert!(yaml_strs(&security["capabilities"]["drop"]).contains(&"ALL".to_string()), "{at}: drop ALL");
            for side in ["requests", "limits"] {
                for resource in ["cpu", "memory"] {
                    assert!(!c["resources"][side][resource].is_null(), "{at}: resources.{side}.{resource}");
                }
            }
            let mounts = volume_mounts(c);
            for (vname, _) in &mounts {
                assert!(
                    volumes.contains_key(*vname) || claim_templates.contains(*vname),
                    "{at}: volumeMount {vname} is no volume or claim template"
                );
            }

            // A server of someone else's image (the trial PostgreSQL): only its readiness is checked here.
            let command: Vec<String> =
                yaml_strs_opt(&c["command"]).into_iter().chain(yaml_strs_opt(&c["args"])).collect();
            let server = match command.first().map(String::as_str) {
                Some("directory") => Server::Directory,
                Some("exchange-node") => Server::Node,
                _ => {
                    assert!(!c["readinessProbe"].is_null(), "{at}: no readinessProbe");
                    continue;
                }
            };

            // The config: the --config file on a ConfigMap mount, as generated from the config folder.
            let config_path = &command[command.iter().position(|w| w == "--config").expect("--config") + 1];
            let (config_volume, config_dir) = mounts
                .iter()
                .find(|(_, path)| is_within(config_path, path))
                .unwrap_or_else(|| panic!("{at}: nothing mounted at {config_path}"));
            let cm = volumes[*config_volume]["configMap"]["name"].as_str().expect("config from a ConfigMap");
            let key = config_path.strip_prefix(&format!("{config_dir}/")).expect("key under the mount");
            let file = k.config_maps[cm].get(key).unwrap_or_else(|| panic!("{at}: ConfigMap {cm} has no key {key}"));
            let config = ServerConfig::read(file);
            assert_eq!(config.server, server, "{at}: {} is not a {} config", file.display(), server.binary());

            // Certificates (and the database password) from Secret mounts, each file one of the Secret's keys.
            for file in config.tls_files().into_iter().chain(config.password_file().map(String::from)) {
                let (secret, key) =
                    secret_key_of(pod, c, &file).unwrap_or_else(|| panic!("{at}: {file} is not on a Secret mount"));
                assert!(k.secrets[&secret].contains(&key), "{at}: Secret {secret} has no key {key}");
            }

            // The store: on a claim (the StatefulSet's own template, or a claim the Deployment mounts), or
            // PostgreSQL, and then nothing of the pod's own is kept.
            if let Some(url) = config.postgres_url() {
                assert!(!on_claim_volume && claim_templates.is_empty(), "{at}: a volume claim for a PostgreSQL store");
                database_urls.push((at.clone(), url));
            } else {
                let (data_volume, _) = mounts
                    .iter()
                    .find(|(_, path)| is_within(config.data_dir(), path))
                    .unwrap_or_else(|| panic!("{at}: data_dir {} is on no mount", config.data_dir()));
                let on_claim = claim_templates.contains(*data_volume)
                    || volumes.get(*data_volume).is_some_and(|v| !v["persistentVolumeClaim"].is_null());
                assert!(on_claim, "{at}: data_dir {} is not on a volume claim", config.data_dir());
                if kind == "StatefulSet" {
                    assert!(
                        claim_templates.contains(*data_volume),
                        "{at}: data_dir should be on the volumeClaimTemplate"
                    );
                }
                assert_eq!(replicas, 1, "{at}: {replicas} replicas over one sled store");
            }

            // Probes: /healthz and /readyz over HTTPS on the admin port the config opens, without credentials.
            let admin = config.admin_port();
            assert!(config.open_probes(), "{at}: the kubelet's probes present no credentials: open_probes = true");
            for (probe, path) in
                [("livenessProbe", "/healthz"), ("readinessProbe", "/readyz"), ("startupProbe", "/healthz")]
            {
                if probe == "startupProbe" && c[probe].is_null() {
                    continue;
                }
                let get = &c[probe]["httpGet"];
                assert_eq!(get["path"].as_str(), Some(path), "{at}: {probe} path");
                assert_eq!(get["scheme"].as_str(), Some("HTTPS"), "{at}: {probe} scheme");
                assert_eq!(container_port(c, &get["port"]), admin, "{at}: {probe} port vs [admin] listen");
            }
            let declared: BTreeSet<u16> = c["ports"]
                .as_sequence()
                .expect("ports")
                .iter()
                .map(|p| p["containerPort"].as_u64().unwrap() as u16)
                .collect();
            assert!(declared.contains(&config.grpc_port()), "{at}: gRPC port {} not declared", config.grpc_port());

            // Services in front of this pod: their targetPorts are ports of this container.
            for (sname, service) in &services {
                if !selects(&service["spec"]["selector"], labels) {
                    continue;
                }
                for port in service["spec"]["ports"].as_sequence().expect("service ports") {
                    container_port(c, &port["targetPort"]);
                }
                if server == Server::Node {
                    let advertised = host_of(config.str("advertise_address"));
                    assert!(
                        advertised.starts_with(&format!("{sname}.{}", k.namespace)),
                        "{at}: advertise_address {advertised} is not Service {sname}"
                    );
                }
            }
            match server {
                Server::Directory => directory_services.extend(services_to(k, labels, c, config.grpc_port())),
                Server::Node => node_configs.push(config),
            }
        }
    }
    assert!(workloads >= 2, "{folder}: a directory and at least one node");
    assert!(!directory_services.is_empty(), "{folder}: no Service in front of the directory's gRPC port");
    // Each of a node's directory addresses is a Service in front of the directory's gRPC port.
    for config in node_configs {
        let addresses = config.directory_addresses();
        for address in &addresses {
            let reached = directory_services.iter().any(|(service, port)| {
                k.names_service(host_of(address), service) && port_of(address, &config.path) == *port
            });
            assert!(
                reached,
                "{}: directory_address {address} is none of the directory's Services {directory_services:?}",
                config.path.display()
            );
        }
        let distinct: BTreeSet<&String> = addresses.iter().collect();
        assert_eq!(distinct.len(), addresses.len(), "{}: an address twice", config.path.display());
    }
    // The database a directory connects to is a Service in front of a pod listening there.
    for (at, url) in database_urls {
        let reached = k.workloads().any(|w| {
            let labels = w["spec"]["template"]["metadata"]["labels"].as_mapping().expect("pod labels");
            w["spec"]["template"]["spec"]["containers"].as_sequence().into_iter().flatten().any(|c| {
                c["ports"].as_sequence().into_iter().flatten().any(|p| {
                    let port = p["containerPort"].as_u64().unwrap() as u16;
                    services_to(k, labels, c, port)
                        .iter()
                        .any(|(service, service_port)| k.names_service(&url.host, service) && *service_port == url.port)
                })
            })
        });
        // A database outside the manifests (managed PostgreSQL) is named by the operator; not checked here.
        if url.host.ends_with(&format!(".{}.svc", k.namespace)) || url.host.contains(&format!(".{}.", k.namespace)) {
            assert!(reached, "{at}: url host {}:{} is no Service of a pod here", url.host, url.port);
        }
    }
}

fn yaml_strs_opt(v: &Yaml) -> Vec<String> {
    if v.is_null() {
        Vec::new()
    } else {
        yaml_strs(v)
    }
}

/// The one container of the workload named `name` whose image contains `image`.
fn workload_container<'k>(k: &'k Kustomized, name: &str, image: &str) -> (&'k Yaml, &'k Yaml) {
    let workload = k
        .workloads()
        .find(|w| w["metadata"]["name"].as_str() == Some(name))
        .unwrap_or_else(|| panic!("no Deployment or StatefulSet {name}"));
    let pod = &workload["spec"]["template"]["spec"];
    let container = pod["containers"]
        .as_sequence()
        .into_iter()
        .flatten()
        .find(|c| c["image"].as_str().is_some_and(|i| i.contains(image)))
        .unwrap_or_else(|| panic!("{name}: no container of {image}"));
    (pod, container)
}

#[test]
fn kubernetes_ha_overlay_runs_directory_replicas_over_the_database_the_trial_postgres_serves() {
    let base = kustomized("kubernetes");
    let ha = kustomized("kubernetes-ha");
    let replicas =
        |k: &Kustomized| k.named("Deployment")["gx-directory"]["spec"]["replicas"].as_u64().expect("replicas");
    assert_eq!(replicas(&base), 1, "the base keeps its one sled directory");
    assert!(replicas(&ha) >= 2, "the overlay runs several directory replicas");
    assert!(!ha.named("PersistentVolumeClaim").contains_key("gx-directory-data"), "the sled claim is left behind");

    // The trial PostgreSQL says what it is, and is the official image at a pinned major version.
    let postgres_file = deploy("kubernetes-ha/postgres.yaml");
    assert!(read(&postgres_file).contains("In production use your managed or"), "postgres.yaml: the production note");
    let (pg_pod, pg) = workload_container(&ha, "gx-postgres", "postgres:");
    let image = yaml_str(&pg["image"]);
    let major = image.strip_prefix("postgres:").unwrap().split(['-', '.']).next().unwrap();
    assert!(major.parse::<u32>().is_ok(), "{image}: pin a major version");
    let env: BTreeMap<String, String> = pg["env"]
        .as_sequence()
        .expect("env")
        .iter()
        .map(|e| (yaml_str(&e["name"]).to_string(), e["value"].as_str().unwrap_or_default().to_string()))
        .collect();
    assert!(!env.contains_key("POSTGRES_PASSWORD"), "postgres: POSTGRES_PASSWORD_FILE, not POSTGRES_PASSWORD");
    let pg_password = secret_key_of(pg_pod, pg, &env["POSTGRES_PASSWORD_FILE"]).expect("the password from a Secret");
    let pgdata = env.get("PGDATA").map(String::as_str).unwrap_or("/var/lib/postgresql/data");
    let (data_volume, data_dir) =
        volume_mounts(pg).into_iter().find(|(_, dir)| is_within(pgdata, dir)).expect("PGDATA mount");
    assert!(pgdata != data_dir, "postgres: PGDATA below the claim's root (lost+found)");
    let claims: Vec<String> = ha.named("StatefulSet")["gx-postgres"]["spec"]["volumeClaimTemplates"]
        .as_sequence()
        .unwrap()
        .iter()
        .map(|t| yaml_str(&t["metadata"]["name"]).to_string())
        .collect();
    assert!(claims.iter().any(|c| c == data_volume), "postgres: PGDATA on the claim template");

    // The directory logs in as the database's owner, with the password postgres was created with.
    let (dir_pod, directory) = workload_container(&ha, "gx-directory", "gov-exchange");
    let command = yaml_strs(&directory["command"]);
    let config_path = &command[command.iter().position(|w| w == "--config").unwrap() + 1];
    let (config_volume, config_dir) =
        volume_mounts(directory).into_iter().find(|(_, dir)| is_within(config_path, dir)).unwrap();
    let cm = dir_pod["volumes"]
        .as_sequence()
        .unwrap()
        .iter()
        .find(|v| v["name"].as_str() == Some(config_volume))
        .and_then(|v| v["configMap"]["name"].as_str())
        .unwrap();
    let config = ServerConfig::read(&ha.config_maps[cm][config_path.strip_prefix(&format!("{config_dir}/")).unwrap()]);
    let url = config.postgres_url().expect("the overlay's directory is on PostgreSQL");
    assert_eq!((&url.user, &url.database), (&env["POSTGRES_USER"], &env["POSTGRES_DB"]), "url user and database");
    let password = config.password_file().expect("password_file");
    assert_eq!(secret_key_of(dir_pod, directory, password), Some(pg_password), "the same Secret key as postgres");
    assert_eq!(
        directory["lifecycle"]["preStop"]["exec"]["command"][0].as_str(),
        Some("sleep"),
        "a pause before the drain, while the endpoints drop the pod"
    );
}

#[test]
fn kubernetes_scripts_fill_the_secrets_and_kustomize_builds() {
    let work = tempfile::tempdir().expect("tempdir");
    let ca = work.path().join("ca");
    let ca_str = ca.display().to_string();
    let out = e2e_tests::procs::exchangectl(&["pki", "init", "--dir", &ca_str]);
    assert!(out.status.success(), "pki init: {}", String::from_utf8_lossy(&out.stderr));

    // Copies of the folders, so that the repository's pki/ and secrets/ (git-ignored) are left alone.
    let copy = work.path().join("deploy");
    for folder in KUSTOMIZATIONS {
        copy_dir(&deploy(folder), &copy.join(folder));
    }
    let _ = std::fs::remove_dir_all(copy.join("kubernetes/pki"));
    let _ = std::fs::remove_dir_all(copy.join("kubernetes-ha/secrets"));
    let namespace = kustomized("kubernetes").namespace;
    let said = run_script(&copy.join("kubernetes/issue-certs.sh"), &[&ca_str, &namespace], &[]);
    let said_db = run_script(&copy.join("kubernetes-ha/db-password.sh"), &[], &[]);
    let in_copy = |file: &Path| copy.join(file.strip_prefix(repo_root().join("deploy")).unwrap());
    for folder in KUSTOMIZATIONS {
        for file in &kustomized(folder).secret_files {
            assert!(in_copy(file).is_file(), "the scripts did not write {}:\n{said}{said_db}", file.display());
        }
    }
    assert!(!copy.join("kubernetes/pki/ca.key").exists(), "the CA key must not go into a Secret");
    let password = copy.join("kubernetes-ha/secrets/db-password");
    assert_eq!(file_mode(&password) & 0o077, 0, "the database password is private");
    assert!(read(&password).chars().all(|c| c.is_ascii_hexdigit()), "a password with nothing to quote");

    // The directory certificate names every address a node dials it by, the replicas' Service included.
    for folder in KUSTOMIZATIONS {
        for config in server_configs().iter().filter(|p| p.starts_with(deploy(folder))) {
            let config = ServerConfig::read(config);
            if config.server != Server::Node {
                continue;
            }
            for address in config.directory_addresses() {
                let host = host_of(&address);
                if let Err(e) =
                    certificate_valid_for(&copy.join("kubernetes/pki/directory.crt"), &ca.join("ca.crt"), host)
                {
                    panic!("{}: the directory certificate does not name {host}: {e}", config.path.display());
                }
            }
        }
    }

    // Again: certificates and password are reused, not made anew.
    let before = (snapshot(&ca), snapshot(&copy.join("kubernetes-ha/secrets")));
    let again = run_script(&copy.join("kubernetes/issue-certs.sh"), &[&ca_str, &namespace], &[]);
    assert!(!again.contains("issued"), "{again}");
    let again_db = run_script(&copy.join("kubernetes-ha/db-password.sh"), &[], &[]);
    assert!(again_db.contains("kept"), "{again_db}");
    assert_eq!((snapshot(&ca), snapshot(&copy.join("kubernetes-ha/secrets"))), before);

    if !have_kubectl() {
        return skip("kubectl kustomize", "kubectl is not installed");
    }
    for folder in KUSTOMIZATIONS {
        let k = kustomized(folder);
        let out = Command::new("kubectl").arg("kustomize").arg(copy.join(folder)).output().expect("run kubectl");
        assert!(out.status.success(), "kubectl kustomize {folder} failed:\n{}", String::from_utf8_lossy(&out.stderr));
        let built = work.path().join(format!("{folder}.yaml"));
        std::fs::write(&built, &out.stdout).unwrap();
        let objects = yaml_documents(&built);
        for (name, keys) in &k.secrets {
            let secret = objects
                .iter()
                .find(|o| o["kind"].as_str() == Some("Secret") && o["metadata"]["name"].as_str() == Some(name))
                .unwrap_or_else(|| panic!("{folder}: kustomize built no Secret {name}"));
            let built_keys: BTreeSet<String> =
                secret["data"].as_mapping().expect("data").keys().map(|k| yaml_str(k).to_string()).collect();
            assert_eq!(&built_keys, keys, "{folder}: Secret {name}");
        }
        for o in &objects {
            let (kind, name) = (yaml_str(&o["kind"]), yaml_str(&o["metadata"]["name"]));
            let namespace = if kind == "Namespace" { Some(name) } else { o["metadata"]["namespace"].as_str() };
            assert_eq!(namespace, Some(k.namespace.as_str()), "{folder}: {kind} {name} is outside the namespace");
        }
        // What the checks above read is what kustomize builds: the same objects, and the same
        // replicas, strategy, volumes and mounts after the patches.
        let summary = |objects: &[Yaml]| -> BTreeMap<(String, String), String> {
            objects
                .iter()
                .filter(|o| !matches!(o["kind"].as_str(), Some("ConfigMap" | "Secret")))
                .map(|o| {
                    let key = (yaml_str(&o["kind"]).to_string(), yaml_str(&o["metadata"]["name"]).to_string());
                    (key, workload_shape(o))
                })
                .collect()
        };
        assert_eq!(summary(&objects), summary(&k.objects), "{folder}: kubectl kustomize builds something else");
    }
}

/// What the patches change in a workload, comparable between kustomize's output and ours: replicas,
/// strategy, pod volumes by name and kind, and each container's mounts (ConfigMap hash suffixes aside).
fn workload_shape(o: &Yaml) -> String {
    let spec = &o["spec"];
    if spec["template"].is_null() {
        return String::new();
    }
    let pod = &spec["template"]["spec"];
    let mut volumes: Vec<String> = pod["volumes"]
        .as_sequence()
        .into_iter()
        .flatten()
        .map(|v| {
            let kinds: Vec<String> = v.as_mapping().unwrap().keys().map(|k| yaml_str(k).to_string()).collect();
            format!(
                "{}:{}",
                yaml_str(&v["name"]),
                kinds.iter().filter(|k| *k != "name").cloned().collect::<Vec<_>>().join("+")
            )
        })
        .collect();
    volumes.sort();
    let mut containers = Vec::new();
    for c in pod["containers"].as_sequence().into_iter().flatten() {
        let mut mounts: Vec<String> = volume_mounts(c).iter().map(|(v, p)| format!("{v}@{p}")).collect();
        mounts.sort();
        containers.push(format!(
            "{}[{}] preStop={:?}",
            yaml_str(&c["name"]),
            mounts.join(","),
            c["lifecycle"]["preStop"]
        ));
    }
    format!(
        "replicas={:?} strategy={:?}/{:?}/{:?} volumes={volumes:?} containers={containers:?}",
        spec["replicas"].as_u64(),
        spec["strategy"]["type"].as_str(),
        spec["strategy"]["rollingUpdate"]["maxUnavailable"],
        spec["strategy"]["rollingUpdate"]["maxSurge"],
    )
}

fn have_kubectl() -> bool {
    Command::new("kubectl").args(["version", "--client"]).output().is_ok_and(|o| o.status.success())
}

fn copy_dir(from: &Path, to: &Path) {
    std::fs::create_dir_all(to).unwrap();
    for entry in std::fs::read_dir(from).unwrap() {
        let path = entry.unwrap().path();
        let target = to.join(path.file_name().unwrap());
        if path.is_dir() {
            copy_dir(&path, &target);
        } else {
            std::fs::copy(&path, &target).unwrap();
        }
    }
}

// ------------------------------------------------------------------------------------------------------
// Prometheus and Grafana

/// The metric families the servers export (docs/OPERATOR-GUIDE.md, "Monitoring"), and which are
/// histograms (seen as `_bucket`, `_sum`, `_count`).
const METRICS: &[&str] = &[
    "gx_requests_total",
    "gx_request_duration_seconds",
    "gx_relay_requests_total",
    "gx_relay_duration_seconds",
    "gx_rate_limited_total",
    "gx_outbox_backlog_events",
    "gx_outbox_oldest_undelivered_seconds",
    "gx_inbox_backlog_events",
    "gx_directory_state_age_seconds",
    "gx_directory_state_stale",
    "gx_directory_staleness_bound_seconds",
    "gx_store_size_bytes",
    "gx_certificate_expiry_days",
    "gx_ready",
    "gx_maintenance",
    "gx_admin_auth_failures_total",
    "gx_build_info",
    "gx_uptime_seconds",
    "gx_directory_nodes",
    "gx_catalog_entries",
];
const HISTOGRAMS: &[&str] = &["gx_request_duration_seconds", "gx_relay_duration_seconds"];

/// The `gx_` metric names an expression uses, histogram suffixes folded into the family name.
fn metric_names(expr: &str) -> BTreeSet<String> {
    let mut names = BTreeSet::new();
    let bytes = expr.as_bytes();
    let mut i = 0;
    while let Some(found) = expr[i..].find("gx_") {
        let start = i + found;
        let boundary = start == 0 || !(bytes[start - 1].is_ascii_alphanumeric() || bytes[start - 1] == b'_');
        let end = expr[start..]
            .find(|c: char| !(c.is_ascii_alphanumeric() || c == '_'))
            .map(|n| start + n)
            .unwrap_or(expr.len());
        if boundary {
            let name = &expr[start..end];
            let family = HISTOGRAMS
                .iter()
                .find(|h| [format!("{h}_bucket"), format!("{h}_sum"), format!("{h}_count")].iter().any(|s| s == name))
                .map(|h| h.to_string())
                .unwrap_or_else(|| name.to_string());
            names.insert(family);
        }
        i = end;
    }
    names
}

fn assert_known_metrics(what: &str, expr: &str) {
    for name in metric_names(expr) {
        assert!(METRICS.contains(&name.as_str()), "{what}: {name} is not a metric the servers export ({expr})");
    }
    for h in HISTOGRAMS {
        assert!(!contains_word(expr, h), "{what}: use {h}_bucket/_sum/_count, not the bare histogram name ({expr})");
    }
}

/// Whether `word` occurs in `text` not followed by more of an identifier.
fn contains_word(text: &str, word: &str) -> bool {
    text.match_indices(word).any(|(i, _)| {
        let after = text[i + word.len()..].chars().next();
        !after.is_some_and(|c| c.is_ascii_alphanumeric() || c == '_')
    })
}

#[test]
fn prometheus_scrapes_every_admin_port_over_https_with_client_credentials() {
    let systemd_dir = ServerConfig::read(&deploy("systemd/directory.toml"));
    let systemd_tax = ServerConfig::read(&deploy("systemd/node-tax.toml"));
    for (file, credentials) in [("prometheus.yml", "certificate"), ("prometheus-token.yml", "token")] {
        let path = deploy("prometheus").join(file);
        let doc: Yaml = serde_yaml_ng::from_str(&read(&path)).expect("YAML");
        for rules in yaml_strs(&doc["rule_files"]) {
            assert!(deploy("prometheus").join(&rules).is_file(), "{file}: rule file {rules} missing");
        }
        let jobs = doc["scrape_configs"].as_sequence().expect("scrape_configs");
        let mut names = BTreeSet::new();
        for job in jobs {
            let name = yaml_str(&job["job_name"]).to_string();
            let at = format!("{file} job {name}");
            assert_eq!(job["scheme"].as_str(), Some("https"), "{at}: the admin port speaks HTTPS only");
            assert_eq!(job["metrics_path"].as_str().unwrap_or("/metrics"), "/metrics", "{at}");
            assert!(job["tls_config"]["ca_file"].as_str().is_some(), "{at}: verify the server against the CA");
            match credentials {
                "certificate" => {
                    for key in ["cert_file", "key_file"] {
                        assert!(job["tls_config"][key].as_str().is_some(), "{at}: tls_config.{key}");
                    }
                }
                _ => assert!(job["authorization"]["credentials_file"].as_str().is_some(), "{at}: credentials_file"),
            }
            let targets: Vec<String> = job["static_configs"]
                .as_sequence()
                .expect("static_configs")
                .iter()
                .flat_map(|s| yaml_strs(&s["targets"]))
                .collect();
            let expected_port = match name.as_str() {
                "gx-directory" => Some(systemd_dir.admin_port()),
                "gx-node-tax" => Some(systemd_tax.admin_port()),
                _ => None,
            };
            if let Some(port) = expected_port {
                for t in &targets {
                    assert_eq!(port_of(t, &path), port, "{at}: target {t} vs the shipped config's [admin] listen");
                }
            }
            assert!(names.insert(name.clone()), "{at}: job named twice");
        }
        assert!(names.contains("gx-directory") && names.contains("gx-node-tax"), "{file}: {names:?}");
        // The alert rules match jobs by this prefix.
        assert!(names.iter().all(|n| n.starts_with("gx-")), "{file}: {names:?}");
    }

    if !have("promtool") {
        return skip("promtool checks", "promtool is not installed");
    }
    let dir = deploy("prometheus");
    for args in [
        vec!["check", "config", "--syntax-only", "prometheus.yml"],
        vec!["check", "config", "--syntax-only", "prometheus-token.yml"],
        vec!["check", "rules", "alerts.yml"],
        vec!["test", "rules", "alerts.test.yml"],
    ] {
        let out = Command::new("promtool").args(&args).current_dir(&dir).output().expect("run promtool");
        assert!(
            out.status.success(),
            "promtool {}:\n{}{}",
            args.join(" "),
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
    }
}

#[test]
fn alert_rules_use_only_exported_metrics_and_cover_the_operators_worries() {
    let doc: Yaml = serde_yaml_ng::from_str(&read(&deploy("prometheus/alerts.yml"))).expect("alerts.yml is YAML");
    let mut used = BTreeSet::new();
    let mut alerts = BTreeSet::new();
    for group in doc["groups"].as_sequence().expect("groups") {
        for rule in group["rules"].as_sequence().expect("rules") {
            let name = yaml_str(&rule["alert"]).to_string();
            let expr = yaml_str(&rule["expr"]);
            assert_known_metrics(&format!("alert {name}"), expr);
            used.extend(metric_names(expr));
            assert!(rule["labels"]["severity"].as_str().is_some(), "alert {name}: severity label");
            assert!(rule["annotations"]["summary"].as_str().is_some(), "alert {name}: summary");
            assert!(alerts.insert(name.clone()), "alert {name} twice");
        }
    }
    for worry in [
        "gx_ready",
        "gx_certificate_expiry_days",
        "gx_outbox_backlog_events",
        "gx_directory_state_stale",
        "gx_requests_total",
    ] {
        assert!(used.contains(worry), "no alert watches {worry}");
    }
}

#[test]
fn grafana_dashboard_is_valid_and_plots_the_exported_metrics() {
    let path = deploy("grafana/gov-exchange.json");
    let dash: serde_json::Value = serde_json::from_str(&read(&path)).expect("dashboard JSON");
    assert_eq!(dash["uid"], "gov-exchange");
    let variables: BTreeSet<&str> = dash["templating"]["list"]
        .as_array()
        .expect("templating")
        .iter()
        .map(|v| v["name"].as_str().unwrap())
        .collect();
    assert!(variables.contains("datasource"), "a datasource variable, so the dashboard imports anywhere");

    let mut ids = BTreeSet::new();
    let mut exprs = Vec::new();
    for panel in dash["panels"].as_array().expect("panels") {
        let id = panel["id"].as_u64().expect("panel id");
        assert!(ids.insert(id), "panel id {id} twice");
        let grid = &panel["gridPos"];
        let (x, w) = (grid["x"].as_u64().expect("gridPos.x"), grid["w"].as_u64().expect("gridPos.w"));
        assert!(x + w <= 24, "panel {id} wider than the grid");
        if panel["type"] == "row" {
            continue;
        }
        let title = panel["title"].as_str().expect("title");
        assert_eq!(panel["datasource"]["uid"], "${datasource}", "panel {title}");
        let targets = panel["targets"]
            .as_array()
            .filter(|t| !t.is_empty())
            .unwrap_or_else(|| panic!("panel {title}: no queries"));
        for t in targets {
            let expr = t["expr"].as_str().unwrap_or_else(|| panic!("panel {title}: query without expr"));
            assert_known_metrics(&format!("panel {title}"), expr);
            exprs.push((title.to_string(), expr.to_string()));
        }
    }
    let used: BTreeSet<String> = exprs.iter().flat_map(|(_, e)| metric_names(e)).collect();
    let unplotted: Vec<&&str> = METRICS.iter().filter(|m| !used.contains(**m) && **m != "gx_build_info").collect();
    assert!(unplotted.is_empty(), "metrics on no panel: {unplotted:?}");
    for q in [0.5, 0.95] {
        assert!(
            exprs.iter().any(|(_, e)| e.contains(&format!("histogram_quantile({q}, "))
                && e.contains("gx_relay_duration_seconds_bucket")),
            "no p{} of relay latency",
            q * 100.0
        );
    }

    if !have("promtool") {
        return skip("PromQL syntax of the dashboard's queries", "promtool is not installed");
    }
    // promtool checks PromQL in rule files: one recording rule per query, Grafana's variables filled in.
    let mut rules = String::from("groups:\n  - name: dashboard\n    rules:\n");
    for (i, (_, expr)) in exprs.iter().enumerate() {
        let filled = expr.replace("$__rate_interval", "5m").replace("$job", ".*").replace("$instance", ".*");
        rules.push_str(&format!(
            "      - record: dashboard_query_{i}\n        expr: {}\n",
            serde_json::to_string(&filled).unwrap()
        ));
    }
    let dir = tempfile::tempdir().expect("tempdir");
    let file = dir.path().join("dashboard-rules.yml");
    std::fs::write(&file, rules).unwrap();
    let out = Command::new("promtool").args(["check", "rules"]).arg(&file).output().expect("run promtool");
    assert!(
        out.status.success(),
        "the dashboard's queries are not valid PromQL:\n{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

// ------------------------------------------------------------------------------------------------------
// Documentation

#[test]
fn deploy_readme_and_operator_guide_cover_every_part_and_link_to_real_files() {
    let readme_path = deploy("README.md");
    let guide_path = repo_root().join("docs/OPERATOR-GUIDE.md");
    let readme = read(&readme_path);
    let guide = read(&guide_path);
    for folder in
        ["systemd/", "docker/", "kubernetes/", "kubernetes-ha/", "prometheus/", "grafana/", "config/", "local/"]
    {
        assert!(readme.contains(folder), "deploy/README.md does not describe {folder}");
    }
    // The highly available directory: how to run it, point clients at it, survive a replica, back it up
    // and upgrade it.
    for topic in [
        "## A highly available directory",
        "compose-ha.yaml",
        "directory_address = [",
        "--directory directory-a:7443,directory-b:7443",
        "### When a replica stops",
        "pg_dump",
        "### Upgrades",
        "PodDisruptionBudget",
    ] {
        assert!(readme.contains(topic), "deploy/README.md does not cover {topic:?}");
    }
    assert!(readme.contains("cargo test -p e2e-tests --test deploy"), "deploy/README.md: how to validate");
    for section in [
        "## PKI set-up",
        "## Enrolling a new department",
        "## Rotating certificates",
        "## Backup and restore",
        "## Upgrades",
        "## Monitoring",
    ] {
        assert!(guide.contains(section), "docs/OPERATOR-GUIDE.md has no {section:?}");
    }
    for metric in METRICS {
        assert!(guide.contains(metric), "docs/OPERATOR-GUIDE.md does not list {metric}");
    }
    for (path, text) in [(&readme_path, &readme), (&guide_path, &guide)] {
        let base = path.parent().unwrap();
        for link in markdown_links(text) {
            if link.starts_with("http") || link.starts_with('#') {
                continue;
            }
            let target = link.split('#').next().unwrap();
            assert!(base.join(target).exists(), "{}: link {link} leads nowhere", path.display());
        }
    }
}

/// The targets of `[text](target)` links.
fn markdown_links(text: &str) -> Vec<String> {
    text.match_indices("](")
        .filter_map(|(i, _)| text[i + 2..].find(')').map(|end| text[i + 2..i + 2 + end].to_string()))
        .filter(|l| !l.contains(' '))
        .collect()
}
