//! `POST /api/execute-sql` on a MySQL project: the caller's SQL as the account of its scope,
//! answered in the guide's shapes, exactly as for PostgreSQL (see `crate::sql`).
//!
//! ```text
//!  request ─► project share (sql_project_connections) ┐ ≤ sql_queue_timeout_ms, then 429
//!           ─► account share (sql_account_connections) ┘ (`crate::sql::shares`)
//!           ─► pool[(project, account)] (mysql_async, ≤ min(pool_size, share) connections,
//!              COM_RESET_CONNECTION when a connection comes back, idle ones closed)
//!           ─► no params: the text protocol, a script of several statements allowed
//!              params:    one prepared statement, `$n` rewritten to `?` (or `?` as written)
//!           ─► rows rendered as they arrive (render.rs) into the answer's text, within
//!              max_rows / max_response_bytes and the answer budget (`crate::sql::building`)
//!  guard: past statement_timeout + 2 s the server's own account runs KILL QUERY <connection>
//! ```
//! Each request runs in a fresh session: the pool resets the connection (`Conn::reset`,
//! COM_RESET_CONNECTION: variables, temporary tables, prepared statements, locks, an open
//! transaction all gone) before the next request gets it, and then sets the statement
//! timeout again (`max_statement_time` on MariaDB, `max_execution_time` on MySQL). A script
//! answers with its last statement's result, as on PostgreSQL; unlike PostgreSQL, statements
//! before a failing one stay done (MySQL commits each statement on its own unless the script
//! opens a transaction, and DDL commits implicitly).

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use mysql_async::prelude::Queryable;
use mysql_async::{Column, Conn, Opts, OptsBuilder, Value};
use serde_json::Value as Json;

use super::render::{write_json, ColumnKind};
use super::Mysql;
use crate::auth::{Access, DbRole};
use crate::config::Config;

use crate::sql::shares::{AccountShares, KeyedShares, SharePlaces};
use crate::sql::{AnswerMemory, AnswerText, SqlError, SqlRequest};

/// Extra time past `statement_timeout` before the server kills a statement itself (the
/// caller may have raised or disabled `max_statement_time` for its session).
const GUARD_GRACE: Duration = Duration::from_secs(2);

/// The SQL connections of MySQL projects: idle ones per (project, account), all of them within
/// one budget for the server (see [`Budget`]).
pub struct Pools {
    idle: Arc<Mutex<IdleMap>>,
    budget: Budget,
    /// MariaDB's JSON columns per project (table, column): MariaDB sends them as LONGTEXT,
    /// so they are known from their `json_valid` check in the catalog. Emptied by DDL.
    json_columns: Mutex<HashMap<String, Arc<JsonColumns>>>,
    shares: KeyedShares,
    /// Per account (all its projects together): requests that may hold a connection at once
    /// (`sql_account_connections`).
    accounts: AccountShares,
    /// Cluster mode: `sql_account_connections` is an account's bound across the cluster, and
    /// this node's share of it is [`crate::cluster::per_node`] (as on PostgreSQL). The project
    /// share needs no split here: the MySQL server bounds each project account to
    /// `sql_project_connections` sessions itself (`MAX_USER_CONNECTIONS`), whatever the node.
    cluster: std::sync::OnceLock<Arc<crate::cluster::leadership::Leadership>>,
    pool_size: usize,
    project_share: usize,
    queue_timeout: Duration,
    idle_timeout: Duration,
    statement_timeout: Duration,
    max_rows: usize,
    max_response_bytes: usize,
    /// Account repairs after a refused login run one at a time, and never during or after a
    /// deprovisioning of their project (its accounts refused because they were dropped: a
    /// repair would make them and the database again, behind the deletion).
    pub(super) repair: tokio::sync::Mutex<()>,
    /// Projects deprovisioned in the last [`GONE_FOR`] (by id), under `repair`'s lock.
    pub(super) gone: std::sync::Mutex<HashMap<String, std::time::Instant>>,
}

/// How long a deprovisioned project's accounts are never repaired: longer than any request
/// that authenticated before its deletion can last.
const GONE_FOR: Duration = Duration::from_secs(600);

/// Idle connections per (project, account), the most recently used last.
type IdleMap = HashMap<(String, DbRole), Vec<Idle>>;

/// A connection with its place in the budget.
struct Held {
    conn: Conn,
    permit: tokio::sync::OwnedSemaphorePermit,
}

struct Idle {
    held: Held,
    since: Instant,
}

/// The connections all MySQL projects' sessions may hold together, as for PostgreSQL projects
/// (`crate::sql::pool`): three quarters of what the server's `max_connections` leaves after
/// the connections other clients hold when the first request comes and a margin for this
/// server's own (admin pool, binlog dumps), or `sql_max_connections` if lower. A request that
/// needs a new connection with none free closes the longest-idle connection of any project;
/// with none idle it waits up to `sql_queue_timeout_ms`, then 429. (Not `crate::sql::pool`'s
/// type itself: that one sizes from PostgreSQL and closes deadpool pools' connections.)
struct Budget {
    permits: tokio::sync::OnceCell<(Arc<tokio::sync::Semaphore>, usize)>,
    configured: usize,
    /// Signalled when a connection goes idle or closes (a waiting request may use it).
    went_idle: Arc<tokio::sync::Notify>,
}

/// Connections of the server kept out of the budget besides those open when it is sized.
const OWN_CONNECTIONS_MARGIN: i64 = 8;

impl Pools {
    pub fn new(config: &Config) -> Pools {
        Pools {
            idle: Arc::default(),
            budget: Budget {
                permits: tokio::sync::OnceCell::new(),
                configured: config.sql_max_connections,
                went_idle: Arc::default(),
            },
            json_columns: Mutex::default(),
            shares: KeyedShares::default(),
            accounts: AccountShares::new(
                config.sql_account_connections,
                config.sql_project_connections,
            ),
            cluster: std::sync::OnceLock::new(),
            pool_size: config.pool_size.max(1),
            project_share: config.sql_project_connections,
            queue_timeout: Duration::from_millis(config.sql_queue_timeout_ms),
            idle_timeout: Duration::from_secs(config.sql_idle_timeout_secs),
            statement_timeout: config.statement_timeout(),
            max_rows: config.max_rows,
            max_response_bytes: config.max_response_bytes,
            repair: tokio::sync::Mutex::new(()),
            gone: Default::default(),
        }
    }

    /// Marks a project as deprovisioned (the caller holds `repair`'s lock); forgets marks
    /// older than [`GONE_FOR`].
    pub(super) fn mark_gone(&self, project_id: &str) {
        let mut gone = self.gone.lock().expect("poisoned");
        gone.retain(|_, at| at.elapsed() < GONE_FOR);
        gone.insert(project_id.to_string(), std::time::Instant::now());
    }

    fn is_gone(&self, project_id: &str) -> bool {
        self.gone
            .lock()
            .expect("poisoned")
            .get(project_id)
            .is_some_and(|at| at.elapsed() < GONE_FOR)
    }

    /// Cluster mode: the account share is split between the nodes (see [`Pools::cluster`]).
    pub fn join_cluster(&self, leadership: Arc<crate::cluster::leadership::Leadership>) {
        let _ = self.cluster.set(leadership);
    }

    /// The nodes that split `sql_account_connections` (1: a single node).
    fn nodes(&self) -> usize {
        self.cluster.get().map_or(1, |l| l.node_count().max(1))
    }

    /// Closes a project's idle connections (deletion, suspension).
    pub fn forget_project(&self, project_id: &str) {
        let gone: Vec<Idle> = {
            let mut idle = self.idle.lock().expect("poisoned");
            let keys: Vec<_> = idle
                .keys()
                .filter(|(p, _)| p == project_id)
                .cloned()
                .collect();
            keys.into_iter()
                .filter_map(|k| idle.remove(&k))
                .flatten()
                .collect()
        };
        self.forget_schema(project_id);
        disconnect(gone);
    }

    /// The project's schema changed (or may have): its JSON columns are read again.
    pub fn forget_schema(&self, project_id: &str) {
        self.json_columns
            .lock()
            .expect("poisoned")
            .remove(project_id);
    }

    /// Closes one account's idle connections (a connection of it was lost: the others,
    /// opened before the same failure, are likely dead too).
    fn forget_pool(&self, project_id: &str, role: DbRole) {
        let gone = self
            .idle
            .lock()
            .expect("poisoned")
            .remove(&(project_id.to_string(), role));
        disconnect(gone.unwrap_or_default());
    }

    pub fn clear(&self) {
        let gone: Vec<Idle> = self
            .idle
            .lock()
            .expect("poisoned")
            .drain()
            .flat_map(|(_, p)| p)
            .collect();
        disconnect(gone);
    }

    /// An idle connection of the account, the most recently used.
    fn take_idle(&self, key: &(String, DbRole)) -> Option<Held> {
        let mut idle = self.idle.lock().expect("poisoned");
        let list = idle.get_mut(key)?;
        let held = list.pop().map(|i| i.held);
        if list.is_empty() {
            idle.remove(key);
        }
        held
    }

    /// Gives a connection back: reset (COM_RESET_CONNECTION, then the session's setup again:
    /// variables, temporary tables, prepared statements, locks, an open transaction all gone)
    /// and kept idle, or closed if the reset fails or the account already keeps
    /// min(pool_size, sql_project_connections) idle. The request's shares of its project and
    /// its account are given back only then: a connection being reset still counts against the
    /// project (so an account never logs in more than `sql_project_connections` times, its
    /// `MAX_USER_CONNECTIONS`) and its account.
    fn give_back(&self, key: (String, DbRole), held: Held, share: SharePlaces) {
        let idle = self.idle.clone();
        let went_idle = self.budget.went_idle.clone();
        let keep = self.pool_size.min(self.project_share).max(1);
        tokio::spawn(async move {
            let Held { mut conn, permit } = held;
            if !matches!(
                tokio::time::timeout(Duration::from_secs(5), conn.reset()).await,
                Ok(Ok(true))
            ) {
                close(conn).await;
                drop((permit, share));
                went_idle.notify_waiters();
                return;
            }
            let extra = {
                let mut idle = idle.lock().expect("poisoned");
                let list = idle.entry(key).or_default();
                list.push(Idle {
                    held: Held { conn, permit },
                    since: Instant::now(),
                });
                (list.len() > keep).then(|| list.remove(0))
            };
            drop(share);
            disconnect(extra.into_iter().collect());
            went_idle.notify_waiters();
        });
    }

    /// Closes a connection for good (its place in the budget is free once it is closed).
    async fn close_held(&self, held: Held) {
        close(held.conn).await;
        drop(held.permit);
        self.budget.went_idle.notify_waiters();
    }

