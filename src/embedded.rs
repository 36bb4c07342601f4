//! The embedded PostgreSQL cluster used when no `FLUXBASE_DATABASE_URL` is configured.
//!
//! `make run` must work on a fresh machine with nothing but Debian's PostgreSQL packages, so the
//! server runs the system's `initdb` and `pg_ctl` itself. PostgreSQL refuses to run as root and
//! these machines (like many containers) run everything as root: in that case the cluster's files
//! belong to, and its processes run as, an unprivileged system user (`postgres` by default, the
//! user Debian's packages create; `FLUXBASE_PG_USER` picks another).
//!
//! ```text
//!  $FLUXBASE_DATA_DIR/pg/          owned by the cluster user
//!    ├── data/                     PGDATA (wal_level=logical, loopback only, SCRAM passwords)
//!    └── server.log                PostgreSQL's own log
//! ```
//!
//! The cluster listens on 127.0.0.1 only, on a free port chosen at each start, with no unix socket.
//! A watchdog process stops it when the process that started it disappears (even after
//! `kill -9`), so no cluster outlives its server or test binary.

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

use anyhow::{anyhow, bail, Context, Result};

/// The superuser every embedded cluster is initialised with.
pub const SUPERUSER: &str = "fluxbase";

/// Settings applied to every embedded cluster (see the module docs for why each matters).
const SETTINGS: &[(&str, &str)] = &[
    ("listen_addresses", "'127.0.0.1'"),
    ("unix_socket_directories", "''"),
    ("wal_level", "logical"),
    ("max_replication_slots", "256"),
    ("max_wal_senders", "256"),
    ("max_connections", "300"),
    // A slot nobody reads can hold at most this much WAL; past it the slot is lost and the
    // change stream reports it loudly (see `fluxbase doctor`).
    ("max_slot_wal_keep_size", "'8GB'"),
    ("password_encryption", "'scram-sha-256'"),
    ("log_min_messages", "warning"),
    ("log_line_prefix", "'%m [%p] %q%u@%d '"),
];

/// A running embedded cluster.
#[derive(Debug)]
pub struct Cluster {
    root: PathBuf,
    bindir: PathBuf,
    run_as: Option<(u32, u32)>,
    pub port: u16,
    pub password: String,
    /// The settings this start added (`extra` of [`Cluster::start`]): every later start of
    /// this instance (a restart, the supervisor's) gets them too.
    extra: Vec<(String, String)>,
    /// Taken by every stop and start after the first, so that the supervisor
    /// ([`crate::supervise`]) and a restart never start the cluster twice.
    ops: std::sync::Mutex<()>,
    /// Set once the server stops the cluster: its supervisor lets it end.
    stopping: std::sync::atomic::AtomicBool,
    /// The postmaster the last watchdog watches.
    watched: std::sync::atomic::AtomicU32,
}

impl Cluster {
    /// Creates the cluster under `root` if it does not exist yet, then starts it on a free
    /// loopback port. `extra` adds server settings for this start only (tests use `fsync=off`).
    pub fn start(root: &Path, password: &str, extra: &[(&str, &str)]) -> Result<Cluster> {
        let bindir = find_bindir()?;
        let (root, run_as) = SERVER_USER.prepare_root(root, "the cluster user")?;
        let cluster = Cluster {
            root,
            bindir,
            run_as,
            port: 0,
            password: password.to_string(),
            extra: extra
                .iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect(),
            ops: Default::default(),
            stopping: Default::default(),
            watched: Default::default(),
        };
        if !cluster.data_dir().join("PG_VERSION").exists() {
            cluster.initdb()?;
        }
        cluster.start_server()
    }

    pub fn data_dir(&self) -> PathBuf {
        self.root.join("data")
    }

    pub fn log_file(&self) -> PathBuf {
        self.root.join("server.log")
    }

    /// A `postgres://` URL for the superuser and the given database.
    pub fn url(&self, database: &str) -> String {
        format!(
            "postgres://{SUPERUSER}:{}@127.0.0.1:{}/{database}",
            self.password, self.port
        )
    }

