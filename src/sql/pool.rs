//! Connections of the SQL API: one pool per (project, role), logged in as the project role,
//! within one budget for the whole server, checked out per request and reset when given back.
//!
//! # Sharing the cluster's connections
//!
//! ```text
//!  request ─► project share (sql_project_connections) ┐ wait ≤ sql_queue_timeout_ms,
//!           ─► account share (sql_account_connections) ┘ then 429 naming the one refusing
//!               ─► pool[(project, role)] ─► idle connection, or a new one:
//!                    global budget (sql_max_connections ≤ ¾ of what the cluster's max_connections
//!                    leaves after its reserved ones, other clients and this server's own)
//!                    ├─ a permit free → connect
//!                    ├─ none: close the longest-idle connection of any pool → connect
//!                    └─ none idle: wait ≤ sql_queue_timeout_ms, then 429
//!  reaper: every pooled connection idle for sql_idle_timeout_secs is closed
//! ```
//! A noisy project therefore waits on its own share, and a noisy account's projects on the
//! account's ([`super::shares`]), while the rest of the budget serves the others, and what an
//! attack opened is closed again once it is over.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use deadpool::managed::{self, Metrics as PoolMetrics, Object, RecycleError, RecycleResult};
use fluxbase_replication::wire::{ConnectConfig, Connection, TransactionStatus, WireError};

use super::{Sql, SqlError};
use crate::auth::{DbRole, Project};
use crate::db::ClusterTarget;

/// A pooled project connection and what its `auth.identity` row holds (see
/// [`crate::rls::identity`]).
pub struct PooledConnection {
    pub(super) conn: Connection,
    pub identity: crate::rls::KnownIdentity,
    /// The routine epoch the last pipelined reset returned: no routine of the project's own
    /// existed since it was read (sql/project/0014_session_reset_epoch.sql). `None`: unknown.
    pub(super) reset_epoch: Option<i64>,
}

impl std::ops::Deref for PooledConnection {
    type Target = Connection;
    fn deref(&self) -> &Connection {
        &self.conn
    }
}

impl std::ops::DerefMut for PooledConnection {
    fn deref_mut(&mut self) -> &mut Connection {
        &mut self.conn
    }
}

pub struct WireManager {
    cfg: ConnectConfig,
    /// Logs in as the project role: repairs its settings and password first (see
    /// [`crate::projects::RoleLogin`]).
    login: Arc<crate::projects::RoleLogin>,
}

impl WireManager {
    pub fn new(cfg: ConnectConfig, login: Arc<crate::projects::RoleLogin>) -> WireManager {
        WireManager { cfg, login }
    }
}

impl managed::Manager for WireManager {
    type Type = PooledConnection;
    type Error = PoolFailure;

    async fn create(&self) -> Result<PooledConnection, PoolFailure> {
        let mut conn = self.login.connect(&self.cfg).await?;
        conn.set_session_reset_with_arg(SESSION_RESET_IN_PIPELINE, SESSION_RESET_ALONE);
        Ok(PooledConnection {
            conn,
            identity: crate::rls::KnownIdentity::Unknown,
            reset_epoch: None,
        })
    }

    async fn recycle(
        &self,
        conn: &mut PooledConnection,
        _: &PoolMetrics,
    ) -> RecycleResult<PoolFailure> {
        if conn.is_broken() {
            return Err(RecycleError::message("connection is broken"));
        }
        Ok(())
    }
}

/// A pooled connection and its place in the global budget (freed when it closes).
pub struct Budgeted {
    conn: PooledConnection,
    _permit: tokio::sync::OwnedSemaphorePermit,
}

impl std::ops::Deref for Budgeted {
    type Target = PooledConnection;
    fn deref(&self) -> &PooledConnection {
        &self.conn
    }
}

impl std::ops::DerefMut for Budgeted {
    fn deref_mut(&mut self) -> &mut PooledConnection {
        &mut self.conn
    }
}