    /// Sizes the budget from the server (once), and starts closing idle connections.
    async fn ensure_budget(&self, target: &super::Target) -> Result<(), SqlError> {
        let idle = Arc::downgrade(&self.idle);
        let idle_timeout = self.idle_timeout;
        self.budget
            .permits
            .get_or_try_init(|| async {
                let mut conn = target.admin_pool.get_conn().await?;
                let max: i64 = conn
                    .query_first("SELECT @@max_connections")
                    .await?
                    .unwrap_or(151);
                // SHOW (not information_schema.GLOBAL_STATUS): MySQL 8 has no such table.
                let others: i64 = conn
                    .query_first::<(String, String), _>(
                        "SHOW GLOBAL STATUS LIKE 'Threads_connected'",
                    )
                    .await?
                    .and_then(|(_, v)| v.parse().ok())
                    .unwrap_or(0);
                let left = max - others - OWN_CONNECTIONS_MARGIN;
                let auto = (left.max(4) as usize) * 3 / 4;
                let size = match self.budget.configured {
                    0 => auto,
                    n => n.min(auto),
                };
                tracing::info!(
                    max_connections = max,
                    other_connections = others,
                    budget = size,
                    "MySQL SQL connection budget"
                );
                tokio::spawn(close_idle(idle, idle_timeout));
                Ok::<_, mysql_async::Error>((Arc::new(tokio::sync::Semaphore::new(size)), size))
            })
            .await
            .map_err(|e| {
                SqlError::Unavailable(format!("sizing the MySQL connection budget: {e}"))
            })?;
        Ok(())
    }

    /// A place for one more connection: a free one, one freed by closing the longest-idle
    /// connection of any project, or one that frees up within `sql_queue_timeout_ms`; a
    /// cluster's node takes its share of the budget (as PostgreSQL's, red team rt18).
    async fn permit(&self) -> Result<tokio::sync::OwnedSemaphorePermit, SqlError> {
        let (permits, size) = self.budget.permits.get().expect("ensure_budget ran");
        let deadline = tokio::time::Instant::now() + self.queue_timeout;
        crate::sql::permit_within_share(
            permits,
            *size,
            || crate::cluster::per_node(*size, self.nodes()),
            &self.budget.went_idle,
            || self.close_longest_idle(),
            deadline,
        )
        .await
        .map_err(|share| {
            SqlError::Busy(format!(
                "All {share} SQL connections of the MySQL server are in use \
                 (sql_max_connections); retry in a moment."
            ))
        })
    }

    /// Closes the connection idle longest, whatever its project.
    fn close_longest_idle(&self) {
        let gone = {
            let mut idle = self.idle.lock().expect("poisoned");
            let oldest = idle
                .iter()
                .filter_map(|(k, list)| list.first().map(|i| (i.since, k.clone())))
                .min();
            oldest.map(|(_, key)| {
                let list = idle.get_mut(&key).expect("just seen");
                let first = list.remove(0);
                if list.is_empty() {
                    idle.remove(&key);
                }
                first
            })
        };
        disconnect(gone.into_iter().collect());
    }
}

/// Closes connections idle for `idle_timeout`, until the pools are gone.
async fn close_idle(idle: std::sync::Weak<Mutex<IdleMap>>, idle_timeout: Duration) {
    let every = (idle_timeout / 4).clamp(Duration::from_millis(100), Duration::from_secs(5));
    loop {
        tokio::time::sleep(every).await;
        let Some(idle) = idle.upgrade() else {
            return;
        };
        let gone: Vec<Idle> = {
            let mut idle = idle.lock().expect("poisoned");
            let mut gone = Vec::new();
            idle.retain(|_, list| {
                let (old, kept): (Vec<Idle>, Vec<Idle>) = std::mem::take(list)
                    .into_iter()
                    .partition(|i| i.since.elapsed() >= idle_timeout);
                gone.extend(old);
                *list = kept;
                !list.is_empty()
            });
            gone
        };
        disconnect(gone);
    }
}

/// (table, column) of a database's JSON columns.
pub type JsonColumns = std::collections::HashSet<(String, String)>;

/// Closes idle connections (each gives its place in the budget back once closed).
fn disconnect(idle: Vec<Idle>) {
    if idle.is_empty() {
        return;
    }
    if let Ok(runtime) = tokio::runtime::Handle::try_current() {
        runtime.spawn(async move {
            for i in idle {
                let Held { conn, permit } = i.held;
                close(conn).await;
                drop(permit);
            }
        });
    }
}

/// One result set as the answer shows it.
struct ResultSet<'m> {
    columns: Vec<(String, ColumnKind)>,
    /// The answer up to its rows' end: [`ROWS_HEAD`] and the rows kept (`{...}` each, within
    /// the limits), rendered as they arrive into a text grown within the answer's memory.
    text: AnswerText<'m>,
    /// Rows read (returned or not), or rows affected for a statement without a result set.
    count: u64,
    has_rows: bool,
    truncated: bool,
}

/// What a success answer starts with, up to its first row.
const ROWS_HEAD: &str = "{\"success\":true,\"result\":{\"rows\":[";

enum Failure {
    Db(mysql_async::Error),
    Params(String),
    /// The statement survived KILL QUERY (a handler of the caller's caught it): its
    /// connection was killed, and its server thread is gone.
    Killed,
}

impl Mysql {
    /// The JSON columns of a project's database: MariaDB's JSON type is LONGTEXT with a
    /// `json_valid` check of the column's name, which is how they are found (MySQL's JSON
    /// type is a type of its own and needs none of this). Cached until the project runs DDL.
    pub async fn json_columns(&self, project_id: &str, db_name: &str) -> Arc<JsonColumns> {
        if let Some(known) = self
            .sql
            .json_columns
            .lock()
            .expect("poisoned")
            .get(project_id)
        {
            return known.clone();
        }
        let found: JsonColumns = async {
            let target = self.server().await.ok()?;
            let mut conn = target.admin_pool.get_conn().await.ok()?;
            let rows: Vec<(String, String)> = conn
                .exec(
                    "SELECT TABLE_NAME, CONSTRAINT_NAME FROM information_schema.CHECK_CONSTRAINTS \
                     WHERE CONSTRAINT_SCHEMA = ? AND LEVEL = 'Column' \
                     AND CHECK_CLAUSE = CONCAT('json_valid(`', CONSTRAINT_NAME, '`)')",
                    (db_name,),
                )
                .await
                .map_err(|e| tracing::warn!(error = %e, "reading a project's JSON columns"))
                .ok()?;
            Some(rows.into_iter().collect())
        }
        .await
        .unwrap_or_default();
        let found = Arc::new(found);
        self.sql
            .json_columns
            .lock()
            .expect("poisoned")
            .insert(project_id.to_string(), found.clone());
        found
    }

    /// How to log in as a project's account.
    fn opts(&self, target: &super::Target, project_id: &str, db_name: &str, role: DbRole) -> Opts {
        let user = super::provision::account_name(project_id, role);
        let timeout = self.sql.statement_timeout;
        // After every connect and every reset (COM_RESET_CONNECTION gives the server's
        // defaults back): the statement timeout, UTC, and the reading of SQL text the
        // refusal check assumes (`refused`): utf8mb4 (the handshake's collation) and an
        // sql_mode without ANSI_QUOTES / NO_BACKSLASH_ESCAPES, which no request can change.
        let limit = if target.mariadb {
            format!("max_statement_time = {}", timeout.as_secs_f64())
        } else {
            format!("max_execution_time = {}", timeout.as_millis())
        };
        let setup = format!(
            "SET NAMES utf8mb4 COLLATE utf8mb4_general_ci, SESSION {limit}, \
             time_zone = '+00:00', sql_mode = '{}'",
            target.sql_mode
        );
        OptsBuilder::from_opts(target.admin.clone())
            .user(Some(user.clone()))
            .pass(Some(self.account_password(&user)))
            .db_name(Some(db_name))
            .setup(vec![setup])
            // UPDATE counts the rows it matched, as PostgreSQL does.
            .client_found_rows(true)
            .tcp_nodelay(true)
            // A row is read whole (the driver holds a packet whole) up to
            // [`row_packet_limit`], then kept or dropped by `max_response_bytes`
            // (`truncated`), as on PostgreSQL. The driver's default (the server's
            // `@@max_allowed_packet`, 16 MiB) broke the connection on a larger row; the
            // server's largest packet (1 GiB) let one request hold a row of ~1 GiB in memory
            // (red team rt5: 1.2 GB RSS for one 400 MB row, eight of them per project).
            .max_allowed_packet(Some(row_packet_limit(self.sql.max_response_bytes)))
            // No file of this machine is ever sent for LOAD DATA LOCAL INFILE.
            .local_infile_handler(None::<mysql_async::WhiteListFsHandler>)
            .into()
    }

