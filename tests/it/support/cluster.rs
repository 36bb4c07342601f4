//! PostgreSQL for the suite: one throwaway cluster per test binary (started with the server's own
//! embedded-cluster code, `wal_level=logical`, fsync off), scratch directories, and a cluster of a
//! test's own for what would hurt the others on the shared one.
//!
//! The shared cluster lives in a static (never dropped): the embedded cluster's watchdog stops it
//! when this process ends, however it ends, and the next run sweeps its directory.

use std::path::PathBuf;

use fluxbase::embedded::Cluster;
use tokio::sync::OnceCell;

pub struct Pg {
    pub host: String,
    pub port: u16,
    pub superuser: String,
    pub password: String,
    pub cluster: Cluster,
}

static PG: OnceCell<Pg> = OnceCell::const_new();

/// A unique lowercase name with `prefix`.
pub fn unique(prefix: &str) -> String {
    format!("{prefix}_{}", fluxbase::secrets::random_hex::<6>())
}

/// Scratch directories live under the target dir (reachable by the `postgres` user when root).
pub fn scratch_dir(name: &str) -> PathBuf {
    let dir = PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join(name);
    std::fs::create_dir_all(&dir).expect("creating a scratch dir");
    dir
}

/// Removes scratch dirs of earlier runs whose process is gone.
fn sweep_stale() {
    let base = PathBuf::from(env!("CARGO_TARGET_TMPDIR"));
    for entry in std::fs::read_dir(&base).into_iter().flatten().flatten() {
        let name = entry.file_name().to_string_lossy().into_owned();
        if let Some(pid) = name.strip_prefix("it-").and_then(|r| r.split('-').next()) {
            if pid != std::process::id().to_string()
                && !PathBuf::from(format!("/proc/{pid}")).exists()
            {
                let _ = std::fs::remove_dir_all(entry.path());
            }
        }
    }
}

/// The cluster shared by every test of this binary.
pub async fn pg() -> &'static Pg {
    PG.get_or_init(|| async {
        sweep_stale();
        let root = scratch_dir(&format!("it-{}-pg", std::process::id()));
        let password = fluxbase::secrets::random_base62(24);
        let cluster = tokio::task::spawn_blocking(move || {
            Cluster::start(
                &root,
                &password,
                &[
                    ("fsync", "off"),
                    ("synchronous_commit", "off"),
                    ("full_page_writes", "off"),
                    // Every project of every test keeps its slot until the run ends (servers
                    // are dropped, not their projects): a few hundred tests, the dashboard's
                    // specs with several projects each, and their connections. A project is
                    // created only with a walsender for each slot of the cluster's projects
                    // (`App::room_for_project`), so as many walsenders as slots.
                    ("max_replication_slots", "1024"),
                    ("max_wal_senders", "1024"),
                    ("max_connections", "600"),
                ],
            )
        })
        .await
        .unwrap()
        .expect("starting the test cluster");
        start_janitor(cluster.url("postgres"));
        Pg {
            host: "127.0.0.1".into(),
            port: cluster.port,
            superuser: fluxbase::embedded::SUPERUSER.into(),
            password: cluster.password.clone(),
            cluster,
        }
    })
    .await
}

/// How long a project or control database of the shared cluster must have had no connection and
/// no active replication slot before the janitor drops it.
const LEFT_FOR: std::time::Duration = std::time::Duration::from_secs(180);

