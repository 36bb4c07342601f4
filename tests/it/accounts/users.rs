//! Accounts, sessions, projects, keys and the guide's auth error codes.

use serde_json::json;

use crate::support::spawn_app;

#[tokio::test]
async fn signup_login_me_and_logout_work_and_logout_kills_the_token() {
    let app = spawn_app().await;
    let (token, user_id, email) = app.signup().await;
    assert!(token.starts_with("flx_sess_"));
    assert!(user_id.starts_with("usr_"));

    let (status, body) = app
        .call(
            "POST",
            "/api/auth/login",
            None,
            Some(json!({ "email": email.to_uppercase(), "password": "correct horse battery" })),
        )
        .await;
    assert_eq!(status, 200, "{body}");
    let token2 = body["token"].as_str().unwrap().to_string();
    assert_eq!(body["user"]["id"], user_id.as_str());

    let (status, body) = app.call("GET", "/api/auth/me", Some(&token2), None).await;
    assert_eq!(status, 200);
    assert_eq!(body["user"]["email"], email.as_str());
    assert_eq!(body["projects"], json!([]));

    let (status, _) = app
        .call("POST", "/api/auth/logout", Some(&token2), None)
        .await;
    assert_eq!(status, 200);
    let (status, body) = app.call("GET", "/api/auth/me", Some(&token2), None).await;
    assert_eq!(status, 401);
    assert_eq!(body["error"]["code"], "AUTH_REQUIRED");
    // The other session is untouched.
    let (status, _) = app.call("GET", "/api/auth/me", Some(&token), None).await;
    assert_eq!(status, 200);
}

#[tokio::test]
async fn wrong_password_and_duplicate_email_are_refused() {
    let app = spawn_app().await;
    let (_, _, email) = app.signup().await;
    let (status, body) = app
        .call(
            "POST",
            "/api/auth/login",
            None,
            Some(json!({ "email": email, "password": "wrong password" })),
        )
        .await;
    assert_eq!(status, 401);
    assert_eq!(body["error"]["code"], "AUTH_REQUIRED");
    let (status, body) = app
        .call(
            "POST",
            "/api/auth/signup",
            None,
            Some(json!({ "email": email.to_uppercase(), "password": "another password" })),
        )
        .await;
    assert_eq!(status, 409, "{body}");
    let (status, body) = app
        .call(
            "POST",
            "/api/auth/signup",
            None,
            Some(json!({ "email": "not-an-email", "password": "long enough pw" })),
        )
        .await;
    assert_eq!(status, 400);
    assert_eq!(body["error"]["code"], "BAD_REQUEST");
    assert!(body["error"]["message"].as_str().unwrap().contains("email"));
}

#[tokio::test]
async fn expired_session_tokens_get_token_expired() {
    let app = crate::support::spawn_app_with(|c| c.session_ttl_secs = 3600).await;
    let (token, _, email) = app.signup().await;
    // The server's clock moves instead of the test waiting an hour; a minute short of the
    // session's lifetime leaves room for however slow this test runs.
    let clock = &app.app.storage.clock;
    clock.advance(std::time::Duration::from_secs(3600 - 60));
    let (status, body) = app.call("GET", "/api/auth/me", Some(&token), None).await;
    assert_eq!(status, 200, "still valid a minute before its end: {body}");
    clock.advance(std::time::Duration::from_secs(61));
    let (status, body) = app.call("GET", "/api/auth/me", Some(&token), None).await;
    assert_eq!(status, 401, "{body}");
    assert_eq!(body["error"]["code"], "TOKEN_EXPIRED");
    // A new login opens a session that lasts from the server's (moved) now.
    let (status, body) = app
        .call(
            "POST",
            "/api/auth/login",
            None,
            Some(json!({ "email": email, "password": "correct horse battery" })),
        )
        .await;
    assert_eq!(status, 200, "{body}");
    let fresh = body["token"].as_str().unwrap();
    let (status, body) = app.call("GET", "/api/auth/me", Some(fresh), None).await;
    assert_eq!(status, 200, "{body}");
}

