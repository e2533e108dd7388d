//! The PostgreSQL server the directory's PostgreSQL tests run against.
//!
//! `scripts/test.sh` starts one server for the whole run (`scripts/postgres.sh`) and exports its superuser
//! URL as `GX_TEST_POSTGRES_URL`. A test process started some other way (`cargo test` alone) starts its own
//! from Debian's binaries, the same way the script does: a cluster in a temporary folder, 127.0.0.1 on a
//! free port, trust authentication, run as the `postgres` system user when we are root (initdb refuses
//! root). Each test takes a fresh database on it, so tests neither see nor wait for each other.
//!
//! A server this process started must not outlive it, but a test binary exits without running the
//! destructors of statics: a watchdog process (its own process group, so a Ctrl-C to the test run does not
//! kill it first) waits for this process to go, then stops the server and removes its folder.

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::OnceLock;
use std::time::{SystemTime, UNIX_EPOCH};

use directory::store::postgres::PostgresConfig;

/// Where an outside server's superuser URL comes from (scripts/test.sh sets it).
pub const URL_VARIABLE: &str = "GX_TEST_POSTGRES_URL";

/// The role a [`TestPostgres::start_private_with_tls`] server admits over TLS only.
pub const TLS_ONLY_ROLE: &str = "gx_tls_only";

/// One PostgreSQL server for this test process.
#[derive(Debug)]
pub struct TestPostgres {
    /// A superuser URL in the `postgresql://user@host:port/database` form.
    admin_url: String,
    /// The cluster folder, when this process started the server.
    started_in: Option<PathBuf>,
    /// A private server stops when dropped; the shared one when the process has gone.
    stop_on_drop: bool,
}

/// A certificate and key for a server that speaks TLS (PEM files).
#[derive(Clone, Debug)]
pub struct ServerTls {
    pub cert: PathBuf,
    pub key: PathBuf,
}

impl TestPostgres {
    /// The server for this process: `GX_TEST_POSTGRES_URL` (an admin connection URL, superuser) when set
    /// — scripts/test.sh starts one for the whole run — otherwise a server started now from the
    /// installed PostgreSQL binaries (/usr/lib/postgresql/*/bin) in a temporary folder on a free port, as
    /// the current user, or as the `postgres` system user when running as root (initdb refuses root).
    /// Panics with a clear message when PostgreSQL is not installed: tests never skip silently.
    pub fn shared() -> &'static TestPostgres {
        static SHARED: OnceLock<TestPostgres> = OnceLock::new();
        SHARED.get_or_init(|| match std::env::var(URL_VARIABLE) {
            Ok(url) if !url.trim().is_empty() => TestPostgres {
                admin_url: url.trim().to_string(),
                started_in: None,
                stop_on_drop: false,
            },
            _ => start_server(None, false)
                .unwrap_or_else(|e| panic!("cannot start a PostgreSQL server for the tests: {e}")),
        })
    }

    /// A server of its own (from the installed binaries, whatever `GX_TEST_POSTGRES_URL` says), stopped
    /// when dropped, that also speaks TLS with `tls`: it listens on 127.0.0.1 and 127.0.0.2 (so a client
    /// can reach it under an address its certificate does not name), admits the superuser `postgres` with
    /// or without TLS, and the role [`TLS_ONLY_ROLE`] (a superuser too) over TLS only.
    pub fn start_private_with_tls(tls: &ServerTls) -> TestPostgres {
        let server = start_server(Some(tls), false)
            .unwrap_or_else(|e| panic!("cannot start a PostgreSQL server with TLS: {e}"));
        let admin = server.admin_url.clone();
        let create_role = format!("CREATE ROLE {TLS_ONLY_ROLE} LOGIN SUPERUSER");
        run_sql(admin, vec![create_role]).unwrap_or_else(|e| panic!("{e}"));
        server
    }

    /// A server of its own with PostgreSQL's durable defaults (fsync, full page writes, synchronous
    /// commit), stopped when dropped: what the benchmark measures against.
    pub fn start_private_durable() -> TestPostgres {
        start_server(None, true).unwrap_or_else(|e| panic!("cannot start a PostgreSQL server: {e}"))
    }

    /// The port the server listens on.
    pub fn port(&self) -> u16 {
        let authority = self.admin_url.split("://").nth(1).unwrap_or_default();
        let host_port = authority.split(['/', '?']).next().unwrap_or_default();
        host_port
            .rsplit(':')
            .next()
            .and_then(|p| p.parse().ok())
            .expect("the admin URL names a port")
    }

    /// The superuser URL.
    pub fn admin_url(&self) -> &str {
        &self.admin_url
    }

    /// The cluster folder when this process started the server (None for `GX_TEST_POSTGRES_URL`).
    pub fn started_in(&self) -> Option<&Path> {
        self.started_in.as_deref()
    }

    /// A new empty database on it (unique name), as a connection URL for `[store.postgres] url`.
    ///
    /// Its default collation is a natural-language one that ignores punctuation (ICU, where the server
    /// has it), as production databases created with e.g. `en_US.UTF-8` have: `10/000001` then sorts
    /// before `1/000002`, so a query that forgets the schema's byte-order (`COLLATE "C"`) columns shows.
    ///
    /// Synchronous, so it can be called from async tests and plain ones alike: the `CREATE DATABASE` runs
    /// on a thread of its own with its own runtime.
    pub fn fresh_database(&self) -> String {
        static COUNTER: AtomicU64 = AtomicU64::new(0);
        let nanos = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map(|d| d.subsec_nanos())
            .unwrap_or(0);
        let name = format!(
            "gx_test_{}_{}_{}",
            std::process::id(),
            nanos,
            COUNTER.fetch_add(1, Ordering::Relaxed)
        );
        let create_natural = format!(
            "CREATE DATABASE {name} TEMPLATE template0 ENCODING 'UTF8' LOCALE_PROVIDER icu \
             ICU_LOCALE 'en-US-u-ka-shifted' LOCALE 'C'"
        );
        // Servers before 15, or built without ICU, refuse the first form.
        if run_sql(self.admin_url.clone(), vec![create_natural]).is_err() {
            if let Err(e) = run_sql(
                self.admin_url.clone(),
                vec![format!("CREATE DATABASE {name}")],
            ) {
                panic!("cannot create a test database: {e}");
            }
        }
        with_database(&self.admin_url, &name)
    }

    /// `[store.postgres]` for a fresh database: a small pool and a quick poll, as tests want.
    pub fn fresh_config(&self) -> PostgresConfig {
        let mut config = PostgresConfig::new(self.fresh_database());
        config.pool_size = 4;
        config.poll_interval_ms = 20;
        config
    }
}

