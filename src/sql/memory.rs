//! The memory of the tenants' PostgreSQL backends, bounded from outside PostgreSQL.
//!
//! Nothing inside PostgreSQL can stop a tenant from raising its own memory: `work_mem`,
//! `hash_mem_multiplier`, `maintenance_work_mem`, `max_parallel_workers_per_gather` are
//! `USERSET` (any role may `SET` them, in a script, a routine's `SET` clause or `set_config()`),
//! so one read key can drive a backend to gigabytes, and a few projects' connections together to
//! the kernel's OOM killer, which takes the whole cluster down (the control database too). So the
//! server watches the backends of the cluster it serves, from the operating system's side:
//!
//! ```text
//!  every CHECK_EVERY (200 ms):
//!   /proc/<postmaster>/task/<postmaster>/children ──► each backend's /proc/<pid>/statm
//!     private memory (resident − shared: work_mem, hash tables, sorts; not shared_buffers)
//!     + the dynamic shared memory segments it maps (/proc/<pid>/maps, read only while
//!       /dev/shm holds large PostgreSQL.* segments: a parallel hash join's table), counted
//!       once for a leader and its workers
//!   ≥ NOTICE_FLOOR: its process title names it (`postgres: <user> <database> …`, or `parallel
//!     worker for PID <leader>`, counted with its leader)
//!   a tenant's backend (role fx_<id>_read|readwrite|owner in database fx_<id>) whose memory,
//!     with its parallel workers', passes `sql_backend_memory_limit_mb`, or the largest of the
//!     project holding the most while all tenants' together pass `sql_backends_memory_total_mb`:
//!       pg_terminate_backend(pid) (its workers end with it, its memory goes back at once)
//!  the request on it answers SQL_EXEC_ERROR 53200 naming the limit (not 503)
//! ```
//!
//! The server's own roles' sessions, the walsenders and PostgreSQL's auxiliary processes are
//! never touched, nor backends of projects this server's control database does not hold
//! (another deployment's on a shared cluster: its own watch judges them by its own limits).
//! The watch needs the cluster's processes on this host (the embedded cluster, or
//! `database_url` on the same machine and PID namespace): it finds them from its own session's
//! backend (its process title must name the server's user and control database), and says so
//! in the log when it cannot (a remote cluster: bound memory there with the
//! cluster's own means, e.g. a cgroup). `fluxbase doctor` reports it too.
//!
//! A second task reads the cluster's one shared lock table every second (`pg_lock_status()`
//! and `pg_stat_get_activity()`, which take no lock themselves and need no process of the
//! cluster on this host): a tenant's backend holding more than `sql_backend_locks_limit`
//! entries, or the largest holder of the account holding the most while tenants together hold
//! half the table, is ended the same way ([`Measure::Locks`], [`BackendMemory::watch_locks`]).
//!
//! Sampling bounds a backend to its limit plus what it allocates in one period (a sort touching
//! memory at ~2 GB/s adds ~400 MB): the limits are set well below what the machine has.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use crate::db::ClusterTarget;
use crate::metrics::Metrics;

/// How often the backends' memory is read.
const CHECK_EVERY: Duration = Duration::from_millis(200);
/// Backends with less private memory than this are not looked at further (an idle backend holds
/// 2–10 MiB; reading every title each period would cost more than the sums it changes).
const NOTICE_FLOOR: u64 = 32 << 20;
/// How long a backend ended for memory is remembered for its request's answer (its pid may be
/// given to another backend later).
const REMEMBER: Duration = Duration::from_secs(60);
/// A backend already sent its end is not judged again for this long: a large backend can take
/// more than one period to exit (it frees its memory first), and ending it twice would count
/// twice (seen under load: the metric said 2 for one backend).
const ENDING: Duration = Duration::from_secs(10);
/// How often the watch tries again to find the cluster's processes when it could not.
const LOCATE_AGAIN: Duration = Duration::from_secs(60);
/// How often the shared lock table is read.
const LOCKS_EVERY: Duration = Duration::from_secs(1);
/// Backends holding fewer entries of the shared table than this are not counted (every
/// statement holds a few, mostly in its fast-path slots, which are not the shared table's).
const LOCKS_FLOOR: i64 = 16;

/// Where the watch stands, for `fluxbase doctor` and the log.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Watch {
    /// Not started, or both limits are 0.
    Off,
    /// Watching the children of this postmaster.
    Watching { postmaster: u32 },
    /// The cluster's processes are not visible from here.
    Blind(String),
}

/// The limits, the backends ended for memory, and the watch's state.
pub struct BackendMemory {
    per_backend: u64,
    total: u64,
    /// `sql_backend_locks_limit` (0: the lock table is not watched).
    locks_per_backend: u64,
    ended: Mutex<HashMap<i32, (Instant, String)>>,
    /// Backends sent their end, by pid, and when (see [`ENDING`]).
    ending: Mutex<HashMap<u32, Instant>>,
    watch: Mutex<Watch>,
    metrics: Arc<Metrics>,
}

