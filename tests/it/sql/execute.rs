//! `POST /api/execute-sql`: the guide's shapes, the scope table enforced by PostgreSQL,
//! escalation attempts, parameters, scripts and limits.

use serde_json::{json, Value};

use crate::support::{spawn_app, spawn_app_with, Fixture, TestApp};

#[tokio::test]
async fn select_answers_in_the_guides_shape() {
    let app = spawn_app().await;
    let f = app.fixture().await;
    app.rows(
        &f.admin,
        &f.project,
        "CREATE TABLE users (id serial PRIMARY KEY, name text, email text)",
    )
    .await;
    let body = app
        .sql(&f.admin, &f.project, "INSERT INTO users (name, email) VALUES ('Alice', 'alice@example.com'), ('Bob', 'b@x.io')")
        .await;
    assert_eq!(body["executionInfo"]["operation"], "INSERT");
    assert_eq!(body["result"]["rowCount"], 2);
    let body = app
        .sql(
            &f.read,
            &f.project,
            "SELECT * FROM users ORDER BY id LIMIT 10;",
        )
        .await;
    assert_eq!(body["success"], true);
    assert_eq!(
        body["result"]["rows"][0],
        json!({ "id": 1, "name": "Alice", "email": "alice@example.com" })
    );
    assert_eq!(body["result"]["columns"], json!(["id", "name", "email"]));
    assert_eq!(body["result"]["rowCount"], 2);
    assert_eq!(body["result"]["message"], Value::Null);
    assert_eq!(body["executionInfo"]["rowCount"], 2);
    assert_eq!(body["executionInfo"]["operation"], "SELECT");
    let time = body["executionInfo"]["time"].as_str().unwrap();
    assert!(
        time.ends_with("ms") && time.trim_end_matches("ms").parse::<u64>().is_ok(),
        "{time}"
    );

    let body = app
        .sql(&f.admin, &f.project, "CREATE TABLE t2 (x int)")
        .await;
    assert_eq!(body["executionInfo"]["operation"], "CREATE TABLE");
    assert_eq!(body["result"]["message"], "CREATE TABLE");
}

#[tokio::test]
async fn sql_errors_are_200_with_sql_exec_error_and_the_sqlstate() {
    let app = spawn_app().await;
    let f = app.fixture().await;
    let (status, body) = app
        .call(
            "POST",
            "/api/execute-sql",
            Some(&f.admin),
            Some(json!({ "projectId": f.project, "query": "SELECT * FROM usrs" })),
        )
        .await;
    assert_eq!(status, 200);
    assert_eq!(
        body,
        json!({ "success": false, "error": { "message": "relation \"usrs\" does not exist", "code": "SQL_EXEC_ERROR", "details": "ERROR:  42P01", "position": 15 } })
    );
    assert_eq!(
        app.sql_error(&f.admin, &f.project, "SELEC 1").await,
        "42601"
    );
    // The connection that failed is fine for the next request.
    assert_eq!(
        app.rows(&f.admin, &f.project, "SELECT 1 AS ok").await[0]["ok"],
        1
    );
}

#[tokio::test]
async fn each_scope_gets_exactly_the_guides_privileges() {
    let app = spawn_app().await;
    let f = app.fixture().await;
    app.rows(
        &f.admin,
        &f.project,
        "CREATE TABLE items (id serial PRIMARY KEY, v text); INSERT INTO items (v) VALUES ('a')",
    )
    .await;

    // read: SELECT only.
    assert_eq!(
        app.rows(&f.read, &f.project, "SELECT v FROM items")
            .await
            .len(),
        1
    );
    for q in [
        "INSERT INTO items (v) VALUES ('r')",
        "UPDATE items SET v = 'r'",
        "DELETE FROM items",
        "TRUNCATE items",
        "CREATE TABLE r (x int)",
        "DROP TABLE items",
    ] {
        let code = app.sql_error(&f.read, &f.project, q).await;
        assert!(code == "42501", "read scope ran {q}: {code}");
    }

    // readwrite: SELECT, INSERT, UPDATE; no DELETE, TRUNCATE or DDL.
    app.rows(
        &f.readwrite,
        &f.project,
        "INSERT INTO items (v) VALUES ('rw')",
    )
    .await;
    app.rows(
        &f.readwrite,
        &f.project,
        "UPDATE items SET v = 'rw2' WHERE v = 'rw'",
    )
    .await;
    for q in [
        "DELETE FROM items",
        "TRUNCATE items",
        "CREATE TABLE rw (x int)",
        "ALTER TABLE items ADD COLUMN z int",
        "DROP TABLE items",
        "CREATE INDEX ON items (v)",
    ] {
        let code = app.sql_error(&f.readwrite, &f.project, q).await;
        assert!(code == "42501", "readwrite scope ran {q}: {code}");
    }

    // admin: full DDL and DML, and tables it creates later get the same grants.
    app.rows(&f.admin, &f.project, "DELETE FROM items WHERE v = 'a'")
        .await;
    app.rows(
        &f.admin,
        &f.project,
        "CREATE TABLE later (x int); INSERT INTO later VALUES (1)",
    )
    .await;
    assert_eq!(
        app.rows(&f.read, &f.project, "SELECT x FROM later").await[0]["x"],
        1
    );
    app.rows(&f.readwrite, &f.project, "INSERT INTO later VALUES (2)")
        .await;
    app.rows(
        &f.admin,
        &f.project,
        "CREATE SCHEMA app; CREATE TABLE app.t (x int); INSERT INTO app.t VALUES (7)",
    )
    .await;
    assert_eq!(
        app.rows(&f.read, &f.project, "SELECT x FROM app.t").await[0]["x"],
        7
    );
    app.rows(&f.admin, &f.project, "TRUNCATE items; DROP TABLE items")
        .await;
}

