//! The logical replication client: a walsender session (`replication=database`) on the
//! [`wire`](crate::wire) connection, its replication commands, and the copy-both stream that
//! carries the WAL as `pgoutput` messages one way and the client's progress the other.
//!
//! ```text
//!  ReplicationClient                                                   walsender
//!    connect()            ── StartupMessage (replication=database), SCRAM ─►
//!    identify_system()    ── IDENTIFY_SYSTEM ──────────────────────────────►  (simple queries,
//!    create_logical_slot()── CREATE_REPLICATION_SLOT s LOGICAL pgoutput ───►   one row each)
//!    start()              ── START_REPLICATION SLOT s LOGICAL lsn (opts) ──►
//!                         ◄─ CopyBothResponse ('W') ───────────────────────
//!  ReplicationStream
//!    next() ─► caller     ◄─ CopyData 'w' XLogData: one pgoutput message ──  WAL, decoded
//!    next() ─► caller     ◄─ CopyData 'k' keepalive (wal_end, reply?) ─────  when idle, or to
//!                                                                            ask for a reply
//!    confirm(lsn) ◄─ caller
//!      on a reply request, ── CopyData 'r' standby status ─────────────────►  slot's
//!      every status_interval,  write = flush = apply = last confirmed LSN     confirmed_flush_lsn
//!      send_status()                                                          follows flush
//!    stop()               ── 'r' (last confirmed), CopyDone ───────────────►
//!                         ◄─ (CopyData ...) CopyDone, CommandComplete, ReadyForQuery
//!                         ── Terminate ────────────────────────────────────►
//! ```
//!
//! # What is confirmed, when, and why
//!
//! The slot's `confirmed_flush_lsn` is the promise the client makes to the server: everything
//! before it has been dealt with. After a reconnect the server resumes there and skips every
//! transaction whose commit record starts before it, and it may recycle the WAL the slot no
//! longer needs. So the stream reports only what the caller hands to
//! [`ReplicationStream::confirm`], once whatever sits downstream (the change stream's sinks) has
//! durably handled everything up to that position, normally a Commit's (or Stream Commit's)
//! `end_lsn`. It never reports a position it merely received: `pg_recvlogical` may do that
//! because it has written the data to its file by then, but here a crash between receiving
//! and delivering would lose those transactions for good. The same value goes out as write,
//! flush and apply positions: the client has no separate notion of "written but not durable".
//!
//! Until the caller confirms anything, the stream reports the position it was started from
//! (what the caller said it already has); `0/0` there is `InvalidXLogRecPtr`, which the server
//! ignores, so a stream that is never confirmed leaves the slot where it was. Confirmations
//! never move backwards.
//!
//! Two consequences for callers. During quiet periods only keepalives arrive, and the slot
//! holds WAL until something is confirmed: when nothing received is still in flight, confirming
//! a keepalive's `wal_end` is safe and lets the server recycle WAL. And a walsender asked to
//! shut down waits, up to `wal_sender_timeout`, for its sent position to be confirmed before it
//! exits (then it ends the stream with CommandComplete and no CopyDone, which [`next`] reports
//! as the end of the stream).
//!
//! Status updates go out when the server asks (a keepalive with the reply flag, sent when half
//! of `wal_sender_timeout` has passed without one), every `status_interval`, and on
//! [`ReplicationStream::send_status`]; without them the walsender drops the connection after
//! `wal_sender_timeout`.
//!
//! # Cancellation
//!
//! [`ReplicationStream::next`] is cancel-safe, so it can be one branch of `tokio::select!`: it
//! reads into the connection's buffer (a partly received message stays there), a status update
//! is encoded before anything is awaited and written from a buffer that advances with every
//! write, and an event that arrived with a reply request is kept until the reply is out, so a
//! dropped call loses nothing and sends nothing twice. The other methods are not cancel-safe:
//! a command abandoned half way leaves the session unusable (drop it and reconnect).
//!
//! Specification: [Streaming Replication Protocol] (the commands, CopyData payloads and the
//! standby status update) and [Logical Streaming Replication Parameters] (pgoutput's options).
//!
//! [`next`]: ReplicationStream::next
//! [Streaming Replication Protocol]: https://www.postgresql.org/docs/current/protocol-replication.html
//! [Logical Streaming Replication Parameters]: https://www.postgresql.org/docs/current/protocol-logical-replication.html#PROTOCOL-LOGICAL-REPLICATION-PARAMS

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use bytes::Bytes;
use tokio::time::Instant;
use tracing::{debug, trace};

