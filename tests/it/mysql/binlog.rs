//! Change capture on MySQL projects (issue 20, part B): the binlog stream through the real
//! server on the shared MariaDB, read from the bus (what rooms and the webhook outbox read).

use std::collections::BTreeMap;
use std::time::Duration;

use fluxbase::bus::Subscription;
use mysql_async::prelude::Queryable;
use serde_json::{json, Value};

use crate::support::bus::{assert_quiet, events, next_event, next_event_within};
use crate::support::mariadb::{mariadb, spawn_mysql_app};
use crate::support::{Fixture, TestApp};

async fn setup() -> (TestApp, Fixture, Subscription) {
    if let Ok(filter) = std::env::var("IT_LOG") {
        let _ = tracing_subscriber::fmt()
            .with_env_filter(filter)
            .with_test_writer()
            .try_init();
    }
    let app = spawn_mysql_app().await;
    let f = app.mysql_fixture().await;
    let sub = app.app.bus.project(&f.project).subscribe();
    (app, f, sub)
}

/// A connection to the project database as the server account (real transactions, rollbacks).
async fn project_conn(f: &Fixture) -> mysql_async::Conn {
    crate::support::mariadb::project_conn(&f.project).await
}

#[tokio::test]
async fn row_changes_ddl_and_broadcasts_become_events_in_commit_order() {
    let (app, f, mut sub) = setup().await;
    let db = format!("fx_{}", f.project);
    app.rows(
        &f.admin,
        &f.project,
        "CREATE TABLE orders (id bigint PRIMARY KEY, amount decimal(10,2), status varchar(20), \
         doc json, placed datetime(3), tags set('a','b','c'), kind enum('x','y'), raw varbinary(4))",
    )
    .await;
    let ev = events(&mut sub, 1).await;
    assert_eq!(ev[0]["event_type"], "schema_update", "{}", ev[0]);
    assert_eq!(ev[0]["command"], "CREATE TABLE");
    assert_eq!(ev[0]["objectType"], "table");
    assert_eq!(ev[0]["table"], "orders");
    assert_eq!(ev[0]["schema"], db.as_str());
    assert_eq!(ev[0]["object"], format!("{db}.orders"));

    app.rows(
        &f.readwrite,
        &f.project,
        "INSERT INTO orders VALUES (9007199254740993, 59.90, 'pending', '{\"n\": [1, 2]}', \
         '2024-05-01 10:20:30.250', 'a,c', 'y', 0x0a1b)",
    )
    .await;
    app.rows(
        &f.readwrite,
        &f.project,
        "UPDATE orders SET status = 'paid' WHERE id = 9007199254740993",
    )
    .await;
    app.rows(&f.admin, &f.project, "DELETE FROM orders").await;
    let ev = events(&mut sub, 3).await;
    let expected = json!({
        "id": 9007199254740993u64, "amount": 59.90, "status": "pending", "doc": {"n": [1, 2]},
        "placed": "2024-05-01T10:20:30.25", "tags": "a,c", "kind": "y", "raw": "\\x0a1b"
    });
    assert_eq!(ev[0]["operation"], "INSERT");
    assert_eq!(ev[0]["table"], "orders");
    assert_eq!(ev[0]["schema"], db.as_str());
    assert_eq!(ev[0]["record"], expected, "{}", ev[0]);
    assert_eq!(ev[0]["old"], Value::Null);
    // The exact digits, not a float's.
    assert!(
        serde_json::to_string(&ev[0])
            .unwrap()
            .contains("9007199254740993"),
        "{}",
        ev[0]
    );
    assert_eq!(ev[1]["operation"], "UPDATE");
    assert_eq!(ev[1]["record"]["status"], "paid");
    assert_eq!(ev[1]["old"], expected);
    assert_eq!(ev[2]["operation"], "DELETE");
    assert_eq!(ev[2]["record"]["status"], "paid");
    assert_eq!(ev[2]["old"]["id"], 9007199254740993u64);
    for e in &ev {
        assert!(e["commitTimestamp"].as_str().unwrap().ends_with('Z'));
        assert!(e["lsn"].as_str().unwrap().contains('/'));
        assert_eq!(e["id"].as_str().unwrap().len(), 25);
    }
    assert!(ev[0]["id"].as_str() < ev[1]["id"].as_str());
    assert!(ev[1]["id"].as_str() < ev[2]["id"].as_str());

    // What execute-sql answers for the same row reads the same.
    app.rows(
        &f.readwrite,
        &f.project,
        "INSERT INTO orders VALUES (1, 0.05, NULL, '[]', '2024-01-01 00:00:00', '', 'x', 0x00)",
    )
    .await;
    let inserted = &events(&mut sub, 1).await[0];
    let rows = app.rows(&f.read, &f.project, "SELECT * FROM orders").await;
    assert_eq!(inserted["record"], rows[0], "event and execute-sql differ");

    // A rolled-back transaction publishes nothing; the one after it is whole.
    let mut conn = project_conn(&f).await;
    conn.query_drop("BEGIN").await.unwrap();
    conn.query_drop("INSERT INTO orders (id) VALUES (2)")
        .await
        .unwrap();
    conn.query_drop("CALL fluxbase_realtime_broadcast('rolled', '{}')")
        .await
        .unwrap();
    conn.query_drop("ROLLBACK").await.unwrap();
    conn.query_drop("BEGIN").await.unwrap();
    conn.query_drop("INSERT INTO orders (id) VALUES (3), (4)")
        .await
        .unwrap();
    conn.query_drop("SAVEPOINT s1").await.unwrap();
    conn.query_drop("INSERT INTO orders (id) VALUES (5)")
        .await
        .unwrap();
    conn.query_drop("ROLLBACK TO SAVEPOINT s1").await.unwrap();
    conn.query_drop("CALL fluxbase_realtime_broadcast('committed', '{\"a\": 1}')")
        .await
        .unwrap();
    conn.query_drop("COMMIT").await.unwrap();
    let mut tx = Vec::new();
    for _ in 0..3 {
        tx.push(next_event(&mut sub).await);
    }
    let ids: Vec<Value> = tx[..2]
        .iter()
        .map(|e| serde_json::from_str::<Value>(&e.payload).unwrap()["record"]["id"].clone())
        .collect();
    assert_eq!(ids, [json!(3), json!(4)]);
    assert_eq!(
        tx[2].kind,
        fluxbase::bus::EventKind::Broadcast {
            event: "committed".into()
        }
    );
    assert_eq!(
        serde_json::from_str::<Value>(&tx[2].payload).unwrap(),
        json!({"event": "committed", "payload": {"a": 1}})
    );
    assert!(tx[2].last_in_transaction && !tx[0].last_in_transaction);
    assert!(tx.iter().all(|e| e.end_lsn == tx[0].end_lsn));

    // DDL mid-stream, TRUNCATE, in commit order with the rows around them.
    app.rows(
        &f.admin,
        &f.project,
        "ALTER TABLE orders ADD COLUMN note text",
    )
    .await;
    app.rows(
        &f.readwrite,
        &f.project,
        "INSERT INTO orders (id, note) VALUES (6, 'after alter')",
    )
    .await;
    app.rows(&f.admin, &f.project, "TRUNCATE TABLE orders")
        .await;
    app.rows(&f.admin, &f.project, "DROP TABLE orders").await;
    let ev = events(&mut sub, 4).await;
    assert_eq!(ev[0]["command"], "ALTER TABLE", "{}", ev[0]);
    assert_eq!(ev[1]["record"]["note"], "after alter", "{}", ev[1]);
    assert_eq!(ev[2]["command"], "TRUNCATE");
    assert_eq!(ev[2]["table"], "orders");
    assert_eq!(ev[3]["command"], "DROP TABLE");
    assert_quiet(&mut sub, Duration::from_millis(500)).await;

    // Another project's changes never reach this project's bus.
    let other = app.mysql_fixture().await;
    let mut other_sub = app.app.bus.project(&other.project).subscribe();
    app.rows(
        &other.admin,
        &other.project,
        "CREATE TABLE t (id int PRIMARY KEY)",
    )
    .await;
    app.rows(&other.admin, &other.project, "INSERT INTO t VALUES (2)")
        .await;
    let ev = events(&mut other_sub, 2).await;
    assert_eq!(ev[0]["command"], "CREATE TABLE");
    assert_eq!(ev[1]["record"]["id"], 2);
    assert_quiet(&mut sub, Duration::from_millis(500)).await;
}

