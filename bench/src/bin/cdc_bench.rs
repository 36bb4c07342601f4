//! Change-capture throughput and latency: the change stream delivering a fixed workload to the
//! event bus, beside `pg_recvlogical` receiving the same WAL raw with pgoutput, in the same run.
//!
//! The server runs in-process (like the integration tests) on a throwaway cluster. Each round:
//!
//! ```text
//!  prepare    new project; tables + U rows of ~1 kB; its stream confirms them, then stops
//!  workload   slots bench_sql and bench_recvlogical created; N inserts then U updates of the
//!             wide rows (REPLICA IDENTITY FULL: old and new row), BENCH_BATCH rows per
//!             transaction, nothing consuming: three slots retain the same WAL
//!  decoding   pg_logical_slot_get_binary_changes in a backend (no walsender, no network),
//!             checking that pgoutput carries exactly N + U row changes
//!  reference  pg_recvlogical --start --endpos=<end LSN> -f /dev/null, same pgoutput options
//!  fluxbase   cdc.start: slot → decode → assemble → bus → a subscriber counts N + U
//! ```
//!
//! The three drain the same WAL in turn, in the order decoding, pg_recvlogical, Fluxbase in
//! odd rounds and the reverse in even ones, so that of any two each goes first in every other
//! round; a first round (BENCH_WARMUP, default 1) runs them all the same way and is not
//! counted, so that every contender meets a warm page cache, warm catalogs and (for the server)
//! warm code. events/s = (N + U) / elapsed; each figure is the median over the counted rounds.
//! The ratios, Fluxbase / decoding alone (target: median at least 0.5×) and Fluxbase /
//! pg_recvlogical (target: every round at least 1.5×), are printed per round with pass/miss,
//! the load average, and the CPU each process used while it drained (from
//! `/proc/<pid>/schedstat`; in cores busy and in µs per event, the figure that compares across
//! runs on a shared machine): the decoding backend; pg_recvlogical and its walsender; the
//! change stream's walsender and this process (server and counting subscriber; of it the
//! change streams' runtime threads). Then, on the last project, one single-row INSERT per
//! transaction at a steady BENCH_TPS for BENCH_LATENCY_SECONDS: each event's delay from its
//! `commitTimestamp` (PostgreSQL's clock, same machine) and from when the client saw COMMIT
//! return (negative when the event arrives first).
//!
//! On a small machine the walsender, not decoding, is what limits a consumer: PostgreSQL's
//! decoding alone runs several times faster than either. A consumer that waits between
//! messages (pg_recvlogical, which only writes them out) makes the walsender wake it for each
//! one, which costs more there than a busier consumer's own work; so Fluxbase can come out
//! faster than the reference. The summary prints that bound: one core at the stream's
//! walsender's CPU per event, as events/s and as a ratio to decoding alone, and how much of it
//! the stream used (`make bench-host` shows what this host charges per small `send()`).
//!
//! The cluster runs with `fsync=off` (a faster workload; the WAL is read from the page cache
//! either way) and the default `synchronous_commit=on`, so a commit reaches the walsender as
//! soon as it returns.
//!
//! Environment: BENCH_ROWS (inserts, default 200000), BENCH_UPDATES (wide-row updates, default
//! 20000), BENCH_WIDE_BYTES (default 1000), BENCH_BATCH (rows per transaction, default 1000),
//! BENCH_ROUNDS (default 3), BENCH_WARMUP (default 1), BENCH_TPS (default 1000), BENCH_LATENCY_SECONDS (default 10),
//! FLUXBASE_LOG (server log filter, default warn).

use std::path::PathBuf;
use std::process::Stdio;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use fluxbase::app::{App, SharedApp};
use fluxbase::bus::{Event, EventKind, Subscription};
use fluxbase::embedded::{Cluster, SUPERUSER};
use tokio_postgres::Client;

const RECV_SLOT: &str = "bench_recvlogical";
const SQL_SLOT: &str = "bench_sql";
const INSERT_TABLE: &str = "bench_rows";
const WIDE_TABLE: &str = "bench_wide";
const LATENCY_TABLE: &str = "bench_latency";

type Settings = fluxbase_bench::ChangeSettings;

#[tokio::main]
async fn main() -> Result<()> {
    fluxbase_bench::init_tracing();
    let settings = Settings::from_env(200000, 20000);
    fluxbase_bench::on_throwaway_cluster(
        "cdc-bench",
        fluxbase_bench::FAST.to_vec(),
        async |cluster, dir| {
            let (app, running) = fluxbase_bench::start_app(cluster, dir, |_| {}).await?;
            let result = bench(&app, cluster, &settings).await;
            running.stop().await;
            result
        },
    )
    .await
}

/// One project database whose stream is stopped with the setup confirmed: the next WAL is
/// the workload.
struct Project {
    id: String,
    db: String,
    client: Client,
}

/// One pass of the workload through each consumer.
struct Round {
    wal_bytes: u64,
    /// Who went first (the order alternates: see [`order`]).
    order: [Contender; 3],
    decoding: Duration,
    reference: Duration,
    fluxbase: Duration,
    first_event: Duration,
    cpu: RoundCpu,
    /// The 1-minute load average when the round ended.
    load: f64,
}

