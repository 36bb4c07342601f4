//! Signed webhooks with at-least-once delivery.
//!
//! ```text
//!  ProjectBus ─durable subscription─► outbox writer ── one control-DB transaction per committed
//!                                        │              change set: INSERT webhook_deliveries
//!                                        └─ ack(end_lsn) only after that commit ─► slot confirmed
//!  delivery worker ─ due rows, per webhook in commit order ─► egress (SSRF-checked reqwest) ─► receiver
//!        └─ 2xx: delivered · 410: endpoint disabled · else: retry with backoff, then failed
//! ```
//!
//! * Durable: a change's deliveries are in the outbox before the change stream may confirm it, so
//!   a crash anywhere loses none; a replay after a crash finds the rows already there
//!   (`UNIQUE (webhook_id, event_id)`), so it adds no duplicate.
//! * The same delivery keeps its id (`X-Fluxbase-Delivery`, `webhook-id`) across retries;
//!   receivers de-duplicate on it. Both signatures cover the exact bytes sent.
//! * Retries: about 5 s, 30 s, 2 min, 10 min, 1 h, 3 h, 6 h, then every 6 h until 3 days after the
//!   change, with ±10 % jitter; `Retry-After` is honoured (up to 6 h). An endpoint that has failed
//!   everything for 24 hours, or answered 410, is disabled with a reason.
//! * Per webhook one delivery is in flight at a time, oldest first: first attempts follow commit
//!   order.

pub mod egress;

use std::collections::{HashMap, HashSet};
use std::sync::{Arc, Mutex, Weak};
use std::time::Duration;

use chrono::{DateTime, Utc};
use serde::Deserialize;
use serde_json::{json, Value};
use tokio::sync::Notify;
use warp::http::StatusCode;

use crate::api::error::{ApiError, ApiResult};
use crate::app::App;
use crate::auth::Access;
use crate::bus::{Event, EventKind, RowOp};
use crate::secrets::{random_base62, random_bytes};

pub const EVENT_TYPES: [&str; 4] = [
    "row.inserted",
    "row.updated",
    "row.deleted",
    "schema.changed",
];
/// Retry delays after each failed attempt; the last repeats until `GIVE_UP_AFTER`.
const BACKOFF: [u64; 7] = [5, 30, 120, 600, 3600, 3 * 3600, 6 * 3600];
const GIVE_UP_AFTER: chrono::Duration = chrono::Duration::days(3);
const DISABLE_AFTER_FAILING: chrono::Duration = chrono::Duration::hours(24);
const RESPONSE_BODY_CAP: usize = 4096;
const RETENTION: &str = "7 days";

/// The webhook event type of a bus event; broadcasts have none.
pub fn event_type(event: &Event) -> Option<&'static str> {
    match &event.kind {
        EventKind::Row { operation } => Some(match operation {
            RowOp::Insert => "row.inserted",
            RowOp::Update => "row.updated",
            RowOp::Delete => "row.deleted",
        }),
        EventKind::Schema { .. } => Some("schema.changed"),
        EventKind::Broadcast { .. } => None,
    }
}

