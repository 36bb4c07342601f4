//! Scaffolding shared by the benchmark programs in `src/bin/`.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use fluxbase::accounts::{NewUser, User};
use fluxbase::app::{App, Running, SharedApp};
use fluxbase::config::Config;
use fluxbase::embedded::Cluster;
use serde_json::Value;

/// The server binary's allocator (src/main.rs): every bench program links this library, so the
/// benches that run the server in-process measure the allocator users run.
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

/// Logs to stderr, filtered by `FLUXBASE_LOG` (default `warn`).
pub fn init_tracing() {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_env("FLUXBASE_LOG")
                .unwrap_or_else(|_| "warn".into()),
        )
        .with_writer(std::io::stderr)
        .init();
}

/// An unsigned number from the environment, or `default`.
pub fn env_or(name: &str, default: u64) -> u64 {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

/// The change-capture workload of `cdc_bench` and `binlog_bench`: `rows` inserts in
/// transactions of `batch`, then `updates` updates of `wide_bytes`-byte rows; `rounds` counted
/// after `warmup`; the latency phase at `tps` transactions/s for `latency_seconds`. From
/// `BENCH_ROWS`, `BENCH_UPDATES`, `BENCH_WIDE_BYTES`, `BENCH_BATCH`, `BENCH_ROUNDS`,
/// `BENCH_WARMUP`, `BENCH_TPS`, `BENCH_LATENCY_SECONDS`.
#[derive(Clone, Debug)]
pub struct ChangeSettings {
    pub rows: u64,
    pub updates: u64,
    pub wide_bytes: u64,
    pub batch: u64,
    pub rounds: u64,
    pub warmup: u64,
    pub tps: u64,
    pub latency_seconds: u64,
}

impl ChangeSettings {
    /// The settings from the environment; `rows` and `updates` default to the bench's own.
    pub fn from_env(rows: u64, updates: u64) -> ChangeSettings {
        ChangeSettings {
            rows: env_or("BENCH_ROWS", rows),
            updates: env_or("BENCH_UPDATES", updates),
            wide_bytes: env_or("BENCH_WIDE_BYTES", 1000),
            batch: env_or("BENCH_BATCH", 1000).max(1),
            rounds: env_or("BENCH_ROUNDS", 3).max(1),
            warmup: env_or("BENCH_WARMUP", 1),
            tps: env_or("BENCH_TPS", 1000).max(1),
            latency_seconds: env_or("BENCH_LATENCY_SECONDS", 10),
        }
    }

    /// Row changes per round: the events a round must deliver.
    pub fn changes(&self) -> u64 {
        self.rows + self.updates
    }
}

/// The median of a bench's per-round figures (the upper one of an even count).
pub fn median(values: impl IntoIterator<Item = f64>) -> f64 {
    let mut v: Vec<f64> = values.into_iter().collect();
    v.sort_by(f64::total_cmp);
    v.get(v.len() / 2).copied().unwrap_or(f64::NAN)
}

/// The 1-minute load average (printed beside every figure: the machine is shared).
pub fn load_average() -> f64 {
    std::fs::read_to_string("/proc/loadavg")
        .ok()
        .and_then(|l| l.split_whitespace().next()?.parse().ok())
        .unwrap_or(f64::NAN)
}

/// The repository's root (the benches read `target/` and write scratch data there).
pub fn repo_root() -> Result<PathBuf> {
    Ok(Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("..")
        .canonicalize()?)
}

/// Starts a throwaway cluster in a fresh `target/<name>` (under `target/`: reachable by the
/// `postgres` user when we are root), with `settings` for this start. Returns it and the dir.
pub async fn throwaway_cluster(
    name: &str,
    settings: Vec<(&'static str, &'static str)>,
) -> Result<(Cluster, PathBuf)> {
    let dir = repo_root()?.join("target").join(name);
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir)?;
    eprintln!("[bench] starting a throwaway cluster in {}", dir.display());
    let pg_root = dir.join("pg");
    let password = fluxbase::secrets::random_base62(24);
    let cluster =
        tokio::task::spawn_blocking(move || Cluster::start(&pg_root, &password, &settings))
            .await?
            .context("starting the cluster")?;
    Ok((cluster, dir))
}

/// Runs `bench` on a throwaway cluster in `target/<name>` (see [`throwaway_cluster`]), then
/// stops the cluster and removes the directory, whatever `bench` returned.
pub async fn on_throwaway_cluster<T>(
    name: &str,
    settings: Vec<(&'static str, &'static str)>,
    bench: impl AsyncFnOnce(&Cluster, &Path) -> Result<T>,
) -> Result<T> {
    let (cluster, dir) = throwaway_cluster(name, settings).await?;
    let result = bench(&cluster, &dir).await;
    eprintln!("[bench] stopping the cluster");
    let stopped = tokio::task::spawn_blocking(move || cluster.stop()).await;
    let _ = std::fs::remove_dir_all(&dir);
    let value = result?;
    stopped??;
    Ok(value)
}

/// The server in this process on `cluster` (its data under `dir/app`, a free loopback port),
/// with `tweak` applied to the configuration.
pub async fn start_app(
    cluster: &Cluster,
    dir: &Path,
    tweak: impl FnOnce(&mut Config),
) -> Result<(SharedApp, Running)> {
    let mut config = Config {
        listen: "127.0.0.1:0".parse()?,
        data_dir: dir.join("app"),
        database_url: Some(cluster.url("fluxbase").into()),
        ..Config::default()
    };
    tweak(&mut config);
    let app = App::open(config, &[]).await.context("opening the app")?;
    let running = Running::start(app.clone())
        .await
        .context("starting the server")?;
    Ok((app, running))
}

