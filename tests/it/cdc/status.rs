//! `/api/cdc/status` as a project's own callers see it (both engines): the log is shared by
//! every project on the server (PostgreSQL's WAL, the MySQL server's binary log), so nothing a
//! project's key or member reads may move with another tenant's writes: not the log's end
//! (`serverLsn`, never shown), not the bytes to it (`lagBytes`, in the project's own terms), not
//! an idle project's stored position (which follows the log's end so that it pins nothing).
//! The operator's full figures stay in `/metrics`.

use std::time::Duration;

use serde_json::Value;

use crate::support::poll;
use crate::support::{spawn_app, Fixture, TestApp};

#[derive(Clone, Copy)]
enum Engine {
    Postgresql,
    Mysql,
}

async fn tenant(app: &TestApp, engine: Engine) -> Fixture {
    match engine {
        Engine::Postgresql => app.fixture().await,
        Engine::Mysql => app.mysql_fixture().await,
    }
}

/// `/api/cdc/status` of `f`'s project with `key`, once its stream has received at least
/// `transactions` of the project's own and stored all it received (`lagBytes` 0).
async fn caught_up(app: &TestApp, f: &Fixture, key: &str, transactions: u64) -> Value {
    poll::until(
        Duration::from_secs(60),
        Duration::from_millis(200),
        || async {
            let body = app.cdc_status(&f.project, key).await;
            let s = &body["stream"];
            if s["state"] == "streaming"
                && s["lagBytes"] == 0
                && s["receivedLsn"].as_str().is_some()
                && s["transactions"].as_u64() >= Some(transactions)
            {
                Ok(body)
            } else {
                Err(format!(
                    "not caught up ({transactions} transactions): {body}"
                ))
            }
        },
    )
    .await
}

fn lsn(s: &str) -> u64 {
    s.parse::<fluxbase_replication::pgoutput::Lsn>()
        .unwrap_or_else(|_| panic!("{s} is not a position"))
        .0
}

/// Another tenant's traffic: many small transactions and one of ~1 MB.
async fn write_a_lot(app: &TestApp, b: &Fixture, engine: Engine) {
    let big = match engine {
        Engine::Postgresql => {
            "INSERT INTO w SELECT g, repeat('x', 2000) FROM generate_series(1000, 1499) g"
        }
        Engine::Mysql => {
            "INSERT INTO w SELECT n, REPEAT('x', 2000) FROM (WITH RECURSIVE s(n) AS \
             (SELECT 1000 UNION ALL SELECT n + 1 FROM s WHERE n < 1499) SELECT n FROM s) q"
        }
    };
    for i in 0..30 {
        app.rows(
            &b.readwrite,
            &b.project,
            &format!("INSERT INTO w VALUES ({i}, 'small')"),
        )
        .await;
    }
    app.rows(&b.readwrite, &b.project, big).await;
}

async fn another_tenants_writes_move_nothing_a_project_reads(engine: Engine) {
    let app = spawn_app().await;
    let a = tenant(&app, engine).await;
    let b = tenant(&app, engine).await;
    app.rows(&a.admin, &a.project, "CREATE TABLE t (id int PRIMARY KEY)")
        .await;
    app.rows(&a.readwrite, &a.project, "INSERT INTO t VALUES (1)")
        .await;
    app.rows(
        &b.admin,
        &b.project,
        "CREATE TABLE w (id int PRIMARY KEY, pad text)",
    )
    .await;
    // A's own terms: its last transaction received and stored, nothing of the log's end.
    caught_up(&app, &a, &a.read, 2).await;
    // Read again after the stream's next ticks (0.5 s) have reported what they sum up
    // (`peakBufferedBytes` of A's own transactions).
    tokio::time::sleep(Duration::from_millis(1500)).await;
    let before = app.cdc_status(&a.project, &a.read).await;
    let b_before = caught_up(&app, &b, &b.read, 1).await;

    write_a_lot(&app, &b, engine).await;
    // B's stream has read all of it (B's own view moved) ...
    let b_after = caught_up(&app, &b, &b.read, 32).await;
    assert!(
        lsn(b_after["stream"]["receivedLsn"].as_str().unwrap())
            > lsn(b_before["stream"]["receivedLsn"].as_str().unwrap()),
        "{b_before} {b_after}"
    );
    // ... and A's stream has passed B's writes too: its periodic check of the log's end (every
    // 5 s) and its idle project's advance of the stored position (every 0.5 s) both ran since.
    tokio::time::sleep(Duration::from_secs(6)).await;
    // Every caller of A, the weakest scope and a member's session alike, reads what it read
    // before B wrote: the whole answer.
    for key in [&a.read, &a.readwrite, &a.admin, &a.token] {
        let after = app.cdc_status(&a.project, key).await;
        assert_eq!(
            after, before,
            "another tenant's writes moved what A's callers read"
        );
    }
    // Nothing of the log's end; the stored position in the project's terms.
    let s = &before["stream"];
    assert_eq!(s["serverLsn"], Value::Null, "{before}");
    assert_eq!(s["confirmedLsn"], s["receivedLsn"], "{before}");
    // The operator's figures (`/metrics`) still see the whole log: B's writes are bytes there.
    let metrics = app.metrics_text().await;
    assert!(
        metrics.contains(&format!(
            "fluxbase_cdc_lag_bytes{{project=\"{}\"}}",
            a.project
        )),
        "{metrics}"
    );
}

#[tokio::test]
async fn another_tenants_writes_move_nothing_a_postgresql_projects_callers_read() {
    another_tenants_writes_move_nothing_a_project_reads(Engine::Postgresql).await;
}

#[tokio::test]
async fn another_tenants_writes_move_nothing_a_mysql_projects_callers_read() {
    another_tenants_writes_move_nothing_a_project_reads(Engine::Mysql).await;
}
