//! Cluster mode's wiring (crate::cluster): what this node does when it gains or loses a
//! project's leadership, and realtime's transport over NATS.
//!
//! ```text
//!  acquired  end a previous leader's walsender ─► publisher subscribes (durable) ─► outbox writer
//!            subscribes (durable) ─► change stream starts (rewinds to the slot: nothing missed)
//!  released  change stream stops ─► publisher and outbox writer stop ─► lock released
//! ```

use std::collections::HashMap;
use std::sync::{Arc, Mutex, Weak};

use futures_util::future::BoxFuture;

use super::App;
use crate::cluster::feed::FeedHealth;
use crate::cluster::leadership::{Leadership, Led, LedProject};
use crate::cluster::publisher::{self, BroadcastAsk, BroadcastReply, PublisherStatus};
use crate::cluster::Cluster;
use crate::projects::Engine;

/// A running publisher: its task and what it reports.
struct Publishing {
    task: tokio::task::JoinHandle<()>,
    status: Arc<Mutex<PublisherStatus>>,
}

/// This node's part of the cluster.
pub struct ClusterMode {
    pub cluster: Arc<Cluster>,
    pub leadership: Arc<Leadership>,
    pub feeds: Arc<FeedHealth>,
    publishers: Mutex<HashMap<String, Publishing>>,
    /// The request limits shared with the other nodes (crate::cluster::limits), by name.
    limits: Mutex<Vec<(&'static str, Arc<crate::auth::ratelimit::Sharing>)>>,
}

impl ClusterMode {
    pub fn new(cluster: Arc<Cluster>, target: crate::db::ClusterTarget) -> ClusterMode {
        ClusterMode {
            leadership: Leadership::new(cluster.node_id.clone(), target),
            cluster,
            feeds: Default::default(),
            publishers: Default::default(),
            limits: Default::default(),
        }
    }

    pub fn node_id(&self) -> &str {
        &self.cluster.node_id
    }

    /// The publisher of a project this node leads, as it reports itself.
    pub fn publisher(&self, project_id: &str) -> Option<PublisherStatus> {
        self.publishers
            .lock()
            .expect("poisoned")
            .get(project_id)
            .map(|p| p.status.lock().expect("poisoned").clone())
    }

    /// Every publisher of this node (for `/metrics`).
    pub fn publishers(&self) -> Vec<(String, PublisherStatus)> {
        self.publishers
            .lock()
            .expect("poisoned")
            .iter()
            .map(|(k, p)| (k.clone(), p.status.lock().expect("poisoned").clone()))
            .collect()
    }
}

/// `/api/cdc/status`'s `cluster` object: who leads the project, seen from this node.
#[derive(serde::Serialize, utoipa::ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct ProjectLeadership {
    /// This node.
    pub node: String,
    /// The node streaming the project's slot now (`null`: none, e.g. during a failover).
    pub leader: Option<String>,
    /// The nodes connected to the control database.
    pub nodes: Vec<String>,
    /// False while this node cannot reach NATS.
    pub nats: bool,
    /// Why this node's room is not receiving the project's events, if it is not.
    pub feed_error: Option<String>,
    /// On the leader: the last stream sequence JetStream acknowledged, events published and
    /// replays skipped since it took the project.
    pub stream_sequence: Option<u64>,
    pub published: Option<u64>,
    pub skipped: Option<u64>,
    /// On the leader: times the stream was found without events the slot had already been
    /// confirmed past (JetStream lost them after `nats_publish_settle_ms`; see docs/cluster.md).
    pub lost_tails: Option<u64>,
    /// On the leader: events larger than a NATS message may be (row changes published with
    /// their rows left out, others not at all; see docs/cluster.md).
    pub too_large: Option<u64>,
    pub publish_error: Option<String>,
}

/// `/ready`'s `cluster` object.
#[derive(serde::Serialize, utoipa::ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct NodeReport {
    pub node: String,
    pub nats: bool,
    /// False while this node's leadership connection to the control database is down.
    pub leadership: bool,
    pub nodes: Vec<String>,
    /// The projects this node leads.
    pub leads: Vec<String>,
}

