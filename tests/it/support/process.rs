//! The real `fluxbase` binary as a child process, against the suite's shared cluster: for tests
//! that measure the server process itself (its peak memory), which an in-process server cannot,
//! or that kill it. Every child is killed and reaped on drop, so a failing test leaves no process
//! behind.

use std::net::SocketAddr;
use std::ops::{Deref, DerefMut};
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use super::cluster::{pg, scratch_dir, unique};

/// `fluxbase <args>` as an operator runs it beside running servers (`project suspend`, …): on
/// `control_db` of the shared cluster, with `env` added, in a data directory of its own.
/// Asserts it succeeded; returns its stdout.
pub async fn operator(control_db: &str, args: &[&str], env: &[(&str, &str)]) -> String {
    let dir = scratch_dir(&format!("it-{}-{}", std::process::id(), unique("operator")));
    let url = pg().await.url(control_db);
    let args: Vec<String> = args.iter().map(|a| a.to_string()).collect();
    let env: Vec<(String, String)> = env
        .iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect();
    let out = tokio::task::spawn_blocking({
        let args = args.clone();
        move || {
            Command::new(env!("CARGO_BIN_EXE_fluxbase"))
                .args(&args)
                .env("FLUXBASE_DATABASE_URL", url)
                .env("FLUXBASE_DATA_DIR", &dir)
                .env("FLUXBASE_LOG", "warn")
                .envs(env)
                .current_dir(&dir)
                .output()
                .expect("running the fluxbase CLI")
        }
    })
    .await
    .unwrap();
    assert!(
        out.status.success(),
        "fluxbase {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// A `fluxbase serve` child; killed on drop.
pub struct ServerProcess {
    pub base: String,
    child: Child,
    /// Its data directory and control database, and the environment it was given: a restart
    /// reuses them.
    pub dir: std::path::PathBuf,
    name: String,
    env: Vec<(String, String)>,
}

impl ServerProcess {
    /// Starts `fluxbase serve` with its own control database on the shared cluster and `env`
    /// added to its environment; returns once `/health` answers.
    pub async fn start(env: &[(&str, &str)]) -> ServerProcess {
        let name = unique("ctl");
        let dir = scratch_dir(&format!("it-{}-{name}", std::process::id()));
        let env = env
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect();
        Self::start_in(dir, name, env).await
    }

    /// Starts `fluxbase serve` on an existing control database of the shared cluster (one a
    /// CLI command initialised, say), with a data directory of its own.
    pub async fn start_on(control_db: &str, env: &[(&str, &str)]) -> ServerProcess {
        let dir = scratch_dir(&format!("it-{}-{}", std::process::id(), unique("srv")));
        let env = env
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect();
        Self::start_in(dir, control_db.to_string(), env).await
    }

    /// Starts the server again on the same data directory and control database (after
    /// [`ServerProcess::kill9`] or [`ServerProcess::terminate`]), on a new port (`base`
    /// changes).
    pub async fn restart(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        let fresh = Self::start_in(self.dir.clone(), self.name.clone(), self.env.clone()).await;
        *self = fresh; // the old one (already reaped) is dropped
    }

    /// Ends the server as a crash would (SIGKILL) and reaps it.
    pub fn kill9(&mut self) {
        self.child.kill().expect("SIGKILL");
        self.child.wait().expect("reaping the server");
    }

    /// Freezes the server (SIGSTOP): it does nothing, and its state stays as it is, until
    /// [`ServerProcess::resume`] or [`ServerProcess::kill9`].
    pub fn pause(&self) {
        self.signal("-STOP");
    }

    /// Lets a paused server run again (SIGCONT).
    pub fn resume(&self) {
        self.signal("-CONT");
    }

    fn signal(&self, signal: &str) {
        let sent = Command::new("kill")
            .args([signal, &self.pid().to_string()])
            .status()
            .expect("running kill");
        assert!(sent.success(), "kill {signal} failed");
    }

    /// The name of its control database on the shared cluster.
    pub fn control_database(&self) -> &str {
        &self.name
    }

    /// Sends SIGTERM; returns once the process has exited (panics after `within`).
    pub async fn terminate(&mut self, within: Duration) -> std::process::ExitStatus {
        let sent = Command::new("kill")
            .args(["-TERM", &self.pid().to_string()])
            .status()
            .expect("running kill");
        assert!(sent.success(), "kill -TERM failed");
        let deadline = Instant::now() + within;
        loop {
            if let Some(status) = self.child.try_wait().unwrap() {
                return status;
            }
            assert!(
                Instant::now() < deadline,
                "the server did not exit after SIGTERM"
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    async fn start_in(
        dir: std::path::PathBuf,
        name: String,
        env: Vec<(String, String)>,
    ) -> ServerProcess {
        let pg = pg().await;
        let addr_file = dir.join("fluxbase.addr");
        let _ = std::fs::remove_file(&addr_file); // a restart's: the new one must be read
        let mut cmd = Command::new(env!("CARGO_BIN_EXE_fluxbase"));
        cmd.arg("serve")
            .env("FLUXBASE_DATA_DIR", &dir)
            .env("FLUXBASE_LISTEN", "127.0.0.1:0")
            .env("FLUXBASE_ADDR_FILE", &addr_file)
            .env("FLUXBASE_DATABASE_URL", pg.url(&name))
            .env("FLUXBASE_RATE_LIMIT_REQUESTS", "10000")
            .env("FLUXBASE_SESSION_RATE_LIMIT_REQUESTS", "10000")
            .env("FLUXBASE_AUTH_ATTEMPTS_PER_ADDRESS", "10000")
            .env("FLUXBASE_AUTH_FAILURES_PER_ADDRESS", "10000")
            .env("FLUXBASE_LOG", "warn")
            .current_dir(&dir)
            .stdout(Stdio::null())
            .stderr(log_file(&dir));
        for (k, v) in &env {
            cmd.env(k, v);
        }
        let mut child = cmd.spawn().expect("starting fluxbase serve");
        let addr = match bound_addr(&addr_file, &mut child).await {
            Ok(addr) => addr,
            Err(e) => {
                let _ = child.kill();
                let _ = child.wait();
                panic!("{e}");
            }
        };
        let server = ServerProcess {
            base: format!("http://{addr}"),
            child,
            dir,
            name,
            env,
        };
        // Bound and accepting: /health answers at once (a hang guard only).
        let health = reqwest::Client::builder()
            .timeout(Duration::from_secs(60))
            .build()
            .unwrap()
            .get(format!("{}/health", server.base))
            .send()
            .await
            .expect("/health of the started server");
        assert_eq!(health.status(), 200, "/health of the started server");
        server
    }

    /// The server's control database (on the shared cluster).
    pub fn control_db(&self) -> &str {
        &self.name
    }

    /// Whether the process is still running (not exited, not killed).
    pub fn is_running(&mut self) -> bool {
        self.child.try_wait().unwrap().is_none()
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// The process's peak resident set size so far (`VmHWM`), in bytes.
    pub fn peak_rss(&self) -> u64 {
        let status = std::fs::read_to_string(format!("/proc/{}/status", self.pid()))
            .expect("reading the server's /proc status");
        status
            .lines()
            .find_map(|l| l.strip_prefix("VmHWM:"))
            .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<u64>().ok())
            .expect("VmHWM in /proc/<pid>/status")
            * 1024
    }
}

impl Drop for ServerProcess {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// `<dir>/server.log`, appended to across restarts: what the server logged (at `FLUXBASE_LOG`,
/// `warn` unless a test asks for more), for a failing test to be read after the fact.
/// Private (0600): a first start prints its login and keys.
fn log_file(dir: &Path) -> Stdio {
    use std::os::unix::fs::OpenOptionsExt;
    std::fs::OpenOptions::new()
        .create(true)
        .mode(0o600)
        .append(true)
        .open(dir.join("server.log"))
        .map(Stdio::from)
        .unwrap_or_else(|_| Stdio::null())
}

/// The address a `fluxbase serve` started with `FLUXBASE_ADDR_FILE=<addr_file>` bound, once it
/// has written it; an error if the process exits first (or after a generous hang guard: the
/// start-up migrates, and may start an embedded cluster).
pub async fn bound_addr(addr_file: &Path, child: &mut Child) -> Result<SocketAddr, String> {
    let deadline = Instant::now() + Duration::from_secs(180);
    loop {
        // Written beside it and renamed: whole once it exists.
        if let Ok(text) = std::fs::read_to_string(addr_file) {
            return text
                .trim()
                .parse()
                .map_err(|e| format!("{}: {text:?}: {e}", addr_file.display()));
        }
        if let Some(status) = child.try_wait().unwrap() {
            return Err(format!("the server exited before it listened: {status}"));
        }
        if Instant::now() > deadline {
            return Err(format!(
                "the server never wrote its address to {}",
                addr_file.display()
            ));
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// Any child process of a test (a `fluxbase` command, a Node.js client): killed and reaped on
/// drop unless it has exited already. Derefs to the `Child`.
pub struct ChildGuard(pub Child);

impl Deref for ChildGuard {
    type Target = Child;
    fn deref(&self) -> &Child {
        &self.0
    }
}

impl DerefMut for ChildGuard {
    fn deref_mut(&mut self) -> &mut Child {
        &mut self.0
    }
}

impl Drop for ChildGuard {
    fn drop(&mut self) {
        if let Ok(None) = self.0.try_wait() {
            let _ = self.0.kill();
            let _ = self.0.wait();
        }
    }
}
