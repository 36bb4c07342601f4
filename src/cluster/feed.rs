//! A room's feed in cluster mode: the project's JetStream stream through this node's durable
//! consumer (`rt_<node id>`), as a [`Subscription`] like the in-process bus gives. The room's
//! pump acknowledges a transaction once its history holds it; the consumer is acknowledged up
//! to that transaction's last message (`AckPolicy::All`), so after a restart this node's room
//! resumes where its history ends, and replays are dropped by id as from the bus.
//!
//! A room whose history is empty (a new node, a wiped data directory) starts its consumer over
//! from the first message the stream retains, so that `since` reaches back as far on every node.
//! While NATS is down the feed retries with backoff; the room keeps its members and history.

use std::collections::VecDeque;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use async_nats::jetstream::consumer::{pull, AckPolicy, DeliverPolicy};
use futures_util::StreamExt;
use tokio::sync::{mpsc, watch};

use super::Cluster;
use crate::bus::{Event, Subscription, SubscriptionLink, DURABLE_QUEUE_LEN};
use fluxbase_replication::pgoutput::Lsn;

/// Unacknowledged messages the consumer may hand out (the pump acknowledges per fsync, twice
/// a second at most; at 100,000 events/s that is 50,000 pending).
const MAX_ACK_PENDING: i64 = 200_000;

struct FeedLink {
    acked: watch::Sender<Lsn>,
    down: Arc<AtomicBool>,
    task: tokio::task::JoinHandle<()>,
}

impl SubscriptionLink for FeedLink {
    fn ack(&self, end_lsn: Lsn) {
        self.acked.send_if_modified(|a| {
            if end_lsn > *a {
                *a = end_lsn;
                true
            } else {
                false
            }
        });
    }

    fn closed_reason(&self) -> Option<String> {
        self.down
            .load(Ordering::Acquire)
            .then(|| "the cluster's event stream (NATS) is unavailable".to_string())
    }
}

