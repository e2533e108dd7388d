//! `exchangectl status`, `top`, `peers`, `outbox` and `admin maintenance|reload|ready`: a server's admin
//! port (`--admin`) read from the command line.
//!
//! The admin port reports counters since the server started; rates are ours to compute, from two
//! `/api/traffic` snapshots (their `at_unix_ms` is the server's clock, so a slow network does not skew
//! the window). Everything printed is made by pure functions of the `admin::api` documents, tested below.

use std::collections::BTreeMap;
use std::io::IsTerminal;
use std::time::{Duration, Instant};

use serde::Serialize;

use super::args::AdminCommand;
use super::output::{format_age, format_unix, now_unix_ms};
use super::table::{Align, Table};
use super::{CliError, Ctx};
use crate::admin::api::{
    BacklogSummary, CertificateInfo, DirectoryState, MaintenanceRequest, OutboxReport, OutboxRow, PeerInfo, PeersReport,
    Readiness, RefusedReport, RefusedRequest, ReloadReport, StatusReport, TrafficReport, TrafficRow,
};
use crate::admin::client::{AdminClient, AdminClientError};

/// What a 401 means for the person at the keyboard: which credentials the admin port takes.
const CREDENTIALS_HINT: &str = "the admin port takes an operator certificate of the server's department \
     (--pki-dir/--identity or --cert/--key) or its bearer token (--admin-token-file)";

/// Adds the credentials hint to a refusal (401 none or a wrong token, 403 a certificate that is not an
/// operator's of the server's department); every other error passes unchanged.
fn admin_error(e: AdminClientError) -> CliError {
    match e {
        AdminClientError::Status { status: status @ (401 | 403), message } => {
            let message = if message.is_empty() { CREDENTIALS_HINT.to_string() } else { format!("{message}; {CREDENTIALS_HINT}") };
            CliError::Admin(AdminClientError::Status { status, message })
        }
        other => CliError::Admin(other),
    }
}

async fn get<T: serde::de::DeserializeOwned>(admin: &AdminClient, path: &str) -> Result<T, CliError> {
    admin.get_json(path).await.map_err(admin_error)
}

// ---- rates from two traffic snapshots ----

/// One traffic row over a window: the change between two snapshots, per second.
#[derive(Clone, Debug, Serialize, PartialEq)]
pub struct RateRow {
    pub direction: String,
    pub peer: String,
    pub resource: String,
    pub requests_per_second: f64,
    /// Errors among the window's requests, in percent; none when the window had no request.
    pub error_percent: Option<f64>,
    /// Mean latency of the window's requests.
    pub avg_latency_ms: Option<f64>,
    pub window_requests: u64,
    pub window_errors: u64,
    /// Since the server started.
    pub total_requests: u64,
    pub total_errors: u64,
}

/// Rates of every traffic row over one window.
#[derive(Clone, Debug, Serialize, PartialEq)]
pub struct RateWindow {
    pub seconds: f64,
    /// Busiest first.
    pub rows: Vec<RateRow>,
}

type RowKey<'a> = (&'a str, &'a str, &'a str);

fn row_key(r: &TrafficRow) -> RowKey<'_> {
    (r.direction.as_str(), r.peer.as_str(), r.resource.as_str())
}

/// The rates between two snapshots. The window is the servers' own clock difference; `measured` (our
/// clock) stands in when the server's is unusable. A counter that went down means the server restarted
/// between the snapshots: its whole count then belongs to the window.
pub fn traffic_rates(before: &TrafficReport, after: &TrafficReport, measured: Duration) -> RateWindow {
    let server_ms = after.at_unix_ms - before.at_unix_ms;
    let seconds = if server_ms > 0 { server_ms as f64 / 1000.0 } else { measured.as_secs_f64() }.max(0.001);
    let earlier: BTreeMap<RowKey, &TrafficRow> = before.rows.iter().map(|r| (row_key(r), r)).collect();
    let mut rows: Vec<RateRow> = after
        .rows
        .iter()
        .map(|now| {
            let (requests, errors, latency_ms) = match earlier.get(&row_key(now)) {
                Some(then) if now.requests >= then.requests => (
                    now.requests - then.requests,
                    now.errors.saturating_sub(then.errors),
                    (now.latency_ms_sum - then.latency_ms_sum).max(0.0),
                ),
                _ => (now.requests, now.errors, now.latency_ms_sum),
            };
            RateRow {
                direction: now.direction.clone(),
                peer: now.peer.clone(),
                resource: now.resource.clone(),
                requests_per_second: requests as f64 / seconds,
                error_percent: percent(errors, requests),
                avg_latency_ms: (requests > 0).then(|| latency_ms / requests as f64),
                window_requests: requests,
                window_errors: errors,
                total_requests: now.requests,
                total_errors: now.errors,
            }
        })
        .collect();
    rows.sort_by(|a, b| {
        b.window_requests
            .cmp(&a.window_requests)
            .then(b.total_requests.cmp(&a.total_requests))
            .then_with(|| (&a.direction, &a.peer, &a.resource).cmp(&(&b.direction, &b.peer, &b.resource)))
    });
    RateWindow { seconds, rows }
}

fn percent(part: u64, whole: u64) -> Option<f64> {
    (whole > 0).then(|| part as f64 * 100.0 / whole as f64)
}

/// Requests per second and error share of a group of rows.
#[derive(Clone, Debug, Default, Serialize, PartialEq)]
pub struct RateSummary {
    pub requests_per_second: f64,
    pub error_percent: Option<f64>,
    pub window_requests: u64,
    pub window_errors: u64,
}

fn summarize<'a>(rows: impl IntoIterator<Item = &'a RateRow>, seconds: f64) -> RateSummary {
    let (requests, errors) = rows.into_iter().fold((0, 0), |(r, e), row| (r + row.window_requests, e + row.window_errors));
    RateSummary {
        requests_per_second: requests as f64 / seconds,
        error_percent: percent(errors, requests),
        window_requests: requests,
        window_errors: errors,
    }
}

/// The rates `status` shows. A relayed query that reaches this node is also a gRPC call it serves, so
/// `served` already holds `relayed_in`; what this node relays to others is `relayed_out`.
#[derive(Clone, Debug, Default, Serialize, PartialEq)]
pub struct StatusRates {
    pub window_seconds: f64,
    /// Every gRPC call served (`api` rows).
    pub served: RateSummary,
    /// Relayed record queries other nodes sent here (`inbound` rows).
    pub relayed_in: RateSummary,
    /// Relayed record queries this node sent to providers (`outbound` rows).
    pub relayed_out: RateSummary,
    /// Per peer department: calls it made here plus calls relayed to it.
    pub by_peer: BTreeMap<String, RateSummary>,
}

