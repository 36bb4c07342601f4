//! A project's database and roles: created (with the bootstrap SQL under `sql/project/`),
//! brought up to the latest bootstrap version at start-up, and dropped.

use crate::auth::DbRole;
use crate::db::{quote_ident, quote_literal};

use super::Projects;

/// Per-project bootstrap migrations, in order.
pub const PROJECT_MIGRATIONS: &[(i32, &str, &str)] = &[
    (
        1,
        "roles_and_grants",
        include_str!("../../sql/project/0001_roles_and_grants.sql"),
    ),
    (
        2,
        "change_capture",
        include_str!("../../sql/project/0002_change_capture.sql"),
    ),
    (
        3,
        "realtime",
        include_str!("../../sql/project/0003_realtime.sql"),
    ),
    (4, "rls", include_str!("../../sql/project/0004_rls.sql")),
    (
        5,
        "sandbox",
        include_str!("../../sql/project/0005_sandbox.sql"),
    ),
    (
        7,
        "partition_truncate",
        include_str!("../../sql/project/0007_partition_truncate.sql"),
    ),
    (
        8,
        "definer_search_path",
        include_str!("../../sql/project/0008_definer_search_path.sql"),
    ),
    (
        9,
        "catalog_privacy",
        include_str!("../../sql/project/0009_catalog_privacy.sql"),
    ),
    (
        10,
        "session_reset",
        include_str!("../../sql/project/0010_session_reset.sql"),
    ),
    (
        11,
        "session_reset_cheaper",
        include_str!("../../sql/project/0011_session_reset_cheaper.sql"),
    ),
    (
        14,
        "session_reset_epoch",
        include_str!("../../sql/project/0014_session_reset_epoch.sql"),
    ),
    (
        15,
        "session_reset_delegate",
        include_str!("../../sql/project/0015_session_reset_delegate.sql"),
    ),
    (
        16,
        "shared_lock_and_stats_privacy",
        include_str!("../../sql/project/0016_shared_lock_and_stats_privacy.sql"),
    ),
    (
        17,
        "routine_epoch_lock",
        include_str!("../../sql/project/0017_routine_epoch_lock.sql"),
    ),
    (
        18,
        "reset_in_default_transaction",
        include_str!("../../sql/project/0018_reset_in_default_transaction.sql"),
    ),
    (
        19,
        "search_paths_and_large_objects",
        include_str!("../../sql/project/0019_search_paths_and_large_objects.sql"),
    ),
    (
        20,
        "server_schemas_guard",
        include_str!("../../sql/project/0020_server_schemas_guard.sql"),
    ),
    (
        21,
        "other_projects_roles_guard",
        include_str!("../../sql/project/0021_other_projects_roles_guard.sql"),
    ),
];

/// The migration that makes the routine epoch (sql/project/0014_session_reset_epoch.sql).
const ROUTINE_EPOCH_VERSION: i32 = 14;

/// How long [`seal_routine_epoch`] waits for the transactions older than the migration.
const SEAL_WAIT: std::time::Duration = std::time::Duration::from_secs(5);

