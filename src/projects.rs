//! Projects: each one is its own PostgreSQL database with three login roles of its own.
//!
//! ```text
//!  fx_<id>_owner      owns schema public and every object in it (admin scope, developers)
//!  fx_<id>_readwrite  SELECT, INSERT, UPDATE through default privileges (readwrite scope)
//!  fx_<id>_read       SELECT through default privileges (read scope, viewers)
//!  fx_<id>_auth       NOLOGIN: owns schema auth (the request identity, see crate::rls)
//! ```
//! None is a superuser, none can create roles or databases, none is a member of another, and
//! only these three may connect to the project's database. Their passwords are derived from the
//! instance secret and never stored, and expired but for the moment the server logs in
//! ([`RoleLogin`]): a password a caller sets with `ALTER ROLE` opens no login. The bootstrap SQL
//! under `sql/project/` is versioned: start-up brings every existing project up to the latest
//! version.

use std::sync::Arc;

use fluxbase_replication::wire::{ConnectConfig, Connection, WireError};
use serde::Deserialize;
use serde_json::{json, Value};
use warp::http::StatusCode;

use crate::api::error::{ApiError, ApiResult};
use crate::app::App;
use crate::auth::{Access, DbRole, Principal, Project, Scope};
use crate::db::{quote_ident, quote_literal};
use crate::keys::NewKey;
use crate::secrets::random_hex;
use crate::sql::PoolFailure;

/// Per-project bootstrap migrations, in order.
pub const PROJECT_MIGRATIONS: &[(i32, &str, &str)] = &[
    (
        1,
        "roles_and_grants",
        include_str!("../sql/project/0001_roles_and_grants.sql"),
    ),
    (
        2,
        "change_capture",
        include_str!("../sql/project/0002_change_capture.sql"),
    ),
    (
        3,
        "realtime",
        include_str!("../sql/project/0003_realtime.sql"),
    ),
    (4, "rls", include_str!("../sql/project/0004_rls.sql")),
    (
        5,
        "sandbox",
        include_str!("../sql/project/0005_sandbox.sql"),
    ),
    (
        7,
        "partition_truncate",
        include_str!("../sql/project/0007_partition_truncate.sql"),
    ),
    (
        8,
        "definer_search_path",
        include_str!("../sql/project/0008_definer_search_path.sql"),
    ),
];

/// The bootstrap version whose script is followed by the installation of the change stream's
/// message key (see [`App::install_message_key`]).
const MESSAGE_KEY_VERSION: i32 = 5;

#[derive(Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct CreateProject {
    pub name: String,
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct PatchProject {
    pub project_id: String,
    pub name: Option<String>,
    pub realtime_public: Option<bool>,
}

pub fn project_json(p: &Project) -> Value {
    json!({
        "id": p.id,
        "name": p.name,
        "status": p.status,
        "realtimePublic": p.realtime_public,
        "createdAt": p.created_at,
    })
}

/// The password of a project role: HMAC of its name under the instance secret.
pub fn role_password(secrets: &crate::secrets::Secrets, role: &str) -> String {
    secrets.derive(&format!("pg-role:{role}"))
}

fn validate_name(name: &str) -> ApiResult<String> {
    let name = name.trim();
    if name.is_empty() || name.chars().count() > 100 || name.chars().any(|c| c.is_control()) {
        return Err(ApiError::BadRequest(
            "name: 1 to 100 printable characters".into(),
        ));
    }
    Ok(name.to_string())
}

impl App {
    /// The password of a project role: HMAC of its name under the instance secret.
    pub fn role_password(&self, role: &str) -> String {
        role_password(&self.secrets, role)
    }

