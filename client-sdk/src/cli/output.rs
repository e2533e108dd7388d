//! What `exchangectl` prints: serde views for `--json` (one document per command, JSON lines for watch)
//! and the human text made from the same views, so both forms always carry the same facts.
//!
//! Every renderer returns a `String`; only [`Printer`] writes to stdout, which keeps the formatting
//! testable.

use std::collections::BTreeMap;
use std::fmt::Write as _;

use exchange_proto::v1::{
    AuditEntry, CatalogChange, ChangeKind, FacetCount, Grant, NodeInfo, NodeStatus, NodeStatusResponse,
    QueryAuditResponse, Revocation, ResolveResourceResponse, SearchCatalogResponse, VerifyAuditResponse,
    WhoAmIResponse,
};
use serde::Serialize;

use super::table::{Align, Table};
use crate::catalog::CatalogEntrySpec;
use crate::records::{QueryResult, GRANT_STATUSES};

/// Prints either the JSON form of a view or its human text.
#[derive(Clone, Copy, Debug)]
pub struct Printer {
    pub json: bool,
}

impl Printer {
    /// Prints one result: `value` as a JSON document (pretty, so it reads well in a terminal; `jq` reads
    /// either form), or `human()` as text.
    pub fn emit<T: Serialize>(&self, value: &T, human: impl FnOnce() -> String) {
        if self.json {
            println!("{}", serde_json::to_string_pretty(value).expect("views serialize"));
        } else {
            let text = human();
            print!("{text}");
            if !text.ends_with('\n') {
                println!();
            }
        }
    }

    /// Prints one line of a stream: a compact JSON line, or the human line.
    pub fn emit_line<T: Serialize>(&self, value: &T, human: impl FnOnce() -> String) {
        if self.json {
            println!("{}", serde_json::to_string(value).expect("views serialize"));
        } else {
            println!("{}", human());
        }
    }
}

/// Date and time of a Unix timestamp (seconds), UTC, `2026-01-31 08:00:00 UTC`.
pub fn format_unix(secs: i64) -> String {
    match time::OffsetDateTime::from_unix_timestamp(secs) {
        Ok(t) => format!(
            "{:04}-{:02}-{:02} {:02}:{:02}:{:02} UTC",
            t.year(),
            u8::from(t.month()),
            t.day(),
            t.hour(),
            t.minute(),
            t.second()
        ),
        Err(_) => format!("@{secs}"),
    }
}

/// How long ago `then_ms` was, coarsely: `4s ago`, `3m ago`, `5h ago`, `2d ago`; `never` for 0.
pub fn format_age(now_ms: i64, then_ms: i64) -> String {
    if then_ms <= 0 {
        return "never".to_string();
    }
    let secs = (now_ms - then_ms) / 1000;
    if secs < 0 {
        return "just now".to_string(); // the directory's clock is ahead of ours
    }
    match secs {
        0..=119 => format!("{secs}s ago"),
        120..=7199 => format!("{}m ago", secs / 60),
        7200..=172_799 => format!("{}h ago", secs / 3600),
        _ => format!("{}d ago", secs / 86_400),
    }
}

/// The date of a Unix timestamp (milliseconds), UTC: `2026-01-31`.
pub fn format_day_ms(ms: i64) -> String {
    format_unix(ms.div_euclid(1000)).get(..10).unwrap_or_default().to_string()
}

pub use crate::status::GRPC_CODE_NAMES;

/// The name of a gRPC status code (`PERMISSION_DENIED`), `CODE_N` for one this build does not know.
pub fn code_name(code: i32) -> String {
    usize::try_from(code)
        .ok()
        .and_then(|i| GRPC_CODE_NAMES.get(i))
        .map(|s| s.to_string())
        .unwrap_or_else(|| format!("CODE_{code}"))
}

pub fn now_unix_ms() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis() as i64)
        .unwrap_or(0)
}

// ---- catalog ----

#[derive(Debug, Serialize)]
pub struct FacetView {
    pub value: String,
    pub count: u64,
}

fn facets(f: &[FacetCount]) -> Vec<FacetView> {
    f.iter().map(|f| FacetView { value: f.value.clone(), count: f.count }).collect()
}

#[derive(Debug, Serialize)]
pub struct HitView {
    pub score: f32,
    pub entry: CatalogEntrySpec,
}

#[derive(Debug, Serialize)]
pub struct SearchView {
    pub total_hits: u64,
    pub hits: Vec<HitView>,
    /// Empty on the last page (and always with `--all`).
    pub next_page_token: String,
    pub provider_facets: Vec<FacetView>,
    pub share_type_facets: Vec<FacetView>,
    pub classification_facets: Vec<FacetView>,
    pub catalog_version: u64,
}

impl SearchView {
    /// One page, or several pages merged (`--all`): facets and totals come from the first page, the hits
    /// from all of them.
    pub fn from_pages(pages: Vec<SearchCatalogResponse>) -> Self {
        let mut pages = pages.into_iter();
        let first = pages.next().unwrap_or_default();
        let mut view = SearchView {
            total_hits: first.total_hits,
            hits: Vec::new(),
            next_page_token: String::new(),
            provider_facets: facets(&first.provider_facets),
            share_type_facets: facets(&first.share_type_facets),
            classification_facets: facets(&first.classification_facets),
            catalog_version: first.catalog_version,
        };
        let mut last_token = first.next_page_token.clone();
        for page in std::iter::once(first).chain(pages) {
            last_token = page.next_page_token.clone();
            view.hits.extend(
                page.hits
                    .into_iter()
                    .map(|h| HitView { score: h.score, entry: h.entry.map(Into::into).unwrap_or_else(empty_spec) }),
            );
        }
        view.next_page_token = last_token;
        view
    }

    pub fn human(&self) -> String {
        let mut out = String::new();
        let shown = self.hits.len();
        let _ = writeln!(
            out,
            "{shown} of {} hit{} (catalog version {})",
            self.total_hits,
            if self.total_hits == 1 { "" } else { "s" },
            self.catalog_version
        );
        if shown > 0 {
            let mut t = Table::new(&["code", "name", "provider", "share type", "score"])
                .max_width(1, 40)
                .align(4, Align::Right);
            for h in &self.hits {
                let e = &h.entry;
                t.row([
                    e.resource_code.clone(),
                    e.name.clone(),
                    e.provider_code.clone(),
                    e.share_type.clone(),
                    format!("{:.2}", h.score),
                ]);
            }
            out.push('\n');
            out.push_str(&t.render());
        }
        let facet_line = |label: &str, f: &[FacetView]| -> String {
            if f.is_empty() {
                String::new()
            } else {
                let parts: Vec<String> = f.iter().map(|f| format!("{} ({})", f.value, f.count)).collect();
                format!("{label}: {}\n", parts.join(", "))
            }
        };
        let facet_text = [
            facet_line("providers", &self.provider_facets),
            facet_line("share types", &self.share_type_facets),
            facet_line("classification", &self.classification_facets),
        ]
        .concat();
        if !facet_text.is_empty() {
            out.push('\n');
            out.push_str(&facet_text);
        }
        if !self.next_page_token.is_empty() {
            let _ = writeln!(out, "\nnext page: --page-token {}", self.next_page_token);
        }
        out
    }
}

fn empty_spec() -> CatalogEntrySpec {
    CatalogEntrySpec::from(&exchange_proto::v1::CatalogEntry::default())
}