    fn command(&self, program: &str) -> Command {
        let mut cmd = Command::new(self.bindir.join(program));
        if let Some((uid, gid)) = self.run_as {
            use std::os::unix::process::CommandExt;
            cmd.uid(uid).gid(gid);
            cmd.env("HOME", &self.root);
        }
        cmd.current_dir(&self.root);
        cmd
    }

    /// Writes (or with `append`, appends) `contents` to `name` in the data directory, as the
    /// cluster user when there is one (mode 0600), so nothing there is done with root's rights.
    fn write_in_data_dir(&self, name: &str, contents: &[u8], append: bool) -> Result<()> {
        use std::io::Write;
        use std::os::unix::fs::OpenOptionsExt;
        let path = self.data_dir().join(name);
        let Some((uid, gid)) = self.run_as else {
            let mut file = std::fs::OpenOptions::new()
                .create(true)
                .write(true)
                .append(append)
                .truncate(!append)
                .mode(0o600)
                .open(&path)
                .with_context(|| format!("writing {}", path.display()))?;
            file.write_all(contents)?;
            return Ok(());
        };
        use std::os::unix::process::CommandExt;
        let redirect = if append { ">>" } else { ">" };
        let mut child = Command::new("/bin/sh")
            .args(["-c", &format!("umask 077 && cat {redirect} \"$1\""), "sh"])
            .arg(&path)
            .uid(uid)
            .gid(gid)
            .env("HOME", &self.root)
            .current_dir(&self.root)
            .stdin(Stdio::piped())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .context("starting sh as the cluster user")?;
        child
            .stdin
            .take()
            .context("sh's stdin")?
            .write_all(contents)?;
        let out = child.wait_with_output()?;
        if !out.status.success() {
            bail!(
                "writing {} as the cluster user: {}",
                path.display(),
                String::from_utf8_lossy(&out.stderr).trim()
            );
        }
        Ok(())
    }

    fn initdb(&self) -> Result<()> {
        tracing::info!(dir = %self.data_dir().display(), "creating the embedded PostgreSQL cluster");
        // The root and the data directory are the cluster user's: nothing there is followed
        // (crate::os_user::inside).
        let pwfile = self.root.join(".pwfile");
        crate::os_user::inside::file(&pwfile, self.password.as_bytes(), self.run_as, 0o600)?;
        let out = self
            .command("initdb")
            .arg("-D")
            .arg(self.data_dir())
            .args(["-U", SUPERUSER, "--auth=scram-sha-256", "--encoding=UTF8"])
            .args(["--locale=C.UTF-8", "--no-instructions"])
            .arg(format!("--pwfile={}", pwfile.display()))
            .stdin(Stdio::null())
            .output()
            .context("running initdb")?;
        let _ = std::fs::remove_file(&pwfile);
        if !out.status.success() {
            bail!(
                "initdb failed: {}{}",
                String::from_utf8_lossy(&out.stdout),
                String::from_utf8_lossy(&out.stderr)
            );
        }
        let mut conf = String::from("\n# Fluxbase embedded cluster\n");
        for (k, v) in SETTINGS {
            conf.push_str(&format!("{k} = {v}\n"));
        }
        // The data directory is the cluster user's, who could swap it for a link while root
        // works inside it by name (only a path's last part is protected by O_NOFOLLOW): the
        // files in it are written by the cluster user itself.
        self.write_in_data_dir("postgresql.conf", conf.as_bytes(), true)?;
        let hba = "# Fluxbase: loopback only, passwords always\n\
                   host all all 127.0.0.1/32 scram-sha-256\n\
                   host replication all 127.0.0.1/32 scram-sha-256\n";
        self.write_in_data_dir("pg_hba.conf", hba.as_bytes(), false)?;
        Ok(())
    }

    /// `pg_ctl start`'s server options: the port and this instance's settings.
    fn options(&self) -> String {
        let mut opts = format!("-p {}", self.port);
        for (k, v) in &self.extra {
            opts.push_str(&format!(" -c {k}={v}"));
        }
        opts
    }