impl Round {
    /// Fluxbase / pg_recvlogical (events/s).
    fn vs_reference(&self) -> f64 {
        self.reference.as_secs_f64() / self.fluxbase.as_secs_f64()
    }

    /// Fluxbase / decoding alone (events/s).
    fn vs_decoding(&self) -> f64 {
        self.decoding.as_secs_f64() / self.fluxbase.as_secs_f64()
    }
}

/// CPU time (seconds) each process used while it drained the workload.
#[derive(Default)]
struct RoundCpu {
    /// The backend running pg_logical_slot_get_binary_changes.
    decoding_backend: f64,
    /// pg_recvlogical's walsender, from its start to its exit.
    reference_walsender: f64,
    /// The pg_recvlogical process.
    reference_client: f64,
    /// The change stream's walsender, from its start to the last event on the bus.
    fluxbase_walsender: f64,
    /// This process (server and the counting subscriber) during the drain.
    fluxbase_process: f64,
    /// Of which the change stream's runtime (threads `fluxbase-cdc`).
    fluxbase_stream: f64,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Contender {
    Decoding,
    Reference,
    Fluxbase,
}

impl Contender {
    fn name(self) -> &'static str {
        match self {
            Contender::Decoding => "decoding alone",
            Contender::Reference => "pg_recvlogical",
            Contender::Fluxbase => "fluxbase",
        }
    }
}

/// The order of round `r`: decoding, pg_recvlogical, Fluxbase, then the reverse, and so on,
/// so that of every two contenders each goes first in every other round.
fn order(r: u64) -> [Contender; 3] {
    use Contender::*;
    if r.is_multiple_of(2) {
        [Decoding, Reference, Fluxbase]
    } else {
        [Fluxbase, Reference, Decoding]
    }
}

/// The targets (issue 19): the median ratio to decoding alone, and every round's ratio to
/// pg_recvlogical.
const TARGET_VS_DECODING: f64 = 0.5;
const TARGET_VS_REFERENCE: f64 = 1.5;

fn verdict(ok: bool) -> &'static str {
    if ok {
        "pass"
    } else {
        "MISS"
    }
}

