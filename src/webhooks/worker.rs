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

use std::collections::{HashMap, HashSet};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, Weak};
use std::time::{Duration, Instant};

use tokio::sync::Notify;

use futures_util::stream::{FuturesUnordered, StreamExt};

use super::attempt::{self, attempt, Next, Settled};
use super::window::Window;
use super::Shared;
use crate::control::deliveries::{self, Successes};
use crate::control::webhooks::{self as hooks, Ordering as Order};

/// How long delivered deliveries stay in the log.
const RETENTION: &str = "7 days";

/// What the worker is told between its scans.
#[derive(Default)]
pub(super) struct Queue {
    /// Wakes the delivery worker.
    wake: Notify,
    /// Webhooks with deliveries stored since the worker last looked (or that it found busy):
    /// the worker drains these without asking the database which webhooks have due deliveries.
    fresh: Mutex<HashSet<String>>,
    /// Set when the worker should look for due deliveries of every webhook at once (a webhook
    /// enabled again, a delivery re-queued), not only at its periodic scan.
    scan: AtomicBool,
    /// Webhooks being drained, and how to tell their drain that new deliveries were stored.
    busy: Mutex<HashMap<String, Arc<Notify>>>,
}

impl Queue {
    /// New deliveries of `hooks` are stored: the worker sends them at once.
    pub(super) fn stored(&self, hooks: impl IntoIterator<Item = String>) {
        let mut fresh = self.fresh.lock().expect("poisoned");
        fresh.extend(hooks);
        let busy = self.busy.lock().expect("poisoned");
        for hook in fresh.iter() {
            if let Some(signal) = busy.get(hook) {
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
            .cloned()
            .unwrap_or_default()
    }

    /// No webhook is being drained.
    pub(super) fn idle(&self) -> bool {
        self.busy.lock().expect("poisoned").is_empty()
    }

    /// Deliveries may have become due outside the outbox: the worker scans at once.
    pub(super) fn rescan(&self) {
        self.scan.store(true, Ordering::Relaxed);
        self.wake.notify_one();
    }
}

/// Runs until the service is dropped.
pub(super) async fn run(shared: Weak<Shared>) {
    let mut last_prune = Instant::now() - Duration::from_secs(3600);
    let mut last_scan: Option<Instant> = None;
    loop {
        let Some(strong) = shared.upgrade() else {
            return;
        };
        if last_prune.elapsed() > Duration::from_secs(3600) {
            last_prune = Instant::now();
            if let Ok(c) = strong.control.get().await {
                let _ = deliveries::prune_delivered(&c, RETENTION).await;
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
        }
        for hook in candidates {
            let mut busy = queue.busy.lock().expect("poisoned");
            if busy.insert(hook.clone(), Default::default()).is_some() {
                // Being drained: look again when that drain ends (it wakes the worker), in
                // case the new deliveries came after its last look.
                drop(busy);
                queue.fresh.lock().expect("poisoned").insert(hook);
                continue;
            }
            drop(busy);
            let shared = Arc::downgrade(&strong);
            tokio::spawn(async move {
                if let Some(s) = shared.upgrade() {
                    let _done = Drained {
                        queue: &s.queue,
                        hook: &hook,
                    };
                    if let Err(e) = drain(&s, &hook).await {
                        tracing::warn!(webhook = %hook, error = %e, "delivering webhooks");
                    }
                }
            });
        }
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

async fn due_webhooks(shared: &Shared) -> anyhow::Result<Vec<String>> {
    Ok(hooks::with_due_deliveries(&shared.control.get().await?).await?)
}

/// Sends a webhook's due deliveries in order until none is due; in cluster mode only while this
/// node holds the webhook's drain claim ([`Claim`]).
async fn drain(shared: &Shared, webhook_id: &str) -> anyhow::Result<()> {
    match &shared.settings.node_id {
        None => drain_batches(shared, webhook_id, None).await.map(|_| ()),
        Some(node) => drain_claimed(shared, webhook_id, node).await,
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
}

async fn drain_batches(
    shared: &Shared,
    webhook_id: &str,
    claim: Option<&mut Claim<'_>>,
) -> anyhow::Result<Drain> {
    match hooks::ordering(&shared.control.get().await?, webhook_id).await? {
        // Deleted meanwhile.
        None => Ok(Drain::Done),
        Some(Order::Strict) => drain_strict(shared, webhook_id, claim).await,
        Some(Order::Row) => drain_rows(shared, webhook_id, claim).await,
    }
}

/// `strict`: one delivery in flight, oldest due first.
async fn drain_strict(
    shared: &Shared,
    webhook_id: &str,
    mut claim: Option<&mut Claim<'_>>,
) -> anyhow::Result<Drain> {
    // Unknown until the first answer: the first success clears a recorded failure streak.
    let mut failing = true;
    loop {
        let due = deliveries::due(&shared.control.get().await?, webhook_id).await?;
        if due.is_empty() {
            return Ok(Drain::Done);
        }
        // Successful attempts of one batch, recorded with a single UPDATE. A crash before it
        // only means these deliveries go out again, with the same ids: at-least-once either way.
        let mut delivered = Successes::default();
        for d in &due {
            if let Some(claim) = claim.as_deref_mut() {
                if shared.handing_over.load(Ordering::Acquire) {
                    record(shared, &delivered).await?;
                    return Ok(Drain::HandedOver);
                }
                if !claim.keep(shared).await? {
                    record(shared, &delivered).await?;
                    return Ok(Drain::Lapsed);
                }
            }
            match attempt(shared, webhook_id, d, &mut failing, &mut delivered).await? {
                Next::Continue => {}
                Next::Disabled => {
                    record(shared, &delivered).await?;
                    return Ok(Drain::Done);
                }
            }
        }
        record(shared, &delivered).await?;
    }
}

/// Most pending deliveries a `row` drain holds in memory (its window of the oldest ones).
const WINDOW: usize = 2048;
/// A `row` drain reads the next page of the outbox once this much of its window is free.
const REFILL_AT: usize = 256;
/// Successes recorded with one UPDATE (at most; fewer when the drain goes idle or after
/// [`RECORD_WITHIN`]). With one batch being recorded and one filling, at most twice this many
/// successes are unrecorded at once: what a crash sends again, besides what was in flight.
const RECORD_BATCH: usize = 64;
/// The longest a success waits to be recorded while the drain is busy.
const RECORD_WITHIN: Duration = Duration::from_millis(100);

/// `row`: up to `webhook_max_in_flight` deliveries in flight under [`super::window`]'s rules.
///
/// One task: the attempts are futures polled together (the HTTP connections are the client's
/// own tasks); each outcome is settled here, one at a time, so the bookkeeping of failures is
/// sequential as in `strict`. Successes are recorded in batches, in the background, one batch at
/// a time; the drain ends only after its last batch is recorded (a later drain reads the outbox
/// again). The drain reads the outbox a page at a time, after the last delivery it read; the
/// outbox writer's signal (see [`Queue::stored`]) says there are more. It ends when nothing is
/// in flight and nothing can start: what waits for a retry is then found by the periodic scan.
async fn drain_rows(
    shared: &Shared,
    webhook_id: &str,
    mut claim: Option<&mut Claim<'_>>,
) -> anyhow::Result<Drain> {
    let cap = shared.settings.max_in_flight.max(1);
    let signal = shared.queue.signal(webhook_id);
    let mut window = Window::default();
    let mut target = (String::new(), String::new());
    // The outbox may hold pending deliveries after the window.
    let mut more = true;
    let mut stopping: Option<Drain> = None;
    let mut in_flight = FuturesUnordered::new();
    // Unknown until the first answer: the first success clears a recorded failure streak.
    let mut failing = true;
    let mut delivered = Successes::default();
    let mut oldest_success: Option<Instant> = None;
    let mut recording: Option<tokio::task::JoinHandle<anyhow::Result<()>>> = None;
    let result = loop {
        if stopping.is_none()
            && more
            && (window.len() + REFILL_AT <= WINDOW
                || (window.in_flight() == 0 && window.len() < WINDOW))
        {
            let page = deliveries::pending_after(
                &shared.control.get().await?,
                webhook_id,
                window.position(),
                (WINDOW - window.len()) as i64,
            )
            .await?;
            match page {
                Some(page) if page.enabled => {
                    more = page.rows.len() == WINDOW - window.len();
                    target = (page.url, page.secret);
                    for q in page.rows {
                        window.push(q);
                    }
                }
                // Disabled or deleted: what is in flight ends; nothing more starts.
                _ => stopping = Some(Drain::Done),
            }
        }
        let mut started = false;
        let now = chrono::Utc::now();
        if stopping.is_none() {
            let room = cap.saturating_sub(window.in_flight());
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
                let due = window.start(seq, &target.0, &target.1);
                started = true;
                in_flight.push(async move {
                    let sent = attempt::send(shared, &due).await;
                    (seq, due, sent)
                });
            }
        }
        // A retry whose time has not come yet (one due by `now` was just looked at).
        let retry_in = window
            .next_due(now)
            .map(|t| (t - now).to_std().unwrap_or(Duration::ZERO));
        if window.in_flight() == 0 && !started {
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
        if delivered.ids.len() >= RECORD_BATCH
            || oldest_success.is_some_and(|t| t.elapsed() >= RECORD_WITHIN)
        {
            record_in_background(shared, &mut recording, &mut delivered).await?;
            oldest_success = None;
        }
        let retry_in = retry_in.unwrap_or(Duration::from_secs(3600));
        let record_in = oldest_success
            .map(|t| RECORD_WITHIN.saturating_sub(t.elapsed()))
            .unwrap_or(Duration::from_secs(3600));
        tokio::select! {
            Some((seq, due, sent)) = in_flight.next() => {
                let mut outcomes = vec![(seq, due, sent)];
                // Whatever else has finished meanwhile, settled before the next look.
                while let Some(Some(o)) = futures_util::FutureExt::now_or_never(in_flight.next()) {
                    outcomes.push(o);
                }
                for (seq, due, sent) in outcomes {
                    match attempt::settle(shared, webhook_id, &due, sent, &mut failing, &mut delivered).await? {
                        Settled::Delivered => {
                            oldest_success.get_or_insert_with(Instant::now);
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
            _ = signal.notified() => more = true,
            _ = tokio::time::sleep(retry_in.min(record_in)) => {}
        }
    };
    record_in_background(shared, &mut recording, &mut delivered).await?;
    if let Some(last) = recording.take() {
        last.await??;
    }
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
    let control = shared.control.clone();
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
        let control = shared.control.get().await?;
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
        let control = shared.control.get().await?;
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
        hooks::release_drain(&shared.control.get().await?, self.webhook_id, self.node).await?;
        Ok(())
    }
}

/// Cluster mode: drains while holding the webhook's claim. Another node's claim means that node
/// drains (and looks again after it gives the claim back, so nothing stored meanwhile waits for
/// the next scan).
async fn drain_claimed(shared: &Shared, webhook_id: &str, node: &str) -> anyhow::Result<()> {
    loop {
        let Some(mut claim) = Claim::take(shared, webhook_id, node).await? else {
            return Ok(());
        };
        let drained = drain_batches(shared, webhook_id, Some(&mut claim)).await;
        let released = claim.release(shared).await;
        match drained? {
            // The claim lapsed (this node stalled): start over from the outbox, claiming again.
            Drain::Lapsed => continue,
            Drain::HandedOver => return released,
            Drain::Done => released?,
        }
        // Given back: look once more. A delivery committed after this drain's last look was
        // announced to its node's worker after its commit; if that worker found the claim still
        // ours, it left the delivery to us, and this look (after the release) sees it.
        if !deliveries::any_due(&shared.control.get().await?, webhook_id).await? {
            return Ok(());
        }
    }
}

async fn record(shared: &Shared, delivered: &Successes) -> anyhow::Result<()> {
    if delivered.is_empty() {
        return Ok(());
    }
    deliveries::mark_delivered(&shared.control.get().await?, delivered).await?;
    Ok(())
}
