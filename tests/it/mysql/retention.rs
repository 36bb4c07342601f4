//! Binary log retention on the embedded MariaDB (crate::mysql::retention): the server's own
//! expiry is off and the real server purges every second (`mysql_binlog_purge_interval_secs`)
//! up to the oldest position a MySQL project still needs; a stopped project's file survives
//! and its stream resumes from it. Past the bound the file goes anyway and the project reports
//! `slot_lost`, never a silent gap: a stopped stream when it starts, a running one that lags
//! (its outbox behind) at its next check.

use std::time::Duration;

use fluxbase::mysql::retention::{purge, Bound};
use fluxbase::projects::Engine;
use mysql_async::prelude::Queryable;
use serde_json::Value;

use crate::support::bus::next_event;
use crate::support::poll;
use crate::support::{spawn_app_with, Fixture, TestApp};

async fn admin(app: &TestApp) -> mysql_async::Conn {
    app.app
        .mysql
        .server()
        .await
        .unwrap()
        .admin_pool
        .get_conn()
        .await
        .unwrap()
}

/// A server whose periodic purge waits an hour (a test purges by calling [`purge`] itself), a
/// MySQL project of its, and a connection as the MariaDB server account.
async fn retention_app() -> (TestApp, Fixture, mysql_async::Conn) {
    let app = spawn_app_with(|c| c.mysql_binlog_purge_interval_secs = 3600).await;
    let f = app.mysql_fixture().await;
    let conn = admin(&app).await;
    (app, f, conn)
}

async fn logs(app: &TestApp) -> Vec<String> {
    let mut conn = admin(app).await;
    fluxbase::cdc::binlog::binary_logs(&mut conn)
        .await
        .unwrap()
        .into_iter()
        .map(|(f, _)| f)
        .collect()
}

/// The file of the project's stored position.
async fn stored_file(app: &TestApp, project: &str) -> String {
    let control = app.app.control.get().await.unwrap();
    control
        .query_one(
            "SELECT binlog_file FROM fluxbase.binlog_positions WHERE project_id = $1",
            &[&project],
        )
        .await
        .unwrap()
        .get(0)
}

async fn status(app: &TestApp, f: &Fixture) -> Value {
    app.cdc_status(&f.project, &f.read).await
}

/// A project whose stream is stopped (as when its server was down): a row written meanwhile.
async fn stopped_with_a_change(app: &TestApp, f: &Fixture) {
    app.app.cdc.stop(&f.project).await;
    let mut conn = admin(app).await;
    conn.query_drop(format!(
        "CREATE TABLE fx_{0}.t (id int PRIMARY KEY); INSERT INTO fx_{0}.t VALUES (1)",
        f.project
    ))
    .await
    .unwrap();
}

