//! Realtime: WebSocket rooms fed by the change stream, on the same port as the API (`/` and
//! `/realtime`).
//!
//! ```text
//!  ProjectBus ──durable subscription──► Room pump ──► history on disk (crate::realtime_history)
//!                 (from server start)      │  fsync per batch, then ack   ▲ read at the socket's
//!                                          │                              │ pace (catching up)
//!                                          └─► live members: one Message per event (shared bytes)
//!  socket: reader (client messages, idle timeout) ─┐   writer (queue → sink, pings, close)
//! ```
//!
//! * `subscribe` answers `subscribed` only once the socket is a member of the live room, under
//!   the room's lock, so nothing is delivered before it. The member takes the transactions that
//!   commit at or after the WAL insert position read during its subscribe: one committed after
//!   the client has `subscribed` is delivered; one committed before never is, even when it was
//!   still on its way, or when a new room's subscription rewinds the stream and replays it.
//! * Every project whose stream runs has a room from server start; its pump stores each event in
//!   the project's durable history and acknowledges a transaction only once it is fsynced, so
//!   the slot is never confirmed past what the history holds. It drops replays (ids at or below
//!   the last it stored, which survives restarts).
//! * A member is live (the pump pushes to it) or catching up (a task of its own reads the
//!   history after its position as the socket drains, then joins live under the room's lock:
//!   nothing missing, nothing twice). `since` starts a member catching up; an id the history
//!   cannot vouch for (trimmed, or older than the history) gets `RESUME_TOO_OLD` and live
//!   events, never a silent gap. `Interest::wants` is the one per-event decision of both.
//! * A socket's queue is bounded in bytes (`realtime_send_queue_bytes`): a live member past it
//!   catches up from the history instead of being cut off. A socket is closed with 1008 and a
//!   reason only when its client stops reading (no write progress for
//!   `realtime_client_stall_secs`), falls out of the retained window, or lets four times the
//!   budget queue up; the room goes on for everyone else.
//! * Broadcasts carry ids: SQL ones their WAL id, client and REST ones `<last id>-<seq>`, stored
//!   in the history in order. A graceful shutdown closes every socket with 1001.
//! * What one client may send is bounded per socket, so that a flooder is the one cut off and
//!   not the sockets it floods: broadcasts (count and payload bytes per second) and subscribes
//!   (per second) go through token buckets; one over its bucket is refused with a `RATE_LIMIT`
//!   error, and a socket refused [`RATE_STRIKES`] times without a quiet pause of
//!   [`STRIKE_RESET`] is closed with 1008. A subscribe with a realtime token also counts against
//!   that token's own budget (the API's per-caller rate limit), whichever socket sends it.
//! * A broadcast payload (client, REST or SQL) is at most `realtime_max_broadcast_bytes`; a
//!   larger one never enters a room. A room's resume history is bounded in events, age and bytes.
//! * A subscription authorized by an API key, directly or through a realtime token minted with
//!   it, ends (`ACCESS_REVOKED`) when the key is deleted or rotated; such tokens are refused.
//! * Auth per subscribe: an API key of the project (any scope), a session of a member, or a
//!   realtime token (`flx_rt_…`, HMAC-signed, short-lived, may carry `authUid` and a table list).
//!   A project with `realtimePublic` accepts a subscribe without a token.
//! * The upgrade is finished here ([`upgrade`]) rather than by `warp::ws()`: warp 0.4 cannot
//!   set tungstenite's read buffer, which is 128 KiB per socket by default. Client messages are
//!   small (at most [`MAX_MESSAGE`]), so sockets read through a [`READ_BUFFER`]-byte buffer and
//!   an idle socket costs a few KiB instead of ~140 KiB.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use futures_util::{SinkExt, StreamExt};
use hyper_util::rt::TokioIo;
use serde::{Deserialize, Serialize};
use serde_json::{json, Value};
use tokio::sync::{mpsc, Notify};
use tokio_tungstenite::tungstenite::protocol::frame::coding::CloseCode;
use tokio_tungstenite::tungstenite::protocol::{CloseFrame, Role, WebSocketConfig};
use tokio_tungstenite::tungstenite::{Error as WsError, Message};
use tokio_tungstenite::WebSocketStream;
use warp::http::{HeaderMap, StatusCode};
use warp::reply::Response;

use crate::api::error::{ApiError, ApiResult};
use crate::app::App;
use crate::auth::{Access, DbRole, Principal};
use crate::bus::{Event, EventKind};
use crate::realtime_history::{History, Limits};
use crate::visibility::{Identity, Verdict, Verdicts};
use fluxbase_replication::pgoutput::Lsn;

/// Events, and bytes, a catching-up member reads from the history at a time (at least one).
const CATCH_UP_CHUNK: usize = 256;
const CATCH_UP_CHUNK_BYTES: u64 = 256 * 1024;
/// An fsync of the history running on the blocking pool: the job back, and its result.
type SyncTask = tokio::task::JoinHandle<(crate::realtime_history::SyncJob, std::io::Result<()>)>;
/// Events the pump stores (and fsyncs) at a time.
const PUMP_BATCH: usize = 1024;
/// How often the pump makes what was stored since durable and trims by age when idle.
const PUMP_TICK: Duration = Duration::from_millis(500);
/// How long a graceful shutdown waits for the sockets it closed with 1001.
const SHUTDOWN_GRACE: Duration = Duration::from_secs(5);
/// How long a socket whose writer ended waits for the client's close frame.
const CLOSE_REPLY: Duration = Duration::from_secs(1);
/// Events the pump delivers under one lock before it lets other tasks (the sockets' writers)
/// run.
const DELIVERY_SLICE: usize = 64;
/// Largest client message accepted.
pub const MAX_MESSAGE: usize = 64 * 1024;
/// Rooms one socket may join.
pub const MAX_SUBSCRIPTIONS_PER_SOCKET: usize = 100;
/// Sockets subscribed to one project.
pub const MAX_SOCKETS_PER_PROJECT: usize = 10_000;
/// A socket that sends nothing (not even a pong) for this long is closed.
pub const IDLE_TIMEOUT: Duration = Duration::from_secs(120);
const PING_EVERY: Duration = Duration::from_secs(30);
/// How long a closing socket may take to flush its close frame before it is dropped.
const CLOSE_GRACE: Duration = Duration::from_secs(10);
const TOKEN_PREFIX: &str = "flx_rt_";
/// Refused client messages (over a rate limit) after which the socket is closed.
pub const RATE_STRIKES: u32 = 50;
/// A socket refused nothing for this long starts again from no strikes.
pub const STRIKE_RESET: Duration = Duration::from_secs(10);
/// Bytes a socket reads from the connection at a time (tungstenite's default is 128 KiB).
pub const READ_BUFFER: usize = 4 * 1024;
/// Queued outgoing bytes past which a write flushes (tungstenite's default is 128 KiB).
const WRITE_BUFFER: usize = 16 * 1024;

/// An upgraded WebSocket connection.
pub type WebSocket =
    WebSocketStream<crate::realtime_io::Counted<TokioIo<hyper::upgrade::Upgraded>>>;

/// Refuses a message over a rate limit with `RATE_LIMIT`, or cuts the socket off after
/// [`RATE_STRIKES`] refusals; true while the socket may go on.
fn over_limit(
    socket: &SocketShared,
    limits: &mut SocketLimits,
    what: &str,
    room: Option<&str>,
) -> bool {
    if limits.strike() {
        socket.close.fire(
            "rate_limit",
            &format!("rate limit exceeded: too many {what} (refused {RATE_STRIKES} times)"),
        );
        return false;
    }
    let mut e = json!({ "type": "error", "code": "RATE_LIMIT",
                        "message": format!("Too many {what} from this socket: slow down.") });
    if let Some(r) = room {
        e["roomId"] = json!(r);
    }
    socket.push(Message::text(e.to_string()));
    true
}

fn close_frame(code: CloseCode, reason: &str) -> Message {
    Message::Close(Some(CloseFrame {
        code,
        reason: reason.into(),
    }))
}

fn header_has_token(headers: &HeaderMap, name: &str, token: &str) -> bool {
    headers.get_all(name).iter().any(|v| {
        v.to_str()
            .unwrap_or_default()
            .split(',')
            .any(|t| t.trim().eq_ignore_ascii_case(token))
    })
}

/// A refused handshake, in the guide's error shape.
fn handshake_refused(status: StatusCode, code: &str, message: &str) -> Response {
    let body = json!({"success": false,
        "error": {"code": code, "message": message, "details": null}});
    crate::api::json_response(status, &body)
}

/// Answers a WebSocket handshake (RFC 6455 §4.2) with 101 and serves the socket once hyper
/// hands over the connection. A request that is not an upgrade is rejected, so the API's own
/// routes answer it (`GET /` is then a 404 in the API's error shape).
pub fn upgrade(
    app: Arc<App>,
    headers: &HeaderMap,
    on_upgrade: Option<hyper::upgrade::OnUpgrade>,
) -> Result<Response, warp::Rejection> {
    let is_upgrade = header_has_token(headers, "connection", "upgrade")
        && header_has_token(headers, "upgrade", "websocket");
    let (true, Some(on_upgrade)) = (is_upgrade, on_upgrade) else {
        return Err(warp::reject::not_found());
    };
    if app.realtime.shutting_down.load(Ordering::SeqCst) {
        // Every socket was (or is being) closed with 1001: no new ones during the grace.
        let mut response = handshake_refused(
            StatusCode::SERVICE_UNAVAILABLE,
            "SERVER_SHUTTING_DOWN",
            "The server is shutting down. Reconnect in a moment (and resume with since).",
        );
        response
            .headers_mut()
            .insert("retry-after", "1".parse().expect("ascii"));
        return Ok(response);
    }
    let key = headers.get("sec-websocket-key").map(|k| k.as_bytes());
    let version = headers.get("sec-websocket-version").map(|v| v.as_bytes());
    let Some(key) = key.filter(|_| version == Some(b"13")) else {
        let mut response = handshake_refused(
            StatusCode::BAD_REQUEST,
            "BAD_REQUEST",
            "WebSocket handshake needs Sec-WebSocket-Key and Sec-WebSocket-Version: 13",
        );
        response
            .headers_mut()
            .insert("sec-websocket-version", "13".parse().expect("ascii"));
        return Ok(response);
    };
    let accept = tokio_tungstenite::tungstenite::handshake::derive_accept_key(key);
    tokio::spawn(async move {
        let upgraded = match on_upgrade.await {
            Ok(u) => u,
            Err(e) => {
                tracing::debug!(error = %e, "WebSocket upgrade failed");
                return;
            }
        };
        let mut config = WebSocketConfig::default();
        config.read_buffer_size = READ_BUFFER;
        config.write_buffer_size = WRITE_BUFFER;
        config.max_message_size = Some(MAX_MESSAGE);
        config.max_frame_size = Some(MAX_MESSAGE);
        let ws = WebSocketStream::from_raw_socket(
            crate::realtime_io::Counted::new(TokioIo::new(upgraded)),
            Role::Server,
            Some(config),
        )
        .await;
        app.serve_socket(ws).await;
    });
    let mut response = warp::http::Response::new(warp::hyper::body::Bytes::new().into());
    *response.status_mut() = StatusCode::SWITCHING_PROTOCOLS;
    let h = response.headers_mut();
    h.insert("connection", "upgrade".parse().expect("ascii"));
    h.insert("upgrade", "websocket".parse().expect("ascii"));
    h.insert("sec-websocket-accept", accept.parse().expect("base64"));
    Ok(response)
}

/// How much history a room keeps for `since` resumes.
#[derive(Clone, Copy, Debug)]
pub struct Retention {
    pub events: usize,
    pub age: Duration,
    /// Bytes of retained events (their frame, payload and record).
    pub bytes: usize,
}

impl Default for Retention {
    fn default() -> Self {
        Retention {
            events: 100_000,
            age: Duration::from_secs(600),
            bytes: 64 * 1024 * 1024,
        }
    }
}

/// A subscriber's filter (from `subscribe`, narrowed by a realtime token's table list).
#[derive(Clone, Debug, Default)]
struct Filter {
    tables: Option<HashSet<String>>,
    token_tables: Option<HashSet<String>>,
    operations: Option<HashSet<String>>,
    row: Option<RowFilter>,
}

#[derive(Clone, Debug)]
struct RowFilter {
    column: String,
    op: String,
    values: Vec<String>,
}