/// The benchmark's account.
pub async fn bench_user(app: &SharedApp) -> Result<User> {
    app.accounts
        .create_user(NewUser {
            email: "bench@example.com".into(),
            password: fluxbase::secrets::random_base62(20),
            display_name: None,
        })
        .await
        .map_err(|e| anyhow::anyhow!("creating a user: {e}"))
}

/// The release `fluxbase` binary: `FLUXBASE_BIN`, or `target/release/fluxbase`.
pub fn server_binary() -> Result<PathBuf> {
    let binary = match std::env::var_os("FLUXBASE_BIN") {
        Some(path) => PathBuf::from(path),
        None => repo_root()?.join("target/release/fluxbase"),
    };
    if !binary.exists() {
        bail!(
            "{} not found: build the server first (cargo build --release --bin fluxbase)",
            binary.display()
        );
    }
    Ok(binary)
}

/// `fluxbase serve` as a child process, after `fluxbase init --json`, on a free loopback port,
/// with its log in `<data>/server.log`. Stopped (SIGINT, then SIGKILL after 15 s) when dropped.
pub struct ServerProcess {
    child: Option<Child>,
    pub pid: u32,
    pub port: u16,
    /// What `init --json` printed: the project and its keys.
    pub init: Value,
    log: PathBuf,
}

impl ServerProcess {
    /// Starts `binary` on the data directory `data` with `envs` (which may override the
    /// defaults: rate limit off, log level `warn`), and waits until `/health` answers.
    pub async fn start(
        binary: &Path,
        data: &Path,
        envs: &[(&str, String)],
    ) -> Result<ServerProcess> {
        std::fs::create_dir_all(data)?;
        let port = std::net::TcpListener::bind("127.0.0.1:0")?
            .local_addr()?
            .port();
        let mut all = vec![
            ("FLUXBASE_DATA_DIR", data.display().to_string()),
            ("FLUXBASE_LISTEN", format!("127.0.0.1:{port}")),
            ("FLUXBASE_RATE_LIMIT_REQUESTS", "0".into()),
            // Every bench client is 127.0.0.1 (the fan-out bench opens thousands of sockets).
            ("FLUXBASE_MAX_CONNECTIONS_PER_ADDRESS", "0".into()),
            ("FLUXBASE_LOG", "warn".into()),
        ];
        all.extend(envs.iter().cloned());
        let init = init_instance(binary, data, &all)?;
        let log = data.join("server.log");
        let child = Command::new(binary)
            .arg("serve")
            .envs(all.iter().map(|(k, v)| (*k, v)))
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(&log)?)
            .spawn()
            .context("starting fluxbase serve")?;
        let mut server = ServerProcess {
            pid: child.id(),
            child: Some(child),
            port,
            init,
            log,
        };
        eprintln!("[bench] fluxbase serve (pid {}) on port {port}", server.pid);
        let http = reqwest::Client::new();
        let health = format!("{}/health", server.base());
        let deadline = Instant::now() + Duration::from_secs(60);
        while !http
            .get(&health)
            .send()
            .await
            .is_ok_and(|r| r.status().is_success())
        {
            if let Some(status) = server.exited() {
                bail!("the server exited ({status}): {}", server.log_tail());
            }
            if Instant::now() > deadline {
                bail!("the server did not answer /health within 60 s");
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        Ok(server)
    }

    /// `http://127.0.0.1:<port>`.
    pub fn base(&self) -> String {
        format!("http://127.0.0.1:{}", self.port)
    }

    /// A string of the init output by JSON pointer, such as `/project/id` or `/apiKeys/read`.
    pub fn init_str(&self, pointer: &str) -> Result<String> {
        self.init
            .pointer(pointer)
            .and_then(Value::as_str)
            .map(str::to_string)
            .with_context(|| format!("no {pointer} in the init output"))
    }

    pub fn exited(&mut self) -> Option<std::process::ExitStatus> {
        self.child
            .as_mut()
            .and_then(|c| c.try_wait().ok().flatten())
    }

    /// The last 20 lines of the server's log.
    pub fn log_tail(&self) -> String {
        let text = std::fs::read_to_string(&self.log).unwrap_or_default();
        let lines: Vec<&str> = text.lines().collect();
        lines[lines.len().saturating_sub(20)..].join("\n")
    }

    /// SIGINT (graceful shutdown), then SIGKILL if it has not exited within 15 s.
    pub fn stop(&mut self) {
        let Some(mut child) = self.child.take() else {
            return;
        };
        let _ = Command::new("kill")
            .args(["-INT", &child.id().to_string()])
            .status();
        let deadline = Instant::now() + Duration::from_secs(15);
        while Instant::now() < deadline {
            if !matches!(child.try_wait(), Ok(None)) {
                return;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        eprintln!("[bench] the server did not stop within 15 s: killing it");
        let _ = child.kill();
        let _ = child.wait();
    }
}

impl Drop for ServerProcess {
    fn drop(&mut self) {
        self.stop();
    }
}

/// `fluxbase init --json` for a fresh instance in `data` (configured by `envs`): its output,
/// with the project and the keys.
pub fn init_instance(
    binary: &Path,
    data: &Path,
    envs: &[(&str, String)],
) -> Result<serde_json::Value> {
    eprintln!(
        "[bench] initialising a fresh instance in {}",
        data.display()
    );
    let out = std::process::Command::new(binary)
        .args(["init", "--json"])
        .envs(envs.iter().map(|(k, v)| (*k, v)))
        .output()?;
    if !out.status.success() {
        bail!("init failed: {}", String::from_utf8_lossy(&out.stderr));
    }
    serde_json::from_slice(&out.stdout).context("init --json output")
}

/// The settings every bench cluster uses: durability traded for speed, as in the tests.
pub const FAST: [(&str, &str); 2] = [("fsync", "off"), ("full_page_writes", "off")];
