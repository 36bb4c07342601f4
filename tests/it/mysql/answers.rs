//! SQL answers of MySQL projects within the answer budget while they are built (`api::answers`,
//! `mysql::sql`): the same bounds as PostgreSQL's (`crate::sql::answers`).

use serde_json::json;

use crate::sql::answers::{send_sql, sql_from, status_of, wait_in_flight, Peak};
use crate::support::spawn_app_with;

const MIB: u64 = 1024 * 1024;

/// Eight rows of a million characters, a tenth of a second apart: an answer of ~8 MB that
/// takes a while to build.
const SLOW_LARGE: &str = "WITH RECURSIVE n(i) AS (SELECT 1 UNION ALL SELECT i + 1 FROM n \
                          WHERE i < 8) SELECT REPEAT('x', 1000000) AS x FROM n WHERE SLEEP(0.1) = 0";

/// As on PostgreSQL: the answer is reserved while its rows are rendered (the gauge grows in
/// steps), and with a built answer held for a slow client a reader's and a writer's builds at
/// once are stopped within the budget: the reader answered 429, the writer's script run to
/// its end and answered without rows, its INSERT there once.
#[tokio::test]
async fn mysql_answers_are_reserved_while_they_are_built_and_builds_stay_within_the_budget() {
    const BUDGET: u64 = 16 * MIB;
    const USABLE: u64 = BUDGET - BUDGET / 8;
    let url = crate::support::mariadb::mariadb().await.admin_url.clone();
    let t = spawn_app_with(|c| {
        c.mysql_url = Some(url.into());
        c.max_response_bytes = 8 * MIB as usize;
        c.sql_answer_budget_bytes = BUDGET;
        c.sql_answer_budget_per_address_bytes = BUDGET;
        c.sql_answer_budget_per_project_bytes = BUDGET;
        c.sql_answer_budget_per_account_bytes = BUDGET;
    })
    .await;
    let f = t.mysql_fixture().await;
    let body = t
        .sql(&f.admin, &f.project, "CREATE TABLE log (v text)")
        .await;
    assert_eq!(body["success"], true, "{body}");

    let peak = Peak::watch(&t);
    let mut held = send_sql(&t, "127.0.0.2", &f.read, &f.project, SLOW_LARGE).await;
    wait_in_flight(
        &t,
        BUDGET,
        |h| (2 * MIB..=5 * MIB).contains(&h),
        "the answer reserved while it is built",
    )
    .await;
    let (status, body) = status_of(&mut held, 4096).await;
    assert_eq!((status, body), (200, None));
    wait_in_flight(&t, BUDGET, |h| h > 8_000_000, "the built answer held").await;
    assert!(peak.end().await <= USABLE);

    let peak = Peak::watch(&t);
    let mut reader = send_sql(&t, "127.0.0.3", &f.read, &f.project, SLOW_LARGE).await;
    let script = format!("INSERT INTO log VALUES ('w'); {SLOW_LARGE}");
    let mut writer = send_sql(&t, "127.0.0.4", &f.readwrite, &f.project, &script).await;
    let (status, body) = status_of(&mut reader, 1 << 20).await;
    let body = body.unwrap();
    assert_eq!(
        (status, &body["error"]["code"]),
        (429, &json!("RATE_LIMIT"))
    );
    assert!(
        body["error"]["message"]
            .as_str()
            .unwrap()
            .contains("sql_answer_budget_bytes"),
        "{body}"
    );
    let (status, body) = status_of(&mut writer, 1 << 20).await;
    let body = body.unwrap();
    assert_eq!(status, 200, "{body}");
    assert_eq!(body["success"], true);
    assert_eq!(body["result"]["rows"], json!([]));
    assert_eq!(body["result"]["truncated"], true);
    assert_eq!(body["result"]["rowCount"], 8);
    let peak = peak.end().await;
    assert!(peak <= USABLE, "{peak} bytes held at once");
    assert_eq!(
        t.app
            .metrics
            .sql_answer_builds_stopped
            .load(std::sync::atomic::Ordering::Relaxed),
        2
    );
    wait_in_flight(
        &t,
        BUDGET,
        |h| h < 8_100_000,
        "the stopped builds gave back",
    )
    .await;
    drop(held);
    wait_in_flight(&t, BUDGET, |h| h == 0, "the budget came back").await;
    let (status, _, body) = sql_from(
        &t,
        "127.0.0.5",
        &f.read,
        &f.project,
        "SELECT COUNT(*) AS n FROM log",
    )
    .await;
    assert_eq!(
        (status, &body["result"]["rows"]),
        (200, &json!([{ "n": 1 }]))
    );
    t.stop().await;
}
