//! The integration guide's own samples, run verbatim (but for the base URL or project id) against
//! a server started by the test: the `query()` snippet and the `realtime.js` client in Node.js, and
//! a curl call.

use std::process::Command;
use std::time::Duration;

use serde_json::Value;
use tokio::io::{AsyncBufReadExt, BufReader};

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

/// Reads the child's output into `log` until a line starts with `prefix` (20 s at most).
pub(crate) async fn wait_for(
    lines: &mut tokio::io::Lines<BufReader<tokio::process::ChildStdout>>,
    log: &mut String,
    prefix: &str,
) {
    let found = tokio::time::timeout(Duration::from_secs(20), async {
        while let Some(line) = lines.next_line().await.unwrap() {
            log.push_str(&line);
            log.push('\n');
            if line.starts_with(prefix) {
                return true;
            }
        }
        false
    })
    .await;
    assert!(
        matches!(found, Ok(true)),
        "no line starting with {prefix:?} from realtime.js:\n{log}"
    );
}

/// The guide's `realtime.js`, unchanged except `PROJECT_ID`.
pub(crate) const REALTIME_SNIPPET: &str = r#"const WS_URL    = process.env.NEXT_PUBLIC_WS_URL ?? 'wss://fluxbase-realtime.onrender.com';
const PROJECT_ID = 'YOUR_PROJECT_ID';

let socket;
let reconnectDelay = 1000;

function connect() {
  socket = new WebSocket(WS_URL);

  socket.onopen = () => {
    reconnectDelay = 1000; // reset on successful connection
    socket.send(JSON.stringify({
      type:   'subscribe',
      roomId: `project_${PROJECT_ID}`,
    }));
    console.log('[WS] Connected and subscribed.');
  };

  socket.onmessage = ({ data }) => {
    const msg = JSON.parse(data);

    switch (msg.type) {
      case 'subscribed':
        console.log('[WS] Subscription confirmed.');
        break;

      case 'db_event': {
        const { operation, table, record, old } = msg.payload ?? {};
        if (operation === 'INSERT') console.log(`+  ${table}`, record);
        if (operation === 'UPDATE') console.log(`~  ${table}`, { old, record });
        if (operation === 'DELETE') console.log(`-  ${table}`, record);
        break;
      }

      default:
        if (msg.payload?.event_type === 'schema_update') {
          console.log('[WS] Schema changed — refresh your table list.');
        }
    }
  };

  socket.onclose = () => {
    console.warn(`[WS] Disconnected. Reconnecting in ${reconnectDelay}ms...`);
    setTimeout(connect, reconnectDelay);
    reconnectDelay = Math.min(reconnectDelay * 2, 15000);
  };

  socket.onerror = (err) => console.error('[WS] Error:', err);
}

connect();
"#;

#[tokio::test]
async fn the_guides_realtime_client_logs_inserts_updates_and_deletes_in_node() {
    let app = spawn_app().await;
    let f = app.fixture().await;
    // The snippet sends no token: the project's room is public.
    app.make_realtime_public(&f).await;
    app.rows(
        &f.admin,
        &f.project,
        "CREATE TABLE todo (id int PRIMARY KEY, title text)",
    )
    .await;
    let original = "const PROJECT_ID = 'YOUR_PROJECT_ID';";
    assert!(REALTIME_SNIPPET.contains(original));
    let dir = crate::support::scratch_dir(&crate::support::unique("node"));
    let script = dir.join("realtime.js");
    std::fs::write(
        &script,
        REALTIME_SNIPPET.replace(original, &format!("const PROJECT_ID = '{}';", f.project)),
    )
    .unwrap();
    let mut node = tokio::process::Command::new("node")
        .arg("--experimental-websocket")
        .arg(&script)
        .env("NEXT_PUBLIC_WS_URL", app.base.replacen("http", "ws", 1))
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .expect("node is installed (make test installs it)");
    let mut stdout = BufReader::new(node.stdout.take().unwrap()).lines();
    let mut log = String::new();
    wait_for(&mut stdout, &mut log, "[WS] Connected and subscribed.").await;
    wait_for(&mut stdout, &mut log, "[WS] Subscription confirmed.").await;
    app.rows(
        &f.readwrite,
        &f.project,
        "INSERT INTO todo VALUES (1, 'write')",
    )
    .await;
    app.rows(
        &f.readwrite,
        &f.project,
        "UPDATE todo SET title = 'test' WHERE id = 1",
    )
    .await;
    app.rows(&f.admin, &f.project, "DELETE FROM todo WHERE id = 1")
        .await;
    app.rows(
        &f.admin,
        &f.project,
        "ALTER TABLE todo ADD COLUMN done boolean",
    )
    .await;
    wait_for(&mut stdout, &mut log, "+  todo { id: 1, title: 'write' }").await;
    wait_for(
        &mut stdout,
        &mut log,
        "~  todo { old: { id: 1, title: 'write' }, record: { id: 1, title: 'test' } }",
    )
    .await;
    wait_for(&mut stdout, &mut log, "-  todo { id: 1, title: 'test' }").await;
    wait_for(
        &mut stdout,
        &mut log,
        "[WS] Schema changed — refresh your table list.",
    )
    .await;
    node.kill().await.unwrap();
    let mut stderr = String::new();
    use tokio::io::AsyncReadExt;
    node.stderr
        .take()
        .unwrap()
        .read_to_string(&mut stderr)
        .await
        .unwrap();
    assert!(!stderr.contains("[WS] Error"), "{stderr}");
    assert!(!log.contains("Disconnected"), "{log}");
}