impl StatusRates {
    pub fn from_window(window: &RateWindow) -> Self {
        let direction = |d: &'static str| window.rows.iter().filter(move |r| r.direction == d);
        let mut peers: BTreeMap<String, Vec<&RateRow>> = BTreeMap::new();
        for row in window.rows.iter().filter(|r| r.direction == "api" || r.direction == "outbound") {
            if !row.peer.is_empty() {
                peers.entry(row.peer.clone()).or_default().push(row);
            }
        }
        StatusRates {
            window_seconds: window.seconds,
            served: summarize(direction("api"), window.seconds),
            relayed_in: summarize(direction("inbound"), window.seconds),
            relayed_out: summarize(direction("outbound"), window.seconds),
            by_peer: peers.into_iter().map(|(peer, rows)| (peer, summarize(rows, window.seconds))).collect(),
        }
    }
}

// ---- formatting ----

fn rate_text(rps: f64) -> String {
    if rps > 0.0 && rps < 0.1 {
        format!("{rps:.2}")
    } else {
        format!("{rps:.1}")
    }
}

fn percent_text(p: Option<f64>) -> String {
    p.map_or_else(|| "-".to_string(), |p| format!("{p:.1}%"))
}

fn summary_text(s: &RateSummary) -> String {
    match s.error_percent {
        Some(p) => format!("{} req/s, {p:.1}% errors", rate_text(s.requests_per_second)),
        None => "0 req/s".to_string(),
    }
}

/// `3d 4h`, `5h 12m`, `12m 5s`, `45s`.
pub fn format_uptime(secs: u64) -> String {
    let (d, h, m, s) = (secs / 86_400, secs % 86_400 / 3600, secs % 3600 / 60, secs % 60);
    match (d, h, m) {
        (0, 0, 0) => format!("{s}s"),
        (0, 0, _) => format!("{m}m {s}s"),
        (0, _, _) => format!("{h}h {m}m"),
        _ => format!("{d}d {h}h"),
    }
}

/// An age in seconds, coarse: `45s`, `12m`, `5h`, `2d`; `-` for none.
fn age_text(secs: f64) -> String {
    if secs <= 0.0 {
        return "-".to_string();
    }
    super::output::format_secs(secs.round() as u64)
}

pub fn format_bytes(bytes: u64) -> String {
    const UNITS: [&str; 5] = ["B", "KiB", "MiB", "GiB", "TiB"];
    let mut value = bytes as f64;
    let mut unit = 0;
    while value >= 1024.0 && unit < UNITS.len() - 1 {
        value /= 1024.0;
        unit += 1;
    }
    if unit == 0 {
        format!("{bytes} B")
    } else {
        format!("{value:.1} {}", UNITS[unit])
    }
}

fn dash(s: &str) -> String {
    if s.is_empty() {
        "-".to_string()
    } else {
        s.to_string()
    }
}

/// `serial 0a1b, valid until 2026-03-01 08:00:00 UTC (29 days left)`, with a warning inside the
/// warning period and after expiry.
pub fn certificate_text(c: &CertificateInfo) -> String {
    let until = if c.not_after_unix > 0 { format!(", valid until {}", format_unix(c.not_after_unix)) } else { String::new() };
    let base = format!("serial {}{until}", dash(&c.serial_hex));
    if c.days_left < 0 {
        format!("EXPIRED {} days ago: {base}; issue a new certificate and run `exchangectl admin reload`", -c.days_left)
    } else if c.days_left < c.warning_days {
        format!(
            "WARNING: expires in {} day{} (warning under {}): {base}; issue a new certificate and run `exchangectl admin reload`",
            c.days_left,
            if c.days_left == 1 { "" } else { "s" },
            c.warning_days
        )
    } else {
        format!("{base} ({} days left)", c.days_left)
    }
}

/// A node's view of the directory: address, registration, how fresh its copy of the rules is.
pub fn directory_text(d: &DirectoryState) -> String {
    let bound = match d.max_staleness_seconds {
        0 => "no bound".to_string(),
        b => format!("bound {}", super::output::format_secs(b)),
    };
    let state = if d.stale {
        format!("STALE: {} old ({bound}): relaying and event delivery are stopped", age_text(d.state_age_seconds))
    } else if d.state_age_seconds < 1.0 {
        format!("state current ({bound})")
    } else {
        format!("state {} old ({bound})", age_text(d.state_age_seconds))
    };
    let registered = if d.registered { "registered" } else { "NOT registered" };
    format!("{}, {registered}, {state}", dash(&d.address))
}

pub fn backlog_text(b: &BacklogSummary) -> String {
    let oldest = if b.outbox_events > 0 && b.oldest_undelivered_seconds > 0.0 {
        format!(" (oldest undelivered {})", age_text(b.oldest_undelivered_seconds))
    } else {
        String::new()
    };
    format!(
        "outbox {} events{oldest}, inbox {} events, {} subscription{}; alarm above {} per subscriber",
        b.outbox_events,
        b.inbox_events,
        b.subscriptions,
        if b.subscriptions == 1 { "" } else { "s" },
        b.alarm_events
    )
}

fn readiness_text(r: &Readiness) -> String {
    let failing: Vec<String> =
        r.checks.iter().filter(|c| !c.ok).map(|c| if c.detail.is_empty() { c.name.clone() } else { format!("{}: {}", c.name, c.detail) }).collect();
    let mut text = if r.ready { "yes".to_string() } else { "NO".to_string() };
    if r.maintenance {
        text.push_str(" (maintenance mode is on: health reports NOT_SERVING)");
    }
    for f in failing {
        text.push_str(&format!("\nFAIL {f}"));
    }
    text
}

// ---- status ----

/// `exchangectl status`: the server's StatusReport (its fields at the top level of the JSON document)
/// with the rates of the sampling window and the peers.
#[derive(Clone, Debug, Serialize)]
pub struct StatusView {
    #[serde(flatten)]
    pub report: StatusReport,
    pub rates: StatusRates,
    pub peers: Vec<PeerInfo>,
    /// The latest refused requests, newest first (at most [`STATUS_REFUSED`]).
    pub recent_refused: Vec<RefusedRequest>,
}

/// How many refused requests `status` shows.
pub const STATUS_REFUSED: usize = 5;

