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
//!   the stream rewinds to the slot's confirmed position so that it receives what it missed,
//!   and it receives nothing of the pass that was running when it joined: that pass may be past
//!   what an earlier subscriber (a publisher's previous term) received and never stored, and
//!   a subscriber that dropped replays by id would then skip what lies in between.
//!
//! The boundary is the pair of traits [`EventBus`] (the projects' channels) and
//! [`ProjectChannel`] (one project's publish/subscribe, with the contract above in its docs),
//! so that a cross-node transport (e.g. NATS JetStream) can take the in-process bus's place.
//! The change stream is written against the traits; [`Bus`] and [`ProjectBus`] are the
//! in-process implementation. Both are used through generics (no `dyn` on the publish path);
//! a subscriber's end, [`Subscription`], is the same for every transport: a bounded queue of
//! events, and a link back to the transport for acknowledgements and unsubscribing.

use std::collections::HashMap;
use std::future::Future;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use fluxbase_replication::pgoutput::Lsn;
use tokio::sync::{mpsc, Notify, Semaphore};

/// Queue length of an ordinary subscriber, in events.
pub const QUEUE_LEN: usize = 4096;
/// Queue length of a durable subscriber, in events. The stream waits for room (backpressure),
/// so a longer queue buys no throughput, only memory: each queued event holds its row twice
/// (`record` and `payload`), and a large transaction released at once would otherwise sit
/// here in memory, past the bound its spill file kept it to (65,536 events of a 2 kB row were
/// ~300 MiB). Two of the realtime pump's batches.
pub const DURABLE_QUEUE_LEN: usize = 2048;
/// Events a publisher hands to a durable subscriber's queue at a time: it waits until there is
/// room for that many (a quarter of the queue), not for each free slot.
pub const DURABLE_RUN: usize = DURABLE_QUEUE_LEN / 4;
/// Bytes of events ([`Event::held_bytes`], counted in whole KiB) a durable subscriber's queue
/// holds at most, besides its length: 2,048 events of rows near `cdc_max_row_bytes` (16 MiB)
/// would otherwise be 32 GiB. The publisher waits for room as it waits for free slots; an event
/// larger than the whole bound goes alone. Small events never meet it (2,048 × 1 KiB is 2 MiB).
pub const DURABLE_QUEUE_BYTES: usize = 16 << 20;

/// The operation of a row change.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, serde::Serialize, serde::Deserialize)]
pub enum RowOp {
    Insert,
    Update,
    Delete,
}

impl RowOp {
    /// The guide's name: `INSERT`, `UPDATE` or `DELETE`.
    pub fn as_str(self) -> &'static str {
        match self {
            RowOp::Insert => "INSERT",
            RowOp::Update => "UPDATE",
            RowOp::Delete => "DELETE",
        }
    }

    /// The operation of a guide's name (upper case), if it is one.
    pub fn from_name(name: &str) -> Option<RowOp> {
        match name {
            "INSERT" => Some(RowOp::Insert),
            "UPDATE" => Some(RowOp::Update),
            "DELETE" => Some(RowOp::Delete),
            _ => None,
        }
    }
}

impl std::fmt::Display for RowOp {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// What kind of change an event reports.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum EventKind {
    /// A row change.
    Row { operation: RowOp },
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
    /// Shared by the events of a table (the change stream makes them once per relation).
    pub schema: Option<Arc<str>>,
    pub table: Option<Arc<str>>,
    /// The new row (the deleted row for DELETE), as a JSON object; none for schema events.
    /// Read it with [`Event::record`].
    pub record: RowImage,
    /// The old row (or its key), as a JSON object, when PostgreSQL sent it ([`Event::old`]).
    pub old: RowImage,
    /// Columns left out of `record`: their TOASTed value did not change and no old row gave it
    /// (replica identity other than FULL). Every channel names them (`unchangedToast`).
    pub unchanged_toast: Vec<String>,
    /// Columns left out of `record` and `old` because a row image would pass
    /// `cdc_max_row_bytes` with them. Every channel names them (`tooLarge`).
    pub too_large: Vec<String>,
    /// A PostgreSQL row change: its table's OID. Realtime row-level security judges the change
    /// by that table, never by another that took its name since (red team rt10 MEDIUM 3).
    /// `None`: MySQL, and events stored or relayed before it was kept (judged by name).
    pub relation: Option<u32>,
    /// A row change: the row's replica identity key as a JSON object (`{"id":1}`), when its
    /// table has one that names the row ([`crate::cdc::events::identity_key`]). Webhook
    /// ordering uses it; it is not part of any payload, and events that crossed the cluster's
    /// stream do not carry it (`None`: the table's changes are ordered as one row's).
    pub row_key: Option<String>,
    /// RFC 3339 commit time (shared by the events of a transaction).
    pub commit_timestamp: Arc<str>,
    pub commit_lsn: Lsn,
    /// The transaction's end LSN: what a consumer acknowledges.
    pub end_lsn: Lsn,
    pub last_in_transaction: bool,
    /// The guide's payload object (`db_event` or `schema_update`), serialized once.
    pub payload: Arc<str>,
    /// A client broadcast relayed through the cluster's stream back to the node it came from:
    /// the socket that sent it, which does not get its own broadcast. `None` otherwise.
    pub sender: Option<u64>,
    /// Cluster mode: the cluster's stream no longer held some events just before this one when
    /// this node read it (its consumer fell behind the stream's retention): the room's history
    /// records a gap here, so that no resume passes over it silently.
    pub gap_before: bool,
    /// A row change made by the change stream (`cdc::events::finish`), whose `payload` holds
    /// every field above but `end_lsn`, `last_in_transaction`, `row_key`, `sender` and
    /// `gap_before`, exactly as they are ([`crate::cdc::events::payload_is_finished`]): the
    /// realtime history then stores the payload alone. False for anything else (and for an
    /// event whose fields were changed after it was made).
    pub payload_whole: bool,
}

