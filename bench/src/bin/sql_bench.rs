//! Point-SELECT throughput and latency through `POST /api/execute-sql`, beside `pgbench -S`
//! on the same cluster, the same table and the same number of clients, in the same run.
//!
//! It starts the release `fluxbase` binary on a fresh data directory (embedded cluster, rate
//! limit off), loads pgbench's tables at scale 1 into the default project's database, runs
//! `pgbench -S` for the reference, then the same query over HTTP with `$1` bound to a random
//! account id. It prints both and the ratio; the target is at least 0.5× pgbench's tps.
//!
//! Environment: BENCH_CLIENTS (default 8), BENCH_SECONDS (default 10).

use std::path::PathBuf;
use std::process::{Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use fluxbase_bench::env_or;
use serde_json::{json, Value};

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

#[tokio::main]
async fn main() -> Result<()> {
    let clients = env_or("BENCH_CLIENTS", 8) as usize;
    let seconds = env_or("BENCH_SECONDS", 10);
    let binary = fluxbase_bench::server_binary()?;
    let data = fluxbase_bench::repo_root()?.join("target/bench-data");
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
    let base = server.base();
    let project = server.init_str("/project/id")?;
    let read_key = server.init_str("/apiKeys/read")?;
    let http = reqwest::Client::builder()
        .pool_max_idle_per_host(clients * 2)
        .build()?;

    // The embedded cluster's port and superuser password, for pgbench.
    let pid_file = std::fs::read_to_string(data.join("pg/data/postmaster.pid"))?;
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
    let pg = |program: &str| {
        let mut c = Command::new(bindir.join(program));
        c.args(["-h", "127.0.0.1", "-p", &pg_port, "-U", "fluxbase"])
            .env("PGPASSWORD", &pg_password);
        c
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

    eprintln!("[bench] reference: pgbench -S -c {clients} -T {seconds}");
    let out = pg("pgbench")
        .args([
            "-S",
            "-n",
            "-c",
            &clients.to_string(),
            "-j",
            "2",
            "-T",
            &seconds.to_string(),
            &db,
        ])
        .output()?;
    let text = String::from_utf8_lossy(&out.stdout);
    let pg_tps: f64 = text
        .lines()
        .find(|l| l.starts_with("tps = "))
        .and_then(|l| l.trim_start_matches("tps = ").split_whitespace().next())
        .and_then(|v| v.parse().ok())
        .with_context(|| format!("no tps in pgbench output: {text}"))?;
    let pg_latency = text
        .lines()
        .find(|l| l.starts_with("latency average"))
        .unwrap_or("")
        .to_string();

    eprintln!("[bench] fluxbase: {clients} HTTP clients for {seconds} s");
    let sql = "SELECT abalance FROM pgbench_accounts WHERE aid = $1";
    let url = Arc::new(format!("{base}/api/execute-sql"));
    // Warm up the pool.
    for _ in 0..clients * 4 {
        http.post(url.as_str())
            .bearer_auth(&read_key)
            .json(&json!({ "projectId": project, "query": sql, "params": [1] }))
            .send()
            .await?;
    }
    let stop = Instant::now() + Duration::from_secs(seconds);
    let started = Instant::now();
    let mut tasks = Vec::new();
    for c in 0..clients {
        let (http, url, key, project) =
            (http.clone(), url.clone(), read_key.clone(), project.clone());
        tasks.push(tokio::spawn(async move {
            let mut latencies = Vec::new();
            let mut errors = 0u64;
            let mut seed = 0x9E37_79B9_7F4A_7C15u64 ^ (c as u64 + 1);
            while Instant::now() < stop {
                seed ^= seed << 13;
                seed ^= seed >> 7;
                seed ^= seed << 17;
                let aid = 1 + seed % 100_000;
                let t = Instant::now();
                let ok = match http
                    .post(url.as_str())
                    .bearer_auth(&key)
                    .json(&json!({ "projectId": project, "query": sql, "params": [aid] }))
                    .send()
                    .await
                {
                    Ok(r) => r
                        .json::<Value>()
                        .await
                        .map(|v| v["success"] == true)
                        .unwrap_or(false),
                    Err(_) => false,
                };
                if ok {
                    latencies.push(t.elapsed());
                } else {
                    errors += 1;
                }
            }
            (latencies, errors)
        }));
    }
    let mut latencies = Vec::new();
    let mut errors = 0;
    for t in tasks {
        let (l, e) = t.await?;
        latencies.extend(l);
        errors += e;
    }
    let elapsed = started.elapsed().as_secs_f64();
    latencies.sort();
    let pct = |p: f64| latencies[((latencies.len() as f64 * p) as usize).min(latencies.len() - 1)];
    let tps = latencies.len() as f64 / elapsed;
    println!("pgbench -S        : {pg_tps:.0} tps ({pg_latency})");
    println!(
        "fluxbase execute  : {tps:.0} tps, p50 {:.2} ms, p99 {:.2} ms, {errors} errors ({} requests)",
        pct(0.50).as_secs_f64() * 1e3,
        pct(0.99).as_secs_f64() * 1e3,
        latencies.len()
    );
    println!(
        "ratio             : {:.2}x pgbench (target >= 0.50x)",
        tps / pg_tps
    );
    if errors > 0 {
        bail!("{errors} requests failed");
    }
    Ok(())
}
