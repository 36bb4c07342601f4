//! The binlog stream across restarts: the stored position (control migration 0014) advances
//! only with the durable subscribers' acknowledgements, a restart repeats what follows it with
//! the same ids, a purged position stops the stream as `slot_lost`, and after `kill -9` of a
//! real server process nothing a webhook should have received is lost.

use std::collections::{BTreeMap, BTreeSet};
use std::time::Duration;

use fluxbase::cdc::StreamState;
use mysql_async::prelude::Queryable;
use serde_json::{json, Value};

use crate::support::bus::{assert_quiet, next_event};
use crate::support::http::call;
use crate::support::mariadb::{mariadb, project_conn, spawn_mysql_app};
use crate::support::poll;
use crate::support::process::ServerProcess;
use crate::support::receiver::Receiver;
use crate::support::{start_with, start_with_durable};

async fn stored_position(app: &crate::support::TestApp, project: &str) -> Option<(String, i64)> {
    let control = app.app.control.get().await.unwrap();
    control
        .query_opt(
            "SELECT binlog_file, binlog_offset FROM fluxbase.binlog_positions WHERE project_id = $1",
            &[&project],
        )
        .await
        .unwrap()
        .map(|r| (r.get(0), r.get(1)))
}

/// Waits (20 s at most) for the project's stream to stop in `state`; its `/api/cdc/status`.
async fn stopped_as(
    app: &crate::support::TestApp,
    f: &crate::support::Fixture,
    state: StreamState,
) -> Value {
    poll::until(
        Duration::from_secs(20),
        Duration::from_millis(100),
        || async {
            match app.app.cdc.status(&f.project).map(|s| s.state) {
                Some(s) if s == state => Ok(()),
                other => Err(format!("{other:?}")),
            }
        },
    )
    .await;
    app.cdc_status(&f.project, &f.admin).await
}

