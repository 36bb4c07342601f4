//! Team & invitations: a project's members, their roles, and invitations by email.
//!
//! ```text
//!  admin ── POST /api/team {email, role} ──► invites (pending) ── one row per project and email
//!                                                │
//!  invitee's session ── POST /api/team/invites/accept {inviteId, status} ──► accepted → members
//!                                                                          └► rejected
//! ```
//!
//! * Every team endpoint but the answer to an invitation needs an admin: an admin member or an
//!   admin API key. Anyone else gets 403 `INSUFFICIENT_PERMISSIONS`.
//! * An invitation names a registered account by email (any case); a new invitation to the same
//!   address replaces the earlier one whatever its state (new id, pending again).
//! * Only the invitee's own session answers it (its account's email equals the invitation's).
//! * A project always keeps an admin: changes that would remove or demote its last admin are
//!   refused with 409. Membership changes of one project are serialized by a lock on its row,
//!   so two admins demoting each other at once cannot both succeed.
//! * Access is never cached for sessions: `project_access` reads the membership on every
//!   request, so a removed or demoted member's next request already sees the change. A removed
//!   member's realtime subscriptions are ended on every server (NOTIFY on the access channel).

use chrono::{DateTime, Utc};
use serde_json::{json, Map, Value};
use tokio_postgres::Row;
use warp::http::StatusCode;

use crate::api::error::{ApiError, ApiResult};
use crate::app::App;
use crate::auth::{Access, MemberRole, Principal};
use crate::secrets::random_base62;

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

/// What an invitee answers.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Answer {
    Accepted,
    Rejected,
}

impl Answer {
    fn as_str(self) -> &'static str {
        match self {
            Answer::Accepted => "accepted",
            Answer::Rejected => "rejected",
        }
    }
}

/// Team endpoints are for admins (members or keys) only; the guide's code for everyone else.
fn require_team_admin(access: &Access) -> ApiResult<()> {
    if access.admin {
        return Ok(());
    }
    Err(ApiError::InsufficientPermissions(
        "Only project admins can manage the team (an admin member or an admin API key).".into(),
    ))
}

fn member_json(r: &Row) -> Value {
    json!({
        "userId": r.get::<_, String>("user_id"),
        "email": r.get::<_, String>("email"),
        "displayName": r.get::<_, Option<String>>("display_name"),
        "role": r.get::<_, String>("role"),
        "joinedAt": r.get::<_, DateTime<Utc>>("joined_at"),
    })
}

fn invite_json(r: &Row) -> Value {
    json!({
        "id": r.get::<_, String>("id"),
        "email": r.get::<_, String>("email"),
        "role": r.get::<_, String>("role"),
        "invitedAt": r.get::<_, DateTime<Utc>>("invited_at"),
        "status": r.get::<_, String>("status"),
    })
}

const MEMBER_COLUMNS: &str = "m.user_id, u.email, u.display_name, m.role, m.joined_at";

/// One member of the project, as the API shows members.
async fn member_in(
    tx: &tokio_postgres::Transaction<'_>,
    project_id: &str,
    user_id: &str,
) -> ApiResult<Value> {
    let row = tx
        .query_one(
            &format!(
                "SELECT {MEMBER_COLUMNS} FROM fluxbase.members m
                 JOIN fluxbase.users u ON u.id = m.user_id
                 WHERE m.project_id = $1 AND m.user_id = $2"
            ),
            &[&project_id, &user_id],
        )
        .await?;
    Ok(member_json(&row))
}
const INVITE_COLUMNS: &str = "id, project_id, email, role, status, invited_at";

fn last_admin() -> ApiError {
    ApiError::Conflict(
        "userId: this is the project's last admin; it can be neither removed nor demoted. \
         Make another member admin first."
            .into(),
    )
}

