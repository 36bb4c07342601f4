//! The change stream: one per project database, from its replication slot to the event bus.
//!
//! ```text
//!  project db ─ WAL ─► walsender (pgoutput, slot fluxbase_<id>, publication fluxbase_changes)
//!        │ CopyBoth: XLogData / keepalives              ▲ standby status: confirmed position
//!        ▼                                              │
//!  ReplicationStream ─► pgoutput::decode ─► Assembler ─► events::finish ─► ProjectBus::publish
//!   (replication/)       (replication/)     per-tx buffers,               (bounded queues)
//!                                           spill to disk                        │
//!                         confirm(bus.confirmable()) ◄── acks of durable subscribers
//! ```
//!
//! Guarantees:
//! * **Order and atomicity.** A transaction's events are published together after its commit,
//!   in commit order; aborted transactions and subtransactions publish nothing.
//! * **At-least-once, stable ids.** The slot is confirmed only up to what the bus says is safe
//!   (every durable subscriber's acknowledgement, or everything published when there is none).
//!   After a crash or restart the stream resumes at the slot's confirmed position and repeats
//!   anything after it with the same ids (commit LSN + index).
//! * **Bounded memory.** Each open transaction keeps at most `cdc_buffer_bytes` of changes in
//!   memory and spills the rest under `$FLUXBASE_DATA_DIR/cdc-spill`.
//! * **Health.** Errors are transient or definite (Materialize's split). Transient ones (the
//!   connection lost, the server restarting or out of connections, a timeout, our own previous
//!   walsender still holding the slot) are retried with backoff, state `reconnecting`. Definite
//!   ones stop the stream and are reported once (error log, `last_error` and state in
//!   `/api/cdc/status`, `fluxbase_cdc_failed` in `/metrics`): a missing or invalidated slot
//!   (state `slot_lost`: changes were lost, never silently skipped), and anything retrying
//!   cannot fix (state `failed`): a publication that is gone, refused authentication or
//!   permission, a message that cannot be decoded. An idle database does not pin WAL (a
//!   keepalive's position is confirmed when nothing is in flight).
//!
//! The streams run on a runtime of their own (threads `fluxbase-cdc`), not among the HTTP,
//! WebSocket and webhook tasks. On a shared worker a stream had to choose: yield after each
//! transaction and wait behind every socket writer its event woke (realtime read the WAL
//! 15–45 ms late), or keep the worker and leave the consumer it woke parked in that worker's
//! LIFO slot, which no other worker may steal (webhook deliveries waited up to 0.7 s). From a
//! thread of its own, each wake-up reaches the server's runtime through its shared queue, where
//! any idle worker takes it, and the stream reads on while they run. The streams of all
//! projects share that runtime, so none may keep a worker long: a stream's long synchronous
//! stretches (a huge row's decoding and rendering, spill file I/O) run in [`blocking`], which
//! hands its worker's other streams to another thread meanwhile.
//!
//! [`Cdc`] is the service: it holds what the streams need (the cluster, the control pool, the
//! bus they publish to, the secrets their message key derives from, the settings) and nothing
//! of the server around it; the realtime room that stores a stream is started through the hook
//! the wiring sets ([`Cdc::on_stream_start`]).

pub mod assemble;
pub mod binlog;
pub mod events;
pub mod names;

use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::{Arc, Mutex, OnceLock, RwLock};
use std::time::{Duration, Instant};

use fluxbase_replication::client::{
    PgOutputOptions, ReplicationClient, ReplicationError, ReplicationEvent,
};
use fluxbase_replication::pgoutput::{self, DecodeContext, LogicalReplicationMessage, Lsn};
use fluxbase_replication::values::TypeRegistry;
use fluxbase_replication::wire::{ConnectConfig, WireError};
use serde::Serialize;

use crate::bus::{Bus, Event, EventBus, ProjectChannel};
use crate::config::Config;
use crate::db::ClusterTarget;
use crate::projects::Engine;
use crate::secrets::Secrets;

pub const PUBLICATION: &str = "fluxbase_changes";

pub fn slot_name(project_id: &str) -> String {
    format!("fluxbase_{project_id}")
}

/// The HMAC-SHA256 key of a project's `fluxbase.*` messages: the server's own emitters
/// (`fluxbase_cdc.emit`, sql/project/0005_sandbox.sql) prefix each message with
/// `hex(HMAC(key, prefix || "\n" || body))`; the stream drops any message without it.
pub fn message_key(secrets: &Secrets, project_id: &str) -> [u8; 32] {
    let hex_key = secrets.derive(&format!("cdc-messages:{project_id}"));
    let mut key = [0u8; 32];
    hex::decode_to_slice(hex_key, &mut key).expect("derive returns 32 bytes of hex");
    key
}

/// Where a stream is, as `/api/cdc/status` (`stream.state`) and `/metrics` report it.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, utoipa::ToSchema)]
#[serde(rename_all = "snake_case")]
pub enum StreamState {
    /// Connecting for the first time.
    #[default]
    Starting,
    Streaming,
    /// A transient error: retrying with backoff.
    Reconnecting,
    /// Definite: the slot is missing or invalidated; changes since its confirmed position may
    /// be lost. Stopped.
    SlotLost,
    /// Definite: an error retrying cannot fix (`last_error` says which). Stopped.
    Failed,
    /// No stream runs for the project on this server.
    Stopped,
}

impl StreamState {
    /// The stream stopped on a definite error and stays stopped until it is started again.
    pub fn is_failed(self) -> bool {
        matches!(self, StreamState::SlotLost | StreamState::Failed)
    }
}