use crate::pgoutput::{
    encode_standby_status, parse_copy_data, DecodeError, Lsn, PgTimestamp, ReplicationMessage,
    StandbyStatus,
};
use crate::wire::{ConnectConfig, Connection, CopyBoth, DbError, StatementResult, WireError};

/// What went wrong, classified by what the caller does next: reconnect and resume
/// ([`ReplicationError::is_retryable`]), rebuild from a new slot
/// ([`ReplicationError::is_slot_gone`]), or stop and report (everything else).
#[derive(Debug, thiserror::Error)]
pub enum ReplicationError {
    /// The connection or the server: lost connection, server shutdown, a refused command.
    #[error(transparent)]
    Wire(#[from] WireError),
    /// A CopyData payload that is neither valid XLogData nor a valid keepalive.
    #[error("undecodable replication message: {0}")]
    Decode(#[from] DecodeError),
    /// A replication command's reply did not have the shape PostgreSQL documents.
    #[error("unexpected reply to {command}: {detail}")]
    UnexpectedReply {
        command: &'static str,
        detail: String,
    },
}

impl ReplicationError {
    /// The server's error, if this is one.
    pub fn db_error(&self) -> Option<&DbError> {
        match self {
            ReplicationError::Wire(e) => e.as_db(),
            _ => None,
        }
    }

    /// Reconnecting later may work: the connection was lost or timed out, or the server is
    /// shutting down, restarting or out of connection slots. Resume from the last confirmed
    /// position; the server sends again whatever was not confirmed.
    pub fn is_retryable(&self) -> bool {
        match self {
            ReplicationError::Wire(e) => e.is_retryable(),
            _ => false,
        }
    }

    /// The slot cannot deliver changes any more, now or after a reconnect: it does not exist
    /// (42704), it was invalidated (55000, "can no longer get changes from replication slot",
    /// e.g. after exceeding `max_slot_wal_keep_size`), or WAL it needs was removed (58P01,
    /// "requested WAL segment ... has already been removed"). Changes were lost: the consumer
    /// has to resynchronise from a fresh slot and snapshot. Halt loudly.
    pub fn is_slot_gone(&self) -> bool {
        let Some(e) = self.db_error() else {
            return false;
        };
        let detail = e.detail.as_deref().unwrap_or("");
        match e.code.as_str() {
            "42704" => e.message.contains("replication slot"),
            "55000" => {
                e.message
                    .contains("can no longer get changes from replication slot")
                    || detail.contains("has been invalidated")
            }
            "58P01" => e.message.contains("has already been removed"),
            _ => false,
        }
    }

    /// Another process is streaming from the slot (55006). Not retryable as such: two consumers
    /// of one slot is a deployment error. The one exception is the caller's own previous session
    /// whose walsender has not exited yet, which the caller alone can know.
    pub fn is_slot_in_use(&self) -> bool {
        self.db_error().is_some_and(|e| e.code == "55006")
    }
}

/// The reply to `IDENTIFY_SYSTEM`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SystemIdentity {
    /// The cluster's unique system identifier (`pg_control_system()`).
    pub systemid: u64,
    /// The current timeline.
    pub timeline: u32,
    /// The current WAL flush position.
    pub xlogpos: Lsn,
    /// The connected database (`None` on a physical replication connection).
    pub dbname: Option<String>,
}

/// The reply to `CREATE_REPLICATION_SLOT`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SlotInfo {
    pub name: String,
    /// The slot's first `confirmed_flush_lsn`: streaming starts with the transactions that
    /// commit after it.
    pub consistent_point: Lsn,
}

