//! API keys: `flx_live_` + 32 base62 characters (≈190 bits), shown once, stored as a SHA-256
//! hash with a short display prefix. Rotation replaces the hash in place, so the old secret is
//! refused from the very next request.

use serde::Deserialize;
use serde_json::{json, Value};
use warp::http::StatusCode;

use crate::api::error::{ApiError, ApiResult};
use crate::app::App;
use crate::auth::{Access, Scope, KEY_PREFIX};
use crate::secrets::{random_base62, sha256};

/// A key just created or rotated: the only moment its secret exists outside the caller.
pub struct NewKey {
    pub id: String,
    pub name: String,
    pub scope: Scope,
    pub prefix: String,
    pub secret: String,
}

impl NewKey {
    pub fn json(&self) -> Value {
        json!({ "id": self.id, "name": self.name, "scope": self.scope.as_str(), "prefix": self.prefix })
    }
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct CreateKey {
    pub project_id: String,
    pub scope: String,
    pub name: Option<String>,
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct RotateKey {
    pub project_id: String,
    pub key_id: String,
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
    tx.execute(
        "INSERT INTO fluxbase.api_keys (id, project_id, name, scope, key_hash, prefix)
         VALUES ($1, $2, $3, $4, $5, $6)",
        &[&id, &project_id, &name, &scope.as_str(), &hash, &prefix],
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

impl App {
    pub async fn list_keys(&self, access: &Access) -> ApiResult<(StatusCode, Value)> {
        access.require_admin()?;
        let client = self.control.get().await?;
        let keys: Vec<Value> = client
            .query(
                "SELECT id, name, scope, prefix, created_at, last_used_at FROM fluxbase.api_keys
                 WHERE project_id = $1 AND revoked_at IS NULL ORDER BY created_at, id",
                &[&access.project.id],
            )
            .await?
            .iter()
            .map(|r| {
                json!({
                    "id": r.get::<_, String>(0),
                    "name": r.get::<_, String>(1),
                    "scope": r.get::<_, String>(2),
                    "prefix": r.get::<_, String>(3),
                    "createdAt": r.get::<_, chrono::DateTime<chrono::Utc>>(4),
                    "lastUsedAt": r.get::<_, Option<chrono::DateTime<chrono::Utc>>>(5),
                })
            })
            .collect();
        Ok((StatusCode::OK, json!({ "success": true, "keys": keys })))
    }

    pub async fn create_key(
        &self,
        access: &Access,
        req: CreateKey,
    ) -> ApiResult<(StatusCode, Value)> {
        access.require_admin()?;
        let scope = Scope::parse(&req.scope).ok_or_else(|| {
            ApiError::BadRequest("scope: must be one of read, readwrite, admin".into())
        })?;
        let name = req
            .name
            .map(|n| n.trim().to_string())
            .filter(|n| !n.is_empty())
            .unwrap_or_else(|| format!("{} key", scope.as_str()));
        if name.chars().count() > 100 {
            return Err(ApiError::BadRequest("name: at most 100 characters".into()));
        }
        let client = self.control.get().await?;
        let key = insert_key(&client, &access.project.id, scope, &name).await?;
        Ok((
            StatusCode::CREATED,
            json!({ "success": true, "key": key.json(), "secret": key.secret }),
        ))
    }

    pub async fn rotate_key(
        &self,
        access: &Access,
        req: RotateKey,
    ) -> ApiResult<(StatusCode, Value)> {
        access.require_admin()?;
        let (secret, hash, prefix) = new_secret();
        let client = self.control.get().await?;
        let row = client
            .query_opt(
                "UPDATE fluxbase.api_keys SET key_hash = $3, prefix = $4, last_used_at = NULL
                 WHERE id = $1 AND project_id = $2 AND revoked_at IS NULL
                 RETURNING name, scope",
                &[&req.key_id, &access.project.id, &hash, &prefix],
            )
            .await?
            .ok_or_else(|| {
                ApiError::NotFound(format!("keyId: no key {:?} in this project", req.key_id))
            })?;
        drop(client);
        self.key_changed(&access.project.id, &req.key_id).await;
        let key = NewKey {
            id: req.key_id,
            name: row.get(0),
            scope: Scope::parse(row.get(1)).ok_or_else(|| anyhow::anyhow!("bad scope"))?,
            prefix,
            secret,
        };
        Ok((
            StatusCode::OK,
            json!({ "success": true, "key": key.json(), "secret": key.secret }),
        ))
    }

    pub async fn delete_key(
        &self,
        access: &Access,
        key_id: &str,
    ) -> ApiResult<(StatusCode, Value)> {
        access.require_admin()?;
        let client = self.control.get().await?;
        let n = client
            .execute(
                "UPDATE fluxbase.api_keys SET revoked_at = now()
                 WHERE id = $1 AND project_id = $2 AND revoked_at IS NULL",
                &[&key_id, &access.project.id],
            )
            .await?;
        if n == 0 {
            return Err(ApiError::NotFound(format!(
                "keyId: no key {key_id:?} in this project"
            )));
        }
        drop(client);
        self.key_changed(&access.project.id, key_id).await;
        Ok((StatusCode::OK, json!({ "success": true })))
    }

    /// A key was rotated or deleted: caches emptied here and on every server, and the realtime
    /// subscriptions it authorized (directly or through its tokens) ended, here at once and on
    /// the other servers through the notification.
    async fn key_changed(&self, project_id: &str, key_id: &str) {
        self.notify_access_change(&crate::auth::key_revoked_payload(project_id, key_id))
            .await;
        self.realtime.key_revoked(project_id, key_id).await;
    }
}
