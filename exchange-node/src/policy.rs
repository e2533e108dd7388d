//! What the node knows of the directory's rules, and the provider-side access decision.
//!
//! The directory records the rules; the provider's node enforces them (an invariant). To decide without a
//! directory round trip, and to keep deciding while the directory is unreachable, the node keeps a copy of
//! what concerns it, fed by the directory's watch streams (`sync`):
//! - its own department's catalog entries (share type, data items, record kind),
//! - the grants where its department is provider or consumer,
//! - the revoked certificate serials (fed straight into the TLS [`RevocationSet`]),
//! - each stream's cursor (the last version applied), so a restart resumes where it stopped.
//!
//! All of it is kept in its own sled trees, written before the cursor moves, so a crash replays a change
//! rather than losing it (applying a change twice is harmless: every change carries the whole object).
//!
//! The decision ([`Policy::authorize`]) follows the catalog entry's share type: unconditional → any
//! department's node; conditional → only a consumer with an approved, unexpired grant, and only the
//! granted items; not shared → nobody. The node's own department always sees all of its own items.
//!
//! **Freshness.** The copy is fresh (age 0) while all three watch streams are connected. When one drops,
//! its age counts from the moment they were last all connected; that moment is kept in the meta tree (on
//! every change of state, and every [`PERSIST_EVERY_MS`] while connected, see [`Policy::touch`]), so a
//! node restarted while the directory is down still knows how old its copy is. A node that never had a
//! fresh copy counts from when the policy was opened. Past [`Policy::max_staleness`]
//! (`relay.max_directory_staleness_seconds`), [`Policy::check_fresh`] refuses: the relay stops on both
//! sides until the directory is reachable again.

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicU8, Ordering};
use std::sync::{Arc, Mutex, OnceLock, RwLock};
use std::time::Duration;

use client_sdk::identity::normalize_serial;
use client_sdk::tls::RevocationSet;
use exchange_proto::v1::{CatalogChange, CatalogEntry, Grant, GrantChange, GrantStatus, Revocation, ShareType};
use prost::Message;

use crate::error::NodeError;

const TREE_ENTRIES: &str = "policy_entries";
const TREE_GRANTS: &str = "policy_grants";
const TREE_REVOCATIONS: &str = "policy_revocations";
const TREE_META: &str = "policy_meta";
const KEY_CATALOG_VERSION: &[u8] = b"catalog_version";
const KEY_GRANTS_VERSION: &[u8] = b"grants_version";
const KEY_REVOCATIONS_VERSION: &[u8] = b"revocations_version";
/// When the copy was last known fresh (all three streams connected), unix ms, big-endian i64.
const KEY_LAST_FRESH: &[u8] = b"last_fresh_unix_ms";
const ALL_FEEDS: u8 = Feed::Catalog as u8 | Feed::Grants as u8 | Feed::Revocations as u8;
/// While connected, the "last fresh" time is written at most this often (see [`Policy::touch`]).
pub const PERSIST_EVERY_MS: i64 = 10_000;
/// Default of [`Policy::max_staleness`] (the config's `relay.max_directory_staleness_seconds`).
pub const DEFAULT_MAX_STALENESS: Duration = Duration::from_secs(crate::config::DEFAULT_MAX_DIRECTORY_STALENESS_SECONDS);

/// The directory streams the node follows; each reports whether it is connected.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Feed {
    Catalog = 1,
    Grants = 2,
    Revocations = 4,
}

/// What a consumer may receive of a resource.
#[derive(Clone, Debug)]
pub struct Decision {
    pub entry: Arc<CatalogEntry>,
    /// `None`: every data item of the entry (unconditional resource, or the provider's own department).
    /// `Some(items)`: the items of the consumer's grant.
    pub granted_items: Option<Vec<String>>,
    /// The grant that allowed it, if one was needed.
    pub grant_id: Option<String>,
}

#[derive(Default)]
struct Known {
    /// This department's entries by resource code (tombstones included, so a withdrawal is known).
    entries: HashMap<String, Arc<CatalogEntry>>,
    /// Grants where this department is provider or consumer, by id.
    grants: HashMap<String, Grant>,
    /// Provider side: (consumer, resource) → id of the latest approved grant.
    active: HashMap<(String, String), String>,
    catalog_version: u64,
    grants_version: u64,
    revocations_version: u64,
}

/// The node's copy of the directory's rules. Shared (`Arc`) by the sync tasks, the relay and the
/// application API.
pub struct Policy {
    department: String,
    entries: sled::Tree,
    grants: sled::Tree,
    revocation_log: sled::Tree,
    meta: sled::Tree,
    known: RwLock<Known>,
    revoked: RevocationSet,
    connected: AtomicU8,
    freshness: Mutex<Freshness>,
    max_staleness_ms: AtomicU64,
    /// Whether the last look found the copy stale (to log each change once).
    stale_seen: AtomicBool,
    directory_address: OnceLock<String>,
}