#[tokio::test]
async fn project_creation_returns_three_scoped_keys_and_the_creator_is_admin() {
    let app = spawn_app().await;
    let f = app.fixture().await;
    assert_eq!(f.project.len(), 16);
    for key in [&f.read, &f.readwrite, &f.admin] {
        assert!(key.starts_with("flx_live_") && key.len() == 9 + 32, "{key}");
    }
    let (_, me) = app.call("GET", "/api/auth/me", Some(&f.token), None).await;
    assert_eq!(me["projects"][0]["id"], f.project.as_str());
    assert_eq!(me["projects"][0]["role"], "admin");

    let (status, list) = app
        .call(
            "GET",
            &format!("/api/keys?projectId={}", f.project),
            Some(&f.admin),
            None,
        )
        .await;
    assert_eq!(status, 200, "{list}");
    let keys = list["keys"].as_array().unwrap();
    assert_eq!(keys.len(), 3);
    for k in keys {
        let prefix = k["prefix"].as_str().unwrap();
        assert!(prefix.starts_with("flx_live_") && prefix.len() < 20);
        assert!(k["id"].as_str().unwrap().starts_with("key_"));
    }
    // Keys are stored only as hashes.
    let pg = crate::support::pg().await;
    let ctl = app.app.cluster.control_db.clone();
    let rows = pg
        .client(&ctl)
        .await
        .query("SELECT count(*) FROM fluxbase.api_keys WHERE key_hash = sha256(convert_to($1, 'UTF8')) OR prefix = $1", &[&f.admin])
        .await
        .unwrap();
    assert_eq!(
        rows[0].get::<_, i64>(0),
        1,
        "the hash of the key is stored, not the key"
    );
    let plain = pg
        .client(&ctl)
        .await
        .query(
            "SELECT count(*) FROM fluxbase.api_keys k WHERE position($1 in k::text) > 0",
            &[&&f.admin[9..]],
        )
        .await
        .unwrap();
    assert_eq!(plain[0].get::<_, i64>(0), 0);
}

#[tokio::test]
async fn rotated_key_is_refused_on_the_next_request() {
    let app = spawn_app().await;
    let f = app.fixture().await;
    let (_, list) = app
        .call(
            "GET",
            &format!("/api/keys?projectId={}", f.project),
            Some(&f.admin),
            None,
        )
        .await;
    let read_id = list["keys"]
        .as_array()
        .unwrap()
        .iter()
        .find(|k| k["scope"] == "read")
        .unwrap()["id"]
        .clone();
    assert_eq!(
        app.rows(&f.read, &f.project, "SELECT 1 AS one").await[0]["one"],
        1
    );

    let (status, body) = app
        .call(
            "POST",
            "/api/keys/rotate",
            Some(&f.admin),
            Some(json!({ "projectId": f.project, "keyId": read_id })),
        )
        .await;
    assert_eq!(status, 200, "{body}");
    let new_secret = body["secret"].as_str().unwrap().to_string();
    assert_eq!(body["key"]["scope"], "read");

    let (status, body) = app
        .call(
            "POST",
            "/api/execute-sql",
            Some(&f.read),
            Some(json!({ "projectId": f.project, "query": "SELECT 1" })),
        )
        .await;
    assert_eq!(status, 401);
    assert_eq!(body["error"]["code"], "AUTH_REQUIRED");
    assert_eq!(
        app.rows(&new_secret, &f.project, "SELECT 2 AS two").await[0]["two"],
        2
    );
}

#[tokio::test]
async fn keys_can_be_created_and_deleted_by_admins_only() {
    let app = spawn_app().await;
    let f = app.fixture().await;
    let (status, body) = app
        .call(
            "POST",
            "/api/keys",
            Some(&f.admin),
            Some(json!({ "projectId": f.project, "scope": "readwrite", "name": "backend" })),
        )
        .await;
    assert_eq!(status, 201, "{body}");
    let secret = body["secret"].as_str().unwrap().to_string();
    let id = body["key"]["id"].as_str().unwrap().to_string();
    assert_eq!(
        app.rows(&secret, &f.project, "SELECT 1 AS x").await.len(),
        1
    );

    // A readwrite key cannot manage keys.
    let (status, body) = app
        .call(
            "POST",
            "/api/keys",
            Some(&f.readwrite),
            Some(json!({ "projectId": f.project, "scope": "admin" })),
        )
        .await;
    assert_eq!(status, 403);
    assert_eq!(body["error"]["code"], "SCOPE_MISMATCH");
    let (status, body) = app
        .call(
            "POST",
            "/api/keys",
            Some(&f.admin),
            Some(json!({ "projectId": f.project, "scope": "root" })),
        )
        .await;
    assert_eq!(status, 400, "{body}");

    let (status, _) = app
        .call(
            "DELETE",
            &format!("/api/keys?projectId={}&keyId={id}", f.project),
            Some(&f.admin),
            None,
        )
        .await;
    assert_eq!(status, 200);
    let (status, _) = app
        .call(
            "POST",
            "/api/execute-sql",
            Some(&secret),
            Some(json!({ "projectId": f.project, "query": "SELECT 1" })),
        )
        .await;
    assert_eq!(status, 401);
}

