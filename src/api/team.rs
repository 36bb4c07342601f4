//! Team: members, invitations, roles. Team bodies are read field by field ([`Body`]) so that
//! every error names its field; the request types below are their schemas (the document's),
//! which is why they derive `Deserialize` without being deserialized.

use serde::Serialize;
use serde_json::{Map, Value};

use super::auth::Done;
use super::error::{ApiError, ApiResult};
use super::reply::{Created, Json};
use super::Request;
use crate::app::SharedApp;
use crate::auth::{AccessChange, MemberRole};
use crate::realtime::MemberChange;
use crate::team::{Answer, Invite, InviteStatus, Member, TeamError};

/// The JSON object of a request body, read field by field so that every error names its field.
pub struct Body(Map<String, Value>);

impl Body {
    pub fn new(value: Value, allowed: &[&str]) -> ApiResult<Body> {
        let Value::Object(map) = value else {
            return Err(ApiError::BadRequest(
                "request body: expected a JSON object".into(),
            ));
        };
        if let Some(unknown) = map.keys().find(|k| !allowed.contains(&k.as_str())) {
            return Err(ApiError::BadRequest(format!(
                "{unknown}: unknown field (expected {})",
                allowed.join(", ")
            )));
        }
        Ok(Body(map))
    }

    /// A required, non-empty string field (trimmed).
    pub fn string(&self, name: &str) -> ApiResult<String> {
        match self.0.get(name) {
            None | Some(Value::Null) => Err(ApiError::BadRequest(format!("{name}: required"))),
            Some(Value::String(s)) if !s.trim().is_empty() => Ok(s.trim().to_string()),
            Some(Value::String(_)) => {
                Err(ApiError::BadRequest(format!("{name}: must not be empty")))
            }
            Some(_) => Err(ApiError::BadRequest(format!("{name}: expected a string"))),
        }
    }

    /// A required member role.
    pub fn role(&self) -> ApiResult<MemberRole> {
        MemberRole::parse(&self.string("role")?).ok_or_else(|| {
            ApiError::BadRequest("role: must be one of admin, developer, viewer".into())
        })
    }
}

/// `POST /api/team`: invites a registered account.
#[derive(serde::Deserialize, utoipa::ToSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct InviteRequest {
    pub project_id: String,
    pub email: String,
    pub role: MemberRole,
}

/// `PATCH /api/team`: changes a member's role.
#[derive(serde::Deserialize, utoipa::ToSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct ChangeRoleRequest {
    pub project_id: String,
    pub user_id: String,
    pub role: MemberRole,
}

/// `POST /api/team/invites/accept`: the invitee's answer.
#[derive(serde::Deserialize, utoipa::ToSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct AnswerRequest {
    pub invite_id: String,
    pub status: Answer,
}

#[derive(Serialize, utoipa::ToSchema)]
pub struct TeamReply {
    pub success: bool,
    pub members: Vec<Member>,
    /// Every invitation of the project, whatever its state.
    pub invites: Vec<Invite>,
}

#[derive(Serialize, utoipa::ToSchema)]
pub struct InviteReply {
    pub success: bool,
    pub invite: Invite,
}

#[derive(Serialize, utoipa::ToSchema)]
pub struct MemberReply {
    pub success: bool,
    pub member: Member,
}

/// The answer as recorded; `member` is the new membership, `null` when rejected.
#[derive(Serialize, utoipa::ToSchema)]
pub struct AnswerReply {
    pub success: bool,
    /// The invitation, with its `projectId`.
    pub invite: Invite,
    pub member: Option<Member>,
}

/// Members and pending invitations of a project.
#[utoipa::path(get, path = "/api/team", tag = "team", security(("bearer" = [])),
    params(("projectId" = String, Query, description = "The project")),
    responses((status = 200, description = "Members and invitations", body = TeamReply)))]
