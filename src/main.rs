//! The `fluxbase` command: `serve` (default), `init`, `project`, `keys`, `user`, `doctor`.
//!
//! One `serve` per data directory (it holds `$FLUXBASE_DATA_DIR/fluxbase.lock`). Every other
//! command works whether or not a server runs on the data directory: with a server it uses
//! that server's embedded cluster and never stops or restarts it; without one it starts the
//! cluster itself, holding the lock while it does (see [`fluxbase::embedded::DataDirLock`]).

use anyhow::{bail, Result};
use clap::{Parser, Subcommand};
use fluxbase::app::{App, Running, SharedApp};
use fluxbase::auth::{AccessChange, Scope};
use fluxbase::config::Config;
use fluxbase::db::ClusterTarget;
use fluxbase::embedded::{CliCluster, DataDirLock};
use fluxbase::keys::{KeySummary, KeysError};
use fluxbase::projects::instance::describe;
use fluxbase::projects::{ApiKeySecrets, ProjectStatus, ProjectView};
use serde::Serialize;

#[derive(Parser)]
#[command(
    name = "fluxbase",
    version,
    about = "Backend-as-a-service in front of PostgreSQL"
)]
struct Cli {
    #[command(subcommand)]
    command: Option<Command>,
}

#[derive(Subcommand)]
enum Command {
    /// Serve the HTTP API (and start the embedded cluster when no database URL is set).
    Serve,
    /// Migrate and, on the first run, create a default user, project and keys (printed once).
    Init {
        #[arg(long)]
        json: bool,
    },
    /// Manage projects.
    Project {
        #[command(subcommand)]
        action: ProjectAction,
    },
    /// Check that the configured PostgreSQL cluster (or the embedded one) can host Fluxbase.
    Doctor,
    /// Manage API keys (recovery: works with no session or key).
    Keys {
        #[command(subcommand)]
        action: KeysAction,
    },
    /// Manage users (recovery: works with no session or key).
    User {
        #[command(subcommand)]
        action: UserAction,
    },
}

#[derive(Subcommand)]
enum KeysAction {
    /// Create an API key for a project; its secret is printed once.
    Create {
        #[arg(long)]
        project: String,
        /// read, readwrite or admin.
        #[arg(long)]
        scope: String,
        #[arg(long)]
        name: Option<String>,
        #[arg(long)]
        json: bool,
    },
}

#[derive(Subcommand)]
enum UserAction {
    /// Set a user's password and revoke all their sessions. The new password is read from the
    /// first line of standard input with --password-stdin; otherwise one is generated and printed.
    ResetPassword {
        email: String,
        #[arg(long)]
        password_stdin: bool,
        #[arg(long)]
        json: bool,
    },
}

#[derive(Subcommand)]
enum ProjectAction {
    /// Create a project owned by the default user; prints its id and keys.
    Create {
        #[arg(long)]
        name: String,
        /// The database engine: postgresql (default) or mysql.
        #[arg(long, default_value = "postgresql")]
        engine: String,
        #[arg(long)]
        json: bool,
    },
    /// Suspend a project: every endpoint that names it answers PROJECT_SUSPENDED.
    Suspend { id: String },
    /// Resume a suspended project.
    Resume { id: String },
    /// Delete a project: its database, roles, keys and replication slot.
    Delete { id: String },
}

/// mimalloc instead of glibc's malloc: the SQL hot path allocates and frees many small buffers
/// per request across the runtime's threads (see docs/decisions.md, "Global allocator").
/// `--features system-allocator` keeps glibc's, which heap profilers (heaptrack) can follow.
#[cfg(not(feature = "system-allocator"))]
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

fn main() -> Result<()> {
    // Plain text on standard error; colours only when that is a terminal (never in a file);
    // one JSON object per line with FLUXBASE_LOG_FORMAT=json.
    let filter = tracing_subscriber::EnvFilter::try_from_env("FLUXBASE_LOG")
        .unwrap_or_else(|_| "info,tokio_postgres=warn".into());
    let log = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr);
    match std::env::var("FLUXBASE_LOG_FORMAT").as_deref() {
        Ok("json") => log.json().init(),
        Ok("text") | Err(_) => log
            .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
            .init(),
        Ok(other) => anyhow::bail!("FLUXBASE_LOG_FORMAT={other:?}: expected text or json"),
    }
    let cli = Cli::parse();
    let config = Config::load()?;
    let runtime = tokio::runtime::Runtime::new()?;
    runtime.block_on(run(cli, config))
}

