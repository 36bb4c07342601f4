//! Resume that always catches up: the durable history survives kill -9 and graceful restarts,
//! a backlog is streamed at the pace the client reads, a large transaction does not cut off a
//! client that reads at a normal pace, broadcasts have ids, and a graceful shutdown closes
//! sockets with 1001. Through the real `fluxbase` binary (support/process.rs).

use std::sync::atomic::{AtomicBool, AtomicI64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use futures_util::StreamExt;
use serde_json::{json, Value};
use tokio_tungstenite::tungstenite::protocol::frame::coding::CloseCode;
use tokio_tungstenite::tungstenite::Message;

use crate::support::fixtures::project;
use crate::support::http::{call, rest_broadcast, sql};
use crate::support::pg;
use crate::support::process::ServerProcess;
use crate::support::ws::{connect_to, next, nothing_more, room, row, send, subscribed};

/// Commits one row per transaction into `audit` straight on the project's database (so it
/// goes on while no server runs) until `stop`; `committed` is the last id committed so far.
/// Returns how many.
fn steady_writer(
    project: &str,
    stop: Arc<AtomicBool>,
    committed: Arc<AtomicI64>,
) -> tokio::task::JoinHandle<i64> {
    let db = format!("fx_{project}");
    tokio::spawn(async move {
        let client = pg().await.client(&db).await;
        let mut i = 0i64;
        while !stop.load(Ordering::Acquire) {
            i += 1;
            client
                .execute("INSERT INTO audit VALUES ($1)", &[&i])
                .await
                .unwrap();
            committed.store(i, Ordering::Release);
            tokio::time::sleep(Duration::from_millis(3)).await;
        }
        i
    })
}

/// Waits until the writer has committed `rows` more rows than it had at the call (a hang guard
/// of 120 s: the writer stopped).
async fn rows_committed(committed: &AtomicI64, rows: i64, what: &str) {
    let from = committed.load(Ordering::Acquire);
    crate::support::poll::until(
        Duration::from_secs(120),
        Duration::from_millis(20),
        || async {
            let now = committed.load(Ordering::Acquire);
            if now >= from + rows {
                Ok(())
            } else {
                Err(format!(
                    "the writer committed only {} of {rows} rows {what}",
                    now - from
                ))
            }
        },
    )
    .await
}

/// A client reads part of a steady workload, the server goes away (`kill9`: SIGKILL, with a
/// torn record appended to its history as a crash mid-write leaves; otherwise SIGTERM) while
/// the writer goes on, and the client resumes on the restarted server with its last id: it
/// gets every committed row it missed exactly once, in order, then live ones.
async fn resume_across_a_restart(kill9: bool) {
    let mut server = ServerProcess::start(&[]).await;
    let p = project(&server.base).await;
    sql(
        &server.base,
        &p.admin,
        &p.project,
        "CREATE TABLE audit (id int8 PRIMARY KEY)",
    )
    .await;
    let mut ws = subscribed(&server.base, &p, None).await;
    let stop = Arc::new(AtomicBool::new(false));
    let committed = Arc::new(AtomicI64::new(0));
    let writer = steady_writer(&p.project, stop.clone(), committed.clone());
    let mut got = Vec::new();
    let mut last = String::new();
    while got.len() < 100 {
        let (id, event_id) = row(&mut ws).await;
        got.push(id);
        last = event_id;
    }
    if kill9 {
        server.kill9();
        // A crash in the middle of a write: half a record at the end of the newest segment.
        let dir = server.dir.join("realtime").join(&p.project);
        let newest = std::fs::read_dir(&dir)
            .unwrap()
            .filter_map(|e| e.ok().map(|e| e.path()))
            .filter(|p| p.extension().is_some_and(|x| x == "seg"))
            .max()
            .expect("a history segment");
        use std::io::Write;
        let mut f = std::fs::OpenOptions::new()
            .append(true)
            .open(newest)
            .unwrap();
        f.write_all(&[200, 0, 0, 0, 1, 2, 3, 4, b'{', b'"'])
            .unwrap();
    } else {
        let status = server.terminate(Duration::from_secs(60)).await;
        assert!(status.success(), "{status}");
    }
    drop(ws);
    // Rows committed while no server runs.
    rows_committed(&committed, 50, "while no server ran").await;
    server.restart().await;
    let mut ws = subscribed(&server.base, &p, Some(&last)).await;
    // And rows committed after the resume, live ones.
    rows_committed(&committed, 50, "after the resume").await;
    stop.store(true, Ordering::Release);
    let total = writer.await.unwrap();
    // A hang guard only (each row has its own deadline too).
    let deadline = Instant::now() + Duration::from_secs(300);
    while got.last() != Some(&total) {
        assert!(
            Instant::now() < deadline,
            "only {} of {total} rows",
            got.len()
        );
        got.push(row(&mut ws).await.0);
    }
    nothing_more(&mut ws).await;
    let committed: Vec<i64> = pg()
        .await
        .client(&format!("fx_{}", p.project))
        .await
        .query("SELECT id FROM audit ORDER BY id", &[])
        .await
        .unwrap()
        .iter()
        .map(|r| r.get(0))
        .collect();
    assert_eq!(got.len(), committed.len(), "missing or repeated rows");
    assert_eq!(got, committed);
    // Live ones follow.
    sql(
        &server.base,
        &p.admin,
        &p.project,
        &format!("INSERT INTO audit VALUES ({})", total + 1),
    )
    .await;
    assert_eq!(row(&mut ws).await.0, total + 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_resumes_after_kill_9_with_a_steady_workload_and_misses_nothing() {
    resume_across_a_restart(true).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_resumes_after_a_graceful_restart_with_a_steady_workload_and_misses_nothing() {
    resume_across_a_restart(false).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_backlog_of_100000_events_reaches_a_client_that_reads_slowly() {
    // A small queue so that the client's pace, not its queue, sets the rate.
    let server = ServerProcess::start(&[
        ("FLUXBASE_REALTIME_SEND_QUEUE_BYTES", "65536"),
        ("FLUXBASE_REALTIME_RETENTION_EVENTS", "1000000"),
    ])
    .await;
    let p = project(&server.base).await;
    sql(
        &server.base,
        &p.admin,
        &p.project,
        "CREATE TABLE t (id int)",
    )
    .await;
    let mut ws = subscribed(&server.base, &p, None).await;
    sql(
        &server.base,
        &p.admin,
        &p.project,
        "INSERT INTO t VALUES (0)",
    )
    .await;
    let (_, last) = row(&mut ws).await;
    drop(ws);
    sql(
        &server.base,
        &p.admin,
        &p.project,
        "INSERT INTO t SELECT g FROM generate_series(1, 100000) g",
    )
    .await;
    let mut ws = subscribed(&server.base, &p, Some(&last)).await;
    for want in 1..=100_000i64 {
        assert_eq!(row(&mut ws).await.0, want);
        if want % 500 == 0 {
            tokio::time::sleep(Duration::from_millis(25)).await;
        }
    }
    sql(
        &server.base,
        &p.admin,
        &p.project,
        "INSERT INTO t VALUES (100001)",
    )
    .await;
    assert_eq!(row(&mut ws).await.0, 100_001);
    nothing_more(&mut ws).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_100000_row_transaction_reaches_a_live_client_that_falls_behind_by_catching_up() {
    // A send queue far smaller than the transaction (about 20 MB of frames), so that the
    // member has to be moved to catching up rather than cut off. The history retains more
    // than the transaction: at the default (100,000 events) its first segment is trimmed as
    // the transaction's last rows are stored, and a client still reading that segment (a
    // loaded machine) is rightly cut off as out of the retained window, which is not what
    // this test is about; nor is the stall rule (a client that reads nothing for 30 s).
    let server = ServerProcess::start(&[
        ("FLUXBASE_REALTIME_SEND_QUEUE_BYTES", "65536"),
        ("FLUXBASE_REALTIME_RETENTION_EVENTS", "1000000"),
        ("FLUXBASE_REALTIME_CLIENT_STALL_SECS", "600"),
    ])
    .await;
    let p = project(&server.base).await;
    sql(
        &server.base,
        &p.admin,
        &p.project,
        "CREATE TABLE t (id int, note text)",
    )
    .await;
    let mut ws = subscribed(&server.base, &p, None).await;
    sql(
        &server.base,
        &p.admin,
        &p.project,
        "INSERT INTO t SELECT g, md5(g::text) FROM generate_series(1, 100000) g",
    )
    .await;
    let metrics = || async {
        let (_, metrics) = call(&server.base, "GET", "/metrics", None, Value::Null).await;
        metrics["raw"].as_str().unwrap_or_default().to_string()
    };
    let fell_behind = |text: &str| -> u64 {
        text.lines()
            .find_map(|l| l.strip_prefix("fluxbase_realtime_fell_behind_total "))
            .and_then(|v| v.trim().parse().ok())
            .unwrap_or_else(|| panic!("no fluxbase_realtime_fell_behind_total in {text}"))
    };
    // The client reads nothing until the server has moved it to catching up: the transaction
    // does not fit its queue (nor the connection's buffers), whatever the machine's speed.
    let deadline = std::time::Instant::now() + Duration::from_secs(300);
    loop {
        let text = metrics().await;
        if fell_behind(&text) >= 1 {
            break;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "the unread client was never moved to catching up: {text}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let mut previous = String::new();
    for want in 1..=100_000i64 {
        if want % 20_000 == 1 {
            // A normal client's hiccup (a GC pause, a render): the server must not wait for it.
            tokio::time::sleep(Duration::from_millis(500)).await;
        }
        let (id, event_id) = row(&mut ws).await;
        assert_eq!(id, want);
        assert!(event_id > previous, "{event_id} after {previous}");
        previous = event_id;
    }
    sql(
        &server.base,
        &p.admin,
        &p.project,
        "INSERT INTO t VALUES (100001)",
    )
    .await;
    assert_eq!(row(&mut ws).await.0, 100_001);
    nothing_more(&mut ws).await;
    // It was moved to catching up rather than cut off.
    let text = metrics().await;
    assert!(
        text.contains("fluxbase_realtime_cutoffs_total{reason=\"queue_bytes\"} 0"),
        "{text}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn broadcasts_carry_sortable_ids_and_since_replays_each_once_across_a_restart() {
    let mut server = ServerProcess::start(&[]).await;
    let p = project(&server.base).await;
    sql(
        &server.base,
        &p.admin,
        &p.project,
        "CREATE TABLE t (id int)",
    )
    .await;
    let mut watcher = subscribed(&server.base, &p, None).await;
    // Once this row has arrived, the room has seen everything before it (the CREATE TABLE).
    sql(
        &server.base,
        &p.admin,
        &p.project,
        "INSERT INTO t VALUES (0)",
    )
    .await;
    assert_eq!(row(&mut watcher).await.0, 0);
    let mut sender = connect_to(&server.base, "/").await;
    send(
        &mut sender,
        json!({ "type": "subscribe", "roomId": room(&p.project), "token": p.readwrite }),
    )
    .await;
    assert_eq!(next(&mut sender).await["type"], "subscribed");
    let client = |event: &str| json!({ "type": "broadcast", "roomId": room(&p.project), "event": event, "payload": { "via": "client" } });
    let mut seen: Vec<Value> = Vec::new();
    for step in 0..7 {
        match step {
            0 => send(&mut sender, client("c1")).await,
            1 => rest_broadcast(&server.base, &p, "r1").await,
            2 => {
                sql(
                    &server.base,
                    &p.readwrite,
                    &p.project,
                    "SELECT realtime.broadcast('s1')",
                )
                .await;
            }
            3 => {
                sql(
                    &server.base,
                    &p.admin,
                    &p.project,
                    "INSERT INTO t VALUES (1)",
                )
                .await;
            }
            4 => rest_broadcast(&server.base, &p, "r2").await,
            5 => send(&mut sender, client("c2")).await,
            _ => rest_broadcast(&server.base, &p, "r3").await,
        }
        let m = next(&mut watcher).await;
        seen.push(m);
    }
    let id = |m: &Value| -> String {
        m["id"]
            .as_str()
            .or(m["payload"]["id"].as_str())
            .unwrap_or_else(|| panic!("no id: {m}"))
            .to_string()
    };
    let ids: Vec<String> = seen.iter().map(id).collect();
    for pair in ids.windows(2) {
        assert!(pair[0] < pair[1], "ids must increase: {ids:?}");
    }
    // Client and REST broadcasts: `<last event id>-<seq>`; SQL ones: their WAL id.
    assert_eq!(ids[0].len(), 34, "{ids:?}");
    assert_eq!(ids[2].len(), 25, "{ids:?}");
    assert!(ids[4].starts_with(&ids[3]), "{ids:?}");
    assert!(ids[5].starts_with(&ids[3]), "{ids:?}");

    // Resuming after any of them replays exactly those that follow.
    for (i, since) in ids.iter().enumerate() {
        let mut ws = subscribed(&server.base, &p, Some(since)).await;
        for want in &seen[i + 1..] {
            assert_eq!(&next(&mut ws).await, want, "since {since}");
        }
        nothing_more(&mut ws).await;
    }

    // After a restart the sequence goes on after the last id: nothing is replayed twice.
    let status = server.terminate(Duration::from_secs(60)).await;
    assert!(status.success());
    server.restart().await;
    rest_broadcast(&server.base, &p, "r4").await;
    let mut ws = subscribed(&server.base, &p, Some(&ids[3])).await;
    for want in &seen[4..] {
        assert_eq!(&next(&mut ws).await, want);
    }
    let r4 = next(&mut ws).await;
    assert_eq!(r4["event"], "r4", "{r4}");
    assert!(id(&r4) > ids[6], "{r4} after {}", ids[6]);
    nothing_more(&mut ws).await;
    let mut ws = subscribed(&server.base, &p, Some(&id(&r4))).await;
    nothing_more(&mut ws).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_id_older_than_the_retained_window_gets_resume_too_old_after_a_restart_too() {
    let mut server = ServerProcess::start(&[("FLUXBASE_REALTIME_RETENTION_EVENTS", "16")]).await;
    let p = project(&server.base).await;
    sql(
        &server.base,
        &p.admin,
        &p.project,
        "CREATE TABLE t (id int)",
    )
    .await;
    let mut ws = subscribed(&server.base, &p, None).await;
    let mut ids = Vec::new();
    for i in 1..=40 {
        sql(
            &server.base,
            &p.admin,
            &p.project,
            &format!("INSERT INTO t VALUES ({i})"),
        )
        .await;
        let (got, id) = row(&mut ws).await;
        assert_eq!(got, i);
        ids.push(id);
    }
    drop(ws);
    server.kill9();
    server.restart().await;
    let too_old = |ws: Value| {
        assert_eq!(ws["type"], "error", "{ws}");
        assert_eq!(ws["code"], "RESUME_TOO_OLD", "{ws}");
    };
    let mut ws = subscribed(&server.base, &p, Some(&ids[0])).await;
    too_old(next(&mut ws).await);
    sql(
        &server.base,
        &p.admin,
        &p.project,
        "INSERT INTO t VALUES (41)",
    )
    .await;
    assert_eq!(row(&mut ws).await.0, 41);
    nothing_more(&mut ws).await;
    // Inside the window: exactly what followed.
    let mut ws = subscribed(&server.base, &p, Some(&ids[35])).await;
    for want in 37..=41 {
        assert_eq!(row(&mut ws).await.0, want);
    }
    nothing_more(&mut ws).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_closes_every_socket_with_1001_before_the_server_exits() {
    let mut server = ServerProcess::start(&[]).await;
    let p = project(&server.base).await;
    let mut a = subscribed(&server.base, &p, None).await;
    let mut b = subscribed(&server.base, &p, None).await;
    // One that never answers the close handshake: the grace lasts while it is open.
    let stuck = subscribed(&server.base, &p, None).await;
    let sent = std::process::Command::new("kill")
        .args(["-TERM", &server.pid().to_string()])
        .status()
        .expect("running kill");
    assert!(sent.success());
    // Sockets that connect during the grace are refused (503) or closed with 1001 at once;
    // none stays open until the process is gone.
    let url = format!("{}/", server.base.replacen("http", "ws", 1));
    let deadline = Instant::now() + Duration::from_secs(20);
    let (mut refused, mut closed) = (0, 0);
    loop {
        assert!(
            Instant::now() < deadline,
            "the server never stopped accepting"
        );
        match tokio_tungstenite::connect_async(url.as_str()).await {
            Ok((mut ws, _)) => {
                let got = tokio::time::timeout(Duration::from_secs(15), async {
                    loop {
                        match ws.next().await {
                            Some(Ok(Message::Close(frame))) => return frame,
                            Some(Ok(_)) => {}
                            other => panic!("a socket opened during the grace: {other:?}"),
                        }
                    }
                })
                .await
                .expect("a socket opened during the grace got no close frame");
                let got = got.expect("a close frame with a code");
                assert_eq!(got.code, CloseCode::Away, "{got:?}");
                closed += 1;
            }
            Err(tokio_tungstenite::tungstenite::Error::Http(response)) => {
                assert_eq!(response.status().as_u16(), 503);
                let body: Value =
                    serde_json::from_slice(response.body().as_deref().unwrap_or_default())
                        .expect("a JSON error body");
                assert_eq!(body["success"], false);
                assert_eq!(body["error"]["code"], "SERVER_SHUTTING_DOWN");
                refused += 1;
            }
            Err(_) => break, // no longer accepting
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert!(
        refused + closed > 0,
        "no connection attempt landed in the grace period"
    );
    let status = server.terminate(Duration::from_secs(60)).await;
    assert!(status.success(), "{status}");
    drop(stuck);
    for ws in [&mut a, &mut b] {
        let close = tokio::time::timeout(Duration::from_secs(20), async {
            loop {
                match ws.next().await {
                    Some(Ok(Message::Close(frame))) => return frame,
                    Some(Ok(_)) => {}
                    other => panic!("expected a close frame, got {other:?}"),
                }
            }
        })
        .await
        .expect("no close frame");
        let close = close.expect("a close frame with a code");
        assert_eq!(close.code, CloseCode::Away, "{close:?}");
        assert_eq!(close.reason.as_str(), "server shutting down");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_resumers_each_get_the_backlog_once_and_a_deleted_project_loses_its_history() {
    const SOCKETS: usize = 12;
    let server = ServerProcess::start(&[("FLUXBASE_REALTIME_SEND_QUEUE_BYTES", "32768")]).await;
    let p = project(&server.base).await;
    sql(
        &server.base,
        &p.admin,
        &p.project,
        "CREATE TABLE t (id int); CREATE TABLE other (id int)",
    )
    .await;
    let mut ws = subscribed(&server.base, &p, None).await;
    sql(
        &server.base,
        &p.admin,
        &p.project,
        "INSERT INTO t VALUES (0)",
    )
    .await;
    let (_, since) = row(&mut ws).await;
    drop(ws);
    sql(
        &server.base,
        &p.admin,
        &p.project,
        "INSERT INTO t SELECT g FROM generate_series(1, 10000) g;
         INSERT INTO other SELECT g FROM generate_series(10001, 10100) g",
    )
    .await;
    let mut readers = Vec::new();
    for i in 0..SOCKETS {
        let (base, since, room_id, read) = (
            server.base.clone(),
            since.clone(),
            room(&p.project),
            p.read.clone(),
        );
        readers.push(tokio::spawn(async move {
            let mut ws = connect_to(&base, "/").await;
            let mut msg =
                json!({ "type": "subscribe", "roomId": room_id, "token": read, "since": since });
            // Every third one only wants the other table: the filter applies to the backlog.
            let filtered = i % 3 == 0;
            if filtered {
                msg["filter"] = json!({ "tables": ["other"] });
            }
            send(&mut ws, msg).await;
            assert_eq!(next(&mut ws).await["type"], "subscribed");
            let range = if filtered { 10001..=10100 } else { 1..=10100 };
            for want in range {
                assert_eq!(row(&mut ws).await.0, want, "socket {i}");
                if i % 2 == 1 && want % 1000 == 0 {
                    tokio::time::sleep(Duration::from_millis(20)).await;
                }
            }
            nothing_more(&mut ws).await;
        }));
    }
    for r in readers {
        tokio::time::timeout(Duration::from_secs(300), r)
            .await
            .expect("a resumer never finished")
            .unwrap();
    }

    let dir = server.dir.join("realtime").join(&p.project);
    assert!(dir.is_dir(), "{}", dir.display());
    let (status, body) = call(
        &server.base,
        "DELETE",
        &format!("/api/projects?projectId={}", p.project),
        Some(&p.admin),
        Value::Null,
    )
    .await;
    assert_eq!(status, 200, "{body}");
    let deadline = Instant::now() + Duration::from_secs(20);
    while dir.exists() {
        assert!(
            Instant::now() < deadline,
            "the history outlived its project"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}