/// One entry, every field, for `catalog get`.
pub fn entry_human(e: &CatalogEntrySpec) -> String {
    let mut out = String::new();
    let mut field = |label: &str, value: &str| {
        if !value.is_empty() {
            let _ = writeln!(out, "{label:<16}{value}");
        }
    };
    field("resource code", &e.resource_code);
    field("name", &e.name);
    field("summary", &e.summary);
    field("provider", &format!("{} ({})", e.provider_name, e.provider_code));
    field("classification", &e.classification);
    field("format", &e.format);
    field("share type", &e.share_type);
    field(
        if e.share_type == "not_shared" { "legal basis" } else { "share condition" },
        &e.share_condition,
    );
    field("share methods", &e.share_methods.join(", "));
    field("open", &e.open_attribute);
    field("open condition", &e.open_condition);
    field("update cycle", &e.update_cycle);
    field("published", &e.publish_date);
    field("record kind", &e.record_kind);
    field("key item", &e.key_item);
    field("related", &e.related_resource_codes.join(", "));
    field("version", &e.version.map(|v| v.to_string()).unwrap_or_default());
    if e.withdrawn {
        field("status", "WITHDRAWN");
    }
    if !e.data_items.is_empty() {
        let mut t = Table::new(&["data item", "type", "description"]);
        for d in &e.data_items {
            t.row([d.name.as_str(), d.data_type.as_str(), d.description.as_str()]);
        }
        out.push('\n');
        out.push_str(&t.render());
    }
    out
}

#[derive(Debug, Serialize)]
pub struct PublishedView {
    pub resource_code: String,
    pub name: String,
    pub version: u64,
}

#[derive(Debug, Serialize)]
pub struct PublishView {
    pub file: String,
    /// `directory` or the node's address.
    pub via: String,
    pub dry_run: bool,
    pub catalog_version: u64,
    pub entries: Vec<PublishedView>,
}

/// Beyond this many entries the per-entry table is left out of the human output.
const PUBLISH_TABLE_LIMIT: usize = 100;

impl PublishView {
    pub fn human(&self) -> String {
        let mut out = if self.dry_run {
            format!("{}: {} entries read and checked; nothing sent (--dry-run)\n", self.file, self.entries.len())
        } else {
            format!(
                "published {} entries from {} via {} (catalog version {})\n",
                self.entries.len(),
                self.file,
                self.via,
                self.catalog_version
            )
        };
        if !self.entries.is_empty() && self.entries.len() <= PUBLISH_TABLE_LIMIT {
            let mut t = Table::new(&["code", "version", "name"]).align(1, Align::Right);
            for e in &self.entries {
                let version = if self.dry_run { "-".to_string() } else { e.version.to_string() };
                t.row([e.resource_code.clone(), version, e.name.clone()]);
            }
            out.push('\n');
            out.push_str(&t.render());
        }
        out
    }
}

#[derive(Debug, Serialize)]
pub struct WithdrawView {
    pub via: String,
    pub catalog_version: u64,
    pub withdrawn: Vec<String>,
}

impl WithdrawView {
    pub fn human(&self) -> String {
        format!(
            "withdrew {} entr{} via {} (catalog version {}): {}\n",
            self.withdrawn.len(),
            if self.withdrawn.len() == 1 { "y" } else { "ies" },
            self.via,
            self.catalog_version,
            self.withdrawn.join(", ")
        )
    }
}

#[derive(Debug, Serialize)]
pub struct ChangeView {
    pub version: u64,
    /// `upsert` or `withdraw`.
    pub kind: String,
    pub resource_code: String,
    pub name: String,
    pub entry: Option<CatalogEntrySpec>,
}

impl From<CatalogChange> for ChangeView {
    fn from(c: CatalogChange) -> Self {
        let kind = match ChangeKind::try_from(c.kind) {
            Ok(ChangeKind::Upsert) => "upsert".to_string(),
            Ok(ChangeKind::Withdraw) => "withdraw".to_string(),
            _ => format!("unknown({})", c.kind),
        };
        let entry: Option<CatalogEntrySpec> = c.entry.map(Into::into);
        ChangeView {
            version: c.version,
            kind,
            resource_code: entry.as_ref().map(|e| e.resource_code.clone()).unwrap_or_default(),
            name: entry.as_ref().map(|e| e.name.clone()).unwrap_or_default(),
            entry,
        }
    }
}

impl ChangeView {
    /// One line per change; the name goes last so the fixed-width columns before it stay aligned.
    pub fn human(&self) -> String {
        format!("{:>8}  {:<8}  {:<20}  {}", self.version, self.kind, self.resource_code, self.name)
    }
}

// ---- nodes ----

pub fn node_status_word(status: i32) -> &'static str {
    match NodeStatus::try_from(status) {
        Ok(NodeStatus::Online) => "online",
        Ok(NodeStatus::Offline) => "offline",
        _ => "unknown",
    }
}

#[derive(Clone, Debug, Serialize)]
pub struct NodeView {
    pub department: String,
    pub node_name: String,
    pub address: String,
    /// `online`, `offline` or `unknown`.
    pub status: String,
    pub registered_at_unix_ms: i64,
    pub last_heartbeat_unix_ms: i64,
    pub lease_expires_unix_ms: i64,
    pub software_version: String,
    /// The node's audit seal key (Ed25519 public key, hex), to check its audit trail with.
    pub audit_verifying_key_hex: String,
    /// The highest audit entry covered by a seal the node reported (the directory's anchor).
    pub audit_anchored_upto_seq: u64,
}

impl From<NodeInfo> for NodeView {
    fn from(n: NodeInfo) -> Self {
        NodeView {
            status: node_status_word(n.status).to_string(),
            department: n.department,
            node_name: n.node_name,
            address: n.address,
            registered_at_unix_ms: n.registered_at_unix_ms,
            last_heartbeat_unix_ms: n.last_heartbeat_unix_ms,
            lease_expires_unix_ms: n.lease_expires_unix_ms,
            software_version: n.software_version,
            audit_verifying_key_hex: n.audit_verifying_key_hex,
            audit_anchored_upto_seq: n.audit_anchor.map_or(0, |a| a.upto_seq),
        }
    }
}

#[derive(Debug, Serialize)]
pub struct NodesView {
    pub nodes: Vec<NodeView>,
}

impl NodesView {
    pub fn human(&self, now_ms: i64) -> String {
        if self.nodes.is_empty() {
            return "no nodes registered\n".to_string();
        }
        let mut t = Table::new(&["department", "name", "status", "address", "last heartbeat", "version"]);
        for n in &self.nodes {
            t.row([
                n.department.clone(),
                n.node_name.clone(),
                n.status.clone(),
                n.address.clone(),
                format_age(now_ms, n.last_heartbeat_unix_ms),
                n.software_version.clone(),
            ]);
        }
        t.render()
    }
}

/// `catalog resolve`: the entry's identity and the provider's nodes.
#[derive(Debug, Serialize)]
pub struct ResolveView {
    pub resource_code: String,
    pub name: String,
    pub provider_code: String,
    pub share_type: String,
    pub providers: Vec<NodeView>,
}

impl From<ResolveResourceResponse> for ResolveView {
    fn from(r: ResolveResourceResponse) -> Self {
        let entry = r.entry.map(|e| CatalogEntrySpec::from(&e));
        ResolveView {
            resource_code: entry.as_ref().map(|e| e.resource_code.clone()).unwrap_or_default(),
            name: entry.as_ref().map(|e| e.name.clone()).unwrap_or_default(),
            provider_code: entry.as_ref().map(|e| e.provider_code.clone()).unwrap_or_default(),
            share_type: entry.as_ref().map(|e| e.share_type.clone()).unwrap_or_default(),
            providers: r.providers.into_iter().map(NodeView::from).collect(),
        }
    }
}

impl ResolveView {
    pub fn human(&self, now_ms: i64) -> String {
        let head = format!("{}  {}  provider {}  ({})\n\n", self.resource_code, self.name, self.provider_code, self.share_type);
        let nodes = NodesView { nodes: self.providers.clone() };
        if self.providers.is_empty() {
            return format!("{head}no node of {} is registered\n", self.provider_code);
        }
        format!("{head}{}", nodes.human(now_ms))
    }
}