#[tokio::test]
async fn auth_error_codes_follow_the_guide() {
    let app = spawn_app().await;
    let f = app.fixture().await;
    let g = app.fixture().await;
    let body = |p: &str| Some(json!({ "projectId": p, "query": "SELECT 1" }));

    let (status, b) = app
        .call("POST", "/api/execute-sql", None, body(&f.project))
        .await;
    assert_eq!(
        (status, b["error"]["code"].as_str()),
        (401, Some("AUTH_REQUIRED"))
    );
    let (status, b) = app
        .call(
            "POST",
            "/api/execute-sql",
            Some("flx_live_nope"),
            body(&f.project),
        )
        .await;
    assert_eq!(
        (status, b["error"]["code"].as_str()),
        (401, Some("AUTH_REQUIRED"))
    );
    let resp = app
        .http
        .post(app.url("/api/execute-sql"))
        .header("Authorization", format!("Basic {}", f.admin))
        .json(&json!({ "projectId": f.project, "query": "SELECT 1" }))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 401);

    // A key of another project.
    let (status, b) = app
        .call("POST", "/api/execute-sql", Some(&g.admin), body(&f.project))
        .await;
    assert_eq!(
        (status, b["error"]["code"].as_str()),
        (403, Some("SCOPE_MISMATCH"))
    );
    // A project that does not exist.
    let (status, b) = app
        .call(
            "POST",
            "/api/execute-sql",
            Some(&f.admin),
            body("0123456789abcdef"),
        )
        .await;
    assert_eq!(
        (status, b["error"]["code"].as_str()),
        (404, Some("PROJECT_NOT_FOUND"))
    );
    // A session of a non-member: the project is not revealed.
    let (status, b) = app
        .call("POST", "/api/execute-sql", Some(&g.token), body(&f.project))
        .await;
    assert_eq!(
        (status, b["error"]["code"].as_str()),
        (404, Some("PROJECT_NOT_FOUND"))
    );
    // A member session works and runs as the owner role.
    let rows = app
        .rows(&f.token, &f.project, "SELECT current_user AS u")
        .await;
    assert_eq!(rows[0]["u"], format!("fx_{}_owner", f.project));

    // Unknown route, wrong method.
    let (status, b) = app.call("GET", "/api/nope", Some(&f.admin), None).await;
    assert_eq!(
        (status, b["error"]["code"].as_str()),
        (404, Some("NOT_FOUND"))
    );
    let (status, _) = app
        .call("GET", "/api/execute-sql", Some(&f.admin), None)
        .await;
    assert_eq!(status, 405);
    // ... saying which methods the path has (RFC 9110: a 405 carries `Allow`).
    let resp = app
        .http
        .put(app.url("/api/keys"))
        .bearer_auth(&f.admin)
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status().as_u16(), 405);
    let mut allow: Vec<String> = resp.headers()["allow"]
        .to_str()
        .unwrap()
        .split(", ")
        .map(str::to_string)
        .collect();
    allow.sort();
    assert_eq!(allow, ["DELETE", "GET", "POST"]);
    // An answer echoing the request (here its path) is never sniffed into a page (rt13).
    let resp = app
        .http
        .get(app.url("/api/%3Cscript%3Ealert(1)%3C/script%3E"))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status().as_u16(), 404);
    assert_eq!(resp.headers()["x-content-type-options"], "nosniff");
    assert!(resp.headers()["content-type"]
        .to_str()
        .unwrap()
        .starts_with("application/json"));
}

