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

async fn logs(app: &TestApp) -> Vec<String> {
    let mut conn = admin(app).await;
    fluxbase::cdc::binlog::binary_logs(&mut conn)
        .await
        .unwrap()
        .into_iter()
        .map(|(f, _)| f)
        .collect()
}

async fn status(app: &TestApp, f: &Fixture) -> Value {
    let (code, body) = app
        .call(
            "GET",
            &format!("/api/cdc/status?projectId={}", f.project),
            Some(&f.read),
            None,
        )
        .await;
    assert_eq!(code, 200, "{body}");
    body
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
