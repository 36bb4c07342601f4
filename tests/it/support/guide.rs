//! The integration guide's `realtime.js` client run in Node.js against a project of a test
//! server (PostgreSQL or MySQL: the same client, the same log).

use std::time::Duration;

use tokio::io::{AsyncBufReadExt, BufReader};

use super::{Fixture, TestApp};

/// The guide's `realtime.js`, unchanged except `PROJECT_ID`.
pub const REALTIME_SNIPPET: &str = r#"const WS_URL    = process.env.NEXT_PUBLIC_WS_URL ?? 'wss://fluxbase-realtime.onrender.com';
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

/// Reads the child's output into `log` until a line starts with `prefix` (20 s at most).
pub async fn wait_for(
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

/// The guide's `realtime.js`, unchanged but for `PROJECT_ID`, subscribed to `f`'s project
/// (made public: the snippet sends no token): a table `todo` is created, a row inserted
/// (readwrite), updated (readwrite), deleted and the table altered (admin); the client must log
/// each as the guide shows, in order, with no error and no disconnection.
pub async fn run_realtime_client(app: &TestApp, f: &Fixture) {
    // The snippet sends no token: the project's room is public.
    app.make_realtime_public(f).await;
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
