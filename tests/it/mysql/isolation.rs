//! One tenant's huge transaction does not hold back other projects' change streams (red team
//! rt5: a MySQL project's 320 MB row delayed a PostgreSQL project's events by a minute and got
//! every PostgreSQL walsender terminated for not answering keepalives; a 320 MB PostgreSQL
//! transaction delayed another project by 12 s). All streams share the `fluxbase-cdc` runtime;
//! a stream rendering, spilling or reading back a huge transaction must leave it to the others.

use std::sync::Arc;
use std::time::{Duration, Instant};

use fluxbase::bus::{Event, Subscription};
use serde_json::Value;

use crate::support::bus::events;
use crate::support::mariadb::spawn_mysql_app;
use crate::support::{Fixture, TestApp};

/// Commits `huge` in project A, waits until A's stream is capturing it (its spill file exists),
/// then commits an INSERT of id 1 into B's table `t`. Returns which project's event the bus
/// published first, with A's first event and B's event.
async fn first_published(
    app: &TestApp,
    (a, mut sub_a): (&Fixture, Subscription),
    (b, mut sub_b): (&Fixture, Subscription),
    huge: &str,
) -> (&'static str, Arc<Event>, Arc<Event>) {
    let started = Instant::now();
    app.rows(&a.admin, &a.project, huge).await;
    // A's stream is capturing the transaction once its spill file exists.
    let spill = app.app.config.data_dir.join("cdc-spill").join(&a.project);
    let spilling = || {
        std::fs::read_dir(&spill)
            .map(|mut d| d.next().is_some())
            .unwrap_or(false)
    };
    while !spilling() {
        assert!(
            sub_a.events.try_recv().is_err(),
            "A's transaction was published before its capture could be observed"
        );
        assert!(
            started.elapsed() < Duration::from_secs(120),
            "A's stream never spilled its transaction"
        );
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    let b_committed = Instant::now();
    app.rows(&b.readwrite, &b.project, "INSERT INTO t VALUES (1)")
        .await;

    let wait = Duration::from_secs(180);
    let first = tokio::time::timeout(wait, async {
        tokio::select! {
            e = sub_a.events.recv() => ("a", e.expect("bus closed")),
            e = sub_b.events.recv() => ("b", e.expect("bus closed")),
        }
    })
    .await
    .expect("no event of either project");
    let who = first.0;
    eprintln!(
        "first published: project {who} ({:?} after B's commit)",
        b_committed.elapsed()
    );
    let (a_event, b_event) = match first {
        ("b", e) => (
            tokio::time::timeout(wait, sub_a.events.recv())
                .await
                .expect("A's transaction never published")
                .unwrap(),
            e,
        ),
        (_, e) => (
            e,
            tokio::time::timeout(wait, sub_b.events.recv())
                .await
                .expect("B's row never published")
                .unwrap(),
        ),
    };
    eprintln!(
        "both published {:?} after B's commit",
        b_committed.elapsed()
    );
    let b_row: Value = serde_json::from_str(&b_event.payload).unwrap();
    assert_eq!(b_row["record"]["id"], 1, "{b_row}");
    (who, a_event, b_event)
}

/// A PostgreSQL project B with table `t`, subscribed, its CREATE TABLE's event taken.
async fn project_b(app: &TestApp) -> (Fixture, Subscription) {
    let b = app.fixture().await;
    let mut sub_b = app.app.bus.project(&b.project).subscribe();
    app.rows(&b.admin, &b.project, "CREATE TABLE t (id int PRIMARY KEY)")
        .await;
    assert_eq!(
        events(&mut sub_b, 1).await[0]["event_type"],
        "schema_update"
    );
    (b, sub_b)
}

/// While MySQL project A's stream is capturing a 32 MB row (one binlog event, spilled past the
/// 16 MiB memory bound), PostgreSQL project B's change, committed after A's, is published
/// before A's: B's stream reads on. An ordering, never a time.
#[tokio::test]
async fn a_huge_mysql_row_does_not_hold_back_another_projects_stream() {
    let app = spawn_mysql_app().await;
    let a = app.mysql_fixture().await;
    let mut sub_a = app.app.bus.project(&a.project).subscribe();
    app.rows(
        &a.admin,
        &a.project,
        "CREATE TABLE big (id int PRIMARY KEY, c1 LONGTEXT, c2 LONGTEXT, c3 LONGTEXT, \
         c4 LONGTEXT)",
    )
    .await;
    assert_eq!(
        events(&mut sub_a, 1).await[0]["event_type"],
        "schema_update"
    );
    let (b, sub_b) = project_b(&app).await;
    let (who, a_event, _) = first_published(
        &app,
        (&a, sub_a),
        (&b, sub_b),
        "INSERT INTO big VALUES (1, REPEAT('a', 8000000), REPEAT('b', 8000000), \
         REPEAT('c', 8000000), REPEAT('d', 8000000))",
    )
    .await;
    let a_row: Value = serde_json::from_str(&a_event.payload).unwrap();
    assert_eq!(a_row["record"]["id"], 1);
    assert_eq!(a_row["record"]["c4"].as_str().map(str::len), Some(8_000_000));
    assert_eq!(
        who, "b",
        "B's change, committed after A's, waited for A's huge row to be published"
    );
}

/// The same with a PostgreSQL project A writing 40 MB in 4,000 rows of one transaction
/// (spilled by A's stream, read back at its commit).
#[tokio::test]
async fn a_huge_postgres_transaction_does_not_hold_back_another_projects_stream() {
    let app = spawn_mysql_app().await;
    let a = app.fixture().await;
    let mut sub_a = app.app.bus.project(&a.project).subscribe();
    app.rows(
        &a.admin,
        &a.project,
        "CREATE TABLE big (id int PRIMARY KEY, body text)",
    )
    .await;
    assert_eq!(
        events(&mut sub_a, 1).await[0]["event_type"],
        "schema_update"
    );
    let (b, sub_b) = project_b(&app).await;
    let (who, a_event, _) = first_published(
        &app,
        (&a, sub_a),
        (&b, sub_b),
        "INSERT INTO big SELECT g, repeat(md5(g::text), 312) FROM generate_series(1, 4000) g",
    )
    .await;
    let a_row: Value = serde_json::from_str(&a_event.payload).unwrap();
    assert_eq!(a_row["record"]["id"], 1, "{a_row}");
    assert_eq!(
        who, "b",
        "B's change, committed after A's, waited for A's huge transaction to be published"
    );
}
