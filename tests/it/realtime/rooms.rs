//! Realtime: real WebSocket clients against the real server, fed by the change stream.
//!
//! Negative checks ("this did not arrive") use a sentinel instead of waiting for silence: events
//! reach a socket in commit order, so once a later event (or the `pong` to a later `ping`) has
//! arrived, anything that should have come before it would already have been seen.

use std::collections::HashSet;
use std::time::Duration;

use futures_util::{SinkExt, StreamExt};
use serde_json::{json, Value};
use tokio_tungstenite::tungstenite::protocol::frame::coding::CloseCode;
use tokio_tungstenite::tungstenite::Message;

use crate::support::cluster::slot_confirmed;
use crate::support::fixtures::{project, Project};
use crate::support::process::ServerProcess;
use crate::support::ws::{
    self, connect, nothing_more, recv, room, send, subscribe, without_id, Socket,
};
use crate::support::{spawn_app, spawn_app_with, Fixture, TestApp};

/// Sends `msg` (a subscribe) and asserts the answer is `subscribed`.
async fn subscribed(ws: &mut Socket, msg: Value) {
    let room_id = msg["roomId"].clone();
    send(ws, msg).await;
    assert_eq!(
        recv(ws).await,
        json!({ "type": "subscribed", "roomId": room_id })
    );
}

/// A socket at `/` subscribed to the fixture's project with its read key.
async fn subscribed_socket(app: &TestApp, f: &Fixture) -> Socket {
    let mut ws = connect(app, "/").await;
    let ack = subscribe(&mut ws, &f.project, Some(&f.read)).await;
    assert_eq!(ack["type"], "subscribed", "{ack}");
    ws
}

/// Asserts the answer to a subscribe is an error with `code` for that room.
async fn refused(ws: &mut Socket, msg: Value, code: &str) {
    let room_id = msg["roomId"].clone();
    send(ws, msg).await;
    let m = recv(ws).await;
    assert_eq!(m["type"], "error", "{m}");
    assert_eq!(m["code"], code, "{m}");
    assert_eq!(m["roomId"], room_id, "{m}");
    assert!(m["message"].as_str().is_some_and(|s| !s.is_empty()), "{m}");
}

/// The next message, asserted to be a db_event; returns its payload.
async fn db_event(ws: &mut Socket) -> Value {
    let m = recv(ws).await;
    assert_eq!(m["type"], "db_event", "{m}");
    m["payload"].clone()
}