/// `pgoutput`'s options for `START_REPLICATION`
/// ([parameters](https://www.postgresql.org/docs/current/protocol-logical-replication.html#PROTOCOL-LOGICAL-REPLICATION-PARAMS)).
/// Options left off are not sent, so older servers that do not know them are not bothered.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PgOutputOptions {
    /// 1 (PostgreSQL 10+), 2 (14+, needed for `streaming`), 3 (15+, two-phase), 4 (16+).
    pub proto_version: u32,
    /// Publications whose tables are replicated; names are sent quoted, exactly as given.
    pub publication_names: Vec<String>,
    /// Also send `pg_logical_emit_message` messages (PostgreSQL 14+).
    pub messages: bool,
    /// Send large in-progress transactions in chunks (Stream Start ... Stream Stop) once they
    /// exceed `logical_decoding_work_mem`, instead of spilling them to disk on the server until
    /// commit (PostgreSQL 14+, `proto_version` 2+).
    pub streaming: bool,
    /// Column values in binary rather than text (PostgreSQL 14+).
    pub binary: bool,
}

impl PgOutputOptions {
    /// Protocol version 1, the given publications, no optional features.
    pub fn new<S: Into<String>>(publications: impl IntoIterator<Item = S>) -> PgOutputOptions {
        PgOutputOptions {
            proto_version: 1,
            publication_names: publications.into_iter().map(Into::into).collect(),
            messages: false,
            streaming: false,
            binary: false,
        }
    }
}

/// A walsender session in command mode: a [`wire`](crate::wire) connection opened with
/// `replication=database`.
#[derive(Debug)]
pub struct ReplicationClient {
    conn: Connection,
}

impl ReplicationClient {
    /// Connects with `cfg`, forcing `replication = true`. The role needs the `REPLICATION`
    /// attribute and `pg_hba.conf` must allow it to connect to the database (a `replication`
    /// line covers only physical replication).
    pub async fn connect(cfg: &ConnectConfig) -> Result<ReplicationClient, ReplicationError> {
        let cfg = ConnectConfig {
            replication: true,
            ..cfg.clone()
        };
        let conn = Connection::connect(&cfg).await?;
        Ok(ReplicationClient { conn })
    }

    /// A run-time parameter the server reported, e.g. `server_version`.
    pub fn parameter(&self, name: &str) -> Option<&str> {
        self.conn.parameter(name)
    }

    /// The walsender's process id (`pg_stat_replication.pid`).
    pub fn backend_pid(&self) -> i32 {
        self.conn.backend_key().0
    }

    /// `IDENTIFY_SYSTEM`: the cluster, its timeline and current WAL position.
    pub async fn identify_system(&mut self) -> Result<SystemIdentity, ReplicationError> {
        const COMMAND: &str = "IDENTIFY_SYSTEM";
        let reply = Reply::of(COMMAND, self.command(COMMAND).await?)?;
        Ok(SystemIdentity {
            systemid: reply.parse("systemid")?,
            timeline: reply.parse("timeline")?,
            xlogpos: reply.parse("xlogpos")?,
            dbname: reply.optional("dbname")?.map(str::to_owned),
        })
    }

    /// `CREATE_REPLICATION_SLOT name [TEMPORARY] LOGICAL pgoutput NOEXPORT_SNAPSHOT`. A
    /// temporary slot disappears when this session ends. Slot names are 1 to 63 characters of
    /// `a-z`, `0-9` and `_` (the server checks; the name is sent quoted, exactly as given).
    /// The server waits for transactions running at the time to finish before it answers.
    pub async fn create_logical_slot(
        &mut self,
        name: &str,
        temporary: bool,
    ) -> Result<SlotInfo, ReplicationError> {
        const COMMAND: &str = "CREATE_REPLICATION_SLOT";
        let sql = format!(
            "CREATE_REPLICATION_SLOT {}{} LOGICAL pgoutput NOEXPORT_SNAPSHOT",
            quote_ident(name),
            if temporary { " TEMPORARY" } else { "" },
        );
        let reply = Reply::of(COMMAND, self.command(&sql).await?)?;
        let slot = SlotInfo {
            name: reply.required("slot_name")?.to_owned(),
            consistent_point: reply.parse("consistent_point")?,
        };
        debug!(slot = %slot.name, consistent_point = %slot.consistent_point, temporary, "slot created");
        Ok(slot)
    }

    /// `DROP_REPLICATION_SLOT name [WAIT]`. Without `wait`, a slot in use fails with SQLSTATE
    /// 55006; with it, the command waits until the slot is released.
    pub async fn drop_slot(&mut self, name: &str, wait: bool) -> Result<(), ReplicationError> {
        let sql = format!(
            "DROP_REPLICATION_SLOT {}{}",
            quote_ident(name),
            if wait { " WAIT" } else { "" }
        );
        self.command(&sql).await?;
        debug!(slot = name, "slot dropped");
        Ok(())
    }

