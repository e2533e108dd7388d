//! The consumer side's durable state: this node's subscriptions to other departments' resources and
//! their inboxes, in one sled tree `inbox` so a delivered batch and the subscription's position move in
//! one atomic write.
//!
//! - Subscription: `'s' ‖ 0x00 ‖ resource code` → [`Subscription`] (`received_upto_seq`: every event up
//!   to it is in the inbox; `acked_upto_seq`: the department's application has processed up to it).
//! - Inbox entry: `'e' ‖ 0x00 ‖ resource code ‖ 0x00 ‖ first seq` → [`EventDelivery`] of consecutive
//!   events, as the provider sent them (already cut to this department's data items).
//!
//! Duplicates are dropped by event identity: a subscription's events come from one provider with
//! per-resource seqs, so "seq ≤ received_upto_seq" is exactly "already here" (a high-water mark in
//! place of a set of message ids, and as exact, since the provider sends in seq order without gaps).

use exchange_proto::v1::{RecordEvent, Subscription};
use prost::Message;

use crate::error::NodeError;
use crate::records::sled::{insert_log_entries, read_log, trim_log, LogError};

const TREE: &str = "inbox";

pub struct Inbox {
    tree: sled::Tree,
    /// Every change of a subscription record is read-modify-write; the delivery task (append) and the
    /// application (ack) would otherwise overwrite each other's positions.
    writer: std::sync::Mutex<()>,
}

fn sub_key(resource_code: &str) -> Vec<u8> {
    let mut k = b"s\0".to_vec();
    k.extend_from_slice(resource_code.as_bytes());
    k
}

fn log_prefix(resource_code: &str) -> Vec<u8> {
    let mut k = b"e\0".to_vec();
    k.extend_from_slice(resource_code.as_bytes());
    k.push(0);
    k
}

fn corrupt(e: impl std::fmt::Display) -> NodeError {
    NodeError::Store(format!("inbox: unreadable record: {e}"))
}

/// What happened to a delivered batch.
pub enum Appended {
    /// New events stored; the new high-water mark.
    Stored(u64),
    /// Every event was already in the inbox (a re-delivery after a lost acknowledgement).
    Duplicate(u64),
}

impl Inbox {
    pub fn open(db: &sled::Db) -> Result<Self, NodeError> {
        Ok(Inbox { tree: db.open_tree(TREE)?, writer: std::sync::Mutex::new(()) })
    }

