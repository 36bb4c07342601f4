//! Webhook delivery: deliveries/s to a local receiver, and commit→delivery latency at a steady
//! rate, through the whole path (WAL → change stream → bus → outbox → delivery worker → HTTP).
//!
//! ```text
//!  this process                                                        PostgreSQL (throwaway)
//!  generator ─── INSERT (superuser) ──────────────────────────────────► fx_<id>
//!  server: change stream ◄── pgoutput ─────────────────────────────────┘
//!            └─► bus ─► outbox writer ── INSERT webhook_deliveries ───► control database
//!                       delivery worker ◄─ SELECT pending, UPDATE per batch ┘
//!                         └─ POST, per the webhook's ordering ─► receiver (warp, own thread,
//!                                                                 answers 200 at once)
//! ```
//!
//! The server runs in-process (like the integration tests) on a throwaway embedded cluster,
//! with `webhook_allow_private` (the receiver is on loopback) and no rate limit.
//!
//! 1. **Throughput**: one webhook (`row.inserted` on `bench_rows`); BENCH_ROWS inserts
//!    (default 50,000), BENCH_BATCH rows per transaction (default 100), committed as fast as one
//!    connection can. Deliveries/s = BENCH_ROWS / (first commit → the receiver has them all).
//!    The outbox rows' own timestamps split that time: when the outbox writer had stored every
//!    delivery (`max(created_at)`) and how fast sending went once it had (`delivered_at` after
//!    that).
//! 2. **Rounds** (BENCH_ROUNDS, default 3; medians): per round, in a rotating order, the `row`
//!    and `strict` orderings each send a backlog of BENCH_BACKLOG (default 30,000) deliveries of
//!    distinct rows stored straight into the outbox for a disabled webhook, timed from enabling
//!    it to the receiver having them all; and bare reqwest POST loops of the same body with 1 and
//!    64 in flight. Targets: `row` ≥ 20,000/s, `strict` ≥ 0.8× POST with 1 in flight.
//! 3. **Reference**: one delivery's parts without the rest of the server, on the same receiver
//!    and payload and scratch tables in the control database: a bare reqwest POST (1 and 64 in
//!    flight), one UPDATE prepared and as SQL text, the worker's sequence for one delivery (POST,
//!    then its two UPDATEs as SQL text: five round trips), and the same POSTs with one UPDATE per
//!    64 deliveries (1 and 8 in flight): the ceiling of the present design and of a batched one.
//! 4. **Latency**: a second webhook (`bench_latency`); one single-row INSERT per transaction at
//!    BENCH_TPS (default 1,000) for BENCH_LATENCY_SECONDS (default 10). commit→delivery = when
//!    the receiver read the request minus the payload's `timestamp` (PostgreSQL's commit
//!    timestamp). Both are the machine's system clock (CLOCK_REALTIME: `chrono::Utc::now` here,
//!    `GetCurrentTimestamp` in PostgreSQL), so no clock offset enters. Split at the outbox row's
//!    `created_at` (the outbox writer's transaction start, the same clock).
//!
//! CPU columns come from /proc, in cores: this process (server, receiver and generator), this
//! cluster's processes, and everything else on the machine (other work lowers the figures).
//!
//! The cluster runs with `fsync=off` by default, like the change-capture benchmark
//! (BENCH_FSYNC=on measures with the WAL flushed at each commit, as in production).
//!
//! Environment: BENCH_MAX_IN_FLIGHT (the server's `webhook_max_in_flight`; default its own),
//! BENCH_ROUNDS (default 3), BENCH_BACKLOG (default 30000), BENCH_ROWS (default 50000), BENCH_BATCH (default 100), BENCH_TPS (default
//! 1000), BENCH_LATENCY_SECONDS (default 10), BENCH_TIME_LIMIT (seconds to wait for the
//! throughput deliveries, default 75), BENCH_FSYNC (default off), BENCH_STATEMENTS (1: load
//! pg_stat_statements and print the control database's busiest statements of each phase),
//! FLUXBASE_LOG (server log filter, default warn).

use std::collections::HashMap;
use std::path::Path;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use fluxbase::app::{App, SharedApp};
use fluxbase::embedded::Cluster;
use serde_json::{json, Value};
use tokio_postgres::Client;
use warp::Filter;

const ROWS_TABLE: &str = "bench_rows";
const LATENCY_TABLE: &str = "bench_latency";
const TARGET_DELIVERIES_PER_SEC: f64 = 20_000.0;
/// `strict` ordering against "POST, 1 in flight".
const TARGET_STRICT_RATIO: f64 = 0.8;
const TARGET_P99_MS: f64 = 50.0;
/// How long each reference loop runs.
const REFERENCE_RUN: Duration = Duration::from_secs(2);

struct Settings {
    /// `webhook_max_in_flight` (BENCH_MAX_IN_FLIGHT; unset: the server's default).
    max_in_flight: Option<usize>,
    rounds: usize,
    backlog: u64,
    rows: u64,
    batch: u64,
    tps: u64,
    latency_seconds: u64,
    time_limit: Duration,
    fsync: bool,
    statements: bool,
}

impl Settings {
    fn from_env() -> Settings {
        use fluxbase_bench::env_or;
        let flag = |name: &str| {
            std::env::var(name)
                .is_ok_and(|v| matches!(v.to_ascii_lowercase().as_str(), "1" | "on" | "true"))
        };
        Settings {
            max_in_flight: std::env::var("BENCH_MAX_IN_FLIGHT")
                .ok()
                .and_then(|v| v.parse().ok()),
            rounds: env_or("BENCH_ROUNDS", 3).max(1) as usize,
            backlog: env_or("BENCH_BACKLOG", 30_000).max(1),
            rows: env_or("BENCH_ROWS", 50_000).max(1),
            batch: env_or("BENCH_BATCH", 100).max(1),
            tps: env_or("BENCH_TPS", 1000).max(1),
            latency_seconds: env_or("BENCH_LATENCY_SECONDS", 10),
            time_limit: Duration::from_secs(env_or("BENCH_TIME_LIMIT", 75)),
            fsync: flag("BENCH_FSYNC"),
            statements: flag("BENCH_STATEMENTS"),
        }
    }
}

