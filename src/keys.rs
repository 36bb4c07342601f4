//! API keys: `flx_live_` + 32 base62 characters (≈190 bits), shown once, stored as a SHA-256
//! hash with a short display prefix. Rotation replaces the hash in place, so the old secret is
//! refused from the very next request.
//!
//! A rotated or deleted key must also end what it authorized elsewhere (cached access on every
//! server, realtime subscriptions): the caller of [`Keys::rotate`] and [`Keys::revoke`]
//! announces that (`crate::api::keys`).

use chrono::{DateTime, Utc};
use serde::Serialize;

use crate::auth::{Access, AuthError, Principal, Scope, KEY_PREFIX};
use crate::control::api_keys;
use crate::secrets::{random_base62, sha256};

#[derive(Debug, thiserror::Error)]
pub enum KeysError {
    #[error(transparent)]
    Auth(#[from] AuthError),
    #[error("scope: must be one of read, readwrite, admin")]
    InvalidScope,
    #[error("name: at most 100 characters, without control (such as NUL), text-direction (such as U+202E) or invisible (such as U+200B) characters")]
    NameTooLong,
    #[error("keyId: no key {0:?} in this project")]
    NoSuchKey(String),
    #[error("keyId: key {0:?} was rotated by another request at the same time; its answer holds the secret that works")]
    RotatedMeanwhile(String),
    #[error("no project {0}")]
    NoSuchProject(String),
    #[error(
        "Key quota reached: a project may have at most {0} live API keys \
         (max_api_keys_per_project). Revoke one you no longer use."
    )]
    QuotaReached(u32),
    #[error(transparent)]
    Internal(#[from] anyhow::Error),
}

impl From<tokio_postgres::Error> for KeysError {
    fn from(e: tokio_postgres::Error) -> Self {
        KeysError::Internal(e.into())
    }
}

impl From<deadpool_postgres::PoolError> for KeysError {
    fn from(e: deadpool_postgres::PoolError) -> Self {
        KeysError::Internal(e.into())
    }
}

/// A key as the list shows it (never its secret).
#[derive(Serialize, utoipa::ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct KeyInfo {
    pub id: String,
    pub name: String,
    pub scope: Scope,
    pub prefix: String,
    #[schema(value_type = String, format = DateTime)]
    pub created_at: DateTime<Utc>,
    #[schema(value_type = Option<String>, format = DateTime)]
    pub last_used_at: Option<DateTime<Utc>>,
}

/// A key just created or rotated: the only moment its secret exists outside the caller.
pub struct NewKey {
    pub id: String,
    pub name: String,
    pub scope: Scope,
    pub prefix: String,
    pub secret: String,
}

/// A new key's public part (its secret travels beside it).
#[derive(Serialize, utoipa::ToSchema)]
pub struct KeySummary {
    pub id: String,
    pub name: String,
    pub scope: Scope,
    pub prefix: String,
}

impl NewKey {
    pub fn summary(&self) -> KeySummary {
        KeySummary {
            id: self.id.clone(),
            name: self.name.clone(),
            scope: self.scope,
            prefix: self.prefix.clone(),
        }
    }
}

/// A fresh key: (secret, its SHA-256, display prefix).
fn new_secret() -> (String, Vec<u8>, String) {
    let secret = format!("{KEY_PREFIX}{}", random_base62(32));
    let prefix = secret[..KEY_PREFIX.len() + 4].to_string();
    let hash = sha256(secret.as_bytes());
    (secret, hash, prefix)
}

/// Inserts a key in the caller's transaction.
pub async fn insert_key(
    tx: &impl deadpool_postgres::GenericClient,
    project_id: &str,
    scope: Scope,
    name: &str,
) -> Result<NewKey, tokio_postgres::Error> {
    let (secret, hash, prefix) = new_secret();
    let id = format!("key_{}", random_base62(16));
    api_keys::insert(
        tx,
        &api_keys::NewKeyRow {
            id: &id,
            project_id,
            name,
            scope,
            hash: &hash,
            prefix: &prefix,
        },
    )
    .await?;
    Ok(NewKey {
        id,
        name: name.to_string(),
        scope,
        prefix,
        secret,
    })
}

/// A key's name: the given one trimmed, or `default` when none or blank; at most 100
/// characters.
pub fn key_name(name: Option<&str>, default: impl FnOnce() -> String) -> Result<String, KeysError> {
    let name = name
        .map(|n| n.trim().to_string())
        .filter(|n| !n.is_empty())
        .unwrap_or_else(default);
    if name.chars().count() > 100 || crate::text::has_deceptive(&name) {
        return Err(KeysError::NameTooLong);
    }
    Ok(name)
}

