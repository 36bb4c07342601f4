//! What a member wants of the room's events: its filter (tables, operations, a row filter,
//! narrowed by a realtime token's table list), the bounds of its subscription (`since`, the WAL
//! position it joined at) and what its identity may see. [`Interest::decide`] is the one
//! per-event decision of live delivery ([`super::room`]) and catching up ([`super::catch_up`])
//! alike.

use std::collections::HashSet;

use serde_json::Value;

use crate::bus::{Event, EventKind};
use crate::visibility::{Identity, Verdict};
use fluxbase_replication::pgoutput::Lsn;

/// A subscriber's filter (from `subscribe`, narrowed by a realtime token's table list).
#[derive(Clone, Debug, Default)]
pub(super) struct Filter {
    pub(super) tables: Option<HashSet<String>>,
    pub(super) token_tables: Option<HashSet<String>>,
    pub(super) operations: Option<HashSet<String>>,
    pub(super) row: Option<RowFilter>,
}

/// The most values a row filter's `in` list may name (as Supabase Realtime's `in` filter).
pub(super) const MAX_IN_VALUES: usize = 100;

#[derive(Clone, Debug)]
pub(super) struct RowFilter {
    column: String,
    op: String,
    values: Vec<String>,
}

impl RowFilter {
    /// `status=eq.paid`, `amount=gt.10`, `id=in.(1,2,3)`.
    fn parse(s: &str) -> Result<RowFilter, String> {
        let (column, rest) = s
            .split_once('=')
            .ok_or_else(|| format!("row filter {s:?}: expected column=op.value"))?;
        let (op, value) = rest
            .split_once('.')
            .ok_or_else(|| format!("row filter {s:?}: expected column=op.value"))?;
        let values = match op {
            "eq" | "neq" | "lt" | "lte" | "gt" | "gte" => vec![value.to_string()],
            "in" => {
                let inner = value
                    .strip_prefix('(')
                    .and_then(|v| v.strip_suffix(')'))
                    .ok_or_else(|| format!("row filter {s:?}: `in` takes (a,b,c)"))?;
                let values: Vec<String> = inner.split(',').map(|v| v.trim().to_string()).collect();
                // Each value is held for as long as the subscription and compared against every
                // event (red team rt4: 31,000 values in one 62 KB subscribe held ~1 MB).
                if values.len() > MAX_IN_VALUES {
                    return Err(format!(
                        "row filter: `in` takes at most {MAX_IN_VALUES} values, got {}",
                        values.len()
                    ));
                }
                values
            }
            other => return Err(format!("row filter {s:?}: unknown operator {other:?}")),
        };
        if column.is_empty() {
            return Err(format!("row filter {s:?}: no column"));
        }
        Ok(RowFilter {
            column: column.to_string(),
            op: op.to_string(),
            values,
        })
    }

    fn matches(&self, record: &Value) -> bool {
        let Some(actual) = record.get(&self.column) else {
            return false;
        };
        let cmp = |want: &str| -> Option<std::cmp::Ordering> {
            match actual {
                Value::Number(n) => {
                    let a = n.as_f64()?;
                    let b: f64 = want.parse().ok()?;
                    a.partial_cmp(&b)
                }
                Value::String(s) => Some(s.as_str().cmp(want)),
                Value::Bool(b) => Some(b.to_string().as_str().cmp(want)),
                Value::Null => (want == "null").then_some(std::cmp::Ordering::Equal),
                other => Some(other.to_string().as_str().cmp(want)),
            }
        };
        use std::cmp::Ordering::*;
        match self.op.as_str() {
            "eq" => cmp(&self.values[0]) == Some(Equal),
            "neq" => cmp(&self.values[0]).is_some_and(|o| o != Equal),
            "lt" => cmp(&self.values[0]) == Some(Less),
            "lte" => matches!(cmp(&self.values[0]), Some(Less | Equal)),
            "gt" => cmp(&self.values[0]) == Some(Greater),
            "gte" => matches!(cmp(&self.values[0]), Some(Greater | Equal)),
            "in" => self.values.iter().any(|v| cmp(v) == Some(Equal)),
            _ => false,
        }
    }
}

impl Filter {
    fn matches(&self, event: &Event, record: &dyn Fn() -> Value) -> bool {
        if let EventKind::Broadcast { .. } = event.kind {
            return true;
        }
        for tables in [&self.tables, &self.token_tables].into_iter().flatten() {
            match event.table.as_deref() {
                Some(t) if tables.contains(t) => {}
                _ => return false,
            }
        }
        if let EventKind::Row { operation } = event.kind {
            if let Some(ops) = &self.operations {
                if !ops.contains(operation.as_str()) {
                    return false;
                }
            }
            if let Some(row) = &self.row {
                return row.matches(&record());
            }
        }
        true
    }
}