    /// Runs a request's SQL on a MySQL project and renders the guide's success or
    /// SQL_EXEC_ERROR body, its text reserved in `memory` as it grows
    /// ([`crate::sql::building`]).
    pub async fn execute(
        &self,
        access: &Access,
        req: &SqlRequest,
        memory: Arc<dyn AnswerMemory>,
    ) -> Result<String, SqlError> {
        let started = Instant::now();
        let project = &access.project;
        if let Some(why) = refused(&req.query) {
            return Ok(render_error(&why, 1227, "42000"));
        }
        let target = self
            .server()
            .await
            .map_err(|e| SqlError::Unavailable(format!("{e:#}")))?;
        // The budget is sized first: the account's share is at most half of it.
        self.sql.ensure_budget(target).await?;
        // One wait for the project's share and then the account's.
        let deadline = tokio::time::Instant::now() + self.sql.queue_timeout;
        let share = self
            .sql
            .shares
            .acquire(&project.id, self.sql.project_share, deadline)
            .await
            .map_err(|()| {
                SqlError::Busy(format!(
                    "this project already runs {} SQL requests at once (sql_project_connections); \
                     retry shortly",
                    self.sql.project_share
                ))
            })?;
        let share = SharePlaces {
            project: share,
            account: self
                .sql
                .accounts
                .place(
                    project,
                    self.sql.nodes(),
                    self.sql.budget.permits.get().map_or(0, |(_, size)| {
                        crate::cluster::per_node(*size, self.sql.nodes())
                    }),
                    deadline,
                )
                .await?,
        };
        let key = (project.id.clone(), access.db_role);
        let mut repaired = false;
        let held = loop {
            if let Some(held) = self.sql.take_idle(&key) {
                break held;
            }
            // A place in the server-wide budget (≤ sql_queue_timeout_ms, then 429), then a
            // login, bounded like the PostgreSQL pool's (a slow login under load is not a
            // busy project).
            let permit = self.sql.permit().await?;
            let opts = self.opts(target, &project.id, &project.db_name, access.db_role);
            match tokio::time::timeout(crate::sql::LOGIN_BOUND, Conn::new(opts)).await {
                Err(_) => {
                    return Err(SqlError::Busy(
                        "logging in to the project database took too long".into(),
                    ))
                }
                // Access denied to the project's own account (its password or the account
                // changed behind Fluxbase's back): provisioned again, once, then retried.
                Ok(Err(mysql_async::Error::Server(e))) if e.code == 1045 && !repaired => {
                    repaired = true;
                    drop(permit);
                    tracing::warn!(project_id = %project.id, role = ?access.db_role,
                        "the project account was refused its login (1045): provisioning it again");
                    self.sql.forget_pool(&project.id, access.db_role);
                    self.repair_accounts(&project.id, &project.db_name).await;
                }
                Ok(Err(mysql_async::Error::Server(e))) => {
                    return Err(SqlError::Unavailable(format!(
                        "logging in as the project account: {} ({})",
                        e.message, e.code
                    )))
                }
                Ok(Err(e)) => {
                    self.sql.forget_pool(&project.id, access.db_role);
                    return Err(SqlError::Unavailable(e.to_string()));
                }
                Ok(Ok(conn)) => break Held { conn, permit },
            }
        };
        let Held { mut conn, permit } = held;
        let connection_id = conn.id();
        let budget = self.sql.statement_timeout + GUARD_GRACE;
        let (max_rows, max_bytes) = (self.sql.max_rows, self.sql.max_response_bytes);
        let json = JsonLookup {
            mysql: self,
            mariadb: target.mariadb,
            project_id: &project.id,
            db_name: &project.db_name,
        };
        let outcome = {
            let run = run(&mut conn, req, max_rows, max_bytes, &json, &*memory);
            tokio::pin!(run);
            tokio::select! {
                r = &mut run => r,
                _ = tokio::time::sleep(budget) => {
                    tracing::warn!(project_id = %project.id, "MySQL statement outlived its budget; killing it");
                    kill(target, "QUERY", connection_id).await;
                    match tokio::time::timeout(KILL_GRACE, &mut run).await {
                        Ok(r) => r,
                        Err(_) => {
                            // A handler in the caller's SQL caught the KILL QUERY (`DECLARE
                            // CONTINUE HANDLER FOR SQLEXCEPTION` around a loop): the thread went
                            // on, outside every bound, after its places were given back (red
                            // team rt14). Its connection is killed, which no handler catches,
                            // and the places are kept until the server's thread is gone.
                            tracing::warn!(project_id = %project.id, connection_id,
                                "a MySQL statement survived KILL QUERY; killing its connection");
                            kill(target, "CONNECTION", connection_id).await;
                            let _ = tokio::time::timeout(KILL_GRACE, &mut run).await;
                            thread_gone(target, connection_id).await;
                            Err(Failure::Killed)
                        }
                    }
                }
            }
        };
        let elapsed = started.elapsed();
        // As for PostgreSQL: a statement the server refused counts as failed.
        self.metrics.observe_sql(elapsed, outcome.is_ok());
        if ddl(&req.query) {
            self.sql.forget_schema(&project.id);
        }
        match outcome {
            Ok((set, statement)) => {
                if in_transaction(&conn) {
                    // Not left for the reset to end: never pooled again.
                    self.sql.close_held(Held { conn, permit }).await;
                } else {
                    self.sql.give_back(key, Held { conn, permit }, share);
                }
                Ok(render_success(set, &statement, elapsed))
            }
            Err(Failure::Params(message)) => {
                self.sql.give_back(key, Held { conn, permit }, share);
                Ok(render_error(&message, 2031, "HY000"))
            }
            Err(Failure::Db(mysql_async::Error::Server(e))) => {
                if xa_error(e.code) || in_transaction(&conn) {
                    tracing::warn!(project_id = %project.id, code = e.code,
                        "a MySQL session left in a transaction or an XA state is closed");
                    self.sql.close_held(Held { conn, permit }).await;
                } else {
                    self.sql.give_back(key, Held { conn, permit }, share);
                }
                Ok(render_error(&e.message, e.code, &e.state))
            }
            Err(Failure::Db(mysql_async::Error::Driver(e))) => {
                // The request's fault (a parameter count, LOAD DATA LOCAL), but the session
                // may be mid-protocol: it is not pooled again.
                self.sql.close_held(Held { conn, permit }).await;
                Ok(driver_error(&e))
            }
            Err(Failure::Db(e)) if packet_too_large(&e) => {
                // One row past the bound: this request's answer, not the server's
                // unavailability. The session is mid-result: closed, so its statement ends
                // there and later statements of the request do not run.
                self.sql.close_held(Held { conn, permit }).await;
                let limit = row_packet_limit(max_bytes);
                Ok(render_error(
                    &format!(
                        "a row of the result is larger than {limit} bytes (twice \
                         max_response_bytes, at least 64 MiB: the largest row the server \
                         reads): the statement was ended there and later statements of the \
                         request were not run; select fewer or smaller columns"
                    ),
                    2020,
                    "HY000",
                ))
            }
            Err(Failure::Killed) => {
                self.sql.close_held(Held { conn, permit }).await;
                Ok(render_error(
                    &format!(
                        "Query execution was interrupted (max_statement_time exceeded): the \
                         statement outlived statement_timeout ({} ms) and went on after KILL \
                         QUERY (a handler caught it), so its connection was killed",
                        self.sql.statement_timeout.as_millis()
                    ),
                    1969,
                    "70100",
                ))
            }
            Err(Failure::Db(e)) => {
                self.sql.close_held(Held { conn, permit }).await;
                tracing::warn!(project_id = %project.id, error = %e, "MySQL connection lost");
                self.sql.forget_pool(&project.id, access.db_role);
                Err(SqlError::Unavailable(e.to_string()))
            }
        }
    }
}

/// How long a killed statement (KILL QUERY, then KILL CONNECTION) is given to end.
const KILL_GRACE: Duration = Duration::from_secs(5);
/// How long a killed connection's server thread is waited for, its places kept meanwhile.
const THREAD_GONE_WITHIN: Duration = Duration::from_secs(30);

/// `KILL QUERY|CONNECTION <id>` as the server's own account (best effort: logged).
async fn kill(target: &super::Target, what: &str, connection_id: u32) {
    let result = async {
        let mut admin = target.admin_pool.get_conn().await?;
        admin
            .query_drop(format!("KILL {what} {connection_id}"))
            .await
    }
    .await;
    if let Err(e) = result {
        tracing::warn!(connection_id, error = %e, "KILL {what} of a MySQL session failed");
    }
}

/// Waits (at most [`THREAD_GONE_WITHIN`]) until the server no longer lists the thread.
async fn thread_gone(target: &super::Target, connection_id: u32) {
    let deadline = Instant::now() + THREAD_GONE_WITHIN;
    while Instant::now() < deadline {
        let listed = async {
            let mut admin = target.admin_pool.get_conn().await?;
            admin
                .exec_first::<u64, _, _>(
                    "SELECT COUNT(*) FROM information_schema.PROCESSLIST WHERE ID = ?",
                    (connection_id,),
                )
                .await
        }
        .await;
        match listed {
            Ok(Some(0)) => return,
            Ok(_) | Err(_) => tokio::time::sleep(Duration::from_millis(100)).await,
        }
    }
    tracing::error!(
        connection_id,
        "a killed MySQL session's thread is still listed after 30 s"
    );
}

/// The largest row packet a request's session reads (the driver holds one whole): twice
/// `max_response_bytes` (a row that large is dropped from the answer anyway), at least 64 MiB,
/// at most the server's largest packet (1 GiB).
pub fn row_packet_limit(max_response_bytes: usize) -> usize {
    max_response_bytes
        .saturating_mul(2)
        .clamp(64 << 20, crate::cdc::binlog::MAX_PACKET)
}

/// Whether the driver refused a packet past its `max_allowed_packet`.
fn packet_too_large(e: &mysql_async::Error) -> bool {
    match e {
        mysql_async::Error::Io(mysql_async::IoError::Io(io)) => io
            .get_ref()
            .and_then(|inner| {
                inner.downcast_ref::<mysql_common::proto::codec::error::PacketCodecError>()
            })
            .is_some_and(|c| {
                matches!(
                    c,
                    mysql_common::proto::codec::error::PacketCodecError::PacketTooLarge
                )
            }),
        _ => false,
    }
}

/// Whether the server's last answer on `conn` says a transaction is open.
fn in_transaction(conn: &Conn) -> bool {
    conn.last_ok_packet().is_some_and(|ok| {
        ok.status_flags()
            .contains(mysql_async::consts::StatusFlags::SERVER_STATUS_IN_TRANS)
    })
}

/// XA errors (XAER_*, XA_RB*): the session may hold an XA branch; it is closed, not pooled.
fn xa_error(code: u16) -> bool {
    matches!(code, 1397..=1402 | 1440 | 1613 | 1614)
}

impl Mysql {
    /// Provisions a project's accounts again (a login was refused), at most one repair at a
    /// time per server.
    async fn repair_accounts(&self, project_id: &str, db_name: &str) {
        let _one = self.sql.repair.lock().await;
        if self.sql.is_gone(project_id) {
            return;
        }
        if let Err(e) = self.provision(project_id, db_name).await {
            tracing::error!(project_id, error = %e, "repairing the project's MySQL accounts");
        }
    }
}

/// Takes a connection out of its pool for good.
async fn close(conn: Conn) {
    let _ = tokio::time::timeout(Duration::from_secs(1), conn.disconnect()).await;
}

fn driver_error(e: &mysql_async::DriverError) -> String {
    use mysql_async::DriverError as D;
    match e {
        D::LocalInfile(_) => render_error(
            "LOAD DATA LOCAL INFILE is not available: the server sends no files",
            2068,
            "HY000",
        ),
        D::StmtParamsMismatch { required, supplied } => render_error(
            &format!("the statement has {required} placeholders but {supplied} params were given"),
            2031,
            "HY000",
        ),
        other => render_error(&other.to_string(), 2000, "HY000"),
    }
}

/// Whether a request may have changed the schema (then the JSON columns are read again).
fn ddl(sql: &str) -> bool {
    split_statements(sql).iter().any(|s| {
        keywords(s, 1).first().is_some_and(|w| {
            matches!(
                w.as_str(),
                "CREATE" | "ALTER" | "DROP" | "RENAME" | "TRUNCATE"
            )
        })
    })
}

/// Finds which LONGTEXT columns of a result are MariaDB JSON columns.
struct JsonLookup<'a> {
    mysql: &'a Mysql,
    mariadb: bool,
    project_id: &'a str,
    db_name: &'a str,
}