    /// Holds inbox writes (deliveries, acknowledgements, subscription changes) back while a backup copies
    /// the tree.
    pub(crate) fn pause_writes(&self) -> std::sync::MutexGuard<'_, ()> {
        self.writer.lock().expect("inbox writer")
    }

    pub fn subscription(&self, resource_code: &str) -> Result<Option<Subscription>, NodeError> {
        match self.tree.get(sub_key(resource_code))? {
            Some(v) => Ok(Some(Subscription::decode(v.as_ref()).map_err(corrupt)?)),
            None => Ok(None),
        }
    }

    pub fn all(&self) -> Result<Vec<Subscription>, NodeError> {
        let mut out = Vec::new();
        for item in self.tree.scan_prefix(b"s\0") {
            let (_, v) = item?;
            out.push(Subscription::decode(v.as_ref()).map_err(corrupt)?);
        }
        Ok(out)
    }

    /// Stores a (new or re-made) subscription, dropping what an earlier subscription to the resource
    /// left in the inbox: its seqs would not continue the new one's. Durable before it returns.
    pub fn start(&self, sub: &Subscription) -> Result<(), NodeError> {
        let _writer = self.writer.lock().expect("inbox writer");
        let mut batch = sled::Batch::default();
        for key in self.tree.scan_prefix(log_prefix(&sub.resource_code)).keys() {
            batch.remove(key?);
        }
        batch.insert(sub_key(&sub.resource_code), sub.encode_to_vec());
        self.tree.apply_batch(batch)?;
        self.tree.flush()?;
        Ok(())
    }

    /// Marks the subscription ended for `reason`; returns it as it is now. Durable before it returns.
    pub fn end(&self, resource_code: &str, reason: &str) -> Result<Option<Subscription>, NodeError> {
        let _writer = self.writer.lock().expect("inbox writer");
        let Some(mut sub) = self.subscription(resource_code)? else { return Ok(None) };
        sub.active = false;
        sub.ended_reason = reason.to_string();
        self.tree.insert(sub_key(resource_code), sub.encode_to_vec())?;
        self.tree.flush()?;
        Ok(Some(sub))
    }

    /// Appends delivered events: drops those already here, refuses a gap, and stores the rest with the
    /// new high-water mark in one atomic write, durable before it returns (the provider is then told).
    pub fn append(&self, resource_code: &str, mut events: Vec<RecordEvent>, now_unix_ms: i64) -> Result<Appended, NodeError> {
        let _writer = self.writer.lock().expect("inbox writer");
        let Some(mut sub) = self.subscription(resource_code)? else {
            return Err(NodeError::NotFound(format!("no subscription to {resource_code}")));
        };
        let hwm = sub.received_upto_seq;
        events.retain(|e| e.seq > hwm);
        let Some(first) = events.first().map(|e| e.seq) else {
            return Ok(Appended::Duplicate(hwm));
        };
        if first != hwm + 1 {
            return Err(NodeError::DataLoss(format!(
                "the provider sent events of {resource_code} from seq {first}, but this node has them only up to {hwm}"
            )));
        }
        for (i, e) in events.iter().enumerate() {
            if e.seq != first + i as u64 {
                return Err(NodeError::DataLoss(format!(
                    "the provider sent events of {resource_code} out of order (seq {} at position {i})",
                    e.seq
                )));
            }
        }
        let last = first + events.len() as u64 - 1;
        sub.received_upto_seq = last;
        sub.last_delivery_unix_ms = now_unix_ms;
        let mut batch = sled::Batch::default();
        insert_log_entries(&mut batch, &log_prefix(resource_code), events);
        batch.insert(sub_key(resource_code), sub.encode_to_vec());
        self.tree.apply_batch(batch)?;
        self.tree.flush()?;
        Ok(Appended::Stored(last))
    }

    /// Up to `max` events after `after_seq`, as the inbox holds them.
    pub fn read_after(&self, sub: &Subscription, after_seq: u64, max: usize) -> Result<Vec<RecordEvent>, NodeError> {
        let code = &sub.resource_code;
        read_log(&self.tree, &log_prefix(code), sub.received_upto_seq, after_seq, max).map_err(|e| match e {
            LogError::Store(e) => NodeError::from(e),
            LogError::Trimmed { after_seq, first_kept } => NodeError::OutOfRange(format!(
                "events of {code} after seq {after_seq} were acknowledged and dropped from this node's inbox; \
                 it holds them from seq {first_kept}; resume from the last acknowledged seq (after_seq 0)"
            )),
            LogError::Corrupt(why) => corrupt(why),
        })
    }

    /// The application has processed every event up to `upto_seq`: keep that and drop them.
    pub fn ack(&self, resource_code: &str, upto_seq: u64) -> Result<u64, NodeError> {
        let _writer = self.writer.lock().expect("inbox writer");
        let Some(mut sub) = self.subscription(resource_code)? else {
            return Err(NodeError::NotFound(format!("this node has no subscription to {resource_code}")));
        };
        if upto_seq > sub.received_upto_seq {
            return Err(NodeError::invalid(
                "upto_seq",
                format!("{upto_seq} is beyond the last event received ({})", sub.received_upto_seq),
            ));
        }
        if upto_seq > sub.acked_upto_seq {
            sub.acked_upto_seq = upto_seq;
            self.tree.insert(sub_key(resource_code), sub.encode_to_vec())?;
            trim_log(&self.tree, &log_prefix(resource_code), sub.received_upto_seq, upto_seq)?;
            self.tree.flush()?;
        }
        Ok(sub.acked_upto_seq)
    }
}

#[cfg(test)]
mod tests {
    use exchange_proto::v1::Record;

