//! Which node streams which project: a session-level advisory lock per project, held on one
//! control-database connection per node (`application_name = fluxbase-node:<node id>`).
//!
//! Every tick (500 ms, or at once when another node asks through [`super::REBALANCE_SUBJECT`])
//! the node reads the projects (whatever their status: a suspended project is streamed, as on a
//! single server), the nodes connected and who holds which lock, then:
//! * keeps at most its fair share, `ceil(projects / nodes)`: a node that joins gets projects as
//!   the others hand their extra ones over;
//! * takes unheld projects (`pg_try_advisory_lock`) up to its share: after a leader died (its
//!   connection, and with it its locks, is gone) or stopped (it released them);
//! * when its own connection fails it can no longer prove it holds anything: it stops every
//!   stream it leads at once (fenced), then reconnects and starts over.
//!
//! The lock key is the two-`int4` form (`pg_locks.objsubid = 2`), the project id's 64 bits
//! split in two, so it never meets the server's other advisory locks (single `bigint` keys).

use std::collections::{HashMap, HashSet};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use futures_util::future::BoxFuture;
use futures_util::StreamExt;

use crate::db::ClusterTarget;
use crate::projects::Engine;

/// How often a node looks at leadership.
pub const TICK: Duration = Duration::from_millis(500);

/// What the wiring does when this node gains or loses a project.
pub trait Led: Send + Sync + 'static {
    /// This node now leads the project: start its stream (publisher first).
    fn acquired(&self, project: LedProject) -> BoxFuture<'_, ()>;
    /// This node no longer leads it: stop publishing before the lock is released.
    fn released(&self, project_id: String) -> BoxFuture<'_, ()>;
    /// The projects the cluster should lead, of either engine and whatever their status (a
    /// suspended one too); every node also keeps a room for each.
    fn projects(&self) -> BoxFuture<'_, anyhow::Result<Vec<LedProject>>>;
}

/// A project whose change stream some node leads: PostgreSQL (its replication slot) or MySQL
/// (its binlog position in the control database). Past the stream (the bus, the publisher, the
/// outbox, the rooms) nothing depends on the engine.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct LedProject {
    pub id: String,
    pub db_name: String,
    pub engine: Engine,
}

/// The lock key of a project: its id's 64 bits as two `int4`s.
pub fn lock_key(project_id: &str) -> (i32, i32) {
    let bits = u64::from_str_radix(project_id, 16).unwrap_or_else(|_| {
        // Not a generated id: FNV-1a of it.
        project_id.bytes().fold(0xcbf2_9ce4_8422_2325u64, |h, b| {
            (h ^ b as u64).wrapping_mul(0x0000_0100_0000_01b3)
        })
    });
    ((bits >> 32) as u32 as i32, bits as u32 as i32)
}

const APP_PREFIX: &str = "fluxbase-node:";

/// What this node knows of the cluster, for `/api/cdc/status`, `/ready` and `/metrics`.
#[derive(Default, Clone, Debug)]
pub struct View {
    /// Nodes connected to the control database (their names), this one included.
    pub nodes: Vec<String>,
    /// Project → the node leading it, as of the last tick.
    pub leaders: HashMap<String, String>,
    /// False while this node's lock connection is down.
    pub connected: bool,
}

pub struct Leadership {
    node_id: String,
    target: ClusterTarget,
    /// Projects this node leads.
    led: Mutex<HashSet<String>>,
    view: Mutex<View>,
    /// How many nodes the last tick saw (at least 1): what per-node shares of cluster-wide
    /// limits divide by ([`super::per_node`]), read without cloning the view.
    node_count: std::sync::atomic::AtomicUsize,
    /// Set by a graceful stop: release everything and take nothing more.
    stopping: std::sync::atomic::AtomicBool,
    wake: tokio::sync::Notify,
    task: Mutex<Option<tokio::task::JoinHandle<()>>>,
}

impl Leadership {
    pub fn new(node_id: String, target: ClusterTarget) -> Arc<Leadership> {
        Arc::new(Leadership {
            node_id,
            target,
            led: Default::default(),
            view: Default::default(),
            node_count: std::sync::atomic::AtomicUsize::new(1),
            stopping: Default::default(),
            wake: tokio::sync::Notify::new(),
            task: Mutex::new(None),
        })
    }

    pub fn view(&self) -> View {
        self.view.lock().expect("poisoned").clone()
    }

    /// How many nodes are connected to the control database, as of the last tick (at least 1).
    pub fn node_count(&self) -> usize {
        self.node_count
            .load(std::sync::atomic::Ordering::Relaxed)
            .max(1)
    }

    /// The node leading a project, as of the last tick.
    pub fn leader(&self, project_id: &str) -> Option<String> {
        self.view
            .lock()
            .expect("poisoned")
            .leaders
            .get(project_id)
            .cloned()
    }