impl StatusView {
    pub fn human(&self, now_ms: i64) -> String {
        let r = &self.report;
        let mut lines: Vec<(&str, String)> = Vec::new();
        let who = match (r.identity.department.as_str(), r.identity.name.as_str()) {
            ("", "") => "-".to_string(),
            (dept, name) => format!("{dept}/{name} ({})", dash(&r.identity.role)),
        };
        lines.push(("server", format!("{} {who}, version {}", dash(&r.server), dash(&r.version))));
        lines.push(("grpc", dash(&r.grpc_address)));
        let since = if r.started_unix_ms > 0 { format!(" (since {})", format_unix(r.started_unix_ms / 1000)) } else { String::new() };
        lines.push(("uptime", format!("{}{since}", format_uptime(r.uptime_seconds))));
        lines.push(("ready", readiness_text(&r.readiness)));
        lines.push(("certificate", certificate_text(&r.certificate)));
        if let Some(d) = &r.directory {
            lines.push(("directory", directory_text(d)));
            if !d.last_error.is_empty() {
                lines.push(("directory err", d.last_error.clone()));
            }
        } else if r.server == "directory" || r.nodes_online + r.nodes_offline + r.catalog_entries > 0 {
            lines.push((
                "nodes",
                format!("{} online, {} offline; catalog {} entries", r.nodes_online, r.nodes_offline, r.catalog_entries),
            ));
        }
        let rates = &self.rates;
        let mut traffic = format!("served {}", summary_text(&rates.served));
        if r.directory.is_some() || rates.relayed_in.window_requests + rates.relayed_out.window_requests > 0 {
            traffic.push_str(&format!(
                "; relayed in {}; relayed out {}",
                summary_text(&rates.relayed_in),
                summary_text(&rates.relayed_out)
            ));
        }
        traffic.push_str(&format!(" (last {:.1}s)", rates.window_seconds));
        lines.push(("traffic", traffic));
        let t = &r.traffic;
        lines.push((
            "since start",
            format!("{} requests, {} errors, {} refused, {} rate limited", t.requests, t.errors, t.refused, t.rate_limited),
        ));
        if let Some(b) = &r.backlog {
            lines.push(("backlog", backlog_text(b)));
        }
        lines.push(("store", format_bytes(r.store_bytes)));
        let mut text: String = lines
            .iter()
            .flat_map(|(k, v)| {
                let mut first = true;
                v.lines()
                    .map(move |line| {
                        let label = if std::mem::take(&mut first) { *k } else { "" };
                        format!("{label:<13}{line}\n")
                    })
                    .collect::<Vec<_>>()
            })
            .map(|l| l.trim_end().to_string() + "\n")
            .collect();
        text.push('\n');
        text.push_str(&peers_rate_table(&self.peers, rates, &r.identity.department, now_ms));
        if !self.recent_refused.is_empty() {
            text.push_str(&format!("\nlatest refused requests ({} since start)\n", r.traffic.refused));
            text.push_str(&refused_table(&self.recent_refused, now_ms));
        }
        text
    }
}

fn refused_table(refused: &[RefusedRequest], now_ms: i64) -> String {
    let mut t = Table::new(&["when", "caller", "method", "code", "message"]).max_width(2, 40).max_width(4, 70);
    for r in refused {
        t.row([format_age(now_ms, r.at_unix_ms), dash(&r.peer), dash(&r.method), dash(&r.code), dash(&r.message)]);
    }
    t.render()
}

/// Peers with their rates in the window; a department that called in the window without being listed as
/// a peer (the server's own applications, `own`) gets a row too.
fn peers_rate_table(peers: &[PeerInfo], rates: &StatusRates, own_department: &str, now_ms: i64) -> String {
    let mut t = Table::new(&["peer", "status", "address", "req/s", "errors", "in", "out", "errors total", "last seen"])
        .align(3, Align::Right)
        .align(4, Align::Right)
        .align(5, Align::Right)
        .align(6, Align::Right)
        .align(7, Align::Right)
        .max_width(2, 30);
    let none = RateSummary::default();
    let mut listed = std::collections::BTreeSet::new();
    for p in peers {
        listed.insert(p.department.as_str());
        let rate = rates.by_peer.get(&p.department).unwrap_or(&none);
        t.row([
            p.department.clone(),
            dash(&p.status),
            dash(&p.address),
            rate_text(rate.requests_per_second),
            percent_text(rate.error_percent),
            p.inbound_requests.to_string(),
            p.outbound_requests.to_string(),
            p.errors.to_string(),
            format_age(now_ms, p.last_seen_unix_ms),
        ]);
    }
    for (peer, rate) in rates.by_peer.iter().filter(|(peer, rate)| !listed.contains(peer.as_str()) && rate.window_requests > 0) {
        t.row([
            peer.clone(),
            if peer == own_department { "own" } else { "-" }.into(),
            "-".into(),
            rate_text(rate.requests_per_second),
            percent_text(rate.error_percent),
            "-".into(),
            "-".into(),
            "-".into(),
            "-".into(),
        ]);
    }
    if t.is_empty() {
        return "no peers yet\n".to_string();
    }
    t.render()
}

/// `exchangectl status`: two traffic snapshots `interval_ms` apart, the status and the peers between them.
pub(super) async fn status(ctx: &Ctx, interval_ms: u64) -> Result<(), CliError> {
    let interval = Duration::from_millis(interval_ms);
    let admin = ctx.admin()?;
    let before: TrafficReport = get(&admin, "/api/traffic").await?;
    let started = Instant::now();
    let (report, peers, refused) = tokio::join!(
        get::<StatusReport>(&admin, "/api/status"),
        or_default::<PeersReport>(&admin, "/api/peers"),
        or_default::<RefusedReport>(&admin, "/api/refused"),
    );
    let (report, peers, mut refused) = (report?, peers?, refused?);
    tokio::time::sleep(interval.saturating_sub(started.elapsed())).await;
    let after: TrafficReport = get(&admin, "/api/traffic").await?;
    let window = traffic_rates(&before, &after, started.elapsed());
    let mut peers = peers.peers;
    peers.sort_by(|a, b| a.department.cmp(&b.department));
    refused.refused.truncate(STATUS_REFUSED);
    let view = StatusView { report, rates: StatusRates::from_window(&window), peers, recent_refused: refused.refused };
    ctx.out.emit(&view, || view.human(now_unix_ms()));
    Ok(())
}

/// A document `status` can do without: empty when the server has no such route (an older server).
async fn or_default<T: serde::de::DeserializeOwned + Default>(admin: &AdminClient, path: &str) -> Result<T, CliError> {
    match admin.get_json(path).await {
        Err(AdminClientError::Status { status: 404, .. }) => Ok(T::default()),
        other => other.map_err(admin_error),
    }
}

// ---- top ----

/// One refresh of `exchangectl top` (one JSON line with --json).
#[derive(Clone, Debug, Serialize)]
pub struct TopFrame {
    pub at_unix_ms: i64,
    pub window_seconds: f64,
    pub served: RateSummary,
    pub relayed_in: RateSummary,
    pub relayed_out: RateSummary,
    /// Busiest first.
    pub rows: Vec<RateRow>,
}

