//! The HTTP layer: the only part of the server that knows warp.
//!
//! ```text
//!  warp filter ─► handle(): request id + span, route lookup (routes.rs), body read up to the
//!       limit (or streamed), handler ─► domain service ─► typed reply | ApiError ─► response,
//!       metrics label and log line from the route
//! ```
//! Every route is one entry of [`routes`]: its `#[utoipa::path]` annotation gives its method and
//! path, and the same table answers dispatch, the metrics label and `GET /api/openapi.json`, so
//! the three cannot drift. Handlers (one file per area) parse a typed request, call the domain
//! and return a typed reply; errors map to the guide's status and code in [`error`].

pub mod answers;
pub mod auth;
pub mod cdc;
pub mod dashboard;
pub mod error;
pub mod health;
pub mod keys;
pub mod listener;
pub mod metrics;
pub mod openapi;
pub mod projects;
pub mod realtime;
pub mod reply;
pub mod request;
pub mod rls;
pub mod routes;
pub mod sql;
pub mod storage;
pub mod team;
pub mod webhooks;

use std::collections::HashMap;
use std::time::Instant;

use bytes::{Buf, Bytes, BytesMut};
use futures_util::{Stream, StreamExt};
use tracing::Instrument;
use warp::http::{HeaderMap, HeaderValue, Method};
use warp::reply::Response;
use warp::Filter;

use crate::api::error::{ApiError, ApiResult};
use crate::app::SharedApp;
pub use reply::{error_response, json_response, raw_json_response};
pub use request::Request;
use routes::BodyMode;

/// The one warp filter of the server: everything (API, WebSocket upgrades, `/metrics`) goes
/// through the route table.
pub fn filter(
    app: SharedApp,
) -> impl Filter<Extract = (Response,), Error = warp::Rejection> + Clone {
    let table = std::sync::Arc::new(routes::Table::build());
    warp::method()
        .and(warp::path::full())
        .and(warp::query::raw().or(warp::any().map(String::new)).unify())
        .and(warp::header::headers_cloned())
        .and(warp::ext::optional::<crate::api::listener::ClientAddr>())
        .and(warp::ext::optional::<crate::api::listener::SendDeadline>())
        .and(warp::ext::optional::<hyper::upgrade::OnUpgrade>())
        .and(warp::body::stream())
        .then(
            move |method: Method,
                  path: warp::path::FullPath,
                  query: String,
                  headers: HeaderMap,
                  peer: Option<crate::api::listener::ClientAddr>,
                  send_deadline: Option<crate::api::listener::SendDeadline>,
                  upgrade: Option<hyper::upgrade::OnUpgrade>,
                  body| {
                let app = app.clone();
                let table = table.clone();
                async move {
                    let incoming = Incoming {
                        method,
                        path: path.as_str().to_string(),
                        query,
                        headers,
                        peer,
                        send_deadline,
                        upgrade,
                    };
                    handle(app, &table, incoming, body).await
                }
            },
        )
}

struct Incoming {
    method: Method,
    path: String,
    query: String,
    headers: HeaderMap,
    peer: Option<crate::api::listener::ClientAddr>,
    send_deadline: Option<crate::api::listener::SendDeadline>,
    upgrade: Option<hyper::upgrade::OnUpgrade>,
}

/// A request id from the client's `X-Request-Id` when it is a short token, else a fresh one.
fn request_id(headers: &HeaderMap) -> String {
    headers
        .get("x-request-id")
        .and_then(|v| v.to_str().ok())
        .filter(|v| {
            !v.is_empty()
                && v.len() <= 64
                && v.bytes()
                    .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
        })
        .map(str::to_string)
        .unwrap_or_else(fresh_request_id)
}