    fn start_server(mut self) -> Result<Cluster> {
        if self.is_running() {
            tracing::warn!("an earlier embedded PostgreSQL is still running; restarting it");
            // Not `stop()`: that marks this instance stopping, and its supervisor would never
            // start it again.
            self.stop_server()?;
        }
        // PostgreSQL cannot listen on port 0 and report the port, so a free port is picked and
        // handed over; another process may take it in between. Then the start fails with
        // "Address already in use" and is tried again on a fresh port.
        let mut attempt = 1;
        loop {
            self.port = crate::os_user::free_port()?;
            let opts = self.options();
            let log_start = std::fs::metadata(self.log_file())
                .map(|m| m.len())
                .unwrap_or(0);
            let out = self
                .command("pg_ctl")
                .arg("-D")
                .arg(self.data_dir())
                .arg("-l")
                .arg(self.log_file())
                .args(["-w", "-t", "120", "-o", &opts, "start"])
                .stdin(Stdio::null())
                .output()
                .context("running pg_ctl start")?;
            if out.status.success() {
                break;
            }
            let log = crate::os_user::inside::read(&self.log_file(), log_start, 1 << 20)
                .unwrap_or_default();
            let log = String::from_utf8_lossy(&log);
            if log.contains("Address already in use") && attempt < PORT_ATTEMPTS {
                tracing::warn!(
                    port = self.port,
                    attempt,
                    "the embedded PostgreSQL's port was taken meanwhile; trying another"
                );
                attempt += 1;
                continue;
            }
            let tail: Vec<&str> = log.lines().rev().take(15).collect();
            bail!(
                "PostgreSQL did not start: {}{}\nlast lines of {}:\n{}",
                String::from_utf8_lossy(&out.stdout),
                String::from_utf8_lossy(&out.stderr),
                self.log_file().display(),
                tail.into_iter().rev().collect::<Vec<_>>().join("\n")
            );
        }
        self.spawn_watchdog()?;
        tracing::info!(port = self.port, "embedded PostgreSQL is up");
        Ok(self)
    }

    /// Stops this cluster instance when this process is gone, however it ended. The watchdog
    /// follows one postmaster: it exits when that postmaster stops, so a watchdog left from an
    /// earlier process never touches a later start of the same cluster.
    fn spawn_watchdog(&self) -> Result<()> {
        let pid_file =
            crate::os_user::inside::read(&self.data_dir().join("postmaster.pid"), 0, 4096)
                .context("reading postmaster.pid")?;
        let pid_file = String::from_utf8_lossy(&pid_file);
        let postmaster: u32 = pid_file
            .lines()
            .next()
            .and_then(|l| l.trim().parse().ok())
            .ok_or_else(|| anyhow!("postmaster.pid has no process id"))?;
        // SIGINT is PostgreSQL's fast shutdown; sent only to that postmaster (its start time
        // checked), never to a process that took its pid after it ended.
        use crate::os_user::process::{start_time, watchdog_script};
        let owner = std::process::id();
        let (Some(owner_start), Some(start)) = (start_time(owner), start_time(postmaster)) else {
            bail!("the postmaster (pid {postmaster}) is not running");
        };
        let script = watchdog_script((owner, owner_start), (postmaster, start), "INT");
        let mut cmd = Command::new("sh");
        cmd.args(["-c", &script])
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .current_dir(&self.root);
        if let Some((uid, gid)) = self.run_as {
            use std::os::unix::process::CommandExt;
            cmd.uid(uid).gid(gid);
        }
        let watchdog = cmd.spawn().context("starting the cluster watchdog")?;
        crate::os_user::process::reap_in_background(watchdog);
        self.watched
            .store(postmaster, std::sync::atomic::Ordering::SeqCst);
        Ok(())
    }

    fn is_running(&self) -> bool {
        self.command("pg_ctl")
            .arg("-D")
            .arg(self.data_dir())
            .arg("status")
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status()
            .map(|s| s.success())
            .unwrap_or(false)
    }