impl TopFrame {
    pub fn new(at_unix_ms: i64, window: RateWindow) -> Self {
        let rates = StatusRates::from_window(&window);
        TopFrame {
            at_unix_ms,
            window_seconds: window.seconds,
            served: rates.served,
            relayed_in: rates.relayed_in,
            relayed_out: rates.relayed_out,
            rows: window.rows,
        }
    }

    /// `title` names the server, `note` ends the first line; `max_rows` keeps a frame on one screen (0: no
    /// limit).
    pub fn human(&self, title: &str, note: &str, max_rows: usize) -> String {
        let mut text = format!("{title}  {}  {note}\n", format_unix(self.at_unix_ms / 1000));
        text.push_str(&format!(
            "served {}   relayed in {}   relayed out {}   (last {:.1}s)\n\n",
            summary_text(&self.served),
            summary_text(&self.relayed_in),
            summary_text(&self.relayed_out),
            self.window_seconds
        ));
        if self.rows.is_empty() {
            text.push_str("no traffic yet\n");
            return text;
        }
        let mut t = Table::new(&["direction", "peer", "resource / method", "req/s", "errors", "avg ms", "requests", "errors total"])
            .align(3, Align::Right)
            .align(4, Align::Right)
            .align(5, Align::Right)
            .align(6, Align::Right)
            .align(7, Align::Right)
            .max_width(2, 48);
        let shown = if max_rows == 0 { self.rows.len() } else { self.rows.len().min(max_rows) };
        for r in &self.rows[..shown] {
            t.row([
                r.direction.clone(),
                dash(&r.peer),
                r.resource.clone(),
                rate_text(r.requests_per_second),
                percent_text(r.error_percent),
                r.avg_latency_ms.map_or_else(|| "-".to_string(), |ms| format!("{ms:.1}")),
                r.total_requests.to_string(),
                r.total_errors.to_string(),
            ]);
        }
        text.push_str(&t.render());
        if shown < self.rows.len() {
            text.push_str(&format!("... {} quieter rows not shown\n", self.rows.len() - shown));
        }
        text
    }
}

/// Home the cursor and clear the screen.
const CLEAR_SCREEN: &str = "\x1b[H\x1b[2J";

/// `exchangectl top`: a frame every `interval_seconds` until Ctrl-C or `iterations` frames.
pub(super) async fn top(ctx: &Ctx, interval_seconds: f64, iterations: Option<u64>) -> Result<(), CliError> {
    let interval = Duration::from_secs_f64(interval_seconds);
    let admin = ctx.admin()?;
    let report: StatusReport = get(&admin, "/api/status").await?;
    let title =
        format!("{} {}/{} at {}", dash(&report.server), dash(&report.identity.department), dash(&report.identity.name), admin.address());
    let note = format!("every {}s, Ctrl-C to quit", interval.as_secs_f64());
    let terminal = std::io::stdout().is_terminal() && !ctx.out.json;
    // A frame that scrolls off the top of a terminal is unreadable: leave room for the header lines.
    let max_rows = if terminal {
        std::env::var("LINES").ok().and_then(|l| l.parse::<usize>().ok()).map_or(40, |l| l.saturating_sub(6).max(5))
    } else {
        0
    };
    let ctrl_c = tokio::signal::ctrl_c();
    tokio::pin!(ctrl_c);
    let mut previous: TrafficReport = get(&admin, "/api/traffic").await?;
    let mut taken_at = Instant::now();
    let mut refreshes = 0u64;
    while iterations.is_none_or(|n| refreshes < n) {
        tokio::select! {
            _ = &mut ctrl_c => break,
            _ = tokio::time::sleep(interval.saturating_sub(taken_at.elapsed())) => {}
        }
        let next = tokio::select! {
            _ = &mut ctrl_c => break,
            next = admin.get_json::<TrafficReport>("/api/traffic") => next,
        };
        refreshes += 1;
        let now = match next {
            Ok(now) => now,
            // A live view rides out a restart or a network blip: say so and try again next time.
            Err(e @ AdminClientError::Connect { .. }) => {
                if terminal {
                    print!("{CLEAR_SCREEN}");
                }
                eprintln!("{title}\n{e} (retrying)");
                continue;
            }
            Err(e) => return Err(admin_error(e)),
        };
        let frame = TopFrame::new(now.at_unix_ms, traffic_rates(&previous, &now, taken_at.elapsed()));
        previous = now;
        taken_at = Instant::now();
        if terminal {
            print!("{CLEAR_SCREEN}");
        } else if refreshes > 1 && !ctx.out.json {
            println!();
        }
        ctx.out.emit_line(&frame, || frame.human(&title, &note, max_rows).trim_end().to_string());
    }
    Ok(())
}

// ---- peers and outbox ----

pub fn peers_human(report: &PeersReport, now_ms: i64) -> String {
    if report.peers.is_empty() {
        return "no peers yet\n".to_string();
    }
    let mut t = Table::new(&[
        "peer", "status", "address", "in", "out", "errors", "last seen", "grants to", "grants from",
    ])
    .align(3, Align::Right)
    .align(4, Align::Right)
    .align(5, Align::Right)
    .align(7, Align::Right)
    .align(8, Align::Right);
    for p in &report.peers {
        t.row([
            p.department.clone(),
            dash(&p.status),
            dash(&p.address),
            p.inbound_requests.to_string(),
            p.outbound_requests.to_string(),
            p.errors.to_string(),
            format_age(now_ms, p.last_seen_unix_ms),
            p.grants_to_peer.to_string(),
            p.grants_from_peer.to_string(),
        ]);
    }
    t.render()
}

fn outbox_table(rows: &[&OutboxRow], other: &str) -> String {
    let mut t = Table::new(&[other, "resource", "state", "head", "acked", "backlog", "oldest", "connected"])
        .align(3, Align::Right)
        .align(4, Align::Right)
        .align(5, Align::Right)
        .align(6, Align::Right);
    for r in rows {
        t.row([
            r.department.clone(),
            r.resource.clone(),
            dash(&r.state),
            r.head_seq.to_string(),
            r.acked_seq.to_string(),
            r.backlog_events.to_string(),
            age_text(r.oldest_undelivered_seconds),
            if r.connected { "yes" } else { "no" }.to_string(),
        ]);
    }
    t.render()
}

