//! A `subscribe` message: which room, with which credential (an API key, a session, a
//! realtime token, or none for a `realtimePublic` project), acting as whom for row-level
//! security, from where (`since`), and joining the room's members under its lock so that
//! nothing is delivered before the `subscribed` answer and no revocation is missed.

use std::collections::HashSet;
use std::sync::Arc;

use serde_json::{json, Value};
use tokio_tungstenite::tungstenite::Message;

use super::filter::{parse_filter, Interest};
use super::revoke::{KeyBinding, MemberChange};
use super::room::Member;
use super::socket::SocketShared;
use super::token::{MYSQL_NO_AUTH_UID, TOKEN_PREFIX};
use super::{Realtime, RealtimeError};
use crate::auth::{DbRole, Principal};
use crate::visibility::Identity;
use fluxbase_replication::pgoutput::Lsn;

/// Why a subscribe without a token is refused (the project is not `realtimePublic`).
const TOKEN_NEEDED: &str =
    "This room needs a token: an API key, or a realtime token from POST /api/realtime/token.";

/// Why a subscription bound to a login session ends, or is refused.
pub(super) const SESSION_ENDED: &str =
    "The session behind this subscription has ended (logout or a password reset).";

/// Rooms one socket may join.
pub const MAX_SUBSCRIPTIONS_PER_SOCKET: usize = 100;
/// Sockets subscribed to one project.
pub const MAX_SOCKETS_PER_PROJECT: usize = 10_000;

