//! Realtime fan-out: committed row changes delivered to many WebSocket subscribers of one room,
//! through the whole path (WAL → change stream → bus → room → sockets).
//!
//! ```text
//!  this process                                   child process                 PostgreSQL
//!  generator ── INSERT (superuser, fx_<id>) ───────────────────────────────────► fx_<id>
//!                                                 fluxbase serve ◄── pgoutput ───┘
//!  N WebSocket clients ◄── db_event per row ───── room project_<id>
//!  (tokio-tungstenite, loopback)                  (its RSS and CPU read from /proc/<pid>)
//! ```
//!
//! The release server runs as a child process (`target/release/fluxbase serve`, or
//! FLUXBASE_BIN) on a throwaway embedded cluster that this program starts, so its memory and
//! CPU are its own; the clients run here. Every client subscribes with the project's read key.
//!
//! 1. **Memory per idle socket**: one client subscribes (the room and its pump exist), an event
//!    goes through end to end, then the server's VmRSS is the baseline; clients are added up to
//!    each count in BENCH_SUBSCRIBERS, subscribed and idle, and each count's figure is
//!    (VmRSS − baseline) / (count − 1). Measured before any traffic, so no buffer grown by
//!    traffic is in it.
//! 2. **Latency**: BENCH_LATENCY_SUBSCRIBERS (default 100) subscribed, the other sockets stay
//!    connected but unsubscribed (they cost the room nothing); one single-row INSERT per
//!    transaction at BENCH_TPS (default 1000) for BENCH_LATENCY_SECONDS; each message's delay
//!    from its payload's `commitTimestamp` (PostgreSQL's clock, same machine) to when its client
//!    read it.
//! 3. **Throughput**, for each count: the first `count` sockets subscribed; rows committed at
//!    BENCH_FANOUT_RATE / count changes/s (default 8,000,000 offered messages/s, more than this
//!    machine delivers, so the figure is the capacity) in transactions every 10 ms, for
//!    1 s of warm-up plus BENCH_SECONDS. A lag guard holds the generator back while the slowest
//!    subscriber is more than 3/4 of the server's per-socket send queue behind, so that no socket
//!    is cut off as too slow: the commit rate settles at what the room can deliver. Delivered
//!    messages/s = messages read by all clients in the window / window length; then every
//!    subscriber must have every committed change (the "complete" column). Latency is sampled
//!    (every 16th message of each client) at that load.
//!
//!    Beside it, in the same run, a **bare reference**: this program started again as a child
//!    process (`--bare-reference-server`), a minimal WebSocket server with tokio and
//!    tokio-tungstenite (default settings, one `broadcast` channel, no auth, no rooms, no
//!    history, no filters) that writes the same `db_event` frame (one captured from Fluxbase in
//!    the round before, its `commitTimestamp` set when sent) to the same number of sockets of
//!    its own, opened and read by the same client code, driven at the same offered rate under
//!    the same lag guard (its "commit" is a line on its stdin). BENCH_ROUNDS rounds (default 3)
//!    of both, the first alternating; each figure is the median of the rounds, and the ratio
//!    Fluxbase / reference is judged (target ≥ 0.8× at 1,000 subscribers) only when every
//!    round of both was saturated (the lag guard engaged); otherwise the figure is labelled as
//!    the offered load. The reference does none of the work upstream of the room (PostgreSQL,
//!    WAL decoding, the history), so the ratio charges all of it to Fluxbase.
//!
//! 4. **Row-level security**: BENCH_RLS_SUBSCRIBERS (default 1,000) sockets, each subscribed
//!    as its own end user (the read key with `authUid` `u<i>`), on two tables:
//!    * `rls_owned`, the guide's owner policy `user_id = auth.uid()` (as the policy API creates
//!      it), rows assigned round robin to the users: each change is for one subscriber;
//!    * `rls_org`, a membership subquery PostgreSQL must evaluate (`EXISTS (SELECT 1 FROM
//!      rls_members m WHERE m.org = rls_org.org AND m.uid = auth.uid())`), the users in
//!      RLS_ORGS organisations: each change is for every member of its organisation.
//!
//!    The generator offers BENCH_RLS_RATE changes/s (default 40,000; at most the lag guard's
//!    batch per 10 ms) with the same lag guard, counted in what each subscriber is due. Two
//!    figures per row: messages delivered per second (what the clients read), and decided per
//!    second (the changes delivered per second × the subscribers: the (subscriber, change) pairs
//!    the room decided, which is the work the unfiltered fan-out does per delivered message).
//!    The owner row's ratio is decided/s over the unfiltered row's delivered/s at the same
//!    subscriber count. For these rows the lag guard also holds the generator back while the
//!    room itself has more than the guard's count of changes undelivered.
//!
//! The machine's cores are shared by the server, PostgreSQL and the clients (which parse every
//! frame like a real client would): the CPU columns show where the time went.
//!
//! Environment: BENCH_SUBSCRIBERS (default 100,1000,5000), BENCH_FANOUT_RATE (default 8000000),
//! BENCH_SECONDS (default 10), BENCH_LATENCY_SUBSCRIBERS (default 100), BENCH_TPS (default 1000),
//! BENCH_LATENCY_SECONDS (default 10), BENCH_RLS_SUBSCRIBERS (default 1000, 0: no RLS rows),
//! BENCH_RLS_RATE (default 40000), BENCH_ROUNDS (default 3), BENCH_TIME_LIMIT (seconds for the
//! whole measurement, default 600), FLUXBASE_BIN (default target/release/fluxbase).

use std::path::Path;
use std::process::Command;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use fluxbase::embedded::Cluster;
use futures_util::{SinkExt, StreamExt};
use serde_json::{json, Value};
use tokio::sync::{mpsc, oneshot};
use tokio_tungstenite::tungstenite::protocol::WebSocketConfig;
use tokio_tungstenite::tungstenite::Message;

const TABLE: &str = "fanout_events";
/// How the server frames a row change (`realtime::frame`); other frames are parsed as JSON.
const DB_EVENT_PREFIX: &str = r#"{"type":"db_event""#;
/// The generator holds back while a subscriber is this many changes behind (the server's queue
/// is bounded in bytes, `realtime_send_queue_bytes`; a slower socket catches up from history).
const LAG_GUARD: u64 = 768;
/// Throughput rows sample the commit → receive delay of every n-th message of each client.
const THROUGHPUT_SAMPLE_EVERY: u64 = 16;
/// Longest wait for the backlog after a phase (up to LAG_GUARD changes per subscriber).
const DRAIN_LIMIT: Duration = Duration::from_secs(20);
/// Sockets connected (each then subscribed) at once.
const CONNECT_CONCURRENCY: usize = 64;
/// The clients' read buffer (tungstenite's default, 128 KiB, would cost 640 MB for 5,000).
const CLIENT_READ_BUFFER: usize = 32 * 1024;
/// File descriptors beyond the sockets (PostgreSQL connections, files, the runtime).
const SPARE_FDS: u64 = 256;
const MEMORY_TARGET_KIB: f64 = 16.0;
const THROUGHPUT_TARGET: f64 = 500_000.0;
const THROUGHPUT_TARGET_AT: usize = 1000;
const P99_TARGET_MS: f64 = 20.0;
/// Fluxbase's delivered msg/s over the bare reference server's, at THROUGHPUT_TARGET_AT.
const REFERENCE_RATIO_TARGET: f64 = 0.8;
/// Owner-policy decided/s over unfiltered delivered/s, and the subquery case's delivered msg/s.
const RLS_OWNER_RATIO_TARGET: f64 = 0.5;
const RLS_SUBQUERY_TARGET: f64 = 20_000.0;
/// Organisations of the subquery case's end users.
const RLS_ORGS: usize = 10;
const RLS_OWNED: &str = "rls_owned";
const RLS_ORG: &str = "rls_org";

struct Settings {
    subscribers: Vec<usize>,
    offered: u64,
    seconds: u64,
    latency_subscribers: usize,
    latency_tps: u64,
    latency_seconds: u64,
    rls_subscribers: usize,
    rls_rate: u64,
    rounds: usize,
    time_limit: u64,
}

