//! Change capture for MySQL projects: one binlog stream per project, from the server's binary
//! log to the same event bus the PostgreSQL streams publish to.
//!
//! ```text
//!  MySQL/MariaDB ── COM_BINLOG_DUMP (replication account, server id per node and project) ──┐
//!   binlog: every database's transactions, in commit order                                   │
//!                                                                                            ▼
//!  mysql_async BinlogStream ─► decode::Decoder ─────────────────► cdc::release ─► ProjectBus
//!   (mysql_common's event      TABLE_MAP of fx_<id> only, rows     (events::finish,  (same
//!    decoder, checksums)       rendered (render.rs), DDL parsed    ids <lsn>-<idx>)  contract)
//!                              (ddl.rs), TxBuffer spill                                 │
//!  control db: fluxbase.binlog_positions ◄── position::save(bus.confirmable()) ◄────────┘
//! ```
//!
//! **One stream per project, not one per server.** A binlog dump sends every database's
//! events, so N projects on one server read the log N times; a single stream demultiplexed by
//! database would read it once. Per project was chosen because everything after the decoder
//! is per project already: the bus's channel, its durable subscribers and `confirmable()`, the
//! rewind a new durable subscriber asks for, the stream state in `/api/cdc/status`, leadership
//! in cluster mode. One shared stream would hold the log position at the slowest project's
//! acknowledgement, replay every project when one rewinds, and stop them all on one project's
//! definite error. The cost is bounded: other databases' row events are skipped before their
//! rows are decoded (only TABLE_MAP's header and the event header are read), and the server
//! sends from its page cache. `bench-binlog` measures a stream against `mariadb-binlog` reading
//! the same log.
//!
//! **Positions and ids.** See [`position`]: `lsn = file sequence << 32 | offset`, commit LSN =
//! end LSN = the position after the transaction's last event; event id `<lsn, 16 hex>-<index,
//! 8 hex>` as on PostgreSQL, stable across restarts and sortable. The position stored in the
//! control database advances only to what the bus says is confirmable (the durable
//! subscribers' acknowledgements), or, when the project is idle and everything published is
//! acknowledged, to the last transaction boundary of any database (an idle project does not
//! replay other projects' traffic after a restart). A restart resumes there and repeats what
//! follows with the same ids.
//!
//! **Errors** are transient (retried with backoff: the connection lost, the server restarting,
//! too many connections, the control database unreachable, a full spill disk) or definite
//! (reported once, stream stopped): the stored file purged from the server (state `slot_lost`:
//! changes may be lost, never silently skipped), refused authentication or privilege, server
//! settings that make capture incomplete (`binlog_format` not ROW, `binlog_row_image` not FULL,
//! `binlog_row_metadata` not FULL, `binlog_row_value_options` PARTIAL_JSON, compressed or
//! encrypted binlog), an event that cannot be decoded (state `failed`).

pub mod ddl;
pub mod decode;
pub mod position;
pub mod render;

use std::collections::{HashMap, VecDeque};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use fluxbase_replication::pgoutput::Lsn;
use futures_util::StreamExt;
use mysql_async::prelude::Queryable;
use mysql_async::{BinlogStream, BinlogStreamRequest, Conn, Opts};

use self::decode::Decoder;
use self::position::{BinlogPosition, Stored};
use super::{Sources, StreamState, StreamStatus};
use crate::bus::{EventBus, ProjectChannel};

/// The largest packet MySQL and MariaDB send or accept (`max_allowed_packet`'s maximum, 1 GiB):
/// the dump connection's client limit, so that no row event is too large to read.
pub const MAX_PACKET: usize = 1 << 30;

/// How the streams reach the MySQL server.
#[derive(Clone)]
pub struct MysqlSource {
    /// The replication account (`REPLICATION SLAVE`, and `BINLOG MONITOR` on MariaDB or
    /// `REPLICATION CLIENT` on MySQL): the binlog dump, the log's files and status.
    pub opts: Opts,
    /// An account that sees the project databases' catalog (MariaDB JSON columns, which
    /// `information_schema` shows only to accounts with privileges on the table).
    pub catalog: Opts,
    /// What makes this Fluxbase instance's replica server ids its own (see [`server_id`]).
    pub node: String,
    /// The dump connections this process's streams opened, by project ([`Dumps`]).
    pub dumps: Arc<Dumps>,
    /// The server's list of binary logs, read for all of this process's streams ([`LogLister`]).
    pub logs: Arc<LogLister>,
}

/// Every stream follows the server's list of binary logs (its position's file purged: the
/// stream stops as `slot_lost` at once; the lag in bytes): one reader for all of them, on a
/// connection of its own, every 5 s, so that a project's stream holds one connection on the
/// server — its dump — and the catalog connections it needs at its start are closed before it
/// streams (red team rt4: three connections per project, outside the SQL connection budget,
/// let project creation alone exhaust MariaDB's `max_connections`).
#[derive(Default)]
pub struct LogLister {
    current: Mutex<Option<ListerTask>>,
}

struct ListerTask {
    opts: Opts,
    rx: tokio::sync::watch::Receiver<Option<Vec<(String, u64)>>>,
    task: tokio::task::JoinHandle<()>,
}

impl LogLister {
    /// The list as it is read (`None` until the first read), by the reader of `opts`' server
    /// (started, or restarted for another server, here).
    fn subscribe(&self, opts: &Opts) -> tokio::sync::watch::Receiver<Option<Vec<(String, u64)>>> {
        let mut current = self.current.lock().expect("poisoned");
        if let Some(t) = current.as_ref() {
            if t.opts == *opts && !t.task.is_finished() {
                return t.rx.clone();
            }
            t.task.abort();
        }
        let (tx, rx) = tokio::sync::watch::channel(None);
        let task = tokio::spawn(list_logs(opts.clone(), tx));
        *current = Some(ListerTask {
            opts: opts.clone(),
            rx: rx.clone(),
            task,
        });
        rx
    }
}

impl Drop for LogLister {
    fn drop(&mut self) {
        if let Some(t) = self.current.lock().expect("poisoned").take() {
            t.task.abort();
        }
    }
}

/// The dump connection each project's stream last opened in this process, so that a stream
/// starting again (a rewind for a new durable subscriber, a stop and start, a reconnection)
/// ends its previous dump itself before it asks for a new one; and, through the control
/// database's record of the last dump any process opened (control migration 0019), a stream
/// starting in another process (a restart, a new leader after a failover) ends its
/// predecessor's.
///
/// Why: the server allows one dump per replica id and ends the older one when a new one
/// registers, but a new dump whose id a live dump thread still holds starts only ~0.1 s later
/// (measured on MariaDB 10.11: 100 ms after a dropped dump, 0.1–0.4 ms after a `KILL` of it or
/// with a fresh id; the old connection's dump thread, waiting for the log to grow, has not
/// noticed its client is gone). Every restart paid it before its catch-up. `KILL CONNECTION`
/// of one's own connection needs no privilege; the id is checked to still be a dump of this
/// account first (`information_schema.PROCESSLIST` shows an account its own threads), and only
/// while the server is the same run that gave the id (its start time, from `UPTIME`): ids
/// start over when the server restarts, and the replication account is shared by every
/// project and node, so an id from an earlier run may now be another project's dump.
#[derive(Default)]
pub struct Dumps {
    by_project: Mutex<HashMap<String, DumpRecord>>,
}

