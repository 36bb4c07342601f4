//! Point-SELECT throughput and latency through `POST /api/execute-sql`, beside two references
//! in the same run, on the same cluster, table, query and number of clients:
//!
//! - `pgbench -M prepared -S`: PostgreSQL's own client, no HTTP: what the database can do;
//! - a hand-written Node.js endpoint (`bench/node/sql-reference.js`: `http` + node-postgres, a
//!   pool of the same size, the guide's request and answer shapes, no scopes, no session reset,
//!   no limits): what a developer would build instead of Fluxbase.
//!
//! It starts the release `fluxbase` binary on a fresh data directory (embedded cluster, rate
//! limit off), loads pgbench's tables at scale 1 into the default project's database and runs
//! `BENCH_ROUNDS` rounds; in each, every contender is warmed up for `BENCH_WARMUP_SECONDS` and
//! then measured for `BENCH_SECONDS`, the order rotating from round to round so that none
//! always goes first or last. Figures are medians over the rounds.
//!
//! Both HTTP contenders are driven by the same lean client (one keep-alive HTTP/1.1 connection
//! per client, the request bytes written by hand, `$1` a random account id, the answer's
//! status, length and `"success":true` checked), so the client costs them alike and as little
//! as pgbench's C client costs PostgreSQL. The CPU each process used during the measurement
//! (server, Node, PostgreSQL's processes, the client) is shown beside it, with the load.
//!
//! Targets (issue 19): ≥ 0.5× pgbench's tps, ≥ 2× the Node endpoint's, p99 ≤ 5 ms, judged on
//! the medians; each ratio is printed per round too (a drifting host shows as disagreeing rounds).
//!
//! A fourth line is no reference but a floor: a bare HTTP server (warp, in a child process)
//! answering the same bytes Fluxbase answers without any database, driven by the same client.
//! Fluxbase makes two hops per request (client → server → PostgreSQL) where pgbench makes one,
//! on the same cores: if their costs simply added up, the best Fluxbase could do is
//! 1 / (1 / bare + 1 / pgbench), which the report prints beside the ratio.
//!
//! Environment: BENCH_CLIENTS (default 8), BENCH_SECONDS (default 10), BENCH_ROUNDS (default
//! 3), BENCH_WARMUP_SECONDS (default 2). The Node reference needs `node` and `npm` (Debian:
//! `nodejs`, `npm`); its one package (`pg`, pinned in `bench/node/package-lock.json`) is
//! installed with `npm ci` on first use. BENCH_NODE=0 skips it. BENCH_PARAMS=0 sends the HTTP
//! contenders the query with the account id written into its text and no `params` (Fluxbase's
//! simple-query path, as a script takes; node-postgres's too); pgbench stays `-M prepared`.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use fluxbase_bench::env_or;
use serde_json::Value;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

const SQL: &str = "SELECT abalance FROM pgbench_accounts WHERE aid = $1";

fn pg_bindir() -> Result<PathBuf> {
    let mut dirs: Vec<PathBuf> = std::fs::read_dir("/usr/lib/postgresql")?
        .flatten()
        .map(|e| e.path().join("bin"))
        .filter(|p| p.join("pgbench").exists())
        .collect();
    dirs.sort();
    dirs.pop()
        .context("pgbench not found under /usr/lib/postgresql/*/bin")
}

/// CPU seconds (user + system) of a process, and of its children it has waited for.
fn cpu_of(pid: u32) -> (f64, f64) {
    let Ok(stat) = std::fs::read_to_string(format!("/proc/{pid}/stat")) else {
        return (0.0, 0.0);
    };
    // The command may contain spaces: fields are counted after its closing parenthesis.
    let Some(rest) = stat.rfind(')').map(|i| &stat[i + 2..]) else {
        return (0.0, 0.0);
    };
    let f: Vec<f64> = rest
        .split_whitespace()
        .map(|v| v.parse().unwrap_or(0.0))
        .collect();
    // After the parenthesis: state is field 0, so utime/stime/cutime/cstime are 11..=14.
    let tick = 100.0;
    if f.len() < 15 {
        return (0.0, 0.0);
    }
    ((f[11] + f[12]) / tick, (f[13] + f[14]) / tick)
}