async fn bench(app: &SharedApp, cluster: &Cluster, settings: &Settings) -> Result<()> {
    let user = fluxbase_bench::bench_user(app).await?;
    let mut rounds = Vec::new();
    let mut project: Option<Project> = None;
    let total = settings.warmup + settings.rounds;
    for r in 0..total {
        let warmup = r < settings.warmup;
        eprintln!(
            "[bench] round {} of {}{}",
            r + 1,
            total,
            if warmup {
                " (warm-up, not counted)"
            } else {
                ""
            }
        );
        if let Some(previous) = project.take() {
            app.cdc.stop(&previous.id).await;
        }
        let p = prepare(app, cluster, &user.id, settings).await?;
        let round = throughput(app, cluster, &p, settings, order(r)).await?;
        let c = &round.cpu;
        let rate = |d: Duration| settings.changes() as f64 / d.as_secs_f64();
        let cores = |cpu: f64, d: Duration| cpu / d.as_secs_f64();
        eprintln!(
            "[bench] round {}{} (order: {}; load {:.2}): decoding {:.0}k/s, pg_recvlogical {:.0}k/s, \
             fluxbase {:.0}k/s: {:.2}x decoding (target >= {TARGET_VS_DECODING:.2}x: {}), \
             {:.2}x pg_recvlogical (target >= {TARGET_VS_REFERENCE:.2}x: {})",
            r + 1,
            if warmup { " (warm-up)" } else { "" },
            round.order.map(Contender::name).join(", "),
            round.load,
            rate(round.decoding) / 1e3,
            rate(round.reference) / 1e3,
            rate(round.fluxbase) / 1e3,
            round.vs_decoding(),
            verdict(round.vs_decoding() >= TARGET_VS_DECODING),
            round.vs_reference(),
            verdict(round.vs_reference() >= TARGET_VS_REFERENCE),
        );
        eprintln!(
            "[bench]   CPU (cores busy while draining): decoding backend {:.2}; pg_recvlogical's \
             walsender {:.2}, pg_recvlogical {:.2}; fluxbase's walsender {:.2}, this process {:.2} \
             (change stream thread {:.2})",
            cores(c.decoding_backend, round.decoding),
            cores(c.reference_walsender, round.reference),
            cores(c.reference_client, round.reference),
            cores(c.fluxbase_walsender, round.fluxbase),
            cores(c.fluxbase_process, round.fluxbase),
            cores(c.fluxbase_stream, round.fluxbase),
        );
        // The same per event: what compares across runs on a shared machine, where the rates
        // (and cores busy) move with whatever else runs.
        let us = |cpu: f64| cpu * 1e6 / settings.changes() as f64;
        eprintln!(
            "[bench]   CPU per event (µs): decoding backend {:.2}; pg_recvlogical's walsender \
             {:.2}, pg_recvlogical {:.2}; fluxbase's walsender {:.2}, this process {:.2} (change \
             stream thread {:.2})",
            us(c.decoding_backend),
            us(c.reference_walsender),
            us(c.reference_client),
            us(c.fluxbase_walsender),
            us(c.fluxbase_process),
            us(c.fluxbase_stream),
        );
        if !warmup {
            rounds.push(round);
        }
        project = Some(p);
    }
    let p = project.context("BENCH_ROUNDS must be at least 1")?;
    if rounds.is_empty() {
        bail!("BENCH_ROUNDS must be at least 1");
    }
    let latency = latency(app, &p, settings).await?;

    let expected = settings.changes() as f64;
    let median = |f: &dyn Fn(&Round) -> f64| fluxbase_bench::median(rounds.iter().map(f));
    let list = |f: &dyn Fn(&Round) -> f64, scale: f64, unit: &str| {
        rounds
            .iter()
            .map(|r| format!("{:.2}{unit}", f(r) / scale))
            .collect::<Vec<_>>()
            .join(" ")
    };
    let rate = |d: Duration| expected / d.as_secs_f64();
    let cores = |f: &dyn Fn(&Round) -> (f64, Duration)| {
        median(&|r| {
            let (cpu, d) = f(r);
            cpu / d.as_secs_f64()
        })
    };
    println!(
        "change capture: {} inserts + {} updates of ~{} B rows ({} rows/transaction), {:.1} MB of WAL, \
         pgoutput proto 2 (text); median of {} rounds after {} warm-up; load (1 min) {}",
        settings.rows,
        settings.updates,
        settings.wide_bytes,
        settings.batch,
        median(&|r| r.wal_bytes as f64) / 1e6,
        rounds.len(),
        settings.warmup,
        list(&|r| r.load, 1.0, ""),
    );
    println!(
        "decoding alone    : {:>8.0} events/s (rounds: {}; pg_logical_slot_get_binary_changes in a backend: no walsender, no network); CPU: backend {:.2}",
        median(&|r| rate(r.decoding)),
        list(&|r| rate(r.decoding), 1e3, "k"),
        cores(&|r| (r.cpu.decoding_backend, r.decoding)),
    );
    println!(
        "pg_recvlogical    : {:>8.0} events/s (rounds: {}); CPU: walsender {:.2}, pg_recvlogical {:.2}",
        median(&|r| rate(r.reference)),
        list(&|r| rate(r.reference), 1e3, "k"),
        cores(&|r| (r.cpu.reference_walsender, r.reference)),
        cores(&|r| (r.cpu.reference_client, r.reference)),
    );
    println!(
        "fluxbase → bus    : {:>8.0} events/s (rounds: {}; first event after {:.0} ms); CPU: walsender {:.2}, \
         this process {:.2} (change stream {:.2})",
        median(&|r| rate(r.fluxbase)),
        list(&|r| rate(r.fluxbase), 1e3, "k"),
        median(&|r| r.first_event.as_secs_f64() * 1e3),
        cores(&|r| (r.cpu.fluxbase_walsender, r.fluxbase)),
        cores(&|r| (r.cpu.fluxbase_process, r.fluxbase)),
        cores(&|r| (r.cpu.fluxbase_stream, r.fluxbase)),
    );
    let us = |f: &dyn Fn(&RoundCpu) -> f64| median(&|r| f(&r.cpu) * 1e6 / expected);
    println!(
        "CPU per event    : decoding backend {:.2} µs; pg_recvlogical's walsender {:.2} + pg_recvlogical {:.2} µs; \
         fluxbase's walsender {:.2} + this process {:.2} µs (change stream {:.2}) (medians of the rounds)",
        us(&|c| c.decoding_backend),
        us(&|c| c.reference_walsender),
        us(&|c| c.reference_client),
        us(&|c| c.fluxbase_walsender),
        us(&|c| c.fluxbase_process),
        us(&|c| c.fluxbase_stream),
    );
    // What the stream's own walsender allows: its CPU per event, one core. A stream that keeps
    // its walsender busy cannot go faster whatever the client does (docs/benchmarks.md, "The
    // host": on a host where one small send() costs microseconds, this is the bound).
    let walsender_us = us(&|c| c.fluxbase_walsender);
    let ceiling = 1e6 / walsender_us;
    let decoding_rate = median(&|r| rate(r.decoding));
    println!(
        "walsender bound  : {ceiling:.0} events/s = {:.2}x decoding alone (one core at the stream's walsender's \
         {walsender_us:.2} µs per event; decoding {:.2}); the walsender was busy {:.2} of a core",
        ceiling / decoding_rate,
        us(&|c| c.decoding_backend),
        cores(&|r| (r.cpu.fluxbase_walsender, r.fluxbase)),
    );
    let vs_decoding = median(&Round::vs_decoding);
    let lowest_vs_reference = rounds
        .iter()
        .map(Round::vs_reference)
        .fold(f64::INFINITY, f64::min);
    println!(
        "ratio to decoding : {vs_decoding:.2}x median (rounds: {}; target: median >= {TARGET_VS_DECODING:.2}x: {})",
        list(&Round::vs_decoding, 1.0, ""),
        verdict(vs_decoding >= TARGET_VS_DECODING),
    );
    println!(
        "ratio to recvlog. : {:.2}x median (rounds: {}; target: every round >= {TARGET_VS_REFERENCE:.2}x: {})",
        median(&Round::vs_reference),
        list(&Round::vs_reference, 1.0, ""),
        verdict(lowest_vs_reference >= TARGET_VS_REFERENCE),
    );
    println!(
        "latency at {:.0} tx/s ({} transactions of one INSERT, target {} tx/s):",
        latency.achieved_tps, latency.count, settings.tps
    );
    println!(
        "  commit_timestamp → event received  : p50 {:.2} ms, p99 {:.2} ms, max {:.2} ms",
        latency.from_commit.0, latency.from_commit.1, latency.from_commit.2
    );
    println!(
        "  client saw COMMIT → event received : p50 {:.2} ms, p99 {:.2} ms, max {:.2} ms",
        latency.from_client.0, latency.from_client.1, latency.from_client.2
    );
    Ok(())
}

