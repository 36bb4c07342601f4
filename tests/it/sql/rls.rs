//! Row-level security: `auth.uid()` is the request's identity and SQL cannot change it; the
//! policy API (`/api/rls/policies`); the guide's four patterns, semantics and troubleshooting rows.

use std::time::Duration;

use serde_json::{json, Value};

use crate::support::bus::{assert_quiet, next_event};
use crate::support::{spawn_app, spawn_app_with, Fixture, TestApp};

/// Rows of a query that must succeed.
async fn rows_as(
    app: &TestApp,
    key: &str,
    project: &str,
    uid: Option<&str>,
    query: &str,
) -> Vec<Value> {
    let body = app.sql_as(key, project, uid, query).await;
    assert_eq!(body["success"], true, "{query}: {body}");
    body["result"]["rows"].as_array().unwrap().clone()
}

/// The SQLSTATE of a query that must fail.
async fn error_as(
    app: &TestApp,
    key: &str,
    project: &str,
    uid: Option<&str>,
    query: &str,
) -> String {
    let body = app.sql_as(key, project, uid, query).await;
    assert_eq!(body["success"], false, "{query} should fail: {body}");
    body["error"]["details"]
        .as_str()
        .unwrap()
        .trim_start_matches("ERROR:")
        .trim()
        .to_string()
}

/// `auth.uid()` as seen by `query`'s last statement (column `uid`).
async fn uid_after(app: &TestApp, key: &str, f: &Fixture, uid: Option<&str>, query: &str) -> Value {
    let rows = rows_as(app, key, &f.project, uid, query).await;
    rows.last().unwrap()["uid"].clone()
}

async fn create_policy(app: &TestApp, key: &str, project: &str, body: Value) -> (u16, Value) {
    let mut body = body;
    body["projectId"] = json!(project);
    app.call("POST", "/api/rls/policies", Some(key), Some(body))
        .await
}

async fn list(app: &TestApp, key: &str, project: &str) -> Value {
    let (status, body) = app
        .call(
            "GET",
            &format!("/api/rls/policies?projectId={project}"),
            Some(key),
            None,
        )
        .await;
    assert_eq!(status, 200, "{body}");
    body
}

fn table<'a>(listing: &'a Value, name: &str) -> &'a Value {
    listing["tables"]
        .as_array()
        .unwrap()
        .iter()
        .find(|t| t["table"] == name)
        .unwrap_or_else(|| panic!("no table {name} in {listing}"))
}

async fn toggle(
    app: &TestApp,
    key: &str,
    f: &Fixture,
    table: &str,
    name: &str,
    on: bool,
) -> (u16, Value) {
    app.call(
        "PATCH",
        "/api/rls/policies",
        Some(key),
        Some(json!({ "projectId": f.project, "table": table, "name": name, "enabled": on })),
    )
    .await
}

/// posts: two rows of alice, one of bob.
async fn posts(app: &TestApp, f: &Fixture) {
    app.rows(
        &f.admin,
        &f.project,
        "CREATE TABLE posts (id serial PRIMARY KEY, user_id text NOT NULL, body text);
         INSERT INTO posts (user_id, body) VALUES ('alice', 'a1'), ('alice', 'a2'), ('bob', 'b1')",
    )
    .await;
}

fn bodies(rows: &[Value]) -> Vec<String> {
    let mut out: Vec<String> = rows
        .iter()
        .map(|r| r["body"].as_str().unwrap().to_string())
        .collect();
    out.sort();
    out
}

#[tokio::test]
async fn auth_uid_is_the_named_end_user_the_members_id_or_null() {
    let app = spawn_app().await;
    let f = app.fixture().await;
    let q = "SELECT auth.uid() AS uid, current_setting('fluxbase.auth_uid', true) AS setting";
    let rows = rows_as(&app, &f.read, &f.project, None, q).await;
    assert_eq!(rows[0]["uid"], Value::Null);

    let rows = rows_as(&app, &f.readwrite, &f.project, Some("alice"), q).await;
    assert_eq!(rows[0], json!({ "uid": "alice", "setting": "alice" }));

    let resp = app
        .http
        .post(app.url("/api/execute-sql"))
        .bearer_auth(&f.admin)
        .header("X-Fluxbase-Auth-Uid", "org_42")
        .json(&json!({ "projectId": f.project, "query": q }))
        .send()
        .await
        .unwrap();
    let body: Value = resp.json().await.unwrap();
    assert_eq!(body["result"]["rows"][0]["uid"], "org_42", "{body}");

    // A member's session is that user, and the same name is allowed.
    let rows = rows_as(&app, &f.token, &f.project, None, q).await;
    assert_eq!(rows[0]["uid"], json!(f.user_id));
    let rows = rows_as(&app, &f.token, &f.project, Some(&f.user_id), q).await;
    assert_eq!(rows[0]["uid"], json!(f.user_id));

    // With parameters too (the extended protocol).
    let body = app
        .sql_params(
            &f.read,
            &f.project,
            "SELECT auth.uid() AS uid, $1::int AS n",
            json!([7]),
        )
        .await;
    assert_eq!(body["result"]["rows"][0]["uid"], Value::Null);
    let (_, body) = app
        .call(
            "POST",
            "/api/execute-sql",
            Some(&f.read),
            Some(
                json!({ "projectId": f.project, "query": "SELECT auth.uid() AS uid, $1::int AS n",
                         "params": [7], "authUid": "carol" }),
            ),
        )
        .await;
    assert_eq!(body["result"]["rows"][0], json!({ "uid": "carol", "n": 7 }));
    app.stop().await;
}

#[tokio::test]
async fn malformed_or_conflicting_identities_are_refused() {
    let app = spawn_app().await;
    let f = app.fixture().await;
    let call = |body: Value, header: Option<&'static str>, key: String| {
        let app = &app;
        async move {
            let mut req = app.http.post(app.url("/api/execute-sql")).bearer_auth(key);
            if let Some(h) = header {
                req = req.header("X-Fluxbase-Auth-Uid", h);
            }
            let resp = req.json(&body).send().await.unwrap();
            (resp.status().as_u16(), resp.json::<Value>().await.unwrap())
        }
    };
    let q = |extra: Value| {
        let mut b = json!({ "projectId": f.project, "query": "SELECT auth.uid()" });
        b.as_object_mut()
            .unwrap()
            .extend(extra.as_object().unwrap().clone());
        b
    };
    for (body, header, needle) in [
        (q(json!({ "authUid": 5 })), None, "authUid"),
        (q(json!({ "authUid": "" })), None, "authUid"),
        (q(json!({ "authUid": "a\u{0}b" })), None, "authUid"),
        (q(json!({ "authUid": "x".repeat(257) })), None, "authUid"),
        (
            q(json!({ "authUid": "alice" })),
            Some("bob"),
            "different identities",
        ),
    ] {
        let (status, body) = call(body, header, f.admin.clone()).await;
        assert_eq!(status, 400, "{body}");
        assert_eq!(body["error"]["code"], "BAD_REQUEST");
        assert!(
            body["error"]["message"].as_str().unwrap().contains(needle),
            "{body}"
        );
    }
    let (status, body) = call(q(json!({})), Some(""), f.admin.clone()).await;
    assert_eq!(status, 400, "{body}");
    assert!(body["error"]["message"]
        .as_str()
        .unwrap()
        .contains("X-Fluxbase-Auth-Uid"));
    // A session cannot act for someone else.
    let (status, body) = call(q(json!({ "authUid": "alice" })), None, f.token.clone()).await;
    assert_eq!(status, 403, "{body}");
    assert_eq!(body["error"]["code"], "SCOPE_MISMATCH");
    let (status, _) = call(q(json!({})), Some("alice"), f.token.clone()).await;
    assert_eq!(status, 403);
    app.stop().await;
}

