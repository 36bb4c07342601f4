//! MySQL projects: a project whose database lives on a MySQL-compatible server (the embedded
//! MariaDB, or `FLUXBASE_MYSQL_URL`) instead of the PostgreSQL cluster.
//!
//! ```text
//!  Mysql (this service)
//!   ├── server      embedded::Server under <data_dir>/mariadb, started at the first need,
//!   │               or the operator's server (mysql_url); its admin account's pool
//!   ├── provision   database fx_<id>; accounts fx_<id>_read|_readwrite|_admin
//!   ├── sql         POST /api/execute-sql: pools per (project, account), limits, params
//!   ├── render      values → JSON (shared with the binlog change stream)
//!   ├── replication the server-level account the change stream reads the binlog as
//!   └── retention   which binlog files the streams need; the embedded server's purging
//! ```
//! Everything PostgreSQL-only (replication slots, row-level security, the PG pools, project
//! migrations under `sql/project/`) never sees a MySQL project: the app routes by
//! [`crate::projects::Engine`].

pub mod doctor;
pub mod embedded;
pub mod provision;
pub mod render;
pub mod retention;
pub mod sql;

use std::sync::Arc;
use std::time::Duration;

use anyhow::{anyhow, bail, Context, Result};
use mysql_async::prelude::Queryable;
use mysql_async::{Opts, OptsBuilder, Pool, PoolConstraints, PoolOpts};
use tokio::sync::OnceCell;

use crate::config::Config;
use crate::secrets::Secrets;

/// The MySQL side of a server: where the server is, its admin pool, the SQL pools.
pub struct Mysql {
    config: Config,
    secrets: Secrets,
    server: OnceCell<Target>,
    /// Keeps the embedded server alive with the app; stopped at shutdown.
    embedded: std::sync::Mutex<Option<Arc<embedded::Server>>>,
    /// Whether the embedded server gets a supervisor when it starts (a server's, not a CLI
    /// command's: [`Mysql::supervise_embedded`]).
    supervised: std::sync::atomic::AtomicBool,
    /// Set by [`Mysql::shutdown`]: no embedded server starts after it.
    shut: std::sync::atomic::AtomicBool,
    pub(crate) sql: sql::Pools,
    /// The SQL API's counters, shared with PostgreSQL projects' requests.
    metrics: Arc<crate::metrics::Metrics>,
    /// The server's binary logs as `/api/cdc/status` last read them (at most one admin
    /// connection, once a second: [`retention::ServerFacts`]).
    pub(crate) binlog_facts: retention::FactsCache,
    /// The binlog dump each project's stream opened last (a restart ends it first).
    pub dumps: Arc<crate::cdc::binlog::Dumps>,
    /// The server's binary logs, read once for all streams.
    pub logs: Arc<crate::cdc::binlog::LogLister>,
}

/// A reachable server: its admin account and what it is.
pub struct Target {
    pub admin: Opts,
    pub admin_pool: Pool,
    /// The server is MariaDB (else MySQL): binlog privileges and timeout settings differ.
    pub mariadb: bool,
    pub version: String,
    /// The host part of every account this server creates: where the server sees us connect
    /// from (127.0.0.1 for the embedded one).
    pub client_host: String,
    /// The `sql_mode` every project session is pinned to: the server's own without the modes
    /// that change how SQL text is read (ANSI_QUOTES, NO_BACKSLASH_ESCAPES, the dialect
    /// modes), so that the refusal check (`sql::refused`) reads requests as the server does.
    pub sql_mode: String,
}

impl Mysql {
    pub fn new(config: &Config, secrets: &Secrets, metrics: Arc<crate::metrics::Metrics>) -> Mysql {
        Mysql {
            metrics,
            config: config.clone(),
            secrets: secrets.clone(),
            server: OnceCell::new(),
            embedded: std::sync::Mutex::new(None),
            supervised: Default::default(),
            shut: Default::default(),
            sql: sql::Pools::new(config),
            binlog_facts: retention::FactsCache::default(),
            dumps: Default::default(),
            logs: Default::default(),
        }
    }

    /// Whether MySQL projects are served by the operator's server (`mysql_url`).
    pub fn external(&self) -> bool {
        self.config.mysql_url.is_some()
    }

    /// The password of the embedded server's `fluxbase` account.
    fn admin_password(&self) -> String {
        admin_password(&self.secrets)
    }

