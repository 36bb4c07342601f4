//! `GET /metrics`: who may read the Prometheus text ([`crate::metrics`] renders it) and where it
//! is served.
//!
//! The metrics name every project, so they are not public ([`refusal`]):
//! * `metrics_token` (`FLUXBASE_METRICS_TOKEN`) set: `Authorization: Bearer <token>` is
//!   required, wherever `/metrics` is served (401 `AUTH_REQUIRED` without it);
//! * `metrics_addr` (`FLUXBASE_METRICS_ADDR`) set: `/metrics` is served on that address only
//!   (the API's listener answers 404), e.g. an interface only the scraper reaches;
//! * neither: the API's listener answers `/metrics` only to a loopback peer whose request
//!   carries no proxy header (`Forwarded`, `X-Forwarded-For`, `X-Real-IP`); anyone else gets
//!   403 `INSUFFICIENT_PERMISSIONS` naming the two settings.

use std::net::SocketAddr;

use anyhow::Context;
use warp::http::{header, HeaderMap, Method};
use warp::reply::Response;
use warp::{Filter, Reply as _};

use super::error_response;
use super::Request;
use crate::api::error::{ApiError, ApiResult};
use crate::app::{App, SharedApp};
use crate::config::Config;

/// Where a `/metrics` request arrived.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Listener {
    /// The API's own listener.
    Api,
    /// The dedicated listener of `metrics_addr`.
    Dedicated,
}

/// Prometheus text, for an operator (see docs/security.md for who may read it).
#[utoipa::path(get, path = "/metrics", tag = "operations",
    responses((status = 200, description = "Prometheus text format", content_type = "text/plain", body = String)))]
pub async fn metrics(app: SharedApp, req: Request) -> ApiResult<Response> {
    match refusal(&app.config, Listener::Api, req.peer, &req.headers) {
        Some(e) => Err(e),
        None => Ok(text(&app)),
    }
}

/// The metrics of every part of the server, as Prometheus text.
fn text(app: &App) -> Response {
    warp::reply::with_header(
        app.metrics.render(
            app.sql.connection_count(),
            app.sql.connection_budget(),
            &app.cdc.all_status(),
        ) + &app.realtime.render_metrics()
            + &app
                .cluster_mode
                .as_ref()
                .map(|m| m.render_metrics())
                .unwrap_or_default(),
        "content-type",
        "text/plain; version=0.0.4",
    )
    .into_response()
}

/// Whether the caller may read what only an operator should (the causes `/ready` names: paths,
/// endpoints, the backend's own errors): under `/metrics`' rules as if served on its own address,
/// i.e. the metrics token when one is set, else a local request not behind a proxy.
pub(super) fn operator(config: &Config, peer: Option<SocketAddr>, headers: &HeaderMap) -> bool {
    match &config.metrics_token {
        Some(_) => refusal(config, Listener::Dedicated, peer, headers).is_none(),
        None => !config.trust_forwarded_for && from_loopback(peer, headers),
    }
}

/// Why a `/metrics` request is refused under the access rules of the module docs, if it is.
/// `peer` is the client's address when known (unknown: not trusted as loopback).
fn refusal(
    config: &Config,
    listener: Listener,
    peer: Option<SocketAddr>,
    headers: &HeaderMap,
) -> Option<ApiError> {
    if listener == Listener::Api && config.metrics_addr.is_some() {
        Some(ApiError::NotFound(
            "/metrics is served on its own address (metrics_addr).".into(),
        ))
    } else if let Some(token) = &config.metrics_token {
        let given = headers
            .get(header::AUTHORIZATION)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.split_once(' '))
            .filter(|(scheme, _)| scheme.eq_ignore_ascii_case("bearer"))
            .map(|(_, t)| t.trim());
        // Compared by digest: the time taken says nothing about the token.
        let digest = |t: &str| crate::secrets::sha256(t.as_bytes());
        let ok = given.is_some_and(|g| digest(g) == digest(token.expose()));
        (!ok).then(|| {
            ApiError::AuthRequired(
                "/metrics needs Authorization: Bearer <FLUXBASE_METRICS_TOKEN>.".into(),
            )
        })
    } else if listener == Listener::Api
        && (config.trust_forwarded_for || !from_loopback(peer, headers))
    {
        Some(ApiError::InsufficientPermissions(
            "/metrics answers only local requests: set FLUXBASE_METRICS_TOKEN (a bearer token) \
             or FLUXBASE_METRICS_ADDR (a separate listen address) to scrape it from elsewhere."
                .into(),
        ))
    } else {
        None
    }
}

