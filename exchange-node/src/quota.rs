//! Per-consumer, per-resource rate limits set by the provider department (governor), read from the
//! node's config and swappable at run time, so a reload changes limits without a restart.
//!
//! A rule names a consumer department and a resource code (either may be `*`); the most specific rule
//! that matches a call applies: exact pair, then consumer with any resource, then any consumer with the
//! resource, then `*`/`*`. No matching rule means no limit. Each concrete (consumer, resource) pair gets
//! its own bucket, created on first use; pairs come from authenticated callers and published resources,
//! and [`QuotaTable::retain_recent`] drops idle buckets so the table cannot grow without bound (the
//! governor pitfall of keyed limiters).
//!
//! Issue 3 wires this into the provider side of the relay (RESOURCE_EXHAUSTED with RetryInfo).

use std::collections::HashMap;
use std::num::NonZeroU32;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, RwLock};
use std::time::{Duration, Instant};

use governor::clock::{Clock, DefaultClock};
use governor::{DefaultDirectRateLimiter, Quota, RateLimiter};
use serde::Deserialize;

/// One `[[quotas]]` table of the node config.
#[derive(Clone, Debug, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct QuotaRule {
    /// Consumer department code, or `*`.
    pub consumer: String,
    /// Resource code, or `*`.
    pub resource: String,
    /// Sustained requests per second.
    pub per_second: u32,
    /// Requests allowed at once above the sustained rate (default: `per_second`).
    #[serde(default)]
    pub burst: Option<u32>,
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum QuotaError {
    #[error("quotas[{index}]: {reason}")]
    Invalid { index: usize, reason: String },
}

struct Bucket {
    limiter: DefaultDirectRateLimiter,
    /// Milliseconds since the table's start at the last check, for [`QuotaTable::retain_recent`].
    last_used_ms: AtomicU64,
}

/// The rules and their buckets. Cheap to share; `replace_rules` is the reload.
pub struct QuotaTable {
    inner: RwLock<Inner>,
    clock: DefaultClock,
    started: Instant,
}

struct Inner {
    rules: HashMap<(String, String), Quota>,
    buckets: HashMap<(String, String), Arc<Bucket>>,
}

fn compile(rules: &[QuotaRule]) -> Result<HashMap<(String, String), Quota>, QuotaError> {
    let mut out = HashMap::new();
    for (index, r) in rules.iter().enumerate() {
        let invalid = |reason: String| QuotaError::Invalid { index, reason };
        let rate = NonZeroU32::new(r.per_second).ok_or_else(|| invalid("per_second must be at least 1".into()))?;
        let burst = NonZeroU32::new(r.burst.unwrap_or(r.per_second))
            .ok_or_else(|| invalid("burst must be at least 1".into()))?;
        if r.consumer.is_empty() || r.resource.is_empty() {
            return Err(invalid("consumer and resource must be set (use \"*\" for any)".into()));
        }
        let key = (r.consumer.clone(), r.resource.clone());
        if out.insert(key, Quota::per_second(rate).allow_burst(burst)).is_some() {
            return Err(invalid(format!("a second rule for consumer {:?} and resource {:?}", r.consumer, r.resource)));
        }
    }
    Ok(out)
}

impl QuotaTable {
    pub fn new(rules: &[QuotaRule]) -> Result<Self, QuotaError> {
        Ok(QuotaTable {
            inner: RwLock::new(Inner { rules: compile(rules)?, buckets: HashMap::new() }),
            clock: DefaultClock::default(),
            started: Instant::now(),
        })
    }

    /// Replaces the rules (a config reload). Buckets restart full under the new limits; a bad rule set
    /// is refused whole and the old one stays.
    pub fn replace_rules(&self, rules: &[QuotaRule]) -> Result<(), QuotaError> {
        let compiled = compile(rules)?;
        let mut inner = self.inner.write().expect("quota lock");
        inner.rules = compiled;
        inner.buckets.clear();
        Ok(())
    }

    /// Takes one request from the (consumer, resource) bucket; `Err(wait)` says when to retry.
    pub fn check(&self, consumer: &str, resource: &str) -> Result<(), Duration> {
        let key = (consumer.to_string(), resource.to_string());
        let bucket = {
            let inner = self.inner.read().expect("quota lock");
            match inner.buckets.get(&key) {
                Some(b) => Some(b.clone()),
                None if Self::rule_for(&inner.rules, consumer, resource).is_none() => return Ok(()),
                None => None,
            }
        };
        let bucket = match bucket {
            Some(b) => b,
            None => {
                let mut inner = self.inner.write().expect("quota lock");
                let Some(quota) = Self::rule_for(&inner.rules, consumer, resource) else { return Ok(()) };
                inner
                    .buckets
                    .entry(key)
                    .or_insert_with(|| Arc::new(Bucket { limiter: RateLimiter::direct(quota), last_used_ms: AtomicU64::new(0) }))
                    .clone()
            }
        };
        bucket.last_used_ms.store(self.started.elapsed().as_millis() as u64, Ordering::Relaxed);
        bucket.limiter.check().map_err(|not_until| not_until.wait_time_from(self.clock.now()))
    }

