//! The in-process event bus: the change stream publishes each project's committed events here,
//! in commit order; realtime rooms, the webhook outbox and tests subscribe.
//!
//! ```text
//!  change stream ──publish(Arc<Event>)──► ProjectBus ──► bounded queue ─► subscriber (rooms, tests)
//!                                            │      └──► bounded queue ─► durable subscriber ─► ack(end_lsn)
//!                                            │           (waits for room: backpressure)
//!                                            └── confirmable(): how far the slot may be confirmed
//! ```
//!
//! The contract for subscribers:
//! * Events arrive in commit order; a transaction's events are consecutive and the last one has
//!   `last_in_transaction`. Each event is serialized once and shared (`Arc`).
//! * Delivery is at-least-once: after a restart the stream resumes from the slot's confirmed
//!   position and may repeat events. Event ids are stable (commit LSN + index in the
//!   transaction), so duplicates can be dropped by id.
//! * Queues are bounded. An ordinary subscriber (a realtime room, a test) that falls behind by a
//!   whole queue is cut off: its queue closes and `closed_reason` says why. Publishing never
//!   waits for it, so one slow socket never stalls the stream or the others.
//! * A durable subscriber (the webhook outbox) acknowledges the `end_lsn` of each transaction
//!   once it has stored it. The slot is confirmed only up to the lowest acknowledgement of the
//!   durable subscribers, so what they have not stored is replayed after a restart. Durable
//!   subscribers are part of the pipeline rather than its audience: when one's queue is full
//!   the stream waits (backpressure) instead of dropping it. When a durable subscriber joins,
//!   the stream rewinds to the slot's confirmed position so that it receives what it missed.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use fluxbase_replication::pgoutput::Lsn;
use tokio::sync::{mpsc, Notify};

/// Queue length of an ordinary subscriber, in events.
pub const QUEUE_LEN: usize = 4096;
/// Queue length of a durable subscriber, in events.
pub const DURABLE_QUEUE_LEN: usize = 65_536;

/// What kind of change an event reports.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum EventKind {
    /// A row change: `INSERT`, `UPDATE` or `DELETE`.
    Row { operation: &'static str },
    /// A DDL command or a TRUNCATE.
    Schema { command: String },
    /// A custom broadcast from SQL (`realtime.broadcast(event, payload)`); `payload` holds
    /// `{"event", "payload"}`. Realtime rooms deliver it; webhooks ignore it.
    Broadcast { event: String },
}

/// One committed change, ready for every consumer.
#[derive(Debug)]
pub struct Event {
    /// `<commit LSN, 16 hex>-<index in the transaction, 8 hex>`: stable and sortable.
    pub id: String,
    pub kind: EventKind,
    pub schema: Option<String>,
    pub table: Option<String>,
    /// The new row (the deleted row for DELETE), as a JSON object; `None` for schema events.
    pub record: Option<String>,
    /// The old row (or its key), as a JSON object, when PostgreSQL sent it.
    pub old: Option<String>,
    /// Columns left out of `record`: their TOASTed value did not change and no old row gave it
    /// (replica identity other than FULL). Every channel names them (`unchangedToast`).
    pub unchanged_toast: Vec<String>,
    /// RFC 3339 commit time.
    pub commit_timestamp: String,
    pub commit_lsn: Lsn,
    /// The transaction's end LSN: what a consumer acknowledges.
    pub end_lsn: Lsn,
    pub last_in_transaction: bool,
    /// The guide's payload object (`db_event` or `schema_update`), serialized once.
    pub payload: Arc<str>,
}

/// A subscriber's end of the bus.
pub struct Subscription {
    pub events: mpsc::Receiver<Arc<Event>>,
    id: u64,
    bus: Arc<ProjectBus>,
    closed_reason: Arc<Mutex<Option<String>>>,
}

impl Subscription {
    /// Why the bus cut this subscriber off, once `events` has closed.
    pub fn closed_reason(&self) -> Option<String> {
        self.closed_reason.lock().expect("poisoned").clone()
    }

    /// Durable subscribers: everything up to `end_lsn` is stored.
    pub fn ack(&self, end_lsn: Lsn) {
        let mut subs = self.bus.subscribers.lock().expect("poisoned");
        if let Some(s) = subs.iter_mut().find(|s| s.id == self.id) {
            if s.acked.is_none_or(|a| a < end_lsn) {
                s.acked = Some(end_lsn);
            }
        }
    }
}

impl Drop for Subscription {
    fn drop(&mut self) {
        self.bus
            .subscribers
            .lock()
            .expect("poisoned")
            .retain(|s| s.id != self.id);
    }
}

struct Subscriber {
    id: u64,
    tx: mpsc::Sender<Arc<Event>>,
    durable: bool,
    /// Durable only: the highest end LSN stored.
    acked: Option<Lsn>,
    closed_reason: Arc<Mutex<Option<String>>>,
}

/// The bus of one project.
pub struct ProjectBus {
    subscribers: Mutex<Vec<Subscriber>>,
    next_id: AtomicU64,
    /// End LSN of the last transaction published.
    published: AtomicU64,
    /// Wakes the change stream to restart from the slot (a durable subscriber needs a replay).
    pub rewind: Notify,
    /// Counts rewind requests, so a stream that started after one ignores its stale wake-up.
    rewinds: AtomicU64,
    pub published_events: AtomicU64,
}

