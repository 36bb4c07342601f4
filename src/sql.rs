//! `POST /api/execute-sql`: the caller's SQL, run as the project role of its scope.
//!
//! ```text
//!  request ─► Access (scope → role) ─► pool[(project, role)] ─► wire::Connection (text results)
//!                                                                   │ rows: text + type OID
//!                              response JSON ◄─ values::write_json ◄┘ (PostgreSQL's to_json rules)
//! ```
//! Without `params` the text goes through the simple query protocol, so a script of several
//! statements runs in one implicit transaction and answers with its last statement's result.
//! With `params` it is one statement through the extended protocol: PostgreSQL infers each
//! parameter's type and the JSON value is converted to that type's text input.
//!
//! Connections log in as `fx_<project>_<role>`: never a superuser, never a role that can
//! `SET ROLE` to a stronger one. After each request the connection is reset (`ROLLBACK` if a
//! transaction was left open, then `DISCARD ALL`) off the response path; one that cannot be reset
//! is dropped. A statement that outlives `statement_timeout` (which the caller could lower or
//! disable with `SET`) is cancelled by the server side guard here as well.
//!
//! # Sharing the cluster's connections
//!
//! ```text
//!  request ─► project share (sql_project_connections, wait ≤ sql_queue_timeout_ms, then 429)
//!               ─► pool[(project, role)] ─► idle connection, or a new one:
//!                    global budget (sql_max_connections ≤ ¾ of what the cluster's max_connections
//!                    leaves after its reserved ones, other clients and this server's own)
//!                    ├─ a permit free → connect
//!                    ├─ none: close the longest-idle connection of any pool → connect
//!                    └─ none idle: wait ≤ sql_queue_timeout_ms, then 429
//!  reaper: every pooled connection idle for sql_idle_timeout_secs is closed
//! ```
//! A noisy project therefore waits on its own share while the rest of the budget serves the
//! others, and what an attack opened is closed again once it is over.

use std::collections::HashMap;
use std::sync::{Arc, Mutex, RwLock};
use std::time::{Duration, Instant};

use deadpool::managed::{self, Metrics as PoolMetrics, Object, RecycleError, RecycleResult};
use fluxbase_replication::values::{self, TypeRegistry};
use fluxbase_replication::wire::{
    self, ConnectConfig, Connection, DbError, Phase, StatementResult, TransactionStatus, WireError,
};
use serde::Deserialize;
use serde_json::Value;

use crate::api::error::{ApiError, ApiResult};
use crate::app::App;
use crate::auth::{Access, DbRole, Project};
use crate::config::Config;
use crate::db::ClusterTarget;

/// Extra time past `statement_timeout` before the server cancels a statement itself.
const GUARD_GRACE: Duration = Duration::from_secs(2);

#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct SqlRequest {
    pub project_id: String,
    pub query: String,
    #[serde(default)]
    pub params: Option<Vec<Value>>,
    /// The end user a trusted backend acts for (`auth.uid()`, see [`crate::rls`]); checked
    /// there, so that a mistyped value is an error naming the field.
    #[serde(default)]
    pub auth_uid: Option<Value>,
}

