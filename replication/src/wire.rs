//! A small async PostgreSQL frontend connection that keeps results in the TEXT format.
//!
//! # Why not tokio-postgres
//!
//! The SQL-over-HTTP endpoint has to answer with each value exactly as PostgreSQL prints it, plus
//! the column's type OID so that [`crate::values`] can render it as JSON. tokio-postgres asks for
//! binary results in the extended protocol, and its `simple_query` (text results) drops the
//! RowDescription's type OIDs. So this module speaks the
//! [frontend/backend protocol](https://www.postgresql.org/docs/current/protocol-flow.html)
//! itself, on top of the `postgres-protocol` crate (the tokio-free encoder/decoder under
//! tokio-postgres).
//!
//! # Layers
//!
//! ```text
//!  Connection::simple_query / prepare / execute_prepared      query logic, result assembly
//!        │ recv(): ParameterStatus, NoticeResponse,            session state (parameters,
//!        │         NotificationResponse absorbed here          transaction status, broken flag)
//!  Transport: read_message() / write_buf + flush()             framing only, bytes <-> Message
//!        │
//!  TCP or unix socket (no TLS: loopback/unix only)
//! ```
//!
//! The logical replication client ([`crate::client`]) reuses this connection in copy-both mode
//! (`Connection::start_copy_both` and friends, crate-private). The only message it needs that
//! `postgres-protocol` 0.6 does not decode, CopyBothResponse (`W`), is recognised in
//! `Transport::read_message` before `Message::parse`.
//!
//! # Protocol notes
//!
//! * Simple query: a string with several statements runs in one implicit transaction (unless it
//!   has its own BEGIN/COMMIT); after an ErrorResponse the rest is skipped and the server still
//!   ends with ReadyForQuery, which is where the transaction status is read
//!   ([docs](https://www.postgresql.org/docs/current/protocol-flow.html#PROTOCOL-FLOW-MULTI-STATEMENT)).
//! * Extended query: everything up to Sync is pipelined in one write; after an error the server
//!   skips to Sync, so every operation reads until ReadyForQuery and the connection stays usable.
//!   Errors before BindComplete are reported with [`Phase::Bind`] (a bad parameter value).
//! * Rows beyond `max_rows`, or past [`Connection::set_max_result_bytes`] bytes, are read and
//!   dropped as they arrive: memory stays bounded by those limits, whatever the query returns.
//!   A single DataRow larger than the byte limit is skipped as it streams in, never buffered.
//! * COPY FROM STDIN is refused with CopyFail; COPY TO STDOUT data is drained and dropped.
//! * A FATAL/PANIC ErrorResponse, an I/O or protocol error, or an operation whose future was
//!   dropped half way (e.g. by a timeout) leaves the connection [`Connection::is_broken`]: the pool
//!   must discard it. To stop a slow query and keep the connection, use [`cancel`] and keep
//!   awaiting the query, which then fails with SQLSTATE 57014.

use std::collections::HashMap;
use std::fmt;
use std::io;
use std::time::Duration;

use bytes::{Buf, BufMut, Bytes, BytesMut};
use fallible_iterator::FallibleIterator;
use postgres_protocol::authentication::md5_hash;
use postgres_protocol::authentication::sasl::{ChannelBinding, ScramSha256, SCRAM_SHA_256};
use postgres_protocol::message::backend::{
    AuthenticationSaslBody, DataRowBody, ErrorFields, Header, Message, ReadyForQueryBody,
    RowDescriptionBody,
};
use postgres_protocol::message::frontend;
use postgres_protocol::IsNull;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tracing::debug;

mod cached;
pub use cached::MAX_CACHED_STATEMENTS;

/// PostgreSQL never sends a message larger than this (`MaxAllocSize`); a larger length means the
/// stream is corrupt, and refusing it keeps a bogus header from reserving gigabytes.
const MAX_MESSAGE_LEN: usize = 1 << 30;
/// An ErrorResponse or NoticeResponse whose fields pass this many bytes keeps only these first
/// bytes (the field they cut ends in [`CUT_MARK`], later fields are dropped) and the rest is read
/// past unbuffered: a caller's `RAISE EXCEPTION '%', repeat('x', 300000000)` was otherwise held
/// whole, and answered whole (red team, session 25: 1.5 GB resident per such request).
pub const MAX_NOTICE_FIELDS: usize = 64 * 1024;
/// Ends a field [`MAX_NOTICE_FIELDS`] cut.
pub const CUT_MARK: &str = " [cut: the server's message was longer]";
const READ_CHUNK: usize = 16 * 1024;
/// The room `read_buf` keeps past a large message (`Transport::let_go_of_a_large_buffer`).
const READ_BUF_KEPT: usize = 1 << 20;

/// How to reach and log in to a PostgreSQL server.
#[derive(Clone)]
pub struct ConnectConfig {
    /// Hostname or IP address, or an absolute directory path for the unix socket
    /// `{host}/.s.PGSQL.{port}`.
    pub host: String,
    pub port: u16,
    pub user: String,
    /// Needed when the server asks for a password (cleartext, MD5 or SCRAM-SHA-256).
    pub password: Option<String>,
    pub database: String,
    pub application_name: Option<String>,
    /// Settings (GUCs) applied at session start, sent as `-c name=value` in the startup
    /// `options`, e.g. `("statement_timeout", "30000")`, `("DateStyle", "ISO, MDY")`.
    pub options: Vec<(String, String)>,
    /// Sends `replication=database` (logical replication walsender connection).
    pub replication: bool,
    /// Bounds connecting plus authentication, and [`cancel`].
    pub connect_timeout: Duration,
}

impl Default for ConnectConfig {
    fn default() -> Self {
        ConnectConfig {
            host: "127.0.0.1".into(),
            port: 5432,
            user: "postgres".into(),
            password: None,
            database: "postgres".into(),
            application_name: None,
            options: Vec::new(),
            replication: false,
            connect_timeout: Duration::from_secs(10),
        }
    }
}

impl fmt::Debug for ConnectConfig {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ConnectConfig")
            .field("host", &self.host)
            .field("port", &self.port)
            .field("user", &self.user)
            .field("password", &self.password.as_ref().map(|_| "<redacted>"))
            .field("database", &self.database)
            .field("application_name", &self.application_name)
            .field("options", &self.options)
            .field("replication", &self.replication)
            .field("connect_timeout", &self.connect_timeout)
            .finish()
    }
}

/// One result column, from RowDescription.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Column {
    pub name: String,
    pub type_oid: u32,
    pub type_modifier: i32,
    /// 0 when the column is not a plain table column.
    pub table_oid: u32,
    pub column_id: i16,
}

/// The outcome of one statement.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct StatementResult {
    /// Empty when the statement returns no rows (NoData / no RowDescription).
    pub columns: Vec<Column>,
    /// Values in PostgreSQL's text format; `None` is SQL NULL. At most `max_rows` rows.
    pub rows: Vec<Vec<Option<String>>>,
    /// More rows arrived than `max_rows`; they were read and dropped.
    pub truncated: bool,
    /// The server's command tag, e.g. `SELECT 3` (counting all rows, kept or not), `INSERT 0 1`.
    pub command_tag: String,
}

/// The memory a statement's rows take while they are read, reserved by the caller as they
/// come (an answer budget shared with other requests): see [`Connection::set_result_memory`].
pub trait ResultMemory: Send + Sync {
    /// Room for `bytes` in all (what the result being built holds now): `Some(covered)`, at
    /// least `bytes`, so that the next call comes only past it; `None`: refused, and every
    /// later call is refused too.
    fn cover(&self, bytes: usize) -> Option<usize>;
}

/// The memory a row of a [`StatementResult`] takes: its values' bytes, each value's
/// `Option<String>` and the row's `Vec` (with room for the rows `Vec` growing), so that a
/// result of many small values is not counted as its few bytes of text.
pub fn row_footprint(row: &[Option<String>]) -> usize {
    const VALUE: usize = std::mem::size_of::<Option<String>>();
    const ROW: usize = 2 * std::mem::size_of::<Vec<Option<String>>>();
    ROW + row
        .iter()
        .map(|v| VALUE + v.as_ref().map_or(0, |s| s.len()))
        .sum::<usize>()
}

/// What [`Connection::simple_query`] returns.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct SimpleOutcome {
    /// The last statement's result; `None` for an empty query string.
    pub last: Option<StatementResult>,
    /// How many statements completed (CommandComplete messages).
    pub statements: usize,
}

/// What [`Connection::prepare`] returns.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Prepared {
    /// Parameter type OIDs as the server inferred them.
    pub param_types: Vec<u32>,
    /// Empty when the statement returns no rows.
    pub columns: Vec<Column>,
}

/// Transaction status from the last ReadyForQuery.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TransactionStatus {
    Idle,
    InTransaction,
    /// In a failed transaction block: everything fails until ROLLBACK.
    Failed,
}

/// Which step of an operation the server rejected.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Phase {
    /// Startup or authentication.
    Startup,
    /// A simple query.
    Query,
    /// Parse/Describe in [`Connection::prepare`]: the statement itself is wrong.
    Parse,
    /// Bind in [`Connection::execute_prepared`]: a parameter value (or count) was refused. The
    /// server also plans the unnamed statement at Bind, so an error while folding constants
    /// (`1 / $1` with `0`) shows up here too.
    Bind,
    /// Executing a bound statement.
    Execute,
}

/// An ErrorResponse from the server
/// ([fields](https://www.postgresql.org/docs/current/protocol-error-fields.html)).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{severity}: {message} (SQLSTATE {code})")]
pub struct DbError {
    /// Non-localized severity when the server sends it: ERROR, FATAL, PANIC.
    pub severity: String,
    /// SQLSTATE.
    pub code: String,
    pub message: String,
    pub detail: Option<String>,
    pub hint: Option<String>,
    /// 1-based character position in the query text.
    pub position: Option<u32>,
    pub internal_position: Option<u32>,
    pub internal_query: Option<String>,
    /// CONTEXT, e.g. `unnamed portal parameter $1 = '...'`.
    pub where_: Option<String>,
    pub schema: Option<String>,
    pub table: Option<String>,
    pub column: Option<String>,
    pub datatype: Option<String>,
    pub constraint: Option<String>,
    pub phase: Phase,
}

impl DbError {
    fn parse(mut fields: ErrorFields<'_>, phase: Phase) -> io::Result<DbError> {
        let mut e = DbError {
            severity: String::new(),
            code: String::new(),
            message: String::new(),
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
        };
        while let Some(field) = fields.next()? {
            let value = String::from_utf8_lossy(field.value_bytes()).into_owned();
            match field.type_() {
                b'S' if e.severity.is_empty() => e.severity = value,
                b'V' => e.severity = value,
                b'C' => e.code = value,
                b'M' => e.message = value,
                b'D' => e.detail = Some(value),
                b'H' => e.hint = Some(value),
                b'P' => e.position = value.parse().ok(),
                b'p' => e.internal_position = value.parse().ok(),
                b'q' => e.internal_query = Some(value),
                b'W' => e.where_ = Some(value),
                b's' => e.schema = Some(value),
                b't' => e.table = Some(value),
                b'c' => e.column = Some(value),
                b'd' => e.datatype = Some(value),
                b'n' => e.constraint = Some(value),
                _ => {}
            }
        }
        Ok(e)
    }