#[tokio::test]
async fn a_stopped_streams_binlog_survives_purging_and_past_the_bound_it_is_lost_and_said() {
    let app = spawn_app_with(|c| c.mysql_binlog_purge_interval_secs = 1).await;
    let a = app.mysql_fixture().await;
    let server = app.app.mysql.embedded().expect("the embedded MariaDB runs");
    let mut conn = admin(&app).await;
    let expiry: u64 = conn
        .query_first("SELECT @@GLOBAL.binlog_expire_logs_seconds")
        .await
        .unwrap()
        .unwrap();
    assert_eq!(expiry, 0, "the embedded server expires binary logs itself");
    conn.query_drop("FLUSH BINARY LOGS").await.unwrap();
    let first = logs(&app).await[0].clone();

    // B stops in the second file; A keeps streaming while the log moves on.
    let b = app.mysql_fixture().await;
    stopped_with_a_change(&app, &b).await;
    let b_file = status(&app, &b).await["binlog"]["neededFile"]
        .as_str()
        .unwrap()
        .to_string();
    assert!(b_file > first, "{b_file} after {first}");
    conn.query_drop(format!("CREATE TABLE fx_{}.w (id int)", a.project))
        .await
        .unwrap();
    for i in 0..3 {
        conn.query_drop(format!("INSERT INTO fx_{}.w VALUES ({i})", a.project))
            .await
            .unwrap();
        conn.query_drop("FLUSH BINARY LOGS").await.unwrap();
    }
    // The purge cycle removes what nobody needs, and keeps B's file.
    poll::until(
        Duration::from_secs(60),
        Duration::from_millis(200),
        || async {
            let now = logs(&app).await;
            if now[0] == b_file {
                Ok(())
            } else {
                Err(format!("the server has {now:?}; B needs {b_file}"))
            }
        },
    )
    .await;
    let s = status(&app, &b).await;
    assert_eq!(s["binlog"]["present"], true, "{s}");
    assert_eq!(s["binlog"]["purgedBy"], "fluxbase", "{s}");
    assert_eq!(s["binlog"]["oldestFile"], b_file.as_str(), "{s}");
    assert_eq!(s["slot"]["walStatus"], "reserved", "{s}");
    tokio::time::sleep(Duration::from_secs(3)).await;
    assert_eq!(logs(&app).await[0], b_file, "a later cycle purged B's file");

    // B resumes from its position: the change made while it was stopped arrives.
    let mut sub = app.app.bus.project(&b.project).subscribe();
    app.app.cdc.start(
        b.project.clone(),
        format!("fx_{}", b.project),
        Engine::Mysql,
    );
    let mut seen = Vec::new();
    loop {
        let e = next_event(&mut sub).await;
        let p: Value = serde_json::from_str(&e.payload).unwrap();
        seen.push(p.clone());
        if p["operation"] == "INSERT" {
            assert_eq!(p["record"]["id"], 1, "{p}");
            break;
        }
        assert!(seen.len() < 5, "no insert among {seen:?}");
    }

    // C stops too, and D's stream runs but lags: a durable subscriber of D (a webhook outbox
    // that is behind) acknowledges nothing, so D's position stays where it was. Then a purge
    // with a bound both files are past: they go, C and D are lost, D's running stream says so.
    let c = app.mysql_fixture().await;
    stopped_with_a_change(&app, &c).await;
    let d = app.mysql_fixture().await;
    let _behind = app.app.bus.project(&d.project).subscribe_durable();
    conn.query_drop(format!(
        "CREATE TABLE fx_{0}.t (id int PRIMARY KEY); INSERT INTO fx_{0}.t VALUES (1)",
        d.project
    ))
    .await
    .unwrap();
    // D's stream runs past them (the durable subscriber's rewind restarted it: under load
    // that pass may start late, and a pass starting after the purge says so at its start).
    poll::until(
        Duration::from_secs(30),
        Duration::from_millis(100),
        || async {
            let s = status(&app, &d).await;
            match s["stream"]["events"].as_u64() {
                Some(n) if n >= 2 => Ok(()),
                _ => Err(format!("D's stream has not delivered its rows: {s}")),
            }
        },
    )
    .await;
    conn.query_drop("FLUSH BINARY LOGS").await.unwrap();
    let tight = Bound {
        bytes: 1,
        age: Duration::from_secs(3600),
    };
    // (The server keeps a file a running dump still reads, A's and B's until they follow the
    // rotation: the purge is repeated until it is gone.)
    poll::until(
        Duration::from_secs(30),
        Duration::from_millis(200),
        || async {
            let plan = purge(&app.app.mysql, &app.app.control, tight)
                .await
                .unwrap();
            assert!(
                plan.lost.contains(&c.project) && plan.lost.contains(&d.project),
                "{plan:?}"
            );
            let s = status(&app, &c).await;
            if s["binlog"]["present"] == false {
                Ok(())
            } else {
                Err(format!("C's file is still there: {s}"))
            }
        },
    )
    .await;
    let s = status(&app, &c).await;
    assert_eq!(s["binlog"]["present"], false, "{s}");
    assert_eq!(s["slot"]["walStatus"], "lost", "{s}");
    app.app.cdc.start(
        c.project.clone(),
        format!("fx_{}", c.project),
        Engine::Mysql,
    );
    poll::until(
        Duration::from_secs(30),
        Duration::from_millis(200),
        || async {
            let s = status(&app, &c).await;
            if s["stream"]["state"] == "slot_lost" {
                assert!(
                    s["stream"]["lastError"]
                        .as_str()
                        .is_some_and(|e| e.contains("gone from the server")),
                    "{s}"
                );
                Ok(())
            } else {
                Err(format!("C's stream is not slot_lost: {s}"))
            }
        },
    )
    .await;
    // D's running stream stops at its next check, saying why.
    poll::until(
        Duration::from_secs(30),
        Duration::from_millis(200),
        || async {
            let s = status(&app, &d).await;
            if s["stream"]["state"] == "slot_lost" {
                assert!(
                    s["stream"]["lastError"]
                        .as_str()
                        .is_some_and(|e| e.contains("its file was purged")),
                    "{s}"
                );
                assert_eq!(s["slot"]["walStatus"], "lost", "{s}");
                Ok(())
            } else {
                Err(format!("D's running stream is not slot_lost: {s}"))
            }
        },
    )
    .await;
    // A, streaming at the end of the log, lost nothing.
    let s = status(&app, &a).await;
    assert_eq!(s["stream"]["state"], "streaming", "{s}");
    assert_eq!(s["binlog"]["present"], true, "{s}");
    drop(server);
    app.stop().await;
}