#[tokio::test]
async fn a_restart_resumes_from_the_acknowledged_position_and_repeats_with_the_same_ids() {
    let app = spawn_mysql_app().await;
    let f = app.mysql_fixture().await;
    let created_at = stored_position(&app, &f.project).await;
    assert!(created_at.is_some(), "the position is recorded at creation");
    // A durable subscriber that acknowledges nothing: the position must not move.
    let durable = app.app.bus.project(&f.project).subscribe_durable();
    let mut sub = app.app.bus.project(&f.project).subscribe();
    let mut conn = project_conn(&f.project).await;
    conn.query_drop("CREATE TABLE r (id int PRIMARY KEY)")
        .await
        .unwrap();
    for i in 1..=3 {
        conn.query_drop(format!("INSERT INTO r VALUES ({i})"))
            .await
            .unwrap();
    }
    let mut first = Vec::new();
    for _ in 0..4 {
        first.push(next_event(&mut sub).await);
    }
    // Several ticks of the stream: still where it was made.
    tokio::time::sleep(Duration::from_millis(1500)).await;
    assert_eq!(stored_position(&app, &f.project).await, created_at);
    drop(durable);

    let config = app.abort_in_process();
    // Committed while no server runs.
    conn.query_drop("INSERT INTO r VALUES (4), (5)")
        .await
        .unwrap();
    // A durable subscriber there before the stream starts (as the webhook writers are) holds
    // the stored position until it acknowledges; one joining later could find the replay
    // already confirmed, nobody having held it.
    let (app, durable) = start_with_durable(config, Some(&f.project)).await;
    let mut durable = durable.expect("subscribed");
    let mut again = Vec::new();
    for _ in 0..6 {
        again.push(next_event(&mut durable).await);
    }
    for (a, b) in first.iter().zip(&again) {
        assert_eq!(a.id, b.id, "a repeated event keeps its id");
        // The same event, but for MariaDB's commit time, which the log gives to the second
        // (a replay reads the end of that second; see docs/change-capture.md).
        let strip = |p: &str| {
            let mut v: Value = serde_json::from_str(p).unwrap();
            let t = v["commitTimestamp"].as_str().unwrap()[..19].to_string();
            v["commitTimestamp"] = json!(t);
            v
        };
        assert_eq!(strip(&a.payload), strip(&b.payload));
    }
    let tail: Vec<Value> = again[4..]
        .iter()
        .map(|e| serde_json::from_str::<Value>(&e.payload).unwrap()["record"]["id"].clone())
        .collect();
    assert_eq!(
        tail,
        [json!(4), json!(5)],
        "changes made while down are not lost"
    );
    assert!(again[4].id > again[3].id);

    // Acknowledged: the position moves to the end of the last transaction, and the next
    // restart repeats nothing before it.
    durable.ack(again[5].end_lsn);
    let end = again[5].end_lsn;
    poll::until(
        Duration::from_secs(20),
        Duration::from_millis(100),
        || async {
            let (file, offset) = stored_position(&app, &f.project).await.unwrap();
            let lsn = fluxbase::cdc::binlog::position::to_lsn(&file, offset as u64).unwrap();
            if lsn >= end {
                Ok(())
            } else {
                Err(format!(
                    "stored {file}:{offset} ({lsn}), acknowledged {end}"
                ))
            }
        },
    )
    .await;
    drop(durable);
    let config = app.abort_in_process();
    let app = start_with(config).await;
    let mut durable = app.app.bus.project(&f.project).subscribe_durable();
    conn.query_drop("INSERT INTO r VALUES (6)").await.unwrap();
    let e = next_event(&mut durable).await;
    let p: Value = serde_json::from_str(&e.payload).unwrap();
    assert_eq!(p["record"]["id"], 6, "{p}");
    assert!(e.id > again[5].id);
    assert_quiet(&mut durable, Duration::from_millis(300)).await;

    // A position whose file the server no longer has: slot_lost, never skipped.
    drop(durable);
    let config = app.abort_in_process();
    let control = {
        let app = start_with(config.clone()).await;
        app.app.cdc.stop_all();
        let c = app.app.control.get().await.unwrap();
        c.execute(
            "UPDATE fluxbase.binlog_positions SET binlog_file = 'binlog.999990' WHERE project_id = $1",
            &[&f.project],
        )
        .await
        .unwrap();
        app.abort_in_process()
    };
    let app = start_with(control).await;
    let body = stopped_as(&app, &f, StreamState::SlotLost).await;
    assert_eq!(body["stream"]["state"], "slot_lost", "{body}");
    assert!(
        body["stream"]["lastError"]
            .as_str()
            .unwrap()
            .contains("binlog.999990"),
        "{body}"
    );
}

