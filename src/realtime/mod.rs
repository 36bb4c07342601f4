//! Realtime: WebSocket rooms fed by the change stream, on the same port as the API (`/` and
//! `/realtime`).
//!
//! ```text
//!  ProjectBus ──durable subscription──► Room pump ──► history on disk (crate::realtime_history)
//!                 (from server start)      │  fsync per batch, then ack   ▲ read at the socket's
//!                                          │                              │ pace (catching up)
//!                                          └─► live members: one Message per event (shared bytes)
//!  socket: reader (client messages, idle timeout) ─┐   writer (queue → sink, pings, close)
//! ```
//!
//! * `subscribe` answers `subscribed` only once the socket is a member of the live room, under
//!   the room's lock, so nothing is delivered before it. The member takes the transactions that
//!   commit at or after the WAL insert position read during its subscribe: one committed after
//!   the client has `subscribed` is delivered; one committed before never is, even when it was
//!   still on its way, or when a new room's subscription rewinds the stream and replays it.
//! * Every project whose stream runs has a room from server start; its pump stores each event in
//!   the project's durable history and acknowledges a transaction only once it is fsynced, so
//!   the slot is never confirmed past what the history holds. It drops replays (ids at or below
//!   the last it stored, which survives restarts).
//! * A member is live (the pump pushes to it) or catching up (a task of its own reads the
//!   history after its position as the socket drains, then joins live under the room's lock:
//!   nothing missing, nothing twice). `since` starts a member catching up; an id the history
//!   cannot vouch for (trimmed, or older than the history) gets `RESUME_TOO_OLD` and live
//!   events, never a silent gap. `Interest::wants` is the one per-event decision of both.
//! * A socket's queue is bounded in bytes (`realtime_send_queue_bytes`): a live member past it
//!   catches up from the history instead of being cut off. A socket is closed with 1008 and a
//!   reason only when its client stops reading (no write progress for
//!   `realtime_client_stall_secs`), falls out of the retained window, or lets four times the
//!   budget queue up; the room goes on for everyone else.
//! * Broadcasts carry ids: SQL ones their WAL id, client and REST ones `<last id>-<seq>`, stored
//!   in the history in order. A graceful shutdown closes every socket with 1001.
//! * What one client may send is bounded per socket, so that a flooder is the one cut off and
//!   not the sockets it floods: broadcasts (count and payload bytes per second) and subscribes
//!   (per second) go through token buckets; one over its bucket is refused with a `RATE_LIMIT`
//!   error, and a socket refused [`RATE_STRIKES`] times without a quiet pause of
//!   [`STRIKE_RESET`] is closed with 1008. A subscribe with a realtime token also counts against
//!   that token's own budget (the API's per-caller rate limit), whichever socket sends it.
//! * A broadcast payload (client, REST or SQL) is at most `realtime_max_broadcast_bytes`; a
//!   larger one never enters a room. A room's resume history is bounded in events, age and bytes.
//! * A subscription authorized by an API key, directly or through a realtime token minted with
//!   it, ends (`ACCESS_REVOKED`) when the key is deleted or rotated; such tokens are refused.
//! * Auth per subscribe: an API key of the project (any scope), a session of a member, or a
//!   realtime token (`flx_rt_…`, HMAC-signed, short-lived, may carry `authUid` and a table list).
//!   A project with `realtimePublic` accepts a subscribe without a token.
//! * The upgrade is finished by hand (the handshake in `crate::api::realtime`, the socket in
//!   [`Realtime::accept`]) rather than by the HTTP framework's `ws()` filter: it cannot set
//!   tungstenite's read buffer, which is 128 KiB per socket by default. Client messages are small (at most
//!   [`MAX_MESSAGE`]), so sockets read through a [`READ_BUFFER`]-byte buffer and an idle socket
//!   costs a few KiB instead of ~140 KiB.
//!
//! One job per file:
//!
//! | file | job |
//! |---|---|
//! | `mod.rs` | the service ([`Realtime`]), its settings, and what it asks of the server ([`Host`]) |
//! | [`room`] | a project's room: members, fan-out of one event to the live members |
//! | [`pump`] | the room's task on the bus: store in the history, fsync, acknowledge, fan out |
//! | [`catch_up`] | a member reading the history at its socket's pace, then joining live |
//! | [`filter`] | what a member wants: its filter and [`filter::Interest::decide`] |
//! | [`socket`] | one WebSocket connection after the upgrade: reader, writer, limits |
//! | [`subscribe`] | a `subscribe` message: credentials, identity, joining the room |
//! | [`token`] | realtime tokens (`POST /api/realtime/token`) |
//! | [`broadcast`] | broadcasts from clients and the REST API, and their ids |
//! | [`revoke`] | ending subscriptions whose key or membership was revoked |
//! | [`history`] | the durable resume history on disk |
//! | [`io`] | the connection under a socket, counting written bytes |
//! | [`error`] | [`RealtimeError`] |

