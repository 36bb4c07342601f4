//! `fluxbase.invites`: invitations by email, one row per project and address (a new one
//! replaces the earlier one whatever its state).
//!
//! An invitation is answerable while it is pending, younger than the invitation lifetime
//! (`invite_ttl_secs`) and vouched for by its sender: a member who is still an admin of the
//! project, or an admin key still live and not rotated since (red team rt13: a removed member,
//! or the holder of a leaked admin key deleted since, came back as admin and owner through an
//! invitation nobody could withdraw). Queries with a `$ttl` parameter take the lifetime in
//! seconds.

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
    pub expires_at: DateTime<Utc>,
    /// Pending, not expired, and its sender still vouches for it.
    pub answerable: bool,
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
            expires_at: r.try_get("expires_at")?,
            answerable: r.try_get("answerable")?,
        })
    }
}

/// Whether the sender of invitation `i` still vouches for it: an admin member of its project,
/// or an admin key of it, live and still with the secret that sent it (invitations from before
/// control migration 26 carry no secret's hash: not rotated since they were sent). A time
/// alone let a request authenticated with the old secret just before a rotation committed send
/// one that counted for the new secret (red team rt15).
const VOUCHED: &str = "(EXISTS (SELECT 1 FROM fluxbase.members m
        WHERE m.project_id = i.project_id AND m.user_id = i.invited_by AND m.role = 'admin')
    OR EXISTS (SELECT 1 FROM fluxbase.api_keys k
        WHERE k.id = i.invited_by AND k.project_id = i.project_id AND k.revoked_at IS NULL
          AND k.scope = 'admin'
          AND CASE WHEN i.invited_by_key_hash IS NULL
                   THEN coalesce(k.rotated_at, k.created_at) <= i.invited_at
                   ELSE k.key_hash = i.invited_by_key_hash END))";

/// When invitation `i` expires; `ttl` is the parameter holding the lifetime in seconds.
fn expires(ttl: &str) -> String {
    format!("i.invited_at + make_interval(secs => {ttl}::int)")
}

/// The columns of an [`InviteRow`] of invitation `i`.
fn invite_columns(ttl: &str) -> String {
    let expires = expires(ttl);
    format!(
        "i.id, i.project_id, i.email, i.role, i.status, i.invited_at, {expires} AS expires_at,
         (i.status = 'pending' AND {expires} > now() AND {VOUCHED}) AS answerable"
    )
}

