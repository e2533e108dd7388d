//! The live console in a real browser: headless Chromium driven over WebDriver (chromedriver, through
//! fantoccini) against the real `directory` and `exchange-node` binaries with admin ports and a token file.
//! The test reads the live DOM of one open page while traffic flows, so it sees what an operator sees:
//! figures that grow, a refusal that appears, a banner when the session ends, and no data without the token.
//!
//! Skipped only when `/usr/bin/chromium` is missing and `GX_REQUIRE_CHROMIUM` is unset; CI sets it, so CI
//! fails instead of skipping when the browser is not there. Debian's packages: `chromium chromium-driver`.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::thread::ScopedJoinHandle;
use std::time::{Duration, Instant};

use e2e_tests::procs::{free_port, wait_for, Proc};
use fantoccini::{Client, ClientBuilder, Locator};
use serde_json::{json, Value};

const CHROMIUM: &str = "/usr/bin/chromium";
const CHROMEDRIVER: &str = "/usr/bin/chromedriver";
/// Long enough for a cold start of Chromium on a loaded 2-core CI box; the page itself polls every second.
const PAGE_WAIT: Duration = Duration::from_secs(30);
const LIVE_WAIT: Duration = Duration::from_secs(15);

const REGISTRATION: &str = "101001/000001"; // commerce's enterprise registration, unconditional
const PENALTIES: &str = "302001/000001"; // commerce's administrative penalties, conditional: needs a grant
const COMPANY: &str = "91350100M000100Y43";
const TOKEN: &str = "console-test-token-5b1f0c9e7a24d3";

fn repo_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).parent().expect("repo root").to_path_buf()
}

/// Whether the browser is there; panics when it is required (CI) but missing.
fn chromium_available() -> bool {
    if Path::new(CHROMIUM).exists() {
        assert!(
            Path::new(CHROMEDRIVER).exists(),
            "{CHROMIUM} is installed but {CHROMEDRIVER} is not: apt-get install chromium-driver"
        );
        return true;
    }
    assert!(
        std::env::var_os("GX_REQUIRE_CHROMIUM").is_none(),
        "GX_REQUIRE_CHROMIUM is set but {CHROMIUM} is missing: apt-get install chromium chromium-driver \
         (scripts/test.sh does it when run as root)"
    );
    eprintln!("SKIPPED console test: {CHROMIUM} is missing (apt-get install chromium chromium-driver)");
    false
}