    /// How the server logs in as a project role (see [`RoleLogin`]).
    pub fn role_login(&self, role: &str) -> RoleLogin {
        RoleLogin::new(
            self.sql.repairs.clone(),
            role,
            self.role_password(role),
            self.config.temp_file_limit_kb,
        )
    }

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
            .query_one("SELECT lo_from_bytea(0, $1)::int8", &[&key])
            .await?
            .get(0);
        client
            .batch_execute(&format!(
                "CREATE OR REPLACE FUNCTION fluxbase_cdc.message_key() RETURNS bytea
                 LANGUAGE sql STABLE SET search_path = pg_catalog AS $$ SELECT lo_get({oid}::oid) $$;
                 REVOKE ALL ON FUNCTION fluxbase_cdc.message_key() FROM PUBLIC;"
            ))
            .await?;
        Ok(())
    }

    /// Creates the roles and the database of a new project and runs its bootstrap.
    async fn provision(&self, project_id: &str, db_name: &str) -> anyhow::Result<()> {
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

    /// The project's replication slot (after its row exists in the control database).
    async fn provision_slot(&self, project_id: &str, db_name: &str) -> anyhow::Result<()> {
        self.cdc.ensure_slot(project_id, db_name).await
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
            control
                .execute(
                    "UPDATE fluxbase.projects SET bootstrap_version = $2 WHERE id = $1",
                    &[&project_id, version],
                )
                .await?;
        }
        Ok(())
    }

    /// Drops what [`provision`] created (after a failed creation).
    async fn deprovision(&self, project_id: &str, db_name: &str) {
        self.sql.forget_project(project_id);
        let Ok(admin) = self.cluster.connect(&self.cluster.control_db).await else {
            return;
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
        let mut statements = vec![format!(
            "DROP DATABASE IF EXISTS {} WITH (FORCE)",
            quote_ident(db_name)
        )];
        for role in DbRole::ALL
            .map(|r| r.role_name(project_id))
            .into_iter()
            .chain([crate::rls::auth_role(project_id)])
        {
            statements.push(format!("DROP ROLE IF EXISTS {}", quote_ident(&role)));
        }
        for sql in statements {
            if let Err(e) = admin.batch_execute(&sql).await {
                tracing::warn!(project_id, error = %e, "cleaning up a project");
            }
        }
    }

    /// Creates a project owned by `user_id` (its admin) with one key of each scope.
    pub async fn create_project(
        &self,
        user_id: &str,
        name: &str,
    ) -> ApiResult<(Project, Vec<NewKey>)> {
        let name = validate_name(name)?;
        let id = random_hex::<8>();
        let db_name = format!("fx_{id}");
        tracing::info!(project_id = %id, "creating project");
        if let Err(e) = self.provision(&id, &db_name).await {
            self.deprovision(&id, &db_name).await;
            return Err(e.into());
        }
        let result: ApiResult<(Project, Vec<NewKey>)> = async {
            let mut client = self.control.get().await?;
            let tx = client.transaction().await?;
            let row = tx
                .query_one(
                    "INSERT INTO fluxbase.projects (id, name, db_name, bootstrap_version)
                     VALUES ($1, $2, $3, $4) RETURNING created_at",
                    &[
                        &id,
                        &name,
                        &db_name,
                        &PROJECT_MIGRATIONS.last().map(|m| m.0).unwrap_or(0),
                    ],
                )
                .await?;
            tx.execute(
                "INSERT INTO fluxbase.members (project_id, user_id, role) VALUES ($1, $2, 'admin')",
                &[&id, &user_id],
            )
            .await?;
            let mut keys = Vec::new();
            for scope in [Scope::Read, Scope::ReadWrite, Scope::Admin] {
                keys.push(
                    crate::keys::insert_key(
                        &tx,
                        &id,
                        scope,
                        &format!("Default {} key", scope.as_str()),
                    )
                    .await?,
                );
            }
            tx.commit().await?;
            Ok((
                Project {
                    id: id.clone(),
                    name: name.clone(),
                    status: "active".into(),
                    realtime_public: false,
                    db_name: db_name.clone(),
                    created_at: row.get(0),
                },
                keys,
            ))
        }
        .await;
        let result = match result {
            Ok(created) => match self.provision_slot(&id, &db_name).await {
                Ok(()) => Ok(created),
                Err(e) => {
                    if let Ok(c) = self.control.get().await {
                        let _ = c
                            .execute("DELETE FROM fluxbase.projects WHERE id = $1", &[&id])
                            .await;
                    }
                    Err(e.into())
                }
            },
            Err(e) => Err(e),
        };
        if result.is_err() {
            self.deprovision(&id, &db_name).await;
        }
        result
    }

    /// Deletes a project: its change stream and slot, database, roles, keys and members.
    pub async fn delete_project(&self, project_id: &str) -> ApiResult<()> {
        let project = self
            .load_project(project_id)
            .await?
            .ok_or(ApiError::ProjectNotFound)?;
        self.cdc.stop(project_id).await;
        self.deprovision(project_id, &project.db_name).await;
        let client = self.control.get().await?;
        client
            .execute(
                "DELETE FROM fluxbase.projects WHERE id = $1",
                &[&project_id],
            )
            .await?;
        drop(client);
        self.storage.delete_project_objects(project_id).await;
        self.invalidate_project_access(project_id).await;
        self.realtime
            .close_project(project_id, crate::realtime::RoomClosed::Deleted);
        self.bus.remove(project_id);
        tracing::info!(project_id, "project deleted");
        Ok(())
    }

    pub async fn create_project_endpoint(
        &self,
        principal: &Principal,
        req: CreateProject,
    ) -> ApiResult<(StatusCode, Value)> {
        let user_id = principal.require_session()?;
        // The quota applies to users of the API; the operator's CLI is not bound by it.
        let _one_at_a_time = self.account_limits.creating_project(user_id).await;
        let quota = self.config.max_projects_per_user;
        if quota > 0 {
            let administered: i64 = self
                .control
                .get()
                .await?
                .query_one(
                    "SELECT count(*) FROM fluxbase.members WHERE user_id = $1 AND role = 'admin'",
                    &[&user_id],
                )
                .await?
                .get(0);
            if administered >= i64::from(quota) {
                return Err(ApiError::InsufficientPermissions(format!(
                    "Project quota reached: a user may administer at most {quota} projects \
                     (max_projects_per_user). Delete a project or ask the operator to raise it."
                )));
            }
        }
        let (project, keys) = self.create_project(user_id, &req.name).await?;
        let mut api_keys = serde_json::Map::new();
        for k in keys {
            api_keys.insert(k.scope.as_str().to_string(), json!(k.secret));
        }
        Ok((
            StatusCode::CREATED,
            json!({ "success": true, "project": project_json(&project), "apiKeys": api_keys }),
        ))
    }

    pub async fn list_projects(&self, principal: &Principal) -> ApiResult<(StatusCode, Value)> {
        let client = self.control.get().await?;
        let rows = match principal {
            Principal::Session { user_id, .. } => {
                client
                    .query(
                        "SELECT p.id, p.name, p.status, p.realtime_public, p.created_at, m.role
                         FROM fluxbase.projects p JOIN fluxbase.members m ON m.project_id = p.id
                         WHERE m.user_id = $1 ORDER BY p.created_at",
                        &[user_id],
                    )
                    .await?
            }
            Principal::Key { project_id, .. } => {
                client
                    .query(
                        "SELECT id, name, status, realtime_public, created_at, NULL::text
                         FROM fluxbase.projects WHERE id = $1",
                        &[project_id],
                    )
                    .await?
            }
        };
        let projects: Vec<Value> = rows
            .iter()
            .map(|r| {
                json!({
                    "id": r.get::<_, String>(0),
                    "name": r.get::<_, String>(1),
                    "status": r.get::<_, String>(2),
                    "realtimePublic": r.get::<_, bool>(3),
                    "createdAt": r.get::<_, chrono::DateTime<chrono::Utc>>(4),
                    "role": r.get::<_, Option<String>>(5),
                })
            })
            .collect();
        Ok((
            StatusCode::OK,
            json!({ "success": true, "projects": projects }),
        ))
    }

    pub async fn patch_project(
        &self,
        access: &Access,
        req: PatchProject,
    ) -> ApiResult<(StatusCode, Value)> {
        access.require_admin()?;
        let name = req.name.as_deref().map(validate_name).transpose()?;
        let client = self.control.get().await?;
        client
            .execute(
                "UPDATE fluxbase.projects SET name = coalesce($2, name),
                        realtime_public = coalesce($3, realtime_public) WHERE id = $1",
                &[&access.project.id, &name, &req.realtime_public],
            )
            .await?;
        drop(client);
        self.invalidate_access().await;
        let project = self
            .load_project(&access.project.id)
            .await?
            .ok_or(ApiError::ProjectNotFound)?;
        Ok((
            StatusCode::OK,
            json!({ "success": true, "project": project_json(&project) }),
        ))
    }

    /// `fluxbase project suspend|resume <id>`: changes the status only, never the data.
    pub async fn set_project_status(&self, project_id: &str, status: &str) -> anyhow::Result<()> {
        let client = self.control.get().await?;
        let n = client
            .execute(
                "UPDATE fluxbase.projects SET status = $2 WHERE id = $1",
                &[&project_id, &status],
            )
            .await?;
        if n == 0 {
            anyhow::bail!("no project {project_id}");
        }
        drop(client);
        // Suspension only refuses access: the project's database, keys and stored objects are
        // all kept, so `resume` gives back exactly what was there.
        self.invalidate_project_access(project_id).await;
        self.sql.forget_project(project_id);
        if status == "suspended" {
            self.realtime
                .close_project(project_id, crate::realtime::RoomClosed::Suspended);
        }
        Ok(())
    }
}