impl JsonLookup<'_> {
    async fn mark(&self, columns: &[Column], kinds: &mut [(String, ColumnKind)]) {
        use mysql_async::consts::ColumnType::*;
        if !self.mariadb {
            return;
        }
        let candidate = |c: &Column, k: &ColumnKind| {
            !k.binary
                && !c.org_table_ref().is_empty()
                && c.schema_ref() == self.db_name.as_bytes()
                && matches!(
                    c.column_type(),
                    MYSQL_TYPE_BLOB
                        | MYSQL_TYPE_LONG_BLOB
                        | MYSQL_TYPE_MEDIUM_BLOB
                        | MYSQL_TYPE_TINY_BLOB
                )
        };
        if !columns
            .iter()
            .zip(kinds.iter())
            .any(|(c, (_, k))| candidate(c, k))
        {
            return;
        }
        let json = self.mysql.json_columns(self.project_id, self.db_name).await;
        for (c, (_, k)) in columns.iter().zip(kinds.iter_mut()) {
            if candidate(c, k)
                && json.contains(&(
                    c.org_table_str().into_owned(),
                    c.org_name_str().into_owned(),
                ))
            {
                k.json = true;
            }
        }
    }
}

async fn run<'m>(
    conn: &mut Conn,
    req: &SqlRequest,
    max_rows: usize,
    max_bytes: usize,
    json: &JsonLookup<'_>,
    memory: &'m dyn AnswerMemory,
) -> Result<(ResultSet<'m>, String), Failure> {
    let statements = split_statements(&req.query);
    match req.params.as_deref() {
        None | Some([]) => {
            let mut result = conn
                .query_iter(req.query.as_str())
                .await
                .map_err(Failure::Db)?;
            let mut sets = 0usize;
            let last = loop {
                let set = read_set(&mut result, max_rows, max_bytes, json, memory).await?;
                sets += 1;
                // Reading a set to its end moves the driver on to the next one: a next set is
                // there when its columns are (none for an OK answer's: `Some` of nothing).
                // Before, `is_empty()` was asked, which is true once the next set is the last
                // and has no rows: `CREATE TABLE t; INSERT …` answered the CREATE's result,
                // `SELECT 1; INSERT …` the SELECT's rows (red team rt14).
                if result.columns().is_none() {
                    // A later statement's error is held as the next result (no columns then):
                    // this reads it.
                    result.next().await.map_err(Failure::Db)?;
                    break set;
                }
            };
            // The statement the answer is about: the last one, when the server answered once
            // per statement (a CALL answers more, a routine's body has `;` of its own).
            let statement = if sets == statements.len() {
                statements.last().copied().unwrap_or("")
            } else {
                statements.first().copied().unwrap_or("")
            };
            Ok((last, statement.to_string()))
        }
        Some(params) => {
            let (sql, values) = bind(&req.query, params).map_err(Failure::Params)?;
            let mut result = conn
                .exec_iter(sql.as_str(), mysql_async::Params::Positional(values))
                .await
                .map_err(Failure::Db)?;
            let set = read_set(&mut result, max_rows, max_bytes, json, memory).await?;
            // A CALL's further result sets (or their error): read and dropped.
            result.drop_result().await.map_err(Failure::Db)?;
            Ok((set, req.query.clone()))
        }
    }
}

async fn read_set<'m, P: mysql_async::prelude::Protocol>(
    result: &mut mysql_async::QueryResult<'_, 'static, P>,
    max_rows: usize,
    max_bytes: usize,
    json: &JsonLookup<'_>,
    memory: &'m dyn AnswerMemory,
) -> Result<ResultSet<'m>, Failure> {
    let columns: Vec<Column> = result.columns().map(|c| c.to_vec()).unwrap_or_default();
    let mut kinds: Vec<(String, ColumnKind)> = columns
        .iter()
        .map(|c| (c.name_str().into_owned(), ColumnKind::of(c)))
        .collect();
    json.mark(&columns, &mut kinds).await;
    // What follows the rows: column names and types, counts, message, timing.
    let tail = 256 + kinds.iter().map(|(n, _)| n.len() * 2 + 40).sum::<usize>();
    let budget = max_bytes.saturating_sub(tail);
    let mut set = ResultSet {
        has_rows: !columns.is_empty(),
        columns: kinds,
        text: AnswerText::new(memory, ROWS_HEAD.len() + tail, budget + tail, 0),
        count: 0,
        truncated: false,
    };
    set.text.out.push_str(ROWS_HEAD);
    if !set.has_rows {
        set.count = result.affected_rows();
    }
    let names: Vec<String> = set
        .columns
        .iter()
        .map(|(n, _)| serde_json::to_string(n).expect("strings serialize"))
        .collect();
    let mut kept = 0usize;
    // One row's text, then copied into the answer's (the row is checked against the bounds
    // before the answer grows).
    let mut row_text = String::new();
    while let Some(row) = result.next().await.map_err(Failure::Db)? {
        set.count += 1;
        if set.truncated {
            continue;
        }
        if kept >= max_rows {
            set.truncated = true;
            continue;
        }
        // The row's text is at least its strings' bytes (a JSON column's aside, which may lose
        // blanks, and a BIT's, a number): a row that cannot fit is not rendered at all.
        let at_least: usize = (0..set.columns.len())
            .filter(|&i| {
                let kind = &set.columns[i].1;
                !kind.json && kind.ty != mysql_async::consts::ColumnType::MYSQL_TYPE_BIT
            })
            .map(|i| match row.as_ref(i) {
                Some(Value::Bytes(b)) => b.len(),
                _ => 0,
            })
            .sum();
        if set.text.out.len() + at_least > budget {
            set.truncated = true;
            continue;
        }
        row_text.clear();
        row_text.push('{');
        for (i, (_, kind)) in set.columns.iter().enumerate() {
            if i > 0 {
                row_text.push(',');
            }
            row_text.push_str(&names[i]);
            row_text.push(':');
            write_json(&mut row_text, kind, row.as_ref(i).unwrap_or(&Value::NULL));
        }
        row_text.push('}');
        if set.text.out.len() + row_text.len() + 1 > budget {
            set.truncated = true;
            continue;
        }
        set.text.others = row_text.capacity();
        if !set.text.reserve(row_text.len() + 1) {
            // Refused: nothing of this result is kept (its rows are left out of the answer,
            // or the answer refused), and the rest is read past.
            set.text.out.truncate(ROWS_HEAD.len());
            set.text.out.shrink_to_fit();
            set.truncated = true;
            continue;
        }
        if kept > 0 {
            set.text.out.push(',');
        }
        set.text.out.push_str(&row_text);
        kept += 1;
    }
    set.text.others = 0;
    Ok(set)
}

fn json_str(s: &str) -> String {
    serde_json::to_string(s).expect("strings serialize")
}

/// The guide's success body (the same shape as PostgreSQL's, `crate::sql::SqlResponse`): the
/// result set's text, and what follows its rows.
fn render_success(set: ResultSet<'_>, statement: &str, elapsed: Duration) -> String {
    let op = operation(statement, set.has_rows);
    let message = message(op.as_deref(), &set);
    let ResultSet {
        columns,
        text,
        count,
        truncated,
        ..
    } = set;
    let mut out = text.into_string();
    let names: Vec<String> = columns.iter().map(|(n, _)| json_str(n)).collect();
    out.push_str("],\"columns\":[");
    out.push_str(&names.join(","));
    out.push_str("],\"columnTypes\":[");
    let types: Vec<String> = columns
        .iter()
        .map(|(_, k)| json_str(&k.type_name()))
        .collect();
    out.push_str(&types.join(","));
    out.push_str("],\"rowCount\":");
    out.push_str(&count.to_string());
    out.push_str(",\"message\":");
    match message {
        Some(m) => out.push_str(&json_str(&m)),
        None => out.push_str("null"),
    }
    out.push_str(",\"truncated\":");
    out.push_str(if truncated { "true" } else { "false" });
    out.push_str("},\"executionInfo\":{\"time\":");
    out.push_str(&json_str(&format!("{}ms", elapsed.as_millis())));
    out.push_str(",\"rowCount\":");
    out.push_str(&count.to_string());
    out.push_str(",\"operation\":");
    match &op {
        Some(op) => out.push_str(&json_str(op)),
        None => out.push_str("null"),
    }
    out.push_str("}}");
    out
}

/// `null` for a statement returning rows; PostgreSQL's command tag for DML (`INSERT 0 1`,
/// `UPDATE 2`, `DELETE 3`), so that clients reading tags read both engines alike; the
/// operation for anything else (`CREATE TABLE`).
fn message(op: Option<&str>, set: &ResultSet<'_>) -> Option<String> {
    if set.has_rows {
        return None;
    }
    let op = op?;
    Some(match op {
        "INSERT" | "REPLACE" => format!("INSERT 0 {}", set.count),
        "UPDATE" | "DELETE" => format!("{op} {}", set.count),
        _ => op.to_string(),
    })
}

/// The SQL_EXEC_ERROR body: MySQL's message, `details: "ERROR:  <code> (<SQLSTATE>)"`.
fn render_error(message: &str, code: u16, state: &str) -> String {
    serde_json::json!({
        "success": false,
        "error": {
            "message": message,
            "code": "SQL_EXEC_ERROR",
            "details": format!("ERROR:  {code} ({state})"),
        }
    })
    .to_string()
}

/// The command of a statement: `SELECT`, `INSERT`, `CREATE TABLE`, `DROP INDEX`; `None` for
/// an empty one.
fn operation(statement: &str, has_rows: bool) -> Option<String> {
    let words = keywords(statement, 6);
    let first = words.first()?.clone();
    let object = |from: usize| {
        words
            .iter()
            .skip(from)
            .find(|w| {
                matches!(
                    w.as_str(),
                    "TABLE"
                        | "INDEX"
                        | "VIEW"
                        | "DATABASE"
                        | "SCHEMA"
                        | "PROCEDURE"
                        | "FUNCTION"
                        | "TRIGGER"
                        | "EVENT"
                        | "SEQUENCE"
                        | "USER"
                        | "ROLE"
                )
            })
            .cloned()
    };
    Some(match first.as_str() {
        "CREATE" | "DROP" | "ALTER" | "RENAME" => match object(1) {
            Some(obj) => format!("{first} {obj}"),
            None => first,
        },
        "WITH" | "(" if has_rows => "SELECT".into(),
        "WITH" => words
            .iter()
            .find(|w| matches!(w.as_str(), "INSERT" | "UPDATE" | "DELETE" | "REPLACE"))
            .cloned()
            .unwrap_or(first),
        "TABLE" | "VALUES" => "SELECT".into(),
        _ => first,
    })
}

/// The first `n` words of `sql` (uppercase), outside comments.
fn keywords(sql: &str, n: usize) -> Vec<String> {
    let mut words = Vec::new();
    let mut word = String::new();
    for token in Lexer::new(sql) {
        if let Token::Plain(text) = token {
            for c in text.chars() {
                if c.is_ascii_alphabetic() || c == '_' {
                    word.push(c.to_ascii_uppercase());
                } else {
                    if !word.is_empty() {
                        words.push(std::mem::take(&mut word));
                    } else if c == '(' && words.is_empty() {
                        words.push("(".into());
                    }
                    if words.len() >= n {
                        return words;
                    }
                }
            }
        } else if !word.is_empty() {
            words.push(std::mem::take(&mut word));
        }
        if words.len() >= n {
            return words;
        }
    }
    if !word.is_empty() {
        words.push(word);
    }
    words
}