    /// `START_REPLICATION SLOT slot LOGICAL start (options)`: switches the session to streaming.
    /// `start` is where the caller already has everything before: `0/0` resumes from the slot's
    /// `confirmed_flush_lsn`, and the server never goes back before that. Until
    /// [`ReplicationStream::confirm`] is called, status updates report `start` (see the module
    /// docs). A `status_interval` of zero sends no periodic status updates (the server's reply
    /// requests are still answered).
    pub async fn start(
        mut self,
        slot: &str,
        start: Lsn,
        options: &PgOutputOptions,
        status_interval: Duration,
    ) -> Result<ReplicationStream, ReplicationError> {
        let sql = start_replication_command(slot, start, options);
        self.conn.start_copy_both(&sql).await?;
        debug!(pid = self.backend_pid(), slot, %start, "replication started");
        Ok(ReplicationStream {
            conn: self.conn,
            confirmed: start,
            status_interval,
            next_status: Instant::now() + status_interval,
            held: None,
            unflushed: false,
            state: StreamState::Streaming,
        })
    }

    /// Sends Terminate and closes the connection (a temporary slot goes with it).
    pub async fn close(self) {
        self.conn.close().await;
    }

    async fn command(&mut self, sql: &str) -> Result<Option<StatementResult>, WireError> {
        Ok(self.conn.simple_query(sql, 1).await?.last)
    }
}

/// What the server sends while streaming.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ReplicationEvent {
    /// WAL data: with `pgoutput`, exactly one logical replication message in `data`, for
    /// [`crate::pgoutput::decode`].
    XLogData {
        /// The WAL position the server attributes to `data` (the change's record, or the
        /// transaction's); not in itself a position to confirm (see the module docs).
        wal_start: Lsn,
        /// The server's current end of WAL.
        wal_end: Lsn,
        server_clock: PgTimestamp,
        data: Bytes,
    },
    /// A primary keepalive. A reply, if requested, has already been sent.
    Keepalive {
        /// The server's current end of WAL: safe to confirm when nothing received earlier is
        /// still in flight.
        wal_end: Lsn,
        server_clock: PgTimestamp,
    },
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum StreamState {
    Streaming,
    /// The server sent CopyDone: its half of the copy is over.
    ServerDone,
    /// The server sent CommandComplete (and maybe ReadyForQuery): the command is over.
    Ended,
    /// An error was returned; the session is unusable.
    Failed,
}

/// The copy-both stream of `START_REPLICATION`: WAL in, progress out. Dropping it closes the
/// connection (the walsender exits; nothing further is confirmed); [`ReplicationStream::stop`]
/// ends it in an orderly way.
#[derive(Debug)]
pub struct ReplicationStream {
    conn: Connection,
    confirmed: Lsn,
    status_interval: Duration,
    next_status: Instant,
    /// An event that arrived with a reply request, returned once the reply is written.
    held: Option<ReplicationEvent>,
    /// Messages are queued on the connection but not yet (completely) written.
    unflushed: bool,
    state: StreamState,
}

