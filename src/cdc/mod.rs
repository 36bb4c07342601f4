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
//! * **Health.** Connection losses are retried with backoff; an idle database does not pin WAL
//!   (a keepalive's position is confirmed when nothing is in flight); a missing or invalidated
//!   slot stops the stream with a loud error (state `slot_lost`) instead of silently skipping.
//!
//! The streams run on a runtime of their own (threads `fluxbase-cdc`), not among the HTTP,
//! WebSocket and webhook tasks. On a shared worker a stream had to choose: yield after each
//! transaction and wait behind every socket writer its event woke (realtime read the WAL
//! 15–45 ms late), or keep the worker and leave the consumer it woke parked in that worker's
//! LIFO slot, which no other worker may steal (webhook deliveries waited up to 0.7 s). From a
//! thread of its own, each wake-up reaches the server's runtime through its shared queue, where
//! any idle worker takes it, and the stream reads on while they run.

pub mod assemble;
pub mod events;
pub mod names;

use std::collections::HashMap;
use std::sync::{Arc, Mutex, Weak};
use std::time::{Duration, Instant};

use fluxbase_replication::client::{PgOutputOptions, ReplicationClient, ReplicationEvent};
use fluxbase_replication::pgoutput::{self, DecodeContext, LogicalReplicationMessage, Lsn};
use fluxbase_replication::wire::{ConnectConfig, Connection};
use serde::Serialize;
use serde_json::{json, Value};

use crate::api::error::ApiResult;
use crate::app::App;
use crate::auth::Access;
use crate::bus::ProjectBus;
use crate::db::quote_literal;

pub const PUBLICATION: &str = "fluxbase_changes";

pub fn slot_name(project_id: &str) -> String {
    format!("fluxbase_{project_id}")
}

/// The HMAC-SHA256 key of a project's `fluxbase.*` messages: the server's own emitters
/// (`fluxbase_cdc.emit`, sql/project/0005_sandbox.sql) prefix each message with
/// `hex(HMAC(key, prefix || "\n" || body))`; the stream drops any message without it.
pub fn message_key(secrets: &crate::secrets::Secrets, project_id: &str) -> [u8; 32] {
    let hex_key = secrets.derive(&format!("cdc-messages:{project_id}"));
    let mut key = [0u8; 32];
    hex::decode_to_slice(hex_key, &mut key).expect("derive returns 32 bytes of hex");
    key
}

/// What `/api/cdc/status` and `/metrics` report for a stream.
#[derive(Clone, Debug, Serialize, Default)]
#[serde(rename_all = "camelCase")]
pub struct StreamStatus {
    /// starting, streaming, reconnecting, slot_lost, stopped
    pub state: String,
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
    /// `fluxbase.*` logical decoding messages dropped because the server did not emit them
    /// (no valid tag): forgeries, or messages from before the tags existed.
    pub rejected_messages: u64,
}

struct Handle {
    task: tokio::task::JoinHandle<()>,
    status: Arc<Mutex<StreamStatus>>,
}

/// The change streams of this server.
#[derive(Default)]
pub struct Cdc {
    streams: Mutex<HashMap<String, Handle>>,
    enabled: std::sync::atomic::AtomicBool,
    /// Where the streams run (see the module docs); made with the first stream.
    runtime: std::sync::OnceLock<tokio::runtime::Runtime>,
}

impl Drop for Cdc {
    fn drop(&mut self) {
        if let Some(runtime) = self.runtime.take() {
            // Without waiting: the server may be dropped inside another runtime.
            runtime.shutdown_background();
        }
    }
}

impl Cdc {
    /// The streams' runtime: half the cores (at least one thread), so that decoding keeps up
    /// with many busy projects without taking the cores the server needs for its clients.
    fn runtime(&self) -> std::io::Result<tokio::runtime::Handle> {
        if let Some(rt) = self.runtime.get() {
            return Ok(rt.handle().clone());
        }
        let threads = std::thread::available_parallelism().map_or(1, |n| (n.get() / 2).max(1));
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(threads)
            .thread_name("fluxbase-cdc")
            .enable_all()
            .build()?;
        // Another caller may have made one meanwhile: theirs is kept, this one dropped.
        if let Err(rt) = self.runtime.set(rt) {
            rt.shutdown_background();
        }
        Ok(self.runtime.get().expect("set above").handle().clone())
    }

