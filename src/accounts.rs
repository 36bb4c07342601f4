//! Users and login sessions: sign-up, login, logout, `me`.
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

use argon2::password_hash::{Output, ParamsString, PasswordHash, SaltString};
use argon2::Argon2;
use chrono::{DateTime, Utc};
use serde::Deserialize;
use serde_json::{json, Value};
use std::net::IpAddr;
use warp::http::StatusCode;

use crate::api::error::{ApiError, ApiResult};
use crate::app::App;
use crate::auth::{Principal, SESSION_PREFIX};
use crate::secrets::{random_base62, random_bytes, sha256};

#[derive(Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct SignupRequest {
    pub email: String,
    pub password: String,
    pub display_name: Option<String>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LoginRequest {
    pub email: String,
    pub password: String,
}

pub struct User {
    pub id: String,
    pub email: String,
    pub display_name: Option<String>,
}

impl User {
    pub fn json(&self) -> Value {
        json!({ "id": self.id, "email": self.email, "displayName": self.display_name })
    }
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
pub fn check_email_length(raw: &str) -> ApiResult<()> {
    if raw.trim().len() > MAX_EMAIL_BYTES {
        return Err(ApiError::BadRequest(format!(
            "email: at most {MAX_EMAIL_BYTES} bytes (got {})",
            raw.trim().len()
        )));
    }
    Ok(())
}

fn validate_email(email: &str) -> ApiResult<()> {
    let ok = email.len() <= 254
        && !email.chars().any(|c| c.is_whitespace() || c.is_control())
        && matches!(email.split_once('@'), Some((l, d)) if !l.is_empty() && d.contains('.') && !d.starts_with('.') && !d.ends_with('.') && !d.contains('@'));
    if ok {
        Ok(())
    } else {
        Err(ApiError::BadRequest(format!(
            "email: {email:?} is not a valid email address"
        )))
    }
}

fn validate_password(password: &str) -> ApiResult<()> {
    if password.chars().count() < 8 || password.len() > 1024 {
        return Err(ApiError::BadRequest(
            "password: must be between 8 and 1024 characters".into(),
        ));
    }
    Ok(())
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

impl App {
    /// Creates a user; a clash on the normalised email is a 409.
    pub async fn create_user(&self, req: SignupRequest) -> ApiResult<User> {
        check_email_length(&req.email)?;
        let email = normalize_email(&req.email);
        validate_email(&email)?;
        validate_password(&req.password)?;
        let display_name = req
            .display_name
            .map(|d| d.trim().to_string())
            .filter(|d| !d.is_empty());
        if display_name.as_ref().is_some_and(|d| d.len() > 200) {
            return Err(ApiError::BadRequest(
                "displayName: at most 200 characters".into(),
            ));
        }
        let password = req.password;
        let hash = self
            .account_limits
            .hash(move || hash_password(&password))
            .await??;
        let id = format!("usr_{}", random_base62(16));
        let client = self.control.get().await?;
        let inserted = client
            .execute(
                "INSERT INTO fluxbase.users (id, email, display_name, password_hash)
                 VALUES ($1, $2, $3, $4) ON CONFLICT DO NOTHING",
                &[&id, &email, &display_name, &hash],
            )
            .await?;
        if inserted == 0 {
            return Err(ApiError::Conflict(
                "An account with this email already exists.".into(),
            ));
        }
        Ok(User {
            id,
            email,
            display_name,
        })
    }

    /// A new session for `user_id`: (token, expiry).
    pub async fn create_session(&self, user_id: &str) -> ApiResult<(String, DateTime<Utc>)> {
        let token = format!("{SESSION_PREFIX}{}", random_base62(43));
        let expires = Utc::now() + chrono::Duration::seconds(self.config.session_ttl_secs as i64);
        let client = self.control.get().await?;
        client
            .execute(
                "INSERT INTO fluxbase.sessions (token_hash, user_id, expires_at) VALUES ($1, $2, $3)",
                &[&sha256(token.as_bytes()), &user_id, &expires],
            )
            .await?;
        client
            .execute(
                "DELETE FROM fluxbase.sessions WHERE expires_at < now() - interval '7 days'",
                &[],
            )
            .await?;
        Ok((token, expires))
    }

    pub async fn load_user(&self, user_id: &str) -> ApiResult<User> {
        let client = self.control.get().await?;
        let row = client
            .query_one(
                "SELECT id, email, display_name FROM fluxbase.users WHERE id = $1",
                &[&user_id],
            )
            .await?;
        Ok(User {
            id: row.get(0),
            email: row.get(1),
            display_name: row.get(2),
        })
    }

    /// `POST /api/auth/signup`, counted against the client's address.
    pub async fn signup(
        &self,
        req: SignupRequest,
        client: Option<IpAddr>,
    ) -> ApiResult<(StatusCode, Value)> {
        check_email_length(&req.email)?;
        self.account_limits.attempt_from(client)?;
        let user = self.create_user(req).await?;
        let (token, expires_at) = self.create_session(&user.id).await?;
        Ok((
            StatusCode::CREATED,
            json!({ "success": true, "user": user.json(), "token": token, "expiresAt": expires_at }),
        ))
    }

    /// `POST /api/auth/login`, counted against the client's address; an account with too many
    /// recent failures is refused before its password is checked.
    pub async fn login(
        &self,
        req: LoginRequest,
        client: Option<IpAddr>,
    ) -> ApiResult<(StatusCode, Value)> {
        check_email_length(&req.email)?;
        self.account_limits.attempt_from(client)?;
        let email = normalize_email(&req.email);
        self.account_limits.login_allowed(&email, client)?;
        let checked = async {
            let db = self.control.get().await?;
            let row = db
                .query_opt(
                    "SELECT id, email, display_name, password_hash FROM fluxbase.users
                     WHERE lower(email) = lower($1)",
                    &[&email],
                )
                .await?;
            drop(db);
            let hash = row.as_ref().map(|r| r.get::<_, String>(3));
            let password = req.password;
            let verified = self
                .account_limits
                .hash(move || verify_password(&password, hash.as_deref()))
                .await?;
            Ok::<_, ApiError>((verified, row))
        }
        .await;
        let row = match checked {
            Ok((false, _)) => {
                return Err(ApiError::AuthRequired("Wrong email or password.".into()))
            }
            Ok((true, row)) => {
                self.account_limits.login_not_failed(&email, client);
                row
            }
            Err(e) => {
                self.account_limits.login_not_failed(&email, client);
                return Err(e);
            }
        };
        let row = row.expect("verified users exist");
        let user = User {
            id: row.get(0),
            email: row.get(1),
            display_name: row.get(2),
        };
        let (token, expires_at) = self.create_session(&user.id).await?;
        Ok((
            StatusCode::OK,
            json!({ "success": true, "user": user.json(), "token": token, "expiresAt": expires_at }),
        ))
    }

    pub async fn logout(&self, principal: &Principal) -> ApiResult<(StatusCode, Value)> {
        let Principal::Session { token_hash, .. } = principal else {
            return Err(ApiError::ScopeMismatch(
                "Logout needs a session token, not an API key.".into(),
            ));
        };
        let client = self.control.get().await?;
        client
            .execute(
                "DELETE FROM fluxbase.sessions WHERE token_hash = $1",
                &[token_hash],
            )
            .await?;
        Ok((StatusCode::OK, json!({ "success": true })))
    }

    pub async fn me(&self, principal: &Principal) -> ApiResult<(StatusCode, Value)> {
        let user_id = principal.require_session()?;
        let user = self.load_user(user_id).await?;
        let client = self.control.get().await?;
        let projects: Vec<Value> = client
            .query(
                "SELECT p.id, p.name, m.role FROM fluxbase.members m
                 JOIN fluxbase.projects p ON p.id = m.project_id
                 WHERE m.user_id = $1 ORDER BY p.created_at",
                &[&user_id],
            )
            .await?
            .iter()
            .map(|r| json!({ "id": r.get::<_, String>(0), "name": r.get::<_, String>(1), "role": r.get::<_, String>(2) }))
            .collect();
        drop(client);
        let invites = self.pending_invites_for(user_id).await?;
        Ok((
            StatusCode::OK,
            json!({ "success": true, "user": user.json(), "projects": projects, "invites": invites }),
        ))
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
