//! A project's room: its members (live, or catching up from the history), the last event id
//! it has seen, its durable history and the fan-out of one stored event to the live members
//! that want it and may see it (serialized once; a member whose queue is full catches up from
//! the history instead of being cut off).

use std::collections::{HashMap, HashSet};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, Weak};

use serde_json::json;
use tokio_tungstenite::tungstenite::Message;

use super::catch_up::ChunkCache;
use super::filter::{parse_row, Decision, Interest};
use super::history::{History, Limits};
use super::revoke::KeyBinding;
use super::socket::{Bucket, Offer, SocketShared};
use super::Realtime;
use crate::bus::{Event, EventKind};
use crate::visibility::{Identity, Verdict, Verdicts};

/// One subscription: a socket in a room.
pub(super) struct Member {
    pub(super) socket: Arc<SocketShared>,
    pub(super) interest: Arc<Interest>,
    /// Catching up from the history (its task's epoch) rather than live.
    pub(super) catching_up: Option<u64>,
    /// The project member this subscription acts for (a session, or a realtime token a member
    /// obtained): it ends when the member is removed.
    pub(super) user: Option<String>,
    /// The API key behind it: it ends when the key is deleted or rotated.
    pub(super) key: Option<KeyBinding>,
    /// Made without a token (a `realtimePublic` project): it ends when the project stops
    /// being public.
    pub(super) anonymous: bool,
    /// The login session behind it (a fingerprint; a session, or a token a session obtained):
    /// it ends when that session does.
    pub(super) session: Option<String>,
    /// When the realtime token it was made with expires (unix seconds by the app's clock): it
    /// ends then ([`super::Realtime::end_expired`]).
    pub(super) expires: Option<i64>,
    /// Live events offered during the room's current slice, queued together at its end
    /// ([`RoomState::send_pending`]); empty whenever the room's lock is free.
    pub(super) pending: super::socket::Pending,
}

#[derive(Default)]
pub(super) struct RoomState {
    pub(super) members: HashMap<u64, Member>,
    /// Id of the last event that entered the room (replays at or below it are dropped).
    pub(super) last_id: Option<String>,
    /// Epochs of catch-up tasks (a member's task ends when its epoch is no longer current).
    pub(super) next_epoch: u64,
    /// Events in the slice being delivered (room is made for them in each member's pending).
    pub(super) slice_len: usize,
    /// Why the project's events are not arriving, as last announced ([`Room::announce`]):
    /// told to members who subscribe meanwhile too.
    pub(super) degraded: Option<String>,
}

impl RoomState {
    /// Queues every member's pending events ([`Room::fan_out`]); called before the lock is
    /// let go.
    pub(super) fn send_pending(&mut self) {
        for m in self.members.values_mut() {
            m.socket.send_pending(&mut m.pending);
        }
    }
}

/// Why a project's room closes; its members get an `error` message with the code.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum RoomClosed {
    /// `PROJECT_SUSPENDED`: the room keeps recording its history.
    Suspended,
    /// `PROJECT_NOT_FOUND`: the room and its history are dropped.
    Deleted,
}

impl RoomClosed {
    fn code(self) -> &'static str {
        match self {
            RoomClosed::Suspended => "PROJECT_SUSPENDED",
            RoomClosed::Deleted => "PROJECT_NOT_FOUND",
        }
    }

    fn message(self) -> &'static str {
        match self {
            RoomClosed::Suspended => "The project was suspended.",
            RoomClosed::Deleted => "The project was deleted.",
        }
    }
}

/// One project's room.
pub struct Room {
    pub(super) room_id: String,
    pub(super) project_id: String,
    /// The service, for the row-level security verdicts of catch-up reads.
    pub(super) realtime: Weak<Realtime>,
    /// Locked after `state` when both are needed.
    pub(super) state: Mutex<RoomState>,
    /// The durable resume history (`None`: it could not be opened; resumes are refused).
    pub(super) history: Mutex<Option<History>>,
    pub(super) dir: std::path::PathBuf,
    /// The project's budget for broadcasts from SQL and the REST API: (count, bytes) per
    /// second, so that a flood of them never overflows every member's queue at once.
    pub(super) budget: Mutex<(Bucket, Bucket)>,
    pub(super) pump: Mutex<Option<tokio::task::JoinHandle<()>>>,
    /// Decoded history chunks shared by the members catching up (see [`ChunkCache`]).
    pub(super) chunks: Mutex<ChunkCache>,
    /// Bounds the catch-up reads running at once (`realtime_catch_up_reads`).
    pub(super) reads: Arc<tokio::sync::Semaphore>,
    /// Members moved to catching up because their queue was full (not resumes).
    pub(super) fell_behind: AtomicU64,
    /// Chunks read from disk by catch-ups (the rest came from the cache).
    pub(super) chunk_reads: AtomicU64,
}

