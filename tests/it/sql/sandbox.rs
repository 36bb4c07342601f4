//! What SQL sent with any key may not do: reach past the caller's own request through the
//! project roles (their passwords and settings), the change stream (forged messages, the
//! `fluxbase.cdc_internal` switch), the disk (temp files) or other callers' statements.

use std::time::{Duration, Instant};

use serde_json::{json, Value};

use crate::support::receiver::Receiver;
use crate::support::ws::{connect, recv, room, subscribe, without_id, Socket};
use crate::support::{pg, spawn_app, spawn_app_with, spawn_webhook_app};

/// A direct login to the project's database as `role` with `password`; the SQLSTATE of a
/// refusal.
async fn direct_login(project: &str, role: &str, password: &str) -> Result<(), String> {
    let pg = pg().await;
    let url = format!(
        "postgres://{role}:{password}@127.0.0.1:{}/fx_{project}",
        pg.port
    );
    match tokio_postgres::connect(&url, tokio_postgres::NoTls).await {
        Ok((client, conn)) => {
            tokio::spawn(conn);
            drop(client);
            Ok(())
        }
        Err(e) => Err(e
            .as_db_error()
            .map_or_else(|| e.to_string(), |d| d.code().code().to_string())),
    }
}

#[tokio::test]
async fn a_password_set_by_sql_neither_breaks_the_next_request_nor_opens_a_login() {
    let app = spawn_app().await;
    let f = app.fixture().await;
    let second_read = app.new_key(&f, "read", Some("another")).await.1;
    app.rows(&f.admin, &f.project, "CREATE TABLE items (id int)")
        .await;
    let read_role = format!("fx_{}_read", f.project);
    for (key, sql) in [
        (
            &f.read,
            "ALTER ROLE CURRENT_USER PASSWORD 'attacker-chosen'",
        ),
        (
            &f.readwrite,
            "ALTER ROLE CURRENT_USER PASSWORD 'attacker-chosen'",
        ),
    ] {
        // PostgreSQL lets a role change its own password; what matters is what follows.
        let body = app.sql(key, &f.project, sql).await;
        assert_eq!(body["success"], true, "{sql}: {body}");
    }
    // New connections from now on (as after a restart or when the pool grows).
    app.app.sql.forget_project(&f.project);
    for key in [&f.read, &second_read] {
        let rows = app
            .rows(key, &f.project, "SELECT count(*) AS n FROM items")
            .await;
        assert_eq!(rows[0]["n"], 0);
    }
    app.rows(&f.readwrite, &f.project, "INSERT INTO items VALUES (1)")
        .await;
    // Nobody logs in with the password the caller chose, nor with the server's own.
    for role in [read_role.clone(), format!("fx_{}_readwrite", f.project)] {
        let err = direct_login(&f.project, &role, "attacker-chosen")
            .await
            .expect_err("a password set through the SQL API opened a direct login");
        assert_eq!(err, "28P01", "password authentication failed");
        let own = app.app.projects.role_password(&role);
        direct_login(&f.project, &role, &own)
            .await
            .expect_err("a project role's password works outside the server's logins");
    }
    // Again after the server has logged in anew: still no login with it.
    app.app.sql.forget_project(&f.project);
    app.rows(&f.read, &f.project, "SELECT 1 AS one").await;
    direct_login(&f.project, &read_role, "attacker-chosen")
        .await
        .expect_err("the caller's password was left in place");
}

#[tokio::test]
async fn role_settings_set_by_sql_do_not_reach_the_next_request() {
    let app = spawn_app().await;
    let f = app.fixture().await;
    app.rows(&f.admin, &f.project, "CREATE TABLE items (id int)")
        .await;
    app.rows(
        &f.read,
        &f.project,
        &format!(
            "ALTER ROLE CURRENT_USER SET statement_timeout = 1;
             ALTER ROLE CURRENT_USER SET search_path = nowhere;
             ALTER ROLE CURRENT_USER IN DATABASE fx_{} SET lock_timeout = 1",
            f.project
        ),
    )
    .await;
    app.rows(
        &f.readwrite,
        &f.project,
        "ALTER ROLE CURRENT_USER SET default_transaction_read_only = on",
    )
    .await;
    app.app.sql.forget_project(&f.project);
    let rows = app
        .rows(
            &f.read,
            &f.project,
            "SELECT count(*) AS n, current_setting('search_path') AS p,
                    current_setting('statement_timeout') AS t, current_setting('lock_timeout') AS l
             FROM items",
        )
        .await;
    assert_eq!(
        rows[0],
        json!({ "n": 0, "p": "\"$user\", public", "t": "30s", "l": "0" })
    );
    app.rows(&f.readwrite, &f.project, "INSERT INTO items VALUES (1)")
        .await;
    let rows = app
        .rows(&f.read, &f.project, "SELECT pg_sleep(0.05), 1 AS one")
        .await;
    assert_eq!(rows[0]["one"], 1);
}