/// Our outbox (other departments subscribed to our resources) and inbox (our subscriptions), largest
/// backlog first.
pub fn outbox_human(report: &OutboxReport) -> String {
    if report.rows.is_empty() {
        return "no subscriptions\n".to_string();
    }
    let side = |s: &str| {
        let mut rows: Vec<&OutboxRow> = report.rows.iter().filter(|r| r.side == s).collect();
        rows.sort_by(|a, b| {
            b.backlog_events.cmp(&a.backlog_events).then_with(|| (&a.resource, &a.department).cmp(&(&b.resource, &b.department)))
        });
        rows
    };
    let total = |rows: &[&OutboxRow]| rows.iter().map(|r| r.backlog_events).sum::<u64>();
    let mut text = String::new();
    let provider = side("provider");
    if !provider.is_empty() {
        text.push_str(&format!(
            "outbox: other departments subscribed to ours ({} events not yet acknowledged)\n",
            total(&provider)
        ));
        text.push_str(&outbox_table(&provider, "subscriber"));
    }
    let consumer = side("consumer");
    if !consumer.is_empty() {
        if !text.is_empty() {
            text.push('\n');
        }
        text.push_str(&format!(
            "inbox: our subscriptions ({} events not yet acknowledged by our applications)\n",
            total(&consumer)
        ));
        text.push_str(&outbox_table(&consumer, "provider"));
    }
    let other: Vec<&OutboxRow> = report.rows.iter().filter(|r| r.side != "provider" && r.side != "consumer").collect();
    if !other.is_empty() {
        text.push_str(&format!("\nother ({})\n", other[0].side));
        text.push_str(&outbox_table(&other, "department"));
    }
    text
}

pub(super) async fn peers(ctx: &Ctx) -> Result<(), CliError> {
    let mut report: PeersReport = get(&ctx.admin()?, "/api/peers").await?;
    report.peers.sort_by(|a, b| a.department.cmp(&b.department));
    ctx.out.emit(&report, || peers_human(&report, now_unix_ms()));
    Ok(())
}

pub(super) async fn outbox(ctx: &Ctx) -> Result<(), CliError> {
    let admin = ctx.admin()?;
    let report: OutboxReport = match admin.get_json("/api/outbox").await {
        Err(AdminClientError::Status { status: 404, message }) => {
            return Err(CliError::Admin(AdminClientError::Status {
                status: 404,
                message: format!("{message}; only an exchange node has an outbox (is --admin a node's admin port?)"),
            }))
        }
        other => other.map_err(admin_error)?,
    };
    ctx.out.emit(&report, || outbox_human(&report));
    Ok(())
}

// ---- admin ----

/// What the switch did, from the readiness the server answered with.
pub fn maintenance_human(requested: bool, now: &Readiness) -> String {
    if now.maintenance != requested {
        return format!("the server still reports maintenance {}: check its log\n", if now.maintenance { "on" } else { "off" });
    }
    if requested {
        return "maintenance on: /readyz answers 503 and gRPC health NOT_SERVING, so load balancers send no new \
                traffic; calls still arriving are served. `exchangectl admin maintenance off` ends it.\n"
            .to_string();
    }
    match (now.ready, not_ready_reason(now)) {
        (true, _) => "maintenance off: the server is ready\n".to_string(),
        (false, why) => format!("maintenance off, but the server is still NOT READY: {why}\n"),
    }
}

pub fn reload_human(r: &ReloadReport) -> String {
    let until = if r.not_after_unix > 0 { format!(", valid until {}", format_unix(r.not_after_unix)) } else { String::new() };
    let mut text = if r.certificate_changed {
        format!(
            "certificate rotated: serial {} -> {}{until}; new connections use it, open ones keep the old one until they close\n",
            dash(&r.old_serial_hex),
            dash(&r.new_serial_hex)
        )
    } else {
        format!("certificate unchanged: serial {}{until}\n", dash(&r.new_serial_hex))
    };
    for note in &r.notes {
        text.push_str(&format!("  {note}\n"));
    }
    text
}

pub fn readiness_human(r: &Readiness) -> String {
    let mut text = match (r.ready, r.maintenance) {
        (true, _) => "ready\n".to_string(),
        (false, true) => "NOT READY: maintenance mode is on (exchangectl admin maintenance off)\n".to_string(),
        (false, false) => "NOT READY\n".to_string(),
    };
    if r.checks.is_empty() {
        return text;
    }
    let mut t = Table::new(&["check", "ok", "detail"]);
    for c in &r.checks {
        t.row([c.name.clone(), if c.ok { "ok" } else { "FAIL" }.to_string(), dash(&c.detail)]);
    }
    text.push_str(&t.render());
    text
}

/// The failing checks in one line, for the error that makes `admin ready` exit 1.
fn not_ready_reason(r: &Readiness) -> String {
    let mut reasons: Vec<String> = Vec::new();
    if r.maintenance {
        reasons.push("maintenance mode is on".into());
    }
    reasons.extend(r.checks.iter().filter(|c| !c.ok).map(|c| format!("{} ({})", c.name, dash(&c.detail))));
    if reasons.is_empty() {
        "no detail given (the readiness checks are shown only to an authenticated caller)".into()
    } else {
        reasons.join("; ")
    }
}

