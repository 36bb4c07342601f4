//! The change stream: WAL → db_event / schema_update on the bus, in commit order, complete,
//! atomic, with values exactly as `/api/execute-sql` renders them.

use std::sync::Arc;
use std::time::Duration;

use fluxbase::bus::Subscription;
use fluxbase_replication::pgoutput::Lsn;
use serde_json::{json, Value};

use crate::support::bus::{events, next_event};
use crate::support::cluster::{slot_confirmed, DedicatedCluster};
use crate::support::fixtures::project;
use crate::support::http::{call, sql};
use crate::support::process::ServerProcess;
use crate::support::ws::{recv_within, row, subscribed};
use crate::support::{spawn_app, Fixture, TestApp};

async fn setup() -> (TestApp, Fixture, Subscription) {
    let app = spawn_app().await;
    let f = app.fixture().await;
    let sub = app.app.bus.project(&f.project).subscribe();
    (app, f, sub)
}

#[tokio::test]
async fn row_changes_become_db_events_with_record_and_old() {
    let (app, f, mut sub) = setup().await;
    app.rows(
        &f.admin,
        &f.project,
        "CREATE TABLE orders (id int PRIMARY KEY, amount numeric, status text)",
    )
    .await;
    let ev = events(&mut sub, 1).await;
    assert_eq!(ev[0]["event_type"], "schema_update");
    assert_eq!(ev[0]["command"], "CREATE TABLE");
    assert_eq!(ev[0]["table"], "orders");
    assert_eq!(ev[0]["schema"], "public");

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
    let ev = events(&mut sub, 3).await;
    assert_eq!(ev[0]["operation"], "INSERT");
    assert_eq!(ev[0]["table"], "orders");
    assert_eq!(
        ev[0]["record"],
        json!({ "id": 123, "amount": 59.99, "status": "pending" })
    );
    assert_eq!(ev[0]["old"], Value::Null);
    assert_eq!(ev[1]["operation"], "UPDATE");
    assert_eq!(ev[1]["record"]["status"], "paid");
    assert_eq!(
        ev[1]["old"]["status"], "pending",
        "full replica identity gives the old row"
    );
    assert_eq!(ev[2]["operation"], "DELETE");
    assert_eq!(ev[2]["record"]["id"], 123);
    assert_eq!(ev[2]["old"]["status"], "paid");
    for e in &ev {
        assert!(e["commitTimestamp"].as_str().unwrap().ends_with('Z'));
        assert!(e["lsn"].as_str().unwrap().contains('/'));
        assert_eq!(e["id"].as_str().unwrap().len(), 25);
    }
    assert!(
        ev[0]["id"].as_str() < ev[1]["id"].as_str() && ev[1]["id"].as_str() < ev[2]["id"].as_str()
    );
}

#[tokio::test]
async fn ddl_and_truncate_become_schema_updates_in_order_with_row_changes() {
    let (app, f, mut sub) = setup().await;
    app.rows(
        &f.admin,
        &f.project,
        "CREATE TABLE t (id int PRIMARY KEY); INSERT INTO t VALUES (1);
         ALTER TABLE t ADD COLUMN note text; INSERT INTO t VALUES (2, 'after');
         ALTER TABLE t RENAME COLUMN note TO memo; ALTER TABLE t DROP COLUMN memo;
         ALTER TABLE t RENAME TO t2; TRUNCATE t2; DROP TABLE t2",
    )
    .await;
    let ev = events(&mut sub, 9).await;
    let kinds: Vec<String> = ev
        .iter()
        .map(|e| match e["operation"].as_str() {
            Some(op) => format!("{op} {}", e["record"]),
            None => format!(
                "{} {}",
                e["command"].as_str().unwrap(),
                e["table"].as_str().unwrap_or("-")
            ),
        })
        .collect();
    assert_eq!(
        kinds,
        vec![
            "CREATE TABLE t".to_string(),
            "INSERT {\"id\":1}".into(),
            "ALTER TABLE t".into(),
            "INSERT {\"id\":2,\"note\":\"after\"}".into(),
            "ALTER TABLE t".into(),
            "ALTER TABLE t".into(),
            "ALTER TABLE t2".into(),
            "TRUNCATE t2".into(),
            "DROP TABLE t2".into(),
        ]
    );
    for e in ev.iter().filter(|e| e["operation"].is_null()) {
        assert_eq!(e["event_type"], "schema_update");
    }
    // One transaction: one commit LSN for all.
    let lsns: std::collections::HashSet<_> = ev
        .iter()
        .map(|e| e["id"].as_str().unwrap()[..16].to_string())
        .collect();
    assert_eq!(lsns.len(), 1);
}

#[tokio::test]
async fn an_aborted_transaction_emits_nothing() {
    let (app, f, mut sub) = setup().await;
    app.rows(&f.admin, &f.project, "CREATE TABLE a (x int)")
        .await;
    events(&mut sub, 1).await;
    let code = app
        .sql_error(
            &f.admin,
            &f.project,
            "INSERT INTO a VALUES (1); INSERT INTO a VALUES (2); SELECT 1/0",
        )
        .await;
    assert_eq!(code, "22012");
    app.rows(&f.admin, &f.project, "BEGIN; INSERT INTO a VALUES (3); SAVEPOINT s; INSERT INTO a VALUES (4); ROLLBACK TO s; INSERT INTO a VALUES (5); COMMIT").await;
    // A later transaction is the sentinel: nothing of the aborted ones came before or between.
    app.rows(&f.admin, &f.project, "INSERT INTO a VALUES (6)")
        .await;
    let ev = events(&mut sub, 3).await;
    assert_eq!(ev[0]["record"], json!({ "x": 3 }));
    assert_eq!(ev[1]["record"], json!({ "x": 5 }));
    assert_eq!(ev[2]["record"], json!({ "x": 6 }));
}