/// What `/api/cdc/status` and `/metrics` report for a stream.
#[derive(Clone, Debug, Serialize, Default, utoipa::ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct StreamStatus {
    pub state: StreamState,
    pub slot: String,
    pub confirmed_lsn: Option<String>,
    pub received_lsn: Option<String>,
    pub server_lsn: Option<String>,
    pub lag_bytes: Option<u64>,
    /// Commit → publish delay of the last transaction, in seconds.
    pub lag_seconds: Option<f64>,
    pub last_event_at: Option<String>,
    pub events: u64,
    pub transactions: u64,
    pub reconnects: u64,
    pub last_error: Option<String>,
    pub buffered_bytes: u64,
    /// Most bytes of open transactions held in memory at once since the stream started.
    pub peak_buffered_bytes: u64,
    /// Bytes of open transactions' changes spilled to disk (past `cdc_buffer_bytes`) since the
    /// server started.
    pub spilled_bytes: u64,
    /// `fluxbase.*` logical decoding messages dropped because the server did not emit them
    /// (no valid tag): forgeries, or messages from before the tags existed.
    pub rejected_messages: u64,
    /// The end of the newest transaction of the project's own the stream received (a position
    /// in the shared log). Never serialized: [`StreamStatus::project_view`] builds what the
    /// project's own callers see from it.
    #[serde(skip)]
    pub own_commit_end: Option<u64>,
    /// The project's own transactions received and not known stored yet: (end in the log,
    /// bytes of their events' payloads), oldest first, at most [`OWN_UNSTORED`] entries.
    #[serde(skip)]
    pub own_unstored: OwnUnstored,
    /// The end of the newest own transaction known stored.
    #[serde(skip)]
    pub own_stored_end: Option<u64>,
}

/// See [`StreamStatus::own_unstored`].
pub type OwnUnstored = std::collections::VecDeque<(u64, u64)>;

/// Most own transactions [`StreamStatus::own_unstored`] lists one by one; past it the two
/// oldest are merged (their bytes summed: the lag stays exact, the confirmed position coarser).
const OWN_UNSTORED: usize = 1024;

impl StreamStatus {
    /// What `/api/cdc/status` shows a project's callers (any key or member, whatever the
    /// scope): nothing that moves with another tenant's writes. The log (PostgreSQL's WAL, the
    /// MySQL server's binary log) is shared by every project on the server, so its end
    /// (`serverLsn`) and any distance to it (`lagBytes`) would let one tenant watch every
    /// other tenant's write volume by polling; an idle project's stored position follows the
    /// log's end too (so that it pins nothing). So, in the project's own terms:
    ///
    /// * `receivedLsn`: the end of the project's newest own transaction the stream received
    ///   (its events' ids already carry that commit's position);
    /// * `confirmedLsn`: the stored position, but never past `receivedLsn`;
    /// * `lagBytes`: `receivedLsn − confirmedLsn`, 0 once everything of the project's own the
    ///   stream received is stored;
    /// * `serverLsn`: never (`null`).
    ///
    /// The three positions are `null` until the stream received one of the project's own
    /// transactions (since this server started it). The operator's full figures (the log's
    /// end, bytes behind it) are in `/metrics` (`fluxbase_cdc_lag_bytes`). docs/change-capture.md,
    /// "What a project sees of its stream".
    pub fn project_view(mut self) -> StreamStatus {
        let own = self.own_commit_end.map(Lsn);
        self.settle_own(lsn_of(&self.confirmed_lsn).map(|l| l.0));
        self.server_lsn = None;
        self.received_lsn = own.map(|l| l.to_string());
        // Never the stored position itself (an idle project's follows the shared log's end),
        // and never a distance in the log (it would count other tenants' writes in between,
        // and a binary log's positions of different files do not subtract): the end of the
        // newest own transaction stored, and the payload bytes of the own ones not stored.
        self.confirmed_lsn = self.own_stored_end.map(|l| Lsn(l).to_string());
        self.lag_bytes = own.map(|_| self.own_unstored.iter().map(|(_, b)| b).sum());
        self
    }

    /// Notes an own transaction received (its end, its events' payload bytes).
    fn note_own(&mut self, end: u64, bytes: u64) {
        self.own_commit_end = self.own_commit_end.max(Some(end));
        self.settle_own(lsn_of(&self.confirmed_lsn).map(|l| l.0));
        let known = self
            .own_unstored
            .back()
            .map(|e| e.0)
            .max(self.own_stored_end);
        if known.is_some_and(|k| end <= k) {
            return; // a rewind's replay of one already counted
        }
        self.own_unstored.push_back((end, bytes));
        if self.own_unstored.len() > OWN_UNSTORED {
            let (_, first) = self.own_unstored.pop_front().expect("more than one");
            if let Some(next) = self.own_unstored.front_mut() {
                next.1 += first;
            }
        }
    }

    /// Moves the own transactions the stored position covers out of the unstored list.
    fn settle_own(&mut self, stored: Option<u64>) {
        let Some(stored) = stored else { return };
        while let Some(&(end, _)) = self.own_unstored.front() {
            if end > stored {
                break;
            }
            self.own_unstored.pop_front();
            self.own_stored_end = self.own_stored_end.max(Some(end));
        }
    }
}

/// The slot as the project database reports it (`/api/cdc/status`'s `slot`).
#[derive(Clone, Debug, Serialize, utoipa::ToSchema)]
#[serde(untagged)]
pub enum SlotReport {
    Present {
        name: String,
        #[serde(rename = "walStatus")]
        wal_status: Option<String>,
        active: bool,
    },
    Missing {
        name: String,
        missing: bool,
    },
}

/// `/api/cdc/status`: the stream (as this server runs it) and its slot (as PostgreSQL has it).
#[derive(Clone, Debug)]
pub struct StatusReport {
    pub stream: StreamStatus,
    pub slot: SlotReport,
}

/// What the streams take from the configuration.
#[derive(Clone, Debug)]
pub struct StreamSettings {
    /// Bytes of one open transaction kept in memory before spilling (`cdc_buffer_bytes`).
    pub buffer_bytes: usize,
    /// The walsenders' `logical_decoding_work_mem`, in kB (`cdc_decoding_work_mem_kb`).
    pub decoding_work_mem_kb: Option<u64>,
    /// Bytes of one row image an event carries (`cdc_max_row_bytes`; 0: no bound).
    pub max_row_bytes: usize,
    /// Where open transactions spill (`<data_dir>/cdc-spill`, one directory per project).
    pub spill_dir: PathBuf,
}

impl StreamSettings {
    pub fn from_config(config: &Config) -> StreamSettings {
        StreamSettings {
            buffer_bytes: config.cdc_buffer_bytes,
            decoding_work_mem_kb: config.cdc_decoding_work_mem_kb,
            max_row_bytes: config.cdc_max_row_bytes,
            spill_dir: config.data_dir.join("cdc-spill"),
        }
    }
}

/// Called with a project's id when its stream starts (the wiring starts its realtime room).
type StartHook = Box<dyn Fn(&str) + Send + Sync>;