impl Settings {
    fn from_env() -> Result<Settings> {
        use fluxbase_bench::env_or;
        let list = std::env::var("BENCH_SUBSCRIBERS").unwrap_or_else(|_| "100,1000,5000".into());
        let mut subscribers = list
            .split(',')
            .map(|s| s.trim().parse::<usize>())
            .collect::<Result<Vec<_>, _>>()
            .with_context(|| format!("BENCH_SUBSCRIBERS={list}: expected counts like 100,1000"))?;
        subscribers.retain(|&n| n >= 2);
        subscribers.sort_unstable();
        subscribers.dedup();
        if subscribers.is_empty() {
            bail!("BENCH_SUBSCRIBERS needs a count of at least 2");
        }
        Ok(Settings {
            subscribers,
            offered: env_or("BENCH_FANOUT_RATE", 8_000_000).max(1),
            seconds: env_or("BENCH_SECONDS", 10).max(1),
            latency_subscribers: env_or("BENCH_LATENCY_SUBSCRIBERS", 100).max(1) as usize,
            latency_tps: env_or("BENCH_TPS", 1000).max(1),
            latency_seconds: env_or("BENCH_LATENCY_SECONDS", 10),
            rls_subscribers: env_or("BENCH_RLS_SUBSCRIBERS", 1000) as usize,
            rls_rate: env_or("BENCH_RLS_RATE", 40_000).max(1),
            rounds: env_or("BENCH_ROUNDS", 3).max(1) as usize,
            time_limit: env_or("BENCH_TIME_LIMIT", 600),
        })
    }

    /// Sockets open at once: Fluxbase's, and the bare reference's beside them.
    fn max_sockets(&self) -> usize {
        let largest = self.subscribers.last().copied().unwrap_or(0);
        largest
            .max(self.latency_subscribers)
            .max(self.rls_subscribers)
            + largest
    }
}

#[tokio::main]
async fn main() -> Result<()> {
    if std::env::args().nth(1).as_deref() == Some(REFERENCE_ARG) {
        return bare_reference_server().await;
    }
    fluxbase_bench::init_tracing();
    let mut settings = Settings::from_env()?;
    let binary = fluxbase_bench::server_binary()?;
    let fd_note = fit_fd_limit(&mut settings)?;
    let load_before = std::fs::read_to_string("/proc/loadavg")
        .map(|l| l.split_whitespace().take(3).collect::<Vec<_>>().join(" "))
        .unwrap_or_default();
    let settings = &settings;
    let report = fluxbase_bench::on_throwaway_cluster(
        "fanout-bench",
        fluxbase_bench::FAST.to_vec(),
        async |cluster, dir| {
            // Ctrl-C drops the measurement (the server stops with it) and still stops the
            // cluster.
            tokio::select! {
                r = run(&binary, cluster, dir, settings) => r,
                _ = tokio::signal::ctrl_c() => Err(anyhow::anyhow!("interrupted")),
            }
        },
    )
    .await?;
    report.print(settings, &load_before, fd_note.as_deref());
    Ok(())
}

/// Makes sure this process (and the server, which inherits the limit) may open a socket per
/// client plus spares: raises the soft limit towards the hard one with `prlimit` if needed,
/// and drops the subscriber counts that still do not fit (saying so).
fn fit_fd_limit(settings: &mut Settings) -> Result<Option<String>> {
    let needed = settings.max_sockets() as u64 + SPARE_FDS;
    let (soft, hard) = fd_limits()?;
    if soft >= needed {
        return Ok(None);
    }
    let want = hard.min(needed.max(65_536));
    eprintln!("[bench] raising the open-files limit from {soft} to {want} (hard limit {hard})");
    let _ = Command::new("prlimit")
        .arg(format!("--pid={}", std::process::id()))
        .arg(format!("--nofile={want}:{hard}"))
        .status();
    let (soft, _) = fd_limits()?;
    if soft >= needed {
        return Ok(None);
    }
    // Each count's sockets twice: Fluxbase's and the bare reference's.
    let fits = soft.saturating_sub(SPARE_FDS) as usize / 2;
    let dropped: Vec<String> = settings
        .subscribers
        .iter()
        .filter(|&&n| n > fits)
        .map(|n| n.to_string())
        .collect();
    settings.subscribers.retain(|&n| n <= fits);
    settings.latency_subscribers = settings.latency_subscribers.min(fits);
    let note = format!(
        "open-files limit {soft} (hard {hard}; raise it with `ulimit -n`): skipped {} subscribers",
        dropped.join(", ")
    );
    eprintln!("[bench] warning: {note}");
    if settings.subscribers.is_empty() || settings.latency_subscribers == 0 {
        bail!("{note}: nothing left to measure");
    }
    Ok(Some(note))
}

/// Soft and hard `RLIMIT_NOFILE` of this process.
fn fd_limits() -> Result<(u64, u64)> {
    let limits = std::fs::read_to_string("/proc/self/limits")?;
    let line = limits
        .lines()
        .find(|l| l.starts_with("Max open files"))
        .context("no open-files line in /proc/self/limits")?;
    let mut values = line["Max open files".len()..]
        .split_whitespace()
        .map(|v| v.parse::<u64>().unwrap_or(u64::MAX));
    Ok((
        values.next().context("soft limit")?,
        values.next().context("hard limit")?,
    ))
}

/// Starts the server on `cluster`, measures, stops the server.
async fn run(binary: &Path, cluster: &Cluster, dir: &Path, settings: &Settings) -> Result<Report> {
    let mut server = Server::start(binary, cluster, dir).await?;
    let limit = Duration::from_secs(settings.time_limit);
    let result = match tokio::time::timeout(limit, bench(&server, cluster, settings)).await {
        Ok(r) => r,
        Err(_) => Err(anyhow::anyhow!(
            "the measurement took longer than BENCH_TIME_LIMIT={} s",
            settings.time_limit
        )),
    };
    let exited = server.process.exited();
    eprintln!("[bench] stopping the server");
    server.process.stop();
    match (result, exited) {
        (Err(e), Some(status)) => Err(e.context(format!(
            "the server exited ({status}); its log: {}",
            server.process.log_tail()
        ))),
        (result, _) => result,
    }
}

/// `fluxbase serve` as a child process on the benchmark's cluster, and what the clients need.
struct Server {
    process: fluxbase_bench::ServerProcess,
    ws_url: String,
    project: String,
    read_key: String,
}

impl Server {
    async fn start(binary: &Path, cluster: &Cluster, dir: &Path) -> Result<Server> {
        let process = fluxbase_bench::ServerProcess::start(
            binary,
            &dir.join("app"),
            &[("FLUXBASE_DATABASE_URL", cluster.url("fluxbase"))],
        )
        .await?;
        Ok(Server {
            ws_url: format!("ws://127.0.0.1:{}/realtime", process.port),
            project: process.init_str("/project/id")?,
            read_key: process.init_str("/apiKeys/read")?,
            process,
        })
    }
}

/// A process's resident memory and CPU time, from /proc.
#[derive(Clone, Copy)]
struct ProcSample {
    at: Instant,
    rss_bytes: u64,
    cpu_ticks: u64,
}

fn proc_sample(pid: &str) -> Result<ProcSample> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status"))?;
    let rss_kib: u64 = status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.split_whitespace().next())
        .and_then(|v| v.parse().ok())
        .with_context(|| format!("no VmRSS in /proc/{pid}/status"))?;
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat"))?;
    // Fields after the command name (which may hold spaces): state is the first, utime and
    // stime the 12th and 13th.
    let after = &stat[stat.rfind(')').context("stat")? + 1..];
    let fields: Vec<&str> = after.split_whitespace().collect();
    let ticks = |i: usize| fields.get(i).and_then(|v| v.parse::<u64>().ok());
    let cpu_ticks = ticks(11)
        .zip(ticks(12))
        .map(|(u, s)| u + s)
        .context("stat")?;
    Ok(ProcSample {
        at: Instant::now(),
        rss_bytes: rss_kib * 1024,
        cpu_ticks,
    })
}

/// CPU time all processes of the machine have used, from /proc/stat (clock ticks).
fn machine_busy_ticks() -> Result<u64> {
    let stat = std::fs::read_to_string("/proc/stat")?;
    let line = stat.lines().next().context("empty /proc/stat")?;
    let values: Vec<u64> = line
        .split_whitespace()
        .skip(1)
        .filter_map(|v| v.parse().ok())
        .collect();
    // user nice system idle iowait irq softirq steal (guest time is already in user).
    let busy: u64 = values.iter().take(8).sum::<u64>()
        - values.get(3).copied().unwrap_or(0)
        - values.get(4).copied().unwrap_or(0);
    Ok(busy)
}

/// Clock ticks per second of /proc's CPU times.
fn clock_ticks() -> f64 {
    Command::new("getconf")
        .arg("CLK_TCK")
        .output()
        .ok()
        .and_then(|o| String::from_utf8(o.stdout).ok())
        .and_then(|s| s.trim().parse().ok())
        .unwrap_or(100.0)
}