    use super::*;

    fn events(from: u64, to: u64) -> Vec<RecordEvent> {
        (from..=to)
            .map(|seq| RecordEvent {
                seq,
                kind: 1,
                record: Some(Record { key: format!("K{seq}"), version: seq, ..Default::default() }),
                published_at_unix_ms: 0,
            })
            .collect()
    }

    fn sub(code: &str, start: u64) -> Subscription {
        Subscription {
            resource_code: code.into(),
            provider_code: "commerce".into(),
            received_upto_seq: start,
            acked_upto_seq: start,
            start_seq: start,
            active: true,
            ..Default::default()
        }
    }

    #[test]
    fn duplicates_are_dropped_gaps_refused_and_acks_trim() {
        let dir = tempfile::tempdir().unwrap();
        let db = crate::store::open_db_waiting(dir.path(), std::time::Duration::from_secs(10)).unwrap();
        let inbox = Inbox::open(&db).unwrap();
        let code = "101001/000001";
        inbox.start(&sub(code, 10)).unwrap();
        assert!(matches!(inbox.append(code, events(11, 20), 1).unwrap(), Appended::Stored(20)));
        // A re-delivery overlapping what is here: only the new part is kept.
        assert!(matches!(inbox.append(code, events(15, 25), 2).unwrap(), Appended::Stored(25)));
        assert!(matches!(inbox.append(code, events(11, 25), 3).unwrap(), Appended::Duplicate(25)));
        // A gap is refused and nothing is stored.
        assert!(matches!(inbox.append(code, events(27, 30), 4), Err(NodeError::DataLoss(_))));
        let s = inbox.subscription(code).unwrap().unwrap();
        assert_eq!(s.received_upto_seq, 25);
        let all = inbox.read_after(&s, 10, 100).unwrap();
        assert_eq!(all.iter().map(|e| e.seq).collect::<Vec<_>>(), (11..=25).collect::<Vec<_>>());
        assert_eq!(inbox.read_after(&s, 18, 3).unwrap().iter().map(|e| e.seq).collect::<Vec<_>>(), vec![19, 20, 21]);

        // Acknowledging beyond what arrived is refused; acknowledging drops whole entries.
        assert!(matches!(inbox.ack(code, 26), Err(NodeError::InvalidArgument(_))));
        assert_eq!(inbox.ack(code, 20).unwrap(), 20);
        let s = inbox.subscription(code).unwrap().unwrap();
        assert!(matches!(inbox.read_after(&s, 10, 100), Err(NodeError::OutOfRange(_))));
        assert_eq!(inbox.read_after(&s, 20, 100).unwrap().len(), 5);
        assert_eq!(inbox.ack(code, 18).unwrap(), 20, "an older ack does not move back");
    }

    #[test]
    fn a_new_subscription_clears_what_an_old_one_left_and_state_survives_reopening() {
        let dir = tempfile::tempdir().unwrap();
        let code = "101001/000001";
        {
            let db = crate::store::open_db_waiting(dir.path(), std::time::Duration::from_secs(10)).unwrap();
            let inbox = Inbox::open(&db).unwrap();
            inbox.start(&sub(code, 0)).unwrap();
            inbox.append(code, events(1, 5), 1).unwrap();
        }
        let db = crate::store::open_db_waiting(dir.path(), std::time::Duration::from_secs(10)).unwrap();
        let inbox = Inbox::open(&db).unwrap();
        let s = inbox.subscription(code).unwrap().unwrap();
        assert_eq!(s.received_upto_seq, 5);
        assert_eq!(inbox.read_after(&s, 0, 10).unwrap().len(), 5);
        inbox.start(&sub(code, 100)).unwrap();
        let s = inbox.subscription(code).unwrap().unwrap();
        assert!(inbox.read_after(&s, 100, 10).unwrap().is_empty());
        assert!(matches!(inbox.append(code, events(101, 101), 2).unwrap(), Appended::Stored(101)));
        assert_eq!(inbox.all().unwrap().len(), 1);
    }
}
