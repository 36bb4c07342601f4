//! One tenant's huge transaction does not hold back other projects' change streams (red team
//! rt5: a MySQL project's 320 MB row delayed a PostgreSQL project's events by a minute and got
//! every PostgreSQL walsender terminated for not answering keepalives). All streams share the
//! `fluxbase-cdc` runtime; a stream rendering or spilling a huge row must leave it to the others.

use std::time::{Duration, Instant};

use serde_json::Value;

use crate::support::bus::events;
use crate::support::mariadb::spawn_mysql_app;

/// While project A's stream is capturing a 32 MB row (its transaction being spilled to disk),
/// project B's change, committed after A's, is published before A's: B's stream reads on.
/// An ordering, never a time.
#[tokio::test]
async fn a_huge_mysql_row_does_not_hold_back_another_projects_stream() {
    let app = spawn_mysql_app().await;
    let a = app.mysql_fixture().await;
    let b = app.fixture().await;
    let mut sub_a = app.app.bus.project(&a.project).subscribe();
    let mut sub_b = app.app.bus.project(&b.project).subscribe();
    app.rows(
        &a.admin,
        &a.project,
        "CREATE TABLE big (id int PRIMARY KEY, c1 LONGTEXT, c2 LONGTEXT, c3 LONGTEXT, \
         c4 LONGTEXT)",
    )
    .await;
    app.rows(&b.admin, &b.project, "CREATE TABLE t (id int PRIMARY KEY)")
        .await;
    assert_eq!(
        events(&mut sub_a, 1).await[0]["event_type"],
        "schema_update"
    );
    assert_eq!(
        events(&mut sub_b, 1).await[0]["event_type"],
        "schema_update"
    );

    // 32 MB in one row event: past the 16 MiB memory bound, so A's stream spills it.
    let started = Instant::now();
    app.rows(
        &a.admin,
        &a.project,
        "INSERT INTO big VALUES (1, REPEAT('a', 8000000), REPEAT('b', 8000000), \
         REPEAT('c', 8000000), REPEAT('d', 8000000))",
    )
    .await;
    // A's stream is capturing the row once its spill file exists.
    let spill = app.app.config.data_dir.join("cdc-spill").join(&a.project);
    let spilling = || {
        std::fs::read_dir(&spill)
            .map(|mut d| d.next().is_some())
            .unwrap_or(false)
    };
    let mut a_first = None;
    while !spilling() {
        // The stream may also be done with it already (a fast machine): then it is published.
        if let Ok(e) = sub_a.events.try_recv() {
            a_first = Some(e);
            break;
        }
        assert!(
            started.elapsed() < Duration::from_secs(120),
            "A's stream never spilled its row"
        );
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    assert!(
        a_first.is_none(),
        "A's row was published before its capture could be observed"
    );
    let b_committed = Instant::now();
    app.rows(&b.readwrite, &b.project, "INSERT INTO t VALUES (1)")
        .await;

    // Whichever is published first.
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
                .expect("A's row never published")
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
    let a_row: Value = serde_json::from_str(&a_event.payload).unwrap();
    assert_eq!(a_row["record"]["id"], 1);
    assert_eq!(a_row["record"]["c4"].as_str().map(str::len), Some(8_000_000));
    let b_row: Value = serde_json::from_str(&b_event.payload).unwrap();
    assert_eq!(b_row["record"]["id"], 1, "{b_row}");
    assert_eq!(
        who, "b",
        "B's change, committed after A's, waited for A's huge row to be published"
    );
}
