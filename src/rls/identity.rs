//! The request's identity as `auth.uid()`, which no SQL sent through the API can change.
//!
//! Who a request acts for: a member's session → that user's id; an API key → `authUid` in the
//! body or the `X-Fluxbase-Auth-Uid` header (a trusted backend naming its end user, or an org id
//! for the multi-tenant pattern); otherwise nobody (`auth.uid()` is NULL).
//!
//! `current_setting('fluxbase.auth_uid')` alone cannot carry it: the caller's SQL can `SET` it,
//! and admin-scope callers run as the project's owner role, so anything that role owns they can
//! alter. So the identity lives where the project roles cannot reach (`sql/project/0004_rls.sql`):
//!
//! ```text
//!  fx_<id>_auth (NOLOGIN, no members but the admin role) owns schema auth:
//!    auth.identity (pid, uid)   UNLOGGED: never in the WAL, so no db_event, replica or backup
//!    auth.secret   HMAC key     UNLOGGED too; only the owner reads it; reinstalled after a crash
//!    auth.set_uid(uid, tag)     SECURITY DEFINER: sets this backend's row only if
//!                               tag = HMAC-SHA256(key, "<pid>:=<uid>" | "<pid>:-")
//!    auth.uid()                 SECURITY DEFINER, STABLE: this backend's row
//! ```
//! The key is derived from the instance secret (like the role passwords) and installed by the
//! admin role with bound parameters; uid and tag always travel as bound parameters, never in query
//! text (which `pg_stat_activity` shows to sessions of the same role). Both functions pin
//! `search_path = pg_catalog, pg_temp`, so a caller's functions or operators are never resolved
//! inside them. `SET fluxbase.auth_uid`, `set_config`, `RESET`, the same in a function, a CTE or
//! a later statement or transaction change only the setting, never the row; `UPDATE
//! auth.identity`, `CREATE OR REPLACE FUNCTION auth.uid()` are refused by PostgreSQL's
//! privileges; `auth.set_uid` with a guessed tag is refused by the HMAC check.
//!
//! Pooled connections are reused across requests, so each pooled connection remembers the identity
//! its row holds ([`KnownIdentity`]; only the server can change the row, so this is reliable). On
//! checkout:
//!
//! * the identity differs (or the connection is new: a reused pid may have left a row behind):
//!   `SELECT auth.set_uid($1, $2)` runs and is awaited *before* the caller's SQL is sent. This
//!   one is deliberately not pipelined: a Query sent behind it would run even if it failed, and
//!   in the same transaction a caller's `ROLLBACK` (or a procedure's) could undo it and run the
//!   rest under the previous request's identity. It costs one round trip, only when the
//!   identity changes; a connection that never had one costs nothing;
//! * with an identity, `set_config('fluxbase.auth_uid', auth.uid(), false)` is queued as a
//!   prelude in the same write as the caller's SQL (no round trip of its own), for readers of
//!   `current_setting` (the guide's `SET LOCAL fluxbase.auth_uid`). It is set for the session
//!   rather than `LOCAL`: a script may `COMMIT` and go on, and a single `VACUUM` or `CREATE INDEX
//!   CONCURRENTLY` must stay outside any transaction block; the session reset before the
//!   connection's next use (`auth.reset_session()`: `RESET ALL`) clears it. It is
//!   informational only: `auth.uid()` reads the row.
//!
//! A backend that never called `set_uid` but reuses the pid of a gone one could see that one's

use std::sync::Arc;

use fluxbase_replication::wire::{Connection, WireError};
use ring::hmac;
use serde_json::Value;

use super::RlsError;
use crate::auth::{Access, DbRole, MemberRole, Principal, Project};
use crate::db::ClusterTarget;
use crate::metrics::Metrics;
use crate::secrets::Secrets;

/// Longest identity accepted, in characters.
const MAX_UID_CHARS: usize = 256;

