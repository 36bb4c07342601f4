//! What a receiver gets: the event type of a bus event and the guide's JSON body for it; and
//! what the delivery worker orders it by ([`order_keys`]).

use std::borrow::Cow;
use std::collections::HashMap;

use serde_json::value::RawValue;

use super::keys::RowNames;
use crate::bus::{Event, EventKind, RowOp};
use crate::control::webhooks::EventType;

/// The webhook event type of a bus event; broadcasts have none.
pub fn event_type(event: &Event) -> Option<EventType> {
    match &event.kind {
        EventKind::Row { operation } => Some(match operation {
            RowOp::Insert => EventType::RowInserted,
            RowOp::Update => EventType::RowUpdated,
            RowOp::Delete => EventType::RowDeleted,
        }),
        EventKind::Schema { .. } => Some(EventType::SchemaChanged),
        EventKind::Broadcast { .. } => None,
    }
}

/// The guide's payload: `{event_type, project_id, table_id, timestamp, event_id, data:{new, old}}`;
/// a row change's `data` also carries what its WebSocket `db_event` payload says beyond the rows
/// (`unchangedToast`), written by the same function ([`crate::cdc::events::write_row_notes`]).
pub fn payload(project_id: &str, event: &Event, event_type: EventType) -> String {
    let (new, old) = match &event.kind {
        EventKind::Row {
            operation: RowOp::Delete,
        } => ("null", event.old().unwrap_or("null")),
        EventKind::Row { .. } => (
            event.record().unwrap_or("null"),
            event.old().unwrap_or("null"),
        ),
        _ => (&*event.payload, "null"),
    };
    let mut out = String::with_capacity(128 + new.len() + old.len());
    out.push_str("{\"event_type\":");
    out.push_str(&serde_json::to_string(event_type.as_str()).expect("str"));
    out.push_str(",\"project_id\":");
    out.push_str(&serde_json::to_string(project_id).expect("str"));
    out.push_str(",\"table_id\":");
    out.push_str(&serde_json::to_string(&event.table.as_deref()).expect("str"));
    out.push_str(",\"timestamp\":");
    out.push_str(&serde_json::to_string(&*event.commit_timestamp).expect("str"));
    out.push_str(",\"event_id\":");
    out.push_str(&serde_json::to_string(&event.id).expect("str"));
    out.push_str(",\"data\":{\"new\":");
    out.push_str(new);
    out.push_str(",\"old\":");
    out.push_str(old);
    if matches!(event.kind, EventKind::Row { .. }) {
        crate::cdc::events::write_row_notes(&mut out, &event.unchanged_toast, &event.too_large);
    }
    out.push_str("}}");
    out
}

/// Separates the keys of one delivery in [`order_keys`]' text (JSON text never holds it raw).
pub const KEY_SEPARATOR: char = '\u{1}';

