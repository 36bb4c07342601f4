//! HTTP routing. Warp extracts the method, path, query, headers and body stream; one
//! dispatcher maps `(method, path)` to a handler, so every failure — unknown route, wrong
//! method, oversized or malformed body — answers in the one error shape of [`ApiError`].

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Instant;

use bytes::{Buf, Bytes, BytesMut};
use futures_util::{Stream, StreamExt};
use serde::de::DeserializeOwned;
use serde_json::{json, Value};
use warp::http::{HeaderMap, Method, StatusCode};
use warp::reply::{Reply, Response};
use warp::Filter;

use crate::app::{App, SharedApp};
use crate::error::{ApiError, ApiResult};

/// All routes of the server.
pub fn routes(
    app: SharedApp,
) -> impl Filter<Extract = (Response,), Error = warp::Rejection> + Clone {
    // The guide's WebSocket URL is a bare host: upgrades are accepted at `/` and `/realtime`.
    let ws_app = app.clone();
    let websocket = warp::path::end()
        .or(warp::path("realtime").and(warp::path::end()))
        .unify()
        .and(warp::get())
        .and(warp::header::headers_cloned())
        .and(warp::ext::optional::<hyper::upgrade::OnUpgrade>())
        .and_then(move |headers: HeaderMap, on_upgrade| {
            let app = ws_app.clone();
            async move { crate::realtime::upgrade(app, &headers, on_upgrade) }
        });
    // `/metrics` needs the peer's address (see `metrics::answer`), which the listener puts in
    // the request's extensions.
    let metrics_app = app.clone();
    let metrics = warp::path("metrics")
        .and(warp::path::end())
        .and(warp::get())
        .and(warp::ext::optional::<crate::listener::ClientAddr>())
        .and(warp::header::headers_cloned())
        .map(
            move |peer: Option<crate::listener::ClientAddr>, headers: HeaderMap| {
                let peer = peer.map(|crate::listener::ClientAddr(a)| a);
                let response = crate::metrics::answer(
                    &metrics_app,
                    crate::metrics::Listener::Api,
                    peer,
                    &headers,
                );
                metrics_app
                    .metrics
                    .observe_request("/metrics", response.status().as_u16());
                response
            },
        );
    let api = warp::method()
        .and(warp::path::full())
        .and(warp::query::raw().or(warp::any().map(String::new)).unify())
        .and(warp::header::headers_cloned())
        .and(warp::ext::optional::<crate::listener::ClientAddr>())
        .and(warp::body::stream())
        .then(
            move |method: Method,
                  path: warp::path::FullPath,
                  query: String,
                  headers: HeaderMap,
                  peer: Option<crate::listener::ClientAddr>,
                  body| {
                let app = app.clone();
                async move {
                    let client =
                        crate::listener::client_ip(peer, &headers, app.config.trust_forwarded_for);
                    let path = path.as_str().to_string();
                    handle(app, method, path, query, headers, client, body).await
                }
            },
        );
    websocket.or(metrics).unify().or(api).unify()
}

/// Everything a handler may need from the request.
pub struct Request {
    pub method: Method,
    pub path: String,
    pub query: HashMap<String, String>,
    pub headers: HeaderMap,
    /// The client's address for rate limits ([`crate::listener::client_ip`]).
    pub client: Option<std::net::IpAddr>,
    body: Option<Bytes>,
}

impl Request {
    fn authorization(&self) -> Option<&str> {
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
        serde_json::from_slice(body)
            .map_err(|e| ApiError::BadRequest(format!("invalid request body: {e}")))
    }

    /// A required query-string parameter.
    pub fn param(&self, name: &str) -> ApiResult<&str> {
        self.query
            .get(name)
            .map(String::as_str)
            .filter(|v| !v.is_empty())
            .ok_or_else(|| ApiError::BadRequest(format!("missing query parameter `{name}`")))
    }
}