    /// Stops the cluster with `mode` (`fast`, or `immediate`: a crash, recovery at the next
    /// start) and starts it again on the same port.
    pub fn restart(&self, mode: &str) -> Result<()> {
        let _ops = self.ops.lock().expect("poisoned");
        let out = self
            .command("pg_ctl")
            .arg("-D")
            .arg(self.data_dir())
            .args(["-m", mode, "-w", "stop"])
            .stdin(Stdio::null())
            .output()
            .context("running pg_ctl stop")?;
        if !out.status.success() {
            bail!(
                "pg_ctl stop failed: {}",
                String::from_utf8_lossy(&out.stderr)
            );
        }
        self.start_on_its_port()
    }

    /// `pg_ctl start` on the port this instance has (the server's pools and URLs name it),
    /// then a watchdog for the new postmaster. The caller holds `ops`.
    fn start_on_its_port(&self) -> Result<()> {
        let log_start = std::fs::metadata(self.log_file())
            .map(|m| m.len())
            .unwrap_or(0);
        let out = self
            .command("pg_ctl")
            .arg("-D")
            .arg(self.data_dir())
            .arg("-l")
            .arg(self.log_file())
            .args(["-w", "-t", "120", "-o", &self.options(), "start"])
            .stdin(Stdio::null())
            .output()
            .context("running pg_ctl start")?;
        if !out.status.success() {
            // The cause is in PostgreSQL's log (the port taken, the old processes' shared
            // memory still attached), not in pg_ctl's output.
            let log = crate::os_user::inside::read(&self.log_file(), log_start, 1 << 20)
                .unwrap_or_default();
            let log = String::from_utf8_lossy(&log);
            let cause = log
                .lines()
                .rev()
                .find(|l| l.contains("FATAL") || l.contains("ERROR"))
                .unwrap_or("");
            let said = String::from_utf8_lossy(&out.stderr);
            let said: Vec<&str> = said
                .lines()
                .map(str::trim)
                .filter(|l| !l.is_empty())
                .collect();
            bail!(
                "PostgreSQL did not start: {} {}",
                said.join(" "),
                cause.trim()
            );
        }
        self.spawn_watchdog()
    }

    /// The postmaster running this cluster's data directory now, from its pid file: only a
    /// live `postgres` whose command line names this data directory (a pid file a crash left
    /// may name a process that took the pid since). Held by a pidfd opened before the command
    /// line is read, so the handle names the process checked or one gone since.
    pub fn postmaster(&self) -> Option<crate::os_user::process::Held> {
        let pid_file =
            crate::os_user::inside::read(&self.data_dir().join("postmaster.pid"), 0, 4096).ok()?;
        let pid: u32 = String::from_utf8_lossy(&pid_file)
            .lines()
            .next()?
            .trim()
            .parse()
            .ok()?;
        let held = crate::os_user::process::Held::open(pid)?;
        let cmdline = std::fs::read(format!("/proc/{pid}/cmdline")).ok()?;
        let mut args = cmdline.split(|b| *b == 0);
        let program = args.next()?;
        if !program.ends_with(b"postgres") {
            return None;
        }
        let data_dir = self.data_dir();
        let data_dir = data_dir.as_os_str().as_encoded_bytes();
        args.any(|a| a == data_dir).then_some(held)
    }

    /// Stops the cluster (fast shutdown: open sessions are rolled back). Its supervisor, if it
    /// has one, lets it end.
    pub fn stop(&self) -> Result<()> {
        self.stopping
            .store(true, std::sync::atomic::Ordering::SeqCst);
        self.stop_server()
    }

    /// `pg_ctl stop -m fast` (under `ops`).
    fn stop_server(&self) -> Result<()> {
        let _ops = self.ops.lock().expect("poisoned");
        let out = self
            .command("pg_ctl")
            .arg("-D")
            .arg(self.data_dir())
            .args(["-m", "fast", "-w", "stop"])
            .stdin(Stdio::null())
            .output()
            .context("running pg_ctl stop")?;
        if !out.status.success() && self.is_running() {
            bail!(
                "pg_ctl stop failed: {}",
                String::from_utf8_lossy(&out.stderr)
            );
        }
        Ok(())
    }
}