    /// FATAL and PANIC errors end the session.
    pub fn is_fatal(&self) -> bool {
        matches!(self.severity.as_str(), "FATAL" | "PANIC")
    }
}

#[derive(Debug, thiserror::Error)]
pub enum WireError {
    /// The server refused something. The connection stays usable unless the error is fatal
    /// (check [`Connection::is_broken`]).
    #[error("{0}")]
    Db(Box<DbError>),
    #[error("I/O error: {0}")]
    Io(#[from] io::Error),
    /// The server sent something this client cannot make sense of.
    #[error("protocol error: {0}")]
    Protocol(String),
    /// Unsupported authentication method, missing password, failed SCRAM exchange.
    #[error("authentication failed: {0}")]
    Auth(String),
    /// The request could not be encoded (e.g. a NUL byte in the SQL or a parameter, too many
    /// parameters). Nothing was sent; the connection is unaffected.
    #[error("invalid input: {0}")]
    InvalidInput(String),
    /// Connecting, authenticating or cancelling took longer than `connect_timeout`.
    #[error("timed out")]
    Timeout,
    /// The server closed the connection, or it was already unusable.
    #[error("connection closed")]
    Closed,
}

impl WireError {
    /// The server's error, if this is one.
    pub fn as_db(&self) -> Option<&DbError> {
        match self {
            WireError::Db(e) => Some(e),
            _ => None,
        }
    }

    /// Connecting again later may work: the connection was lost or timed out, or the server is
    /// shutting down, restarting or out of connection slots. Everything else (a refused
    /// password or permission, a protocol violation, a statement's own error) comes back the
    /// same on every attempt.
    pub fn is_retryable(&self) -> bool {
        match self {
            WireError::Io(_) | WireError::Closed | WireError::Timeout => true,
            WireError::Db(e) => {
                e.code.starts_with("08") // connection exception
                    || matches!(
                        e.code.as_str(),
                        "57P01" // admin_shutdown (also pg_terminate_backend)
                        | "57P02" // crash_shutdown
                        | "57P03" // cannot_connect_now (starting up, recovery)
                        | "53300" // too_many_connections
                    )
            }
            WireError::Protocol(_) | WireError::Auth(_) | WireError::InvalidInput(_) => false,
        }
    }

    fn protocol(what: impl fmt::Display) -> WireError {
        WireError::Protocol(what.to_string())
    }
}

/// A byte stream to the server: TCP, unix socket, or an in-memory pipe in tests.
pub(crate) trait Socket: AsyncRead + AsyncWrite + Unpin + Send + Sync {
    /// The socket's descriptor, for [`Connection::has_unread_input`] (none for a pipe).
    fn descriptor(&self) -> Option<std::os::fd::BorrowedFd<'_>> {
        None
    }
}

impl Socket for tokio::net::TcpStream {
    fn descriptor(&self) -> Option<std::os::fd::BorrowedFd<'_>> {
        Some(std::os::fd::AsFd::as_fd(self))
    }
}

impl Socket for tokio::net::UnixStream {
    fn descriptor(&self) -> Option<std::os::fd::BorrowedFd<'_>> {
        Some(std::os::fd::AsFd::as_fd(self))
    }
}

impl Socket for tokio::io::DuplexStream {}

/// Framing only: backend messages out of a buffered reader, frontend messages into `write_buf`.
struct Transport {
    socket: Box<dyn Socket>,
    read_buf: BytesMut,
    write_buf: BytesMut,
    /// A DataRow longer than this is discarded as it arrives ([`Backend::SkippedDataRow`]).
    max_data_row: usize,
    /// Bytes of a discarded DataRow, or of a cut notice's rest, still to be read past.
    skipping: usize,
    /// What reading past them ends in (`None`: [`Backend::SkippedDataRow`]).
    after_skip: Option<Backend>,
}

impl Transport {
    fn new(socket: Box<dyn Socket>) -> Transport {
        Transport {
            socket,
            read_buf: BytesMut::with_capacity(READ_CHUNK),
            write_buf: BytesMut::with_capacity(1024),
            max_data_row: MAX_MESSAGE_LEN,
            skipping: 0,
            after_skip: None,
        }
    }

    /// The next backend message. Cancel-safe: a partly received message stays in `read_buf`.
    async fn read_message(&mut self) -> Result<Backend, WireError> {
        loop {
            if self.skipping > 0 {
                let n = self.skipping.min(self.read_buf.len());
                self.read_buf.advance(n);
                self.skipping -= n;
                if self.skipping == 0 {
                    return Ok(self.after_skip.take().unwrap_or(Backend::SkippedDataRow));
                }
                self.read_buf.reserve(READ_CHUNK);
                if self.socket.read_buf(&mut self.read_buf).await? == 0 {
                    return Err(WireError::Closed);
                }
                continue;
            }
            if let Some(header) = Header::parse(&self.read_buf).map_err(WireError::protocol)? {
                if header.len() as usize > MAX_MESSAGE_LEN {
                    return Err(WireError::protocol(format!(
                        "message of {} bytes (tag {:?})",
                        header.len(),
                        char::from(header.tag())
                    )));
                }
                if header.tag() == b'D' && header.len() as usize > self.max_data_row {
                    self.skipping = 1 + header.len() as usize;
                    continue;
                }
                if matches!(header.tag(), b'E' | b'N')
                    && header.len() as usize > 4 + MAX_NOTICE_FIELDS
                {
                    // Never parsed whole: `Message::parse` would reserve all of it.
                    let keep = 5 + MAX_NOTICE_FIELDS;
                    if self.read_buf.len() >= keep {
                        let head = self.read_buf.split_to(keep);
                        let fields = cut_fields(&head[5..]);
                        let mut framed = BytesMut::with_capacity(5 + fields.len());
                        framed.extend_from_slice(&[header.tag()]);
                        framed.extend_from_slice(&(4 + fields.len() as i32).to_be_bytes());
                        framed.extend_from_slice(&fields);
                        let message = Message::parse(&mut framed)
                            .map_err(WireError::protocol)?
                            .ok_or_else(|| WireError::protocol("a cut notice did not parse"))?;
                        self.skipping = 1 + header.len() as usize - keep;
                        self.after_skip = Some(Backend::Message(message));
                        continue;
                    }
                    self.read_buf.reserve(READ_CHUNK);
                    if self.socket.read_buf(&mut self.read_buf).await? == 0 {
                        return Err(WireError::Closed);
                    }
                    continue;
                }
                let total = 1 + header.len() as usize;
                if header.tag() == b'W' && self.read_buf.len() >= total {
                    // The column formats that follow say nothing the replication protocol needs.
                    self.read_buf.advance(total);
                    return Ok(Backend::CopyBothResponse);
                }
            }
            if let Some(message) =
                Message::parse(&mut self.read_buf).map_err(WireError::protocol)?
            {
                self.let_go_of_a_large_buffer();
                return Ok(Backend::Message(message));
            }
            self.read_buf.reserve(READ_CHUNK);
            if self.socket.read_buf(&mut self.read_buf).await? == 0 {
                return Err(WireError::Closed);
            }
        }
    }

    /// After a large message, `read_buf` is the rest of the allocation it was read into (a
    /// message is split off, not copied): that allocation would live as long as the buffer
    /// still had room in it — a 120 MB row kept 120 MB per connection until as much more
    /// traffic had come (red team rt6 M1). The few bytes read past the message move to a
    /// buffer of ordinary size instead, and the large allocation goes with its last message.
    fn let_go_of_a_large_buffer(&mut self) {
        if self.read_buf.capacity() > READ_BUF_KEPT && self.read_buf.len() <= READ_BUF_KEPT / 2 {
            let mut fresh = BytesMut::with_capacity(READ_CHUNK.max(self.read_buf.len()));
            fresh.extend_from_slice(&self.read_buf);
            self.read_buf = fresh;
        }
    }

    /// Encodes into `write_buf`; on failure nothing of it stays there to be sent.
    fn encode<E: fmt::Display>(
        &mut self,
        encode: impl FnOnce(&mut BytesMut) -> Result<(), E>,
    ) -> Result<(), WireError> {
        let start = self.write_buf.len();
        encode(&mut self.write_buf).map_err(|e| {
            self.write_buf.truncate(start);
            WireError::InvalidInput(e.to_string())
        })
    }

    /// Cancel-safe: `write_buf` is advanced past whatever was written, so a dropped flush
    /// leaves exactly the unsent rest for the next one.
    async fn flush(&mut self) -> Result<(), WireError> {
        self.socket.write_all_buf(&mut self.write_buf).await?;
        self.socket.flush().await?;
        Ok(())
    }
}

/// The fields of an ErrorResponse or NoticeResponse cut at `prefix`'s end (see
/// [`MAX_NOTICE_FIELDS`]): whole fields kept, the cut one ended at a character boundary with
/// [`CUT_MARK`], then the terminator.
fn cut_fields(prefix: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(prefix.len() + CUT_MARK.len() + 2);
    let mut rest = prefix;
    while let Some((&kind, value)) = rest.split_first() {
        if kind == 0 {
            break;
        }
        out.push(kind);
        match value.iter().position(|&b| b == 0) {
            Some(end) => {
                out.extend_from_slice(&value[..=end]);
                rest = &value[end + 1..];
            }
            None => {
                let whole = match std::str::from_utf8(value) {
                    Ok(_) => value.len(),
                    Err(e) => e.valid_up_to(),
                };
                out.extend_from_slice(&value[..whole]);
                out.extend_from_slice(CUT_MARK.as_bytes());
                out.push(0);
                break;
            }
        }
    }
    out.push(0);
    out
}

/// A backend message as [`Transport`] reads it: what `postgres-protocol` decodes, plus
/// CopyBothResponse (`W`), which its 0.6 decoder does not know.
pub(crate) enum Backend {
    Message(Message),
    CopyBothResponse,
    /// A DataRow over the transport's size limit, read past without keeping it.
    SkippedDataRow,
}

/// One session with the server, used by one task at a time.
pub struct Connection {
    transport: Transport,
    parameters: HashMap<String, String>,
    backend_key: (i32, i32),
    status: TransactionStatus,
    broken: bool,
    /// Set while an operation has sent its request but not yet read ReadyForQuery. Still set
    /// afterwards only if the operation's future was dropped half way.
    in_progress: bool,
    /// Simple queries sent ahead of the next operation, in the same write (see
    /// [`Connection::queue_prelude`]).
    prelude: Vec<String>,
    /// Bytes of row data one statement's result may keep (see [`Connection::set_max_result_bytes`]).
    max_result_bytes: usize,
    /// A DataRow was skipped since the result builder last looked.
    skipped_row: bool,
    /// Where the rows of a result being read are reserved (see
    /// [`Connection::set_result_memory`]).
    result_memory: Option<std::sync::Arc<dyn ResultMemory>>,
    /// Statements prepared under names of their own (see [`Connection::query_cached`]).
    cached: cached::StatementCache,
    /// The reset run between uses of the session (see [`Connection::set_session_reset`]).
    reset: Option<cached::SessionReset>,
}

impl fmt::Debug for Connection {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Connection")
            .field("pid", &self.backend_key.0)
            .field("status", &self.status)
            .field("broken", &self.is_broken())
            .finish_non_exhaustive()
    }
}

