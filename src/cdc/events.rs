//! Turning decoded pgoutput changes into the guide's event payloads.
//!
//! A change becomes a [`Pending`] event as soon as it arrives (its JSON parts rendered with the
//! value codec shared with `/api/execute-sql`); the id, commit time and LSN are added when its
//! transaction commits, giving the final payloads:
//!
//! ```text
//! db_event      {id, operation, schema, table, record, old, commitTimestamp, lsn, unchangedToast?}
//! schema_update {id, event_type:"schema_update", command, objectType, schema, table, object,
//!                partition?, commitTimestamp, lsn}
//! ```
//!
//! Every channel renders a row change from the same [`Event`] fields (`record`, `old`,
//! `unchanged_toast`), and what a row change says beyond its rows is written by one function,
//! [`write_row_notes`], for the WebSocket payload and the webhook's `data` alike. Object names
//! follow PostgreSQL's quoting in every event (see [`super::names`]).

use std::sync::Arc;

use fluxbase_replication::pgoutput::{self, Lsn, OldTuple, Relation, Tuple};
use fluxbase_replication::values::{self, TypeRegistry};
use serde::{Deserialize, Serialize};

use super::names;
use crate::bus::{Event, EventKind, RowImage, RowOp};

/// A change whose transaction has not committed yet. Serializable so that large transactions
/// can be spilled to disk.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub enum Pending {
    Row {
        operation: RowOp,
        /// Shared by every change of the table ([`Table`]): no copy per event.
        #[serde(with = "shared_str")]
        schema: Arc<str>,
        #[serde(with = "shared_str")]
        table: Arc<str>,
        /// JSON object text.
        record: String,
        old: Option<String>,
        /// Columns whose unchanged TOASTed value PostgreSQL did not send (no full old row).
        unchanged_toast: Vec<String>,
        /// Columns left out of `record` and `old` because the row image would pass
        /// `cdc_max_row_bytes` with them ([`left_out`]).
        #[serde(default)]
        too_large: Vec<String>,
        /// The table's OID ([`crate::bus::Event::relation`]).
        #[serde(default)]
        relation: Option<u32>,
        /// The row's replica identity key ([`identity_key`]), for webhook ordering.
        #[serde(default)]
        key: Option<String>,
    },
    Schema {
        command: String,
        object_type: String,
        schema: Option<String>,
        table: Option<String>,
        object: Option<String>,
        /// A TRUNCATE of a partition: the partition; `schema` and `table` name its root, as
        /// the partition's row changes do.
        #[serde(default)]
        partition: Option<PartitionName>,
    },
    /// `realtime.broadcast(event, payload)` from SQL; `payload` is JSON text.
    Broadcast { event: String, payload: String },
}

/// `Arc<str>` as a plain string in a spilled transaction (serde's `rc` feature is not on).
mod shared_str {
    use std::sync::Arc;

    use serde::{Deserialize, Deserializer, Serializer};

    pub fn serialize<S: Serializer>(s: &Arc<str>, ser: S) -> Result<S::Ok, S::Error> {
        ser.serialize_str(s)
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(de: D) -> Result<Arc<str>, D::Error> {
        String::deserialize(de).map(Arc::from)
    }
}

/// A relation as the change stream knows it: pgoutput's description, and its names made once
/// and shared by every event of the table (two allocations and copies less per row change).
#[derive(Debug, Clone)]
pub struct Table {
    pub rel: Relation,
    pub schema: Arc<str>,
    pub name: Arc<str>,
    /// What the row bound needs of the columns, made once ([`left_out`]).
    sizing: Sizing,
    /// Per column, made once: its name as a JSON object's key (`"name":`) and how its values
    /// are written (a built-in type's category looked up once, not per value).
    columns: Vec<(String, values::ColumnWriter)>,
}

/// Per column: the bytes its name takes in a row's JSON (`"name":` and a comma), and how its
/// value's JSON is measured (as a string of its text, or by the renderer's count); whether any
/// column can take more than six bytes per byte of its text (a composite: its attributes'
/// names are written per value).
#[derive(Debug, Clone, Default)]
struct Sizing {
    names: Vec<usize>,
    names_total: usize,
    as_string: Vec<bool>,
    any_composite: bool,
}

impl Table {
    /// `reg` knows the relation's types (learned before its Relation message is handled).
    pub fn new(rel: Relation, reg: &TypeRegistry) -> Table {
        let names: Vec<usize> = rel
            .columns
            .iter()
            .map(|c| json_len(c.name.as_bytes()) + 2)
            .collect();
        let sizing = Sizing {
            names_total: names.iter().sum(),
            names,
            as_string: rel
                .columns
                .iter()
                .map(|c| values::renders_as_string(c.type_id, reg))
                .collect(),
            any_composite: rel
                .columns
                .iter()
                .any(|c| !values::renders_within_six_times(c.type_id, reg)),
        };
        let columns = rel
            .columns
            .iter()
            .map(|c| {
                let mut key = String::with_capacity(c.name.len() + 3);
                quote(&mut key, &c.name);
                key.push(':');
                (key, values::ColumnWriter::new(c.type_id))
            })
            .collect();
        Table {
            schema: Arc::from(rel.namespace.as_str()),
            name: Arc::from(rel.name.as_str()),
            rel,
            sizing,
            columns,
        }
    }
}

/// A partition named in a TRUNCATE event (unquoted parts).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PartitionName {
    pub schema: String,
    pub table: String,
}

impl Pending {
    /// Approximate memory held, for the transaction buffer's bound.
    pub fn size(&self) -> usize {
        match self {
            Pending::Row {
                record,
                old,
                schema,
                table,
                ..
            } => {
                64 + record.len() + old.as_ref().map_or(0, String::len) + schema.len() + table.len()
            }
            Pending::Schema { .. } => 256,
            Pending::Broadcast { event, payload } => 64 + event.len() + payload.len(),
        }
    }
}

fn quote(out: &mut String, s: &str) {
    // Names and ids seldom need escaping: then the text goes in as it is, without serde_json's
    // String per call (one per column of every row).
    if s.bytes().all(|b| b >= 0x20 && b != b'"' && b != b'\\') {
        out.reserve(s.len() + 2);
        out.push('"');
        out.push_str(s);
        out.push('"');
    } else {
        out.push_str(&serde_json::to_string(s).expect("strings serialize"));
    }
}

