//! Wiring across services: what creating, deleting or suspending a project means for every
//! service that holds something of it (its database and rows, its change stream and slot, its
//! SQL pools, stored objects, realtime room and bus), and what this server does when another
//! one announces an access change. The HTTP handlers and the CLI both come through here.
//!
//! ```text
//!  create   projects (database, roles, rows, keys) ─► cdc slot ─(failed)─► projects.discard
//!  delete   cdc stream ─► sql pools ─► projects (database, roles, slot, rows) ─► storage
//!           ─► NOTIFY ─► realtime room ─► bus
//!  status   projects row ─► NOTIFY ─► sql pools ─► realtime room (suspended)
//!  NOTIFY   auth cache listener ─► access_changed: realtime evictions, rooms, streams
//! ```

use std::sync::Arc;

use crate::auth::{AccessChange, ListenerEvent};
use crate::projects::instance::{InitReport, InstanceError};
use crate::projects::{DefaultKeys, Engine, Project, ProjectStatus, ProjectsError};
use crate::realtime::MemberChange;

use super::{App, SharedApp};

/// How long a deletion announced by another process ([`AccessChange::Deleting`]) makes this
/// server answer its project's ended statements as the project being gone: a deletion drops
/// the database within seconds of announcing it. A deletion that then fails leaves the project
/// in place; until this passes, its statements that lose their database answer 404 rather than
/// 503.
pub(crate) const DELETING_ELSEWHERE: std::time::Duration = std::time::Duration::from_secs(60);

impl App {
    /// Creates a project owned by `user_id` (its admin) with one key of each scope, and its
    /// replication slot (PostgreSQL). The caller starts its change stream (or announces it,
    /// from the CLI).
    pub async fn create_project(
        &self,
        user_id: &str,
        name: &str,
        engine: Engine,
    ) -> Result<(Project, DefaultKeys), ProjectsError> {
        if engine == Engine::Mysql && self.cluster_mode.is_some() && !self.mysql.external() {
            return Err(ProjectsError::EngineUnavailable(
                "MySQL projects in cluster mode need mysql_url (FLUXBASE_MYSQL_URL): one \
                 MySQL/MariaDB server that every node reaches. Each node's embedded MariaDB \
                 would hold its own copy of the project."
                    .into(),
            ));
        }
        let _turn = self.projects.server_turn().await;
        self.room_for_project(engine).await?;
        let (project, keys) = self.projects.create(user_id, name, engine).await?;
        // Where its change stream starts: a PostgreSQL project's replication slot; a MySQL
        // project's binlog position, the end of the log now, after its provisioning, before
        // any client can write to it.
        let prepared = match engine {
            Engine::Postgresql => self.cdc.ensure_slot(&project.id, &project.db_name).await,
            Engine::Mysql => self.cdc.init_binlog_position(&project.id).await,
        };
        if let Err(e) = prepared {
            self.sql.forget_project(&project.id);
            self.projects.discard(&project).await;
            return Err(ProjectsError::Internal(e));
        }
        if let Some(mode) = self.cluster_mode.as_ref() {
            // Some node leads it now rather than at the next tick.
            mode.leadership.poke();
            mode.cluster.rebalance().await;
        }
        Ok((project, keys))
    }