/// A request straight from this machine: a loopback peer, not relaying anyone (a reverse proxy
/// on the same host says whom it forwards for). With `trust_forwarded_for` the API listener is
/// behind a proxy, which may add no such header, so no request there counts as local.
fn from_loopback(peer: Option<SocketAddr>, headers: &HeaderMap) -> bool {
    let proxied = ["forwarded", "x-forwarded-for", "x-real-ip"]
        .iter()
        .any(|h| headers.contains_key(*h));
    let loopback = peer.is_some_and(|p| match p.ip() {
        std::net::IpAddr::V4(v4) => v4.is_loopback(),
        std::net::IpAddr::V6(v6) => {
            v6.is_loopback() || v6.to_ipv4_mapped().is_some_and(|v4| v4.is_loopback())
        }
    });
    loopback && !proxied && loopback_host(headers)
}

/// Whether the request names this machine by a loopback name (`localhost`, `127.0.0.1`,
/// `[::1]`, any port) or names nothing. A page on another name that resolves to 127.0.0.1 (DNS
/// rebinding) reaches the server from loopback, but with its own name as `Host`.
fn loopback_host(headers: &HeaderMap) -> bool {
    let Some(host) = headers.get(header::HOST) else {
        return true;
    };
    let Ok(host) = host.to_str() else {
        return false;
    };
    let name = if let Some(rest) = host.strip_prefix('[') {
        rest.split(']').next().unwrap_or("")
    } else {
        host.rsplit_once(':').map_or(host, |(name, _)| name)
    };
    let name = name.trim_end_matches('.').to_ascii_lowercase();
    name == "localhost"
        || name.ends_with(".localhost")
        || name
            .parse::<std::net::IpAddr>()
            .is_ok_and(|ip| ip.is_loopback())
}

/// Starts the dedicated `/metrics` listener when `metrics_addr` is set; logs where the
/// metrics can be scraped either way.
pub async fn start_listener(app: &SharedApp) -> anyhow::Result<()> {
    let config = &app.config;
    let token = if config.metrics_token.is_some() {
        " with Authorization: Bearer $FLUXBASE_METRICS_TOKEN"
    } else {
        ""
    };
    let Some(addr) = config.metrics_addr else {
        if token.is_empty() {
            tracing::info!(
                "metrics: GET /metrics from this machine only (loopback); set \
                 FLUXBASE_METRICS_TOKEN or FLUXBASE_METRICS_ADDR to scrape it from elsewhere"
            );
        } else {
            tracing::info!("metrics: GET /metrics{token}");
        }
        return Ok(());
    };
    let listener = tokio::net::TcpListener::bind(addr)
        .await
        .with_context(|| format!("binding the metrics address {addr}"))?;
    let bound = listener.local_addr()?;
    let weak = std::sync::Arc::downgrade(app);
    let routes = warp::path::full()
        .and(warp::method())
        .and(warp::addr::remote())
        .and(warp::header::headers_cloned())
        .map(
            move |path: warp::path::FullPath, method: Method, peer, headers: HeaderMap| {
                let Some(app) = weak.upgrade() else {
                    return error_response(&ApiError::NotFound("shutting down".into()), None);
                };
                if path.as_str().trim_end_matches('/') != "/metrics" {
                    return error_response(
                        &ApiError::NotFound("Only /metrics is served here.".into()),
                        None,
                    );
                }
                if method != Method::GET {
                    return error_response(&ApiError::MethodNotAllowed("GET".into()), None);
                }
                match refusal(&app.config, Listener::Dedicated, peer, &headers) {
                    Some(e) => error_response(&e, None),
                    None => text(&app),
                }
            },
        );
    let task = tokio::spawn(warp::serve(routes).incoming(listener).run());
    app.metrics.set_listener(bound, task);
    tracing::info!(%bound, "metrics: GET http://{bound}/metrics{token}");
    Ok(())
}