/// Why a connection could not be made.
#[derive(Debug, thiserror::Error)]
pub enum PoolFailure {
    #[error(transparent)]
    Wire(#[from] WireError),
    #[error("every connection of the budget ({0}) is in use")]
    Budget(usize),
    /// The role's login could not be repaired in time (see [`crate::projects::RoleLogin`]).
    #[error("{0}")]
    Busy(String),
}

/// [`WireManager`] within the global connection budget: a new connection needs a permit,
/// which it holds until it is closed.
pub struct BudgetedManager {
    inner: WireManager,
    budget: Arc<Budget>,
}

impl managed::Manager for BudgetedManager {
    type Type = Budgeted;
    type Error = PoolFailure;

    async fn create(&self) -> Result<Budgeted, PoolFailure> {
        let permit = self.budget.permit().await?;
        let conn = managed::Manager::create(&self.inner).await?;
        Ok(Budgeted {
            conn,
            _permit: permit,
        })
    }

    async fn recycle(
        &self,
        obj: &mut Budgeted,
        metrics: &PoolMetrics,
    ) -> RecycleResult<PoolFailure> {
        managed::Manager::recycle(&self.inner, &mut obj.conn, metrics).await
    }
}

type Pool = managed::Pool<BudgetedManager>;
pub(super) type PoolMap = Mutex<HashMap<(String, DbRole), RolePool>>;

#[derive(Clone)]
pub(super) struct RolePool {
    pool: Pool,
    pub(super) cfg: ConnectConfig,
}

/// The connections all SQL pools may hold together (see the module docs), sized from the
/// cluster's `max_connections` on first use.
pub struct Budget {
    permits: tokio::sync::OnceCell<(Arc<tokio::sync::Semaphore>, usize)>,
    configured: usize,
    /// The most sessions this server opens on the cluster outside the SQL pools
    /// ([`own_connections`]).
    own: usize,
    wait: Duration,
    pools: std::sync::Weak<PoolMap>,
    /// Signalled when a request gives a connection back (it is idle now: closable).
    idle: tokio::sync::Notify,
    /// Cluster mode: the nodes this budget is shared with ([`Budget::share`]).
    cluster: std::sync::OnceLock<Arc<crate::cluster::leadership::Leadership>>,
}

/// A permit of a connection budget whose semaphore holds `size` places, while this node holds
/// at most `share()` of them (all on a single node; a cluster's node its part, see
/// [`Budget::share`]): a free place, or one freed by closing an idle connection
/// (`close_idle`, once per wait and again each time `idle` tells one went idle), or one that
/// frees up before `deadline`. `Err(share)` when none did. Both engines' budgets wait here.
pub(crate) async fn permit_within_share(
    permits: &Arc<tokio::sync::Semaphore>,
    size: usize,
    share: impl Fn() -> usize,
    idle: &tokio::sync::Notify,
    close_idle: impl Fn(),
    deadline: tokio::time::Instant,
) -> Result<tokio::sync::OwnedSemaphorePermit, usize> {
    // Held by this node now: within its share, or the permit goes back at once.
    let within = |share: usize| size - permits.available_permits() <= share;
    // One idle connection closed per wait (and again each time one goes idle): a waiter at its
    // node's share, woken every 10 ms, would otherwise close one each time.
    let mut may_close = true;
    loop {
        let share = share();
        if let Ok(p) = permits.clone().try_acquire_owned() {
            if within(share) {
                return Ok(p);
            }
        }
        // Registered before looking for idle connections, so none going idle is missed.
        let went_idle = idle.notified();
        tokio::pin!(went_idle);
        went_idle.as_mut().enable();
        // A closed connection gives its permit back as it finishes closing.
        if std::mem::take(&mut may_close) {
            close_idle();
        }
        tokio::select! {
            p = permits.clone().acquire_owned() => match p {
                Ok(p) if within(share) => return Ok(p),
                // At this node's share of a cluster's budget (the semaphore holds the whole): a
                // connection closing, or going idle, makes room.
                Ok(p) => {
                    drop(p);
                    tokio::select! {
                        _ = &mut went_idle => may_close = true,
                        _ = tokio::time::sleep(Duration::from_millis(10)) => {}
                    }
                    if tokio::time::Instant::now() >= deadline {
                        return Err(share);
                    }
                }
                Err(_) => return Err(share),
            },
            _ = &mut went_idle => may_close = true,
            _ = tokio::time::sleep_until(deadline) => return Err(share),
        }
    }
}

impl Budget {
    pub(super) fn new(
        configured: usize,
        own: usize,
        wait: Duration,
        pools: std::sync::Weak<PoolMap>,
    ) -> Budget {
        Budget {
            permits: tokio::sync::OnceCell::new(),
            configured,
            own,
            wait,
            pools,
            idle: tokio::sync::Notify::new(),
            cluster: std::sync::OnceLock::new(),
        }
    }

