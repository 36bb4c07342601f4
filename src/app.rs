//! The shared state of a running server and its start-up sequence.

use std::net::SocketAddr;
use std::sync::Arc;

use anyhow::{Context, Result};

use crate::auth::ratelimit::{AccountLimits, RateLimiter};
use crate::config::Config;
use crate::db::ClusterTarget;
use crate::embedded;
use crate::metrics::Metrics;
use crate::secrets::Secrets;
use crate::sql::Sql;

mod cluster;
mod lifecycle;

pub use cluster::{ClusterMode, NodeReport, ProjectLeadership};

/// Everything a request handler needs. Cheap to clone (an `Arc`).
pub struct App {
    pub config: Config,
    pub secrets: Secrets,
    pub cluster: ClusterTarget,
    pub control: deadpool_postgres::Pool,
    pub sql: Arc<Sql>,
    /// SQL answers held until their clients take them: the server's budget, the per-address
    /// cap (`api::answers`).
    pub answers: Arc<crate::api::answers::AnswerBudget>,
    /// The row-level security policy API (over `sql`'s connections).
    pub rls: crate::rls::Policies,
    /// The per-caller request limit (applied by `auth`, and to realtime tokens).
    pub rate: Arc<RateLimiter>,
    pub metrics: Arc<Metrics>,
    /// Bearer tokens → principals, principals → project access, the access cache.
    pub auth: Arc<crate::auth::Auth>,
    pub accounts: crate::accounts::Accounts,
    pub projects: crate::projects::Projects,
    pub keys: crate::keys::Keys,
    pub team: crate::team::Team,
    pub bus: Arc<crate::bus::Bus>,
    pub cdc: crate::cdc::Cdc,
    pub realtime: Arc<crate::realtime::Realtime>,
    pub webhooks: crate::webhooks::Webhooks,
    /// Buckets and files: the object backend, URL signing and its clock.
    pub storage: crate::storage::Storage,
    /// MySQL projects: the MySQL server (embedded MariaDB, started at the first need, or
    /// `mysql_url`), their accounts and SQL pools.
    pub mysql: Arc<crate::mysql::Mysql>,
    /// Keeps the embedded cluster alive as long as the server; stopped on shutdown.
    pub embedded: Option<Arc<embedded::Cluster>>,
    /// Cluster mode (`nats_url`): this node's link to the others; `None` for a single node.
    pub cluster_mode: Option<Arc<ClusterMode>>,
    /// Projects this server is deleting now: their statements' errors are answered as the
    /// project being gone, not as an unreachable database ([`App::is_being_deleted`]).
    deleting: std::sync::Mutex<std::collections::HashSet<String>>,
    /// Projects another process (a node, the CLI) announced it is deleting
    /// ([`crate::auth::AccessChange::Deleting`]), and when: the same, for
    /// [`lifecycle::DELETING_ELSEWHERE`].
    deleting_elsewhere: std::sync::Mutex<std::collections::HashMap<String, std::time::Instant>>,
}

pub type SharedApp = Arc<App>;

mod realtime_host;

impl App {
    /// Opens (or starts) the database, applies migrations and brings project databases up to
    /// date. `extra_pg` adds settings to an embedded cluster (tests use `fsync=off`).
    pub async fn open(config: Config, extra_pg: &[(&str, &str)]) -> Result<SharedApp> {
        Self::open_as(config, extra_pg, true).await
    }

    /// [`App::open`] for a CLI command: the same, without the start-up storage sweep (a running
    /// server may be mid-upload; sweeping is the server's job). With a running server the
    /// caller points `config.database_url` at that server's cluster.
    pub async fn open_cli(config: Config) -> Result<SharedApp> {
        Self::open_as(config, &[], false).await
    }

