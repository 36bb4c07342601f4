//! The embedded MariaDB server used for MySQL projects when no `FLUXBASE_MYSQL_URL` is set.
//!
//! Like the embedded PostgreSQL ([`crate::embedded`]) it needs nothing but Debian's packages
//! (`mariadb-server`): the server runs the system's `mariadb-install-db` once and `mariadbd`
//! at each start, with the settings below on the command line (`--no-defaults`: nothing from
//! `/etc/mysql` applies). Run as root, its files belong to, and its process runs as, an
//! unprivileged user (`mysql` by default, the user Debian's package creates;
//! `FLUXBASE_MYSQL_USER` picks another).
//!
//! ```text
//!  $FLUXBASE_DATA_DIR/mariadb/     owned by the server user
//!    ├── data/                     the datadir (and binlog.NNNNNN, the change stream's source)
//!    ├── mariadbd.sock             the unix socket (only root@localhost, by unix_socket auth)
//!    ├── mariadbd.pid
//!    ├── tmp/                      its tmpdir (0700; never the machine's /tmp)
//!    └── server.log                MariaDB's own log
//! ```
//!
//! It listens on 127.0.0.1 only, on a free port chosen at each start. The server's account is
//! `fluxbase@127.0.0.1` (every privilege but FILE, with GRANT OPTION: it creates the project
//! databases and accounts; `secure_file_priv` is an empty read-only directory, `no-files/`),
//! its password derived from the instance secret and set again at every start (`--init-file`),
//! so nothing about it is stored. A watchdog stops the server when the
//! process that started it disappears (even after `kill -9`).

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, AtomicU32, Ordering};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use anyhow::{anyhow, bail, Context, Result};

/// The server's own account on the embedded server.
pub const ADMIN_USER: &str = "fluxbase";

/// Settings of every embedded server: loopback only, row-based binlog with full images and
/// metadata (the change stream reads it: column names come from `binlog_row_metadata=FULL`),
/// no files read or written for a client.
const SETTINGS: &[(&str, &str)] = &[
    ("bind-address", "127.0.0.1"),
    ("skip-name-resolve", ""),
    ("server-id", "1"),
    ("binlog-format", "ROW"),
    ("binlog-row-image", "FULL"),
    ("binlog-row-metadata", "FULL"),
    // Never expired by the server: Fluxbase purges up to the oldest position a MySQL project's
    // stream still needs, within mysql_binlog_retain_bytes/_secs (crate::mysql::retention).
    ("binlog-expire-logs-seconds", "0"),
    ("max-binlog-size", "268435456"),
    ("local-infile", "0"),
    ("max-connections", "500"),
    ("character-set-server", "utf8mb4"),
    ("collation-server", "utf8mb4_unicode_ci"),
    ("default-time-zone", "+00:00"),
    ("explicit-defaults-for-timestamp", "1"),
    ("skip-symbolic-links", ""),
    // Routines and triggers of a project's admin (its own database only) need no SUPER: the
    // binlog is row-based, so what they do is logged as rows, never replayed as statements.
    ("log-bin-trust-function-creators", "1"),
    // No MEMORY (or other engine's) table: a tenant's table lives on disk, in InnoDB, however
    // it is declared (refused with NO_ENGINE_SUBSTITUTION, the default sql_mode).
    ("enforce-storage-engine", "InnoDB"),
    // What one session may allocate (sorts, joins, internal temporary tables, user
    // variables): the query past it fails. Project sessions cannot raise it (crate::mysql::sql).
    ("max-session-mem-used", "536870912"),
];

/// The only directory `LOAD_FILE`, `LOAD DATA INFILE` and `SELECT … INTO OUTFILE` may touch
/// (`secure_file_priv`): empty, and not writable by the server (mode 0555). No account but
/// root@localhost has FILE anyway; this holds even if one had.
const NO_FILES_DIR: &str = "no-files";