impl RowFilter {
    /// `status=eq.paid`, `amount=gt.10`, `id=in.(1,2,3)`.
    fn parse(s: &str) -> Result<RowFilter, String> {
        let (column, rest) = s
            .split_once('=')
            .ok_or_else(|| format!("row filter {s:?}: expected column=op.value"))?;
        let (op, value) = rest
            .split_once('.')
            .ok_or_else(|| format!("row filter {s:?}: expected column=op.value"))?;
        let values = match op {
            "eq" | "neq" | "lt" | "lte" | "gt" | "gte" => vec![value.to_string()],
            "in" => {
                let inner = value
                    .strip_prefix('(')
                    .and_then(|v| v.strip_suffix(')'))
                    .ok_or_else(|| format!("row filter {s:?}: `in` takes (a,b,c)"))?;
                inner.split(',').map(|v| v.trim().to_string()).collect()
            }
            other => return Err(format!("row filter {s:?}: unknown operator {other:?}")),
        };
        if column.is_empty() {
            return Err(format!("row filter {s:?}: no column"));
        }
        Ok(RowFilter {
            column: column.to_string(),
            op: op.to_string(),
            values,
        })
    }

    fn matches(&self, record: &Value) -> bool {
        let Some(actual) = record.get(&self.column) else {
            return false;
        };
        let cmp = |want: &str| -> Option<std::cmp::Ordering> {
            match actual {
                Value::Number(n) => {
                    let a = n.as_f64()?;
                    let b: f64 = want.parse().ok()?;
                    a.partial_cmp(&b)
                }
                Value::String(s) => Some(s.as_str().cmp(want)),
                Value::Bool(b) => Some(b.to_string().as_str().cmp(want)),
                Value::Null => (want == "null").then_some(std::cmp::Ordering::Equal),
                other => Some(other.to_string().as_str().cmp(want)),
            }
        };
        use std::cmp::Ordering::*;
        match self.op.as_str() {
            "eq" => cmp(&self.values[0]) == Some(Equal),
            "neq" => cmp(&self.values[0]).is_some_and(|o| o != Equal),
            "lt" => cmp(&self.values[0]) == Some(Less),
            "lte" => matches!(cmp(&self.values[0]), Some(Less | Equal)),
            "gt" => cmp(&self.values[0]) == Some(Greater),
            "gte" => matches!(cmp(&self.values[0]), Some(Greater | Equal)),
            "in" => self.values.iter().any(|v| cmp(v) == Some(Equal)),
            _ => false,
        }
    }
}

impl Filter {
    fn matches(&self, event: &Event, record: &dyn Fn() -> Value) -> bool {
        if let EventKind::Broadcast { .. } = event.kind {
            return true;
        }
        for tables in [&self.tables, &self.token_tables].into_iter().flatten() {
            match &event.table {
                Some(t) if tables.contains(t) => {}
                _ => return false,
            }
        }
        if let EventKind::Row { operation } = event.kind {
            if let Some(ops) = &self.operations {
                if !ops.contains(operation.as_str()) {
                    return false;
                }
            }
            if let Some(row) = &self.row {
                return row.matches(&record());
            }
        }
        true
    }
}

/// Sockets cut off, by reason (`/metrics`).
type CutOffCounts = Arc<Mutex<BTreeMap<&'static str, u64>>>;

/// Why and when a socket's writer cuts it off (code 1008 with the reason, or 1001 when the
/// server shuts down), whatever is queued.
struct CutOff {
    reason: Mutex<Option<(CloseCode, String)>>,
    /// Wakes the writer (its only waiter).
    notify: Notify,
    counts: CutOffCounts,
}

impl CutOff {
    fn new(counts: CutOffCounts) -> CutOff {
        CutOff {
            reason: Mutex::new(None),
            notify: Notify::new(),
            counts,
        }
    }

    /// Closes with 1008; `kind` is the metric's reason label. The first reason given wins.
    fn fire(&self, kind: &'static str, reason: &str) {
        if self.set(CloseCode::Policy, reason) {
            *self
                .counts
                .lock()
                .expect("poisoned")
                .entry(kind)
                .or_default() += 1;
        }
    }

    /// Closes with 1001 (the server is going away).
    fn away(&self, reason: &str) {
        self.set(CloseCode::Away, reason);
    }

    fn set(&self, code: CloseCode, reason: &str) -> bool {
        let mut r = self.reason.lock().expect("poisoned");
        if r.is_some() {
            return false;
        }
        *r = Some((code, reason.to_string()));
        self.notify.notify_one();
        true
    }

    fn fired(&self) -> bool {
        self.reason.lock().expect("poisoned").is_some()
    }
}

/// What became of a live event offered to a socket.
enum Offer {
    Queued,
    /// Not queued: the socket is past its high-water mark (it catches up instead).
    Full,
    Gone,
}

/// What a socket shares with the rooms it joined. Its queue is bounded in bytes, not messages:
/// a message is shared bytes (a tungstenite `Message` clones its payload by reference count),
/// so what a socket holds is what `queued` counts.
struct SocketShared {
    id: u64,
    tx: mpsc::UnboundedSender<Message>,
    /// Fired when the client broke its limits or stopped reading; the writer closes.
    close: Arc<CutOff>,
    /// Bytes queued and not yet written to the connection.
    queued: Arc<AtomicUsize>,
    /// Notified by the writer whenever it has written something.
    drained: Arc<Notify>,
    /// High-water mark of `queued` for live events (`realtime_send_queue_bytes`); other
    /// messages may queue up to [`SocketShared::hard_limit`].
    limit: usize,
}

impl SocketShared {
    fn hard_limit(&self) -> usize {
        self.limit.saturating_mul(4)
    }

    fn enqueue(&self, msg: Message) -> bool {
        let len = msg.len();
        self.queued.fetch_add(len, Ordering::AcqRel);
        if self.tx.send(msg).is_err() {
            self.queued.fetch_sub(len, Ordering::AcqRel);
            return false;
        }
        true
    }

    /// Queues an answer, error or replayed event; past the hard limit the socket is cut off as
    /// too slow.
    fn push(&self, msg: Message) -> bool {
        if self.queued.load(Ordering::Acquire) + msg.len() > self.hard_limit() {
            self.close.fire(
                "queue_bytes",
                &format!(
                    "client too slow: more than {} bytes queued",
                    self.hard_limit()
                ),
            );
            return false;
        }
        self.enqueue(msg)
    }

    /// Offers a live event: refused once the queue is past its high-water mark (a message
    /// larger than the mark still goes to an empty queue).
    fn offer(&self, msg: &Message) -> Offer {
        if self.tx.is_closed() || self.close.fired() {
            return Offer::Gone;
        }
        let queued = self.queued.load(Ordering::Acquire);
        if queued > 0 && queued + msg.len() > self.limit {
            return Offer::Full;
        }
        if self.enqueue(msg.clone()) {
            Offer::Queued
        } else {
            Offer::Gone
        }
    }

    /// Waits until the queue is below its high-water mark; false once the socket is closing.
    async fn room_to_send(&self) -> bool {
        loop {
            if self.tx.is_closed() || self.close.fired() {
                return false;
            }
            let drained = self.drained.notified();
            tokio::pin!(drained);
            drained.as_mut().enable();
            if self.queued.load(Ordering::Acquire) < self.limit {
                return true;
            }
            let _ = tokio::time::timeout(Duration::from_secs(1), drained).await;
        }
    }
}

/// [`App::broadcast_to_room`]'s refusal of a REST broadcast over the project's budget.
const BUSY: &str = "over the project's broadcast budget";

/// A token bucket: `rate` per second, holding at most one second's worth. Rate 0: unlimited.
struct Bucket {
    rate: f64,
    tokens: f64,
    last: Instant,
}

impl Bucket {
    fn new(rate: f64) -> Bucket {
        Bucket {
            rate,
            tokens: rate,
            last: Instant::now(),
        }
    }

    fn take(&mut self, n: f64) -> bool {
        if self.rate <= 0.0 {
            return true;
        }
        let now = Instant::now();
        let refill = now.duration_since(self.last).as_secs_f64() * self.rate;
        self.tokens = (self.tokens + refill).min(self.rate.max(n));
        self.last = now;
        if self.tokens >= n {
            self.tokens -= n;
            true
        } else {
            false
        }
    }
}

/// What one socket may still send: its buckets and its refusals so far.
struct SocketLimits {
    broadcasts: Bucket,
    broadcast_bytes: Bucket,
    subscribes: Bucket,
    strikes: u32,
    last_strike: Option<Instant>,
}

impl SocketLimits {
    fn new(config: &crate::config::Config) -> SocketLimits {
        SocketLimits {
            broadcasts: Bucket::new(config.realtime_broadcasts_per_sec as f64),
            broadcast_bytes: Bucket::new(config.realtime_broadcast_bytes_per_sec as f64),
            subscribes: Bucket::new(config.realtime_subscribes_per_sec as f64),
            strikes: 0,
            last_strike: None,
        }
    }

    /// Counts a refusal; true once the socket has had too many.
    fn strike(&mut self) -> bool {
        let now = Instant::now();
        if self
            .last_strike
            .is_some_and(|t| now.duration_since(t) > STRIKE_RESET)
        {
            self.strikes = 0;
        }
        self.last_strike = Some(now);
        self.strikes += 1;
        self.strikes >= RATE_STRIKES
    }
}

/// The API key a subscription was authorized by (directly or through a realtime token it
/// minted): its id, and a fingerprint of the secret it had then.
#[derive(Clone, Debug)]
struct KeyBinding {
    key_id: String,
    fingerprint: String,
}

/// What a member is to receive: the one decision, per event, of live delivery and of
/// catching up from the history alike.
struct Interest {
    filter: Filter,
    /// Live events of transactions that committed before the subscribe (commit LSN below this)
    /// are not this member's: they reach a new room again when its subscription rewinds the
    /// stream, or were still on their way when it joined.
    committed_from: Lsn,
    /// A resume's `since`: nothing at or below it is sent, live or from the history (the client
    /// has it, even when the server lost it in a crash and the stream replays it).
    since: Option<String>,
    /// Who it acts as for row-level security (see [`crate::visibility`]).
    identity: Identity,
}

/// What one member gets of one event.
enum Decision<'v> {
    Send,
    /// This `db_event` payload instead (see [`Verdict::SendInstead`]).
    SendInstead(&'v str),
    Skip,
}

impl Interest {
    fn wants(&self, event: &Event, record: &dyn Fn() -> Value) -> bool {
        event.commit_lsn >= self.committed_from
            && self
                .since
                .as_deref()
                .is_none_or(|since| event.id.as_str() > since)
            && self.filter.matches(event, record)
    }

    /// The one per-event decision of live delivery and catch-up alike: this subscription's
    /// bounds and filter, and what its identity may see (`verdict`; `None`, not decided: nothing).
    fn decide<'v>(
        &self,
        event: &Event,
        verdict: Option<&'v Verdict>,
        record: &dyn Fn() -> Value,
        old_record: &dyn Fn() -> Value,
    ) -> Decision<'v> {
        match verdict {
            Some(Verdict::Send) if self.wants(event, record) => Decision::Send,
            Some(Verdict::SendInstead {
                payload,
                filter_on_old,
            }) => {
                // Matched against the visible row, never the hidden one.
                let row = if *filter_on_old { old_record } else { record };
                if self.wants(event, row) {
                    Decision::SendInstead(payload)
                } else {
                    Decision::Skip
                }
            }
            _ => Decision::Skip,
        }
    }
}

/// A row image of an event (`record` or `old`) as JSON (`Null` when absent).
fn parse_row(text: &Option<String>) -> Value {
    text.as_deref()
        .and_then(|r| serde_json::from_str(r).ok())
        .unwrap_or(Value::Null)
}

struct Member {
    socket: Arc<SocketShared>,
    interest: Arc<Interest>,
    /// Catching up from the history (its task's epoch) rather than live.
    catching_up: Option<u64>,
    /// The project member this subscription acts for (a session, or a realtime token a member
    /// obtained): it ends when the member is removed.
    user: Option<String>,
    /// The API key behind it: it ends when the key is deleted or rotated.
    key: Option<KeyBinding>,
}

#[derive(Default)]
struct RoomState {
    members: HashMap<u64, Member>,
    /// Id of the last event that entered the room (replays at or below it are dropped).
    last_id: Option<String>,
    /// Epochs of catch-up tasks (a member's task ends when its epoch is no longer current).
    next_epoch: u64,
}

