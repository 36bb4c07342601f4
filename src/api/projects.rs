//! Projects: list, create, change, delete.

use serde::{Deserialize, Serialize};

use super::auth::Done;
use super::error::{ApiError, ApiResult};
use super::reply::{Created, Json};
use super::Request;
use crate::app::SharedApp;
use crate::auth::AccessChange;
use crate::projects::{ApiKeySecrets, Engine, ListedProject, ProjectView, ProjectsError};

#[derive(Deserialize, utoipa::ToSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct CreateProject {
    pub name: String,
    /// `postgresql` (the default) or `mysql`: the database engine of the project, fixed at
    /// creation.
    #[serde(default)]
    #[schema(value_type = Option<Engine>)]
    pub engine: Option<serde_json::Value>,
}

#[derive(Deserialize, utoipa::ToSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct PatchProject {
    pub project_id: String,
    pub name: Option<String>,
    pub realtime_public: Option<bool>,
}

#[derive(Serialize, utoipa::ToSchema)]
pub struct ProjectsReply {
    pub success: bool,
    pub projects: Vec<ListedProject>,
}

/// A new project and the secrets of its first keys (shown once).
#[derive(Serialize, utoipa::ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct CreatedProject {
    pub success: bool,
    pub project: ProjectView,
    pub api_keys: ApiKeySecrets,
}

#[derive(Serialize, utoipa::ToSchema)]
pub struct ProjectReply {
    pub success: bool,
    pub project: ProjectView,
}

/// The projects the caller can reach.
#[utoipa::path(get, path = "/api/projects", tag = "projects", security(("bearer" = [])),
    responses((status = 200, description = "The caller's projects", body = ProjectsReply)))]
pub async fn list_projects(app: SharedApp, req: Request) -> ApiResult<Json<ProjectsReply>> {
    let principal = req.principal(&app).await?;
    Ok(Json(ProjectsReply {
        success: true,
        projects: app.projects.list(&principal).await?,
    }))
}

/// Creates a project (its database, roles and first keys) and starts its change stream.
#[utoipa::path(post, path = "/api/projects", tag = "projects", security(("bearer" = [])),
    request_body = CreateProject,
    responses((status = 201, description = "The project and its first keys", body = CreatedProject)))]
pub async fn create_project(app: SharedApp, req: Request) -> ApiResult<Created<CreatedProject>> {
    let principal = req.principal(&app).await?;
    let body: CreateProject = req.json()?;
    let user_id = principal.require_session()?;
    // The quota applies to users of the API; the operator's CLI is not bound by it.
    let _turn = app.projects.quota_turn(user_id).await?;
    let engine = match &body.engine {
        None | Some(serde_json::Value::Null) => Engine::Postgresql,
        Some(v) => v
            .as_str()
            .and_then(Engine::parse)
            .ok_or_else(|| ProjectsError::InvalidEngine(v.to_string()))?,
    };
    let (project, keys) = app.create_project(user_id, &body.name, engine).await?;
    app.start_stream(&project);
    Ok(Created(CreatedProject {
        success: true,
        project: ProjectView::from(&project),
        api_keys: ApiKeySecrets::from(&keys),
    }))
}

/// Renames a project or changes its settings.
#[utoipa::path(patch, path = "/api/projects", tag = "projects", security(("bearer" = [])),
    request_body = PatchProject,
    responses((status = 200, description = "The project as changed", body = ProjectReply)))]
pub async fn patch_project(app: SharedApp, req: Request) -> ApiResult<Json<ProjectReply>> {
    let access = req.access_by_body(&app).await?;
    let body: PatchProject = req.json()?;
    app.projects
        .update(&access, body.name.as_deref(), body.realtime_public)
        .await?;
    if body.realtime_public == Some(false) {
        // Subscriptions made without a token end everywhere (NOTIFY) and here, after the
        // access cache is emptied: a subscribe that re-checks once they ended reads the
        // project as it is now.
        app.auth
            .notify_access_change(&AccessChange::PublicClosed(access.project.id.clone()))
            .await;
        app.realtime.evict_anonymous(&access.project.id);
    } else {
        app.auth.notify_access_change(&AccessChange::Any).await;
    }
    let project = app
        .auth
        .load_project(&access.project.id)
        .await?
        .ok_or(ApiError::ProjectNotFound)?;
    Ok(Json(ProjectReply {
        success: true,
        project: ProjectView::from(&project),
    }))
}

/// Deletes a project with its database, files and keys.
#[utoipa::path(delete, path = "/api/projects", tag = "projects", security(("bearer" = [])),
    params(("projectId" = String, Query, description = "The project")),
    responses((status = 200, description = "The project is deleted", body = Done)))]
pub async fn delete_project(app: SharedApp, req: Request) -> ApiResult<Json<Done>> {
    let access = req.access_by_query(&app).await?;
    access.require_admin()?;
    app.delete_project(&access.project.id).await?;
    Ok(Done::reply())
}

impl From<ProjectsError> for ApiError {
    fn from(e: ProjectsError) -> Self {
        match e {
            ProjectsError::Auth(e) => e.into(),
            ProjectsError::InvalidName
            | ProjectsError::InvalidEngine(_)
            | ProjectsError::EngineUnavailable(_) => ApiError::BadRequest(e.to_string()),
            ProjectsError::QuotaReached(_) | ProjectsError::ServerFull(_) => {
                ApiError::InsufficientPermissions(e.to_string())
            }
            ProjectsError::NoSuchProject(_) => ApiError::ProjectNotFound,
            ProjectsError::Internal(e) => e.into(),
        }
    }
}
