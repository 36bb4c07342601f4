//! API keys: list, create, rotate, revoke. A rotated or revoked key ends, here and on every
//! other server, the cached access and the realtime subscriptions it authorized.

use serde::{Deserialize, Serialize};

use super::auth::Done;
use super::error::{ApiError, ApiResult};
use super::reply::{Created, Json};
use super::Request;
use crate::app::{App, SharedApp};
use crate::auth::{AccessChange, Scope};
use crate::keys::{KeyInfo, KeySummary, KeysError, NewKey};

#[derive(Deserialize, utoipa::ToSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct CreateKey {
    pub project_id: String,
    #[schema(value_type = Scope)]
    pub scope: String,
    pub name: Option<String>,
}

#[derive(Deserialize, utoipa::ToSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct RotateKey {
    pub project_id: String,
    pub key_id: String,
}

#[derive(Serialize, utoipa::ToSchema)]
pub struct KeysReply {
    pub success: bool,
    pub keys: Vec<KeyInfo>,
}

/// A key with its secret: the only answer that shows it.
#[derive(Serialize, utoipa::ToSchema)]
pub struct KeyWithSecret {
    pub success: bool,
    pub key: KeySummary,
    pub secret: String,
}

impl From<NewKey> for KeyWithSecret {
    fn from(k: NewKey) -> Self {
        KeyWithSecret {
            success: true,
            key: k.summary(),
            secret: k.secret,
        }
    }
}

/// The project's live keys (never their secrets).
#[utoipa::path(get, path = "/api/keys", tag = "keys", security(("bearer" = [])),
    params(("projectId" = String, Query, description = "The project")),
    responses((status = 200, description = "The live keys", body = KeysReply)))]
pub async fn list_keys(app: SharedApp, req: Request) -> ApiResult<Json<KeysReply>> {
    let access = req.access_by_query(&app).await?;
    Ok(Json(KeysReply {
        success: true,
        keys: app.keys.list(&access).await?,
    }))
}

/// Creates a key with a scope; its secret is in this answer only.
#[utoipa::path(post, path = "/api/keys", tag = "keys", security(("bearer" = [])),
    request_body = CreateKey,
    responses((status = 201, description = "The key and its secret", body = KeyWithSecret)))]
pub async fn create_key(app: SharedApp, req: Request) -> ApiResult<Created<KeyWithSecret>> {
    let access = req.access_by_body(&app).await?;
    let body: CreateKey = req.json()?;
    let key = app
        .keys
        .create(&access, &body.scope, body.name.as_deref())
        .await?;
    Ok(Created(key.into()))
}

/// Replaces a key's secret; the old one is refused from the next request.
#[utoipa::path(post, path = "/api/keys/rotate", tag = "keys", security(("bearer" = [])),
    request_body = RotateKey,
    responses((status = 200, description = "The key and its new secret", body = KeyWithSecret)))]
pub async fn rotate_key(app: SharedApp, req: Request) -> ApiResult<Json<KeyWithSecret>> {
    let access = req.access_by_body(&app).await?;
    let body: RotateKey = req.json()?;
    let key = app.keys.rotate(&access, &body.key_id).await?;
    key_changed(&app, &access.project.id, &key.id).await;
    Ok(Json(key.into()))
}

/// Revokes a key.
#[utoipa::path(delete, path = "/api/keys", tag = "keys", security(("bearer" = [])),
    params(("projectId" = String, Query, description = "The project"),
           ("keyId" = String, Query, description = "The key")),
    responses((status = 200, description = "The key is revoked", body = Done)))]
pub async fn delete_key(app: SharedApp, req: Request) -> ApiResult<Json<Done>> {
    let access = req.access_by_query(&app).await?;
    let key_id = req.param("keyId")?;
    app.keys.revoke(&access, key_id).await?;
    key_changed(&app, &access.project.id, key_id).await;
    Ok(Done::reply())
}

/// A key was rotated or deleted: caches emptied here and on every server, and the realtime
/// subscriptions it authorized (directly or through its tokens) ended, here at once and on
/// the other servers through the notification.
async fn key_changed(app: &App, project_id: &str, key_id: &str) {
    app.auth
        .notify_access_change(&AccessChange::KeyRevoked {
            project_id: project_id.to_string(),
            key_id: key_id.to_string(),
        })
        .await;
    app.realtime.key_revoked(project_id, key_id).await;
}

impl From<KeysError> for ApiError {
    fn from(e: KeysError) -> Self {
        match e {
            KeysError::Auth(e) => e.into(),
            KeysError::InvalidScope | KeysError::NameTooLong => ApiError::BadRequest(e.to_string()),
            KeysError::NoSuchKey(_) => ApiError::NotFound(e.to_string()),
            KeysError::RotatedMeanwhile(_) => ApiError::Conflict(e.to_string()),
            KeysError::NoSuchProject(_) => ApiError::ProjectNotFound,
            KeysError::QuotaReached(_) => ApiError::InsufficientPermissions(e.to_string()),
            KeysError::Internal(e) => e.into(),
        }
    }
}
