//! Realtime tokens (`POST /api/realtime/token`): short-lived, HMAC-signed credentials a
//! browser subscribes with, bound to a project and optionally to an end user (`authUid`) and a
//! table list. A token minted with an API key carries the key's id and a fingerprint of its
//! secret, one minted with a session the member's id: it is refused once the key is deleted or
//! rotated, or the member removed (see [`super::revoke`]).

use serde::{Deserialize, Serialize};

use super::{Realtime, RealtimeError};
use crate::auth::{Access, DbRole, Principal};
use crate::secrets::Secrets;

/// Why `authUid` is refused for a MySQL project (as `/api/execute-sql` refuses it): without
/// row-level security a subscriber named for one end user would receive every user's rows.
pub(super) const MYSQL_NO_AUTH_UID: &str = "authUid: row-level security does not exist on \
     MySQL projects (engine \"mysql\"): a subscription for one end user would receive every \
     user's rows; subscribe without authUid";

pub(super) const TOKEN_PREFIX: &str = "flx_rt_";

/// Claims of a realtime token.
#[derive(Serialize, Deserialize)]
pub(super) struct Claims {
    /// Project id.
    pub(super) p: String,
    /// authUid, when the token acts for an end user.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub(super) u: Option<String>,
    /// Tables the token may see.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub(super) t: Option<Vec<String>>,
    /// Expiry, Unix seconds.
    pub(super) e: i64,
    /// The member who obtained the token (a session's user): the token is refused once they
    /// are no longer a member.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub(super) m: Option<String>,
    /// The API key that minted the token, and the fingerprint of its secret then: the token is
    /// refused once the key is deleted or rotated.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub(super) k: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub(super) f: Option<String>,
    /// The session that obtained the token (a fingerprint of it): the token is refused once
    /// that session ends (logout, a password reset).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub(super) s: Option<String>,
}

/// `POST /api/realtime/token`'s body.
#[derive(Deserialize, utoipa::ToSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct TokenRequest {
    pub project_id: String,
    /// The end user the token acts as (`auth.uid()`); a session's token acts as its own user.
    pub auth_uid: Option<String>,
    /// The only tables whose changes the token's subscriptions receive.
    pub tables: Option<Vec<String>>,
    /// Seconds; default 3600, at most 86400.
    pub expires_in: Option<i64>,
}

/// A minted token and when it expires.
#[derive(Serialize, utoipa::ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct TokenResponse {
    pub success: bool,
    /// `flx_rt_…`: pass it as `token` in a `subscribe` message.
    pub token: String,
    #[schema(value_type = String, format = DateTime)]
    pub expires_at: chrono::DateTime<chrono::Utc>,
}

/// The instance's key for realtime tokens (derived from its secret).
pub(super) fn key(secrets: &Secrets) -> ring::hmac::Key {
    ring::hmac::Key::new(
        ring::hmac::HMAC_SHA256,
        secrets.derive("realtime-token").as_bytes(),
    )
}

fn b64url(data: &[u8]) -> String {
    use base64::Engine;
    base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(data)
}

impl Realtime {
    /// A fingerprint of an API key's secret (from its SHA-256): changes when the key is rotated,
    /// and says nothing about the secret (an HMAC under the instance's realtime key).
    pub(super) fn key_fingerprint(&self, key_hash: &[u8]) -> String {
        let tag = ring::hmac::sign(
            &self.token_key,
            &[b"api-key:".as_slice(), key_hash].concat(),
        );
        hex::encode(&tag.as_ref()[..12])
    }

    /// A fingerprint of a login session (from its token's SHA-256), as for keys: the same on
    /// every server of the instance, and says nothing about the token.
    pub fn session_fingerprint(&self, token_hash: &[u8]) -> String {
        let tag = ring::hmac::sign(
            &self.token_key,
            &[b"session:".as_slice(), token_hash].concat(),
        );
        hex::encode(&tag.as_ref()[..12])
    }

    /// Whether `user_id` still has the session whose fingerprint is `session` (unexpired).
    pub(super) async fn session_live(
        &self,
        user_id: &str,
        session: &str,
    ) -> Result<bool, RealtimeError> {
        let client = self.control.get().await?;
        let live =
            crate::control::sessions::live_of_user(&client, user_id, self.clock.now()).await?;
        Ok(live
            .iter()
            .any(|hash| self.session_fingerprint(hash) == session))
    }