/// When the copy was last fresh.
#[derive(Debug)]
struct Freshness {
    /// The last moment all three streams were known connected (unix ms): the time of the last change of
    /// state, or of the last [`Policy::touch`] while connected.
    last_fresh_unix_ms: i64,
    /// When `last_fresh_unix_ms` was last written to the meta tree.
    persisted_unix_ms: i64,
}

fn corrupt(tree: &str, e: impl std::fmt::Display) -> NodeError {
    NodeError::Store(format!("{tree}: unreadable record: {e}"))
}

/// A duration as an operator reads it: `2h03m`, `1h`, `5m20s`, `45s`, `3.4s`.
pub fn human_duration(d: Duration) -> String {
    let secs = d.as_secs();
    let (h, m, s) = (secs / 3600, secs / 60 % 60, secs % 60);
    if h > 0 {
        if m == 0 && s == 0 {
            format!("{h}h")
        } else {
            format!("{h}h{m:02}m")
        }
    } else if m > 0 {
        if s == 0 {
            format!("{m}m")
        } else {
            format!("{m}m{s:02}s")
        }
    } else if secs < 10 && d.subsec_millis() > 0 {
        // Tenths, rounded up: an age just past a bound of 3 s reads 3.1s, not 3s.
        match (d.as_millis() as u64).div_ceil(100) {
            t if t % 10 == 0 => format!("{}s", t / 10),
            t => format!("{}.{}s", t / 10, t % 10),
        }
    } else {
        format!("{s}s")
    }
}

fn read_u64(tree: &sled::Tree, key: &[u8]) -> Result<u64, NodeError> {
    Ok(match tree.get(key)? {
        Some(v) if v.len() == 8 => u64::from_be_bytes(v.as_ref().try_into().expect("8 bytes")),
        Some(_) => return Err(corrupt(TREE_META, String::from_utf8_lossy(key))),
        None => 0,
    })
}

impl Policy {
    /// Opens the node's copy from `db` and loads it, feeding the stored revocations into `revoked`.
    pub fn open(db: &sled::Db, department: &str, revoked: RevocationSet) -> Result<Self, NodeError> {
        Self::open_at(db, department, revoked, crate::state::now_unix_ms())
    }

    /// [`Policy::open`] at `now_unix_ms` (a new node's copy is counted fresh from then).
    fn open_at(db: &sled::Db, department: &str, revoked: RevocationSet, now_unix_ms: i64) -> Result<Self, NodeError> {
        let meta = db.open_tree(TREE_META)?;
        let last_fresh = match meta.get(KEY_LAST_FRESH)? {
            Some(v) if v.len() == 8 => i64::from_be_bytes(v.as_ref().try_into().expect("8 bytes")),
            Some(_) => return Err(corrupt(TREE_META, String::from_utf8_lossy(KEY_LAST_FRESH))),
            // Never in step with the directory: count from now, so a new node is not refused at once.
            None => now_unix_ms,
        };
        let policy = Policy {
            department: department.to_string(),
            entries: db.open_tree(TREE_ENTRIES)?,
            grants: db.open_tree(TREE_GRANTS)?,
            revocation_log: db.open_tree(TREE_REVOCATIONS)?,
            meta,
            known: RwLock::default(),
            revoked,
            connected: AtomicU8::new(0),
            freshness: Mutex::new(Freshness { last_fresh_unix_ms: last_fresh, persisted_unix_ms: last_fresh }),
            max_staleness_ms: AtomicU64::new(DEFAULT_MAX_STALENESS.as_millis() as u64),
            stale_seen: AtomicBool::new(false),
            directory_address: OnceLock::new(),
        };
        let mut known = Known {
            catalog_version: read_u64(&policy.meta, KEY_CATALOG_VERSION)?,
            grants_version: read_u64(&policy.meta, KEY_GRANTS_VERSION)?,
            revocations_version: read_u64(&policy.meta, KEY_REVOCATIONS_VERSION)?,
            ..Known::default()
        };
        for item in policy.entries.iter() {
            let (_, v) = item?;
            let entry = CatalogEntry::decode(v.as_ref()).map_err(|e| corrupt(TREE_ENTRIES, e))?;
            known.entries.insert(entry.resource_code.clone(), Arc::new(entry));
        }
        for item in policy.grants.iter() {
            let (_, v) = item?;
            let grant = Grant::decode(v.as_ref()).map_err(|e| corrupt(TREE_GRANTS, e))?;
            known.grants.insert(grant.grant_id.clone(), grant);
        }
        let grants: Vec<Grant> = known.grants.values().cloned().collect();
        for g in &grants {
            Self::index_grant(&policy.department, &mut known, g);
        }
        let mut serials = Vec::new();
        for item in policy.revocation_log.iter() {
            let (_, v) = item?;
            let r = Revocation::decode(v.as_ref()).map_err(|e| corrupt(TREE_REVOCATIONS, e))?;
            serials.extend(normalize_serial(&r.serial_hex));
        }
        policy.revoked.replace_all(serials);
        *policy.known.write().expect("policy lock") = known;
        Ok(policy)
    }

