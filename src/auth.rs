//! Who is calling, and what they may do with a project.
//!
//! A request carries `Authorization: Bearer <token>`: an API key (`flx_live_…`, bound to one
//! project and one scope) or a user session (`flx_sess_…`, acting through the user's membership
//! role). Both are looked up by their SHA-256 hash. The resulting [`Access`] names the PostgreSQL
//! role the caller's SQL runs as; PostgreSQL's own privileges then enforce the scope table.

use chrono::{DateTime, Utc};

use crate::api::error::{ApiError, ApiResult};
use crate::app::App;
use crate::secrets::sha256;

pub const KEY_PREFIX: &str = "flx_live_";
pub const SESSION_PREFIX: &str = "flx_sess_";

/// The scope of an API key (the guide's scope table).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Scope {
    Read,
    ReadWrite,
    Admin,
}

impl Scope {
    pub fn parse(s: &str) -> Option<Scope> {
        match s {
            "read" => Some(Scope::Read),
            "readwrite" => Some(Scope::ReadWrite),
            "admin" => Some(Scope::Admin),
            _ => None,
        }
    }
    pub fn as_str(self) -> &'static str {
        match self {
            Scope::Read => "read",
            Scope::ReadWrite => "readwrite",
            Scope::Admin => "admin",
        }
    }
    pub fn db_role(self) -> DbRole {
        match self {
            Scope::Read => DbRole::Read,
            Scope::ReadWrite => DbRole::ReadWrite,
            Scope::Admin => DbRole::Owner,
        }
    }
}

/// A member's role in a project.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum MemberRole {
    Admin,
    Developer,
    Viewer,
}

impl MemberRole {
    pub fn parse(s: &str) -> Option<MemberRole> {
        match s {
            "admin" => Some(MemberRole::Admin),
            "developer" => Some(MemberRole::Developer),
            "viewer" => Some(MemberRole::Viewer),
            _ => None,
        }
    }
    pub fn as_str(self) -> &'static str {
        match self {
            MemberRole::Admin => "admin",
            MemberRole::Developer => "developer",
            MemberRole::Viewer => "viewer",
        }
    }
    /// viewer → read; developer and admin → owner.
    pub fn db_role(self) -> DbRole {
        match self {
            MemberRole::Viewer => DbRole::Read,
            MemberRole::Developer | MemberRole::Admin => DbRole::Owner,
        }
    }
}

/// The PostgreSQL login role a caller's SQL runs as.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum DbRole {
    Read,
    ReadWrite,
    Owner,
}

impl DbRole {
    pub const ALL: [DbRole; 3] = [DbRole::Owner, DbRole::ReadWrite, DbRole::Read];

    /// `fx_<project>_<suffix>`: the role's name in the cluster.
    pub fn role_name(self, project_id: &str) -> String {
        let suffix = match self {
            DbRole::Read => "read",
            DbRole::ReadWrite => "readwrite",
            DbRole::Owner => "owner",
        };
        format!("fx_{project_id}_{suffix}")
    }
}

/// The authenticated caller.
#[derive(Clone, Debug)]
pub enum Principal {
    Key {
        key_id: String,
        project_id: String,
        scope: Scope,
    },
    Session {
        user_id: String,
        token_hash: Vec<u8>,
    },
}

impl Principal {
    pub fn user_id(&self) -> Option<&str> {
        match self {
            Principal::Session { user_id, .. } => Some(user_id),
            Principal::Key { .. } => None,
        }
    }

    /// Only a user session may do this (e.g. create projects).
    pub fn require_session(&self) -> ApiResult<&str> {
        self.user_id().ok_or_else(|| {
            ApiError::ScopeMismatch(
                "This endpoint needs a user session token, not an API key.".into(),
            )
        })
    }
}

#[derive(Clone, Debug)]
pub struct Project {
    pub id: String,
    pub name: String,
    pub status: String,
    pub realtime_public: bool,
    pub db_name: String,
    pub created_at: DateTime<Utc>,
}