impl ClusterMode {
    pub fn project_report(&self, project_id: &str) -> ProjectLeadership {
        let view = self.leadership.view();
        let publisher = self.publisher(project_id);
        ProjectLeadership {
            node: self.cluster.node_id.clone(),
            leader: view.leaders.get(project_id).cloned(),
            nodes: view.nodes,
            nats: self.cluster.connected(),
            feed_error: self
                .feeds
                .down
                .lock()
                .expect("poisoned")
                .get(project_id)
                .cloned(),
            stream_sequence: publisher.as_ref().map(|p| p.sequence),
            published: publisher.as_ref().map(|p| p.published),
            skipped: publisher.as_ref().map(|p| p.skipped),
            lost_tails: publisher.as_ref().map(|p| p.lost_tails),
            too_large: publisher.as_ref().map(|p| p.too_large),
            publish_error: publisher.and_then(|p| p.last_error),
        }
    }

    pub fn node_report(&self) -> NodeReport {
        let view = self.leadership.view();
        let mut leads: Vec<String> = self
            .publishers
            .lock()
            .expect("poisoned")
            .keys()
            .cloned()
            .collect();
        leads.sort();
        NodeReport {
            node: self.cluster.node_id.clone(),
            nats: self.cluster.connected(),
            leadership: view.connected,
            nodes: view.nodes,
            leads,
        }
    }

    /// The cluster series of `/metrics` (this node's view).
    pub fn render_metrics(&self) -> String {
        use std::fmt::Write;
        let view = self.leadership.view();
        let node = &self.cluster.node_id;
        let mut out = String::new();
        let _ = writeln!(out, "# HELP fluxbase_cluster_nodes Nodes connected to the control database, as this node sees them.\n# TYPE fluxbase_cluster_nodes gauge\nfluxbase_cluster_nodes{{node=\"{node}\"}} {}", view.nodes.len());
        let _ = writeln!(out, "# HELP fluxbase_cluster_nats_connected 1 while this node is connected to NATS.\n# TYPE fluxbase_cluster_nats_connected gauge\nfluxbase_cluster_nats_connected{{node=\"{node}\"}} {}", u8::from(self.cluster.connected()));
        let _ = writeln!(out, "# HELP fluxbase_cluster_leadership_connected 1 while this node's leadership connection to the control database is up.\n# TYPE fluxbase_cluster_leadership_connected gauge\nfluxbase_cluster_leadership_connected{{node=\"{node}\"}} {}", u8::from(view.connected));
        let publishers = self.publishers();
        let _ = writeln!(out, "# HELP fluxbase_cluster_leading_projects Projects whose change stream this node leads.\n# TYPE fluxbase_cluster_leading_projects gauge\nfluxbase_cluster_leading_projects{{node=\"{node}\"}} {}", publishers.len());
        out.push_str("# HELP fluxbase_cluster_published_events_total Events this node published to JetStream as a project's leader (since it took the project).\n# TYPE fluxbase_cluster_published_events_total counter\n");
        for (project, p) in &publishers {
            let _ = writeln!(out, "fluxbase_cluster_published_events_total{{node=\"{node}\",project=\"{project}\"}} {}", p.published);
        }
        let down = self.feeds.down.lock().expect("poisoned").len();
        let limits = self.limits.lock().expect("poisoned");
        for (metric, help, value) in [
            ("fluxbase_cluster_limit_hits_announced_total", "Requests this node counted against a shared rate limit and announced to the other nodes.", 0),
            ("fluxbase_cluster_limit_messages_total", "NATS messages those announcements took (batched: at most one per limit every 2 ms).", 1),
            ("fluxbase_cluster_limit_hits_heard_total", "Requests the other nodes announced, counted here too.", 2),
        ] {
            let _ = writeln!(out, "# HELP {metric} {help}\n# TYPE {metric} counter");
            for (name, sharing) in limits.iter() {
                let n = [&sharing.announced, &sharing.messages, &sharing.heard][value]
                    .load(std::sync::atomic::Ordering::Relaxed);
                let _ = writeln!(out, "{metric}{{node=\"{node}\",limit=\"{name}\"}} {n}");
            }
        }
        drop(limits);
        let _ = writeln!(out, "# HELP fluxbase_cluster_feeds_down Rooms on this node not receiving their project's stream now.\n# TYPE fluxbase_cluster_feeds_down gauge\nfluxbase_cluster_feeds_down{{node=\"{node}\"}} {down}");
        out
    }
}