impl BackendMemory {
    /// `per_backend_mb`, `total_mb`: `sql_backend_memory_limit_mb`,
    /// `sql_backends_memory_total_mb` (0: half of the machine's memory); both 0 turns it off.
    /// `locks`: `sql_backend_locks_limit` (0: the shared lock table is not watched).
    pub fn new(
        per_backend_mb: u64,
        total_mb: u64,
        locks: u64,
        metrics: Arc<Metrics>,
    ) -> Arc<BackendMemory> {
        let total = if total_mb == 0 {
            machine_memory().map_or(0, |m| m / 2)
        } else {
            total_mb << 20
        };
        Arc::new(BackendMemory {
            per_backend: per_backend_mb << 20,
            total,
            locks_per_backend: locks,
            ended: Mutex::new(HashMap::new()),
            ending: Mutex::new(HashMap::new()),
            watch: Mutex::new(Watch::Off),
            metrics,
        })
    }

    pub fn watch(&self) -> Watch {
        self.watch.lock().expect("poisoned").clone()
    }

    /// The answer's message when `pid`'s backend was ended for memory (taken: said once).
    pub fn ended_for_memory(&self, pid: i32) -> Option<String> {
        let mut ended = self.ended.lock().expect("poisoned");
        ended.retain(|_, (at, _)| at.elapsed() < REMEMBER);
        ended.remove(&pid).map(|(_, why)| why)
    }

    /// Starts the watch over `cluster`'s backends (a task for the server's life), and the
    /// shared lock table's (another, which needs no process of the cluster on this host).
    pub fn start(self: &Arc<Self>, cluster: &ClusterTarget) {
        if self.locks_per_backend > 0 {
            let weak = Arc::downgrade(self);
            let cluster = cluster.clone();
            tokio::spawn(async move {
                let Ok(pool) = crate::db::control_pool(&cluster, 1) else {
                    return;
                };
                let mut names = Names::default();
                let mut size = 0;
                let mut tick = tokio::time::interval(LOCKS_EVERY);
                tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
                loop {
                    tick.tick().await;
                    let Some(me) = weak.upgrade() else { return };
                    if size == 0 {
                        size = lock_table_size(&pool).await;
                    }
                    me.watch_locks(&pool, size, &mut names).await;
                }
            });
        }
        if self.per_backend == 0 && self.total == 0 {
            return;
        }
        let weak = Arc::downgrade(self);
        let cluster = cluster.clone();
        tokio::spawn(async move {
            let Ok(pool) = crate::db::control_pool(&cluster, 1) else {
                return;
            };
            loop {
                let Some(me) = weak.upgrade() else { return };
                let located = locate(&pool, &cluster).await;
                let postmaster = match located {
                    Ok(pm) => pm,
                    Err(why) => {
                        me.blind(why);
                        drop(me);
                        tokio::time::sleep(LOCATE_AGAIN).await;
                        continue;
                    }
                };
                *me.watch.lock().expect("poisoned") = Watch::Watching { postmaster };
                tracing::info!(
                    postmaster,
                    per_backend_mb = me.per_backend >> 20,
                    total_mb = me.total >> 20,
                    "watching tenant backends' memory"
                );
                drop(me);
                let mut tick = tokio::time::interval(CHECK_EVERY);
                tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
                loop {
                    tick.tick().await;
                    let Some(me) = weak.upgrade() else { return };
                    let (limits, floor) = ((me.per_backend, me.total), NOTICE_FLOOR);
                    let scan = tokio::task::spawn_blocking(move || scan(postmaster, floor)).await;
                    match scan {
                        Ok(Some(mut backends)) => {
                            me.not_ending(&mut backends);
                            let over_one =
                                limits.0 > 0 && backends.iter().any(|b| b.amount > limits.0);
                            let sum: u64 = backends.iter().map(|b| b.amount).sum();
                            let over_total = limits.1 > 0 && sum > limits.1;
                            if !over_one && !over_total {
                                continue;
                            }
                            // Only this deployment's projects: another server's tenants on a
                            // shared cluster are its watch's to judge, by its own limits. Their
                            // accounts come with them (past the total the choice is by account).
                            let accounts = keep_own(&pool, &mut backends).await;
                            for (backend, why) in over_limits(
                                &backends,
                                limits.0,
                                limits.1,
                                &accounts,
                                Measure::Memory,
                            ) {
                                me.end(&pool, backend, why, Measure::Memory).await;
                            }
                        }
                        // The postmaster is gone (a restart): find the new one.
                        Ok(None) => break,
                        Err(_) => {}
                    }
                }
            }
        });
    }

    fn blind(&self, why: String) {
        let mut w = self.watch.lock().expect("poisoned");
        if *w != Watch::Blind(why.clone()) {
            tracing::warn!(
                reason = %why,
                "tenant backends' memory is not watched: the cluster's processes are not visible from this server"
            );
            *w = Watch::Blind(why);
        }
    }

