//! Binlog change-capture throughput and latency (issue 20): a MySQL project's binlog stream
//! delivering a fixed workload to the event bus, beside `mariadb-binlog --read-from-remote-server`
//! decoding the same binlog range from the same server, in the same run.
//!
//! The server runs in-process on a throwaway PostgreSQL cluster (the control database) with an
//! embedded MariaDB of its own (durability relaxed as in the test suite). Each round:
//!
//! ```text
//!  prepare    the project's stream stopped; its stored position set to the end of the log
//!  workload   N inserts (BENCH_BATCH rows per transaction) then U updates of wide rows (old
//!             and new image), through one admin connection; the range [start, end) noted
//!  reference  mariadb-binlog --read-from-remote-server --start-position --stop-position -v
//!             (rows decoded to text) > /dev/null, as the replication account
//!  fluxbase   cdc.start (mysql): dump → decode → render → bus → a durable subscriber counts N + U
//! ```
//!
//! The two read the same range in turn, the reference first in odd rounds and Fluxbase first in
//! even ones; a first round (BENCH_WARMUP, default 1) is not counted. events/s = (N + U) /
//! elapsed, from the request to the last event; each figure is the median of the counted
//! rounds, and the ratio Fluxbase / reference is printed per round and as a median (target:
//! at least 0.9×; printed, not asserted), with the CPU each process used while it read: the
//! reference client, mariadbd (serving either one its dump), and this process (the stream and
//! the counting subscriber).
//!
//! Then one single-row INSERT per transaction at a steady BENCH_TPS (default 1000) for
//! BENCH_LATENCY_SECONDS (default 10): each event's delay from when the client saw its COMMIT
//! return to when the subscriber got it; p50, p99 and max (target: p99 at most 20 ms).
//!
//! Environment: BENCH_ROWS (default 100000), BENCH_UPDATES (default 10000), BENCH_WIDE_BYTES
//! (default 1000), BENCH_BATCH (default 1000), BENCH_ROUNDS (default 3), BENCH_WARMUP
//! (default 1), BENCH_TPS, BENCH_LATENCY_SECONDS, FLUXBASE_LOG (default warn).

use std::collections::HashMap;
use std::path::Path;
use std::process::Stdio;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use fluxbase::app::SharedApp;
use fluxbase::cdc::binlog::position::{self, BinlogPosition, Stored};
use fluxbase::projects::Engine;
use mysql_async::prelude::Queryable;
use mysql_async::{Conn, Opts};

const TARGET_RATIO: f64 = 0.9;
/// Latency events the subscriber received more than once.
static REPEATED: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
const TARGET_P99_MS: f64 = 20.0;

type Settings = fluxbase_bench::ChangeSettings;

#[tokio::main]
async fn main() -> Result<()> {
    fluxbase_bench::init_tracing();
    let settings = Settings::from_env(100000, 10000);
    fluxbase_bench::on_throwaway_cluster(
        "binlog-bench",
        fluxbase_bench::FAST.to_vec(),
        async |cluster, dir| {
            let root = dir.join("mariadb");
            let password = fluxbase::secrets::random_base62(24);
            let mariadb = tokio::task::spawn_blocking(move || {
                fluxbase::mysql::embedded::Server::start(
                    &root,
                    &password,
                    &[
                        ("innodb-flush-log-at-trx-commit", "2"),
                        ("sync-binlog", "0"),
                        ("innodb-buffer-pool-size", "268435456"),
                    ],
                )
            })
            .await??;
            let url = mariadb.admin_url();
            let mariadbd_pid = std::fs::read_to_string(dir.join("mariadb").join("mariadbd.pid"))
                .ok()
                .and_then(|p| p.trim().parse::<u32>().ok());
            let (app, running) = fluxbase_bench::start_app(cluster, dir, |c| {
                c.mysql_url = Some(url.clone().into());
            })
            .await?;
            let result = bench(&app, &url, mariadbd_pid, &settings).await;
            running.stop().await;
            let _ = mariadb.stop();
            result
        },
    )
    .await
}

struct Round {
    reference: Duration,
    fluxbase: Duration,
    reference_cpu: f64,
    reference_server_cpu: f64,
    fluxbase_cpu: f64,
    fluxbase_server_cpu: f64,
}

impl Round {
    fn ratio(&self) -> f64 {
        self.reference.as_secs_f64() / self.fluxbase.as_secs_f64()
    }
}