/// Polls `f` every 100 ms for up to [`LIVE_WAIT`], and stops early (with None) once `worker` has finished:
/// a query thread that failed leaves nothing to wait for.
fn wait_for_while<T, W>(worker: &ScopedJoinHandle<'_, W>, mut f: impl FnMut() -> Option<T>) -> Option<T> {
    let deadline = Instant::now() + LIVE_WAIT;
    while Instant::now() < deadline && !worker.is_finished() {
        if let Some(v) = f() {
            return Some(v);
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    f()
}

/// A directory and two department nodes, each with an admin port opened by one token file.
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
        std::fs::write(site.path("config/admin.token"), format!("{TOKEN}\n")).unwrap();
        site
    }

    fn path(&self, rel: &str) -> PathBuf {
        self.home.path().join(rel)
    }

    fn directory_addr(&self) -> String {
        format!("127.0.0.1:{}", self.directory_port)
    }

    /// exchangectl as certificate `identity`; (success, stdout + stderr).
    fn ctl(&self, identity: &str, args: &[&str]) -> (bool, String) {
        let pki = self.path("pki").display().to_string();
        let dir = self.directory_addr();
        let mut all = vec!["--pki-dir", &pki, "--identity", identity, "--directory", &dir];
        all.extend_from_slice(args);
        let out = e2e_tests::procs::exchangectl(&all);
        (
            out.status.success(),
            format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr)),
        )
    }

    fn init_pki(&self) {
        let pki = self.path("pki").display().to_string();
        let out = e2e_tests::procs::exchangectl(&["pki", "init", "--dir", &pki]);
        assert!(out.status.success(), "pki init: {}", String::from_utf8_lossy(&out.stderr));
        let mut identities =
            vec![("central", "directory", "directory".to_string()), ("central", "operator", "central-operator".into())];
        for d in ["commerce", "quality"] {
            identities.extend([
                (d, "node", format!("{d}-node")),
                (d, "operator", format!("{d}-operator")),
                (d, "app", format!("{d}-app")),
            ]);
        }
        for (dept, role, name) in identities {
            let out = e2e_tests::procs::exchangectl(&[
                "pki", "issue", "--dir", &pki, "--dept", dept, "--role", role, "--name", &name,
            ]);
            assert!(out.status.success(), "pki issue {name}: {}", String::from_utf8_lossy(&out.stderr));
        }
    }

    /// The `[tls]` and `[admin]` tables of server `cert`; the token file is relative to the config file.
    fn tls_and_admin(&self, cert: &str, admin_port: u16) -> String {
        let pki = self.path("pki");
        format!(
            "\n[tls]\nca = \"{ca}\"\ncert = \"{crt}\"\nkey = \"{key}\"\n\n[admin]\nlisten = \"127.0.0.1:{admin_port}\"\ntoken_file = \"admin.token\"\n",
            ca = pki.join("ca.crt").display(),
            crt = pki.join(format!("{cert}.crt")).display(),
            key = pki.join(format!("{cert}.key")).display(),
        )
    }

    fn start_directory(&self, admin_port: u16) -> Proc {
        let config = self.path("config/directory.toml");
        let text = format!(
            "listen = \"{addr}\"\ndata_dir = \"{data}\"\nlease_ttl_seconds = 15\n{tables}",
            addr = self.directory_addr(),
            data = self.path("data/directory").display(),
            tables = self.tls_and_admin("directory", admin_port),
        );
        std::fs::write(&config, text).unwrap();
        let proc = Proc::start(
            "directory",
            "directory",
            &["--config", config.to_str().unwrap()],
            &self.path("logs/directory.log"),
        );
        wait_for("the directory to answer", Duration::from_secs(30), || {
            self.ctl("central-operator", &["whoami"]).0.then_some(())
        });
        proc
    }

    fn start_node(&self, dept: &str, port: u16, admin_port: u16) -> Proc {
        let config = self.path(&format!("config/{dept}-node.toml"));
        let text = format!(
            "listen = \"127.0.0.1:{port}\"\nadvertise_address = \"127.0.0.1:{port}\"\ndirectory_address = \"{dir}\"\ndata_dir = \"{data}\"\ncatalog_file = \"{catalog}\"\n{tables}",
            dir = self.directory_addr(),
            data = self.path(&format!("data/{dept}-node")).display(),
            catalog = repo_root().join(format!("deploy/local/catalog/{dept}.toml")).display(),
            tables = self.tls_and_admin(&format!("{dept}-node"), admin_port),
        );
        std::fs::write(&config, text).unwrap();
        Proc::start(
            &format!("{dept}-node"),
            "exchange-node",
            &["--config", config.to_str().unwrap()],
            &self.path(&format!("logs/{dept}-node.log")),
        )
    }

    fn node_online(&self, dept: &str) -> bool {
        let (ok, out) = self.ctl("central-operator", &["--json", "nodes"]);
        let nodes: Value = if ok { serde_json::from_str(&out).unwrap_or_default() } else { Value::Null };
        nodes["nodes"]
            .as_array()
            .is_some_and(|list| list.iter().any(|n| n["department"] == dept && n["status"] == "online"))
    }
}

/// chromedriver, in a process group of its own so that the Chromium it starts is killed with it, even
/// when a failed test never closed its session.
struct ChromeDriver(Child);

impl Drop for ChromeDriver {
    fn drop(&mut self) {
        let _ = Command::new("kill").args(["-KILL", "--", &format!("-{}", self.0.id())]).status();
        let _ = self.0.wait();
    }
}

/// One WebDriver session, used synchronously so the test reads like the steps an operator takes.
struct Browser {
    runtime: tokio::runtime::Runtime,
    client: Option<Client>,
    _driver: ChromeDriver,
    _profile: tempfile::TempDir,
}