    async fn open_as(config: Config, extra_pg: &[(&str, &str)], sweep: bool) -> Result<SharedApp> {
        crate::secrets::create_data_dir(&config.data_dir, config.database_url.is_none())
            .with_context(|| format!("creating {}", config.data_dir.display()))?;
        let mut secrets = Secrets::load_or_create(&config.data_dir)?;
        let (cluster, embedded) = match &config.database_url {
            Some(url) => {
                let target = ClusterTarget::from_url(url.expose())?;
                tracing::info!(
                    host = %target.host,
                    port = target.port,
                    user = %target.admin_user,
                    "using an existing cluster"
                );
                (target, None)
            }
            None => {
                let pg_dir = config.data_dir.join("pg");
                let password = secrets.pg_password.clone();
                let extra: Vec<(String, String)> = extra_pg
                    .iter()
                    .map(|(k, v)| (k.to_string(), v.to_string()))
                    .collect();
                let cluster = tokio::task::spawn_blocking(move || {
                    let extra: Vec<(&str, &str)> = extra
                        .iter()
                        .map(|(k, v)| (k.as_str(), v.as_str()))
                        .collect();
                    embedded::Cluster::start(&pg_dir, &password, &extra)
                })
                .await??;
                let target = ClusterTarget::from_url(&cluster.url("fluxbase"))?;
                (target, Some(Arc::new(cluster)))
            }
        };
        let control = crate::db::open_control(&cluster, crate::db::CONTROL_CONNECTIONS).await?;
        let cluster_mode = match &config.nats_url {
            None => None,
            Some(_) => {
                // Every node derives role passwords and token keys from one secret.
                secrets.instance_secret =
                    crate::cluster::shared_secret(&control, &secrets.instance_secret).await?;
                let node_id = crate::cluster::node_id(&config)?;
                tracing::info!(node_id, "cluster mode");
                let nats = crate::cluster::Cluster::connect(&config, node_id).await?;
                Some(Arc::new(ClusterMode::new(nats, cluster.clone())))
            }
        };
        let metrics = Arc::new(Metrics::default());
        let storage =
            crate::storage::Storage::open(&config, &secrets, control.clone(), metrics.clone())?;
        let bus = Arc::new(crate::bus::Bus::default());
        let sql = Arc::new(Sql::new(
            &config,
            &cluster,
            control.clone(),
            secrets.clone(),
            metrics.clone(),
        ));
        let realtime = Arc::new(crate::realtime::Realtime::new(
            &config,
            &secrets,
            control.clone(),
            metrics.clone(),
            bus.clone(),
            storage.clock.clone(),
        ));
        let rate = Arc::new(RateLimiter::new(
            config.rate_limit_requests,
            config.rate_limit_window_secs,
        ));
        let account_limits = Arc::new(AccountLimits::new(&config));
        let mysql = Arc::new(crate::mysql::Mysql::new(&config, &secrets, metrics.clone()));
        let app = Arc::new(App {
            answers: crate::api::answers::AnswerBudget::new(
                config.sql_answer_budget_bytes,
                config.sql_answer_budget_per_address_bytes,
                config.sql_answer_budget_per_project_bytes,
                config.sql_answer_budget_per_account_bytes,
                metrics.clone(),
            ),
            auth: Arc::new(crate::auth::Auth::new(
                control.clone(),
                rate.clone(),
                RateLimiter::new(
                    config.session_rate_limit_requests,
                    config.rate_limit_window_secs,
                ),
                storage.clock.clone(),
                RateLimiter::new(
                    config.auth_failures_per_address,
                    config.auth_rate_window_secs,
                ),
            )),
            accounts: crate::accounts::Accounts::new(
                control.clone(),
                account_limits.clone(),
                config.session_ttl_secs,
                config.invite_ttl_secs as i32,
                storage.clock.clone(),
            ),
            projects: crate::projects::Projects::new(
                control.clone(),
                cluster.clone(),
                secrets.clone(),
                sql.repairs.clone(),
                &config,
                account_limits.clone(),
                mysql.clone(),
            ),
            mysql,
            keys: crate::keys::Keys::new(control.clone(), config.max_api_keys_per_project),
            team: crate::team::Team::new(
                control.clone(),
                config.max_projects_per_user,
                config.invite_ttl_secs as i32,
                account_limits,
            ),
            rls: crate::rls::Policies::new(sql.clone()),
            sql,
            rate,
            metrics,
            cdc: crate::cdc::Cdc::new(
                cluster.clone(),
                control.clone(),
                bus.clone(),
                secrets.clone(),
                crate::cdc::StreamSettings::from_config(&config),
            ),
            realtime,
            webhooks: crate::webhooks::Webhooks::new(
                control.clone(),
                crate::db::control_pool(&cluster, config.webhook_control_connections)?,
                bus.clone(),
                {
                    let mut settings = crate::webhooks::Settings::from_config(&config);
                    settings.node_id = cluster_mode.as_ref().map(|m| m.node_id().to_string());
                    settings
                },
            )
            .with_cluster(cluster.clone()),
            bus,
            storage,
            config,
            secrets,
            cluster,
            control,
            embedded,
            cluster_mode,
            deleting: Default::default(),
            deleting_elsewhere: Default::default(),
        });
        // A server keeps its embedded databases running (a CLI command's run is short, and it
        // stops what it started).
        if sweep {
            app.supervise_embedded()?;
        }
        app.join_cluster();
        let host: std::sync::Weak<dyn crate::realtime::Host> = Arc::downgrade(&app) as _;
        app.realtime.attach(host);
        app.realtime.start_token_expiry();
        // A stream's room stores it in the durable resume history from its start.
        let realtime = Arc::downgrade(&app.realtime);
        app.cdc.on_stream_start(move |project_id| {
            if let Some(realtime) = realtime.upgrade() {
                realtime.start_room(project_id);
            }
        });
        // MySQL projects' binlog streams reach the server as the replication account (the
        // server starts, embedded, when a stream or a project first needs it).
        let mysql = Arc::downgrade(&app.mysql);
        app.cdc.set_mysql_source(Arc::new(move || {
            let mysql = mysql.clone();
            Box::pin(async move {
                let mysql = mysql
                    .upgrade()
                    .ok_or_else(|| anyhow::anyhow!("the server is shutting down"))?;
                Ok(crate::cdc::binlog::MysqlSource {
                    opts: mysql.replication_opts().await?,
                    catalog: mysql.server().await?.admin.clone(),
                    node: mysql.replication_user(),
                    dumps: mysql.dumps.clone(),
                    logs: mysql.logs.clone(),
                })
            })
        }));
        app.migrate_projects(sweep).await?;
        // A server (not a CLI command) reports a storage backend that cannot be used now, not at
        // the first upload. It still starts (SQL, realtime and webhooks do not need it); `/ready`
        // answers 503 with the cause until it is fixed. Sweeping is the server's job too: a
        // running server may be mid-upload while a CLI command runs.
        if sweep {
            if let Err(cause) = app.storage.ready().await {
                tracing::error!(
                    backend = app.storage.backend.describe(),
                    cause,
                    "the storage backend is not usable: uploads and downloads fail, /ready answers 503"
                );
            }
            if let Err(e) = app.storage.migrate_legacy_objects().await {
                tracing::warn!(error = %e, "moving objects of an older version to their keys");
            }
            if let Err(e) = app.storage.sweep().await {
                tracing::warn!(error = %e, "storage sweep at start-up");
            }
            // Databases and roles a crash or a failed drop left behind (recorded ones only):
            // now, then every so often, off the start-up path.
            let weak = Arc::downgrade(&app);
            tokio::spawn(async move {
                let mut tick = tokio::time::interval(crate::projects::teardown::SWEEP_EVERY);
                tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
                loop {
                    tick.tick().await;
                    let Some(app) = weak.upgrade() else { return };
                    if let Err(e) = app.resume_deletions().await {
                        tracing::warn!(error = %format!("{e:#}"), "finishing interrupted project deletions");
                    }
                    let grace = crate::projects::teardown::CREATION_GRACE;
                    if let Err(e) = app.projects.sweep_teardowns(grace, &app.metrics).await {
                        tracing::warn!(error = %format!("{e:#}"), "sweeping project teardowns");
                    }
                }
            });
            // Then staged uploads nobody writes any more, every so often, as long as it runs.
            let weak = Arc::downgrade(&app);
            let every = std::time::Duration::from_secs(app.config.storage_staged_sweep_secs);
            tokio::spawn(async move {
                let mut tick = tokio::time::interval(every);
                tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
                tick.tick().await;
                loop {
                    tick.tick().await;
                    let Some(app) = weak.upgrade() else { return };
                    if let Err(e) = app.storage.sweep_staged().await {
                        tracing::warn!(error = %e, "sweeping staged uploads");
                    }
                }
            });
        }
        lifecycle::listen_for_access_changes(&app);
        if sweep {
            lifecycle::seal_routine_epochs(&app);
        }
        Ok(app)
    }