/// The next message on the socket that is not a db_event.
async fn next_non_row(ws: &mut Socket) -> Value {
    loop {
        let m = recv(ws).await;
        if m["type"] != "db_event" || m["payload"]["event_type"] == "schema_update" {
            return m;
        }
    }
}

#[tokio::test]
async fn fluxbase_messages_forged_from_sql_reach_no_socket_and_no_webhook() {
    let app = spawn_webhook_app().await;
    let f = app.fixture().await;
    let rx = Receiver::start().await;
    let (status, body) = app
        .call(
            "POST",
            "/api/webhooks",
            Some(&f.admin),
            Some(json!({ "projectId": f.project, "url": rx.url, "events": ["schema.changed"] })),
        )
        .await;
    assert_eq!(status, 201, "{body}");
    let mut ws = connect(&app, "/").await;
    let ack = subscribe(&mut ws, &f.project, Some(&f.read)).await;
    assert_eq!(ack["type"], "subscribed", "{ack}");

    let forged_ddl = r#"{"command":"DROP TABLE","objectType":"table","schema":"public","object":"public.forged"}"#;
    let forged_broadcast = r#"{"event":"forged","payload":{"from":"sql"}}"#;
    for key in [&f.read, &f.readwrite, &f.admin] {
        for (prefix, content) in [
            ("fluxbase.ddl", forged_ddl),
            ("fluxbase.broadcast", forged_broadcast),
        ] {
            // Refused by PostgreSQL (and, were it allowed, dropped by the change stream).
            let body = app
                .sql_params(
                    key,
                    &f.project,
                    "SELECT pg_logical_emit_message(true, $1, $2::text)::text AS lsn",
                    json!([prefix, content]),
                )
                .await;
            assert_eq!(body["success"], false, "{body}");
            assert_eq!(body["error"]["details"], "ERROR:  42501", "{body}");
        }
    }
    // Even a message PostgreSQL lets through (the admin role here, a cluster where the
    // privilege cannot be revoked) carries no valid tag and is dropped.
    let admin = pg().await.client(&format!("fx_{}", f.project)).await;
    for (prefix, content) in [
        ("fluxbase.ddl", forged_ddl),
        ("fluxbase.broadcast", forged_broadcast),
    ] {
        admin
            .execute(
                "SELECT pg_logical_emit_message(true, $1, $2::text)::text",
                &[&prefix, &content],
            )
            .await
            .unwrap();
    }

    // The genuine ones still arrive, and first: nothing forged came before them.
    app.rows(
        &f.readwrite,
        &f.project,
        "SELECT realtime.broadcast('genuine', '{\"n\":1}')",
    )
    .await;
    app.rows(&f.admin, &f.project, "CREATE TABLE genuine (id int)")
        .await;
    assert_eq!(
        without_id(next_non_row(&mut ws).await),
        json!({ "type": "broadcast", "roomId": room(&f.project), "event": "genuine", "payload": { "n": 1 } })
    );
    let m = next_non_row(&mut ws).await;
    assert_eq!(m["payload"]["event_type"], "schema_update", "{m}");
    assert_eq!(m["payload"]["command"], "CREATE TABLE", "{m}");
    assert_eq!(m["payload"]["table"], "genuine", "{m}");
    let got = rx.wait_for(1).await;
    let first: Value = serde_json::from_str(&got[0].body).unwrap();
    assert_eq!(first["event_type"], "schema.changed", "{first}");
    assert_eq!(first["table_id"], "genuine", "{first}");
    // Counted: two forged by the admin role above, plus any the SQL API let through.
    let status = app.app.cdc.status(&f.project).unwrap();
    assert!(status.rejected_messages >= 2, "{status:?}");
    let text = app.app.metrics.render(0, 0, &app.app.cdc.all_status());
    assert!(
        text.contains(&format!(
            "fluxbase_cdc_rejected_messages_total{{project=\"{}\"}}",
            f.project
        )),
        "{text}"
    );
}

