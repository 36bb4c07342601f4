//! Realtime over HTTP: the WebSocket handshake, tokens and server-side broadcasts.

use super::reply::Reply;
use super::Request;
use crate::api::error::{ApiError, ApiResult};
use crate::app::SharedApp;
use warp::reply::Response;

/// The WebSocket handshake at `/` (the guide's bare WebSocket URL); see the document's
/// description for the protocol.
#[utoipa::path(get, path = "/", tag = "realtime",
    responses((status = 101, description = "Switching to the WebSocket protocol")))]
pub async fn realtime_socket_root(app: SharedApp, req: Request) -> ApiResult<Response> {
    socket(app, req)
}

/// The WebSocket handshake at `/realtime`; see the document's description for the protocol.
#[utoipa::path(get, path = "/realtime", tag = "realtime",
    responses((status = 101, description = "Switching to the WebSocket protocol")))]
pub async fn realtime_socket(app: SharedApp, req: Request) -> ApiResult<Response> {
    socket(app, req)
}

fn socket(app: SharedApp, mut req: Request) -> ApiResult<Response> {
    let upgrade = req.take_upgrade();
    crate::realtime::upgrade(app, &req.headers, upgrade)
        .map_err(|_| ApiError::NotFound(format!("No route for {} {}", req.method, req.path)))
}

/// A short-lived token for browsers, bound to an end user (`authUid`) and tables.
#[utoipa::path(post, path = "/api/realtime/token", tag = "realtime", security(("bearer" = [])),
    responses((status = 200, description = "`{success, token, expiresAt}`", body = Object)))]
pub async fn realtime_token(app: SharedApp, req: Request) -> ApiResult<impl Reply> {
    let access = req.access_by_body(&app).await?;
    app.realtime_token(&access, req.json()?).await
}

/// Sends a broadcast to the project's room from a backend.
#[utoipa::path(post, path = "/api/realtime/broadcast", tag = "realtime", security(("bearer" = [])),
    responses((status = 200, description = "`{success, delivered}`", body = Object)))]
pub async fn realtime_broadcast(app: SharedApp, req: Request) -> ApiResult<impl Reply> {
    let access = req.access_by_body(&app).await?;
    app.realtime_broadcast(&access, req.json()?)
}