pub mod broadcast;
pub mod catch_up;
pub mod error;
pub mod filter;
pub mod history;
pub mod io;
pub mod pump;
pub mod revoke;
pub mod room;
pub mod socket;
pub mod subscribe;
pub mod token;

use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, OnceLock, Weak};
use std::time::Duration;

use futures_util::future::BoxFuture;
use serde_json::Value;

use crate::auth::{Access, DbRole, Principal, Project};
use crate::bus::Bus;
use crate::metrics::Metrics;
use crate::secrets::Secrets;
pub use broadcast::{BroadcastRequest, BroadcastResponse};
pub use error::RealtimeError;
pub use revoke::MemberChange;
pub use room::RoomClosed;
pub use socket::{WebSocket, IDLE_TIMEOUT, MAX_MESSAGE, RATE_STRIKES, READ_BUFFER, STRIKE_RESET};
pub use subscribe::{MAX_SOCKETS_PER_PROJECT, MAX_SUBSCRIPTIONS_PER_SOCKET};
pub use token::{TokenRequest, TokenResponse};

use room::Room;
use socket::{CutOff, CutOffCounts};

/// How much history a room keeps for `since` resumes.
#[derive(Clone, Copy, Debug)]
pub struct Retention {
    pub events: usize,
    pub age: Duration,
    /// Bytes of retained events (their frame, payload and record).
    pub bytes: usize,
}

/// The configuration realtime runs with (the `realtime_*` settings of [`crate::config::Config`],
/// under the same names, and where the histories live).
#[derive(Clone, Debug)]
pub struct Settings {
    /// Rooms keep their histories under `<data_dir>/realtime/<project id>`.
    pub data_dir: PathBuf,
    pub retention: Retention,
    pub realtime_max_broadcast_bytes: usize,
    pub realtime_broadcasts_per_sec: u32,
    pub realtime_broadcast_bytes_per_sec: usize,
    pub realtime_subscribes_per_sec: u32,
    pub realtime_unsubscribed_timeout_secs: u64,
    pub realtime_send_queue_bytes: usize,
    pub realtime_client_stall_secs: u64,
    pub realtime_catch_up_reads: usize,
    pub realtime_rls_max_identities: usize,
    pub realtime_project_broadcasts_per_sec: u32,
    pub realtime_project_broadcast_bytes_per_sec: usize,
}

impl From<&crate::config::Config> for Settings {
    fn from(c: &crate::config::Config) -> Settings {
        Settings {
            data_dir: c.data_dir.clone(),
            retention: Retention {
                events: c.realtime_retention_events,
                age: Duration::from_secs(c.realtime_retention_secs),
                bytes: c.realtime_retention_bytes,
            },
            realtime_max_broadcast_bytes: c.realtime_max_broadcast_bytes,
            realtime_broadcasts_per_sec: c.realtime_broadcasts_per_sec,
            realtime_broadcast_bytes_per_sec: c.realtime_broadcast_bytes_per_sec,
            realtime_subscribes_per_sec: c.realtime_subscribes_per_sec,
            realtime_unsubscribed_timeout_secs: c.realtime_unsubscribed_timeout_secs,
            realtime_send_queue_bytes: c.realtime_send_queue_bytes,
            realtime_client_stall_secs: c.realtime_client_stall_secs,
            realtime_catch_up_reads: c.realtime_catch_up_reads,
            realtime_rls_max_identities: c.realtime_rls_max_identities,
            realtime_project_broadcasts_per_sec: c.realtime_project_broadcasts_per_sec,
            realtime_project_broadcast_bytes_per_sec: c.realtime_project_broadcast_bytes_per_sec,
        }
    }
}

