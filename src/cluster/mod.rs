//! Cluster mode: several `fluxbase serve` nodes on one PostgreSQL and one NATS server with
//! JetStream (`nats_url`). Without `nats_url` none of this runs and a server is a single node,
//! everything in process.
//!
//! ```text
//!            control database: advisory lock per project ── the node holding it leads
//!                        │
//!  leader:  slot ─► change stream ─► ProjectBus ─┬─ durable ─► JetStream publisher ─► stream FLUXBASE_<id>
//!                                                └─ durable ─► webhook outbox (once per event)     │
//!  every node: room pump ◄── durable consumer rt_<node> (its own history, fan-out) ◄──────────────┘
//!  broadcasts (client, REST): any node ─► NATS request fluxbase.broadcast.<id> ─► leader ─► stream
//! ```
//!
//! * **Leadership** ([`leadership`]): a session-level advisory lock per project on a dedicated
//!   control-database connection named `fluxbase-node:<node id>`. Projects are spread evenly
//!   over the nodes connected; a node that dies loses its locks with its connection (a kill -9
//!   closes it at once), a node that stops gracefully releases them, and another node takes
//!   the project on its next tick (500 ms).
//! * **Fencing**: one writer per project stream. The leader publishes each event with the
//!   stream sequence it expects last (`Nats-Expected-Last-Sequence`), so a node that lost its
//!   lock but still holds events can publish none of them; and it ends the slot's walsender
//!   of a previous leader before streaming.
//! * **Nothing lost, nothing twice**: each event goes out with its id as `Nats-Msg-Id`; the slot
//!   is confirmed only up to what JetStream has acknowledged (and the webhook outbox stored); a
//!   new leader replays from the slot and skips what the stream already holds (ids are sortable).
//! * **Realtime**: every node's room consumes the project stream with its own durable consumer
//!   and keeps its own resume history from it, so `since` works on any node and after restarts,
//!   as far back as the stream retains (`nats_retention_secs`, `nats_retention_bytes`).

pub mod feed;
pub mod leadership;
pub mod limits;
pub mod publisher;

use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context, Result};
use async_nats::jetstream;

use crate::config::Config;

/// A node name: 1 to 64 letters, digits, `-` or `_` (it goes into NATS consumer names and
/// PostgreSQL application names).
pub fn valid_node_id(id: &str) -> bool {
    (1..=64).contains(&id.len())
        && id
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
}

/// This node's name: `node_id`, else the one kept in `<data_dir>/node-id` (made on first use).
pub fn node_id(config: &Config) -> Result<String> {
    if let Some(id) = &config.node_id {
        return Ok(id.clone());
    }
    let path = config.data_dir.join("node-id");
    if let Ok(id) = std::fs::read_to_string(&path) {
        let id = id.trim().to_string();
        if valid_node_id(&id) {
            return Ok(id);
        }
    }
    let id = format!("node-{}", crate::secrets::random_hex::<4>());
    write_private(&path, &id).with_context(|| format!("writing {}", path.display()))?;
    Ok(id)
}

fn write_private(path: &Path, text: &str) -> std::io::Result<()> {
    use std::io::Write;
    use std::os::unix::fs::OpenOptionsExt;
    let mut f = std::fs::OpenOptions::new()
        .create(true)
        .truncate(true)
        .write(true)
        .mode(0o600)
        .open(path)?;
    f.write_all(text.as_bytes())?;
    f.sync_all()
}

/// What each project stream keeps.
#[derive(Clone, Debug)]
pub struct Retention {
    pub max_age: Duration,
    pub max_bytes: i64,
    pub replicas: usize,
}

/// How the leader's publisher treats JetStream's acknowledgements ([`publisher`]).
pub struct PublishSettings {
    /// How long after JetStream's acknowledgement an event may let the slot move past it.
    pub settle: Duration,
}

/// A node's link to the cluster: its name, its NATS connection and JetStream.
pub struct Cluster {
    pub node_id: String,
    pub nats: async_nats::Client,
    pub js: jetstream::Context,
    pub retention: Retention,
    pub publishing: PublishSettings,
    /// Counts (re)connections: a pull consumer's outstanding request does not survive a NATS
    /// restart, so feeds start over when this moves.
    connections: tokio::sync::watch::Sender<u64>,
}