#[tokio::main]
async fn main() -> Result<()> {
    fluxbase_bench::init_tracing();
    let settings = Settings::from_env();
    let mut pg_settings = vec![];
    if !settings.fsync {
        pg_settings.extend(fluxbase_bench::FAST);
    }
    if settings.statements {
        pg_settings.push(("shared_preload_libraries", "pg_stat_statements"));
    }
    fluxbase_bench::on_throwaway_cluster("webhook-bench", pg_settings, async |cluster, dir| {
        let (app, running) = fluxbase_bench::start_app(cluster, dir, |c| {
            c.webhook_allow_private = true;
            c.rate_limit_requests = 0;
            if let Some(n) = settings.max_in_flight {
                c.webhook_max_in_flight = n;
            }
        })
        .await?;
        let base = format!("http://{}", running.addr);
        let result = bench(&app, cluster, &base, &settings).await;
        running.stop().await;
        result
    })
    .await
}

async fn bench(app: &SharedApp, cluster: &Cluster, base: &str, settings: &Settings) -> Result<()> {
    let receiver = Receiver::start()?;
    let user = fluxbase_bench::bench_user(app).await?;
    let (project, keys) = app
        .create_project(
            &user.id,
            "webhook bench",
            fluxbase::projects::Engine::Postgresql,
        )
        .await
        .map_err(|e| anyhow::anyhow!("creating a project: {e}"))?;
    let admin = keys
        .all()
        .into_iter()
        .find(|k| k.scope.as_str() == "admin")
        .context("the new project has no admin key")?;
    app.cdc
        .start(project.id.clone(), project.db_name.clone(), project.engine);
    wait_streaming(app, &project.id).await?;
    let api = Api {
        http: reqwest::Client::new(),
        base: base.to_string(),
        key: admin.secret.clone(),
        project: project.id.clone(),
    };
    let db = connect(cluster, &project.db_name).await?;
    db.batch_execute(&format!(
        "CREATE TABLE {ROWS_TABLE} (id bigint PRIMARY KEY, account int NOT NULL,
             amount numeric(12,2) NOT NULL, note text NOT NULL,
             created_at timestamptz NOT NULL DEFAULT now());
         CREATE TABLE {LATENCY_TABLE} (id bigint PRIMARY KEY, note text NOT NULL,
             created_at timestamptz NOT NULL DEFAULT now());"
    ))
    .await?;
    let control = connect(cluster, &app.cluster.control_db).await?;
    if settings.statements {
        control
            .batch_execute("CREATE EXTENSION IF NOT EXISTS pg_stat_statements")
            .await?;
    }

    let ctx = Ctx {
        api,
        db,
        control,
        receiver,
        settings,
        postmaster: postmaster_pid(cluster)?,
    };
    let tp = throughput(&ctx).await?;
    let rounds = rounds(&ctx, &project.id, &tp.sample_body).await?;
    let reference = reference(&ctx.control, &ctx.receiver, &tp.sample_body).await?;
    let lat = latency(&ctx).await?;
    ctx.receiver.stop();

    report(settings, &tp, &rounds, &reference, &lat);
    Ok(())
}

/// What the phases share.
struct Ctx<'a> {
    api: Api,
    /// Superuser connection to the project database.
    db: Client,
    /// Superuser connection to the control database.
    control: Client,
    receiver: Receiver,
    settings: &'a Settings,
    /// The cluster's postmaster, for its CPU time.
    postmaster: u32,
}

// ---------------------------------------------------------------------------------------------
// Throughput

struct Throughput {
    committed: Duration,
    received: u64,
    /// First commit → the receiver had every delivery (or the time limit).
    elapsed: Duration,
    complete: bool,
    first_received: Option<Duration>,
    /// First commit → the outbox writer's last transaction began.
    outbox_stored: Option<Duration>,
    stored_rows: u64,
    delivered_rows: u64,
    retried_rows: u64,
    /// Deliveries sent after the outbox was complete, and over how long.
    tail: (u64, Duration),
    cpu: CpuUse,
    statements: Vec<Statement>,
    sample_body: bytes::Bytes,
}

struct Statement {
    calls: i64,
    total_ms: f64,
    mean_ms: f64,
    query: String,
}

async fn throughput(ctx: &Ctx<'_>) -> Result<Throughput> {
    let Ctx {
        api,
        db,
        control,
        receiver,
        settings,
        postmaster,
    } = ctx;
    let hook = api.register(&receiver.url, ROWS_TABLE).await?;
    // One delivery end to end first: the outbox writer is subscribed, the worker has its HTTP
    // connection, and the receiver records a real payload for the reference run.
    receiver.reset(true);
    db.execute(
        &format!(
            "INSERT INTO {ROWS_TABLE} (id, account, amount, note) VALUES (0, 0, 0, 'warm-up')"
        ),
        &[],
    )
    .await?;
    receiver.wait_for(1, Duration::from_secs(30)).await?;
    let sample_body = receiver.take_bodies().pop().context("no warm-up body")?.1;
    receiver.reset(false);
    if settings.statements {
        control
            .execute("SELECT pg_stat_statements_reset()", &[])
            .await?;
    }

    let insert = db
        .prepare(&format!(
            "INSERT INTO {ROWS_TABLE} (id, account, amount, note)
             SELECT g, g % 1000, (g % 100000) / 100.0, 'payment ' || g
             FROM generate_series($1::bigint, $2::bigint) g"
        ))
        .await?;
    eprintln!(
        "[bench] throughput: {} inserts, {} per transaction, one webhook",
        settings.rows, settings.batch
    );
    let cpu = Cpu::now(*postmaster);
    let t0_wall = now_micros();
    let t0 = Instant::now();
    for (from, to) in batches(settings.rows, settings.batch) {
        db.execute(&insert, &[&from, &to]).await?;
    }
    let committed = t0.elapsed();
    eprintln!(
        "[bench]   committed in {:.2} s; waiting for the deliveries",
        committed.as_secs_f64()
    );

    let deadline = t0 + settings.time_limit;
    let mut progress = Instant::now();
    let complete = loop {
        let n = receiver.count();
        if n >= settings.rows {
            break true;
        }
        if Instant::now() > deadline {
            break false;
        }
        if progress.elapsed() > Duration::from_secs(5) {
            progress = Instant::now();
            let stored: i64 = control
                .query_one(
                    "SELECT count(*) FROM fluxbase.webhook_deliveries WHERE webhook_id = $1",
                    &[&hook],
                )
                .await?
                .get(0);
            eprintln!(
                "[bench]   {:.0} s: {} stored in the outbox, {n} received",
                t0.elapsed().as_secs_f64(),
                stored - 1
            );
        }
        tokio::time::sleep(Duration::from_millis(5)).await;
    };
    let tally = receiver.snapshot();
    let elapsed = if complete {
        tally.last.map_or(t0.elapsed(), |l| l - t0)
    } else {
        t0.elapsed()
    };
    let cpu = cpu.since();
    if !complete {
        eprintln!(
            "[bench]   only {} of {} deliveries within {} s",
            tally.count,
            settings.rows,
            settings.time_limit.as_secs()
        );
    }

    // The outbox rows' own timestamps (the same system clock as t0_wall).
    let row = control
        .query_one(
            "WITH d AS (
                 SELECT status, attempts, created_at, delivered_at
                 FROM fluxbase.webhook_deliveries
                 WHERE webhook_id = $1 AND created_at >= to_timestamp($2::float8 / 1e6))
             SELECT count(*), count(*) FILTER (WHERE status = 'delivered'),
                    count(*) FILTER (WHERE attempts > 1),
                    (extract(epoch FROM max(created_at)) * 1e6)::int8,
                    (extract(epoch FROM max(delivered_at)) * 1e6)::int8,
                    count(*) FILTER (WHERE delivered_at > (SELECT max(created_at) FROM d))
             FROM d",
            &[&hook, &(t0_wall as f64)],
        )
        .await?;
    let since_t0 = |micros: Option<i64>| {
        micros.map(|m| Duration::from_micros(m.saturating_sub(t0_wall).max(0) as u64))
    };
    let last_created = since_t0(row.get(3));
    let last_delivered = since_t0(row.get(4));
    let tail = match (last_created, last_delivered) {
        (Some(c), Some(d)) if d > c => (row.get::<_, i64>(5) as u64, d - c),
        _ => (0, Duration::ZERO),
    };
    let statements = if settings.statements {
        busiest_statements(control).await?
    } else {
        vec![]
    };
    if !complete {
        // Its backlog would compete with the latency run.
        api.delete(&hook).await?;
    }
    Ok(Throughput {
        committed,
        received: tally.count,
        elapsed,
        complete,
        first_received: tally.first.map(|f| f - t0),
        outbox_stored: last_created,
        stored_rows: row.get::<_, i64>(0) as u64,
        delivered_rows: row.get::<_, i64>(1) as u64,
        retried_rows: row.get::<_, i64>(2) as u64,
        tail,
        cpu,
        statements,
        sample_body,
    })
}

