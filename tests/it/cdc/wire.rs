//! `fluxbase_replication::wire` against the real test cluster (SCRAM-SHA-256, loopback TCP).
//! Cleartext and MD5 authentication, unix sockets and malformed server input are covered by the
//! unit tests in `replication/src/wire.rs`, since the shared cluster is not reconfigured for them.

use std::time::Duration;

use fluxbase_replication::wire::{
    cancel, ConnectConfig, Connection, DbError, Phase, StatementResult, TransactionStatus,
    WireError,
};

use crate::support;

/// Superuser settings for a fresh database.
async fn config() -> ConnectConfig {
    let pg = support::pg().await;
    ConnectConfig {
        host: pg.host.clone(),
        port: pg.port,
        user: pg.superuser.clone(),
        password: Some(pg.password.clone()),
        database: pg.create_database().await,
        ..ConnectConfig::default()
    }
}

async fn connect() -> Connection {
    Connection::connect(&config().await)
        .await
        .expect("connecting")
}

/// The last statement's result of a query that must succeed.
async fn query(conn: &mut Connection, sql: &str) -> StatementResult {
    conn.simple_query(sql, 1000)
        .await
        .unwrap_or_else(|e| panic!("{sql}: {e}"))
        .last
        .expect("a result")
}

fn text(rows: &[Vec<Option<String>>]) -> Vec<Vec<Option<&str>>> {
    rows.iter()
        .map(|row| row.iter().map(Option::as_deref).collect())
        .collect()
}

fn db_error(result: Result<impl std::fmt::Debug, WireError>) -> Box<DbError> {
    match result {
        Err(WireError::Db(e)) => e,
        other => panic!("expected a server error, got {other:?}"),
    }
}

#[tokio::test]
async fn connects_with_scram_and_reports_the_session() {
    let mut conn = connect().await;
    assert!(conn.parameter("server_version").is_some());
    assert_eq!(conn.parameter("client_encoding"), Some("UTF8"));
    assert!(conn.backend_key().0 > 0);
    assert_eq!(conn.transaction_status(), TransactionStatus::Idle);
    let pid = query(&mut conn, "SELECT pg_backend_pid()").await;
    assert_eq!(pid.rows[0][0], Some(conn.backend_key().0.to_string()));
    let me = query(&mut conn, "SELECT current_user").await;
    assert_eq!(
        me.rows[0][0].as_deref(),
        Some(support::pg().await.superuser.as_str())
    );
    conn.close().await;
}

#[tokio::test]
async fn a_wrong_password_is_a_fatal_startup_error() {
    let cfg = ConnectConfig {
        password: Some("not the password".into()),
        ..config().await
    };
    let e = db_error(Connection::connect(&cfg).await);
    assert_eq!(
        (e.code.as_str(), e.severity.as_str(), e.phase),
        ("28P01", "FATAL", Phase::Startup)
    );
}

#[tokio::test]
async fn startup_options_become_session_settings() {
    let cfg = ConnectConfig {
        application_name: Some("wire test".into()),
        options: vec![
            ("statement_timeout".into(), "12345".into()),
            ("DateStyle".into(), "ISO, DMY".into()),
            ("fluxbase.escaped".into(), r"a b\c".into()),
        ],
        ..config().await
    };
    let mut conn = Connection::connect(&cfg).await.unwrap();
    assert_eq!(conn.parameter("DateStyle"), Some("ISO, DMY"));
    assert_eq!(conn.parameter("application_name"), Some("wire test"));
    let settings = query(
        &mut conn,
        "SELECT current_setting('statement_timeout'), current_setting('fluxbase.escaped')",
    )
    .await;
    assert_eq!(text(&settings.rows), [[Some("12345ms"), Some(r"a b\c")]]);
}