/// What a principal may do with one project.
#[derive(Clone, Debug)]
pub struct Access {
    pub project: Project,
    pub db_role: DbRole,
    pub admin: bool,
    pub principal: Principal,
    pub member_role: Option<MemberRole>,
}

impl Access {
    /// Admin keys and admin members only.
    pub fn require_admin(&self) -> ApiResult<()> {
        if self.admin {
            return Ok(());
        }
        Err(match self.principal {
            Principal::Key { .. } => {
                ApiError::ScopeMismatch("This action needs an API key with the admin scope.".into())
            }
            Principal::Session { .. } => ApiError::InsufficientPermissions(
                "Only project admins can perform this action.".into(),
            ),
        })
    }

    /// Data and schema management (webhooks, storage deletes, RLS policies): an admin key, or a
    /// developer or admin member. `what` completes "… needs a developer or admin role".
    pub fn require_developer(&self, what: &str) -> ApiResult<()> {
        if self.db_role == DbRole::Owner {
            return Ok(());
        }
        Err(match self.member_role {
            Some(_) => ApiError::InsufficientPermissions(format!(
                "{what} needs a developer or admin role."
            )),
            None => ApiError::ScopeMismatch(format!("{what} needs an admin key.")),
        })
    }
}

pub fn is_project_id(id: &str) -> bool {
    id.len() == 16 && id.bytes().all(|b| matches!(b, b'0'..=b'9' | b'a'..=b'f'))
}

impl App {
    /// Resolves the bearer token of a request and applies the caller's rate limit.
    pub async fn authenticate(&self, authorization: Option<&str>) -> ApiResult<Principal> {
        let missing = || {
            ApiError::AuthRequired(
                "API key missing or malformed. Include Authorization: Bearer <key>.".into(),
            )
        };
        let header = authorization.ok_or_else(missing)?.trim();
        let (scheme, token) = header.split_once(' ').ok_or_else(missing)?;
        if !scheme.eq_ignore_ascii_case("bearer") {
            return Err(missing());
        }
        let token = token.trim();
        let hash = sha256(token.as_bytes());
        let principal = if token.starts_with(KEY_PREFIX) {
            let key = match self.auth_cache.get(&self.auth_cache.keys, hash.as_slice()) {
                Some(k) => k,
                None => {
                    let client = self.control.get().await?;
                    let row = client
                        .query_opt(
                            "SELECT id, project_id, scope FROM fluxbase.api_keys
                             WHERE key_hash = $1 AND revoked_at IS NULL",
                            &[&hash],
                        )
                        .await?
                        .ok_or_else(|| {
                            ApiError::AuthRequired("Invalid or revoked API key.".into())
                        })?;
                    let key = CachedKey {
                        key_id: row.get(0),
                        project_id: row.get(1),
                        scope: Scope::parse(row.get(2))
                            .ok_or_else(|| anyhow::anyhow!("bad scope"))?,
                    };
                    self.auth_cache
                        .put(&self.auth_cache.keys, hash.clone(), key.clone());
                    key
                }
            };
            self.touch_key(&key.key_id);
            Principal::Key {
                key_id: key.key_id,
                project_id: key.project_id,
                scope: key.scope,
            }
        } else if token.starts_with(SESSION_PREFIX) {
            let client = self.control.get().await?;
            let row = client
                .query_opt(
                    "SELECT user_id, expires_at <= now() FROM fluxbase.sessions WHERE token_hash = $1",
                    &[&hash],
                )
                .await?
                .ok_or_else(|| ApiError::AuthRequired("Invalid session token. Log in again.".into()))?;
            if row.get::<_, bool>(1) {
                return Err(ApiError::TokenExpired);
            }
            Principal::Session {
                user_id: row.get(0),
                token_hash: hash,
            }
        } else {
            return Err(missing());
        };
        let caller = match &principal {
            Principal::Key { key_id, .. } => format!("key:{key_id}"),
            Principal::Session { token_hash, .. } => format!("session:{}", hex::encode(token_hash)),
        };
        self.rate.check(&caller)?;
        Ok(principal)
    }

