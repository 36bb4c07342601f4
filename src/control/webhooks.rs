//! `fluxbase.webhooks`: a project's registered endpoints, their signing secret and state.

use std::fmt;
use std::str::FromStr;

use chrono::{DateTime, Utc};
use deadpool_postgres::GenericClient;
use serde::Serialize;
use tokio_postgres::{Error, Row};

/// A webhook event type, as registered (the `events` column) and as sent in `event_type` and
/// `X-Fluxbase-Event`.
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

/// Which of a webhook's deliveries may be in flight together (see [`crate::webhooks`]).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, utoipa::ToSchema)]
#[serde(rename_all = "lowercase")]
pub enum Ordering {
    /// Deliveries of the same row never overlap and keep commit order; a schema change waits for
    /// every earlier delivery and holds every later one; the others go out concurrently.
    #[default]
    Row,
    /// One delivery in flight, oldest first.
    Strict,
}

impl Ordering {
    pub const ALL: [Ordering; 2] = [Ordering::Row, Ordering::Strict];

    pub fn as_str(self) -> &'static str {
        match self {
            Ordering::Row => "row",
            Ordering::Strict => "strict",
        }
    }
}

impl fmt::Display for Ordering {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// Not one of the orderings.
#[derive(Debug, thiserror::Error)]
#[error("ordering: unknown ordering {0:?}; expected row, strict")]
pub struct UnknownOrdering(pub String);

impl FromStr for Ordering {
    type Err = UnknownOrdering;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Ordering::ALL
            .into_iter()
            .find(|o| o.as_str() == s)
            .ok_or_else(|| UnknownOrdering(s.to_string()))
    }
}

/// A webhook as its owner sees it (never the secret).
#[derive(Clone, Debug, Serialize, utoipa::ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct Webhook {
    pub id: String,
    pub url: String,
    #[schema(value_type = Vec<EventType>)]
    pub events: Vec<String>,
    /// The tables whose changes are sent; `null`: every table.
    #[schema(required = true)]
    pub tables: Option<Vec<String>>,
    pub enabled: bool,
    /// Which deliveries may be in flight together: `row` (the default) or `strict`.
    pub ordering: Ordering,
    /// Why the server disabled it (410 Gone, a day of failures); `null` when enabled by its owner.
    #[schema(required = true)]
    pub disabled_reason: Option<String>,
    /// Until when attempts are also signed with the secret the last rotation replaced
    /// (`webhook-signature` carries both); `null`: only the current one.
    #[schema(value_type = Option<String>, format = DateTime, required = true)]
    pub previous_secret_until: Option<DateTime<Utc>>,
    #[schema(value_type = String, format = DateTime)]
    pub created_at: DateTime<Utc>,
}

const COLUMNS: &str = "id, url, events, tables, enabled, ordering, disabled_reason, created_at,
     CASE WHEN previous_secret_until > now() THEN previous_secret_until END AS previous_secret_until";

/// The longest a replaced secret may go on signing beside the new one (7 days).
pub const MAX_PREVIOUS_SECRET_SECS: u32 = 7 * 24 * 3600;

/// The secrets an attempt is signed with: the webhook's current one, and the one its last
/// rotation replaced while that overlap lasts.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Secrets {
    pub current: String,
    pub previous: Option<String>,
}

/// The two columns [`Secrets::at`] reads, of the webhook joined as `w`.
pub const SECRETS: &str =
    "w.secret, CASE WHEN w.previous_secret_until > now() THEN w.previous_secret END";

impl Secrets {
    /// The secrets in a row's columns `idx` and `idx + 1` (selected as [`SECRETS`]).
    pub fn at(row: &Row, idx: usize) -> Secrets {
        Secrets {
            current: row.get(idx),
            previous: row.get(idx + 1),
        }
    }
}

impl From<&Row> for Webhook {
    fn from(r: &Row) -> Self {
        Webhook {
            id: r.get("id"),
            url: r.get("url"),
            events: r.get("events"),
            tables: r.get("tables"),
            enabled: r.get("enabled"),
            // The column's CHECK allows only these words.
            ordering: r
                .get::<_, &str>("ordering")
                .parse()
                .unwrap_or(Ordering::Strict),
            disabled_reason: r.get("disabled_reason"),
            previous_secret_until: r.get("previous_secret_until"),
            created_at: r.get("created_at"),
        }
    }
}

