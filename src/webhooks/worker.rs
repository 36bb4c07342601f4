//! The delivery worker: sends due deliveries, each through [`super::attempt`]: for a `strict`
//! webhook one at a time, oldest first ([`drain_strict`]); for a `row` webhook concurrently
//! under [`super::window`]'s rules, up to `webhook_max_in_flight` ([`drain_rows`]).
//!
//! It does not query for due webhooks on every wake-up: at 1,000 transactions/s that query
//! ran hundreds of times a second, and its partial index keeps the entries of delivered rows
//! until a vacuum, so each run grew slower (milliseconds after a burst) and the queue behind it
//! grew to seconds. New deliveries name their webhook instead ([`Queue::stored`]), and the
//! scan runs on a timer (`webhook_scan_ms`): for retries whose time has come, and for what a
//! restart left pending.
//!
//! Drains are bounded and shared fairly ([`Scheduler`]): at most `webhook_max_drains` webhooks
//! drain at once, at most `webhook_max_drains_per_project` of one project, the waiting ones
//! started project by project in turn; a drain that has started [`DRAIN_SLICE`] attempts, or
//! started attempts for [`DRAIN_TURN`], while others wait ends after its attempts in flight and
//! queues again behind them. A project's backlog thus delays other projects' deliveries by at
//! most a turn (≤ 2 s plus the request timeout), however large it is and however slow its
//! receiver.

use std::collections::{HashMap, VecDeque};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, Weak};
use std::time::{Duration, Instant};

use tokio::sync::Notify;

use futures_util::stream::{FuturesUnordered, StreamExt};

use super::attempt::{self, attempt, Next, Settled};
use super::window::Window;
use super::Shared;
use crate::control::deliveries::{self, PendingPage, Successes};
use crate::control::webhooks::{self as hooks, Ordering as Order};

/// How long delivered deliveries stay in the log.
const RETENTION: &str = "7 days";

/// What the worker is told between its scans.
#[derive(Default)]
pub(super) struct Queue {
    /// Wakes the delivery worker.
    wake: Notify,
    /// Webhooks with deliveries stored since the worker last looked (or whose drain yielded
    /// its turn), and their projects: the worker drains these without asking the database
    /// which webhooks have due deliveries.
    fresh: Mutex<HashMap<String, String>>,
    /// Set when the worker should look for due deliveries of every webhook at once (a webhook
    /// enabled again, a delivery re-queued), not only at its periodic scan.
    scan: AtomicBool,
    /// Webhooks being drained: their project, and how to tell their drain that new
    /// deliveries were stored.
    busy: Mutex<HashMap<String, (String, Arc<Notify>)>>,
    /// Webhooks waiting for a drain slot: a drain past its slice yields while any do.
    waiting: AtomicUsize,
    /// Bumped when a webhook is changed or deleted through this server: running drains read
    /// their webhook again before their next attempt ([`Target`]).
    changes: std::sync::atomic::AtomicU64,
}

impl Queue {
    /// New deliveries of `hooks` are stored: the worker sends them at once.
    pub(super) fn stored(&self, project_id: &str, hooks: impl IntoIterator<Item = String>) {
        let mut fresh = self.fresh.lock().expect("poisoned");
        fresh.extend(hooks.into_iter().map(|h| (h, project_id.to_string())));
        let busy = self.busy.lock().expect("poisoned");
        for hook in fresh.keys() {
            if let Some((_, signal)) = busy.get(hook) {
                signal.notify_one();
            }
        }
        drop((busy, fresh));
        self.wake.notify_one();
    }

    /// What tells the webhook's drain that new deliveries were stored.
    fn signal(&self, hook: &str) -> Arc<Notify> {
        self.busy
            .lock()
            .expect("poisoned")
            .get(hook)
            .map(|(_, signal)| signal.clone())
            .unwrap_or_default()
    }

    /// No webhook is being drained.
    pub(super) fn idle(&self) -> bool {
        self.busy.lock().expect("poisoned").is_empty()
    }

    /// A webhook was changed or deleted: running drains read theirs again at once.
    pub(super) fn changed(&self) {
        self.changes.fetch_add(1, Ordering::AcqRel);
    }

    /// Deliveries may have become due outside the outbox: the worker scans at once.
    pub(super) fn rescan(&self) {
        self.scan.store(true, Ordering::Relaxed);
        self.wake.notify_one();
    }
}

/// Which waiting webhook drains next: at most `max` drains at once, at most `per_project` of one
/// project, projects served in turn (round robin), each project's webhooks in the order they
/// came. Holds each webhook once.
#[derive(Default)]
pub(super) struct Scheduler {
    /// Projects with waiting webhooks, in turn order.
    turn: VecDeque<String>,
    /// Each project's waiting webhooks.
    waiting: HashMap<String, VecDeque<String>>,
    /// How many webhooks wait, in all.
    len: usize,
}

impl Scheduler {
    /// Queues the webhook (of `project`) unless it waits already.
    pub(super) fn offer(&mut self, hook: String, project: String) {
        let queue = match self.waiting.get_mut(&project) {
            Some(q) => q,
            None => {
                self.turn.push_back(project.clone());
                self.waiting.entry(project).or_default()
            }
        };
        if !queue.contains(&hook) {
            queue.push_back(hook);
            self.len += 1;
        }
    }