/// A row image of an [`Event`]: its JSON object text, held by the event itself, or a range of
/// the event's payload that holds it verbatim (the change stream's events, whose payload
/// [`crate::cdc::events::finish`] writes with the rows in it: the event then holds each row
/// once, not twice).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub enum RowImage {
    #[default]
    None,
    Own(String),
    /// Bytes `start..end` of the event's payload.
    InPayload {
        start: u32,
        end: u32,
    },
}

impl From<Option<String>> for RowImage {
    fn from(image: Option<String>) -> RowImage {
        image.map_or(RowImage::None, RowImage::Own)
    }
}

impl RowImage {
    /// The image's text, read from `payload` when it lies there (`None` when there is no
    /// image, or when the range is not one of `payload`'s: an event whose payload was replaced).
    pub fn get<'a>(&'a self, payload: &'a str) -> Option<&'a str> {
        match self {
            RowImage::None => None,
            RowImage::Own(text) => Some(text),
            RowImage::InPayload { start, end } => payload.get(*start as usize..*end as usize),
        }
    }

    pub fn is_some(&self) -> bool {
        !matches!(self, RowImage::None)
    }
}

impl Event {
    /// The new row (the deleted row for DELETE) as a JSON object; `None` for other events.
    pub fn record(&self) -> Option<&str> {
        self.record.get(&self.payload)
    }

    /// The old row (or its key) as a JSON object, when the database sent it.
    pub fn old(&self) -> Option<&str> {
        self.old.get(&self.payload)
    }

    /// The bytes of text it holds: its payload and the row images it keeps beside it.
    pub fn held_bytes(&self) -> usize {
        let own = |image: &RowImage| match image {
            RowImage::Own(text) => text.len(),
            _ => 0,
        };
        self.payload.len() + own(&self.record) + own(&self.old)
    }
}

/// What an event counts against a durable queue's [`DURABLE_QUEUE_BYTES`], in KiB (at least 1,
/// at most the whole bound).
fn queue_kib(event: &Event) -> usize {
    event
        .held_bytes()
        .div_ceil(1024)
        .clamp(1, DURABLE_QUEUE_BYTES / 1024)
}

/// `events` in consecutive runs of at most `run` events and at most the whole byte bound each (a
/// run must fit the bound to ever find room in it).
fn by_room(events: &[Arc<Event>], run: usize) -> impl Iterator<Item = &[Arc<Event>]> {
    let mut rest = events;
    std::iter::from_fn(move || {
        if rest.is_empty() {
            return None;
        }
        let mut kib = 0;
        let mut n = 0;
        while n < rest.len().min(run) {
            let k = queue_kib(&rest[n]);
            if n > 0 && kib + k > DURABLE_QUEUE_BYTES / 1024 {
                break;
            }
            kib += k;
            n += 1;
        }
        let (chunk, tail) = rest.split_at(n);
        rest = tail;
        Some(chunk)
    })
}