    /// The server, started (embedded) or reached (`mysql_url`) at the first call.
    pub async fn server(&self) -> Result<&Target> {
        self.server
            .get_or_try_init(|| async {
                let admin = match &self.config.mysql_url {
                    Some(url) => Opts::from_url(url.expose())
                        .map_err(|e| anyhow!("FLUXBASE_MYSQL_URL is not a valid MySQL URL: {e}"))?,
                    // Each node would start its own server: a project's database, accounts and
                    // binlog would exist on one node only.
                    None if self.config.nats_url.is_some() => bail!(
                        "MySQL projects in cluster mode need mysql_url (FLUXBASE_MYSQL_URL): one \
                         MySQL/MariaDB server every node reaches; the embedded MariaDB is one \
                         node's own"
                    ),
                    None if self.config.mysql_embedded_off => bail!(
                        "the running server has not started its embedded MariaDB yet: create the \
                         first MySQL project through the API (or stop the server and run this \
                         command again)"
                    ),
                    None => {
                        let server = self.start_embedded(&[]).await?;
                        Opts::from_url(&server.admin_url())?
                    }
                };
                let target = Target::connect(admin).await?;
                self.ensure_replication_account(&target).await?;
                Ok(target)
            })
            .await
    }

    /// Starts the embedded server under `<data_dir>/mariadb` (or returns the running one).
    pub async fn start_embedded(&self, extra: &[(&str, &str)]) -> Result<Arc<embedded::Server>> {
        {
            let embedded = self.embedded.lock().expect("poisoned");
            if let Some(server) = embedded.clone() {
                return Ok(server);
            }
            if self.shut.load(std::sync::atomic::Ordering::SeqCst) {
                bail!("the server is shutting down");
            }
        }
        let root = self.config.data_dir.join("mariadb");
        let data_dir = self.config.data_dir.clone();
        let password = self.admin_password();
        let extra: Vec<(String, String)> = extra
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect();
        let server = tokio::task::spawn_blocking(move || {
            // The server user must pass through the data directory to its own.
            crate::secrets::create_data_dir(&data_dir, true)?;
            let extra: Vec<(&str, &str)> = extra
                .iter()
                .map(|(k, v)| (k.as_str(), v.as_str()))
                .collect();
            embedded::Server::start(&root, &password, &extra)
        })
        .await??;
        let server = Arc::new(server);
        {
            let mut embedded = self.embedded.lock().expect("poisoned");
            // A start that raced the shutdown (which took the running one, if any): stopped
            // here, never kept (nor supervised) past it.
            if self.shut.load(std::sync::atomic::Ordering::SeqCst) {
                drop(embedded);
                if let Err(e) = server.stop() {
                    tracing::warn!(error = %e, "stopping the embedded MariaDB");
                }
                bail!("the server is shutting down");
            }
            *embedded = Some(server.clone());
        }
        if self.supervised.load(std::sync::atomic::Ordering::SeqCst) {
            self.supervise(&server)?;
        }
        Ok(server)
    }

    /// From now on the embedded server, once started, is started again whenever it ends
    /// unexpectedly ([`crate::supervise`]); a server calls this, a CLI command does not.
    pub fn supervise_embedded(&self) -> Result<()> {
        self.supervised
            .store(true, std::sync::atomic::Ordering::SeqCst);
        match self.embedded() {
            Some(server) => self.supervise(&server),
            None => Ok(()),
        }
    }

    fn supervise(&self, server: &Arc<embedded::Server>) -> Result<()> {
        if !server.claim_supervision() {
            return Ok(());
        }
        let metrics = self.metrics.clone();
        crate::supervise::supervise(server, move || {
            metrics
                .embedded_mariadb_restarts
                .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        })
        .context("starting the embedded MariaDB's supervisor")
    }

    /// The embedded server, if this app started one.
    pub fn embedded(&self) -> Option<Arc<embedded::Server>> {
        self.embedded.lock().expect("poisoned").clone()
    }

    /// The server-level account the change stream reads the binlog as: `fluxbase_repl_<tag>`,
    /// the tag derived from the instance secret, so that several Fluxbase instances can share
    /// one server (the nodes of a cluster share the secret, hence the account).
    pub fn replication_user(&self) -> String {
        format!(
            "fluxbase_repl_{}",
            &self.secrets.derive("mysql-repl-name")[..8]
        )
    }

    fn replication_password(&self) -> String {
        self.secrets.derive("mysql-account:replication")
    }

    /// How to connect as the replication account (REPLICATION SLAVE and BINLOG MONITOR on
    /// MariaDB, REPLICATION CLIENT on MySQL; nothing else). Starts the server if needed.
    pub async fn replication_opts(&self) -> Result<Opts> {
        let target = self.server().await?;
        Ok(OptsBuilder::from_opts(target.admin.clone())
            .user(Some(self.replication_user()))
            .pass(Some(self.replication_password()))
            .db_name(None::<String>)
            .into())
    }

