//! First-run set-up (`fluxbase init`, and `serve` on a fresh data directory): a default user,
//! a default project and one key of each scope, printed once. Idempotent: later runs find the
//! instance row and print only what is not secret.

use std::future::Future;

use serde::Serialize;

use super::{ApiKeySecrets, DefaultKeys, Project, ProjectsError};
use crate::accounts::{Accounts, AccountsError, NewUser};
use crate::control;
use crate::secrets::random_base62;

pub const DEFAULT_EMAIL: &str = "admin@fluxbase.local";

#[derive(Debug, thiserror::Error)]
pub enum InstanceError {
    #[error("creating the default user: {0}")]
    DefaultUser(#[source] AccountsError),
    #[error("creating the default project: {0}")]
    DefaultProject(#[source] ProjectsError),
    #[error("no default user: run `fluxbase init` first")]
    NotInitialized,
    #[error(transparent)]
    Internal(#[from] anyhow::Error),
}

impl From<tokio_postgres::Error> for InstanceError {
    fn from(e: tokio_postgres::Error) -> Self {
        InstanceError::Internal(e.into())
    }
}

impl From<deadpool_postgres::PoolError> for InstanceError {
    fn from(e: deadpool_postgres::PoolError) -> Self {
        InstanceError::Internal(e.into())
    }
}

/// What `init` reports (`fluxbase init --json` prints it). The password and the keys are
/// present only on the run that created them.
#[derive(Serialize)]
#[serde(rename_all = "camelCase")]
pub struct InitReport {
    pub created: bool,
    pub base_url: String,
    pub ws_url: String,
    pub user: InitUser,
    pub project: InitProject,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub api_keys: Option<ApiKeySecrets>,
}

#[derive(Serialize)]
pub struct InitUser {
    #[serde(skip_serializing_if = "Option::is_none")]
    pub id: Option<String>,
    pub email: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub password: Option<String>,
}

#[derive(Serialize)]
pub struct InitProject {
    pub id: Option<String>,
    pub name: Option<String>,
}

/// Runs the first run's set-up unless it ran before (one initializer at a time, across
/// processes). `create_project(user_id, name)` creates a project with everything it needs
/// (the app's wiring: database, roles, keys and replication slot).
pub async fn init<F, Fut>(
    control: &deadpool_postgres::Pool,
    accounts: &Accounts,
    base_url: String,
    create_project: F,
) -> Result<InitReport, InstanceError>
where
    F: FnOnce(String, &'static str) -> Fut,
    Fut: Future<Output = Result<(Project, DefaultKeys), ProjectsError>>,
{
    let ws_url = base_url.replacen("http", "ws", 1);
    let client = control.get().await?;
    control::instance::lock(&client).await?;
    let existing = control::instance::get(&client).await;
    let result = async {
        if let Some(row) = existing? {
            return Ok(InitReport {
                created: false,
                base_url,
                ws_url,
                user: InitUser {
                    id: None,
                    email: row.user_email,
                    password: None,
                },
                project: InitProject {
                    id: row.project_id,
                    name: row.project_name,
                },
                api_keys: None,
            });
        }
        let password = random_base62(20);
        let user = accounts
            .create_user(NewUser {
                email: DEFAULT_EMAIL.into(),
                password: password.clone(),
                display_name: Some("Admin".into()),
            })
            .await
            .map_err(InstanceError::DefaultUser)?;
        let (project, keys) = create_project(user.id.clone(), "Default project")
            .await
            .map_err(InstanceError::DefaultProject)?;
        control::instance::insert(&client, &user.id, &project.id).await?;
        Ok(InitReport {
            created: true,
            base_url,
            ws_url,
            user: InitUser {
                id: Some(user.id),
                email: Some(user.email),
                password: Some(password),
            },
            project: InitProject {
                id: Some(project.id),
                name: Some(project.name),
            },
            api_keys: Some(ApiKeySecrets::from(&keys)),
        })
    }
    .await;
    let _ = control::instance::unlock(&client).await;
    result
}

/// The human-readable form of an init report.
pub fn describe(report: &InitReport) -> String {
    let mut out = String::new();
    out.push_str(&format!(
        "Fluxbase is ready.\n  Dashboard:     {}/\n  Base URL:      {}\n  WebSocket URL: {}\n",
        report.base_url.trim_end_matches('/'),
        report.base_url,
        report.ws_url
    ));
    out.push_str(&format!(
        "  Project ID:    {}\n",
        report.project.id.as_deref().unwrap_or("?")
    ));
    match &report.api_keys {
        Some(keys) if report.created => {
            out.push_str(&format!(
                "  Login:         {} / {}\n  API keys (shown once, store them now):\n    read:      {}\n    readwrite: {}\n    admin:     {}\n",
                report.user.email.as_deref().unwrap_or(""),
                report.user.password.as_deref().unwrap_or(""),
                keys.read,
                keys.readwrite,
                keys.admin,
            ));
        }
        _ => out.push_str(
            "  (keys were printed on the first start; create new ones with POST /api/keys)\n",
        ),
    }
    out
}
