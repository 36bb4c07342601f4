//! The red team's findings on MySQL projects (issue 20), each as its attack: the broadcast
//! procedure no longer runs anything as the server's account, XA and password statements are
//! refused before they run, a locked-out account is repaired, a read-key socket gets row
//! events, the server's account reads no file.

use std::time::Duration;

use serde_json::{json, Value};

use crate::support::mariadb::{mariadb, spawn_mysql_app};
use crate::support::ws::{connect, recv, send};

use crate::support::mariadb::mysql_error_code as code;

/// The attack: the project's admin replaces `fluxbase_broadcasts` with a view WITH CHECK
/// OPTION whose predicate is an oracle, then calls the procedure. The predicate must run as
/// the caller: `CURRENT_USER()` is the project's account, `LOAD_FILE` gives NULL, another
/// project's table is out of reach. Provisioning then puts the real table back.
#[tokio::test]
async fn the_broadcast_procedure_runs_nothing_as_the_servers_account() {
    let app = spawn_mysql_app().await;
    let a = app.mysql_fixture().await;
    let b = app.mysql_fixture().await;
    app.rows(
        &b.admin,
        &b.project,
        "CREATE TABLE secret (v text); INSERT INTO secret VALUES ('b only')",
    )
    .await;
    app.rows(
        &a.admin,
        &a.project,
        "CREATE TABLE spy (id BIGINT UNSIGNED AUTO_INCREMENT PRIMARY KEY, event VARCHAR(255), \
         payload LONGTEXT); DROP TABLE fluxbase_broadcasts",
    )
    .await;
    let view = |predicate: &str| {
        format!(
            "CREATE OR REPLACE SQL SECURITY INVOKER VIEW fluxbase_broadcasts AS \
             SELECT id, event, payload FROM spy WHERE {predicate} WITH CHECK OPTION"
        )
    };
    let call = "CALL fluxbase_realtime_broadcast('e', '{}')";
    // Each predicate held only as the server's account (another project's table cannot even
    // be named in a view by this admin: 1356 at CREATE VIEW): now the CALL fails its check.
    for (predicate, as_server) in [
        (
            "CURRENT_USER() LIKE 'fluxbase@%'".to_string(),
            "current user",
        ),
        (
            "LOAD_FILE('/etc/passwd') IS NOT NULL".to_string(),
            "load_file",
        ),
        (
            "(SELECT COUNT(*) FROM information_schema.SCHEMATA) > 2".to_string(),
            "other databases",
        ),
    ] {
        app.rows(&a.admin, &a.project, &view(&predicate)).await;
        for key in [&a.admin, &a.readwrite] {
            let body = app.sql(key, &a.project, call).await;
            assert_eq!(code(&body), 1369, "{as_server}: the predicate held: {body}");
        }
    }
    let other = view(&format!(
        "(SELECT COUNT(*) FROM `fx_{}`.secret) > 0",
        b.project
    ));
    let body = app.sql(&a.admin, &a.project, &other).await;
    assert!(matches!(code(&body), 1356 | 1142), "{body}");
    // As the caller, it is the caller's account that the predicate sees.
    app.rows(
        &a.admin,
        &a.project,
        &view(&format!(
            "CURRENT_USER() = 'fx_{}_admin@127.0.0.1'",
            a.project
        )),
    )
    .await;
    let body = app.sql(&a.admin, &a.project, call).await;
    assert_eq!(code(&body), 0, "{body}");
    // The admin making the procedure a DEFINER one gains its own rights only.
    app.rows(
        &a.admin,
        &a.project,
        "ALTER PROCEDURE fluxbase_realtime_broadcast SQL SECURITY DEFINER",
    )
    .await;
    let body = app.sql(&a.readwrite, &a.project, call).await;
    assert_eq!(
        code(&body),
        0,
        "runs as the project's admin (the definer): {body}"
    );
    app.rows(
        &a.admin,
        &a.project,
        &view("CURRENT_USER() LIKE 'fluxbase@%'"),
    )
    .await;
    let body = app.sql(&a.readwrite, &a.project, call).await;
    assert_ne!(code(&body), 0, "{body}");
    // Provisioning (every start-up) repairs: the view is gone, the table and procedure back.
    let db = format!("fx_{}", a.project);
    app.app.mysql.provision(&a.project, &db).await.unwrap();
    let kind = mariadb()
        .await
        .query(&format!(
            "SELECT TABLE_TYPE, ENGINE FROM information_schema.TABLES \
             WHERE TABLE_SCHEMA = '{db}' AND TABLE_NAME = 'fluxbase_broadcasts'"
        ))
        .await;
    assert_eq!(
        kind,
        vec![vec![Some("BASE TABLE".into()), Some("InnoDB".into())]]
    );
    let mut sub = app.app.bus.project(&a.project).subscribe();
    let body = app.sql(&a.readwrite, &a.project, call).await;
    assert_eq!(code(&body), 0, "{body}");
    // Events of the attack may still be on their way: the broadcast is the next broadcast.
    loop {
        let e = crate::support::bus::next_event(&mut sub).await;
        if !matches!(e.kind, fluxbase::bus::EventKind::Broadcast { .. }) {
            continue;
        }
        assert_eq!(
            e.kind,
            fluxbase::bus::EventKind::Broadcast { event: "e".into() }
        );
        break;
    }
    // The procedure as provisioned: defined by the project admin, run as its caller.
    let routine = mariadb()
        .await
        .query(&format!(
            "SELECT DEFINER, SECURITY_TYPE FROM information_schema.ROUTINES \
             WHERE ROUTINE_SCHEMA = 'fx_{}' AND ROUTINE_NAME = 'fluxbase_realtime_broadcast'",
            a.project
        ))
        .await;
    assert_eq!(
        routine,
        vec![vec![
            Some(format!("fx_{}_admin@127.0.0.1", a.project)),
            Some("INVOKER".into())
        ]]
    );
    // Read still cannot broadcast.
    let body = app.sql(&a.read, &a.project, call).await;
    assert_ne!(code(&body), 0, "{body}");
    // The server's own account reads no file either.
    let server = mariadb()
        .await
        .query(
            "SELECT LOAD_FILE('/etc/passwd') IS NULL, @@secure_file_priv, \
             (SELECT File_priv FROM mysql.user WHERE User = 'fluxbase' LIMIT 1)",
        )
        .await;
    assert_eq!(server[0][0].as_deref(), Some("1"), "{server:?}");
    assert!(
        server[0][1].as_deref().unwrap_or("").contains("no-files"),
        "{server:?}"
    );
    assert_eq!(server[0][2].as_deref(), Some("N"), "{server:?}");
}