/// What the streams read, shared by the service and its tasks. The streams publish through the
/// bus's traits (see crate::bus), so another transport can take the in-process one's place.
struct Sources<B: EventBus> {
    cluster: ClusterTarget,
    control: deadpool_postgres::Pool,
    bus: Arc<B>,
    secrets: Secrets,
    settings: StreamSettings,
    /// The cluster's WAL end (`pg_current_wal_lsn()`) for every stream's lag, read every
    /// [`LAG_CHECK`] by one task ([`watch_wal_end`]): the same for all projects, so no stream
    /// keeps a session of its own for it.
    wal_end: Mutex<Option<Lsn>>,
}

impl<B: EventBus> Sources<B> {
    fn replication_config(&self, db_name: &str) -> ConnectConfig {
        let mut options = Vec::new();
        if let Some(kb) = self.settings.decoding_work_mem_kb {
            options.push(("logical_decoding_work_mem".to_string(), format!("{kb}kB")));
        }
        ConnectConfig {
            host: self.cluster.host.clone(),
            port: self.cluster.port,
            user: self.cluster.admin_user.clone(),
            password: self.cluster.admin_password.clone(),
            database: db_name.to_string(),
            application_name: Some("fluxbase-cdc".into()),
            options,
            replication: false,
            connect_timeout: Duration::from_secs(10),
        }
    }
}

struct Handle {
    task: tokio::task::JoinHandle<()>,
    status: Arc<Mutex<StreamStatus>>,
}

/// The change streams of this server.
pub struct Cdc {
    sources: Arc<Sources<Bus>>,
    on_start: OnceLock<StartHook>,
    streams: Mutex<HashMap<String, Handle>>,
    enabled: std::sync::atomic::AtomicBool,
    /// Cluster mode: streams start only where this node leads the project
    /// ([`Cdc::lead`], called by the leadership loop), never from [`Cdc::start`].
    led: std::sync::atomic::AtomicBool,
    /// Where the streams run (see the module docs); made with the first stream.
    runtime: OnceLock<tokio::runtime::Runtime>,
    /// How MySQL projects' streams reach their server ([`Cdc::set_mysql_source`]).
    mysql: OnceLock<binlog::SourceProvider>,
}

impl Drop for Cdc {
    fn drop(&mut self) {
        if let Some(runtime) = self.runtime.take() {
            // Without waiting: the server may be dropped inside another runtime. The streams
            // end with it.
            runtime.shutdown_background();
        }
    }
}

impl Cdc {
    pub fn new(
        cluster: ClusterTarget,
        control: deadpool_postgres::Pool,
        bus: Arc<Bus>,
        secrets: Secrets,
        settings: StreamSettings,
    ) -> Cdc {
        Cdc {
            sources: Arc::new(Sources {
                cluster,
                control,
                bus,
                secrets,
                settings,
                wal_end: Mutex::new(None),
            }),
            on_start: OnceLock::new(),
            streams: Mutex::new(HashMap::new()),
            enabled: std::sync::atomic::AtomicBool::new(false),
            led: std::sync::atomic::AtomicBool::new(false),
            runtime: OnceLock::new(),
            mysql: OnceLock::new(),
        }
    }

    /// Sets how MySQL projects' binlog streams reach their server (once, by the wiring): asked
    /// at every (re)connection, so that the server may start (embedded) after the wiring.
    pub fn set_mysql_source(&self, provider: binlog::SourceProvider) {
        if self.mysql.set(provider).is_err() {
            tracing::warn!("the MySQL source of the binlog streams was already set");
        }
    }

    fn mysql_provider(&self) -> anyhow::Result<binlog::SourceProvider> {
        self.mysql
            .get()
            .cloned()
            .ok_or_else(|| anyhow::anyhow!("no MySQL server is configured for change capture"))
    }

    /// Records where a new MySQL project's stream starts: the server's end of log now (call
    /// it once the project database is provisioned, so that nothing after is missed and
    /// nothing of its provisioning is reported). A project that has a position keeps it. Read
    /// and stored under the lock a binlog purge takes ([`binlog::init_position`]).
    pub async fn init_binlog_position(&self, project_id: &str) -> anyhow::Result<()> {
        let source = (self.mysql_provider()?)().await?;
        let mut conn = mysql_async::Conn::new(source.opts.clone()).await?;
        let result = binlog::init_position(&self.sources.control, &mut conn, project_id).await;
        let _ = conn.disconnect().await;
        result.map_err(|e| anyhow::anyhow!("{e}"))
    }

    /// A MySQL project's stream (state `stopped` when none runs here) and its stored position
    /// (`slot`: present with `walStatus` `reserved`, or missing).
    pub async fn report_mysql(&self, project_id: &str) -> anyhow::Result<StatusReport> {
        let mut status = self.status(project_id).unwrap_or_else(|| StreamStatus {
            state: StreamState::Stopped,
            slot: binlog::slot_name(project_id),
            ..Default::default()
        });
        let control = self.sources.control.get().await?;
        let stored = binlog::position::load(&**control, project_id).await?;
        let slot = match stored {
            Some(s) => {
                if let Ok(lsn) = binlog::position::to_lsn(&s.position.file, s.position.offset) {
                    status.confirmed_lsn = Some(lsn.to_string());
                }
                SlotReport::Present {
                    name: status.slot.clone(),
                    wal_status: Some(
                        if status.state == StreamState::SlotLost {
                            "lost"
                        } else {
                            "reserved"
                        }
                        .into(),
                    ),
                    active: self.is_running(project_id),
                }
            }
            None => SlotReport::Missing {
                name: status.slot.clone(),
                missing: true,
            },
        };
        Ok(StatusReport {
            stream: status,
            slot,
        })
    }

    /// Sets what runs when a project's stream starts (once, by the wiring): the realtime room
    /// that stores the stream in its durable history from the start.
    pub fn on_stream_start(&self, hook: impl Fn(&str) + Send + Sync + 'static) {
        if self.on_start.set(Box::new(hook)).is_err() {
            tracing::warn!("the change streams' start hook was already set");
        }
    }

