//! The leader's JetStream publisher of one project: a durable subscriber of the project's bus
//! (the slot is confirmed only up to what it acknowledges) that publishes each event to the
//! project's stream and acknowledges a transaction once JetStream has acknowledged its last
//! event. It also takes the project's broadcast requests from every node
//! ([`super::broadcast_subject`]), so that the stream has a single writer.
//!
//! * Pipelined: up to [`IN_FLIGHT`] publishes wait for their acknowledgement at once;
//!   acknowledgements are taken in order.
//! * Fenced: each publish names the stream sequence it expects last. Any other writer (a
//!   previous leader that has not noticed it lost its lock) makes this one's next publish fail,
//!   and vice versa: the term ends, the publisher reads the stream again and the bus rewinds to
//!   the slot's confirmed position.
//! * No duplicates: at the start of a term the publisher reads the stream's last event id and
//!   skips (acknowledging) every event at or below it: a replay after a failover or a rewind.
//!   Each publish also carries its id as `Nats-Msg-Id` (JetStream's de-duplication window).
//! * Settled before confirmed: JetStream's acknowledgement does not mean the event is in a
//!   file yet (NATS 2.9 buffers its store's writes in the process and has no `sync_interval`:
//!   a kill -9 of nats-server loses the acknowledged tail, seen losing ~1,900 events under
//!   load). A transaction's end goes to the bus (which lets the slot be confirmed past it) only
//!   [`super::PublishSettings::settle`] (`nats_publish_settle_ms`, 2 s) after its
//!   acknowledgement, and only if the NATS connection stayed up since the term began; when it
//!   is made again the term ends, and the next one reads the stream's tail and publishes again,
//!   from the slot, whatever the stream no longer holds. A stream found shorter than what was
//!   already let go (a loss older than the window) is reported, never hidden.

use std::collections::VecDeque;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use async_nats::jetstream::context::PublishAckFuture;
use async_nats::HeaderMap;
use futures_util::stream::FuturesOrdered;
use futures_util::StreamExt;
use serde::{Deserialize, Serialize};

use super::Cluster;
use crate::bus::{Event, EventKind, ProjectBus, Subscription};
use fluxbase_replication::pgoutput::Lsn;

/// Publishes awaiting their acknowledgement at once.
pub const IN_FLIGHT: usize = 4096;
/// Header naming the node and socket a client broadcast came from (it is not sent back to it).
pub const SENDER_HEADER: &str = "Fluxbase-Sender";

/// A broadcast another node (or this one) asks the leader to publish.
#[derive(Serialize, Deserialize)]
pub struct BroadcastAsk {
    pub event: String,
    /// The payload as JSON text.
    pub payload: String,
    /// The node and socket that sent it (client broadcasts), so that it skips that socket.
    #[serde(default)]
    pub sender: Option<(String, u64)>,
}

/// The leader's answer: the broadcast's id, or why it was not published.
#[derive(Serialize, Deserialize)]
pub struct BroadcastReply {
    #[serde(default)]
    pub id: Option<String>,
    #[serde(default)]
    pub error: Option<String>,
}

/// What `/api/cdc/status` shows of a leader's publisher.
#[derive(Clone, Debug, Default)]
pub struct PublisherStatus {
    /// The stream sequence last acknowledged.
    pub sequence: u64,
    pub published: u64,
    /// Replayed events skipped because the stream already held them.
    pub skipped: u64,
    pub terms: u64,
    pub last_error: Option<String>,
    /// Terms that found the stream without events already let go to the slot: lost by
    /// JetStream after the settle window.
    pub lost_tails: u64,
    /// Events larger than a NATS message may be (the server's `max_payload`): a row change
    /// went with its rows left out (`tooLarge`), anything else was not published (logged).
    pub too_large: u64,
}

/// Transaction ends acknowledged by JetStream, waiting out the settle window.
#[derive(Default)]
struct Settling {
    /// (due, end, id of the event that ended it), in acknowledgement order.
    queue: VecDeque<(tokio::time::Instant, Lsn, String)>,
}

