//! Webhooks: endpoints, deliveries, redelivery. Managing webhooks needs a developer role (or an
//! admin key); reading them, any access to the project.

use serde::{Deserialize, Serialize};
use utoipa::ToSchema;

use super::reply::{Created, Json};
use super::Request;
use crate::api::error::{ApiError, ApiResult};
use crate::app::SharedApp;
use crate::webhooks::{
    Delivery, DeliveryStatus, EventType, NewWebhookRequest, Ordering, Webhook, WebhookError,
    WebhookPatch,
};

const MANAGING: &str = "Managing webhooks";

impl From<WebhookError> for ApiError {
    fn from(e: WebhookError) -> Self {
        match e {
            WebhookError::NoEvents
            | WebhookError::UnknownEvent(_)
            | WebhookError::Url(_)
            | WebhookError::SecretLength
            | WebhookError::SecretTwice
            | WebhookError::KeepPreviousSecret
            | WebhookError::UrlLength
            | WebhookError::TooManyEvents
            | WebhookError::Tables
            | WebhookError::UnknownOrdering(_)
            | WebhookError::UnknownStatus(_) => ApiError::BadRequest(e.to_string()),
            // As the project quota (`max_projects_per_user`) answers.
            WebhookError::QuotaReached(_) => ApiError::InsufficientPermissions(e.to_string()),
            WebhookError::WebhookNotFound(_) | WebhookError::DeliveryNotFound(_) => {
                ApiError::NotFound(e.to_string())
            }
            WebhookError::Pool(e) => e.into(),
            WebhookError::Database(e) => e.into(),
        }
    }
}

/// `POST /api/webhooks`.
#[derive(Deserialize, ToSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct CreateWebhook {
    pub project_id: String,
    /// Where deliveries are POSTed: http or https, a public address (unless the server allows
    /// private ones).
    pub url: String,
    /// At least one.
    #[schema(value_type = Vec<EventType>, min_items = 1)]
    pub events: Vec<String>,
    /// Only these tables' changes; absent or `null`: every table.
    pub tables: Option<Vec<String>>,
    /// The signing secret, 16 to 256 bytes (UTF-8); absent: a generated `whsec_…` one.
    #[schema(min_length = 16)]
    pub secret: Option<String>,
    /// Default `true`.
    pub enabled: Option<bool>,
    /// Which deliveries may be in flight together. `row` (default): deliveries of the same row
    /// never overlap and keep commit order, a `schema.changed` waits for every earlier delivery
    /// and holds every later one, the others go out concurrently. `strict`: one at a time,
    /// oldest first.
    #[schema(value_type = Option<Ordering>)]
    pub ordering: Option<String>,
}

/// `PATCH /api/webhooks`: absent (or `null`) fields stay as they are.
#[derive(Deserialize, ToSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct PatchWebhook {
    pub project_id: String,
    pub webhook_id: String,
    pub url: Option<String>,
    #[schema(value_type = Option<Vec<EventType>>, min_items = 1)]
    pub events: Option<Vec<String>>,
    pub tables: Option<Vec<String>>,
    /// `true` also clears a server-side disable (`disabledReason`).
    pub enabled: Option<bool>,
    /// `row` or `strict` (see `POST /api/webhooks`).
    #[schema(value_type = Option<Ordering>)]
    pub ordering: Option<String>,
    /// A new signing secret, 16 to 256 bytes (UTF-8). Every attempt that starts once this is
    /// answered is signed with it, pending deliveries and retries included.
    pub secret: Option<String>,
    /// `true`: a fresh `whsec_…` signing secret, shown in this answer only (not with `secret`).
    pub rotate_secret: Option<bool>,
    /// How long the secret replaced by this PATCH (`secret` or `rotateSecret`) goes on signing
    /// beside the new one in `webhook-signature`, in seconds: 0 to 604800 (7 days), default
    /// 86400 (a day). Without a new secret it moves the end of the current overlap (0: ends it).
    #[schema(maximum = 604800)]
    pub keep_previous_secret_secs: Option<u32>,
}

/// `POST /api/webhooks/redeliver`.
#[derive(Deserialize, ToSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct Redeliver {
    pub project_id: String,
    pub delivery_id: String,
}

#[derive(Serialize, ToSchema)]
pub struct WebhookCreated {
    pub success: bool,
    pub webhook: Webhook,
    /// The signing secret: shown in this answer only.
    pub secret: String,
}

#[derive(Serialize, ToSchema)]
pub struct WebhookList {
    pub success: bool,
    pub webhooks: Vec<Webhook>,
}

#[derive(Serialize, ToSchema)]
pub struct WebhookChanged {
    pub success: bool,
    pub webhook: Webhook,
    /// The new signing secret, when the PATCH gave or rotated one: shown in this answer only.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub secret: Option<String>,
}

#[derive(Serialize, ToSchema)]
pub struct WebhookDeleted {
    pub success: bool,
}

#[derive(Serialize, ToSchema)]
pub struct DeliveryList {
    pub success: bool,
    pub deliveries: Vec<Delivery>,
}

#[derive(Serialize, ToSchema)]
pub struct DeliveryQueued {
    pub success: bool,
    pub delivery: Delivery,
}

/// The project's webhooks.
#[utoipa::path(get, path = "/api/webhooks", tag = "webhooks", security(("bearer" = [])),
    params(("projectId" = String, Query, description = "The project")),
    responses((status = 200, description = "The project's webhooks, oldest first", body = WebhookList)))]