/// Brings every project's database up to the latest bootstrap version.
/// `secure_roles`: the server's start-up also repairs every project role; a CLI command leaves
/// that to the server (it would close a running server's login windows).
pub async fn migrate_all(app: &App, secure_roles: bool) -> anyhow::Result<()> {
    let latest = PROJECT_MIGRATIONS.last().map(|m| m.0).unwrap_or(0);
    let rows = app
        .control
        .get()
        .await?
        .query(
            "SELECT id, db_name, bootstrap_version FROM fluxbase.projects WHERE bootstrap_version < $1",
            &[&latest],
        )
        .await?;
    for r in rows {
        let (id, db, from): (String, String, i32) = (r.get(0), r.get(1), r.get(2));
        tracing::info!(project_id = %id, from, to = latest, "migrating project database");
        app.migrate_project(&id, &db, from).await?;
    }
    let unslotted = app
        .control
        .get()
        .await?
        .query(
            "SELECT id, db_name FROM fluxbase.projects WHERE cdc_slot IS NULL",
            &[],
        )
        .await?;
    for r in unslotted {
        app.cdc.ensure_slot(r.get(0), r.get(1)).await?;
    }
    if !secure_roles {
        return Ok(());
    }
    // Every project role: settings a caller left behind reset, temp_file_limit as configured,
    // password logins closed.
    let projects = app
        .control
        .get()
        .await?
        .query("SELECT id FROM fluxbase.projects", &[])
        .await?;
    for r in projects {
        let id: String = r.get(0);
        for role in DbRole::ALL {
            let role = role.role_name(&id);
            if let Err(e) = app.role_login(&role).expire_and_repair().await {
                // Each new connection does the same again; one role must not stop the server.
                tracing::warn!(project_id = %id, role, error = %format!("{e:#}"), "could not secure a project role");
            }
        }
    }
    Ok(())
}

