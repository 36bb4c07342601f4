//! The SQL connections of one account's MySQL projects together (`sql_account_connections`),
//! beside each project's share (red team rt5).

use serde_json::{json, Value};

use crate::sql::shares::another_project;
use crate::support::spawn_app_with;

/// Sessions of `projects`' accounts on the shared MariaDB running `SLEEP`.
async fn sleeping(projects: &[&str]) -> usize {
    let users: Vec<String> = projects
        .iter()
        .map(|p| format!("USER LIKE 'fx\\_{p}\\_%'"))
        .collect();
    let rows = crate::support::mariadb::mariadb()
        .await
        .query(&format!(
            "SELECT COUNT(*) FROM information_schema.PROCESSLIST WHERE ({}) AND INFO LIKE '%SLEEP%'",
            users.join(" OR ")
        ))
        .await;
    rows[0][0].as_deref().unwrap().parse().unwrap()
}

/// One account's two MySQL projects flooding `SLEEP` hold at most half of the MySQL
/// connection budget together (4 of `sql_max_connections = 8`, below the default
/// `sql_account_connections`): past it their requests wait, then get 429 naming
/// `sql_account_connections`, and another account's request is served meanwhile. Without the
/// account's share the two projects hold the whole budget (4 + 4 of 8) and the other account's
/// request is refused naming `sql_max_connections`.
#[tokio::test]
async fn one_accounts_mysql_projects_cannot_hold_the_connections_another_account_needs() {
    let url = crate::support::mariadb::mariadb().await.admin_url.clone();
    let app = spawn_app_with(|c| {
        c.mysql_url = Some(url.into());
        c.sql_max_connections = 8;
        c.sql_project_connections = 4;
        c.sql_queue_timeout_ms = 2_000;
    })
    .await;
    let noisy = app.mysql_fixture().await;
    let (second, second_read) = another_project(&app, &noisy.token, "mysql").await;
    let quiet = app.mysql_fixture().await;
    let projects = [noisy.project.as_str(), second.as_str()];

    let attack: Vec<_> = (0..10)
        .map(|i| {
            let (key, project) = if i % 2 == 0 {
                (&noisy.read, &noisy.project)
            } else {
                (&second_read, &second)
            };
            app.spawn_sql(key, project, "SELECT SLEEP(8) AS s")
        })
        .collect();
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(60);
    while sleeping(&projects).await < 4 {
        assert!(
            !attack.iter().all(|t| t.is_finished()),
            "the account's requests were all answered before four of them ran"
        );
        assert!(
            std::time::Instant::now() < deadline,
            "the account's statements never ran"
        );
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    }

    // Meanwhile another account is answered.
    assert_eq!(
        app.rows(&quiet.read, &quiet.project, "SELECT 41 + 1 AS answer")
            .await,
        vec![json!({ "answer": 42 })]
    );
    let running = sleeping(&projects).await;
    assert!(
        running <= 4,
        "{running} statements of the account run at once"
    );

    let (mut answered, mut by_account) = (0, 0);
    for task in attack {
        let (status, body) = task.await.unwrap();
        let body: Value = serde_json::from_str(&body).unwrap();
        match status {
            200 => answered += 1,
            429 => {
                assert_eq!(body["error"]["code"], "RATE_LIMIT", "{body}");
                let message = body["error"]["message"].as_str().unwrap();
                if message.contains("sql_account_connections = 16, here half of the server's 8") {
                    by_account += 1;
                }
            }
            other => panic!("{other}: {body}"),
        }
    }
    assert!(
        answered >= 4 && by_account > 0,
        "{answered} answered, {by_account} refused by the account's share"
    );
    assert_eq!(
        app.rows(&second_read, &second, "SELECT 1 AS one").await,
        vec![json!({ "one": 1 })]
    );
    app.stop().await;
}