/// Credentials a NATS URL carries.
#[derive(Debug, PartialEq, Eq)]
pub enum NatsCredentials {
    /// `nats://user:password@host`
    UserPassword(String, String),
    /// `nats://token@host`
    Token(String),
}

/// The credentials in `url` (percent-escapes decoded); of a comma-separated list, those of the
/// first URL that has some.
pub fn url_credentials(url: &str) -> Option<NatsCredentials> {
    let decode = |s: &str| {
        percent_encoding::percent_decode_str(s)
            .decode_utf8_lossy()
            .into_owned()
    };
    url.split(',').find_map(|one| {
        let u = url::Url::parse(one.trim()).ok()?;
        match (u.username(), u.password()) {
            ("", _) => None,
            (user, Some(password)) => Some(NatsCredentials::UserPassword(
                decode(user),
                decode(password),
            )),
            (token, None) => Some(NatsCredentials::Token(decode(token))),
        }
    })
}

/// The NATS client options for `url`, with the credentials it carries applied: async-nats does
/// not read them from the URL itself (`nats://user:password@host` connected as nobody and the
/// server answered "authorization violation").
pub fn connect_options(url: &str) -> async_nats::ConnectOptions {
    match url_credentials(url) {
        Some(NatsCredentials::UserPassword(user, password)) => {
            async_nats::ConnectOptions::with_user_and_password(user, password)
        }
        Some(NatsCredentials::Token(token)) => async_nats::ConnectOptions::with_token(token),
        None => async_nats::ConnectOptions::new(),
    }
}

/// A node's share of a cluster-wide bound (per-project sockets, SQL connections): `limit`
/// divided by the nodes connected, rounded up. The cluster as a whole then admits at most
/// `limit + nodes - 1`, and a project whose traffic all lands on one node gets that node's
/// share only. At least 1.
pub fn per_node(limit: usize, nodes: usize) -> usize {
    limit.div_ceil(nodes.max(1)).max(1)
}

/// The subject a project's events go to.
pub fn subject(project_id: &str) -> String {
    format!("fluxbase.events.{project_id}")
}

/// The JetStream stream of a project.
pub fn stream_name(project_id: &str) -> String {
    format!("FLUXBASE_{project_id}")
}

/// The subject a project's leader takes broadcast requests on.
pub fn broadcast_subject(project_id: &str) -> String {
    format!("fluxbase.broadcast.{project_id}")
}

/// The stream [`Cluster::room_for_stream`] makes and deletes, and its subject.
const ROOM_PROBE: &str = "FLUXBASE_ROOM_PROBE";
const ROOM_PROBE_SUBJECT: &str = "fluxbase.room.probe";

/// Wakes every node's leadership loop (a node stopped, or joined).
pub const REBALANCE_SUBJECT: &str = "fluxbase.cluster.rebalance";

impl Cluster {
    /// Connects to NATS. The server starts even when NATS is down: the client keeps trying,
    /// change streams wait for it (their slots keep the WAL) and HTTP serves meanwhile.
    pub async fn connect(config: &Config, node_id: String) -> Result<Arc<Cluster>> {
        let url = config
            .nats_url
            .as_ref()
            .context("cluster mode needs nats_url")?
            .expose()
            .to_string();
        let connections = tokio::sync::watch::Sender::new(0u64);
        let counter = connections.clone();
        let nats = connect_options(&url)
            .name(format!("fluxbase-{node_id}"))
            .retry_on_initial_connect()
            .connection_timeout(Duration::from_secs(5))
            // A server that stops answering (hung, or cut off without a reset) is noticed after
            // two unanswered pings: within about 6 s, not the client's default of minutes
            // (red team rt18: `/ready` said `"nats": true` for 182 s of a stopped nats-server,
            // and the request limits were not shared meanwhile). Not shorter: any message the
            // server sends resets the count, but one that takes longer than this to arrive (a
            // large `max_payload` over a slow link) would end the connection.
            .ping_interval(Duration::from_secs(2))
            .event_callback(move |event| {
                let counter = counter.clone();
                async move {
                    match event {
                        async_nats::Event::Connected => {
                            tracing::info!("connected to NATS");
                            counter.send_modify(|n| *n += 1);
                        }
                        async_nats::Event::Disconnected => {
                            tracing::warn!(
                                "disconnected from NATS: change streams pause, HTTP serves on"
                            );
                        }
                        // Each failed reconnection attempt: the disconnection was logged.
                        async_nats::Event::ClientError(e) => {
                            tracing::debug!(error = %e, "NATS client")
                        }
                        other => tracing::warn!(event = %other, "NATS"),
                    }
                }
            })
            .connect(url.as_str())
            .await
            .with_context(|| {
                format!("connecting to NATS at {}", crate::config::redact_url(&url))
            })?;
        let js = jetstream::new(nats.clone());
        Ok(Arc::new(Cluster {
            node_id,
            nats,
            js,
            retention: Retention {
                max_age: Duration::from_secs(config.nats_retention_secs),
                max_bytes: i64::try_from(config.nats_retention_bytes).unwrap_or(i64::MAX),
                replicas: config.nats_replicas,
            },
            publishing: PublishSettings {
                settle: Duration::from_millis(config.nats_publish_settle_ms),
            },
            connections,
        }))
    }