/// Ends acknowledged within this long of each other wait as one entry (due with the latest),
/// so the queue holds at most settle / GRAIN entries whatever the rate.
const GRAIN: Duration = Duration::from_millis(10);

impl Settling {
    fn push(&mut self, due: tokio::time::Instant, end: Lsn, id: String) {
        if let Some(back) = self.queue.back_mut() {
            if due.saturating_duration_since(back.0) < GRAIN {
                *back = (due, end, id);
                return;
            }
        }
        self.queue.push_back((due, end, id));
    }

    fn next_due(&self) -> Option<tokio::time::Instant> {
        self.queue.front().map(|e| e.0)
    }

    /// The latest end whose window has passed, taken out of the queue.
    fn take_due(&mut self, now: tokio::time::Instant) -> Option<(Lsn, String)> {
        let mut last = None;
        while self.queue.front().is_some_and(|e| e.0 <= now) {
            let (_, end, id) = self.queue.pop_front().expect("not empty");
            last = Some((end, id));
        }
        last
    }
}

/// The id after `last` for a broadcast: `<last event id>-<n, 8 hex>`, one more than `last`'s own
/// count when it is itself a broadcast. Sorts after `last` and before the next event.
pub fn next_broadcast_id(last: Option<&str>) -> Option<String> {
    let Some(last) = last else {
        return Some("0000000000000000-00000000-00000001".to_string());
    };
    let parts: Vec<&str> = last.split('-').collect();
    if parts.len() >= 3 {
        let n = u32::from_str_radix(parts[parts.len() - 1], 16).ok()?;
        let base = parts[..parts.len() - 1].join("-");
        return Some(format!("{base}-{:08X}", n.checked_add(1)?));
    }
    Some(format!("{last}-00000001"))
}

/// One publish (or skip) awaiting its turn: its acknowledgement, the transaction end it
/// completes, and whom to answer.
struct Pending {
    ack: Option<PublishAckFuture>,
    end: Option<Lsn>,
    reply: Option<async_nats::Subject>,
    id: String,
}

type Done = (
    Result<u64, String>,
    Option<Lsn>,
    Option<async_nats::Subject>,
    String,
);

/// Runs until aborted (this node lost the project). `first`: the durable subscription taken
/// before the change stream started (so that the slot waits for this publisher from the
/// start); each later term subscribes again, which rewinds the stream to the slot.
pub async fn run(
    cluster: Arc<Cluster>,
    bus: Arc<ProjectBus>,
    project_id: String,
    first: Subscription,
    status: Arc<Mutex<PublisherStatus>>,
) {
    let mut backoff = Duration::from_millis(200);
    let mut sub = first;
    // The last event whose transaction this publisher let the slot move past, over all terms.
    let mut released: Option<String> = None;
    loop {
        status.lock().expect("poisoned").terms += 1;
        match term(&cluster, &mut sub, &project_id, &status, &mut released).await {
            Ok(()) => return,
            Err(e) => {
                tracing::warn!(project_id, error = %e, retry_in = ?backoff, "publishing to JetStream");
                let mut s = status.lock().expect("poisoned");
                s.last_error = Some(e.to_string());
            }
        }
        tokio::time::sleep(backoff).await;
        backoff = (backoff * 2).min(Duration::from_secs(5));
        // The next term's subscription exists before this one is dropped: with none, the slot
        // could be confirmed past what JetStream has (only the outbox's acknowledgement would
        // bound it). Joining rewinds the stream to the slot's confirmed position.
        sub = bus.subscribe_durable();
    }
}