/// Cores used between two samples.
fn cores(a: &ProcSample, b: &ProcSample, ticks_per_sec: f64) -> f64 {
    let secs = b.at.duration_since(a.at).as_secs_f64();
    (b.cpu_ticks.saturating_sub(a.cpu_ticks)) as f64 / ticks_per_sec / secs.max(1e-9)
}

// ---------------------------------------------------------------------------------------
// WebSocket clients

/// Settings every client task reads.
#[derive(Default)]
struct Shared {
    /// Record the commit → receive delay of every n-th `db_event` (0: none).
    sample_every: AtomicU64,
    /// Set: the next client to read a `db_event` keeps its text in `captured` (and clears
    /// this), the bare reference's template.
    capture: AtomicBool,
    captured: Mutex<Option<String>>,
}

/// What a client's task publishes.
#[derive(Default)]
struct ClientStats {
    /// `db_event` messages read.
    events: AtomicU64,
    closed: AtomicBool,
    reason: Mutex<String>,
}

impl ClientStats {
    fn alive(&self) -> bool {
        !self.closed.load(Ordering::Acquire)
    }

    fn close(&self, reason: String) {
        *self.reason.lock().expect("poisoned") = reason;
        self.closed.store(true, Ordering::Release);
    }
}

enum ClientCommand {
    /// Send a subscribe or unsubscribe; answered by the server's reply (or its error).
    Request {
        text: String,
        reply: oneshot::Sender<Result<(), String>>,
    },
    /// Hand over the delays recorded so far (µs).
    TakeSamples(oneshot::Sender<Vec<i64>>),
}

struct Client {
    commands: mpsc::Sender<ClientCommand>,
    stats: Arc<ClientStats>,
    subscribed: bool,
    task: tokio::task::JoinHandle<()>,
}

impl Drop for Client {
    fn drop(&mut self) {
        self.task.abort();
    }
}

type Socket =
    tokio_tungstenite::WebSocketStream<tokio_tungstenite::MaybeTlsStream<tokio::net::TcpStream>>;

async fn request(commands: &mpsc::Sender<ClientCommand>, text: String) -> Result<()> {
    let (reply, answer) = oneshot::channel();
    commands
        .send(ClientCommand::Request { text, reply })
        .await
        .map_err(|_| anyhow::anyhow!("the client has stopped"))?;
    match tokio::time::timeout(Duration::from_secs(30), answer).await {
        Err(_) => bail!("no reply within 30 s"),
        Ok(Err(_)) => bail!("the client stopped before the reply"),
        Ok(Ok(r)) => r.map_err(|e| anyhow::anyhow!("{e}")),
    }
}

/// Reads everything the server sends, counts row changes, answers commands.
async fn client_task(
    mut ws: Socket,
    mut commands: mpsc::Receiver<ClientCommand>,
    stats: Arc<ClientStats>,
    shared: Arc<Shared>,
) {
    let mut waiting: Option<oneshot::Sender<Result<(), String>>> = None;
    let mut samples: Vec<i64> = Vec::new();
    let mut seen = 0u64;
    let reason = loop {
        tokio::select! {
            command = commands.recv() => match command {
                None => break "dropped by the benchmark".to_string(),
                Some(ClientCommand::Request { text, reply }) => {
                    if let Err(e) = ws.send(Message::text(text)).await {
                        let _ = reply.send(Err(e.to_string()));
                        break format!("send failed: {e}");
                    }
                    waiting = Some(reply);
                }
                Some(ClientCommand::TakeSamples(tx)) => {
                    let _ = tx.send(std::mem::take(&mut samples));
                }
            },
            message = ws.next() => match message {
                None => break "connection closed".to_string(),
                Some(Err(e)) => break format!("connection error: {e}"),
                Some(Ok(Message::Close(frame))) => {
                    break match frame {
                        Some(f) => format!("closed by the server: {} {}", u16::from(f.code), f.reason),
                        None => "closed by the server".to_string(),
                    }
                }
                Some(Ok(Message::Text(text))) => {
                    let text = text.as_str();
                    let is_event = text.starts_with(DB_EVENT_PREFIX);
                    let parsed = if is_event {
                        Value::Null
                    } else {
                        serde_json::from_str(text).unwrap_or(Value::Null)
                    };
                    let kind = if is_event { Some("db_event") } else { parsed["type"].as_str() };
                    match kind {
                        Some("db_event") => {
                            if shared.capture.load(Ordering::Relaxed)
                                && shared.capture.swap(false, Ordering::AcqRel)
                            {
                                *shared.captured.lock().expect("poisoned") = Some(text.to_string());
                            }
                            let every = shared.sample_every.load(Ordering::Relaxed);
                            if every > 0 && seen.is_multiple_of(every) {
                                if let Some(delay) = commit_delay_micros(text) {
                                    samples.push(delay);
                                }
                            }
                            seen += 1;
                            stats.events.store(seen, Ordering::Relaxed);
                        }
                        Some("subscribed" | "unsubscribed") => {
                            if let Some(reply) = waiting.take() {
                                let _ = reply.send(Ok(()));
                            }
                        }
                        Some("error") => {
                            if let Some(reply) = waiting.take() {
                                let _ = reply.send(Err(text.to_string()));
                            }
                        }
                        _ => {}
                    }
                }
                Some(Ok(_)) => {}
            }
        };
    };
    if let Some(reply) = waiting.take() {
        let _ = reply.send(Err(reason.clone()));
    }
    stats.close(reason);
}

fn now_micros() -> i64 {
    chrono::Utc::now().timestamp_micros()
}

/// Now minus the message's `commitTimestamp`, in µs.
fn commit_delay_micros(text: &str) -> Option<i64> {
    const KEY: &str = r#""commitTimestamp":""#;
    let received = now_micros();
    let start = text.find(KEY)? + KEY.len();
    let end = start + text[start..].find('"')?;
    let commit = chrono::DateTime::parse_from_rfc3339(&text[start..end]).ok()?;
    Some(received - commit.timestamp_micros())
}

/// The benchmark's sockets: the first `n` subscribed to the room, the rest connected and idle.
struct Pool {
    url: String,
    subscribe: String,
    unsubscribe: String,
    shared: Arc<Shared>,
    clients: Vec<Client>,
    room: String,
    read_key: String,
}

impl Pool {
    /// Sockets to `url` (Fluxbase's or the bare reference's), subscribing to the project's
    /// room with its read key (the reference ignores the room and the key).
    fn new(url: &str, server: &Server) -> Pool {
        let room = format!("project_{}", server.project);
        Pool {
            url: url.to_string(),
            subscribe: json!({ "type": "subscribe", "roomId": room, "token": server.read_key })
                .to_string(),
            unsubscribe: json!({ "type": "unsubscribe", "roomId": room }).to_string(),
            shared: Arc::new(Shared::default()),
            clients: Vec::new(),
            read_key: server.read_key.clone(),
            room,
        }
    }

    /// Subscribes the first `n` sockets again, each as its own end user `u<i>` (the read key
    /// with `authUid`), the rest unsubscribed.
    async fn subscribe_end_users(&mut self, n: usize) -> Result<()> {
        self.subscribe_first(n).await?;
        let this = &*self;
        let results: Vec<Result<()>> = futures_util::stream::iter(0..n)
            .map(|i| {
                let text = json!({ "type": "subscribe", "roomId": this.room,
                                   "token": this.read_key, "authUid": format!("u{i}") })
                .to_string();
                let commands = this.clients[i].commands.clone();
                async move { request(&commands, text).await }
            })
            .buffer_unordered(CONNECT_CONCURRENCY * 4)
            .collect()
            .await;
        if let Some(e) = results.into_iter().find_map(Result::err) {
            return Err(e.context("subscribing as end users"));
        }
        Ok(())
    }

    /// A new socket, subscribed.
    async fn connect(&self) -> Result<Client> {
        let config = WebSocketConfig::default().read_buffer_size(CLIENT_READ_BUFFER);
        let connect = tokio_tungstenite::connect_async_with_config(&self.url, Some(config), true);
        let (ws, _) = tokio::time::timeout(Duration::from_secs(30), connect)
            .await
            .context("connecting took over 30 s")?
            .context("connecting")?;
        let (commands, rx) = mpsc::channel(4);
        let stats = Arc::new(ClientStats::default());
        let task = tokio::spawn(client_task(ws, rx, stats.clone(), self.shared.clone()));
        let mut client = Client {
            commands,
            stats,
            subscribed: false,
            task,
        };
        request(&client.commands, self.subscribe.clone())
            .await
            .context("subscribing")?;
        client.subscribed = true;
        Ok(client)
    }