/// A column's text value: as it is when it is UTF-8 (the database's encoding always is), else
/// with replacement characters.
fn text_of(bytes: &[u8]) -> std::borrow::Cow<'_, str> {
    match std::str::from_utf8(bytes) {
        Ok(text) => std::borrow::Cow::Borrowed(text),
        Err(_) => String::from_utf8_lossy(bytes),
    }
}

/// Room for a tuple's JSON object: names, values and punctuation, so that the object is
/// written without growing (a value's JSON is about its text's length).
fn tuple_capacity(rel: &Relation, tuple: &Tuple) -> usize {
    let values: usize = tuple
        .0
        .iter()
        .map(|v| match v {
            pgoutput::Column::Text(b) | pgoutput::Column::Binary(b) => b.len() + b.len() / 8,
            _ => 4,
        })
        .sum();
    let names: usize = rel.columns.iter().map(|c| c.name.len() + 4).sum();
    16 + values + names
}

/// Renders a tuple as a JSON object. `old` fills unchanged TOAST values when it has them;
/// otherwise such columns are left out and named in the returned list.
pub fn tuple_json(
    table: &Table,
    tuple: &Tuple,
    old: Option<&Tuple>,
    reg: &TypeRegistry,
    omit: &[bool],
) -> (String, Vec<String>) {
    let rel = &table.rel;
    let mut out = String::with_capacity(tuple_capacity(rel, tuple));
    let mut missing = Vec::new();
    out.push('{');
    let mut first = true;
    for (i, ((col, (key, writer)), value)) in rel
        .columns
        .iter()
        .zip(&table.columns)
        .zip(tuple.0.iter())
        .enumerate()
    {
        if omit.get(i).copied().unwrap_or(false) {
            continue;
        }
        let value = match value {
            pgoutput::Column::UnchangedToast => match old.and_then(|o| o.0.get(i)) {
                Some(v @ (pgoutput::Column::Text(_) | pgoutput::Column::Null)) => v,
                _ => {
                    missing.push(col.name.clone());
                    continue;
                }
            },
            v => v,
        };
        if !first {
            out.push(',');
        }
        first = false;
        out.push_str(key);
        match value {
            pgoutput::Column::Null => out.push_str("null"),
            pgoutput::Column::Text(bytes) => writer.write(&mut out, &text_of(bytes), reg),
            // Binary mode is never requested; render defensively as a string.
            pgoutput::Column::Binary(bytes) => {
                quote(&mut out, &format!("\\x{}", hex::encode(bytes)))
            }
            pgoutput::Column::UnchangedToast => out.push_str("null"),
        }
    }
    out.push('}');
    (out, missing)
}

/// An old key tuple carries only the replica identity's columns: render just those.
pub fn key_json(table: &Table, tuple: &Tuple, reg: &TypeRegistry) -> String {
    let mut out = String::from("{");
    let mut first = true;
    for ((col, (key, writer)), value) in table
        .rel
        .columns
        .iter()
        .zip(&table.columns)
        .zip(tuple.0.iter())
    {
        if !col.is_key {
            continue;
        }
        if !first {
            out.push(',');
        }
        first = false;
        out.push_str(key);
        match value {
            pgoutput::Column::Text(bytes) => writer.write(&mut out, &text_of(bytes), reg),
            _ => out.push_str("null"),
        }
    }
    out.push('}');
    out
}

/// The row's key as a JSON object of its replica identity columns (`{"id":1}`), when the table
/// has a key that names the row: `REPLICA IDENTITY DEFAULT` with a primary key, or `USING
/// INDEX`. `None` for `FULL` (every column is "key" there, and a whole row changes with every
/// update), `NOTHING`, a table without a primary key, or a key value PostgreSQL did not send
/// (an unchanged TOASTed key column): webhook ordering then orders the table's changes as one
/// row.
pub fn identity_key(table: &Table, tuple: &Tuple, reg: &TypeRegistry) -> Option<String> {
    use pgoutput::ReplicaIdentity;
    let rel = &table.rel;
    if !matches!(
        rel.replica_identity,
        ReplicaIdentity::Default | ReplicaIdentity::Index
    ) {
        return None;
    }
    let mut any = false;
    for (col, value) in rel.columns.iter().zip(tuple.0.iter()) {
        if col.is_key {
            if !matches!(value, pgoutput::Column::Text(_) | pgoutput::Column::Null) {
                return None;
            }
            any = true;
        }
    }
    any.then(|| key_json(table, tuple, reg))
}

pub fn insert(table: &Table, new: &Tuple, reg: &TypeRegistry, cap: usize) -> Pending {
    let omit = left_out(table, &[new], reg, cap);
    let (record, unchanged_toast) = tuple_json(table, new, None, reg, &omit);
    let key = identity_key(table, new, reg);
    row(
        table,
        RowOp::Insert,
        (record, None),
        unchanged_toast,
        (&omit, key),
    )
}

pub fn update(
    table: &Table,
    old: Option<&OldTuple>,
    new: &Tuple,
    reg: &TypeRegistry,
    cap: usize,
) -> Pending {
    let old_row = match old {
        Some(OldTuple::Row(t)) => Some(t),
        _ => None,
    };
    // A column left out of one image is left out of both: an event never shows a value on one
    // side only because of its size.
    let omit = match old_row {
        Some(o) => left_out(table, &[new, o], reg, cap),
        None => left_out(table, &[new], reg, cap),
    };
    let (record, unchanged_toast) = tuple_json(table, new, old_row, reg, &omit);
    let key = identity_key(table, new, reg);
    let old_json = match old {
        Some(OldTuple::Row(t)) => Some(tuple_json(table, t, None, reg, &omit).0),
        Some(OldTuple::Key(t)) => Some(key_json(table, t, reg)),
        None => None,
    };
    row(
        table,
        RowOp::Update,
        (record, old_json),
        unchanged_toast,
        (&omit, key),
    )
}