    pub fn leads(&self, project_id: &str) -> bool {
        self.led.lock().expect("poisoned").contains(project_id)
    }

    /// Looks again now (a project was created, another node asked).
    pub fn poke(&self) {
        self.wake.notify_one();
    }

    /// Runs the loop until [`Leadership::stop`].
    pub fn start(self: &Arc<Self>, led: Arc<dyn Led>, cluster: Arc<super::Cluster>) {
        let this = self.clone();
        let task = tokio::spawn(async move {
            // Other nodes' requests to look now.
            let wake = this.clone();
            let nats = cluster.nats.clone();
            tokio::spawn(async move {
                loop {
                    match nats.subscribe(super::REBALANCE_SUBJECT).await {
                        Ok(mut sub) => {
                            while sub.next().await.is_some() {
                                wake.poke();
                            }
                        }
                        Err(e) => tracing::debug!(error = %e, "subscribing to rebalance requests"),
                    }
                    if wake.stopping.load(std::sync::atomic::Ordering::Acquire) {
                        return;
                    }
                    tokio::time::sleep(Duration::from_secs(1)).await;
                }
            });
            this.run(led, cluster).await
        });
        *self.task.lock().expect("poisoned") = Some(task);
    }

    async fn run(self: Arc<Self>, led: Arc<dyn Led>, cluster: Arc<super::Cluster>) {
        let mut backoff = Duration::from_millis(200);
        loop {
            if self.stopping.load(std::sync::atomic::Ordering::Acquire) {
                return;
            }
            let mut pg = self.target.pg_config(&self.target.control_db);
            pg.application_name(format!("{APP_PREFIX}{}", self.node_id));
            pg.connect_timeout(Duration::from_secs(5));
            // Dead peers are noticed by the server within seconds, so that a node cut off
            // from the network loses its locks.
            pg.keepalives(true)
                .keepalives_idle(Duration::from_secs(2))
                .keepalives_interval(Duration::from_secs(1))
                .keepalives_retries(3);
            let client = match pg.connect(tokio_postgres::NoTls).await {
                Ok((client, conn)) => {
                    tokio::spawn(async move {
                        let _ = conn.await;
                    });
                    client
                }
                Err(e) => {
                    tracing::warn!(error = %e, "leadership: connecting to the control database");
                    tokio::time::sleep(backoff).await;
                    backoff = (backoff * 2).min(Duration::from_secs(5));
                    continue;
                }
            };
            let _ = client
                .batch_execute(
                    "SET tcp_keepalives_idle = 2; SET tcp_keepalives_interval = 1;
                     SET tcp_keepalives_count = 3; SET statement_timeout = '5s'",
                )
                .await;
            backoff = Duration::from_millis(200);
            self.view.lock().expect("poisoned").connected = true;
            let mut asked_rebalance = false;
            loop {
                if self.stopping.load(std::sync::atomic::Ordering::Acquire) {
                    self.release_all(&led, Some(&client)).await;
                    cluster.rebalance().await;
                    return;
                }
                if let Err(e) = self.tick(&client, &led, &cluster).await {
                    tracing::error!(error = %e, "leadership: lost the lock connection; stopping every stream this node leads");
                    break;
                }
                if !asked_rebalance {
                    // Joined: the others hand over their extra projects now, not in a tick.
                    cluster.rebalance().await;
                    asked_rebalance = true;
                }
                let _ = tokio::time::timeout(TICK, self.wake.notified()).await;
            }
            // Fenced: without the connection the locks are (or soon will be) someone else's.
            self.view.lock().expect("poisoned").connected = false;
            self.release_all(&led, None).await;
            tokio::time::sleep(backoff).await;
        }
    }