    /// The streams' runtime: half the cores, so that decoding keeps up with many busy projects
    /// without taking the cores the server needs for its clients; but at least two threads,
    /// so that on a small machine one stream's long stretch (see [`blocking`]) never leaves the
    /// others without a worker meanwhile (red team rt5: on one thread, a 320 MB MySQL row held
    /// back every PostgreSQL project's stream for a minute, their walsenders timed out).
    fn runtime(&self) -> std::io::Result<tokio::runtime::Handle> {
        if let Some(rt) = self.runtime.get() {
            return Ok(rt.handle().clone());
        }
        let threads = std::thread::available_parallelism().map_or(2, |n| (n.get() / 2).max(2));
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(threads)
            .thread_name("fluxbase-cdc")
            .enable_all()
            .build()?;
        // Another caller may have made one meanwhile: theirs is kept, this one dropped.
        match self.runtime.set(rt) {
            Ok(()) => {
                let rt = self.runtime.get().expect("set above");
                rt.spawn(watch_wal_end(Arc::downgrade(&self.sources)));
            }
            Err(rt) => rt.shutdown_background(),
        }
        Ok(self.runtime.get().expect("set above").handle().clone())
    }

    pub fn status(&self, project_id: &str) -> Option<StreamStatus> {
        let streams = self.streams.lock().expect("poisoned");
        streams
            .get(project_id)
            .map(|h| h.status.lock().expect("poisoned").clone())
    }

    /// What realtime tells a project's subscribers while its changes are not arriving from its
    /// stream on this server (`None`: they are, or no stream runs here): the stream reconnecting
    /// (the database restarting, no walsender or connection free: nothing is lost, the slot
    /// keeps the changes), or stopped for good (its slot lost: changes may be lost; or failed).
    /// Cheap enough for every realtime batch: one lock, no allocation while streaming.
    pub fn delayed(&self, project_id: &str) -> Option<String> {
        let streams = self.streams.lock().expect("poisoned");
        let state = streams
            .get(project_id)?
            .status
            .lock()
            .expect("poisoned")
            .state;
        let message = match state {
            StreamState::Reconnecting => {
                "Changes are delayed: the change stream is reconnecting to the project's \
                 database. Nothing is lost; they arrive when it is back."
            }
            StreamState::SlotLost => {
                "Changes stopped: the project's change stream lost its replication slot, so \
                 changes committed since may be lost. It stays stopped until it is started again."
            }
            StreamState::Failed => {
                "Changes stopped: the project's change stream failed. It stays stopped until it \
                 is started again."
            }
            StreamState::Starting | StreamState::Streaming | StreamState::Stopped => return None,
        };
        Some(message.to_string())
    }

    /// True while the project's stream task runs here (streaming, or waiting to retry); false
    /// once it has ended (stopped on a definite error, or never started).
    pub fn is_running(&self, project_id: &str) -> bool {
        let streams = self.streams.lock().expect("poisoned");
        streams
            .get(project_id)
            .is_some_and(|h| !h.task.is_finished())
    }

    pub fn all_status(&self) -> Vec<(String, StreamStatus)> {
        let streams = self.streams.lock().expect("poisoned");
        streams
            .iter()
            .map(|(k, h)| (k.clone(), h.status.lock().expect("poisoned").clone()))
            .collect()
    }

    /// Stops every stream (shutdown, or simulated crash in tests): nothing more is confirmed.
    pub fn stop_all(&self) {
        for (_, h) in self.streams.lock().expect("poisoned").drain() {
            h.task.abort();
        }
    }

    /// Creates the project's slot if change capture has none yet and records it.
    pub async fn ensure_slot(&self, project_id: &str, db_name: &str) -> anyhow::Result<()> {
        let control = self.sources.control.get().await?;
        if crate::control::projects::slot(&control, project_id)
            .await?
            .is_some()
        {
            return Ok(());
        }
        let slot = slot_name(project_id);
        let admin = self.sources.cluster.connect(db_name).await?;
        let exists = admin
            .query_opt(
                "SELECT 1 FROM pg_replication_slots WHERE slot_name = $1",
                &[&slot],
            )
            .await?
            .is_some();
        if !exists {
            admin
                .query(
                    "SELECT pg_create_logical_replication_slot($1, 'pgoutput')",
                    &[&slot],
                )
                .await?;
            tracing::info!(project_id, slot, "created replication slot");
        }
        crate::control::projects::set_slot(&control, project_id, &slot).await?;
        Ok(())
    }

    /// Cluster mode: streams run only where the leadership loop starts them ([`Cdc::lead`]).
    pub fn set_led(&self) {
        self.led.store(true, std::sync::atomic::Ordering::Release);
    }

    /// Cluster mode: starts the stream of a project this node now leads.
    pub fn lead(&self, project_id: String, db_name: String, engine: Engine) {
        self.start_stream(project_id, db_name, engine)
    }

    /// Starts change streams for every project (called when the server starts serving); in
    /// cluster mode, none: the leadership loop starts those this node leads. Every project,
    /// whatever its status or engine ([`crate::control::projects::streamed`]).
    pub async fn start_all(&self) -> anyhow::Result<()> {
        self.enabled
            .store(true, std::sync::atomic::Ordering::Release);
        if self.led.load(std::sync::atomic::Ordering::Acquire) {
            return Ok(());
        }
        let control = self.sources.control.get().await?;
        for (id, db_name, engine) in crate::control::projects::streamed(&control).await? {
            self.start(id, db_name, engine);
        }
        Ok(())
    }

    /// Starts the change stream of one project, chosen by its engine: PostgreSQL's logical
    /// replication (this module) or the MySQL binlog ([`binlog`]). A no-op if it runs or if
    /// streams are disabled; in cluster mode too: the leadership loop decides ([`Cdc::lead`]).
    pub fn start(&self, project_id: String, db_name: String, engine: Engine) {
        if self.led.load(std::sync::atomic::Ordering::Acquire) {
            return;
        }
        self.start_stream(project_id, db_name, engine)
    }