    /// Whether the deployment has room for one more project of `engine`: its own cap
    /// (`max_projects`, every engine and owner together) and what the database server can
    /// hold. Each PostgreSQL project keeps a replication slot and a walsender for its change
    /// stream: without a free one the project could not be made (or its stream could not
    /// run). Each MySQL project keeps one connection for its binlog dump: MySQL projects
    /// together may hold at most a fifth of the MySQL server's `max_connections`, the rest
    /// staying for SQL (the SQL connection budget is sized from what is left when it is first
    /// needed). In cluster mode, NATS JetStream's room for the project's stream
    /// ([`crate::cluster::Cluster::room_for_stream`]). Refused before anything is made, naming
    /// what is full (403, as a quota).
    pub async fn room_for_project(&self, engine: Engine) -> Result<(), ProjectsError> {
        let control = self
            .control
            .get()
            .await
            .map_err(|e| ProjectsError::Internal(e.into()))?;
        let (all, mysql) = crate::control::projects::counts(&control).await?;
        let cap = self.config.max_projects;
        if cap > 0 && all >= i64::from(cap) {
            return Err(ProjectsError::ServerFull(format!(
                "This server holds as many projects as it is set to ({all}; max_projects = \
                 {cap}). Delete a project or ask the operator to raise max_projects."
            )));
        }
        if let Some(mode) = self.cluster_mode.as_ref() {
            if let Err(why) = mode.cluster.room_for_stream().await {
                return Err(ProjectsError::ServerFull(format!(
                    "NATS JetStream has no room for a new project's stream ({why}): each \
                     project's stream reserves nats_retention_bytes = {} bytes of its store. \
                     Delete a project, or ask the operator to give JetStream more storage \
                     (max_file_store) or lower nats_retention_bytes.",
                    self.config.nats_retention_bytes
                )));
            }
        }
        match engine {
            Engine::Postgresql => {
                // The cluster's slots and walsenders: the control database is on that cluster.
                let r = control
                    .query_one(
                        "SELECT current_setting('max_replication_slots')::int8, \
                                (SELECT count(*) FROM pg_replication_slots), \
                                current_setting('max_wal_senders')::int8, \
                                (SELECT count(*) FROM pg_stat_replication \
                                  WHERE application_name NOT LIKE 'fluxbase%'), \
                                (SELECT count(*) FROM pg_replication_slots \
                                  WHERE slot_name LIKE 'fluxbase\\_%')",
                        &[],
                    )
                    .await
                    .map_err(|e| ProjectsError::Internal(e.into()))?;
                let (slots, used, senders, other_senders, ours): (i64, i64, i64, i64, i64) =
                    (r.get(0), r.get(1), r.get(2), r.get(3), r.get(4));
                if used >= slots {
                    return Err(ProjectsError::ServerFull(format!(
                        "The database cluster has no free replication slot for a new project's \
                         change stream (all {slots} in use; max_replication_slots). Delete a \
                         project or ask the operator to raise max_replication_slots."
                    )));
                }
                if ours + other_senders >= senders {
                    return Err(ProjectsError::ServerFull(format!(
                        "The database cluster has no free walsender for a new project's change \
                         stream ({ours} projects' streams and {other_senders} other \
                         replication connections of {senders}; max_wal_senders). Delete a \
                         project or ask the operator to raise max_wal_senders."
                    )));
                }
            }
            Engine::Mysql => {
                let max = self
                    .mysql
                    .max_connections()
                    .await
                    .map_err(ProjectsError::Internal)?;
                let room = max / 5;
                if mysql >= room {
                    return Err(ProjectsError::ServerFull(format!(
                        "The MySQL server holds as many projects as its connections allow \
                         ({mysql}: each keeps one connection for its change stream, and MySQL \
                         projects together at most a fifth of max_connections = {max}). Delete \
                         a MySQL project or ask the operator to raise the MySQL server's \
                         max_connections."
                    )));
                }
            }
        }
        Ok(())
    }