    /// Starts the supervisors of the embedded PostgreSQL (if the server runs one) and of the
    /// embedded MariaDB (whenever it starts): [`crate::supervise`].
    fn supervise_embedded(&self) -> Result<()> {
        if let Some(cluster) = &self.embedded {
            let metrics = self.metrics.clone();
            crate::supervise::supervise(cluster, move || {
                metrics
                    .embedded_postgres_restarts
                    .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
            })
            .context("starting the embedded PostgreSQL's supervisor")?;
        }
        self.mysql.supervise_embedded()
    }

    /// Stops what the server started (the embedded cluster).
    pub fn shutdown(&self) {
        self.cdc.stop_all();
        self.webhooks.stop();
        self.sql.clear();
        self.mysql.shutdown();
        self.control.close();
        if let Some(cluster) = &self.embedded {
            if let Err(e) = cluster.stop() {
                tracing::warn!(error = %e, "stopping the embedded cluster");
            }
        }
    }
}

/// Turns Nagle's algorithm off for every connection the listener accepts: a WebSocket event or a
/// small response then waits for nothing. With Nagle on, a client's delayed ACK held the next
/// event back for up to 40 ms (the realtime p99). Accepted sockets inherit the option from the
/// listening socket on Linux (`accepted_sockets_inherit_no_delay` checks it).
pub fn no_delay(listener: &tokio::net::TcpListener) -> std::io::Result<()> {
    socket2::SockRef::from(listener).set_tcp_nodelay(true)
}

