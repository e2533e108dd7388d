//! The directory storage traits' behaviour tests, written once and run for every backend
//! (`tests/tests/store_contract.rs`): what `directory::store`'s doc comments promise, checked through the
//! four traits only. [`postgres_only`] adds what only a shared database can show: two store instances
//! (two replicas) on one PostgreSQL database, its schema migrations, and the connection (errors, TLS).
//!
//! Each check takes a [`StorePlace`] (a temporary folder for sled, a fresh database for PostgreSQL) and
//! opens stores on it as often as it likes: opening again is a restart.

use std::sync::Arc;

use directory::store::postgres::{self, PostgresConfig};
use directory::store::{NodeRecord, StoreError, Stores};
use exchange_proto::v1::{AuditSeal, CatalogEntry, ChangeKind, Grant, GrantStatus, Revocation};

use crate::postgres::TestPostgres;

/// Which backend a check runs on.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Backend {
    Sled,
    Postgres,
}

/// Where a check's stores live: a temporary folder (sled) or a fresh database (PostgreSQL).
pub struct StorePlace {
    pub backend: Backend,
    dir: tempfile::TempDir,
    postgres: Option<PostgresConfig>,
}

impl StorePlace {
    /// A new, empty place.
    pub fn new(backend: Backend) -> Self {
        let dir = tempfile::tempdir().expect("temporary folder");
        let postgres =
            (backend == Backend::Postgres).then(|| TestPostgres::shared().fresh_config());
        StorePlace {
            backend,
            dir,
            postgres,
        }
    }

    /// The `[store.postgres]` of a PostgreSQL place.
    pub fn postgres_config(&self) -> &PostgresConfig {
        self.postgres.as_ref().expect("a PostgreSQL place")
    }

    /// Opens the stores. For sled the previous stores must be dropped first (sled locks its folder); for
    /// PostgreSQL every call is another replica on the same database.
    pub async fn open(&self) -> Stores {
        match self.backend {
            Backend::Sled => {
                let dir = self.dir.path().join("sled");
                tokio::task::spawn_blocking(move || directory::store::sled::open(&dir))
                    .await
                    .expect("open task")
                    .expect("open the sled store")
            }
            Backend::Postgres => {
                postgres::open(self.postgres_config())
                    .await
                    .expect("open the PostgreSQL store")
                    .0
            }
        }
    }
}

pub fn entry(code: &str, provider: &str, name: &str) -> CatalogEntry {
    CatalogEntry {
        resource_code: code.into(),
        provider_code: provider.into(),
        name: name.into(),
        summary: format!("{name}的摘要"),
        ..Default::default()
    }
}

fn codes(entries: &[CatalogEntry]) -> Vec<&str> {
    entries.iter().map(|e| e.resource_code.as_str()).collect()
}

fn versions(entries: &[CatalogEntry]) -> Vec<u64> {
    entries.iter().map(|e| e.version).collect()
}

fn is_conflict<T: std::fmt::Debug>(result: &Result<T, StoreError>) -> bool {
    matches!(result, Err(StoreError::Conflict(_)))
}

/// Every store of an empty place is empty, at version 0.
pub async fn empty_stores(place: &StorePlace) {
    let s = place.open().await;
    assert_eq!(s.catalog.current_version().await.unwrap(), 0);
    assert_eq!(s.grants.current_version().await.unwrap(), 0);
    assert_eq!(s.revocations.current_version().await.unwrap(), 0);
    assert!(s.catalog.changes_since(0, 10).await.unwrap().is_empty());
    assert!(s
        .catalog
        .live_entries_after(None, 10)
        .await
        .unwrap()
        .is_empty());
    assert!(s.catalog.get("1/000001").await.unwrap().is_none());
    assert_eq!(
        s.catalog.get_many(&["1/000001".into()]).await.unwrap(),
        vec![None]
    );
    assert!(s.nodes.list(None).await.unwrap().is_empty());
    assert!(s.revocations.list().await.unwrap().is_empty());
    assert!(s.revocations.changes_since(0, 10).await.unwrap().is_empty());
    assert!(s.grants.list(None).await.unwrap().is_empty());
    assert!(s.grants.changes_since(0, 10).await.unwrap().is_empty());
    // Empty writes take no version.
    assert!(s.catalog.upsert(Vec::new()).await.unwrap().is_empty());
    assert!(s.catalog.withdraw(Vec::new()).await.unwrap().is_empty());
    assert!(s.grants.update(Vec::new()).await.unwrap().is_empty());
    assert_eq!(s.catalog.current_version().await.unwrap(), 0);
    assert_eq!(s.grants.current_version().await.unwrap(), 0);
}

/// Consecutive versions in batch order, tombstones, a change log that keeps each change's after-state.
pub async fn catalog_versions_tombstones_and_log(place: &StorePlace) {
    let s = place.open().await;
    // Whatever version and withdrawn flag the caller sent, the store assigns them.
    let claimed = CatalogEntry {
        version: 99,
        withdrawn: true,
        ..entry("1/000002", "tax", "纳税人名录")
    };
    let stored = s
        .catalog
        .upsert(vec![claimed, entry("1/000001", "tax", "欠税公告")])
        .await
        .unwrap();
    assert_eq!(codes(&stored), ["1/000002", "1/000001"]);
    assert_eq!(versions(&stored), [1, 2]);
    assert!(stored.iter().all(|e| !e.withdrawn));

    let renamed = s
        .catalog
        .upsert(vec![entry("1/000002", "tax", "纳税人名录（新）")])
        .await
        .unwrap();
    assert_eq!(versions(&renamed), [3]);
    let tombstones = s.catalog.withdraw(vec!["1/000001".into()]).await.unwrap();
    assert_eq!(
        (
            tombstones[0].version,
            tombstones[0].withdrawn,
            tombstones[0].name.as_str()
        ),
        (4, true, "欠税公告")
    );
    assert_eq!(s.catalog.current_version().await.unwrap(), 4);

    let log = s.catalog.changes_since(0, 100).await.unwrap();
    let seen: Vec<(u64, i32, &str, u64, bool, &str)> = log
        .iter()
        .map(|c| {
            let e = c.entry.as_ref().unwrap();
            (
                c.version,
                c.kind,
                e.resource_code.as_str(),
                e.version,
                e.withdrawn,
                e.name.as_str(),
            )
        })
        .collect();
    let (up, wd) = (ChangeKind::Upsert as i32, ChangeKind::Withdraw as i32);
    assert_eq!(
        seen,
        [
            (1, up, "1/000002", 1, false, "纳税人名录"),
            (2, up, "1/000001", 2, false, "欠税公告"),
            (3, up, "1/000002", 3, false, "纳税人名录（新）"),
            (4, wd, "1/000001", 4, true, "欠税公告"),
        ],
        "the log keeps each entry as it was after each change"
    );
    assert_eq!(
        s.catalog
            .changes_since(1, 2)
            .await
            .unwrap()
            .iter()
            .map(|c| c.version)
            .collect::<Vec<_>>(),
        [2, 3]
    );
    assert!(s.catalog.changes_since(4, 10).await.unwrap().is_empty());
    assert!(s.catalog.changes_since(1_000, 10).await.unwrap().is_empty());
    assert!(s.catalog.changes_since(0, 0).await.unwrap().is_empty());

    // A tombstone is kept and readable; publishing the code again makes it live with a new version.
    let tomb = s.catalog.get("1/000001").await.unwrap().unwrap();
    assert!(tomb.withdrawn && tomb.version == 4);
    let many = s
        .catalog
        .get_many(&["1/000009".into(), "1/000002".into(), "1/000001".into()])
        .await
        .unwrap();
    assert_eq!(
        many.iter()
            .map(|e| e.as_ref().map(|e| (e.version, e.withdrawn)))
            .collect::<Vec<_>>(),
        [None, Some((3, false)), Some((4, true))]
    );
    let again = s
        .catalog
        .upsert(vec![entry("1/000001", "tax", "欠税公告")])
        .await
        .unwrap();
    assert_eq!((again[0].version, again[0].withdrawn), (5, false));
    // Withdrawing a tombstone is a change too (it takes a version).
    s.catalog.withdraw(vec!["1/000002".into()]).await.unwrap();
    let twice = s.catalog.withdraw(vec!["1/000002".into()]).await.unwrap();
    assert_eq!((twice[0].version, twice[0].withdrawn), (7, true));
}