    /// Changes each time the NATS connection is made again.
    pub fn connections(&self) -> tokio::sync::watch::Receiver<u64> {
        self.connections.subscribe()
    }

    /// The largest message the NATS server takes (its `max_payload`); NATS's default (1 MiB)
    /// until the first connection told.
    pub fn max_payload(&self) -> usize {
        match self.nats.server_info().max_payload {
            0 => 1 << 20,
            n => n,
        }
    }

    /// True while the NATS connection is up.
    pub fn connected(&self) -> bool {
        self.nats.connection_state() == async_nats::connection::State::Connected
    }

    /// The project's stream, created (or its limits updated) if needed.
    pub async fn ensure_stream(&self, project_id: &str) -> Result<jetstream::stream::Stream> {
        let config = jetstream::stream::Config {
            name: stream_name(project_id),
            subjects: vec![subject(project_id)],
            max_age: self.retention.max_age,
            max_bytes: self.retention.max_bytes,
            num_replicas: self.retention.replicas,
            storage: jetstream::stream::StorageType::File,
            discard: jetstream::stream::DiscardPolicy::Old,
            duplicate_window: Duration::from_secs(120),
            ..Default::default()
        };
        match self.js.get_stream(stream_name(project_id)).await {
            Ok(mut stream) => {
                let info = stream.info().await?.config.clone();
                if info.max_age != config.max_age || info.max_bytes != config.max_bytes {
                    self.js.update_stream(config).await?;
                }
                Ok(stream)
            }
            Err(_) => Ok(self
                .js
                .get_or_create_stream(config)
                .await
                .with_context(|| format!("creating the JetStream stream of {project_id}"))?),
        }
    }

    /// Whether JetStream has room for one more project's stream: a stream like a project's (its
    /// `max_bytes`, file storage, replicas) is made under [`ROOM_PROBE`] and deleted again. JetStream reserves each stream's `max_bytes` when it is made, so once the
    /// reservations fill its store a new project's stream cannot be made and the project would
    /// never have realtime (red team rt18). `Err` with JetStream's words only when it refuses
    /// for lack of resources; anything else (NATS unreachable) is no answer: `Ok`, and the
    /// stream is made when the project's leader starts.
    pub async fn room_for_stream(&self) -> std::result::Result<(), String> {
        use async_nats::jetstream::context::CreateStreamErrorKind;
        use async_nats::jetstream::ErrorCode;
        if !self.connected() {
            return Ok(());
        }
        // One name for every node: a probe left behind (a crash between its making and its
        // deletion) is found by the next one, whichever node makes it.
        let config = jetstream::stream::Config {
            name: ROOM_PROBE.to_string(),
            subjects: vec![ROOM_PROBE_SUBJECT.to_string()],
            max_bytes: self.retention.max_bytes,
            num_replicas: self.retention.replicas,
            storage: jetstream::stream::StorageType::File,
            ..Default::default()
        };
        for _ in 0..2 {
            let e = match self.js.create_stream(config.clone()).await {
                Ok(_) => {
                    if let Err(e) = self.js.delete_stream(ROOM_PROBE).await {
                        tracing::debug!(error = %e, "deleting the JetStream room probe");
                    }
                    return Ok(());
                }
                Err(e) => e,
            };
            let CreateStreamErrorKind::JetStream(js) = e.kind() else {
                tracing::debug!(error = %e, "JetStream did not say whether a project's stream fits");
                return Ok(());
            };
            match js.error_code() {
                ErrorCode::STORAGE_RESOURCES_EXCEEDED | ErrorCode::INSUFFICIENT_RESOURCES => {
                    return Err(js.to_string())
                }
                // A NATS cluster: no server has room for the stream's replicas.
                ErrorCode::CLUSTER_NO_PEERS
                    if js.to_string().to_lowercase().contains("insufficient") =>
                {
                    return Err(js.to_string())
                }
                // A probe left behind with other limits: gone, then asked again.
                ErrorCode::STREAM_NAME_EXIST => {
                    let _ = self.js.delete_stream(ROOM_PROBE).await;
                }
                _ => {
                    tracing::debug!(error = %e, "JetStream did not say whether a project's stream fits");
                    return Ok(());
                }
            }
        }
        Ok(())
    }