/// A new project with the bench tables and the wide rows, its stream caught up and stopped.
async fn prepare(
    app: &SharedApp,
    cluster: &Cluster,
    user_id: &str,
    settings: &Settings,
) -> Result<Project> {
    let (project, _keys) = app
        .create_project(user_id, "cdc bench", fluxbase::projects::Engine::Postgresql)
        .await
        .map_err(|e| anyhow::anyhow!("creating a project: {e}"))?;
    let (id, db) = (project.id, project.db_name);
    app.cdc.start(
        id.clone(),
        db.clone(),
        fluxbase::projects::Engine::Postgresql,
    );
    wait_streaming(app, &id).await?;
    let client = connect(cluster, &db).await?;
    eprintln!(
        "[bench] setup: tables and {} rows of ~{} B in {db}",
        settings.updates, settings.wide_bytes
    );
    setup(&client, settings).await?;
    // Let the stream confirm the setup, so that its slot starts where the reference slots will
    // (a checkpoint logs the running transactions a slot restarts decoding from).
    client.batch_execute("CHECKPOINT").await?;
    let setup_end = current_lsn(&client).await?;
    let slot = fluxbase::cdc::slot_name(&id);
    if !wait_confirmed(&client, &slot, setup_end, Duration::from_secs(30)).await? {
        eprintln!("[bench] warning: the stream did not confirm the setup within 30 s");
    }
    app.cdc.stop(&id).await;
    Ok(Project { id, db, client })
}

/// Commits the workload with nothing consuming, then drains it through each consumer in
/// `order`.
async fn throughput(
    app: &SharedApp,
    cluster: &Cluster,
    p: &Project,
    settings: &Settings,
    order: [Contender; 3],
) -> Result<Round> {
    let client = &p.client;
    for name in [SQL_SLOT, RECV_SLOT] {
        client
            .query(
                "SELECT pg_create_logical_replication_slot($1, 'pgoutput')",
                &[&name],
            )
            .await?;
    }
    let start = current_lsn(client).await?;
    for (name, lsn) in restart_lsns(client).await? {
        eprintln!(
            "[bench] slot {name} decodes from {} ({} kB before the workload)",
            fmt_lsn(lsn),
            start.saturating_sub(lsn) / 1024
        );
    }
    eprintln!(
        "[bench] workload: {} inserts + {} wide-row updates, {} rows per transaction, nothing consuming",
        settings.rows, settings.updates, settings.batch
    );
    let t = Instant::now();
    workload(client, settings).await?;
    let end = current_lsn(client).await?;
    eprintln!(
        "[bench] workload committed in {:.1} s: {:.1} MB of WAL up to {}",
        t.elapsed().as_secs_f64(),
        (end - start) as f64 / 1e6,
        fmt_lsn(end)
    );

    let expected = settings.changes();
    let mut cpu = RoundCpu::default();
    let (mut decoding, mut reference, mut drained) = (None, None, None);
    for contender in order {
        match contender {
            Contender::Decoding => {
                eprintln!("[bench] decoding alone: pg_logical_slot_get_binary_changes");
                let (elapsed, backend) = decode_in_backend(client, expected).await?;
                cpu.decoding_backend = backend;
                decoding = Some(elapsed);
            }
            Contender::Reference => {
                eprintln!(
                    "[bench] reference: pg_recvlogical draining its slot up to {}",
                    fmt_lsn(end)
                );
                let run = pg_recvlogical(cluster, client, &p.db, end).await?;
                drop_slot(client, RECV_SLOT).await?;
                cpu.reference_walsender = run.walsender_cpu;
                cpu.reference_client = run.client_cpu;
                reference = Some(run.elapsed);
            }
            Contender::Fluxbase => {
                let d = drain_to_bus(app, client, &p.id, &p.db, expected).await?;
                cpu.fluxbase_walsender = d.walsender_cpu;
                cpu.fluxbase_process = d.process_cpu;
                cpu.fluxbase_stream = d.stream_cpu;
                drained = Some(d);
            }
        }
    }
    let drained = drained.expect("every contender ran");
    Ok(Round {
        wal_bytes: end - start,
        order,
        decoding: decoding.expect("every contender ran"),
        reference: reference.expect("every contender ran"),
        fluxbase: drained.done - drained.started,
        first_event: drained.first - drained.started,
        cpu,
        load: fluxbase_bench::load_average(),
    })
}