#[tokio::test]
async fn the_cdc_internal_setting_silences_nothing_for_a_caller() {
    let app = spawn_app().await;
    let f = app.fixture().await;
    let mut sub = app.app.bus.project(&f.project).subscribe();
    app.rows(
        &f.admin,
        &f.project,
        "SET fluxbase.cdc_internal = 'on'; CREATE TABLE hidden (id int PRIMARY KEY, v text)",
    )
    .await;
    app.rows(
        &f.admin,
        &f.project,
        "SELECT set_config('fluxbase.cdc_internal', 'on', false); DROP TABLE hidden;
         CREATE TABLE hidden (id int PRIMARY KEY, v text)",
    )
    .await;
    app.rows(&f.admin, &f.project, "CREATE TABLE marker (id int)")
        .await;
    let ev = crate::support::bus::events(&mut sub, 4).await;
    let seen: Vec<String> = ev
        .iter()
        .map(|e| format!("{} {}", e["command"].as_str().unwrap_or("?"), e["table"]))
        .collect();
    assert_eq!(
        seen,
        vec![
            "CREATE TABLE \"hidden\"",
            "DROP TABLE \"hidden\"",
            "CREATE TABLE \"hidden\"",
            "CREATE TABLE \"marker\""
        ]
    );
    let rows = app
        .rows(
            &f.admin,
            &f.project,
            "SELECT relreplident AS r FROM pg_class WHERE oid = 'hidden'::regclass",
        )
        .await;
    assert_eq!(rows[0]["r"], "f", "full replica identity is kept");
    // A table made inside another command gets it as well.
    app.rows(
        &f.admin,
        &f.project,
        "SET fluxbase.cdc_internal = 'on'; CREATE SCHEMA inner_s CREATE TABLE inner_t (id int PRIMARY KEY, v text)",
    )
    .await;
    let ev = crate::support::bus::events(&mut sub, 1).await;
    assert_eq!(ev[0]["command"], "CREATE SCHEMA", "{}", ev[0]);
    let rows = app
        .rows(
            &f.admin,
            &f.project,
            "SELECT relreplident AS r FROM pg_class WHERE oid = 'inner_s.inner_t'::regclass",
        )
        .await;
    assert_eq!(
        rows[0]["r"], "f",
        "full replica identity for a table made by CREATE SCHEMA"
    );
}

#[tokio::test]
async fn no_scope_sees_the_clusters_replication_slots_or_walsenders() {
    let app = spawn_app().await;
    let f = app.fixture().await;
    let other = app.fixture().await;
    // The other project's slot exists (its stream runs): the server itself sees it.
    let pg = pg().await;
    let admin = pg.client("postgres").await;
    let slots: i64 = admin
        .query_one(
            "SELECT count(*) FROM pg_replication_slots WHERE slot_name LIKE '%' || $1 || '%'",
            &[&other.project],
        )
        .await
        .unwrap()
        .get(0);
    assert_eq!(slots, 1, "the other project has its slot");
    for key in [&f.read, &f.readwrite, &f.admin, &f.token] {
        for view in [
            "pg_replication_slots",
            "pg_stat_replication",
            "pg_stat_replication_slots",
            "pg_stat_wal_receiver",
            "pg_stat_subscription",
        ] {
            assert_eq!(
                app.sql_error(key, &f.project, &format!("SELECT * FROM pg_catalog.{view}"))
                    .await,
                "42501",
                "{view}"
            );
        }
    }
    // Change capture, which reads its own slot, still works.
    app.rows(&f.admin, &f.project, "CREATE TABLE t (id int)")
        .await;
    let mut ws = connect(&app, "/").await;
    let ack = subscribe(&mut ws, &f.project, Some(&f.read)).await;
    assert_eq!(ack["type"], "subscribed", "{ack}");
    app.rows(&f.admin, &f.project, "INSERT INTO t VALUES (1)")
        .await;
    let m = recv(&mut ws).await;
    assert_eq!(m["payload"]["record"]["id"], 1, "{m}");
}