    /// Leaves out of `backends` those sent their end less than [`ENDING`] ago.
    fn not_ending(&self, backends: &mut Vec<Backend>) {
        let mut ending = self.ending.lock().expect("poisoned");
        ending.retain(|_, at| at.elapsed() < ENDING);
        backends.retain(|b| !ending.contains_key(&b.pid));
    }

    /// The shared lock table (`size` entries; 0: unknown): a tenant's backend holding more than
    /// `sql_backend_locks_limit` entries (at most a quarter of the table), or, while tenants'
    /// backends together hold more than half the table, the largest holder of the account
    /// holding the most, is ended. Every database of the cluster shares the one table; full,
    /// every tenant's DDL, new projects and the server's own logins fail with 53200 "out of
    /// shared memory" (red team rt15: filled in ~5 s from one statement, held for its 30 s).
    /// Read with `pg_lock_status()` and `pg_stat_get_activity()` (functions: no lock of their
    /// own, so they work on a full table; no process of the cluster need be on this host),
    /// parallel workers' entries counted with their leader's, fast-path ones not (they are not
    /// the table's); role and database names from `names`, read while the table has room.
    async fn watch_locks(&self, pool: &deadpool_postgres::Pool, size: u64, names: &mut Names) {
        let Ok(c) = pool.get().await else { return };
        let Ok(rows) = c
            .query(
                "SELECT coalesce(a.leader_pid, l.pid), a.usesysid::int8, a.datid::int8, count(*)
                 FROM pg_catalog.pg_lock_status() l
                 JOIN pg_catalog.pg_stat_get_activity(NULL) a ON a.pid = l.pid
                 WHERE NOT l.fastpath
                 GROUP BY 1, 2, 3 HAVING count(*) >= $1",
                &[&LOCKS_FLOOR],
            )
            .await
        else {
            return;
        };
        let held: Vec<(i32, i64, i64, i64)> = rows
            .iter()
            .map(|r| (r.get(0), r.get(1), r.get(2), r.get(3)))
            .collect();
        if held.iter().any(|&(_, role, db, _)| !names.knows(role, db)) {
            names.read(&c).await;
        }
        drop(c);
        let mut backends: Vec<Backend> = held
            .into_iter()
            .filter_map(|(pid, role, db, n)| {
                let (user, database) = names.of(role, db)?;
                let (project, role) = tenant(user, database)?;
                Some(Backend {
                    pid: u32::try_from(pid).ok()?,
                    project: project.to_string(),
                    role: role.to_string(),
                    amount: u64::try_from(n).ok()?,
                })
            })
            .collect();
        self.not_ending(&mut backends);
        let per_backend = match size {
            0 => self.locks_per_backend,
            size => self.locks_per_backend.min(size / 4),
        };
        let total = size / 2;
        let over_one = backends.iter().any(|b| b.amount > per_backend);
        let over_total = total > 0 && backends.iter().map(|b| b.amount).sum::<u64>() > total;
        if !over_one && !over_total {
            return;
        }
        let accounts = keep_own(pool, &mut backends).await;
        for (backend, why) in over_limits(&backends, per_backend, total, &accounts, Measure::Locks)
        {
            self.end(pool, backend, why, Measure::Locks).await;
        }
    }

    /// Ends a tenant's backend over a limit.
    async fn end(&self, pool: &deadpool_postgres::Pool, b: Backend, why: String, what: Measure) {
        self.ending
            .lock()
            .expect("poisoned")
            .insert(b.pid, Instant::now());
        // Remembered before it ends, so its request's answer finds the reason.
        self.ended
            .lock()
            .expect("poisoned")
            .insert(b.pid as i32, (Instant::now(), why.clone()));
        let by_sql = async {
            let client = pool.get().await.map_err(|e| e.to_string())?;
            client
                .query_one(
                    "SELECT pg_catalog.pg_terminate_backend($1)",
                    &[&(b.pid as i32)],
                )
                .await
                .map_err(|e| e.to_string())?;
            Ok::<_, String>(())
        }
        .await;
        // On a full lock table `pg_terminate_backend` itself fails (its role check reads a
        // shared catalog, whose lock needs the table: red team rt16), and so does a new
        // connection: the backend is then sent SIGTERM directly, which is all the function
        // does, when it is on this host and still the same tenant's backend.
        let ended = by_sql.or_else(|e| match signal_backend(&b) {
            Ok(()) => Ok(()),
            Err(why_not) => Err(format!("{e}; {why_not}")),
        });
        match ended {
            Ok(()) => {
                let counter = match what {
                    Measure::Memory => &self.metrics.sql_backends_ended_for_memory,
                    Measure::Locks => &self.metrics.sql_backends_ended_for_locks,
                };
                counter.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                tracing::warn!(
                    project_id = %b.project,
                    role = %b.role,
                    pid = b.pid,
                    held = %what.amount(b.amount),
                    "ended a tenant backend: {why}"
                );
            }
            Err(e) => {
                // Judged again at the next look, not left alone for `ENDING`.
                self.ending.lock().expect("poisoned").remove(&b.pid);
                self.ended.lock().expect("poisoned").remove(&(b.pid as i32));
                tracing::warn!(error = %e, pid = b.pid, "ending a backend over its {} limit", what.name())
            }
        }
    }
}