/// A suspended MySQL project is streamed as a PostgreSQL one is, across a restart too: its
/// position follows the log (a purge to the current file loses nothing of it), and after the
/// resume a subscriber with `since` gets every change committed while it was suspended, in
/// order. (Before: only active MySQL projects were streamed after a restart, so a suspended
/// one's position stayed in its old file until retention's bound purged it: `slot_lost` on
/// resume.)
#[tokio::test]
async fn a_suspended_projects_stream_runs_on_and_its_resume_misses_nothing() {
    use crate::support::ws::{nothing_more, row, subscribed};
    use fluxbase::projects::ProjectStatus;
    let (app, f, mut conn) = retention_app().await;
    let p = f.keys();
    conn.query_drop(format!(
        "CREATE TABLE fx_{0}.r (id int PRIMARY KEY); INSERT INTO fx_{0}.r VALUES (0)",
        f.project
    ))
    .await
    .unwrap();
    let mut ws = subscribed(&app.base, &p, None).await;
    conn.query_drop(format!("INSERT INTO fx_{}.r VALUES (1)", f.project))
        .await
        .unwrap();
    let (id, first) = row(&mut ws).await;
    assert_eq!(id, 1);
    drop(ws);
    drop(conn);
    app.app
        .set_project_status(&f.project, ProjectStatus::Suspended)
        .await
        .unwrap();

    // A restart while suspended, then changes (the server's account: the project's are locked).
    // (A graceful stop: it stops the embedded MariaDB, which the next start takes over.)
    let config = app.app.config.clone();
    app.stop().await;
    let app = crate::support::start_with(config).await;
    let mut conn = admin(&app).await;
    for i in 2..=4 {
        conn.query_drop(format!("INSERT INTO fx_{}.r VALUES ({i})", f.project))
            .await
            .unwrap();
    }
    conn.query_drop("FLUSH BINARY LOGS").await.unwrap();
    let current = logs(&app).await.last().unwrap().clone();
    poll::until(
        Duration::from_secs(30),
        Duration::from_millis(200),
        || async {
            let file = stored_file(&app, &f.project).await;
            if file == current {
                Ok(())
            } else {
                Err(format!(
                    "the suspended project's position stays in {file} (the log is at {current}); \
                     stream: {:?}",
                    app.app.cdc.status(&f.project).map(|s| s.state)
                ))
            }
        },
    )
    .await;
    // Retention's tightest bound keeps only the file being written: nothing of it is lost.
    let tight = Bound {
        bytes: 1,
        age: Duration::from_secs(3600),
    };
    let plan = purge(&app.app.mysql, &app.app.control, tight)
        .await
        .unwrap();
    assert!(!plan.lost.contains(&f.project), "{plan:?}");

    app.app
        .set_project_status(&f.project, ProjectStatus::Active)
        .await
        .unwrap();
    let s = status(&app, &f).await;
    assert_eq!(s["stream"]["state"], "streaming", "{s}");
    assert_eq!(s["binlog"]["present"], true, "{s}");
    let mut ws = subscribed(&app.base, &p, Some(&first)).await;
    let mut last = first;
    for want in 2..=4 {
        let (id, event) = row(&mut ws).await;
        assert_eq!(id, want);
        assert!(event > last, "{event} after {last}");
        last = event;
    }
    nothing_more(&mut ws).await;
    conn.query_drop(format!("INSERT INTO fx_{}.r VALUES (5)", f.project))
        .await
        .unwrap();
    assert_eq!(row(&mut ws).await.0, 5);
    app.stop().await;
}

