//! What each scope's account may do on a MySQL project, and what no account reaches: another
//! project's database, the server's own tables and settings, files, other sessions.

use serde_json::json;

use crate::support::mariadb::{mariadb, spawn_mysql_app};

use crate::support::mariadb::mysql_error_code as code;

#[tokio::test]
async fn each_scope_has_exactly_its_rights() {
    let app = spawn_mysql_app().await;
    let f = app.mysql_fixture().await;
    app.rows(
        &f.admin,
        &f.project,
        "CREATE TABLE t (id int PRIMARY KEY, v text); INSERT INTO t VALUES (1, 'a')",
    )
    .await;
    let cases: &[(&str, [bool; 3])] = &[
        // (statement, [read, readwrite, admin] may run it)
        ("SELECT * FROM t", [true, true, true]),
        ("INSERT INTO t VALUES (2, 'b')", [false, true, false]),
        ("UPDATE t SET v = 'c' WHERE id = 1", [false, true, true]),
        ("DELETE FROM t WHERE id = 2", [false, false, true]),
        ("CREATE TABLE u (id int)", [false, false, true]),
        ("ALTER TABLE t ADD COLUMN w int", [false, false, true]),
        ("TRUNCATE TABLE u", [false, false, true]),
        ("DROP TABLE u", [false, false, true]),
    ];
    for (sql, allowed) in cases {
        for (i, key) in [&f.read, &f.readwrite, &f.admin].into_iter().enumerate() {
            let body = app.sql(key, &f.project, sql).await;
            let ok = body["success"] == true;
            // readwrite's INSERT ran already when admin tries the same id.
            if *sql == "INSERT INTO t VALUES (2, 'b')" && i == 2 {
                assert_eq!(code(&body), 1062, "{body}");
                continue;
            }
            assert_eq!(ok, allowed[i], "scope {i} running {sql}: {body}");
            if !ok {
                assert!(matches!(code(&body), 1142 | 1044 | 1143), "{sql}: {body}");
            }
        }
    }
    // The accounts as MariaDB holds them: bounded, no global privilege, no GRANT OPTION.
    let accounts = mariadb()
        .await
        .query(&format!(
            "SELECT User, max_user_connections, Grant_priv, Super_priv, File_priv, Process_priv \
             FROM mysql.user WHERE User LIKE 'fx\\_{}\\_%' ORDER BY User",
            f.project
        ))
        .await;
    assert_eq!(accounts.len(), 3, "{accounts:?}");
    for a in &accounts {
        assert_eq!(a[1].as_deref(), Some("8"), "{a:?}");
        assert_eq!(
            &a[2..],
            &[
                Some("N".into()),
                Some("N".into()),
                Some("N".into()),
                Some("N".into())
            ],
            "{a:?}"
        );
    }
}