/// Why a request's SQL is refused before anything of it runs, if it is. Statements that reach
/// past the project or break the server's own use of its accounts:
///
/// * `XA …` (anywhere: a routine's body, `SET STATEMENT … FOR`, an executable comment): XA
///   transaction ids are server-wide in MySQL/MariaDB (`XA RECOVER` lists, `XA COMMIT`
///   commits, any project's), and a prepared XA branch outlives the pooled session.
/// * `SET PASSWORD …` (as a statement) and `ALTER USER …`: a scope's account would lock the
///   server out of it (its password is derived, never stored).
/// * the user-lock functions (`GET_LOCK`, `IS_USED_LOCK`, …): their names are server-wide.
/// * dynamic SQL (`PREPARE`, `EXECUTE`, `EXECUTE IMMEDIATE`, `DEALLOCATE` / `DROP PREPARE`),
///   anywhere: its text is built when it runs, out of this check's sight (and prepared
///   statements fill the server-wide `max_prepared_stmt_count`).
///
/// Names are read as the server reads them: a word runs on through `$` and every non-ASCII
/// character, a `quoted` name is a name like any other for the rules on functions and
/// variables, and the rules on `SET PASSWORD` hold wherever a statement can start
/// ([`password_statements`]).
pub fn refused(sql: &str) -> Option<String> {
    // MariaDB ends a comment at a NUL byte and refuses one in plain text: not worth reading
    // the same way, refused (a string holds one as `\0`, or a parameter).
    if sql.contains('\0') {
        return Some(
            "a NUL character is accepted on MySQL projects only as `\\0` in a string literal \
             or in params"
                .into(),
        );
    }
    let mut toks = Vec::new();
    scan(sql, &mut toks);
    if toks.contains(&Tok::Executable) {
        // Run or skipped by the server's version number: two readings of the same text.
        return Some(
            "executable comments (/*! … */, /*M! … */) are not accepted on MySQL projects: \
             write the statement plainly"
                .into(),
        );
    }
    // A statement keyword: a bare word (a keyword is never quoted), not a name after `.`
    // (`t.execute` is a column).
    let word = |i: usize| match toks.get(i) {
        Some(Tok::Word(w)) if i == 0 || toks[i - 1] != Tok::Other('.') => w.as_str(),
        _ => "",
    };
    // A name (of a function, a variable) as the server looks it up: a word or a `quoted`
    // name, compared without regard to case and with every non-ASCII character standing for
    // any character (the server compares names under utf8mb3_general_ci, where `é` is `E`
    // and `ı` is `I`).
    let is_name = |i: usize, names: &[&str]| -> Option<String> {
        let n = match toks.get(i) {
            Some(Tok::Word(w)) => w.as_str(),
            Some(Tok::Ident(w)) => w.trim_end_matches(' '),
            _ => return None,
        };
        names
            .iter()
            .find(|target| name_matches(n, target))
            .map(|t| t.to_string())
    };
    // What `SET NAMES` / `SET CHARACTER SET` take: a character set's name (a word, a string,
    // a `quoted` name) or DEFAULT; any other word is an error of the server's.
    let charset_at = |i: usize| match toks.get(i) {
        Some(Tok::Str(_) | Tok::Ident(_)) => true,
        Some(Tok::Word(w)) => {
            w == "DEFAULT" || w == "BINARY" || CHARSETS.contains(&w.to_lowercase().as_str())
        }
        _ => false,
    };
    // Where an option of a SET statement starts (`SET x`, `SET a = 1, x`, `SET STATEMENT x`).
    let set_option_at = |i: usize| {
        i > 0
            && (toks[i - 1] == Tok::Other(',')
                || matches!(
                    word(i - 1),
                    "SET" | "STATEMENT" | "SESSION" | "LOCAL" | "GLOBAL"
                ))
    };
    let password_statements = password_statements(&toks);
    for (i, password_statement) in password_statements.iter().enumerate() {
        let assigned = matches!(toks.get(i + 1), Some(Tok::Other('=' | ':')));
        if let (Some(v), true) = (is_name(i, LEXING_VARIABLES), assigned) {
            return Some(lexing_refused(&v));
        }
        if let (Some(v), true) = (is_name(i, MEMORY_VARIABLES), assigned) {
            return Some(format!(
                "{} cannot be changed on MySQL projects: it bounds the memory one session \
                 holds on the shared server",
                v.to_lowercase()
            ));
        }
        if let (Some(f), true) = (
            is_name(i, LOCK_FUNCTIONS),
            toks.get(i + 1) == Some(&Tok::Other('(')),
        ) {
            return Some(format!(
                "{f}() is not available on MySQL projects: user lock names are server-wide \
                 (one project would block or observe another's); use a row of a table of \
                 the project with SELECT … FOR UPDATE"
            ));
        }
        if set_option_at(i)
            && ((word(i) == "NAMES" || word(i) == "CHARSET") && charset_at(i + 1)
                || matches!(word(i), "CHAR" | "CHARACTER")
                    && word(i + 1) == "SET"
                    && charset_at(i + 2))
        {
            return Some(lexing_refused(&format!("SET {}", word(i))));
        }
        match word(i) {
            "XA" if matches!(
                word(i + 1),
                "START" | "BEGIN" | "END" | "PREPARE" | "COMMIT" | "ROLLBACK" | "RECOVER"
            ) =>
            {
                return Some(
                    "XA transactions are not available on MySQL projects: XA ids are \
                     server-wide (other projects' transactions would be visible and \
                     committable); use START TRANSACTION … COMMIT"
                        .into(),
                );
            }
            "ALTER" if word(i + 1) == "USER" => {
                return Some(
                    "ALTER USER is not available on MySQL projects: the accounts of a project \
                     are managed by Fluxbase"
                        .into(),
                );
            }
            "PASSWORD" if *password_statement => {
                return Some(
                    "SET PASSWORD is not available on MySQL projects: the accounts of a \
                     project are managed by Fluxbase (a column named password is written \
                     `password` in a routine, trigger, event or compound statement)"
                        .into(),
                );
            }
            // Dynamic SQL, whatever follows: its text is built when it runs, out of the
            // check's sight; and prepared statements count against the server-wide
            // `max_prepared_stmt_count`.
            w @ ("PREPARE" | "EXECUTE" | "DEALLOCATE") => {
                return Some(format!(
                    "{w} is not available on MySQL projects: dynamic SQL (PREPARE, EXECUTE, \
                     EXECUTE IMMEDIATE, DEALLOCATE / DROP PREPARE) is refused, in a request \
                     and in a routine, trigger or event body; send parameters with `params` \
                     (a column or name of that word is written `{}`)",
                    w.to_lowercase()
                ));
            }
            _ => {}
        }
    }
    None
}

/// Whether `name` (ASCII uppercase already) is `target`, each non-ASCII character of `name`
/// standing for any one character (the server's general_ci folds many to an ASCII letter).
fn name_matches(name: &str, target: &str) -> bool {
    name.chars().count() == target.len()
        && name
            .chars()
            .zip(target.bytes())
            .all(|(c, t)| !c.is_ascii() || c as u32 == u32::from(t))
}

/// The user-lock functions: their names are server-wide.
const LOCK_FUNCTIONS: &[&str] = &[
    "GET_LOCK",
    "IS_FREE_LOCK",
    "IS_USED_LOCK",
    "RELEASE_LOCK",
    "RELEASE_ALL_LOCKS",
];

/// For each token: whether it is the `PASSWORD` of a `SET PASSWORD` statement (or option of a
/// SET list), the form `SET PASSWORD [FOR …] =` / `…, PASSWORD =`. The same words assign a
/// column `password` in `UPDATE … SET`, `INSERT … SET`, `LOAD DATA … SET`: those are accepted
/// only where the statement's extent is certain. A request is read statement by statement
/// (`;`) while every statement so far is a simple one (none holds another statement, so its
/// `;` ends it); there a candidate is refused when its statement is a `SET`. From the first
/// statement that may hold others on (a routine, trigger or event, `BEGIN NOT ATOMIC`, `IF`,
/// a loop, a label, anything not known simple), a candidate is refused wherever it stands:
/// a handler's body, a trigger's, `IF … THEN`, a loop (a column is then written `password`).
fn password_statements(toks: &[Tok]) -> Vec<bool> {
    let mut out = vec![false; toks.len()];
    let bare = |i: usize| match toks.get(i) {
        Some(Tok::Word(w)) if i == 0 || toks[i - 1] != Tok::Other('.') => w.as_str(),
        _ => "",
    };
    let candidate = |i: usize| {
        bare(i) == "PASSWORD"
            && i > 0
            && (toks[i - 1] == Tok::Other(',')
                || matches!(
                    bare(i - 1),
                    "SET" | "SESSION" | "LOCAL" | "GLOBAL" | "STATEMENT"
                ))
            && (toks.get(i + 1) == Some(&Tok::Other('=')) || bare(i + 1) == "FOR")
    };
    let mut start = 0;
    while start < toks.len() {
        let end = (start..toks.len())
            .find(|&j| toks[j] == Tok::Other(';'))
            .unwrap_or(toks.len());
        if end == start {
            start = end + 1;
            continue;
        }
        let first = bare(start);
        let second = bare(start + 1);
        let simple = match first {
            "SELECT" | "INSERT" | "UPDATE" | "DELETE" | "REPLACE" | "WITH" | "VALUES" | "TABLE"
            | "SHOW" | "DESCRIBE" | "DESC" | "EXPLAIN" | "START" | "COMMIT" | "ROLLBACK"
            | "SAVEPOINT" | "RELEASE" | "TRUNCATE" | "LOAD" | "DROP" | "RENAME" | "CALL"
            | "USE" | "LOCK" | "UNLOCK" | "ANALYZE" | "OPTIMIZE" | "CHECK" | "REPAIR"
            | "CHECKSUM" => true,
            "BEGIN" => {
                matches!(toks.get(start + 1), None | Some(Tok::Other(';'))) || second == "WORK"
            }
            "CREATE" | "ALTER" => matches!(
                if second == "OR" {
                    bare(start + 3)
                } else {
                    second
                },
                "TABLE"
                    | "TEMPORARY"
                    | "INDEX"
                    | "UNIQUE"
                    | "FULLTEXT"
                    | "SPATIAL"
                    | "DATABASE"
                    | "SCHEMA"
                    | "SEQUENCE"
                    | "VIEW"
            ),
            "" => toks.get(start) == Some(&Tok::Other('(')),
            _ => false,
        };
        if !simple && first != "SET" {
            // May hold statements of its own: from here on, a candidate anywhere.
            for (j, o) in out.iter_mut().enumerate().skip(start) {
                *o = candidate(j);
            }
            return out;
        }
        if first == "SET" {
            for (j, o) in out.iter_mut().enumerate().take(end).skip(start) {
                *o = candidate(j);
            }
        }
        start = end + 1;
    }
    out
}

