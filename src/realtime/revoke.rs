//! Ending subscriptions whose access was revoked: an API key deleted or rotated (directly, or
//! through the realtime tokens it minted), or a member removed from the project. Each ended
//! subscription's socket gets `ACCESS_REVOKED` and stays open for its other rooms.
//!
//! A subscribe checks its credential before it joins the room; a revocation in between would
//! evict nothing. So a count of revocations per project is taken before the check and compared
//! under the room's lock when joining ([`Realtime::revocations`]): if it moved, the subscribe
//! checks again.

use std::collections::HashSet;
use std::sync::atomic::Ordering;
use std::sync::Arc;

use serde_json::json;
use tokio_tungstenite::tungstenite::Message;

use super::room::{Member, Room};
use super::{Realtime, RealtimeError};

/// The API key a subscription was authorized by (directly or through a realtime token it
/// minted): its id, and a fingerprint of the secret it had then.
#[derive(Clone, Debug)]
pub(super) struct KeyBinding {
    pub(super) key_id: String,
    pub(super) fingerprint: String,
}

/// Why a member's subscriptions end.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum MemberChange {
    Removed,
    RoleChanged,
}

impl MemberChange {
    pub(super) fn message(self) -> &'static str {
        match self {
            MemberChange::Removed => "You are no longer a member of this project.",
            MemberChange::RoleChanged => {
                "Your role in this project changed: subscribe again to receive what it allows."
            }
        }
    }
}

impl Realtime {
    /// A count that changes whenever an API key of `project_id` may have been revoked: taken
    /// before a subscribe checks its key and compared under the room's lock before it joins,
    /// so that a revocation in between (whose eviction would miss the new member) is never
    /// missed.
    pub(super) fn revocations(&self, project_id: &str) -> u64 {
        let own = self
            .revoked
            .lock()
            .expect("poisoned")
            .get(project_id)
            .copied()
            .unwrap_or(0);
        own.wrapping_add(self.revoked_everywhere.load(Ordering::SeqCst))
    }

    /// A key of `project_id` was revoked, a member removed, or the project suspended or
    /// deleted (counted before the subscriptions are evicted or the room emptied).
    pub(super) fn note_revocation(&self, project_id: &str) {
        *self
            .revoked
            .lock()
            .expect("poisoned")
            .entry(project_id.to_string())
            .or_default() += 1;
    }