    async fn ensure_replication_account(&self, target: &Target) -> Result<()> {
        let user = format!("'{}'@'{}'", self.replication_user(), target.client_host);
        let pw = self.replication_password();
        let monitor = if target.mariadb {
            "BINLOG MONITOR"
        } else {
            "REPLICATION CLIENT"
        };
        let mut conn = target.admin_pool.get_conn().await?;
        for stmt in [
            format!("CREATE USER IF NOT EXISTS {user} IDENTIFIED BY '{pw}'"),
            format!("ALTER USER {user} IDENTIFIED BY '{pw}'"),
            format!("GRANT REPLICATION SLAVE, {monitor} ON *.* TO {user}"),
        ] {
            conn.query_drop(&stmt)
                .await
                .with_context(|| format!("setting up the replication account {user}"))?;
        }
        Ok(())
    }

    /// Closes the pools and stops the embedded server (shutdown).
    /// The MySQL server's `max_connections` (read now: an operator may change it live).
    pub async fn max_connections(&self) -> Result<i64> {
        let target = self.server().await?;
        let mut conn = target.admin_pool.get_conn().await?;
        let max: Option<i64> = conn.query_first("SELECT @@max_connections").await?;
        Ok(max.unwrap_or(151))
    }

    pub fn shutdown(&self) {
        self.sql.clear();
        let server = {
            let mut embedded = self.embedded.lock().expect("poisoned");
            self.shut.store(true, std::sync::atomic::Ordering::SeqCst);
            embedded.take()
        };
        // Stopped without the lock held: `embedded()` callers on the runtime do not wait.
        if let Some(server) = server {
            if let Err(e) = server.stop() {
                tracing::warn!(error = %e, "stopping the embedded MariaDB");
            }
        }
    }
}

fn admin_password(secrets: &Secrets) -> String {
    secrets.derive("mysql-admin")
}

/// The admin URL of the embedded MariaDB of this instance listening on `port` (a running
/// server's, for a CLI command).
pub fn embedded_admin_url(secrets: &Secrets, port: u16) -> String {
    format!(
        "mysql://{}:{}@127.0.0.1:{port}/",
        embedded::ADMIN_USER,
        admin_password(secrets)
    )
}

impl Target {
    async fn connect(admin: Opts) -> Result<Target> {
        let admin_pool = Pool::new(
            OptsBuilder::from_opts(admin.clone()).pool_opts(
                PoolOpts::default()
                    .with_constraints(PoolConstraints::new(0, 4).expect("0 ≤ 4"))
                    .with_inactive_connection_ttl(Duration::from_secs(60))
                    .with_ttl_check_interval(Duration::from_secs(30)),
            ),
        );
        let mut conn = tokio::time::timeout(Duration::from_secs(30), admin_pool.get_conn())
            .await
            .map_err(|_| anyhow!("connecting to the MySQL server timed out"))?
            .context("connecting to the MySQL server as its admin account")?;
        let (version, user, global_mode): (String, String, String) = conn
            .query_first("SELECT VERSION(), USER(), @@GLOBAL.sql_mode")
            .await?
            .ok_or_else(|| anyhow!("SELECT VERSION() answered nothing"))?;
        let sql_mode = session_sql_mode(&global_mode);
        drop(conn);
        let client_host = user
            .rsplit_once('@')
            .map(|(_, h)| h.to_string())
            .unwrap_or_else(|| "127.0.0.1".into());
        if client_host.contains('\'') || client_host.contains('\\') {
            bail!("unexpected client host {client_host:?}");
        }
        let mariadb = version.to_ascii_lowercase().contains("mariadb");
        tracing::info!(%version, %client_host, "MySQL server reached");
        Ok(Target {
            admin,
            admin_pool,
            mariadb,
            version,
            client_host,
            sql_mode,
        })
    }
}

/// The server's `sql_mode` without the modes that change how SQL text is lexed or parsed.
pub fn session_sql_mode(global: &str) -> String {
    const LEXING: &[&str] = &[
        "ANSI_QUOTES",
        "NO_BACKSLASH_ESCAPES",
        "ANSI",
        "ORACLE",
        "MSSQL",
        "DB2",
        "MAXDB",
        "POSTGRESQL",
    ];
    global
        .split(',')
        .map(str::trim)
        .filter(|m| {
            !m.is_empty()
                && !LEXING.contains(&m.to_ascii_uppercase().as_str())
                && m.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'_')
        })
        .collect::<Vec<_>>()
        .join(",")
}

/// The replication account's name for an instance's secrets (see [`Mysql::replication_user`]).
pub fn replication_user(secrets: &Secrets) -> String {
    format!("fluxbase_repl_{}", &secrets.derive("mysql-repl-name")[..8])
}

/// The MySQL client the server uses, for the benchmarks and tests that drive it directly.
pub use mysql_async;