/// Lets the routine epoch's `safe` become true (sql/project/0014_session_reset_epoch.sql,
/// "Sealed") once every transaction older than the migration's commit has ended: lists the
/// transactions of the project's database that hold an xid now (after that commit), waits up
/// to [`SEAL_WAIT`] until none of them runs, then seals. Timed out: `safe` stays
/// false (every reset runs its checks) and the server tries again after its next start-up
/// (`seal_routine_epochs`, off the start-up path). Nothing to do once
/// sealed, or when the table is empty (after a crash: the first reset fills it, sealed).
pub async fn seal_routine_epoch(
    client: &tokio_postgres::Client,
    project_id: &str,
) -> anyhow::Result<()> {
    let sealed = client
        .query_opt("SELECT sealed FROM auth.routine_epoch", &[])
        .await?;
    if sealed.is_none_or(|row| row.get::<_, bool>(0)) {
        return Ok(());
    }
    // The transactions of this database that hold an xid now (after the migration committed:
    // one that ran DDL before then had one), by xid alone: a transaction keeps its xid when it
    // is prepared (PREPARE TRANSACTION), when its lock moves from its backend to the prepared
    // transaction's dummy process (a key with the pid would look like it ended). Other
    // databases' cannot make routines here.
    const OLDER: &str = "SELECT l.transactionid::pg_catalog.text
        FROM pg_catalog.pg_locks l JOIN pg_catalog.pg_stat_activity a ON a.pid = l.pid
        WHERE l.locktype = 'transactionid' AND l.mode = 'ExclusiveLock'
          AND a.datname = pg_catalog.current_database() AND l.pid <> pg_catalog.pg_backend_pid()
        UNION
        SELECT p.transaction::pg_catalog.text FROM pg_catalog.pg_prepared_xacts p
        WHERE p.database = pg_catalog.current_database()";
    let older = |rows: Vec<tokio_postgres::Row>| -> std::collections::HashSet<String> {
        rows.iter().map(|r| r.get(0)).collect()
    };
    let waiting = older(client.query(OLDER, &[]).await?);
    let deadline = std::time::Instant::now() + SEAL_WAIT;
    loop {
        let now = older(client.query(OLDER, &[]).await?);
        if waiting.is_disjoint(&now) {
            break;
        }
        if std::time::Instant::now() >= deadline {
            tracing::warn!(project_id, "transactions older than the routine epoch still run; the reset keeps every check until the server seals it after a later start-up");
            return Ok(());
        }
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    }
    client
        .execute("SELECT auth.seal_routine_epoch()", &[])
        .await?;
    Ok(())
}

/// The latest bootstrap version.
pub fn latest_version() -> i32 {
    PROJECT_MIGRATIONS.last().map(|m| m.0).unwrap_or(0)
}

/// The bootstrap version whose script is followed by the installation of the change stream's
/// message key (see [`Projects::install_message_key`]).
const MESSAGE_KEY_VERSION: i32 = 5;

impl Projects {
    /// Installs the key the change stream's messages are tagged with (`fluxbase_cdc.emit`,
    /// sql/project/0005_sandbox.sql), inside the migration's transaction: a large object only
    /// the admin role reads (never in the publication, kept across crashes, unlike an unlogged
    /// table), and `fluxbase_cdc.message_key()`, which returns it.
    async fn install_message_key(
        &self,
        client: &tokio_postgres::Client,
        project_id: &str,
    ) -> anyhow::Result<()> {
        let (inner, outer) =
            crate::rls::padded_keys(&crate::cdc::message_key(&self.secrets, project_id));
        let key = [inner, outer].concat();
        let oid: i64 = client
            .query_one(
                "SELECT pg_catalog.lo_from_bytea(0, $1)::pg_catalog.int8",
                &[&key],
            )
            .await?
            .get(0);
        client
            .batch_execute(&format!(
                "CREATE OR REPLACE FUNCTION fluxbase_cdc.message_key() RETURNS bytea
                 LANGUAGE sql STABLE SET search_path = pg_catalog, pg_temp
                 AS $$ SELECT pg_catalog.lo_get({oid}::pg_catalog.oid) $$;
                 REVOKE ALL ON FUNCTION fluxbase_cdc.message_key() FROM PUBLIC;"
            ))
            .await?;
        Ok(())
    }