impl Connection {
    /// Opens a session: TCP or unix socket, startup, authentication, up to the first
    /// ReadyForQuery, all within `cfg.connect_timeout`.
    pub async fn connect(cfg: &ConnectConfig) -> Result<Connection, WireError> {
        tokio::time::timeout(cfg.connect_timeout, async {
            let socket = open_socket(cfg).await?;
            Connection::handshake(socket, cfg).await
        })
        .await
        .map_err(|_| WireError::Timeout)?
    }

    /// Whether the server sent anything (or closed the connection) while no operation was
    /// running: a NotificationResponse to a session that listens, a FATAL of an administrator's
    /// termination. Peeks at the socket without blocking and reads nothing (`MSG_PEEK`); false
    /// when it cannot tell (an in-memory socket). A pool checks its idle connections with it: an
    /// idle session that listens is never read, so PostgreSQL blocks sending it notifications
    /// and its place in the cluster's one NOTIFY queue holds the queue's tail.
    pub fn has_unread_input(&self) -> bool {
        if !self.transport.read_buf.is_empty() {
            return true;
        }
        let Some(fd) = self.transport.socket.descriptor() else {
            return false;
        };
        let mut byte = [0u8; 1];
        use rustix::net::RecvFlags;
        // Data waiting, or the end of the stream (0 bytes); EAGAIN is a quiet socket.
        match rustix::net::recv(fd, &mut byte, RecvFlags::PEEK | RecvFlags::DONTWAIT) {
            Ok(_) => true,
            Err(e) => e != rustix::io::Errno::AGAIN && e != rustix::io::Errno::INTR,
        }
    }

    /// Startup and authentication over an open socket (an in-memory pipe in unit tests).
    pub(crate) async fn handshake(
        socket: Box<dyn Socket>,
        cfg: &ConnectConfig,
    ) -> Result<Connection, WireError> {
        let mut conn = Connection {
            transport: Transport::new(socket),
            parameters: HashMap::new(),
            backend_key: (0, 0),
            status: TransactionStatus::Idle,
            broken: false,
            in_progress: true,
            prelude: Vec::new(),
            max_result_bytes: usize::MAX,
            skipped_row: false,
            result_memory: None,
            cached: cached::StatementCache::default(),
            reset: None,
        };
        let params = startup_parameters(cfg);
        conn.transport.encode(|buf| {
            frontend::startup_message(params.iter().map(|(k, v)| (*k, v.as_str())), buf)
        })?;
        conn.send().await?;
        conn.authenticate(cfg).await?;
        loop {
            match conn.recv().await? {
                Message::BackendKeyData(key) => {
                    conn.backend_key = (key.process_id(), key.secret_key())
                }
                Message::ErrorResponse(body) => {
                    return Err(conn.server_error(body.fields(), Phase::Startup))
                }
                Message::ReadyForQuery(body) => {
                    conn.ready(&body)?;
                    break;
                }
                other => return Err(conn.unexpected(&other, "startup")),
            }
        }
        debug!(
            pid = conn.backend_key.0,
            server_version = conn.parameter("server_version"),
            "connected"
        );
        Ok(conn)
    }

    async fn authenticate(&mut self, cfg: &ConnectConfig) -> Result<(), WireError> {
        let password = || {
            cfg.password.as_deref().ok_or_else(|| {
                WireError::Auth("the server asks for a password, none is configured".into())
            })
        };
        loop {
            match self.recv().await? {
                Message::AuthenticationOk => return Ok(()),
                Message::AuthenticationCleartextPassword => {
                    debug!("authenticating with cleartext password");
                    let password = password()?;
                    self.transport
                        .encode(|buf| frontend::password_message(password.as_bytes(), buf))?;
                    self.send().await?;
                }
                Message::AuthenticationMd5Password(body) => {
                    debug!("authenticating with MD5");
                    let hash = md5_hash(cfg.user.as_bytes(), password()?.as_bytes(), body.salt());
                    self.transport
                        .encode(|buf| frontend::password_message(hash.as_bytes(), buf))?;
                    self.send().await?;
                }
                Message::AuthenticationSasl(body) => self.scram(&body, password()?).await?,
                Message::ErrorResponse(body) => {
                    return Err(self.server_error(body.fields(), Phase::Startup))
                }
                other => {
                    self.broken = true;
                    return Err(WireError::Auth(format!(
                        "unsupported authentication method ({})",
                        message_name(&other)
                    )));
                }
            }
        }
    }

    /// SCRAM-SHA-256 without channel binding (there is no TLS to bind to).
    async fn scram(
        &mut self,
        body: &AuthenticationSaslBody,
        password: &str,
    ) -> Result<(), WireError> {
        let mechanisms: Vec<String> = body
            .mechanisms()
            .map(|m| Ok(m.to_owned()))
            .collect()
            .map_err(|e| self.fail(WireError::protocol(e)))?;
        if !mechanisms.iter().any(|m| m == SCRAM_SHA_256) {
            self.broken = true;
            return Err(WireError::Auth(format!(
                "unsupported SASL mechanisms {mechanisms:?}"
            )));
        }
        debug!("authenticating with SCRAM-SHA-256");
        let mut scram = ScramSha256::new(password.as_bytes(), ChannelBinding::unsupported());
        self.transport
            .encode(|buf| frontend::sasl_initial_response(SCRAM_SHA_256, scram.message(), buf))?;
        self.send().await?;

        match self.recv().await? {
            Message::AuthenticationSaslContinue(body) => scram
                .update(body.data())
                .map_err(|e| self.fail(WireError::Auth(format!("SCRAM: {e}"))))?,
            Message::ErrorResponse(body) => {
                return Err(self.server_error(body.fields(), Phase::Startup))
            }
            other => return Err(self.unexpected(&other, "SCRAM")),
        }
        self.transport
            .encode(|buf| frontend::sasl_response(scram.message(), buf))?;
        self.send().await?;

        match self.recv().await? {
            Message::AuthenticationSaslFinal(body) => scram
                .finish(body.data())
                .map_err(|e| self.fail(WireError::Auth(format!("SCRAM: {e}")))),
            Message::ErrorResponse(body) => Err(self.server_error(body.fields(), Phase::Startup)),
            other => Err(self.unexpected(&other, "SCRAM")),
        }
    }

    /// Runs `sql` with the simple query protocol and returns the last statement's result (at
    /// most `max_rows` rows kept) and how many statements completed. Several statements run as
    /// PostgreSQL runs them: one implicit transaction unless the text has its own BEGIN/COMMIT.
    /// Earlier statements' rows are dropped as they stream. On an ErrorResponse the rest of the
    /// response is read (the connection stays usable) and the error returned.
    pub async fn simple_query(
        &mut self,
        sql: &str,
        max_rows: usize,
    ) -> Result<SimpleOutcome, WireError> {
        self.ensure_usable()?;
        let pipelined = self.encode_pipelined_prelude()?;
        if pipelined.is_none() {
            self.run_preludes().await?;
        }
        if let Err(e) = self.transport.encode(|buf| frontend::query(sql, buf)) {
            // The pipelined reset was encoded for this Query: never sent without it.
            self.transport.write_buf.clear();
            return Err(e);
        }
        self.send().await?;
        if let Some(executes) = pipelined {
            self.finish_pipelined_prelude(executes).await?;
        }

        let mut current: Option<ResultBuilder> = None;
        let mut outcome = SimpleOutcome::default();
        let mut error = None;
        loop {
            match self.recv().await? {
                Message::RowDescription(body) => {
                    outcome.last = None;
                    self.skipped_row = false;
                    let columns = self.columns(&body)?;
                    current = Some(self.result_builder(columns, max_rows));
                }
                Message::DataRow(row) => match current.as_mut() {
                    Some(builder) => {
                        if self.skipped_row {
                            self.skipped_row = false;
                            builder.truncated = true;
                        }
                        builder.push(&row).map_err(|e| self.fail(e))?
                    }
                    None => {
                        return Err(self.fail(WireError::protocol("DataRow without RowDescription")))
                    }
                },
                Message::CommandComplete(body) => {
                    let tag = body.tag().map_err(|e| self.fail(WireError::protocol(e)))?;
                    self.saw_tag(tag);
                    let mut builder = current
                        .take()
                        .unwrap_or_else(|| ResultBuilder::new(Vec::new(), 0, 0));
                    if self.take_skipped_row() {
                        builder.truncated = true;
                    }
                    outcome.last = Some(builder.finish(tag));
                    outcome.statements += 1;
                }
                Message::EmptyQueryResponse => current = None,
                Message::ErrorResponse(body) => {
                    error = Some(self.recoverable_error(&body, Phase::Query)?)
                }
                Message::CopyInResponse(_) => self.refuse_copy_in(false).await?,
                Message::CopyOutResponse(_) | Message::CopyData(_) | Message::CopyDone => {}
                Message::ReadyForQuery(body) => {
                    self.ready(&body)?;
                    break;
                }
                other => return Err(self.unexpected(&other, "simple query")),
            }
        }
        debug!(
            pid = self.backend_key.0,
            statements = outcome.statements,
            failed = error.is_some(),
            "simple query done"
        );
        match error {
            Some(e) => Err(WireError::Db(e)),
            None => Ok(outcome),
        }
    }

    /// Parses `sql` as the unnamed statement (parameter types left to the server) and describes
    /// it: Parse + Describe + Sync. Errors carry [`Phase::Parse`].
    pub async fn prepare(&mut self, sql: &str) -> Result<Prepared, WireError> {
        self.ensure_usable()?;
        self.run_preludes().await?;
        self.transport.encode(|buf| {
            frontend::parse("", sql, std::iter::empty(), buf)?;
            frontend::describe(b'S', "", buf)?;
            frontend::sync(buf);
            Ok::<_, io::Error>(())
        })?;
        self.send().await?;

        let mut prepared = Prepared::default();
        let mut error = None;
        loop {
            match self.recv().await? {
                Message::ParseComplete | Message::NoData => {}
                Message::ParameterDescription(body) => {
                    prepared.param_types = body
                        .parameters()
                        .collect()
                        .map_err(|e| self.fail(WireError::protocol(e)))?;
                }
                Message::RowDescription(body) => prepared.columns = self.columns(&body)?,
                Message::ErrorResponse(body) => {
                    error = Some(self.recoverable_error(&body, Phase::Parse)?)
                }
                Message::ReadyForQuery(body) => {
                    self.ready(&body)?;
                    break;
                }
                other => return Err(self.unexpected(&other, "prepare")),
            }
        }
        debug!(
            pid = self.backend_key.0,
            params = prepared.param_types.len(),
            failed = error.is_some(),
            "prepared"
        );
        match error {
            Some(e) => Err(WireError::Db(e)),
            None => Ok(prepared),
        }
    }

    /// Binds the unnamed statement from [`Connection::prepare`] with text parameters (`None` is
    /// NULL), describes the portal, executes it to the end and syncs. A parameter the server
    /// refuses comes back as a [`WireError::Db`] with [`Phase::Bind`], its `where_` naming the
    /// parameter (`unnamed portal parameter $1 = '...'`).
    pub async fn execute_prepared(
        &mut self,
        params: &[Option<String>],
        max_rows: usize,
    ) -> Result<StatementResult, WireError> {
        self.ensure_usable()?;
        self.transport
            .encode(|buf| encode_bind_execute(params, buf))?;
        self.send().await?;

        self.read_portal_result(Phase::Bind, max_rows).await
    }