#[derive(Default, Clone, Copy)]
struct DumpRecord {
    /// The connection id of the dump the project's stream opened last, and the start time
    /// (Unix seconds) of the server run that gave it.
    connection: Option<(u32, i64)>,
    /// Previous dumps the stream ended itself before starting a new one.
    ended: u64,
}

impl Dumps {
    /// How many previous dumps the project's streams ended themselves before a restart.
    pub fn ended(&self, project_id: &str) -> u64 {
        self.by_project
            .lock()
            .expect("poisoned")
            .get(project_id)
            .map_or(0, |r| r.ended)
    }

    /// The connection id of the project's current (last opened) dump.
    pub fn current(&self, project_id: &str) -> Option<u32> {
        self.by_project
            .lock()
            .expect("poisoned")
            .get(project_id)
            .and_then(|r| r.connection)
            .map(|(id, _)| id)
    }

    /// Tests: makes the project's recorded dump look as if an earlier server run gave its id.
    #[doc(hidden)]
    pub fn pretend_earlier_run(&self, project_id: &str) {
        if let Some(r) = self
            .by_project
            .lock()
            .expect("poisoned")
            .get_mut(project_id)
        {
            r.connection = r.connection.map(|(id, start)| (id, start - 3600));
        }
    }

    /// Forgets a deleted project.
    pub fn forget(&self, project_id: &str) {
        self.by_project.lock().expect("poisoned").remove(project_id);
    }

    fn opened(&self, project_id: &str, connection: u32, server_start: Option<i64>) {
        let mut all = self.by_project.lock().expect("poisoned");
        let record = all.entry(project_id.to_string()).or_default();
        // Without the server's start time the id is not kept: it could not be told apart from
        // another run's.
        record.connection = server_start.map(|start| (connection, start));
    }

    /// Ends the project's previous dump, if one is still on the server (`conn`: the
    /// replication account, as the dump): this process's, else `stored`, the one the control
    /// database records (another process's before a restart, a previous leader's in cluster
    /// mode). Failing to is not an error: the server ends it anyway when the new dump
    /// registers, only later.
    /// Returns the server's start time (Unix seconds), for [`Dumps::opened`].
    async fn end_previous(
        &self,
        conn: &mut Conn,
        project_id: &str,
        stored: Option<(u32, i64)>,
    ) -> Option<i64> {
        // Start times read at different moments may differ by a second of rounding.
        let start = server_start(conn).await;
        let mine = self
            .by_project
            .lock()
            .expect("poisoned")
            .get(project_id)
            .and_then(|r| r.connection);
        // This process's last dump, and the last one any process recorded (the same one, or
        // a newer one another node opened since, or an older one already gone).
        let mut candidates: Vec<(u32, i64)> = mine.into_iter().chain(stored).collect();
        candidates.dedup();
        for (previous, then) in candidates {
            // Only an id of the server run that gave it (ids start over at a restart, and
            // the replication account is every project's).
            if start.is_none_or(|now| (now - then).abs() > 2) {
                continue;
            }
            // Of our replication account too: on a server where it was given PROCESS, a real
            // replica's dump could otherwise carry a recorded id.
            let alive: Result<Option<u32>, _> = conn
                .exec_first(
                    "SELECT ID FROM information_schema.PROCESSLIST \
                     WHERE ID = ? AND COMMAND LIKE 'Binlog Dump%' \
                     AND USER = SUBSTRING_INDEX(CURRENT_USER(), '@', 1)",
                    (previous,),
                )
                .await;
            match alive {
                Ok(Some(_)) => match conn.query_drop(format!("KILL CONNECTION {previous}")).await {
                    Ok(()) => {
                        let mut all = self.by_project.lock().expect("poisoned");
                        let r = all.entry(project_id.to_string()).or_default();
                        r.ended += 1;
                        r.connection = None;
                        drop(all);
                        tracing::debug!(
                            project_id,
                            connection = previous,
                            "ended the stream's previous binlog dump"
                        );
                    }
                    // 1094: the thread ended meanwhile.
                    Err(mysql_async::Error::Server(e)) if e.code == 1094 => {}
                    Err(e) => {
                        tracing::debug!(project_id, error = %e, "ending the stream's previous binlog dump")
                    }
                },
                Ok(None) => {}
                Err(e) => {
                    tracing::debug!(project_id, error = %e, "looking for the stream's previous binlog dump")
                }
            }
        }
        start
    }
}

/// When the MySQL server's current run started (Unix seconds), or `None` if it cannot be read.
async fn server_start(conn: &mut Conn) -> Option<i64> {
    conn.query_first::<Option<i64>, _>(
        "SELECT CAST(UNIX_TIMESTAMP() - VARIABLE_VALUE AS SIGNED) \
         FROM information_schema.GLOBAL_STATUS WHERE VARIABLE_NAME = 'UPTIME'",
    )
    .await
    .ok()
    .flatten()
    .flatten()
}

/// Gives the source when a stream (re)connects: the wiring's way to the MySQL server, which may
/// start (embedded) only when the first MySQL project needs it.
pub type SourceProvider = Arc<
    dyn Fn() -> std::pin::Pin<
            Box<dyn std::future::Future<Output = anyhow::Result<MysqlSource>> + Send>,
        > + Send
        + Sync,
>;

impl std::fmt::Debug for MysqlSource {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "{}@{}:{}",
            self.opts.user().unwrap_or(""),
            self.opts.ip_or_hostname(),
            self.opts.tcp_port()
        )
    }
}

/// The replica server id a project's stream registers with: the server allows one dump
/// connection per id (a second one with the same id ends the first), so each project of an
/// instance has its own. The nodes of a cluster share it (`node` is the instance's replication
/// account): a new leader's dump ends a previous leader's. Ids are in the upper half of the
/// 32-bit range (2³¹…2³²−1), away from the small ids servers and their replicas are usually
/// given.
pub fn server_id(node: &str, project_id: &str) -> u32 {
    // FNV-1a: stable across builds and platforms (std's hasher is not).
    let mut h: u32 = 0x811c_9dc5;
    for b in node.bytes().chain([0]).chain(project_id.bytes()) {
        h ^= u32::from(b);
        h = h.wrapping_mul(0x0100_0193);
    }
    0x8000_0000 | (h & 0x7FFF_FFFF)
}