#[tokio::test]
async fn escalation_attempts_are_refused_for_every_scope() {
    let app = spawn_app().await;
    let f = app.fixture().await;
    let g = app.fixture().await;
    let other_owner = format!("fx_{}_owner", g.project);
    let own_owner = format!("fx_{}_owner", f.project);
    let control = app.app.cluster.control_db.clone();
    for key in [&f.read, &f.readwrite, &f.admin] {
        let mut attempts = vec![
            format!("SET ROLE {other_owner}"),
            "SET ROLE fluxbase".to_string(),
            "SET SESSION AUTHORIZATION fluxbase".to_string(),
            "SELECT set_config('role', 'fluxbase', false)".to_string(),
            "SELECT pg_read_file('/etc/passwd')".to_string(),
            "COPY (SELECT 1) TO PROGRAM 'id'".to_string(),
            "ALTER SYSTEM SET work_mem = '1GB'".to_string(),
            "CREATE ROLE evil SUPERUSER".to_string(),
            "ALTER ROLE CURRENT_USER SUPERUSER".to_string(),
            "CREATE EXTENSION dblink".to_string(),
            "SELECT 1; SET ROLE fluxbase; SELECT current_user".to_string(),
            "SELECT 1; SELECT pg_read_file('/etc/passwd')".to_string(),
        ];
        if key != &f.admin {
            // The stronger role of the same project.
            attempts.push(format!("SET ROLE {own_owner}"));
            attempts.push(format!("SELECT 1; SET ROLE {own_owner}; SELECT 2"));
        }
        for q in attempts {
            let body = app.sql(key, &f.project, &q).await;
            assert_eq!(body["success"], false, "{q} succeeded: {body}");
        }
        // RESET ROLE is allowed but changes nothing: the session user is the scope's role.
        let rows = app
            .rows(
                key,
                &f.project,
                "RESET ROLE; SELECT current_user AS u, session_user AS s",
            )
            .await;
        assert_eq!(rows[0]["u"], rows[0]["s"]);
        assert!(rows[0]["u"]
            .as_str()
            .unwrap()
            .starts_with(&format!("fx_{}_", f.project)));
        let rows = app.rows(key, &f.project, "SELECT rolsuper, rolcreaterole, rolcreatedb, rolreplication, rolbypassrls FROM pg_roles WHERE rolname = current_user").await;
        assert_eq!(
            rows[0],
            json!({ "rolsuper": false, "rolcreaterole": false, "rolcreatedb": false, "rolreplication": false, "rolbypassrls": false })
        );
        let rows = app.rows(key, &f.project, "SELECT count(*) AS n FROM pg_auth_members m JOIN pg_roles r ON r.oid = m.member WHERE r.rolname = current_user").await;
        assert_eq!(rows[0]["n"], 0, "project roles are members of nothing");
    }
    // Another project's database and the control database cannot be reached by a project role
    // (with its login open for the test, as the server opens it for its own connections).
    let pg = crate::support::pg().await;
    let login = app.app.projects.role_login(&own_owner);
    login.open().await.unwrap();
    for (db, role) in [
        (format!("fx_{}", g.project), own_owner.clone()),
        (control.clone(), own_owner.clone()),
    ] {
        let password = app.app.projects.role_password(&role);
        let url = format!("postgres://{role}:{password}@127.0.0.1:{}/{db}", pg.port);
        let err = tokio_postgres::connect(&url, tokio_postgres::NoTls)
            .await
            .err();
        let err = err.expect("a project role reached a database that is not its own");
        assert_eq!(
            err.code(),
            Some(&tokio_postgres::error::SqlState::INSUFFICIENT_PRIVILEGE),
            "{err}"
        );
    }
    // Its own database works with the same credentials (so the refusal above is about privilege).
    let password = app.app.projects.role_password(&own_owner);
    let url = format!(
        "postgres://{own_owner}:{password}@127.0.0.1:{}/fx_{}",
        pg.port, f.project
    );
    assert!(tokio_postgres::connect(&url, tokio_postgres::NoTls)
        .await
        .is_ok());
    login.close().await.unwrap();
}

#[tokio::test]
async fn pooled_connections_carry_no_state_between_requests() {
    let app = spawn_app_with(|c| c.pool_size = 1).await;
    let f = app.fixture().await;
    app.rows(&f.admin, &f.project, "SET statement_timeout = '5min'; SET search_path = nowhere; CREATE TEMP TABLE tmp_x (x int); PREPARE p AS SELECT 1").await;
    // An open transaction left behind is rolled back, not committed.
    app.rows(&f.admin, &f.project, "CREATE TABLE kept (x int)")
        .await;
    app.rows(&f.admin, &f.project, "BEGIN; INSERT INTO kept VALUES (1)")
        .await;
    // The caller's prepared statements are gone; the server's own (`fx_reset`, kept since a
    // SELECT without params runs in the pipelined reset's round trip) are protocol-level ones.
    let rows = app
        .rows(&f.admin, &f.project, "SELECT current_setting('statement_timeout') AS t, current_setting('search_path') AS p, to_regclass('tmp_x') IS NULL AS no_tmp, (SELECT count(*) FROM pg_prepared_statements WHERE from_sql) AS prepared, (SELECT count(*) FROM kept) AS kept")
        .await;
    assert_eq!(
        rows[0],
        json!({ "t": "30s", "p": "\"$user\", public", "no_tmp": true, "prepared": 0, "kept": 0 })
    );
}