#[tokio::test]
async fn values_come_back_as_text_with_their_type_oids() {
    let mut conn = connect().await;
    let result = query(
        &mut conn,
        "SELECT 1::int4 AS i, 'x'::text AS t, NULL::int8 AS n, true AS b, 1.5::numeric(5,2) AS num, \
         '2024-01-02'::date AS d, '{1,2}'::int4[] AS a, '\\x01ff'::bytea AS bytes, '{\"k\": 1}'::jsonb AS j",
    )
    .await;
    let oids: Vec<u32> = result.columns.iter().map(|c| c.type_oid).collect();
    assert_eq!(oids, [23, 25, 20, 16, 1700, 1082, 1007, 17, 3802]);
    let names: Vec<&str> = result.columns.iter().map(|c| c.name.as_str()).collect();
    assert_eq!(names, ["i", "t", "n", "b", "num", "d", "a", "bytes", "j"]);
    assert_eq!(result.columns[4].type_modifier, ((5 << 16) | 2) + 4);
    assert_eq!(
        text(&result.rows),
        [[
            Some("1"),
            Some("x"),
            None,
            Some("t"),
            Some("1.50"),
            Some("2024-01-02"),
            Some("{1,2}"),
            Some("\\x01ff"),
            Some("{\"k\": 1}"),
        ]]
    );
    assert_eq!(result.command_tag, "SELECT 1");
    assert!(!result.truncated);
}

#[tokio::test]
async fn table_columns_carry_their_table_oid_and_position() {
    let mut conn = connect().await;
    let result = query(
        &mut conn,
        "CREATE TABLE items (id int, name text); SELECT name, id, 7 AS seven FROM items",
    )
    .await;
    let table = query(&mut conn, "SELECT 'items'::regclass::oid").await;
    let table_oid: u32 = table.rows[0][0].as_deref().unwrap().parse().unwrap();
    let origin: Vec<(u32, i16)> = result
        .columns
        .iter()
        .map(|c| (c.table_oid, c.column_id))
        .collect();
    assert_eq!(origin, [(table_oid, 2), (table_oid, 1), (0, 0)]);
    assert_eq!(result.command_tag, "SELECT 0");
}

#[tokio::test]
async fn multi_statement_query_returns_the_last_result() {
    let mut conn = connect().await;
    let outcome = conn
        .simple_query(
            "CREATE TABLE t (a int); INSERT INTO t VALUES (1), (2); SELECT a FROM t ORDER BY a",
            100,
        )
        .await
        .unwrap();
    assert_eq!(outcome.statements, 3);
    let last = outcome.last.unwrap();
    assert_eq!(last.command_tag, "SELECT 2");
    assert_eq!(text(&last.rows), [[Some("1")], [Some("2")]]);

    let outcome = conn
        .simple_query("SELECT 1; INSERT INTO t VALUES (3)", 100)
        .await
        .unwrap();
    let last = outcome.last.unwrap();
    assert_eq!(last.command_tag, "INSERT 0 1");
    assert!(last.columns.is_empty() && last.rows.is_empty());
}

#[tokio::test]
async fn an_empty_query_has_no_result() {
    let mut conn = connect().await;
    let outcome = conn.simple_query("  ", 100).await.unwrap();
    assert_eq!((outcome.last, outcome.statements), (None, 0));
}

#[tokio::test]
async fn an_error_carries_its_sqlstate_and_the_connection_stays_usable() {
    let mut conn = connect().await;
    let e = db_error(conn.simple_query("SELECT * FROM missing_table", 10).await);
    assert_eq!((e.code.as_str(), e.severity.as_str()), ("42P01", "ERROR"));
    assert_eq!(e.message, "relation \"missing_table\" does not exist");
    assert_eq!(e.position, Some(15));
    assert_eq!(e.phase, Phase::Query);
    assert!(!conn.is_broken());
    assert_eq!(conn.transaction_status(), TransactionStatus::Idle);
    assert_eq!(
        query(&mut conn, "SELECT 1").await.rows[0][0].as_deref(),
        Some("1")
    );
}

#[tokio::test]
async fn an_error_mid_way_rolls_back_the_whole_implicit_transaction() {
    let mut conn = connect().await;
    let e = db_error(
        conn.simple_query(
            "CREATE TABLE t (a int); INSERT INTO t VALUES (1); SELECT 1/0; INSERT INTO t VALUES (2)",
            10,
        )
        .await,
    );
    assert_eq!(e.code, "22012");
    assert_eq!(conn.transaction_status(), TransactionStatus::Idle);
    let e = db_error(conn.simple_query("SELECT count(*) FROM t", 10).await);
    assert_eq!(
        e.code, "42P01",
        "the CREATE TABLE was rolled back with the rest"
    );
}

#[tokio::test]
async fn an_error_inside_begin_leaves_the_transaction_failed_until_rollback() {
    let mut conn = connect().await;
    let e = db_error(conn.simple_query("BEGIN; SELECT 1/0", 10).await);
    assert_eq!(e.code, "22012");
    assert_eq!(conn.transaction_status(), TransactionStatus::Failed);
    let e = db_error(conn.simple_query("SELECT 1", 10).await);
    assert_eq!(e.code, "25P02");
    assert_eq!(query(&mut conn, "ROLLBACK").await.command_tag, "ROLLBACK");
    assert_eq!(conn.transaction_status(), TransactionStatus::Idle);
}