/// A new MySQL project's first position (the end of the log) and a purge cycle meeting: the
/// position is read from the server, then stored in the control database; a rotation and a
/// purge in between (which does not see the position yet) would remove the file the project
/// starts in (`slot_lost` at its first start). Both take one advisory lock in the control
/// database. Here the test is the creation in the middle of that window (it holds the lock,
/// has read the end of the log, the log rotates): the real purge waits for it and keeps the
/// file; and the real recording of a first position waits for a purge holding the lock.
#[tokio::test]
async fn a_new_projects_first_position_is_never_purged_under_it() {
    let (app, f, mut conn) = retention_app().await;
    app.app.cdc.stop(&f.project).await;
    let wide = Bound {
        bytes: u64::MAX,
        age: Duration::from_secs(1 << 30),
    };
    let mut control = app.app.control.get().await.unwrap();
    control
        .execute(
            "DELETE FROM fluxbase.binlog_positions WHERE project_id = $1",
            &[&f.project],
        )
        .await
        .unwrap();

    // A creation in its window: the lock held, the end of the log read, not yet stored.
    let tx = control.transaction().await.unwrap();
    fluxbase::cdc::binlog::position::lock(&*tx).await.unwrap();
    let start = fluxbase::cdc::binlog::current_position(&mut conn)
        .await
        .unwrap();
    conn.query_drop("FLUSH BINARY LOGS").await.unwrap();
    let purging = tokio::spawn({
        let (mysql, control) = (app.app.mysql.clone(), app.app.control.clone());
        async move { purge(&mysql, &control, wide).await.unwrap() }
    });
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert!(
        !purging.is_finished(),
        "a purge ran while a first position was being recorded"
    );
    assert!(logs(&app).await.contains(&start.file));
    fluxbase::cdc::binlog::position::init(&*tx, &f.project, &start)
        .await
        .unwrap();
    tx.commit().await.unwrap();
    let plan = tokio::time::timeout(Duration::from_secs(30), purging)
        .await
        .unwrap()
        .unwrap();
    assert!(plan.lost.is_empty(), "{plan:?}");
    let now = logs(&app).await;
    assert_eq!(
        now[0], start.file,
        "the new position's file was purged: {now:?}"
    );

    // The other way round: a purge holding the lock, the server's recording waits for it.
    control
        .execute(
            "DELETE FROM fluxbase.binlog_positions WHERE project_id = $1",
            &[&f.project],
        )
        .await
        .unwrap();
    let tx = control.transaction().await.unwrap();
    fluxbase::cdc::binlog::position::lock(&*tx).await.unwrap();
    let recording = tokio::spawn({
        let app = app.app.clone();
        let project = f.project.clone();
        async move { app.cdc.init_binlog_position(&project).await.unwrap() }
    });
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert!(
        !recording.is_finished(),
        "a first position was recorded while a purge held the lock"
    );
    tx.commit().await.unwrap();
    tokio::time::timeout(Duration::from_secs(30), recording)
        .await
        .unwrap()
        .unwrap();
    let stored = stored_file(&app, &f.project).await;
    assert!(logs(&app).await.contains(&stored));
    drop(control);
    app.stop().await;
}

/// `/api/cdc/status` of MySQL projects reads the server's binary logs through the admin pool
/// (4 connections, which project creation and purges need too): one read at a time, reused
/// for a second (crate::mysql::retention::FactsCache). 60 concurrent calls answer with the
/// `binlog` object and cost the server a handful of `SHOW BINARY LOGS`, not 60.
#[tokio::test]
async fn status_calls_share_one_read_of_the_servers_binary_logs() {
    let (app, f, mut conn) = retention_app().await;
    async fn shows(conn: &mut mysql_async::Conn) -> u64 {
        conn.query_first::<(String, u64), _>("SHOW GLOBAL STATUS LIKE 'Com_show_binlogs'")
            .await
            .unwrap()
            .unwrap()
            .1
    }
    let before = shows(&mut conn).await;
    let started = std::time::Instant::now();
    let answers = futures_util::future::join_all((0..60).map(|_| status(&app, &f))).await;
    let elapsed = started.elapsed().as_secs();
    let after = shows(&mut conn).await;
    for s in &answers {
        assert_eq!(s["binlog"]["present"], true, "{s}");
    }
    // One read a second, plus the stream's own listing every 5 s, plus this query's neighbours.
    let allowed = elapsed + 1 + elapsed / 5 + 1 + 2;
    assert!(
        after - before <= allowed,
        "{} SHOW BINARY LOGS for 60 status calls in {elapsed} s (at most {allowed})",
        after - before
    );
    app.stop().await;
}