    /// This node's part of a budget of `size`: all of it on a single node; in cluster mode
    /// `ceil(size / nodes)`, as many nodes as the leadership loop last saw. Every node sizes
    /// the budget from the same database cluster, which counts other nodes' SQL pools as its
    /// own (they are all `fluxbase-sql`): without the split each node took three quarters of
    /// what was free and three nodes promised PostgreSQL 118 connections of 73 (red team rt18:
    /// other tenants' requests failed with "too many clients").
    fn share(&self, size: usize) -> usize {
        let nodes = self.cluster.get().map_or(1, |l| l.node_count());
        crate::cluster::per_node(size, nodes)
    }

    /// Sizes the budget from the cluster (once, at the first SQL request): three quarters of
    /// the connections left after the reserved ones, those other clients hold at that moment
    /// and the most this server opens outside the SQL pools ([`own_connections`]), or
    /// `sql_max_connections` if that is lower. This server's control sessions open at that
    /// moment are among the clients counted: they are taken out again, not counted twice.
    async fn ensure(&self, control: &deadpool_postgres::Pool) -> anyhow::Result<()> {
        self.permits
            .get_or_try_init(|| async {
                let session = control.get().await?;
                // Ours, counted below as other clients' (this one included).
                let own_open = control.status().size as i32;
                let row = session
                    .query_one(
                        "SELECT current_setting('max_connections')::int,
                                current_setting('superuser_reserved_connections')::int
                                + coalesce(current_setting('reserved_connections', true), '0')::int,
                                (SELECT count(*)::int FROM pg_catalog.pg_stat_activity
                                 WHERE backend_type = 'client backend'
                                   AND application_name IS DISTINCT FROM 'fluxbase-sql')",
                        &[],
                    )
                    .await?;
                // Walsenders are not counted: PostgreSQL keeps their places apart
                // (`max_wal_senders`).
                let (max, reserved, others): (i32, i32, i32) = (row.get(0), row.get(1), row.get(2));
                // What the cluster's other clients hold now (this server's control pool and
                // streams, CLI commands, other servers), and room for this server's own
                // sessions to grow to their maximum.
                let others = (others - own_open).max(0);
                let left = max - reserved - others - self.own as i32;
                if left < 4 {
                    tracing::warn!(
                        max_connections = max,
                        other_connections = others,
                        own_connections = self.own,
                        "the database cluster has room for fewer than 4 SQL connections besides \
                         its other clients and this server's own sessions: the SQL API gets 3, \
                         and requests may find the cluster full; raise max_connections"
                    );
                }
                let auto = (left.max(4) as usize) * 3 / 4;
                let size = match self.configured {
                    0 => auto,
                    n => n.min(auto),
                };
                tracing::info!(
                    max_connections = max,
                    other_connections = others,
                    own_connections = self.own,
                    budget = size,
                    "SQL connection budget"
                );
                Ok::<_, anyhow::Error>((Arc::new(tokio::sync::Semaphore::new(size)), size))
            })
            .await?;
        Ok(())
    }

    /// The connections this node's part of the budget holds ([`Budget::share`]; 0: not sized
    /// yet).
    pub(super) fn size(&self) -> usize {
        self.permits.get().map_or(0, |(_, size)| self.share(*size))
    }

    /// A place for one more connection: a free one, or one freed by closing an idle
    /// connection of any pool, or one that frees up within the wait.
    async fn permit(&self) -> Result<tokio::sync::OwnedSemaphorePermit, PoolFailure> {
        let Some((permits, size)) = self.permits.get() else {
            return Err(PoolFailure::Budget(0));
        };
        let deadline = tokio::time::Instant::now() + self.wait;
        permit_within_share(
            permits,
            *size,
            || self.share(*size),
            &self.idle,
            || {
                self.close_longest_idle();
            },
            deadline,
        )
        .await
        .map_err(PoolFailure::Budget)
    }