    /// Parse (parameter types left to the server) + Bind (text parameters) + Describe portal +
    /// Execute + Sync in one write: one round trip where `prepare` + `execute_prepared` take two.
    /// The caller must already know how to write each parameter as text (e.g. from an earlier
    /// `prepare` of the same statement). Errors carry [`Phase::Parse`] before ParseComplete,
    /// [`Phase::Bind`] before BindComplete (nothing has executed then), else [`Phase::Execute`].
    pub async fn query_oneshot(
        &mut self,
        sql: &str,
        params: &[Option<String>],
        max_rows: usize,
    ) -> Result<StatementResult, WireError> {
        self.ensure_usable()?;
        self.run_preludes().await?;
        self.transport.encode(|buf| {
            frontend::parse("", sql, std::iter::empty(), buf).map_err(|e| e.to_string())?;
            encode_bind_execute(params, buf)
        })?;
        self.send().await?;

        self.read_portal_result(Phase::Parse, max_rows).await
    }

    /// Several statements as [`Connection::query_oneshot`] would run them one after the other,
    /// sent in one write and answered in one round trip: each is Parse + Bind + Describe +
    /// Execute + Sync, so each has its own result and a failed one does not stop the next (in
    /// an explicit transaction block, the statements after a failure fail until `ROLLBACK`).
    /// Only a connection-level failure is an `Err`.
    pub async fn pipeline(
        &mut self,
        statements: &[(&str, Vec<Option<String>>)],
        max_rows: usize,
    ) -> Result<Vec<Result<StatementResult, DbError>>, WireError> {
        self.ensure_usable()?;
        if statements.is_empty() {
            return Ok(Vec::new());
        }
        self.run_preludes().await?;
        self.transport.encode(|buf| {
            for (sql, params) in statements {
                frontend::parse("", sql, std::iter::empty(), buf).map_err(|e| e.to_string())?;
                encode_bind_execute(params, buf)?;
            }
            Ok::<_, String>(())
        })?;
        self.send().await?;
        let mut results = Vec::with_capacity(statements.len());
        for i in 0..statements.len() {
            if i > 0 {
                // Answers are still due: a future dropped here leaves the connection unusable.
                self.in_progress = true;
            }
            match self.read_portal_result(Phase::Parse, max_rows).await {
                Ok(r) => results.push(Ok(r)),
                Err(WireError::Db(e)) if !e.is_fatal() => results.push(Err(*e)),
                Err(e) => return Err(e),
            }
        }
        Ok(results)
    }

    /// Reads the answer to [Parse +] Bind + Describe portal + Execute + Sync up to ReadyForQuery.
    /// `phase` is where the request starts; ParseComplete and BindComplete move it on, so an
    /// error says which step the server refused.
    async fn read_portal_result(
        &mut self,
        mut phase: Phase,
        max_rows: usize,
    ) -> Result<StatementResult, WireError> {
        let mut builder = self.result_builder(Vec::new(), max_rows);
        self.skipped_row = false;
        let mut result = None;
        let mut error = None;
        loop {
            match self.recv().await? {
                Message::ParseComplete => phase = Phase::Bind,
                Message::BindComplete => phase = Phase::Execute,
                Message::RowDescription(body) => builder.columns = self.columns(&body)?,
                Message::NoData => {}
                Message::DataRow(row) => {
                    if self.take_skipped_row() {
                        builder.truncated = true;
                    }
                    builder.push(&row).map_err(|e| self.fail(e))?
                }
                Message::CommandComplete(body) => {
                    let tag = body.tag().map_err(|e| self.fail(WireError::protocol(e)))?;
                    self.saw_tag(tag);
                    if self.take_skipped_row() {
                        builder.truncated = true;
                    }
                    let done =
                        std::mem::replace(&mut builder, ResultBuilder::new(Vec::new(), 0, 0));
                    result = Some(done.finish(tag));
                }
                Message::EmptyQueryResponse => result = Some(StatementResult::default()),
                Message::ErrorResponse(body) => error = Some(self.recoverable_error(&body, phase)?),
                Message::CopyInResponse(_) => self.refuse_copy_in(true).await?,
                Message::CopyOutResponse(_) | Message::CopyData(_) | Message::CopyDone => {}
                Message::ReadyForQuery(body) => {
                    self.ready(&body)?;
                    break;
                }
                other => return Err(self.unexpected(&other, "execute")),
            }
        }
        debug!(
            pid = self.backend_key.0,
            failed = error.is_some(),
            "executed a portal"
        );
        match (error, result) {
            (Some(e), _) => Err(WireError::Db(e)),
            (None, Some(result)) => Ok(result),
            (None, None) => {
                Err(self.fail(WireError::protocol("execute ended without CommandComplete")))
            }
        }
    }

    /// Queues `sql` (e.g. `DISCARD ALL`) to run as a simple query before the next operation.
    /// Several queued preludes run in the order queued, each as its own Query message (its own
    /// implicit transaction), all in one write; the operation is sent only once every one of
    /// them answered ReadyForQuery without an error. If one fails, the connection is marked
    /// broken and the operation is never sent: PostgreSQL runs a Query or Parse that arrives
    /// after a failed Query (only an error inside an extended-protocol Sync group skips what
    /// follows), so sending them in the same write let an operation run on a session whose
    /// reset had failed. `execute_prepared` never sends them (a Query would destroy the unnamed
    /// statement): preludes go out with the `prepare` before it. On a connection with a session
    /// reset ([`Connection::set_session_reset`]) a `simple_query` sends them without that round
    /// trip, in one transaction with the reset and in front of its Query (see
    /// [`Connection::encode_pipelined_prelude`]): a prelude there must be one statement that may
    /// run inside a transaction block.
    pub fn queue_prelude(&mut self, sql: &str) {
        self.prelude.push(sql.to_owned());
    }

    /// Runs the queued preludes and a due session reset on its own (first), each as a Query, and
    /// waits for their answers (one round trip; none when nothing is queued or due). An error
    /// breaks the connection (see [`Connection::queue_prelude`]). A prelude that cannot be
    /// encoded (a NUL byte) is dropped with the others and the operation fails: nothing is sent
    /// and nothing stays queued for a later operation (a due reset stays due).
    pub(super) async fn run_preludes(&mut self) -> Result<(), WireError> {
        let mut prelude = std::mem::take(&mut self.prelude);
        if let Some(call) = self.due_reset_query() {
            prelude.insert(0, call);
        }
        if prelude.is_empty() {
            return Ok(());
        }
        for sql in &prelude {
            if let Err(e) = self.transport.encode(|buf| frontend::query(sql, buf)) {
                self.transport.write_buf.clear();
                return Err(e);
            }
        }
        self.send().await?;
        self.finish_prelude(prelude.len()).await
    }

    /// Reads the responses of `count` preludes, each up to its ReadyForQuery. Anything a Query
    /// of a prelude cannot answer (COPY, a Parse's answer) is a protocol error that breaks the
    /// connection: the stream is in an unknown state.
    async fn finish_prelude(&mut self, count: usize) -> Result<(), WireError> {
        let mut failed = None;
        let mut done = 0;
        while done < count {
            match self.recv().await? {
                Message::ErrorResponse(body) => {
                    let e = self.recoverable_error(&body, Phase::Query)?;
                    failed.get_or_insert(e);
                }
                Message::ReadyForQuery(body) => {
                    self.ready(&body)?;
                    done += 1;
                    // More answers are due until the last ReadyForQuery.
                    self.in_progress = done < count;
                }
                Message::RowDescription(_)
                | Message::DataRow(_)
                | Message::CommandComplete(_)
                | Message::EmptyQueryResponse => {}
                other => return Err(self.unexpected(&other, "session reset")),
            }
        }
        self.prelude_outcome(failed)
    }

    fn prelude_outcome(&mut self, failed: Option<Box<DbError>>) -> Result<(), WireError> {
        match failed {
            Some(e) => {
                self.broken = true;
                Err(WireError::Protocol(format!(
                    "session reset failed: {}",
                    e.message
                )))
            }
            None => {
                // A due session reset went first among them.
                self.reset_done();
                Ok(())
            }
        }
    }

    /// The zero-round-trip form of [`Connection::run_preludes`] in front of a Query: `BEGIN`, a
    /// due reset on its own, the queued preludes and `COMMIT`, each as extended-protocol
    /// messages (Parse + Bind + Execute of the unnamed statement) with no Sync, encoded into the
    /// write buffer; the caller appends its Query (and nothing else). Returns how many Executes
    /// were encoded, `None` when this form does not apply (nothing due; no session reset set,
    /// whose callers may queue preludes that cannot run in a transaction block; or not idle,
    /// where `BEGIN`/`COMMIT` would meet the caller's own transaction).
    ///
    /// Why it is sound (PostgreSQL's "Extended Query"): an error in any extended-protocol
    /// message makes the backend discard every message up to the next Sync, a Query included
    /// (postgres.c tests `ignore_till_sync` before it dispatches any message), so after a
    /// failed reset, prelude or `COMMIT` the Query never runs: the backend sends the
    /// ErrorResponse at once (errors are flushed as raised) and waits for a Sync, which
    /// [`Connection::finish_pipelined_prelude`] sends only then, and breaks the connection.
    /// When all succeed, `COMMIT` ends their transaction and the Query runs in one of its own,
    /// as after the round trip (not in a pipeline: VACUUM and the like still run), answering
    /// the only ReadyForQuery. `BEGIN` makes the `COMMIT` a real one: a `COMMIT` of the
    /// implicit transaction would raise a warning, flushed on its own (one more wake-up).
    fn encode_pipelined_prelude(&mut self) -> Result<Option<usize>, WireError> {
        if self.reset.is_none() || self.status != TransactionStatus::Idle {
            return Ok(None);
        }
        let reset = self.due_reset_query();
        if reset.is_none() && self.prelude.is_empty() {
            return Ok(None);
        }
        let prelude = std::mem::take(&mut self.prelude);
        let calls: Vec<&str> = ["BEGIN"]
            .into_iter()
            .chain(reset.iter().map(String::as_str))
            .chain(prelude.iter().map(String::as_str))
            .chain(["COMMIT"])
            .collect();
        let encoded = self.transport.encode(|buf| {
            for sql in &calls {
                frontend::parse("", sql, std::iter::empty(), buf).map_err(|e| e.to_string())?;
                encode_bind("", &[], buf)?;
                frontend::execute("", 0, buf).map_err(|e| e.to_string())?;
            }
            Ok::<_, String>(())
        });
        // On failure nothing is left in the buffer and the preludes are dropped (see
        // `run_preludes`).
        encoded.map(|()| Some(calls.len()))
    }

