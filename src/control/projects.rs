//! `fluxbase.projects`: one row per project (its database, status, bootstrap version and
//! replication slot).

use chrono::{DateTime, Utc};
use deadpool_postgres::GenericClient;
use tokio_postgres::{Error, Row};

use crate::auth::MemberRole;
use crate::projects::{Engine, Project, ProjectStatus};

impl TryFrom<&Row> for Project {
    type Error = Error;
    fn try_from(r: &Row) -> Result<Self, Error> {
        Ok(Project {
            id: r.try_get("id")?,
            name: r.try_get("name")?,
            engine: engine(r.try_get("engine")?),
            status: r.try_get("status")?,
            realtime_public: r.try_get("realtime_public")?,
            db_name: r.try_get("db_name")?,
            created_at: r.try_get("created_at")?,
            owner: r.try_get("owner")?,
        })
    }
}

/// The column is checked to these two values (control migration 13).
fn engine(text: &str) -> Engine {
    Engine::parse(text).unwrap_or_default()
}

/// The owner of the `projects` row at hand: the admin who joined first among those who chose
/// the role (control migration 22; `members` by its primary key: a project has a handful of
/// members). A macro: `concat!` takes literals only.
macro_rules! owner {
    () => {
        "(SELECT m.user_id FROM fluxbase.members m WHERE m.project_id = projects.id \
         AND m.role = 'admin' AND m.chose_admin ORDER BY m.joined_at, m.user_id LIMIT 1)"
    };
}

/// The project's columns and its owner.
const PROJECT_COLUMNS: &str = concat!(
    "id, name, engine, status, realtime_public, db_name, created_at, ",
    owner!(),
    " AS owner"
);

pub async fn get(db: &impl GenericClient, project_id: &str) -> Result<Option<Project>, Error> {
    db.query_opt(
        &format!("SELECT {PROJECT_COLUMNS} FROM fluxbase.projects WHERE id = $1"),
        &[&project_id],
    )
    .await?
    .as_ref()
    .map(Project::try_from)
    .transpose()
}

/// The projects among `ids` that exist, each with its owner (see [`PROJECT_COLUMNS`]).
pub async fn owners(
    db: &impl GenericClient,
    ids: &[&str],
) -> Result<Vec<(String, Option<String>)>, Error> {
    Ok(db
        .query(
            concat!(
                "SELECT id, ",
                owner!(),
                " FROM fluxbase.projects WHERE id = ANY($1)"
            ),
            &[&ids],
        )
        .await?
        .iter()
        .map(|r| (r.get(0), r.get(1)))
        .collect())
}

pub async fn exists(db: &impl GenericClient, project_id: &str) -> Result<bool, Error> {
    Ok(db
        .query_opt(
            "SELECT 1 FROM fluxbase.projects WHERE id = $1",
            &[&project_id],
        )
        .await?
        .is_some())
}

/// A project in a list, with the caller's role when the caller is a member.
pub struct Listed {
    pub id: String,
    pub name: String,
    pub engine: Engine,
    pub status: ProjectStatus,
    pub realtime_public: bool,
    pub created_at: DateTime<Utc>,
    pub role: Option<MemberRole>,
}

fn listed(r: &Row) -> Result<Listed, Error> {
    Ok(Listed {
        id: r.try_get(0)?,
        name: r.try_get(1)?,
        status: r.try_get(2)?,
        realtime_public: r.try_get(3)?,
        created_at: r.try_get(4)?,
        role: r.try_get(5)?,
        engine: engine(r.try_get(6)?),
    })
}

/// The projects `user_id` is a member of, oldest first.
pub async fn of_member(db: &impl GenericClient, user_id: &str) -> Result<Vec<Listed>, Error> {
    db.query(
        "SELECT p.id, p.name, p.status, p.realtime_public, p.created_at, m.role, p.engine
         FROM fluxbase.projects p JOIN fluxbase.members m ON m.project_id = p.id
         WHERE m.user_id = $1 ORDER BY p.created_at",
        &[&user_id],
    )
    .await?
    .iter()
    .map(listed)
    .collect()
}

/// The one project (as a list: none when it is gone), with no role.
pub async fn listed_by_id(db: &impl GenericClient, project_id: &str) -> Result<Vec<Listed>, Error> {
    db.query(
        "SELECT id, name, status, realtime_public, created_at, NULL::text, engine
         FROM fluxbase.projects WHERE id = $1",
        &[&project_id],
    )
    .await?
    .iter()
    .map(listed)
    .collect()
}

/// Inserts a new project's row; its creation time.
pub async fn insert(
    db: &impl GenericClient,
    project_id: &str,
    name: &str,
    db_name: &str,
    bootstrap_version: i32,
    engine: Engine,
) -> Result<DateTime<Utc>, Error> {
    Ok(db
        .query_one(
            "INSERT INTO fluxbase.projects (id, name, db_name, bootstrap_version, engine)
             VALUES ($1, $2, $3, $4, $5) RETURNING created_at",
            &[
                &project_id,
                &name,
                &db_name,
                &bootstrap_version,
                &engine.as_str(),
            ],
        )
        .await?
        .get(0))
}

pub async fn delete(db: &impl GenericClient, project_id: &str) -> Result<u64, Error> {
    db.execute(
        "DELETE FROM fluxbase.projects WHERE id = $1",
        &[&project_id],
    )
    .await
}

/// Changes the name and/or realtime visibility (`None` keeps the current value).
pub async fn update(
    db: &impl GenericClient,
    project_id: &str,
    name: Option<&str>,
    realtime_public: Option<bool>,
) -> Result<u64, Error> {
    db.execute(
        "UPDATE fluxbase.projects SET name = coalesce($2, name),
                realtime_public = coalesce($3, realtime_public) WHERE id = $1",
        &[&project_id, &name, &realtime_public],
    )
    .await
}

