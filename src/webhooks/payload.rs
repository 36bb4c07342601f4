//! What a receiver gets: the event type of a bus event and the guide's JSON body for it.

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
        } => ("null", event.old.as_deref().unwrap_or("null")),
        EventKind::Row { .. } => (
            event.record.as_deref().unwrap_or("null"),
            event.old.as_deref().unwrap_or("null"),
        ),
        _ => (&*event.payload, "null"),
    };
    let mut out = String::with_capacity(128 + new.len() + old.len());
    out.push_str("{\"event_type\":");
    out.push_str(&serde_json::to_string(event_type.as_str()).expect("str"));
    out.push_str(",\"project_id\":");
    out.push_str(&serde_json::to_string(project_id).expect("str"));
    out.push_str(",\"table_id\":");
    out.push_str(&serde_json::to_string(&event.table).expect("str"));
    out.push_str(",\"timestamp\":");
    out.push_str(&serde_json::to_string(&event.commit_timestamp).expect("str"));
    out.push_str(",\"event_id\":");
    out.push_str(&serde_json::to_string(&event.id).expect("str"));
    out.push_str(",\"data\":{\"new\":");
    out.push_str(new);
    out.push_str(",\"old\":");
    out.push_str(old);
    if matches!(event.kind, EventKind::Row { .. }) {
        crate::cdc::events::write_row_notes(&mut out, &event.unchanged_toast);
    }
    out.push_str("}}");
    out
}