    /// Deletes a project: its change stream and slot, database, roles, keys, members and
    /// stored objects; its realtime room is closed here and on every other server.
    pub async fn delete_project(&self, project_id: &str) -> Result<(), ProjectsError> {
        let project = self
            .auth
            .load_project(project_id)
            .await?
            .ok_or_else(|| ProjectsError::NoSuchProject(project_id.to_string()))?;
        self.deleting
            .lock()
            .expect("poisoned")
            .insert(project_id.to_string());
        // Every other server (and a CLI's deletion, every server) learns it before the database
        // is dropped: the statements the drop ends there answer PROJECT_NOT_FOUND too.
        self.auth
            .notify_access_change(&AccessChange::Deleting(project_id.to_string()))
            .await;
        let deleted = async {
            // Recorded first, before anything stops: a crash from here on leaves a record the
            // sweep finishes the deletion from, and what a failed drop leaves it drops once the
            // row is gone. A failure to record stops the deletion with nothing changed.
            self.projects
                .record_teardown(project_id, &project.db_name, project.engine)
                .await
                .map_err(ProjectsError::Internal)?;
            self.cdc.stop(project_id).await;
            self.mysql.dumps.forget(project_id);
            self.sql.forget_project(project_id);
            let clean = self
                .projects
                .drop_database(project_id, &project.db_name, project.engine)
                .await;
            self.projects.delete_row(project_id).await?;
            if clean {
                self.projects.teardown_done(project_id).await;
            }
            Ok::<(), ProjectsError>(())
        }
        .await;
        self.deleting.lock().expect("poisoned").remove(project_id);
        deleted?;
        self.storage.forget_project(project_id);
        self.storage.delete_project_objects(project_id).await;
        if let Some(mode) = self.cluster_mode.as_ref() {
            mode.cluster.delete_stream(project_id).await;
        }
        self.auth
            .notify_access_change(&AccessChange::Project(project_id.to_string()))
            .await;
        self.realtime
            .close_project(project_id, crate::realtime::RoomClosed::Deleted);
        self.bus.remove(project_id);
        tracing::info!(project_id, "project deleted");
        Ok(())
    }

    /// Deletes again the projects whose deletion stopped half way (a crash between its drops
    /// and its row's delete: the row says `active`, its database is gone), found by their
    /// teardown records; each logged. The teardown sweep's task runs it before each pass.
    pub async fn resume_deletions(&self) -> anyhow::Result<()> {
        // One claimed at a time, right before it is deleted (a claim another node could take
        // again once its minute is over is never held while others are deleted).
        for _ in 0..100 {
            let Some(project_id) = self.projects.interrupted_deletion().await? else {
                return Ok(());
            };
            tracing::warn!(
                project_id,
                "finishing a project deletion that stopped half way"
            );
            match self.delete_project(&project_id).await {
                Ok(()) | Err(ProjectsError::NoSuchProject(_)) => {}
                Err(e) => {
                    tracing::warn!(project_id, error = %e, "finishing an interrupted project deletion")
                }
            }
        }
        Ok(())
    }

    /// Whether `project_id` is being deleted, by this server or by another process that
    /// announced it ([`AccessChange::Deleting`], within [`DELETING_ELSEWHERE`]): its database is
    /// dropped before its row, so the row says nothing yet; and an unreachable database, the
    /// other cause of the same error, must not cost a control round trip per request.
    pub fn is_being_deleted(&self, project_id: &str) -> bool {
        if self.deleting.lock().expect("poisoned").contains(project_id) {
            return true;
        }
        let mut elsewhere = self.deleting_elsewhere.lock().expect("poisoned");
        elsewhere.retain(|_, since| since.elapsed() < DELETING_ELSEWHERE);
        elsewhere.contains_key(project_id)
    }

    /// [`Self::is_being_deleted`], or becomes so within `wait` (checked every 10 ms).
    pub async fn deletion_heard(&self, project_id: &str, wait: std::time::Duration) -> bool {
        let deadline = tokio::time::Instant::now() + wait;
        loop {
            if self.is_being_deleted(project_id) {
                return true;
            }
            if tokio::time::Instant::now() >= deadline {
                return false;
            }
            tokio::time::sleep(std::time::Duration::from_millis(10)).await;
        }
    }

    /// `fluxbase project suspend|resume <id>`: changes the status only, never the data; every
    /// server stops (or resumes) serving the project.
    pub async fn set_project_status(
        &self,
        project_id: &str,
        status: ProjectStatus,
    ) -> Result<(), ProjectsError> {
        self.projects.set_status(project_id, status).await?;
        let engine = self.auth.load_project(project_id).await?.map(|p| p.engine);
        if engine == Some(Engine::Mysql) {
            self.mysql
                .set_locked(project_id, status == ProjectStatus::Suspended)
                .await?;
        }
        self.auth
            .notify_access_change(&AccessChange::Project(project_id.to_string()))
            .await;
        self.sql.forget_project(project_id);
        if status == ProjectStatus::Suspended {
            self.realtime
                .close_project(project_id, crate::realtime::RoomClosed::Suspended);
        }
        Ok(())
    }