/// What realtime asks of the rest of the server: who a credential is and what it may do
/// (authentication, project access, membership, the per-caller rate limit), the project itself,
/// and connections to its database for row-level security. The wiring (`crate::app`)
/// implements it, so that realtime depends on no other service and no other service on it.
/// Refusals come back as [`RealtimeError`]s carrying the guide's code and message (a subscribe
/// sends them to the client as they are).
pub trait Host: Send + Sync {
    /// The project, `None` when there is none with this id.
    fn load_project<'a>(
        &'a self,
        project_id: &'a str,
    ) -> BoxFuture<'a, Result<Option<Project>, RealtimeError>>;
    /// The caller behind a bearer token (an API key or a session).
    fn authenticate<'a>(
        &'a self,
        token: &'a str,
    ) -> BoxFuture<'a, Result<Principal, RealtimeError>>;
    /// The caller's access to a project.
    fn project_access<'a>(
        &'a self,
        principal: &'a Principal,
        project_id: &'a str,
    ) -> BoxFuture<'a, Result<Access, RealtimeError>>;
    /// The end user a subscription acts as, as for SQL: a key may name one (`authUid`), a
    /// session acts as its own user.
    fn request_identity(
        &self,
        access: &Access,
        auth_uid: &Value,
    ) -> Result<Option<String>, RealtimeError>;
    /// Counts a request of `caller` against the API's per-caller rate limit.
    fn rate_check(&self, caller: &str) -> Result<(), RealtimeError>;
    /// An administrative connection to a project database (its catalog).
    fn connect<'a>(
        &'a self,
        database: &'a str,
    ) -> BoxFuture<'a, anyhow::Result<tokio_postgres::Client>>;
    /// A pooled connection to a project's database as one of its roles.
    fn sql_connection<'a>(
        &'a self,
        project: &'a Project,
        role: DbRole,
    ) -> BoxFuture<'a, Result<crate::sql::Checkout, RealtimeError>>;
    /// The key of a project's identity tags (see [`crate::rls`]).
    fn identity_key(&self, project_id: &str) -> [u8; 32];
    /// Installs that key in the project's database (it was missing).
    fn install_identity_key<'a>(
        &'a self,
        project: &'a Project,
    ) -> BoxFuture<'a, anyhow::Result<()>>;
    /// Single node: why the project's changes are not arriving from its stream now (it is
    /// reconnecting), if they are not; rooms tell their members as cluster mode's relay does.
    fn stream_delayed(&self, project_id: &str) -> Option<String>;
    /// Where the MySQL server's binary log ends now, as an event position
    /// ([`crate::cdc::binlog::position`]): a transaction that commits later ends past it. (A
    /// PostgreSQL project's is the WAL insert position, read by realtime itself.)
    fn binlog_end(
        &self,
    ) -> BoxFuture<'_, Result<fluxbase_replication::pgoutput::Lsn, RealtimeError>>;
}