#[derive(Debug, Serialize)]
pub struct NodeStatusView {
    pub department: String,
    pub node_name: String,
    pub address: String,
    pub software_version: String,
    pub started_at_unix_ms: i64,
    pub registered: bool,
    pub last_heartbeat_ok_unix_ms: i64,
    pub last_directory_error: String,
    pub published_entries: u64,
    pub catalog_version: u64,
    pub grants_version: u64,
    pub revocations_version: u64,
    pub provided_resources: u64,
    pub active_grants: u64,
    pub directory_watch_connected: bool,
    pub audit_entries: u64,
    pub records_stored: u64,
    /// How old the node's copy of the directory's state is (0 while the watches are connected).
    pub directory_state_age_seconds: u64,
    /// The bound past which relaying and event delivery stop (0: none).
    pub directory_max_staleness_seconds: u64,
    pub directory_state_stale: bool,
    pub subscriptions_as_provider: u64,
    pub subscriptions_as_consumer: u64,
    /// Events not yet acknowledged by subscribers.
    pub outbox_backlog: u64,
    /// Events not yet acknowledged by this department's applications.
    pub inbox_backlog: u64,
}

impl From<NodeStatusResponse> for NodeStatusView {
    fn from(s: NodeStatusResponse) -> Self {
        NodeStatusView {
            department: s.department,
            node_name: s.node_name,
            address: s.address,
            software_version: s.software_version,
            started_at_unix_ms: s.started_at_unix_ms,
            registered: s.registered,
            last_heartbeat_ok_unix_ms: s.last_heartbeat_ok_unix_ms,
            last_directory_error: s.last_directory_error,
            published_entries: s.published_entries,
            catalog_version: s.catalog_version,
            grants_version: s.grants_version,
            revocations_version: s.revocations_version,
            provided_resources: s.provided_resources,
            active_grants: s.active_grants,
            directory_watch_connected: s.directory_watch_connected,
            audit_entries: s.audit_entries,
            records_stored: s.records_stored,
            directory_state_age_seconds: s.directory_state_age_seconds,
            directory_max_staleness_seconds: s.directory_max_staleness_seconds,
            directory_state_stale: s.directory_state_stale,
            subscriptions_as_provider: s.subscriptions_as_provider,
            subscriptions_as_consumer: s.subscriptions_as_consumer,
            outbox_backlog: s.outbox_backlog,
            inbox_backlog: s.inbox_backlog,
        }
    }
}

/// A length of time in seconds, coarsely: `45s`, `12m`, `5h`, `2d`.
pub fn format_secs(secs: u64) -> String {
    match secs {
        0..=119 => format!("{secs}s"),
        120..=7199 => format!("{}m", secs / 60),
        7200..=172_799 => format!("{}h", secs / 3600),
        _ => format!("{}d", secs / 86_400),
    }
}

impl NodeStatusView {
    pub fn human(&self, now_ms: i64) -> String {
        let rows = [
            ("node", format!("{}/{}", self.department, self.node_name)),
            ("address", self.address.clone()),
            ("software", self.software_version.clone()),
            ("started", format!("{} ({})", format_unix(self.started_at_unix_ms / 1000), format_age(now_ms, self.started_at_unix_ms))),
            ("registered", if self.registered { "yes".into() } else { "no".into() }),
            ("last heartbeat", format_age(now_ms, self.last_heartbeat_ok_unix_ms)),
            ("published", format!("{} entries", self.published_entries)),
            ("catalog version", self.catalog_version.to_string()),
            ("grants version", self.grants_version.to_string()),
            ("revocations", format!("version {}", self.revocations_version)),
            ("directory watch", if self.directory_watch_connected { "connected".into() } else { "disconnected".into() }),
            ("directory state", self.directory_state()),
            ("provides", format!("{} resources, {} active grants", self.provided_resources, self.active_grants)),
            ("records stored", self.records_stored.to_string()),
            ("audit entries", self.audit_entries.to_string()),
            (
                "subscriptions",
                format!("{} as provider, {} as consumer", self.subscriptions_as_provider, self.subscriptions_as_consumer),
            ),
            (
                "event backlog",
                format!(
                    "outbox {} (not yet acknowledged by subscribers), inbox {} (not yet acknowledged by applications)",
                    self.outbox_backlog, self.inbox_backlog
                ),
            ),
            ("directory error", if self.last_directory_error.is_empty() { "-".into() } else { self.last_directory_error.clone() }),
        ];
        rows.iter().map(|(k, v)| format!("{k:<17}{v}\n")).collect()
    }

    /// `current`, `40s old (bound 5m)`, or `STALE: ...` when past the bound.
    fn directory_state(&self) -> String {
        let bound = match self.directory_max_staleness_seconds {
            0 => "no bound".to_string(),
            b => format!("bound {}", format_secs(b)),
        };
        let age = self.directory_state_age_seconds;
        if self.directory_state_stale {
            format!("STALE: {} old ({bound}): relaying and event delivery are stopped until the directory is back", format_secs(age))
        } else if age == 0 {
            format!("current ({bound})")
        } else {
            format!("{} old ({bound})", format_secs(age))
        }
    }
}

// ---- identities and certificates ----

#[derive(Debug, Serialize)]
pub struct WhoAmIView {
    pub department: String,
    pub role: String,
    pub name: String,
    pub serial_hex: String,
}

impl From<WhoAmIResponse> for WhoAmIView {
    fn from(w: WhoAmIResponse) -> Self {
        WhoAmIView { department: w.department, role: w.role, name: w.name, serial_hex: w.serial_hex }
    }
}

impl WhoAmIView {
    pub fn human(&self) -> String {
        format!(
            "department  {}\nrole        {}\nname        {}\nserial      {}\n",
            self.department, self.role, self.name, self.serial_hex
        )
    }
}

#[derive(Debug, Serialize)]
pub struct RevocationView {
    pub serial_hex: String,
    pub department: String,
    pub reason: String,
    pub revoked_by: String,
    pub revoked_at_unix_ms: i64,
}

impl From<Revocation> for RevocationView {
    fn from(r: Revocation) -> Self {
        RevocationView {
            serial_hex: r.serial_hex,
            department: r.department,
            reason: r.reason,
            revoked_by: r.revoked_by,
            revoked_at_unix_ms: r.revoked_at_unix_ms,
        }
    }
}

impl RevocationView {
    pub fn human(&self) -> String {
        let mut out = format!("revoked certificate {}", self.serial_hex);
        if !self.department.is_empty() {
            let _ = write!(out, " of department {}", self.department);
        }
        let _ = write!(out, " at {}", format_unix(self.revoked_at_unix_ms / 1000));
        if !self.revoked_by.is_empty() {
            let _ = write!(out, " by {}", self.revoked_by);
        }
        if !self.reason.is_empty() {
            let _ = write!(out, "\nreason: {}", self.reason);
        }
        out.push('\n');
        out
    }
}

#[derive(Debug, Serialize)]
pub struct CertView {
    pub path: String,
    pub identity_uri: String,
    pub department: String,
    pub role: String,
    pub name: String,
    pub serial_hex: String,
    pub not_after_unix: i64,
    pub expired: bool,
}

impl CertView {
    pub fn human(&self) -> String {
        let now = now_unix_ms() / 1000;
        let days_left = (self.not_after_unix - now) / 86_400;
        let expiry = if self.expired {
            format!("{} (EXPIRED)", format_unix(self.not_after_unix))
        } else {
            format!("{} (in {days_left} days)", format_unix(self.not_after_unix))
        };
        format!(
            "file        {}\nidentity    {}\ndepartment  {}\nrole        {}\nname        {}\nserial      {}\nexpires     {}\n",
            self.path, self.identity_uri, self.department, self.role, self.name, self.serial_hex, expiry
        )
    }
}

#[derive(Debug, Serialize)]
pub struct IssuedView {
    pub cert: String,
    pub key: String,
    pub serial_hex: String,
    /// Empty for a CA.
    pub identity_uri: String,
}

impl IssuedView {
    pub fn human(&self) -> String {
        let mut out = format!("wrote {}\nwrote {}\nserial      {}\n", self.cert, self.key, self.serial_hex);
        if !self.identity_uri.is_empty() {
            let _ = writeln!(out, "identity    {}", self.identity_uri);
        }
        out
    }
}

// ---- records ----

#[derive(Debug, Serialize)]
pub struct PutView {
    pub file: String,
    pub resource_code: String,
    /// The node's address.
    pub via: String,
    /// Records read from the file.
    pub records: usize,
    /// Records the node acknowledged as stored.
    pub stored: u64,
}

