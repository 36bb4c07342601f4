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
             (SELECT File_priv FROM mysql.user WHERE User = 'fluxbase' LIMIT 1), @@tmpdir",
        )
        .await;
    assert_eq!(server[0][0].as_deref(), Some("1"), "{server:?}");
    assert!(
        server[0][1].as_deref().unwrap_or("").contains("no-files"),
        "{server:?}"
    );
    assert_eq!(server[0][2].as_deref(), Some("N"), "{server:?}");
    // Its temporary files live in its own directory, not the machine's /tmp (shared with
    // other users, and where servers installed at once collided).
    let tmpdir = server[0][3].as_deref().unwrap_or("");
    assert!(
        tmpdir.ends_with("/tmp") && tmpdir.len() > "/tmp".len(),
        "{server:?}"
    );
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

/// Session 22's red team against the binlog and its capture, from a MySQL project's admin key
/// (the strongest a tenant holds): nothing touches the log, hides or thins a change, reaches
/// the dump thread or borrows another account; afterwards the stream still captures every
/// change. Then `/api/cdc/status` of that project as anonymous, another tenant, and the read
/// scope, and with malformed ids.
#[tokio::test]
async fn a_project_admin_cannot_reach_the_binlog_or_its_capture() {
    let app = spawn_mysql_app().await;
    let a = app.mysql_fixture().await;
    let b = app.mysql_fixture().await;
    let mut sub = app.app.bus.project(&a.project).subscribe();
    app.rows(&a.admin, &a.project, "CREATE TABLE t (id int PRIMARY KEY)")
        .await;
    // The stream is running: its dump thread exists.
    crate::support::poll::until(
        Duration::from_secs(20),
        Duration::from_millis(100),
        || async {
            match app.app.cdc.status(&a.project).map(|s| s.state) {
                Some(fluxbase::cdc::StreamState::Streaming) => Ok(()),
                other => Err(format!("{other:?}")),
            }
        },
    )
    .await;
    let dumps = mariadb()
        .await
        .query("SELECT ID FROM information_schema.PROCESSLIST WHERE COMMAND LIKE 'Binlog Dump%'")
        .await;
    assert!(!dumps.is_empty(), "no binlog dump thread");
    let mut attacks: Vec<String> = vec![
        "PURGE BINARY LOGS BEFORE NOW()".into(),
        "PURGE BINARY LOGS TO 'binlog.000001'".into(),
        "FLUSH LOGS".into(),
        "FLUSH BINARY LOGS".into(),
        "RESET MASTER".into(),
        "SHOW BINARY LOGS".into(),
        "SHOW MASTER STATUS".into(),
        "SHOW BINLOG EVENTS".into(),
        "SHOW SLAVE HOSTS".into(),
        "SET sql_log_bin = 0".into(),
        "SET STATEMENT sql_log_bin = 0 FOR INSERT INTO t VALUES (100)".into(),
        "SET SESSION binlog_format = 'STATEMENT'".into(),
        "SET STATEMENT binlog_format = 'STATEMENT' FOR INSERT INTO t VALUES (101)".into(),
        "SET SESSION binlog_format = 'MIXED'".into(),
        "SET SESSION binlog_row_image = 'NOBLOB'".into(),
        "SET SESSION server_id = 7".into(),
        "SET SESSION gtid_seq_no = 1000000".into(),
        "SET GLOBAL binlog_format = 'STATEMENT'".into(),
        "SET GLOBAL binlog_row_metadata = 'MINIMAL'".into(),
        "SET GLOBAL expire_logs_days = 1".into(),
        "SET GLOBAL binlog_expire_logs_seconds = 1".into(),
        "SET GLOBAL max_binlog_size = 4096".into(),
        "SET GLOBAL log_bin_compress = ON".into(),
        "SET GLOBAL event_scheduler = ON".into(),
        // A raw binlog event replayed as a statement (BINLOG REPLAY privilege).
        "BINLOG 'AAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA'".into(),
        "SELECT * FROM mysql.gtid_slave_pos".into(),
        "SELECT * FROM mysql.user".into(),
        "SELECT * FROM mysql.proc".into(),
        "CREATE DEFINER = 'fluxbase'@'%' PROCEDURE p() SELECT 1".into(),
        "CREATE DEFINER = 'fluxbase'@'127.0.0.1' VIEW v AS SELECT 1".into(),
        format!(
            "CREATE DEFINER = 'fx_{}_admin'@'127.0.0.1' PROCEDURE p2() SELECT 1",
            b.project
        ),
        format!(
            "CREATE DEFINER = '{}'@'127.0.0.1' TRIGGER tr BEFORE INSERT ON t FOR EACH ROW SET NEW.id = NEW.id",
            app.app.mysql.replication_user()
        ),
    ];
    for id in &dumps {
        attacks.push(format!("KILL {}", id[0].as_deref().unwrap()));
        attacks.push(format!("KILL QUERY {}", id[0].as_deref().unwrap()));
    }
    for sql in &attacks {
        let body = app.sql(&a.admin, &a.project, sql).await;
        assert_ne!(body["success"], true, "the admin account ran {sql}: {body}");
    }
    // SHOW PROCESSLIST: the project's own sessions only (not the dump threads).
    let list = app
        .rows(&a.admin, &a.project, "SHOW FULL PROCESSLIST")
        .await;
    assert!(
        list.iter().all(|r| r["User"]
            .as_str()
            .unwrap()
            .starts_with(&format!("fx_{}_", a.project))),
        "{list:?}"
    );
    // Nothing was hidden from the capture: the attack rows were refused, and the next change
    // arrives in full. MariaDB lets any session mark its events `skip_replication` (replicas
    // told to filter them skip them) and set `pseudo_slave_mode` (meant for replaying
    // mysqlbinlog output, which BINLOG's privilege keeps out of reach): the capture reads such
    // events all the same, so a tenant cannot hide a change from its own webhooks that way.
    app.rows(&a.admin, &a.project, "INSERT INTO t VALUES (1)")
        .await;
    app.rows(
        &a.admin,
        &a.project,
        "SET SESSION skip_replication = 1; SET SESSION pseudo_slave_mode = 1; \
         INSERT INTO t VALUES (2)",
    )
    .await;
    app.rows(
        &a.readwrite,
        &a.project,
        "SET SESSION skip_replication = 1; INSERT INTO t VALUES (3)",
    )
    .await;
    for want in 1..=3 {
        loop {
            let e = crate::support::bus::next_event(&mut sub).await;
            let p: Value = serde_json::from_str(&e.payload).unwrap();
            if p["operation"] == "INSERT" {
                assert_eq!(p["record"], json!({ "id": want }), "{p}");
                break;
            }
        }
    }
    assert_eq!(
        app.rows(&a.read, &a.project, "SELECT count(*) AS n FROM t")
            .await,
        vec![json!({"n": 3})]
    );

    // `/api/cdc/status`: the read scope sees its project; anonymous, another tenant's keys
    // and malformed ids see nothing.
    let path = |id: &str| format!("/api/cdc/status?projectId={id}");
    let (status, body) = app
        .call("GET", &path(&a.project), Some(&a.read), None)
        .await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(body["binlog"]["present"], true, "{body}");
    let (status, _) = app.call("GET", &path(&a.project), None, None).await;
    assert_eq!(status, 401);
    for key in [&b.read, &b.admin, &b.token] {
        let (status, body) = app.call("GET", &path(&a.project), Some(key), None).await;
        assert!(status == 403 || status == 404, "{status} {body}");
        assert!(
            body.get("binlog").is_none() && body.get("stream").is_none(),
            "{body}"
        );
    }
    for bad in [
        "x".repeat(10_000),
        "%27%20OR%201%3D1--".to_string(),
        "%00".to_string(),
        String::new(),
    ] {
        let (status, body) = app.call("GET", &path(&bad), Some(&a.admin), None).await;
        assert!((400..500).contains(&status), "{status} {body}");
    }
}

