//! `fluxbase.instance`: the one row the first run writes (its default user and project), and
//! the advisory lock that makes one initializer run at a time across processes.

use deadpool_postgres::GenericClient;
use tokio_postgres::Error;

const INIT_LOCK: i64 = 7245002;

pub async fn lock(db: &impl GenericClient) -> Result<u64, Error> {
    db.execute("SELECT pg_advisory_lock($1)", &[&INIT_LOCK])
        .await
}

pub async fn unlock(db: &impl GenericClient) -> Result<u64, Error> {
    db.execute("SELECT pg_advisory_unlock($1)", &[&INIT_LOCK])
        .await
}

/// What the first run created (each `None` once deleted since).
pub struct InstanceRow {
    pub project_id: Option<String>,
    pub project_name: Option<String>,
    pub user_email: Option<String>,
}

pub async fn get(db: &impl GenericClient) -> Result<Option<InstanceRow>, Error> {
    Ok(db
        .query_opt(
            "SELECT i.default_project, p.name, u.email FROM fluxbase.instance i
             LEFT JOIN fluxbase.projects p ON p.id = i.default_project
             LEFT JOIN fluxbase.users u ON u.id = i.default_user",
            &[],
        )
        .await?
        .map(|r| InstanceRow {
            project_id: r.get(0),
            project_name: r.get(1),
            user_email: r.get(2),
        }))
}

pub async fn insert(
    db: &impl GenericClient,
    user_id: &str,
    project_id: &str,
) -> Result<u64, Error> {
    db.execute(
        "INSERT INTO fluxbase.instance (default_user, default_project) VALUES ($1, $2)",
        &[&user_id, &project_id],
    )
    .await
}

pub async fn default_user(db: &impl GenericClient) -> Result<Option<String>, Error> {
    Ok(db
        .query_opt("SELECT default_user FROM fluxbase.instance", &[])
        .await?
        .and_then(|r| r.get(0)))
}
