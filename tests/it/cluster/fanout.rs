//! Any node serves any socket: changes and broadcasts cross nodes through NATS.

use std::time::Duration;

use serde_json::json;

use super::bounded;
use crate::support::fixtures::project;
use crate::support::http::{call, sql};
use crate::support::nodes::Nodes;
use crate::support::ws::{next, nothing_more, room, send, subscribed, without_id, Socket};

/// The next message of `ws`, asserted to be a `db_event` of table `t`: its `record.id`.
async fn t_row(ws: &mut Socket, on: &str) -> i64 {
    let m = next(ws).await;
    assert_eq!(m["type"], "db_event", "socket on {on}: {m}");
    assert_eq!(m["payload"]["table"], "t", "socket on {on}: {m}");
    m["payload"]["record"]["id"].as_i64().unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_change_through_node_a_reaches_node_c_and_broadcasts_from_b_reach_a_and_c() {
    bounded(Duration::from_secs(600), async {
        let nodes = Nodes::start(3, &[]).await;
        let (a, b, c) = (nodes.base(0), nodes.base(1), nodes.base(2));
        let p = project(a).await;
        sql(
            a,
            &p.admin,
            &p.project,
            "CREATE TABLE t (id int PRIMARY KEY, body text)",
        )
        .await;
        // Every node has a room for the project whoever leads it.
        let (leader, _) = nodes.wait_leader(&p, None, Duration::from_secs(60)).await;
        nodes.wait_agreed(&p, &leader, Duration::from_secs(30)).await;
        // Each node knows the others, and says who it is and what it leads.
        for i in 0..nodes.len() {
            let (status, body) = nodes.cdc_status(i, &p).await.expect("/api/cdc/status");
            assert_eq!(status, 200, "{body}");
            assert_eq!(body["cluster"]["node"], nodes.ids[i], "{body}");
            assert_eq!(body["cluster"]["nodes"], json!(["a", "b", "c"]), "{body}");
            let (status, body) = call(nodes.base(i), "GET", "/ready", None, json!(null)).await;
            assert_eq!(status, 200, "/ready of node {}: {body}", nodes.ids[i]);
            assert_eq!(body["cluster"]["node"], nodes.ids[i], "{body}");
            assert_eq!(body["cluster"]["nats"], true, "{body}");
            let leads = body["cluster"]["leads"].as_array().expect("leads");
            assert_eq!(
                leads.contains(&json!(p.project)),
                nodes.ids[i] == leader,
                "node {} (the leader is {leader}): {body}",
                nodes.ids[i]
            );
            // Asked from elsewhere, no node lists the projects it leads (red team rt18 LOW).
            let forwarded: serde_json::Value = reqwest::Client::new()
                .get(format!("{}/ready", nodes.base(i)))
                .header("X-Forwarded-For", "203.0.113.9")
                .send()
                .await
                .unwrap()
                .json()
                .await
                .unwrap();
            assert_eq!(forwarded["cluster"]["leads"], json!([]), "{forwarded}");
            assert_eq!(forwarded["cluster"]["node"], nodes.ids[i], "{forwarded}");
        }
        let mut on_a = subscribed(a, &p, None).await;
        let mut on_b = subscribed(b, &p, None).await;
        let mut on_c = subscribed(c, &p, None).await;

        // A change made through node A: on C (and on A and B).
        sql(a, &p.readwrite, &p.project, "INSERT INTO t VALUES (1)").await;
        assert_eq!(t_row(&mut on_c, "c").await, 1, "node C");
        assert_eq!(t_row(&mut on_a, "a").await, 1, "node A");
        assert_eq!(t_row(&mut on_b, "b").await, 1, "node B");
        // And one through C reaches A.
        sql(c, &p.readwrite, &p.project, "INSERT INTO t VALUES (2)").await;
        for (ws, on) in [(&mut on_a, "a"), (&mut on_b, "b"), (&mut on_c, "c")] {
            assert_eq!(t_row(ws, on).await, 2, "node {on}");
        }

        // A socket's broadcast on node B: on A and C, not back to the sender.
        let payload = json!({ "x": [1, 2, { "y": "z" }], "s": "héllo" });
        send(
            &mut on_b,
            json!({ "type": "broadcast", "roomId": room(&p.project), "event": "cursor", "payload": payload }),
        )
        .await;
        let expected = json!({ "type": "broadcast", "roomId": room(&p.project), "event": "cursor", "payload": payload });
        assert_eq!(without_id(next(&mut on_a).await), expected, "node A");
        assert_eq!(without_id(next(&mut on_c).await), expected, "node C");
        // The sender got nothing back: its next message is the pong.
        nothing_more(&mut on_b).await;

        // A REST broadcast sent to node B: on A and C (the sockets on B get it too: REST has
        // no sending socket).
        let (status, body) = call(
            b,
            "POST",
            "/api/realtime/broadcast",
            Some(&p.readwrite),
            json!({ "projectId": p.project, "event": "news", "payload": { "via": "rest" } }),
        )
        .await;
        assert_eq!(status, 200, "{body}");
        assert_eq!(body["success"], true, "{body}");
        let expected = json!({ "type": "broadcast", "roomId": room(&p.project), "event": "news", "payload": { "via": "rest" } });
        for (ws, on) in [(&mut on_a, "a"), (&mut on_c, "c"), (&mut on_b, "b")] {
            assert_eq!(without_id(next(ws).await), expected, "node {on}");
        }
        // Each broadcast came once: a row after them is the very next message everywhere.
        sql(b, &p.readwrite, &p.project, "INSERT INTO t VALUES (3)").await;
        for (ws, on) in [(&mut on_a, "a"), (&mut on_b, "b"), (&mut on_c, "c")] {
            assert_eq!(t_row(ws, on).await, 3, "node {on}: the sentinel row");
            nothing_more(ws).await;
        }

        // Red team rt18 HIGH: an event larger than a NATS message may be (1 MiB here, NATS's
        // default) stopped the project's realtime for good (each rewind met it again) and kept
        // the cluster's WAL. A 2 MB row now goes with its rows left out (`tooLarge`), a 2 MB
        // broadcast from SQL is not published, and what follows arrives.
        sql(
            a,
            &p.readwrite,
            &p.project,
            "INSERT INTO t VALUES (4, repeat('y', 2000000))",
        )
        .await;
        for (ws, on) in [(&mut on_a, "a"), (&mut on_b, "b"), (&mut on_c, "c")] {
            let m = next(ws).await;
            assert_eq!(m["type"], "db_event", "node {on}: {m}");
            assert_eq!(m["payload"]["operation"], "INSERT", "node {on}: {m}");
            assert_eq!(m["payload"]["record"], json!({}), "node {on}: {m}");
            assert_eq!(m["payload"]["tooLarge"], json!(["id", "body"]), "node {on}: {m}");
        }
        sql(
            a,
            &p.readwrite,
            &p.project,
            "SELECT realtime.broadcast('big', json_build_object('x', repeat('y', 2000000))::jsonb)",
        )
        .await;
        sql(b, &p.readwrite, &p.project, "INSERT INTO t VALUES (5)").await;
        for (ws, on) in [(&mut on_a, "a"), (&mut on_b, "b"), (&mut on_c, "c")] {
            assert_eq!(t_row(ws, on).await, 5, "node {on}: the row after the large ones");
            nothing_more(ws).await;
        }
        let leader_at = nodes.ids.iter().position(|id| *id == leader).unwrap();
        let (_, status) = nodes.cdc_status(leader_at, &p).await.expect("status");
        assert_eq!(status["cluster"]["tooLarge"], 2, "{status}");
        assert_eq!(status["cluster"]["publishError"], json!(null), "{status}");
    })
    .await;
}