/// Reads the stream's last sequence and event (id, end LSN).
async fn stream_tail(
    cluster: &Cluster,
    project_id: &str,
) -> anyhow::Result<(u64, Option<String>, Lsn)> {
    let mut stream = cluster.ensure_stream(project_id).await?;
    let last_seq = stream.info().await?.state.last_sequence;
    if last_seq == 0 {
        return Ok((0, None, Lsn(0)));
    }
    match stream
        .get_last_raw_message_by_subject(&super::subject(project_id))
        .await
    {
        Ok(msg) => {
            let event = crate::realtime::history::decode(&msg.payload)
                .ok_or_else(|| anyhow::anyhow!("an undecodable message at the stream's end"))?;
            Ok((last_seq, Some(event.id), event.end_lsn))
        }
        // Everything expired: nothing to compare with (JetStream's window still drops repeats).
        Err(e)
            if e.kind()
                == async_nats::jetstream::stream::LastRawMessageErrorKind::NoMessageFound =>
        {
            Ok((last_seq, None, Lsn(0)))
        }
        Err(e) => Err(e.into()),
    }
}

async fn term(
    cluster: &Arc<Cluster>,
    sub: &mut Subscription,
    project_id: &str,
    status: &Mutex<PublisherStatus>,
    released: &mut Option<String>,
) -> anyhow::Result<()> {
    // A NATS connection made again from here on ends the term (see the module's doc).
    let mut connections = cluster.connections();
    connections.borrow_and_update();
    // The subscription asked the change stream to rewind to the slot's confirmed position:
    // nothing this publisher has not had acknowledged is lost.
    let (mut expected, mut last_id, mut last_end) = stream_tail(cluster, project_id).await?;
    // A loss found now stays the publisher's error once the term runs (the start clears the
    // last term's error, not this one).
    let mut lost = None;
    if let Some(gone) = released.as_deref() {
        let holds = match last_id.as_deref() {
            Some(last) => last >= gone,
            // Everything expired (by retention) or the stream is new.
            None => expected > 0,
        };
        if !holds {
            let why = format!(
                "the project's JetStream stream lost events the slot was already confirmed past: \
                 it ends at {} (sequence {expected}), events up to {gone} had been acknowledged \
                 more than nats_publish_settle_ms earlier; they cannot be published again. Run \
                 nats-server 2.10 or later with `sync_interval: always`, or raise \
                 nats_publish_settle_ms",
                last_id.as_deref().unwrap_or("nothing")
            );
            tracing::error!(project_id, "{why}");
            status.lock().expect("poisoned").lost_tails += 1;
            lost = Some(why);
        }
        // What is there now is the reference from here on.
        *released = last_id.clone();
    }
    let settle = cluster.publishing.settle;
    let mut settling = Settling::default();
    let mut asks = cluster
        .nats
        .subscribe(super::broadcast_subject(project_id))
        .await?;
    {
        let mut s = status.lock().expect("poisoned");
        s.last_error = lost;
        s.sequence = expected;
    }
    let subject = super::subject(project_id);
    let mut in_flight: FuturesOrdered<futures_util::future::BoxFuture<'static, Done>> =
        FuturesOrdered::new();
    loop {
        let next_due = settling.next_due();
        tokio::select! {
            biased;
            _ = connections.changed() => {
                anyhow::bail!(
                    "the NATS connection was made again: what JetStream acknowledged in the last \
                     {settle:?} is checked against the stream"
                );
            }
            _ = tokio::time::sleep_until(next_due.unwrap_or_else(tokio::time::Instant::now)),
                if next_due.is_some() => {
                if !cluster.connected() {
                    anyhow::bail!("NATS is unreachable: acknowledged events are not settled");
                }
                if let Some((end, id)) = settling.take_due(tokio::time::Instant::now()) {
                    sub.ack(end);
                    if !id.is_empty() {
                        *released = Some(id);
                    }
                }
            }
            done = in_flight.next(), if !in_flight.is_empty() => {
                let (result, end, reply, id) = done.expect("not empty");
                match result {
                    Ok(seq) => {
                        {
                            let mut s = status.lock().expect("poisoned");
                            if seq > 0 {
                                s.sequence = s.sequence.max(seq);
                                s.published += 1;
                            }
                        }
                        // Acknowledgements come in order: a transaction's end is whole.
                        if let Some(end) = end {
                            if settle.is_zero() {
                                sub.ack(end);
                                if !id.is_empty() {
                                    *released = Some(id.clone());
                                }
                            } else {
                                settling.push(tokio::time::Instant::now() + settle, end, id.clone());
                            }
                        }
                        if let Some(reply) = reply {
                            answer(cluster, reply, Some(id), None).await;
                        }
                    }
                    Err(e) => {
                        if let Some(reply) = reply {
                            answer(cluster, reply, None, Some(e.clone())).await;
                        }
                        anyhow::bail!("publishing {id}: {e}");
                    }
                }
            }
            event = sub.recv(), if in_flight.len() < IN_FLIGHT => {
                let Some(event) = event else { return Ok(()) };
                let end = event.last_in_transaction.then_some(event.end_lsn);
                if last_id.as_deref().is_some_and(|l| event.id.as_str() <= l) {
                    status.lock().expect("poisoned").skipped += 1;
                    // Settled like a publish: the stream's tail may not be in its files yet.
                    let id = event.id.clone();
                    in_flight.push_back(Box::pin(async move { (Ok(0), end, None, id) }));
                    continue;
                }
                // An event NATS refuses for its size would be refused again after every rewind:
                // the project's realtime would stop for good and its slot keep the cluster's WAL
                // (red team rt18 HIGH). It goes smaller, or not at all.
                let body = match fitting(cluster, &event, project_id) {
                    Fits::As(body) => body,
                    Fits::Smaller(smaller, body) => {
                        status.lock().expect("poisoned").too_large += 1;
                        expected += 1;
                        let ack = publish(cluster, &subject, &smaller, body, expected - 1, None).await?;
                        last_id = Some(event.id.clone());
                        last_end = event.end_lsn;
                        in_flight.push_back(pending(Pending { ack: Some(ack), end, reply: None, id: event.id.clone() }));
                        continue;
                    }
                    Fits::Not => {
                        status.lock().expect("poisoned").too_large += 1;
                        // Acknowledged as a replay is: settled, never published. What it lets go
                        // is the stream's last event, not this one (the stream never holds it:
                        // the next term would report a lost tail); none (empty) if the stream
                        // holds nothing yet.
                        let id = last_id.clone().unwrap_or_default();
                        in_flight.push_back(Box::pin(async move { (Ok(0), end, None, id) }));
                        continue;
                    }
                };
                expected += 1;
                let ack = publish(cluster, &subject, &event, body, expected - 1, None).await?;
                last_id = Some(event.id.clone());
                last_end = event.end_lsn;
                in_flight.push_back(pending(Pending { ack: Some(ack), end, reply: None, id: event.id.clone() }));
            }
            ask = asks.next(), if in_flight.len() < IN_FLIGHT => {
                let Some(msg) = ask else { anyhow::bail!("the broadcast subscription ended") };
                let Some(reply) = msg.reply.clone() else { continue };
                let ask: BroadcastAsk = match serde_json::from_slice(&msg.payload) {
                    Ok(a) => a,
                    Err(e) => {
                        answer(cluster, reply, None, Some(format!("a malformed request: {e}"))).await;
                        continue;
                    }
                };
                // It goes into every frame as it is: only JSON (anyone on NATS could ask).
                if serde_json::from_str::<&serde_json::value::RawValue>(&ask.payload).is_err()
                    || ask.event.is_empty() || ask.event.len() > 200
                {
                    answer(cluster, reply, None, Some("a broadcast needs an event name and a JSON payload".into())).await;
                    continue;
                }
                let Some(id) = next_broadcast_id(last_id.as_deref()) else {
                    answer(cluster, reply, None, Some("broadcast ids ran out at this position".into())).await;
                    continue;
                };
                let event = broadcast_event(id.clone(), &ask, last_end);
                let Fits::As(body) = fitting(cluster, &event, project_id) else {
                    answer(cluster, reply, None, Some("the broadcast is larger than a NATS message may be".into())).await;
                    continue;
                };
                expected += 1;
                let ack = publish(cluster, &subject, &event, body, expected - 1, ask.sender.as_ref()).await?;
                last_id = Some(id.clone());
                in_flight.push_back(pending(Pending { ack: Some(ack), end: None, reply: Some(reply), id }));
            }
        }
    }
}