pub fn delete(table: &Table, old: &OldTuple, reg: &TypeRegistry, cap: usize) -> Pending {
    let (old_json, key, omit) = match old {
        OldTuple::Row(t) => {
            let omit = left_out(table, &[t], reg, cap);
            (tuple_json(table, t, None, reg, &omit).0, None, omit)
        }
        OldTuple::Key(t) => (
            key_json(table, t, reg),
            identity_key(table, t, reg),
            Vec::new(),
        ),
    };
    // The guide's client prints `record` for DELETE: it is the deleted row (or its key).
    row(
        table,
        RowOp::Delete,
        (old_json.clone(), Some(old_json)),
        Vec::new(),
        (&omit, key),
    )
}

/// Which columns to leave out of a row's images so that each fits in `cap` bytes (0: no
/// bound): the largest values first, until the rest fits; a column left out of one image is
/// left out of all. `images[0]` takes the unchanged TOAST values it lacks from `images[1]` (as
/// [`tuple_json`] writes it). A value's size is the JSON it becomes with its name: a text's
/// quotes and escapes ([`json_len`]), or what the renderer would write, counted without
/// writing it ([`values::json_len`]: a composite writes its attributes' names, an array quotes
/// its elements), so that a huge value is never rendered at all. Red team rt9 HIGH 2: sized by
/// its text, a 2 MB array of composites with long attribute names became a 157 MB event.
fn left_out(table: &Table, images: &[&Tuple], reg: &TypeRegistry, cap: usize) -> Vec<bool> {
    let mut omit = Vec::new();
    if cap == 0 {
        return omit;
    }
    let sizing = &table.sizing;
    for (k, image) in images.iter().enumerate() {
        let value = |i: usize| match image.0.get(i) {
            Some(pgoutput::Column::UnchangedToast) if k == 0 => {
                images.get(1).and_then(|o| o.0.get(i))
            }
            v => v,
        };
        // The usual row fits even if every byte took six (`\u0001`): told without reading
        // the values or allocating (not for composites, whose names are written per value).
        if !sizing.any_composite {
            let most = sizing.names_total
                + (0..image.0.len())
                    .map(|i| match value(i) {
                        Some(pgoutput::Column::Text(b) | pgoutput::Column::Binary(b)) => {
                            6 * b.len() + 8
                        }
                        _ => 4,
                    })
                    .sum::<usize>();
            if most <= cap {
                continue;
            }
        }
        let sizes: Vec<usize> = (0..image.0.len())
            .map(|i| {
                let name = sizing.names.get(i).copied().unwrap_or(0);
                name + match value(i) {
                    Some(pgoutput::Column::Text(b)) if sizing.as_string.get(i) == Some(&true) => {
                        json_len(b)
                    }
                    Some(pgoutput::Column::Text(b)) => {
                        let type_oid = table.rel.columns.get(i).map_or(0, |c| c.type_id);
                        values::json_len(type_oid, Some(&text_of(b)), reg)
                    }
                    Some(pgoutput::Column::Binary(b)) => 2 * b.len() + 6,
                    _ => 4,
                }
            })
            .collect();
        let chosen = largest_until_within(&sizes, cap);
        if omit.len() < chosen.len() {
            omit.resize(chosen.len(), false);
        }
        for (o, c) in omit.iter_mut().zip(chosen) {
            *o |= c;
        }
    }
    omit
}

/// The bytes of a value's text written as a JSON string: its quotes, two bytes for a quote or
/// a backslash, six for a control character (`\n` and `\t` take two: an upper bound). Numbers,
/// booleans and JSON values are written shorter than that.
fn json_len(text: &[u8]) -> usize {
    2 + text.len()
        + text
            .iter()
            .map(|&b| match b {
                b'"' | b'\\' => 1,
                0..=0x1f => 5,
                _ => 0,
            })
            .sum::<usize>()
}

/// The values to leave out of a row image whose values are `sizes` bytes (each with its name,
/// as the row's JSON writes it) so that the rest fits in `cap` (with a few bytes of slack per
/// value): the largest first.
/// None when the whole fits. Shared by both engines' change streams.
pub fn largest_until_within(sizes: &[usize], cap: usize) -> Vec<bool> {
    const PER_VALUE: usize = 16;
    let total: usize = sizes.iter().map(|s| s + PER_VALUE).sum();
    let mut omit = vec![false; sizes.len()];
    if cap == 0 || total <= cap {
        return omit;
    }
    let mut order: Vec<usize> = (0..sizes.len()).collect();
    order.sort_by_key(|&i| std::cmp::Reverse(sizes[i]));
    let mut left = total;
    for i in order {
        if left <= cap {
            break;
        }
        omit[i] = true;
        left -= sizes[i] + PER_VALUE;
    }
    omit
}

/// The names of the columns `omit` leaves out, in the table's order.
fn names_left_out(rel: &Relation, omit: &[bool]) -> Vec<String> {
    rel.columns
        .iter()
        .zip(omit)
        .filter(|(_, o)| **o)
        .map(|(c, _)| c.name.clone())
        .collect()
}

fn row(
    table: &Table,
    op: RowOp,
    (record, old): (String, Option<String>),
    unchanged_toast: Vec<String>,
    (omit, key): (&[bool], Option<String>),
) -> Pending {
    Pending::Row {
        operation: op,
        schema: table.schema.clone(),
        table: table.name.clone(),
        record,
        old,
        unchanged_toast,
        too_large: names_left_out(&table.rel, omit),
        relation: Some(table.rel.id),
        key,
    }
}

pub fn truncate(rel: &Relation) -> Pending {
    Pending::Schema {
        command: "TRUNCATE".into(),
        object_type: "table".into(),
        schema: Some(rel.namespace.clone()),
        table: Some(rel.name.clone()),
        object: Some(names::qualified(&rel.namespace, &rel.name)),
        partition: None,
    }
}

/// A TRUNCATE of a partition, announced by the project's truncate trigger (`fluxbase.truncate`
/// messages, sql/project/0007_partition_truncate.sql): pgoutput sends none for a partition
/// published through its root. Named as its root (the table its row changes name, so table
/// filters and client caches keyed by it see the TRUNCATE), with the partition in `object` and
/// `partition`.
pub fn partition_truncate(content: &[u8]) -> Option<Pending> {
    #[derive(Deserialize)]
    struct Message {
        schema: String,
        table: String,
        partition: PartitionName,
    }
    let m: Message = serde_json::from_slice(content).ok()?;
    Some(Pending::Schema {
        command: "TRUNCATE".into(),
        object_type: "table".into(),
        object: Some(names::qualified(&m.partition.schema, &m.partition.table)),
        schema: Some(m.schema),
        table: Some(m.table),
        partition: Some(m.partition),
    })
}