/// The slot name a MySQL project's stream reports (`/api/cdc/status`'s `stream.slot`).
pub fn slot_name(project_id: &str) -> String {
    format!("binlog:fluxbase_{project_id}")
}

#[derive(Debug, thiserror::Error)]
pub enum BinlogError {
    #[error("{0}")]
    Mysql(#[from] mysql_async::Error),
    #[error("{0}")]
    Decode(#[from] decode::DecodeError),
    #[error("control database: {0}")]
    Control(String),
    #[error("reaching the MySQL server: {0}")]
    Source(String),
    #[error(
        "the binlog position {0} is gone from the server (purged or reset): changes since it may be lost"
    )]
    SlotLost(String),
    #[error("{0}")]
    Settings(String),
    #[error("publishing: {0}")]
    Release(String),
    #[error("rewinding to the stored binlog position")]
    Rewind,
    #[error("the server ended the binlog stream")]
    Ended,
    /// Another dump with this stream's replica id connected and the server ended this one
    /// (MySQL 8's 1236 "same server_uuid/server_id"): in cluster mode a previous leader's
    /// stream waking up; retried with backoff, leadership decides who streams.
    #[error("replaced by another dump with the same replica id: {0}")]
    Replaced(String),
    /// The server refused to read the log at the stored position though the position's file
    /// is still there (1236 for another reason: an impossible position after a log reset, an
    /// event larger than `max_allowed_packet`): the same attempt would meet it again.
    #[error("the server cannot read the binary log: {0}")]
    Unreadable(String),
}

impl BinlogError {
    fn is_transient(&self) -> bool {
        match self {
            BinlogError::Mysql(mysql_async::Error::Server(e)) => !definite_server_error(e.code),
            // A bad URL or an answer this client cannot read comes back on every attempt.
            BinlogError::Mysql(mysql_async::Error::Url(_) | mysql_async::Error::Driver(_)) => false,
            BinlogError::Mysql(_) => true,
            BinlogError::Decode(e) => e.is_transient(),
            BinlogError::Control(_)
            | BinlogError::Source(_)
            | BinlogError::Release(_)
            | BinlogError::Rewind
            | BinlogError::Ended
            | BinlogError::Replaced(_) => true,
            BinlogError::SlotLost(_) | BinlogError::Settings(_) | BinlogError::Unreadable(_) => {
                false
            }
        }
    }

    fn state(&self) -> StreamState {
        match self {
            // Only a position verified gone ([`fatal_reading`]): the server's 1236 alone is
            // not proof (MySQL 8 sends it to a dump replaced by another with its replica id).
            BinlogError::SlotLost(_) => StreamState::SlotLost,
            _ => StreamState::Failed,
        }
    }
}

/// `ER_MASTER_FATAL_ERROR_READING_BINLOG`: the dump cannot go on. Its message says why: the
/// requested file purged or reset, an impossible position, an event past `max_allowed_packet`,
/// or (MySQL 8) another dump with the same replica id ([`fatal_kind`]).
const ER_MASTER_FATAL: u16 = 1236;

/// Why the server ended a dump with 1236, from its message (the code is the same for all).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FatalKind {
    /// Another dump with the same replica id connected (MySQL 5.7/8: "A slave with the same
    /// server_uuid/server_id as this slave has connected to the master", "A replica with the
    /// same server_uuid/server_id as this replica has connected to the source" from 8.0.26).
    Replaced,
    /// The server says the requested file or the transactions are no longer in its log
    /// ("Could not find first log file name in binary log index file", both servers; MySQL's
    /// "the source purged required binary logs", MariaDB's "... which is not in the master's
    /// binlog" for GTIDs).
    PositionGone,
    /// Anything else: an impossible position, an oversized event, the log not open.
    Other,
}

/// Classifies a 1236 message (see [`FatalKind`]); case and the servers' master/source and
/// slave/replica wordings do not matter.
pub fn fatal_kind(message: &str) -> FatalKind {
    let m = message.to_ascii_lowercase();
    if m.contains("same server_uuid/server_id") {
        FatalKind::Replaced
    } else if m.contains("could not find first log file")
        || m.contains("could not find log file")
        || m.contains("purged required binary logs")
        || m.contains("not in the master's binlog")
        || m.contains("not in the source's binlog")
    {
        FatalKind::PositionGone
    } else {
        FatalKind::Other
    }
}

/// What a 1236 means for the stream, once its message is classified and the server's files
/// listed afresh: the stored position's file missing from the list is the only proof of a loss
/// (`slot_lost`); a replaced dump, or a server that says "gone" of a file it lists, is retried;
/// another refusal with the file there is definite (`failed`, with the server's words).
pub fn fatal_outcome(
    kind: FatalKind,
    message: &str,
    stored: &BinlogPosition,
    logs: &[(String, u64)],
) -> BinlogError {
    if kind == FatalKind::Replaced {
        return BinlogError::Replaced(message.to_string());
    }
    if !logs.iter().any(|(f, _)| *f == stored.file) {
        let oldest = logs.first().map_or("none", |(f, _)| f.as_str());
        return BinlogError::SlotLost(format!(
            "{stored} (the server's oldest file is {oldest}; it said: {message})"
        ));
    }
    match kind {
        FatalKind::PositionGone => BinlogError::Source(format!(
            "the server said the position is gone but lists its file: {message}"
        )),
        _ => BinlogError::Unreadable(message.to_string()),
    }
}

/// Server errors the same attempt would meet again: refused authentication (1045, 1044, 1698,
/// 1251), missing privileges (1227, 1142, 1143), an unknown database (1049), the log position
/// gone (1236), binary logging off (1381). Everything else (the server shutting down 1053, too
/// many connections 1040/1203, out of memory 1037/1041, lock timeouts, a killed connection
/// 1927/1317) clears by itself and is retried.
fn definite_server_error(code: u16) -> bool {
    matches!(
        code,
        1044 | 1045 | 1698 | 1251 | 1227 | 1142 | 1143 | 1049 | ER_MASTER_FATAL | 1381
    )
}

impl<B: EventBus> Sources<B> {
    async fn control(&self) -> Result<deadpool_postgres::Object, BinlogError> {
        self.control
            .get()
            .await
            .map_err(|e| BinlogError::Control(e.to_string()))
    }
}