/// What leadership asks of the server, for as long as it lives.
struct LedByApp(Weak<App>);

impl Led for LedByApp {
    fn acquired(&self, project: LedProject) -> BoxFuture<'_, ()> {
        Box::pin(async move {
            let Some(app) = self.0.upgrade() else { return };
            let Some(mode) = app.cluster_mode.as_ref() else {
                return;
            };
            let LedProject {
                id: project_id,
                db_name,
                engine,
            } = project;
            // A previous leader that lost its lock may still read the project's log: its
            // reader ends now (it can publish nothing either: the stream's expected sequence
            // fences it). PostgreSQL: its walsender is terminated. MySQL: nothing to do here;
            // every node registers the project's binlog dump with the same replica server id
            // (crate::cdc::binlog::server_id of the instance, not the node), and the server
            // ends the older dump of an id when a new one starts.
            if engine == Engine::Postgresql {
                end_previous_walsender(&app, &project_id, &db_name).await;
            }
            // Durable subscribers first (synchronously), then the stream: the slot is never
            // confirmed past what the publisher and the outbox have taken.
            let bus = app.bus.project(&project_id);
            let first = bus.subscribe_durable();
            let status = Arc::new(Mutex::new(PublisherStatus::default()));
            let task = tokio::spawn(publisher::run(
                mode.cluster.clone(),
                bus,
                project_id.clone(),
                first,
                status.clone(),
            ));
            if let Some(old) = mode
                .publishers
                .lock()
                .expect("poisoned")
                .insert(project_id.clone(), Publishing { task, status })
            {
                old.task.abort();
            }
            app.webhooks.lead(&project_id);
            app.cdc.lead(project_id, db_name, engine);
        })
    }

    fn released(&self, project_id: String) -> BoxFuture<'_, ()> {
        Box::pin(async move {
            let Some(app) = self.0.upgrade() else { return };
            app.cdc.stop(&project_id).await;
            if let Some(mode) = app.cluster_mode.as_ref() {
                if let Some(p) = mode
                    .publishers
                    .lock()
                    .expect("poisoned")
                    .remove(&project_id)
                {
                    p.task.abort();
                }
            }
            app.webhooks.unlead(&project_id);
            // A deleted project's stream goes with it (a suspended one keeps its history).
            if let (Some(mode), Ok(None)) = (
                app.cluster_mode.as_ref(),
                app.auth.load_project(&project_id).await,
            ) {
                mode.cluster.delete_stream(&project_id).await;
            }
        })
    }

    fn projects(&self) -> BoxFuture<'_, anyhow::Result<Vec<LedProject>>> {
        Box::pin(async move {
            let app = self
                .0
                .upgrade()
                .ok_or_else(|| anyhow::anyhow!("stopping"))?;
            let control = app.control.get().await?;
            let projects: Vec<LedProject> = crate::control::projects::led(&control)
                .await?
                .into_iter()
                .map(|(id, db_name, engine)| LedProject {
                    id,
                    db_name,
                    engine,
                })
                .collect();
            // Every node keeps a room for every led project (a suspended one's keeps its
            // history, as on a single server), fed by the project's stream.
            for p in &projects {
                app.realtime.start_room(&p.id);
            }
            Ok(projects)
        })
    }
}

/// Ends the walsender of a PostgreSQL project's slot that a previous leader may still hold.
async fn end_previous_walsender(app: &App, project_id: &str, db_name: &str) {
    let slot = crate::cdc::slot_name(project_id);
    match app.cluster.connect(db_name).await {
        Ok(admin) => {
            if let Err(e) = admin
                .execute(
                    // Walsenders only: while a project is created, the backend making its slot
                    // holds it too.
                    "SELECT pg_terminate_backend(s.active_pid)
                     FROM pg_replication_slots s JOIN pg_stat_activity a ON a.pid = s.active_pid
                     WHERE s.slot_name = $1 AND a.backend_type = 'walsender'",
                    &[&slot],
                )
                .await
            {
                tracing::warn!(project_id, error = %e, "ending a previous leader's walsender");
            }
        }
        Err(e) => {
            tracing::warn!(project_id, error = %e, "connecting to the project database")
        }
    }
}