    pub fn department(&self) -> &str {
        &self.department
    }

    // ---- what the sync tasks feed in ----

    pub fn catalog_version(&self) -> u64 {
        self.known.read().expect("policy lock").catalog_version
    }
    pub fn grants_version(&self) -> u64 {
        self.known.read().expect("policy lock").grants_version
    }
    pub fn revocations_version(&self) -> u64 {
        self.known.read().expect("policy lock").revocations_version
    }

    /// Starts the copy of one feed over: the directory's log is behind this copy (the directory was
    /// restored from a backup), so positions the node holds name changes the directory no longer has, and
    /// resuming from them would skip the changes the directory numbers anew. The feed's entries or grants
    /// are dropped and its position set to 0, so the follower reads the directory's whole log again.
    /// Revoked serials are kept: a restore must not make a revoked certificate good again.
    pub fn restart_feed(&self, feed: Feed) -> Result<(), NodeError> {
        let mut known = self.known.write().expect("policy lock");
        match feed {
            Feed::Catalog => {
                self.entries.clear()?;
                self.meta.insert(KEY_CATALOG_VERSION, &0u64.to_be_bytes())?;
                known.entries.clear();
                known.catalog_version = 0;
            }
            Feed::Grants => {
                self.grants.clear()?;
                self.meta.insert(KEY_GRANTS_VERSION, &0u64.to_be_bytes())?;
                known.grants.clear();
                known.active.clear();
                known.grants_version = 0;
            }
            Feed::Revocations => {
                self.meta.insert(KEY_REVOCATIONS_VERSION, &0u64.to_be_bytes())?;
                known.revocations_version = 0;
            }
        }
        Ok(())
    }

    /// Applies one catalog change. Returns the entry's resource code when the entry is another
    /// department's (the consumer side drops its cached resolution of it).
    pub fn apply_catalog_change(&self, change: &CatalogChange) -> Result<Option<String>, NodeError> {
        let Some(entry) = change.entry.as_ref() else { return Ok(None) };
        let other = if entry.provider_code == self.department {
            self.entries.insert(entry.resource_code.as_bytes(), entry.encode_to_vec())?;
            None
        } else {
            Some(entry.resource_code.clone())
        };
        self.meta.insert(KEY_CATALOG_VERSION, &change.version.to_be_bytes())?;
        let mut known = self.known.write().expect("policy lock");
        if entry.provider_code == self.department {
            known.entries.insert(entry.resource_code.clone(), Arc::new(entry.clone()));
        }
        known.catalog_version = known.catalog_version.max(change.version);
        Ok(other)
    }

    /// Remembers an entry of this department fetched directly from the directory (before the catalog
    /// watch has caught up). Never replaces a newer version.
    pub fn learn_entry(&self, entry: CatalogEntry) -> Result<Arc<CatalogEntry>, NodeError> {
        let mut known = self.known.write().expect("policy lock");
        if let Some(have) = known.entries.get(&entry.resource_code) {
            if have.version >= entry.version {
                return Ok(have.clone());
            }
        }
        self.entries.insert(entry.resource_code.as_bytes(), entry.encode_to_vec())?;
        let entry = Arc::new(entry);
        known.entries.insert(entry.resource_code.clone(), entry.clone());
        Ok(entry)
    }

    pub fn apply_grant_change(&self, change: &GrantChange) -> Result<(), NodeError> {
        let Some(grant) = change.grant.as_ref() else { return Ok(()) };
        self.grants.insert(grant.grant_id.as_bytes(), grant.encode_to_vec())?;
        self.meta.insert(KEY_GRANTS_VERSION, &change.version.to_be_bytes())?;
        let mut known = self.known.write().expect("policy lock");
        let previous = known.grants.insert(grant.grant_id.clone(), grant.clone());
        if let Some(p) = previous {
            if p.version > grant.version {
                // An older change replayed after a newer one: keep the newer.
                known.grants.insert(p.grant_id.clone(), p);
            }
        }
        let current = known.grants.get(&grant.grant_id).cloned().expect("just inserted");
        Self::index_grant(&self.department, &mut known, &current);
        known.grants_version = known.grants_version.max(change.version);
        Ok(())
    }