/// A new request id: 16 hex digits, distinct for every call in this process and unlike those of
/// another run. Not a secret, so no system call per request (a random draw was one `getrandom`
/// per request, measured in the SQL benchmark's profile): a counter from a random start, mixed
/// by SplitMix64's finalizer (a bijection, so distinct counters give distinct ids).
pub fn fresh_request_id() -> String {
    use std::sync::atomic::{AtomicU64, Ordering};
    use std::sync::OnceLock;
    static START: OnceLock<u64> = OnceLock::new();
    static COUNTER: AtomicU64 = AtomicU64::new(0);
    let start = *START.get_or_init(|| u64::from_le_bytes(crate::secrets::random_bytes::<8>()));
    let mut z = start.wrapping_add(COUNTER.fetch_add(1, Ordering::Relaxed));
    z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    format!("{:016x}", z ^ (z >> 31))
}

async fn handle<S, B>(
    app: SharedApp,
    table: &routes::Table,
    incoming: Incoming,
    body: S,
) -> Response
where
    S: Stream<Item = Result<B, warp::Error>> + Send + 'static,
    B: Buf + Send + 'static,
{
    let started = Instant::now();
    let request_id = request_id(&incoming.headers);
    let path = match incoming.path.trim_end_matches('/') {
        "" => "/".to_string(),
        p => p.to_string(),
    };
    let found = table.find(&incoming.method, &path);
    if found.is_err() {
        if let Some(page) =
            dashboard::serve(&app.config, &incoming.method, &path, &incoming.headers)
        {
            app.metrics
                .observe_request("dashboard", page.status().as_u16());
            return page;
        }
    }
    let label = match &found {
        Ok((route, _)) => route.label.as_str(),
        Err(_) => "other",
    };
    let span =
        tracing::info_span!("request", id = %request_id, method = %incoming.method, route = label);
    let outcome = async {
        let (route, tail) = found.map_err(|e| e.into_error(&incoming.method, &path))?;
        if let Some(refused) =
            dashboard::cross_site(&app.config, &incoming.method, &incoming.headers)
        {
            return Err(refused);
        }
        let query = serde_urlencoded::from_str::<HashMap<String, String>>(&incoming.query)
            .map_err(|e| ApiError::BadRequest(format!("invalid query string: {e}")))?;
        let client = crate::api::listener::client_ip(
            incoming.peer,
            &incoming.headers,
            app.config.trust_forwarded_for,
        );
        let mut req = Request {
            method: incoming.method,
            path: path.clone(),
            query,
            headers: incoming.headers,
            client,
            peer: incoming.peer.map(|crate::api::listener::ClientAddr(a)| a),
            send_deadline: incoming.send_deadline,
            tail,
            request_id: request_id.clone(),
            body: None,
            stream: Default::default(),
            upgrade: std::sync::Mutex::new(incoming.upgrade),
        };
        let idle = std::time::Duration::from_secs(app.config.body_idle_timeout_secs);
        match route.body {
            BodyMode::Stream => {
                req.stream = std::sync::Mutex::new(Some(Box::pin(
                    request::idle_bounded(body, idle)
                        .map(|r| r.map(|mut b| b.copy_to_bytes(b.remaining()))),
                )))
            }
            BodyMode::Read if req.method != Method::GET && req.method != Method::HEAD => {
                let body = request::idle_bounded(body, idle);
                req.body = Some(read_body(body, &req.headers, app.config.max_body_bytes).await?);
            }
            BodyMode::Read => {}
        }
        (route.handler)(app.clone(), req).await
    }
    .instrument(span.clone())
    .await;
    let mut response = match outcome {
        Ok(r) => r,
        Err(e) => {
            if matches!(e, ApiError::StorageUnavailable(_)) {
                app.metrics
                    .storage_backend_errors
                    .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
            }
            span.in_scope(|| error_response(&e, Some(&request_id)))
        }
    };
    if let Ok(v) = HeaderValue::from_str(&request_id) {
        response.headers_mut().insert("x-request-id", v);
    }
    // Every answer is what its Content-Type says (JSON, a file): never sniffed into HTML, even
    // an error that echoes what the request held (red team rt13).
    response
        .headers_mut()
        .entry("x-content-type-options")
        .or_insert(HeaderValue::from_static("nosniff"));
    let status = response.status().as_u16();
    app.metrics.observe_request(label, status);
    span.in_scope(|| {
        tracing::info!(
            status,
            ms = started.elapsed().as_secs_f64() * 1000.0,
            "request"
        )
    });
    response
}