/// What the `row` ordering orders an event's deliveries by (stored with each delivery as
/// `row_keys`): `None` for a barrier (a schema change, TRUNCATE included), else the keys of the
/// rows it touches, joined by [`KEY_SEPARATOR`]; each is the table (`["schema","table"]`) and
/// what names the row in it:
///
/// * **Its key** (`{"id":1}`): the replica identity key the stream sent ([`Event::row_key`],
///   tables with `REPLICA IDENTITY DEFAULT` or `USING INDEX`), else the primary key columns read
///   from the catalog ([`RowNames::Key`], tables with `REPLICA IDENTITY FULL`, which Fluxbase
///   gives every table), taken from the new row (insert, update) and the old row (update,
///   delete). An update that changed the key has the old and the new one, so it goes after the
///   old row's deliveries and before the new row's.
/// * **Its image** ([`RowNames::Image`], a table without a primary key or replica identity
///   index, with `REPLICA IDENTITY FULL`): the row's whole image, hashed. An insert has its new
///   image, an update its old and its new one, a delete its old one: each change of a row shares
///   a key with the one before it (its old image is that one's new image), so each waits for the
///   one before it. Rows with the same image are ordered as one.
/// * **The table alone** ([`RowNames::Table`], or a key column missing from the row): its
///   changes go one at a time, in commit order.
pub fn order_keys(event: &Event, names: &RowNames) -> Option<String> {
    let EventKind::Row { operation } = &event.kind else {
        return None;
    };
    let table = serde_json::to_string(&[
        event.schema.as_deref().unwrap_or(""),
        event.table.as_deref().unwrap_or(""),
    ])
    .expect("strings serialize");
    let (new, old) = (event.record(), event.old());
    let mut keys: Vec<String> = Vec::with_capacity(2);
    match (&event.row_key, names) {
        (Some(key), _) => {
            keys.push(key.clone());
            // Present on an update only when the key changed (PostgreSQL sends the old key then).
            if let (RowOp::Update, Some(old)) = (operation, old) {
                keys.push(old.to_string());
            }
        }
        (None, RowNames::Key(columns)) => {
            let images: &[Option<&str>] = match operation {
                RowOp::Insert => &[new],
                RowOp::Update => &[new, old],
                // `record` is the deleted row too.
                RowOp::Delete => &[old.or(new)],
            };
            for image in images.iter().flatten() {
                match key_of(image, columns) {
                    Some(k) => keys.push(k),
                    None => return Some(table),
                }
            }
        }
        (None, RowNames::Image) => match operation {
            RowOp::Insert => keys.extend(new.map(image)),
            RowOp::Update => {
                if let (Some(old), Some(new)) = (old, new) {
                    keys.push(image(new));
                    keys.push(image(old));
                }
            }
            RowOp::Delete => keys.extend(old.map(image)),
        },
        (None, RowNames::Table) => {}
    }
    keys.dedup();
    if keys.is_empty() {
        return Some(table);
    }
    let mut out = String::with_capacity(keys.len() * (table.len() + 40));
    for (i, key) in keys.iter().enumerate() {
        if i > 0 {
            out.push(KEY_SEPARATOR);
        }
        out.push_str(&table);
        out.push_str(key);
    }
    Some(out)
}

/// The key columns of a row image as a JSON object, in the key's order (`{"id":1}`); `None` when
/// the image is not an object or lacks one of them.
///
/// Only the key's values are parsed (the rest of the row is skipped as raw text: a 16 MiB row
/// used to become a tree of `serde_json::Value`s here); they are written as before, parsed and
/// printed again, so that the keys of deliveries an older server stored still match (`1.50`
/// prints as `1.5` either way).
fn key_of(image: &str, columns: &[String]) -> Option<String> {
    let value: HashMap<Cow<'_, str>, &RawValue> = serde_json::from_str(image).ok()?;
    let mut out = String::from("{");
    for (i, c) in columns.iter().enumerate() {
        if i > 0 {
            out.push(',');
        }
        out.push_str(&serde_json::to_string(c).ok()?);
        out.push(':');
        let v: serde_json::Value = serde_json::from_str(value.get(c.as_str())?.get()).ok()?;
        out.push_str(&serde_json::to_string(&v).ok()?);
    }
    out.push('}');
    Some(out)
}

/// A row image's key: the first 16 bytes of its JSON's SHA-256, in hex (`#…`). A collision only
/// orders two rows as one.
fn image(json: &str) -> String {
    let digest = ring::digest::digest(&ring::digest::SHA256, json.as_bytes());
    format!("#{}", hex::encode(&digest.as_ref()[..16]))
}

#[cfg(test)]
mod tests {
    use super::*;
    use fluxbase_replication::pgoutput::Lsn;

    fn row(op: RowOp, key: Option<&str>, record: Option<&str>, old: Option<&str>) -> Event {
        Event {
            id: "0000000000000001-00000000".into(),
            kind: EventKind::Row { operation: op },
            schema: Some("public".into()),
            table: Some("t".into()),
            record: record.map(str::to_string).into(),
            old: old.map(str::to_string).into(),
            unchanged_toast: vec![],
            too_large: Vec::new(),
            relation: None,
            row_key: key.map(str::to_string),
            commit_timestamp: std::sync::Arc::from(""),
            commit_lsn: Lsn(1),
            end_lsn: Lsn(2),
            last_in_transaction: true,
            payload: "{}".into(),
            sender: None,
            gap_before: false,
            payload_whole: false,
        }
    }