    /// Creates the roles and the database of a new project and runs its bootstrap.
    pub(super) async fn provision(&self, project_id: &str, db_name: &str) -> anyhow::Result<()> {
        let admin = self.cluster.connect(&self.cluster.control_db).await?;
        for role in DbRole::ALL {
            let name = role.role_name(project_id);
            let verifier =
                postgres_protocol::password::scram_sha_256(self.role_password(&name).as_bytes());
            admin
                .batch_execute(&format!(
                    "CREATE ROLE {} LOGIN NOSUPERUSER NOCREATEDB NOCREATEROLE NOREPLICATION \
                     NOBYPASSRLS NOINHERIT CONNECTION LIMIT 64 PASSWORD {} VALID UNTIL '-infinity'",
                    quote_ident(&name),
                    quote_literal(&verifier)
                ))
                .await?;
        }
        // The admin role must be able to act for the owner (ALTER DEFAULT PRIVILEGES FOR ROLE,
        // ownership changes) when it is not a superuser, as on a managed cluster.
        let owner = DbRole::Owner.role_name(project_id);
        admin
            .batch_execute(&format!(
                "DO $$ BEGIN
                   IF NOT (SELECT rolsuper FROM pg_roles WHERE rolname = current_user) THEN
                     EXECUTE format('GRANT %I TO %I', {}, current_user);
                   END IF;
                 END $$",
                quote_literal(&owner)
            ))
            .await?;
        admin
            .batch_execute(&format!("CREATE DATABASE {}", quote_ident(db_name)))
            .await?;
        self.migrate_project(project_id, db_name, 0).await
    }

    /// Applies the bootstrap migrations above `from` to a project's database.
    async fn migrate_project(
        &self,
        project_id: &str,
        db_name: &str,
        from: i32,
    ) -> anyhow::Result<()> {
        let pending: Vec<_> = PROJECT_MIGRATIONS.iter().filter(|m| m.0 > from).collect();
        if pending.is_empty() {
            return Ok(());
        }
        let client = self.cluster.connect(db_name).await?;
        let seal = pending.iter().any(|m| m.0 == ROUTINE_EPOCH_VERSION);
        for (version, name, sql) in pending {
            let sql = sql
                .replace("{db}", &quote_ident(db_name))
                .replace(
                    "{owner}",
                    &quote_ident(&DbRole::Owner.role_name(project_id)),
                )
                .replace(
                    "{readwrite}",
                    &quote_ident(&DbRole::ReadWrite.role_name(project_id)),
                )
                .replace("{read}", &quote_ident(&DbRole::Read.role_name(project_id)))
                .replace("{auth}", &quote_ident(&crate::rls::auth_role(project_id)));
            let failed = |e: &dyn std::fmt::Display| {
                anyhow::anyhow!("project {project_id} migration {version} ({name}): {e}")
            };
            client
                .batch_execute(&format!("BEGIN;\n{sql}"))
                .await
                .map_err(|e| failed(&e))?;
            if *version == MESSAGE_KEY_VERSION {
                self.install_message_key(&client, project_id)
                    .await
                    .map_err(|e| failed(&format!("{e:#}")))?;
            }
            client
                .batch_execute("COMMIT")
                .await
                .map_err(|e| failed(&e))?;
            let control = self.control.get().await?;
            crate::control::projects::set_bootstrap_version(&control, project_id, *version).await?;
        }
        if seal {
            seal_routine_epoch(&client, project_id).await?;
        }
        Ok(())
    }