/// Sends SIGTERM to `b`'s process (what `pg_terminate_backend` does) if this host shows it as
/// that tenant's backend still (its process title names the role and database: a pid given
/// to another process since is left alone).
fn signal_backend(b: &Backend) -> Result<(), String> {
    let cmdline = std::fs::read(format!("/proc/{}/cmdline", b.pid))
        .map_err(|e| format!("process {} not visible: {e}", b.pid))?;
    let same = matches!(parse_title(&cmdline), Some(Title::Backend { user, database })
        if tenant(user, database) == Some((b.project.as_str(), b.role.as_str())));
    if !same {
        return Err(format!("process {} is not that backend", b.pid));
    }
    let pid = rustix::process::Pid::from_raw(b.pid as i32).ok_or("pid 0")?;
    rustix::process::kill_process(pid, rustix::process::Signal::TERM)
        .map_err(|e| format!("SIGTERM: {e}"))
}

/// What a watch counts of a backend ([`Backend::amount`]).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Measure {
    /// Private memory, bytes.
    Memory,
    /// Entries of the shared lock table.
    Locks,
}

impl Measure {
    fn name(self) -> &'static str {
        match self {
            Measure::Memory => "memory",
            Measure::Locks => "locks",
        }
    }

    fn amount(self, n: u64) -> String {
        match self {
            Measure::Memory => format!("{} MiB", n >> 20),
            Measure::Locks => format!("{n} locks"),
        }
    }

    /// Why a backend over its own limit was ended.
    fn over_one(self, limit: u64) -> String {
        match self {
            Measure::Memory => format!(
                "the statement used more than {} MiB of memory (sql_backend_memory_limit_mb); lower work_mem or hash_mem_multiplier, or process less at a time",
                limit >> 20
            ),
            Measure::Locks => format!(
                "the statement held more than {limit} entries of the cluster's shared lock table (sql_backend_locks_limit): each table, partition or subtransaction's row writes hold one until the statement ends; touch fewer at a time"
            ),
        }
    }

    /// Why the largest backend of the heaviest account was ended past the total.
    fn over_total(self, total: u64) -> String {
        match self {
            Measure::Memory => format!(
                "the statement was the largest of the account holding the most memory (its projects together) when the tenants' statements together used more than {} MiB (sql_backends_memory_total_mb); retry, or process less at a time",
                total >> 20
            ),
            Measure::Locks => format!(
                "the statement held the most locks of the account holding the most (its projects together) when the tenants' statements together held more than {total} entries, half the cluster's shared lock table; retry, or touch fewer tables at a time"
            ),
        }
    }
}

/// Role and database names by oid, for the lock watch: read again when an oid is unknown
/// (a new project), which works while the table has room (the catalogs they come from are
/// shared ones, whose locks need the table); what was read stays for when it has none.
#[derive(Default)]
struct Names {
    roles: HashMap<i64, String>,
    databases: HashMap<i64, String>,
}

impl Names {
    fn knows(&self, role: i64, db: i64) -> bool {
        self.roles.contains_key(&role) && self.databases.contains_key(&db)
    }

    fn of(&self, role: i64, db: i64) -> Option<(&str, &str)> {
        Some((self.roles.get(&role)?, self.databases.get(&db)?))
    }

    async fn read(&mut self, c: &deadpool_postgres::Client) {
        if let Ok(rows) = c
            .query(
                "SELECT oid::int8, rolname::text FROM pg_catalog.pg_roles",
                &[],
            )
            .await
        {
            self.roles = rows.iter().map(|r| (r.get(0), r.get(1))).collect();
        }
        if let Ok(rows) = c
            .query(
                "SELECT oid::int8, datname::text FROM pg_catalog.pg_database",
                &[],
            )
            .await
        {
            self.databases = rows.iter().map(|r| (r.get(0), r.get(1))).collect();
        }
    }
}

/// The shared lock table's size: `max_locks_per_transaction` × (`max_connections` +
/// `max_prepared_transactions`), 0 when the settings cannot be read.
async fn lock_table_size(pool: &deadpool_postgres::Pool) -> u64 {
    let size = async {
        let c = pool.get().await.ok()?;
        let row = c
            .query_one(
                "SELECT (current_setting('max_locks_per_transaction')::int8
                         * (current_setting('max_connections')::int8
                            + current_setting('max_prepared_transactions')::int8))",
                &[],
            )
            .await
            .ok()?;
        u64::try_from(row.get::<_, i64>(0)).ok()
    }
    .await;
    size.unwrap_or(0)
}

