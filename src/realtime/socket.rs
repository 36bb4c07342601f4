//! One WebSocket connection after the upgrade: a reader (client messages, the idle and
//! unsubscribed deadlines) and a writer (its queue to the connection, pings, the close), and
//! what one client may send (token buckets, strikes).
//!
//! ```text
//!  client ─► reader: ping | subscribe (super::subscribe) | unsubscribe | broadcast (super::broadcast)
//!  rooms, answers ─► queue (bounded in bytes) ─► writer ─► client    cut-off ─► close 1008 / 1001
//! ```

use std::collections::{BTreeMap, HashSet};
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use futures_util::{SinkExt, StreamExt};
use hyper_util::rt::TokioIo;
use serde_json::{json, Value};
use tokio::sync::{mpsc, Notify};
use tokio_tungstenite::tungstenite::protocol::frame::coding::CloseCode;
use tokio_tungstenite::tungstenite::protocol::{CloseFrame, Role, WebSocketConfig};
use tokio_tungstenite::tungstenite::{Error as WsError, Message};
use tokio_tungstenite::WebSocketStream;

use super::{Realtime, Settings};

/// How long a graceful shutdown waits for the sockets it closed with 1001.
const SHUTDOWN_GRACE: Duration = Duration::from_secs(5);
/// How long a socket whose writer ended waits for the client's close frame.
const CLOSE_REPLY: Duration = Duration::from_secs(1);

/// Largest client message accepted.
pub const MAX_MESSAGE: usize = 64 * 1024;

/// A socket that sends nothing (not even a pong) for this long is closed.
pub const IDLE_TIMEOUT: Duration = Duration::from_secs(120);
const PING_EVERY: Duration = Duration::from_secs(30);
/// How long a closing socket may take to flush its close frame before it is dropped.
const CLOSE_GRACE: Duration = Duration::from_secs(10);

/// Refused client messages (over a rate limit) after which the socket is closed.
pub const RATE_STRIKES: u32 = 50;
/// A socket refused nothing for this long starts again from no strikes.
pub const STRIKE_RESET: Duration = Duration::from_secs(10);
/// Bytes a socket reads from the connection at a time (tungstenite's default is 128 KiB).
pub const READ_BUFFER: usize = 4 * 1024;
/// Queued outgoing bytes past which a write flushes (tungstenite's default is 128 KiB).
const WRITE_BUFFER: usize = 16 * 1024;
/// Messages a socket's writer takes from its queue per flush.
const BATCH: usize = 64;

/// An upgraded WebSocket connection.
pub type WebSocket = WebSocketStream<super::io::Counted<TokioIo<hyper::upgrade::Upgraded>>>;

