//! The control database (schema `fluxbase`) and the cluster the project databases live in.
//!
//! Control-plane queries go through tokio-postgres with a deadpool pool. Migrations under
//! `sql/control/` are embedded in the binary and applied in order at start-up, each in its own
//! transaction, under an advisory lock so that two servers starting together do not race.

use std::str::FromStr;

use anyhow::{anyhow, bail, Context, Result};
use deadpool_postgres::{Manager, ManagerConfig, Pool, RecyclingMethod};
use tokio_postgres::config::Host;
use tokio_postgres::NoTls;

/// Control-plane migrations, in order. Never edit a released one: add the next.
pub const CONTROL_MIGRATIONS: &[(i32, &str, &str)] = &[
    (
        1,
        "control_plane",
        include_str!("../sql/control/0001_control_plane.sql"),
    ),
    (
        2,
        "change_capture",
        include_str!("../sql/control/0002_change_capture.sql"),
    ),
    (
        3,
        "webhooks",
        include_str!("../sql/control/0003_webhooks.sql"),
    ),
    (
        4,
        "storage",
        include_str!("../sql/control/0004_storage.sql"),
    ),
    (5, "team", include_str!("../sql/control/0005_team.sql")),
    (
        8,
        "email_normalisation",
        include_str!("../sql/control/0008_email_normalisation.sql"),
    ),
    (
        9,
        "cluster",
        include_str!("../sql/control/0009_cluster.sql"),
    ),
    (
        10,
        "webhook_ordering",
        include_str!("../sql/control/0010_webhook_ordering.sql"),
    ),
    (
        12,
        "storage_upload_pending",
        include_str!("../sql/control/0012_storage_upload_pending.sql"),
    ),
    (
        13,
        "project_engine",
        include_str!("../sql/control/0013_project_engine.sql"),
    ),
    (
        14,
        "binlog_positions",
        include_str!("../sql/control/0014_binlog_positions.sql"),
    ),
    (
        15,
        "webhook_outbox_indexes",
        include_str!("../sql/control/0015_webhook_outbox_indexes.sql"),
    ),
    (
        19,
        "binlog_dump_owner",
        include_str!("../sql/control/0019_binlog_dump_owner.sql"),
    ),
    (
        20,
        "storage_names_bytewise",
        include_str!("../sql/control/0020_storage_names_bytewise.sql"),
    ),
    (
        22,
        "members_chose_admin",
        include_str!("../sql/control/0022_members_chose_admin.sql"),
    ),
    (
        23,
        "webhook_delivery_requeues",
        include_str!("../sql/control/0023_webhook_delivery_requeues.sql"),
    ),
    (
        24,
        "webhook_previous_secret",
        include_str!("../sql/control/0024_webhook_previous_secret.sql"),
    ),
    (
        25,
        "api_key_rotated_at",
        include_str!("../sql/control/0025_api_key_rotated_at.sql"),
    ),
    (
        26,
        "invite_sender_key_hash",
        include_str!("../sql/control/0026_invite_sender_key_hash.sql"),
    ),
    (
        27,
        "project_teardowns",
        include_str!("../sql/control/0027_project_teardowns.sql"),
    ),
];

/// Where the project databases live and how the server reaches the cluster as its admin role.
#[derive(Clone)]
pub struct ClusterTarget {
    pub host: String,
    pub port: u16,
    pub admin_user: String,
    pub admin_password: Option<String>,
    pub control_db: String,
}

impl std::fmt::Debug for ClusterTarget {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "{}@{}:{}/{}",
            self.admin_user, self.host, self.port, self.control_db
        )
    }
}

/// The startup options of the server's admin sessions (see [`ClusterTarget::pg_config`]).
pub const ADMIN_SESSION_OPTIONS: &str = "-c search_path=pg_catalog,pg_temp";

impl ClusterTarget {
    pub fn from_url(url: &str) -> Result<ClusterTarget> {
        let cfg = tokio_postgres::Config::from_str(url)
            .map_err(|e| anyhow!("FLUXBASE_DATABASE_URL is not a valid PostgreSQL URL: {e}"))?;
        let host = match cfg.get_hosts().first() {
            Some(Host::Tcp(h)) => h.clone(),
            Some(Host::Unix(p)) => p.display().to_string(),
            None => "127.0.0.1".to_string(),
        };
        Ok(ClusterTarget {
            host,
            port: cfg.get_ports().first().copied().unwrap_or(5432),
            admin_user: cfg
                .get_user()
                .ok_or_else(|| anyhow!("the database URL names no user"))?
                .to_string(),
            admin_password: cfg
                .get_password()
                .map(|p| String::from_utf8_lossy(p).into_owned()),
            control_db: cfg.get_dbname().unwrap_or("fluxbase").to_string(),
        })
    }