/// `kill -9` of a real server process in the middle of a randomized workload (transactions,
/// rollbacks) on a MySQL project, more committed while it is down: after the restart every
/// committed change reaches the webhook at least once, with one delivery id per change, and
/// nothing rolled back does.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn after_kill_9_every_committed_change_reaches_the_webhook() {
    let url = mariadb().await.admin_url.clone();
    let mut server = ServerProcess::start(&[
        ("FLUXBASE_WEBHOOK_ALLOW_PRIVATE", "true"),
        ("FLUXBASE_WEBHOOK_BACKOFF_SCALE", "0.01"),
        ("FLUXBASE_MYSQL_URL", url.as_str()),
    ])
    .await;
    let p = crate::support::fixtures::project_on(&server.base, "mysql").await;
    let (project, admin) = (p.project, p.admin);
    let rx = Receiver::start().await;
    for _ in 0..100_000 {
        rx.answer(200, None);
    }
    let (status, hook) = call(
        &server.base,
        "POST",
        "/api/webhooks",
        Some(&admin),
        json!({ "projectId": project, "url": rx.url, "tables": ["w", "done"],
                "events": ["row.inserted", "row.updated", "row.deleted"] }),
    )
    .await;
    assert_eq!(status, 201, "{hook}");
    let mut conn = project_conn(&project).await;
    conn.query_drop("CREATE TABLE w (id int PRIMARY KEY, v int NOT NULL)")
        .await
        .unwrap();
    conn.query_drop("CREATE TABLE done (id int PRIMARY KEY)")
        .await
        .unwrap();

    // Every change writes a new number into `v`: (operation, v) names it.
    let mut seed = (std::process::id() as u64) << 20 | 12345;
    let mut next = move |n: u64| {
        seed ^= seed << 13;
        seed ^= seed >> 7;
        seed ^= seed << 17;
        seed % n
    };
    let mut committed_rows: BTreeMap<i64, i64> = BTreeMap::new();
    let mut expected: BTreeSet<(String, i64)> = BTreeSet::new();
    let mut rolled_back: BTreeSet<(String, i64)> = BTreeSet::new();
    let mut counter = 0i64;
    let mut killed = false;
    for round in 0..400 {
        if round == 150 {
            // Some deliveries are in: kill the server mid-stream, keep writing.
            rx.wait_for(20).await;
            server.kill9();
            killed = true;
        }
        if round == 300 {
            server.restart().await;
        }
        let mut rows = committed_rows.clone();
        let mut changes = Vec::new();
        conn.query_drop("BEGIN").await.unwrap();
        for _ in 0..=next(4) {
            let id = next(30) as i64;
            counter += 1;
            match (rows.get(&id).copied(), next(3)) {
                (None, _) => {
                    conn.query_drop(format!("INSERT INTO w VALUES ({id}, {counter})"))
                        .await
                        .unwrap();
                    rows.insert(id, counter);
                    changes.push(("INSERT".to_string(), counter));
                }
                (Some(v), 0) => {
                    conn.query_drop(format!("DELETE FROM w WHERE id = {id}"))
                        .await
                        .unwrap();
                    rows.remove(&id);
                    changes.push(("DELETE".to_string(), v));
                }
                (Some(_), _) => {
                    conn.query_drop(format!("UPDATE w SET v = {counter} WHERE id = {id}"))
                        .await
                        .unwrap();
                    rows.insert(id, counter);
                    changes.push(("UPDATE".to_string(), counter));
                }
            }
        }
        if next(5) == 0 {
            conn.query_drop("ROLLBACK").await.unwrap();
            rolled_back.extend(changes);
        } else {
            conn.query_drop("COMMIT").await.unwrap();
            committed_rows = rows;
            expected.extend(changes);
        }
    }
    assert!(killed);
    conn.query_drop("INSERT INTO done VALUES (1)")
        .await
        .unwrap();
    let sentinel = |body: &str| body.contains("\"table_id\":\"done\"");
    // Deliveries of different rows go out concurrently (the `row` ordering): wait until every
    // committed change has arrived, or the deadline.
    let delivered_now = || {
        let got = rx.got.lock().unwrap().clone();
        let mut delivered: BTreeMap<(String, i64), BTreeSet<String>> = BTreeMap::new();
        for r in got.iter().filter(|r| !sentinel(&r.body)) {
            let p: Value = serde_json::from_str(&r.body).unwrap();
            let (op, v) = match p["event_type"].as_str().unwrap() {
                "row.inserted" => ("INSERT", &p["data"]["new"]["v"]),
                "row.updated" => ("UPDATE", &p["data"]["new"]["v"]),
                "row.deleted" => ("DELETE", &p["data"]["old"]["v"]),
                other => panic!("{other}"),
            };
            delivered
                .entry((op.to_string(), v.as_i64().unwrap()))
                .or_default()
                .insert(r.delivery_id().to_string());
        }
        (got, delivered)
    };
    let _ = poll::until(
        Duration::from_secs(120),
        Duration::from_millis(250),
        || async {
            let (got, delivered) = delivered_now();
            let missing = expected
                .iter()
                .filter(|k| !delivered.contains_key(*k))
                .count();
            if missing == 0 && got.iter().any(|r| sentinel(&r.body)) {
                Ok(())
            } else {
                Err(format!(
                    "{missing} committed changes not delivered yet ({} received)",
                    got.len()
                ))
            }
        },
    )
    .await;
    let (got, delivered) = delivered_now();
    let missing: Vec<_> = expected
        .iter()
        .filter(|k| !delivered.contains_key(*k))
        .collect();
    assert!(
        missing.is_empty(),
        "committed changes never delivered: {missing:?}"
    );
    let unexpected: Vec<_> = delivered
        .keys()
        .filter(|k| !expected.contains(*k))
        .collect();
    assert!(
        unexpected.is_empty(),
        "delivered but not committed: {unexpected:?}"
    );
    // (A rolled-back DELETE names the row's value, which a committed change may name too.)
    assert!(rolled_back
        .difference(&expected)
        .all(|k| !delivered.contains_key(k)));
    for (k, ids) in &delivered {
        assert_eq!(
            ids.len(),
            1,
            "{k:?} was delivered under several ids: {ids:?}"
        );
    }
    eprintln!(
        "{} committed changes delivered ({} requests), {} rolled back",
        expected.len(),
        got.len(),
        rolled_back.len()
    );
}

