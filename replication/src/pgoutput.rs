//! Decoder for the messages of PostgreSQL's `pgoutput` logical replication plugin, and for the
//! CopyData payloads of the streaming replication protocol that carry them.
//!
//! ```text
//!  CopyData payload ──parse_copy_data──► ReplicationMessage::XLogData { data, .. }
//!                                                                      │
//!                   LogicalReplicationMessage ◄──decode(data, ctx)─────┘
//!
//!  StandbyStatus ──encode_standby_status──► CopyData payload ('r')
//! ```
//!
//! # A pure layer
//!
//! Like `postgres-protocol` beneath `tokio-postgres`, this module is plain functions from
//! [`Bytes`] to enums: no I/O, no async, no state kept between calls. The replication stream,
//! which owns the connection and the LSN feedback, stays small, and the decoder can be tested
//! with hand-built bytes and fuzzed (`replication/fuzz`). Every input yields a message or a
//! [`DecodeError`] naming the offset and what was expected; a count or length read from the input
//! is checked against the bytes that remain before anything is allocated; text and binary column
//! values are zero-copy slices of the input.
//!
//! # Why the caller says whether it is inside a stream
//!
//! With `streaming` on (protocol 2 and later) PostgreSQL sends a large transaction in chunks,
//! each between Stream Start and Stream Stop, before it commits. Inside a chunk, Relation, Type,
//! Insert, Update, Delete, Truncate and Message carry an extra leading XID, and nothing in the
//! bytes says so: the tags are the same as outside a stream. Only the caller, who saw the Stream
//! Start, knows, hence [`DecodeContext::in_stream`]; [`DecodeContext::observe`] keeps it up to
//! date. Likewise Stream Abort carries an abort LSN and timestamp only with protocol 4 and
//! `streaming = parallel`: they are decoded when the protocol version allows them and the bytes
//! are there.
//!
//! Specification: [Logical Replication Message Formats] and, for XLogData, the primary keepalive
//! and the standby status update, [Streaming Replication Protocol].
//!
//! [Logical Replication Message Formats]: https://www.postgresql.org/docs/current/protocol-logicalrep-message-formats.html
//! [Streaming Replication Protocol]: https://www.postgresql.org/docs/current/protocol-replication.html

use std::fmt;
use std::str::FromStr;

use bytes::{BufMut, Bytes, BytesMut};

/// A PostgreSQL object identifier (relation, type).
pub type Oid = u32;
/// A PostgreSQL transaction id.
pub type Xid = u32;

/// A position in the write-ahead log, displayed and parsed as PostgreSQL does: `16/B374D848`.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Lsn(pub u64);

impl fmt::Display for Lsn {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{:X}/{:X}", self.0 >> 32, self.0 & 0xFFFF_FFFF)
    }
}

/// The error for a string that is not an LSN in PostgreSQL's `X/X` form.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("invalid LSN {0:?}: expected two hexadecimal numbers of 1 to 8 digits separated by '/'")]
pub struct ParseLsnError(String);

impl FromStr for Lsn {
    type Err = ParseLsnError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let half = |part: &str| {
            let hex =
                !part.is_empty() && part.len() <= 8 && part.bytes().all(|b| b.is_ascii_hexdigit());
            hex.then(|| u32::from_str_radix(part, 16).ok()).flatten()
        };
        let (hi, lo) = s
            .split_once('/')
            .ok_or_else(|| ParseLsnError(s.to_owned()))?;
        match (half(hi), half(lo)) {
            (Some(hi), Some(lo)) => Ok(Lsn(u64::from(hi) << 32 | u64::from(lo))),
            _ => Err(ParseLsnError(s.to_owned())),
        }
    }
}

/// A PostgreSQL `TimestampTz` as sent on the wire: microseconds since 2000-01-01 00:00:00 UTC.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct PgTimestamp(pub i64);

impl PgTimestamp {
    /// Microseconds from the Unix epoch to PostgreSQL's epoch (2000-01-01 00:00:00 UTC).
    pub const UNIX_EPOCH_OFFSET_MICROS: i64 = 946_684_800_000_000;

    /// Microseconds since 1970-01-01 00:00:00 UTC (saturating, so `infinity` stays at the edge).
    pub fn to_unix_micros(self) -> i64 {
        self.0.saturating_add(Self::UNIX_EPOCH_OFFSET_MICROS)
    }

    /// The timestamp `unix_micros` microseconds after 1970-01-01 00:00:00 UTC (saturating).
    pub fn from_unix_micros(unix_micros: i64) -> Self {
        PgTimestamp(unix_micros.saturating_sub(Self::UNIX_EPOCH_OFFSET_MICROS))
    }
}

/// What [`decode`] must know that the bytes of a message do not say.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct DecodeContext {
    /// The `proto_version` given to `START_REPLICATION` (1 to 4).
    pub protocol_version: u32,
    /// Whether the message lies between Stream Start and Stream Stop.
    pub in_stream: bool,
}

impl DecodeContext {
    /// The context before the first message: outside any stream.
    pub fn new(protocol_version: u32) -> Self {
        DecodeContext {
            protocol_version,
            in_stream: false,
        }
    }

    /// Follows a decoded message: Stream Start enters a stream, Stream Stop leaves it.
    pub fn observe(&mut self, message: &LogicalReplicationMessage) {
        match message {
            LogicalReplicationMessage::StreamStart(_) => self.in_stream = true,
            LogicalReplicationMessage::StreamStop => self.in_stream = false,
            _ => {}
        }
    }
}