/// The NOLOGIN role that owns schema `auth` (and holds disabled policies).
pub fn auth_role(project_id: &str) -> String {
    format!("fx_{project_id}_auth")
}

/// What a pooled connection's `auth.identity` row holds, as far as the server knows.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub enum KnownIdentity {
    /// A new connection (its pid may have a stale row), or a change that may have failed.
    #[default]
    Unknown,
    /// The row holds this identity (None: no identity).
    Set(Option<String>),
}

/// The identity a request acts for (see the module docs). `body` is the request's `authUid`,
/// `header` the value of its `X-Fluxbase-Auth-Uid` header.
pub fn request_identity(
    access: &Access,
    body: Option<&Value>,
    header: Option<&[u8]>,
) -> Result<Option<String>, RlsError> {
    let from_body = match body {
        None | Some(Value::Null) => None,
        Some(Value::String(s)) => Some(valid_uid(s, "authUid")?),
        Some(_) => {
            return Err(RlsError::Invalid(
                "authUid: expected a string (the end user's id)".into(),
            ))
        }
    };
    let from_header = match header {
        None => None,
        Some(v) => {
            let s = std::str::from_utf8(v).map_err(|_| {
                RlsError::Invalid("X-Fluxbase-Auth-Uid: expected UTF-8 text".into())
            })?;
            Some(valid_uid(s.trim(), "X-Fluxbase-Auth-Uid")?)
        }
    };
    let named = match (from_body, from_header) {
        (Some(a), Some(b)) if a != b => {
            return Err(RlsError::Invalid(
                "authUid and X-Fluxbase-Auth-Uid name different identities".into(),
            ))
        }
        (a, b) => a.or(b),
    };
    match &access.principal {
        // A developer or admin member already reads and writes every row as the owner role; run
        // with a weaker role, naming an end user shows only what that user would see.
        Principal::Session { .. } if access.db_role < DbRole::Owner && owner_member(access) => {
            Ok(named.or_else(|| session_user(access)))
        }
        Principal::Session { user_id, .. } => match named {
            Some(uid) if &uid != user_id => Err(RlsError::ForeignIdentity(
                "A user session acts as its own user; authUid and X-Fluxbase-Auth-Uid are for \
                 API keys."
                    .into(),
            )),
            _ => Ok(Some(user_id.clone())),
        },
        Principal::Key { .. } => Ok(named),
    }
}

/// Whether the access is a member whose own role is the owner's (developer or admin).
fn owner_member(access: &Access) -> bool {
    matches!(
        access.member_role,
        Some(MemberRole::Admin | MemberRole::Developer)
    )
}

fn session_user(access: &Access) -> Option<String> {
    match &access.principal {
        Principal::Session { user_id, .. } => Some(user_id.clone()),
        Principal::Key { .. } => None,
    }
}

pub fn valid_uid(s: &str, field: &str) -> Result<String, RlsError> {
    if s.is_empty() || s.chars().count() > MAX_UID_CHARS || s.chars().any(|c| c.is_control()) {
        return Err(RlsError::Invalid(format!(
            "{field}: expected 1 to {MAX_UID_CHARS} printable characters"
        )));
    }
    Ok(s.to_string())
}

/// The tag `auth.set_uid` accepts for `uid` on backend `pid`.
pub fn identity_tag(key: &[u8; 32], pid: i32, uid: Option<&str>) -> String {
    let message = match uid {
        Some(uid) => format!("{pid}:={uid}"),
        None => format!("{pid}:-"),
    };
    let key = hmac::Key::new(hmac::HMAC_SHA256, key);
    hex::encode(hmac::sign(&key, message.as_bytes()).as_ref())
}

/// HMAC's inner and outer padded keys, the form `auth.secret` holds (SQL has sha256, no hmac).
pub fn padded_keys(key: &[u8; 32]) -> (Vec<u8>, Vec<u8>) {
    let mut inner = vec![0x36u8; 64];
    let mut outer = vec![0x5cu8; 64];
    for (i, b) in key.iter().enumerate() {
        inner[i] ^= b;
        outer[i] ^= b;
    }
    (inner, outer)
}