pub async fn list_team(app: SharedApp, req: Request) -> ApiResult<Json<TeamReply>> {
    let access = req.access_by_query(&app).await?;
    let roster = app.team.roster(&access).await?;
    Ok(Json(TeamReply {
        success: true,
        members: roster.members,
        invites: roster.invites,
    }))
}

/// Invites a user by email with a role.
#[utoipa::path(post, path = "/api/team", tag = "team", security(("bearer" = [])),
    request_body = InviteRequest,
    responses((status = 201, description = "The invitation", body = InviteReply)))]
pub async fn invite_member(app: SharedApp, req: Request) -> ApiResult<Created<InviteReply>> {
    let access = req.access_by_body(&app).await?;
    let body = Body::new(req.json()?, &["projectId", "email", "role"])?;
    let email = body.string("email")?;
    crate::accounts::check_email_length(&email)?;
    crate::team::require_team_admin(&access)?;
    let role = body.role()?;
    let invite = app.team.invite(&access, &email, role).await?;
    Ok(Created(InviteReply {
        success: true,
        invite,
    }))
}

/// Changes a member's role.
#[utoipa::path(patch, path = "/api/team", tag = "team", security(("bearer" = [])),
    request_body = ChangeRoleRequest,
    responses((status = 200, description = "The member with the new role", body = MemberReply)))]
pub async fn change_role(app: SharedApp, req: Request) -> ApiResult<Json<MemberReply>> {
    let access = req.access_by_body(&app).await?;
    let body = Body::new(req.json()?, &["projectId", "userId", "role"])?;
    crate::team::require_team_admin(&access)?;
    let user_id = body.string("userId")?;
    let role = body.role()?;
    let member = app.team.change_role(&access, &user_id, role).await?;
    // A subscription's role is fixed when it is accepted: the member's end here and, through
    // NOTIFY, on every other server; the client subscribes again with the new role.
    let project_id = &access.project.id;
    app.realtime
        .evict_user(project_id, &user_id, MemberChange::RoleChanged);
    app.auth
        .notify_access_change(&AccessChange::MemberChanged {
            project_id: project_id.clone(),
            user_id: user_id.clone(),
        })
        .await;
    Ok(Json(MemberReply {
        success: true,
        member,
    }))
}

/// Removes a member.
#[utoipa::path(delete, path = "/api/team", tag = "team", security(("bearer" = [])),
    params(("projectId" = String, Query, description = "The project"),
           ("userId" = String, Query, description = "The member")),
    responses((status = 200, description = "The member is removed", body = Done)))]
pub async fn remove_member(app: SharedApp, req: Request) -> ApiResult<Json<Done>> {
    let access = req.access_by_query(&app).await?;
    let user_id = req.param("userId")?;
    let project_id = &access.project.id;
    app.team.remove_member(&access, user_id).await?;
    // Their realtime subscriptions end here and, through NOTIFY, on every other server (their
    // HTTP requests already fail: sessions' access is read on each request).
    app.realtime
        .evict_user(project_id, user_id, MemberChange::Removed);
    app.auth
        .notify_access_change(&AccessChange::MemberRemoved {
            project_id: project_id.clone(),
            user_id: user_id.to_string(),
        })
        .await;
    Ok(Done::reply())
}

/// The answer to a withdrawal.
#[derive(Serialize, utoipa::ToSchema)]
pub struct Withdrawn {
    pub success: bool,
    /// The invitation's state when it was withdrawn: `accepted` means the invitee got in
    /// first (they stay a member: remove them with `DELETE /api/team`).
    pub status: InviteStatus,
}

/// Withdraws an invitation (any state): its id answers 404 from then on.
#[utoipa::path(delete, path = "/api/team/invites", tag = "team", security(("bearer" = [])),
    params(("projectId" = String, Query, description = "The project"),
           ("inviteId" = String, Query, description = "The invitation")),
    responses((status = 200, description = "The invitation is withdrawn", body = Withdrawn)))]
