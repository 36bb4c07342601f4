//! First-run set-up (`fluxbase init`, and `serve` on a fresh data directory): a default user,
//! a default project and one key of each scope, printed once. Idempotent: later runs find the
//! instance row and print only what is not secret.

use serde_json::{json, Value};

use crate::accounts::SignupRequest;
use crate::app::App;
use crate::secrets::random_base62;

pub const DEFAULT_EMAIL: &str = "admin@fluxbase.local";

/// What `init` reports. `secrets` is present only on the run that created them.
pub struct InitReport {
    pub created: bool,
    pub json: Value,
}

impl App {
    pub async fn init_instance(&self) -> anyhow::Result<InitReport> {
        let base_url = self.config.base_url();
        let ws_url = base_url.replacen("http", "ws", 1);
        let client = self.control.get().await?;
        // One initializer at a time, across processes.
        client
            .execute("SELECT pg_advisory_lock(7245002)", &[])
            .await?;
        let existing = client
            .query_opt(
                "SELECT i.default_project, p.name, u.email FROM fluxbase.instance i
                 LEFT JOIN fluxbase.projects p ON p.id = i.default_project
                 LEFT JOIN fluxbase.users u ON u.id = i.default_user",
                &[],
            )
            .await;
        let result = async {
            if let Some(row) = existing? {
                return Ok(InitReport {
                    created: false,
                    json: json!({
                        "created": false,
                        "baseUrl": base_url,
                        "wsUrl": ws_url,
                        "user": { "email": row.get::<_, Option<String>>(2) },
                        "project": { "id": row.get::<_, Option<String>>(0), "name": row.get::<_, Option<String>>(1) },
                    }),
                });
            }
            let password = random_base62(20);
            let user = self
                .create_user(SignupRequest {
                    email: DEFAULT_EMAIL.into(),
                    password: password.clone(),
                    display_name: Some("Admin".into()),
                })
                .await
                .map_err(|e| anyhow::anyhow!("creating the default user: {e}"))?;
            let (project, keys) = self
                .create_project(&user.id, "Default project")
                .await
                .map_err(|e| anyhow::anyhow!("creating the default project: {e}"))?;
            client
                .execute(
                    "INSERT INTO fluxbase.instance (default_user, default_project) VALUES ($1, $2)",
                    &[&user.id, &project.id],
                )
                .await?;
            let mut api_keys = serde_json::Map::new();
            for k in &keys {
                api_keys.insert(k.scope.as_str().into(), json!(k.secret));
            }
            Ok(InitReport {
                created: true,
                json: json!({
                    "created": true,
                    "baseUrl": base_url,
                    "wsUrl": ws_url,
                    "user": { "id": user.id, "email": user.email, "password": password },
                    "project": { "id": project.id, "name": project.name },
                    "apiKeys": api_keys,
                }),
            })
        }
        .await;
        let _ = client
            .execute("SELECT pg_advisory_unlock(7245002)", &[])
            .await;
        result
    }

    /// The default user's id (for `fluxbase project create`).
    pub async fn default_user(&self) -> anyhow::Result<String> {
        let client = self.control.get().await?;
        let row = client
            .query_opt("SELECT default_user FROM fluxbase.instance", &[])
            .await?;
        row.and_then(|r| r.get::<_, Option<String>>(0))
            .ok_or_else(|| anyhow::anyhow!("no default user: run `fluxbase init` first"))
    }
}