    pub(super) fn len(&self) -> usize {
        self.len
    }

    pub(super) fn clear(&mut self) {
        *self = Scheduler::default();
    }

    /// The next webhook to drain, given those draining now (webhook → project), or `None`
    /// when every slot is taken or nothing waiting may start. A webhook draining already stays
    /// queued (its drain may have missed what brought it here).
    pub(super) fn next(
        &mut self,
        busy: &HashMap<String, (String, Arc<Notify>)>,
        max: usize,
        per_project: usize,
    ) -> Option<(String, String)> {
        if busy.len() >= max {
            return None;
        }
        for _ in 0..self.turn.len() {
            let project = self.turn.pop_front()?;
            let running = busy.values().filter(|(p, _)| *p == project).count();
            let queue = self
                .waiting
                .get_mut(&project)
                .expect("a project in turn waits");
            let pick = (running < per_project)
                .then(|| queue.iter().position(|h| !busy.contains_key(h)))
                .flatten();
            if let Some(i) = pick {
                let hook = queue.remove(i).expect("found above");
                self.len -= 1;
                if queue.is_empty() {
                    self.waiting.remove(&project);
                } else {
                    self.turn.push_back(project.clone());
                }
                return Some((hook, project));
            }
            self.turn.push_back(project);
        }
        None
    }
}

/// Runs until the service is dropped.
pub(super) async fn run(shared: Weak<Shared>) {
    let mut last_prune = Instant::now() - Duration::from_secs(3600);
    let mut last_scan: Option<Instant> = None;
    let mut scheduler = Scheduler::default();
    loop {
        let Some(strong) = shared.upgrade() else {
            return;
        };
        if last_prune.elapsed() > Duration::from_secs(3600) {
            last_prune = Instant::now();
            if let Ok(c) = strong.work.get().await {
                let _ = deliveries::prune_delivered(&c, RETENTION).await;
                let _ = hooks::forget_previous_secrets(&c).await;
            }
        }
        let scan_interval = strong.settings.scan_interval;
        let queue = &strong.queue;
        let mut candidates = std::mem::take(&mut *queue.fresh.lock().expect("poisoned"));
        let asked = queue.scan.swap(false, Ordering::Relaxed);
        if asked || last_scan.is_none_or(|t| t.elapsed() >= scan_interval) {
            match due_webhooks(&strong).await {
                Ok(due) => candidates.extend(due),
                Err(e) => tracing::warn!(error = %e, "looking for due webhook deliveries"),
            }
            // From the end of the query: a slow scan is not followed by another at once.
            last_scan = Some(Instant::now());
        }
        if strong.handing_over.load(Ordering::Acquire) {
            // Cluster mode, stopping: the other nodes send from now on.
            candidates.clear();
            scheduler.clear();
        }
        {
            // One lock order everywhere: `fresh`, then `busy`.
            let mut fresh = queue.fresh.lock().expect("poisoned");
            let busy = queue.busy.lock().expect("poisoned");
            for (hook, project) in candidates {
                if busy.contains_key(&hook) {
                    // Being drained: look again when that drain ends (it wakes the worker), in
                    // case the new deliveries came after its last look.
                    fresh.insert(hook, project);
                } else {
                    scheduler.offer(hook, project);
                }
            }
        }
        let settings = &strong.settings;
        loop {
            let mut busy = queue.busy.lock().expect("poisoned");
            let Some((hook, project)) =
                scheduler.next(&busy, settings.max_drains, settings.max_drains_per_project)
            else {
                break;
            };
            busy.insert(hook.clone(), (project.clone(), Default::default()));
            drop(busy);
            let shared = Arc::downgrade(&strong);
            tokio::spawn(async move {
                if let Some(s) = shared.upgrade() {
                    let _done = Drained {
                        queue: &s.queue,
                        hook: &hook,
                    };
                    match drain(&s, &hook, &project).await {
                        Ok(Yield::Done) => {}
                        // Its turn is over, not its work: queued again, behind the others.
                        Ok(Yield::Yielded) => {
                            s.queue
                                .fresh
                                .lock()
                                .expect("poisoned")
                                .insert(hook.clone(), project);
                        }
                        Err(e) => {
                            tracing::warn!(webhook = %hook, error = %e, "delivering webhooks")
                        }
                    }
                }
            });
        }
        queue.waiting.store(scheduler.len(), Ordering::Relaxed);
        let next_scan = last_scan.map_or(Duration::ZERO, |t| {
            scan_interval.saturating_sub(t.elapsed())
        });
        let _ = tokio::time::timeout(next_scan, strong.queue.wake.notified()).await;
    }
}

/// Ends a drain, even one that panicked: the webhook is no longer busy, and the worker looks
/// again, for deliveries stored while it was.
struct Drained<'a> {
    queue: &'a Queue,
    hook: &'a str,
}