    fn start_stream(&self, project_id: String, db_name: String, engine: Engine) {
        if !self.enabled.load(std::sync::atomic::Ordering::Acquire) {
            return;
        }
        // A MySQL project's stream needs the way to its server, asked at each connection.
        let mysql = match engine {
            Engine::Postgresql => None,
            Engine::Mysql => match self.mysql_provider() {
                Ok(p) => Some(p),
                Err(e) => {
                    tracing::error!(project_id, error = %e, "a MySQL project's stream cannot start");
                    return;
                }
            },
        };
        let mut streams = self.streams.lock().expect("poisoned");
        if streams
            .get(&project_id)
            .is_some_and(|h| !h.task.is_finished())
        {
            return;
        }
        let status = Arc::new(Mutex::new(StreamStatus {
            state: StreamState::Starting,
            slot: match engine {
                Engine::Postgresql => slot_name(&project_id),
                Engine::Mysql => binlog::slot_name(&project_id),
            },
            ..Default::default()
        }));
        if let Some(hook) = self.on_start.get() {
            hook(&project_id);
        }
        let runtime = match self.runtime() {
            Ok(r) => r,
            Err(e) => {
                tracing::error!(project_id, error = %e, "starting the change streams' runtime");
                return;
            }
        };
        let sources = self.sources.clone();
        let (id, st) = (project_id.clone(), status.clone());
        let task = match mysql {
            None => runtime.spawn(run_stream(sources, id, db_name, st)),
            Some(source) => runtime.spawn(binlog::run_stream(sources, source, id, db_name, st)),
        };
        streams.insert(project_id, Handle { task, status });
    }

    /// Stops a project's stream and waits for it to end.
    pub async fn stop(&self, project_id: &str) {
        let handle = self.streams.lock().expect("poisoned").remove(project_id);
        if let Some(h) = handle {
            h.task.abort();
            let _ = h.task.await;
        }
        // What the stream spilled is never read again (a stream starts by emptying it), and a
        // deleted project's directory would stay for good (red team rt7).
        let spill = self.sources.settings.spill_dir.join(project_id);
        if let Err(e) = std::fs::remove_dir_all(&spill) {
            if e.kind() != std::io::ErrorKind::NotFound {
                tracing::warn!(project_id, error = %e, "could not remove the stream's spill directory");
            }
        }
    }

    /// The stream of a project (state `stopped` when none runs here) and its slot, with the
    /// confirmed position and lag read from the project database now.
    pub async fn report(&self, project_id: &str, db_name: &str) -> anyhow::Result<StatusReport> {
        let mut status = self.status(project_id).unwrap_or_else(|| StreamStatus {
            state: StreamState::Stopped,
            slot: slot_name(project_id),
            ..Default::default()
        });
        let admin = self.sources.cluster.connect(db_name).await?;
        let slot = admin
            .query_opt(
                "SELECT confirmed_flush_lsn::text, wal_status, active,
                        (pg_current_wal_lsn() - confirmed_flush_lsn)::int8, pg_current_wal_lsn()::text
                 FROM pg_replication_slots WHERE slot_name = $1",
                &[&status.slot],
            )
            .await?;
        let slot = match &slot {
            Some(r) => {
                status.confirmed_lsn = r.get(0);
                status.lag_bytes = r.get::<_, Option<i64>>(3).map(|b| b.max(0) as u64);
                status.server_lsn = r.get(4);
                SlotReport::Present {
                    name: status.slot.clone(),
                    wal_status: r.get(1),
                    active: r.get(2),
                }
            }
            None => SlotReport::Missing {
                name: status.slot.clone(),
                missing: true,
            },
        };
        Ok(StatusReport {
            stream: status,
            slot,
        })
    }
}