impl ReplicationStream {
    /// The next event; `None` once the server has ended the stream. While waiting it answers the
    /// server's reply requests at once and sends a status update every `status_interval`, each
    /// with the last confirmed position. Cancel-safe (see the module docs). After an error the
    /// stream is unusable: every later call fails with [`WireError::Closed`].
    pub async fn next(&mut self) -> Result<Option<ReplicationEvent>, ReplicationError> {
        loop {
            match self.state {
                StreamState::Streaming => {}
                StreamState::ServerDone | StreamState::Ended => return Ok(None),
                StreamState::Failed => return Err(WireError::Closed.into()),
            }
            if self.unflushed {
                self.flush().await?;
            }
            if let Some(event) = self.held.take() {
                return Ok(Some(event));
            }
            if self.status_due() {
                self.queue_status(false)?;
                continue;
            }
            let deadline = self.periodic_status();
            // The connection first: a message already buffered (most of them, while a backlog
            // drains) is taken without arming the timer. The timer only wakes an idle stream:
            // a status that falls due while messages keep coming is sent above.
            let received = tokio::select! {
                biased;
                received = self.conn.copy_both_recv() => received,
                () = sleep_until(deadline) => continue,
            };
            let message = match received {
                Ok(CopyBoth::Data(payload)) => payload,
                Ok(CopyBoth::Done) => {
                    debug!(pid = self.pid(), "the server ended the stream (CopyDone)");
                    self.state = StreamState::ServerDone;
                    continue;
                }
                Ok(CopyBoth::Complete | CopyBoth::Ready) => {
                    debug!(pid = self.pid(), "the server ended the command");
                    self.state = StreamState::Ended;
                    continue;
                }
                Err(e) => return Err(self.failed(e.into())),
            };
            match parse_copy_data(message).map_err(|e| self.failed(e.into()))? {
                ReplicationMessage::XLogData(x) => {
                    return Ok(Some(ReplicationEvent::XLogData {
                        wal_start: x.wal_start,
                        wal_end: x.wal_end,
                        server_clock: x.server_clock,
                        data: x.data,
                    }))
                }
                ReplicationMessage::PrimaryKeepalive(k) => {
                    let event = ReplicationEvent::Keepalive {
                        wal_end: k.wal_end,
                        server_clock: k.server_clock,
                    };
                    if !k.reply_requested {
                        return Ok(Some(event));
                    }
                    trace!(pid = self.pid(), wal_end = %k.wal_end, "reply requested");
                    self.queue_status(false)?;
                    self.held = Some(event);
                }
            }
        }
    }

    /// Records that everything before `flushed` has been durably handled downstream; the next
    /// status update reports it. Never moves backwards: an older position is ignored.
    pub fn confirm(&mut self, flushed: Lsn) {
        self.confirmed = self.confirmed.max(flushed);
    }

    /// The position status updates report: the highest confirmed, or where the stream started.
    pub fn confirmed(&self) -> Lsn {
        self.confirmed
    }

    /// The walsender's process id (`pg_stat_replication.pid`).
    pub fn backend_pid(&self) -> i32 {
        self.pid()
    }

    /// Sends a status update with the last confirmed position now, asking the server to answer
    /// with a keepalive if `reply_requested`. Restarts the `status_interval` timer.
    pub async fn send_status(&mut self, reply_requested: bool) -> Result<(), ReplicationError> {
        match self.state {
            StreamState::Streaming | StreamState::ServerDone => {}
            StreamState::Ended | StreamState::Failed => return Err(WireError::Closed.into()),
        }
        self.queue_status(reply_requested)?;
        self.flush().await
    }

    /// Ends streaming: a last status update with the confirmed position, CopyDone, then reads
    /// (and drops) whatever the server still sends up to ReadyForQuery, and closes the session.
    /// A walsender in the middle of decoding a large transaction may take a while to notice the
    /// CopyDone; wrap this in a timeout if that matters, and drop the stream if it expires.
    pub async fn stop(mut self) -> Result<(), ReplicationError> {
        let result = self.finish().await;
        self.conn.close().await;
        debug!(confirmed = %self.confirmed, ok = result.is_ok(), "replication stopped");
        result
    }

    async fn finish(&mut self) -> Result<(), ReplicationError> {
        match self.state {
            StreamState::Failed => return Ok(()),
            StreamState::Streaming | StreamState::ServerDone => {
                self.queue_status(false)?;
                self.conn.queue_copy_done();
                self.flush().await?;
            }
            StreamState::Ended => {}
        }
        let mut ended = self.state == StreamState::Ended;
        loop {
            match self.conn.copy_both_recv().await {
                Ok(CopyBoth::Data(_) | CopyBoth::Done) => {}
                Ok(CopyBoth::Complete) => ended = true,
                Ok(CopyBoth::Ready) => return Ok(()),
                // A walsender that ends the command at shutdown exits without ReadyForQuery.
                Err(WireError::Closed) if ended => return Ok(()),
                Err(e) => return Err(e.into()),
            }
        }
    }

    fn pid(&self) -> i32 {
        self.conn.backend_key().0
    }

    fn status_due(&self) -> bool {
        !self.status_interval.is_zero() && Instant::now() >= self.next_status
    }

    fn periodic_status(&self) -> Option<Instant> {
        (!self.status_interval.is_zero()).then_some(self.next_status)
    }