    /// Reads the answers to what [`Connection::encode_pipelined_prelude`] sent, up to the last
    /// Execute's CommandComplete; the Query's answers follow. After an error the backend skips
    /// everything (the caller's Query too) until a Sync: one is sent, its ReadyForQuery read
    /// and the connection broken.
    async fn finish_pipelined_prelude(&mut self, executes: usize) -> Result<(), WireError> {
        let mut done = 0;
        let failed = loop {
            match self.recv().await? {
                Message::ErrorResponse(body) => {
                    break self.recoverable_error(&body, Phase::Query)?;
                }
                Message::CommandComplete(_) | Message::EmptyQueryResponse => {
                    done += 1;
                    if done == executes {
                        return self.prelude_outcome(None);
                    }
                }
                Message::ParseComplete | Message::BindComplete | Message::DataRow(_) => {}
                other => return Err(self.unexpected(&other, "session reset")),
            }
        };
        self.broken = true;
        frontend::sync(&mut self.transport.write_buf);
        self.send().await?;
        // Nothing else: the backend skipped every message up to this Sync.
        match self.recv().await? {
            Message::ReadyForQuery(body) => self.ready(&body)?,
            other => return Err(self.unexpected(&other, "session reset")),
        }
        self.prelude_outcome(Some(failed))
    }

    /// Caps the row data a statement's result keeps, in bytes of PostgreSQL's text values (the
    /// DataRow bodies): rows past it are read and dropped and the result is `truncated`, and a
    /// single row larger than it is never buffered. Unlimited by default.
    pub fn set_max_result_bytes(&mut self, bytes: usize) {
        self.max_result_bytes = bytes;
        self.transport.max_data_row = bytes.saturating_add(4).min(MAX_MESSAGE_LEN);
    }

    /// Reserves the rows of the results read from now on in `memory` as they come (their
    /// [`row_footprint`]); `None`: no reservation (the default). When `memory` refuses, the
    /// rows kept so far are dropped and the rest read past, as past `max_result_bytes`: the
    /// result is empty and `truncated`, the statement runs to its end and the connection stays
    /// usable. The caller clears it before the connection serves anything else.
    pub fn set_result_memory(&mut self, memory: Option<std::sync::Arc<dyn ResultMemory>>) {
        self.result_memory = memory;
    }

    /// A builder for a result with this connection's limits and memory.
    fn result_builder(&self, columns: Vec<Column>, max_rows: usize) -> ResultBuilder {
        let mut builder = ResultBuilder::new(columns, max_rows, self.max_result_bytes);
        builder.memory = self.result_memory.clone();
        builder
    }

    /// Whether a DataRow was skipped since the last call (see [`Backend::SkippedDataRow`]).
    fn take_skipped_row(&mut self) -> bool {
        std::mem::take(&mut self.skipped_row)
    }

    /// From the last ReadyForQuery.
    pub fn transaction_status(&self) -> TransactionStatus {
        self.status
    }

    /// A run-time parameter the server reports (ParameterStatus): `server_version`, `DateStyle`,
    /// `TimeZone`, `IntervalStyle`, `integer_datetimes`, ... Kept up to date after `SET`.
    pub fn parameter(&self, name: &str) -> Option<&str> {
        self.parameters.get(name).map(String::as_str)
    }

    /// (process id, secret key) from BackendKeyData, for [`cancel`].
    pub fn backend_key(&self) -> (i32, i32) {
        self.backend_key
    }

    /// The connection must not be reused: an I/O, protocol or fatal server error happened, or an
    /// operation was abandoned half way.
    pub fn is_broken(&self) -> bool {
        self.broken || self.in_progress
    }

    /// Sends Terminate and closes the socket; errors are ignored (the session is over anyway).
    pub async fn close(mut self) {
        debug!(pid = self.backend_key.0, "closing");
        frontend::terminate(&mut self.transport.write_buf);
        let _ = self.transport.flush().await;
        let _ = self.transport.socket.shutdown().await;
    }

    fn ensure_usable(&self) -> Result<(), WireError> {
        if self.is_broken() {
            return Err(WireError::Closed);
        }
        Ok(())
    }

    async fn send(&mut self) -> Result<(), WireError> {
        self.in_progress = true;
        // Whatever this operation is, the caller's last statement is no longer the one a
        // pipelined reset covered (see `Connection::reset_session_vouched`).
        if let Some(r) = &mut self.reset {
            r.covered = false;
        }
        self.transport.flush().await.map_err(|e| self.fail(e))
    }

    /// The next message that belongs to the current operation; messages that can arrive at any
    /// time are absorbed here.
    async fn recv(&mut self) -> Result<Message, WireError> {
        match self.recv_backend().await? {
            Backend::Message(message) => Ok(message),
            // Skipped rows never leave `recv_backend`.
            Backend::CopyBothResponse | Backend::SkippedDataRow => {
                Err(self.fail(WireError::protocol("unexpected CopyBothResponse")))
            }
        }
    }

    /// [`Connection::recv`], CopyBothResponse included. Cancel-safe.
    async fn recv_backend(&mut self) -> Result<Backend, WireError> {
        loop {
            let message = match self
                .transport
                .read_message()
                .await
                .map_err(|e| self.fail(e))?
            {
                Backend::Message(message) => message,
                Backend::CopyBothResponse => return Ok(Backend::CopyBothResponse),
                Backend::SkippedDataRow => {
                    self.skipped_row = true;
                    continue;
                }
            };
            match message {
                Message::ParameterStatus(body) => {
                    let (name, value) = match (body.name(), body.value()) {
                        (Ok(name), Ok(value)) => (name.to_owned(), value.to_owned()),
                        _ => {
                            return Err(
                                self.fail(WireError::protocol("ParameterStatus is not UTF-8"))
                            )
                        }
                    };
                    debug!(pid = self.backend_key.0, %name, %value, "parameter status");
                    self.parameters.insert(name, value);
                }
                Message::NoticeResponse(body) => {
                    if let Ok(notice) = DbError::parse(body.fields(), Phase::Query) {
                        debug!(
                            pid = self.backend_key.0,
                            severity = %notice.severity,
                            code = %notice.code,
                            message = %notice.message,
                            "notice"
                        );
                    }
                }
                Message::NotificationResponse(body) => {
                    debug!(
                        pid = self.backend_key.0,
                        sender = body.process_id(),
                        channel = body.channel().unwrap_or("?"),
                        "notification (dropped)"
                    );
                }
                message => return Ok(Backend::Message(message)),
            }
        }
    }

    fn ready(&mut self, body: &ReadyForQueryBody) -> Result<(), WireError> {
        self.status = match body.status() {
            b'I' => TransactionStatus::Idle,
            b'T' => TransactionStatus::InTransaction,
            b'E' => TransactionStatus::Failed,
            other => {
                return Err(self.fail(WireError::protocol(format!(
                    "ReadyForQuery status {other:#04x}"
                ))))
            }
        };
        self.in_progress = false;
        Ok(())
    }

    /// An ErrorResponse as the error to return right away (startup, or a fatal one).
    fn server_error(&mut self, fields: ErrorFields<'_>, phase: Phase) -> WireError {
        match DbError::parse(fields, phase) {
            Ok(e) => {
                if e.is_fatal() || phase == Phase::Startup {
                    self.broken = true;
                }
                WireError::Db(Box::new(e))
            }
            Err(e) => self.fail(WireError::protocol(e)),
        }
    }

    /// An ErrorResponse after which the server goes on to ReadyForQuery; a fatal one is returned
    /// as `Err` at once since the server closes the connection instead.
    fn recoverable_error(
        &mut self,
        body: &postgres_protocol::message::backend::ErrorResponseBody,
        phase: Phase,
    ) -> Result<Box<DbError>, WireError> {
        match self.server_error(body.fields(), phase) {
            WireError::Db(e) if !e.is_fatal() => Ok(e),
            other => Err(other),
        }
    }

    /// COPY FROM STDIN has no data source here. In the extended protocol the server ignores the
    /// Sync already sent while in copy-in mode, so another one follows the CopyFail.
    async fn refuse_copy_in(&mut self, extended: bool) -> Result<(), WireError> {
        self.transport.encode(|buf| {
            frontend::copy_fail("COPY FROM STDIN is not supported by this client", buf)?;
            if extended {
                frontend::sync(buf);
            }
            Ok::<_, io::Error>(())
        })?;
        self.send().await
    }

    fn columns(&mut self, body: &RowDescriptionBody) -> Result<Vec<Column>, WireError> {
        body.fields()
            .map(|f| {
                Ok(Column {
                    name: f.name().to_owned(),
                    type_oid: f.type_oid(),
                    type_modifier: f.type_modifier(),
                    table_oid: f.table_oid(),
                    column_id: f.column_id(),
                })
            })
            .collect()
            .map_err(|e| self.fail(WireError::protocol(e)))
    }

    fn unexpected(&mut self, message: &Message, during: &str) -> WireError {
        self.fail(WireError::protocol(format!(
            "unexpected {} during {during}",
            message_name(message)
        )))
    }

    /// Marks the connection broken when `e` leaves the stream in an unknown state.
    fn fail(&mut self, e: WireError) -> WireError {
        if !matches!(e, WireError::Db(_) | WireError::InvalidInput(_)) {
            self.broken = true;
        }
        e
    }
}

/// A message the server sends in copy-both mode, as [`Connection::copy_both_recv`] returns it.
#[derive(Debug)]
pub(crate) enum CopyBoth {
    /// CopyData: one streaming replication message (`w` XLogData, `k` keepalive).
    Data(Bytes),
    /// CopyDone: the server has ended its half of the copy.
    Done,
    /// CommandComplete: the command is over (after both CopyDones, or on its own when a
    /// walsender exits at server shutdown).
    Complete,
    /// ReadyForQuery: back in command mode; the connection is usable again.
    Ready,
}

/// Copy-both mode, which `START_REPLICATION` enters
/// ([protocol flow](https://www.postgresql.org/docs/current/protocol-flow.html#PROTOCOL-COPY)).
/// Until ReadyForQuery the connection counts as busy ([`Connection::is_broken`]), so no
/// ordinary operation can be sent in the middle of the copy.
impl Connection {
    /// Sends `sql` as a simple query and waits for CopyBothResponse. A refusal (ErrorResponse,
    /// then ReadyForQuery) comes back as [`WireError::Db`] and leaves the connection usable.
    pub(crate) async fn start_copy_both(&mut self, sql: &str) -> Result<(), WireError> {
        self.ensure_usable()?;
        self.transport.encode(|buf| frontend::query(sql, buf))?;
        self.send().await?;
        let mut error = None;
        loop {
            match self.recv_backend().await? {
                Backend::CopyBothResponse => return Ok(()),
                Backend::Message(Message::ErrorResponse(body)) => {
                    error = Some(self.recoverable_error(&body, Phase::Query)?)
                }
                Backend::Message(Message::ReadyForQuery(body)) => {
                    self.ready(&body)?;
                    return Err(match error {
                        Some(e) => WireError::Db(e),
                        None => self.fail(WireError::protocol(
                            "the command ended without CopyBothResponse",
                        )),
                    });
                }
                Backend::Message(other) => return Err(self.unexpected(&other, "copy-both start")),
                Backend::SkippedDataRow => {
                    return Err(self.fail(WireError::protocol("DataRow before CopyBothResponse")))
                }
            }
        }
    }