impl Drop for Drained<'_> {
    fn drop(&mut self) {
        if let Ok(mut busy) = self.queue.busy.lock() {
            busy.remove(self.hook);
        }
        self.queue.wake.notify_one();
    }
}

async fn due_webhooks(shared: &Shared) -> anyhow::Result<Vec<(String, String)>> {
    Ok(hooks::with_due_deliveries(&shared.work.get().await?).await?)
}

/// Attempts a drain starts before it gives its turn to a waiting webhook (it ends once its
/// attempts in flight are settled, then queues again): what bounds how long a backlog holds a
/// drain slot while others wait.
const DRAIN_SLICE: usize = 512;
/// How long a drain starts attempts while another webhook waits, however few: against a
/// receiver that never answers, 512 attempts at 64 in flight were eight rounds of the request
/// timeout (red team, session 25: another tenant's first delivery waited 81 s). A turn now
/// ends at most this long after it began, plus the settling of its attempts in flight (each
/// bounded by the webhook request timeout).
const DRAIN_TURN: Duration = Duration::from_secs(2);

/// Whether a drain ended with nothing left to send, or gave its turn up.
#[derive(Debug, PartialEq)]
enum Yield {
    Done,
    Yielded,
}

/// Sends a webhook's due deliveries in order until none is due, or until it has had its slice
/// while others wait; in cluster mode only while this node holds the webhook's drain claim
/// ([`Claim`]).
async fn drain(shared: &Shared, webhook_id: &str, project: &str) -> anyhow::Result<Yield> {
    match &shared.settings.node_id {
        None => Ok(
            match drain_batches(shared, webhook_id, project, None).await? {
                Drain::Yielded => Yield::Yielded,
                _ => Yield::Done,
            },
        ),
        Some(node) => drain_claimed(shared, webhook_id, project, node).await,
    }
}

/// The drain began at `began` and has started `started` attempts, and another webhook waits
/// for a slot.
fn slice_spent(shared: &Shared, started: usize, began: Instant) -> bool {
    (started >= DRAIN_SLICE || began.elapsed() >= DRAIN_TURN)
        && shared.queue.waiting.load(Ordering::Relaxed) > 0
}

/// How long a running drain trusts what it read of its webhook (enabled, URL, secret) when the
/// change may have been made through another server (cluster mode): a change through this one
/// is seen before the next attempt ([`Queue::changed`]).
const TARGET_FRESH: Duration = Duration::from_secs(1);

/// A drain's webhook as last read: where its attempts go and with what secret. Read again before
/// an attempt once this server changed a webhook or [`TARGET_FRESH`] passed, so that a webhook
/// disabled, deleted or pointed elsewhere gets no attempt started after the change was
/// answered (through this server; within a second through another). Before, a drain went on
/// with its page of up to 2,048 deliveries: red team rt11 counted 172 sent to a deleted
/// webhook, or to the old URL, over 5 s after the change.
struct Target {
    url: String,
    secret: hooks::Secrets,
    changes: u64,
    read: Instant,
}

impl Target {
    /// What a read of the webhook starting now will be as fresh as: taken *before* the query,
    /// so that a change committed while it ran is looked at again.
    fn stamp(shared: &Shared) -> (u64, Instant) {
        (shared.queue.changes.load(Ordering::Acquire), Instant::now())
    }

    fn new(url: String, secret: hooks::Secrets, (changes, read): (u64, Instant)) -> Target {
        Target {
            url,
            secret,
            changes,
            read,
        }
    }

    /// Reads the webhook again if it may have changed; `false` if it is disabled or deleted.
    async fn still_enabled(&mut self, shared: &Shared, webhook_id: &str) -> anyhow::Result<bool> {
        let changes = shared.queue.changes.load(Ordering::Acquire);
        if changes == self.changes && self.read.elapsed() < TARGET_FRESH {
            return Ok(true);
        }
        let (changes, read) = Target::stamp(shared);
        match hooks::target(&shared.work.get().await?, webhook_id).await? {
            Some((true, url, secret)) => {
                *self = Target::new(url, secret, (changes, read));
                Ok(true)
            }
            _ => Ok(false),
        }
    }
}

/// How a drain ended.
enum Drain {
    /// Nothing is due any more (or the webhook was disabled).
    Done,
    /// Cluster mode: the claim lapsed before it could be renewed; maybe another node took it.
    Lapsed,
    /// Cluster mode: this node is stopping; another node sends the rest.
    HandedOver,
    /// Its slice is spent while other webhooks wait: queued again.
    Yielded,
}

async fn drain_batches(
    shared: &Shared,
    webhook_id: &str,
    project: &str,
    claim: Option<&mut Claim<'_>>,
) -> anyhow::Result<Drain> {
    // Bound first: a temporary in the `match` would hold the connection for the whole drain.
    let ordering = hooks::ordering(&shared.work.get().await?, webhook_id).await?;
    match ordering {
        // Deleted meanwhile.
        None => Ok(Drain::Done),
        Some(Order::Strict) => drain_strict(shared, webhook_id, project, claim).await,
        Some(Order::Row) => drain_rows(shared, webhook_id, project, claim).await,
    }
}