#[tokio::test]
async fn a_suspended_project_answers_project_suspended_until_resumed() {
    let app = spawn_app().await;
    let f = app.fixture().await;
    app.app
        .set_project_status(&f.project, fluxbase::projects::ProjectStatus::Suspended)
        .await
        .unwrap();
    let (status, b) = app
        .call(
            "POST",
            "/api/execute-sql",
            Some(&f.admin),
            Some(json!({ "projectId": f.project, "query": "SELECT 1" })),
        )
        .await;
    assert_eq!(
        (status, b["error"]["code"].as_str()),
        (403, Some("PROJECT_SUSPENDED"))
    );
    let (status, b) = app
        .call(
            "GET",
            &format!("/api/keys?projectId={}", f.project),
            Some(&f.admin),
            None,
        )
        .await;
    assert_eq!(
        (status, b["error"]["code"].as_str()),
        (403, Some("PROJECT_SUSPENDED"))
    );
    app.app
        .set_project_status(&f.project, fluxbase::projects::ProjectStatus::Active)
        .await
        .unwrap();
    assert_eq!(
        app.rows(&f.admin, &f.project, "SELECT 1 AS x").await.len(),
        1
    );
}

#[tokio::test]
async fn project_settings_can_be_patched_by_admins() {
    let app = spawn_app().await;
    let f = app.fixture().await;
    let (status, b) = app
        .call(
            "PATCH",
            "/api/projects",
            Some(&f.token),
            Some(json!({ "projectId": f.project, "name": "renamed", "realtimePublic": true })),
        )
        .await;
    assert_eq!(status, 200, "{b}");
    assert_eq!(b["project"]["name"], "renamed");
    assert_eq!(b["project"]["realtimePublic"], true);
    let (status, b) = app
        .call(
            "PATCH",
            "/api/projects",
            Some(&f.read),
            Some(json!({ "projectId": f.project, "name": "x" })),
        )
        .await;
    assert_eq!(
        (status, b["error"]["code"].as_str()),
        (403, Some("SCOPE_MISMATCH"))
    );
    let (status, b) = app.call("GET", "/api/projects", Some(&f.token), None).await;
    assert_eq!(status, 200);
    assert_eq!(b["projects"][0]["name"], "renamed");
}

#[tokio::test]
async fn health_ready_and_metrics_answer() {
    let app = spawn_app().await;
    let (status, b) = app.call("GET", "/health", None, None).await;
    assert_eq!((status, b["status"].as_str()), (200, Some("ok")));
    let (status, b) = app.call("GET", "/ready", None, None).await;
    assert_eq!((status, b["status"].as_str()), (200, Some("ready")));
    let f = app.fixture().await;
    app.rows(&f.admin, &f.project, "SELECT 1 AS x").await;
    let text = app.metrics_text().await;
    assert!(
        text.contains("fluxbase_sql_queries_total{outcome=\"ok\"} 1"),
        "{text}"
    );
    assert!(
        text.contains("fluxbase_http_requests_total{route=\"/api/execute-sql\",status=\"200\"}")
    );
}

#[tokio::test]
async fn access_changes_made_by_another_process_reach_a_running_server() {
    let app = spawn_app().await;
    let f = app.fixture().await;
    // Warm the server's access cache.
    for _ in 0..3 {
        app.rows(&f.admin, &f.project, "SELECT 1 AS x").await;
    }
    // The server has the project and the key in its access cache, and a socket in its room.
    let (status, b) = app
        .call(
            "POST",
            "/api/execute-sql",
            Some(&f.admin),
            Some(json!({ "projectId": f.project, "query": "SELECT 1" })),
        )
        .await;
    assert_eq!(status, 200, "{b}");
    let mut ws = crate::support::ws::connect(&app, "/").await;
    let ack = crate::support::ws::subscribe(&mut ws, &f.project, Some(&f.read)).await;
    assert_eq!(ack["type"], "subscribed", "{ack}");

    // Another process on the same control database: `fluxbase project suspend`.
    crate::support::process::operator(
        &app.app.cluster.control_db,
        &["project", "suspend", &f.project],
        &[],
    )
    .await;
    // The running server heard the change: it empties its access cache, then closes the room
    // with the reason. From then on the project is refused.
    let m = crate::support::ws::recv(&mut ws).await;
    assert_eq!(m["code"], "PROJECT_SUSPENDED", "{m}");
    let (status, b) = app
        .call(
            "POST",
            "/api/execute-sql",
            Some(&f.admin),
            Some(json!({ "projectId": f.project, "query": "SELECT 1" })),
        )
        .await;
    assert_eq!(
        status, 403,
        "the running server still serves a suspended project: {b}"
    );
    assert_eq!(b["error"]["code"], "PROJECT_SUSPENDED");
}