    /// Deletes a project's stream (the project was deleted).
    pub async fn delete_stream(&self, project_id: &str) {
        if let Err(e) = self.js.delete_stream(stream_name(project_id)).await {
            tracing::debug!(project_id, error = %e, "deleting the project's JetStream stream");
        }
    }

    /// Asks every node to look at leadership now.
    pub async fn rebalance(&self) {
        let _ = self
            .nats
            .publish(REBALANCE_SUBJECT, self.node_id.clone().into())
            .await;
        let _ = self.nats.flush().await;
    }
}

/// In cluster mode every node must derive the same project role passwords, token keys and
/// message tags: the first node stores its instance secret in the control database, the others
/// adopt it (`fluxbase.cluster_secret`).
pub async fn shared_secret(control: &deadpool_postgres::Pool, own: &str) -> Result<String> {
    let client = control.get().await?;
    client
        .execute(
            "INSERT INTO fluxbase.cluster_secret (instance_secret) VALUES ($1)
             ON CONFLICT (id) DO NOTHING",
            &[&own],
        )
        .await?;
    let row = client
        .query_one("SELECT instance_secret FROM fluxbase.cluster_secret", &[])
        .await?;
    Ok(row.get(0))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn nats_credentials_come_from_the_url() {
        use NatsCredentials::*;
        assert_eq!(
            url_credentials("nats://fluxbase:p%40ss@127.0.0.1:4222"),
            Some(UserPassword("fluxbase".into(), "p@ss".into()))
        );
        assert_eq!(
            url_credentials("nats://s3cr3t@127.0.0.1:4222"),
            Some(Token("s3cr3t".into()))
        );
        assert_eq!(
            url_credentials("nats://a:4222, nats://u:pw@b:4222"),
            Some(UserPassword("u".into(), "pw".into()))
        );
        assert_eq!(url_credentials("nats://127.0.0.1:4222"), None);
        assert_eq!(url_credentials("127.0.0.1:4222"), None);
    }

    #[test]
    fn per_node_shares_round_up_and_add_up_to_at_most_limit_plus_nodes_minus_one() {
        assert_eq!(per_node(10_000, 1), 10_000);
        assert_eq!(per_node(10_000, 3), 3_334);
        assert_eq!(per_node(8, 3), 3);
        assert_eq!(per_node(8, 0), 8);
        assert_eq!(per_node(2, 5), 1);
        for limit in 1..50 {
            for nodes in 1..12 {
                let total = per_node(limit, nodes) * nodes;
                assert!(total >= limit && total < limit + nodes, "{limit}/{nodes}");
            }
        }
    }

    #[test]
    fn node_ids_are_names_safe_in_subjects_and_application_names() {
        for ok in ["a", "node-1", "eu_west_2", &"x".repeat(64)] {
            assert!(valid_node_id(ok), "{ok}");
        }
        for bad in ["", "a.b", "a b", "node*", "é", &"x".repeat(65), "a>b"] {
            assert!(!valid_node_id(bad), "{bad}");
        }
    }
}