#[tokio::test]
async fn no_account_reaches_another_project_or_the_servers_machinery() {
    let app = spawn_mysql_app().await;
    let a = app.mysql_fixture().await;
    let b = app.mysql_fixture().await;
    app.rows(
        &b.admin,
        &b.project,
        "CREATE TABLE secret (v text); INSERT INTO secret VALUES ('b only')",
    )
    .await;
    let other_db = format!("fx_{}", b.project);
    // A's key with B's project id: refused before any SQL runs.
    let (status, body) = app
        .call(
            "POST",
            "/api/execute-sql",
            Some(&a.admin),
            Some(json!({ "projectId": b.project, "query": "SELECT 1" })),
        )
        .await;
    assert_eq!(status, 403, "{body}");
    for sql in [
        format!("SELECT * FROM `{other_db}`.secret"),
        format!("USE `{other_db}`"),
        format!("CREATE TABLE `{other_db}`.x (i int)"),
        format!("DROP DATABASE `{other_db}`"),
        "SELECT User, Password FROM mysql.user".into(),
        "SELECT * FROM mysql.global_priv".into(),
        "SET GLOBAL max_connections = 1".into(),
        "SET GLOBAL local_infile = 1".into(),
        // What would hide a session's changes from the binlog change capture, or thin them.
        "SET SESSION sql_log_bin = 0".into(),
        "SET SESSION binlog_format = 'STATEMENT'".into(),
        "SET SESSION binlog_row_image = 'MINIMAL'".into(),
        "SET SESSION gtid_domain_id = 9".into(),
        format!(
            "GRANT SELECT ON `fx_{}`.* TO 'fx_{}_read'@'127.0.0.1'",
            a.project, b.project
        ),
        format!("SHOW GRANTS FOR 'fx_{}_admin'@'127.0.0.1'", b.project),
        "CREATE USER evil IDENTIFIED BY 'x'".into(),
        "SELECT 'x' INTO OUTFILE '/tmp/fluxbase-outfile-test'".into(),
        "SELECT LOAD_FILE('/etc/passwd') IS NOT NULL AS leaked".into(),
        "LOAD DATA LOCAL INFILE '/etc/passwd' INTO TABLE t".into(),
        "LOAD DATA INFILE '/etc/passwd' INTO TABLE t".into(),
        "SHOW BINLOG EVENTS".into(),
        "FLUSH PRIVILEGES".into(),
        "CREATE DATABASE fx_other".into(),
        "SHUTDOWN".into(),
        "INSTALL SONAME 'ha_example'".into(),
    ] {
        let body = app.sql(&a.admin, &a.project, &sql).await;
        let leaked = body["success"] == true
            && !(sql.starts_with("SELECT LOAD_FILE") && body["result"]["rows"][0]["leaked"] == 0);
        assert!(!leaked, "the admin account ran {sql}: {body}");
    }
    // Other sessions: not visible, not killable.
    let b_session = app.spawn_sql(&b.read, &b.project, "SELECT SLEEP(3)");
    tokio::time::sleep(std::time::Duration::from_millis(500)).await;
    let list = app
        .rows(
            &a.admin,
            &a.project,
            "SELECT ID, USER FROM information_schema.PROCESSLIST",
        )
        .await;
    assert!(
        list.iter().all(|r| r["USER"]
            .as_str()
            .unwrap()
            .starts_with(&format!("fx_{}_", a.project))),
        "{list:?}"
    );
    let ids = mariadb()
        .await
        .query(&format!(
            "SELECT ID FROM information_schema.PROCESSLIST WHERE USER = 'fx_{}_read'",
            b.project
        ))
        .await;
    for id in ids {
        let body = app
            .sql(
                &a.admin,
                &a.project,
                &format!("KILL {}", id[0].as_deref().unwrap()),
            )
            .await;
        assert_eq!(code(&body), 1095, "{body}");
    }
    let (status, body) = b_session.await.unwrap();
    assert_eq!(status, 200);
    assert!(body.contains("\"success\":true"), "{body}");
    assert!(!std::path::Path::new("/tmp/fluxbase-outfile-test").exists());
    // B's data is as it was.
    assert_eq!(
        app.rows(&b.read, &b.project, "SELECT v FROM secret").await,
        vec![json!({"v": "b only"})]
    );
}

#[tokio::test]
async fn suspension_and_deletion_close_the_accounts() {
    let app = spawn_mysql_app().await;
    let f = app.mysql_fixture().await;
    app.rows(&f.admin, &f.project, "CREATE TABLE t (i int)")
        .await;
    app.app
        .set_project_status(&f.project, fluxbase::projects::ProjectStatus::Suspended)
        .await
        .unwrap();
    let (status, body) = app
        .call(
            "POST",
            "/api/execute-sql",
            Some(&f.read),
            Some(json!({ "projectId": f.project, "query": "SELECT 1" })),
        )
        .await;
    assert_eq!(status, 403, "{body}");
    assert_eq!(body["error"]["code"], "PROJECT_SUSPENDED");
    let locked = mariadb().await.query(&format!("SELECT count(*) FROM mysql.global_priv WHERE User LIKE 'fx\\_{}\\_%' AND JSON_VALUE(Priv, '$.account_locked') IN ('1', 'true')", f.project)).await;
    assert_eq!(locked[0][0].as_deref(), Some("3"));
    app.app
        .set_project_status(&f.project, fluxbase::projects::ProjectStatus::Active)
        .await
        .unwrap();
    assert_eq!(
        app.rows(&f.read, &f.project, "SELECT count(*) AS n FROM t")
            .await,
        vec![json!({"n": 0})]
    );
    app.delete_project(&f.project, &f.token).await;
    let left = mariadb().await.query(&format!("SELECT (SELECT count(*) FROM mysql.user WHERE User LIKE 'fx\\_{0}\\_%'), (SELECT count(*) FROM information_schema.SCHEMATA WHERE SCHEMA_NAME = 'fx_{0}')", f.project)).await;
    assert_eq!(left, vec![vec![Some("0".into()), Some("0".into())]]);
}

