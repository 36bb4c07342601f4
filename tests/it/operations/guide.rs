//! The integration guide's own samples, run verbatim (but for the base URL or project id) against
//! a server started by the test: the `query()` snippet and the `realtime.js` client in Node.js, and
//! a curl call.

use std::process::Command;

use serde_json::Value;

use crate::support::guide::run_realtime_client;
use crate::support::spawn_app;

/// The guide's `fluxbase.js`, unchanged except `BASE_URL`.
pub const GUIDE_SNIPPET: &str = r#"const BASE_URL = '__BASE_URL__';
const API_KEY  = process.env.FLUXBASE_API_KEY;
const PROJECT  = process.env.FLUXBASE_PROJECT_ID;

async function query(sql, params = []) {
  const res = await fetch(`${BASE_URL}/api/execute-sql`, {
    method: 'POST',
    headers: {
      'Content-Type': 'application/json',
      'Authorization': `Bearer ${API_KEY}`,
    },
    body: JSON.stringify({ projectId: PROJECT, query: sql, params }),
  });

  const json = await res.json();
  if (!json.success) throw new Error(json.error?.message ?? 'Query failed');
  return json.result.rows;
}

// Usage
const users = await query('SELECT id, name FROM users WHERE active = $1', [true]);
console.log(users);
"#;

#[tokio::test]
async fn the_guides_query_snippet_works_unchanged_in_node() {
    let app = spawn_app().await;
    let f = app.fixture().await;
    app.rows(&f.admin, &f.project, "CREATE TABLE users (id serial PRIMARY KEY, name text, active boolean); INSERT INTO users (name, active) VALUES ('Alice', true), ('Bob', false), ('Carol', true)").await;
    let dir = crate::support::scratch_dir(&crate::support::unique("node"));
    let script = dir.join("fluxbase.mjs");
    std::fs::write(&script, GUIDE_SNIPPET.replace("__BASE_URL__", &app.base)).unwrap();
    let run = |key: String, script: std::path::PathBuf, project: String| {
        tokio::task::spawn_blocking(move || {
            Command::new("node")
                .arg(&script)
                .env("FLUXBASE_API_KEY", key)
                .env("FLUXBASE_PROJECT_ID", project)
                .output()
                .expect("node is installed (make test installs it)")
        })
    };
    let out = run(f.read.clone(), script.clone(), f.project.clone())
        .await
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{stdout}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(stdout.contains("{ id: 1, name: 'Alice' }"), "{stdout}");
    assert!(stdout.contains("{ id: 3, name: 'Carol' }"), "{stdout}");
    assert!(!stdout.contains("Bob"), "{stdout}");

    // Errors surface as the snippet expects: `json.error.message` thrown.
    let out = run("flx_live_wrong".into(), script, f.project.clone())
        .await
        .unwrap();
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("Invalid or revoked API key"));
}

#[tokio::test]
async fn curl_can_run_sql_with_the_guides_headers() {
    let app = spawn_app().await;
    let f = app.fixture().await;
    let url = app.url("/api/execute-sql");
    let body = format!(
        r#"{{"projectId": "{}", "query": "SELECT 1 AS one, 'x' AS two"}}"#,
        f.project
    );
    let key = f.read.clone();
    let out = tokio::task::spawn_blocking(move || {
        Command::new("curl")
            .args(["-sS", "-X", "POST", &url])
            .args(["-H", &format!("Authorization: Bearer {key}")])
            .args(["-H", "Content-Type: application/json"])
            .args(["-d", &body])
            .output()
            .expect("curl is installed (make test installs it)")
    })
    .await
    .unwrap();
    assert!(out.status.success());
    let v: Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(v["success"], true, "{v}");
    assert_eq!(v["result"]["rows"][0]["one"], 1);
    assert_eq!(v["result"]["rows"][0]["two"], "x");
}

#[tokio::test]
async fn the_guides_realtime_client_logs_inserts_updates_and_deletes_in_node() {
    let app = spawn_app().await;
    let f = app.fixture().await;
    run_realtime_client(&app, &f).await;
}