/// The cluster's shared lock table is not a project's to fill (the red team filled it with
/// session-level advisory locks from a read key: every tenant's writes and the server's own
/// logins failed with 53200), and other databases' activity counters are not a project's to
/// read. The session reset's `pg_advisory_unlock_all()` still runs.
#[tokio::test]
async fn no_scope_takes_advisory_locks_or_reads_other_databases_activity() {
    let app = spawn_app().await;
    let f = app.fixture().await;
    let other = app.fixture().await;
    app.rows(
        &other.admin,
        &other.project,
        "CREATE TABLE t (id int); INSERT INTO t VALUES (1)",
    )
    .await;
    for key in [&f.read, &f.readwrite, &f.admin, &f.token] {
        for sql in [
            "SELECT pg_advisory_lock(1)",
            "SELECT pg_advisory_lock(1, 2)",
            "SELECT pg_advisory_lock_shared(1)",
            "SELECT pg_try_advisory_lock(1)",
            "SELECT pg_try_advisory_lock_shared(1, 2)",
            "SELECT pg_advisory_xact_lock(1)",
            "SELECT pg_advisory_xact_lock_shared(1)",
            "SELECT pg_try_advisory_xact_lock(1)",
            "SELECT pg_try_advisory_xact_lock_shared(1)",
            "SELECT count(pg_advisory_lock(i::bigint)) FROM generate_series(1, 1000) i",
            "SELECT datname, xact_commit, tup_inserted FROM pg_stat_database",
            "SELECT * FROM pg_stat_database_conflicts",
            "SELECT pg_stat_get_db_xact_commit(oid) FROM pg_database",
            "SELECT pg_stat_get_db_tuples_inserted(oid) FROM pg_database",
        ] {
            assert_eq!(app.sql_error(key, &f.project, sql).await, "42501", "{sql}");
        }
        // Unlocking (what the reset does) is harmless and still allowed.
        let body = app
            .sql(key, &f.project, "SELECT pg_advisory_unlock_all()")
            .await;
        assert_eq!(body["success"], true, "{body}");
    }
    // Nothing of the cluster's lock table was taken by the attempts in this project's database.
    let pg = pg().await;
    let admin = pg.client("postgres").await;
    let held: i64 = admin
        .query_one(
            "SELECT count(*) FROM pg_locks l JOIN pg_database d ON d.oid = l.database
             WHERE l.locktype = 'advisory' AND d.datname = 'fx_' || $1",
            &[&f.project],
        )
        .await
        .unwrap()
        .get(0);
    assert_eq!(held, 0);
}

#[tokio::test]
async fn temp_files_are_capped_per_role() {
    let app = spawn_app_with(|c| c.temp_file_limit_kb = 1024).await;
    let f = app.fixture().await;
    let body = app
        .sql(
            &f.read,
            &f.project,
            "SELECT count(*) FROM (SELECT g FROM generate_series(1, 2000000) g ORDER BY g DESC) s",
        )
        .await;
    assert_eq!(body["success"], false, "{body}");
    assert_eq!(body["error"]["code"], "SQL_EXEC_ERROR", "{body}");
    let message = body["error"]["message"].as_str().unwrap();
    assert!(message.contains("temp_file_limit"), "{body}");
    // The role cannot lift it, for itself or in its settings.
    for key in [&f.read, &f.admin] {
        assert_eq!(
            app.sql_error(key, &f.project, "SET temp_file_limit = -1")
                .await,
            "42501"
        );
        assert_eq!(
            app.sql_error(
                key,
                &f.project,
                "ALTER ROLE CURRENT_USER RESET temp_file_limit"
            )
            .await,
            "42501"
        );
    }
    // A query within the limit runs.
    let rows = app
        .rows(
            &f.read,
            &f.project,
            "SELECT count(*) AS n FROM generate_series(1, 1000) g",
        )
        .await;
    assert_eq!(rows[0]["n"], 1000);
}