/// A code named twice in one batch: each mention takes its version, the last state stays.
pub async fn catalog_batch_naming_a_code_twice(place: &StorePlace) {
    let s = place.open().await;
    let stored = s
        .catalog
        .upsert(vec![
            entry("1/000001", "tax", "first"),
            entry("1/000001", "tax", "second"),
        ])
        .await
        .unwrap();
    assert_eq!(versions(&stored), [1, 2]);
    let now = s.catalog.get("1/000001").await.unwrap().unwrap();
    assert_eq!((now.version, now.name.as_str()), (2, "second"));
    let tombs = s
        .catalog
        .withdraw(vec!["1/000001".into(), "1/000001".into()])
        .await
        .unwrap();
    assert_eq!(
        tombs
            .iter()
            .map(|e| (e.version, e.withdrawn))
            .collect::<Vec<_>>(),
        [(3, true), (4, true)]
    );
    assert_eq!(tombs[1].name, "second");
    assert_eq!(s.catalog.get("1/000001").await.unwrap().unwrap().version, 4);
    let log = s.catalog.changes_since(0, 10).await.unwrap();
    assert_eq!(
        log.iter()
            .map(|c| c.entry.as_ref().unwrap().name.as_str())
            .collect::<Vec<_>>(),
        ["first", "second", "second", "second"]
    );
}

/// A code stays its first publisher's (live or withdrawn); a refused batch writes nothing.
pub async fn catalog_ownership_conflict_writes_nothing(place: &StorePlace) {
    let s = place.open().await;
    s.catalog
        .upsert(vec![
            entry("1/000001", "tax", "a"),
            entry("1/000002", "tax", "b"),
        ])
        .await
        .unwrap();
    let stolen = s
        .catalog
        .upsert(vec![
            entry("1/000003", "police", "c"),
            entry("1/000001", "police", "a"),
        ])
        .await;
    match &stolen {
        Err(StoreError::Conflict(why)) => {
            assert!(why.contains("1/000001") && why.contains("tax"), "{why}")
        }
        other => panic!("expected a conflict, got {other:?}"),
    }
    s.catalog.withdraw(vec!["1/000002".into()]).await.unwrap();
    assert!(
        is_conflict(
            &s.catalog
                .upsert(vec![entry("1/000002", "police", "b")])
                .await
        ),
        "a tombstone keeps its owner"
    );
    assert_eq!(
        s.catalog.current_version().await.unwrap(),
        3,
        "no version was taken by the refused batches"
    );
    assert!(s.catalog.get("1/000003").await.unwrap().is_none());
    assert_eq!(
        s.catalog
            .get("1/000001")
            .await
            .unwrap()
            .unwrap()
            .provider_code,
        "tax"
    );
    assert_eq!(s.catalog.changes_since(0, 10).await.unwrap().len(), 3);
    // The owner may publish again, and versions go on without a gap.
    let next = s
        .catalog
        .upsert(vec![entry("1/000002", "tax", "b")])
        .await
        .unwrap();
    assert_eq!(versions(&next), [4]);
}

/// Withdrawing an unknown code fails the whole batch, and nothing is written.
pub async fn catalog_withdraw_of_unknown_code_writes_nothing(place: &StorePlace) {
    let s = place.open().await;
    s.catalog
        .upsert(vec![entry("1/000001", "tax", "a")])
        .await
        .unwrap();
    match s
        .catalog
        .withdraw(vec!["1/000001".into(), "1/000404".into()])
        .await
    {
        Err(StoreError::MissingEntry(code)) => assert_eq!(code, "1/000404"),
        other => panic!("expected MissingEntry, got {other:?}"),
    }
    assert_eq!(s.catalog.current_version().await.unwrap(), 1);
    assert!(!s.catalog.get("1/000001").await.unwrap().unwrap().withdrawn);
    assert_eq!(s.catalog.changes_since(0, 10).await.unwrap().len(), 1);
    assert_eq!(
        versions(&s.catalog.withdraw(vec!["1/000001".into()]).await.unwrap()),
        [2]
    );
}