impl Realtime {
    pub(super) async fn subscribe(
        self: &Arc<Self>,
        socket: &Arc<SocketShared>,
        joined: &mut HashSet<String>,
        room_id: &str,
        msg: &Value,
    ) -> Result<(), RealtimeError> {
        let project_id = room_id
            .strip_prefix("project_")
            .filter(|p| crate::auth::is_project_id(p))
            .ok_or_else(|| {
                RealtimeError::ProjectNotFound(format!(
                    "no room {room_id:?}: rooms are project_<projectId>"
                ))
            })?;
        if joined.len() >= MAX_SUBSCRIPTIONS_PER_SOCKET && !joined.contains(project_id) {
            return Err(RealtimeError::LimitExceeded(format!(
                "at most {MAX_SUBSCRIPTIONS_PER_SOCKET} rooms per socket"
            )));
        }
        let mut filter = parse_filter(&msg["filter"]).map_err(RealtimeError::BadRequest)?;
        let since = match &msg["since"] {
            Value::Null => None,
            Value::String(id) => {
                commit_lsn_of(id).ok_or_else(|| {
                    RealtimeError::BadRequest(format!("since: {id:?} is not an event id"))
                })?;
                // Ids are upper-case hex: they compare as strings.
                Some(id.to_ascii_uppercase())
            }
            _ => {
                return Err(RealtimeError::BadRequest(
                    "since: expected an event id".into(),
                ))
            }
        };
        let host = self.host()?;
        // Taken before the key is checked: compared again under the room's lock.
        let mut revocations = self.revocations(project_id);
        let mut user = None;
        let mut key: Option<KeyBinding> = None;
        let mut anonymous = false;
        // The login session behind it (directly or through a token it obtained), fingerprinted.
        let mut session: Option<String> = None;
        let mut expires: Option<i64> = None;
        // The subscription's identity for row-level security (see crate::visibility).
        let named_uid = &msg["authUid"];
        let identity: Identity;
        let project = host.load_project(project_id).await?.ok_or_else(|| {
            RealtimeError::ProjectNotFound("No project found for the given projectId.".into())
        })?;
        let mysql = project.engine == crate::projects::Engine::Mysql;
        if mysql && !named_uid.is_null() {
            return Err(RealtimeError::BadRequest(MYSQL_NO_AUTH_UID.into()));
        }
        match msg["token"].as_str().filter(|t| !t.is_empty()) {
            Some(token) if token.starts_with(TOKEN_PREFIX) => {
                let mut claims = self.verify_token(token)?;
                expires = Some(claims.e);
                // A key's token minted with an authUid (before MySQL projects refused it).
                if mysql && claims.u.is_some() && claims.m.is_none() {
                    return Err(RealtimeError::BadRequest(MYSQL_NO_AUTH_UID.into()));
                }
                if claims.p != project.id {
                    return Err(RealtimeError::ScopeMismatch(
                        "This token belongs to another project.".into(),
                    ));
                }
                // A token has its own budget, as a key does: however many sockets use it.
                let caller = hex::encode(&crate::secrets::sha256(token.as_bytes())[..16]);
                host.rate_check(&format!("rt:{caller}"))?;
                if !named_uid.is_null() && named_uid.as_str() != claims.u.as_deref() {
                    return Err(RealtimeError::ScopeMismatch(
                        "A realtime token acts for the authUid it was minted with.".into(),
                    ));
                }
                // The role is that of the key's scope, or of the member's role, as it is now.
                let mut role = DbRole::Read;
                if let (Some(key_id), Some(fingerprint)) = (claims.k, claims.f) {
                    let live = self.live_key(&project.id, &key_id).await?;
                    match live {
                        Some((hash, key_role)) if self.key_fingerprint(&hash) == fingerprint => {
                            role = key_role;
                        }
                        _ => {
                            return Err(RealtimeError::AccessRevoked(
                                "The API key that issued this token was deleted or rotated.".into(),
                            ))
                        }
                    }
                    key = Some(KeyBinding {
                        key_id,
                        fingerprint,
                    });
                }
                filter.token_tables = claims.t.map(|t| t.into_iter().collect());
                if let Some(member) = claims.m {
                    let Some(member_role) = self.member_db_role(&project.id, &member).await? else {
                        return Err(RealtimeError::AccessRevoked("The member who obtained this token is no longer a member of the project.".into(),
                        ));
                    };
                    role = member_role;
                    // As for the member's own SQL: a session acts as its own user.
                    if claims.u.as_ref().is_some_and(|u| *u != member) {
                        return Err(RealtimeError::ScopeMismatch("A token obtained with a session acts as that member; authUid is for API keys.".into(),
                        ));
                    }
                    claims.u = Some(member.clone());
                    if let Some(fp) = claims.s.take() {
                        if !self.session_live(&member, &fp).await? {
                            return Err(RealtimeError::AccessRevoked(SESSION_ENDED.into()));
                        }
                        session = Some(fp);
                    }
                    user = Some(member);
                }
                identity = Identity {
                    role,
                    auth_uid: claims.u,
                };
            }
            Some(token) => {
                let principal = host.authenticate(token).await?;
                if let Principal::Key {
                    project_id: key_project,
                    key_id,
                    ..
                } = &principal
                {
                    if key_project != &project.id {
                        return Err(RealtimeError::ScopeMismatch(
                            "This key belongs to another project.".into(),
                        ));
                    }
                    key = Some(KeyBinding {
                        key_id: key_id.clone(),
                        fingerprint: self
                            .key_fingerprint(&crate::secrets::sha256(token.as_bytes())),
                    });
                }
                if let Principal::Session {
                    token_hash,
                    expires_at,
                    ..
                } = &principal
                {
                    session = Some(self.session_fingerprint(token_hash));
                    // Ended with the session (red team rt13: a socket subscribed with a
                    // session kept receiving events after the session had expired).
                    expires = Some(*expires_at);
                }
                let access = host.project_access(&principal, &project.id).await?;
                // As execute-sql: a key may name its end user, a session acts as its own.
                let auth_uid = host.request_identity(&access, named_uid)?;
                identity = Identity {
                    role: access.db_role,
                    auth_uid,
                };
                user = principal.user_id().map(str::to_string);
            }
            None if project.realtime_public => {
                if !named_uid.is_null() {
                    return Err(RealtimeError::AuthRequired(
                        "authUid needs a token: an API key, or a realtime token minted for it."
                            .into(),
                    ));
                }
                identity = Identity {
                    role: DbRole::Read,
                    auth_uid: None,
                };
                anonymous = true;
            }
            None => return Err(RealtimeError::AuthRequired(TOKEN_NEEDED.into())),
        }
        if project.status == crate::projects::ProjectStatus::Suspended {
            return Err(RealtimeError::ProjectSuspended);
        }
        let room = self.open_room(&project.id);
        // Measured after the room's bus subscription exists: the room gets every transaction
        // that commits from here on. In the project's own log: PostgreSQL's WAL, or the MySQL
        // server's binary log (event ids of the two are positions in different logs).
        // A PostgreSQL event's `commit_lsn` is where its commit record starts, so a transaction
        // that committed before `now` has one below it; a binlog event's is where its commit
        // event ends, which is exactly the log's end when it was the last one: the first
        // position a later commit can have is one past the end.
        let now = match project.engine {
            crate::projects::Engine::Postgresql => self.wal_insert_lsn().await?,
            crate::projects::Engine::Mysql => {
                fluxbase_replication::pgoutput::Lsn(host.binlog_end().await?.0 + 1)
            }
        };
        let mut state = loop {
            let state = room.state.lock().expect("poisoned");
            let seen = self.revocations(&project.id);
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
                match self.member_db_role(&project.id, member).await? {
                    None => {
                        return Err(RealtimeError::AccessRevoked(
                            MemberChange::Removed.message().into(),
                        ))
                    }
                    Some(role) if role != identity.role => {
                        return Err(RealtimeError::AccessRevoked(
                            MemberChange::RoleChanged.message().into(),
                        ))
                    }
                    Some(_) => {}
                }
            }
            if let (Some(fp), Some(member)) = (&session, &user) {
                if !self.session_live(member, fp).await? {
                    return Err(RealtimeError::AccessRevoked(SESSION_ENDED.into()));
                }
            }
            // The project suspended or deleted since its status was read above: its room was
            // emptied meanwhile (`close_project` counts as a revocation before it empties),
            // so joining now would leave this socket in it, unseen by the eviction.
            let Some(current) = host.load_project(&project.id).await? else {
                return Err(RealtimeError::ProjectNotFound(
                    "No project found for the given projectId.".into(),
                ));
            };
            if current.status == crate::projects::ProjectStatus::Suspended {
                return Err(RealtimeError::ProjectSuspended);
            }
            if anonymous && !current.realtime_public {
                return Err(RealtimeError::AuthRequired(TOKEN_NEEDED.into()));
            }
        };
        // Cluster mode: MAX_SOCKETS_PER_PROJECT holds across the cluster, each node taking
        // its share (crate::cluster::per_node).
        let (max_sockets, nodes) = match self.relay.get() {
            None => (MAX_SOCKETS_PER_PROJECT, 1),
            Some(relay) => {
                let nodes = relay.nodes();
                (
                    crate::cluster::per_node(MAX_SOCKETS_PER_PROJECT, nodes),
                    nodes,
                )
            }
        };
        if state.members.len() >= max_sockets && !state.members.contains_key(&socket.id) {
            return Err(RealtimeError::LimitExceeded(if nodes > 1 {
                format!(
                    "at most {MAX_SOCKETS_PER_PROJECT} sockets per project across the cluster: \
                     {max_sockets} on each of its {nodes} nodes"
                )
            } else {
                format!("at most {MAX_SOCKETS_PER_PROJECT} sockets per project")
            }));
        }
        let max_identities = self.settings.realtime_rls_max_identities;
        let identities: HashSet<&Identity> = state
            .members
            .values()
            .map(|m| &m.interest.identity)
            .collect();
        if identities.len() >= max_identities && !identities.contains(&identity) {
            return Err(RealtimeError::LimitExceeded(format!("at most {max_identities} distinct identities (role and authUid) per project room (realtime_rls_max_identities)"),
            ));
        }
        socket.push(Message::text(
            json!({ "type": "subscribed", "roomId": room.room_id }).to_string(),
        ));
        if let Some(degraded) = state.degraded.as_deref() {
            socket.push(room.status_message(Some(degraded)));
        }
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
                pending: Default::default(),
                user,
                key,
                anonymous,
                session,
                expires,
            },
        );
        if let Some(since) = catch_up {
            room.start_catch_up(&mut state, socket.id, Some(since));
        }
        drop(state);
        joined.insert(project.id);
        Ok(())
    }

    /// The project role of a member's current role (`None`: not a member).
    async fn member_db_role(
        &self,
        project_id: &str,
        user_id: &str,
    ) -> Result<Option<DbRole>, RealtimeError> {
        let client = self.control.get().await?;
        let role = crate::control::members::role(&client, project_id, user_id).await?;
        Ok(role.map(|m| m.db_role()))
    }

    /// The cluster's WAL insert position: a transaction that commits after this call has a
    /// commit LSN at or above it; one that committed before, below it.
    async fn wal_insert_lsn(&self) -> Result<Lsn, RealtimeError> {
        let client = self.control.get().await?;
        let row = client
            .query_one("SELECT pg_current_wal_insert_lsn()::text", &[])
            .await?;
        let lsn: String = row.get(0);
        lsn.parse().map_err(|_| {
            RealtimeError::Internal(anyhow::anyhow!("unexpected WAL position {lsn:?}"))
        })
    }
}

/// The commit LSN in an event id (`<commit LSN, 16 hex>-<index, 8 hex>`), or in a broadcast
/// id from a client or the REST API (`<the room's last event id>-<seq, 8 hex>`).
pub(super) fn commit_lsn_of(id: &str) -> Option<Lsn> {
    let (lsn, rest) = id.split_once('-')?;
    let (index, seq) = match rest.split_once('-') {
        Some((index, seq)) => (index, Some(seq)),
        None => (rest, None),
    };
    let hex = |s: &str, len| s.len() == len && s.bytes().all(|b| b.is_ascii_hexdigit());
    (hex(lsn, 16) && hex(index, 8) && seq.is_none_or(|s| hex(s, 8)))
        .then(|| u64::from_str_radix(lsn, 16).ok().map(Lsn))?
}

#[cfg(test)]
mod tests {
    use super::*;

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
