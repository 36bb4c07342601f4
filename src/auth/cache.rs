//! Recently resolved API keys and projects, so the hot path (`execute-sql` with a key) does not
//! query the control database twice per request.
//!
//! Correctness over speed: the cache is used only while a `LISTEN fluxbase_cache` connection to
//! the control database is up. Every change that can revoke or restrict access (key rotation
//! or deletion, project suspension or update, also from the CLI in another process) sends
//! `NOTIFY fluxbase_cache`, which empties the cache of every server; the process that made the
//! change empties its own synchronously, so a rotated key is refused on the very next request.
//! Entries also expire after [`AuthCache::TTL`]. Unknown keys are never cached.
//!
//! ```text
//!  notify_access_change ─ NOTIFY fluxbase_cache ─► run_cache_listener (every server)
//!                                                    ├─ cache cleared
//!                                                    └─ ListenerEvent::Changed(AccessChange) ─► the app acts
//! ```

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use crate::auth::Scope;
use crate::projects::Project;

pub const CACHE_CHANNEL: &str = "fluxbase_cache";

#[derive(Default)]
pub struct AuthCache {
    live: AtomicBool,
    /// Bumped by every [`AuthCache::clear`] before it empties the maps: an entry read from
    /// the control database before a clear is not put back after it (a project suspended, a
    /// key revoked meanwhile would otherwise be served from the cache for up to [`Self::TTL`]).
    generation: std::sync::atomic::AtomicU64,
    keys: Mutex<HashMap<Vec<u8>, (CachedKey, Instant)>>,
    projects: Mutex<HashMap<String, (Project, Instant)>>,
    /// What a signed download URL's grant is checked against: a live key's current secret
    /// hash by `<project>/<key id>`, and members by `<project>/<user id>` (present ones only).
    key_secrets: Mutex<HashMap<String, (Vec<u8>, Instant)>>,
    members: Mutex<HashMap<String, ((), Instant)>>,
}

#[derive(Clone)]
pub(super) struct CachedKey {
    pub key_id: String,
    pub project_id: String,
    pub scope: Scope,
}

impl AuthCache {
    pub const TTL: Duration = Duration::from_secs(60);

    fn get<K, V: Clone>(&self, map: &Mutex<HashMap<K::Owned, (V, Instant)>>, key: &K) -> Option<V>
    where
        K: ToOwned + std::hash::Hash + Eq + ?Sized,
        K::Owned: std::hash::Hash + Eq + std::borrow::Borrow<K>,
    {
        if !self.live.load(Ordering::Acquire) {
            return None;
        }
        let map = map.lock().expect("poisoned");
        map.get(key)
            .filter(|(_, at)| at.elapsed() < Self::TTL)
            .map(|(v, _)| v.clone())
    }

    fn put<K: std::hash::Hash + Eq, V>(
        &self,
        map: &Mutex<HashMap<K, (V, Instant)>>,
        key: K,
        value: V,
        read_at: u64,
    ) {
        if !self.live.load(Ordering::Acquire) {
            return;
        }
        let mut map = map.lock().expect("poisoned");
        // Under the map's lock: a clear bumps the generation before it takes the lock.
        if self.generation.load(Ordering::Acquire) != read_at {
            return;
        }
        if map.len() > 100_000 {
            map.clear();
        }
        map.insert(key, (value, Instant::now()));
    }

    pub(super) fn key(&self, hash: &[u8]) -> Option<CachedKey> {
        self.get(&self.keys, hash)
    }

    /// The generation to pass to a put of what is read from the control database next.
    pub(super) fn generation(&self) -> u64 {
        self.generation.load(Ordering::Acquire)
    }

    pub(super) fn put_key(&self, hash: Vec<u8>, key: CachedKey, read_at: u64) {
        self.put(&self.keys, hash, key, read_at)
    }

    pub(super) fn project(&self, project_id: &str) -> Option<Project> {
        self.get(&self.projects, project_id)
    }

    pub(super) fn put_project(&self, project: Project, read_at: u64) {
        self.put(&self.projects, project.id.clone(), project, read_at)
    }

    pub(super) fn key_secret(&self, project_key: &str) -> Option<Vec<u8>> {
        self.get(&self.key_secrets, project_key)
    }

    pub(super) fn put_key_secret(&self, project_key: String, hash: Vec<u8>, read_at: u64) {
        self.put(&self.key_secrets, project_key, hash, read_at)
    }

    pub(super) fn member(&self, project_user: &str) -> bool {
        self.get(&self.members, project_user).is_some()
    }

