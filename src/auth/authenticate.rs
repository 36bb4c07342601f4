//! The [`Auth`] service: resolves a bearer token to a [`Principal`] (rate-limited per caller)
//! and a principal plus a project to an [`Access`], through the cache when it is live.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Instant;

use super::cache::{AccessChange, AuthCache, CachedKey, CACHE_CHANNEL};
use super::{is_project_id, Access, AuthError, MemberRole, Principal, Scope};
use super::{KEY_PREFIX, SESSION_PREFIX};
use crate::auth::ratelimit::RateLimiter;
use crate::control;
use crate::projects::{Project, ProjectStatus};
use crate::secrets::sha256;

pub struct Auth {
    control: deadpool_postgres::Pool,
    /// The per-key request limit (shared with realtime's token budgets).
    rate: Arc<RateLimiter>,
    /// The per-session request limit (members, the dashboard).
    session_rate: Arc<RateLimiter>,
    cache: AuthCache,
    /// Time as login sessions expire by (the app's one clock, which tests move forward).
    clock: Arc<crate::storage::Clock>,
    /// When each API key's `last_used_at` was last written (written at most once a minute).
    key_touched: Mutex<HashMap<String, Instant>>,
    /// Bearer tokens that resolved to nothing, per client address (`auth_failures_per_address`).
    failures: RateLimiter,
}

impl Auth {
    pub fn new(
        control: deadpool_postgres::Pool,
        rate: Arc<RateLimiter>,
        session_rate: RateLimiter,
        clock: Arc<crate::storage::Clock>,
        failures: RateLimiter,
    ) -> Auth {
        Auth {
            control,
            rate,
            session_rate: Arc::new(session_rate),
            clock,
            cache: AuthCache::default(),
            key_touched: Mutex::new(HashMap::new()),
            failures,
        }
    }

    /// [`Auth::authenticate`] for a request from `client` (unknown: not limited by address): an
    /// address whose bearer tokens resolved to nothing `auth_failures_per_address` times in the
    /// window gets 429 before any lookup, so guessing keys or sessions costs the control
    /// database nothing past the limit.
    pub async fn authenticate_from(
        &self,
        authorization: Option<&str>,
        client: Option<std::net::IpAddr>,
    ) -> Result<Principal, AuthError> {
        let address = client.map(|ip| crate::auth::ratelimit::address_key(ip).to_string());
        if let Some(a) = &address {
            self.failures.peek(a)?;
        }
        let result = self.authenticate(authorization).await;
        if let (
            Some(a),
            Err(AuthError::InvalidKey | AuthError::InvalidSession | AuthError::SessionExpired),
        ) = (&address, &result)
        {
            self.failures.record(a);
        }
        result
    }

    /// The per-session request limit (cluster mode shares it with the other nodes).
    pub fn session_rate(&self) -> &Arc<RateLimiter> {
        &self.session_rate
    }

    pub fn cache(&self) -> &AuthCache {
        &self.cache
    }

    /// Resolves the bearer token of a request and applies the caller's rate limit.
    pub async fn authenticate(&self, authorization: Option<&str>) -> Result<Principal, AuthError> {
        let header = authorization.ok_or(AuthError::MissingCredential)?.trim();
        let (scheme, token) = header.split_once(' ').ok_or(AuthError::MissingCredential)?;
        if !scheme.eq_ignore_ascii_case("bearer") {
            return Err(AuthError::MissingCredential);
        }
        let token = token.trim();
        let hash = sha256(token.as_bytes());
        let principal = if token.starts_with(KEY_PREFIX) {
            let key = match self.cache.key(&hash) {
                Some(k) => k,
                None => {
                    let read_at = self.cache.generation();
                    let client = self.control.get().await?;
                    let grant = control::api_keys::live_by_hash(&client, &hash)
                        .await?
                        .ok_or(AuthError::InvalidKey)?;
                    let key = CachedKey {
                        key_id: grant.id,
                        project_id: grant.project_id,
                        scope: grant.scope,
                    };
                    self.cache.put_key(hash.clone(), key.clone(), read_at);
                    key
                }
            };
            self.touch_key(&key.key_id);
            Principal::Key {
                key_id: key.key_id,
                project_id: key.project_id,
                scope: key.scope,
                key_hash: hash,
            }
        } else if token.starts_with(SESSION_PREFIX) {
            let client = self.control.get().await?;
            let (user_id, expires_at) = control::sessions::by_hash(&client, &hash)
                .await?
                .ok_or(AuthError::InvalidSession)?;
            if expires_at <= self.clock.now() {
                return Err(AuthError::SessionExpired);
            }
            Principal::Session {
                user_id,
                token_hash: hash,
                expires_at: expires_at.timestamp(),
            }
        } else {
            return Err(AuthError::MissingCredential);
        };
        let caller = match &principal {
            Principal::Key { key_id, .. } => format!("key:{key_id}"),
            Principal::Session { token_hash, .. } => format!("session:{}", hex::encode(token_hash)),
        };
        match principal {
            Principal::Key { .. } => self.rate.check(&caller)?,
            Principal::Session { .. } => self.session_rate.check(&caller)?,
        }
        Ok(principal)
    }