/// The publish/subscribe boundary of one project: what the change stream publishes to and
/// consumers subscribe to. A transport implements it with this contract:
/// * **Order.** Events are delivered to each subscriber in the order they were published (commit
///   order); a transaction's events are consecutive and the last has `last_in_transaction`.
/// * **At-least-once, stable ids.** A subscriber may see an event again after a restart or a
///   rewind, never with another id ([`Event::id`]: commit LSN + index in the transaction), so
///   duplicates are dropped by id. Nothing published is skipped for a durable subscriber.
/// * **Ordinary subscribers** ([`ProjectChannel::subscribe`]) get live events from the moment
///   they subscribe, through a bounded queue; one that falls a whole queue behind is cut off
///   (its queue closes, [`Subscription::closed_reason`] says why). Publishing never waits for
///   them.
/// * **Durable subscribers** ([`ProjectChannel::subscribe_durable`]) acknowledge the `end_lsn`
///   of each transaction once stored ([`Subscription::ack`]); publishing waits for room in their
///   queue (backpressure) instead of cutting them off. Joining requests a rewind
///   ([`ProjectChannel::rewind_requested`]), so that the stream replays from the slot's
///   confirmed position and they miss nothing; they receive events only from that replay on
///   ([`ProjectChannel::start_pass`]), so what they receive is in order from a point at or
///   before everything they have not acknowledged.
/// * **Confirmation.** [`ProjectChannel::confirmable`] is how far the replication slot may be
///   confirmed: the lowest durable acknowledgement, or everything published when there is no
///   durable subscriber. The stream never confirms past it.
pub trait ProjectChannel: Send + Sync + 'static {
    /// Hands an event to every subscriber (see the contract for who may make it wait).
    fn publish(&self, event: Arc<Event>) -> impl Future<Output = ()> + Send;
    /// Hands consecutive events to every subscriber, in order: the same as publishing them one
    /// by one, but a transport may hand them over (and wait for room) a run at a time.
    fn publish_batch(&self, events: &[Arc<Event>]) -> impl Future<Output = ()> + Send;
    /// An ordinary subscriber: live events from now on.
    fn subscribe(self: &Arc<Self>) -> Subscription;
    /// A durable subscriber: the slot is not confirmed past what it acknowledges.
    fn subscribe_durable(self: &Arc<Self>) -> Subscription;
    /// How far the slot may be confirmed; `None`: nothing may be confirmed yet.
    fn confirmable(&self) -> Option<Lsn>;
    /// True when every durable subscriber has acknowledged everything published.
    fn all_acked(&self) -> bool;
    /// The rewind requests so far; a stream notes it when it (re)starts from the slot.
    fn rewind_generation(&self) -> u64;
    /// The stream (re)starts from the slot's confirmed position: returns the rewind generation
    /// this pass serves ([`Self::rewind_generation`]). A durable subscriber receives events only
    /// from the first pass that started after it joined, so it never sees the rest of an
    /// earlier pass (events past what it will be replayed from) before its replay.
    fn start_pass(&self) -> u64;
    /// Resolves when a rewind is requested (compare [`Self::rewind_generation`] with the one
    /// noted at the start: a wake-up may be stale).
    fn rewind_requested(&self) -> impl Future<Output = ()> + Send + '_;
}

/// The projects' channels of one transport.
pub trait EventBus: Send + Sync + 'static {
    type Channel: ProjectChannel;
    /// The project's channel, made on first use.
    fn channel(&self, project_id: &str) -> Arc<Self::Channel>;
    /// Forgets a project (it was deleted).
    fn forget(&self, project_id: &str);
}

/// What a transport keeps for one subscriber: acknowledgements go back through it, and
/// dropping it unsubscribes.
pub trait SubscriptionLink: Send + Sync {
    /// Durable subscribers: everything up to `end_lsn` is stored.
    fn ack(&self, end_lsn: Lsn);
    /// Why the transport cut this subscriber off, once its queue has closed.
    fn closed_reason(&self) -> Option<String>;
}

/// A subscriber's end of the bus, whatever the transport: events arrive on `events`.
pub struct Subscription {
    /// Taken only through the methods below, which give a durable queue's room back.
    events: mpsc::Receiver<Arc<Event>>,
    /// The in-process bus's durable subscribers: signalled once per run of events handed over
    /// (see [`Subscription::recv`]). `None`: wait on `events` itself.
    runs: Option<Arc<Notify>>,
    /// The in-process bus's durable subscribers: the room left in the queue's byte bound
    /// ([`DURABLE_QUEUE_BYTES`], KiB permits), given back as events are taken through
    /// [`Subscription::recv`], [`Subscription::recv_many`] and [`Subscription::try_recv`]; closed
    /// when the subscription is dropped, so a publisher waiting for room stops waiting.
    room: Option<Arc<Semaphore>>,
    link: Box<dyn SubscriptionLink>,
}

impl Drop for Subscription {
    fn drop(&mut self) {
        if let Some(room) = &self.room {
            room.close();
        }
    }
}

impl Subscription {
    pub fn new(
        events: mpsc::Receiver<Arc<Event>>,
        link: impl SubscriptionLink + 'static,
    ) -> Subscription {
        Subscription {
            events,
            runs: None,
            room: None,
            link: Box::new(link),
        }
    }

    /// An event taken off the queue gives its bytes back to the publisher.
    fn taken(&self, event: Arc<Event>) -> Arc<Event> {
        if let Some(room) = &self.room {
            room.add_permits(queue_kib(&event));
        }
        event
    }

    /// The next queued event, without waiting.
    pub fn try_recv(&mut self) -> Option<Arc<Event>> {
        let event = self.events.try_recv().ok()?;
        Some(self.taken(event))
    }

