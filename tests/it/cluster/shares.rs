//! `sql_account_connections` in cluster mode: each node takes `ceil(bound / nodes)`, as for
//! `sql_project_connections`.

use std::time::Duration;

use serde_json::{json, Value};

use super::bounded;
use crate::support::fixtures;
use crate::support::http::call;
use crate::support::nodes::Nodes;

/// Two nodes split an account share of 6: one node runs at most 3 of the account's requests at
/// once, though its two projects' shares (2 each on the node) allow 4, and the fourth gets 429
/// naming the node's share of `sql_account_connections`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn each_node_takes_its_share_of_an_accounts_connections() {
    bounded(Duration::from_secs(600), async {
        let nodes = Nodes::start(
            2,
            &[
                ("FLUXBASE_SQL_PROJECT_CONNECTIONS", "4"),
                ("FLUXBASE_SQL_ACCOUNT_CONNECTIONS", "6"),
                ("FLUXBASE_SQL_QUEUE_TIMEOUT_MS", "2000"),
            ],
        )
        .await;
        let base = nodes.base(0);
        let token = fixtures::signup_on(base).await;
        let mut projects = Vec::new();
        for _ in 0..2 {
            projects.push(fixtures::new_project_on(base, &token, "postgresql").await);
        }
        // The nodes have seen each other (a leadership tick is 500 ms).
        tokio::time::sleep(Duration::from_secs(2)).await;
        let requests = (0..4).map(|i| {
            let p = &projects[i % 2];
            call(
                base,
                "POST",
                "/api/execute-sql",
                Some(&p.read),
                json!({ "projectId": p.project, "query": "SELECT pg_sleep(6)" }),
            )
        });
        let answers: Vec<(u16, Value)> = futures_util::future::join_all(requests).await;
        let answered = answers.iter().filter(|(s, _)| *s == 200).count();
        for (status, body) in &answers {
            match status {
                200 => assert_eq!(body["success"], true, "{body}"),
                429 => {
                    assert_eq!(body["error"]["code"], "RATE_LIMIT", "{body}");
                    let message = body["error"]["message"].as_str().unwrap();
                    assert!(
                        message.contains("sql_account_connections = 6 across 2 nodes"),
                        "{message}"
                    );
                }
                other => panic!("{other}: {body}"),
            }
        }
        assert_eq!(answered, 3, "{answers:?}");
    })
    .await;
}

/// Red team rt18: every node sized the SQL connection budget from the same database cluster as
/// if it were alone, so three nodes promised PostgreSQL more connections than it had and other
/// tenants' requests failed with "too many clients". Two nodes split a budget of 4: one node
/// runs at most 2 statements at once, whatever the project and account shares allow, and
/// says so in `/metrics`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn each_node_takes_its_share_of_the_connection_budget() {
    bounded(Duration::from_secs(600), async {
        let nodes = Nodes::start(
            2,
            &[
                ("FLUXBASE_SQL_MAX_CONNECTIONS", "4"),
                ("FLUXBASE_SQL_PROJECT_CONNECTIONS", "8"),
                ("FLUXBASE_SQL_ACCOUNT_CONNECTIONS", "0"),
                ("FLUXBASE_SQL_QUEUE_TIMEOUT_MS", "1500"),
            ],
        )
        .await;
        let base = nodes.base(0);
        let token = fixtures::signup_on(base).await;
        let p = fixtures::new_project_on(base, &token, "postgresql").await;
        // The nodes have seen each other (a leadership tick is 500 ms).
        tokio::time::sleep(Duration::from_secs(2)).await;
        let requests = (0..4).map(|_| {
            call(
                base,
                "POST",
                "/api/execute-sql",
                Some(&p.read),
                json!({ "projectId": p.project, "query": "SELECT pg_sleep(4)" }),
            )
        });
        let answers: Vec<(u16, Value)> = futures_util::future::join_all(requests).await;
        let answered = answers.iter().filter(|(s, _)| *s == 200).count();
        for (status, body) in &answers {
            if *status != 200 {
                let message = body["error"]["message"].as_str().unwrap_or_default();
                assert!(
                    message.contains("All 2 SQL connections"),
                    "{status}: {body}"
                );
            }
        }
        assert_eq!(answered, 2, "{answers:?}");
        let metrics = reqwest::get(format!("{base}/metrics"))
            .await
            .unwrap()
            .text()
            .await
            .unwrap();
        assert!(
            metrics
                .lines()
                .any(|l| l.starts_with("fluxbase_sql_connection_budget") && l.ends_with(" 2")),
            "{metrics}"
        );
    })
    .await;
}