#[tokio::test]
async fn begin_and_commit_move_the_transaction_status() {
    let mut conn = connect().await;
    query(&mut conn, "BEGIN").await;
    assert_eq!(conn.transaction_status(), TransactionStatus::InTransaction);
    query(&mut conn, "SELECT 1").await;
    assert_eq!(conn.transaction_status(), TransactionStatus::InTransaction);
    assert_eq!(query(&mut conn, "COMMIT").await.command_tag, "COMMIT");
    assert_eq!(conn.transaction_status(), TransactionStatus::Idle);
}

#[tokio::test]
async fn parameter_status_follows_set_timezone() {
    let mut conn = connect().await;
    query(&mut conn, "SET TimeZone = 'Asia/Tokyo'").await;
    assert_eq!(conn.parameter("TimeZone"), Some("Asia/Tokyo"));
    query(&mut conn, "SET IntervalStyle = 'iso_8601'").await;
    assert_eq!(conn.parameter("IntervalStyle"), Some("iso_8601"));
}

#[tokio::test]
async fn prepare_infers_parameter_types_and_describes_columns() {
    let mut conn = connect().await;
    let prepared = conn
        .prepare("SELECT $1::int4 + 1 AS n, $2::text AS s")
        .await
        .unwrap();
    assert_eq!(prepared.param_types, [23, 25]);
    let columns: Vec<(&str, u32)> = prepared
        .columns
        .iter()
        .map(|c| (c.name.as_str(), c.type_oid))
        .collect();
    assert_eq!(columns, [("n", 23), ("s", 25)]);

    query(&mut conn, "CREATE TABLE t (a int8)").await;
    let insert = conn.prepare("INSERT INTO t VALUES ($1)").await.unwrap();
    assert_eq!(insert.param_types, [20]);
    assert!(insert.columns.is_empty());
}

#[tokio::test]
async fn a_statement_that_does_not_parse_fails_at_parse() {
    let mut conn = connect().await;
    let e = db_error(conn.prepare("SELEC 1").await);
    assert_eq!((e.code.as_str(), e.phase), ("42601", Phase::Parse));
    assert!(!conn.is_broken());
    assert_eq!(conn.prepare("SELECT 1").await.unwrap().columns.len(), 1);
}

#[tokio::test]
async fn a_prepared_statement_runs_with_text_params_and_nulls() {
    let mut conn = connect().await;
    conn.prepare("SELECT $1::int4 + 1 AS n, $2::text AS s")
        .await
        .unwrap();
    let result = conn
        .execute_prepared(&[Some("41".into()), None], 100)
        .await
        .unwrap();
    assert_eq!(text(&result.rows), [[Some("42"), None]]);
    assert_eq!(result.command_tag, "SELECT 1");
    let types: Vec<u32> = result.columns.iter().map(|c| c.type_oid).collect();
    assert_eq!(types, [23, 25]);

    query(&mut conn, "CREATE TABLE t (a int8, b text)").await;
    conn.prepare("INSERT INTO t VALUES ($1, $2)").await.unwrap();
    let insert = conn
        .execute_prepared(&[Some("7".into()), Some("it's".into())], 100)
        .await
        .unwrap();
    assert_eq!(insert.command_tag, "INSERT 0 1");
    assert!(insert.columns.is_empty());
    assert_eq!(
        text(&query(&mut conn, "SELECT a, b FROM t").await.rows),
        [[Some("7"), Some("it's")]]
    );
}

#[tokio::test]
async fn a_bad_parameter_value_is_reported_at_bind() {
    let mut conn = connect().await;
    conn.prepare("SELECT $1::int4").await.unwrap();
    let e = db_error(conn.execute_prepared(&[Some("abc".into())], 10).await);
    assert_eq!((e.code.as_str(), e.phase), ("22P02", Phase::Bind));
    assert_eq!(e.message, "invalid input syntax for type integer: \"abc\"");
    let context = e.where_.unwrap();
    assert!(
        context.starts_with("unnamed portal parameter $1"),
        "{context}"
    );
    assert!(!conn.is_broken());

    let e = db_error(conn.execute_prepared(&[], 10).await);
    assert_eq!(
        (e.code.as_str(), e.phase),
        ("08P01", Phase::Bind),
        "wrong parameter count"
    );
    let ok = conn
        .execute_prepared(&[Some("5".into())], 10)
        .await
        .unwrap();
    assert_eq!(text(&ok.rows), [[Some("5")]]);
}