async fn busiest_statements(control: &Client) -> Result<Vec<Statement>> {
    let rows = control
        .query(
            "SELECT calls, total_exec_time, mean_exec_time, regexp_replace(query, '\\s+', ' ', 'g')
             FROM pg_stat_statements
             WHERE dbid = (SELECT oid FROM pg_database WHERE datname = current_database())
               AND query NOT LIKE '%pg_stat_statements%'
             ORDER BY total_exec_time DESC LIMIT 8",
            &[],
        )
        .await?;
    Ok(rows
        .iter()
        .map(|r| Statement {
            calls: r.get(0),
            total_ms: r.get(1),
            mean_ms: r.get(2),
            query: r.get(3),
        })
        .collect())
}

// ---------------------------------------------------------------------------------------------
// Rounds: one endpoint's capacity under each ordering, beside bare POST loops

/// What each round measures, in an order that changes from round to round.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
enum Contender {
    /// A backlog of deliveries of distinct rows, `row` ordering (the default).
    Row,
    /// The same backlog, `strict` ordering.
    Strict,
    /// Bare reqwest POSTs of the same body, one in flight.
    Post1,
    /// Bare reqwest POSTs, HTTP_IN_FLIGHT in flight.
    PostN,
}

impl Contender {
    const ALL: [Contender; 4] = [
        Contender::Row,
        Contender::Strict,
        Contender::Post1,
        Contender::PostN,
    ];

    fn label(self) -> String {
        match self {
            Contender::Row => "row ordering".into(),
            Contender::Strict => "strict ordering".into(),
            Contender::Post1 => "POST, 1 in flight".into(),
            Contender::PostN => format!("POST, {HTTP_IN_FLIGHT} in flight"),
        }
    }
}

struct Measured {
    /// Deliveries (or requests) per second.
    rate: f64,
    cpu: CpuUse,
    /// The machine's 1-minute load average after the run.
    load: f64,
}

struct Rounds {
    backlog: u64,
    /// Per round, the contenders in the order they ran.
    runs: Vec<Vec<(Contender, Measured)>>,
}

impl Rounds {
    fn rates(&self, c: Contender) -> Vec<f64> {
        self.runs
            .iter()
            .flat_map(|r| r.iter().filter(|(k, _)| *k == c).map(|(_, m)| m.rate))
            .collect()
    }

    fn median(&self, c: Contender) -> f64 {
        median(self.rates(c))
    }

    /// The run of `c` whose rate is the median (for its CPU columns).
    fn median_run(&self, c: Contender) -> Option<&Measured> {
        let m = self.median(c);
        self.runs
            .iter()
            .flat_map(|r| r.iter().filter(|(k, _)| *k == c).map(|(_, m)| m))
            .min_by(|a, b| (a.rate - m).abs().total_cmp(&(b.rate - m).abs()))
    }
}

fn median(mut v: Vec<f64>) -> f64 {
    if v.is_empty() {
        return 0.0;
    }
    v.sort_by(f64::total_cmp);
    let n = v.len();
    if n % 2 == 1 {
        v[n / 2]
    } else {
        (v[n / 2 - 1] + v[n / 2]) / 2.0
    }
}

fn load_average() -> f64 {
    std::fs::read_to_string("/proc/loadavg")
        .ok()
        .and_then(|s| s.split_whitespace().next()?.parse().ok())
        .unwrap_or(f64::NAN)
}

