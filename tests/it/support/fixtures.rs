//! Who acts in a test: a signed-up user with a project and one key of each scope, members added
//! to a project, more keys, realtime tokens; on an in-process server (`TestApp`) or on a child
//! process reached by its base URL (`Project`).

use serde_json::{json, Value};

use super::app::TestApp;
use super::cluster::unique;
use super::http::call;

/// A user with a session and a project with one key of each scope.
pub struct Fixture {
    pub token: String,
    pub user_id: String,
    pub email: String,
    pub project: String,
    pub read: String,
    pub readwrite: String,
    pub admin: String,
}

impl Fixture {
    /// The project and its keys alone (what the WebSocket helpers take).
    pub fn keys(&self) -> Project {
        Project {
            project: self.project.clone(),
            read: self.read.clone(),
            readwrite: self.readwrite.clone(),
            admin: self.admin.clone(),
        }
    }
}

/// The keys of a project created by [`project`] on a server reached by its base URL.
pub struct Project {
    pub project: String,
    pub read: String,
    pub readwrite: String,
    pub admin: String,
}

/// The project id and its three keys from a `POST /api/projects` answer.
pub fn keys_of(body: &Value) -> Project {
    let key = |s: &str| body["apiKeys"][s].as_str().unwrap().to_string();
    Project {
        project: body["project"]["id"].as_str().unwrap().to_string(),
        read: key("read"),
        readwrite: key("readwrite"),
        admin: key("admin"),
    }
}

/// Signs up and creates a project named `resume` on the server at `base`.
pub async fn project(base: &str) -> Project {
    project_on(base, "postgresql").await
}

/// Signs up and creates a project named `resume` of `engine` (`postgresql`, `mysql`) on the
/// server at `base`.
pub async fn project_on(base: &str, engine: &str) -> Project {
    let token = signup_on(base).await;
    new_project_on(base, &token, engine).await
}

/// Signs up a new user on the server at `base`: its session token.
pub async fn signup_on(base: &str) -> String {
    let email = format!("{}@example.com", unique("user"));
    let (status, body) = call(
        base,
        "POST",
        "/api/auth/signup",
        None,
        json!({ "email": email, "password": "correct horse battery", "displayName": "T" }),
    )
    .await;
    assert_eq!(status, 201, "{body}");
    body["token"].as_str().unwrap().to_string()
}

/// Creates a project named `resume` of `engine` for the user of `token` on the server at `base`.
pub async fn new_project_on(base: &str, token: &str, engine: &str) -> Project {
    let (status, body) = call(
        base,
        "POST",
        "/api/projects",
        Some(token),
        json!({ "name": "resume", "engine": engine }),
    )
    .await;
    assert_eq!(status, 201, "{body}");
    assert_eq!(body["project"]["engine"], engine, "{body}");
    keys_of(&body)
}

impl TestApp {
    /// A new user: (session token, user id, email).
    pub async fn signup(&self) -> (String, String, String) {
        let email = format!("{}@example.com", unique("user"));
        let (status, body) = self
            .call(
                "POST",
                "/api/auth/signup",
                None,
                Some(json!({ "email": email, "password": "correct horse battery", "displayName": "Test" })),
            )
            .await;
        assert_eq!(status, 201, "{body}");
        (
            body["token"].as_str().unwrap().to_string(),
            body["user"]["id"].as_str().unwrap().to_string(),
            email,
        )
    }

    pub async fn fixture(&self) -> Fixture {
        let (token, user_id, email) = self.signup().await;
        let (status, body) = self
            .call(
                "POST",
                "/api/projects",
                Some(&token),
                Some(json!({ "name": "test" })),
            )
            .await;
        assert_eq!(status, 201, "{body}");
        let Project {
            project,
            read,
            readwrite,
            admin,
        } = keys_of(&body);
        Fixture {
            token,
            user_id,
            email,
            project,
            read,
            readwrite,
            admin,
        }
    }

    /// A new user made a member of `project` with `role` straight in the control database
    /// (without the invitation flow): (session token, user id).
    pub async fn member(&self, project: &str, role: &str) -> (String, String) {
        let (token, user_id, _) = self.signup().await;
        self.app
            .control
            .get()
            .await
            .unwrap()
            .execute(
                "INSERT INTO fluxbase.members (project_id, user_id, role) VALUES ($1, $2, $3)",
                &[&project, &user_id, &role],
            )
            .await
            .unwrap();
        (token, user_id)
    }

    /// One more API key of `scope` (named `name`, if given) for the fixture's project:
    /// (key id, secret).
    pub async fn new_key(&self, f: &Fixture, scope: &str, name: Option<&str>) -> (String, String) {
        let mut body = json!({ "projectId": f.project, "scope": scope });
        if let Some(name) = name {
            body["name"] = json!(name);
        }
        let (status, body) = self
            .call("POST", "/api/keys", Some(&f.admin), Some(body))
            .await;
        assert_eq!(status, 201, "{body}");
        (
            body["key"]["id"].as_str().unwrap().to_string(),
            body["secret"].as_str().unwrap().to_string(),
        )
    }

    /// Creates a row-level security policy through `/api/rls/policies` with the admin key.
    pub async fn policy(&self, f: &Fixture, table: &str, name: &str, command: &str, using: &str) {
        let (status, body) = self
            .call(
                "POST",
                "/api/rls/policies",
                Some(&f.admin),
                Some(
                    json!({ "projectId": f.project, "table": table, "name": name,
                             "command": command, "using": using }),
                ),
            )
            .await;
        assert_eq!(status, 201, "{body}");
    }

    /// Makes the fixture's project realtime-public (subscribing needs no token).
    pub async fn make_realtime_public(&self, f: &Fixture) {
        let (status, body) = self
            .call(
                "PATCH",
                "/api/projects",
                Some(&f.token),
                Some(json!({ "projectId": f.project, "realtimePublic": true })),
            )
            .await;
        assert_eq!(status, 200, "{body}");
        assert_eq!(body["project"]["realtimePublic"], true, "{body}");
    }

    /// `POST /api/realtime/token` with `key` and `body`, answered in the guide's shape; the
    /// token.
    pub async fn realtime_token(&self, key: &str, body: Value) -> String {
        let (status, body) = self
            .call("POST", "/api/realtime/token", Some(key), Some(body))
            .await;
        assert_eq!(status, 200, "{body}");
        assert_eq!(body["success"], true, "{body}");
        assert!(body["expiresAt"].is_string(), "{body}");
        body["token"].as_str().unwrap().to_string()
    }
}