async fn handle<S, B>(
    app: SharedApp,
    method: Method,
    path: String,
    query: String,
    headers: HeaderMap,
    client: Option<std::net::IpAddr>,
    body: S,
) -> Response
where
    S: Stream<Item = Result<B, warp::Error>> + Send + 'static,
    B: Buf + Send + 'static,
{
    let started = Instant::now();
    let route = route_name(&path);
    let outcome = async {
        let query = serde_urlencoded::from_str::<HashMap<String, String>>(&query)
            .map_err(|e| ApiError::BadRequest(format!("invalid query string: {e}")))?;
        // Uploads stream their body to the storage backend instead of reading it here.
        if method == Method::POST && path.trim_end_matches('/') == "/api/storage/upload" {
            let body = body.map(|r| r.map(|mut b| b.copy_to_bytes(b.remaining())));
            return ok(app.upload(&headers, &query, body).await?);
        }
        let body = if method == Method::GET || method == Method::HEAD {
            None
        } else {
            Some(read_body(body, &headers, app.config.max_body_bytes).await?)
        };
        let req = Request {
            method,
            path,
            query,
            headers,
            client,
            body,
        };
        dispatch(&app, &req).await
    }
    .await;
    let response = match outcome {
        Ok(r) => r,
        Err(e) => {
            if matches!(e, ApiError::StorageUnavailable(_)) {
                app.metrics
                    .storage_backend_errors
                    .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
            }
            error_response(&e)
        }
    };
    let status = response.status().as_u16();
    app.metrics.observe_request(route, status);
    tracing::info!(
        route,
        status,
        ms = started.elapsed().as_secs_f64() * 1000.0,
        "request"
    );
    response
}

/// Reads the body up to `limit` bytes; a declared or actual larger body is a 413.
async fn read_body<S, B>(body: S, headers: &HeaderMap, limit: usize) -> ApiResult<Bytes>
where
    S: Stream<Item = Result<B, warp::Error>>,
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
        let mut chunk =
            chunk.map_err(|e| ApiError::BadRequest(format!("reading the body: {e}")))?;
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

/// A low-cardinality label for metrics and logs.
fn route_name(path: &str) -> &'static str {
    match path {
        "/health" => "/health",
        "/ready" => "/ready",
        "/metrics" => "/metrics",
        "/api/execute-sql" => "/api/execute-sql",
        "/api/auth/signup" | "/api/auth/login" | "/api/auth/logout" | "/api/auth/me" => "/api/auth",
        "/api/projects" => "/api/projects",
        "/api/keys" | "/api/keys/rotate" => "/api/keys",
        "/api/cdc/status" => "/api/cdc/status",
        "/api/webhooks" | "/api/webhooks/deliveries" | "/api/webhooks/redeliver" => "/api/webhooks",
        "/api/realtime/token" | "/api/realtime/broadcast" => "/api/realtime",
        "/api/team" | "/api/team/invites/accept" => "/api/team",
        "/api/rls/policies" => "/api/rls",
        "/api/storage/object" => "/api/storage/object",
        p if p.starts_with("/api/storage/public/") => "/api/storage/public",
        p if p.starts_with("/api/storage/") => "/api/storage",
        _ => "other",
    }
}

pub fn json_response(status: StatusCode, body: &Value) -> Response {
    raw_json_response(status, body.to_string())
}

pub fn raw_json_response(status: StatusCode, body: String) -> Response {
    warp::reply::with_status(
        warp::reply::with_header(body, "content-type", "application/json"),
        status,
    )
    .into_response()
}

pub fn error_response(e: &ApiError) -> Response {
    let mut response = json_response(e.status(), &e.body());
    if let Some(secs) = e.retry_after() {
        response
            .headers_mut()
            .insert("retry-after", secs.to_string().parse().expect("digits"));
    }
    response
}

fn ok((status, body): (StatusCode, Value)) -> ApiResult<Response> {
    Ok(json_response(status, &body))
}

/// Projects are named in the body for POST/PATCH and in the query string for GET/DELETE.
fn project_id_from_body(req: &Request) -> ApiResult<String> {
    #[derive(serde::Deserialize)]
    #[serde(rename_all = "camelCase")]
    struct P {
        project_id: Value,
    }
    let p: P = req.json()?;
    match p.project_id {
        Value::String(s) if !s.is_empty() => Ok(s),
        _ => Err(ApiError::BadRequest(
            "projectId: expected a non-empty string".into(),
        )),
    }
}