pub(super) async fn run_stream<B: EventBus>(
    sources: Arc<Sources<B>>,
    provider: SourceProvider,
    project_id: String,
    db_name: String,
    status: Arc<Mutex<StreamStatus>>,
) {
    let mut backoff = Duration::from_millis(500);
    // A rewound pass's dump, kept open until the next pass has ended it (see `stream_once`).
    let mut rewound: Option<BinlogStream> = None;
    loop {
        let result = match provider().await {
            Ok(source) => {
                match stream_once(
                    &sources,
                    &source,
                    &project_id,
                    &db_name,
                    &status,
                    &mut rewound,
                )
                .await
                {
                    Err(BinlogError::Mysql(mysql_async::Error::Server(e)))
                        if e.code == ER_MASTER_FATAL =>
                    {
                        Err(fatal_reading(&sources, &source, &project_id, &e.message).await)
                    }
                    other => other,
                }
            }
            Err(e) => Err(BinlogError::Source(format!("{e:#}"))),
        };
        match result {
            Ok(()) => return,
            Err(BinlogError::Rewind) => {
                tracing::info!(project_id, "binlog stream rewinding to the stored position");
                backoff = Duration::from_millis(500);
            }
            Err(e) if e.is_transient() => {
                tracing::warn!(project_id, error = %e, retry_in = ?backoff, "binlog stream interrupted");
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
                let state = e.state();
                tracing::error!(project_id, error = %e, ?state, "binlog stream stopped");
                let mut s = status.lock().expect("poisoned");
                s.state = state;
                s.last_error = Some(e.to_string());
                return;
            }
        }
    }
}

/// A 1236 from the server, decided against its current list of files and the stored position
/// ([`fatal_outcome`]). Failing to check is itself transient: the next attempt checks again
/// (its start compares the stored file with a fresh list too).
async fn fatal_reading<B: EventBus>(
    sources: &Sources<B>,
    source: &MysqlSource,
    project_id: &str,
    message: &str,
) -> BinlogError {
    let kind = fatal_kind(message);
    if kind == FatalKind::Replaced {
        return BinlogError::Replaced(message.to_string());
    }
    let stored = match sources.control().await {
        Ok(control) => match position::load(&**control, project_id).await {
            Ok(Some(s)) => s.position,
            Ok(None) => return BinlogError::Source(format!("no stored position: {message}")),
            Err(e) => return BinlogError::Control(e.to_string()),
        },
        Err(e) => return e,
    };
    let logs = match Conn::new(source.opts.clone()).await {
        Ok(mut conn) => {
            let logs = binary_logs(&mut conn).await;
            let _ = conn.disconnect().await;
            logs
        }
        Err(e) => Err(e),
    };
    match logs {
        Ok(logs) => fatal_outcome(kind, message, &stored, &logs),
        Err(e) => BinlogError::Source(format!("listing the binary logs after \"{message}\": {e}")),
    }
}

/// The broadcast table and procedure of a project database (sql/mysql/broadcast.sql), for its
/// provisioning (also a repair: idempotent). `admin` and `readwrite` are the project's admin
/// and readwrite accounts (`'user'@'host'`): the procedure is defined by the admin account
/// and runs as its caller (never as the server's account); the admin account has EXECUTE
/// through its privileges on the database.
///
/// Repair: whatever holds the name `fluxbase_broadcasts` and is not the table this file
/// creates (a view, another engine, other columns) is dropped first and the table made again.
/// The table is always empty (each row is deleted in the transaction that wrote it), so
/// nothing is lost; the stream ignores these statements (decode.rs: not a schema change).
pub async fn provision_broadcast(
    conn: &mut Conn,
    db_name: &str,
    admin: &str,
    readwrite: &str,
) -> Result<(), mysql_async::Error> {
    const SQL: &str = include_str!("../../../sql/mysql/broadcast.sql");
    let found: Option<(String, Option<String>)> = conn
        .exec_first(
            "SELECT TABLE_TYPE, ENGINE FROM information_schema.TABLES \
             WHERE TABLE_SCHEMA = ? AND TABLE_NAME = ?",
            (db_name, decode::BROADCAST_TABLE),
        )
        .await?;
    if let Some((kind, engine)) = found {
        let columns: Vec<(String, String)> = conn
            .exec(
                "SELECT COLUMN_NAME, DATA_TYPE FROM information_schema.COLUMNS \
                 WHERE TABLE_SCHEMA = ? AND TABLE_NAME = ? ORDER BY ORDINAL_POSITION",
                (db_name, decode::BROADCAST_TABLE),
            )
            .await?;
        let expected = [
            ("id", "bigint"),
            ("event", "varchar"),
            ("payload", "longtext"),
        ];
        let shape_ok = columns.len() == expected.len()
            && columns
                .iter()
                .zip(expected)
                .all(|((n, t), (en, et))| n.eq_ignore_ascii_case(en) && t.eq_ignore_ascii_case(et));
        let base = kind.eq_ignore_ascii_case("BASE TABLE");
        let innodb = engine.is_some_and(|e| e.eq_ignore_ascii_case("InnoDB"));
        if !(base && innodb && shape_ok) {
            tracing::warn!(
                database = db_name,
                kind = %kind,
                "`fluxbase_broadcasts` was replaced by something else: dropped and made again"
            );
            let drop = if kind.eq_ignore_ascii_case("VIEW") {
                "VIEW"
            } else {
                "TABLE"
            };
            conn.query_drop(format!(
                "DROP {drop} IF EXISTS `{db_name}`.`{}`",
                decode::BROADCAST_TABLE
            ))
            .await?;
        }
    }
    for statement in SQL.split("-- next statement") {
        // The file's leading comment is not a statement.
        let body: String = statement
            .lines()
            .filter(|l| !l.trim_start().starts_with("--"))
            .collect::<Vec<_>>()
            .join("\n");
        if body.trim().is_empty() {
            continue;
        }
        let sql = body
            .replace("{db}", db_name)
            .replace("{admin}", admin)
            .replace("{readwrite}", readwrite);
        conn.query_drop(sql).await?;
    }
    Ok(())
}

