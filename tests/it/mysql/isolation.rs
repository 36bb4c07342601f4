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
use crate::support::{Fixture, TestApp};

/// A server with MySQL projects whose change events carry rows whole
/// (`cdc_max_row_bytes` 0): the huge row here must reach the bus whole, spilled and read back
/// (with the default bound its values would be left out and nothing would be spilled).
async fn unbounded_rows_app() -> TestApp {
    let url = crate::support::mariadb::mariadb().await.admin_url.clone();
    crate::support::spawn_app_with(|c| {
        c.mysql_url = Some(url.into());
        c.cdc_max_row_bytes = 0;
    })
    .await
}

/// Commits `huge` in project A, waits until A's stream is reading the spilled transaction back
/// at its commit (its spill file made, then unlinked as reading starts: from there until the
/// transaction is published the stream never awaits), then commits an INSERT of id 1 into B's
/// table `t`. Returns which project's event the bus published first, with A's first event and
/// B's event.
async fn first_published(
    app: &TestApp,
    (a, mut sub_a): (&Fixture, Subscription),
    (b, mut sub_b): (&Fixture, Subscription),
    huge: &str,
) -> (&'static str, Arc<Event>, Arc<Event>) {
    let started = Instant::now();
    app.rows(&a.admin, &a.project, huge).await;
    let spill = app.app.config.data_dir.join("cdc-spill").join(&a.project);
    let spilled = || {
        std::fs::read_dir(&spill)
            .map(|mut d| d.next().is_some())
            .unwrap_or(false)
    };
    for (present, what) in [(true, "spilled"), (false, "read back")] {
        while spilled() != present {
            assert!(
                sub_a.try_recv().is_none(),
                "A's transaction was published before it was seen {what}"
            );
            assert!(
                started.elapsed() < Duration::from_secs(120),
                "A's stream never {what} its transaction"
            );
            tokio::time::sleep(Duration::from_millis(2)).await;
        }
    }
    let b_committed = Instant::now();
    app.rows(&b.readwrite, &b.project, "INSERT INTO t VALUES (1)")
        .await;

    let wait = Duration::from_secs(180);
    let first = tokio::time::timeout(wait, async {
        tokio::select! {
            e = sub_a.recv() => ("a", e.expect("bus closed")),
            e = sub_b.recv() => ("b", e.expect("bus closed")),
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
            tokio::time::timeout(wait, sub_a.recv())
                .await
                .expect("A's transaction never published")
                .unwrap(),
            e,
        ),
        (_, e) => (
            e,
            tokio::time::timeout(wait, sub_b.recv())
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

/// Project A (made by `a`) creates `ddl`'s table `big`, then commits `insert`, a 12 MB row of
/// four 3,000,000-character columns; PostgreSQL project B's change, committed after it, must be
/// published first: B's stream reads on while A's stream works through the huge row.
async fn a_huge_row_of_a_does_not_hold_back_b(app: &TestApp, a: Fixture, ddl: &str, insert: &str) {
    let mut sub_a = app.app.bus.project(&a.project).subscribe();
    app.rows(&a.admin, &a.project, ddl).await;
    assert_eq!(
        events(&mut sub_a, 1).await[0]["event_type"],
        "schema_update"
    );
    let (b, sub_b) = project_b(app).await;
    let (who, a_event, _) = first_published(app, (&a, sub_a), (&b, sub_b), insert).await;
    let a_row: Value = serde_json::from_str(&a_event.payload).unwrap();
    assert_eq!(a_row["record"]["id"], 1);
    assert_eq!(
        a_row["record"]["c4"].as_str().map(str::len),
        Some(3_000_000)
    );
    assert_eq!(
        who, "b",
        "B's change, committed after A's, waited for A's huge row to be published"
    );
}

/// While MySQL project A's stream is capturing a 12 MB row (one binlog event; 72 MB as JSON,
/// every character escaped: spilled past the 16 MiB memory bound, read back at its commit),
/// PostgreSQL project B's change, committed after A's, is published before A's: B's stream
/// reads on. An ordering, never a time.
#[tokio::test]
async fn a_huge_mysql_row_does_not_hold_back_another_projects_stream() {
    let app = unbounded_rows_app().await;
    let a = app.mysql_fixture().await;
    a_huge_row_of_a_does_not_hold_back_b(
        &app,
        a,
        "CREATE TABLE big (id int PRIMARY KEY, c1 LONGTEXT, c2 LONGTEXT, c3 LONGTEXT, \
         c4 LONGTEXT)",
        "INSERT INTO big VALUES (1, REPEAT(CHAR(1), 3000000), REPEAT(CHAR(2), 3000000), \
         REPEAT(CHAR(3), 3000000), REPEAT(CHAR(4), 3000000))",
    )
    .await;
}

/// The same with a PostgreSQL project A's 12 MB row (one change message).
#[tokio::test]
async fn a_huge_postgres_row_does_not_hold_back_another_projects_stream() {
    let app = unbounded_rows_app().await;
    let a = app.fixture().await;
    a_huge_row_of_a_does_not_hold_back_b(
        &app,
        a,
        "CREATE TABLE big (id int PRIMARY KEY, c1 text, c2 text, c3 text, c4 text)",
        "INSERT INTO big VALUES (1, repeat(chr(1), 3000000), repeat(chr(2), 3000000), \
         repeat(chr(3), 3000000), repeat(chr(4), 3000000))",
    )
    .await;
}