/// `strict`: one delivery in flight, oldest due first.
async fn drain_strict(
    shared: &Shared,
    webhook_id: &str,
    project: &str,
    mut claim: Option<&mut Claim<'_>>,
) -> anyhow::Result<Drain> {
    // Unknown until the first answer: the first success clears a recorded failure streak.
    let mut failing = true;
    let mut started = 0;
    let began = Instant::now();
    loop {
        if slice_spent(shared, started, began) {
            return Ok(Drain::Yielded);
        }
        let stamp = Target::stamp(shared);
        let due = deliveries::due(&shared.work.get().await?, webhook_id).await?;
        if due.is_empty() {
            return Ok(Drain::Done);
        }
        // Successful attempts are recorded while attempts go on (see [`Recorder`]); all of a
        // batch's before the next batch is read.
        let mut recorder = Recorder::default();
        let mut target: Option<Target> = None;
        // Every way out of the batch goes through the recording below (else what was delivered
        // is sent again).
        let ended: Option<anyhow::Result<Drain>> = 'batch: {
            for d in &due {
                // Before every attempt, not once a batch: a batch of 64 to a receiver that
                // never answers is 64 request timeouts, and 16 such drains held every slot
                // for ≈ 11 minutes while other tenants' webhooks waited (red team rt12). Once
                // an attempt has started: a drain whose wait for a connection and its batch
                // took its whole turn still sends one (else it could yield forever).
                if started > 0 && slice_spent(shared, started, began) {
                    break 'batch Some(Ok(Drain::Yielded));
                }
                let target = target
                    .get_or_insert_with(|| Target::new(d.url.clone(), d.secret.clone(), stamp));
                match target.still_enabled(shared, webhook_id).await {
                    Ok(true) => {}
                    Ok(false) => break 'batch Some(Ok(Drain::Done)),
                    Err(e) => break 'batch Some(Err(e)),
                }
                let mut d = d.clone();
                (d.url, d.secret) = (target.url.clone(), target.secret.clone());
                if let Some(claim) = claim.as_deref_mut() {
                    if shared.handing_over.load(Ordering::Acquire) {
                        break 'batch Some(Ok(Drain::HandedOver));
                    }
                    match claim.keep(shared).await {
                        Ok(true) => {}
                        Ok(false) => break 'batch Some(Ok(Drain::Lapsed)),
                        Err(e) => break 'batch Some(Err(e)),
                    }
                }
                started += 1;
                let mut this = Successes::default();
                let sending = attempt(shared, webhook_id, project, &d, &mut failing, &mut this);
                let (next, failed) = recorder.during(shared, sending).await;
                recorder.add(this);
                // A recording that failed ends the drain once its attempt has (never dropped
                // midway: its outcome is recorded either way).
                let failed = match failed {
                    Some(e) => Some(e),
                    None => recorder.start_if_due(shared).await.err(),
                };
                if let Some(e) = failed {
                    break 'batch Some(Err(e));
                }
                match next {
                    Ok(Next::Continue) => {}
                    Ok(Next::Disabled) => break 'batch Some(Ok(Drain::Done)),
                    Err(e) => break 'batch Some(Err(e)),
                }
            }
            None
        };
        recorder.finish(shared).await?;
        if let Some(ended) = ended {
            return ended;
        }
    }
}

/// A drain's successes not recorded yet, and the recording under way.
///
/// While attempts go on, a background task records the successes so far, one recording at a
/// time: `strict` once the oldest unrecorded success waited [`RECORD_WITHIN`], `row` then or
/// once [`RECORD_BATCH`] wait. A fast receiver's successes go in batches of about 100 ms, a slow
/// one's soon after each answer. [`Recorder::finish`] waits for the recording under way and
/// records the rest itself, before the drain (`row`) or its batch (`strict`) ends.
///
/// Before, `strict` recorded a batch of 64 at its end: with a slow receiver that took minutes,
/// the batch stayed `pending`, and a crash sent every answered delivery again (red team rt11: 9
/// large bodies). A crash before a recording still only means those deliveries go out again,
/// with the same ids: at-least-once either way.
#[derive(Default)]
struct Recorder {
    delivered: Successes,
    /// When the oldest success not yet handed to a recording came (`None` also after a
    /// [`Recorder::start`] that found the previous recording failed: the drain then ends).
    oldest: Option<Instant>,
    recording: Option<tokio::task::JoinHandle<anyhow::Result<()>>>,
    /// `strict`'s deadline timer ([`Recorder::during`]; made on first use), and the deadline it
    /// is set to. One timer, moved only when the deadline does (about every 100 ms with a fast
    /// receiver): a timer per attempt cost 13 % of `strict`'s deliveries/s.
    timer: Option<std::pin::Pin<Box<tokio::time::Sleep>>>,
    armed_for: Option<Instant>,
}

impl Recorder {
    /// Successes to record.
    fn add(&mut self, mut successes: Successes) {
        if !successes.is_empty() {
            self.delivered.append(&mut successes);
            self.succeeded();
        }
    }