async fn run(cli: Cli, config: Config) -> Result<()> {
    match cli.command.unwrap_or(Command::Serve) {
        Command::Serve => serve(config).await,
        Command::Init { json } => {
            let (app, lock) = open_cli(config, "init").await?;
            let report = app.init_instance().await;
            close_cli(app, lock).await;
            let report = report?;
            if json {
                println!("{}", serde_json::to_string_pretty(&report)?);
            } else {
                print!("{}", describe(&report));
            }
            Ok(())
        }
        Command::Project { action } => {
            let (app, lock) = open_cli(config, "project").await?;
            let result = project(&app, action).await;
            close_cli(app, lock).await;
            result
        }
        Command::Keys {
            action:
                KeysAction::Create {
                    project,
                    scope,
                    name,
                    json,
                },
        } => {
            let scope = Scope::parse(&scope)
                .ok_or_else(|| anyhow::anyhow!("--scope must be one of read, readwrite, admin"))?;
            let (app, lock) = open_cli(config, "keys").await?;
            let result = app
                .keys
                .create_for_operator(&project, scope, name.as_deref())
                .await;
            close_cli(app, lock).await;
            let key = match result {
                Err(KeysError::NameTooLong) => bail!("--name: at most 100 characters"),
                other => other?,
            };
            if json {
                #[derive(Serialize)]
                #[serde(rename_all = "camelCase")]
                struct Out<'a> {
                    #[serde(flatten)]
                    key: KeySummary,
                    secret: &'a str,
                    project_id: &'a str,
                }
                let out = Out {
                    key: key.summary(),
                    secret: &key.secret,
                    project_id: &project,
                };
                println!("{}", serde_json::to_string_pretty(&out)?);
            } else {
                println!(
                    "created {} key {} for project {project} (shown once, store it now):\n{}",
                    key.scope.as_str(),
                    key.id,
                    key.secret
                );
            }
            Ok(())
        }
        Command::User {
            action:
                UserAction::ResetPassword {
                    email,
                    password_stdin,
                    json,
                },
        } => {
            let (password, generated) = if password_stdin {
                let mut line = String::new();
                std::io::stdin().read_line(&mut line)?;
                let line = line.trim_end_matches(['\r', '\n']).to_string();
                if line.is_empty() {
                    bail!("--password-stdin: standard input had no password");
                }
                (line, false)
            } else {
                (fluxbase::secrets::random_base62(20), true)
            };
            let (app, lock) = open_cli(config, "user").await?;
            let result = app.accounts.reset_password(&email, &password).await;
            if let Ok(reset) = &result {
                // Sessions are read on every request; this also empties every server's access
                // cache, and ends the realtime subscriptions the user's sessions opened.
                app.auth
                    .notify_access_change(&AccessChange::SessionsEnded {
                        user_id: reset.user_id.clone(),
                        session: None,
                    })
                    .await;
            }
            close_cli(app, lock).await;
            let reset = result?;
            if json {
                #[derive(Serialize)]
                struct User<'a> {
                    id: &'a str,
                    email: &'a str,
                }
                #[derive(Serialize)]
                #[serde(rename_all = "camelCase")]
                struct Out<'a> {
                    user: User<'a>,
                    sessions_revoked: u64,
                    #[serde(skip_serializing_if = "Option::is_none")]
                    password: Option<&'a str>,
                }
                let out = Out {
                    user: User {
                        id: &reset.user_id,
                        email: &reset.email,
                    },
                    sessions_revoked: reset.sessions_revoked,
                    password: generated.then_some(password.as_str()),
                };
                println!("{}", serde_json::to_string_pretty(&out)?);
            } else {
                println!(
                    "password of {} reset; {} session(s) revoked",
                    reset.email, reset.sessions_revoked
                );
                if generated {
                    println!("new password (shown once): {password}");
                }
            }
            Ok(())
        }
        Command::Doctor => doctor(config).await,
    }
}

/// Opens the app for a CLI command `role`. With no database URL: uses the running server's
/// embedded cluster if a server holds the data directory, else starts the cluster under the
/// data directory's lock (returned: keep it until [`close_cli`]).
async fn open_cli(mut config: Config, role: &str) -> Result<(SharedApp, Option<DataDirLock>)> {
    if config.database_url.is_some() {
        return Ok((App::open_cli(config).await?, None));
    }
    let data_dir = config.data_dir.clone();
    let role = role.to_string();
    match tokio::task::spawn_blocking(move || DataDirLock::for_cli(&data_dir, &role)).await?? {
        CliCluster::Own(lock) => Ok((App::open_cli(config).await?, Some(lock))),
        CliCluster::Attach { pid, port } => {
            tracing::info!(pid, port, "using the cluster of the running server");
            let secrets = fluxbase::secrets::Secrets::load_or_create(&config.data_dir)?;
            config.database_url =
                Some(fluxbase::embedded::url_at(port, &secrets.pg_password, "fluxbase").into());
            // The server's MariaDB too, never one of our own beside it on the same files.
            if config.mysql_url.is_none() {
                match fluxbase::mysql::embedded::running_port(&config.data_dir.join("mariadb")) {
                    Some(port) => {
                        config.mysql_url =
                            Some(fluxbase::mysql::embedded_admin_url(&secrets, port).into())
                    }
                    None => config.mysql_embedded_off = true,
                }
            }
            Ok((App::open_cli(config).await?, None))
        }
    }
}