/// A server listening on a socket, for `serve` and for tests.
pub struct Running {
    pub addr: SocketAddr,
    pub app: SharedApp,
    shutdown: Option<tokio::sync::oneshot::Sender<()>>,
    task: tokio::task::JoinHandle<()>,
}

impl Running {
    /// Binds `config.listen` (port 0 picks a free one) and serves in a background task.
    pub async fn start(app: SharedApp) -> Result<Running> {
        let listener = tokio::net::TcpListener::bind(app.config.listen)
            .await
            .with_context(|| format!("binding {}", app.config.listen))?;
        let addr = listener.local_addr()?;
        no_delay(&listener)?;
        let (tx, rx) = tokio::sync::oneshot::channel::<()>();
        // The webhook outbox writers subscribe (durably) before any stream starts: a stream
        // whose project has no durable subscriber yet confirms what it publishes, so events
        // replayed from the slot at start-up would be confirmed past the writer that joins a
        // moment later, and their deliveries lost across the restart.
        app.webhooks.start().await?;
        app.sql.memory.start(&app.cluster);
        app.cdc.start_all().await?;
        app.start_binlog_purging();
        app.start_leading();
        crate::api::metrics::start_listener(&app).await?;
        let routes = crate::api::filter(app.clone());
        let limits = crate::api::listener::Limits {
            header_read_timeout: std::time::Duration::from_secs(
                app.config.header_read_timeout_secs,
            ),
            send_stall_timeout: std::time::Duration::from_secs(app.config.send_stall_timeout_secs),
            max_connections_per_address: app.config.max_connections_per_address,
            trust_forwarded_for: app.config.trust_forwarded_for,
            metrics: Some(app.metrics.clone()),
        };
        let task = tokio::spawn(crate::api::listener::serve(
            listener,
            routes,
            limits,
            async move {
                let _ = rx.await;
            },
        ));
        tracing::info!(%addr, "serving HTTP and WebSocket");
        Ok(Running {
            addr,
            app,
            shutdown: Some(tx),
            task,
        })
    }

    /// Stops accepting, lets in-flight requests finish, then stops the embedded cluster.
    pub async fn stop(mut self) {
        // Realtime clients first: 1001 ("going away"), so that they reconnect at once.
        self.app.realtime.close_all_sockets().await;
        // Cluster mode: the other nodes take this one's projects over now, not after a tick.
        self.app.stop_leading().await;
        if let Some(tx) = self.shutdown.take() {
            let _ = tx.send(());
        }
        self.app.metrics.stop_listener();
        let _ = tokio::time::timeout(std::time::Duration::from_secs(10), &mut self.task).await;
        let app = self.app.clone();
        let _ = tokio::task::spawn_blocking(move || app.shutdown()).await;
    }
}

#[cfg(test)]
mod tests {
    /// Linux's behaviour, which `Running::start` relies on.
    #[cfg(target_os = "linux")]
    #[tokio::test]
    async fn accepted_sockets_inherit_no_delay() {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let (_client, plain) =
            tokio::join!(tokio::net::TcpStream::connect(addr), listener.accept());
        assert!(
            !plain.unwrap().0.nodelay().unwrap(),
            "by default Nagle is on"
        );

        super::no_delay(&listener).unwrap();
        let (client, accepted) =
            tokio::join!(tokio::net::TcpStream::connect(addr), listener.accept());
        let (accepted, _) = accepted.unwrap();
        client.unwrap();
        assert!(accepted.nodelay().unwrap());
    }
}
