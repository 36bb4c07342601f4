//! NATS with JetStream for the cluster tests: a real `nats-server -js` child process on a
//! loopback port, its store in a scratch directory; `kill9()` and `restart()` (same port, same
//! store) for the tests that take NATS away mid-workload; killed on drop. `nats()` is one
//! server shared by every test of the binary that does not restart it (like `pg()`): it lives
//! in a static, and a watchdog kills it when the test process is gone, however it ended.
//!
//! The ports (client, and monitoring for `/jsz` in failure messages) are the server's own pick
//! (`-p -1 -m -1`), read back from the ports file it writes (`--ports_file_dir`), so no port is
//! picked and then raced for; only a restart asks for the ports it had (retrying while they
//! are still in use). Everything binds 127.0.0.1.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use tokio::io::AsyncReadExt;
use tokio::sync::OnceCell;

use super::cluster::{scratch_dir, unique};

/// A `nats-server -js` child process; killed on drop.
pub struct NatsServer {
    port: u16,
    /// The monitoring port (`/varz`, `/jsz`), loopback too.
    monitor: u16,
    /// Its store (`<dir>/store`), ports file and log (`<dir>/nats.log`).
    pub dir: PathBuf,
    child: Option<Child>,
}

static SHARED: OnceCell<NatsServer> = OnceCell::const_new();

/// The NATS server shared by the tests that do not restart NATS.
pub async fn nats() -> &'static NatsServer {
    SHARED.get_or_init(NatsServer::start).await
}

/// `nats-server`: `$NATS_SERVER`, else on `PATH`, else Debian's `/usr/sbin/nats-server`
/// (`/usr/sbin` is not on every user's `PATH`).
fn binary() -> PathBuf {
    if let Some(p) = std::env::var_os("NATS_SERVER") {
        return PathBuf::from(p);
    }
    let on_path = std::env::var_os("PATH")
        .map(|path| {
            std::env::split_paths(&path)
                .map(|d| d.join("nats-server"))
                .find(|p| p.is_file())
        })
        .unwrap_or_default();
    match on_path {
        Some(p) => p,
        None if Path::new("/usr/sbin/nats-server").is_file() => "/usr/sbin/nats-server".into(),
        None => panic!(
            "nats-server is not installed: `scripts/deps.sh test` installs it as root \
             (Debian's package nats-server), or set NATS_SERVER to its path"
        ),
    }
}

impl NatsServer {
    /// Starts `nats-server -js` on a port of its own choosing; returns once it accepts
    /// connections and greets with its `INFO`.
    pub async fn start() -> NatsServer {
        let dir = scratch_dir(&format!("it-{}-{}", std::process::id(), unique("nats")));
        let mut child = spawn(&dir, None);
        let (port, monitor) = match ports_file_ports(&dir, &mut child).await {
            Ok(ports) => ports,
            Err(e) => {
                let _ = child.kill();
                let _ = child.wait();
                panic!("{e}\n{}", log_tail(&dir));
            }
        };
        let mut server = NatsServer {
            port,
            monitor,
            dir,
            child: Some(child),
        };
        server.wait_ready(Duration::from_secs(60)).await;
        server
    }

    /// `nats://127.0.0.1:<port>`.
    pub fn url(&self) -> String {
        format!("nats://127.0.0.1:{}", self.port)
    }

    pub fn port(&self) -> u16 {
        self.port
    }

    /// JetStream's state as its monitoring endpoint reports it (`/jsz`, with every stream and
    /// consumer): for a failure message.
    pub async fn jsz(&self) -> serde_json::Value {
        let url = format!(
            "http://127.0.0.1:{}/jsz?streams=true&consumers=true&config=false",
            self.monitor
        );
        let client = reqwest::Client::builder()
            .timeout(Duration::from_secs(10))
            .build()
            .unwrap();
        match client.get(url).send().await {
            Ok(resp) => resp.json().await.unwrap_or_default(),
            Err(e) => serde_json::json!({ "error": e.to_string() }),
        }
    }

    /// The last sequence of stream `name`, from the monitoring endpoint.
    pub async fn last_sequence(&self, name: &str) -> Option<u64> {
        let jsz = self.jsz().await;
        jsz["account_details"]
            .as_array()?
            .iter()
            .flat_map(|a| a["stream_detail"].as_array().into_iter().flatten())
            .find(|s| s["name"] == name)?["state"]["last_seq"]
            .as_u64()
    }

