//! Test harness: one throwaway PostgreSQL cluster per test binary (started with the server's own
//! embedded-cluster code, `wal_level=logical`, fsync off), and `spawn_app()` that starts the real
//! server on a free port with its own control database and data directory.

#![allow(dead_code)]

pub mod process;

use std::path::PathBuf;
use std::time::Duration;

use fluxbase::app::{App, Running, SharedApp};
use fluxbase::config::Config;
use fluxbase::embedded::Cluster;
use serde_json::{json, Value};
use tokio::sync::OnceCell;

pub struct Pg {
    pub host: String,
    pub port: u16,
    pub superuser: String,
    pub password: String,
    pub cluster: Cluster,
}

static PG: OnceCell<Pg> = OnceCell::const_new();

/// A unique lowercase name with `prefix`.
pub fn unique(prefix: &str) -> String {
    format!("{prefix}_{}", fluxbase::secrets::random_hex::<6>())
}

/// Scratch directories live under the target dir (reachable by the `postgres` user when root).
pub fn scratch_dir(name: &str) -> PathBuf {
    let dir = PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join(name);
    std::fs::create_dir_all(&dir).expect("creating a scratch dir");
    dir
}

/// Removes scratch dirs of earlier runs whose process is gone.
fn sweep_stale() {
    let base = PathBuf::from(env!("CARGO_TARGET_TMPDIR"));
    for entry in std::fs::read_dir(&base).into_iter().flatten().flatten() {
        let name = entry.file_name().to_string_lossy().into_owned();
        if let Some(pid) = name.strip_prefix("it-").and_then(|r| r.split('-').next()) {
            if pid != std::process::id().to_string()
                && !PathBuf::from(format!("/proc/{pid}")).exists()
            {
                let _ = std::fs::remove_dir_all(entry.path());
            }
        }
    }
}

/// The cluster shared by every test of this binary.
pub async fn pg() -> &'static Pg {
    PG.get_or_init(|| async {
        sweep_stale();
        let root = scratch_dir(&format!("it-{}-pg", std::process::id()));
        let password = fluxbase::secrets::random_base62(24);
        let cluster = tokio::task::spawn_blocking(move || {
            Cluster::start(
                &root,
                &password,
                &[
                    ("fsync", "off"),
                    ("synchronous_commit", "off"),
                    ("full_page_writes", "off"),
                ],
            )
        })
        .await
        .unwrap()
        .expect("starting the test cluster");
        Pg {
            host: "127.0.0.1".into(),
            port: cluster.port,
            superuser: fluxbase::embedded::SUPERUSER.into(),
            password: cluster.password.clone(),
            cluster,
        }
    })
    .await
}

impl Pg {
    pub fn url(&self, database: &str) -> String {
        self.cluster.url(database)
    }

    /// A superuser tokio-postgres client on `database`.
    pub async fn client(&self, database: &str) -> tokio_postgres::Client {
        let (client, conn) = tokio_postgres::connect(&self.url(database), tokio_postgres::NoTls)
            .await
            .expect("connecting as superuser");
        tokio::spawn(conn);
        client
    }

    /// A fresh, empty database.
    pub async fn create_database(&self) -> String {
        let name = unique("t");
        self.client("postgres")
            .await
            .batch_execute(&format!("CREATE DATABASE {name}"))
            .await
            .expect("creating a test database");
        name
    }
}

/// A running server and an HTTP client for it.
pub struct TestApp {
    pub base: String,
    pub http: reqwest::Client,
    pub app: SharedApp,
    running: Option<Running>,
}

pub async fn spawn_app() -> TestApp {
    spawn_app_with(|_| {}).await
}

/// Starts the real server against the shared cluster, with `tweak` applied to its config.
pub async fn spawn_app_with(tweak: impl FnOnce(&mut Config)) -> TestApp {
    let pg = pg().await;
    let name = unique("ctl");
    let mut config = Config {
        listen: "127.0.0.1:0".parse().unwrap(),
        data_dir: scratch_dir(&format!("it-{}-{name}", std::process::id())),
        database_url: Some(pg.url(&name).into()),
        rate_limit_requests: 10_000,
        auth_attempts_per_address: 10_000,
        // Every client of the suite is 127.0.0.1 (the realtime load test opens 1,000 sockets).
        max_connections_per_address: 0,
        ..Config::default()
    };
    tweak(&mut config);
    start_with(config).await
}