    fn rule_for(rules: &HashMap<(String, String), Quota>, consumer: &str, resource: &str) -> Option<Quota> {
        [(consumer, resource), (consumer, "*"), ("*", resource), ("*", "*")]
            .iter()
            .find_map(|(c, r)| rules.get(&(c.to_string(), r.to_string())).copied())
    }

    /// Drops buckets unused for `idle` (pick at least the longest refill time, burst / rate, so a
    /// dropped bucket would have been full anyway); call it periodically.
    pub fn retain_recent(&self, idle: Duration) {
        let now_ms = self.started.elapsed().as_millis() as u64;
        let idle_ms = idle.as_millis() as u64;
        let mut inner = self.inner.write().expect("quota lock");
        inner.buckets.retain(|_, b| now_ms.saturating_sub(b.last_used_ms.load(Ordering::Relaxed)) < idle_ms);
    }

    /// Buckets in use (for metrics and tests).
    pub fn bucket_count(&self) -> usize {
        self.inner.read().expect("quota lock").buckets.len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rule(consumer: &str, resource: &str, per_second: u32, burst: u32) -> QuotaRule {
        QuotaRule { consumer: consumer.into(), resource: resource.into(), per_second, burst: Some(burst) }
    }

    #[test]
    fn exceeding_a_quota_says_when_to_retry() {
        let table = QuotaTable::new(&[rule("tax", "101001/000001", 1, 3)]).unwrap();
        for _ in 0..3 {
            assert_eq!(table.check("tax", "101001/000001"), Ok(()));
        }
        let wait = table.check("tax", "101001/000001").unwrap_err();
        assert!(wait > Duration::ZERO && wait <= Duration::from_secs(1), "{wait:?}");
        // Other pairs are not affected; no rule means no limit.
        assert_eq!(table.check("quality", "101001/000001"), Ok(()));
        for _ in 0..100 {
            assert_eq!(table.check("tax", "104001/000001"), Ok(()));
        }
    }

    #[test]
    fn the_most_specific_rule_applies() {
        let table = QuotaTable::new(&[rule("*", "*", 1, 1), rule("tax", "*", 1, 5), rule("tax", "101001/000001", 1, 2)])
            .unwrap();
        let allowed = |c: &str, r: &str| (0..10).take_while(|_| table.check(c, r).is_ok()).count();
        assert_eq!(allowed("tax", "101001/000001"), 2);
        assert_eq!(allowed("tax", "104001/000001"), 5);
        assert_eq!(allowed("quality", "104001/000001"), 1);
    }

    #[test]
    fn reload_changes_limits_and_a_bad_rule_set_keeps_the_old_one() {
        let table = QuotaTable::new(&[rule("tax", "*", 1, 1)]).unwrap();
        assert!(table.check("tax", "x").is_ok());
        assert!(table.check("tax", "x").is_err());
        table.replace_rules(&[rule("tax", "*", 1, 3)]).unwrap();
        assert_eq!((0..10).take_while(|_| table.check("tax", "x").is_ok()).count(), 3);
        let bad = [rule("tax", "*", 0, 1)];
        assert_eq!(table.replace_rules(&bad), Err(QuotaError::Invalid { index: 0, reason: "per_second must be at least 1".into() }));
        assert!(table.check("tax", "x").is_err(), "old limits still apply");
        let dup = [rule("tax", "*", 1, 1), rule("tax", "*", 2, 2)];
        assert!(matches!(table.replace_rules(&dup), Err(QuotaError::Invalid { index: 1, .. })));
    }

    #[test]
    fn idle_buckets_are_dropped() {
        let table = QuotaTable::new(&[rule("*", "*", 10, 10)]).unwrap();
        for consumer in ["tax", "quality", "commerce"] {
            table.check(consumer, "101001/000001").unwrap();
        }
        assert_eq!(table.bucket_count(), 3);
        table.retain_recent(Duration::from_secs(60));
        assert_eq!(table.bucket_count(), 3, "recently used buckets stay");
        std::thread::sleep(Duration::from_millis(30));
        table.check("tax", "101001/000001").unwrap();
        table.retain_recent(Duration::from_millis(20));
        assert_eq!(table.bucket_count(), 1, "only the bucket used since stays");
    }
}