    /// Each stream's name, messages, first and last sequence, and each consumer's name,
    /// delivered and acknowledged stream sequences and pending count: one line each; only the
    /// stream named `only`, if given (the shared server holds every test's).
    pub async fn describe(&self, only: Option<&str>) -> String {
        let jsz = self.jsz().await;
        let mut out = Vec::new();
        for account in jsz["account_details"].as_array().into_iter().flatten() {
            for stream in account["stream_detail"].as_array().into_iter().flatten() {
                if only.is_some_and(|name| stream["name"] != name) {
                    continue;
                }
                let st = &stream["state"];
                out.push(format!(
                    "stream {}: {} messages, seq {}..{}",
                    stream["name"], st["messages"], st["first_seq"], st["last_seq"]
                ));
                for c in stream["consumer_detail"].as_array().into_iter().flatten() {
                    out.push(format!(
                        "  consumer {}: delivered {}, ack floor {}, pending {}, ack pending {}",
                        c["name"],
                        c["delivered"]["stream_seq"],
                        c["ack_floor"]["stream_seq"],
                        c["num_pending"],
                        c["num_ack_pending"]
                    ));
                }
            }
        }
        if out.is_empty() {
            format!("{jsz}")
        } else {
            out.join("\n")
        }
    }

    /// Stops (`SIGSTOP`) or resumes (`SIGCONT`) the server: a server that hangs, its
    /// connections open and silent.
    pub fn pause(&self, paused: bool) {
        let pid = self.child.as_ref().expect("running").id();
        let signal = if paused { "-STOP" } else { "-CONT" };
        let status = std::process::Command::new("kill")
            .args([signal, &pid.to_string()])
            .status()
            .expect("kill");
        assert!(status.success(), "kill {signal} {pid}");
    }

    /// JetStream's store: its most bytes (`max_file_store`, by default three quarters of the
    /// disk's free space) and the bytes its streams have reserved (each its `max_bytes`).
    pub async fn store_room(&self) -> (u64, u64) {
        let url = format!("http://127.0.0.1:{}/jsz?config=true", self.monitor);
        let jsz: serde_json::Value = reqwest::get(&url).await.unwrap().json().await.unwrap();
        (
            jsz["config"]["max_storage"].as_u64().expect("max_storage"),
            jsz["reserved_storage"].as_u64().unwrap_or(0),
        )
    }

    /// Ends the server as a crash would (SIGKILL) and reaps it.
    pub fn kill9(&mut self) {
        if let Some(mut child) = self.child.take() {
            child.kill().expect("SIGKILL of nats-server");
            child.wait().expect("reaping nats-server");
        }
    }

    /// Starts the server again (killing it first if it runs) on the same port and store: its
    /// clients reconnect to the address they had, and JetStream finds its streams. Retries for
    /// up to 60 s while the port is still taken.
    pub async fn restart(&mut self) {
        self.kill9();
        let deadline = Instant::now() + Duration::from_secs(60);
        loop {
            let mut child = spawn(&self.dir, Some((self.port, self.monitor)));
            // Either it greets on its port, or it exits (the port still in use).
            let ready = loop {
                if let Some(status) = child.try_wait().unwrap() {
                    break Err(format!("nats-server exited at its restart: {status}"));
                }
                if greets(self.port).await {
                    break Ok(());
                }
                if Instant::now() > deadline {
                    break Err("nats-server did not accept connections after its restart".into());
                }
                tokio::time::sleep(Duration::from_millis(50)).await;
            };
            match ready {
                Ok(()) => {
                    self.child = Some(child);
                    return;
                }
                Err(e) => {
                    let _ = child.kill();
                    let _ = child.wait();
                    assert!(
                        Instant::now() < deadline,
                        "{e} (port {})\n{}",
                        self.port,
                        log_tail(&self.dir)
                    );
                    tokio::time::sleep(Duration::from_millis(200)).await;
                }
            }
        }
    }

    /// What a nats-server killed under load loses (2.9 writes its store from a buffer in its own
    /// process, asynchronously): the newest half of the stream `stream`'s last message block is
    /// cut off its file, and the block's index and summary files are removed so that the
    /// restarted server rebuilds them from what is left. Only while the server is stopped.
    /// Returns the bytes cut.
    pub fn cut_stream_tail(&mut self, stream: &str) -> u64 {
        assert!(
            self.child.is_none(),
            "cut_stream_tail needs nats-server stopped"
        );
        let msgs = self
            .dir
            .join("store/jetstream/$G/streams")
            .join(stream)
            .join("msgs");
        let mut blocks: Vec<(u64, std::path::PathBuf)> = std::fs::read_dir(&msgs)
            .unwrap_or_else(|e| panic!("reading {}: {e}", msgs.display()))
            .filter_map(|e| {
                let path = e.ok()?.path();
                let n = path
                    .file_name()?
                    .to_str()?
                    .strip_suffix(".blk")?
                    .parse()
                    .ok()?;
                Some((n, path))
            })
            .collect();
        blocks.sort();
        let (n, last) = blocks.pop().expect("the stream has a message block");
        let len = std::fs::metadata(&last).unwrap().len();
        let cut = len / 2;
        std::fs::OpenOptions::new()
            .write(true)
            .open(&last)
            .unwrap()
            .set_len(len - cut)
            .unwrap();
        for other in [format!("{n}.idx"), format!("{n}.fss")] {
            let _ = std::fs::remove_file(msgs.join(other));
        }
        let _ = std::fs::remove_file(msgs.join("index.db"));
        cut
    }