    /// Drops what [`provision`](Self::provision) created and the project's replication slot
    /// (after a failed creation, or to delete the project). The caller forgets the project's
    /// SQL pools first. Whether everything is gone (else the teardown sweep tries again).
    pub async fn deprovision(&self, project_id: &str, db_name: &str) -> bool {
        let admin = match self.cluster.connect(&self.cluster.control_db).await {
            Ok(admin) => admin,
            Err(e) => {
                tracing::warn!(project_id, error = %format!("{e:#}"), "cleaning up a project: the cluster is unreachable");
                return false;
            }
        };
        let slot = crate::cdc::slot_name(project_id);
        // A slot keeps its database from being dropped: end its walsender, then drop it.
        let mut dropped = false;
        for _ in 0..50 {
            let _ = admin
                .query(
                    "SELECT pg_terminate_backend(active_pid) FROM pg_replication_slots
                     WHERE slot_name = $1 AND active_pid IS NOT NULL",
                    &[&slot],
                )
                .await;
            match admin
                .query(
                    "SELECT pg_drop_replication_slot(slot_name) FROM pg_replication_slots
                     WHERE slot_name = $1",
                    &[&slot],
                )
                .await
            {
                Ok(_) => {
                    dropped = true;
                    break;
                }
                Err(e) => {
                    tracing::debug!(error = %e, "dropping the slot; retrying");
                    tokio::time::sleep(std::time::Duration::from_millis(100)).await;
                }
            }
        }
        if !dropped {
            tracing::warn!(project_id, slot, "could not drop the replication slot");
        }
        // One statement each: DROP DATABASE cannot run inside a transaction block.
        let roles: Vec<String> = DbRole::ALL
            .map(|r| r.role_name(project_id))
            .into_iter()
            .chain([crate::rls::auth_role(project_id)])
            .collect();
        let mut statements = vec![format!(
            "DROP DATABASE IF EXISTS {} WITH (FORCE)",
            quote_ident(db_name)
        )];
        for role in &roles {
            statements.push(format!("DROP ROLE IF EXISTS {}", quote_ident(role)));
        }
        // A request arriving during the deletion may be changing a role's login at that moment
        // (`role_login`'s ALTER ROLE): PostgreSQL then fails the DROP ROLE with "tuple
        // concurrently updated" (XX000), and the role stayed behind (red team rt8 L1). Each
        // statement is retried a few times.
        let mut clean = dropped;
        for (i, sql) in statements.into_iter().enumerate() {
            if i == 1 {
                // The database is gone (or its drop failed: then the role drops fail too, and
                // the project's own database is never visited); what still names the roles is
                // elsewhere.
                clean &= self
                    .revoke_elsewhere(&admin, project_id, db_name, &roles)
                    .await;
            }
            let mut attempt = 0;
            loop {
                match admin.batch_execute(&sql).await {
                    Ok(()) => break,
                    Err(e) if attempt < 5 => {
                        attempt += 1;
                        tracing::debug!(project_id, error = ?e, attempt, "cleaning up a project; retrying");
                        tokio::time::sleep(std::time::Duration::from_millis(50 * attempt)).await;
                    }
                    Err(e) => {
                        tracing::warn!(project_id, error = ?e, statement = %sql, "cleaning up a project");
                        clean = false;
                        break;
                    }
                }
            }
        }
        clean
    }

    /// Another project's owner may have granted privileges on its objects to this project's
    /// roles, named them in a policy or in default privileges (red team rt17): entries of the
    /// shared dependency catalog in that database that make `DROP ROLE` fail, so that any
    /// tenant could keep another project's roles from ever being dropped. Each database (and
    /// the shared objects) holding such an entry is visited and `DROP OWNED BY` the roles run
    /// there: it revokes what was granted to them and removes them from policies (they own
    /// nothing outside their own database, now dropped). Whether every visit succeeded.
    async fn revoke_elsewhere(
        &self,
        admin: &tokio_postgres::Client,
        project_id: &str,
        db_name: &str,
        roles: &[String],
    ) -> bool {
        let holders = match admin
            .query(
                "SELECT DISTINCT coalesce(d.datname, pg_catalog.current_database())
                 FROM pg_catalog.pg_shdepend s
                 JOIN pg_catalog.pg_roles r ON r.oid = s.refobjid
                 LEFT JOIN pg_catalog.pg_database d ON d.oid = s.dbid
                 WHERE s.refclassid = 'pg_catalog.pg_authid'::pg_catalog.regclass
                   AND r.rolname = ANY ($1)
                   AND (s.dbid = 0 OR d.oid IS NOT NULL)
                   AND d.datname IS DISTINCT FROM $2",
                &[&roles, &db_name],
            )
            .await
        {
            Ok(rows) => rows
                .iter()
                .map(|r| r.get::<_, String>(0))
                .collect::<Vec<_>>(),
            Err(e) => {
                tracing::warn!(project_id, error = %e, "listing what names a project's roles");
                return false;
            }
        };
        let mut ok = true;
        for db in holders {
            let visited = async {
                let client = self.cluster.connect(&db).await?;
                // A tenant's long statement on a table whose policy names these roles must not
                // hold the deletion: it fails here and the sweep tries again.
                client.batch_execute("SET lock_timeout = '5s'").await?;
                // Roles dropped already by an earlier attempt are not there to name.
                let present: Vec<String> = client
                    .query(
                        "SELECT rolname::pg_catalog.text FROM pg_catalog.pg_roles
                         WHERE rolname = ANY ($1)",
                        &[&roles],
                    )
                    .await?
                    .iter()
                    .map(|r| r.get(0))
                    .collect();
                if present.is_empty() {
                    return anyhow::Ok(None);
                }
                let names: Vec<String> = present.iter().map(|r| quote_ident(r)).collect();
                let statement = format!("DROP OWNED BY {}", names.join(", "));
                client.batch_execute(&statement).await?;
                Ok(Some(statement))
            }
            .await;
            match visited {
                Ok(None) => {}
                Ok(Some(statement)) => {
                    tracing::info!(project_id, database = %db, statement, "revoked what another database granted to a deleted project's roles")
                }
                Err(e) => {
                    ok = false;
                    tracing::warn!(project_id, database = %db, error = %format!("{e:#}"), "revoking what another database granted to a deleted project's roles");
                }
            }
        }
        ok
    }