    /// A success was added to `delivered`.
    fn succeeded(&mut self) {
        self.oldest.get_or_insert_with(Instant::now);
    }

    /// When the oldest unrecorded success is to be recorded by.
    fn due(&self) -> Option<Instant> {
        self.oldest.map(|t| t + RECORD_WITHIN)
    }

    /// The oldest unrecorded success waited [`RECORD_WITHIN`].
    fn overdue(&self) -> bool {
        self.oldest.is_some_and(|t| t.elapsed() >= RECORD_WITHIN)
    }

    /// No recording under way.
    fn idle(&self) -> bool {
        self.recording.as_ref().is_none_or(|r| r.is_finished())
    }

    /// Hands the successes so far to a background recording, once the previous one ended
    /// (whose error it returns).
    async fn start(&mut self, shared: &Shared) -> anyhow::Result<()> {
        self.oldest = None;
        record_in_background(shared, &mut self.recording, &mut self.delivered).await
    }

    /// `row`: [`Recorder::start`] once [`RECORD_BATCH`] successes wait or the oldest waited
    /// [`RECORD_WITHIN`], when no recording is under way; while one is, the drain goes on and
    /// waits for it only once [`MAX_UNRECORDED`] successes wait behind it. The drain's loop
    /// wakes when a recording ends ([`Recorder::recording_ended`]), so the next one starts then
    /// with everything that came meanwhile: the drain never stands still for a round trip to
    /// the control database, and a busy one's batches grow with what one recording takes.
    async fn start_if_full_or_due(&mut self, shared: &Shared) -> anyhow::Result<()> {
        let waiting = self.delivered.ids.len();
        if waiting < RECORD_BATCH && !self.overdue() {
            return Ok(());
        }
        if !self.idle() && waiting < MAX_UNRECORDED {
            return Ok(());
        }
        self.start(shared).await
    }

    /// Waits for the recording under way to end (pending forever when there is none), and
    /// returns its error.
    async fn recording_ended(&mut self) -> anyhow::Result<()> {
        let Some(recording) = self.recording.as_mut() else {
            return std::future::pending().await;
        };
        let ended = recording.await;
        self.recording = None;
        ended?
    }

    /// `strict`, after an attempt: [`Recorder::start`] if the oldest success waited
    /// [`RECORD_WITHIN`] and no recording is under way.
    async fn start_if_due(&mut self, shared: &Shared) -> anyhow::Result<()> {
        if !self.overdue() || !self.idle() {
            return Ok(());
        }
        self.start(shared).await
    }

    /// Runs a `strict` attempt to its end, starting recordings as they fall due meanwhile. A
    /// recording that fails is returned beside the attempt's outcome: the attempt is never
    /// dropped midway, so its outcome is recorded either way.
    async fn during<F: std::future::Future>(
        &mut self,
        shared: &Shared,
        attempt: F,
    ) -> (F::Output, Option<anyhow::Error>) {
        tokio::pin!(attempt);
        let mut failed: Option<anyhow::Error> = None;
        loop {
            let due = self.due();
            if due != self.armed_for {
                if let Some(due) = due {
                    match self.timer.as_mut() {
                        Some(timer) => timer.as_mut().reset(due.into()),
                        None => self.timer = Some(Box::pin(tokio::time::sleep_until(due.into()))),
                    }
                }
                self.armed_for = due;
            }
            let idle = self.idle();
            let (timer, recording) = (&mut self.timer, &mut self.recording);
            tokio::select! {
                out = &mut attempt => return (out, failed),
                _ = async {
                    match timer.as_mut() {
                        Some(t) => t.await,
                        None => std::future::pending().await,
                    }
                }, if due.is_some() && idle && failed.is_none() => {
                    if let Err(e) = self.start(shared).await {
                        failed = Some(e);
                    }
                }
                // The recording under way ended: the timer may go now.
                ended = async {
                    match recording.as_mut() {
                        Some(r) => r.await,
                        None => std::future::pending().await,
                    }
                }, if !idle => {
                    self.recording = None;
                    match ended {
                        Ok(Ok(())) => {}
                        Ok(Err(e)) => failed = Some(e),
                        Err(e) => failed = Some(e.into()),
                    }
                }
            }
        }
    }

    /// Records everything: the recording under way, then the rest.
    async fn finish(mut self, shared: &Shared) -> anyhow::Result<()> {
        if let Some(last) = self.recording.take() {
            last.await??;
        }
        record(shared, &self.delivered).await
    }
}

/// Most pending deliveries a `row` drain holds in memory (its window of the oldest ones).
const WINDOW: usize = 2048;
/// A `row` drain reads the next page of the outbox once this much of its window is free.
const REFILL_AT: usize = 256;
/// A page of the outbox being read, in a task of its own. Aborted when dropped (the drain ended, or failed, with the read under way): a page nobody
/// will use does not go on holding one of the worker's few control connections.
struct PageRead(tokio::task::JoinHandle<anyhow::Result<Page>>);

/// A page read: the page, how many deliveries were asked for, and the webhook's freshness
/// stamp taken before the read ([`Target::stamp`]).
type Page = (Option<PendingPage>, usize, (u64, Instant));