/// Closes what [`open_cli`] opened: stops the embedded cluster only if this command started it,
/// then releases the data directory.
async fn close_cli(app: SharedApp, lock: Option<DataDirLock>) {
    let _ = tokio::task::spawn_blocking(move || app.shutdown()).await;
    drop(lock);
}

/// `fluxbase doctor`: the configured cluster, or the embedded one (the running server's, or
/// started for the check and stopped after it).
async fn doctor(config: Config) -> Result<()> {
    let mut findings = postgresql_findings(&config).await?;
    // MySQL projects on the operator's server: its binlog settings and the admin's privileges
    // (the embedded MariaDB is started with what it needs).
    if let Some(url) = &config.mysql_url {
        let secrets = fluxbase::secrets::Secrets::load_or_create(&config.data_dir)?;
        findings.extend(
            fluxbase::mysql::doctor::check(
                url.expose(),
                &fluxbase::mysql::replication_user(&secrets),
            )
            .await?,
        );
        // Stored programs of MySQL projects made before a refusal existed (red team rt4).
        findings.extend(fluxbase::mysql::doctor::refused_programs(url.expose()).await?);
        // The binary log files MySQL projects still need, from the control database (an
        // operator's PostgreSQL; the embedded one is not started again for this).
        if let Some(db) = &config.database_url {
            let target = ClusterTarget::from_url(db.expose())?;
            let control = target.connect(&target.control_db).await?;
            let needed: Vec<(String, String)> = control
                .query(
                    "SELECT b.project_id, b.binlog_file FROM fluxbase.binlog_positions b
                     JOIN fluxbase.projects p ON p.id = b.project_id WHERE p.engine = 'mysql'",
                    &[],
                )
                .await
                .map(|rows| rows.iter().map(|r| (r.get(0), r.get(1))).collect())
                .unwrap_or_default();
            let (more, info) = fluxbase::mysql::doctor::needed_logs(url.expose(), &needed).await?;
            if let Some(info) = info {
                println!("{info}");
            }
            findings.extend(more);
        }
    }
    if findings.is_empty() {
        if config.nats_url.is_some() {
            println!("ok: the cluster and its NATS server are ready for Fluxbase (cluster mode)");
        } else {
            println!("ok: the cluster is ready for Fluxbase");
        }
        return Ok(());
    }
    for f in &findings {
        println!("problem: {}\n    fix: {}", f.problem, f.fix);
    }
    bail!("{} problem(s) found", findings.len())
}

/// The PostgreSQL side of `fluxbase doctor`.
async fn postgresql_findings(config: &Config) -> Result<Vec<fluxbase::doctor::Finding>> {
    Ok(match &config.database_url {
        Some(url) => {
            let target = ClusterTarget::from_url(url.expose())?;
            let mut findings = fluxbase::doctor::check(&target).await?;
            // Cluster mode (which needs database_url): the NATS server too.
            if config.nats_url.is_some() {
                findings.extend(fluxbase::doctor::check_nats(config, &target).await?);
            }
            findings
        }
        None => {
            let data_dir = config.data_dir.clone();
            let secrets = fluxbase::secrets::Secrets::load_or_create(&config.data_dir)?;
            match tokio::task::spawn_blocking(move || DataDirLock::for_cli(&data_dir, "doctor"))
                .await??
            {
                CliCluster::Attach { pid, port } => {
                    println!(
                        "checking the embedded cluster of the running server (pid {pid}, port {port})"
                    );
                    let url = fluxbase::embedded::url_at(port, &secrets.pg_password, "fluxbase");
                    fluxbase::doctor::check(&ClusterTarget::from_url(&url)?).await?
                }
                CliCluster::Own(lock) => {
                    let pg_dir = config.data_dir.join("pg");
                    println!(
                        "checking the embedded cluster in {} (started for this check)",
                        pg_dir.display()
                    );
                    let password = secrets.pg_password.clone();
                    let cluster = tokio::task::spawn_blocking(move || {
                        fluxbase::embedded::Cluster::start(&pg_dir, &password, &[])
                    })
                    .await??;
                    let target = ClusterTarget::from_url(&cluster.url("fluxbase"));
                    let findings = match target {
                        Ok(t) => fluxbase::doctor::check_cluster(&t, false).await,
                        Err(e) => Err(e),
                    };
                    tokio::task::spawn_blocking(move || {
                        if let Err(e) = cluster.stop() {
                            tracing::warn!(error = %e, "stopping the embedded cluster");
                        }
                        drop(lock);
                    })
                    .await?;
                    findings?
                }
            }
        }
    })
}

