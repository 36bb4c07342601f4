//! The `fluxbase` command: `serve` (default), `init`, `project`, `doctor`.

use anyhow::{bail, Result};
use clap::{Parser, Subcommand};
use fluxbase::app::{App, Running};
use fluxbase::config::Config;
use fluxbase::db::ClusterTarget;
use fluxbase::instance::describe;

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
    /// Check that the configured PostgreSQL cluster can host Fluxbase.
    Doctor,
}

#[derive(Subcommand)]
enum ProjectAction {
    /// Create a project owned by the default user; prints its id and keys.
    Create {
        #[arg(long)]
        name: String,
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

fn main() -> Result<()> {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_env("FLUXBASE_LOG")
                .unwrap_or_else(|_| "info,tokio_postgres=warn".into()),
        )
        .with_writer(std::io::stderr)
        .init();
    let cli = Cli::parse();
    let config = Config::load()?;
    let runtime = tokio::runtime::Runtime::new()?;
    runtime.block_on(run(cli, config))
}

async fn run(cli: Cli, config: Config) -> Result<()> {
    match cli.command.unwrap_or(Command::Serve) {
        Command::Serve => serve(config).await,
        Command::Init { json } => {
            let app = App::open(config, &[]).await?;
            let report = app.init_instance().await;
            app.shutdown();
            let report = report?;
            if json {
                println!("{}", serde_json::to_string_pretty(&report.json)?);
            } else {
                print!("{}", describe(&report));
            }
            Ok(())
        }
        Command::Project { action } => {
            let app = App::open(config, &[]).await?;
            let result = project(&app, action).await;
            app.shutdown();
            result
        }
        Command::Doctor => {
            let Some(url) = &config.database_url else {
                println!("No FLUXBASE_DATABASE_URL: the embedded cluster is configured by Fluxbase itself.");
                return Ok(());
            };
            let findings = fluxbase::doctor::check(&ClusterTarget::from_url(url)?).await?;
            if findings.is_empty() {
                println!("ok: the cluster is ready for Fluxbase");
                return Ok(());
            }
            for f in &findings {
                println!("problem: {}\n    fix: {}", f.problem, f.fix);
            }
            bail!("{} problem(s) found", findings.len())
        }
    }
}

async fn project(app: &App, action: ProjectAction) -> Result<()> {
    match action {
        ProjectAction::Create { name, json } => {
            let user = app.default_user().await?;
            let (project, keys) = app
                .create_project(&user, &name)
                .await
                .map_err(|e| anyhow::anyhow!("{e}"))?;
            let mut api_keys = serde_json::Map::new();
            for k in &keys {
                api_keys.insert(k.scope.as_str().into(), serde_json::json!(k.secret));
            }
            let out = serde_json::json!({ "project": fluxbase::projects::project_json(&project), "apiKeys": api_keys });
            if json {
                println!("{}", serde_json::to_string_pretty(&out)?);
            } else {
                println!("created project {} ({})", project.id, project.name);
                for k in &keys {
                    println!("  {:<9} {}", k.scope.as_str(), k.secret);
                }
            }
            Ok(())
        }
        ProjectAction::Suspend { id } => {
            app.set_project_status(&id, "suspended").await?;
            println!("project {id} suspended");
            Ok(())
        }
        ProjectAction::Resume { id } => {
            app.set_project_status(&id, "active").await?;
            println!("project {id} resumed");
            Ok(())
        }
        ProjectAction::Delete { id } => {
            app.delete_project(&id)
                .await
                .map_err(|e| anyhow::anyhow!("{e}"))?;
            println!("project {id} deleted");
            Ok(())
        }
    }
}

async fn serve(config: Config) -> Result<()> {
    let app = App::open(config, &[]).await?;
    let report = app.init_instance().await?;
    let running = Running::start(app).await?;
    eprint!("{}", describe(&report));
    shutdown_signal().await;
    tracing::info!("shutting down");
    running.stop().await;
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