/// Locks the project's row for a membership change (serializing changes of one project) and
/// counts its admins.
async fn lock_team(tx: &tokio_postgres::Transaction<'_>, project_id: &str) -> ApiResult<i64> {
    tx.query_opt(
        "SELECT 1 FROM fluxbase.projects WHERE id = $1 FOR NO KEY UPDATE",
        &[&project_id],
    )
    .await?
    .ok_or(ApiError::ProjectNotFound)?;
    let admins = tx
        .query_one(
            "SELECT count(*) FROM fluxbase.members WHERE project_id = $1 AND role = 'admin'",
            &[&project_id],
        )
        .await?;
    Ok(admins.get(0))
}

impl App {
    /// `GET /api/team?projectId=`: members and invitations (every state).
    pub async fn list_team(&self, access: &Access) -> ApiResult<(StatusCode, Value)> {
        require_team_admin(access)?;
        let client = self.control.get().await?;
        let members: Vec<Value> = client
            .query(
                &format!(
                    "SELECT {MEMBER_COLUMNS} FROM fluxbase.members m
                     JOIN fluxbase.users u ON u.id = m.user_id
                     WHERE m.project_id = $1 ORDER BY m.joined_at, m.user_id"
                ),
                &[&access.project.id],
            )
            .await?
            .iter()
            .map(member_json)
            .collect();
        let invites: Vec<Value> = client
            .query(
                &format!(
                    "SELECT {INVITE_COLUMNS} FROM fluxbase.invites
                     WHERE project_id = $1 ORDER BY invited_at, id"
                ),
                &[&access.project.id],
            )
            .await?
            .iter()
            .map(invite_json)
            .collect();
        Ok((
            StatusCode::OK,
            json!({ "success": true, "members": members, "invites": invites }),
        ))
    }

    /// `POST /api/team {projectId, email, role}`: invites a registered account.
    pub async fn invite(&self, access: &Access, body: Value) -> ApiResult<(StatusCode, Value)> {
        let body = Body::new(body, &["projectId", "email", "role"])?;
        let raw_email = body.string("email")?;
        crate::accounts::check_email_length(&raw_email)?;
        require_team_admin(access)?;
        let email = crate::accounts::normalize_email(&raw_email);
        let role = body.role()?;
        let client = self.control.get().await?;
        let user = client
            .query_opt(
                "SELECT email FROM fluxbase.users WHERE lower(email) = lower($1)",
                &[&email],
            )
            .await?
            .ok_or_else(|| {
                ApiError::UserNotFound(format!(
                    "email: {email:?} does not match any registered Fluxbase account."
                ))
            })?;
        // The account's own spelling of the address is what the team page shows.
        let email: String = user.get(0);
        let invited_by = match &access.principal {
            Principal::Session { user_id, .. } => user_id.clone(),
            Principal::Key { key_id, .. } => key_id.clone(),
        };
        let id = format!("inv_{}", random_base62(16));
        let row = client
            .query_one(
                &format!(
                    "INSERT INTO fluxbase.invites (id, project_id, email, role, invited_by)
                     VALUES ($1, $2, $3, $4, $5)
                     ON CONFLICT (project_id, lower(email)) DO UPDATE SET
                         id = EXCLUDED.id, email = EXCLUDED.email, role = EXCLUDED.role,
                         status = 'pending', invited_by = EXCLUDED.invited_by,
                         invited_at = now(), responded_at = NULL
                     RETURNING {INVITE_COLUMNS}"
                ),
                &[&id, &access.project.id, &email, &role.as_str(), &invited_by],
            )
            .await?;
        tracing::info!(project_id = %access.project.id, invite_id = %id, role = role.as_str(), %invited_by, "invitation sent");
        Ok((
            StatusCode::CREATED,
            json!({ "success": true, "invite": invite_json(&row) }),
        ))
    }