/// `name` with its first letter replaced by the Kelvin sign (U+212A), which NFKC maps to `K`.
fn kelvin(name: &str) -> String {
    format!("\u{212A}{}", &name[1..])
}

/// `name` in fullwidth letters (U+FF41…), which NFKC maps to ASCII.
fn fullwidth(name: &str) -> String {
    name.chars()
        .map(|c| match c {
            'a'..='z' => char::from_u32(c as u32 - 'a' as u32 + 0xFF41).unwrap(),
            other => other,
        })
        .collect()
}

#[tokio::test]
async fn look_alike_email_addresses_cannot_sign_up_beside_an_account_or_log_in_as_it() {
    let app = spawn_app().await;
    let local = format!("k{}", crate::support::unique("ate"));
    let email = format!("{local}@example.com");
    let (status, kate) = app
        .call(
            "POST",
            "/api/auth/signup",
            None,
            Some(json!({ "email": email, "password": "kates own password" })),
        )
        .await;
    assert_eq!(status, 201, "{kate}");
    let kate_id = kate["user"]["id"].as_str().unwrap();

    for look_alike in [
        format!("{}@example.com", kelvin(&local)),
        format!("{}@example.com", fullwidth(&local)),
        format!("{}@EXAMPLE.com", kelvin(&local.to_uppercase())),
    ] {
        let (status, body) = app
            .call(
                "POST",
                "/api/auth/signup",
                None,
                Some(json!({ "email": look_alike, "password": "the attackers password" })),
            )
            .await;
        assert_eq!(status, 409, "{look_alike:?}: {body}");
        assert_eq!(body["error"]["code"], "CONFLICT");
        // Its password opens nothing; the account's own one works under any spelling.
        let (status, _) = app
            .call(
                "POST",
                "/api/auth/login",
                None,
                Some(json!({ "email": look_alike, "password": "the attackers password" })),
            )
            .await;
        assert_eq!(status, 401, "{look_alike:?}");
        let (status, body) = app
            .call(
                "POST",
                "/api/auth/login",
                None,
                Some(json!({ "email": look_alike, "password": "kates own password" })),
            )
            .await;
        assert_eq!(status, 200, "{look_alike:?}: {body}");
        assert_eq!(body["user"]["id"], kate_id);
        assert_eq!(body["user"]["email"], email.as_str());
    }
}

#[tokio::test]
async fn addresses_are_stored_normalised_so_the_plain_spelling_is_taken() {
    let app = spawn_app().await;
    let local = format!("k{}", crate::support::unique("arl"));
    let (status, body) = app
        .call(
            "POST",
            "/api/auth/signup",
            None,
            Some(json!({ "email": format!("{}@Example.COM", kelvin(&local)), "password": "karls password" })),
        )
        .await;
    assert_eq!(status, 201, "{body}");
    let plain = format!("{local}@example.com");
    assert_eq!(body["user"]["email"], plain.as_str());
    let (status, body) = app
        .call(
            "POST",
            "/api/auth/signup",
            None,
            Some(json!({ "email": plain, "password": "another password" })),
        )
        .await;
    assert_eq!(status, 409, "{body}");
}