/// One project's room.
pub struct Room {
    room_id: String,
    project_id: String,
    /// The server, for the row-level security verdicts of catch-up reads.
    app: std::sync::Weak<App>,
    /// Locked after `state` when both are needed.
    state: Mutex<RoomState>,
    /// The durable resume history (`None`: it could not be opened; resumes are refused).
    history: Mutex<Option<History>>,
    dir: std::path::PathBuf,
    /// The project's budget for broadcasts from SQL and the REST API: (count, bytes) per
    /// second, so that a flood of them never overflows every member's queue at once.
    budget: Mutex<(Bucket, Bucket)>,
    pump: Mutex<Option<tokio::task::JoinHandle<()>>>,
    /// Decoded history chunks shared by the members catching up (see [`ChunkCache`]).
    chunks: Mutex<ChunkCache>,
    /// Bounds the catch-up reads running at once (`realtime_catch_up_reads`).
    reads: Arc<tokio::sync::Semaphore>,
    /// Members moved to catching up because their queue was full (not resumes).
    fell_behind: AtomicU64,
    /// Chunks read from disk by catch-ups (the rest came from the cache).
    chunk_reads: AtomicU64,
}

/// One chunk of the history, decoded once and shared by every member reading it: its events
/// and their `db_event`/`broadcast` frames (built on first use).
struct Chunk {
    events: Vec<(String, Arc<Event>, std::sync::OnceLock<Message>)>,
}

/// Chunks in use (weakly held: a chunk lives while a member reads it) and the few most recent
/// (strongly held, so members a little behind each other still share).
#[derive(Default)]
struct ChunkCache {
    live: HashMap<(String, String, usize), std::sync::Weak<Chunk>>,
    recent: std::collections::VecDeque<Arc<Chunk>>,
}

/// Chunks a room keeps decoded after their last reader moved on.
const RECENT_CHUNKS: usize = 4;

impl ChunkCache {
    fn get(&self, key: &(String, String, usize)) -> Option<Arc<Chunk>> {
        self.live.get(key).and_then(|w| w.upgrade())
    }

    fn put(&mut self, key: (String, String, usize), chunk: &Arc<Chunk>) {
        self.live.retain(|_, w| w.strong_count() > 0);
        self.live.insert(key, Arc::downgrade(chunk));
        self.recent.push_back(chunk.clone());
        while self.recent.len() > RECENT_CHUNKS {
            self.recent.pop_front();
        }
    }
}

/// All rooms of this server.
#[derive(Default)]
pub struct Realtime {
    rooms: Mutex<HashMap<String, Arc<Room>>>,
    next_socket: AtomicU64,
    pub sockets: AtomicUsize,
    pub delivered: AtomicU64,
    retention: Mutex<Retention>,
    /// Key revocations seen, per project: a subscribe that checked its key before one and
    /// joins the room after it checks the key again (see [`Realtime::revocations`]).
    revoked: Mutex<HashMap<String, u64>>,
    /// Revocations possibly missed in every project at once (the access listener was
    /// disconnected).
    revoked_everywhere: AtomicU64,
    /// Every open socket's cut-off, to close them all with 1001 on shutdown.
    open: Mutex<HashMap<u64, Arc<CutOff>>>,
    /// Rooms being created (their history opened outside `rooms`' lock), one at a time each.
    opening: Mutex<HashMap<String, Arc<Mutex<()>>>>,
    /// Set (before the 1001s go out) by a graceful shutdown: new sockets are refused, and one
    /// that was accepted just before is closed with 1001 at once.
    shutting_down: std::sync::atomic::AtomicBool,
    cut_offs: CutOffCounts,
    /// Row-level security of row events, per subscriber identity.
    pub visibility: crate::visibility::Visibility,
}

impl Realtime {
    /// A count that changes whenever an API key of `project_id` may have been revoked: taken
    /// before a subscribe checks its key and compared under the room's lock before it joins,
    /// so that a revocation in between (whose eviction would miss the new member) is never
    /// missed.
    fn revocations(&self, project_id: &str) -> u64 {
        let own = self
            .revoked
            .lock()
            .expect("poisoned")
            .get(project_id)
            .copied()
            .unwrap_or(0);
        own.wrapping_add(self.revoked_everywhere.load(Ordering::SeqCst))
    }

    /// A key of `project_id` was revoked, or a member removed (counted before the
    /// subscriptions are evicted).
    fn key_revoked(&self, project_id: &str) {
        *self
            .revoked
            .lock()
            .expect("poisoned")
            .entry(project_id.to_string())
            .or_default() += 1;
    }

    /// Revocations may have been missed anywhere.
    fn keys_revoked_everywhere(&self) {
        self.revoked_everywhere.fetch_add(1, Ordering::SeqCst);
    }

    /// (project, key id) of every key-bound subscription on this server.
    fn bound_keys(&self) -> HashSet<(String, String)> {
        let rooms: Vec<(String, Arc<Room>)> = self
            .rooms
            .lock()
            .expect("poisoned")
            .iter()
            .map(|(p, r)| (p.clone(), r.clone()))
            .collect();
        let mut out = HashSet::new();
        for (project_id, room) in rooms {
            let state = room.state.lock().expect("poisoned");
            for m in state.members.values() {
                if let Some(k) = &m.key {
                    out.insert((project_id.clone(), k.key_id.clone()));
                }
            }
        }
        out
    }

    pub fn set_retention(&self, r: Retention) {
        *self.retention.lock().expect("poisoned") = r;
    }

    fn retention(&self) -> Retention {
        *self.retention.lock().expect("poisoned")
    }

    /// Closes a project's room: members get an error and are removed (suspension, deletion).
    /// A suspended project's room keeps recording its history (as the project keeps its other
    /// data); a deleted one (`PROJECT_NOT_FOUND`) is dropped with its history.
    pub fn close_project(&self, project_id: &str, code: &str, message: &str) {
        self.visibility.forget(project_id);
        let deleted = code == "PROJECT_NOT_FOUND";
        let room = if deleted {
            self.rooms.lock().expect("poisoned").remove(project_id)
        } else {
            self.room(project_id)
        };
        if let Some(room) = room {
            if deleted {
                if let Some(task) = room.pump.lock().expect("poisoned").take() {
                    task.abort();
                }
                *room.history.lock().expect("poisoned") = None;
                let dir = room.dir.clone();
                let remove = move || {
                    if let Err(e) = std::fs::remove_dir_all(&dir) {
                        if e.kind() != std::io::ErrorKind::NotFound {
                            tracing::warn!(error = %e, dir = %dir.display(), "removing a deleted project's realtime history");
                        }
                    }
                };
                // Not on an async worker thread when there is a runtime.
                match tokio::runtime::Handle::try_current() {
                    Ok(rt) => drop(rt.spawn_blocking(remove)),
                    Err(_) => remove(),
                }
            }
            let members = std::mem::take(&mut room.state.lock().expect("poisoned").members);
            let msg = Message::text(
                json!({ "type": "error", "code": code, "message": message, "roomId": room.room_id })
                    .to_string(),
            );
            for m in members.values() {
                m.socket.push(msg.clone());
            }
        }
    }