    /// Closes the pooled connection that has been idle longest, whatever its project.
    fn close_longest_idle(&self) -> bool {
        let Some(pools) = self.pools.upgrade() else {
            return false;
        };
        let pools: Vec<Pool> = pools
            .lock()
            .expect("poisoned")
            .values()
            .map(|rp| rp.pool.clone())
            .collect();
        let oldest = pools
            .iter()
            .enumerate()
            .filter_map(|(i, pool)| {
                let mut longest = None;
                pool.retain(|_, m| {
                    longest = longest.max(Some(m.last_used()));
                    true
                });
                longest.map(|idle| (idle, i))
            })
            .max();
        let Some((idle, i)) = oldest else {
            return false;
        };
        let mut closed = false;
        let removed = pools[i].retain(|_, m| {
            if !closed && m.last_used() >= idle {
                closed = true;
                return false;
            }
            true
        });
        close_all(removed.removed);
        closed
    }
}

/// Ends removed connections with a Terminate; each gives its budget permit back when closed.
fn close_all(removed: Vec<Budgeted>) {
    for b in removed {
        tokio::spawn(async move {
            let Budgeted { conn, _permit } = b;
            conn.conn.close().await;
        });
    }
}

/// The most sessions this server opens on its cluster outside the SQL pools, kept out of the
/// SQL budget: the control pool ([`crate::db::CONTROL_CONNECTIONS`]), the webhook writer's
/// (`webhook_control_connections`), the role repairs' ([`REPAIR_CONNECTIONS`]), and
/// [`OTHER_OWN_CONNECTIONS`] more. A change stream holds only its walsender, which PostgreSQL
/// counts apart from `max_connections` (`max_wal_senders`).
pub fn own_connections(config: &crate::config::Config) -> usize {
    crate::db::CONTROL_CONNECTIONS
        + config.webhook_control_connections
        + REPAIR_CONNECTIONS
        + OTHER_OWN_CONNECTIONS
}

/// The memory watchdog's session, the cluster leadership's, a stream learning a new type, a
/// CLI command run beside the server.
const OTHER_OWN_CONNECTIONS: usize = 4;

/// Admin sessions the role repairs may use at once, and how long a login waits for one. A
/// repair holds its session for one login (its lock waits are 200 ms each), so the wait is a
/// queue of logins, not of attackers; it stays well below the SQL pool's create timeout.
const REPAIR_CONNECTIONS: usize = 4;
const REPAIR_WAIT: Duration = Duration::from_secs(20);

/// How long a request that holds its project's share (and, on PostgreSQL, a place in the
/// connection budget) may wait for a login to the project database on top of
/// `sql_queue_timeout_ms`, then 429 / 503: both engines' pools (here and in
/// `crate::mysql::sql`). A login is a TCP connect (bounded at 5 s itself), authentication and
/// the session's setup: milliseconds on a healthy server. But the same wait also covers what a
/// PostgreSQL login queues behind: the per-role login lock, a repair session out of
/// [`REPAIR_CONNECTIONS`] (up to [`REPAIR_WAIT`]), the cross-node advisory lock (5 s), the
/// connect and the role's `ALTER ROLE` commits; many projects logging in at once on a loaded
/// machine queue for seconds. 30 s stays above all of those together, as the PostgreSQL pool
/// always had (the MySQL pool had 5 s, too short under load on CI).
pub const LOGIN_BOUND: Duration = Duration::from_secs(30);

pub(super) fn repair_pool(cluster: &ClusterTarget) -> deadpool_postgres::Pool {
    let mut cfg = cluster.pg_config(&cluster.control_db);
    cfg.application_name("fluxbase-repair");
    let mgr = deadpool_postgres::Manager::from_config(
        cfg,
        tokio_postgres::NoTls,
        deadpool_postgres::ManagerConfig {
            recycling_method: deadpool_postgres::RecyclingMethod::Fast,
        },
    );
    deadpool_postgres::Pool::builder(mgr)
        .max_size(REPAIR_CONNECTIONS)
        .wait_timeout(Some(REPAIR_WAIT))
        .create_timeout(Some(Duration::from_secs(10)))
        .recycle_timeout(Some(Duration::from_secs(5)))
        .runtime(deadpool_postgres::Runtime::Tokio1)
        .build()
        .expect("a pool with a runtime builds")
}

/// Closes pooled connections idle for `idle_timeout`, or that the server sent anything while
/// idle (looked at every quarter of it, at most every 5 s), until the pools are gone.
pub(super) async fn close_idle(pools: std::sync::Weak<PoolMap>, idle_timeout: Duration) {
    let every = (idle_timeout / 4).clamp(Duration::from_millis(100), Duration::from_secs(5));
    loop {
        tokio::time::sleep(every).await;
        let Some(pools) = pools.upgrade() else {
            return;
        };
        let all: Vec<Pool> = pools
            .lock()
            .expect("poisoned")
            .values()
            .map(|rp| rp.pool.clone())
            .collect();
        drop(pools);
        for pool in all {
            // Idle too long, or spoken to while idle: a session that listens (its
            // notifications, never read, would keep the cluster's NOTIFY queue from moving
            // past it: red team rt16) or one the server ended.
            let removed = pool
                .retain(|conn, m| m.last_used() < idle_timeout && !conn.conn.has_unread_input());
            if !removed.removed.is_empty() {
                tracing::debug!(
                    closed = removed.removed.len(),
                    "closing idle SQL connections"
                );
            }
            close_all(removed.removed);
        }
    }
}

/// A pooled connection checked out for a request, holding its project's and its account's
/// shares until released.
pub struct Checkout {
    conn: Object<BudgetedManager>,
    _shares: super::shares::SharePlaces,
    budget: Arc<Budget>,
    /// This use ran one plain statement that succeeded (see [`Checkout::ran_one_plain_statement`]).
    plain: bool,
}

impl Checkout {
    /// Says that the caller's part of this use of the connection (besides the server's own
    /// statements: the identity, the type lookups) succeeded and PostgreSQL answered it with
    /// exactly one CommandComplete whose tag is SELECT, INSERT, UPDATE, DELETE or MERGE (see
    /// [`is_plain_tag`]). Such a statement makes LISTEN, SQL-level prepared statements and held
    /// cursors only through a routine of the project's own, so the next pipelined reset may skip
    /// its checks for them while the project has none (sql/project/0014_session_reset_epoch.sql).
    /// Decided from the server's answer, never from the request's text. Not called: the next
    /// reset runs every check.
    pub(super) fn ran_one_plain_statement(&mut self) {
        self.plain = true;
    }
}

/// A CommandComplete tag of a plain statement: SELECT, INSERT, UPDATE, DELETE or MERGE (also
/// answered by CREATE TABLE AS, SELECT INTO and EXECUTE of such a statement, none of which makes
/// LISTEN, SQL-level prepared statements or held cursors either).
pub(super) fn is_plain_tag(tag: &str) -> bool {
    let word = tag.split(' ').next().unwrap_or("");
    matches!(word, "SELECT" | "INSERT" | "UPDATE" | "DELETE" | "MERGE")
}

impl std::ops::Deref for Checkout {
    type Target = PooledConnection;
    fn deref(&self) -> &PooledConnection {
        &self.conn.conn
    }
}

impl std::ops::DerefMut for Checkout {
    fn deref_mut(&mut self) -> &mut PooledConnection {
        &mut self.conn.conn
    }
}

/// The reset between two requests on a connection: what `DISCARD ALL` resets but the
/// statements the connection keeps prepared (sql/project/0014_session_reset_epoch.sql), inside
/// the next statement's transaction, given the epoch the connection knows when the checks for
/// state only a utility statement makes may be skipped; or on its own, always with every check.
/// `reset_session(boolean)` (0011) stays for servers of the previous version during an upgrade.
const SESSION_RESET_IN_PIPELINE: &str = "SELECT auth.reset_session(false, $1::pg_catalog.int8)";
const SESSION_RESET_ALONE: &str = "SELECT auth.reset_session(true, NULL::pg_catalog.int8)";

/// Returns the connection to its pool with a session reset due: it runs in the same round trip
/// as the next request's statement (see [`fluxbase_replication::wire::Connection::query_cached`]).
/// A transaction left open is rolled back first, here.
pub fn release(conn: Checkout) {
    let Checkout {
        mut conn,
        _shares,
        budget,
        plain,
    } = conn;
    if conn.is_broken() {
        let _ = Object::take(conn);
        return;
    }
    let pooled = &mut conn.conn;
    // An answer's memory is never lent to the next use.
    pooled.conn.set_result_memory(None);
    // What this use's pipelined reset answered: the epoch it proved, or NULL (no proof).
    let proved = pooled.conn.take_reset_value();
    if let Some(value) = &proved {
        pooled.reset_epoch = value.as_deref().and_then(|v| v.parse().ok());
    }
    if conn.transaction_status() == TransactionStatus::Idle {
        let known = if plain { conn.conn.reset_epoch } else { None };
        let arg = known.map(|e| e.to_string());
        // Vouched: this use's plain statement follows a reset of this use that proved the epoch
        // (the wire also checks that the statement ran in that reset's transaction); the next
        // reset may then be bound from its kept name (docs/security.md).
        if plain && known.is_some() && matches!(proved, Some(Some(_))) {
            conn.conn.conn.reset_session_vouched(arg);
        } else {
            conn.conn.conn.reset_session_with(arg);
        }
        drop(conn);
        // Requests waiting on the budget may close it now.
        budget.idle.notify_waiters();
        return;
    }
    tokio::spawn(async move {
        let mut conn = conn;
        if conn.simple_query("ROLLBACK", 0).await.is_err() {
            let _ = Object::take(conn);
            return;
        }
        conn.reset_session();
        drop(conn);
        budget.idle.notify_waiters();
    });
}

impl Sql {
    /// Cluster mode: `sql_project_connections` bounds a project, and `sql_account_connections`
    /// an account's projects, across every node; each node takes `ceil(bound / nodes)` of each
    /// (as many nodes as the leadership loop last saw).
    pub fn join_cluster(&self, leadership: Arc<crate::cluster::leadership::Leadership>) {
        let _ = self.budget.cluster.set(leadership.clone());
        let _ = self.cluster.set(leadership);
    }