    /// Connects (and subscribes) new sockets until there are `n`.
    async fn grow_to(&mut self, n: usize) -> Result<()> {
        let missing = n.saturating_sub(self.clients.len());
        let this = &*self;
        let results: Vec<Result<Client>> = futures_util::stream::iter(0..missing)
            .map(|_| this.connect())
            .buffer_unordered(CONNECT_CONCURRENCY)
            .collect()
            .await;
        let mut failures = Vec::new();
        for r in results {
            match r {
                Ok(c) => self.clients.push(c),
                Err(e) => failures.push(format!("{e:#}")),
            }
        }
        if let Some(first) = failures.first() {
            bail!(
                "{} of {missing} sockets failed, first: {first}",
                failures.len()
            );
        }
        Ok(())
    }

    /// Replaces closed sockets, then subscribes exactly the first `n` (the rest unsubscribe).
    /// Returns how many closed sockets were replaced.
    async fn subscribe_first(&mut self, n: usize) -> Result<usize> {
        let dead: Vec<usize> = (0..self.clients.len())
            .filter(|&i| !self.clients[i].stats.alive())
            .collect();
        for &i in &dead {
            self.clients[i] = self.connect().await.context("replacing a closed socket")?;
        }
        let changes: Vec<(usize, bool)> = self
            .clients
            .iter()
            .enumerate()
            .filter(|(i, c)| c.subscribed != (*i < n))
            .map(|(i, _)| (i, i < n))
            .collect();
        let this = &*self;
        let results: Vec<Result<()>> = futures_util::stream::iter(changes.iter())
            .map(|&(i, subscribe)| {
                let text = if subscribe {
                    this.subscribe.clone()
                } else {
                    this.unsubscribe.clone()
                };
                let commands = this.clients[i].commands.clone();
                async move { request(&commands, text).await }
            })
            .buffer_unordered(CONNECT_CONCURRENCY * 4)
            .collect()
            .await;
        if let Some(e) = results.into_iter().find_map(Result::err) {
            return Err(e.context("changing subscriptions"));
        }
        for (i, subscribe) in changes {
            self.clients[i].subscribed = subscribe;
        }
        Ok(dead.len())
    }

    /// The subscribed sockets, each with its count so far.
    fn members(&self) -> Members {
        Members(
            self.clients
                .iter()
                .filter(|c| c.subscribed)
                .map(|c| (c.stats.clone(), c.stats.events.load(Ordering::Relaxed)))
                .collect(),
        )
    }

    /// Collects (and clears) every client's recorded delays.
    async fn take_samples(&self) -> Vec<i64> {
        let mut all = Vec::new();
        for c in &self.clients {
            let (tx, rx) = oneshot::channel();
            if c.commands
                .send(ClientCommand::TakeSamples(tx))
                .await
                .is_ok()
            {
                if let Ok(samples) = rx.await {
                    all.extend(samples);
                }
            }
        }
        all
    }
}

/// Subscribed sockets and their event counts when a phase began.
struct Members(Vec<(Arc<ClientStats>, u64)>);

impl Members {
    fn received(&self) -> u64 {
        self.0
            .iter()
            .map(|(s, base)| s.events.load(Ordering::Relaxed) - base)
            .sum()
    }

    /// Fewest changes received by a socket that is still open (None: all closed).
    fn slowest(&self) -> Option<u64> {
        self.0
            .iter()
            .filter(|(s, _)| s.alive())
            .map(|(s, base)| s.events.load(Ordering::Relaxed) - base)
            .min()
    }

    fn closed(&self) -> Vec<String> {
        self.0
            .iter()
            .filter(|(s, _)| !s.alive())
            .map(|(s, _)| s.reason.lock().expect("poisoned").clone())
            .collect()
    }

    fn len(&self) -> usize {
        self.0.len()
    }
}

// ---------------------------------------------------------------------------------------
// Row changes

/// Commits rows into the project's table through a superuser connection.
/// Which table the generator writes, and for how many end users or organisations.
#[derive(Clone, Copy)]
enum Target {
    /// `fanout_events`: every subscriber gets every change.
    Plain,
    /// `rls_owned`, rows for `u0..u<n>` round robin.
    Owned(usize),
    /// `rls_org`, rows for `o0..o<RLS_ORGS>` round robin.
    Org,
}

impl Target {
    /// The share of the changes each subscriber is due.
    fn share(self, subscribers: usize) -> f64 {
        match self {
            Target::Plain => 1.0,
            Target::Owned(n) => 1.0 / n.min(subscribers).max(1) as f64,
            Target::Org => 1.0 / RLS_ORGS as f64,
        }
    }
}

/// Where the generator's changes go.
enum Sink {
    /// Rows committed into the project's tables through a superuser connection.
    Postgres {
        client: tokio_postgres::Client,
        insert: tokio_postgres::Statement,
        insert_owned: tokio_postgres::Statement,
        insert_org: tokio_postgres::Statement,
    },
    /// The bare reference server's command pipe: `S <n>` writes n frames to its subscribers.
    Bare(tokio::process::ChildStdin),
}

struct Generator {
    sink: Sink,
    target: Target,
    next_id: i64,
    /// Rows committed in the current phase (read by the measurement window).
    committed: Arc<AtomicU64>,
}

struct Generated {
    committed: u64,
    transactions: u64,
    /// Rows not committed because a subscriber lagged.
    held_back: u64,
}

impl Generator {
    async fn new(cluster: &Cluster, project: &str) -> Result<Generator> {
        let db = format!("fx_{project}");
        let (client, conn) = tokio_postgres::connect(&cluster.url(&db), tokio_postgres::NoTls)
            .await
            .with_context(|| format!("connecting to {db}"))?;
        tokio::spawn(conn);
        // Created by the project's owner role, as through the API: the read role may SELECT
        // them (default privileges), and RLS applies to it.
        client
            .batch_execute(&format!(
                "SET ROLE fx_{project}_owner;
                 CREATE TABLE {TABLE} (id bigint PRIMARY KEY, note text NOT NULL,
                     created_at timestamptz NOT NULL DEFAULT now());
                 CREATE TABLE {RLS_OWNED} (id bigint PRIMARY KEY, user_id text NOT NULL,
                     note text NOT NULL, created_at timestamptz NOT NULL DEFAULT now());
                 ALTER TABLE {RLS_OWNED} ENABLE ROW LEVEL SECURITY;
                 CREATE POLICY own ON {RLS_OWNED} FOR SELECT USING (user_id = (SELECT auth.uid()));
                 CREATE TABLE rls_members (org text NOT NULL, uid text NOT NULL,
                     PRIMARY KEY (uid, org));
                 INSERT INTO rls_members SELECT 'o' || (g % {RLS_ORGS}), 'u' || g
                     FROM generate_series(0, 9999) g;
                 CREATE TABLE {RLS_ORG} (id bigint PRIMARY KEY, org text NOT NULL,
                     note text NOT NULL, created_at timestamptz NOT NULL DEFAULT now());
                 ALTER TABLE {RLS_ORG} ENABLE ROW LEVEL SECURITY;
                 CREATE POLICY members ON {RLS_ORG} FOR SELECT USING (EXISTS (
                     SELECT 1 FROM rls_members m WHERE m.org = {RLS_ORG}.org AND m.uid = (SELECT auth.uid())));
                 RESET ROLE"
            ))
            .await?;
        let insert_owned = client
            .prepare(&format!(
                "INSERT INTO {RLS_OWNED} (id, user_id, note)
                 SELECT g, 'u' || (g % $3::bigint), 'rls ' || g
                 FROM generate_series($1::bigint, $2::bigint) g"
            ))
            .await?;
        let insert_org = client
            .prepare(&format!(
                "INSERT INTO {RLS_ORG} (id, org, note)
                 SELECT g, 'o' || (g % $3::bigint), 'rls ' || g
                 FROM generate_series($1::bigint, $2::bigint) g"
            ))
            .await?;
        let insert = client
            .prepare(&format!(
                "INSERT INTO {TABLE} (id, note)
                 SELECT g, 'fan-out ' || g FROM generate_series($1::bigint, $2::bigint) g"
            ))
            .await?;
        Ok(Generator {
            sink: Sink::Postgres {
                client,
                insert,
                insert_owned,
                insert_org,
            },
            target: Target::Plain,
            next_id: 1,
            committed: Arc::new(AtomicU64::new(0)),
        })
    }

