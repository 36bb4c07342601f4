//! Cluster mode against one node: realtime throughput and latency through NATS JetStream, and
//! change-stream failover when the leading node is killed.
//!
//! ```text
//!  this process                             child processes                      PostgreSQL
//!  generator ── INSERT (superuser) ──────────────────────────────────────────────► fx_<one>
//!  N clients ◄── db_event ── fluxbase serve "one node" (no NATS, own control db) ◄─┘ pgoutput
//!
//!  generator ── INSERT (superuser) ──────────────────────────────────────────────► fx_<three>
//!                            leader ◄── pgoutput ───────────────────────────────────┘
//!                              └─► nats-server -js (stream FLUXBASE_<id>) ─► a, b, c (each a room)
//!  N clients, round robin ◄── db_event ── nodes a, b, c (one shared control database)
//! ```
//!
//! The program starts a throwaway embedded PostgreSQL (fsync off, 500 connections), its own
//! `nats-server -js` (from PATH, a port of its own choosing, a scratch store), one `fluxbase
//! serve` with its own control database and no NATS ("one node"), and three `fluxbase serve`
//! nodes `a`, `b`, `c` in cluster mode on another control database (`fluxbase init --json` on
//! the first, with the same environment, makes the project and its keys). Every child runs from
//! FLUXBASE_BIN (default target/release/fluxbase) and is stopped at the end, with the
//! directory under `target/cluster-bench`.
//!
//! 1. **One node and three nodes**, the same workload, BENCH_SUBSCRIBERS (default 300) sockets
//!    each, subscribed with the read key (on the three nodes round robin), for BENCH_ROUNDS
//!    (default 3) rounds in alternating order; figures are medians over the rounds:
//!    * **saturation**: rows committed at BENCH_FANOUT_RATE / subscribers changes/s (default
//!      4,000,000 messages/s offered) in a transaction every 10 ms, for 1 s of warm-up plus
//!      BENCH_SECONDS (default 10). A lag guard (as in fanout_bench) holds the generator back
//!      while the slowest subscriber is more than 768 changes behind, so no socket is cut off:
//!      when it engages the delivered figure is the capacity, when it never does the figure is
//!      only what was offered and is labelled so. Delivered messages/s = messages read by all
//!      clients in the window / window length; then every subscriber must have every change
//!      (complete). CPU per process over the window (each fluxbase node, nats-server, every
//!      PostgreSQL process, the clients here, the whole machine, and the rest: other work on
//!      the shared cores) from /proc, and the delivered messages per core the servers used
//!      (nodes, nats-server, PostgreSQL), which depends less on that other work.
//!    * **latency**: BENCH_TPS (default 1,000) single-row INSERTs/s, one per transaction, for
//!      BENCH_LATENCY_SECONDS (default 10) to the first BENCH_LATENCY_SUBSCRIBERS sockets
//!      (default 100, as in fanout_bench, whose 20 ms target this is; the others unsubscribe and
//!      stay connected, and a socket the server closed meanwhile is replaced); each message's
//!      delay from its payload's `commitTimestamp` (PostgreSQL's clock, same machine) to when
//!      its client read it, every message timed. A round whose generator fell short of the rate
//!      (the machine did not keep up) is named under the figures.
//! 2. **Failover** (three nodes, the one-node server stopped first): a writer commits one row
//!    every 10 ms; BENCH_KILLS times (default 5) the node leading the project (by its own
//!    `/api/cdc/status`) is killed with SIGKILL. Failover time = kill → the first row whose
//!    INSERT was sent after the kill read by a subscriber connected to a surviving node (the
//!    moment a surviving node first names a new leader is shown beside it). The killed node's
//!    subscribers then reconnect to the surviving nodes with `since` (their last event id), the
//!    node is started again on its data directory and rejoins (every node sees three nodes and
//!    agrees on the leader) before the next kill. At the end every subscriber must hold every
//!    row committed since the phase began exactly once (complete, duplicates), and a new socket
//!    on every node, resuming with `since` from the phase's first event, must get every row
//!    after it once (or the report says what the server answered, e.g. `RESUME_TOO_OLD`).
//!
//! BENCH_TIME_LIMIT (default 300 s) bounds the measurement: rounds and kills that would not fit
//! are skipped (and the report says so). No timing is asserted anywhere: the targets are printed
//! with ok or MISSED. Environment: BENCH_SUBSCRIBERS, BENCH_ROUNDS, BENCH_FANOUT_RATE,
//! BENCH_SECONDS, BENCH_TPS, BENCH_LATENCY_SECONDS, BENCH_LATENCY_SUBSCRIBERS, BENCH_KILLS,
//! BENCH_TIME_LIMIT, FLUXBASE_BIN, NATS_SERVER (a nats-server binary not on PATH), FLUXBASE_LOG
//! (the servers' log filter).

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
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

const TABLE: &str = "cluster_events";
/// How the server frames a row change (`realtime::frame`); other frames are parsed as JSON.
const DB_EVENT_PREFIX: &str = r#"{"type":"db_event""#;
/// The generator holds back while a subscriber is this many changes behind.
const LAG_GUARD: u64 = 768;
/// Saturation rows sample the commit → receive delay of every n-th message of each client.
const SATURATION_SAMPLE_EVERY: u64 = 16;
/// Longest wait for the backlog after a phase.
const DRAIN_LIMIT: Duration = Duration::from_secs(20);
const CONNECT_CONCURRENCY: usize = 64;
const CLIENT_READ_BUFFER: usize = 32 * 1024;
const NODES: usize = 3;
/// The failover writer's pace: one single-row transaction per tick.
const WRITER_TICK: Duration = Duration::from_millis(10);
/// Longest wait for the first event after a kill (then that kill counts as this long, missed).
const FAILOVER_GIVE_UP: Duration = Duration::from_secs(30);
/// Longest wait for a restarted node to rejoin (three nodes seen, one leader agreed).
const REJOIN_LIMIT: Duration = Duration::from_secs(60);
const RATIO_TARGET: f64 = 0.7;
const P99_TARGET_MS: f64 = 20.0;
const FAILOVER_TARGET_S: f64 = 5.0;
/// PostgreSQL settings: the bench clusters' durability trade, and room for four servers.
const PG_SETTINGS: [(&str, &str); 3] = [
    ("fsync", "off"),
    ("full_page_writes", "off"),
    ("max_connections", "500"),
];

struct Settings {
    subscribers: usize,
    rounds: usize,
    offered: u64,
    seconds: u64,
    tps: u64,
    latency_seconds: u64,
    latency_subscribers: usize,
    kills: usize,
    time_limit: u64,
}

impl Settings {
    fn from_env() -> Settings {
        use fluxbase_bench::env_or;
        Settings {
            subscribers: env_or("BENCH_SUBSCRIBERS", 300).max(NODES as u64) as usize,
            rounds: env_or("BENCH_ROUNDS", 3).max(1) as usize,
            offered: env_or("BENCH_FANOUT_RATE", 4_000_000).max(1),
            seconds: env_or("BENCH_SECONDS", 10).max(1),
            tps: env_or("BENCH_TPS", 1000).max(1),
            latency_seconds: env_or("BENCH_LATENCY_SECONDS", 10).max(1),
            latency_subscribers: env_or("BENCH_LATENCY_SUBSCRIBERS", 100).max(1) as usize,
            kills: env_or("BENCH_KILLS", 5) as usize,
            time_limit: env_or("BENCH_TIME_LIMIT", 300).max(30),
        }
    }

    /// Sockets subscribed in the latency phases (at most all of them).
    fn latency_subscribers(&self) -> usize {
        self.latency_subscribers.min(self.subscribers)
    }

    /// A round's estimated length (both topologies, drains and settling included).
    fn round_estimate(&self) -> Duration {
        Duration::from_secs(2 * (1 + self.seconds + self.latency_seconds + 6))
    }
}

#[tokio::main]
async fn main() -> Result<()> {
    fluxbase_bench::init_tracing();
    let settings = Settings::from_env();
    let binary = fluxbase_bench::server_binary()?;
    let nats_binary = nats_binary()?;
    fit_fd_limit(2 * settings.subscribers as u64 + 512)?;
    let load_before = loadavg();
    let started = Instant::now();
    let settings = &settings;
    let report = fluxbase_bench::on_throwaway_cluster(
        "cluster-bench",
        PG_SETTINGS.to_vec(),
        async |pg, dir| {
            tokio::select! {
                r = run(&binary, &nats_binary, pg, dir, settings) => r,
                _ = tokio::signal::ctrl_c() => Err(anyhow::anyhow!("interrupted")),
            }
        },
    )
    .await?;
    report.print(settings, &load_before, started.elapsed());
    Ok(())
}

fn loadavg() -> String {
    std::fs::read_to_string("/proc/loadavg")
        .map(|l| l.split_whitespace().take(3).collect::<Vec<_>>().join(" "))
        .unwrap_or_default()
}

/// `nats-server`: NATS_SERVER, else on PATH, else Debian's `/usr/sbin/nats-server` (not on
/// every user's PATH).
fn nats_binary() -> Result<PathBuf> {
    if let Some(p) = std::env::var_os("NATS_SERVER") {
        return Ok(PathBuf::from(p));
    }
    let on_path = std::env::var_os("PATH").and_then(|path| {
        std::env::split_paths(&path)
            .map(|d| d.join("nats-server"))
            .find(|p| p.is_file())
    });
    match on_path {
        Some(p) => Ok(p),
        None if Path::new("/usr/sbin/nats-server").is_file() => Ok("/usr/sbin/nats-server".into()),
        None => bail!(
            "nats-server not found on PATH: install Debian's package `nats-server` \
             (apt-get install nats-server; `scripts/deps.sh test` does it as root), or set \
             NATS_SERVER to its path"
        ),
    }
}

