//! `fluxbase.project_teardowns` (control migration 27): the project databases and roles to drop
//! that no project row stands for any more, or not yet. A creation records its project before
//! it makes anything and removes the record in the transaction that makes the project's row; a
//! deletion (or a failed creation's clean-up) records it before it drops, and removes the record
//! once the drop succeeded. What stays is dropped again by the sweep ([`claim`]).

use deadpool_postgres::GenericClient;
use tokio_postgres::Error;

use crate::projects::Engine;

/// Records a project's database to drop (`creating`: a creation under way). A record there
/// already keeps its count of attempts; its age restarts when a deletion (or clean-up) records
/// it again (a retried deletion is not taken for an interrupted one meanwhile).
pub async fn record(
    db: &impl GenericClient,
    project_id: &str,
    db_name: &str,
    engine: Engine,
    creating: bool,
) -> Result<(), Error> {
    db.execute(
        "INSERT INTO fluxbase.project_teardowns (project_id, db_name, engine, creating)
         VALUES ($1, $2, $3, $4)
         ON CONFLICT (project_id) DO UPDATE SET creating = EXCLUDED.creating,
             since = CASE WHEN EXCLUDED.creating THEN project_teardowns.since ELSE now() END",
        &[&project_id, &db_name, &engine.as_str(), &creating],
    )
    .await
    .map(drop)
}

/// In the transaction that makes the project's row: the creation's record goes. False when
/// it is gone or no longer a creation's (a sweep took the project for abandoned: the creation
/// must fail, its database is being dropped).
pub async fn created(db: &impl GenericClient, project_id: &str) -> Result<bool, Error> {
    Ok(db
        .execute(
            "DELETE FROM fluxbase.project_teardowns WHERE project_id = $1 AND creating",
            &[&project_id],
        )
        .await?
        == 1)
}

/// The drop succeeded: nothing is left to do.
pub async fn done(db: &impl GenericClient, project_id: &str) -> Result<(), Error> {
    db.execute(
        "DELETE FROM fluxbase.project_teardowns WHERE project_id = $1",
        &[&project_id],
    )
    .await
    .map(drop)
}

/// One record to sweep, locked in the caller's transaction (another node's sweep skips it, a
/// creation finishing waits for it): not a creation, or a creation older than `grace_secs`;
/// never one whose project row exists; none of `skip` (tried already in this sweep). The ones
/// tried least first, so that records whose drop keeps failing do not hold up newer ones.
pub async fn claim(
    tx: &impl GenericClient,
    grace_secs: f64,
    skip: &[String],
) -> Result<Option<(String, String, Engine, i32)>, Error> {
    Ok(tx
        .query_opt(
            "SELECT t.project_id, t.db_name, t.engine, t.attempts
             FROM fluxbase.project_teardowns t
             WHERE (NOT t.creating OR t.since < now() - make_interval(secs => $1))
               AND t.since < now() - make_interval(mins => least(t.attempts, 60))
               AND NOT EXISTS (SELECT FROM fluxbase.projects p WHERE p.id = t.project_id)
               AND t.project_id <> ALL ($2)
             ORDER BY t.attempts, t.since LIMIT 1
             FOR UPDATE SKIP LOCKED",
            &[&grace_secs, &skip],
        )
        .await?
        .map(|r| {
            let engine: &str = r.get(2);
            (
                r.get(0),
                r.get(1),
                Engine::parse(engine).unwrap_or_default(),
                r.get(3),
            )
        }))
}

/// A swept drop failed: tried again, as abandoned, once as many minutes have passed as it
/// failed (at most an hour).
pub async fn failed(db: &impl GenericClient, project_id: &str) -> Result<(), Error> {
    db.execute(
        "UPDATE fluxbase.project_teardowns
         SET creating = false, attempts = attempts + 1, since = now()
         WHERE project_id = $1",
        &[&project_id],
    )
    .await
    .map(drop)
}

/// How many records a sweep would take now (for `/metrics`): as [`claim`] selects them.
pub async fn count(db: &impl GenericClient, grace_secs: f64) -> Result<i64, Error> {
    Ok(db
        .query_one(
            "SELECT count(*) FROM fluxbase.project_teardowns t
             WHERE (NOT t.creating OR t.since < now() - make_interval(secs => $1))
               AND NOT EXISTS (SELECT FROM fluxbase.projects p WHERE p.id = t.project_id)",
            &[&grace_secs],
        )
        .await?
        .get(0))
}

/// Deletions that stopped half way (a crash, a failed row delete): records that are not a
/// creation's, older than `grace_secs`, whose project row still exists. They are claimed (their
/// age restarts: another node's sweep, or this one's next, leaves them alone for `grace_secs`,
/// and a resumed deletion that fails is tried again after it); the caller deletes those projects
/// again.
pub async fn interrupted_deletions(
    db: &impl GenericClient,
    grace_secs: f64,
    limit: i64,
) -> Result<Vec<String>, Error> {
    Ok(db
        .query(
            "UPDATE fluxbase.project_teardowns t SET since = now()
             WHERE t.project_id IN (
                     SELECT o.project_id FROM fluxbase.project_teardowns o
                     WHERE NOT o.creating AND o.since < now() - make_interval(secs => $1)
                       AND EXISTS (SELECT FROM fluxbase.projects p WHERE p.id = o.project_id)
                     ORDER BY o.since LIMIT $2)
               AND NOT t.creating AND t.since < now() - make_interval(secs => $1)
             RETURNING t.project_id",
            &[&grace_secs, &limit],
        )
        .await?
        .iter()
        .map(|r| r.get(0))
        .collect())
}

/// The projects with a deletion recorded (not a creation's record) whose row still exists.
pub async fn deleting(db: &impl GenericClient) -> Result<Vec<String>, Error> {
    Ok(db
        .query(
            "SELECT t.project_id FROM fluxbase.project_teardowns t
             WHERE NOT t.creating
               AND EXISTS (SELECT FROM fluxbase.projects p WHERE p.id = t.project_id)",
            &[],
        )
        .await?
        .iter()
        .map(|r| r.get(0))
        .collect())
}