async fn project(app: &App, action: ProjectAction) -> Result<()> {
    match action {
        ProjectAction::Create { name, engine, json } => {
            let engine = fluxbase::projects::Engine::parse(&engine).ok_or_else(|| {
                anyhow::anyhow!("--engine: expected postgresql or mysql, got {engine:?}")
            })?;
            let user = app.projects.default_user().await?;
            let (project, keys) = app.create_project(&user, &name, engine).await?;
            // A running server starts the new project's change stream when it hears this.
            app.auth
                .notify_access_change(&AccessChange::Project(project.id.clone()))
                .await;
            if json {
                #[derive(Serialize)]
                #[serde(rename_all = "camelCase")]
                struct Out {
                    project: ProjectView,
                    api_keys: ApiKeySecrets,
                }
                let out = Out {
                    project: ProjectView::from(&project),
                    api_keys: ApiKeySecrets::from(&keys),
                };
                println!("{}", serde_json::to_string_pretty(&out)?);
            } else {
                println!(
                    "created project {} ({}, {})",
                    project.id,
                    project.name,
                    project.engine.as_str()
                );
                for k in keys.all() {
                    println!("  {:<9} {}", k.scope.as_str(), k.secret);
                }
            }
            Ok(())
        }
        ProjectAction::Suspend { id } => {
            app.set_project_status(&id, ProjectStatus::Suspended)
                .await?;
            println!("project {id} suspended");
            Ok(())
        }
        ProjectAction::Resume { id } => {
            app.set_project_status(&id, ProjectStatus::Active).await?;
            println!("project {id} resumed");
            Ok(())
        }
        ProjectAction::Delete { id } => {
            app.delete_project(&id).await?;
            println!("project {id} deleted");
            Ok(())
        }
    }
}

async fn serve(config: Config) -> Result<()> {
    // Held until the process ends: a second `serve` on this data directory refuses to start.
    let data_dir = config.data_dir.clone();
    let mut lock = tokio::task::spawn_blocking(move || DataDirLock::for_serve(&data_dir)).await??;
    let app = App::open(config, &[]).await?;
    lock.record_cluster(app.embedded.as_ref().map(|c| c.port))?;
    let mut report = app.init_instance().await?;
    let addr_file = app.config.addr_file.clone();
    let derived_url = app.config.public_url.is_none();
    let running = Running::start(app).await?;
    if derived_url {
        // The address bound, not the one asked for: `listen` on port 0 printed port 0 (red
        // team rt8 L4).
        report.base_url = format!("http://{}", running.addr);
        report.ws_url = format!("ws://{}", running.addr);
    }
    eprint!("{}", describe(&report));
    // Always printed (whatever the log level): with `listen` on port 0 this is where the port
    // is found, as well as in `addr_file`.
    eprintln!("Listening on {}", running.addr);
    if let Some(path) = addr_file {
        write_addr_file(&path, running.addr)?;
    }
    shutdown_signal().await;
    tracing::info!("shutting down");
    running.stop().await;
    drop(lock);
    Ok(())
}

/// Writes `addr` and a newline to `path` atomically: a temporary file beside it, renamed over it.
fn write_addr_file(path: &std::path::Path, addr: std::net::SocketAddr) -> Result<()> {
    use anyhow::Context;
    let mut tmp = path.as_os_str().to_owned();
    tmp.push(".tmp");
    let tmp = std::path::PathBuf::from(tmp);
    std::fs::write(&tmp, format!("{addr}\n"))
        .with_context(|| format!("writing {}", tmp.display()))?;
    std::fs::rename(&tmp, path).with_context(|| format!("writing {}", path.display()))?;
    Ok(())
}

async fn shutdown_signal() {
    let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
        .expect("installing the SIGTERM handler");
    tokio::select! {
        _ = tokio::signal::ctrl_c() => {}
        _ = term.recv() => {}
    }
}