/// A randomized workload of transactions (some rolled back, some large, DDL between them)
/// replayed from the events rebuilds the table exactly as a SELECT reads it.
#[tokio::test]
async fn replaying_the_events_of_a_random_workload_rebuilds_the_table() {
    let (app, f, mut sub) = setup().await;
    let mut conn = project_conn(&f).await;
    conn.query_drop(
        "CREATE TABLE items (id int PRIMARY KEY, qty int NOT NULL, label varchar(40), price decimal(12,3))",
    )
    .await
    .unwrap();
    let mut seed: u64 = std::env::var("SEED")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(rand_seed);
    println!("SEED={seed}");
    let mut next = move |n: u64| {
        seed ^= seed << 13;
        seed ^= seed >> 7;
        seed ^= seed << 17;
        seed % n
    };
    for round in 0..60 {
        conn.query_drop("BEGIN").await.unwrap();
        for _ in 0..=next(8) {
            let id = next(40);
            let sql = match next(3) {
                0 => format!(
                    "INSERT INTO items VALUES ({id}, {}, 'l{}', {}.{:03}) ON DUPLICATE KEY UPDATE qty = qty + 1",
                    next(100),
                    next(1000),
                    next(10_000),
                    next(1000)
                ),
                1 => format!("UPDATE items SET qty = qty * 2, label = CONCAT(label, 'u') WHERE id = {id}"),
                _ => format!("DELETE FROM items WHERE id = {id}"),
            };
            conn.query_drop(sql).await.unwrap();
        }
        if round == 30 {
            conn.query_drop("COMMIT").await.unwrap();
            conn.query_drop("ALTER TABLE items MODIFY label varchar(60)")
                .await
                .unwrap();
            continue;
        }
        let end = if next(4) == 0 { "ROLLBACK" } else { "COMMIT" };
        conn.query_drop(end).await.unwrap();
    }
    conn.query_drop("CREATE TABLE done (id int)").await.unwrap();

    let mut table: BTreeMap<i64, Value> = BTreeMap::new();
    let mut last_id = String::new();
    loop {
        let e = next_event(&mut sub).await;
        assert!(
            e.id > last_id,
            "ids sort in commit order: {} after {last_id}",
            e.id
        );
        last_id = e.id.clone();
        let p: Value = serde_json::from_str(&e.payload).unwrap();
        if p["event_type"] == "schema_update" {
            if p["table"] == "done" {
                break;
            }
            continue;
        }
        let id = p["record"]["id"].as_i64().unwrap();
        match p["operation"].as_str().unwrap() {
            "INSERT" => assert!(table.insert(id, p["record"].clone()).is_none(), "{p}"),
            "UPDATE" => {
                let old_id = p["old"]["id"].as_i64().unwrap();
                assert_eq!(table.remove(&old_id).as_ref(), Some(&p["old"]), "{p}");
                table.insert(id, p["record"].clone());
            }
            "DELETE" => assert_eq!(table.remove(&id).as_ref(), Some(&p["record"]), "{p}"),
            other => panic!("{other}"),
        }
    }
    let rows = app
        .rows(&f.read, &f.project, "SELECT * FROM items ORDER BY id")
        .await;
    let replayed: Vec<Value> = table.into_values().collect();
    assert_eq!(Value::Array(replayed), Value::Array(rows));
}