#[tokio::test]
async fn sql_cannot_change_who_auth_uid_says_it_is() {
    let app = spawn_app().await;
    let f = app.fixture().await;
    posts(&app, &f).await;
    app.policy(&f, "posts", "own rows", "ALL", "user_id = auth.uid()")
        .await;
    app.rows(
        &f.admin,
        &f.project,
        "CREATE FUNCTION public.become(u text) RETURNS text LANGUAGE sql AS
           $$ SELECT set_config('fluxbase.auth_uid', u, false) $$;
         CREATE FUNCTION public.become_definer(u text) RETURNS text LANGUAGE sql SECURITY DEFINER AS
           $$ SELECT set_config('fluxbase.auth_uid', u, false) $$;
         GRANT EXECUTE ON FUNCTION public.become(text), public.become_definer(text) TO PUBLIC",
    )
    .await;

    let attempts = [
        "SET fluxbase.auth_uid = 'bob'; SELECT auth.uid() AS uid",
        "SET LOCAL fluxbase.auth_uid = 'bob'; SELECT auth.uid() AS uid",
        "SELECT set_config('fluxbase.auth_uid', 'bob', false); SELECT auth.uid() AS uid",
        "SELECT set_config('fluxbase.auth_uid', 'bob', true) AS s, auth.uid() AS uid",
        "RESET fluxbase.auth_uid; SELECT auth.uid() AS uid",
        "RESET ALL; SELECT auth.uid() AS uid",
        "SELECT public.become('bob'); SELECT auth.uid() AS uid",
        "SELECT public.become_definer('bob'); SELECT auth.uid() AS uid",
        "WITH s AS (SELECT set_config('fluxbase.auth_uid', 'bob', false) AS v)
           SELECT (SELECT v FROM s) AS v, auth.uid() AS uid",
        "SET fluxbase.auth_uid = 'bob'; COMMIT; BEGIN; SELECT auth.uid() AS uid",
        "SET fluxbase.auth_uid = 'bob'; COMMIT; SELECT auth.uid() AS uid",
        "SET search_path = auth, public; SELECT uid() AS uid",
        "SET SESSION AUTHORIZATION DEFAULT; SELECT auth.uid() AS uid",
    ];
    for key in [&f.read, &f.readwrite, &f.admin] {
        for q in attempts {
            assert_eq!(
                uid_after(&app, key, &f, Some("alice"), q).await,
                "alice",
                "{q}"
            );
        }
    }
    // Policies see the server's identity whatever the caller set.
    for q in [
        "SET fluxbase.auth_uid = 'bob'; SELECT body FROM posts",
        "SELECT public.become('bob'); SELECT body FROM posts",
        "WITH s AS (SELECT set_config('fluxbase.auth_uid', 'bob', true)) SELECT body FROM posts, s",
        "RESET fluxbase.auth_uid; SELECT body FROM posts",
    ] {
        let rows = rows_as(&app, &f.read, &f.project, Some("alice"), q).await;
        assert_eq!(bodies(&rows), ["a1", "a2"], "{q}");
    }

    // Writing the identity table, the key or the functions is refused.
    for key in [&f.read, &f.readwrite, &f.admin] {
        for q in [
            "UPDATE auth.identity SET uid = 'bob'",
            "INSERT INTO auth.identity VALUES (pg_backend_pid(), 'bob')",
            "DELETE FROM auth.identity",
            "SELECT * FROM auth.secret",
            "CREATE OR REPLACE FUNCTION auth.uid() RETURNS text LANGUAGE sql AS $$ SELECT 'bob' $$",
            "ALTER FUNCTION auth.uid() SET search_path = public",
            "DROP FUNCTION auth.uid() CASCADE",
            "DROP SCHEMA auth CASCADE",
            "CREATE FUNCTION auth.uid2() RETURNS text LANGUAGE sql AS $$ SELECT 'bob' $$",
            "ALTER TABLE auth.identity OWNER TO CURRENT_USER",
        ] {
            let state = error_as(&app, key, &f.project, Some("alice"), q).await;
            assert!(state == "42501" || state == "42883", "{q}: {state}");
        }
        let q = format!("SET ROLE fx_{}_auth", f.project);
        assert_eq!(
            error_as(&app, key, &f.project, Some("alice"), &q).await,
            "42501"
        );
        // A guessed tag.
        for tag in ["'00'", "repeat('0', 64)", "NULL"] {
            let q = format!("SELECT auth.set_uid('bob', {tag})");
            assert_eq!(
                error_as(&app, key, &f.project, Some("alice"), &q).await,
                "28000"
            );
        }
        let q = "SELECT auth.set_uid('bob', NULL) AS x; SELECT auth.uid() AS uid";
        assert_eq!(
            error_as(&app, key, &f.project, Some("alice"), q).await,
            "28000"
        );
        assert_eq!(
            uid_after(&app, key, &f, Some("alice"), "SELECT auth.uid() AS uid").await,
            "alice"
        );
    }
    app.stop().await;
}

#[tokio::test]
async fn identity_does_not_leak_to_the_next_request_on_a_reused_connection() {
    let app = spawn_app_with(|c| c.pool_size = 1).await;
    let f = app.fixture().await;
    let q = "SELECT auth.uid() AS uid, pg_backend_pid() AS pid,
                    nullif(current_setting('fluxbase.auth_uid', true), '') AS setting";
    let first = rows_as(&app, &f.read, &f.project, Some("alice"), q).await;
    assert_eq!(first[0]["uid"], "alice");
    let pid = first[0]["pid"].clone();
    let metric = |text: &str| -> u64 {
        text.lines()
            .find_map(|l| l.strip_prefix("fluxbase_rls_identity_changes_total "))
            .unwrap()
            .parse()
            .unwrap()
    };
    let before = metric(&app.metrics_text().await);

    let same = rows_as(&app, &f.read, &f.project, Some("alice"), q).await;
    assert_eq!(same[0], first[0]);
    assert_eq!(
        metric(&app.metrics_text().await),
        before,
        "an unchanged identity is not set again"
    );

    let none = rows_as(&app, &f.read, &f.project, None, q).await;
    assert_eq!(none[0]["pid"], pid, "the same pooled connection");
    assert_eq!(none[0]["uid"], Value::Null);
    assert_eq!(none[0]["setting"], Value::Null);

    let bob = rows_as(&app, &f.read, &f.project, Some("bob"), q).await;
    assert_eq!(
        (bob[0]["pid"].clone(), bob[0]["uid"].clone()),
        (pid.clone(), json!("bob"))
    );
    // A request that fails, or one that tampers, leaves nothing for the next.
    error_as(&app, &f.read, &f.project, Some("carol"), "SELECT 1/0").await;
    rows_as(
        &app,
        &f.read,
        &f.project,
        Some("dave"),
        "SET fluxbase.auth_uid = 'eve'; BEGIN",
    )
    .await;
    let next = rows_as(&app, &f.read, &f.project, None, q).await;
    assert_eq!(next[0], json!({ "uid": null, "pid": pid, "setting": null }));
    assert_eq!(metric(&app.metrics_text().await), before + 5);
    app.stop().await;
}