/// Raises the open-files soft limit (this process and the servers inherit it) to `needed`.
fn fit_fd_limit(needed: u64) -> Result<()> {
    let limits = std::fs::read_to_string("/proc/self/limits")?;
    let line = limits
        .lines()
        .find(|l| l.starts_with("Max open files"))
        .context("no open-files line in /proc/self/limits")?;
    let values: Vec<u64> = line["Max open files".len()..]
        .split_whitespace()
        .take(2)
        .map(|v| v.parse::<u64>().unwrap_or(u64::MAX))
        .collect();
    let (soft, hard) = (values[0], values[1]);
    if soft >= needed {
        return Ok(());
    }
    let want = hard.min(needed.max(65_536));
    let _ = Command::new("prlimit")
        .arg(format!("--pid={}", std::process::id()))
        .arg(format!("--nofile={want}:{hard}"))
        .status();
    if want < needed {
        bail!("open-files limit {soft} (hard {hard}), {needed} needed: raise it with `ulimit -n`");
    }
    Ok(())
}

// ---------------------------------------------------------------------------------------
// Child processes

/// Kills `pid` (SIGKILL) once this process is gone, however it ended; exits by itself when
/// `pid` is gone first.
fn watchdog(pid: u32) {
    let script = format!(
        "while [ -d /proc/{owner} ] && [ -d /proc/{pid} ]; do sleep 1; done; \
         [ -d /proc/{pid} ] && kill -9 {pid}; exit 0",
        owner = std::process::id(),
    );
    let _ = Command::new("sh")
        .args(["-c", &script])
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn();
}

/// `nats-server -js` on a port of its own choosing (read back from its ports file).
struct Nats {
    child: Child,
    url: String,
}

impl Nats {
    async fn start(binary: &Path, dir: &Path) -> Result<Nats> {
        std::fs::create_dir_all(dir)?;
        let mut child = Command::new(binary)
            .args(["-js", "-a", "127.0.0.1", "-p", "-1", "-m", "0"])
            .arg("-sd")
            .arg(dir.join("store"))
            .arg("--ports_file_dir")
            .arg(dir)
            .arg("-l")
            .arg(dir.join("nats.log"))
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .with_context(|| format!("starting {}", binary.display()))?;
        watchdog(child.id());
        let ports = dir.join(format!("nats-server_{}.ports", child.id()));
        let deadline = Instant::now() + Duration::from_secs(30);
        let url = loop {
            if let Ok(text) = std::fs::read_to_string(&ports) {
                if let Ok(v) = serde_json::from_str::<Value>(&text) {
                    if let Some(url) = v["nats"][0].as_str() {
                        break url.to_string();
                    }
                }
            }
            if let Ok(Some(status)) = child.try_wait() {
                bail!(
                    "nats-server exited ({status}): {}",
                    tail(&dir.join("nats.log"), 10)
                );
            }
            if Instant::now() > deadline {
                let _ = child.kill();
                let _ = child.wait();
                bail!("nats-server did not listen within 30 s");
            }
            tokio::time::sleep(Duration::from_millis(25)).await;
        };
        eprintln!("[bench] nats-server -js (pid {}) at {url}", child.id());
        Ok(Nats { child, url })
    }

    fn pid(&self) -> u32 {
        self.child.id()
    }
}