async fn bench(
    app: &SharedApp,
    admin_url: &str,
    mariadbd: Option<u32>,
    s: &Settings,
) -> Result<()> {
    let user = fluxbase_bench::bench_user(app).await?;
    let (project, _) = app
        .create_project(&user.id, "binlog bench", Engine::Mysql)
        .await
        .map_err(|e| anyhow::anyhow!("creating the project: {e}"))?;
    let db = project.db_name.clone();
    let mut conn = Conn::new(Opts::from_url(admin_url)?).await?;
    conn.query_drop(format!("USE `{db}`")).await?;
    conn.query_drop(
        "CREATE TABLE bench_rows (id bigint PRIMARY KEY, account int NOT NULL, \
         amount decimal(12,2) NOT NULL, note varchar(100) NOT NULL, created_at datetime(6) NOT NULL)",
    )
    .await?;
    conn.query_drop(
        "CREATE TABLE bench_wide (id bigint PRIMARY KEY, counter int NOT NULL, payload text NOT NULL)",
    )
    .await?;
    conn.query_drop(
        "CREATE TABLE bench_latency (id bigint PRIMARY KEY, note varchar(20) NOT NULL)",
    )
    .await?;
    let repl = app.mysql.replication_opts().await?;
    let repl_password = repl.pass().unwrap_or_default().to_string();
    let repl_user = repl.user().unwrap_or_default().to_string();
    let port = repl.tcp_port();
    let binlog = find_binlog_tool()?;

    // The wide rows the rounds update (not part of any round's range).
    let wide = "w".repeat(s.wide_bytes as usize);
    let values: Vec<String> = (0..s.updates)
        .map(|i| format!("({i}, 0, '{wide}')"))
        .collect();
    for chunk in values.chunks(500) {
        conn.query_drop(format!("INSERT INTO bench_wide VALUES {}", chunk.join(",")))
            .await?;
    }
    let mut rounds = Vec::new();
    let mut next_id = 0u64;
    for round in 0..(s.warmup + s.rounds) {
        app.cdc.stop(&project.id).await;
        let start = current(&mut conn).await?;
        // The workload.
        let mut done = 0;
        while done < s.rows {
            let n = s.batch.min(s.rows - done);
            let values: Vec<String> = (0..n)
                .map(|i| {
                    let id = next_id + done + i;
                    format!(
                        "({id}, {}, {}.{:02}, 'note {id}', NOW(6))",
                        id % 97,
                        id % 10_000,
                        id % 100
                    )
                })
                .collect();
            conn.query_drop("BEGIN").await?;
            conn.query_drop(format!(
                "INSERT INTO bench_rows VALUES {}",
                values.join(",")
            ))
            .await?;
            conn.query_drop("COMMIT").await?;
            done += n;
        }
        next_id += s.rows;
        let mut updated = 0;
        while updated < s.updates {
            let n = s.batch.min(s.updates - updated);
            conn.query_drop(format!(
                "UPDATE bench_wide SET counter = counter + 1 WHERE id >= {updated} AND id < {}",
                updated + n
            ))
            .await?;
            updated += n;
        }
        let end = current(&mut conn).await?;
        let bytes = if start.file == end.file {
            end.offset - start.offset
        } else {
            0
        };
        let reference_first = round % 2 == 1;
        let mut r = Round {
            reference: Duration::ZERO,
            fluxbase: Duration::ZERO,
            reference_cpu: 0.0,
            reference_server_cpu: 0.0,
            fluxbase_cpu: 0.0,
            fluxbase_server_cpu: 0.0,
        };
        for turn in 0..2 {
            if (turn == 0) == reference_first {
                let server0 = mariadbd.and_then(process_cpu);
                let (elapsed, cpu) =
                    run_reference(&binlog, port, &repl_user, &repl_password, &start, &end).await?;
                r.reference = elapsed;
                r.reference_cpu = cpu;
                r.reference_server_cpu = cpu_since(mariadbd, server0);
            } else {
                let server0 = mariadbd.and_then(process_cpu);
                let self0 = process_cpu(std::process::id()).unwrap_or(0.0);
                r.fluxbase = run_fluxbase(app, &project.id, &db, &start, s.changes()).await?;
                r.fluxbase_cpu = process_cpu(std::process::id()).unwrap_or(0.0) - self0;
                r.fluxbase_server_cpu = cpu_since(mariadbd, server0);
            }
        }
        let counted = round >= s.warmup;
        println!(
            "round {round}{}: {} first; {:.1} MB of binlog; reference {:.0} ev/s (client {:.2} s CPU, mariadbd {:.2} s), \
             fluxbase {:.0} ev/s (this process {:.2} s CPU, mariadbd {:.2} s); ratio {:.2}x",
            if counted { "" } else { " (warm-up)" },
            if reference_first { "reference" } else { "fluxbase" },
            bytes as f64 / 1e6,
            s.changes() as f64 / r.reference.as_secs_f64(),
            r.reference_cpu,
            r.reference_server_cpu,
            s.changes() as f64 / r.fluxbase.as_secs_f64(),
            r.fluxbase_cpu,
            r.fluxbase_server_cpu,
            r.ratio()
        );
        if counted {
            rounds.push(r);
        }
    }
    let median = |f: &dyn Fn(&Round) -> f64| fluxbase_bench::median(rounds.iter().map(f));
    let rate = |d: Duration| s.changes() as f64 / d.as_secs_f64();
    println!(
        "binlog capture: {} inserts ({} per transaction) + {} updates of {}-byte rows; median of {} rounds after {} warm-up; load (1 min) {:.2}",
        s.rows, s.batch, s.updates, s.wide_bytes, s.rounds, s.warmup, fluxbase_bench::load_average()
    );
    println!(
        "reference (mariadb-binlog -v, remote): {:.0} events/s",
        median(&|r| rate(r.reference))
    );
    println!(
        "fluxbase (binlog stream → bus)       : {:.0} events/s",
        median(&|r| rate(r.fluxbase))
    );
    let per_event = |cpu: f64| cpu * 1e6 / s.changes() as f64;
    println!(
        "CPU per event (medians): reference client {:.2} µs (mariadbd {:.2} µs); this process {:.2} µs (mariadbd {:.2} µs)",
        median(&|r| per_event(r.reference_cpu)),
        median(&|r| per_event(r.reference_server_cpu)),
        median(&|r| per_event(r.fluxbase_cpu)),
        median(&|r| per_event(r.fluxbase_server_cpu)),
    );
    let ratio = median(&Round::ratio);
    println!(
        "ratio fluxbase / reference: {ratio:.2}x median (target >= {TARGET_RATIO:.1}x: {})",
        if ratio >= TARGET_RATIO {
            "met"
        } else {
            "missed"
        }
    );

    // Latency at a steady rate.
    app.cdc.stop(&project.id).await;
    let at = current(&mut conn).await?;
    set_position(app, &project.id, &at).await?;
    let mut sub = app.bus.project(&project.id).subscribe();
    app.cdc.start(
        project.id.clone(),
        db.clone(),
        fluxbase::projects::Engine::Mysql,
    );
    wait_streaming(app, &project.id).await?;
    let arrivals: Arc<Mutex<HashMap<i64, Instant>>> = Arc::default();
    let reader = {
        let arrivals = arrivals.clone();
        tokio::spawn(async move {
            while let Some(e) = sub.recv().await {
                let now = Instant::now();
                if e.table.as_deref() != Some("bench_latency") {
                    continue;
                }
                let v: serde_json::Value = serde_json::from_str(&e.payload).unwrap_or_default();
                if let Some(id) = v["record"]["id"].as_i64() {
                    // The first arrival counts (a replay after a rewind repeats ids).
                    match arrivals.lock().expect("poisoned").entry(id) {
                        std::collections::hash_map::Entry::Occupied(_) => {
                            REPEATED.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                        }
                        std::collections::hash_map::Entry::Vacant(v) => {
                            v.insert(now);
                        }
                    }
                }
            }
        })
    };
    let total = s.tps * s.latency_seconds;
    // The floor: the same log read by a bare binlog dump (mysql_async, no decoding past the
    // event header), each bench_latency row event stamped on arrival. One connection inserts
    // the ids in order, so the k-th row event of the table is id k.
    let raw_arrivals: Arc<Mutex<Vec<Instant>>> = Arc::default();
    let raw = {
        let arrivals = raw_arrivals.clone();
        let opts = app.mysql.replication_opts().await?;
        let mut raw_conn = Conn::new(opts).await?;
        // As the stream asks (MariaDB's own GTID events).
        raw_conn
            .query_drop("SET @mariadb_slave_capability = 4")
            .await?;
        raw_conn
            .query_drop("SET @master_heartbeat_period = 1000000000")
            .await?;
        let request = mysql_async::BinlogStreamRequest::new(7)
            .with_filename(at.file.as_bytes())
            .with_pos(at.offset);
        let mut stream = raw_conn.get_binlog_stream(request).await?;
        tokio::spawn(async move {
            use futures_util::StreamExt;
            use mysql_async::binlog::events::EventData;
            let mut table_id = None;
            while let Some(Ok(event)) = stream.next().await {
                let now = Instant::now();
                match event.header().event_type_raw() {
                    // TABLE_MAP
                    19 => {
                        if let Ok(Some(EventData::TableMapEvent(t))) = event.read_data() {
                            if t.table_name() == "bench_latency" {
                                table_id = Some(t.table_id());
                            }
                        }
                    }
                    // WRITE_ROWS v1 (MariaDB) and v2: the table id is the body's first 6 bytes.
                    23 | 30 => {
                        let d = event.data();
                        if d.len() >= 6 {
                            let mut id = [0u8; 8];
                            id[..6].copy_from_slice(&d[..6]);
                            if Some(u64::from_le_bytes(id)) == table_id {
                                arrivals.lock().expect("poisoned").push(now);
                            }
                        }
                    }
                    _ => {}
                }
            }
        })
    };
    let mut committed = Vec::with_capacity(total as usize);
    let mut tick = tokio::time::interval(Duration::from_secs_f64(1.0 / s.tps as f64));
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Burst);
    let began = Instant::now();
    for id in 0..total as i64 {
        tick.tick().await;
        conn.query_drop(format!("INSERT INTO bench_latency VALUES ({id}, 'x')"))
            .await?;
        committed.push((id, Instant::now()));
    }
    let achieved = total as f64 / began.elapsed().as_secs_f64();
    let deadline = Instant::now() + Duration::from_secs(30);
    while arrivals.lock().expect("poisoned").len() < total as usize && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    while raw_arrivals.lock().expect("poisoned").len() < total as usize && Instant::now() < deadline
    {
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    reader.abort();
    raw.abort();
    let mut raw_delays: Vec<f64> = committed
        .iter()
        .zip(raw_arrivals.lock().expect("poisoned").iter())
        .map(|((_, at), a)| a.saturating_duration_since(*at).as_secs_f64() * 1e3)
        .collect();
    raw_delays.sort_by(f64::total_cmp);
    if let Some(max) = raw_delays.last() {
        let pct =
            |p: f64| raw_delays[((raw_delays.len() as f64 * p) as usize).min(raw_delays.len() - 1)];
        println!(
            "floor: a bare binlog dump of the same log (mysql_async, event headers only): p50 {:.2} ms, p99 {:.2} ms, max {max:.2} ms",
            pct(0.5),
            pct(0.99)
        );
    }
    let arrivals = arrivals.lock().expect("poisoned");
    let mut delays: Vec<f64> = committed
        .iter()
        .filter_map(|(id, at)| {
            arrivals
                .get(id)
                .map(|a| a.saturating_duration_since(*at).as_secs_f64() * 1e3)
        })
        .collect();
    let lost = total as usize - delays.len();
    // Where the slowest events were: a stall at the stream's start (first table map) or a
    // periodic one shows here.
    let mut slowest: Vec<(f64, usize)> = delays.iter().copied().zip(0..).collect();
    slowest.sort_by(|a, b| b.0.total_cmp(&a.0));
    let slowest: Vec<String> = slowest
        .iter()
        .take(5)
        .map(|(d, i)| format!("#{i} {d:.1} ms"))
        .collect();
    println!(
        "slowest events (# in commit order): {}; {} events arrived again (a replay)",
        slowest.join(", "),
        REPEATED.load(std::sync::atomic::Ordering::Relaxed)
    );
    delays.sort_by(f64::total_cmp);
    let pct = |p: f64| delays[((delays.len() as f64 * p) as usize).min(delays.len() - 1)];
    if delays.is_empty() {
        bail!("no latency event arrived");
    }
    println!(
        "commit → event at {achieved:.0} transactions/s ({} s): p50 {:.2} ms, p99 {:.2} ms, max {:.2} ms{} (target p99 <= {TARGET_P99_MS:.0} ms: {})",
        s.latency_seconds,
        pct(0.5),
        pct(0.99),
        delays[delays.len() - 1],
        if lost > 0 { format!(", {lost} not arrived") } else { String::new() },
        if pct(0.99) <= TARGET_P99_MS { "met" } else { "missed" }
    );
    Ok(())
}

