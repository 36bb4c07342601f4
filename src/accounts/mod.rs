//! Users and login sessions: sign-up, login, logout, `me`, and the operator's password reset.
//!
//! Session tokens are 256-bit random values stored as SHA-256 hashes, expiring after
//! `session_ttl_secs`.
//!
//! ```text
//!  mod.rs       the Accounts service: users, sessions, AccountsError
//!  email.rs     one spelling per address (normalised), its shape and length
//!  password.rs  Argon2id hashes and their checks
//! ```

mod email;
mod password;

use email::validate_email;
pub use email::{check_email_length, normalize_email, MAX_EMAIL_BYTES};
pub use password::hash_password;
use password::{password_length_ok, verify_password};

use std::net::IpAddr;
use std::sync::Arc;

use chrono::{DateTime, Utc};
use serde::Serialize;

use crate::auth::ratelimit::{AccountLimits, LimitError};
use crate::auth::{AuthError, MemberRole, Principal, SESSION_PREFIX};
use crate::control::{invitations, members, sessions, users};
use crate::secrets::{random_base62, sha256};
use crate::team::PendingInvite;

#[derive(Debug, thiserror::Error)]
pub enum AccountsError {
    #[error(transparent)]
    Auth(#[from] AuthError),
    #[error("Logout needs a session token, not an API key.")]
    LogoutNeedsSession,
    #[error("email: at most {MAX_EMAIL_BYTES} bytes (got {0})")]
    EmailTooLong(usize),
    #[error("email: {0:?} is not a valid email address")]
    InvalidEmail(String),
    #[error("password: must be between 8 and 1024 bytes (UTF-8)")]
    InvalidPassword,
    #[error("displayName: at most 200 characters, without control (such as NUL), text-direction (such as U+202E) or invisible (such as U+200B) characters")]
    DisplayNameTooLong,
    #[error("An account with this email already exists.")]
    EmailTaken,
    #[error("Wrong email or password.")]
    WrongCredentials,
    #[error("no user with the email {0:?}")]
    NoSuchUser(String),
    #[error("more than one user matches {0:?}: reset them by exact id")]
    AmbiguousEmail(String),
    #[error(transparent)]
    Limited(#[from] LimitError),
    #[error(transparent)]
    Internal(#[from] anyhow::Error),
}

impl From<tokio_postgres::Error> for AccountsError {
    fn from(e: tokio_postgres::Error) -> Self {
        AccountsError::Internal(e.into())
    }
}

impl From<deadpool_postgres::PoolError> for AccountsError {
    fn from(e: deadpool_postgres::PoolError) -> Self {
        AccountsError::Internal(e.into())
    }
}

/// What a new account is made of (sign-up, and the first run's default user).
pub struct NewUser {
    pub email: String,
    pub password: String,
    pub display_name: Option<String>,
}

#[derive(Clone, Serialize, utoipa::ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct User {
    pub id: String,
    pub email: String,
    pub display_name: Option<String>,
}

impl From<users::UserRow> for User {
    fn from(u: users::UserRow) -> Self {
        User {
            id: u.id,
            email: u.email,
            display_name: u.display_name,
        }
    }
}

/// A login session just opened: its token exists only here and with the caller.
pub struct Session {
    pub user: User,
    pub token: String,
    pub expires_at: DateTime<Utc>,
}

/// A project the account belongs to, with its role there.
#[derive(Serialize, utoipa::ToSchema)]
pub struct Membership {
    pub id: String,
    pub name: String,
    pub role: MemberRole,
}

/// The account behind a session: itself, its projects and the invitations awaiting its answer.
pub struct Me {
    pub user: User,
    pub projects: Vec<Membership>,
    pub invites: Vec<PendingInvite>,
}

/// What `fluxbase user reset-password` did.
pub struct PasswordReset {
    pub user_id: String,
    pub email: String,
    pub sessions_revoked: u64,
}

/// Accounts and their sessions, on the control database.
pub struct Accounts {
    control: deadpool_postgres::Pool,
    limits: Arc<AccountLimits>,
    session_ttl_secs: u64,
    /// `invite_ttl_secs`: the invitations `me` lists are those still answerable.
    invite_ttl_secs: i32,
    /// Time as sessions expire by (the app's one clock, which tests move forward).
    clock: Arc<crate::storage::Clock>,
}

impl Accounts {
    pub fn new(
        control: deadpool_postgres::Pool,
        limits: Arc<AccountLimits>,
        session_ttl_secs: u64,
        invite_ttl_secs: i32,
        clock: Arc<crate::storage::Clock>,
    ) -> Accounts {
        Accounts {
            control,
            limits,
            session_ttl_secs,
            invite_ttl_secs,
            clock,
        }
    }

    /// Creates a user; a clash on the normalised email is refused.
    pub async fn create_user(&self, req: NewUser) -> Result<User, AccountsError> {
        check_email_length(&req.email)?;
        let email = normalize_email(&req.email);
        validate_email(&email)?;
        if !password_length_ok(&req.password) {
            return Err(AccountsError::InvalidPassword);
        }
        let display_name = req
            .display_name
            .map(|d| d.trim().to_string())
            .filter(|d| !d.is_empty());
        if display_name
            .as_ref()
            .is_some_and(|d| d.len() > 200 || crate::text::has_deceptive(d))
        {
            return Err(AccountsError::DisplayNameTooLong);
        }
        let password = req.password;
        let hash = self.limits.hash(move || hash_password(&password)).await??;
        let user = users::UserRow {
            id: format!("usr_{}", random_base62(16)),
            email,
            display_name,
        };
        let client = self.control.get().await?;
        if !users::insert(&client, &user, &hash).await? {
            return Err(AccountsError::EmailTaken);
        }
        Ok(user.into())
    }

    /// A new session for `user`.
    async fn open_session(&self, user: User) -> Result<Session, AccountsError> {
        let token = format!("{SESSION_PREFIX}{}", random_base62(43));
        let expires_at = self.clock.now() + chrono::Duration::seconds(self.session_ttl_secs as i64);
        let client = self.control.get().await?;
        sessions::insert(&client, &sha256(token.as_bytes()), &user.id, expires_at).await?;
        sessions::purge_expired(&client).await?;
        Ok(Session {
            user,
            token,
            expires_at,
        })
    }

    /// `POST /api/auth/signup`, counted against the client's address.
    pub async fn signup(
        &self,
        req: NewUser,
        client: Option<IpAddr>,
    ) -> Result<Session, AccountsError> {
        check_email_length(&req.email)?;
        self.limits.attempt_from(client)?;
        let user = self.create_user(req).await?;
        self.open_session(user).await
    }

    /// `POST /api/auth/login`, counted against the client's address; an account with too many
    /// recent failures is refused before its password is checked.
    pub async fn login(
        &self,
        email: &str,
        password: String,
        client: Option<IpAddr>,
    ) -> Result<Session, AccountsError> {
        check_email_length(email)?;
        self.limits.attempt_from(client)?;
        let email = normalize_email(email);
        self.limits.login_allowed(&email, client)?;
        let checked = async {
            let db = self.control.get().await?;
            let found = users::with_password_by_email(&db, &email).await?;
            drop(db);
            let (user, hash) = match found {
                Some((user, hash)) => (Some(user), Some(hash)),
                None => (None, None),
            };
            let verified = self
                .limits
                .hash(move || verify_password(&password, hash.as_deref()))
                .await?;
            Ok::<_, AccountsError>((verified, user))
        }
        .await;
        let user = match checked {
            Ok((false, _)) => return Err(AccountsError::WrongCredentials),
            Ok((true, user)) => {
                self.limits.login_not_failed(&email, client);
                user
            }
            Err(e) => {
                self.limits.login_not_failed(&email, client);
                return Err(e);
            }
        };
        let user = user.expect("verified users exist");
        self.open_session(user.into()).await
    }

    /// Ends the session of the token used.
    pub async fn logout(&self, principal: &Principal) -> Result<(), AccountsError> {
        let Principal::Session { token_hash, .. } = principal else {
            return Err(AccountsError::LogoutNeedsSession);
        };
        let client = self.control.get().await?;
        sessions::delete(&client, token_hash).await?;
        Ok(())
    }

    /// The session's account, its projects and the invitations awaiting its answer.
    pub async fn me(&self, principal: &Principal) -> Result<Me, AccountsError> {
        let user_id = principal.require_session()?;
        let client = self.control.get().await?;
        let user = users::get(&client, user_id).await?.into();
        let projects = members::of_user(&client, user_id)
            .await?
            .into_iter()
            .map(|m| Membership {
                id: m.project_id,
                name: m.project_name,
                role: m.role,
            })
            .collect();
        let invites = invitations::pending_for(&client, user_id, self.invite_ttl_secs)
            .await?
            .into_iter()
            .map(PendingInvite::from)
            .collect();
        Ok(Me {
            user,
            projects,
            invites,
        })
    }

    /// Sets the password of the user with `email` (any case) and revokes all their sessions,
    /// so a session opened with the old password is refused from its next request. The caller
    /// empties the access caches (`fluxbase user reset-password`).
    pub async fn reset_password(
        &self,
        email: &str,
        password: &str,
    ) -> Result<PasswordReset, AccountsError> {
        if !password_length_ok(password) {
            return Err(AccountsError::InvalidPassword);
        }
        let owned = password.to_string();
        let hash = tokio::task::spawn_blocking(move || hash_password(&owned))
            .await
            .map_err(anyhow::Error::from)??;
        let email = normalize_email(email);
        let mut client = self.control.get().await?;
        let tx = client.transaction().await?;
        let matches = users::lock_by_email(&tx, &email).await?;
        let (user_id, email) = match <[_; 1]>::try_from(matches) {
            Ok([found]) => found,
            Err(v) if v.is_empty() => return Err(AccountsError::NoSuchUser(email)),
            Err(_) => return Err(AccountsError::AmbiguousEmail(email)),
        };
        users::set_password(&tx, &user_id, &hash).await?;
        let sessions_revoked = sessions::delete_for_user(&tx, &user_id).await?;
        tx.commit().await?;
        Ok(PasswordReset {
            user_id,
            email,
            sessions_revoked,
        })
    }
}