    pub fn status(&self, project_id: &str) -> Option<StreamStatus> {
        let streams = self.streams.lock().expect("poisoned");
        streams
            .get(project_id)
            .map(|h| h.status.lock().expect("poisoned").clone())
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
}

impl App {
    fn replication_config(&self, db_name: &str) -> ConnectConfig {
        let mut options = Vec::new();
        if let Some(kb) = self.config.cdc_decoding_work_mem_kb {
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

    /// Creates the project's slot if change capture has none yet and records it.
    pub async fn ensure_slot(&self, project_id: &str, db_name: &str) -> anyhow::Result<()> {
        let control = self.control.get().await?;
        let recorded: Option<String> = control
            .query_one(
                "SELECT cdc_slot FROM fluxbase.projects WHERE id = $1",
                &[&project_id],
            )
            .await?
            .get(0);
        if recorded.is_some() {
            return Ok(());
        }
        let slot = slot_name(project_id);
        let admin = self.cluster.connect(db_name).await?;
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
        control
            .execute(
                "UPDATE fluxbase.projects SET cdc_slot = $2 WHERE id = $1",
                &[&project_id, &slot],
            )
            .await?;
        Ok(())
    }

    /// Starts change streams for every project (called when the server starts serving).
    pub async fn start_change_streams(self: &Arc<App>) -> anyhow::Result<()> {
        self.cdc
            .enabled
            .store(true, std::sync::atomic::Ordering::Release);
        let rows = self
            .control
            .get()
            .await?
            .query(
                "SELECT id, db_name FROM fluxbase.projects ORDER BY created_at",
                &[],
            )
            .await?;
        for r in rows {
            self.start_change_stream(r.get(0), r.get(1));
        }
        Ok(())
    }

    /// Starts the change stream of one project (no-op if running or if streams are disabled).
    pub fn start_change_stream(self: &Arc<App>, project_id: String, db_name: String) {
        if !self.cdc.enabled.load(std::sync::atomic::Ordering::Acquire) {
            return;
        }
        let mut streams = self.cdc.streams.lock().expect("poisoned");
        if streams
            .get(&project_id)
            .is_some_and(|h| !h.task.is_finished())
        {
            return;
        }
        let status = Arc::new(Mutex::new(StreamStatus {
            state: "starting".into(),
            slot: slot_name(&project_id),
            ..Default::default()
        }));
        // The room stores the stream in the durable resume history from the start.
        self.start_room(&project_id);
        let runtime = match self.cdc.runtime() {
            Ok(r) => r,
            Err(e) => {
                tracing::error!(project_id, error = %e, "starting the change streams' runtime");
                return;
            }
        };
        let task = runtime.spawn(run_stream(
            Arc::downgrade(self),
            project_id.clone(),
            db_name,
            status.clone(),
        ));
        streams.insert(project_id, Handle { task, status });
    }

    /// Stops a project's stream and waits for it to end.
    pub async fn stop_change_stream(&self, project_id: &str) {
        let handle = self
            .cdc
            .streams
            .lock()
            .expect("poisoned")
            .remove(project_id);
        if let Some(h) = handle {
            h.task.abort();
            let _ = h.task.await;
        }
    }

    /// `GET /api/cdc/status?projectId=`.
    pub async fn cdc_status(&self, access: &Access) -> ApiResult<(warp::http::StatusCode, Value)> {
        let project_id = &access.project.id;
        let mut status = self.cdc.status(project_id).unwrap_or_else(|| StreamStatus {
            state: "stopped".into(),
            slot: slot_name(project_id),
            ..Default::default()
        });
        let admin = self.cluster.connect(&access.project.db_name).await?;
        let slot = admin
            .query_opt(
                "SELECT confirmed_flush_lsn::text, wal_status, active,
                        (pg_current_wal_lsn() - confirmed_flush_lsn)::int8, pg_current_wal_lsn()::text
                 FROM pg_replication_slots WHERE slot_name = $1",
                &[&status.slot],
            )
            .await?;
        let slot_json = match &slot {
            Some(r) => {
                status.confirmed_lsn = r.get(0);
                status.lag_bytes = r.get::<_, Option<i64>>(3).map(|b| b.max(0) as u64);
                status.server_lsn = r.get(4);
                json!({ "name": status.slot, "walStatus": r.get::<_, Option<String>>(1), "active": r.get::<_, bool>(2) })
            }
            None => json!({ "name": status.slot, "missing": true }),
        };
        Ok((
            warp::http::StatusCode::OK,
            json!({ "success": true, "projectId": project_id, "stream": status, "slot": slot_json }),
        ))
    }
}

async fn run_stream(
    app: Weak<App>,
    project_id: String,
    db_name: String,
    status: Arc<Mutex<StreamStatus>>,
) {
    let mut backoff = Duration::from_millis(500);
    loop {
        let result = stream_once(&app, &project_id, &db_name, &status).await;
        let Some(strong) = app.upgrade() else { return };
        drop(strong);
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
            Err(e @ StreamError::SlotLost(_)) => {
                tracing::error!(project_id, error = %e, "change stream stopped");
                let mut s = status.lock().expect("poisoned");
                s.state = "slot_lost".into();
                s.last_error = Some(e.to_string());
                return;
            }
            Err(e) => {
                tracing::warn!(project_id, error = %e, retry_in = ?backoff, "change stream interrupted");
                {
                    let mut s = status.lock().expect("poisoned");
                    s.state = "reconnecting".into();
                    s.last_error = Some(e.to_string());
                    s.reconnects += 1;
                }
                tokio::time::sleep(backoff).await;
                backoff = (backoff * 2).min(Duration::from_secs(15));
            }
        }
    }
}

fn lsn_of(s: &Option<String>) -> Option<Lsn> {
    s.as_deref().and_then(|v| v.parse().ok())
}

async fn stream_once(
    app: &Weak<App>,
    project_id: &str,
    db_name: &str,
    status: &Arc<Mutex<StreamStatus>>,
) -> Result<(), StreamError> {
    let (cfg, bus, types, bound, spill_dir, key) = {
        let a = app.upgrade().ok_or(StreamError::Ended)?;
        (
            a.replication_config(db_name),
            a.bus.project(project_id),
            a.sql.types(project_id),
            a.config.cdc_buffer_bytes,
            a.config.data_dir.join("cdc-spill").join(project_id),
            message_key(&a.secrets, project_id),
        )
    };
    let _ = std::fs::remove_dir_all(&spill_dir);
    let slot = slot_name(project_id);
    // Rewinds requested before this point are served by starting from the slot now.
    let generation = bus.rewind_generation();

    // Catalog side connection: slot health and user-defined types.
    let mut catalog = Connection::connect(&cfg).await?;
    let check = catalog
        .simple_query(
            &format!(
                "SELECT wal_status FROM pg_replication_slots WHERE slot_name = {}",
                quote_literal(&slot)
            ),
            1,
        )
        .await?;
    match check.last.and_then(|r| r.rows.into_iter().next()) {
        None => return Err(StreamError::SlotLost(slot)),
        Some(row) if row.first().and_then(|v| v.as_deref()) == Some("lost") => {
            return Err(StreamError::SlotLost(slot))
        }
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
        s.state = "streaming".into();
        s.last_error = None;
    }
    tracing::info!(project_id, slot, "change stream started");

    let mut ctx = DecodeContext::new(options.proto_version);
    let mut asm = assemble::Assembler::new(bound, &spill_dir).with_message_key(&key);
    let mut tick = tokio::time::interval(Duration::from_millis(500));
    let mut lag_check = Instant::now();
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
                        let msg = pgoutput::decode(data, ctx)?;
                        ctx.observe(&msg);
                        if let LogicalReplicationMessage::Relation(r) = &msg {
                            let oids: Vec<u32> = r.columns.iter().map(|c| c.type_id).collect();
                            learn_types(&mut catalog, &types, &oids).await;
                        }
                        let rejected = asm.rejected_messages();
                        let committed = {
                            let reg = types.read().expect("poisoned");
                            asm.handle(msg, &reg)?
                        };
                        if asm.rejected_messages() > rejected {
                            status.lock().expect("poisoned").rejected_messages +=
                                asm.rejected_messages() - rejected;
                        }
                        if let Some(tx) = committed {
                            release(&bus, tx, status).await?;
                        }
                        status.lock().expect("poisoned").received_lsn = Some(wal_end.to_string());
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
                    s.confirmed_lsn = Some(stream.confirmed().to_string());
                    s.buffered_bytes = asm.memory() as u64;
                    s.peak_buffered_bytes = asm.peak_memory() as u64;
                }
                if lag_check.elapsed() > Duration::from_secs(5) {
                    lag_check = Instant::now();
                    if let Ok(o) = catalog.simple_query("SELECT pg_current_wal_lsn()::text", 1).await {
                        let server = o.last.and_then(|r| r.rows.into_iter().next()).and_then(|r| r.into_iter().next().flatten());
                        let mut s = status.lock().expect("poisoned");
                        if let (Some(server), Some(conf)) = (lsn_of(&server), lsn_of(&s.confirmed_lsn)) {
                            s.lag_bytes = Some(server.0.saturating_sub(conf.0));
                        }
                        s.server_lsn = server;
                    }
                }
            }
            _ = bus.rewind.notified() => {
                if bus.rewind_generation() != generation {
                    return Err(StreamError::Rewind);
                }
            }
        }
    }
}

