//! `fluxbase.webhook_deliveries`: the webhook outbox. A row is one event for one webhook, stored
//! before the change stream may confirm the event; the delivery worker sends pending rows and
//! records each attempt's outcome on it.

use std::fmt;
use std::str::FromStr;

use bytes::Bytes;
use chrono::{DateTime, Utc};
use deadpool_postgres::GenericClient;
use serde::Serialize;
use tokio_postgres::types::{to_sql_checked, FromSql, IsNull, ToSql, Type};
use tokio_postgres::{Error, Row};

use super::webhooks::{EventType, Secrets, SECRETS};

/// Where a delivery is: waiting for its (next) attempt, received by the endpoint, or given up.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, utoipa::ToSchema)]
#[serde(rename_all = "lowercase")]
pub enum DeliveryStatus {
    Pending,
    Delivered,
    Failed,
}

impl DeliveryStatus {
    pub fn as_str(self) -> &'static str {
        match self {
            DeliveryStatus::Pending => "pending",
            DeliveryStatus::Delivered => "delivered",
            DeliveryStatus::Failed => "failed",
        }
    }
}

impl fmt::Display for DeliveryStatus {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// Not one of the three statuses.
#[derive(Debug, thiserror::Error)]
#[error("status: pending, delivered or failed")]
pub struct UnknownStatus;

impl FromStr for DeliveryStatus {
    type Err = UnknownStatus;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "pending" => Ok(DeliveryStatus::Pending),
            "delivered" => Ok(DeliveryStatus::Delivered),
            "failed" => Ok(DeliveryStatus::Failed),
            _ => Err(UnknownStatus),
        }
    }
}

/// Stored as text (the column's CHECK lists the same three words).
impl<'a> FromSql<'a> for DeliveryStatus {
    fn from_sql(
        ty: &Type,
        raw: &'a [u8],
    ) -> Result<Self, Box<dyn std::error::Error + Sync + Send>> {
        Ok(<&str as FromSql>::from_sql(ty, raw)?.parse()?)
    }

    fn accepts(ty: &Type) -> bool {
        <&str as FromSql>::accepts(ty)
    }
}

impl ToSql for DeliveryStatus {
    fn to_sql(
        &self,
        ty: &Type,
        out: &mut bytes::BytesMut,
    ) -> Result<IsNull, Box<dyn std::error::Error + Sync + Send>> {
        self.as_str().to_sql(ty, out)
    }

    fn accepts(ty: &Type) -> bool {
        <&str as ToSql>::accepts(ty)
    }

    to_sql_checked!();
}

/// A delivery as the project sees it in its log (the body is not shown).
#[derive(Clone, Debug, Serialize, utoipa::ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct Delivery {
    /// `dlv_…`: the same across retries (`X-Fluxbase-Delivery`, `webhook-id`).
    pub id: String,
    pub webhook_id: String,
    pub event_id: String,
    #[schema(value_type = EventType)]
    pub event_type: String,
    pub status: DeliveryStatus,
    pub attempts: i32,
    /// The last attempt's HTTP status; `null` before one, or when no answer came.
    #[schema(required = true)]
    pub response_status: Option<i32>,
    /// The start of the last answer's body.
    #[schema(required = true)]
    pub response_body: Option<String>,
    #[schema(required = true)]
    pub last_error: Option<String>,
    #[schema(value_type = String, format = DateTime)]
    pub next_attempt_at: DateTime<Utc>,
    #[schema(value_type = String, format = DateTime)]
    pub created_at: DateTime<Utc>,
    #[schema(required = true, value_type = Option<String>, format = DateTime)]
    pub delivered_at: Option<DateTime<Utc>>,
}

const COLUMNS: &str = "id, webhook_id, event_id, event_type, status, attempts, \
     response_status, response_body, last_error, next_attempt_at, created_at, delivered_at";

