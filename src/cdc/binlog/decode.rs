//! From binlog events to committed transactions of one project database.
//!
//! [`Decoder`] follows the event sequence of one binlog dump connection and keeps what the
//! project's events need: the current file (ROTATE), the tables of the project database
//! (TABLE_MAP with full row metadata: column names, signedness, charsets, ENUM/SET strings),
//! and the open transaction's changes in a [`TxBuffer`] (memory bound, spilled to disk past
//! it). Both dialects:
//!
//! ```text
//!  MariaDB (@mariadb_slave_capability=4)          MySQL 8
//!  GTID(162) trans ─ TABLE_MAP ─ ROWS… ─ XID       GTID(33)/ANONYMOUS(34) ─ QUERY BEGIN ─
//!  GTID(162) standalone ─ QUERY <ddl>                 TABLE_MAP ─ ROWS v2 (30-32)… ─ XID
//!  GTID(162) trans ─ … ─ QUERY COMMIT (non-XA      GTID(33) ─ QUERY <ddl>
//!    engines)                                      TRANSACTION_PAYLOAD(40) ⊃ the above
//!  ANNOTATE_ROWS(160), BINLOG_CHECKPOINT(161),     PREVIOUS_GTIDS(35), ROWS_QUERY(29):
//!  GTID_LIST(163): ignored                           ignored
//!  ROWS v1 (23-25)                                 PARTIAL_UPDATE_ROWS(39): refused
//! ```
//!
//! * A transaction begins at `BEGIN` (or MariaDB's GTID event without the standalone flag) and
//!   ends at XID or `COMMIT` (published) or `ROLLBACK` (dropped). A statement outside a
//!   transaction (DDL, TRUNCATE; MariaDB's standalone GTID) is a transaction of its own.
//! * Row events of other databases are skipped before their rows are decoded; so are their
//!   transactions, but their end still moves [`Decoder::boundary`] (an idle project's stored
//!   position follows the log).
//! * A transaction's commit LSN and end LSN are the position after its last event
//!   ([`super::position`]), so event ids (`<lsn>-<index>`) are the same on every replay.
//! * Rows of the broadcast table (`fluxbase_broadcasts`, written by the project database's
//!   `fluxbase_realtime_broadcast` procedure) become broadcasts, not row changes; its deletes
//!   (the procedure empties it in the same transaction) are not reported.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use fluxbase_replication::pgoutput::{Lsn, PgTimestamp};
use mysql_async::binlog::events::{
    Event, EventData, GtidEvent, OptionalMetadataField, RowsEventData, TableMapEvent,
};
use mysql_async::binlog::row::BinlogRow;
use mysql_async::binlog::value::BinlogValue;
use mysql_async::binlog::EventType;
use mysql_async::consts::{ColumnFlags, ColumnType};
use mysql_async::Value;

use super::ddl;
use super::position;
use crate::bus::RowOp;
use crate::cdc::assemble::{Committed, Shared, TxBuffer};
use crate::cdc::events::Pending;
use crate::mysql::render::ColumnKind;

/// The table `fluxbase_realtime_broadcast(event, payload)` writes (sql/mysql/broadcast.sql).
pub const BROADCAST_TABLE: &str = "fluxbase_broadcasts";
/// The procedure of broadcasts (not reported as a schema change of the project).
pub const BROADCAST_PROCEDURE: &str = "fluxbase_realtime_broadcast";

/// MariaDB's event types (not in mysql_common's [`EventType`]).
pub mod mariadb {
    pub const ANNOTATE_ROWS: u8 = 160;
    pub const BINLOG_CHECKPOINT: u8 = 161;
    pub const GTID: u8 = 162;
    pub const GTID_LIST: u8 = 163;
    pub const START_ENCRYPTION: u8 = 164;
    /// 165..=171: QUERY and ROWS events compressed by `log_bin_compress`.
    pub const COMPRESSED_FIRST: u8 = 165;
    pub const COMPRESSED_LAST: u8 = 171;
    /// GTID event flags.
    pub const FL_STANDALONE: u8 = 1;
}

#[derive(Debug, thiserror::Error)]
pub enum DecodeError {
    #[error("reading a binlog event: {0}")]
    Event(#[from] std::io::Error),
    #[error("{0} outside a transaction")]
    OutsideTransaction(&'static str),
    #[error("rows for table id {0} that no TABLE_MAP described")]
    UnknownTable(u64),
    #[error(
        "the binlog has no column names for {0}: set binlog_row_metadata=FULL on the server \
         (MySQL 8.0.1+, MariaDB 10.5+)"
    )]
    NoColumnNames(String),
    #[error(
        "a partial row update (PARTIAL_UPDATE_ROWS) for {0}: set binlog_row_value_options='' on \
         the server; Fluxbase needs full row images"
    )]
    PartialUpdate(String),
    #[error(
        "a compressed binlog event (type {0}): set log_bin_compress=OFF on the server (MariaDB)"
    )]
    Compressed(u8),
    #[error("an encrypted binlog stream: Fluxbase cannot read it")]
    Encrypted,
    #[error("the server logged an incident (the binlog has a gap): {0}")]
    Incident(String),
    #[error("an event before the stream said which binlog file it reads")]
    NoFile,
    #[error("{0}")]
    Position(#[from] position::PositionError),
    #[error("spilling a transaction: {0}")]
    Spill(std::io::Error),
}

impl DecodeError {
    /// Everything here would come back on a retry, but for the spill directory (a full disk
    /// may be freed).
    pub fn is_transient(&self) -> bool {
        matches!(self, DecodeError::Spill(_))
    }
}

use super::render::{CatalogType, ColumnInfo};

/// The columns of one table whose type the catalog tells (by name).
pub type CatalogColumns = HashMap<String, CatalogType>;

#[derive(Debug)]
enum Role {
    /// A table of the project database: its rows are reported.
    User,
    /// The broadcast table: its inserted rows are broadcasts.
    Broadcast,
}

#[derive(Debug)]
struct Table {
    tme: TableMapEvent<'static>,
    name: String,
    /// `name`, shared by every row change of the table (no allocation per row).
    shared_name: Arc<str>,
    role: Role,
    columns: Vec<ColumnInfo>,
    /// How each column's values are read and rendered: once per TABLE_MAP, not per row.
    plan: Vec<ColumnPlan>,
}

/// One column of a table as the row loop needs it ([`read_row`]): what mysql_common's
/// `BinlogRow` works out again for every column of every row (a `Column` with its names, type,
/// flags and character set, from the TABLE_MAP's optional metadata), worked out once.
#[derive(Debug)]
struct ColumnPlan {
    ty: ColumnType,
    meta: Vec<u8>,
    unsigned: bool,
    primary_key: bool,
    kind: ColumnKind,
    /// `"name":`, the column's JSON key.
    key: String,
}

/// The columns of `tme` as mysql_common's row decoder describes them: a row of all NULLs
/// decoded by mysql_common itself (so type, signedness, character set, primary key and name
/// are exactly what it gives a real row), turned into plans.
fn column_plan(tme: &TableMapEvent<'_>) -> std::io::Result<Vec<ColumnPlan>> {
    use bitvec::slice::BitSlice;
    use mysql_common::io::ParseBuf;
    let count = tme.columns_count();
    let all = vec![0xFFu8; count.div_ceil(8) as usize];
    let present = &BitSlice::<u8>::from_slice(&all)[..count as usize];
    // The row: its null bitmap, every column NULL (no value bytes follow).
    let row: BinlogRow = ParseBuf(&all).parse((count, present, false, tme))?;
    row.columns_ref()
        .iter()
        .enumerate()
        .map(|(i, col)| {
            let ty = match tme.get_column_type(i) {
                Ok(Some(ty)) => ty,
                _ => {
                    return Err(std::io::Error::new(
                        std::io::ErrorKind::InvalidData,
                        "No column type",
                    ))
                }
            };
            let mut key = String::with_capacity(col.name_ref().len() + 3);
            write_str(&mut key, &col.name_str());
            key.push(':');
            Ok(ColumnPlan {
                ty,
                meta: tme.get_column_metadata(i).unwrap_or(&[]).to_vec(),
                unsigned: col.flags().contains(ColumnFlags::UNSIGNED_FLAG),
                primary_key: col.flags().contains(ColumnFlags::PRI_KEY_FLAG),
                kind: ColumnKind::of(col),
                key,
            })
        })
        .collect()
}

