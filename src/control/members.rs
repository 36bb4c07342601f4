//! `fluxbase.members`: who belongs to which project, with which role.

use chrono::{DateTime, Utc};
use deadpool_postgres::GenericClient;
use tokio_postgres::{Error, Row};

use crate::auth::MemberRole;

/// A member as the team page shows it (with the account's email and name).
pub struct MemberRow {
    pub user_id: String,
    pub email: String,
    pub display_name: Option<String>,
    pub role: MemberRole,
    pub joined_at: DateTime<Utc>,
    /// An admin who chose the role: one of the project's owners.
    pub owner: bool,
}

impl TryFrom<&Row> for MemberRow {
    type Error = Error;
    fn try_from(r: &Row) -> Result<Self, Error> {
        Ok(MemberRow {
            user_id: r.try_get("user_id")?,
            email: r.try_get("email")?,
            display_name: r.try_get("display_name")?,
            role: r.try_get("role")?,
            joined_at: r.try_get("joined_at")?,
            owner: r.try_get("owner")?,
        })
    }
}

const MEMBER_COLUMNS: &str = "m.user_id, u.email, u.display_name, m.role, m.joined_at,
     m.role = 'admin' AND m.chose_admin AS owner";

/// A project a user belongs to, with their role.
pub struct Membership {
    pub project_id: String,
    pub project_name: String,
    pub role: MemberRole,
}

/// The role of `user_id` in `project_id`, if a member.
pub async fn role(
    db: &impl GenericClient,
    project_id: &str,
    user_id: &str,
) -> Result<Option<MemberRole>, Error> {
    db.query_opt(
        "SELECT role FROM fluxbase.members WHERE project_id = $1 AND user_id = $2",
        &[&project_id, &user_id],
    )
    .await?
    .map(|r| r.try_get(0))
    .transpose()
}

/// `user_id`'s role in the project and whether they are one of its owners (an admin who chose
/// the role), if a member.
pub async fn standing(
    db: &impl GenericClient,
    project_id: &str,
    user_id: &str,
) -> Result<Option<(MemberRole, bool)>, Error> {
    db.query_opt(
        "SELECT role, role = 'admin' AND chose_admin FROM fluxbase.members
         WHERE project_id = $1 AND user_id = $2",
        &[&project_id, &user_id],
    )
    .await?
    .map(|r| Ok((r.try_get(0)?, r.try_get(1)?)))
    .transpose()
}

/// How many projects `user_id` administers.
pub async fn administered_by(db: &impl GenericClient, user_id: &str) -> Result<i64, Error> {
    Ok(db
        .query_one(
            "SELECT count(*) FROM fluxbase.members
             WHERE user_id = $1 AND role = 'admin' AND chose_admin",
            &[&user_id],
        )
        .await?
        .get(0))
}

/// Adds a member, or changes the role of one, as the member chose it (an accepted invitation):
/// an admin so added chose the admin role.
pub async fn upsert(
    db: &impl GenericClient,
    project_id: &str,
    user_id: &str,
    role: MemberRole,
) -> Result<u64, Error> {
    db.execute(
        "INSERT INTO fluxbase.members (project_id, user_id, role, chose_admin)
         VALUES ($1, $2, $3, $3 = 'admin')
         ON CONFLICT (project_id, user_id)
         DO UPDATE SET role = EXCLUDED.role, chose_admin = EXCLUDED.chose_admin",
        &[&project_id, &user_id, &role],
    )
    .await
}

/// Adds a member who chose `role` (the project's creator).
pub async fn insert(
    db: &impl GenericClient,
    project_id: &str,
    user_id: &str,
    role: MemberRole,
) -> Result<u64, Error> {
    db.execute(
        "INSERT INTO fluxbase.members (project_id, user_id, role, chose_admin)
         VALUES ($1, $2, $3, $3 = 'admin')",
        &[&project_id, &user_id, &role],
    )
    .await
}

/// Another admin changes a member's role: a member made admin so did not choose it (nor does
/// one who chose it once and was demoted since).
pub async fn set_role(
    db: &impl GenericClient,
    project_id: &str,
    user_id: &str,
    role: MemberRole,
) -> Result<u64, Error> {
    db.execute(
        "UPDATE fluxbase.members SET role = $3, chose_admin = chose_admin AND $3 = 'admin'
         WHERE project_id = $1 AND user_id = $2",
        &[&project_id, &user_id, &role],
    )
    .await
}

pub async fn delete(
    db: &impl GenericClient,
    project_id: &str,
    user_id: &str,
) -> Result<u64, Error> {
    db.execute(
        "DELETE FROM fluxbase.members WHERE project_id = $1 AND user_id = $2",
        &[&project_id, &user_id],
    )
    .await
}

/// One member with their account's details.
pub async fn get(
    db: &impl GenericClient,
    project_id: &str,
    user_id: &str,
) -> Result<MemberRow, Error> {
    let row = db
        .query_one(
            &format!(
                "SELECT {MEMBER_COLUMNS} FROM fluxbase.members m
                 JOIN fluxbase.users u ON u.id = m.user_id
                 WHERE m.project_id = $1 AND m.user_id = $2"
            ),
            &[&project_id, &user_id],
        )
        .await?;
    MemberRow::try_from(&row)
}

/// Every member of a project, in the order they joined.
pub async fn list(db: &impl GenericClient, project_id: &str) -> Result<Vec<MemberRow>, Error> {
    db.query(
        &format!(
            "SELECT {MEMBER_COLUMNS} FROM fluxbase.members m
             JOIN fluxbase.users u ON u.id = m.user_id
             WHERE m.project_id = $1 ORDER BY m.joined_at, m.user_id"
        ),
        &[&project_id],
    )
    .await?
    .iter()
    .map(MemberRow::try_from)
    .collect()
}

/// The projects a user belongs to, oldest first.
pub async fn of_user(db: &impl GenericClient, user_id: &str) -> Result<Vec<Membership>, Error> {
    db.query(
        "SELECT p.id, p.name, m.role FROM fluxbase.members m
         JOIN fluxbase.projects p ON p.id = m.project_id
         WHERE m.user_id = $1 ORDER BY p.created_at",
        &[&user_id],
    )
    .await?
    .iter()
    .map(|r| {
        Ok(Membership {
            project_id: r.try_get(0)?,
            project_name: r.try_get(1)?,
            role: r.try_get(2)?,
        })
    })
    .collect()
}

/// A project's admins, and of them its owners: the admins who chose the role (creating the
/// project or accepting an admin invitation), whose account the project counts for.
#[derive(Clone, Copy, Debug)]
pub struct Admins {
    pub admins: i64,
    pub owners: i64,
}

/// Locks the project's row for a membership change (serializing the changes of one project)
/// and counts its admins and owners; `None` when the project is gone.
pub async fn lock_team(db: &impl GenericClient, project_id: &str) -> Result<Option<Admins>, Error> {
    if db
        .query_opt(
            "SELECT 1 FROM fluxbase.projects WHERE id = $1 FOR NO KEY UPDATE",
            &[&project_id],
        )
        .await?
        .is_none()
    {
        return Ok(None);
    }
    let row = db
        .query_one(
            "SELECT count(*), count(*) FILTER (WHERE chose_admin)
             FROM fluxbase.members WHERE project_id = $1 AND role = 'admin'",
            &[&project_id],
        )
        .await?;
    Ok(Some(Admins {
        admins: row.get(0),
        owners: row.get(1),
    }))
}