/// The embedded server's root belongs to its unprivileged user (`mysql`), whom Fluxbase, as
/// root, must never lend its rights: links that user leaves in the place of the files and
/// directories Fluxbase makes there at each start (`tmp/`, `no-files/`, `port`, `init.sql`)
/// are removed, never followed, and a pid file naming another `mariadbd` stops nothing. (Before:
/// `chown tmp` gave a linked directory to the server's user, `chmod no-files` and a write of
/// `port` reached the link's target, and any live `mariadbd`/`mysqld` named in the pid file was
/// sent SIGTERM.) Only as root: without root no other user is involved.
#[tokio::test]
async fn links_left_in_the_embedded_servers_root_are_never_followed() {
    use mysql_async::prelude::Queryable;
    use std::os::unix::fs::{symlink, MetadataExt, PermissionsExt};
    let euid = std::fs::read_to_string("/proc/self/status")
        .unwrap()
        .lines()
        .find_map(|l| l.strip_prefix("Uid:"))
        .and_then(|ids| ids.split_whitespace().nth(1).map(str::to_string));
    if euid.as_deref() != Some("0") {
        eprintln!("not root: the server runs as this user, nobody else can leave links");
        return;
    }
    let base = crate::support::scratch_dir(&format!(
        "it-{}-{}",
        std::process::id(),
        crate::support::unique("links")
    ));
    // The victims: root's, where the server's user may not write.
    let victim_dir = base.join("victim-dir");
    let victim_ro = base.join("victim-ro");
    std::fs::create_dir_all(&victim_dir).unwrap();
    std::fs::create_dir_all(&victim_ro).unwrap();
    for d in [&base, &victim_dir, &victim_ro] {
        std::fs::set_permissions(d, std::fs::Permissions::from_mode(0o755)).unwrap();
    }
    let victim_file = base.join("victim-file");
    let victim_init = base.join("victim-init");
    std::fs::write(&victim_file, "precious\n").unwrap();
    std::fs::write(&victim_init, "precious\n").unwrap();
    // A process named mariadbd that is not the server (a copy of sleep).
    let fake = base.join("mariadbd");
    std::fs::copy("/bin/sleep", &fake).unwrap();
    let mut bystander = std::process::Command::new(&fake)
        .arg("300")
        .spawn()
        .unwrap();

    let root = base.join("mariadb");
    let password = fluxbase::secrets::random_base62(24);
    let start = |root: std::path::PathBuf, password: String| {
        tokio::task::spawn_blocking(move || {
            fluxbase::mysql::embedded::Server::start(
                &root,
                &password,
                crate::support::mariadb::TEST_SETTINGS,
            )
        })
    };
    let server = start(root.clone(), password.clone())
        .await
        .unwrap()
        .unwrap();
    let user = std::fs::metadata(root.join("tmp")).unwrap().uid();
    assert_ne!(user, 0, "the server runs as its own user");
    server.stop().unwrap();
    drop(server);

    // What the server's user can do to its own directory between two starts.
    std::fs::remove_dir_all(root.join("tmp")).unwrap();
    symlink(&victim_dir, root.join("tmp")).unwrap();
    std::fs::set_permissions(
        root.join("no-files"),
        std::fs::Permissions::from_mode(0o755),
    )
    .unwrap();
    std::fs::remove_dir_all(root.join("no-files")).unwrap();
    symlink(&victim_ro, root.join("no-files")).unwrap();
    let _ = std::fs::remove_file(root.join("port"));
    symlink(&victim_file, root.join("port")).unwrap();
    symlink(&victim_init, root.join("init.sql")).unwrap();
    std::fs::write(root.join("mariadbd.pid"), format!("{}\n", bystander.id())).unwrap();
    // All of them the server user's, as if it had made them.
    let gid = std::fs::metadata(&root).unwrap().gid();
    for name in ["tmp", "no-files", "port", "init.sql", "mariadbd.pid"] {
        std::os::unix::fs::lchown(root.join(name), Some(user), Some(gid)).unwrap();
    }

    let server = start(root.clone(), password).await.unwrap().unwrap();
    let meta = |p: &std::path::Path| std::fs::metadata(p).unwrap();
    for d in [&victim_dir, &victim_ro] {
        assert_eq!(meta(d).uid(), 0, "{} was given away", d.display());
        assert_eq!(
            meta(d).mode() & 0o7777,
            0o755,
            "{} changed mode",
            d.display()
        );
    }
    for f in [&victim_file, &victim_init] {
        assert_eq!(
            std::fs::read_to_string(f).unwrap(),
            "precious\n",
            "{} written",
            f.display()
        );
        assert_eq!(meta(f).uid(), 0, "{} was given away", f.display());
    }
    assert!(
        bystander.try_wait().unwrap().is_none(),
        "a process named in the pid file was stopped"
    );
    // The server made its own again, and runs on them.
    let tmp = std::fs::symlink_metadata(root.join("tmp")).unwrap();
    assert!(tmp.file_type().is_dir(), "tmp/ is a directory again");
    assert_eq!((tmp.uid(), tmp.mode() & 0o7777), (user, 0o700));
    let no_files = std::fs::symlink_metadata(root.join("no-files")).unwrap();
    assert!(no_files.file_type().is_dir());
    assert_eq!((no_files.uid(), no_files.mode() & 0o7777), (0, 0o555));
    assert!(std::fs::symlink_metadata(root.join("port"))
        .unwrap()
        .file_type()
        .is_file());
    assert_eq!(
        fluxbase::mysql::embedded::running_port(&root),
        Some(server.port)
    );
    let mut conn = mysql_async::Conn::from_url(server.admin_url())
        .await
        .unwrap();
    let tmpdir: Option<String> = conn.query_first("SELECT @@tmpdir").await.unwrap();
    assert_eq!(tmpdir.as_deref(), root.join("tmp").to_str());
    drop(conn);
    server.stop().unwrap();
    let _ = bystander.kill();
    let _ = bystander.wait();
}