impl From<&Row> for Delivery {
    fn from(r: &Row) -> Self {
        Delivery {
            id: r.get("id"),
            webhook_id: r.get("webhook_id"),
            event_id: r.get("event_id"),
            event_type: r.get("event_type"),
            status: r.get("status"),
            attempts: r.get("attempts"),
            response_status: r.get("response_status"),
            response_body: r.get("response_body"),
            last_error: r.get("last_error"),
            next_attempt_at: r.get("next_attempt_at"),
            created_at: r.get("created_at"),
            delivered_at: r.get("delivered_at"),
        }
    }
}

/// The deliveries of some events, column by column (one row per index).
#[derive(Default)]
pub struct NewDeliveries {
    pub ids: Vec<String>,
    pub webhook_ids: Vec<String>,
    pub event_ids: Vec<String>,
    pub event_types: Vec<String>,
    /// Each delivery's body, as an index into `texts`: the deliveries of one event to several
    /// webhooks share one text in memory (a 16 MiB row is not copied per webhook).
    pub bodies: Vec<usize>,
    pub texts: Vec<String>,
    /// What the `row` ordering orders by: the rows' keys joined by
    /// [`crate::webhooks::payload::KEY_SEPARATOR`]; `None`: a barrier.
    pub row_keys: Vec<Option<String>>,
}

/// Stores the deliveries with one statement (atomic, one round trip); those already there (a
/// transaction replayed after a restart) are skipped. How many were new.
pub async fn insert_batch(
    client: &impl GenericClient,
    project_id: &str,
    d: &NewDeliveries,
) -> Result<u64, Error> {
    // Each text once (an event's body is not repeated per webhook in the request), picked by
    // index for each delivery (PostgreSQL arrays count from 1).
    let bodies: Vec<i32> = d.bodies.iter().map(|&i| i as i32 + 1).collect();
    let stmt = client
        .prepare_cached(
            "INSERT INTO fluxbase.webhook_deliveries
                    (id, webhook_id, project_id, event_id, event_type, body, row_keys)
             SELECT u.id, u.webhook_id, $6, u.event_id, u.event_type, ($8::text[])[u.body],
                    string_to_array(u.keys, E'\\x01')
             FROM unnest($1::text[], $2::text[], $3::text[], $4::text[], $5::int4[], $7::text[])
                  AS u(id, webhook_id, event_id, event_type, body, keys)
             ON CONFLICT (webhook_id, event_id) DO NOTHING",
        )
        .await?;
    client
        .execute(
            &stmt,
            &[
                &d.ids,
                &d.webhook_ids,
                &d.event_ids,
                &d.event_types,
                &bodies,
                &project_id,
                &d.row_keys,
                &d.texts,
            ],
        )
        .await
}

/// The project's most recent 500 deliveries, newest first. Filtered by webhook it reads that
/// webhook's retained deliveries through `UNIQUE (webhook_id, event_id)` and sorts them; by
/// project only, the whole outbox (no index keeps either order: each would cost an entry per
/// delivery and another per recorded attempt, see sql/control/0015_webhook_outbox_indexes.sql).
pub async fn list(
    client: &impl GenericClient,
    project_id: &str,
    webhook_id: Option<&str>,
    status: Option<DeliveryStatus>,
) -> Result<Vec<Delivery>, Error> {
    let rows = client
        .query(
            &format!(
                "SELECT {COLUMNS} FROM fluxbase.webhook_deliveries
                 WHERE project_id = $1 AND ($2::text IS NULL OR webhook_id = $2)
                   AND ($3::text IS NULL OR status = $3)
                 ORDER BY created_at DESC, event_id DESC LIMIT 500"
            ),
            &[&project_id, &webhook_id, &status],
        )
        .await?;
    Ok(rows.iter().map(Delivery::from).collect())
}

/// Makes a delivery pending and due now, with its attempts reset; `None` when the project has
/// no such delivery.
pub async fn requeue(
    client: &impl GenericClient,
    project_id: &str,
    delivery_id: &str,
) -> Result<Option<Delivery>, Error> {
    let row = client
        .query_opt(
            &format!(
                "UPDATE fluxbase.webhook_deliveries SET status = 'pending', next_attempt_at = now(),
                        attempts = 0, last_error = NULL, requeues = requeues + 1
                 WHERE id = $1 AND project_id = $2 RETURNING {COLUMNS}"
            ),
            &[&delivery_id, &project_id],
        )
        .await?;
    Ok(row.as_ref().map(Delivery::from))
}