/// The server's 1236 is not proof of a loss: MariaDB refuses a position past its file's end
/// ("impossible position") with the same code as a purged file, and MySQL 8 sends it to a dump
/// another one with the same replica id replaced. With the stored file still listed, the
/// stream is `failed` with the server's words, never `slot_lost` (src/cdc/binlog/mod.rs,
/// `fatal_outcome`; the replaced case is unit-tested: MariaDB does not send it).
#[tokio::test]
async fn a_refused_position_in_a_file_the_server_has_is_failed_not_slot_lost() {
    let app = spawn_mysql_app().await;
    let f = app.mysql_fixture().await;
    app.app.cdc.stop(&f.project).await;
    let (file, _) = stored_position(&app, &f.project).await.unwrap();
    let control = app.app.control.get().await.unwrap();
    control
        .execute(
            "UPDATE fluxbase.binlog_positions SET binlog_offset = 2000000000 WHERE project_id = $1",
            &[&f.project],
        )
        .await
        .unwrap();
    app.app.cdc.start(
        f.project.clone(),
        format!("fx_{}", f.project),
        fluxbase::projects::Engine::Mysql,
    );
    let body = stopped_as(&app, &f, StreamState::Failed).await;
    assert_eq!(body["stream"]["state"], "failed", "{body}");
    assert_eq!(body["slot"]["walStatus"], "reserved", "{body}");
    let error = body["stream"]["lastError"].as_str().unwrap();
    assert!(
        error.contains("cannot read the binary log") && error.contains("impossible position"),
        "{body}"
    );
    assert!(
        mariadb()
            .await
            .query("SHOW BINARY LOGS")
            .await
            .iter()
            .any(|r| r[0].as_deref() == Some(file.as_str())),
        "{file} is still listed"
    );
}