#[tokio::test]
async fn a_script_of_several_statements_runs_in_one_transaction_and_answers_the_last() {
    let app = spawn_app().await;
    let f = app.fixture().await;
    let body = app
        .sql(&f.admin, &f.project, "CREATE TABLE s (id int PRIMARY KEY); INSERT INTO s VALUES (1), (2); SELECT count(*) AS n FROM s;")
        .await;
    assert_eq!(body["result"]["rows"], json!([{ "n": 2 }]));
    assert_eq!(body["executionInfo"]["operation"], "SELECT");
    // A failure in the middle rolls back the whole script.
    let code = app
        .sql_error(
            &f.admin,
            &f.project,
            "INSERT INTO s VALUES (3); INSERT INTO s VALUES (1); INSERT INTO s VALUES (4)",
        )
        .await;
    assert_eq!(code, "23505");
    assert_eq!(
        app.rows(&f.admin, &f.project, "SELECT count(*) AS n FROM s")
            .await[0]["n"],
        2
    );
}

#[tokio::test]
async fn params_of_each_json_kind_bind_to_the_inferred_types() {
    let app = spawn_app().await;
    let f = app.fixture().await;
    app.rows(&f.admin, &f.project, "CREATE TABLE p (b bool, i int, big int8, n numeric, t text, a int[], ta text[], j jsonb, ts timestamptz, u uuid)").await;
    let body = app
        .sql_params(
            &f.readwrite,
            &f.project,
            "INSERT INTO p VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10) RETURNING *",
            json!([true, 42, 9007199254740993i64, 3.25, "it's \"quoted\"", [1, null, 3], ["a,b", "{x}", null], { "k": [1, "two"] }, "2024-01-02T03:04:05Z", "a0eebc99-9c0b-4ef8-bb6d-6bb9bd380a11"]),
        )
        .await;
    assert_eq!(body["success"], true, "{body}");
    let row = &body["result"]["rows"][0];
    assert_eq!(row["b"], true);
    assert_eq!(row["i"], 42);
    assert_eq!(row["big"].to_string(), "9007199254740993");
    assert_eq!(row["n"], 3.25);
    assert_eq!(row["t"], "it's \"quoted\"");
    assert_eq!(row["a"], json!([1, null, 3]));
    assert_eq!(row["ta"], json!(["a,b", "{x}", null]));
    assert_eq!(row["j"], json!({ "k": [1, "two"] }));
    assert_eq!(row["ts"], "2024-01-02T03:04:05+00:00");
    assert_eq!(row["u"], "a0eebc99-9c0b-4ef8-bb6d-6bb9bd380a11");

    // The guide's own usage: a boolean parameter.
    app.rows(&f.admin, &f.project, "CREATE TABLE users (id serial, name text, active bool); INSERT INTO users (name, active) VALUES ('A', true), ('B', false)").await;
    let body = app
        .sql_params(
            &f.read,
            &f.project,
            "SELECT id, name FROM users WHERE active = $1",
            json!([true]),
        )
        .await;
    assert_eq!(body["result"]["rows"], json!([{ "id": 1, "name": "A" }]));
    // NULL and hostile strings are values, never SQL.
    let body = app
        .sql_params(
            &f.read,
            &f.project,
            "SELECT $1::text AS x, $2::text AS y",
            json!([null, "'; DROP TABLE users; --"]),
        )
        .await;
    assert_eq!(
        body["result"]["rows"][0],
        json!({ "x": null, "y": "'; DROP TABLE users; --" })
    );
    assert_eq!(
        app.rows(&f.read, &f.project, "SELECT count(*) AS n FROM users")
            .await[0]["n"],
        2
    );
}

#[tokio::test]
async fn a_parameter_that_does_not_fit_is_an_sql_error_naming_it() {
    let app = spawn_app().await;
    let f = app.fixture().await;
    let body = app
        .sql_params(
            &f.read,
            &f.project,
            "SELECT $1::int + $2::int AS s",
            json!([1, "twelve"]),
        )
        .await;
    assert_eq!(body["success"], false, "{body}");
    assert_eq!(body["error"]["code"], "SQL_EXEC_ERROR");
    let msg = body["error"]["message"].as_str().unwrap();
    assert!(msg.contains("$2"), "{msg}");
    let body = app
        .sql_params(
            &f.read,
            &f.project,
            "SELECT $1::int AS s",
            json!([{ "an": "object" }]),
        )
        .await;
    assert_eq!(body["success"], false, "{body}");
    assert!(body["error"]["message"].as_str().unwrap().contains("$1"));
    let body = app
        .sql_params(
            &f.read,
            &f.project,
            "SELECT $1::int AS a, $2::int AS b",
            json!([1]),
        )
        .await;
    assert_eq!(body["success"], false, "{body}");
}