/// A webhook to insert.
pub struct NewWebhook<'a> {
    pub id: &'a str,
    pub project_id: &'a str,
    pub url: &'a str,
    pub events: &'a [String],
    pub tables: Option<&'a [String]>,
    pub secret: &'a str,
    pub enabled: bool,
    pub ordering: Ordering,
}

pub async fn insert(client: &impl GenericClient, w: &NewWebhook<'_>) -> Result<Webhook, Error> {
    let row = client
        .query_one(
            &format!(
                "INSERT INTO fluxbase.webhooks (id, project_id, url, events, tables, secret, enabled, ordering)
                 VALUES ($1, $2, $3, $4, $5, $6, $7, $8) RETURNING {COLUMNS}"
            ),
            &[&w.id, &w.project_id, &w.url, &w.events, &w.tables, &w.secret, &w.enabled, &w.ordering.as_str()],
        )
        .await?;
    Ok(Webhook::from(&row))
}

pub async fn list(client: &impl GenericClient, project_id: &str) -> Result<Vec<Webhook>, Error> {
    let rows = client
        .query(
            &format!("SELECT {COLUMNS} FROM fluxbase.webhooks WHERE project_id = $1 ORDER BY created_at, id"),
            &[&project_id],
        )
        .await?;
    Ok(rows.iter().map(Webhook::from).collect())
}

/// What a PATCH changes; `None` leaves a field as it is. Enabling clears the reason and the
/// failure streak of a server-side disable.
pub struct WebhookChanges<'a> {
    pub url: Option<&'a str>,
    pub events: Option<&'a [String]>,
    pub tables: Option<&'a [String]>,
    pub enabled: Option<bool>,
    pub ordering: Option<Ordering>,
    pub secret: Option<&'a str>,
    /// How long the secret this change replaces (with `secret`), or else the one kept from the
    /// last rotation while it still signs, goes on signing beside the current one, in seconds
    /// from now; 0 ends it. `None`: a replaced secret is not kept, a kept one stays as it is.
    pub keep_previous_secs: Option<u32>,
}

/// The changed webhook, or `None` when the project has no such webhook.
pub async fn update(
    client: &impl GenericClient,
    project_id: &str,
    webhook_id: &str,
    c: &WebhookChanges<'_>,
) -> Result<Option<Webhook>, Error> {
    let row = client
        .query_opt(
            &format!(
                "UPDATE fluxbase.webhooks SET url = coalesce($3, url), events = coalesce($4, events),
                        tables = CASE WHEN $6 THEN $5 ELSE tables END,
                        enabled = coalesce($7, enabled),
                        disabled_reason = CASE WHEN $7 THEN NULL ELSE disabled_reason END,
                        failing_since = CASE WHEN $7 THEN NULL ELSE failing_since END,
                        ordering = coalesce($8, ordering), secret = coalesce($9, secret),
                        previous_secret = CASE WHEN $9 IS NOT NULL AND $10::int > 0 THEN secret
                            WHEN $9 IS NOT NULL OR $10::int = 0 THEN NULL
                            ELSE previous_secret END,
                        previous_secret_until = CASE
                            WHEN $9 IS NOT NULL AND $10::int > 0 THEN now() + make_interval(secs => $10::int)
                            WHEN $9 IS NOT NULL OR $10::int = 0 THEN NULL
                            WHEN $10::int > 0 AND previous_secret_until > now()
                                THEN now() + make_interval(secs => $10::int)
                            ELSE previous_secret_until END
                 WHERE id = $1 AND project_id = $2 RETURNING {COLUMNS}"
            ),
            &[&webhook_id, &project_id, &c.url, &c.events, &c.tables, &c.tables.is_some(), &c.enabled,
              &c.ordering.map(Ordering::as_str), &c.secret, &c.keep_previous_secs.map(|s| s as i32)],
        )
        .await?;
    Ok(row.as_ref().map(Webhook::from))
}

