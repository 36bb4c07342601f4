//! A room's pump: its durable subscription to the project's change stream (from the room's
//! creation on, subscribers or not). Per batch: drop replays, charge SQL broadcasts to the
//! project's budget, decide row-level security per live identity (outside the locks), then
//! store and fan out a slice at a time ([`Room::ingest`]). The history is fsynced off the pump
//! (group commit) and the slot acknowledged only past what an fsync covered.
//!
//! ```text
//!  ProjectBus ─► batch ─► verdicts (crate::visibility) ─► ingest: history append + fan-out
//!                  tick ─► fsync job ─► ack(end LSN) ─► the slot may move on
//! ```

use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

use super::room::Room;
use super::Realtime;
use crate::bus::{Event, EventKind};
use crate::visibility::Verdicts;
use fluxbase_replication::pgoutput::Lsn;

/// An fsync of the history running on the blocking pool: the job back, and its result.
type SyncTask = tokio::task::JoinHandle<(super::history::SyncJob, std::io::Result<()>)>;
/// Events the pump stores (and fsyncs) at a time.
const PUMP_BATCH: usize = 1024;
/// A batch also ends once its events hold this many bytes: taking events off the bus gives their
/// room back to the stream, so a batch bounded in events only (1,024 rows near the 16 MiB row
/// bound) would hold what the bus's byte bound keeps out of its queue.
const PUMP_BATCH_BYTES: usize = 4 << 20;
/// How often the pump makes what was stored since durable and trims by age when idle.
const PUMP_TICK: Duration = Duration::from_millis(500);

/// Events the pump delivers under one lock before it lets other tasks (the sockets' writers)
/// run.
const DELIVERY_SLICE: usize = 64;