/// SQLSTATE `auth.set_uid` raises when `auth.secret` is empty (a new project, or after a crash).
pub const KEY_MISSING: &str = "FX001";

/// What sets a request's identity on a project connection: the projects' identity keys (derived
/// from the instance secret) and the admin access that installs them.
pub struct Identities {
    secrets: Secrets,
    cluster: ClusterTarget,
    metrics: Arc<Metrics>,
}

impl Identities {
    pub fn new(secrets: Secrets, cluster: ClusterTarget, metrics: Arc<Metrics>) -> Identities {
        Identities {
            secrets,
            cluster,
            metrics,
        }
    }

    /// HMAC-SHA256 key of a project's identity tags.
    pub fn key(&self, project_id: &str) -> [u8; 32] {
        let hex_key = self.secrets.derive(&format!("rls-identity:{project_id}"));
        let mut key = [0u8; 32];
        hex::decode_to_slice(hex_key, &mut key).expect("derive returns 32 bytes of hex");
        key
    }

    /// Installs a project's identity key (admin role, bound parameters).
    pub async fn install_key(&self, project: &Project) -> anyhow::Result<()> {
        let (inner, outer) = padded_keys(&self.key(&project.id));
        let client = self.cluster.connect(&project.db_name).await?;
        client
            .execute(
                "INSERT INTO auth.secret (id, inner_key, outer_key) VALUES (true, $1, $2)
                 ON CONFLICT (id) DO UPDATE SET inner_key = EXCLUDED.inner_key,
                                                outer_key = EXCLUDED.outer_key",
                &[&inner, &outer],
            )
            .await?;
        tracing::info!(project_id = %project.id, "installed the identity key");
        Ok(())
    }

    /// Makes `auth.uid()` on this pooled connection return `uid` for the request about to run
    /// (see the module docs): awaited when the row must change, then the `fluxbase.auth_uid`
    /// setting queued in front of the caller's SQL.
    pub async fn establish(
        &self,
        project: &Project,
        conn: &mut Connection,
        known: &mut KnownIdentity,
        uid: Option<&str>,
    ) -> Result<(), WireError> {
        let wanted = KnownIdentity::Set(uid.map(str::to_owned));
        if *known != wanted {
            *known = KnownIdentity::Unknown;
            let key = self.key(&project.id);
            let tag = identity_tag(&key, conn.backend_key().0, uid);
            let params = [uid.map(str::to_owned), Some(tag)];
            const SET_UID: &str = "SELECT auth.set_uid($1, $2)";
            match conn.query_oneshot(SET_UID, &params, 0).await {
                Err(WireError::Db(e)) if e.code == KEY_MISSING => {
                    self.install_key(project)
                        .await
                        .map_err(|e| WireError::Protocol(format!("installing the key: {e:#}")))?;
                    conn.query_oneshot(SET_UID, &params, 0).await?;
                }
                other => {
                    other?;
                }
            }
            *known = wanted;
            self.metrics.observe_identity_change();
        }
        if uid.is_some() {
            conn.queue_prelude(
                "SELECT pg_catalog.set_config('fluxbase.auth_uid', auth.uid(), false)",
            );
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tags_match_the_sql_hmac_construction() {
        let key = [7u8; 32];
        let (inner, outer) = padded_keys(&key);
        let message = b"1234:=alice";
        let inner_hash = crate::secrets::sha256(&[inner, message.to_vec()].concat());
        let tag = hex::encode(crate::secrets::sha256(&[outer, inner_hash].concat()));
        assert_eq!(tag, identity_tag(&key, 1234, Some("alice")));
        assert_ne!(
            identity_tag(&key, 1234, None),
            identity_tag(&key, 1234, Some(""))
        );
        assert_ne!(
            identity_tag(&key, 1234, Some("a")),
            identity_tag(&key, 1235, Some("a"))
        );
    }
}
