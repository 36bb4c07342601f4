//! Users and login sessions: sign-up, login, logout, `me`, and the operator's password reset.
//!
//! Passwords are hashed with Argon2id (RFC 9106 defaults of the `argon2` crate) on a blocking
//! thread; session tokens are 256-bit random values stored as SHA-256 hashes, expiring after
//! `session_ttl_secs`.
//!
//! Email addresses are normalised wherever they come in (sign-up, login, invitations): Unicode
//! NFKC, then lowercase ([`normalize_email`]). Look-alike spellings — the Kelvin sign `\u{212A}`
//! for `K`, fullwidth letters — are then the same address, so one of them cannot sign up beside
//! the other, log in as it, or receive its invitations; the stored address is the normalised one
//! and the unique index on `lower(email)` refuses a second account for it.

use std::net::IpAddr;
use std::sync::Arc;

use argon2::password_hash::{Output, ParamsString, PasswordHash, SaltString};
use argon2::Argon2;
use chrono::{DateTime, Utc};
use serde::Serialize;

use crate::auth::{AuthError, MemberRole, Principal, SESSION_PREFIX};
use crate::control::{invitations, members, sessions, users};
use crate::ratelimit::{AccountLimits, LimitError};
use crate::secrets::{random_base62, random_bytes, sha256};
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
    #[error("password: must be between 8 and 1024 characters")]
    InvalidPassword,
    #[error("displayName: at most 200 characters")]
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

/// The one spelling of an email address: trimmed, Unicode NFKC, lowercase (NFKC again, as
/// lowercasing can leave a compatibility character behind).
pub fn normalize_email(raw: &str) -> String {
    use unicode_normalization::UnicodeNormalization;
    let folded = raw.trim().nfkc().collect::<String>().to_lowercase();
    folded.nfkc().collect::<String>().trim().to_string()
}

/// The longest email address accepted anywhere (RFC 5321's path limit), in bytes.
pub const MAX_EMAIL_BYTES: usize = 254;

/// Refuses an email field longer than [`MAX_EMAIL_BYTES`] (surrounding blanks aside) before it
/// is normalised, looked up or counted anywhere.
pub fn check_email_length(raw: &str) -> Result<(), AccountsError> {
    if raw.trim().len() > MAX_EMAIL_BYTES {
        return Err(AccountsError::EmailTooLong(raw.trim().len()));
    }
    Ok(())
}

fn validate_email(email: &str) -> Result<(), AccountsError> {
    let ok = email.len() <= 254
        && !email.chars().any(|c| c.is_whitespace() || c.is_control())
        && matches!(email.split_once('@'), Some((l, d)) if !l.is_empty() && d.contains('.') && !d.starts_with('.') && !d.ends_with('.') && !d.contains('@'));
    if ok {
        Ok(())
    } else {
        Err(AccountsError::InvalidEmail(email.to_string()))
    }
}

fn password_length_ok(password: &str) -> bool {
    password.chars().count() >= 8 && password.len() <= 1024
}

thread_local! {
    /// Argon2's working memory (~19 MiB with the default parameters), allocated once per
    /// hashing thread and reused: a fresh allocation per hash made the allocator keep a new
    /// 19 MiB region resident after most logins (see [`crate::ratelimit`]).
    static ARGON2_MEMORY: std::cell::RefCell<Vec<argon2::Block>> =
        const { std::cell::RefCell::new(Vec::new()) };
}

/// Argon2 of `password` and `salt` into `out`, in this thread's reused working memory.
fn argon2_into(argon: &Argon2, password: &[u8], salt: &[u8], out: &mut [u8]) -> anyhow::Result<()> {
    ARGON2_MEMORY.with(|memory| {
        let mut memory = memory.borrow_mut();
        let blocks = argon.params().block_count();
        if memory.len() < blocks {
            memory.resize(blocks, argon2::Block::default());
        }
        argon
            .hash_password_into_with_memory(password, salt, out, &mut memory[..blocks])
            .map_err(|e| anyhow::anyhow!("argon2: {e}"))
    })
}

/// Hashes a password into a PHC string (`$argon2id$v=19$m=19456,t=2,p=1$…`). Slow and
/// memory-hard: run it through [`crate::ratelimit::AccountLimits::hash`].
pub fn hash_password(password: &str) -> anyhow::Result<String> {
    let argon = Argon2::default();
    let salt_bytes = random_bytes::<16>();
    let salt = SaltString::encode_b64(&salt_bytes).map_err(|e| anyhow::anyhow!("salt: {e}"))?;
    let mut out = [0u8; argon2::Params::DEFAULT_OUTPUT_LEN];
    argon2_into(&argon, password.as_bytes(), &salt_bytes, &mut out)?;
    let phc = PasswordHash {
        algorithm: argon2::Algorithm::Argon2id.ident(),
        version: Some(argon2::Version::V0x13.into()),
        params: ParamsString::try_from(argon.params()).map_err(|e| anyhow::anyhow!("{e}"))?,
        salt: Some(salt.as_salt()),
        hash: Some(Output::new(&out).map_err(|e| anyhow::anyhow!("{e}"))?),
    };
    Ok(phc.to_string())
}