async fn current(conn: &mut Conn) -> Result<BinlogPosition> {
    fluxbase::cdc::binlog::current_position(conn)
        .await
        .map_err(|e| anyhow::anyhow!("{e}"))
}

/// Puts the project's stored position at `at` (the bench moves it back for each round).
async fn set_position(app: &SharedApp, project_id: &str, at: &BinlogPosition) -> Result<()> {
    let control = app.control.get().await?;
    control
        .execute(
            "DELETE FROM fluxbase.binlog_positions WHERE project_id = $1",
            &[&project_id],
        )
        .await?;
    position::save(
        &**control,
        project_id,
        &Stored {
            position: at.clone(),
            gtid: None,
        },
    )
    .await?;
    Ok(())
}

async fn wait_streaming(app: &SharedApp, project_id: &str) -> Result<()> {
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        match app.cdc.status(project_id) {
            Some(s) if s.state == fluxbase::cdc::StreamState::Streaming => return Ok(()),
            s if Instant::now() > deadline => bail!("the binlog stream did not start: {s:?}"),
            _ => tokio::time::sleep(Duration::from_millis(5)).await,
        }
    }
}

/// Fluxbase: the stream from `start`, until `changes` row events reached a subscriber.
async fn run_fluxbase(
    app: &SharedApp,
    project_id: &str,
    db: &str,
    start: &BinlogPosition,
    changes: u64,
) -> Result<Duration> {
    set_position(app, project_id, start).await?;
    // Durable (it acknowledges, the stream waits for it): the stream now outruns an ordinary
    // subscriber on this runtime, which the bus then cuts off a queue behind.
    let mut sub = app.bus.project(project_id).subscribe_durable();
    let began = Instant::now();
    app.cdc.start(
        project_id.to_string(),
        db.to_string(),
        fluxbase::projects::Engine::Mysql,
    );
    let mut n = 0;
    while n < changes {
        let e = tokio::time::timeout(Duration::from_secs(120), sub.recv())
            .await
            .context("no event within 120 s")?
            .context("the bus closed the subscription")?;
        if matches!(e.kind, fluxbase::bus::EventKind::Row { .. }) {
            n += 1;
        }
        if e.last_in_transaction {
            sub.ack(e.end_lsn);
        }
    }
    let elapsed = began.elapsed();
    app.cdc.stop(project_id).await;
    Ok(elapsed)
}