/// A DDL announcement from the project's event triggers (`fluxbase.ddl` messages).
pub fn ddl(content: &[u8]) -> Option<Pending> {
    #[derive(Deserialize)]
    #[serde(rename_all = "camelCase")]
    struct Ddl {
        command: String,
        object_type: Option<String>,
        schema: Option<String>,
        object: Option<String>,
    }
    let d: Ddl = serde_json::from_slice(content).ok()?;
    let object_type = d.object_type.unwrap_or_default();
    // The identity is `schema.table` (`schema.table.column` for a column), each part quoted.
    let parts = match object_type.as_str() {
        "table" | "view" | "materialized view" | "foreign table" | "sequence" => 2,
        "table column" => 3,
        _ => 0,
    };
    let table = match (&d.schema, &d.object) {
        (Some(_), Some(object)) if parts > 0 => names::split_identity(object)
            .filter(|p| p.len() == parts)
            .map(|mut p| p.swap_remove(1)),
        _ => None,
    };
    Some(Pending::Schema {
        command: d.command,
        object_type,
        schema: d.schema,
        table,
        object: d.object,
        partition: None,
    })
}

/// A custom broadcast from SQL (`fluxbase.broadcast` messages).
pub fn broadcast(content: &[u8]) -> Option<Pending> {
    #[derive(Deserialize)]
    struct B {
        event: String,
        payload: Box<serde_json::value::RawValue>,
    }
    let b: B = serde_json::from_slice(content).ok()?;
    Some(Pending::Broadcast {
        event: b.event,
        payload: b.payload.get().to_string(),
    })
}

/// `<commit LSN>-<index>`: fixed-width hex, so ids sort in commit order.
pub fn event_id(commit_lsn: Lsn, index: u32) -> String {
    // By hand: `format!` cost more than any other string of an event (one per event).
    let mut id = String::with_capacity(25);
    push_hex(&mut id, commit_lsn.0, 16);
    id.push('-');
    push_hex(&mut id, u64::from(index), 8);
    id
}

/// An LSN as PostgreSQL writes it (`16/B374D848`), like its `Display`, without `format!`.
fn push_lsn(out: &mut String, lsn: Lsn) {
    let digits = |v: u64| (64 - v.leading_zeros()).div_ceil(4).max(1);
    let (hi, lo) = (lsn.0 >> 32, lsn.0 & 0xFFFF_FFFF);
    push_hex(out, hi, digits(hi));
    out.push('/');
    push_hex(out, lo, digits(lo));
}

/// The low `digits` hex digits of `value`, upper case, zero-padded.
fn push_hex(out: &mut String, value: u64, digits: u32) {
    for shift in (0..digits).rev() {
        let nibble = ((value >> (shift * 4)) & 0xF) as u8;
        out.push(char::from(if nibble < 10 {
            b'0' + nibble
        } else {
            b'A' + nibble - 10
        }));
    }
}

/// Appends a row image to a payload being written: the image, as the range of the payload that
/// holds it.
fn in_payload(p: &mut String, image: &str) -> RowImage {
    let start = p.len();
    p.push_str(image);
    match (u32::try_from(start), u32::try_from(p.len())) {
        (Ok(start), Ok(end)) => RowImage::InPayload { start, end },
        // A payload past 4 GiB (never, under the stream's bounds): the event keeps its copy.
        _ => RowImage::Own(image.to_string()),
    }
}

/// Completes a pending change into a bus event.
pub fn finish(
    pending: Pending,
    commit_lsn: Lsn,
    end_lsn: Lsn,
    index: u32,
    commit_timestamp: &Arc<str>,
    last: bool,
) -> Event {
    let id = event_id(commit_lsn, index);
    let mut p = String::with_capacity(match &pending {
        // The rows and names are copied in; room for them up front, so the payload never grows.
        Pending::Row {
            record,
            old,
            schema,
            table,
            ..
        } => 256 + record.len() + old.as_ref().map_or(4, String::len) + schema.len() + table.len(),
        _ => 256,
    });
    match pending {
        Pending::Row {
            operation,
            schema,
            table,
            record,
            old,
            unchanged_toast,
            too_large,
            relation,
            key,
        } => {
            // Names and times that needed no escaping are compared as they are by
            // `payload_is_finished`; the rare others keep the history's JSON form.
            let payload_whole = plain(&schema) && plain(&table) && plain(commit_timestamp);
            p.push_str("{\"id\":");
            quote(&mut p, &id);
            p.push_str(",\"operation\":\"");
            p.push_str(operation.as_str());
            p.push_str("\",\"schema\":");
            quote(&mut p, &schema);
            p.push_str(",\"table\":");
            quote(&mut p, &table);
            // The rows stay in the payload only: the event reads them there, holds each row once,
            // and the rendered strings are freed here, on the thread that made them, not by the
            // last consumer on another.
            p.push_str(",\"record\":");
            let record = in_payload(&mut p, &record);
            p.push_str(",\"old\":");
            let old = match old {
                Some(old) => in_payload(&mut p, &old),
                None => {
                    p.push_str("null");
                    RowImage::None
                }
            };
            p.push_str(",\"commitTimestamp\":");
            quote(&mut p, commit_timestamp);
            p.push_str(",\"lsn\":\"");
            push_lsn(&mut p, commit_lsn);
            p.push('"');
            write_row_notes(&mut p, &unchanged_toast, &too_large);
            p.push('}');
            Event {
                id,
                kind: EventKind::Row { operation },
                schema: Some(schema),
                table: Some(table),
                record,
                old,
                unchanged_toast,
                too_large,
                relation,
                row_key: key,
                commit_timestamp: commit_timestamp.clone(),
                commit_lsn,
                end_lsn,
                last_in_transaction: last,
                payload: Arc::from(p),
                sender: None,
                gap_before: false,
                payload_whole,
            }
        }
        Pending::Broadcast { event, payload } => {
            let mut p = String::with_capacity(32 + event.len() + payload.len());
            p.push_str("{\"event\":");
            quote(&mut p, &event);
            p.push_str(",\"payload\":");
            p.push_str(&payload);
            p.push('}');
            Event {
                id,
                kind: EventKind::Broadcast { event },
                schema: None,
                table: None,
                record: RowImage::None,
                old: RowImage::None,
                unchanged_toast: Vec::new(),
                too_large: Vec::new(),
                relation: None,
                row_key: None,
                commit_timestamp: commit_timestamp.clone(),
                commit_lsn,
                end_lsn,
                last_in_transaction: last,
                payload: Arc::from(p),
                sender: None,
                gap_before: false,
                payload_whole: false,
            }
        }
        Pending::Schema {
            command,
            object_type,
            schema,
            table,
            object,
            partition,
        } => {
            let mut payload = serde_json::json!({
                "id": id,
                "event_type": "schema_update",
                "command": command,
                "objectType": object_type,
                "schema": schema,
                "table": table,
                "object": object,
                "commitTimestamp": &**commit_timestamp,
                "lsn": commit_lsn.to_string(),
            });
            if let Some(part) = partition {
                payload["partition"] =
                    serde_json::json!({ "schema": part.schema, "table": part.table });
            }
            Event {
                id,
                kind: EventKind::Schema { command },
                schema: schema.map(Arc::from),
                table: table.map(Arc::from),
                record: RowImage::None,
                old: RowImage::None,
                unchanged_toast: Vec::new(),
                too_large: Vec::new(),
                relation: None,
                row_key: None,
                commit_timestamp: commit_timestamp.clone(),
                commit_lsn,
                end_lsn,
                last_in_transaction: last,
                payload: Arc::from(payload.to_string()),
                sender: None,
                gap_before: false,
                payload_whole: false,
            }
        }
    }
}