/// A rewind (a durable subscriber joining) is a deliberate restart: the stream ends its
/// previous dump itself before it asks for the new one, so the new dump does not wait ~0.1 s
/// for the server to end it (src/cdc/binlog/mod.rs, `Dumps`), and it takes no reconnection
/// backoff. Counted, not timed: each rewind ends exactly the dump that was streaming (gone from
/// the server's process list), `reconnects` never moves, and every rewound stream delivers.
#[tokio::test]
async fn a_rewind_ends_its_previous_dump_itself_and_takes_no_backoff() {
    let app = spawn_mysql_app().await;
    let f = app.mysql_fixture().await;
    let maria = mariadb().await;
    let mut conn = project_conn(&f.project).await;
    conn.query_drop("CREATE TABLE r (id int PRIMARY KEY)")
        .await
        .unwrap();
    let streaming = || async {
        poll::until(
            Duration::from_secs(20),
            Duration::from_millis(50),
            || async {
                match app.app.cdc.status(&f.project) {
                    Some(s) if s.state == StreamState::Streaming => Ok(s),
                    other => Err(format!("{:?}", other.map(|s| s.state))),
                }
            },
        )
        .await
    };
    let reconnects = streaming().await.reconnects;
    let dumps = &app.app.mysql.dumps;
    let command = |id: u32| async move {
        maria
            .query(&format!(
                "SELECT COMMAND FROM information_schema.PROCESSLIST WHERE ID = {id}"
            ))
            .await
            .first()
            .and_then(|r| r[0].clone())
    };
    for round in 1..=3u64 {
        let before = dumps.current(&f.project).expect("the stream's dump");
        assert_eq!(command(before).await.as_deref(), Some("Binlog Dump"));
        assert_eq!(dumps.ended(&f.project), round - 1);
        let durable = app.app.bus.project(&f.project).subscribe_durable();
        let mut durable = durable;
        conn.query_drop(format!("INSERT INTO r VALUES ({round})"))
            .await
            .unwrap();
        // The rewound stream replays from the stored position, then this round's row.
        loop {
            let e = next_event(&mut durable).await;
            let v: Value = serde_json::from_str(&e.payload).unwrap();
            if v["record"]["id"] == json!(round) {
                break;
            }
        }
        // The old dump may deliver the row before the rewind replaces it (the rewind is
        // asynchronous to the subscribe): wait for the rewind, bounded.
        crate::support::poll::until(
            std::time::Duration::from_secs(30),
            std::time::Duration::from_millis(20),
            || async {
                match dumps.ended(&f.project) {
                    n if n == round => Ok(()),
                    n => Err(format!(
                        "the previous dump was not ended by the stream: {n}"
                    )),
                }
            },
        )
        .await;
        let after = dumps.current(&f.project).expect("the new dump");
        assert_ne!(after, before);
        // `KILL` returns before the thread has left the process list.
        poll::until(
            Duration::from_secs(5),
            Duration::from_millis(20),
            || async {
                match command(before).await {
                    None => Ok(()),
                    Some(c) => Err(format!("the previous dump is still on the server: {c}")),
                }
            },
        )
        .await;
        assert_eq!(
            streaming().await.reconnects,
            reconnects,
            "a rewind took the backoff path"
        );
        drop(durable);
    }
    app.stop().await;
}

/// An id recorded in an earlier run of the MySQL server is never killed: ids start over when
/// the server restarts and the replication account is every project's, so it may now be
/// another project's dump. (Fails if the run is not checked: the rewind ends the dump.)
#[tokio::test]
async fn a_dump_id_from_an_earlier_server_run_is_not_ended() {
    let app = spawn_mysql_app().await;
    let f = app.mysql_fixture().await;
    let mut conn = project_conn(&f.project).await;
    conn.query_drop("CREATE TABLE r (id int PRIMARY KEY)")
        .await
        .unwrap();
    let dumps = &app.app.mysql.dumps;
    poll::until(
        Duration::from_secs(20),
        Duration::from_millis(50),
        || async {
            match app.app.cdc.status(&f.project) {
                Some(s)
                    if s.state == StreamState::Streaming && dumps.current(&f.project).is_some() =>
                {
                    Ok(())
                }
                other => Err(format!("{:?}", other.map(|s| s.state))),
            }
        },
    )
    .await;
    let before = dumps.current(&f.project).unwrap();
    // The record in the control database too (control migration 0019: what another process
    // or node would read), once the stream has written it.
    stored_dump_is(&app, &f.project, before).await;
    dumps.pretend_earlier_run(&f.project);
    let control = app.app.control.get().await.unwrap();
    control
        .execute(
            "UPDATE fluxbase.binlog_positions SET dump_server_start = dump_server_start - 3600 \
             WHERE project_id = $1",
            &[&f.project],
        )
        .await
        .unwrap();
    // A durable subscriber rewinds the stream (as in the test above).
    let mut durable = app.app.bus.project(&f.project).subscribe_durable();
    conn.query_drop("INSERT INTO r VALUES (1)").await.unwrap();
    loop {
        let e = next_event(&mut durable).await;
        let v: Value = serde_json::from_str(&e.payload).unwrap();
        if v["record"]["id"] == json!(1) {
            break;
        }
    }
    assert_eq!(dumps.ended(&f.project), 0, "an earlier run's id was killed");
    assert_ne!(
        dumps.current(&f.project),
        Some(before),
        "the stream did rewind"
    );
    app.stop().await;
}

