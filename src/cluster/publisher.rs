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
    loop {
        status.lock().expect("poisoned").terms += 1;
        match term(&cluster, &mut sub, &project_id, &status).await {
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
) -> anyhow::Result<()> {
    // The subscription asked the change stream to rewind to the slot's confirmed position:
    // nothing this publisher has not had acknowledged is lost.
    let (mut expected, mut last_id, mut last_end) = stream_tail(cluster, project_id).await?;
    let mut asks = cluster
        .nats
        .subscribe(super::broadcast_subject(project_id))
        .await?;
    {
        let mut s = status.lock().expect("poisoned");
        s.last_error = None;
        s.sequence = expected;
    }
    let subject = super::subject(project_id);
    let mut in_flight: FuturesOrdered<futures_util::future::BoxFuture<'static, Done>> =
        FuturesOrdered::new();
    loop {
        tokio::select! {
            biased;
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
                            sub.ack(end);
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
            event = sub.events.recv(), if in_flight.len() < IN_FLIGHT => {
                let Some(event) = event else { return Ok(()) };
                let end = event.last_in_transaction.then_some(event.end_lsn);
                if last_id.as_deref().is_some_and(|l| event.id.as_str() <= l) {
                    status.lock().expect("poisoned").skipped += 1;
                    in_flight.push_back(Box::pin(async move { (Ok(0), end, None, String::new()) }));
                    continue;
                }
                expected += 1;
                let ack = publish(cluster, &subject, &event, expected - 1, None).await?;
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
                expected += 1;
                let ack = publish(cluster, &subject, &event, expected - 1, ask.sender.as_ref()).await?;
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
        record: None,
        old: None,
        unchanged_toast: Vec::new(),
        row_key: None,
        commit_timestamp: chrono::Utc::now().to_rfc3339_opts(chrono::SecondsFormat::Micros, true),
        // Not from the WAL: after every subscribe's starting point.
        commit_lsn: Lsn(u64::MAX),
        end_lsn: last_end,
        last_in_transaction: true,
        payload: Arc::from(body),
        sender: None,
        gap_before: false,
    }
}

async fn publish(
    cluster: &Cluster,
    subject: &str,
    event: &Event,
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
    let body = crate::realtime::history::encode(event, chrono::Utc::now().timestamp_millis());
    Ok(cluster
        .js
        .publish_with_headers(subject.to_string(), headers, body.into())
        .await?)
}

#[cfg(test)]
mod tests {
    use super::next_broadcast_id;

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