async fn dispatch(app: &Arc<App>, req: &Request) -> ApiResult<Response> {
    use Method as M;
    let path = req.path.trim_end_matches('/');
    let path = if path.is_empty() { "/" } else { path };
    match (&req.method, path) {
        (&M::GET, "/health") => ok((StatusCode::OK, json!({ "status": "ok" }))),
        (&M::GET, "/ready") => {
            let ready = match app.control.get().await {
                Ok(c) => c.simple_query("SELECT 1").await.is_ok(),
                Err(_) => false,
            };
            if ready {
                if let Err(cause) = app.storage.ready().await {
                    let message = format!(
                        "The storage backend ({}) is not usable: {cause}",
                        app.storage.backend.describe()
                    );
                    return Ok(json_response(
                        StatusCode::SERVICE_UNAVAILABLE,
                        &json!({ "success": false, "error": {
                            "code": "STORAGE_UNAVAILABLE", "message": message } }),
                    ));
                }
                ok((StatusCode::OK, json!({ "status": "ready" })))
            } else {
                Err(ApiError::DatabaseUnavailable(
                    "control database unreachable".into(),
                ))
            }
        }
        // Spellings the `/metrics` filter did not take: the same rules, peer unknown.
        (&M::GET, "/metrics") => Ok(crate::metrics::answer(
            app,
            crate::metrics::Listener::Api,
            None,
            &req.headers,
        )),

        (&M::POST, "/api/auth/signup") => ok(app.signup(req.json()?, req.client).await?),
        (&M::POST, "/api/auth/login") => ok(app.login(req.json()?, req.client).await?),
        (&M::POST, "/api/auth/logout") => {
            let p = app.authenticate(req.authorization()).await?;
            ok(app.logout(&p).await?)
        }
        (&M::GET, "/api/auth/me") => {
            let p = app.authenticate(req.authorization()).await?;
            ok(app.me(&p).await?)
        }

        (&M::POST, "/api/projects") => {
            let p = app.authenticate(req.authorization()).await?;
            let created = app.create_project_endpoint(&p, req.json()?).await?;
            if let Some(id) = created.1["project"]["id"].as_str() {
                app.cdc.start(id.to_string(), format!("fx_{id}"));
            }
            ok(created)
        }
        (&M::DELETE, "/api/projects") => {
            let p = app.authenticate(req.authorization()).await?;
            let access = app.project_access(&p, req.param("projectId")?).await?;
            access.require_admin()?;
            app.delete_project(&access.project.id).await?;
            ok((StatusCode::OK, json!({ "success": true })))
        }
        (&M::POST, "/api/realtime/token") => {
            let p = app.authenticate(req.authorization()).await?;
            let access = app.project_access(&p, &project_id_from_body(req)?).await?;
            ok(app.realtime_token(&access, req.json()?).await?)
        }
        (&M::POST, "/api/realtime/broadcast") => {
            let p = app.authenticate(req.authorization()).await?;
            let access = app.project_access(&p, &project_id_from_body(req)?).await?;
            ok(app.realtime_broadcast(&access, req.json()?)?)
        }
        (&M::POST, "/api/webhooks") => {
            let p = app.authenticate(req.authorization()).await?;
            let access = app.project_access(&p, &project_id_from_body(req)?).await?;
            ok(app.create_webhook(&access, req.json()?).await?)
        }
        (&M::GET, "/api/webhooks") => {
            let p = app.authenticate(req.authorization()).await?;
            let access = app.project_access(&p, req.param("projectId")?).await?;
            ok(app.list_webhooks(&access).await?)
        }
        (&M::PATCH, "/api/webhooks") => {
            let p = app.authenticate(req.authorization()).await?;
            let access = app.project_access(&p, &project_id_from_body(req)?).await?;
            ok(app.patch_webhook(&access, req.json()?).await?)
        }
        (&M::DELETE, "/api/webhooks") => {
            let p = app.authenticate(req.authorization()).await?;
            let access = app.project_access(&p, req.param("projectId")?).await?;
            ok(app.delete_webhook(&access, req.param("webhookId")?).await?)
        }
        (&M::GET, "/api/webhooks/deliveries") => {
            let p = app.authenticate(req.authorization()).await?;
            let access = app.project_access(&p, req.param("projectId")?).await?;
            let webhook = req.query.get("webhookId").map(String::as_str);
            let status = req.query.get("status").map(String::as_str);
            ok(app.list_deliveries(&access, webhook, status).await?)
        }
        (&M::POST, "/api/webhooks/redeliver") => {
            let p = app.authenticate(req.authorization()).await?;
            let access = app.project_access(&p, &project_id_from_body(req)?).await?;
            ok(app.redeliver(&access, req.json()?).await?)
        }
        (&M::GET, "/api/team") => {
            let p = app.authenticate(req.authorization()).await?;
            let access = app.project_access(&p, req.param("projectId")?).await?;
            ok(app.list_team(&access).await?)
        }
        (&M::POST, "/api/team") => {
            let p = app.authenticate(req.authorization()).await?;
            let access = app.project_access(&p, &project_id_from_body(req)?).await?;
            ok(app.invite(&access, req.json()?).await?)
        }
        (&M::PATCH, "/api/team") => {
            let p = app.authenticate(req.authorization()).await?;
            let access = app.project_access(&p, &project_id_from_body(req)?).await?;
            ok(app.change_role(&access, req.json()?).await?)
        }
        (&M::DELETE, "/api/team") => {
            let p = app.authenticate(req.authorization()).await?;
            let access = app.project_access(&p, req.param("projectId")?).await?;
            ok(app.remove_member(&access, req.param("userId")?).await?)
        }
        (&M::POST, "/api/team/invites/accept") => {
            let p = app.authenticate(req.authorization()).await?;
            ok(app.answer_invite(&p, req.json()?).await?)
        }
        (&M::GET, "/api/cdc/status") => {
            let p = app.authenticate(req.authorization()).await?;
            let access = app.project_access(&p, req.param("projectId")?).await?;
            let (id, db) = (&access.project.id, &access.project.db_name);
            let report = app.cdc.report(id, db).await?;
            ok((
                StatusCode::OK,
                json!({ "success": true, "projectId": id, "stream": report.stream, "slot": report.slot }),
            ))
        }
        (&M::GET, "/api/storage/buckets") => {
            let p = app.authenticate(req.authorization()).await?;
            let access = app.project_access(&p, req.param("projectId")?).await?;
            ok(app.list_buckets(&access).await?)
        }
        (&M::POST, "/api/storage/buckets") => {
            let p = app.authenticate(req.authorization()).await?;
            let access = app.project_access(&p, &project_id_from_body(req)?).await?;
            ok(app.create_bucket(&access, req.json()?).await?)
        }
        (&M::PATCH, "/api/storage/buckets") => {
            let p = app.authenticate(req.authorization()).await?;
            let access = app.project_access(&p, &project_id_from_body(req)?).await?;
            ok(app.patch_bucket(&access, req.json()?).await?)
        }
        (&M::DELETE, "/api/storage/buckets") => {
            let p = app.authenticate(req.authorization()).await?;
            let access = app.project_access(&p, req.param("projectId")?).await?;
            ok(app.delete_bucket(&access, req.param("bucketId")?).await?)
        }
        (&M::GET, "/api/storage/files") => {
            let p = app.authenticate(req.authorization()).await?;
            let access = app.project_access(&p, req.param("projectId")?).await?;
            let base = crate::storage::base_url(&app.config, &req.headers);
            ok(app
                .list_files(&access, req.param("bucketId")?, &base)
                .await?)
        }
        (&M::GET, "/api/storage/url") => {
            let p = app.authenticate(req.authorization()).await?;
            let access = app.project_access(&p, req.param("projectId")?).await?;
            let base = crate::storage::base_url(&app.config, &req.headers);
            ok(app.signed_url(&access, req.param("s3Key")?, &base).await?)
        }
        (&M::DELETE, "/api/storage/files") | (&M::DELETE, "/api/storage/delete") => {
            let p = app.authenticate(req.authorization()).await?;
            let target = DeleteFile::from_request(req)?;
            let access = app.project_access(&p, &target.project_id).await?;
            ok(app
                .delete_file(&access, target.file_id.as_deref(), target.s3_key.as_deref())
                .await?)
        }
        (&M::GET, "/api/storage/object") | (&M::HEAD, "/api/storage/object") => {
            app.signed_download(
                req.param("key")?,
                req.param("expires")?,
                req.param("signature")?,
                req.method == M::HEAD,
            )
            .await
        }
        (&M::GET, p) | (&M::HEAD, p) if p.starts_with("/api/storage/public/") => {
            app.public_download(&p["/api/storage/public/".len()..], req.method == M::HEAD)
                .await
        }

        (&M::GET, "/api/projects") => {
            let p = app.authenticate(req.authorization()).await?;
            ok(app.list_projects(&p).await?)
        }
        (&M::PATCH, "/api/projects") => {
            let p = app.authenticate(req.authorization()).await?;
            let access = app.project_access(&p, &project_id_from_body(req)?).await?;
            ok(app.patch_project(&access, req.json()?).await?)
        }

        (&M::GET, "/api/keys") => {
            let p = app.authenticate(req.authorization()).await?;
            let access = app.project_access(&p, req.param("projectId")?).await?;
            ok(app.list_keys(&access).await?)
        }
        (&M::POST, "/api/keys") => {
            let p = app.authenticate(req.authorization()).await?;
            let access = app.project_access(&p, &project_id_from_body(req)?).await?;
            ok(app.create_key(&access, req.json()?).await?)
        }
        (&M::POST, "/api/keys/rotate") => {
            let p = app.authenticate(req.authorization()).await?;
            let access = app.project_access(&p, &project_id_from_body(req)?).await?;
            ok(app.rotate_key(&access, req.json()?).await?)
        }
        (&M::DELETE, "/api/keys") => {
            let p = app.authenticate(req.authorization()).await?;
            let access = app.project_access(&p, req.param("projectId")?).await?;
            ok(app.delete_key(&access, req.param("keyId")?).await?)
        }

        (&M::POST, "/api/execute-sql") => {
            let p = app.authenticate(req.authorization()).await?;
            let sql: crate::sql::SqlRequest = req.json()?;
            let access = app.project_access(&p, &sql.project_id).await?;
            let identity = crate::rls::request_identity(
                &access,
                sql.auth_uid.as_ref(),
                req.headers.get(crate::rls::AUTH_UID_HEADER),
            )?;
            Ok(raw_json_response(
                StatusCode::OK,
                app.execute_sql(&access, sql, identity).await?,
            ))
        }

        (&M::GET, "/api/rls/policies") => {
            let p = app.authenticate(req.authorization()).await?;
            let access = app.project_access(&p, req.param("projectId")?).await?;
            ok(app.list_policies(&access).await?)
        }
        (&M::POST, "/api/rls/policies") => {
            let p = app.authenticate(req.authorization()).await?;
            let access = app.project_access(&p, &project_id_from_body(req)?).await?;
            ok(app.create_policy(&access, &req.json()?).await?)
        }
        (&M::PATCH, "/api/rls/policies") => {
            let p = app.authenticate(req.authorization()).await?;
            let access = app.project_access(&p, &project_id_from_body(req)?).await?;
            ok(app.toggle_policy(&access, &req.json()?).await?)
        }
        (&M::DELETE, "/api/rls/policies") => {
            let p = app.authenticate(req.authorization()).await?;
            let access = app.project_access(&p, req.param("projectId")?).await?;
            let schema = req.query.get("schema").map(String::as_str);
            ok(app
                .delete_policy(&access, schema, req.param("table")?, req.param("name")?)
                .await?)
        }

        (_, p) if KNOWN_PATHS.contains(&p) => Err(ApiError::MethodNotAllowed),
        (_, p) => Err(ApiError::NotFound(format!(
            "No route for {} {p}",
            req.method
        ))),
    }
}