pub(super) fn frame(kind: &str, room_id: &str, event: &Event) -> Message {
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

pub(super) fn kind_of(event: &Event) -> &'static str {
    match event.kind {
        EventKind::Row { .. } => "db_event",
        EventKind::Schema { .. } => "schema_update",
        EventKind::Broadcast { .. } => "broadcast",
    }
}

/// A `db_event` frame around a payload that replaces the event's own (see [`Verdict`]).
pub(super) fn instead_frame(room_id: &str, payload: &str) -> Message {
    Message::text(format!(
        "{{\"type\":\"db_event\",\"roomId\":\"{room_id}\",\"payload\":{payload}}}"
    ))
}

impl Room {
    /// Tells every member whether the project's events are arriving
    /// (`{"type":"status","roomId","state":"degraded"|"live","message"?}`, `degraded` the
    /// message): while NATS is unreachable (cluster mode) or the project's stream reconnects to
    /// its database (single node) nothing is lost (the slot keeps the WAL) but nothing arrives
    /// either; a stream that stopped for good says so. Members who subscribe while it is
    /// degraded are told after their `subscribed`.
    pub(super) fn announce(&self, degraded: Option<&str>) {
        let msg = self.status_message(degraded);
        let mut state = self.state.lock().expect("poisoned");
        state.degraded = degraded.map(str::to_string);
        for m in state.members.values() {
            let _ = m.socket.offer(&msg);
        }
    }

    /// The `status` message for `degraded` (`None`: live).
    pub(super) fn status_message(&self, degraded: Option<&str>) -> Message {
        let body = match degraded {
            Some(message) => serde_json::json!({
                "type": "status", "roomId": self.room_id, "state": "degraded", "message": message,
            }),
            None => {
                serde_json::json!({ "type": "status", "roomId": self.room_id, "state": "live" })
            }
        };
        Message::text(body.to_string())
    }