/// Starts a server with exactly this configuration (e.g. a restart of an earlier one).
pub async fn start_with(config: Config) -> TestApp {
    let app = App::open(config, &[]).await.expect("opening the app");
    let running = Running::start(app.clone())
        .await
        .expect("starting the server");
    TestApp {
        base: format!("http://{}", running.addr),
        http: reqwest::Client::builder()
            .timeout(Duration::from_secs(60))
            .build()
            .unwrap(),
        app,
        running: Some(running),
    }
}

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

impl TestApp {
    pub fn url(&self, path: &str) -> String {
        format!("{}{path}", self.base)
    }

    pub async fn stop(mut self) {
        if let Some(r) = self.running.take() {
            r.stop().await;
        }
    }

    /// Ends the server as a crash would: change streams die without a last word, the HTTP
    /// server stops accepting. Returns its configuration for a restart.
    pub fn crash(mut self) -> Config {
        self.app.cdc.stop_all();
        self.app.sql.clear();
        let config = self.app.config.clone();
        self.running.take();
        config
    }

    /// `POST /api/execute-sql` with `key` in a task of its own (for requests that must overlap);
    /// the task returns the status and the raw body.
    pub fn spawn_sql(
        &self,
        key: &str,
        project: &str,
        query: &str,
    ) -> tokio::task::JoinHandle<(u16, String)> {
        let request = self
            .http
            .post(self.url("/api/execute-sql"))
            .bearer_auth(key)
            .json(&json!({ "projectId": project, "query": query }));
        tokio::spawn(async move {
            let resp = request.send().await.unwrap();
            (resp.status().as_u16(), resp.text().await.unwrap())
        })
    }

    /// Sends `method path` with an optional bearer token and JSON body; returns (status, body).
    pub async fn call(
        &self,
        method: &str,
        path: &str,
        token: Option<&str>,
        body: Option<Value>,
    ) -> (u16, Value) {
        let mut req = self.http.request(method.parse().unwrap(), self.url(path));
        if let Some(t) = token {
            req = req.bearer_auth(t);
        }
        if let Some(b) = body {
            req = req.json(&b);
        }
        let resp = req.send().await.expect("request failed");
        let status = resp.status().as_u16();
        let text = resp.text().await.unwrap();
        let body = serde_json::from_str(&text).unwrap_or_else(|_| json!({ "raw": text }));
        (status, body)
    }

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
        let key = |s: &str| body["apiKeys"][s].as_str().unwrap().to_string();
        Fixture {
            project: body["project"]["id"].as_str().unwrap().to_string(),
            read: key("read"),
            readwrite: key("readwrite"),
            admin: key("admin"),
            token,
            user_id,
            email,
        }
    }

    /// `POST /api/execute-sql`; asserts HTTP 200 and returns the body.
    pub async fn sql(&self, key: &str, project: &str, query: &str) -> Value {
        let (status, body) = self
            .call(
                "POST",
                "/api/execute-sql",
                Some(key),
                Some(json!({ "projectId": project, "query": query })),
            )
            .await;
        assert_eq!(status, 200, "{body}");
        body
    }

    pub async fn sql_params(&self, key: &str, project: &str, query: &str, params: Value) -> Value {
        let (status, body) = self
            .call(
                "POST",
                "/api/execute-sql",
                Some(key),
                Some(json!({ "projectId": project, "query": query, "params": params })),
            )
            .await;
        assert_eq!(status, 200, "{body}");
        body
    }

    /// Runs SQL that must succeed; returns its rows.
    pub async fn rows(&self, key: &str, project: &str, query: &str) -> Vec<Value> {
        let body = self.sql(key, project, query).await;
        assert_eq!(body["success"], true, "{query}: {body}");
        body["result"]["rows"].as_array().unwrap().clone()
    }

    /// Runs SQL that must fail; returns the SQLSTATE from `details`.
    pub async fn sql_error(&self, key: &str, project: &str, query: &str) -> String {
        let body = self.sql(key, project, query).await;
        assert_eq!(body["success"], false, "{query} should fail: {body}");
        assert_eq!(body["error"]["code"], "SQL_EXEC_ERROR", "{body}");
        body["error"]["details"]
            .as_str()
            .unwrap()
            .trim_start_matches("ERROR:")
            .trim()
            .to_string()
    }
}