impl Drop for PageRead {
    fn drop(&mut self) {
        self.0.abort();
    }
}
/// Successes that start a recording (one UPDATE of every success waiting) when none is under
/// way; fewer are recorded when the drain goes idle or after [`RECORD_WITHIN`].
const RECORD_BATCH: usize = 64;
/// Successes a `row` drain lets wait behind a recording under way before it waits for that
/// recording itself. About twice this many are unrecorded at once (one recording of them and
/// as many waiting, each side up to what one look at the attempts settles more): what a crash
/// sends again, besides what was in flight.
const MAX_UNRECORDED: usize = 256;
/// The longest a success waits to be recorded while the drain is busy.
const RECORD_WITHIN: Duration = Duration::from_millis(100);

/// `row`: up to `webhook_max_in_flight` deliveries in flight under [`super::window`]'s rules.
///
/// One task: the attempts are futures polled together (the HTTP connections are the client's
/// own tasks); each outcome is settled here, one at a time, so the bookkeeping of failures is
/// sequential as in `strict`. Successes are recorded in batches, in the background, one batch at
/// a time ([`Recorder`]); the last batch is recorded before the drain ends (a later drain reads
/// the outbox again). The drain reads the outbox a page at a time, after the last delivery it read; the
/// outbox writer's signal (see [`Queue::stored`]) says there are more. It ends when nothing is
/// in flight and nothing can start: what waits for a retry is then found by the periodic scan.
async fn drain_rows(
    shared: &Shared,
    webhook_id: &str,
    project: &str,
    mut claim: Option<&mut Claim<'_>>,
) -> anyhow::Result<Drain> {
    let cap = shared.settings.max_in_flight.max(1);
    let signal = shared.queue.signal(webhook_id);
    let mut window = Window::default();
    let mut target: Option<Target> = None;
    // The outbox may hold pending deliveries after the window.
    let mut more = true;
    let mut stopping: Option<Drain> = None;
    let mut in_flight = FuturesUnordered::new();
    // The next page of the outbox being read, if any: in a task of its own, so that the pool
    // connection it holds is never held by a future this loop does not poll while it waits for
    // another connection itself (as `attempt::send` reads a large body).
    let mut reading: Option<PageRead> = None;
    // Unknown until the first answer: the first success clears a recorded failure streak.
    let mut failing = true;
    let mut recorder = Recorder::default();
    let mut started_total = 0;
    let began = Instant::now();
    let result = loop {
        if stopping.is_none() && slice_spent(shared, started_total, began) {
            // What is in flight is settled first; the window is read again next turn.
            stopping = Some(Drain::Yielded);
        }
        if stopping.is_none()
            && more
            && reading.is_none()
            && (window.len() + REFILL_AT <= WINDOW
                || (window.in_flight() == 0 && window.len() < WINDOW))
        {
            // Read while the attempts in flight go on and are settled (the loop waits for the
            // page only when nothing else is left to do): a page of a busy outbox takes
            // milliseconds, and an inline read stood the whole drain still meanwhile.
            let stamp = Target::stamp(shared);
            let after = window.position().map(|(at, event)| (at, event.to_string()));
            let want = WINDOW - window.len();
            // Set again by the outbox writer's signal while the page is read, or by a full page.
            more = false;
            let (pool, webhook) = (shared.work.clone(), webhook_id.to_string());
            reading = Some(PageRead(tokio::spawn(async move {
                let after = after.as_ref().map(|(at, event)| (*at, event.as_str()));
                let control = pool.get().await?;
                let page =
                    deliveries::pending_after(&control, &webhook, after, want as i64).await?;
                anyhow::Ok((page, want, stamp))
            })));
        }
        let mut started = false;
        let now = chrono::Utc::now();
        if stopping.is_none() {
            if let Some(t) = target.as_mut() {
                if !t.still_enabled(shared, webhook_id).await? {
                    // Disabled or deleted: what is in flight ends; nothing more starts.
                    stopping = Some(Drain::Done);
                }
            }
        }
        if stopping.is_none() {
            let room = cap.saturating_sub(window.in_flight());
            let none = hooks::Secrets::default();
            let (url, secret) = target
                .as_ref()
                .map_or(("", &none), |t| (t.url.as_str(), &t.secret));
            for seq in window.startable(now, room) {
                if let Some(claim) = claim.as_deref_mut() {
                    if shared.handing_over.load(Ordering::Acquire) {
                        stopping = Some(Drain::HandedOver);
                        break;
                    }
                    if !claim.keep(shared).await? {
                        stopping = Some(Drain::Lapsed);
                        break;
                    }
                }
                let due = window.start(seq, url, secret);
                started = true;
                started_total += 1;
                in_flight.push(async move {
                    let sent = attempt::send(shared, &due, project).await;
                    (seq, due, sent)
                });
            }
        }
        // A retry whose time has not come yet (one due by `now` was just looked at).
        let retry_in = window
            .next_due(now)
            .map(|t| (t - now).to_std().unwrap_or(Duration::ZERO));
        if window.in_flight() == 0 && !started && (reading.is_none() || stopping.is_some()) {
            if stopping.is_none() && more && window.len() < WINDOW {
                continue;
            }
            // Nothing in flight, nothing can start: a retry due before the next scan is waited
            // for here; a later one (or what lies beyond a window of held deliveries) is found
            // again by the periodic scan.
            let soon = retry_in.is_some_and(|d| d < shared.settings.scan_interval);
            if stopping.is_some() || !soon {
                break stopping.unwrap_or(Drain::Done);
            }
        }
        recorder.start_if_full_or_due(shared).await?;
        let retry_in = retry_in.unwrap_or(Duration::from_secs(3600));
        // While a recording is under way, its end wakes the loop (`recording_ended`): an
        // overdue success must not turn the timer into a busy loop meanwhile.
        let record_in = recorder
            .due()
            .filter(|_| recorder.idle())
            .map(|t| t.saturating_duration_since(Instant::now()))
            .unwrap_or(Duration::from_secs(3600));
        tokio::select! {
            Some((seq, due, sent)) = in_flight.next() => {
                let mut outcomes = vec![(seq, due, sent)];
                // Whatever else has finished meanwhile, settled before the next look.
                while let Some(Some(o)) = futures_util::FutureExt::now_or_never(in_flight.next()) {
                    outcomes.push(o);
                }
                for (seq, due, sent) in outcomes {
                    let sent = match sent {
                        Ok(Some(sent)) => sent,
                        // Gone from the outbox (its webhook was deleted): nothing to record.
                        Ok(None) => {
                            window.finish(seq);
                            continue;
                        }
                        // Its body could not be read (nothing was sent): tried again shortly,
                        // no attempt counted; the rest of the drain goes on.
                        Err(e) => {
                            tracing::warn!(webhook_id, delivery_id = %due.id, error = %e, "reading a delivery's body; trying again");
                            window.retry(seq, due.attempts, chrono::Utc::now() + chrono::Duration::seconds(2));
                            continue;
                        }
                    };
                    match attempt::settle(shared, webhook_id, &due, sent, &mut failing, &mut recorder.delivered).await? {
                        Settled::Delivered => {
                            recorder.succeeded();
                            window.finish(seq);
                        }
                        Settled::Failed => window.finish(seq),
                        Settled::Retry { attempts, next_attempt_at } => {
                            window.retry(seq, attempts, next_attempt_at)
                        }
                        Settled::Disabled => {
                            window.finish(seq);
                            stopping.get_or_insert(Drain::Done);
                        }
                    }
                }
            }
            read = async { (&mut reading.as_mut().expect("reading").0).await }, if reading.is_some() && stopping.is_none() => {
                reading = None;
                let (page, want, stamp) = read??;
                match page {
                    Some(page) if page.enabled => {
                        more |= page.rows.len() == want;
                        target = Some(Target::new(page.url, page.secret, stamp));
                        for q in page.rows {
                            window.push(q);
                        }
                    }
                    // Disabled or deleted: what is in flight ends; nothing more starts.
                    _ => stopping = Some(Drain::Done),
                }
            }
            _ = signal.notified() => more = true,
            // The next recording may start now, with what came meanwhile.
            ended = recorder.recording_ended(), if !recorder.idle() => ended?,
            _ = tokio::time::sleep(retry_in.min(record_in)) => {}
        }
    };
    recorder.finish(shared).await?;
    Ok(result)
}