/// The embedded PostgreSQL's root is its own user's (`postgres`) too: a link left as its
/// `.pwfile` (written at `initdb`, which that user can bring about by removing its data
/// directory) is replaced, never followed by root. (Before: root wrote the superuser's
/// password into the link's target and gave the target to `postgres`.)
#[tokio::test]
async fn a_link_left_in_the_embedded_clusters_root_is_never_followed() {
    use std::os::unix::fs::{symlink, MetadataExt};
    let euid = std::fs::read_to_string("/proc/self/status")
        .unwrap()
        .lines()
        .find_map(|l| l.strip_prefix("Uid:"))
        .and_then(|ids| ids.split_whitespace().nth(1).map(str::to_string));
    if euid.as_deref() != Some("0") {
        eprintln!("not root: the cluster runs as this user, nobody else can leave links");
        return;
    }
    let base = crate::support::scratch_dir(&format!(
        "it-{}-{}",
        std::process::id(),
        crate::support::unique("pglinks")
    ));
    let victim = base.join("victim");
    std::fs::write(&victim, "precious\n").unwrap();
    let root = base.join("pg");
    std::fs::create_dir_all(&root).unwrap();
    symlink(&victim, root.join(".pwfile")).unwrap();
    let password = fluxbase::secrets::random_base62(24);
    let cluster = tokio::task::spawn_blocking(move || {
        fluxbase::embedded::Cluster::start(&root, &password, &[("fsync", "off")])
    })
    .await
    .unwrap()
    .unwrap();
    assert_eq!(std::fs::read_to_string(&victim).unwrap(), "precious\n");
    assert_eq!(std::fs::metadata(&victim).unwrap().uid(), 0);
    let (client, conn) = tokio_postgres::connect(&cluster.url("postgres"), tokio_postgres::NoTls)
        .await
        .unwrap();
    tokio::spawn(conn);
    client.query_one("SELECT 1", &[]).await.unwrap();
    drop(client);
    cluster.stop().unwrap();
}

