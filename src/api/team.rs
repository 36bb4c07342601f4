//! Team: members, invitations, roles.

use super::reply::Reply;
use super::Request;
use crate::api::error::ApiResult;
use crate::app::SharedApp;

/// Members and pending invitations of a project.
#[utoipa::path(get, path = "/api/team", tag = "team", security(("bearer" = [])),
    params(("projectId" = String, Query, description = "The project")),
    responses((status = 200, description = "`{success, members, invitations}`", body = Object)))]
pub async fn list_team(app: SharedApp, req: Request) -> ApiResult<impl Reply> {
    let access = req.access_by_query(&app).await?;
    app.list_team(&access).await
}

/// Invites a user by email with a role.
#[utoipa::path(post, path = "/api/team", tag = "team", security(("bearer" = [])),
    responses((status = 201, description = "`{success, invitation}`", body = Object)))]
pub async fn invite_member(app: SharedApp, req: Request) -> ApiResult<impl Reply> {
    let access = req.access_by_body(&app).await?;
    app.invite(&access, req.json()?).await
}

/// Changes a member's role.
#[utoipa::path(patch, path = "/api/team", tag = "team", security(("bearer" = [])),
    responses((status = 200, description = "`{success, member}`", body = Object)))]
pub async fn change_role(app: SharedApp, req: Request) -> ApiResult<impl Reply> {
    let access = req.access_by_body(&app).await?;
    app.change_role(&access, req.json()?).await
}

/// Removes a member.
#[utoipa::path(delete, path = "/api/team", tag = "team", security(("bearer" = [])),
    params(("projectId" = String, Query, description = "The project"),
           ("userId" = String, Query, description = "The member")),
    responses((status = 200, description = "`{success: true}`", body = Object)))]
pub async fn remove_member(app: SharedApp, req: Request) -> ApiResult<impl Reply> {
    let access = req.access_by_query(&app).await?;
    app.remove_member(&access, req.param("userId")?).await
}

/// Accepts or rejects an invitation addressed to the caller.
#[utoipa::path(post, path = "/api/team/invites/accept", tag = "team", security(("bearer" = [])),
    responses((status = 200, description = "`{success, membership}`", body = Object)))]
pub async fn answer_invite(app: SharedApp, req: Request) -> ApiResult<impl Reply> {
    let principal = req.principal(&app).await?;
    app.answer_invite(&principal, req.json()?).await
}
