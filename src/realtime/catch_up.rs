//! Catching up: a member reads the room's history after its position, at the pace its socket
//! drains, then joins live under the room's lock (nothing missing, nothing twice). Members at
//! the same place share one decoded chunk ([`ChunkCache`]); at most `realtime_catch_up_reads`
//! chunks of a room are read from disk at once.

use std::collections::HashMap;
use std::sync::atomic::Ordering;
use std::sync::Arc;

use tokio_tungstenite::tungstenite::Message;

use super::filter::{parse_row, Decision, Interest};
use super::room::{frame, instead_frame, kind_of, Room, RoomState};
use super::socket::SocketShared;
use crate::bus::Event;

/// Events, and bytes, a catching-up member reads from the history at a time (at least one).
const CATCH_UP_CHUNK: usize = 256;
const CATCH_UP_CHUNK_BYTES: u64 = 256 * 1024;

/// One chunk of the history, decoded once and shared by every member reading it: its events
/// and their `db_event`/`broadcast` frames (built on first use).
pub(super) struct Chunk {
    events: Vec<(String, Arc<Event>, std::sync::OnceLock<Message>)>,
}

/// Chunks in use (weakly held: a chunk lives while a member reads it) and the few most recent
/// (strongly held, so members a little behind each other still share).
#[derive(Default)]
pub(super) struct ChunkCache {
    live: HashMap<(String, String, usize), std::sync::Weak<Chunk>>,
    recent: std::collections::VecDeque<Arc<Chunk>>,
}

/// Chunks a room keeps decoded after their last reader moved on.
const RECENT_CHUNKS: usize = 4;

impl ChunkCache {
    pub(super) fn get(&self, key: &(String, String, usize)) -> Option<Arc<Chunk>> {
        self.live.get(key).and_then(|w| w.upgrade())
    }

    pub(super) fn put(&mut self, key: (String, String, usize), chunk: &Arc<Chunk>) {
        self.live.retain(|_, w| w.strong_count() > 0);
        self.live.insert(key, Arc::downgrade(chunk));
        self.recent.push_back(chunk.clone());
        while self.recent.len() > RECENT_CHUNKS {
            self.recent.pop_front();
        }
    }
}

impl Room {
    pub(super) async fn catch_up(
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
                                super::history::read_all(chunk)
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
            let Some(rt) = self.realtime.upgrade() else {
                return;
            };
            let Ok(host) = rt.host() else {
                return;
            };
            let verdicts = rt
                .visibility
                .verdicts(
                    &*host,
                    &self.project_id,
                    std::slice::from_ref(&interest.identity),
                    &chunk,
                )
                .await;
            drop(chunk);
            for (i, (id, event, framed)) in shared.events.iter().enumerate() {
                let record = || parse_row(event.record());
                let old_record = || parse_row(event.old());
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