    /// Whether the process is running.
    pub fn is_running(&mut self) -> bool {
        self.child
            .as_mut()
            .is_some_and(|c| c.try_wait().unwrap().is_none())
    }

    async fn wait_ready(&mut self, within: Duration) {
        let deadline = Instant::now() + within;
        while !greets(self.port).await {
            assert!(
                self.is_running(),
                "nats-server exited before it accepted connections\n{}",
                log_tail(&self.dir)
            );
            assert!(
                Instant::now() < deadline,
                "nats-server did not accept connections on {} within {within:?}",
                self.port
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }
}

impl Drop for NatsServer {
    fn drop(&mut self) {
        self.kill9();
    }
}

/// Starts `nats-server -js` in `dir` with a watchdog, on these (client, monitoring) ports, or
/// (`-1`) on ports of its own choosing.
fn spawn(dir: &Path, ports: Option<(u16, u16)>) -> Child {
    let (port, monitor) = ports.map_or(("-1".to_string(), "-1".to_string()), |(p, m)| {
        (p.to_string(), m.to_string())
    });
    let child = Command::new(binary())
        .args(["-js", "-a", "127.0.0.1", "-p", &port, "-m", &monitor])
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
        .expect("starting nats-server");
    watchdog(child.id());
    child
}

/// Kills `pid` (SIGKILL) once this test process is gone; exits by itself when `pid` is.
fn watchdog(pid: u32) {
    let script = format!(
        "while [ -d /proc/{owner} ] && [ -d /proc/{pid} ]; do sleep 1; done; \
         [ -d /proc/{pid} ] && kill -9 {pid}; exit 0",
        owner = std::process::id(),
    );
    let mut watchdog = Command::new("sh")
        .args(["-c", &script])
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("starting the nats-server watchdog");
    // Reaped when it exits (with its server), not left a zombie for the rest of the run.
    std::thread::spawn(move || watchdog.wait());
}

/// The client and monitoring ports from the ports file `nats-server_<pid>.ports`
/// (`{"nats":["nats://…:port"],"monitoring":["http://…:port"]}`) the server writes once it
/// listens.
async fn ports_file_ports(dir: &Path, child: &mut Child) -> Result<(u16, u16), String> {
    let file = dir.join(format!("nats-server_{}.ports", child.id()));
    let port_of =
        |v: &serde_json::Value| -> Option<u16> { v[0].as_str()?.rsplit(':').next()?.parse().ok() };
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        if let Ok(text) = std::fs::read_to_string(&file) {
            if let Ok(v) = serde_json::from_str::<serde_json::Value>(&text) {
                if let (Some(p), Some(m)) = (port_of(&v["nats"]), port_of(&v["monitoring"])) {
                    return Ok((p, m));
                }
            }
        }
        if let Some(status) = child.try_wait().unwrap() {
            return Err(format!("nats-server exited before it listened: {status}"));
        }
        if Instant::now() > deadline {
            return Err(format!("nats-server never wrote {}", file.display()));
        }
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
}

/// Whether a NATS server answers on the port: its first bytes are `INFO `.
async fn greets(port: u16) -> bool {
    let Ok(Ok(mut conn)) = tokio::time::timeout(
        Duration::from_secs(2),
        tokio::net::TcpStream::connect(("127.0.0.1", port)),
    )
    .await
    else {
        return false;
    };
    let mut head = [0u8; 5];
    matches!(
        tokio::time::timeout(Duration::from_secs(2), conn.read_exact(&mut head)).await,
        Ok(Ok(_)) if &head == b"INFO "
    )
}

/// The last lines of the server's log, for a failure message.
fn log_tail(dir: &Path) -> String {
    let log = std::fs::read_to_string(dir.join("nats.log")).unwrap_or_default();
    let lines: Vec<&str> = log.lines().collect();
    format!(
        "nats.log ({}):\n{}",
        dir.join("nats.log").display(),
        lines[lines.len().saturating_sub(20)..].join("\n")
    )
}