/// The machine's memory (`MemTotal`), bytes.
fn machine_memory() -> Option<u64> {
    let text = std::fs::read_to_string("/proc/meminfo").ok()?;
    let line = text.lines().find(|l| l.starts_with("MemTotal:"))?;
    let kb: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kb << 10)
}

/// The postmaster of the cluster `pool` reaches, if its processes are visible here.
async fn locate(pool: &deadpool_postgres::Pool, cluster: &ClusterTarget) -> Result<u32, String> {
    let client = pool.get().await.map_err(|e| e.to_string())?;
    visible_postmaster(&client, cluster).await
}

/// The postmaster of `client`'s cluster, if this host sees its processes: `client`'s own backend
/// must be a process here whose title names `cluster`'s user and control database (not merely a
/// process with the same pid: another host's or PID namespace's). Also `fluxbase doctor`'s check.
pub async fn visible_postmaster(
    client: &tokio_postgres::Client,
    cluster: &ClusterTarget,
) -> Result<u32, String> {
    let row = client
        .query_one(
            "SELECT pg_catalog.pg_backend_pid(), current_database()",
            &[],
        )
        .await
        .map_err(|e| e.to_string())?;
    let (pid, database): (i32, String) = (row.get(0), row.get(1));
    let pid = u32::try_from(pid).map_err(|_| format!("backend pid {pid}"))?;
    let title = std::fs::read(format!("/proc/{pid}/cmdline"))
        .map_err(|e| format!("no process {pid} on this host ({e})"))?;
    match parse_title(&title) {
        Some(Title::Backend { user, database: db }) if user == cluster.admin_user && db == database => {}
        _ => {
            return Err(format!(
                "process {pid} on this host is not this server's session (the cluster runs on another host or in another PID namespace, or update_process_title is off)"
            ))
        }
    }
    parent(pid).ok_or_else(|| format!("no parent of process {pid}"))
}

fn parent(pid: u32) -> Option<u32> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // `pid (comm) state ppid …`: comm may hold spaces and parentheses; it ends at the last ')'.
    let rest = &stat[stat.rfind(')')? + 1..];
    rest.split_whitespace().nth(1)?.parse().ok()
}

/// What a backend's process title says of it.
#[derive(Debug, PartialEq, Eq)]
enum Title<'a> {
    Backend { user: &'a str, database: &'a str },
    ParallelWorker { leader: u32 },
    Other,
}

/// `postgres: [cluster_name: ]<user> <database> <host> <activity>`, or `postgres:
/// [cluster_name: ]parallel worker for PID <leader>`; auxiliary processes and walsenders are
/// [`Title::Other`].
fn parse_title(cmdline: &[u8]) -> Option<Title<'_>> {
    let end = cmdline
        .iter()
        .position(|&b| b == 0)
        .unwrap_or(cmdline.len());
    let text = std::str::from_utf8(&cmdline[..end]).ok()?;
    let mut rest = text.strip_prefix("postgres: ")?;
    // A `cluster_name` comes first, followed by ": ".
    let first = rest.split(' ').next()?;
    if first.ends_with(':') {
        rest = &rest[first.len() + 1..];
    }
    if let Some(leader) = rest.strip_prefix("parallel worker for PID ") {
        let leader = leader.split_whitespace().next()?.parse().ok()?;
        return Some(Title::ParallelWorker { leader });
    }
    // A client's session: its host is `[local]` or `address(port)` (`hostname(port)` with
    // log_hostname); auxiliary processes ("autovacuum launcher", "logical replication
    // launcher") have no such word, a walsender's title starts with "walsender".
    let mut words = rest.split(' ');
    let (user, database, host) = (words.next()?, words.next()?, words.next().unwrap_or(""));
    if user == "walsender" || !(host == "[local]" || host.ends_with(')')) {
        return Some(Title::Other);
    }
    Some(Title::Backend { user, database })
}

/// The project whose tenant role `user` is in its own database `database`, if so.
fn tenant<'a>(user: &'a str, database: &str) -> Option<(&'a str, &'a str)> {
    let rest = user.strip_prefix("fx_")?;
    let (project, role) = rest.rsplit_once('_')?;
    (matches!(role, "read" | "readwrite" | "owner")
        && database.strip_prefix("fx_") == Some(project))
    .then_some((project, role))
}

/// A tenant backend's memory (with its workers'), as one scan read it.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Backend {
    pid: u32,
    project: String,
    role: String,
    /// Private memory in bytes ([`Measure::Memory`]), or entries of the shared lock table
    /// ([`Measure::Locks`]).
    amount: u64,
}

/// Where PostgreSQL keeps its dynamic shared memory segments (`dynamic_shared_memory_type`
/// posix, the default on Linux; `mmap` puts them under the data directory's `pg_dynshmem`).
const DSM_PREFIXES: [&str; 2] = ["/dev/shm/PostgreSQL.", "/pg_dynshmem/mmap."];