/// Drops what ended tests left on the shared cluster: a project database (`fx_…`) or control
/// database (`ctl_…`) with no connection and no active slot for [`LEFT_FOR`], with its slots.
/// Servers are dropped, not their projects, so a run left ~900 databases (7.3 GB) and its ended
/// tests' slots kept every WAL segment since the oldest (4.7 GB): 15 GB under target/tmp on a
/// disk CI shares (measured 2026-12-07). A running test's databases always have connections (its
/// server's pools, its stream's walsender); one that is restarted after a pause comes back
/// within seconds, far inside the three minutes.
fn start_janitor(url: String) {
    std::thread::Builder::new()
        .name("test-cluster-janitor".into())
        .spawn(move || {
            let rt = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .expect("the janitor's runtime");
            rt.block_on(async move {
                let mut idle_since: std::collections::HashMap<String, std::time::Instant> =
                    Default::default();
                loop {
                    tokio::time::sleep(std::time::Duration::from_secs(30)).await;
                    let Ok((client, conn)) =
                        tokio_postgres::connect(&url, tokio_postgres::NoTls).await
                    else {
                        continue;
                    };
                    tokio::spawn(conn);
                    let Ok(rows) = client
                        .query(
                            "SELECT d.datname::text FROM pg_database d
                             WHERE (d.datname LIKE 'fx\\_%' OR d.datname LIKE 'ctl\\_%')
                               AND NOT EXISTS (SELECT 1 FROM pg_stat_activity a WHERE a.datid = d.oid)
                               AND NOT EXISTS (SELECT 1 FROM pg_replication_slots s
                                               WHERE s.database = d.datname AND s.active)",
                            &[],
                        )
                        .await
                    else {
                        continue;
                    };
                    let idle: std::collections::HashSet<String> =
                        rows.iter().map(|r| r.get(0)).collect();
                    idle_since.retain(|db, _| idle.contains(db));
                    let now = std::time::Instant::now();
                    for db in idle {
                        let since = *idle_since.entry(db.clone()).or_insert(now);
                        if now.duration_since(since) < LEFT_FOR {
                            continue;
                        }
                        let _ = client
                            .execute(
                                "SELECT pg_drop_replication_slot(slot_name) FROM pg_replication_slots
                                 WHERE database = $1 AND NOT active",
                                &[&db],
                            )
                            .await;
                        let quoted = db.replace('"', "\"\"");
                        // Not forced: one that gained a connection since is kept.
                        let _ = client
                            .batch_execute(&format!("DROP DATABASE IF EXISTS \"{quoted}\""))
                            .await;
                        idle_since.remove(&db);
                    }
                }
            });
        })
        .expect("starting the test cluster's janitor");
}

/// A superuser tokio-postgres client for `url`, its connection driven in a task of its own.
async fn superuser_client(url: &str) -> tokio_postgres::Client {
    let (client, conn) = tokio_postgres::connect(url, tokio_postgres::NoTls)
        .await
        .expect("connecting as superuser");
    tokio::spawn(conn);
    client
}

impl Pg {
    pub fn url(&self, database: &str) -> String {
        self.cluster.url(database)
    }

    /// A superuser tokio-postgres client on `database`.
    pub async fn client(&self, database: &str) -> tokio_postgres::Client {
        superuser_client(&self.url(database)).await
    }

    /// A fresh, empty database.
    pub async fn create_database(&self) -> String {
        let name = unique("t");
        self.client("postgres")
            .await
            .batch_execute(&format!("CREATE DATABASE {name}"))
            .await
            .expect("creating a test database");
        name
    }
}

/// The confirmed position of the project's replication slot, as a number.
pub async fn slot_confirmed(project: &str) -> u64 {
    let row = pg()
        .await
        .client("postgres")
        .await
        .query_one(
            "SELECT (confirmed_flush_lsn - '0/0'::pg_lsn)::int8 FROM pg_replication_slots WHERE slot_name = $1",
            &[&format!("fluxbase_{project}")],
        )
        .await
        .unwrap();
    row.get::<_, i64>(0) as u64
}

/// A PostgreSQL cluster of its own (for a test that exhausts a cluster-wide resource such as
/// `max_connections`, which would hurt the other tests on the shared one, or that restarts
/// PostgreSQL under a running server); stopped on drop.
pub struct DedicatedCluster {
    pub cluster: Cluster,
}

impl DedicatedCluster {
    /// With fsync and synchronous commit off, and `settings`.
    pub async fn start(settings: &[(&str, &str)]) -> DedicatedCluster {
        let mut all = vec![("fsync", "off"), ("synchronous_commit", "off")];
        all.extend_from_slice(settings);
        Self::start_exactly(&all).await
    }

    /// With exactly `settings` added to the embedded cluster's own.
    pub async fn start_exactly(settings: &[(&str, &str)]) -> DedicatedCluster {
        let root = scratch_dir(&format!("it-{}-{}", std::process::id(), unique("pg")));
        let password = fluxbase::secrets::random_base62(24);
        let settings: Vec<(String, String)> = settings
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect();
        let cluster = tokio::task::spawn_blocking(move || {
            let settings: Vec<(&str, &str)> = settings
                .iter()
                .map(|(k, v)| (k.as_str(), v.as_str()))
                .collect();
            Cluster::start(&root, &password, &settings)
        })
        .await
        .unwrap()
        .expect("starting a dedicated cluster");
        DedicatedCluster { cluster }
    }

    /// A superuser client on `database`.
    pub async fn client(&self, database: &str) -> tokio_postgres::Client {
        superuser_client(&self.cluster.url(database)).await
    }
}

impl Drop for DedicatedCluster {
    fn drop(&mut self) {
        let _ = self.cluster.stop();
    }
}