/// The file to delete: `?projectId=&s3Key=` or `?projectId=&fileId=`, or the same fields in
/// a JSON body.
#[derive(serde::Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
struct DeleteFile {
    project_id: String,
    file_id: Option<String>,
    s3_key: Option<String>,
}

impl DeleteFile {
    fn from_request(req: &Request) -> ApiResult<DeleteFile> {
        let has_body = req
            .body
            .as_deref()
            .is_some_and(|b| !b.iter().all(|c| c.is_ascii_whitespace()));
        if req.query.contains_key("projectId") || !has_body {
            let get = |k: &str| req.query.get(k).filter(|v| !v.is_empty()).cloned();
            return Ok(DeleteFile {
                project_id: req.param("projectId")?.to_string(),
                file_id: get("fileId"),
                s3_key: get("s3Key"),
            });
        }
        req.json()
    }
}

const KNOWN_PATHS: &[&str] = &[
    "/health",
    "/ready",
    "/metrics",
    "/api/auth/signup",
    "/api/auth/login",
    "/api/auth/logout",
    "/api/auth/me",
    "/api/projects",
    "/api/keys",
    "/api/keys/rotate",
    "/api/execute-sql",
    "/api/cdc/status",
    "/api/realtime/token",
    "/api/realtime/broadcast",
    "/api/webhooks",
    "/api/webhooks/deliveries",
    "/api/webhooks/redeliver",
    "/api/team",
    "/api/team/invites/accept",
    "/api/rls/policies",
    "/api/storage/buckets",
    "/api/storage/upload",
    "/api/storage/files",
    "/api/storage/url",
    "/api/storage/delete",
    "/api/storage/object",
];
