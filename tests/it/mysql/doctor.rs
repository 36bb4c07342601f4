//! `fluxbase doctor` on an operator's MySQL server: binlog settings and the admin account's
//! privileges, each problem with its fix.

use mysql_async::prelude::Queryable;

use crate::support::cluster::{scratch_dir, unique};
use crate::support::mariadb::{mariadb, TEST_SETTINGS};

#[tokio::test]
async fn a_well_configured_server_passes_and_a_weak_admin_is_named() {
    let db = mariadb().await;
    let findings = fluxbase::mysql::doctor::check(&db.admin_url, "fluxbase_repl_none")
        .await
        .unwrap();
    let text: Vec<String> = findings
        .iter()
        .map(|f| format!("{} / {}", f.problem, f.fix))
        .collect();
    assert!(findings.is_empty(), "{text:?}");

    let user = unique("weak");
    let mut admin = db.admin().await;
    admin
        .query_drop(format!("CREATE USER '{user}'@'127.0.0.1' IDENTIFIED BY 'pw'; GRANT SELECT ON *.* TO '{user}'@'127.0.0.1'"))
        .await
        .unwrap();
    let url = format!("mysql://{user}:pw@127.0.0.1:{}/", db.server.port);
    let findings = fluxbase::mysql::doctor::check(&url, "fluxbase_repl_none")
        .await
        .unwrap();
    assert_eq!(
        findings.len(),
        1,
        "{:?}",
        findings.iter().map(|f| &f.problem).collect::<Vec<_>>()
    );
    assert!(findings[0].problem.contains("CREATE USER") && findings[0].problem.contains(&user));
    assert!(findings[0].fix.starts_with("GRANT ALL PRIVILEGES ON *.*"));
    let findings = fluxbase::mysql::doctor::check(
        &format!("mysql://{user}:wrong@127.0.0.1:{}/", db.server.port),
        "x",
    )
    .await
    .unwrap();
    assert!(
        findings[0].problem.contains("cannot connect"),
        "{}",
        findings[0].problem
    );
    admin
        .query_drop(format!("DROP USER '{user}'@'127.0.0.1'"))
        .await
        .unwrap();
}

#[tokio::test]
async fn binlog_settings_change_capture_cannot_use_are_reported_with_their_fix() {
    let root = scratch_dir(&format!("it-{}-{}", std::process::id(), unique("mdb")));
    let password = fluxbase::secrets::random_base62(24);
    let mut settings = TEST_SETTINGS.to_vec();
    settings.extend([
        ("binlog-format", "STATEMENT"),
        ("binlog-row-image", "MINIMAL"),
        ("binlog-row-metadata", "MINIMAL"),
        ("binlog-expire-logs-seconds", "0"),
    ]);
    let server = tokio::task::spawn_blocking(move || {
        fluxbase::mysql::embedded::Server::start(&root, &password, &settings)
    })
    .await
    .unwrap()
    .unwrap();
    let findings = fluxbase::mysql::doctor::check(&server.admin_url(), "x")
        .await
        .unwrap();
    let problems: Vec<&str> = findings.iter().map(|f| f.problem.as_str()).collect();
    for want in [
        "binlog_format is STATEMENT",
        "binlog_row_image is MINIMAL",
        "binlog_row_metadata is MINIMAL",
        "never expire",
    ] {
        assert!(
            problems.iter().any(|p| p.contains(want)),
            "{want} not in {problems:?}"
        );
    }
    assert!(findings.iter().all(|f| !f.fix.is_empty()));
    assert!(findings
        .iter()
        .any(|f| f.fix.contains("binlog_format = 'ROW'")));
    tokio::task::spawn_blocking(move || server.stop())
        .await
        .unwrap()
        .unwrap();
}