/// BENCH_ROUNDS rounds; in each, every contender once, in an order rotated (and reversed every
/// other round) so that none always runs first or last. The webhook contenders send a backlog
/// already in the outbox (BENCH_BACKLOG deliveries of distinct rows, the same body as the
/// references), timed from enabling the webhook to the receiver having them all: the delivery
/// worker's capacity to one endpoint, without the change stream and outbox writer (the
/// end-to-end figure is the throughput phase's).
async fn rounds(ctx: &Ctx<'_>, project_id: &str, body: &bytes::Bytes) -> Result<Rounds> {
    let settings = ctx.settings;
    eprintln!(
        "[bench] rounds: {} × (row and strict orderings on a backlog of {}, POST loops)",
        settings.rounds, settings.backlog
    );
    let http = reqwest::Client::new();
    // Warm-up like the server's egress client (its connection is open since the throughput
    // phase): a connection, and the receiver's first requests.
    for _ in 0..200 {
        post_once(&http, &ctx.receiver.url, body).await?;
    }
    let mut runs = Vec::new();
    for round in 0..settings.rounds {
        let mut order = Contender::ALL.to_vec();
        order.rotate_left(round % Contender::ALL.len());
        if round % 2 == 1 {
            order.reverse();
        }
        let mut this = Vec::new();
        for c in order {
            ctx.receiver.reset(false);
            let cpu = Cpu::now(ctx.postmaster);
            let rate = match c {
                Contender::Row => backlog(ctx, project_id, body, "row").await?,
                Contender::Strict => backlog(ctx, project_id, body, "strict").await?,
                Contender::Post1 => post_loop(&http, &ctx.receiver.url, body, 1).await?,
                Contender::PostN => {
                    post_loop(&http, &ctx.receiver.url, body, HTTP_IN_FLIGHT).await?
                }
            };
            let m = Measured {
                rate,
                cpu: cpu.since(),
                load: load_average(),
            };
            eprintln!(
                "[bench]   round {}: {:<20} {:>8.0} /s  (load {:.2})",
                round + 1,
                c.label(),
                m.rate,
                m.load
            );
            this.push((c, m));
        }
        runs.push(this);
    }
    ctx.receiver.reset(false);
    Ok(Rounds {
        backlog: settings.backlog,
        runs,
    })
}

/// Stores BENCH_BACKLOG deliveries of distinct rows for a disabled webhook with `ordering`, then
/// enables it: deliveries/s from the PATCH until the receiver had them all. The webhook and its
/// deliveries are deleted afterwards (once all are recorded).
async fn backlog(
    ctx: &Ctx<'_>,
    project_id: &str,
    body: &bytes::Bytes,
    ordering: &str,
) -> Result<f64> {
    const TABLE: &str = "bench_backlog";
    let n = ctx.settings.backlog;
    let hook = ctx
        .api
        .register_with(&ctx.receiver.url, TABLE, ordering, false)
        .await?;
    let body = std::str::from_utf8(body)?;
    ctx.control
        .execute(
            "INSERT INTO fluxbase.webhook_deliveries
                 (id, webhook_id, project_id, event_id, event_type, body, row_keys)
             SELECT $1 || '_' || g, $1, $2, lpad(g::text, 16, '0'), 'row.inserted', $3,
                    ARRAY['[\"public\",\"bench_backlog\"]{\"id\":' || g || '}']
             FROM generate_series(1, $4::int8) g",
            &[&hook, &project_id, &body, &(n as i64)],
        )
        .await?;
    ctx.control
        .execute("ANALYZE fluxbase.webhook_deliveries", &[])
        .await?;
    ctx.receiver.reset(false);
    let t0 = Instant::now();
    ctx.api.enable(&hook).await?;
    ctx.receiver
        .wait_for(n, ctx.settings.time_limit)
        .await
        .with_context(|| format!("{ordering} ordering"))?;
    let last = ctx.receiver.snapshot().last.unwrap_or_else(Instant::now);
    let rate = n as f64 / (last - t0).as_secs_f64();
    // Every success recorded before the next contender (the worker records them in batches).
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let pending: i64 = ctx
            .control
            .query_one(
                "SELECT count(*) FROM fluxbase.webhook_deliveries
                 WHERE webhook_id = $1 AND status = 'pending'",
                &[&hook],
            )
            .await?
            .get(0);
        if pending == 0 || Instant::now() > deadline {
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    ctx.api.delete(&hook).await?;
    Ok(rate)
}

// ---------------------------------------------------------------------------------------------
// Reference

struct Reference {
    http_sequential: f64,
    http_concurrent: f64,
    update_prepared: f64,
    update_text: f64,
    worker_steps: f64,
    batched: f64,
    batched_concurrent: f64,
}

/// Requests in flight in the concurrent bare-HTTP loop.
const HTTP_IN_FLIGHT: usize = 64;
/// Deliveries per bookkeeping UPDATE, and requests in flight, in the batched variants.
const BATCH: usize = 64;
const BATCH_IN_FLIGHT: usize = 8;

/// One delivery's parts, each on its own and in the worker's sequence, without the rest of the
/// server: the same receiver and payload, scratch tables in the control database. Then the same
/// with the bookkeeping batched, with one and with several requests in flight: what a worker
/// built that way could reach on this machine.
async fn reference(
    control: &Client,
    receiver: &Receiver,
    body: &bytes::Bytes,
) -> Result<Reference> {
    eprintln!("[bench] reference: one delivery's parts without the rest of the server");
    receiver.reset(false);
    let http = reqwest::Client::new();
    let url = receiver.url.as_str();
    let http_sequential = post_loop(&http, url, body, 1).await?;
    let http_concurrent = post_loop(&http, url, body, HTTP_IN_FLIGHT).await?;

    control
        .batch_execute(
            "CREATE TABLE bench_ref_deliveries (id text PRIMARY KEY, status text NOT NULL,
                 attempts int NOT NULL, response_status int, response_body text,
                 delivered_at timestamptz, last_error text);
             INSERT INTO bench_ref_deliveries (id, status, attempts)
                 SELECT 'r' || g, 'pending', 0 FROM generate_series(0, 9999) g;
             CREATE TABLE bench_ref_hooks (id text PRIMARY KEY, failing_since timestamptz);
             INSERT INTO bench_ref_hooks VALUES ('wh', NULL);",
        )
        .await?;
    let id = |n: u64| format!("r{}", n % 10_000);

    // One prepared UPDATE per round trip.
    let update = control
        .prepare(
            "UPDATE bench_ref_deliveries SET status = 'delivered', attempts = attempts + 1,
                 delivered_at = now() WHERE id = $1",
        )
        .await?;
    let update = &update;
    let update_prepared = rate_of(|n| async move {
        control.execute(update, &[&id(n)]).await?;
        Ok(1)
    })
    .await?;

    // The same UPDATE passed as SQL text, as the worker does: tokio-postgres prepares it first
    // (Parse/Describe, then Bind/Execute: two round trips).
    let update_text = rate_of(|n| async move {
        control
            .execute(
                "UPDATE bench_ref_deliveries SET status = 'delivered', attempts = attempts + 1,
                     delivered_at = now() WHERE id = $1",
                &[&id(n)],
            )
            .await?;
        Ok(1)
    })
    .await?;

    // The worker's steps for one delivery: the POST, then its two UPDATEs passed as SQL text
    // (tokio-postgres prepares each: Parse/Describe, then Bind/Execute), one delivery at a time.
    let worker_steps = rate_of(|n| {
        let http = &http;
        async move {
            post_once(http, url, body).await?;
            control
                .execute(
                    "UPDATE bench_ref_deliveries SET status = 'delivered', attempts = $2,
                         response_status = $3, response_body = $4, delivered_at = now(),
                         last_error = NULL
                     WHERE id = $1",
                    &[&id(n), &1i32, &200i32, &"ok"],
                )
                .await?;
            control
                .execute(
                    "UPDATE bench_ref_hooks SET failing_since = NULL
                     WHERE id = $1 AND failing_since IS NOT NULL",
                    &[&"wh"],
                )
                .await?;
            Ok(1)
        }
    })
    .await?;

    // Bookkeeping batched: one prepared UPDATE for BATCH deliveries, sent one at a time or
    // BATCH_IN_FLIGHT at a time (started in order).
    let update_many = control
        .prepare(
            "UPDATE bench_ref_deliveries SET status = 'delivered', attempts = 1,
                 response_status = 200, response_body = 'ok', delivered_at = now(),
                 last_error = NULL
             WHERE id = ANY($1)",
        )
        .await?;
    let mut batches = Vec::new();
    for in_flight in [1, BATCH_IN_FLIGHT] {
        let (http, update_many) = (&http, &update_many);
        batches.push(
            rate_of(|n| async move {
                use futures_util::StreamExt;
                let sent: Vec<Result<()>> = futures_util::stream::iter(0..BATCH)
                    .map(|_| post_once(http, url, body))
                    .buffered(in_flight)
                    .collect()
                    .await;
                sent.into_iter().collect::<Result<()>>()?;
                let ids: Vec<String> = (0..BATCH as u64)
                    .map(|i| id(n * BATCH as u64 + i))
                    .collect();
                control.execute(update_many, &[&ids]).await?;
                Ok(BATCH as u64)
            })
            .await?,
        );
    }
    control
        .batch_execute("DROP TABLE bench_ref_deliveries, bench_ref_hooks")
        .await?;
    receiver.reset(false);
    Ok(Reference {
        http_sequential,
        http_concurrent,
        update_prepared,
        update_text,
        worker_steps,
        batched: batches[0],
        batched_concurrent: batches[1],
    })
}