/// The session variables that decide how the server splits and reads SQL text: the refusal
/// check reads a request as the pinned session reads it (`sql_mode` without ANSI_QUOTES /
/// NO_BACKSLASH_ESCAPES, utf8mb4), so nothing of a request may change them for what follows
/// (`NO_BACKSLASH_ESCAPES` would turn `'\'; XA START 'x'; …'` into three statements; a gbk
/// lead byte swallows a backslash).
const LEXING_VARIABLES: &[&str] = &[
    "SQL_MODE",
    "CHARACTER_SET_CLIENT",
    "CHARACTER_SET_CONNECTION",
    "CHARACTER_SET_RESULTS",
    "COLLATION_CONNECTION",
];

/// Session variables that bound what one session holds in the server's memory (the server's
/// settings stand: `max_session_mem_used`, internal temporary tables in memory up to
/// min(tmp_table_size, max_heap_table_size), then on disk) or keep tables out of it.
const MEMORY_VARIABLES: &[&str] = &[
    "MAX_SESSION_MEM_USED",
    "MAX_HEAP_TABLE_SIZE",
    "TMP_TABLE_SIZE",
    "TMP_MEMORY_TABLE_SIZE",
    "ENFORCE_STORAGE_ENGINE",
    "DEFAULT_STORAGE_ENGINE",
    "DEFAULT_TMP_STORAGE_ENGINE",
];

/// MariaDB's and MySQL's character set names (`SHOW CHARACTER SET`), for `SET NAMES x`.
const CHARSETS: &[&str] = &[
    "armscii8", "ascii", "big5", "binary", "cp1250", "cp1251", "cp1256", "cp1257", "cp850",
    "cp852", "cp866", "cp932", "dec8", "eucjpms", "euckr", "gb18030", "gb2312", "gbk", "geostd8",
    "greek", "hebrew", "hp8", "keybcs2", "koi8r", "koi8u", "latin1", "latin2", "latin5", "latin7",
    "macce", "macroman", "sjis", "swe7", "tis620", "ucs2", "ujis", "utf16", "utf16le", "utf32",
    "utf8", "utf8mb3", "utf8mb4",
];

fn lexing_refused(what: &str) -> String {
    format!(
        "{} cannot be changed on MySQL projects: the session's sql_mode and character set \
         (utf8mb4) are fixed, since they decide how the server reads the rest of the request",
        what.to_lowercase()
    )
}

/// A piece of SQL for [`refused`]: an unquoted word (uppercase), a string's content, a
/// `` `quoted` `` identifier, or another character (whitespace left out).
#[derive(Debug, PartialEq)]
enum Tok {
    Word(String),
    Str(String),
    /// A `` `quoted` `` identifier's name (uppercase).
    Ident(String),
    /// An executable comment (`/*! … */`, `/*M! … */`): its content is scanned as SQL too,
    /// but whether the server runs it depends on its version number.
    Executable,
    Other(char),
}

fn scan(sql: &str, out: &mut Vec<Tok>) {
    for token in Lexer::new(sql) {
        match token {
            Token::Plain(text) => {
                let mut word = String::new();
                for c in text.chars() {
                    // MariaDB's identifier characters: ASCII letters and digits, `_`, `$`
                    // and every byte from 0x80 on (any non-ASCII character of utf8mb4).
                    if c.is_ascii_alphanumeric() || c == '_' || c == '$' || !c.is_ascii() {
                        word.push(c.to_ascii_uppercase());
                        continue;
                    }
                    if !word.is_empty() {
                        out.push(Tok::Word(std::mem::take(&mut word)));
                    }
                    if !c.is_whitespace() {
                        out.push(Tok::Other(c));
                    }
                }
                if !word.is_empty() {
                    out.push(Tok::Word(word));
                }
            }
            Token::Quoted(text) => {
                let b = text.as_bytes();
                match b[0] {
                    b'\'' | b'"' => out.push(Tok::Str(unquote(text))),
                    b'`' => out.push(Tok::Ident(unquote_ident(text).to_ascii_uppercase())),
                    b'/' if executable_comment(text) => {
                        out.push(Tok::Executable);
                        // An executable comment: the server runs what is inside.
                        let inner = text[2..]
                            .trim_start_matches(['M', 'm'])
                            .trim_start_matches('!')
                            .trim_start_matches(|c: char| c.is_ascii_digit());
                        let inner = inner.strip_suffix("*/").unwrap_or(inner);
                        // Shorter than `text`: the recursion ends.
                        scan(inner, out);
                    }
                    // A comment: a separator.
                    _ => {}
                }
            }
        }
    }
}

/// A `` `quoted` `` identifier's name.
fn unquote_ident(text: &str) -> String {
    let body = text.strip_prefix('`').unwrap_or(text);
    body.strip_suffix('`').unwrap_or(body).replace("``", "`")
}

/// Whether a comment is one the server may run (`/*!…`, `/*M!…`).
fn executable_comment(text: &str) -> bool {
    let b = text.as_bytes();
    b.get(2) == Some(&b'!') || (matches!(b.get(2), Some(b'M' | b'm')) && b.get(3) == Some(&b'!'))
}

/// A string literal's content: quotes taken off, `''` and `\x` read as MySQL reads them.
fn unquote(text: &str) -> String {
    let q = text.chars().next().unwrap_or('\'');
    let body = text.strip_prefix(q).unwrap_or(text);
    let body = body.strip_suffix(q).unwrap_or(body);
    let mut out = String::with_capacity(body.len());
    let mut chars = body.chars().peekable();
    while let Some(c) = chars.next() {
        if c == '\\' {
            match chars.next() {
                Some('n') => out.push('\n'),
                Some('t') => out.push('\t'),
                Some('r') => out.push('\r'),
                Some('0') => out.push('\0'),
                Some(other) => out.push(other),
                None => {}
            }
        } else if c == q && chars.peek() == Some(&q) {
            chars.next();
            out.push(q);
        } else {
            out.push(c);
        }
    }
    out
}

/// The statements of a script, split at `;` outside strings, identifiers and comments (empty
/// ones left out).
pub fn split_statements(sql: &str) -> Vec<&str> {
    let mut out = Vec::new();
    let mut start = 0;
    let mut pos = 0;
    for token in Lexer::new(sql) {
        let len = token.text().len();
        if let Token::Plain(text) = token {
            for (i, c) in text.char_indices() {
                if c == ';' {
                    out.push(&sql[start..pos + i]);
                    start = pos + i + 1;
                }
            }
        }
        pos += len;
    }
    out.push(&sql[start..]);
    out.into_iter()
        .filter(|s| !keywords(s, 1).is_empty())
        .collect()
}

/// The statement with `$n` placeholders rewritten to `?` and the values in the order the
/// `?`s take them (a `$n` used twice takes its value twice). Without any `$n`, the `?`s as
/// written take the params in order.
fn bind(sql: &str, params: &[Json]) -> Result<(String, Vec<Value>), String> {
    let mut out = String::with_capacity(sql.len());
    let mut order = Vec::new();
    for token in Lexer::new(sql) {
        match token {
            Token::Plain(text) => {
                let bytes = text.as_bytes();
                let mut i = 0;
                while i < bytes.len() {
                    let c = bytes[i];
                    let after_ident = i > 0 && is_ident_byte(bytes[i - 1])
                        || (i == 0 && out.as_bytes().last().is_some_and(|b| is_ident_byte(*b)));
                    if c == b'$' && !after_ident && bytes.get(i + 1).is_some_and(u8::is_ascii_digit)
                    {
                        let mut j = i + 1;
                        while bytes.get(j).is_some_and(u8::is_ascii_digit) {
                            j += 1;
                        }
                        let n: usize = text[i + 1..j]
                            .parse()
                            .map_err(|_| format!("placeholder {} is out of range", &text[i..j]))?;
                        if n == 0 || n > params.len() {
                            return Err(format!(
                                "placeholder ${n} has no value: {} params were given",
                                params.len()
                            ));
                        }
                        order.push(n - 1);
                        out.push('?');
                        i = j;
                    } else {
                        let ch_len = text[i..].chars().next().map_or(1, char::len_utf8);
                        out.push_str(&text[i..i + ch_len]);
                        i += ch_len;
                    }
                }
            }
            other => out.push_str(other.text()),
        }
    }
    if order.is_empty() {
        return Ok((sql.to_string(), params.iter().map(json_param).collect()));
    }
    Ok((
        out,
        order.into_iter().map(|i| json_param(&params[i])).collect(),
    ))
}

fn is_ident_byte(b: u8) -> bool {
    b.is_ascii_alphanumeric() || b == b'_' || b == b'$' || b >= 0x80
}

/// A JSON parameter as a MySQL value: numbers stay numbers (integers exact), booleans are
/// 1/0, arrays and objects are sent as their JSON text (for a JSON column or JSON functions).
fn json_param(v: &Json) -> Value {
    match v {
        Json::Null => Value::NULL,
        Json::Bool(b) => Value::Int(i64::from(*b)),
        Json::Number(n) => {
            if let Some(i) = n.as_i64() {
                Value::Int(i)
            } else if let Some(u) = n.as_u64() {
                Value::UInt(u)
            } else {
                Value::Double(n.as_f64().unwrap_or(f64::NAN))
            }
        }
        Json::String(s) => Value::Bytes(s.as_bytes().to_vec()),
        other => Value::Bytes(other.to_string().into_bytes()),
    }
}

/// A piece of SQL text as MySQL reads it.
#[derive(Debug, PartialEq)]
enum Token<'a> {
    Plain(&'a str),
    /// A quoted string, `identifier` or comment, kept whole.
    Quoted(&'a str),
}

impl<'a> Token<'a> {
    fn text(&self) -> &'a str {
        match self {
            Token::Plain(t) | Token::Quoted(t) => t,
        }
    }
}

/// Splits SQL into plain text and the parts nothing may be rewritten in: `'…'` and `"…"`
/// strings (with `\` escapes and doubled quotes), `` `…` `` identifiers, `-- ` and `#` line
/// comments, `/* … */` comments.
struct Lexer<'a> {
    sql: &'a str,
    pos: usize,
}

impl<'a> Lexer<'a> {
    fn new(sql: &'a str) -> Self {
        Lexer { sql, pos: 0 }
    }
}

impl<'a> Iterator for Lexer<'a> {
    type Item = Token<'a>;