    /// Commits `rows` rows in one transaction.
    async fn commit(&mut self, rows: u64) -> Result<()> {
        let from = self.next_id;
        let to = from + rows as i64 - 1;
        match &mut self.sink {
            Sink::Bare(stdin) => {
                use tokio::io::AsyncWriteExt;
                stdin.write_all(format!("S {rows}\n").as_bytes()).await?;
                stdin.flush().await?;
            }
            Sink::Postgres {
                client,
                insert,
                insert_owned,
                insert_org,
            } => {
                match self.target {
                    Target::Plain => client.execute(insert, &[&from, &to]).await?,
                    Target::Owned(n) => {
                        client
                            .execute(insert_owned, &[&from, &to, &(n as i64)])
                            .await?
                    }
                    Target::Org => {
                        client
                            .execute(insert_org, &[&from, &to, &(RLS_ORGS as i64)])
                            .await?
                    }
                };
            }
        }
        self.next_id = to + 1;
        self.committed.fetch_add(rows, Ordering::Relaxed);
        Ok(())
    }

    /// Commits `rate` rows/s for `duration`: one transaction per `tick` with the rows due, at
    /// most `batch` (late ticks fire at once to catch up). A tick whose rows would put the
    /// slowest member more than LAG_GUARD behind commits nothing, and those rows are dropped
    /// from the schedule (no catch-up burst later).
    async fn run(
        &mut self,
        rate: f64,
        (tick, batch): (Duration, u64),
        duration: Duration,
        members: &Members,
    ) -> Result<Generated> {
        self.committed.store(0, Ordering::Relaxed);
        let mut interval = tokio::time::interval(tick);
        let max_batch = batch.clamp(1, (LAG_GUARD / 2).max(1));
        let (mut done, mut held_back, mut transactions) = (0u64, 0u64, 0u64);
        let start = Instant::now();
        while start.elapsed() < duration {
            interval.tick().await;
            let scheduled = (rate * start.elapsed().as_secs_f64()) as u64;
            let due = scheduled.saturating_sub(done + held_back).min(max_batch);
            if due == 0 {
                continue;
            }
            let Some(slowest) = members.slowest() else {
                bail!(
                    "every subscriber was closed: {:?}",
                    members.closed().first()
                );
            };
            let share = self.target.share(members.len());
            let owed = ((done + due) as f64 * share) as u64;
            // Filtered cases: a subscriber owed few messages may still wait on a room that is
            // far behind, so the guard also counts the changes the room has not delivered yet.
            let delivered_changes =
                members.received() as f64 / (share * members.len().max(1) as f64);
            let room_behind = match self.target {
                Target::Plain => 0.0,
                _ => (done + due) as f64 - delivered_changes,
            };
            if owed.saturating_sub(slowest) > LAG_GUARD || room_behind > LAG_GUARD as f64 {
                held_back += due;
                continue;
            }
            self.commit(due).await?;
            done += due;
            transactions += 1;
        }
        Ok(Generated {
            committed: done,
            transactions,
            held_back,
        })
    }
}