    /// The next message in copy-both mode. Cancel-safe. An ErrorResponse comes back at once as
    /// [`WireError::Db`]; the copy is over then.
    pub(crate) async fn copy_both_recv(&mut self) -> Result<CopyBoth, WireError> {
        match self.recv_backend().await? {
            Backend::Message(Message::CopyData(body)) => Ok(CopyBoth::Data(body.into_bytes())),
            Backend::Message(Message::CopyDone) => Ok(CopyBoth::Done),
            Backend::Message(Message::CommandComplete(_)) => Ok(CopyBoth::Complete),
            Backend::Message(Message::ReadyForQuery(body)) => {
                self.ready(&body)?;
                Ok(CopyBoth::Ready)
            }
            Backend::Message(Message::ErrorResponse(body)) => {
                Err(self.server_error(body.fields(), Phase::Query))
            }
            Backend::Message(other) => Err(self.unexpected(&other, "copy-both")),
            Backend::CopyBothResponse | Backend::SkippedDataRow => {
                Err(self.fail(WireError::protocol("unexpected CopyBothResponse")))
            }
        }
    }

    /// Queues a CopyData message for [`Connection::flush_queued`].
    pub(crate) fn queue_copy_data(&mut self, payload: Bytes) -> Result<(), WireError> {
        self.transport
            .encode(|buf| frontend::CopyData::new(payload).map(|data| data.write(buf)))
    }

    /// Queues CopyDone for [`Connection::flush_queued`].
    pub(crate) fn queue_copy_done(&mut self) {
        frontend::copy_done(&mut self.transport.write_buf);
    }

    /// Whether queued messages are waiting for [`Connection::flush_queued`].
    pub(crate) fn has_queued(&self) -> bool {
        !self.transport.write_buf.is_empty()
    }

    /// Writes the queued messages. Cancel-safe: what a dropped call did not write stays queued.
    pub(crate) async fn flush_queued(&mut self) -> Result<(), WireError> {
        if let Some(r) = &mut self.reset {
            r.covered = false;
        }
        self.transport.flush().await.map_err(|e| self.fail(e))
    }
}

/// Bind of statement `statement` (`""`: the unnamed one) to the unnamed portal, text
/// parameters and text results.
fn encode_bind(
    statement: &str,
    params: &[Option<String>],
    buf: &mut BytesMut,
) -> Result<(), String> {
    frontend::bind(
        "",
        statement,
        std::iter::empty(), // no parameter formats: all text
        params,
        |param, buf| match param {
            Some(text) => {
                buf.put_slice(text.as_bytes());
                Ok(IsNull::No)
            }
            None => Ok(IsNull::Yes),
        },
        std::iter::empty(), // no result formats: all text
        buf,
    )
    .map_err(|e| match e {
        frontend::BindError::Conversion(e) => e.to_string(),
        frontend::BindError::Serialization(e) => e.to_string(),
    })
}

/// Bind of the unnamed statement (text parameters, text results) + Describe portal + Execute
/// (all rows) + Sync.
fn encode_bind_execute(params: &[Option<String>], buf: &mut BytesMut) -> Result<(), String> {
    encode_bind("", params, buf)?;
    frontend::describe(b'P', "", buf).map_err(|e| e.to_string())?;
    frontend::execute("", 0, buf).map_err(|e| e.to_string())?;
    frontend::sync(buf);
    Ok(())
}

/// Accumulates one statement's rows, keeping at most `max_rows` rows and `max_bytes` bytes of
/// row data, and reserving their footprint in `memory` as they come; once one row is dropped,
/// every later one is too (the result is a prefix; empty once `memory` refused).
struct ResultBuilder {
    columns: Vec<Column>,
    rows: Vec<Vec<Option<String>>>,
    max_rows: usize,
    max_bytes: usize,
    bytes: usize,
    truncated: bool,
    memory: Option<std::sync::Arc<dyn ResultMemory>>,
    /// The rows' [`row_footprint`]s together.
    footprint: usize,
    /// What `memory` covers: it is asked again only past this (once per step, not per row).
    covered: usize,
}

impl ResultBuilder {
    fn new(columns: Vec<Column>, max_rows: usize, max_bytes: usize) -> ResultBuilder {
        ResultBuilder {
            columns,
            rows: Vec::new(),
            max_rows,
            max_bytes,
            bytes: 0,
            truncated: false,
            memory: None,
            footprint: 0,
            covered: 0,
        }
    }

    fn push(&mut self, row: &DataRowBody) -> Result<(), WireError> {
        let size = row.buffer().len();
        if self.truncated
            || self.rows.len() >= self.max_rows
            || self.bytes.saturating_add(size) > self.max_bytes
        {
            self.truncated = true;
            return Ok(());
        }
        if let Some(memory) = &self.memory {
            // The footprint the row will have (its values' text is at most the body's size).
            let after = self.footprint
                + 2 * std::mem::size_of::<Vec<Option<String>>>()
                + self.columns.len() * std::mem::size_of::<Option<String>>()
                + size;
            if after > self.covered {
                match memory.cover(after) {
                    Some(covered) => self.covered = covered,
                    None => {
                        // Refused: nothing of this result is kept (its rows are left out of
                        // the answer, or the answer refused), and the rest is read past.
                        self.rows = Vec::new();
                        self.truncated = true;
                        return Ok(());
                    }
                }
            }
        }
        self.bytes += size;
        let buf = row.buffer();
        let values: Vec<Option<String>> = row
            .ranges()
            .map(|range| Ok(range.map(|r| String::from_utf8_lossy(&buf[r]).into_owned())))
            .collect()
            .map_err(WireError::protocol)?;
        if values.len() != self.columns.len() {
            return Err(WireError::protocol(format!(
                "DataRow with {} values for {} columns",
                values.len(),
                self.columns.len()
            )));
        }
        self.footprint += row_footprint(&values);
        self.rows.push(values);
        Ok(())
    }

    fn finish(self, command_tag: &str) -> StatementResult {
        StatementResult {
            columns: self.columns,
            rows: self.rows,
            truncated: self.truncated,
            command_tag: command_tag.to_owned(),
        }
    }
}

/// Sends a CancelRequest for the session `backend_key` over a fresh connection and waits for the
/// server to close it, as libpq does. Success means the request was delivered, not that a query
/// was running; the cancelled query fails with SQLSTATE 57014.
pub async fn cancel(cfg: &ConnectConfig, backend_key: (i32, i32)) -> Result<(), WireError> {
    tokio::time::timeout(cfg.connect_timeout, async {
        let mut socket = open_socket(cfg).await?;
        let mut buf = BytesMut::new();
        frontend::cancel_request(backend_key.0, backend_key.1, &mut buf);
        socket.write_all(&buf).await?;
        socket.flush().await?;
        let mut sink = [0u8; 64];
        while socket.read(&mut sink).await? > 0 {}
        debug!(pid = backend_key.0, "cancel request sent");
        Ok(())
    })
    .await
    .map_err(|_| WireError::Timeout)?
}

async fn open_socket(cfg: &ConnectConfig) -> Result<Box<dyn Socket>, WireError> {
    if cfg.host.starts_with('/') {
        let path = format!("{}/.s.PGSQL.{}", cfg.host, cfg.port);
        Ok(Box::new(tokio::net::UnixStream::connect(path).await?))
    } else {
        let stream = tokio::net::TcpStream::connect((cfg.host.as_str(), cfg.port)).await?;
        stream.set_nodelay(true)?;
        Ok(Box::new(stream))
    }
}

fn startup_parameters(cfg: &ConnectConfig) -> Vec<(&'static str, String)> {
    let mut params = vec![
        ("user", cfg.user.clone()),
        ("database", cfg.database.clone()),
        ("client_encoding", "UTF8".to_owned()),
    ];
    if let Some(name) = &cfg.application_name {
        params.push(("application_name", name.clone()));
    }
    if !cfg.options.is_empty() {
        params.push(("options", startup_options(&cfg.options)));
    }
    if cfg.replication {
        params.push(("replication", "database".to_owned()));
    }
    params
}

/// The startup `options` value: `-c name=value` per setting. The server splits it on whitespace
/// with backslash as the escape character (`pg_split_opts`), so both are escaped.
fn startup_options(options: &[(String, String)]) -> String {
    let mut out = String::new();
    for (name, value) in options {
        if !out.is_empty() {
            out.push(' ');
        }
        out.push_str("-c ");
        escape_option(&mut out, name);
        out.push('=');
        escape_option(&mut out, value);
    }
    out
}

fn escape_option(out: &mut String, s: &str) {
    for c in s.chars() {
        // C isspace() in the server, plus the escape character itself.
        if matches!(c, ' ' | '\t' | '\n' | '\r' | '\x0b' | '\x0c' | '\\') {
            out.push('\\');
        }
        out.push(c);
    }
}

fn message_name(message: &Message) -> &'static str {
    match message {
        Message::AuthenticationCleartextPassword => "AuthenticationCleartextPassword",
        Message::AuthenticationGss => "AuthenticationGSS",
        Message::AuthenticationKerberosV5 => "AuthenticationKerberosV5",
        Message::AuthenticationMd5Password(_) => "AuthenticationMD5Password",
        Message::AuthenticationOk => "AuthenticationOk",
        Message::AuthenticationScmCredential => "AuthenticationSCMCredential",
        Message::AuthenticationSspi => "AuthenticationSSPI",
        Message::AuthenticationGssContinue(_) => "AuthenticationGSSContinue",
        Message::AuthenticationSasl(_) => "AuthenticationSASL",
        Message::AuthenticationSaslContinue(_) => "AuthenticationSASLContinue",
        Message::AuthenticationSaslFinal(_) => "AuthenticationSASLFinal",
        Message::BackendKeyData(_) => "BackendKeyData",
        Message::BindComplete => "BindComplete",
        Message::CloseComplete => "CloseComplete",
        Message::CommandComplete(_) => "CommandComplete",
        Message::CopyData(_) => "CopyData",
        Message::CopyDone => "CopyDone",
        Message::CopyInResponse(_) => "CopyInResponse",
        Message::CopyOutResponse(_) => "CopyOutResponse",
        Message::DataRow(_) => "DataRow",
        Message::EmptyQueryResponse => "EmptyQueryResponse",
        Message::ErrorResponse(_) => "ErrorResponse",
        Message::NoData => "NoData",
        Message::NoticeResponse(_) => "NoticeResponse",
        Message::NotificationResponse(_) => "NotificationResponse",
        Message::ParameterDescription(_) => "ParameterDescription",
        Message::ParameterStatus(_) => "ParameterStatus",
        Message::ParseComplete => "ParseComplete",
        Message::PortalSuspended => "PortalSuspended",
        Message::ReadyForQuery(_) => "ReadyForQuery",
        Message::RowDescription(_) => "RowDescription",
        _ => "unknown message",
    }
}

#[cfg(test)]
mod tests {
    //! Exchanges with a scripted server over an in-memory pipe: the authentication methods the
    //! shared test cluster does not use, and server input no real server sends. Everything else is
    //! tested against PostgreSQL in `tests/it/wire.rs`.
    use super::*;
    use tokio::io::DuplexStream;

    fn backend(tag: u8, body: &[u8]) -> Vec<u8> {
        let mut out = vec![tag];
        out.extend_from_slice(&(body.len() as i32 + 4).to_be_bytes());
        out.extend_from_slice(body);
        out
    }

    fn auth(code: i32, extra: &[u8]) -> Vec<u8> {
        let mut body = code.to_be_bytes().to_vec();
        body.extend_from_slice(extra);
        backend(b'R', &body)
    }

    fn cstr(s: &str) -> Vec<u8> {
        let mut out = s.as_bytes().to_vec();
        out.push(0);
        out
    }

