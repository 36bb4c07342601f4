//! Row-level security: tables, policies, the toggle.

use serde::Serialize;
use utoipa::ToSchema;

use super::error::ApiError;
use super::reply::{Created, Json, Reply};
use super::Request;
use crate::api::error::ApiResult;
use crate::app::SharedApp;
use crate::rls::policies::{CreatePolicy, TablePolicies, TablePolicy, TogglePolicy};
use crate::rls::RlsError;

/// `{success, tables}`.
#[derive(Serialize, ToSchema)]
pub struct PolicyList {
    /// Always `true`.
    pub success: bool,
    pub tables: Vec<TablePolicies>,
}

/// `{success, policy}`.
#[derive(Serialize, ToSchema)]
pub struct PolicyAnswer {
    /// Always `true`.
    pub success: bool,
    pub policy: TablePolicy,
}

/// `{success: true}`.
#[derive(Serialize, ToSchema)]
pub struct PolicyDeleted {
    /// Always `true`.
    pub success: bool,
}

const MANAGING: &str = "Managing row-level security policies";

/// Row-level security is PostgreSQL's: on a MySQL project every RLS endpoint answers 400
/// naming the engine (after the caller's access is checked, so nothing is revealed to others).
fn postgresql_only(access: &crate::auth::Access) -> Result<(), ApiError> {
    match access.project.engine {
        crate::projects::Engine::Postgresql => Ok(()),
        crate::projects::Engine::Mysql => Err(ApiError::BadRequest(
            "row-level security does not exist on MySQL projects (engine \"mysql\"): MySQL has \
             no row policies; scope what each key may do with the read, readwrite and admin keys"
                .into(),
        )),
    }
}

/// Every table with its RLS state and policies.
#[utoipa::path(get, path = "/api/rls/policies", tag = "rls", security(("bearer" = [])),
    params(("projectId" = String, Query, description = "The project")),
    responses((status = 200, description = "Every table with its RLS state and policies",
               body = PolicyList)))]
pub async fn list_policies(app: SharedApp, req: Request) -> ApiResult<impl Reply> {
    let access = req.access_by_query(&app).await?;
    postgresql_only(&access)?;
    let tables = app.rls.list(&access).await?;
    Ok(Json(PolicyList {
        success: true,
        tables,
    }))
}

/// Creates a policy: ENABLE ROW LEVEL SECURITY and CREATE POLICY in one transaction.
#[utoipa::path(post, path = "/api/rls/policies", tag = "rls", security(("bearer" = [])),
    request_body = CreatePolicy,
    responses((status = 201, description = "The policy as created", body = PolicyAnswer)))]
pub async fn create_policy(app: SharedApp, req: Request) -> ApiResult<impl Reply> {
    // As before the typed body: who may manage the project's policies first, then the body.
    let access = req.access_by_body(&app).await?;
    postgresql_only(&access)?;
    access.require_developer(MANAGING)?;
    let body: CreatePolicy = req.json()?;
    let policy = app.rls.create(&access, &body).await?;
    Ok(Created(PolicyAnswer {
        success: true,
        policy,
    }))
}

/// Enables or disables a policy (the dashboard's toggle).
#[utoipa::path(patch, path = "/api/rls/policies", tag = "rls", security(("bearer" = [])),
    request_body = TogglePolicy,
    responses((status = 200, description = "The policy as it is now", body = PolicyAnswer)))]
pub async fn toggle_policy(app: SharedApp, req: Request) -> ApiResult<impl Reply> {
    // As before the typed body: who may manage the project's policies first, then the body.
    let access = req.access_by_body(&app).await?;
    postgresql_only(&access)?;
    access.require_developer(MANAGING)?;
    let body: TogglePolicy = req.json()?;
    let policy = app.rls.toggle(&access, &body).await?;
    Ok(Json(PolicyAnswer {
        success: true,
        policy,
    }))
}

/// Drops a policy.
#[utoipa::path(delete, path = "/api/rls/policies", tag = "rls", security(("bearer" = [])),
    params(("projectId" = String, Query, description = "The project"),
           ("schema" = Option<String>, Query, description = "The table's schema (default public)"),
           ("table" = String, Query, description = "The table"),
           ("name" = String, Query, description = "The policy")),
    responses((status = 200, description = "`{success: true}`", body = PolicyDeleted)))]
pub async fn delete_policy(app: SharedApp, req: Request) -> ApiResult<impl Reply> {
    let access = req.access_by_query(&app).await?;
    postgresql_only(&access)?;
    access.require_developer(MANAGING)?;
    app.rls
        .delete(
            &access,
            req.optional_param("schema"),
            req.param("table")?,
            req.param("name")?,
        )
        .await?;
    Ok(Json(PolicyDeleted { success: true }))
}

impl From<RlsError> for ApiError {
    fn from(e: RlsError) -> Self {
        match e {
            RlsError::Invalid(m) => ApiError::BadRequest(m),
            RlsError::Refused { message, sqlstate } => ApiError::Refused { message, sqlstate },
            RlsError::ForeignIdentity(m) => ApiError::ScopeMismatch(m),
            RlsError::NotFound(m) => ApiError::NotFound(m),
            RlsError::Exists(m) => ApiError::Conflict(m),
            RlsError::PermissionDenied(m) => ApiError::InsufficientPermissions(m),
            RlsError::Connection(e) => ApiError::DatabaseUnavailable(e.to_string()),
            RlsError::Sql(e) => e.into(),
        }
    }
}