/// A running embedded MariaDB.
#[derive(Debug)]
pub struct Server {
    root: PathBuf,
    bindir: Bindir,
    run_as: Option<(u32, u32)>,
    pub port: u16,
    admin_password: String,
    child: Mutex<Option<Child>>,
    pid: AtomicU32,
    /// The settings this server was started with (`extra`): every later start gets them too.
    extra: Mutex<Vec<(String, String)>>,
    /// Taken by every start after the first and by the stop, so that the supervisor
    /// ([`crate::supervise`]) and a restart never start the server twice.
    ops: Mutex<()>,
    /// Set once the server is being stopped: its supervisor lets it end.
    stopping: AtomicBool,
    /// The `mariadbd` the last watchdog watches.
    watched: AtomicU32,
    /// Whether a supervisor keeps it running (one at most).
    supervised: AtomicBool,
}

#[derive(Debug, Clone)]
struct Bindir {
    mariadbd: PathBuf,
    install_db: PathBuf,
}

impl Server {
    /// Creates the server's files under `root` if they do not exist yet, then starts it on a
    /// free loopback port. `extra` adds settings for this start only (tests relax durability).
    pub fn start(root: &Path, admin_password: &str, extra: &[(&str, &str)]) -> Result<Server> {
        let bindir = find_binaries()?;
        let (root, run_as) = SERVER_USER.prepare_root(root, "the MariaDB user")?;
        let socket = root.join("mariadbd.sock");
        if socket.as_os_str().len() > 100 {
            bail!(
                "{} is too long for a unix socket path (100 bytes): choose a shorter \
                 FLUXBASE_DATA_DIR",
                socket.display()
            );
        }
        let mut server = Server {
            root,
            bindir,
            run_as,
            port: 0,
            admin_password: admin_password.to_string(),
            child: Mutex::new(None),
            pid: AtomicU32::new(0),
            extra: Mutex::new(
                extra
                    .iter()
                    .map(|(k, v)| (k.to_string(), v.to_string()))
                    .collect(),
            ),
            ops: Mutex::new(()),
            stopping: AtomicBool::new(false),
            watched: AtomicU32::new(0),
            supervised: AtomicBool::new(false),
        };
        server.stop_leftover();
        server.make_no_files_dir()?;
        server.make_tmp_dir()?;
        if !server.data_dir().join("mysql").exists() {
            server.install()?;
        }
        server.start_server()?;
        Ok(server)
    }

    pub fn data_dir(&self) -> PathBuf {
        self.root.join("data")
    }

    pub fn log_file(&self) -> PathBuf {
        self.root.join("server.log")
    }

    /// The empty, read-only `secure_file_priv` directory (made again at each start: a file
    /// found there is removed).
    fn make_no_files_dir(&self) -> Result<()> {
        // Root's (when run as root), not the server user's: it cannot make it writable.
        crate::os_user::inside::fresh_dir(&self.root.join(NO_FILES_DIR), None, 0o555)
    }

    /// The server's own `tmpdir` (mode 0700, the server user's): never the machine's `/tmp`,
    /// where servers installed at the same moment collided on their bootstrap's temporary
    /// table names ("Unknown table 'mysql.tmp_user_sys'": 4 of 12 concurrent installs failed),
    /// and where other local users could see its temporary files.
    fn make_tmp_dir(&self) -> Result<()> {
        crate::os_user::inside::dir(&self.tmp_dir(), self.run_as, 0o700)
    }

    fn tmp_dir(&self) -> PathBuf {
        self.root.join("tmp")
    }

    /// The port, for a CLI command run beside the server ([`running_port`]); root's file.
    fn write_port(&self) -> Result<()> {
        let port = format!("{}\n", self.port);
        crate::os_user::inside::file(&self.root.join("port"), port.as_bytes(), None, 0o644)
    }

    fn pid_file(&self) -> PathBuf {
        self.root.join("mariadbd.pid")
    }