/// The human-readable form of an init report.
pub fn describe(report: &InitReport) -> String {
    let j = &report.json;
    let mut out = String::new();
    out.push_str(&format!(
        "Fluxbase is ready.\n  Base URL:      {}\n  WebSocket URL: {}\n",
        j["baseUrl"].as_str().unwrap_or(""),
        j["wsUrl"].as_str().unwrap_or("")
    ));
    out.push_str(&format!(
        "  Project ID:    {}\n",
        j["project"]["id"].as_str().unwrap_or("?")
    ));
    if report.created {
        out.push_str(&format!(
            "  Login:         {} / {}\n  API keys (shown once, store them now):\n    read:      {}\n    readwrite: {}\n    admin:     {}\n",
            j["user"]["email"].as_str().unwrap_or(""),
            j["user"]["password"].as_str().unwrap_or(""),
            j["apiKeys"]["read"].as_str().unwrap_or(""),
            j["apiKeys"]["readwrite"].as_str().unwrap_or(""),
            j["apiKeys"]["admin"].as_str().unwrap_or(""),
        ));
    } else {
        out.push_str(
            "  (keys were printed on the first start; create new ones with POST /api/keys)\n",
        );
    }
    out
}

/// What `fluxbase user reset-password` did.
pub struct PasswordReset {
    pub user_id: String,
    pub email: String,
    pub sessions_revoked: u64,
}

/// Operator recovery commands (`fluxbase keys create`, `fluxbase user reset-password`): they
/// work on the control database directly, with no session or key, for an operator who lost both.
impl App {
    /// A new API key of `scope` for `project_id`; its secret exists only in the value returned.
    pub async fn create_key_for_operator(
        &self,
        project_id: &str,
        scope: &str,
        name: Option<&str>,
    ) -> anyhow::Result<crate::keys::NewKey> {
        let scope = crate::auth::Scope::parse(scope)
            .ok_or_else(|| anyhow::anyhow!("--scope must be one of read, readwrite, admin"))?;
        let name = name
            .map(|n| n.trim().to_string())
            .filter(|n| !n.is_empty())
            .unwrap_or_else(|| format!("{} key (CLI)", scope.as_str()));
        if name.chars().count() > 100 {
            anyhow::bail!("--name: at most 100 characters");
        }
        let client = self.control.get().await?;
        let exists = client
            .query_opt(
                "SELECT 1 FROM fluxbase.projects WHERE id = $1",
                &[&project_id],
            )
            .await?
            .is_some();
        if !exists {
            anyhow::bail!("no project {project_id}");
        }
        Ok(crate::keys::insert_key(&client, project_id, scope, &name).await?)
    }

    /// Sets the password of the user with `email` (any case) and revokes all their sessions,
    /// so a session opened with the old password is refused from its next request.
    pub async fn reset_password(
        &self,
        email: &str,
        password: &str,
    ) -> anyhow::Result<PasswordReset> {
        if password.chars().count() < 8 || password.len() > 1024 {
            anyhow::bail!("the password must be between 8 and 1024 characters");
        }
        let owned = password.to_string();
        let hash =
            tokio::task::spawn_blocking(move || crate::accounts::hash_password(&owned)).await??;
        let email = crate::accounts::normalize_email(email);
        let mut client = self.control.get().await?;
        let tx = client.transaction().await?;
        let rows = tx
            .query(
                "SELECT id, email FROM fluxbase.users WHERE lower(email) = lower($1) FOR UPDATE",
                &[&email],
            )
            .await?;
        let row = match rows.as_slice() {
            [row] => row,
            [] => anyhow::bail!("no user with the email {email:?}"),
            _ => anyhow::bail!("more than one user matches {email:?}: reset them by exact id"),
        };
        let (user_id, email): (String, String) = (row.get(0), row.get(1));
        tx.execute(
            "UPDATE fluxbase.users SET password_hash = $2 WHERE id = $1",
            &[&user_id, &hash],
        )
        .await?;
        let sessions_revoked = tx
            .execute(
                "DELETE FROM fluxbase.sessions WHERE user_id = $1",
                &[&user_id],
            )
            .await?;
        tx.commit().await?;
        drop(client);
        // Sessions are read on every request; this empties any access cache for good measure.
        self.invalidate_access().await;
        Ok(PasswordReset {
            user_id,
            email,
            sessions_revoked,
        })
    }
}
