//! Webhooks: endpoints, deliveries, redelivery.

use super::reply::Reply;
use super::Request;
use crate::api::error::ApiResult;
use crate::app::SharedApp;

/// The project's webhooks.
#[utoipa::path(get, path = "/api/webhooks", tag = "webhooks", security(("bearer" = [])),
    params(("projectId" = String, Query, description = "The project")),
    responses((status = 200, description = "`{success, webhooks}`", body = Object)))]
pub async fn list_webhooks(app: SharedApp, req: Request) -> ApiResult<impl Reply> {
    let access = req.access_by_query(&app).await?;
    app.list_webhooks(&access).await
}

/// Creates a webhook; its signing secret is in this answer only.
#[utoipa::path(post, path = "/api/webhooks", tag = "webhooks", security(("bearer" = [])),
    responses((status = 201, description = "`{success, webhook, secret}`", body = Object)))]
pub async fn create_webhook(app: SharedApp, req: Request) -> ApiResult<impl Reply> {
    let access = req.access_by_body(&app).await?;
    app.create_webhook(&access, req.json()?).await
}

/// Changes a webhook's URL, events, tables or state.
#[utoipa::path(patch, path = "/api/webhooks", tag = "webhooks", security(("bearer" = [])),
    responses((status = 200, description = "`{success, webhook}`", body = Object)))]
pub async fn patch_webhook(app: SharedApp, req: Request) -> ApiResult<impl Reply> {
    let access = req.access_by_body(&app).await?;
    app.patch_webhook(&access, req.json()?).await
}

/// Deletes a webhook and its pending deliveries.
#[utoipa::path(delete, path = "/api/webhooks", tag = "webhooks", security(("bearer" = [])),
    params(("projectId" = String, Query, description = "The project"),
           ("webhookId" = String, Query, description = "The webhook")),
    responses((status = 200, description = "`{success: true}`", body = Object)))]
pub async fn delete_webhook(app: SharedApp, req: Request) -> ApiResult<impl Reply> {
    let access = req.access_by_query(&app).await?;
    app.delete_webhook(&access, req.param("webhookId")?).await
}

/// Recent deliveries, newest first.
#[utoipa::path(get, path = "/api/webhooks/deliveries", tag = "webhooks", security(("bearer" = [])),
    params(("projectId" = String, Query, description = "The project"),
           ("webhookId" = Option<String>, Query, description = "One webhook's deliveries"),
           ("status" = Option<String>, Query, description = "pending, delivered or failed")),
    responses((status = 200, description = "`{success, deliveries}`", body = Object)))]
pub async fn list_deliveries(app: SharedApp, req: Request) -> ApiResult<impl Reply> {
    let access = req.access_by_query(&app).await?;
    app.list_deliveries(
        &access,
        req.optional_param("webhookId"),
        req.optional_param("status"),
    )
    .await
}

/// Sends a delivery again.
#[utoipa::path(post, path = "/api/webhooks/redeliver", tag = "webhooks", security(("bearer" = [])),
    responses((status = 200, description = "`{success, delivery}`", body = Object)))]
pub async fn redeliver(app: SharedApp, req: Request) -> ApiResult<impl Reply> {
    let access = req.access_by_body(&app).await?;
    app.redeliver(&access, req.json()?).await
}