/// Decodes the workload with pgoutput inside a backend (PostgreSQL's decoding cost without the
/// walsender and the network), checking that it holds one message per changed row. Returns
/// the time and the backend's CPU time.
async fn decode_in_backend(client: &Client, expected: u64) -> Result<(Duration, f64)> {
    let backend: i32 = client
        .query_one("SELECT pg_backend_pid()", &[])
        .await?
        .get(0);
    let cpu_before = process_cpu(backend as u32).unwrap_or(0.0);
    let t = Instant::now();
    let rows: i64 = client
        .query_one(
            &format!(
                "SELECT count(*) FILTER (WHERE get_byte(data, 0) IN (ascii('I'), ascii('U')))
                 FROM pg_logical_slot_get_binary_changes($1, NULL, NULL, 'proto_version', '2',
                      'publication_names', '{}', 'messages', 'true', 'streaming', 'on')",
                fluxbase::cdc::PUBLICATION
            ),
            &[&SQL_SLOT],
        )
        .await?
        .get(0);
    let elapsed = t.elapsed();
    let cpu = process_cpu(backend as u32).unwrap_or(0.0) - cpu_before;
    drop_slot(client, SQL_SLOT).await?;
    if rows as u64 != expected {
        bail!("pgoutput carried {rows} row changes, not {expected}");
    }
    Ok((elapsed, cpu))
}

// CPU time from /proc (nanoseconds in schedstat: exact, unlike the 10 ms ticks of stat).

/// CPU seconds a single-threaded process (a PostgreSQL backend, pg_recvlogical) has used.
fn process_cpu(pid: u32) -> Option<f64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/schedstat")).ok()?;
    let ns: u64 = stat.split_whitespace().next()?.parse().ok()?;
    Some(ns as f64 / 1e9)
}

/// CPU seconds of this process's live threads: all of them, and the change streams' runtime
/// (threads `fluxbase-cdc`).
fn own_cpu() -> (f64, f64) {
    let (mut all, mut stream) = (0.0, 0.0);
    let Ok(tasks) = std::fs::read_dir("/proc/self/task") else {
        return (0.0, 0.0);
    };
    for task in tasks.flatten() {
        let path = task.path();
        let Some(cpu) = std::fs::read_to_string(path.join("schedstat"))
            .ok()
            .and_then(|s| s.split_whitespace().next()?.parse::<u64>().ok())
        else {
            continue;
        };
        let cpu = cpu as f64 / 1e9;
        all += cpu;
        if std::fs::read_to_string(path.join("comm")).is_ok_and(|c| c.starts_with("fluxbase-cdc")) {
            stream += cpu;
        }
    }
    (all, stream)
}

/// Follows a process's CPU time every 2 ms until it exits (or [`CpuWatch::finish`]): what it
/// used in all, to within 2 ms.
struct CpuWatch {
    stop: Arc<std::sync::atomic::AtomicBool>,
    thread: std::thread::JoinHandle<f64>,
}

impl CpuWatch {
    fn start(pid: u32) -> CpuWatch {
        let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
        let stopped = stop.clone();
        let thread = std::thread::spawn(move || {
            let mut last = 0.0;
            while let Some(cpu) = process_cpu(pid) {
                last = cpu;
                if stopped.load(std::sync::atomic::Ordering::Relaxed) {
                    break;
                }
                std::thread::sleep(Duration::from_millis(2));
            }
            last
        });
        CpuWatch { stop, thread }
    }

    fn finish(self) -> f64 {
        self.stop.store(true, std::sync::atomic::Ordering::Relaxed);
        self.thread.join().unwrap_or(0.0)
    }
}

/// The process streaming from `slot` once one other than `not` does (within 10 s).
async fn slot_walsender(client: &Client, slot: &str, not: Option<i32>) -> Result<u32> {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let pid: Option<i32> = client
            .query_one(
                "SELECT active_pid FROM pg_replication_slots WHERE slot_name = $1",
                &[&slot],
            )
            .await?
            .get(0);
        match pid {
            Some(pid) if Some(pid) != not => return Ok(pid as u32),
            _ if Instant::now() > deadline => bail!("no walsender took slot {slot} within 10 s"),
            _ => tokio::time::sleep(Duration::from_millis(2)).await,
        }
    }
}

async fn slot_active_pid(client: &Client, slot: &str) -> Result<Option<i32>> {
    Ok(client
        .query_one(
            "SELECT active_pid FROM pg_replication_slots WHERE slot_name = $1",
            &[&slot],
        )
        .await?
        .get(0))
}

async fn connect(cluster: &Cluster, db: &str) -> Result<Client> {
    let (client, conn) = tokio_postgres::connect(&cluster.url(db), tokio_postgres::NoTls)
        .await
        .with_context(|| format!("connecting to {db}"))?;
    tokio::spawn(conn);
    Ok(client)
}

async fn wait_streaming(app: &App, project_id: &str) -> Result<()> {
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        match app.cdc.status(project_id) {
            Some(s) if s.state == fluxbase::cdc::StreamState::Streaming => return Ok(()),
            s if Instant::now() > deadline => bail!("the change stream did not start: {s:?}"),
            _ => tokio::time::sleep(Duration::from_millis(50)).await,
        }
    }
}