/// Live entries page in resource code order (byte order, as sled's keys: '/' before digits), skipping
/// tombstones, starting after any code, stored or not.
pub async fn catalog_live_entries_page_in_code_order(place: &StorePlace) {
    let s = place.open().await;
    let mut all: Vec<String> = (1..=22).map(|i| format!("1/{i:06}")).collect();
    // Under a natural-language collation these would sort among the others differently.
    all.extend(["10/000001", "2/000001", "1/00001", "9/000001/a", "9/000001"].map(String::from));
    let mut shuffled = all.clone();
    shuffled.reverse();
    shuffled.swap(0, 7);
    s.catalog
        .upsert(shuffled.iter().map(|c| entry(c, "tax", "n")).collect())
        .await
        .unwrap();
    s.catalog
        .withdraw(vec!["1/000004".into(), "2/000001".into()])
        .await
        .unwrap();
    all.sort(); // byte order
    let expected: Vec<String> = all
        .iter()
        .filter(|c| *c != "1/000004" && *c != "2/000001")
        .cloned()
        .collect();

    let mut seen = Vec::new();
    let mut after: Option<String> = None;
    loop {
        let page = s
            .catalog
            .live_entries_after(after.as_deref(), 4)
            .await
            .unwrap();
        assert!(page.len() <= 4);
        let Some(last) = page.last() else { break };
        after = Some(last.resource_code.clone());
        seen.extend(page.into_iter().map(|e| e.resource_code));
    }
    assert_eq!(seen, expected);
    // Starting after a code that is not stored (here a tombstone's, and one that never was).
    let from_tomb = s
        .catalog
        .live_entries_after(Some("1/000004"), 1)
        .await
        .unwrap();
    assert_eq!(codes(&from_tomb), ["1/000005"]);
    let from_gap = s
        .catalog
        .live_entries_after(Some("1/0000105"), 2)
        .await
        .unwrap();
    assert_eq!(codes(&from_gap), ["1/000011", "1/000012"]);
    assert!(s
        .catalog
        .live_entries_after(Some("9/000001/a"), 5)
        .await
        .unwrap()
        .is_empty());
}

fn node(department: &str, name: &str, address: &str) -> NodeRecord {
    NodeRecord {
        department: department.into(),
        node_name: name.into(),
        address: address.into(),
        software_version: "0.1.0".into(),
        registered_at_unix_ms: 1_000,
        last_heartbeat_unix_ms: 1_000,
        lease_expires_unix_ms: 16_000,
        audit_verifying_key_hex: "ab".repeat(32),
        audit_anchor: None,
    }
}

fn seal(upto_seq: u64) -> AuditSeal {
    AuditSeal {
        upto_seq,
        chain_hash: format!("h{upto_seq}"),
        sealed_at_us: 7,
        signature: "5e".repeat(64),
    }
}

/// Register, heartbeat (lease, anchor that never moves back), list order, re-registration.
pub async fn nodes_register_heartbeat_and_list(place: &StorePlace) {
    let s = place.open().await;
    assert!(
        s.nodes
            .heartbeat("tax", "n1", 5, 10, None)
            .await
            .unwrap()
            .is_none(),
        "never registered"
    );
    s.nodes
        .register(node("taxi", "n1", "taxi:1"))
        .await
        .unwrap();
    s.nodes.register(node("tax", "n2", "tax:2")).await.unwrap();
    s.nodes.register(node("tax", "n1", "tax:1")).await.unwrap();
    s.nodes
        .register(node("police", "z", "police:1"))
        .await
        .unwrap();

    let hb = s
        .nodes
        .heartbeat("tax", "n1", 2_000, 17_000, Some(seal(7)))
        .await
        .unwrap()
        .unwrap();
    assert_eq!(
        (hb.last_heartbeat_unix_ms, hb.lease_expires_unix_ms),
        (2_000, 17_000)
    );
    assert_eq!(
        (
            hb.address.as_str(),
            hb.registered_at_unix_ms,
            hb.software_version.as_str()
        ),
        ("tax:1", 1_000, "0.1.0")
    );
    assert_eq!(hb.audit_anchor, Some(seal(7)));
    let hb = s
        .nodes
        .heartbeat("tax", "n1", 3_000, 18_000, Some(seal(3)))
        .await
        .unwrap()
        .unwrap();
    assert_eq!(hb.audit_anchor, Some(seal(7)), "an anchor never moves back");
    assert_eq!(
        hb.last_heartbeat_unix_ms, 3_000,
        "the lease is renewed all the same"
    );
    let hb = s
        .nodes
        .heartbeat("tax", "n1", 4_000, 19_000, Some(seal(7)))
        .await
        .unwrap()
        .unwrap();
    assert_eq!(
        hb.audit_anchor,
        Some(seal(7)),
        "an equal seal changes nothing"
    );
    let hb = s
        .nodes
        .heartbeat("tax", "n1", 5_000, 20_000, None)
        .await
        .unwrap()
        .unwrap();
    assert_eq!(
        (hb.audit_anchor, hb.audit_verifying_key_hex),
        (Some(seal(7)), "ab".repeat(32))
    );
    let hb = s
        .nodes
        .heartbeat("tax", "n1", 6_000, 21_000, Some(seal(9)))
        .await
        .unwrap()
        .unwrap();
    assert_eq!(hb.audit_anchor, Some(seal(9)));

    let names = |nodes: Vec<NodeRecord>| {
        nodes
            .into_iter()
            .map(|n| format!("{}/{}", n.department, n.node_name))
            .collect::<Vec<_>>()
    };
    assert_eq!(
        names(s.nodes.list(None).await.unwrap()),
        ["police/z", "tax/n1", "tax/n2", "taxi/n1"]
    );
    assert_eq!(
        names(s.nodes.list(Some("tax")).await.unwrap()),
        ["tax/n1", "tax/n2"]
    );
    assert!(s.nodes.list(Some("ta")).await.unwrap().is_empty());
    let listed = s.nodes.list(Some("tax")).await.unwrap();
    assert_eq!(listed[0].audit_anchor, Some(seal(9)));
    assert_eq!(listed[0].lease_expires_unix_ms, 21_000);

    // A registration replaces the whole record, anchor included.
    let moved = NodeRecord {
        address: "tax:9".into(),
        audit_anchor: Some(seal(2)),
        ..node("tax", "n1", "")
    };
    s.nodes.register(moved.clone()).await.unwrap();
    assert_eq!(s.nodes.list(Some("tax")).await.unwrap()[0], moved);
    let hb = s
        .nodes
        .heartbeat("tax", "n1", 7_000, 22_000, Some(seal(3)))
        .await
        .unwrap()
        .unwrap();
    assert_eq!(hb.audit_anchor, Some(seal(3)));
}

fn revocation(serial: &str) -> Revocation {
    Revocation {
        serial_hex: serial.into(),
        department: "tax".into(),
        reason: format!("key of {serial} lost"),
        revoked_by: "operator".into(),
        revoked_at_unix_ms: 42,
        version: 99,
    }
}