    /// The server account's URL (`mysql://fluxbase:…@127.0.0.1:<port>/`).
    pub fn admin_url(&self) -> String {
        format!(
            "mysql://{ADMIN_USER}:{}@127.0.0.1:{}/",
            self.admin_password, self.port
        )
    }

    fn command(&self, program: &Path) -> Command {
        let mut cmd = Command::new(program);
        if let Some((uid, gid)) = self.run_as {
            use std::os::unix::process::CommandExt;
            cmd.uid(uid).gid(gid);
            cmd.env("HOME", &self.root);
        }
        cmd.current_dir(&self.root);
        cmd
    }

    fn install(&self) -> Result<()> {
        tracing::info!(dir = %self.data_dir().display(), "creating the embedded MariaDB server");
        // A half-made datadir (an install that was interrupted) is made again.
        let _ = std::fs::remove_dir_all(self.data_dir());
        let out = self
            .command(&self.bindir.install_db)
            .arg("--no-defaults")
            .arg(format!("--datadir={}", self.data_dir().display()))
            .arg(format!("--tmpdir={}", self.tmp_dir().display()))
            .args(["--auth-root-authentication-method=socket", "--skip-test-db"])
            .stdin(Stdio::null())
            .output()
            .context("running mariadb-install-db")?;
        if !out.status.success() {
            bail!(
                "mariadb-install-db failed: {}{}",
                String::from_utf8_lossy(&out.stdout),
                String::from_utf8_lossy(&out.stderr)
            );
        }
        Ok(())
    }

    /// The statements run at every start (`--init-file`): the server account with the
    /// password of this instance.
    fn write_init_file(&self) -> Result<PathBuf> {
        let path = self.root.join("init.sql");
        let pw = &self.admin_password;
        if !pw.bytes().all(|b| b.is_ascii_alphanumeric()) {
            bail!("the MariaDB admin password must be alphanumeric");
        }
        let sql = format!(
            "CREATE USER IF NOT EXISTS '{ADMIN_USER}'@'127.0.0.1' IDENTIFIED BY '{pw}';\n\
             ALTER USER '{ADMIN_USER}'@'127.0.0.1' IDENTIFIED BY '{pw}';\n\
             GRANT ALL PRIVILEGES ON *.* TO '{ADMIN_USER}'@'127.0.0.1' WITH GRANT OPTION;\n\
             REVOKE FILE ON *.* FROM '{ADMIN_USER}'@'127.0.0.1';\n"
        );
        crate::os_user::inside::file(&path, sql.as_bytes(), self.run_as, 0o600)?;
        Ok(path)
    }

    fn start_server(&mut self) -> Result<()> {
        let init = self.write_init_file()?;
        let result = self.start_on_a_free_port(&init, None);
        let _ = std::fs::remove_file(&init);
        result?;
        self.spawn_watchdog()?;
        // For a CLI command run beside the server ([`running_port`]).
        self.write_port()?;
        tracing::info!(port = self.port, "embedded MariaDB is up");
        Ok(())
    }

    /// Starts `mariadbd` on `port` (when given: first), else on free ports until one holds.
    fn start_on_a_free_port(&mut self, init: &Path, port: Option<u16>) -> Result<()> {
        let mut attempt = 1;
        loop {
            self.port = match (port, attempt) {
                (Some(p), 1) => p,
                _ => crate::os_user::free_port()?,
            };
            match self.launch(init)? {
                Launch::Up => return Ok(()),
                Launch::PortTaken if attempt < PORT_ATTEMPTS => {
                    tracing::warn!(
                        port = self.port,
                        attempt,
                        "the embedded MariaDB's port was taken meanwhile; trying another"
                    );
                    attempt += 1;
                }
                Launch::PortTaken => bail!("MariaDB did not start: port {} is taken", self.port),
            }
        }
    }