    /// Encodes a status update onto the connection (nothing awaited) and restarts the timer.
    fn queue_status(&mut self, reply_requested: bool) -> Result<(), ReplicationError> {
        let status = StandbyStatus {
            written: self.confirmed,
            flushed: self.confirmed,
            applied: self.confirmed,
            client_clock: now(),
            reply_requested,
        };
        self.conn
            .queue_copy_data(encode_standby_status(&status))
            .map_err(|e| self.failed(e.into()))?;
        self.unflushed = true;
        self.next_status = Instant::now() + self.status_interval;
        trace!(pid = self.pid(), confirmed = %self.confirmed, reply_requested, "status update queued");
        Ok(())
    }

    /// Writes what is queued. Cancel-safe.
    async fn flush(&mut self) -> Result<(), ReplicationError> {
        if let Err(e) = self.conn.flush_queued().await {
            return Err(self.failed(e.into()));
        }
        self.unflushed = self.conn.has_queued();
        Ok(())
    }

    fn failed(&mut self, e: ReplicationError) -> ReplicationError {
        debug!(pid = self.pid(), error = %e, "replication stream failed");
        self.state = StreamState::Failed;
        e
    }
}

async fn sleep_until(deadline: Option<Instant>) {
    match deadline {
        Some(deadline) => tokio::time::sleep_until(deadline).await,
        None => std::future::pending().await,
    }
}

fn now() -> PgTimestamp {
    let micros = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| i64::try_from(d.as_micros()).unwrap_or(i64::MAX));
    PgTimestamp::from_unix_micros(micros)
}

/// The one row of a replication command's reply, by column name.
struct Reply {
    command: &'static str,
    result: StatementResult,
}

impl Reply {
    fn of(
        command: &'static str,
        result: Option<StatementResult>,
    ) -> Result<Reply, ReplicationError> {
        match result {
            Some(result) if result.rows.len() == 1 => Ok(Reply { command, result }),
            Some(result) => Err(ReplicationError::UnexpectedReply {
                command,
                detail: format!("{} rows instead of 1", result.rows.len()),
            }),
            None => Err(ReplicationError::UnexpectedReply {
                command,
                detail: "no result".into(),
            }),
        }
    }

    fn optional(&self, column: &str) -> Result<Option<&str>, ReplicationError> {
        let index = self
            .result
            .columns
            .iter()
            .position(|c| c.name == column)
            .ok_or_else(|| self.error(format!("no column {column}")))?;
        Ok(self.result.rows[0][index].as_deref())
    }

    fn required(&self, column: &str) -> Result<&str, ReplicationError> {
        self.optional(column)?
            .ok_or_else(|| self.error(format!("{column} is NULL")))
    }

    fn parse<T: std::str::FromStr>(&self, column: &str) -> Result<T, ReplicationError> {
        let text = self.required(column)?;
        text.parse()
            .map_err(|_| self.error(format!("{column} {text:?} does not parse")))
    }

    fn error(&self, detail: String) -> ReplicationError {
        ReplicationError::UnexpectedReply {
            command: self.command,
            detail,
        }
    }
}

/// `START_REPLICATION SLOT "s" LOGICAL X/X (proto_version '2', publication_names '"a","b"', ...)`.
/// The slot is a quoted identifier; option values are string literals (quotes doubled, no
/// backslash escapes in the replication grammar); `publication_names` is a comma-separated list
/// of identifiers that pgoutput splits with `SplitIdentifierString`, so each name is quoted
/// inside the literal to keep its case, commas and quotes.
fn start_replication_command(slot: &str, start: Lsn, options: &PgOutputOptions) -> String {
    let publications = options
        .publication_names
        .iter()
        .map(|name| quote_ident(name))
        .collect::<Vec<_>>()
        .join(",");
    let mut opts = vec![
        ("proto_version", options.proto_version.to_string()),
        ("publication_names", publications),
    ];
    if options.messages {
        opts.push(("messages", "true".into()));
    }
    if options.streaming {
        opts.push(("streaming", "on".into()));
    }
    if options.binary {
        opts.push(("binary", "true".into()));
    }
    let opts = opts
        .iter()
        .map(|(name, value)| format!("{name} {}", quote_literal(value)))
        .collect::<Vec<_>>()
        .join(", ");
    format!(
        "START_REPLICATION SLOT {} LOGICAL {start} ({opts})",
        quote_ident(slot)
    )
}