/// XA statements and user locks never run (their names are server-wide), in any form; a session left inside a
/// transaction is never pooled again.
#[tokio::test]
async fn xa_is_refused_before_anything_runs_and_open_transactions_are_not_pooled() {
    let app = spawn_mysql_app().await;
    let a = app.mysql_fixture().await;
    app.rows(&a.admin, &a.project, "CREATE TABLE t (i int PRIMARY KEY)")
        .await;
    for sql in [
        "INSERT INTO t VALUES (1); XA START 'fx'",
        "XA START 'fx'; INSERT INTO t VALUES (1); XA END 'fx'; XA PREPARE 'fx'",
        "XA RECOVER",
        "XA COMMIT 'someone-elses'",
        "SELECT GET_LOCK('fx', 0)",
        "/*!XA RECOVER*/",
        "SET STATEMENT max_statement_time = 1 FOR XA RECOVER",
        "EXECUTE IMMEDIATE 'XA RECOVER'",
        "SET @q = 'XA RECOVER'; PREPARE s FROM @q; EXECUTE s",
    ] {
        for key in [&a.read, &a.readwrite, &a.admin] {
            let body = app.sql(key, &a.project, sql).await;
            assert_eq!(code(&body), 1227, "{sql}: {body}");
        }
    }
    let body = app.sql(&a.admin, &a.project, "XA RECOVER").await;
    assert!(
        body["error"]["message"].as_str().unwrap().contains("XA"),
        "{body}"
    );
    // Nothing of a refused script ran.
    assert_eq!(
        app.rows(&a.read, &a.project, "SELECT COUNT(*) AS n FROM t")
            .await,
        vec![json!({"n": 0})]
    );
    // The server holds no XA branch of this test's.
    let xa = mariadb().await.query("XA RECOVER").await;
    assert!(xa.iter().all(|r| r[3].as_deref() != Some("fx")), "{xa:?}");
    // A session that leaves a transaction open is closed, not pooled (where the reset would
    // end it); one that ends clean stays.
    let id = |body: &Value| body["result"]["rows"][0]["id"].as_u64().unwrap();
    let clean = id(&app
        .sql(&a.readwrite, &a.project, "SELECT CONNECTION_ID() AS id")
        .await);
    let open = app
        .sql(
            &a.readwrite,
            &a.project,
            "START TRANSACTION; INSERT INTO t VALUES (5); SELECT CONNECTION_ID() AS id",
        )
        .await;
    let first = id(&open);
    tokio::time::sleep(Duration::from_millis(300)).await;
    let alive = mariadb()
        .await
        .query(&format!(
            "SELECT ID FROM information_schema.PROCESSLIST WHERE ID = {first}"
        ))
        .await;
    assert!(alive.is_empty(), "{alive:?}");
    if clean != first {
        let kept = mariadb()
            .await
            .query(&format!(
                "SELECT ID FROM information_schema.PROCESSLIST WHERE ID = {clean}"
            ))
            .await;
        assert_eq!(kept.len(), 1, "the clean session was closed");
    }
    // Its write was never committed.
    assert_eq!(
        app.rows(&a.read, &a.project, "SELECT COUNT(*) AS n FROM t")
            .await,
        vec![json!({"n": 0})]
    );
}