async fn setup(client: &Client, settings: &Settings) -> Result<()> {
    client
        .batch_execute(&format!(
            "CREATE TABLE {INSERT_TABLE} (id bigint PRIMARY KEY, account int NOT NULL,
                 amount numeric(12,2) NOT NULL, note text NOT NULL,
                 created_at timestamptz NOT NULL DEFAULT now());
             CREATE TABLE {WIDE_TABLE} (id bigint PRIMARY KEY, counter int NOT NULL,
                 updated_at timestamptz NOT NULL DEFAULT now(), payload text NOT NULL);
             CREATE TABLE {LATENCY_TABLE} (id bigint PRIMARY KEY, note text NOT NULL,
                 created_at timestamptz NOT NULL DEFAULT now());"
        ))
        .await?;
    let identity: i8 = client
        .query_one(
            "SELECT relreplident::\"char\" FROM pg_class WHERE oid = $1::text::regclass",
            &[&WIDE_TABLE],
        )
        .await?
        .get(0);
    if identity != b'f' as i8 {
        bail!("{WIDE_TABLE} should have REPLICA IDENTITY FULL (the project's event trigger)");
    }
    // Hex from md5s: not compressible enough to shrink below the row size.
    let insert = client
        .prepare(&format!(
            "INSERT INTO {WIDE_TABLE} (id, counter, payload)
             SELECT g, 0, substr((SELECT string_agg(md5(g::text || ':' || i), '')
                                  FROM generate_series(0, $3::int / 32) i), 1, $3::int)
             FROM generate_series($1::bigint, $2::bigint) g"
        ))
        .await?;
    let wide = settings.wide_bytes as i32;
    for (from, to) in batches(settings.updates, settings.batch) {
        client.execute(&insert, &[&from, &to, &wide]).await?;
    }
    Ok(())
}

/// The measured workload: inserts, then one update of every wide row, in committed batches.
async fn workload(client: &Client, settings: &Settings) -> Result<()> {
    let insert = client
        .prepare(&format!(
            "INSERT INTO {INSERT_TABLE} (id, account, amount, note)
             SELECT g, g % 1000, (g % 100000) / 100.0, 'payment ' || g
             FROM generate_series($1::bigint, $2::bigint) g"
        ))
        .await?;
    let update = client
        .prepare(&format!(
            "UPDATE {WIDE_TABLE} SET counter = counter + 1, updated_at = now()
             WHERE id BETWEEN $1 AND $2"
        ))
        .await?;
    let mut done = 0;
    for (from, to) in batches(settings.rows, settings.batch) {
        done += client.execute(&insert, &[&from, &to]).await?;
    }
    for (from, to) in batches(settings.updates, settings.batch) {
        done += client.execute(&update, &[&from, &to]).await?;
    }
    if done != settings.changes() {
        bail!(
            "the workload changed {done} rows, not {}",
            settings.changes()
        );
    }
    Ok(())
}

/// Inclusive id ranges 1..=total, `size` at a time.
fn batches(total: u64, size: u64) -> impl Iterator<Item = (i64, i64)> {
    (0..total.div_ceil(size)).map(move |b| {
        let from = b * size + 1;
        (from as i64, (from + size - 1).min(total) as i64)
    })
}

fn parse_lsn(text: &str) -> Result<u64> {
    let (hi, lo) = text
        .split_once('/')
        .with_context(|| format!("not an LSN: {text}"))?;
    Ok((u64::from_str_radix(hi, 16)? << 32) | u64::from_str_radix(lo, 16)?)
}

fn fmt_lsn(lsn: u64) -> String {
    format!("{:X}/{:X}", lsn >> 32, lsn & 0xFFFF_FFFF)
}

async fn current_lsn(client: &Client) -> Result<u64> {
    let row = client
        .query_one("SELECT pg_current_wal_lsn()::text", &[])
        .await?;
    parse_lsn(row.get(0))
}

/// Every logical slot's restart LSN: where its decoding starts reading WAL.
async fn restart_lsns(client: &Client) -> Result<Vec<(String, u64)>> {
    let rows = client
        .query(
            "SELECT slot_name::text, restart_lsn::text FROM pg_replication_slots
             WHERE slot_type = 'logical' AND database = current_database() ORDER BY 1",
            &[],
        )
        .await?;
    rows.iter()
        .map(|r| Ok((r.get(0), parse_lsn(r.get(1))?)))
        .collect()
}