/// CPU seconds of a process, its live children and the children it has reaped (PostgreSQL:
/// the postmaster and every backend, ended ones included).
fn tree_cpu(pid: u32) -> f64 {
    let (own, reaped) = cpu_of(pid);
    let mut total = own + reaped;
    if let Ok(tasks) = std::fs::read_to_string(format!("/proc/{pid}/task/{pid}/children")) {
        for child in tasks.split_whitespace().filter_map(|c| c.parse().ok()) {
            total += tree_cpu(child);
        }
    }
    total
}

fn load() -> String {
    std::fs::read_to_string("/proc/loadavg")
        .unwrap_or_default()
        .split_whitespace()
        .take(3)
        .collect::<Vec<_>>()
        .join(" ")
}

/// The processes whose CPU a measurement shows.
struct Processes {
    server: u32,
    node: Option<u32>,
    bare: u32,
    postgres: u32,
}

#[derive(Clone, Copy, Default)]
struct Cpu {
    server: f64,
    node: f64,
    postgres: f64,
    client: f64,
}

impl Processes {
    fn sample(&self) -> Cpu {
        let me = std::process::id();
        let (own, reaped) = cpu_of(me);
        Cpu {
            server: tree_cpu(self.server),
            node: self.node.map(tree_cpu).unwrap_or(0.0) + tree_cpu(self.bare),
            postgres: tree_cpu(self.postgres),
            client: own + reaped,
        }
    }
}

/// One contender's measurement.
#[derive(Clone, Default)]
struct Run {
    tps: f64,
    p50_ms: Option<f64>,
    p99_ms: Option<f64>,
    /// Cores used during the measurement.
    cpu: Cpu,
    load: String,
}

fn cores(before: Cpu, after: Cpu, seconds: f64) -> Cpu {
    Cpu {
        server: (after.server - before.server) / seconds,
        node: (after.node - before.node) / seconds,
        postgres: (after.postgres - before.postgres) / seconds,
        client: (after.client - before.client) / seconds,
    }
}

/// A keep-alive HTTP/1.1 connection sending the point SELECT with a random `$1`.
struct LeanClient {
    stream: TcpStream,
    head: String,
    buf: Vec<u8>,
    seed: u64,
    /// `$1` in `params` (the default), or the id written into the query text with no `params`
    /// (`BENCH_PARAMS=0`: the simple-query path, a script).
    params: bool,
}

impl LeanClient {
    async fn connect(addr: &str, key: &str, n: u64) -> Result<Self> {
        let stream = TcpStream::connect(addr).await?;
        stream.set_nodelay(true)?;
        let head = format!(
            "POST /api/execute-sql HTTP/1.1\r\nHost: {host}\r\nAuthorization: Bearer {key}\r\n\
             Content-Type: application/json\r\n",
            host = addr
        );
        Ok(LeanClient {
            stream,
            head,
            buf: Vec::with_capacity(4096),
            seed: 0x9E37_79B9_7F4A_7C15u64 ^ (n + 1),
            params: env_or("BENCH_PARAMS", 1) != 0,
        })
    }