    fn next(&mut self) -> Option<Token<'a>> {
        let rest = &self.sql[self.pos..];
        if rest.is_empty() {
            return None;
        }
        let b = rest.as_bytes();
        let quoted_end = |i: usize| -> usize {
            match b[0] {
                b'\'' | b'"' | b'`' => {
                    let q = b[0];
                    let mut j = i;
                    while j < b.len() {
                        if b[j] == b'\\' && q != b'`' {
                            j += 2;
                        } else if b[j] == q {
                            if b.get(j + 1) == Some(&q) {
                                j += 2;
                            } else {
                                return j + 1;
                            }
                        } else {
                            j += 1;
                        }
                    }
                    b.len()
                }
                _ => unreachable!(),
            }
        };
        let starts_special = |i: usize| -> bool {
            match b[i] {
                b'\'' | b'"' | b'`' | b'#' => true,
                // MariaDB: `--` then a space or any control character (`\x0b`, `\x01`: its
                // `my_isspace || my_iscntrl`), or the end.
                b'-' => {
                    b.get(i + 1) == Some(&b'-')
                        && b.get(i + 2)
                            .is_none_or(|c| c.is_ascii_whitespace() || c.is_ascii_control())
                }
                b'/' => b.get(i + 1) == Some(&b'*'),
                _ => false,
            }
        };
        let len = if starts_special(0) {
            match b[0] {
                b'\'' | b'"' | b'`' => quoted_end(1),
                b'#' | b'-' => rest.find('\n').map_or(b.len(), |n| n + 1),
                _ => rest[2..].find("*/").map_or(b.len(), |n| n + 4),
            }
        } else {
            let mut i = 0;
            while i < b.len() && !starts_special(i) {
                i += 1;
            }
            i
        };
        let len = len.min(b.len());
        // Never split a character.
        let len = (len..=b.len())
            .find(|&l| rest.is_char_boundary(l))
            .unwrap_or(b.len());
        let text = &rest[..len];
        self.pos += len;
        Some(if starts_special(0) {
            Token::Quoted(text)
        } else {
            Token::Plain(text)
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn dollar_placeholders_become_question_marks_outside_quotes_and_comments() {
        let (sql, values) = bind(
            "SELECT $1, '$1', \"$2\", `c$1`, price$1 -- $2\n, /* $2 */ $2, $1 # $1",
            &[json!(7), json!("x")],
        )
        .unwrap();
        assert_eq!(
            sql,
            "SELECT ?, '$1', \"$2\", `c$1`, price$1 -- $2\n, /* $2 */ ?, ? # $1"
        );
        assert_eq!(
            values,
            vec![Value::Int(7), Value::Bytes(b"x".to_vec()), Value::Int(7)]
        );
        let (sql, values) = bind("SELECT ? + ?", &[json!(1), json!(true)]).unwrap();
        assert_eq!(sql, "SELECT ? + ?");
        assert_eq!(values, vec![Value::Int(1), Value::Int(1)]);
        assert!(bind("SELECT $3", &[json!(1)]).unwrap_err().contains("$3"));
        assert!(bind("SELECT $0", &[json!(1)]).is_err());
        let (sql, _) = bind("SELECT 'it\\'s $1', 'a''$1' , $1", &[json!(u64::MAX)]).unwrap();
        assert_eq!(sql, "SELECT 'it\\'s $1', 'a''$1' , ?");
    }

    #[test]
    fn xa_password_and_unknown_dynamic_sql_are_refused_wherever_they_hide() {
        for sql in [
            "XA START 'x'",
            "xa recover",
            "SELECT 1; XA RECOVER",
            "XA/* c */RECOVER",
            "XA\nCOMMIT 'x'",
            "SET STATEMENT max_statement_time=1 FOR XA RECOVER",
            "/*!XA RECOVER*/",
            "/*!50000 XA RECOVER */",
            "/*M!100500 XA ROLLBACK 'x' */",
            "SELECT '\\'' XA RECOVER",
            "CREATE PROCEDURE p() BEGIN XA RECOVER; END",
            "EXECUTE IMMEDIATE 'XA RECOVER'",
            "EXECUTE IMMEDIATE 'XA ' 'RECOVER'",
            "EXECUTE IMMEDIATE 'EXECUTE IMMEDIATE ''XA RECOVER'''",
            "PREPARE s FROM 'XA START \\'x\\''",
            "PREPARE s FROM @q",
            "PREPARE `s` FROM CONCAT('XA ', 'RECOVER')",
            "EXECUTE IMMEDIATE @q",
            "EXECUTE IMMEDIATE 0x5841205245434f564552",
            "SET PASSWORD = PASSWORD('x')",
            "set password for current_user() = 'x'",
            "SELECT 1; SET PASSWORD = 'x'",
            "SELECT GET_LOCK('a', 10)",
            "SELECT is_used_lock ('a')",
            "DO RELEASE_ALL_LOCKS()",
            "CREATE PROCEDURE p() BEGIN SET PASSWORD = 'x'; END",
            "ALTER USER CURRENT_USER() IDENTIFIED BY 'x'",
            "EXECUTE IMMEDIATE 'ALTER USER CURRENT_USER() IDENTIFIED BY ''x'''",
        ] {
            assert!(refused(sql).is_some(), "{sql} was not refused");
        }
        assert!(refused("XA RECOVER").unwrap().contains("XA"));
        for sql in [
            "SELECT 'XA RECOVER', `xa` FROM t -- XA RECOVER",
            "/* XA RECOVER */ SELECT 1",
            "INSERT INTO notes (body) VALUES ('xa start; set password = 1')",
            "UPDATE users SET password = 'x' WHERE id = 1",
            "UPDATE users u SET password = ? WHERE id = 1",
            "SELECT xa, recover FROM t",
            "START TRANSACTION; INSERT INTO t VALUES (1); COMMIT",
            "ALTER TABLE user ADD COLUMN x int",
            "SELECT get_lock FROM t",
            "SELECT id FROM t WHERE id = 1 FOR UPDATE",
        ] {
            assert_eq!(refused(sql), None, "{sql}");
        }
    }

    /// Red team rt4: dynamic SQL under a name the old scanner split (`a€b`), a `quoted`
    /// function name, `SET PASSWORD` in a handler's body; and every neighbour of each.
    #[test]
    fn dynamic_sql_quoted_names_and_nested_statements_are_refused() {
        for sql in [
            // (a) dynamic SQL, any name, any source, anywhere.
            "SET @v='SET sql_mode=''NO_BACKSLASH_ESCAPES'''; PREPARE a€b FROM @v; EXECUTE a€b; \
             SELECT @@sql_mode",
            "SET @v='SET NAMES gbk'; PREPARE a€b FROM @v; EXECUTE a€b",
            "CREATE PROCEDURE run(q TEXT) BEGIN SET @q=q; PREPARE a€b FROM @q; EXECUTE a€b; END",
            "PREPARE s FROM 'SELECT ?'",
            "prepare `s` from 'SELECT 1'",
            "PREPARE s$x FROM @q",
            "EXECUTE IMMEDIATE 'SELECT 1'",
            "EXECUTE s USING @a",
            "execute\ta€b",
            "DEALLOCATE PREPARE s",
            "DROP PREPARE s",
            "SELECT 1; /* x */ PREPARE s FROM 'SELECT 1'",
            "CREATE EVENT e ON SCHEDULE EVERY 1 SECOND DO EXECUTE IMMEDIATE 'SELECT 1'",
            "CREATE TRIGGER tr BEFORE INSERT ON t FOR EACH ROW BEGIN PREPARE s FROM @q; END",
            "BEGIN NOT ATOMIC DECLARE i INT DEFAULT 0; WHILE i < 6000 DO \
             PREPARE s FROM 'SELECT 1'; SET i = i + 1; END WHILE; END",
            // (b) names as the server looks them up: quoted, folded.
            "SELECT `GET_LOCK`('cross',0)",
            "SELECT `get_lock` ('cross', 0)",
            "DO `RELEASE_ALL_LOCKS`()",
            "SELECT IS_USED_LOCK/* c */('x')",
            "SELECT gét_lock('x', 0)",
            "SELECT ıs_free_lock('x')",
            "SET `sql_mode` = 'ANSI_QUOTES'",
            "SET @@session.`max_session_mem_used` = 8589934592",
            "SET sql_mödé = 'ANSI_QUOTES'",
            "SET STATEMENT max_session_mem_used=8589934592 FOR SELECT 1",
            // (c) SET PASSWORD wherever a statement can start.
            "BEGIN NOT ATOMIC DECLARE CONTINUE HANDLER FOR SQLSTATE '45000' SET PASSWORD = \
             PASSWORD('x'); SIGNAL SQLSTATE '45000'; END",
            "BEGIN NOT ATOMIC DECLARE EXIT HANDLER FOR 1062 SET PASSWORD = 'x'; END",
            "BEGIN NOT ATOMIC DECLARE c CONDITION FOR 1; DECLARE EXIT HANDLER FOR c \
             SET PASSWORD = 'x'; END",
            "IF 1 THEN SET PASSWORD = 'x'; END IF",
            "IF (SELECT 1 FROM t FOR UPDATE) THEN SET PASSWORD = 'x'; END IF",
            "CASE WHEN 1 THEN SET PASSWORD = 'x'; END CASE",
            "lbl: LOOP SET PASSWORD = 'x'; LEAVE lbl; END LOOP",
            "WHILE 1 DO SET PASSWORD = 'x'; END WHILE",
            "REPEAT SET PASSWORD = 'x'; UNTIL 1 END REPEAT",
            "FOR i IN 1..2 DO SET PASSWORD = 'x'; END FOR",
            "CREATE PROCEDURE p() SET PASSWORD = 'x'",
            "CREATE PROCEDURE p() COMMENT 'c' SET PASSWORD = 'x'",
            "CREATE PROCEDURE db.update() SET PASSWORD = 'x'",
            "CREATE TRIGGER tr BEFORE UPDATE ON t FOR EACH ROW SET PASSWORD = 'x'",
            "CREATE TRIGGER tr BEFORE UPDATE ON t FOR EACH ROW FOLLOWS o SET PASSWORD = 'x'",
            "CREATE EVENT e ON SCHEDULE EVERY 1 DAY DO SET PASSWORD = 'x'",
            "SET @a = 1, PASSWORD = 'x'",
            "SET STATEMENT max_statement_time = 1 FOR SET PASSWORD = 'x'",
            "SET PASSWORD FOR CURRENT_USER() = 'x'",
            "UPDATE t SET a = 1; BEGIN NOT ATOMIC SET PASSWORD = 'x'; END",
            "SELECT 1;; SET PASSWORD = 'x'",
            "BEGIN NOT ATOMIC UPDATE t SET password = 'x'; END",
        ] {
            assert!(refused(sql).is_some(), "{sql} was not refused");
        }
        assert!(refused("PREPARE a€b FROM @v")
            .unwrap()
            .contains("dynamic SQL"));
        assert!(refused("SELECT `GET_LOCK`('x', 0)")
            .unwrap()
            .contains("GET_LOCK"));
        for sql in [
            "UPDATE users SET password = 'x' WHERE id = 1",
            "UPDATE users u JOIN t ON t.id = u.id SET u.a = 1, password = ? WHERE 1",
            "INSERT INTO users SET name = 'a', password = 'x'",
            "BEGIN; UPDATE users SET password = 'x'; COMMIT",
            "START TRANSACTION; UPDATE users SET password = 'x'; COMMIT",
            "SELECT * FROM users WHERE password = ?",
            "CREATE PROCEDURE p() BEGIN UPDATE t SET `password` = 'x'; END",
            "SELECT `execute`, t.prepare, `deallocate` FROM t",
            "SELECT 'PREPARE s FROM @q', `GET_LOCK` FROM t -- EXECUTE s",
            "SELECT a€b, $x, prepared, executed FROM t",
            "SELECT get_locks('x'), my_get_lock('x'), `get lock`('x')",
            "SET @a = 1, @password = 2",
            "CREATE TABLE t (id int, password varchar(80), a SET('x', 'y'))",
            "CALL p(1)",
        ] {
            assert_eq!(refused(sql), None, "{sql}");
        }
    }

    /// The red team's repros (a request changing how the server reads its own rest) and
    /// every other way to change the reading: refused whatever the scope.
    #[test]
    fn nothing_of_a_request_changes_how_the_server_reads_it() {
        for sql in [
            "SET sql_mode='NO_BACKSLASH_ESCAPES'; SELECT '\\'; XA START 'x'; INSERT INTO t(v) \
             VALUES ('a'); XA END 'x'; XA PREPARE 'x'; SELECT '\\'",
            "SET NAMES gbk; SELECT '中\\', IS_FREE_LOCK('x') -- '",
            "SET sql_mode = 'ANSI_QUOTES'; SELECT \"a\\\"; XA RECOVER; \"",
            "set @@session.sql_mode := ''",
            "SET LOCAL sql_mode = DEFAULT",
            "SET @a = 1, `sql_mode` = 'ORACLE'",
            "SET @@`SQL_MODE`='MSSQL'",
            "SET STATEMENT sql_mode='NO_BACKSLASH_ESCAPES' FOR EXECUTE IMMEDIATE 'SELECT 1'",
            "SET character_set_client = gbk",
            "SET collation_connection = 'gbk_chinese_ci'",
            "SET @@character_set_connection=big5",
            "SET NAMES 'sjis'",
            "SET NAMES `gbk` COLLATE gbk_bin",
            "SET NAMES DEFAULT",
            "SET @x = 1, NAMES gbk",
            "SET CHARACTER SET gbk",
            "SET CHAR SET big5",
            "set charset cp932",
            "CREATE PROCEDURE p() BEGIN SET sql_mode = 'NO_BACKSLASH_ESCAPES'; \
             EXECUTE IMMEDIATE 'SELECT 1'; END",
            "CREATE PROCEDURE p() BEGIN DECLARE CONTINUE HANDLER FOR SQLEXCEPTION SET NAMES \
             gbk; SELECT 1; END",
            "/*!99999 ' */ SELECT GET_LOCK('a', 1) -- '",
            "/*!SELECT '*/' , GET_LOCK('a',1) -- '*/",
            "/*m!100000 SELECT 1 */",
            "SELECT 1 --\x01 '\n, GET_LOCK('a',1) -- '",
            "SELECT 1 # \0 '\n, GET_LOCK('a',1) -- '",
            "SET SESSION max_heap_table_size = 1073741824",
            "SET @@max_session_mem_used := 0",
            "SET STATEMENT tmp_table_size = 1e9 FOR SELECT 1",
            "SET enforce_storage_engine = NULL",
        ] {
            assert!(refused(sql).is_some(), "{sql} was not refused");
        }
        assert!(refused("SET NAMES gbk").unwrap().contains("set names"));
        // `--` and a control character: a comment, as MariaDB reads it.
        assert_eq!(split_statements("SELECT 1 --\x0b; x\nSELECT 2").len(), 1);
        for sql in [
            "SELECT @@sql_mode, @@character_set_client",
            "CREATE TABLE t (a TEXT CHARACTER SET latin1, b TEXT CHARSET utf8mb4)",
            "CREATE TABLE t (a int) ENGINE=InnoDB, CHARSET=latin1",
            "ALTER TABLE t CONVERT TO CHARACTER SET utf8mb4",
            "SELECT a, names FROM t",
            "UPDATE t SET names = 'x', charset = 'y'",
            "INSERT INTO t (id, names) VALUES (1, 'SET NAMES gbk')",
            "SELECT 'sql_mode = 1' -- sql_mode = 1",
            "SELECT 1 --x",
            "/* SET NAMES gbk */ SELECT 1",
        ] {
            assert_eq!(refused(sql), None, "{sql}");
        }
    }

    /// Every way to write an assignment of each pinned variable (mode × form × value × letter
    /// case, the case drawn from a fixed-seed generator): all refused; the same words read
    /// (not assigned) are not.
    #[test]
    fn every_form_of_changing_the_reading_is_refused() {
        let mut seed = 0x2545_f491_4f6c_dd1du64;
        let mut mixed_case = |s: &str| -> String {
            s.chars()
                .map(|c| {
                    seed ^= seed << 13;
                    seed ^= seed >> 7;
                    seed ^= seed << 17;
                    if seed & 1 == 0 {
                        c.to_ascii_uppercase()
                    } else {
                        c.to_ascii_lowercase()
                    }
                })
                .collect()
        };
        let forms = [
            "SET {v} = {x}",
            "SET SESSION {v}={x}",
            "SET LOCAL {v} = {x}",
            "SET @@{v} := {x}",
            "SET @@session.{v} = {x}",
            "SET @@local.`{v}` = {x}",
            "SET `{v}` = {x}",
            "SET @a = 1, {v} = {x}",
            "set /* c */ {v} /* d */ = {x}",
            "SET {v}\n-- c\n= {x}",
            "SET STATEMENT {v} = {x} FOR SELECT 1",
            "SET STATEMENT max_statement_time = 1, {v} = {x} FOR SELECT 1",
            "SELECT 1; SET {v} = {x}; SELECT '\\'",
            "CREATE PROCEDURE p() BEGIN SET {v} = {x}; END",
            "CREATE PROCEDURE p() BEGIN DECLARE EXIT HANDLER FOR SQLEXCEPTION SET {v} = {x}; END",
            "CREATE TRIGGER tr BEFORE INSERT ON t FOR EACH ROW SET {v} = {x}",
        ];
        let values = [
            "'NO_BACKSLASH_ESCAPES'",
            "'ANSI_QUOTES'",
            "'ORACLE'",
            "DEFAULT",
            "@saved",
            "'gbk'",
            "CONCAT('ANSI', '_QUOTES')",
        ];
        let mut count = 0;
        for v in LEXING_VARIABLES.iter().chain(MEMORY_VARIABLES) {
            for form in forms {
                for x in values {
                    let sql = form.replace("{v}", &mixed_case(v)).replace("{x}", x);
                    assert!(refused(&sql).is_some(), "{sql} was not refused");
                    count += 1;
                }
            }
            let read = format!("SELECT @@{}, @@session.{} AS x", mixed_case(v), v);
            assert_eq!(refused(&read), None, "{read}");
        }
        for charset in ["gbk", "'big5'", "`sjis`", "DEFAULT", "cp932", "utf8mb4"] {
            for form in [
                "SET NAMES {c}",
                "SET NAMES {c} COLLATE x",
                "SET @a = 1, NAMES {c}",
                "SET CHARACTER SET {c}",
                "SET CHAR SET {c}",
                "SET CHARSET {c}",
                "SET @a = 1, CHARSET {c}",
                "CREATE PROCEDURE p() BEGIN SET NAMES {c}; END",
            ] {
                let sql = mixed_case(&form.replace("{c}", charset));
                assert!(refused(&sql).is_some(), "{sql} was not refused");
                count += 1;
            }
        }
        assert!(count > 700, "{count}");
    }

    #[test]
    fn the_session_sql_mode_keeps_no_mode_that_changes_the_reading() {
        assert_eq!(
            crate::mysql::session_sql_mode(
                "STRICT_TRANS_TABLES,ANSI_QUOTES,NO_BACKSLASH_ESCAPES,ORACLE,PIPES_AS_CONCAT"
            ),
            "STRICT_TRANS_TABLES,PIPES_AS_CONCAT"
        );
        assert_eq!(crate::mysql::session_sql_mode(""), "");
        assert_eq!(crate::mysql::session_sql_mode("A'B,C"), "C");
    }

    #[test]
    fn scripts_split_at_semicolons_of_their_own() {
        assert_eq!(
            split_statements("INSERT INTO t VALUES (';'); -- ;\nSELECT 1; /* ; */ ;"),
            vec!["INSERT INTO t VALUES (';')", " -- ;\nSELECT 1"]
        );
        assert_eq!(split_statements("  "), Vec::<&str>::new());
        assert_eq!(split_statements("SELECT 'é;'"), vec!["SELECT 'é;'"]);
    }

    /// The driver's refusal of a packet past its limit is told apart from a lost connection.
    #[test]
    fn a_packet_past_the_limit_is_recognised() {
        use mysql_common::proto::codec::error::PacketCodecError;
        let too_large: mysql_async::Error = PacketCodecError::PacketTooLarge.into();
        assert!(packet_too_large(&too_large));
        let lost: mysql_async::Error =
            PacketCodecError::Io(std::io::Error::from(std::io::ErrorKind::ConnectionReset)).into();
        assert!(!packet_too_large(&lost));
        let other: mysql_async::Error = PacketCodecError::PacketsOutOfSync.into();
        assert!(!packet_too_large(&other));
    }

    #[test]
    fn operations_name_the_command() {
        for (sql, rows, op) in [
            ("select 1", true, "SELECT"),
            ("/* c */ INSERT INTO t VALUES (1)", false, "INSERT"),
            ("CREATE TABLE t (id int)", false, "CREATE TABLE"),
            ("create unique index i on t (a)", false, "CREATE INDEX"),
            ("CREATE OR REPLACE VIEW v AS SELECT 1", false, "CREATE VIEW"),
            ("DROP TABLE IF EXISTS t", false, "DROP TABLE"),
            ("WITH x AS (SELECT 1) SELECT * FROM x", true, "SELECT"),
            ("(SELECT 1) UNION (SELECT 2)", true, "SELECT"),
            ("SHOW TABLES", true, "SHOW"),
            ("TRUNCATE t", false, "TRUNCATE"),
        ] {
            assert_eq!(operation(sql, rows).as_deref(), Some(op), "{sql}");
        }
        assert_eq!(operation(" -- nothing\n", false), None);
    }
}
