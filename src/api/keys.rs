//! API keys: list, create, rotate, revoke.

use super::reply::Reply;
use super::Request;
use crate::api::error::ApiResult;
use crate::app::SharedApp;

/// The project's live keys (never their secrets).
#[utoipa::path(get, path = "/api/keys", tag = "keys", security(("bearer" = [])),
    params(("projectId" = String, Query, description = "The project")),
    responses((status = 200, description = "`{success, keys}`", body = Object)))]
pub async fn list_keys(app: SharedApp, req: Request) -> ApiResult<impl Reply> {
    let access = req.access_by_query(&app).await?;
    app.list_keys(&access).await
}

/// Creates a key with a scope; its secret is in this answer only.
#[utoipa::path(post, path = "/api/keys", tag = "keys", security(("bearer" = [])),
    responses((status = 201, description = "`{success, key, secret}`", body = Object)))]
pub async fn create_key(app: SharedApp, req: Request) -> ApiResult<impl Reply> {
    let access = req.access_by_body(&app).await?;
    app.create_key(&access, req.json()?).await
}

/// Replaces a key's secret; the old one is refused from the next request.
#[utoipa::path(post, path = "/api/keys/rotate", tag = "keys", security(("bearer" = [])),
    responses((status = 200, description = "`{success, key, secret}`", body = Object)))]
pub async fn rotate_key(app: SharedApp, req: Request) -> ApiResult<impl Reply> {
    let access = req.access_by_body(&app).await?;
    app.rotate_key(&access, req.json()?).await
}

/// Revokes a key.
#[utoipa::path(delete, path = "/api/keys", tag = "keys", security(("bearer" = [])),
    params(("projectId" = String, Query, description = "The project"),
           ("keyId" = String, Query, description = "The key")),
    responses((status = 200, description = "`{success: true}`", body = Object)))]
pub async fn delete_key(app: SharedApp, req: Request) -> ApiResult<impl Reply> {
    let access = req.access_by_query(&app).await?;
    app.delete_key(&access, req.param("keyId")?).await
}
