//! What a receiver gets: the event type of a bus event and the guide's JSON body for it.

use std::fmt;
use std::str::FromStr;

use serde::Serialize;

use crate::bus::{Event, EventKind};

/// A webhook event type, as registered and as sent in `event_type` and `X-Fluxbase-Event`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, utoipa::ToSchema)]
pub enum EventType {
    #[serde(rename = "row.inserted")]
    RowInserted,
    #[serde(rename = "row.updated")]
    RowUpdated,
    #[serde(rename = "row.deleted")]
    RowDeleted,
    #[serde(rename = "schema.changed")]
    SchemaChanged,
}

impl EventType {
    pub const ALL: [EventType; 4] = [
        EventType::RowInserted,
        EventType::RowUpdated,
        EventType::RowDeleted,
        EventType::SchemaChanged,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            EventType::RowInserted => "row.inserted",
            EventType::RowUpdated => "row.updated",
            EventType::RowDeleted => "row.deleted",
            EventType::SchemaChanged => "schema.changed",
        }
    }

    /// The webhook event type of a bus event; broadcasts have none.
    pub fn of(event: &Event) -> Option<EventType> {
        match &event.kind {
            EventKind::Row {
                operation: "INSERT",
            } => Some(EventType::RowInserted),
            EventKind::Row {
                operation: "UPDATE",
            } => Some(EventType::RowUpdated),
            EventKind::Row {
                operation: "DELETE",
            } => Some(EventType::RowDeleted),
            EventKind::Row { .. } => None,
            EventKind::Schema { .. } => Some(EventType::SchemaChanged),
            EventKind::Broadcast { .. } => None,
        }
    }
}

impl fmt::Display for EventType {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl FromStr for EventType {
    type Err = ();

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        EventType::ALL
            .into_iter()
            .find(|t| t.as_str() == s)
            .ok_or(())
    }
}

/// The guide's payload: `{event_type, project_id, table_id, timestamp, event_id, data:{new, old}}`;
/// a row change's `data` also carries what its WebSocket `db_event` payload says beyond the rows
/// (`unchangedToast`), written by the same function ([`crate::cdc::events::write_row_notes`]).
pub fn payload(project_id: &str, event: &Event, event_type: EventType) -> String {
    let (new, old) = match &event.kind {
        EventKind::Row {
            operation: "DELETE",
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn event_types_read_as_they_are_written() {
        for t in EventType::ALL {
            assert_eq!(t.as_str().parse::<EventType>(), Ok(t));
            assert_eq!(serde_json::to_value(t).unwrap(), t.as_str());
        }
        assert!("row.upserted".parse::<EventType>().is_err());
    }
}