/// Waits (20 s at most) until the control database records `connection` as the project's dump.
async fn stored_dump_is(app: &crate::support::TestApp, project: &str, connection: u32) {
    poll::until(
        Duration::from_secs(20),
        Duration::from_millis(20),
        || async {
            let control = app.app.control.get().await.unwrap();
            let stored: Option<i64> = control
                .query_one(
                    "SELECT dump_connection FROM fluxbase.binlog_positions WHERE project_id = $1",
                    &[&project],
                )
                .await
                .unwrap()
                .get(0);
            if stored == Some(i64::from(connection)) {
                Ok(())
            } else {
                Err(format!(
                    "the control database records dump {stored:?}, not {connection}"
                ))
            }
        },
    )
    .await;
}

/// A dump "left by a predecessor": a binlog dump under the project's replica id, opened here
/// with the replication account and kept open and read (so that its thread stays on the
/// server until something ends it), recorded in the control database as the project's last
/// dump, as a stream of another process records its own. Returns its connection id and the
/// task reading it, which ends when the server ends the dump.
async fn a_predecessors_dump(
    app: &crate::support::TestApp,
    project: &str,
) -> (u32, tokio::task::JoinHandle<()>) {
    let maria = mariadb().await;
    let status = maria.query("SHOW MASTER STATUS").await;
    let (file, offset) = (
        status[0][0].clone().unwrap(),
        status[0][1].clone().unwrap().parse::<u64>().unwrap(),
    );
    let opts = app.app.mysql.replication_opts().await.unwrap();
    let conn = mysql_async::Conn::new(opts).await.unwrap();
    let id = conn.id();
    let replica = fluxbase::cdc::binlog::server_id(&app.app.mysql.replication_user(), project);
    let request = mysql_async::BinlogStreamRequest::new(replica)
        .with_filename(file.as_bytes())
        .with_pos(offset);
    let mut stream = conn.get_binlog_stream(request).await.unwrap();
    let reading = tokio::spawn(async move {
        use futures_util::StreamExt;
        while let Some(Ok(_)) = stream.next().await {}
    });
    let start: i64 = maria
        .query(
            "SELECT CAST(UNIX_TIMESTAMP() - VARIABLE_VALUE AS SIGNED) \
             FROM information_schema.GLOBAL_STATUS WHERE VARIABLE_NAME = 'UPTIME'",
        )
        .await[0][0]
        .clone()
        .unwrap()
        .parse()
        .unwrap();
    let control = app.app.control.get().await.unwrap();
    fluxbase::cdc::binlog::position::save_dump(&**control, project, id, start)
        .await
        .unwrap();
    (id, reading)
}

