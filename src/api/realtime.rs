//! Realtime over HTTP: the WebSocket handshake, tokens and server-side broadcasts.
//!
//! The handshake (RFC 6455 §4.2) is answered here, not by `warp::ws()` (see [`crate::realtime`]
//! for why): a request that is no upgrade falls through to the API's 404, a refused one gets the
//! guide's error shape, an accepted one a 101 while [`crate::realtime::Realtime::accept`] serves
//! the connection hyper hands over.

use serde_json::json;
use warp::http::{HeaderMap, StatusCode};
use warp::reply::Response;

use super::reply::{Json, Reply};
use super::Request;
use crate::api::error::{ApiError, ApiResult};
use crate::app::SharedApp;
use crate::realtime::{
    BroadcastRequest, BroadcastResponse, RealtimeError, TokenRequest, TokenResponse,
};

/// The WebSocket handshake at `/` (the guide's bare WebSocket URL); see the document's
/// description for the protocol.
#[utoipa::path(get, path = "/", tag = "realtime",
    responses(
        (status = 101, description = "Switching to the WebSocket protocol"),
        (status = 200, description = "Without an upgrade: the dashboard's page", content_type = "text/html"),
    ))]
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
    let is_upgrade = header_has_token(&req.headers, "connection", "upgrade")
        && header_has_token(&req.headers, "upgrade", "websocket");
    let (true, Some(on_upgrade)) = (is_upgrade, upgrade) else {
        // Not an upgrade: `GET /` is the dashboard's page; `/realtime` the API's 404.
        if let Some(page) =
            super::dashboard::serve(&app.config, &req.method, &req.path, &req.headers)
        {
            return Ok(page);
        }
        return Err(ApiError::NotFound(format!(
            "No route for {} {}",
            req.method, req.path
        )));
    };
    if app.realtime.is_shutting_down() {
        // Every socket was (or is being) closed with 1001: no new ones during the grace.
        let mut response = handshake_refused(
            StatusCode::SERVICE_UNAVAILABLE,
            "SERVER_SHUTTING_DOWN",
            "The server is shutting down. Reconnect in a moment (and resume with since).",
        );
        response
            .headers_mut()
            .insert("retry-after", "1".parse().expect("ascii"));
        return Ok(response);
    }
    let key = req.headers.get("sec-websocket-key").map(|k| k.as_bytes());
    let version = req
        .headers
        .get("sec-websocket-version")
        .map(|v| v.as_bytes());
    let Some(key) = key.filter(|_| version == Some(b"13")) else {
        let mut response = handshake_refused(
            StatusCode::BAD_REQUEST,
            "BAD_REQUEST",
            "WebSocket handshake needs Sec-WebSocket-Key and Sec-WebSocket-Version: 13",
        );
        response
            .headers_mut()
            .insert("sec-websocket-version", "13".parse().expect("ascii"));
        return Ok(response);
    };
    let accept = tokio_tungstenite::tungstenite::handshake::derive_accept_key(key);
    app.realtime.clone().accept(on_upgrade);
    let mut response = warp::http::Response::new(warp::hyper::body::Bytes::new().into());
    *response.status_mut() = StatusCode::SWITCHING_PROTOCOLS;
    let h = response.headers_mut();
    h.insert("connection", "upgrade".parse().expect("ascii"));
    h.insert("upgrade", "websocket".parse().expect("ascii"));
    h.insert("sec-websocket-accept", accept.parse().expect("base64"));
    Ok(response)
}

fn header_has_token(headers: &HeaderMap, name: &str, token: &str) -> bool {
    headers.get_all(name).iter().any(|v| {
        v.to_str()
            .unwrap_or_default()
            .split(',')
            .any(|t| t.trim().eq_ignore_ascii_case(token))
    })
}

/// A refused handshake, in the guide's error shape.
fn handshake_refused(status: StatusCode, code: &str, message: &str) -> Response {
    let body = json!({"success": false,
        "error": {"code": code, "message": message, "details": null}});
    super::json_response(status, &body)
}

/// A short-lived token for browsers, bound to an end user (`authUid`) and tables.
#[utoipa::path(post, path = "/api/realtime/token", tag = "realtime", security(("bearer" = [])),
    request_body = TokenRequest,
    responses((status = 200, description = "The token and its expiry", body = TokenResponse)))]
pub async fn realtime_token(app: SharedApp, req: Request) -> ApiResult<impl Reply> {
    let access = req.access_by_body(&app).await?;
    Ok(Json(app.realtime.token(&access, req.json()?).await?))
}

/// Sends a broadcast to the project's room from a backend.
#[utoipa::path(post, path = "/api/realtime/broadcast", tag = "realtime", security(("bearer" = [])),
    request_body = BroadcastRequest,
    responses((status = 200, description = "Sockets of this server that got it", body = BroadcastResponse)))]
pub async fn realtime_broadcast(app: SharedApp, req: Request) -> ApiResult<impl Reply> {
    let access = req.access_by_body(&app).await?;
    Ok(Json(app.realtime.broadcast(&access, req.json()?).await?))
}

/// The guide's status and code of a realtime refusal. Only tokens and broadcasts answer over
/// HTTP; the refusals of a subscribe (access revoked, limits, another service's refusal) reach
/// a socket as `error` messages, and map here only to stay total.
impl From<RealtimeError> for ApiError {
    fn from(e: RealtimeError) -> ApiError {
        match e {
            RealtimeError::BadRequest(m) => ApiError::BadRequest(m),
            RealtimeError::AuthRequired(m) | RealtimeError::AccessRevoked(m) => {
                ApiError::AuthRequired(m)
            }
            e @ RealtimeError::TokenExpired => ApiError::AuthRequired(e.to_string()),
            RealtimeError::ScopeMismatch(m) => ApiError::ScopeMismatch(m),
            RealtimeError::InsufficientPermissions(m) => ApiError::InsufficientPermissions(m),
            RealtimeError::ProjectNotFound(_) => ApiError::ProjectNotFound,
            RealtimeError::ProjectSuspended => ApiError::ProjectSuspended,
            RealtimeError::LimitExceeded(m) => ApiError::Busy(m),
            RealtimeError::PayloadTooLarge { limit, .. } => ApiError::PayloadTooLarge(limit),
            RealtimeError::Busy {
                per_sec,
                bytes_per_sec,
            } => ApiError::Busy(format!(
                "Too many broadcasts for this project: at most {per_sec} per second and {bytes_per_sec} bytes per second (realtime_project_broadcasts_per_sec, realtime_project_broadcast_bytes_per_sec). Retry shortly."
            )),
            e @ RealtimeError::Unavailable(_) => ApiError::RealtimeUnavailable(e.to_string()),
            RealtimeError::Refused { code, message } => {
                ApiError::Internal(anyhow::anyhow!("{code}: {message}"))
            }
            RealtimeError::Internal(e) => ApiError::from(e),
        }
    }
}