impl PutView {
    pub fn human(&self) -> String {
        format!(
            "stored {} record{} of {} from {} via {}\n",
            self.stored,
            if self.stored == 1 { "" } else { "s" },
            self.resource_code,
            self.file,
            self.via
        )
    }
}

#[derive(Debug, Serialize)]
pub struct RecordView {
    pub key: String,
    pub items: BTreeMap<String, String>,
    pub updated_at_unix_ms: i64,
}

/// `records get`: the response, with the keys that were not found spelled out.
#[derive(Debug, Serialize)]
pub struct QueryView {
    pub resource_code: String,
    pub message_id: String,
    pub provider_code: String,
    pub records: Vec<RecordView>,
    /// Indexes into the keys asked for.
    pub not_found: Vec<u32>,
    pub not_found_keys: Vec<String>,
    pub data_items: Vec<String>,
    pub masked_items: Vec<String>,
}

impl QueryView {
    pub fn new(resource: &str, keys: &[String], result: QueryResult) -> Self {
        let keys_ref: Vec<&str> = keys.iter().map(String::as_str).collect();
        let not_found_keys = result
            .pair_with_keys(&keys_ref)
            .into_iter()
            .filter(|(_, r)| r.is_none())
            .map(|(k, _)| k.to_string())
            .collect();
        QueryView {
            resource_code: resource.to_string(),
            message_id: result.message_id,
            provider_code: result.provider_code,
            records: result
                .records
                .into_iter()
                .map(|r| RecordView {
                    key: r.key,
                    items: r.items.into_iter().collect(),
                    updated_at_unix_ms: r.updated_at_unix_ms,
                })
                .collect(),
            not_found: result.not_found,
            not_found_keys,
            data_items: result.data_items,
            masked_items: result.masked_items,
        }
    }

    pub fn human(&self) -> String {
        let dash = |s: String| if s.is_empty() { "-".to_string() } else { s };
        let mut out = String::new();
        let _ = writeln!(out, "resource    {}", self.resource_code);
        let _ = writeln!(out, "provider    {}", dash(self.provider_code.clone()));
        let _ = writeln!(out, "message id  {}", dash(self.message_id.clone()));
        let _ = writeln!(out, "masked      {}", dash(self.masked_items.join(", ")));
        for r in &self.records {
            out.push('\n');
            let stored = if r.updated_at_unix_ms > 0 {
                format!("  (stored {})", format_unix(r.updated_at_unix_ms / 1000))
            } else {
                String::new()
            };
            let _ = writeln!(out, "{}{stored}", r.key);
            // Catalog order first (the order the response lists the visible items in), then the rest.
            let mut t = Table::new(&["item", "value"]);
            for name in &self.data_items {
                if let Some(v) = r.items.get(name) {
                    t.row([name.as_str(), v.as_str()]);
                }
            }
            for (name, v) in &r.items {
                if !self.data_items.contains(name) {
                    t.row([name.as_str(), v.as_str()]);
                }
            }
            out.push_str(&t.render());
        }
        if !self.not_found_keys.is_empty() {
            let _ = writeln!(out, "\nnot found: {}", self.not_found_keys.join(", "));
        }
        out
    }
}

// ---- grants ----

#[derive(Debug, Serialize)]
pub struct GrantView {
    pub grant_id: String,
    pub resource_code: String,
    pub consumer_code: String,
    pub provider_code: String,
    /// `pending`, `approved`, `rejected`, `revoked`, `expired` or `superseded`.
    pub status: String,
    pub requested_items: Vec<String>,
    pub granted_items: Vec<String>,
    pub purpose: String,
    pub legal_basis: String,
    pub requested_by: String,
    pub requested_at_unix_ms: i64,
    pub decided_by: String,
    pub decided_at_unix_ms: i64,
    pub decision_reason: String,
    /// 0: does not expire.
    pub expires_at_unix_ms: i64,
    pub version: u64,
}

impl From<Grant> for GrantView {
    fn from(g: Grant) -> Self {
        GrantView {
            status: GRANT_STATUSES.word(g.status),
            grant_id: g.grant_id,
            resource_code: g.resource_code,
            consumer_code: g.consumer_code,
            provider_code: g.provider_code,
            requested_items: g.requested_items,
            granted_items: g.granted_items,
            purpose: g.purpose,
            legal_basis: g.legal_basis,
            requested_by: g.requested_by,
            requested_at_unix_ms: g.requested_at_unix_ms,
            decided_by: g.decided_by,
            decided_at_unix_ms: g.decided_at_unix_ms,
            decision_reason: g.decision_reason,
            expires_at_unix_ms: g.expires_at_unix_ms,
            version: g.version,
        }
    }
}

impl GrantView {
    /// The granted items once decided, else the requested ones.
    pub fn items(&self) -> &[String] {
        if self.granted_items.is_empty() {
            &self.requested_items
        } else {
            &self.granted_items
        }
    }

    fn expires(&self) -> String {
        if self.expires_at_unix_ms == 0 {
            "never".to_string()
        } else {
            format_unix(self.expires_at_unix_ms / 1000)
        }
    }

    /// Every field of one grant, for request/approve/reject/revoke.
    pub fn human(&self) -> String {
        let at = |by: &str, ms: i64| -> String {
            match (by.is_empty(), ms > 0) {
                (false, true) => format!("{by} at {}", format_unix(ms / 1000)),
                (false, false) => by.to_string(),
                (true, true) => format!("- at {}", format_unix(ms / 1000)),
                (true, false) => String::new(),
            }
        };
        let rows = [
            ("grant", self.grant_id.clone()),
            ("status", self.status.clone()),
            ("resource", self.resource_code.clone()),
            ("consumer", self.consumer_code.clone()),
            ("provider", self.provider_code.clone()),
            ("requested", self.requested_items.join(", ")),
            ("requested by", at(&self.requested_by, self.requested_at_unix_ms)),
            ("purpose", self.purpose.clone()),
            ("legal basis", self.legal_basis.clone()),
            ("granted", self.granted_items.join(", ")),
            ("decided by", at(&self.decided_by, self.decided_at_unix_ms)),
            ("reason", self.decision_reason.clone()),
            ("expires", if self.status == "pending" || self.status == "rejected" { String::new() } else { self.expires() }),
        ];
        rows.iter().filter(|(_, v)| !v.is_empty()).map(|(k, v)| format!("{k:<14}{v}\n")).collect()
    }
}

#[derive(Debug, Serialize)]
pub struct GrantsView {
    pub grants: Vec<GrantView>,
}

impl GrantsView {
    pub fn human(&self) -> String {
        if self.grants.is_empty() {
            return "no grants\n".to_string();
        }
        let mut t = Table::new(&["id", "resource", "consumer", "provider", "status", "items", "expires"]).max_width(5, 40);
        for g in &self.grants {
            let expires = match g.expires_at_unix_ms {
                0 if g.status == "pending" || g.status == "rejected" => "-".to_string(),
                0 => "never".to_string(),
                ms => format_day_ms(ms),
            };
            t.row([
                g.grant_id.clone(),
                g.resource_code.clone(),
                g.consumer_code.clone(),
                g.provider_code.clone(),
                g.status.clone(),
                g.items().join(","),
                expires,
            ]);
        }
        t.render()
    }
}

// ---- audit ----

#[derive(Debug, Serialize)]
pub struct VerifyView {
    pub intact: bool,
    pub entries: u64,
    pub seals: u64,
    /// Entries after the last seal.
    pub unsealed: u64,
    pub problem: String,
    pub problem_seq: u64,
    pub verifying_key_hex: String,
    /// Whether the directory's anchor (the highest seal the node reported) was compared.
    pub anchor_checked: bool,
    pub anchored_upto_seq: u64,
    pub anchor_note: String,
}

impl From<VerifyAuditResponse> for VerifyView {
    fn from(v: VerifyAuditResponse) -> Self {
        VerifyView {
            intact: v.intact,
            entries: v.entries,
            seals: v.seals,
            unsealed: v.unsealed,
            problem: v.problem,
            problem_seq: v.problem_seq,
            verifying_key_hex: v.verifying_key_hex,
            anchor_checked: v.anchor_checked,
            anchored_upto_seq: v.anchored_upto_seq,
            anchor_note: v.anchor_note,
        }
    }
}