/// Runs `step` (which reports how many deliveries it did) over and over for REFERENCE_RUN;
/// returns deliveries/s.
async fn rate_of<F, Fut>(mut step: F) -> Result<f64>
where
    F: FnMut(u64) -> Fut,
    Fut: std::future::Future<Output = Result<u64>>,
{
    let t = Instant::now();
    let (mut n, mut done) = (0, 0);
    while t.elapsed() < REFERENCE_RUN {
        done += step(n).await?;
        n += 1;
    }
    Ok(done as f64 / t.elapsed().as_secs_f64())
}

async fn post_once(http: &reqwest::Client, url: &str, body: &bytes::Bytes) -> Result<()> {
    let resp = http
        .post(url)
        .header("content-type", "application/json")
        .body(body.clone())
        .send()
        .await?;
    if !resp.status().is_success() {
        bail!("the receiver answered {}", resp.status());
    }
    resp.bytes().await?;
    Ok(())
}

/// POSTs `body` to `url` from `in_flight` loops for REFERENCE_RUN; returns requests/s.
async fn post_loop(
    http: &reqwest::Client,
    url: &str,
    body: &bytes::Bytes,
    in_flight: usize,
) -> Result<f64> {
    let t = Instant::now();
    let loops = (0..in_flight).map(|_| async {
        let mut n = 0u64;
        while t.elapsed() < REFERENCE_RUN {
            post_once(http, url, body).await?;
            n += 1;
        }
        anyhow::Ok(n)
    });
    let counts = futures_util::future::try_join_all(loops).await?;
    Ok(counts.iter().sum::<u64>() as f64 / t.elapsed().as_secs_f64())
}

// ---------------------------------------------------------------------------------------------
// Latency

struct Latency {
    total: usize,
    received: usize,
    achieved_tps: f64,
    /// p50, p99, max in ms.
    from_commit: (f64, f64, f64),
    from_client: (f64, f64, f64),
    to_outbox: (f64, f64, f64),
    from_outbox: (f64, f64, f64),
    cpu: CpuUse,
    /// The control database's busiest statements while committing.
    statements: Vec<Statement>,
}