#[tokio::test]
async fn an_invitation_to_a_look_alike_address_reaches_the_real_account() {
    let app = spawn_app().await;
    let f = app.fixture().await;
    let local = format!("k{}", crate::support::unique("ate"));
    let kate_email = format!("{local}@example.com");
    let (status, kate) = app
        .call(
            "POST",
            "/api/auth/signup",
            None,
            Some(json!({ "email": kate_email, "password": "kates own password" })),
        )
        .await;
    assert_eq!(status, 201, "{kate}");
    let kate_token = kate["token"].as_str().unwrap();
    let kate_id = kate["user"]["id"].as_str().unwrap().to_string();

    let look_alike = format!("{}@example.com", fullwidth(&kelvin(&local)));
    let (status, sent) = app
        .call(
            "POST",
            "/api/team",
            Some(&f.token),
            Some(json!({ "projectId": f.project, "email": look_alike, "role": "viewer" })),
        )
        .await;
    assert_eq!(status, 201, "{sent}");
    assert_eq!(sent["invite"]["email"], kate_email.as_str());
    let (_, me) = app
        .call("GET", "/api/auth/me", Some(kate_token), None)
        .await;
    assert_eq!(me["invites"][0]["id"], sent["invite"]["id"], "{me}");
    let (status, body) = app
        .call(
            "POST",
            "/api/team/invites/accept",
            Some(kate_token),
            Some(json!({ "inviteId": sent["invite"]["id"], "status": "accepted" })),
        )
        .await;
    assert_eq!(status, 200, "{body}");
    let (_, team) = app
        .call(
            "GET",
            &format!("/api/team?projectId={}", f.project),
            Some(&f.token),
            None,
        )
        .await;
    let members: Vec<&str> = team["members"]
        .as_array()
        .unwrap()
        .iter()
        .map(|m| m["userId"].as_str().unwrap_or_default())
        .collect();
    assert!(members.contains(&kate_id.as_str()), "{team}");
}

#[tokio::test]
async fn the_migration_normalises_existing_addresses_unless_two_would_collide() {
    let app = spawn_app().await;
    let url = app
        .app
        .config
        .database_url
        .clone()
        .unwrap()
        .expose()
        .to_string();
    let db = url.rsplit('/').next().unwrap().to_string();
    let control = crate::support::pg().await.client(&db).await;
    let karl = format!("k{}", crate::support::unique("arl"));
    let zed = crate::support::unique("zed");
    let rows = [
        ("usr_old1", format!("{}@Example.com", kelvin(&karl))),
        ("usr_old2", format!("{zed}@example.com")),
        ("usr_old3", format!("{}@example.com", fullwidth(&zed))),
    ];
    for (id, email) in &rows {
        control
            .execute(
                "INSERT INTO fluxbase.users (id, email, password_hash) VALUES ($1, $2, 'x')",
                &[id, email],
            )
            .await
            .unwrap();
    }
    control
        .execute(
            "DELETE FROM fluxbase.schema_migrations WHERE version = 8",
            &[],
        )
        .await
        .unwrap();
    let config = app.app.config.clone();
    app.stop().await;
    let app = crate::support::start_with(config).await;
    let email_of = |id: &'static str| {
        let control = &control;
        async move {
            control
                .query_one("SELECT email FROM fluxbase.users WHERE id = $1", &[&id])
                .await
                .unwrap()
                .get::<_, String>(0)
        }
    };
    assert_eq!(email_of("usr_old1").await, format!("{karl}@example.com"));
    // Two rows with one normalised form: both left as they were.
    assert_eq!(email_of("usr_old2").await, rows[1].1);
    assert_eq!(email_of("usr_old3").await, rows[2].1);
    app.stop().await;
}