impl VerifyView {
    pub fn human(&self) -> String {
        let mut out = format!(
            "entries   {}\nseals     {}\nunsealed  {} (after the last seal)\n",
            self.entries, self.seals, self.unsealed
        );
        if !self.verifying_key_hex.is_empty() {
            let _ = writeln!(out, "seal key  {}", self.verifying_key_hex);
        }
        if self.anchor_checked {
            let _ = writeln!(out, "anchor    the directory's seal up to entry {} checked", self.anchored_upto_seq);
        } else if !self.anchor_note.is_empty() {
            let _ = writeln!(out, "anchor    not checked: {}", self.anchor_note);
        }
        if self.intact {
            out.push_str("intact\n");
        } else {
            let _ = writeln!(out, "NOT INTACT at entry seq {}: {}", self.problem_seq, self.problem);
        }
        out
    }
}

#[derive(Debug, Serialize)]
pub struct AuditEntryView {
    pub seq: u64,
    pub message_id: String,
    /// `consumer` or `provider`: which side this node was on.
    pub side: String,
    pub consumer: String,
    pub provider: String,
    /// The department on the other side.
    pub peer: String,
    pub resource_code: String,
    pub key_hash: String,
    pub data_items: Vec<String>,
    pub result_code: i32,
    /// `OK` or the gRPC code name.
    pub result: String,
    pub request_bytes: u64,
    pub response_bytes: u64,
    pub request_in_us: i64,
    pub request_out_us: i64,
    pub response_in_us: i64,
    pub response_out_us: i64,
    /// From the request coming in to the response going out; absent when either time is missing.
    pub total_ms: Option<f64>,
    pub caller: String,
    pub purpose: String,
    pub error: String,
}

impl From<AuditEntry> for AuditEntryView {
    fn from(e: AuditEntry) -> Self {
        let peer = if e.side == "consumer" { e.provider.clone() } else { e.consumer.clone() };
        let total_ms = (e.request_in_us > 0 && e.response_out_us >= e.request_in_us)
            .then(|| (e.response_out_us - e.request_in_us) as f64 / 1000.0);
        AuditEntryView {
            seq: e.seq,
            message_id: e.message_id,
            side: e.side,
            consumer: e.consumer,
            provider: e.provider,
            peer,
            resource_code: e.resource_code,
            key_hash: e.key_hash,
            data_items: e.data_items,
            result_code: e.result_code,
            result: code_name(e.result_code),
            request_bytes: e.request_bytes,
            response_bytes: e.response_bytes,
            request_in_us: e.request_in_us,
            request_out_us: e.request_out_us,
            response_in_us: e.response_in_us,
            response_out_us: e.response_out_us,
            total_ms,
            caller: e.caller,
            purpose: e.purpose,
            error: e.error,
        }
    }
}

#[derive(Debug, Serialize)]
pub struct AuditView {
    pub entries: Vec<AuditEntryView>,
    /// Entries in the whole log.
    pub total_entries: u64,
    /// More entries matched than the limit.
    pub truncated: bool,
}

impl From<QueryAuditResponse> for AuditView {
    fn from(r: QueryAuditResponse) -> Self {
        AuditView {
            entries: r.entries.into_iter().map(Into::into).collect(),
            total_entries: r.total_entries,
            truncated: r.truncated,
        }
    }
}

impl AuditView {
    pub fn human(&self) -> String {
        if self.entries.is_empty() {
            return format!("no matching entries ({} in the log)\n", self.total_entries);
        }
        let mut t = Table::new(&[
            "time (UTC)", "side", "message id", "peer", "resource", "result", "items", "bytes", "total ms",
        ])
        .max_width(6, 30)
        .align(7, Align::Right)
        .align(8, Align::Right);
        for e in &self.entries {
            let time = format_unix(e.request_in_us.div_euclid(1_000_000));
            t.row([
                time.trim_end_matches(" UTC").to_string(),
                e.side.clone(),
                e.message_id.clone(),
                e.peer.clone(),
                e.resource_code.clone(),
                e.result.clone(),
                e.data_items.join(","),
                format!("{}/{}", e.request_bytes, e.response_bytes),
                e.total_ms.map(|ms| format!("{ms:.1}")).unwrap_or_else(|| "-".into()),
            ]);
        }
        let mut out = t.render();
        let _ = writeln!(
            out,
            "\n{} entr{} shown, newest first ({} in the log); bytes are request/response",
            self.entries.len(),
            if self.entries.len() == 1 { "y" } else { "ies" },
            self.total_entries
        );
        if self.truncated {
            out.push_str("more entries match: narrow the filters or raise --limit\n");
        }
        out
    }
}

// ---- events and sync ----

/// `events publish`.
#[derive(Debug, Serialize)]
pub struct EventsPublishedView {
    pub file: String,
    pub resource_code: String,
    pub via: String,
    /// `created`, `updated`, `deregistered`, or `unspecified` (created if new, updated otherwise).
    pub kind: String,
    pub changes: u64,
    pub first_seq: u64,
    pub last_seq: u64,
    /// Batches the node had applied already (sent again after a lost answer): not applied twice.
    pub duplicate_batches: u32,
}

impl EventsPublishedView {
    pub fn human(&self) -> String {
        let seqs = match (self.first_seq, self.last_seq) {
            (0, _) => String::new(),
            (f, l) if f == l => format!(": seq {f}"),
            (f, l) => format!(": seq {f}-{l}"),
        };
        let dup = match self.duplicate_batches {
            0 => String::new(),
            n => format!(" ({n} batch{} had been applied already and was not applied again)", if n == 1 { "" } else { "es" }),
        };
        format!(
            "published {} change{} of {} from {} via {}{seqs}{dup}\n",
            self.changes,
            if self.changes == 1 { "" } else { "s" },
            self.resource_code,
            self.file,
            self.via
        )
    }
}

/// `events subscribe`.
#[derive(Debug, Serialize)]
pub struct SubscribedView {
    pub resource_code: String,
    pub provider_code: String,
    /// Events after this seq are kept in the node's inbox.
    pub start_seq: u64,
    /// The subscription existed already (kept, with its position).
    pub existed: bool,
    pub data_items: Vec<String>,
    pub masked_items: Vec<String>,
}

impl SubscribedView {
    pub fn new(resource: &str, r: crate::events::SubscribeResponse) -> Self {
        SubscribedView {
            resource_code: resource.to_string(),
            provider_code: r.provider_code,
            start_seq: r.start_seq,
            existed: r.existed,
            data_items: r.data_items,
            masked_items: r.masked_items,
        }
    }

    pub fn human(&self) -> String {
        let dash = |v: &[String]| if v.is_empty() { "-".to_string() } else { v.join(", ") };
        let head = if self.existed {
            format!(
                "already subscribed to {} (provider {}): the subscription started after seq {}\n",
                self.resource_code, self.provider_code, self.start_seq
            )
        } else {
            format!(
                "subscribed to {} (provider {}): every change after seq {} is kept in the node's inbox\n",
                self.resource_code, self.provider_code, self.start_seq
            )
        };
        format!("{head}items   {}\nmasked  {}\n", dash(&self.data_items), dash(&self.masked_items))
    }
}

/// `events unsubscribe`.
#[derive(Debug, Serialize)]
pub struct UnsubscribedView {
    pub resource_code: String,
    pub existed: bool,
}

impl UnsubscribedView {
    pub fn human(&self) -> String {
        if self.existed {
            format!("unsubscribed from {}\n", self.resource_code)
        } else {
            format!("no active subscription to {}: nothing to do\n", self.resource_code)
        }
    }
}