    /// `POST /api/team/invites/accept {inviteId, status}`: the invitee's answer.
    pub async fn answer_invite(
        &self,
        principal: &Principal,
        body: Value,
    ) -> ApiResult<(StatusCode, Value)> {
        let body = Body::new(body, &["inviteId", "status"])?;
        let user_id = principal.require_session()?;
        let invite_id = body.string("inviteId")?;
        let answer = match body.string("status")?.as_str() {
            "accepted" => Answer::Accepted,
            "rejected" => Answer::Rejected,
            _ => {
                return Err(ApiError::BadRequest(
                    "status: must be \"accepted\" or \"rejected\"".into(),
                ))
            }
        };
        let mut client = self.control.get().await?;
        let tx = client.transaction().await?;
        let not_found = || ApiError::NotFound(format!("inviteId: no invitation {invite_id:?}"));
        let invite = tx
            .query_opt(
                "SELECT i.project_id, i.role, i.status, lower(i.email) = lower(u.email)
                 FROM fluxbase.invites i, fluxbase.users u
                 WHERE i.id = $1 AND u.id = $2 FOR UPDATE OF i",
                &[&invite_id, &user_id],
            )
            .await?
            .ok_or_else(not_found)?;
        let (project_id, role, status, mine): (String, String, String, bool) =
            (invite.get(0), invite.get(1), invite.get(2), invite.get(3));
        if !mine {
            return Err(ApiError::InsufficientPermissions(
                "Only the invited account can answer this invitation.".into(),
            ));
        }
        if status != "pending" {
            return Err(ApiError::Conflict(format!(
                "inviteId: this invitation was already {status}; ask an admin for a new one."
            )));
        }
        let mut member = Value::Null;
        if answer == Answer::Accepted {
            let admins = lock_team(&tx, &project_id).await?;
            let current: Option<String> = tx
                .query_opt(
                    "SELECT role FROM fluxbase.members WHERE project_id = $1 AND user_id = $2",
                    &[&project_id, &user_id],
                )
                .await?
                .map(|r| r.get(0));
            if current.as_deref() == Some("admin") && role != "admin" && admins <= 1 {
                return Err(last_admin());
            }
            tx.execute(
                "INSERT INTO fluxbase.members (project_id, user_id, role) VALUES ($1, $2, $3)
                 ON CONFLICT (project_id, user_id) DO UPDATE SET role = EXCLUDED.role",
                &[&project_id, &user_id, &role],
            )
            .await?;
            member = member_in(&tx, &project_id, user_id).await?;
        }
        let row = tx
            .query_one(
                &format!(
                    "UPDATE fluxbase.invites SET status = $2, responded_at = now() WHERE id = $1
                     RETURNING {INVITE_COLUMNS}"
                ),
                &[&invite_id, &answer.as_str()],
            )
            .await?;
        tx.commit().await?;
        tracing::info!(%project_id, %invite_id, %user_id, answer = answer.as_str(), "invitation answered");
        let mut invite = invite_json(&row);
        invite["projectId"] = json!(project_id);
        Ok((
            StatusCode::OK,
            json!({ "success": true, "invite": invite, "member": member }),
        ))
    }

    /// `PATCH /api/team {projectId, userId, role}`: changes a member's role.
    pub async fn change_role(
        &self,
        access: &Access,
        body: Value,
    ) -> ApiResult<(StatusCode, Value)> {
        let body = Body::new(body, &["projectId", "userId", "role"])?;
        require_team_admin(access)?;
        let user_id = body.string("userId")?;
        let role = body.role()?;
        let project_id = &access.project.id;
        let mut client = self.control.get().await?;
        let tx = client.transaction().await?;
        let admins = lock_team(&tx, project_id).await?;
        let current = self.member_role(&tx, project_id, &user_id).await?;
        if current == MemberRole::Admin && role != MemberRole::Admin && admins <= 1 {
            return Err(last_admin());
        }
        tx.execute(
            "UPDATE fluxbase.members SET role = $3 WHERE project_id = $1 AND user_id = $2",
            &[project_id, &user_id, &role.as_str()],
        )
        .await?;
        let member = member_in(&tx, project_id, &user_id).await?;
        tx.commit().await?;
        tracing::info!(%project_id, %user_id, from = current.as_str(), to = role.as_str(), "member role changed");
        Ok((StatusCode::OK, json!({ "success": true, "member": member })))
    }