    async fn tick(
        &self,
        client: &tokio_postgres::Client,
        led: &Arc<dyn Led>,
        cluster: &super::Cluster,
    ) -> anyhow::Result<()> {
        // The connection is alive (or this fails): what this node holds is still its own.
        let nodes: Vec<String> = client
            .query(
                "SELECT DISTINCT substr(application_name, length($1) + 1) FROM pg_stat_activity
                 WHERE datname = current_database() AND starts_with(application_name, $1)
                 ORDER BY 1",
                &[&APP_PREFIX],
            )
            .await?
            .iter()
            .map(|r| r.get(0))
            .collect();
        let held: Vec<(i64, i64, String)> = client
            .query(
                "SELECT l.classid::int8, l.objid::int8, substr(a.application_name, length($1) + 1)
                 FROM pg_locks l JOIN pg_stat_activity a ON a.pid = l.pid
                 WHERE l.locktype = 'advisory' AND l.objsubid = 2 AND l.granted
                   AND l.database = (SELECT oid FROM pg_database WHERE datname = current_database())
                   AND starts_with(a.application_name, $1)",
                &[&APP_PREFIX],
            )
            .await?
            .iter()
            .map(|r| (r.get(0), r.get(1), r.get(2)))
            .collect();
        let projects = match led.projects().await {
            Ok(p) => p,
            Err(e) => {
                tracing::warn!(error = %e, "leadership: listing projects");
                return Ok(());
            }
        };
        let holder = |id: &str| {
            let (a, b) = lock_key(id);
            let (a, b) = (a as u32 as i64, b as u32 as i64);
            held.iter()
                .find(|(x, y, _)| *x == a && *y == b)
                .map(|(_, _, n)| n.clone())
        };
        let mut leaders = HashMap::new();
        for p in &projects {
            if let Some(n) = holder(&p.id) {
                leaders.insert(p.id.clone(), n);
            }
        }
        let listed: HashSet<&str> = projects.iter().map(|p| p.id.as_str()).collect();
        // Projects this node leads that are gone: released.
        let gone: Vec<String> = self
            .led
            .lock()
            .expect("poisoned")
            .iter()
            .filter(|p| !listed.contains(p.as_str()))
            .cloned()
            .collect();
        for p in gone {
            self.release(client, led, &p).await?;
        }
        let node_count = nodes.len().max(1);
        let share = projects.len().div_ceil(node_count);
        let mine: Vec<String> = self.led.lock().expect("poisoned").iter().cloned().collect();
        if mine.len() > share {
            // Hand the extra ones over: the others take them on their next tick.
            let mut extra = mine.clone();
            extra.sort();
            for p in extra.into_iter().skip(share) {
                self.release(client, led, &p).await?;
                leaders.remove(&p);
            }
            cluster.rebalance().await;
        } else {
            let mut room = share - mine.len();
            for project in &projects {
                let id = &project.id;
                if room == 0 {
                    break;
                }
                if leaders.contains_key(id) {
                    continue;
                }
                let (a, b) = lock_key(id);
                let got: bool = client
                    .query_one("SELECT pg_try_advisory_lock($1, $2)", &[&a, &b])
                    .await?
                    .get(0);
                if got {
                    tracing::info!(project_id = %id, node = %self.node_id, engine = project.engine.as_str(), "leading the project's change stream");
                    self.led.lock().expect("poisoned").insert(id.clone());
                    leaders.insert(id.clone(), self.node_id.clone());
                    led.acquired(project.clone()).await;
                    room -= 1;
                }
            }
        }
        self.node_count
            .store(nodes.len().max(1), std::sync::atomic::Ordering::Relaxed);
        let mut view = self.view.lock().expect("poisoned");
        view.nodes = nodes;
        view.leaders = leaders;
        view.connected = true;
        Ok(())
    }

    async fn release(
        &self,
        client: &tokio_postgres::Client,
        led: &Arc<dyn Led>,
        project_id: &str,
    ) -> anyhow::Result<()> {
        led.released(project_id.to_string()).await;
        self.led.lock().expect("poisoned").remove(project_id);
        let (a, b) = lock_key(project_id);
        client
            .query_one("SELECT pg_advisory_unlock($1, $2)", &[&a, &b])
            .await?;
        tracing::info!(project_id, node = %self.node_id, "handed the project's change stream over");
        Ok(())
    }

    /// Stops every stream this node leads; with the connection, also releases the locks.
    async fn release_all(&self, led: &Arc<dyn Led>, client: Option<&tokio_postgres::Client>) {
        let mine: Vec<String> = self.led.lock().expect("poisoned").drain().collect();
        for p in &mine {
            led.released(p.clone()).await;
        }
        if let Some(c) = client {
            let _ = c.batch_execute("SELECT pg_advisory_unlock_all()").await;
        }
        let mut view = self.view.lock().expect("poisoned");
        view.leaders.retain(|_, n| n != &self.node_id);
    }

    /// A graceful stop: every project this node leads is handed over at once.
    pub async fn stop(&self) {
        self.stopping
            .store(true, std::sync::atomic::Ordering::Release);
        self.wake.notify_one();
        let task = self.task.lock().expect("poisoned").take();
        if let Some(task) = task {
            if tokio::time::timeout(Duration::from_secs(10), task)
                .await
                .is_err()
            {
                tracing::warn!("leadership: the hand-over took over 10 s");
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_project_id_is_its_lock_key() {
        assert_eq!(lock_key("00000001ffffffff"), (1, -1));
        assert_eq!(lock_key("10b7167031471bd0"), (0x10b71670, 0x31471bd0));
        // Distinct ids, distinct keys; a name that is not hex still gets one.
        assert_ne!(lock_key("aaaaaaaaaaaaaaaa"), lock_key("aaaaaaaaaaaaaaab"));
        assert_eq!(lock_key("not hex"), lock_key("not hex"));
    }
}