impl Browser {
    fn start(log: &Path) -> Browser {
        use std::os::unix::process::CommandExt;
        let port = free_port();
        let driver = ChromeDriver(
            Command::new(CHROMEDRIVER)
                .args([format!("--port={port}"), format!("--log-path={}", log.display())])
                .stdin(Stdio::null())
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .process_group(0)
                .spawn()
                .expect("start chromedriver"),
        );
        let runtime = tokio::runtime::Builder::new_multi_thread().worker_threads(1).enable_all().build().unwrap();
        let profile = tempfile::tempdir().expect("profile dir");
        // The machine has no network beyond loopback: nothing may phone home, and the admin port's
        // certificate comes from the test CA, which Chromium does not know.
        let args = [
            "--headless",
            "--no-sandbox",
            "--disable-gpu",
            "--disable-quic",
            "--no-first-run",
            "--disable-background-networking",
            "--disable-component-update",
            "--disable-sync",
            "--disable-dev-shm-usage",
            "--ignore-certificate-errors",
            "--window-size=1400,2000",
        ]
        .map(String::from)
        .into_iter()
        .chain([format!("--user-data-dir={}", profile.path().display())])
        .collect::<Vec<_>>();
        let capabilities = json!({
            "browserName": "chrome",
            "acceptInsecureCerts": true,
            "goog:chromeOptions": { "binary": CHROMIUM, "args": args },
        });
        let capabilities = capabilities.as_object().unwrap().clone();
        let url = format!("http://127.0.0.1:{port}");
        let deadline = Instant::now() + PAGE_WAIT;
        let client = loop {
            let mut builder = ClientBuilder::new(hyper_util::client::legacy::connect::HttpConnector::new());
            builder.capabilities(capabilities.clone());
            match runtime.block_on(builder.connect(&url)) {
                Ok(client) => break client,
                // chromedriver takes a moment to listen
                Err(_) if Instant::now() < deadline => std::thread::sleep(Duration::from_millis(200)),
                Err(e) => panic!(
                    "no WebDriver session from {CHROMEDRIVER}: {e}\n{}",
                    std::fs::read_to_string(log).unwrap_or_default()
                ),
            }
        };
        Browser { runtime, client: Some(client), _driver: driver, _profile: profile }
    }

    fn client(&self) -> &Client {
        self.client.as_ref().expect("session open")
    }

    fn goto(&self, url: &str) {
        self.runtime.block_on(self.client().goto(url)).unwrap_or_else(|e| panic!("open {url}: {e}"));
    }

    /// Runs `script` in the page (a function body; a returned promise is awaited) and returns its value.
    fn js(&self, script: &str) -> Value {
        self.runtime
            .block_on(self.client().execute(script, vec![]))
            .unwrap_or_else(|e| panic!("script failed: {e}\n{script}"))
    }

    fn text(&self, id: &str) -> String {
        self.js(&format!("const e = document.getElementById('{id}'); return e ? e.textContent.trim() : null"))
            .as_str()
            .unwrap_or("")
            .to_string()
    }

    /// The number an element shows (`12,345` included); None while it shows a placeholder.
    fn number(&self, id: &str) -> Option<u64> {
        self.text(id).replace(',', "").parse().ok()
    }

    fn updated(&self) -> i64 {
        self.js("return Number(document.body.dataset.updated || 0)").as_i64().unwrap_or(0)
    }

    /// Rows of a table body as [data-* attributes, cell texts] objects.
    fn rows(&self, tbody_selector: &str) -> Vec<Value> {
        let script = format!(
            "return Array.from(document.querySelectorAll('{tbody_selector} tr')).map(tr => \
             ({{data: Object.assign({{}}, tr.dataset), cells: Array.from(tr.cells).map(c => c.textContent)}}))"
        );
        self.js(&script).as_array().cloned().unwrap_or_default()
    }

    /// Saves `<name>.png` of the page into the folder `GX_CONSOLE_SCREENSHOTS` names, if set: to look at
    /// what the test saw.
    fn screenshot_if_asked(&self, name: &str) {
        if let Some(dir) = std::env::var_os("GX_CONSOLE_SCREENSHOTS") {
            let png = self.runtime.block_on(self.client().screenshot()).expect("screenshot");
            std::fs::write(Path::new(&dir).join(format!("{name}.png")), png).expect("write the screenshot");
        }
    }

    fn delete_cookies(&self) {
        self.runtime.block_on(self.client().delete_all_cookies()).expect("delete cookies");
    }

    fn type_and_submit(&self, input: &str, value: &str, button: &str) {
        self.runtime
            .block_on(async {
                let field = self.client().find(Locator::Id(input)).await?;
                field.send_keys(value).await?;
                self.client().find(Locator::Id(button)).await?.click().await
            })
            .expect("fill the login form");
    }
}

impl Drop for Browser {
    fn drop(&mut self) {
        if let Some(client) = self.client.take() {
            let _ =
                self.runtime.block_on(async { tokio::time::timeout(Duration::from_secs(10), client.close()).await });
        }
    }
}