/// The server's settings that complete capture needs, each with its fix.
pub async fn check_settings(conn: &mut Conn) -> Result<(), BinlogError> {
    let rows: Vec<(String, Option<String>)> = conn
        .query(
            "SHOW GLOBAL VARIABLES WHERE Variable_name IN ('log_bin', 'binlog_format', \
             'binlog_row_image', 'binlog_row_metadata', 'binlog_row_value_options', \
             'log_bin_compress', 'encrypt_binlog')",
        )
        .await?;
    let get = |name: &str| {
        rows.iter()
            .find(|(n, _)| n.eq_ignore_ascii_case(name))
            .and_then(|(_, v)| v.clone())
            .unwrap_or_default()
            .to_ascii_uppercase()
    };
    let mut problems = Vec::new();
    if get("log_bin") != "ON" {
        problems.push("binary logging is off: start the server with log_bin");
    }
    if get("binlog_format") != "ROW" {
        problems.push("binlog_format must be ROW: SET GLOBAL binlog_format = 'ROW'");
    }
    if get("binlog_row_image") != "FULL" {
        problems.push("binlog_row_image must be FULL: SET GLOBAL binlog_row_image = 'FULL'");
    }
    if get("binlog_row_metadata") != "FULL" {
        problems.push(
            "binlog_row_metadata must be FULL (column names): SET GLOBAL binlog_row_metadata = 'FULL'",
        );
    }
    if get("binlog_row_value_options").contains("PARTIAL_JSON") {
        problems.push(
            "binlog_row_value_options must be empty: SET GLOBAL binlog_row_value_options = ''",
        );
    }
    if get("log_bin_compress") == "ON" {
        problems.push("log_bin_compress must be OFF: SET GLOBAL log_bin_compress = OFF");
    }
    if get("encrypt_binlog") == "ON" {
        problems.push(
            "encrypt_binlog must be OFF (Fluxbase reads the log over the replication protocol)",
        );
    }
    if problems.is_empty() {
        Ok(())
    } else {
        Err(BinlogError::Settings(problems.join("; ")))
    }
}

/// Records a project's first position, the server's end of log now, unless it has one: read
/// and stored under [`position::POSITIONS_LOCK`] (a purge never runs between the two).
pub async fn init_position(
    control: &deadpool_postgres::Pool,
    conn: &mut Conn,
    project_id: &str,
) -> Result<(), BinlogError> {
    let control_err = |e: tokio_postgres::Error| BinlogError::Control(e.to_string());
    let mut client = control
        .get()
        .await
        .map_err(|e| BinlogError::Control(e.to_string()))?;
    let tx = client.transaction().await.map_err(control_err)?;
    position::lock(&*tx).await.map_err(control_err)?;
    if position::load(&*tx, project_id)
        .await
        .map_err(control_err)?
        .is_none()
    {
        let now = current_position(conn).await?;
        position::init(&*tx, project_id, &now)
            .await
            .map_err(control_err)?;
    }
    tx.commit().await.map_err(control_err)
}

/// The binary log files the server has, with their sizes.
pub async fn binary_logs(conn: &mut Conn) -> Result<Vec<(String, u64)>, mysql_async::Error> {
    let rows: Vec<mysql_async::Row> = conn.query("SHOW BINARY LOGS").await?;
    Ok(rows
        .into_iter()
        .filter_map(|mut r| Some((r.take::<String, _>(0)?, r.take::<u64, _>(1)?)))
        .collect())
}

/// The server's current end of log (`SHOW MASTER STATUS`; `SHOW BINARY LOG STATUS` on MySQL
/// 8.4+, which dropped the old name).
pub async fn current_position(conn: &mut Conn) -> Result<BinlogPosition, BinlogError> {
    let row: Option<mysql_async::Row> = match conn.query_first("SHOW MASTER STATUS").await {
        Ok(r) => r,
        Err(mysql_async::Error::Server(_)) => conn.query_first("SHOW BINARY LOG STATUS").await?,
        Err(e) => return Err(e.into()),
    };
    let mut row =
        row.ok_or_else(|| BinlogError::Settings("binary logging is off (no log status)".into()))?;
    Ok(BinlogPosition {
        file: row.take::<String, _>(0).unwrap_or_default(),
        offset: row.take::<u64, _>(1).unwrap_or(4),
    })
}

/// Bytes of log between `from` and the end of `logs` (the lag of a stream confirmed at `from`).
fn lag_bytes(logs: &[(String, u64)], from: &BinlogPosition) -> Option<u64> {
    let from_seq = position::file_sequence(&from.file)?;
    let mut lag = 0u64;
    let mut seen = false;
    for (file, size) in logs {
        let seq = position::file_sequence(file)?;
        if seq == from_seq {
            seen = true;
            lag += size.saturating_sub(from.offset);
        } else if seq > from_seq {
            lag += size;
        }
    }
    seen.then_some(lag)
}

/// The columns of every table of `db` whose type the binlog does not name, by table (tables
/// without any left out): MariaDB's JSON (LONGTEXT with the `json_valid` check MariaDB adds),
/// INET4, INET6 and UUID (fixed binary strings in the binlog, [`render`]'s table). One query.
async fn column_catalog(
    catalog: &mut Conn,
    db: &str,
) -> Result<HashMap<String, decode::CatalogColumns>, mysql_async::Error> {
    let rows: Vec<(String, String, String)> = catalog
        .exec(
            "SELECT TABLE_NAME, CONSTRAINT_NAME, 'json' FROM information_schema.CHECK_CONSTRAINTS \
             WHERE CONSTRAINT_SCHEMA = ? \
             AND CHECK_CLAUSE = CONCAT('json_valid(`', CONSTRAINT_NAME, '`)') \
             UNION ALL \
             SELECT TABLE_NAME, COLUMN_NAME, DATA_TYPE FROM information_schema.COLUMNS \
             WHERE TABLE_SCHEMA = ? AND DATA_TYPE IN ('inet4', 'inet6', 'uuid')",
            (db, db),
        )
        .await?;
    let mut tables: HashMap<String, decode::CatalogColumns> = HashMap::new();
    for (table, column, data_type) in rows {
        if let Some(ty) = render::CatalogType::of(&data_type) {
            tables.entry(table).or_default().insert(column, ty);
        }
    }
    Ok(tables)
}