#[tokio::test]
async fn event_values_equal_what_execute_sql_returns_for_the_same_row() {
    let (app, f, mut sub) = setup().await;
    app.rows(&f.admin, &f.project, "CREATE TYPE mood AS ENUM ('sad', 'happy'); CREATE TABLE v (
        b bool, i2 int2, i4 int4, i8 int8, f4 float4, f8 float8, n numeric, t text, u uuid, d date,
        ts timestamp, tz timestamptz, iv interval, j json, jb jsonb, by bytea, arr int[], tarr text[], m mood)").await;
    events(&mut sub, 2).await;
    app.rows(&f.admin, &f.project, "INSERT INTO v VALUES (true, 32767, -2147483648, 9223372036854775807, 1.5, 'NaN', 123456789012345678901234567890.12,
        E'quote \" back \\\\ nl \\n', 'a0eebc99-9c0b-4ef8-bb6d-6bb9bd380a11', '2024-02-29', '2024-01-02 03:04:05.5', '2024-01-02 03:04:05+05:30',
        '1 day 02:03:04', '{\"a\": [1, 2.50]}', '{\"b\": null}', '\\xdeadbeef', ARRAY[1, NULL], ARRAY['x,y', NULL], 'happy')").await;
    let ev = events(&mut sub, 1).await;
    let row = &app.rows(&f.read, &f.project, "SELECT * FROM v").await[0];
    assert_eq!(&ev[0]["record"], row);
}

#[tokio::test]
async fn an_unchanged_toasted_value_is_present_in_the_update_event() {
    let (app, f, mut sub) = setup().await;
    app.rows(
        &f.admin,
        &f.project,
        "CREATE TABLE docs (id int PRIMARY KEY, body text, n int)",
    )
    .await;
    // 10 kB of incompressible text (random hex) is stored out of line.
    app.rows(&f.admin, &f.project, "INSERT INTO docs SELECT 1, (SELECT string_agg(md5(random()::text), '') FROM generate_series(1, 320)), 0").await;
    let inserted = events(&mut sub, 2).await;
    let body = inserted[1]["record"]["body"].as_str().unwrap().to_string();
    assert_eq!(body.len(), 320 * 32);
    app.rows(&f.admin, &f.project, "UPDATE docs SET n = 1 WHERE id = 1")
        .await;
    let ev = events(&mut sub, 1).await;
    assert_eq!(ev[0]["record"]["body"].as_str(), Some(body.as_str()));
    assert_eq!(ev[0]["record"]["n"], 1);
    assert!(ev[0].get("unchangedToast").is_none());
}

/// The value of `name{project="<project>"}` in the `/metrics` of the server at `base`.
async fn project_metric(base: &str, name: &str, project: &str) -> u64 {
    let (status, body) = call(base, "GET", "/metrics", None, Value::Null).await;
    assert_eq!(status, 200, "{body}");
    let text = body["raw"].as_str().unwrap_or_default();
    let series = format!("{name}{{project=\"{project}\"}} ");
    text.lines()
        .find_map(|l| l.strip_prefix(&series))
        .and_then(|v| v.trim().parse::<f64>().ok())
        .unwrap_or_else(|| panic!("no {series}in {text}")) as u64
}

/// 200 MB in one transaction, through a real server process to a WebSocket subscriber: it
/// arrives streamed, spills to disk past `cdc_buffer_bytes` (the stream's
/// `fluxbase_cdc_spilled_bytes_total` counts it), the process's peak resident memory stays
/// within a bound derived from that buffer, and the rows come out whole and in order; the same
/// transaction aborted releases nothing.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_200_mb_transaction_streams_through_in_bounded_memory_and_in_order() {
    const BUFFER: u64 = 4 << 20;
    const ROWS: i64 = 100_000;
    const PAD: u64 = 2000;
    let buffer = BUFFER.to_string();
    let server = ServerProcess::start(&[
        ("FLUXBASE_CDC_BUFFER_BYTES", buffer.as_str()),
        ("FLUXBASE_CDC_DECODING_WORK_MEM_KB", "1024"),
        ("FLUXBASE_STATEMENT_TIMEOUT_MS", "1800000"),
        // The room keeps the whole transaction in its resume history (on disk), so a socket
        // that falls behind the pump on a loaded machine catches up instead of being cut off.
        ("FLUXBASE_REALTIME_RETENTION_BYTES", "1073741824"),
        ("FLUXBASE_REALTIME_RETENTION_EVENTS", "1000000"),
        ("FLUXBASE_REALTIME_RETENTION_SECS", "86400"),
        ("FLUXBASE_REALTIME_CLIENT_STALL_SECS", "600"),
    ])
    .await;
    let p = project(&server.base).await;
    sql(
        &server.base,
        &p.admin,
        &p.project,
        "CREATE TABLE big (id int, pad text)",
    )
    .await;
    let mut ws = subscribed(&server.base, &p, None).await;
    // One row through the whole path first: the baseline includes a running stream, room and
    // socket.
    sql(
        &server.base,
        &p.admin,
        &p.project,
        "INSERT INTO big VALUES (0, 'warm-up')",
    )
    .await;
    assert_eq!(row(&mut ws).await.0, 0);
    let baseline = server.peak_rss();
    let spilled_before =
        project_metric(&server.base, "fluxbase_cdc_spilled_bytes_total", &p.project).await;

    // 2000 random-looking hex characters per row: 200 MB that compression does not shrink.
    let fill = "(SELECT string_agg(md5(g::text || r::text), '') FROM generate_series(1, 63) r)";
    let insert = {
        let request = reqwest::Client::builder()
            .timeout(Duration::from_secs(1800))
            .build()
            .unwrap()
            .post(format!("{}/api/execute-sql", server.base))
            .bearer_auth(&p.admin)
            .json(&json!({
                "projectId": p.project,
                "query": format!("INSERT INTO big SELECT g, left({fill}, {PAD}) FROM generate_series(1, {ROWS}) g"),
            }));
        tokio::spawn(async move {
            let resp = request.send().await.expect("the INSERT request");
            (resp.status().as_u16(), resp.text().await.unwrap())
        })
    };
    let mut bytes = 0u64;
    for want in 1..=ROWS {
        // Hang guards only. The first row comes after the whole INSERT has committed.
        let wait = Duration::from_secs(if want == 1 { 1800 } else { 300 });
        let m = recv_within(&mut ws, wait).await;
        assert_eq!(m["type"], "db_event", "{m}");
        let record = &m["payload"]["record"];
        assert_eq!(record["id"].as_i64(), Some(want), "missing or out of order");
        bytes += record["pad"].as_str().unwrap().len() as u64;
    }
    let (status, body) = insert.await.unwrap();
    assert_eq!(status, 200, "{body}");
    assert_eq!(bytes, PAD * ROWS as u64);

    let peak = server.peak_rss();
    let spilled = project_metric(&server.base, "fluxbase_cdc_spilled_bytes_total", &p.project)
        .await
        - spilled_before;
    // Everything past the buffer went to disk: at most one buffer's worth stayed in memory.
    assert!(
        spilled >= PAD * ROWS as u64 - BUFFER,
        "only {spilled} bytes of the 200 MB transaction were spilled"
    );
    // The server's own memory over its baseline: the buffer (counted by payload size, held as
    // parsed rows: up to about twice that), the spill file's 1 MiB write and read buffers, the
    // bus's durable queue (2,048 events of ~4.3 kB: a row is held as `record` and `payload`),
    // the realtime pump's batch and the socket's queue (1 MiB). Measured: +32 MiB (72 -> 104
    // MiB); before the durable queue was shortened from 65,536 events, +322 MiB. Allowed: a
    // third of the transaction.
    let allowed = 4 * BUFFER + (48 << 20);
    println!(
        "200 MB transaction: peak RSS {} MiB from a baseline of {} MiB (+{} MiB, allowed +{} MiB); spilled {} MiB",
        peak >> 20,
        baseline >> 20,
        peak.saturating_sub(baseline) >> 20,
        allowed >> 20,
        spilled >> 20
    );
    assert!(
        peak.saturating_sub(baseline) <= allowed,
        "peak RSS {peak} grew more than {allowed} over the baseline {baseline}"
    );

    // The same, aborted: nothing is released. The row committed after it is the next message.
    let (status, body) = call(
        &server.base,
        "POST",
        "/api/execute-sql",
        Some(&p.admin),
        json!({
            "projectId": p.project,
            "query": "INSERT INTO big SELECT g, repeat('y', 2000) FROM generate_series(1, 20000) g; SELECT 1/0",
        }),
    )
    .await;
    assert_eq!((status, &body["success"]), (200, &json!(false)), "{body}");
    sql(
        &server.base,
        &p.admin,
        &p.project,
        "INSERT INTO big VALUES (-1, 'marker')",
    )
    .await;
    // Hang guard only: the stream decodes (and spills) the 40 MB it then throws away first.
    let m = recv_within(&mut ws, Duration::from_secs(300)).await;
    assert_eq!(m["type"], "db_event", "{m}");
    assert_eq!(
        m["payload"]["record"]["id"].as_i64(),
        Some(-1),
        "the aborted rows were released"
    );
}

