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
//!
//! ```text
//!  mod.rs         Project, ProjectStatus, the Projects service (create, list, change, status)
//!  provision.rs   databases and roles: create, migrate, drop
//!  role_login.rs  how the server logs in as a project role
//!  instance.rs    the first run (default user, project and keys)
//! ```
//! A project's change stream, SQL pools, stored objects and realtime room belong to other
//! services: creating, deleting or suspending a project across all of them is the app's
//! wiring (`crate::app`).

pub mod instance;
mod provision;
mod role_login;
pub mod teardown;

use std::sync::Arc;

use chrono::{DateTime, Utc};
use serde::Serialize;

use crate::auth::ratelimit::AccountLimits;
use crate::auth::{Access, AuthError, MemberRole, Principal, Scope};
use crate::control;
use crate::db::ClusterTarget;
use crate::keys::NewKey;
use crate::secrets::{random_hex, Secrets};

pub use provision::{latest_version, seal_routine_epoch, PROJECT_MIGRATIONS};
pub use role_login::RoleLogin;

/// Whether a project serves requests. Suspension only refuses access: the project's database,
/// keys and stored objects are all kept, so resuming gives back exactly what was there.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, utoipa::ToSchema)]
#[serde(rename_all = "lowercase")]
pub enum ProjectStatus {
    Active,
    Suspended,
}

impl ProjectStatus {
    pub fn parse(s: &str) -> Option<ProjectStatus> {
        match s {
            "active" => Some(ProjectStatus::Active),
            "suspended" => Some(ProjectStatus::Suspended),
            _ => None,
        }
    }

    pub fn as_str(self) -> &'static str {
        match self {
            ProjectStatus::Active => "active",
            ProjectStatus::Suspended => "suspended",
        }
    }
}

/// The database engine a project runs on: its own PostgreSQL database in the cluster, or its
/// own database on the MySQL server (see [`crate::mysql`]). Chosen at creation, never changed.
#[derive(
    Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, serde::Deserialize, utoipa::ToSchema,
)]
#[serde(rename_all = "lowercase")]
pub enum Engine {
    #[default]
    Postgresql,
    Mysql,
}

impl Engine {
    pub fn parse(s: &str) -> Option<Engine> {
        match s {
            "postgresql" => Some(Engine::Postgresql),
            "mysql" => Some(Engine::Mysql),
            _ => None,
        }
    }

    pub fn as_str(self) -> &'static str {
        match self {
            Engine::Postgresql => "postgresql",
            Engine::Mysql => "mysql",
        }
    }
}

#[derive(Clone, Debug)]
pub struct Project {
    pub id: String,
    pub name: String,
    pub engine: Engine,
    pub status: ProjectStatus,
    pub realtime_public: bool,
    pub db_name: String,
    pub created_at: DateTime<Utc>,
    /// The account the project belongs to: its first admin (the user who created it, unless
    /// that user left it). `None`: no admin is left. What one account's projects hold together
    /// is bounded by it (`sql_answer_budget_per_account_bytes`).
    pub owner: Option<String>,
}

impl Project {
    /// The account the project's use of shared resources is counted against, all its projects
    /// together: the SQL answer budget's (`sql_answer_budget_per_account_bytes`) and the SQL
    /// connections' (`sql_account_connections`). See [`account_key`].
    pub fn account(&self) -> std::borrow::Cow<'_, str> {
        account_key(&self.id, self.owner.as_deref())
    }
}

/// The key of a project's account: its owner (the first admin who chose the role: created the
/// project or accepted an invitation as admin, control migration 22), or the project itself
/// (`project <id>`, never a user id) when no such admin is left. An owner who leaves hands the
/// project's use to the next such admin for later requests; an admin made by another admin's
/// role change is never the owner, so nobody is made to carry another's project without
/// agreeing to (red team rt6 H1).
pub fn account_key<'a>(project_id: &str, owner: Option<&'a str>) -> std::borrow::Cow<'a, str> {
    match owner {
        Some(owner) => std::borrow::Cow::Borrowed(owner),
        None => std::borrow::Cow::Owned(format!("project {project_id}")),
    }
}

