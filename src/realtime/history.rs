//! A realtime room's durable resume history: `<data_dir>/realtime/<project_id>/`.
//!
//! ```text
//!  0000000000000001.seg  0000000000000002.seg  …  (append-only; the last one is written)
//!  floor                                          (ids at or below it were trimmed)
//!  epoch                                          (boot counter, for broadcast ids)
//! ```
//!
//! * A segment is a sequence of records `[len: u32 LE][crc32: u32 LE][payload: len bytes]`; the
//!   payload is one event and the time it was stored, in one of two forms told apart by its
//!   first byte (see [`COMPACT_ROW`]): a row change exactly as the change stream made it is
//!   its guide payload behind a 26-byte binary header (stored time, commit and end LSN,
//!   whether it ends its transaction; everything else is read back from the payload, which
//!   holds it), anything else is JSON (`{`: id, kind, table, …, the message's payload
//!   verbatim, a row change's record and old row only inside it: see `Stored`). Both are
//!   read whatever wrote them: histories written before the compact form (JSON only) read
//!   on after an upgrade. A record whose length runs past the end of its file or whose checksum
//!   does not match (a write torn by a crash) ends the segment: the file is truncated there
//!   when the history is opened, and what follows is ignored.
//! * Appends are buffered and written (to the page cache) before a reader is told about them;
//!   [`History::sync_job`] gives the fsyncs to run outside any lock (the segments rolled over
//!   since the last one, the current one, the directory). A failed fsync hands its job back
//!   ([`History::sync_failed`]): it is retried, nothing is acknowledged until it succeeds, and
//!   the floor moves to the newest id it covered (its pages may be lost even if a retry passes).
//! * A failed write (ENOSPC, EIO) is cut back (`set_len`) to the last whole record, its records
//!   leave the index, the segment takes no more appends, and the floor moves to the newest lost
//!   id (fsynced; until that succeeds the change stream is not acknowledged). A record over
//!   [`MAX_RECORD`] is refused the same way (it could not be read back).
//! * Retention (events, age, bytes) is applied by whole segments, oldest first: a segment is
//!   about a sixteenth of the byte or event budget. The index drops them at once; then, outside
//!   the lock, the id of the last dropped record is written (fsync, rename) to `floor` and only
//!   then are the files deleted.
//! * A damaged record in a segment that is not the newest loses what followed it: the floor
//!   moves to the next record kept, so a resume from before the hole is refused.
//! * A position `since` can be resumed from when nothing after it was trimmed and the history
//!   reaches back to it: `since >= floor` when something was trimmed, `since >=` the first record
//!   ever stored otherwise. Anything older is `RESUME_TOO_OLD`.
//! * The directory is 0700 and its files 0600, like the rest of the data directory.

use std::collections::VecDeque;
use std::fs::{File, OpenOptions};
use std::io::{Read, Seek, SeekFrom, Write};
use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt};
use std::path::{Path, PathBuf};
use std::sync::Arc;

use fluxbase_replication::pgoutput::Lsn;
use serde::{Deserialize, Serialize};

use crate::bus::{Event, EventKind, RowImage, RowOp};

/// Bytes of a record's header (length and checksum).
const HEADER: usize = 8;
/// Largest record accepted when reading (a corrupt length must not allocate gigabytes).
const MAX_RECORD: usize = 256 * 1024 * 1024;

/// What a room's append buffer keeps of its capacity once written.
const BUFFER_KEPT: usize = 1 << 20;

/// The floor as recorded on disk, shared with the jobs that write it outside the lock.
type SharedFloor = Arc<std::sync::Mutex<Option<String>>>;

/// CRC-32 (IEEE), the records' checksum: crc32fast folds 64 bytes at a time with carry-less
/// multiplication where the CPU has it (PCLMULQDQ), else slicing-by-16 (the pump checksums
/// every event it stores, row images included, while the change stream waits for it: by
/// table lookups this was ~6% of the server's CPU while draining a backlog).
fn crc32(data: &[u8]) -> u32 {
    crc32fast::hash(data)
}

/// One event as stored. Two forms are read: the payload as one JSON string in `p` (records
/// written by earlier versions; every field as given), and the payload as raw JSON in `P` (written now)
/// with a row change's `record` and `old` left out, because the payload holds both verbatim
/// (`events::finish` writes them into it): stored once and without escaping, a row image is
/// checksummed and written once instead of three times.
#[derive(Serialize, Deserialize)]
struct Stored {
    /// When it was stored, Unix milliseconds (for the age bound).
    at: i64,
    id: String,
    /// `r` row, `s` schema, `b` broadcast.
    k: char,
    /// The operation, DDL command or broadcast event.
    n: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    s: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    t: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    r: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    o: Option<String>,
    /// Columns left out of `r` as unchanged TOAST.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    u: Vec<String>,
    /// Columns left out of `r` and `o` for their size (`cdc_max_row_bytes`).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    x: Vec<String>,
    /// The table's OID ([`Event::relation`]).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    q: Option<u32>,
    ts: String,
    c: u64,
    e: u64,
    l: bool,
    /// The payload as a JSON string (the older form).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    p: Option<String>,
    /// The payload itself (the current form).
    #[serde(default, rename = "P", skip_serializing_if = "Option::is_none")]
    raw: Option<Box<serde_json::value::RawValue>>,
}

/// The current form of [`Stored`] but its payload, as serde would write it: what
/// [`write_stored`] writes by hand (the tests compare them).
#[cfg(test)]
#[derive(Serialize)]
struct StoredRef<'a> {
    at: i64,
    id: &'a str,
    k: char,
    n: &'a str,
    #[serde(skip_serializing_if = "Option::is_none")]
    s: Option<&'a str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    t: Option<&'a str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    r: Option<&'a str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    o: Option<&'a str>,
    #[serde(skip_serializing_if = "<[String]>::is_empty")]
    u: &'a [String],
    #[serde(skip_serializing_if = "<[String]>::is_empty")]
    x: &'a [String],
    #[serde(skip_serializing_if = "Option::is_none")]
    q: Option<u32>,
    ts: &'a str,
    c: u64,
    e: u64,
    l: bool,
}

/// A row change's rows as its payload holds them.
#[derive(Deserialize)]
struct PayloadRows<'a> {
    #[serde(borrow)]
    record: Option<&'a serde_json::value::RawValue>,
    #[serde(borrow)]
    old: Option<&'a serde_json::value::RawValue>,
}

/// First byte of a compact record: a row change whose payload is exactly the one the change
/// stream's `events::finish` wrote ([`crate::cdc::events::payload_is_finished`]), stored as
///
/// ```text
///  [0x01][flags: u8, bit 0 = last in its transaction, bit 1 = the table's OID follows]
///  [stored at: i64 LE, Unix ms][commit LSN: u64 LE][end LSN: u64 LE]
///  [the table's OID: u32 LE, when flagged][the payload: JSON, verbatim]
/// ```
///
/// The JSON form repeats the id, operation, names, commit time and unchanged TOAST columns
/// beside the payload that holds them (≈ 170 of ≈ 460 bytes of an insert); this form keeps
/// only what the payload does not say, so each event is encoded, checksummed, written, synced
/// and trimmed with a third fewer bytes. Reading (resumes: rare) parses them back from the
/// payload. JSON records begin with `{`, so a reader tells the forms apart by this byte; a
/// reader older than this form skips such records (docs/realtime-resume.md: no downgrade).
pub const COMPACT_ROW: u8 = 0x01;
/// Bytes of a compact record before its payload (and its table's OID, when flagged).
const COMPACT_HEADER: usize = 26;
/// Flag of a compact record whose table's OID follows its header.
const COMPACT_HAS_RELATION: u8 = 2;

/// Encodes an event as a record payload in the JSON form: the form every version reads (the
/// cluster's stream carries it, so nodes of different versions understand each other).
pub fn encode(event: &Event, at_ms: i64) -> Vec<u8> {
    let mut out = Vec::new();
    encode_into(&mut out, event, at_ms);
    out
}

/// The history's record of an event, appended to `out`: the compact form ([`COMPACT_ROW`])
/// when the event is a row change as the change stream made it, else the JSON form.
fn encode_record_into(out: &mut Vec<u8>, event: &Event, at_ms: i64) {
    // The change stream vouches for its own events (comparing every row image with the
    // payload's cost the pump ~0.1 µs an event); the tests check that it holds.
    if !event.payload_whole {
        return encode_into(out, event, at_ms);
    }
    debug_assert!(
        crate::cdc::events::payload_is_finished(event),
        "{}",
        event.payload
    );
    out.reserve(COMPACT_HEADER + 4 + event.payload.len());
    out.push(COMPACT_ROW);
    out.push(
        u8::from(event.last_in_transaction)
            | if event.relation.is_some() {
                COMPACT_HAS_RELATION
            } else {
                0
            },
    );
    out.extend_from_slice(&at_ms.to_le_bytes());
    out.extend_from_slice(&event.commit_lsn.0.to_le_bytes());
    out.extend_from_slice(&event.end_lsn.0.to_le_bytes());
    if let Some(relation) = event.relation {
        out.extend_from_slice(&relation.to_le_bytes());
    }
    out.extend_from_slice(event.payload.as_bytes());
}

/// A compact record's header and its payload; `None` when it is not one.
struct CompactParts<'a> {
    at: i64,
    commit_lsn: Lsn,
    end_lsn: Lsn,
    last: bool,
    relation: Option<u32>,
    payload: &'a [u8],
}