    pub(super) fn put_member(&self, project_user: String, read_at: u64) {
        self.put(&self.members, project_user, (), read_at)
    }

    pub fn clear(&self) {
        self.generation.fetch_add(1, Ordering::AcqRel);
        self.keys.lock().expect("poisoned").clear();
        self.projects.lock().expect("poisoned").clear();
        self.key_secrets.lock().expect("poisoned").clear();
        self.members.lock().expect("poisoned").clear();
    }

    fn set_live(&self, live: bool) {
        self.live.store(live, Ordering::Release);
        self.clear();
    }
}

/// What a NOTIFY on [`CACHE_CHANNEL`] announces (ids never contain spaces).
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum AccessChange {
    /// Something changed that cached access may depend on: caches are emptied, nothing more.
    Any,
    /// A project's status changed, or it was created or deleted.
    Project(String),
    /// A project's deletion is starting (its database is dropped next, then its row): the
    /// statements the drop ends are answered as the project being gone on every server.
    Deleting(String),
    /// `user_id` left `project_id`.
    MemberRemoved { project_id: String, user_id: String },
    /// `user_id`'s role in `project_id` changed.
    MemberChanged { project_id: String, user_id: String },
    /// `project_id` stopped accepting subscribes without a token (`realtimePublic: false`).
    PublicClosed(String),
    /// An API key of `project_id` was deleted or rotated.
    KeyRevoked { project_id: String, key_id: String },
    /// `user_id`'s login session with this fingerprint ended (a logout), or all their sessions
    /// (`None`: a password reset).
    SessionsEnded {
        user_id: String,
        session: Option<String>,
    },
}

impl AccessChange {
    /// The NOTIFY payload: empty, a project id, `<project> deleting`,
    /// `<project> member-removed <user>`,
    /// `<project> member-changed <user>`, `<project> public-closed`, `<project> key-revoked <key>`
    /// or `sessions-ended <user> <session fingerprint, or *>`.
    pub fn payload(&self) -> String {
        match self {
            AccessChange::Any => String::new(),
            AccessChange::Project(id) => id.clone(),
            AccessChange::Deleting(id) => format!("{id} deleting"),
            AccessChange::MemberRemoved {
                project_id,
                user_id,
            } => format!("{project_id} member-removed {user_id}"),
            AccessChange::MemberChanged {
                project_id,
                user_id,
            } => format!("{project_id} member-changed {user_id}"),
            AccessChange::PublicClosed(project_id) => format!("{project_id} public-closed"),
            AccessChange::KeyRevoked { project_id, key_id } => {
                format!("{project_id} key-revoked {key_id}")
            }
            AccessChange::SessionsEnded { user_id, session } => {
                format!(
                    "sessions-ended {user_id} {}",
                    session.as_deref().unwrap_or("*")
                )
            }
        }
    }

    pub fn parse(payload: &str) -> AccessChange {
        if payload.is_empty() {
            return AccessChange::Any;
        }
        if let Some((user_id, session)) = payload
            .strip_prefix("sessions-ended ")
            .and_then(|rest| rest.split_once(' '))
        {
            return AccessChange::SessionsEnded {
                user_id: user_id.into(),
                session: (session != "*").then(|| session.into()),
            };
        }
        if let Some((project_id, key_id)) = payload.split_once(" key-revoked ") {
            return AccessChange::KeyRevoked {
                project_id: project_id.into(),
                key_id: key_id.into(),
            };
        }
        if let Some((project_id, user_id)) = payload.split_once(" member-changed ") {
            return AccessChange::MemberChanged {
                project_id: project_id.into(),
                user_id: user_id.into(),
            };
        }
        if let Some(project_id) = payload.strip_suffix(" public-closed") {
            return AccessChange::PublicClosed(project_id.into());
        }
        if let Some(project_id) = payload.strip_suffix(" deleting") {
            return AccessChange::Deleting(project_id.into());
        }
        match payload.split_once(" member-removed ") {
            Some((project_id, user_id)) => AccessChange::MemberRemoved {
                project_id: project_id.into(),
                user_id: user_id.into(),
            },
            None => AccessChange::Project(payload.into()),
        }
    }
}

/// What the listener tells the server it runs for.
#[derive(Debug)]
pub enum ListenerEvent {
    /// `LISTEN` is (again) up: changes notified while it was down were missed.
    Connected,
    /// Another server (or this one) announced a change; the cache is already empty.
    Changed(AccessChange),
}