#[tokio::test]
async fn rls_endpoints_name_the_engine() {
    let app = spawn_mysql_app().await;
    let f = app.mysql_fixture().await;
    let (status, body) = app
        .call(
            "GET",
            &format!("/api/rls/policies?projectId={}", f.project),
            Some(&f.admin),
            None,
        )
        .await;
    assert_eq!(status, 400, "{body}");
    assert!(
        body["error"]["message"].as_str().unwrap().contains("MySQL"),
        "{body}"
    );
    let (status, body) = app
        .call(
            "POST",
            "/api/execute-sql",
            Some(&f.read),
            Some(json!({ "projectId": f.project, "query": "SELECT 1", "authUid": "u1" })),
        )
        .await;
    assert_eq!(status, 400, "{body}");
    assert!(
        body["error"]["message"].as_str().unwrap().contains("MySQL"),
        "{body}"
    );
}

/// The replication account reads the binlog and nothing else.
#[tokio::test]
async fn the_replication_account_reads_the_binlog_and_nothing_else() {
    use mysql_async::prelude::Queryable;
    let app = spawn_mysql_app().await;
    let f = app.mysql_fixture().await;
    app.rows(
        &f.admin,
        &f.project,
        "CREATE TABLE t (i int); INSERT INTO t VALUES (1)",
    )
    .await;
    let opts = app.app.mysql.replication_opts().await.unwrap();
    assert_eq!(opts.user(), Some(app.app.mysql.replication_user().as_str()));
    let mut conn = mysql_async::Conn::new(opts).await.unwrap();
    let status: Vec<mysql_async::Row> = conn.query("SHOW BINLOG STATUS").await.unwrap();
    assert_eq!(status.len(), 1, "the binlog is on");
    for sql in [
        format!("SELECT * FROM fx_{}.t", f.project),
        "SELECT * FROM mysql.user".to_string(),
        "CREATE DATABASE repl_made".to_string(),
        "SET GLOBAL binlog_format = 'STATEMENT'".to_string(),
    ] {
        assert!(
            conn.query_drop(&sql).await.is_err(),
            "the replication account ran {sql}"
        );
    }
    let _ = conn.disconnect().await;
}

/// Realtime `authUid` on a MySQL project (a token minted for an end user, a subscribe naming
/// one) is refused naming the engine, as on `/api/execute-sql`: without row-level security
/// that subscriber would receive every user's rows. Without authUid both still work.
#[tokio::test]
async fn realtime_auth_uid_is_refused_naming_the_engine() {
    use crate::support::ws::{connect, recv, send};
    let app = spawn_mysql_app().await;
    let f = app.mysql_fixture().await;
    for key in [&f.read, &f.admin] {
        let (status, body) = app
            .call(
                "POST",
                "/api/realtime/token",
                Some(key),
                Some(json!({ "projectId": f.project, "authUid": "alice" })),
            )
            .await;
        assert_eq!(status, 400, "{body}");
        assert!(
            body["error"]["message"].as_str().unwrap().contains("MySQL"),
            "{body}"
        );
    }
    let (status, body) = app
        .call(
            "POST",
            "/api/realtime/token",
            Some(&f.read),
            Some(json!({ "projectId": f.project })),
        )
        .await;
    assert_eq!(status, 200, "{body}");
    let token = body["token"].as_str().unwrap().to_string();
    let room = format!("project_{}", f.project);
    for (credential, uid) in [(&f.read, true), (&token, true), (&token, false)] {
        let mut ws = connect(&app, "/").await;
        let mut msg = json!({ "type": "subscribe", "roomId": room, "token": credential });
        if uid {
            msg["authUid"] = json!("alice");
        }
        send(&mut ws, msg).await;
        let answer = recv(&mut ws).await;
        if uid {
            assert_eq!(answer["type"], "error", "{answer}");
            assert_eq!(answer["code"], "BAD_MESSAGE", "{answer}");
            assert!(answer.to_string().contains("MySQL"), "{answer}");
        } else {
            assert_eq!(answer["type"], "subscribed", "{answer}");
        }
    }
}