/// Waits until every open member has `committed` changes, nothing has arrived for 3 s, or
/// DRAIN_LIMIT has passed (the "complete" column then shows what was missing).
async fn drain(members: &Members, committed: u64) -> Duration {
    // `committed`: what each member is due.
    let start = Instant::now();
    let mut last = (members.received(), Instant::now());
    loop {
        if members.slowest().is_none_or(|s| s >= committed) || start.elapsed() > DRAIN_LIMIT {
            return start.elapsed();
        }
        let now = members.received();
        if now != last.0 {
            last = (now, Instant::now());
        } else if last.1.elapsed() > Duration::from_secs(3) {
            return start.elapsed();
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

// ---------------------------------------------------------------------------------------
// Phases

struct MemoryRow {
    sockets: usize,
    server_per_socket: f64,
    client_per_socket: f64,
}

struct LoadRow {
    /// What the row measured: "" (unfiltered), or the RLS case.
    case: &'static str,
    /// (subscriber, change) pairs decided per second: the changes delivered in the window
    /// (messages / each subscriber's share) times the subscribers.
    decided: f64,
    subscribers: usize,
    asked_changes: f64,
    changes: f64,
    delivered: f64,
    complete: f64,
    closed: Vec<String>,
    held_back: u64,
    p50_ms: f64,
    p99_ms: f64,
    max_ms: f64,
    samples: usize,
    server_cores: f64,
    client_cores: f64,
    /// CPU used by every process of the machine (PostgreSQL and other users' work included).
    machine_cores: f64,
}

struct Report {
    memory: Vec<MemoryRow>,
    latency: LoadRow,
    throughput: Vec<Throughput>,
    rls: Vec<LoadRow>,
}

#[derive(Clone, Copy)]
enum Contender {
    Fluxbase,
    Bare,
}

impl Contender {
    fn name(self) -> &'static str {
        match self {
            Contender::Fluxbase => "Fluxbase",
            Contender::Bare => "bare reference",
        }
    }
}

/// One contender's rounds at one subscriber count.
struct Rounds {
    /// Every round's delivered msg/s, in the order run.
    delivered: Vec<f64>,
    /// The median delivered msg/s.
    median: f64,
    /// The round whose figure is the median (the lower of the middle two for an even count):
    /// its other columns are shown.
    row: LoadRow,
    /// Every round was saturated (the lag guard held the generator back): the figure is
    /// the capacity, not the offered load.
    saturated: bool,
}

impl Rounds {
    fn of(mut rows: Vec<LoadRow>) -> Rounds {
        let delivered: Vec<f64> = rows.iter().map(|r| r.delivered).collect();
        let saturated = rows.iter().all(|r| r.held_back > 0);
        let mut sorted = delivered.clone();
        sorted.sort_by(f64::total_cmp);
        let median = match sorted.len() {
            0 => f64::NAN,
            n if n % 2 == 1 => sorted[n / 2],
            n => (sorted[n / 2 - 1] + sorted[n / 2]) / 2.0,
        };
        rows.sort_by(|a, b| a.delivered.total_cmp(&b.delivered));
        let row = rows.swap_remove((rows.len() - 1) / 2);
        Rounds {
            delivered,
            median,
            row,
            saturated,
        }
    }
}

/// Fluxbase beside the bare reference at one subscriber count.
struct Throughput {
    fluxbase: Rounds,
    bare: Rounds,
    /// Bytes of the `db_event` frame both sent (the last one captured from Fluxbase).
    frame_bytes: usize,
}

impl Throughput {
    fn subscribers(&self) -> usize {
        self.fluxbase.row.subscribers
    }

    /// Fluxbase's median over the reference's; judged only when both saturated.
    fn ratio(&self) -> f64 {
        self.fluxbase.median / self.bare.median.max(1.0)
    }

    fn judged(&self) -> bool {
        self.fluxbase.saturated && self.bare.saturated
    }
}

async fn bench(server: &Server, cluster: &Cluster, settings: &Settings) -> Result<Report> {
    let server_pid = server.process.pid.to_string();
    let mut generator = Generator::new(cluster, &server.project).await?;
    let mut pool = Pool::new(&server.ws_url, server);

    eprintln!("[bench] warm-up: one subscriber, one change through the whole path");
    pool.grow_to(1).await?;
    let one = pool.members();
    generator.commit(1).await?;
    let deadline = Instant::now() + Duration::from_secs(30);
    while one.received() < 1 {
        if Instant::now() > deadline {
            bail!(
                "the first change did not reach the subscriber within 30 s ({:?})",
                one.closed().first()
            );
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    tokio::time::sleep(Duration::from_secs(1)).await;
    let server_base = proc_sample(&server_pid)?;
    let client_base = proc_sample("self")?;

    let mut memory = Vec::new();
    let mut counts = settings.subscribers.clone();
    if !counts.contains(&settings.latency_subscribers) {
        counts.push(settings.latency_subscribers);
        counts.sort_unstable();
    }
    for &n in counts.iter().filter(|&&n| n >= 2) {
        let t = Instant::now();
        pool.grow_to(n).await?;
        eprintln!(
            "[bench] {n} sockets subscribed ({:.1} s); idle for 1 s",
            t.elapsed().as_secs_f64()
        );
        tokio::time::sleep(Duration::from_secs(1)).await;
        let (s, c) = (proc_sample(&server_pid)?, proc_sample("self")?);
        let per = |now: &ProcSample, base: &ProcSample| {
            now.rss_bytes.saturating_sub(base.rss_bytes) as f64 / (n - 1) as f64
        };
        let row = MemoryRow {
            sockets: n,
            server_per_socket: per(&s, &server_base),
            client_per_socket: per(&c, &client_base),
        };
        eprintln!(
            "[bench]   server VmRSS {:.1} MiB: {:.1} KiB per idle socket (clients here: {:.1} KiB per socket)",
            s.rss_bytes as f64 / 1048576.0,
            row.server_per_socket / 1024.0,
            row.client_per_socket / 1024.0
        );
        memory.push(row);
    }

    let ticks = clock_ticks();
    let n = settings.latency_subscribers;
    eprintln!(
        "[bench] latency: {n} subscribers, {} single-row transactions/s for {} s",
        settings.latency_tps, settings.latency_seconds
    );
    let latency = load(
        &mut generator,
        &mut pool,
        &server_pid,
        ticks,
        Load {
            subscribers: n,
            rate: settings.latency_tps as f64,
            tick: Duration::from_secs(1) / settings.latency_tps.min(1000) as u32,
            batch: settings.latency_tps.div_ceil(1000),
            warm_up: Duration::ZERO,
            seconds: settings.latency_seconds,
            sample_every: 1,
            resubscribe: true,
        },
    )
    .await?;

    // Throughput: Fluxbase and the bare reference take turns (the first alternating per
    // round), each round of each the same phase; the figures are the medians of the rounds.
    let (bare, mut bare_generator) = Bare::start().await?;
    let mut bare_pool = Pool::new(&bare.ws_url, server);
    let mut throughput = Vec::new();
    for &n in &settings.subscribers {
        let rate = settings.offered as f64 / n as f64;
        bare_pool.grow_to(n).await?;
        let (mut ours, mut theirs) = (Vec::new(), Vec::new());
        for round in 0..settings.rounds {
            let order = if round % 2 == 0 {
                [Contender::Fluxbase, Contender::Bare]
            } else {
                [Contender::Bare, Contender::Fluxbase]
            };
            for contender in order {
                eprintln!(
                    "[bench] throughput, round {}/{}, {}: {n} subscribers, up to {rate:.0} changes/s for 1 + {} s",
                    round + 1,
                    settings.rounds,
                    contender.name(),
                    settings.seconds
                );
                let spec = Load {
                    subscribers: n,
                    rate,
                    tick: Duration::from_millis(10),
                    batch: LAG_GUARD / 2,
                    warm_up: Duration::from_secs(1),
                    seconds: settings.seconds,
                    sample_every: THROUGHPUT_SAMPLE_EVERY,
                    resubscribe: true,
                };
                match contender {
                    Contender::Fluxbase => {
                        pool.shared.capture.store(true, Ordering::Release);
                        let row = load(&mut generator, &mut pool, &server_pid, ticks, spec).await?;
                        ours.push(row);
                    }
                    Contender::Bare => {
                        let frame = pool.shared.captured.lock().expect("poisoned").clone();
                        let frame = frame.context("no db_event frame captured from Fluxbase")?;
                        bare_generator.set_template(&frame).await?;
                        let row = load(&mut bare_generator, &mut bare_pool, &bare.pid, ticks, spec)
                            .await?;
                        theirs.push(row);
                    }
                }
            }
        }
        let frame_bytes = pool
            .shared
            .captured
            .lock()
            .expect("poisoned")
            .as_ref()
            .map_or(0, String::len);
        throughput.push(Throughput {
            fluxbase: Rounds::of(ours),
            bare: Rounds::of(theirs),
            frame_bytes,
        });
    }
    drop(bare_pool);
    drop(bare);
    let mut rls = Vec::new();
    let n = settings.rls_subscribers;
    if n >= 1 {
        pool.grow_to(n).await?;
        for (case, target) in [
            ("owner policy", Target::Owned(n)),
            ("membership subquery", Target::Org),
        ] {
            eprintln!(
                "[bench] RLS, {case}: {n} subscribers, each its own end user, up to {} changes/s for 1 + {} s",
                settings.rls_rate, settings.seconds
            );
            pool.subscribe_end_users(n).await?;
            generator.target = target;
            let mut row = load(
                &mut generator,
                &mut pool,
                &server_pid,
                ticks,
                Load {
                    subscribers: n,
                    rate: settings.rls_rate as f64,
                    tick: Duration::from_millis(10),
                    batch: LAG_GUARD / 2,
                    warm_up: Duration::from_secs(1),
                    seconds: settings.seconds,
                    sample_every: THROUGHPUT_SAMPLE_EVERY,
                    resubscribe: false,
                },
            )
            .await?;
            row.case = case;
            rls.push(row);
        }
    }
    drop(pool);
    Ok(Report {
        memory,
        latency,
        throughput,
        rls,
    })
}

struct Load {
    subscribers: usize,
    rate: f64,
    tick: Duration,
    /// Most rows per transaction.
    batch: u64,
    warm_up: Duration,
    seconds: u64,
    sample_every: u64,
    /// Subscribe exactly the first `subscribers` with the read key first (no end user).
    resubscribe: bool,
}

/// One steady-rate phase: commits, counts what the subscribers read in the window after the
/// warm-up, waits for the stragglers, checks that everyone got everything.
async fn load(
    generator: &mut Generator,
    pool: &mut Pool,
    server_pid: &str,
    ticks: f64,
    spec: Load,
) -> Result<LoadRow> {
    if spec.resubscribe {
        let replaced = pool.subscribe_first(spec.subscribers).await?;
        if replaced > 0 {
            eprintln!("[bench]   replaced {replaced} sockets closed in the previous phase");
        }
    }
    pool.shared.sample_every.store(0, Ordering::Relaxed);
    pool.take_samples().await;
    let members = pool.members();
    pool.shared
        .sample_every
        .store(spec.sample_every, Ordering::Relaxed);

    let window = Duration::from_secs(spec.seconds);
    let committed = generator.committed.clone();
    let measure = async {
        tokio::time::sleep(spec.warm_up).await;
        let a = (
            members.received(),
            committed.load(Ordering::Relaxed),
            proc_sample(server_pid)?,
            proc_sample("self")?,
            machine_busy_ticks()?,
        );
        tokio::time::sleep(window).await;
        let b = (
            members.received(),
            committed.load(Ordering::Relaxed),
            proc_sample(server_pid)?,
            proc_sample("self")?,
            machine_busy_ticks()?,
        );
        anyhow::Ok((a, b))
    };
    let schedule = (spec.tick, spec.batch);
    let generate = generator.run(spec.rate, schedule, spec.warm_up + window, &members);
    let (generated, measured) = tokio::join!(generate, measure);
    let (generated, (a, b)) = (generated?, measured?);
    let share = generator.target.share(members.len());
    let due = (generated.committed as f64 * share).floor() as u64;
    let drained = drain(&members, due).await;
    pool.shared.sample_every.store(0, Ordering::Relaxed);
    let mut samples = pool.take_samples().await;

    let secs = b.2.at.duration_since(a.2.at).as_secs_f64();
    let expected = (generated.committed as f64 * share * members.len() as f64) as u64;
    let (p50_ms, p99_ms, max_ms) = percentiles(&mut samples);
    let delivered = (b.0 - a.0) as f64 / secs;
    let row = LoadRow {
        case: "",
        decided: delivered / share,
        subscribers: spec.subscribers,
        asked_changes: spec.rate,
        changes: (b.1 - a.1) as f64 / secs,
        delivered: (b.0 - a.0) as f64 / secs,
        complete: members.received() as f64 / expected.max(1) as f64,
        closed: members.closed(),
        held_back: generated.held_back,
        p50_ms,
        p99_ms,
        max_ms,
        samples: samples.len(),
        server_cores: cores(&a.2, &b.2, ticks),
        client_cores: cores(&a.3, &b.3, ticks),
        machine_cores: (b.4 - a.4) as f64 / ticks / secs,
    };
    eprintln!(
        "[bench]   {:.0} changes/s in {} transactions ({} held back by the lag guard), \
         {:.0} messages/s delivered, {:.2}% complete ({:.1} s to drain), {} sockets closed; \
         p50 {:.2} ms, p99 {:.2} ms; cores used: server {:.2}, clients {:.2}, whole machine {:.2}",
        row.changes,
        generated.transactions,
        row.held_back,
        row.delivered,
        row.complete * 100.0,
        drained.as_secs_f64(),
        row.closed.len(),
        row.p50_ms,
        row.p99_ms,
        row.server_cores,
        row.client_cores,
        row.machine_cores
    );
    if let Some(reason) = row.closed.first() {
        eprintln!("[bench]   first closed socket: {reason}");
    }
    Ok(row)
}

/// p50, p99 and max of µs values, in ms.
fn percentiles(micros: &mut [i64]) -> (f64, f64, f64) {
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

// ---------------------------------------------------------------------------------------
// Output

fn check(ok: bool) -> &'static str {
    if ok {
        "ok"
    } else {
        "MISSED"
    }
}

fn thousands(v: f64) -> String {
    let digits = format!("{:.0}", v.max(0.0));
    let mut out = String::new();
    for (i, c) in digits.chars().enumerate() {
        if i > 0 && (digits.len() - i) % 3 == 0 {
            out.push(',');
        }
        out.push(c);
    }
    out
}

impl Report {
    /// Fluxbase beside the bare reference server, per subscriber count.
    fn print_reference(&self, settings: &Settings) {
        if self.throughput.is_empty() {
            return;
        }
        println!(
            "Fluxbase vs a bare WebSocket server (tokio + tokio-tungstenite, defaults, one \
             broadcast channel, no auth, rooms, history or filters; a child process), the same \
             clients and frames, {} messages/s offered, the same lag guard; median of {} rounds, \
             the order alternating:",
            thousands(settings.offered as f64),
            settings.rounds
        );
        println!(
            "{:>11}  {:>18}  {:>18}  {:>22}  {:>17}  {:>17}  {:>8}  {:>8}  {:>8}  {:>34}",
            "subscribers",
            "Fluxbase msg/s",
            "bare msg/s",
            "ratio (target)",
            "cores srv/cli",
            "bare srv/cli",
            "machine",
            "complete",
            "frame B",
            "rounds Fluxbase | bare (k msg/s)"
        );
        for t in &self.throughput {
            let (ours, theirs) = (&t.fluxbase, &t.bare);
            let label = |r: &Rounds| {
                if r.saturated {
                    thousands(r.median)
                } else {
                    format!("{} (offered)", thousands(r.median))
                }
            };
            let ratio = t.ratio();
            let verdict = if !t.judged() {
                "not judged".to_string()
            } else if t.subscribers() == THROUGHPUT_TARGET_AT {
                format!(
                    ">= {REFERENCE_RATIO_TARGET} {}",
                    check(ratio >= REFERENCE_RATIO_TARGET)
                )
            } else {
                "-".to_string()
            };
            let rounds = |r: &Rounds| {
                r.delivered
                    .iter()
                    .map(|d| format!("{:.0}", d / 1e3))
                    .collect::<Vec<_>>()
                    .join(" ")
            };
            println!(
                "{:>11}  {:>18}  {:>18}  {:>22}  {:>17}  {:>17}  {:>8}  {:>8}  {:>8}  {:>34}",
                t.subscribers(),
                label(ours),
                label(theirs),
                format!("{ratio:.2}x ({verdict})"),
                format!("{:.2}/{:.2}", ours.row.server_cores, ours.row.client_cores),
                format!(
                    "{:.2}/{:.2}",
                    theirs.row.server_cores, theirs.row.client_cores
                ),
                format!(
                    "{:.2}/{:.2}",
                    ours.row.machine_cores, theirs.row.machine_cores
                ),
                format!(
                    "{:.0}/{:.0}%",
                    ours.row.complete * 100.0,
                    theirs.row.complete * 100.0
                ),
                t.frame_bytes,
                format!("{} | {}", rounds(ours), rounds(theirs)),
            );
            if !theirs.row.closed.is_empty() {
                println!(
                    "  at {}: {} bare sockets closed ({})",
                    t.subscribers(),
                    theirs.row.closed.len(),
                    theirs.row.closed[0]
                );
            }
        }
        println!(
            "  a figure marked (offered) had a round where the lag guard never engaged: it is \
             the offered load, not the capacity, and the ratio is not judged (raise \
             BENCH_FANOUT_RATE); cores: the contender's server process / the clients (this \
             process); machine: every process, Fluxbase's rounds / the reference's (PostgreSQL \
             and the change stream work only in Fluxbase's)"
        );
    }

    fn print(&self, settings: &Settings, load_before: &str, fd_note: Option<&str>) {
        let cpus = std::thread::available_parallelism().map_or(0, |n| n.get());
        println!(
            "realtime fan-out over loopback WebSockets: release server in a child process; \
             {cpus} CPUs shared by the server, PostgreSQL, the clients (this process) and \
             whatever else runs (load average before the run: {load_before})"
        );
        println!(
            "{:>11}  {:>9}  {:>28}  {:>8}  {:>6}  {:>8}  {:>22}  {:>21}  {:>24}",
            "subscribers",
            "changes/s",
            "delivered msg/s (target)",
            "complete",
            "closed",
            "p50 ms",
            "p99 ms (target)",
            "cores srv/cli/machine",
            "memory/idle socket"
        );
        let memory = |n: usize| match self.memory.iter().find(|m| m.sockets == n) {
            None => "-".to_string(),
            Some(m) => {
                let kib = m.server_per_socket / 1024.0;
                let ok = check(kib <= MEMORY_TARGET_KIB);
                format!("{kib:.1} KiB (<= {MEMORY_TARGET_KIB:.0} {ok})")
            }
        };
        let line = |row: &LoadRow, delivered: String, p99: String, memory: String| {
            println!(
                "{:>11}  {:>9}  {:>28}  {:>7.2}%  {:>6}  {:>8.2}  {:>22}  {:>21}  {:>24}",
                row.subscribers,
                thousands(row.changes),
                delivered,
                row.complete * 100.0,
                row.closed.len(),
                row.p50_ms,
                p99,
                format!(
                    "{:.2}/{:.2}/{:.2}",
                    row.server_cores, row.client_cores, row.machine_cores
                ),
                memory
            )
        };
        let l = &self.latency;
        let ok = check(l.p99_ms <= P99_TARGET_MS);
        line(
            l,
            thousands(l.delivered),
            format!("{:.2} (<= {P99_TARGET_MS:.0} {ok})", l.p99_ms),
            "-".into(),
        );
        for t in &self.throughput {
            let row = &t.fluxbase.row;
            let median = t.fluxbase.median;
            let delivered = if row.subscribers == THROUGHPUT_TARGET_AT {
                let ok = check(median >= THROUGHPUT_TARGET);
                let (got, target) = (thousands(median), thousands(THROUGHPUT_TARGET));
                format!("{got} (>= {target} {ok})")
            } else {
                thousands(median)
            };
            let p99 = format!("{:.2}", row.p99_ms);
            line(row, delivered, p99, memory(row.subscribers));
        }
        for m in &self.memory {
            if !self.throughput.iter().any(|t| t.subscribers() == m.sockets) {
                println!("{:>11}  (idle only){:>118}", m.sockets, memory(m.sockets));
            }
        }
        println!(
            "row 1: latency at {} single-row transactions/s for {} s, every message timed ({} \
             samples, max {:.2} ms)",
            settings.latency_tps, settings.latency_seconds, l.samples, l.max_ms
        );
        println!(
            "other rows: {} messages/s offered (changes/s = that / subscribers) for {} s after \
             1 s of warm-up, every {}th message timed",
            thousands(settings.offered as f64),
            settings.seconds,
            THROUGHPUT_SAMPLE_EVERY
        );
        println!(
            "throughput rows: the median of {} rounds (that round's other columns); the bare \
             reference beside them below",
            settings.rounds
        );
        for row in self
            .throughput
            .iter()
            .map(|t| &t.fluxbase.row)
            .filter(|r| r.held_back > 0)
        {
            println!(
                "  at {}: {} of the {:.0} changes/s asked were held back (a subscriber was \
                 {LAG_GUARD} behind): saturated, the delivered figure is the capacity",
                row.subscribers,
                thousands(row.held_back as f64 / (settings.seconds + 1) as f64),
                row.asked_changes
            );
        }
        self.print_reference(settings);
        let clients: Vec<String> = self
            .memory
            .iter()
            .map(|m| format!("{:.1} KiB at {}", m.client_per_socket / 1024.0, m.sockets))
            .collect();
        if !self.rls.is_empty() {
            println!(
                "{:>20}  {:>11}  {:>9}  {:>30}  {:>14}  {:>8}  {:>6}  {:>8}  {:>8}  {:>21}",
                "row-level security",
                "subscribers",
                "changes/s",
                "delivered msg/s (target)",
                "decided/s",
                "complete",
                "closed",
                "p50 ms",
                "p99 ms",
                "cores srv/cli/machine"
            );
        }
        for row in &self.rls {
            let decided = row.decided;
            let delivered = if row.case == "membership subquery" {
                let ok = check(row.delivered >= RLS_SUBQUERY_TARGET);
                format!(
                    "{} (>= {} {ok})",
                    thousands(row.delivered),
                    thousands(RLS_SUBQUERY_TARGET)
                )
            } else {
                thousands(row.delivered)
            };
            println!(
                "{:>20}  {:>11}  {:>9}  {:>30}  {:>14}  {:>7.2}%  {:>6}  {:>8.2}  {:>8.2}  {:>21}",
                row.case,
                row.subscribers,
                thousands(row.changes),
                delivered,
                thousands(decided),
                row.complete * 100.0,
                row.closed.len(),
                row.p50_ms,
                row.p99_ms,
                format!(
                    "{:.2}/{:.2}/{:.2}",
                    row.server_cores, row.client_cores, row.machine_cores
                ),
            );
        }
        if let (Some(owner), Some(plain)) = (
            self.rls.iter().find(|r| r.case == "owner policy"),
            self.throughput.iter().map(|t| &t.fluxbase.row).find(|r| {
                self.rls
                    .first()
                    .is_some_and(|o| o.subscribers == r.subscribers)
            }),
        ) {
            let ratio = owner.decided / plain.delivered.max(1.0);
            println!(
                "RLS owner policy vs unfiltered at {} subscribers: {} decided/s vs {} delivered/s \
                 = {ratio:.2}x (target >= {RLS_OWNER_RATIO_TARGET} {}); delivered messages: {} vs {} \
                 (each owner-policy change is for one subscriber)",
                owner.subscribers,
                thousands(owner.decided),
                thousands(plain.delivered),
                check(ratio >= RLS_OWNER_RATIO_TARGET),
                thousands(owner.delivered),
                thousands(plain.delivered),
            );
        }
        println!(
            "memory: server VmRSS growth per socket, subscribed and idle, before any traffic \
             (clients, for comparison: {})",
            clients.join(", ")
        );
        println!(
            "cores: CPU used during the window by the server, the clients, and every process \
             of the machine"
        );
        if let Some(note) = fd_note {
            println!("note: {note}");
        }
    }
}

// ---------------------------------------------------------------------------------------
// The bare reference server

/// The argument that makes this program the bare reference server (a child of the benchmark).
const REFERENCE_ARG: &str = "--bare-reference-server";
/// Frames the reference's broadcast channel holds for its slowest socket (the lag guard keeps
/// every socket within LAG_GUARD changes; a socket that still falls this far behind is closed,
/// and the "complete" column shows it).
const REFERENCE_QUEUE: usize = 16 * 1024;

/// What a user would write instead of Fluxbase's realtime for this job: tokio +
/// tokio-tungstenite with its default settings, no authentication, no rooms, no history, no
/// filters. Every socket that sent a `subscribe` gets every frame from a `tokio::sync::broadcast`
/// channel, feeding what is queued and flushing once per batch. It prints its port on stdout,
/// then reads commands on stdin: `T <frame>` sets the frame (a `db_event` as Fluxbase sent
/// it), `S <n>` sends n frames, each built once (with the current time as its
/// `commitTimestamp`, so the clients time it like Fluxbase's) and the same bytes written to
/// every socket. It exits when stdin closes.
async fn bare_reference_server() -> Result<()> {
    use tokio::io::AsyncBufReadExt;
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    println!("{}", listener.local_addr()?.port());
    let (frames, _) = tokio::sync::broadcast::channel::<Message>(REFERENCE_QUEUE);
    let sender = frames.clone();
    tokio::spawn(async move {
        while let Ok((stream, _)) = listener.accept().await {
            tokio::spawn(bare_connection(stream, sender.clone()));
        }
    });
    let mut lines = tokio::io::BufReader::new(tokio::io::stdin()).lines();
    // The frame around its commitTimestamp's value.
    let mut template = (String::new(), String::new());
    while let Some(line) = lines.next_line().await? {
        if let Some(frame) = line.strip_prefix("T ") {
            const KEY: &str = r#""commitTimestamp":""#;
            template = match frame.find(KEY).map(|i| i + KEY.len()) {
                Some(start) => {
                    let end = start + frame[start..].find('"').unwrap_or(0);
                    (frame[..start].to_string(), frame[end..].to_string())
                }
                None => (frame.to_string(), String::new()),
            };
        } else if let Some(n) = line.strip_prefix("S ") {
            let n: u64 = n.trim().parse().context("S <count>")?;
            let now = chrono::Utc::now().to_rfc3339_opts(chrono::SecondsFormat::Micros, true);
            for _ in 0..n {
                let frame = format!("{}{now}{}", template.0, template.1);
                // No receiver (nobody subscribed) is not an error for a broadcast.
                let _ = frames.send(Message::text(frame));
            }
        }
    }
    Ok(())
}

/// One reference socket: answers subscribe and unsubscribe, writes the broadcast frames.
async fn bare_connection(
    stream: tokio::net::TcpStream,
    frames: tokio::sync::broadcast::Sender<Message>,
) {
    use tokio::sync::broadcast::error::{RecvError, TryRecvError};
    let _ = stream.set_nodelay(true);
    let Ok(mut ws) = tokio_tungstenite::accept_async(stream).await else {
        return;
    };
    let mut feed: Option<tokio::sync::broadcast::Receiver<Message>> = None;
    loop {
        tokio::select! {
            message = ws.next() => match message {
                Some(Ok(Message::Text(text))) => {
                    let request: Value = serde_json::from_str(text.as_str()).unwrap_or(Value::Null);
                    let room = request["roomId"].clone();
                    let answer = match request["type"].as_str() {
                        Some("subscribe") => {
                            feed = Some(frames.subscribe());
                            json!({ "type": "subscribed", "roomId": room })
                        }
                        Some("unsubscribe") => {
                            feed = None;
                            json!({ "type": "unsubscribed", "roomId": room })
                        }
                        _ => json!({ "type": "error", "message": "unknown message" }),
                    };
                    if ws.send(Message::text(answer.to_string())).await.is_err() {
                        return;
                    }
                }
                Some(Ok(Message::Close(_))) | Some(Err(_)) | None => return,
                Some(Ok(_)) => {}
            },
            frame = async { feed.as_mut().expect("guarded").recv().await }, if feed.is_some() => {
                let lagged = |n: u64| format!("lagged {n} frames behind");
                let first = match frame {
                    Ok(m) => m,
                    Err(RecvError::Lagged(n)) => return bare_close(ws, lagged(n)).await,
                    Err(RecvError::Closed) => return,
                };
                if ws.feed(first).await.is_err() {
                    return;
                }
                let rx = feed.as_mut().expect("guarded");
                loop {
                    match rx.try_recv() {
                        Ok(m) => {
                            if ws.feed(m).await.is_err() {
                                return;
                            }
                        }
                        Err(TryRecvError::Lagged(n)) => return bare_close(ws, lagged(n)).await,
                        Err(_) => break,
                    }
                }
                if ws.flush().await.is_err() {
                    return;
                }
            }
        }
    }
}

async fn bare_close(
    mut ws: tokio_tungstenite::WebSocketStream<tokio::net::TcpStream>,
    reason: String,
) {
    use tokio_tungstenite::tungstenite::protocol::frame::coding::CloseCode;
    use tokio_tungstenite::tungstenite::protocol::CloseFrame;
    let close = CloseFrame {
        code: CloseCode::Policy,
        reason: reason.into(),
    };
    let _ = ws.send(Message::Close(Some(close))).await;
}

/// The bare reference server as a child process of this program (its CPU is its own).
struct Bare {
    /// Killed when dropped.
    _child: tokio::process::Child,
    pid: String,
    ws_url: String,
}

impl Bare {
    /// Starts it; the generator that drives it.
    async fn start() -> Result<(Bare, Generator)> {
        use tokio::io::AsyncBufReadExt;
        let mut child = tokio::process::Command::new(std::env::current_exe()?)
            .arg(REFERENCE_ARG)
            .stdin(std::process::Stdio::piped())
            .stdout(std::process::Stdio::piped())
            .kill_on_drop(true)
            .spawn()
            .context("starting the bare reference server")?;
        let stdout = child.stdout.take().context("stdout")?;
        let mut lines = tokio::io::BufReader::new(stdout).lines();
        let port = tokio::time::timeout(Duration::from_secs(30), lines.next_line())
            .await
            .context("the bare reference server did not start within 30 s")??
            .context("the bare reference server exited")?;
        let stdin = child.stdin.take().context("stdin")?;
        let bare = Bare {
            pid: child.id().context("pid")?.to_string(),
            ws_url: format!("ws://127.0.0.1:{}/", port.trim()),
            _child: child,
        };
        eprintln!(
            "[bench] bare reference server (pid {}) at {}",
            bare.pid, bare.ws_url
        );
        let generator = Generator {
            sink: Sink::Bare(stdin),
            target: Target::Plain,
            next_id: 1,
            committed: Arc::new(AtomicU64::new(0)),
        };
        Ok((bare, generator))
    }
}

impl Generator {
    /// The bare reference's frame from now on (a `db_event` as Fluxbase sent it).
    async fn set_template(&mut self, frame: &str) -> Result<()> {
        use tokio::io::AsyncWriteExt;
        if let Sink::Bare(stdin) = &mut self.sink {
            stdin.write_all(format!("T {frame}\n").as_bytes()).await?;
            stdin.flush().await?;
        }
        Ok(())
    }
}