/// `(operation, record.id)` of the db_events that arrive before the next schema_update.
async fn rows_until_schema_update(ws: &mut Socket) -> Vec<(String, i64)> {
    let mut seen = Vec::new();
    loop {
        let m = recv(ws).await;
        match m["type"].as_str() {
            Some("schema_update") => return seen,
            Some("db_event") => seen.push((
                m["payload"]["operation"].as_str().unwrap().to_string(),
                m["payload"]["record"]["id"].as_i64().unwrap(),
            )),
            _ => panic!("unexpected message {m}"),
        }
    }
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

#[tokio::test]
async fn inserts_updates_deletes_ddl_and_truncate_arrive_with_the_guides_shapes() {
    let app = spawn_app().await;
    let f = app.fixture().await;
    let mut ws = subscribed_socket(&app, &f).await;
    let room_id = room(&f.project);

    app.rows(
        &f.admin,
        &f.project,
        "CREATE TABLE orders (id int PRIMARY KEY, amount numeric, status text)",
    )
    .await;
    let m = recv(&mut ws).await;
    assert_eq!(m["type"], "schema_update", "{m}");
    assert_eq!(m["roomId"], room_id);
    let p = &m["payload"];
    assert_eq!(p["event_type"], "schema_update");
    assert_eq!(p["command"], "CREATE TABLE");
    assert_eq!(p["objectType"], "table");
    assert_eq!(p["schema"], "public");
    assert_eq!(p["table"], "orders");
    assert_eq!(p["object"], "public.orders");
    assert!(
        p["id"].is_string() && p["commitTimestamp"].is_string(),
        "{p}"
    );

    app.rows(
        &f.readwrite,
        &f.project,
        "INSERT INTO orders VALUES (1, 59.99, 'pending')",
    )
    .await;
    app.rows(
        &f.readwrite,
        &f.project,
        "UPDATE orders SET status = 'paid' WHERE id = 1",
    )
    .await;
    app.rows(&f.admin, &f.project, "DELETE FROM orders WHERE id = 1")
        .await;
    let insert = db_event(&mut ws).await;
    let update = db_event(&mut ws).await;
    let delete = db_event(&mut ws).await;
    let pending = json!({ "id": 1, "amount": 59.99, "status": "pending" });
    let paid = json!({ "id": 1, "amount": 59.99, "status": "paid" });
    for (p, op, record, old) in [
        (&insert, "INSERT", &pending, &Value::Null),
        (&update, "UPDATE", &paid, &pending),
        (&delete, "DELETE", &paid, &paid),
    ] {
        assert_eq!(p["operation"], op, "{p}");
        assert_eq!(p["schema"], "public", "{p}");
        assert_eq!(p["table"], "orders", "{p}");
        assert_eq!(&p["record"], record, "{p}");
        assert_eq!(&p["old"], old, "{p}");
        for field in ["id", "commitTimestamp", "lsn"] {
            assert!(p[field].is_string(), "{field} in {p}");
        }
    }
    let ids = [&insert, &update, &delete].map(|p| p["id"].as_str().unwrap().to_string());
    assert!(ids[0] < ids[1] && ids[1] < ids[2], "{ids:?}");

    app.rows(
        &f.admin,
        &f.project,
        "INSERT INTO orders VALUES (2, 1, 'x')",
    )
    .await;
    db_event(&mut ws).await;
    app.rows(&f.admin, &f.project, "TRUNCATE orders").await;
    let m = recv(&mut ws).await;
    assert_eq!(m["type"], "schema_update", "{m}");
    assert_eq!(m["payload"]["event_type"], "schema_update");
    assert_eq!(m["payload"]["command"], "TRUNCATE");
    assert_eq!(m["payload"]["table"], "orders");

    app.rows(
        &f.admin,
        &f.project,
        "ALTER TABLE orders ADD COLUMN note text; DROP TABLE orders",
    )
    .await;
    for command in ["ALTER TABLE", "DROP TABLE"] {
        let m = recv(&mut ws).await;
        assert_eq!(m["type"], "schema_update", "{m}");
        assert_eq!(m["payload"]["event_type"], "schema_update");
        assert_eq!(m["payload"]["command"], command, "{m}");
    }
    nothing_more(&mut ws).await;
}

#[tokio::test]
async fn the_upgrade_is_accepted_at_the_root_and_at_slash_realtime() {
    let app = spawn_app().await;
    let f = app.fixture().await;
    app.rows(&f.admin, &f.project, "CREATE TABLE t (id int)")
        .await;
    let mut root = connect(&app, "/").await;
    let mut realtime = connect(&app, "/realtime").await;
    for ws in [&mut root, &mut realtime] {
        let ack = subscribe(ws, &f.project, Some(&f.read)).await;
        assert_eq!(ack["type"], "subscribed", "{ack}");
    }
    app.rows(&f.admin, &f.project, "INSERT INTO t VALUES (7)")
        .await;
    for ws in [&mut root, &mut realtime] {
        assert_eq!(db_event(ws).await["record"], json!({ "id": 7 }));
    }
    let url = format!("{}/elsewhere", app.base.replacen("http", "ws", 1));
    assert!(tokio_tungstenite::connect_async(url).await.is_err());
}

#[tokio::test]
async fn one_socket_joins_several_project_rooms_and_leaves_one_with_unsubscribe() {
    let app = spawn_app().await;
    let a = app.fixture().await;
    let b = app.fixture().await;
    for f in [&a, &b] {
        app.rows(&f.admin, &f.project, "CREATE TABLE t (id int)")
            .await;
    }
    let mut ws = connect(&app, "/realtime").await;
    for f in [&a, &b] {
        let ack = subscribe(&mut ws, &f.project, Some(&f.read)).await;
        assert_eq!(
            ack,
            json!({ "type": "subscribed", "roomId": room(&f.project) })
        );
    }
    app.rows(&a.admin, &a.project, "INSERT INTO t VALUES (1)")
        .await;
    let m = recv(&mut ws).await;
    assert_eq!(
        (&m["roomId"], &m["payload"]["record"]["id"]),
        (&json!(room(&a.project)), &json!(1))
    );
    app.rows(&b.admin, &b.project, "INSERT INTO t VALUES (2)")
        .await;
    let m = recv(&mut ws).await;
    assert_eq!(
        (&m["roomId"], &m["payload"]["record"]["id"]),
        (&json!(room(&b.project)), &json!(2))
    );

    send(
        &mut ws,
        json!({ "type": "unsubscribe", "roomId": room(&a.project) }),
    )
    .await;
    assert_eq!(
        recv(&mut ws).await,
        json!({ "type": "unsubscribed", "roomId": room(&a.project) })
    );
    app.rows(&a.admin, &a.project, "INSERT INTO t VALUES (3)")
        .await;
    // Once a watcher of A has 4, anything of A's for this socket would be queued ahead of B's 5.
    let mut watcher = subscribed_socket(&app, &a).await;
    app.rows(&a.admin, &a.project, "INSERT INTO t VALUES (4)")
        .await;
    assert_eq!(db_event(&mut watcher).await["record"]["id"], 4);
    app.rows(&b.admin, &b.project, "INSERT INTO t VALUES (5)")
        .await;
    let m = recv(&mut ws).await;
    assert_eq!(
        (&m["roomId"], &m["payload"]["record"]["id"]),
        (&json!(room(&b.project)), &json!(5))
    );
    nothing_more(&mut ws).await;
}

#[tokio::test]
async fn ping_is_answered_with_pong() {
    let app = spawn_app().await;
    let mut ws = connect(&app, "/").await;
    send(&mut ws, json!({ "type": "ping" })).await;
    assert_eq!(recv(&mut ws).await, json!({ "type": "pong" }));
}

#[tokio::test]
async fn malformed_json_and_unknown_types_get_bad_message_and_the_socket_stays_open() {
    let app = spawn_app().await;
    let f = app.fixture().await;
    app.rows(&f.admin, &f.project, "CREATE TABLE t (id int)")
        .await;
    let mut ws = connect(&app, "/").await;
    for bad in [
        "not json",
        "{\"type\": \"subscribe\"",
        "[1, 2]",
        "{}",
        "{\"type\": \"dance\"}",
        "{\"type\": \"subscribe\"}",
        "{\"type\": 42}",
    ] {
        ws.send(Message::text(bad)).await.unwrap();
        let m = recv(&mut ws).await;
        assert_eq!(m["type"], "error", "{bad}: {m}");
        assert_eq!(m["code"], "BAD_MESSAGE", "{bad}: {m}");
        assert!(m["message"].is_string(), "{m}");
    }
    // Binary frames are not part of the protocol but do not end the connection either.
    ws.send(Message::binary(b"\x00\x01".to_vec()))
        .await
        .unwrap();
    let ack = subscribe(&mut ws, &f.project, Some(&f.read)).await;
    assert_eq!(ack["type"], "subscribed", "{ack}");
    app.rows(&f.admin, &f.project, "INSERT INTO t VALUES (1)")
        .await;
    assert_eq!(db_event(&mut ws).await["record"]["id"], 1);
}

#[tokio::test]
async fn a_change_committed_right_after_subscribed_is_delivered() {
    let app = spawn_app().await;
    let f = app.fixture().await;
    // Committed before any room exists: the room's creation must not replay it to anyone.
    app.rows(
        &f.admin,
        &f.project,
        "CREATE TABLE t (id int PRIMARY KEY); INSERT INTO t VALUES (0)",
    )
    .await;
    // Twenty fresh sockets, each committing as soon as it has `subscribed` (without waiting
    // for earlier events to arrive): socket i gets insert i first, then every later one.
    let mut sockets = Vec::new();
    for i in 1..=20 {
        let ws = subscribed_socket(&app, &f).await;
        app.rows(
            &f.readwrite,
            &f.project,
            &format!("INSERT INTO t VALUES ({i})"),
        )
        .await;
        sockets.push(ws);
    }
    for (ws, i) in sockets.iter_mut().zip(1..) {
        let got = recv_n(ws, 21 - i).await;
        assert_eq!(ids(&got), (i as i64..=20).collect::<Vec<_>>(), "socket {i}");
        nothing_more(ws).await;
    }
}

#[tokio::test]
async fn a_subscribe_without_a_token_is_refused_with_auth_required() {
    let app = spawn_app().await;
    let f = app.fixture().await;
    let mut ws = connect(&app, "/").await;
    let msg = json!({ "type": "subscribe", "roomId": room(&f.project) });
    refused(&mut ws, msg.clone(), "AUTH_REQUIRED").await;
    let mut empty = msg.clone();
    empty["token"] = json!("");
    refused(&mut ws, empty, "AUTH_REQUIRED").await;
    // Not a member of the room: broadcasting is refused as well.
    send(
        &mut ws,
        json!({ "type": "broadcast", "roomId": room(&f.project), "event": "e", "payload": {} }),
    )
    .await;
    assert_eq!(recv(&mut ws).await["code"], "NOT_SUBSCRIBED");
    // The socket stays usable.
    let mut ok = msg;
    ok["token"] = json!(f.read);
    subscribed(&mut ws, ok).await;
}

#[tokio::test]
async fn a_key_or_token_of_another_project_is_refused_with_scope_mismatch() {
    let app = spawn_app().await;
    let a = app.fixture().await;
    let b = app.fixture().await;
    let mut ws = connect(&app, "/").await;
    let msg =
        |token: &str| json!({ "type": "subscribe", "roomId": room(&a.project), "token": token });
    for key in [&b.read, &b.readwrite, &b.admin] {
        refused(&mut ws, msg(key), "SCOPE_MISMATCH").await;
    }
    let b_token = app
        .realtime_token(&b.read, json!({ "projectId": b.project }))
        .await;
    refused(&mut ws, msg(&b_token), "SCOPE_MISMATCH").await;
    // A session of a user who is not a member does not learn whether the project exists.
    send(&mut ws, msg(&b.token)).await;
    let m = recv(&mut ws).await;
    assert_eq!(m["type"], "error", "{m}");
    assert_ne!(m["code"], "SCOPE_MISMATCH", "{m}");
    // An unknown key is refused too.
    send(&mut ws, msg("flx_live_not_a_key")).await;
    assert_eq!(recv(&mut ws).await["type"], "error");
    nothing_more(&mut ws).await;
}

#[tokio::test]
async fn an_expired_realtime_token_is_refused_and_out_of_bounds_requests_are_400() {
    let app = spawn_app().await;
    let f = app.fixture().await;
    let (status, body) = app
        .call(
            "POST",
            "/api/realtime/token",
            Some(&f.read),
            Some(json!({ "projectId": f.project, "expiresIn": 3600 })),
        )
        .await;
    assert_eq!(status, 200, "{body}");
    let token = body["token"].as_str().unwrap().to_string();
    let expires_at: chrono::DateTime<chrono::Utc> =
        body["expiresAt"].as_str().unwrap().parse().unwrap();
    // The server's clock is moved to the expiry: until it, the token subscribes; from it on,
    // it is refused.
    let clock = &app.app.storage.clock;
    let left = (expires_at - clock.now()).num_seconds();
    assert!(
        (3500..=3600).contains(&left),
        "{expires_at} is not an hour away"
    );
    let mut held = connect(&app, "/").await;
    let ack = subscribe(&mut held, &f.project, Some(&token)).await;
    assert_eq!(ack["type"], "subscribed", "{ack}");
    clock.advance(Duration::from_secs(left as u64 + 1));
    // The subscription made with it ends too (red team, session 25: it kept receiving
    // events): TOKEN_EXPIRED for the room, then nothing of later changes.
    let ended = recv(&mut held).await;
    assert_eq!(
        (&ended["type"], &ended["code"]),
        (&json!("error"), &json!("TOKEN_EXPIRED")),
        "{ended}"
    );
    app.rows(
        &f.admin,
        &f.project,
        "CREATE TABLE later (id int); INSERT INTO later VALUES (1)",
    )
    .await;
    nothing_more(&mut held).await;
    let mut ws = connect(&app, "/").await;
    refused(
        &mut ws,
        json!({ "type": "subscribe", "roomId": room(&f.project), "token": token }),
        "TOKEN_EXPIRED",
    )
    .await;
    // Lifetimes outside 1 s ..= 24 h are refused when the token is requested.
    for bad in [0, -5, 86_401] {
        let (status, body) = app
            .call(
                "POST",
                "/api/realtime/token",
                Some(&f.read),
                Some(json!({ "projectId": f.project, "expiresIn": bad })),
            )
            .await;
        assert_eq!(status, 400, "{bad}: {body}");
    }
    // A table list is bounded as a webhook's is (red team rt9 LOW 4: 100,000 names made a
    // 1.2 MB token no socket could send): 101 names, an empty one or one of 257 bytes.
    let many: Vec<String> = (0..101).map(|i| format!("t{i}")).collect();
    for tables in [json!(many), json!([""]), json!(["x".repeat(257)])] {
        let (status, body) = app
            .call(
                "POST",
                "/api/realtime/token",
                Some(&f.read),
                Some(json!({ "projectId": f.project, "tables": tables })),
            )
            .await;
        assert_eq!(status, 400, "{body}");
        assert_eq!(body["error"]["code"], "BAD_REQUEST", "{body}");
    }
    let hundred: Vec<String> = (0..100).map(|i| format!("t{i}")).collect();
    app.realtime_token(
        &f.read,
        json!({ "projectId": f.project, "tables": hundred }),
    )
    .await;
}

#[tokio::test]
async fn a_realtime_token_subscribes_and_its_table_list_restricts_what_arrives() {
    let app = spawn_app().await;
    let f = app.fixture().await;
    app.rows(
        &f.admin,
        &f.project,
        "CREATE TABLE posts (id int); CREATE TABLE secrets (id int)",
    )
    .await;
    let token = app.realtime_token(&f.read,
        json!({ "projectId": f.project, "authUid": "user-42", "tables": ["posts"], "expiresIn": 60 }),
    )
    .await;
    assert!(token.starts_with("flx_rt_"), "{token}");
    let mut ws = connect(&app, "/").await;
    let msg = json!({ "type": "subscribe", "roomId": room(&f.project), "token": token });
    subscribed(&mut ws, msg.clone()).await;
    // A subscriber's own table filter cannot widen the token's list.
    let mut wider = connect(&app, "/").await;
    let mut asks_secrets = msg;
    asks_secrets["filter"] = json!({ "tables": ["secrets", "posts"] });
    subscribed(&mut wider, asks_secrets).await;

    app.rows(
        &f.admin,
        &f.project,
        "INSERT INTO secrets VALUES (1); INSERT INTO posts VALUES (2); INSERT INTO secrets VALUES (3)",
    )
    .await;
    app.rows(&f.admin, &f.project, "INSERT INTO posts VALUES (4)")
        .await;
    for ws in [&mut ws, &mut wider] {
        for id in [2, 4] {
            let p = db_event(ws).await;
            assert_eq!(
                (&p["table"], &p["record"]["id"]),
                (&json!("posts"), &json!(id))
            );
        }
        nothing_more(ws).await;
    }

    // Without a table list the token sees everything.
    let all = app
        .realtime_token(&f.read, json!({ "projectId": f.project }))
        .await;
    let mut ws = connect(&app, "/").await;
    subscribed(
        &mut ws,
        json!({ "type": "subscribe", "roomId": room(&f.project), "token": all }),
    )
    .await;
    app.rows(&f.admin, &f.project, "INSERT INTO secrets VALUES (5)")
        .await;
    assert_eq!(db_event(&mut ws).await["table"], "secrets");
}

#[tokio::test]
async fn a_tampered_realtime_token_is_refused() {
    let app = spawn_app().await;
    let a = app.fixture().await;
    let b = app.fixture().await;
    let token = app
        .realtime_token(
            &b.read,
            json!({ "projectId": b.project, "tables": ["posts"] }),
        )
        .await;
    let (body, sig) = token
        .strip_prefix("flx_rt_")
        .unwrap()
        .split_once('.')
        .unwrap();
    // Claims rewritten for project A (and without the table list), B's signature kept.
    use base64::Engine;
    let b64 = base64::engine::general_purpose::URL_SAFE_NO_PAD;
    let mut claims: Value = serde_json::from_slice(&b64.decode(body).unwrap()).unwrap();
    let json = claims.to_string();
    assert!(json.contains(&b.project), "{json}");
    claims = serde_json::from_str(&json.replace(&b.project, &a.project)).unwrap();
    claims.as_object_mut().unwrap().remove("t");
    let forged = format!("flx_rt_{}.{sig}", b64.encode(claims.to_string()));
    // One flipped character in the signature.
    let mut flipped = token.clone();
    let last = flipped.pop().unwrap();
    flipped.push(if last == 'A' { 'B' } else { 'A' });

    let mut ws = connect(&app, "/").await;
    for (project, bad) in [
        (&a.project, forged),
        (&b.project, flipped),
        (&b.project, format!("{token}x")),
        (&b.project, "flx_rt_garbage".to_string()),
        (&b.project, format!("flx_rt_.{sig}")),
    ] {
        send(
            &mut ws,
            json!({ "type": "subscribe", "roomId": room(project), "token": bad }),
        )
        .await;
        let m = recv(&mut ws).await;
        assert_eq!(m["type"], "error", "{bad}: {m}");
        assert_eq!(m["code"], "AUTH_REQUIRED", "{bad}: {m}");
    }
    nothing_more(&mut ws).await;
}

#[tokio::test]
async fn a_public_project_accepts_a_subscribe_without_a_token() {
    let app = spawn_app().await;
    let f = app.fixture().await;
    app.rows(&f.admin, &f.project, "CREATE TABLE t (id int)")
        .await;
    app.make_realtime_public(&f).await;
    let mut ws = connect(&app, "/").await;
    subscribed(
        &mut ws,
        json!({ "type": "subscribe", "roomId": room(&f.project) }),
    )
    .await;
    app.rows(&f.admin, &f.project, "INSERT INTO t VALUES (1)")
        .await;
    assert_eq!(db_event(&mut ws).await["record"]["id"], 1);
    // ... and a token of another project is still refused there.
    let other = app.fixture().await;
    refused(
        &mut ws,
        json!({ "type": "subscribe", "roomId": room(&f.project), "token": other.read }),
        "SCOPE_MISMATCH",
    )
    .await;
}

#[tokio::test]
async fn a_members_session_token_subscribes() {
    let app = spawn_app().await;
    let f = app.fixture().await;
    app.rows(&f.admin, &f.project, "CREATE TABLE t (id int)")
        .await;
    let mut ws = connect(&app, "/").await;
    let ack = subscribe(&mut ws, &f.project, Some(&f.token)).await;
    assert_eq!(ack["type"], "subscribed", "{ack}");
    app.rows(&f.admin, &f.project, "INSERT INTO t VALUES (1)")
        .await;
    assert_eq!(db_event(&mut ws).await["record"]["id"], 1);
}

#[tokio::test]
async fn a_suspended_project_closes_its_room_and_refuses_new_subscribes() {
    let app = spawn_app().await;
    let f = app.fixture().await;
    let other = app.fixture().await;
    for g in [&f, &other] {
        app.rows(&g.admin, &g.project, "CREATE TABLE t (id int)")
            .await;
    }
    let mut ws = subscribed_socket(&app, &f).await;
    let ack = subscribe(&mut ws, &other.project, Some(&other.read)).await;
    assert_eq!(ack["type"], "subscribed", "{ack}");
    app.app
        .set_project_status(&f.project, fluxbase::projects::ProjectStatus::Suspended)
        .await
        .unwrap();
    let m = recv(&mut ws).await;
    assert_eq!(m["type"], "error", "{m}");
    assert_eq!(m["code"], "PROJECT_SUSPENDED", "{m}");
    assert_eq!(m["roomId"], room(&f.project), "{m}");

    for token in [&f.read, &f.token] {
        refused(
            &mut ws,
            json!({ "type": "subscribe", "roomId": room(&f.project), "token": token }),
            "PROJECT_SUSPENDED",
        )
        .await;
    }
    // The socket's other room goes on.
    app.rows(&other.admin, &other.project, "INSERT INTO t VALUES (1)")
        .await;
    let m = recv(&mut ws).await;
    assert_eq!(m["roomId"], room(&other.project), "{m}");

    // Resumed, the project's room works again.
    app.app
        .set_project_status(&f.project, fluxbase::projects::ProjectStatus::Active)
        .await
        .unwrap();
    let mut ws = subscribed_socket(&app, &f).await;
    app.rows(&f.admin, &f.project, "INSERT INTO t VALUES (2)")
        .await;
    assert_eq!(db_event(&mut ws).await["record"]["id"], 2);
}

/// Kills the project's walsender every 50 ms until dropped (the stream waits 0.5, 1, 2 s…
/// between attempts: reconnecting most of that time).
fn keep_killing_the_walsender(project: &str) -> tokio::task::JoinHandle<()> {
    let kill = format!(
        "SELECT pg_terminate_backend(active_pid) FROM pg_replication_slots \
         WHERE slot_name = 'fluxbase_{project}' AND active_pid IS NOT NULL"
    );
    tokio::spawn(async move {
        let admin = crate::support::pg().await.client("postgres").await;
        loop {
            admin.batch_execute(&kill).await.unwrap();
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    })
}

/// The next message, asserted to be the room's `status` with `state`; its message.
async fn status(ws: &mut Socket, project: &str, state: &str) -> String {
    let m = ws::next(ws).await;
    assert_eq!(
        (&m["type"], &m["state"], &m["roomId"]),
        (&json!("status"), &json!(state), &json!(room(project))),
        "{m}"
    );
    m["message"].as_str().unwrap_or_default().to_string()
}

/// A member who subscribes to the project's degraded room: told `status: degraded` with
/// `message` right after its `subscribed`.
async fn late_member_told(app: &TestApp, f: &Fixture, message: &str) -> Socket {
    let mut late = connect(app, "/").await;
    assert_eq!(
        subscribe(&mut late, &f.project, Some(&f.read)).await["type"],
        "subscribed"
    );
    assert_eq!(status(&mut late, &f.project, "degraded").await, message);
    late
}

/// While the project's stream reconnects (its walsender killed again and again) its members are
/// told `status: degraded`, and so is a member who subscribes meanwhile (after its
/// `subscribed`); then `live` once it streams again, and nothing committed meanwhile is lost
/// (red team rt7 LOW 3: only cluster mode said so; rt8 LOW 2: a late subscriber was not told).
#[tokio::test]
async fn members_are_told_while_the_stream_reconnects_and_lose_nothing() {
    let app = spawn_app().await;
    let f = app.fixture().await;
    let mut ws = subscribed_socket(&app, &f).await;
    app.rows(&f.admin, &f.project, "CREATE TABLE t (id int PRIMARY KEY)")
        .await;
    assert_eq!(recv(&mut ws).await["type"], "schema_update");
    let killer = keep_killing_the_walsender(&f.project);
    let message = status(&mut ws, &f.project, "degraded").await;
    assert!(message.contains("reconnecting"), "{message}");
    assert!(message.contains("Nothing is lost"), "{message}");
    assert!(!message.contains("127.0.0.1"), "no internals: {message}");
    let mut late = late_member_told(&app, &f, &message).await;
    killer.abort();
    let _ = killer.await;
    // Committed while nobody streams: arrives after `live`.
    app.rows(&f.admin, &f.project, "INSERT INTO t VALUES (1)")
        .await;
    for ws in [&mut ws, &mut late] {
        assert_eq!(status(ws, &f.project, "live").await, "");
        assert_eq!(db_event(ws).await["record"]["id"], 1);
        nothing_more(ws).await;
    }
}

/// A stream that stops for good (its slot dropped under it) is never announced `live`: its
/// members are told it stopped and that changes may be lost (red team rt8 M2: they were told
/// "nothing is lost", then `live`).
#[tokio::test]
async fn members_of_a_stream_that_lost_its_slot_are_told_it_stopped_and_never_live() {
    let app = spawn_app().await;
    let f = app.fixture().await;
    let mut ws = subscribed_socket(&app, &f).await;
    app.rows(&f.admin, &f.project, "CREATE TABLE t (id int PRIMARY KEY)")
        .await;
    assert_eq!(recv(&mut ws).await["type"], "schema_update");
    let killer = keep_killing_the_walsender(&f.project);
    let admin = crate::support::pg().await.client("postgres").await;
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    while admin
        .batch_execute(&format!(
            "SELECT pg_drop_replication_slot('fluxbase_{}')",
            f.project
        ))
        .await
        .is_err()
    {
        assert!(
            std::time::Instant::now() < deadline,
            "the slot stayed in use"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    killer.abort();
    let _ = killer.await;
    // Told it is delayed (maybe), then that it stopped: never live.
    let mut stopped = status(&mut ws, &f.project, "degraded").await;
    if stopped.contains("reconnecting") {
        stopped = status(&mut ws, &f.project, "degraded").await;
    }
    assert!(stopped.contains("stopped"), "{stopped}");
    assert!(stopped.contains("may be lost"), "{stopped}");
    assert_eq!(
        app.app.cdc.status(&f.project).unwrap().state,
        fluxbase::cdc::StreamState::SlotLost
    );
    app.rows(&f.admin, &f.project, "INSERT INTO t VALUES (1)")
        .await;
    // A few of the pump's ticks: no `live` (and no event) comes.
    tokio::time::sleep(Duration::from_millis(1500)).await;
    nothing_more(&mut ws).await;
    // A member who subscribes now is told too.
    late_member_told(&app, &f, &stopped).await;
}

#[tokio::test]
async fn a_deleted_project_closes_its_room() {
    let app = spawn_app().await;
    let f = app.fixture().await;
    let mut ws = subscribed_socket(&app, &f).await;
    app.delete_project(&f.project, &f.admin).await;
    let m = recv(&mut ws).await;
    assert_eq!(m["type"], "error", "{m}");
    assert_eq!(m["code"], "PROJECT_NOT_FOUND", "{m}");
    assert_eq!(m["roomId"], room(&f.project), "{m}");
    // Gone for good: no token, the owner's session, or none at all gets it back.
    for token in [Some(&f.read), Some(&f.token), None] {
        let mut msg = json!({ "type": "subscribe", "roomId": room(&f.project) });
        if let Some(t) = token {
            msg["token"] = json!(t);
        }
        send(&mut ws, msg).await;
        let m = recv(&mut ws).await;
        assert_eq!(m["type"], "error", "{m}");
    }
    send(
        &mut ws,
        json!({ "type": "subscribe", "roomId": room(&f.project) }),
    )
    .await;
    assert_eq!(recv(&mut ws).await["code"], "PROJECT_NOT_FOUND");
    nothing_more(&mut ws).await;
}

#[tokio::test]
async fn table_and_operation_filters_select_what_arrives() {
    let app = spawn_app().await;
    let f = app.fixture().await;
    app.rows(
        &f.admin,
        &f.project,
        "CREATE TABLE a (id int PRIMARY KEY); CREATE TABLE b (id int PRIMARY KEY)",
    )
    .await;
    let sub = |filter: Value| json!({ "type": "subscribe", "roomId": room(&f.project), "token": f.read, "filter": filter });
    let mut only_a = connect(&app, "/").await;
    subscribed(&mut only_a, sub(json!({ "tables": ["a"] }))).await;
    let mut deletes = connect(&app, "/").await;
    subscribed(&mut deletes, sub(json!({ "operations": ["delete"] }))).await;
    let mut a_updates = connect(&app, "/").await;
    subscribed(
        &mut a_updates,
        sub(json!({ "tables": ["a"], "operations": ["UPDATE"] })),
    )
    .await;

    app.rows(
        &f.admin,
        &f.project,
        "INSERT INTO a VALUES (1); INSERT INTO b VALUES (2);
         UPDATE a SET id = 11 WHERE id = 1; UPDATE b SET id = 12 WHERE id = 2;
         DELETE FROM a; DELETE FROM b",
    )
    .await;
    // Schema updates are not row operations: they pass an operations filter (and a table
    // filter when they are about one of its tables).
    app.rows(&f.admin, &f.project, "ALTER TABLE a ADD COLUMN note text")
        .await;
    let ops = |v: &[(&str, i64)]| -> Vec<(String, i64)> {
        v.iter().map(|(o, i)| (o.to_string(), *i)).collect()
    };
    assert_eq!(
        rows_until_schema_update(&mut only_a).await,
        ops(&[("INSERT", 1), ("UPDATE", 11), ("DELETE", 11)])
    );
    assert_eq!(
        rows_until_schema_update(&mut deletes).await,
        ops(&[("DELETE", 11), ("DELETE", 12)])
    );
    assert_eq!(
        rows_until_schema_update(&mut a_updates).await,
        ops(&[("UPDATE", 11)])
    );

    let mut ws = connect(&app, "/").await;
    for bad in [
        json!({ "operations": ["UPSERT"] }),
        json!({ "tables": "a" }),
        json!({ "row": "id=like.1" }),
        json!({ "row": "nonsense" }),
        json!("tables"),
    ] {
        refused(&mut ws, sub(bad), "BAD_MESSAGE").await;
    }
}

#[tokio::test]
async fn row_filters_eq_neq_lt_lte_gt_gte_and_in_select_rows_by_the_new_row_or_the_deleted_one() {
    let app = spawn_app().await;
    let f = app.fixture().await;
    app.rows(
        &f.admin,
        &f.project,
        "CREATE TABLE orders (id int PRIMARY KEY, status text, amount numeric)",
    )
    .await;
    let cases: [(&str, &[(&str, i64)]); 9] = [
        (
            "status=eq.paid",
            &[("INSERT", 1), ("INSERT", 3), ("UPDATE", 2), ("DELETE", 3)],
        ),
        ("status=neq.paid", &[("INSERT", 2), ("INSERT", 4)]),
        ("amount=lt.10", &[("INSERT", 1)]),
        (
            "amount=lte.10",
            &[("INSERT", 1), ("INSERT", 2), ("UPDATE", 2)],
        ),
        (
            "amount=gt.10",
            &[("INSERT", 3), ("INSERT", 4), ("DELETE", 3)],
        ),
        (
            "amount=gte.10",
            &[
                ("INSERT", 2),
                ("INSERT", 3),
                ("INSERT", 4),
                ("UPDATE", 2),
                ("DELETE", 3),
            ],
        ),
        ("id=in.(1,4)", &[("INSERT", 1), ("INSERT", 4)]),
        ("status=in.(open, void)", &[("INSERT", 2), ("INSERT", 4)]),
        ("amount=eq.5.5", &[("INSERT", 1)]),
    ];
    let mut sockets = Vec::new();
    for (row, _) in &cases {
        let mut ws = connect(&app, "/").await;
        subscribed(
            &mut ws,
            json!({ "type": "subscribe", "roomId": room(&f.project), "token": f.read,
                    "filter": { "tables": ["orders"], "row": row } }),
        )
        .await;
        sockets.push(ws);
    }
    app.rows(
        &f.admin,
        &f.project,
        "INSERT INTO orders VALUES (1, 'paid', 5.5), (2, 'open', 10), (3, 'paid', 15), (4, 'void', 20)",
    )
    .await;
    app.rows(
        &f.admin,
        &f.project,
        "UPDATE orders SET status = 'paid' WHERE id = 2",
    )
    .await;
    app.rows(&f.admin, &f.project, "DELETE FROM orders WHERE id = 3")
        .await;
    app.rows(
        &f.admin,
        &f.project,
        "ALTER TABLE orders ADD COLUMN note text",
    )
    .await;
    for ((row, want), ws) in cases.iter().zip(&mut sockets) {
        let want: Vec<(String, i64)> = want.iter().map(|(o, i)| (o.to_string(), *i)).collect();
        assert_eq!(rows_until_schema_update(ws).await, want, "{row}");
    }
}

#[tokio::test]
async fn a_clients_broadcast_reaches_the_other_sockets_in_the_room_but_not_the_sender() {
    let app = spawn_app().await;
    let f = app.fixture().await;
    let other = app.fixture().await;
    let mut sender = subscribed_socket(&app, &f).await;
    let mut b = subscribed_socket(&app, &f).await;
    let mut c = connect(&app, "/realtime").await;
    subscribed(
        &mut c,
        json!({ "type": "subscribe", "roomId": room(&f.project), "token": f.read,
                "filter": { "tables": ["nothing"], "operations": ["DELETE"] } }),
    )
    .await;
    let mut elsewhere = subscribed_socket(&app, &other).await;
    let mut outsider = connect(&app, "/").await;

    let payload = json!({ "x": [1, 2, { "y": "z" }], "s": "héllo \"quoted\"" });
    send(
        &mut sender,
        json!({ "type": "broadcast", "roomId": room(&f.project), "event": "cursor", "payload": payload }),
    )
    .await;
    let expected = json!({ "type": "broadcast", "roomId": room(&f.project), "event": "cursor", "payload": payload });
    assert_eq!(without_id(recv(&mut b).await), expected);
    assert_eq!(without_id(recv(&mut c).await), expected);
    // The sender gets nothing back, and other rooms nothing at all.
    nothing_more(&mut sender).await;
    nothing_more(&mut elsewhere).await;

    send(
        &mut outsider,
        json!({ "type": "broadcast", "roomId": room(&f.project), "event": "cursor", "payload": {} }),
    )
    .await;
    let m = recv(&mut outsider).await;
    assert_eq!(m["type"], "error", "{m}");
    assert_eq!(m["code"], "NOT_SUBSCRIBED", "{m}");
    assert_eq!(m["roomId"], room(&f.project), "{m}");
    // A broadcast to a room the sender is not in does not reach that room either.
    send(
        &mut sender,
        json!({ "type": "broadcast", "roomId": room(&other.project), "event": "x", "payload": {} }),
    )
    .await;
    assert_eq!(recv(&mut sender).await["code"], "NOT_SUBSCRIBED");
    send(
        &mut sender,
        json!({ "type": "broadcast", "roomId": room(&f.project) }),
    )
    .await;
    assert_eq!(recv(&mut sender).await["code"], "BAD_MESSAGE");
    for ws in [&mut b, &mut c, &mut elsewhere, &mut outsider] {
        nothing_more(ws).await;
    }
}

#[tokio::test]
async fn a_rest_broadcast_reports_how_many_sockets_got_it_and_needs_write_access() {
    let app = spawn_app().await;
    let f = app.fixture().await;
    let broadcast = |key: String, event: &'static str| {
        let app = &app;
        let project = f.project.clone();
        async move {
            app.call(
                "POST",
                "/api/realtime/broadcast",
                Some(&key),
                Some(json!({ "projectId": project, "event": event, "payload": { "n": 1 } })),
            )
            .await
        }
    };
    // No room yet: delivered to nobody.
    let (status, body) = broadcast(f.readwrite.clone(), "early").await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(body, json!({ "success": true, "delivered": 0 }));

    let mut a = subscribed_socket(&app, &f).await;
    let mut b = subscribed_socket(&app, &f).await;
    let mut gone = subscribed_socket(&app, &f).await;
    send(
        &mut gone,
        json!({ "type": "unsubscribe", "roomId": room(&f.project) }),
    )
    .await;
    assert_eq!(recv(&mut gone).await["type"], "unsubscribed");

    // A readwrite key, an admin key, and the session of the project's owner.
    for key in [&f.readwrite, &f.admin, &f.token] {
        let (status, body) = broadcast(key.clone(), "news").await;
        assert_eq!(status, 200, "{body}");
        assert_eq!(body, json!({ "success": true, "delivered": 2 }));
        for ws in [&mut a, &mut b] {
            assert_eq!(
                without_id(recv(ws).await),
                json!({ "type": "broadcast", "roomId": room(&f.project), "event": "news", "payload": { "n": 1 } })
            );
        }
    }
    let (status, body) = broadcast(f.read.clone(), "nope").await;
    assert_eq!(status, 403, "{body}");
    assert_eq!(body["error"]["code"], "SCOPE_MISMATCH", "{body}");
    let (status, body) = broadcast(String::new(), "nope").await;
    assert_eq!(status, 401, "{body}");
    let (status, _) = broadcast(f.readwrite.clone(), "").await;
    assert_eq!(status, 400);
    let other = app.fixture().await;
    let (status, body) = broadcast(other.admin.clone(), "nope").await;
    assert_eq!(status, 403, "{body}");
    for ws in [&mut a, &mut b, &mut gone] {
        nothing_more(ws).await;
    }
}

#[tokio::test]
async fn a_broadcast_from_sql_arrives_only_when_its_transaction_commits() {
    let app = spawn_app().await;
    let f = app.fixture().await;
    app.rows(&f.admin, &f.project, "CREATE TABLE t (id int)")
        .await;
    let mut ws = subscribed_socket(&app, &f).await;
    app.rows(
        &f.readwrite,
        &f.project,
        "BEGIN; INSERT INTO t VALUES (1); SELECT realtime.broadcast('rolled-back', '{\"a\":0}'); ROLLBACK",
    )
    .await;
    app.rows(
        &f.readwrite,
        &f.project,
        "BEGIN; SAVEPOINT s; SELECT realtime.broadcast('savepoint', '{}'); ROLLBACK TO s; COMMIT",
    )
    .await;
    assert_eq!(
        app.sql_error(
            &f.read,
            &f.project,
            "SELECT realtime.broadcast('read', '{}')"
        )
        .await,
        "42501"
    );
    app.rows(
        &f.readwrite,
        &f.project,
        "SELECT realtime.broadcast('evt', '{\"a\":1}')",
    )
    .await;
    assert_eq!(
        without_id(recv(&mut ws).await),
        json!({ "type": "broadcast", "roomId": room(&f.project), "event": "evt", "payload": { "a": 1 } })
    );
    // In a transaction it keeps its place among the row changes; the payload defaults to {}.
    app.rows(
        &f.admin,
        &f.project,
        "BEGIN; INSERT INTO t VALUES (2); SELECT realtime.broadcast('between'); INSERT INTO t VALUES (3); COMMIT",
    )
    .await;
    assert_eq!(db_event(&mut ws).await["record"]["id"], 2);
    assert_eq!(
        without_id(recv(&mut ws).await),
        json!({ "type": "broadcast", "roomId": room(&f.project), "event": "between", "payload": {} })
    );
    assert_eq!(db_event(&mut ws).await["record"]["id"], 3);
    nothing_more(&mut ws).await;
}

/// Ids of the db_events in `msgs`.
fn ids(msgs: &[Value]) -> Vec<i64> {
    msgs.iter()
        .map(|m| {
            assert_eq!(m["type"], "db_event", "{m}");
            m["payload"]["record"]["id"].as_i64().unwrap()
        })
        .collect()
}

async fn recv_n(ws: &mut Socket, n: usize) -> Vec<Value> {
    let mut out = Vec::with_capacity(n);
    for _ in 0..n {
        out.push(recv(ws).await);
    }
    out
}

#[tokio::test]
async fn a_client_resuming_with_since_gets_exactly_the_missed_events_then_live_ones() {
    let app = spawn_app().await;
    let f = app.fixture().await;
    app.rows(
        &f.admin,
        &f.project,
        "CREATE TABLE t (id int); CREATE TABLE other (id int)",
    )
    .await;
    // Watches the room so that the test knows when the missed events have reached it.
    let mut watcher = subscribed_socket(&app, &f).await;
    let mut ws = subscribed_socket(&app, &f).await;
    for i in 1..=3 {
        app.rows(&f.admin, &f.project, &format!("INSERT INTO t VALUES ({i})"))
            .await;
    }
    let got = recv_n(&mut ws, 3).await;
    assert_eq!(ids(&got), [1, 2, 3]);
    let last = got[2]["payload"]["id"].as_str().unwrap().to_string();
    assert_eq!(ids(&recv_n(&mut watcher, 3).await), [1, 2, 3]);
    ws.close(None).await.unwrap();
    drop(ws);

    app.rows(&f.admin, &f.project, "INSERT INTO t VALUES (4)")
        .await;
    app.rows(
        &f.admin,
        &f.project,
        "INSERT INTO t VALUES (5), (6); INSERT INTO other VALUES (7)",
    )
    .await;
    app.rows(
        &f.admin,
        &f.project,
        "BEGIN; INSERT INTO t VALUES (8); COMMIT",
    )
    .await;
    assert_eq!(ids(&recv_n(&mut watcher, 5).await), [4, 5, 6, 7, 8]);

    let mut ws = connect(&app, "/").await;
    subscribed(
        &mut ws,
        json!({ "type": "subscribe", "roomId": room(&f.project), "token": f.read, "since": last }),
    )
    .await;
    app.rows(&f.admin, &f.project, "INSERT INTO t VALUES (9)")
        .await;
    assert_eq!(ids(&recv_n(&mut ws, 6).await), [4, 5, 6, 7, 8, 9]);
    nothing_more(&mut ws).await;

    // A resume also applies the subscriber's filter to what it replays.
    let mut filtered = connect(&app, "/").await;
    subscribed(
        &mut filtered,
        json!({ "type": "subscribe", "roomId": room(&f.project), "token": f.read, "since": last,
                "filter": { "tables": ["other"] } }),
    )
    .await;
    app.rows(
        &f.admin,
        &f.project,
        "INSERT INTO t VALUES (10); INSERT INTO other VALUES (11)",
    )
    .await;
    assert_eq!(ids(&recv_n(&mut filtered, 2).await), [7, 11]);
    nothing_more(&mut filtered).await;

    // Resuming from the newest id replays nothing.
    let m = recv_n(&mut watcher, 3).await;
    assert_eq!(ids(&m), [9, 10, 11]);
    let newest = m[2]["payload"]["id"].as_str().unwrap().to_string();
    let mut ws = connect(&app, "/").await;
    subscribed(
        &mut ws,
        json!({ "type": "subscribe", "roomId": room(&f.project), "token": f.read, "since": newest }),
    )
    .await;
    nothing_more(&mut ws).await;
}

#[tokio::test]
async fn a_resume_from_before_the_retained_window_gets_resume_too_old_then_live_events() {
    let app = spawn_app_with(|c| c.realtime_retention_events = 5).await;
    let f = app.fixture().await;
    app.rows(&f.admin, &f.project, "CREATE TABLE t (id int)")
        .await;
    let mut watcher = subscribed_socket(&app, &f).await;
    let mut ws = subscribed_socket(&app, &f).await;
    app.rows(&f.admin, &f.project, "INSERT INTO t VALUES (1)")
        .await;
    let first = db_event(&mut ws).await;
    drop(ws);
    for i in 2..=11 {
        app.rows(&f.admin, &f.project, &format!("INSERT INTO t VALUES ({i})"))
            .await;
    }
    assert_eq!(
        ids(&recv_n(&mut watcher, 11).await),
        (1..=11).collect::<Vec<_>>()
    );

    let mut ws = connect(&app, "/").await;
    subscribed(
        &mut ws,
        json!({ "type": "subscribe", "roomId": room(&f.project), "token": f.read, "since": first["id"] }),
    )
    .await;
    let m = recv(&mut ws).await;
    assert_eq!(m["type"], "error", "{m}");
    assert_eq!(m["code"], "RESUME_TOO_OLD", "{m}");
    assert_eq!(m["roomId"], room(&f.project), "{m}");
    app.rows(&f.admin, &f.project, "INSERT INTO t VALUES (12)")
        .await;
    assert_eq!(ids(&recv_n(&mut ws, 1).await), [12]);
    nothing_more(&mut ws).await;
}

/// Runs `query` with the project's admin key on the server process.
async fn admin_sql(server: &ServerProcess, p: &Project, query: &str) {
    crate::support::http::sql(&server.base, &p.admin, &p.project, query).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_resume_after_kill_9_and_a_restart_replays_what_the_client_missed_from_the_durable_history(
) {
    let mut server = ServerProcess::start(&[]).await;
    let p = project(&server.base).await;
    admin_sql(&server, &p, "CREATE TABLE t (id int)").await;
    let mut ws = ws::subscribed(&server.base, &p, None).await;
    admin_sql(&server, &p, "INSERT INTO t VALUES (1)").await;
    let (first, last) = ws::row(&mut ws).await;
    assert_eq!(first, 1);
    drop(ws);
    admin_sql(&server, &p, "INSERT INTO t VALUES (2)").await;
    admin_sql(&server, &p, "INSERT INTO t VALUES (3)").await;
    // Once the slot is confirmed past them, 2 and 3 are never produced again.
    let mut watcher = ws::subscribed(&server.base, &p, None).await;
    admin_sql(&server, &p, "INSERT INTO t VALUES (0)").await;
    let (zero, id) = ws::row(&mut watcher).await;
    assert_eq!(zero, 0);
    let lsn = u64::from_str_radix(&id[..16], 16).unwrap();
    crate::support::poll::until(
        Duration::from_secs(60),
        Duration::from_millis(50),
        || async {
            let confirmed = slot_confirmed(&p.project).await;
            if confirmed > lsn {
                Ok(())
            } else {
                Err(format!(
                    "the slot was never confirmed past {lsn:X} (at {confirmed:X})"
                ))
            }
        },
    )
    .await;
    drop(watcher);
    server.kill9();
    // Committed while no server runs.
    crate::support::pg()
        .await
        .client(&format!("fx_{}", p.project))
        .await
        .execute("INSERT INTO t VALUES (4)", &[])
        .await
        .unwrap();
    server.restart().await;

    let mut ws = ws::subscribed(&server.base, &p, Some(&last)).await;
    admin_sql(&server, &p, "INSERT INTO t VALUES (5)").await;
    // The slot was confirmed past 2, 3 and 0, but the history on disk kept them: they come
    // from it after the restart, then 4 (committed while no server ran), then 5 live, each
    // exactly once.
    let mut got = Vec::new();
    for _ in 0..5 {
        got.push(ws::row(&mut ws).await.0);
    }
    assert_eq!(got, [2, 3, 0, 4, 5]);
    nothing_more(&mut ws).await;

    // A malformed `since` is refused rather than taken for "nothing missed".
    send(
        &mut ws,
        json!({ "type": "subscribe", "roomId": room(&p.project), "token": p.read, "since": "yesterday" }),
    )
    .await;
    let m = ws::next(&mut ws).await;
    assert_eq!(m["type"], "error", "{m}");
    assert_eq!(m["code"], "BAD_MESSAGE", "{m}");
}

#[tokio::test]
async fn a_socket_the_client_closes_or_drops_is_released_at_once() {
    let app = spawn_app().await;
    let f = app.fixture().await;
    let sockets = || {
        app.app
            .realtime
            .sockets
            .load(std::sync::atomic::Ordering::Relaxed)
    };
    let mut closed = subscribed_socket(&app, &f).await;
    let dropped = subscribed_socket(&app, &f).await;
    let mut idle = connect(&app, "/realtime").await;
    nothing_more(&mut idle).await; // served by now
    assert_eq!(sockets(), 3);
    closed.close(None).await.unwrap();
    drop(dropped);
    drop(idle);
    // A hang guard only.
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    while sockets() > 0 {
        assert!(
            std::time::Instant::now() < deadline,
            "{} sockets still open on the server",
            sockets()
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    // The client that closed got the server's close frame.
    let end = tokio::time::timeout(Duration::from_secs(5), closed.next())
        .await
        .unwrap();
    assert!(matches!(end, Some(Ok(Message::Close(_))) | None), "{end:?}");
    // The room lost its members: a REST broadcast reaches nobody.
    let (_, body) = app
        .call(
            "POST",
            "/api/realtime/broadcast",
            Some(&f.readwrite),
            Some(json!({ "projectId": f.project, "event": "e" })),
        )
        .await;
    assert_eq!(body["delivered"], 0, "{body}");
}

#[tokio::test]
async fn an_oversized_message_closes_that_socket_and_the_server_keeps_serving() {
    let app = spawn_app().await;
    let f = app.fixture().await;
    app.rows(&f.admin, &f.project, "CREATE TABLE t (id int)")
        .await;
    let mut big = subscribed_socket(&app, &f).await;
    let mut bystander = subscribed_socket(&app, &f).await;
    let huge = json!({ "type": "broadcast", "roomId": room(&f.project), "event": "big",
                       "payload": "x".repeat(70 * 1024) });
    big.send(Message::text(huge.to_string())).await.unwrap();
    // The server says why it closes: 1009 "message too big" (RFC 6455 §7.4.1).
    let frame = tokio::time::timeout(Duration::from_secs(10), async {
        loop {
            match big.next().await {
                None | Some(Err(_)) => panic!("the connection ended without a close frame"),
                Some(Ok(Message::Close(frame))) => return frame,
                Some(Ok(_)) => {}
            }
        }
    })
    .await
    .expect("the oversized message was neither refused nor ended the connection")
    .expect("a close frame with a code");
    assert_eq!(frame.code, CloseCode::Size, "{frame:?}");
    assert!(frame.reason.contains("too big"), "{frame:?}");
    // The broadcast was not delivered, and everyone else carries on.
    app.rows(&f.admin, &f.project, "INSERT INTO t VALUES (1)")
        .await;
    assert_eq!(db_event(&mut bystander).await["record"]["id"], 1);
    let mut fresh = subscribed_socket(&app, &f).await;
    app.rows(&f.admin, &f.project, "INSERT INTO t VALUES (2)")
        .await;
    assert_eq!(db_event(&mut bystander).await["record"]["id"], 2);
    assert_eq!(db_event(&mut fresh).await["record"]["id"], 2);
}

#[tokio::test]
async fn a_client_that_stops_reading_is_cut_off_while_another_keeps_receiving_everything() {
    const TRANSACTIONS: i64 = 20;
    const ROWS: i64 = 250;
    // The stall bound applies to the reading socket too, whose client shares a loaded machine
    // with everything else: 10 s without a read is a stall, a scheduling hiccup is not.
    let app = spawn_app_with(|c| c.realtime_client_stall_secs = 10).await;
    let f = app.fixture().await;
    app.rows(&f.admin, &f.project, "CREATE TABLE big (id int, body text)")
        .await;
    let mut stalled = subscribed_socket(&app, &f).await;
    let mut reader = subscribed_socket(&app, &f).await;
    let total = TRANSACTIONS * ROWS;
    let reading = tokio::spawn(async move {
        let mut next = 1;
        while next <= total {
            let p = db_event(&mut reader).await;
            assert_eq!(p["record"]["id"], next);
            next += 1;
        }
        reader
    });
    // ~4 KiB per event, 5,000 events (20 MiB): more than the stalled socket's TCP buffers and its
    // send queue (realtime_send_queue_bytes, 1 MiB) together.
    for t in 0..TRANSACTIONS {
        app.rows(
            &f.admin,
            &f.project,
            &format!(
                "INSERT INTO big SELECT g, repeat(md5(g::text), 128) FROM generate_series({}, {}) g",
                t * ROWS + 1,
                (t + 1) * ROWS
            ),
        )
        .await;
    }
    // A hang guard, not a measure of speed: the reader must get every event (in order, each
    // within its own receive deadline) while the other socket is stalled.
    let mut reader = tokio::time::timeout(Duration::from_secs(300), reading)
        .await
        .unwrap_or_else(|_| panic!("the reading client did not receive all {total} events"))
        .unwrap();
    nothing_more(&mut reader).await;
    // The stalled socket was moved to catching up (not cut off at once), then cut off once its
    // writer made no progress for realtime_client_stall_secs.
    let deadline = std::time::Instant::now() + Duration::from_secs(120);
    while !app
        .app
        .realtime
        .render_metrics()
        .contains("fluxbase_realtime_cutoffs_total{reason=\"stalled\"} 1")
    {
        assert!(
            std::time::Instant::now() < deadline,
            "the stalled client was never cut off"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }

    // The stalled client, reading again, finds some events and then the close.
    let (received, close) = tokio::time::timeout(Duration::from_secs(120), async {
        let mut received = 0;
        loop {
            match stalled.next().await {
                Some(Ok(Message::Text(_))) => received += 1,
                Some(Ok(Message::Close(frame))) => return (received, frame),
                Some(Ok(_)) => {}
                other => panic!("expected a close frame, got {other:?}"),
            }
        }
    })
    .await
    .expect("the stalled client was never cut off");
    assert!(received < total, "{received}");
    let close = close.expect("a close frame with a code");
    assert_eq!(close.code, CloseCode::Policy, "{close:?}");
    assert!(!close.reason.is_empty(), "{close:?}");
}

/// The soft limit on open files of this process.
fn open_files_limit() -> u64 {
    let limits = std::fs::read_to_string("/proc/self/limits").unwrap();
    let line = limits
        .lines()
        .find(|l| l.starts_with("Max open files"))
        .unwrap();
    line.split_whitespace().nth(3).unwrap().parse().unwrap()
}

#[tokio::test]
async fn a_thousand_concurrent_sockets_in_one_room_each_receive_an_event() {
    const SOCKETS: usize = 1000;
    // Client and server ends both live in this process, beside other tests' files.
    let limit = open_files_limit();
    assert!(
        limit >= 4096,
        "{SOCKETS} sockets need ~{} open files (client and server ends) but the limit is {limit}: \
         raise it (`ulimit -n 65536`; `make test` does)",
        2 * SOCKETS
    );
    let app = spawn_app().await;
    let f = app.fixture().await;
    app.rows(&f.admin, &f.project, "CREATE TABLE t (id int)")
        .await;
    let url = format!("{}/", app.base.replacen("http", "ws", 1));
    let subscribe_msg =
        json!({ "type": "subscribe", "roomId": room(&f.project), "token": f.read }).to_string();
    let sockets: Vec<Socket> = futures_util::stream::iter(0..SOCKETS)
        .map(|_| {
            let url = url.clone();
            let msg = subscribe_msg.clone();
            async move {
                let mut ws = tokio_tungstenite::connect_async(url).await.unwrap().0;
                ws.send(Message::text(msg)).await.unwrap();
                assert_eq!(recv(&mut ws).await["type"], "subscribed");
                ws
            }
        })
        .buffer_unordered(100)
        .collect()
        .await;
    assert_eq!(sockets.len(), SOCKETS);
    app.rows(&f.admin, &f.project, "INSERT INTO t VALUES (42)")
        .await;
    let received: Vec<Value> = futures_util::stream::iter(sockets)
        .map(|mut ws| async move { db_event(&mut ws).await })
        .buffer_unordered(SOCKETS)
        .collect()
        .await;
    let ids: HashSet<&str> = received.iter().map(|p| p["id"].as_str().unwrap()).collect();
    assert_eq!(received.len(), SOCKETS);
    assert_eq!(ids.len(), 1, "every socket got the same event");
    assert!(received.iter().all(|p| p["record"]["id"] == 42));
}

#[tokio::test]
async fn a_suspension_by_another_process_closes_the_room_of_a_running_server() {
    let app = spawn_app().await;
    let f = app.fixture().await;
    let mut ws = connect(&app, "/").await;
    let ack = subscribe(&mut ws, &f.project, Some(&f.read)).await;
    assert_eq!(ack["type"], "subscribed");
    // Another process on the same control database (as `fluxbase project suspend` is).
    let mut config = app.app.config.clone();
    config.database_url = Some(
        crate::support::pg()
            .await
            .url(&app.app.cluster.control_db)
            .into(),
    );
    let other = fluxbase::app::App::open(config, &[]).await.unwrap();
    other
        .set_project_status(&f.project, fluxbase::projects::ProjectStatus::Suspended)
        .await
        .unwrap();
    let m = recv(&mut ws).await;
    assert_eq!(m["type"], "error", "{m}");
    assert_eq!(m["code"], "PROJECT_SUSPENDED");
}

#[tokio::test]
async fn plain_requests_to_the_websocket_paths_get_the_page_or_the_apis_answer_and_bad_handshakes_a_400(
) {
    let app = spawn_app().await;
    // Not an upgrade: `/` is the dashboard's page, `/realtime` the API's 404 in its error shape.
    let page = app.http.get(app.url("/")).send().await.unwrap();
    assert_eq!(page.status(), 200);
    assert_eq!(page.headers()["content-type"], "text/html; charset=utf-8");
    let (status, body) = app.call("GET", "/realtime", None, None).await;
    assert_eq!(status, 404, "{body}");
    assert_eq!(body["error"]["code"], "NOT_FOUND", "{body}");
    // An upgrade with an unsupported WebSocket version is refused, saying which one we speak.
    let resp = app
        .http
        .get(app.url("/"))
        .header("connection", "Upgrade")
        .header("upgrade", "websocket")
        .header("sec-websocket-key", "dGhlIHNhbXBsZSBub25jZQ==")
        .header("sec-websocket-version", "8")
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status().as_u16(), 400);
    assert_eq!(resp.headers()["sec-websocket-version"], "13");
    let body: Value = resp.json().await.unwrap();
    assert_eq!(body["error"]["code"], "BAD_REQUEST", "{body}");
}

#[tokio::test]
async fn a_broadcast_flood_cuts_off_the_flooder_and_not_the_quiet_sockets_of_its_room() {
    const FLOOD: usize = 3000;
    // The quiet socket is not read from its subscribe until after the flood, the rows and the
    // REST broadcast: on a loaded machine that can outlast the default stall bound (30 s of no
    // write progress), and a socket its client stopped reading is rightly cut off by that
    // rule (tested on its own). This test is about the flood, so that rule is kept out of it.
    let app = spawn_app_with(|c| c.realtime_client_stall_secs = 3600).await;
    let f = app.fixture().await;
    app.rows(&f.admin, &f.project, "CREATE TABLE t (id int)")
        .await;
    let mut flooder = subscribed_socket(&app, &f).await;
    // The quiet socket reads nothing while the flood lasts, like a browser tab in the background.
    let mut quiet = subscribed_socket(&app, &f).await;

    // Broadcasts of 32 KB, each followed by a ping, as fast as the server answers: the
    // flooder reads what the server says (refusals, then the close) up to each pong. It never
    // has a write pending when it is cut off: a client still writing when the server drops the
    // connection reads the reset instead of the close frame.
    let body = "x".repeat(32 * 1000);
    let (mut refused, mut sent) = (0, 0);
    let frame = tokio::time::timeout(Duration::from_secs(120), async {
        for i in 0..FLOOD {
            let msg = json!({ "type": "broadcast", "roomId": room(&f.project), "event": "flood",
                              "payload": { "i": i, "body": body } });
            flooder.send(Message::text(msg.to_string())).await.unwrap();
            flooder
                .send(Message::text(r#"{"type":"ping"}"#))
                .await
                .unwrap();
            sent += 1;
            loop {
                match flooder.next().await {
                    Some(Ok(Message::Text(t))) => {
                        let m: Value = serde_json::from_str(&t).unwrap();
                        if m["type"] == "pong" {
                            break;
                        }
                        assert_eq!(m["code"], "RATE_LIMIT", "{m}");
                        refused += 1;
                    }
                    Some(Ok(Message::Close(frame))) => return frame,
                    Some(Ok(_)) => {}
                    other => panic!("the flooder's socket ended without a close frame: {other:?}"),
                }
            }
        }
        panic!("{sent} broadcasts ({refused} refused) and the flooder was never cut off")
    })
    .await
    .expect("the flooder was never cut off (hang guard)");
    let frame = frame.expect("the flooder gets a close frame with a reason");
    assert_eq!(frame.code, CloseCode::Policy, "{frame:?}");
    assert!(frame.reason.contains("rate limit"), "{frame:?}");
    assert!(refused > 0, "the flooder was told before it was cut off");
    assert!(sent > 0);

    // The quiet socket is still subscribed and gets every legitimate event after what of the
    // flood was let through.
    app.rows(&f.admin, &f.project, "INSERT INTO t VALUES (1), (2)")
        .await;
    let (status, body) = app
        .call(
            "POST",
            "/api/realtime/broadcast",
            Some(&f.readwrite),
            Some(json!({ "projectId": f.project, "event": "legit", "payload": { "n": 1 } })),
        )
        .await;
    assert_eq!(status, 200, "{body}");
    // (The REST broadcast takes no detour through the WAL: it may overtake the rows.)
    let mut flood_seen = 0;
    let mut rows = Vec::new();
    let mut legit = 0;
    let mut log = Vec::new();
    while rows.len() < 2 || legit < 1 {
        let m = recv(&mut quiet).await;
        log.push(summary(&m));
        match (m["type"].as_str(), m["event"].as_str()) {
            // Every flood message entered the room before the flooder was cut off.
            (Some("broadcast"), Some("flood")) if rows.is_empty() && legit == 0 => flood_seen += 1,
            (Some("db_event"), _) => rows.push(m["payload"]["record"]["id"].as_i64().unwrap()),
            (Some("broadcast"), Some("legit")) => legit += 1,
            _ => panic!("unexpected message {m}; before it: {log:?}"),
        }
    }
    assert_eq!((rows.as_slice(), legit), ([1, 2].as_slice(), 1), "{log:?}");
    assert!(flood_seen < FLOOD, "{flood_seen}; {log:?}");
    // Nothing more: a last REST broadcast is the next message (no flood message, row or
    // broadcast twice, none late). Its deadline is a hang guard for a loaded machine.
    let (status, body) = app
        .call(
            "POST",
            "/api/realtime/broadcast",
            Some(&f.readwrite),
            Some(json!({ "projectId": f.project, "event": "end", "payload": {} })),
        )
        .await;
    assert_eq!(status, 200, "{body}");
    let m: Value = tokio::time::timeout(Duration::from_secs(120), async {
        loop {
            match quiet.next().await {
                Some(Ok(Message::Text(t))) => return serde_json::from_str(&t).unwrap(),
                Some(Ok(Message::Ping(_) | Message::Pong(_))) => {}
                other => panic!("{other:?} instead of the last broadcast, after {log:?}"),
            }
        }
    })
    .await
    .unwrap_or_else(|_| panic!("the last broadcast never arrived after {log:?}"));
    assert_eq!(
        (m["type"].as_str(), m["event"].as_str()),
        (Some("broadcast"), Some("end")),
        "{m} instead of the last broadcast, after {log:?}"
    );
}

/// A message in a few words: its type, event, id and row id (not its payload).
fn summary(m: &Value) -> String {
    format!(
        "{} {} {} {}",
        m["type"].as_str().unwrap_or("?"),
        m["event"].as_str().unwrap_or(""),
        m["id"]
            .as_str()
            .or(m["payload"]["id"].as_str())
            .unwrap_or(""),
        m["payload"]["record"]["id"]
            .as_i64()
            .or(m["payload"]["i"].as_i64())
            .map_or(String::new(), |i| i.to_string()),
    )
}

#[tokio::test]
async fn an_oversized_broadcast_is_refused_from_a_client_the_rest_api_and_sql() {
    let app = spawn_app_with(|c| c.realtime_max_broadcast_bytes = 16 * 1024).await;
    let f = app.fixture().await;
    let mut sender = subscribed_socket(&app, &f).await;
    let mut receiver = subscribed_socket(&app, &f).await;
    let big = json!({ "body": "x".repeat(20 * 1024) });

    send(
        &mut sender,
        json!({ "type": "broadcast", "roomId": room(&f.project), "event": "big", "payload": big }),
    )
    .await;
    let m = recv(&mut sender).await;
    assert_eq!(m["type"], "error", "{m}");
    assert_eq!(m["code"], "PAYLOAD_TOO_LARGE", "{m}");
    assert_eq!(m["roomId"], room(&f.project), "{m}");
    assert!(m["message"].as_str().unwrap().contains("16384"), "{m}");

    let (status, body) = app
        .call(
            "POST",
            "/api/realtime/broadcast",
            Some(&f.readwrite),
            Some(json!({ "projectId": f.project, "event": "big", "payload": big })),
        )
        .await;
    assert_eq!(status, 413, "{body}");
    assert_eq!(body["error"]["code"], "PAYLOAD_TOO_LARGE", "{body}");

    app.rows(
        &f.readwrite,
        &f.project,
        "SELECT realtime.broadcast('big', jsonb_build_object('body', repeat('x', 20 * 1024)))",
    )
    .await;
    app.rows(
        &f.readwrite,
        &f.project,
        "SELECT realtime.broadcast('small', '{\"n\":1}')",
    )
    .await;
    // Only the small one arrives; the sender's socket stays open and may broadcast within it.
    assert_eq!(
        without_id(recv(&mut receiver).await),
        json!({ "type": "broadcast", "roomId": room(&f.project), "event": "small", "payload": { "n": 1 } })
    );
    send(
        &mut sender,
        json!({ "type": "broadcast", "roomId": room(&f.project), "event": "ok", "payload": { "n": 2 } }),
    )
    .await;
    assert_eq!(
        without_id(recv(&mut receiver).await),
        json!({ "type": "broadcast", "roomId": room(&f.project), "event": "ok", "payload": { "n": 2 } })
    );
    nothing_more(&mut receiver).await;
}

#[tokio::test]
async fn a_room_keeps_at_most_its_byte_budget_of_history_for_resumes() {
    let app = spawn_app_with(|c| c.realtime_retention_bytes = 64 * 1024).await;
    let f = app.fixture().await;
    app.rows(&f.admin, &f.project, "CREATE TABLE t (id int, body text)")
        .await;
    let mut ws = subscribed_socket(&app, &f).await;
    // 40 events of ~4 KiB: more than 64 KiB in all.
    app.rows(
        &f.admin,
        &f.project,
        "INSERT INTO t SELECT g, repeat('x', 4096) FROM generate_series(1, 40) g",
    )
    .await;
    let first = db_event(&mut ws).await["id"].as_str().unwrap().to_string();
    for _ in 2..=40 {
        db_event(&mut ws).await;
    }
    let mut late = connect(&app, "/").await;
    send(
        &mut late,
        json!({ "type": "subscribe", "roomId": room(&f.project), "token": f.read, "since": first }),
    )
    .await;
    assert_eq!(recv(&mut late).await["type"], "subscribed");
    let m = recv(&mut late).await;
    assert_eq!(m["code"], "RESUME_TOO_OLD", "{m}");
}

#[tokio::test]
async fn an_id_ahead_of_the_wal_is_refused_and_live_events_follow() {
    let app = spawn_app().await;
    let f = app.fixture().await;
    app.rows(&f.admin, &f.project, "CREATE TABLE t (id int)")
        .await;
    for since in [
        "FFFFFFFFFFFFFFFF-FFFFFFFF",
        "ffffffffffffffff-ffffffff",
        "0000FFFFFFFFFFFF-00000000-00000001",
    ] {
        let mut ws = connect(&app, "/").await;
        send(
            &mut ws,
            json!({ "type": "subscribe", "roomId": room(&f.project), "token": f.read, "since": since }),
        )
        .await;
        assert_eq!(recv(&mut ws).await["type"], "subscribed");
        let m = recv(&mut ws).await;
        assert_eq!(m["code"], "RESUME_TOO_OLD", "{since}: {m}");
        app.rows(&f.admin, &f.project, "INSERT INTO t VALUES (1)")
            .await;
        assert_eq!(db_event(&mut ws).await["record"]["id"], 1, "{since}");
    }
}

#[tokio::test]
async fn a_subscribe_flood_is_refused_per_socket_and_per_realtime_token() {
    let app = spawn_app_with(|c| {
        c.realtime_subscribes_per_sec = 1;
        c.rate_limit_requests = 6;
    })
    .await;
    let f = app.fixture().await;
    app.make_realtime_public(&f).await;
    // One socket, 20 subscribes at once (no token: a public room).
    let mut ws = connect(&app, "/").await;
    for _ in 0..20 {
        send(
            &mut ws,
            json!({ "type": "subscribe", "roomId": room(&f.project) }),
        )
        .await;
    }
    let mut codes = Vec::new();
    for _ in 0..20 {
        let m = recv(&mut ws).await;
        codes.push(
            m["code"]
                .as_str()
                .unwrap_or(m["type"].as_str().unwrap())
                .to_string(),
        );
    }
    assert_eq!(codes[0], "subscribed", "{codes:?}");
    assert!(codes.iter().any(|c| c == "RATE_LIMIT"), "{codes:?}");

    // One realtime token, one subscribe from each of many sockets: the token's own budget.
    let token = app
        .realtime_token(&f.admin, json!({ "projectId": f.project }))
        .await;
    let mut answers = Vec::new();
    for _ in 0..10 {
        let mut s = connect(&app, "/").await;
        let m = subscribe(&mut s, &f.project, Some(&token)).await;
        answers.push(
            m["code"]
                .as_str()
                .unwrap_or(m["type"].as_str().unwrap())
                .to_string(),
        );
    }
    assert_eq!(answers[0], "subscribed", "{answers:?}");
    assert!(answers.iter().any(|c| c == "RATE_LIMIT"), "{answers:?}");
}

/// The next message is `ACCESS_REVOKED` for the project's room.
async fn revoked(ws: &mut Socket, project: &str) {
    let m = recv(ws).await;
    assert_eq!(m["type"], "error", "{m}");
    assert_eq!(m["code"], "ACCESS_REVOKED", "{m}");
    assert_eq!(m["roomId"], room(project), "{m}");
}

#[tokio::test]
async fn deleting_an_api_key_ends_its_subscriptions_and_those_of_its_realtime_tokens() {
    let app = spawn_app().await;
    let f = app.fixture().await;
    app.rows(&f.admin, &f.project, "CREATE TABLE t (id int)")
        .await;
    let (key_id, secret) = app.new_key(&f, "read", None).await;
    let token = app
        .realtime_token(&secret, json!({ "projectId": f.project }))
        .await;
    let mut by_key = connect(&app, "/").await;
    assert_eq!(
        subscribe(&mut by_key, &f.project, Some(&secret)).await["type"],
        "subscribed"
    );
    let mut by_token = connect(&app, "/").await;
    assert_eq!(
        subscribe(&mut by_token, &f.project, Some(&token)).await["type"],
        "subscribed"
    );
    let mut other = subscribed_socket(&app, &f).await;

    let q = format!("/api/keys?projectId={}&keyId={key_id}", f.project);
    let (status, body) = app.call("DELETE", &q, Some(&f.admin), None).await;
    assert_eq!(status, 200, "{body}");
    revoked(&mut by_key, &f.project).await;
    revoked(&mut by_token, &f.project).await;

    app.rows(&f.admin, &f.project, "INSERT INTO t VALUES (1)")
        .await;
    assert_eq!(db_event(&mut other).await["record"]["id"], 1);
    nothing_more(&mut by_key).await;
    nothing_more(&mut by_token).await;
    // Neither the key nor its token subscribes again.
    let mut again = connect(&app, "/").await;
    assert_eq!(
        subscribe(&mut again, &f.project, Some(&token)).await["code"],
        "ACCESS_REVOKED"
    );
    assert_eq!(
        subscribe(&mut again, &f.project, Some(&secret)).await["code"],
        "AUTH_REQUIRED"
    );
}

#[tokio::test]
async fn rotating_an_api_key_ends_the_subscriptions_of_its_old_secret_and_its_tokens() {
    let app = spawn_app().await;
    let f = app.fixture().await;
    app.rows(&f.admin, &f.project, "CREATE TABLE t (id int)")
        .await;
    let (key_id, old_secret) = app.new_key(&f, "read", None).await;
    let old_token = app
        .realtime_token(&old_secret, json!({ "projectId": f.project }))
        .await;
    let mut by_key = connect(&app, "/").await;
    assert_eq!(
        subscribe(&mut by_key, &f.project, Some(&old_secret)).await["type"],
        "subscribed"
    );
    let mut by_token = connect(&app, "/").await;
    assert_eq!(
        subscribe(&mut by_token, &f.project, Some(&old_token)).await["type"],
        "subscribed"
    );

    let (status, body) = app
        .call(
            "POST",
            "/api/keys/rotate",
            Some(&f.admin),
            Some(json!({ "projectId": f.project, "keyId": key_id })),
        )
        .await;
    assert_eq!(status, 200, "{body}");
    let new_secret = body["secret"].as_str().unwrap().to_string();
    revoked(&mut by_key, &f.project).await;
    revoked(&mut by_token, &f.project).await;

    // The old token is refused; the new secret and a token it mints work, and stay subscribed.
    let mut again = connect(&app, "/").await;
    assert_eq!(
        subscribe(&mut again, &f.project, Some(&old_token)).await["code"],
        "ACCESS_REVOKED"
    );
    let new_token = app
        .realtime_token(&new_secret, json!({ "projectId": f.project }))
        .await;
    let mut fresh_key = connect(&app, "/").await;
    assert_eq!(
        subscribe(&mut fresh_key, &f.project, Some(&new_secret)).await["type"],
        "subscribed"
    );
    let mut fresh_token = connect(&app, "/").await;
    assert_eq!(
        subscribe(&mut fresh_token, &f.project, Some(&new_token)).await["type"],
        "subscribed"
    );
    app.rows(&f.admin, &f.project, "INSERT INTO t VALUES (1)")
        .await;
    for ws in [&mut fresh_key, &mut fresh_token] {
        assert_eq!(db_event(ws).await["record"]["id"], 1);
    }
    nothing_more(&mut by_key).await;
    nothing_more(&mut by_token).await;
    // The other servers' notification (this one's too) arrives later and leaves them alone.
    app.rows(&f.admin, &f.project, "INSERT INTO t VALUES (2)")
        .await;
    for ws in [&mut fresh_key, &mut fresh_token] {
        assert_eq!(db_event(ws).await["record"]["id"], 2);
    }
}

#[tokio::test]
async fn a_flood_of_broadcasts_from_sql_or_rest_leaves_the_rooms_sockets_connected() {
    const FLOOD: usize = 2500;
    // The quiet socket reads nothing while the flood goes through the WAL: on a loaded machine
    // that can outlast the stall rule (30 s without write progress, tested on its own).
    let app = spawn_app_with(|c| c.realtime_client_stall_secs = 3600).await;
    let f = app.fixture().await;
    app.rows(&f.admin, &f.project, "CREATE TABLE t (id int)")
        .await;
    // A subscriber that does not read while the flood goes on, and one that reads along (it
    // tells when the flood and the row after it have reached the room).
    let mut quiet = subscribed_socket(&app, &f).await;
    let mut reader = subscribed_socket(&app, &f).await;
    let reading = tokio::spawn(async move {
        loop {
            // A hang guard: the flood's 40 MB go through the WAL before its first message.
            let m = crate::support::ws::recv_within(&mut reader, Duration::from_secs(120)).await;
            if m["type"] == "db_event" {
                return m["payload"]["record"]["id"].clone();
            }
        }
    });
    // ~16 KB each, 2,500 of them (40 MB): more than the quiet socket's TCP buffers and its send
    // queue (1,024 messages) together.
    app.rows(
        &f.readwrite,
        &f.project,
        &format!(
            "SELECT realtime.broadcast('e', jsonb_build_object('body', repeat('x', 16000))) \
             FROM generate_series(1, {FLOOD})"
        ),
    )
    .await;
    app.rows(&f.admin, &f.project, "INSERT INTO t VALUES (1)")
        .await;
    let first_row = tokio::time::timeout(Duration::from_secs(120), reading)
        .await
        .expect("the reading socket never got the row")
        .unwrap();
    assert_eq!(first_row, 1);
    // Still connected: what of the flood fit the project's budget, then the row.
    let mut flood_seen = 0;
    loop {
        let m = recv(&mut quiet).await;
        match m["type"].as_str() {
            Some("broadcast") => flood_seen += 1,
            Some("db_event") => {
                assert_eq!(m["payload"]["record"]["id"], 1, "{m}");
                break;
            }
            _ => panic!("unexpected message {m}"),
        }
    }
    assert!(flood_seen < FLOOD, "{flood_seen}");
    app.rows(&f.admin, &f.project, "INSERT INTO t VALUES (2)")
        .await;
    assert_eq!(db_event(&mut quiet).await["record"]["id"], 2);
    nothing_more(&mut quiet).await;
    let metrics = app.metrics_text().await;
    let dropped: u64 = metrics
        .lines()
        .find_map(|l| l.strip_prefix("fluxbase_realtime_broadcasts_dropped_total "))
        .expect("the dropped-broadcasts counter")
        .parse()
        .unwrap();
    assert!(dropped >= (FLOOD - flood_seen) as u64, "{dropped}");

    // REST: over the budget, 429 RATE_LIMIT (and the socket stays).
    // Sent at once, so that the budget's one-second burst is passed however slowly a loaded
    // machine serves them one after another (sent in turn, each refilled the budget): 24 MB
    // against the project's 1 MiB/s, so that even answered over 20 s some are refused (40 of
    // them, 8 MB, were all answered 200 once at load 22).
    let body = "y".repeat(200 * 1000);
    let flood: Vec<_> = (0..120)
        .map(|_| {
            app.call(
                "POST",
                "/api/realtime/broadcast",
                Some(&f.readwrite),
                Some(json!({ "projectId": f.project, "event": "rest", "payload": { "b": body } })),
            )
        })
        .collect();
    let answers = futures_util::future::join_all(flood).await;
    let limited: Vec<&Value> = answers
        .iter()
        .filter(|(status, _)| *status == 429)
        .map(|(_, answer)| answer)
        .collect();
    assert!(
        !limited.is_empty(),
        "a REST flood is limited: {:?}",
        answers
            .iter()
            .map(|(status, _)| *status)
            .collect::<Vec<_>>()
    );
    for (status, answer) in &answers {
        assert!(*status == 200 || *status == 429, "{status} {answer}");
    }
    let answer = limited[0];
    assert_eq!(answer["error"]["code"], "RATE_LIMIT", "{answer}");
    assert!(
        answer["error"]["message"]
            .as_str()
            .unwrap()
            .contains("realtime_project_broadcast"),
        "{answer}"
    );
    app.rows(&f.admin, &f.project, "INSERT INTO t VALUES (3)")
        .await;
    loop {
        let m = recv(&mut quiet).await;
        match m["type"].as_str() {
            Some("broadcast") => assert_eq!(m["event"], "rest", "{m}"),
            Some("db_event") => {
                assert_eq!(m["payload"]["record"]["id"], 3, "{m}");
                break;
            }
            _ => panic!("unexpected message {m}"),
        }
    }
}

/// Subscribes racing a suspension (this server's, or another process's heard through the
/// access channel): a subscribe that read the project as active before the suspension and
/// joins after its room was emptied must not stay in it (it would be a member no eviction
/// saw: in cluster mode it would then get the suspended project's live events). Each socket's
/// messages up to the `pong` to a ping sent once the suspension took effect: a `subscribed`
/// is always followed by the room's `PROJECT_SUSPENDED`, or the subscribe itself is refused
/// with it; and a row written while suspended reaches no socket.
#[tokio::test]
async fn subscribes_racing_a_suspension_never_stay_in_the_emptied_room() {
    const SOCKETS: usize = 40;
    let app = spawn_app().await;
    let f = app.fixture().await;
    app.rows(&f.admin, &f.project, "CREATE TABLE t (id int)")
        .await;
    // Another process on the same control database (as `fluxbase project suspend` is).
    let mut config = app.app.config.clone();
    config.database_url = Some(
        crate::support::pg()
            .await
            .url(&app.app.cluster.control_db)
            .into(),
    );
    let other = fluxbase::app::App::open(config, &[]).await.unwrap();
    let (mut joined_then_closed, mut refused_at_once) = (0, 0);
    for round in 0..8u64 {
        let by_other = round % 2 == 1;
        let mut sockets = Vec::new();
        for _ in 0..SOCKETS {
            sockets.push(connect(&app, "/").await);
        }
        let msg = json!({ "type": "subscribe", "roomId": room(&f.project), "token": f.read });
        // Spread over the rounds: the suspension starts with the subscribes, or a little
        // before or after them, so that it lands before, among and after their status checks.
        let spread = (round / 4) * 700;
        let (subscribes_after, suspend_after) = if round % 4 < 2 {
            (0, spread)
        } else {
            (spread + 300, 0)
        };
        let subscribes = async {
            tokio::time::sleep(Duration::from_micros(subscribes_after)).await;
            futures_util::future::join_all(sockets.iter_mut().map(|ws| {
                let msg = msg.clone();
                async move { send(ws, msg).await }
            }))
            .await
        };
        let suspend = async {
            tokio::time::sleep(Duration::from_micros(suspend_after)).await;
            let by = if by_other { &other } else { &app.app };
            by.set_project_status(&f.project, fluxbase::projects::ProjectStatus::Suspended)
                .await
                .unwrap();
        };
        tokio::join!(subscribes, suspend);
        if by_other {
            // This server has heard it once a new subscribe is refused.
            let mut probe = connect(&app, "/").await;
            let deadline = std::time::Instant::now() + Duration::from_secs(30);
            loop {
                send(&mut probe, msg.clone()).await;
                let m = recv(&mut probe).await;
                if m["code"] == "PROJECT_SUSPENDED" {
                    break;
                }
                assert!(
                    std::time::Instant::now() < deadline,
                    "the server has not heard the suspension: {m}"
                );
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        }
        // Written while suspended (as the owner's database can be): the stream runs on and
        // the room records it; no socket of the round may receive it.
        let db = app.project_db(&f.project).await;
        let pg = crate::support::pg().await;
        let conn = pg.client(&db).await;
        conn.batch_execute(&format!("INSERT INTO t VALUES ({round})"))
            .await
            .unwrap();
        // Wait until the stream has published it (the bus is this process's).
        crate::support::poll::until(
            Duration::from_secs(30),
            Duration::from_millis(50),
            || async {
                let s = app.app.cdc.status(&f.project).unwrap();
                if s.events as usize >= round as usize + 2 {
                    Ok(())
                } else {
                    Err(format!(
                        "the suspended project's row was not streamed: {s:?}"
                    ))
                }
            },
        )
        .await;
        for (i, ws) in sockets.iter_mut().enumerate() {
            send(ws, json!({ "type": "ping" })).await;
            let mut seen = Vec::new();
            loop {
                let m = recv(ws).await;
                if m["type"] == "pong" {
                    break;
                }
                seen.push(m);
            }
            let types: Vec<String> = seen
                .iter()
                .map(|m| format!("{}:{}", m["type"], m["code"]))
                .collect();
            let suspended = "\"error\":\"PROJECT_SUSPENDED\"";
            match types.iter().map(String::as_str).collect::<Vec<_>>()[..] {
                ["\"subscribed\":null", s] if s == suspended => joined_then_closed += 1,
                [s] if s == suspended => refused_at_once += 1,
                _ => panic!(
                    "round {round} (suspended by {}), socket {i}: {seen:?}: a subscribe \
                     stayed in the suspended project's emptied room",
                    if by_other {
                        "another process"
                    } else {
                        "this server"
                    }
                ),
            }
        }
        app.app
            .set_project_status(&f.project, fluxbase::projects::ProjectStatus::Active)
            .await
            .unwrap();
    }
    // Which outcome each subscribe gets depends on the machine's timing (CI under load saw all
    // 320 refused): the check is the invariant above, not the mix.
    eprintln!("subscribes joined then closed: {joined_then_closed}, refused: {refused_at_once}");
    assert_eq!(joined_then_closed + refused_at_once, 8 * SOCKETS);
}