    /// Keeps `active` pointing at the latest approved grant per (consumer, resource) of this provider.
    fn index_grant(department: &str, known: &mut Known, grant: &Grant) {
        if grant.provider_code != department {
            return;
        }
        let key = (grant.consumer_code.clone(), grant.resource_code.clone());
        let approved = grant.status == GrantStatus::Approved as i32;
        match known.active.get(&key).and_then(|id| known.grants.get(id)).cloned() {
            Some(current) if current.grant_id == grant.grant_id => {
                if !approved {
                    known.active.remove(&key);
                }
            }
            Some(current) => {
                if approved && grant.version > current.version {
                    known.active.insert(key, grant.grant_id.clone());
                }
            }
            None => {
                if approved {
                    known.active.insert(key, grant.grant_id.clone());
                }
            }
        }
    }

    pub fn apply_revocation(&self, revocation: &Revocation) -> Result<(), NodeError> {
        self.revocation_log.insert(revocation.version.to_be_bytes(), revocation.encode_to_vec())?;
        self.meta.insert(KEY_REVOCATIONS_VERSION, &revocation.version.to_be_bytes())?;
        if let Some(serial) = normalize_serial(&revocation.serial_hex) {
            tracing::warn!(serial = %serial, department = %revocation.department, reason = %revocation.reason, "certificate revoked");
            self.revoked.insert(serial);
        }
        let mut known = self.known.write().expect("policy lock");
        known.revocations_version = known.revocations_version.max(revocation.version);
        Ok(())
    }

    /// A watch stream opened or closed. When all three become connected, or one of the three drops, the
    /// moment is kept as the last time the copy was fresh.
    pub fn set_connected(&self, feed: Feed, connected: bool) {
        self.set_connected_at(feed, connected, crate::state::now_unix_ms());
    }

    fn set_connected_at(&self, feed: Feed, connected: bool, now_unix_ms: i64) {
        let before = if connected {
            self.connected.fetch_or(feed as u8, Ordering::SeqCst)
        } else {
            self.connected.fetch_and(!(feed as u8), Ordering::SeqCst)
        };
        let after = if connected { before | feed as u8 } else { before & !(feed as u8) };
        let (was_all, is_all) = (before == ALL_FEEDS, after == ALL_FEEDS);
        if was_all != is_all {
            // Connected: fresh from now. Dropped: the copy was fresh until now.
            let mut f = self.freshness.lock().expect("freshness lock");
            f.last_fresh_unix_ms = f.last_fresh_unix_ms.max(now_unix_ms);
            self.persist_last_fresh(&mut f, now_unix_ms);
            drop(f);
            if is_all {
                tracing::debug!("all directory watches connected: the node's copy of the directory's rules is current");
            } else {
                tracing::debug!(?feed, bound = %human_duration(self.max_staleness()), "a directory watch dropped: the node's copy of the directory's rules ages from now");
            }
            self.note_staleness(now_unix_ms);
        }
    }

    /// True while all three watch streams are open.
    pub fn all_connected(&self) -> bool {
        self.connected.load(Ordering::SeqCst) == ALL_FEEDS
    }

    /// Called periodically by the sync task: while connected, moves the "last fresh" time to now and writes
    /// it down at most every [`PERSIST_EVERY_MS`] (no flush: sled flushes in the background, and the
    /// shutdown flushes); while disconnected, notices (and logs, once) when the copy goes stale.
    pub fn touch(&self, now_unix_ms: i64) {
        if self.all_connected() {
            let mut f = self.freshness.lock().expect("freshness lock");
            f.last_fresh_unix_ms = f.last_fresh_unix_ms.max(now_unix_ms);
            if now_unix_ms - f.persisted_unix_ms >= PERSIST_EVERY_MS {
                self.persist_last_fresh(&mut f, now_unix_ms);
            }
        }
        self.note_staleness(now_unix_ms);
    }

    fn persist_last_fresh(&self, f: &mut Freshness, now_unix_ms: i64) {
        match self.meta.insert(KEY_LAST_FRESH, &f.last_fresh_unix_ms.to_be_bytes()) {
            Ok(_) => f.persisted_unix_ms = now_unix_ms,
            Err(e) => tracing::warn!(error = %e, "could not record when the directory's rules were last current"),
        }
    }

    /// Where the directory is, for the messages of [`Policy::check_fresh`] (set once, by the sync task).
    pub fn set_directory_address(&self, address: &str) {
        let _ = self.directory_address.set(address.to_string());
    }