/// Revocations: consecutive versions from 1 whatever the caller said, idempotent, listed by serial.
pub async fn revocations_are_idempotent_and_versioned(place: &StorePlace) {
    let s = place.open().await;
    assert_eq!(
        s.revocations
            .revoke(revocation("0b"))
            .await
            .unwrap()
            .version,
        1
    );
    assert_eq!(
        s.revocations
            .revoke(revocation("0a"))
            .await
            .unwrap()
            .version,
        2
    );
    let again = s
        .revocations
        .revoke(Revocation {
            reason: "again".into(),
            ..revocation("0b")
        })
        .await
        .unwrap();
    assert_eq!(
        (again.version, again.reason.as_str()),
        (1, "key of 0b lost"),
        "the first record stays"
    );
    assert_eq!(
        s.revocations.current_version().await.unwrap(),
        2,
        "a repeated revoke takes no version"
    );
    assert_eq!(
        s.revocations
            .revoke(revocation("ff01"))
            .await
            .unwrap()
            .version,
        3
    );
    assert_eq!(
        s.revocations
            .revoke(revocation("1c"))
            .await
            .unwrap()
            .version,
        4
    );

    let by_serial: Vec<(String, u64)> = s
        .revocations
        .list()
        .await
        .unwrap()
        .into_iter()
        .map(|r| (r.serial_hex, r.version))
        .collect();
    assert_eq!(
        by_serial,
        [
            ("0a".into(), 2),
            ("0b".into(), 1),
            ("1c".into(), 4),
            ("ff01".into(), 3)
        ]
    );
    let log: Vec<(String, u64)> = s
        .revocations
        .changes_since(0, 10)
        .await
        .unwrap()
        .into_iter()
        .map(|r| (r.serial_hex, r.version))
        .collect();
    assert_eq!(
        log,
        [
            ("0b".into(), 1),
            ("0a".into(), 2),
            ("ff01".into(), 3),
            ("1c".into(), 4)
        ]
    );
    let tail = s.revocations.changes_since(2, 1).await.unwrap();
    assert_eq!((tail.len(), tail[0].version), (1, 3));
    assert!(s.revocations.changes_since(4, 10).await.unwrap().is_empty());
    let stored = &s.revocations.list().await.unwrap()[0];
    assert_eq!(
        (
            stored.department.as_str(),
            stored.revoked_by.as_str(),
            stored.revoked_at_unix_ms
        ),
        ("tax", "operator", 42)
    );
}

pub fn pending(consumer: &str, resource: &str) -> Grant {
    Grant {
        grant_id: "G99999999".into(),
        resource_code: resource.into(),
        consumer_code: consumer.into(),
        provider_code: "tax".into(),
        requested_items: vec!["纳税人识别号".into(), "欠税金额".into()],
        purpose: "稽查".into(),
        status: GrantStatus::Pending as i32,
        requested_by: "police-operator".into(),
        requested_at_unix_ms: 1_000,
        version: 77,
        ..Default::default()
    }
}

fn decided(grant: &Grant, status: GrantStatus) -> Grant {
    Grant {
        status: status as i32,
        granted_items: grant.requested_items[..1].to_vec(),
        decided_by: "tax-operator".into(),
        decided_at_unix_ms: 2_000,
        ..grant.clone()
    }
}

fn ids(grants: Vec<Grant>) -> Vec<String> {
    grants.into_iter().map(|g| g.grant_id).collect()
}

/// Grant ids and versions, for_consumer and list order, the change log's states.
pub async fn grants_ids_versions_and_order(place: &StorePlace) {
    let s = place.open().await;
    let g1 = s
        .grants
        .insert(pending("police", "1/000001"))
        .await
        .unwrap();
    assert_eq!(
        (g1.grant_id.as_str(), g1.version),
        ("G00000001", 1),
        "the store sets id and version"
    );
    let g2 = s
        .grants
        .insert(pending("health", "1/000001"))
        .await
        .unwrap();
    let g3 = s
        .grants
        .insert(pending("police", "1/000002"))
        .await
        .unwrap();
    assert_eq!(
        (g2.grant_id.as_str(), g3.grant_id.as_str(), g3.version),
        ("G00000002", "G00000003", 3)
    );

    // One update of two grants: consecutive versions, in order.
    let stored = s
        .grants
        .update(vec![
            decided(&g3, GrantStatus::Rejected),
            decided(&g1, GrantStatus::Approved),
        ])
        .await
        .unwrap();
    assert_eq!(
        stored
            .iter()
            .map(|g| (g.grant_id.as_str(), g.version))
            .collect::<Vec<_>>(),
        [("G00000003", 4), ("G00000001", 5)]
    );
    assert_eq!(s.grants.current_version().await.unwrap(), 5);
    // A decided grant is no longer pending: the consumer may ask again.
    let g4 = s
        .grants
        .insert(pending("police", "1/000001"))
        .await
        .unwrap();
    assert_eq!((g4.grant_id.as_str(), g4.version), ("G00000004", 6));

    let police: Vec<(String, i32)> = s
        .grants
        .for_consumer("police", "1/000001")
        .await
        .unwrap()
        .into_iter()
        .map(|g| (g.grant_id, g.status))
        .collect();
    let (p, a, r) = (
        GrantStatus::Pending as i32,
        GrantStatus::Approved as i32,
        GrantStatus::Rejected as i32,
    );
    assert_eq!(
        police,
        [("G00000001".into(), a), ("G00000004".into(), p)],
        "oldest request first"
    );
    assert!(s
        .grants
        .for_consumer("police", "1/000009")
        .await
        .unwrap()
        .is_empty());
    assert!(
        s.grants
            .for_consumer("tax", "1/000001")
            .await
            .unwrap()
            .is_empty(),
        "tax is the provider, not a consumer"
    );

    assert_eq!(
        ids(s.grants.list(None).await.unwrap()),
        ["G00000004", "G00000003", "G00000002", "G00000001"]
    );
    assert_eq!(
        ids(s.grants.list(Some("health")).await.unwrap()),
        ["G00000002"]
    );
    assert_eq!(
        ids(s.grants.list(Some("police")).await.unwrap()),
        ["G00000004", "G00000003", "G00000001"]
    );
    assert_eq!(s.grants.list(Some("tax")).await.unwrap().len(), 4);
    assert!(s.grants.list(Some("commerce")).await.unwrap().is_empty());

    let got = s.grants.get("G00000001").await.unwrap().unwrap();
    assert_eq!(
        (
            got.status,
            got.version,
            got.granted_items.len(),
            got.decided_by.as_str()
        ),
        (a, 5, 1, "tax-operator")
    );
    assert_eq!(got.purpose, "稽查");
    assert!(s.grants.get("G00000005").await.unwrap().is_none());
    for nonsense in ["", "nonsense", "G1", "g00000001", "G00000000"] {
        assert!(
            s.grants.get(nonsense).await.unwrap().is_none(),
            "{nonsense}"
        );
    }

    let log = s.grants.changes_since(0, 100).await.unwrap();
    let states: Vec<(u64, &str, i32, u64)> = log
        .iter()
        .map(|c| {
            let g = c.grant.as_ref().unwrap();
            (c.version, g.grant_id.as_str(), g.status, g.version)
        })
        .collect();
    assert_eq!(
        states,
        [
            (1, "G00000001", p, 1),
            (2, "G00000002", p, 2),
            (3, "G00000003", p, 3),
            (4, "G00000003", r, 4),
            (5, "G00000001", a, 5),
            (6, "G00000004", p, 6),
        ]
    );
    assert_eq!(
        s.grants
            .changes_since(3, 2)
            .await
            .unwrap()
            .iter()
            .map(|c| c.version)
            .collect::<Vec<_>>(),
        [4, 5]
    );
    assert!(s.grants.changes_since(6, 10).await.unwrap().is_empty());
}