/// The realtime service: every room of this server, its sockets, and what they need (settings,
/// the token key, the control database, metrics, the bus and the [`Host`]). Built once at
/// start-up and shared (`Arc`): rooms, pumps and catch-ups hold it weakly.
pub struct Realtime {
    settings: Settings,
    /// Signs realtime tokens and fingerprints API keys (derived from the instance secret).
    token_key: ring::hmac::Key,
    /// The app's clock, which realtime tokens expire by (tests move it forward).
    clock: Arc<crate::storage::Clock>,
    /// The control database (API keys, members, the WAL position).
    control: deadpool_postgres::Pool,
    metrics: Arc<Metrics>,
    /// Where rooms subscribe to their project's change stream.
    bus: Arc<Bus>,
    /// The rest of the server (set once it is built; gone once it is dropped).
    host: OnceLock<Weak<dyn Host>>,
    rooms: Mutex<HashMap<String, Arc<Room>>>,
    next_socket: AtomicU64,
    pub sockets: AtomicUsize,
    pub delivered: AtomicU64,
    /// Key revocations seen, per project: a subscribe that checked its key before one and
    /// joins the room after it checks the key again (see [`Realtime::revocations`]).
    revoked: Mutex<HashMap<String, u64>>,
    /// Revocations possibly missed in every project at once (the access listener was
    /// disconnected).
    revoked_everywhere: AtomicU64,
    /// Every open socket's cut-off, to close them all with 1001 on shutdown.
    open: Mutex<HashMap<u64, Arc<CutOff>>>,
    /// Rooms being created (their history opened outside `rooms`' lock), one at a time each.
    opening: Mutex<HashMap<String, Arc<Mutex<()>>>>,
    /// Set (before the 1001s go out) by a graceful shutdown: new sockets are refused, and one
    /// that was accepted just before is closed with 1001 at once.
    shutting_down: std::sync::atomic::AtomicBool,
    cut_offs: CutOffCounts,
    /// Row-level security of row events, per subscriber identity.
    visibility: crate::visibility::Visibility,
    /// Cluster mode: where rooms read their project's events and where broadcasts go.
    relay: OnceLock<Arc<dyn Relay>>,
}

/// Cluster mode's transport for realtime (see crate::cluster): rooms read their project's
/// events from the cluster's stream, and client and REST broadcasts go to the project's leader,
/// which puts them in that stream for every node's room.
pub trait Relay: Send + Sync {
    /// The project's events for its room on this node (durable: acknowledged once stored);
    /// `from_start`: the room's history is empty.
    fn subscribe(&self, project_id: &str, from_start: bool) -> crate::bus::Subscription;
    /// Hands a broadcast to the project's leader; its id once the stream holds it.
    fn broadcast(
        &self,
        project_id: &str,
        event: &str,
        payload: String,
        sender: Option<u64>,
    ) -> BoxFuture<'static, Result<String, String>>;
    /// Why the project's events are not arriving now (NATS unreachable), if they are not.
    fn degraded(&self, project_id: &str) -> Option<String>;
    /// The nodes sharing the cluster-wide per-project bounds (at least 1).
    fn nodes(&self) -> usize {
        1
    }
}

impl Realtime {
    pub fn new(
        config: &crate::config::Config,
        secrets: &Secrets,
        control: deadpool_postgres::Pool,
        metrics: Arc<Metrics>,
        bus: Arc<Bus>,
        clock: Arc<crate::storage::Clock>,
    ) -> Realtime {
        Realtime {
            settings: Settings::from(config),
            token_key: token::key(secrets),
            clock,
            control,
            visibility: crate::visibility::Visibility::new(config, metrics.clone()),
            metrics,
            bus,
            host: OnceLock::new(),
            rooms: Default::default(),
            next_socket: Default::default(),
            sockets: Default::default(),
            delivered: Default::default(),
            revoked: Default::default(),
            revoked_everywhere: Default::default(),
            open: Default::default(),
            opening: Default::default(),
            shutting_down: Default::default(),
            cut_offs: Default::default(),
            relay: OnceLock::new(),
        }
    }

    /// Cluster mode: rooms read the cluster's stream and broadcasts go through the leader.
    /// Set once, before any room opens.
    pub fn set_relay(&self, relay: Arc<dyn Relay>) {
        let _ = self.relay.set(relay);
    }

    /// Connects realtime to the rest of the server, once it is built.
    pub fn attach(&self, host: Weak<dyn Host>) {
        let _ = self.host.set(host);
    }

