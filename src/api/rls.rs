//! Row-level security: tables, policies, the toggle.

use super::reply::Reply;
use super::Request;
use crate::api::error::ApiResult;
use crate::app::SharedApp;

/// Every table with its RLS state and policies.
#[utoipa::path(get, path = "/api/rls/policies", tag = "rls", security(("bearer" = [])),
    params(("projectId" = String, Query, description = "The project")),
    responses((status = 200, description = "`{success, tables}`", body = Object)))]
pub async fn list_policies(app: SharedApp, req: Request) -> ApiResult<impl Reply> {
    let access = req.access_by_query(&app).await?;
    app.list_policies(&access).await
}

/// Creates a policy.
#[utoipa::path(post, path = "/api/rls/policies", tag = "rls", security(("bearer" = [])),
    responses((status = 201, description = "`{success, policy}`", body = Object)))]
pub async fn create_policy(app: SharedApp, req: Request) -> ApiResult<impl Reply> {
    let access = req.access_by_body(&app).await?;
    app.create_policy(&access, &req.json()?).await
}

/// Turns row-level security on or off for a table.
#[utoipa::path(patch, path = "/api/rls/policies", tag = "rls", security(("bearer" = [])),
    responses((status = 200, description = "`{success, table}`", body = Object)))]
pub async fn toggle_policy(app: SharedApp, req: Request) -> ApiResult<impl Reply> {
    let access = req.access_by_body(&app).await?;
    app.toggle_policy(&access, &req.json()?).await
}

/// Drops a policy.
#[utoipa::path(delete, path = "/api/rls/policies", tag = "rls", security(("bearer" = [])),
    params(("projectId" = String, Query, description = "The project"),
           ("schema" = Option<String>, Query, description = "The table's schema (default public)"),
           ("table" = String, Query, description = "The table"),
           ("name" = String, Query, description = "The policy")),
    responses((status = 200, description = "`{success: true}`", body = Object)))]
pub async fn delete_policy(app: SharedApp, req: Request) -> ApiResult<impl Reply> {
    let access = req.access_by_query(&app).await?;
    app.delete_policy(
        &access,
        req.optional_param("schema"),
        req.param("table")?,
        req.param("name")?,
    )
    .await
}