#[test]
fn console_shows_live_traffic_refusals_and_needs_the_token() {
    if !chromium_available() {
        return;
    }
    let site = Site::new();
    site.init_pki();
    let directory_admin = free_port();
    let _directory = site.start_directory(directory_admin);
    let (commerce_port, commerce_admin) = (free_port(), free_port());
    let (quality_port, quality_admin) = (free_port(), free_port());
    let _commerce = site.start_node("commerce", commerce_port, commerce_admin);
    let _quality = site.start_node("quality", quality_port, quality_admin);
    for dept in ["commerce", "quality"] {
        wait_for(&format!("{dept} online"), Duration::from_secs(30), || site.node_online(dept).then_some(()));
    }
    let at = |identity: &str, port: u16, args: &[&str]| {
        let node = format!("127.0.0.1:{port}");
        site.ctl(identity, &[&["--node", node.as_str()], args].concat())
    };
    let records = repo_root().join("deploy/local/records");
    for (resource, file) in [(REGISTRATION, "commerce-enterprises.json"), (PENALTIES, "commerce-penalties.json")] {
        let file = records.join(file);
        wait_for("commerce's records stored", Duration::from_secs(30), || {
            at(
                "commerce-app",
                commerce_port,
                &["records", "put", "--resource", resource, "--file", file.to_str().unwrap()],
            )
            .0
            .then_some(())
        });
    }

    let browser = Browser::start(&site.path("logs/chromedriver.log"));
    let commerce = format!("https://127.0.0.1:{commerce_admin}");

    // The token opens the console (GET /login?token=... sets the cookie and redirects to /), and the page
    // fills in: the node's identity, its catalog with Chinese names, its certificate.
    browser.goto(&format!("{commerce}/login?token={TOKEN}"));
    wait_for("the console's first update", PAGE_WAIT, || (browser.updated() > 0).then_some(()));
    assert_eq!(browser.text("identity-department"), "commerce");
    assert_eq!(browser.text("identity-name"), "commerce-node");
    assert_eq!(browser.text("server-kind"), "exchange-node");
    let catalog = wait_for("the catalog table", LIVE_WAIT, || {
        let rows = browser.rows("#catalog-table tbody");
        rows.iter().any(|r| r["data"]["code"] == REGISTRATION).then_some(rows)
    });
    let registration = catalog.iter().find(|r| r["data"]["code"] == REGISTRATION).unwrap();
    assert_eq!(registration["cells"][1], "企业登记信息", "{registration}");
    assert!(browser.number("cert-days").is_some_and(|d| d > 0), "certificate days left: {}", browser.text("cert-days"));
    wait_for("the node to report ready", LIVE_WAIT, || {
        (browser.js("return document.getElementById('ready-badge').dataset.ready") == "true").then_some(())
    });
    assert!(browser.js("return document.getElementById('banner').hidden") == true, "no banner while polls succeed");

    // Relayed queries from quality, made until the page has shown them: the figures of the same open page
    // grow, and its request rate rises above zero while they flow.
    let before = wait_for("a request total", LIVE_WAIT, || browser.number("total-requests"));
    let updated_before = browser.updated();
    let shown = AtomicBool::new(false);
    let (after, made) = std::thread::scope(|scope| {
        let queries = scope.spawn(|| {
            let mut made = 0u64;
            // bounded, in case the page never shows them
            while !shown.load(Ordering::Relaxed) && made < 200 {
                let query = ["records", "get", "--resource", REGISTRATION, COMPANY, "--purpose", "控制台测试"];
                let (ok, out) = at("quality-app", quality_port, &query);
                if !ok {
                    return Err(format!("quality reads commerce's registration: {out}"));
                }
                made += 1;
            }
            Ok(made)
        });
        let grown = || browser.number("total-requests").filter(|n| *n > before);
        let rising = || browser.text("total-rate").parse::<f64>().ok().filter(|r| *r > 0.0);
        let seen = wait_for_while(&queries, || grown().zip(rising()));
        shown.store(true, Ordering::Relaxed);
        let made = queries.join().expect("query thread").unwrap_or_else(|e| panic!("{e}"));
        let (after, _) = seen.unwrap_or_else(|| {
            panic!(
                "within {LIVE_WAIT:?}, #total-requests did not grow past {before} with a req/s above zero: {} req/s",
                browser.text("total-rate")
            )
        });
        (after, made)
    });
    assert!(browser.updated() > updated_before, "the page polled again");
    let inbound = wait_for("every relayed query in quality's inbound traffic row", LIVE_WAIT, || {
        browser.rows("#traffic-table tbody").into_iter().find(|r| {
            let count: u64 = r["cells"][3].as_str().unwrap_or("").replace(',', "").parse().unwrap_or(0);
            r["data"]["direction"] == "inbound"
                && r["data"]["peer"] == "quality"
                && r["data"]["resource"] == REGISTRATION
                && count >= made
        })
    });
    eprintln!("{made} relayed queries; total {before} -> {after}; row {inbound}");

    // Quality has no grant for the penalties: commerce refuses, and the refusal shows up in the list.
    let (ok, out) = at("quality-app", quality_port, &["records", "get", "--resource", PENALTIES, COMPANY]);
    assert!(
        !ok && (out.contains("PERMISSION_DENIED") || out.to_lowercase().contains("grant")),
        "quality must be refused: {out}"
    );
    let refused = wait_for("a PERMISSION_DENIED row in #refused-list", LIVE_WAIT, || {
        browser.rows("#refused-list").into_iter().find(|r| r["data"]["code"] == "PERMISSION_DENIED")
    });
    assert!(refused["cells"][1].as_str().unwrap_or("").contains("quality"), "the refused caller is named: {refused}");

    // Quality asks for access: the pending grant appears in commerce's grants table.
    let (ok, out) = at(
        "quality-app",
        quality_port,
        &[
            "--json",
            "grants",
            "request",
            "--resource",
            PENALTIES,
            "--items",
            "统一社会信用代码,当事人名称",
            "--purpose",
            "控制台测试",
        ],
    );
    assert!(ok, "grant request: {out}");
    let grant: Value = serde_json::from_str(&out).unwrap_or_else(|e| panic!("not JSON ({e}): {out}"));
    let id = grant["grant_id"]
        .as_str()
        .or_else(|| grant["grant"]["grant_id"].as_str())
        .unwrap_or_else(|| panic!("{grant}"))
        .to_string();
    let row = wait_for("the grant in #grants-table", LIVE_WAIT, || {
        browser.rows("#grants-table tbody").into_iter().find(|r| r["data"]["id"] == id.as_str())
    });
    assert_eq!(row["cells"][4], "pending", "{row}");
    browser.screenshot_if_asked("console");

    // The session ends (cookie gone): a banner says so, and the last figures stay on the page.
    let shown = browser.number("total-requests");
    browser.delete_cookies();
    let banner = wait_for("the 401 banner", LIVE_WAIT, || {
        let visible =
            browser.js("const b = document.getElementById('banner'); return !b.hidden && b.dataset.status === '401'");
        (visible == true).then(|| browser.text("banner"))
    });
    assert!(banner.contains("401"), "{banner}");
    assert_eq!(browser.number("total-requests"), shown, "the last figures stay");

    // A wrong token: the login page again, with the error, and no data.
    browser.goto(&format!("{commerce}/login?token=not-the-token-at-all"));
    assert!(
        browser.text("login-error").contains("wrong token"),
        "login page with an error: {}",
        browser.text("login-error")
    );
    browser.screenshot_if_asked("login-refused");
    assert_eq!(browser.js("return document.getElementById('login-form') !== null"), true);
    assert_eq!(browser.js("return document.getElementById('total-requests') === null && document.getElementById('catalog-table') === null"), true);
    assert_eq!(
        browser.js("return fetch('/api/catalog').then(r => r.status)"),
        401,
        "the API refuses a browser without the cookie"
    );
    assert!(!browser.js("return document.documentElement.outerHTML").as_str().unwrap_or("").contains("企业登记信息"));
    // Without any cookie, / is the login page too.
    browser.goto(&format!("{commerce}/"));
    assert_eq!(browser.js("return document.getElementById('login-form') !== null && document.getElementById('catalog-table') === null"), true);

    // Signing in with the form (POST /login) brings the live console back.
    browser.type_and_submit("token", TOKEN, "login-submit");
    wait_for("the console after signing in with the form", PAGE_WAIT, || {
        (browser.js("return document.getElementById('catalog-table') !== null").as_bool() == Some(true)
            && browser.updated() > 0)
            .then_some(())
    });
    let total = browser.number("total-requests").expect("a total after signing in");
    assert!(total >= after, "{total} >= {after}");

    // The directory serves the same console with what applies to it.
    browser.goto(&format!("https://127.0.0.1:{directory_admin}/login?token={TOKEN}"));
    wait_for("the directory's console", PAGE_WAIT, || {
        (browser.text("server-kind") == "directory" && browser.updated() > 0).then_some(())
    });
    wait_for("two nodes online in the directory's console", LIVE_WAIT, || {
        (browser.number("nodes-online") == Some(2)).then_some(())
    });
    assert_eq!(
        browser.js("return document.getElementById('directory-facts').hidden"),
        true,
        "no directory state on the directory"
    );
    browser.screenshot_if_asked("directory");
}
