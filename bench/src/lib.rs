//! Scaffolding shared by the benchmark programs in `src/bin/`.

use std::path::{Path, PathBuf};

use anyhow::{Context, Result};
use fluxbase::embedded::Cluster;

/// The repository's root (the benches read `target/` and write scratch data there).
pub fn repo_root() -> Result<PathBuf> {
    Ok(Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("..")
        .canonicalize()?)
}

/// Starts a throwaway cluster in a fresh `target/<name>` (under `target/`: reachable by the
/// `postgres` user when we are root), with `settings` for this start. Returns it and the dir.
pub async fn throwaway_cluster(
    name: &str,
    settings: Vec<(&'static str, &'static str)>,
) -> Result<(Cluster, PathBuf)> {
    let dir = repo_root()?.join("target").join(name);
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir)?;
    eprintln!("[bench] starting a throwaway cluster in {}", dir.display());
    let pg_root = dir.join("pg");
    let password = fluxbase::secrets::random_base62(24);
    let cluster =
        tokio::task::spawn_blocking(move || Cluster::start(&pg_root, &password, &settings))
            .await?
            .context("starting the cluster")?;
    Ok((cluster, dir))
}

/// `fluxbase init --json` for a fresh instance in `data` (configured by `envs`): its output,
/// with the project and the keys.
pub fn init_instance(
    binary: &Path,
    data: &Path,
    envs: &[(&str, String)],
) -> Result<serde_json::Value> {
    eprintln!(
        "[bench] initialising a fresh instance in {}",
        data.display()
    );
    let out = std::process::Command::new(binary)
        .args(["init", "--json"])
        .envs(envs.iter().map(|(k, v)| (*k, v)))
        .output()?;
    if !out.status.success() {
        anyhow::bail!("init failed: {}", String::from_utf8_lossy(&out.stderr));
    }
    serde_json::from_slice(&out.stdout).context("init --json output")
}

/// The settings every bench cluster uses: durability traded for speed, as in the tests.
pub const FAST: [(&str, &str); 2] = [("fsync", "off"), ("full_page_writes", "off")];