#[tokio::test]
async fn one_caller_neither_sees_nor_stops_another_callers_statement() {
    let app = spawn_app().await;
    let f = app.fixture().await;
    let other_read = app.new_key(&f, "read", Some("another")).await.1;
    let admin = pg().await.client(&format!("fx_{}", f.project)).await;
    // Caller A's statement waits on a table lock the test holds, so it runs as long as needed.
    app.rows(&f.admin, &f.project, "CREATE TABLE blocker (id int)")
        .await;
    // Its own session: pg_stat_activity is read once per transaction, so `admin` stays outside.
    let holder = pg().await.client(&format!("fx_{}", f.project)).await;
    holder
        .batch_execute("BEGIN; LOCK TABLE public.blocker IN ACCESS EXCLUSIVE MODE")
        .await
        .unwrap();
    let marker = format!("marker_{}", fluxbase::secrets::random_hex::<4>());
    let a_query = format!("SELECT count(*) /* {marker} */, 'done' AS a FROM blocker");
    let a = {
        let (http, url, key, project) = (
            app.http.clone(),
            app.url("/api/execute-sql"),
            f.read.clone(),
            f.project.clone(),
        );
        tokio::spawn(async move {
            let resp = http
                .post(url)
                .bearer_auth(key)
                .json(&json!({ "projectId": project, "query": a_query }))
                .send()
                .await
                .unwrap();
            resp.json::<Value>().await.unwrap()
        })
    };
    let deadline = Instant::now() + Duration::from_secs(20);
    let pid: i32 = loop {
        let rows = admin
            .query(
                "SELECT pid FROM pg_stat_activity WHERE query LIKE '%' || $1 || '%' AND pid <> pg_backend_pid()",
                &[&marker],
            )
            .await
            .unwrap();
        if let Some(r) = rows.first() {
            break r.get(0);
        }
        assert!(
            Instant::now() < deadline,
            "caller A's statement never started"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    };
    // Caller B (another read key: the same role) looks and tries to stop it.
    for sql in [
        "SELECT pid, query FROM pg_stat_activity".to_string(),
        "SELECT pid, query FROM pg_stat_get_activity(NULL)".to_string(),
        "SELECT pg_stat_get_backend_activity(b) AS query FROM pg_stat_get_backend_idset() b"
            .to_string(),
        format!("SELECT pg_cancel_backend({pid})"),
        format!("SELECT pg_terminate_backend({pid})"),
    ] {
        let body = app.sql(&other_read, &f.project, &sql).await;
        assert!(
            !body.to_string().contains(&marker),
            "{sql} showed another caller's statement: {body}"
        );
        if body["success"] == true {
            assert!(
                !body.to_string().contains("true"),
                "{sql} reached another caller's backend: {body}"
            );
        }
    }
    holder.batch_execute("COMMIT").await.unwrap();
    let a = a.await.unwrap();
    assert_eq!(a["success"], true, "caller A was stopped: {a}");
    assert_eq!(a["result"]["rows"][0]["a"], "done");
}

#[tokio::test]
async fn start_up_applies_the_configured_temp_file_limit_and_closes_logins_of_existing_projects() {
    let app = spawn_app_with(|c| c.temp_file_limit_kb = 1024).await;
    let f = app.fixture().await;
    let read_role = format!("fx_{}_read", f.project);
    app.rows(&f.read, &f.project, "SELECT 1 AS one").await;
    let pg = pg().await;
    let admin = pg.client("postgres").await;
    let settings = |role: String| {
        let admin = &admin;
        async move {
            admin
                .query(
                    "SELECT array_to_string(setconfig, ',') FROM pg_db_role_setting s
                     JOIN pg_roles r ON r.oid = s.setrole WHERE r.rolname = $1",
                    &[&role],
                )
                .await
                .unwrap()
                .iter()
                .map(|r| r.get::<_, String>(0))
                .collect::<Vec<_>>()
        }
    };
    assert_eq!(
        settings(read_role.clone()).await,
        ["temp_file_limit=1024kB"]
    );
    // Stopped first (a graceful stop; the state a crash leaves is made by hand below), so
    // that only the next start-up can repair it.
    let mut config = app.app.config.clone();
    app.stop().await;
    // Left behind as a crash between opening and closing a login would leave it.
    admin
        .batch_execute(&format!(
            "ALTER ROLE {read_role} VALID UNTIL 'infinity'; ALTER ROLE {read_role} SET work_mem = '64kB'"
        ))
        .await
        .unwrap();
    config.temp_file_limit_kb = 64 * 1024;
    let app = crate::support::start_with(config).await;
    // Before any request: the start-up pass alone.
    assert_eq!(
        settings(read_role.clone()).await,
        ["temp_file_limit=65536kB"]
    );
    let valid: Option<String> = admin
        .query_one(
            "SELECT rolvaliduntil::text FROM pg_roles WHERE rolname = $1",
            &[&read_role],
        )
        .await
        .unwrap()
        .get(0);
    assert_eq!(valid.as_deref(), Some("-infinity"));
    let rows = app
        .rows(
            &f.read,
            &f.project,
            "SELECT current_setting('temp_file_limit') AS l, current_setting('work_mem') AS w",
        )
        .await;
    assert_eq!(rows[0], json!({ "l": "64MB", "w": "4MB" }));
    app.stop().await;
}

#[tokio::test]
async fn logins_of_one_role_wait_for_another_process_logging_in_as_it() {
    let app = spawn_app().await;
    let f = app.fixture().await;
    let role = format!("fx_{}_read", f.project);
    // Another process (a second server, a CLI command) in the middle of its login as the role,
    // on the same control database (advisory locks are per database).
    let other = pg().await.client(&app.app.cluster.control_db).await;
    other
        .execute(
            "SELECT pg_advisory_lock(hashtext('fluxbase-login:' || $1))",
            &[&role],
        )
        .await
        .unwrap();
    app.app.sql.forget_project(&f.project);
    let request = app.spawn_sql(&f.read, &f.project, "SELECT 1 AS one");
    // The server's login waits for it instead of opening and closing the role's password in
    // the middle of the other login.
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let waiting: i64 = other
            .query_one(
                "SELECT count(*) FROM pg_stat_activity
                 WHERE wait_event = 'advisory' AND pid <> pg_backend_pid()",
                &[],
            )
            .await
            .unwrap()
            .get(0);
        if waiting > 0 {
            break;
        }
        assert!(
            !request.is_finished(),
            "the login did not wait: {:?}",
            request.await
        );
        assert!(Instant::now() < deadline, "no login waited for the lock");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    other
        .execute(
            "SELECT pg_advisory_unlock(hashtext('fluxbase-login:' || $1))",
            &[&role],
        )
        .await
        .unwrap();
    let (status, body) = request.await.unwrap();
    assert_eq!(status, 200, "{body}");
    app.stop().await;
}

/// The exploit of red team rt15's C1, with `payload` as the body of the tenant's cast function:
/// a temporary type renamed `oid` after a COMMIT, so that a function of the server's resolving
/// `oid` with the temporary schema first (inside the change capture's event trigger, as the
/// superuser) runs the tenant's cast.
fn temp_oid_exploit() -> String {
    "CREATE TYPE pg_temp.x AS (v int);
     CREATE FUNCTION pg_temp.to_real(pg_temp.x) RETURNS pg_catalog.oid LANGUAGE plpgsql
       AS $f$ BEGIN RETURN ($1).v; END $f$;
     CREATE FUNCTION pg_temp.to_fake(integer) RETURNS pg_temp.x LANGUAGE plpgsql
       AS $f$ BEGIN RAISE EXCEPTION 'ran as % (superuser %)', current_user,
         (SELECT rolsuper FROM pg_catalog.pg_roles WHERE rolname = current_user); END $f$;
     CREATE CAST (integer AS pg_temp.x) WITH FUNCTION pg_temp.to_fake(integer);
     CREATE CAST (pg_temp.x AS pg_catalog.oid) WITH FUNCTION pg_temp.to_real(pg_temp.x) AS IMPLICIT;
     COMMIT;
     ALTER TYPE pg_temp.x RENAME TO oid;"
        .to_string()
}

#[tokio::test]
async fn a_tenants_temporary_types_are_never_resolved_by_the_servers_functions() {
    let app = spawn_app().await;
    let f = app.fixture().await;
    let db = format!("fx_{}", f.project);
    let su = pg().await.client(&db).await;
    // The trap is armed: the function as it was before (its search path `pg_catalog` alone,
    // `::oid` unqualified) runs the tenant's cast as the superuser.
    let fixed: String = su
        .query_one(
            "SELECT pg_catalog.pg_get_functiondef('fluxbase_cdc.message_key()'::pg_catalog.regprocedure)",
            &[],
        )
        .await
        .unwrap()
        .get(0);
    let oid: String = regex_lite_oid(&fixed);
    su.batch_execute(&format!(
        "SET fluxbase.cdc_internal = 'on';
         CREATE OR REPLACE FUNCTION fluxbase_cdc.message_key() RETURNS bytea
         LANGUAGE sql STABLE SET search_path = pg_catalog AS $$ SELECT lo_get({oid}::oid) $$"
    ))
    .await
    .unwrap();
    let body = app.sql(&f.admin, &f.project, &temp_oid_exploit()).await;
    let text = body.to_string();
    assert!(
        text.contains("ran as") && text.contains("superuser t"),
        "{body}"
    );
    // Mended as bootstrap 19 mends existing projects (their function kept, its search path
    // given pg_temp last), then as the server makes it now: the tenant's type is never looked
    // at, and the whole script runs (the session's temporary objects of the request before
    // were reset with it).
    su.batch_execute(&format!(
        "BEGIN; {} COMMIT;",
        include_str!("../../../sql/project/0019_search_paths_and_large_objects.sql")
    ))
    .await
    .unwrap();
    let body = app.sql(&f.admin, &f.project, &temp_oid_exploit()).await;
    assert_eq!(body["success"], true, "{body}");
    su.batch_execute(&format!("SET fluxbase.cdc_internal = 'on'; {fixed}"))
        .await
        .unwrap();
    let body = app.sql(&f.admin, &f.project, &temp_oid_exploit()).await;
    assert_eq!(body["success"], true, "{body}");
    // And no function of the server's searches the temporary schema before pg_catalog, nor
    // runs as its owner with the caller's search path.
    let unsafe_paths: Vec<String> = su
        .query(
            "SELECT p.oid::pg_catalog.regprocedure::text FROM pg_catalog.pg_proc p
             WHERE p.proowner = (SELECT r.oid FROM pg_catalog.pg_roles r WHERE r.rolname = current_user)
               AND p.pronamespace <> 'pg_catalog'::pg_catalog.regnamespace
               AND (EXISTS (SELECT FROM pg_catalog.unnest(p.proconfig) c
                            WHERE c LIKE 'search_path=%' AND c NOT LIKE '%pg_temp')
                    OR p.prosecdef AND NOT EXISTS (
                        SELECT FROM pg_catalog.unnest(p.proconfig) c
                        WHERE c LIKE 'search_path=%'))",
            &[],
        )
        .await
        .unwrap()
        .iter()
        .map(|r| r.get(0))
        .collect();
    assert!(unsafe_paths.is_empty(), "{unsafe_paths:?}");
    // The change stream still reads its key: a DDL still reaches a subscriber.
    let mut ws = connect(&app, "/").await;
    let ack = subscribe(&mut ws, &f.project, Some(&f.read)).await;
    assert_eq!(ack["type"], "subscribed", "{ack}");
    app.rows(&f.admin, &f.project, "CREATE TABLE after_fix (id int)")
        .await;
    let update = recv(&mut ws).await;
    assert_eq!(update["type"], "schema_update", "{update}");
    app.stop().await;
}

/// The large object's oid in `fluxbase_cdc.message_key()`'s definition.
fn regex_lite_oid(definition: &str) -> String {
    let at = definition.find("lo_get(").expect("lo_get") + "lo_get(".len();
    definition[at..]
        .chars()
        .take_while(|c| c.is_ascii_digit())
        .collect()
}

#[tokio::test]
async fn a_tenants_public_functions_never_run_in_the_servers_own_sessions() {
    let app = spawn_webhook_app().await;
    let f = app.fixture().await;
    let db = format!("fx_{}", f.project);
    // A trap in the tenant's `public`: an exact match for what the server's catalog queries
    // call (`unnest(int2[])`, `array_position`), recording any superuser that runs it.
    for q in [
        "CREATE TABLE public.loot (who text)",
        "CREATE FUNCTION public.unnest(smallint[]) RETURNS SETOF smallint LANGUAGE plpgsql AS $f$
         BEGIN
           IF (SELECT rolsuper FROM pg_catalog.pg_roles WHERE rolname = current_user) THEN
             INSERT INTO public.loot VALUES (current_user);
           END IF;
           RETURN QUERY SELECT x FROM pg_catalog.unnest($1) x;
         END $f$",
        "CREATE TABLE notes (id serial PRIMARY KEY, owner text, body text)",
        "ALTER TABLE notes ENABLE ROW LEVEL SECURITY",
        "CREATE POLICY own ON notes FOR SELECT USING (owner = auth.uid())",
    ] {
        let body = app.sql(&f.admin, &f.project, q).await;
        assert_eq!(body["success"], true, "{q}: {body}");
    }
    // Armed: a superuser session with the default search path falls into it.
    let su = pg().await.client(&db).await;
    su.batch_execute("SELECT count(*) FROM unnest('{1,2}'::int2[])")
        .await
        .unwrap();
    let caught: i64 = su
        .query_one("SELECT count(*) FROM public.loot", &[])
        .await
        .unwrap()
        .get(0);
    assert_eq!(caught, 1);
    su.batch_execute("DELETE FROM public.loot").await.unwrap();
    // The server's sessions name pg_catalog alone.
    let server = app.app.cluster.connect(&db).await.unwrap();
    let path: String = server
        .query_one("SHOW search_path", &[])
        .await
        .unwrap()
        .get(0);
    assert_eq!(path, "pg_catalog,pg_temp");

    // What runs the server's catalog queries in the project's database: a subscriber bound by
    // row-level security (the visibility catalog) and a row-ordered webhook (its row keys).
    let rx = Receiver::start().await;
    let (status, body) = app
        .call(
            "POST",
            "/api/webhooks",
            Some(&f.admin),
            Some(json!({ "projectId": f.project, "url": rx.url, "events": ["row.inserted"] })),
        )
        .await;
    assert_eq!(status, 201, "{body}");
    let mut ws = connect(&app, "/").await;
    crate::support::ws::send(
        &mut ws,
        json!({ "type": "subscribe", "roomId": room(&f.project), "token": f.read, "authUid": "alice" }),
    )
    .await;
    let ack = recv(&mut ws).await;
    assert_eq!(ack["type"], "subscribed", "{ack}");
    app.rows(
        &f.admin,
        &f.project,
        "INSERT INTO notes (owner, body) VALUES ('alice', 'mine')",
    )
    .await;
    loop {
        let m = recv(&mut ws).await;
        if m["type"] == "db_event" {
            assert_eq!(m["payload"]["record"]["body"], "mine", "{m}");
            break;
        }
    }
    let delivered = rx.wait_for(1).await;
    assert_eq!(delivered.len(), 1);
    let caught = app
        .rows(&f.admin, &f.project, "SELECT who FROM public.loot")
        .await;
    assert!(
        caught.is_empty(),
        "the server ran the tenant's function: {caught:?}"
    );
    app.stop().await;
}

#[tokio::test]
async fn large_objects_are_refused_to_every_key() {
    let app = spawn_app().await;
    let f = app.fixture().await;
    for key in [&f.read, &f.readwrite, &f.admin] {
        for q in [
            "SELECT pg_catalog.lo_from_bytea(0, 'x')",
            "SELECT lo_create(0)",
            "SELECT lo_creat(-1)",
            "SELECT lo_unlink(1)",
            "SELECT lo_put(1, 0, 'x')",
        ] {
            let body = app.sql(key, &f.project, q).await;
            assert_eq!(body["success"], false, "{q}: {body}");
            assert_eq!(body["error"]["details"], "ERROR:  42501", "{q}: {body}");
        }
    }
    // The read key's loop of rt15 (one lock per subtransaction) ends at its first call.
    let body = app
        .sql(
            &f.read,
            &f.project,
            "DO $$ BEGIN FOR i IN 1..100000 LOOP
               BEGIN PERFORM lo_unlink(lo_create(0)); EXCEPTION WHEN out_of_memory THEN EXIT; END;
             END LOOP; END $$",
        )
        .await;
    assert_eq!(body["error"]["details"], "ERROR:  42501", "{body}");
    app.stop().await;
}

/// Red team rt16 L1: the owner role installed trusted extensions into the server's schemas (a
/// trusted extension's script runs as the superuser). Refused now; its own schemas take them.
#[tokio::test]
async fn extensions_and_objects_stay_out_of_the_servers_schemas() {
    let app = spawn_app().await;
    let f = app.fixture().await;
    for q in [
        "CREATE EXTENSION pg_trgm SCHEMA pg_catalog",
        "CREATE EXTENSION citext SCHEMA auth",
        "CREATE EXTENSION ltree SCHEMA fluxbase_cdc",
        "CREATE EXTENSION tablefunc SCHEMA realtime",
    ] {
        let body = app.sql(&f.admin, &f.project, q).await;
        assert_eq!(body["success"], false, "{q}: {body}");
        assert_eq!(body["error"]["details"], "ERROR:  42501", "{q}: {body}");
    }
    // In the project's own schema it works, and cannot be moved into the server's.
    let body = app
        .sql(&f.admin, &f.project, "CREATE EXTENSION pg_trgm")
        .await;
    assert_eq!(body["success"], true, "{body}");
    let body = app
        .sql(
            &f.admin,
            &f.project,
            "ALTER EXTENSION pg_trgm SET SCHEMA realtime",
        )
        .await;
    assert_eq!(body["error"]["details"], "ERROR:  42501", "{body}");
    let rows = app
        .rows(
            &f.admin,
            &f.project,
            "SELECT n.nspname FROM pg_extension e JOIN pg_namespace n ON n.oid = e.extnamespace
             WHERE e.extname = 'pg_trgm'",
        )
        .await;
    assert_eq!(rows[0]["nspname"], "public");
    // The project's other DDL is untouched.
    app.rows(&f.admin, &f.project, "CREATE TABLE after_guard (id int)")
        .await;
    app.stop().await;
}

/// Red team rt16: a session that LISTENs and then sits idle in the pool is never read, so
/// PostgreSQL blocks sending it notifications and its place holds the cluster's one NOTIFY
/// queue (8 GB) from moving on: any key could fill it while its connection idled. The pool now
/// closes an idle connection the server spoke to within seconds (not at its idle timeout).
#[tokio::test]
async fn an_idle_pooled_session_that_listens_is_closed_once_notified() {
    let app = spawn_app_with(|c| c.sql_idle_timeout_secs = 600).await;
    let f = app.fixture().await;
    let rows = app
        .rows(
            &f.admin,
            &f.project,
            "LISTEN rt16_tail; SELECT pg_backend_pid() AS pid",
        )
        .await;
    let pid = rows[0]["pid"].as_i64().unwrap() as i32;
    let pg = pg().await;
    let superuser = pg.client("postgres").await;
    let alive = || async {
        superuser
            .query_opt("SELECT 1 FROM pg_stat_activity WHERE pid = $1", &[&pid])
            .await
            .unwrap()
            .is_some()
    };
    // Quiet, it stays pooled (its idle timeout is ten minutes).
    tokio::time::sleep(Duration::from_secs(6)).await;
    assert!(alive().await, "a quiet idle connection is kept");
    let project_db = pg.client(&format!("fx_{}", f.project)).await;
    project_db
        .batch_execute("NOTIFY rt16_tail, 'to a session nobody reads'")
        .await
        .unwrap();
    let deadline = Instant::now() + Duration::from_secs(15);
    while alive().await {
        assert!(
            Instant::now() < deadline,
            "the notified idle session {pid} is still open"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    // The project's next request gets a fresh session and answers.
    let rows = app.rows(&f.admin, &f.project, "SELECT 1 AS one").await;
    assert_eq!(rows[0]["one"], 1);
    app.stop().await;
}