#[tokio::test]
async fn logging_out_or_a_password_reset_ends_the_realtime_subscriptions_and_tokens_of_the_sessions(
) {
    use crate::support::ws::{connect, recv, send, subscribe};
    let app = spawn_app().await;
    let f = app.fixture().await;
    app.rows(&f.admin, &f.project, "CREATE TABLE t (id int)")
        .await;
    // A second session of the same user, and a token each session obtained.
    let (status, body) = app
        .call(
            "POST",
            "/api/auth/login",
            None,
            Some(json!({ "email": f.email, "password": "correct horse battery" })),
        )
        .await;
    assert_eq!(status, 200, "{body}");
    let other_session = body["token"].as_str().unwrap().to_string();
    let token_of = |session: String| {
        let app = &app;
        let project = f.project.clone();
        async move {
            app.realtime_token(&session, json!({ "projectId": project }))
                .await
        }
    };
    let rt = token_of(f.token.clone()).await;
    let other_rt = token_of(other_session.clone()).await;
    let mut sockets = Vec::new();
    for token in [&f.token, &rt, &other_session, &other_rt, &f.read] {
        let mut ws = connect(&app, "/").await;
        let ack = subscribe(&mut ws, &f.project, Some(token)).await;
        assert_eq!(ack["type"], "subscribed", "{ack}");
        sockets.push(ws);
    }
    let [by_session, by_token, by_other, by_other_token, by_key] = &mut sockets[..] else {
        unreachable!()
    };

    // Logout: the session's own subscriptions end, directly and through its token.
    let (status, body) = app
        .call("POST", "/api/auth/logout", Some(&f.token), None)
        .await;
    assert_eq!(status, 200, "{body}");
    for ws in [&mut *by_session, &mut *by_token] {
        let msg = recv(ws).await;
        assert_eq!(msg["code"], "ACCESS_REVOKED", "{msg}");
        assert!(
            msg["message"].as_str().unwrap().contains("session"),
            "{msg}"
        );
    }
    app.rows(&f.admin, &f.project, "INSERT INTO t VALUES (1)")
        .await;
    for ws in [&mut *by_other, &mut *by_other_token, &mut *by_key] {
        assert_eq!(recv(ws).await["payload"]["record"]["id"], 1);
    }
    for ws in [&mut *by_session, &mut *by_token] {
        send(ws, json!({ "type": "ping" })).await;
        assert_eq!(
            recv(ws).await,
            json!({ "type": "pong" }),
            "got the row after logout"
        );
    }
    // Its token is refused from now on; the other session's still subscribes.
    let msg = subscribe(by_token, &f.project, Some(&rt)).await;
    assert_eq!(msg["code"], "ACCESS_REVOKED", "{msg}");
    let mut again = connect(&app, "/").await;
    let ack = subscribe(&mut again, &f.project, Some(&other_rt)).await;
    assert_eq!(ack["type"], "subscribed", "{ack}");

    // A password reset (`fluxbase user reset-password`, another process): every session of the
    // user ends, and so does everything they opened, here too.
    let pg = crate::support::pg().await;
    let ctl = pg.client(&app.app.cluster.control_db).await;
    ctl.execute(
        "DELETE FROM fluxbase.sessions WHERE user_id = $1",
        &[&f.user_id],
    )
    .await
    .unwrap();
    ctl.execute(
        "SELECT pg_notify('fluxbase_cache', $1)",
        &[&format!("sessions-ended {} *", f.user_id)],
    )
    .await
    .unwrap();
    for ws in [&mut *by_other, &mut *by_other_token, &mut again] {
        let msg = recv(ws).await;
        assert_eq!(msg["code"], "ACCESS_REVOKED", "{msg}");
    }
    app.rows(&f.admin, &f.project, "INSERT INTO t VALUES (2)")
        .await;
    assert_eq!(recv(by_key).await["payload"]["record"]["id"], 2);
    for ws in [&mut *by_other, &mut *by_other_token, &mut again] {
        send(ws, json!({ "type": "ping" })).await;
        assert_eq!(
            recv(ws).await,
            json!({ "type": "pong" }),
            "got the row after the reset"
        );
    }
}