#[tokio::test]
async fn an_error_while_executing_is_reported_at_execute() {
    let mut conn = connect().await;
    // Not `1 / $1`: the unnamed statement is planned at Bind, where constants get folded.
    conn.prepare("SELECT 1 / (g - $1::int4) FROM generate_series(1, 3) g")
        .await
        .unwrap();
    let e = db_error(conn.execute_prepared(&[Some("2".into())], 10).await);
    assert_eq!((e.code.as_str(), e.phase), ("22012", Phase::Execute));
    assert_eq!(conn.transaction_status(), TransactionStatus::Idle);
}

#[tokio::test]
async fn rows_beyond_max_rows_are_dropped_but_counted_in_the_tag() {
    let mut conn = connect().await;
    let sql = "SELECT g FROM generate_series(1, 100000) g";
    let result = conn.simple_query(sql, 3).await.unwrap().last.unwrap();
    assert_eq!(text(&result.rows), [[Some("1")], [Some("2")], [Some("3")]]);
    assert!(result.truncated);
    assert_eq!(result.command_tag, "SELECT 100000");

    conn.prepare(sql).await.unwrap();
    let result = conn.execute_prepared(&[], 2).await.unwrap();
    assert_eq!((result.rows.len(), result.truncated), (2, true));
    assert_eq!(result.command_tag, "SELECT 100000");

    let exact = conn
        .simple_query("SELECT generate_series(1, 3)", 3)
        .await
        .unwrap()
        .last
        .unwrap();
    assert_eq!((exact.rows.len(), exact.truncated), (3, false));
}

#[tokio::test]
async fn cancel_stops_a_running_query_and_the_connection_stays_usable() {
    let cfg = config().await;
    let mut conn = Connection::connect(&cfg).await.unwrap();
    let key = conn.backend_key();
    // The cancel goes out once the query is seen running (pg_stat_activity), not after a
    // guessed delay; the query would run for an hour, so only the cancel ends it.
    let canceller = {
        let cfg = cfg.clone();
        tokio::spawn(async move {
            let observer = support::pg().await.client(&cfg.database).await;
            crate::support::poll::until(
                Duration::from_secs(120),
                Duration::from_millis(20),
                || async {
                    let running: bool = observer
                        .query_one(
                            "SELECT count(*) = 1 FROM pg_stat_activity
                             WHERE pid = $1 AND state = 'active' AND query LIKE 'SELECT pg_sleep%'",
                            &[&key.0],
                        )
                        .await
                        .unwrap()
                        .get(0);
                    running
                        .then_some(())
                        .ok_or_else(|| "the query never started running".to_string())
                },
            )
            .await;
            cancel(&cfg, key).await
        })
    };
    // A hang guard only: a cancel that does not work fails here instead of waiting an hour.
    let e = db_error(
        tokio::time::timeout(
            Duration::from_secs(300),
            conn.simple_query("SELECT pg_sleep(3600)", 10),
        )
        .await
        .expect("the cancelled query did not end"),
    );
    assert_eq!(e.code, "57014");
    canceller.await.unwrap().unwrap();
    assert!(!conn.is_broken());
    assert_eq!(query(&mut conn, "SELECT 1").await.rows.len(), 1);
}

#[tokio::test]
async fn copy_from_stdin_is_refused_and_the_connection_stays_usable() {
    let mut conn = connect().await;
    query(&mut conn, "CREATE TABLE t (a int)").await;
    let e = db_error(conn.simple_query("COPY t FROM STDIN", 10).await);
    assert_eq!(e.code, "57014");
    conn.prepare("COPY t FROM STDIN").await.unwrap();
    db_error(conn.execute_prepared(&[], 10).await);
    assert!(!conn.is_broken());
    assert_eq!(conn.transaction_status(), TransactionStatus::Idle);

    let copied = query(&mut conn, "COPY (SELECT 1) TO STDOUT").await;
    assert_eq!(copied.command_tag, "COPY 1");
}