/// Statements as the server's root account (unix socket authentication: the test runs as root).
fn as_root(server: &fluxbase::mysql::embedded::Server, sql: &str) {
    let socket = server.data_dir().parent().unwrap().join("mariadbd.sock");
    let out = std::process::Command::new("mariadb")
        .arg(format!("--socket={}", socket.display()))
        .args(["-u", "root", "-e", sql])
        .output()
        .expect("running the mariadb client");
    assert!(
        out.status.success(),
        "{sql}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

#[tokio::test]
async fn files_reachable_from_sql_and_routines_refused_to_project_admins_are_reported() {
    let root = scratch_dir(&format!("it-{}-{}", std::process::id(), unique("mdb")));
    let password = fluxbase::secrets::random_base62(24);
    let mut settings = TEST_SETTINGS.to_vec();
    settings.extend([
        // Every file the server's user can reach.
        ("secure-file-priv", "/"),
        ("log-bin-trust-function-creators", "0"),
    ]);
    let server = tokio::task::spawn_blocking(move || {
        fluxbase::mysql::embedded::Server::start(&root, &password, &settings)
    })
    .await
    .unwrap()
    .unwrap();
    // The server's account and a project's admin account with FILE.
    as_root(
        &server,
        "GRANT FILE ON *.* TO 'fluxbase'@'127.0.0.1'; \
         CREATE USER 'fx_0123456789abcdef_admin'@'127.0.0.1' IDENTIFIED BY 'pw'; \
         GRANT FILE ON *.* TO 'fx_0123456789abcdef_admin'@'127.0.0.1'; \
         SET GLOBAL enforce_storage_engine = NULL",
    );
    let url = server.admin_url();
    let findings = fluxbase::mysql::doctor::check(&url, "x").await.unwrap();
    let text: Vec<String> = findings
        .iter()
        .map(|f| format!("{} / {}", f.problem, f.fix))
        .collect();
    for (problem, fix) in [
        (
            "secure_file_priv is \"/\"",
            "secure_file_priv to an empty directory",
        ),
        (
            "log_bin_trust_function_creators is off",
            "SET GLOBAL log_bin_trust_function_creators = 1",
        ),
        (
            "enforce_storage_engine is unset",
            "SET GLOBAL enforce_storage_engine = 'InnoDB'",
        ),
        (
            "'fluxbase'@'127.0.0.1' has FILE",
            "REVOKE FILE ON *.* FROM 'fluxbase'@'127.0.0.1'",
        ),
        (
            "'fx_0123456789abcdef_admin'@'127.0.0.1' has FILE",
            "REVOKE FILE ON *.* FROM 'fx_0123456789abcdef_admin'@'127.0.0.1'",
        ),
    ] {
        assert!(
            findings
                .iter()
                .any(|f| f.problem.contains(problem) && f.fix.contains(fix)),
            "{problem} / {fix} not in {text:#?}"
        );
    }
    // The fixes that apply to a running server clear their findings.
    as_root(
        &server,
        "SET GLOBAL log_bin_trust_function_creators = 1; \
         SET GLOBAL enforce_storage_engine = 'InnoDB'; \
         REVOKE FILE ON *.* FROM 'fluxbase'@'127.0.0.1'; \
         REVOKE FILE ON *.* FROM 'fx_0123456789abcdef_admin'@'127.0.0.1'",
    );
    let findings = fluxbase::mysql::doctor::check(&url, "x").await.unwrap();
    let problems: Vec<&str> = findings.iter().map(|f| f.problem.as_str()).collect();
    assert_eq!(
        problems,
        vec![findings
            .iter()
            .find(|f| f.problem.contains("secure_file_priv"))
            .map_or("secure_file_priv missing", |f| f.problem.as_str())],
        "only secure_file_priv (a restart's fix) is left"
    );
    tokio::task::spawn_blocking(move || server.stop())
        .await
        .unwrap()
        .unwrap();
}

/// Red team rt4's gap: stored programs a project made before the refusals existed (here made
/// directly, as they were then) are found by `fluxbase doctor` with the DROP to apply; a
/// harmless one is not named.
#[tokio::test]
async fn stored_programs_running_refused_sql_are_reported() {
    let app = crate::support::mariadb::spawn_mysql_app().await;
    let f = app.mysql_fixture().await;
    let mut conn = crate::support::mariadb::project_conn(&f.project).await;
    for sql in [
        "CREATE TABLE t (id int)",
        "CREATE PROCEDURE run(q TEXT) BEGIN SET @q = q; PREPARE a€b FROM @q; EXECUTE a€b; END",
        "CREATE PROCEDURE pw() BEGIN DECLARE CONTINUE HANDLER FOR SQLSTATE '45000' \
         SET PASSWORD = PASSWORD('x'); SIGNAL SQLSTATE '45000'; END",
        "CREATE TRIGGER tr BEFORE INSERT ON t FOR EACH ROW SET @l = `GET_LOCK`('x', 0)",
        "CREATE FUNCTION fine(a int) RETURNS int DETERMINISTIC RETURN a + 1",
    ] {
        conn.query_drop(sql).await.unwrap();
    }
    drop(conn);
    let db = mariadb().await;
    let findings = fluxbase::mysql::doctor::refused_programs(&db.admin_url)
        .await
        .unwrap();
    let schema = format!("fx_{}", f.project);
    let all: Vec<(String, String)> = findings.into_iter().map(|x| (x.problem, x.fix)).collect();
    let mine: Vec<&(String, String)> = all
        .iter()
        .filter(|(p, _)| p.contains(&format!("{schema}.")))
        .collect();
    assert_eq!(mine.len(), 3, "{all:?}");
    assert!(
        mine[0].0.starts_with(&format!("procedure {schema}.pw")),
        "{mine:?}"
    );
    assert!(mine[0].0.contains("SET PASSWORD"), "{mine:?}");
    assert!(
        mine[1].0.starts_with(&format!("procedure {schema}.run")),
        "{mine:?}"
    );
    assert!(mine[1].0.contains("dynamic SQL"), "{mine:?}");
    assert_eq!(mine[1].1, format!("DROP PROCEDURE `{schema}`.`run`;"));
    assert!(
        mine[2].0.starts_with(&format!("trigger {schema}.tr")),
        "{mine:?}"
    );
    assert!(mine[2].0.contains("GET_LOCK"), "{mine:?}");
}