/// Red team rt13 M2: a socket subscribed with a login session kept receiving events after the
/// session expired (only realtime tokens carried an expiry), and a realtime token minted from a
/// session a minute before its end lasted its whole `expiresIn`. Now both end with the session:
/// TOKEN_EXPIRED, then nothing of later changes.
#[tokio::test]
async fn what_a_session_authorized_ends_when_the_session_expires() {
    use crate::support::ws::{connect, recv, send, subscribe};
    let app = crate::support::spawn_app_with(|c| c.session_ttl_secs = 3600).await;
    let f = app.fixture().await;
    app.rows(&f.admin, &f.project, "CREATE TABLE t (id int)")
        .await;
    let clock = &app.app.storage.clock;
    clock.advance(std::time::Duration::from_secs(3600 - 120));
    let (status, body) = app
        .call(
            "POST",
            "/api/realtime/token",
            Some(&f.token),
            Some(json!({ "projectId": f.project, "expiresIn": 3600 })),
        )
        .await;
    assert_eq!(status, 200, "{body}");
    let token = body["token"].as_str().unwrap().to_string();
    let expires_at: chrono::DateTime<chrono::Utc> =
        body["expiresAt"].as_str().unwrap().parse().unwrap();
    let left = (expires_at - clock.now()).num_seconds();
    assert!((1..=120).contains(&left), "ends with the session: {body}");

    let mut by_session = connect(&app, "/").await;
    let mut by_token = connect(&app, "/").await;
    let mut bystander = connect(&app, "/").await;
    for (ws, t) in [
        (&mut by_session, f.token.as_str()),
        (&mut by_token, token.as_str()),
        (&mut bystander, f.read.as_str()),
    ] {
        let ack = subscribe(ws, &f.project, Some(t)).await;
        assert_eq!(ack["type"], "subscribed", "{ack}");
    }
    clock.advance(std::time::Duration::from_secs(121));
    for ws in [&mut by_session, &mut by_token] {
        let msg = recv(ws).await;
        assert_eq!(msg["code"], "TOKEN_EXPIRED", "{msg}");
    }
    app.rows(&f.admin, &f.project, "INSERT INTO t VALUES (1)")
        .await;
    assert_eq!(recv(&mut bystander).await["payload"]["record"]["id"], 1);
    for ws in [&mut by_session, &mut by_token] {
        send(ws, json!({ "type": "ping" })).await;
        assert_eq!(
            recv(ws).await,
            json!({ "type": "pong" }),
            "nothing of the insert"
        );
    }
}

/// Red team rt13 LOW 2: rotations of one key at once all answered 200, each with a different
/// secret, of which only one worked. Now, of rotations that read the key before any of them
/// replaced it, one answers its secret (which works) and the others 409 CONFLICT. The key's row
/// is held locked until all three are waiting to replace it, so they overlap every time.
#[tokio::test]
async fn rotations_of_one_key_at_once_answer_one_working_secret() {
    let app = spawn_app().await;
    let f = app.fixture().await;
    let (key_id, _) = app.new_key(&f, "read", None).await;
    let pg = crate::support::pg().await;
    let mut ctl = pg.client(&app.app.cluster.control_db).await;
    let lock = ctl.transaction().await.unwrap();
    lock.execute(
        "SELECT 1 FROM fluxbase.api_keys WHERE id = $1 FOR UPDATE",
        &[&key_id],
    )
    .await
    .unwrap();
    let rotations = (0..3).map(|_| {
        app.call(
            "POST",
            "/api/keys/rotate",
            Some(&f.admin),
            Some(json!({ "projectId": f.project, "keyId": key_id })),
        )
    });
    let watch = pg.client(&app.app.cluster.control_db).await;
    let release = async {
        crate::support::poll::until(
            std::time::Duration::from_secs(20),
            std::time::Duration::from_millis(20),
            || async {
                let waiting: i64 = watch
                    .query_one(
                        "SELECT count(*) FROM pg_stat_activity WHERE wait_event_type = 'Lock'
                         AND query LIKE 'UPDATE fluxbase.api_keys SET key_hash%'",
                        &[],
                    )
                    .await
                    .unwrap()
                    .get(0);
                if waiting == 3 {
                    Ok(())
                } else {
                    Err(format!("{waiting} rotations waiting for the key's row"))
                }
            },
        )
        .await;
        lock.commit().await.unwrap();
    };
    let (answers, ()) = tokio::join!(futures_util::future::join_all(rotations), release);
    let mut answered = Vec::new();
    for (status, body) in &answers {
        match status {
            200 => answered.push(body["secret"].as_str().unwrap().to_string()),
            409 => assert_eq!(body["error"]["code"], "CONFLICT", "{body}"),
            _ => panic!("{status}: {body}"),
        }
    }
    assert_eq!(answered.len(), 1, "{answers:?}");
    let (status, body) = app
        .call(
            "POST",
            "/api/execute-sql",
            Some(&answered[0]),
            Some(json!({ "projectId": f.project, "query": "SELECT 1" })),
        )
        .await;
    assert_eq!(status, 200, "the answered secret does not work: {body}");
}