/// Why bytes could not be decoded. Offsets count from the start of the buffer given to
/// [`decode`] or [`parse_copy_data`].
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum DecodeError {
    #[error("{what} at offset {offset} needs {needed} bytes but only {available} remain")]
    Truncated {
        offset: usize,
        what: &'static str,
        needed: usize,
        available: usize,
    },
    #[error("unknown message type {} at offset {offset}", show_byte(*.tag))]
    UnknownMessageType { offset: usize, tag: u8 },
    #[error("expected {expected} at offset {offset}, found {}", show_byte(*.found))]
    UnexpectedByte {
        offset: usize,
        expected: &'static str,
        found: u8,
    },
    #[error("{what} at offset {offset} has no terminating NUL byte")]
    UnterminatedString { offset: usize, what: &'static str },
    #[error("{what} at offset {offset} is not valid UTF-8")]
    InvalidUtf8 { offset: usize, what: &'static str },
    #[error("{count} unexpected bytes at offset {offset} after the end of the {} message", show_byte(*.tag))]
    TrailingBytes {
        offset: usize,
        tag: u8,
        count: usize,
    },
}

/// A message of the `pgoutput` plugin, as carried in [`XLogData::data`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum LogicalReplicationMessage {
    Begin(Begin),
    Commit(Commit),
    Origin(Origin),
    Relation(Relation),
    Type(Type),
    Insert(Insert),
    Update(Update),
    Delete(Delete),
    Truncate(Truncate),
    /// A logical decoding message (`pg_logical_emit_message`), sent with `messages = true`.
    Message(LogicalDecodingMessage),
    StreamStart(StreamStart),
    StreamStop,
    StreamCommit(StreamCommit),
    StreamAbort(StreamAbort),
    BeginPrepare(BeginPrepare),
    Prepare(Prepare),
    CommitPrepared(CommitPrepared),
    RollbackPrepared(RollbackPrepared),
    StreamPrepare(Prepare),
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Begin {
    /// The LSN of the transaction's commit record.
    pub final_lsn: Lsn,
    pub commit_timestamp: PgTimestamp,
    pub xid: Xid,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Commit {
    /// Currently unused (0).
    pub flags: u8,
    pub commit_lsn: Lsn,
    /// The end of the commit record: the LSN to confirm once the transaction is applied.
    pub end_lsn: Lsn,
    pub commit_timestamp: PgTimestamp,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Origin {
    /// The commit LSN on the origin server.
    pub commit_lsn: Lsn,
    pub name: String,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Relation {
    /// Set inside a stream.
    pub xid: Option<Xid>,
    pub id: Oid,
    /// The schema; empty for `pg_catalog`.
    pub namespace: String,
    pub name: String,
    pub replica_identity: ReplicaIdentity,
    pub columns: Vec<RelationColumn>,
}

/// `REPLICA IDENTITY` of a relation, which decides what old values Update and Delete carry.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ReplicaIdentity {
    /// The primary key, if any.
    Default,
    Nothing,
    /// The whole old row.
    Full,
    /// The columns of a chosen unique index.
    Index,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RelationColumn {
    /// Part of the replica identity key.
    pub is_key: bool,
    pub name: String,
    pub type_id: Oid,
    /// `atttypmod`, -1 when the type has none.
    pub type_modifier: i32,
}

/// Describes a non-built-in type before a Relation that uses it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Type {
    /// Set inside a stream.
    pub xid: Option<Xid>,
    pub id: Oid,
    /// The schema; empty for `pg_catalog`.
    pub namespace: String,
    pub name: String,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Insert {
    /// Set inside a stream.
    pub xid: Option<Xid>,
    pub relation_id: Oid,
    pub new: Tuple,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Update {
    /// Set inside a stream.
    pub xid: Option<Xid>,
    pub relation_id: Oid,
    /// Present when the key changed (`Key`) or with `REPLICA IDENTITY FULL` (`Row`).
    pub old: Option<OldTuple>,
    pub new: Tuple,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Delete {
    /// Set inside a stream.
    pub xid: Option<Xid>,
    pub relation_id: Oid,
    pub old: OldTuple,
}

/// The old values an Update or Delete carries, per the relation's [`ReplicaIdentity`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum OldTuple {
    /// `'K'`: only the replica identity key columns are set; the others are [`Column::Null`].
    Key(Tuple),
    /// `'O'`: the whole old row (`REPLICA IDENTITY FULL`).
    Row(Tuple),
}

/// One row's column values, in the relation's column order.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Tuple(pub Vec<Column>);

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Column {
    Null,
    /// A TOASTed value the change did not touch; PostgreSQL does not resend it.
    UnchangedToast,
    /// The value in PostgreSQL's text format.
    Text(Bytes),
    /// The value in the type's binary format (with `binary = true`).
    Binary(Bytes),
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Truncate {
    /// Set inside a stream.
    pub xid: Option<Xid>,
    pub options: TruncateOptions,
    pub relation_ids: Vec<Oid>,
}

/// The option bits of a Truncate.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct TruncateOptions(pub u8);

impl TruncateOptions {
    pub const CASCADE: u8 = 1;
    pub const RESTART_IDENTITY: u8 = 2;

    pub fn cascade(self) -> bool {
        self.0 & Self::CASCADE != 0
    }

    pub fn restart_identity(self) -> bool {
        self.0 & Self::RESTART_IDENTITY != 0
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LogicalDecodingMessage {
    /// Set inside a stream.
    pub xid: Option<Xid>,
    pub transactional: bool,
    pub lsn: Lsn,
    pub prefix: String,
    pub content: Bytes,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StreamStart {
    pub xid: Xid,
    /// The first chunk of this transaction.
    pub first_segment: bool,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StreamCommit {
    pub xid: Xid,
    /// Currently unused (0).
    pub flags: u8,
    pub commit_lsn: Lsn,
    pub end_lsn: Lsn,
    pub commit_timestamp: PgTimestamp,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StreamAbort {
    pub xid: Xid,
    /// The aborted subtransaction, or `xid` itself when the whole transaction aborted.
    pub subtransaction_xid: Xid,
    /// Protocol 4 with `streaming = parallel` only.
    pub abort_lsn: Option<Lsn>,
    /// Protocol 4 with `streaming = parallel` only.
    pub abort_timestamp: Option<PgTimestamp>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BeginPrepare {
    pub prepare_lsn: Lsn,
    pub end_lsn: Lsn,
    pub prepare_timestamp: PgTimestamp,
    pub xid: Xid,
    /// The user-chosen global transaction id of `PREPARE TRANSACTION`.
    pub gid: String,
}

/// Prepare (`'P'`) and Stream Prepare (`'p'`) have the same fields.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Prepare {
    /// Currently unused (0).
    pub flags: u8,
    pub prepare_lsn: Lsn,
    pub end_lsn: Lsn,
    pub prepare_timestamp: PgTimestamp,
    pub xid: Xid,
    pub gid: String,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CommitPrepared {
    /// Currently unused (0).
    pub flags: u8,
    pub commit_lsn: Lsn,
    pub end_lsn: Lsn,
    pub commit_timestamp: PgTimestamp,
    pub xid: Xid,
    pub gid: String,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RollbackPrepared {
    /// Currently unused (0).
    pub flags: u8,
    pub prepare_end_lsn: Lsn,
    pub rollback_end_lsn: Lsn,
    pub prepare_timestamp: PgTimestamp,
    pub rollback_timestamp: PgTimestamp,
    pub xid: Xid,
    pub gid: String,
}

/// Decodes one `pgoutput` message: the whole of `buf`, which must hold nothing else.
pub fn decode(buf: Bytes, ctx: DecodeContext) -> Result<LogicalReplicationMessage, DecodeError> {
    use LogicalReplicationMessage as M;

    let mut r = Reader::new(buf);
    let tag = r.u8("message type")?;
    let stream_xid = |r: &mut Reader| ctx.in_stream.then(|| r.u32("xid")).transpose();
    let message = match tag {
        b'B' => M::Begin(Begin {
            final_lsn: r.lsn("final LSN")?,
            commit_timestamp: r.timestamp("commit timestamp")?,
            xid: r.u32("xid")?,
        }),
        b'C' => M::Commit(Commit {
            flags: r.u8("flags")?,
            commit_lsn: r.lsn("commit LSN")?,
            end_lsn: r.lsn("end LSN")?,
            commit_timestamp: r.timestamp("commit timestamp")?,
        }),
        b'O' => M::Origin(Origin {
            commit_lsn: r.lsn("origin commit LSN")?,
            name: r.string("origin name")?,
        }),
        b'R' => M::Relation(Relation {
            xid: stream_xid(&mut r)?,
            id: r.u32("relation id")?,
            namespace: r.string("namespace")?,
            name: r.string("relation name")?,
            replica_identity: r.replica_identity()?,
            columns: r.relation_columns()?,
        }),
        b'Y' => M::Type(Type {
            xid: stream_xid(&mut r)?,
            id: r.u32("type id")?,
            namespace: r.string("namespace")?,
            name: r.string("type name")?,
        }),
        b'I' => {
            let xid = stream_xid(&mut r)?;
            let relation_id = r.u32("relation id")?;
            r.expect(b'N', "new tuple tag 'N'")?;
            M::Insert(Insert {
                xid,
                relation_id,
                new: r.tuple()?,
            })
        }
        b'U' => {
            const EXPECTED: &str = "tuple tag ('K', 'O' or 'N')";
            let xid = stream_xid(&mut r)?;
            let relation_id = r.u32("relation id")?;
            let offset = r.pos;
            let old = match r.u8(EXPECTED)? {
                b'K' => Some(OldTuple::Key(r.tuple()?)),
                b'O' => Some(OldTuple::Row(r.tuple()?)),
                b'N' => None,
                found => return Err(unexpected(offset, EXPECTED, found)),
            };
            if old.is_some() {
                r.expect(b'N', "new tuple tag 'N'")?;
            }
            M::Update(Update {
                xid,
                relation_id,
                old,
                new: r.tuple()?,
            })
        }
        b'D' => {
            const EXPECTED: &str = "old tuple tag ('K' or 'O')";
            let xid = stream_xid(&mut r)?;
            let relation_id = r.u32("relation id")?;
            let offset = r.pos;
            let old = match r.u8(EXPECTED)? {
                b'K' => OldTuple::Key(r.tuple()?),
                b'O' => OldTuple::Row(r.tuple()?),
                found => return Err(unexpected(offset, EXPECTED, found)),
            };
            M::Delete(Delete {
                xid,
                relation_id,
                old,
            })
        }
        b'T' => {
            let xid = stream_xid(&mut r)?;
            let offset = r.pos;
            let count = r.u32("relation count")? as usize;
            let options = TruncateOptions(r.u8("truncate options")?);
            let available = r.remaining();
            if count > available / 4 {
                let needed = count.saturating_mul(4);
                return Err(DecodeError::Truncated {
                    offset,
                    what: "relation ids",
                    needed,
                    available,
                });
            }
            let relation_ids = (0..count)
                .map(|_| r.u32("relation id"))
                .collect::<Result<_, _>>()?;
            M::Truncate(Truncate {
                xid,
                options,
                relation_ids,
            })
        }
        b'M' => M::Message(LogicalDecodingMessage {
            xid: stream_xid(&mut r)?,
            transactional: r.u8("flags")? & 1 != 0,
            lsn: r.lsn("message LSN")?,
            prefix: r.string("message prefix")?,
            content: r.length_prefixed("message content")?,
        }),
        b'S' => M::StreamStart(StreamStart {
            xid: r.u32("xid")?,
            first_segment: r.u8("first segment flag")? == 1,
        }),
        b'E' => M::StreamStop,
        b'c' => M::StreamCommit(StreamCommit {
            xid: r.u32("xid")?,
            flags: r.u8("flags")?,
            commit_lsn: r.lsn("commit LSN")?,
            end_lsn: r.lsn("end LSN")?,
            commit_timestamp: r.timestamp("commit timestamp")?,
        }),
        b'A' => {
            let xid = r.u32("xid")?;
            let subtransaction_xid = r.u32("subtransaction xid")?;
            let parallel = ctx.protocol_version >= 4 && r.remaining() > 0;
            let (abort_lsn, abort_timestamp) = if parallel {
                (
                    Some(r.lsn("abort LSN")?),
                    Some(r.timestamp("abort timestamp")?),
                )
            } else {
                (None, None)
            };
            M::StreamAbort(StreamAbort {
                xid,
                subtransaction_xid,
                abort_lsn,
                abort_timestamp,
            })
        }
        b'b' => M::BeginPrepare(BeginPrepare {
            prepare_lsn: r.lsn("prepare LSN")?,
            end_lsn: r.lsn("end LSN")?,
            prepare_timestamp: r.timestamp("prepare timestamp")?,
            xid: r.u32("xid")?,
            gid: r.string("gid")?,
        }),
        b'P' => M::Prepare(r.prepare()?),
        b'p' => M::StreamPrepare(r.prepare()?),
        b'K' => M::CommitPrepared(CommitPrepared {
            flags: r.u8("flags")?,
            commit_lsn: r.lsn("commit LSN")?,
            end_lsn: r.lsn("end LSN")?,
            commit_timestamp: r.timestamp("commit timestamp")?,
            xid: r.u32("xid")?,
            gid: r.string("gid")?,
        }),
        b'r' => M::RollbackPrepared(RollbackPrepared {
            flags: r.u8("flags")?,
            prepare_end_lsn: r.lsn("prepare end LSN")?,
            rollback_end_lsn: r.lsn("rollback end LSN")?,
            prepare_timestamp: r.timestamp("prepare timestamp")?,
            rollback_timestamp: r.timestamp("rollback timestamp")?,
            xid: r.u32("xid")?,
            gid: r.string("gid")?,
        }),
        tag => return Err(DecodeError::UnknownMessageType { offset: 0, tag }),
    };
    r.finish(tag)?;
    Ok(message)
}

/// A CopyData payload from the server during `START_REPLICATION`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ReplicationMessage {
    XLogData(XLogData),
    PrimaryKeepalive(PrimaryKeepalive),
}

/// `'w'`: WAL data; with `pgoutput`, exactly one logical replication message.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct XLogData {
    /// Where `data` starts in the WAL.
    pub wal_start: Lsn,
    /// The current end of WAL on the server.
    pub wal_end: Lsn,
    /// The server's clock when it sent the message.
    pub server_clock: PgTimestamp,
    /// The `pgoutput` message, for [`decode`].
    pub data: Bytes,
}

/// `'k'`: a primary keepalive.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PrimaryKeepalive {
    /// The current end of WAL on the server.
    pub wal_end: Lsn,
    pub server_clock: PgTimestamp,
    /// The server asks for a standby status update now, to avoid a timeout disconnect.
    pub reply_requested: bool,
}

/// Decodes the payload of a CopyData message received during `START_REPLICATION`.
pub fn parse_copy_data(buf: Bytes) -> Result<ReplicationMessage, DecodeError> {
    let mut r = Reader::new(buf);
    match r.u8("replication message type")? {
        b'w' => {
            let wal_start = r.lsn("WAL start")?;
            let wal_end = r.lsn("WAL end")?;
            let server_clock = r.timestamp("server clock")?;
            let data = r.rest();
            Ok(ReplicationMessage::XLogData(XLogData {
                wal_start,
                wal_end,
                server_clock,
                data,
            }))
        }
        b'k' => {
            let keepalive = PrimaryKeepalive {
                wal_end: r.lsn("WAL end")?,
                server_clock: r.timestamp("server clock")?,
                reply_requested: r.u8("reply flag")? == 1,
            };
            r.finish(b'k')?;
            Ok(ReplicationMessage::PrimaryKeepalive(keepalive))
        }
        tag => Err(DecodeError::UnknownMessageType { offset: 0, tag }),
    }
}

/// A standby status update: how far the client has got, which lets the server recycle WAL.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct StandbyStatus {
    /// The last WAL byte + 1 received and written.
    pub written: Lsn,
    /// The last WAL byte + 1 made durable: a logical slot's `confirmed_flush_lsn` follows it.
    pub flushed: Lsn,
    /// The last WAL byte + 1 applied.
    pub applied: Lsn,
    /// The client's clock when sending.
    pub client_clock: PgTimestamp,
    /// Ask the server to answer at once with a keepalive.
    pub reply_requested: bool,
}

/// Encodes the CopyData payload (`'r'`, 34 bytes) of a standby status update.
pub fn encode_standby_status(status: &StandbyStatus) -> Bytes {
    let mut buf = BytesMut::with_capacity(34);
    buf.put_u8(b'r');
    buf.put_u64(status.written.0);
    buf.put_u64(status.flushed.0);
    buf.put_u64(status.applied.0);
    buf.put_i64(status.client_clock.0);
    buf.put_u8(u8::from(status.reply_requested));
    buf.freeze()
}

fn show_byte(byte: u8) -> String {
    if byte.is_ascii_graphic() {
        format!("'{}'", char::from(byte))
    } else {
        format!("0x{byte:02x}")
    }
}

fn unexpected(offset: usize, expected: &'static str, found: u8) -> DecodeError {
    DecodeError::UnexpectedByte {
        offset,
        expected,
        found,
    }
}

/// A cursor over the input that checks every read against what remains.
struct Reader {
    buf: Bytes,
    pos: usize,
}

impl Reader {
    fn new(buf: Bytes) -> Self {
        Reader { buf, pos: 0 }
    }

    fn remaining(&self) -> usize {
        self.buf.len() - self.pos
    }

    fn take(&mut self, len: usize, what: &'static str) -> Result<&[u8], DecodeError> {
        if len > self.remaining() {
            return Err(DecodeError::Truncated {
                offset: self.pos,
                what,
                needed: len,
                available: self.remaining(),
            });
        }
        let start = self.pos;
        self.pos += len;
        Ok(&self.buf[start..self.pos])
    }

    fn array<const N: usize>(&mut self, what: &'static str) -> Result<[u8; N], DecodeError> {
        let mut out = [0; N];
        out.copy_from_slice(self.take(N, what)?);
        Ok(out)
    }

    fn u8(&mut self, what: &'static str) -> Result<u8, DecodeError> {
        Ok(self.array::<1>(what)?[0])
    }

    fn u16(&mut self, what: &'static str) -> Result<u16, DecodeError> {
        self.array(what).map(u16::from_be_bytes)
    }

    fn u32(&mut self, what: &'static str) -> Result<u32, DecodeError> {
        self.array(what).map(u32::from_be_bytes)
    }

    fn i32(&mut self, what: &'static str) -> Result<i32, DecodeError> {
        self.array(what).map(i32::from_be_bytes)
    }

    fn lsn(&mut self, what: &'static str) -> Result<Lsn, DecodeError> {
        self.array(what).map(|b| Lsn(u64::from_be_bytes(b)))
    }

    fn timestamp(&mut self, what: &'static str) -> Result<PgTimestamp, DecodeError> {
        self.array(what).map(|b| PgTimestamp(i64::from_be_bytes(b)))
    }

    fn expect(&mut self, expected_byte: u8, expected: &'static str) -> Result<(), DecodeError> {
        let offset = self.pos;
        match self.u8(expected)? {
            found if found == expected_byte => Ok(()),
            found => Err(unexpected(offset, expected, found)),
        }
    }

    /// A NUL-terminated UTF-8 string.
    fn string(&mut self, what: &'static str) -> Result<String, DecodeError> {
        let offset = self.pos;
        let rest = &self.buf[offset..];
        let len = rest
            .iter()
            .position(|&b| b == 0)
            .ok_or(DecodeError::UnterminatedString { offset, what })?;
        let text = std::str::from_utf8(&rest[..len])
            .map_err(|_| DecodeError::InvalidUtf8 { offset, what })?;
        let text = text.to_owned();
        self.pos += len + 1;
        Ok(text)
    }

    /// An Int32 length, then that many bytes, sliced from the input without copying.
    /// Errors name the offset of the length, which is what is wrong when it exceeds the input.
    fn length_prefixed(&mut self, what: &'static str) -> Result<Bytes, DecodeError> {
        let offset = self.pos;
        let len = self.u32(what)? as usize;
        let available = self.remaining();
        if len > available {
            return Err(DecodeError::Truncated {
                offset,
                what,
                needed: len,
                available,
            });
        }
        self.pos += len;
        Ok(self.buf.slice(self.pos - len..self.pos))
    }

    fn rest(&mut self) -> Bytes {
        let rest = self.buf.slice(self.pos..);
        self.pos = self.buf.len();
        rest
    }

    /// Refuses bytes after the end of the message whose type byte is `tag`.
    fn finish(&self, tag: u8) -> Result<(), DecodeError> {
        match self.remaining() {
            0 => Ok(()),
            count => Err(DecodeError::TrailingBytes {
                offset: self.pos,
                tag,
                count,
            }),
        }
    }

    fn replica_identity(&mut self) -> Result<ReplicaIdentity, DecodeError> {
        const EXPECTED: &str = "replica identity ('d', 'n', 'f' or 'i')";
        let offset = self.pos;
        match self.u8(EXPECTED)? {
            b'd' => Ok(ReplicaIdentity::Default),
            b'n' => Ok(ReplicaIdentity::Nothing),
            b'f' => Ok(ReplicaIdentity::Full),
            b'i' => Ok(ReplicaIdentity::Index),
            found => Err(unexpected(offset, EXPECTED, found)),
        }
    }

    fn relation_columns(&mut self) -> Result<Vec<RelationColumn>, DecodeError> {
        // Flags, an empty name's NUL, type id and modifier: no column is shorter.
        const MIN_COLUMN_LEN: usize = 1 + 1 + 4 + 4;
        let count = usize::from(self.u16("column count")?);
        let mut columns = Vec::with_capacity(count.min(self.remaining() / MIN_COLUMN_LEN));
        for _ in 0..count {
            columns.push(RelationColumn {
                is_key: self.u8("column flags")? & 1 != 0,
                name: self.string("column name")?,
                type_id: self.u32("column type id")?,
                type_modifier: self.i32("column type modifier")?,
            });
        }
        Ok(columns)
    }

    fn tuple(&mut self) -> Result<Tuple, DecodeError> {
        const EXPECTED: &str = "column kind ('n', 'u', 't' or 'b')";
        let count = usize::from(self.u16("column count")?);
        // Every column takes at least its kind byte.
        let mut columns = Vec::with_capacity(count.min(self.remaining()));
        for _ in 0..count {
            let offset = self.pos;
            columns.push(match self.u8(EXPECTED)? {
                b'n' => Column::Null,
                b'u' => Column::UnchangedToast,
                b't' => Column::Text(self.length_prefixed("text column value")?),
                b'b' => Column::Binary(self.length_prefixed("binary column value")?),
                found => return Err(unexpected(offset, EXPECTED, found)),
            });
        }
        Ok(Tuple(columns))
    }

    fn prepare(&mut self) -> Result<Prepare, DecodeError> {
        Ok(Prepare {
            flags: self.u8("flags")?,
            prepare_lsn: self.lsn("prepare LSN")?,
            end_lsn: self.lsn("end LSN")?,
            prepare_timestamp: self.timestamp("prepare timestamp")?,
            xid: self.u32("xid")?,
            gid: self.string("gid")?,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::Column::{Null, UnchangedToast};
    use super::LogicalReplicationMessage as M;
    use super::*;

    const V1: DecodeContext = DecodeContext {
        protocol_version: 1,
        in_stream: false,
    };
    const V2_STREAM: DecodeContext = DecodeContext {
        protocol_version: 2,
        in_stream: true,
    };
    const V3: DecodeContext = DecodeContext {
        protocol_version: 3,
        in_stream: false,
    };
    const V4_STREAM: DecodeContext = DecodeContext {
        protocol_version: 4,
        in_stream: true,
    };

    /// Test-only encoder, the inverse of [`decode`], so that fixtures read as values.
    #[derive(Default)]
    struct Wire(BytesMut);

    impl Wire {
        fn u8(mut self, v: u8) -> Self {
            self.0.put_u8(v);
            self
        }
        fn u16(mut self, v: usize) -> Self {
            self.0.put_u16(v as u16);
            self
        }
        fn u32(mut self, v: u32) -> Self {
            self.0.put_u32(v);
            self
        }
        fn i32(mut self, v: i32) -> Self {
            self.0.put_i32(v);
            self
        }
        fn lsn(mut self, v: Lsn) -> Self {
            self.0.put_u64(v.0);
            self
        }
        fn ts(mut self, v: PgTimestamp) -> Self {
            self.0.put_i64(v.0);
            self
        }
        fn raw(mut self, v: &[u8]) -> Self {
            self.0.put_slice(v);
            self
        }
        fn cstr(self, v: &str) -> Self {
            self.raw(v.as_bytes()).u8(0)
        }
        fn counted(self, v: &[u8]) -> Self {
            self.u32(v.len() as u32).raw(v)
        }
        fn xid(self, xid: Option<Xid>) -> Self {
            xid.into_iter().fold(self, Wire::u32)
        }
        fn tuple(self, tuple: &Tuple) -> Self {
            tuple
                .0
                .iter()
                .fold(self.u16(tuple.0.len()), |w, column| match column {
                    Null => w.u8(b'n'),
                    UnchangedToast => w.u8(b'u'),
                    Column::Text(v) => w.u8(b't').counted(v),
                    Column::Binary(v) => w.u8(b'b').counted(v),
                })
        }
        fn old(self, old: &OldTuple) -> Self {
            match old {
                OldTuple::Key(t) => self.u8(b'K').tuple(t),
                OldTuple::Row(t) => self.u8(b'O').tuple(t),
            }
        }
        fn prepare(self, p: &Prepare) -> Self {
            let w = self.u8(p.flags).lsn(p.prepare_lsn).lsn(p.end_lsn);
            w.ts(p.prepare_timestamp).u32(p.xid).cstr(&p.gid)
        }
        fn bytes(self) -> Bytes {
            self.0.freeze()
        }
    }

    fn encode(message: &LogicalReplicationMessage) -> Bytes {
        let w = Wire::default();
        let w = match message {
            M::Begin(m) => w
                .u8(b'B')
                .lsn(m.final_lsn)
                .ts(m.commit_timestamp)
                .u32(m.xid),
            M::Commit(m) => {
                let w = w.u8(b'C').u8(m.flags).lsn(m.commit_lsn).lsn(m.end_lsn);
                w.ts(m.commit_timestamp)
            }
            M::Origin(m) => w.u8(b'O').lsn(m.commit_lsn).cstr(&m.name),
            M::Relation(m) => {
                let identity = match m.replica_identity {
                    ReplicaIdentity::Default => b'd',
                    ReplicaIdentity::Nothing => b'n',
                    ReplicaIdentity::Full => b'f',
                    ReplicaIdentity::Index => b'i',
                };
                let w = w
                    .u8(b'R')
                    .xid(m.xid)
                    .u32(m.id)
                    .cstr(&m.namespace)
                    .cstr(&m.name);
                let w = w.u8(identity).u16(m.columns.len());
                m.columns.iter().fold(w, |w, c| {
                    let w = w.u8(u8::from(c.is_key)).cstr(&c.name);
                    w.u32(c.type_id).i32(c.type_modifier)
                })
            }
            M::Type(m) => w
                .u8(b'Y')
                .xid(m.xid)
                .u32(m.id)
                .cstr(&m.namespace)
                .cstr(&m.name),
            M::Insert(m) => w
                .u8(b'I')
                .xid(m.xid)
                .u32(m.relation_id)
                .u8(b'N')
                .tuple(&m.new),
            M::Update(m) => {
                let w = w.u8(b'U').xid(m.xid).u32(m.relation_id);
                m.old.iter().fold(w, Wire::old).u8(b'N').tuple(&m.new)
            }
            M::Delete(m) => w.u8(b'D').xid(m.xid).u32(m.relation_id).old(&m.old),
            M::Truncate(m) => {
                let w = w.u8(b'T').xid(m.xid).u32(m.relation_ids.len() as u32);
                m.relation_ids
                    .iter()
                    .fold(w.u8(m.options.0), |w, id| w.u32(*id))
            }
            M::Message(m) => {
                let w = w
                    .u8(b'M')
                    .xid(m.xid)
                    .u8(u8::from(m.transactional))
                    .lsn(m.lsn);
                w.cstr(&m.prefix).counted(&m.content)
            }
            M::StreamStart(m) => w.u8(b'S').u32(m.xid).u8(u8::from(m.first_segment)),
            M::StreamStop => w.u8(b'E'),
            M::StreamCommit(m) => {
                let w = w
                    .u8(b'c')
                    .u32(m.xid)
                    .u8(m.flags)
                    .lsn(m.commit_lsn)
                    .lsn(m.end_lsn);
                w.ts(m.commit_timestamp)
            }
            M::StreamAbort(m) => {
                let w = w.u8(b'A').u32(m.xid).u32(m.subtransaction_xid);
                let w = m.abort_lsn.into_iter().fold(w, Wire::lsn);
                m.abort_timestamp.into_iter().fold(w, Wire::ts)
            }
            M::BeginPrepare(m) => {
                let w = w
                    .u8(b'b')
                    .lsn(m.prepare_lsn)
                    .lsn(m.end_lsn)
                    .ts(m.prepare_timestamp);
                w.u32(m.xid).cstr(&m.gid)
            }
            M::Prepare(m) => w.u8(b'P').prepare(m),
            M::StreamPrepare(m) => w.u8(b'p').prepare(m),
            M::CommitPrepared(m) => {
                let w = w.u8(b'K').u8(m.flags).lsn(m.commit_lsn).lsn(m.end_lsn);
                w.ts(m.commit_timestamp).u32(m.xid).cstr(&m.gid)
            }
            M::RollbackPrepared(m) => {
                let w = w
                    .u8(b'r')
                    .u8(m.flags)
                    .lsn(m.prepare_end_lsn)
                    .lsn(m.rollback_end_lsn);
                let w = w.ts(m.prepare_timestamp).ts(m.rollback_timestamp);
                w.u32(m.xid).cstr(&m.gid)
            }
        };
        w.bytes()
    }

    fn hex(s: &str) -> Bytes {
        let digits: Vec<u8> = s.bytes().filter(|b| !b.is_ascii_whitespace()).collect();
        let nibble = |d: u8| (d as char).to_digit(16).expect("hex digit") as u8;
        let bytes: Vec<u8> = digits
            .chunks(2)
            .map(|p| nibble(p[0]) << 4 | nibble(p[1]))
            .collect();
        bytes.into()
    }

    fn text(v: impl Into<Bytes>) -> Column {
        Column::Text(v.into())
    }

    fn binary(v: &'static [u8]) -> Column {
        Column::Binary(Bytes::from_static(v))
    }

    fn row<const N: usize>(columns: [Column; N]) -> Tuple {
        Tuple(columns.into())
    }

    fn column(is_key: bool, name: &str, type_id: Oid, type_modifier: i32) -> RelationColumn {
        RelationColumn {
            is_key,
            name: name.into(),
            type_id,
            type_modifier,
        }
    }

    fn items_relation(xid: Option<Xid>, replica_identity: ReplicaIdentity) -> Relation {
        Relation {
            xid,
            id: 16389,
            namespace: "public".into(),
            name: "items".into(),
            replica_identity,
            columns: vec![
                column(true, "id", 23, -1),
                column(false, "name", 25, -1),
                column(false, "price", 1700, (10 << 16 | 2) + 4),
                column(false, "m", 16385, -1),
                column(false, "big", 25, -1),
            ],
        }
    }

    /// Bytes from PostgreSQL 15 (`pg_logical_slot_get_binary_changes` on tables `items` and
    /// `full_rows`, REPLICA IDENTITY FULL) and what they decode to: proof that the decoder and
    /// the test encoder agree with the server, not only with each other.
    #[rustfmt::skip]
    fn server_fixtures() -> Vec<(DecodeContext, Bytes, LogicalReplicationMessage)> {
        let ts = PgTimestamp(0x0003_044a_66fe_b0f4);
        let (lsn, end) = (Lsn(0x152_f1d0), Lsn(0x152_f200));
        let big = "x".repeat(5000);
        let nulls = |id| row([text(id), Null, Null, Null, Null]);
        let full_rows = |xid| Relation {
            xid, id: 16396, namespace: "public".into(), name: "full_rows".into(),
            replica_identity: ReplicaIdentity::Full,
            columns: vec![column(true, "id", 23, -1), column(true, "v", 25, -1)],
        };
        let gx = |xid, gid: &str| (xid, gid.to_owned());
        vec![
            (V1, hex("42 00000000 0152f1d0 0003044a66feb0f4 000002da"),
             M::Begin(Begin { final_lsn: lsn, commit_timestamp: ts, xid: 730 })),
            (V1, hex("59 00004001 7075626c696300 6d6f6f6400"),
             M::Type(Type { xid: None, id: 16385, namespace: "public".into(), name: "mood".into() })),
            (V1, hex("52 00004005 7075626c696300 6974656d7300 64 0005
                      01 696400 00000017 ffffffff  00 6e616d6500 00000019 ffffffff
                      00 707269636500 000006a4 000a0006  00 6d00 00004001 ffffffff
                      00 62696700 00000019 ffffffff"),
             M::Relation(items_relation(None, ReplicaIdentity::Default))),
            (V1, Wire::default().raw(&hex("49 00004005 4e 0005 74 00000001 31 74 00000005 6170706c65
                                           74 00000004 312e3530 74 00000005 6861707079 74 00001388"))
                  .raw(big.as_bytes()).bytes(),
             M::Insert(Insert { xid: None, relation_id: 16389,
                                new: row([text("1"), text("apple"), text("1.50"), text("happy"), text(big)]) })),
            (V1, hex("55 00004005 4e 0005 74 00000001 31 74 00000004 70656172 74 00000004 312e3530
                      74 00000005 6861707079 75"),
             M::Update(Update { xid: None, relation_id: 16389, old: None,
                                new: row([text("1"), text("pear"), text("1.50"), text("happy"), UnchangedToast]) })),
            (V1, hex("55 00004005 4b 0005 7400000001326e6e6e6e 4e 0005 7400000001336e6e6e6e"),
             M::Update(Update { xid: None, relation_id: 16389, old: Some(OldTuple::Key(nulls("2"))), new: nulls("3") })),
            (V1, hex("44 00004005 4b 0005 7400000001336e6e6e6e"),
             M::Delete(Delete { xid: None, relation_id: 16389, old: OldTuple::Key(nulls("3")) })),
            (V1, hex("55 0000400c 4f 0002 74 00000001 37 74 00000005 736576656e
                                    4e 0002 74 00000001 37 74 00000005 534556454e"),
             M::Update(Update { xid: None, relation_id: 16396, old: Some(OldTuple::Row(row([text("7"), text("seven")]))),
                                new: row([text("7"), text("SEVEN")]) })),
            (V1, hex("44 0000400c 4f 0002 74 00000001 37 74 00000005 534556454e"),
             M::Delete(Delete { xid: None, relation_id: 16396, old: OldTuple::Row(row([text("7"), text("SEVEN")])) })),
            (V1, hex("4d 01 00000000 0152f1d0 667800 00000005 68656c6c6f"),
             M::Message(LogicalDecodingMessage { xid: None, transactional: true, lsn, prefix: "fx".into(),
                                                 content: Bytes::from_static(b"hello") })),
            (V1, hex("43 00 00000000 0152f1d0 00000000 0152f200 0003044a66feb0f4"),
             M::Commit(Commit { flags: 0, commit_lsn: lsn, end_lsn: end, commit_timestamp: ts })),
            (V1, hex("4d 00 00000000 0152f238 6e7400 00000002 00ff"),
             M::Message(LogicalDecodingMessage { xid: None, transactional: false, lsn: Lsn(0x152_f238),
                                                 prefix: "nt".into(), content: Bytes::from_static(b"\0\xff") })),
            (V1, hex("54 00000002 03 00004005 0000400c"),
             M::Truncate(Truncate { xid: None, options: TruncateOptions(3), relation_ids: vec![16389, 16396] })),
            // `binary = true`: int4, text, numeric, enum, null.
            (V1, hex("49 00004005 4e 0005 62 00000004 0000000a  62 00000001 62
                      62 0000000a 0001000000000002 0002  62 00000003 736164  6e"),
             M::Insert(Insert { xid: None, relation_id: 16389,
                                new: row([binary(&[0, 0, 0, 10]), binary(b"b"), binary(&[0, 1, 0, 0, 0, 0, 0, 2, 0, 2]),
                                          binary(b"sad"), Null]) })),
            (V1, hex("4f 00000000 00abcdef 757073747265616d00"),
             M::Origin(Origin { commit_lsn: Lsn(0xab_cdef), name: "upstream".into() })),
            // `streaming = on`: a chunk of transaction 735, and 739's first insert.
            (V1, hex("53 000002df 01"), M::StreamStart(StreamStart { xid: 735, first_segment: true })),
            (V2_STREAM, hex("52 000002df 0000400c 7075626c696300 66756c6c5f726f777300 66 0002
                             01 696400 00000017 ffffffff  01 7600 00000019 ffffffff"),
             M::Relation(full_rows(Some(735)))),
            (V2_STREAM, Wire::default().raw(&hex("49 000002e3 0000400c 4e 0002 74 00000001 31 74 00000064"))
                        .raw("s".repeat(100).as_bytes()).bytes(),
             M::Insert(Insert { xid: Some(739), relation_id: 16396, new: row([text("1"), text("s".repeat(100))]) })),
            (V2_STREAM, hex("45"), M::StreamStop),
            (V1, hex("41 000002df 000002e0"),
             M::StreamAbort(StreamAbort { xid: 735, subtransaction_xid: 736, abort_lsn: None, abort_timestamp: None })),
            (V1, hex("63 000002df 00 00000000 015cd7e0 00000000 015cd810 0003044a66fed3b7"),
             M::StreamCommit(StreamCommit { xid: 735, flags: 0, commit_lsn: Lsn(0x15c_d7e0), end_lsn: Lsn(0x15c_d810),
                                            commit_timestamp: PgTimestamp(0x0003_044a_66fe_d3b7) })),
            // `two_phase = on`: PREPARE TRANSACTION 'gx1', COMMIT PREPARED; 'gx2', ROLLBACK PREPARED.
            (V3, hex("62 00000000 015cd858 00000000 015cd950 0003044a66fee59a 000002e1 67783100"), {
                let (xid, gid) = gx(737, "gx1");
                M::BeginPrepare(BeginPrepare { prepare_lsn: Lsn(0x15c_d858), end_lsn: Lsn(0x15c_d950),
                                               prepare_timestamp: PgTimestamp(0x0003_044a_66fe_e59a), xid, gid })
            }),
            (V3, hex("50 00 00000000 015cd858 00000000 015cd950 0003044a66fee59a 000002e1 67783100"), {
                let (xid, gid) = gx(737, "gx1");
                M::Prepare(Prepare { flags: 0, prepare_lsn: Lsn(0x15c_d858), end_lsn: Lsn(0x15c_d950),
                                     prepare_timestamp: PgTimestamp(0x0003_044a_66fe_e59a), xid, gid })
            }),
            (V3, hex("4b 00 00000000 015cd950 00000000 015cd988 0003044a66fee6d1 000002e1 67783100"), {
                let (xid, gid) = gx(737, "gx1");
                M::CommitPrepared(CommitPrepared { flags: 0, commit_lsn: Lsn(0x15c_d950), end_lsn: Lsn(0x15c_d988),
                                                   commit_timestamp: PgTimestamp(0x0003_044a_66fe_e6d1), xid, gid })
            }),
            (V3, hex("72 00 00000000 015cdac8 00000000 015cdb00 0003044a66fee7c5 0003044a66fee880 000002e2 67783200"), {
                let (xid, gid) = gx(738, "gx2");
                M::RollbackPrepared(RollbackPrepared {
                    flags: 0, prepare_end_lsn: Lsn(0x15c_dac8), rollback_end_lsn: Lsn(0x15c_db00),
                    prepare_timestamp: PgTimestamp(0x0003_044a_66fe_e7c5),
                    rollback_timestamp: PgTimestamp(0x0003_044a_66fe_e880), xid, gid,
                })
            }),
        ]
    }

    /// What the server captures leave out: the other replica identities, every streamed change
    /// kind, a protocol 4 Stream Abort, Stream Prepare, and the mix of column kinds in one row.
    #[rustfmt::skip]
    fn encoded_samples() -> Vec<(DecodeContext, LogicalReplicationMessage)> {
        let xid = Some(740);
        let lsn = Lsn(0x1_0000_00f0);
        let ts = PgTimestamp(800_000_000_000_000);
        let mixed = row([text("1"), Null, UnchangedToast, binary(&[0, 1]), text("")]);
        let key = row([text("1"), Null, Null, Null, Null]);
        let prepare = Prepare { flags: 0, prepare_lsn: lsn, end_lsn: Lsn(lsn.0 + 8), prepare_timestamp: ts, xid: 9,
                                gid: "g1".into() };
        vec![
            (V1, M::Relation(Relation { columns: vec![], ..items_relation(None, ReplicaIdentity::Nothing) })),
            (V1, M::Relation(items_relation(None, ReplicaIdentity::Index))),
            (V1, M::Update(Update { xid: None, relation_id: 1, old: Some(OldTuple::Row(mixed.clone())), new: mixed.clone() })),
            (V1, M::Insert(Insert { xid: None, relation_id: 1, new: row([]) })),
            (V2_STREAM, M::Relation(items_relation(xid, ReplicaIdentity::Default))),
            (V2_STREAM, M::Type(Type { xid, id: 16385, namespace: "".into(), name: "mood".into() })),
            (V2_STREAM, M::Insert(Insert { xid, relation_id: 1, new: mixed.clone() })),
            (V2_STREAM, M::Update(Update { xid, relation_id: 1, old: None, new: mixed.clone() })),
            (V2_STREAM, M::Update(Update { xid, relation_id: 1, old: Some(OldTuple::Key(key.clone())), new: mixed.clone() })),
            (V2_STREAM, M::Update(Update { xid, relation_id: 1, old: Some(OldTuple::Row(mixed.clone())), new: mixed.clone() })),
            (V2_STREAM, M::Delete(Delete { xid, relation_id: 1, old: OldTuple::Key(key) })),
            (V2_STREAM, M::Delete(Delete { xid, relation_id: 1, old: OldTuple::Row(mixed) })),
            (V2_STREAM, M::Truncate(Truncate { xid, options: TruncateOptions(1), relation_ids: vec![1] })),
            (V2_STREAM, M::Truncate(Truncate { xid, options: TruncateOptions(0), relation_ids: vec![] })),
            (V2_STREAM, M::Message(LogicalDecodingMessage { xid, transactional: true, lsn, prefix: "".into(),
                                                            content: Bytes::new() })),
            (V2_STREAM, M::StreamStart(StreamStart { xid: 740, first_segment: false })),
            (V4_STREAM, M::StreamAbort(StreamAbort { xid: 740, subtransaction_xid: 740, abort_lsn: Some(lsn),
                                                     abort_timestamp: Some(ts) })),
            (V3, M::StreamPrepare(prepare.clone())),
            (V3, M::Prepare(Prepare { flags: 1, ..prepare })),
        ]
    }

    /// Every valid input the tests know, with the context to decode it in.
    fn valid_inputs() -> Vec<(DecodeContext, Bytes)> {
        let captured = server_fixtures()
            .into_iter()
            .map(|(ctx, bytes, _)| (ctx, bytes));
        let encoded = encoded_samples()
            .into_iter()
            .map(|(ctx, m)| (ctx, encode(&m)));
        captured.chain(encoded).collect()
    }

    #[test]
    fn server_captured_bytes_decode_to_the_expected_messages() {
        for (ctx, bytes, expected) in server_fixtures() {
            assert_eq!(
                decode(bytes.clone(), ctx),
                Ok(expected.clone()),
                "{bytes:x?}"
            );
            assert_eq!(
                encode(&expected),
                bytes,
                "the test encoder disagrees on {expected:?}"
            );
        }
    }

    #[test]
    fn streamed_changes_and_other_variants_round_trip_through_the_test_encoder() {
        for (ctx, message) in encoded_samples() {
            assert_eq!(decode(encode(&message), ctx), Ok(message));
        }
    }

    #[test]
    fn column_values_are_slices_of_the_input() {
        let new = row([text("hello"), binary(b"\x01\x02")]);
        let input = encode(&M::Insert(Insert {
            xid: None,
            relation_id: 1,
            new,
        }));
        let M::Insert(insert) = decode(input.clone(), V1).unwrap() else {
            panic!("not an insert")
        };
        for column in &insert.new.0 {
            let (Column::Text(v) | Column::Binary(v)) = column else {
                panic!("{column:?}")
            };
            assert!(
                input.as_ptr_range().contains(&v.as_ptr()),
                "{column:?} was copied"
            );
        }
    }

    #[test]
    fn a_streamed_change_cannot_be_decoded_without_in_stream() {
        let streamed_insert = hex("49 000002e3 0000400c 4e 0000");
        assert!(decode(streamed_insert.clone(), V2_STREAM).is_ok());
        // Read as a plain Insert, the xid passes for the relation id and the real relation id's
        // first byte for the 'N' tag.
        let expected = "new tuple tag 'N'";
        assert_eq!(
            decode(streamed_insert, V1),
            Err(DecodeError::UnexpectedByte {
                offset: 5,
                expected,
                found: 0
            })
        );
    }

    #[test]
    fn observe_enters_and_leaves_the_stream() {
        let mut ctx = DecodeContext::new(2);
        ctx.observe(&M::StreamStart(StreamStart {
            xid: 1,
            first_segment: false,
        }));
        assert!(ctx.in_stream);
        ctx.observe(&M::Begin(Begin {
            final_lsn: Lsn(1),
            commit_timestamp: PgTimestamp(0),
            xid: 1,
        }));
        assert!(ctx.in_stream);
        ctx.observe(&M::StreamStop);
        assert!(!ctx.in_stream);
    }

    #[test]
    fn stream_abort_reads_the_parallel_fields_only_from_protocol_4() {
        let with_fields = hex("41 00000007 00000008 00000000000000ff 0000000000000010");
        let without_fields = hex("41 00000007 00000008");
        let abort = |bytes, ctx| match decode(bytes, ctx) {
            Ok(M::StreamAbort(a)) => {
                Ok((a.xid, a.subtransaction_xid, a.abort_lsn, a.abort_timestamp))
            }
            other => Err(other),
        };
        let parallel = (7, 8, Some(Lsn(0xff)), Some(PgTimestamp(16)));
        assert_eq!(abort(with_fields.clone(), V4_STREAM), Ok(parallel));
        assert_eq!(abort(without_fields, V4_STREAM), Ok((7, 8, None, None)));
        let trailing = DecodeError::TrailingBytes {
            offset: 9,
            tag: b'A',
            count: 16,
        };
        assert_eq!(abort(with_fields, V2_STREAM), Err(Err(trailing)));
    }

    #[test]
    fn truncate_options_name_their_bits() {
        let options = |bits| {
            (
                TruncateOptions(bits).cascade(),
                TruncateOptions(bits).restart_identity(),
            )
        };
        assert_eq!(
            [0, 1, 2, 3].map(options),
            [(false, false), (true, false), (false, true), (true, true)]
        );
    }

    #[test]
    fn every_truncation_of_a_valid_message_is_an_error() {
        for (ctx, bytes) in valid_inputs() {
            for len in 0..bytes.len() {
                match decode(bytes.slice(..len), ctx) {
                    Err(_) => {}
                    // Without its optional protocol 4 fields, a Stream Abort is still whole.
                    Ok(M::StreamAbort(StreamAbort {
                        abort_lsn: None, ..
                    })) if len == 9 => {}
                    Ok(m) => panic!("{:x?} cut to {len} bytes decoded as {m:?}", &bytes[..]),
                }
            }
        }
    }

    #[test]
    fn a_byte_after_a_valid_message_is_an_error() {
        for (ctx, bytes) in valid_inputs() {
            let longer = Wire::default().raw(&bytes).u8(0).bytes();
            assert!(
                decode(longer, ctx).is_err(),
                "{:x?} + one byte decoded",
                &bytes[..]
            );
        }
    }

    #[test]
    fn absurd_counts_and_lengths_are_refused_before_allocating() {
        let truncated = |offset, what, needed, available| {
            Err(DecodeError::Truncated {
                offset,
                what,
                needed,
                available,
            })
        };
        #[rustfmt::skip]
        let cases = [
            // A tuple claiming 65535 columns, with one left.
            ("49 00000001 4e ffff 6e", truncated(9, "column kind ('n', 'u', 't' or 'b')", 1, 0)),
            ("49 00000001 4e 0001 74 7fffffff 41", truncated(9, "text column value", 0x7fff_ffff, 1)),
            ("49 00000001 4e 0001 62 ffffffff", truncated(9, "binary column value", 0xffff_ffff, 0)),
            ("54 ffffffff 00 00000001", truncated(1, "relation ids", 4 * 0xffff_ffff, 4)),
            ("4d 00 0000000000000001 00 80000000 00", truncated(11, "message content", 0x8000_0000, 1)),
            // A relation claiming 65535 columns.
            ("52 00000001 00 00 64 ffff 00", Err(DecodeError::UnterminatedString { offset: 11, what: "column name" })),
        ];
        for (input, expected) in cases {
            assert_eq!(decode(hex(input), V1), expected, "{input}");
        }
    }

    #[test]
    fn malformed_bytes_are_named_with_their_offset() {
        use DecodeError::*;
        let tag = |offset, expected, found| UnexpectedByte {
            offset,
            expected,
            found,
        };
        #[rustfmt::skip]
        let cases = [
            ("", Truncated { offset: 0, what: "message type", needed: 1, available: 0 }),
            ("5a", UnknownMessageType { offset: 0, tag: b'Z' }),
            ("49 00000001 4e 0001 78", tag(8, "column kind ('n', 'u', 't' or 'b')", b'x')),
            ("55 00000001 44", tag(5, "tuple tag ('K', 'O' or 'N')", b'D')),
            ("55 00000001 4b 0000 4b 0000", tag(8, "new tuple tag 'N'", b'K')),
            ("44 00000001 4e 0000", tag(5, "old tuple tag ('K' or 'O')", b'N')),
            ("52 00000001 00 00 78 0000", tag(7, "replica identity ('d', 'n', 'f' or 'i')", b'x')),
            ("59 00000001 7075626c6963", UnterminatedString { offset: 5, what: "namespace" }),
            ("59 00000001 00 ff00", InvalidUtf8 { offset: 6, what: "type name" }),
            ("45 45", TrailingBytes { offset: 1, tag: b'E', count: 1 }),
        ];
        for (input, expected) in cases {
            assert_eq!(decode(hex(input), V1), Err(expected), "{input}");
        }
        assert_eq!(
            tag(8, "new tuple tag 'N'", 0).to_string(),
            "expected new tuple tag 'N' at offset 8, found 0x00"
        );
        assert_eq!(
            UnknownMessageType {
                offset: 0,
                tag: b'Z'
            }
            .to_string(),
            "unknown message type 'Z' at offset 0"
        );
    }

    #[test]
    fn lsn_displays_and_parses_like_postgresql() {
        assert_eq!(Lsn(0x16_B374_D848).to_string(), "16/B374D848");
        assert_eq!(Lsn(0).to_string(), "0/0");
        assert_eq!(Lsn(u64::MAX).to_string(), "FFFFFFFF/FFFFFFFF");
        assert_eq!("16/b374d848".parse(), Ok(Lsn(0x16_B374_D848)));
        assert_eq!("0/152F1D0".parse(), Ok(Lsn(0x152_F1D0)));
        assert_eq!("FFFFFFFF/FFFFFFFF".parse(), Ok(Lsn(u64::MAX)));
        let bad = [
            "",
            "1",
            "1/",
            "/1",
            "1/2/3",
            "+1/0",
            "1/-0",
            "123456789/0",
            "0/g",
            " 0/0",
        ];
        for bad in bad {
            assert_eq!(
                bad.parse::<Lsn>(),
                Err(ParseLsnError(bad.into())),
                "{bad:?}"
            );
        }
    }

    #[test]
    fn timestamps_convert_to_unix_micros() {
        assert_eq!(PgTimestamp(0).to_unix_micros(), 946_684_800_000_000);
        assert_eq!(
            PgTimestamp::from_unix_micros(0),
            PgTimestamp(-946_684_800_000_000)
        );
        let captured = PgTimestamp(0x0003_044a_66fe_b0f4);
        assert_eq!(
            PgTimestamp::from_unix_micros(captured.to_unix_micros()),
            captured
        );
        assert_eq!(PgTimestamp(i64::MAX).to_unix_micros(), i64::MAX);
        assert_eq!(
            PgTimestamp::from_unix_micros(i64::MIN),
            PgTimestamp(i64::MIN)
        );
    }

    #[test]
    fn xlog_data_carries_its_message_as_a_slice() {
        let input = hex("77 0000000001530c18 0000000001530c60 0003044a66fec11e 45");
        let Ok(ReplicationMessage::XLogData(x)) = parse_copy_data(input.clone()) else {
            panic!("not XLogData")
        };
        assert_eq!(x.wal_start, Lsn(0x153_0c18));
        assert_eq!(x.wal_end, Lsn(0x153_0c60));
        assert_eq!(x.server_clock, PgTimestamp(0x0003_044a_66fe_c11e));
        assert_eq!(x.data.as_ptr(), input[25..].as_ptr());
        assert_eq!(decode(x.data, V2_STREAM), Ok(M::StreamStop));
    }

    #[test]
    fn primary_keepalive_decodes_its_reply_flag() {
        for (flag, reply_requested) in [("00", false), ("01", true)] {
            let input = hex(&format!("6b 0000000001530c60 0003044a66fec11e {flag}"));
            let expected = PrimaryKeepalive {
                wal_end: Lsn(0x153_0c60),
                server_clock: PgTimestamp(0x0003_044a_66fe_c11e),
                reply_requested,
            };
            assert_eq!(
                parse_copy_data(input),
                Ok(ReplicationMessage::PrimaryKeepalive(expected))
            );
        }
    }

    #[test]
    fn malformed_copy_data_is_an_error() {
        let keepalive = hex("6b 0000000001530c60 0003044a66fec11e 00");
        let xlog_data = hex("77 0000000001530c18 0000000001530c60 0003044a66fec11e");
        assert!(
            parse_copy_data(xlog_data.clone()).is_ok(),
            "XLogData with no data is whole"
        );
        for input in [&keepalive, &xlog_data] {
            for len in 0..input.len() {
                assert!(
                    parse_copy_data(input.slice(..len)).is_err(),
                    "{input:x?} cut to {len}"
                );
            }
        }
        let longer = Wire::default().raw(&keepalive).u8(0).bytes();
        let trailing = DecodeError::TrailingBytes {
            offset: 18,
            tag: b'k',
            count: 1,
        };
        assert_eq!(parse_copy_data(longer), Err(trailing));
        let unknown = DecodeError::UnknownMessageType {
            offset: 0,
            tag: b'd',
        };
        assert_eq!(parse_copy_data(hex("64")), Err(unknown));
    }

    #[test]
    fn standby_status_update_is_encoded_as_postgresql_reads_it() {
        let status = StandbyStatus {
            written: Lsn(0x1_0000_0030),
            flushed: Lsn(0x1_0000_0020),
            applied: Lsn(0x1_0000_0010),
            client_clock: PgTimestamp(0x0003_044a_66fe_c11e),
            reply_requested: true,
        };
        let expected = "72 0000000100000030 0000000100000020 0000000100000010 0003044a66fec11e 01";
        assert_eq!(encode_standby_status(&status), hex(expected));
        let quiet = StandbyStatus {
            reply_requested: false,
            ..status
        };
        assert_eq!(encode_standby_status(&quiet).last(), Some(&0));
    }

    /// The fuzz target's check (`replication/fuzz`) in a deterministic, bounded form that runs
    /// with every `cargo test`: random bytes and mutations of valid messages, under every
    /// context, give a value or an error, never a panic.
    #[test]
    fn random_and_mutated_inputs_never_panic() {
        const RUNS: usize = 50_000;
        let seeds = valid_inputs();
        let contexts = [V1, V2_STREAM, V4_STREAM, DecodeContext::new(4)];
        let mut state = 0x9E37_79B9_7F4A_7C15_u64;
        let mut next = move || {
            state ^= state << 13;
            state ^= state >> 7;
            state ^= state << 17;
            state as usize
        };
        // A fixed number of inputs, whatever the machine's speed: the same inputs on every run.
        for _ in 0..RUNS {
            let mut input: Vec<u8> = if next() % 4 == 0 {
                (0..next() % 64).map(|_| next() as u8).collect()
            } else {
                seeds[next() % seeds.len()].1.to_vec()
            };
            for _ in 0..=next() % 4 {
                let at = next() % (input.len() + 1);
                match next() % 4 {
                    0 if at < input.len() => input[at] = next() as u8,
                    1 if at < input.len() => input[at] ^= 1 << (next() % 8),
                    2 => input.truncate(at),
                    _ => input.insert(at, [0x00, 0x7f, 0x80, 0xff, b'N', b't'][next() % 6]),
                }
            }
            let input = Bytes::from(input);
            for ctx in contexts {
                let _ = decode(input.clone(), ctx);
            }
            if let Ok(ReplicationMessage::XLogData(x)) = parse_copy_data(input) {
                let _ = decode(x.data, V1);
            }
        }
    }
}