/// Records the successes so far in a background task, after the previous batch's.
async fn record_in_background(
    shared: &Shared,
    recording: &mut Option<tokio::task::JoinHandle<anyhow::Result<()>>>,
    delivered: &mut Successes,
) -> anyhow::Result<()> {
    if delivered.is_empty() {
        return Ok(());
    }
    if let Some(previous) = recording.take() {
        previous.await??;
    }
    let batch = std::mem::take(delivered);
    let control = shared.work.clone();
    *recording = Some(tokio::spawn(async move {
        deliveries::mark_delivered(&control.get().await?, &batch).await?;
        Ok(())
    }));
    Ok(())
}

/// How long a drain claim lasts (cluster mode).
///
/// An attempt is bounded by the egress client's total timeout (10 s, connect included, body read
/// included: [`super::attempt`]), then a few control-database writes record it. The drainer
/// renews before every attempt that would start with less than [`RENEW_BELOW`] (20 s) left, so
/// each attempt starts with at least 20 s of claim: 10 s for the request and 10 s for its
/// bookkeeping (and the batch's successes, recorded after its last attempt). A live drainer
/// therefore never loses its claim mid-attempt, and another node never sends a delivery whose
/// attempt has not been recorded yet. A node that dies keeps its claims for at most 30 s; then
/// another node sends what it had not recorded (at-least-once, same delivery ids).
const DRAIN_LEASE: Duration = Duration::from_secs(30);
/// Renew a claim before an attempt when less than this is left of it.
const RENEW_BELOW: Duration = Duration::from_secs(20);

/// This node's claim on a webhook's drain (cluster mode), and when it runs out at the latest
/// (measured from before the statement that took it, so never later than the database's).
struct Claim<'a> {
    webhook_id: &'a str,
    node: &'a str,
    until: Instant,
}