async fn latency(ctx: &Ctx<'_>) -> Result<Latency> {
    let Ctx {
        api,
        db,
        control,
        receiver,
        settings,
        postmaster,
    } = ctx;
    let total = (settings.tps * settings.latency_seconds) as usize;
    if total == 0 {
        bail!("BENCH_TPS × BENCH_LATENCY_SECONDS must be at least 1");
    }
    let hook = api.register(&receiver.url, LATENCY_TABLE).await?;
    let insert = db
        .prepare(&format!(
            "INSERT INTO {LATENCY_TABLE} (id, note) VALUES ($1, 'tick')"
        ))
        .await?;
    receiver.reset(false);
    db.execute(&insert, &[&0i64]).await?;
    receiver.wait_for(1, Duration::from_secs(30)).await?;
    receiver.reset(true);
    if settings.statements {
        control
            .execute("SELECT pg_stat_statements_reset()", &[])
            .await?;
    }
    eprintln!(
        "[bench] latency: {} single-row transactions/s for {} s",
        settings.tps, settings.latency_seconds
    );

    let cpu = Cpu::now(*postmaster);
    let mut committed_at = vec![0i64; total + 1];
    let mut tick = tokio::time::interval(Duration::from_nanos(1_000_000_000 / settings.tps));
    let t = Instant::now();
    for (id, at) in committed_at.iter_mut().enumerate().skip(1) {
        tick.tick().await;
        db.execute(&insert, &[&(id as i64)]).await?;
        *at = now_micros();
    }
    let achieved_tps = total as f64 / t.elapsed().as_secs_f64();
    let cpu = cpu.since();
    let statements = if settings.statements {
        busiest_statements(control).await?
    } else {
        vec![]
    };
    let complete = receiver
        .wait_for(total as u64, Duration::from_secs(30))
        .await
        .is_ok();
    if !complete {
        eprintln!(
            "[bench]   only {} of {total} deliveries 30 s after the last commit",
            receiver.count()
        );
    }

    let mut received: HashMap<i64, (i64, i64)> = HashMap::new();
    for (at, body) in receiver.take_bodies() {
        let body: Value = serde_json::from_slice(&body)?;
        let id = body["data"]["new"]["id"]
            .as_i64()
            .with_context(|| format!("unexpected payload {body}"))?;
        let stamp = body["timestamp"].as_str().unwrap_or_default();
        let commit = chrono::DateTime::parse_from_rfc3339(stamp)
            .with_context(|| format!("payload timestamp {stamp:?}"))?
            .timestamp_micros();
        // At least once: the first arrival counts.
        received.entry(id).or_insert((at, commit));
    }
    let stored: HashMap<i64, i64> = control
        .query(
            "SELECT (body::json -> 'data' -> 'new' ->> 'id')::int8,
                    (extract(epoch FROM created_at) * 1e6)::int8
             FROM fluxbase.webhook_deliveries WHERE webhook_id = $1",
            &[&hook],
        )
        .await?
        .iter()
        .map(|r| (r.get(0), r.get(1)))
        .collect();

    let (mut from_commit, mut from_client, mut to_outbox, mut from_outbox) =
        (vec![], vec![], vec![], vec![]);
    for (&id, &(at, commit)) in &received {
        if id < 1 || id as usize > total {
            continue;
        }
        from_commit.push(at - commit);
        from_client.push(at - committed_at[id as usize]);
        if let Some(&created) = stored.get(&id) {
            to_outbox.push(created - commit);
            from_outbox.push(at - created);
        }
    }
    if from_commit.is_empty() {
        bail!("no latency delivery arrived");
    }
    Ok(Latency {
        total,
        received: from_commit.len(),
        achieved_tps,
        from_commit: percentiles(from_commit),
        from_client: percentiles(from_client),
        to_outbox: percentiles(to_outbox),
        from_outbox: percentiles(from_outbox),
        cpu,
        statements,
    })
}

// ---------------------------------------------------------------------------------------------
// Report

fn verdict(met: bool) -> &'static str {
    if met {
        "met"
    } else {
        "MISSED"
    }
}

fn report(settings: &Settings, tp: &Throughput, rounds: &Rounds, r: &Reference, lat: &Latency) {
    let row = |label: &str, value: String| println!("  {label:<40}: {value}");
    let rate = tp.received.min(settings.rows) as f64 / tp.elapsed.as_secs_f64();
    let per = |rate: f64| format!("{rate:>7.0} /s  ({:.3} ms each)", 1e3 / rate);
    println!(
        "throughput: {} inserts, {} per transaction, one webhook, a local receiver answering 200 \
         (fsync {})",
        settings.rows,
        settings.batch,
        if settings.fsync { "on" } else { "off" }
    );
    row(
        "committed",
        format!(
            "{:>7.2} s  ({:.0} rows/s, one connection)",
            tp.committed.as_secs_f64(),
            settings.rows as f64 / tp.committed.as_secs_f64()
        ),
    );
    if let Some(stored) = tp.outbox_stored {
        row(
            "outbox writer had stored them all",
            format!(
                "{:>7.2} s  ({:.0} deliveries/s stored)",
                stored.as_secs_f64(),
                tp.stored_rows as f64 / stored.as_secs_f64().max(1e-3)
            ),
        );
    }
    if let Some(first) = tp.first_received {
        row(
            "first delivery received",
            format!("{:>7.2} s", first.as_secs_f64()),
        );
    }
    row(
        &format!(
            "receiver had {} {}",
            if tp.complete { "all" } else { "only" },
            tp.received
        ),
        format!(
            "{:>7.2} s  → {:.0} deliveries/s    (capture + outbox writer + sender sharing the \
             cores: no target; the delivery target is the rounds' `row` line){}",
            tp.elapsed.as_secs_f64(),
            rate,
            if tp.complete { "" } else { "    INCOMPLETE" }
        ),
    );
    if tp.tail.0 > 0 {
        row(
            "sending once the outbox was complete",
            format!(
                "{:>7.0} deliveries/s ({} in {:.2} s)",
                tp.tail.0 as f64 / tp.tail.1.as_secs_f64(),
                tp.tail.0,
                tp.tail.1.as_secs_f64()
            ),
        );
    }
    row(
        "outbox rows",
        format!(
            "{} stored, {} delivered, {} retried",
            tp.stored_rows, tp.delivered_rows, tp.retried_rows
        ),
    );
    row("CPU, cores", tp.cpu.to_string());
    print_statements(&tp.statements, settings.rows);

    println!(
        "rounds: {} rounds, contenders in a rotating order; a backlog of {} deliveries of \
         distinct rows already in the outbox, from enabling the webhook until the receiver had \
         them all, beside bare POST loops (same receiver, client warmed up, same body):",
        rounds.runs.len(),
        rounds.backlog
    );
    for (i, run) in rounds.runs.iter().enumerate() {
        let cells: Vec<String> = run
            .iter()
            .map(|(c, m)| format!("{} {:.0}/s (load {:.2})", c.label(), m.rate, m.load))
            .collect();
        println!("    round {}: {}", i + 1, cells.join(" · "));
    }
    let (row_rate, strict_rate, post1, post_n) = (
        rounds.median(Contender::Row),
        rounds.median(Contender::Strict),
        rounds.median(Contender::Post1),
        rounds.median(Contender::PostN),
    );
    let cap = settings
        .max_in_flight
        .unwrap_or_else(|| fluxbase::config::Config::default().webhook_max_in_flight);
    row(
        &format!("row ordering, ≤ {cap} in flight, median"),
        format!(
            "{row_rate:>7.0} deliveries/s = {:.2}× POST {HTTP_IN_FLIGHT} in flight    target ≥ {:.0}: {}",
            row_rate / post_n,
            TARGET_DELIVERIES_PER_SEC,
            verdict(row_rate >= TARGET_DELIVERIES_PER_SEC)
        ),
    );
    row(
        "strict ordering, median",
        format!(
            "{strict_rate:>7.0} deliveries/s = {:.2}× POST 1 in flight    target ≥ {TARGET_STRICT_RATIO}×: {}",
            strict_rate / post1,
            verdict(strict_rate >= TARGET_STRICT_RATIO * post1)
        ),
    );
    row(
        "reference: POST, 1 in flight, median",
        format!("{post1:>7.0} /s"),
    );
    row(
        &format!("reference: POST, {HTTP_IN_FLIGHT} in flight, median"),
        format!("{post_n:>7.0} /s"),
    );
    for c in Contender::ALL {
        if let Some(m) = rounds.median_run(c) {
            row(&format!("CPU, cores: {}", c.label()), m.cpu.to_string());
        }
    }

    println!(
        "reference: one delivery's parts without the rest of the server (same receiver, payload):"
    );
    row("POST, 1 in flight", per(r.http_sequential));
    row(
        &format!("POST, {HTTP_IN_FLIGHT} in flight"),
        format!("{:>7.0} /s", r.http_concurrent),
    );
    row(
        "one prepared UPDATE, one round trip",
        per(r.update_prepared),
    );
    row("the same UPDATE as SQL text", per(r.update_text));
    row(
        "the worker's steps (POST + 2 UPDATEs)",
        format!("{}  one at a time, 5 round trips", per(r.worker_steps)),
    );
    row(
        &format!("POST 1 in flight, 1 UPDATE per {BATCH}"),
        format!("{:>7.0} /s", r.batched),
    );
    row(
        &format!("POST {BATCH_IN_FLIGHT} in flight, 1 UPDATE per {BATCH}"),
        format!("{:>7.0} /s", r.batched_concurrent),
    );

    println!(
        "latency: {:.0} single-row transactions/s, {} of {} delivered (system clock):",
        lat.achieved_tps, lat.received, lat.total
    );
    let pct = |(p50, p99, max): (f64, f64, f64)| {
        format!("p50 {p50:>8.2} ms, p99 {p99:>8.2} ms, max {max:>8.2} ms")
    };
    row(
        "commit → received",
        format!(
            "{}    target p99 ≤ {TARGET_P99_MS:.0} ms: {}",
            pct(lat.from_commit),
            verdict(lat.received == lat.total && lat.from_commit.1 <= TARGET_P99_MS)
        ),
    );
    row("  commit → outbox writer's transaction", pct(lat.to_outbox));
    row(
        "  outbox writer's transaction → received",
        pct(lat.from_outbox),
    );
    row("client saw COMMIT → received", pct(lat.from_client));
    row("CPU, cores", lat.cpu.to_string());
    print_statements(&lat.statements, lat.total as u64);
}