fn pending(p: Pending) -> futures_util::future::BoxFuture<'static, Done> {
    Box::pin(async move {
        let result = match p.ack {
            None => Ok(0),
            Some(f) => match tokio::time::timeout(Duration::from_secs(10), f).await {
                Ok(Ok(ack)) => Ok(ack.sequence),
                Ok(Err(e)) => Err(e.to_string()),
                Err(_) => Err("no acknowledgement from JetStream within 10 s".to_string()),
            },
        };
        (result, p.end, p.reply, p.id)
    })
}

async fn answer(
    cluster: &Cluster,
    reply: async_nats::Subject,
    id: Option<String>,
    error: Option<String>,
) {
    let body = serde_json::to_vec(&BroadcastReply { id, error }).expect("serializable");
    let _ = cluster.nats.publish(reply, body.into()).await;
}

/// A broadcast as the stream carries it: after `last_end` (the transaction before it), never
/// an acknowledgement point of its own.
fn broadcast_event(id: String, ask: &BroadcastAsk, last_end: Lsn) -> Event {
    let body = format!(
        "{{\"event\":{},\"payload\":{}}}",
        serde_json::Value::String(ask.event.clone()),
        ask.payload
    );
    Event {
        id,
        kind: EventKind::Broadcast {
            event: ask.event.clone(),
        },
        schema: None,
        table: None,
        record: crate::bus::RowImage::None,
        old: crate::bus::RowImage::None,
        unchanged_toast: Vec::new(),
        too_large: Vec::new(),
        relation: None,
        row_key: None,
        commit_timestamp: chrono::Utc::now()
            .to_rfc3339_opts(chrono::SecondsFormat::Micros, true)
            .into(),
        // Not from the WAL: after every subscribe's starting point.
        commit_lsn: Lsn(u64::MAX),
        end_lsn: last_end,
        last_in_transaction: true,
        payload: Arc::from(body),
        sender: None,
        gap_before: false,
        payload_whole: false,
    }
}