/// A caller's open transaction that changed its role (`BEGIN; ALTER ROLE CURRENT_USER …;
/// SELECT pg_sleep(…)`, or one long `DO` block) holds the role's catalog row: a repair waits at
/// most this long for it, then ends that caller's session (see [`RoleLogin`]) and tries again.
const REPAIR_LOCK_TIMEOUT: &str = "SET LOCAL lock_timeout = '200ms';";

/// Repairs of one role tried in a row before its new connection is refused (429).
const REPAIR_ATTEMPTS: usize = 3;

/// How long a login waits for another process's login of the same role (advisory lock).
const LOGIN_LOCK_TIMEOUT: &str = "SET LOCAL lock_timeout = '5s';";

/// How the server logs in as a project role. PostgreSQL lets every role change its own password
/// and its own settings (`ALTER ROLE CURRENT_USER PASSWORD …`, `… SET …`, `… IN DATABASE … SET
/// …`), and no trigger sees it; it never lets a role change its own `VALID UNTIL`. So the roles'
/// passwords are expired, and each new connection of the server:
///
/// 1. as the admin role, in one statement: resets any setting stored for the role (in any
///    database) but the configured `temp_file_limit`, sets that when missing, and sets the
///    role's password (the server's own, whatever a caller set) valid for one minute;
/// 2. logs in (a `28P01` means a caller changed the password in between: again, twice at most);
/// 3. expires the password again at once.
///
/// The repairs run on the server's own small pool of admin sessions (`SqlPools::repairs`),
/// never on the control pool that serves requests, and wait at most 200 ms for the role's
/// catalog rows. The only sessions that can hold those rows are the role's own (an open
/// transaction that ran `ALTER ROLE CURRENT_USER …`): on a lock timeout those sessions are
/// terminated and the repair is tried again; after three attempts the new connection is refused
/// with 429. The three steps run in a task of their own, so a caller that goes away (a client
/// disconnecting, a pool's create timeout) never leaves step 3 undone.
///
/// Logins of one role are made one at a time, across processes too (a session-level advisory
/// lock on the repair session, `hashtext('fluxbase-login:' || role)`), so one's step 3 never
/// ends another's window. What is left: a caller who sets a password exactly inside one of
/// these few-millisecond windows could log in directly until it closes (as the same role, with
/// its privileges); a server killed between 1 and 3 leaves a window of at most a minute.
/// Sessions already open are not affected by any of this (settings apply at login), and the
/// next new connection repairs whatever a caller changed.
pub struct RoleLogin {
    repairs: deadpool_postgres::Pool,
    role: String,
    password: String,
    temp_file_limit_kb: u64,
    verifier: tokio::sync::OnceCell<String>,
    one_at_a_time: tokio::sync::Mutex<()>,
}