pub async fn list_webhooks(app: SharedApp, req: Request) -> ApiResult<Json<WebhookList>> {
    let access = req.access_by_query(&app).await?;
    let mut webhooks = app.webhooks.list(&access.project.id).await?;
    if access.require_developer(MANAGING).is_err() {
        // A hook URL often holds a credential (Slack's path, a token in the query): callers who
        // may not manage
        // webhooks see where they go, not how to post there.
        for w in &mut webhooks {
            w.url = crate::webhooks::masked_url(&w.url);
        }
    }
    Ok(Json(WebhookList {
        success: true,
        webhooks,
    }))
}

/// Creates a webhook; its signing secret is in this answer only.
#[utoipa::path(post, path = "/api/webhooks", tag = "webhooks", security(("bearer" = [])),
    request_body = CreateWebhook,
    responses((status = 201, description = "The webhook and its secret", body = WebhookCreated)))]
pub async fn create_webhook(app: SharedApp, req: Request) -> ApiResult<Created<WebhookCreated>> {
    let access = req.access_by_body(&app).await?;
    let body: CreateWebhook = req.json()?;
    access.require_developer(MANAGING)?;
    let registered = app
        .webhooks
        .create(
            &access.project.id,
            NewWebhookRequest {
                url: body.url,
                events: body.events,
                tables: body.tables,
                secret: body.secret,
                enabled: body.enabled.unwrap_or(true),
                ordering: body.ordering,
            },
        )
        .await?;
    Ok(Created(WebhookCreated {
        success: true,
        webhook: registered.webhook,
        secret: registered.secret,
    }))
}

/// Changes a webhook's URL, events, tables or state.
#[utoipa::path(patch, path = "/api/webhooks", tag = "webhooks", security(("bearer" = [])),
    request_body = PatchWebhook,
    responses((status = 200, description = "The changed webhook", body = WebhookChanged)))]
pub async fn patch_webhook(app: SharedApp, req: Request) -> ApiResult<Json<WebhookChanged>> {
    let access = req.access_by_body(&app).await?;
    let body: PatchWebhook = req.json()?;
    access.require_developer(MANAGING)?;
    let (webhook, secret) = app
        .webhooks
        .patch(
            &access.project.id,
            &body.webhook_id,
            WebhookPatch {
                url: body.url,
                events: body.events,
                tables: body.tables,
                enabled: body.enabled,
                ordering: body.ordering,
                secret: body.secret,
                rotate_secret: body.rotate_secret.unwrap_or(false),
                keep_previous_secret_secs: body.keep_previous_secret_secs,
            },
        )
        .await?;
    Ok(Json(WebhookChanged {
        success: true,
        webhook,
        secret,
    }))
}

/// Deletes a webhook and its pending deliveries.
#[utoipa::path(delete, path = "/api/webhooks", tag = "webhooks", security(("bearer" = [])),
    params(("projectId" = String, Query, description = "The project"),
           ("webhookId" = String, Query, description = "The webhook")),
    responses((status = 200, description = "Deleted", body = WebhookDeleted)))]
pub async fn delete_webhook(app: SharedApp, req: Request) -> ApiResult<Json<WebhookDeleted>> {
    let access = req.access_by_query(&app).await?;
    let webhook_id = req.param("webhookId")?;
    access.require_developer(MANAGING)?;
    app.webhooks.delete(&access.project.id, webhook_id).await?;
    Ok(Json(WebhookDeleted { success: true }))
}

/// Recent deliveries (up to 500), newest first.
#[utoipa::path(get, path = "/api/webhooks/deliveries", tag = "webhooks", security(("bearer" = [])),
    params(("projectId" = String, Query, description = "The project"),
           ("webhookId" = Option<String>, Query, description = "One webhook's deliveries"),
           ("status" = Option<DeliveryStatus>, Query, description = "Only deliveries in this state")),
    responses((status = 200, description = "The deliveries", body = DeliveryList)))]
pub async fn list_deliveries(app: SharedApp, req: Request) -> ApiResult<Json<DeliveryList>> {
    let access = req.access_by_query(&app).await?;
    let status = req
        .optional_param("status")
        .map(str::parse::<DeliveryStatus>)
        .transpose()
        .map_err(WebhookError::from)?;
    let deliveries = app
        .webhooks
        .deliveries(&access.project.id, req.optional_param("webhookId"), status)
        .await?;
    let mut deliveries = deliveries;
    if access.require_developer(MANAGING).is_err() {
        // What a receiver answered can carry its secrets too; the status and error stay.
        for d in &mut deliveries {
            d.response_body = None;
        }
    }
    Ok(Json(DeliveryList {
        success: true,
        deliveries,
    }))
}

/// Sends a delivery again, at once, with the same id.
#[utoipa::path(post, path = "/api/webhooks/redeliver", tag = "webhooks", security(("bearer" = [])),
    request_body = Redeliver,
    responses((status = 200, description = "The delivery, pending again", body = DeliveryQueued)))]
pub async fn redeliver(app: SharedApp, req: Request) -> ApiResult<Json<DeliveryQueued>> {
    let access = req.access_by_body(&app).await?;
    let body: Redeliver = req.json()?;
    access.require_developer(MANAGING)?;
    let delivery = app
        .webhooks
        .redeliver(&access.project.id, &body.delivery_id)
        .await?;
    Ok(Json(DeliveryQueued {
        success: true,
        delivery,
    }))
}