impl<'a> Claim<'a> {
    /// Takes the claim, or `None` while another node holds it.
    async fn take(
        shared: &Shared,
        webhook_id: &'a str,
        node: &'a str,
    ) -> anyhow::Result<Option<Claim<'a>>> {
        let asked = Instant::now();
        let control = shared.work.get().await?;
        let taken =
            hooks::claim_drain(&control, webhook_id, node, DRAIN_LEASE.as_secs_f64()).await?;
        Ok(taken.then_some(Claim {
            webhook_id,
            node,
            until: asked + DRAIN_LEASE,
        }))
    }

    /// True when the claim is held with at least [`RENEW_BELOW`] left (renewing it if need be);
    /// false when it lapsed, or another node holds it.
    async fn keep(&mut self, shared: &Shared) -> anyhow::Result<bool> {
        if self.until.saturating_duration_since(Instant::now()) >= RENEW_BELOW {
            return Ok(true);
        }
        let asked = Instant::now();
        let control = shared.work.get().await?;
        if hooks::renew_drain(
            &control,
            self.webhook_id,
            self.node,
            DRAIN_LEASE.as_secs_f64(),
        )
        .await?
        {
            self.until = asked + DRAIN_LEASE;
            Ok(true)
        } else {
            Ok(false)
        }
    }

    async fn release(self, shared: &Shared) -> anyhow::Result<()> {
        hooks::release_drain(&shared.work.get().await?, self.webhook_id, self.node).await?;
        Ok(())
    }
}

/// Cluster mode: drains while holding the webhook's claim. Another node's claim means that node
/// drains (and looks again after it gives the claim back, so nothing stored meanwhile waits for
/// the next scan).
async fn drain_claimed(
    shared: &Shared,
    webhook_id: &str,
    project: &str,
    node: &str,
) -> anyhow::Result<Yield> {
    loop {
        let Some(mut claim) = Claim::take(shared, webhook_id, node).await? else {
            return Ok(Yield::Done);
        };
        let drained = drain_batches(shared, webhook_id, project, Some(&mut claim)).await;
        let released = claim.release(shared).await;
        match drained? {
            // The claim lapsed (this node stalled): start over from the outbox, claiming again.
            Drain::Lapsed => continue,
            Drain::HandedOver => return released.map(|_| Yield::Done),
            // Given back for now; this node's worker queues it again.
            Drain::Yielded => return released.map(|_| Yield::Yielded),
            Drain::Done => released?,
        }
        // Given back: look once more. A delivery committed after this drain's last look was
        // announced to its node's worker after its commit; if that worker found the claim still
        // ours, it left the delivery to us, and this look (after the release) sees it.
        if !deliveries::any_due(&shared.work.get().await?, webhook_id).await? {
            return Ok(Yield::Done);
        }
    }
}

async fn record(shared: &Shared, delivered: &Successes) -> anyhow::Result<()> {
    if delivered.is_empty() {
        return Ok(());
    }
    deliveries::mark_delivered(&shared.work.get().await?, delivered).await?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn busy(entries: &[(&str, &str)]) -> HashMap<String, (String, Arc<Notify>)> {
        entries
            .iter()
            .map(|(h, p)| (h.to_string(), (p.to_string(), Arc::default())))
            .collect()
    }

    #[test]
    fn projects_take_turns_within_both_caps() {
        let mut s = Scheduler::default();
        for h in ["e1", "e2", "e3", "e4"] {
            s.offer(h.into(), "E".into());
        }
        s.offer("a1".into(), "A".into());
        s.offer("e1".into(), "E".into()); // already waiting: held once
        assert_eq!(s.len(), 5);
        let mut running = busy(&[]);
        let mut order = Vec::new();
        while let Some((h, p)) = s.next(&running, 4, 2) {
            order.push(h.clone());
            running.insert(h, (p, Arc::default()));
        }
        // E and A in turn; E stops at its cap of 2 although slots are free.
        assert_eq!(order, ["e1", "a1", "e2"]);
        assert_eq!(s.len(), 2);
        // One of E's ends: its next webhook starts.
        running.remove("e1");
        assert_eq!(s.next(&running, 4, 2), Some(("e3".into(), "E".into())));
        // Every slot taken: nothing starts.
        let full = busy(&[("x", "X"), ("y", "Y"), ("z", "Z"), ("w", "W")]);
        assert_eq!(s.next(&full, 4, 2), None);
    }

    #[test]
    fn a_webhook_draining_already_stays_queued() {
        let mut s = Scheduler::default();
        s.offer("e1".into(), "E".into());
        s.offer("e2".into(), "E".into());
        let running = busy(&[("e1", "E")]);
        assert_eq!(s.next(&running, 4, 4), Some(("e2".into(), "E".into())));
        assert_eq!(s.next(&running, 4, 4), None);
        assert_eq!(s.len(), 1);
        assert_eq!(s.next(&busy(&[]), 4, 4), Some(("e1".into(), "E".into())));
        assert_eq!(s.len(), 0);
    }
}