fn print_statements(statements: &[Statement], deliveries: u64) {
    if statements.is_empty() {
        return;
    }
    println!("  control database, busiest statements (pg_stat_statements; calls per delivery):");
    for s in statements {
        let mut q = s.query.clone();
        q.truncate(90);
        println!(
            "    {:>7} calls ({:>5.2}/delivery) {:>8.0} ms total {:>7.3} ms mean  {q}",
            s.calls,
            s.calls as f64 / deliveries as f64,
            s.total_ms,
            s.mean_ms
        );
    }
}

// ---------------------------------------------------------------------------------------------
// The receiver

#[derive(Default)]
struct Tally {
    count: u64,
    first: Option<Instant>,
    last: Option<Instant>,
    recording: bool,
    /// (receive time in µs since the epoch, body) while recording.
    bodies: Vec<(i64, bytes::Bytes)>,
}

/// A local HTTP receiver on its own thread and runtime (like a separate process would be),
/// answering 200 at once.
struct Receiver {
    url: String,
    tally: Arc<Mutex<Tally>>,
    stop: Mutex<Option<tokio::sync::oneshot::Sender<()>>>,
}

impl Receiver {
    fn start() -> Result<Receiver> {
        let listener = std::net::TcpListener::bind("127.0.0.1:0")?;
        listener.set_nonblocking(true)?;
        let addr = listener.local_addr()?;
        let tally: Arc<Mutex<Tally>> = Arc::default();
        let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
        let t = tally.clone();
        let route = warp::post()
            .and(warp::body::bytes())
            .map(move |body: bytes::Bytes| {
                let at = now_micros();
                let now = Instant::now();
                let mut t = t.lock().expect("poisoned");
                t.count += 1;
                t.first.get_or_insert(now);
                t.last = Some(now);
                if t.recording {
                    t.bodies.push((at, body));
                }
                "ok"
            });
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()?;
        std::thread::Builder::new()
            .name("receiver".into())
            .spawn(move || {
                runtime.block_on(async move {
                    let listener = match tokio::net::TcpListener::from_std(listener) {
                        Ok(l) => l,
                        Err(e) => return eprintln!("[bench] receiver: {e}"),
                    };
                    warp::serve(route)
                        .incoming(listener)
                        .graceful(async {
                            let _ = stopped.await;
                        })
                        .run()
                        .await;
                })
            })?;
        Ok(Receiver {
            url: format!("http://{addr}/hook"),
            tally,
            stop: Mutex::new(Some(stop)),
        })
    }

    fn reset(&self, recording: bool) {
        *self.tally.lock().expect("poisoned") = Tally {
            recording,
            ..Tally::default()
        };
    }

    fn count(&self) -> u64 {
        self.tally.lock().expect("poisoned").count
    }

    fn snapshot(&self) -> Tally {
        let t = self.tally.lock().expect("poisoned");
        Tally {
            count: t.count,
            first: t.first,
            last: t.last,
            recording: t.recording,
            bodies: vec![],
        }
    }

    fn take_bodies(&self) -> Vec<(i64, bytes::Bytes)> {
        std::mem::take(&mut self.tally.lock().expect("poisoned").bodies)
    }

    async fn wait_for(&self, n: u64, within: Duration) -> Result<()> {
        let deadline = Instant::now() + within;
        loop {
            let got = self.count();
            if got >= n {
                return Ok(());
            }
            if Instant::now() > deadline {
                bail!("the receiver got {got} of {n} deliveries within {within:?}");
            }
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    }

    fn stop(&self) {
        if let Some(stop) = self.stop.lock().expect("poisoned").take() {
            let _ = stop.send(());
        }
    }
}

// ---------------------------------------------------------------------------------------------
// The management API

struct Api {
    http: reqwest::Client,
    base: String,
    key: String,
    project: String,
}

impl Api {
    /// Registers a webhook for `row.inserted` on `table` (the default ordering); returns its id.
    async fn register(&self, url: &str, table: &str) -> Result<String> {
        self.register_with(url, table, "row", true).await
    }