/// Reads one row image of `table` from `buf` (`present`: the columns the image holds) as a
/// JSON object and its primary key, as [`row_json`] renders mysql_common's `BinlogRow`, with
/// the same value parser, but without building a `Column` per column per row. Columns `omit`
/// marks are read past and left out (their key part kept); `sizes`, when given, gets each
/// column's rendered length (by column index; 0 for columns not in the image).
fn read_row<'a>(
    buf: &mut mysql_common::io::ParseBuf<'a>,
    present: &bitvec::slice::BitSlice<u8>,
    table: &'a Table,
    omit: &[bool],
    mut sizes: Option<&mut Vec<usize>>,
) -> std::io::Result<(String, Option<String>)> {
    let count = present.count_ones();
    let nulls: &[u8] = buf.parse(count.div_ceil(8))?;
    let mut out = String::with_capacity(64 + 16 * table.plan.len());
    let mut key = String::new();
    let mut key_complete = true;
    let mut has_key = false;
    let mut image = 0usize;
    let mut written = 0usize;
    out.push('{');
    for i in 0..present.len() {
        if !present[i] {
            continue;
        }
        let Some(col) = table.plan.get(i) else {
            return Err(std::io::Error::new(
                std::io::ErrorKind::InvalidData,
                "No column type",
            ));
        };
        let left_out = omit.get(i).copied().unwrap_or(false);
        let entry = out.len();
        if written > 0 {
            out.push(',');
        }
        out.push_str(&col.key);
        let start = out.len();
        let null = nulls[image / 8] & (1 << (image % 8)) != 0;
        if null {
            out.push_str("null");
        } else {
            let value: BinlogValue<'_> = buf.parse((col.ty, &col.meta[..], col.unsigned, false))?;
            super::render::write_binlog_value_of(&mut out, col.kind, &value, table.columns.get(i));
        }
        image += 1;
        if let Some(sizes) = sizes.as_deref_mut() {
            if sizes.len() <= i {
                sizes.resize(i + 1, 0);
            }
            sizes[i] = out.len() - entry;
        }
        if left_out {
            // Its key part (if any) is kept: the row's identity never depends on its size.
            if col.primary_key {
                has_key = true;
                key.push(if key.is_empty() { '{' } else { ',' });
                key.push_str(&col.key);
                key.push_str(&out[start..]);
            }
            out.truncate(entry);
            continue;
        }
        written += 1;
        if col.primary_key {
            has_key = true;
            key.push(if key.is_empty() { '{' } else { ',' });
            key.push_str(&col.key);
            let value = &out[start..];
            if value == "null" {
                key_complete = false;
            }
            key.push_str(value);
        }
    }
    out.push('}');
    let key = (has_key && key_complete).then(|| {
        key.push('}');
        key
    });
    Ok((out, key))
}

struct OpenTx {
    buf: TxBuffer,
    gtid: Option<String>,
    /// A MariaDB standalone GTID: the next statement is the whole transaction.
    standalone: bool,
    /// Whether it began with a statement of its own (`BEGIN`, MariaDB's GTID).
    explicit: bool,
}

/// Follows one binlog dump connection (see the module docs).
pub struct Decoder {
    db: String,
    /// `db`, shared by every row change (no allocation per row).
    shared_db: Arc<str>,
    bound: usize,
    spill_dir: PathBuf,
    /// What the transaction buffers share: bytes spilled to disk so far, spare lists.
    shared: Arc<Shared>,
    peak: usize,
    file: Option<String>,
    seq: u32,
    /// Tables of the project database by table id; ids of other databases map to `None`.
    tables: HashMap<u64, Option<Table>>,
    /// Columns of a type the binlog does not name (MariaDB's JSON, INET4, INET6, UUID) per
    /// table of the project, as the catalog said (see [`Decoder::wanted_tables`]).
    catalog_columns: HashMap<String, CatalogColumns>,
    /// `catalog_columns` holds every table of the database that has such columns (the whole
    /// catalog was read, [`Decoder::set_catalog`]): a table not in it has none.
    catalog_read: bool,
    wanted: Vec<String>,
    current: Option<OpenTx>,
    /// The GTID announced for the next transaction (MySQL's comes before its BEGIN).
    next_gtid: Option<String>,
    /// MySQL 8's `immediate_commit_timestamp` of the next transaction, in microseconds.
    next_commit_micros: Option<i64>,
    /// Inside a TRANSACTION_PAYLOAD: its end position (the events inside carry none).
    payload_end: Option<u32>,
    /// The position after the last complete transaction (or heartbeat) of any database.
    boundary: Option<Lsn>,
    last_gtid: Option<String>,
    /// Statement-logged row changes of the project (a session not in ROW format): skipped.
    rejected: u64,
    /// A format description was read: later events' checksums are known to the reader.
    fde_seen: bool,
    /// The server checksums its events (`binlog_checksum` CRC32): the ROTATE it sends before
    /// the first format description still carries its checksum after the file name.
    checksums: bool,
    /// Bytes of one row image an event carries (`cdc_max_row_bytes`; 0: no bound).
    max_row_bytes: usize,
}

impl Decoder {
    pub fn new(db: &str, bound: usize, spill_dir: &Path) -> Decoder {
        Decoder {
            db: db.to_string(),
            shared_db: Arc::from(db),
            bound,
            spill_dir: spill_dir.to_path_buf(),
            shared: Arc::default(),
            peak: 0,
            file: None,
            seq: 0,
            tables: HashMap::new(),
            catalog_columns: HashMap::new(),
            catalog_read: false,
            wanted: Vec::new(),
            current: None,
            next_gtid: None,
            next_commit_micros: None,
            payload_end: None,
            boundary: None,
            last_gtid: None,
            rejected: 0,
            fde_seen: false,
            checksums: false,
            max_row_bytes: 0,
        }
    }

    /// Leaves the largest values out of row images past `bytes` (0: no bound; see
    /// [`crate::cdc::events::largest_until_within`]).
    pub fn with_max_row_bytes(mut self, bytes: usize) -> Decoder {
        self.max_row_bytes = bytes;
        self
    }

    /// The server checksums its events (`@@binlog_checksum` is not NONE).
    pub fn with_checksums(mut self, checksums: bool) -> Decoder {
        self.checksums = checksums;
        self
    }

    /// The binlog file being read.
    pub fn file(&self) -> Option<&str> {
        self.file.as_deref()
    }

    /// True when no transaction is open.
    pub fn idle(&self) -> bool {
        self.current.is_none()
    }

    /// The position after the last complete transaction of any database (or the last
    /// heartbeat while idle): where an idle project may resume.
    pub fn boundary(&self) -> Option<Lsn> {
        self.boundary
    }

    /// The GTID of the last transaction of the project released.
    pub fn last_gtid(&self) -> Option<&str> {
        self.last_gtid.as_deref()
    }

    pub fn memory(&self) -> usize {
        self.current.as_ref().map_or(0, |t| t.buf.memory())
    }

    pub fn peak_memory(&self) -> usize {
        self.peak
    }

    pub fn spilled_bytes(&self) -> u64 {
        self.shared.spilled_bytes()
    }

    /// Statement-logged row changes of the project skipped so far.
    pub fn rejected(&self) -> u64 {
        self.rejected
    }

    /// Tables of the project met for the first time (or again after DDL): the stream reads
    /// the catalog again ([`Decoder::set_catalog`]) before the next event.
    pub fn wanted_tables(&mut self) -> Vec<String> {
        std::mem::take(&mut self.wanted)
    }

    /// The columns of `table` whose type the binlog does not say (MariaDB declares `JSON` as
    /// LONGTEXT with a check; INET4, INET6 and UUID are fixed binary strings in the binlog).
    #[cfg(test)]
    fn set_catalog_columns(&mut self, table: &str, columns: CatalogColumns) {
        for t in self.tables.values_mut().flatten() {
            if t.name == table {
                for info in t.columns.iter_mut() {
                    info.catalog = columns.get(&info.name).copied();
                }
            }
        }
        self.catalog_columns.insert(table.to_string(), columns);
    }

    /// The columns of a type the binlog does not name of every table of the database (tables
    /// without any left out), read from the catalog at once: tables met later need no lookup
    /// of their own.
    pub fn set_catalog(&mut self, catalog: HashMap<String, CatalogColumns>) {
        for t in self.tables.values_mut().flatten() {
            let columns = catalog.get(&t.name);
            for info in t.columns.iter_mut() {
                info.catalog = columns.and_then(|c| c.get(&info.name)).copied();
            }
        }
        self.catalog_columns = catalog;
        self.catalog_read = true;
        self.wanted.clear();
    }

    fn lsn(&self, log_pos: u32) -> Result<Lsn, DecodeError> {
        if self.file.is_none() {
            return Err(DecodeError::NoFile);
        }
        Ok(position::lsn_of(self.seq, u64::from(log_pos))?)
    }

    fn open(&mut self, explicit: bool, standalone: bool) {
        self.current = Some(OpenTx {
            buf: TxBuffer::new(self.bound, &self.spill_dir, &self.shared),
            gtid: self.next_gtid.take(),
            standalone,
            explicit,
        });
    }

    fn push(&mut self, p: Pending) -> Result<(), DecodeError> {
        let tx = self
            .current
            .as_mut()
            .ok_or(DecodeError::OutsideTransaction("a row change"))?;
        tx.buf.push(None, p).map_err(DecodeError::Spill)?;
        self.peak = self.peak.max(tx.buf.memory());
        Ok(())
    }