    /// The rest of the server, while it runs.
    fn host(&self) -> Result<Arc<dyn Host>, RealtimeError> {
        self.host
            .get()
            .and_then(Weak::upgrade)
            .ok_or_else(|| RealtimeError::Internal(anyhow::anyhow!("the server is stopping")))
    }

    /// The realtime series of `/metrics`.
    pub fn render_metrics(&self) -> String {
        use std::fmt::Write;
        let rooms: Vec<(String, Arc<Room>)> = self
            .rooms
            .lock()
            .expect("poisoned")
            .iter()
            .map(|(p, r)| (p.clone(), r.clone()))
            .collect();
        let mut out = String::new();
        let mut bytes = String::new();
        let mut events = String::new();
        let mut catching_up = 0usize;
        let (mut fell_behind, mut chunk_reads) = (0, 0);
        for (project, room) in &rooms {
            fell_behind += room.fell_behind.load(Ordering::Relaxed);
            chunk_reads += room.chunk_reads.load(Ordering::Relaxed);
            catching_up += room
                .state
                .lock()
                .expect("poisoned")
                .members
                .values()
                .filter(|m| m.catching_up.is_some())
                .count();
            if let Some(h) = room.history.lock().expect("poisoned").as_ref() {
                let _ = writeln!(
                    bytes,
                    "fluxbase_realtime_history_bytes{{project=\"{project}\"}} {}",
                    h.bytes()
                );
                let _ = writeln!(
                    events,
                    "fluxbase_realtime_history_events{{project=\"{project}\"}} {}",
                    h.len()
                );
            }
        }
        out.push_str("# HELP fluxbase_realtime_history_bytes Bytes of a project's durable resume history on disk.\n# TYPE fluxbase_realtime_history_bytes gauge\n");
        out.push_str(&bytes);
        out.push_str("# HELP fluxbase_realtime_history_events Events in a project's durable resume history.\n# TYPE fluxbase_realtime_history_events gauge\n");
        out.push_str(&events);
        let _ = writeln!(
            out,
            "# HELP fluxbase_realtime_catching_up Subscriptions reading their backlog from the history at their own pace.\n# TYPE fluxbase_realtime_catching_up gauge\nfluxbase_realtime_catching_up {catching_up}"
        );
        let _ = writeln!(
            out,
            "# HELP fluxbase_realtime_fell_behind_total Subscriptions moved from live to catching up because their send queue was full.\n# TYPE fluxbase_realtime_fell_behind_total counter\nfluxbase_realtime_fell_behind_total {fell_behind}"
        );
        let _ = writeln!(
            out,
            "# HELP fluxbase_realtime_catch_up_reads_total History chunks read from disk and decoded for catching-up subscriptions (members at the same place share one).\n# TYPE fluxbase_realtime_catch_up_reads_total counter\nfluxbase_realtime_catch_up_reads_total {chunk_reads}"
        );
        out.push_str("# HELP fluxbase_realtime_cutoffs_total Sockets closed with 1008, by reason (queue_bytes, stalled, window, rate_limit).\n# TYPE fluxbase_realtime_cutoffs_total counter\n");
        let counts = self.cut_offs.lock().expect("poisoned").clone();
        for reason in ["queue_bytes", "stalled", "window", "rate_limit"] {
            let _ = writeln!(
                out,
                "fluxbase_realtime_cutoffs_total{{reason=\"{reason}\"}} {}",
                counts.get(reason).copied().unwrap_or(0)
            );
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A service on a control pool that never connects (nothing here queries it).
    pub(super) fn realtime() -> Realtime {
        let manager =
            deadpool_postgres::Manager::new(tokio_postgres::Config::new(), tokio_postgres::NoTls);
        let control = deadpool_postgres::Pool::builder(manager)
            .max_size(1)
            .build()
            .expect("a pool");
        let secrets = Secrets {
            instance_secret: "00".repeat(32),
            pg_password: String::new(),
        };
        Realtime::new(
            &crate::config::Config::default(),
            &secrets,
            control,
            Default::default(),
            Default::default(),
            Default::default(),
        )
    }
}