/// Every refused grant write (pending already, unknown grant, changed subject, stale version) writes
/// nothing: no grant, no version, no id.
pub async fn grant_refusals_write_nothing(place: &StorePlace) {
    let s = place.open().await;
    let g1 = s
        .grants
        .insert(pending("police", "1/000001"))
        .await
        .unwrap();
    let g2 = s
        .grants
        .insert(pending("health", "1/000001"))
        .await
        .unwrap();

    match s.grants.insert(pending("police", "1/000001")).await {
        Err(StoreError::Conflict(why)) => {
            assert!(why.contains("G00000001") && why.contains("police"), "{why}")
        }
        other => panic!("a second pending request must conflict, got {other:?}"),
    }

    let unknown = Grant {
        grant_id: "G00000009".into(),
        ..g1.clone()
    };
    let not_an_id = Grant {
        grant_id: "x".into(),
        ..g1.clone()
    };
    let moved = Grant {
        consumer_code: "health".into(),
        ..decided(&g1, GrantStatus::Approved)
    };
    let other_resource = Grant {
        resource_code: "1/000002".into(),
        ..g1.clone()
    };
    let other_provider = Grant {
        provider_code: "police".into(),
        ..g1.clone()
    };
    for bad in [
        vec![decided(&g2, GrantStatus::Approved), unknown],
        vec![not_an_id],
        vec![moved],
        vec![other_resource],
        vec![other_provider],
    ] {
        let result = s.grants.update(bad).await;
        assert!(
            matches!(result, Err(StoreError::BadGrantUpdate(..))),
            "{result:?}"
        );
    }

    let stale = Grant {
        version: g1.version + 1,
        ..decided(&g1, GrantStatus::Approved)
    };
    match s
        .grants
        .update(vec![decided(&g2, GrantStatus::Rejected), stale])
        .await
    {
        Err(StoreError::Conflict(why)) => assert!(why.contains("G00000001"), "{why}"),
        other => panic!("a stale version must conflict, got {other:?}"),
    }

    assert_eq!(
        s.grants.current_version().await.unwrap(),
        2,
        "no version taken"
    );
    assert_eq!(s.grants.changes_since(0, 10).await.unwrap().len(), 2);
    assert_eq!(s.grants.get("G00000001").await.unwrap().unwrap(), g1);
    assert_eq!(s.grants.get("G00000002").await.unwrap().unwrap(), g2);
    assert_eq!(s.grants.list(None).await.unwrap().len(), 2);

    // Within one call, a grant named twice is checked against its first write there.
    let approved = decided(&g1, GrantStatus::Approved);
    let revoked_after = Grant {
        status: GrantStatus::Revoked as i32,
        version: 3,
        ..approved.clone()
    };
    let both = s
        .grants
        .update(vec![approved.clone(), revoked_after])
        .await
        .unwrap();
    assert_eq!(both.iter().map(|g| g.version).collect::<Vec<_>>(), [3, 4]);
    assert_eq!(
        s.grants.get("G00000001").await.unwrap().unwrap().status,
        GrantStatus::Revoked as i32
    );
    let replayed = Grant {
        version: 1,
        ..approved
    };
    assert!(
        is_conflict(&s.grants.update(vec![replayed]).await),
        "the version read is gone"
    );

    // Ids go on without a gap after the refusals.
    let g3 = s
        .grants
        .insert(pending("police", "1/000001"))
        .await
        .unwrap();
    assert_eq!((g3.grant_id.as_str(), g3.version), ("G00000003", 5));
}

/// A restart (opening the place again) keeps every store's content and counters.
pub async fn reopen_keeps_everything(place: &StorePlace) {
    {
        let s = place.open().await;
        s.catalog
            .upsert(vec![
                entry("1/000001", "tax", "a"),
                entry("1/000002", "tax", "b"),
            ])
            .await
            .unwrap();
        s.catalog.withdraw(vec!["1/000001".into()]).await.unwrap();
        s.nodes.register(node("tax", "n1", "tax:1")).await.unwrap();
        s.nodes
            .heartbeat("tax", "n1", 2_000, 17_000, Some(seal(5)))
            .await
            .unwrap();
        s.revocations.revoke(revocation("0a")).await.unwrap();
        let g = s
            .grants
            .insert(pending("police", "1/000002"))
            .await
            .unwrap();
        s.grants
            .update(vec![decided(&g, GrantStatus::Approved)])
            .await
            .unwrap();
    }
    let s = place.open().await;
    assert_eq!(s.catalog.current_version().await.unwrap(), 3);
    assert_eq!(s.catalog.changes_since(0, 10).await.unwrap().len(), 3);
    assert!(s.catalog.get("1/000001").await.unwrap().unwrap().withdrawn);
    assert_eq!(
        codes(&s.catalog.live_entries_after(None, 10).await.unwrap()),
        ["1/000002"]
    );
    let nodes = s.nodes.list(None).await.unwrap();
    assert_eq!(
        (nodes.len(), nodes[0].audit_anchor.clone()),
        (1, Some(seal(5)))
    );
    assert_eq!(s.revocations.current_version().await.unwrap(), 1);
    assert_eq!(s.revocations.list().await.unwrap()[0].serial_hex, "0a");
    assert_eq!(s.grants.current_version().await.unwrap(), 2);
    assert_eq!(
        s.grants.get("G00000001").await.unwrap().unwrap().status,
        GrantStatus::Approved as i32
    );
    // Counters continue.
    assert_eq!(
        versions(
            &s.catalog
                .upsert(vec![entry("1/000003", "tax", "c")])
                .await
                .unwrap()
        ),
        [4]
    );
    assert_eq!(
        s.revocations
            .revoke(revocation("0b"))
            .await
            .unwrap()
            .version,
        2
    );
    let g = s
        .grants
        .insert(pending("health", "1/000002"))
        .await
        .unwrap();
    assert_eq!((g.grant_id.as_str(), g.version), ("G00000002", 3));
}