/// The red team's repros: a request changing how the server reads the rest of itself
/// (`sql_mode`, the character set) to hide XA, user locks or a password change from the
/// refusal check. Each is refused before anything runs, for every scope; the session every
/// request starts in reads SQL as the check does (utf8mb4, no NO_BACKSLASH_ESCAPES /
/// ANSI_QUOTES), and a routine that changes them (one created behind the API's back, as
/// before this check) leaves nothing changed for the statements after its CALL.
#[tokio::test]
async fn a_request_cannot_change_how_the_server_reads_it() {
    let app = spawn_mysql_app().await;
    let a = app.mysql_fixture().await;
    let b = app.mysql_fixture().await;
    app.rows(&a.admin, &a.project, "CREATE TABLE t (v text)")
        .await;
    let attacks = [
        "SET sql_mode='NO_BACKSLASH_ESCAPES'; SELECT '\\'; XA START 'fxm'; INSERT INTO t(v) \
         VALUES ('a'); XA END 'fxm'; XA PREPARE 'fxm'; SELECT '\\'",
        "SET NAMES gbk; SELECT '中\\', IS_FREE_LOCK('x') -- '",
        "SET sql_mode='ANSI_QUOTES'; SELECT \"a\\\"; XA START 'fxm'; \"",
        "SET STATEMENT sql_mode='NO_BACKSLASH_ESCAPES' FOR EXECUTE IMMEDIATE \
         'SELECT ''\\'', GET_LOCK(''x'', 0) -- '''",
        "SET CHARACTER SET gbk; SELECT '中\\', GET_LOCK('x', 0) -- '",
        "SET @@session.character_set_client = 'gbk'; SELECT '中\\', GET_LOCK('x', 0) -- '",
        "/*!99999 ' */ SELECT GET_LOCK('x', 0) -- '",
        "SELECT 1 --\u{1} '\n, GET_LOCK('x', 0) -- '",
        "SET sql_mode='NO_BACKSLASH_ESCAPES'; SELECT '\\'; SET PASSWORD = PASSWORD('x'); SELECT '\\'",
    ];
    for sql in attacks {
        for key in [&a.read, &a.readwrite, &a.admin] {
            let body = app.sql(key, &a.project, sql).await;
            assert_eq!(code(&body), 1227, "{sql}: {body}");
        }
    }
    // Nothing ran: no row, no XA branch for another tenant to list or commit, no lock held.
    assert_eq!(
        app.rows(&a.read, &a.project, "SELECT COUNT(*) AS n FROM t")
            .await,
        vec![json!({"n": 0})]
    );
    let xa = mariadb().await.query("XA RECOVER").await;
    assert!(xa.iter().all(|r| r[3].as_deref() != Some("fxm")), "{xa:?}");
    let locks = mariadb().await.query("SELECT IS_USED_LOCK('x')").await;
    assert_eq!(locks, vec![vec![None]]);
    // Another tenant's read key sees no XA (and may not ask).
    assert_eq!(
        code(&app.sql(&b.read, &b.project, "XA RECOVER").await),
        1227
    );
    // The session as every request starts it (read, not set: reading is allowed).
    let pinned = "SELECT @@session.sql_mode AS m, @@character_set_client AS c, \
                  @@collation_connection AS k";
    let row = &app.rows(&a.read, &a.project, pinned).await[0];
    let mode = row["m"].as_str().unwrap();
    assert!(
        !mode.contains("NO_BACKSLASH_ESCAPES") && !mode.contains("ANSI_QUOTES"),
        "{row}"
    );
    assert_eq!(row["c"], "utf8mb4", "{row}");
    assert_eq!(row["k"], "utf8mb4_general_ci", "{row}");
    // A routine created outside the API that changes both: MariaDB gives the caller's back
    // when it returns, so the statements after the CALL are read as checked.
    let mut conn = crate::support::mariadb::project_conn(&a.project).await;
    use fluxbase::mysql::mysql_async::prelude::Queryable;
    conn.query_drop(
        "CREATE PROCEDURE lexing() BEGIN SET sql_mode = 'NO_BACKSLASH_ESCAPES,ANSI_QUOTES'; \
         SET NAMES gbk; END",
    )
    .await
    .unwrap();
    conn.query_drop(format!(
        "GRANT EXECUTE ON PROCEDURE fx_{0}.lexing TO 'fx_{0}_readwrite'@'127.0.0.1'",
        a.project
    ))
    .await
    .unwrap();
    drop(conn);
    let body = app
        .sql(
            &a.readwrite,
            &a.project,
            &format!("CALL lexing(); {pinned}"),
        )
        .await;
    let row = &body["result"]["rows"][0];
    assert!(
        !row["m"].as_str().unwrap().contains("NO_BACKSLASH"),
        "{body}"
    );
    assert_eq!(row["c"], "utf8mb4", "{body}");
    // And the string the attack relies on is still read with its backslash escape.
    let body = app
        .sql(
            &a.readwrite,
            &a.project,
            "CALL lexing(); SELECT 'a\\'b' AS s",
        )
        .await;
    assert_eq!(body["result"]["rows"][0]["s"], "a'b", "{body}");
}