    /// The projects with a room on this server now.
    fn room_ids(&self) -> Vec<String> {
        self.rooms
            .lock()
            .expect("poisoned")
            .keys()
            .cloned()
            .collect()
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

    /// Ends the subscriptions a member holds in a project's room (removed, or given another
    /// role: a subscription's role is fixed when it is accepted, so the client subscribes again
    /// with the new one); each socket gets an `ACCESS_REVOKED` error with `why` and stays open
    /// for its other rooms.
    pub fn evict_user(&self, project_id: &str, user_id: &str, why: MemberChange) {
        // First, as for keys: a subscribe that checked membership before this and joins after
        // it checks again.
        self.note_revocation(project_id);
        let sockets = self.evict(
            project_id,
            |m| m.user.as_deref() == Some(user_id),
            why.message(),
        );
        if sockets > 0 {
            tracing::info!(
                project_id,
                user_id,
                sockets,
                change = ?why,
                "a member's realtime subscriptions ended"
            );
        }
    }

    /// Ends the subscriptions bound to `user_id`'s login session with fingerprint `session`
    /// ([`Realtime::session_fingerprint`]; a logout), or to any of their sessions (`None`: a
    /// password reset), in every room; each socket gets `ACCESS_REVOKED` and stays open for its
    /// other rooms.
    pub fn end_sessions(&self, user_id: &str, session: Option<&str>) {
        // Every project's subscribes in flight check again (a session spans projects).
        self.keys_revoked_everywhere();
        let rooms = self.room_ids();
        let mut sockets = 0;
        for project_id in rooms {
            sockets += self.evict(
                &project_id,
                |m| {
                    m.user.as_deref() == Some(user_id)
                        && m.session
                            .as_deref()
                            .is_some_and(|s| session.is_none_or(|want| want == s))
                },
                super::subscribe::SESSION_ENDED,
            );
        }
        if sockets > 0 {
            tracing::info!(
                user_id,
                sockets,
                "realtime subscriptions of ended sessions ended"
            );
        }
    }

    /// Ends the subscriptions made without a token once a project stops being public
    /// (`realtimePublic: false`); each socket gets `ACCESS_REVOKED` and stays open for its
    /// other rooms.
    pub fn evict_anonymous(&self, project_id: &str) {
        self.note_revocation(project_id);
        let sockets = self.evict(
            project_id,
            |m| m.anonymous,
            "This project no longer accepts subscriptions without a token.",
        );
        if sockets > 0 {
            tracing::info!(
                project_id,
                sockets,
                "anonymous realtime subscriptions ended"
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
        self.evict_with(project_id, revoked, "ACCESS_REVOKED", message)
    }

    /// [`Realtime::evict`] with the error `code` the sockets get.
    fn evict_with(
        &self,
        project_id: &str,
        revoked: impl Fn(&Member) -> bool,
        code: &str,
        message: &str,
    ) -> usize {
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
            json!({ "type": "error", "code": code, "roomId": room.room_id,
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

    /// Ends every subscription whose realtime token has expired: its socket gets
    /// `TOKEN_EXPIRED` for the room and stays open (subscribe again with a new token). Run once
    /// a second ([`Realtime::start_token_expiry`]); a token is checked when it subscribes, so
    /// this is what ends one that expires while subscribed.
    pub fn end_expired(&self) -> usize {
        let now = self.clock.now().timestamp();
        let rooms = self.room_ids();
        let mut ended = 0;
        for project_id in rooms {
            ended += self.evict_with(
                &project_id,
                |m| m.expires.is_some_and(|at| at <= now),
                "TOKEN_EXPIRED",
                "The token of this subscription (a realtime token, or the login session it was made with) expired: subscribe again with a new one.",
            );
        }
        if ended > 0 {
            tracing::info!(
                subscriptions = ended,
                "realtime subscriptions ended: their tokens expired"
            );
        }
        ended
    }

    /// Runs [`Realtime::end_expired`] once a second for as long as this `Realtime` lives.
    pub fn start_token_expiry(self: &Arc<Self>) {
        let weak = Arc::downgrade(self);
        tokio::spawn(async move {
            let mut tick = tokio::time::interval(std::time::Duration::from_secs(1));
            tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            loop {
                tick.tick().await;
                let Some(realtime) = weak.upgrade() else {
                    return;
                };
                realtime.end_expired();
            }
        });
    }

    /// An API key was deleted or rotated (here or by another server): the realtime
    /// subscriptions it authorized, directly or through its tokens, end unless they hold its
    /// current secret.
    pub async fn key_revoked(&self, project_id: &str, key_id: &str) {
        // First: a subscribe that checked this key before the revocation and has not joined
        // yet sees it when it does, and checks again.
        self.note_revocation(project_id);
        let current = match self.current_key_hash(project_id, key_id).await {
            Ok(hash) => hash.map(|h| self.key_fingerprint(&h)),
            Err(e) => {
                // Unknown state: end them all (the clients may subscribe again).
                tracing::warn!(error = %e, key_id, "checking a revoked key");
                None
            }
        };
        self.evict_key(project_id, key_id, current.as_deref());
    }

    /// Revocations notified while the access listener was disconnected are lost: every
    /// key-bound subscription is checked against its key again (run when it reconnects), and
    /// subscribes under way check theirs again before they join.
    pub async fn recheck_keys(&self) {
        self.keys_revoked_everywhere();
        for (project_id, key_id) in self.bound_keys() {
            self.key_revoked(&project_id, &key_id).await;
        }
    }

    /// Whether a subscription's key still has the secret it was authorized with.
    pub(super) async fn check_binding(
        &self,
        project_id: &str,
        key: &KeyBinding,
    ) -> Result<(), RealtimeError> {
        let current = self
            .current_key_hash(project_id, &key.key_id)
            .await?
            .map(|h| self.key_fingerprint(&h));
        if current.as_deref() != Some(key.fingerprint.as_str()) {
            return Err(RealtimeError::AccessRevoked(
                "The API key this subscription was authorized with was deleted or rotated.".into(),
            ));
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::MemberChange;

    #[test]
    fn a_revocation_or_removal_after_the_access_check_is_seen_before_joining() {
        let rt = super::super::tests::realtime();
        let checked = rt.revocations("p1");
        let other = rt.revocations("p2");
        // Nothing revoked: the subscribe joins as it checked.
        assert_eq!(rt.revocations("p1"), checked);
        // A key of p1 revoked between the check and the join: the join sees it.
        rt.note_revocation("p1");
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
        rt.evict_user("p1", "usr_x", MemberChange::Removed);
        assert_ne!(rt.revocations("p1"), rechecked);
        let rechecked = rt.revocations("p1");
        // Its role changed, or the project stopped being public: the same.
        rt.evict_user("p1", "usr_x", MemberChange::RoleChanged);
        assert_ne!(rt.revocations("p1"), rechecked);
        let rechecked = rt.revocations("p1");
        rt.evict_anonymous("p1");
        assert_ne!(rt.revocations("p1"), rechecked);
        let rechecked = rt.revocations("p1");
        // The access listener reconnected: every project's subscribes check again.
        rt.keys_revoked_everywhere();
        assert_ne!(rt.revocations("p1"), rechecked);
        assert_ne!(rt.revocations("p2"), other);
        assert!(rt.bound_keys().is_empty());
    }
}