impl Drop for TestPostgres {
    fn drop(&mut self) {
        if let (true, Some(dir)) = (self.stop_on_drop, &self.started_in) {
            if let Some(bin) = installed_bin_dir() {
                let owner = if is_root() {
                    postgres_user().ok()
                } else {
                    None
                };
                let _ = as_owner(bin.join("pg_ctl"), owner)
                    .arg("-D")
                    .arg(dir.join("data"))
                    .args(["-m", "immediate", "-w", "-t", "30", "stop"])
                    .stdin(Stdio::null())
                    .stdout(Stdio::null())
                    .stderr(Stdio::null())
                    .status();
            }
            let _ = std::fs::remove_dir_all(dir);
        }
    }
}

/// Runs `statements` one after the other as the superuser of `admin_url`, on a thread of its own with its
/// own runtime (so callers need not be async, and may be inside a runtime).
fn run_sql(admin_url: String, statements: Vec<String>) -> Result<(), String> {
    std::thread::spawn(move || -> Result<(), String> {
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .map_err(|e| format!("runtime: {e}"))?;
        runtime.block_on(async {
            let (client, connection) = tokio_postgres::connect(&admin_url, tokio_postgres::NoTls)
                .await
                .map_err(|e| format!("connect to the test server {admin_url}: {e}"))?;
            let driver = tokio::spawn(connection);
            let mut result = Ok(());
            for statement in &statements {
                if let Err(e) = client.batch_execute(statement).await {
                    result = Err(format!("{statement}: {e}"));
                    break;
                }
            }
            drop(client);
            let _ = driver.await;
            result
        })
    })
    .join()
    .unwrap_or_else(|_| Err("the SQL thread panicked".into()))
}

/// `url` (`postgresql://user@host:port/db?params`) with its database replaced by `database`.
pub fn with_database(url: &str, database: &str) -> String {
    let (base, query) = match url.split_once('?') {
        Some((base, query)) => (base, Some(query)),
        None => (url, None),
    };
    let authority_start = base.find("://").map_or(0, |i| i + 3);
    let path_start = base[authority_start..]
        .find('/')
        .map_or(base.len(), |i| authority_start + i);
    let mut out = format!("{}/{database}", &base[..path_start]);
    if let Some(query) = query {
        out.push('?');
        out.push_str(query);
    }
    out
}