    /// Writes `last_used_at` at most once a minute per key, off the request path.
    fn touch_key(self: &App, key_id: &str) {
        let now = std::time::Instant::now();
        {
            let mut touched = self.key_touched.lock().expect("poisoned");
            if touched
                .get(key_id)
                .is_some_and(|t| now.duration_since(*t).as_secs() < 60)
            {
                return;
            }
            touched.insert(key_id.to_string(), now);
        }
        let pool = self.control.clone();
        let key_id = key_id.to_string();
        tokio::spawn(async move {
            if let Ok(client) = pool.get().await {
                let _ = client
                    .execute(
                        "UPDATE fluxbase.api_keys SET last_used_at = now() WHERE id = $1",
                        &[&key_id],
                    )
                    .await;
            }
        });
    }

    pub async fn load_project(&self, project_id: &str) -> ApiResult<Option<Project>> {
        if !is_project_id(project_id) {
            return Ok(None);
        }
        if let Some(p) = self.auth_cache.get(&self.auth_cache.projects, project_id) {
            return Ok(Some(p));
        }
        let client = self.control.get().await?;
        let row = client
            .query_opt(
                "SELECT id, name, status, realtime_public, db_name, created_at
                 FROM fluxbase.projects WHERE id = $1",
                &[&project_id],
            )
            .await?;
        let project = row.map(|r| Project {
            id: r.get(0),
            name: r.get(1),
            status: r.get(2),
            realtime_public: r.get(3),
            db_name: r.get(4),
            created_at: r.get(5),
        });
        if let Some(p) = &project {
            self.auth_cache
                .put(&self.auth_cache.projects, p.id.clone(), p.clone());
        }
        Ok(project)
    }

    /// What `principal` may do with `project_id`; refuses suspended projects.
    pub async fn project_access(
        &self,
        principal: &Principal,
        project_id: &str,
    ) -> ApiResult<Access> {
        let project = self
            .load_project(project_id)
            .await?
            .ok_or(ApiError::ProjectNotFound)?;
        let access = match principal {
            Principal::Key {
                project_id: key_project,
                scope,
                ..
            } => {
                if key_project != &project.id {
                    return Err(ApiError::ScopeMismatch(
                        "API key does not have access to this project.".into(),
                    ));
                }
                Access {
                    db_role: scope.db_role(),
                    admin: *scope == Scope::Admin,
                    principal: principal.clone(),
                    member_role: None,
                    project,
                }
            }
            Principal::Session { user_id, .. } => {
                let client = self.control.get().await?;
                let role: String = client
                    .query_opt(
                        "SELECT role FROM fluxbase.members WHERE project_id = $1 AND user_id = $2",
                        &[&project.id, user_id],
                    )
                    .await?
                    .map(|r| r.get(0))
                    // Not a member: the project is not revealed to exist.
                    .ok_or(ApiError::ProjectNotFound)?;
                let role = MemberRole::parse(&role).ok_or_else(|| anyhow::anyhow!("bad role"))?;
                Access {
                    db_role: role.db_role(),
                    admin: role == MemberRole::Admin,
                    principal: principal.clone(),
                    member_role: Some(role),
                    project,
                }
            }
        };
        if access.project.status == "suspended" {
            return Err(ApiError::ProjectSuspended);
        }
        Ok(access)
    }
}