/// Refuses a message over a rate limit with `RATE_LIMIT`, or cuts the socket off after
/// [`RATE_STRIKES`] refusals; true while the socket may go on.
pub(super) fn over_limit(
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

/// Sockets cut off, by reason (`/metrics`).
pub(super) type CutOffCounts = Arc<Mutex<BTreeMap<&'static str, u64>>>;

/// Why and when a socket's writer cuts it off (code 1008 with the reason, or 1001 when the
/// server shuts down), whatever is queued.
pub(super) struct CutOff {
    pub(super) reason: Mutex<Option<(CloseCode, String)>>,
    /// Set once `reason` is: read for every event offered to the socket, without the lock.
    is_fired: std::sync::atomic::AtomicBool,
    /// Wakes the writer (its only waiter).
    pub(super) notify: Notify,
    pub(super) counts: CutOffCounts,
}

impl CutOff {
    pub(super) fn new(counts: CutOffCounts) -> CutOff {
        CutOff {
            reason: Mutex::new(None),
            is_fired: std::sync::atomic::AtomicBool::new(false),
            notify: Notify::new(),
            counts,
        }
    }

    /// Closes with 1008; `kind` is the metric's reason label. The first reason given wins.
    pub(super) fn fire(&self, kind: &'static str, reason: &str) {
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
    pub(super) fn away(&self, reason: &str) {
        self.set(CloseCode::Away, reason);
    }

    pub(super) fn set(&self, code: CloseCode, reason: &str) -> bool {
        let mut r = self.reason.lock().expect("poisoned");
        if r.is_some() {
            return false;
        }
        *r = Some((code, reason.to_string()));
        self.is_fired.store(true, Ordering::Release);
        self.notify.notify_one();
        true
    }

    pub(super) fn fired(&self) -> bool {
        self.is_fired.load(Ordering::Acquire)
    }
}

/// What a socket's queue holds: a message, or the live events a room handed it in one go
/// (one channel operation per socket for a room's slice of events, not one per event).
pub(super) enum Outgoing {
    One(Message),
    /// Boxed: every slot of the queue is the size of one message.
    Many(Box<[Message]>),
}

impl Outgoing {
    fn messages(
        self,
    ) -> std::iter::Chain<std::option::IntoIter<Message>, std::vec::IntoIter<Message>> {
        match self {
            Outgoing::One(m) => Some(m).into_iter().chain(Vec::new()),
            Outgoing::Many(v) => None.into_iter().chain(Vec::from(v)),
        }
    }
}

/// The live events a room offered a socket during its current slice, not queued yet (see
/// [`SocketShared::offer_deferred`]).
#[derive(Default)]
pub(super) struct Pending {
    messages: Vec<Message>,
    /// Their bytes.
    bytes: usize,
    /// The socket's queued bytes when the slice's first event was offered (the writer only
    /// takes from it meanwhile: a bound from above).
    queued: usize,
}

/// What became of a live event offered to a socket.
pub(super) enum Offer {
    Queued,
    /// Not queued: the socket is past its high-water mark (it catches up instead).
    Full,
    Gone,
}

/// What a socket shares with the rooms it joined. Its queue is bounded in bytes, not messages:
/// a message is shared bytes (a tungstenite `Message` clones its payload by reference count),
/// so what a socket holds is what `queued` counts.
pub(super) struct SocketShared {
    pub(super) id: u64,
    pub(super) tx: mpsc::UnboundedSender<Outgoing>,
    /// Fired when the client broke its limits or stopped reading; the writer closes.
    pub(super) close: Arc<CutOff>,
    /// Bytes queued and not yet written to the connection.
    pub(super) queued: Arc<AtomicUsize>,
    /// Notified by the writer whenever it has written something.
    pub(super) drained: Arc<Notify>,
    /// High-water mark of `queued` for live events (`realtime_send_queue_bytes`); other
    /// messages may queue up to [`SocketShared::hard_limit`].
    pub(super) limit: usize,
}

impl SocketShared {
    pub(super) fn hard_limit(&self) -> usize {
        self.limit.saturating_mul(4)
    }

    pub(super) fn enqueue(&self, msg: Message) -> bool {
        let len = msg.len();
        self.queued.fetch_add(len, Ordering::AcqRel);
        if self.tx.send(Outgoing::One(msg)).is_err() {
            self.queued.fetch_sub(len, Ordering::AcqRel);
            return false;
        }
        true
    }

    /// Queues an answer, error or replayed event; past the hard limit the socket is cut off as
    /// too slow.
    pub(super) fn push(&self, msg: Message) -> bool {
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
    pub(super) fn offer(&self, msg: &Message) -> Offer {
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

    /// [`SocketShared::offer`] into `pending` rather than into the queue:
    /// [`SocketShared::send_pending`] hands them over together, before anything else can be
    /// queued for this socket by the room (the room's lock is held in between). The socket's
    /// shared state (closed, queued bytes) is read once per slice, at its first event, not
    /// once per event: those are cache lines the socket's writer keeps writing. `slice` is how
    /// many events the slice has (room for them is made at the second).
    pub(super) fn offer_deferred(
        &self,
        msg: &Message,
        pending: &mut Pending,
        slice: usize,
    ) -> Offer {
        match pending.messages.len() {
            0 => {
                if self.tx.is_closed() || self.close.fired() {
                    return Offer::Gone;
                }
                pending.queued = self.queued.load(Ordering::Acquire);
            }
            // A second event: room for the slice (a lone event allocates nothing).
            1 => pending.messages.reserve(slice.saturating_sub(1)),
            _ => {}
        }
        let queued = pending.queued + pending.bytes;
        if queued > 0 && queued + msg.len() > self.limit {
            return Offer::Full;
        }
        pending.bytes += msg.len();
        pending.messages.push(msg.clone());
        Offer::Queued
    }

    /// Queues what [`SocketShared::offer_deferred`] collected, in one channel operation.
    pub(super) fn send_pending(&self, pending: &mut Pending) {
        let bytes = std::mem::take(&mut pending.bytes);
        let out = match pending.messages.len() {
            0 => return,
            // Taken with its buffer: a socket keeps no allocation between slices.
            1 => Outgoing::One(std::mem::take(&mut pending.messages).pop().expect("one")),
            _ => Outgoing::Many(std::mem::take(&mut pending.messages).into_boxed_slice()),
        };
        self.queued.fetch_add(bytes, Ordering::AcqRel);
        if self.tx.send(out).is_err() {
            self.queued.fetch_sub(bytes, Ordering::AcqRel);
        }
    }

    /// Waits until the queue is below its high-water mark; false once the socket is closing.
    pub(super) async fn room_to_send(&self) -> bool {
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

/// A token bucket: `rate` per second, holding at most one second's worth. Rate 0: unlimited.
pub(super) struct Bucket {
    pub(super) rate: f64,
    pub(super) tokens: f64,
    last: Instant,
}

impl Bucket {
    pub(super) fn new(rate: f64) -> Bucket {
        Bucket {
            rate,
            tokens: rate,
            last: Instant::now(),
        }
    }

    pub(super) fn take(&mut self, n: f64) -> bool {
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
pub(super) struct SocketLimits {
    broadcasts: Bucket,
    broadcast_bytes: Bucket,
    pub(super) subscribes: Bucket,
    strikes: u32,
    last_strike: Option<Instant>,
}

impl SocketLimits {
    fn new(config: &Settings) -> SocketLimits {
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

/// A socket's writer: its queue (and pings) to the connection. It holds no sender of its own
/// queue, so it ends once the reader and the rooms have dropped theirs (queue sent, then a close
/// frame), when the connection fails, or when `cut_off` fires (over its limits, or the server
/// shuts down): that also interrupts a send stuck on a client that stopped reading, and the
/// socket is closed with the code and reason. A write that makes no progress for `stall` (the
/// client stopped reading) cuts the socket off with 1008. Closing is bounded by
/// [`CLOSE_GRACE`]; the reader ends when the writer does.
async fn write_socket(
    mut sink: futures_util::stream::SplitSink<WebSocket, Message>,
    mut rx: mpsc::UnboundedReceiver<Outgoing>,
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
        let (first, counted) = tokio::select! {
            msg = rx.recv() => match msg {
                Some(m) => (m, true),
                // The reader and the rooms let go of the queue. A cut-off fired just before
                // (over a limit: the reader stops at once) still closes with its code and
                // reason, whichever of the two the select saw first.
                None => break cut_off_by.fired(),
            },
            _ = ping.tick() => (Outgoing::One(Message::Ping(Default::default())), false),
            _ = cut.notified() => break true,
        };
        // What is already queued goes out in the same write: one flush per batch, not per
        // message (measured: ~2.5x the delivered messages/s at 1,000 subscribers). The batch
        // must make progress within `stall`: some bytes written to the connection in every
        // `stall`, however long the whole batch takes (one timer per batch, not per message:
        // a timer per message was a tenth of the server's time under load).
        let mut sent_bytes = 0;
        let batch = progress(stall, &written, async {
            // A ping is not from the queue: its bytes were never counted in it.
            let (mut next, mut counted, mut n) = (Some(first), counted, 0);
            while let Some(out) = next.take() {
                for m in out.messages() {
                    if counted {
                        sent_bytes += m.len();
                    }
                    feed(&mut sink, m).await?;
                    n += 1;
                }
                counted = true;
                if n < BATCH {
                    next = rx.try_recv().ok();
                }
            }
            sink.flush().await
        });
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

/// The largest WebSocket frame a socket's writer hands to tungstenite: a larger text message
/// goes out as a fragmented message (RFC 6455 §5.4: a text frame, then continuation frames;
/// every client reassembles it, and `ws.onmessage` sees one message).
const FRAGMENT_BYTES: usize = 64 * 1024;

/// Feeds `m` to the socket's sink, a large text message as fragments of [`FRAGMENT_BYTES`].
/// tungstenite copies each frame it is fed into the connection's write buffer and keeps it
/// there until the client reads it: fed whole, a 14 MB row change was copied once per socket,
/// and every socket that stopped reading held its own copy until its stall cut-off (red team
/// rt11: 80 such sockets took the server to 1.5 GB). In fragments each socket holds at most
/// its write buffer and one fragment; the message itself is the room's one shared allocation.
async fn feed(
    sink: &mut futures_util::stream::SplitSink<WebSocket, Message>,
    m: Message,
) -> Result<(), WsError> {
    use tokio_tungstenite::tungstenite::protocol::frame::coding::{Data, OpCode};
    use tokio_tungstenite::tungstenite::protocol::frame::Frame;
    let Message::Text(text) = m else {
        return sink.feed(m).await;
    };
    if text.len() <= FRAGMENT_BYTES {
        return sink.feed(Message::Text(text)).await;
    }
    let data = bytes::Bytes::from(text);
    let mut start = 0;
    while start < data.len() {
        let mut end = (start + FRAGMENT_BYTES).min(data.len());
        // On a character's boundary: RFC 6455 lets a fragment end inside one, but a client
        // that decodes each frame on its own would choke on it.
        while end < data.len() && data[end] & 0xC0 == 0x80 {
            end -= 1;
        }
        let opcode = if start == 0 {
            OpCode::Data(Data::Text)
        } else {
            OpCode::Data(Data::Continue)
        };
        let frame = Frame::message(data.slice(start..end), opcode, end == data.len());
        sink.feed(Message::Frame(frame)).await?;
        start = end;
    }
    Ok(())
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
    match super::io::with_progress(stall, written, step).await {
        Ok(Ok(())) => Ok(()),
        Ok(Err(_)) => Err(Stop::Failed),
        Err(_) => Err(Stop::Stalled),
    }
}

impl Realtime {
    /// Whether a graceful shutdown has begun (new sockets are refused).
    pub fn is_shutting_down(&self) -> bool {
        self.shutting_down.load(Ordering::SeqCst)
    }

    /// Serves the WebSocket connection a handshake answered with 101, once hyper hands it over
    /// (RFC 6455 §4.2: the handshake is `crate::api::realtime`'s). The socket reads through a
    /// [`READ_BUFFER`]-byte buffer and takes messages of at most [`MAX_MESSAGE`].
    pub fn accept(self: Arc<Self>, on_upgrade: hyper::upgrade::OnUpgrade) {
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
                super::io::Counted::new(TokioIo::new(upgraded)),
                Role::Server,
                Some(config),
            )
            .await;
            self.serve_socket(ws).await;
        });
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

    /// Serves one WebSocket connection until it closes.
    async fn serve_socket(self: Arc<Self>, ws: WebSocket) {
        let id = self.next_socket.fetch_add(1, Ordering::Relaxed);
        self.sockets.fetch_add(1, Ordering::Relaxed);
        let written = ws.get_ref().written();
        let (sink, mut stream) = ws.split();
        let (tx, rx) = mpsc::unbounded_channel::<Outgoing>();
        let shared = Arc::new(SocketShared {
            id,
            tx,
            close: Arc::new(CutOff::new(self.cut_offs.clone())),
            queued: Arc::new(AtomicUsize::new(0)),
            drained: Arc::new(Notify::new()),
            limit: self.settings.realtime_send_queue_bytes.max(1),
        });
        self.open
            .lock()
            .expect("poisoned")
            .insert(id, shared.close.clone());
        if self.shutting_down.load(Ordering::SeqCst) {
            // Upgraded just as the shutdown began (after its check, before the 1001s went out).
            shared.close.away("server shutting down");
        }
        let mut writer = tokio::spawn(write_socket(
            sink,
            rx,
            shared.close.clone(),
            shared.queued.clone(),
            shared.drained.clone(),
            Duration::from_secs(self.settings.realtime_client_stall_secs.max(1)),
            written,
        ));
        let mut writer_done = false;
        let mut limits = SocketLimits::new(&self.settings);

        let mut joined: HashSet<String> = HashSet::new();
        // A socket in no room holds a connection for nothing: it gets a deadline (pings do not
        // extend it), so anonymous clients cannot keep thousands of them open.
        let unsubscribed_limit =
            Duration::from_secs(self.settings.realtime_unsubscribed_timeout_secs);
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
                    let _ = shared
                        .tx
                        .send(Outgoing::One(close_frame(CloseCode::Away, reason)));
                    break;
                }
                Ok(Some(Err(WsError::Capacity(e)))) => {
                    // Over MAX_MESSAGE: say so with 1009 (RFC 6455 §7.4.1) before closing.
                    let reason = format!("message too big: {e}");
                    let _ = shared
                        .tx
                        .send(Outgoing::One(close_frame(CloseCode::Size, &reason)));
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
            if let Some(room) = self.room(project_id) {
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
        self.open.lock().expect("poisoned").remove(&id);
        self.sockets.fetch_sub(1, Ordering::Relaxed);
    }

    /// Handles one client message; false when the socket is to be cut off.
    async fn client_message(
        self: &Arc<Self>,
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
                if let Err(e) = self.subscribe(socket, joined, room_id, &msg).await {
                    error(e.code(), e.to_string(), Some(room_id));
                }
            }
            Some("unsubscribe") => {
                let Some(room_id) = room_id else {
                    error("BAD_MESSAGE", "unsubscribe needs roomId".into(), None);
                    return true;
                };
                let project_id = room_id.strip_prefix("project_").unwrap_or_default();
                if joined.remove(project_id) {
                    if let Some(room) = self.room(project_id) {
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
                if event.is_empty() || event.len() > 200 {
                    error(
                        "BAD_MESSAGE",
                        "broadcast event: 1 to 200 characters".into(),
                        Some(room_id),
                    );
                    return true;
                }
                let project_id = room_id.strip_prefix("project_").unwrap_or_default();
                if !joined.contains(project_id) || !self.in_room(project_id, socket.id) {
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
                if let Err(e) =
                    self.broadcast_to_room(project_id, Some(socket.id), event, &msg["payload"])
                {
                    error("PAYLOAD_TOO_LARGE", e.to_string(), Some(room_id));
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
}

#[cfg(test)]
mod tests {
    use super::*;

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
}