impl ProjectBus {
    fn new() -> ProjectBus {
        ProjectBus {
            subscribers: Mutex::new(Vec::new()),
            next_id: AtomicU64::new(1),
            published: AtomicU64::new(0),
            rewind: Notify::new(),
            rewinds: AtomicU64::new(0),
            published_events: AtomicU64::new(0),
        }
    }

    fn subscribe_inner(self: &Arc<Self>, durable: bool) -> Subscription {
        let (tx, rx) = mpsc::channel(if durable {
            DURABLE_QUEUE_LEN
        } else {
            QUEUE_LEN
        });
        let id = self.next_id.fetch_add(1, Ordering::Relaxed);
        let closed_reason = Arc::new(Mutex::new(None));
        self.subscribers.lock().expect("poisoned").push(Subscriber {
            id,
            tx,
            durable,
            acked: None,
            closed_reason: closed_reason.clone(),
        });
        if durable {
            // Replay from the slot so that nothing since its confirmed position is missed.
            self.rewinds.fetch_add(1, Ordering::AcqRel);
            self.rewind.notify_one();
        }
        Subscription {
            events: rx,
            id,
            bus: self.clone(),
            closed_reason,
        }
    }

    /// An ordinary subscriber: live events from now on.
    pub fn subscribe(self: &Arc<Self>) -> Subscription {
        self.subscribe_inner(false)
    }

    /// A durable subscriber: the slot is not confirmed past what it acknowledges, and the stream
    /// replays from the slot's confirmed position when it joins.
    pub fn subscribe_durable(self: &Arc<Self>) -> Subscription {
        self.subscribe_inner(true)
    }

    /// Hands an event to every subscriber. Ordinary subscribers never make it wait: one whose
    /// queue is full is cut off. Durable subscribers are part of the pipeline's durability (the
    /// slot cannot move past what they have not stored), so the stream waits for room in their
    /// queue instead: they apply backpressure, they are never dropped.
    pub async fn publish(&self, event: Arc<Event>) {
        let mut durable = Vec::new();
        {
            let mut subs = self.subscribers.lock().expect("poisoned");
            subs.retain_mut(|s| {
                if s.durable {
                    durable.push(s.tx.clone());
                    return true;
                }
                match s.tx.try_send(event.clone()) {
                    Ok(()) => true,
                    Err(mpsc::error::TrySendError::Full(_)) => {
                        let why = format!(
                            "subscriber fell more than {} events behind and was disconnected",
                            s.tx.max_capacity()
                        );
                        tracing::warn!("{why}");
                        *s.closed_reason.lock().expect("poisoned") = Some(why);
                        false
                    }
                    Err(mpsc::error::TrySendError::Closed(_)) => false,
                }
            });
        }
        for tx in durable {
            // A closed queue means the subscriber is gone; its Drop removes it.
            let _ = tx.send(event.clone()).await;
        }
        if event.last_in_transaction {
            self.published.store(event.end_lsn.0, Ordering::Release);
        }
        self.published_events.fetch_add(1, Ordering::Relaxed);
    }

    /// The rewind requests so far; a stream notes it when it (re)starts from the slot.
    pub fn rewind_generation(&self) -> u64 {
        self.rewinds.load(Ordering::Acquire)
    }

    /// How far the slot may be confirmed: the lowest durable acknowledgement, or everything
    /// published when there is no durable subscriber. `None`: nothing may be confirmed yet.
    pub fn confirmable(&self) -> Option<Lsn> {
        let published = Lsn(self.published.load(Ordering::Acquire));
        let subs = self.subscribers.lock().expect("poisoned");
        let mut bound: Option<Lsn> = (published.0 > 0).then_some(published);
        for s in subs.iter().filter(|s| s.durable) {
            match s.acked {
                None => return None,
                Some(a) => bound = Some(bound.map_or(a, |b| b.min(a))),
            }
        }
        bound
    }

    /// True when every durable subscriber has acknowledged everything published.
    pub fn all_acked(&self) -> bool {
        let published = Lsn(self.published.load(Ordering::Acquire));
        self.subscribers
            .lock()
            .expect("poisoned")
            .iter()
            .filter(|s| s.durable)
            .all(|s| s.acked.is_some_and(|a| a >= published))
    }

    pub fn subscriber_count(&self) -> usize {
        self.subscribers.lock().expect("poisoned").len()
    }
}

/// All projects' buses.
#[derive(Default)]
pub struct Bus {
    projects: Mutex<HashMap<String, Arc<ProjectBus>>>,
}

impl Bus {
    pub fn project(&self, project_id: &str) -> Arc<ProjectBus> {
        self.projects
            .lock()
            .expect("poisoned")
            .entry(project_id.to_string())
            .or_insert_with(|| Arc::new(ProjectBus::new()))
            .clone()
    }

    pub fn remove(&self, project_id: &str) {
        self.projects.lock().expect("poisoned").remove(project_id);
    }
}