    /// Ends the open transaction at `log_pos`: `Some` when it holds changes of the project.
    fn commit(&mut self, ev: &Event, log_pos: u32) -> Result<Option<Committed>, DecodeError> {
        let end = self.lsn(log_pos)?;
        self.boundary = Some(end);
        let micros = self
            .next_commit_micros
            .take()
            .unwrap_or_else(|| commit_micros(ev.header().timestamp(), chrono::Utc::now()));
        let Some(tx) = self.current.take() else {
            return Ok(None);
        };
        if tx.buf.is_empty() {
            return Ok(None);
        }
        if tx.gtid.is_some() {
            self.last_gtid = tx.gtid.clone();
        }
        Ok(Some(Committed {
            commit_lsn: end,
            end_lsn: end,
            commit_timestamp: PgTimestamp::from_unix_micros(micros),
            changes: tx.buf,
        }))
    }

    fn rollback(&mut self, log_pos: u32) -> Result<(), DecodeError> {
        self.current = None;
        self.next_commit_micros = None;
        self.boundary = Some(self.lsn(log_pos)?);
        Ok(())
    }

    /// Feeds one event; returns a transaction of the project when this event committed one.
    pub fn handle(&mut self, ev: &Event) -> Result<Option<Committed>, DecodeError> {
        let header = ev.header();
        let raw_type = header.event_type_raw();
        let log_pos = match (header.log_pos(), self.payload_end) {
            (0, Some(end)) => end,
            (pos, _) => {
                if raw_type != EventType::TRANSACTION_PAYLOAD_EVENT as u8 {
                    self.payload_end = None;
                }
                pos
            }
        };
        match raw_type {
            mariadb::GTID => {
                let (gtid, flags) = mariadb_gtid(ev.data(), header.server_id())?;
                self.next_gtid = Some(gtid);
                // Standalone: one statement (DDL) follows, without BEGIN or COMMIT.
                let standalone = flags & mariadb::FL_STANDALONE != 0;
                self.open(true, standalone);
                return Ok(None);
            }
            mariadb::ANNOTATE_ROWS | mariadb::BINLOG_CHECKPOINT | mariadb::GTID_LIST => {
                return Ok(None)
            }
            mariadb::START_ENCRYPTION => return Err(DecodeError::Encrypted),
            t if (mariadb::COMPRESSED_FIRST..=mariadb::COMPRESSED_LAST).contains(&t) => {
                return Err(DecodeError::Compressed(t))
            }
            _ => {}
        }
        let Some(data) = ev.read_data()? else {
            // An event type this server added that changes no data (unknown to the decoder).
            return Ok(None);
        };
        match data {
            EventData::FormatDescriptionEvent(_) => self.fde_seen = true,
            EventData::RotateEvent(r) => {
                let raw = r.name_raw();
                // The first ROTATE comes before any format description: the reader could not
                // know to cut its checksum off.
                let raw = if !self.fde_seen && self.checksums && raw.len() > 4 {
                    &raw[..raw.len() - 4]
                } else {
                    raw
                };
                let name = String::from_utf8_lossy(raw).into_owned();
                self.seq = position::file_sequence(&name)
                    .ok_or_else(|| position::PositionError::NoSequence(name.clone()))?;
                self.file = Some(name);
                // Table ids are not stable across files (nor across a server restart, which
                // starts a new file).
                self.tables.clear();
                if self.current.is_none() {
                    self.boundary = Some(position::lsn_of(self.seq, r.position())?);
                }
            }
            EventData::GtidEvent(g) => {
                self.next_gtid = Some(mysql_gtid(&g));
                let ts = g.immediate_commit_timestamp();
                self.next_commit_micros = (ts > 0).then_some(ts as i64);
            }
            EventData::AnonymousGtidEvent(_) => {
                self.next_gtid = None;
            }
            EventData::QueryEvent(q) => {
                let query = q.query();
                let text = query.trim();
                let word = first_words(text);
                match word.as_str() {
                    "BEGIN" | "START TRANSACTION" | "XA START" => {
                        if self.current.as_ref().is_none_or(|t| !t.explicit) {
                            self.open(true, false);
                        }
                        return Ok(None);
                    }
                    "COMMIT" => return self.commit(ev, log_pos),
                    "ROLLBACK" => {
                        self.rollback(log_pos)?;
                        return Ok(None);
                    }
                    "SAVEPOINT" | "ROLLBACK TO" | "RELEASE SAVEPOINT" | "XA END" => {
                        return Ok(None)
                    }
                    _ => {}
                }
                let schema = q.schema();
                let ours = self.statement_changes(&schema, text)?;
                let in_tx = self
                    .current
                    .as_ref()
                    .is_some_and(|t| t.explicit && !t.standalone);
                if !in_tx {
                    // A statement of its own (DDL): a transaction by itself.
                    if self.current.is_none() {
                        self.open(false, true);
                    }
                    for p in ours {
                        self.push(p)?;
                    }
                    // The catalog may have changed: column types are looked up again.
                    self.catalog_columns.clear();
                    self.catalog_read = false;
                    return self.commit(ev, log_pos);
                }
                for p in ours {
                    self.push(p)?;
                }
            }
            EventData::XidEvent(_) => return self.commit(ev, log_pos),
            EventData::TableMapEvent(tme) => {
                let id = tme.table_id();
                // Each transaction maps its tables again: the same map of a table already
                // planned is kept (while the catalog is fresh: a DDL statement may have
                // changed which columns are JSON or UUID without changing the map).
                if self.catalog_read {
                    if let Some(Some(known)) = self.tables.get(&id) {
                        if known.tme == tme {
                            return Ok(None);
                        }
                    }
                }
                let table = if tme.database_name() == self.db.as_str() {
                    let tme = tme.into_owned();
                    let name = tme.table_name().into_owned();
                    let role = if name == BROADCAST_TABLE {
                        Role::Broadcast
                    } else {
                        Role::User
                    };
                    let Some(mut columns) = column_infos(&tme) else {
                        return Err(DecodeError::NoColumnNames(format!("`{name}`")));
                    };
                    match self.catalog_columns.get(&name) {
                        None if self.catalog_read => {}
                        Some(types) => {
                            for c in columns.iter_mut() {
                                c.catalog = types.get(&c.name).copied();
                            }
                        }
                        None => {
                            if matches!(role, Role::User) && !self.wanted.contains(&name) {
                                self.wanted.push(name.clone());
                            }
                        }
                    }
                    let plan = column_plan(&tme)?;
                    Some(Table {
                        tme,
                        shared_name: Arc::from(name.as_str()),
                        name,
                        role,
                        columns,
                        plan,
                    })
                } else {
                    None
                };
                self.tables.insert(id, table);
            }
            EventData::RowsEvent(rows) => {
                let table = match self.tables.get(&rows.table_id()) {
                    Some(Some(t)) => t,
                    Some(None) => return Ok(None),
                    None => return Err(DecodeError::UnknownTable(rows.table_id())),
                };
                if matches!(rows, RowsEventData::PartialUpdateRowsEvent(_)) {
                    return Err(DecodeError::PartialUpdate(format!("`{}`", table.name)));
                }
                let pending = rows_to_pending(&self.shared_db, table, &rows, self.max_row_bytes)?;
                if self.current.is_none() {
                    // A non-transactional engine's change outside BEGIN (MySQL without GTIDs
                    // logs BEGIN for those too; defensively, a transaction of its own follows).
                    self.open(false, false);
                }
                for p in pending {
                    self.push(p)?;
                }
            }
            EventData::HeartbeatEvent
                if self.current.is_none() && log_pos >= 4 && self.file.is_some() =>
            {
                let at = self.lsn(log_pos)?;
                if self.boundary.is_none_or(|b| at > b) {
                    self.boundary = Some(at);
                }
            }
            EventData::TransactionPayloadEvent(_) => {
                self.payload_end = Some(log_pos);
            }
            EventData::IncidentEvent(i) => {
                return Err(DecodeError::Incident(i.message().into_owned()));
            }
            EventData::XaPrepareLogEvent(_) => {
                // An XA transaction prepared: it is committed later by `XA COMMIT` in a
                // transaction of its own, which the binlog does not repeat the rows of.
                tracing::warn!(
                    db = %self.db,
                    "an XA transaction was prepared: its changes are not captured (XA is not supported)"
                );
                self.rollback(log_pos)?;
            }
            _ => {}
        }
        Ok(None)
    }

    /// A statement logged as such (QUERY event) in the project database: its schema changes.
    fn statement_changes(
        &mut self,
        schema: &str,
        query: &str,
    ) -> Result<Vec<Pending>, DecodeError> {
        let Some(parsed) = ddl::parse(query) else {
            if schema == self.db && ddl::is_row_change(query) {
                self.rejected += 1;
                tracing::error!(
                    db = %self.db,
                    "a row change was logged as a statement (binlog_format is not ROW for its session): it is not captured"
                );
            }
            return Ok(Vec::new());
        };
        let mut out = Vec::new();
        for object in parsed.objects {
            let db = object.schema.as_deref().unwrap_or(schema);
            if db != self.db {
                continue;
            }
            if object.name == BROADCAST_TABLE || object.name == BROADCAST_PROCEDURE {
                continue;
            }
            let table = match parsed.object_type {
                "table" | "view" => Some(object.name.clone()),
                _ => object.table.clone(),
            };
            out.push(Pending::Schema {
                command: parsed.command.clone(),
                object_type: parsed.object_type.to_string(),
                schema: Some(self.db.clone()),
                table,
                object: Some(ddl::qualified(&self.db, &object.name)),
                partition: None,
            });
        }
        Ok(out)
    }
}