async fn stream_once<B: EventBus>(
    sources: &Sources<B>,
    source: &MysqlSource,
    project_id: &str,
    db_name: &str,
    status: &Mutex<StreamStatus>,
    rewound: &mut Option<BinlogStream>,
) -> Result<(), BinlogError> {
    // The previous pass's dump, when it ended for a rewind: its connection stays open until
    // this pass has ended its dump thread with `KILL` ([`Dumps::end_previous`]). Closed first,
    // the thread would notice by itself at its next heartbeat or event (within a second, and
    // sooner when other databases write), racing the `KILL`: then the new dump, registering
    // under the same replica id while the old thread is still there, waits for the server to
    // end it. Dropped on any return before that.
    let previous_dump = rewound.take();
    let bus = sources.bus.channel(project_id);
    // Rewinds requested before this point are served by starting from the stored position;
    // the durable subscribers that asked for them receive events from this pass on.
    let generation = bus.start_pass();
    let spill_dir = sources.settings.spill_dir.join(project_id);
    let _ = std::fs::remove_dir_all(&spill_dir);

    let mut catalog = Conn::new(source.opts.clone()).await?;
    check_settings(&mut catalog).await?;
    // MariaDB's versions are 10 and up (mysql_async drops the `5.5.5-` prefix); MySQL's below.
    let mariadb = catalog.server_version() >= (10, 0, 0);
    // MariaDB's JSON, INET4, INET6 and UUID columns are read from the catalog at the start and
    // after DDL, each time on a connection of its own closed after the read (one connection per
    // stream while it streams).
    let column_catalog_now = || async {
        let mut schema = Conn::new(source.catalog.clone()).await?;
        let catalog = column_catalog(&mut schema, db_name).await;
        let _ = schema.disconnect().await;
        catalog
    };
    let stored = {
        let control = sources.control().await?;
        position::load(&**control, project_id)
            .await
            .map_err(|e| BinlogError::Control(e.to_string()))?
    };
    let start = match stored {
        Some(s) => s.position,
        None => {
            // A project without a position yet (made before its stream could record one):
            // from the end of the log now.
            init_position(&sources.control, &mut catalog, project_id).await?;
            let control = sources.control().await?;
            position::load(&**control, project_id)
                .await
                .map_err(|e| BinlogError::Control(e.to_string()))?
                .ok_or_else(|| BinlogError::Control("the first position vanished".into()))?
                .position
        }
    };
    let logs = binary_logs(&mut catalog).await?;
    if !logs.iter().any(|(f, _)| *f == start.file) {
        return Err(BinlogError::SlotLost(start.to_string()));
    }
    let mut confirmed =
        position::to_lsn(&start.file, start.offset).map_err(|e| BinlogError::Decode(e.into()))?;

    // Everything the decoder needs from the server is asked before the dump starts, and the
    // state says `streaming` only then: the first events never wait behind these queries.
    let checksum: Option<String> = catalog
        .query_first("SELECT @@GLOBAL.binlog_checksum")
        .await?;
    let mut decoder = Decoder::new(db_name, sources.settings.buffer_bytes, &spill_dir)
        .with_checksums(checksum.is_some_and(|c| !c.eq_ignore_ascii_case("NONE")))
        .with_max_row_bytes(sources.settings.max_row_bytes);
    if mariadb {
        // Before the first event: a table's first rows never wait for a catalog query.
        decoder.set_catalog(column_catalog_now().await?);
    }

    // The client's packet limit is the server's maximum, not `@@max_allowed_packet` (16 MiB
    // by default, what mysql_async reads when none is given): one row event is one packet, and
    // a tenant's row over that limit would stop this stream at the same position forever.
    let dump_opts = mysql_async::OptsBuilder::from_opts(source.opts.clone())
        .max_allowed_packet(Some(MAX_PACKET));
    let mut conn = Conn::new(dump_opts).await?;
    // MariaDB sends its own GTID and annotate events only to replicas that say they read them.
    conn.query_drop("SET @mariadb_slave_capability = 4").await?;
    // A heartbeat each second when the log is idle: the connection is known alive, and an idle
    // project's position follows the log.
    conn.query_drop("SET @master_heartbeat_period = 1000000000")
        .await?;
    let request = BinlogStreamRequest::new(server_id(&source.node, project_id))
        .with_filename(start.file.as_bytes())
        .with_pos(start.offset);
    // A restart ends its previous dump itself, this process's or (recorded in the control
    // database) another's: the new one then starts at once ([`Dumps`]).
    let stored_dump = {
        let control = sources.control().await?;
        position::load_dump(&**control, project_id)
            .await
            .map_err(|e| BinlogError::Control(e.to_string()))?
    };
    let server_start = source
        .dumps
        .end_previous(&mut catalog, project_id, stored_dump)
        .await;
    drop(previous_dump);
    source.dumps.opened(project_id, conn.id(), server_start);
    if let Some(start) = server_start {
        // For the next process or leader; off the stream's way (its first events never wait
        // for it). Lost, it costs the next start the server's ~0.1 s, nothing else.
        let (control, project, id) = (sources.control.clone(), project_id.to_string(), conn.id());
        tokio::spawn(async move {
            let saved = async {
                let client = control.get().await.map_err(|e| e.to_string())?;
                position::save_dump(&**client, &project, id, start)
                    .await
                    .map_err(|e| e.to_string())
            };
            if let Err(e) = saved.await {
                tracing::debug!(project_id = %project, error = %e, "recording the binlog dump");
            }
        });
    }
    let mut stream = conn.get_binlog_stream(request).await?;
    // The state says `streaming` from the first event the server sends (its ROTATE): a new dump
    // with the replica id of one the server still holds (another node's, or another process's
    // before a restart) starts only once the server has ended that one, ~0.1 s on MariaDB 10.11.
    let mut streaming = false;

    let mut released: VecDeque<(Lsn, Option<String>)> = VecDeque::new();
    let mut gtid: Option<String> = None;
    // The control database and the server's log list are reached off the read path: a
    // position save or `SHOW BINARY LOGS` that takes a while (a loaded control database) never
    // holds back the events behind it. The saver stores the newest position asked for and says
    // what it stored; `confirmed` follows what it stored, never what was only asked for.
    let (save_tx, save_rx) = tokio::sync::watch::channel::<Option<(Lsn, Stored)>>(None);
    let (saved_tx, mut saved_rx) = tokio::sync::watch::channel::<Option<Lsn>>(None);
    let _saver = AbortOnDrop(tokio::spawn(save_positions(
        sources.control.clone(),
        project_id.to_string(),
        save_rx,
        saved_tx,
    )));
    let _ = catalog.disconnect().await;
    let mut logs_rx = source.logs.subscribe(&source.opts);
    let mut asked = confirmed;
    let mut tick = tokio::time::interval(Duration::from_millis(500));
    let mut received = Lsn(0);
    let mut reported_rejected = 0;
    loop {
        tokio::select! {
            event = stream.next() => {
                let event = match event {
                    Some(Ok(e)) => e,
                    Some(Err(e)) => return Err(e.into()),
                    None => return Err(BinlogError::Ended),
                };
                if !streaming {
                    streaming = true;
                    let mut s = status.lock().expect("poisoned");
                    s.state = StreamState::Streaming;
                    s.last_error = None;
                    s.confirmed_lsn = Some(confirmed.to_string());
                    drop(s);
                    tracing::info!(project_id, position = %start, "binlog stream started");
                }
                // A huge row (one event carries it whole) is rendered and spilled off the
                // worker; another database's is skipped without decoding its rows.
                let heavy = event.data().len() >= super::HEAVY_BYTES;
                let committed = super::blocking_if(heavy, || decoder.handle(&event))?;
                // A table met for the first time after DDL: the catalog is read again, all of it
                // in one query.
                if mariadb && !decoder.wanted_tables().is_empty() {
                    decoder.set_catalog(column_catalog_now().await?);
                }
                if let Some(tx) = committed {
                    let end = tx.end_lsn;
                    let spilled = decoder.spilled_bytes();
                    super::release(&*bus, tx, status)
                        .await
                        .map_err(|e| BinlogError::Release(e.to_string()))?;
                    released.push_back((end, decoder.last_gtid().map(str::to_string)));
                    received = end;
                    let mut s = status.lock().expect("poisoned");
                    s.received_lsn = Some(received.to_string());
                    s.spilled_bytes = spilled;
                }
            }
            _ = tick.tick() => {
                let mut to = bus.confirmable().filter(|l| *l > asked);
                if decoder.idle() && bus.all_acked() {
                    if let Some(b) = decoder.boundary() {
                        if b > asked && to.is_none_or(|t| b > t) {
                            to = Some(b);
                        }
                    }
                }
                if let Some(to) = to {
                    while released.front().is_some_and(|(l, _)| *l <= to) {
                        let (_, g) = released.pop_front().expect("peeked");
                        if g.is_some() {
                            gtid = g;
                        }
                    }
                    let like = decoder.file().unwrap_or(&start.file);
                    if let Some(position) = position::from_lsn(to, like) {
                        save_tx.send_replace(Some((to, Stored { position, gtid: gtid.clone() })));
                        asked = to;
                    }
                }
                if let Some(saved) = *saved_rx.borrow_and_update() {
                    confirmed = confirmed.max(saved);
                }
                let logs = logs_rx.borrow_and_update().clone();
                let mut s = status.lock().expect("poisoned");
                if received > Lsn(0) {
                    s.received_lsn = Some(received.to_string());
                }
                s.confirmed_lsn = Some(confirmed.to_string());
                s.buffered_bytes = decoder.memory() as u64;
                s.peak_buffered_bytes = decoder.peak_memory() as u64;
                s.spilled_bytes = decoder.spilled_bytes();
                if decoder.rejected() > reported_rejected {
                    s.rejected_messages += decoder.rejected() - reported_rejected;
                    reported_rejected = decoder.rejected();
                }
                if let Some(logs) = logs {
                    let like = decoder.file().unwrap_or(&start.file).to_string();
                    let at = position::from_lsn(confirmed, &like);
                    let end = logs.last().and_then(|(f, size)| position::to_lsn(f, *size).ok());
                    // The file of the stored position purged (past the retention bound,
                    // crate::mysql::retention, or the server's expiry): a restart could not
                    // resume, so the changes since may be lost. Said now, not at the next
                    // reconnection. Older than the oldest listed file, not merely absent: the
                    // list is refreshed every 5 s, so a file rotated in since is not in it yet.
                    let oldest = logs.first().and_then(|(f, _)| position::to_lsn(f, 0).ok());
                    if let (Some(at), Some(oldest)) = (at.as_ref(), oldest) {
                        if confirmed.0 >> 32 < oldest.0 >> 32 {
                            return Err(BinlogError::SlotLost(format!("{at} (its file was purged)")));
                        }
                    }
                    s.lag_bytes = at.and_then(|at| lag_bytes(&logs, &at));
                    s.server_lsn = end.map(|l| l.to_string());
                }
            }
            _ = bus.rewind_requested() => {
                if bus.rewind_generation() != generation {
                    *rewound = Some(stream);
                    return Err(BinlogError::Rewind);
                }
            }
        }
    }
}