impl crate::supervise::Supervised for Cluster {
    fn name(&self) -> &'static str {
        "PostgreSQL"
    }

    fn process(&self) -> Option<crate::os_user::process::Held> {
        let held = self.postmaster()?;
        // A postmaster left without a watchdog (its start timed out in a long recovery, after
        // which it came up) gets one: none may outlive the server.
        if self.watched.load(std::sync::atomic::Ordering::SeqCst) != held.pid {
            if let Err(e) = self.spawn_watchdog() {
                tracing::warn!(error = %format!("{e:#}"), "watching the embedded PostgreSQL");
            }
        }
        Some(held)
    }

    fn ended(&self, postmaster: &crate::os_user::process::Held) {
        postmaster.reap();
    }

    fn stopping(&self) -> bool {
        self.stopping.load(std::sync::atomic::Ordering::SeqCst)
    }

    fn start_again(&self) -> Result<bool> {
        let _ops = self.ops.lock().expect("poisoned");
        if self.stopping() || self.postmaster().is_some() {
            return Ok(false);
        }
        self.start_on_its_port()?;
        Ok(true)
    }
}

/// The directory holding `initdb` and `pg_ctl`: `FLUXBASE_PG_BINDIR`, else the newest
/// `/usr/lib/postgresql/<version>/bin` (Debian's layout), else `pg_config --bindir`.
pub fn find_bindir() -> Result<PathBuf> {
    if let Ok(dir) = std::env::var("FLUXBASE_PG_BINDIR") {
        return Ok(PathBuf::from(dir));
    }
    let mut versions: Vec<(u32, PathBuf)> = std::fs::read_dir("/usr/lib/postgresql")
        .into_iter()
        .flatten()
        .flatten()
        .filter_map(|e| {
            let v = e.file_name().to_str()?.parse::<u32>().ok()?;
            let bin = e.path().join("bin");
            bin.join("initdb").exists().then_some((v, bin))
        })
        .collect();
    versions.sort();
    if let Some((_, bin)) = versions.pop() {
        return Ok(bin);
    }
    if let Ok(out) = Command::new("pg_config").arg("--bindir").output() {
        let dir = PathBuf::from(String::from_utf8_lossy(&out.stdout).trim());
        if out.status.success() && dir.join("initdb").exists() {
            return Ok(dir);
        }
    }
    Err(anyhow!(
        "PostgreSQL server binaries (initdb, pg_ctl) were not found. Install them with \
         `apt-get install postgresql` (Debian/Ubuntu), set FLUXBASE_PG_BINDIR to their directory, \
         or point FLUXBASE_DATABASE_URL at an existing cluster"
    ))
}

/// The unprivileged user PostgreSQL runs as when we are root.
const SERVER_USER: crate::os_user::ServerUser = crate::os_user::ServerUser {
    product: "PostgreSQL",
    env_var: "FLUXBASE_PG_USER",
    default_user: "postgres",
    package: "postgresql",
};

/// Starts tried on fresh ports when the chosen one was taken before PostgreSQL bound it.
const PORT_ATTEMPTS: u32 = 5;

/// The lock file of a data directory: `$FLUXBASE_DATA_DIR/fluxbase.lock`.
///
/// `fluxbase serve` holds an exclusive `flock` on it for its whole lifetime, so a second `serve`
/// on the same directory refuses to start. A CLI command that finds no server holds it while it
/// runs the embedded cluster itself (so a `serve` started meanwhile waits instead of racing it);
/// one that finds a server uses that server's cluster, whose port the server records in the
/// file, and never stops or restarts it. The lock belongs to the open file: it is released when
/// the process ends, however it ends (the file itself stays).
pub struct DataDirLock {
    file: std::fs::File,
    info: LockInfo,
}

/// What the holder of a data directory's lock wrote in it.
#[derive(Clone, Debug, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct LockInfo {
    pub pid: u32,
    /// `serve`, or the CLI command holding it.
    pub role: String,
    /// The embedded cluster's port, once it is up; `None` with an external database.
    pub pg_port: Option<u16>,
    /// The server uses `FLUXBASE_DATABASE_URL`, not the embedded cluster.
    #[serde(default)]
    pub external: bool,
}

/// How a CLI command reaches the cluster of a data directory.
pub enum CliCluster {
    /// No server runs: the command starts (and stops) the embedded cluster, holding the lock.
    Own(DataDirLock),
    /// A server runs: use its embedded cluster at this port; never stop it.
    Attach { pid: u32, port: u16 },
}