/// The guide's payload: `{event_type, project_id, table_id, timestamp, event_id, data:{new, old}}`;
/// a row change's `data` also carries what its WebSocket `db_event` payload says beyond the rows
/// (`unchangedToast`), written by the same function ([`crate::cdc::events::write_row_notes`]).
pub fn payload(project_id: &str, event: &Event, event_type: &str) -> String {
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
    out.push_str(&serde_json::to_string(event_type).expect("str"));
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

/// `sha256=<hex>`: the guide's `X-Fluxbase-Signature` over the raw body, keyed by the secret
/// string as given.
pub fn guide_signature(secret: &str, body: &[u8]) -> String {
    let key = ring::hmac::Key::new(ring::hmac::HMAC_SHA256, secret.as_bytes());
    format!(
        "sha256={}",
        hex::encode(ring::hmac::sign(&key, body).as_ref())
    )
}

/// Standard Webhooks `webhook-signature`: `v1,<base64 HMAC-SHA256 of "id.timestamp.body">`, keyed
/// by the base64 part of a `whsec_` secret (or the secret's bytes when it has no such prefix).
pub fn standard_signature(secret: &str, id: &str, timestamp: i64, body: &[u8]) -> String {
    use base64::Engine;
    let b64 = base64::engine::general_purpose::STANDARD;
    let key_bytes = secret
        .strip_prefix("whsec_")
        .and_then(|k| b64.decode(k).ok())
        .unwrap_or_else(|| secret.as_bytes().to_vec());
    let key = ring::hmac::Key::new(ring::hmac::HMAC_SHA256, &key_bytes);
    let mut ctx = ring::hmac::Context::with_key(&key);
    ctx.update(id.as_bytes());
    ctx.update(b".");
    ctx.update(timestamp.to_string().as_bytes());
    ctx.update(b".");
    ctx.update(body);
    format!("v1,{}", b64.encode(ctx.sign().as_ref()))
}

/// The delay before attempt `attempts + 1`, with ±10 % jitter.
pub fn backoff(attempts: i32) -> Duration {
    let base = BACKOFF[(attempts.max(1) as usize - 1).min(BACKOFF.len() - 1)] as f64;
    let jitter = (random_bytes::<1>()[0] as f64 / 255.0 - 0.5) * 0.2;
    Duration::from_secs_f64(base * (1.0 + jitter))
}

#[derive(Clone, Debug)]
struct Hook {
    id: String,
    events: Vec<String>,
    tables: Option<Vec<String>>,
    created_at: DateTime<Utc>,
}

impl Hook {
    fn wants(&self, event: &Event, event_type: &str) -> bool {
        let commit: Option<DateTime<Utc>> = event.commit_timestamp.parse().ok();
        self.events.iter().any(|e| e == event_type)
            && self
                .tables
                .as_ref()
                .is_none_or(|t| event.table.as_ref().is_some_and(|table| t.contains(table)))
            && commit.is_none_or(|c| c >= self.created_at)
    }
}

/// Webhook machinery of this server: outbox writers per project and the delivery worker.
#[derive(Default)]
pub struct Webhooks {
    writers: Mutex<HashMap<String, tokio::task::JoinHandle<()>>>,
    /// Wakes the delivery worker.
    wake: Notify,
    /// Webhooks with deliveries stored since the worker last looked (or that it found busy):
    /// the worker drains these without asking the database which webhooks have due deliveries.
    fresh: Mutex<HashSet<String>>,
    /// Set when the worker should look for due deliveries of every webhook at once (a webhook
    /// enabled again, a delivery re-queued), not only at its periodic scan.
    scan: std::sync::atomic::AtomicBool,
    /// Webhooks being drained.
    busy: Mutex<HashSet<String>>,
    client: Mutex<Option<reqwest::Client>>,
}

impl Webhooks {
    /// New deliveries of `hooks` are stored: the worker sends them at once.
    fn stored(&self, hooks: impl IntoIterator<Item = String>) {
        self.fresh.lock().expect("poisoned").extend(hooks);
        self.wake.notify_one();
    }

    /// Deliveries may have become due outside the outbox: the worker scans at once.
    fn rescan(&self) {
        self.scan.store(true, std::sync::atomic::Ordering::Relaxed);
        self.wake.notify_one();
    }
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct CreateWebhook {
    pub project_id: String,
    pub url: String,
    pub events: Vec<String>,
    pub tables: Option<Vec<String>>,
    pub secret: Option<String>,
    pub enabled: Option<bool>,
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct PatchWebhook {
    pub project_id: String,
    pub webhook_id: String,
    pub url: Option<String>,
    pub events: Option<Vec<String>>,
    pub tables: Option<Vec<String>>,
    pub enabled: Option<bool>,
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct Redeliver {
    pub project_id: String,
    pub delivery_id: String,
}

fn validate_events(events: &[String]) -> ApiResult<()> {
    if events.is_empty() {
        return Err(ApiError::BadRequest(
            "events: at least one event type".into(),
        ));
    }
    if let Some(bad) = events.iter().find(|e| !EVENT_TYPES.contains(&e.as_str())) {
        return Err(ApiError::BadRequest(format!(
            "events: unknown event {bad:?}; expected {}",
            EVENT_TYPES.join(", ")
        )));
    }
    Ok(())
}

fn webhook_json(r: &tokio_postgres::Row) -> Value {
    json!({
        "id": r.get::<_, String>("id"),
        "url": r.get::<_, String>("url"),
        "events": r.get::<_, Vec<String>>("events"),
        "tables": r.get::<_, Option<Vec<String>>>("tables"),
        "enabled": r.get::<_, bool>("enabled"),
        "disabledReason": r.get::<_, Option<String>>("disabled_reason"),
        "createdAt": r.get::<_, DateTime<Utc>>("created_at"),
    })
}

fn delivery_json(r: &tokio_postgres::Row) -> Value {
    json!({
        "id": r.get::<_, String>("id"),
        "webhookId": r.get::<_, String>("webhook_id"),
        "eventId": r.get::<_, String>("event_id"),
        "eventType": r.get::<_, String>("event_type"),
        "status": r.get::<_, String>("status"),
        "attempts": r.get::<_, i32>("attempts"),
        "responseStatus": r.get::<_, Option<i32>>("response_status"),
        "responseBody": r.get::<_, Option<String>>("response_body"),
        "lastError": r.get::<_, Option<String>>("last_error"),
        "nextAttemptAt": r.get::<_, DateTime<Utc>>("next_attempt_at"),
        "createdAt": r.get::<_, DateTime<Utc>>("created_at"),
        "deliveredAt": r.get::<_, Option<DateTime<Utc>>>("delivered_at"),
    })
}

const WEBHOOK_COLUMNS: &str = "id, url, events, tables, enabled, disabled_reason, created_at";
const DELIVERY_COLUMNS: &str = "id, webhook_id, event_id, event_type, status, attempts, \
     response_status, response_body, last_error, next_attempt_at, created_at, delivered_at";

impl App {
    fn http_client(&self) -> reqwest::Client {
        let mut c = self.webhooks.client.lock().expect("poisoned");
        c.get_or_insert_with(|| {
            egress::client(
                self.config.webhook_allow_private,
                Duration::from_secs(10),
                Duration::from_secs(10),
            )
        })
        .clone()
    }

    pub async fn create_webhook(
        self: &Arc<App>,
        access: &Access,
        req: CreateWebhook,
    ) -> ApiResult<(StatusCode, Value)> {
        access.require_developer("Managing webhooks")?;
        validate_events(&req.events)?;
        let url = egress::validate_url(&req.url, self.config.webhook_allow_private)
            .await
            .map_err(|e| ApiError::BadRequest(format!("url: {e}")))?;
        let secret = match req.secret {
            Some(s) if s.len() < 16 || s.len() > 256 => {
                return Err(ApiError::BadRequest("secret: 16 to 256 characters".into()))
            }
            Some(s) => s,
            None => {
                use base64::Engine;
                format!(
                    "whsec_{}",
                    base64::engine::general_purpose::STANDARD.encode(random_bytes::<24>())
                )
            }
        };
        let id = format!("wh_{}", random_base62(16));
        let client = self.control.get().await?;
        let row = client
            .query_one(
                &format!(
                    "INSERT INTO fluxbase.webhooks (id, project_id, url, events, tables, secret, enabled)
                     VALUES ($1, $2, $3, $4, $5, $6, $7) RETURNING {WEBHOOK_COLUMNS}"
                ),
                &[&id, &access.project.id, &url.as_str(), &req.events, &req.tables, &secret, &req.enabled.unwrap_or(true)],
            )
            .await?;
        drop(client);
        self.start_outbox_writer(&access.project.id);
        Ok((
            StatusCode::CREATED,
            json!({ "success": true, "webhook": webhook_json(&row), "secret": secret }),
        ))
    }

    pub async fn list_webhooks(&self, access: &Access) -> ApiResult<(StatusCode, Value)> {
        let client = self.control.get().await?;
        let rows = client
            .query(
                &format!("SELECT {WEBHOOK_COLUMNS} FROM fluxbase.webhooks WHERE project_id = $1 ORDER BY created_at, id"),
                &[&access.project.id],
            )
            .await?;
        let webhooks: Vec<Value> = rows.iter().map(webhook_json).collect();
        Ok((
            StatusCode::OK,
            json!({ "success": true, "webhooks": webhooks }),
        ))
    }

    pub async fn patch_webhook(
        &self,
        access: &Access,
        req: PatchWebhook,
    ) -> ApiResult<(StatusCode, Value)> {
        access.require_developer("Managing webhooks")?;
        if let Some(events) = &req.events {
            validate_events(events)?;
        }
        let url = match &req.url {
            Some(u) => Some(
                egress::validate_url(u, self.config.webhook_allow_private)
                    .await
                    .map_err(|e| ApiError::BadRequest(format!("url: {e}")))?
                    .to_string(),
            ),
            None => None,
        };
        let client = self.control.get().await?;
        let row = client
            .query_opt(
                &format!(
                    "UPDATE fluxbase.webhooks SET url = coalesce($3, url), events = coalesce($4, events),
                            tables = CASE WHEN $6 THEN $5 ELSE tables END,
                            enabled = coalesce($7, enabled),
                            disabled_reason = CASE WHEN $7 THEN NULL ELSE disabled_reason END,
                            failing_since = CASE WHEN $7 THEN NULL ELSE failing_since END
                     WHERE id = $1 AND project_id = $2 RETURNING {WEBHOOK_COLUMNS}"
                ),
                &[&req.webhook_id, &access.project.id, &url, &req.events, &req.tables, &req.tables.is_some(), &req.enabled],
            )
            .await?
            .ok_or_else(|| ApiError::NotFound(format!("webhookId: no webhook {:?} in this project", req.webhook_id)))?;
        self.webhooks.rescan();
        Ok((
            StatusCode::OK,
            json!({ "success": true, "webhook": webhook_json(&row) }),
        ))
    }

    pub async fn delete_webhook(
        &self,
        access: &Access,
        webhook_id: &str,
    ) -> ApiResult<(StatusCode, Value)> {
        access.require_developer("Managing webhooks")?;
        let client = self.control.get().await?;
        let n = client
            .execute(
                "DELETE FROM fluxbase.webhooks WHERE id = $1 AND project_id = $2",
                &[&webhook_id, &access.project.id],
            )
            .await?;
        if n == 0 {
            return Err(ApiError::NotFound(format!(
                "webhookId: no webhook {webhook_id:?} in this project"
            )));
        }
        Ok((StatusCode::OK, json!({ "success": true })))
    }

    pub async fn list_deliveries(
        &self,
        access: &Access,
        webhook_id: Option<&str>,
        status: Option<&str>,
    ) -> ApiResult<(StatusCode, Value)> {
        if let Some(s) = status {
            if !matches!(s, "pending" | "delivered" | "failed") {
                return Err(ApiError::BadRequest(
                    "status: pending, delivered or failed".into(),
                ));
            }
        }
        let client = self.control.get().await?;
        let rows = client
            .query(
                &format!(
                    "SELECT {DELIVERY_COLUMNS} FROM fluxbase.webhook_deliveries
                     WHERE project_id = $1 AND ($2::text IS NULL OR webhook_id = $2)
                       AND ($3::text IS NULL OR status = $3)
                     ORDER BY created_at DESC, event_id DESC LIMIT 500"
                ),
                &[&access.project.id, &webhook_id, &status],
            )
            .await?;
        let deliveries: Vec<Value> = rows.iter().map(delivery_json).collect();
        Ok((
            StatusCode::OK,
            json!({ "success": true, "deliveries": deliveries }),
        ))
    }

    pub async fn redeliver(
        &self,
        access: &Access,
        req: Redeliver,
    ) -> ApiResult<(StatusCode, Value)> {
        access.require_developer("Managing webhooks")?;
        let client = self.control.get().await?;
        let row = client
            .query_opt(
                &format!(
                    "UPDATE fluxbase.webhook_deliveries SET status = 'pending', next_attempt_at = now(),
                            attempts = 0, last_error = NULL
                     WHERE id = $1 AND project_id = $2 RETURNING {DELIVERY_COLUMNS}"
                ),
                &[&req.delivery_id, &access.project.id],
            )
            .await?
            .ok_or_else(|| ApiError::NotFound(format!("deliveryId: no delivery {:?} in this project", req.delivery_id)))?;
        self.webhooks.rescan();
        Ok((
            StatusCode::OK,
            json!({ "success": true, "delivery": delivery_json(&row) }),
        ))
    }

    /// Starts the outbox writers of projects with webhooks and the delivery worker.
    pub async fn start_webhooks(self: &Arc<App>) -> anyhow::Result<()> {
        let rows = self
            .control
            .get()
            .await?
            .query("SELECT DISTINCT project_id FROM fluxbase.webhooks", &[])
            .await?;
        for r in rows {
            self.start_outbox_writer(r.get(0));
        }
        tokio::spawn(run_delivery_worker(Arc::downgrade(self)));
        Ok(())
    }

    /// The project's outbox writer: a durable bus subscriber that stores deliveries.
    pub fn start_outbox_writer(self: &Arc<App>, project_id: &str) {
        let mut writers = self.webhooks.writers.lock().expect("poisoned");
        if writers.get(project_id).is_some_and(|t| !t.is_finished()) {
            return;
        }
        let task = tokio::spawn(run_outbox_writer(
            Arc::downgrade(self),
            project_id.to_string(),
        ));
        writers.insert(project_id.to_string(), task);
    }

    pub fn stop_webhooks(&self) {
        for (_, t) in self.webhooks.writers.lock().expect("poisoned").drain() {
            t.abort();
        }
    }
}

async fn load_hooks(app: &App, project_id: &str) -> anyhow::Result<Vec<Hook>> {
    let rows = app
        .control
        .get()
        .await?
        .query(
            "SELECT id, events, tables, created_at FROM fluxbase.webhooks
             WHERE project_id = $1 AND enabled",
            &[&project_id],
        )
        .await?;
    Ok(rows
        .iter()
        .map(|r| Hook {
            id: r.get(0),
            events: r.get(1),
            tables: r.get(2),
            created_at: r.get(3),
        })
        .collect())
}

/// Most events whose deliveries the outbox writer stores with one INSERT (a larger transaction
/// still goes in one).
const OUTBOX_BATCH: usize = 1024;

/// Stores each committed transaction's deliveries, then acknowledges it on the bus.
///
/// Transactions that are already queued when one completes are stored with it, in one INSERT
/// (up to [`OUTBOX_BATCH`] events): when the control database answers slowly, the writer falls
/// behind by one batch instead of building a backlog one round trip per transaction, which at
/// 1,000 transactions/s on a loaded machine grew to seconds.
async fn run_outbox_writer(app: Weak<App>, project_id: String) {
    let Some(strong) = app.upgrade() else { return };
    let mut sub = strong.bus.project(&project_id).subscribe_durable();
    drop(strong);
    let mut batch: Vec<Arc<Event>> = Vec::new();
    loop {
        // At least one whole transaction...
        loop {
            let Some(event) = sub.events.recv().await else {
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
        let Some(app) = app.upgrade() else { return };
        let mut backoff = Duration::from_millis(200);
        loop {
            match store_deliveries(&app, &project_id, &batch[..complete]).await {
                Ok(hooks) => {
                    if !hooks.is_empty() {
                        app.webhooks.stored(hooks);
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
async fn store_deliveries(
    app: &App,
    project_id: &str,
    events: &[Arc<Event>],
) -> anyhow::Result<HashSet<String>> {
    let hooks = load_hooks(app, project_id).await?;
    if hooks.is_empty() {
        return Ok(HashSet::new());
    }
    let (mut ids, mut hook_ids, mut event_ids, mut kinds, mut bodies) =
        (Vec::new(), Vec::new(), Vec::new(), Vec::new(), Vec::new());
    for event in events {
        let Some(kind) = event_type(event) else {
            continue;
        };
        let mut body = None;
        for hook in hooks.iter().filter(|h| h.wants(event, kind)) {
            let body = body.get_or_insert_with(|| payload(project_id, event, kind));
            ids.push(format!("dlv_{}", random_base62(20)));
            hook_ids.push(hook.id.clone());
            event_ids.push(event.id.clone());
            kinds.push(kind.to_string());
            bodies.push(body.clone());
        }
    }
    if ids.is_empty() {
        return Ok(HashSet::new());
    }
    // One statement for the transactions' deliveries: atomic, and one round trip.
    let client = app.control.get().await?;
    let stmt = client
        .prepare_cached(
            "INSERT INTO fluxbase.webhook_deliveries (id, webhook_id, project_id, event_id, event_type, body)
             SELECT u.id, u.webhook_id, $6, u.event_id, u.event_type, u.body
             FROM unnest($1::text[], $2::text[], $3::text[], $4::text[], $5::text[])
                  AS u(id, webhook_id, event_id, event_type, body)
             ON CONFLICT (webhook_id, event_id) DO NOTHING",
        )
        .await?;
    let n = client
        .execute(
            &stmt,
            &[&ids, &hook_ids, &event_ids, &kinds, &bodies, &project_id],
        )
        .await?;
    // All of them were there already (a transaction replayed after a restart): nothing new.
    if n == 0 {
        return Ok(HashSet::new());
    }
    Ok(hook_ids.into_iter().collect())
}

/// Sends due deliveries, one at a time per webhook, oldest first.
///
/// It does not query for due webhooks on every wake-up: at 1,000 transactions/s that query
/// ran hundreds of times a second, and its partial index keeps the entries of delivered rows
/// until a vacuum, so each run grew slower (milliseconds after a burst) and the queue behind it
/// grew to seconds. New deliveries name their webhook instead ([`Webhooks::stored`]), and the
/// scan runs on a timer (`webhook_scan_ms`): for retries whose time has come, and for what a
/// restart left pending.
async fn run_delivery_worker(app: Weak<App>) {
    let mut last_prune = std::time::Instant::now() - Duration::from_secs(3600);
    let mut last_scan: Option<std::time::Instant> = None;
    loop {
        let Some(strong) = app.upgrade() else { return };
        if last_prune.elapsed() > Duration::from_secs(3600) {
            last_prune = std::time::Instant::now();
            if let Ok(c) = strong.control.get().await {
                let _ = c
                    .execute(
                        &format!(
                            "DELETE FROM fluxbase.webhook_deliveries
                             WHERE status = 'delivered' AND delivered_at < now() - interval '{RETENTION}'"
                        ),
                        &[],
                    )
                    .await;
            }
        }
        let scan_interval = Duration::from_millis(strong.config.webhook_scan_ms.max(10));
        let hooks = &strong.webhooks;
        let mut candidates = std::mem::take(&mut *hooks.fresh.lock().expect("poisoned"));
        let asked = hooks.scan.swap(false, std::sync::atomic::Ordering::Relaxed);
        if asked || last_scan.is_none_or(|t| t.elapsed() >= scan_interval) {
            match due_webhooks(&strong).await {
                Ok(due) => candidates.extend(due),
                Err(e) => tracing::warn!(error = %e, "looking for due webhook deliveries"),
            }
            // From the end of the query: a slow scan is not followed by another at once.
            last_scan = Some(std::time::Instant::now());
        }
        for hook in candidates {
            let mut busy = hooks.busy.lock().expect("poisoned");
            if !busy.insert(hook.clone()) {
                // Being drained: look again when that drain ends (it wakes the worker), in
                // case the new deliveries came after its last look.
                drop(busy);
                hooks.fresh.lock().expect("poisoned").insert(hook);
                continue;
            }
            drop(busy);
            let app = Arc::downgrade(&strong);
            tokio::spawn(async move {
                if let Some(a) = app.upgrade() {
                    let _done = Drained {
                        app: &a,
                        hook: &hook,
                    };
                    if let Err(e) = drain_webhook(&a, &hook).await {
                        tracing::warn!(webhook = %hook, error = %e, "delivering webhooks");
                    }
                }
            });
        }
        let next_scan = last_scan.map_or(Duration::ZERO, |t| {
            scan_interval.saturating_sub(t.elapsed())
        });
        let wake = async {
            strong.webhooks.wake.notified().await;
        };
        let _ = tokio::time::timeout(next_scan, wake).await;
    }
}

/// Ends a drain, even one that panicked: the webhook is no longer busy, and the worker looks
/// again, for deliveries stored while it was.
struct Drained<'a> {
    app: &'a App,
    hook: &'a str,
}

impl Drop for Drained<'_> {
    fn drop(&mut self) {
        let webhooks = &self.app.webhooks;
        if let Ok(mut busy) = webhooks.busy.lock() {
            busy.remove(self.hook);
        }
        webhooks.wake.notify_one();
    }
}

async fn due_webhooks(app: &App) -> anyhow::Result<Vec<String>> {
    let rows = app
        .control
        .get()
        .await?
        .query(
            "SELECT w.id FROM fluxbase.webhooks w
             WHERE w.enabled AND EXISTS (
                 SELECT 1 FROM fluxbase.webhook_deliveries d
                 WHERE d.webhook_id = w.id AND d.status = 'pending' AND d.next_attempt_at <= now())",
            &[],
        )
        .await?;
    Ok(rows.iter().map(|r| r.get(0)).collect())
}

/// Sends a webhook's due deliveries in order until none is due.
async fn drain_webhook(app: &App, webhook_id: &str) -> anyhow::Result<()> {
    let client = app.http_client();
    // Unknown until the first answer: the first success clears a recorded failure streak.
    let mut failing = true;
    loop {
        let control = app.control.get().await?;
        let due = control
            .prepare_cached(
                "SELECT d.id, d.body, d.attempts, d.created_at, d.event_type, w.url, w.secret
                 FROM fluxbase.webhook_deliveries d JOIN fluxbase.webhooks w ON w.id = d.webhook_id
                 WHERE d.webhook_id = $1 AND d.status = 'pending' AND d.next_attempt_at <= now()
                   AND w.enabled
                 ORDER BY d.created_at, d.event_id LIMIT 64",
            )
            .await?;
        let rows = control.query(&due, &[&webhook_id]).await?;
        drop(control);
        if rows.is_empty() {
            return Ok(());
        }
        let mut delivered = Delivered::default();
        for row in rows {
            let pending = Pending {
                id: row.get(0),
                body: row.get(1),
                attempts: row.get::<_, i32>(2) + 1,
                created: row.get(3),
                event_type: row.get(4),
                url: row.get(5),
                secret: row.get(6),
            };
            match attempt(
                app,
                &client,
                webhook_id,
                &pending,
                &mut failing,
                &mut delivered,
            )
            .await?
            {
                Next::Continue => {}
                Next::Disabled => return delivered.record(app).await,
            }
        }
        delivered.record(app).await?;
    }
}

/// Successful attempts of one batch, recorded with a single UPDATE. A crash before it only
/// means these deliveries go out again, with the same ids: at-least-once either way.
#[derive(Default)]
struct Delivered {
    ids: Vec<String>,
    attempts: Vec<i32>,
    statuses: Vec<i32>,
    bodies: Vec<String>,
}

impl Delivered {
    async fn record(self, app: &App) -> anyhow::Result<()> {
        if self.ids.is_empty() {
            return Ok(());
        }
        let control = app.control.get().await?;
        let stmt = control
            .prepare_cached(
                "UPDATE fluxbase.webhook_deliveries d SET status = 'delivered', attempts = u.attempts,
                        response_status = u.status, response_body = u.body, delivered_at = now(),
                        last_error = NULL
                 FROM unnest($1::text[], $2::int4[], $3::int4[], $4::text[]) AS u(id, attempts, status, body)
                 WHERE d.id = u.id",
            )
            .await?;
        control
            .execute(
                &stmt,
                &[&self.ids, &self.attempts, &self.statuses, &self.bodies],
            )
            .await?;
        Ok(())
    }
}

struct Pending {
    id: String,
    body: String,
    attempts: i32,
    created: DateTime<Utc>,
    event_type: String,
    url: String,
    secret: String,
}

enum Next {
    Continue,
    Disabled,
}

/// One attempt of one delivery, and its bookkeeping.
async fn attempt(
    app: &App,
    client: &reqwest::Client,
    webhook_id: &str,
    d: &Pending,
    failing: &mut bool,
    delivered: &mut Delivered,
) -> anyhow::Result<Next> {
    let now = Utc::now();
    let timestamp = now.timestamp();
    let headers = [
        ("content-type", "application/json".to_string()),
        (
            "x-fluxbase-signature",
            guide_signature(&d.secret, d.body.as_bytes()),
        ),
        ("x-fluxbase-delivery", d.id.clone()),
        ("x-fluxbase-event", d.event_type.clone()),
        ("webhook-id", d.id.clone()),
        ("webhook-timestamp", timestamp.to_string()),
        (
            "webhook-signature",
            standard_signature(&d.secret, &d.id, timestamp, d.body.as_bytes()),
        ),
    ];
    let outcome = match url::Url::parse(&d.url) {
        Ok(url) => {
            egress::post(
                client,
                &url,
                &headers,
                bytes::Bytes::from(d.body.clone()),
                app.config.webhook_allow_private,
                RESPONSE_BODY_CAP,
            )
            .await
        }
        Err(e) => Err(egress::EgressError::Other(format!("invalid URL: {e}"))),
    };
    let control = app.control.get().await?;
    match outcome {
        Ok(resp) if (200..300).contains(&resp.status) => {
            delivered.ids.push(d.id.clone());
            delivered.attempts.push(d.attempts);
            delivered.statuses.push(resp.status as i32);
            delivered.bodies.push(resp.body);
            if *failing {
                *failing = false;
                control
                    .execute(
                        "UPDATE fluxbase.webhooks SET failing_since = NULL
                         WHERE id = $1 AND failing_since IS NOT NULL",
                        &[&webhook_id],
                    )
                    .await?;
            }
            Ok(Next::Continue)
        }
        Ok(resp) if resp.status == 410 => {
            control
                .execute(
                    "UPDATE fluxbase.webhook_deliveries SET status = 'failed', attempts = $2,
                            response_status = 410, response_body = $3, last_error = 'endpoint answered 410 Gone'
                     WHERE id = $1",
                    &[&d.id, &d.attempts, &resp.body],
                )
                .await?;
            control
                .execute(
                    "UPDATE fluxbase.webhooks SET enabled = false,
                            disabled_reason = 'the endpoint answered 410 Gone' WHERE id = $1",
                    &[&webhook_id],
                )
                .await?;
            Ok(Next::Disabled)
        }
        other => {
            let (status, body, error, retry_after) = match other {
                Ok(resp) => (
                    Some(resp.status as i32),
                    Some(resp.body),
                    format!("endpoint answered {}", resp.status),
                    resp.retry_after,
                ),
                Err(e) => (None, None, e.to_string(), None),
            };
            let delay = match retry_after {
                Some(ra) => ra.min(Duration::from_secs(6 * 3600)),
                None => backoff(d.attempts).mul_f64(app.config.webhook_backoff_scale),
            };
            let next =
                now + chrono::Duration::from_std(delay).unwrap_or(chrono::Duration::hours(6));
            let give_up = next > d.created + GIVE_UP_AFTER;
            control
                .execute(
                    "UPDATE fluxbase.webhook_deliveries SET status = $2, attempts = $3, next_attempt_at = $4,
                            response_status = $5, response_body = $6, last_error = $7
                     WHERE id = $1",
                    &[
                        &d.id,
                        &(if give_up { "failed" } else { "pending" }),
                        &d.attempts,
                        &next,
                        &status,
                        &body,
                        &error,
                    ],
                )
                .await?;
            *failing = true;
            let since: Option<DateTime<Utc>> = control
                .query_one(
                    "UPDATE fluxbase.webhooks SET failing_since = coalesce(failing_since, now())
                     WHERE id = $1 RETURNING failing_since",
                    &[&webhook_id],
                )
                .await?
                .get(0);
            if since.is_some_and(|f| now - f > DISABLE_AFTER_FAILING) {
                control
                    .execute(
                        "UPDATE fluxbase.webhooks SET enabled = false,
                                disabled_reason = 'every delivery failed for 24 hours' WHERE id = $1",
                        &[&webhook_id],
                    )
                    .await?;
                return Ok(Next::Disabled);
            }
            // Later changes go on: first attempts keep commit order, retries wait their turn.
            Ok(Next::Continue)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn signatures_match_the_guide_and_standard_webhooks() {
        // The guide's Node check: HMAC-SHA256 keyed by the secret string, hex, "sha256=" prefix.
        let sig = guide_signature("whsec_secret", b"{\"a\":1}");
        assert!(sig.starts_with("sha256=") && sig.len() == 7 + 64);
        // Standard Webhooks' published example (secret, id, timestamp, body → signature).
        let s = standard_signature(
            "whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw",
            "msg_p5jXN8AQM9LWM0D4loKWxJek",
            1614265330,
            br#"{"test": 2432232314}"#,
        );
        assert_eq!(s, "v1,g0hM9SsE+OTPJTGt/tmIKtSyZlE3uFJELVlNIOLJ1OE=");
    }

    #[test]
    fn backoff_follows_the_schedule_with_jitter() {
        for (attempt, base) in [(1, 5.0), (2, 30.0), (3, 120.0), (7, 21600.0), (20, 21600.0)] {
            let d = backoff(attempt).as_secs_f64();
            assert!(d >= base * 0.89 && d <= base * 1.11, "{attempt}: {d}");
        }
    }
}