    /// The first run's default user, project and keys, unless it ran before.
    pub async fn init_instance(&self) -> Result<InitReport, InstanceError> {
        crate::projects::instance::init(
            &self.control,
            &self.accounts,
            self.config.base_url(),
            |user_id, name| async move {
                self.create_project(&user_id, name, Engine::Postgresql)
                    .await
            },
        )
        .await
    }

    /// Brings every project's database up to date and gives each its replication slot.
    /// `secure_roles`: the server's start-up also repairs every project role; a CLI command
    /// leaves that to the server (it would close a running server's login windows).
    pub(super) async fn migrate_projects(&self, secure_roles: bool) -> anyhow::Result<()> {
        for (project_id, db_name) in self.projects.migrate_all().await? {
            self.cdc.ensure_slot(&project_id, &db_name).await?;
        }
        if secure_roles {
            self.projects.secure_roles().await?;
            self.repair_mysql_projects().await?;
        }
        Ok(())
    }

    /// The server's start-up with MySQL projects: the MySQL server is started (embedded) or
    /// reached, and every project's database and accounts are made again as they should be
    /// (passwords, grants, connection bound; locked while suspended).
    async fn repair_mysql_projects(&self) -> anyhow::Result<()> {
        let projects = crate::control::projects::mysql_projects(&self.control.get().await?).await?;
        if projects.is_empty() {
            return Ok(());
        }
        self.mysql.server().await?;
        for p in projects {
            if let Err(e) = self.mysql.provision(&p.id, &p.db_name).await {
                tracing::error!(project_id = %p.id, error = %format!("{e:#}"), "could not repair a MySQL project's accounts");
                continue;
            }
            if p.status == ProjectStatus::Suspended {
                self.mysql.set_locked(&p.id, true).await?;
            }
        }
        Ok(())
    }

    /// Starts the change stream of a project (by its engine: [`crate::cdc::Cdc::start`]).
    pub fn start_stream(&self, project: &Project) {
        self.cdc
            .start(project.id.clone(), project.db_name.clone(), project.engine)
    }

    /// Purges the embedded MariaDB's binary logs every `mysql_binlog_purge_interval_secs`, up
    /// to what MySQL projects' streams still need, within the retention bound
    /// ([`crate::mysql::retention`]); nothing while no embedded server runs (an operator's
    /// server purges by its own expiry). For as long as the app lives.
    pub(crate) fn start_binlog_purging(self: &Arc<Self>) {
        let app = Arc::downgrade(self);
        let every = std::time::Duration::from_secs(self.config.mysql_binlog_purge_interval_secs);
        tokio::spawn(async move {
            let mut tick = tokio::time::interval(every);
            tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            loop {
                tick.tick().await;
                let Some(app) = app.upgrade() else { return };
                if app.mysql.embedded().is_none() {
                    continue;
                }
                let bound = crate::mysql::retention::Bound::from_config(&app.config);
                if let Err(e) =
                    crate::mysql::retention::purge(&app.mysql, &app.control, bound).await
                {
                    tracing::warn!(error = %format!("{e:#}"), "purging the embedded MariaDB's binary logs");
                }
            }
        });
    }