/// The commit time of a transaction whose log gives only the second its last statement began
/// (MariaDB; MySQL 8 gives microseconds, `immediate_commit_timestamp`): the time it is read, when
/// that is within the same second (a live stream reads a commit milliseconds after it), else the
/// end of that second (a replay, a stream behind). Never before the second the log says, so that
/// a webhook created in the same second as a commit after it still gets it.
fn commit_micros(header_secs: u32, now: chrono::DateTime<chrono::Utc>) -> i64 {
    let second = i64::from(header_secs) * 1_000_000;
    now.timestamp_micros().clamp(second, second + 999_999)
}

/// MariaDB's GTID event: `domain-server-sequence` and its flags.
fn mariadb_gtid(data: &[u8], server_id: u32) -> Result<(String, u8), DecodeError> {
    if data.len() < 13 {
        return Err(DecodeError::Event(std::io::Error::new(
            std::io::ErrorKind::UnexpectedEof,
            "short MariaDB GTID event",
        )));
    }
    let seq = u64::from_le_bytes(data[0..8].try_into().expect("8 bytes"));
    let domain = u32::from_le_bytes(data[8..12].try_into().expect("4 bytes"));
    Ok((format!("{domain}-{server_id}-{seq}"), data[12]))
}

/// MySQL's GTID: `source-uuid:transaction-number`.
fn mysql_gtid(g: &GtidEvent) -> String {
    let sid = hex::encode(g.sid());
    format!(
        "{}-{}-{}-{}-{}:{}",
        &sid[0..8],
        &sid[8..12],
        &sid[12..16],
        &sid[16..20],
        &sid[20..32],
        g.gno()
    )
}

/// The statement's leading keywords, upper case: `BEGIN`, `COMMIT`, `ROLLBACK TO`, …
fn first_words(query: &str) -> String {
    let mut words = query
        .split(|c: char| c.is_whitespace() || c == ';')
        .filter(|w| !w.is_empty());
    let first = words.next().unwrap_or("").to_ascii_uppercase();
    match first.as_str() {
        "ROLLBACK" => match words.next().map(str::to_ascii_uppercase).as_deref() {
            Some("TO") => "ROLLBACK TO".into(),
            Some("WORK") | None => "ROLLBACK".into(),
            Some(_) => "ROLLBACK ?".into(),
        },
        "COMMIT" => match words.next().map(str::to_ascii_uppercase).as_deref() {
            Some("WORK") | None => "COMMIT".into(),
            Some(_) => "COMMIT ?".into(),
        },
        "START" | "RELEASE" | "XA" => match words.next() {
            Some(w) => format!("{first} {}", w.to_ascii_uppercase()),
            None => first,
        },
        _ => first,
    }
}

/// The columns of a table from TABLE_MAP's optional metadata (`binlog_row_metadata=FULL`):
/// `None` when it has no column names.
fn column_infos(tme: &TableMapEvent<'_>) -> Option<Vec<ColumnInfo>> {
    let count = tme.columns_count() as usize;
    let mut names: Vec<String> = Vec::new();
    let mut enums: Vec<Vec<String>> = Vec::new();
    let mut sets: Vec<Vec<String>> = Vec::new();
    for field in tme.iter_optional_meta() {
        match field {
            Ok(OptionalMetadataField::ColumnName(n)) => {
                names = n
                    .iter_names()
                    .filter_map(Result::ok)
                    .map(|n| n.name().into_owned())
                    .collect();
            }
            Ok(OptionalMetadataField::EnumStrValue(v)) => {
                for values in v.iter_values().flatten() {
                    enums.push(
                        values
                            .values()
                            .iter()
                            .map(|x| x.value().into_owned())
                            .collect(),
                    );
                }
            }
            Ok(OptionalMetadataField::SetStrValue(v)) => {
                for values in v.iter_values().flatten() {
                    sets.push(
                        values
                            .values()
                            .iter()
                            .map(|x| x.value().into_owned())
                            .collect(),
                    );
                }
            }
            _ => {}
        }
    }
    if names.len() != count {
        return None;
    }
    let mut enums = enums.into_iter();
    let mut sets = sets.into_iter();
    let columns = names
        .into_iter()
        .enumerate()
        .map(|(i, name)| {
            let ty = tme.get_column_type(i).ok().flatten();
            let meta = tme.get_column_metadata(i).unwrap_or(&[]);
            ColumnInfo {
                name,
                enum_values: (ty == Some(ColumnType::MYSQL_TYPE_ENUM))
                    .then(|| enums.next())
                    .flatten(),
                set_values: (ty == Some(ColumnType::MYSQL_TYPE_SET))
                    .then(|| sets.next())
                    .flatten(),
                decimals: match ty {
                    Some(
                        ColumnType::MYSQL_TYPE_TIME2
                        | ColumnType::MYSQL_TYPE_DATETIME2
                        | ColumnType::MYSQL_TYPE_TIMESTAMP2,
                    ) => meta.first().copied().unwrap_or(0),
                    _ => 0,
                },
                fixed_len: (ty == Some(ColumnType::MYSQL_TYPE_STRING))
                    .then(|| string_length(meta))
                    .flatten(),
                catalog: None,
            }
        })
        .collect();
    Some(columns)
}

/// A CHAR or BINARY column's length in bytes from its TABLE_MAP metadata: the real type's
/// byte with two bits of the length folded into it (lengths up to 1023), then the length's
/// low byte.
fn string_length(meta: &[u8]) -> Option<usize> {
    let [real, low] = *meta else {
        return None;
    };
    let high = if real & 0x30 != 0x30 {
        usize::from((real & 0x30) ^ 0x30) << 4
    } else {
        0
    };
    Some(high | usize::from(low))
}

fn rows_to_pending(
    db: &Arc<str>,
    table: &Table,
    rows: &RowsEventData<'_>,
    cap: usize,
) -> Result<Vec<Pending>, DecodeError> {
    let op = match rows {
        RowsEventData::WriteRowsEventV1(_) | RowsEventData::WriteRowsEvent(_) => RowOp::Insert,
        RowsEventData::UpdateRowsEventV1(_)
        | RowsEventData::UpdateRowsEvent(_)
        | RowsEventData::PartialUpdateRowsEvent(_) => RowOp::Update,
        RowsEventData::DeleteRowsEventV1(_) | RowsEventData::DeleteRowsEvent(_) => RowOp::Delete,
    };
    let mut out = Vec::new();
    if matches!(table.role, Role::Broadcast) {
        for row in rows.rows(&table.tme) {
            let (_, after) = row?;
            if let (RowOp::Insert, Some(after)) = (op, after) {
                if let Some(p) = broadcast(&after) {
                    out.push(p);
                }
            }
        }
        return Ok(out);
    }
    let before_cols = rows.columns_before_image();
    let after_cols = rows.columns_after_image();
    let mut buf = mysql_common::io::ParseBuf(rows.rows_data());
    while !buf.is_empty() {
        let row_start = mysql_common::io::ParseBuf(buf.0);
        let mut before = before_cols
            .map(|cols| read_row(&mut buf, cols, table, &[], None))
            .transpose()?;
        let mut after = after_cols
            .map(|cols| read_row(&mut buf, cols, table, &[], None))
            .transpose()?;
        let over = |image: &Option<(String, Option<String>)>| {
            image.as_ref().is_some_and(|(json, _)| json.len() > cap)
        };
        let mut too_large = Vec::new();
        if cap > 0 && (over(&before) || over(&after)) {
            // Rare: read the row again for its values' sizes, then once more without the
            // largest (a column left out of one image is left out of both). The whole images
            // go first: one image's rendering at a time is held meanwhile.
            drop((before.take(), after.take()));
            let omit = {
                let mut again = mysql_common::io::ParseBuf(row_start.0);
                let mut omit: Vec<bool> = Vec::new();
                for cols in [before_cols, after_cols].into_iter().flatten() {
                    let mut sizes = Vec::new();
                    read_row(&mut again, cols, table, &[], Some(&mut sizes))?;
                    let chosen = crate::cdc::events::largest_until_within(&sizes, cap);
                    if omit.len() < chosen.len() {
                        omit.resize(chosen.len(), false);
                    }
                    for (o, c) in omit.iter_mut().zip(chosen) {
                        *o |= c;
                    }
                }
                omit
            };
            let mut again = mysql_common::io::ParseBuf(row_start.0);
            before = before_cols
                .map(|cols| read_row(&mut again, cols, table, &omit, None))
                .transpose()?;
            after = after_cols
                .map(|cols| read_row(&mut again, cols, table, &omit, None))
                .transpose()?;
            too_large = table
                .plan
                .iter()
                .zip(&omit)
                .filter(|(_, o)| **o)
                .filter_map(|(c, _)| {
                    serde_json::from_str::<String>(c.key.strip_suffix(':').unwrap_or(&c.key)).ok()
                })
                .collect();
        }
        let (record, old) = match op {
            RowOp::Insert => (after, None),
            RowOp::Update => (after, before),
            // The guide's client prints `record` for DELETE: the deleted row.
            RowOp::Delete => (before.clone(), before),
        };
        let Some((record, key)) = record else {
            continue;
        };
        out.push(Pending::Row {
            operation: op,
            schema: db.clone(),
            table: table.shared_name.clone(),
            record,
            old: old.map(|(o, _)| o),
            unchanged_toast: Vec::new(),
            too_large,
            relation: None,
            key,
        });
    }
    Ok(out)
}