fn rand_seed() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_nanos() as u64
        | 1
}

/// One transaction far beyond the memory bound: spilled, then published whole and in order.
#[tokio::test]
async fn a_transaction_beyond_the_memory_bound_is_spilled_and_published_whole() {
    let url = mariadb().await.admin_url.clone();
    let app = crate::support::spawn_app_with(|c| {
        c.mysql_url = Some(url.into());
        c.cdc_buffer_bytes = 64 * 1024;
    })
    .await;
    let f = app.mysql_fixture().await;
    let mut sub = app.app.bus.project(&f.project).subscribe();
    let mut conn = project_conn(&f).await;
    conn.query_drop("CREATE TABLE big (id int PRIMARY KEY, pad varchar(200))")
        .await
        .unwrap();
    assert_eq!(events(&mut sub, 1).await[0]["command"], "CREATE TABLE");
    conn.query_drop("BEGIN").await.unwrap();
    for chunk in 0..20 {
        let values: Vec<String> = (0..100)
            .map(|i| format!("({}, REPEAT('x', 200))", chunk * 100 + i))
            .collect();
        conn.query_drop(format!("INSERT INTO big VALUES {}", values.join(",")))
            .await
            .unwrap();
    }
    conn.query_drop("COMMIT").await.unwrap();
    for i in 0..2000 {
        let e = next_event(&mut sub).await;
        let p: Value = serde_json::from_str(&e.payload).unwrap();
        assert_eq!(p["record"]["id"], i, "{}", e.payload);
        assert_eq!(e.last_in_transaction, i == 1999);
    }
    let status = app.app.cdc.status(&f.project).unwrap();
    assert!(status.spilled_bytes > 400_000, "{status:?}");
    assert!(status.peak_buffered_bytes <= 64 * 1024 + 4096, "{status:?}");
}