/// Publishes a committed transaction's events in order.
async fn release(
    bus: &ProjectBus,
    tx: assemble::Committed,
    status: &Mutex<StreamStatus>,
) -> Result<(), StreamError> {
    let commit_time = events::commit_time(tx.commit_timestamp);
    let mut iter = tx
        .changes
        .drain()
        .map_err(assemble::AssembleError::Spill)?
        .peekable();
    let mut index = 0u32;
    let mut count = 0u64;
    while let Some(p) = iter.next() {
        let p = p.map_err(assemble::AssembleError::Spill)?;
        let last = iter.peek().is_none();
        bus.publish(Arc::new(events::finish(
            p,
            tx.commit_lsn,
            tx.end_lsn,
            index,
            &commit_time,
            last,
        )))
        .await;
        index += 1;
        count += 1;
        if count.is_multiple_of(256) {
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
    if count > 0 {
        s.last_event_at =
            Some(chrono::Utc::now().to_rfc3339_opts(chrono::SecondsFormat::Millis, true));
        s.lag_seconds =
            Some((now_micros - tx.commit_timestamp.to_unix_micros()).max(0) as f64 / 1e6);
    }
    Ok(())
}

async fn learn_types(
    conn: &mut Connection,
    types: &std::sync::RwLock<fluxbase_replication::values::TypeRegistry>,
    oids: &[u32],
) {
    use fluxbase_replication::values::TypeRegistry;
    for _ in 0..8 {
        let missing = types.read().expect("poisoned").missing(oids);
        if missing.is_empty() {
            return;
        }
        match conn
            .simple_query(&TypeRegistry::catalog_query(&missing), usize::MAX)
            .await
        {
            Ok(o) => {
                let rows = o.last.map(|r| r.rows).unwrap_or_default();
                if types.write().expect("poisoned").absorb(&rows).is_err() {
                    return;
                }
            }
            Err(e) => {
                tracing::warn!(error = %e, "reading types for the change stream");
                return;
            }
        }
    }
}