#[tokio::test]
async fn cdc_status_reports_the_slot_and_lag() {
    let (app, f, mut sub) = setup().await;
    app.rows(
        &f.admin,
        &f.project,
        "CREATE TABLE s (x int); INSERT INTO s VALUES (1)",
    )
    .await;
    next_event(&mut sub).await; // the CREATE TABLE
    let insert = next_event(&mut sub).await;
    let v: Value = serde_json::from_str(&insert.payload).unwrap();
    assert_eq!(
        (&v["operation"], &v["table"]),
        (&json!("INSERT"), &json!("s"))
    );
    let path = format!("/api/cdc/status?projectId={}", f.project);
    let lsn = |v: &Value, field: &str| -> Lsn {
        v[field]
            .as_str()
            .unwrap_or_else(|| panic!("no {field} in {v}"))
            .parse()
            .unwrap_or_else(|_| panic!("{field} is not an LSN in {v}"))
    };
    // The change has been delivered and there is no durable subscriber: the stream confirms it
    // to the slot on its own (hang guard only; no timing is asserted).
    crate::support::poll::until(
        Duration::from_secs(20),
        Duration::from_millis(100),
        || async {
            let (status, body) = app.call("GET", &path, Some(&f.read), None).await;
            match body["stream"]["confirmedLsn"]
                .as_str()
                .map(str::parse::<Lsn>)
            {
                Some(Ok(c)) if status == 200 && c >= insert.end_lsn => Ok(()),
                _ => Err(format!(
                    "the slot never confirmed the INSERT (end {}): {status} {body}",
                    insert.end_lsn
                )),
            }
        },
    )
    .await;
    // Asked again, after the confirmation: everything the stream did before it shows.
    let (status, body) = app.call("GET", &path, Some(&f.read), None).await;
    assert_eq!(status, 200, "{body}");
    let stream = &body["stream"];
    assert_eq!(stream["state"], "streaming", "{body}");
    assert_eq!(body["slot"]["name"], format!("fluxbase_{}", f.project));
    assert_eq!(body["slot"]["active"], true, "{body}");
    assert!(stream["events"].as_u64().unwrap() >= 2, "{body}");
    let (confirmed, received) = (lsn(stream, "confirmedLsn"), lsn(stream, "receivedLsn"));
    // In the project's own terms (the WAL is every project's): the stream received the
    // INSERT's commit (its end) and the slot confirmed it; the server's end of the WAL is not
    // shown, and lagBytes is what of the project's own is not stored yet.
    assert_eq!(received, insert.end_lsn, "{body}");
    assert_eq!(confirmed, received, "{body}");
    assert_eq!(stream["serverLsn"], Value::Null, "{body}");
    assert_eq!(stream["lagBytes"], 0, "{body}");
    // The operator's figure (the WAL the slot holds back, behind the server's end) is in
    // /metrics, once the stream's periodic check (every 5 s) has read the server's end.
    let series = format!("fluxbase_cdc_lag_bytes{{project=\"{}\"}}", f.project);
    crate::support::poll::until(
        Duration::from_secs(20),
        Duration::from_millis(200),
        || async {
            let metrics = app.metrics_text().await;
            if metrics.contains(&series) {
                Ok(())
            } else {
                Err(format!("no {series} in {metrics}"))
            }
        },
    )
    .await;
    // lagSeconds is the commit-to-publish delay of the last transaction: published, so a
    // number, and not negative.
    let lag_seconds = stream["lagSeconds"]
        .as_f64()
        .unwrap_or_else(|| panic!("no lagSeconds in {body}"));
    assert!(lag_seconds >= 0.0, "{body}");
    assert!(stream["lastEventAt"].as_str().is_some(), "{body}");
}

/// Inserts `from..=to` into `t`, one transaction each, through the API.
async fn insert_range(app: &TestApp, f: &Fixture, from: i64, to: i64) {
    for x in from..=to {
        app.rows(&f.admin, &f.project, &format!("INSERT INTO t VALUES ({x})"))
            .await;
    }
}