/// `/api/cdc/status` reports a MySQL project's stream and its stored position.
#[tokio::test]
async fn the_status_reports_the_binlog_stream() {
    let (app, f, mut sub) = setup().await;
    app.rows(&f.admin, &f.project, "CREATE TABLE t (id int PRIMARY KEY)")
        .await;
    let e = next_event(&mut sub).await;
    let mut body = Value::Null;
    for _ in 0..50 {
        body = app.cdc_status(&f.project, &f.admin).await;
        let confirmed = body["stream"]["confirmedLsn"]
            .as_str()
            .and_then(|s| s.parse::<fluxbase_replication::pgoutput::Lsn>().ok());
        if confirmed >= Some(e.end_lsn) {
            break;
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    assert_eq!(body["stream"]["state"], "streaming", "{body}");
    assert_eq!(
        body["stream"]["slot"],
        format!("binlog:fluxbase_{}", f.project)
    );
    assert!(body["stream"]["events"].as_u64() >= Some(1), "{body}");
}

/// Webhooks on a MySQL project: the guide's payload with both signatures, unchanged.
#[tokio::test]
async fn webhooks_deliver_mysql_changes_with_both_signatures() {
    if let Ok(filter) = std::env::var("IT_LOG") {
        let _ = tracing_subscriber::fmt()
            .with_env_filter(filter)
            .with_test_writer()
            .try_init();
    }
    let url = mariadb().await.admin_url.clone();
    let app = crate::support::spawn_app_with(|c| {
        c.mysql_url = Some(url.into());
        c.webhook_allow_private = true;
        c.webhook_backoff_scale = 0.01;
    })
    .await;
    let f = app.mysql_fixture().await;
    let rx = crate::support::receiver::Receiver::start().await;
    let (status, hook) = app
        .call(
            "POST",
            "/api/webhooks",
            Some(&f.admin),
            Some(json!({ "projectId": f.project, "url": rx.url,
                "events": ["row.inserted", "row.updated", "row.deleted", "schema.changed"] })),
        )
        .await;
    assert_eq!(status, 201, "{hook}");
    let secret = hook["secret"].as_str().unwrap().to_string();
    app.rows(
        &f.admin,
        &f.project,
        "CREATE TABLE orders (id int PRIMARY KEY, amount decimal(8,2), status text)",
    )
    .await;
    app.rows(
        &f.readwrite,
        &f.project,
        "INSERT INTO orders VALUES (123, 59.99, 'pending')",
    )
    .await;
    app.rows(
        &f.readwrite,
        &f.project,
        "UPDATE orders SET status = 'paid' WHERE id = 123",
    )
    .await;
    app.rows(&f.admin, &f.project, "DELETE FROM orders WHERE id = 123")
        .await;
    let got = rx.wait_for(4).await;
    let bodies: Vec<Value> = got
        .iter()
        .map(|r| serde_json::from_str(&r.body).unwrap())
        .collect();
    assert_eq!(bodies[0]["event_type"], "schema.changed");
    assert_eq!(bodies[1]["event_type"], "row.inserted");
    assert_eq!(bodies[1]["table_id"], "orders");
    assert_eq!(
        bodies[1]["data"],
        json!({ "new": { "id": 123, "amount": 59.99, "status": "pending" }, "old": null })
    );
    assert_eq!(bodies[2]["data"]["old"]["status"], "pending");
    assert_eq!(bodies[2]["data"]["new"]["status"], "paid");
    assert_eq!(bodies[3]["event_type"], "row.deleted");
    assert_eq!(bodies[3]["data"]["old"]["id"], 123);
    use base64::Engine;
    let b64 = base64::engine::general_purpose::STANDARD;
    for r in &got {
        let key = ring::hmac::Key::new(ring::hmac::HMAC_SHA256, secret.as_bytes());
        let sig = hex::encode(ring::hmac::sign(&key, r.body.as_bytes()).as_ref());
        assert_eq!(
            r.headers["x-fluxbase-signature"].to_str().unwrap(),
            format!("sha256={sig}")
        );
        let id = r.headers["webhook-id"].to_str().unwrap();
        let ts = r.headers["webhook-timestamp"].to_str().unwrap();
        let key = ring::hmac::Key::new(ring::hmac::HMAC_SHA256, &b64.decode(&secret[6..]).unwrap());
        let expected =
            b64.encode(ring::hmac::sign(&key, format!("{id}.{ts}.{}", r.body).as_bytes()).as_ref());
        assert_eq!(
            r.headers["webhook-signature"].to_str().unwrap(),
            format!("v1,{expected}")
        );
    }
}

/// The guide's realtime client, unchanged, against a MySQL project.
#[tokio::test]
async fn the_guides_realtime_client_works_unchanged_against_a_mysql_project() {
    let (app, f, _sub) = setup().await;
    crate::support::guide::run_realtime_client(&app, &f).await;
}

/// `fluxbase_realtime_broadcast` as each scope: readwrite and admin may broadcast, read may not,
/// no scope but admin may replace the procedure, and a row written into the broadcast table
/// directly is a broadcast only when it is one (JSON), nothing else.
#[tokio::test]
async fn broadcasts_from_sql_follow_the_scopes_and_cannot_forge_other_events() {
    let (app, f, mut sub) = setup().await;
    let call = "CALL fluxbase_realtime_broadcast('ping', '{\"n\": 1}')";
    let denied = app.sql(&f.read, &f.project, call).await;
    assert_eq!(denied["success"], false, "{denied}");
    assert_eq!(denied["error"]["code"], "SQL_EXEC_ERROR", "{denied}");
    for key in [&f.readwrite, &f.admin] {
        let ok = app.sql(key, &f.project, call).await;
        assert_eq!(ok["success"], true, "{ok}");
        let e = next_event(&mut sub).await;
        assert_eq!(
            e.kind,
            fluxbase::bus::EventKind::Broadcast {
                event: "ping".into()
            }
        );
        assert_eq!(
            serde_json::from_str::<Value>(&e.payload).unwrap(),
            json!({"event": "ping", "payload": {"n": 1}})
        );
    }
    let bad = app
        .sql(
            &f.readwrite,
            &f.project,
            "CALL fluxbase_realtime_broadcast('x', 'not json')",
        )
        .await;
    assert_eq!(bad["success"], false, "{bad}");
    let drop = app
        .sql(
            &f.readwrite,
            &f.project,
            "DROP PROCEDURE fluxbase_realtime_broadcast",
        )
        .await;
    assert_eq!(drop["success"], false, "{drop}");
    // Written directly: not JSON, dropped; JSON, a broadcast (as the procedure would make it).
    app.rows(
        &f.readwrite,
        &f.project,
        "INSERT INTO fluxbase_broadcasts (event, payload) VALUES ('forged', '{oops')",
    )
    .await;
    app.rows(
        &f.readwrite,
        &f.project,
        "INSERT INTO fluxbase_broadcasts (event, payload) VALUES ('direct', '[1]')",
    )
    .await;
    let e = next_event(&mut sub).await;
    assert_eq!(
        e.kind,
        fluxbase::bus::EventKind::Broadcast {
            event: "direct".into()
        }
    );
    assert_quiet(&mut sub, Duration::from_millis(300)).await;
}

/// A MySQL project's event ids are positions in the MySQL server's binary log, not in
/// PostgreSQL's WAL. A resume with `since` catches up from the room's history (compared with
/// the WAL, the id looked never issued: RESUME_TOO_OLD and a silent gap), and a subscriber
/// without `since` gets what commits after it subscribed, nothing from before.
#[tokio::test]
async fn a_resume_with_since_catches_up_on_a_mysql_project() {
    use crate::support::ws::{nothing_more, row, subscribed};
    let app = spawn_mysql_app().await;
    let f = app.mysql_fixture().await;
    let p = f.keys();
    let mut conn = project_conn(&f).await;
    conn.query_drop("CREATE TABLE r (id int PRIMARY KEY)")
        .await
        .unwrap();
    conn.query_drop("INSERT INTO r VALUES (0)").await.unwrap();
    let mut ws = subscribed(&app.base, &p, None).await;
    conn.query_drop("INSERT INTO r VALUES (1)").await.unwrap();
    let (id, first) = row(&mut ws).await;
    assert_eq!(
        id, 1,
        "the subscriber got a change from before it subscribed"
    );
    drop(ws);
    for i in 2..=4 {
        conn.query_drop(format!("INSERT INTO r VALUES ({i})"))
            .await
            .unwrap();
    }
    let mut ws = subscribed(&app.base, &p, Some(&first)).await;
    let mut last = first.clone();
    for want in 2..=4 {
        let (id, event) = row(&mut ws).await;
        assert_eq!(id, want);
        assert!(event > last, "{event} after {last}");
        last = event;
    }
    nothing_more(&mut ws).await;
}

/// Red team rt4 finding 2: one tenant's row over 16 MiB (the server's default
/// `max_allowed_packet`, which the client took as its own limit) stopped every MySQL
/// project's stream at that event, retried forever, and a SELECT of the row answered 503. Now
/// another project's stream delivers its own INSERT, the tenant's own stream goes on past the
/// row, and the row read back is answered (dropped past `max_response_bytes`: `truncated`).
#[tokio::test]
async fn a_row_over_16_mib_stops_no_stream() {
    let (app, a, mut sub_a) = setup().await;
    let b = app.mysql_fixture().await;
    let mut sub_b = app.app.bus.project(&b.project).subscribe();
    app.rows(
        &a.admin,
        &a.project,
        "CREATE TABLE f2 (id int PRIMARY KEY, a LONGBLOB, b LONGBLOB)",
    )
    .await;
    app.rows(&b.admin, &b.project, "CREATE TABLE t (id int PRIMARY KEY)")
        .await;
    assert_eq!(
        events(&mut sub_a, 1).await[0]["event_type"],
        "schema_update"
    );
    assert_eq!(
        events(&mut sub_b, 1).await[0]["event_type"],
        "schema_update"
    );
    app.rows(
        &a.admin,
        &a.project,
        "INSERT INTO f2 VALUES (2, REPEAT('a', 9000000), REPEAT('b', 9000000))",
    )
    .await;
    app.rows(&b.readwrite, &b.project, "INSERT INTO t VALUES (1)")
        .await;
    let ev = events(&mut sub_b, 1).await;
    assert_eq!(ev[0]["operation"], "INSERT", "{}", ev[0]);
    assert_eq!(ev[0]["record"]["id"], 1, "{}", ev[0]);
    // The tenant's own stream: past its row (whatever the event of the row says), on to the
    // next one.
    app.rows(&a.admin, &a.project, "INSERT INTO f2 VALUES (3, 'x', 'y')")
        .await;
    let mut seen = Vec::new();
    loop {
        // An 18 MB row through a debug build on a loaded CI machine: 20 s was not always enough.
        let e = next_event_within(&mut sub_a, std::time::Duration::from_secs(90)).await;
        let e: Value = serde_json::from_str(&e.payload).unwrap();
        let id = e["record"]["id"].clone();
        seen.push(id.clone());
        if id == 3 {
            break;
        }
        assert!(seen.len() < 5, "{seen:?}");
    }
    for p in [&a.project, &b.project] {
        let status = app.app.cdc.status(p).unwrap();
        assert_eq!(
            status.state,
            fluxbase::cdc::StreamState::Streaming,
            "{status:?}"
        );
    }
    // Read back: answered, the 36 MB of JSON dropped past max_response_bytes (32 MiB).
    let body = app
        .sql(&a.read, &a.project, "SELECT * FROM f2 ORDER BY id")
        .await;
    let text = body.to_string();
    assert_eq!(body["success"], true, "{}", &text[..300.min(text.len())]);
    assert_eq!(body["result"]["truncated"], true);
    assert_eq!(body["result"]["rowCount"], 2);
    let rows = app
        .rows(
            &a.read,
            &a.project,
            "SELECT id, LENGTH(a) + LENGTH(b) AS n FROM f2 ORDER BY id",
        )
        .await;
    assert_eq!(rows[0], json!({"id": 2, "n": 18000000}));
}