    /// tokio-postgres settings for `database` as the admin role.
    ///
    /// Its sessions resolve names in `pg_catalog` alone (`pg_temp` last, and never for functions
    /// or operators): in a project's database the `public` schema belongs to the tenant, and
    /// with the default `"$user", public` a tenant's `public.unnest(smallint[])` (an exact
    /// match beats `pg_catalog.unnest(anyarray)`) ran as the superuser inside the server's own
    /// catalog queries (red team rt15). Every name outside `pg_catalog` the server's SQL uses
    /// is schema-qualified.
    pub fn pg_config(&self, database: &str) -> tokio_postgres::Config {
        let mut cfg = tokio_postgres::Config::new();
        cfg.host(&self.host)
            .port(self.port)
            .user(&self.admin_user)
            .dbname(database)
            .options(ADMIN_SESSION_OPTIONS)
            .application_name("fluxbase")
            .connect_timeout(std::time::Duration::from_secs(10));
        if let Some(pw) = &self.admin_password {
            cfg.password(pw);
        }
        cfg
    }

    /// One admin connection to `database`, outside the pool (provisioning, migrations).
    pub async fn connect(&self, database: &str) -> Result<tokio_postgres::Client> {
        let (client, conn) = self
            .pg_config(database)
            .connect(NoTls)
            .await
            .with_context(|| format!("connecting to database {database:?} as {self:?}"))?;
        tokio::spawn(async move {
            if let Err(e) = conn.await {
                tracing::debug!(error = %e, "admin connection closed");
            }
        });
        Ok(client)
    }
}

/// Sessions of the server's control pool (requests' control queries, the streams' slot
/// checks and lag).
pub const CONTROL_CONNECTIONS: usize = 8;

/// Opens the control database (creating it when missing), applies migrations, returns a pool.
pub async fn open_control(target: &ClusterTarget, pool_size: usize) -> Result<Pool> {
    if let Err(e) = target.connect(&target.control_db).await {
        let missing = e
            .chain()
            .filter_map(|c| c.downcast_ref::<tokio_postgres::Error>())
            .any(|pe| pe.code() == Some(&tokio_postgres::error::SqlState::INVALID_CATALOG_NAME));
        if !missing {
            return Err(e);
        }
        tracing::info!(db = %target.control_db, "creating the control database");
        let admin = target.connect("postgres").await?;
        admin
            .batch_execute(&format!(
                "CREATE DATABASE {}",
                quote_ident(&target.control_db)
            ))
            .await?;
    }
    let pool = control_pool(target, pool_size)?;
    migrate(&pool).await?;
    Ok(pool)
}

/// A pool of at most `size` connections to the control database (connections open on first
/// use), for a user that must not take the API's (the webhook machinery): call after
/// [`open_control`], which creates and migrates the database.
pub fn control_pool(target: &ClusterTarget, size: usize) -> Result<Pool> {
    let mgr = Manager::from_config(
        target.pg_config(&target.control_db),
        NoTls,
        ManagerConfig {
            recycling_method: RecyclingMethod::Fast,
        },
    );
    // Bounded waits: a request never queues forever behind busy control connections.
    Pool::builder(mgr)
        .max_size(size)
        .wait_timeout(Some(std::time::Duration::from_secs(10)))
        .create_timeout(Some(std::time::Duration::from_secs(10)))
        .recycle_timeout(Some(std::time::Duration::from_secs(5)))
        .runtime(deadpool_postgres::Runtime::Tokio1)
        .build()
        .context("building a control pool")
}

async fn migrate(pool: &Pool) -> Result<()> {
    let mut client = pool.get().await?;
    let tx = client.transaction().await?;
    tx.batch_execute(
        "SELECT pg_advisory_xact_lock(7245001);
         CREATE SCHEMA IF NOT EXISTS fluxbase;
         CREATE TABLE IF NOT EXISTS fluxbase.schema_migrations (
             version integer PRIMARY KEY,
             name text NOT NULL,
             applied_at timestamptz NOT NULL DEFAULT now())",
    )
    .await?;
    let done: Vec<i32> = tx
        .query("SELECT version FROM fluxbase.schema_migrations", &[])
        .await?
        .iter()
        .map(|r| r.get(0))
        .collect();
    for (version, name, sql) in CONTROL_MIGRATIONS {
        if done.contains(version) {
            continue;
        }
        tracing::info!(version, name, "applying control migration");
        tx.batch_execute(sql)
            .await
            .with_context(|| format!("control migration {version} ({name})"))?;
        tx.execute(
            "INSERT INTO fluxbase.schema_migrations (version, name) VALUES ($1, $2)",
            &[version, name],
        )
        .await?;
    }
    if let Some(max) = done.iter().max() {
        if *max > CONTROL_MIGRATIONS.last().map(|m| m.0).unwrap_or(0) {
            bail!("the control database was migrated by a newer Fluxbase (version {max})");
        }
    }
    tx.commit().await?;
    Ok(())
}

/// Quotes an SQL identifier (`"` doubled), for names we generate ourselves.
pub fn quote_ident(name: &str) -> String {
    format!("\"{}\"", name.replace('"', "\"\""))
}

/// Quotes an SQL string literal (`'` doubled; standard_conforming_strings is on).
pub fn quote_literal(value: &str) -> String {
    format!("'{}'", value.replace('\'', "''"))
}
