//! Realtime: real WebSocket clients against the real server, fed by the change stream.

use std::time::Duration;

use futures_util::{SinkExt, StreamExt};
use serde_json::{json, Value};
use tokio_tungstenite::tungstenite::Message;

use crate::support::{spawn_app, TestApp};

pub type Socket =
    tokio_tungstenite::WebSocketStream<tokio_tungstenite::MaybeTlsStream<tokio::net::TcpStream>>;

pub async fn connect(app: &TestApp, path: &str) -> Socket {
    let url = format!("{}{path}", app.base.replacen("http", "ws", 1));
    tokio_tungstenite::connect_async(url)
        .await
        .expect("websocket connect")
        .0
}

pub async fn send(ws: &mut Socket, v: Value) {
    ws.send(Message::text(v.to_string())).await.unwrap();
}

/// The next JSON message (skipping pings), within 20 s.
pub async fn recv(ws: &mut Socket) -> Value {
    loop {
        let m = tokio::time::timeout(Duration::from_secs(20), ws.next())
            .await
            .expect("no message within 20 s")
            .expect("socket closed")
            .expect("socket error");
        if let Message::Text(t) = m {
            return serde_json::from_str(&t).unwrap();
        }
    }
}

pub async fn subscribe(ws: &mut Socket, project: &str, token: Option<&str>) -> Value {
    let mut msg = json!({ "type": "subscribe", "roomId": format!("project_{project}") });
    if let Some(t) = token {
        msg["token"] = json!(t);
    }
    send(ws, msg).await;
    recv(ws).await
}

#[tokio::test]
async fn a_subscribed_socket_receives_row_changes_and_schema_updates() {
    let app = spawn_app().await;
    let f = app.fixture().await;
    let mut ws = connect(&app, "/").await;
    let ack = subscribe(&mut ws, &f.project, Some(&f.read)).await;
    assert_eq!(
        ack,
        json!({ "type": "subscribed", "roomId": format!("project_{}", f.project) })
    );
    app.rows(
        &f.admin,
        &f.project,
        "CREATE TABLE todo (id int PRIMARY KEY, title text)",
    )
    .await;
    let m = recv(&mut ws).await;
    assert_eq!(m["type"], "schema_update");
    assert_eq!(m["payload"]["event_type"], "schema_update");
    assert_eq!(m["payload"]["command"], "CREATE TABLE");
    app.rows(
        &f.readwrite,
        &f.project,
        "INSERT INTO todo VALUES (1, 'write tests')",
    )
    .await;
    let m = recv(&mut ws).await;
    assert_eq!(m["type"], "db_event");
    assert_eq!(m["roomId"], format!("project_{}", f.project));
    assert_eq!(m["payload"]["operation"], "INSERT");
    assert_eq!(
        m["payload"]["record"],
        json!({ "id": 1, "title": "write tests" })
    );
}
