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