    /// Acts on a NOTIFY from another server (or this one): a project whose status changed gets
    /// its room closed if inactive; a removed member's realtime subscriptions end, unless they
    /// are a member again by now; a revoked key's end too.
    async fn access_changed(self: &Arc<Self>, change: AccessChange) {
        match change {
            AccessChange::Any => {}
            AccessChange::KeyRevoked { project_id, key_id } => {
                self.realtime.key_revoked(&project_id, &key_id).await
            }
            AccessChange::MemberRemoved {
                project_id,
                user_id,
            } => {
                let still_member = self
                    .auth
                    .is_member(&project_id, &user_id)
                    .await
                    .unwrap_or(false);
                if !still_member {
                    self.realtime
                        .evict_user(&project_id, &user_id, MemberChange::Removed);
                }
            }
            AccessChange::MemberChanged {
                project_id,
                user_id,
            } => self
                .realtime
                .evict_user(&project_id, &user_id, MemberChange::RoleChanged),
            AccessChange::SessionsEnded { user_id, session } => {
                self.realtime.end_sessions(&user_id, session.as_deref())
            }
            AccessChange::PublicClosed(project_id) => {
                let public = self
                    .auth
                    .load_project(&project_id)
                    .await
                    .ok()
                    .flatten()
                    .is_some_and(|p| p.realtime_public);
                if !public {
                    self.realtime.evict_anonymous(&project_id);
                }
            }
            AccessChange::Project(project_id) => self.close_room_if_inactive(&project_id).await,
            AccessChange::Deleting(project_id) => {
                let mut elsewhere = self.deleting_elsewhere.lock().expect("poisoned");
                elsewhere.retain(|_, since| since.elapsed() < DELETING_ELSEWHERE);
                // Bounded by what the control database's members may delete in the window.
                elsewhere.insert(project_id, std::time::Instant::now());
            }
        }
    }

    /// Closes a project's realtime room when the project is suspended or gone (a change made
    /// by another process, e.g. `fluxbase project suspend`); a project that is gone also loses
    /// its change stream here, and one created by another process (`fluxbase project create`)
    /// gets one.
    async fn close_room_if_inactive(self: &Arc<Self>, project_id: &str) {
        match self.auth.load_project(project_id).await {
            Ok(None) => {
                self.cdc.stop(project_id).await;
                self.mysql.dumps.forget(project_id);
                self.sql.forget_project(project_id);
                self.storage.forget_project(project_id);
                self.realtime
                    .close_project(project_id, crate::realtime::RoomClosed::Deleted)
            }
            // Only a project this server has no stream for (one made by another process, or
            // resumed): a stream that ended (a lost slot or binlog position) stays ended and
            // reported.
            Ok(Some(p))
                if p.status == ProjectStatus::Active && self.cdc.status(&p.id).is_none() =>
            {
                self.start_stream(&p)
            }
            Ok(Some(p)) if p.status == ProjectStatus::Suspended => {
                self.sql.forget_project(project_id);
                self.realtime
                    .close_project(project_id, crate::realtime::RoomClosed::Suspended)
            }
            _ => {}
        }
    }
}

/// Starts the access cache's `LISTEN` connection and acts on what it hears, for as long as the
/// app lives.
pub(super) fn listen_for_access_changes(app: &SharedApp) {
    let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel();
    tokio::spawn(crate::auth::run_cache_listener(
        app.cluster.pg_config(&app.cluster.control_db),
        Arc::downgrade(&app.auth),
        tx,
    ));
    let app = Arc::downgrade(app);
    tokio::spawn(async move {
        while let Some(event) = rx.recv().await {
            let Some(app) = app.upgrade() else { return };
            tokio::spawn(async move {
                match event {
                    // Revocations notified while it was disconnected were missed: every
                    // key-bound realtime subscription is checked against its key again.
                    ListenerEvent::Connected => app.realtime.recheck_keys().await,
                    ListenerEvent::Changed(change) => app.access_changed(change).await,
                }
            });
        }
    });
}

/// Seals the routine epochs an earlier start-up could not (sql/project/0014, "Sealed"), off
/// the start-up path: one project at a time, each a connection and up to a few seconds, for as
/// long as the app lives. Until a project's epoch is sealed its reset runs every check.
pub(super) fn seal_routine_epochs(app: &SharedApp) {
    let app = Arc::downgrade(app);
    tokio::spawn(async move {
        let candidates = match app.upgrade() {
            Some(app) => app.projects.sealing_candidates().await,
            None => return,
        };
        let candidates = match candidates {
            Ok(candidates) => candidates,
            Err(e) => {
                tracing::warn!(error = %format!("{e:#}"), "listing the routine epochs to seal");
                return;
            }
        };
        for (project_id, db_name) in candidates {
            let Some(app) = app.upgrade() else { return };
            if let Err(e) = app.projects.seal_pending(&project_id, &db_name).await {
                tracing::warn!(project_id, error = %format!("{e:#}"), "could not seal the routine epoch");
            }
        }
    });
}