/// A stream starting in another process (a restart, a new leader after a failover: nothing of
/// the previous dump in its memory) ends the dump its predecessor left on the server, found in
/// the control database (control migration 0019), rather than waiting for the server to end
/// it. The predecessor's dump is one this test holds open ([`a_predecessors_dump`]): a dump
/// whose client really went away ends by itself at its next heartbeat or event, racing the
/// new process's look. Counted: with the record the held dump is ended by the stream (`KILL`,
/// its reader sees the end, it is gone from the process list); without it (as before the
/// record existed) nothing is ended. The time from the start to the first event is printed
/// for both (docs/benchmarks.md), never asserted.
#[tokio::test]
async fn a_new_process_ends_the_dump_its_predecessor_left() {
    let app = spawn_mysql_app().await;
    let f = app.mysql_fixture().await;
    let maria = mariadb().await;
    let mut conn = project_conn(&f.project).await;
    conn.query_drop("CREATE TABLE r (id int PRIMARY KEY)")
        .await
        .unwrap();
    let dumps = &app.app.mysql.dumps;
    let streaming_with_a_dump = || async {
        poll::until(
            Duration::from_secs(20),
            Duration::from_millis(2),
            || async {
                match (app.app.cdc.status(&f.project), dumps.current(&f.project)) {
                    (Some(s), Some(d)) if s.state == StreamState::Streaming => Ok(d),
                    (s, d) => Err(format!("{:?} {d:?}", s.map(|s| s.state))),
                }
            },
        )
        .await
    };
    let command = |id: u32| async move {
        maria
            .query(&format!(
                "SELECT COMMAND FROM information_schema.PROCESSLIST WHERE ID = {id}"
            ))
            .await
            .first()
            .and_then(|r| r[0].clone())
    };
    let mut previous = streaming_with_a_dump().await;
    let (mut with, mut without) = (Vec::new(), Vec::new());
    for round in 0..6 {
        let recorded = round % 2 == 1;
        stored_dump_is(&app, &f.project, previous).await;
        // The process "dies": its stream stops and its memory of the dump is gone.
        app.app.cdc.stop(&f.project).await;
        dumps.forget(&f.project);
        let held = if recorded {
            let (id, reading) = a_predecessors_dump(&app, &f.project).await;
            assert_eq!(command(id).await.as_deref(), Some("Binlog Dump"));
            Some((id, reading))
        } else {
            let control = app.app.control.get().await.unwrap();
            control
                .execute(
                    "UPDATE fluxbase.binlog_positions SET dump_connection = NULL \
                     WHERE project_id = $1",
                    &[&f.project],
                )
                .await
                .unwrap();
            None
        };
        let started = std::time::Instant::now();
        app.app.cdc.start(
            f.project.clone(),
            format!("fx_{}", f.project),
            fluxbase::projects::Engine::Mysql,
        );
        let now = streaming_with_a_dump().await;
        let took = started.elapsed();
        assert_ne!(now, previous);
        if let Some((id, reading)) = held {
            assert_eq!(
                dumps.ended(&f.project),
                1,
                "the predecessor's dump was not ended"
            );
            tokio::time::timeout(Duration::from_secs(10), reading)
                .await
                .expect("the predecessor's dump still streams")
                .unwrap();
            poll::until(
                Duration::from_secs(5),
                Duration::from_millis(20),
                || async {
                    match command(id).await {
                        None => Ok(()),
                        Some(c) => Err(format!("the predecessor's dump is still there: {c}")),
                    }
                },
            )
            .await;
            with.push(took);
        } else {
            assert_eq!(
                dumps.ended(&f.project),
                0,
                "a dump nobody recorded was ended"
            );
            without.push(took);
        }
        // Still delivering.
        let mut sub = app.app.bus.project(&f.project).subscribe();
        conn.query_drop(format!("INSERT INTO r VALUES ({round})"))
            .await
            .unwrap();
        // (A replay of what followed the stored position may come first.)
        loop {
            let e = next_event(&mut sub).await;
            let v: Value = serde_json::from_str(&e.payload).unwrap();
            if v["record"]["id"] == json!(round) {
                break;
            }
        }
        previous = now;
    }
    eprintln!(
        "start to streaming after another process's dump: without its record {without:?}, \
         ending it from the record {with:?}"
    );
    app.stop().await;
}