fn compact_parts(record: &[u8]) -> Option<CompactParts<'_>> {
    if record.first() != Some(&COMPACT_ROW) || record.len() < COMPACT_HEADER {
        return None;
    }
    let word = |at: usize| -> [u8; 8] { record[at..at + 8].try_into().expect("8 bytes") };
    let flags = record[1];
    if flags & !(1 | COMPACT_HAS_RELATION) != 0 {
        return None;
    }
    let (relation, payload) = if flags & COMPACT_HAS_RELATION != 0 {
        let oid = record.get(COMPACT_HEADER..COMPACT_HEADER + 4)?;
        (
            Some(u32::from_le_bytes(oid.try_into().expect("4 bytes"))),
            &record[COMPACT_HEADER + 4..],
        )
    } else {
        (None, &record[COMPACT_HEADER..])
    };
    Some(CompactParts {
        at: i64::from_le_bytes(word(2)),
        commit_lsn: Lsn(u64::from_le_bytes(word(10))),
        end_lsn: Lsn(u64::from_le_bytes(word(18))),
        last: flags & 1 != 0,
        relation,
        payload,
    })
}

/// What opening a history needs of a record: its id and when it was stored (without
/// decoding the event).
fn record_key(record: &[u8]) -> Option<(String, i64)> {
    if let Some(CompactParts { at, payload, .. }) = compact_parts(record) {
        // The payload begins with its id, which needed no escaping (payload_is_finished).
        let rest = payload.strip_prefix(b"{\"id\":\"")?;
        let end = rest.iter().position(|&b| b == b'"')?;
        let id = std::str::from_utf8(&rest[..end]).ok()?;
        return Some((id.to_string(), at));
    }
    #[derive(Deserialize)]
    struct Key {
        at: i64,
        id: String,
    }
    let k: Key = serde_json::from_slice(record).ok()?;
    Some((k.id, k.at))
}

/// [`encode`], appended to `out` (the history encodes each record straight into its write
/// buffer: no record of its own to allocate, fill and copy).
fn encode_into(out: &mut Vec<u8>, event: &Event, at_ms: i64) {
    let (k, n) = match &event.kind {
        EventKind::Row { operation } => ('r', operation.as_str()),
        EventKind::Schema { command } => ('s', command.as_str()),
        EventKind::Broadcast { event } => ('b', event.as_str()),
    };
    // The payload goes in as it is, so it must be JSON (it always is: anything else keeps the
    // older form). Parsing it checks that and finds a row change's rows in it: they are left
    // out when the payload holds them verbatim.
    let rows_in_payload = if k == 'r' {
        // The change stream's own layout is recognized by comparing bytes; anything else is
        // parsed.
        if event.payload_whole || crate::cdc::events::payload_holds_rows(event) {
            true
        } else {
            match serde_json::from_str::<PayloadRows>(&event.payload) {
                Ok(rows) => {
                    rows.record.map(|r| r.get()) == event.record()
                        && rows.old.map(|o| o.get()) == event.old()
                }
                Err(_) => return encode_as_string(out, event, at_ms, k, n),
            }
        }
    } else {
        if serde_json::from_str::<serde::de::IgnoredAny>(&event.payload).is_err() {
            return encode_as_string(out, event, at_ms, k, n);
        }
        false
    };
    out.reserve(192 + event.payload.len());
    write_stored(
        out,
        at_ms,
        event,
        k,
        n,
        (!rows_in_payload).then_some((event.record(), event.old())),
    );
    // `{...}` becomes `{...,"P":<payload>}`.
    out.extend_from_slice(b",\"P\":");
    out.extend_from_slice(event.payload.as_bytes());
    out.push(b'}');
}

/// A number in decimal, as serde_json writes it (without `fmt`'s machinery: three of them in
/// every record). In u64 arithmetic: by i128 every digit was a software 128-bit division, which
/// made this the costliest part of a record.
fn push_int(out: &mut Vec<u8>, negative: bool, abs: u64) {
    let mut digits = [0u8; 20];
    let mut at = digits.len();
    let mut rest = abs;
    loop {
        at -= 1;
        digits[at] = b'0' + (rest % 10) as u8;
        rest /= 10;
        if rest == 0 {
            break;
        }
    }
    if negative {
        out.push(b'-');
    }
    out.extend_from_slice(&digits[at..]);
}

/// A JSON string: as it is when nothing in it needs escaping (ids, names, times), else by
/// serde_json.
fn push_json_str(out: &mut Vec<u8>, s: &str) {
    if s.bytes().all(|b| b >= 0x20 && b != b'"' && b != b'\\') {
        out.push(b'"');
        out.extend_from_slice(s.as_bytes());
        out.push(b'"');
    } else {
        serde_json::to_writer(&mut *out, s).expect("strings serialize");
    }
}

/// The current form's fields but the payload, from `{` up to (not including) the closing `}`,
/// exactly as serde writes [`StoredRef`] (by hand: serde's escaping of every field was the
/// pump's largest cost after the checksum). `rows`: the record and old row when the payload
/// does not hold them.
fn write_stored(
    out: &mut Vec<u8>,
    at_ms: i64,
    event: &Event,
    k: char,
    n: &str,
    rows: Option<(Option<&str>, Option<&str>)>,
) {
    fn num(out: &mut Vec<u8>, key: &[u8], negative: bool, abs: u64) {
        out.extend_from_slice(key);
        push_int(out, negative, abs);
    }
    num(out, b"{\"at\":", at_ms < 0, at_ms.unsigned_abs());
    out.extend_from_slice(b",\"id\":");
    push_json_str(out, &event.id);
    out.extend_from_slice(b",\"k\":");
    let mut kb = [0u8; 4];
    push_json_str(out, k.encode_utf8(&mut kb));
    out.extend_from_slice(b",\"n\":");
    push_json_str(out, n);
    let (r, o) = rows.unwrap_or((None, None));
    for (key, v) in [
        (&b",\"s\":"[..], event.schema.as_deref()),
        (b",\"t\":", event.table.as_deref()),
        (b",\"r\":", r),
        (b",\"o\":", o),
    ] {
        if let Some(v) = v {
            out.extend_from_slice(key);
            push_json_str(out, v);
        }
    }
    if !event.unchanged_toast.is_empty() {
        out.extend_from_slice(b",\"u\":");
        serde_json::to_writer(&mut *out, &event.unchanged_toast).expect("strings serialize");
    }
    if !event.too_large.is_empty() {
        out.extend_from_slice(b",\"x\":");
        serde_json::to_writer(&mut *out, &event.too_large).expect("strings serialize");
    }
    if let Some(relation) = event.relation {
        num(out, b",\"q\":", false, relation.into());
    }
    out.extend_from_slice(b",\"ts\":");
    push_json_str(out, &event.commit_timestamp);
    num(out, b",\"c\":", false, event.commit_lsn.0);
    num(out, b",\"e\":", false, event.end_lsn.0);
    out.extend_from_slice(if event.last_in_transaction {
        b",\"l\":true"
    } else {
        b",\"l\":false"
    });
}

/// The older form: every field as given, the payload as a JSON string.
fn encode_as_string(out: &mut Vec<u8>, event: &Event, at_ms: i64, k: char, n: &str) {
    serde_json::to_writer(
        out,
        &Stored {
            at: at_ms,
            id: event.id.clone(),
            k,
            n: n.to_string(),
            s: event.schema.as_deref().map(str::to_string),
            t: event.table.as_deref().map(str::to_string),
            r: event.record().map(str::to_string),
            o: event.old().map(str::to_string),
            u: event.unchanged_toast.clone(),
            x: event.too_large.clone(),
            q: event.relation,
            ts: event.commit_timestamp.to_string(),
            c: event.commit_lsn.0,
            e: event.end_lsn.0,
            l: event.last_in_transaction,
            p: Some(event.payload.to_string()),
            raw: None,
        },
    )
    .expect("serializable")
}

/// Decodes a record payload (either form) back into the event it stored.
pub fn decode(payload: &[u8]) -> Option<Event> {
    if let Some(CompactParts {
        commit_lsn,
        end_lsn,
        last,
        relation,
        payload,
        ..
    }) = compact_parts(payload)
    {
        let payload = std::str::from_utf8(payload).ok()?;
        let f = crate::cdc::events::finished_fields(payload)?;
        return Some(Event {
            id: f.id,
            kind: EventKind::Row {
                operation: f.operation,
            },
            schema: Some(Arc::from(f.schema)),
            table: Some(Arc::from(f.table)),
            record: RowImage::Own(f.record),
            old: f.old.into(),
            unchanged_toast: f.unchanged_toast,
            too_large: f.too_large,
            relation,
            row_key: None,
            commit_timestamp: Arc::from(f.commit_timestamp),
            commit_lsn,
            end_lsn,
            last_in_transaction: last,
            payload: Arc::from(payload),
            sender: None,
            gap_before: false,
            // Every field was read from the payload (the commit LSN from beside it).
            payload_whole: true,
        });
    }
    let s: Stored = serde_json::from_slice(payload).ok()?;
    let kind = match s.k {
        'r' => EventKind::Row {
            operation: RowOp::from_name(&s.n)?,
        },
        's' => EventKind::Schema { command: s.n },
        'b' => EventKind::Broadcast { event: s.n },
        _ => return None,
    };
    let current = s.p.is_none();
    let (payload, mut record, mut old) = match (s.p, s.raw) {
        (Some(p), _) => (p, s.r, s.o),
        (None, Some(raw)) => (raw.get().to_string(), s.r, s.o),
        (None, None) => return None,
    };
    if current && matches!(kind, EventKind::Row { .. }) && record.is_none() {
        // Left out of the current form: the payload holds them verbatim.
        let rows: PayloadRows = serde_json::from_str(&payload).ok()?;
        record = rows.record.map(|r| r.get().to_string());
        old = rows.old.map(|o| o.get().to_string());
    }
    Some(Event {
        id: s.id,
        kind,
        schema: s.s.map(Arc::from),
        table: s.t.map(Arc::from),
        record: record.into(),
        old: old.into(),
        unchanged_toast: s.u,
        too_large: s.x,
        relation: s.q,
        row_key: None,
        commit_timestamp: Arc::from(s.ts),
        commit_lsn: Lsn(s.c),
        end_lsn: Lsn(s.e),
        last_in_transaction: s.l,
        payload: Arc::from(payload),
        sender: None,
        gap_before: false,
        payload_whole: false,
    })
}

