//! Databases and roles that no project stands for: what a crash in the middle of a creation or
//! deletion, or a drop that failed (a full lock table, an unreachable server), leaves in the
//! cluster or on the MySQL server. Each is named in `fluxbase.project_teardowns` before it can
//! be left behind ([`crate::control::teardowns`]), and the sweep here drops it again: at the
//! server's start-up and every [`SWEEP_EVERY`]. Nothing is dropped that the table does not name,
//! so a cluster shared with another deployment (or anything else) is safe, and nothing whose
//! project row exists: a deletion that stopped half way (its record older than
//! [`DELETION_GRACE`], its row still there) is finished by deleting the project again
//! (`App::resume_deletions`).

use std::sync::atomic::Ordering::Relaxed;
use std::time::Duration;

use super::{Engine, Projects};
use crate::control;

/// How old a creation's record must be before the sweep takes it for abandoned (another node
/// may be creating it: a creation takes seconds). A creation still running then fails when it
/// would make its project's row.
pub const CREATION_GRACE: Duration = Duration::from_secs(600);

/// How old a deletion's record must be, its project row still there, before a sweep takes
/// the deletion for interrupted (a crash half way) and deletes the project again: a deletion
/// takes seconds.
pub const DELETION_GRACE: Duration = Duration::from_secs(60);

/// How often a server sweeps, after the pass at its start-up.
pub const SWEEP_EVERY: Duration = Duration::from_secs(60);

/// At most this many records a pass (the rest wait for the next).
const PER_PASS: usize = 100;

impl Projects {
    /// Records a project's database and roles for the sweep before a deletion drops them.
    pub async fn record_teardown(
        &self,
        project_id: &str,
        db_name: &str,
        engine: Engine,
    ) -> anyhow::Result<()> {
        let c = self.control.get().await?;
        control::teardowns::record(&c, project_id, db_name, engine, false).await?;
        Ok(())
    }

    /// The teardown recorded for `project_id` is finished (best effort: a record left behind
    /// is swept, its drops finding nothing).
    pub async fn teardown_done(&self, project_id: &str) {
        if let Ok(c) = self.control.get().await {
            if let Err(e) = control::teardowns::done(&c, project_id).await {
                tracing::warn!(project_id, error = %e, "forgetting a finished teardown");
            }
        }
    }

    /// A project whose deletion stopped half way ([`DELETION_GRACE`]), claimed: to delete
    /// again.
    pub async fn interrupted_deletion(&self) -> anyhow::Result<Option<String>> {
        let c = self.control.get().await?;
        Ok(
            control::teardowns::interrupted_deletions(&c, DELETION_GRACE.as_secs_f64(), 1)
                .await?
                .pop(),
        )
    }

    /// The projects with a deletion under way or interrupted (their database may be gone):
    /// start-up does not migrate them or make their slots.
    pub async fn being_torn_down(&self) -> anyhow::Result<std::collections::HashSet<String>> {
        let c = self.control.get().await?;
        Ok(control::teardowns::deleting(&c)
            .await?
            .into_iter()
            .collect())
    }

    /// Drops a project's database and roles after recording them (so that a failure or a crash
    /// on the way leaves the record for the sweep), and forgets the record once they are gone.
    pub async fn tear_down(&self, project_id: &str, db_name: &str, engine: Engine) {
        if let Err(e) = self.record_teardown(project_id, db_name, engine).await {
            tracing::warn!(project_id, error = %format!("{e:#}"), "recording a project's teardown");
        }
        if self.drop_database(project_id, db_name, engine).await {
            self.teardown_done(project_id).await;
        } else {
            tracing::warn!(
                project_id,
                db_name,
                "a project's database or roles could not all be dropped; the teardown sweep tries again"
            );
        }
    }

    /// One sweep: every recorded teardown whose project row does not exist, not a creation
    /// younger than `grace`, is dropped again; each record is locked while its drop runs (no
    /// other node sweeps it, a creation finishing waits and then fails; the ones tried least
    /// first). Returns how many were dropped; the metrics count them as each commits and say
    /// how many the next pass would take.
    pub async fn sweep_teardowns(
        &self,
        grace: Duration,
        metrics: &crate::metrics::Metrics,
    ) -> anyhow::Result<usize> {
        let mut client = self.control.get().await?;
        let mut tried = Vec::new();
        let mut swept = 0;
        while tried.len() < PER_PASS {
            let tx = client.transaction().await?;
            let Some((project_id, db_name, engine, attempts)) =
                control::teardowns::claim(&tx, grace.as_secs_f64(), &tried).await?
            else {
                break;
            };
            tried.push(project_id.clone());
            if self.drop_database(&project_id, &db_name, engine).await {
                control::teardowns::done(&tx, &project_id).await?;
                tx.commit().await?;
                swept += 1;
                metrics.project_teardowns_swept.fetch_add(1, Relaxed);
                tracing::info!(
                    project_id,
                    db_name,
                    engine = engine.as_str(),
                    "dropped the database and roles of a deleted or abandoned project"
                );
            } else {
                control::teardowns::failed(&tx, &project_id).await?;
                tx.commit().await?;
                tracing::warn!(
                    project_id,
                    db_name,
                    attempts = attempts + 1,
                    "the database or roles of a deleted or abandoned project could not all be dropped; tried again at the next sweep"
                );
            }
        }
        let left = control::teardowns::count(&client, grace.as_secs_f64()).await?;
        metrics
            .project_teardowns_pending
            .store(left.max(0) as u64, Relaxed);
        Ok(swept)
    }
}