/// A project as the API shows it (never its database's name).
#[derive(Serialize, utoipa::ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct ProjectView {
    pub id: String,
    pub name: String,
    pub engine: Engine,
    pub status: ProjectStatus,
    pub realtime_public: bool,
    #[schema(value_type = String, format = DateTime)]
    pub created_at: DateTime<Utc>,
}

impl From<&Project> for ProjectView {
    fn from(p: &Project) -> Self {
        ProjectView {
            id: p.id.clone(),
            name: p.name.clone(),
            engine: p.engine,
            status: p.status,
            realtime_public: p.realtime_public,
            created_at: p.created_at,
        }
    }
}

/// A project in the caller's list, with the caller's role (`null` for an API key).
#[derive(Serialize, utoipa::ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct ListedProject {
    pub id: String,
    pub name: String,
    pub engine: Engine,
    pub status: ProjectStatus,
    pub realtime_public: bool,
    #[schema(value_type = String, format = DateTime)]
    pub created_at: DateTime<Utc>,
    pub role: Option<MemberRole>,
}

/// The keys a new project starts with, one of each scope.
pub struct DefaultKeys {
    pub read: NewKey,
    pub readwrite: NewKey,
    pub admin: NewKey,
}

impl DefaultKeys {
    pub fn all(&self) -> [&NewKey; 3] {
        [&self.read, &self.readwrite, &self.admin]
    }
}

/// The secrets of a new project's keys, by scope (shown once).
#[derive(Serialize, utoipa::ToSchema)]
pub struct ApiKeySecrets {
    pub read: String,
    pub readwrite: String,
    pub admin: String,
}