/// Recently resolved API keys and projects, so the hot path (`execute-sql` with a key) does not
/// query the control database twice per request.
///
/// Correctness over speed: the cache is used only while a `LISTEN fluxbase_cache` connection to
/// the control database is up. Every change that can revoke or restrict access (key rotation
/// or deletion, project suspension or update, also from the CLI in another process) sends
/// `NOTIFY fluxbase_cache`, which empties the cache of every server; the process that made the
/// change empties its own synchronously, so a rotated key is refused on the very next request.
/// Entries also expire after [`AuthCache::TTL`]. Unknown keys are never cached.
#[derive(Default)]
pub struct AuthCache {
    live: std::sync::atomic::AtomicBool,
    keys: std::sync::Mutex<std::collections::HashMap<Vec<u8>, (CachedKey, std::time::Instant)>>,
    projects: std::sync::Mutex<std::collections::HashMap<String, (Project, std::time::Instant)>>,
}

#[derive(Clone)]
pub struct CachedKey {
    key_id: String,
    project_id: String,
    scope: Scope,
}

pub const CACHE_CHANNEL: &str = "fluxbase_cache";

impl AuthCache {
    pub const TTL: std::time::Duration = std::time::Duration::from_secs(60);

    fn get<K, V: Clone>(
        &self,
        map: &std::sync::Mutex<std::collections::HashMap<K::Owned, (V, std::time::Instant)>>,
        key: &K,
    ) -> Option<V>
    where
        K: ToOwned + std::hash::Hash + Eq + ?Sized,
        K::Owned: std::hash::Hash + Eq + std::borrow::Borrow<K>,
    {
        if !self.live.load(std::sync::atomic::Ordering::Acquire) {
            return None;
        }
        let map = map.lock().expect("poisoned");
        map.get(key)
            .filter(|(_, at)| at.elapsed() < Self::TTL)
            .map(|(v, _)| v.clone())
    }

    fn put<K: std::hash::Hash + Eq, V>(
        &self,
        map: &std::sync::Mutex<std::collections::HashMap<K, (V, std::time::Instant)>>,
        key: K,
        value: V,
    ) {
        if !self.live.load(std::sync::atomic::Ordering::Acquire) {
            return;
        }
        let mut map = map.lock().expect("poisoned");
        if map.len() > 100_000 {
            map.clear();
        }
        map.insert(key, (value, std::time::Instant::now()));
    }

    pub fn clear(&self) {
        self.keys.lock().expect("poisoned").clear();
        self.projects.lock().expect("poisoned").clear();
    }

    fn set_live(&self, live: bool) {
        self.live.store(live, std::sync::atomic::Ordering::Release);
        self.clear();
    }
}

impl App {
    /// Empties the access caches here and, through NOTIFY, in every other server.
    pub async fn invalidate_access(&self) {
        self.invalidate_project_access("").await
    }

    /// The same, naming a project whose status changed: every server then closes its realtime
    /// room if the project was suspended or deleted.
    pub async fn invalidate_project_access(&self, project_id: &str) {
        self.notify_access_change(project_id).await
    }

    /// Empties the caches here and sends `payload` on [`CACHE_CHANNEL`]: a project id (its
    /// status changed), [`member_removed_payload`], or nothing.
    pub async fn notify_access_change(&self, payload: &str) {
        self.auth_cache.clear();
        match self.control.get().await {
            Ok(c) => {
                if let Err(e) = c
                    .execute("SELECT pg_notify($1, $2)", &[&CACHE_CHANNEL, &payload])
                    .await
                {
                    tracing::warn!(error = %e, "could not notify other servers of an access change");
                }
            }
            Err(e) => {
                tracing::warn!(error = %e, "could not notify other servers of an access change")
            }
        }
        self.auth_cache.clear();
    }
}

/// The NOTIFY payload announcing that `user_id` left `project_id` (ids never contain spaces).
pub fn member_removed_payload(project_id: &str, user_id: &str) -> String {
    format!("{project_id} member-removed {user_id}")
}

/// The NOTIFY payload announcing that an API key of `project_id` was deleted or rotated.
pub fn key_revoked_payload(project_id: &str, key_id: &str) -> String {
    format!("{project_id} key-revoked {key_id}")
}