    /// The nodes this node shares the per-project and per-account bounds with (1: a single
    /// node).
    fn nodes(&self) -> usize {
        self.cluster.get().map_or(1, |l| l.node_count().max(1))
    }

    /// How many SQL requests of one project this node runs at once, and the nodes it shares
    /// `sql_project_connections` with (1: a single node).
    fn project_share(&self) -> (usize, usize) {
        let nodes = self.nodes();
        (crate::cluster::per_node(self.project_share, nodes), nodes)
    }

    /// Closes every pooled connection of a project (suspension, deletion).
    pub fn forget_project(&self, project_id: &str) {
        let mut pools = self.pools.lock().expect("poisoned");
        pools.retain(|(p, _), rp| {
            if p == project_id {
                rp.pool.close();
                false
            } else {
                true
            }
        });
        self.types.forget(project_id);
        self.statements.lock().expect("poisoned").remove(project_id);
    }

    pub fn clear(&self) {
        for (_, rp) in self.pools.lock().expect("poisoned").drain() {
            rp.pool.close();
        }
    }

    /// Accounts with a SQL request holding or waiting on their share now.
    pub fn account_shares_in_use(&self) -> usize {
        self.accounts.active()
    }

    /// Pooled connections (idle and in use) across all projects.
    /// The SQL connection budget of all PostgreSQL projects' pools (0: not sized yet, before
    /// the first SQL request).
    pub fn connection_budget(&self) -> usize {
        self.budget.size()
    }