    /// How old the copy may get while the directory is unreachable before the node stops relaying (the
    /// config's `relay.max_directory_staleness_seconds`; default an hour).
    pub fn set_max_staleness(&self, d: Duration) {
        self.max_staleness_ms.store((d.as_millis() as u64).max(1), Ordering::Relaxed);
    }

    pub fn max_staleness(&self) -> Duration {
        Duration::from_millis(self.max_staleness_ms.load(Ordering::Relaxed))
    }

    /// How old the node's copy of the directory's rules is at `now_unix_ms`: zero while all three watch
    /// streams are connected, else the time since they were last all connected (or since the policy was
    /// opened, for a node that never was).
    pub fn directory_state_age(&self, now_unix_ms: i64) -> Duration {
        if self.all_connected() {
            return Duration::ZERO;
        }
        let last = self.freshness.lock().expect("freshness lock").last_fresh_unix_ms;
        Duration::from_millis(now_unix_ms.saturating_sub(last).max(0) as u64)
    }

    /// True when the copy is older than [`Policy::max_staleness`].
    pub fn is_stale(&self, now_unix_ms: i64) -> bool {
        self.note_staleness(now_unix_ms).is_some()
    }

    /// `Ok` while the copy is within the bound; otherwise UNAVAILABLE, saying how old it is and why the
    /// node stops (for the relay on both sides, and event delivery).
    pub fn check_fresh(&self, now_unix_ms: i64) -> Result<(), NodeError> {
        let Some(age) = self.note_staleness(now_unix_ms) else { return Ok(()) };
        let directory = match self.directory_address.get() {
            Some(addr) => format!("the directory at {addr}"),
            None => "the directory".to_string(),
        };
        Err(NodeError::Unavailable(format!(
            "this node's copy of the directory's rules is {} old, over the bound of {} \
             (relay.max_directory_staleness_seconds): grants, revocations and provider addresses may have \
             changed since, so this node does not relay until {directory} is reachable again",
            human_duration(age),
            human_duration(self.max_staleness()),
        )))
    }

    /// The copy's age if it is stale, logging each change between fresh and stale once.
    fn note_staleness(&self, now_unix_ms: i64) -> Option<Duration> {
        let age = self.directory_state_age(now_unix_ms);
        let bound = self.max_staleness();
        let stale = age > bound;
        if self.stale_seen.swap(stale, Ordering::Relaxed) != stale {
            if stale {
                tracing::warn!(
                    age = %human_duration(age),
                    bound = %human_duration(bound),
                    directory = self.directory_address.get().map(String::as_str).unwrap_or(""),
                    "the node's copy of the directory's rules is past max_directory_staleness_seconds: \
                     relaying stops until the directory is reachable again"
                );
            } else {
                tracing::info!(bound = %human_duration(bound), "the node's copy of the directory's rules is current again: relaying resumes");
            }
        }
        stale.then_some(age)
    }

    // ---- what the node reads ----

    /// This department's entry, if the node knows it (live or withdrawn).
    pub fn own_entry(&self, resource_code: &str) -> Option<Arc<CatalogEntry>> {
        self.known.read().expect("policy lock").entries.get(resource_code).cloned()
    }

    /// This department's entries the node knows (withdrawn ones included), by resource code.
    pub fn own_entries(&self) -> Vec<Arc<CatalogEntry>> {
        let mut entries: Vec<_> = self.known.read().expect("policy lock").entries.values().cloned().collect();
        entries.sort_by(|a, b| a.resource_code.cmp(&b.resource_code));
        entries
    }

    /// Grants where this department is provider or consumer, newest request first.
    pub fn grants(&self) -> Vec<Grant> {
        let mut grants: Vec<_> = self.known.read().expect("policy lock").grants.values().cloned().collect();
        grants.sort_by(|a, b| b.requested_at_unix_ms.cmp(&a.requested_at_unix_ms).then(b.grant_id.cmp(&a.grant_id)));
        grants
    }

    /// Live entries of this department.
    pub fn provided_resources(&self) -> u64 {
        self.known.read().expect("policy lock").entries.values().filter(|e| !e.withdrawn).count() as u64
    }

    /// Approved, unexpired grants where this department is the provider.
    pub fn active_grants(&self, now_unix_ms: i64) -> u64 {
        let known = self.known.read().expect("policy lock");
        known
            .active
            .values()
            .filter_map(|id| known.grants.get(id))
            .filter(|g| g.expires_at_unix_ms == 0 || g.expires_at_unix_ms > now_unix_ms)
            .count() as u64
    }