impl App {
    /// Acts on a NOTIFY from another server (or this one): a project whose status changed gets
    /// its room closed if inactive; a removed member's realtime subscriptions end, unless they
    /// are a member again by now.
    async fn access_changed(self: &std::sync::Arc<Self>, payload: &str) {
        if let Some((project_id, key_id)) = payload.split_once(" key-revoked ") {
            self.realtime.key_revoked(project_id, key_id).await;
            return;
        }
        match payload.split_once(" member-removed ") {
            Some((project_id, user_id)) => {
                let still_member = match self.control.get().await {
                    Ok(c) => c
                        .query_opt(
                            "SELECT 1 FROM fluxbase.members WHERE project_id = $1 AND user_id = $2",
                            &[&project_id, &user_id],
                        )
                        .await
                        .map(|r| r.is_some())
                        .unwrap_or(false),
                    Err(_) => false,
                };
                if !still_member {
                    self.realtime.evict_user(project_id, user_id);
                }
            }
            None => self.close_room_if_inactive(payload).await,
        }
    }

    /// Closes a project's realtime room when the project is suspended or gone (a change made
    /// by another process, e.g. `fluxbase project suspend`); a project that is gone also loses
    /// its change stream here, and one created by another process (`fluxbase project create`)
    /// gets one.
    async fn close_room_if_inactive(self: &std::sync::Arc<Self>, project_id: &str) {
        match self.load_project(project_id).await {
            Ok(None) => {
                self.cdc.stop(project_id).await;
                self.sql.forget_project(project_id);
                self.realtime
                    .close_project(project_id, crate::realtime::RoomClosed::Deleted)
            }
            // Only a project this server has no stream for: a stream that ended (a lost slot, a
            // definite error) stays ended and reported.
            Ok(Some(p)) if p.status == "active" && self.cdc.status(&p.id).is_none() => {
                self.cdc.start(p.id, p.db_name)
            }
            Ok(Some(p)) if p.status == "suspended" => {
                self.sql.forget_project(project_id);
                self.realtime
                    .close_project(project_id, crate::realtime::RoomClosed::Suspended)
            }
            _ => {}
        }
    }
}

/// Keeps a `LISTEN` connection open for the cache's lifetime; the cache is used only while
/// it is up. Ends when the app is dropped.
pub async fn run_cache_listener(app: std::sync::Weak<App>) {
    use futures_util::StreamExt;
    loop {
        let Some(strong) = app.upgrade() else { return };
        let cfg = strong.cluster.pg_config(&strong.cluster.control_db);
        drop(strong);
        match cfg.connect(tokio_postgres::NoTls).await {
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
                    if let Some(a) = app.upgrade() {
                        a.auth_cache.set_live(true);
                        // Revocations notified while it was disconnected were missed: every
                        // key-bound realtime subscription is checked against its key again.
                        tokio::spawn(async move { a.realtime.recheck_keys().await });
                    }
                    loop {
                        let event =
                            tokio::time::timeout(std::time::Duration::from_secs(5), rx.recv())
                                .await;
                        let Some(a) = app.upgrade() else {
                            driver.abort();
                            return;
                        };
                        match event {
                            Ok(Some(project_id)) => {
                                a.auth_cache.clear();
                                if !project_id.is_empty() {
                                    let a = a.clone();
                                    tokio::spawn(
                                        async move { a.access_changed(&project_id).await },
                                    );
                                }
                            }
                            Ok(None) => break,
                            Err(_) if client.is_closed() => break,
                            Err(_) => {}
                        }
                    }
                }
                driver.abort();
                if let Some(a) = app.upgrade() {
                    a.auth_cache.set_live(false);
                }
                tracing::warn!(
                    "access cache listener disconnected; caching is off until it reconnects"
                );
            }
            Err(e) => tracing::debug!(error = %e, "access cache listener cannot connect"),
        }
        tokio::time::sleep(std::time::Duration::from_secs(1)).await;
    }
}