/// A row change with its rows left out: `record` (and `old`, when it had one) an empty object
/// and every column they held named in `tooLarge` (after any already there), as if each value
/// had passed `cdc_max_row_bytes`; the same id, names, times and notes otherwise. For a
/// channel that cannot carry the change whole (the cluster's stream past NATS's
/// `max_payload`). `None` for anything but a row change made by [`finish`].
pub fn without_rows(event: &Event) -> Option<Event> {
    let EventKind::Row { operation } = event.kind else {
        return None;
    };
    let index = u32::from_str_radix(event.id.rsplit_once('-')?.1, 16).ok()?;
    let mut too_large = event.too_large.clone();
    for image in [event.record(), event.old()].into_iter().flatten() {
        for name in object_keys(image)? {
            if !too_large.contains(&name) {
                too_large.push(name);
            }
        }
    }
    let pending = Pending::Row {
        operation,
        schema: event.schema.clone()?,
        table: event.table.clone()?,
        record: "{}".to_string(),
        old: event.old.is_some().then(|| "{}".to_string()),
        unchanged_toast: event.unchanged_toast.clone(),
        too_large,
        relation: event.relation,
        key: event.row_key.clone(),
    };
    let mut smaller = finish(
        pending,
        event.commit_lsn,
        event.end_lsn,
        index,
        &event.commit_timestamp,
        event.last_in_transaction,
    );
    (smaller.id == event.id).then(|| {
        smaller.gap_before = event.gap_before;
        smaller
    })
}

/// The keys of a JSON object, in their order.
fn object_keys(json: &str) -> Option<Vec<String>> {
    struct Keys;
    impl<'de> serde::de::Visitor<'de> for Keys {
        type Value = Vec<String>;
        fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
            f.write_str("a JSON object")
        }
        fn visit_map<A: serde::de::MapAccess<'de>>(
            self,
            mut map: A,
        ) -> Result<Self::Value, A::Error> {
            let mut keys = Vec::new();
            while let Some(key) = map.next_key::<String>()? {
                map.next_value::<serde::de::IgnoredAny>()?;
                keys.push(key);
            }
            Ok(keys)
        }
    }
    use serde::Deserializer as _;
    serde_json::Deserializer::from_str(json)
        .deserialize_map(Keys)
        .ok()
}

/// Whether a row change's payload is the one [`finish`] wrote for it: it begins with the
/// event's own id, operation, schema and table, then `record` and `old` exactly as the event
/// holds them, then `commitTimestamp`. Then its top-level `record` and `old` are the event's,
/// and the whole is JSON (finish writes it from JSON parts). A plain comparison of bytes, so
/// that the realtime history, which stores a row image only inside the payload, need not
/// parse every payload to learn that (it parses those that do not match: other layouts, or
/// names that needed escaping). False for anything else.
pub fn payload_holds_rows(event: &Event) -> bool {
    rows_prefix(event).is_some()
}

/// Whether a row change's payload is exactly the one [`finish`] wrote for it, byte for byte:
/// [`payload_holds_rows`], then the event's own commit time, commit LSN and unchanged TOAST
/// columns, and nothing after them. Every field of the event but its end LSN and whether it
/// ends its transaction can then be read back from the payload alone ([`finished_fields`]):
/// the realtime history stores such an event as its payload and those two.
pub fn payload_is_finished(event: &Event) -> bool {
    let Some(mut rest) = rows_prefix(event) else {
        return false;
    };
    let ts = &*event.commit_timestamp;
    if !plain(ts) {
        return false;
    }
    if !strip_all(&mut rest, &["\"", ts, "\",\"lsn\":\""]) {
        return false;
    }
    // The LSN's text is not read back (the history keeps the commit LSN itself): only its
    // extent matters, so that nothing else hides in the payload.
    let digits = rest
        .iter()
        .take_while(|b| b.is_ascii_hexdigit() || **b == b'/')
        .count();
    rest = &rest[digits..];
    // An empty `String` does not allocate: the usual case (no unchanged TOAST) costs nothing.
    let mut notes = String::new();
    write_row_notes(&mut notes, &event.unchanged_toast, &event.too_large);
    strip_all(&mut rest, &["\"", &notes, "}"]) && rest.is_empty()
}

/// Names, ids and times that go into JSON as they are (nothing to escape).
fn plain(s: &str) -> bool {
    s.bytes().all(|b| b >= 0x20 && b != b'"' && b != b'\\')
}