    /// Whether a broadcast of `bytes` from SQL or the REST API fits the project's budget now
    /// (and takes it from the budget).
    pub(super) fn admit_broadcast(&self, bytes: usize) -> bool {
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
    pub(super) fn identities(&self) -> Vec<Identity> {
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
    pub(super) fn unseen(&self, batch: Vec<Arc<Event>>) -> Vec<Arc<Event>> {
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
    pub(super) fn ingest(
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
        state.slice_len = events.len();
        // With no member to hand events to, the room's last id is recorded once, at the end of
        // the slice (nobody sees the room in between: its lock is held), not copied per event.
        let mut entered: Option<&str> = None;
        for (i, (event, skip)) in events.iter().enumerate() {
            if entered
                .or(state.last_id.as_deref())
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
                entered = None;
                continue;
            }
            if let Some(h) = history.as_mut() {
                if event.gap_before {
                    tracing::error!(room = self.room_id, id = event.id, "the cluster's stream no longer held events before this one: resumes from before it are refused");
                    h.mark_gap(&event.id);
                }
                if let Err(e) = h.append(event, now_ms) {
                    tracing::error!(room = self.room_id, error = %e, "writing the realtime history: resumes from before this event are refused");
                    h.mark_gap(&event.id);
                }
            }
            if state.members.is_empty() {
                entered = Some(&event.id);
                continue;
            }
            if let Some(id) = entered.take() {
                state.last_id = Some(id.to_string());
            }
            // Framed only if a member takes it (a room without sockets frames nothing).
            let message = std::cell::OnceCell::new();
            let n = self.fan_out(&mut state, event, &message, event.sender, |identity| {
                verdicts.get(identity, first_index + i)
            });
            delivered.fetch_add(n as u64, Ordering::Relaxed);
        }
        if let Some(id) = entered {
            state.last_id = Some(id.to_string());
        }
        state.send_pending();
        if let Some(h) = history.as_mut() {
            // Trimmed from the index now; the files go outside the locks (the pump).
            if let Err(e) = h.flush().and_then(|_| h.trim_later(now_ms)) {
                tracing::error!(room = self.room_id, error = %e, "writing the realtime history");
            }
        }
        Ok(())
    }

    /// Hands one stored event to the live members that want it and may see it (`verdict` of
    /// their identity; except `except`), framed once (`message`, made with [`frame`] when the
    /// first member takes it, unless the caller made it); a member whose queue is past its high-water mark
    /// starts catching up from the event before this one instead of being cut off. Returns how
    /// many got it now. The events go to the members' `pending` lists: the caller queues them
    /// ([`RoomState::send_pending`]) before it lets go of the room's lock.
    pub(super) fn fan_out<'v>(
        self: &Arc<Room>,
        state: &mut RoomState,
        event: &Event,
        message: &std::cell::OnceCell<Message>,
        except: Option<u64>,
        verdict: impl Fn(&Identity) -> Option<&'v Verdict>,
    ) -> usize {
        let before = state.last_id.replace(event.id.clone());
        let (parsed, parsed_old) = (std::cell::OnceCell::new(), std::cell::OnceCell::new());
        let record = || parsed.get_or_init(|| parse_row(event.record())).clone();
        let old_record = || parsed_old.get_or_init(|| parse_row(event.old())).clone();
        let mut n = 0;
        let mut full = Vec::new();
        let slice = state.slice_len.max(1);
        // Members mostly share a few identities: the last one's verdict is reused.
        let mut last: Option<(&Identity, Option<&'v Verdict>)> = None;
        for (id, m) in state.members.iter_mut() {
            if m.catching_up.is_some() || Some(*id) == except {
                continue;
            }
            let identity = &m.interest.identity;
            let seen = match last {
                Some((i, v)) if i == identity => v,
                _ => {
                    let v = verdict(identity);
                    last = Some((identity, v));
                    v
                }
            };
            let instead;
            let message = match m.interest.decide(event, seen, &record, &old_record) {
                Decision::Send => {
                    message.get_or_init(|| frame(kind_of(event), &self.room_id, event))
                }
                Decision::SendInstead(payload) => {
                    instead = instead_frame(&self.room_id, payload);
                    &instead
                }
                Decision::Skip => continue,
            };
            match m.socket.offer_deferred(message, &mut m.pending, slice) {
                Offer::Queued => n += 1,
                Offer::Full => {
                    // What it was offered before goes first, then the catch-up.
                    m.socket.send_pending(&mut m.pending);
                    full.push(*id)
                }
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
    pub(super) fn start_catch_up(
        self: &Arc<Room>,
        state: &mut RoomState,
        socket: u64,
        from: Option<String>,
    ) {
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
}

impl Realtime {
    /// Starts a project's room (its pump stores the change stream in the durable history from
    /// now on, subscribers or not); called when the project's change stream starts.
    pub fn start_room(self: &Arc<Self>, project_id: &str) {
        let _ = self.open_room(project_id);
    }

    /// The project's room, created (with its history and its pump on the bus) on first use.
    pub(super) fn open_room(self: &Arc<Self>, project_id: &str) -> Arc<Room> {
        if let Some(r) = self.rooms.lock().expect("poisoned").get(project_id) {
            return r.clone();
        }
        // The history is opened (read back, up to its byte bound) without the lock of every
        // room; one opening per project at a time.
        let opening = self
            .opening
            .lock()
            .expect("poisoned")
            .entry(project_id.to_string())
            .or_default()
            .clone();
        let _opening = opening.lock().expect("poisoned");
        if let Some(r) = self.rooms.lock().expect("poisoned").get(project_id) {
            return r.clone();
        }
        let retention = self.settings.retention;
        let dir = self.settings.data_dir.join("realtime").join(project_id);
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
            realtime: Arc::downgrade(self),
            state: Mutex::new(RoomState {
                last_id,
                ..Default::default()
            }),
            history: Mutex::new(history),
            dir,
            budget: Mutex::new((
                Bucket::new(self.settings.realtime_project_broadcasts_per_sec as f64),
                Bucket::new(self.settings.realtime_project_broadcast_bytes_per_sec as f64),
            )),
            pump: Mutex::new(None),
            chunks: Mutex::new(ChunkCache::default()),
            reads: Arc::new(tokio::sync::Semaphore::new(
                self.settings.realtime_catch_up_reads.max(1),
            )),
            fell_behind: AtomicU64::new(0),
            chunk_reads: AtomicU64::new(0),
        });
        let task = super::pump::spawn(self, &room);
        *room.pump.lock().expect("poisoned") = Some(task);
        self.rooms
            .lock()
            .expect("poisoned")
            .insert(project_id.to_string(), room.clone());
        self.opening.lock().expect("poisoned").remove(project_id);
        room
    }

    /// A project's room, if it has one on this server.
    pub(super) fn room(&self, project_id: &str) -> Option<Arc<Room>> {
        self.rooms
            .lock()
            .expect("poisoned")
            .get(project_id)
            .cloned()
    }

    /// Closes a project's room: members get an error and are removed (suspension, deletion).
    /// A suspended project's room keeps recording its history (as the project keeps its other
    /// data); a deleted one is dropped with its history.
    pub fn close_project(&self, project_id: &str, why: RoomClosed) {
        // First: a subscribe that read the project's status before the suspension (or
        // deletion) and has not joined yet reads it again before joining (see `subscribe`).
        self.note_revocation(project_id);
        self.visibility.forget(project_id);
        let (code, message) = (why.code(), why.message());
        let deleted = why == RoomClosed::Deleted;
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

    /// Whether a socket is (still) in a project's room.
    pub(super) fn in_room(&self, project_id: &str, socket: u64) -> bool {
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