/// The reference: `mariadb-binlog` reading the same range from the server, rows decoded.
async fn run_reference(
    tool: &Path,
    port: u16,
    user: &str,
    password: &str,
    start: &BinlogPosition,
    end: &BinlogPosition,
) -> Result<(Duration, f64)> {
    let began = Instant::now();
    let mut child = std::process::Command::new(tool)
        .args([
            "--read-from-remote-server",
            "--host=127.0.0.1",
            &format!("--port={port}"),
            &format!("--user={user}"),
            &format!("--password={password}"),
            &format!("--start-position={}", start.offset),
            &format!("--stop-position={}", end.offset),
            "--base64-output=decode-rows",
            "--verbose",
            &start.file,
        ])
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .context("starting mariadb-binlog")?;
    let pid = child.id();
    let mut cpu = 0.0;
    let status = loop {
        if let Some(c) = process_cpu(pid) {
            cpu = c;
        }
        if let Some(status) = child.try_wait()? {
            break status;
        }
        tokio::time::sleep(Duration::from_millis(2)).await;
    };
    let elapsed = began.elapsed();
    if !status.success() {
        let mut err = String::new();
        use std::io::Read;
        let _ = child.stderr.take().map(|mut e| e.read_to_string(&mut err));
        bail!("mariadb-binlog failed: {err}");
    }
    Ok((elapsed, cpu))
}