/// Strips `pieces` in turn from the front of `rest`; false at the first that is not there.
fn strip_all(rest: &mut &[u8], pieces: &[&str]) -> bool {
    pieces
        .iter()
        .all(|piece| match rest.strip_prefix(piece.as_bytes()) {
            Some(after) => {
                *rest = after;
                true
            }
            None => false,
        })
}

/// A row change's fields as read back from a payload [`finish`] wrote (see
/// [`payload_is_finished`]): `None` for anything else.
pub struct FinishedFields {
    pub id: String,
    pub operation: RowOp,
    pub schema: String,
    pub table: String,
    pub record: String,
    pub old: Option<String>,
    pub commit_timestamp: String,
    pub unchanged_toast: Vec<String>,
    pub too_large: Vec<String>,
}

/// Reads a row change's fields back from its payload (the inverse of [`finish`] for rows).
pub fn finished_fields(payload: &str) -> Option<FinishedFields> {
    #[derive(Deserialize)]
    #[serde(rename_all = "camelCase")]
    struct Row<'a> {
        id: String,
        operation: &'a str,
        schema: String,
        table: String,
        #[serde(borrow)]
        record: &'a serde_json::value::RawValue,
        #[serde(borrow)]
        old: Option<&'a serde_json::value::RawValue>,
        commit_timestamp: String,
        #[serde(default)]
        unchanged_toast: Vec<String>,
        #[serde(default)]
        too_large: Vec<String>,
    }
    let row: Row = serde_json::from_str(payload).ok()?;
    Some(FinishedFields {
        id: row.id,
        operation: RowOp::from_name(row.operation)?,
        schema: row.schema,
        table: row.table,
        record: row.record.get().to_string(),
        old: row.old.map(|o| o.get().to_string()),
        commit_timestamp: row.commit_timestamp,
        unchanged_toast: row.unchanged_toast,
        too_large: row.too_large,
    })
}

/// [`payload_holds_rows`]: the rest of the payload after `,"commitTimestamp":` when it holds.
fn rows_prefix(event: &Event) -> Option<&[u8]> {
    let EventKind::Row { operation } = event.kind else {
        return None;
    };
    let (Some(schema), Some(table), Some(record)) = (
        event.schema.as_deref(),
        event.table.as_deref(),
        event.record(),
    ) else {
        return None;
    };
    if !(plain(&event.id) && plain(schema) && plain(table)) {
        return None;
    }
    let mut rest = event.payload.as_bytes();
    let pieces: [&str; 13] = [
        "{\"id\":\"",
        &event.id,
        "\",\"operation\":\"",
        operation.as_str(),
        "\",\"schema\":\"",
        schema,
        "\",\"table\":\"",
        table,
        "\",\"record\":",
        record,
        ",\"old\":",
        event.old().unwrap_or("null"),
        ",\"commitTimestamp\":",
    ];
    strip_all(&mut rest, &pieces).then_some(rest)
}

/// What a row change says beyond its new and old rows, written after them in every channel's
/// payload (the WebSocket `db_event` payload, the webhook's `data`): `unchangedToast`, the
/// columns PostgreSQL left out because their TOASTed value did not change and no old row
/// supplied it; `tooLarge`, the columns left out because the row image would pass
/// `cdc_max_row_bytes` with them. Nothing when there is nothing to say.
pub fn write_row_notes(out: &mut String, unchanged_toast: &[String], too_large: &[String]) {
    for (name, columns) in [("unchangedToast", unchanged_toast), ("tooLarge", too_large)] {
        if !columns.is_empty() {
            out.push_str(",\"");
            out.push_str(name);
            out.push_str("\":");
            out.push_str(&serde_json::to_string(columns).expect("strings serialize"));
        }
    }
}