/// Red team rt4, against the session-25 check: dynamic SQL under a statement name the old
/// scanner split in two (`a€b`: MariaDB reads every non-ASCII byte as part of a name), a
/// `quoted` function name, `SET PASSWORD` as a handler's body. Each is refused for every
/// scope, and nothing of it ran: the session is still pinned, no lock is held, the read
/// account still logs in with its own password.
#[tokio::test]
async fn dynamic_sql_quoted_names_and_handler_bodies_are_refused() {
    let app = spawn_mysql_app().await;
    let a = app.mysql_fixture().await;
    let attacks = [
        "SET @v='SET sql_mode=''NO_BACKSLASH_ESCAPES'''; PREPARE a€b FROM @v; EXECUTE a€b; \
         SELECT @@sql_mode AS m",
        "SET @v='SET NAMES gbk'; PREPARE a€b FROM @v; EXECUTE a€b; SELECT 1",
        "SET @v='SET max_session_mem_used=8589934592'; PREPARE a€b FROM @v; EXECUTE a€b; \
         SELECT @@max_session_mem_used AS m",
        "SELECT `GET_LOCK`('fxm2-cross', 0) AS l",
        "BEGIN NOT ATOMIC DECLARE CONTINUE HANDLER FOR SQLSTATE '45000' SET PASSWORD = \
         PASSWORD('x'); SIGNAL SQLSTATE '45000'; END",
        // rt4 finding 5: prepared statements count against a server-wide maximum.
        "PREPARE s1 FROM 'SELECT 1'",
    ];
    for sql in attacks {
        for key in [&a.read, &a.readwrite, &a.admin] {
            let body = app.sql(key, &a.project, sql).await;
            assert_eq!(code(&body), 1227, "{sql}: {body}");
            // Checked at once (a later login refused with 1045 would repair the account).
            let changed = mariadb()
                .await
                .query(&format!(
                    "SELECT user FROM mysql.user WHERE user LIKE 'fx\\_{}\\_%' \
                     AND authentication_string = PASSWORD('x')",
                    a.project
                ))
                .await;
            assert!(changed.is_empty(), "{sql}: {changed:?}");
        }
    }
    // The admin's routine that runs whatever text its caller passes.
    let body = app
        .sql(
            &a.admin,
            &a.project,
            "CREATE PROCEDURE run(q TEXT) BEGIN SET @q=q; PREPARE a€b FROM @q; EXECUTE a€b; END",
        )
        .await;
    assert_eq!(code(&body), 1227, "{body}");
    let routines = mariadb()
        .await
        .query(&format!(
            "SELECT COUNT(*) FROM information_schema.ROUTINES WHERE ROUTINE_SCHEMA = 'fx_{}'",
            a.project
        ))
        .await;
    let before = routines[0][0].clone();
    assert_eq!(
        mariadb()
            .await
            .query("SELECT IS_USED_LOCK('fxm2-cross')")
            .await,
        vec![vec![None]]
    );
    let pinned = "SELECT @@session.sql_mode AS m, @@character_set_client AS c, \
                  @@max_session_mem_used AS k";
    let row = &app.rows(&a.read, &a.project, pinned).await[0];
    assert!(
        !row["m"].as_str().unwrap().contains("NO_BACKSLASH"),
        "{row}"
    );
    assert_eq!(row["c"], "utf8mb4", "{row}");
    assert_ne!(row["k"].to_string(), "8589934592", "{row}");
    // Parameters still run prepared (the binary protocol: no SQL text to refuse).
    let body = app
        .sql_with(&a.read, &a.project, "SELECT $1 + 1 AS n", json!([41]))
        .await;
    assert_eq!(body["result"]["rows"][0]["n"], 42, "{body}");
    assert_eq!(
        mariadb()
            .await
            .query(&format!(
                "SELECT COUNT(*) FROM information_schema.ROUTINES WHERE ROUTINE_SCHEMA = 'fx_{}'",
                a.project
            ))
            .await[0][0],
        before
    );
}