#[tokio::test]
async fn the_guides_four_patterns_work_for_two_users() {
    let app = spawn_app().await;
    let f = app.fixture().await;

    // 1. User owns their rows.
    posts(&app, &f).await;
    app.policy(&f, "posts", "own rows", "ALL", "user_id = auth.uid()")
        .await;
    for (uid, expected) in [("alice", vec!["a1", "a2"]), ("bob", vec!["b1"])] {
        let rows = rows_as(
            &app,
            &f.read,
            &f.project,
            Some(uid),
            "SELECT body FROM posts",
        )
        .await;
        assert_eq!(bodies(&rows), expected);
    }
    let rows = rows_as(
        &app,
        &f.readwrite,
        &f.project,
        Some("bob"),
        "UPDATE posts SET body = 'hacked' WHERE user_id = 'alice' RETURNING body",
    )
    .await;
    assert!(rows.is_empty());
    rows_as(
        &app,
        &f.readwrite,
        &f.project,
        Some("bob"),
        "INSERT INTO posts (user_id, body) VALUES ('bob', 'b2')",
    )
    .await;
    assert_eq!(
        error_as(
            &app,
            &f.readwrite,
            &f.project,
            Some("bob"),
            "INSERT INTO posts (user_id, body) VALUES ('alice', 'forged')"
        )
        .await,
        "42501"
    );
    assert!(
        rows_as(&app, &f.read, &f.project, None, "SELECT * FROM posts")
            .await
            .is_empty()
    );

    // 2. Multi-tenant: auth.uid() is the org id.
    app.rows(&f.admin, &f.project,
        "CREATE TABLE docs (id serial, org_id text, body text);
         INSERT INTO docs (org_id, body) VALUES ('org_1', 'o1a'), ('org_1', 'o1b'), ('org_2', 'o2')").await;
    app.policy(&f, "docs", "org members", "SELECT", "org_id = auth.uid()")
        .await;
    for (org, expected) in [("org_1", vec!["o1a", "o1b"]), ("org_2", vec!["o2"])] {
        let rows = rows_as(
            &app,
            &f.readwrite,
            &f.project,
            Some(org),
            "SELECT body FROM docs",
        )
        .await;
        assert_eq!(bodies(&rows), expected);
    }

    // 3. Public read, owner write.
    app.rows(
        &f.admin,
        &f.project,
        "CREATE TABLE articles (id serial PRIMARY KEY, author_id text, body text);
         INSERT INTO articles (author_id, body) VALUES ('alice', 'by alice')",
    )
    .await;
    app.policy(&f, "articles", "anyone reads", "SELECT", "true")
        .await;
    for (name, command) in [
        ("author inserts", "INSERT"),
        ("author updates", "UPDATE"),
        ("author deletes", "DELETE"),
    ] {
        app.policy(&f, "articles", name, command, "author_id = auth.uid()")
            .await;
    }
    for uid in [Some("alice"), Some("bob"), None] {
        let rows = rows_as(&app, &f.read, &f.project, uid, "SELECT body FROM articles").await;
        assert_eq!(bodies(&rows), ["by alice"]);
    }
    let rows = rows_as(
        &app,
        &f.readwrite,
        &f.project,
        Some("bob"),
        "UPDATE articles SET body = 'defaced' RETURNING id",
    )
    .await;
    assert!(rows.is_empty());
    let rows = rows_as(
        &app,
        &f.readwrite,
        &f.project,
        Some("alice"),
        "UPDATE articles SET body = 'edited' RETURNING body",
    )
    .await;
    assert_eq!(bodies(&rows), ["edited"]);
    rows_as(
        &app,
        &f.readwrite,
        &f.project,
        Some("bob"),
        "INSERT INTO articles (author_id, body) VALUES ('bob', 'by bob')",
    )
    .await;
    assert_eq!(
        error_as(
            &app,
            &f.readwrite,
            &f.project,
            Some("bob"),
            "INSERT INTO articles (author_id, body) VALUES ('alice', 'forged')"
        )
        .await,
        "42501"
    );
    let rows = rows_as(
        &app,
        &f.read,
        &f.project,
        Some("carol"),
        "SELECT body FROM articles",
    )
    .await;
    assert_eq!(bodies(&rows), ["by bob", "edited"]);

    // 4. Full lockdown.
    app.rows(
        &f.admin,
        &f.project,
        "CREATE TABLE audit (id serial, body text); INSERT INTO audit (body) VALUES ('secret')",
    )
    .await;
    app.policy(&f, "audit", "nobody", "ALL", "false").await;
    for uid in [Some("alice"), Some("bob"), None] {
        assert!(
            rows_as(&app, &f.read, &f.project, uid, "SELECT * FROM audit")
                .await
                .is_empty()
        );
        assert_eq!(
            error_as(
                &app,
                &f.readwrite,
                &f.project,
                uid,
                "INSERT INTO audit (body) VALUES ('x')"
            )
            .await,
            "42501"
        );
    }
    // The owner role (admin scope) is not subject to policies.
    assert_eq!(
        rows_as(&app, &f.admin, &f.project, None, "SELECT * FROM audit")
            .await
            .len(),
        1
    );
    app.stop().await;
}

#[tokio::test]
async fn the_owner_bypasses_policies_until_forced_and_no_force_restores_access() {
    let app = spawn_app().await;
    let f = app.fixture().await;
    posts(&app, &f).await;
    app.policy(&f, "posts", "own rows", "ALL", "user_id = auth.uid()")
        .await;
    assert_eq!(
        rows_as(
            &app,
            &f.admin,
            &f.project,
            Some("bob"),
            "SELECT * FROM posts"
        )
        .await
        .len(),
        3
    );
    assert_eq!(
        rows_as(&app, &f.token, &f.project, None, "SELECT * FROM posts")
            .await
            .len(),
        3
    );

    rows_as(
        &app,
        &f.admin,
        &f.project,
        None,
        "ALTER TABLE posts FORCE ROW LEVEL SECURITY",
    )
    .await;
    let listing = list(&app, &f.read, &f.project).await;
    assert_eq!(table(&listing, "posts")["rlsForced"], true);
    let rows = rows_as(
        &app,
        &f.admin,
        &f.project,
        Some("bob"),
        "SELECT body FROM posts",
    )
    .await;
    assert_eq!(bodies(&rows), ["b1"]);
    assert!(
        rows_as(&app, &f.token, &f.project, None, "SELECT * FROM posts")
            .await
            .is_empty()
    );

    rows_as(
        &app,
        &f.admin,
        &f.project,
        None,
        "ALTER TABLE posts NO FORCE ROW LEVEL SECURITY",
    )
    .await;
    assert_eq!(
        rows_as(&app, &f.token, &f.project, None, "SELECT * FROM posts")
            .await
            .len(),
        3
    );
    assert_eq!(
        table(&list(&app, &f.read, &f.project).await, "posts")["rlsForced"],
        false
    );
    app.stop().await;
}

#[tokio::test]
async fn the_policy_api_lists_creates_toggles_and_deletes() {
    let app = spawn_app().await;
    let f = app.fixture().await;
    posts(&app, &f).await;
    app.rows(
        &f.admin,
        &f.project,
        "CREATE SCHEMA crm; CREATE TABLE crm.leads (owner text)",
    )
    .await;
    let listing = list(&app, &f.read, &f.project).await;
    assert_eq!(listing["success"], true);
    assert_eq!(
        table(&listing, "posts"),
        &json!({ "schema": "public", "table": "posts", "rlsEnabled": false, "rlsForced": false, "policies": [] })
    );
    assert_eq!(table(&listing, "leads")["schema"], "crm");
    let names: Vec<&str> = listing["tables"]
        .as_array()
        .unwrap()
        .iter()
        .map(|t| t["table"].as_str().unwrap())
        .collect();
    assert!(
        !names.contains(&"identity") && !names.contains(&"secret"),
        "{names:?}"
    );

    let (status, body) = create_policy(&app, &f.admin, &f.project, json!({
        "table": "posts", "name": "own rows", "command": "select", "using": "user_id = auth.uid()"
    })).await;
    assert_eq!(status, 201, "{body}");
    assert_eq!(body["success"], true);
    assert_eq!(
        body["policy"],
        json!({
            "schema": "public", "table": "posts", "name": "own rows", "command": "SELECT",
            "using": "user_id = auth.uid()", "check": null, "enabled": true
        })
    );
    let (status, body) = create_policy(
        &app,
        &f.admin,
        &f.project,
        json!({
            "schema": "crm", "table": "leads", "name": "mine", "command": "UPDATE",
            "using": "owner = auth.uid()", "check": "owner = auth.uid() AND owner <> ''"
        }),
    )
    .await;
    assert_eq!(status, 201, "{body}");
    assert_eq!(
        body["policy"]["check"],
        "owner = auth.uid() AND owner <> ''"
    );
    let (status, body) = create_policy(&app, &f.admin, &f.project, json!({
        "table": "posts", "name": "insert own", "command": "INSERT", "using": "user_id = auth.uid()"
    })).await;
    assert_eq!(status, 201, "{body}");
    assert_eq!(
        (
            body["policy"]["using"].clone(),
            body["policy"]["check"].clone()
        ),
        (Value::Null, json!("user_id = auth.uid()"))
    );

    let listing = list(&app, &f.readwrite, &f.project).await;
    let posts_entry = table(&listing, "posts");
    assert_eq!(posts_entry["rlsEnabled"], true);
    assert_eq!(posts_entry["policies"].as_array().unwrap().len(), 2);
    assert_eq!(posts_entry["policies"][1]["name"], "own rows");
    assert_eq!(posts_entry["policies"][1]["enabled"], true);
    // A policy made through SQL is listed with PostgreSQL's text.
    app.rows(
        &f.admin,
        &f.project,
        "CREATE POLICY via_sql ON crm.leads FOR DELETE USING (owner = 'x')",
    )
    .await;
    let leads = list(&app, &f.read, &f.project).await;
    let via_sql = table(&leads, "leads")["policies"]
        .as_array()
        .unwrap()
        .iter()
        .find(|p| p["name"] == "via_sql")
        .unwrap()
        .clone();
    assert_eq!(
        via_sql,
        json!({ "name": "via_sql", "command": "DELETE", "using": "(owner = 'x'::text)", "check": null, "enabled": true })
    );

    // Duplicate.
    let (status, body) = create_policy(
        &app,
        &f.admin,
        &f.project,
        json!({
            "table": "posts", "name": "own rows", "command": "ALL", "using": "true"
        }),
    )
    .await;
    assert_eq!(
        (status, body["error"]["code"].as_str()),
        (409, Some("CONFLICT")),
        "{body}"
    );

    // Toggle off: kept, listed as disabled, no longer applies (the table keeps RLS: no rows).
    assert_eq!(
        bodies(
            &rows_as(
                &app,
                &f.read,
                &f.project,
                Some("alice"),
                "SELECT body FROM posts"
            )
            .await
        ),
        ["a1", "a2"]
    );
    let (status, body) = toggle(&app, &f.admin, &f, "posts", "own rows", false).await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(body["policy"]["enabled"], false);
    assert_eq!(body["policy"]["using"], "user_id = auth.uid()");
    let listing = list(&app, &f.read, &f.project).await;
    assert_eq!(table(&listing, "posts")["policies"][1]["enabled"], false);
    assert!(rows_as(
        &app,
        &f.read,
        &f.project,
        Some("alice"),
        "SELECT body FROM posts"
    )
    .await
    .is_empty());
    // Twice is the same; then back on.
    assert_eq!(
        toggle(&app, &f.admin, &f, "posts", "own rows", false)
            .await
            .0,
        200
    );
    let (status, body) = toggle(&app, &f.token, &f, "posts", "own rows", true).await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(body["policy"]["enabled"], true);
    assert_eq!(
        bodies(
            &rows_as(
                &app,
                &f.read,
                &f.project,
                Some("alice"),
                "SELECT body FROM posts"
            )
            .await
        ),
        ["a1", "a2"]
    );
    // A SQL policy with its own roles gets them back.
    app.rows(
        &f.admin,
        &f.project,
        &format!(
            "CREATE POLICY readers ON posts FOR SELECT TO fx_{}_read USING (body = 'b1')",
            f.project
        ),
    )
    .await;
    assert_eq!(
        toggle(&app, &f.admin, &f, "posts", "readers", false)
            .await
            .0,
        200
    );
    assert_eq!(
        bodies(
            &rows_as(
                &app,
                &f.read,
                &f.project,
                Some("alice"),
                "SELECT body FROM posts"
            )
            .await
        ),
        ["a1", "a2"]
    );
    assert_eq!(
        toggle(&app, &f.admin, &f, "posts", "readers", true).await.0,
        200
    );
    assert_eq!(
        bodies(
            &rows_as(
                &app,
                &f.read,
                &f.project,
                Some("alice"),
                "SELECT body FROM posts"
            )
            .await
        ),
        ["a1", "a2", "b1"]
    );
    let roles = rows_as(
        &app,
        &f.admin,
        &f.project,
        None,
        "SELECT roles::text AS r FROM pg_policies WHERE policyname = 'readers'",
    )
    .await;
    assert_eq!(roles[0]["r"], format!("{{fx_{}_read}}", f.project));

    // Delete.
    let path = |table: &str, name: &str| {
        format!(
            "/api/rls/policies?projectId={}&table={table}&name={}",
            f.project,
            name.replace(' ', "%20")
        )
    };
    let (status, body) = app
        .call("DELETE", &path("posts", "own rows"), Some(&f.admin), None)
        .await;
    assert_eq!((status, body.clone()), (200, json!({ "success": true })));
    let (status, body) = app
        .call("DELETE", &path("posts", "own rows"), Some(&f.admin), None)
        .await;
    assert_eq!(
        (status, body["error"]["code"].as_str()),
        (404, Some("NOT_FOUND")),
        "{body}"
    );
    let (status, _) = app
        .call(
            "DELETE",
            &format!("{}&schema=crm", path("leads", "mine")),
            Some(&f.admin),
            None,
        )
        .await;
    assert_eq!(status, 200);
    let listing = list(&app, &f.read, &f.project).await;
    let names: Vec<&str> = table(&listing, "posts")["policies"]
        .as_array()
        .unwrap()
        .iter()
        .map(|p| p["name"].as_str().unwrap())
        .collect();
    assert_eq!(names, ["insert own", "readers"]);
    app.stop().await;
}

#[tokio::test]
async fn malformed_policy_requests_are_bad_requests_naming_the_field() {
    let app = spawn_app().await;
    let f = app.fixture().await;
    posts(&app, &f).await;
    let ok = json!({ "table": "posts", "name": "p", "command": "ALL", "using": "true" });
    let with = |field: &str, value: Value| {
        let mut b = ok.clone();
        if value.is_null() {
            b.as_object_mut().unwrap().remove(field);
        } else {
            b[field] = value;
        }
        b
    };
    for (body, field) in [
        (with("table", Value::Null), "table"),
        (with("table", json!(3)), "table"),
        (with("name", json!("")), "name"),
        (with("name", json!("n".repeat(64))), "name"),
        // Shown to every admin: no text-direction or invisible characters (red team rt13).
        (with("name", json!("pol\u{202E}icy")), "name"),
        (with("name", json!("a\u{200B}b")), "name"),
        (with("command", json!("TRUNCATE")), "command"),
        (with("using", Value::Null), "using"),
        (with("using", json!(true)), "using"),
        (with("check", json!(1)), "check"),
        (
            json!({ "table": "posts", "name": "p", "command": "SELECT", "using": "true", "check": "true" }),
            "check",
        ),
        (
            json!({ "table": "posts", "name": "p", "command": "INSERT", "using": "true", "check": "true" }),
            "check",
        ),
    ] {
        let (status, resp) = create_policy(&app, &f.admin, &f.project, body.clone()).await;
        assert_eq!(status, 400, "{body}: {resp}");
        assert_eq!(resp["error"]["code"], "BAD_REQUEST");
        assert!(
            resp["error"]["message"]
                .as_str()
                .unwrap()
                .starts_with(field),
            "{body}: {resp}"
        );
    }
    let (status, resp) = app
        .call(
            "POST",
            "/api/rls/policies",
            Some(&f.admin),
            Some(json!({ "table": "posts" })),
        )
        .await;
    assert_eq!(status, 400, "{resp}");
    assert!(resp["error"]["message"]
        .as_str()
        .unwrap()
        .contains("projectId"));
    let (status, resp) = app
        .call(
            "PATCH",
            "/api/rls/policies",
            Some(&f.admin),
            Some(
                json!({ "projectId": f.project, "table": "posts", "name": "p", "enabled": "yes" }),
            ),
        )
        .await;
    assert_eq!(status, 400);
    assert!(resp["error"]["message"]
        .as_str()
        .unwrap()
        .starts_with("enabled"));
    let (status, resp) = app
        .call(
            "DELETE",
            &format!("/api/rls/policies?projectId={}&table=posts", f.project),
            Some(&f.admin),
            None,
        )
        .await;
    assert_eq!(status, 400);
    assert!(resp["error"]["message"].as_str().unwrap().contains("name"));
    let (status, _) = app
        .call("PUT", "/api/rls/policies", Some(&f.admin), None)
        .await;
    assert_eq!(status, 405);
    app.stop().await;
}

#[tokio::test]
async fn hostile_expressions_are_refused_and_leave_nothing_behind() {
    let app = spawn_app().await;
    let f = app.fixture().await;
    posts(&app, &f).await;
    for (using, check) in [
        ("true) WITH CHECK (false", None),
        ("true); DROP TABLE posts; --", None),
        ("true; DROP TABLE posts", None),
        ("true) TO fx_nobody USING (true", None),
        (
            "user_id = auth.uid() -- ) ; DROP TABLE posts",
            Some("true /* ) */ ) OR (true"),
        ),
        ("'a' = 'a'')", None),
        ("$$ ) $$ = ')' ) OR (true", None),
        ("(SELECT 1 FROM posts; DROP TABLE posts)::bool", None),
        ("true OR", None),
        ("user_id = = auth.uid()", None),
    ] {
        let mut body =
            json!({ "table": "posts", "name": "evil", "command": "UPDATE", "using": using });
        if let Some(c) = check {
            body["check"] = json!(c);
        }
        let (status, resp) = create_policy(&app, &f.admin, &f.project, body).await;
        assert!(status == 400 || status == 403, "{using}: {resp}");
        let listing = list(&app, &f.read, &f.project).await;
        assert_eq!(table(&listing, "posts")["policies"], json!([]), "{using}");
        assert_eq!(
            table(&listing, "posts")["rlsEnabled"],
            false,
            "{using}: nothing half-written"
        );
    }
    assert_eq!(
        rows_as(&app, &f.read, &f.project, None, "SELECT * FROM posts")
            .await
            .len(),
        3
    );
    // A hostile name and table are just names.
    let name = "x\"; DROP TABLE posts; --";
    app.policy(&f, "posts", name, "SELECT", "true").await;
    let listing = list(&app, &f.read, &f.project).await;
    assert_eq!(table(&listing, "posts")["policies"][0]["name"], name);
    let (status, resp) = create_policy(&app, &f.admin, &f.project,
        json!({ "table": "posts\"; DROP TABLE posts; --", "name": "p", "command": "ALL", "using": "true" })).await;
    assert_eq!(status, 404, "{resp}");
    assert_eq!(
        rows_as(&app, &f.read, &f.project, None, "SELECT * FROM posts")
            .await
            .len(),
        3
    );
    app.stop().await;
}

#[tokio::test]
async fn troubleshooting_rows_behave_as_the_guide_says() {
    let app = spawn_app().await;
    let f = app.fixture().await;
    posts(&app, &f).await;
    app.policy(&f, "posts", "own rows", "ALL", "user_id = auth.uid()")
        .await;

    // Query returns 0 rows: the policy never matches; no error.
    let body = app
        .sql_as(&f.read, &f.project, Some("nobody"), "SELECT * FROM posts")
        .await;
    assert_eq!(
        (body["success"].clone(), body["result"]["rowCount"].clone()),
        (json!(true), json!(0))
    );

    // Policy toggle fails: the column (or table) named in the error.
    app.rows(
        &f.admin,
        &f.project,
        "CREATE TABLE notes (id serial, owner text)",
    )
    .await;
    let (status, resp) = create_policy(&app, &f.admin, &f.project,
        json!({ "table": "notes", "name": "own", "command": "ALL", "using": "user_id = auth.uid()" })).await;
    assert_eq!(
        (status, resp["error"]["code"].as_str()),
        (400, Some("BAD_REQUEST")),
        "{resp}"
    );
    assert!(
        resp["error"]["message"]
            .as_str()
            .unwrap()
            .contains("column \"user_id\" does not exist"),
        "{resp}"
    );
    // The SQLSTATE in `details`, as SQL errors carry it (the dashboard's hints key on it).
    assert_eq!(resp["error"]["details"], "ERROR:  42703", "{resp}");
    let (status, resp) = create_policy(
        &app,
        &f.admin,
        &f.project,
        json!({ "table": "missing", "name": "own", "command": "ALL", "using": "true" }),
    )
    .await;
    assert_eq!(
        (status, resp["error"]["code"].as_str()),
        (404, Some("NOT_FOUND"))
    );
    assert!(
        resp["error"]["message"]
            .as_str()
            .unwrap()
            .contains("public.missing"),
        "{resp}"
    );
    let (status, resp) = toggle(&app, &f.admin, &f, "notes", "own", true).await;
    assert_eq!(status, 404, "{resp}");
    assert!(
        resp["error"]["message"]
            .as_str()
            .unwrap()
            .contains("\"own\""),
        "{resp}"
    );
    let (status, _) = toggle(&app, &f.admin, &f, "missing", "own", true).await;
    assert_eq!(status, 404);

    // INT vs TEXT: PostgreSQL's error, fixed by the cast.
    app.rows(
        &f.admin,
        &f.project,
        "CREATE TABLE orders (id serial, user_id int, total int);
         INSERT INTO orders (user_id, total) VALUES (1, 10), (2, 20)",
    )
    .await;
    let (status, resp) = create_policy(&app, &f.admin, &f.project,
        json!({ "table": "orders", "name": "own", "command": "SELECT", "using": "user_id = auth.uid()" })).await;
    assert_eq!(status, 400, "{resp}");
    assert!(
        resp["error"]["message"]
            .as_str()
            .unwrap()
            .contains("operator does not exist: integer = text"),
        "{resp}"
    );
    assert_eq!(resp["error"]["details"], "ERROR:  42883", "{resp}");
    assert_eq!(
        error_as(
            &app,
            &f.admin,
            &f.project,
            None,
            "CREATE POLICY own ON orders USING (user_id = auth.uid())"
        )
        .await,
        "42883"
    );
    app.policy(&f, "orders", "own", "SELECT", "user_id::text = auth.uid()")
        .await;
    let rows = rows_as(
        &app,
        &f.read,
        &f.project,
        Some("2"),
        "SELECT total FROM orders",
    )
    .await;
    assert_eq!(rows, [json!({ "total": 20 })]);
    app.stop().await;
}

#[tokio::test]
async fn policies_from_the_api_evaluate_auth_uid_once_per_statement() {
    let app = spawn_app().await;
    let f = app.fixture().await;
    posts(&app, &f).await;
    app.policy(&f, "posts", "own rows", "SELECT", "user_id = auth.uid()")
        .await;
    let plan = rows_as(
        &app,
        &f.read,
        &f.project,
        Some("alice"),
        "EXPLAIN SELECT * FROM posts",
    )
    .await;
    let plan: Vec<String> = plan
        .iter()
        .map(|r| r["QUERY PLAN"].as_str().unwrap().to_string())
        .collect();
    assert!(plan.iter().any(|l| l.contains("InitPlan")), "{plan:#?}");
    assert!(
        plan.iter().any(|l| l.contains("Filter: (user_id = $0)")),
        "{plan:#?}"
    );
    // The same expression written by hand is a call per row.
    app.rows(
        &f.admin,
        &f.project,
        "CREATE TABLE raw (user_id text); ALTER TABLE raw ENABLE ROW LEVEL SECURITY;
         CREATE POLICY own ON raw USING (user_id = auth.uid())",
    )
    .await;
    let plan = rows_as(
        &app,
        &f.read,
        &f.project,
        Some("alice"),
        "EXPLAIN SELECT * FROM raw",
    )
    .await;
    assert!(!plan
        .iter()
        .any(|r| r["QUERY PLAN"].as_str().unwrap().contains("InitPlan")));
    // Counted: the InitPlan ran once (loops=1) for the whole scan of three rows.
    let plan = rows_as(
        &app,
        &f.read,
        &f.project,
        Some("alice"),
        "EXPLAIN (ANALYZE, COSTS OFF, TIMING OFF, SUMMARY OFF) SELECT * FROM posts",
    )
    .await;
    let plan: Vec<String> = plan
        .iter()
        .map(|r| r["QUERY PLAN"].as_str().unwrap().to_string())
        .collect();
    let init = plan
        .iter()
        .position(|l| l.contains("InitPlan"))
        .expect("an InitPlan");
    assert!(plan[init + 1].contains("loops=1"), "{plan:#?}");
    assert!(
        plan.iter().any(|l| l.contains("Rows Removed by Filter: 1")),
        "{plan:#?}"
    );
    app.stop().await;
}

#[tokio::test]
async fn each_role_may_use_the_endpoints_its_scope_allows() {
    let app = spawn_app().await;
    let f = app.fixture().await;
    posts(&app, &f).await;
    let other = app.fixture().await;
    let control = app.app.control.get().await.unwrap();
    let mut members = Vec::new();
    for role in ["viewer", "developer", "admin"] {
        let (token, user_id, _) = app.signup().await;
        control
            .execute(
                "INSERT INTO fluxbase.members (project_id, user_id, role) VALUES ($1, $2, $3)",
                &[&f.project, &user_id, &role],
            )
            .await
            .unwrap();
        members.push((role, token));
    }
    drop(control);
    let body = |name: &str| json!({ "table": "posts", "name": name, "command": "SELECT", "using": "true" });
    let mut callers: Vec<(String, String, Option<&str>)> = vec![
        ("read key".into(), f.read.clone(), Some("SCOPE_MISMATCH")),
        (
            "readwrite key".into(),
            f.readwrite.clone(),
            Some("SCOPE_MISMATCH"),
        ),
        ("admin key".into(), f.admin.clone(), None),
    ];
    for (role, token) in &members {
        let refusal = (*role == "viewer").then_some("INSUFFICIENT_PERMISSIONS");
        callers.push((format!("{role} member"), token.clone(), refusal));
    }
    for (i, (who, token, refusal)) in callers.iter().enumerate() {
        assert_eq!(
            list(&app, token, &f.project).await["success"],
            true,
            "{who}"
        );
        let name = format!("p{i}");
        let (status, resp) = create_policy(&app, token, &f.project, body(&name)).await;
        let (toggled, _) = toggle(&app, token, &f, "posts", &name, false).await;
        let (deleted, _) = app
            .call(
                "DELETE",
                &format!(
                    "/api/rls/policies?projectId={}&table=posts&name={name}",
                    f.project
                ),
                Some(token),
                None,
            )
            .await;
        match refusal {
            Some(code) => {
                assert_eq!(status, 403, "{who}: {resp}");
                assert_eq!(resp["error"]["code"], *code, "{who}");
                let (toggled, resp) = toggle(&app, token, &f, "posts", "p2", false).await;
                assert_eq!(
                    (toggled, resp["error"]["code"].as_str()),
                    (403, Some(*code)),
                    "{who}"
                );
                assert_eq!(deleted, 403, "{who}");
            }
            None => {
                assert_eq!(status, 201, "{who}: {resp}");
                assert_eq!((toggled, deleted), (200, 200), "{who}");
            }
        }
    }
    // Another project's key, no key.
    let (status, resp) = app
        .call(
            "GET",
            &format!("/api/rls/policies?projectId={}", f.project),
            Some(&other.admin),
            None,
        )
        .await;
    assert_eq!(
        (status, resp["error"]["code"].as_str()),
        (403, Some("SCOPE_MISMATCH"))
    );
    let (status, _) = create_policy(&app, &other.admin, &f.project, body("x")).await;
    assert_eq!(status, 403);
    let (status, resp) = app
        .call(
            "GET",
            &format!("/api/rls/policies?projectId={}", f.project),
            None,
            None,
        )
        .await;
    assert_eq!(
        (status, resp["error"]["code"].as_str()),
        (401, Some("AUTH_REQUIRED"))
    );
    let (status, _) = app
        .call(
            "GET",
            "/api/rls/policies?projectId=0000000000000000",
            Some(&f.token),
            None,
        )
        .await;
    assert_eq!(status, 404);
    app.stop().await;
}

#[tokio::test]
async fn identity_changes_produce_no_change_events() {
    let app = spawn_app().await;
    let f = app.fixture().await;
    let mut sub = app.app.bus.project(&f.project).subscribe();
    app.rows(&f.admin, &f.project, "CREATE TABLE marks (n int)")
        .await;
    let e = next_event(&mut sub).await;
    assert!(e.payload.contains("CREATE TABLE"), "{}", e.payload);
    // The key is installed on first use; identities change on every request here.
    for uid in ["alice", "bob", "carol"] {
        rows_as(&app, &f.read, &f.project, Some(uid), "SELECT auth.uid()").await;
    }
    rows_as(&app, &f.read, &f.project, None, "SELECT auth.uid()").await;
    app.rows(&f.admin, &f.project, "INSERT INTO marks VALUES (1)")
        .await;
    let e = next_event(&mut sub).await;
    let payload: Value = serde_json::from_str(&e.payload).unwrap();
    assert_eq!(
        (payload["table"].as_str(), payload["operation"].as_str()),
        (Some("marks"), Some("INSERT")),
        "{payload}"
    );
    assert_quiet(&mut sub, Duration::from_millis(500)).await;
    app.stop().await;
}

#[tokio::test]
async fn a_lost_identity_key_is_installed_again() {
    let app = spawn_app().await;
    let f = app.fixture().await;
    assert_eq!(
        uid_after(&app, &f.read, &f, Some("alice"), "SELECT auth.uid() AS uid").await,
        "alice"
    );
    // What a crash does to the unlogged tables.
    let pg = crate::support::pg().await;
    pg.client(&format!("fx_{}", f.project))
        .await
        .batch_execute("TRUNCATE auth.secret, auth.identity")
        .await
        .unwrap();
    assert_eq!(
        uid_after(&app, &f.read, &f, Some("bob"), "SELECT auth.uid() AS uid").await,
        "bob"
    );
    assert_eq!(
        uid_after(
            &app,
            &f.readwrite,
            &f,
            Some("carol"),
            "SELECT auth.uid() AS uid"
        )
        .await,
        "carol"
    );
    app.stop().await;
}

#[tokio::test]
async fn projects_created_before_rls_are_migrated_at_start_up() {
    let app = spawn_app().await;
    let f = app.fixture().await;
    let pg = crate::support::pg().await;
    let control_db = app.app.cluster.control_db.clone();
    // Stopped (gracefully: a restart, no crash, is what this is about) before its project is
    // made to look like an older Fluxbase's, so only the next start-up can migrate it.
    let config = app.app.config.clone();
    app.stop().await;
    // Undo the bootstrap's step 4, as on a project made by an older Fluxbase.
    pg.client(&format!("fx_{}", f.project))
        .await
        .batch_execute(&format!(
            "DROP SCHEMA auth CASCADE; DROP OWNED BY fx_{0}_auth; DROP ROLE fx_{0}_auth",
            f.project
        ))
        .await
        .unwrap();
    pg.client(&control_db)
        .await
        .execute(
            "UPDATE fluxbase.projects SET bootstrap_version = 3 WHERE id = $1",
            &[&f.project],
        )
        .await
        .unwrap();
    let app = crate::support::start_with(config).await;
    assert_eq!(
        uid_after(&app, &f.read, &f, Some("alice"), "SELECT auth.uid() AS uid").await,
        "alice"
    );
    app.stop().await;
}

/// `scope` in the body: a request runs with a weaker role than its caller's; a developer or admin
/// member doing so may name an end user (the dashboard's "run as" in the SQL Editor), and sees
/// exactly that user's rows; no one gets a stronger role or another's identity otherwise.
#[tokio::test]
async fn a_weaker_scope_runs_as_that_role_and_lets_owner_members_act_as_an_end_user() {
    let app = spawn_app().await;
    let f = app.fixture().await;
    posts(&app, &f).await;
    app.policy(&f, "posts", "own rows", "ALL", "user_id = auth.uid()")
        .await;
    let (developer, developer_id) = app.member(&f.project, "developer").await;
    let (viewer, _) = app.member(&f.project, "viewer").await;
    let run = |key: String, body: Value| {
        let app = &app;
        let project = f.project.clone();
        async move {
            let mut body = body;
            body["projectId"] = json!(project);
            app.call("POST", "/api/execute-sql", Some(&key), Some(body))
                .await
        }
    };
    let select = "SELECT body, current_user AS role FROM posts ORDER BY body";
    // The developer as alice under the read role: alice's rows only, as fx_<id>_read.
    let (status, body) = run(
        developer.clone(),
        json!({ "query": select, "scope": "read", "authUid": "alice" }),
    )
    .await;
    assert_eq!(status, 200, "{body}");
    let rows = body["result"]["rows"].as_array().unwrap();
    assert_eq!(bodies(rows), ["a1", "a2"], "{body}");
    assert_eq!(rows[0]["role"], format!("fx_{}_read", f.project));
    // … and as bob with readwrite: his rows, and his writes only (the policy's check).
    let (_, body) = run(
        developer.clone(),
        json!({ "query": "INSERT INTO posts (user_id, body) VALUES ('bob', 'b2') RETURNING current_user AS role",
                "scope": "readwrite", "authUid": "bob" }),
    )
    .await;
    assert_eq!(body["success"], true, "{body}");
    assert_eq!(
        body["result"]["rows"][0]["role"],
        format!("fx_{}_readwrite", f.project)
    );
    let (_, body) = run(
        developer.clone(),
        json!({ "query": "INSERT INTO posts (user_id, body) VALUES ('alice', 'forged')",
                "scope": "readwrite", "authUid": "bob" }),
    )
    .await;
    assert_eq!(body["success"], false, "{body}");
    assert_eq!(body["error"]["details"], "ERROR:  42501", "{body}");
    // Without authUid the weaker role acts as the member: no rows are theirs.
    let (_, body) = run(
        developer.clone(),
        json!({ "query": "SELECT auth.uid() AS uid, count(*) AS n FROM posts", "scope": "read" }),
    )
    .await;
    assert_eq!(
        body["result"]["rows"][0],
        json!({ "uid": developer_id, "n": 0 }),
        "{body}"
    );
    // At its own (owner) role a session still acts as itself only.
    let (status, body) = run(
        developer.clone(),
        json!({ "query": select, "scope": "admin", "authUid": "alice" }),
    )
    .await;
    assert_eq!(
        (status, &body["error"]["code"]),
        (403, &json!("SCOPE_MISMATCH")),
        "{body}"
    );
    // A viewer (already the read role) may not name anyone else, with or without scope.
    for extra in [json!({}), json!({ "scope": "read" })] {
        let mut req = json!({ "query": select, "authUid": "alice" });
        req.as_object_mut()
            .unwrap()
            .extend(extra.as_object().unwrap().clone());
        let (status, body) = run(viewer.clone(), req).await;
        assert_eq!(
            (status, &body["error"]["code"]),
            (403, &json!("SCOPE_MISMATCH")),
            "{body}"
        );
    }
    // Keys: a stronger scope than the key's is refused; a weaker one runs as that role.
    for (key, scope) in [
        (&f.read, "readwrite"),
        (&f.read, "admin"),
        (&f.readwrite, "admin"),
    ] {
        let (status, body) = run(key.clone(), json!({ "query": "SELECT 1", "scope": scope })).await;
        assert_eq!(
            (status, &body["error"]["code"]),
            (403, &json!("SCOPE_MISMATCH")),
            "{scope}: {body}"
        );
    }
    let (_, body) = run(
        f.admin.clone(),
        json!({ "query": "DROP TABLE posts", "scope": "readwrite" }),
    )
    .await;
    assert_eq!(body["error"]["details"], "ERROR:  42501", "{body}");
    for bad in [json!("owner"), json!(1), json!("READ")] {
        let (status, body) = run(
            f.admin.clone(),
            json!({ "query": "SELECT 1", "scope": bad }),
        )
        .await;
        assert_eq!(
            (status, &body["error"]["code"]),
            (400, &json!("BAD_REQUEST")),
            "{body}"
        );
    }
    let rows = rows_as(
        &app,
        &f.admin,
        &f.project,
        None,
        "SELECT count(*) AS n FROM posts",
    )
    .await;
    assert_eq!(
        rows[0]["n"], 4,
        "the table is intact and holds bob's one insert"
    );
}

/// A misspelt `scope` or `authUid` would silently run with the caller's full role and
/// identity: near-misses of the fields that narrow what runs are refused, other unknown fields
/// still ignored.
#[tokio::test]
async fn near_misses_of_scope_and_auth_uid_are_refused() {
    let app = spawn_app().await;
    let f = app.fixture().await;
    for (field, meant) in [
        ("Scope", "scope"),
        ("scopes", "scope"),
        ("role", "scope"),
        ("auth_uid", "authUid"),
        ("AuthUID", "authUid"),
        ("parameters", "params"),
    ] {
        let (status, body) = app
            .call(
                "POST",
                "/api/execute-sql",
                Some(&f.admin),
                Some(json!({ "projectId": f.project, "query": "SELECT current_user", field: "read" })),
            )
            .await;
        assert_eq!(status, 400, "{field}: {body}");
        assert_eq!(
            body["error"]["message"],
            format!("unknown field `{field}`: did you mean `{meant}`?"),
            "{body}"
        );
    }
    let (status, body) = app
        .call(
            "POST",
            "/api/execute-sql",
            Some(&f.admin),
            Some(json!({ "projectId": f.project, "query": "SELECT 1 AS one", "requestTag": "x" })),
        )
        .await;
    assert_eq!(
        (status, &body["result"]["rows"][0]["one"]),
        (200, &json!(1)),
        "{body}"
    );
}

/// A statement with `params` kept prepared on the connection (and planned generically after a
/// few runs) still answers for each request's own end user: alternating identities on one
/// connection, each sees only its rows and its `fluxbase.auth_uid`, on every run.
#[tokio::test]
async fn kept_statements_answer_for_each_requests_own_identity() {
    let app = spawn_app_with(|c| c.pool_size = 1).await;
    let f = app.fixture().await;
    posts(&app, &f).await;
    app.policy(&f, "posts", "own rows", "ALL", "user_id = auth.uid()")
        .await;
    let q = "SELECT body, current_setting('fluxbase.auth_uid', true) AS setting
             FROM posts WHERE id > $1 ORDER BY body";
    for run in 0..12 {
        for (uid, expected) in [("alice", vec!["a1", "a2"]), ("bob", vec!["b1"])] {
            let (status, body) = app
                .call(
                    "POST",
                    "/api/execute-sql",
                    Some(&f.read),
                    Some(json!({ "projectId": f.project, "query": q, "params": [0], "authUid": uid })),
                )
                .await;
            assert_eq!(status, 200, "{body}");
            assert_eq!(body["success"], true, "{body}");
            let rows = body["result"]["rows"].as_array().unwrap();
            assert_eq!(bodies(rows), expected, "run {run} as {uid}");
            assert!(
                rows.iter().all(|r| r["setting"] == uid),
                "run {run}: {body}"
            );
        }
    }
    // No identity: no rows and no setting left from the last request.
    let body = app.sql_params(&f.read, &f.project, q, json!([0])).await;
    assert_eq!(body["result"]["rows"], json!([]), "{body}");
}