    fn session_start() -> Vec<u8> {
        let mut out = auth(0, &[]);
        out.extend(backend(
            b'S',
            &[cstr("server_version"), cstr("15.0")].concat(),
        ));
        out.extend(backend(
            b'K',
            &[7i32.to_be_bytes(), 99i32.to_be_bytes()].concat(),
        ));
        out.extend(backend(b'Z', b"I"));
        out
    }

    fn error_response(fields: &[(u8, &str)]) -> Vec<u8> {
        let mut body = Vec::new();
        for (kind, value) in fields {
            body.push(*kind);
            body.extend(cstr(value));
        }
        body.push(0);
        backend(b'E', &body)
    }

    async fn read_startup(s: &mut (impl AsyncRead + Unpin)) -> Vec<u8> {
        let len = s.read_i32().await.unwrap() as usize;
        let mut body = vec![0; len - 4];
        s.read_exact(&mut body).await.unwrap();
        body
    }

    async fn read_frontend(s: &mut DuplexStream) -> (u8, Vec<u8>) {
        let tag = s.read_u8().await.unwrap();
        let len = s.read_i32().await.unwrap() as usize;
        let mut body = vec![0; len - 4];
        s.read_exact(&mut body).await.unwrap();
        (tag, body)
    }

    fn config() -> ConnectConfig {
        ConnectConfig {
            user: "alice".into(),
            password: Some("s3cret".into()),
            ..ConnectConfig::default()
        }
    }

    /// Runs `server` on one end of a pipe and the client handshake on the other.
    async fn handshake_with<F, Fut>(cfg: &ConnectConfig, server: F) -> Result<Connection, WireError>
    where
        F: FnOnce(DuplexStream) -> Fut,
        Fut: std::future::Future<Output = ()> + Send + 'static,
    {
        let (client, server_end) = tokio::io::duplex(64 * 1024);
        tokio::spawn(server(server_end));
        Connection::handshake(Box::new(client), cfg).await
    }

    /// A connected client whose server answers the first query with `reply`, then hangs up or
    /// idles.
    async fn connection_answering(reply: Vec<u8>, hang_up: bool) -> Connection {
        handshake_with(&config(), move |mut s| async move {
            read_startup(&mut s).await;
            s.write_all(&session_start()).await.unwrap();
            read_frontend(&mut s).await;
            s.write_all(&reply).await.unwrap();
            if !hang_up {
                let mut sink = Vec::new();
                let _ = s.read_to_end(&mut sink).await;
            }
        })
        .await
        .unwrap()
    }

    fn row_description(name: &str) -> Vec<u8> {
        let mut body = 1i16.to_be_bytes().to_vec();
        body.extend(cstr(name));
        body.extend(0i32.to_be_bytes()); // table oid
        body.extend(0i16.to_be_bytes()); // column id
        body.extend(25i32.to_be_bytes()); // text
        body.extend((-1i16).to_be_bytes());
        body.extend((-1i32).to_be_bytes());
        body.extend(0i16.to_be_bytes()); // text format
        backend(b'T', &body)
    }

    fn data_row(value: &[u8]) -> Vec<u8> {
        let mut body = 1i16.to_be_bytes().to_vec();
        body.extend((value.len() as i32).to_be_bytes());
        body.extend_from_slice(value);
        backend(b'D', &body)
    }

    #[tokio::test]
    async fn a_large_messages_buffer_is_let_go_once_it_is_read() {
        let mut reply = row_description("v");
        reply.extend(data_row(&vec![b'x'; 6 << 20]));
        reply.extend(backend(b'C', &cstr("SELECT 1")));
        reply.extend(backend(b'Z', b"I"));
        let mut conn = connection_answering(reply, false).await;
        let outcome = conn.simple_query("SELECT ...", 1).await.unwrap();
        assert_eq!(
            outcome.last.unwrap().rows[0][0].as_ref().unwrap().len(),
            6 << 20
        );
        // What the connection keeps to read the next message, not the 6 MiB row's allocation.
        let kept = conn.transport.read_buf.capacity();
        assert!(kept <= READ_BUF_KEPT, "{kept} bytes kept");
    }

    #[tokio::test]
    async fn rows_past_the_byte_limit_are_dropped_and_an_oversized_row_is_skipped_unbuffered() {
        let mut reply = row_description("v");
        for value in [&[b'a'; 100][..], &[b'b'; 100], &[b'c'; 5000], &[b'd'; 10]] {
            reply.extend(data_row(value));
        }
        reply.extend(backend(b'C', &cstr("SELECT 4")));
        reply.extend(row_description("w"));
        reply.extend(data_row(&[b'e'; 10]));
        reply.extend(data_row(&[b'f'; 5000]));
        reply.extend(backend(b'C', &cstr("SELECT 2")));
        reply.extend(backend(b'Z', b"I"));
        let mut conn = connection_answering(reply, false).await;
        conn.set_max_result_bytes(300);
        assert_eq!(conn.transport.max_data_row, 304);
        let outcome = conn.simple_query("SELECT ...", 100).await.unwrap();
        let last = outcome.last.unwrap();
        // The second statement: its first row fits, the oversized one is skipped.
        assert_eq!(last.rows, vec![vec![Some("e".repeat(10))]]);
        assert!(last.truncated);
        assert_eq!(last.command_tag, "SELECT 2");
        assert_eq!(outcome.statements, 2);
        assert!(!conn.is_broken());
    }

    /// Memory that covers in steps of `step` bytes up to `limit`, then refuses for good.
    struct Steps {
        step: usize,
        limit: usize,
        asked: std::sync::Mutex<Vec<usize>>,
        refused: std::sync::atomic::AtomicBool,
    }

    impl ResultMemory for Steps {
        fn cover(&self, bytes: usize) -> Option<usize> {
            self.asked.lock().unwrap().push(bytes);
            let covered = bytes.div_ceil(self.step) * self.step;
            if covered > self.limit || self.refused.load(std::sync::atomic::Ordering::Relaxed) {
                self.refused
                    .store(true, std::sync::atomic::Ordering::Relaxed);
                return None;
            }
            Some(covered)
        }
    }

    /// Rows are reserved as they come, once per step; when the next step is refused the result
    /// keeps no row (`truncated`), the rest is read past, and the connection stays usable.
    #[tokio::test]
    async fn rows_are_reserved_in_steps_and_a_refusal_leaves_the_result_empty() {
        let mut reply = row_description("v");
        for _ in 0..10 {
            reply.extend(data_row(&[b'a'; 100]));
        }
        reply.extend(backend(b'C', &cstr("SELECT 10")));
        reply.extend(backend(b'Z', b"I"));
        let mut conn = connection_answering(reply.clone(), false).await;
        let memory = std::sync::Arc::new(Steps {
            step: 1000,
            limit: usize::MAX,
            asked: Default::default(),
            refused: Default::default(),
        });
        conn.set_result_memory(Some(memory.clone()));
        let last = conn
            .simple_query("SELECT ...", 100)
            .await
            .unwrap()
            .last
            .unwrap();
        assert_eq!(last.rows.len(), 10);
        assert!(!last.truncated);
        let footprint: usize = last.rows.iter().map(|r| row_footprint(r)).sum();
        let asked = memory.asked.lock().unwrap().clone();
        assert!(
            asked.len() < 10 && asked.len() >= footprint / 1000,
            "{asked:?}"
        );
        assert!(*asked.last().unwrap() <= footprint.div_ceil(1000) * 1000);

        let mut conn = connection_answering(reply, false).await;
        let memory = std::sync::Arc::new(Steps {
            step: 500,
            limit: 1000,
            asked: Default::default(),
            refused: Default::default(),
        });
        conn.set_result_memory(Some(memory.clone()));
        let outcome = conn.simple_query("SELECT ...", 100).await.unwrap();
        let last = outcome.last.unwrap();
        assert!(last.rows.is_empty(), "{} rows kept", last.rows.len());
        assert!(last.truncated);
        assert_eq!(last.command_tag, "SELECT 10");
        assert!(!conn.is_broken());
        assert_eq!(conn.transaction_status(), TransactionStatus::Idle);
    }

    /// A 300 kB error message keeps its first 64 KiB (cut at a character boundary, marked), its
    /// code, and none of the later fields; the rest is read past without ever being buffered,
    /// and the connection goes on.
    #[tokio::test]
    async fn an_oversized_error_is_cut_and_read_past_unbuffered() {
        let mut fields = Vec::new();
        for (kind, value) in [(b'S', "ERROR".to_string()), (b'C', "P0001".into())] {
            fields.push(kind);
            fields.extend(cstr(&value));
        }
        fields.push(b'M');
        // Two-byte characters, so the cut falls inside one.
        fields.extend(cstr(&"é".repeat(150_000)));
        fields.push(b'D');
        fields.extend(cstr("the detail"));
        fields.push(0);
        let mut reply = backend(b'E', &fields);
        reply.extend(backend(b'Z', b"I"));
        reply.extend(row_description("v"));
        reply.extend(data_row(b"after"));
        reply.extend(backend(b'C', &cstr("SELECT 1")));
        reply.extend(backend(b'Z', b"I"));
        let mut conn = connection_answering(reply, false).await;
        let Err(WireError::Db(e)) = conn.simple_query("DO ...", 100).await else {
            panic!("an error");
        };
        assert_eq!(e.code, "P0001");
        assert!(
            e.message.ends_with(CUT_MARK),
            "{}",
            &e.message[e.message.len() - 60..]
        );
        let kept = e.message.len() - CUT_MARK.len();
        assert!(
            (MAX_NOTICE_FIELDS - 20..MAX_NOTICE_FIELDS).contains(&kept),
            "{kept}"
        );
        assert!(e.message[..kept].chars().all(|c| c == 'é'));
        assert_eq!(e.detail, None);
        assert!(
            conn.transport.read_buf.capacity() < 4 * MAX_NOTICE_FIELDS,
            "{}",
            conn.transport.read_buf.capacity()
        );
        assert!(!conn.is_broken());
        let last = conn.simple_query("SELECT ...", 100).await.unwrap().last;
        assert_eq!(last.unwrap().rows, vec![vec![Some("after".into())]]);
    }

    #[test]
    fn fields_are_cut_whole_or_at_a_character_boundary() {
        let mut prefix = b"SERROR\0CXX000\0M".to_vec();
        prefix.extend("ab€".as_bytes());
        prefix.truncate(prefix.len() - 1); // inside the €
        let mut want = b"SERROR\0CXX000\0Mab".to_vec();
        want.extend(CUT_MARK.as_bytes());
        want.extend(b"\0\0");
        assert_eq!(cut_fields(&prefix), want);
        assert_eq!(cut_fields(b"SERROR\0"), b"SERROR\0\0");
    }

    #[tokio::test]
    async fn a_result_is_a_prefix_once_the_byte_limit_is_passed() {
        let mut reply = row_description("v");
        for value in [&[b'a'; 100][..], &[b'b'; 150], &[b'c'; 5000], &[b'd'; 10]] {
            reply.extend(data_row(value));
        }
        reply.extend(backend(b'C', &cstr("SELECT 4")));
        reply.extend(backend(b'Z', b"I"));
        let mut conn = connection_answering(reply, false).await;
        conn.set_max_result_bytes(300);
        let last = conn
            .simple_query("SELECT ...", 100)
            .await
            .unwrap()
            .last
            .unwrap();
        // 'a' and 'b' fit; 'c' is skipped unread; 'd' would fit but comes after a dropped row.
        assert_eq!(
            last.rows,
            vec![vec![Some("a".repeat(100))], vec![Some("b".repeat(150))]]
        );
        assert!(last.truncated);
    }