#[tokio::test]
async fn malformed_and_mistyped_bodies_are_bad_requests_naming_the_field() {
    let app = spawn_app().await;
    let f = app.fixture().await;
    let send = |body: &'static str| {
        app.http
            .post(app.url("/api/execute-sql"))
            .bearer_auth(&f.admin)
            .header("content-type", "application/json")
            .body(body)
            .send()
    };
    let resp = send("{not json").await.unwrap();
    assert_eq!(resp.status(), 400);
    let b: Value = resp.json().await.unwrap();
    assert_eq!(b["success"], false);
    assert_eq!(b["error"]["code"], "BAD_REQUEST");
    let b: Value = send(r#"{"projectId": "x"}"#)
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert!(
        b["error"]["message"].as_str().unwrap().contains("query"),
        "{b}"
    );
    let b: Value = send(r#"{"projectId": 5, "query": "SELECT 1"}"#)
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert!(
        b["error"]["message"]
            .as_str()
            .unwrap()
            .contains("invalid type"),
        "{b}"
    );
    let b: Value = send(&*Box::leak(
        format!(
            r#"{{"projectId": "{}", "query": "SELECT 1", "params": "nope"}}"#,
            f.project
        )
        .into_boxed_str(),
    ))
    .await
    .unwrap()
    .json()
    .await
    .unwrap();
    assert_eq!(b["error"]["code"], "BAD_REQUEST", "{b}");
    let resp = send("").await.unwrap();
    assert_eq!(resp.status(), 400);
}

#[tokio::test]
async fn bodies_over_the_cap_get_413() {
    let app = spawn_app_with(|c| c.max_body_bytes = 4096).await;
    let f = app.fixture().await;
    let big = format!("SELECT '{}'", "x".repeat(5000));
    let (status, b) = app
        .call(
            "POST",
            "/api/execute-sql",
            Some(&f.admin),
            Some(json!({ "projectId": f.project, "query": big })),
        )
        .await;
    assert_eq!(
        (status, b["error"]["code"].as_str()),
        (413, Some("PAYLOAD_TOO_LARGE"))
    );
    // A chunked body without Content-Length is capped too.
    let chunks: Vec<Result<String, std::io::Error>> =
        (0..10).map(|_| Ok("x".repeat(1000))).collect();
    let resp = app
        .http
        .post(app.url("/api/execute-sql"))
        .bearer_auth(&f.admin)
        .body(reqwest::Body::wrap_stream(futures_util::stream::iter(
            chunks,
        )))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 413);
}

#[tokio::test]
async fn the_row_cap_truncates_and_says_so() {
    let app = spawn_app_with(|c| c.max_rows = 100).await;
    let f = app.fixture().await;
    let body = app
        .sql(
            &f.read,
            &f.project,
            "SELECT g FROM generate_series(1, 1000) g",
        )
        .await;
    assert_eq!(body["result"]["rows"].as_array().unwrap().len(), 100);
    assert_eq!(body["result"]["truncated"], true);
    assert_eq!(body["result"]["rowCount"], 1000);
    let body = app
        .sql(
            &f.read,
            &f.project,
            "SELECT g FROM generate_series(1, 100) g",
        )
        .await;
    assert_eq!(body["result"]["truncated"], false);
}

#[tokio::test]
async fn statement_timeout_stops_slow_queries_even_when_the_caller_disables_it() {
    let app = spawn_app_with(|c| c.statement_timeout_ms = 500).await;
    let f = app.fixture().await;
    // Each statement is marked, so its backend can be found in pg_stat_activity. A sleep that
    // ran to its end would answer success (after 10 s, 30 s): the answer itself is the proof.
    let marker = crate::support::unique("slow");
    let body = app
        .sql(
            &f.read,
            &f.project,
            &format!("SELECT pg_sleep(10) /* {marker}_a */"),
        )
        .await;
    assert_eq!(body["success"], false, "{body}");
    assert_eq!(body["error"]["details"], "ERROR:  57014", "{body}");
    assert_eq!(
        body["error"]["message"], "canceling statement due to statement timeout",
        "PostgreSQL's own statement_timeout: {body}"
    );
    // The caller switches PostgreSQL's timeout off: the server's guard cancels the statement.
    let body = app
        .sql(
            &f.read,
            &f.project,
            &format!("SET statement_timeout = 0; SELECT pg_sleep(30) /* {marker}_b */"),
        )
        .await;
    assert_eq!(body["success"], false, "{body}");
    assert_eq!(body["error"]["details"], "ERROR:  57014", "{body}");
    assert_eq!(
        body["error"]["message"], "canceling statement due to user request",
        "the server's guard (a cancel request): {body}"
    );
    // Answered, and no backend still runs either statement.
    let running: i64 = crate::support::pg()
        .await
        .client("postgres")
        .await
        .query_one(
            "SELECT count(*) FROM pg_stat_activity
             WHERE state = 'active' AND query LIKE '%' || $1 || '%' AND pid <> pg_backend_pid()",
            &[&marker],
        )
        .await
        .unwrap()
        .get(0);
    assert_eq!(running, 0, "a cancelled statement still runs");
    assert_eq!(
        app.rows(&f.read, &f.project, "SELECT 1 AS ok").await[0]["ok"],
        1
    );
}

