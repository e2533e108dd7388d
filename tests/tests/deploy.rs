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
//! - the compose configs, moved onto loopback, start real servers whose probes answer without
//!   credentials, whose metrics carry the names the dashboard uses, and that survive SIGHUP;
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
    ] {
        assert!(names.contains(expected), "deploy/{expected} is gone; found {names:?}");
    }
    let mut failures = Vec::new();
    for path in &configs {
        let outcome = match ServerConfig::read(path).server {
            Server::Directory => directory::config::Config::from_file(path).map(|_| ()).map_err(|e| e.to_string()),
            Server::Node => exchange_node::config::Config::load(path).map(|_| ()).map_err(|e| e.to_string()),
        };
        if let Err(e) = outcome {
            failures.push(format!("{}: {e}", path.display()));
        }
    }
    assert!(failures.is_empty(), "configs the servers refuse:\n{}", failures.join("\n"));
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
        assert!(config.data_dir().starts_with('/'), "{}: data_dir should be absolute", path.display());
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

fn compose() -> Yaml {
    let mut doc: Yaml = serde_yaml_ng::from_str(&read(&deploy("docker/compose.yaml"))).expect("compose.yaml is YAML");
    doc.apply_merge().expect("compose.yaml merge keys");
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

/// `compose.yaml` short-form volume `SOURCE:TARGET[:ro]`.
struct ComposeMount {
    source: String,
    target: String,
    read_only: bool,
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

const COMPOSE_SERVERS: [&str; 4] = ["directory", "tax", "commerce", "quality"];

#[test]
fn compose_file_mounts_real_configs_and_checks_their_admin_ports() {
    let doc = compose();
    let services = doc["services"].as_mapping().expect("services");
    let declared_volumes: BTreeSet<String> =
        doc["volumes"].as_mapping().expect("volumes").keys().map(|k| yaml_str(k).to_string()).collect();
    let names: BTreeSet<&str> = services.keys().map(yaml_str).collect();
    assert_eq!(names, BTreeSet::from(["pki", "directory", "tax", "commerce", "quality"]));

    // The PKI service runs the script the image carries.
    let pki = &doc["services"]["pki"];
    assert_eq!(yaml_strs(&pki["command"]), ["gx-pki-init"]);
    assert!(
        read(&deploy("docker/Dockerfile")).contains("COPY deploy/docker/pki-init.sh /usr/local/bin/gx-pki-init"),
        "the image must carry gx-pki-init"
    );
    let pki_mount = compose_mounts(pki).into_iter().find(|m| m.source == "pki").expect("pki volume on pki");
    assert!(!pki_mount.read_only);

    let mut data_volumes = BTreeSet::new();
    let mut directory_grpc = None;
    let mut nodes = Vec::new();
    for name in COMPOSE_SERVERS {
        let service = &doc["services"][name];
        let at = format!("compose service {name}");
        let command = yaml_strs(&service["command"]);
        let server = Server::of_binary(&command[0]);
        let config_target = &command[command.iter().position(|w| w == "--config").expect("--config") + 1];
        let mounts = compose_mounts(service);
        for m in &mounts {
            if m.source.starts_with('.') {
                assert!(deploy("docker").join(&m.source).is_file(), "{at}: bind mount {} does not exist", m.source);
                assert!(m.read_only, "{at}: {} should be mounted read-only", m.source);
            } else {
                assert!(declared_volumes.contains(&m.source), "{at}: volume {} not declared", m.source);
            }
        }
        let config_mount = mounts
            .iter()
            .find(|m| &m.target == config_target)
            .unwrap_or_else(|| panic!("{at}: nothing mounted at {config_target}"));
        let config = ServerConfig::read(&deploy("docker").join(&config_mount.source));
        assert_eq!(config.server, server, "{at}: {} is not a {} config", config_mount.source, server.binary());

        // Certificates on the pki volume, read-only; the store on a writable volume of its own.
        let pki = mounts.iter().find(|m| m.source == "pki").unwrap_or_else(|| panic!("{at}: no pki volume"));
        assert!(pki.read_only, "{at}: the pki volume should be read-only here");
        for tls in config.tls_files() {
            assert!(is_within(&tls, &pki.target), "{at}: {tls} is not on the pki volume ({})", pki.target);
        }
        let data = mounts
            .iter()
            .find(|m| !m.source.starts_with('.') && m.source != "pki" && is_within(config.data_dir(), &m.target))
            .unwrap_or_else(|| panic!("{at}: data_dir {} is on no volume", config.data_dir()));
        assert!(!data.read_only, "{at}: the data volume is read-only");
        assert!(data_volumes.insert(data.source.clone()), "{at}: volume {} shared with another server", data.source);
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
            Server::Directory => directory_grpc = Some(config.grpc_port()),
            Server::Node => nodes.push((name, config)),
        }
    }
    // Nodes find the directory and each other by service name, on the ports those services listen on.
    let directory_grpc = directory_grpc.expect("a directory service");
    for (name, config) in &nodes {
        assert_eq!(config.str("directory_address"), format!("directory:{directory_grpc}"), "{name}");
        assert_eq!(config.str("advertise_address"), format!("{name}:{}", config.grpc_port()), "{name}");
        let condition = doc["services"][*name]["depends_on"]["directory"]["condition"].as_str();
        assert_eq!(condition, Some("service_healthy"), "{name}: start once the directory is ready");
    }
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

fn snapshot(dir: &Path) -> BTreeMap<String, Vec<u8>> {
    std::fs::read_dir(dir)
        .unwrap()
        .map(|e| {
            let p = e.unwrap().path();
            (p.file_name().unwrap().to_string_lossy().into_owned(), std::fs::read(&p).unwrap())
        })
        .collect()
}

#[test]
fn compose_pki_script_issues_every_certificate_the_configs_name_and_keeps_them() {
    let doc = compose();
    let env = &doc["services"]["pki"]["environment"];
    let pki_target = yaml_str(&env["PKI_DIR"]).to_string();
    let departments = yaml_str(&env["DEPARTMENTS"]).to_string();
    let dir = tempfile::tempdir().expect("tempdir");
    let pki = dir.path().join("pki");
    let pki_str = pki.display().to_string();
    let script = deploy("docker/pki-init.sh");
    let env = [("PKI_DIR", pki_str.as_str()), ("DEPARTMENTS", departments.as_str())];

    let first = run_script(&script, &[], &env);
    assert!(first.contains("CA created"), "{first}");
    for name in COMPOSE_SERVERS {
        let service = &doc["services"][name];
        let command = yaml_strs(&service["command"]);
        let target = &command[command.iter().position(|w| w == "--config").unwrap() + 1];
        let mount = compose_mounts(service).into_iter().find(|m| &m.target == target).unwrap();
        let config = ServerConfig::read(&deploy("docker").join(&mount.source));
        for tls in config.tls_files() {
            let rel =
                tls.strip_prefix(&format!("{pki_target}/")).unwrap_or_else(|| panic!("{tls} outside {pki_target}"));
            assert!(pki.join(rel).is_file(), "{name}: the pki service did not issue {tls}");
        }
    }
    let key_mode =
        std::os::unix::fs::PermissionsExt::mode(&std::fs::metadata(pki.join("tax-node.key")).unwrap().permissions());
    assert_eq!(key_mode & 0o077, 0, "keys are private to their owner");

    // Every `docker compose up` runs it again: nothing may change.
    let before = snapshot(&pki);
    let second = run_script(&script, &[], &env);
    assert!(second.contains("CA kept") && !second.contains("issued"), "{second}");
    assert_eq!(snapshot(&pki), before, "a second run changed the PKI");
}

/// The compose config `file` made runnable here: the same settings, with the container's paths moved
/// into `home` and its addresses onto loopback ports (`ports`: gRPC, admin; `directory`: the
/// directory's gRPC address, for a node).
fn localize(file: &str, home: &Path, ports: (u16, u16), directory: Option<&str>) -> PathBuf {
    let shipped = ServerConfig::read(&deploy("docker/config").join(file));
    let mut table = shipped.table.clone();
    let moved =
        |path: &str, under: &str| home.join(under).join(Path::new(path).file_name().unwrap()).display().to_string();
    table.insert("listen".into(), format!("127.0.0.1:{}", ports.0).into());
    table.insert("data_dir".into(), moved(shipped.data_dir(), "data").into());
    let admin = table.get_mut("admin").and_then(|a| a.as_table_mut()).expect("[admin]");
    admin.insert("listen".into(), format!("127.0.0.1:{}", ports.1).into());
    let tls = table.get_mut("tls").and_then(|t| t.as_table_mut()).expect("[tls]");
    for key in ["ca", "cert", "key"] {
        let path = tls[key].as_str().unwrap().to_string();
        tls.insert(key.into(), moved(&path, "pki").into());
    }
    if let Some(directory) = directory {
        let dept = file.trim_end_matches(".toml");
        table.insert("directory_address".into(), directory.into());
        table.insert("advertise_address".into(), format!("127.0.0.1:{}", ports.0).into());
        let catalog = deploy("local/catalog").join(format!("{dept}.toml"));
        table.insert("catalog_file".into(), catalog.display().to_string().into());
    }
    let path = home.join("config").join(file);
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
    let doc = compose();
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

// ------------------------------------------------------------------------------------------------------
// Kubernetes

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

/// Generator entries (`KEY=FILE` or `FILE`) of a kustomize ConfigMap/Secret: key → file in the folder.
fn generator_files(entry: &Yaml) -> BTreeMap<String, String> {
    yaml_strs(&entry["files"])
        .into_iter()
        .map(|f| match f.split_once('=') {
            Some((k, v)) => (k.to_string(), v.to_string()),
            None => (Path::new(&f).file_name().unwrap().to_string_lossy().into_owned(), f),
        })
        .collect()
}

/// The manifests as kustomization.yaml assembles them.
struct Kustomized {
    namespace: String,
    objects: Vec<Yaml>,
    /// ConfigMap name → key → file (relative to deploy/kubernetes); generated ones and literal ones.
    config_maps: BTreeMap<String, BTreeMap<String, String>>,
    /// Secret name → keys.
    secrets: BTreeMap<String, BTreeSet<String>>,
    secret_files: BTreeSet<String>,
}

fn kustomized() -> Kustomized {
    let root = deploy("kubernetes");
    let k: Yaml = serde_yaml_ng::from_str(&read(&root.join("kustomization.yaml"))).expect("kustomization.yaml");
    let namespace = yaml_str(&k["namespace"]).to_string();
    let mut objects = Vec::new();
    for file in yaml_strs(&k["resources"]) {
        objects.extend(yaml_documents(&root.join(&file)));
    }
    let mut config_maps = BTreeMap::new();
    for entry in k["configMapGenerator"].as_sequence().into_iter().flatten() {
        let files = generator_files(entry);
        for file in files.values() {
            assert!(root.join(file).is_file(), "configMapGenerator {file}: no such file");
        }
        config_maps.insert(yaml_str(&entry["name"]).to_string(), files);
    }
    let mut secrets = BTreeMap::new();
    let mut secret_files = BTreeSet::new();
    for entry in k["secretGenerator"].as_sequence().into_iter().flatten() {
        let files = generator_files(entry);
        secret_files.extend(files.values().cloned());
        secrets.insert(yaml_str(&entry["name"]).to_string(), files.keys().cloned().collect());
    }
    for o in &objects {
        let name = yaml_str(&o["metadata"]["name"]).to_string();
        match yaml_str(&o["kind"]) {
            "ConfigMap" => {
                let keys = o["data"]
                    .as_mapping()
                    .map(|m| m.keys().map(|k| (yaml_str(k).to_string(), String::new())).collect());
                config_maps.insert(name, keys.unwrap_or_default());
            }
            "Secret" => {
                let keys = ["data", "stringData"]
                    .iter()
                    .filter_map(|f| o[*f].as_mapping())
                    .flat_map(|m| m.keys().map(|k| yaml_str(k).to_string()))
                    .collect();
                secrets.insert(name, keys);
            }
            _ => {}
        }
    }
    Kustomized { namespace, objects, config_maps, secrets, secret_files }
}

impl Kustomized {
    fn named(&self, kind: &str) -> BTreeMap<String, &Yaml> {
        self.objects
            .iter()
            .filter(|o| yaml_str(&o["kind"]) == kind)
            .map(|o| (yaml_str(&o["metadata"]["name"]).to_string(), o))
            .collect()
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

#[test]
fn kubernetes_manifests_reference_only_what_they_define_and_probe_the_admin_port() {
    let k = kustomized();
    let namespaces = k.named("Namespace");
    assert!(namespaces.contains_key(&k.namespace), "Namespace {} is not among the manifests", k.namespace);
    let pvcs = k.named("PersistentVolumeClaim");
    let services = k.named("Service");
    let mut workloads = 0;
    let mut node_configs = Vec::new();
    let mut directory_service = None;

    for o in &k.objects {
        let kind = yaml_str(&o["kind"]);
        if kind != "Deployment" && kind != "StatefulSet" {
            continue;
        }
        workloads += 1;
        let name = yaml_str(&o["metadata"]["name"]);
        let at = format!("{kind} {name}");
        let spec = &o["spec"];
        let pod = &spec["template"]["spec"];
        let labels = spec["template"]["metadata"]["labels"].as_mapping().expect("pod labels");
        let selector = spec["selector"]["matchLabels"].as_mapping().expect("matchLabels");
        for (key, value) in selector {
            assert_eq!(labels.get(key), Some(value), "{at}: selector {key:?} does not match the pod labels");
        }

        // Volumes: each refers to a ConfigMap, Secret or claim the manifests define.
        let mut volumes: BTreeMap<String, &Yaml> = BTreeMap::new();
        for v in pod["volumes"].as_sequence().into_iter().flatten() {
            let vname = yaml_str(&v["name"]).to_string();
            if let Some(cm) = v["configMap"]["name"].as_str() {
                assert!(k.config_maps.contains_key(cm), "{at}: volume {vname}: no ConfigMap {cm}");
            } else if let Some(secret) = v["secret"]["secretName"].as_str() {
                assert!(k.secrets.contains_key(secret), "{at}: volume {vname}: no Secret {secret}");
            } else if let Some(claim) = v["persistentVolumeClaim"]["claimName"].as_str() {
                assert!(pvcs.contains_key(claim), "{at}: volume {vname}: no PersistentVolumeClaim {claim}");
                assert_eq!(spec["replicas"].as_u64(), Some(1), "{at}: one pod per ReadWriteOnce claim");
                assert_eq!(
                    spec["strategy"]["type"].as_str(),
                    Some("Recreate"),
                    "{at}: sled allows one process per store"
                );
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

            // The config: the --config file on a ConfigMap mount, as generated from deploy/kubernetes/config.
            let command: Vec<String> = yaml_strs(&c["command"]).into_iter().chain(yaml_strs_opt(&c["args"])).collect();
            let server = Server::of_binary(&command[0]);
            let config_path = &command[command.iter().position(|w| w == "--config").expect("--config") + 1];
            let mounts: Vec<(&str, &str)> = c["volumeMounts"]
                .as_sequence()
                .expect("volumeMounts")
                .iter()
                .map(|m| (yaml_str(&m["name"]), yaml_str(&m["mountPath"])))
                .collect();
            for (vname, _) in &mounts {
                assert!(
                    volumes.contains_key(*vname) || claim_templates.contains(*vname),
                    "{at}: volumeMount {vname} is no volume or claim template"
                );
            }
            let (config_volume, config_dir) = mounts
                .iter()
                .find(|(_, path)| is_within(config_path, path))
                .unwrap_or_else(|| panic!("{at}: nothing mounted at {config_path}"));
            let cm = volumes[*config_volume]["configMap"]["name"].as_str().expect("config from a ConfigMap");
            let key = config_path.strip_prefix(&format!("{config_dir}/")).expect("key under the mount");
            let file = k.config_maps[cm].get(key).unwrap_or_else(|| panic!("{at}: ConfigMap {cm} has no key {key}"));
            let config = ServerConfig::read(&deploy("kubernetes").join(file));
            assert_eq!(config.server, server, "{at}: {file} is not a {} config", server.binary());

            // Certificates from a Secret mount, each file one of the Secret's keys.
            for tls in config.tls_files() {
                let (vname, dir) = mounts
                    .iter()
                    .find(|(_, path)| is_within(&tls, path))
                    .unwrap_or_else(|| panic!("{at}: {tls} is on no mount"));
                let secret = volumes
                    .get(*vname)
                    .and_then(|v| v["secret"]["secretName"].as_str())
                    .unwrap_or_else(|| panic!("{at}: {tls} is not on a Secret mount"));
                let file_key = tls.strip_prefix(&format!("{dir}/")).unwrap();
                assert!(k.secrets[secret].contains(file_key), "{at}: Secret {secret} has no key {file_key}");
            }

            // The store on a claim: the StatefulSet's own template, or a claim the Deployment mounts.
            let (data_volume, _) = mounts
                .iter()
                .find(|(_, path)| is_within(config.data_dir(), path))
                .unwrap_or_else(|| panic!("{at}: data_dir {} is on no mount", config.data_dir()));
            let on_claim = claim_templates.contains(*data_volume)
                || volumes.get(*data_volume).is_some_and(|v| !v["persistentVolumeClaim"].is_null());
            assert!(on_claim, "{at}: data_dir {} is not on a volume claim", config.data_dir());
            if kind == "StatefulSet" {
                assert!(claim_templates.contains(*data_volume), "{at}: data_dir should be on the volumeClaimTemplate");
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
                let selects = service["spec"]["selector"]
                    .as_mapping()
                    .is_some_and(|sel| sel.iter().all(|(key, value)| labels.get(key) == Some(value)));
                if !selects {
                    continue;
                }
                for port in service["spec"]["ports"].as_sequence().expect("service ports") {
                    container_port(c, &port["targetPort"]);
                }
                match server {
                    Server::Directory => directory_service = Some((sname.clone(), config.grpc_port())),
                    Server::Node => {
                        let advertised = host_of(config.str("advertise_address"));
                        assert!(
                            advertised.starts_with(&format!("{sname}.{}", k.namespace)),
                            "{at}: advertise_address {advertised} is not Service {sname}"
                        );
                    }
                }
            }
            if server == Server::Node {
                node_configs.push(config);
            }
        }
    }
    assert!(workloads >= 2, "a directory and at least one node");
    let (directory_service, directory_port) = directory_service.expect("a Service in front of the directory");
    for config in node_configs {
        let address = config.str("directory_address");
        assert!(
            host_of(address).starts_with(&format!("{directory_service}.{}", k.namespace))
                && port_of(address, &config.path) == directory_port,
            "{}: directory_address {address} is not Service {directory_service} port {directory_port}",
            config.path.display()
        );
    }
}

fn yaml_strs_opt(v: &Yaml) -> Vec<String> {
    if v.is_null() {
        Vec::new()
    } else {
        yaml_strs(v)
    }
}

#[test]
fn kubernetes_certificate_script_fills_the_secrets_and_kustomize_builds() {
    let k = kustomized();
    let work = tempfile::tempdir().expect("tempdir");
    let ca = work.path().join("ca");
    let ca_str = ca.display().to_string();
    let out = e2e_tests::procs::exchangectl(&["pki", "init", "--dir", &ca_str]);
    assert!(out.status.success(), "pki init: {}", String::from_utf8_lossy(&out.stderr));

    // A copy of the folder, so that the repository's pki/ (git-ignored) is left alone.
    let copy = work.path().join("kubernetes");
    copy_dir(&deploy("kubernetes"), &copy);
    let _ = std::fs::remove_dir_all(copy.join("pki"));
    let said = run_script(&copy.join("issue-certs.sh"), &[&ca_str, &k.namespace], &[]);
    for file in &k.secret_files {
        assert!(copy.join(file).is_file(), "issue-certs.sh did not write {file}:\n{said}");
    }
    assert!(!copy.join("pki/ca.key").exists(), "the CA key must not go into a Secret");
    // Again: certificates are reused, not reissued.
    let before = snapshot(&ca);
    let again = run_script(&copy.join("issue-certs.sh"), &[&ca_str, &k.namespace], &[]);
    assert!(!again.contains("issued"), "{again}");
    assert_eq!(snapshot(&ca), before);

    if !have_kubectl() {
        return skip("kubectl kustomize", "kubectl is not installed");
    }
    let out = Command::new("kubectl").arg("kustomize").arg(&copy).output().expect("run kubectl");
    assert!(out.status.success(), "kubectl kustomize failed:\n{}", String::from_utf8_lossy(&out.stderr));
    let built = work.path().join("built.yaml");
    std::fs::write(&built, &out.stdout).unwrap();
    let objects = yaml_documents(&built);
    for (name, keys) in &k.secrets {
        let secret = objects
            .iter()
            .find(|o| o["kind"].as_str() == Some("Secret") && o["metadata"]["name"].as_str() == Some(name))
            .unwrap_or_else(|| panic!("kustomize built no Secret {name}"));
        let built_keys: BTreeSet<String> =
            secret["data"].as_mapping().expect("data").keys().map(|k| yaml_str(k).to_string()).collect();
        assert_eq!(&built_keys, keys, "Secret {name}");
    }
    for o in &objects {
        let (kind, name) = (yaml_str(&o["kind"]), yaml_str(&o["metadata"]["name"]));
        let namespace = if kind == "Namespace" { Some(name) } else { o["metadata"]["namespace"].as_str() };
        assert_eq!(namespace, Some(k.namespace.as_str()), "{kind} {name} is outside the namespace");
    }
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
    for folder in ["systemd/", "docker/", "kubernetes/", "prometheus/", "grafana/", "config/", "local/"] {
        assert!(readme.contains(folder), "deploy/README.md does not describe {folder}");
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