/// A row of the broadcast table: `(id, event, payload)`.
fn broadcast(row: &BinlogRow) -> Option<Pending> {
    let mut event = None;
    let mut payload = None;
    for (i, col) in row.columns_ref().iter().enumerate() {
        let text = match row.as_ref(i) {
            Some(BinlogValue::Value(Value::Bytes(b))) => String::from_utf8_lossy(b).into_owned(),
            _ => continue,
        };
        match col.name_str().as_ref() {
            "event" => event = Some(text),
            "payload" => payload = Some(text),
            _ => {}
        }
    }
    let payload = payload.unwrap_or_else(|| "{}".into());
    // The procedure checks it; a row written directly is checked here.
    let payload = serde_json::from_str::<Box<serde_json::value::RawValue>>(&payload).ok()?;
    Some(Pending::Broadcast {
        event: event?,
        payload: payload.get().to_string(),
    })
}

/// A row as a JSON object of its columns, and its primary key (`{"id":1}`) when the table has
/// one whose columns are all in the image: mysql_common's `BinlogRow` rendered, the oracle of
/// [`read_row`]'s tests.
#[cfg(test)]
fn row_json(row: &BinlogRow, table: &Table) -> (String, Option<String>) {
    let mut out = String::with_capacity(64);
    let mut key = String::new();
    let mut key_complete = true;
    let mut has_key = false;
    out.push('{');
    for (i, col) in row.columns_ref().iter().enumerate() {
        if i > 0 {
            out.push(',');
        }
        let name = col.name_str();
        write_str(&mut out, &name);
        out.push(':');
        let start = out.len();
        // Images are full (binlog_row_image=FULL): the i-th value is the i-th column; a
        // partial image would leave some out, and the others are found by name.
        let info = if row.len() == table.columns.len() {
            table.columns.get(i)
        } else {
            table.columns.iter().find(|c| c.name == name)
        };
        match row.as_ref(i) {
            Some(v) => super::render::write_binlog_value(&mut out, col, v, info),
            None => out.push_str("null"),
        }
        if col.flags().contains(ColumnFlags::PRI_KEY_FLAG) {
            has_key = true;
            key.push(if key.is_empty() { '{' } else { ',' });
            write_str(&mut key, &name);
            key.push(':');
            let value = out[start..].to_string();
            if value == "null" {
                key_complete = false;
            }
            key.push_str(&value);
        }
    }
    out.push('}');
    let key = (has_key && key_complete).then(|| {
        key.push('}');
        key
    });
    (out, key)
}

use crate::mysql::render::write_str;

#[cfg(test)]
mod tests {
    use mysql_async::binlog::events::FormatDescriptionEvent;
    use mysql_async::binlog::BinlogVersion;

    use super::*;

    /// MySQL 8's binlog, built byte by byte from the format (the suite's server is MariaDB):
    /// the row-based replication chapter of the MySQL source's internals documentation
    /// (`libbinlogevents`: event header, GTID, QUERY, TABLE_MAP with optional metadata, ROWS v2,
    /// XID) and MySQL's binary JSON (`json_binary.h`). Checksums off.
    mod mysql8 {
        pub const TIMESTAMP: u32 = 1_700_000_000;

        pub fn event(ty: u8, log_pos: u32, body: &[u8]) -> Vec<u8> {
            let mut e = Vec::new();
            e.extend_from_slice(&TIMESTAMP.to_le_bytes());
            e.push(ty);
            e.extend_from_slice(&1u32.to_le_bytes()); // server id
            e.extend_from_slice(&(19 + body.len() as u32).to_le_bytes());
            e.extend_from_slice(&log_pos.to_le_bytes());
            e.extend_from_slice(&0u16.to_le_bytes()); // flags
            e.extend_from_slice(body);
            e
        }

        pub fn rotate(file: &str) -> Vec<u8> {
            let mut b = 4u64.to_le_bytes().to_vec();
            b.extend_from_slice(file.as_bytes());
            event(4, 0, &b)
        }

        pub fn gtid(log_pos: u32, gno: u64, commit_micros: u64) -> Vec<u8> {
            let mut b = vec![1u8]; // flags: may commit in parallel
            b.extend_from_slice(&[0x3e; 16]); // source uuid
            b.extend_from_slice(&gno.to_le_bytes());
            b.push(2); // logical timestamp typecode
            b.extend_from_slice(&0u64.to_le_bytes()); // last_committed
            b.extend_from_slice(&1u64.to_le_bytes()); // sequence_number
            b.extend_from_slice(&commit_micros.to_le_bytes()[..7]); // immediate commit ts
            b.push(0); // transaction length (lenenc)
            b.extend_from_slice(&80036u32.to_le_bytes()); // immediate server version
            event(33, log_pos, &b)
        }

        pub fn query(log_pos: u32, schema: &str, sql: &str) -> Vec<u8> {
            let mut b = Vec::new();
            b.extend_from_slice(&7u32.to_le_bytes()); // thread id
            b.extend_from_slice(&0u32.to_le_bytes()); // execution time
            b.push(schema.len() as u8);
            b.extend_from_slice(&0u16.to_le_bytes()); // error code
            b.extend_from_slice(&0u16.to_le_bytes()); // status vars length
            b.extend_from_slice(schema.as_bytes());
            b.push(0);
            b.extend_from_slice(sql.as_bytes());
            event(2, log_pos, &b)
        }

        pub fn xid(log_pos: u32) -> Vec<u8> {
            event(16, log_pos, &99u64.to_le_bytes())
        }

        fn lenenc_str(out: &mut Vec<u8>, s: &str) {
            out.push(s.len() as u8);
            out.extend_from_slice(s.as_bytes());
        }

        /// `db`.`items` (id BIGINT NOT NULL, name VARCHAR(20), doc JSON), full metadata.
        pub fn table_map(log_pos: u32, table_id: u8, db: &str) -> Vec<u8> {
            let mut b = vec![table_id, 0, 0, 0, 0, 0]; // table id (6 bytes)
            b.extend_from_slice(&1u16.to_le_bytes()); // flags
            lenenc_str(&mut b, db);
            b.push(0);
            lenenc_str(&mut b, "items");
            b.push(0);
            b.push(3); // columns
            b.extend_from_slice(&[8, 15, 245]); // LONGLONG, VARCHAR, JSON
            b.extend_from_slice(&[3, 80, 0, 4]); // metadata: VARCHAR max bytes 80, JSON 4
            b.push(0b110); // nullable: name, doc
                           // Optional metadata (binlog_row_metadata=FULL): TLV fields.
            b.extend_from_slice(&[1, 1, 0b0000_0000]); // SIGNEDNESS: id signed
            b.extend_from_slice(&[2, 1, 255]); // DEFAULT_CHARSET utf8mb4_0900_ai_ci
            let mut names = Vec::new();
            for n in ["id", "name", "doc"] {
                lenenc_str(&mut names, n);
            }
            b.push(4); // COLUMN_NAME
            b.push(names.len() as u8);
            b.extend_from_slice(&names);
            b.extend_from_slice(&[8, 1, 0]); // SIMPLE_PRIMARY_KEY: column 0
            event(19, log_pos, &b)
        }

        /// `{"a": 1}` in MySQL's binary JSON: a small object, one int16 member inlined.
        pub const DOC: [u8; 13] = [0x00, 1, 0, 12, 0, 11, 0, 1, 0, 0x05, 1, 0, b'a'];

        pub fn image(id: i64, name: Option<&str>) -> Vec<u8> {
            let mut b = vec![if name.is_some() { 0 } else { 0b010 }];
            b.extend_from_slice(&id.to_le_bytes());
            if let Some(n) = name {
                b.push(n.len() as u8);
                b.extend_from_slice(n.as_bytes());
            }
            b.extend_from_slice(&(DOC.len() as u32).to_le_bytes());
            b.extend_from_slice(&DOC);
            b
        }