/// Every invitation of a project (every state), oldest first.
pub async fn list(
    db: &impl GenericClient,
    project_id: &str,
    ttl_secs: i32,
) -> Result<Vec<InviteRow>, Error> {
    db.query(
        &format!(
            "SELECT {} FROM fluxbase.invites i
             WHERE i.project_id = $1 ORDER BY i.invited_at, i.id",
            invite_columns("$2")
        ),
        &[&project_id, &ttl_secs],
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
    /// The hash of the key's secret that sent it (`None`: sent by a member).
    pub invited_by_key_hash: Option<&'a [u8]>,
}

/// Invites `email`, replacing an earlier invitation of the same address (pending again).
pub async fn upsert(
    db: &impl GenericClient,
    invite: &NewInvite<'_>,
    ttl_secs: i32,
) -> Result<InviteRow, Error> {
    let row = db
        .query_one(
            &format!(
                "INSERT INTO fluxbase.invites AS i
                     (id, project_id, email, role, invited_by, invited_by_key_hash)
                 VALUES ($1, $2, $3, $4, $5, $7)
                 ON CONFLICT (project_id, lower(email)) DO UPDATE SET
                     id = EXCLUDED.id, email = EXCLUDED.email, role = EXCLUDED.role,
                     status = 'pending', invited_by = EXCLUDED.invited_by,
                     invited_by_key_hash = EXCLUDED.invited_by_key_hash,
                     invited_at = now(), responded_at = NULL
                 RETURNING {}",
                invite_columns("$6")
            ),
            &[
                &invite.id,
                &invite.project_id,
                &invite.email,
                &invite.role,
                &invite.invited_by,
                &ttl_secs,
                &invite.invited_by_key_hash,
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
    /// Whether its lifetime has passed.
    pub expired: bool,
    /// Whether its sender still vouches for it (see the module docs).
    pub vouched: bool,
}

/// The invitation `invite_id` locked for the answer of `user_id`.
pub async fn lock_for_answer(
    db: &impl GenericClient,
    invite_id: &str,
    user_id: &str,
    ttl_secs: i32,
) -> Result<Option<Addressed>, Error> {
    db.query_opt(
        &format!(
            "SELECT i.project_id, i.role, i.status, lower(i.email) = lower(u.email),
                    {} <= now(), {VOUCHED}
             FROM fluxbase.invites i, fluxbase.users u
             WHERE i.id = $1 AND u.id = $2 FOR UPDATE OF i",
            expires("$3")
        ),
        &[&invite_id, &user_id, &ttl_secs],
    )
    .await?
    .map(|r| {
        Ok(Addressed {
            project_id: r.try_get(0)?,
            role: r.try_get(1)?,
            status: r.try_get(2)?,
            to_user: r.try_get(3)?,
            expired: r.try_get(4)?,
            vouched: r.try_get(5)?,
        })
    })
    .transpose()
}

/// The project of invitation `invite_id` (not locked: see [`lock_for_answer`]).
pub async fn project_of(db: &impl GenericClient, invite_id: &str) -> Result<Option<String>, Error> {
    db.query_opt(
        "SELECT project_id FROM fluxbase.invites WHERE id = $1",
        &[&invite_id],
    )
    .await?
    .map(|r| r.try_get(0))
    .transpose()
}

/// Withdraws an invitation of the project (any state); its state when it was withdrawn, or
/// `None` when the project has no such invitation. An answer in progress is waited for (the
/// row is locked by it), so `accepted` says the invitee got in first.
pub async fn revoke(
    db: &impl GenericClient,
    project_id: &str,
    invite_id: &str,
) -> Result<Option<InviteStatus>, Error> {
    db.query_opt(
        "DELETE FROM fluxbase.invites WHERE id = $1 AND project_id = $2 RETURNING status",
        &[&invite_id, &project_id],
    )
    .await?
    .map(|r| r.try_get(0))
    .transpose()
}

/// Withdraws the pending invitations of the project sent by `sender` (a user id or a key id):
/// called when the sender stops vouching for them (an admin removed or demoted, a key revoked
/// or rotated), so that they stay void if it vouches again later (an admin made admin again).
/// [`VOUCHED`] is the check at acceptance; this keeps what it judged from coming back.
pub async fn drop_pending_sent_by(
    db: &impl GenericClient,
    project_id: &str,
    sender: &str,
) -> Result<u64, Error> {
    db.execute(
        "DELETE FROM fluxbase.invites
         WHERE project_id = $1 AND invited_by = $2 AND status = 'pending'",
        &[&project_id, &sender],
    )
    .await
}

/// Withdraws the pending invitations of the project addressed to a user's account: a member
/// removed or given another role must not undo it by accepting one sent earlier.
pub async fn drop_pending_for_member(
    db: &impl GenericClient,
    project_id: &str,
    user_id: &str,
) -> Result<u64, Error> {
    db.execute(
        "DELETE FROM fluxbase.invites i USING fluxbase.users u
         WHERE i.project_id = $1 AND u.id = $2 AND lower(i.email) = lower(u.email)
           AND i.status = 'pending'",
        &[&project_id, &user_id],
    )
    .await
}

/// Records the invitee's answer.
pub async fn answer(
    db: &impl GenericClient,
    invite_id: &str,
    status: InviteStatus,
    ttl_secs: i32,
) -> Result<InviteRow, Error> {
    let row = db
        .query_one(
            &format!(
                "UPDATE fluxbase.invites i SET status = $2, responded_at = now() WHERE i.id = $1
                 RETURNING {}",
                invite_columns("$3")
            ),
            &[&invite_id, &status, &ttl_secs],
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

/// The answerable invitations addressed to a user's email, oldest first.
pub async fn pending_for(
    db: &impl GenericClient,
    user_id: &str,
    ttl_secs: i32,
) -> Result<Vec<PendingRow>, Error> {
    db.query(
        &format!(
            "SELECT i.id, i.project_id, p.name, i.role, i.invited_at, i.status
             FROM fluxbase.invites i
             JOIN fluxbase.projects p ON p.id = i.project_id
             JOIN fluxbase.users u ON lower(u.email) = lower(i.email)
             WHERE u.id = $1 AND i.status = 'pending' AND {} > now() AND {VOUCHED}
             ORDER BY i.invited_at, i.id",
            expires("$2")
        ),
        &[&user_id, &ttl_secs],
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