    /// One request and its whole answer; an error unless it is a 200 with `"success":true`.
    async fn request(&mut self, project: &str) -> Result<()> {
        self.seed ^= self.seed << 13;
        self.seed ^= self.seed >> 7;
        self.seed ^= self.seed << 17;
        let aid = 1 + self.seed % 100_000;
        let body = if self.params {
            format!(r#"{{"projectId":"{project}","query":"{SQL}","params":[{aid}]}}"#)
        } else {
            let sql = SQL.replace("$1", &aid.to_string());
            format!(r#"{{"projectId":"{project}","query":"{sql}"}}"#)
        };
        let request = format!("{}Content-Length: {}\r\n\r\n{body}", self.head, body.len());
        self.stream.write_all(request.as_bytes()).await?;
        self.buf.clear();
        let (head_end, length) = loop {
            let mut chunk = [0u8; 4096];
            let n = self.stream.read(&mut chunk).await?;
            if n == 0 {
                bail!("the server closed the connection");
            }
            self.buf.extend_from_slice(&chunk[..n]);
            if let Some(i) = self.buf.windows(4).position(|w| w == b"\r\n\r\n") {
                let head = std::str::from_utf8(&self.buf[..i])?;
                if !head.starts_with("HTTP/1.1 200") {
                    bail!("answer: {}", head.lines().next().unwrap_or(""));
                }
                let length = head
                    .lines()
                    .find_map(|l| {
                        let (name, value) = l.split_once(':')?;
                        name.eq_ignore_ascii_case("content-length")
                            .then(|| value.trim().parse::<usize>().ok())?
                    })
                    .context("an answer without Content-Length")?;
                break (i + 4, length);
            }
        };
        while self.buf.len() < head_end + length {
            let mut chunk = [0u8; 4096];
            let n = self.stream.read(&mut chunk).await?;
            if n == 0 {
                bail!("the server closed the connection mid-answer");
            }
            self.buf.extend_from_slice(&chunk[..n]);
        }
        let body = &self.buf[head_end..head_end + length];
        const OK: &[u8] = br#""success":true,"#;
        if !body.windows(OK.len()).any(|w| w == OK) {
            bail!("answer: {}", String::from_utf8_lossy(body));
        }
        Ok(())
    }
}

/// `clients` lean clients against `port` for `seconds`: requests/s and latency percentiles.
async fn drive(
    port: u16,
    key: &str,
    project: &str,
    clients: usize,
    seconds: f64,
) -> Result<(f64, Vec<Duration>)> {
    let addr = format!("127.0.0.1:{port}");
    let mut conns = Vec::new();
    for n in 0..clients {
        conns.push(LeanClient::connect(&addr, key, n as u64).await?);
    }
    let project: Arc<str> = project.into();
    let stop = Instant::now() + Duration::from_secs_f64(seconds);
    let started = Instant::now();
    let tasks: Vec<_> = conns
        .into_iter()
        .map(|mut c| {
            let project = project.clone();
            tokio::spawn(async move {
                let mut latencies = Vec::with_capacity(100_000);
                while Instant::now() < stop {
                    let t = Instant::now();
                    c.request(&project).await?;
                    latencies.push(t.elapsed());
                }
                anyhow::Ok(latencies)
            })
        })
        .collect();
    let mut latencies = Vec::new();
    for t in tasks {
        latencies.extend(t.await??);
    }
    let elapsed = started.elapsed().as_secs_f64();
    latencies.sort();
    Ok((latencies.len() as f64 / elapsed, latencies))
}

fn pct(sorted: &[Duration], p: f64) -> f64 {
    sorted[((sorted.len() as f64 * p) as usize).min(sorted.len() - 1)].as_secs_f64() * 1e3
}

#[derive(Clone, Copy, PartialEq)]
enum Contender {
    Pgbench,
    Fluxbase,
    Node,
    Bare,
}

impl Contender {
    fn name(self) -> &'static str {
        match self {
            Contender::Pgbench => "pgbench -M prepared -S",
            Contender::Fluxbase => "fluxbase /api/execute-sql",
            Contender::Node => "node http + pg",
            Contender::Bare => "bare HTTP, no database",
        }
    }
}

struct Bench {
    clients: usize,
    seconds: f64,
    warmup: f64,
    server_port: u16,
    node_port: Option<u16>,
    bare_port: u16,
    read_key: String,
    node_key: String,
    project: String,
    pgbench: Box<dyn Fn(f64) -> Command>,
    processes: Processes,
}

impl Bench {
    async fn measure(&self, who: Contender) -> Result<Run> {
        let (port, key) = match who {
            Contender::Fluxbase => (self.server_port, &self.read_key),
            Contender::Node => (self.node_port.context("no Node reference")?, &self.node_key),
            Contender::Bare => (self.bare_port, &self.node_key),
            Contender::Pgbench => {
                let out = (self.pgbench)(self.warmup).output()?;
                if !out.status.success() {
                    bail!("pgbench: {}", String::from_utf8_lossy(&out.stderr));
                }
                let before = self.processes.sample();
                let out = (self.pgbench)(self.seconds).output()?;
                // pgbench's backends end as it exits: once the postmaster has reaped them,
                // their CPU is in its children's time.
                tokio::time::sleep(Duration::from_millis(300)).await;
                let after = self.processes.sample();
                let text = String::from_utf8_lossy(&out.stdout);
                let tps: f64 = text
                    .lines()
                    .find(|l| l.starts_with("tps = "))
                    .and_then(|l| l.trim_start_matches("tps = ").split_whitespace().next())
                    .and_then(|v| v.parse().ok())
                    .with_context(|| format!("no tps in pgbench's output: {text}"))?;
                let average: Option<f64> = text
                    .lines()
                    .find(|l| l.starts_with("latency average = "))
                    .and_then(|l| l.split_whitespace().nth(3))
                    .and_then(|v| v.parse().ok());
                return Ok(Run {
                    tps,
                    p50_ms: average,
                    p99_ms: None,
                    cpu: cores(before, after, self.seconds),
                    load: load(),
                });
            }
        };
        drive(port, key, &self.project, self.clients, self.warmup).await?;
        let before = self.processes.sample();
        let (tps, latencies) = drive(port, key, &self.project, self.clients, self.seconds).await?;
        let after = self.processes.sample();
        if latencies.is_empty() {
            bail!("{}: no request finished", who.name());
        }
        Ok(Run {
            tps,
            p50_ms: Some(pct(&latencies, 0.50)),
            p99_ms: Some(pct(&latencies, 0.99)),
            cpu: cores(before, after, self.seconds),
            load: load(),
        })
    }
}

/// The Node reference's packages: installed with `npm ci` when missing or stale.
fn node_packages(dir: &Path) -> Result<()> {
    let stamp = dir.join("node_modules/.package-lock.json.installed");
    let lock = std::fs::read(dir.join("package-lock.json"))?;
    if std::fs::read(&stamp).is_ok_and(|s| s == lock) {
        return Ok(());
    }
    eprintln!(
        "[bench] installing the Node reference's packages (npm ci in {})",
        dir.display()
    );
    let st = Command::new("npm")
        .args(["ci", "--no-audit", "--no-fund", "--loglevel=error"])
        .current_dir(dir)
        .status()
        .context("npm not found: install Debian's nodejs and npm packages")?;
    if !st.success() {
        bail!("npm ci failed in {}", dir.display());
    }
    std::fs::write(stamp, lock)?;
    Ok(())
}

/// Starts the Node reference on a free port; killed when dropped.
struct NodeReference(Child);

impl Drop for NodeReference {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn start_node(
    dir: &Path,
    database_url: &str,
    key: &str,
    project: &str,
    pool: usize,
) -> Result<(NodeReference, u16)> {
    node_packages(dir)?;
    let port = std::net::TcpListener::bind("127.0.0.1:0")?
        .local_addr()?
        .port();
    let mut child = Command::new("node")
        .arg(dir.join("sql-reference.js"))
        .env("PORT", port.to_string())
        .env("DATABASE_URL", database_url)
        .env("API_KEY", key)
        .env("PROJECT_ID", project)
        .env("BENCH_POOL", pool.to_string())
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .spawn()
        .context("node not found: install Debian's nodejs package")?;
    let mut line = String::new();
    let stdout = child.stdout.take().context("node's stdout")?;
    std::io::BufRead::read_line(&mut std::io::BufReader::new(stdout), &mut line)?;
    if !line.starts_with("listening") {
        let _ = child.kill();
        bail!("the Node reference did not start");
    }
    Ok((NodeReference(child), port))
}

/// The bare HTTP floor's server (this program run again with [`BARE_ENV`] set): the answer
/// Fluxbase gives to the benchmark's query, with no database behind it.
const BARE_ENV: &str = "FLUXBASE_SQL_BENCH_BARE_ANSWER";

async fn serve_bare(answer: String) -> Result<()> {
    use warp::Filter;
    let answer: &'static str = Box::leak(answer.into_boxed_str());
    let route = warp::post()
        .and(warp::path!("api" / "execute-sql"))
        .and(warp::body::bytes())
        .map(move |_body: bytes::Bytes| {
            warp::reply::with_header(answer, "content-type", "application/json")
        });
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    println!("listening {}", listener.local_addr()?.port());
    warp::serve(route).incoming(listener).run().await;
    Ok(())
}

/// Starts the bare HTTP floor as a child process; killed when dropped.
fn start_bare(answer: &str) -> Result<(NodeReference, u16)> {
    let mut child = Command::new(std::env::current_exe()?)
        .env(BARE_ENV, answer)
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .spawn()?;
    let mut line = String::new();
    let stdout = child.stdout.take().context("the bare server's stdout")?;
    std::io::BufRead::read_line(&mut std::io::BufReader::new(stdout), &mut line)?;
    let port = line
        .trim()
        .strip_prefix("listening ")
        .and_then(|p| p.parse().ok())
        .context("the bare HTTP server did not start")?;
    Ok((NodeReference(child), port))
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    v[v.len() / 2]
}

#[tokio::main]
async fn main() -> Result<()> {
    if let Ok(answer) = std::env::var(BARE_ENV) {
        return serve_bare(answer).await;
    }
    let clients = env_or("BENCH_CLIENTS", 8) as usize;
    let seconds = env_or("BENCH_SECONDS", 10) as f64;
    let rounds = env_or("BENCH_ROUNDS", 3).max(1) as usize;
    let warmup = env_or("BENCH_WARMUP_SECONDS", 2) as f64;
    let with_node = env_or("BENCH_NODE", 1) != 0;
    let binary = fluxbase_bench::server_binary()?;
    let root = fluxbase_bench::repo_root()?;
    let data = root.join("target/bench-data");
    let _ = std::fs::remove_dir_all(&data);
    let server = fluxbase_bench::ServerProcess::start(
        &binary,
        &data,
        &[
            ("FLUXBASE_POOL_SIZE", clients.to_string()),
            ("FLUXBASE_SQL_PROJECT_CONNECTIONS", clients.to_string()),
        ],
    )
    .await?;
    let project = server.init_str("/project/id")?;
    let read_key = server.init_str("/apiKeys/read")?;

    // The embedded cluster's postmaster, port and superuser password, for the references.
    let pid_file = std::fs::read_to_string(data.join("pg/data/postmaster.pid"))?;
    let mut lines = pid_file.lines();
    let postmaster: u32 = lines
        .next()
        .context("pid in postmaster.pid")?
        .trim()
        .parse()?;
    let pg_port = pid_file
        .lines()
        .nth(3)
        .context("port in postmaster.pid")?
        .trim()
        .to_string();
    let secrets: Value =
        serde_json::from_str(&std::fs::read_to_string(data.join("secrets.json"))?)?;
    let pg_password = secrets["pg_password"]
        .as_str()
        .context("pg password")?
        .to_string();
    let bindir = pg_bindir()?;
    let db = format!("fx_{project}");
    let pg = {
        let (bindir, pg_port, pg_password) = (bindir.clone(), pg_port.clone(), pg_password.clone());
        move |program: &str| {
            let mut c = Command::new(bindir.join(program));
            c.args(["-h", "127.0.0.1", "-p", &pg_port, "-U", "fluxbase"])
                .env("PGPASSWORD", &pg_password);
            c
        }
    };

    eprintln!("[bench] loading pgbench tables (scale 1) into {db}");
    let st = pg("pgbench")
        .args(["-i", "-s", "1", "-q", &db])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()?;
    if !st.success() {
        bail!("pgbench -i failed");
    }
    let grant = format!("GRANT SELECT ON ALL TABLES IN SCHEMA public TO fx_{project}_read");
    let st = pg("psql").args(["-q", "-d", &db, "-c", &grant]).status()?;
    if !st.success() {
        bail!("granting SELECT failed");
    }

    let node_key = fluxbase::secrets::random_base62(32);
    // What Fluxbase answers to the benchmark's query, for the bare floor to answer alike.
    let answer = reqwest::Client::new()
        .post(format!("{}/api/execute-sql", server.base()))
        .bearer_auth(&read_key)
        .json(&serde_json::json!({ "projectId": project, "query": SQL, "params": [1] }))
        .send()
        .await?
        .text()
        .await?;
    let bare = start_bare(&answer)?;
    let node = if with_node {
        let url = format!("postgres://fluxbase:{pg_password}@127.0.0.1:{pg_port}/{db}");
        Some(start_node(
            &root.join("bench/node"),
            &url,
            &node_key,
            &project,
            clients,
        )?)
    } else {
        None
    };
    let pgbench = {
        let (db, clients) = (db.clone(), clients.to_string());
        Box::new(move |secs: f64| {
            let mut c = pg("pgbench");
            c.args([
                "-M", "prepared", "-S", "-n", "-c", &clients, "-j", "2", "-T",
            ])
            .arg(format!("{}", secs.ceil() as u64))
            .arg(&db);
            c
        })
    };
    let bench = Bench {
        clients,
        seconds,
        warmup,
        server_port: server.port,
        node_port: node.as_ref().map(|n| n.1),
        bare_port: bare.1,
        read_key,
        node_key,
        project,
        pgbench,
        processes: Processes {
            server: server.pid,
            node: node.as_ref().map(|n| n.0 .0.id()),
            bare: bare.0 .0.id(),
            postgres: postmaster,
        },
    };

    let mut order = vec![Contender::Pgbench, Contender::Fluxbase];
    if with_node {
        order.push(Contender::Node);
    }
    order.push(Contender::Bare);
    let mut results: Vec<(Contender, Vec<Run>)> = order.iter().map(|c| (*c, vec![])).collect();
    println!(
        "{clients} clients, {rounds} rounds of {seconds} s (after {warmup} s of warm-up each), \
         the order rotating; cores used: server / node or bare / postgres / client; HTTP \
         requests {}",
        if env_or("BENCH_PARAMS", 1) != 0 {
            "with params ($1)"
        } else {
            "without params (the id in the text: simple query)"
        }
    );
    for round in 0..rounds {
        let n = order.len();
        for i in 0..n {
            let who = order[(round + i) % n];
            let run = bench.measure(who).await?;
            println!(
                "round {} {:<27}: {:>7.0} tps, p50 {} ms, p99 {} ms; cores {:.2} / {:.2} / {:.2} / {:.2}; load {}",
                round + 1,
                who.name(),
                run.tps,
                run.p50_ms.map_or("-".into(), |v| format!("{v:.2}")),
                run.p99_ms.map_or("-".into(), |v| format!("{v:.2}")),
                run.cpu.server,
                run.cpu.node,
                run.cpu.postgres,
                run.cpu.client,
                run.load,
            );
            results
                .iter_mut()
                .find(|(c, _)| *c == who)
                .expect("every contender has a slot")
                .1
                .push(run);
        }
    }
    let med = |who: Contender, f: &dyn Fn(&Run) -> Option<f64>| -> Option<f64> {
        let runs = &results.iter().find(|(c, _)| *c == who)?.1;
        let v: Vec<f64> = runs.iter().filter_map(f).collect();
        (!v.is_empty()).then(|| median(v))
    };
    println!("medians over {rounds} rounds:");
    for who in &order {
        println!(
            "  {:<27}: {:>7.0} tps, p50 {} ms, p99 {} ms",
            who.name(),
            med(*who, &|r| Some(r.tps)).unwrap_or(0.0),
            med(*who, &|r| r.p50_ms).map_or("-".into(), |v| format!("{v:.2}")),
            med(*who, &|r| r.p99_ms).map_or("-".into(), |v| format!("{v:.2}")),
        );
    }
    let mark = |ok: bool| if ok { "met" } else { "MISSED" };
    let flux = med(Contender::Fluxbase, &|r| Some(r.tps)).unwrap_or(0.0);
    let pg_tps = med(Contender::Pgbench, &|r| Some(r.tps)).unwrap_or(f64::NAN);
    // Each round's own ratio beside the medians': a host whose speed drifts between rounds
    // shows as rounds that disagree (the judged figure stays the ratio of the medians).
    let by_round = |reference: Contender| -> String {
        let tps = |who: Contender| -> Vec<f64> {
            results
                .iter()
                .find(|(c, _)| *c == who)
                .map(|(_, runs)| runs.iter().map(|r| r.tps).collect())
                .unwrap_or_default()
        };
        tps(Contender::Fluxbase)
            .iter()
            .zip(tps(reference))
            .map(|(f, r)| format!("{:.2}", f / r))
            .collect::<Vec<_>>()
            .join(" ")
    };
    let ratio = flux / pg_tps;
    println!(
        "ratio to pgbench -M prepared : {ratio:.2}x (rounds: {}; target >= 0.50x: {})",
        by_round(Contender::Pgbench),
        mark(ratio >= 0.5)
    );
    if let Some(node_tps) = med(Contender::Node, &|r| Some(r.tps)) {
        let ratio = flux / node_tps;
        println!(
            "ratio to the Node endpoint   : {ratio:.2}x (rounds: {}; target >= 2.00x: {})",
            by_round(Contender::Node),
            mark(ratio >= 2.0)
        );
    }
    if let Some(bare) = med(Contender::Bare, &|r| Some(r.tps)) {
        let floor = 1.0 / (1.0 / bare + 1.0 / pg_tps);
        println!(
            "two hops' floor              : {floor:.0} tps = {:.2}x pgbench (bare HTTP {bare:.0} tps and \
             pgbench's costs added); fluxbase = {:.2}x of it",
            floor / pg_tps,
            flux / floor
        );
    }
    if let Some(p99) = med(Contender::Fluxbase, &|r| r.p99_ms) {
        println!(
            "fluxbase p99                 : {p99:.2} ms (target <= 5 ms: {})",
            mark(p99 <= 5.0)
        );
    }
    drop(node);
    drop(bare);
    Ok(())
}