#[tokio::test]
async fn the_rate_limit_answers_429_with_retry_after() {
    let app = spawn_app_with(|c| {
        c.rate_limit_requests = 50;
        c.rate_limit_window_secs = 10;
    })
    .await;
    let f = app.fixture().await;
    let mut limited = None;
    for i in 0..60 {
        let resp = app
            .http
            .post(app.url("/api/execute-sql"))
            .bearer_auth(&f.read)
            .json(&json!({ "projectId": f.project, "query": "SELECT 1" }))
            .send()
            .await
            .unwrap();
        if resp.status() == 429 {
            let retry: u64 = resp.headers()["retry-after"]
                .to_str()
                .unwrap()
                .parse()
                .unwrap();
            assert!((1..=10).contains(&retry));
            let b: Value = resp.json().await.unwrap();
            assert_eq!(b["error"]["code"], "RATE_LIMIT");
            limited = Some(i);
            break;
        }
    }
    assert_eq!(
        limited,
        Some(50),
        "the 51st request in the window is refused"
    );
    // Another key of the same project has its own budget.
    assert_eq!(
        app.rows(&f.readwrite, &f.project, "SELECT 1 AS x")
            .await
            .len(),
        1
    );
}

#[tokio::test]
async fn an_unreachable_project_database_is_503_database_connection_error() {
    let app = spawn_app().await;
    let f = app.fixture().await;
    // Take the database away from under the server.
    let pg = crate::support::pg().await;
    pg.client("postgres")
        .await
        .batch_execute(&format!("ALTER DATABASE fx_{0} ALLOW_CONNECTIONS false; SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE datname = 'fx_{0}'", f.project))
        .await
        .unwrap();
    app.app.sql.forget_project(&f.project);
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
        (503, Some("DATABASE_CONNECTION_ERROR")),
        "{b}"
    );
    pg.client("postgres")
        .await
        .batch_execute(&format!(
            "ALTER DATABASE fx_{} ALLOW_CONNECTIONS true",
            f.project
        ))
        .await
        .unwrap();
    assert_eq!(
        app.rows(&f.admin, &f.project, "SELECT 1 AS x").await.len(),
        1
    );
}

/// One value of each common type through the whole API path equals PostgreSQL's own `to_json`
/// of the same value (computed in the same query as the oracle).
#[tokio::test]
async fn values_of_each_common_type_come_back_exactly_as_to_json_renders_them() {
    let app = spawn_app().await;
    let f = app.fixture().await;
    app.rows(&f.admin, &f.project, "CREATE TYPE mood AS ENUM ('sad', 'ok', 'happy'); CREATE DOMAIN posint AS int CHECK (VALUE > 0); CREATE TYPE pair AS (a int, b text)").await;
    let cases = [
        "true::bool",
        "32767::int2",
        "(-2147483648)::int4",
        "9223372036854775807::int8",
        "1.5::float4",
        "'NaN'::float8",
        "'Infinity'::float8",
        "'-Infinity'::float4",
        "1e+20::float8",
        "0.1::float8",
        "123456789012345678901234567890.123456789::numeric",
        "'NaN'::numeric",
        "E'multi\\nline \"quoted\" \\\\ back'::text",
        "'a0eebc99-9c0b-4ef8-bb6d-6bb9bd380a11'::uuid",
        "'2024-02-29'::date",
        "'infinity'::date",
        "'2024-01-02 03:04:05.123456'::timestamp",
        "'2024-01-02 03:04:05+05:30'::timestamptz",
        "'1 year 2 mons 3 days 04:05:06.7'::interval",
        "'{\"a\": [1, 2.50, null]}'::json",
        "'{\"b\": {\"c\": true}, \"a\": 1}'::jsonb",
        "'\\xdeadbeef'::bytea",
        "ARRAY[1, NULL, 3]::int[]",
        "ARRAY[['a', NULL], ['c', 'd\"e']]::text[]",
        "'{}'::int[]",
        "'happy'::mood",
        "ARRAY['sad', 'ok']::mood[]",
        "5::posint",
        "ROW(1, 'x,y')::pair",
        "ARRAY[ROW(2, NULL)::pair]",
        "'12:34:56'::time",
        "'192.168.0.1/24'::inet",
        "'[1,5)'::int4range",
        "NULL::int",
        "'$1.50'::money",
    ];
    for lit in cases {
        let q = format!("SELECT v, to_json(v) AS oracle FROM (SELECT {lit} AS v) s");
        let rows = app.rows(&f.admin, &f.project, &q).await;
        assert_eq!(rows[0]["v"], rows[0]["oracle"], "{lit}");
    }
    // Exact digits: compare the raw text of big numbers, not a float approximation.
    let body = app.http.post(app.url("/api/execute-sql")).bearer_auth(&f.read)
        .json(&json!({ "projectId": f.project, "query": "SELECT 9223372036854775807::int8 AS a, 123456789012345678901234567890.5::numeric AS b" }))
        .send().await.unwrap().text().await.unwrap();
    assert!(body.contains("\"a\":9223372036854775807"), "{body}");
    assert!(
        body.contains("\"b\":123456789012345678901234567890.5"),
        "{body}"
    );
}