/// Whether the project had such a webhook (its deliveries go with it).
pub async fn delete(
    client: &impl GenericClient,
    project_id: &str,
    webhook_id: &str,
) -> Result<bool, Error> {
    let n = client
        .execute(
            "DELETE FROM fluxbase.webhooks WHERE id = $1 AND project_id = $2",
            &[&webhook_id, &project_id],
        )
        .await?;
    Ok(n > 0)
}

/// Projects with at least one webhook.
pub async fn project_ids(client: &impl GenericClient) -> Result<Vec<String>, Error> {
    let rows = client
        .query("SELECT DISTINCT project_id FROM fluxbase.webhooks", &[])
        .await?;
    Ok(rows.iter().map(|r| r.get(0)).collect())
}

/// What the outbox writer needs of an enabled webhook to choose the events it gets.
pub struct Subscriber {
    pub id: String,
    pub events: Vec<String>,
    pub tables: Option<Vec<String>>,
    pub created_at: DateTime<Utc>,
}

pub async fn enabled_subscribers(
    client: &impl GenericClient,
    project_id: &str,
) -> Result<Vec<Subscriber>, Error> {
    let rows = client
        .query(
            "SELECT id, events, tables, created_at FROM fluxbase.webhooks
             WHERE project_id = $1 AND enabled",
            &[&project_id],
        )
        .await?;
    Ok(rows
        .iter()
        .map(|r| Subscriber {
            id: r.get(0),
            events: r.get(1),
            tables: r.get(2),
            created_at: r.get(3),
        })
        .collect())
}

/// The webhook's ordering; `None`: no such webhook.
pub async fn ordering(
    client: &impl GenericClient,
    webhook_id: &str,
) -> Result<Option<Ordering>, Error> {
    let stmt = client
        .prepare_cached("SELECT ordering FROM fluxbase.webhooks WHERE id = $1")
        .await?;
    Ok(client
        .query_opt(&stmt, &[&webhook_id])
        .await?
        .map(|r| r.get::<_, &str>(0).parse().unwrap_or(Ordering::Strict)))
}

/// Clears the replaced secrets whose overlap has ended (they sign nothing any more: kept, they
/// would sit in the control database and its backups for good); hourly, with the outbox's
/// pruning. The number cleared.
pub async fn forget_previous_secrets(client: &impl GenericClient) -> Result<u64, Error> {
    client
        .execute(
            "UPDATE fluxbase.webhooks SET previous_secret = NULL, previous_secret_until = NULL
             WHERE previous_secret_until <= now()",
            &[],
        )
        .await
}

/// Whether the webhook is enabled, its URL and its secrets (`None`: deleted).
pub async fn target(
    client: &impl GenericClient,
    webhook_id: &str,
) -> Result<Option<(bool, String, Secrets)>, Error> {
    let stmt = client
        .prepare_cached(&format!(
            "SELECT w.enabled, w.url, {SECRETS} FROM fluxbase.webhooks w WHERE w.id = $1"
        ))
        .await?;
    Ok(client
        .query_opt(&stmt, &[&webhook_id])
        .await?
        .map(|r| (r.get(0), r.get(1), Secrets::at(&r, 2))))
}

/// Enabled webhooks with a pending delivery whose time has come.
/// The enabled webhooks with deliveries due now: (webhook id, project id).
pub async fn with_due_deliveries(
    client: &impl GenericClient,
) -> Result<Vec<(String, String)>, Error> {
    let rows = client
        .query(
            "SELECT w.id, w.project_id FROM fluxbase.webhooks w
             WHERE w.enabled AND EXISTS (
                 SELECT 1 FROM fluxbase.webhook_deliveries d
                 WHERE d.webhook_id = w.id AND d.status = 'pending' AND d.next_attempt_at <= now())",
            &[],
        )
        .await?;
    Ok(rows.iter().map(|r| (r.get(0), r.get(1))).collect())
}