/// The keys of every project, on the control database.
pub struct Keys {
    control: deadpool_postgres::Pool,
    /// Live keys a project may have through the API (`max_api_keys_per_project`): each key
    /// has its own request rate, so keys without bound would multiply a project's rate.
    max_per_project: u32,
}

impl Keys {
    pub fn new(control: deadpool_postgres::Pool, max_per_project: u32) -> Keys {
        Keys {
            control,
            max_per_project,
        }
    }

    /// The project's live keys, oldest first (admins only).
    pub async fn list(&self, access: &Access) -> Result<Vec<KeyInfo>, KeysError> {
        access.require_admin()?;
        let client = self.control.get().await?;
        Ok(api_keys::list_live(&client, &access.project.id)
            .await?
            .into_iter()
            .map(|k| KeyInfo {
                scope: k.scope,
                id: k.id,
                name: k.name,
                prefix: k.prefix,
                created_at: k.created_at,
                last_used_at: k.last_used_at,
            })
            .collect())
    }

    /// A new key of `scope` (`read`, `readwrite` or `admin`) named `name` (default: "<scope>
    /// key"), for an admin of the project.
    pub async fn create(
        &self,
        access: &Access,
        scope: &str,
        name: Option<&str>,
    ) -> Result<NewKey, KeysError> {
        access.require_admin()?;
        let scope = Scope::parse(scope).ok_or(KeysError::InvalidScope)?;
        let name = key_name(name, || format!("{} key", scope.as_str()))?;
        let mut client = self.control.get().await?;
        // Counted and inserted under the project's lock: concurrent creations cannot pass the
        // quota together (the operator's CLI is not bound by it).
        let tx = client.transaction().await?;
        let live = api_keys::lock_and_count_live(&tx, &access.project.id).await?;
        if live >= i64::from(self.max_per_project) {
            return Err(KeysError::QuotaReached(self.max_per_project));
        }
        let key = insert_key(&tx, &access.project.id, scope, &name).await?;
        tx.commit().await?;
        Ok(key)
    }

    /// `fluxbase keys create`: a new key for an operator with no session or key (recovery).
    pub async fn create_for_operator(
        &self,
        project_id: &str,
        scope: Scope,
        name: Option<&str>,
    ) -> Result<NewKey, KeysError> {
        let name = key_name(name, || format!("{} key (CLI)", scope.as_str()))?;
        let client = self.control.get().await?;
        if !crate::control::projects::exists(&client, project_id).await? {
            return Err(KeysError::NoSuchProject(project_id.to_string()));
        }
        Ok(insert_key(&client, project_id, scope, &name).await?)
    }

    /// A new secret for a live key; the old one is refused from now on.
    pub async fn rotate(&self, access: &Access, key_id: &str) -> Result<NewKey, KeysError> {
        access.require_admin()?;
        let (secret, hash, prefix) = new_secret();
        let client = self.control.get().await?;
        let project_id = &access.project.id;
        // A key rotating itself replaces the secret it presented: of two such rotations one
        // after the other, the second (sent with the secret the first replaced) is refused, not
        // answered with a secret that voids the first one's (red team rt15).
        let replaced = match &access.principal {
            Principal::Key {
                key_id: me,
                key_hash,
                ..
            } if me == key_id => key_hash.clone(),
            _ => api_keys::live_hash(&client, project_id, key_id)
                .await?
                .ok_or_else(|| KeysError::NoSuchKey(key_id.to_string()))?,
        };
        let Some((name, scope)) =
            api_keys::replace_secret(&client, project_id, key_id, &replaced, &hash, &prefix)
                .await?
        else {
            // Rotated (or revoked) by another request between the two statements: that one
            // answered the secret that works, so this one must not answer a dead one.
            return Err(
                match api_keys::live_hash(&client, project_id, key_id).await? {
                    Some(_) => KeysError::RotatedMeanwhile(key_id.to_string()),
                    None => KeysError::NoSuchKey(key_id.to_string()),
                },
            );
        };
        // What the old secret sent stays void (the acceptance also checks the rotation's time).
        crate::control::invitations::drop_pending_sent_by(&client, project_id, key_id).await?;
        Ok(NewKey {
            id: key_id.to_string(),
            name,
            scope,
            prefix,
            secret,
        })
    }

    /// Revokes a live key.
    pub async fn revoke(&self, access: &Access, key_id: &str) -> Result<(), KeysError> {
        access.require_admin()?;
        let client = self.control.get().await?;
        if !api_keys::revoke(&client, &access.project.id, key_id).await? {
            return Err(KeysError::NoSuchKey(key_id.to_string()));
        }
        crate::control::invitations::drop_pending_sent_by(&client, &access.project.id, key_id)
            .await?;
        Ok(())
    }
}