    #[test]
    fn options_escape_spaces_and_backslashes() {
        let options = vec![
            ("DateStyle".to_owned(), "ISO, MDY".to_owned()),
            ("search_path".to_owned(), r"a\b".to_owned()),
            ("statement_timeout".to_owned(), "30000".to_owned()),
        ];
        assert_eq!(
            startup_options(&options),
            r"-c DateStyle=ISO,\ MDY -c search_path=a\\b -c statement_timeout=30000"
        );
    }

    #[test]
    fn options_and_replication_are_sent_only_when_asked_for() {
        let keys = |cfg: &ConnectConfig| -> Vec<&'static str> {
            startup_parameters(cfg)
                .into_iter()
                .map(|(k, _)| k)
                .collect()
        };
        assert_eq!(keys(&config()), ["user", "database", "client_encoding"]);
        let cfg = ConnectConfig {
            application_name: Some("fluxbase".into()),
            options: vec![("TimeZone".into(), "UTC".into())],
            replication: true,
            ..config()
        };
        let params = startup_parameters(&cfg);
        assert!(params.contains(&("options", "-c TimeZone=UTC".into())));
        assert!(params.contains(&("replication", "database".into())));
        assert!(params.contains(&("application_name", "fluxbase".into())));
    }

    #[test]
    fn debug_output_hides_the_password() {
        assert!(!format!("{:?}", config()).contains("s3cret"));
    }

    #[tokio::test]
    async fn md5_authentication_sends_the_salted_hash() {
        let conn = handshake_with(&config(), |mut s| async move {
            let startup = read_startup(&mut s).await;
            assert!(startup.windows(6).any(|w| w == b"alice\0"));
            s.write_all(&auth(5, &[1, 2, 3, 4])).await.unwrap();
            let (tag, body) = read_frontend(&mut s).await;
            assert_eq!(tag, b'p');
            assert_eq!(body, cstr(&md5_hash(b"alice", b"s3cret", [1, 2, 3, 4])));
            s.write_all(&session_start()).await.unwrap();
        })
        .await
        .unwrap();
        assert_eq!(conn.parameter("server_version"), Some("15.0"));
        assert_eq!(conn.backend_key(), (7, 99));
        assert_eq!(conn.transaction_status(), TransactionStatus::Idle);
        assert!(!conn.is_broken());
    }

    #[tokio::test]
    async fn a_directory_host_connects_over_its_unix_socket() {
        let dir = std::env::temp_dir().join(format!("fluxbase-wire-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let listener = tokio::net::UnixListener::bind(dir.join(".s.PGSQL.6543")).unwrap();
        tokio::spawn(async move {
            let (mut s, _) = listener.accept().await.unwrap();
            read_startup(&mut s).await;
            s.write_all(&session_start()).await.unwrap();
        });
        let cfg = ConnectConfig {
            host: dir.to_str().unwrap().to_owned(),
            port: 6543,
            ..config()
        };
        let conn = Connection::connect(&cfg).await;
        std::fs::remove_dir_all(&dir).unwrap();
        assert_eq!(conn.unwrap().backend_key(), (7, 99));
    }

    #[tokio::test]
    async fn cleartext_authentication_sends_the_password() {
        let conn = handshake_with(&config(), |mut s| async move {
            read_startup(&mut s).await;
            s.write_all(&auth(3, &[])).await.unwrap();
            assert_eq!(read_frontend(&mut s).await, (b'p', cstr("s3cret")));
            s.write_all(&session_start()).await.unwrap();
        })
        .await;
        assert!(conn.is_ok());
    }

    #[tokio::test]
    async fn a_password_request_without_a_password_is_an_auth_error() {
        let cfg = ConnectConfig {
            password: None,
            ..config()
        };
        let err = handshake_with(&cfg, |mut s| async move {
            read_startup(&mut s).await;
            s.write_all(&auth(3, &[])).await.unwrap();
        })
        .await
        .unwrap_err();
        assert!(matches!(err, WireError::Auth(_)), "{err:?}");
    }

    #[tokio::test]
    async fn an_unsupported_authentication_method_is_an_auth_error() {
        let err = handshake_with(&config(), |mut s| async move {
            read_startup(&mut s).await;
            s.write_all(&auth(7, &[])).await.unwrap(); // GSS
        })
        .await
        .unwrap_err();
        assert!(
            matches!(&err, WireError::Auth(m) if m.contains("GSS")),
            "{err:?}"
        );
    }

    #[tokio::test]
    async fn a_startup_error_comes_back_with_all_its_fields() {
        let err = handshake_with(&config(), |mut s| async move {
            read_startup(&mut s).await;
            s.write_all(&error_response(&[
                (b'S', "FATAL"),
                (b'V', "FATAL"),
                (b'C', "28P01"),
                (b'M', "password authentication failed for user \"alice\""),
                (b'D', "detail"),
                (b'H', "hint"),
                (b'P', "12"),
                (b'W', "context"),
                (b'Z', "a field this client does not know"),
            ]))
            .await
            .unwrap();
        })
        .await
        .unwrap_err();
        let db = err.as_db().expect("a server error");
        assert_eq!(
            (db.severity.as_str(), db.code.as_str(), db.phase),
            ("FATAL", "28P01", Phase::Startup)
        );
        assert_eq!(db.detail.as_deref(), Some("detail"));
        assert_eq!(db.hint.as_deref(), Some("hint"));
        assert_eq!(db.position, Some(12));
        assert_eq!(db.where_.as_deref(), Some("context"));
        assert!(db.is_fatal());
    }

    #[tokio::test]
    async fn malformed_server_input_is_a_protocol_error_and_breaks_the_connection() {
        let row_description = backend(
            b'T',
            &[
                &1u16.to_be_bytes()[..],
                &cstr("a"),
                &[0; 4],
                &[0; 2],
                &25u32.to_be_bytes(),
                &[0; 8],
            ]
            .concat(),
        );
        let data_row = |body: &[u8]| [row_description.clone(), backend(b'D', body)].concat();
        let cases: Vec<(&str, Vec<u8>)> = vec![
            ("unknown tag", backend(b'?', b"")),
            ("length below 4", vec![b'Z', 0, 0, 0, 3, b'I']),
            ("length above 1 GiB", vec![b'D', 0x7f, 0xff, 0xff, 0xff]),
            ("ReadyForQuery status", backend(b'Z', b"X")),
            ("trailing bytes", backend(b'Z', b"II")),
            ("DataRow before RowDescription", backend(b'D', &[0, 0])),
            (
                "DataRow value past the end",
                data_row(&[&1u16.to_be_bytes()[..], &100i32.to_be_bytes(), b"abc"].concat()),
            ),
            (
                "DataRow with too many values",
                data_row(
                    &[
                        &2u16.to_be_bytes()[..],
                        &(-1i32).to_be_bytes(),
                        &(-1i32).to_be_bytes(),
                    ]
                    .concat(),
                ),
            ),
            ("truncated RowDescription", backend(b'T', &[0, 1, b'a'])),
            ("unterminated ErrorResponse", backend(b'E', b"Mboom")),
            ("unterminated CommandComplete", backend(b'C', b"SELECT 1")),
            ("ParameterStatus not UTF-8", backend(b'S', b"a\0\xff\0")),
            ("BindComplete in a simple query", backend(b'2', b"")),
        ];
        for (case, reply) in cases {
            let mut conn = connection_answering(reply, true).await;
            let err = conn.simple_query("SELECT 1", 10).await.unwrap_err();
            assert!(matches!(err, WireError::Protocol(_)), "{case}: {err:?}");
            assert!(conn.is_broken(), "{case}");
            let again = conn.simple_query("SELECT 1", 10).await.unwrap_err();
            assert!(matches!(again, WireError::Closed), "{case}: {again:?}");
        }
    }

    #[tokio::test]
    async fn a_server_that_hangs_up_mid_message_closes_the_connection() {
        let mut conn = connection_answering(vec![b'C', 0, 0, 0, 20, b'S'], true).await;
        let err = conn.simple_query("SELECT 1", 10).await.unwrap_err();
        assert!(matches!(err, WireError::Closed), "{err:?}");
        assert!(conn.is_broken());
    }

    #[tokio::test]
    async fn an_abandoned_query_leaves_the_connection_broken() {
        let mut conn = connection_answering(Vec::new(), false).await;
        let abandoned =
            tokio::time::timeout(Duration::from_millis(50), conn.simple_query("SELECT 1", 10))
                .await;
        assert!(abandoned.is_err());
        assert!(conn.is_broken());
    }

    #[tokio::test]
    async fn a_nul_byte_in_the_sql_is_refused_before_sending() {
        let ok = [backend(b'I', b""), backend(b'Z', b"I")].concat();
        let mut conn = connection_answering(ok, false).await;
        let err = conn.simple_query("SELECT '\0'", 10).await.unwrap_err();
        assert!(matches!(err, WireError::InvalidInput(_)), "{err:?}");
        assert!(!conn.is_broken());
        let outcome = conn.simple_query("", 10).await.unwrap();
        assert_eq!(outcome, SimpleOutcome::default());
    }

    /// A prelude's Query answered with something no Query of ours can cause (COPY FROM STDIN)
    /// was once read past while waiting for ReadyForQuery: the client hung. Now a protocol
    /// error that breaks the connection, and the operation is never sent.
    #[tokio::test]
    async fn an_unexpected_answer_to_a_prelude_breaks_the_connection() {
        let copy_in = backend(b'G', &[0, 0, 0]);
        let mut conn = connection_answering(copy_in, false).await;
        conn.queue_prelude("SELECT 1");
        let err = tokio::time::timeout(Duration::from_secs(5), conn.simple_query("SELECT 2", 10))
            .await
            .expect("the client hung on the prelude's answer")
            .unwrap_err();
        assert!(matches!(err, WireError::Protocol(_)), "{err:?}");
        assert!(conn.is_broken());
    }

    /// A prelude that cannot be encoded fails the operation and is not left queued for the
    /// next one (which then runs alone).
    #[tokio::test]
    async fn a_prelude_that_cannot_be_encoded_is_dropped() {
        let (client, mut server) = tokio::io::duplex(64 * 1024);
        let seen = tokio::spawn(async move {
            read_startup(&mut server).await;
            server.write_all(&session_start()).await.unwrap();
            let query = read_frontend(&mut server).await;
            server
                .write_all(&[backend(b'I', b""), backend(b'Z', b"I")].concat())
                .await
                .unwrap();
            query
        });
        let mut conn = Connection::handshake(Box::new(client), &config())
            .await
            .unwrap();
        conn.queue_prelude("SELECT '\0'");
        let err = conn.simple_query("", 10).await.unwrap_err();
        assert!(matches!(err, WireError::InvalidInput(_)), "{err:?}");
        assert!(!conn.is_broken());
        conn.simple_query("", 10).await.unwrap();
        assert_eq!(
            seen.await.unwrap(),
            (b'Q', vec![0]),
            "only the empty Query was sent"
        );
    }
}