pub async fn revoke_invite(app: SharedApp, req: Request) -> ApiResult<Json<Withdrawn>> {
    let access = req.access_by_query(&app).await?;
    let invite_id = req.param("inviteId")?;
    let status = app.team.revoke_invite(&access, invite_id).await?;
    Ok(Json(Withdrawn {
        success: true,
        status,
    }))
}

/// Accepts or rejects an invitation addressed to the caller.
#[utoipa::path(post, path = "/api/team/invites/accept", tag = "team", security(("bearer" = [])),
    request_body = AnswerRequest,
    responses((status = 200, description = "The answer as recorded", body = AnswerReply)))]
pub async fn answer_invite(app: SharedApp, req: Request) -> ApiResult<Json<AnswerReply>> {
    let principal = req.principal(&app).await?;
    let body = Body::new(req.json()?, &["inviteId", "status"])?;
    let user_id = principal.require_session()?;
    let invite_id = body.string("inviteId")?;
    let answer = Answer::parse(&body.string("status")?).ok_or_else(|| {
        ApiError::BadRequest("status: must be \"accepted\" or \"rejected\"".into())
    })?;
    let answered = app.team.answer_invite(user_id, &invite_id, answer).await?;
    if answered.role_changed {
        // As after a PATCH of the role: subscriptions accepted with the old role end here and,
        // through NOTIFY, on every other server (red team rt13: a member who accepted a viewer
        // invitation kept receiving rows the viewer's policies hide).
        let project_id = answered.invite.project_id.clone().unwrap_or_default();
        app.realtime
            .evict_user(&project_id, user_id, MemberChange::RoleChanged);
        app.auth
            .notify_access_change(&AccessChange::MemberChanged {
                project_id,
                user_id: user_id.to_string(),
            })
            .await;
    }
    Ok(Json(AnswerReply {
        success: true,
        invite: answered.invite,
        member: answered.member,
    }))
}

impl From<TeamError> for ApiError {
    fn from(e: TeamError) -> Self {
        use TeamError::*;
        match e {
            Auth(e) => e.into(),
            AdminRequired | NotTheInvitee | QuotaReached(_) => {
                ApiError::InsufficientPermissions(e.to_string())
            }
            NoSuchAccount(_) => ApiError::UserNotFound(e.to_string()),
            NoSuchInvite(_) | NotAMember(_) => ApiError::NotFound(e.to_string()),
            AlreadyAnswered(_) | InviteExpired(_) | InviteNotVouched | LastAdmin | LastOwner => {
                ApiError::Conflict(e.to_string())
            }
            ProjectGone => ApiError::ProjectNotFound,
            Internal(e) => e.into(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn body_errors_name_the_field() {
        let err = |v: Value, f: &dyn Fn(&Body) -> ApiResult<String>| match Body::new(
            v,
            &["email", "role"],
        )
        .and_then(|b| f(&b))
        {
            Err(ApiError::BadRequest(m)) => m,
            other => panic!("expected a 400, got {:?}", other.map(|_| ())),
        };
        assert!(err(json!({}), &|b| b.string("email")).starts_with("email:"));
        assert!(err(json!({"email": 5}), &|b| b.string("email")).starts_with("email:"));
        assert!(err(json!({"email": "  "}), &|b| b.string("email")).starts_with("email:"));
        assert!(err(json!({"mail": "a"}), &|b| b.string("email")).starts_with("mail:"));
        assert!(err(json!({"role": "owner"}), &|b| b
            .role()
            .map(|r| r.as_str().to_string()))
        .starts_with("role:"));
        assert!(err(json!([1]), &|b| b.string("email")).starts_with("request body"));
        let b = Body::new(
            json!({"email": " A@b.co ", "role": "viewer"}),
            &["email", "role"],
        )
        .unwrap();
        assert_eq!(b.string("email").unwrap(), "A@b.co");
        assert_eq!(b.role().unwrap(), MemberRole::Viewer);
    }
}
