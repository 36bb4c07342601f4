//! The real server in-process: `spawn_app()` starts it on a free port with its own control
//! database (on the shared cluster) and data directory, and `TestApp` talks HTTP to it.
//!
//! A `TestApp` is stopped when it is dropped: a test that panics before `stop()` still ends its
//! change streams, webhook workers and pools at once (synchronously: `Drop` cannot await), rather
//! than leaving them to whatever outlives the test. `stop()` remains for tests that must await a
//! graceful shutdown (sockets closed with 1001, in-flight requests finished). The data directory
//! is kept (a restart on the same configuration reuses it); the next run sweeps it.

use std::time::Duration;

use fluxbase::app::{App, Running, SharedApp};
use fluxbase::config::Config;
use serde_json::{json, Value};

use super::cluster::{pg, scratch_dir, unique};

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
        session_rate_limit_requests: 10_000,
        auth_attempts_per_address: 10_000,
        auth_failures_per_address: 10_000,
        // Every client of the suite is 127.0.0.1 (the realtime load test opens 1,000 sockets).
        max_connections_per_address: 0,
        ..Config::default()
    };
    tweak(&mut config);
    start_with(config).await
}

/// A server with webhooks allowed to reach loopback receivers and retrying 100 times faster.
pub async fn spawn_webhook_app() -> TestApp {
    spawn_app_with(|c| {
        c.webhook_allow_private = true;
        c.webhook_backoff_scale = 0.01;
    })
    .await
}

/// Starts a server with exactly this configuration (e.g. a restart of an earlier one).
pub async fn start_with(config: Config) -> TestApp {
    start_with_durable(config, None).await.0
}

/// [`start_with`], with a durable subscriber on `project`'s bus registered before any change
/// stream starts (as the webhook outbox writers are): a stream whose project has no durable
/// subscriber confirms what it publishes, so one subscribing after the start could find the
/// replay it is waiting for already confirmed past it.
pub async fn start_with_durable(
    config: Config,
    project: Option<&str>,
) -> (TestApp, Option<fluxbase::bus::Subscription>) {
    let app = App::open(config, &[]).await.expect("opening the app");
    let durable = project.map(|p| app.bus.project(p).subscribe_durable());
    let running = Running::start(app.clone())
        .await
        .expect("starting the server");
    let app = TestApp {
        base: format!("http://{}", running.addr),
        http: reqwest::Client::builder()
            .timeout(Duration::from_secs(60))
            .build()
            .unwrap(),
        app,
        running: Some(running),
    };
    (app, durable)
}

impl TestApp {
    pub fn url(&self, path: &str) -> String {
        format!("{}{path}", self.base)
    }

    /// A graceful stop, awaited.
    pub async fn stop(mut self) {
        if let Some(r) = self.running.take() {
            r.stop().await;
        }
    }

    /// Aborts the server's tasks inside this process (not a crash of a process: its other
    /// tasks may outlive it): change streams die without a last word, the HTTP server stops
    /// accepting. Returns its configuration for a restart. A test that means a crash kills a
    /// real server process ([`super::process::ServerProcess`]) instead.
    pub fn abort_in_process(mut self) -> Config {
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

    /// `DELETE /api/projects?projectId=` with `token` (a user's session or an admin key);
    /// asserts HTTP 200.
    pub async fn delete_project(&self, project: &str, token: &str) {
        let (status, body) = self
            .call(
                "DELETE",
                &format!("/api/projects?projectId={project}"),
                Some(token),
                None,
            )
            .await;
        assert_eq!(status, 200, "deleting {project}: {body}");
    }

    /// `GET /api/cdc/status` of the project with `key`; asserts HTTP 200 and returns the body.
    pub async fn cdc_status(&self, project: &str, key: &str) -> Value {
        let (status, body) = self
            .call(
                "GET",
                &format!("/api/cdc/status?projectId={project}"),
                Some(key),
                None,
            )
            .await;
        assert_eq!(status, 200, "{body}");
        body
    }

    /// The name of the project's own database.
    pub async fn project_db(&self, project: &str) -> String {
        self.app
            .auth
            .load_project(project)
            .await
            .unwrap()
            .unwrap()
            .db_name
    }

    /// The text of `/metrics`.
    pub async fn metrics_text(&self) -> String {
        let resp = self.http.get(self.url("/metrics")).send().await.unwrap();
        resp.text().await.unwrap()
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

    /// `POST /api/execute-sql` as end user `uid` (body `authUid`); asserts HTTP 200 and returns
    /// the body.
    pub async fn sql_as(&self, key: &str, project: &str, uid: Option<&str>, query: &str) -> Value {
        let mut body = json!({ "projectId": project, "query": query });
        if let Some(uid) = uid {
            body["authUid"] = json!(uid);
        }
        let (status, body) = self
            .call("POST", "/api/execute-sql", Some(key), Some(body))
            .await;
        assert_eq!(status, 200, "{query}: {body}");
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

impl Drop for TestApp {
    /// Not stopped (a panic, or a test that did not need a graceful stop): stop what the server
    /// started without awaiting. Dropping `Running` drops its shutdown signal, so the HTTP
    /// server stops accepting as well.
    fn drop(&mut self) {
        if let Some(running) = self.running.take() {
            running.app.shutdown();
        }
    }
}