/// An admin key's table never lives in the server's RAM: `ENGINE=MEMORY` is refused (the
/// server enforces InnoDB), and the session settings that size memory (max_heap_table_size,
/// tmp_table_size, max_session_mem_used, the engine settings) cannot be changed.
#[tokio::test]
async fn memory_tables_are_refused_and_session_memory_stays_bounded() {
    let app = spawn_mysql_app().await;
    let f = app.mysql_fixture().await;
    for sql in [
        "CREATE TABLE heap (v text) ENGINE=MEMORY",
        "CREATE TABLE heap2 (v text) ENGINE = HEAP",
    ] {
        let body = app.sql(&f.admin, &f.project, sql).await;
        assert_ne!(code(&body), 0, "{sql}: {body}");
    }
    app.rows(&f.admin, &f.project, "CREATE TABLE t (v text)")
        .await;
    let body = app
        .sql(&f.admin, &f.project, "ALTER TABLE t ENGINE=MEMORY")
        .await;
    assert_ne!(code(&body), 0, "{body}");
    let engines = mariadb()
        .await
        .query(&format!(
            "SELECT ENGINE FROM information_schema.TABLES WHERE TABLE_SCHEMA = 'fx_{}' \
             AND TABLE_NAME IN ('heap', 'heap2', 't')",
            f.project
        ))
        .await;
    assert!(
        engines.iter().all(|r| r[0].as_deref() == Some("InnoDB")),
        "{engines:?}"
    );
    for sql in [
        "SET SESSION max_heap_table_size = 134217728",
        "SET tmp_table_size = 1073741824",
        "SET @@session.max_session_mem_used = 0",
        "SET enforce_storage_engine = NULL",
        "SET STATEMENT max_heap_table_size = 134217728 FOR CREATE TABLE h (v text) ENGINE=MEMORY",
    ] {
        let body = app.sql(&f.admin, &f.project, sql).await;
        assert_eq!(code(&body), 1227, "{sql}: {body}");
    }
    // The session's bound is the server's.
    let row = &app
        .rows(
            &f.read,
            &f.project,
            "SELECT @@session.max_session_mem_used AS m, @@session.enforce_storage_engine AS e",
        )
        .await[0];
    assert_eq!(row["e"], "InnoDB", "{row}");
    assert_eq!(row["m"], 536870912, "{row}");
}

/// Red team rt14: the accounts' grant named the database `fx_<id>` unescaped, and in a MySQL
/// grant `_` matches any character: the admin key could create `fxZ<id>`, every scope used it,
/// and deleting the project left it and its rows behind. Now the grant is the name itself;
/// a database made under the old grant (here by hand) is out of the accounts' reach and goes
/// with the project.
#[tokio::test]
async fn the_grant_names_the_projects_database_alone_and_strays_go_with_the_project() {
    let app = spawn_mysql_app().await;
    let f = app.mysql_fixture().await;
    let stray = format!("fxZ{}", f.project);
    for key in [&f.admin, &f.readwrite, &f.read] {
        let body = app
            .sql(key, &f.project, &format!("CREATE DATABASE `{stray}`"))
            .await;
        assert_eq!(body["success"], false, "{body}");
        assert_eq!(code(&body), 1044, "{body}");
    }
    let grants = mariadb()
        .await
        .query(&format!(
            "SHOW GRANTS FOR 'fx_{}_read'@'127.0.0.1'",
            f.project
        ))
        .await;
    let grants = format!("{grants:?}");
    assert!(
        grants.contains(&format!("`fx\\\\_{}`", f.project)),
        "{grants}"
    );
    let root = mariadb().await;
    root.query(&format!(
        "CREATE DATABASE `{stray}`; CREATE TABLE `{stray}`.t (v text); \
         INSERT INTO `{stray}`.t VALUES ('left behind')"
    ))
    .await;
    for key in [&f.admin, &f.readwrite, &f.read] {
        let body = app
            .sql(key, &f.project, &format!("SELECT * FROM `{stray}`.t"))
            .await;
        assert_eq!(body["success"], false, "{body}");
    }
    app.delete_project(&f.project, &f.admin).await;
    let left = root
        .query(&format!("SHOW DATABASES LIKE '%{}'", f.project))
        .await;
    assert!(left.is_empty(), "{left:?}");
}