/// The bytes of dynamic shared memory segments in /dev/shm: cheap, and nothing more is read
/// while they are small.
fn dsm_in_dev_shm() -> u64 {
    let Ok(dir) = std::fs::read_dir("/dev/shm") else {
        return 0;
    };
    dir.filter_map(Result::ok)
        .filter(|e| e.file_name().to_string_lossy().starts_with("PostgreSQL."))
        .filter_map(|e| e.metadata().ok())
        .map(|m| m.len())
        .sum()
}

/// Dynamic shared memory segments: (path, size).
type Segments = Vec<(String, u64)>;

/// The dynamic shared memory segments `pid` maps.
fn dsm_mappings(pid: u32) -> Segments {
    let Ok(maps) = std::fs::read_to_string(format!("/proc/{pid}/maps")) else {
        return Vec::new();
    };
    maps.lines()
        .filter_map(|line| {
            // `start-end perms offset dev inode path`
            let path = line.split_whitespace().nth(5)?;
            if !DSM_PREFIXES.iter().any(|p| path.contains(p)) {
                return None;
            }
            let (start, end) = line.split_whitespace().next()?.split_once('-')?;
            let size = u64::from_str_radix(end, 16).ok()? - u64::from_str_radix(start, 16).ok()?;
            Some((path.to_string(), size))
        })
        .collect()
}

/// Reads the memory of the postmaster's children: private memory, and the dynamic shared
/// memory segments they map (a parallel hash join's table lives there, sized by the tenant's
/// work_mem; counted once per leader and its workers). `None` when the postmaster is gone.
fn scan(postmaster: u32, floor: u64) -> Option<Vec<Backend>> {
    let children =
        std::fs::read_to_string(format!("/proc/{postmaster}/task/{postmaster}/children")).ok()?;
    let page = rustix::param::page_size() as u64;
    // Segments are looked for in the processes' maps only while there are large ones at all.
    let dsm = dsm_in_dev_shm() >= floor;
    let mut big: Vec<(u32, u64, Segments)> = Vec::new();
    for pid in children
        .split_whitespace()
        .filter_map(|p| p.parse::<u32>().ok())
    {
        let Ok(statm) = std::fs::read_to_string(format!("/proc/{pid}/statm")) else {
            continue; // ended meanwhile
        };
        let mut f = statm
            .split_whitespace()
            .skip(1)
            .map(|v| v.parse::<u64>().unwrap_or(0) * page);
        let (resident, shared) = (f.next().unwrap_or(0), f.next().unwrap_or(0));
        let private = resident.saturating_sub(shared);
        let segments = if dsm && shared >= floor {
            dsm_mappings(pid)
        } else {
            Vec::new()
        };
        if private >= floor || segments.iter().map(|s| s.1).sum::<u64>() >= floor {
            big.push((pid, private, segments));
        }
    }
    let mut tenants: HashMap<u32, (Backend, HashMap<String, u64>)> = HashMap::new();
    for (pid, private, segments) in big {
        let Ok(title) = std::fs::read(format!("/proc/{pid}/cmdline")) else {
            continue;
        };
        let (leader, title_of_leader) = match parse_title(&title) {
            Some(Title::Backend { .. }) => (pid, title.clone()),
            Some(Title::ParallelWorker { leader }) => {
                let Ok(t) = std::fs::read(format!("/proc/{leader}/cmdline")) else {
                    continue;
                };
                (leader, t)
            }
            _ => continue,
        };
        let Some(Title::Backend { user, database }) = parse_title(&title_of_leader) else {
            continue;
        };
        let Some((project, role)) = tenant(user, database) else {
            continue;
        };
        let (backend, shared) = tenants.entry(leader).or_insert_with(|| {
            (
                Backend {
                    pid: leader,
                    project: project.to_string(),
                    role: role.to_string(),
                    amount: 0,
                },
                HashMap::new(),
            )
        });
        backend.amount += private;
        shared.extend(segments);
    }
    Some(
        tenants
            .into_values()
            .map(|(mut b, shared)| {
                b.amount += shared.values().sum::<u64>();
                b
            })
            .collect(),
    )
}

/// Keeps of `backends` those of projects in this server's control database, and returns the
/// account each of them counts for (project id → [`crate::projects::account_key`]: its owner,
/// the first admin who chose the role), in one query. When the control database cannot be
/// read, all are kept (the cluster's memory is guarded rather than not) and no account is
/// known (the choice past the total then falls back to projects).
async fn keep_own(
    pool: &deadpool_postgres::Pool,
    backends: &mut Vec<Backend>,
) -> HashMap<String, String> {
    let mut projects: Vec<&str> = backends.iter().map(|b| b.project.as_str()).collect();
    projects.sort_unstable();
    projects.dedup();
    let rows = async {
        let c = pool.get().await.ok()?;
        crate::control::projects::owners(&c, &projects).await.ok()
    }
    .await;
    let Some(rows) = rows else {
        return HashMap::new();
    };
    let own: HashMap<String, String> = rows
        .into_iter()
        .map(|(id, owner)| {
            let account = crate::projects::account_key(&id, owner.as_deref()).into_owned();
            (id, account)
        })
        .collect();
    backends.retain(|b| own.contains_key(&b.project));
    own
}