    /// Closes every socket with 1001 ("server shutting down") and waits, at most
    /// [`SHUTDOWN_GRACE`], for them to finish closing.
    pub async fn close_all_sockets(&self) {
        self.shutting_down.store(true, Ordering::SeqCst);
        let open: Vec<Arc<CutOff>> = self
            .open
            .lock()
            .expect("poisoned")
            .values()
            .cloned()
            .collect();
        for c in &open {
            c.away("server shutting down");
        }
        let deadline = tokio::time::Instant::now() + SHUTDOWN_GRACE;
        while self.sockets.load(Ordering::Acquire) > 0 && tokio::time::Instant::now() < deadline {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    /// The realtime series of `/metrics`.
    pub fn render_metrics(&self) -> String {
        use std::fmt::Write;
        let rooms: Vec<(String, Arc<Room>)> = self
            .rooms
            .lock()
            .expect("poisoned")
            .iter()
            .map(|(p, r)| (p.clone(), r.clone()))
            .collect();
        let mut out = String::new();
        let mut bytes = String::new();
        let mut events = String::new();
        let mut catching_up = 0usize;
        let (mut fell_behind, mut chunk_reads) = (0, 0);
        for (project, room) in &rooms {
            fell_behind += room.fell_behind.load(Ordering::Relaxed);
            chunk_reads += room.chunk_reads.load(Ordering::Relaxed);
            catching_up += room
                .state
                .lock()
                .expect("poisoned")
                .members
                .values()
                .filter(|m| m.catching_up.is_some())
                .count();
            if let Some(h) = room.history.lock().expect("poisoned").as_ref() {
                let _ = writeln!(
                    bytes,
                    "fluxbase_realtime_history_bytes{{project=\"{project}\"}} {}",
                    h.bytes()
                );
                let _ = writeln!(
                    events,
                    "fluxbase_realtime_history_events{{project=\"{project}\"}} {}",
                    h.len()
                );
            }
        }
        out.push_str("# HELP fluxbase_realtime_history_bytes Bytes of a project's durable resume history on disk.\n# TYPE fluxbase_realtime_history_bytes gauge\n");
        out.push_str(&bytes);
        out.push_str("# HELP fluxbase_realtime_history_events Events in a project's durable resume history.\n# TYPE fluxbase_realtime_history_events gauge\n");
        out.push_str(&events);
        let _ = writeln!(
            out,
            "# HELP fluxbase_realtime_catching_up Subscriptions reading their backlog from the history at their own pace.\n# TYPE fluxbase_realtime_catching_up gauge\nfluxbase_realtime_catching_up {catching_up}"
        );
        let _ = writeln!(
            out,
            "# HELP fluxbase_realtime_fell_behind_total Subscriptions moved from live to catching up because their send queue was full.\n# TYPE fluxbase_realtime_fell_behind_total counter\nfluxbase_realtime_fell_behind_total {fell_behind}"
        );
        let _ = writeln!(
            out,
            "# HELP fluxbase_realtime_catch_up_reads_total History chunks read from disk and decoded for catching-up subscriptions (members at the same place share one).\n# TYPE fluxbase_realtime_catch_up_reads_total counter\nfluxbase_realtime_catch_up_reads_total {chunk_reads}"
        );
        out.push_str("# HELP fluxbase_realtime_cutoffs_total Sockets closed with 1008, by reason (queue_bytes, stalled, window, rate_limit).\n# TYPE fluxbase_realtime_cutoffs_total counter\n");
        let counts = self.cut_offs.lock().expect("poisoned").clone();
        for reason in ["queue_bytes", "stalled", "window", "rate_limit"] {
            let _ = writeln!(
                out,
                "fluxbase_realtime_cutoffs_total{{reason=\"{reason}\"}} {}",
                counts.get(reason).copied().unwrap_or(0)
            );
        }
        out
    }

    /// A project's room, if it has one on this server.
    fn room(&self, project_id: &str) -> Option<Arc<Room>> {
        self.rooms
            .lock()
            .expect("poisoned")
            .get(project_id)
            .cloned()
    }

    /// Ends the subscriptions a removed member holds in a project's room; each socket gets an
    /// `ACCESS_REVOKED` error and stays open for its other rooms.
    pub fn evict_user(&self, project_id: &str, user_id: &str) {
        // First, as for keys: a subscribe that checked membership before this and joins after
        // it checks again.
        self.key_revoked(project_id);
        let sockets = self.evict(
            project_id,
            |m| m.user.as_deref() == Some(user_id),
            "You are no longer a member of this project.",
        );
        if sockets > 0 {
            tracing::info!(
                project_id,
                user_id,
                sockets,
                "removed member's realtime subscriptions ended"
            );
        }
    }

    /// Ends the subscriptions an API key authorized in a project's room, directly or through a
    /// realtime token minted with it: all of them once the key is deleted (`current` is
    /// `None`), those of an older secret once it was rotated (`current` is the fingerprint of
    /// the secret it has now). Each socket gets `ACCESS_REVOKED` and stays open for its other
    /// rooms.
    fn evict_key(&self, project_id: &str, key_id: &str, current: Option<&str>) -> usize {
        let sockets = self.evict(
            project_id,
            |m| {
                m.key.as_ref().is_some_and(|k| {
                    k.key_id == key_id && current.is_none_or(|c| c != k.fingerprint)
                })
            },
            "The API key this subscription was authorized with was deleted or rotated.",
        );
        if sockets > 0 {
            tracing::info!(
                project_id,
                key_id,
                sockets,
                "realtime subscriptions of a revoked key ended"
            );
        }
        sockets
    }

    /// Ends the subscriptions of a project's room that `revoked` picks: each socket gets
    /// `ACCESS_REVOKED` with `message` and stays open for its other rooms. Returns how many.
    fn evict(&self, project_id: &str, revoked: impl Fn(&Member) -> bool, message: &str) -> usize {
        let Some(room) = self.room(project_id) else {
            return 0;
        };
        let mut state = room.state.lock().expect("poisoned");
        let gone: Vec<u64> = state
            .members
            .iter()
            .filter(|(_, m)| revoked(m))
            .map(|(id, _)| *id)
            .collect();
        let msg = Message::text(
            json!({ "type": "error", "code": "ACCESS_REVOKED", "roomId": room.room_id,
                    "message": message })
            .to_string(),
        );
        for id in &gone {
            if let Some(m) = state.members.remove(id) {
                m.socket.push(msg.clone());
            }
        }
        gone.len()
    }

    /// Whether a socket is (still) in a project's room.
    fn in_room(&self, project_id: &str, socket: u64) -> bool {
        let room = self.room(project_id);
        room.is_some_and(|r| {
            r.state
                .lock()
                .expect("poisoned")
                .members
                .contains_key(&socket)
        })
    }
}

/// A socket's writer: its queue (and pings) to the connection. It holds no sender of its own
/// queue, so it ends once the reader and the rooms have dropped theirs (queue sent, then a close
/// frame), when the connection fails, or when `cut_off` fires (over its limits, or the server
/// shuts down): that also interrupts a send stuck on a client that stopped reading, and the
/// socket is closed with the code and reason. A write that makes no progress for `stall` (the
/// client stopped reading) cuts the socket off with 1008. Closing is bounded by
/// [`CLOSE_GRACE`]; the reader ends when the writer does.
async fn write_socket(
    mut sink: futures_util::stream::SplitSink<WebSocket, Message>,
    mut rx: mpsc::UnboundedReceiver<Message>,
    cut_off_by: Arc<CutOff>,
    queued: Arc<AtomicUsize>,
    drained: Arc<Notify>,
    stall: Duration,
    written: Arc<AtomicU64>,
) {
    let cut = &cut_off_by.notify;
    let mut ping = tokio::time::interval(PING_EVERY);
    ping.tick().await;
    let cut_off = loop {
        let (msg, counted) = tokio::select! {
            msg = rx.recv() => match msg {
                Some(m) => (m, true),
                None => break false,
            },
            _ = ping.tick() => (Message::Ping(Default::default()), false),
            _ = cut.notified() => break true,
        };
        // What is already queued goes out in the same write: one flush per batch, not per
        // message (measured: ~2.5x the delivered messages/s at 1,000 subscribers). Each step
        // (a message handed to the connection, the flush) must make progress within `stall`:
        // some bytes written to the connection, however long the whole step takes.
        let mut sent_bytes = if counted { msg.len() } else { 0 };
        let batch = async {
            progress(stall, &written, sink.feed(msg)).await?;
            for _ in 1..64 {
                match rx.try_recv() {
                    Ok(m) => {
                        sent_bytes += m.len();
                        progress(stall, &written, sink.feed(m)).await?
                    }
                    Err(_) => break,
                }
            }
            progress(stall, &written, sink.flush()).await
        };
        tokio::select! {
            sent = batch => match sent {
                Ok(()) => {}
                Err(Stop::Failed) => return,
                Err(Stop::Stalled) => {
                    cut_off_by.fire(
                        "stalled",
                        &format!("client stopped reading: nothing could be sent for {} s", stall.as_secs()),
                    );
                    break true;
                }
            },
            _ = cut.notified() => break true,
        }
        queued.fetch_sub(sent_bytes, Ordering::AcqRel);
        drained.notify_waiters();
    };
    let goodbye = async {
        if cut_off {
            let reason = cut_off_by.reason.lock().expect("poisoned").clone();
            let (code, reason) = reason.unwrap_or((CloseCode::Policy, "policy violation".into()));
            let _ = sink.send(close_frame(code, &reason)).await;
        }
        let _ = sink.close().await;
    };
    let _ = tokio::time::timeout(CLOSE_GRACE, goodbye).await;
}

/// Why a write to a socket did not complete.
enum Stop {
    Failed,
    Stalled,
}

/// A write step that must make progress (bytes written to the connection) every `stall`.
async fn progress(
    stall: Duration,
    written: &AtomicU64,
    step: impl std::future::Future<Output = Result<(), WsError>>,
) -> Result<(), Stop> {
    match crate::realtime_io::with_progress(stall, written, step).await {
        Ok(Ok(())) => Ok(()),
        Ok(Err(_)) => Err(Stop::Failed),
        Err(_) => Err(Stop::Stalled),
    }
}

fn frame(kind: &str, room_id: &str, event: &Event) -> Message {
    let body = match &event.kind {
        EventKind::Broadcast { .. } => {
            // The payload is {"event", "payload"}: splice roomId and type around it.
            let inner = event.payload.trim_start_matches('{');
            let id = &event.id;
            format!("{{\"type\":\"broadcast\",\"roomId\":\"{room_id}\",\"id\":\"{id}\",{inner}")
        }
        _ => format!(
            "{{\"type\":\"{kind}\",\"roomId\":\"{room_id}\",\"payload\":{}}}",
            event.payload
        ),
    };
    Message::text(body)
}

fn kind_of(event: &Event) -> &'static str {
    match event.kind {
        EventKind::Row { .. } => "db_event",
        EventKind::Schema { .. } => "schema_update",
        EventKind::Broadcast { .. } => "broadcast",
    }
}

impl Room {
    /// Whether a broadcast of `bytes` from SQL or the REST API fits the project's budget now
    /// (and takes it from the budget).
    fn admit_broadcast(&self, bytes: usize) -> bool {
        let mut budget = self.budget.lock().expect("poisoned");
        let (count, size) = &mut *budget;
        if !count.take(1.0) {
            return false;
        }
        if !size.take(bytes as f64) {
            if count.rate > 0.0 {
                count.tokens = (count.tokens + 1.0).min(count.rate.max(1.0));
            }
            return false;
        }
        true
    }

    /// The distinct identities of the room's live members (those a batch needs verdicts for).
    fn identities(&self) -> Vec<Identity> {
        let state = self.state.lock().expect("poisoned");
        let set: HashSet<&Identity> = state
            .members
            .values()
            .filter(|m| m.catching_up.is_none())
            .map(|m| &m.interest.identity)
            .collect();
        set.into_iter().cloned().collect()
    }

    /// Drops the events the room already has (a replay after a stream rewind or a restart).
    fn unseen(&self, batch: Vec<Arc<Event>>) -> Vec<Arc<Event>> {
        let state = self.state.lock().expect("poisoned");
        match state.last_id.as_deref() {
            Some(last) => batch.into_iter().filter(|e| e.id.as_str() > last).collect(),
            None => batch,
        }
    }

    /// Stores a slice of the stream's events in the history and fans each out to the live
    /// members that want it and whose identity may see it (`skip`: over the broadcast budget,
    /// seen but not delivered; `verdicts` index from `first_index`). Nothing is done when a
    /// live member's identity has no verdicts yet (it joined, or caught up, while they were
    /// computed): those identities are returned, to be evaluated first. The history is written
    /// (not fsynced) before the locks are released, so a catching-up member can read all it was
    /// told about.
    fn ingest(
        self: &Arc<Room>,
        events: &[(Arc<Event>, bool)],
        first_index: usize,
        verdicts: &Verdicts,
        max_broadcast: usize,
        delivered: &AtomicU64,
    ) -> Result<(), Vec<Identity>> {
        let now_ms = chrono::Utc::now().timestamp_millis();
        let mut state = self.state.lock().expect("poisoned");
        let missing: HashSet<Identity> = state
            .members
            .values()
            .filter(|m| m.catching_up.is_none() && !verdicts.contains(&m.interest.identity))
            .map(|m| m.interest.identity.clone())
            .collect();
        if !missing.is_empty() {
            return Err(missing.into_iter().collect());
        }
        let mut history = self.history.lock().expect("poisoned");
        for (i, (event, skip)) in events.iter().enumerate() {
            if state
                .last_id
                .as_deref()
                .is_some_and(|last| event.id.as_str() <= last)
            {
                continue; // a replay after a stream rewind or a restart: already stored
            }
            let oversized = matches!(event.kind, EventKind::Broadcast { .. })
                && event.payload.len() > max_broadcast;
            if oversized {
                tracing::warn!(
                    room = self.room_id,
                    id = event.id,
                    bytes = event.payload.len(),
                    limit = max_broadcast,
                    "a broadcast from SQL is over realtime_max_broadcast_bytes: dropped"
                );
            }
            if *skip || oversized {
                // Never fanned out nor retained; its id still counts as seen.
                state.last_id = Some(event.id.clone());
                continue;
            }
            if let Some(h) = history.as_mut() {
                if let Err(e) = h.append(event, now_ms) {
                    tracing::error!(room = self.room_id, error = %e, "writing the realtime history: resumes from before this event are refused");
                    h.mark_gap(&event.id);
                }
            }
            let message = frame(kind_of(event), &self.room_id, event);
            let n = self.fan_out(&mut state, event, &message, None, |identity| {
                verdicts.get(identity, first_index + i)
            });
            delivered.fetch_add(n as u64, Ordering::Relaxed);
        }
        if let Some(h) = history.as_mut() {
            // Trimmed from the index now; the files go outside the locks (the pump).
            if let Err(e) = h.flush().and_then(|_| h.trim_later(now_ms)) {
                tracing::error!(room = self.room_id, error = %e, "writing the realtime history");
            }
        }
        Ok(())
    }

    /// Hands one stored event to the live members that want it and may see it (`verdict` of
    /// their identity; except `except`); a member whose queue is past its high-water mark
    /// starts catching up from the event before this one instead of being cut off. Returns how
    /// many got it now.
    fn fan_out<'v>(
        self: &Arc<Room>,
        state: &mut RoomState,
        event: &Event,
        message: &Message,
        except: Option<u64>,
        verdict: impl Fn(&Identity) -> Option<&'v Verdict>,
    ) -> usize {
        let before = state.last_id.replace(event.id.clone());
        let (parsed, parsed_old) = (std::cell::OnceCell::new(), std::cell::OnceCell::new());
        let record = || parsed.get_or_init(|| parse_row(&event.record)).clone();
        let old_record = || parsed_old.get_or_init(|| parse_row(&event.old)).clone();
        let mut n = 0;
        let mut full = Vec::new();
        for (id, m) in state.members.iter() {
            if m.catching_up.is_some() || Some(*id) == except {
                continue;
            }
            let instead;
            let message =
                match m
                    .interest
                    .decide(event, verdict(&m.interest.identity), &record, &old_record)
                {
                    Decision::Send => message,
                    Decision::SendInstead(payload) => {
                        instead = instead_frame(&self.room_id, payload);
                        &instead
                    }
                    Decision::Skip => continue,
                };
            match m.socket.offer(message) {
                Offer::Queued => n += 1,
                Offer::Full => full.push(*id),
                Offer::Gone => {}
            }
        }
        for id in full {
            self.fell_behind.fetch_add(1, Ordering::Relaxed);
            self.start_catch_up(state, id, before.clone());
        }
        n
    }

    /// Moves a member to catching up from the history after `from` (from the beginning with
    /// `None`), at the pace its socket drains; it joins live again once it has read everything.
    fn start_catch_up(self: &Arc<Room>, state: &mut RoomState, socket: u64, from: Option<String>) {
        state.next_epoch += 1;
        let epoch = state.next_epoch;
        let Some(m) = state.members.get_mut(&socket) else {
            return;
        };
        m.catching_up = Some(epoch);
        let task = self
            .clone()
            .catch_up(m.socket.clone(), m.interest.clone(), epoch, from);
        tokio::spawn(task);
    }