    fn keys(e: &Event) -> Vec<String> {
        keys_by(e, &RowNames::Image)
    }

    fn keys_by(e: &Event, names: &RowNames) -> Vec<String> {
        order_keys(e, names)
            .unwrap()
            .split(KEY_SEPARATOR)
            .map(str::to_string)
            .collect()
    }

    #[test]
    fn a_keyed_row_is_its_table_and_key_and_a_key_change_is_both_rows() {
        let k = keys(&row(
            RowOp::Insert,
            Some(r#"{"id":1}"#),
            Some(r#"{"id":1,"v":0}"#),
            None,
        ));
        assert_eq!(k, vec![r#"["public","t"]{"id":1}"#]);
        let k = keys(&row(
            RowOp::Update,
            Some(r#"{"id":2}"#),
            Some(r#"{"id":2,"v":0}"#),
            Some(r#"{"id":1}"#),
        ));
        assert_eq!(
            k,
            vec![r#"["public","t"]{"id":2}"#, r#"["public","t"]{"id":1}"#]
        );
    }

    #[test]
    fn under_replica_identity_full_each_change_shares_a_key_with_the_one_before() {
        let (r1, r2) = (r#"{"id":1,"v":0}"#, r#"{"id":1,"v":1}"#);
        let insert = keys(&row(RowOp::Insert, None, Some(r1), None));
        let update = keys(&row(RowOp::Update, None, Some(r2), Some(r1)));
        let delete = keys(&row(RowOp::Delete, None, Some(r2), Some(r2)));
        assert_eq!(update.len(), 2);
        assert!(update.contains(&insert[0]));
        assert!(update.contains(&delete[0]));
        let other = keys(&row(RowOp::Insert, None, Some(r#"{"id":2,"v":0}"#), None));
        assert!(!update.contains(&other[0]));
        // No image at all: the table.
        assert_eq!(
            keys(&row(RowOp::Update, None, Some(r2), None)),
            vec![r#"["public","t"]"#]
        );
        assert!(order_keys(
            &Event {
                kind: EventKind::Schema {
                    command: "ALTER TABLE".into()
                },
                ..row(RowOp::Insert, None, None, None)
            },
            &RowNames::Image
        )
        .is_none());
    }

    #[test]
    fn under_replica_identity_full_a_primary_key_from_the_catalog_names_the_row() {
        let pk = RowNames::Key(vec!["id".to_string()].into());
        let insert = keys_by(
            &row(RowOp::Insert, None, Some(r#"{"v":0,"id":1}"#), None),
            &pk,
        );
        assert_eq!(insert, vec![r#"["public","t"]{"id":1}"#]);
        // Deleted, then inserted again with other values: the same row.
        let delete = keys_by(
            &row(
                RowOp::Delete,
                None,
                Some(r#"{"v":5,"id":1}"#),
                Some(r#"{"v":5,"id":1}"#),
            ),
            &pk,
        );
        assert_eq!(delete, insert);
        let moved = keys_by(
            &row(
                RowOp::Update,
                None,
                Some(r#"{"v":0,"id":2}"#),
                Some(r#"{"v":0,"id":1}"#),
            ),
            &pk,
        );
        assert_eq!(
            moved,
            vec![r#"["public","t"]{"id":2}"#, r#"["public","t"]{"id":1}"#]
        );
        // A key column missing from the image: the table.
        let odd = keys_by(&row(RowOp::Insert, None, Some(r#"{"v":0}"#), None), &pk);
        assert_eq!(odd, vec![r#"["public","t"]"#]);
        assert_eq!(
            keys_by(
                &row(RowOp::Insert, None, Some(r#"{"id":1}"#), None),
                &RowNames::Table
            ),
            vec![r#"["public","t"]"#]
        );
    }
}