/// While they stream, a process's MySQL streams hold one connection each on the server — the
/// dump — and one more for all of them lists the binary logs: the catalog connections a stream
/// needs at its start are closed before it streams (red team rt4: three per project, outside the
/// SQL connection budget, let project creation alone exhaust MariaDB's `max_connections`).
#[tokio::test]
async fn streaming_projects_hold_one_connection_each_on_the_server() {
    let app = spawn_mysql_app().await;
    let maria = mariadb().await;
    let mut projects = Vec::new();
    for _ in 0..3 {
        projects.push(app.mysql_fixture().await);
    }
    for f in &projects {
        let mut conn = project_conn(&f.project).await;
        conn.query_drop("CREATE TABLE j (id int PRIMARY KEY, doc JSON)")
            .await
            .unwrap();
        let mut sub = app.app.bus.project(&f.project).subscribe();
        conn.query_drop("INSERT INTO j VALUES (1, '{\"a\": 1}')")
            .await
            .unwrap();
        // Streaming past DDL, with the JSON column read from the catalog.
        loop {
            let e = next_event(&mut sub).await;
            let v: Value = serde_json::from_str(&e.payload).unwrap();
            if v["record"]["id"] == json!(1) {
                assert_eq!(v["record"]["doc"], json!({ "a": 1 }), "{v}");
                break;
            }
        }
    }
    let user = app.app.mysql.replication_user();
    let dumps: Vec<u32> = projects
        .iter()
        .map(|f| app.app.mysql.dumps.current(&f.project).expect("a dump"))
        .collect();
    poll::until(
        Duration::from_secs(20),
        Duration::from_millis(100),
        || async {
            let rows = maria
                .query(&format!(
                    "SELECT ID, COMMAND FROM information_schema.PROCESSLIST WHERE USER = '{user}'"
                ))
                .await;
            let ids: Vec<u32> = rows
                .iter()
                .map(|r| r[0].as_deref().unwrap().parse().unwrap())
                .collect();
            // The dumps, and the one reader of the log list.
            if ids.len() == dumps.len() + 1 && dumps.iter().all(|d| ids.contains(d)) {
                Ok(())
            } else {
                Err(format!("{rows:?}, dumps {dumps:?}"))
            }
        },
    )
    .await;
    app.stop().await;
}

/// A project written to and then idle, with a durable subscriber that has acknowledged all it
/// was handed: its stored position follows the server's binlog as other projects write, so
/// an idle project never pins the log (red team rt4: a MySQL project "written then idle" kept
/// its position where its last transaction ended while the log moved on).
#[tokio::test]
async fn a_project_written_then_idle_follows_the_binlog() {
    let app = spawn_mysql_app().await;
    let f = app.mysql_fixture().await;
    let other = app.mysql_fixture().await;
    let mut durable = app.app.bus.project(&f.project).subscribe_durable();
    let mut conn = project_conn(&f.project).await;
    conn.query_drop("CREATE TABLE r (id int PRIMARY KEY)")
        .await
        .unwrap();
    conn.query_drop("INSERT INTO r VALUES (1)").await.unwrap();
    for _ in 0..2 {
        let e = next_event(&mut durable).await;
        durable.ack(e.end_lsn);
    }
    // Another project writes: the log moves on past this project's last transaction.
    let mut elsewhere = project_conn(&other.project).await;
    elsewhere
        .query_drop("CREATE TABLE o (id int PRIMARY KEY)")
        .await
        .unwrap();
    for i in 0..50 {
        elsewhere
            .query_drop(format!("INSERT INTO o VALUES ({i})"))
            .await
            .unwrap();
    }
    let maria = mariadb().await;
    let status = maria.query("SHOW MASTER STATUS").await;
    let target = fluxbase::cdc::binlog::position::to_lsn(
        status[0][0].as_deref().unwrap(),
        status[0][1].as_deref().unwrap().parse().unwrap(),
    )
    .unwrap();
    poll::until(
        Duration::from_secs(30),
        Duration::from_millis(200),
        || async {
            let (file, offset) = stored_position(&app, &f.project).await.unwrap();
            let lsn = fluxbase::cdc::binlog::position::to_lsn(&file, offset as u64).unwrap();
            if lsn >= target {
                Ok(())
            } else {
                Err(format!(
                    "stored {file}:{offset} ({lsn}), the log at {target}"
                ))
            }
        },
    )
    .await;
    // Following the log published nothing: the next event is this project's next row.
    conn.query_drop("INSERT INTO r VALUES (2)").await.unwrap();
    let e = next_event(&mut durable).await;
    let v: Value = serde_json::from_str(&e.payload).unwrap();
    assert_eq!(v["record"], json!({ "id": 2 }), "{v}");
}