/// Waits until `slot` is confirmed up to `lsn`; false if that takes longer than `within`.
async fn wait_confirmed(client: &Client, slot: &str, lsn: u64, within: Duration) -> Result<bool> {
    let deadline = Instant::now() + within;
    while Instant::now() < deadline {
        let row = client
            .query_one(
                "SELECT confirmed_flush_lsn::text FROM pg_replication_slots WHERE slot_name = $1",
                &[&slot],
            )
            .await?;
        if parse_lsn(row.get(0))? >= lsn {
            return Ok(true);
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    Ok(false)
}

/// Drops a slot once its walsender (of a consumer that just ended) has released it.
async fn drop_slot(client: &Client, slot: &str) -> Result<()> {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        match client
            .query("SELECT pg_drop_replication_slot($1)", &[&slot])
            .await
        {
            Ok(_) => return Ok(()),
            Err(e)
                if e.code() == Some(&tokio_postgres::error::SqlState::OBJECT_IN_USE)
                    && Instant::now() < deadline =>
            {
                tokio::time::sleep(Duration::from_millis(50)).await
            }
            Err(e) => return Err(e).with_context(|| format!("dropping slot {slot}")),
        }
    }
}

fn pg_bindir() -> Result<PathBuf> {
    let bindir = fluxbase::embedded::find_bindir()?;
    if !bindir.join("pg_recvlogical").exists() {
        bail!("pg_recvlogical not found in {}", bindir.display());
    }
    Ok(bindir)
}

/// pg_recvlogical's run: how long it took and the CPU it and its walsender used.
struct ReferenceRun {
    elapsed: Duration,
    walsender_cpu: f64,
    client_cpu: f64,
}

/// Runs pg_recvlogical on the reference slot with the change stream's pgoutput options until
/// it has received everything up to `end`.
async fn pg_recvlogical(
    cluster: &Cluster,
    client: &Client,
    db: &str,
    end: u64,
) -> Result<ReferenceRun> {
    let mut command = tokio::process::Command::new(pg_bindir()?.join("pg_recvlogical"));
    command
        .args(["-h", "127.0.0.1", "-p", &cluster.port.to_string()])
        .args(["-U", SUPERUSER, "-d", db, "--slot", RECV_SLOT, "--start"])
        .arg(format!("--endpos={}", fmt_lsn(end)))
        .args(["--no-loop", "-f", "/dev/null"])
        .args(["-o", "proto_version=2"])
        .args([
            "-o",
            &format!("publication_names={}", fluxbase::cdc::PUBLICATION),
        ])
        .args(["-o", "messages=true", "-o", "streaming=on"])
        .env("PGPASSWORD", &cluster.password)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .kill_on_drop(true);
    let t = Instant::now();
    let child = command.spawn().context("starting pg_recvlogical")?;
    let client_watch = child.id().map(CpuWatch::start);
    let walsender = slot_walsender(client, RECV_SLOT, None).await?;
    let walsender_watch = CpuWatch::start(walsender);
    let out = tokio::time::timeout(Duration::from_secs(600), child.wait_with_output())
        .await
        .context("pg_recvlogical did not reach the end LSN within 10 minutes")??;
    let elapsed = t.elapsed();
    if !out.status.success() {
        bail!(
            "pg_recvlogical failed ({}): {}",
            out.status,
            String::from_utf8_lossy(&out.stderr)
        );
    }
    // The walsender exits once pg_recvlogical has gone; its watch ends with it.
    let walsender_cpu = tokio::task::spawn_blocking(move || walsender_watch.thread.join())
        .await?
        .unwrap_or(0.0);
    Ok(ReferenceRun {
        elapsed,
        walsender_cpu,
        client_cpu: client_watch.map_or(0.0, CpuWatch::finish),
    })
}

/// Restarts the project's change stream on the retained WAL and times it until a subscriber
/// has received `expected` workload events.
async fn drain_to_bus(
    app: &SharedApp,
    client: &Client,
    id: &str,
    db: &str,
    expected: u64,
) -> Result<Drained> {
    eprintln!("[bench] fluxbase: change stream draining its slot to the bus");
    // A durable subscriber, like the webhook outbox: the stream waits for room in its queue.
    // An ordinary one (QUEUE_LEN, 4096 events: ~20 ms at these rates) is cut off in about half
    // of the runs on 2 cores while the backlog drains at full speed.
    let bus = app.bus.project(id);
    let sub = bus.subscribe_durable();
    let slot = fluxbase::cdc::slot_name(id);
    let previous = slot_active_pid(client, &slot).await?;
    // Joining asks for a replay from the slot's confirmed position; the stream is stopped and
    // starts from there anyway, and ignores a request made before it started.
    let counter = tokio::spawn(count_events(sub, expected));
    let (process_before, stream_before) = own_cpu();
    let started = Instant::now();
    app.cdc.start(
        id.to_string(),
        db.to_string(),
        fluxbase::projects::Engine::Postgresql,
    );
    let walsender = slot_walsender(client, &slot, previous).await?;
    let limit = Duration::from_secs(600);
    let (first, done) = match tokio::time::timeout(limit, counter).await {
        Ok(joined) => joined??,
        Err(_) => bail!(
            "the bus did not deliver {expected} events within {} s (stream: {:?})",
            limit.as_secs(),
            app.cdc.status(id)
        ),
    };
    let walsender_cpu = process_cpu(walsender).unwrap_or(0.0);
    let (process_after, stream_after) = own_cpu();
    if let Some(status) = app.cdc.status(id) {
        if status.reconnects > 0 {
            eprintln!(
                "[bench] warning: the stream reconnected {} times ({:?})",
                status.reconnects, status.last_error
            );
        }
    }
    Ok(Drained {
        started,
        first,
        done,
        walsender_cpu,
        process_cpu: process_after - process_before,
        stream_cpu: stream_after - stream_before,
    })
}

struct Drained {
    started: Instant,
    first: Instant,
    done: Instant,
    walsender_cpu: f64,
    process_cpu: f64,
    stream_cpu: f64,
}

fn is_workload_event(e: &Event) -> bool {
    match (&e.kind, e.table.as_deref()) {
        (EventKind::Row { operation }, Some(table)) => {
            (*operation == fluxbase::bus::RowOp::Insert && table == INSERT_TABLE)
                || (*operation == fluxbase::bus::RowOp::Update && table == WIDE_TABLE)
        }
        _ => false,
    }
}

/// Receives (and acknowledges) until `expected` workload events have arrived; returns when the
/// first and the last arrived. A task on the server's runtime, like the server's own durable
/// subscribers (the realtime pump, the webhook outbox): the change stream runs on a runtime of
/// its own, so waking this task never waits for the stream to yield. (A thread of its own,
/// parked whenever it had caught up, cost the stream a futex wake-up for most runs of events.)
async fn count_events(mut sub: Subscription, expected: u64) -> Result<(Instant, Instant)> {
    let mut seen = 0u64;
    let mut first = None;
    let mut report = Instant::now();
    // What is queued is taken at once (as the realtime pump and the webhook outbox do), and
    // acknowledged per batch.
    let mut batch = Vec::with_capacity(256);
    while seen < expected {
        if sub.recv_many(&mut batch, 256).await == 0 {
            bail!(
                "the bus closed the subscription after {seen} of {expected} events: {}",
                sub.closed_reason().unwrap_or_default()
            );
        }
        first.get_or_insert_with(Instant::now);
        seen += batch.iter().filter(|e| is_workload_event(e)).count() as u64;
        if let Some(end) = batch.iter().rev().find(|e| e.last_in_transaction) {
            sub.ack(end.end_lsn);
        }
        batch.clear();
        if report.elapsed() > Duration::from_secs(5) {
            report = Instant::now();
            eprintln!("[bench]   {seen} of {expected} events");
        }
    }
    let done = Instant::now();
    Ok((first.unwrap_or(done), done))
}

struct Latency {
    count: usize,
    achieved_tps: f64,
    /// p50, p99, max in milliseconds.
    from_commit: (f64, f64, f64),
    from_client: (f64, f64, f64),
}

fn now_micros() -> i64 {
    chrono::Utc::now().timestamp_micros()
}

/// One INSERT per transaction at a steady rate on `client`; each event's delay measured from
/// its commit_timestamp (PostgreSQL's clock, same machine) and from when COMMIT returned.
async fn latency(app: &SharedApp, p: &Project, settings: &Settings) -> Result<Latency> {
    let total = (settings.tps * settings.latency_seconds) as usize;
    if total == 0 {
        bail!("BENCH_TPS × BENCH_LATENCY_SECONDS must be at least 1");
    }
    eprintln!(
        "[bench] latency: {} single-row transactions/s for {} s",
        settings.tps, settings.latency_seconds
    );
    app.cdc.start(
        p.id.clone(),
        p.db.clone(),
        fluxbase::projects::Engine::Postgresql,
    );
    wait_streaming(app, &p.id).await?;
    let client = &p.client;
    let sub = app.bus.project(&p.id).subscribe();
    let deadline = Instant::now() + Duration::from_secs(settings.latency_seconds + 60);
    let collector = tokio::spawn(collect_latency(sub, total, deadline));
    let insert = client
        .prepare(&format!(
            "INSERT INTO {LATENCY_TABLE} (id, note) VALUES ($1, 'tick')"
        ))
        .await?;
    let mut committed_at = vec![0i64; total];
    let mut tick = tokio::time::interval(Duration::from_nanos(1_000_000_000 / settings.tps));
    let t = Instant::now();
    for (i, at) in committed_at.iter_mut().enumerate() {
        tick.tick().await;
        client.execute(&insert, &[&(i as i64)]).await?;
        *at = now_micros();
    }
    let achieved_tps = total as f64 / t.elapsed().as_secs_f64();
    let received = collector.await??;

    let mut from_commit = Vec::with_capacity(total);
    let mut from_client = Vec::with_capacity(total);
    for (i, received_at, commit) in received {
        from_commit.push(received_at - commit);
        from_client.push(received_at - committed_at[i]);
    }
    Ok(Latency {
        count: total,
        achieved_tps,
        from_commit: percentiles(from_commit),
        from_client: percentiles(from_client),
    })
}

/// (row id, receive time, commit time) of each event of the latency table, in µs.
async fn collect_latency(
    mut sub: Subscription,
    total: usize,
    deadline: Instant,
) -> Result<Vec<(usize, i64, i64)>> {
    let mut out = Vec::with_capacity(total);
    let mut buf: Vec<Arc<Event>> = Vec::with_capacity(64);
    while out.len() < total {
        let got = tokio::time::timeout_at(deadline.into(), sub.recv_many(&mut buf, 64)).await;
        let received_at = now_micros();
        match got {
            Err(_) => bail!("only {} of {total} latency events arrived", out.len()),
            Ok(0) => bail!(
                "the bus closed the subscription: {}",
                sub.closed_reason().unwrap_or_default()
            ),
            Ok(_) => {}
        }
        for e in buf.drain(..) {
            if e.table.as_deref() != Some(LATENCY_TABLE) {
                continue;
            }
            let record: serde_json::Value = serde_json::from_str(e.record().unwrap_or("null"))?;
            let id = record["id"]
                .as_u64()
                .filter(|&id| (id as usize) < total)
                .with_context(|| format!("unexpected record {record}"))?;
            let commit = chrono::DateTime::parse_from_rfc3339(&e.commit_timestamp)
                .with_context(|| format!("commit timestamp {}", e.commit_timestamp))?
                .timestamp_micros();
            out.push((id as usize, received_at, commit));
        }
    }
    Ok(out)
}

/// p50, p99 and max of µs values, in ms.
fn percentiles(mut micros: Vec<i64>) -> (f64, f64, f64) {
    micros.sort_unstable();
    let rank = |p: f64| {
        let i = ((p * micros.len() as f64).ceil() as usize).clamp(1, micros.len()) - 1;
        micros[i] as f64 / 1e3
    };
    (rank(0.50), rank(0.99), rank(1.0))
}