/// Forgets deliveries delivered longer ago than `retention` (an interval, e.g. `7 days`).
pub async fn prune_delivered(client: &impl GenericClient, retention: &str) -> Result<u64, Error> {
    client
        .execute(
            &format!(
                "DELETE FROM fluxbase.webhook_deliveries
                 WHERE status = 'delivered' AND delivered_at < now() - interval '{retention}'"
            ),
            &[],
        )
        .await
}

/// Bodies up to this many bytes are read with their deliveries' page (a `row` drain's window of
/// up to 2,048, a `strict` drain's 64); a larger one only when its attempt starts ([`body`]), so
/// that what a drain holds stays small whatever the rows are (16 drains × 2,048 × 8 KiB: 256 MiB
/// at most, where whole bodies could have been 2,048 × 16 MiB each).
pub const INLINE_BODY_BYTES: i32 = 8192;

/// The body columns of a page: the text when it is at most [`INLINE_BODY_BYTES`], else NULL;
/// then its size in bytes (`octet_length` reads a stored value's size without fetching it).
fn body_columns() -> String {
    format!("CASE WHEN octet_length(d.body) <= {INLINE_BODY_BYTES} THEN d.body END, octet_length(d.body)")
}

/// A page's body column ([`BODY_COLUMNS`]) as held in memory: the bytes, or `None` when only the
/// stored copy has them (read by [`body`] when the attempt starts).
fn inline_body(row: &Row, idx: usize) -> Option<Bytes> {
    row.get::<_, Option<&str>>(idx)
        .map(|text| Bytes::copy_from_slice(text.as_bytes()))
}

/// A delivery's stored body, with its webhook as it is now (enabled, URL, secret): a large
/// body is read when its attempt starts, which may be long after the drain read the webhook
/// (it waited for room), and it goes where the webhook points then, if it is still enabled.
/// `None`: it is gone (its webhook or project was deleted).
pub async fn body(
    client: &impl GenericClient,
    delivery_id: &str,
) -> Result<Option<(Bytes, bool, String, Secrets)>, Error> {
    let stmt = client
        .prepare_cached(&format!(
            "SELECT d.body, w.enabled, w.url, {SECRETS}
             FROM fluxbase.webhook_deliveries d
             JOIN fluxbase.webhooks w ON w.id = d.webhook_id
             WHERE d.id = $1"
        ))
        .await?;
    Ok(client.query_opt(&stmt, &[&delivery_id]).await?.map(|r| {
        (
            Bytes::copy_from_slice(r.get::<_, &str>(0).as_bytes()),
            r.get(1),
            r.get(2),
            Secrets::at(&r, 3),
        )
    }))
}

/// A pending delivery whose time has come, with what sending it takes.
#[derive(Clone)]
pub struct Due {
    pub id: String,
    /// `None` when it is larger than [`INLINE_BODY_BYTES`]: read when the attempt starts.
    pub body: Option<Bytes>,
    /// The body's size in bytes.
    pub body_bytes: usize,
    /// Attempts made so far.
    pub attempts: i32,
    /// Redeliveries asked for so far: an attempt's outcome is recorded only while it is still
    /// this ([`mark_delivered`], [`record_failure`], [`mark_gone`]).
    pub requeues: i32,
    pub created_at: DateTime<Utc>,
    pub event_type: String,
    pub url: String,
    pub secret: Secrets,
}

/// Whether the webhook has a pending delivery whose time has come (enabled webhooks only).
pub async fn any_due(client: &impl GenericClient, webhook_id: &str) -> Result<bool, Error> {
    let stmt = client
        .prepare_cached(
            "SELECT EXISTS (
                 SELECT 1 FROM fluxbase.webhook_deliveries d
                 JOIN fluxbase.webhooks w ON w.id = d.webhook_id
                 WHERE d.webhook_id = $1 AND d.status = 'pending' AND d.next_attempt_at <= now()
                   AND w.enabled)",
        )
        .await?;
    Ok(client.query_one(&stmt, &[&webhook_id]).await?.get(0))
}

