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

/// Most events whose deliveries the outbox writer stores with one INSERT.
const OUTBOX_BATCH: usize = 1024;
/// Most bytes of events (their rows and payloads) the writer holds before storing their
/// deliveries: a larger transaction is stored in parts as it arrives, so the writer never holds
/// more than about this plus one event (≤ `cdc_max_row_bytes` per row image), whatever the
/// transaction's size (the change stream spills large transactions to disk; holding them whole
/// here undid that: ten 14 MB rows in one transaction took 1 GB).
const OUTBOX_BATCH_BYTES: usize = 4 << 20;

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
///
/// A transaction larger than a batch ([`OUTBOX_BATCH`] events or [`OUTBOX_BATCH_BYTES`]) is
/// stored in parts, and acknowledged after its last part: its deliveries are committed changes,
/// so sending the first before the last are stored changes nothing a receiver sees, and after a
/// crash between parts the stream replays the whole transaction, whose stored deliveries are
/// skipped (`UNIQUE (webhook_id, event_id)`: same ids, never twice).
async fn run(shared: Weak<Shared>, mut sub: Subscription, project_id: String) {
    let mut batch: Vec<Arc<Event>> = Vec::new();
    let mut key_columns = match shared.upgrade() {
        Some(s) => KeyColumns::new(s.cluster.clone(), &project_id),
        None => return,
    };
    loop {
        // Until a transaction has ended and nothing more is queued, or the batch is full.
        let mut bytes = 0;
        let mut ended = false;
        while batch.len() < OUTBOX_BATCH && bytes < OUTBOX_BATCH_BYTES {
            let event = if ended {
                match sub.try_recv() {
                    Some(event) => event,
                    None => break,
                }
            } else {
                match sub.recv().await {
                    Some(event) => event,
                    None => return,
                }
            };
            ended |= event.last_in_transaction;
            bytes += event.held_bytes();
            batch.push(event);
        }
        // Acknowledged up to the last transaction that ends in the batch.
        let end = batch
            .iter()
            .rev()
            .find(|e| e.last_in_transaction)
            .map(|e| e.end_lsn);
        let Some(shared) = shared.upgrade() else {
            return;
        };
        let mut backoff = Duration::from_millis(200);
        loop {
            match store(&shared, &project_id, &batch, &mut key_columns).await {
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
        if let Some(end) = end {
            sub.ack(end);
        }
        batch.clear();
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
            // One text per event, shared by its deliveries to every webhook.
            let body = *body.get_or_insert_with(|| {
                new.texts.push(payload(project_id, event, kind));
                new.texts.len() - 1
            });
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
            new.bodies.push(body);
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