#[tokio::test]
async fn internal_errors_are_500_with_a_request_id_and_no_internals() {
    let app = spawn_app().await;
    let f = app.fixture().await;
    // Break the control database under the server: membership lookups now fail.
    let pg = crate::support::pg().await;
    pg.client(&app.app.cluster.control_db)
        .await
        .batch_execute("ALTER TABLE fluxbase.members RENAME TO members_gone")
        .await
        .unwrap();
    let (status, b) = app
        .call(
            "POST",
            "/api/execute-sql",
            Some(&f.token),
            Some(json!({ "projectId": f.project, "query": "SELECT 1" })),
        )
        .await;
    assert_eq!(status, 500, "{b}");
    assert_eq!(b["error"]["code"], "INTERNAL_ERROR");
    assert_eq!(
        b["error"]["details"]["requestId"].as_str().unwrap().len(),
        16
    );
    let text = b.to_string();
    assert!(
        !text.contains("members") && !text.contains("relation"),
        "{text}"
    );
}

#[tokio::test]
async fn a_repeated_statement_survives_a_schema_change_that_alters_its_parameter_types() {
    let app = spawn_app().await;
    let f = app.fixture().await;
    app.rows(&f.admin, &f.project, "CREATE TABLE c (v text)")
        .await;
    let insert = "INSERT INTO c VALUES ($1) RETURNING v";
    for _ in 0..3 {
        let b = app
            .sql_params(&f.admin, &f.project, insert, json!(["hello"]))
            .await;
        assert_eq!(b["result"]["rows"][0]["v"], "hello", "{b}");
    }
    app.rows(
        &f.admin,
        &f.project,
        "ALTER TABLE c ALTER COLUMN v TYPE jsonb USING to_jsonb(v)",
    )
    .await;
    // The remembered parameter type (text) is stale: the string must now be sent as JSON.
    let b = app
        .sql_params(&f.admin, &f.project, insert, json!(["hello"]))
        .await;
    assert_eq!(b["success"], true, "{b}");
    assert_eq!(b["result"]["rows"][0]["v"], "hello");
    let b = app
        .sql_params(&f.admin, &f.project, insert, json!([{ "k": 1 }]))
        .await;
    assert_eq!(b["result"]["rows"][0]["v"], json!({ "k": 1 }), "{b}");
    assert_eq!(
        app.rows(&f.read, &f.project, "SELECT count(*) AS n FROM c")
            .await[0]["n"],
        5
    );
}

/// Members' sessions (the dashboard) have a budget of their own, larger than a key's.
#[tokio::test]
async fn sessions_have_their_own_request_budget() {
    let app = spawn_app_with(|c| {
        c.rate_limit_requests = 5;
        c.session_rate_limit_requests = 8;
        c.rate_limit_window_secs = 10;
    })
    .await;
    let f = app.fixture().await;
    let (session, _) = app.member(&f.project, "developer").await;
    let statuses = |token: String| {
        let app = &app;
        let project = f.project.clone();
        async move {
            let mut out = Vec::new();
            for _ in 0..10 {
                let (status, _) = app
                    .call(
                        "POST",
                        "/api/execute-sql",
                        Some(&token),
                        Some(json!({ "projectId": project, "query": "SELECT 1" })),
                    )
                    .await;
                out.push(status);
            }
            out
        }
    };
    let by_key = statuses(f.read.clone()).await;
    assert_eq!(
        by_key.iter().filter(|s| **s == 200).count(),
        5,
        "{by_key:?}"
    );
    let by_session = statuses(session).await;
    assert_eq!(
        by_session.iter().filter(|s| **s == 200).count(),
        8,
        "{by_session:?}"
    );
    assert_eq!(by_session[8..], [429, 429], "{by_session:?}");
}