/// Realtime's transport in cluster mode.
struct RealtimeRelay {
    cluster: Arc<Cluster>,
    feeds: Arc<FeedHealth>,
    leadership: Arc<Leadership>,
}

impl crate::realtime::Relay for RealtimeRelay {
    fn subscribe(&self, project_id: &str, from_start: bool) -> crate::bus::Subscription {
        crate::cluster::feed::subscribe(
            self.cluster.clone(),
            project_id,
            from_start,
            self.feeds.clone(),
        )
    }

    fn broadcast(
        &self,
        project_id: &str,
        event: &str,
        payload: String,
        sender: Option<u64>,
    ) -> BoxFuture<'static, Result<String, String>> {
        let ask = BroadcastAsk {
            event: event.to_string(),
            payload,
            sender: sender.map(|s| (self.cluster.node_id.clone(), s)),
        };
        let nats = self.cluster.nats.clone();
        let subject = crate::cluster::broadcast_subject(project_id);
        Box::pin(async move {
            let body = serde_json::to_vec(&ask).map_err(|e| e.to_string())?;
            let answer = tokio::time::timeout(
                std::time::Duration::from_secs(5),
                nats.request(subject, body.into()),
            )
            .await
            .map_err(|_| "the project's leader did not answer within 5 s".to_string())?
            .map_err(|e| match e.kind() {
                async_nats::RequestErrorKind::NoResponders => {
                    "no node leads the project right now".to_string()
                }
                _ => format!("NATS: {e}"),
            })?;
            let reply: BroadcastReply =
                serde_json::from_slice(&answer.payload).map_err(|e| e.to_string())?;
            match (reply.id, reply.error) {
                (Some(id), _) => Ok(id),
                (None, e) => Err(e.unwrap_or_else(|| "refused".into())),
            }
        })
    }

    fn nodes(&self) -> usize {
        self.leadership.node_count()
    }

    fn degraded(&self, project_id: &str) -> Option<String> {
        if !self.cluster.connected() {
            return Some("NATS is unreachable".into());
        }
        self.feeds
            .down
            .lock()
            .expect("poisoned")
            .get(project_id)
            .cloned()
    }
}

impl App {
    /// Cluster mode: streams, outbox writers and rooms follow leadership; realtime reads the
    /// cluster's stream. Called once when the app is built.
    pub(super) fn join_cluster(self: &Arc<Self>) {
        let Some(mode) = self.cluster_mode.as_ref() else {
            return;
        };
        self.cdc.set_led();
        self.webhooks.set_led();
        // The guide's request limits hold across nodes (crate::cluster::limits).
        let callers = self.secrets.derive("cluster rate limit callers");
        for (name, limiter) in [("keys", &self.rate), ("sessions", self.auth.session_rate())] {
            if let Some(sharing) =
                crate::cluster::limits::share(&mode.cluster, limiter, name, callers.as_bytes())
            {
                mode.limits.lock().expect("poisoned").push((name, sharing));
            }
        }
        self.realtime.set_relay(Arc::new(RealtimeRelay {
            cluster: mode.cluster.clone(),
            feeds: mode.feeds.clone(),
            leadership: mode.leadership.clone(),
        }));
        self.sql.join_cluster(mode.leadership.clone());
        self.mysql.sql.join_cluster(mode.leadership.clone());
    }

    /// Cluster mode: starts taking leadership (when the server starts serving).
    pub(super) fn start_leading(self: &Arc<Self>) {
        if let Some(mode) = self.cluster_mode.as_ref() {
            mode.leadership.start(
                Arc::new(LedByApp(Arc::downgrade(self))),
                mode.cluster.clone(),
            );
        }
    }

    /// Cluster mode: hands every project this node leads over (a graceful stop).
    pub(super) async fn stop_leading(&self) {
        if let Some(mode) = self.cluster_mode.as_ref() {
            mode.leadership.stop().await;
            // Webhook drains too: their claims go back as soon as their attempts in flight
            // end (10 s at most), not 60 s after this node is gone.
            self.webhooks
                .hand_over(std::time::Duration::from_secs(12))
                .await;
        }
    }
}