    /// `POST /api/realtime/token`: a short-lived token a browser can subscribe with.
    pub async fn token(
        &self,
        access: &Access,
        req: TokenRequest,
    ) -> Result<TokenResponse, RealtimeError> {
        let ttl = req.expires_in.unwrap_or(3600);
        if !(1..=86_400).contains(&ttl) {
            return Err(RealtimeError::BadRequest(
                "expiresIn: between 1 and 86400 seconds".into(),
            ));
        }
        // As a webhook's: a token is carried in every subscribe (red team rt9 LOW 4: 100,000
        // names made a 1.2 MB token that no socket could send).
        if let Some(tables) = &req.tables {
            use crate::webhooks::{MAX_TABLES, MAX_TABLE_NAME_BYTES};
            if !crate::webhooks::tables_within_bounds(tables) {
                return Err(RealtimeError::BadRequest(format!(
                    "tables: at most {MAX_TABLES} names, each 1 to {MAX_TABLE_NAME_BYTES} bytes"
                )));
            }
        }
        if let Some(uid) = &req.auth_uid {
            if access.project.engine == crate::projects::Engine::Mysql {
                return Err(RealtimeError::BadRequest(MYSQL_NO_AUTH_UID.into()));
            }
            crate::rls::valid_uid(uid, "authUid")
                .map_err(|e| RealtimeError::BadRequest(e.to_string()))?;
            if access.principal.user_id().is_some_and(|me| me != uid) {
                return Err(RealtimeError::ScopeMismatch(
                    "A session's token acts as its own user; authUid is for API keys.".into(),
                ));
            }
        }
        let mut expires = self.clock.now() + chrono::Duration::seconds(ttl);
        // A session's token ends with the session at the latest (red team rt13: one minted a
        // minute before its session expired kept its subscriptions for a day).
        if let Principal::Session { expires_at, .. } = &access.principal {
            if let Some(session_end) = chrono::DateTime::from_timestamp(*expires_at, 0) {
                expires = expires.min(session_end);
            }
        }
        let (k, f) = match &access.principal {
            Principal::Key {
                key_id, key_hash, ..
            } => {
                // Bound to the secret presented, and only while it is the key's secret: a
                // request authenticated just before a rotation (or a deletion) committed mints
                // nothing that outlives it (red team rt15: such a token subscribed for a day).
                let current = self.current_key_hash(&access.project.id, key_id).await?;
                if current.as_deref() != Some(key_hash.as_slice()) {
                    return Err(RealtimeError::AuthRequired(
                        "Invalid or revoked API key.".into(),
                    ));
                }
                (Some(key_id.clone()), Some(self.key_fingerprint(key_hash)))
            }
            Principal::Session { .. } => (None, None),
        };
        let s = match &access.principal {
            Principal::Session { token_hash, .. } => Some(self.session_fingerprint(token_hash)),
            Principal::Key { .. } => None,
        };
        let claims = Claims {
            p: access.project.id.clone(),
            u: req.auth_uid,
            t: req.tables,
            e: expires.timestamp(),
            m: access.principal.user_id().map(str::to_string),
            k,
            f,
            s,
        };
        let body = b64url(serde_json::to_string(&claims).expect("claims").as_bytes());
        let sig = ring::hmac::sign(&self.token_key, body.as_bytes());
        let token = format!("{TOKEN_PREFIX}{body}.{}", b64url(sig.as_ref()));
        Ok(TokenResponse {
            success: true,
            token,
            expires_at: expires,
        })
    }

    pub(super) fn verify_token(&self, token: &str) -> Result<Claims, RealtimeError> {
        let bad = || RealtimeError::AuthRequired("Invalid realtime token.".to_string());
        let rest = token.strip_prefix(TOKEN_PREFIX).ok_or_else(bad)?;
        let (body, sig) = rest.split_once('.').ok_or_else(bad)?;
        use base64::Engine;
        let sig = base64::engine::general_purpose::URL_SAFE_NO_PAD
            .decode(sig)
            .map_err(|_| bad())?;
        ring::hmac::verify(&self.token_key, body.as_bytes(), &sig).map_err(|_| bad())?;
        let json = base64::engine::general_purpose::URL_SAFE_NO_PAD
            .decode(body)
            .map_err(|_| bad())?;
        let claims: Claims = serde_json::from_slice(&json).map_err(|_| bad())?;
        if claims.e <= self.clock.now().timestamp() {
            return Err(RealtimeError::TokenExpired);
        }
        Ok(claims)
    }

    /// The SHA-256 of a live API key's current secret (`None`: deleted, or not this project's).
    pub(super) async fn current_key_hash(
        &self,
        project_id: &str,
        key_id: &str,
    ) -> Result<Option<Vec<u8>>, RealtimeError> {
        Ok(self
            .live_key(project_id, key_id)
            .await?
            .map(|(hash, _)| hash))
    }

    /// A live API key's current secret (its SHA-256) and the project role of its scope
    /// (`None`: deleted, or not this project's).
    pub(super) async fn live_key(
        &self,
        project_id: &str,
        key_id: &str,
    ) -> Result<Option<(Vec<u8>, DbRole)>, RealtimeError> {
        let client = self.control.get().await?;
        let key = crate::control::api_keys::live_secret(&client, project_id, key_id).await?;
        Ok(key.map(|(hash, scope)| (hash, scope.db_role())))
    }
}