    /// `DELETE /api/team?projectId=&userId=`: removes a member.
    pub async fn remove_member(
        &self,
        access: &Access,
        user_id: &str,
    ) -> ApiResult<(StatusCode, Value)> {
        require_team_admin(access)?;
        let project_id = &access.project.id;
        let mut client = self.control.get().await?;
        let tx = client.transaction().await?;
        let admins = lock_team(&tx, project_id).await?;
        let current = self.member_role(&tx, project_id, user_id).await?;
        if current == MemberRole::Admin && admins <= 1 {
            return Err(last_admin());
        }
        tx.execute(
            "DELETE FROM fluxbase.members WHERE project_id = $1 AND user_id = $2",
            &[project_id, &user_id],
        )
        .await?;
        tx.commit().await?;
        drop(client);
        tracing::info!(%project_id, %user_id, "member removed");
        self.member_removed(project_id, user_id).await;
        Ok((StatusCode::OK, json!({ "success": true })))
    }

    async fn member_role(
        &self,
        tx: &tokio_postgres::Transaction<'_>,
        project_id: &str,
        user_id: &str,
    ) -> ApiResult<MemberRole> {
        let role: String = tx
            .query_opt(
                "SELECT role FROM fluxbase.members WHERE project_id = $1 AND user_id = $2",
                &[&project_id, &user_id],
            )
            .await?
            .ok_or_else(|| {
                ApiError::NotFound(format!(
                    "userId: {user_id:?} is not a member of this project"
                ))
            })?
            .get(0);
        Ok(MemberRole::parse(&role).ok_or_else(|| anyhow::anyhow!("bad role {role:?}"))?)
    }

    /// Whether `user_id` is a member of `project_id` now.
    pub async fn is_member(&self, project_id: &str, user_id: &str) -> ApiResult<bool> {
        let client = self.control.get().await?;
        Ok(client
            .query_opt(
                "SELECT 1 FROM fluxbase.members WHERE project_id = $1 AND user_id = $2",
                &[&project_id, &user_id],
            )
            .await?
            .is_some())
    }

    /// The pending invitations addressed to a user's email, for `GET /api/auth/me`.
    pub async fn pending_invites_for(&self, user_id: &str) -> ApiResult<Vec<Value>> {
        let client = self.control.get().await?;
        let rows = client
            .query(
                "SELECT i.id, i.project_id, p.name, i.role, i.invited_at, i.status
                 FROM fluxbase.invites i
                 JOIN fluxbase.projects p ON p.id = i.project_id
                 JOIN fluxbase.users u ON lower(u.email) = lower(i.email)
                 WHERE u.id = $1 AND i.status = 'pending' ORDER BY i.invited_at, i.id",
                &[&user_id],
            )
            .await?;
        Ok(rows
            .iter()
            .map(|r| {
                json!({
                    "id": r.get::<_, String>(0),
                    "projectId": r.get::<_, String>(1),
                    "projectName": r.get::<_, String>(2),
                    "role": r.get::<_, String>(3),
                    "invitedAt": r.get::<_, DateTime<Utc>>(4),
                    "status": r.get::<_, String>(5),
                })
            })
            .collect())
    }

    /// A member is gone: their realtime subscriptions to the project end here and, through
    /// NOTIFY, on every other server (their HTTP requests already fail: sessions' access is
    /// read from the control database on each request).
    async fn member_removed(&self, project_id: &str, user_id: &str) {
        self.realtime.evict_user(project_id, user_id);
        self.notify_access_change(&crate::auth::member_removed_payload(project_id, user_id))
            .await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

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