/// Several writers at once on one store instance: versions stay consecutive and complete.
pub async fn concurrent_writers_get_consecutive_versions(place: &StorePlace) {
    let s = place.open().await;
    let mut tasks = Vec::new();
    for writer in 0..4 {
        let s = s.clone();
        tasks.push(tokio::spawn(async move {
            for batch in 0..10 {
                let entries = (0..3)
                    .map(|i| entry(&format!("{writer}/{batch:03}{i:03}"), "tax", "n"))
                    .collect();
                s.catalog.upsert(entries).await.unwrap();
                s.revocations
                    .revoke(revocation(&format!("{writer:02x}{batch:02x}")))
                    .await
                    .unwrap();
                let g = s
                    .grants
                    .insert(pending(&format!("dept{writer}"), &format!("9/{batch:06}")))
                    .await
                    .unwrap();
                s.grants
                    .update(vec![decided(&g, GrantStatus::Approved)])
                    .await
                    .unwrap();
            }
        }));
    }
    for t in tasks {
        t.await.unwrap();
    }
    let log = s.catalog.changes_since(0, 1_000).await.unwrap();
    assert_eq!(
        log.iter().map(|c| c.version).collect::<Vec<_>>(),
        (1..=120).collect::<Vec<_>>()
    );
    let revs = s.revocations.changes_since(0, 1_000).await.unwrap();
    assert_eq!(
        revs.iter().map(|r| r.version).collect::<Vec<_>>(),
        (1..=40).collect::<Vec<_>>()
    );
    let grants = s.grants.changes_since(0, 1_000).await.unwrap();
    assert_eq!(
        grants.iter().map(|c| c.version).collect::<Vec<_>>(),
        (1..=80).collect::<Vec<_>>()
    );
    let mut grant_ids = ids(s.grants.list(None).await.unwrap());
    grant_ids.reverse();
    assert_eq!(
        grant_ids,
        (1..=40).map(directory::store::grant_id).collect::<Vec<_>>()
    );
}

/// What only a shared database shows: several store instances (replicas) on one PostgreSQL database, the
/// schema migrations, and the connection to the database (errors, TLS).
pub mod postgres_only {
    use std::collections::BTreeSet;
    use std::time::Duration;

    use super::*;

    /// Publishes from two replicas at once, with a reader on each following the log as a watcher does:
    /// the log is gap-free, every change is in it exactly once, and a reader never sees a gap.
    pub async fn concurrent_publishes_are_gap_free(place: &StorePlace) {
        let (a, b) = (place.open().await, place.open().await);
        let done = Arc::new(std::sync::atomic::AtomicBool::new(false));
        let mut readers = Vec::new();
        for replica in [a.clone(), b.clone()] {
            let done = done.clone();
            readers.push(tokio::spawn(async move {
                let mut applied = 0u64;
                let mut rounds = 0u64;
                loop {
                    let finished = done.load(std::sync::atomic::Ordering::Acquire);
                    let changes = replica.catalog.changes_since(applied, 50).await.unwrap();
                    for c in &changes {
                        assert_eq!(
                            c.version,
                            applied + 1,
                            "a reader saw a gap after version {applied}"
                        );
                        applied = c.version;
                    }
                    rounds += 1;
                    if finished && changes.is_empty() {
                        return (applied, rounds);
                    }
                    if changes.is_empty() {
                        tokio::time::sleep(Duration::from_millis(2)).await;
                    }
                }
            }));
        }
        let mut writers = Vec::new();
        for (r, replica) in [a.clone(), b.clone()].into_iter().enumerate() {
            for w in 0..3 {
                let replica = replica.clone();
                writers.push(tokio::spawn(async move {
                    let mut mine = Vec::new();
                    for batch in 0..20 {
                        let entries: Vec<_> = (0..3)
                            .map(|i| entry(&format!("{r}/{w}{batch:02}{i:03}"), "tax", "n"))
                            .collect();
                        let stored = replica.catalog.upsert(entries).await.unwrap();
                        let v: Vec<u64> = versions(&stored);
                        assert!(
                            v.windows(2).all(|p| p[1] == p[0] + 1),
                            "one batch takes consecutive versions"
                        );
                        mine.extend(stored.into_iter().map(|e| (e.version, e.resource_code)));
                    }
                    mine
                }));
            }
        }
        let mut acknowledged = Vec::new();
        for w in writers {
            acknowledged.extend(w.await.unwrap());
        }
        done.store(true, std::sync::atomic::Ordering::Release);
        for r in readers {
            let (applied, _) = r.await.unwrap();
            assert_eq!(applied, 360, "each reader followed the log to its end");
        }
        acknowledged.sort();
        assert_eq!(
            acknowledged.iter().map(|(v, _)| *v).collect::<Vec<_>>(),
            (1..=360).collect::<Vec<_>>()
        );
        for replica in [&a, &b] {
            assert_eq!(replica.catalog.current_version().await.unwrap(), 360);
            let log = replica.catalog.changes_since(0, 1_000).await.unwrap();
            let logged: Vec<(u64, String)> = log
                .into_iter()
                .map(|c| (c.version, c.entry.unwrap().resource_code))
                .collect();
            assert_eq!(
                logged, acknowledged,
                "every acknowledged change is in the log once, at its version"
            );
            let codes: BTreeSet<String> = logged.into_iter().map(|(_, c)| c).collect();
            assert_eq!(codes.len(), 360);
        }
    }

