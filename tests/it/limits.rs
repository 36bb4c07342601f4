//! Bounded resources: one tenant cannot hurt another, and anonymous clients cannot hurt anyone.
//! Each test is an attack from issue 13 run against the real server.

use serde_json::{json, Value};

use crate::support::process::ServerProcess;
use crate::support::{spawn_app_with, unique};

const MIB: usize = 1024 * 1024;

async fn post(base: &str, path: &str, token: Option<&str>, body: Value) -> (u16, String) {
    let mut req = reqwest::Client::new()
        .post(format!("{base}{path}"))
        .json(&body);
    if let Some(t) = token {
        req = req.bearer_auth(t);
    }
    let resp = req.send().await.expect("request failed");
    (resp.status().as_u16(), resp.text().await.unwrap())
}

/// Signs up and creates a project on a server started as a child process; returns its read key
/// and project id.
async fn project_on(base: &str) -> (String, String) {
    let email = format!("{}@example.com", unique("user"));
    let (status, body) = post(
        base,
        "/api/auth/signup",
        None,
        json!({ "email": email, "password": "correct horse battery" }),
    )
    .await;
    assert_eq!(status, 201, "{body}");
    let token = serde_json::from_str::<Value>(&body).unwrap()["token"]
        .as_str()
        .unwrap()
        .to_string();
    let (status, body) = post(
        base,
        "/api/projects",
        Some(&token),
        json!({ "name": "big" }),
    )
    .await;
    assert_eq!(status, 201, "{body}");
    let body: Value = serde_json::from_str(&body).unwrap();
    (
        body["apiKeys"]["read"].as_str().unwrap().to_string(),
        body["project"]["id"].as_str().unwrap().to_string(),
    )
}

#[tokio::test]
async fn a_huge_result_answers_truncated_below_the_cap_and_the_server_memory_stays_flat() {
    let cap = 4 * MIB;
    let server = ServerProcess::start(&[("FLUXBASE_MAX_RESPONSE_BYTES", &cap.to_string())]).await;
    let (read, project) = project_on(&server.base).await;
    let sql = |query: &str| {
        post(
            &server.base,
            "/api/execute-sql",
            Some(&read),
            json!({ "projectId": project, "query": query }),
        )
    };
    let (status, body) = sql("SELECT 1 AS warm").await;
    assert_eq!(status, 200, "{body}");
    let before = server.peak_rss();

    // 400 MB of rows: without a byte cap the server keeps them all and renders them again.
    let (status, body) =
        sql("SELECT repeat('x', 1000000) AS blob FROM generate_series(1, 400)").await;
    assert_eq!(status, 200);
    assert!(body.len() <= cap, "the answer is {} bytes", body.len());
    let parsed: Value = serde_json::from_str(&body).unwrap();
    assert_eq!(parsed["success"], true, "{}", &body[..200.min(body.len())]);
    assert_eq!(parsed["result"]["truncated"], true);
    let rows = parsed["result"]["rows"].as_array().unwrap();
    assert!(!rows.is_empty() && rows.len() < 400, "{} rows", rows.len());
    assert_eq!(rows[0]["blob"].as_str().unwrap().len(), 1_000_000);
    assert_eq!(parsed["result"]["rowCount"], 400);

    let grown = server.peak_rss().saturating_sub(before);
    assert!(
        grown < 100 * MIB as u64,
        "the server's peak RSS grew by {} MiB for a capped answer",
        grown / MIB as u64
    );

    // The connection that dropped those rows serves the next request normally.
    let (status, body) = sql("SELECT 2 AS next").await;
    assert_eq!(status, 200);
    let parsed: Value = serde_json::from_str(&body).unwrap();
    assert_eq!(parsed["result"]["rows"], json!([{ "next": 2 }]), "{body}");
}

#[tokio::test]
async fn a_single_row_larger_than_the_cap_is_dropped_and_the_key_keeps_working() {
    let app = spawn_app_with(|c| c.max_response_bytes = MIB).await;
    let f = app.fixture().await;
    for query in [
        "SELECT repeat('y', 5000000) AS blob",
        "SELECT 1 AS a; SELECT repeat('y', 5000000) AS blob",
    ] {
        let (status, body) = app
            .call(
                "POST",
                "/api/execute-sql",
                Some(&f.read),
                Some(json!({ "projectId": f.project, "query": query })),
            )
            .await;
        assert_eq!(status, 200, "{body}");
        assert_eq!(body["success"], true, "{body}");
        assert_eq!(body["result"]["rows"], json!([]), "{query}");
        assert_eq!(body["result"]["truncated"], true, "{query}");
        assert_eq!(body["result"]["rowCount"], 1, "{query}");
    }
    // Small rows before the big one are kept; nothing after it is.
    let body = app
        .sql(
            &f.read,
            &f.project,
            "SELECT n, CASE WHEN n = 3 THEN repeat('z', 3000000) ELSE 'small' END AS v
             FROM generate_series(1, 5) n ORDER BY n",
        )
        .await;
    assert_eq!(body["result"]["truncated"], true, "{body}");
    assert_eq!(
        body["result"]["rows"],
        json!([{ "n": 1, "v": "small" }, { "n": 2, "v": "small" }])
    );
    assert_eq!(
        app.rows(&f.read, &f.project, "SELECT 'ok' AS fine").await,
        vec![json!({ "fine": "ok" })]
    );
    // JSON escapes count against the cap too: 400 KiB of quotes render as 800 KiB each.
    let body = app
        .sql(
            &f.read,
            &f.project,
            "SELECT repeat('\"', 400 * 1024) AS q FROM generate_series(1, 3)",
        )
        .await;
    assert_eq!(body["result"]["truncated"], true);
    assert_eq!(body["result"]["rows"].as_array().unwrap().len(), 1);
    app.stop().await;
}
