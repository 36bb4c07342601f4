//! `fluxbase.invites`: invitations by email, one row per project and address (a new one
//! replaces the earlier one whatever its state).

use chrono::{DateTime, Utc};
use deadpool_postgres::GenericClient;
use tokio_postgres::{Error, Row};

use crate::auth::MemberRole;
use crate::team::InviteStatus;

pub struct InviteRow {
    pub id: String,
    pub project_id: String,
    pub email: String,
    pub role: MemberRole,
    pub status: InviteStatus,
    pub invited_at: DateTime<Utc>,
}

impl TryFrom<&Row> for InviteRow {
    type Error = Error;
    fn try_from(r: &Row) -> Result<Self, Error> {
        Ok(InviteRow {
            id: r.try_get("id")?,
            project_id: r.try_get("project_id")?,
            email: r.try_get("email")?,
            role: r.try_get("role")?,
            status: r.try_get("status")?,
            invited_at: r.try_get("invited_at")?,
        })
    }
}

const INVITE_COLUMNS: &str = "id, project_id, email, role, status, invited_at";

/// Every invitation of a project (every state), oldest first.
pub async fn list(db: &impl GenericClient, project_id: &str) -> Result<Vec<InviteRow>, Error> {
    db.query(
        &format!(
            "SELECT {INVITE_COLUMNS} FROM fluxbase.invites
             WHERE project_id = $1 ORDER BY invited_at, id"
        ),
        &[&project_id],
    )
    .await?
    .iter()
    .map(InviteRow::try_from)
    .collect()
}

pub struct NewInvite<'a> {
    pub id: &'a str,
    pub project_id: &'a str,
    pub email: &'a str,
    pub role: MemberRole,
    /// A user id, or the id of the admin key.
    pub invited_by: &'a str,
}

/// Invites `email`, replacing an earlier invitation of the same address (pending again).
pub async fn upsert(db: &impl GenericClient, invite: &NewInvite<'_>) -> Result<InviteRow, Error> {
    let row = db
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
            &[
                &invite.id,
                &invite.project_id,
                &invite.email,
                &invite.role,
                &invite.invited_by,
            ],
        )
        .await?;
    InviteRow::try_from(&row)
}

/// An invitation as its invitee sees it before answering.
pub struct Addressed {
    pub project_id: String,
    pub role: MemberRole,
    pub status: InviteStatus,
    /// Whether it is addressed to the user's email.
    pub to_user: bool,
}

/// The invitation `invite_id` locked for the answer of `user_id`.
pub async fn lock_for_answer(
    db: &impl GenericClient,
    invite_id: &str,
    user_id: &str,
) -> Result<Option<Addressed>, Error> {
    db.query_opt(
        "SELECT i.project_id, i.role, i.status, lower(i.email) = lower(u.email)
         FROM fluxbase.invites i, fluxbase.users u
         WHERE i.id = $1 AND u.id = $2 FOR UPDATE OF i",
        &[&invite_id, &user_id],
    )
    .await?
    .map(|r| {
        Ok(Addressed {
            project_id: r.try_get(0)?,
            role: r.try_get(1)?,
            status: r.try_get(2)?,
            to_user: r.try_get(3)?,
        })
    })
    .transpose()
}

/// Records the invitee's answer.
pub async fn answer(
    db: &impl GenericClient,
    invite_id: &str,
    status: InviteStatus,
) -> Result<InviteRow, Error> {
    let row = db
        .query_one(
            &format!(
                "UPDATE fluxbase.invites SET status = $2, responded_at = now() WHERE id = $1
                 RETURNING {INVITE_COLUMNS}"
            ),
            &[&invite_id, &status],
        )
        .await?;
    InviteRow::try_from(&row)
}

/// A pending invitation addressed to a user, with its project's name.
pub struct PendingRow {
    pub id: String,
    pub project_id: String,
    pub project_name: String,
    pub role: MemberRole,
    pub invited_at: DateTime<Utc>,
    pub status: InviteStatus,
}

/// The pending invitations addressed to a user's email, oldest first.
pub async fn pending_for(db: &impl GenericClient, user_id: &str) -> Result<Vec<PendingRow>, Error> {
    db.query(
        "SELECT i.id, i.project_id, p.name, i.role, i.invited_at, i.status
         FROM fluxbase.invites i
         JOIN fluxbase.projects p ON p.id = i.project_id
         JOIN fluxbase.users u ON lower(u.email) = lower(i.email)
         WHERE u.id = $1 AND i.status = 'pending' ORDER BY i.invited_at, i.id",
        &[&user_id],
    )
    .await?
    .iter()
    .map(|r| {
        Ok(PendingRow {
            id: r.try_get(0)?,
            project_id: r.try_get(1)?,
            project_name: r.try_get(2)?,
            role: r.try_get(3)?,
            invited_at: r.try_get(4)?,
            status: r.try_get(5)?,
        })
    })
    .collect()
}