fn quote_ident(name: &str) -> String {
    format!("\"{}\"", name.replace('"', "\"\""))
}

fn quote_literal(value: &str) -> String {
    format!("'{}'", value.replace('\'', "''"))
}

#[cfg(test)]
mod tests {
    //! Command text and error classification; the protocol itself is tested against PostgreSQL
    //! in `tests/it/replication.rs`.
    use super::*;
    use crate::wire::Phase;
    use tokio::io::{AsyncReadExt, AsyncWriteExt, DuplexStream};

    fn db(code: &str, message: &str, detail: Option<&str>) -> ReplicationError {
        ReplicationError::Wire(WireError::Db(Box::new(DbError {
            severity: "ERROR".into(),
            code: code.into(),
            message: message.into(),
            detail: detail.map(Into::into),
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
            phase: Phase::Query,
        })))
    }

    fn backend(tag: u8, body: &[u8]) -> Vec<u8> {
        let mut out = vec![tag];
        out.extend_from_slice(&(body.len() as i32 + 4).to_be_bytes());
        out.extend_from_slice(body);
        out
    }

    async fn read_frontend(s: &mut DuplexStream) -> Option<(u8, Vec<u8>)> {
        let tag = s.read_u8().await.ok()?;
        let len = s.read_i32().await.unwrap() as usize;
        let mut body = vec![0; len - 4];
        s.read_exact(&mut body).await.unwrap();
        Some((tag, body))
    }

    /// A keepalive asking for a reply: 'k', wal_end, clock, reply flag.
    fn keepalive_requesting_a_reply() -> Vec<u8> {
        let mut payload = vec![b'k'];
        payload.extend_from_slice(&0x20u64.to_be_bytes());
        payload.extend_from_slice(&0i64.to_be_bytes());
        payload.push(1);
        backend(b'd', &payload)
    }

    /// Cancellation in the middle of writing a reply: the pipe holds 8 bytes and the scripted
    /// walsender reads the reply's first byte (so the write has begun) and then nothing until
    /// told to, so the 39-byte status update cannot be written whole when the first `next()` is
    /// dropped.
    #[tokio::test]
    async fn a_next_dropped_while_writing_a_reply_finishes_it_later_and_keeps_the_event() {
        let (client_end, mut server) = tokio::io::duplex(8);
        let (go_on, wait) = tokio::sync::oneshot::channel::<()>();
        let (begun, writing) = tokio::sync::oneshot::channel::<()>();
        let walsender = tokio::spawn(async move {
            let len = server.read_i32().await.unwrap() as usize;
            let mut startup = vec![0; len - 4];
            server.read_exact(&mut startup).await.unwrap();
            assert!(startup.windows(9).any(|w| w == b"database\0"));
            let ok = [&0i32.to_be_bytes()[..]].concat();
            server.write_all(&backend(b'R', &ok)).await.unwrap();
            server.write_all(&backend(b'Z', b"I")).await.unwrap();
            let (tag, query) = read_frontend(&mut server).await.unwrap();
            assert_eq!(tag, b'Q');
            assert!(query.starts_with(b"START_REPLICATION SLOT \"s\" LOGICAL 0/10 "));
            server.write_all(&backend(b'W', &[0, 0, 0])).await.unwrap();
            server
                .write_all(&keepalive_requesting_a_reply())
                .await
                .unwrap();
            assert_eq!(server.read_u8().await.unwrap(), b'd', "the reply begins");
            begun.send(()).unwrap();
            wait.await.unwrap();
            let len = server.read_i32().await.unwrap() as usize;
            let mut body = vec![0; len - 4];
            server.read_exact(&mut body).await.unwrap();
            let mut received = vec![(b'd', body)];
            while let Some((tag, body)) = read_frontend(&mut server).await {
                if tag == b'c' {
                    let mut end = backend(b'c', b"");
                    end.extend(backend(b'C', b"START_REPLICATION\0"));
                    end.extend(backend(b'Z', b"I"));
                    server.write_all(&end).await.unwrap();
                }
                received.push((tag, body));
            }
            received
        });

        let cfg = ConnectConfig {
            replication: true,
            ..ConnectConfig::default()
        };
        let conn = Connection::handshake(Box::new(client_end), &cfg)
            .await
            .unwrap();
        let mut stream = ReplicationClient { conn }
            .start("s", Lsn(0x10), &PgOutputOptions::new(["p"]), Duration::ZERO)
            .await
            .unwrap();
        // Dropped once the walsender has seen the reply begin: it cannot be written whole yet.
        tokio::select! {
            biased;
            _ = writing => {}
            event = stream.next() => panic!("next() returned {event:?} before its reply was read"),
        }
        go_on.send(()).unwrap();
        // A hang guard only.
        let event = tokio::time::timeout(Duration::from_secs(60), stream.next())
            .await
            .unwrap()
            .unwrap();
        assert_eq!(
            event,
            Some(ReplicationEvent::Keepalive {
                wal_end: Lsn(0x20),
                server_clock: PgTimestamp(0),
            })
        );
        stream.confirm(Lsn(0x18));
        stream.stop().await.unwrap();

        let received = walsender.await.unwrap();
        let tags: Vec<u8> = received.iter().map(|(tag, _)| *tag).collect();
        assert_eq!(tags, b"ddcX", "reply, final status, CopyDone, Terminate");
        let status = |body: &[u8]| -> (u8, u64, u64, u64, u8) {
            assert_eq!(body.len(), 34);
            let lsn = |at: usize| u64::from_be_bytes(body[at..at + 8].try_into().unwrap());
            (body[0], lsn(1), lsn(9), lsn(17), body[33])
        };
        assert_eq!(status(&received[0].1), (b'r', 0x10, 0x10, 0x10, 0));
        assert_eq!(status(&received[1].1), (b'r', 0x18, 0x18, 0x18, 0));
    }