#[tokio::test]
async fn notices_and_notifications_are_absorbed() {
    let mut conn = connect().await;
    let result = query(
        &mut conn,
        "DO $$ BEGIN RAISE NOTICE 'hello'; END $$; LISTEN ch; NOTIFY ch, 'payload'; SELECT 1",
    )
    .await;
    assert_eq!(text(&result.rows), [[Some("1")]]);
    assert!(!conn.is_broken());
}

#[tokio::test]
async fn a_terminated_session_leaves_the_connection_broken() {
    let mut conn = connect().await;
    let err = conn
        .simple_query("SELECT pg_terminate_backend(pg_backend_pid())", 10)
        .await
        .unwrap_err();
    let fatal = err.as_db().map(|e| (e.code.as_str(), e.severity.as_str()));
    assert!(
        fatal == Some(("57P01", "FATAL")) || matches!(err, WireError::Closed),
        "{err:?}"
    );
    assert!(conn.is_broken());
    assert!(matches!(
        conn.simple_query("SELECT 1", 10).await,
        Err(WireError::Closed)
    ));
}

/// A session reset (and the queued preludes) in front of a Query travels in the same write
/// without a round trip of its own: as extended-protocol messages with no Sync before the Query.
/// When it fails, PostgreSQL must skip the Query (it discards every message up to the Sync),
/// and the connection is broken; with a Sync between them (or the reset as a Query of its own
/// in the same write) the INSERT below ran on the session the reset had not cleared.
#[tokio::test]
async fn a_failed_pipelined_reset_keeps_the_query_from_running() {
    let cfg = config().await;
    let mut setup = Connection::connect(&cfg).await.unwrap();
    query(&mut setup, "CREATE TABLE hits (a int)").await;
    for (reset, prelude) in [("SELECT 1/0", None), ("SELECT 1", Some("SELECT 1/0"))] {
        let mut conn = Connection::connect(&cfg).await.unwrap();
        conn.set_session_reset("SELECT 1", reset);
        conn.reset_session();
        if let Some(prelude) = prelude {
            conn.queue_prelude(prelude);
        }
        let err = conn
            .simple_query("INSERT INTO hits VALUES (1)", 10)
            .await
            .unwrap_err();
        assert!(
            matches!(&err, WireError::Protocol(m) if m.contains("session reset failed")),
            "{err:?}"
        );
        assert!(conn.is_broken());
        let count = query(&mut setup, "SELECT count(*) FROM hits").await;
        assert_eq!(
            text(&count.rows),
            [[Some("0")]],
            "the Query ran after {reset} / {prelude:?} failed"
        );
    }
}

/// After a pipelined reset the Query runs in a transaction of its own, as a Query sent alone
/// would: the reset's `COMMIT` ended theirs (VACUUM refuses to run in a transaction block or a
/// pipeline), the preludes' session settings stay, COPY FROM STDIN is refused with the
/// connection usable (its Sync, ignored during COPY, is sent again), a BEGIN stays open.
#[tokio::test]
async fn a_query_after_a_pipelined_reset_runs_as_if_alone() {
    let mut conn = connect().await;
    query(&mut conn, "CREATE TABLE t (a int)").await;
    conn.set_session_reset("SELECT 1", "RESET ALL");
    let reset = |conn: &mut Connection| {
        conn.reset_session();
        conn.queue_prelude("SELECT set_config('fx.test', 'on', false)");
    };
    reset(&mut conn);
    query(&mut conn, "VACUUM t").await;
    reset(&mut conn);
    let shown = query(&mut conn, "SHOW fx.test").await;
    assert_eq!(text(&shown.rows), [[Some("on")]]);
    reset(&mut conn);
    let e = db_error(conn.simple_query("COPY t FROM STDIN", 10).await);
    assert_eq!(e.code, "57014");
    assert!(!conn.is_broken());
    assert_eq!(conn.transaction_status(), TransactionStatus::Idle);
    reset(&mut conn);
    let e = db_error(conn.simple_query("SELECT 1/0", 10).await);
    assert_eq!(e.code, "22012");
    reset(&mut conn);
    query(&mut conn, "BEGIN; INSERT INTO t VALUES (1)").await;
    assert_eq!(conn.transaction_status(), TransactionStatus::InTransaction);
    // In a transaction block the reset goes alone (a COMMIT would end the caller's block).
    conn.reset_session();
    let shown = query(&mut conn, "SHOW fx.test").await;
    assert_eq!(text(&shown.rows), [[Some("")]]);
    query(&mut conn, "ROLLBACK").await;
    assert!(!conn.is_broken());
}