    async fn catch_up(
        self: Arc<Room>,
        socket: Arc<SocketShared>,
        interest: Arc<Interest>,
        epoch: u64,
        mut pos: Option<String>,
    ) {
        let behind = |socket: &SocketShared| {
            socket.close.fire(
                "window",
                "client too slow: its position fell out of the retained history",
            )
        };
        loop {
            if !socket.room_to_send().await {
                return;
            }
            let chunk = {
                let mut state = self.state.lock().expect("poisoned");
                let current = |s: &RoomState| {
                    s.members
                        .get(&socket.id)
                        .is_some_and(|m| m.catching_up == Some(epoch))
                };
                if !current(&state) {
                    return;
                }
                let history = self.history.lock().expect("poisoned");
                let Some(h) = history.as_ref() else {
                    behind(&socket);
                    return;
                };
                if !h.accepts(pos.as_deref()) {
                    behind(&socket);
                    return;
                }
                if !h.has_after(pos.as_deref()) {
                    // Everything read: live from the next event on. The pump stores and fans
                    // out under this lock, so nothing falls between.
                    drop(history);
                    if let Some(m) = state.members.get_mut(&socket.id) {
                        m.catching_up = None;
                    }
                    return;
                }
                h.after_aligned(pos.as_deref(), CATCH_UP_CHUNK, CATCH_UP_CHUNK_BYTES)
            };
            // Decoded once for every member reading the same chunk; at most
            // `realtime_catch_up_reads` reads of the room at once.
            let key = (
                chunk[0].id.clone(),
                chunk[chunk.len() - 1].id.clone(),
                chunk.len(),
            );
            let cached = self.chunks.lock().expect("poisoned").get(&key);
            let shared = match cached {
                Some(c) => c,
                None => {
                    let Ok(_permit) = self.reads.clone().acquire_owned().await else {
                        return;
                    };
                    let again = self.chunks.lock().expect("poisoned").get(&key);
                    match again {
                        Some(c) => c,
                        None => {
                            let Ok(events) = tokio::task::spawn_blocking(move || {
                                crate::realtime_history::read_all(chunk)
                            })
                            .await
                            else {
                                return;
                            };
                            let mut read = Vec::with_capacity(events.len());
                            for (id, event) in events {
                                let Ok(event) = event else {
                                    // Its segment was trimmed meanwhile.
                                    behind(&socket);
                                    return;
                                };
                                read.push((id, Arc::new(event), std::sync::OnceLock::new()));
                            }
                            self.chunk_reads.fetch_add(1, Ordering::Relaxed);
                            let c = Arc::new(Chunk { events: read });
                            self.chunks.lock().expect("poisoned").put(key, &c);
                            c
                        }
                    }
                }
            };
            // What this identity may see of the chunk, decided outside the locks.
            let chunk: Vec<Arc<Event>> = shared.events.iter().map(|(_, e, _)| e.clone()).collect();
            let verdicts = match self.app.upgrade() {
                Some(app) => {
                    app.realtime
                        .visibility
                        .verdicts(
                            &app,
                            &self.project_id,
                            std::slice::from_ref(&interest.identity),
                            &chunk,
                        )
                        .await
                }
                None => return,
            };
            drop(chunk);
            for (i, (id, event, framed)) in shared.events.iter().enumerate() {
                let record = || parse_row(&event.record);
                let old_record = || parse_row(&event.old);
                let message = match interest.decide(
                    event,
                    verdicts.get(&interest.identity, i),
                    &record,
                    &old_record,
                ) {
                    Decision::Send => Some(
                        framed
                            .get_or_init(|| frame(kind_of(event), &self.room_id, event))
                            .clone(),
                    ),
                    Decision::SendInstead(payload) => Some(instead_frame(&self.room_id, payload)),
                    Decision::Skip => None,
                };
                if let Some(message) = message {
                    if socket.queued.load(Ordering::Acquire) >= socket.limit
                        && !socket.room_to_send().await
                    {
                        return;
                    }
                    if !still_current(&self, &socket, epoch) || !socket.enqueue(message) {
                        return;
                    }
                }
                pos = Some(id.clone());
            }
        }
    }
}

/// Whether a catch-up task is still its member's (not unsubscribed, evicted or restarted).
fn still_current(room: &Room, socket: &SocketShared, epoch: u64) -> bool {
    room.state
        .lock()
        .expect("poisoned")
        .members
        .get(&socket.id)
        .is_some_and(|m| m.catching_up == Some(epoch))
}

/// The id of a broadcast from a client or the REST API: `<last event id>-<seq, 8 hex>`, after
/// the room's last id and before the next event's. The seq's high
/// [`crate::realtime_history::EPOCH_BITS`] bits are the history's boot epoch (durable, one more
/// each start), the rest count: after a power loss that took broadcasts off the history's
/// tail, the next one still gets an id never issued before. `None`: this epoch's count at
/// this position ran out (move to the next epoch and ask again).
fn next_broadcast_id(last: Option<&str>, epoch: u32) -> Option<String> {
    use crate::realtime_history::{EPOCH_BITS, SEQ_MASK};
    const ZERO: &str = "0000000000000000-00000000";
    let epoch = epoch & ((1 << EPOCH_BITS) - 1);
    let first = (epoch << (32 - EPOCH_BITS)) | 1;
    let last = last.unwrap_or(ZERO);
    let mut parts = last.splitn(3, '-');
    let (lsn, index, seq) = (parts.next(), parts.next(), parts.next());
    match (
        lsn,
        index,
        seq.and_then(|s| u32::from_str_radix(s, 16).ok()),
    ) {
        (Some(lsn), Some(index), Some(seq)) => {
            let seq_epoch = seq >> (32 - EPOCH_BITS);
            let next = if seq_epoch < epoch {
                first
            } else if seq_epoch == epoch && seq & SEQ_MASK == SEQ_MASK || seq == u32::MAX {
                return None;
            } else {
                // This epoch (or, once the epoch counter wrapped, a later-sorting one).
                seq + 1
            };
            Some(format!("{lsn}-{index}-{next:08X}"))
        }
        _ => Some(format!("{last}-{first:08X}")),
    }
}

/// A `db_event` frame around a payload that replaces the event's own (see [`Verdict`]).
fn instead_frame(room_id: &str, payload: &str) -> Message {
    Message::text(format!(
        "{{\"type\":\"db_event\",\"roomId\":\"{room_id}\",\"payload\":{payload}}}"
    ))
}