/// Why a repair failed.
enum RepairError {
    /// The role's catalog rows stayed locked (by its own sessions) through every attempt.
    Busy(String),
    Other(anyhow::Error),
}

impl From<RepairError> for PoolFailure {
    fn from(e: RepairError) -> Self {
        match e {
            RepairError::Busy(m) => PoolFailure::Busy(m),
            RepairError::Other(e) => PoolFailure::Wire(WireError::Protocol(format!(
                "repairing a role's login: {e:#}"
            ))),
        }
    }
}

impl RoleLogin {
    /// How the server logs in as `role` with `password`, repairing the role through `repairs`.
    pub fn new(
        repairs: deadpool_postgres::Pool,
        role: &str,
        password: String,
        temp_file_limit_kb: u64,
    ) -> RoleLogin {
        RoleLogin {
            repairs,
            role: role.to_string(),
            password,
            temp_file_limit_kb,
            verifier: tokio::sync::OnceCell::new(),
            one_at_a_time: tokio::sync::Mutex::new(()),
        }
    }

    /// Step 1 with `Some(verifier)`; with `None` the same resets, and the password expired.
    fn secure_sql(&self, verifier: Option<&str>) -> String {
        let role = quote_literal(&self.role);
        let wanted = quote_literal(&format!("temp_file_limit={}kB", self.temp_file_limit_kb));
        let limit = quote_literal(&format!("{}kB", self.temp_file_limit_kb));
        let valid = match verifier {
            Some(v) => format!(
                "EXECUTE format('ALTER ROLE %I PASSWORD %L VALID UNTIL %L', {role}, {}, now() + interval '1 minute');",
                quote_literal(v)
            ),
            None => format!("EXECUTE format('ALTER ROLE %I VALID UNTIL %L', {role}, '-infinity');"),
        };
        // temp_file_limit can only be set by a superuser: an admin role that is none (a managed
        // cluster) leaves it to the cluster's configuration.
        format!(
            "DO $fx$
             DECLARE
                 r oid := (SELECT oid FROM pg_catalog.pg_roles WHERE rolname = {role});
                 wanted text[] := CASE WHEN (SELECT rolsuper FROM pg_catalog.pg_roles
                                             WHERE rolname = current_user)
                                       THEN ARRAY[{wanted}] END;
                 s record;
                 db name;
             BEGIN
                 IF r IS NULL THEN
                     RAISE EXCEPTION 'role % does not exist', {role};
                 END IF;
                 FOR s IN SELECT setdatabase, setconfig FROM pg_catalog.pg_db_role_setting
                          WHERE setrole = r LOOP
                     IF s.setdatabase <> 0 THEN
                         db := (SELECT datname FROM pg_catalog.pg_database WHERE oid = s.setdatabase);
                         IF db IS NOT NULL THEN
                             EXECUTE format('ALTER ROLE %I IN DATABASE %I RESET ALL', {role}, db);
                         END IF;
                     ELSIF s.setconfig IS DISTINCT FROM wanted THEN
                         EXECUTE format('ALTER ROLE %I RESET ALL', {role});
                     END IF;
                 END LOOP;
                 IF wanted IS NOT NULL AND NOT EXISTS (
                     SELECT 1 FROM pg_catalog.pg_db_role_setting
                     WHERE setrole = r AND setdatabase = 0 AND setconfig = wanted) THEN
                     EXECUTE format('ALTER ROLE %I SET temp_file_limit = %L', {role}, {limit});
                 END IF;
                 {valid}
             END $fx$"
        )
    }