/// Keeps a `LISTEN` connection open for the cache's lifetime; the cache is used only while
/// it is up. Sends what it hears on `events`; ends when the cache is dropped or nobody
/// receives the events any more.
pub async fn run_cache_listener(
    connect: tokio_postgres::Config,
    cache: std::sync::Weak<super::Auth>,
    events: tokio::sync::mpsc::UnboundedSender<ListenerEvent>,
) {
    use futures_util::StreamExt;
    let gone = |events: &tokio::sync::mpsc::UnboundedSender<ListenerEvent>| {
        events.is_closed() || cache.strong_count() == 0
    };
    loop {
        if gone(&events) {
            return;
        }
        match connect.connect(tokio_postgres::NoTls).await {
            Ok((client, mut connection)) => {
                let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel::<String>();
                let driver = tokio::spawn(async move {
                    let mut messages =
                        futures_util::stream::poll_fn(move |cx| connection.poll_message(cx));
                    while let Some(Ok(message)) = messages.next().await {
                        if let tokio_postgres::AsyncMessage::Notification(n) = message {
                            if tx.send(n.payload().to_string()).is_err() {
                                return;
                            }
                        }
                    }
                });
                if client
                    .batch_execute(&format!("LISTEN {CACHE_CHANNEL}"))
                    .await
                    .is_ok()
                {
                    if let Some(auth) = cache.upgrade() {
                        auth.cache().set_live(true);
                        // Revocations notified while it was disconnected were missed.
                        let _ = events.send(ListenerEvent::Connected);
                    }
                    loop {
                        let event = tokio::time::timeout(Duration::from_secs(5), rx.recv()).await;
                        let Some(auth) = cache.upgrade().filter(|_| !events.is_closed()) else {
                            driver.abort();
                            return;
                        };
                        match event {
                            Ok(Some(payload)) => {
                                auth.cache().clear();
                                if !payload.is_empty() {
                                    let change = AccessChange::parse(&payload);
                                    let _ = events.send(ListenerEvent::Changed(change));
                                }
                            }
                            Ok(None) => break,
                            Err(_) if client.is_closed() => break,
                            Err(_) => {}
                        }
                    }
                }
                driver.abort();
                if let Some(auth) = cache.upgrade() {
                    auth.cache().set_live(false);
                }
                tracing::warn!(
                    "access cache listener disconnected; caching is off until it reconnects"
                );
            }
            Err(e) => tracing::debug!(error = %e, "access cache listener cannot connect"),
        }
        tokio::time::sleep(Duration::from_secs(1)).await;
    }
}

#[cfg(test)]
mod tests {
    use super::AccessChange;

    /// A project read before a clear (a suspension notified meanwhile) is not put back after
    /// it; one read after the clear is.
    #[test]
    fn an_entry_read_before_a_clear_is_not_cached_after_it() {
        let cache = super::AuthCache::default();
        cache.set_live(true);
        let project = crate::projects::Project {
            id: "p1".into(),
            name: "p1".into(),
            engine: crate::projects::Engine::Postgresql,
            status: crate::projects::ProjectStatus::Active,
            realtime_public: false,
            db_name: "fx_p1".into(),
            created_at: chrono::Utc::now(),
            owner: None,
        };
        let read_at = cache.generation();
        cache.clear();
        cache.put_project(project.clone(), read_at);
        assert!(cache.project("p1").is_none(), "a stale read was cached");
        cache.put_project(project, cache.generation());
        assert!(cache.project("p1").is_some());
    }

    #[test]
    fn access_changes_round_trip_through_their_payload() {
        for change in [
            AccessChange::Any,
            AccessChange::Project("0123456789abcdef".into()),
            AccessChange::MemberRemoved {
                project_id: "0123456789abcdef".into(),
                user_id: "usr_x".into(),
            },
            AccessChange::MemberChanged {
                project_id: "0123456789abcdef".into(),
                user_id: "usr_x".into(),
            },
            AccessChange::PublicClosed("0123456789abcdef".into()),
            AccessChange::Deleting("0123456789abcdef".into()),
            AccessChange::SessionsEnded {
                user_id: "usr_x".into(),
                session: Some("00ff".into()),
            },
            AccessChange::SessionsEnded {
                user_id: "usr_x".into(),
                session: None,
            },
            AccessChange::KeyRevoked {
                project_id: "0123456789abcdef".into(),
                key_id: "key_y".into(),
            },
        ] {
            assert_eq!(AccessChange::parse(&change.payload()), change);
        }
    }
}