/// Statements with `params` run prepared under names of their own on the connection, and the
/// session reset that runs before each (in the same round trip, `auth.reset_session()`) leaves
/// nothing of one request to the next: settings, advisory locks, WITH HOLD cursors, SQL-level
/// prepared statements, LISTEN, temporary tables and sequence state, also when made inside a
/// function, where no command tag shows them.
#[tokio::test]
async fn cached_statements_carry_no_session_state_between_requests() {
    let app = spawn_app_with(|c| c.pool_size = 1).await;
    let f = app.fixture().await;
    app.rows(
        &f.admin,
        &f.project,
        "CREATE SEQUENCE seq;
         CREATE TABLE shape (id int PRIMARY KEY, a text);
         INSERT INTO shape VALUES (1, 'x');
         CREATE FUNCTION leave_state() RETURNS int LANGUAGE plpgsql AS $$
         BEGIN
             EXECUTE 'DECLARE leak CURSOR WITH HOLD FOR SELECT 42';
             EXECUTE 'PREPARE leak_stmt AS SELECT 1';
             EXECUTE 'LISTEN leak_channel';
             EXECUTE 'CREATE TEMP TABLE leak_tmp AS SELECT 1 AS x';
             PERFORM set_config('app.secret', 'alice''s', false);
             PERFORM set_config('search_path', 'nowhere', false);
             PERFORM nextval('public.seq');
             RETURN 1;
         END $$;
         CREATE FUNCTION deallocate_everything() RETURNS int LANGUAGE plpgsql AS $$
         BEGIN EXECUTE 'DEALLOCATE ALL'; RETURN 1; END $$;
         GRANT SELECT ON shape TO PUBLIC",
    )
    .await;
    let run = |query: &'static str| first_row(&app, &f, query);
    const LEAVE: &str = "SELECT public.leave_state() AS done WHERE $1::int = 1";
    const PROBE: &str = "SELECT current_setting('app.secret', true) AS secret,
        current_setting('search_path') AS path,
        (SELECT count(*) FROM pg_cursors WHERE is_holdable) AS cursors,
        (SELECT count(*) FROM pg_prepared_statements WHERE from_sql) AS sql_prepared,
        (SELECT count(*) FROM pg_prepared_statements WHERE NOT from_sql) AS kept,
        (SELECT count(*) FROM pg_listening_channels()) AS listening,
        to_regclass('pg_temp.leak_tmp') IS NULL AS no_tmp
        WHERE $1::int = 1";
    // Twice each, so that the second run of each goes through the connection's own statement.
    for round in 0..3 {
        assert_eq!(run(LEAVE).await, json!({ "done": 1 }));
        let probe = run(PROBE).await;
        assert_ne!(probe["secret"], "alice's", "{probe}");
        assert_eq!(probe["path"], "\"$user\", public", "{probe}");
        for zero in ["cursors", "sql_prepared", "listening"] {
            assert_eq!(probe[zero], 0, "{zero}: {probe}");
        }
        assert_eq!(probe["no_tmp"], true, "{probe}");
        // From the second round on, the statements are kept: the reset does not drop them.
        if round > 0 {
            assert!(probe["kept"].as_i64().unwrap() >= 2, "{probe}");
        }
    }
    // currval/lastval state is gone as well.
    let body = app
        .sql_params(
            &f.admin,
            &f.project,
            "SELECT lastval() AS v WHERE $1::int = 1",
            json!([1]),
        )
        .await;
    assert_eq!(body["success"], false, "{body}");
    assert_eq!(body["error"]["details"], "ERROR:  55000", "{body}");

    // The caller's SQL drops every prepared statement (from a function: no command tag shows
    // it): the next cached run prepares again and answers.
    const SHAPE: &str = "SELECT * FROM shape WHERE id = $1";
    assert_eq!(run(SHAPE).await, json!({ "id": 1, "a": "x" }));
    assert_eq!(run(SHAPE).await, json!({ "id": 1, "a": "x" }));
    run("SELECT public.deallocate_everything() AS d WHERE $1::int = 1").await;
    assert_eq!(run(SHAPE).await, json!({ "id": 1, "a": "x" }));
    assert_eq!(run(PROBE).await["secret"], json!(""));
    // DDL changes the statement's result type: it is prepared again, not answered stale.
    app.rows(
        &f.admin,
        &f.project,
        "ALTER TABLE shape ADD COLUMN b int DEFAULT 7",
    )
    .await;
    assert_eq!(run(SHAPE).await, json!({ "id": 1, "a": "x", "b": 7 }));
    // And a script's DISCARD ALL between two cached runs.
    app.rows(&f.admin, &f.project, "DISCARD ALL").await;
    assert_eq!(run(SHAPE).await, json!({ "id": 1, "a": "x", "b": 7 }));
    // A failing statement in the same round trip as the reset leaves the connection usable
    // and the next request still reset.
    run(LEAVE).await;
    let body = app
        .sql_params(
            &f.admin,
            &f.project,
            "SELECT 1 / ($1::int - 1) AS boom",
            json!([1]),
        )
        .await;
    assert_eq!(body["success"], false, "{body}");
    let probe = run(PROBE).await;
    assert_eq!(probe["path"], "\"$user\", public", "{probe}");
}

/// `query` as the project's admin with the one parameter the reset tests bind (`$1 = 1`, so
/// that it runs as a kept statement): the whole answer.
async fn with_param(app: &TestApp, f: &Fixture, query: &str) -> Value {
    app.sql_params(&f.admin, &f.project, query, json!([1]))
        .await
}

/// [`with_param`], asserting it succeeded: its first row.
async fn first_row(app: &TestApp, f: &Fixture, query: &str) -> Value {
    let body = with_param(app, f, query).await;
    assert_eq!(body["success"], true, "{query}: {body}");
    body["result"]["rows"][0].clone()
}

/// Session state that outlives a failed transaction is reset too: a statement that takes a
/// session advisory lock, prepares a statement with SQL's PREPARE and advances a sequence (none
/// of which a ROLLBACK undoes) and then fails. The failure also rolls back the reset that ran
/// before it in the same transaction, so a design that marks the session clean once the reset
/// was sent, rather than once it committed, would hand this state to the next request.
#[tokio::test]
async fn state_left_by_a_failing_statement_is_reset_before_the_next_request() {
    let app = spawn_app_with(|c| c.pool_size = 1).await;
    let f = app.fixture().await;
    app.rows(
        &f.admin,
        &f.project,
        "CREATE SEQUENCE seq;
         CREATE FUNCTION leave_state_then_fail() RETURNS int LANGUAGE plpgsql AS $$
         BEGIN
             EXECUTE 'PREPARE survivor AS SELECT 1';
             PERFORM nextval('public.seq');
             RAISE EXCEPTION 'failing after leaving state';
         END $$",
    )
    .await;
    const PROBE: &str = "SELECT
        (SELECT count(*) FROM pg_prepared_statements WHERE from_sql) AS sql_prepared
        WHERE $1::int = 1";
    // Twice each: the first run prepares the connection's statement, the second binds it.
    for _ in 0..2 {
        let body = with_param(
            &app,
            &f,
            "SELECT public.leave_state_then_fail() AS x WHERE $1::int = 1",
        )
        .await;
        assert_eq!(body["success"], false, "{body}");
        assert!(
            body["error"]["message"]
                .as_str()
                .is_some_and(|m| m.contains("failing after leaving state")),
            "{body}"
        );
        let probe = first_row(&app, &f, PROBE).await;
        assert_eq!(probe, json!({ "sql_prepared": 0 }), "{probe}");
        let body = with_param(&app, &f, "SELECT lastval() AS v WHERE $1::int = 1").await;
        assert_eq!(body["error"]["details"], "ERROR:  55000", "{body}");
    }
}