    pub fn connection_count(&self) -> usize {
        self.pools
            .lock()
            .expect("poisoned")
            .values()
            .map(|rp| rp.pool.status().size)
            .sum()
    }

    pub(super) fn role_pool(&self, project: &Project, role: DbRole) -> Result<RolePool, SqlError> {
        let key = (project.id.clone(), role);
        let mut pools = self.pools.lock().expect("poisoned");
        if let Some(rp) = pools.get(&key) {
            return Ok(rp.clone());
        }
        let user = role.role_name(&project.id);
        let password = crate::projects::role_password(&self.secrets, &user);
        let login = Arc::new(crate::projects::RoleLogin::new(
            self.repairs.clone(),
            &user,
            password.clone(),
            self.temp_file_limit_kb,
        ));
        let cfg = ConnectConfig {
            host: self.host.clone(),
            port: self.port,
            password: Some(password),
            user,
            database: project.db_name.clone(),
            application_name: Some("fluxbase-sql".into()),
            options: vec![
                (
                    "statement_timeout".into(),
                    self.statement_timeout.as_millis().to_string(),
                ),
                ("DateStyle".into(), "ISO, MDY".into()),
                ("IntervalStyle".into(), "postgres".into()),
                ("TimeZone".into(), "UTC".into()),
                ("extra_float_digits".into(), "1".into()),
                ("idle_in_transaction_session_timeout".into(), "60000".into()),
            ],
            replication: false,
            connect_timeout: Duration::from_secs(5),
        };
        let manager = BudgetedManager {
            inner: WireManager::new(cfg.clone(), login),
            budget: self.budget.clone(),
        };
        let pool = Pool::builder(manager)
            .max_size(self.pool_size)
            .wait_timeout(Some(Duration::from_secs(10)))
            // The budget's wait plus a login (which finishes in its own task if this expires).
            .create_timeout(Some(self.queue_timeout + LOGIN_BOUND))
            .runtime(deadpool::Runtime::Tokio1)
            .build()
            .map_err(|e| anyhow::anyhow!("building a pool: {e}"))?;
        let rp = RolePool { pool, cfg };
        pools.insert(key, rp.clone());
        Ok(rp)
    }