pub(super) async fn admin(ctx: &Ctx, cmd: AdminCommand) -> Result<(), CliError> {
    let admin = ctx.admin()?;
    match cmd {
        AdminCommand::Maintenance { state } => {
            let on = state == "on";
            let readiness: Readiness =
                admin.post_json("/api/maintenance", &MaintenanceRequest { on }).await.map_err(admin_error)?;
            ctx.out.emit(&readiness, || maintenance_human(on, &readiness));
            Ok(())
        }
        AdminCommand::Reload => {
            let report: ReloadReport = admin.post_json("/api/reload", &serde_json::json!({})).await.map_err(admin_error)?;
            ctx.out.emit(&report, || reload_human(&report));
            Ok(())
        }
        AdminCommand::Ready => {
            let (status, body) = admin.get_text("/readyz").await.map_err(admin_error)?;
            if status != 200 && status != 503 {
                let message = serde_json::from_str::<crate::admin::api::ErrorBody>(&body)
                    .map(|b| b.error)
                    .unwrap_or_else(|_| body.trim().to_string());
                return Err(admin_error(AdminClientError::Status { status, message }));
            }
            let readiness: Readiness = serde_json::from_str(&body)
                .map_err(|e| CliError::Admin(AdminClientError::Decode(format!("/readyz: {e}: {}", body.trim()))))?;
            ctx.out.emit(&readiness, || readiness_human(&readiness));
            // The status code is what load balancers act on: it wins over the body.
            if status == 503 || !readiness.ready {
                return Err(CliError::NotReady(not_ready_reason(&readiness)));
            }
            Ok(())
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::admin::api::{HealthCheck, IdentityInfo, TrafficTotals};

    fn row(direction: &str, peer: &str, resource: &str, requests: u64, errors: u64, latency_ms_sum: f64) -> TrafficRow {
        TrafficRow {
            direction: direction.into(),
            peer: peer.into(),
            resource: resource.into(),
            requests,
            errors,
            latency_ms_sum,
            ..Default::default()
        }
    }

    fn snapshots() -> (TrafficReport, TrafficReport) {
        let before = TrafficReport {
            at_unix_ms: 1_000_000,
            rows: vec![
                row("outbound", "commerce", "101001/000001", 100, 2, 500.0),
                row("api", "tax", "/govexchange.v1.ExchangeNode/QueryRecords", 100, 0, 900.0),
                row("inbound", "quality", "201001/000001", 10, 10, 10.0),
            ],
        };
        let after = TrafficReport {
            at_unix_ms: 1_002_000,
            rows: vec![
                row("outbound", "commerce", "101001/000001", 140, 12, 900.0),
                row("api", "tax", "/govexchange.v1.ExchangeNode/QueryRecords", 140, 10, 1300.0),
                row("inbound", "quality", "201001/000001", 10, 10, 10.0),
                row("api", "quality", "/govexchange.v1.Relay/FetchRecords", 4, 4, 8.0),
            ],
        };
        (before, after)
    }

    #[test]
    fn rates_are_deltas_over_the_servers_window_busiest_first() {
        let (before, after) = snapshots();
        let w = traffic_rates(&before, &after, Duration::from_secs(9));
        assert_eq!(w.seconds, 2.0, "the server's clock, not the measured 9 s");
        let out = &w.rows[0];
        assert_eq!((out.direction.as_str(), out.window_requests, out.window_errors), ("api", 40, 10));
        let relayed = w.rows.iter().find(|r| r.direction == "outbound").unwrap();
        assert_eq!(relayed.requests_per_second, 20.0);
        assert_eq!(relayed.error_percent, Some(25.0));
        assert_eq!(relayed.avg_latency_ms, Some(10.0));
        assert_eq!((relayed.total_requests, relayed.total_errors), (140, 12));
        let quiet = w.rows.iter().find(|r| r.direction == "inbound").unwrap();
        assert_eq!((quiet.requests_per_second, quiet.error_percent, quiet.avg_latency_ms), (0.0, None, None));
        assert_eq!(w.rows.last().unwrap().direction, "inbound", "no traffic in the window: last");
        let new = w.rows.iter().find(|r| r.resource.ends_with("FetchRecords")).unwrap();
        assert_eq!(new.window_requests, 4, "a row first seen in the second snapshot counts from zero");
    }

    #[test]
    fn a_restarted_server_counts_from_zero_and_a_bad_clock_falls_back_to_ours() {
        let before = TrafficReport { at_unix_ms: 5000, rows: vec![row("api", "tax", "m", 1000, 5, 0.0)] };
        let after = TrafficReport { at_unix_ms: 5000, rows: vec![row("api", "tax", "m", 3, 1, 3.0)] };
        let w = traffic_rates(&before, &after, Duration::from_millis(500));
        assert_eq!(w.seconds, 0.5);
        assert_eq!((w.rows[0].window_requests, w.rows[0].window_errors), (3, 1));
        assert_eq!(w.rows[0].requests_per_second, 6.0);
    }

    #[test]
    fn status_rates_split_served_relayed_and_per_peer() {
        let (before, after) = snapshots();
        let rates = StatusRates::from_window(&traffic_rates(&before, &after, Duration::ZERO));
        assert_eq!(rates.served.window_requests, 44);
        assert_eq!(rates.served.requests_per_second, 22.0);
        assert_eq!(rates.relayed_out.error_percent, Some(25.0));
        assert_eq!(rates.relayed_in.window_requests, 0);
        assert_eq!(rates.relayed_in.error_percent, None);
        // commerce: only what we relayed to it; quality: the relay calls it made here (api rows), not the
        // inbound rows again.
        assert_eq!(rates.by_peer["commerce"].window_requests, 40);
        assert_eq!(rates.by_peer["quality"].window_requests, 4);
        assert_eq!(rates.by_peer["quality"].error_percent, Some(100.0));
        assert_eq!(rates.by_peer["tax"].window_requests, 40);
    }

    fn node_report() -> StatusReport {
        StatusReport {
            server: "exchange-node".into(),
            version: "0.1.0".into(),
            identity: IdentityInfo { department: "tax".into(), role: "node".into(), name: "tax-node".into(), serial_hex: "0a".into() },
            grpc_address: "127.0.0.1:7401".into(),
            started_unix_ms: 1_767_225_600_000,
            uptime_seconds: 93_784,
            readiness: Readiness {
                ready: false,
                maintenance: false,
                checks: vec![
                    HealthCheck { name: "certificate".into(), ok: true, detail: "29 days left".into() },
                    HealthCheck { name: "backlog".into(), ok: false, detail: "quality: 120000 events".into() },
                ],
            },
            certificate: CertificateInfo { serial_hex: "0a1b".into(), not_after_unix: 1_769_904_000, days_left: 5, warning_days: 14 },
            directory: Some(DirectoryState {
                address: "127.0.0.1:7400".into(),
                registered: true,
                state_age_seconds: 0.0,
                max_staleness_seconds: 3600,
                stale: false,
                last_error: String::new(),
            }),
            traffic: TrafficTotals { requests: 1234, errors: 5, refused: 3, rate_limited: 1 },
            backlog: Some(BacklogSummary {
                subscriptions: 2,
                outbox_events: 120_000,
                inbox_events: 4,
                oldest_undelivered_seconds: 300.0,
                alarm_events: 100_000,
            }),
            store_bytes: 5 * 1024 * 1024 + 300 * 1024,
            ..Default::default()
        }
    }

    #[test]
    fn status_screen_shows_identity_rates_failures_and_warnings() {
        let (before, after) = snapshots();
        let rates = StatusRates::from_window(&traffic_rates(&before, &after, Duration::ZERO));
        let peers = vec![PeerInfo {
            department: "commerce".into(),
            address: "127.0.0.1:7402".into(),
            status: "online".into(),
            outbound_requests: 140,
            errors: 12,
            last_seen_unix_ms: 1_000_000,
            ..Default::default()
        }];
        let refused = vec![RefusedRequest {
            at_unix_ms: 1_003_000,
            peer: "tax/app/tax-app".into(),
            method: "/govexchange.v1.ExchangeNode/QueryRecords".into(),
            code: "PERMISSION_DENIED".into(),
            message: "no grant of 302001/000001 to tax".into(),
        }];
        let view = StatusView { report: node_report(), rates, peers, recent_refused: refused };
        let text = view.human(1_004_000);
        assert!(text.starts_with("server       exchange-node tax/tax-node (node), version 0.1.0\n"), "{text}");
        assert!(text.contains("uptime       1d 2h (since 2026-01-01 00:00:00 UTC)"), "{text}");
        assert!(text.contains("ready        NO\n             FAIL backlog: quality: 120000 events\n"), "{text}");
        assert!(!text.contains("FAIL certificate"), "passing checks stay quiet: {text}");
        assert!(text.contains("certificate  WARNING: expires in 5 days (warning under 14): serial 0a1b"), "{text}");
        assert!(text.contains("directory    127.0.0.1:7400, registered, state current (bound 60m)"), "{text}");
        assert!(text.contains("traffic      served 22.0 req/s, 31.8% errors; relayed in 0 req/s; relayed out 20.0 req/s, 25.0% errors (last 2.0s)"), "{text}");
        assert!(text.contains("since start  1234 requests, 5 errors, 3 refused, 1 rate limited"), "{text}");
        assert!(text.contains("backlog      outbox 120000 events (oldest undelivered 5m), inbox 4 events, 2 subscriptions; alarm above 100000"), "{text}");
        assert!(text.contains("store        5.3 MiB"), "{text}");
        let peer_lines: Vec<&str> = text.lines().skip_while(|l| !l.starts_with("peer ")).collect();
        assert_eq!(peer_lines[..5].iter().filter(|l| !l.is_empty()).count(), 4, "commerce, then quality and tax from the traffic: {text}");
        assert!(text.contains("\nlatest refused requests (3 since start)\nwhen    caller           method"), "{text}");
        assert!(text.contains("1s ago  tax/app/tax-app  /govexchange.v1.ExchangeNode/QueryRecor…  PERMISSION_DENIED  no grant of"), "{text}");
        assert!(peer_lines[1].starts_with("commerce  online  127.0.0.1:7402   20.0"), "{text}");
        assert!(peer_lines[1].ends_with("4s ago"), "{text}");
        assert!(peer_lines[2].starts_with("quality   -"), "{text}");
        assert!(peer_lines[3].starts_with("tax       own"), "{text}");
        assert!(text.lines().all(|l| !l.ends_with(' ')), "{text:?}");

        let json = serde_json::to_value(&view).unwrap();
        assert_eq!(json["identity"]["department"], "tax", "the StatusReport's fields at the top level");
        assert_eq!(json["readiness"]["ready"], false);
        assert_eq!(json["rates"]["served"]["requests_per_second"], 22.0);
        assert_eq!(json["rates"]["by_peer"]["commerce"]["window_requests"], 40);
        assert_eq!(json["peers"][0]["department"], "commerce");
        let back: StatusReport = serde_json::from_value(json).unwrap();
        assert_eq!(back.traffic.requests, 1234, "a StatusReport reader reads the document");
    }

    #[test]
    fn directory_status_shows_nodes_and_catalog() {
        let report = StatusReport {
            server: "directory".into(),
            identity: IdentityInfo { department: "central".into(), role: "directory".into(), name: "directory".into(), ..Default::default() },
            readiness: Readiness { ready: true, ..Default::default() },
            certificate: CertificateInfo { serial_hex: "ff".into(), not_after_unix: 0, days_left: 300, warning_days: 14 },
            nodes_online: 3,
            nodes_offline: 1,
            catalog_entries: 45,
            ..Default::default()
        };
        let view = StatusView {
            report,
            rates: StatusRates { window_seconds: 1.0, ..Default::default() },
            peers: vec![],
            recent_refused: vec![],
        };
        let text = view.human(0);
        assert!(text.contains("ready        yes\n"), "{text}");
        assert!(text.contains("certificate  serial ff (300 days left)"), "{text}");
        assert!(text.contains("nodes        3 online, 1 offline; catalog 45 entries"), "{text}");
        assert!(text.contains("traffic      served 0 req/s (last 1.0s)"), "{text}");
        assert!(!text.contains("relayed") && !text.contains("backlog"), "{text}");
        assert!(text.ends_with("no peers yet\n"), "{text}");
    }

    #[test]
    fn certificate_and_directory_lines() {
        let mut c = CertificateInfo { serial_hex: "0a".into(), not_after_unix: 0, days_left: 1, warning_days: 14 };
        assert!(certificate_text(&c).starts_with("WARNING: expires in 1 day (warning under 14)"));
        c.days_left = -3;
        assert!(certificate_text(&c).starts_with("EXPIRED 3 days ago: serial 0a;"));
        c.days_left = 14;
        assert_eq!(certificate_text(&c), "serial 0a (14 days left)");
        let mut d = DirectoryState {
            address: "dir:7400".into(),
            registered: false,
            state_age_seconds: 7300.0,
            max_staleness_seconds: 3600,
            stale: true,
            last_error: "connection refused".into(),
        };
        assert_eq!(
            directory_text(&d),
            "dir:7400, NOT registered, STALE: 2h old (bound 60m): relaying and event delivery are stopped"
        );
        d.stale = false;
        d.state_age_seconds = 40.0;
        d.max_staleness_seconds = 0;
        assert_eq!(directory_text(&d), "dir:7400, NOT registered, state 40s old (no bound)");
    }

    #[test]
    fn top_frame_lists_rows_busiest_first_and_caps_them() {
        let (before, after) = snapshots();
        let frame = TopFrame::new(after.at_unix_ms, traffic_rates(&before, &after, Duration::ZERO));
        let text = frame.human("exchange-node tax/tax-node at 127.0.0.1:9401", "every 2s", 0);
        let lines: Vec<&str> = text.lines().collect();
        assert_eq!(lines[0], "exchange-node tax/tax-node at 127.0.0.1:9401  1970-01-01 00:16:42 UTC  every 2s", "{text}");
        assert_eq!(lines[1], "served 22.0 req/s, 31.8% errors   relayed in 0 req/s   relayed out 20.0 req/s, 25.0% errors   (last 2.0s)");
        assert!(lines[3].starts_with("direction  peer      resource / method"), "{text}");
        assert!(lines[4].starts_with("api        tax       /govexchange.v1.ExchangeNode/QueryRecords"), "{text}");
        assert!(lines[4].contains(" 20.0   25.0%    10.0       140"), "{text}");
        assert!(lines[5].starts_with("outbound   commerce  101001/000001"), "{text}");
        assert!(lines[7].starts_with("inbound    quality") && lines[7].contains("  -       -"), "{text}");
        let capped = frame.human("t", "", 2);
        assert!(capped.ends_with("... 2 quieter rows not shown\n"), "{capped}");
        let line = serde_json::to_string(&frame).unwrap();
        assert!(!line.contains('\n'));
        let json: serde_json::Value = serde_json::from_str(&line).unwrap();
        assert_eq!(json["rows"][0]["window_requests"], 40);
        assert_eq!(json["rows"][3]["error_percent"], serde_json::Value::Null);
        let empty = TopFrame::new(0, RateWindow { seconds: 2.0, rows: vec![] });
        assert!(empty.human("t", "", 0).ends_with("no traffic yet\n"));
    }

    #[test]
    fn peers_table_lines_up_with_chinese_names() {
        let report = PeersReport {
            peers: vec![
                PeerInfo { department: "commerce".into(), status: "online".into(), address: "10.0.0.2:7401".into(), outbound_requests: 12, grants_from_peer: 2, ..Default::default() },
                PeerInfo { department: "税务".into(), status: "offline".into(), inbound_requests: 7, errors: 1, grants_to_peer: 1, ..Default::default() },
            ],
        };
        let text = peers_human(&report, 0);
        let lines: Vec<&str> = text.lines().collect();
        assert_eq!(lines.len(), 3);
        use unicode_width::UnicodeWidthStr;
        assert_eq!(lines[1].find("online"), Some(10));
        assert_eq!(lines[2][..lines[2].find("offline").unwrap()].width(), 10, "CJK padded by display width: {text}");
        assert!(lines[2].contains("-  "), "no address: {text}");
        assert!(lines[1].contains("never"), "{text}");
        assert_eq!(peers_human(&PeersReport::default(), 0), "no peers yet\n");
    }

    #[test]
    fn outbox_splits_sides_largest_backlog_first() {
        let sub = |side: &str, dept: &str, resource: &str, backlog: u64, oldest: f64| OutboxRow {
            side: side.into(),
            department: dept.into(),
            resource: resource.into(),
            state: "active".into(),
            head_seq: 100,
            acked_seq: 100 - backlog,
            backlog_events: backlog,
            oldest_undelivered_seconds: oldest,
            connected: backlog < 50,
        };
        let report = OutboxReport {
            rows: vec![
                sub("provider", "tax", "101001/000001", 3, 12.0),
                sub("provider", "quality", "101001/000001", 60, 400.0),
                sub("consumer", "police", "201001/000001", 0, 0.0),
            ],
        };
        let text = outbox_human(&report);
        let lines: Vec<&str> = text.lines().collect();
        assert_eq!(lines[0], "outbox: other departments subscribed to ours (63 events not yet acknowledged)");
        assert!(lines[1].starts_with("subscriber  resource"), "{text}");
        assert!(lines[2].starts_with("quality     101001/000001  active   100     40       60      6m  no"), "{text}");
        assert!(lines[3].starts_with("tax  "), "{text}");
        assert_eq!(lines[4], "");
        assert_eq!(lines[5], "inbox: our subscriptions (0 events not yet acknowledged by our applications)");
        assert!(lines[7].starts_with("police    201001/000001") && lines[7].contains("  -  yes"), "{text}");
        assert_eq!(outbox_human(&OutboxReport::default()), "no subscriptions\n");
    }

    #[test]
    fn admin_switch_texts() {
        let on = Readiness { ready: false, maintenance: true, checks: vec![] };
        let off = Readiness { ready: true, maintenance: false, checks: vec![] };
        let off_failing = Readiness {
            ready: false,
            maintenance: false,
            checks: vec![HealthCheck { name: "store".into(), ok: false, detail: "read-only".into() }],
        };
        assert!(maintenance_human(true, &on).starts_with("maintenance on: /readyz answers 503"));
        assert_eq!(maintenance_human(false, &off), "maintenance off: the server is ready\n");
        assert_eq!(maintenance_human(false, &off_failing), "maintenance off, but the server is still NOT READY: store (read-only)\n");
        assert!(maintenance_human(true, &off).contains("still reports maintenance off"));

        let rotated = ReloadReport {
            certificate_changed: true,
            old_serial_hex: "0a".into(),
            new_serial_hex: "0b".into(),
            not_after_unix: 0,
            notes: vec!["quotas: 2 rules".into()],
        };
        assert_eq!(
            reload_human(&rotated),
            "certificate rotated: serial 0a -> 0b; new connections use it, open ones keep the old one until they close\n  quotas: 2 rules\n"
        );
        let same = ReloadReport { new_serial_hex: "0b".into(), ..Default::default() };
        assert_eq!(reload_human(&same), "certificate unchanged: serial 0b\n");

        let ready = Readiness { ready: true, maintenance: false, checks: vec![HealthCheck { name: "store".into(), ok: true, detail: String::new() }] };
        assert_eq!(readiness_human(&ready), "ready\ncheck  ok  detail\nstore  ok  -\n");
        let down = Readiness { ready: false, maintenance: true, checks: vec![] };
        assert!(readiness_human(&down).starts_with("NOT READY: maintenance mode is on"));
        assert_eq!(not_ready_reason(&down), "maintenance mode is on");
        let failing = Readiness {
            ready: false,
            maintenance: false,
            checks: vec![HealthCheck { name: "directory".into(), ok: false, detail: "unreachable for 2h".into() }],
        };
        assert_eq!(not_ready_reason(&failing), "directory (unreachable for 2h)");
    }

    #[test]
    fn refusals_name_the_credentials_the_admin_port_takes() {
        let err = admin_error(AdminClientError::Status { status: 401, message: "no valid credentials".into() });
        let text = err.to_string();
        assert!(text.contains("no valid credentials") && text.contains("--admin-token-file") && text.contains("operator certificate"), "{text}");
        assert_eq!(err.exit_code(), 1);
        let err = admin_error(AdminClientError::Connect { addr: "127.0.0.1:9".into(), reason: "refused".into() });
        assert_eq!(err.exit_code(), super::super::EXIT_UNREACHABLE);
    }

    #[test]
    fn sizes_and_durations() {
        assert_eq!(format_bytes(512), "512 B");
        assert_eq!(format_bytes(1536), "1.5 KiB");
        assert_eq!(format_bytes(3 * 1024 * 1024 * 1024), "3.0 GiB");
        assert_eq!(format_uptime(45), "45s");
        assert_eq!(format_uptime(725), "12m 5s");
        assert_eq!(format_uptime(5 * 3600 + 12 * 60), "5h 12m");
        assert_eq!(format_uptime(3 * 86_400 + 4 * 3600 + 59), "3d 4h");
        assert_eq!(rate_text(0.05), "0.05");
        assert_eq!(rate_text(12.345), "12.3");
    }
}