impl From<&DefaultKeys> for ApiKeySecrets {
    fn from(k: &DefaultKeys) -> Self {
        ApiKeySecrets {
            read: k.read.secret.clone(),
            readwrite: k.readwrite.secret.clone(),
            admin: k.admin.secret.clone(),
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum ProjectsError {
    #[error(transparent)]
    Auth(#[from] AuthError),
    #[error("name: 1 to 100 printable characters, without control (such as NUL), text-direction (such as U+202E) or invisible (such as U+200B) characters")]
    InvalidName,
    #[error("engine: expected \"postgresql\" or \"mysql\", got {0:?}")]
    InvalidEngine(String),
    #[error(
        "Project quota reached: a user may administer at most {0} projects \
         (max_projects_per_user). Delete a project or ask the operator to raise it."
    )]
    QuotaReached(u32),
    /// The deployment holds as many projects as it can (its own cap or a database server's
    /// capacity): what is full, and the setting that would change it.
    #[error("{0}")]
    ServerFull(String),
    #[error("no project {0}")]
    NoSuchProject(String),
    /// The engine exists but this deployment cannot host it (why, and the fix).
    #[error("{0}")]
    EngineUnavailable(String),
    #[error(transparent)]
    Internal(#[from] anyhow::Error),
}

impl From<tokio_postgres::Error> for ProjectsError {
    fn from(e: tokio_postgres::Error) -> Self {
        ProjectsError::Internal(e.into())
    }
}

impl From<deadpool_postgres::PoolError> for ProjectsError {
    fn from(e: deadpool_postgres::PoolError) -> Self {
        ProjectsError::Internal(e.into())
    }
}

fn validate_name(name: &str) -> Result<String, ProjectsError> {
    let name = name.trim();
    if name.is_empty() || name.chars().count() > 100 || crate::text::has_deceptive(name) {
        return Err(ProjectsError::InvalidName);
    }
    Ok(name.to_string())
}

/// Projects: their rows on the control database, their databases and roles in the cluster.
pub struct Projects {
    control: deadpool_postgres::Pool,
    cluster: ClusterTarget,
    secrets: Secrets,
    /// Admin sessions for the role repairs of new connections (`SqlPools::repairs`).
    repairs: deadpool_postgres::Pool,
    temp_file_limit_kb: u64,
    max_projects_per_user: u32,
    limits: Arc<AccountLimits>,
    /// Held while a project is created, so that two creations cannot both take the last room
    /// the deployment has (`App::room_for_project`).
    creating: tokio::sync::Mutex<()>,
    /// The MySQL server of MySQL projects (their database and accounts).
    mysql: Arc<crate::mysql::Mysql>,
}

impl Projects {
    pub fn new(
        control: deadpool_postgres::Pool,
        cluster: ClusterTarget,
        secrets: Secrets,
        repairs: deadpool_postgres::Pool,
        config: &crate::config::Config,
        limits: Arc<AccountLimits>,
        mysql: Arc<crate::mysql::Mysql>,
    ) -> Projects {
        Projects {
            control,
            cluster,
            secrets,
            repairs,
            temp_file_limit_kb: config.temp_file_limit_kb,
            max_projects_per_user: config.max_projects_per_user,
            limits,
            creating: tokio::sync::Mutex::new(()),
            mysql,
        }
    }

    /// The password of a project role ([`role_password`]).
    pub fn role_password(&self, role: &str) -> String {
        role_password(&self.secrets, role)
    }

    /// How the server logs in as a project role (see [`RoleLogin`]).
    pub fn role_login(&self, role: &str) -> RoleLogin {
        RoleLogin::new(
            self.repairs.clone(),
            role,
            self.role_password(role),
            self.temp_file_limit_kb,
        )
    }

    /// Creates a project owned by `user_id` (its admin) with one key of each scope: database,
    /// roles (or MySQL accounts) and rows. The caller then creates its replication slot (a
    /// PostgreSQL project), and [`discard`]s it if that fails.
    ///
    /// [`discard`]: Self::discard
    pub async fn create(
        &self,
        user_id: &str,
        name: &str,
        engine: Engine,
    ) -> Result<(Project, DefaultKeys), ProjectsError> {
        let name = validate_name(name)?;
        let id = random_hex::<8>();
        let db_name = format!("fx_{id}");
        tracing::info!(project_id = %id, engine = engine.as_str(), "creating project");
        // Recorded before anything is made: a crash from here on leaves a record the teardown
        // sweep finds, not a database and roles nothing names.
        control::teardowns::record(&self.control.get().await?, &id, &db_name, engine, true).await?;
        let provisioned = match engine {
            Engine::Postgresql => self.provision(&id, &db_name).await,
            Engine::Mysql => self.mysql.provision(&id, &db_name).await,
        };
        if let Err(e) = provisioned {
            self.tear_down(&id, &db_name, engine).await;
            return Err(e.into());
        }
        let result: Result<(Project, DefaultKeys), ProjectsError> = async {
            let mut client = self.control.get().await?;
            let tx = client.transaction().await?;
            let created_at =
                control::projects::insert(&tx, &id, &name, &db_name, latest_version(), engine)
                    .await?;
            control::members::insert(&tx, &id, user_id, MemberRole::Admin).await?;
            if !control::teardowns::created(&tx, &id).await? {
                return Err(ProjectsError::Internal(anyhow::anyhow!(
                    "project {id}: its creation outlasted the teardown sweep's grace ({} s) and \
                     was swept as abandoned",
                    teardown::CREATION_GRACE.as_secs()
                )));
            }
            let key = |scope: Scope| {
                let name = format!("Default {} key", scope.as_str());
                let (tx, id) = (&tx, &id);
                async move { crate::keys::insert_key(tx, id, scope, &name).await }
            };
            let keys = DefaultKeys {
                read: key(Scope::Read).await?,
                readwrite: key(Scope::ReadWrite).await?,
                admin: key(Scope::Admin).await?,
            };
            tx.commit().await?;
            Ok((
                Project {
                    id: id.clone(),
                    name: name.clone(),
                    engine,
                    status: ProjectStatus::Active,
                    realtime_public: false,
                    db_name: db_name.clone(),
                    created_at,
                    owner: Some(user_id.to_string()),
                },
                keys,
            ))
        }
        .await;
        if result.is_err() {
            self.tear_down(&id, &db_name, engine).await;
        }
        result
    }

    /// Drops a project's database and roles (or MySQL database and accounts); whether all of
    /// it went.
    pub async fn drop_database(&self, project_id: &str, db_name: &str, engine: Engine) -> bool {
        match engine {
            Engine::Postgresql => self.deprovision(project_id, db_name).await,
            Engine::Mysql => self.mysql.deprovision(project_id, db_name).await,
        }
    }

    /// Undoes a [`create`](Self::create) whose replication slot could not be made: recorded
    /// for the teardown sweep first, then the row deleted, then the database and roles dropped
    /// (only once the row is gone; otherwise the sweep does it when it is).
    pub async fn discard(&self, project: &Project) {
        let deleted = async {
            let c = self.control.get().await?;
            control::teardowns::record(&c, &project.id, &project.db_name, project.engine, false)
                .await?;
            control::projects::delete(&c, &project.id).await?;
            anyhow::Ok(())
        }
        .await;
        match deleted {
            Ok(()) => {
                self.tear_down(&project.id, &project.db_name, project.engine)
                    .await
            }
            Err(e) => tracing::warn!(
                project_id = %project.id,
                error = %format!("{e:#}"),
                "discarding a project whose creation failed: its row stays for now; the teardown sweep deletes it within minutes if its record was written"
            ),
        }
    }

    /// A user's turn to create a project: held until the project is created, so that two
    /// requests cannot both pass the quota (the operator's CLI is not bound by it).
    pub async fn quota_turn(
        &self,
        user_id: &str,
    ) -> Result<tokio::sync::OwnedMutexGuard<()>, ProjectsError> {
        let turn = self.limits.creating_project(user_id).await;
        let quota = self.max_projects_per_user;
        if quota > 0 {
            let client = self.control.get().await?;
            if control::members::administered_by(&client, user_id).await? >= i64::from(quota) {
                return Err(ProjectsError::QuotaReached(quota));
            }
        }
        Ok(turn)
    }

    /// The deployment's turn to create a project (one at a time in this process: the room
    /// left is read, then taken).
    pub async fn server_turn(&self) -> tokio::sync::MutexGuard<'_, ()> {
        self.creating.lock().await
    }

    /// The projects the caller can reach: a session's memberships, a key's one project.
    pub async fn list(&self, principal: &Principal) -> Result<Vec<ListedProject>, ProjectsError> {
        let client = self.control.get().await?;
        let rows = match principal {
            Principal::Session { user_id, .. } => {
                control::projects::of_member(&client, user_id).await?
            }
            Principal::Key { project_id, .. } => {
                control::projects::listed_by_id(&client, project_id).await?
            }
        };
        Ok(rows
            .into_iter()
            .map(|r| ListedProject {
                id: r.id,
                name: r.name,
                engine: r.engine,
                status: r.status,
                realtime_public: r.realtime_public,
                created_at: r.created_at,
                role: r.role,
            })
            .collect())
    }

    /// Renames a project and/or changes its realtime visibility (admins only). The caller
    /// empties the access caches and reads the project again.
    pub async fn update(
        &self,
        access: &Access,
        name: Option<&str>,
        realtime_public: Option<bool>,
    ) -> Result<(), ProjectsError> {
        access.require_admin()?;
        let name = name.map(validate_name).transpose()?;
        let client = self.control.get().await?;
        control::projects::update(
            &client,
            &access.project.id,
            name.as_deref(),
            realtime_public,
        )
        .await?;
        Ok(())
    }

    /// `fluxbase project suspend|resume <id>`: changes the status only, never the data.
    pub async fn set_status(
        &self,
        project_id: &str,
        status: ProjectStatus,
    ) -> Result<(), ProjectsError> {
        let client = self.control.get().await?;
        if !control::projects::set_status(&client, project_id, status).await? {
            return Err(ProjectsError::NoSuchProject(project_id.to_string()));
        }
        Ok(())
    }

    /// The project's row (with its keys, members and invitations, by cascade).
    pub async fn delete_row(&self, project_id: &str) -> Result<(), ProjectsError> {
        let client = self.control.get().await?;
        control::projects::delete(&client, project_id).await?;
        Ok(())
    }

    /// The user `fluxbase project create` creates projects for (the first run's).
    pub async fn default_user(&self) -> Result<String, instance::InstanceError> {
        let client = self.control.get().await?;
        control::instance::default_user(&client)
            .await?
            .ok_or(instance::InstanceError::NotInitialized)
    }
}

/// The password of a project role: HMAC of its name under the instance secret (the SQL pools log
/// in with it too).
pub fn role_password(secrets: &Secrets, role: &str) -> String {
    secrets.derive(&format!("pg-role:{role}"))
}