/// Aborts a task of the stream when the stream's pass ends (returns or fails).
struct AbortOnDrop(tokio::task::JoinHandle<()>);

impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        self.0.abort();
    }
}

/// Stores the newest position asked for on `asked` and reports each one stored on `saved`;
/// a failed save is retried (after 500 ms) unless a newer position comes first.
async fn save_positions(
    control: deadpool_postgres::Pool,
    project_id: String,
    mut asked: tokio::sync::watch::Receiver<Option<(Lsn, Stored)>>,
    saved: tokio::sync::watch::Sender<Option<Lsn>>,
) {
    while asked.changed().await.is_ok() {
        let Some((lsn, stored)) = asked.borrow_and_update().clone() else {
            continue;
        };
        if saved.borrow().is_some_and(|s| s >= lsn) {
            continue;
        }
        let result = match control.get().await {
            Ok(c) => position::save(&**c, &project_id, &stored)
                .await
                .map_err(|e| e.to_string()),
            Err(e) => Err(e.to_string()),
        };
        match result {
            Ok(()) => {
                saved.send_replace(Some(lsn));
            }
            Err(e) => {
                // Kept in memory; stored on a later attempt.
                tracing::warn!(project_id, error = %e, "storing the binlog position");
                tokio::time::sleep(Duration::from_millis(500)).await;
                asked.mark_changed();
            }
        }
    }
}

/// The server's binary log files and sizes every 5 s (the stream's lag), on `catalog`.
/// [`LogLister`]'s reader: the list every 5 s, on a connection opened again after a failure.
async fn list_logs(opts: Opts, logs: tokio::sync::watch::Sender<Option<Vec<(String, u64)>>>) {
    let mut conn: Option<Conn> = None;
    loop {
        if conn.is_none() {
            conn = Conn::new(opts.clone()).await.ok();
        }
        if let Some(c) = conn.as_mut() {
            match binary_logs(c).await {
                Ok(list) => {
                    logs.send_replace(Some(list));
                }
                Err(e) => {
                    tracing::debug!(error = %e, "listing the binary logs");
                    conn = None;
                }
            }
        }
        tokio::time::sleep(Duration::from_secs(5)).await;
    }
}

#[cfg(test)]
mod tests {
    use std::collections::HashSet;

    use super::*;

    #[test]
    fn server_ids_are_stable_distinct_and_in_the_upper_half() {
        let a = server_id("node-a", "0123456789abcdef");
        assert_eq!(a, server_id("node-a", "0123456789abcdef"));
        assert!(a >= 0x8000_0000);
        let mut ids = HashSet::new();
        for node in ["node-a", "node-b"] {
            for i in 0..1000 {
                ids.insert(server_id(node, &format!("{i:016x}")));
            }
        }
        assert_eq!(ids.len(), 2000);
        // The separator keeps ("ab", "c") and ("a", "bc") apart.
        assert_ne!(server_id("ab", "c"), server_id("a", "bc"));
    }

    #[test]
    fn lag_counts_the_bytes_after_the_position() {
        let logs = vec![
            ("binlog.000001".to_string(), 1000),
            ("binlog.000002".to_string(), 500),
            ("binlog.000003".to_string(), 300),
        ];
        let at = |file: &str, offset| BinlogPosition {
            file: file.into(),
            offset,
        };
        assert_eq!(lag_bytes(&logs, &at("binlog.000003", 300)), Some(0));
        assert_eq!(lag_bytes(&logs, &at("binlog.000002", 100)), Some(400 + 300));
        assert_eq!(lag_bytes(&logs, &at("binlog.000001", 4)), Some(996 + 800));
        assert_eq!(lag_bytes(&logs, &at("binlog.000009", 4)), None);
    }