/// Sets the status; whether the project exists.
pub async fn set_status(
    db: &impl GenericClient,
    project_id: &str,
    status: ProjectStatus,
) -> Result<bool, Error> {
    Ok(db
        .execute(
            "UPDATE fluxbase.projects SET status = $2 WHERE id = $1",
            &[&project_id, &status],
        )
        .await?
        > 0)
}

pub async fn set_bootstrap_version(
    db: &impl GenericClient,
    project_id: &str,
    version: i32,
) -> Result<u64, Error> {
    db.execute(
        "UPDATE fluxbase.projects SET bootstrap_version = $2 WHERE id = $1",
        &[&project_id, &version],
    )
    .await
}

/// (id, database, bootstrap version) of the PostgreSQL projects below `latest`.
pub async fn behind(
    db: &impl GenericClient,
    latest: i32,
) -> Result<Vec<(String, String, i32)>, Error> {
    Ok(db
        .query(
            "SELECT id, db_name, bootstrap_version FROM fluxbase.projects
             WHERE bootstrap_version < $1 AND engine = 'postgresql'",
            &[&latest],
        )
        .await?
        .iter()
        .map(|r| (r.get(0), r.get(1), r.get(2)))
        .collect())
}

/// (id, database) of the PostgreSQL projects with no replication slot recorded.
pub async fn without_slot(db: &impl GenericClient) -> Result<Vec<(String, String)>, Error> {
    Ok(db
        .query(
            "SELECT id, db_name FROM fluxbase.projects WHERE cdc_slot IS NULL AND engine = 'postgresql'",
            &[],
        )
        .await?
        .iter()
        .map(|r| (r.get(0), r.get(1)))
        .collect())
}

/// How many projects there are: of every engine, and of MySQL. (PostgreSQL's room is counted
/// in the cluster's own slots and walsenders, which other users of the cluster take too.)
pub async fn counts(db: &impl GenericClient) -> Result<(i64, i64), Error> {
    let r = db
        .query_one(
            "SELECT count(*), count(*) FILTER (WHERE engine = 'mysql') FROM fluxbase.projects",
            &[],
        )
        .await?;
    Ok((r.get(0), r.get(1)))
}

/// The ids of the PostgreSQL projects (those with project roles in the cluster).
pub async fn all_ids(db: &impl GenericClient) -> Result<Vec<String>, Error> {
    Ok(db
        .query(
            "SELECT id FROM fluxbase.projects WHERE engine = 'postgresql'",
            &[],
        )
        .await?
        .iter()
        .map(|r| r.get(0))
        .collect())
}

/// The replication slot recorded for a project (`None`: none yet).
pub async fn slot(db: &impl GenericClient, project_id: &str) -> Result<Option<String>, Error> {
    db.query_one(
        "SELECT cdc_slot FROM fluxbase.projects WHERE id = $1",
        &[&project_id],
    )
    .await?
    .try_get(0)
}

/// Records a project's replication slot.
pub async fn set_slot(db: &impl GenericClient, project_id: &str, slot: &str) -> Result<u64, Error> {
    db.execute(
        "UPDATE fluxbase.projects SET cdc_slot = $2 WHERE id = $1",
        &[&project_id, &slot],
    )
    .await
}

/// (id, database, engine) of the projects whose change stream has where to start: a
/// PostgreSQL project's replication slot made, a MySQL project's first binlog position
/// recorded. Cluster mode leads these (a project being created has its row before either),
/// whatever their status: a suspended project is streamed as a single server streams it
/// ([`streamed`]), so its slot does not hold WAL and its binlog position follows the log.
pub async fn led(db: &impl GenericClient) -> Result<Vec<(String, String, Engine)>, Error> {
    Ok(db
        .query(
            "SELECT id, db_name, engine FROM fluxbase.projects p
             WHERE ((engine = 'postgresql' AND cdc_slot IS NOT NULL)
                 OR (engine = 'mysql' AND EXISTS (SELECT 1 FROM fluxbase.binlog_positions b
                                                  WHERE b.project_id = p.id)))
             ORDER BY created_at",
            &[],
        )
        .await?
        .iter()
        .map(|r| (r.get(0), r.get(1), engine(r.get(2))))
        .collect())
}

/// (id, database, engine) of the projects a single server streams, oldest first: every
/// project, whatever its status or engine. A suspended project's stream runs on (its room keeps
/// its history, its webhooks their outbox, as on PostgreSQL, whose slot would otherwise hold
/// WAL): a suspended MySQL project's stored position follows the log rather than pinning old
/// binlog files until retention purges them and the resumed project is `slot_lost`.
pub async fn streamed(db: &impl GenericClient) -> Result<Vec<(String, String, Engine)>, Error> {
    Ok(db
        .query(
            "SELECT id, db_name, engine FROM fluxbase.projects ORDER BY created_at",
            &[],
        )
        .await?
        .iter()
        .map(|r| (r.get(0), r.get(1), engine(r.get(2))))
        .collect())
}

/// Every MySQL project, oldest first.
pub async fn mysql_projects(db: &impl GenericClient) -> Result<Vec<Project>, Error> {
    db.query(
        &format!(
            "SELECT {PROJECT_COLUMNS} FROM fluxbase.projects WHERE engine = 'mysql' ORDER BY created_at"
        ),
        &[],
    )
    .await?
    .iter()
    .map(Project::try_from)
    .collect()
}