/// Reads the body up to `limit` bytes; a declared or actual larger body is a 413.
async fn read_body<S, B>(body: S, headers: &HeaderMap, limit: usize) -> ApiResult<Bytes>
where
    S: Stream<Item = Result<B, request::BodyError>>,
    B: Buf,
{
    let declared = headers
        .get(warp::http::header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<u64>().ok());
    if declared.is_some_and(|n| n > limit as u64) {
        return Err(ApiError::PayloadTooLarge(limit));
    }
    let mut buf = BytesMut::new();
    futures_util::pin_mut!(body);
    while let Some(chunk) = body.next().await {
        let mut chunk = chunk.map_err(|e| match e {
            request::BodyError::Stalled(crate::error::BodyStalled(secs)) => {
                ApiError::BodyStalled(secs)
            }
            e => ApiError::BadRequest(format!("reading the body: {e}")),
        })?;
        if buf.len() + chunk.remaining() > limit {
            return Err(ApiError::PayloadTooLarge(limit));
        }
        while chunk.has_remaining() {
            let part = chunk.chunk();
            buf.extend_from_slice(part);
            let n = part.len();
            chunk.advance(n);
        }
    }
    Ok(buf.freeze())
}

/// Runs a request's work to its end even when its client goes away.
/// - SQL: what the request holds (the project's share, a place in the connection budget, the
///   pooled connection) is held as long as its statement runs on the server, not only as long
///   as its client waits. (Red team rt4: clients hanging up after a second released the shares
///   of `SLEEP(25)` statements still running on MariaDB, and the next requests found the
///   accounts' connection limit full. The statement is bounded by the statement timeout and
///   the server's guard.)
/// - Uploads: a commit that began (reservation, move into place, listing) is finished or undone,
///   never left halfway (red team rt10: a client hanging up at the wrong moment left a held
///   reservation blocking the name, or an upsert's new bytes under the old listing). A body
///   still arriving ends with its connection, and the upload fails and cleans up.
///
/// It runs in the request's own task ([`ToCompletion`]); a panic in it is a 500, as a panic of
/// a task of its own was.
pub(crate) async fn to_completion<T: Send + 'static>(
    work: impl std::future::Future<Output = T> + Send + 'static,
) -> Result<T, ApiError> {
    use futures_util::FutureExt;
    ToCompletion(Some(Box::pin(
        std::panic::AssertUnwindSafe(work).catch_unwind(),
    )))
    .await
    .map_err(|_| ApiError::Internal(anyhow::anyhow!("the request's work panicked")))
}

/// A future polled in the task that awaits it, which moves to a task of its own if that task
/// drops it before its end (the client went away): no hand-over to another task and back per
/// request (a spawn and a cross-task wake-up, often another worker's core), and still run to
/// its end. The boxed future is moved, not the future itself (it stays pinned where it is).
struct ToCompletion<T: Send + 'static>(
    Option<std::pin::Pin<Box<dyn std::future::Future<Output = T> + Send>>>,
);

impl<T: Send + 'static> std::future::Future for ToCompletion<T> {
    type Output = T;

    fn poll(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<T> {
        let work = self.0.as_mut().expect("polled after its end");
        let out = std::task::ready!(work.as_mut().poll(cx));
        self.0 = None;
        std::task::Poll::Ready(out)
    }
}

impl<T: Send + 'static> Drop for ToCompletion<T> {
    fn drop(&mut self) {
        if let Some(work) = self.0.take() {
            // Outside a runtime (shutting down) there is nothing left to run it on.
            if let Ok(runtime) = tokio::runtime::Handle::try_current() {
                runtime.spawn(work);
            }
        }
    }
}

#[cfg(test)]
mod request_id_tests {
    #[test]
    fn fresh_request_ids_are_distinct_16_hex_digits() {
        let ids: std::collections::HashSet<String> =
            (0..10_000).map(|_| super::fresh_request_id()).collect();
        assert_eq!(ids.len(), 10_000);
        assert!(ids
            .iter()
            .all(|id| id.len() == 16 && id.bytes().all(|b| b.is_ascii_hexdigit())));
    }
}