    #[test]
    fn errors_are_transient_or_definite() {
        let server = |code| {
            BinlogError::Mysql(mysql_async::Error::Server(mysql_async::ServerError {
                code,
                message: "m".into(),
                state: "HY000".into(),
            }))
        };
        for code in [1053, 1040, 1203, 1927, 2013] {
            assert!(server(code).is_transient(), "{code}");
        }
        for code in [1045, 1227, 1236, 1049] {
            assert!(!server(code).is_transient(), "{code}");
        }
        // A 1236 alone is not a loss: only once checked against the server's files.
        assert_eq!(server(1236).state(), StreamState::Failed);
        assert_eq!(server(1045).state(), StreamState::Failed);
        assert!(BinlogError::Replaced("x".into()).is_transient());
        assert!(!BinlogError::Unreadable("x".into()).is_transient());
        assert_eq!(
            BinlogError::Unreadable("x".into()).state(),
            StreamState::Failed
        );
        assert!(BinlogError::Ended.is_transient());
        assert!(BinlogError::Control("down".into()).is_transient());
        assert!(!BinlogError::SlotLost("binlog.000001:4".into()).is_transient());
        assert_eq!(
            BinlogError::SlotLost("x".into()).state(),
            StreamState::SlotLost
        );
        assert!(!BinlogError::Settings("x".into()).is_transient());
        assert!(!BinlogError::Decode(decode::DecodeError::Compressed(166)).is_transient());
        assert!(
            BinlogError::Decode(decode::DecodeError::Spill(std::io::Error::other("full")))
                .is_transient()
        );
        assert!(
            BinlogError::Mysql(mysql_async::Error::Io(mysql_async::IoError::Io(
                std::io::Error::other("reset")
            )))
            .is_transient()
        );
    }

    /// The 1236 messages of MySQL 5.7/8.0/8.4 (sql/rpl_binlog_sender.cc, with the event range
    /// the sender appends) and MariaDB 10.11 (sql/sql_repl.cc), word for word.
    const MYSQL8_REPLACED: &str = "A replica with the same server_uuid/server_id as this \
        replica has connected to the source; the first event 'binlog.000017' at 4, the last \
        event read from './binlog.000017' at 96475, the last byte read from './binlog.000017' \
        at 96475.";
    const MYSQL57_REPLACED: &str = "A slave with the same server_uuid/server_id as this slave \
        has connected to the master; the first event 'binlog.000002' at 119263798, the last \
        event read from './binlog.000002' at 126, the last byte read from './binlog.000002' at \
        119263798.";
    const NOT_IN_INDEX: &str = "Could not find first log file name in binary log index file";
    const MYSQL8_GTID_PURGED: &str = "Cannot replicate because the source purged required \
        binary logs. Replicate the missing transactions from elsewhere, or provision a new \
        replica from backup. Consider increasing the source's binary log expiration period. \
        The GTID set sent by the replica is '', and the missing transactions are \
        '3e11fa47-71ca-11e1-9e33-c80aa9429562:1-23'";
    const MARIADB_GTID_GONE: &str = "Error: connecting slave requested to start from GTID \
        0-1-120, which is not in the master's binlog";
    const MARIADB_IMPOSSIBLE: &str = "Client requested master to start replication from \
        impossible position; the first event 'binlog.000001' at 999999, the last event read \
        from 'binlog.000001' at 4, the last byte read from 'binlog.000001' at 4.";
    const MYSQL8_PACKET: &str = "log event entry exceeded max_allowed_packet; Increase \
        max_allowed_packet on source; the first event 'binlog.000003' at 157, the last event \
        read from './binlog.000003' at 157, the last byte read from './binlog.000003' at 4247.";

    #[test]
    fn fatal_reading_errors_are_classified_by_their_message() {
        assert_eq!(fatal_kind(MYSQL8_REPLACED), FatalKind::Replaced);
        assert_eq!(fatal_kind(MYSQL57_REPLACED), FatalKind::Replaced);
        assert_eq!(fatal_kind(NOT_IN_INDEX), FatalKind::PositionGone);
        assert_eq!(fatal_kind(MYSQL8_GTID_PURGED), FatalKind::PositionGone);
        assert_eq!(fatal_kind(MARIADB_GTID_GONE), FatalKind::PositionGone);
        assert_eq!(fatal_kind(MARIADB_IMPOSSIBLE), FatalKind::Other);
        assert_eq!(fatal_kind(MYSQL8_PACKET), FatalKind::Other);
        assert_eq!(fatal_kind(""), FatalKind::Other);
    }

    #[test]
    fn only_a_stored_file_the_server_no_longer_lists_is_a_loss() {
        let logs = vec![
            ("binlog.000005".to_string(), 1000),
            ("binlog.000006".to_string(), 500),
        ];
        let at = |file: &str| BinlogPosition {
            file: file.into(),
            offset: 400,
        };
        let outcome = |message: &str, file: &str| {
            fatal_outcome(fatal_kind(message), message, &at(file), &logs)
        };
        // A replaced dump is retried whatever the files: never slot_lost.
        for file in ["binlog.000001", "binlog.000006"] {
            for m in [MYSQL8_REPLACED, MYSQL57_REPLACED] {
                let e = outcome(m, file);
                assert!(matches!(e, BinlogError::Replaced(_)), "{e:?}");
                assert!(e.is_transient());
                assert_ne!(e.state(), StreamState::SlotLost);
            }
        }
        // Purged (older than the oldest listed) or reset away (newer than the newest): lost,
        // whatever the server's words.
        for m in [
            NOT_IN_INDEX,
            MYSQL8_GTID_PURGED,
            MARIADB_IMPOSSIBLE,
            MYSQL8_PACKET,
        ] {
            for file in ["binlog.000004", "binlog.000009"] {
                let e = outcome(m, file);
                assert_eq!(e.state(), StreamState::SlotLost, "{m} {file}: {e:?}");
                assert!(!e.is_transient());
                let text = e.to_string();
                assert!(
                    text.contains(&format!("{file}:400")) && text.contains("binlog.000005"),
                    "{text}"
                );
            }
        }
        // The file is there: "gone" is not believed (retried, the next start checks again);
        // another refusal is definite, but not a loss.
        let e = outcome(NOT_IN_INDEX, "binlog.000005");
        assert!(
            e.is_transient() && e.state() != StreamState::SlotLost,
            "{e:?}"
        );
        for m in [MARIADB_IMPOSSIBLE, MYSQL8_PACKET] {
            let e = outcome(m, "binlog.000006");
            assert!(matches!(e, BinlogError::Unreadable(_)), "{e:?}");
            assert_eq!(e.state(), StreamState::Failed);
            assert!(e.to_string().contains(m));
        }
    }
}
