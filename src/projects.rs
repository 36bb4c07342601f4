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
//! instance secret and never stored. The bootstrap SQL under `sql/project/` is versioned: start-up
//! brings every existing project up to the latest version.

use serde::Deserialize;
use serde_json::{json, Value};
use warp::http::StatusCode;

use crate::app::App;
use crate::auth::{Access, DbRole, Principal, Project, Scope};
use crate::db::{quote_ident, quote_literal};
use crate::error::{ApiError, ApiResult};
use crate::keys::NewKey;
use crate::secrets::random_hex;

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
];

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
        self.secrets.derive(&format!("pg-role:{role}"))
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
                     NOBYPASSRLS NOINHERIT CONNECTION LIMIT 64 PASSWORD {}",
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
        self.ensure_slot(project_id, db_name).await
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
            client
                .batch_execute(&format!("BEGIN;\n{sql}\nCOMMIT;"))
                .await
                .map_err(|e| {
                    anyhow::anyhow!("project {project_id} migration {version} ({name}): {e}")
                })?;
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
        self.stop_change_stream(project_id).await;
        self.deprovision(project_id, &project.db_name).await;
        let client = self.control.get().await?;
        client
            .execute(
                "DELETE FROM fluxbase.projects WHERE id = $1",
                &[&project_id],
            )
            .await?;
        drop(client);
        self.delete_project_objects(project_id).await;
        self.invalidate_project_access(project_id).await;
        self.realtime
            .close_project(project_id, "PROJECT_NOT_FOUND", "The project was deleted.");
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

    /// `fluxbase project suspend|resume <id>`.
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
        self.delete_project_objects(project_id).await;
        self.invalidate_project_access(project_id).await;
        self.sql.forget_project(project_id);
        if status == "suspended" {
            self.realtime.close_project(
                project_id,
                "PROJECT_SUSPENDED",
                "The project was suspended.",
            );
        }
        Ok(())
    }
}

/// Brings every project's database up to the latest bootstrap version.
pub async fn migrate_all(app: &App) -> anyhow::Result<()> {
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
        app.ensure_slot(r.get(0), r.get(1)).await?;
    }
    Ok(())
}