impl Drop for Nats {
    fn drop(&mut self) {
        let _ = Command::new("kill")
            .args(["-INT", &self.child.id().to_string()])
            .status();
        let deadline = Instant::now() + Duration::from_secs(10);
        while Instant::now() < deadline {
            if !matches!(self.child.try_wait(), Ok(None)) {
                return;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// The last `n` lines of a file.
fn tail(path: &Path, n: usize) -> String {
    let text = std::fs::read_to_string(path).unwrap_or_default();
    let lines: Vec<&str> = text.lines().collect();
    lines[lines.len().saturating_sub(n)..].join("\n")
}

/// One `fluxbase serve` child: its data directory and environment stay, so it can be killed
/// and started again (on a new port, read from its address file).
struct Node {
    /// `a`, `b`, `c`, or `one` (the single node).
    id: String,
    binary: PathBuf,
    dir: PathBuf,
    env: Vec<(&'static str, String)>,
    child: Option<Child>,
    pid: u32,
    base: String,
    /// Times it was started.
    starts: usize,
}

impl Node {
    /// The environment of a node whose data is in `dir`, on `database_url` (and, for a cluster
    /// node, `nats_url`).
    fn env(
        dir: &Path,
        database_url: String,
        cluster: Option<(&str, &str)>,
    ) -> Vec<(&'static str, String)> {
        let mut env = vec![
            ("FLUXBASE_DATA_DIR", dir.display().to_string()),
            ("FLUXBASE_LISTEN", "127.0.0.1:0".to_string()),
            ("FLUXBASE_ADDR_FILE", dir.join("addr").display().to_string()),
            ("FLUXBASE_DATABASE_URL", database_url),
            ("FLUXBASE_RATE_LIMIT_REQUESTS", "0".into()),
            ("FLUXBASE_MAX_CONNECTIONS_PER_ADDRESS", "0".into()),
            (
                "FLUXBASE_LOG",
                std::env::var("FLUXBASE_LOG").unwrap_or_else(|_| "warn".into()),
            ),
        ];
        if let Some((nats, node)) = cluster {
            env.push(("FLUXBASE_NATS_URL", nats.to_string()));
            env.push(("FLUXBASE_NODE_ID", node.to_string()));
        }
        env
    }

    async fn start(
        binary: &Path,
        id: &str,
        dir: PathBuf,
        env: Vec<(&'static str, String)>,
    ) -> Result<Node> {
        std::fs::create_dir_all(&dir)?;
        let mut node = Node {
            id: id.to_string(),
            binary: binary.to_path_buf(),
            dir,
            env,
            child: None,
            pid: 0,
            base: String::new(),
            starts: 0,
        };
        node.spawn().await?;
        Ok(node)
    }

    /// Starts `serve` (again) and waits until it has written its address and `/health` answers.
    async fn spawn(&mut self) -> Result<()> {
        let addr_file = self.dir.join("addr");
        let _ = std::fs::remove_file(&addr_file);
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.log_path())?;
        let mut child = Command::new(&self.binary)
            .arg("serve")
            .envs(self.env.iter().map(|(k, v)| (*k, v)))
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .context("starting fluxbase serve")?;
        watchdog(child.id());
        self.pid = child.id();
        let deadline = Instant::now() + Duration::from_secs(60);
        let addr = loop {
            if let Ok(text) = std::fs::read_to_string(&addr_file) {
                if text.ends_with('\n') {
                    break text.trim().to_string();
                }
            }
            if let Ok(Some(status)) = child.try_wait() {
                bail!(
                    "node {} exited ({status}): {}",
                    self.id,
                    tail(&self.log_path(), 20)
                );
            }
            if Instant::now() > deadline {
                let _ = child.kill();
                let _ = child.wait();
                bail!("node {} did not listen within 60 s", self.id);
            }
            tokio::time::sleep(Duration::from_millis(25)).await;
        };
        self.child = Some(child);
        self.base = format!("http://{addr}");
        self.starts += 1;
        let http = reqwest::Client::builder()
            .timeout(Duration::from_secs(10))
            .build()?;
        while !http
            .get(format!("{}/health", self.base))
            .send()
            .await
            .is_ok_and(|r| r.status().is_success())
        {
            if Instant::now() > deadline {
                bail!("node {} did not answer /health within 60 s", self.id);
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        eprintln!(
            "[bench] node {} (pid {}) on {addr}{}",
            self.id,
            self.pid,
            if self.starts > 1 { " (restarted)" } else { "" }
        );
        Ok(())
    }

    fn log_path(&self) -> PathBuf {
        self.dir.join("server.log")
    }

    fn ws_url(&self) -> String {
        format!("{}/realtime", self.base.replacen("http://", "ws://", 1))
    }

    fn alive(&self) -> bool {
        self.child.is_some()
    }

    /// SIGKILL, reaped.
    fn kill9(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    fn interrupt(&self) {
        if let Some(child) = &self.child {
            let _ = Command::new("kill")
                .args(["-INT", &child.id().to_string()])
                .status();
        }
    }

    /// Waits until it has exited (SIGKILL at `deadline`).
    fn reap(&mut self, deadline: Instant) {
        let Some(mut child) = self.child.take() else {
            return;
        };
        while Instant::now() < deadline {
            if !matches!(child.try_wait(), Ok(None)) {
                return;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        eprintln!(
            "[bench] node {} did not stop within 15 s: killing it",
            self.id
        );
        let _ = child.kill();
        let _ = child.wait();
    }

    /// Lines the server logged at WARN or ERROR (with the log level at its default, `warn`,
    /// that is every line but the start-up banner).
    fn complaints(&self) -> Vec<String> {
        std::fs::read_to_string(self.log_path())
            .unwrap_or_default()
            .lines()
            .map(strip_ansi)
            .filter(|l| l.contains(" WARN ") || l.contains(" ERROR ") || l.contains("panicked"))
            .collect()
    }
}

/// A log line without its colour codes (`ESC [ … m`).
fn strip_ansi(line: &str) -> String {
    let mut out = String::with_capacity(line.len());
    let mut chars = line.chars();
    while let Some(c) = chars.next() {
        if c == '\u{1b}' {
            for c in chars.by_ref() {
                if c.is_ascii_alphabetic() {
                    break;
                }
            }
        } else {
            out.push(c);
        }
    }
    out
}

impl Drop for Node {
    fn drop(&mut self) {
        self.interrupt();
        self.reap(Instant::now() + Duration::from_secs(15));
    }
}

/// Stops every node at once: SIGINT to all, then each reaped (SIGKILL after 15 s).
fn stop_nodes(nodes: &mut [Node]) {
    for n in nodes.iter() {
        n.interrupt();
    }
    let deadline = Instant::now() + Duration::from_secs(15);
    for n in nodes.iter_mut() {
        n.reap(deadline);
    }
}

// ---------------------------------------------------------------------------------------
// /proc

/// CPU time of a process (utime + stime, and with `children` its reaped children's too), in
/// clock ticks.
fn cpu_ticks(pid: u32, children: bool) -> Option<u64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    let after = &stat[stat.rfind(')')? + 1..];
    let fields: Vec<&str> = after.split_whitespace().collect();
    let at = |i: usize| fields.get(i).and_then(|v| v.parse::<u64>().ok());
    let own = at(11)? + at(12)?;
    Some(if children {
        own + at(13)? + at(14)?
    } else {
        own
    })
}

/// The parent pid of a process.
fn parent(pid: u32) -> Option<u32> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    let after = &stat[stat.rfind(')')? + 1..];
    after.split_whitespace().nth(1)?.parse().ok()
}

/// CPU time of every PostgreSQL process: the postmaster (with its reaped children: ended
/// connections) and its live children.
fn postgres_ticks(postmaster: u32) -> u64 {
    let mut total = cpu_ticks(postmaster, true).unwrap_or(0);
    if let Ok(entries) = std::fs::read_dir("/proc") {
        for e in entries.flatten() {
            let Some(pid) = e.file_name().to_str().and_then(|s| s.parse::<u32>().ok()) else {
                continue;
            };
            if parent(pid) == Some(postmaster) {
                total += cpu_ticks(pid, false).unwrap_or(0);
            }
        }
    }
    total
}

/// CPU time all processes of the machine have used, from /proc/stat (clock ticks).
fn machine_busy_ticks() -> u64 {
    let stat = std::fs::read_to_string("/proc/stat").unwrap_or_default();
    let values: Vec<u64> = stat
        .lines()
        .next()
        .unwrap_or_default()
        .split_whitespace()
        .skip(1)
        .filter_map(|v| v.parse().ok())
        .collect();
    values.iter().take(8).sum::<u64>()
        - values.get(3).copied().unwrap_or(0)
        - values.get(4).copied().unwrap_or(0)
}

fn clock_ticks() -> f64 {
    Command::new("getconf")
        .arg("CLK_TCK")
        .output()
        .ok()
        .and_then(|o| String::from_utf8(o.stdout).ok())
        .and_then(|s| s.trim().parse().ok())
        .unwrap_or(100.0)
}

/// What the CPU columns are read from: (label, what to read).
#[derive(Clone)]
enum Meter {
    Process(u32),
    Postgres(u32),
    Machine,
}

fn read_meter(m: &Meter) -> u64 {
    match m {
        Meter::Process(pid) => cpu_ticks(*pid, false).unwrap_or(0),
        Meter::Postgres(pid) => postgres_ticks(*pid),
        Meter::Machine => machine_busy_ticks(),
    }
}

// ---------------------------------------------------------------------------------------
// WebSocket clients

#[derive(Default)]
struct Shared {
    /// Record the commit → receive delay of every n-th `db_event` (0: none).
    sample_every: AtomicU64,
    /// Parse every `db_event`: its id (for `since`) and its row's id, with when it was read.
    track: AtomicBool,
}

#[derive(Default)]
struct ClientStats {
    events: AtomicU64,
    closed: AtomicBool,
    reason: Mutex<String>,
    /// The last event id read while tracking.
    last_id: Mutex<Option<String>>,
    /// Row ids read while tracking, with when.
    rows: Mutex<Vec<(i64, Instant)>>,
    /// Error codes the server sent outside a request's answer (`RESUME_TOO_OLD` after
    /// `subscribed`, say).
    errors: Mutex<Vec<String>>,
}

impl ClientStats {
    fn alive(&self) -> bool {
        !self.closed.load(Ordering::Acquire)
    }
}

enum ClientCommand {
    Request {
        text: String,
        reply: oneshot::Sender<Result<(), String>>,
    },
    /// Hand over the (received, delay) pairs recorded so far (µs).
    TakeSamples(oneshot::Sender<Vec<(i64, i64)>>),
}

struct Client {
    /// The node it is connected to (index in its topology).
    node: usize,
    subscribed: bool,
    commands: mpsc::Sender<ClientCommand>,
    stats: Arc<ClientStats>,
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

fn now_micros() -> i64 {
    chrono::Utc::now().timestamp_micros()
}

/// Now and now minus the message's `commitTimestamp`, in µs.
fn commit_delay_micros(text: &str) -> Option<(i64, i64)> {
    const KEY: &str = r#""commitTimestamp":""#;
    let received = now_micros();
    let start = text.find(KEY)? + KEY.len();
    let end = start + text[start..].find('"')?;
    let commit = chrono::DateTime::parse_from_rfc3339(&text[start..end]).ok()?;
    Some((received, received - commit.timestamp_micros()))
}

async fn client_task(
    mut ws: Socket,
    mut commands: mpsc::Receiver<ClientCommand>,
    stats: Arc<ClientStats>,
    shared: Arc<Shared>,
) {
    let mut waiting: Option<oneshot::Sender<Result<(), String>>> = None;
    let mut samples: Vec<(i64, i64)> = Vec::new();
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
                    if is_event {
                        let every = shared.sample_every.load(Ordering::Relaxed);
                        if every > 0 && seen.is_multiple_of(every) {
                            if let Some(sample) = commit_delay_micros(text) {
                                samples.push(sample);
                            }
                        }
                        if shared.track.load(Ordering::Relaxed) {
                            let at = Instant::now();
                            let v: Value = serde_json::from_str(text).unwrap_or(Value::Null);
                            if let Some(id) = v["payload"]["id"].as_str() {
                                *stats.last_id.lock().expect("poisoned") = Some(id.to_string());
                            }
                            if let Some(row) = v["payload"]["record"]["id"].as_i64() {
                                stats.rows.lock().expect("poisoned").push((row, at));
                            }
                        }
                        seen += 1;
                        stats.events.store(seen, Ordering::Relaxed);
                        continue;
                    }
                    let parsed: Value = serde_json::from_str(text).unwrap_or(Value::Null);
                    match parsed["type"].as_str() {
                        Some("subscribed" | "unsubscribed") => {
                            if let Some(reply) = waiting.take() {
                                let _ = reply.send(Ok(()));
                            }
                        }
                        Some("error") => {
                            if let Some(reply) = waiting.take() {
                                let _ = reply.send(Err(text.to_string()));
                            } else {
                                let code = parsed["code"].as_str().unwrap_or("?").to_string();
                                stats.errors.lock().expect("poisoned").push(code);
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
    *stats.reason.lock().expect("poisoned") = reason;
    stats.closed.store(true, Ordering::Release);
}

/// A topology's subscribed sockets.
struct Pool {
    shared: Arc<Shared>,
    clients: Vec<Client>,
    room: String,
    read_key: String,
}

impl Pool {
    fn new(project: &str, read_key: &str) -> Pool {
        Pool {
            shared: Arc::new(Shared::default()),
            clients: Vec::new(),
            room: format!("project_{project}"),
            read_key: read_key.to_string(),
        }
    }

    /// A new socket on `url` (node `node`), subscribed (after `since`, if given).
    async fn connect(&self, url: &str, node: usize, since: Option<String>) -> Result<Client> {
        let config = WebSocketConfig::default().read_buffer_size(CLIENT_READ_BUFFER);
        let connect = tokio_tungstenite::connect_async_with_config(url, Some(config), true);
        let (ws, _) = tokio::time::timeout(Duration::from_secs(30), connect)
            .await
            .context("connecting took over 30 s")?
            .with_context(|| format!("connecting to {url}"))?;
        let (commands, rx) = mpsc::channel(4);
        let stats = Arc::new(ClientStats::default());
        *stats.last_id.lock().expect("poisoned") = since.clone();
        let task = tokio::spawn(client_task(ws, rx, stats.clone(), self.shared.clone()));
        let mut subscribe =
            json!({ "type": "subscribe", "roomId": self.room, "token": self.read_key });
        if let Some(since) = since {
            subscribe["since"] = since.into();
        }
        request(&commands, subscribe.to_string())
            .await
            .context("subscribing")?;
        Ok(Client {
            node,
            subscribed: true,
            commands,
            stats,
            task,
        })
    }

    /// Connects `n` sockets, round robin over `urls`.
    async fn grow(&mut self, urls: &[String], n: usize) -> Result<()> {
        let this = &*self;
        let results: Vec<Result<Client>> = futures_util::stream::iter(0..n)
            .map(|i| this.connect(&urls[i % urls.len()], i % urls.len(), None))
            .buffer_unordered(CONNECT_CONCURRENCY)
            .collect()
            .await;
        for r in results {
            self.clients.push(r?);
        }
        Ok(())
    }

    /// Subscribes exactly the first `n` sockets (the others unsubscribe; they stay connected),
    /// after replacing any socket that was closed (on the node it was on, given by `urls`).
    async fn subscribe_first(&mut self, n: usize, urls: &[String]) -> Result<()> {
        let dead: Vec<usize> = (0..self.clients.len())
            .filter(|&i| !self.clients[i].stats.alive())
            .collect();
        if let Some(&first) = dead.first() {
            eprintln!(
                "[bench]   replacing {} closed sockets; the first was closed: {}",
                dead.len(),
                self.clients[first].stats.reason.lock().expect("poisoned")
            );
        }
        for &i in &dead {
            let node = self.clients[i].node;
            let mut client = self
                .connect(&urls[node], node, None)
                .await
                .context("replacing a closed socket")?;
            client.subscribed = true;
            self.clients[i] = client;
        }
        let subscribe =
            json!({ "type": "subscribe", "roomId": self.room, "token": self.read_key }).to_string();
        let unsubscribe = json!({ "type": "unsubscribe", "roomId": self.room }).to_string();
        let changes: Vec<(usize, bool)> = (0..self.clients.len())
            .filter(|&i| self.clients[i].subscribed != (i < n))
            .map(|i| (i, i < n))
            .collect();
        let this = &*self;
        let results: Vec<Result<()>> = futures_util::stream::iter(changes.iter())
            .map(|&(i, on)| {
                let text = if on {
                    subscribe.clone()
                } else {
                    unsubscribe.clone()
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
        for (i, on) in changes {
            self.clients[i].subscribed = on;
        }
        Ok(())
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

    /// Every client's (received, delay, node) samples, cleared.
    async fn take_samples(&self) -> Vec<(i64, i64, usize)> {
        let mut all = Vec::new();
        for c in &self.clients {
            let (tx, rx) = oneshot::channel();
            if c.commands
                .send(ClientCommand::TakeSamples(tx))
                .await
                .is_ok()
            {
                if let Ok(samples) = rx.await {
                    all.extend(samples.into_iter().map(|(at, d)| (at, d, c.node)));
                }
            }
        }
        all
    }
}

/// Sockets and their event counts when a phase began.
struct Members(Vec<(Arc<ClientStats>, u64)>);

impl Members {
    fn received(&self) -> u64 {
        self.0
            .iter()
            .map(|(s, base)| s.events.load(Ordering::Relaxed) - base)
            .sum()
    }

    /// Fewest changes received by a socket still open (None: all closed).
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

/// Waits until every open member has `due` changes, nothing has arrived for 3 s, or
/// DRAIN_LIMIT has passed.
async fn drain(members: &Members, due: u64) -> Duration {
    let start = Instant::now();
    let mut last = (members.received(), Instant::now());
    loop {
        if members.slowest().is_none_or(|s| s >= due) || start.elapsed() > DRAIN_LIMIT {
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
// Row changes

struct Generator {
    client: tokio_postgres::Client,
    insert: tokio_postgres::Statement,
    next_id: i64,
    committed: Arc<AtomicU64>,
}

struct Generated {
    committed: u64,
    transactions: u64,
    held_back: u64,
}

/// A superuser connection to the project's database (the writes bypass the API, as in
/// fanout_bench: the bench measures the path from the WAL on).
async fn project_connection(url: &str) -> Result<tokio_postgres::Client> {
    let (client, conn) = tokio_postgres::connect(url, tokio_postgres::NoTls)
        .await
        .context("connecting to the project database")?;
    tokio::spawn(conn);
    Ok(client)
}

const INSERT: &str = "INSERT INTO cluster_events (id, note)
     SELECT g, 'row ' || g FROM generate_series($1::bigint, $2::bigint) g";

impl Generator {
    async fn new(url: &str, project: &str) -> Result<Generator> {
        let client = project_connection(url).await?;
        client
            .batch_execute(&format!(
                "SET ROLE fx_{project}_owner;
                 CREATE TABLE {TABLE} (id bigint PRIMARY KEY, note text NOT NULL,
                     created_at timestamptz NOT NULL DEFAULT now());
                 RESET ROLE"
            ))
            .await?;
        let insert = client.prepare(INSERT).await?;
        Ok(Generator {
            client,
            insert,
            next_id: 1,
            committed: Arc::new(AtomicU64::new(0)),
        })
    }

    async fn commit(&mut self, rows: u64) -> Result<()> {
        let from = self.next_id;
        let to = from + rows as i64 - 1;
        self.client.execute(&self.insert, &[&from, &to]).await?;
        self.next_id = to + 1;
        self.committed.fetch_add(rows, Ordering::Relaxed);
        Ok(())
    }

    /// Commits `rate` rows/s for `duration`, one transaction per `tick` with the rows due (at
    /// most `batch`); a tick that would put the slowest member more than LAG_GUARD behind
    /// commits nothing and its rows are dropped from the schedule.
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
            if (done + due).saturating_sub(slowest) > LAG_GUARD {
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

// ---------------------------------------------------------------------------------------
// Topologies

/// A node to start: its id, data directory and environment.
type NodeSpec = (String, PathBuf, Vec<(&'static str, String)>);

/// One node, or three: its servers, project, generator and sockets.
struct Topology {
    name: &'static str,
    nodes: Vec<Node>,
    project: String,
    read_key: String,
    /// The project database, as the superuser.
    db_url: String,
    generator: Generator,
    pool: Pool,
    http: reqwest::Client,
}

impl Topology {
    /// `fluxbase init --json` on the first node's data directory and environment, then every
    /// node's `serve`; a table, a socket through the whole path, then the subscribers.
    async fn start(
        name: &'static str,
        binary: &Path,
        pg: &Cluster,
        envs: Vec<NodeSpec>,
        subscribers: usize,
    ) -> Result<Topology> {
        let (_, first_dir, first_env) = &envs[0];
        std::fs::create_dir_all(first_dir)?;
        let init = fluxbase_bench::init_instance(binary, first_dir, first_env)?;
        let get = |p: &str| {
            init.pointer(p)
                .and_then(Value::as_str)
                .map(str::to_string)
                .with_context(|| format!("no {p} in the init output"))
        };
        let (project, read_key) = (get("/project/id")?, get("/apiKeys/read")?);
        let mut nodes = Vec::new();
        for (id, dir, env) in envs {
            nodes.push(Node::start(binary, &id, dir, env).await?);
        }
        let db_url = pg.url(&format!("fx_{project}"));
        let generator = Generator::new(&db_url, &project).await?;
        let mut topology = Topology {
            name,
            db_url,
            nodes,
            pool: Pool::new(&project, &read_key),
            project,
            read_key,
            generator,
            http: reqwest::Client::builder()
                .timeout(Duration::from_secs(5))
                .build()?,
        };
        if topology.nodes.len() > 1 {
            topology.wait_settled(REJOIN_LIMIT).await?;
        }
        let urls = topology.ws_urls();
        eprintln!("[bench] {name}: a socket per node, one change through the whole path");
        topology.pool.grow(&urls, urls.len()).await?;
        topology.barrier().await?;
        let t = Instant::now();
        topology.pool.grow(&urls, subscribers - urls.len()).await?;
        eprintln!(
            "[bench] {name}: {subscribers} sockets subscribed ({:.1} s)",
            t.elapsed().as_secs_f64()
        );
        topology.barrier().await?;
        Ok(topology)
    }

    fn ws_urls(&self) -> Vec<String> {
        self.nodes.iter().map(Node::ws_url).collect()
    }

    /// Commits one row and waits until every open socket has it (at most 30 s).
    async fn barrier(&mut self) -> Result<()> {
        let members = self.pool.members();
        self.generator.commit(1).await?;
        let deadline = Instant::now() + Duration::from_secs(30);
        while members.slowest().is_some_and(|s| s < 1) {
            if Instant::now() > deadline {
                bail!(
                    "{}: a change did not reach every subscriber within 30 s ({} closed: {:?})",
                    self.name,
                    members.closed().len(),
                    members.closed().first()
                );
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        Ok(())
    }

    /// `cluster` of `/api/cdc/status` on node `i` (None: no answer).
    async fn cluster_status(&self, i: usize) -> Option<Value> {
        let node = &self.nodes[i];
        if !node.alive() {
            return None;
        }
        let resp = self
            .http
            .get(format!(
                "{}/api/cdc/status?projectId={}",
                node.base, self.project
            ))
            .bearer_auth(&self.read_key)
            .send()
            .await
            .ok()?;
        let body: Value = resp.json().await.ok()?;
        body.get("cluster").cloned()
    }

    /// The node leading the project by its own word (its status names itself).
    async fn leader(&self) -> Option<usize> {
        for i in 0..self.nodes.len() {
            if let Some(c) = self.cluster_status(i).await {
                if c["leader"].as_str() == Some(self.nodes[i].id.as_str()) {
                    return Some(i);
                }
            }
        }
        None
    }

    /// Waits until every node runs, sees all nodes, names the same leader (which says it leads)
    /// and its room receives the stream; returns the leader.
    async fn wait_settled(&self, within: Duration) -> Result<usize> {
        let deadline = Instant::now() + within;
        loop {
            let mut said = Vec::new();
            for i in 0..self.nodes.len() {
                said.push(self.cluster_status(i).await);
            }
            let leader = said[0]
                .as_ref()
                .and_then(|c| c["leader"].as_str().map(str::to_string));
            let settled = leader.is_some()
                && said.iter().all(|c| {
                    c.as_ref().is_some_and(|c| {
                        c["leader"].as_str() == leader.as_deref()
                            && c["nodes"]
                                .as_array()
                                .is_some_and(|n| n.len() == self.nodes.len())
                            && c["feedError"].is_null()
                            && c["nats"] == true
                    })
                });
            if settled {
                if let Some(i) = self
                    .nodes
                    .iter()
                    .position(|n| Some(&n.id) == leader.as_ref())
                {
                    return Ok(i);
                }
            }
            if Instant::now() > deadline {
                bail!(
                    "{}: the nodes did not settle on a leader within {within:?}: {}",
                    self.name,
                    said.iter()
                        .zip(&self.nodes)
                        .map(|(c, n)| format!(
                            "{}: {}",
                            n.id,
                            c.as_ref().map_or("no answer".into(), Value::to_string)
                        ))
                        .collect::<Vec<_>>()
                        .join("; ")
                );
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    /// What the CPU columns read: each node, then nats-server, PostgreSQL, the clients, the
    /// machine.
    fn meters(&self, nats: u32, postmaster: u32) -> Vec<(String, Meter)> {
        let mut m: Vec<(String, Meter)> = self
            .nodes
            .iter()
            .map(|n| (format!("node {}", n.id), Meter::Process(n.pid)))
            .collect();
        m.push(("nats-server".into(), Meter::Process(nats)));
        m.push(("postgres".into(), Meter::Postgres(postmaster)));
        m.push(("clients".into(), Meter::Process(std::process::id())));
        m.push(("machine".into(), Meter::Machine));
        m
    }
}

// ---------------------------------------------------------------------------------------
// Measurements

struct Load {
    /// The first this many sockets are subscribed for the phase.
    subscribers: usize,
    rate: f64,
    tick: Duration,
    batch: u64,
    warm_up: Duration,
    seconds: u64,
    sample_every: u64,
}

#[derive(Clone)]
struct LoadRow {
    asked: f64,
    changes: f64,
    delivered: f64,
    complete: f64,
    closed: usize,
    held_back: u64,
    p50_ms: f64,
    p99_ms: f64,
    max_ms: f64,
    samples: usize,
    /// Share of the timed messages over P99_TARGET_MS.
    over_target: f64,
    /// Cores used over the window: (label, cores).
    cpu: Vec<(String, f64)>,
}

async fn load(topology: &mut Topology, meters: &[(String, Meter)], spec: Load) -> Result<LoadRow> {
    let ticks = clock_ticks();
    let urls = topology.ws_urls();
    topology
        .pool
        .subscribe_first(spec.subscribers, &urls)
        .await?;
    let pool = &topology.pool;
    pool.shared.sample_every.store(0, Ordering::Relaxed);
    pool.take_samples().await;
    let members = pool.members();
    pool.shared
        .sample_every
        .store(spec.sample_every, Ordering::Relaxed);
    let window = Duration::from_secs(spec.seconds);
    let committed = topology.generator.committed.clone();
    let read = || -> (Instant, u64, u64, Vec<u64>) {
        (
            Instant::now(),
            members.received(),
            committed.load(Ordering::Relaxed),
            meters.iter().map(|(_, m)| read_meter(m)).collect(),
        )
    };
    let measure = async {
        tokio::time::sleep(spec.warm_up).await;
        let a = read();
        tokio::time::sleep(window).await;
        let b = read();
        (a, b)
    };
    let generate = topology.generator.run(
        spec.rate,
        (spec.tick, spec.batch),
        spec.warm_up + window,
        &members,
    );
    let (generated, (a, b)) = tokio::join!(generate, measure);
    let generated = generated?;
    let drained = drain(&members, generated.committed).await;
    let pool = &topology.pool;
    pool.shared.sample_every.store(0, Ordering::Relaxed);
    let samples = pool.take_samples().await;
    let secs = b.0.duration_since(a.0).as_secs_f64();
    let expected = generated.committed * members.len() as u64;
    let slow = slow_bursts(&samples, topology.nodes.len());
    let mut delays: Vec<i64> = samples.iter().map(|(_, d, _)| *d).collect();
    let (p50_ms, p99_ms, max_ms) = percentiles(&mut delays);
    let over = delays
        .iter()
        .filter(|&&d| d as f64 > P99_TARGET_MS * 1e3)
        .count();
    let mut cpu: Vec<(String, f64)> = meters
        .iter()
        .zip(a.3.iter().zip(&b.3))
        .map(|((label, _), (x, y))| (label.clone(), y.saturating_sub(*x) as f64 / ticks / secs))
        .collect();
    let ours: f64 = cpu
        .iter()
        .filter(|(l, _)| l != "machine")
        .map(|(_, c)| c)
        .sum();
    let machine = cpu
        .iter()
        .find(|(l, _)| l == "machine")
        .map_or(0.0, |(_, c)| *c);
    cpu.push(("others".into(), (machine - ours).max(0.0)));
    let row = LoadRow {
        asked: spec.rate,
        changes: (b.2 - a.2) as f64 / secs,
        delivered: (b.1 - a.1) as f64 / secs,
        complete: members.received() as f64 / expected.max(1) as f64,
        closed: members.closed().len(),
        held_back: generated.held_back,
        p50_ms,
        p99_ms,
        max_ms,
        samples: samples.len(),
        over_target: over as f64 / samples.len().max(1) as f64,
        cpu,
    };
    eprintln!(
        "[bench]   {}: {:.0} changes/s in {} transactions ({} held back), {:.0} msg/s delivered, \
         {:.2}% complete ({:.1} s to drain), {} closed; p50 {:.2} ms, p99 {:.2} ms; cores: {}",
        topology.name,
        row.changes,
        generated.transactions,
        row.held_back,
        row.delivered,
        row.complete * 100.0,
        drained.as_secs_f64(),
        row.closed,
        row.p50_ms,
        row.p99_ms,
        row.cpu
            .iter()
            .map(|(l, c)| format!("{l} {c:.2}"))
            .collect::<Vec<_>>()
            .join(", ")
    );
    if let Some(reason) = members.closed().first() {
        eprintln!("[bench]   first closed socket: {reason}");
    }
    if !slow.is_empty() {
        eprintln!(
            "[bench]   {:.2}% of the timed messages over {P99_TARGET_MS} ms, in {} bursts \
             (start s into the phase: messages per node, worst ms): {}",
            row.over_target * 100.0,
            slow.len(),
            slow.iter()
                .take(12)
                .map(|(at, per_node, worst)| {
                    let per_node: Vec<String> = per_node
                        .iter()
                        .zip(&topology.nodes)
                        .map(|(n, node)| format!("{} {n}", node.id))
                        .collect();
                    format!("{at:.2}: {}, {worst:.0}", per_node.join(" "))
                })
                .collect::<Vec<_>>()
                .join("; ")
        );
    }
    Ok(row)
}

/// The timed messages over P99_TARGET_MS grouped into bursts (slow messages read less than
/// 100 ms apart): each burst's start (seconds after the first timed message), its messages per
/// node and its worst delay in ms.
fn slow_bursts(samples: &[(i64, i64, usize)], nodes: usize) -> Vec<(f64, Vec<usize>, f64)> {
    let Some(first) = samples.iter().map(|(at, _, _)| *at).min() else {
        return Vec::new();
    };
    let mut slow: Vec<(i64, i64, usize)> = samples
        .iter()
        .filter(|(_, d, _)| *d as f64 > P99_TARGET_MS * 1e3)
        .copied()
        .collect();
    slow.sort_unstable();
    let mut bursts: Vec<(f64, Vec<usize>, f64)> = Vec::new();
    let mut last_at = i64::MIN;
    for (at, delay, node) in slow {
        if bursts.is_empty() || at - last_at >= 100_000 {
            bursts.push(((at - first) as f64 / 1e6, vec![0; nodes], 0.0));
        }
        let b = bursts.last_mut().expect("pushed");
        b.1[node.min(nodes - 1)] += 1;
        b.2 = f64::max(b.2, delay as f64 / 1e3);
        last_at = at;
    }
    bursts
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

fn median(mut v: Vec<f64>) -> f64 {
    v.retain(|x| !x.is_nan());
    if v.is_empty() {
        return f64::NAN;
    }
    v.sort_by(f64::total_cmp);
    let n = v.len();
    if n % 2 == 1 {
        v[n / 2]
    } else {
        (v[n / 2 - 1] + v[n / 2]) / 2.0
    }
}

/// One round's figures of one topology.
struct RoundRow {
    saturation: LoadRow,
    latency: LoadRow,
}

struct Kill {
    killed: String,
    /// Kill → a surviving node names a new leader (None: not seen by the end of the wait).
    leader_after: Option<Duration>,
    new_leader: Option<String>,
    /// Kill → the first row committed after the kill read on a surviving node (None: given up).
    first_event_after: Option<Duration>,
    /// Sockets of the killed node reconnected with `since`.
    resumed: usize,
    /// What the new leader's publisher had skipped (events the stream already held) once the
    /// first row arrived.
    skipped: Option<u64>,
}

struct Failover {
    kills: Vec<Kill>,
    rows: u64,
    subscribers: usize,
    /// Distinct rows held / (rows × subscribers).
    complete: f64,
    missing: u64,
    duplicates: u64,
    /// Sockets that could not reconnect, or closed otherwise (reasons).
    failures: Vec<String>,
    /// A socket resuming with `since` from the phase's first event on each node: what it got.
    probes: Vec<(String, String)>,
}

struct Report {
    rounds: Vec<(RoundRow, RoundRow)>,
    rounds_skipped: usize,
    failover: Option<Failover>,
    failover_note: Option<String>,
    complaints: Vec<(String, Vec<String>)>,
    nats_complaints: Vec<String>,
    load_after: String,
}

/// The measurement budget.
struct Budget {
    deadline: Instant,
}

impl Budget {
    fn left(&self) -> Duration {
        self.deadline.saturating_duration_since(Instant::now())
    }
}

async fn run(
    binary: &Path,
    nats_binary: &Path,
    pg: &Cluster,
    dir: &Path,
    settings: &Settings,
) -> Result<Report> {
    let budget = Budget {
        deadline: Instant::now() + Duration::from_secs(settings.time_limit),
    };
    let postmaster: u32 = std::fs::read_to_string(pg.data_dir().join("postmaster.pid"))
        .ok()
        .and_then(|t| t.lines().next().and_then(|l| l.trim().parse().ok()))
        .context("reading postmaster.pid")?;
    let nats = Nats::start(nats_binary, &dir.join("nats")).await?;

    let single_dir = dir.join("one");
    let single = Topology::start(
        "one node",
        binary,
        pg,
        vec![(
            "one".into(),
            single_dir.clone(),
            Node::env(&single_dir, pg.url("fluxbase_one"), None),
        )],
        settings.subscribers,
    )
    .await?;
    let envs = (0..NODES)
        .map(|i| {
            let id = ((b'a' + i as u8) as char).to_string();
            let d = dir.join(format!("node-{id}"));
            let env = Node::env(&d, pg.url("fluxbase_cluster"), Some((&nats.url, &id)));
            (id, d, env)
        })
        .collect();
    let cluster = Topology::start("three nodes", binary, pg, envs, settings.subscribers).await?;
    let mut topologies = [single, cluster];

    let result = measure(&mut topologies, &nats, postmaster, settings, &budget).await;
    let load_after = loadavg();
    let [mut single, mut cluster] = topologies;
    let mut complaints = Vec::new();
    for n in single.nodes.iter().chain(&cluster.nodes) {
        complaints.push((n.id.clone(), n.complaints()));
    }
    let nats_complaints: Vec<String> = std::fs::read_to_string(dir.join("nats/nats.log"))
        .unwrap_or_default()
        .lines()
        .filter(|l| l.contains("[WRN]") || l.contains("[ERR]"))
        .map(str::to_string)
        .collect();
    // What the servers complained about, each message once (without its timestamp).
    for (node, lines) in &complaints {
        let mut seen: Vec<(String, usize)> = Vec::new();
        for l in lines {
            let message = l
                .split_once(' ')
                .map_or(l.as_str(), |(_, m)| m)
                .trim()
                .to_string();
            match seen.iter_mut().find(|(m, _)| *m == message) {
                Some((_, n)) => *n += 1,
                None => seen.push((message, 1)),
            }
        }
        for (message, n) in seen.iter().take(20) {
            eprintln!("[bench] node {node} logged ({n}×): {message}");
        }
    }
    eprintln!("[bench] stopping the servers");
    drop(single.pool.clients.drain(..));
    drop(cluster.pool.clients.drain(..));
    stop_nodes(&mut cluster.nodes);
    stop_nodes(&mut single.nodes);
    drop(nats);
    let (rounds, rounds_skipped, failover, failover_note) = result?;
    Ok(Report {
        rounds,
        rounds_skipped,
        failover,
        failover_note,
        complaints,
        nats_complaints,
        load_after,
    })
}

type Measured = (
    Vec<(RoundRow, RoundRow)>,
    usize,
    Option<Failover>,
    Option<String>,
);

async fn measure(
    topologies: &mut [Topology; 2],
    nats: &Nats,
    postmaster: u32,
    settings: &Settings,
    budget: &Budget,
) -> Result<Measured> {
    let mut rounds = Vec::new();
    let mut skipped = 0;
    // Leave the failover its share of the budget.
    let failover_estimate = Duration::from_secs(20 + 12 * settings.kills as u64);
    for r in 0..settings.rounds {
        if budget.left() < settings.round_estimate() + failover_estimate && r > 0 {
            skipped = settings.rounds - r;
            eprintln!("[bench] BENCH_TIME_LIMIT: skipping the last {skipped} rounds");
            break;
        }
        let order = if r % 2 == 0 { [0, 1] } else { [1, 0] };
        let mut rows: [Option<RoundRow>; 2] = [None, None];
        for t in order {
            let topology = &mut topologies[t];
            let meters = topology.meters(nats.pid(), postmaster);
            let rate = settings.offered as f64 / settings.subscribers as f64;
            eprintln!(
                "[bench] round {}: {}, saturation: up to {rate:.0} changes/s for 1 + {} s",
                r + 1,
                topology.name,
                settings.seconds
            );
            let saturation = load(
                topology,
                &meters,
                Load {
                    subscribers: settings.subscribers,
                    rate,
                    tick: Duration::from_millis(10),
                    batch: LAG_GUARD / 2,
                    warm_up: Duration::from_secs(1),
                    seconds: settings.seconds,
                    sample_every: SATURATION_SAMPLE_EVERY,
                },
            )
            .await?;
            eprintln!(
                "[bench] round {}: {}, latency: {} single-row transactions/s for {} s to {} \
                 subscribers",
                r + 1,
                topology.name,
                settings.tps,
                settings.latency_seconds,
                settings.latency_subscribers()
            );
            let latency = load(
                topology,
                &meters,
                Load {
                    subscribers: settings.latency_subscribers(),
                    rate: settings.tps as f64,
                    tick: Duration::from_secs(1) / settings.tps.min(1000) as u32,
                    batch: settings.tps.div_ceil(1000),
                    warm_up: Duration::ZERO,
                    seconds: settings.latency_seconds,
                    sample_every: 1,
                },
            )
            .await?;
            rows[t] = Some(RoundRow {
                saturation,
                latency,
            });
        }
        let [a, b] = rows;
        rounds.push((a.expect("measured"), b.expect("measured")));
    }

    // The one-node server is not needed any more: its sockets and process go.
    let [single, cluster] = topologies;
    single.pool.clients.clear();
    stop_nodes(&mut single.nodes);

    if settings.kills == 0 {
        return Ok((rounds, skipped, None, Some("BENCH_KILLS=0".into())));
    }
    let failover = failover(cluster, settings, budget).await?;
    let note = (failover.kills.len() < settings.kills).then(|| {
        format!(
            "BENCH_TIME_LIMIT: {} of {} kills done",
            failover.kills.len(),
            settings.kills
        )
    });
    Ok((rounds, skipped, Some(failover), note))
}

/// The failover writer: one single-row transaction per WRITER_TICK, each row's id with when
/// its INSERT was sent.
async fn writer(
    client: tokio_postgres::Client,
    first_id: i64,
    stop: Arc<AtomicBool>,
    sent: Arc<Mutex<Vec<(i64, Instant)>>>,
) -> Result<i64> {
    let insert = client.prepare(INSERT).await?;
    let mut interval = tokio::time::interval(WRITER_TICK);
    interval.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut id = first_id;
    while !stop.load(Ordering::Relaxed) {
        interval.tick().await;
        sent.lock().expect("poisoned").push((id, Instant::now()));
        client.execute(&insert, &[&id, &id]).await?;
        id += 1;
    }
    Ok(id - 1)
}

async fn failover(
    cluster: &mut Topology,
    settings: &Settings,
    budget: &Budget,
) -> Result<Failover> {
    // Every socket records the rows (and event ids) it reads from here on.
    let urls = cluster.ws_urls();
    cluster
        .pool
        .subscribe_first(settings.subscribers, &urls)
        .await?;
    cluster.pool.shared.track.store(true, Ordering::Relaxed);
    let first_row = cluster.generator.next_id;
    cluster.barrier().await?;
    // The barrier row's event id: the probes below resume after it.
    let barrier_id = cluster
        .pool
        .clients
        .iter()
        .find_map(|c| c.stats.last_id.lock().expect("poisoned").clone());
    let stop = Arc::new(AtomicBool::new(false));
    let sent = Arc::new(Mutex::new(Vec::new()));
    let client = project_connection(&cluster.db_url).await?;
    let writing = tokio::spawn(writer(
        client,
        cluster.generator.next_id,
        stop.clone(),
        sent.clone(),
    ));
    eprintln!(
        "[bench] failover: a row every {} ms, {} kills of the leading node",
        WRITER_TICK.as_millis(),
        settings.kills
    );
    let mut kills = Vec::new();
    let mut failures = Vec::new();
    let mut next_target = 0usize;
    for k in 0..settings.kills {
        if budget.left() < Duration::from_secs(25) {
            eprintln!("[bench] BENCH_TIME_LIMIT: stopping after {k} kills");
            break;
        }
        let leader = cluster.wait_settled(REJOIN_LIMIT).await?;
        // Let the cluster run settled for a moment (the rejoined node's feed is live).
        tokio::time::sleep(Duration::from_millis(1000)).await;
        let killed_id = cluster.nodes[leader].id.clone();
        let survivors: Vec<Arc<ClientStats>> = cluster
            .pool
            .clients
            .iter()
            .filter(|c| c.node != leader && c.stats.alive())
            .map(|c| c.stats.clone())
            .collect();
        let t_kill = Instant::now();
        cluster.nodes[leader].kill9();
        // The first row whose INSERT was sent after the kill.
        let threshold = loop {
            let found = sent
                .lock()
                .expect("poisoned")
                .iter()
                .rev()
                .take_while(|(_, at)| *at > t_kill)
                .last()
                .map(|(id, _)| *id);
            if let Some(id) = found {
                break id;
            }
            if writing.is_finished() {
                bail!("the failover writer stopped");
            }
            tokio::time::sleep(Duration::from_millis(2)).await;
        };
        let mut leader_after = None;
        let mut new_leader = None;
        let mut last_status = Instant::now() - Duration::from_secs(1);
        let first_event_after = loop {
            let first = survivors
                .iter()
                .filter_map(|s| {
                    let rows = s.rows.lock().expect("poisoned");
                    rows.iter()
                        .rev()
                        .take_while(|(id, _)| *id >= threshold)
                        .last()
                        .map(|(_, at)| *at)
                })
                .min();
            if let Some(at) = first {
                break Some(at.duration_since(t_kill));
            }
            if leader_after.is_none() && last_status.elapsed() >= Duration::from_millis(50) {
                last_status = Instant::now();
                if let Some(i) = cluster.leader().await {
                    leader_after = Some(t_kill.elapsed());
                    new_leader = Some(cluster.nodes[i].id.clone());
                }
            }
            if t_kill.elapsed() > FAILOVER_GIVE_UP {
                break None;
            }
            tokio::time::sleep(Duration::from_millis(5)).await;
        };
        if leader_after.is_none() {
            if let Some(i) = cluster.leader().await {
                leader_after = Some(t_kill.elapsed());
                new_leader = Some(cluster.nodes[i].id.clone());
            }
        }
        let mut skipped = None;
        if let Some(i) = cluster
            .nodes
            .iter()
            .position(|n| Some(&n.id) == new_leader.as_ref())
        {
            if let Some(c) = cluster.cluster_status(i).await {
                skipped = c["skipped"].as_u64();
            }
        }
        eprintln!(
            "[bench]   kill {}: node {killed_id} (leader) killed; new leader {} seen after {}; \
             first row committed after the kill read on a surviving node after {}",
            k + 1,
            new_leader.as_deref().unwrap_or("?"),
            leader_after.map_or("-".into(), |d| format!("{:.3} s", d.as_secs_f64())),
            first_event_after.map_or(
                format!("> {} s (given up)", FAILOVER_GIVE_UP.as_secs()),
                |d| format!("{:.3} s", d.as_secs_f64())
            )
        );
        // The killed node's sockets reconnect to the survivors, resuming after their last id.
        let alive: Vec<usize> = (0..cluster.nodes.len())
            .filter(|&i| cluster.nodes[i].alive())
            .collect();
        let urls = cluster.ws_urls();
        let orphans: Vec<usize> = (0..cluster.pool.clients.len())
            .filter(|&i| cluster.pool.clients[i].node == leader)
            .collect();
        for &i in &orphans {
            let deadline = Instant::now() + Duration::from_secs(10);
            while cluster.pool.clients[i].stats.alive() && Instant::now() < deadline {
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
        }
        let resumes: Vec<(usize, usize, Option<String>)> = orphans
            .iter()
            .map(|&i| {
                let target = alive[next_target % alive.len()];
                next_target += 1;
                let since = cluster.pool.clients[i]
                    .stats
                    .last_id
                    .lock()
                    .expect("poisoned")
                    .clone();
                (i, target, since)
            })
            .collect();
        let pool = &cluster.pool;
        let connected: Vec<(usize, Result<Client>)> = futures_util::stream::iter(resumes)
            .map(|(i, target, since)| {
                let url = urls[target].clone();
                async move { (i, pool.connect(&url, target, since).await) }
            })
            .buffer_unordered(CONNECT_CONCURRENCY)
            .collect()
            .await;
        let mut resumed = 0;
        for (i, r) in connected {
            match r {
                Ok(client) => {
                    // The new socket keeps the rows the old one read.
                    let old = std::mem::take(
                        &mut *cluster.pool.clients[i].stats.rows.lock().expect("poisoned"),
                    );
                    client
                        .stats
                        .rows
                        .lock()
                        .expect("poisoned")
                        .splice(0..0, old);
                    cluster.pool.clients[i] = client;
                    resumed += 1;
                }
                Err(e) => failures.push(format!("resuming a socket of node {killed_id}: {e:#}")),
            }
        }
        kills.push(Kill {
            killed: killed_id,
            leader_after,
            new_leader,
            first_event_after,
            resumed,
            skipped,
        });
        cluster.nodes[leader].spawn().await?;
    }
    if !kills.is_empty() {
        // The last restarted node rejoins before the phase ends.
        cluster.wait_settled(REJOIN_LIMIT).await?;
    }
    stop.store(true, Ordering::Relaxed);
    let last_row = writing.await??;
    cluster.generator.next_id = last_row + 1;
    let rows = (last_row - first_row + 1).max(0) as u64;
    // Every socket catches up (at most DRAIN_LIMIT, or 3 s without progress).
    let start = Instant::now();
    let mut last_total = (0usize, Instant::now());
    loop {
        let held: Vec<usize> = cluster
            .pool
            .clients
            .iter()
            .map(|c| c.stats.rows.lock().expect("poisoned").len())
            .collect();
        let total: usize = held.iter().sum();
        if held.iter().all(|&n| n as u64 >= rows) || start.elapsed() > DRAIN_LIMIT {
            break;
        }
        if total != last_total.0 {
            last_total = (total, Instant::now());
        } else if last_total.1.elapsed() > Duration::from_secs(3) {
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    // A new socket on every node resumes from the barrier (`since`): each must get every row
    // committed after it, once, whichever node it asks (a restarted one included).
    let mut probes = Vec::new();
    let urls = cluster.ws_urls();
    for (i, node) in cluster.nodes.iter().enumerate() {
        let due = rows.saturating_sub(1);
        let outcome = match cluster.pool.connect(&urls[i], i, barrier_id.clone()).await {
            Err(e) => format!("refused: {e:#}"),
            Ok(probe) => {
                let start = Instant::now();
                let mut last = (0usize, Instant::now());
                loop {
                    let n = probe.stats.rows.lock().expect("poisoned").len();
                    if n as u64 >= due || start.elapsed() > DRAIN_LIMIT {
                        break;
                    }
                    if n != last.0 {
                        last = (n, Instant::now());
                    } else if last.1.elapsed() > Duration::from_secs(3) {
                        break;
                    }
                    tokio::time::sleep(Duration::from_millis(20)).await;
                }
                let mut ids: Vec<i64> = probe
                    .stats
                    .rows
                    .lock()
                    .expect("poisoned")
                    .iter()
                    .map(|(id, _)| *id)
                    .filter(|id| (first_row + 1..=last_row).contains(id))
                    .collect();
                let n = ids.len();
                ids.sort_unstable();
                ids.dedup();
                let missing = due.saturating_sub(ids.len() as u64);
                let duplicates = n - ids.len();
                let errors = probe.stats.errors.lock().expect("poisoned").join(", ");
                let errors = if errors.is_empty() {
                    String::new()
                } else {
                    format!(" (the server said {errors})")
                };
                if missing == 0 && duplicates == 0 {
                    format!("all {due} rows once{errors}")
                } else {
                    format!("{missing} of {due} rows missing, {duplicates} duplicates{errors}")
                }
            }
        };
        eprintln!(
            "[bench]   since the failover phase's first event, on node {}: {outcome}",
            node.id
        );
        probes.push((node.id.clone(), outcome));
    }
    cluster.pool.shared.track.store(false, Ordering::Relaxed);
    let (mut distinct, mut duplicates) = (0u64, 0u64);
    for c in &cluster.pool.clients {
        let mut ids: Vec<i64> = c
            .stats
            .rows
            .lock()
            .expect("poisoned")
            .iter()
            .map(|(id, _)| *id)
            .filter(|id| (first_row..=last_row).contains(id))
            .collect();
        let n = ids.len() as u64;
        ids.sort_unstable();
        ids.dedup();
        distinct += ids.len() as u64;
        duplicates += n - ids.len() as u64;
        if !c.stats.alive() {
            failures.push(format!(
                "a socket closed: {}",
                c.stats.reason.lock().expect("poisoned")
            ));
        }
    }
    let subscribers = cluster.pool.clients.len();
    let expected = rows * subscribers as u64;
    eprintln!(
        "[bench]   {rows} rows committed during the failover phase; {distinct} of {expected} \
         (row, subscriber) pairs received, {duplicates} duplicates"
    );
    Ok(Failover {
        kills,
        rows,
        subscribers,
        complete: distinct as f64 / expected.max(1) as f64,
        missing: expected.saturating_sub(distinct),
        duplicates,
        failures,
        probes,
    })
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
    if v.is_nan() {
        return "-".into();
    }
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
    fn print(&self, settings: &Settings, load_before: &str, took: Duration) {
        let cpus = std::thread::available_parallelism().map_or(0, |n| n.get());
        println!(
            "cluster mode (three nodes, NATS JetStream) against one node: release servers in \
             child processes, {} subscribers each (round robin over the three nodes), {cpus} CPUs \
             shared by the servers, nats-server, PostgreSQL, the clients (this process) and \
             whatever else runs (load average before the run: {load_before}; after: {}); the \
             run took {:.0} s",
            settings.subscribers,
            self.load_after,
            took.as_secs_f64()
        );
        let n = self.rounds.len();
        if n == 0 {
            println!("no round measured");
        } else {
            self.print_rounds(settings);
        }
        match &self.failover {
            Some(f) => Self::print_failover(f),
            None => println!("failover: not measured"),
        }
        if let Some(note) = &self.failover_note {
            println!("note: {note}");
        }
        for (node, lines) in &self.complaints {
            if !lines.is_empty() {
                println!(
                    "node {node} logged {} warnings/errors; the first: {}",
                    lines.len(),
                    lines[0]
                );
            }
        }
        if !self.nats_complaints.is_empty() {
            println!(
                "nats-server logged {} warnings/errors; the first: {}",
                self.nats_complaints.len(),
                self.nats_complaints[0]
            );
        }
    }

    fn print_rounds(&self, settings: &Settings) {
        let n = self.rounds.len();
        let med =
            |f: &dyn Fn(&(RoundRow, RoundRow)) -> f64| median(self.rounds.iter().map(f).collect());
        let one_sat = med(&|r| r.0.saturation.delivered);
        let three_sat = med(&|r| r.1.saturation.delivered);
        let saturated = |i: usize| {
            self.rounds
                .iter()
                .all(|r| if i == 0 { &r.0 } else { &r.1 }.saturation.held_back > 0)
        };
        let label = |sat: bool| {
            if sat {
                "capacity"
            } else {
                "offered load: not saturated"
            }
        };
        let ratio = three_sat / one_sat;
        println!(
            "{:<44}  {:>30}  {:>30}  {:>7}  target",
            format!("median of {n} round{}", if n == 1 { "" } else { "s" }),
            "one node (reference)",
            "three nodes",
            "ratio"
        );
        let ratio_target = if saturated(0) && saturated(1) {
            format!(">= {RATIO_TARGET}x {}", check(ratio >= RATIO_TARGET))
        } else {
            format!(
                ">= {RATIO_TARGET}x (not judged: a figure is limited by the offered load; raise \
                 BENCH_FANOUT_RATE)"
            )
        };
        println!(
            "{:<44}  {:>30}  {:>30}  {:>6.2}x  {ratio_target}",
            "delivered msg/s at saturation",
            format!("{} ({})", thousands(one_sat), label(saturated(0))),
            format!("{} ({})", thousands(three_sat), label(saturated(1))),
            ratio
        );
        // The same per core the servers used (nodes, nats-server, PostgreSQL): less at the
        // mercy of what else runs on the shared cores.
        let per_core = |row: &LoadRow| {
            let cores: f64 = row
                .cpu
                .iter()
                .filter(|(l, _)| l.starts_with("node ") || l == "nats-server" || l == "postgres")
                .map(|(_, c)| c)
                .sum();
            row.delivered / cores.max(1e-9)
        };
        let one_core = med(&|r| per_core(&r.0.saturation));
        let three_core = med(&|r| per_core(&r.1.saturation));
        println!(
            "{:<44}  {:>30}  {:>30}  {:>6.2}x",
            "  the same per server core (nodes+NATS+PG)",
            thousands(one_core),
            thousands(three_core),
            three_core / one_core
        );
        let one_p50 = med(&|r| r.0.latency.p50_ms);
        let three_p50 = med(&|r| r.1.latency.p50_ms);
        let one_p99 = med(&|r| r.0.latency.p99_ms);
        let three_p99 = med(&|r| r.1.latency.p99_ms);
        println!(
            "{:<44}  {:>30.2}  {:>30.2}  {:>6.2}x",
            format!(
                "commit→receive p50 ms, {}/s to {} subs",
                thousands(settings.tps as f64),
                settings.latency_subscribers()
            ),
            one_p50,
            three_p50,
            three_p50 / one_p50
        );
        println!(
            "{:<44}  {:>30.2}  {:>30.2}  {:>6.2}x  <= {P99_TARGET_MS} ms {}",
            format!(
                "commit→receive p99 ms, {}/s to {} subs",
                thousands(settings.tps as f64),
                settings.latency_subscribers()
            ),
            one_p99,
            three_p99,
            three_p99 / one_p99,
            check(three_p99 <= P99_TARGET_MS)
        );
        let short: Vec<String> = self
            .rounds
            .iter()
            .enumerate()
            .flat_map(|(i, (one, three))| [(i, "one node", one), (i, "three nodes", three)])
            .filter(|(_, _, r)| {
                r.latency.changes < 0.95 * r.latency.asked || r.latency.held_back > 0
            })
            .map(|(i, name, r)| {
                format!(
                    "round {} {name}: {} changes/s committed, {} held back",
                    i + 1,
                    thousands(r.latency.changes),
                    thousands(r.latency.held_back as f64)
                )
            })
            .collect();
        if !short.is_empty() {
            println!(
                "  note: the latency load fell short of {} changes/s (the machine did not keep up; \
                 those figures are of an overloaded run): {}",
                thousands(settings.tps as f64),
                short.join("; ")
            );
        }
        println!(
            "{:<44}  {:>30.2}  {:>30.2}",
            "commit→receive p99 ms at saturation (1/16)",
            med(&|r| r.0.saturation.p99_ms),
            med(&|r| r.1.saturation.p99_ms)
        );
        println!(
            "per round: saturation: delivered msg/s (changes/s committed of those asked, held \
             back by the lag guard, complete) | latency: changes/s, p50/p99/max ms, share of the \
             timed messages over {P99_TARGET_MS} ms, complete"
        );
        for (i, (one, three)) in self.rounds.iter().enumerate() {
            let s = |r: &RoundRow| {
                let (sat, lat) = (&r.saturation, &r.latency);
                let closed = sat.closed + lat.closed;
                format!(
                    "{} msg/s ({} of {} changes/s, {} held back, {:.2}% complete{}) | {} changes/s, \
                     {:.2}/{:.2}/{:.2} ms, {:.2}% of {} over, {:.2}% complete",
                    thousands(sat.delivered),
                    thousands(sat.changes),
                    thousands(sat.asked),
                    thousands(sat.held_back as f64),
                    sat.complete * 100.0,
                    if closed > 0 {
                        format!(", {closed} sockets closed")
                    } else {
                        String::new()
                    },
                    thousands(lat.changes),
                    lat.p50_ms,
                    lat.p99_ms,
                    lat.max_ms,
                    lat.over_target * 100.0,
                    thousands(lat.samples as f64),
                    lat.complete * 100.0
                )
            };
            let first = if i % 2 == 0 {
                "one node first"
            } else {
                "three nodes first"
            };
            println!("  round {} ({first})", i + 1);
            println!("    one node:    {}", s(one));
            println!("    three nodes: {}", s(three));
        }
        // CPU per process during saturation, medians.
        let cpu = |pick: &dyn Fn(&(RoundRow, RoundRow)) -> &LoadRow| -> Vec<(String, f64)> {
            let labels: Vec<String> = pick(&self.rounds[0])
                .cpu
                .iter()
                .map(|(l, _)| l.clone())
                .collect();
            labels
                .iter()
                .enumerate()
                .map(|(i, l)| {
                    (
                        l.clone(),
                        median(self.rounds.iter().map(|r| pick(r).cpu[i].1).collect()),
                    )
                })
                .collect()
        };
        let show = |v: Vec<(String, f64)>| {
            v.iter()
                .map(|(l, c)| format!("{l} {c:.2}"))
                .collect::<Vec<_>>()
                .join(", ")
        };
        println!(
            "cores used during the saturation window (medians; nats-server is idle in the \
             one-node runs; others: the machine minus the processes listed, i.e. other work on \
             the shared cores):"
        );
        println!("  one node:    {}", show(cpu(&|r| &r.0.saturation)));
        println!("  three nodes: {}", show(cpu(&|r| &r.1.saturation)));
        println!(
            "saturation: {} messages/s offered ({:.0} changes/s to {} subscribers) for {} s after 1 s \
             of warm-up, every {}th message timed; the lag guard holds the generator while a \
             subscriber is {LAG_GUARD} changes behind (held back > 0: the figure is the capacity)",
            thousands(settings.offered as f64),
            settings.offered as f64 / settings.subscribers as f64,
            settings.subscribers,
            settings.seconds,
            SATURATION_SAMPLE_EVERY
        );
        if self.rounds_skipped > 0 {
            println!(
                "note: BENCH_TIME_LIMIT: {} rounds skipped",
                self.rounds_skipped
            );
        }
    }

    fn print_failover(f: &Failover) {
        let mut times: Vec<f64> = f
            .kills
            .iter()
            .map(|k| {
                k.first_event_after
                    .map_or(FAILOVER_GIVE_UP.as_secs_f64(), |d| d.as_secs_f64())
            })
            .collect();
        let max = times.iter().copied().fold(f64::NAN, f64::max);
        let p50 = median(std::mem::take(&mut times));
        let leader_p50 = median(
            f.kills
                .iter()
                .filter_map(|k| k.leader_after.map(|d| d.as_secs_f64()))
                .collect(),
        );
        let given_up = f
            .kills
            .iter()
            .filter(|k| k.first_event_after.is_none())
            .count();
        println!(
            "failover over {} kill -9s of the leading node (a row committed every {} ms): kill → \
             first row committed after the kill read on a surviving node: p50 {p50:.3} s, max \
             {max:.3} s (target max <= {FAILOVER_TARGET_S} s {}){}; kill → a surviving node \
             names a new leader: p50 {leader_p50:.3} s",
            f.kills.len(),
            WRITER_TICK.as_millis(),
            check(given_up == 0 && max <= FAILOVER_TARGET_S),
            if given_up > 0 {
                format!(
                    ", {given_up} given up after {} s",
                    FAILOVER_GIVE_UP.as_secs()
                )
            } else {
                String::new()
            }
        );
        for (i, k) in f.kills.iter().enumerate() {
            println!(
                "  kill {}: node {} → {} leads after {}, first row after {}; it skipped {} replayed \
                 events the stream held; {} sockets resumed elsewhere with since",
                i + 1,
                k.killed,
                k.new_leader.as_deref().unwrap_or("?"),
                k.leader_after.map_or("-".into(), |d| format!("{:.3} s", d.as_secs_f64())),
                k.first_event_after.map_or("-".into(), |d| format!("{:.3} s", d.as_secs_f64())),
                k.skipped.map_or("?".into(), |n| n.to_string()),
                k.resumed
            );
        }
        println!(
            "complete: {:.4}% of {} rows × {} subscribers ({} missing, {} duplicates) {}",
            f.complete * 100.0,
            thousands(f.rows as f64),
            f.subscribers,
            f.missing,
            f.duplicates,
            check(f.missing == 0 && f.duplicates == 0)
        );
        println!(
            "resume on every node (since the phase's first event, after all the kills): {} {}",
            f.probes
                .iter()
                .map(|(node, outcome)| format!("{node}: {outcome}"))
                .collect::<Vec<_>>()
                .join("; "),
            check(
                f.probes
                    .iter()
                    .all(|(_, o)| o.starts_with("all ") && !o.contains("said"))
            )
        );
        for e in f.failures.iter().take(5) {
            println!("  {e}");
        }
    }
}
