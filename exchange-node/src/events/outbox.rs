//! The provider side's subscription table: who subscribed to which of this department's resources, and
//! how far each has acknowledged. The events themselves are the resource's change log in the record
//! store ([`crate::records::RecordStore::events_after`]): one log per resource with a cursor per
//! subscriber is the outbox, without a copy of each event per subscriber.
//!
//! Tree `outbox_subscriptions`: `consumer department ‖ 0x00 ‖ resource code` → [`Subscription`]
//! (`received_upto_seq` = acknowledged by the consumer's node).

use std::collections::HashMap;
use std::sync::Mutex;

use exchange_proto::v1::Subscription;
use prost::Message;
use tokio::sync::watch;

use crate::error::NodeError;

const TREE: &str = "outbox_subscriptions";

/// What is known of a subscription only while the node runs.
#[derive(Clone, Debug, Default)]
pub struct Live {
    pub connected: bool,
    pub last_delivery_unix_ms: i64,
    pub last_error: String,
}

pub struct Outbox {
    tree: sled::Tree,
    /// Subscription records are read-modify-write (acknowledgements, ends): one at a time, or an
    /// acknowledgement could bring an ended subscription back.
    writer: Mutex<()>,
    /// Resource → its latest seq, so open streams wake when something is published.
    heads: Mutex<HashMap<String, watch::Sender<u64>>>,
    live: Mutex<HashMap<(String, String), Live>>,
}

fn key(consumer: &str, resource_code: &str) -> Vec<u8> {
    let mut k = Vec::with_capacity(consumer.len() + resource_code.len() + 1);
    k.extend_from_slice(consumer.as_bytes());
    k.push(0);
    k.extend_from_slice(resource_code.as_bytes());
    k
}

fn corrupt(e: impl std::fmt::Display) -> NodeError {
    NodeError::Store(format!("outbox_subscriptions: unreadable record: {e}"))
}

impl Outbox {
    pub fn open(db: &sled::Db) -> Result<Self, NodeError> {
        Ok(Outbox { tree: db.open_tree(TREE)?, writer: Mutex::new(()), heads: Mutex::default(), live: Mutex::default() })
    }

    /// Holds subscription writes (acknowledgements, new and ended subscriptions) back while a backup
    /// copies the table.
    pub(crate) fn pause_writes(&self) -> std::sync::MutexGuard<'_, ()> {
        self.writer.lock().expect("outbox writer")
    }

    pub fn get(&self, consumer: &str, resource_code: &str) -> Result<Option<Subscription>, NodeError> {
        match self.tree.get(key(consumer, resource_code))? {
            Some(v) => Ok(Some(Subscription::decode(v.as_ref()).map_err(corrupt)?)),
            None => Ok(None),
        }
    }

    /// Saves a subscription; with `durable`, flushed before it returns (a new subscription: the outbox
    /// must keep events for it from its start on, across a crash).
    pub fn put(&self, sub: &Subscription, durable: bool) -> Result<(), NodeError> {
        let _writer = self.writer.lock().expect("outbox writer");
        self.tree.insert(key(&sub.consumer_code, &sub.resource_code), sub.encode_to_vec())?;
        if durable {
            self.tree.flush()?;
        }
        Ok(())
    }

    /// Changes a subscription in place; `change` says whether it changed anything. Returns the
    /// subscription as it is now.
    pub fn update(
        &self,
        consumer: &str,
        resource_code: &str,
        durable: bool,
        change: impl FnOnce(&mut Subscription) -> bool,
    ) -> Result<Option<Subscription>, NodeError> {
        let _writer = self.writer.lock().expect("outbox writer");
        let Some(mut sub) = self.get(consumer, resource_code)? else { return Ok(None) };
        if change(&mut sub) {
            self.tree.insert(key(consumer, resource_code), sub.encode_to_vec())?;
            if durable {
                self.tree.flush()?;
            }
        }
        Ok(Some(sub))
    }

    pub fn all(&self) -> Result<Vec<Subscription>, NodeError> {
        let mut out = Vec::new();
        for item in self.tree.iter() {
            let (_, v) = item?;
            out.push(Subscription::decode(v.as_ref()).map_err(corrupt)?);
        }
        Ok(out)
    }

    /// The lowest acknowledged seq of the resource's active subscriptions (`None`: there are none):
    /// the change log is kept from there on.
    pub fn low_water(&self, resource_code: &str) -> Result<Option<u64>, NodeError> {
        Ok(self
            .all()?
            .into_iter()
            .filter(|s| s.active && s.resource_code == resource_code)
            .map(|s| s.received_upto_seq)
            .min())
    }

    /// Follows the resource's latest seq (`current` is the value known now).
    pub fn head_watch(&self, resource_code: &str, current: u64) -> watch::Receiver<u64> {
        let mut heads = self.heads.lock().expect("outbox heads");
        heads
            .entry(resource_code.to_string())
            .or_insert_with(|| watch::channel(current).0)
            .subscribe()
    }

    pub fn notify_head(&self, resource_code: &str, head: u64) {
        let heads = self.heads.lock().expect("outbox heads");
        if let Some(tx) = heads.get(resource_code) {
            tx.send_if_modified(|h| {
                let newer = head > *h;
                *h = (*h).max(head);
                newer
            });
        }
    }

    pub fn live(&self, consumer: &str, resource_code: &str) -> Live {
        self.live
            .lock()
            .expect("outbox live")
            .get(&(consumer.to_string(), resource_code.to_string()))
            .cloned()
            .unwrap_or_default()
    }

    pub fn update_live(&self, consumer: &str, resource_code: &str, f: impl FnOnce(&mut Live)) {
        let mut live = self.live.lock().expect("outbox live");
        f(live.entry((consumer.to_string(), resource_code.to_string())).or_default());
    }
}