fn find_binlog_tool() -> Result<std::path::PathBuf> {
    for name in ["mariadb-binlog", "mysqlbinlog"] {
        for dir in ["/usr/bin", "/usr/local/bin", "/usr/local/mysql/bin"] {
            let p = Path::new(dir).join(name);
            if p.exists() {
                return Ok(p);
            }
        }
    }
    bail!("mariadb-binlog (or mysqlbinlog) is not installed: apt-get install mariadb-client")
}

/// CPU seconds a process has used (`/proc/<pid>/schedstat`, nanoseconds), all its threads.
fn process_cpu(pid: u32) -> Option<f64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/schedstat")).ok()?;
    let ns: u64 = stat.split_whitespace().next()?.parse().ok()?;
    // schedstat of the process is its main thread's: sum the threads.
    let tasks = std::fs::read_dir(format!("/proc/{pid}/task")).ok();
    let total = tasks
        .map(|dir| {
            dir.flatten()
                .filter_map(|t| std::fs::read_to_string(t.path().join("schedstat")).ok())
                .filter_map(|s| s.split_whitespace().next()?.parse::<u64>().ok())
                .sum::<u64>()
        })
        .unwrap_or(ns);
    Some(total as f64 / 1e9)
}

fn cpu_since(pid: Option<u32>, before: Option<f64>) -> f64 {
    match (pid.and_then(process_cpu), before) {
        (Some(a), Some(b)) => a - b,
        _ => f64::NAN,
    }
}