/// An event id as the index keeps it: the change stream's ids (`<16 hex>-<8 hex>`, 25 ASCII
/// bytes) inline, so that indexing an event allocates nothing (and trimming frees nothing);
/// any other id on the heap. Ordered as its text.
#[derive(Clone, Debug)]
enum IndexId {
    Inline([u8; 25]),
    Heap(Box<str>),
}

impl IndexId {
    fn new(id: &str) -> IndexId {
        match <[u8; 25]>::try_from(id.as_bytes()) {
            Ok(bytes) if bytes.is_ascii() => IndexId::Inline(bytes),
            _ => IndexId::Heap(id.into()),
        }
    }

    fn as_str(&self) -> &str {
        match self {
            // ASCII, checked when it was made.
            IndexId::Inline(bytes) => std::str::from_utf8(bytes).expect("ASCII"),
            IndexId::Heap(id) => id,
        }
    }
}

/// Where a retained record is.
#[derive(Clone, Debug)]
pub struct Entry {
    id: IndexId,
    seg: u64,
    offset: u64,
    len: u32,
}

struct Segment {
    no: u64,
    /// Records and bytes (headers included) in it.
    count: usize,
    bytes: u64,
    /// Stored time of its newest record, Unix ms. (Its newest id is its last entry's: its
    /// `count` entries are consecutive in the index.)
    newest_ms: i64,
}

/// How much a history keeps.
#[derive(Clone, Copy, Debug)]
pub struct Limits {
    pub events: usize,
    pub age_ms: i64,
    pub bytes: u64,
}

impl Limits {
    fn segment_events(&self) -> usize {
        (self.events / 16).max(1)
    }
    fn segment_bytes(&self) -> u64 {
        (self.bytes / 16).max(4096)
    }
}

/// A read request handed out under the lock and served without it.
#[derive(Clone, Debug)]
pub struct Pending {
    pub id: String,
    path: PathBuf,
    offset: u64,
    len: u32,
}

impl Pending {
    /// Reads and checks the record (an error when its segment was trimmed meanwhile).
    pub fn read(&self) -> std::io::Result<Event> {
        self.read_from(&mut File::open(&self.path)?)
    }

    fn read_from(&self, f: &mut File) -> std::io::Result<Event> {
        f.seek(SeekFrom::Start(self.offset))?;
        let mut buf = vec![0u8; HEADER + self.len as usize];
        f.read_exact(&mut buf)?;
        let bad = || std::io::Error::new(std::io::ErrorKind::InvalidData, "corrupt record");
        let (len, crc) = header(&buf).ok_or_else(bad)?;
        if len != self.len || crc32(&buf[HEADER..]) != crc {
            return Err(bad());
        }
        // Another record at the same place (its segment was trimmed and the number reused by
        // a later process) is not the one that was asked for.
        decode(&buf[HEADER..])
            .filter(|e| e.id == self.id)
            .ok_or_else(bad)
    }
}

/// Reads a batch of records, each segment file opened once.
pub fn read_all(chunk: Vec<Pending>) -> Vec<(String, std::io::Result<Event>)> {
    let mut open: Option<(PathBuf, File)> = None;
    let mut out = Vec::with_capacity(chunk.len());
    for p in chunk {
        let result = (|| {
            if open.as_ref().is_none_or(|(path, _)| path != &p.path) {
                open = Some((p.path.clone(), File::open(&p.path)?));
            }
            let (_, f) = open.as_mut().expect("opened");
            p.read_from(f)
        })();
        out.push((p.id, result));
    }
    out
}

fn header(buf: &[u8]) -> Option<(u32, u32)> {
    let len = u32::from_le_bytes(buf.get(0..4)?.try_into().ok()?);
    let crc = u32::from_le_bytes(buf.get(4..8)?.try_into().ok()?);
    Some((len, crc))
}

/// The records of one segment file's contents, up to the first torn or corrupt one: (offset,
/// payload) of each, and the length of the valid prefix.
pub fn scan(data: &[u8]) -> (Vec<(u64, &[u8])>, usize) {
    let mut out = Vec::new();
    let mut at = 0usize;
    while let Some((len, crc)) = header(&data[at..]) {
        let len = len as usize;
        if len == 0 || len > MAX_RECORD || at + HEADER + len > data.len() {
            break;
        }
        let payload = &data[at + HEADER..at + HEADER + len];
        if crc32(payload) != crc {
            break;
        }
        out.push((at as u64, payload));
        at += HEADER + len;
    }
    (out, at)
}

/// One project's history.
pub struct History {
    dir: PathBuf,
    limits: Limits,
    segments: VecDeque<Segment>,
    entries: VecDeque<Entry>,
    /// How many entries left the front of `entries` (the position of `entries[0]` among all
    /// records this history indexed since it was opened).
    base: u64,
    bytes: u64,
    /// Ids at or below this were trimmed.
    floor: Option<String>,
    /// The segment being written (the last of `segments`), once opened for appends.
    file: Option<File>,
    /// Appended, not yet written to `file`.
    buffer: Vec<u8>,
    /// Bytes of the current segment known to be in its file (written by `flush`).
    written: u64,
    /// Files written since their last successful fsync (older segments handed over by
    /// `roll`, and the current one), with whether the directory needs one too.
    unsynced: Vec<File>,
    dirty: bool,
    dir_unsynced: bool,
    /// A write failed and the gap it left could not be recorded durably in `floor` yet: the
    /// change stream must not be acknowledged past it (see [`History::sync_job`]).
    gap_unrecorded: bool,
    /// The next segment number (never reused while the process runs, so a read handed out
    /// before a trim never reads another segment's record at the same offset).
    next_segment: u64,
    /// This boot's epoch (see [`History::epoch`]).
    epoch: u32,
    /// Trims whose files are still to be deleted (see [`History::trim_later`]).
    trims: Vec<TrimJob>,
    /// Tests: the next write stops after this many bytes and fails.
    #[cfg(test)]
    fail_write_after: Option<usize>,
    /// The floor as recorded on disk, shared with the jobs that write it outside the lock.
    floor_file: SharedFloor,
}

/// Fsyncs taken from a history under its lock and run without it (see [`History::sync_job`]).
pub struct SyncJob {
    files: Vec<File>,
    dir: Option<PathBuf>,
    /// The floor to record first, if a gap is not yet durably recorded.
    gap: Option<(PathBuf, SharedFloor, String)>,
    /// The newest id written when it was taken.
    last: Option<String>,
}

impl SyncJob {
    /// Runs the fsyncs (blocking). On failure, hand the job back with [`History::sync_failed`].
    pub fn run(&self) -> std::io::Result<()> {
        if let Some((dir, floor_file, id)) = &self.gap {
            write_floor_file(dir, floor_file, id)?;
        }
        for f in &self.files {
            f.sync_data()?;
        }
        if let Some(dir) = &self.dir {
            sync_dir(dir)?;
        }
        Ok(())
    }
}

/// Work to finish a trim outside the lock: record the floor durably, then delete the segments.
pub struct TrimJob {
    dir: PathBuf,
    floor_file: SharedFloor,
    floor: Option<String>,
    remove: Vec<PathBuf>,
}

impl TrimJob {
    /// Runs it (blocking). When the floor cannot be recorded the segments are kept (they are
    /// already out of the index; a restart reloads them, which is safe).
    pub fn run(self) -> std::io::Result<()> {
        if let Some(floor) = &self.floor {
            write_floor_file(&self.dir, &self.floor_file, floor)?;
        }
        for path in &self.remove {
            let _ = std::fs::remove_file(path);
        }
        Ok(())
    }

    pub fn is_empty(&self) -> bool {
        self.floor.is_none() && self.remove.is_empty()
    }
}

