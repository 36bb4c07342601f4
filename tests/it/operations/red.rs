//! Red-team findings against the issue-13 defences: each test is an attack that worked once.

use std::time::{Duration, Instant};

use serde_json::json;

use crate::support::{pg, spawn_app_with};

/// Polls the cluster until a backend runs a statement containing `marker`.
async fn wait_for_statement(marker: &str) {
    let admin = pg().await.client("postgres").await;
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let n: i64 = admin
            .query_one(
                "SELECT count(*) FROM pg_stat_activity WHERE state = 'active' AND query LIKE $1",
                &[&format!("%{marker}%")],
            )
            .await
            .unwrap()
            .get(0);
        if n > 0 {
            return;
        }
        assert!(Instant::now() < deadline, "no statement {marker} started");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// A read key holds its own role's catalog row (`ALTER ROLE CURRENT_USER PASSWORD` in an open
/// statement) while more of its requests need new connections: the server's login of the role
/// times out on the lock. That failure must not leave a control-pool connection inside an
/// aborted transaction, or every later control-plane statement of every tenant fails
/// ("current transaction is aborted") until the server restarts.
#[tokio::test]
async fn a_role_row_locked_by_a_read_key_does_not_poison_the_control_pool() {
    lock_the_role_row_and_probe(None).await;
}

/// The same, with clients that hang up while the server's login of the role waits on the lock:
/// the request is dropped half-way through the admin transaction, which must still end.
#[tokio::test]
async fn clients_hanging_up_during_a_role_login_do_not_poison_the_control_pool() {
    lock_the_role_row_and_probe(Some(Duration::from_millis(700))).await;
}

/// Starts the lock, sends four probes (each ending after `probe_timeout`, if any), then checks
/// that the control pool and the SQL API still serve another tenant.
async fn lock_the_role_row_and_probe(probe_timeout: Option<Duration>) {
    let app = spawn_app_with(|c| c.pool_size = 2).await;
    let f = app.fixture().await;
    let victim = app.fixture().await;

    let marker = "pg_sleep(14.1)";
    let locker = {
        let http = reqwest::Client::new();
        let url = app.url("/api/execute-sql");
        let (key, project) = (f.read.clone(), f.project.clone());
        tokio::spawn(async move {
            http.post(url)
                .bearer_auth(key)
                .json(&json!({
                    "projectId": project,
                    "query": format!("ALTER ROLE CURRENT_USER PASSWORD 'x'; SELECT {marker}"),
                }))
                .send()
                .await
                .unwrap()
                .status()
        })
    };
    wait_for_statement(marker).await;
    // Each needs a new connection of the read role, whose login waits on the lock (3 s each).
    let probes: Vec<_> = (0..4)
        .map(|_| {
            let mut http = reqwest::Client::builder();
            if let Some(t) = probe_timeout {
                http = http.timeout(t);
            }
            let http = http.build().unwrap();
            let url = app.url("/api/execute-sql");
            let (key, project) = (f.read.clone(), f.project.clone());
            tokio::spawn(async move {
                let sent = http
                    .post(url)
                    .bearer_auth(key)
                    .json(&json!({ "projectId": project, "query": "SELECT 1" }))
                    .send()
                    .await;
                sent.map(|r| r.status()).ok()
            })
        })
        .collect();
    for p in probes {
        p.await.unwrap();
    }
    locker.await.unwrap();

    // Every connection of the (two-connection) control pool still works, for another tenant.
    for _ in 0..6 {
        let (status, body) = app
            .call(
                "GET",
                &format!("/api/keys?projectId={}", victim.project),
                Some(&victim.token),
                None,
            )
            .await;
        assert_eq!(status, 200, "{body}");
        let rows = app
            .rows(&victim.read, &victim.project, "SELECT 1 AS one")
            .await;
        assert_eq!(rows, vec![json!({ "one": 1 })]);
    }
    // And the attacker's own project recovers once its lock is gone.
    let rows = app.rows(&f.read, &f.project, "SELECT 2 AS two").await;
    assert_eq!(rows, vec![json!({ "two": 2 })]);
}

/// Wrong passwords sent all at once: the per-account failure limit counted a failure only once
/// its hash was checked, so every concurrent attempt passed the check before the first failure
/// was counted (40 guesses against a limit of 3). At most the limit may be checked now; a right
/// password inside the limit still logs in and is not counted as a failure.
#[tokio::test]
async fn concurrent_wrong_passwords_are_checked_at_most_the_per_account_limit() {
    let app = spawn_app_with(|c| {
        c.auth_failures_per_account = 3;
        c.max_concurrent_password_hashes = 1;
    })
    .await;
    let (_, _, victim) = app.signup().await;
    let login = |password: String| {
        let http = reqwest::Client::new();
        let url = app.url("/api/auth/login");
        let email = victim.clone();
        async move {
            http.post(url)
                .json(&json!({ "email": email, "password": password }))
                .send()
                .await
                .unwrap()
                .status()
                .as_u16()
        }
    };
    // A success does not count against the limit.
    for _ in 0..4 {
        assert_eq!(login("correct horse battery".into()).await, 200);
    }
    let guesses: Vec<_> = (0..40)
        .map(|i| tokio::spawn(login(format!("guess {i}"))))
        .collect();
    let mut checked = 0;
    for g in guesses {
        match g.await.unwrap() {
            401 => checked += 1,
            429 => {}
            other => panic!("unexpected status {other}"),
        }
    }
    assert!(checked <= 3, "{checked} wrong passwords checked, limit 3");
    assert_eq!(login("correct horse battery".into()).await, 429);
    app.stop().await;
}

/// An anonymous client opens WebSockets and never subscribes, answering pings (or sending its
/// own) so the idle timeout never fires: each held a connection for ever. A socket in no room
/// is closed after `realtime_unsubscribed_timeout_secs`, pings or not.
#[tokio::test]
async fn a_websocket_that_never_subscribes_is_closed_even_when_it_pings() {
    use futures_util::{SinkExt, StreamExt};
    use tokio_tungstenite::tungstenite::Message;

    let app = spawn_app_with(|c| c.realtime_unsubscribed_timeout_secs = 2).await;
    let mut ws = crate::support::ws::connect(&app, "/").await;
    let deadline = Instant::now() + Duration::from_secs(30);
    let close = loop {
        assert!(
            Instant::now() < deadline,
            "the unsubscribed socket is still open"
        );
        ws.send(Message::text(r#"{"type":"ping"}"#)).await.ok();
        match tokio::time::timeout(Duration::from_millis(300), ws.next()).await {
            Err(_) => {}
            Ok(Some(Ok(Message::Close(frame)))) => break frame,
            Ok(Some(Ok(_))) => {}
            Ok(None) | Ok(Some(Err(_))) => break None,
        }
    };
    let reason = close.map(|f| f.reason.to_string()).unwrap_or_default();
    assert!(reason.contains("no subscription"), "{reason}");
    app.stop().await;
}

/// Found by schemathesis: a NUL character (U+0000) in a query parameter or a JSON string reached
/// the control database as text, which PostgreSQL refuses (22021), and answered 500.
#[tokio::test]
async fn a_nul_character_in_a_parameter_or_a_body_is_a_400_not_a_500() {
    let app = spawn_app_with(|_| {}).await;
    let f = app.fixture().await;
    let (status, body) = app
        .call(
            "GET",
            &format!(
                "/api/webhooks/deliveries?projectId={}&webhookId=a%00b&status=delivered",
                f.project
            ),
            Some(&f.admin),
            None,
        )
        .await;
    assert_eq!(status, 400, "{body}");
    assert_eq!(body["error"]["code"], "BAD_REQUEST");
    let (status, body) = app
        .call(
            "POST",
            "/api/keys",
            Some(&f.admin),
            Some(json!({ "projectId": f.project, "scope": "read", "name": "a\u{0}b" })),
        )
        .await;
    assert_eq!(status, 400, "{body}");
    assert!(
        body["error"]["message"].as_str().unwrap().contains("NUL"),
        "{body}"
    );
    app.stop().await;
}

/// Names that would show as something else: a display name ending in U+202E reversed the email
/// shown after it in the dashboard's member list; `invoice\u{202E}fdp.exe` listed as
/// "invoiceexe.pdf"; a zero-width space made two names look alike. Every user-chosen name
/// refuses them with a 400 naming the field; the joiners scripts need still pass.
#[tokio::test]
async fn names_with_text_direction_or_invisible_characters_are_refused() {
    let app = spawn_app_with(|_| {}).await;
    let f = app.fixture().await;
    for (i, display) in ["Alice Smith \u{202E}", "Bob\u{200B}", "\u{2067}Eve"]
        .iter()
        .enumerate()
    {
        let (status, body) = app
            .call(
                "POST",
                "/api/auth/signup",
                None,
                Some(json!({ "email": format!("bidi{i}@example.com"), "password": "correct horse battery", "displayName": display })),
            )
            .await;
        assert_eq!(status, 400, "{display:?}: {body}");
        assert!(
            body["error"]["message"]
                .as_str()
                .unwrap()
                .starts_with("displayName"),
            "{body}"
        );
    }
    let (status, body) = app
        .call(
            "POST",
            "/api/auth/signup",
            None,
            Some(json!({ "email": "ali\u{202E}ce@example.com", "password": "correct horse battery" })),
        )
        .await;
    assert_eq!(status, 400, "{body}");
    let (status, body) = app
        .call(
            "POST",
            "/api/auth/signup",
            None,
            Some(
                json!({ "email": "persian@example.com", "password": "correct horse battery",
                         "displayName": "می\u{200C}خواهم 👨\u{200D}👩\u{200D}👧" }),
            ),
        )
        .await;
    assert_eq!(status, 201, "joiners are part of names: {body}");
    let session = body["token"].as_str().unwrap().to_string();
    let (status, body) = app
        .call(
            "POST",
            "/api/projects",
            Some(&session),
            Some(json!({ "name": "Default project\u{200B}" })),
        )
        .await;
    assert_eq!(
        (status, &body["error"]["code"]),
        (400, &json!("BAD_REQUEST")),
        "{body}"
    );
    let (status, body) = app
        .call(
            "PATCH",
            "/api/projects",
            Some(&f.admin),
            Some(json!({ "projectId": f.project, "name": "shop\u{202E}" })),
        )
        .await;
    assert_eq!(status, 400, "{body}");
    let (status, body) = app
        .call(
            "POST",
            "/api/keys",
            Some(&f.admin),
            Some(json!({ "projectId": f.project, "scope": "read", "name": "ci\u{2066}" })),
        )
        .await;
    assert_eq!(status, 400, "{body}");
    crate::storage::create_bucket(&app, &f, "docs", json!({})).await;
    for path in ["invoice\u{202E}fdp.exe", "x\u{200B}/y.txt", "a\u{FEFF}.txt"] {
        let (status, body) = crate::storage::upload(
            &app,
            &f.admin,
            &f.project,
            "docs",
            "ok.txt",
            "text/plain",
            b"x",
            &[("path", path)],
        )
        .await;
        assert_eq!(status, 400, "{path:?}: {body}");
    }
}