/// A SQL-language function (not PL/pgSQL: no EXECUTE, the statements are its body) that holds a
/// cursor, listens and changes the role's settings from inside a SELECT: nothing of it reaches
/// the next request.
#[tokio::test]
async fn state_made_by_a_sql_language_function_is_reset_before_the_next_request() {
    let app = spawn_app_with(|c| c.pool_size = 1).await;
    let f = app.fixture().await;
    app.rows(
        &f.admin,
        &f.project,
        "CREATE FUNCTION sql_leaves_state() RETURNS int LANGUAGE sql AS $$
             DECLARE sql_leak CURSOR WITH HOLD FOR SELECT 1;
             LISTEN sql_channel;
             SELECT set_config('work_mem', '7MB', false);
             SELECT 1
         $$",
    )
    .await;
    const PROBE: &str = "SELECT (SELECT count(*) FROM pg_cursors WHERE is_holdable) AS cursors,
        (SELECT count(*) FROM pg_listening_channels()) AS listening,
        current_setting('work_mem') = '7MB' AS changed
        WHERE $1::int = 1";
    for _ in 0..2 {
        first_row(
            &app,
            &f,
            "SELECT public.sql_leaves_state() AS x WHERE $1::int = 1",
        )
        .await;
        let probe = first_row(&app, &f, PROBE).await;
        assert_eq!(
            probe,
            json!({ "cursors": 0, "listening": 0, "changed": false }),
            "{probe}"
        );
    }
}

/// The session reset closes every cursor held from an earlier request (`CLOSE ALL`, see
/// sql/project/0011_session_reset_cheaper.sql), however it was made: several from a function
/// (one with a name that needs quoting), a script's own `DECLARE … WITH HOLD`, one beside LISTEN
/// and a SQL-level PREPARE (the reset then runs on its own first); and it leaves the
/// statements the connection keeps prepared in place.
#[tokio::test]
async fn session_reset_closes_every_held_cursor_and_keeps_the_statements() {
    let app = spawn_app_with(|c| c.pool_size = 1).await;
    let f = app.fixture().await;
    app.rows(
        &f.admin,
        &f.project,
        r#"CREATE FUNCTION hold_cursors() RETURNS int LANGUAGE plpgsql AS $$
         BEGIN
             EXECUTE 'DECLARE "Odd ""name""" CURSOR WITH HOLD FOR SELECT 1';
             EXECUTE 'DECLARE plain CURSOR WITH HOLD FOR SELECT g FROM generate_series(1, 3) g';
             EXECUTE 'DECLARE transient CURSOR FOR SELECT 3';
             RETURN 1;
         END $$;
         CREATE FUNCTION hold_and_listen() RETURNS int LANGUAGE plpgsql AS $$
         BEGIN
             EXECUTE 'DECLARE both_ways CURSOR WITH HOLD FOR SELECT 1';
             EXECUTE 'LISTEN both_ways';
             EXECUTE 'PREPARE both_ways AS SELECT 1';
             RETURN 1;
         END $$"#,
    )
    .await;
    let run = |query: &'static str| first_row(&app, &f, query);
    const PROBE: &str = "SELECT
        (SELECT count(*) FROM pg_cursors WHERE name <> '') AS cursors,
        (SELECT count(*) FROM pg_prepared_statements WHERE from_sql) AS sql_prepared,
        (SELECT count(*) FROM pg_prepared_statements WHERE NOT from_sql) AS kept,
        (SELECT count(*) FROM pg_listening_channels()) AS listening
        WHERE $1::int = 1";
    const HOLD: &str = "SELECT public.hold_cursors() AS done WHERE $1::int = 1";
    for round in 0..3 {
        // Made by a kept statement's function.
        assert_eq!(run(HOLD).await, json!({ "done": 1 }));
        let probe = run(PROBE).await;
        assert_eq!(probe["cursors"], 0, "round {round}: {probe}");
        // HOLD's and PROBE's statements (the reset itself is never kept: it goes through the
        // unnamed statement).
        if round > 0 {
            assert!(probe["kept"].as_i64().unwrap() >= 2, "{probe}");
        }
        // Made by a script (simple protocol), by the function and by DECLARE itself.
        app.rows(
            &f.admin,
            &f.project,
            "SELECT public.hold_cursors(); DECLARE scripted CURSOR WITH HOLD FOR SELECT 1",
        )
        .await;
        let probe = run(PROBE).await;
        assert_eq!(probe["cursors"], 0, "round {round}: {probe}");
        // Beside LISTEN (the reset runs on its own first) and a SQL-level prepared statement.
        run("SELECT public.hold_and_listen() AS done WHERE $1::int = 1").await;
        let probe = run(PROBE).await;
        for zero in ["cursors", "sql_prepared", "listening"] {
            assert_eq!(probe[zero], 0, "round {round}, {zero}: {probe}");
        }
        // The kept statements are still the connection's: nothing was prepared again.
        if round > 0 {
            assert!(probe["kept"].as_i64().unwrap() >= 3, "{probe}");
        }
    }
}