/// One subscription, either side.
#[derive(Debug, Serialize)]
pub struct SubscriptionView {
    pub resource_code: String,
    pub provider_code: String,
    pub consumer_code: String,
    pub start_seq: u64,
    /// Consumer side: every event up to it is in this node's inbox. Provider side: the consumer's node has
    /// acknowledged every event up to it.
    pub received_upto_seq: u64,
    /// Consumer side: acknowledged by this department's applications.
    pub acked_upto_seq: u64,
    /// Provider side: the resource's latest change.
    pub head_seq: u64,
    pub backlog: u64,
    pub connected: bool,
    pub active: bool,
    pub ended_reason: String,
    pub last_delivery_unix_ms: i64,
    pub last_error: String,
}

impl From<crate::events::Subscription> for SubscriptionView {
    fn from(s: crate::events::Subscription) -> Self {
        SubscriptionView {
            resource_code: s.resource_code,
            provider_code: s.provider_code,
            consumer_code: s.consumer_code,
            start_seq: s.start_seq,
            received_upto_seq: s.received_upto_seq,
            acked_upto_seq: s.acked_upto_seq,
            head_seq: s.head_seq,
            backlog: s.backlog,
            connected: s.connected,
            active: s.active,
            ended_reason: s.ended_reason,
            last_delivery_unix_ms: s.last_delivery_unix_ms,
            last_error: s.last_error,
        }
    }
}

impl SubscriptionView {
    fn state(&self) -> String {
        match (self.active, self.ended_reason.as_str()) {
            (true, _) => "active".to_string(),
            (false, "") => "ended".to_string(),
            (false, reason) => format!("ended: {reason}"),
        }
    }
}

/// `events list`.
#[derive(Debug, Serialize)]
pub struct SubscriptionsView {
    /// This department receives.
    pub as_consumer: Vec<SubscriptionView>,
    /// This department sends.
    pub as_provider: Vec<SubscriptionView>,
}

impl From<crate::events::ListSubscriptionsResponse> for SubscriptionsView {
    fn from(r: crate::events::ListSubscriptionsResponse) -> Self {
        let mut view = SubscriptionsView {
            as_consumer: r.as_consumer.into_iter().map(Into::into).collect(),
            as_provider: r.as_provider.into_iter().map(Into::into).collect(),
        };
        view.as_consumer.sort_by(|a, b| a.resource_code.cmp(&b.resource_code));
        view.as_provider.sort_by(|a, b| (&a.resource_code, &a.consumer_code).cmp(&(&b.resource_code, &b.consumer_code)));
        view
    }
}

impl SubscriptionsView {
    pub fn human(&self, now_ms: i64) -> String {
        if self.as_consumer.is_empty() && self.as_provider.is_empty() {
            return "no subscriptions\n".to_string();
        }
        let dash = |s: &str| if s.is_empty() { "-".to_string() } else { s.to_string() };
        let yes_no = |b: bool| if b { "yes" } else { "no" }.to_string();
        let table = |peer: &str| {
            Table::new(&[
                "resource", peer, "start", "received", "acked", "head", "backlog", "connected", "last delivery", "state",
                "last error",
            ])
            .align(2, Align::Right)
            .align(3, Align::Right)
            .align(4, Align::Right)
            .align(5, Align::Right)
            .align(6, Align::Right)
            .max_width(9, 40)
            .max_width(10, 50)
        };
        let mut out = String::new();
        if !self.as_consumer.is_empty() {
            let mut t = table("provider");
            for s in &self.as_consumer {
                t.row([
                    s.resource_code.clone(),
                    s.provider_code.clone(),
                    s.start_seq.to_string(),
                    s.received_upto_seq.to_string(),
                    s.acked_upto_seq.to_string(),
                    "-".to_string(),
                    s.backlog.to_string(),
                    yes_no(s.connected),
                    format_age(now_ms, s.last_delivery_unix_ms),
                    s.state(),
                    dash(&s.last_error),
                ]);
            }
            let _ = writeln!(out, "as consumer (received: in this node's inbox; acked: by your applications)");
            out.push_str(&t.render());
        }
        if !self.as_provider.is_empty() {
            if !out.is_empty() {
                out.push('\n');
            }
            let mut t = table("consumer");
            for s in &self.as_provider {
                t.row([
                    s.resource_code.clone(),
                    s.consumer_code.clone(),
                    s.start_seq.to_string(),
                    s.received_upto_seq.to_string(),
                    "-".to_string(),
                    s.head_seq.to_string(),
                    s.backlog.to_string(),
                    yes_no(s.connected),
                    format_age(now_ms, s.last_delivery_unix_ms),
                    s.state(),
                    dash(&s.last_error),
                ]);
            }
            let _ = writeln!(out, "as provider (received: acknowledged by the consumer's node; head: the latest change)");
            out.push_str(&t.render());
        }
        out
    }
}

/// One event as `events receive` prints it (a JSON line).
#[derive(Debug, Serialize)]
pub struct EventLineView {
    pub seq: u64,
    pub kind: String,
    pub key: String,
    pub items: BTreeMap<String, String>,
    pub published_at_unix_ms: i64,
}

impl From<crate::events::RecordEvent> for EventLineView {
    fn from(e: crate::events::RecordEvent) -> Self {
        let kind = crate::events::CHANGE_KINDS.word(e.kind);
        let record = e.record.unwrap_or_default();
        EventLineView {
            seq: e.seq,
            kind,
            key: record.key,
            items: record.items.into_iter().collect(),
            published_at_unix_ms: e.published_at_unix_ms,
        }
    }
}

/// `records sync`.
#[derive(Debug, Serialize)]
pub struct SyncView {
    pub resource_code: String,
    pub file: String,
    pub via: String,
    /// Records written by this run.
    pub records_written: u64,
    /// Records in the file now (with those of earlier runs it continued).
    pub records_in_file: u64,
    /// The resource's record count when this run's snapshot started.
    pub total_records: u64,
    /// The resource's latest change when this run's snapshot started: apply events after it (and those
    /// up to it whose seq is above a record's version).
    pub head_seq: u64,
    pub seconds: f64,
    pub records_per_second: f64,
    /// This run continued an existing file.
    pub continued: bool,
    /// Bytes of a partial last line (left by an interrupted run) that were dropped first.
    pub dropped_partial_bytes: u64,
}