    /// Starts `mariadbd` on `self.port` and waits until it is ready for connections; then it
    /// is this server's child and pid.
    fn launch(&self, init: &Path) -> Result<Launch> {
        let log_start = std::fs::symlink_metadata(self.log_file())
            .map(|m| m.len())
            .unwrap_or(0);
        let mut cmd = self.command(&self.bindir.mariadbd);
        cmd.arg("--no-defaults")
            .arg(format!("--datadir={}", self.data_dir().display()))
            .arg(format!(
                "--socket={}",
                self.root.join("mariadbd.sock").display()
            ))
            .arg(format!("--pid-file={}", self.pid_file().display()))
            .arg(format!("--tmpdir={}", self.tmp_dir().display()))
            .arg(format!("--log-error={}", self.log_file().display()))
            .arg(format!(
                "--log-bin={}",
                self.data_dir().join("binlog").display()
            ))
            .arg(format!("--init-file={}", init.display()))
            .arg(format!(
                "--secure-file-priv={}",
                self.root.join(NO_FILES_DIR).display()
            ))
            .arg(format!("--port={}", self.port));
        let extra = self.extra.lock().expect("poisoned").clone();
        for (k, v) in SETTINGS
            .iter()
            .map(|(k, v)| (*k, *v))
            .chain(extra.iter().map(|(k, v)| (k.as_str(), v.as_str())))
        {
            if v.is_empty() {
                cmd.arg(format!("--{k}"));
            } else {
                cmd.arg(format!("--{k}={v}"));
            }
        }
        {
            use std::os::unix::process::CommandExt;
            // Its own process group: a Ctrl-C meant for the server is not MariaDB's.
            cmd.process_group(0);
        }
        let mut child = cmd
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .context("starting mariadbd")?;
        let (status, log) = match wait_started(
            &mut child,
            &self.log_file(),
            log_start,
            START_QUIET,
            START_MOST,
        )? {
            Started::Ready => {
                self.pid.store(child.id(), Ordering::SeqCst);
                *self.child.lock().expect("poisoned") = Some(child);
                return Ok(Launch::Up);
            }
            Started::Exited(status, log) => (status, log),
            Started::Stalled(after) => {
                let _ = child.kill();
                let _ = child.wait();
                bail!(
                    "MariaDB did not start: nothing new in its log for {} s ({} s in all); \
                         see {}",
                    START_QUIET.as_secs().min(after.as_secs()),
                    after.as_secs(),
                    self.log_file().display()
                );
            }
        };
        if log.contains("Address already in use") || log.contains("Bind on") {
            return Ok(Launch::PortTaken);
        }
        let tail: Vec<&str> = log.lines().rev().take(15).collect();
        bail!(
            "MariaDB did not start ({status}); last lines of {}:\n{}",
            self.log_file().display(),
            tail.into_iter().rev().collect::<Vec<_>>().join("\n")
        );
    }

    /// A server an earlier process left running on this datadir (its watchdog missed it) is
    /// stopped before this one starts.
    fn stop_leftover(&self) {
        let Some(server) = server_process(&self.root) else {
            return;
        };
        tracing::warn!(
            pid = server.pid,
            "an earlier embedded MariaDB is still running; stopping it"
        );
        // SIGTERM: MariaDB's clean shutdown, to the process checked (never one that took its
        // pid since).
        if server.signal(rustix::process::Signal::TERM)
            && !server.wait_gone(Duration::from_secs(60))
        {
            tracing::warn!(
                pid = server.pid,
                "the earlier embedded MariaDB did not stop within 60 s"
            );
        }
    }

    /// Stops this server when this process is gone, however it ended.
    fn spawn_watchdog(&self) -> Result<()> {
        use crate::os_user::process::{start_time, watchdog_script};
        let owner = std::process::id();
        let pid = self.pid();
        let (Some(owner_start), Some(start)) = (start_time(owner), start_time(pid)) else {
            bail!("MariaDB (pid {pid}) ended as it started");
        };
        let script = watchdog_script((owner, owner_start), (pid, start), "TERM");
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
        let watchdog = cmd.spawn().context("starting the MariaDB watchdog")?;
        crate::os_user::process::reap_in_background(watchdog);
        self.watched.store(pid, Ordering::SeqCst);
        Ok(())
    }

