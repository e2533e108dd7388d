//! Searching the trail for `QueryAudit`.

use super::*;

// Query

/// What [`query`] reads: the node's database, or an open [`AuditLog`] (also behind an `Arc`).
pub trait AuditSource {
    fn audit_entries(&self) -> Result<sled::Tree, AuditError>;
}

impl AuditSource for sled::Db {
    fn audit_entries(&self) -> Result<sled::Tree, AuditError> {
        Ok(self.open_tree(ENTRIES_TREE)?)
    }
}

impl AuditSource for AuditLog {
    fn audit_entries(&self) -> Result<sled::Tree, AuditError> {
        Ok(self.entries.clone())
    }
}

impl<T: AuditSource + ?Sized> AuditSource for Arc<T> {
    fn audit_entries(&self) -> Result<sled::Tree, AuditError> {
        (**self).audit_entries()
    }
}

/// The `QueryAudit` filter is the request itself: every non-empty / non-zero field must match.
/// - `from_unix_ms` / `to_unix_ms`: `request_in_us` in `[from, to)` (Unix ms; 0 = open on that side).
/// - `peer`: the other side's department (the provider in a consumer-side entry, the consumer in a
///   provider-side one).
/// - `resource_code`, `message_id`: equal.
/// - `result`: `ok` (code 0), `error` (any other code), or a gRPC code name such as `PERMISSION_DENIED`
///   (case-insensitive); anything else is [`AuditError::InvalidFilter`].
/// - `record_key`: a key in clear, hashed with the node's [`KeyHasher`]; matches an entry whose `key_hash`
///   (one hash, or several joined by `,`, see [`KeyHasher::hash_keys`]) contains it.
/// - `limit`: 0 = [`DEFAULT_QUERY_LIMIT`]; at most [`MAX_QUERY_LIMIT`] (larger ones are lowered).
pub type AuditFilter = QueryAuditRequest;

use client_sdk::status::GRPC_CODE_NAMES as GRPC_CODES;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) enum ResultFilter {
    Any,
    Ok,
    Error,
    Code(i32),
}

impl ResultFilter {
    fn parse(text: &str) -> Result<Self, AuditError> {
        let t = text.trim();
        if t.is_empty() {
            return Ok(ResultFilter::Any);
        }
        if t.eq_ignore_ascii_case("ok") {
            return Ok(ResultFilter::Ok);
        }
        if t.eq_ignore_ascii_case("error") {
            return Ok(ResultFilter::Error);
        }
        match GRPC_CODES.iter().position(|c| c.eq_ignore_ascii_case(t)) {
            Some(code) => Ok(ResultFilter::Code(code as i32)),
            None => Err(AuditError::InvalidFilter {
                field: "result",
                reason: format!(
                    "{text:?} is not \"ok\", \"error\" or a gRPC code name ({})",
                    GRPC_CODES.join(", ")
                ),
            }),
        }
    }

    fn matches(self, code: i32) -> bool {
        match self {
            ResultFilter::Any => true,
            ResultFilter::Ok => code == 0,
            ResultFilter::Error => code != 0,
            ResultFilter::Code(c) => code == c,
        }
    }
}

/// An [`AuditFilter`] checked and ready to match.
pub(super) struct Matcher<'a> {
    from_us: Option<i64>,
    to_us: Option<i64>,
    filter: &'a AuditFilter,
    result: ResultFilter,
    key_hash: Option<String>,
}

impl<'a> Matcher<'a> {
    fn new(filter: &'a AuditFilter, hasher: &KeyHasher) -> Result<Self, AuditError> {
        let from_us = (filter.from_unix_ms > 0).then(|| filter.from_unix_ms.saturating_mul(1000));
        let to_us = (filter.to_unix_ms > 0).then(|| filter.to_unix_ms.saturating_mul(1000));
        if let (Some(from), Some(to)) = (from_us, to_us) {
            if from > to {
                return Err(AuditError::InvalidFilter {
                    field: "from_unix_ms",
                    reason: format!("{} is after to_unix_ms {}", filter.from_unix_ms, filter.to_unix_ms),
                });
            }
        }
        Ok(Matcher {
            from_us,
            to_us,
            filter,
            result: ResultFilter::parse(&filter.result)?,
            key_hash: (!filter.record_key.is_empty()).then(|| hasher.hash(&filter.record_key)),
        })
    }

    fn matches(&self, r: &AuditRecord) -> bool {
        let f = self.filter;
        self.from_us.is_none_or(|from| r.request_in_us >= from)
            && self.to_us.is_none_or(|to| r.request_in_us < to)
            && (f.peer.is_empty() || r.peer() == f.peer)
            && (f.resource_code.is_empty() || r.resource_code == f.resource_code)
            && (f.message_id.is_empty() || r.message_id == f.message_id)
            && self.result.matches(r.result_code)
            && self.key_hash.as_ref().is_none_or(|h| r.key_hash.split(',').any(|k| k == h))
    }
}

/// `QueryAudit`: entries matching `filter`, newest first, at most `limit` of them; whether more matched
/// (`truncated`); and the log's size (its last sequence number, which is the number of entries in an
/// intact log).
///
/// Scans the log from the newest entry backwards and stops at the first match past the limit, so a recent
/// or unselective query is quick and a selective one over a big log reads all of it (no index). Entries
/// that cannot be decoded are skipped with a warning (`VerifyAudit` reports them).
pub fn query(
    source: &(impl AuditSource + ?Sized),
    filter: &AuditFilter,
    hasher: &KeyHasher,
) -> Result<(Vec<AuditEntry>, bool, u64), AuditError> {
    let matcher = Matcher::new(filter, hasher)?;
    let limit = match filter.limit {
        0 => DEFAULT_QUERY_LIMIT,
        n => n.min(MAX_QUERY_LIMIT),
    } as usize;
    let tree = source.audit_entries()?;
    let total = tree.last()?.map_or(0, |(k, _)| seq_of_key(&k));
    let mut found = Vec::new();
    let mut truncated = false;
    for kv in tree.iter().rev() {
        let (k, v) = kv?;
        let entry = match decode_entry(&k, &v) {
            Ok(entry) => entry,
            Err(e) => {
                tracing::warn!(error = %e, "skipping an unreadable audit entry");
                continue;
            }
        };
        if !matcher.matches(&entry.record) {
            continue;
        }
        if found.len() == limit {
            truncated = true;
            break;
        }
        found.push(entry.record.to_entry(entry.seq));
    }
    Ok((found, truncated, total))
}

/// [`query`] as the `QueryAudit` API answers it.
pub fn query_response(
    source: &(impl AuditSource + ?Sized),
    request: &QueryAuditRequest,
    hasher: &KeyHasher,
) -> Result<QueryAuditResponse, AuditError> {
    let (entries, truncated, total_entries) = query(source, request, hasher)?;
    Ok(QueryAuditResponse { entries, total_entries, truncated })
}

