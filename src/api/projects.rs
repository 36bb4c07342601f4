//! Projects: list, create, change, delete.

use serde_json::json;
use warp::http::StatusCode;

use super::reply::Reply;
use super::Request;
use crate::api::error::ApiResult;
use crate::app::SharedApp;

/// The projects the caller can reach.
#[utoipa::path(get, path = "/api/projects", tag = "projects", security(("bearer" = [])),
    responses((status = 200, description = "`{success, projects}`", body = Object)))]
pub async fn list_projects(app: SharedApp, req: Request) -> ApiResult<impl Reply> {
    let principal = req.principal(&app).await?;
    app.list_projects(&principal).await
}

/// Creates a project (its database, roles and first keys) and starts its change stream.
#[utoipa::path(post, path = "/api/projects", tag = "projects", security(("bearer" = [])),
    responses((status = 201, description = "`{success, project, keys}`", body = Object)))]
pub async fn create_project(app: SharedApp, req: Request) -> ApiResult<impl Reply> {
    let principal = req.principal(&app).await?;
    let created = app.create_project_endpoint(&principal, req.json()?).await?;
    if let Some(id) = created.1["project"]["id"].as_str() {
        app.cdc.start(id.to_string(), format!("fx_{id}"));
    }
    Ok(created)
}

/// Renames a project or changes its settings.
#[utoipa::path(patch, path = "/api/projects", tag = "projects", security(("bearer" = [])),
    responses((status = 200, description = "`{success, project}`", body = Object)))]
pub async fn patch_project(app: SharedApp, req: Request) -> ApiResult<impl Reply> {
    let access = req.access_by_body(&app).await?;
    app.patch_project(&access, req.json()?).await
}

/// Deletes a project with its database, files and keys.
#[utoipa::path(delete, path = "/api/projects", tag = "projects", security(("bearer" = [])),
    params(("projectId" = String, Query, description = "The project")),
    responses((status = 200, description = "`{success: true}`", body = Object)))]
pub async fn delete_project(app: SharedApp, req: Request) -> ApiResult<impl Reply> {
    let access = req.access_by_query(&app).await?;
    access.require_admin()?;
    app.delete_project(&access.project.id).await?;
    Ok((StatusCode::OK, json!({ "success": true })))
}