    /// A connection for `project`: first a place in its share, then in its account's (one
    /// wait for both), then one from the pool.
    pub(super) async fn checkout(
        &self,
        project: &Project,
        rp: &RolePool,
    ) -> Result<Checkout, SqlError> {
        self.budget.ensure(&self.control).await?;
        let deadline = tokio::time::Instant::now() + self.queue_timeout;
        let (size, nodes) = self.project_share();
        let share = match self.shares.acquire(&project.id, size, deadline).await {
            Ok(permit) => permit,
            _ if nodes > 1 => {
                return Err(SqlError::Busy(format!(
                    "This project already runs {size} SQL requests at once on this node (its \
                     share of sql_project_connections = {} across {nodes} nodes); retry when one \
                     has finished.",
                    self.project_share
                )))
            }
            _ => {
                return Err(SqlError::Busy(format!(
                    "This project already runs {} SQL requests at once (sql_project_connections); \
                     retry when one has finished.",
                    self.project_share
                )))
            }
        };
        let shares = super::shares::SharePlaces {
            project: share,
            account: self
                .accounts
                .place(project, self.nodes(), self.budget.size(), deadline)
                .await?,
        };
        let conn = rp.pool.get().await.map_err(|e| match e {
            managed::PoolError::Backend(PoolFailure::Wire(WireError::Auth(m))) => {
                SqlError::Login(m)
            }
            managed::PoolError::Backend(PoolFailure::Budget(n)) => SqlError::Busy(format!(
                "All {n} SQL connections of the server are in use (sql_max_connections); \
                 retry in a moment."
            )),
            managed::PoolError::Backend(PoolFailure::Busy(m)) => SqlError::Busy(m),
            managed::PoolError::Timeout(_) => SqlError::Busy(
                "No SQL connection of this project became available in time; retry in a moment."
                    .into(),
            ),
            other => SqlError::Unavailable(other.to_string()),
        })?;
        Ok(Checkout {
            conn,
            _shares: shares,
            budget: self.budget.clone(),
            plain: false,
        })
    }

    /// A pooled connection to `project` as `role`, for the server's own statements (the RLS
    /// policy API, realtime's policy checks); give it back with [`release`].
    pub async fn connection(&self, project: &Project, role: DbRole) -> Result<Checkout, SqlError> {
        let rp = self.role_pool(project, role)?;
        self.checkout(project, &rp).await
    }
}