    /// Writes `last_used_at` at most once a minute per key, off the request path.
    fn touch_key(&self, key_id: &str) {
        let now = Instant::now();
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
                let _ = control::api_keys::touch(&client, &key_id).await;
            }
        });
    }

    /// The SHA-256 of the current secret of `project_id`'s live API key `key_id` (through the
    /// cache), or `None`: deleted, or not that project's.
    pub async fn key_secret(
        &self,
        project_id: &str,
        key_id: &str,
    ) -> Result<Option<Vec<u8>>, AuthError> {
        let entry = format!("{project_id}/{key_id}");
        if let Some(hash) = self.cache.key_secret(&entry) {
            return Ok(Some(hash));
        }
        let read_at = self.cache.generation();
        let client = self.control.get().await?;
        let live = control::api_keys::live_secret(&client, project_id, key_id).await?;
        Ok(live.map(|(hash, _)| {
            self.cache.put_key_secret(entry, hash.clone(), read_at);
            hash
        }))
    }

    /// Whether `user_id` is a member of `project_id` (through the cache, which every
    /// membership change empties): what a signed URL made for a member is checked by.
    pub async fn is_member_cached(
        &self,
        project_id: &str,
        user_id: &str,
    ) -> Result<bool, AuthError> {
        let entry = format!("{project_id}/{user_id}");
        if self.cache.member(&entry) {
            return Ok(true);
        }
        let read_at = self.cache.generation();
        let client = self.control.get().await?;
        let member = control::members::role(&client, project_id, user_id)
            .await?
            .is_some();
        if member {
            self.cache.put_member(entry, read_at);
        }
        Ok(member)
    }

    /// The project `project_id` (through the cache), or `None`.
    pub async fn load_project(&self, project_id: &str) -> Result<Option<Project>, AuthError> {
        if !is_project_id(project_id) {
            return Ok(None);
        }
        if let Some(p) = self.cache.project(project_id) {
            return Ok(Some(p));
        }
        let read_at = self.cache.generation();
        let client = self.control.get().await?;
        let project = control::projects::get(&client, project_id).await?;
        if let Some(p) = &project {
            self.cache.put_project(p.clone(), read_at);
        }
        Ok(project)
    }

    /// Whether `project_id` is gone from the control database now (its cached row ignored):
    /// what an operation that lost its project's bucket or database midway answers by.
    pub async fn project_gone(&self, project_id: &str) -> Result<bool, AuthError> {
        let client = self.control.get().await?;
        Ok(control::projects::get(&client, project_id).await?.is_none())
    }

    /// What `principal` may do with `project_id`; refuses suspended projects.
    pub async fn project_access(
        &self,
        principal: &Principal,
        project_id: &str,
    ) -> Result<Access, AuthError> {
        let project = self
            .load_project(project_id)
            .await?
            .ok_or(AuthError::ProjectNotFound)?;
        let access = match principal {
            Principal::Key {
                project_id: key_project,
                scope,
                ..
            } => {
                if key_project != &project.id {
                    return Err(AuthError::KeyOfAnotherProject);
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
                let role = control::members::role(&client, &project.id, user_id)
                    .await?
                    // Not a member: the project is not revealed to exist.
                    .ok_or(AuthError::ProjectNotFound)?;
                Access {
                    db_role: role.db_role(),
                    admin: role == MemberRole::Admin,
                    principal: principal.clone(),
                    member_role: Some(role),
                    project,
                }
            }
        };
        if access.project.status == ProjectStatus::Suspended {
            return Err(AuthError::ProjectSuspended);
        }
        Ok(access)
    }

    /// Whether `user_id` is a member of `project_id` now.
    pub async fn is_member(&self, project_id: &str, user_id: &str) -> Result<bool, AuthError> {
        let client = self.control.get().await?;
        Ok(control::members::role(&client, project_id, user_id)
            .await?
            .is_some())
    }

    /// Empties the access caches here and, through NOTIFY on [`CACHE_CHANNEL`], in every
    /// other server, which then act on `change` (see [`AccessChange`]).
    pub async fn notify_access_change(&self, change: &AccessChange) {
        self.cache.clear();
        let payload = change.payload();
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
        self.cache.clear();
    }
}