        /// ROWS v2: 30 write, 31 update (before, after), 32 delete, 39 partial update.
        pub fn rows(ty: u8, log_pos: u32, table_id: u8, images: &[Vec<u8>]) -> Vec<u8> {
            let mut b = vec![table_id, 0, 0, 0, 0, 0];
            b.extend_from_slice(&1u16.to_le_bytes()); // STMT_END_F
            b.extend_from_slice(&2u16.to_le_bytes()); // no extra data
            b.push(3);
            b.push(0b111);
            if ty == 31 || ty == 39 {
                b.push(0b111);
            }
            for i in images {
                b.extend_from_slice(i);
            }
            event(ty, log_pos, &b)
        }
    }

    fn feed(d: &mut Decoder, bytes: &[u8]) -> Result<Option<Committed>, DecodeError> {
        let fde = FormatDescriptionEvent::new(BinlogVersion::Version4);
        let ev = Event::read(&fde, bytes).expect("a well-formed event");
        d.handle(&ev)
    }

    fn drain(c: Committed) -> Vec<Pending> {
        c.changes.drain().unwrap().map(Result::unwrap).collect()
    }

    fn record(p: &Pending) -> (RowOp, serde_json::Value, Option<serde_json::Value>) {
        match p {
            Pending::Row {
                operation,
                record,
                old,
                ..
            } => (
                *operation,
                serde_json::from_str(record).unwrap(),
                old.as_deref().map(|o| serde_json::from_str(o).unwrap()),
            ),
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn the_mysql_8_dialect_from_byte_fixtures() {
        use mysql8::*;
        use serde_json::json;
        let dir = std::env::temp_dir().join(format!("fx-binlog-test-{}", std::process::id()));
        let mut d = Decoder::new("fx_t", 1 << 20, &dir);
        assert!(feed(&mut d, &rotate("binlog.000007")).unwrap().is_none());
        assert_eq!(d.file(), Some("binlog.000007"));

        // GTID ─ BEGIN ─ TABLE_MAP ─ WRITE ─ UPDATE ─ DELETE ─ XID
        let micros = u64::from(TIMESTAMP) * 1_000_000 + 123_456;
        assert!(feed(&mut d, &gtid(200, 42, micros)).unwrap().is_none());
        assert!(feed(&mut d, &query(300, "fx_t", "BEGIN"))
            .unwrap()
            .is_none());
        assert!(feed(&mut d, &table_map(400, 9, "fx_t")).unwrap().is_none());
        let insert = rows(30, 500, 9, &[image(1, Some("pen"))]);
        assert!(feed(&mut d, &insert).unwrap().is_none());
        let update = rows(31, 600, 9, &[image(1, Some("pen")), image(1, None)]);
        assert!(feed(&mut d, &update).unwrap().is_none());
        let delete = rows(32, 700, 9, &[image(1, None)]);
        assert!(feed(&mut d, &delete).unwrap().is_none());
        assert!(!d.idle());
        let tx = feed(&mut d, &xid(731)).unwrap().expect("XID commits");
        assert_eq!(tx.end_lsn, Lsn((7 << 32) | 731));
        assert_eq!(tx.commit_lsn, tx.end_lsn);
        assert_eq!(tx.commit_timestamp.to_unix_micros(), micros as i64);
        assert_eq!(
            d.last_gtid(),
            Some("3e3e3e3e-3e3e-3e3e-3e3e-3e3e3e3e3e3e:42")
        );
        let changes = drain(tx);
        assert_eq!(changes.len(), 3);
        let full = json!({"id": 1, "name": "pen", "doc": {"a": 1}});
        let no_name = json!({"id": 1, "name": null, "doc": {"a": 1}});
        assert_eq!(record(&changes[0]), (RowOp::Insert, full.clone(), None));
        assert_eq!(
            record(&changes[1]),
            (RowOp::Update, no_name.clone(), Some(full))
        );
        assert_eq!(
            record(&changes[2]),
            (RowOp::Delete, no_name.clone(), Some(no_name))
        );
        match &changes[0] {
            Pending::Row {
                key, schema, table, ..
            } => {
                assert_eq!(key.as_deref(), Some(r#"{"id":1}"#));
                assert_eq!((&**schema, &**table), ("fx_t", "items"));
            }
            _ => unreachable!(),
        }
        assert!(d.idle());

        // DDL: GTID ─ QUERY (no BEGIN), a transaction of its own.
        assert!(feed(&mut d, &gtid(800, 43, 0)).unwrap().is_none());
        let tx = feed(
            &mut d,
            &query(900, "fx_t", "ALTER TABLE items ADD COLUMN c int"),
        )
        .unwrap()
        .expect("DDL commits by itself");
        assert_eq!(tx.end_lsn, Lsn((7 << 32) | 900));
        match &drain(tx)[..] {
            [Pending::Schema {
                command,
                object_type,
                table,
                object,
                ..
            }] => {
                assert_eq!(command, "ALTER TABLE");
                assert_eq!(object_type, "table");
                assert_eq!(table.as_deref(), Some("items"));
                assert_eq!(object.as_deref(), Some("fx_t.items"));
            }
            other => panic!("{other:?}"),
        }

        // Another database's transaction: skipped (rows not decoded), the boundary moves.
        assert!(feed(&mut d, &gtid(1000, 44, 0)).unwrap().is_none());
        assert!(feed(&mut d, &query(1100, "other", "BEGIN"))
            .unwrap()
            .is_none());
        assert!(feed(&mut d, &table_map(1200, 10, "other"))
            .unwrap()
            .is_none());
        // Garbage rows: never decoded for another database.
        let mut junk = rows(30, 1300, 10, &[vec![0xff; 3]]);
        junk.truncate(junk.len());
        assert!(feed(&mut d, &junk).unwrap().is_none());
        assert!(feed(&mut d, &xid(1331)).unwrap().is_none());
        assert_eq!(d.boundary(), Some(Lsn((7 << 32) | 1331)));

        // A rolled-back transaction (non-transactional engines log it with ROLLBACK).
        assert!(feed(&mut d, &query(1400, "fx_t", "BEGIN"))
            .unwrap()
            .is_none());
        assert!(feed(&mut d, &table_map(1500, 9, "fx_t")).unwrap().is_none());
        assert!(feed(&mut d, &rows(30, 1600, 9, &[image(2, Some("x"))]))
            .unwrap()
            .is_none());
        assert!(feed(&mut d, &query(1700, "fx_t", "ROLLBACK"))
            .unwrap()
            .is_none());
        assert!(d.idle());

        // PARTIAL_UPDATE_ROWS (binlog_row_value_options=PARTIAL_JSON): refused, loudly.
        assert!(feed(&mut d, &query(1800, "fx_t", "BEGIN"))
            .unwrap()
            .is_none());
        assert!(feed(&mut d, &table_map(1900, 9, "fx_t")).unwrap().is_none());
        let partial = rows(39, 2000, 9, &[image(1, None), image(1, None)]);
        assert!(matches!(
            feed(&mut d, &partial),
            Err(DecodeError::PartialUpdate(_))
        ));

        // Rows of a table no TABLE_MAP described: an error, not a guess.
        let mut d = Decoder::new("fx_t", 1 << 20, &dir);
        feed(&mut d, &rotate("binlog.000007")).unwrap();
        feed(&mut d, &query(300, "fx_t", "BEGIN")).unwrap();
        assert!(matches!(
            feed(&mut d, &rows(30, 400, 77, &[image(1, None)])),
            Err(DecodeError::UnknownTable(77))
        ));
    }

    #[test]
    fn a_table_map_without_column_names_is_refused() {
        use mysql8::*;
        let dir = std::env::temp_dir();
        let mut d = Decoder::new("fx_t", 1 << 20, &dir);
        feed(&mut d, &rotate("binlog.000001")).unwrap();
        let mut tm = table_map(400, 9, "fx_t");
        // Cut the optional metadata off (binlog_row_metadata=MINIMAL): the event's size with it.
        let optional = 3 + 3 + 2 + (3 + 5 + 4) + 3;
        tm.truncate(tm.len() - optional);
        let size = tm.len() as u32;
        tm[9..13].copy_from_slice(&size.to_le_bytes());
        assert!(matches!(
            feed(&mut d, &tm),
            Err(DecodeError::NoColumnNames(_))
        ));
    }

    #[test]
    fn mariadb_compressed_and_encrypted_logs_are_refused() {
        use mysql8::*;
        let dir = std::env::temp_dir();
        let mut d = Decoder::new("fx_t", 1 << 20, &dir);
        feed(&mut d, &rotate("binlog.000001")).unwrap();
        assert!(matches!(
            feed(&mut d, &event(169, 100, &[0; 8])),
            Err(DecodeError::Compressed(169))
        ));
        assert!(matches!(
            feed(&mut d, &event(mariadb::START_ENCRYPTION, 100, &[0; 8])),
            Err(DecodeError::Encrypted)
        ));
        // Annotate rows, checkpoints and GTID lists change nothing.
        for t in [
            mariadb::ANNOTATE_ROWS,
            mariadb::BINLOG_CHECKPOINT,
            mariadb::GTID_LIST,
        ] {
            assert!(feed(&mut d, &event(t, 100, &[0; 8])).unwrap().is_none());
        }
        // MariaDB's GTID begins a transaction; standalone, the next statement is all of it.
        let mut g = 5u64.to_le_bytes().to_vec();
        g.extend_from_slice(&0u32.to_le_bytes());
        g.push(mariadb::FL_STANDALONE);
        feed(&mut d, &event(mariadb::GTID, 200, &g)).unwrap();
        let tx = feed(&mut d, &query(300, "fx_t", "TRUNCATE t"))
            .unwrap()
            .unwrap();
        assert_eq!(tx.end_lsn, Lsn((1 << 32) | 300));
        assert_eq!(d.last_gtid(), Some("0-1-5"));
        assert!(d.idle());
    }

    #[test]
    fn leading_words_classify_transaction_statements() {
        for (q, w) in [
            ("BEGIN", "BEGIN"),
            ("begin", "BEGIN"),
            ("COMMIT", "COMMIT"),
            ("COMMIT /* implicit */", "COMMIT ?"),
            ("ROLLBACK", "ROLLBACK"),
            ("ROLLBACK TO `sp1`", "ROLLBACK TO"),
            ("SAVEPOINT `sp1`", "SAVEPOINT"),
            ("START TRANSACTION", "START TRANSACTION"),
            ("XA START 'x'", "XA START"),
            ("CREATE TABLE t (a int)", "CREATE"),
        ] {
            assert_eq!(first_words(q), w, "{q}");
        }
    }

    #[test]
    fn second_precision_commit_times_are_read_times_within_that_second() {
        let t = |micros: i64| chrono::DateTime::from_timestamp_micros(micros).unwrap();
        // Read 2 ms into the second: that instant.
        assert_eq!(commit_micros(100, t(100_002_000)), 100_002_000);
        // Read later (a replay): the end of the second, the same on every replay.
        assert_eq!(commit_micros(100, t(250_000_000)), 100_999_999);
        // A clock behind the server's: never before the logged second.
        assert_eq!(commit_micros(100, t(99_000_000)), 100_000_000);
    }

    #[test]
    fn mariadb_gtids_read_domain_server_and_sequence() {
        let mut data = Vec::new();
        data.extend_from_slice(&7u64.to_le_bytes());
        data.extend_from_slice(&2u32.to_le_bytes());
        data.push(mariadb::FL_STANDALONE | 0x20);
        assert_eq!(mariadb_gtid(&data, 1).unwrap(), ("2-1-7".to_string(), 0x21));
        assert!(mariadb_gtid(&data[..12], 1).is_err());
    }

    /// The row loop ([`read_row`]) against mysql_common's own row decoder rendered by
    /// [`row_json`] (what the stream did before it), on random row images of a table with every
    /// column type the binlog carries: every record, old row and key must be the same text,
    /// and an image one decoder refuses the other refuses too.
    #[test]
    fn the_row_loop_renders_rows_exactly_as_mysql_commons_decoder_does() {
        use mysql8::event;
        // (binlog type, metadata, value bytes for a random value)
        type Gen = fn(&mut Rng) -> Vec<u8>;
        fn lenenc(out: &mut Vec<u8>, b: &[u8]) {
            out.push(b.len() as u8);
            out.extend_from_slice(b);
        }
        fn text(r: &mut Rng, max: usize) -> Vec<u8> {
            let n = r.below(max as u64 + 1) as usize;
            let pool: &[&str] = &[
                "a", "Z", "0", " ", "\"", "\\", "\n", "\t", "\u{1}", "\u{1f}", "\u{7f}", "é", "日",
                "😀", "/", "<", "'", "{", "}", "\r", "\u{8}", "\u{c}",
            ];
            let mut s = String::new();
            while s.len() < n {
                let piece = pool[r.below(pool.len() as u64) as usize];
                if s.len() + piece.len() > n {
                    break;
                }
                s.push_str(piece);
            }
            if r.below(8) == 0 {
                // Not UTF-8 at all.
                return (0..n).map(|_| r.below(256) as u8).collect();
            }
            s.into_bytes()
        }
        fn bytes(r: &mut Rng, n: usize) -> Vec<u8> {
            (0..n).map(|_| r.below(256) as u8).collect()
        }
        fn json_text(r: &mut Rng) -> Vec<u8> {
            let docs: &[&str] = &[
                r#"{"a": [1, 2]}"#,
                "[]",
                " 12 ",
                "\"x\"",
                "{x",
                "",
                "null",
                r#"{"k":"\u00e9"}"#,
            ];
            docs[r.below(docs.len() as u64) as usize]
                .as_bytes()
                .to_vec()
        }
        let columns: Vec<(&str, u8, Vec<u8>, Gen)> = vec![
            ("id", 8, vec![], |r| bytes(r, 8)),
            ("tiny", 1, vec![], |r| bytes(r, 1)),
            ("small_u", 2, vec![], |r| bytes(r, 2)),
            ("medium", 9, vec![], |r| bytes(r, 3)),
            ("int_u", 3, vec![], |r| bytes(r, 4)),
            ("big_u", 8, vec![], |r| bytes(r, 8)),
            ("f", 4, vec![4], |r| bytes(r, 4)),
            ("d", 5, vec![8], |r| bytes(r, 8)),
            // DECIMAL(12,2): 5 bytes of integer part (9 + 1 digits), 1 of fraction.
            ("dec", 246, vec![12, 2], |r| {
                let mut b = vec![0x80 | (r.below(2) as u8) << 6];
                b.extend((0..5).map(|_| r.below(10) as u8));
                if b[0] & 0x40 != 0 {
                    b[0] = 0x80;
                }
                b
            }),
            ("yr", 13, vec![], |r| bytes(r, 1)),
            ("dt", 10, vec![], |r| {
                let v = (r.below(9999) << 9) | (r.below(13) << 5) | r.below(32);
                v.to_le_bytes()[..3].to_vec()
            }),
            ("t2", 19, vec![3], |r| {
                let mut b = vec![
                    0x80 | r.below(8) as u8,
                    r.below(256) as u8,
                    r.below(64) as u8,
                ];
                b.extend(r.below(10000).to_be_bytes()[6..].iter());
                b
            }),
            ("dt2", 18, vec![6], |r| {
                let ym = r.below(9999) * 13 + r.below(13);
                let v: u64 = (1 << 39)
                    | (ym << 22)
                    | (r.below(32) << 17)
                    | (r.below(24) << 12)
                    | (r.below(60) << 6)
                    | r.below(60);
                let mut b = v.to_be_bytes()[3..].to_vec();
                b.extend(r.below(1_000_000).to_be_bytes()[5..].iter());
                b
            }),
            ("ts2", 17, vec![2], |r| {
                let mut b = (r.below(2_000_000_000) as u32).to_be_bytes().to_vec();
                b.push(r.below(100) as u8);
                b
            }),
            ("ts", 7, vec![], |r| {
                (r.below(2_000_000_000) as u32).to_le_bytes().to_vec()
            }),
            ("bits", 16, vec![3, 1], |r| bytes(r, 2)),
            ("name", 15, vec![80, 0], |r| {
                let mut b = Vec::new();
                lenenc(&mut b, &text(r, 80));
                b
            }),
            ("code", 254, vec![254, 40], |r| {
                let mut b = Vec::new();
                lenenc(&mut b, &text(r, 40));
                b
            }),
            ("color", 254, vec![247, 1], |r| vec![r.below(4) as u8]),
            ("flags", 254, vec![248, 1], |r| vec![r.below(8) as u8]),
            ("body", 252, vec![2], |r| {
                let t = if r.below(2) == 0 {
                    text(r, 300)
                } else {
                    json_text(r)
                };
                let mut b = (t.len() as u16).to_le_bytes().to_vec();
                b.extend(t);
                b
            }),
            ("raw", 252, vec![2], |r| {
                let len = r.below(40) as usize;
                let t = bytes(r, len);
                let mut b = (t.len() as u16).to_le_bytes().to_vec();
                b.extend(t);
                b
            }),
            ("doc", 245, vec![4], |r| {
                let doc: Vec<u8> = if r.below(4) == 0 {
                    bytes(r, 5)
                } else {
                    mysql8::DOC.to_vec()
                };
                let mut b = (doc.len() as u32).to_le_bytes().to_vec();
                b.extend(doc);
                b
            }),
            ("geo", 255, vec![4], |r| {
                let g = bytes(r, 25);
                let mut b = (g.len() as u32).to_le_bytes().to_vec();
                b.extend(g);
                b
            }),
            ("Order \"Qty\"", 3, vec![], |r| bytes(r, 4)),
        ];
        let n = columns.len();
        // TABLE_MAP with full optional metadata.
        let mut b = vec![5, 0, 0, 0, 0, 0];
        b.extend_from_slice(&1u16.to_le_bytes());
        lenenc(&mut b, b"fx_t");
        b.push(0);
        lenenc(&mut b, b"wide");
        b.push(0);
        b.push(n as u8);
        b.extend(columns.iter().map(|c| c.1));
        let meta: Vec<u8> = columns.iter().flat_map(|c| c.2.clone()).collect();
        lenenc(&mut b, &meta);
        b.extend(vec![0xFFu8; n.div_ceil(8)]); // all nullable
                                               // SIGNEDNESS: one bit per numeric column, most significant first; `_u` ones unsigned.
        let numeric: Vec<bool> = columns
            .iter()
            .filter(|c| matches!(c.1, 1 | 2 | 3 | 4 | 5 | 8 | 9 | 13 | 246))
            .map(|c| c.0.ends_with("_u"))
            .collect();
        let mut sign = vec![0u8; numeric.len().div_ceil(8)];
        for (i, u) in numeric.iter().enumerate() {
            if *u {
                sign[i / 8] |= 0x80 >> (i % 8);
            }
        }
        b.push(1);
        lenenc(&mut b, &sign);
        // COLUMN_CHARSET of the character columns (name, code, body, raw): raw is binary.
        b.push(3);
        lenenc(&mut b, &[45, 45, 45, 63]);
        let mut names = Vec::new();
        for c in &columns {
            lenenc(&mut names, c.0.as_bytes());
        }
        b.push(4);
        lenenc(&mut b, &names);
        let mut sets = Vec::new();
        sets.push(3);
        for v in ["x", "y", "z"] {
            lenenc(&mut sets, v.as_bytes());
        }
        b.push(5);
        lenenc(&mut b, &sets);
        let mut enums = Vec::new();
        enums.push(3);
        for v in ["red", "green", "bl\"ue"] {
            lenenc(&mut enums, v.as_bytes());
        }
        b.push(6);
        lenenc(&mut b, &enums);
        b.push(10); // ENUM_AND_SET_DEFAULT_CHARSET
        lenenc(&mut b, &[45]);
        b.push(8); // SIMPLE_PRIMARY_KEY: id and the last column
        lenenc(&mut b, &[0, (n - 1) as u8]);
        let tme = event(19, 100, &b);

        let dir = std::env::temp_dir().join(format!("fx-binlog-rows-{}", std::process::id()));
        let mut d = Decoder::new("fx_t", 1 << 20, &dir);
        feed(&mut d, &mysql8::rotate("binlog.000001")).unwrap();
        feed(&mut d, &tme).unwrap();
        // MariaDB's JSON columns are found in the catalog: `body` is one.
        d.set_catalog_columns("wide", [("body".to_string(), CatalogType::Json)].into());
        let table = d.tables.get(&5).unwrap().as_ref().unwrap();

        let mut r = Rng(0x9e37_79b9_7f4a_7c15);
        let (mut rows_seen, mut refused, mut keys) = (0, 0, 0);
        for round in 0..3000 {
            let ty = [30u8, 31, 32][round % 3];
            let images = if ty == 31 { 2 } else { 1 };
            // Mostly full images; now and then a partial one.
            let present: Vec<bool> = (0..n).map(|_| r.below(10) != 0 || round % 5 != 0).collect();
            let mut bitmap = vec![0u8; n.div_ceil(8)];
            for (i, p) in present.iter().enumerate() {
                if *p {
                    bitmap[i / 8] |= 1 << (i % 8);
                }
            }
            let mut body = vec![5, 0, 0, 0, 0, 0];
            body.extend_from_slice(&1u16.to_le_bytes());
            body.extend_from_slice(&2u16.to_le_bytes());
            body.push(n as u8);
            for _ in 0..images {
                body.extend_from_slice(&bitmap);
            }
            for _ in 0..1 + r.below(3) {
                for _ in 0..images {
                    let count = present.iter().filter(|p| **p).count();
                    let mut nulls = vec![0u8; count.div_ceil(8)];
                    let mut values = Vec::new();
                    let mut k = 0;
                    for (i, c) in columns.iter().enumerate() {
                        if !present[i] {
                            continue;
                        }
                        if r.below(6) == 0 {
                            nulls[k / 8] |= 1 << (k % 8);
                        } else {
                            values.extend((c.3)(&mut r));
                        }
                        k += 1;
                    }
                    body.extend(nulls);
                    body.extend(values);
                }
            }
            if round % 97 == 0 {
                // A cut image: both decoders must refuse it.
                body.truncate(body.len() - 1 - r.below(5) as usize);
            }
            let bytes = event(ty, 200, &body);
            let fde = FormatDescriptionEvent::new(BinlogVersion::Version4);
            let ev = Event::read(&fde, &bytes[..]).unwrap();
            let Some(EventData::RowsEvent(rows)) = ev.read_data().unwrap() else {
                panic!("a rows event");
            };
            let oracle: Result<Vec<_>, std::io::Error> = rows
                .rows(&table.tme)
                .map(|row| {
                    row.map(|(before, after)| {
                        (
                            before.map(|b| row_json(&b, table)),
                            after.map(|a| row_json(&a, table)),
                        )
                    })
                })
                .collect();
            let ours = rows_to_pending(&Arc::from("fx_t"), table, &rows, 0);
            match (oracle, ours) {
                (Ok(expected), Ok(got)) => {
                    assert_eq!(expected.len(), got.len(), "round {round}");
                    for ((before, after), p) in expected.into_iter().zip(got) {
                        let Pending::Row {
                            record, old, key, ..
                        } = p
                        else {
                            panic!("a row change");
                        };
                        let (want_record, want_old) = match ty {
                            30 => (after.unwrap(), None),
                            31 => (after.unwrap(), before),
                            _ => (before.clone().unwrap(), before),
                        };
                        assert_eq!(record, want_record.0, "round {round}");
                        assert_eq!(key, want_record.1, "round {round}");
                        assert_eq!(old, want_old.map(|o| o.0), "round {round}");
                        serde_json::from_str::<serde_json::Value>(&record)
                            .unwrap_or_else(|e| panic!("{e}: {record}"));
                        keys += usize::from(key.is_some());
                        rows_seen += 1;
                    }
                }
                (Err(_), Err(_)) => refused += 1,
                (o, g) => panic!("round {round}: mysql_common {o:?}, the row loop {g:?}"),
            }
        }
        // The generator reached every case.
        assert!(rows_seen > 3000, "{rows_seen}");
        assert!(refused >= 20, "{refused}");
        assert!(keys > 100 && keys < rows_seen, "{keys} of {rows_seen}");
    }

    /// The JSON catalog read at the start: tables not in it have no JSON columns and are not
    /// looked up; a table map repeated by the next transaction keeps its plan while the catalog
    /// is fresh; after DDL the next table map asks for the catalog again and JSON-ness follows
    /// what it says, even for a map whose bytes did not change.
    #[test]
    fn the_json_catalog_is_read_once_and_again_after_ddl() {
        use mysql8::*;
        let dir = std::env::temp_dir().join(format!("fx-binlog-cat-{}", std::process::id()));
        let mut d = Decoder::new("fx_t", 1 << 20, &dir);
        feed(&mut d, &rotate("binlog.000001")).unwrap();
        d.set_catalog(HashMap::new());
        feed(&mut d, &table_map(100, 9, "fx_t")).unwrap();
        assert!(
            d.wanted_tables().is_empty(),
            "known from the catalog: no lookup"
        );
        let planned = |d: &Decoder| {
            let t = d.tables.get(&9).unwrap().as_ref().unwrap();
            (
                t.plan.as_ptr(),
                t.columns.iter().map(|c| c.is_json()).collect::<Vec<_>>(),
            )
        };
        let (plan, json) = planned(&d);
        assert_eq!(json, [false, false, false]);
        feed(&mut d, &table_map(200, 9, "fx_t")).unwrap();
        assert_eq!(planned(&d).0, plan, "the same map keeps its plan");
        // DDL (a check that makes `name` a MariaDB JSON column): the catalog is stale.
        feed(
            &mut d,
            &query(
                300,
                "fx_t",
                "ALTER TABLE items ADD CHECK (json_valid(name))",
            ),
        )
        .unwrap();
        feed(&mut d, &table_map(400, 9, "fx_t")).unwrap();
        assert_eq!(d.wanted_tables(), ["items"]);
        d.set_catalog(
            [(
                "items".to_string(),
                [("name".to_string(), CatalogType::Json)].into(),
            )]
            .into(),
        );
        assert_eq!(planned(&d).1, [false, true, false]);
        let _ = std::fs::remove_dir_all(&dir);
    }

    /// xorshift64*: a fixed sequence, no dependency.
    struct Rng(u64);

    impl Rng {
        fn below(&mut self, n: u64) -> u64 {
            self.0 ^= self.0 >> 12;
            self.0 ^= self.0 << 25;
            self.0 ^= self.0 >> 27;
            self.0.wrapping_mul(0x2545_f491_4f6c_dd1d) % n.max(1)
        }
    }
}