    /// Registers a webhook for `row.inserted` on `table` with this ordering; returns its id.
    async fn register_with(
        &self,
        url: &str,
        table: &str,
        ordering: &str,
        enabled: bool,
    ) -> Result<String> {
        let resp = self
            .http
            .post(format!("{}/api/webhooks", self.base))
            .bearer_auth(&self.key)
            .json(&json!({
                "projectId": self.project, "url": url,
                "events": ["row.inserted"], "tables": [table],
                "ordering": ordering, "enabled": enabled,
            }))
            .send()
            .await?;
        let status = resp.status();
        let body: Value = resp.json().await?;
        if status != reqwest::StatusCode::CREATED {
            bail!("registering a webhook: {status} {body}");
        }
        Ok(body["webhook"]["id"]
            .as_str()
            .context("no webhook id")?
            .to_string())
    }

    /// Enables a webhook (the worker looks for its due deliveries at once).
    async fn enable(&self, id: &str) -> Result<()> {
        let resp = self
            .http
            .patch(format!("{}/api/webhooks", self.base))
            .bearer_auth(&self.key)
            .json(&json!({ "projectId": self.project, "webhookId": id, "enabled": true }))
            .send()
            .await?;
        if !resp.status().is_success() {
            bail!("enabling webhook {id}: {}", resp.status());
        }
        Ok(())
    }

    async fn delete(&self, id: &str) -> Result<()> {
        let resp = self
            .http
            .delete(format!(
                "{}/api/webhooks?projectId={}&webhookId={id}",
                self.base, self.project
            ))
            .bearer_auth(&self.key)
            .send()
            .await?;
        if !resp.status().is_success() {
            bail!("deleting webhook {id}: {}", resp.status());
        }
        Ok(())
    }
}

// ---------------------------------------------------------------------------------------------
// CPU use from /proc

/// CPU time so far (clock ticks, USER_HZ = 100) of this process and of PostgreSQL's processes.
struct Cpu {
    at: Instant,
    machine: u64,
    postmaster: u32,
    own: u64,
    postgres: u64,
}

struct CpuUse {
    own: f64,
    postgres: f64,
    /// Everything else on the machine (other processes, the kernel's own work).
    others: f64,
}

impl std::fmt::Display for CpuUse {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "this process (server, receiver, generator) {:.2}, PostgreSQL {:.2}, others {:.2}; {} cores",
            self.own,
            self.postgres,
            self.others,
            std::thread::available_parallelism().map_or(0, |n| n.get())
        )
    }
}

/// Busy CPU time of the whole machine (clock ticks), from /proc/stat.
fn machine_busy() -> u64 {
    let stat = std::fs::read_to_string("/proc/stat").unwrap_or_default();
    let Some(cpu) = stat.lines().next() else {
        return 0;
    };
    let ticks: Vec<u64> = cpu
        .split_whitespace()
        .skip(1)
        .filter_map(|v| v.parse().ok())
        .collect();
    // user nice system idle iowait irq softirq steal (guest time is inside user)
    ticks.iter().take(8).sum::<u64>() - ticks.get(3).unwrap_or(&0) - ticks.get(4).unwrap_or(&0)
}

/// (parent pid, utime + stime) from a /proc/<pid>/stat line.
fn proc_ticks(stat: &str) -> Option<(u32, u64)> {
    let close = stat.rfind(')')?;
    let mut fields = stat[close + 1..].split_whitespace();
    let ppid: u32 = fields.nth(1)?.parse().ok()?;
    let mut times = fields.skip(9);
    let utime: u64 = times.next()?.parse().ok()?;
    let stime: u64 = times.next()?.parse().ok()?;
    Some((ppid, utime + stime))
}

/// The postmaster's pid, from the first line of `postmaster.pid`.
fn postmaster_pid(cluster: &Cluster) -> Result<u32> {
    let file = cluster.data_dir().join("postmaster.pid");
    let text =
        std::fs::read_to_string(&file).with_context(|| format!("reading {}", file.display()))?;
    text.lines()
        .next()
        .and_then(|l| l.trim().parse().ok())
        .with_context(|| format!("no pid in {}", file.display()))
}

impl Cpu {
    /// This process's CPU time, and that of `postmaster` and its children (this cluster only:
    /// other clusters may run on the machine).
    fn now(postmaster: u32) -> Cpu {
        let ticks = |path: &Path| {
            std::fs::read_to_string(path)
                .ok()
                .and_then(|s| proc_ticks(&s))
        };
        let own = ticks(Path::new("/proc/self/stat")).map_or(0, |(_, t)| t);
        let mut postgres = 0;
        for entry in std::fs::read_dir("/proc").into_iter().flatten().flatten() {
            let Ok(pid) = entry.file_name().to_string_lossy().parse::<u32>() else {
                continue;
            };
            if let Some((ppid, t)) = ticks(&entry.path().join("stat")) {
                if pid == postmaster || ppid == postmaster {
                    postgres += t;
                }
            }
        }
        Cpu {
            at: Instant::now(),
            machine: machine_busy(),
            postmaster,
            own,
            postgres,
        }
    }

    fn since(&self) -> CpuUse {
        let now = Cpu::now(self.postmaster);
        let secs = (now.at - self.at).as_secs_f64().max(1e-3);
        let cores = |ticks: u64| ticks as f64 / 100.0 / secs;
        let own = cores(now.own.saturating_sub(self.own));
        let postgres = cores(now.postgres.saturating_sub(self.postgres));
        let machine = cores(now.machine.saturating_sub(self.machine));
        CpuUse {
            own,
            postgres,
            others: (machine - own - postgres).max(0.0),
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Helpers (as in cdc_bench)

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

/// Inclusive id ranges 1..=total, `size` at a time.
fn batches(total: u64, size: u64) -> impl Iterator<Item = (i64, i64)> {
    (0..total.div_ceil(size)).map(move |b| {
        let from = b * size + 1;
        (from as i64, (from + size - 1).min(total) as i64)
    })
}

fn now_micros() -> i64 {
    chrono::Utc::now().timestamp_micros()
}

/// p50, p99 and max of µs values, in ms.
fn percentiles(mut micros: Vec<i64>) -> (f64, f64, f64) {
    if micros.is_empty() {
        return (f64::NAN, f64::NAN, f64::NAN);
    }
    micros.sort_unstable();
    let rank = |p: f64| {
        let i = ((p * micros.len() as f64).ceil() as usize).clamp(1, micros.len()) - 1;
        micros[i] as f64 / 1e3
    };
    (rank(0.50), rank(0.99), rank(1.0))
}