impl SyncView {
    pub fn human(&self) -> String {
        let mut out = format!(
            "synced {} records of {} in {:.1} s ({:.0} records/s), head seq {}\n",
            self.records_written, self.total_records, self.seconds, self.records_per_second, self.head_seq
        );
        let _ = write!(out, "{} -> {} ({} records", self.resource_code, self.file, self.records_in_file);
        if self.continued {
            let _ = write!(out, "; continued after {} from an earlier run", self.records_in_file - self.records_written);
        }
        out.push_str(")\n");
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use exchange_proto::v1::{CatalogEntry, SearchHit, ShareType};

    fn entry(code: &str, name: &str) -> CatalogEntry {
        CatalogEntry {
            resource_code: code.into(),
            name: name.into(),
            provider_code: "commerce".into(),
            share_type: ShareType::Conditional as i32,
            ..Default::default()
        }
    }

    #[test]
    fn search_table_has_hits_facets_and_next_token() {
        let page = SearchCatalogResponse {
            hits: vec![
                SearchHit { entry: Some(entry("101001/000001", "企业登记信息")), score: 12.5 },
                SearchHit { entry: Some(entry("302001/000001", "行政处罚信息")), score: 3.0 },
            ],
            total_hits: 7,
            next_page_token: "abc".into(),
            provider_facets: vec![FacetCount { value: "commerce".into(), count: 7 }],
            share_type_facets: vec![FacetCount { value: "conditional".into(), count: 7 }],
            classification_facets: vec![],
            catalog_version: 42,
        };
        let text = SearchView::from_pages(vec![page]).human();
        assert!(text.starts_with("2 of 7 hits (catalog version 42)\n"), "{text}");
        assert!(text.contains("101001/000001  企业登记信息  commerce  conditional  12.50"), "{text}");
        assert!(text.contains("providers: commerce (7)"), "{text}");
        assert!(!text.contains("classification:"), "{text}");
        assert!(text.contains("next page: --page-token abc"), "{text}");
    }

    #[test]
    fn merged_pages_keep_first_totals_and_last_token() {
        let p1 = SearchCatalogResponse {
            hits: vec![SearchHit { entry: Some(entry("1/000001", "a")), score: 1.0 }],
            total_hits: 2,
            next_page_token: "t".into(),
            ..Default::default()
        };
        let p2 = SearchCatalogResponse {
            hits: vec![SearchHit { entry: Some(entry("1/000002", "b")), score: 0.5 }],
            total_hits: 2,
            ..Default::default()
        };
        let view = SearchView::from_pages(vec![p1, p2]);
        assert_eq!(view.hits.len(), 2);
        assert!(view.next_page_token.is_empty());
        let json = serde_json::to_value(&view).unwrap();
        assert_eq!(json["hits"][1]["entry"]["resource_code"], "1/000002");
        assert_eq!(json["hits"][0]["entry"]["share_type"], "conditional");
    }

    #[test]
    fn ages_and_dates() {
        let now = 1_000_000_000;
        assert_eq!(format_age(now, 0), "never");
        assert_eq!(format_age(now, now - 5_000), "5s ago");
        assert_eq!(format_age(now, now - 600_000), "10m ago");
        assert_eq!(format_age(now, now - 3 * 3_600_000), "3h ago");
        assert_eq!(format_age(now, now - 3 * 86_400_000), "3d ago");
        assert_eq!(format_age(now, now + 5_000), "just now");
        assert_eq!(format_unix(0), "1970-01-01 00:00:00 UTC");
        assert_eq!(format_unix(1_767_225_600), "2026-01-01 00:00:00 UTC");
    }

    #[test]
    fn change_line_and_json_line() {
        let c = CatalogChange { version: 9, kind: ChangeKind::Withdraw as i32, entry: Some(entry("101001/000001", "企业登记信息")) };
        let v = ChangeView::from(c);
        assert_eq!(v.human(), "       9  withdraw  101001/000001         企业登记信息");
        let line = serde_json::to_string(&v).unwrap();
        assert!(!line.contains('\n'));
        assert!(line.contains("\"kind\":\"withdraw\""));
    }

    #[test]
    fn nodes_table() {
        let now = 10_000_000;
        let view = NodesView {
            nodes: vec![NodeInfo {
                department: "tax".into(),
                node_name: "tax-node".into(),
                address: "127.0.0.1:7401".into(),
                status: NodeStatus::Online as i32,
                last_heartbeat_unix_ms: now - 3_000,
                software_version: "0.1.0".into(),
                ..Default::default()
            }
            .into()],
        };
        let text = view.human(now);
        assert!(text.contains("tax         tax-node  online  127.0.0.1:7401  3s ago          0.1.0"), "{text}");
    }

    #[test]
    fn entry_detail_labels_legal_basis_for_not_shared() {
        let mut e = CatalogEntrySpec::from(&entry("301001/000004", "个人所得税纳税记录"));
        e.share_type = "not_shared".into();
        e.share_condition = "依据《中华人民共和国税收征收管理法》第八条".into();
        let text = entry_human(&e);
        assert!(text.contains("legal basis     依据"), "{text}");
    }
    #[test]
    fn code_names() {
        assert_eq!(code_name(0), "OK");
        assert_eq!(code_name(7), "PERMISSION_DENIED");
        assert_eq!(code_name(16), "UNAUTHENTICATED");
        assert_eq!(code_name(99), "CODE_99");
        assert_eq!(format_day_ms(1_767_225_599_999), "2025-12-31");
    }

    #[test]
    fn query_view_tables_items_in_catalog_order_and_lists_masked_and_missing() {
        use exchange_proto::v1::Record;
        let result = QueryResult {
            message_id: "m-1".into(),
            provider_code: "public-security".into(),
            records: vec![Record {
                key: "110105********002X".into(),
                items: [("公民身份号码", "110105********002X"), ("姓名", "李四"), ("民族", "汉族"), ("备注", "x")]
                    .into_iter()
                    .map(|(k, v)| (k.to_string(), v.to_string()))
                    .collect(),
                updated_at_unix_ms: 1_767_225_600_000,
                version: 0,
            }],
            not_found: vec![1],
            data_items: vec!["公民身份号码".into(), "姓名".into(), "民族".into()],
            masked_items: vec!["公民身份号码".into()],
        };
        let keys = ["11010519491231002X".to_string(), "440524188001010014".to_string()];
        let view = QueryView::new("201001/000001", &keys, result);
        assert_eq!(view.not_found_keys, ["440524188001010014"]);
        let text = view.human();
        assert!(text.contains("message id  m-1\n"), "{text}");
        assert!(text.contains("masked      公民身份号码\n"), "{text}");
        assert!(text.contains("110105********002X  (stored 2026-01-01 00:00:00 UTC)\n"), "{text}");
        let lines: Vec<&str> = text.lines().collect();
        let header = lines.iter().position(|l| l.starts_with("item")).unwrap();
        assert_eq!(lines[header + 1], "公民身份号码  110105********002X");
        assert_eq!(lines[header + 2], "姓名          李四");
        assert_eq!(lines[header + 3], "民族          汉族");
        assert_eq!(lines[header + 4], "备注          x");
        assert!(text.ends_with("\nnot found: 440524188001010014\n"), "{text}");
        let json = serde_json::to_value(&view).unwrap();
        assert_eq!(json["records"][0]["items"]["姓名"], "李四");
        assert_eq!(json["not_found"][0], 1);
    }

    fn grant(status: exchange_proto::v1::GrantStatus) -> Grant {
        Grant {
            grant_id: "G00000001".into(),
            resource_code: "101001/000001".into(),
            consumer_code: "tax".into(),
            provider_code: "commerce".into(),
            requested_items: vec!["企业名称".into(), "登记状态".into(), "注册资本".into()],
            purpose: "纳税人登记核验".into(),
            status: status as i32,
            requested_by: "tax-app".into(),
            requested_at_unix_ms: 1_767_225_600_000,
            ..Default::default()
        }
    }

    #[test]
    fn grants_table_shows_granted_items_once_decided() {
        use exchange_proto::v1::GrantStatus;
        let mut approved = grant(GrantStatus::Approved);
        approved.grant_id = "G00000002".into();
        approved.granted_items = vec!["企业名称".into()];
        approved.expires_at_unix_ms = 1_798_761_599_999;
        let view = GrantsView { grants: vec![grant(GrantStatus::Pending).into(), approved.into()] };
        let text = view.human();
        let lines: Vec<&str> = text.lines().collect();
        assert!(lines[0].starts_with("id         resource       consumer  provider  status"), "{text}");
        assert!(lines[1].contains("pending   企业名称,登记状态,注册资本  -"), "{text}");
        assert!(lines[2].contains("approved  企业名称") && lines[2].ends_with("2026-12-31"), "{text}");
        assert_eq!(GrantsView { grants: vec![] }.human(), "no grants\n");
    }

    #[test]
    fn grant_detail_leaves_out_empty_fields() {
        let text = GrantView::from(grant(exchange_proto::v1::GrantStatus::Pending)).human();
        assert!(text.starts_with("grant         G00000001\nstatus        pending\n"), "{text}");
        assert!(text.contains("requested by  tax-app at 2026-01-01 00:00:00 UTC\n"), "{text}");
        assert!(!text.contains("granted") && !text.contains("expires") && !text.contains("legal basis"), "{text}");
        let mut revoked = grant(exchange_proto::v1::GrantStatus::Revoked);
        revoked.decision_reason = "协议到期".into();
        let text = GrantView::from(revoked).human();
        assert!(text.contains("status        revoked\n") && text.contains("reason        协议到期\n"), "{text}");
        assert!(text.contains("expires       never\n"), "{text}");
    }

    #[test]
    fn verify_view_says_intact_or_where_it_broke() {
        let ok = VerifyView::from(VerifyAuditResponse { intact: true, entries: 1200, seals: 12, unsealed: 3, ..Default::default() });
        assert_eq!(ok.human(), "entries   1200\nseals     12\nunsealed  3 (after the last seal)\nintact\n");
        let bad = VerifyView::from(VerifyAuditResponse {
            intact: false,
            entries: 1200,
            problem: "entry hash does not chain to the previous entry".into(),
            problem_seq: 517,
            ..Default::default()
        });
        assert!(bad.human().ends_with("NOT INTACT at entry seq 517: entry hash does not chain to the previous entry\n"));
        assert_eq!(serde_json::to_value(&bad).unwrap()["problem_seq"], 517);
    }

    #[test]
    fn audit_table_shows_peer_result_bytes_and_duration() {
        let entry = AuditEntry {
            seq: 9,
            message_id: "m-9".into(),
            side: "consumer".into(),
            consumer: "tax".into(),
            provider: "commerce".into(),
            resource_code: "101001/000001".into(),
            data_items: vec!["企业名称".into(), "登记状态".into()],
            result_code: 7,
            request_bytes: 120,
            response_bytes: 0,
            request_in_us: 1_767_225_600_000_000,
            response_out_us: 1_767_225_600_012_345,
            ..Default::default()
        };
        let mut provider_side = entry.clone();
        provider_side.side = "provider".into();
        provider_side.result_code = 0;
        provider_side.response_out_us = 0;
        let view = AuditView::from(QueryAuditResponse { entries: vec![entry, provider_side], total_entries: 50, truncated: true });
        assert_eq!(view.entries[0].peer, "commerce");
        assert_eq!(view.entries[1].peer, "tax");
        assert_eq!(view.entries[0].total_ms, Some(12.345));
        let text = view.human();
        let lines: Vec<&str> = text.lines().collect();
        assert!(lines[0].starts_with("time (UTC)           side      message id  peer      resource       result"), "{text}");
        let row = "2026-01-01 00:00:00  consumer  m-9         commerce  101001/000001  PERMISSION_DENIED  企业名称,登记状态";
        assert!(lines[1].starts_with(row), "{text}");
        assert!(lines[1].ends_with("120/0      12.3"), "{text}");
        assert!(lines[2].contains("OK") && lines[2].ends_with("-"), "{text}");
        assert!(text.contains("2 entries shown, newest first (50 in the log)"), "{text}");
        assert!(text.contains("raise --limit"), "{text}");
        let json = serde_json::to_value(&view).unwrap();
        assert_eq!(json["entries"][0]["result"], "PERMISSION_DENIED");
        assert_eq!(AuditView { entries: vec![], total_entries: 3, truncated: false }.human(), "no matching entries (3 in the log)\n");
    }

    #[test]
    fn node_status_shows_directory_freshness_subscriptions_and_backlog() {
        let now = 10_000_000;
        let base = NodeStatusResponse {
            department: "tax".into(),
            node_name: "tax-node".into(),
            directory_max_staleness_seconds: 300,
            subscriptions_as_provider: 2,
            subscriptions_as_consumer: 1,
            outbox_backlog: 120,
            inbox_backlog: 5,
            directory_watch_connected: true,
            grants_version: 7,
            ..Default::default()
        };
        let text = NodeStatusView::from(base.clone()).human(now);
        assert!(text.contains("directory state  current (bound 5m)\n"), "{text}");
        assert!(text.contains("directory watch  connected\n"), "{text}");
        assert!(text.contains("grants version   7\n"), "{text}");
        assert!(text.contains("subscriptions    2 as provider, 1 as consumer\n"), "{text}");
        assert!(text.contains("event backlog    outbox 120 (not yet acknowledged by subscribers), inbox 5 "), "{text}");
        let aging = NodeStatusResponse { directory_state_age_seconds: 40, directory_watch_connected: false, ..base.clone() };
        assert!(NodeStatusView::from(aging).human(now).contains("directory state  40s old (bound 5m)\n"));
        let stale = NodeStatusResponse { directory_state_age_seconds: 400, directory_state_stale: true, ..base };
        let view = NodeStatusView::from(stale);
        assert!(view.human(now).contains("directory state  STALE: 6m old (bound 5m): relaying and event delivery are stopped"));
        let json = serde_json::to_value(&view).unwrap();
        assert_eq!(json["directory_state_stale"], true);
        assert_eq!(json["inbox_backlog"], 5);
        assert_eq!(format_secs(0), "0s");
        assert_eq!(format_secs(7200), "2h");
    }

    #[test]
    fn subscriptions_table_has_both_sides() {
        use exchange_proto::v1::{ListSubscriptionsResponse, Subscription};
        let now = 10_000_000;
        let view = SubscriptionsView::from(ListSubscriptionsResponse {
            as_consumer: vec![Subscription {
                resource_code: "101001/000001".into(),
                provider_code: "commerce".into(),
                consumer_code: "tax".into(),
                start_seq: 1,
                received_upto_seq: 2503,
                acked_upto_seq: 2000,
                backlog: 503,
                connected: true,
                active: true,
                last_delivery_unix_ms: now - 3_000,
                ..Default::default()
            }],
            as_provider: vec![Subscription {
                resource_code: "302001/000001".into(),
                provider_code: "tax".into(),
                consumer_code: "quality".into(),
                received_upto_seq: 10,
                head_seq: 11,
                backlog: 1,
                ended_reason: "grant G00000001 revoked: 核查结束".into(),
                last_error: "no node of quality could be reached".into(),
                ..Default::default()
            }],
        });
        let text = view.human(now);
        let lines: Vec<&str> = text.lines().collect();
        assert!(lines[0].starts_with("as consumer"), "{text}");
        assert!(lines[1].starts_with("resource       provider  start  received  acked  head  backlog  connected"), "{text}");
        assert!(lines[2].starts_with("101001/000001  commerce      1      2503   2000     -      503  yes        3s ago"), "{text}");
        assert!(lines[2].contains("active"), "{text}");
        assert!(lines[4].starts_with("as provider"), "{text}");
        assert!(lines[5].starts_with("resource       consumer"), "{text}");
        assert!(lines[6].contains("ended: grant G00000001 revoked: 核查结束") && lines[6].ends_with("no node of quality could be reached"), "{text}");
        let json = serde_json::to_value(&view).unwrap();
        assert_eq!(json["as_consumer"][0]["backlog"], 503);
        assert_eq!(json["as_provider"][0]["consumer_code"], "quality");
        assert_eq!(SubscriptionsView { as_consumer: vec![], as_provider: vec![] }.human(now), "no subscriptions\n");
    }

    #[test]
    fn event_lines_and_publish_and_sync_summaries() {
        use exchange_proto::v1::{Record, RecordChangeKind, RecordEvent};
        let e = RecordEvent {
            seq: 2503,
            kind: RecordChangeKind::Deregistered as i32,
            record: Some(Record {
                key: "91350100M000100Y43".into(),
                items: [("登记状态".to_string(), "注销".to_string())].into(),
                version: 2503,
                updated_at_unix_ms: 1,
            }),
            published_at_unix_ms: 1_767_225_600_000,
        };
        let line = serde_json::to_string(&EventLineView::from(e)).unwrap();
        assert_eq!(
            line,
            r#"{"seq":2503,"kind":"deregistered","key":"91350100M000100Y43","items":{"登记状态":"注销"},"published_at_unix_ms":1767225600000}"#
        );
        let p = EventsPublishedView {
            file: "changes.json".into(),
            resource_code: "101001/000001".into(),
            via: "127.0.0.1:7402".into(),
            kind: "updated".into(),
            changes: 3,
            first_seq: 2501,
            last_seq: 2503,
            duplicate_batches: 0,
        };
        assert_eq!(p.human(), "published 3 changes of 101001/000001 from changes.json via 127.0.0.1:7402: seq 2501-2503\n");
        let s = SyncView {
            resource_code: "101001/000001".into(),
            file: "ent.jsonl".into(),
            via: "127.0.0.1:7401".into(),
            records_written: 1501,
            records_in_file: 2501,
            total_records: 2501,
            head_seq: 2503,
            seconds: 0.74,
            records_per_second: 2028.4,
            continued: true,
            dropped_partial_bytes: 0,
        };
        assert_eq!(
            s.human(),
            "synced 1501 records of 2501 in 0.7 s (2028 records/s), head seq 2503\n\
             101001/000001 -> ent.jsonl (2501 records; continued after 1000 from an earlier run)\n"
        );
    }

}