    /// The checks made at the moment of writing hold across replicas, also when both race.
    pub async fn conflicts_are_caught_across_replicas(place: &StorePlace) {
        let (a, b) = (place.open().await, place.open().await);

        // Ownership: sequential, then two departments racing for the same new codes.
        a.catalog
            .upsert(vec![entry("1/000001", "tax", "a")])
            .await
            .unwrap();
        assert!(is_conflict(
            &b.catalog
                .upsert(vec![entry("1/000001", "police", "a")])
                .await
        ));
        for round in 0..10 {
            let code = format!("2/{round:06}");
            let (ra, rb) = tokio::join!(
                a.catalog.upsert(vec![entry(&code, "tax", "t")]),
                b.catalog.upsert(vec![entry(&code, "police", "p")])
            );
            assert!(
                ra.is_ok() != rb.is_ok(),
                "exactly one department gets {code}: {ra:?} {rb:?}"
            );
            let owner = if ra.is_ok() { "tax" } else { "police" };
            assert_eq!(
                a.catalog.get(&code).await.unwrap().unwrap().provider_code,
                owner
            );
            assert!(is_conflict(if ra.is_ok() { &rb } else { &ra }));
        }

        // One pending request per consumer and resource, whichever replica takes it.
        let g1 = a
            .grants
            .insert(pending("police", "1/000001"))
            .await
            .unwrap();
        assert!(is_conflict(
            &b.grants.insert(pending("police", "1/000001")).await
        ));
        for round in 0..10 {
            let resource = format!("3/{round:06}");
            let (ra, rb) = tokio::join!(
                a.grants.insert(pending("health", &resource)),
                b.grants.insert(pending("health", &resource))
            );
            assert!(
                ra.is_ok() != rb.is_ok(),
                "exactly one pending request for {resource}: {ra:?} {rb:?}"
            );
            assert_eq!(
                b.grants
                    .for_consumer("health", &resource)
                    .await
                    .unwrap()
                    .len(),
                1
            );
        }

        // An update applies only to the grant as it was read.
        let read_on_a = a.grants.get(&g1.grant_id).await.unwrap().unwrap();
        let read_on_b = b.grants.get(&g1.grant_id).await.unwrap().unwrap();
        b.grants
            .update(vec![decided(&read_on_b, GrantStatus::Approved)])
            .await
            .unwrap();
        assert!(is_conflict(
            &a.grants
                .update(vec![decided(&read_on_a, GrantStatus::Rejected)])
                .await
        ));
        assert_eq!(
            a.grants.get(&g1.grant_id).await.unwrap().unwrap().status,
            GrantStatus::Approved as i32
        );
        // Both deciding at once: one wins.
        let g = a
            .grants
            .insert(pending("police", "4/000001"))
            .await
            .unwrap();
        let (ra, rb) = tokio::join!(
            a.grants.update(vec![decided(&g, GrantStatus::Approved)]),
            b.grants.update(vec![decided(&g, GrantStatus::Rejected)])
        );
        assert!(
            ra.is_ok() != rb.is_ok(),
            "exactly one decision on {}: {ra:?} {rb:?}",
            g.grant_id
        );

        // Every log stayed gap-free, and grant ids too.
        let grant_log = a.grants.changes_since(0, 1_000).await.unwrap();
        let n = grant_log.len() as u64;
        assert_eq!(
            grant_log.iter().map(|c| c.version).collect::<Vec<_>>(),
            (1..=n).collect::<Vec<_>>()
        );
        assert_eq!(b.grants.current_version().await.unwrap(), n);
        let mut grant_ids = ids(b.grants.list(None).await.unwrap());
        grant_ids.reverse();
        let count = grant_ids.len() as u64;
        assert_eq!(
            grant_ids,
            (1..=count)
                .map(directory::store::grant_id)
                .collect::<Vec<_>>()
        );
        let catalog_log = b.catalog.changes_since(0, 1_000).await.unwrap();
        assert_eq!(catalog_log.len(), 11);
        assert_eq!(catalog_log.last().unwrap().version, 11);
    }

    /// Revocations from two replicas: one version per serial, consecutive; nodes seen from both.
    pub async fn revocations_and_nodes_across_replicas(place: &StorePlace) {
        let (a, b) = (place.open().await, place.open().await);
        for round in 0..10 {
            let serial = format!("{round:04x}");
            let (ra, rb) = tokio::join!(
                a.revocations.revoke(revocation(&serial)),
                b.revocations.revoke(revocation(&serial))
            );
            assert_eq!(
                ra.unwrap().version,
                rb.unwrap().version,
                "the same serial has one version"
            );
        }
        let log = b.revocations.changes_since(0, 100).await.unwrap();
        assert_eq!(
            log.iter().map(|r| r.version).collect::<Vec<_>>(),
            (1..=10).collect::<Vec<_>>()
        );

        a.nodes.register(node("tax", "n1", "tax:1")).await.unwrap();
        let hb = b
            .nodes
            .heartbeat("tax", "n1", 2_000, 17_000, Some(seal(4)))
            .await
            .unwrap()
            .unwrap();
        assert_eq!(hb.address, "tax:1");
        let (ha, hb) = tokio::join!(
            a.nodes.heartbeat("tax", "n1", 3_000, 18_000, Some(seal(9))),
            b.nodes.heartbeat("tax", "n1", 3_000, 18_000, Some(seal(6)))
        );
        ha.unwrap();
        hb.unwrap();
        let listed = a.nodes.list(None).await.unwrap();
        assert_eq!(
            listed[0].audit_anchor,
            Some(seal(9)),
            "whatever order they came in, the highest seal stays"
        );
    }

    /// A database whose transactions run SERIALIZABLE (as CockroachDB's do): writers colliding on a log's
    /// head now fail with serialization_failure and are run again, and everything above still holds.
    pub async fn serializable_database_retries_collisions(place: &StorePlace) {
        make_serializable(place).await;
        concurrent_publishes_are_gap_free(place).await;
        let another = StorePlace::new(Backend::Postgres);
        make_serializable(&another).await;
        conflicts_are_caught_across_replicas(&another).await;
    }

    async fn make_serializable(place: &StorePlace) {
        let client = connect(place).await;
        let database: String = client
            .query_one("SELECT current_database()", &[])
            .await
            .unwrap()
            .get(0);
        client
            .batch_execute(&format!(
                "ALTER DATABASE {database} SET default_transaction_isolation = 'serializable'"
            ))
            .await
            .unwrap();
        let later = connect(place).await;
        let isolation: String = later
            .query_one("SHOW transaction_isolation", &[])
            .await
            .unwrap()
            .get(0);
        assert_eq!(isolation, "serializable");
    }

    /// A raw connection to the place's database.
    async fn connect(place: &StorePlace) -> tokio_postgres::Client {
        let (client, connection) =
            tokio_postgres::connect(&place.postgres_config().url, tokio_postgres::NoTls)
                .await
                .expect("connect");
        tokio::spawn(connection);
        client
    }

    async fn migrations(client: &tokio_postgres::Client) -> Vec<(i64, String)> {
        client
            .query(
                "SELECT version, name FROM gx_schema_migrations ORDER BY version",
                &[],
            )
            .await
            .unwrap()
            .iter()
            .map(|r| (r.get(0), r.get(1)))
            .collect()
    }

    async fn applied_at(client: &tokio_postgres::Client) -> Vec<String> {
        let rows = client
            .query(
                "SELECT applied_at::TEXT FROM gx_schema_migrations ORDER BY version",
                &[],
            )
            .await
            .unwrap();
        rows.iter().map(|r| r.get(0)).collect()
    }