#[derive(Debug, thiserror::Error)]
enum StreamError {
    #[error("{0}")]
    Replication(#[from] fluxbase_replication::client::ReplicationError),
    #[error("decoding pgoutput: {0}")]
    Decode(#[from] pgoutput::DecodeError),
    #[error("{0}")]
    Assemble(#[from] assemble::AssembleError),
    #[error("{0}")]
    Wire(#[from] fluxbase_replication::wire::WireError),
    #[error(
        "the replication slot {0} is gone: changes since its last confirmed position may be lost"
    )]
    SlotLost(String),
    #[error("rewinding to the slot's confirmed position")]
    Rewind,
    #[error("the server ended the replication stream")]
    Ended,
    #[error("reading the slot's state from the control database: {0}")]
    Control(String),
}

impl StreamError {
    /// Transient: reconnecting later may work, so the stream retries with backoff. Definite: the
    /// same error would come back on every attempt (a dropped slot or publication, refused
    /// authentication or permission, a message this decoder cannot read), so the stream stops
    /// and reports it instead of looping. The server's errors are transient unless known to be
    /// definite ([`definite_wire_error`]).
    fn is_transient(&self) -> bool {
        match self {
            StreamError::Replication(ReplicationError::Wire(e)) | StreamError::Wire(e) => {
                !definite_wire_error(e)
            }
            StreamError::Replication(_) => false,
            // The spill directory: a full disk may be freed.
            StreamError::Assemble(assemble::AssembleError::Spill(_)) => true,
            // The server closed the stream (a shutdown): it resumes from the slot.
            StreamError::Ended | StreamError::Rewind | StreamError::Control(_) => true,
            StreamError::Decode(_) | StreamError::Assemble(_) | StreamError::SlotLost(_) => false,
        }
    }
}

/// The server's errors that the same attempt would meet again however long the stream waits:
/// refused authentication (class 28) or privilege (42501), a missing object such as the
/// publication (42704; a missing slot is [`StreamError::SlotLost`], caught before), a feature the
/// server does not offer (0A000), `wal_level` below `logical` (55000), and answers this client
/// cannot read. Everything else the server says is retried with backoff: a full disk (53100) or
/// memory (53200), a cancelled statement (57014), a standby answering during a failover (55000
/// "in recovery", 25006, 40001), a database being recreated (3D000), the server restarting
/// (57P0x) or out of connections (53300), a lost connection (class 08, I/O, timeout): each of
/// them clears by itself, and a stream that stopped on them would pin the slot's WAL for good.
fn definite_wire_error(e: &WireError) -> bool {
    match e {
        WireError::Io(_) | WireError::Closed | WireError::Timeout => false,
        WireError::Db(db) => {
            let code = db.code.as_str();
            code.starts_with("28")
                || matches!(code, "42501" | "42704" | "0A000")
                || (code == "55000" && db.message.contains("wal_level"))
        }
        WireError::Protocol(_) | WireError::Auth(_) | WireError::InvalidInput(_) => true,
    }
}

async fn run_stream<B: EventBus>(
    sources: Arc<Sources<B>>,
    project_id: String,
    db_name: String,
    status: Arc<Mutex<StreamStatus>>,
) {
    // The user-defined types of the project's tables, learned as relations arrive; kept across
    // reconnects.
    let types = RwLock::new(TypeRegistry::new());
    let mut backoff = Duration::from_millis(500);
    loop {
        let result = stream_once(&sources, &project_id, &db_name, &types, &status).await;
        match result {
            Ok(()) => return,
            Err(StreamError::Rewind) => {
                tracing::info!(
                    project_id,
                    "change stream rewinding to the slot's confirmed position"
                );
                backoff = Duration::from_millis(500);
                continue;
            }
            Err(e) if e.is_transient() => {
                tracing::warn!(project_id, error = %e, retry_in = ?backoff, "change stream interrupted");
                {
                    let mut s = status.lock().expect("poisoned");
                    s.state = StreamState::Reconnecting;
                    s.last_error = Some(e.to_string());
                    s.reconnects += 1;
                }
                tokio::time::sleep(backoff).await;
                backoff = (backoff * 2).min(Duration::from_secs(15));
            }
            Err(e) => {
                let state = match e {
                    StreamError::SlotLost(_) => StreamState::SlotLost,
                    _ => StreamState::Failed,
                };
                tracing::error!(project_id, error = %e, ?state, "change stream stopped");
                let mut s = status.lock().expect("poisoned");
                s.state = state;
                s.last_error = Some(e.to_string());
                return;
            }
        }
    }
}

/// How often the streams' lag (the cluster's WAL end against each slot's confirmed position)
/// is refreshed.
const LAG_CHECK: Duration = Duration::from_secs(5);

/// Reads the cluster's WAL end every [`LAG_CHECK`] through the control pool, for as long as the
/// streams' service lives.
async fn watch_wal_end<B: EventBus>(sources: std::sync::Weak<Sources<B>>) {
    loop {
        let Some(s) = sources.upgrade() else { return };
        let read = async {
            let c = s.control.get().await.ok()?;
            let row = c
                .query_one("SELECT pg_current_wal_lsn()::text", &[])
                .await
                .ok()?;
            row.get::<_, String>(0).parse::<Lsn>().ok()
        };
        if let Some(lsn) = read.await {
            *s.wal_end.lock().expect("poisoned") = Some(lsn);
        }
        drop(s);
        tokio::time::sleep(LAG_CHECK).await;
    }
}

/// A message, event or transaction at least this large is handled in [`blocking`]: below it the
/// work is short and handing the worker over would cost more than it saves.
pub(crate) const HEAVY_BYTES: usize = 1 << 20;

/// Runs a long synchronous stretch of a stream (rendering a huge row, writing or reading back a
/// spilled transaction) without holding a worker of the streams' runtime: the worker's other
/// streams move to another thread meanwhile, so one tenant's huge transaction never holds back
/// another tenant's events or its walsender's keepalive replies. On the streams' (multi-thread)
/// runtime only; elsewhere (unit tests, a current-thread runtime), and when already inside
/// such a stretch, `f` just runs.
pub(crate) fn blocking<R>(f: impl FnOnce() -> R) -> R {
    match tokio::runtime::Handle::try_current() {
        Ok(h) if h.runtime_flavor() == tokio::runtime::RuntimeFlavor::MultiThread => {
            tokio::task::block_in_place(f)
        }
        _ => f(),
    }
}

/// [`blocking`] when `heavy`, else `f` right here.
pub(crate) fn blocking_if<R>(heavy: bool, f: impl FnOnce() -> R) -> R {
    if heavy {
        blocking(f)
    } else {
        f()
    }
}

fn lsn_of(s: &Option<String>) -> Option<Lsn> {
    s.as_deref().and_then(|v| v.parse().ok())
}

async fn stream_once<B: EventBus>(
    sources: &Sources<B>,
    project_id: &str,
    db_name: &str,
    types: &RwLock<TypeRegistry>,
    status: &Mutex<StreamStatus>,
) -> Result<(), StreamError> {
    let cfg = sources.replication_config(db_name);
    let bus = sources.bus.channel(project_id);
    let bound = sources.settings.buffer_bytes;
    let spill_dir = sources.settings.spill_dir.join(project_id);
    let key = message_key(&sources.secrets, project_id);
    let _ = std::fs::remove_dir_all(&spill_dir);
    let slot = slot_name(project_id);
    // Rewinds requested before this point are served by starting from the slot now; the
    // durable subscribers that asked for them receive events from this pass on.
    let generation = bus.start_pass();

    // The slot's health, from the cluster's view (the control pool: a stream keeps no session
    // of its own besides its walsender, so projects do not spend the cluster's connections).
    let wal_status = {
        let control = sources
            .control
            .get()
            .await
            .map_err(|e| StreamError::Control(e.to_string()))?;
        control
            .query_opt(
                "SELECT wal_status FROM pg_catalog.pg_replication_slots WHERE slot_name = $1",
                &[&slot],
            )
            .await
            .map_err(|e| StreamError::Control(e.to_string()))?
            .map(|r| r.get::<_, Option<String>>(0))
    };
    match wal_status {
        None => return Err(StreamError::SlotLost(slot)),
        Some(Some(s)) if s == "lost" => return Err(StreamError::SlotLost(slot)),
        Some(_) => {}
    }

    let client = ReplicationClient::connect(&cfg).await?;
    let options = PgOutputOptions {
        proto_version: 2,
        publication_names: vec![PUBLICATION.to_string()],
        messages: true,
        streaming: true,
        binary: false,
    };
    let mut stream = match client
        .start(&slot, Lsn(0), &options, Duration::from_secs(10))
        .await
    {
        Ok(s) => s,
        Err(e) if e.is_slot_gone() => return Err(StreamError::SlotLost(format!("{slot} ({e})"))),
        Err(e) => return Err(e.into()),
    };
    {
        let mut s = status.lock().expect("poisoned");
        s.state = StreamState::Streaming;
        s.last_error = None;
    }
    tracing::info!(project_id, slot, "change stream started");

    let mut ctx = DecodeContext::new(options.proto_version);
    let mut asm = assemble::Assembler::new(bound, &spill_dir)
        .with_message_key(&key)
        .with_max_row_bytes(sources.settings.max_row_bytes);
    let mut tick = tokio::time::interval(Duration::from_millis(500));
    let mut lag_check = Instant::now();
    let mut received = Lsn(0);
    loop {
        tokio::select! {
            event = stream.next() => {
                let event = match event {
                    Ok(Some(e)) => e,
                    Ok(None) => return Err(StreamError::Ended),
                    Err(e) if e.is_slot_gone() => return Err(StreamError::SlotLost(format!("{slot} ({e})"))),
                    Err(e) => return Err(e.into()),
                };
                match event {
                    ReplicationEvent::XLogData { wal_end, data, .. } => {
                        // A change carrying a huge row: decoded and rendered off the worker.
                        let heavy = data.len() >= HEAVY_BYTES;
                        let msg = pgoutput::decode(data, ctx)?;
                        ctx.observe(&msg);
                        if let LogicalReplicationMessage::Relation(r) = &msg {
                            let oids: Vec<u32> = r.columns.iter().map(|c| c.type_id).collect();
                            // Not learned, its values would render wrong: the stream retries instead.
                            // From the project's catalog, on a session opened for it.
                            crate::catalog::learn_types_connecting(&cfg, types, &oids).await?;
                        }
                        let rejected = asm.rejected_messages();
                        let spilled = asm.spilled_bytes();
                        let committed = {
                            let reg = types.read().expect("poisoned");
                            blocking_if(heavy, || asm.handle(msg, &reg))?
                        };
                        if asm.rejected_messages() > rejected {
                            status.lock().expect("poisoned").rejected_messages +=
                                asm.rejected_messages() - rejected;
                        }
                        if asm.spilled_bytes() > spilled {
                            status.lock().expect("poisoned").spilled_bytes +=
                                asm.spilled_bytes() - spilled;
                        }
                        received = wal_end;
                        if let Some(tx) = committed {
                            release(&*bus, tx, status).await?;
                            status.lock().expect("poisoned").received_lsn = Some(received.to_string());
                        }
                    }
                    ReplicationEvent::Keepalive { wal_end, .. } => {
                        // Nothing in flight: an idle database must not pin WAL.
                        if asm.idle() && bus.all_acked() && wal_end > stream.confirmed() {
                            stream.confirm(wal_end);
                            stream.send_status(false).await?;
                        }
                    }
                }
            }
            _ = tick.tick() => {
                if let Some(lsn) = bus.confirmable() {
                    if lsn > stream.confirmed() {
                        stream.confirm(lsn);
                        // Tell the server now: WAL is released sooner and less is replayed
                        // after a crash.
                        stream.send_status(false).await?;
                    }
                }
                {
                    let mut s = status.lock().expect("poisoned");
                    if received > Lsn(0) {
                        // Each commit reports it too; not every message (a lock and a String).
                        s.received_lsn = Some(received.to_string());
                    }
                    s.confirmed_lsn = Some(stream.confirmed().to_string());
                    s.buffered_bytes = asm.memory() as u64;
                    s.peak_buffered_bytes = asm.peak_memory() as u64;
                }
                if lag_check.elapsed() > LAG_CHECK {
                    lag_check = Instant::now();
                    let server = *sources.wal_end.lock().expect("poisoned");
                    if let Some(server) = server {
                        let mut s = status.lock().expect("poisoned");
                        if let Some(conf) = lsn_of(&s.confirmed_lsn) {
                            s.lag_bytes = Some(server.0.saturating_sub(conf.0));
                        }
                        s.server_lsn = Some(server.to_string());
                    }
                }
            }
            _ = bus.rewind_requested() => {
                if bus.rewind_generation() != generation {
                    return Err(StreamError::Rewind);
                }
            }
        }
    }
}

/// Events of a transaction finished and handed to the bus at a time: the bus then waits for
/// room in a durable subscriber's queue once per run rather than once per event, and a
/// subscriber woken for the first finds the rest queued. Bounds the memory held meanwhile (a
/// spilled transaction is read back this many events at a time).
const PUBLISH_RUN: usize = 256;
/// A run also ends once its events' payloads reach this many bytes (after at least one event):
/// 256 rows near `cdc_max_row_bytes` would be 4 GiB read back from a spill file at once.
const PUBLISH_RUN_BYTES: usize = 4 << 20;

/// Publishes a committed transaction's events in order.
async fn release<C: ProjectChannel>(
    bus: &C,
    tx: assemble::Committed,
    status: &Mutex<StreamStatus>,
) -> Result<(), StreamError> {
    let commit_time: Arc<str> = Arc::from(events::commit_time(tx.commit_timestamp));
    // Reading a spilled transaction back and finishing huge rows' events: off the worker, a
    // run at a time (see [`blocking`]).
    let heavy = tx.changes.is_spilled() || tx.changes.memory() >= HEAVY_BYTES;
    let mut iter = blocking_if(heavy, || tx.changes.drain())
        .map_err(assemble::AssembleError::Spill)?
        .peekable();
    let mut index = 0u32;
    let mut count = 0u64;
    let mut bytes = 0u64;
    let mut done = false;
    while !done {
        let run = blocking_if(heavy, || {
            let mut run: Vec<Arc<Event>> = Vec::new();
            let mut run_bytes = 0;
            while let Some(p) = iter.next() {
                let p = p.map_err(assemble::AssembleError::Spill)?;
                let last = iter.peek().is_none();
                if run.capacity() == 0 {
                    run.reserve_exact(if last { 1 } else { PUBLISH_RUN });
                }
                let event = events::finish(p, tx.commit_lsn, tx.end_lsn, index, &commit_time, last);
                bytes += event.payload.len() as u64;
                run_bytes += event.held_bytes();
                run.push(Arc::new(event));
                index += 1;
                if last || run.len() == PUBLISH_RUN || run_bytes >= PUBLISH_RUN_BYTES {
                    done = last;
                    return Ok::<_, StreamError>(run);
                }
            }
            done = true;
            Ok(run)
        })?;
        if !run.is_empty() {
            bus.publish_batch(&run).await;
            count += run.len() as u64;
        }
        if !done {
            // Let the other streams on this runtime read during a large transaction.
            tokio::task::yield_now().await;
        }
    }
    // Each transaction spends a unit of tokio's cooperative budget, so that a stream catching
    // up yields now and then to the other streams on its runtime.
    tokio::task::coop::consume_budget().await;
    let now_micros = chrono::Utc::now().timestamp_micros();
    let mut s = status.lock().expect("poisoned");
    s.events += count;
    s.transactions += 1;
    // The newest, not the last: a rewind replays older transactions.
    s.note_own(tx.end_lsn.0, bytes);
    if count > 0 {
        s.last_event_at =
            Some(chrono::Utc::now().to_rfc3339_opts(chrono::SecondsFormat::Millis, true));
        s.lag_seconds =
            Some((now_micros - tx.commit_timestamp.to_unix_micros()).max(0) as f64 / 1e6);
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    /// What a project sees of its stream never moves with the shared log: a stored position
    /// that followed other tenants' writes shows as the newest own transaction it covers, and
    /// the lag is the own payload bytes not stored (also across a binary log's files, whose
    /// positions do not subtract), never a distance in the log.
    #[test]
    fn the_project_view_counts_only_the_projects_own_transactions() {
        use super::{Lsn, StreamStatus};
        let view = |s: &StreamStatus| {
            let v = s.clone().project_view();
            (v.confirmed_lsn, v.received_lsn, v.lag_bytes, v.server_lsn)
        };
        let at = |l: u64| Some(Lsn(l).to_string());
        let mut s = StreamStatus {
            confirmed_lsn: at(1_000),
            server_lsn: at(9_000),
            ..Default::default()
        };
        assert_eq!(view(&s), (None, None, None, None), "nothing own yet");
        s.note_own(2_000, 300);
        // Stored still at an older heartbeat's position (others' writes since): not shown.
        assert_eq!(view(&s), (None, at(2_000), Some(300), None));
        s.note_own(5_000, 200);
        s.confirmed_lsn = at(3_000); // covers the first only
        assert_eq!(view(&s), (at(2_000), at(5_000), Some(200), None));
        s.confirmed_lsn = at(8_000); // past both, following the log's end
        assert_eq!(view(&s), (at(5_000), at(5_000), Some(0), None));
        // A rewind replays an older transaction: counted once.
        s.note_own(5_000, 200);
        assert_eq!(view(&s), (at(5_000), at(5_000), Some(0), None));
        // Binary log positions of two files ((file << 32) | offset): bytes, not 4 GiB.
        let (f1, f2) = ((1u64 << 32) | 4_000, (2u64 << 32) | 100);
        let mut m = StreamStatus {
            confirmed_lsn: at(f1),
            ..Default::default()
        };
        m.note_own(f2, 512);
        assert_eq!(view(&m).2, Some(512));
        // Bounded: past the list's size the oldest merge, bytes kept.
        for i in 0..(super::OWN_UNSTORED as u64 + 10) {
            m.note_own(f2 + 1 + i, 1);
        }
        assert!(m.own_unstored.len() <= super::OWN_UNSTORED);
        assert_eq!(view(&m).2, Some(512 + super::OWN_UNSTORED as u64 + 10));
    }

    use fluxbase_replication::wire::{DbError, Phase};

    use super::*;

    #[test]
    fn stream_states_are_reported_by_their_names() {
        for (state, name) in [
            (StreamState::Starting, "starting"),
            (StreamState::Streaming, "streaming"),
            (StreamState::Reconnecting, "reconnecting"),
            (StreamState::SlotLost, "slot_lost"),
            (StreamState::Failed, "failed"),
            (StreamState::Stopped, "stopped"),
        ] {
            assert_eq!(serde_json::to_value(state).unwrap(), name);
            assert_eq!(state.is_failed(), matches!(name, "slot_lost" | "failed"));
        }
    }

    fn db(code: &str, message: &str, phase: Phase) -> WireError {
        WireError::Db(Box::new(DbError {
            severity: "FATAL".into(),
            code: code.into(),
            message: message.into(),
            detail: None,
            hint: None,
            position: None,
            internal_position: None,
            internal_query: None,
            where_: None,
            schema: None,
            table: None,
            column: None,
            datatype: None,
            constraint: None,
            phase,
        }))
    }

    #[test]
    fn stream_errors_are_transient_or_definite() {
        let transient = [
            StreamError::Replication(ReplicationError::Wire(WireError::Closed)),
            StreamError::Wire(WireError::Timeout),
            StreamError::Wire(db(
                "57P03",
                "the database system is starting up",
                Phase::Startup,
            )),
            StreamError::Replication(ReplicationError::Wire(db(
                "57P01",
                "terminating connection due to administrator command",
                Phase::Query,
            ))),
            // This stream's previous walsender, not yet gone.
            StreamError::Replication(ReplicationError::Wire(db(
                "55006",
                "replication slot \"fluxbase_p\" is active for PID 42",
                Phase::Query,
            ))),
            StreamError::Assemble(assemble::AssembleError::Spill(std::io::Error::other(
                "full",
            ))),
            StreamError::Ended,
            // Conditions that clear by themselves: a full disk on the server, a cancelled
            // statement, a standby answering during a failover, a database being recreated.
            StreamError::Wire(db("53100", "could not write to file", Phase::Query)),
            StreamError::Wire(db("57014", "canceling statement", Phase::Query)),
            StreamError::Replication(ReplicationError::Wire(db(
                "55000",
                "logical decoding cannot be used while in recovery",
                Phase::Query,
            ))),
            StreamError::Wire(db("3D000", "database does not exist", Phase::Startup)),
        ];
        for e in &transient {
            assert!(e.is_transient(), "{e}");
        }
        let definite = [
            StreamError::SlotLost("fluxbase_p".into()),
            StreamError::Replication(ReplicationError::Wire(db(
                "42704",
                "publication \"fluxbase_changes\" does not exist",
                Phase::Query,
            ))),
            StreamError::Wire(db(
                "28P01",
                "password authentication failed for user \"fx\"",
                Phase::Startup,
            )),
            StreamError::Wire(db(
                "42501",
                "permission denied to start WAL sender",
                Phase::Startup,
            )),
            StreamError::Wire(WireError::Auth("unsupported method".into())),
            StreamError::Replication(ReplicationError::Wire(WireError::Protocol("x".into()))),
            StreamError::Assemble(assemble::AssembleError::UnknownRelation("INSERT", 7)),
            StreamError::Wire(db(
                "55000",
                "logical decoding requires wal_level >= logical",
                Phase::Query,
            )),
        ];
        for e in &definite {
            assert!(!e.is_transient(), "{e}");
        }
    }
}
