//! Signed webhooks with at-least-once delivery.
//!
//! ```text
//!  ProjectBus ─durable subscription─► outbox writer ── one control-DB transaction per committed
//!                                        │              change set: INSERT webhook_deliveries
//!                                        └─ ack(end_lsn) only after that commit ─► slot confirmed
//!  delivery worker ─ due rows, per webhook by its ordering ─► egress (SSRF-checked reqwest) ─► receiver
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
//! * Ordering, per webhook ([`Ordering`]): `row` (the default) sends deliveries of different rows
//!   concurrently, up to `webhook_max_in_flight`, but never two of one row at once, each row's
//!   in commit order, and a schema change alone (after every earlier delivery, before every
//!   later one): [`window`] has the rules, [`keys`] and [`payload::order_keys`] what names a row
//!   (stored with each delivery as `row_keys`, so a restart keeps the rules). `strict` sends one
//!   at a time, oldest first: first attempts follow commit order.
//!
//! One job per file: [`payload`] (event type, body and row keys), [`keys`] (the primary key
//! columns, from the catalog), [`outbox`] (the bus subscriber that stores deliveries),
//! [`worker`] (which webhook to drain when, and how), [`window`] (the `row` ordering's rules),
//! [`attempt`] (one signed POST and its outcome), [`egress`] (the only way out: SSRF checks). This file is the service the API calls:
//! webhooks and their delivery log, on the tables of [`crate::control::webhooks`] and
//! [`crate::control::deliveries`]. Who may call what is the API's concern.

pub mod attempt;
pub mod egress;
pub mod keys;
pub mod outbox;
pub mod payload;
pub mod window;
pub mod worker;

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

pub use crate::control::deliveries::{Delivery, DeliveryStatus};
pub use crate::control::webhooks::{EventType, Ordering, Webhook};

use crate::bus::Bus;
use crate::control::deliveries;
use crate::control::webhooks::{self as hooks, NewWebhook, WebhookChanges};
use crate::secrets::{random_base62, random_bytes};