    fn close_sql(&self) -> String {
        format!(
            "ALTER ROLE {} VALID UNTIL '-infinity'",
            quote_ident(&self.role)
        )
    }

    /// An admin session of the repair pool; 429 when all are busy for their whole wait.
    async fn session(&self) -> Result<deadpool_postgres::Object, RepairError> {
        self.repairs.get().await.map_err(|e| match e {
            deadpool_postgres::PoolError::Timeout(_) => RepairError::Busy(
                "The server's role-repair connections are all busy; retry in a moment.".into(),
            ),
            e => RepairError::Other(e.into()),
        })
    }

    /// Runs `sql` as the admin role, waiting at most 200 ms for the role's catalog rows; on a
    /// lock timeout ends the role's own sessions that hold them, then again.
    async fn repair(&self, admin: &tokio_postgres::Client, sql: &str) -> Result<(), RepairError> {
        for attempt in 1..=REPAIR_ATTEMPTS {
            let e = match admin
                .batch_execute(&format!("BEGIN; {REPAIR_LOCK_TIMEOUT} {sql}; COMMIT"))
                .await
            {
                Ok(()) => return Ok(()),
                Err(e) => e,
            };
            let _ = admin.batch_execute("ROLLBACK").await;
            if e.code() != Some(&tokio_postgres::error::SqlState::LOCK_NOT_AVAILABLE) {
                return Err(RepairError::Other(e.into()));
            }
            tracing::warn!(role = %self.role, attempt, "a session of the role holds its catalog row; ending it");
            self.end_lock_holders(admin).await;
        }
        Err(RepairError::Busy(format!(
            "A session of this project keeps its database role {} locked (ALTER ROLE in an open \
             transaction); retry in a moment.",
            self.role
        )))
    }

    /// Terminates the role's own sessions whose open transaction updated its catalog rows
    /// (`pg_authid`, `pg_db_role_setting`): only such a transaction holds them.
    async fn end_lock_holders(&self, admin: &tokio_postgres::Client) {
        let ended = admin
            .query(
                "SELECT pg_catalog.pg_terminate_backend(a.pid)
                 FROM pg_catalog.pg_stat_activity a
                 JOIN pg_catalog.pg_locks l ON l.pid = a.pid AND l.locktype = 'transactionid'
                      AND l.mode = 'ExclusiveLock' AND l.granted
                 WHERE a.usename = $1 AND a.pid <> pg_catalog.pg_backend_pid()
                   AND l.transactionid IN (
                       SELECT xmax FROM pg_catalog.pg_authid WHERE rolname = $1
                       UNION ALL
                       SELECT s.xmax FROM pg_catalog.pg_db_role_setting s
                       JOIN pg_catalog.pg_authid r ON r.oid = s.setrole WHERE r.rolname = $1)",
                &[&self.role],
            )
            .await;
        match ended {
            Ok(rows) => {
                tracing::warn!(role = %self.role, sessions = rows.len(), "ended sessions holding the role's catalog rows")
            }
            Err(e) => {
                tracing::warn!(role = %self.role, error = %e, "could not look for the sessions holding the role's catalog rows")
            }
        }
        // Termination is a signal: give the transaction a moment to end.
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    }

    /// The advisory lock that makes logins of one role one at a time across processes.
    fn login_lock(&self) -> String {
        format!(
            "hashtext({})",
            quote_literal(&format!("fluxbase-login:{}", self.role))
        )
    }

    /// Lets the server's password log in as the role for a moment (step 1); nothing closes it
    /// but the next login or the minute running out. For tests and tools that log in themselves.
    pub async fn open(&self) -> anyhow::Result<()> {
        let admin = self.session().await.map_err(repair_anyhow)?;
        let sql = self.secure_sql(Some(self.verifier().await));
        self.repair(&admin, &sql).await.map_err(repair_anyhow)
    }