/// In a transaction: takes the project's webhook-registration lock (until the transaction
/// ends) and counts the project's webhooks, so that a count-then-insert cannot race another.
pub async fn lock_and_count(client: &impl GenericClient, project_id: &str) -> Result<i64, Error> {
    client
        .execute(
            "SELECT pg_advisory_xact_lock(hashtextextended('fluxbase.webhooks:' || $1, 0))",
            &[&project_id],
        )
        .await?;
    let row = client
        .query_one(
            "SELECT count(*) FROM fluxbase.webhooks WHERE project_id = $1",
            &[&project_id],
        )
        .await?;
    Ok(row.get(0))
}

/// Whether the project has this webhook.
pub async fn exists(
    client: &impl GenericClient,
    project_id: &str,
    webhook_id: &str,
) -> Result<bool, Error> {
    let row = client
        .query_opt(
            "SELECT 1 FROM fluxbase.webhooks WHERE project_id = $1 AND id = $2",
            &[&project_id, &webhook_id],
        )
        .await?;
    Ok(row.is_some())
}

/// Cluster mode: takes the webhook's drain for `node` for `lease_secs`, if no other node holds an
/// unexpired claim (a claim of `node` itself is taken again). True when taken.
pub async fn claim_drain(
    client: &impl GenericClient,
    webhook_id: &str,
    node: &str,
    lease_secs: f64,
) -> Result<bool, Error> {
    let stmt = client
        .prepare_cached(
            "UPDATE fluxbase.webhooks
             SET drain_node = $2, drain_until = now() + make_interval(secs => $3::float8)
             WHERE id = $1 AND (drain_node IS NULL OR drain_until < now() OR drain_node = $2)",
        )
        .await?;
    Ok(client
        .execute(&stmt, &[&webhook_id, &node, &lease_secs])
        .await?
        == 1)
}

/// Cluster mode: extends `node`'s claim on the webhook's drain, only if it never lapsed (still
/// `node`'s and unexpired): a claim that expired may have been taken, used and given back by
/// another node meanwhile, so the drainer must start over from the outbox. True when extended.
pub async fn renew_drain(
    client: &impl GenericClient,
    webhook_id: &str,
    node: &str,
    lease_secs: f64,
) -> Result<bool, Error> {
    let stmt = client
        .prepare_cached(
            "UPDATE fluxbase.webhooks
             SET drain_until = now() + make_interval(secs => $3::float8)
             WHERE id = $1 AND drain_node = $2 AND drain_until >= now()",
        )
        .await?;
    Ok(client
        .execute(&stmt, &[&webhook_id, &node, &lease_secs])
        .await?
        == 1)
}

/// Cluster mode: gives the webhook's drain back (if `node` still holds it).
pub async fn release_drain(
    client: &impl GenericClient,
    webhook_id: &str,
    node: &str,
) -> Result<(), Error> {
    let stmt = client
        .prepare_cached(
            "UPDATE fluxbase.webhooks SET drain_node = NULL, drain_until = NULL
             WHERE id = $1 AND drain_node = $2",
        )
        .await?;
    client.execute(&stmt, &[&webhook_id, &node]).await?;
    Ok(())
}

/// A success ends the webhook's failure streak.
pub async fn clear_failing(client: &impl GenericClient, webhook_id: &str) -> Result<(), Error> {
    client
        .execute(
            "UPDATE fluxbase.webhooks SET failing_since = NULL
             WHERE id = $1 AND failing_since IS NOT NULL",
            &[&webhook_id],
        )
        .await?;
    Ok(())
}

/// A failure starts the webhook's failure streak (or continues it): when it started.
pub async fn mark_failing(
    client: &impl GenericClient,
    webhook_id: &str,
) -> Result<Option<DateTime<Utc>>, Error> {
    Ok(client
        .query_one(
            "UPDATE fluxbase.webhooks SET failing_since = coalesce(failing_since, now())
             WHERE id = $1 RETURNING failing_since",
            &[&webhook_id],
        )
        .await?
        .get(0))
}

/// Disables a webhook on the server's decision, with the reason its owner sees.
pub async fn disable(
    client: &impl GenericClient,
    webhook_id: &str,
    reason: &str,
) -> Result<(), Error> {
    client
        .execute(
            "UPDATE fluxbase.webhooks SET enabled = false, disabled_reason = $2 WHERE id = $1",
            &[&webhook_id, &reason],
        )
        .await?;
    Ok(())
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