/// Writes `id` to `<dir>/floor` (fsync, rename, directory fsync) unless the floor on disk is
/// already at or past it; serialized by `recorded`, which holds what is on disk.
fn write_floor_file(
    dir: &Path,
    recorded: &std::sync::Mutex<Option<String>>,
    id: &str,
) -> std::io::Result<()> {
    let mut recorded = recorded.lock().expect("poisoned");
    if recorded.as_deref().is_some_and(|f| f >= id) {
        return Ok(());
    }
    let tmp = dir.join("floor.tmp");
    let mut f = OpenOptions::new()
        .create(true)
        .write(true)
        .truncate(true)
        .mode(0o600)
        .open(&tmp)?;
    f.write_all(id.as_bytes())?;
    f.sync_all()?;
    std::fs::rename(&tmp, dir.join("floor"))?;
    sync_dir(dir)?;
    *recorded = Some(id.to_string());
    Ok(())
}

/// Bits of a broadcast sequence number that hold the boot epoch (the rest count broadcasts).
pub const EPOCH_BITS: u32 = 12;
/// Broadcasts per event position and epoch.
pub const SEQ_MASK: u32 = (1 << (32 - EPOCH_BITS)) - 1;

fn create_dir(dir: &Path) -> std::io::Result<()> {
    std::fs::DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(dir)
}

fn sync_dir(dir: &Path) -> std::io::Result<()> {
    File::open(dir)?.sync_all()
}

impl History {
    fn segment_path(&self, no: u64) -> PathBuf {
        self.dir.join(format!("{no:016x}.seg"))
    }

    /// Opens (or creates) the history in `dir`: reloads its index, truncating a torn tail.
    pub fn open(dir: &Path, limits: Limits) -> std::io::Result<History> {
        create_dir(dir)?;
        let floor = match std::fs::read_to_string(dir.join("floor")) {
            Ok(s) if !s.trim().is_empty() => Some(s.trim().to_string()),
            Ok(_) => None,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => None,
            Err(e) => return Err(e),
        };
        let mut nos: Vec<u64> = std::fs::read_dir(dir)?
            .filter_map(|e| e.ok())
            .filter_map(|e| {
                let name = e.file_name().into_string().ok()?;
                u64::from_str_radix(name.strip_suffix(".seg")?, 16).ok()
            })
            .collect();
        nos.sort_unstable();
        // This boot's epoch: one more than any before, recorded before it is used.
        let epoch = match std::fs::read_to_string(dir.join("epoch")) {
            Ok(s) => s.trim().parse::<u32>().unwrap_or(0),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => 0,
            Err(e) => return Err(e),
        }
        .wrapping_add(1);
        write_small_file(dir, "epoch", &epoch.to_string())?;
        let mut h = History {
            dir: dir.to_path_buf(),
            limits,
            segments: VecDeque::new(),
            entries: VecDeque::new(),
            base: 0,
            bytes: 0,
            floor_file: Arc::new(std::sync::Mutex::new(floor.clone())),
            floor,
            file: None,
            buffer: Vec::new(),
            written: 0,
            unsynced: Vec::new(),
            dirty: false,
            dir_unsynced: false,
            gap_unrecorded: false,
            next_segment: nos.last().map_or(1, |n| n + 1),
            epoch,
            trims: Vec::new(),
            #[cfg(test)]
            fail_write_after: None,
        };
        // A damaged segment that is not the last: what followed its damage is lost, so the
        // next record kept becomes the floor (a resume from before it would pass over a hole).
        let mut hole = false;
        for no in nos {
            let path = h.segment_path(no);
            let data = std::fs::read(&path)?;
            let (records, valid) = scan(&data);
            let damaged = valid < data.len();
            if damaged {
                tracing::warn!(
                    path = %path.display(),
                    kept = valid,
                    dropped = data.len() - valid,
                    "realtime history: a torn or corrupt tail was truncated"
                );
                let f = OpenOptions::new().write(true).open(&path)?;
                f.set_len(valid as u64)?;
                f.sync_all()?;
            }
            let mut seg = Segment {
                no,
                count: 0,
                bytes: valid as u64,
                newest_ms: 0,
            };
            for (offset, payload) in records {
                let Some((id, at)) = record_key(payload) else {
                    continue;
                };
                if h.entries
                    .back()
                    .is_some_and(|e| e.id.as_str() >= id.as_str())
                    || h.floor.as_deref().is_some_and(|f| id.as_str() <= f)
                {
                    continue; // never out of order, never below the floor
                }
                if std::mem::take(&mut hole) {
                    tracing::warn!(
                        floor = id,
                        "realtime history: records were lost in an older segment; resumes from before the next one are refused"
                    );
                    h.write_floor(&id)?;
                    h.base += h.entries.len() as u64;
                    h.entries.clear();
                    for old in std::mem::take(&mut h.segments) {
                        let _ = std::fs::remove_file(h.segment_path(old.no));
                    }
                    h.bytes = 0;
                    seg.count = 0;
                    continue;
                }
                seg.count += 1;
                seg.newest_ms = seg.newest_ms.max(at);
                h.entries.push_back(Entry {
                    id: IndexId::new(&id),
                    seg: no,
                    offset,
                    len: (payload.len()) as u32,
                });
            }
            hole |= damaged;
            if seg.count == 0 {
                // Empty, or all at or below the floor (a crash between recording the floor and
                // deleting the segment): nothing to keep.
                let _ = std::fs::remove_file(&path);
                continue;
            }
            h.bytes += seg.bytes;
            h.segments.push_back(seg);
        }
        Ok(h)
    }

    /// This boot's epoch: a counter recorded (fsynced) when the history is opened, one more
    /// than the last boot's. Broadcast ids carry it, so one is never issued twice even when a
    /// power loss took the history's tail (see `next_broadcast_id`).
    pub fn epoch(&self) -> u32 {
        self.epoch
    }

    /// Moves to a new epoch (the broadcasts of this one ran out at some event position).
    pub fn next_epoch(&mut self) -> std::io::Result<u32> {
        let next = self.epoch.wrapping_add(1);
        write_small_file(&self.dir, "epoch", &next.to_string())?;
        self.epoch = next;
        Ok(next)
    }

    /// The newest retained id.
    pub fn last_id(&self) -> Option<&str> {
        self.entries.back().map(|e| e.id.as_str())
    }

    /// The newest id the history vouches for: its last record, or its floor when everything
    /// was trimmed (replays at or below it are not stored again).
    pub fn last_seen(&self) -> Option<&str> {
        match (self.last_id(), self.floor.as_deref()) {
            (Some(last), Some(floor)) => Some(last.max(floor)),
            (last, floor) => last.or(floor),
        }
    }

    /// An event could not be stored: a resume from before it must not pass over the gap, so
    /// the floor moves up to it.
    pub fn mark_gap(&mut self, id: &str) {
        if self.floor.as_deref().is_none_or(|f| id > f) {
            if let Err(e) = self.write_floor(id) {
                tracing::error!(error = %e, "realtime history: recording a gap (retried before the stream is acknowledged)");
                self.floor = Some(id.to_string());
                self.gap_unrecorded = true;
            }
        }
    }

