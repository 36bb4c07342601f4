//! The WebSocket client side of realtime: connect, send, receive within a deadline, subscribe.
//!
//! Every receive has a deadline and fails loudly: a message that never comes is a test failure,
//! not a hang.

use std::time::Duration;

use futures_util::{SinkExt, StreamExt};
use serde_json::{json, Value};
use tokio_tungstenite::tungstenite::Message;

use super::app::TestApp;
use super::fixtures::Project;

pub type Socket =
    tokio_tungstenite::WebSocketStream<tokio_tungstenite::MaybeTlsStream<tokio::net::TcpStream>>;

/// A socket on the server's `path`.
pub async fn connect(app: &TestApp, path: &str) -> Socket {
    connect_to(&app.base, path).await
}

/// A socket on `path` of the server at `base` (its HTTP URL).
pub async fn connect_to(base: &str, path: &str) -> Socket {
    let url = format!("{}{path}", base.replacen("http", "ws", 1));
    tokio_tungstenite::connect_async(url)
        .await
        .expect("websocket connect")
        .0
}

pub async fn send(ws: &mut Socket, v: Value) {
    ws.send(Message::text(v.to_string())).await.unwrap();
}

/// The next JSON message (skipping pings), within `wait`; a close from the server fails.
pub async fn recv_within(ws: &mut Socket, wait: Duration) -> Value {
    loop {
        let m = tokio::time::timeout(wait, ws.next())
            .await
            .unwrap_or_else(|_| panic!("no message within {wait:?}"))
            .unwrap_or_else(|| panic!("socket closed"))
            .unwrap_or_else(|e| panic!("socket error: {e}"));
        match m {
            Message::Text(t) => return serde_json::from_str(&t).unwrap(),
            Message::Close(c) => panic!("closed by the server: {c:?}"),
            _ => {}
        }
    }
}

/// The next JSON message (skipping pings), within 20 s.
pub async fn recv(ws: &mut Socket) -> Value {
    recv_within(ws, Duration::from_secs(20)).await
}

/// The next JSON message (skipping pings), within 30 s: for a server process under load.
pub async fn next(ws: &mut Socket) -> Value {
    recv_within(ws, Duration::from_secs(30)).await
}

pub fn room(project: &str) -> String {
    format!("project_{project}")
}

/// Subscribes to the project's room (with `token`, if any); the answer.
pub async fn subscribe(ws: &mut Socket, project: &str, token: Option<&str>) -> Value {
    let mut msg = json!({ "type": "subscribe", "roomId": room(project) });
    if let Some(t) = token {
        msg["token"] = json!(t);
    }
    send(ws, msg).await;
    recv(ws).await
}

/// A socket on the server at `base` subscribed to the project with its read key (`since`:
/// resuming after that id).
pub async fn subscribed(base: &str, p: &Project, since: Option<&str>) -> Socket {
    let mut ws = connect_to(base, "/").await;
    let mut msg = json!({ "type": "subscribe", "roomId": room(&p.project), "token": p.read });
    if let Some(s) = since {
        msg["since"] = json!(s);
    }
    send(&mut ws, msg).await;
    let m = next(&mut ws).await;
    assert_eq!(m["type"], "subscribed", "{m}");
    ws
}

/// `(record.id, event id)` of the next message, asserted to be a row change.
pub async fn row(ws: &mut Socket) -> (i64, String) {
    let m = next(ws).await;
    assert_eq!(m["type"], "db_event", "{m}");
    (
        m["payload"]["record"]["id"].as_i64().unwrap(),
        m["payload"]["id"].as_str().unwrap().to_string(),
    )
}

/// Sends a ping and asserts the next message is its pong: nothing else was queued before it.
pub async fn nothing_more(ws: &mut Socket) {
    send(ws, json!({ "type": "ping" })).await;
    let m = next(ws).await;
    assert_eq!(m, json!({ "type": "pong" }), "unexpected message");
}

/// A broadcast message without its `id`, once checked that it has one in the id scheme
/// (`<16 hex>-<8 hex>` from SQL, `<16 hex>-<8 hex>-<8 hex>` from a client or the REST API).
pub fn without_id(mut m: Value) -> Value {
    let id = m["id"].as_str().unwrap_or_else(|| panic!("no id in {m}"));
    let parts: Vec<&str> = id.split('-').collect();
    assert!(
        matches!(parts.len(), 2 | 3)
            && parts[0].len() == 16
            && parts[1..].iter().all(|p| p.len() == 8)
            && parts
                .iter()
                .all(|p| p.bytes().all(|b| b.is_ascii_hexdigit())),
        "{m}"
    );
    m.as_object_mut().unwrap().remove("id");
    m
}