    /// The next event; `None` once the queue is closed and empty. Cancel-safe. A durable
    /// subscriber of the in-process bus that takes its events through this (and
    /// [`Subscription::recv_many`]) is woken once per run of events the publisher hands over,
    /// not for each event: it never waits on the queue itself, whose every send would wake a
    /// waiting receiver (a fast subscriber on another core then parked and was woken every few
    /// events: ~23 context switches per run of 256 in session 24's count).
    pub async fn recv(&mut self) -> Option<Arc<Event>> {
        let Some(runs) = self.runs.clone() else {
            return self.events.recv().await;
        };
        loop {
            match self.events.try_recv() {
                Ok(event) => return Some(self.taken(event)),
                Err(mpsc::error::TryRecvError::Disconnected) => return None,
                Err(mpsc::error::TryRecvError::Empty) => {}
            }
            // `notify_one` keeps a permit when nobody waits, so a run handed over between
            // the check above and this wait is not missed.
            runs.notified().await;
        }
    }

    /// Up to `limit` queued events into `buf` (waiting for at least one, as
    /// [`Subscription::recv`]); 0 once the queue is closed and empty. Cancel-safe.
    pub async fn recv_many(&mut self, buf: &mut Vec<Arc<Event>>, limit: usize) -> usize {
        if self.runs.is_none() {
            return self.events.recv_many(buf, limit).await;
        }
        let Some(first) = self.recv().await else {
            return 0;
        };
        buf.push(first);
        let mut n = 1;
        while n < limit {
            match self.try_recv() {
                Some(event) => {
                    buf.push(event);
                    n += 1;
                }
                None => break,
            }
        }
        n
    }

    /// Why the bus cut this subscriber off, once `events` has closed.
    pub fn closed_reason(&self) -> Option<String> {
        self.link.closed_reason()
    }

    /// Durable subscribers: everything up to `end_lsn` is stored.
    pub fn ack(&self, end_lsn: Lsn) {
        self.link.ack(end_lsn)
    }
}

/// The in-process bus's link: the subscriber's entry in its project's list.
struct LocalLink {
    id: u64,
    bus: Arc<ProjectBus>,
    closed_reason: Arc<Mutex<Option<String>>>,
}

impl SubscriptionLink for LocalLink {
    fn ack(&self, end_lsn: Lsn) {
        let mut subs = self.bus.subscribers.lock().expect("poisoned");
        if let Some(s) = subs.iter_mut().find(|s| s.id == self.id) {
            if s.acked.is_none_or(|a| a < end_lsn) {
                s.acked = Some(end_lsn);
            }
        }
    }

    fn closed_reason(&self) -> Option<String> {
        self.closed_reason.lock().expect("poisoned").clone()
    }
}

impl Drop for LocalLink {
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
    /// Durable only: signalled after each run handed over ([`Subscription::recv`]).
    runs: Option<Arc<Notify>>,
    /// Durable only: the room left in its queue's byte bound ([`Subscription::room`]).
    room: Option<Arc<Semaphore>>,
    durable: bool,
    /// Durable only: the highest end LSN stored.
    acked: Option<Lsn>,
    /// Durable only: the end LSN of the last event handed to it, in any pass: what it owes an
    /// acknowledgement for. `None`: handed nothing yet, so it owes nothing for
    /// [`ProjectBus::all_acked`] (an idle project's webhook writer or room pump must not stop
    /// an idle stream from following the log), though it still holds `confirmable` back until
    /// it acknowledges something.
    handed: Option<Lsn>,
    /// Durable only: the first pass (rewind generation) whose events it receives.
    from_pass: u64,
    closed_reason: Arc<Mutex<Option<String>>>,
}

/// The in-process channel of one project.
pub struct ProjectBus {
    subscribers: Mutex<Vec<Subscriber>>,
    next_id: AtomicU64,
    /// End LSN of the last transaction published.
    published: AtomicU64,
    /// Wakes the change stream to restart from the slot (a durable subscriber needs a replay).
    rewind: Notify,
    /// Counts rewind requests, so a stream that started after one ignores its stale wake-up.
    rewinds: AtomicU64,
    /// The rewind generation the stream's current pass started at ([`ProjectChannel::start_pass`]).
    pass: AtomicU64,
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
            pass: AtomicU64::new(0),
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
        let mut subs = self.subscribers.lock().expect("poisoned");
        // Replay from the slot so that nothing since its confirmed position is missed; until
        // that pass starts, the current one's events are not its own (they may be past what
        // an earlier subscriber received and never stored).
        let from_pass = if durable {
            self.rewinds.fetch_add(1, Ordering::AcqRel) + 1
        } else {
            0
        };
        let runs = durable.then(|| Arc::new(Notify::new()));
        let room = durable.then(|| Arc::new(Semaphore::new(DURABLE_QUEUE_BYTES / 1024)));
        subs.push(Subscriber {
            id,
            tx,
            runs: runs.clone(),
            room: room.clone(),
            durable,
            acked: None,
            handed: None,
            from_pass,
            closed_reason: closed_reason.clone(),
        });
        drop(subs);
        if durable {
            self.rewind.notify_one();
        }
        let mut sub = Subscription::new(
            rx,
            LocalLink {
                id,
                bus: self.clone(),
                closed_reason,
            },
        );
        sub.runs = runs;
        sub.room = room;
        sub
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