/// A crash simulated inside the test process (`TestApp::crash()`: the change streams are
/// aborted without a last status update, and a new server starts on the same configuration),
/// because the durable subscriber whose acknowledgements it checks is the test itself, on the
/// in-process bus. What a real `kill -9` of the server process does to delivery is proven by
/// the webhook and realtime tests that kill a `ServerProcess`.
#[tokio::test]
async fn after_the_streams_are_aborted_in_process_every_event_past_the_last_acknowledgement_arrives_again_with_the_same_id(
) {
    let app = spawn_app().await;
    let f = app.fixture().await;
    let bus = app.app.bus.project(&f.project);
    let mut durable = bus.subscribe_durable();
    app.rows(&f.admin, &f.project, "CREATE TABLE t (x int)")
        .await;
    let create = next_event(&mut durable).await;
    durable.ack(create.end_lsn);
    insert_range(&app, &f, 1, 40).await;
    let mut ids = std::collections::HashMap::new();
    let mut acked_end = create.end_lsn;
    for _ in 1..=40 {
        let e = next_event(&mut durable).await;
        let x = serde_json::from_str::<Value>(&e.payload).unwrap()["record"]["x"]
            .as_i64()
            .unwrap();
        ids.insert(x, e.id.clone());
        if x <= 20 {
            durable.ack(e.end_lsn);
            acked_end = e.end_lsn;
        }
    }
    // The slot follows the acknowledgements, and not beyond them.
    let deadline = std::time::Instant::now() + Duration::from_secs(60);
    while slot_confirmed(&f.project).await < acked_end.0 {
        assert!(
            std::time::Instant::now() < deadline,
            "the slot never reached the acknowledged position"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    // (The slot may move further on an idle keepalive, but never past a commit that is not
    // acknowledged: the replay below proves it.)

    // The simulated crash: nothing more is confirmed. More changes commit while no server runs.
    let config = app.abort_in_process();
    let pg = crate::support::pg().await;
    pg.client(&format!("fx_{}", f.project))
        .await
        .batch_execute("INSERT INTO t SELECT generate_series(41, 60)")
        .await
        .unwrap();

    // Subscribed before the stream starts (as the webhook writers are): a subscriber joining
    // after it could find the replay already confirmed, nobody having held the slot.
    let (_app, durable) = crate::support::start_with_durable(config, Some(&f.project)).await;
    let mut durable = durable.expect("subscribed");
    let mut seen = std::collections::BTreeSet::new();
    while seen.len() < 40 || !(21..=60).all(|x| seen.contains(&x)) {
        let e = next_event(&mut durable).await;
        let v: Value = serde_json::from_str(&e.payload).unwrap();
        let x = v["record"]["x"].as_i64().unwrap();
        assert!(x > 20, "an acknowledged event ({x}) was replayed");
        if let Some(old_id) = ids.get(&x) {
            assert_eq!(&e.id, old_id, "a replayed event keeps its id");
        }
        seen.insert(x);
        durable.ack(e.end_lsn);
    }
    assert_eq!(seen, (21..=60).collect());
}

#[tokio::test]
async fn a_slot_that_disappears_is_a_loud_error_not_a_silent_gap() {
    let (app, f, mut sub) = setup().await;
    app.rows(&f.admin, &f.project, "CREATE TABLE t (x int)")
        .await;
    events(&mut sub, 1).await;
    app.app.cdc.stop(&f.project).await;
    let pg = crate::support::pg().await;
    pg.client("postgres")
        .await
        .query(
            "SELECT pg_drop_replication_slot($1)",
            &[&format!("fluxbase_{}", f.project)],
        )
        .await
        .unwrap();
    app.app.cdc.start(
        f.project.clone(),
        format!("fx_{}", f.project),
        fluxbase::projects::Engine::Postgresql,
    );
    let deadline = std::time::Instant::now() + Duration::from_secs(60);
    loop {
        let s = app.app.cdc.status(&f.project).unwrap();
        if s.state == fluxbase::cdc::StreamState::SlotLost {
            assert!(s.last_error.unwrap().contains("is gone"));
            break;
        }
        assert!(std::time::Instant::now() < deadline, "{s:?}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let (_, body) = app
        .call(
            "GET",
            &format!("/api/cdc/status?projectId={}", f.project),
            Some(&f.admin),
            None,
        )
        .await;
    assert_eq!(body["stream"]["state"], "slot_lost");
    assert_eq!(body["slot"]["missing"], true);
}

/// A definite error (the publication the slot reads is gone, and nothing recreates it) stops the
/// stream and reports it, where it used to reconnect forever with the same error.
#[tokio::test]
async fn a_definite_error_stops_the_stream_and_reports_it_instead_of_retrying() {
    use fluxbase::cdc::StreamState;
    let (app, f, mut sub) = setup().await;
    app.rows(&f.admin, &f.project, "CREATE TABLE t (x int)")
        .await;
    events(&mut sub, 1).await;
    let pg = crate::support::pg().await;
    let db = pg.client(&format!("fx_{}", f.project)).await;
    db.batch_execute("DROP PUBLICATION fluxbase_changes; INSERT INTO t VALUES (1)")
        .await
        .unwrap();
    let deadline = std::time::Instant::now() + Duration::from_secs(60);
    let failed = loop {
        let s = app.app.cdc.status(&f.project).unwrap();
        if s.state == StreamState::Failed {
            break s;
        }
        assert!(std::time::Instant::now() < deadline, "{s:?}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    let error = failed.last_error.clone().unwrap();
    assert!(error.contains("publication"), "{error}");
    // Stopped for good: the stream's task has ended (a task that waits to retry is still
    // running), so no attempt can follow; it ended failed, with no reconnect since.
    crate::support::poll::until(
        Duration::from_secs(60),
        Duration::from_millis(50),
        || async {
            match app.app.cdc.is_running(&f.project) {
                false => Ok(()),
                true => Err(format!(
                    "the failed stream's task is still running: {:?}",
                    app.app.cdc.status(&f.project)
                )),
            }
        },
    )
    .await;
    let later = app.app.cdc.status(&f.project).unwrap();
    assert_eq!(later.state, StreamState::Failed);
    assert_eq!(later.reconnects, failed.reconnects, "{later:?}");

    let body = app.cdc_status(&f.project, &f.admin).await;
    assert_eq!(body["stream"]["state"], "failed", "{body}");
    assert_eq!(body["stream"]["lastError"], error.as_str(), "{body}");
    let text = app.app.metrics.render(0, 0, &app.app.cdc.all_status());
    assert!(
        text.contains(&format!(
            "fluxbase_cdc_failed{{project=\"{}\"}} 1",
            f.project
        )),
        "{text}"
    );
    assert!(
        text.contains(&format!("fluxbase_cdc_up{{project=\"{}\"}} 0", f.project)),
        "{text}"
    );
}

#[tokio::test]
async fn deleting_a_project_drops_its_slot_and_database() {
    let (app, f, _sub) = setup().await;
    app.delete_project(&f.project, &f.admin).await;
    let pg = crate::support::pg().await;
    let c = pg.client("postgres").await;
    let slots = c
        .query(
            "SELECT 1 FROM pg_replication_slots WHERE slot_name = $1",
            &[&format!("fluxbase_{}", f.project)],
        )
        .await
        .unwrap();
    assert!(slots.is_empty());
    let dbs = c
        .query(
            "SELECT 1 FROM pg_database WHERE datname = $1",
            &[&format!("fx_{}", f.project)],
        )
        .await
        .unwrap();
    assert!(dbs.is_empty());
    let roles = c
        .query(
            "SELECT 1 FROM pg_roles WHERE rolname LIKE $1",
            &[&format!("fx_{}_%", f.project)],
        )
        .await
        .unwrap();
    assert!(roles.is_empty());
    let (status, _) = app
        .call(
            "POST",
            "/api/execute-sql",
            Some(&f.admin),
            Some(json!({ "projectId": f.project, "query": "SELECT 1" })),
        )
        .await;
    assert_eq!(status, 401, "the project's keys went with it");
}

/// Writes WAL in another database of the cluster, then waits (at most 120 s) until `project`'s
/// slot has confirmed past it; `pinned` is the failure's message.
async fn wal_moves_elsewhere_and_the_slot_follows(project: &str, pinned: &str) {
    let pg = crate::support::pg().await;
    let c = pg.client("postgres").await;
    let table = crate::support::unique("elsewhere");
    c.batch_execute(&format!(
        "CREATE TABLE {table} (x int); INSERT INTO {table} SELECT generate_series(1, 1000)"
    ))
    .await
    .unwrap();
    let target: i64 = c
        .query_one("SELECT (pg_current_wal_lsn() - '0/0'::pg_lsn)::int8", &[])
        .await
        .unwrap()
        .get(0);
    let deadline = std::time::Instant::now() + Duration::from_secs(120);
    while (slot_confirmed(project).await as i64) < target {
        assert!(std::time::Instant::now() < deadline, "{pinned}");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

#[tokio::test]
async fn an_idle_database_does_not_pin_wal() {
    let (app, f, mut sub) = setup().await;
    app.rows(&f.admin, &f.project, "CREATE TABLE t (x int)")
        .await;
    events(&mut sub, 1).await;
    // WAL moves on elsewhere in the cluster; this project's slot follows it.
    wal_moves_elsewhere_and_the_slot_follows(&f.project, "the idle slot still pins WAL").await;
    // Following the WAL published nothing: the next event is a later row of this project's.
    app.rows(&f.admin, &f.project, "INSERT INTO t VALUES (1)")
        .await;
    let ev = events(&mut sub, 1).await;
    assert_eq!(
        (&ev[0]["operation"], &ev[0]["record"]),
        (&json!("INSERT"), &json!({ "x": 1 }))
    );
}

/// The same with a durable subscriber that was handed nothing (an idle project's room pump or
/// webhook writer): it holds nothing back, so the slot still follows the WAL (red team rt4: idle
/// projects' positions never moved, and an idle slot that never moves pins the cluster's WAL
/// until it is lost). What it is handed later it receives, and the slot waits for its ack.
#[tokio::test]
async fn an_idle_database_with_a_durable_subscriber_that_was_handed_nothing_does_not_pin_wal() {
    let (app, f, mut sub) = setup().await;
    app.rows(&f.admin, &f.project, "CREATE TABLE t (x int)")
        .await;
    let create = next_event(&mut sub).await;
    // With no durable subscriber everything published is confirmable: past the CREATE first,
    // so that the durable subscriber's replay is empty.
    let deadline = std::time::Instant::now() + Duration::from_secs(60);
    while slot_confirmed(&f.project).await < create.end_lsn.0 {
        assert!(
            std::time::Instant::now() < deadline,
            "the slot never confirmed the CREATE"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let mut durable = app.app.bus.project(&f.project).subscribe_durable();
    let (seen_tx, mut seen) = tokio::sync::mpsc::unbounded_channel();
    let acker = tokio::spawn(async move {
        while let Some(e) = durable.recv().await {
            durable.ack(e.end_lsn);
            let _ = seen_tx.send(e);
        }
    });
    wal_moves_elsewhere_and_the_slot_follows(
        &f.project,
        "an idle durable subscriber pins the slot",
    )
    .await;
    app.rows(&f.admin, &f.project, "INSERT INTO t VALUES (1)")
        .await;
    let e = tokio::time::timeout(Duration::from_secs(20), seen.recv())
        .await
        .expect("the durable subscriber got the insert")
        .unwrap();
    let v: Value = serde_json::from_str(&e.payload).unwrap();
    assert_eq!(v["record"], json!({ "x": 1 }), "{v}");
    acker.abort();
}

#[tokio::test]
async fn the_stream_recovers_after_postgresql_crashes_and_restarts() {
    let root = crate::support::scratch_dir(&format!(
        "it-{}-{}",
        std::process::id(),
        crate::support::unique("crash")
    ));
    let cluster = Arc::new(DedicatedCluster::start_exactly(&[("fsync", "off")]).await);
    let config = fluxbase::config::Config {
        listen: "127.0.0.1:0".parse().unwrap(),
        data_dir: root.join("data"),
        database_url: Some(cluster.cluster.url("fluxbase").into()),
        rate_limit_requests: 10_000,
        session_rate_limit_requests: 10_000,
        ..Default::default()
    };
    let app = crate::support::start_with(config).await;
    let f = app.fixture().await;
    let mut sub = app.app.bus.project(&f.project).subscribe();
    app.rows(&f.admin, &f.project, "CREATE TABLE t (x int)")
        .await;
    insert_range(&app, &f, 1, 5).await;
    events(&mut sub, 6).await;

    let c = cluster.clone();
    tokio::task::spawn_blocking(move || c.cluster.restart("immediate"))
        .await
        .unwrap()
        .unwrap();
    // The API's pooled connections died with the server: retry until it answers again.
    let deadline = std::time::Instant::now() + Duration::from_secs(120);
    for x in 6..=10 {
        loop {
            let (status, body) = app
                .call("POST", "/api/execute-sql", Some(&f.admin), Some(json!({ "projectId": f.project, "query": format!("INSERT INTO t VALUES ({x})") })))
                .await;
            if status == 200 && body["success"] == true {
                break;
            }
            assert!(
                std::time::Instant::now() < deadline,
                "the API did not recover: {body}"
            );
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    }
    let mut seen = std::collections::BTreeSet::new();
    while !(6..=10).all(|x| seen.contains(&x)) {
        let e = next_event(&mut sub).await;
        let v: Value = serde_json::from_str(&e.payload).unwrap();
        if let Some(x) = v["record"]["x"].as_i64() {
            seen.insert(x);
        }
    }
    let status = app.app.cdc.status(&f.project).unwrap();
    assert!(status.reconnects >= 1, "{status:?}");
    assert_eq!(status.state, fluxbase::cdc::StreamState::Streaming);
    app.stop().await;
    let _ = tokio::task::spawn_blocking(move || drop(cluster)).await;
}

/// A randomized workload over several tables, with rolled-back transactions: replaying the
/// events in order rebuilds exactly the tables' final contents.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn replaying_the_events_of_a_random_workload_rebuilds_the_tables() {
    let app = spawn_app().await;
    let f = app.fixture().await;
    let mut sub = app.app.bus.project(&f.project).subscribe_durable();
    app.rows(&f.admin, &f.project, "
        CREATE TABLE r1 (id int PRIMARY KEY, v text, n int);
        CREATE TABLE r2 (id int PRIMARY KEY, data jsonb);
        CREATE TABLE r3 (id int PRIMARY KEY, at timestamptz, tags text[]);
        CREATE TABLE done (x int);
        CREATE PROCEDURE workload(total int, seed float8) LANGUAGE plpgsql AS $$
        DECLARE i int := 0; op int; tbl int; k int;
        BEGIN
          PERFORM setseed(seed);
          WHILE i < total LOOP
            tbl := floor(random() * 3); k := floor(random() * 400); op := floor(random() * 3);
            IF tbl = 0 THEN
              IF op = 0 THEN INSERT INTO r1 VALUES (k, md5(random()::text), i) ON CONFLICT (id) DO UPDATE SET v = excluded.v, n = excluded.n;
              ELSIF op = 1 THEN UPDATE r1 SET n = n + 1 WHERE id = k;
              ELSE DELETE FROM r1 WHERE id = k; END IF;
            ELSIF tbl = 1 THEN
              IF op = 0 THEN INSERT INTO r2 VALUES (k, jsonb_build_object('i', i, 'r', random())) ON CONFLICT (id) DO UPDATE SET data = excluded.data;
              ELSIF op = 1 THEN UPDATE r2 SET data = data || jsonb_build_object('u', i) WHERE id = k;
              ELSE DELETE FROM r2 WHERE id = k; END IF;
            ELSE
              IF op = 0 THEN INSERT INTO r3 VALUES (k, now() + i * interval '1 second', ARRAY[md5(i::text), NULL]) ON CONFLICT (id) DO UPDATE SET at = excluded.at;
              ELSIF op = 1 THEN UPDATE r3 SET tags = tags || i::text WHERE id = k;
              ELSE DELETE FROM r3 WHERE id = k; END IF;
            END IF;
            i := i + 1;
            IF i % 40 = 0 THEN
              IF random() < 0.1 THEN ROLLBACK; ELSE COMMIT; END IF;
            END IF;
          END LOOP;
          COMMIT;
        END $$;").await;
    let ddl = events(&mut sub, 5).await;
    assert_eq!(ddl[4]["command"], "CREATE PROCEDURE");
    for e in [&ddl[0], &ddl[1], &ddl[2], &ddl[3]] {
        assert_eq!(e["command"], "CREATE TABLE");
    }
    let total = 100_000;
    let (status, body) = app
        .call(
            "POST",
            "/api/execute-sql",
            Some(&f.admin),
            Some(
                json!({ "projectId": f.project, "query": format!("CALL workload({total}, 0.42)") }),
            ),
        )
        .await;
    assert_eq!((status, &body["success"]), (200, &json!(true)), "{body}");
    // The end of the stream: a transaction committed after the whole workload, so its event
    // comes after every event of the workload.
    app.rows(&f.admin, &f.project, "INSERT INTO done VALUES (1)")
        .await;
    let mut tables: std::collections::HashMap<String, std::collections::BTreeMap<i64, Value>> =
        Default::default();
    let mut count = 0u64;
    let mut last_id = String::new();
    loop {
        // A hang guard only: events of a committed workload keep coming.
        let e = match tokio::time::timeout(Duration::from_secs(120), sub.recv()).await {
            Ok(Some(e)) => e,
            Ok(None) => panic!("cut off: {:?}", sub.closed_reason()),
            Err(_) => panic!("the sentinel never arrived ({count} row changes before it)"),
        };
        assert!(e.id > last_id, "events out of order");
        last_id = e.id.clone();
        sub.ack(e.end_lsn);
        let v: Value = serde_json::from_str(&e.payload).unwrap();
        let table = v["table"].as_str().unwrap().to_string();
        if table == "done" {
            break;
        }
        count += 1;
        let rows = tables.entry(table).or_default();
        match v["operation"].as_str() {
            Some("INSERT") | Some("UPDATE") => {
                if let Some(old) = v["old"]["id"].as_i64() {
                    rows.remove(&old);
                }
                rows.insert(v["record"]["id"].as_i64().unwrap(), v["record"].clone());
            }
            Some("DELETE") => {
                rows.remove(&v["record"]["id"].as_i64().unwrap());
            }
            _ => panic!("unexpected event {v}"),
        }
    }
    assert!(count > 30_000, "only {count} row changes");
    for table in ["r1", "r2", "r3"] {
        let actual = app
            .rows(
                &f.read,
                &f.project,
                &format!("SELECT * FROM {table} ORDER BY id"),
            )
            .await;
        let rebuilt: Vec<Value> = tables
            .remove(table)
            .unwrap_or_default()
            .into_values()
            .collect();
        assert_eq!(rebuilt.len(), actual.len(), "{table}");
        assert!(rebuilt == actual, "{table} differs from its replay");
    }
}

#[tokio::test]
async fn a_subscriber_that_cannot_keep_up_is_cut_off_and_told_why_while_a_reading_one_gets_every_event(
) {
    let (app, f, mut live) = setup().await;
    let mut stalled = app.app.bus.project(&f.project).subscribe();
    app.rows(&f.admin, &f.project, "CREATE TABLE t (x int)")
        .await;
    next_event(&mut live).await; // the CREATE TABLE

    // In transactions of 1,000 rows, each read by `live` before the next: the stream runs on a
    // thread of its own and may publish a whole transaction before this task is scheduled, so
    // `live` must never be a queue behind, while `stalled` reads nothing and falls behind.
    let n = fluxbase::bus::QUEUE_LEN + 100;
    let mut live_rows: Vec<(i64, String)> = Vec::with_capacity(n);
    let mut sent = 0;
    while sent < n {
        let k = (n - sent).min(1000);
        app.rows(
            &f.admin,
            &f.project,
            &format!(
                "INSERT INTO t SELECT generate_series({}, {})",
                sent + 1,
                sent + k
            ),
        )
        .await;
        for _ in 0..k {
            let e = next_event(&mut live).await;
            live_rows.push((row_x(&e), e.id.clone()));
        }
        sent += k;
    }
    // The reading subscriber got every row of the flood, once each, in order, ids ascending:
    // cutting the other one off took nothing from it.
    assert_eq!(live_rows.len(), n);
    for (i, (x, _)) in live_rows.iter().enumerate() {
        assert_eq!(
            *x,
            i as i64 + 1,
            "the reading subscriber lost or reordered a row"
        );
    }
    assert!(
        live_rows.windows(2).all(|w| w[0].1 < w[1].1),
        "the reading subscriber's ids are not ascending"
    );
    // The stalled subscriber got a full queue (the CREATE TABLE, then the first rows in order,
    // the same events as the reading one), then its queue was closed with a reason. Every read
    // has a deadline: a queue that is never closed fails here instead of hanging.
    let create = next_event(&mut stalled).await;
    let v: Value = serde_json::from_str(&create.payload).unwrap();
    assert_eq!(v["command"], "CREATE TABLE", "{v}");
    let mut got = 1;
    loop {
        match tokio::time::timeout(Duration::from_secs(20), stalled.recv()).await {
            Ok(Some(e)) => {
                assert_eq!(
                    (row_x(&e), &e.id),
                    (got as i64, &live_rows[got - 1].1),
                    "the stalled subscriber's queue holds other events"
                );
                got += 1;
            }
            Ok(None) => break,
            Err(_) => panic!("the stalled subscriber was never closed (it read {got} events)"),
        }
    }
    assert_eq!(got, fluxbase::bus::QUEUE_LEN);
    let why = stalled.closed_reason().expect("closed without a reason");
    assert!(why.contains("fell more than"), "{why}");
}

/// `record.x` of a row change on `t`.
fn row_x(e: &fluxbase::bus::Event) -> i64 {
    let v: Value = serde_json::from_str(&e.payload).unwrap();
    assert_eq!(
        (&v["operation"], &v["table"]),
        (&json!("INSERT"), &json!("t")),
        "{v}"
    );
    v["record"]["x"].as_i64().unwrap()
}

/// A project's change stream spends none of the cluster's `max_connections`: it holds its
/// walsender (PostgreSQL counts those apart, `max_wal_senders`) and no session besides, even
/// after it has read a user-defined type from the project's catalog. Otherwise every project
/// held one more session for good, and enough projects filled the cluster under the SQL API.
#[tokio::test]
async fn a_stream_holds_only_its_walsender_even_after_learning_a_type() {
    let (app, f, mut sub) = setup().await;
    app.rows(
        &f.admin,
        &f.project,
        "CREATE DOMAIN score AS int CHECK (VALUE >= 0);
         CREATE TABLE scores (id int PRIMARY KEY, s score)",
    )
    .await;
    app.rows(&f.readwrite, &f.project, "INSERT INTO scores VALUES (1, 5)")
        .await;
    let ev = events(&mut sub, 3).await;
    // Learned: a domain over int renders as its base type (a number, not the text "5").
    assert_eq!(ev[2]["operation"], "INSERT", "{ev:?}");
    assert_eq!(ev[2]["record"], json!({ "id": 1, "s": 5 }), "{ev:?}");
    let pg = crate::support::cluster::pg().await.client("postgres").await;
    let database = format!("fx_{}", f.project);
    crate::support::poll::until(
        Duration::from_secs(20),
        Duration::from_millis(100),
        || async {
            let rows = pg
                .query(
                    "SELECT backend_type, count(*) FROM pg_stat_activity
                     WHERE datname = $1 AND application_name = 'fluxbase-cdc'
                     GROUP BY backend_type ORDER BY 1",
                    &[&database],
                )
                .await
                .unwrap();
            let held: Vec<(String, i64)> = rows.iter().map(|r| (r.get(0), r.get(1))).collect();
            if held == [("walsender".to_string(), 1)] {
                Ok(())
            } else {
                Err(format!("the stream of {database} holds {held:?}"))
            }
        },
    )
    .await;
}

/// One kind and row of an event as a line: `INSERT 3 b after` (id, the value's first letter
/// and its length checked whole, the added column), or `ALTER TABLE big` for a schema change.
fn line(payload: &Value, pad: usize) -> String {
    match payload["operation"].as_str() {
        Some(op) => {
            let r = &payload["record"];
            let v = r["v"].as_str().unwrap_or_default();
            assert!(
                v.len() == pad && v.bytes().all(|b| b == v.as_bytes()[0]),
                "row {} arrived cut or mixed: {} bytes",
                r["id"],
                v.len()
            );
            format!(
                "{op} {} {} {}",
                r["id"],
                &v[..1],
                r["note"].as_str().unwrap_or("-")
            )
        }
        None => format!(
            "{} {}",
            payload["command"].as_str().unwrap_or("?"),
            payload["table"].as_str().unwrap_or("-")
        ),
    }
}

/// A transaction of large rows that PostgreSQL streams before its commit (a small
/// `logical_decoding_work_mem`) and that the stream spills to disk (`cdc_buffer_bytes`), with an
/// ALTER TABLE and a TRUNCATE between its rows, while another transaction of the project commits
/// in the middle of it: on the bus, in a realtime room, to a `strict` webhook and to a socket
/// resuming from before it and from inside it, the other transaction comes first, then every
/// row of the large one whole, each schema change in its place and the rows after the ALTER
/// with the column it added. (Untested before: what the large-row paths do when a schema
/// change or a TRUNCATE falls between their parts.)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn schema_changes_between_the_parts_of_a_streamed_transaction_of_large_rows_stay_in_place() {
    const PAD: usize = 1_000_000;
    let app = crate::support::spawn_app_with(|c| {
        c.cdc_buffer_bytes = 1 << 20;
        c.cdc_decoding_work_mem_kb = Some(64);
        c.webhook_allow_private = true;
    })
    .await;
    let f = app.fixture().await;
    let mut sub = app.app.bus.project(&f.project).subscribe();
    app.rows(
        &f.admin,
        &f.project,
        "CREATE TABLE big (id int PRIMARY KEY, v text); CREATE TABLE small (id int)",
    )
    .await;
    // Both tables' schema events have passed before the room and the webhook are made.
    // (The bus is at-least-once: a durable subscriber joining makes the stream replay from the
    // slot; what was seen is skipped by id, as a room does.)
    let mut last = loop {
        let e = events(&mut sub, 1).await.remove(0);
        if e["table"] == "small" {
            break e["id"].as_str().unwrap().to_string();
        }
    };
    let spilled = || project_metric(&app.base, "fluxbase_cdc_spilled_bytes_total", &f.project);
    let spilled_before = spilled().await;
    let rx = crate::support::receiver::Receiver::start().await;
    let (status, hook) = app
        .call(
            "POST",
            "/api/webhooks",
            Some(&f.admin),
            Some(json!({ "projectId": f.project, "url": rx.url, "ordering": "strict",
                         "events": ["row.inserted", "schema.changed"], "tables": ["big", "small"] })),
        )
        .await;
    assert_eq!(status, 201, "{hook}");
    let mut ws = crate::support::ws::connect(&app, "/").await;
    let m = crate::support::ws::subscribe(&mut ws, &f.project, Some(&f.read)).await;
    assert_eq!(m["type"], "subscribed", "{m}");

    let script = format!(
        "INSERT INTO big SELECT g, repeat('a', {PAD}) FROM generate_series(1, 4) g;
         SELECT pg_sleep(2);
         ALTER TABLE big ADD COLUMN note text DEFAULT 'n';
         INSERT INTO big SELECT g, repeat('b', {PAD}), 'after' FROM generate_series(5, 8) g;
         TRUNCATE big;
         INSERT INTO big SELECT g, repeat('c', {PAD}), 'again' FROM generate_series(9, 12) g"
    );
    let other = async {
        // While the large one sleeps, its first rows already streamed.
        tokio::time::sleep(Duration::from_millis(700)).await;
        app.rows(&f.admin, &f.project, "INSERT INTO small VALUES (100)")
            .await;
    };
    tokio::join!(app.rows(&f.admin, &f.project, &script), other);

    let mut want = vec!["INSERT 100 - -".to_string()];
    want.extend((1..=4).map(|i| format!("INSERT {i} a -")));
    want.push("ALTER TABLE big".into());
    want.extend((5..=8).map(|i| format!("INSERT {i} b after")));
    want.push("TRUNCATE big".into());
    want.extend((9..=12).map(|i| format!("INSERT {i} c again")));
    let small_line = |p: &Value| match (p["table"].as_str(), p["operation"].as_str()) {
        (Some("small"), Some(op)) => format!("{op} {} - -", p["record"]["id"]),
        _ => line(p, PAD),
    };

    let mut on_bus = Vec::new();
    while on_bus.len() < want.len() {
        let e = events(&mut sub, 1).await.remove(0);
        if e["id"].as_str().unwrap() > last.as_str() {
            last = e["id"].as_str().unwrap().to_string();
            on_bus.push(e);
        }
    }
    let got: Vec<String> = on_bus.iter().map(small_line).collect();
    assert_eq!(got, want, "on the bus");
    // The premise: the large transaction went through the spill file.
    let spilled = spilled().await - spilled_before;
    assert!(spilled >= 8 * PAD as u64, "only {spilled} bytes spilled");
    let ids: Vec<&str> = on_bus.iter().map(|e| e["id"].as_str().unwrap()).collect();
    assert!(
        ids.windows(2).all(|w| w[0] < w[1]),
        "ids out of order: {ids:?}"
    );

    let mut in_room = Vec::new();
    while in_room.len() < want.len() {
        let m = recv_within(&mut ws, Duration::from_secs(60)).await;
        if matches!(m["type"].as_str(), Some("db_event" | "schema_update")) {
            in_room.push(small_line(&m["payload"]));
        }
    }
    assert_eq!(in_room, want, "in the realtime room");

    // A socket resuming from the other transaction's event, and one from the fourth large row
    // (inside the large transaction): the rest, whole, from the room's history.
    for (since, from) in [(ids[0], 1), (ids[4], 5)] {
        let mut ws = crate::support::ws::connect(&app, "/").await;
        crate::support::ws::send(
            &mut ws,
            json!({ "type": "subscribe", "roomId": crate::support::ws::room(&f.project),
                    "token": f.read, "since": since }),
        )
        .await;
        let m = recv_within(&mut ws, Duration::from_secs(20)).await;
        assert_eq!(m["type"], "subscribed", "{m}");
        let mut resumed = Vec::new();
        while resumed.len() < want.len() - from {
            let m = recv_within(&mut ws, Duration::from_secs(60)).await;
            assert_ne!(m["type"], "error", "resuming after {since}: {m}");
            if matches!(m["type"].as_str(), Some("db_event" | "schema_update")) {
                resumed.push(small_line(&m["payload"]));
            }
        }
        assert_eq!(resumed, want[from..], "resumed after {since}");
    }

    // The strict webhook: one delivery at a time, in the same order, each body whole.
    let delivered = rx.wait_for(want.len()).await;
    let got: Vec<String> = delivered
        .iter()
        .map(|r| {
            let body: Value = serde_json::from_str(&r.body).unwrap();
            let p = &body["data"]["new"];
            match body["event_type"].as_str() {
                Some("schema.changed") => line(p, PAD),
                _ if body["table_id"] == "small" => format!("INSERT {} - -", p["id"]),
                _ => {
                    let mut row = json!({ "operation": "INSERT", "record": p });
                    row["table"] = body["table_id"].clone();
                    line(&row, PAD)
                }
            }
        })
        .collect();
    assert_eq!(got, want, "to the strict webhook");
}
