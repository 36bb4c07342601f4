//! Liveness, readiness and the API's own description (`/metrics` is in [`super::metrics`]).

use serde_json::json;
use warp::http::StatusCode;
use warp::reply::Response;

use super::reply::{json_response, Json, Reply};
use super::Request;
use crate::api::error::{ApiError, ApiResult};
use crate::app::SharedApp;

/// `{"status": "ok"}` or `{"status": "ready"}`.
#[derive(serde::Serialize, utoipa::ToSchema)]
pub struct Status {
    pub status: &'static str,
}

/// The process answers.
#[utoipa::path(get, path = "/health", tag = "operations",
    responses((status = 200, description = "`{\"status\":\"ok\"}`", body = Status)))]
pub async fn health(_app: SharedApp, _req: Request) -> ApiResult<Json<Status>> {
    Ok(Json(Status { status: "ok" }))
}

/// The control database answers and the storage backend is usable. Why the storage backend is
/// not is told to operators only (the metrics token, or a local request): it names paths,
/// endpoints and buckets; everyone else gets the code, and the server's log has the cause. In
/// cluster mode, the projects the node leads (`cluster.leads`) are told to operators only too.
#[utoipa::path(get, path = "/ready", tag = "operations",
    responses((status = 200, description = "`{\"status\":\"ready\"}`", body = Status)))]
pub async fn ready(app: SharedApp, req: Request) -> ApiResult<Response> {
    let ready = match app.control.get().await {
        Ok(c) => c.simple_query("SELECT 1").await.is_ok(),
        Err(_) => false,
    };
    if !ready {
        return Err(ApiError::DatabaseUnavailable(
            "control database unreachable".into(),
        ));
    }
    if let Err(cause) = app.storage.ready().await {
        let message = if super::metrics::operator(&app.config, req.peer, &req.headers) {
            format!(
                "The storage backend ({}) is not usable: {cause}",
                app.storage.backend.describe()
            )
        } else {
            tracing::warn!(backend = %app.storage.backend.describe(), %cause, "not ready: the storage backend is not usable");
            "The storage backend is not usable; the server's log (or /ready asked locally or \
             with the metrics token) says why."
                .to_string()
        };
        return Ok(json_response(
            StatusCode::SERVICE_UNAVAILABLE,
            &json!({ "success": false, "error": {
                "code": "STORAGE_UNAVAILABLE", "message": message } }),
        ));
    }
    if let Some(mode) = app.cluster_mode.as_ref() {
        // Cluster mode: which node this is, what it leads, whether it reaches NATS. Not ready
        // without NATS or the leadership connection: a load balancer sends realtime elsewhere.
        let mut report = mode.node_report();
        // Which projects this node leads names every tenant's project id to whoever asks each
        // node (red team rt18 LOW): operators only, as the storage cause above.
        if !super::metrics::operator(&app.config, req.peer, &req.headers) {
            report.leads.clear();
        }
        if report.nats && report.leadership {
            return Ok(json_response(
                StatusCode::OK,
                &json!({ "status": "ready", "cluster": report }),
            ));
        }
        let message = if report.nats {
            "This node has lost its leadership connection to the control database; it leads no project until it is back."
        } else {
            "This node cannot reach NATS: realtime changes are delayed (nothing is lost) and broadcasts fail until it is back."
        };
        return Ok(json_response(
            StatusCode::SERVICE_UNAVAILABLE,
            &json!({ "success": false, "error": {
                "code": "REALTIME_UNAVAILABLE", "message": message }, "cluster": report }),
        ));
    }
    Ok(Json(Status { status: "ready" }).into_response())
}

/// This document: every endpoint, its request and response schemas and errors.
#[utoipa::path(get, path = "/api/openapi.json", tag = "operations",
    responses((status = 200, description = "The OpenAPI 3.1 document", body = Object)))]
pub async fn openapi_document(_app: SharedApp, _req: Request) -> ApiResult<Response> {
    static DOCUMENT: std::sync::OnceLock<String> = std::sync::OnceLock::new();
    let text = DOCUMENT.get_or_init(|| {
        use utoipa::OpenApi;
        super::routes::ApiDoc::openapi()
            .to_json()
            .expect("the document serializes")
    });
    Ok(super::reply::raw_json_response(
        StatusCode::OK,
        text.clone(),
    ))
}