    pub fn len(&self) -> usize {
        self.entries.len()
    }

    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }

    pub fn bytes(&self) -> u64 {
        self.bytes
    }

    /// Whether everything after `since` is retained (see the module docs). `None`: from the
    /// very beginning, which holds while nothing was ever trimmed.
    pub fn accepts(&self, since: Option<&str>) -> bool {
        match (since, &self.floor) {
            (None, floor) => floor.is_none(),
            (Some(since), Some(floor)) => since >= floor.as_str(),
            (Some(since), None) => self
                .entries
                .front()
                .is_some_and(|first| since >= first.id.as_str()),
        }
    }

    /// Up to `max` records and about `max_bytes` (at least one record) after `since` (from the
    /// beginning with `None`), to read without the lock.
    pub fn after(&self, since: Option<&str>, max: usize, max_bytes: u64) -> Vec<Pending> {
        let start = since.map_or(0, |s| self.entries.partition_point(|e| e.id.as_str() <= s));
        self.after_from(start, max, max_bytes)
    }

    /// [`History::after`], but the chunk ends at a multiple of `max` records (counted since
    /// the history was opened): readers at different positions then read the same chunks
    /// from the first boundary on, which they can share.
    pub fn after_aligned(&self, since: Option<&str>, max: usize, max_bytes: u64) -> Vec<Pending> {
        let start = since.map_or(0, |s| self.entries.partition_point(|e| e.id.as_str() <= s));
        let max = max.max(1);
        let at = (self.base + start as u64) % max as u64;
        self.after_from(start, max - at as usize, max_bytes)
    }

    fn after_from(&self, start: usize, max: usize, max_bytes: u64) -> Vec<Pending> {
        let mut bytes = 0u64;
        self.entries
            .range(start..)
            .take(max)
            .take_while(|e| {
                let first = bytes == 0;
                bytes += e.len as u64;
                first || bytes <= max_bytes
            })
            .map(|e| Pending {
                id: e.id.as_str().to_string(),
                path: self.segment_path(e.seg),
                offset: e.offset,
                len: e.len,
            })
            .collect()
    }

    /// Whether a record comes after `since`.
    pub fn has_after(&self, since: Option<&str>) -> bool {
        match since {
            None => !self.entries.is_empty(),
            Some(s) => self.last_id().is_some_and(|last| last > s),
        }
    }

    /// Appends an event (ids must increase); it is readable once [`History::flush`] ran.
    pub fn append(&mut self, event: &Event, now_ms: i64) -> std::io::Result<()> {
        if self.last_id().is_some_and(|l| event.id.as_str() <= l) {
            return Ok(());
        }
        let need_new = match self.segments.back() {
            None => true,
            Some(s) => {
                self.file.is_none()
                    || s.count >= self.limits.segment_events()
                    || s.bytes >= self.limits.segment_bytes()
            }
        };
        if need_new {
            self.roll()?;
        }
        // Encoded in place behind room for its header, which is filled in once its length and
        // checksum are known.
        let start = self.buffer.len();
        self.buffer.extend_from_slice(&[0; HEADER]);
        encode_record_into(&mut self.buffer, event, now_ms);
        let len = self.buffer.len() - start - HEADER;
        if len > MAX_RECORD {
            // It could not be read back: refused (the caller marks the gap).
            self.buffer.truncate(start);
            return Err(std::io::Error::new(
                std::io::ErrorKind::InvalidInput,
                format!("event {} is over {MAX_RECORD} bytes", event.id),
            ));
        }
        let crc = crc32(&self.buffer[start + HEADER..]);
        self.buffer[start..start + 4].copy_from_slice(&(len as u32).to_le_bytes());
        self.buffer[start + 4..start + HEADER].copy_from_slice(&crc.to_le_bytes());
        let seg = self.segments.back_mut().expect("rolled");
        let offset = seg.bytes;
        let size = (HEADER + len) as u64;
        seg.bytes += size;
        seg.count += 1;
        seg.newest_ms = seg.newest_ms.max(now_ms);
        self.bytes += size;
        self.entries.push_back(Entry {
            id: IndexId::new(&event.id),
            seg: seg.no,
            offset,
            len: len as u32,
        });
        Ok(())
    }

    /// Starts a new segment (the current one is written first; it and the directory are
    /// fsynced by the next [`History::sync_job`], outside the lock).
    fn roll(&mut self) -> std::io::Result<()> {
        self.flush()?;
        if let Some(f) = self.file.take() {
            if std::mem::take(&mut self.dirty) {
                self.unsynced.push(f);
            }
        }
        let no = self
            .next_segment
            .max(self.segments.back().map_or(1, |s| s.no + 1));
        self.next_segment = no + 1;
        let path = self.segment_path(no);
        let file = OpenOptions::new()
            .create(true)
            .append(true)
            .mode(0o600)
            .open(&path)?;
        let existing = file.metadata()?.len();
        self.dir_unsynced = true;
        self.written = existing;
        self.file = Some(file);
        self.segments.push_back(Segment {
            no,
            count: 0,
            bytes: existing,
            newest_ms: 0,
        });
        self.bytes += existing;
        Ok(())
    }

    /// Writes what was appended to the current segment (not fsynced).
    pub fn flush(&mut self) -> std::io::Result<()> {
        if self.buffer.is_empty() {
            return Ok(());
        }
        let file = self
            .file
            .as_mut()
            .expect("a buffer implies an open segment");
        #[cfg(test)]
        let result = match self.fail_write_after.take() {
            // A device that filled up part way through the write.
            Some(n) => file
                .write_all(&self.buffer[..n.min(self.buffer.len())])
                .and(Err(std::io::Error::other(
                    "injected: no space left on device",
                ))),
            None => file.write_all(&self.buffer),
        };
        #[cfg(not(test))]
        let result = file.write_all(&self.buffer);
        let len = self.buffer.len() as u64;
        self.buffer.clear();
        // A huge event's room is given back: each room keeps its buffer for life, and a 120 MB
        // row kept 120 MB per room after it was written (red team rt6 M1).
        self.buffer.shrink_to(BUFFER_KEPT);
        self.dirty = true;
        match result {
            Ok(()) => {
                self.written += len;
                Ok(())
            }
            Err(e) => {
                self.undo_unwritten();
                Err(e)
            }
        }
    }

    /// A write failed (ENOSPC, EIO): the file is cut back to what was known to be in it (no
    /// torn record stays mid-segment), the records that are not in it leave the index, the
    /// byte counts stay exact, the segment takes no more appends (the next one starts a new
    /// segment), and the floor moves past the lost records.
    fn undo_unwritten(&mut self) {
        let good = self.written;
        if let Some(f) = self.file.take() {
            if let Err(e) = f.set_len(good) {
                tracing::error!(error = %e, "realtime history: cutting a failed write back");
            }
            self.unsynced.push(f);
        }
        let Some(seg) = self.segments.back_mut() else {
            return;
        };
        let mut lost = None;
        while self
            .entries
            .back()
            .is_some_and(|e| e.seg == seg.no && e.offset >= good)
        {
            let e = self.entries.pop_back().expect("checked");
            seg.count -= 1;
            lost.get_or_insert_with(|| e.id.as_str().to_string());
        }
        self.bytes -= seg.bytes - good;
        seg.bytes = good;
        if let Some(id) = lost {
            tracing::error!(
                id,
                "realtime history: a write failed; resumes from before it are refused"
            );
            self.mark_gap(&id);
        }
    }

    /// The fsyncs that make everything written so far durable, to run without the lock
    /// ([`SyncJob::run`]); `None` when there is nothing to do. The change stream may be
    /// acknowledged up to what was written before it was taken once it succeeded; when it
    /// fails, [`History::sync_failed`] hands it back so the next one retries it.
    pub fn sync_job(&mut self) -> Option<SyncJob> {
        let mut files = std::mem::take(&mut self.unsynced);
        if std::mem::take(&mut self.dirty) {
            if let Some(f) = self.file.as_ref().and_then(|f| f.try_clone().ok()) {
                files.push(f);
            }
        }
        let dir = std::mem::take(&mut self.dir_unsynced).then(|| self.dir.clone());
        let gap = std::mem::take(&mut self.gap_unrecorded)
            .then(|| self.floor.clone())
            .flatten()
            .map(|f| (self.dir.clone(), self.floor_file.clone(), f));
        if files.is_empty() && dir.is_none() && gap.is_none() {
            return None;
        }
        Some(SyncJob {
            files,
            dir,
            gap,
            last: self.last_id().map(str::to_string),
        })
    }

    /// A sync job failed: what it was to make durable is still to be made durable (the next
    /// job retries it). As a failed fsync may have dropped the written pages (a retry can then
    /// succeed without them reaching the disk), the floor also moves to the newest id the job
    /// covered: a resume from before it is refused rather than possibly passing over a hole.
    pub fn sync_failed(&mut self, job: SyncJob) {
        if let Some(last) = &job.last {
            self.mark_gap(last);
        }
        self.unsynced.extend(job.files);
        self.dir_unsynced |= job.dir.is_some();
        self.gap_unrecorded |= job.gap.is_some();
    }

    /// [`History::trim_index`], its job kept for [`History::take_trims`].
    pub fn trim_later(&mut self, now_ms: i64) -> std::io::Result<()> {
        let (_, job) = self.trim_index(now_ms)?;
        if !job.is_empty() {
            self.trims.push(job);
        }
        Ok(())
    }

    /// The trims to finish outside the lock, in order.
    pub fn take_trims(&mut self) -> Vec<TrimJob> {
        std::mem::take(&mut self.trims)
    }

    /// Whether a write failed and its gap is not durably recorded yet.
    pub fn gap_unrecorded(&self) -> bool {
        self.gap_unrecorded
    }

    /// Deletes the oldest segments while the history is over its limits (blocking). Returns
    /// how many records went.
    pub fn trim(&mut self, now_ms: i64) -> std::io::Result<usize> {
        let (dropped, job) = self.trim_index(now_ms)?;
        job.run()?;
        Ok(dropped)
    }

    /// Drops the oldest segments from the index while the history is over its limits; the
    /// returned job records the floor and deletes their files, to run outside the lock.
    /// Returns how many records went.
    pub fn trim_index(&mut self, now_ms: i64) -> std::io::Result<(usize, TrimJob)> {
        let mut job = TrimJob {
            dir: self.dir.clone(),
            floor_file: self.floor_file.clone(),
            floor: None,
            remove: Vec::new(),
        };
        let mut dropped = 0;
        while let Some(oldest) = self.segments.front() {
            let is_current = self.segments.len() == 1;
            let too_old = oldest.count > 0 && now_ms - oldest.newest_ms > self.limits.age_ms;
            let over = self.entries.len() > self.limits.events || self.bytes > self.limits.bytes;
            if !(too_old || (over && !is_current)) {
                break;
            }
            if is_current {
                self.flush()?;
                self.file = None;
                self.dirty = false;
            }
            let seg = self.segments.pop_front().expect("checked");
            // Its entries are the first `count` of the index; the last of them is its newest.
            let mut last = None;
            for _ in 0..seg.count {
                last = self.entries.pop_front().map(|e| e.id);
                self.base += 1;
            }
            let last = last.map(|id| id.as_str().to_string());
            if let Some(last) = last {
                if self.floor.as_deref().is_none_or(|f| last.as_str() > f) {
                    self.floor = Some(last.clone());
                    job.floor = Some(last);
                }
            }
            self.bytes -= seg.bytes;
            dropped += seg.count;
            job.remove.push(self.segment_path(seg.no));
        }
        Ok((dropped, job))
    }

    fn write_floor(&mut self, id: &str) -> std::io::Result<()> {
        write_floor_file(&self.dir, &self.floor_file, id)?;
        self.floor = Some(id.to_string());
        Ok(())
    }
}