/// The newest installed server binaries' folder, e.g. `/usr/lib/postgresql/15/bin`.
pub fn installed_bin_dir() -> Option<PathBuf> {
    let mut found: Vec<(u32, PathBuf)> = std::fs::read_dir("/usr/lib/postgresql")
        .ok()?
        .filter_map(|e| e.ok())
        .filter_map(|e| {
            let major: u32 = e.file_name().to_str()?.split('.').next()?.parse().ok()?;
            let bin = e.path().join("bin");
            bin.join("postgres").is_file().then_some((major, bin))
        })
        .collect();
    found.sort();
    found.pop().map(|(_, bin)| bin)
}

/// The uid and gid of the `postgres` system user, from /etc/passwd.
fn postgres_user() -> Result<(u32, u32), String> {
    let passwd = std::fs::read_to_string("/etc/passwd").map_err(|e| format!("/etc/passwd: {e}"))?;
    passwd
        .lines()
        .find_map(|line| {
            let fields: Vec<&str> = line.split(':').collect();
            (fields.len() > 3 && fields[0] == "postgres")
                .then(|| Some((fields[2].parse().ok()?, fields[3].parse().ok()?)))
                .flatten()
        })
        .ok_or_else(|| {
            "running as root needs the `postgres` system user (Debian's postgresql package creates it)".to_string()
        })
}

fn is_root() -> bool {
    // The owner of /proc/self is the process's effective user.
    use std::os::unix::fs::MetadataExt;
    std::fs::metadata("/proc/self")
        .map(|m| m.uid() == 0)
        .unwrap_or(false)
}

/// A command run as the server's owner: `postgres` when we are root, else ourselves.
fn as_owner(program: impl AsRef<std::ffi::OsStr>, owner: Option<(u32, u32)>) -> Command {
    use std::os::unix::process::CommandExt;
    let mut command = Command::new(program);
    if let Some((uid, gid)) = owner {
        command.uid(uid).gid(gid);
    }
    command
}