/// Why a webhook request was refused, or failed.
#[derive(Debug, thiserror::Error)]
pub enum WebhookError {
    #[error("events: at least one event type")]
    NoEvents,
    #[error("events: unknown event {0:?}; expected {list}", list = EventType::ALL.map(EventType::as_str).join(", "))]
    UnknownEvent(String),
    #[error("url: {0}")]
    Url(egress::EgressError),
    #[error("secret: 16 to 256 characters")]
    SecretLength,
    #[error("secret and rotateSecret: give one or the other")]
    SecretTwice,
    #[error("keepPreviousSecretSecs: 0 to {max} seconds", max = hooks::MAX_PREVIOUS_SECRET_SECS)]
    KeepPreviousSecret,
    #[error("url: at most {MAX_URL_BYTES} bytes")]
    UrlLength,
    #[error("events: at most {n} entries", n = EventType::ALL.len())]
    TooManyEvents,
    #[error("tables: at most {MAX_TABLES} names, each 1 to {MAX_TABLE_NAME_BYTES} bytes")]
    Tables,
    #[error(
        "Webhook quota reached: a project may have at most {0} webhooks \
         (webhook_max_per_project). Delete one or ask the operator to raise it."
    )]
    QuotaReached(u32),
    #[error(transparent)]
    UnknownOrdering(#[from] hooks::UnknownOrdering),
    #[error("webhookId: no webhook {0:?} in this project")]
    WebhookNotFound(String),
    #[error("deliveryId: no delivery {0:?} in this project")]
    DeliveryNotFound(String),
    #[error(transparent)]
    UnknownStatus(#[from] deliveries::UnknownStatus),
    /// No connection to the control database.
    #[error(transparent)]
    Pool(#[from] deadpool_postgres::PoolError),
    #[error(transparent)]
    Database(#[from] tokio_postgres::Error),
}

/// The settings webhooks take from the server's configuration.
#[derive(Clone, Debug)]
pub struct Settings {
    /// Let webhooks reach loopback and private addresses (development and tests only).
    pub allow_private: bool,
    /// Multiplies the retry schedule (tests shorten it).
    pub backoff_scale: f64,
    /// How often the worker looks for deliveries that have come due.
    pub scan_interval: Duration,
    /// Most deliveries of one webhook in flight at once (ordering `row`); at least 1.
    pub max_in_flight: usize,
    /// Most webhooks draining at once; at least 1.
    pub max_drains: usize,
    /// Bytes of large bodies ([`attempt::BodyBudget`]) held by every drain together.
    pub large_body_memory: usize,
    /// Most webhooks of one project draining at once; at least 1.
    pub max_drains_per_project: usize,
    /// Webhooks one project may register.
    pub max_per_project: u32,
    /// Cluster mode: this node's name. Every node runs a delivery worker; a webhook's
    /// deliveries are sent by the node holding its drain claim (`webhooks.drain_node`).
    pub node_id: Option<String>,
}

impl Settings {
    pub fn from_config(config: &crate::config::Config) -> Settings {
        Settings {
            allow_private: config.webhook_allow_private,
            backoff_scale: config.webhook_backoff_scale,
            scan_interval: Duration::from_millis(config.webhook_scan_ms.max(10)),
            max_in_flight: config.webhook_max_in_flight.max(1),
            max_drains: config.webhook_max_drains.max(1),
            large_body_memory: (config.webhook_large_body_memory_mb as usize)
                .saturating_mul(1 << 20),
            max_drains_per_project: config.webhook_max_drains_per_project.max(1),
            max_per_project: config.webhook_max_per_project,
            node_id: None,
        }
    }
}

/// A webhook URL as shown to callers who may not manage webhooks: its scheme, host and port,
/// without credentials, path or query (`https://hooks.slack.com/…`).
pub fn masked_url(url: &str) -> String {
    match url::Url::parse(url) {
        Ok(u) => {
            let host = u.host_str().unwrap_or("");
            let port = u.port().map(|p| format!(":{p}")).unwrap_or_default();
            format!("{}://{host}{port}/…", u.scheme())
        }
        Err(_) => "…".to_string(),
    }
}

/// A webhook to register.
pub struct NewWebhookRequest {
    pub url: String,
    pub events: Vec<String>,
    /// `None`: every table.
    pub tables: Option<Vec<String>>,
    /// `None`: a fresh `whsec_…` secret.
    pub secret: Option<String>,
    pub enabled: bool,
    /// `None`: `row`.
    pub ordering: Option<String>,
}

/// A registered webhook and the secret its receiver checks signatures with.
pub struct Registered {
    pub webhook: Webhook,
    pub secret: String,
}

/// What to change on a webhook; `None` leaves a field as it is.
pub struct WebhookPatch {
    pub url: Option<String>,
    pub events: Option<Vec<String>>,
    pub tables: Option<Vec<String>>,
    pub enabled: Option<bool>,
    pub ordering: Option<String>,
    /// A new signing secret of the caller's (16 to 256 bytes).
    pub secret: Option<String>,
    /// A fresh `whsec_…` signing secret.
    pub rotate_secret: bool,
    /// How long a secret replaced by this patch goes on signing beside the new one, in seconds
    /// (`None`: [`KEEP_PREVIOUS_SECRET`]); with no new secret, the new end of the current
    /// overlap (0 ends it).
    pub keep_previous_secret_secs: Option<u32>,
}

/// How long a replaced signing secret goes on signing beside the new one unless the PATCH says
/// otherwise: a day, for the receiver's configuration to follow (as Svix keeps an old secret
/// for 24 hours). Signing with it harms no one: the receiver decides which secrets it accepts.
pub const KEEP_PREVIOUS_SECRET: u32 = 24 * 3600;

/// A new signing secret: the caller's (checked), or a fresh `whsec_…` one.
fn signing_secret(given: Option<String>) -> Result<String, WebhookError> {
    match given {
        Some(s) if s.len() < 16 || s.len() > 256 => Err(WebhookError::SecretLength),
        Some(s) => Ok(s),
        None => {
            use base64::Engine;
            Ok(format!(
                "whsec_{}",
                base64::engine::general_purpose::STANDARD.encode(random_bytes::<24>())
            ))
        }
    }
}

/// This server's webhooks: registration and the delivery log, the outbox writers per project
/// and the delivery worker. Built once at start-up; [`Webhooks::start`] starts its tasks, which
/// end when it is dropped (or, for the writers, at [`Webhooks::stop`]).
pub struct Webhooks {
    shared: Arc<Shared>,
}

/// Longest webhook URL accepted, in bytes (browsers' and proxies' common bound; the URL is
/// stored, listed and sent with every delivery).
pub const MAX_URL_BYTES: usize = 2048;
/// Most table names one webhook may filter on.
pub const MAX_TABLES: usize = 100;
/// Longest table name accepted in a filter, in bytes (PostgreSQL's and MySQL's identifiers are
/// at most 63 bytes and 64 characters).
pub const MAX_TABLE_NAME_BYTES: usize = 256;

/// What the service and its tasks share (tasks hold it weakly).
struct Shared {
    /// The API's control pool: registration and the delivery log, answered for callers.
    control: deadpool_postgres::Pool,
    /// The machinery's own control pool (outbox writers, delivery worker, claims): a backlog
    /// of deliveries waits for these connections, never for the API's.
    work: deadpool_postgres::Pool,
    /// Where the project databases are (their catalogs name the rows: [`keys`]); `None`: rows
    /// are not told apart (each table is ordered as one row).
    cluster: Option<crate::db::ClusterTarget>,
    bus: Arc<Bus>,
    settings: Settings,
    sender: attempt::Sender,
    /// Room for the large bodies being sent ([`attempt::BodyBudget`]).
    large_bodies: attempt::BodyBudget,
    queue: worker::Queue,
    /// The outbox writer of each project with webhooks.
    writers: Mutex<HashMap<String, tokio::task::JoinHandle<()>>>,
    /// The delivery worker, once started.
    worker: Mutex<Option<tokio::task::JoinHandle<()>>>,
    /// Cluster mode (see [`Webhooks::set_led`]).
    led: std::sync::atomic::AtomicBool,
    /// Cluster mode, a graceful stop: drains end at their next attempt and give their claims
    /// back; no new one starts (see [`Webhooks::hand_over`]).
    handing_over: std::sync::atomic::AtomicBool,
}

impl Webhooks {
    /// `control` answers the API's calls; `work` is the machinery's own pool (see
    /// `webhook_control_connections`).
    pub fn new(
        control: deadpool_postgres::Pool,
        work: deadpool_postgres::Pool,
        bus: Arc<Bus>,
        settings: Settings,
    ) -> Webhooks {
        Webhooks {
            shared: Arc::new(Shared {
                control,
                work,
                cluster: None,
                bus,
                sender: attempt::Sender::new(settings.allow_private),
                large_bodies: attempt::body_budget(settings.large_body_memory),
                settings,
                queue: Default::default(),
                writers: Default::default(),
                worker: Default::default(),
                led: Default::default(),
                handing_over: Default::default(),
            }),
        }
    }

    /// Where the project databases are, so that the outbox writers can read which columns name
    /// a table's rows (the primary key) for the `row` ordering. Without it each table's changes
    /// are ordered as one row's. Call before [`Webhooks::start`].
    pub fn with_cluster(mut self, cluster: crate::db::ClusterTarget) -> Webhooks {
        if let Some(shared) = Arc::get_mut(&mut self.shared) {
            shared.cluster = Some(cluster);
        }
        self
    }

    /// Cluster mode: outbox writers run only on the node leading each project
    /// ([`Webhooks::lead`]), so that each event's deliveries are written once.
    pub fn set_led(&self) {
        self.shared
            .led
            .store(true, std::sync::atomic::Ordering::Release);
    }

    fn led(&self) -> bool {
        self.shared.led.load(std::sync::atomic::Ordering::Acquire)
    }

    /// Cluster mode: this node now leads the project; its outbox writer runs here (webhooks or
    /// not, so that one registered on another node is served from its first event).
    pub fn lead(&self, project_id: &str) {
        outbox::start(&self.shared, project_id);
    }

    /// Cluster mode: this node no longer leads the project.
    pub fn unlead(&self, project_id: &str) {
        if let Some(t) = self
            .shared
            .writers
            .lock()
            .expect("poisoned")
            .remove(project_id)
        {
            t.abort();
        }
    }

    /// Cluster mode, a graceful stop: the drains of this node end before their next attempt
    /// and give their webhooks' claims back, so that another node sends at once rather than
    /// after the claims expire (30 s). Waits for the attempts in flight (at most `within`).
    pub async fn hand_over(&self, within: Duration) {
        if self.shared.settings.node_id.is_none() {
            return;
        }
        self.shared
            .handing_over
            .store(true, std::sync::atomic::Ordering::Release);
        let deadline = tokio::time::Instant::now() + within;
        while !self.shared.queue.idle() && tokio::time::Instant::now() < deadline {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    /// Starts the outbox writers of projects with webhooks (in cluster mode, the leadership
    /// loop does) and the delivery worker.
    pub async fn start(&self) -> Result<(), WebhookError> {
        if !self.led() {
            let projects = hooks::project_ids(&self.shared.control.get().await?).await?;
            for project_id in projects {
                outbox::start(&self.shared, &project_id);
            }
        }
        let worker = tokio::spawn(worker::run(Arc::downgrade(&self.shared)));
        if let Some(old) = self.shared.worker.lock().expect("poisoned").replace(worker) {
            old.abort();
        }
        Ok(())
    }

    /// Stops the outbox writers.
    /// Stops the outbox writers and the delivery worker (at shutdown, before the control pool
    /// closes: a worker left running would log a failed scan every `webhook_scan_ms` until the
    /// process exits). Deliveries not sent stay in the outbox for the next start.
    pub fn stop(&self) {
        for (_, t) in self.shared.writers.lock().expect("poisoned").drain() {
            t.abort();
        }
        if let Some(worker) = self.shared.worker.lock().expect("poisoned").take() {
            worker.abort();
        }
    }

    /// Registers a webhook; the project's outbox writer starts if it was not running.
    pub async fn create(
        &self,
        project_id: &str,
        req: NewWebhookRequest,
    ) -> Result<Registered, WebhookError> {
        validate_events(&req.events)?;
        validate_url_length(&req.url)?;
        if let Some(tables) = &req.tables {
            validate_tables(tables)?;
        }
        let ordering = req
            .ordering
            .as_deref()
            .map(str::parse::<Ordering>)
            .transpose()?
            .unwrap_or_default();
        let url = egress::validate_url(&req.url, self.shared.settings.allow_private)
            .await
            .map_err(WebhookError::Url)?;
        let secret = signing_secret(req.secret)?;
        let id = format!("wh_{}", random_base62(16));
        let mut control = self.shared.control.get().await?;
        // Counted and inserted under the project's lock: concurrent registrations cannot pass
        // the quota together.
        let tx = control.transaction().await?;
        let quota = self.shared.settings.max_per_project;
        if hooks::lock_and_count(&tx, project_id).await? >= i64::from(quota) {
            return Err(WebhookError::QuotaReached(quota));
        }
        let webhook = hooks::insert(
            &tx,
            &NewWebhook {
                id: &id,
                project_id,
                url: url.as_str(),
                events: &req.events,
                tables: req.tables.as_deref(),
                secret: &secret,
                enabled: req.enabled,
                ordering,
            },
        )
        .await?;
        tx.commit().await?;
        drop(control);
        if !self.led() {
            outbox::start(&self.shared, project_id);
        }
        Ok(Registered { webhook, secret })
    }

    /// The project's webhooks, oldest first.
    pub async fn list(&self, project_id: &str) -> Result<Vec<Webhook>, WebhookError> {
        Ok(hooks::list(&self.shared.control.get().await?, project_id).await?)
    }

    /// Changes a webhook; enabling it clears a server-side disable and sends what is due. With a
    /// new signing secret, that secret (every attempt that starts once this answered is signed
    /// with it, pending deliveries included).
    pub async fn patch(
        &self,
        project_id: &str,
        webhook_id: &str,
        patch: WebhookPatch,
    ) -> Result<(Webhook, Option<String>), WebhookError> {
        let secret = match (patch.secret, patch.rotate_secret) {
            (Some(_), true) => return Err(WebhookError::SecretTwice),
            (None, false) => None,
            (given, _) => Some(signing_secret(given)?),
        };
        let keep_previous_secs = match patch.keep_previous_secret_secs {
            Some(secs) if secs > hooks::MAX_PREVIOUS_SECRET_SECS => {
                return Err(WebhookError::KeepPreviousSecret)
            }
            None if secret.is_some() => Some(KEEP_PREVIOUS_SECRET),
            keep => keep,
        };
        if let Some(events) = &patch.events {
            validate_events(events)?;
        }
        if let Some(url) = &patch.url {
            validate_url_length(url)?;
        }
        if let Some(tables) = &patch.tables {
            validate_tables(tables)?;
        }
        let ordering = patch
            .ordering
            .as_deref()
            .map(str::parse::<Ordering>)
            .transpose()?;
        let url = match &patch.url {
            Some(u) => Some(
                egress::validate_url(u, self.shared.settings.allow_private)
                    .await
                    .map_err(WebhookError::Url)?
                    .to_string(),
            ),
            None => None,
        };
        let changes = WebhookChanges {
            url: url.as_deref(),
            events: patch.events.as_deref(),
            tables: patch.tables.as_deref(),
            enabled: patch.enabled,
            ordering,
            secret: secret.as_deref(),
            keep_previous_secs,
        };
        let webhook = hooks::update(
            &self.shared.control.get().await?,
            project_id,
            webhook_id,
            &changes,
        )
        .await?
        .ok_or_else(|| WebhookError::WebhookNotFound(webhook_id.to_string()))?;
        self.shared.queue.changed();
        self.shared.queue.rescan();
        Ok((webhook, secret))
    }

    /// Deletes a webhook and its deliveries.
    pub async fn delete(&self, project_id: &str, webhook_id: &str) -> Result<(), WebhookError> {
        if hooks::delete(&self.shared.control.get().await?, project_id, webhook_id).await? {
            self.shared.queue.changed();
            Ok(())
        } else {
            Err(WebhookError::WebhookNotFound(webhook_id.to_string()))
        }
    }

    /// The project's most recent deliveries, newest first.
    pub async fn deliveries(
        &self,
        project_id: &str,
        webhook_id: Option<&str>,
        status: Option<DeliveryStatus>,
    ) -> Result<Vec<Delivery>, WebhookError> {
        let control = self.shared.control.get().await?;
        if let Some(id) = webhook_id {
            // Another project's webhook answers as a missing one, as on every webhook route.
            if !hooks::exists(&control, project_id, id).await? {
                return Err(WebhookError::WebhookNotFound(id.to_string()));
            }
        }
        Ok(deliveries::list(&control, project_id, webhook_id, status).await?)
    }

    /// Sends a delivery again (same id, attempts counted afresh), at once.
    pub async fn redeliver(
        &self,
        project_id: &str,
        delivery_id: &str,
    ) -> Result<Delivery, WebhookError> {
        let delivery =
            deliveries::requeue(&self.shared.control.get().await?, project_id, delivery_id)
                .await?
                .ok_or_else(|| WebhookError::DeliveryNotFound(delivery_id.to_string()))?;
        self.shared.queue.rescan();
        Ok(delivery)
    }
}

fn validate_url_length(url: &str) -> Result<(), WebhookError> {
    if url.len() > MAX_URL_BYTES {
        return Err(WebhookError::UrlLength);
    }
    Ok(())
}

fn validate_tables(tables: &[String]) -> Result<(), WebhookError> {
    if !tables_within_bounds(tables) {
        return Err(WebhookError::Tables);
    }
    Ok(())
}

/// At most [`MAX_TABLES`] names of 1 to [`MAX_TABLE_NAME_BYTES`] bytes: a webhook's `tables`,
/// and a realtime token's (carried in every subscribe).
pub fn tables_within_bounds(tables: &[String]) -> bool {
    tables.len() <= MAX_TABLES
        && tables
            .iter()
            .all(|t| !t.is_empty() && t.len() <= MAX_TABLE_NAME_BYTES)
}

fn validate_events(events: &[String]) -> Result<(), WebhookError> {
    if events.is_empty() {
        return Err(WebhookError::NoEvents);
    }
    if events.len() > EventType::ALL.len() {
        return Err(WebhookError::TooManyEvents);
    }
    match events.iter().find(|e| e.parse::<EventType>().is_err()) {
        Some(bad) => Err(WebhookError::UnknownEvent(bad.clone())),
        None => Ok(()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn unknown_events_are_named_with_the_known_ones() {
        assert!(validate_events(&["row.inserted".into(), "schema.changed".into()]).is_ok());
        assert!(matches!(validate_events(&[]), Err(WebhookError::NoEvents)));
        let e = validate_events(&["row.inserted".into(), "nope".into()]).unwrap_err();
        assert_eq!(
            e.to_string(),
            "events: unknown event \"nope\"; expected row.inserted, row.updated, row.deleted, schema.changed"
        );
    }
}