/// Up to 64 of an enabled webhook's due deliveries, in commit order.
pub async fn due(client: &impl GenericClient, webhook_id: &str) -> Result<Vec<Due>, Error> {
    let stmt = client
        .prepare_cached(&format!(
            "SELECT d.id, d.attempts, d.created_at, d.event_type, w.url, d.requeues, {SECRETS}, {}
             FROM fluxbase.webhook_deliveries d JOIN fluxbase.webhooks w ON w.id = d.webhook_id
             WHERE d.webhook_id = $1 AND d.status = 'pending' AND d.next_attempt_at <= now()
               AND w.enabled
             ORDER BY d.created_at, d.event_id LIMIT 64",
            body_columns()
        ))
        .await?;
    let rows = client.query(&stmt, &[&webhook_id]).await?;
    Ok(rows
        .iter()
        .map(|r| Due {
            id: r.get(0),
            attempts: r.get(1),
            created_at: r.get(2),
            event_type: r.get(3),
            url: r.get(4),
            requeues: r.get(5),
            secret: Secrets::at(r, 6),
            body: inline_body(r, 8),
            body_bytes: r.get::<_, i32>(9) as usize,
        })
        .collect())
}

/// Successful attempts, column by column.
#[derive(Default)]
pub struct Successes {
    pub ids: Vec<String>,
    pub attempts: Vec<i32>,
    /// Each delivery's `requeues` when its attempt read it.
    pub requeues: Vec<i32>,
    pub statuses: Vec<i32>,
    pub bodies: Vec<String>,
}

impl Successes {
    pub fn is_empty(&self) -> bool {
        self.ids.is_empty()
    }

    /// Moves `other`'s successes after these.
    pub fn append(&mut self, other: &mut Successes) {
        self.ids.append(&mut other.ids);
        self.attempts.append(&mut other.attempts);
        self.requeues.append(&mut other.requeues);
        self.statuses.append(&mut other.statuses);
        self.bodies.append(&mut other.bodies);
    }
}

/// Records successful attempts with one statement.
pub async fn mark_delivered(client: &impl GenericClient, s: &Successes) -> Result<(), Error> {
    let stmt = client
        .prepare_cached(
            "UPDATE fluxbase.webhook_deliveries d SET status = 'delivered', attempts = u.attempts,
                    response_status = u.status, response_body = u.body, delivered_at = now(),
                    last_error = NULL
             FROM unnest($1::text[], $2::int4[], $3::int4[], $4::text[], $5::int4[])
                  AS u(id, attempts, status, body, requeues)
             WHERE d.id = u.id AND d.requeues = u.requeues",
        )
        .await?;
    client
        .execute(
            &stmt,
            &[&s.ids, &s.attempts, &s.statuses, &s.bodies, &s.requeues],
        )
        .await?;
    Ok(())
}

/// The endpoint answered 410 Gone: the delivery failed for good (unless a redelivery was asked
/// for since the attempt read it).
pub async fn mark_gone(
    client: &impl GenericClient,
    delivery_id: &str,
    (attempts, requeues): (i32, i32),
    response_body: &str,
) -> Result<(), Error> {
    client
        .execute(
            "UPDATE fluxbase.webhook_deliveries SET status = 'failed', attempts = $2,
                    response_status = 410, response_body = $3, last_error = 'endpoint answered 410 Gone'
             WHERE id = $1 AND requeues = $4",
            &[&delivery_id, &attempts, &response_body, &requeues],
        )
        .await?;
    Ok(())
}

/// A failed attempt: what it met, and whether (and when) the delivery is tried again.
pub struct FailedAttempt<'a> {
    pub status: DeliveryStatus,
    pub attempts: i32,
    /// The delivery's `requeues` when the attempt read it.
    pub requeues: i32,
    pub next_attempt_at: DateTime<Utc>,
    pub response_status: Option<i32>,
    pub response_body: Option<&'a str>,
    pub error: &'a str,
}