/// What a member is to receive: the one decision, per event, of live delivery and of
/// catching up from the history alike.
pub(super) struct Interest {
    pub(super) filter: Filter,
    /// Live events of transactions that committed before the subscribe (commit LSN below this)
    /// are not this member's: they reach a new room again when its subscription rewinds the
    /// stream, or were still on their way when it joined.
    pub(super) committed_from: Lsn,
    /// A resume's `since`: nothing at or below it is sent, live or from the history (the client
    /// has it, even when the server lost it in a crash and the stream replays it).
    pub(super) since: Option<String>,
    /// Who it acts as for row-level security (see [`crate::visibility`]).
    pub(super) identity: Identity,
}

/// What one member gets of one event.
pub(super) enum Decision<'v> {
    Send,
    /// This `db_event` payload instead (see [`Verdict::SendInstead`]).
    SendInstead(&'v str),
    Skip,
}

impl Interest {
    fn wants(&self, event: &Event, record: &dyn Fn() -> Value) -> bool {
        event.commit_lsn >= self.committed_from
            && self
                .since
                .as_deref()
                .is_none_or(|since| event.id.as_str() > since)
            && self.filter.matches(event, record)
    }

    /// The one per-event decision of live delivery and catch-up alike: this subscription's
    /// bounds and filter, and what its identity may see (`verdict`; `None`, not decided: nothing).
    pub(super) fn decide<'v>(
        &self,
        event: &Event,
        verdict: Option<&'v Verdict>,
        record: &dyn Fn() -> Value,
        old_record: &dyn Fn() -> Value,
    ) -> Decision<'v> {
        match verdict {
            Some(Verdict::Send) if self.wants(event, record) => Decision::Send,
            Some(Verdict::SendInstead {
                payload,
                filter_on_old,
            }) => {
                // Matched against the visible row, never the hidden one.
                let row = if *filter_on_old { old_record } else { record };
                if self.wants(event, row) {
                    Decision::SendInstead(payload)
                } else {
                    Decision::Skip
                }
            }
            _ => Decision::Skip,
        }
    }
}

/// A row image of an event (`record` or `old`) as JSON (`Null` when absent).
pub(super) fn parse_row(text: Option<&str>) -> Value {
    text.and_then(|r| serde_json::from_str(r).ok())
        .unwrap_or(Value::Null)
}

pub(super) fn parse_filter(v: &Value) -> Result<Filter, String> {
    let mut f = Filter::default();
    if v.is_null() {
        return Ok(f);
    }
    let obj = v.as_object().ok_or("filter: expected an object")?;
    let list = |key: &str| -> Result<Option<HashSet<String>>, String> {
        match obj.get(key) {
            None | Some(Value::Null) => Ok(None),
            Some(Value::Array(items)) => items
                .iter()
                .map(|i| {
                    i.as_str()
                        .map(str::to_string)
                        .ok_or(format!("filter.{key}: expected strings"))
                })
                .collect::<Result<HashSet<_>, _>>()
                .map(Some),
            Some(_) => Err(format!("filter.{key}: expected an array of strings")),
        }
    };
    f.tables = list("tables")?;
    f.operations =
        list("operations")?.map(|ops| ops.into_iter().map(|o| o.to_uppercase()).collect());
    if let Some(ops) = &f.operations {
        if let Some(bad) = ops
            .iter()
            .find(|o| !matches!(o.as_str(), "INSERT" | "UPDATE" | "DELETE"))
        {
            return Err(format!("filter.operations: unknown operation {bad:?}"));
        }
    }
    f.row = match obj.get("row") {
        None | Some(Value::Null) => None,
        Some(Value::String(s)) => Some(RowFilter::parse(s)?),
        Some(_) => return Err("filter.row: expected a string like status=eq.paid".into()),
    };
    Ok(f)
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn row_filters_compare_numbers_strings_and_lists() {
        let rec = json!({ "status": "paid", "amount": 12.5, "id": 3 });
        let t = |s: &str| RowFilter::parse(s).unwrap().matches(&rec);
        assert!(t("status=eq.paid"));
        assert!(!t("status=neq.paid"));
        assert!(
            t("amount=gt.10")
                && t("amount=gte.12.5")
                && !t("amount=lt.12.5")
                && t("amount=lte.12.5")
        );
        assert!(t("id=in.(1,2,3)") && !t("id=in.(4,5)"));
        assert!(!t("missing=eq.x"));
        assert!(RowFilter::parse("status=like.x").is_err());
        assert!(RowFilter::parse("nonsense").is_err());
        assert!(RowFilter::parse("id=in.1,2").is_err());
        let list = |n: usize| {
            format!(
                "id=in.({})",
                (0..n).map(|i| i.to_string()).collect::<Vec<_>>().join(",")
            )
        };
        assert!(RowFilter::parse(&list(MAX_IN_VALUES)).is_ok());
        let e = RowFilter::parse(&list(MAX_IN_VALUES + 1)).unwrap_err();
        assert!(e.contains("at most 100 values"), "{e}");
    }
}
