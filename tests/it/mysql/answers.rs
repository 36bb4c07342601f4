//! SQL answers of MySQL projects within the answer budget while they are built (`api::answers`,
//! `mysql::sql`): the same bounds as PostgreSQL's (`crate::sql::answers`).

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
    let url = crate::support::mariadb::mariadb().await.admin_url.clone();
    crate::sql::answers::builds_stay_within_the_budget(Some(url), SLOW_LARGE).await;
}