impl Drop for FeedLink {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// Whether a project's feed is receiving (false while NATS or its stream is unreachable).
#[derive(Default)]
pub struct FeedHealth {
    pub down: Mutex<std::collections::HashMap<String, String>>,
}

/// The project's events from JetStream, for its room on this node. `from_start`: the room's
/// history is empty, so the consumer starts over from the stream's first message.
pub fn subscribe(
    cluster: Arc<Cluster>,
    project_id: &str,
    from_start: bool,
    health: Arc<FeedHealth>,
) -> Subscription {
    let (tx, rx) = mpsc::channel(DURABLE_QUEUE_LEN);
    let (acked, acks) = watch::channel(Lsn(0));
    let down = Arc::new(AtomicBool::new(false));
    let task = tokio::spawn(run(
        cluster,
        project_id.to_string(),
        from_start,
        tx,
        acks,
        down.clone(),
        health,
    ));
    Subscription::new(rx, FeedLink { acked, down, task })
}

async fn run(
    cluster: Arc<Cluster>,
    project_id: String,
    mut from_start: bool,
    tx: mpsc::Sender<Arc<Event>>,
    mut acks: watch::Receiver<Lsn>,
    down: Arc<AtomicBool>,
    health: Arc<FeedHealth>,
) {
    let mut backoff = Duration::from_millis(200);
    loop {
        match consume(&cluster, &project_id, from_start, &tx, &mut acks, &health).await {
            Ok(()) => return,
            Err(e) => {
                down.store(true, Ordering::Release);
                health
                    .down
                    .lock()
                    .expect("poisoned")
                    .insert(project_id.clone(), e.to_string());
                tracing::warn!(project_id, error = %e, retry_in = ?backoff, "realtime feed from JetStream interrupted");
            }
        }
        from_start = false;
        tokio::time::sleep(backoff).await;
        backoff = (backoff * 2).min(Duration::from_secs(5));
    }
}

async fn consume(
    cluster: &Cluster,
    project_id: &str,
    from_start: bool,
    tx: &mpsc::Sender<Arc<Event>>,
    acks: &mut watch::Receiver<Lsn>,
    health: &FeedHealth,
) -> anyhow::Result<()> {
    let mut reconnected = cluster.connections();
    reconnected.borrow_and_update();
    let stream = cluster.ensure_stream(project_id).await?;
    let name = format!("rt_{}", cluster.node_id);
    // Where this node's history ends in the stream: the consumer's acknowledged floor (the room
    // acknowledges only what its history has fsynced). A fresh history reads the stream from
    // its first message instead, not from where an earlier history of this node (now gone) had
    // got to; so does a node whose consumer is gone (inactive past the retention): replays of
    // what its history holds are dropped by id.
    let floor = match from_start {
        true => None,
        false => stream
            .get_consumer::<pull::Config>(&name)
            .await
            .ok()
            .map(|c| c.cached_info().ack_floor.stream_sequence),
    };
    // Made again on every (re)start, from the message after the floor: a durable pull consumer
    // sends again what it delivered but was not acknowledged only after `ack_wait`, and new
    // pulls start past it, so a restarted node would otherwise miss (and record as a gap) what
    // it had received but not yet stored.
    let _ = stream.delete_consumer(&name).await;
    let deliver_policy = match floor {
        Some(f) => DeliverPolicy::ByStartSequence {
            start_sequence: f + 1,
        },
        None => DeliverPolicy::All,
    };
    let consumer: async_nats::jetstream::consumer::PullConsumer = stream
        .create_consumer(pull::Config {
            durable_name: Some(name.clone()),
            deliver_policy,
            ack_policy: AckPolicy::All,
            ack_wait: Duration::from_secs(300),
            max_ack_pending: MAX_ACK_PENDING,
            // A node gone for good leaves no consumer behind for longer than the stream keeps
            // events.
            inactive_threshold: cluster.retention.max_age,
            ..Default::default()
        })
        .await?;
    let mut messages = consumer
        .stream()
        .max_messages_per_batch(1024)
        .heartbeat(Duration::from_secs(2))
        .expires(Duration::from_secs(10))
        .messages()
        .await?;
    // The next message must follow the floor, or the stream dropped some (retention) before
    // this node read them.
    let mut last_seq: Option<u64> = floor;
    health.down.lock().expect("poisoned").remove(project_id);
    // Acknowledgement points (a transaction's last message), oldest first.
    let mut points: VecDeque<(Lsn, async_nats::jetstream::Message)> = VecDeque::new();
    loop {
        tokio::select! {
            _ = reconnected.changed() => {
                // The pull request did not survive the reconnection: start again from the
                // acknowledged floor (replays are dropped by id).
                anyhow::bail!("NATS reconnected");
            }
            changed = acks.changed() => {
                if changed.is_err() {
                    return Ok(());
                }
                let upto = *acks.borrow_and_update();
                let mut newest = None;
                while points.front().is_some_and(|(end, _)| *end <= upto) {
                    newest = points.pop_front();
                }
                if let Some((_, msg)) = newest {
                    msg.ack().await.map_err(|e| anyhow::anyhow!("acknowledging: {e}"))?;
                }
            }
            msg = messages.next() => {
                let Some(msg) = msg else { anyhow::bail!("the consumer's message stream ended") };
                let msg = msg.map_err(|e| anyhow::anyhow!("{e}"))?;
                let seq = msg.info().map(|i| i.stream_sequence).ok();
                let gap = matches!((last_seq, seq), (Some(l), Some(s)) if s > l + 1);
                if seq.is_some() {
                    last_seq = seq;
                }
                let Some(mut event) = crate::realtime::history::decode(&msg.payload) else {
                    tracing::error!(project_id, "an undecodable message in the project's stream: skipped");
                    continue;
                };
                if let Some(sender) = msg.headers.as_ref().and_then(|h| h.get(super::publisher::SENDER_HEADER)) {
                    if let Some((node, socket)) = sender.as_str().split_once('/') {
                        if node == cluster.node_id {
                            event.sender = socket.parse().ok();
                        }
                    }
                }
                event.gap_before = gap;
                let point = (event.last_in_transaction && event.commit_lsn != Lsn(u64::MAX))
                    .then_some(event.end_lsn);
                if tx.send(Arc::new(event)).await.is_err() {
                    return Ok(());
                }
                if let Some(end) = point {
                    points.push_back((end, msg));
                }
            }
        }
    }
}
