//! The outbox writer: one per project with webhooks, a durable subscriber of the project's bus
//! ([`crate::bus`]'s contract: events in commit order, a transaction's end acknowledged by
//! `ack(end_lsn)`). It stores each committed transaction's deliveries in
//! `fluxbase.webhook_deliveries` and acknowledges the transaction only after that commit, so the
//! change stream never confirms a change whose deliveries could still be lost.

use std::collections::HashSet;
use std::sync::{Arc, Weak};
use std::time::Duration;

use chrono::{DateTime, Utc};

use super::keys::{KeyColumns, RowNames};
use super::payload::{event_type, order_keys, payload};
use super::EventType;
use super::Shared;
use crate::bus::{Event, Subscription};
use crate::control::deliveries::{self, NewDeliveries};
use crate::control::webhooks::{self as hooks, Subscriber};
use crate::secrets::random_base62;

/// Most events whose deliveries the outbox writer stores with one INSERT (a larger transaction
/// still goes in one).
const OUTBOX_BATCH: usize = 1024;

/// Starts the project's outbox writer, unless it runs already.
pub(super) fn start(shared: &Arc<Shared>, project_id: &str) {
    let mut writers = shared.writers.lock().expect("poisoned");
    if writers.get(project_id).is_some_and(|t| !t.is_finished()) {
        return;
    }
    // Subscribed now, not in the task: a change stream started right after this call waits
    // for the writer from its first event.
    let sub = shared.bus.project(project_id).subscribe_durable();
    let task = tokio::spawn(run(Arc::downgrade(shared), sub, project_id.to_string()));
    writers.insert(project_id.to_string(), task);
}

/// An enabled webhook, as the writer matches events against it.
struct Hook {
    id: String,
    events: Vec<EventType>,
    tables: Option<Vec<String>>,
    created_at: DateTime<Utc>,
}

impl From<Subscriber> for Hook {
    fn from(s: Subscriber) -> Self {
        Hook {
            id: s.id,
            // Registration accepts only known types: an unknown one would match nothing.
            events: s.events.iter().filter_map(|e| e.parse().ok()).collect(),
            tables: s.tables,
            created_at: s.created_at,
        }
    }
}

impl Hook {
    /// Its event type and table, committed after the webhook was created.
    fn wants(&self, event: &Event, event_type: EventType) -> bool {
        let commit: Option<DateTime<Utc>> = event.commit_timestamp.parse().ok();
        self.events.contains(&event_type)
            && self.tables.as_ref().is_none_or(|t| {
                event
                    .table
                    .as_deref()
                    .is_some_and(|table| t.iter().any(|n| n == table))
            })
            && commit.is_none_or(|c| c >= self.created_at)
    }
}

/// Stores each committed transaction's deliveries, then acknowledges it on the bus.
///
/// Transactions that are already queued when one completes are stored with it, in one INSERT
/// (up to [`OUTBOX_BATCH`] events): when the control database answers slowly, the writer falls
/// behind by one batch instead of building a backlog one round trip per transaction, which at
/// 1,000 transactions/s on a loaded machine grew to seconds.
async fn run(shared: Weak<Shared>, mut sub: Subscription, project_id: String) {
    let mut batch: Vec<Arc<Event>> = Vec::new();
    let mut key_columns = match shared.upgrade() {
        Some(s) => KeyColumns::new(s.cluster.clone(), &project_id),
        None => return,
    };
    loop {
        // At least one whole transaction...
        loop {
            let Some(event) = sub.recv().await else {
                return;
            };
            let last = event.last_in_transaction;
            batch.push(event);
            if last {
                break;
            }
        }
        // ...and whatever is already queued behind it. Only whole transactions are stored; the
        // rest of the last one waits in `batch` for its end.
        while batch.len() < OUTBOX_BATCH {
            let Ok(event) = sub.events.try_recv() else {
                break;
            };
            batch.push(event);
        }
        let complete = 1 + batch
            .iter()
            .rposition(|e| e.last_in_transaction)
            .expect("a whole transaction was received");
        let end = batch[complete - 1].end_lsn;
        let Some(shared) = shared.upgrade() else {
            return;
        };
        let mut backoff = Duration::from_millis(200);
        loop {
            match store(&shared, &project_id, &batch[..complete], &mut key_columns).await {
                Ok(hooks) => {
                    if !hooks.is_empty() {
                        shared.queue.stored(&project_id, hooks);
                    }
                    break;
                }
                Err(e) => {
                    // Never acknowledge what is not stored: retry until the control DB answers.
                    tracing::warn!(project_id, error = %e, "storing webhook deliveries; retrying");
                    tokio::time::sleep(backoff).await;
                    backoff = (backoff * 2).min(Duration::from_secs(10));
                }
            }
        }
        sub.ack(end);
        batch.drain(..complete);
    }
}

/// Stores the deliveries of whole transactions' events; the webhooks that got new ones.
async fn store(
    shared: &Shared,
    project_id: &str,
    events: &[Arc<Event>],
    key_columns: &mut KeyColumns,
) -> anyhow::Result<HashSet<String>> {
    let subscribers = hooks::enabled_subscribers(&shared.work.get().await?, project_id).await?;
    if subscribers.is_empty() {
        return Ok(HashSet::new());
    }
    let hooks: Vec<Hook> = subscribers.into_iter().map(Hook::from).collect();
    let mut new = NewDeliveries::default();
    for event in events {
        let Some(kind) = event_type(event) else {
            continue;
        };
        if kind == EventType::SchemaChanged {
            // The catalog may have changed from here on.
            key_columns.forget();
        }
        let mut body = None;
        let mut keys = None;
        for hook in hooks.iter().filter(|h| h.wants(event, kind)) {
            let body = body.get_or_insert_with(|| payload(project_id, event, kind));
            if keys.is_none() {
                let names = match (&event.row_key, &event.schema, &event.table) {
                    (None, Some(schema), Some(table)) if kind != EventType::SchemaChanged => {
                        key_columns.of(&shared.work, schema, table).await
                    }
                    _ => RowNames::Table,
                };
                keys = Some(order_keys(event, &names));
            }
            let keys = keys.as_ref().expect("set above");
            new.ids.push(format!("dlv_{}", random_base62(20)));
            new.webhook_ids.push(hook.id.clone());
            new.event_ids.push(event.id.clone());
            new.event_types.push(kind.as_str().to_string());
            new.bodies.push(body.clone());
            new.row_keys.push(keys.clone());
        }
    }
    if new.ids.is_empty() {
        return Ok(HashSet::new());
    }
    let n = deliveries::insert_batch(&shared.work.get().await?, project_id, &new).await?;
    // All of them were there already (a transaction replayed after a restart): nothing new.
    if n == 0 {
        return Ok(HashSet::new());
    }
    Ok(new.webhook_ids.into_iter().collect())
}