/// The backends to end: each over `per_backend` (0: no such limit); then, while all together
/// are over `total` (0: none), the largest backend of the account holding the most: an
/// account (from `accounts`: project → its account; a project not in it is an account of its
/// own) holds what all the projects it owns hold — one account per project, so an admin who
/// never chose the role is never charged for it (red team rt6 H1). A
/// tenant with one large statement is not ended for another's many, nor for another's many
/// spread over several projects (red team rt5: three projects of one account, three
/// statements each, got another account's single statement ended first).
fn over_limits(
    backends: &[Backend],
    per_backend: u64,
    total: u64,
    accounts: &HashMap<String, String>,
    what: Measure,
) -> Vec<(Backend, String)> {
    let mut out = Vec::new();
    let mut left: Vec<&Backend> = Vec::new();
    for b in backends {
        if per_backend > 0 && b.amount > per_backend {
            out.push((b.clone(), what.over_one(per_backend)));
        } else {
            left.push(b);
        }
    }
    let mut sum: u64 = left.iter().map(|b| b.amount).sum();
    // The account a backend counts for: its project's, or the project itself.
    let account_of = |b: &Backend| -> String {
        accounts
            .get(&b.project)
            .cloned()
            .unwrap_or_else(|| crate::projects::account_key(&b.project, None).into_owned())
    };
    while total > 0 && sum > total && !left.is_empty() {
        let mut by_account: HashMap<String, u64> = HashMap::new();
        for b in &left {
            *by_account.entry(account_of(b)).or_default() += b.amount;
        }
        let heaviest = by_account
            .into_iter()
            .max_by(|(a, x), (b, y)| x.cmp(y).then_with(|| b.cmp(a)))
            .map(|(a, _)| a)
            .expect("not empty");
        let (i, _) = left
            .iter()
            .enumerate()
            .filter(|(_, b)| account_of(b) == heaviest)
            .max_by_key(|(_, b)| (b.amount, std::cmp::Reverse(b.pid)))
            .expect("the account has a backend");
        let b = left.swap_remove(i);
        sum -= b.amount;
        out.push((b.clone(), what.over_total(total)));
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn titles_name_backends_workers_and_nothing_else() {
        let t = |s: &str| {
            let mut v = s.as_bytes().to_vec();
            v.extend([0, 0, 0]);
            v
        };
        let a = t("postgres: fx_ab12_read fx_ab12 127.0.0.1(43592) SELECT");
        assert_eq!(
            parse_title(&a),
            Some(Title::Backend {
                user: "fx_ab12_read",
                database: "fx_ab12"
            })
        );
        let b = t("postgres: main: fx_ab12_owner fx_ab12 [local] idle");
        assert_eq!(
            parse_title(&b),
            Some(Title::Backend {
                user: "fx_ab12_owner",
                database: "fx_ab12"
            })
        );
        assert_eq!(
            parse_title(&t("postgres: parallel worker for PID 4242")),
            Some(Title::ParallelWorker { leader: 4242 })
        );
        assert_eq!(
            parse_title(&t("postgres: main: parallel worker for PID 7 ")),
            Some(Title::ParallelWorker { leader: 7 })
        );
        for other in [
            "postgres: checkpointer ",
            "postgres: autovacuum launcher ",
            "postgres: logical replication launcher ",
            "postgres: autovacuum worker fx_ab12",
            "postgres: background writer ",
            "postgres: walsender fluxbase 127.0.0.1(5) START_REPLICATION",
        ] {
            assert_eq!(parse_title(&t(other)), Some(Title::Other), "{other}");
        }
        assert_eq!(
            parse_title(&t("/usr/lib/postgresql/15/bin/postgres -D x")),
            None
        );
    }

    #[test]
    fn only_a_projects_own_roles_in_its_own_database_are_tenants() {
        assert_eq!(tenant("fx_ab12_read", "fx_ab12"), Some(("ab12", "read")));
        assert_eq!(
            tenant("fx_ab12_readwrite", "fx_ab12"),
            Some(("ab12", "readwrite"))
        );
        assert_eq!(tenant("fx_ab12_owner", "fx_ab12"), Some(("ab12", "owner")));
        for (user, db) in [
            ("fx_ab12_read", "fx_cd34"),
            ("fx_ab12_auth", "fx_ab12"),
            ("fluxbase", "fx_ab12"),
            ("fluxbase", "fluxbase"),
            ("fx_ab12_read", "fluxbase"),
            ("postgres", "postgres"),
        ] {
            assert_eq!(tenant(user, db), None, "{user} {db}");
        }
    }

    fn b(pid: u32, project: &str, mb: u64) -> Backend {
        Backend {
            pid,
            project: project.into(),
            role: "read".into(),
            amount: mb << 20,
        }
    }

    #[test]
    fn a_backend_over_its_limit_ends_and_then_the_heaviest_projects_largest_while_all_are_over_the_total(
    ) {
        let pids =
            |o: Vec<(Backend, String)>| o.into_iter().map(|(o, _)| o.pid).collect::<Vec<_>>();
        let mb = |n: u64| n << 20;
        let none = HashMap::new();
        let all = [
            b(1, "a", 900),
            b(2, "b", 300),
            b(3, "c", 200),
            b(4, "a", 100),
        ];
        assert_eq!(
            pids(over_limits(&all, mb(1024), 0, &none, Measure::Memory)),
            Vec::<u32>::new()
        );
        assert_eq!(
            pids(over_limits(&all, mb(512), 0, &none, Measure::Memory)),
            vec![1]
        );
        // 1,500 MiB together against 1,000: a's largest (900) goes, and that suffices.
        assert_eq!(
            pids(over_limits(&all, 0, mb(1000), &none, Measure::Memory)),
            vec![1]
        );
        // Against 400: 900 (a: 1,000), then 300 (b: 300 against a's 100 and c's 200).
        assert_eq!(
            pids(over_limits(&all, 0, mb(400), &none, Measure::Memory)),
            vec![1, 2]
        );
        // Per backend first, then the total with what is left.
        assert_eq!(
            pids(over_limits(&all, mb(250), mb(400), &none, Measure::Memory)),
            vec![1, 2]
        );
        // 100 left is not over 100.
        assert_eq!(
            pids(over_limits(&all, mb(250), mb(100), &none, Measure::Memory)),
            vec![1, 2, 3]
        );
        let (_, why) = &over_limits(&all, mb(512), 0, &none, Measure::Memory)[0];
        assert!(why.contains("sql_backend_memory_limit_mb"), "{why}");
        let (_, why) = &over_limits(&all, 0, mb(1000), &none, Measure::Memory)[0];
        assert!(why.contains("sql_backends_memory_total_mb"), "{why}");
        // One tenant's single large statement is not ended for another's many: d holds 6 × 300
        // (1,800) against e's one 500; past 2,000 together, d's go first.
        let many = [
            b(10, "d", 300),
            b(11, "d", 300),
            b(12, "d", 300),
            b(13, "d", 300),
            b(14, "d", 300),
            b(15, "d", 300),
            b(20, "e", 500),
        ];
        let ended = pids(over_limits(&many, 0, mb(2000), &none, Measure::Memory));
        assert_eq!(ended.len(), 1, "{ended:?}");
        assert!(ended[0] != 20, "{ended:?}");
    }

    /// The total's choice is by account: one admin's statements spread over several projects
    /// count together (red team rt5: a's three projects, three 70 MiB statements each, against
    /// b's one of 373 MiB: b's was ended first when the choice was by project).
    #[test]
    fn past_the_total_the_account_holding_the_most_over_its_projects_gives_first() {
        let pids =
            |o: Vec<(Backend, String)>| o.into_iter().map(|(o, _)| o.pid).collect::<Vec<_>>();
        let mb = |n: u64| n << 20;
        let mut all = Vec::new();
        for (i, project) in ["a1", "a2", "a3"].into_iter().enumerate() {
            for j in 0..3 {
                all.push(b((i * 3 + j) as u32 + 1, project, 70));
            }
        }
        all.push(b(100, "b1", 373));
        let admins: HashMap<String, String> = [
            ("a1", "alice"),
            ("a2", "alice"),
            ("a3", "alice"),
            ("b1", "bob"),
        ]
        .into_iter()
        .map(|(p, u)| (p.to_string(), u.to_string()))
        .collect();
        // 630 + 373 = 1,003 MiB against 800: alice's statements go (70 each: 560, 490) until
        // under it (793).
        let ended = pids(over_limits(&all, 0, mb(800), &admins, Measure::Memory));
        assert!(!ended.contains(&100), "{ended:?}");
        assert_eq!(ended.len(), 3, "{ended:?}");
        // By project (no admins known), b1 is the heaviest project and goes first.
        let ended = pids(over_limits(
            &all,
            0,
            mb(800),
            &HashMap::new(),
            Measure::Memory,
        ));
        assert_eq!(ended, vec![100], "{ended:?}");
        let (_, why) = &over_limits(&all, 0, mb(800), &admins, Measure::Memory)[0];
        assert!(why.contains("account holding the most"), "{why}");
    }

    #[test]
    fn the_process_tree_of_this_machine_reads() {
        // This process's parent is visible, and a scan of a process with no children is empty.
        let me = std::process::id();
        assert!(parent(me).is_some());
        assert_eq!(scan(me, NOTICE_FLOOR), Some(Vec::new()));
        assert_eq!(scan(u32::MAX - 1, NOTICE_FLOOR), None);
    }
}