/// Starts a room's pump; it ends when the room or the service is dropped, or the bus closes.
pub(super) fn spawn(rt: &Arc<Realtime>, room: &Arc<Room>) -> tokio::task::JoinHandle<()> {
    let fresh = room
        .history
        .lock()
        .expect("poisoned")
        .as_ref()
        .is_none_or(|h| h.last_seen().is_none());
    let mut sub = match rt.relay.get() {
        // Cluster mode: the project's stream through this node's consumer.
        Some(relay) => relay.subscribe(&room.project_id, fresh),
        None => rt.bus.project(&room.project_id).subscribe_durable(),
    };
    let weak_room = Arc::downgrade(room);
    let weak_rt = Arc::downgrade(rt);
    let project = room.project_id.clone();
    tokio::spawn(async move {
        let mut tick = tokio::time::interval(PUMP_TICK);
        // Stored but not covered by an fsync yet (or an fsync or a gap's record failed).
        let mut pending_ack: Option<Lsn> = None;
        // The fsync under way, off the pump so that delivery never waits for the disk, and
        // the acknowledgement it makes durable. At most one at a time: what is stored
        // meanwhile goes into the next (group commit).
        let mut syncing: Option<(SyncTask, Option<Lsn>)> = None;
        // Why the project's events are not arriving, as last announced (none: they are).
        let mut degraded: Option<String> = None;
        loop {
            let mut batch = Vec::new();
            let mut synced = None;
            tokio::select! {
                e = sub.recv() => match e {
                    Some(e) => batch.push(e),
                    None => return,
                },
                _ = tick.tick() => {}
                r = async { (&mut syncing.as_mut().expect("guarded").0).await },
                    if syncing.is_some() => synced = Some(r),
            }
            // What is queued, up to a schema event (policies may change with it) or the
            // batch bound: one row-level security evaluation for all of it.
            let mut bytes = batch.first().map_or(0, |e| e.held_bytes());
            while batch.len() < PUMP_BATCH
                && bytes < PUMP_BATCH_BYTES
                && !matches!(
                    batch.last().map(|e| &e.kind),
                    Some(EventKind::Schema { .. })
                )
            {
                match sub.try_recv() {
                    Some(e) => {
                        bytes += e.held_bytes();
                        batch.push(e);
                    }
                    None => break,
                }
            }
            let (Some(room), Some(rt)) = (weak_room.upgrade(), weak_rt.upgrade()) else {
                return;
            };
            let Ok(host) = rt.host() else {
                return;
            };
            // Whether the project's events are arriving: through NATS (cluster mode) or from
            // this server's own stream (single node).
            let now = match rt.relay.get() {
                Some(relay) => relay.degraded(&room.project_id).map(|why| {
                    format!(
                        "Changes are delayed: {why}. Nothing is lost; they arrive when it is back."
                    )
                }),
                None => host.stream_delayed(&room.project_id),
            };
            if now != degraded {
                room.announce(now.as_deref());
                degraded = now;
            }
            if let Some(result) = synced {
                let (_, covers) = syncing.take().expect("in flight");
                match result {
                    Ok((_, Ok(()))) => {
                        // A gap inside what it covers was recorded by the job itself.
                        if let Some(end) = covers {
                            sub.ack(end);
                        }
                    }
                    Ok((job, Err(e))) => {
                        tracing::error!(room = room.room_id, error = %e, "fsync of the realtime history (retried)");
                        if let Some(h) = room.history.lock().expect("poisoned").as_mut() {
                            h.sync_failed(job);
                        }
                        pending_ack = pending_ack.max(covers);
                    }
                    Err(_) => pending_ack = pending_ack.max(covers),
                }
            }
            // The end of the last whole transaction of the batch: acknowledged once stored.
            let ack = batch
                .iter()
                .rev()
                .find(|e| e.last_in_transaction)
                .map(|e| e.end_lsn);
            let schema_changed = batch
                .iter()
                .any(|e| matches!(e.kind, EventKind::Schema { .. }));
            // Replays (after a rewind or a restart) are neither evaluated nor charged to
            // the broadcast budget.
            let batch = room.unseen(batch);
            let max = rt.settings.realtime_max_broadcast_bytes;
            let events: Vec<(Arc<Event>, bool)> = batch
                .into_iter()
                .map(|event| {
                    // Over the project's budget: dropped for every member alike, rather
                    // than filling every member's queue.
                    // Client and REST broadcasts relayed through the cluster's stream were
                    // charged where they were sent (their commit LSN is not the WAL's).
                    let skip = matches!(event.kind, EventKind::Broadcast { .. })
                        && event.commit_lsn != Lsn(u64::MAX)
                        && event.payload.len() <= max
                        && !room.admit_broadcast(event.payload.len());
                    if skip {
                        rt.metrics
                            .realtime_broadcasts_dropped
                            .fetch_add(1, Ordering::Relaxed);
                    }
                    (event, skip)
                })
                .collect();
            // The batch as the visibility check takes it: made only when an identity needs
            // verdicts (a room without live members clones no event).
            let mut all: Vec<Arc<Event>> = Vec::new();
            let mut verdicts = Verdicts::default();
            let mut missing = room.identities();
            // Stored and delivered a slice at a time, letting the sockets' writers run in
            // between; verdicts computed outside the locks, again for any identity that
            // went live meanwhile.
            for (n, slice) in events.chunks(DELIVERY_SLICE).enumerate() {
                loop {
                    if !missing.is_empty() {
                        if all.is_empty() {
                            all = events.iter().map(|(e, _)| e.clone()).collect();
                        }
                        let more = rt
                            .visibility
                            .verdicts(&*host, &project, &missing, &all)
                            .await;
                        verdicts.merge(more);
                    }
                    match room.ingest(slice, n * DELIVERY_SLICE, &verdicts, max, &rt.delivered) {
                        Ok(()) => break,
                        Err(joined) => missing = joined,
                    }
                }
                missing.clear();
                tokio::task::yield_now().await;
            }
            if schema_changed {
                // Policies, RLS switches and grants come as schema events, in commit order:
                // the events after this one are decided on the catalog as it is now.
                rt.visibility.invalidate(&project);
            }
            // fsync per group of batches, outside the locks and off the pump; only then is
            // the slot allowed past them. A failed fsync is retried (on the next tick at the
            // latest) and nothing is acknowledged past it until one succeeds; a failed write
            // is never acknowledged past until its gap is durably recorded in the floor.
            pending_ack = pending_ack.max(ack);
            let (job, trims) = match room.history.lock().expect("poisoned").as_mut() {
                Some(h) => (
                    if syncing.is_none() {
                        h.sync_job()
                    } else {
                        None
                    },
                    h.take_trims(),
                ),
                None => (None, Vec::new()),
            };
            if !trims.is_empty() {
                let done = tokio::task::spawn_blocking(move || {
                    trims.into_iter().try_for_each(|t| t.run())
                })
                .await;
                if let Ok(Err(e)) = done {
                    tracing::error!(room = room.room_id, error = %e, "trimming the realtime history");
                }
            }
            if let Some(job) = job {
                let covers = pending_ack.take();
                let task = tokio::task::spawn_blocking(move || {
                    let r = job.run();
                    (job, r)
                });
                syncing = Some((task, covers));
            } else if syncing.is_none() {
                // Nothing stored is waiting for an fsync: what is pending is durable, unless
                // a failed write's gap is not recorded yet.
                let unrecorded = room
                    .history
                    .lock()
                    .expect("poisoned")
                    .as_ref()
                    .is_some_and(|h| h.gap_unrecorded());
                if !unrecorded {
                    if let Some(end) = pending_ack.take() {
                        sub.ack(end);
                    }
                }
            }
        }
    })
}