/// No scope can change its own password; an account whose password changed behind Fluxbase's
/// back is provisioned again at its next refused login, and the request succeeds.
#[tokio::test]
async fn password_changes_are_refused_and_a_locked_out_account_is_repaired() {
    let app = spawn_mysql_app().await;
    let a = app.mysql_fixture().await;
    for sql in [
        "SET PASSWORD = PASSWORD('x')",
        "SET PASSWORD FOR CURRENT_USER() = PASSWORD('x')",
        "ALTER USER CURRENT_USER() IDENTIFIED BY 'x'",
        "EXECUTE IMMEDIATE 'SET PASSWORD = PASSWORD(''x'')'",
    ] {
        for key in [&a.read, &a.readwrite, &a.admin] {
            let body = app.sql(key, &a.project, sql).await;
            assert_eq!(code(&body), 1227, "{sql}: {body}");
        }
    }
    for key in [&a.read, &a.readwrite, &a.admin] {
        let body = app.sql(key, &a.project, "SELECT 1 AS one").await;
        assert_eq!(code(&body), 0, "{body}");
    }
    // Behind Fluxbase's back (as a routine of the admin could): every account of the project
    // gets another password and loses its sessions.
    let maria = mariadb().await;
    for scope in ["read", "readwrite", "admin"] {
        maria
            .query(&format!(
                "SET PASSWORD FOR 'fx_{}_{scope}'@'127.0.0.1' = PASSWORD('changed')",
                a.project
            ))
            .await;
    }
    let ids = maria
        .query(&format!(
            "SELECT ID FROM information_schema.PROCESSLIST WHERE USER LIKE 'fx\\_{}\\_%'",
            a.project
        ))
        .await;
    for id in ids {
        let _ = maria
            .query(&format!("KILL CONNECTION {}", id[0].as_deref().unwrap()))
            .await;
    }
    for key in [&a.read, &a.readwrite, &a.admin] {
        // A pooled session killed underneath answers 503 once (the pool is dropped); the
        // next login is refused (1045), repaired, and succeeds.
        let mut answered = None;
        for _ in 0..3 {
            let (status, body) = app
                .call(
                    "POST",
                    "/api/execute-sql",
                    Some(key),
                    Some(json!({ "projectId": a.project, "query": "SELECT 1 AS one" })),
                )
                .await;
            if status == 200 {
                answered = Some(body);
                break;
            }
            assert_eq!(status, 503, "{body}");
        }
        let body = answered.expect("the account was repaired");
        assert_eq!(body["result"]["rows"], json!([{"one": 1}]), "{body}");
    }
}

/// A socket with the read key (no RLS on MySQL: every scope sees every row change of its
/// project) gets the row events.
#[tokio::test]
async fn a_read_key_socket_gets_row_events_of_a_mysql_project() {
    let app = spawn_mysql_app().await;
    let a = app.mysql_fixture().await;
    app.rows(
        &a.admin,
        &a.project,
        "CREATE TABLE todo (id int PRIMARY KEY, title text)",
    )
    .await;
    let mut sockets = Vec::new();
    for key in [&a.read, &a.readwrite] {
        let mut ws = connect(&app, "/").await;
        send(
            &mut ws,
            json!({ "type": "subscribe", "roomId": format!("project_{}", a.project), "token": key }),
        )
        .await;
        let ack = recv(&mut ws).await;
        assert_eq!(ack["type"], "subscribed", "{ack}");
        sockets.push(ws);
    }
    app.rows(
        &a.readwrite,
        &a.project,
        "INSERT INTO todo VALUES (1, 'hi')",
    )
    .await;
    for ws in sockets.iter_mut() {
        loop {
            let m = recv(ws).await;
            if m["type"] == "schema_update" {
                continue;
            }
            assert_eq!(m["type"], "db_event", "{m}");
            assert_eq!(
                m["payload"]["record"],
                json!({"id": 1, "title": "hi"}),
                "{m}"
            );
            break;
        }
    }
}