impl DataDirLock {
    pub fn path(data_dir: &Path) -> PathBuf {
        data_dir.join("fluxbase.lock")
    }

    fn open(data_dir: &Path) -> Result<std::fs::File> {
        std::fs::create_dir_all(data_dir)
            .with_context(|| format!("creating {}", data_dir.display()))?;
        let path = Self::path(data_dir);
        use std::os::unix::fs::OpenOptionsExt;
        std::fs::OpenOptions::new()
            .mode(0o600)
            .read(true)
            .write(true)
            .create(true)
            .truncate(false)
            .open(&path)
            .with_context(|| format!("opening {}", path.display()))
    }

    /// Takes the lock if it is free; otherwise says who holds it (as soon as the holder has
    /// written its name, which it does right after locking).
    pub fn try_acquire(data_dir: &Path, role: &str) -> Result<std::result::Result<Self, LockInfo>> {
        use rustix::fs::{flock, FlockOperation};
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
        loop {
            let file = Self::open(data_dir)?;
            match flock(&file, FlockOperation::NonBlockingLockExclusive) {
                Ok(()) => {
                    let mut lock = DataDirLock {
                        file,
                        info: LockInfo {
                            pid: std::process::id(),
                            role: role.to_string(),
                            pg_port: None,
                            external: false,
                        },
                    };
                    lock.write()?;
                    return Ok(Ok(lock));
                }
                Err(rustix::io::Errno::WOULDBLOCK) => {
                    if let Some(info) = Self::holder(data_dir) {
                        return Ok(Err(info));
                    }
                    if std::time::Instant::now() > deadline {
                        bail!(
                            "{} is locked by a process that wrote nothing in it",
                            Self::path(data_dir).display()
                        );
                    }
                    std::thread::sleep(std::time::Duration::from_millis(50));
                }
                Err(e) => return Err(anyhow!("locking {}: {e}", Self::path(data_dir).display())),
            }
        }
    }

    /// Waits until the lock is free, then takes it.
    pub fn acquire_blocking(data_dir: &Path, role: &str) -> Result<Self> {
        use rustix::fs::{flock, FlockOperation};
        let file = Self::open(data_dir)?;
        flock(&file, FlockOperation::LockExclusive)
            .map_err(|e| anyhow!("locking {}: {e}", Self::path(data_dir).display()))?;
        let mut lock = DataDirLock {
            file,
            info: LockInfo {
                pid: std::process::id(),
                role: role.to_string(),
                pg_port: None,
                external: false,
            },
        };
        lock.write()?;
        Ok(lock)
    }

    /// What the current holder wrote, if anything (a holder that has just locked may not have
    /// written yet).
    pub fn holder(data_dir: &Path) -> Option<LockInfo> {
        let text = std::fs::read_to_string(Self::path(data_dir)).ok()?;
        serde_json::from_str(text.trim()).ok()
    }

    /// The lock for `fluxbase serve`: refuses when another server holds the directory, waits
    /// for a CLI command that holds it.
    pub fn for_serve(data_dir: &Path) -> Result<Self> {
        match Self::try_acquire(data_dir, "serve")? {
            Ok(lock) => Ok(lock),
            Err(holder) if holder.role == "serve" => bail!(
                "another `fluxbase serve` (pid {}) is already running on the data directory {}: \
                 stop it first, or give this server its own FLUXBASE_DATA_DIR",
                holder.pid,
                data_dir.display()
            ),
            Err(holder) => {
                tracing::warn!(
                    pid = holder.pid,
                    command = %holder.role,
                    "a fluxbase command is using the data directory; waiting for it to finish"
                );
                Self::acquire_blocking(data_dir, "serve")
            }
        }
    }