/// Room left in a NATS message for the headers [`publish`] adds (id, expected sequence, sender)
/// and the protocol's framing.
const HEADER_ROOM: usize = 1024;

/// How an event goes into the project's stream: a NATS server refuses a message over its
/// `max_payload` (1 MiB unless configured), which `cdc_max_row_bytes` (16 MiB) and a
/// broadcast from SQL can pass.
enum Fits {
    /// As it is, with its encoded body.
    As(Vec<u8>),
    /// A row change too large: the same change with its rows left out, every column named in
    /// `tooLarge` (as `cdc_max_row_bytes` leaves values out), and its encoded body.
    Smaller(Box<Event>, Vec<u8>),
    /// Anything else too large: not published.
    Not,
}

fn fitting(cluster: &Cluster, event: &Event, project_id: &str) -> Fits {
    let body = crate::realtime::history::encode(event, chrono::Utc::now().timestamp_millis());
    let limit = cluster.max_payload().saturating_sub(HEADER_ROOM);
    if body.len() <= limit {
        return Fits::As(body);
    }
    if let Some(smaller) = crate::cdc::events::without_rows(event) {
        let whole = body.len();
        let body =
            crate::realtime::history::encode(&smaller, chrono::Utc::now().timestamp_millis());
        if body.len() <= limit {
            tracing::warn!(
                project_id,
                id = %event.id,
                bytes = whole,
                max_payload = limit + HEADER_ROOM,
                "a row change is larger than a NATS message may be: published with its rows \
                 left out (tooLarge); lower cdc_max_row_bytes or raise nats-server's max_payload"
            );
            return Fits::Smaller(Box::new(smaller), body);
        }
    }
    tracing::error!(
        project_id,
        id = %event.id,
        bytes = body.len(),
        max_payload = limit + HEADER_ROOM,
        "an event is larger than a NATS message may be: not published to the cluster's stream \
         (webhooks still get row changes); raise nats-server's max_payload"
    );
    Fits::Not
}