    #[test]
    fn start_replication_quotes_the_slot_publications_and_option_values() {
        let options = PgOutputOptions {
            proto_version: 2,
            messages: true,
            streaming: true,
            ..PgOutputOptions::new(["plain", "Mixed, \"odd\"", "it's"])
        };
        assert_eq!(
            start_replication_command("slot_1", Lsn(0x16_B374_D848), &options),
            "START_REPLICATION SLOT \"slot_1\" LOGICAL 16/B374D848 (proto_version '2', \
             publication_names '\"plain\",\"Mixed, \"\"odd\"\"\",\"it''s\"', \
             messages 'true', streaming 'on')"
        );
    }

    #[test]
    fn options_left_off_are_not_sent() {
        assert_eq!(
            start_replication_command("s", Lsn(0), &PgOutputOptions::new(["p"])),
            "START_REPLICATION SLOT \"s\" LOGICAL 0/0 (proto_version '1', publication_names '\"p\"')"
        );
    }

    #[test]
    fn lost_connections_and_shutdowns_are_retryable() {
        assert!(ReplicationError::Wire(WireError::Closed).is_retryable());
        assert!(ReplicationError::Wire(WireError::Timeout).is_retryable());
        assert!(db(
            "57P01",
            "terminating connection due to administrator command",
            None
        )
        .is_retryable());
        assert!(db("08006", "connection failure", None).is_retryable());
        assert!(!db("42704", "replication slot \"s\" does not exist", None).is_retryable());
        assert!(!ReplicationError::Wire(WireError::Protocol("x".into())).is_retryable());
    }

    #[test]
    fn missing_invalidated_and_unreadable_slots_are_gone() {
        let gone = [
            db("42704", "replication slot \"s\" does not exist", None),
            db(
                "55000",
                "can no longer get changes from replication slot \"s\"",
                Some(
                    "This slot has been invalidated because it exceeded the maximum reserved size.",
                ),
            ),
            db(
                "58P01",
                "requested WAL segment 000000010000000000000001 has already been removed",
                None,
            ),
        ];
        for e in &gone {
            assert!(e.is_slot_gone(), "{e}");
            assert!(!e.is_retryable(), "{e}");
        }
        let in_use = db("55006", "replication slot \"s\" is active for PID 42", None);
        assert!(in_use.is_slot_in_use() && !in_use.is_slot_gone() && !in_use.is_retryable());
        assert!(!db("42704", "type \"x\" does not exist", None).is_slot_gone());
        assert!(!db(
            "55000",
            "replication slot \"s\" was not created in this database",
            None
        )
        .is_slot_gone());
    }
}
