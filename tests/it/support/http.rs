//! HTTP to a server known only by its base URL (a `fluxbase serve` child process), where there is
//! no `TestApp` to ask.

use std::time::Duration;

use serde_json::{json, Value};

use super::fixtures::Project;

/// Sends `method path` with an optional bearer token and a JSON body (none when `body` is
/// null); returns (status, body), a body that is not JSON as `{ "raw": text }`.
pub async fn call(
    base: &str,
    method: &str,
    path: &str,
    token: Option<&str>,
    body: Value,
) -> (u16, Value) {
    let http = reqwest::Client::builder()
        .timeout(Duration::from_secs(120))
        .build()
        .unwrap();
    let mut req = http.request(method.parse().unwrap(), format!("{base}{path}"));
    if let Some(t) = token {
        req = req.bearer_auth(t);
    }
    if !body.is_null() {
        req = req.json(&body);
    }
    let resp = req.send().await.expect("request");
    let status = resp.status().as_u16();
    let text = resp.text().await.unwrap();
    (
        status,
        serde_json::from_str(&text).unwrap_or_else(|_| json!({ "raw": text })),
    )
}

/// Runs SQL that must succeed; returns its rows.
pub async fn sql(base: &str, key: &str, project: &str, query: &str) -> Vec<Value> {
    let (status, body) = call(
        base,
        "POST",
        "/api/execute-sql",
        Some(key),
        json!({ "projectId": project, "query": query }),
    )
    .await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(body["success"], true, "{query}: {body}");
    body["result"]["rows"].as_array().unwrap().clone()
}

/// `POST /api/realtime/broadcast` of `event` to the project's room.
pub async fn rest_broadcast(base: &str, p: &Project, event: &str) {
    let (status, body) = call(
        base,
        "POST",
        "/api/realtime/broadcast",
        Some(&p.readwrite),
        json!({ "projectId": p.project, "event": event, "payload": { "via": "rest" } }),
    )
    .await;
    assert_eq!(status, 200, "{body}");
}

/// Asserts a team change was refused because it would leave the project without an owner: 409
/// `CONFLICT` naming the last owner.
pub fn assert_last_owner(status: u16, body: &Value) {
    assert_eq!(status, 409, "{body}");
    assert_eq!(body["success"], false, "{body}");
    assert_eq!(body["error"]["code"], "CONFLICT", "{body}");
    assert!(
        body["error"]["message"]
            .as_str()
            .is_some_and(|m| m.contains("last owner")),
        "{body}"
    );
}