async fn publish(
    cluster: &Cluster,
    subject: &str,
    event: &Event,
    body: Vec<u8>,
    expected_last: u64,
    sender: Option<&(String, u64)>,
) -> anyhow::Result<PublishAckFuture> {
    let mut headers = HeaderMap::new();
    headers.insert(async_nats::header::NATS_MESSAGE_ID, event.id.as_str());
    headers.insert(
        async_nats::header::NATS_EXPECTED_LAST_SEQUENCE,
        expected_last.to_string().as_str(),
    );
    if let Some((node, socket)) = sender {
        headers.insert(SENDER_HEADER, format!("{node}/{socket}").as_str());
    }
    Ok(cluster
        .js
        .publish_with_headers(subject.to_string(), headers, body.into())
        .await?)
}

#[cfg(test)]
mod tests {
    use super::{next_broadcast_id, Settling, GRAIN};
    use fluxbase_replication::pgoutput::Lsn;
    use std::time::Duration;

    #[test]
    fn settling_lets_an_end_go_only_after_its_window_and_stays_small() {
        let t0 = tokio::time::Instant::now();
        let mut s = Settling::default();
        assert_eq!(s.next_due(), None);
        // A thousand ends acknowledged within one grain: one entry, due with the latest.
        for i in 0..1000u64 {
            s.push(t0 + Duration::from_micros(i), Lsn(i), format!("{i}"));
        }
        assert_eq!(s.queue.len(), 1);
        assert_eq!(s.take_due(t0), None);
        assert_eq!(
            s.take_due(t0 + Duration::from_micros(999)),
            Some((Lsn(999), "999".to_string()))
        );
        // Later ends wait for their own window; taking returns the latest due.
        s.push(t0 + GRAIN * 2, Lsn(2000), "a".into());
        s.push(t0 + GRAIN * 4, Lsn(3000), "b".into());
        assert_eq!(s.next_due(), Some(t0 + GRAIN * 2));
        assert_eq!(s.take_due(t0 + GRAIN), None);
        assert_eq!(s.take_due(t0 + GRAIN * 3), Some((Lsn(2000), "a".into())));
        assert_eq!(s.take_due(t0 + GRAIN * 9), Some((Lsn(3000), "b".into())));
        assert_eq!(s.next_due(), None);
    }

    #[test]
    fn broadcast_ids_sort_between_the_last_id_and_the_next_event() {
        let event = "0000000001a2b3c4-00000002";
        let first = next_broadcast_id(Some(event)).unwrap();
        assert_eq!(first, "0000000001a2b3c4-00000002-00000001");
        let second = next_broadcast_id(Some(&first)).unwrap();
        assert_eq!(second, "0000000001a2b3c4-00000002-00000002");
        assert!(event < first.as_str() && first < second);
        assert!(second.as_str() < "0000000001a2b3c4-00000003");
        assert!(second.as_str() < "0000000001a2b3c5-00000000");
        assert!(next_broadcast_id(None).unwrap().as_str() < event);
        assert_eq!(
            next_broadcast_id(Some("0000000001a2b3c4-00000002-FFFFFFFF")),
            None
        );
        assert_eq!(
            next_broadcast_id(Some("0000000001A2B3C4-00000002-00000009")).unwrap(),
            "0000000001A2B3C4-00000002-0000000A"
        );
    }
}