/// PostgreSQL's commit time as RFC 3339 (microseconds, UTC).
pub fn commit_time(ts: pgoutput::PgTimestamp) -> String {
    let micros = ts.to_unix_micros();
    chrono::DateTime::from_timestamp_micros(micros)
        .map(|t| t.to_rfc3339_opts(chrono::SecondsFormat::Micros, true))
        .unwrap_or_default()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn row_event(schema: &str, record: &str, old: Option<&str>) -> Event {
        finish(
            Pending::Row {
                operation: RowOp::Update,
                schema: schema.into(),
                table: "t".into(),
                record: record.into(),
                old: old.map(str::to_string),
                unchanged_toast: vec!["big".into()],
                too_large: Vec::new(),
                relation: None,
                key: None,
            },
            Lsn(0x10),
            Lsn(0x20),
            1,
            &Arc::from("2026-01-01T00:00:00Z"),
            true,
        )
    }

    #[test]
    fn the_change_stream_s_row_payloads_are_recognized_and_nothing_else() {
        let e = row_event("public", r#"{"id":1,"n":"a \"q\""}"#, Some(r#"{"id":1}"#));
        assert!(payload_holds_rows(&e));
        assert!(payload_holds_rows(&row_event("public", "{}", None)));
        // The rows said in the payload are the event's.
        let v: serde_json::Value = serde_json::from_str(&e.payload).unwrap();
        assert_eq!(v["record"].to_string(), e.record().unwrap());
        assert_eq!(v["old"].to_string(), e.old().unwrap());
        // Both read from the payload itself, not from copies.
        assert!(matches!(e.record, RowImage::InPayload { .. }));
        assert!(matches!(e.old, RowImage::InPayload { .. }));
        // Any difference from the event's own fields: not recognized (the history parses it).
        let mut other = row_event("public", "{\"id\":1}", None);
        other.record = RowImage::Own("{\"id\":2}".into());
        assert!(!payload_holds_rows(&other));
        let mut other = row_event("public", "{\"id\":1}", Some("{}"));
        other.old = RowImage::None;
        assert!(!payload_holds_rows(&other));
        let mut other = row_event("public", "{\"id\":1}", None);
        other.table = Some("u".into());
        assert!(!payload_holds_rows(&other));
        let mut other = row_event("public", "{\"id\":1}", None);
        other.kind = EventKind::Row {
            operation: RowOp::Insert,
        };
        assert!(!payload_holds_rows(&other));
        let mut other = row_event("public", "{\"id\":1}", None);
        other.payload = Arc::from(format!("{} ", &other.payload[..other.payload.len() - 1]));
        assert!(
            payload_holds_rows(&other),
            "only the fields up to the rows are compared"
        );
        other.payload = Arc::from(other.payload.replacen("{\"id\"", "{\"x\":0,\"id\"", 1));
        assert!(!payload_holds_rows(&other));
        // Names that needed escaping are left to the parser.
        assert!(!payload_holds_rows(&row_event("a\"b", "{}", None)));
        let schema = finish(
            Pending::Schema {
                command: "CREATE TABLE".into(),
                object_type: "table".into(),
                schema: Some("public".into()),
                table: Some("t".into()),
                object: Some("public.t".into()),
                partition: None,
            },
            Lsn(1),
            Lsn(2),
            0,
            &Arc::from("2026-01-01T00:00:00Z"),
            true,
        );
        assert!(!payload_holds_rows(&schema));
    }

    #[test]
    fn a_finished_payload_is_recognized_whole_and_its_fields_read_back() {
        let cases = [
            row_event("public", r#"{"id":1,"n":"a \"q\""}"#, Some(r#"{"id":1}"#)),
            row_event("public", "{}", None),
        ];
        for e in &cases {
            assert!(e.payload_whole);
            assert!(payload_is_finished(e), "{}", e.payload);
            let f = finished_fields(&e.payload).unwrap();
            assert_eq!(f.id, e.id);
            assert_eq!(f.operation, RowOp::Update);
            assert_eq!(f.schema, "public");
            assert_eq!(f.table, "t");
            assert_eq!(Some(f.record.as_str()), e.record());
            assert_eq!(f.old.as_deref(), e.old());
            assert_eq!(f.commit_timestamp, &*e.commit_timestamp);
            assert_eq!(f.unchanged_toast, e.unchanged_toast);
        }
        let base = || row_event("public", "{\"id\":1}", None);
        // Anything the payload says otherwise than the event, or anything more: not whole.
        let mut other = base();
        other.commit_timestamp = Arc::from("2026-01-01T00:00:01Z");
        assert!(!payload_is_finished(&other));
        let mut other = base();
        other.unchanged_toast.push("more".into());
        assert!(!payload_is_finished(&other));
        let mut other = base();
        other.unchanged_toast.clear();
        assert!(!payload_is_finished(&other));
        for (from, to) in [
            ("}", "} "),
            ("}", ",\"record\":{}}"),
            ("\"lsn\":\"0/10\"", "\"lsn\":\"0/10\",\"x\":1"),
            ("\"lsn\":\"0/10\"", "\"lsn\":\"0/1\\\"0\""),
        ] {
            let mut other = base();
            let at = other.payload.rfind(from).unwrap();
            let mut p = other.payload.to_string();
            p.replace_range(at..at + from.len(), to);
            other.payload = Arc::from(p);
            assert!(!payload_is_finished(&other), "{}", other.payload);
        }
        let mut other = base();
        other.commit_timestamp = Arc::from("a\"b");
        assert!(!payload_is_finished(&other));
        // What finish made with names or a time that needed escaping is not vouched for.
        assert!(!row_event("a\"b", "{}", None).payload_whole);
        let odd_time = finish(
            Pending::Row {
                operation: RowOp::Insert,
                schema: "public".into(),
                table: "t".into(),
                record: "{}".into(),
                old: None,
                unchanged_toast: Vec::new(),
                too_large: Vec::new(),
                relation: None,
                key: None,
            },
            Lsn(1),
            Lsn(2),
            0,
            &Arc::from("\u{1}"),
            true,
        );
        assert!(!odd_time.payload_whole);
        assert!(!payload_is_finished(&odd_time));
        // Payloads that are not a row change's.
        assert!(finished_fields(r#"{"event":"x","payload":{}}"#).is_none());
        assert!(finished_fields("not json").is_none());
    }

    /// The stand-in the cluster's stream carries for a change NATS cannot: the same change,
    /// its rows left out and every column named in `tooLarge` in the rows' order, as
    /// `cdc_max_row_bytes` writes it (the history and every channel read it as theirs).
    #[test]
    fn a_change_without_its_rows_keeps_everything_else_and_names_every_column() {
        let event = row_event(
            "public",
            r#"{"id":7,"body":"xxxxxxxx","z":{"a":1},"é":null}"#,
            Some(r#"{"id":7,"old_only":[1,2]}"#),
        );
        let smaller = without_rows(&event).expect("a row change");
        assert_eq!(smaller.id, event.id);
        assert_eq!(smaller.record(), Some("{}"));
        assert_eq!(smaller.old(), Some("{}"));
        assert_eq!(smaller.too_large, ["id", "body", "z", "é", "old_only"]);
        assert_eq!(smaller.unchanged_toast, event.unchanged_toast);
        assert_eq!(
            (smaller.commit_lsn, smaller.end_lsn),
            (event.commit_lsn, event.end_lsn)
        );
        assert!(smaller.last_in_transaction && payload_is_finished(&smaller));
        let payload: serde_json::Value = serde_json::from_str(&smaller.payload).unwrap();
        assert_eq!(payload["record"], serde_json::json!({}));
        assert_eq!(payload["tooLarge"][4], "old_only");
        assert_eq!(payload["id"], event.id.as_str());
        // An insert has no old image, and keeps none.
        let mut insert = row_event("public", r#"{"a":1}"#, None);
        insert.kind = EventKind::Row {
            operation: RowOp::Insert,
        };
        let smaller = without_rows(&insert).unwrap();
        assert_eq!(
            (smaller.old(), smaller.too_large.as_slice()),
            (None, &["a".to_string()][..])
        );
        // Not a row change: nothing to leave out.
        let mut broadcast = row_event("public", "{}", None);
        broadcast.kind = EventKind::Broadcast { event: "e".into() };
        assert!(without_rows(&broadcast).is_none());
    }

    #[test]
    fn event_ids_sort_in_commit_order() {
        let a = event_id(Lsn(0x16B3748), 2);
        let b = event_id(Lsn(0x16B3748), 10);
        let c = event_id(Lsn(0x1_0000_0000), 0);
        assert!(a < b && b < c);
        assert_eq!(a, "00000000016B3748-00000002");
        assert_eq!(
            event_id(Lsn(u64::MAX), u32::MAX),
            format!("{:016X}-{:08X}", u64::MAX, u32::MAX)
        );
        assert_eq!(event_id(Lsn(0xABCDEF), 0xFA), "0000000000ABCDEF-000000FA");
        for lsn in [
            0,
            1,
            0xF,
            0x10,
            0x16_B374_D848,
            0xFFFF_FFFF,
            1 << 32,
            u64::MAX,
        ] {
            let mut text = String::new();
            push_lsn(&mut text, Lsn(lsn));
            assert_eq!(text, Lsn(lsn).to_string());
        }
    }

    #[test]
    fn ddl_messages_name_the_table() {
        let p = ddl(br#"{"command":"ALTER TABLE","objectType":"table","schema":"public","object":"public.users"}"#).unwrap();
        match p {
            Pending::Schema { table, command, .. } => {
                assert_eq!(table.as_deref(), Some("users"));
                assert_eq!(command, "ALTER TABLE");
            }
            _ => panic!(),
        }
        assert!(ddl(b"not json").is_none());
    }

    fn schema_parts(p: Pending) -> (Option<String>, Option<String>, Option<PartitionName>) {
        match p {
            Pending::Schema {
                table,
                object,
                partition,
                ..
            } => (table, object, partition),
            _ => panic!("not a schema event"),
        }
    }

    #[test]
    fn ddl_messages_name_odd_tables_and_columns_unquoted() {
        for (object_type, object, table) in [
            ("table", r#""My Schema"."Order Items""#, "Order Items"),
            ("table", r#"public."a.b""#, "a.b"),
            ("table", r#"public."say ""hi""""#, r#"say "hi""#),
            ("table column", r#"public."a.b"."c.d""#, "a.b"),
            ("index", r#"public."a.b_pkey""#, ""),
        ] {
            let body = serde_json::json!({ "command": "ALTER TABLE", "objectType": object_type,
                "schema": "public", "object": object });
            let (t, o, _) = schema_parts(ddl(body.to_string().as_bytes()).unwrap());
            assert_eq!(t.as_deref().unwrap_or(""), table, "{object}");
            assert_eq!(o.as_deref(), Some(object));
        }
    }

    #[test]
    fn a_partitions_truncate_names_its_root_and_the_partition_quoted() {
        let body = br#"{"schema":"public","table":"Events","partition":{"schema":"old data","table":"events_2024"}}"#;
        let (table, object, partition) = schema_parts(partition_truncate(body).unwrap());
        assert_eq!(table.as_deref(), Some("Events"));
        assert_eq!(object.as_deref(), Some(r#""old data".events_2024"#));
        assert_eq!(
            partition,
            Some(PartitionName {
                schema: "old data".into(),
                table: "events_2024".into()
            })
        );
        assert!(partition_truncate(br#"{"schema":"public","table":"t"}"#).is_none());
        assert!(partition_truncate(b"[]").is_none());
    }

    /// The largest values go first, and only as many as the rest needs to fit; nothing goes
    /// when the whole fits or there is no bound.
    #[test]
    fn the_largest_values_are_left_out_until_the_rest_fits() {
        assert_eq!(largest_until_within(&[10, 500, 20], 0), [false; 3]);
        assert_eq!(largest_until_within(&[10, 500, 20], 10_000), [false; 3]);
        assert_eq!(
            largest_until_within(&[10, 500, 20], 200),
            [false, true, false]
        );
        assert_eq!(
            largest_until_within(&[300, 500, 20], 200),
            [true, true, false]
        );
        // Each value counts a little for its name and punctuation.
        assert_eq!(largest_until_within(&[100, 100], 232), [false; 2]);
        assert_eq!(largest_until_within(&[100, 101], 231), [false, true]);
    }

    /// A value's size is the JSON string its text makes: what `tuple_json` writes for text.
    #[test]
    fn a_values_size_counts_its_quotes_and_escapes() {
        let text = b"a\"\\\x01z";
        let mut written = String::new();
        quote(&mut written, std::str::from_utf8(text).unwrap());
        assert_eq!(written, "\"a\\\"\\\\\\u0001z\"");
        assert_eq!(json_len(text), written.len());
    }

    /// A composite's value is sized as the JSON it becomes (every attribute's name), not as its
    /// text: `(,,…)` of a type with long attribute names is left out once its JSON would pass
    /// the bound, and the event that is written stays within it (red team rt9 HIGH 2).
    #[test]
    fn a_composite_is_sized_by_the_json_it_becomes() {
        const WIDE: u32 = 90001;
        let attrs: Vec<(String, u32)> = (0..100)
            .map(|i| (format!("attribute_with_a_long_name_{i:034}"), 23))
            .collect();
        let attrs = serde_json::to_string(&attrs).unwrap();
        let mut reg = TypeRegistry::new();
        let row: Vec<Option<String>> = ["90001", "t", "c", "C", "0", "0", ",", "0", "-1", &attrs]
            .iter()
            .map(|s| Some(s.to_string()))
            .chain([None])
            .collect();
        reg.absorb(&[row]).unwrap();
        let column = |name: &str, type_id, is_key| pgoutput::RelationColumn {
            is_key,
            name: name.into(),
            type_id,
            type_modifier: -1,
        };
        let table = Table::new(
            Relation {
                xid: None,
                id: 1,
                namespace: "public".into(),
                name: "t".into(),
                replica_identity: pgoutput::ReplicaIdentity::Default,
                columns: vec![column("id", 23, true), column("w", WIDE, false)],
            },
            &reg,
        );
        let empty = format!("({})", ",".repeat(99));
        let tuple = Tuple(vec![
            pgoutput::Column::Text(bytes::Bytes::from_static(b"1")),
            pgoutput::Column::Text(bytes::Bytes::from(empty.clone())),
        ]);
        let rendered = values::json_len(WIDE, Some(&empty), &reg);
        assert!(rendered > 6 * empty.len() + 100, "{rendered}");
        for (cap, left) in [(rendered + 64, false), (4096, true)] {
            let Pending::Row {
                record, too_large, ..
            } = insert(&table, &tuple, &reg, cap)
            else {
                panic!("a row")
            };
            assert_eq!(too_large, if left { vec!["w".to_string()] } else { vec![] });
            assert!(record.len() <= cap, "{} > {cap}", record.len());
        }
    }
}