    /// The provider-side decision for `consumer` reading `entry` (one of this department's entries).
    pub fn authorize(&self, consumer: &str, entry: Arc<CatalogEntry>, now_unix_ms: i64) -> Result<Decision, NodeError> {
        let code = &entry.resource_code;
        if entry.withdrawn {
            return Err(NodeError::NotFound(format!("resource {code} has been withdrawn by department {}", self.department)));
        }
        if consumer == self.department {
            return Ok(Decision { entry, granted_items: None, grant_id: None });
        }
        match ShareType::try_from(entry.share_type) {
            Ok(ShareType::Unconditional) => Ok(Decision { entry, granted_items: None, grant_id: None }),
            Ok(ShareType::Conditional) => {
                let known = self.known.read().expect("policy lock");
                let grant = known
                    .active
                    .get(&(consumer.to_string(), code.clone()))
                    .and_then(|id| known.grants.get(id));
                let Some(grant) = grant else {
                    // Say why: a revoked or expired grant is a different fix than none at all.
                    let last = known
                        .grants
                        .values()
                        .filter(|g| g.consumer_code == consumer && &g.resource_code == code)
                        .max_by_key(|g| g.version);
                    let why = match last.map(|g| (g, GrantStatus::try_from(g.status))) {
                        Some((g, Ok(GrantStatus::Revoked))) => {
                            format!("grant {} was revoked: {}", g.grant_id, g.decision_reason)
                        }
                        Some((g, Ok(GrantStatus::Pending))) => format!("grant request {} is still pending", g.grant_id),
                        Some((g, Ok(GrantStatus::Rejected))) => {
                            format!("grant request {} was rejected: {}", g.grant_id, g.decision_reason)
                        }
                        _ => "no grant".to_string(),
                    };
                    return Err(NodeError::PermissionDenied(format!(
                        "resource {code} is shared on condition ({}); department {consumer} has {why}; \
                         request access with `exchangectl grants request --resource {code}`",
                        entry.share_condition
                    )));
                };
                if grant.expires_at_unix_ms != 0 && grant.expires_at_unix_ms <= now_unix_ms {
                    return Err(NodeError::PermissionDenied(format!(
                        "grant {} of department {consumer} for resource {code} expired at {} (unix ms); request access again",
                        grant.grant_id, grant.expires_at_unix_ms
                    )));
                }
                let items = grant.granted_items.clone();
                let grant_id = Some(grant.grant_id.clone());
                drop(known);
                Ok(Decision { entry, granted_items: Some(items), grant_id })
            }
            Ok(ShareType::NotShared) => Err(NodeError::PermissionDenied(format!(
                "resource {code} is not shared: {}",
                entry.share_condition
            ))),
            _ => Err(NodeError::PermissionDenied(format!("resource {code} has no share type; nothing is shared"))),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn entry(code: &str, provider: &str, share: ShareType) -> CatalogEntry {
        CatalogEntry {
            resource_code: code.into(),
            provider_code: provider.into(),
            share_type: share as i32,
            share_condition: "依法申请".into(),
            version: 1,
            ..Default::default()
        }
    }

    fn grant(id: &str, consumer: &str, status: GrantStatus, version: u64, expires: i64) -> Grant {
        Grant {
            grant_id: id.into(),
            resource_code: "302001/000001".into(),
            consumer_code: consumer.into(),
            provider_code: "commerce".into(),
            granted_items: vec!["当事人名称".into()],
            status: status as i32,
            version,
            expires_at_unix_ms: expires,
            decision_reason: "收回".into(),
            ..Default::default()
        }
    }

    fn open(dir: &std::path::Path) -> Policy {
        let db = crate::store::open_db_waiting(std::path::Path::new(&dir), std::time::Duration::from_secs(10)).unwrap();
        Policy::open(&db, "commerce", RevocationSet::default()).unwrap()
    }

    #[test]
    fn share_types_and_grants_decide() {
        let dir = tempfile::tempdir().unwrap();
        let p = open(dir.path());
        let conditional = Arc::new(entry("302001/000001", "commerce", ShareType::Conditional));
        let open_entry = Arc::new(entry("101001/000001", "commerce", ShareType::Unconditional));
        let closed = Arc::new(entry("302001/000009", "commerce", ShareType::NotShared));
        assert!(p.authorize("tax", open_entry.clone(), 0).unwrap().granted_items.is_none());
        let err = p.authorize("tax", closed.clone(), 0).unwrap_err();
        assert!(matches!(err, NodeError::PermissionDenied(m) if m.contains("not shared")));
        assert!(p.authorize("commerce", closed, 0).is_ok(), "own department sees its own data");
        let err = p.authorize("quality", conditional.clone(), 0).unwrap_err();
        assert!(matches!(err, NodeError::PermissionDenied(ref m) if m.contains("no grant")), "{err}");
        p.apply_grant_change(&GrantChange { version: 1, grant: Some(grant("G0", "quality", GrantStatus::Rejected, 1, 0)) })
            .unwrap();
        let err = p.authorize("quality", conditional.clone(), 0).unwrap_err();
        assert!(matches!(err, NodeError::PermissionDenied(ref m) if m.contains("rejected")), "{err}");

        p.apply_grant_change(&GrantChange { version: 2, grant: Some(grant("G1", "quality", GrantStatus::Approved, 2, 0)) })
            .unwrap();
        let d = p.authorize("quality", conditional.clone(), 0).unwrap();
        assert_eq!(d.granted_items.unwrap(), vec!["当事人名称".to_string()]);
        assert!(p.authorize("tax", conditional.clone(), 0).is_err(), "grants are per consumer");

        p.apply_grant_change(&GrantChange { version: 3, grant: Some(grant("G1", "quality", GrantStatus::Revoked, 3, 0)) })
            .unwrap();
        let err = p.authorize("quality", conditional.clone(), 0).unwrap_err();
        assert!(matches!(err, NodeError::PermissionDenied(ref m) if m.contains("revoked")), "{err}");

        p.apply_grant_change(&GrantChange { version: 4, grant: Some(grant("G2", "quality", GrantStatus::Approved, 4, 1000)) })
            .unwrap();
        assert!(p.authorize("quality", conditional.clone(), 999).is_ok());
        let err = p.authorize("quality", conditional, 1000).unwrap_err();
        assert!(matches!(err, NodeError::PermissionDenied(ref m) if m.contains("expired")), "{err}");
    }

    #[test]
    fn state_survives_reopening() {
        let dir = tempfile::tempdir().unwrap();
        {
            let p = open(dir.path());
            let e = entry("302001/000001", "commerce", ShareType::Conditional);
            p.apply_catalog_change(&CatalogChange { version: 7, kind: 1, entry: Some(e) }).unwrap();
            let other = entry("101002/000001", "tax", ShareType::Unconditional);
            let dropped = p.apply_catalog_change(&CatalogChange { version: 8, kind: 1, entry: Some(other) }).unwrap();
            assert_eq!(dropped.as_deref(), Some("101002/000001"));
            p.apply_grant_change(&GrantChange { version: 4, grant: Some(grant("G1", "quality", GrantStatus::Approved, 4, 0)) })
                .unwrap();
            p.apply_revocation(&Revocation { serial_hex: "0A:FF".into(), version: 2, ..Default::default() }).unwrap();
        }
        let revoked = RevocationSet::default();
        let db = crate::store::open_db_waiting(std::path::Path::new(&dir.path()), std::time::Duration::from_secs(10)).unwrap();
        let p = Policy::open(&db, "commerce", revoked.clone()).unwrap();
        assert_eq!((p.catalog_version(), p.grants_version(), p.revocations_version()), (8, 4, 2));
        assert!(p.own_entry("101002/000001").is_none(), "only own entries are kept");
        let e = p.own_entry("302001/000001").unwrap();
        assert!(p.authorize("quality", e, 0).is_ok());
        assert_eq!(revoked.len(), 1);
        assert_eq!(p.active_grants(0), 1);
    }

    const FEEDS: [Feed; 3] = [Feed::Catalog, Feed::Grants, Feed::Revocations];

    fn open_at(dir: &std::path::Path, now: i64) -> Policy {
        let db = crate::store::open_db_waiting(std::path::Path::new(&dir), std::time::Duration::from_secs(10)).unwrap();
        Policy::open_at(&db, "commerce", RevocationSet::default(), now).unwrap()
    }

    fn connect_all(p: &Policy, now: i64) {
        for f in FEEDS {
            p.set_connected_at(f, true, now);
        }
    }

    const S: i64 = 1000;

    #[test]
    fn a_new_node_counts_from_when_it_opened() {
        let dir = tempfile::tempdir().unwrap();
        let t0 = 1_700_000_000_000;
        let p = open_at(dir.path(), t0);
        assert_eq!(p.max_staleness(), Duration::from_secs(3600));
        assert_eq!(p.directory_state_age(t0), Duration::ZERO);
        assert!(p.check_fresh(t0 + S).is_ok(), "not refused in its first second");
        // Two of three streams do not make it fresh.
        p.set_connected_at(Feed::Catalog, true, t0 + 5 * S);
        p.set_connected_at(Feed::Grants, true, t0 + 5 * S);
        assert_eq!(p.directory_state_age(t0 + 10 * S), Duration::from_secs(10));
        p.set_max_staleness(Duration::from_secs(9));
        assert!(p.is_stale(t0 + 10 * S));
        p.set_connected_at(Feed::Revocations, true, t0 + 11 * S);
        assert!(!p.is_stale(t0 + 11 * S));
    }

    #[test]
    fn fresh_while_connected_then_ages_from_the_drop() {
        let dir = tempfile::tempdir().unwrap();
        let t0 = 1_700_000_000_000;
        let p = open_at(dir.path(), t0);
        p.set_max_staleness(Duration::from_secs(60));
        connect_all(&p, t0);
        assert!(p.all_connected());
        // Fresh however long it stays connected.
        assert_eq!(p.directory_state_age(t0 + 3_600 * S), Duration::ZERO);
        assert!(p.check_fresh(t0 + 3_600 * S).is_ok());

        let drop_at = t0 + 100 * S;
        p.set_connected_at(Feed::Grants, false, drop_at);
        p.set_connected_at(Feed::Catalog, false, drop_at + 2 * S); // later drops do not move the start
        assert_eq!(p.directory_state_age(drop_at + 30 * S), Duration::from_secs(30));
        assert!(!p.is_stale(drop_at + 60 * S), "at the bound is still within it");
        assert!(p.is_stale(drop_at + 60 * S + 1));
        let err = p.check_fresh(drop_at + 2 * 3600 * S + 3 * 60 * S).unwrap_err();
        let NodeError::Unavailable(msg) = &err else { panic!("{err:?}") };
        assert!(msg.contains("2h03m old") && msg.contains("bound of 1m") && msg.contains("max_directory_staleness_seconds"), "{msg}");
        assert!(msg.contains("the directory is reachable again"), "{msg}");
        p.set_directory_address("dir.example:7400");
        let err = p.check_fresh(drop_at + 61 * S).unwrap_err().to_string();
        assert!(err.contains("1m01s old") && err.contains("the directory at dir.example:7400"), "{err}");
        assert_eq!(tonic::Status::from(p.check_fresh(drop_at + 61 * S).unwrap_err()).code(), tonic::Code::Unavailable);

        // Back: fresh at once; the next drop counts from then.
        p.set_connected_at(Feed::Grants, true, drop_at + 500 * S);
        assert!(p.is_stale(drop_at + 500 * S), "one stream still down");
        p.set_connected_at(Feed::Catalog, true, drop_at + 500 * S);
        assert!(p.check_fresh(drop_at + 500 * S).is_ok());
        p.set_connected_at(Feed::Revocations, false, drop_at + 900 * S);
        assert_eq!(p.directory_state_age(drop_at + 910 * S), Duration::from_secs(10));
    }

    #[test]
    fn the_age_survives_reopening() {
        let dir = tempfile::tempdir().unwrap();
        let t0 = 1_700_000_000_000;
        {
            let p = open_at(dir.path(), t0);
            connect_all(&p, t0);
            // Touches while connected write the time down every PERSIST_EVERY_MS at most.
            p.touch(t0 + 5 * S);
            p.touch(t0 + 12 * S);
            p.touch(t0 + 15 * S);
            // The process dies while connected (no drop recorded): the last write was at +12 s.
        }
        let p = open_at(dir.path(), t0 + 100 * S);
        assert!(!p.all_connected());
        assert_eq!(p.directory_state_age(t0 + 100 * S), Duration::from_secs(88));
        drop(p);
        {
            let p = open_at(dir.path(), t0 + 200 * S);
            connect_all(&p, t0 + 200 * S);
            p.set_connected_at(Feed::Catalog, false, t0 + 300 * S); // a drop is written at once
        }
        let p = open_at(dir.path(), t0 + 10_000 * S);
        assert_eq!(p.directory_state_age(t0 + 10_000 * S), Duration::from_secs(9_700));
        assert!(p.is_stale(t0 + 10_000 * S), "older than the default hour");
        // A clock that went back does not make a negative age.
        assert_eq!(p.directory_state_age(t0), Duration::ZERO);
    }

    #[test]
    fn durations_read_like_an_operator_writes_them() {
        let d = |ms: u64| human_duration(Duration::from_millis(ms));
        assert_eq!(d(7_380_000), "2h03m");
        assert_eq!(d(3_600_000), "1h");
        assert_eq!(d(320_000), "5m20s");
        assert_eq!(d(60_000), "1m");
        assert_eq!(d(45_000), "45s");
        assert_eq!(d(3_400), "3.4s");
        assert_eq!(d(3_000), "3s");
        assert_eq!(d(3_001), "3.1s");
        assert_eq!(d(9_990), "10s");
        assert_eq!(d(40), "0.1s");
        assert_eq!(d(0), "0s");
    }
}