    /// How the CLI command `role` reaches the embedded cluster of `data_dir`.
    pub fn for_cli(data_dir: &Path, role: &str) -> Result<CliCluster> {
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(180);
        loop {
            match Self::try_acquire(data_dir, role)? {
                Ok(lock) => return Ok(CliCluster::Own(lock)),
                Err(holder) if holder.role == "serve" && holder.external => bail!(
                    "the server running on {} (pid {}) uses FLUXBASE_DATABASE_URL: run this \
                     command with the same FLUXBASE_DATABASE_URL",
                    data_dir.display(),
                    holder.pid
                ),
                Err(holder) if holder.role == "serve" => match holder.pg_port {
                    Some(port) => {
                        return Ok(CliCluster::Attach {
                            pid: holder.pid,
                            port,
                        })
                    }
                    // The server is still starting its cluster.
                    None => {
                        if std::time::Instant::now() > deadline {
                            bail!(
                                "the server on {} (pid {}) has not started its database yet",
                                data_dir.display(),
                                holder.pid
                            );
                        }
                        std::thread::sleep(std::time::Duration::from_millis(200));
                    }
                },
                Err(holder) => {
                    tracing::warn!(
                        pid = holder.pid,
                        command = %holder.role,
                        "another fluxbase command is using the data directory; waiting for it"
                    );
                    return Ok(CliCluster::Own(Self::acquire_blocking(data_dir, role)?));
                }
            }
        }
    }

    /// Records where the holder's embedded cluster listens (or that it uses an external one).
    pub fn record_cluster(&mut self, pg_port: Option<u16>) -> Result<()> {
        self.info.external = pg_port.is_none();
        self.info.pg_port = pg_port;
        self.write()
    }

    fn write(&mut self) -> Result<()> {
        use std::io::{Seek, Write};
        let text = serde_json::to_string(&self.info)? + "\n";
        self.file.set_len(0)?;
        self.file.seek(std::io::SeekFrom::Start(0))?;
        self.file.write_all(text.as_bytes())?;
        self.file.sync_data()?;
        Ok(())
    }
}

/// The superuser URL of the embedded cluster listening on `port` (a running server's).
pub fn url_at(port: u16, password: &str, database: &str) -> String {
    format!("postgres://{SUPERUSER}:{password}@127.0.0.1:{port}/{database}")
}

#[cfg(test)]
mod tests {
    use super::*;

    fn scratch() -> PathBuf {
        let dir = std::env::temp_dir().join(format!(
            "fluxbase-lock-{}-{}",
            std::process::id(),
            crate::secrets::random_hex::<6>()
        ));
        std::fs::create_dir_all(&dir).unwrap();
        dir
    }

    #[test]
    fn a_second_serve_is_refused_naming_the_first() {
        let dir = scratch();
        let mut first = DataDirLock::for_serve(&dir).unwrap();
        first.record_cluster(Some(5555)).unwrap();
        let err = DataDirLock::for_serve(&dir).err().unwrap().to_string();
        assert!(
            err.contains("already running") && err.contains(&format!("pid {}", std::process::id())),
            "{err}"
        );
        // A CLI command uses the server's cluster instead of starting one.
        match DataDirLock::for_cli(&dir, "project").unwrap() {
            CliCluster::Attach { port, .. } => assert_eq!(port, 5555),
            CliCluster::Own(_) => panic!("the CLI took the lock of a running server"),
        }
        drop(first);
        // Released with its holder: the next one gets it.
        let again = DataDirLock::for_serve(&dir).unwrap();
        drop(again);
        match DataDirLock::for_cli(&dir, "init").unwrap() {
            CliCluster::Own(lock) => assert_eq!(
                DataDirLock::holder(&dir).unwrap().role,
                "init",
                "{:?}",
                lock.info
            ),
            CliCluster::Attach { .. } => panic!("no server holds the directory"),
        }
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[test]
    fn a_server_on_an_external_database_sends_cli_commands_there() {
        let dir = scratch();
        let mut serve = DataDirLock::for_serve(&dir).unwrap();
        serve.record_cluster(None).unwrap();
        let err = match DataDirLock::for_cli(&dir, "doctor") {
            Err(e) => e.to_string(),
            Ok(_) => panic!("attached to no cluster"),
        };
        assert!(err.contains("FLUXBASE_DATABASE_URL"), "{err}");
        drop(serve);
        let _ = std::fs::remove_dir_all(&dir);
    }
}