/// Claims of a realtime token.
#[derive(Serialize, Deserialize)]
struct Claims {
    /// Project id.
    p: String,
    /// authUid, when the token acts for an end user.
    #[serde(skip_serializing_if = "Option::is_none")]
    u: Option<String>,
    /// Tables the token may see.
    #[serde(skip_serializing_if = "Option::is_none")]
    t: Option<Vec<String>>,
    /// Expiry, Unix seconds.
    e: i64,
    /// The member who obtained the token (a session's user): the token is refused once they
    /// are no longer a member.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    m: Option<String>,
    /// The API key that minted the token, and the fingerprint of its secret then: the token is
    /// refused once the key is deleted or rotated.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    k: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    f: Option<String>,
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct TokenRequest {
    pub project_id: String,
    pub auth_uid: Option<String>,
    pub tables: Option<Vec<String>>,
    /// Seconds; default 3600, at most 86400.
    pub expires_in: Option<i64>,
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct BroadcastRequest {
    pub project_id: String,
    pub event: String,
    #[serde(default)]
    pub payload: Value,
}

fn token_key(app: &App) -> ring::hmac::Key {
    ring::hmac::Key::new(
        ring::hmac::HMAC_SHA256,
        app.secrets.derive("realtime-token").as_bytes(),
    )
}

/// A fingerprint of an API key's secret (from its SHA-256): changes when the key is rotated,
/// and says nothing about the secret (an HMAC under the instance's realtime key).
fn key_fingerprint(app: &App, key_hash: &[u8]) -> String {
    let tag = ring::hmac::sign(
        &token_key(app),
        &[b"api-key:".as_slice(), key_hash].concat(),
    );
    hex::encode(&tag.as_ref()[..12])
}

fn b64url(data: &[u8]) -> String {
    use base64::Engine;
    base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(data)
}

impl App {
    /// `POST /api/realtime/token`: a short-lived token a browser can subscribe with.
    pub async fn realtime_token(
        &self,
        access: &Access,
        req: TokenRequest,
    ) -> ApiResult<(StatusCode, Value)> {
        let ttl = req.expires_in.unwrap_or(3600);
        if !(1..=86_400).contains(&ttl) {
            return Err(ApiError::BadRequest(
                "expiresIn: between 1 and 86400 seconds".into(),
            ));
        }
        if let Some(uid) = &req.auth_uid {
            crate::rls::valid_uid(uid, "authUid")?;
            if access.principal.user_id().is_some_and(|me| me != uid) {
                return Err(ApiError::ScopeMismatch(
                    "A session's token acts as its own user; authUid is for API keys.".into(),
                ));
            }
        }
        let expires = chrono::Utc::now() + chrono::Duration::seconds(ttl);
        let (k, f) = match &access.principal {
            Principal::Key { key_id, .. } => {
                let hash = self
                    .current_key_hash(&access.project.id, key_id)
                    .await?
                    .ok_or_else(|| ApiError::AuthRequired("Invalid or revoked API key.".into()))?;
                (Some(key_id.clone()), Some(key_fingerprint(self, &hash)))
            }
            Principal::Session { .. } => (None, None),
        };
        let claims = Claims {
            p: access.project.id.clone(),
            u: req.auth_uid,
            t: req.tables,
            e: expires.timestamp(),
            m: access.principal.user_id().map(str::to_string),
            k,
            f,
        };
        let body = b64url(serde_json::to_string(&claims).expect("claims").as_bytes());
        let sig = ring::hmac::sign(&token_key(self), body.as_bytes());
        let token = format!("{TOKEN_PREFIX}{body}.{}", b64url(sig.as_ref()));
        Ok((
            StatusCode::OK,
            json!({ "success": true, "token": token, "expiresAt": expires }),
        ))
    }

    fn verify_realtime_token(&self, token: &str) -> Result<Claims, (&'static str, String)> {
        let bad = || ("AUTH_REQUIRED", "Invalid realtime token.".to_string());
        let rest = token.strip_prefix(TOKEN_PREFIX).ok_or_else(bad)?;
        let (body, sig) = rest.split_once('.').ok_or_else(bad)?;
        use base64::Engine;
        let sig = base64::engine::general_purpose::URL_SAFE_NO_PAD
            .decode(sig)
            .map_err(|_| bad())?;
        ring::hmac::verify(&token_key(self), body.as_bytes(), &sig).map_err(|_| bad())?;
        let json = base64::engine::general_purpose::URL_SAFE_NO_PAD
            .decode(body)
            .map_err(|_| bad())?;
        let claims: Claims = serde_json::from_slice(&json).map_err(|_| bad())?;
        if claims.e <= chrono::Utc::now().timestamp() {
            return Err(("TOKEN_EXPIRED", "Realtime token has expired.".into()));
        }
        Ok(claims)
    }

    /// The SHA-256 of a live API key's current secret (`None`: deleted, or not this project's).
    async fn current_key_hash(&self, project_id: &str, key_id: &str) -> ApiResult<Option<Vec<u8>>> {
        Ok(self
            .live_key(project_id, key_id)
            .await?
            .map(|(hash, _)| hash))
    }

    /// A live API key's current secret (its SHA-256) and the project role of its scope
    /// (`None`: deleted, or not this project's).
    async fn live_key(
        &self,
        project_id: &str,
        key_id: &str,
    ) -> ApiResult<Option<(Vec<u8>, DbRole)>> {
        let client = self.control.get().await?;
        let row = client
            .query_opt(
                "SELECT key_hash, scope FROM fluxbase.api_keys
                 WHERE id = $1 AND project_id = $2 AND revoked_at IS NULL",
                &[&key_id, &project_id],
            )
            .await?;
        let Some(row) = row else { return Ok(None) };
        let scope: String = row.get(1);
        let scope = crate::auth::Scope::parse(&scope)
            .ok_or_else(|| anyhow::anyhow!("API key {key_id} has an unknown scope {scope:?}"))?;
        Ok(Some((row.get(0), scope.db_role())))
    }

    /// The project role of a member's current role (`None`: not a member).
    async fn member_db_role(&self, project_id: &str, user_id: &str) -> ApiResult<Option<DbRole>> {
        let client = self.control.get().await?;
        let row = client
            .query_opt(
                "SELECT role FROM fluxbase.members WHERE project_id = $1 AND user_id = $2",
                &[&project_id, &user_id],
            )
            .await?;
        Ok(row
            .and_then(|r| crate::auth::MemberRole::parse(r.get(0)))
            .map(|m| m.db_role()))
    }

    /// An API key was deleted or rotated (here or by another server): the realtime
    /// subscriptions it authorized, directly or through its tokens, end unless they hold its
    /// current secret.
    pub async fn key_revoked(&self, project_id: &str, key_id: &str) {
        // First: a subscribe that checked this key before the revocation and has not joined
        // yet sees it when it does, and checks again.
        self.realtime.key_revoked(project_id);
        let current = match self.current_key_hash(project_id, key_id).await {
            Ok(hash) => hash.map(|h| key_fingerprint(self, &h)),
            Err(e) => {
                // Unknown state: end them all (the clients may subscribe again).
                tracing::warn!(error = %e, key_id, "checking a revoked key");
                None
            }
        };
        self.realtime
            .evict_key(project_id, key_id, current.as_deref());
    }

    /// Revocations notified while the access listener was disconnected are lost: every
    /// key-bound subscription is checked against its key again (run when it reconnects), and
    /// subscribes under way check theirs again before they join.
    pub async fn recheck_realtime_keys(&self) {
        self.realtime.keys_revoked_everywhere();
        for (project_id, key_id) in self.realtime.bound_keys() {
            self.key_revoked(&project_id, &key_id).await;
        }
    }

    /// Whether a subscription's key still has the secret it was authorized with.
    async fn check_binding(
        &self,
        project_id: &str,
        key: &KeyBinding,
    ) -> Result<(), (&'static str, String)> {
        let current = self
            .current_key_hash(project_id, &key.key_id)
            .await
            .map_err(|e| (e.code(), e.to_string()))?
            .map(|h| key_fingerprint(self, &h));
        if current.as_deref() != Some(key.fingerprint.as_str()) {
            return Err((
                "ACCESS_REVOKED",
                "The API key this subscription was authorized with was deleted or rotated.".into(),
            ));
        }
        Ok(())
    }

    /// The cluster's WAL insert position: a transaction that commits after this call has a
    /// commit LSN at or above it; one that committed before, below it.
    async fn wal_insert_lsn(&self) -> ApiResult<Lsn> {
        let client = self.control.get().await?;
        let row = client
            .query_one("SELECT pg_current_wal_insert_lsn()::text", &[])
            .await?;
        let lsn: String = row.get(0);
        lsn.parse()
            .map_err(|_| ApiError::Internal(anyhow::anyhow!("unexpected WAL position {lsn:?}")))
    }

    /// `POST /api/realtime/broadcast`: a backend's broadcast to a project's room.
    pub fn realtime_broadcast(
        &self,
        access: &Access,
        req: BroadcastRequest,
    ) -> ApiResult<(StatusCode, Value)> {
        if access.db_role == crate::auth::DbRole::Read {
            let why =
                "Broadcasting needs a readwrite or admin key (or a developer or admin member).";
            return Err(match access.member_role {
                Some(_) => ApiError::InsufficientPermissions(why.into()),
                None => ApiError::ScopeMismatch(why.into()),
            });
        }
        if req.event.is_empty() || req.event.len() > 200 {
            return Err(ApiError::BadRequest("event: 1 to 200 characters".into()));
        }
        let delivered = self
            .broadcast_to_room(&access.project.id, None, &req.event, &req.payload)
            .map_err(|e| match e.as_str() {
                BUSY => ApiError::Busy(format!(
                    "Too many broadcasts for this project: at most {} per second and {} bytes per second (realtime_project_broadcasts_per_sec, realtime_project_broadcast_bytes_per_sec). Retry shortly.",
                    self.config.realtime_project_broadcasts_per_sec,
                    self.config.realtime_project_broadcast_bytes_per_sec
                )),
                _ => ApiError::PayloadTooLarge(self.config.realtime_max_broadcast_bytes),
            })?;
        Ok((
            StatusCode::OK,
            json!({ "success": true, "delivered": delivered }),
        ))
    }

    /// Sends a broadcast to a room's members (except `from`); returns how many got it, or
    /// why it was refused (a payload over `realtime_max_broadcast_bytes`, or [`BUSY`]: one
    /// from the REST API (`from` is `None`) over the project's budget).
    fn broadcast_to_room(
        &self,
        project_id: &str,
        from: Option<u64>,
        event: &str,
        payload: &Value,
    ) -> Result<usize, String> {
        let limit = self.config.realtime_max_broadcast_bytes;
        let size = serde_json::to_vec(payload).map_or(usize::MAX, |v| v.len());
        if size > limit {
            return Err(format!(
                "broadcast payload is {size} bytes; the limit is {limit} bytes"
            ));
        }
        let room = self.realtime.room(project_id);
        let Some(room) = room else { return Ok(0) };
        if from.is_none() && !room.admit_broadcast(size) {
            self.metrics
                .realtime_broadcasts_dropped
                .fetch_add(1, Ordering::Relaxed);
            return Err(BUSY.into());
        }
        // Into the room's history in order, with an id after the room's last one.
        let body = json!({ "event": event, "payload": payload }).to_string();
        let mut state = room.state.lock().expect("poisoned");
        let mut history = room.history.lock().expect("poisoned");
        let last = state.last_id.as_deref();
        let id = match history.as_mut() {
            None => next_broadcast_id(last, 0),
            Some(h) => next_broadcast_id(last, h.epoch()).or_else(|| {
                let epoch = h
                    .next_epoch()
                    .map_err(|e| tracing::error!(room = room.room_id, error = %e, "recording a new broadcast epoch"))
                    .ok()?;
                next_broadcast_id(last, epoch)
            }),
        };
        let Some(id) = id else {
            drop(history);
            drop(state);
            return Err(BUSY.into());
        };
        let event = Event {
            id,
            kind: EventKind::Broadcast {
                event: event.to_string(),
            },
            schema: None,
            table: None,
            record: None,
            old: None,
            unchanged_toast: Vec::new(),
            commit_timestamp: chrono::Utc::now()
                .to_rfc3339_opts(chrono::SecondsFormat::Micros, true),
            // Not from the WAL: after every subscribe's starting point.
            commit_lsn: Lsn(u64::MAX),
            end_lsn: Lsn(0),
            last_in_transaction: true,
            payload: Arc::from(body),
        };
        {
            if let Some(h) = history.as_mut() {
                // Written now; made durable by the pump's next tick.
                let now_ms = chrono::Utc::now().timestamp_millis();
                if let Err(e) = h.append(&event, now_ms).and_then(|_| h.flush()) {
                    tracing::error!(room = room.room_id, error = %e, "writing the realtime history: resumes from before this broadcast are refused");
                    h.mark_gap(&event.id);
                }
            }
            drop(history);
        }
        let msg = frame("broadcast", &room.room_id, &event);
        // Broadcasts are not row-filtered: every member may see them.
        let n = room.fan_out(&mut state, &event, &msg, from, |_| Some(&Verdict::Send));
        drop(state);
        self.realtime
            .delivered
            .fetch_add(n as u64, Ordering::Relaxed);
        Ok(n)
    }

    /// Starts a project's room (its pump stores the change stream in the durable history from
    /// now on, subscribers or not); called when the project's change stream starts.
    pub fn start_room(self: &Arc<App>, project_id: &str) {
        let _ = self.room(project_id);
    }

    /// The project's room, created (with its history and its pump on the bus) on first use.
    fn room(self: &Arc<App>, project_id: &str) -> Arc<Room> {
        if let Some(r) = self
            .realtime
            .rooms
            .lock()
            .expect("poisoned")
            .get(project_id)
        {
            return r.clone();
        }
        // The history is opened (read back, up to its byte bound) without the lock of every
        // room; one opening per project at a time.
        let opening = self
            .realtime
            .opening
            .lock()
            .expect("poisoned")
            .entry(project_id.to_string())
            .or_default()
            .clone();
        let _opening = opening.lock().expect("poisoned");
        if let Some(r) = self
            .realtime
            .rooms
            .lock()
            .expect("poisoned")
            .get(project_id)
        {
            return r.clone();
        }
        let retention = self.realtime.retention();
        let dir = self.config.data_dir.join("realtime").join(project_id);
        let history = match History::open(
            &dir,
            Limits {
                events: retention.events,
                age_ms: retention.age.as_millis() as i64,
                bytes: retention.bytes as u64,
            },
        ) {
            Ok(h) => Some(h),
            Err(e) => {
                tracing::error!(project_id, dir = %dir.display(), error = %e,
                    "opening the realtime history: resumes are refused");
                None
            }
        };
        let last_id = history
            .as_ref()
            .and_then(|h| h.last_seen().map(str::to_string));
        let room = Arc::new(Room {
            room_id: format!("project_{project_id}"),
            project_id: project_id.to_string(),
            app: Arc::downgrade(self),
            state: Mutex::new(RoomState {
                last_id,
                ..Default::default()
            }),
            history: Mutex::new(history),
            dir,
            budget: Mutex::new((
                Bucket::new(self.config.realtime_project_broadcasts_per_sec as f64),
                Bucket::new(self.config.realtime_project_broadcast_bytes_per_sec as f64),
            )),
            pump: Mutex::new(None),
            chunks: Mutex::new(ChunkCache::default()),
            reads: Arc::new(tokio::sync::Semaphore::new(
                self.config.realtime_catch_up_reads.max(1),
            )),
            fell_behind: AtomicU64::new(0),
            chunk_reads: AtomicU64::new(0),
        });
        let mut sub = self.bus.project(project_id).subscribe_durable();
        let weak_room = Arc::downgrade(&room);
        let weak_app = Arc::downgrade(self);
        let project = project_id.to_string();
        let task = tokio::spawn(async move {
            let mut tick = tokio::time::interval(PUMP_TICK);
            // Stored but not covered by an fsync yet (or an fsync or a gap's record failed).
            let mut pending_ack: Option<Lsn> = None;
            // The fsync under way, off the pump so that delivery never waits for the disk, and
            // the acknowledgement it makes durable. At most one at a time: what is stored
            // meanwhile goes into the next (group commit).
            let mut syncing: Option<(SyncTask, Option<Lsn>)> = None;
            loop {
                let mut batch = Vec::new();
                let mut synced = None;
                tokio::select! {
                    e = sub.events.recv() => match e {
                        Some(e) => batch.push(e),
                        None => return,
                    },
                    _ = tick.tick() => {}
                    r = async { (&mut syncing.as_mut().expect("guarded").0).await },
                        if syncing.is_some() => synced = Some(r),
                }
                // What is queued, up to a schema event (policies may change with it) or the
                // batch bound: one row-level security evaluation for all of it.
                while batch.len() < PUMP_BATCH
                    && !matches!(
                        batch.last().map(|e| &e.kind),
                        Some(EventKind::Schema { .. })
                    )
                {
                    match sub.events.try_recv() {
                        Ok(e) => batch.push(e),
                        Err(_) => break,
                    }
                }
                let (Some(room), Some(app)) = (weak_room.upgrade(), weak_app.upgrade()) else {
                    return;
                };
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
                let max = app.config.realtime_max_broadcast_bytes;
                let events: Vec<(Arc<Event>, bool)> = batch
                    .into_iter()
                    .map(|event| {
                        // Over the project's budget: dropped for every member alike, rather
                        // than filling every member's queue.
                        let skip = matches!(event.kind, EventKind::Broadcast { .. })
                            && event.payload.len() <= max
                            && !room.admit_broadcast(event.payload.len());
                        if skip {
                            app.metrics
                                .realtime_broadcasts_dropped
                                .fetch_add(1, Ordering::Relaxed);
                        }
                        (event, skip)
                    })
                    .collect();
                let all: Vec<Arc<Event>> = events.iter().map(|(e, _)| e.clone()).collect();
                let mut verdicts = Verdicts::default();
                let mut missing = room.identities();
                // Stored and delivered a slice at a time, letting the sockets' writers run in
                // between; verdicts computed outside the locks, again for any identity that
                // went live meanwhile.
                for (n, slice) in events.chunks(DELIVERY_SLICE).enumerate() {
                    loop {
                        if !missing.is_empty() {
                            let more = app
                                .realtime
                                .visibility
                                .verdicts(&app, &project, &missing, &all)
                                .await;
                            verdicts.merge(more);
                        }
                        match room.ingest(
                            slice,
                            n * DELIVERY_SLICE,
                            &verdicts,
                            max,
                            &app.realtime.delivered,
                        ) {
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
                    app.realtime.visibility.invalidate(&project);
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
        });
        *room.pump.lock().expect("poisoned") = Some(task);
        self.realtime
            .rooms
            .lock()
            .expect("poisoned")
            .insert(project_id.to_string(), room.clone());
        self.realtime
            .opening
            .lock()
            .expect("poisoned")
            .remove(project_id);
        room
    }

    /// Serves one WebSocket connection until it closes.
    pub async fn serve_socket(self: Arc<App>, ws: WebSocket) {
        let id = self.realtime.next_socket.fetch_add(1, Ordering::Relaxed);
        self.realtime.sockets.fetch_add(1, Ordering::Relaxed);
        let written = ws.get_ref().written();
        let (sink, mut stream) = ws.split();
        let (tx, rx) = mpsc::unbounded_channel::<Message>();
        let shared = Arc::new(SocketShared {
            id,
            tx,
            close: Arc::new(CutOff::new(self.realtime.cut_offs.clone())),
            queued: Arc::new(AtomicUsize::new(0)),
            drained: Arc::new(Notify::new()),
            limit: self.config.realtime_send_queue_bytes.max(1),
        });
        self.realtime
            .open
            .lock()
            .expect("poisoned")
            .insert(id, shared.close.clone());
        if self.realtime.shutting_down.load(Ordering::SeqCst) {
            // Upgraded just as the shutdown began (after its check, before the 1001s went out).
            shared.close.away("server shutting down");
        }
        let mut writer = tokio::spawn(write_socket(
            sink,
            rx,
            shared.close.clone(),
            shared.queued.clone(),
            shared.drained.clone(),
            Duration::from_secs(self.config.realtime_client_stall_secs.max(1)),
            written,
        ));
        let mut writer_done = false;
        let mut limits = SocketLimits::new(&self.config);

        let mut joined: HashSet<String> = HashSet::new();
        // A socket in no room holds a connection for nothing: it gets a deadline (pings do not
        // extend it), so anonymous clients cannot keep thousands of them open.
        let unsubscribed_limit =
            Duration::from_secs(self.config.realtime_unsubscribed_timeout_secs);
        let mut unsubscribed_since = Some(tokio::time::Instant::now());
        loop {
            match (joined.is_empty(), unsubscribed_since) {
                (true, None) => unsubscribed_since = Some(tokio::time::Instant::now()),
                (false, Some(_)) => unsubscribed_since = None,
                _ => {}
            }
            let unsubscribed_left = unsubscribed_since
                .filter(|_| !unsubscribed_limit.is_zero())
                .map(|since| unsubscribed_limit.saturating_sub(since.elapsed()));
            let wait = unsubscribed_left.map_or(IDLE_TIMEOUT, |left| left.min(IDLE_TIMEOUT));
            let next = tokio::select! {
                n = tokio::time::timeout(wait, stream.next()) => n,
                _ = &mut writer => {
                    writer_done = true; // cut off (too slow, shutdown) or the connection is gone
                    // The close handshake: the client's answering close frame, briefly.
                    let _ = tokio::time::timeout(CLOSE_REPLY, async {
                        while let Some(Ok(m)) = stream.next().await {
                            if m.is_close() {
                                break;
                            }
                        }
                    })
                    .await;
                    break;
                }
            };
            let msg = match next {
                Err(_) => {
                    let reason = if unsubscribed_left == Some(wait) {
                        "no subscription within realtime_unsubscribed_timeout_secs"
                    } else {
                        "idle timeout"
                    };
                    let _ = shared.tx.send(close_frame(CloseCode::Away, reason));
                    break;
                }
                Ok(Some(Err(WsError::Capacity(e)))) => {
                    // Over MAX_MESSAGE: say so with 1009 (RFC 6455 §7.4.1) before closing.
                    let reason = format!("message too big: {e}");
                    let _ = shared.tx.send(close_frame(CloseCode::Size, &reason));
                    break;
                }
                Ok(None) | Ok(Some(Err(_))) => break,
                Ok(Some(Ok(m))) => m,
            };
            if msg.is_close() {
                break;
            }
            if !msg.is_text() {
                continue; // pings are answered by the library; pongs only show liveness
            }
            let text = msg.to_text().unwrap_or_default();
            if !self
                .client_message(&shared, &mut joined, &mut limits, text)
                .await
            {
                break; // over its limits: the writer closes it with the reason
            }
        }
        for project_id in &joined {
            if let Some(room) = self.realtime.room(project_id) {
                room.state.lock().expect("poisoned").members.remove(&id);
            }
        }
        // The last sender goes: the writer sends what is queued and a close frame, then ends.
        drop(shared);
        if !writer_done
            && tokio::time::timeout(CLOSE_GRACE, &mut writer)
                .await
                .is_err()
        {
            writer.abort();
        }
        self.realtime.open.lock().expect("poisoned").remove(&id);
        self.realtime.sockets.fetch_sub(1, Ordering::Relaxed);
    }

    /// Handles one client message; false when the socket is to be cut off.
    async fn client_message(
        self: &Arc<App>,
        socket: &Arc<SocketShared>,
        joined: &mut HashSet<String>,
        limits: &mut SocketLimits,
        text: &str,
    ) -> bool {
        let error = |code: &str, message: String, room: Option<&str>| {
            let mut e = json!({ "type": "error", "code": code, "message": message });
            if let Some(r) = room {
                e["roomId"] = json!(r);
            }
            socket.push(Message::text(e.to_string()));
        };
        let msg: Value = match serde_json::from_str(text) {
            Ok(v @ Value::Object(_)) => v,
            Ok(_) => {
                error("BAD_MESSAGE", "expected a JSON object".into(), None);
                return true;
            }
            Err(e) => {
                error("BAD_MESSAGE", format!("invalid JSON: {e}"), None);
                return true;
            }
        };
        let room_id = msg["roomId"].as_str();
        match msg["type"].as_str() {
            Some("ping") => {
                socket.push(Message::text(r#"{"type":"pong"}"#));
            }
            Some("subscribe") => {
                let Some(room_id) = room_id else {
                    error("BAD_MESSAGE", "subscribe needs roomId".into(), None);
                    return true;
                };
                if !limits.subscribes.take(1.0) {
                    return over_limit(socket, limits, "subscribes", Some(room_id));
                }
                if let Err((code, message)) = self.subscribe(socket, joined, room_id, &msg).await {
                    error(code, message, Some(room_id));
                }
            }
            Some("unsubscribe") => {
                let Some(room_id) = room_id else {
                    error("BAD_MESSAGE", "unsubscribe needs roomId".into(), None);
                    return true;
                };
                let project_id = room_id.strip_prefix("project_").unwrap_or_default();
                if joined.remove(project_id) {
                    if let Some(room) = self.realtime.room(project_id) {
                        room.state
                            .lock()
                            .expect("poisoned")
                            .members
                            .remove(&socket.id);
                    }
                }
                socket.push(Message::text(
                    json!({ "type": "unsubscribed", "roomId": room_id }).to_string(),
                ));
            }
            Some("broadcast") => {
                let (Some(room_id), Some(event)) = (room_id, msg["event"].as_str()) else {
                    error(
                        "BAD_MESSAGE",
                        "broadcast needs roomId and event".into(),
                        room_id,
                    );
                    return true;
                };
                let project_id = room_id.strip_prefix("project_").unwrap_or_default();
                if !joined.contains(project_id) || !self.realtime.in_room(project_id, socket.id) {
                    error(
                        "NOT_SUBSCRIBED",
                        "subscribe to the room before broadcasting".into(),
                        Some(room_id),
                    );
                    return true;
                }
                // Counted by the message's size: what the socket makes the room carry.
                if !limits.broadcasts.take(1.0) || !limits.broadcast_bytes.take(text.len() as f64) {
                    return over_limit(socket, limits, "broadcasts", Some(room_id));
                }
                if let Err(message) =
                    self.broadcast_to_room(project_id, Some(socket.id), event, &msg["payload"])
                {
                    error("PAYLOAD_TOO_LARGE", message, Some(room_id));
                }
            }
            Some(other) => error(
                "BAD_MESSAGE",
                format!("unknown message type {other:?}"),
                room_id,
            ),
            None => error("BAD_MESSAGE", "missing type".into(), room_id),
        }
        true
    }

    async fn subscribe(
        self: &Arc<App>,
        socket: &Arc<SocketShared>,
        joined: &mut HashSet<String>,
        room_id: &str,
        msg: &Value,
    ) -> Result<(), (&'static str, String)> {
        let project_id = room_id
            .strip_prefix("project_")
            .filter(|p| crate::auth::is_project_id(p))
            .ok_or((
                "PROJECT_NOT_FOUND",
                format!("no room {room_id:?}: rooms are project_<projectId>"),
            ))?;
        if joined.len() >= MAX_SUBSCRIPTIONS_PER_SOCKET && !joined.contains(project_id) {
            return Err((
                "LIMIT_EXCEEDED",
                format!("at most {MAX_SUBSCRIPTIONS_PER_SOCKET} rooms per socket"),
            ));
        }
        let mut filter = parse_filter(&msg["filter"]).map_err(|m| ("BAD_MESSAGE", m))?;
        let since = match &msg["since"] {
            Value::Null => None,
            Value::String(id) => {
                commit_lsn_of(id)
                    .ok_or(("BAD_MESSAGE", format!("since: {id:?} is not an event id")))?;
                // Ids are upper-case hex: they compare as strings.
                Some(id.to_ascii_uppercase())
            }
            _ => return Err(("BAD_MESSAGE", "since: expected an event id".into())),
        };
        fn api(e: impl Into<ApiError>) -> (&'static str, String) {
            let e = e.into();
            (e.code(), e.to_string())
        }
        // Taken before the key is checked: compared again under the room's lock.
        let mut revocations = self.realtime.revocations(project_id);
        let mut user = None;
        let mut key: Option<KeyBinding> = None;
        // The subscription's identity for row-level security (see crate::visibility).
        let named_uid = &msg["authUid"];
        let identity: Identity;
        let project = self
            .auth
            .load_project(project_id)
            .await
            .map_err(api)?
            .ok_or((
                "PROJECT_NOT_FOUND",
                "No project found for the given projectId.".into(),
            ))?;
        match msg["token"].as_str().filter(|t| !t.is_empty()) {
            Some(token) if token.starts_with(TOKEN_PREFIX) => {
                let mut claims = self.verify_realtime_token(token)?;
                if claims.p != project.id {
                    return Err(("SCOPE_MISMATCH", "This token belongs to another project.".into()));
                }
                // A token has its own budget, as a key does: however many sockets use it.
                let caller = hex::encode(&crate::secrets::sha256(token.as_bytes())[..16]);
                self.rate.check(&format!("rt:{caller}")).map_err(api)?;
                if !named_uid.is_null() && named_uid.as_str() != claims.u.as_deref() {
                    return Err((
                        "SCOPE_MISMATCH",
                        "A realtime token acts for the authUid it was minted with.".into(),
                    ));
                }
                // The role is that of the key's scope, or of the member's role, as it is now.
                let mut role = DbRole::Read;
                if let (Some(key_id), Some(fingerprint)) = (claims.k, claims.f) {
                    let live = self.live_key(&project.id, &key_id).await.map_err(api)?;
                    match live {
                        Some((hash, key_role)) if key_fingerprint(self, &hash) == fingerprint => {
                            role = key_role;
                        }
                        _ => {
                            return Err((
                                "ACCESS_REVOKED",
                                "The API key that issued this token was deleted or rotated.".into(),
                            ))
                        }
                    }
                    key = Some(KeyBinding { key_id, fingerprint });
                }
                filter.token_tables = claims.t.map(|t| t.into_iter().collect());
                if let Some(member) = claims.m {
                    let Some(member_role) =
                        self.member_db_role(&project.id, &member).await.map_err(api)?
                    else {
                        return Err((
                            "ACCESS_REVOKED",
                            "The member who obtained this token is no longer a member of the project.".into(),
                        ));
                    };
                    role = member_role;
                    // As for the member's own SQL: a session acts as its own user.
                    if claims.u.as_ref().is_some_and(|u| *u != member) {
                        return Err((
                            "SCOPE_MISMATCH",
                            "A token obtained with a session acts as that member; authUid is for API keys.".into(),
                        ));
                    }
                    claims.u = Some(member.clone());
                    user = Some(member);
                }
                identity = Identity { role, auth_uid: claims.u };
            }
            Some(token) => {
                let principal = self.auth.authenticate(Some(&format!("Bearer {token}"))).await.map_err(api)?;
                if let Principal::Key { project_id: key_project, key_id, .. } = &principal {
                    if key_project != &project.id {
                        return Err(("SCOPE_MISMATCH", "This key belongs to another project.".into()));
                    }
                    key = Some(KeyBinding {
                        key_id: key_id.clone(),
                        fingerprint: key_fingerprint(self, &crate::secrets::sha256(token.as_bytes())),
                    });
                }
                let access = self.auth.project_access(&principal, &project.id).await.map_err(api)?;
                // As execute-sql: a key may name its end user, a session acts as its own.
                let auth_uid = crate::rls::request_identity(&access, Some(named_uid), None)
                    .map_err(|e| match e {
                        ApiError::BadRequest(m) => ("BAD_MESSAGE", m),
                        other => api(other),
                    })?;
                identity = Identity { role: access.db_role, auth_uid };
                user = principal.user_id().map(str::to_string);
            }
            None if project.realtime_public => {
                if !named_uid.is_null() {
                    return Err((
                        "AUTH_REQUIRED",
                        "authUid needs a token: an API key, or a realtime token minted for it.".into(),
                    ));
                }
                identity = Identity { role: DbRole::Read, auth_uid: None };
            }
            None => {
                return Err((
                    "AUTH_REQUIRED",
                    "This room needs a token: an API key, or a realtime token from POST /api/realtime/token.".into(),
                ))
            }
        }
        if project.status == crate::projects::ProjectStatus::Suspended {
            return Err(("PROJECT_SUSPENDED", ApiError::ProjectSuspended.to_string()));
        }
        let room = self.room(&project.id);
        // Measured after the room's bus subscription exists: the room gets every transaction
        // that commits from here on.
        let now = self.wal_insert_lsn().await.map_err(api)?;
        let mut state = loop {
            let state = room.state.lock().expect("poisoned");
            let seen = self.realtime.revocations(&project.id);
            if seen == revocations {
                // Any revocation from here on evicts under this lock, so finds the member.
                break state;
            }
            drop(state);
            revocations = seen;
            // A key was revoked since this subscribe checked its own: check it again.
            if let Some(k) = &key {
                self.check_binding(&project.id, k).await?;
            }
            if let Some(member) = &user {
                if !self
                    .auth
                    .is_member(&project.id, member)
                    .await
                    .map_err(api)?
                {
                    return Err((
                        "ACCESS_REVOKED",
                        "You are no longer a member of this project.".into(),
                    ));
                }
            }
        };
        if state.members.len() >= MAX_SOCKETS_PER_PROJECT && !state.members.contains_key(&socket.id)
        {
            return Err((
                "LIMIT_EXCEEDED",
                format!("at most {MAX_SOCKETS_PER_PROJECT} sockets per project"),
            ));
        }
        let max_identities = self.config.realtime_rls_max_identities;
        let identities: HashSet<&Identity> = state
            .members
            .values()
            .map(|m| &m.interest.identity)
            .collect();
        if identities.len() >= max_identities && !identities.contains(&identity) {
            return Err((
                "LIMIT_EXCEEDED",
                format!("at most {max_identities} distinct identities (role and authUid) per project room (realtime_rls_max_identities)"),
            ));
        }
        socket.push(Message::text(
            json!({ "type": "subscribed", "roomId": room.room_id }).to_string(),
        ));
        // With `since`: catching up from the history after it (at the pace the socket drains),
        // then live. An id whose successors the history cannot vouch for (trimmed, or older
        // than the history) gets RESUME_TOO_OLD and live events, never a silent gap.
        let mut catch_up = None;
        if let Some(since) = since {
            // An id ahead of the WAL was never issued (another server's, a wiped data dir's):
            // resuming after it would hold back every event until the WAL passed it.
            let issued = commit_lsn_of(&since).is_some_and(|lsn| lsn <= now);
            let accepted = room
                .history
                .lock()
                .expect("poisoned")
                .as_ref()
                .is_some_and(|h| h.accepts(Some(&since)));
            if !issued {
                socket.push(Message::text(
                    json!({ "type": "error", "code": "RESUME_TOO_OLD", "roomId": room.room_id,
                            "message": "That event id was never issued by this server; live events follow." })
                        .to_string(),
                ));
            } else if accepted {
                catch_up = Some(since);
            } else {
                socket.push(Message::text(
                    json!({ "type": "error", "code": "RESUME_TOO_OLD", "roomId": room.room_id,
                            "message": "That event is older than the retained window; live events follow." })
                        .to_string(),
                ));
            }
        }
        state.members.insert(
            socket.id,
            Member {
                socket: socket.clone(),
                interest: Arc::new(Interest {
                    filter,
                    committed_from: if catch_up.is_some() { Lsn(0) } else { now },
                    since: catch_up.clone(),
                    identity,
                }),
                catching_up: None,
                user,
                key,
            },
        );
        if let Some(since) = catch_up {
            room.start_catch_up(&mut state, socket.id, Some(since));
        }
        drop(state);
        joined.insert(project.id);
        Ok(())
    }
}

/// The commit LSN in an event id (`<commit LSN, 16 hex>-<index, 8 hex>`), or in a broadcast
/// id from a client or the REST API (`<the room's last event id>-<seq, 8 hex>`).
fn commit_lsn_of(id: &str) -> Option<Lsn> {
    let (lsn, rest) = id.split_once('-')?;
    let (index, seq) = match rest.split_once('-') {
        Some((index, seq)) => (index, Some(seq)),
        None => (rest, None),
    };
    let hex = |s: &str, len| s.len() == len && s.bytes().all(|b| b.is_ascii_hexdigit());
    (hex(lsn, 16) && hex(index, 8) && seq.is_none_or(|s| hex(s, 8)))
        .then(|| u64::from_str_radix(lsn, 16).ok().map(Lsn))?
}

fn parse_filter(v: &Value) -> Result<Filter, String> {
    let mut f = Filter::default();
    if v.is_null() {
        return Ok(f);
    }
    let obj = v.as_object().ok_or("filter: expected an object")?;
    let list = |key: &str| -> Result<Option<HashSet<String>>, String> {
        match obj.get(key) {
            None | Some(Value::Null) => Ok(None),
            Some(Value::Array(items)) => items
                .iter()
                .map(|i| {
                    i.as_str()
                        .map(str::to_string)
                        .ok_or(format!("filter.{key}: expected strings"))
                })
                .collect::<Result<HashSet<_>, _>>()
                .map(Some),
            Some(_) => Err(format!("filter.{key}: expected an array of strings")),
        }
    };
    f.tables = list("tables")?;
    f.operations =
        list("operations")?.map(|ops| ops.into_iter().map(|o| o.to_uppercase()).collect());
    if let Some(ops) = &f.operations {
        if let Some(bad) = ops
            .iter()
            .find(|o| !matches!(o.as_str(), "INSERT" | "UPDATE" | "DELETE"))
        {
            return Err(format!("filter.operations: unknown operation {bad:?}"));
        }
    }
    f.row = match obj.get("row") {
        None | Some(Value::Null) => None,
        Some(Value::String(s)) => Some(RowFilter::parse(s)?),
        Some(_) => return Err("filter.row: expected a string like status=eq.paid".into()),
    };
    Ok(f)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn row_filters_compare_numbers_strings_and_lists() {
        let rec = json!({ "status": "paid", "amount": 12.5, "id": 3 });
        let t = |s: &str| RowFilter::parse(s).unwrap().matches(&rec);
        assert!(t("status=eq.paid"));
        assert!(!t("status=neq.paid"));
        assert!(
            t("amount=gt.10")
                && t("amount=gte.12.5")
                && !t("amount=lt.12.5")
                && t("amount=lte.12.5")
        );
        assert!(t("id=in.(1,2,3)") && !t("id=in.(4,5)"));
        assert!(!t("missing=eq.x"));
        assert!(RowFilter::parse("status=like.x").is_err());
        assert!(RowFilter::parse("nonsense").is_err());
        assert!(RowFilter::parse("id=in.1,2").is_err());
    }

    #[test]
    fn a_revocation_or_removal_after_the_access_check_is_seen_before_joining() {
        let rt = Realtime::default();
        let checked = rt.revocations("p1");
        let other = rt.revocations("p2");
        // Nothing revoked: the subscribe joins as it checked.
        assert_eq!(rt.revocations("p1"), checked);
        // A key of p1 revoked between the check and the join: the join sees it.
        rt.key_revoked("p1");
        assert_ne!(rt.revocations("p1"), checked);
        assert_eq!(
            rt.revocations("p2"),
            other,
            "other projects are not re-checked"
        );
        // Once re-checked, the new count is the one compared.
        let rechecked = rt.revocations("p1");
        assert_eq!(rt.revocations("p1"), rechecked);
        // A member of p1 removed: the same (even with no room open yet).
        rt.evict_user("p1", "usr_x");
        assert_ne!(rt.revocations("p1"), rechecked);
        let rechecked = rt.revocations("p1");
        // The access listener reconnected: every project's subscribes check again.
        rt.keys_revoked_everywhere();
        assert_ne!(rt.revocations("p1"), rechecked);
        assert_ne!(rt.revocations("p2"), other);
        assert!(rt.bound_keys().is_empty());
    }

    #[test]
    fn a_cloned_message_shares_its_payload() {
        let m = Message::text("x".repeat(4096));
        let c = m.clone();
        match (&m, &c) {
            (Message::Text(a), Message::Text(b)) => {
                assert_eq!(a.as_str().as_ptr(), b.as_str().as_ptr())
            }
            _ => unreachable!(),
        }
    }

    #[test]
    fn broadcast_ids_sort_after_the_last_id_and_before_the_next_event() {
        let first = next_broadcast_id(None, 0).unwrap();
        assert_eq!(first, "0000000000000000-00000000-00000001");
        let event = "00000000025FB560-00000003";
        let b1 = next_broadcast_id(Some(event), 0).unwrap();
        assert_eq!(b1, "00000000025FB560-00000003-00000001");
        let b2 = next_broadcast_id(Some(&b1), 0).unwrap();
        assert_eq!(b2, "00000000025FB560-00000003-00000002");
        let next_event = "00000000025FB560-00000004";
        assert!(event < b1.as_str() && b1 < b2 && b2.as_str() < next_event);
        assert!(b2.as_str() < "00000000025FB561-00000000");
        assert_eq!(commit_lsn_of(&b2), Some(Lsn(0x25F_B560)));
        assert_eq!(commit_lsn_of("00000000025FB560-00000003-0001"), None);
    }

    #[test]
    fn a_broadcast_id_is_never_reissued_after_a_restart_that_lost_the_tail() {
        let event = "00000000025FB560-00000003";
        // Boot 1 issued three broadcasts after `event`; a power loss took them off the
        // history, so boot 2 starts again from `event` (its epoch is one more).
        let mut issued = Vec::new();
        let mut last = event.to_string();
        for _ in 0..3 {
            last = next_broadcast_id(Some(&last), 1).unwrap();
            issued.push(last.clone());
        }
        let after_restart = next_broadcast_id(Some(event), 2).unwrap();
        assert!(!issued.contains(&after_restart), "{after_restart} reissued");
        assert!(issued.iter().all(|i| i.as_str() < after_restart.as_str()));
        assert!(after_restart.as_str() < "00000000025FB560-00000004");
        assert_eq!(commit_lsn_of(&after_restart), Some(Lsn(0x25F_B560)));
        // A later boot continues after an earlier boot's broadcast at the same position.
        let b = next_broadcast_id(Some(&issued[2]), 2).unwrap();
        assert_eq!(b, after_restart);
        let c = next_broadcast_id(Some(&b), 2).unwrap();
        assert!(c > b);
        // An epoch's count running out asks for the next epoch.
        let full = format!(
            "{event}-{:08X}",
            (2u32 << 20) | crate::realtime_history::SEQ_MASK
        );
        assert_eq!(next_broadcast_id(Some(&full), 2), None);
        assert!(next_broadcast_id(Some(&full), 3).unwrap() > full);
    }

    #[test]
    fn event_ids_carry_their_commit_lsn() {
        assert_eq!(
            commit_lsn_of("00000000025FB560-00000003"),
            Some(Lsn(0x25F_B560))
        );
        for bad in [
            "",
            "yesterday",
            "25FB560-0",
            "00000000025FB560",
            "00000000025FB56G-00000000",
        ] {
            assert_eq!(commit_lsn_of(bad), None, "{bad}");
        }
    }
}