    /// Stops the server (SIGTERM: a clean shutdown) and waits for it. Its supervisor, if it
    /// has one, lets it end.
    pub fn stop(&self) -> Result<()> {
        self.stopping.store(true, Ordering::SeqCst);
        let _ops = self.ops.lock().expect("poisoned");
        let child = self.child.lock().expect("poisoned").take();
        let Some(mut child) = child else {
            return Ok(());
        };
        // Our own child, not reaped yet: its pid cannot have been reused.
        terminate(self.pid());
        let deadline = Instant::now() + Duration::from_secs(60);
        loop {
            if child.try_wait()?.is_some() {
                return Ok(());
            }
            if Instant::now() > deadline {
                let _ = child.kill();
                let _ = child.wait();
                bail!("MariaDB did not stop within 60 s: killed");
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// Kills the server (`SIGKILL`, a crash: InnoDB recovers at the next start) and starts it
    /// again with `extra`, on the same port if it is still free (tests).
    pub fn crash_and_restart(&mut self, extra: &[(&str, &str)]) -> Result<()> {
        if let Some(mut child) = self.child.lock().expect("poisoned").take() {
            let _ = child.kill();
            let _ = child.wait();
        }
        *self.extra.lock().expect("poisoned") = extra
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect();
        let port = self.port;
        let init = self.write_init_file()?;
        let result = self.start_on_a_free_port(&init, Some(port));
        let _ = std::fs::remove_file(&init);
        result?;
        if self.port != port {
            tracing::warn!(
                old = port,
                new = self.port,
                "MariaDB restarted on another port"
            );
        }
        self.write_port()?;
        self.spawn_watchdog()
    }

    /// `true` the first time only: the caller starts its one supervisor.
    pub fn claim_supervision(&self) -> bool {
        !self.supervised.swap(true, Ordering::SeqCst)
    }

    /// The process id of `mariadbd`.
    pub fn pid(&self) -> u32 {
        self.pid.load(Ordering::SeqCst)
    }
}

/// How one `mariadbd` start went.
enum Launch {
    Up,
    /// It ended at once because its port was taken.
    PortTaken,
}

impl crate::supervise::Supervised for Server {
    fn name(&self) -> &'static str {
        "MariaDB"
    }

    fn process(&self) -> Option<crate::os_user::process::Held> {
        let held = {
            let mut child = self.child.lock().expect("poisoned");
            let running = child.as_mut()?;
            // Our child, not reaped while it is held here: its pid is its own.
            match running.try_wait() {
                Ok(None) => crate::os_user::process::Held::open(running.id())?,
                _ => return None,
            }
        };
        // A server whose watchdog could not be started after it came up gets one now: none
        // may outlive the Fluxbase server.
        if self.watched.load(Ordering::SeqCst) != held.pid {
            if let Err(e) = self.spawn_watchdog() {
                tracing::warn!(error = %format!("{e:#}"), "watching the embedded MariaDB");
            }
        }
        Some(held)
    }

    fn stopping(&self) -> bool {
        self.stopping.load(Ordering::SeqCst)
    }

    fn start_again(&self) -> Result<bool> {
        let _ops = self.ops.lock().expect("poisoned");
        if self.stopping() {
            return Ok(false);
        }
        {
            let mut child = self.child.lock().expect("poisoned");
            if let Some(running) = child.as_mut() {
                if running.try_wait()?.is_none() {
                    return Ok(false);
                }
            }
            // Reaped above (or never ours): forget it.
            *child = None;
        }
        // The same port only: the server's pools, the change streams' options and a CLI
        // command beside the server all name it.
        let init = self.write_init_file()?;
        let launched = self.launch(&init);
        let _ = std::fs::remove_file(&init);
        match launched? {
            Launch::Up => {}
            Launch::PortTaken => bail!("its port {} is taken", self.port),
        }
        self.spawn_watchdog()?;
        Ok(true)
    }
}

/// The port of the embedded server running under `root`, if one runs (its pid file names a
/// live `mariadbd`).
pub fn running_port(root: &Path) -> Option<u16> {
    server_pid(root)?;
    let port = crate::os_user::inside::read(&root.join("port"), 0, 16).ok()?;
    String::from_utf8_lossy(&port).trim().parse().ok()
}

/// The pid of the `mariadbd` serving the datadir under `root` (see [`server_process`]).
fn server_pid(root: &Path) -> Option<u32> {
    server_process(root).map(|p| p.pid)
}

/// The `mariadbd` serving the datadir under `root`, from its pid file: only a live `mariadbd`
/// whose command line names this datadir (the pid file is the server user's: a pid of another
/// process written there is not one to stop). Held by a pidfd opened before the command line
/// is read: the handle names the process checked, or one gone since (a signal through it then
/// fails), never a process that took the pid after the check.
pub fn server_process(root: &Path) -> Option<crate::os_user::process::Held> {
    let text = crate::os_user::inside::read(&root.join("mariadbd.pid"), 0, 32).ok()?;
    let pid: u32 = String::from_utf8_lossy(&text).trim().parse().ok()?;
    let held = crate::os_user::process::Held::open(pid)?;
    let cmdline = std::fs::read(format!("/proc/{pid}/cmdline")).ok()?;
    let mut args = cmdline.split(|b| *b == 0);
    let program = args.next()?;
    let name = program.rsplit(|b| *b == b'/').next()?;
    if !name.starts_with(b"mariadbd") && !name.starts_with(b"mysqld") {
        return None;
    }
    // The server was started with its root made absolute; a caller (the CLI) may name it
    // relative to the working directory (the default data directory is `.fluxbase`).
    let root = std::path::absolute(root).ok()?;
    let datadir = format!("--datadir={}", root.join("data").display());
    args.any(|a| a == datadir.as_bytes()).then_some(held)
}

/// The server's log from `offset` (at most 1 MiB of it: a start writes a few kB), read without
/// following a link put in its place.
/// How long a starting MariaDB may go without writing to its log before the start is given up,
/// and the longest a start may take in all. A crash recovery of a large InnoDB log writes its
/// progress every 15 s or so: it is waited for, not killed midway (which would only make the
/// next start recover again); a server that hangs silently is given up after two minutes.
const START_QUIET: Duration = Duration::from_secs(120);
const START_MOST: Duration = Duration::from_secs(3600);

/// How a start ended.
enum Started {
    /// "ready for connections" in its log.
    Ready,
    /// It exited: its status and what it logged.
    Exited(std::process::ExitStatus, String),
    /// Nothing new in its log for `quiet`, or `most` passed: how long it ran.
    Stalled(Duration),
}

/// Waits for a `mariadbd` being started to be ready (its log, from `log_start`, says so), to
/// exit, or to stall (see [`START_QUIET`]).
fn wait_started(
    child: &mut Child,
    log: &Path,
    log_start: u64,
    quiet: Duration,
    most: Duration,
) -> Result<Started> {
    let begun = Instant::now();
    let (mut size, mut grew) = (log_start, begun);
    loop {
        // Whether it exited, then its log: all it wrote before it exited is read.
        let exited = child.try_wait()?;
        let text = read_from(log, log_start);
        if text.contains("ready for connections") {
            return Ok(Started::Ready);
        }
        if let Some(status) = exited {
            return Ok(Started::Exited(status, text));
        }
        let now = std::fs::symlink_metadata(log).map_or(size, |m| m.len());
        if now != size {
            (size, grew) = (now, Instant::now());
        }
        if grew.elapsed() > quiet || begun.elapsed() > most {
            return Ok(Started::Stalled(begun.elapsed()));
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

fn read_from(path: &Path, offset: u64) -> String {
    let bytes = crate::os_user::inside::read(path, offset, 1 << 20).unwrap_or_default();
    String::from_utf8_lossy(&bytes).into_owned()
}

/// SIGTERM: MariaDB's clean shutdown.
fn terminate(pid: u32) {
    let _ = Command::new("kill")
        .args(["-TERM", &pid.to_string()])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status();
}

/// `mariadbd` and `mariadb-install-db`: `FLUXBASE_MARIADB_BINDIR` (both in it), else Debian's
/// places (`/usr/sbin`, `/usr/bin`), else `PATH`.
fn find_binaries() -> Result<Bindir> {
    let mut dirs: Vec<PathBuf> = Vec::new();
    if let Ok(dir) = std::env::var("FLUXBASE_MARIADB_BINDIR") {
        dirs.push(PathBuf::from(dir));
    } else {
        dirs.extend(
            ["/usr/sbin", "/usr/bin", "/usr/local/sbin", "/usr/local/bin"].map(PathBuf::from),
        );
        if let Some(path) = std::env::var_os("PATH") {
            dirs.extend(std::env::split_paths(&path));
        }
    }
    let find = |name: &str| dirs.iter().map(|d| d.join(name)).find(|p| p.is_file());
    match (find("mariadbd"), find("mariadb-install-db")) {
        (Some(mariadbd), Some(install_db)) => Ok(Bindir {
            mariadbd,
            install_db,
        }),
        _ => Err(anyhow!(
            "MariaDB (mariadbd, mariadb-install-db) was not found, and MySQL projects need it. \
             Install it with `apt-get install mariadb-server mariadb-client` (Debian/Ubuntu), \
             set FLUXBASE_MARIADB_BINDIR to its directory, or point FLUXBASE_MYSQL_URL at an \
             existing MySQL/MariaDB server"
        )),
    }
}

/// The unprivileged user MariaDB runs as when we are root.
const SERVER_USER: crate::os_user::ServerUser = crate::os_user::ServerUser {
    product: "MariaDB",
    env_var: "FLUXBASE_MYSQL_USER",
    default_user: "mysql",
    package: "mariadb-server",
};

/// Starts tried on fresh ports when the chosen one was taken before MariaDB bound it.
const PORT_ATTEMPTS: u32 = 5;

#[cfg(test)]
mod tests {
    use std::process::{Command, Stdio};
    use std::time::Duration;

    use super::*;

    /// A stand-in for a leftover `mariadbd`: `sh` run under that name (a link), on `datadir`.
    fn fake_server(dir: &Path, datadir: &Path) -> std::process::Child {
        let link = dir.join("mariadbd");
        let _ = std::fs::remove_file(&link);
        std::os::unix::fs::symlink("/bin/sh", &link).unwrap();
        let child = Command::new(&link)
            .args(["-c", "sleep 60; :", "mariadbd"])
            .arg(format!("--datadir={}", datadir.display()))
            .stdin(Stdio::null())
            .spawn()
            .unwrap();
        // A spawn returns once the child's exec has begun; its command line is readable a
        // moment later (the kernel sets it while loading the program).
        let deadline = std::time::Instant::now() + Duration::from_secs(10);
        while !std::fs::read(format!("/proc/{}/cmdline", child.id()))
            .unwrap_or_default()
            .windows(9)
            .any(|w| w == b"--datadir")
        {
            assert!(std::time::Instant::now() < deadline, "no command line");
            std::thread::sleep(Duration::from_millis(5));
        }
        child
    }

    /// A start that keeps writing to its log (a long crash recovery) is waited for past the
    /// quiet period; one that writes nothing for that long is given up; one that exits says
    /// so with what it logged.
    #[test]
    fn a_start_is_waited_for_while_its_log_grows_and_given_up_when_it_falls_silent() {
        let dir = std::env::temp_dir().join(format!("mariadb-start-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let log = dir.join("server.log");
        std::fs::write(&log, "an earlier start: ready for connections\n").unwrap();
        let from = std::fs::metadata(&log).unwrap().len();
        let start = |script: &str| {
            Command::new("/bin/sh")
                .args(["-c", script, "sh"])
                .arg(&log)
                .stdin(Stdio::null())
                .spawn()
                .unwrap()
        };
        let quiet = Duration::from_millis(700);
        let most = Duration::from_secs(60);
        // Progress every 300 ms for 2.4 s (past the quiet period three times over), then ready.
        let mut recovering = start(
            r#"for i in 1 2 3 4 5 6 7 8; do echo "InnoDB: recovered $i" >> "$1"; sleep 0.3; done
               echo "mariadbd: ready for connections" >> "$1"; sleep 30"#,
        );
        let begun = std::time::Instant::now();
        let started = wait_started(&mut recovering, &log, from, quiet, most).unwrap();
        assert!(matches!(started, Started::Ready), "not ready");
        assert!(
            begun.elapsed() > Duration::from_secs(2),
            "ready too early: the earlier start's line was read"
        );
        recovering.kill().unwrap();
        recovering.wait().unwrap();

        let from = std::fs::metadata(&log).unwrap().len();
        let mut silent = start(r#"echo "InnoDB: starting" >> "$1"; sleep 30"#);
        let begun = std::time::Instant::now();
        match wait_started(&mut silent, &log, from, quiet, most).unwrap() {
            Started::Stalled(after) => assert!(after >= quiet && after < Duration::from_secs(10)),
            _ => panic!("a silent start was not given up"),
        }
        assert!(begun.elapsed() < Duration::from_secs(10));
        silent.kill().unwrap();
        silent.wait().unwrap();

        let from = std::fs::metadata(&log).unwrap().len();
        let mut failing = start(r#"echo "[ERROR] Aborting" >> "$1"; exit 3"#);
        match wait_started(&mut failing, &log, from, quiet, most).unwrap() {
            Started::Exited(status, text) => {
                assert_eq!(status.code(), Some(3));
                assert_eq!(text, "[ERROR] Aborting\n");
            }
            _ => panic!("an exit was not seen"),
        }
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn a_leftover_server_is_checked_held_and_stopped_by_its_handle() {
        // Under the working directory (the crate's): found by a relative path too.
        let dir = std::env::current_dir()
            .unwrap()
            .join("target")
            .join(format!("mariadb-leftover-{}", std::process::id()));
        let root = dir.join("mariadb");
        std::fs::create_dir_all(&root).unwrap();
        let mut server = fake_server(&dir, &root.join("data"));
        std::fs::write(root.join("mariadbd.pid"), format!("{}\n", server.id())).unwrap();
        // Another datadir's server (or any other process) named by the pid file is not ours.
        let other = dir.join("other");
        std::fs::create_dir_all(&other).unwrap();
        std::fs::write(other.join("mariadbd.pid"), format!("{}\n", server.id())).unwrap();
        assert!(server_process(&other).is_none());
        std::fs::write(
            other.join("mariadbd.pid"),
            format!("{}\n", std::process::id()),
        )
        .unwrap();
        assert!(server_process(&other).is_none());

        let held = server_process(&root).expect("the server under root");
        assert_eq!(held.pid, server.id());
        // Found relative to the working directory too (the CLI's default `.fluxbase`).
        let rel = root.strip_prefix(std::env::current_dir().unwrap()).unwrap();
        assert!(rel.is_relative());
        assert!(server_process(rel).is_some());
        assert!(held.signal(rustix::process::Signal::TERM));
        assert!(
            held.wait_gone(Duration::from_secs(20)),
            "SIGTERM did not end it"
        );
        server.wait().unwrap();
        // Gone and reaped (its pid free for anyone): the handle signals nothing.
        assert!(!held.signal(rustix::process::Signal::TERM));
        assert!(held.wait_gone(Duration::from_millis(10)));
        assert!(server_process(&root).is_none());
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