/// Writes a small file durably (temporary file, fsync, rename, directory fsync).
fn write_small_file(dir: &Path, name: &str, text: &str) -> std::io::Result<()> {
    let tmp = dir.join(format!("{name}.tmp"));
    let mut f = OpenOptions::new()
        .create(true)
        .write(true)
        .truncate(true)
        .mode(0o600)
        .open(&tmp)?;
    f.write_all(text.as_bytes())?;
    f.sync_all()?;
    std::fs::rename(&tmp, dir.join(name))?;
    sync_dir(dir)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn event(id: &str, body: &str) -> Event {
        Event {
            id: id.into(),
            kind: EventKind::Row {
                operation: RowOp::Insert,
            },
            schema: Some("public".into()),
            table: Some("t".into()),
            record: RowImage::Own(format!("{{\"b\":\"{body}\"}}")),
            old: RowImage::None,
            unchanged_toast: Vec::new(),
            too_large: Vec::new(),
            relation: None,
            row_key: None,
            commit_timestamp: "2026-01-01T00:00:00Z".into(),
            commit_lsn: Lsn(1),
            end_lsn: Lsn(2),
            last_in_transaction: true,
            payload: Arc::from(format!("{{\"id\":\"{id}\"}}")),
            sender: None,
            gap_before: false,
            payload_whole: false,
        }
    }

    fn id(i: u32) -> String {
        format!("{:016X}-{:08X}", 0x1000 + i as u64, 0)
    }

    #[test]
    fn a_huge_events_room_in_the_append_buffer_is_given_back_once_written() {
        let d = dir("huge-buffer");
        let mut h = History::open(&d, limits()).unwrap();
        let now = chrono::Utc::now().timestamp_millis();
        h.append(&event(&id(1), &"x".repeat(8 << 20)), now).unwrap();
        h.flush().unwrap();
        let kept = h.buffer.capacity();
        assert!(kept <= BUFFER_KEPT, "{kept} bytes kept");
        // The history still reads it and takes more.
        h.append(&event(&id(2), "small"), now).unwrap();
        h.flush().unwrap();
        assert_eq!(h.len(), 2);
        let _ = std::fs::remove_dir_all(&d);
    }

    /// A row change exactly as the change stream makes it (plain names): stored compactly.
    fn streamed(i: u32, op: RowOp, old: Option<&str>, toast: &[&str], last: bool) -> Event {
        let pending = crate::cdc::events::Pending::Row {
            operation: op,
            schema: "public".into(),
            table: "items".into(),
            record: format!(r#"{{"id":{i},"note":"a \"quoted\" ü\n"}}"#),
            old: old.map(str::to_string),
            unchanged_toast: toast.iter().map(|t| t.to_string()).collect(),
            too_large: Vec::new(),
            relation: Some(16_385),
            key: Some(format!(r#"{{"id":{i}}}"#)),
        };
        crate::cdc::events::finish(
            pending,
            Lsn(0x1000 + i as u64),
            Lsn(0x1000 + i as u64 + 0x80),
            0,
            &Arc::from("2026-12-06T04:25:07.123456Z"),
            last,
        )
    }

    fn streamed_cases() -> Vec<Event> {
        vec![
            streamed(1, RowOp::Insert, None, &[], true),
            streamed(
                2,
                RowOp::Update,
                Some(r#"{"id":2,"note":"before"}"#),
                &[],
                false,
            ),
            streamed(
                3,
                RowOp::Update,
                Some(r#"{"id":3}"#),
                &["big", "b\"ig"],
                true,
            ),
            streamed(4, RowOp::Delete, Some(r#"{"id":4}"#), &[], true),
        ]
    }

    #[test]
    fn a_streamed_row_change_is_its_payload_behind_a_binary_header() {
        for e in streamed_cases() {
            assert!(e.payload_whole);
            assert!(crate::cdc::events::payload_is_finished(&e), "{}", e.payload);
            let mut compact = Vec::new();
            encode_record_into(&mut compact, &e, -42);
            assert_eq!(compact[0], COMPACT_ROW);
            // The table's OID between the header and the payload.
            let head = COMPACT_HEADER + 4 * usize::from(e.relation.is_some());
            assert_eq!(compact.len(), head + e.payload.len());
            assert_eq!(&compact[head..], e.payload.as_bytes());
            let json = encode(&e, -42);
            assert!(
                json.len() > compact.len() + 100,
                "{} vs {}",
                json.len(),
                compact.len()
            );
            let mut back = decode(&compact).unwrap();
            assert!(back.row_key.is_none());
            back.row_key = e.row_key.clone();
            assert_eq!(fields(&back), fields(&e));
            assert_eq!(back.end_lsn, e.end_lsn);
            assert_eq!(record_key(&compact), Some((e.id.clone(), -42)));
            assert_eq!(record_key(&json), Some((e.id.clone(), -42)));
        }
        // Whatever the change stream does not vouch for keeps the JSON form, even in its
        // layout (events of other origins, a test's event changed after it was made).
        let mut other = streamed(5, RowOp::Insert, None, &[], true);
        other.payload_whole = false;
        let mut out = Vec::new();
        encode_record_into(&mut out, &other, 0);
        assert_eq!(out[0], b'{');
        assert_eq!(fields(&decode(&out).unwrap()), fields(&other));
        // Names that needed escaping: the stream does not vouch (the JSON form).
        let mut quoted = row_change();
        assert!(!quoted.payload_whole);
        quoted.row_key = None;
        out.clear();
        encode_record_into(&mut out, &quoted, 0);
        assert_eq!(out[0], b'{', "a name that needed escaping");
        assert_eq!(fields(&decode(&out).unwrap()), fields(&quoted));
        // A damaged header or payload decodes to nothing (its checksum caught it first on
        // disk; this is the cluster's or a test's bytes).
        let mut compact = Vec::new();
        encode_record_into(
            &mut compact,
            &streamed(7, RowOp::Insert, None, &[], true),
            0,
        );
        let mut bad = compact.clone();
        bad[1] = 4;
        assert!(decode(&bad).is_none());
        assert!(decode(&compact[..COMPACT_HEADER - 1]).is_none());
        // Flagged with an OID but cut before it.
        assert!(decode(&compact[..COMPACT_HEADER + 3]).is_none());
        assert!(decode(&compact[..compact.len() - 1]).is_none());
    }

    /// A segment as main's encoder (the JSON form, before the compact one) wrote it.
    fn json_segment(events: &[Event], at_ms: i64) -> Vec<u8> {
        let mut out = Vec::new();
        for e in events {
            let record = encode(e, at_ms);
            out.extend_from_slice(&(record.len() as u32).to_le_bytes());
            out.extend_from_slice(&crc32(&record).to_le_bytes());
            out.extend_from_slice(&record);
        }
        out
    }

    #[test]
    fn a_history_written_before_the_compact_form_reads_on_after_the_upgrade() {
        let d = dir("upgrade");
        create_dir(&d).unwrap();
        let old: Vec<Event> = streamed_cases();
        let now = chrono::Utc::now().timestamp_millis();
        std::fs::write(d.join(format!("{:016x}.seg", 1)), json_segment(&old, now)).unwrap();
        let mut h = History::open(&d, limits()).unwrap();
        assert_eq!(h.len(), old.len());
        assert_eq!(h.last_id(), Some(old[3].id.as_str()));
        // New records after them (in the next segment: an opened history appends to a new
        // one): compact.
        let new: Vec<Event> = (10..14)
            .map(|i| streamed(i, RowOp::Insert, None, &[], i % 2 == 0))
            .collect();
        for e in &new {
            h.append(e, now).unwrap();
        }
        h.flush().unwrap();
        drop(h);
        let mut forms = Vec::new();
        for no in [1, 2] {
            let data = std::fs::read(d.join(format!("{no:016x}.seg"))).unwrap();
            let (records, valid) = scan(&data);
            assert_eq!(valid, data.len());
            forms.extend(records.iter().map(|(_, r)| r[0]));
        }
        assert_eq!(forms, [b'{', b'{', b'{', b'{', 1, 1, 1, 1]);
        // Both forms index on open, resume from anywhere, read back whole, and age by their
        // stored time.
        let h = History::open(&d, limits()).unwrap();
        assert_eq!(h.len(), 8);
        let all: Vec<&Event> = old.iter().chain(&new).collect();
        for from in 0..all.len() {
            let since = (from > 0).then(|| all[from - 1].id.as_str());
            assert!(h.accepts(since) || since.is_none());
            let got: Vec<Event> = h
                .after(since, 100, u64::MAX)
                .iter()
                .map(|p| p.read().unwrap())
                .collect();
            assert_eq!(got.len(), all.len() - from);
            for (g, want) in got.iter().zip(&all[from..]) {
                // Everything but the key only webhook ordering reads (never stored).
                assert!(g.row_key.is_none());
                assert_eq!(fields(g), fields(want));
                assert_eq!(g.end_lsn, want.end_lsn);
            }
        }
        let mut h = History::open(
            &d,
            Limits {
                age_ms: 10,
                ..limits()
            },
        )
        .unwrap();
        h.trim(now + 5).unwrap();
        assert_eq!(h.len(), 8, "nothing is older than 10 ms at `now + 5`");
        h.trim(now + 11).unwrap();
        assert!(h.is_empty());
        let _ = std::fs::remove_dir_all(&d);
    }

    #[test]
    fn crc32_is_the_ieee_checksum_at_every_length_and_alignment() {
        assert_eq!(crc32(b"123456789"), 0xCBF4_3926);
        assert_eq!(crc32(b""), 0);
        // Against the byte-at-a-time definition, across the 8-byte boundaries.
        let bytewise = |data: &[u8]| {
            let mut c = !0u32;
            for &b in data {
                c ^= b as u32;
                for _ in 0..8 {
                    c = if c & 1 != 0 {
                        0xEDB8_8320 ^ (c >> 1)
                    } else {
                        c >> 1
                    };
                }
            }
            !c
        };
        let data: Vec<u8> = (0..300u32).map(|i| (i * 7 + i / 5) as u8).collect();
        for start in 0..9 {
            for end in start..data.len() {
                assert_eq!(crc32(&data[start..end]), bytewise(&data[start..end]));
            }
        }
    }

    fn fields(e: &Event) -> impl PartialEq + std::fmt::Debug {
        (
            (
                e.id.clone(),
                e.kind.clone(),
                e.schema.clone(),
                e.table.clone(),
            ),
            (
                e.record().map(str::to_string),
                e.old().map(str::to_string),
                e.unchanged_toast.clone(),
                e.too_large.clone(),
                e.relation,
            ),
            (e.commit_timestamp.clone(), e.commit_lsn, e.end_lsn),
            (e.last_in_transaction, e.payload.to_string()),
        )
    }

    /// A row change as the change stream makes it: its payload holds the record and old row.
    fn row_change() -> Event {
        let pending = crate::cdc::events::Pending::Row {
            operation: RowOp::Update,
            schema: "public".into(),
            table: "t \"q\"".into(),
            record: r#"{"id":1,"note":"a \"quoted\" ü"}"#.into(),
            old: Some(r#"{"id":1,"note":"before"}"#.into()),
            unchanged_toast: vec!["big".into()],
            too_large: Vec::new(),
            relation: Some(16_385),
            key: None,
        };
        crate::cdc::events::finish(
            pending,
            Lsn(0x10),
            Lsn(0x20),
            3,
            &Arc::from("2026-01-01T00:00:00Z"),
            true,
        )
    }

    #[test]
    fn a_row_change_is_stored_once_and_reads_back_whole() {
        let e = row_change();
        let bytes = encode(&e, 42);
        let text = std::str::from_utf8(&bytes).unwrap();
        // The payload verbatim, and its rows nowhere else.
        assert!(text.ends_with(&format!(",\"P\":{}}}", e.payload)), "{text}");
        assert_eq!(text.matches("before").count(), 1, "{text}");
        assert_eq!(fields(&decode(&bytes).unwrap()), fields(&e));
        // Without an old row.
        let mut insert = row_change();
        insert.old = RowImage::None;
        insert.payload = Arc::from(
            insert
                .payload
                .replace(r#"{"id":1,"note":"before"}"#, "null"),
        );
        assert_eq!(
            fields(&decode(&encode(&insert, 1)).unwrap()),
            fields(&insert)
        );
    }

    #[test]
    fn the_hand_written_fields_are_what_serde_writes() {
        let mut cases = vec![row_change(), event(&id(1), "x")];
        let mut odd = row_change();
        odd.id = "a \"quoted\" id\\".into();
        odd.schema = Some("sch\u{1}ema".into());
        odd.table = None;
        odd.commit_timestamp = "t\"s".into();
        odd.last_in_transaction = false;
        odd.commit_lsn = Lsn(u64::MAX);
        cases.push(odd);
        let mut toast = event(&id(2), "y");
        toast.unchanged_toast = vec!["a".into(), "b\"c".into()];
        cases.push(toast);
        for e in &cases {
            for rows in [None, Some((e.record(), e.old()))] {
                for ((k, n), at) in [('r', "UPDATE"), ('s', "ALTER \"x\""), ('b', "é")]
                    .into_iter()
                    .zip([-7, 0, 1_764_979_200_123])
                    .chain([(('r', "INSERT"), i64::MIN), (('r', "DELETE"), i64::MAX)])
                {
                    let mut hand = Vec::new();
                    write_stored(&mut hand, at, e, k, n, rows);
                    let (r, o) = rows.unwrap_or((None, None));
                    let mut serde = serde_json::to_vec(&StoredRef {
                        at,
                        id: &e.id,
                        k,
                        n,
                        s: e.schema.as_deref(),
                        t: e.table.as_deref(),
                        r,
                        o,
                        u: &e.unchanged_toast,
                        x: &e.too_large,
                        q: e.relation,
                        ts: &e.commit_timestamp,
                        c: e.commit_lsn.0,
                        e: e.end_lsn.0,
                        l: e.last_in_transaction,
                    })
                    .unwrap();
                    assert_eq!(serde.pop(), Some(b'}'));
                    assert_eq!(
                        String::from_utf8(hand).unwrap(),
                        String::from_utf8(serde).unwrap()
                    );
                }
            }
        }
    }

    #[test]
    fn rows_the_payload_does_not_hold_and_other_events_are_stored_as_given() {
        // The payload lacks the record (the tests' events): stored beside it.
        let e = event(&id(1), "x");
        assert_eq!(fields(&decode(&encode(&e, 0)).unwrap()), fields(&e));
        let mut schema = event(&id(2), "x");
        schema.kind = EventKind::Schema {
            command: "ALTER TABLE".into(),
        };
        schema.record = RowImage::None;
        assert_eq!(
            fields(&decode(&encode(&schema, 0)).unwrap()),
            fields(&schema)
        );
        // A payload that is not JSON: the older form, which takes any text.
        let mut odd = event(&id(3), "x");
        odd.payload = Arc::from("not json \"");
        let bytes = encode(&odd, 0);
        assert!(std::str::from_utf8(&bytes)
            .unwrap()
            .contains(r#""p":"not json \"""#));
        assert_eq!(fields(&decode(&bytes).unwrap()), fields(&odd));
    }

    #[test]
    fn records_of_the_older_form_still_read() {
        let e = row_change();
        let mut older = Vec::new();
        encode_as_string(&mut older, &e, 42, 'r', "UPDATE");
        assert!(std::str::from_utf8(&older).unwrap().contains(r#""p":"{"#));
        assert_eq!(fields(&decode(&older).unwrap()), fields(&e));
    }

    fn limits() -> Limits {
        Limits {
            events: 1000,
            age_ms: 3_600_000,
            bytes: 1 << 30,
        }
    }

    fn dir(name: &str) -> PathBuf {
        let d = std::env::temp_dir().join(format!(
            "fluxbase-history-{name}-{}-{}",
            std::process::id(),
            std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .unwrap()
                .as_nanos()
        ));
        let _ = std::fs::remove_dir_all(&d);
        d
    }

    fn on_disk(d: &Path) -> u64 {
        std::fs::read_dir(d)
            .unwrap()
            .filter_map(|e| e.ok())
            .filter(|e| e.file_name().to_string_lossy().ends_with(".seg"))
            .map(|e| e.metadata().unwrap().len())
            .sum()
    }

    #[test]
    fn a_failed_write_is_cut_back_leaves_the_index_and_raises_the_floor() {
        let d = dir("failed-write");
        let mut h = History::open(&d, limits()).unwrap();
        for i in 1..=3 {
            h.append(&event(&id(i), "x"), 0).unwrap();
        }
        h.flush().unwrap();
        let good = on_disk(&d);
        assert_eq!(h.bytes(), good);
        h.append(&event(&id(4), "x"), 0).unwrap();
        h.append(&event(&id(5), "x"), 0).unwrap();
        // ENOSPC after part of record 4: a torn record would sit mid-segment.
        h.fail_write_after = Some(HEADER + 5);
        assert!(h.flush().is_err());
        assert_eq!(h.len(), 3, "the unwritten records left the index");
        assert_eq!(h.last_id(), Some(id(3).as_str()));
        assert_eq!(
            on_disk(&d),
            good,
            "the file was cut back to its last whole record"
        );
        assert_eq!(h.bytes(), good, "the byte count stays exact");
        // A resume from before the lost records must not pass over them.
        assert!(!h.accepts(Some(&id(3))));
        assert!(!h.accepts(Some(&id(4))));
        assert!(h.accepts(Some(&id(5))));
        assert!(!h.gap_unrecorded(), "the floor was recorded durably");
        // Appends continue (in a new segment) and everything reads back after a restart.
        h.append(&event(&id(6), "after"), 0).unwrap();
        h.flush().unwrap();
        assert_eq!(h.bytes(), on_disk(&d));
        let got: Vec<String> = h
            .after(None, 100, u64::MAX)
            .iter()
            .map(|p| p.read().unwrap().id)
            .collect();
        assert_eq!(got, vec![id(1), id(2), id(3), id(6)]);
        drop(h);
        let h = History::open(&d, limits()).unwrap();
        // What is at or below the floor can serve no resume: not reloaded.
        assert_eq!(h.len(), 1);
        assert_eq!(h.last_id(), Some(id(6).as_str()));
        assert!(!h.accepts(Some(&id(3))), "the floor survives a restart");
        assert_eq!(h.after(Some(&id(5)), 10, u64::MAX).len(), 1);
        let _ = std::fs::remove_dir_all(&d);
    }

    #[test]
    fn a_failed_fsync_is_retried_by_the_next_job() {
        let d = dir("failed-sync");
        let mut h = History::open(&d, limits()).unwrap();
        h.append(&event(&id(1), "x"), 0).unwrap();
        h.flush().unwrap();
        let job = h.sync_job().expect("something to sync");
        assert!(!job.files.is_empty());
        // The fsync failed: nothing may count as durable, the next job syncs it again, and a
        // resume from before what it covered is refused.
        assert!(h.accepts(None));
        h.sync_failed(job);
        assert!(!h.accepts(None));
        assert!(h.accepts(Some(&id(1))));
        let again = h.sync_job().expect("the failed fsync is retried");
        assert!(!again.files.is_empty());
        again.run().unwrap();
        assert!(h.sync_job().is_none(), "nothing left once it succeeded");
        // A roll hands the old segment over instead of fsyncing it under the lock.
        let mut h = History::open(
            &d,
            Limits {
                events: 16,
                ..limits()
            },
        )
        .unwrap();
        h.append(&event(&id(2), "x"), 0).unwrap();
        h.append(&event(&id(3), "x"), 0).unwrap();
        h.flush().unwrap();
        let job = h.sync_job().unwrap();
        assert_eq!(
            job.files.len(),
            2,
            "the rolled-over segment and the current one"
        );
        assert!(job.dir.is_some(), "and the directory (new segment files)");
        let _ = std::fs::remove_dir_all(&d);
    }

    #[test]
    fn damage_in_an_older_segment_raises_the_floor_past_the_hole() {
        let d = dir("older-damage");
        let l = Limits {
            events: 16, // one record per segment
            ..limits()
        };
        let mut h = History::open(&d, l).unwrap();
        for i in 1..=5 {
            h.append(&event(&id(i), "x"), 0).unwrap();
        }
        h.flush().unwrap();
        drop(h);
        let second = d.join(format!("{:016x}.seg", 2));
        let mut data = std::fs::read(&second).unwrap();
        data[HEADER + 3] ^= 0x55;
        std::fs::write(&second, &data).unwrap();
        let h = History::open(&d, l).unwrap();
        assert!(!h.accepts(Some(&id(1))), "a resume from 1 would miss 2");
        assert!(h.accepts(Some(&id(3))));
        let got: Vec<String> = h
            .after(Some(&id(3)), 10, u64::MAX)
            .iter()
            .map(|p| p.read().unwrap().id)
            .collect();
        assert_eq!(got, vec![id(4), id(5)]);
        drop(h);
        let h = History::open(&d, l).unwrap();
        assert!(!h.accepts(Some(&id(1))), "durably");
        let _ = std::fs::remove_dir_all(&d);
    }

    #[test]
    fn a_read_checks_the_id_and_segment_numbers_are_not_reused() {
        let d = dir("reuse");
        let mut h = History::open(&d, limits()).unwrap();
        h.append(&event(&id(1), "x"), 0).unwrap();
        h.flush().unwrap();
        let stale = h.after(None, 1, u64::MAX).remove(0);
        // Age trim empties the history; the next append must not reuse segment 1.
        h.trim(i64::MAX / 2).unwrap();
        assert!(h.is_empty());
        h.append(&event(&id(2), "x"), 0).unwrap();
        h.flush().unwrap();
        assert!(!d.join(format!("{:016x}.seg", 1)).exists());
        assert!(d.join(format!("{:016x}.seg", 2)).exists());
        drop(h);
        // Another process reused the number: same place, same length, another record.
        let _ = std::fs::remove_dir_all(&d);
        let mut h = History::open(&d, limits()).unwrap();
        h.append(&event(&id(9), "x"), 0).unwrap();
        h.flush().unwrap();
        assert!(stale.read().is_err(), "a read of another record is refused");
        let _ = std::fs::remove_dir_all(&d);
    }

    #[test]
    fn ids_of_any_shape_index_in_text_order() {
        // The change stream's ids are kept inline, any other on the heap: one order.
        assert!(matches!(IndexId::new(&id(1)), IndexId::Inline(_)));
        assert!(matches!(IndexId::new("short"), IndexId::Heap(_)));
        assert!(matches!(
            IndexId::new("ü000000000000000-0000000"),
            IndexId::Heap(_)
        ));
        let d = dir("id-shapes");
        let ids = [
            "0".to_string(),
            id(1),
            format!("{}0", id(1)),
            id(2),
            "1".to_string(),
        ];
        let mut h = History::open(&d, limits()).unwrap();
        for i in &ids {
            h.append(&event(i, "x"), 0).unwrap();
        }
        // Not after the last: ignored.
        h.append(&event(&id(3), "x"), 0).unwrap();
        h.flush().unwrap();
        assert_eq!(h.len(), ids.len());
        assert_eq!(h.last_id(), Some("1"));
        for (n, since) in ids.iter().enumerate() {
            let got: Vec<String> = h
                .after(Some(since), 100, u64::MAX)
                .iter()
                .map(|p| p.read().unwrap().id)
                .collect();
            assert_eq!(got, ids[n + 1..].to_vec(), "after {since}");
        }
        drop(h);
        let h = History::open(&d, limits()).unwrap();
        assert_eq!(h.len(), ids.len());
        assert!(h.accepts(Some(&id(1))));
        let _ = std::fs::remove_dir_all(&d);
    }

    #[test]
    fn each_open_is_a_new_epoch() {
        let d = dir("epoch");
        let a = History::open(&d, limits()).unwrap().epoch();
        let b = History::open(&d, limits()).unwrap().epoch();
        assert!(b > a);
        let mut h = History::open(&d, limits()).unwrap();
        let c = h.epoch();
        assert_eq!(h.next_epoch().unwrap(), c + 1);
        drop(h);
        assert!(History::open(&d, limits()).unwrap().epoch() > c + 1);
        let _ = std::fs::remove_dir_all(&d);
    }

    #[test]
    fn crc32_matches_the_standard_check_value() {
        assert_eq!(crc32(b"123456789"), 0xCBF4_3926);
    }

    #[test]
    fn a_torn_tail_is_truncated_and_appends_continue_after_the_last_whole_record() {
        let d = dir("torn");
        let mut h = History::open(&d, limits()).unwrap();
        for i in 1..=5 {
            h.append(&event(&id(i), "x"), 0).unwrap();
        }
        h.flush().unwrap();
        drop(h);
        let seg = d.join(format!("{:016x}.seg", 1));
        let whole = std::fs::read(&seg).unwrap();
        // A crash mid-write: the last record is cut short.
        std::fs::write(&seg, &whole[..whole.len() - 7]).unwrap();
        let h = History::open(&d, limits()).unwrap();
        assert_eq!(h.len(), 4);
        assert_eq!(h.last_id(), Some(id(4).as_str()));
        let trimmed = std::fs::metadata(&seg).unwrap().len() as usize;
        assert!(trimmed < whole.len() - 7, "the torn record was truncated");
        // A flipped byte in a record's payload: its checksum fails, it and what follows go.
        let mut data = std::fs::read(&seg).unwrap();
        let (records, _) = scan(&data);
        let third = records[2].0 as usize;
        data[third + HEADER + 3] ^= 0x55;
        drop(h);
        std::fs::write(&seg, &data).unwrap();
        let mut h = History::open(&d, limits()).unwrap();
        assert_eq!(h.last_id(), Some(id(2).as_str()));
        h.append(&event(&id(3), "again"), 0).unwrap();
        h.flush().unwrap();
        drop(h);
        let h = History::open(&d, limits()).unwrap();
        let got: Vec<String> = h
            .after(None, 100, u64::MAX)
            .iter()
            .map(|p| p.read().unwrap().record().unwrap().to_string())
            .collect();
        assert_eq!(got.len(), 3);
        assert_eq!(got[2], "{\"b\":\"again\"}");
        let _ = std::fs::remove_dir_all(&d);
    }

    #[test]
    fn retention_trims_whole_segments_and_a_position_before_them_is_too_old() {
        let d = dir("trim");
        let l = Limits {
            events: 32,
            ..limits()
        };
        let mut h = History::open(&d, l).unwrap();
        assert!(!h.accepts(Some(&id(0))), "nothing stored yet");
        for i in 1..=40 {
            h.append(&event(&id(i), "x"), 0).unwrap();
            h.flush().unwrap();
            h.trim(0).unwrap();
        }
        assert!(h.len() <= 32 && h.len() >= 30, "{}", h.len());
        let first_kept = h.after(None, 1, u64::MAX)[0].id.clone();
        assert!(h.accepts(Some(&first_kept)));
        assert!(!h.accepts(Some(&id(1))));
        assert!(!h.accepts(None));
        // The floor survives a restart.
        drop(h);
        let h = History::open(&d, l).unwrap();
        assert!(!h.accepts(Some(&id(1))));
        assert_eq!(h.after(Some(&id(38)), 10, u64::MAX).len(), 2);
        // A byte bound: at least one record, then as many as fit.
        assert_eq!(h.after(Some(&id(30)), 10, 1).len(), 1);
        let one = h.after(Some(&id(30)), 1, u64::MAX)[0].len as u64;
        assert_eq!(h.after(Some(&id(30)), 10, 3 * one).len(), 3);
        // Age: everything older than the limit goes, the floor moves to the newest id.
        let mut h = History::open(&d, Limits { age_ms: 10, ..l }).unwrap();
        h.trim(1000).unwrap();
        assert!(h.is_empty());
        assert!(h.accepts(Some(&id(40))));
        assert!(!h.accepts(Some(&id(39))));
        let _ = std::fs::remove_dir_all(&d);
    }
}