/// Whether `password` matches the PHC string `stored` (any Argon2 variant and parameters).
fn password_matches(password: &str, stored: &str) -> anyhow::Result<bool> {
    let err = |e: argon2::password_hash::Error| anyhow::anyhow!("{e}");
    let phc = PasswordHash::new(stored).map_err(err)?;
    let params = argon2::Params::try_from(&phc).map_err(err)?;
    let algorithm = argon2::Algorithm::try_from(phc.algorithm).map_err(err)?;
    let version = phc
        .version
        .map(argon2::Version::try_from)
        .transpose()
        .map_err(|e| anyhow::anyhow!("{e}"))?
        .unwrap_or_default();
    let (Some(salt), Some(expected)) = (phc.salt, phc.hash) else {
        return Ok(false);
    };
    let mut salt_buf = [0u8; 64];
    let salt = salt.decode_b64(&mut salt_buf).map_err(err)?;
    let mut out = vec![0u8; expected.len()];
    argon2_into(
        &Argon2::new(algorithm, version, params),
        password.as_bytes(),
        salt,
        &mut out,
    )?;
    // `Output`'s equality is constant-time.
    Ok(Output::new(&out).map_err(err)? == expected)
}

/// Checks a password against a stored hash (as slow as [`hash_password`]).
fn verify_password(password: &str, hash: Option<&str>) -> bool {
    // Unknown users are checked against a fixed hash so both paths take the same time.
    const DUMMY: &str = "$argon2id$v=19$m=19456,t=2,p=1$c29tZXNhbHRzb21lc2FsdA$2k9Ic3Mdg1xGv+xNkNu3fvWXyLBzKKWmXtYRtRbX3Co";
    let ok = password_matches(password, hash.unwrap_or(DUMMY)).unwrap_or(false);
    ok && hash.is_some()
}

/// Accounts and their sessions, on the control database.
pub struct Accounts {
    control: deadpool_postgres::Pool,
    limits: Arc<AccountLimits>,
    session_ttl_secs: u64,
}

impl Accounts {
    pub fn new(
        control: deadpool_postgres::Pool,
        limits: Arc<AccountLimits>,
        session_ttl_secs: u64,
    ) -> Accounts {
        Accounts {
            control,
            limits,
            session_ttl_secs,
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
        if display_name.as_ref().is_some_and(|d| d.len() > 200) {
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
        let expires_at = Utc::now() + chrono::Duration::seconds(self.session_ttl_secs as i64);
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
        let invites = invitations::pending_for(&client, user_id)
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn emails_are_checked_for_shape() {
        assert!(validate_email("a@b.co").is_ok());
        for bad in [
            "", "a", "a@b", "@b.co", "a b@c.de", "a@.b", "a@b.", "a@b@c.d",
        ] {
            assert!(validate_email(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn look_alike_addresses_normalise_to_one() {
        for spelling in [
            "kate@example.com",
            "\u{212A}ate@example.com",
            " KATE@Example.COM ",
            "\u{FF4B}\u{FF41}\u{FF54}\u{FF45}@example.com",
        ] {
            assert_eq!(
                normalize_email(spelling),
                "kate@example.com",
                "{spelling:?}"
            );
        }
        assert_ne!(normalize_email("katie@example.com"), "kate@example.com");
    }

    #[test]
    fn password_hashes_verify_and_differ_per_salt() {
        let h1 = hash_password("correct horse").unwrap();
        let h2 = hash_password("correct horse").unwrap();
        assert!(h1.starts_with("$argon2id$"));
        assert_ne!(h1, h2);
        assert!(verify_password("correct horse", Some(&h1)));
        assert!(!verify_password("wrong horse", Some(&h1)));
        assert!(!verify_password("correct horse", None));
    }

    #[test]
    fn hashes_are_compatible_with_the_argon2_crates_own() {
        use argon2::password_hash::{PasswordHasher, PasswordVerifier};
        let ours = hash_password("correct horse").unwrap();
        let parsed = PasswordHash::new(&ours).unwrap();
        assert!(Argon2::default()
            .verify_password(b"correct horse", &parsed)
            .is_ok());
        let salt = SaltString::encode_b64(b"sixteen byte salt").unwrap();
        let theirs = Argon2::default()
            .hash_password(b"correct horse", &salt)
            .unwrap()
            .to_string();
        assert!(verify_password("correct horse", Some(&theirs)));
        assert!(!verify_password("correct horsf", Some(&theirs)));
    }
}