    /// Expires the role's password again (after [`open`](Self::open)).
    pub async fn close(&self) -> anyhow::Result<()> {
        let admin = self.session().await.map_err(repair_anyhow)?;
        self.repair(&admin, &self.close_sql())
            .await
            .map_err(repair_anyhow)
    }

    /// Step 1 without opening: settings reset, password expired (start-up).
    pub async fn expire_and_repair(&self) -> anyhow::Result<()> {
        let admin = self.session().await.map_err(repair_anyhow)?;
        self.locked(&admin).await.map_err(repair_anyhow)?;
        let result = self.repair(&admin, &self.secure_sql(None)).await;
        self.unlock(admin).await;
        result.map_err(repair_anyhow)
    }

    async fn verifier(&self) -> &str {
        self.verifier
            .get_or_init(|| async {
                postgres_protocol::password::scram_sha_256(self.password.as_bytes())
            })
            .await
    }

    /// Takes the role's login lock on `admin` (waits for another process's login).
    async fn locked(&self, admin: &tokio_postgres::Client) -> Result<(), RepairError> {
        let lock = self.login_lock();
        match admin
            .batch_execute(&format!(
                "BEGIN; {LOGIN_LOCK_TIMEOUT} SELECT pg_advisory_lock({lock}); COMMIT"
            ))
            .await
        {
            Ok(()) => Ok(()),
            Err(e) => {
                let _ = admin.batch_execute("ROLLBACK").await;
                if e.code() == Some(&tokio_postgres::error::SqlState::LOCK_NOT_AVAILABLE) {
                    Err(RepairError::Busy(format!(
                        "Another login as {} is taking long; retry in a moment.",
                        self.role
                    )))
                } else {
                    Err(RepairError::Other(e.into()))
                }
            }
        }
    }

    /// Releases the login lock; a session that cannot is closed (which releases it).
    async fn unlock(&self, admin: deadpool_postgres::Object) {
        let unlocked = admin
            .batch_execute(&format!("SELECT pg_advisory_unlock({})", self.login_lock()))
            .await;
        if unlocked.is_err() {
            drop(deadpool_postgres::Object::take(admin));
        }
    }

    /// A new connection as the role (see the type's docs); `cfg` carries the server's password.
    /// Runs in a task of its own: dropping the returned future never leaves the login open.
    pub async fn connect(self: &Arc<Self>, cfg: &ConnectConfig) -> Result<Connection, PoolFailure> {
        let this = self.clone();
        let cfg = cfg.clone();
        match tokio::spawn(async move { this.login(&cfg).await }).await {
            Ok(result) => result,
            Err(e) => Err(PoolFailure::Wire(WireError::Protocol(format!(
                "the login task failed: {e}"
            )))),
        }
    }

    async fn login(&self, cfg: &ConnectConfig) -> Result<Connection, PoolFailure> {
        let _one_at_a_time = self.one_at_a_time.lock().await;
        let admin = self.session().await?;
        self.locked(&admin).await?;
        let result = self.login_locked(&admin, cfg).await;
        self.unlock(admin).await;
        result
    }

    async fn login_locked(
        &self,
        admin: &tokio_postgres::Client,
        cfg: &ConnectConfig,
    ) -> Result<Connection, PoolFailure> {
        let open = self.secure_sql(Some(self.verifier().await));
        let close = self.close_sql();
        let mut attempt = 1;
        loop {
            self.repair(admin, &open).await?;
            let result = Connection::connect(cfg).await;
            if let Err(e) = self.repair(admin, &close).await {
                let e = match e {
                    RepairError::Busy(m) => anyhow::anyhow!(m),
                    RepairError::Other(e) => e,
                };
                tracing::warn!(role = %self.role, error = %format!("{e:#}"), "could not expire the role's password again");
            }
            match result {
                Err(WireError::Db(e)) if e.code == "28P01" && attempt < 3 => {
                    tracing::warn!(role = %self.role, "login refused (the password changed meanwhile); again");
                    attempt += 1;
                }
                other => return other.map_err(PoolFailure::Wire),
            }
        }
    }
}

fn repair_anyhow(e: RepairError) -> anyhow::Error {
    match e {
        RepairError::Busy(m) => anyhow::anyhow!(m),
        RepairError::Other(e) => e,
    }
}