    /// Brings every project's database up to the latest bootstrap version; (id, database) of
    /// the projects that have no replication slot yet (the caller creates them).
    pub async fn migrate_all(&self) -> anyhow::Result<Vec<(String, String)>> {
        let latest = latest_version();
        // A project whose deletion a crash stopped half way may have no database any more:
        // it is not migrated nor given a slot (the teardown sweep finishes its deletion), and
        // the server still starts.
        let deleting = self.being_torn_down().await?;
        let behind = crate::control::projects::behind(&self.control.get().await?, latest).await?;
        for (id, db, from) in behind {
            if deleting.contains(&id) {
                tracing::info!(project_id = %id, "not migrating a project whose deletion is under way");
                continue;
            }
            tracing::info!(project_id = %id, from, to = latest, "migrating project database");
            self.migrate_project(&id, &db, from).await?;
        }
        Ok(
            crate::control::projects::without_slot(&self.control.get().await?)
                .await?
                .into_iter()
                .filter(|(id, _)| !deleting.contains(id))
                .collect(),
        )
    }

    /// The projects (id, database) whose routine epoch may still be unsealed: those at the
    /// epoch's version or later (an earlier start-up's seal may have timed out, see
    /// `seal_routine_epoch`). Sealed ones answer at once.
    pub async fn sealing_candidates(&self) -> anyhow::Result<Vec<(String, String)>> {
        let latest = latest_version();
        Ok(
            crate::control::projects::behind(&self.control.get().await?, latest + 1)
                .await?
                .into_iter()
                .filter(|(_, _, version)| *version >= ROUTINE_EPOCH_VERSION)
                .map(|(id, db, _)| (id, db))
                .collect(),
        )
    }

    /// Seals one project's routine epoch if an earlier start-up could not (a few seconds at
    /// most; one connection to its database). The server does this after its start-up, off
    /// the start-up path: until sealed, the reset runs every check (safe, only slower).
    pub async fn seal_pending(&self, project_id: &str, db_name: &str) -> anyhow::Result<()> {
        let client = self.cluster.connect(db_name).await?;
        seal_routine_epoch(&client, project_id).await
    }

    /// Every project role: settings a caller left behind reset, temp_file_limit as configured,
    /// password logins closed (the server's start-up; a CLI command leaves that to the server,
    /// as it would close a running server's login windows).
    pub async fn secure_roles(&self) -> anyhow::Result<()> {
        let projects = crate::control::projects::all_ids(&self.control.get().await?).await?;
        for id in projects {
            for role in DbRole::ALL {
                let role = role.role_name(&id);
                if let Err(e) = self.role_login(&role).expire_and_repair().await {
                    // Each new connection does the same again; one role must not stop the server.
                    tracing::warn!(project_id = %id, role, error = %format!("{e:#}"), "could not secure a project role");
                }
            }
        }
        Ok(())
    }
}
