//! What a handler sees of an HTTP request: method, path, query, headers, the client's address,
//! the body (read up to the limit, or left as a stream for the routes that stream), and the
//! request id that names it in the log and in an error body.

use std::collections::HashMap;
use std::net::{IpAddr, SocketAddr};

use bytes::Bytes;
use futures_util::stream::BoxStream;
use serde::de::DeserializeOwned;
use serde_json::Value;
use warp::http::{HeaderMap, Method};

use crate::api::error::{ApiError, ApiResult};

/// A streamed request body (uploads), chunk by chunk as the client sends it.
pub type BodyStream = BoxStream<'static, Result<Bytes, BodyError>>;

/// Why a request body could not be read.
#[derive(Debug, thiserror::Error)]
pub enum BodyError {
    /// The connection failed or the client broke the HTTP framing.
    #[error("{0}")]
    Read(warp::Error),
    /// No byte arrived for `body_idle_timeout_secs`.
    #[error("{0}")]
    Stalled(#[from] crate::error::BodyStalled),
}

/// `body`, ended with [`BodyError::Stalled`] once no chunk arrives for `idle` (a client that
/// trickles a body, or stops sending one, holds the request for at most that long per chunk).
pub fn idle_bounded<S, T>(
    body: S,
    idle: std::time::Duration,
) -> impl futures_util::Stream<Item = Result<T, BodyError>>
where
    S: futures_util::Stream<Item = Result<T, warp::Error>>,
{
    futures_util::stream::unfold(
        (Box::pin(body), false),
        move |(mut body, stalled)| async move {
            if stalled {
                return None;
            }
            match tokio::time::timeout(idle, futures_util::StreamExt::next(&mut body)).await {
                Ok(Some(chunk)) => Some((chunk.map_err(BodyError::Read), (body, false))),
                Ok(None) => None,
                Err(_) => {
                    let stalled = crate::error::BodyStalled(idle.as_secs());
                    Some((Err(BodyError::Stalled(stalled)), (body, true)))
                }
            }
        },
    )
}

pub struct Request {
    pub method: Method,
    /// The path without a trailing slash (`/` stays `/`).
    pub path: String,
    pub query: HashMap<String, String>,
    pub headers: HeaderMap,
    /// The client's address for rate limits ([`crate::api::listener::client_ip`]).
    pub client: Option<IpAddr>,
    /// The TCP peer (the listener's view, before any forwarding header).
    pub peer: Option<SocketAddr>,
    /// The connection's send deadline (none outside the listener, e.g. in unit tests).
    pub send_deadline: Option<crate::api::listener::SendDeadline>,
    /// The rest of the path after a route's `{…}` tail parameter, still percent-encoded.
    pub tail: String,
    pub request_id: String,
    pub(super) body: Option<Bytes>,
    /// Behind a mutex only so that `&Request` is `Send` (handlers hold it across awaits).
    pub(super) stream: std::sync::Mutex<Option<BodyStream>>,
    pub(super) upgrade: std::sync::Mutex<Option<hyper::upgrade::OnUpgrade>>,
}

impl Request {
    pub fn authorization(&self) -> Option<&str> {
        self.headers
            .get(warp::http::header::AUTHORIZATION)
            .and_then(|v| v.to_str().ok())
    }

    /// The JSON body as `T`; a malformed body or a missing or mistyped field is a 400 that
    /// names the field.
    pub fn json<T: DeserializeOwned>(&self) -> ApiResult<T> {
        let body = self.body.as_deref().unwrap_or_default();
        if body.iter().all(|b| b.is_ascii_whitespace()) {
            return Err(ApiError::BadRequest(
                "request body: expected a JSON object".into(),
            ));
        }
        // The path of the value that failed (`keepPreviousSecretSecs: invalid value: integer
        // \`-1\`, expected u32 …`): serde_json alone names missing and unknown fields, not a
        // mistyped one.
        let mut de = serde_json::Deserializer::from_slice(body);
        let value = serde_path_to_error::deserialize(&mut de).map_err(|e| {
            let path = e.path().to_string();
            let inner = e.into_inner();
            if path == "." || path.is_empty() {
                ApiError::BadRequest(format!("invalid request body: {inner}"))
            } else {
                ApiError::BadRequest(format!("invalid request body: {path}: {inner}"))
            }
        })?;
        de.end()
            .map_err(|e| ApiError::BadRequest(format!("invalid request body: {e}")))?;
        Ok(value)
    }

    /// Whether the request carries a non-blank body.
    pub fn has_body(&self) -> bool {
        self.body
            .as_deref()
            .is_some_and(|b| !b.iter().all(|c| c.is_ascii_whitespace()))
    }

    /// A required query-string parameter.
    pub fn param(&self, name: &str) -> ApiResult<&str> {
        self.query
            .get(name)
            .map(String::as_str)
            .filter(|v| !v.is_empty())
            .ok_or_else(|| ApiError::BadRequest(format!("missing query parameter `{name}`")))
    }

    /// An optional query-string parameter.
    pub fn optional_param(&self, name: &str) -> Option<&str> {
        self.query.get(name).map(String::as_str)
    }

    /// The project a request names: in the body for POST/PATCH, in the query string for
    /// GET/DELETE.
    pub fn project_id_from_body(&self) -> ApiResult<String> {
        #[derive(serde::Deserialize)]
        #[serde(rename_all = "camelCase")]
        struct P {
            project_id: Value,
        }
        let p: P = self.json()?;
        match p.project_id {
            Value::String(s) if !s.is_empty() => Ok(s),
            _ => Err(ApiError::BadRequest(
                "projectId: expected a non-empty string".into(),
            )),
        }
    }

    /// The body as a stream, for a route declared as streaming (taken once).
    pub fn take_stream(&mut self) -> BodyStream {
        self.stream
            .get_mut()
            .expect("not poisoned")
            .take()
            .unwrap_or_else(|| Box::pin(futures_util::stream::empty()))
    }

    /// The connection's upgrade handle (WebSocket), when the client asked for one.
    pub fn take_upgrade(&mut self) -> Option<hyper::upgrade::OnUpgrade> {
        self.upgrade.get_mut().expect("not poisoned").take()
    }
}

/// Who is asking and for which project: the two steps every project endpoint takes.
impl Request {
    /// The caller behind `Authorization`.
    pub async fn principal(&self, app: &crate::app::App) -> ApiResult<crate::auth::Principal> {
        Ok(app
            .auth
            .authenticate_from(self.authorization(), self.client)
            .await?)
    }

    /// The caller's access to the project named by `?projectId=`.
    pub async fn access_by_query(&self, app: &crate::app::App) -> ApiResult<crate::auth::Access> {
        let principal = self.principal(app).await?;
        Ok(app
            .auth
            .project_access(&principal, self.param("projectId")?)
            .await?)
    }

    /// The caller's access to the project named by the body's `projectId`.
    pub async fn access_by_body(&self, app: &crate::app::App) -> ApiResult<crate::auth::Access> {
        let principal = self.principal(app).await?;
        Ok(app
            .auth
            .project_access(&principal, &self.project_id_from_body()?)
            .await?)
    }
}