    /// Empty database → migrated; open again → nothing to do; a newer schema → refused, naming both
    /// versions.
    pub async fn migrations_run_once_and_refuse_a_newer_schema(place: &StorePlace) {
        let s = place.open().await;
        s.catalog
            .upsert(vec![entry("1/000001", "tax", "a")])
            .await
            .unwrap();
        let client = connect(place).await;
        let applied = migrations(&client).await;
        assert_eq!(
            applied.iter().map(|(v, _)| *v).collect::<Vec<_>>(),
            (1..=postgres::SCHEMA_VERSION).collect::<Vec<_>>()
        );
        let first_stamps = applied_at(&client).await;
        drop(s);
        let again = place.open().await;
        assert_eq!(
            migrations(&client).await,
            applied,
            "re-opening applies nothing"
        );
        assert_eq!(applied_at(&client).await, first_stamps);
        assert_eq!(
            again.catalog.current_version().await.unwrap(),
            1,
            "and keeps the data"
        );

        let newer = postgres::SCHEMA_VERSION + 1;
        client
            .execute(
                "INSERT INTO gx_schema_migrations (version, name) VALUES ($1, 'from the future')",
                &[&newer],
            )
            .await
            .unwrap();
        let refused = postgres::open(place.postgres_config())
            .await
            .err()
            .expect("a newer schema must be refused");
        let text = refused.to_string();
        assert!(text.contains(&format!("schema version {newer}")), "{text}");
        assert!(
            text.contains(&format!("schema version {}", postgres::SCHEMA_VERSION)),
            "{text}"
        );
    }

    /// Replicas starting at once on an empty database both come up, and the schema is applied once.
    pub async fn concurrent_first_opens_both_succeed(_place: &StorePlace) {
        for _ in 0..8 {
            let config = TestPostgres::shared().fresh_config();
            let opens = (0..4).map(|_| postgres::open(&config));
            let results = futures::future::join_all(opens).await;
            for r in &results {
                assert!(r.is_ok(), "{:?}", r.as_ref().err());
            }
            let (stores, _) = results.into_iter().next().unwrap().unwrap();
            assert_eq!(
                stores
                    .catalog
                    .upsert(vec![entry("1/000001", "tax", "a")])
                    .await
                    .unwrap()[0]
                    .version,
                1
            );
            let place = StorePlace {
                backend: Backend::Postgres,
                dir: tempfile::tempdir().unwrap(),
                postgres: Some(config),
            };
            let client = connect(&place).await;
            assert_eq!(
                migrations(&client).await.len() as i64,
                postgres::SCHEMA_VERSION
            );
        }
    }

    /// An unreachable database fails `open` quickly with an error that names it and not the password.
    pub async fn unreachable_database_fails_clearly(place: &StorePlace) {
        let password_file = place.dir.path().join("db-password");
        std::fs::write(&password_file, "s3cret-Pa55\n").unwrap();
        let closed_port = std::net::TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        let config = PostgresConfig {
            password_file: Some(password_file.clone()),
            connect_timeout_ms: 2_000,
            ..PostgresConfig::new(format!(
                "postgresql://gx@127.0.0.1:{closed_port}/gx_directory"
            ))
        };
        let started = std::time::Instant::now();
        let err = postgres::open(&config)
            .await
            .err()
            .expect("nothing listens there")
            .to_string();
        assert!(
            started.elapsed() < Duration::from_secs(10),
            "took {:?}",
            started.elapsed()
        );
        assert!(
            err.contains(&format!(
                "connect to postgresql://gx@127.0.0.1:{closed_port}/gx_directory"
            )),
            "{err}"
        );
        assert!(!err.contains("s3cret"), "{err}");

        // The password file's problems are named too.
        let missing = PostgresConfig {
            password_file: Some(place.dir.path().join("nope")),
            ..config.clone()
        };
        let err = postgres::open(&missing).await.err().unwrap().to_string();
        assert!(
            err.contains("password_file") && err.contains("nope"),
            "{err}"
        );
        let bad_ca = PostgresConfig {
            tls_ca_file: Some(password_file),
            ..config
        };
        let err = postgres::open(&bad_ca).await.err().unwrap().to_string();
        assert!(
            err.contains("tls_ca_file") && !err.contains("s3cret"),
            "{err}"
        );
    }

    /// The admin port's view: a write round trip that names the database, and a size.
    pub async fn database_check_and_size(place: &StorePlace) {
        let (_stores, db) = postgres::open(place.postgres_config()).await.unwrap();
        let check = db.check().await;
        assert!(check.ok, "{check:?}");
        assert_eq!(check.name, "store");
        assert!(
            db.describe().starts_with("postgresql://") && check.detail.contains(db.describe()),
            "{check:?}"
        );
        assert!(db.size_bytes().await.unwrap() > 1_000_000);
    }

    /// `[store.postgres] tls_ca_file`: against a server that admits the role only over TLS, the right CA
    /// connects; another CA, an address the certificate does not name, or no TLS at all do not.
    pub async fn database_over_tls(_place: &StorePlace) {
        use client_sdk::identity::Role;
        use client_sdk::pki::{init_ca, issue, LeafRequest};

        use crate::postgres::{ServerTls, TLS_ONLY_ROLE};

        let dir = tempfile::tempdir().unwrap();
        let (ca_dir, other_ca_dir) = (dir.path().join("ca"), dir.path().join("other-ca"));
        for d in [&ca_dir, &other_ca_dir] {
            std::fs::create_dir_all(d).unwrap();
            init_ca(d, "database test CA", 30).unwrap();
        }
        // Names 127.0.0.1 and localhost, not 127.0.0.2.
        let cert = issue(&ca_dir, &LeafRequest::new("ops", Role::Directory, "db")).unwrap();
        let server = TestPostgres::start_private_with_tls(&ServerTls {
            cert: cert.cert,
            key: cert.key,
        });
        let database_url = server.fresh_database();
        let database = database_url.rsplit('/').next().unwrap().to_string();
        let port = server.port();
        let config = |host: &str, ca: Option<&std::path::Path>| PostgresConfig {
            tls_ca_file: ca.map(|p| p.to_path_buf()),
            connect_timeout_ms: 3_000,
            ..PostgresConfig::new(format!(
                "postgresql://{TLS_ONLY_ROLE}@{host}:{port}/{database}"
            ))
        };
        let ca = client_sdk::pki::ca_cert_path(&ca_dir);
        let other_ca = client_sdk::pki::ca_cert_path(&other_ca_dir);

        let (stores, db) = postgres::open(&config("127.0.0.1", Some(&ca)))
            .await
            .expect("TLS with the right CA");
        assert_eq!(
            stores
                .catalog
                .upsert(vec![entry("1/000001", "tax", "a")])
                .await
                .unwrap()[0]
                .version,
            1
        );
        assert!(db.check().await.ok);

        let refusals = [
            (
                "another CA",
                config("127.0.0.1", Some(&other_ca)),
                "certificate",
            ),
            (
                "an address the certificate does not name",
                config("127.0.0.2", Some(&ca)),
                "certificate",
            ),
            ("no TLS", config("127.0.0.1", None), "no encryption"),
        ];
        for (what, config, why) in refusals {
            let err = postgres::open(&config)
                .await
                .err()
                .unwrap_or_else(|| panic!("{what} must be refused"));
            let text = err.to_string();
            assert!(
                text.contains("connect to postgresql://") && text.contains(why),
                "{what}: {text}"
            );
        }
    }
}
