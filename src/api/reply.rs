//! What a handler returns: a typed body serialized once, with its status, or a response built
//! by the handler itself (downloads, the WebSocket handshake, `/metrics`).

use serde::Serialize;
use serde_json::Value;
use warp::http::StatusCode;
use warp::reply::Response;
use warp::Reply as _;

use crate::api::error::ApiError;

/// Turns a handler's answer into an HTTP response.
pub trait Reply {
    fn into_response(self) -> Response;
}

impl Reply for Response {
    fn into_response(self) -> Response {
        self
    }
}

/// `200 OK` with `T` as JSON.
pub struct Json<T>(pub T);

/// `201 Created` with `T` as JSON.
pub struct Created<T>(pub T);

impl<T: Serialize> Reply for Json<T> {
    fn into_response(self) -> Response {
        serialize(StatusCode::OK, &self.0)
    }
}

impl<T: Serialize> Reply for Created<T> {
    fn into_response(self) -> Response {
        serialize(StatusCode::CREATED, &self.0)
    }
}

fn serialize<T: Serialize>(status: StatusCode, body: &T) -> Response {
    match serde_json::to_string(body) {
        Ok(text) => raw_json_response(status, text),
        Err(e) => error_response(&ApiError::Internal(e.into()), None),
    }
}

pub fn json_response(status: StatusCode, body: &Value) -> Response {
    raw_json_response(status, body.to_string())
}

/// `200 OK` with JSON bytes (the SQL answer, which holds its budget in them).
pub fn json_body(body: bytes::Bytes) -> Response {
    let mut response = Response::new(body.into());
    response.headers_mut().insert(
        warp::http::header::CONTENT_TYPE,
        warp::http::HeaderValue::from_static("application/json"),
    );
    response
}

pub fn raw_json_response(status: StatusCode, body: String) -> Response {
    warp::reply::with_status(
        warp::reply::with_header(body, "content-type", "application/json"),
        status,
    )
    .into_response()
}

/// The guide's error shape with the error's status (and `Retry-After` when the client should
/// wait). `request_id` names the request in the log line of an internal error.
pub fn error_response(e: &ApiError, request_id: Option<&str>) -> Response {
    let mut response = json_response(e.status(), &e.body(request_id));
    if let Some(secs) = e.retry_after() {
        response
            .headers_mut()
            .insert("retry-after", secs.to_string().parse().expect("digits"));
    }
    if let ApiError::RangeNotSatisfiable(size) = e {
        response.headers_mut().insert(
            "content-range",
            format!("bytes */{size}").parse().expect("ascii"),
        );
    }
    if let ApiError::MethodNotAllowed(allow) = e {
        if let Ok(v) = allow.parse() {
            response.headers_mut().insert("allow", v);
        }
    }
    response
}