/// A pooled project connection and what its `auth.identity` row holds (see [`crate::rls`]).
pub struct PooledConnection {
    conn: Connection,
    pub identity: crate::rls::KnownIdentity,
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
        Ok(PooledConnection {
            conn: self.login.connect(&self.cfg).await?,
            identity: crate::rls::KnownIdentity::Unknown,
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
type PoolMap = Mutex<HashMap<(String, DbRole), RolePool>>;

#[derive(Clone)]
struct RolePool {
    pool: Pool,
    cfg: ConnectConfig,
}

/// The connections all SQL pools may hold together (see the module docs), sized from the
/// cluster's `max_connections` on first use.
pub struct Budget {
    permits: tokio::sync::OnceCell<(Arc<tokio::sync::Semaphore>, usize)>,
    configured: usize,
    wait: Duration,
    pools: std::sync::Weak<PoolMap>,
    /// Signalled when a request gives a connection back (it is idle now: closable).
    idle: tokio::sync::Notify,
}

impl Budget {
    /// Sizes the budget from the cluster (once, at the first SQL request): three quarters of
    /// the connections left after the reserved ones, those other clients hold at that moment
    /// and a margin for this server's own ([`OWN_CONNECTIONS_MARGIN`]), or
    /// `sql_max_connections` if that is lower.
    async fn ensure(&self, control: &deadpool_postgres::Pool) -> ApiResult<()> {
        self.permits
            .get_or_try_init(|| async {
                let row = control
                    .get()
                    .await?
                    .query_one(
                        "SELECT current_setting('max_connections')::int,
                                current_setting('superuser_reserved_connections')::int
                                + coalesce(current_setting('reserved_connections', true), '0')::int,
                                (SELECT count(*)::int FROM pg_catalog.pg_stat_activity
                                 WHERE backend_type IN ('client backend', 'walsender')
                                   AND application_name IS DISTINCT FROM 'fluxbase-sql')",
                        &[],
                    )
                    .await?;
                let (max, reserved, others): (i32, i32, i32) = (row.get(0), row.get(1), row.get(2));
                // What the cluster's other clients hold now (this server's control pool and
                // streams, CLI commands, other servers), and room for this server's own
                // sessions to grow to their maximum.
                let left = max - reserved - others - OWN_CONNECTIONS_MARGIN;
                let auto = (left.max(4) as usize) * 3 / 4;
                let size = match self.configured {
                    0 => auto,
                    n => n.min(auto),
                };
                tracing::info!(
                    max_connections = max,
                    other_connections = others,
                    budget = size,
                    "SQL connection budget"
                );
                Ok::<_, ApiError>((Arc::new(tokio::sync::Semaphore::new(size)), size))
            })
            .await?;
        Ok(())
    }

    /// A place for one more connection: a free one, or one freed by closing an idle
    /// connection of any pool, or one that frees up within the wait.
    async fn permit(&self) -> Result<tokio::sync::OwnedSemaphorePermit, PoolFailure> {
        let Some((permits, size)) = self.permits.get() else {
            return Err(PoolFailure::Budget(0));
        };
        let deadline = tokio::time::Instant::now() + self.wait;
        loop {
            if let Ok(p) = permits.clone().try_acquire_owned() {
                return Ok(p);
            }
            // Registered before looking for idle connections, so none going idle is missed.
            let went_idle = self.idle.notified();
            tokio::pin!(went_idle);
            went_idle.as_mut().enable();
            // A closed connection gives its permit back as it finishes closing.
            self.close_longest_idle();
            tokio::select! {
                p = permits.clone().acquire_owned() => match p {
                    Ok(p) => return Ok(p),
                    Err(_) => return Err(PoolFailure::Budget(*size)),
                },
                _ = &mut went_idle => continue,
                _ = tokio::time::sleep_until(deadline) => return Err(PoolFailure::Budget(*size)),
            }
        }
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

/// Connection pools per (project, role) and the per-project type catalogs.
pub struct SqlPools {
    host: String,
    port: u16,
    pool_size: usize,
    statement_timeout: Duration,
    pools: Arc<PoolMap>,
    budget: Arc<Budget>,
    /// Per project: requests that may hold a connection at once.
    shares: Mutex<HashMap<String, Arc<tokio::sync::Semaphore>>>,
    project_share: usize,
    queue_timeout: Duration,
    types: Mutex<HashMap<String, Arc<RwLock<TypeRegistry>>>>,
    statements: Mutex<HashMap<String, Arc<StatementCache>>>,
    /// Admin sessions for the role repairs of new connections (see
    /// [`crate::projects::RoleLogin`]): never the control pool that serves requests.
    pub repairs: deadpool_postgres::Pool,
}

/// Connections kept out of the SQL budget besides those in use when it is sized (which include
/// this server's control and role-repair sessions open by then): room for those pools to grow,
/// change streams and CLI commands started later.
const OWN_CONNECTIONS_MARGIN: i32 = 8;

/// Admin sessions the role repairs may use at once, and how long a login waits for one. A
/// repair holds its session for one login (its lock waits are 200 ms each), so the wait is a
/// queue of logins, not of attackers; it stays well below the SQL pool's create timeout.
const REPAIR_CONNECTIONS: usize = 4;
const REPAIR_WAIT: Duration = Duration::from_secs(10);

fn repair_pool(cluster: &ClusterTarget) -> deadpool_postgres::Pool {
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

/// Parameter types PostgreSQL inferred for statements a project ran before, so that the next
/// run of the same text needs one round trip (`query_oneshot`) instead of two. A stale entry
/// (the schema changed) can only make PostgreSQL refuse a parameter at Bind, before anything
/// ran; the statement is then prepared afresh and the entry replaced.
#[derive(Default)]
pub struct StatementCache {
    params: Mutex<HashMap<String, Arc<[u32]>>>,
}

impl StatementCache {
    const CAPACITY: usize = 1024;

    fn get(&self, sql: &str) -> Option<Arc<[u32]>> {
        self.params.lock().expect("poisoned").get(sql).cloned()
    }

    fn put(&self, sql: &str, types: &[u32]) {
        let mut map = self.params.lock().expect("poisoned");
        if map.len() >= Self::CAPACITY {
            map.clear();
        }
        map.insert(sql.to_string(), types.into());
    }

    fn forget(&self, sql: &str) {
        self.params.lock().expect("poisoned").remove(sql);
    }
}

impl SqlPools {
    pub fn new(config: &Config, cluster: &ClusterTarget) -> SqlPools {
        let pools: Arc<PoolMap> = Arc::default();
        let queue_timeout = Duration::from_millis(config.sql_queue_timeout_ms);
        let idle_timeout = Duration::from_secs(config.sql_idle_timeout_secs);
        if let Ok(runtime) = tokio::runtime::Handle::try_current() {
            runtime.spawn(close_idle(Arc::downgrade(&pools), idle_timeout));
        }
        SqlPools {
            host: cluster.host.clone(),
            port: cluster.port,
            pool_size: config.pool_size,
            statement_timeout: config.statement_timeout(),
            budget: Arc::new(Budget {
                permits: tokio::sync::OnceCell::new(),
                configured: config.sql_max_connections,
                wait: queue_timeout,
                pools: Arc::downgrade(&pools),
                idle: tokio::sync::Notify::new(),
            }),
            repairs: repair_pool(cluster),
            pools,
            shares: Mutex::new(HashMap::new()),
            project_share: config.sql_project_connections,
            queue_timeout,
            types: Mutex::new(HashMap::new()),
            statements: Mutex::new(HashMap::new()),
        }
    }

    /// The project's share of connections.
    fn share(&self, project_id: &str) -> Arc<tokio::sync::Semaphore> {
        self.shares
            .lock()
            .expect("poisoned")
            .entry(project_id.to_string())
            .or_insert_with(|| Arc::new(tokio::sync::Semaphore::new(self.project_share)))
            .clone()
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
        self.types.lock().expect("poisoned").remove(project_id);
        self.statements.lock().expect("poisoned").remove(project_id);
        self.shares.lock().expect("poisoned").remove(project_id);
    }

    pub fn clear(&self) {
        for (_, rp) in self.pools.lock().expect("poisoned").drain() {
            rp.pool.close();
        }
    }

    /// The project's type registry, shared by the SQL API and the change stream.
    pub fn types(&self, project_id: &str) -> Arc<RwLock<TypeRegistry>> {
        self.types
            .lock()
            .expect("poisoned")
            .entry(project_id.to_string())
            .or_insert_with(|| Arc::new(RwLock::new(TypeRegistry::new())))
            .clone()
    }

    fn statements(&self, project_id: &str) -> Arc<StatementCache> {
        self.statements
            .lock()
            .expect("poisoned")
            .entry(project_id.to_string())
            .or_default()
            .clone()
    }

    /// Pooled connections (idle and in use) across all projects.
    pub fn connection_count(&self) -> usize {
        self.pools
            .lock()
            .expect("poisoned")
            .values()
            .map(|rp| rp.pool.status().size)
            .sum()
    }
}

/// Closes pooled connections idle for `idle_timeout`, until the pools are gone.
async fn close_idle(pools: std::sync::Weak<PoolMap>, idle_timeout: Duration) {
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
            let removed = pool.retain(|_, m| m.last_used() < idle_timeout);
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

/// A pooled connection checked out for a request, holding its project's share until released.
pub struct Checkout {
    conn: Object<BudgetedManager>,
    _share: tokio::sync::OwnedSemaphorePermit,
    budget: Arc<Budget>,
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

impl App {
    fn role_pool(&self, project: &Project, role: DbRole) -> ApiResult<RolePool> {
        let key = (project.id.clone(), role);
        let mut pools = self.sql.pools.lock().expect("poisoned");
        if let Some(rp) = pools.get(&key) {
            return Ok(rp.clone());
        }
        let user = role.role_name(&project.id);
        let login = Arc::new(self.projects.role_login(&user));
        let cfg = ConnectConfig {
            host: self.sql.host.clone(),
            port: self.sql.port,
            password: Some(self.projects.role_password(&user)),
            user,
            database: project.db_name.clone(),
            application_name: Some("fluxbase-sql".into()),
            options: vec![
                (
                    "statement_timeout".into(),
                    self.sql.statement_timeout.as_millis().to_string(),
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
            budget: self.sql.budget.clone(),
        };
        let pool = Pool::builder(manager)
            .max_size(self.sql.pool_size)
            .wait_timeout(Some(Duration::from_secs(10)))
            // The budget's wait plus a login (which finishes in its own task if this expires).
            .create_timeout(Some(self.sql.queue_timeout + Duration::from_secs(30)))
            .runtime(deadpool::Runtime::Tokio1)
            .build()
            .map_err(|e| anyhow::anyhow!("building a pool: {e}"))?;
        let rp = RolePool { pool, cfg };
        pools.insert(key, rp.clone());
        Ok(rp)
    }

    /// A connection for `project`: first a place in its share, then one from the pool.
    async fn checkout(&self, project: &Project, rp: &RolePool) -> ApiResult<Checkout> {
        self.sql.budget.ensure(&self.control).await?;
        let share = self.sql.share(&project.id);
        let share = match tokio::time::timeout(self.sql.queue_timeout, share.acquire_owned()).await
        {
            Ok(Ok(permit)) => permit,
            _ => {
                return Err(ApiError::Busy(format!(
                    "This project already runs {} SQL requests at once (sql_project_connections); \
                     retry when one has finished.",
                    self.sql.project_share
                )))
            }
        };
        let conn = rp.pool.get().await.map_err(|e| match e {
            managed::PoolError::Backend(PoolFailure::Wire(WireError::Auth(m))) => {
                ApiError::Internal(anyhow::anyhow!("project role login failed: {m}"))
            }
            managed::PoolError::Backend(PoolFailure::Budget(n)) => ApiError::Busy(format!(
                "All {n} SQL connections of the server are in use (sql_max_connections); \
                 retry in a moment."
            )),
            managed::PoolError::Backend(PoolFailure::Busy(m)) => ApiError::Busy(m),
            managed::PoolError::Timeout(_) => ApiError::Busy(
                "No SQL connection of this project became available in time; retry in a moment."
                    .into(),
            ),
            other => ApiError::DatabaseUnavailable(other.to_string()),
        })?;
        Ok(Checkout {
            conn,
            _share: share,
            budget: self.sql.budget.clone(),
        })
    }

    /// A pooled connection to `project` as `role`, for the server's own statements (the RLS
    /// policy API); give it back with [`release`].
    pub async fn sql_connection(&self, project: &Project, role: DbRole) -> ApiResult<Checkout> {
        let rp = self.role_pool(project, role)?;
        self.checkout(project, &rp).await
    }

    /// Runs a request's SQL as `identity` (`auth.uid()`, see [`crate::rls`]) and renders the
    /// guide's success or SQL_EXEC_ERROR body.
    pub async fn execute_sql(
        &self,
        access: &Access,
        req: SqlRequest,
        identity: Option<String>,
    ) -> ApiResult<String> {
        let started = Instant::now();
        let rp = self.role_pool(&access.project, access.db_role)?;
        let mut conn = self.checkout(&access.project, &rp).await?;
        let types = self.sql.types(&access.project.id);
        let statements = self.sql.statements(&access.project.id);
        let budget = self.sql.statement_timeout + GUARD_GRACE;
        let backend_key = conn.backend_key();
        // Row data kept while reading; the rendered answer is capped again below (JSON escapes
        // can make it longer than PostgreSQL's text).
        conn.set_max_result_bytes(self.config.max_response_bytes);
        let outcome = {
            let run = async {
                let PooledConnection {
                    conn,
                    identity: known,
                } = &mut *conn;
                self.establish_identity(&access.project, conn, known, identity.as_deref())
                    .await
                    .map_err(SqlFailure::Identity)?;
                run(conn, &req, self.config.max_rows, &types, &statements).await
            };
            tokio::pin!(run);
            tokio::select! {
                r = &mut run => r,
                _ = tokio::time::sleep(budget) => {
                    tracing::warn!(project_id = %access.project.id, "statement outlived its budget; cancelling");
                    let _ = wire::cancel(&rp.cfg, backend_key).await;
                    match tokio::time::timeout(Duration::from_secs(5), &mut run).await {
                        Ok(r) => r,
                        Err(_) => Err(SqlFailure::Wire(WireError::Timeout)),
                    }
                }
            }
        };
        release(conn);
        let elapsed = started.elapsed();
        self.metrics.observe_sql(elapsed, outcome.is_ok());
        match outcome {
            Ok(result) => {
                let reg = types.read().expect("poisoned");
                Ok(render_success(
                    result.as_ref(),
                    &reg,
                    elapsed,
                    self.config.max_response_bytes,
                ))
            }
            Err(SqlFailure::Param {
                index,
                message,
                sqlstate,
            }) => Ok(render_sql_error(
                &format!("invalid value for parameter ${index}: {message}"),
                &sqlstate,
                "ERROR",
            )),
            Err(SqlFailure::Wire(WireError::Db(e))) if !e.is_fatal() => Ok(render_db_error(&e)),
            Err(SqlFailure::Wire(WireError::InvalidInput(m))) => {
                Ok(render_sql_error(&m, "22021", "ERROR"))
            }
            Err(SqlFailure::Wire(e)) => Err(ApiError::DatabaseUnavailable(e.to_string())),
            Err(SqlFailure::Identity(e)) => {
                tracing::error!(project_id = %access.project.id, error = %e, "could not set the request's identity");
                Err(ApiError::DatabaseUnavailable(format!(
                    "setting the request's identity: {e}"
                )))
            }
        }
    }
}

enum SqlFailure {
    Wire(WireError),
    /// `auth.set_uid` failed: the caller's SQL was not sent.
    Identity(WireError),
    Param {
        index: usize,
        message: String,
        sqlstate: String,
    },
}

impl From<WireError> for SqlFailure {
    fn from(e: WireError) -> Self {
        SqlFailure::Wire(e)
    }
}

async fn run(
    conn: &mut Connection,
    req: &SqlRequest,
    max_rows: usize,
    types: &RwLock<TypeRegistry>,
    statements: &StatementCache,
) -> Result<Option<StatementResult>, SqlFailure> {
    let result = match req.params.as_deref() {
        None | Some([]) => conn.simple_query(&req.query, max_rows).await?.last,
        Some(params) => {
            Some(run_with_params(conn, req, params, max_rows, types, statements).await?)
        }
    };
    if let Some(result) = &result {
        let oids: Vec<u32> = result.columns.iter().map(|c| c.type_oid).collect();
        // A failed transaction cannot run the catalog query; unknown types then render as text.
        if conn.transaction_status() != TransactionStatus::Failed {
            learn_types(conn, types, &oids).await?;
        }
    }
    Ok(result)
}

/// One statement with `$n` parameters: one round trip when the parameter types are known from
/// an earlier run, else prepare (learning them) and execute.
async fn run_with_params(
    conn: &mut Connection,
    req: &SqlRequest,
    params: &[Value],
    max_rows: usize,
    types: &RwLock<TypeRegistry>,
    statements: &StatementCache,
) -> Result<StatementResult, SqlFailure> {
    if let Some(known) = statements
        .get(&req.query)
        .filter(|t| t.len() == params.len())
    {
        let texts = params_to_text(params, &known, types)?;
        match conn.query_oneshot(&req.query, &texts, max_rows).await {
            Err(WireError::Db(e)) if e.phase == Phase::Bind => statements.forget(&req.query),
            other => return Ok(other?),
        }
    }
    let prepared = conn.prepare(&req.query).await?;
    learn_types(conn, types, &prepared.param_types).await?;
    let texts = params_to_text(params, &prepared.param_types, types)?;
    match conn.execute_prepared(&texts, max_rows).await {
        Err(WireError::Db(e)) if e.phase == Phase::Bind => Err(bind_failure(e)),
        other => {
            statements.put(&req.query, &prepared.param_types);
            Ok(other?)
        }
    }
}

/// JSON parameters as text input for the types PostgreSQL inferred (text for extra ones, which
/// PostgreSQL then refuses with its own count error).
fn params_to_text(
    params: &[Value],
    param_types: &[u32],
    types: &RwLock<TypeRegistry>,
) -> Result<Vec<Option<String>>, SqlFailure> {
    let reg = types.read().expect("poisoned");
    params
        .iter()
        .enumerate()
        .map(|(i, value)| {
            let oid = param_types.get(i).copied().unwrap_or(25);
            values::param_to_text(value, oid, &reg).map_err(|e| SqlFailure::Param {
                index: i + 1,
                message: e.to_string(),
                sqlstate: "22023".into(),
            })
        })
        .collect()
}

/// Teaches the project's registry the user-defined types among `oids` (enums, domains,
/// composites, their arrays) by querying the catalog until nothing is missing.
async fn learn_types(
    conn: &mut Connection,
    types: &RwLock<TypeRegistry>,
    oids: &[u32],
) -> Result<(), SqlFailure> {
    for _ in 0..8 {
        let missing = types.read().expect("poisoned").missing(oids);
        if missing.is_empty() {
            return Ok(());
        }
        let outcome = conn
            .simple_query(&TypeRegistry::catalog_query(&missing), usize::MAX)
            .await?;
        let rows = outcome.last.map(|r| r.rows).unwrap_or_default();
        if let Err(e) = types.write().expect("poisoned").absorb(&rows) {
            tracing::warn!(error = %e, "could not learn types from the catalog");
            return Ok(());
        }
    }
    Ok(())
}

/// A parameter PostgreSQL refused at Bind: name it (`$N`) in the error.
fn bind_failure(e: Box<DbError>) -> SqlFailure {
    let index = e
        .where_
        .as_deref()
        .and_then(|w| w.split('$').nth(1))
        .and_then(|rest| rest.split(|c: char| !c.is_ascii_digit()).next())
        .and_then(|n| n.parse::<usize>().ok());
    match index {
        Some(index) => SqlFailure::Param {
            index,
            message: e.message,
            sqlstate: e.code,
        },
        None => SqlFailure::Wire(WireError::Db(e)),
    }
}

/// Returns the connection to its pool with a reset queued: `DISCARD ALL` travels in the same
/// write as the next request's query. A transaction left open is rolled back first, here.
pub fn release(conn: Checkout) {
    let Checkout {
        mut conn,
        _share,
        budget,
    } = conn;
    if conn.is_broken() {
        let _ = Object::take(conn);
        return;
    }
    if conn.transaction_status() == TransactionStatus::Idle {
        conn.queue_prelude("DISCARD ALL");
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
        conn.queue_prelude("DISCARD ALL");
        drop(conn);
        budget.idle.notify_waiters();
    });
}

/// The verb of a command tag: `INSERT 0 1` → `INSERT`, `CREATE TABLE` → `CREATE TABLE`.
pub fn operation(tag: &str) -> String {
    tag.split(' ')
        .filter(|w| !w.is_empty() && !w.bytes().all(|b| b.is_ascii_digit()))
        .collect::<Vec<_>>()
        .join(" ")
}

/// Rows returned or affected: the tag's count, else the rows we have.
pub fn row_count(tag: &str, rows: usize) -> u64 {
    tag.rsplit(' ')
        .next()
        .and_then(|n| n.parse().ok())
        .unwrap_or(rows as u64)
}

fn json_str(s: &str) -> String {
    serde_json::to_string(s).expect("strings serialize")
}

/// The success body, at most about `max_bytes` long: rows that would pass it are left out and
/// the answer says `truncated: true`.
fn render_success(
    result: Option<&StatementResult>,
    reg: &TypeRegistry,
    elapsed: Duration,
    max_bytes: usize,
) -> String {
    let empty = StatementResult::default();
    let r = result.unwrap_or(&empty);
    let op = operation(&r.command_tag);
    let count = row_count(&r.command_tag, r.rows.len());
    let names: Vec<String> = r.columns.iter().map(|c| json_str(&c.name)).collect();
    // What follows the rows: column names, counts, message, timing.
    let tail = 256 + names.iter().map(|n| n.len() + 1).sum::<usize>() + r.command_tag.len() * 2;
    let row_budget = max_bytes.saturating_sub(tail);
    let mut truncated = r.truncated;
    let mut out = String::with_capacity((128 + r.rows.len() * 64).min(row_budget));
    out.push_str("{\"success\":true,\"result\":{\"rows\":[");
    for (i, row) in r.rows.iter().enumerate() {
        let mark = out.len();
        if i > 0 {
            out.push(',');
        }
        out.push('{');
        for (j, (col, value)) in r.columns.iter().zip(row).enumerate() {
            if j > 0 {
                out.push(',');
            }
            out.push_str(&names[j]);
            out.push(':');
            values::write_json(&mut out, col.type_oid, value.as_deref(), reg);
        }
        out.push('}');
        if out.len() > row_budget {
            out.truncate(mark);
            truncated = true;
            break;
        }
    }
    out.push_str("],\"columns\":[");
    out.push_str(&names.join(","));
    out.push_str("],\"rowCount\":");
    out.push_str(&count.to_string());
    out.push_str(",\"message\":");
    if op == "SELECT" || r.command_tag.is_empty() {
        out.push_str("null");
    } else {
        out.push_str(&json_str(&r.command_tag));
    }
    out.push_str(",\"truncated\":");
    out.push_str(if truncated { "true" } else { "false" });
    out.push_str("},\"executionInfo\":{\"time\":");
    out.push_str(&json_str(&format!("{}ms", elapsed.as_millis())));
    out.push_str(",\"rowCount\":");
    out.push_str(&count.to_string());
    out.push_str(",\"operation\":");
    if op.is_empty() {
        out.push_str("null");
    } else {
        out.push_str(&json_str(&op));
    }
    out.push_str("}}");
    out
}

fn render_db_error(e: &DbError) -> String {
    let mut error = serde_json::json!({
        "message": e.message,
        "code": "SQL_EXEC_ERROR",
        "details": format!("{}:  {}", if e.severity.is_empty() { "ERROR" } else { &e.severity }, e.code),
    });
    for (field, value) in [("hint", &e.hint), ("detail", &e.detail)] {
        if let Some(v) = value {
            error[field] = Value::String(v.clone());
        }
    }
    if let Some(p) = e.position {
        error["position"] = Value::from(p);
    }
    serde_json::json!({ "success": false, "error": error }).to_string()
}

fn render_sql_error(message: &str, sqlstate: &str, severity: &str) -> String {
    serde_json::json!({
        "success": false,
        "error": { "message": message, "code": "SQL_EXEC_ERROR", "details": format!("{severity}:  {sqlstate}") }
    })
    .to_string()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn operations_and_counts_come_from_the_command_tag() {
        assert_eq!(operation("SELECT 3"), "SELECT");
        assert_eq!(operation("INSERT 0 12"), "INSERT");
        assert_eq!(operation("CREATE TABLE"), "CREATE TABLE");
        assert_eq!(row_count("INSERT 0 12", 0), 12);
        assert_eq!(row_count("UPDATE 4", 0), 4);
        assert_eq!(row_count("CREATE TABLE", 0), 0);
    }

    #[test]
    fn bind_errors_name_the_parameter() {
        let e = DbError {
            severity: "ERROR".into(),
            code: "22P02".into(),
            message: "invalid input syntax for type integer: \"x\"".into(),
            detail: None,
            hint: None,
            position: None,
            internal_position: None,
            internal_query: None,
            where_: Some("unnamed portal parameter $2 = '...'".into()),
            schema: None,
            table: None,
            column: None,
            datatype: None,
            constraint: None,
            phase: Phase::Bind,
        };
        match bind_failure(Box::new(e)) {
            SqlFailure::Param { index, .. } => assert_eq!(index, 2),
            SqlFailure::Wire(_) | SqlFailure::Identity(_) => {
                panic!("expected a parameter failure")
            }
        }
    }
}
