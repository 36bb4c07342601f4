//! Broadcasts from clients (a socket's `broadcast` message) and from backends
//! (`POST /api/realtime/broadcast`): bounded in size, REST ones also by the project's budget,
//! stored in the room's history in order with an id after the room's last one, and fanned out
//! (every member may see a broadcast: no row-level security).

use std::sync::atomic::Ordering;
use std::sync::Arc;

use serde::{Deserialize, Serialize};
use serde_json::{json, Value};

use super::{Realtime, RealtimeError};
use crate::auth::Access;
use crate::bus::{Event, EventKind};
use crate::visibility::Verdict;
use fluxbase_replication::pgoutput::Lsn;

/// `POST /api/realtime/broadcast`'s body.
#[derive(Deserialize, utoipa::ToSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct BroadcastRequest {
    pub project_id: String,
    /// 1 to 200 characters.
    pub event: String,
    /// Any JSON value, at most `realtime_max_broadcast_bytes` serialized.
    #[serde(default)]
    pub payload: Value,
}

/// How many sockets of this server got the broadcast.
#[derive(Serialize, utoipa::ToSchema)]
pub struct BroadcastResponse {
    pub success: bool,
    pub delivered: usize,
}

impl Realtime {
    /// `POST /api/realtime/broadcast`: a backend's broadcast to a project's room.
    pub async fn broadcast(
        &self,
        access: &Access,
        req: BroadcastRequest,
    ) -> Result<BroadcastResponse, RealtimeError> {
        if access.db_role == crate::auth::DbRole::Read {
            let why =
                "Broadcasting needs a readwrite or admin key (or a developer or admin member).";
            return Err(match access.member_role {
                Some(_) => RealtimeError::InsufficientPermissions(why.into()),
                None => RealtimeError::ScopeMismatch(why.into()),
            });
        }
        if req.event.is_empty() || req.event.len() > 200 {
            return Err(RealtimeError::BadRequest(
                "event: 1 to 200 characters".into(),
            ));
        }
        let delivered = match self.relay.get() {
            Some(relay) => {
                let project_id = &access.project.id;
                let size = self.admit_relayed(project_id, None, &req.payload)?;
                relay
                    .broadcast(project_id, &req.event, req.payload.to_string(), None)
                    .await
                    .map_err(RealtimeError::Unavailable)?;
                size
            }
            None => self.broadcast_to_room(&access.project.id, None, &req.event, &req.payload)?,
        };
        Ok(BroadcastResponse {
            success: true,
            delivered,
        })
    }

    /// Sends a broadcast to a room's members (except `from`); returns how many got it, or
    /// why it was refused (a payload over `realtime_max_broadcast_bytes`, or
    /// [`RealtimeError::Busy`]: one from the REST API (`from` is `None`) over the project's
    /// budget).
    pub(super) fn broadcast_to_room(
        &self,
        project_id: &str,
        from: Option<u64>,
        event: &str,
        payload: &Value,
    ) -> Result<usize, RealtimeError> {
        if let Some(relay) = self.relay.get() {
            // Cluster mode: the leader puts it in the project's stream, and every node's room
            // (this one's too) delivers it from there.
            let members = self.admit_relayed(project_id, from, payload)?;
            let answer = relay.broadcast(project_id, event, payload.to_string(), from);
            let project_id = project_id.to_string();
            tokio::spawn(async move {
                if let Err(e) = answer.await {
                    tracing::warn!(project_id, error = %e, "a client broadcast was not published");
                }
            });
            return Ok(members);
        }
        let limit = self.settings.realtime_max_broadcast_bytes;
        let size = serde_json::to_vec(payload).map_or(usize::MAX, |v| v.len());
        if size > limit {
            return Err(RealtimeError::PayloadTooLarge { size, limit });
        }
        let room = self.room(project_id);
        let Some(room) = room else { return Ok(0) };
        if from.is_none() && !room.admit_broadcast(size) {
            self.metrics
                .realtime_broadcasts_dropped
                .fetch_add(1, Ordering::Relaxed);
            return Err(self.busy());
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
            return Err(self.busy());
        };
        let event = Event {
            id,
            kind: EventKind::Broadcast {
                event: event.to_string(),
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
            end_lsn: Lsn(0),
            last_in_transaction: true,
            payload: Arc::from(body),
            sender: None,
            gap_before: false,
            payload_whole: false,
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
        let msg = std::cell::OnceCell::new();
        // Broadcasts are not row-filtered: every member may see them.
        state.slice_len = 1;
        let n = room.fan_out(&mut state, &event, &msg, from, |_| Some(&Verdict::Send));
        state.send_pending();
        drop(state);
        self.delivered.fetch_add(n as u64, Ordering::Relaxed);
        Ok(n)
    }

    /// Cluster mode: the checks a broadcast passes on the node it was sent to (size, and for
    /// REST ones the project's budget as this node counts it); how many live members this
    /// node's room has besides the sender (the sockets of this node that will get it).
    fn admit_relayed(
        &self,
        project_id: &str,
        from: Option<u64>,
        payload: &Value,
    ) -> Result<usize, RealtimeError> {
        let limit = self.settings.realtime_max_broadcast_bytes;
        let size = serde_json::to_vec(payload).map_or(usize::MAX, |v| v.len());
        if size > limit {
            return Err(RealtimeError::PayloadTooLarge { size, limit });
        }
        let Some(room) = self.room(project_id) else {
            return Ok(0);
        };
        if from.is_none() && !room.admit_broadcast(size) {
            self.metrics
                .realtime_broadcasts_dropped
                .fetch_add(1, Ordering::Relaxed);
            return Err(self.busy());
        }
        let state = room.state.lock().expect("poisoned");
        Ok(state
            .members
            .iter()
            .filter(|(id, m)| m.catching_up.is_none() && Some(**id) != from)
            .count())
    }

    /// A REST broadcast refused for the project's budget, naming it.
    fn busy(&self) -> RealtimeError {
        RealtimeError::Busy {
            per_sec: self.settings.realtime_project_broadcasts_per_sec,
            bytes_per_sec: self.settings.realtime_project_broadcast_bytes_per_sec,
        }
    }
}

/// The id of a broadcast from a client or the REST API: `<last event id>-<seq, 8 hex>`, after
/// the room's last id and before the next event's. The seq's high
/// [`super::history::EPOCH_BITS`] bits are the history's boot epoch (durable, one more
/// each start), the rest count: after a power loss that took broadcasts off the history's
/// tail, the next one still gets an id never issued before. `None`: this epoch's count at
/// this position ran out (move to the next epoch and ask again).
fn next_broadcast_id(last: Option<&str>, epoch: u32) -> Option<String> {
    use super::history::{EPOCH_BITS, SEQ_MASK};
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::realtime::subscribe::commit_lsn_of;

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
            (2u32 << 20) | crate::realtime::history::SEQ_MASK
        );
        assert_eq!(next_broadcast_id(Some(&full), 2), None);
        assert!(next_broadcast_id(Some(&full), 3).unwrap() > full);
    }
}