/// Records a failed attempt; `false` when a redelivery was asked for since the attempt read the
/// delivery (the row, pending again, is left as the redelivery made it).
pub async fn record_failure(
    client: &impl GenericClient,
    delivery_id: &str,
    f: &FailedAttempt<'_>,
) -> Result<bool, Error> {
    let updated = client
        .execute(
            "UPDATE fluxbase.webhook_deliveries SET status = $2, attempts = $3, next_attempt_at = $4,
                    response_status = $5, response_body = $6, last_error = $7
             WHERE id = $1 AND requeues = $8",
            &[
                &delivery_id,
                &f.status,
                &f.attempts,
                &f.next_attempt_at,
                &f.response_status,
                &f.response_body,
                &f.error,
                &f.requeues,
            ],
        )
        .await?;
    Ok(updated == 1)
}

/// A pending delivery as the `row` ordering's worker holds it, due or not.
pub struct Queued {
    pub id: String,
    /// `None` when it is larger than [`INLINE_BODY_BYTES`]: read when the attempt starts.
    pub body: Option<Bytes>,
    /// The body's size in bytes.
    pub body_bytes: usize,
    /// Attempts made so far.
    pub attempts: i32,
    /// Redeliveries asked for so far (see [`Due::requeues`]).
    pub requeues: i32,
    pub created_at: DateTime<Utc>,
    pub event_id: String,
    pub event_type: String,
    pub next_attempt_at: DateTime<Utc>,
    /// What it is ordered by; `None`: a barrier.
    pub row_keys: Option<Vec<String>>,
}

/// A webhook's state and a page of its pending deliveries.
pub struct PendingPage {
    pub enabled: bool,
    pub url: String,
    pub secret: Secrets,
    /// In commit order.
    pub rows: Vec<Queued>,
}

/// The webhook's pending deliveries after `after` (`(created_at, event_id)`; `None`: from the
/// oldest), due or not, in commit order, at most `limit`; with the webhook's state. `None`: no
/// such webhook.
pub async fn pending_after(
    client: &impl GenericClient,
    webhook_id: &str,
    after: Option<(DateTime<Utc>, &str)>,
    limit: i64,
) -> Result<Option<PendingPage>, Error> {
    // Not a cached prepared statement: PostgreSQL would settle on a generic plan while the outbox
    // is small and not yet analyzed (a scan of the whole table), and keep it as the outbox grows
    // (measured: 17.5 ms a page during the throughput bench, 0.04 ms once analyzed). Planned
    // with its parameters each time, it takes the pending index from `after` on.
    let sql = format!(
        "SELECT w.enabled, w.url, {SECRETS}, d.id, d.attempts, d.created_at,
                d.event_id, d.event_type, d.next_attempt_at, d.row_keys, d.requeues, {}
         FROM fluxbase.webhooks w
         LEFT JOIN LATERAL (
             SELECT * FROM fluxbase.webhook_deliveries d
             WHERE d.webhook_id = w.id AND d.status = 'pending'
               AND (d.created_at, d.event_id) > ($2::text::timestamptz, $3::text)
             ORDER BY d.created_at, d.event_id LIMIT $4) d ON true
         WHERE w.id = $1",
        body_columns()
    );
    // From the start: `-infinity` sorts before every timestamp.
    let (at, event) = match after {
        Some((at, event)) => (at.to_rfc3339(), event),
        None => ("-infinity".to_string(), ""),
    };
    let rows = client
        .query(&sql, &[&webhook_id, &at, &event, &limit])
        .await?;
    let Some(first) = rows.first() else {
        return Ok(None);
    };
    let mut page = PendingPage {
        enabled: first.get(0),
        url: first.get(1),
        secret: Secrets::at(first, 2),
        rows: Vec::with_capacity(rows.len()),
    };
    for r in &rows {
        let Some(id) = r.get::<_, Option<String>>(4) else {
            break;
        };
        page.rows.push(Queued {
            id,
            attempts: r.get(5),
            created_at: r.get(6),
            event_id: r.get(7),
            event_type: r.get(8),
            next_attempt_at: r.get(9),
            row_keys: r.get(10),
            requeues: r.get(11),
            body: inline_body(r, 12),
            body_bytes: r.get::<_, i32>(13) as usize,
        });
    }
    Ok(Some(page))
}