    /// Hands an event to every subscriber: [`ProjectBus::publish_batch`] of one.
    pub async fn publish(&self, event: Arc<Event>) {
        self.publish_batch(std::slice::from_ref(&event)).await
    }

    /// Hands consecutive events to every subscriber, in order. Ordinary subscribers never make
    /// it wait: one whose queue is full is cut off. Durable subscribers are part of the
    /// pipeline's durability (the slot cannot move past what they have not stored), so the
    /// stream waits for room in their queue instead: they apply backpressure, they are never
    /// dropped. It waits for room for a run of events at once (up to [`DURABLE_RUN`]) rather
    /// than for each slot the subscriber frees: a stream that is ahead of its subscriber then
    /// sleeps until the subscriber has taken a run, instead of being woken for every event it
    /// takes (two context switches an event, the largest cost of a saturated pipeline).
    pub async fn publish_batch(&self, events: &[Arc<Event>]) {
        if events.is_empty() {
            return;
        }
        let mut durable = Vec::new();
        let last_end = events.last().expect("not empty").end_lsn;
        {
            let pass = self.pass.load(Ordering::Acquire);
            let mut subs = self.subscribers.lock().expect("poisoned");
            subs.retain_mut(|s| {
                if s.durable {
                    if s.from_pass <= pass {
                        durable.push((s.tx.clone(), s.runs.clone(), s.room.clone()));
                        // Owed from now on (before the hand-over: never "all acknowledged"
                        // while events are on their way).
                        s.handed = Some(s.handed.map_or(last_end, |h| h.max(last_end)));
                    }
                    return true;
                }
                for event in events {
                    match s.tx.try_send(event.clone()) {
                        Ok(()) => {}
                        Err(mpsc::error::TrySendError::Full(_)) => {
                            let why = format!(
                                "subscriber fell more than {} events behind and was disconnected",
                                s.tx.max_capacity()
                            );
                            tracing::warn!("{why}");
                            *s.closed_reason.lock().expect("poisoned") = Some(why);
                            return false;
                        }
                        Err(mpsc::error::TrySendError::Closed(_)) => return false,
                    }
                }
                true
            });
        }
        'subscribers: for (tx, runs, room) in durable {
            let run = DURABLE_RUN.min(tx.max_capacity()).max(1);
            for chunk in by_room(events, run) {
                // Room in the byte bound first; once the events are queued it is theirs until
                // taken (forgotten here, given back by the subscription). A publish abandoned
                // before that gives it back with the permit.
                let bytes_room = match &room {
                    Some(room) => {
                        let kib = chunk.iter().map(|e| queue_kib(e)).sum::<usize>();
                        match room.acquire_many(kib as u32).await {
                            Ok(permit) => Some(permit),
                            // Dropped: the subscriber is gone.
                            Err(_) => continue 'subscribers,
                        }
                    }
                    None => None,
                };
                // A closed queue means the subscriber is gone; its Drop removes it.
                let Ok(permits) = tx.reserve_many(chunk.len()).await else {
                    break;
                };
                for (permit, event) in permits.zip(chunk) {
                    permit.send(event.clone());
                }
                if let Some(permit) = bytes_room {
                    permit.forget();
                }
                // One wake for the run (a subscriber taking events through
                // `Subscription::recv` never waits on the queue itself).
                if let Some(runs) = &runs {
                    runs.notify_one();
                }
            }
        }
        if let Some(end) = events.iter().rev().find(|e| e.last_in_transaction) {
            self.published.store(end.end_lsn.0, Ordering::Release);
        }
        self.published_events
            .fetch_add(events.len() as u64, Ordering::Relaxed);
    }

    /// The rewind requests so far; a stream notes it when it (re)starts from the slot.
    pub fn rewind_generation(&self) -> u64 {
        self.rewinds.load(Ordering::Acquire)
    }

    /// See [`ProjectChannel::start_pass`].
    pub fn start_pass(&self) -> u64 {
        // Under the subscribers' lock: a subscriber joins either before (this pass is its
        // own) or after (its rewind ends this pass), never in between.
        let _subs = self.subscribers.lock().expect("poisoned");
        let generation = self.rewinds.load(Ordering::Acquire);
        self.pass.store(generation, Ordering::Release);
        // What an earlier pass published is not this one's: until the replay publishes again,
        // nothing is confirmable on its account.
        self.published.store(0, Ordering::Release);
        generation
    }

    /// How far the slot may be confirmed: the lowest durable acknowledgement, or everything
    /// published in this pass when there is no durable subscriber. `None`: nothing may be
    /// confirmed yet (nothing published, a durable subscriber that has acknowledged nothing,
    /// or one waiting for its rewind).
    ///
    /// A durable subscriber that has acknowledged nothing holds everything back here even when
    /// it was handed nothing: it joined for a rewind (a webhook writer, a room pump, the
    /// cluster's JetStream publisher starting a new term) and the replay it waits for starts
    /// at the slot's confirmed position, while the others' acknowledgements may be far past
    /// it, from the earlier pass. Taking their minimum would confirm the slot past what it
    /// never received, and the next rewind would replay from there (seen: a JetStream
    /// publisher retrying while NATS was down, each term rewinding, lost 532 changes). An idle
    /// stream moves on through [`ProjectBus::all_acked`] instead, which a subscriber handed
    /// nothing does satisfy: the stream then follows only what it has itself read in this
    /// pass (a keepalive's sent position, the binlog's boundary), every change of which it
    /// would have handed over.
    pub fn confirmable(&self) -> Option<Lsn> {
        let published = Lsn(self.published.load(Ordering::Acquire));
        let pass = self.pass.load(Ordering::Acquire);
        let subs = self.subscribers.lock().expect("poisoned");
        let mut bound: Option<Lsn> = (published.0 > 0).then_some(published);
        for s in subs.iter().filter(|s| s.durable) {
            if s.from_pass > pass {
                return None;
            }
            match s.acked {
                None => return None,
                Some(a) => bound = Some(bound.map_or(a, |b| b.min(a))),
            }
        }
        bound
    }

    /// True when every durable subscriber has acknowledged everything it was handed, and none
    /// waits for its rewind: the stream may then follow the log past other databases' writes.
    pub fn all_acked(&self) -> bool {
        let pass = self.pass.load(Ordering::Acquire);
        self.subscribers
            .lock()
            .expect("poisoned")
            .iter()
            .filter(|s| s.durable)
            .all(|s| {
                s.from_pass <= pass && s.handed.is_none_or(|h| s.acked.is_some_and(|a| a >= h))
            })
    }

    pub fn subscriber_count(&self) -> usize {
        self.subscribers.lock().expect("poisoned").len()
    }
}