fn start_server(tls: Option<&ServerTls>, durable: bool) -> Result<TestPostgres, String> {
    let bin = installed_bin_dir().ok_or_else(|| {
        format!(
            "PostgreSQL is not installed (no /usr/lib/postgresql/*/bin/postgres). Install Debian's `postgresql` \
             package (scripts/test.sh does), or set {URL_VARIABLE} to a superuser URL of a running server"
        )
    })?;
    let owner = if is_root() {
        Some(postgres_user()?)
    } else {
        None
    };
    let dir = tempfile::Builder::new()
        .prefix("gx-test-postgres.")
        .tempdir()
        .map_err(|e| format!("temporary folder: {e}"))?
        .keep();
    if let Some((uid, gid)) = owner {
        std::os::unix::fs::chown(&dir, Some(uid), Some(gid))
            .map_err(|e| format!("chown {}: {e}", dir.display()))?;
    }
    let data = dir.join("data");
    let initdb = as_owner(bin.join("initdb"), owner)
        .arg("-D")
        .arg(&data)
        .args([
            "-U",
            "postgres",
            "--auth=trust",
            "--encoding=UTF8",
            "--no-locale",
        ])
        .stdin(Stdio::null())
        .output()
        .map_err(|e| format!("run {}: {e}", bin.join("initdb").display()))?;
    if !initdb.status.success() {
        let _ = std::fs::remove_dir_all(&dir);
        return Err(format!(
            "initdb failed: {}",
            String::from_utf8_lossy(&initdb.stderr)
        ));
    }
    // TCP on loopback only, no Unix socket (so no clash with a cluster of the distribution's package);
    // a throw-away server need not fsync (the benchmark's does: it compares with sled, which flushes).
    let mut settings = "\nunix_socket_directories = ''\nmax_connections = 300\n".to_string();
    if !durable {
        settings.push_str("fsync = off\nfull_page_writes = off\n");
    }
    match tls {
        None => settings.push_str("listen_addresses = '127.0.0.1'\n"),
        Some(tls) => {
            settings.push_str("listen_addresses = '127.0.0.1,127.0.0.2'\nssl = on\n");
            settings.push_str("ssl_cert_file = 'server.crt'\nssl_key_file = 'server.key'\n");
            for (from, to) in [(&tls.cert, "server.crt"), (&tls.key, "server.key")] {
                let to = data.join(to);
                std::fs::copy(from, &to)
                    .map_err(|e| format!("copy {} to {}: {e}", from.display(), to.display()))?;
                // The server refuses a key others may read.
                std::fs::set_permissions(&to, std::os::unix::fs::PermissionsExt::from_mode(0o600))
                    .map_err(|e| format!("chmod {}: {e}", to.display()))?;
                if let Some((uid, gid)) = owner {
                    std::os::unix::fs::chown(&to, Some(uid), Some(gid))
                        .map_err(|e| format!("chown {}: {e}", to.display()))?;
                }
            }
            // First match wins: the TLS-only role is turned away without TLS, anyone may come over TLS.
            let hba = data.join("pg_hba.conf");
            let old =
                std::fs::read_to_string(&hba).map_err(|e| format!("{}: {e}", hba.display()))?;
            let rules = format!("hostnossl all {TLS_ONLY_ROLE} all reject\nhostssl all all 127.0.0.0/8 trust\n{old}");
            std::fs::write(&hba, rules).map_err(|e| format!("{}: {e}", hba.display()))?;
        }
    }
    let conf = data.join("postgresql.conf");
    let mut text =
        std::fs::read_to_string(&conf).map_err(|e| format!("{}: {e}", conf.display()))?;
    text.push_str(&settings);
    std::fs::write(&conf, text).map_err(|e| format!("{}: {e}", conf.display()))?;

    let log = dir.join("server.log");
    let mut last_error = String::new();
    // A port free now may be taken before the server binds it: try a few.
    for _ in 0..5 {
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .and_then(|l| l.local_addr())
            .map_err(|e| format!("find a free port: {e}"))?
            .port();
        let started = as_owner(bin.join("pg_ctl"), owner)
            .arg("-D")
            .arg(&data)
            .arg("-l")
            .arg(&log)
            .args(["-o", &format!("-p {port}"), "-w", "-t", "60", "start"])
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .output()
            .map_err(|e| format!("run pg_ctl: {e}"))?;
        if started.status.success() {
            spawn_watchdog(&bin, &dir, owner)?;
            return Ok(TestPostgres {
                admin_url: format!("postgresql://postgres@127.0.0.1:{port}/postgres"),
                started_in: Some(dir),
                stop_on_drop: tls.is_some() || durable,
            });
        }
        last_error = format!(
            "{}\n{}",
            String::from_utf8_lossy(&started.stderr),
            std::fs::read_to_string(&log).unwrap_or_default()
        );
    }
    let _ = std::fs::remove_dir_all(&dir);
    Err(format!("the server did not start: {last_error}"))
}

/// Starts the process that stops the server and removes `dir` once this process has gone.
fn spawn_watchdog(bin: &Path, dir: &Path, owner: Option<(u32, u32)>) -> Result<(), String> {
    use std::os::unix::process::CommandExt;
    // Polls /proc rather than `kill -0`: the watchdog may run as another user than this process.
    let script = r#"
        while [ -e "/proc/$0" ]; do sleep 1; done
        "$1/pg_ctl" -D "$2/data" -m fast -w -t 30 stop >/dev/null 2>&1 ||
            "$1/pg_ctl" -D "$2/data" -m immediate -w -t 30 stop >/dev/null 2>&1
        rm -rf "$2"
    "#;
    as_owner("/bin/sh", owner)
        .arg("-c")
        .arg(script)
        .arg(std::process::id().to_string())
        .arg(bin)
        .arg(dir)
        .process_group(0)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .map(drop)
        .map_err(|e| format!("start the server's watchdog: {e}"))
}

#[cfg(test)]
mod tests {
    use super::with_database;

    #[test]
    fn database_is_replaced_in_the_url() {
        assert_eq!(
            with_database("postgresql://postgres@127.0.0.1:5/postgres", "x"),
            "postgresql://postgres@127.0.0.1:5/x"
        );
        assert_eq!(with_database("postgres://u@h:5", "x"), "postgres://u@h:5/x");
        assert_eq!(
            with_database("postgresql://u@h:5/postgres?sslmode=disable", "x"),
            "postgresql://u@h:5/x?sslmode=disable"
        );
    }
}