impl ProjectChannel for ProjectBus {
    fn publish(&self, event: Arc<Event>) -> impl Future<Output = ()> + Send {
        ProjectBus::publish(self, event)
    }

    fn publish_batch(&self, events: &[Arc<Event>]) -> impl Future<Output = ()> + Send {
        ProjectBus::publish_batch(self, events)
    }

    fn subscribe(self: &Arc<Self>) -> Subscription {
        ProjectBus::subscribe(self)
    }

    fn subscribe_durable(self: &Arc<Self>) -> Subscription {
        ProjectBus::subscribe_durable(self)
    }

    fn confirmable(&self) -> Option<Lsn> {
        ProjectBus::confirmable(self)
    }

    fn all_acked(&self) -> bool {
        ProjectBus::all_acked(self)
    }

    fn rewind_generation(&self) -> u64 {
        ProjectBus::rewind_generation(self)
    }

    fn start_pass(&self) -> u64 {
        ProjectBus::start_pass(self)
    }

    fn rewind_requested(&self) -> impl Future<Output = ()> + Send + '_ {
        self.rewind.notified()
    }
}

/// All projects' buses: the in-process transport.
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

impl EventBus for Bus {
    type Channel = ProjectBus;

    fn channel(&self, project_id: &str) -> Arc<ProjectBus> {
        self.project(project_id)
    }

    fn forget(&self, project_id: &str) {
        self.remove(project_id)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn event(n: u64) -> Arc<Event> {
        Arc::new(Event {
            id: format!("{n:016X}-00000000"),
            kind: EventKind::Schema {
                command: "CREATE TABLE".into(),
            },
            schema: None,
            table: None,
            record: RowImage::None,
            old: RowImage::None,
            unchanged_toast: Vec::new(),
            too_large: Vec::new(),
            relation: None,
            row_key: None,
            commit_timestamp: Arc::from(""),
            commit_lsn: Lsn(n),
            end_lsn: Lsn(n),
            last_in_transaction: true,
            payload: Arc::from("{}"),
            sender: None,
            gap_before: false,
            payload_whole: false,
        })
    }

    #[tokio::test]
    async fn a_durable_subscriber_receives_nothing_of_the_pass_running_when_it_joined() {
        let bus = Bus::default().project("p");
        let first = bus.start_pass();
        let mut old = bus.subscribe_durable();
        // `old` joined after the pass began: the stream is asked to rewind, and until it does,
        // `old` gets nothing of this pass (its events may be past what `old` replays from).
        bus.publish(event(1)).await;
        assert!(old.try_recv().is_none());
        assert!(bus.rewind_generation() > first);
        assert_eq!(bus.start_pass(), bus.rewind_generation());
        bus.publish(event(1)).await;
        bus.publish(event(2)).await;
        assert_eq!(old.events.try_recv().unwrap().end_lsn, Lsn(1));
        assert_eq!(old.events.try_recv().unwrap().end_lsn, Lsn(2));
        // A publisher's next term: its new subscription must not see event 3 of the running
        // pass before the replay from the slot (it would skip what lies between).
        let mut new = bus.subscribe_durable();
        let mut live = bus.subscribe();
        bus.publish(event(3)).await;
        assert!(new.try_recv().is_none());
        assert_eq!(old.events.try_recv().unwrap().end_lsn, Lsn(3));
        bus.start_pass();
        bus.publish(event(1)).await;
        assert_eq!(new.events.try_recv().unwrap().end_lsn, Lsn(1));
        // Ordinary subscribers get everything live, passes or not.
        assert_eq!(live.events.try_recv().unwrap().end_lsn, Lsn(3));
        assert_eq!(live.events.try_recv().unwrap().end_lsn, Lsn(1));
        // Not confirmable past a subscriber that has acknowledged nothing.
        old.ack(Lsn(3));
        assert_eq!(bus.confirmable(), None);
        new.ack(Lsn(1));
        assert_eq!(bus.confirmable(), Some(Lsn(1)));
    }

    /// An idle project's durable subscribers (a webhook writer, a room's pump) that were
    /// handed nothing must not hold the slot at its last position: the stream follows the log
    /// past other databases' writes only when `all_acked`, and an idle slot that never moves
    /// pins WAL until it is lost (red team rt4: MySQL positions stuck at project creation).
    #[tokio::test]
    async fn a_durable_subscriber_handed_nothing_holds_nothing_back() {
        let bus = Bus::default().project("p");
        let idle = bus.subscribe_durable();
        // Waiting for its rewind: nothing may move yet.
        assert!(!bus.all_acked());
        assert_eq!(bus.confirmable(), None);
        bus.start_pass();
        // Its pass started and nothing was handed to it: it owes nothing.
        assert!(bus.all_acked());
        assert_eq!(bus.confirmable(), None, "nothing published in this pass");
        bus.publish(event(5)).await;
        assert!(!bus.all_acked(), "handed 5, acknowledged nothing");
        assert_eq!(bus.confirmable(), None);
        idle.ack(Lsn(5));
        assert!(bus.all_acked());
        assert_eq!(bus.confirmable(), Some(Lsn(5)));
        // A second subscriber that joins idle waits for its rewind, then owes nothing (an idle
        // stream may follow what it reads); the first, having acknowledged all, neither.
        let late = bus.subscribe_durable();
        assert!(!bus.all_acked());
        bus.start_pass();
        assert!(bus.all_acked());
        // But what `idle` acknowledged in the earlier pass does not speak for `late`, which has
        // nothing of the replay yet: nothing is confirmable on its account (a JetStream
        // publisher's new term must not let the slot pass what the stream holds).
        assert_eq!(bus.confirmable(), None);
        bus.publish(event(6)).await;
        idle.ack(Lsn(6));
        assert_eq!(
            bus.confirmable(),
            None,
            "late was handed 6 and acknowledged nothing"
        );
        late.ack(Lsn(6));
        assert_eq!(bus.confirmable(), Some(Lsn(6)));
        assert!(bus.all_acked());
    }

    /// Events 1..=n as transactions of `per` events each (ends at multiples of `per`).
    fn run(n: u64, per: u64) -> Vec<Arc<Event>> {
        (1..=n)
            .map(|i| {
                let mut e = Arc::into_inner(event(i)).unwrap();
                e.last_in_transaction = i % per == 0;
                e.end_lsn = Lsn(i.div_ceil(per) * per);
                Arc::new(e)
            })
            .collect()
    }

    /// However few the events, a durable queue holds at most [`DURABLE_QUEUE_BYTES`] of them:
    /// the publisher waits until the subscriber takes some (before, 2,048 rows of 16 MiB could
    /// queue: 32 GiB), and every byte taken is room again.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_durable_queue_is_bounded_in_bytes_and_taking_events_makes_room() {
        let bus = Bus::default().project("p");
        let mut durable = bus.subscribe_durable();
        bus.start_pass();
        let mib = "x".repeat(1 << 20);
        let events: Vec<Arc<Event>> = (1..=24)
            .map(|n| {
                let mut e = Arc::into_inner(event(n)).unwrap();
                e.payload = Arc::from(mib.as_str());
                Arc::new(e)
            })
            .collect();
        let wait = std::time::Duration::from_millis(200);
        // 24 MiB: the first 16 fill the bound, the rest wait (the publish is abandoned here).
        assert!(tokio::time::timeout(wait, bus.publish_batch(&events))
            .await
            .is_err());
        let room = durable.room.clone().unwrap();
        assert_eq!(room.available_permits(), 0);
        let mut got = Vec::new();
        while let Some(e) = durable.try_recv() {
            got.push(e.commit_lsn.0);
        }
        assert_eq!(got, (1..=16).collect::<Vec<_>>());
        assert_eq!(room.available_permits(), DURABLE_QUEUE_BYTES / 1024);
        // The rest fits now; taken through `recv_many`, their room comes back too.
        tokio::time::timeout(wait, bus.publish_batch(&events[16..]))
            .await
            .expect("room was made");
        let mut buf = Vec::new();
        assert_eq!(durable.recv_many(&mut buf, 100).await, 8);
        assert_eq!(room.available_permits(), DURABLE_QUEUE_BYTES / 1024);
        // A subscriber dropped while the publisher waits for room does not hold it up.
        let more: Vec<Arc<Event>> = events.iter().cycle().take(40).cloned().collect();
        let publish = bus.publish_batch(&more);
        tokio::pin!(publish);
        assert!(tokio::time::timeout(wait, &mut publish).await.is_err());
        drop(durable);
        tokio::time::timeout(wait, publish)
            .await
            .expect("a closed queue ends the wait");
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_batch_longer_than_a_durable_queue_arrives_whole_and_in_order() {
        let bus = Bus::default().project("p");
        let mut durable = bus.subscribe_durable();
        bus.start_pass();
        let mut live = bus.subscribe();
        let n = (DURABLE_QUEUE_LEN * 3 + 7) as u64;
        // The subscriber takes events slowly at first: the publisher waits for room a run at
        // a time and must neither lose nor reorder any.
        let reader = tokio::spawn(async move {
            let mut got = Vec::new();
            while got.len() < n as usize {
                let Some(e) = durable.recv().await else {
                    break;
                };
                if got.len() < 100 {
                    tokio::time::sleep(std::time::Duration::from_micros(200)).await;
                }
                got.push(e.commit_lsn.0);
            }
            (got, durable)
        });
        let events = run(n, 10);
        tokio::time::timeout(
            std::time::Duration::from_secs(30),
            bus.publish_batch(&events),
        )
        .await
        .expect("the publisher waited for room and got it");
        let (got, _durable) = reader.await.unwrap();
        assert_eq!(got, (1..=n).collect::<Vec<_>>());
        // The last whole transaction is what was published.
        assert_eq!(bus.published.load(Ordering::Acquire), n / 10 * 10);
        // The ordinary subscriber's queue (QUEUE_LEN) was outrun within the batch: it is cut
        // off with its reason, having received the events that fit, in order.
        let mut live_got = Vec::new();
        while let Ok(e) = live.events.try_recv() {
            live_got.push(e.commit_lsn.0);
        }
        assert_eq!(live_got, (1..=QUEUE_LEN as u64).collect::<Vec<_>>());
        assert!(live.closed_reason().unwrap().contains("fell more than"));
        assert_eq!(bus.subscriber_count(), 1);
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_durable_subscriber_is_woken_once_per_run_and_misses_nothing() {
        let bus = Bus::default().project("p");
        let mut durable = bus.subscribe_durable();
        bus.start_pass();
        // Waiting before the run is handed over: woken once, after the whole run is queued
        // (woken by the queue itself, it took the first event alone).
        let reader = tokio::spawn(async move {
            let mut buf = Vec::new();
            let n = durable.recv_many(&mut buf, 10_000).await;
            (durable, n)
        });
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
        let events = run(300, 10);
        bus.publish_batch(&events).await;
        let (mut durable, n) = reader.await.unwrap();
        assert_eq!(n, 300, "the run arrived whole at the first wake");
        // Runs longer than the queue, taken with cancellations (a timeout around every
        // wait, as a `select!` does) and slowly at first: all, in order, exactly once.
        let total = (DURABLE_QUEUE_LEN * 2 + 5) as u64;
        let reader = tokio::spawn(async move {
            let mut got = Vec::new();
            while got.len() < total as usize {
                match tokio::time::timeout(std::time::Duration::from_micros(50), durable.recv())
                    .await
                {
                    Ok(Some(e)) => got.push(e.commit_lsn.0),
                    Ok(None) => break,
                    Err(_) => continue,
                }
                if got.len() < 50 {
                    tokio::time::sleep(std::time::Duration::from_micros(300)).await;
                }
            }
            got
        });
        let events = run(total, 7);
        for part in events.chunks(333) {
            tokio::time::timeout(std::time::Duration::from_secs(30), bus.publish_batch(part))
                .await
                .expect("room was made");
        }
        let got = tokio::time::timeout(std::time::Duration::from_secs(30), reader)
            .await
            .expect("every event was received")
            .unwrap();
        assert_eq!(got, (1..=total).collect::<Vec<_>>());
    }

    #[test]
    fn row_operations_have_the_guide_s_names() {
        use super::RowOp;
        for op in [RowOp::Insert, RowOp::Update, RowOp::Delete] {
            assert_eq!(RowOp::from_name(op.as_str()), Some(op));
            assert_eq!(op.to_string(), op.as_str());
        }
        assert_eq!(RowOp::Update.as_str(), "UPDATE");
        assert_eq!(RowOp::from_name("insert"), None);
    }
}
