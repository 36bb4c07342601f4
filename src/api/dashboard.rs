//! The dashboard: a single-page app (the files under `dashboard/`) built into the binary and
//! served at `/`, at its page paths and under `/assets/`, with the headers that keep it safe.
//!
//! - Every page path (`/`, `/login`, `/projects/…`) answers `index.html`; the app routes on the
//!   client. A WebSocket upgrade at `/` is still the realtime handshake (`super::realtime`).
//! - The page holds a session token (sent as `Authorization: Bearer`, kept in `sessionStorage`),
//!   never an API key; no cookie is ever read by the API, so a request another site makes the
//!   browser send carries no credential. Cross-site writes are refused anyway ([`cross_site`]).
//! - The Content-Security-Policy admits scripts, styles and connections from this origin only:
//!   no inline script or style, no `eval`, no framing (`frame-ancestors 'none'`).

use std::borrow::Cow;
use std::path::{Component, Path};

use warp::http::{HeaderMap, HeaderValue, Method, StatusCode};
use warp::hyper::body::Bytes;
use warp::reply::Response;

use crate::api::error::ApiError;
use crate::config::Config;

#[derive(rust_embed::Embed)]
#[folder = "dashboard/"]
struct Assets;

/// The first path segments that are the dashboard's own pages.
const PAGES: &[&str] = &["login", "signup", "projects", "invitations", "account"];

/// The policy of every dashboard response. `connect-src 'self'` covers the page's own
/// WebSocket (`ws:`/`wss:` on the same host and port).
pub const CONTENT_SECURITY_POLICY: &str = "default-src 'none'; script-src 'self'; \
    style-src 'self'; img-src 'self' data: blob:; font-src 'self'; connect-src 'self'; \
    media-src 'self' blob:; manifest-src 'self'; form-action 'self'; frame-ancestors 'none'; \
    base-uri 'none'";

/// Whether `path` (without a trailing slash) is one of the dashboard's pages.
pub fn is_page(path: &str) -> bool {
    if path == "/" {
        return true;
    }
    let first = path.trim_start_matches('/').split('/').next().unwrap_or("");
    PAGES.contains(&first)
}

/// The dashboard's answer to a GET or HEAD of `path`: the app's page for a page path, an asset
/// under `/assets/`; `None` for any other path or method (the API answers those).
pub fn serve(
    config: &Config,
    method: &Method,
    path: &str,
    headers: &HeaderMap,
) -> Option<Response> {
    if method != Method::GET && method != Method::HEAD {
        return None;
    }
    let file = if is_page(path) {
        "index.html".to_string()
    } else {
        let rest = path.strip_prefix("/assets/")?;
        format!("assets/{rest}")
    };
    let (body, etag) = read(config, &file)?;
    let mut response = if headers
        .get("if-none-match")
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| v.split(',').any(|t| t.trim() == etag))
    {
        let mut r = Response::new(Bytes::new().into());
        *r.status_mut() = StatusCode::NOT_MODIFIED;
        r
    } else if method == Method::HEAD {
        Response::new(Bytes::new().into())
    } else {
        Response::new(Bytes::from(body.into_owned()).into())
    };
    let h = response.headers_mut();
    let mime = mime_guess::from_path(&file).first_or_octet_stream();
    let content_type = match mime.type_() {
        mime_guess::mime::TEXT | mime_guess::mime::APPLICATION
            if mime.subtype() != mime_guess::mime::OCTET_STREAM =>
        {
            format!("{mime}; charset=utf-8")
        }
        _ => mime.to_string(),
    };
    if let Ok(v) = HeaderValue::from_str(&content_type) {
        h.insert("content-type", v);
    }
    if let Ok(v) = HeaderValue::from_str(&etag) {
        h.insert("etag", v);
    }
    // Revalidated on every use (the ETag makes that a 304): a new binary's files are never
    // mixed with an old cached copy.
    h.insert("cache-control", HeaderValue::from_static("no-cache"));
    security_headers(h);
    Some(response)
}

/// The headers every dashboard response carries.
pub fn security_headers(h: &mut HeaderMap) {
    h.insert(
        "content-security-policy",
        HeaderValue::from_static(CONTENT_SECURITY_POLICY),
    );
    h.insert("x-frame-options", HeaderValue::from_static("DENY"));
    h.insert(
        "x-content-type-options",
        HeaderValue::from_static("nosniff"),
    );
    h.insert("referrer-policy", HeaderValue::from_static("no-referrer"));
    h.insert(
        "cross-origin-opener-policy",
        HeaderValue::from_static("same-origin"),
    );
    h.insert(
        "cross-origin-resource-policy",
        HeaderValue::from_static("same-origin"),
    );
    h.insert(
        "permissions-policy",
        HeaderValue::from_static("camera=(), microphone=(), geolocation=(), payment=()"),
    );
}

/// A file's bytes and its ETag: from `dashboard_dir` when set (for working on the dashboard),
/// else the copy built into the binary.
fn read(config: &Config, file: &str) -> Option<(Cow<'static, [u8]>, String)> {
    match &config.dashboard_dir {
        Some(dir) => {
            let relative = Path::new(file);
            // Only plain names below the directory: no `..`, no absolute path.
            if !relative
                .components()
                .all(|c| matches!(c, Component::Normal(_)))
            {
                return None;
            }
            let bytes = std::fs::read(dir.join(relative)).ok()?;
            let digest = ring::digest::digest(&ring::digest::SHA256, &bytes);
            let etag = format!("\"{}\"", hex::encode(&digest.as_ref()[..16]));
            Some((Cow::Owned(bytes), etag))
        }
        None => {
            let embedded = Assets::get(file)?;
            let etag = format!(
                "\"{}\"",
                hex::encode(&embedded.metadata.sha256_hash()[..16])
            );
            Some((embedded.data, etag))
        }
    }
}

/// Refuses a request that changes state when a browser says another site made it: a form a
/// foreign page posts, a `fetch` from another origin. The API reads no cookie, so such a request
/// carries no credential of the user anyway; refusing it also keeps unauthenticated endpoints
/// (sign-up, login) from being driven by another site. Browsers send `Sec-Fetch-Site`; older
/// ones only `Origin`, compared with the `Host` the request was sent to. Requests without
/// either (backends, curl) are not browsers' and pass.
pub fn cross_site(method: &Method, headers: &HeaderMap) -> Option<ApiError> {
    if matches!(*method, Method::GET | Method::HEAD | Method::OPTIONS) {
        return None;
    }
    let header = |name: &str| headers.get(name).and_then(|v| v.to_str().ok());
    let refused = match header("sec-fetch-site") {
        Some(site) => !matches!(site, "same-origin" | "none"),
        None => match (header("origin"), header("host")) {
            (Some(origin), Some(host)) => {
                origin.split_once("://").map(|(_, authority)| authority) != Some(host)
            }
            (Some(_), None) => true,
            (None, _) => false,
        },
    };
    refused.then(|| {
        ApiError::AccessDenied(
            "Cross-site requests that change state are refused: call the API from your backend \
             or from the dashboard's own origin."
                .into(),
        )
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn headers(pairs: &[(&'static str, &'static str)]) -> HeaderMap {
        let mut h = HeaderMap::new();
        for (k, v) in pairs {
            h.insert(*k, HeaderValue::from_static(v));
        }
        h
    }

    #[test]
    fn pages_are_the_apps_own_paths() {
        for p in [
            "/",
            "/login",
            "/projects",
            "/projects/abc/sql",
            "/invitations",
        ] {
            assert!(is_page(p), "{p}");
        }
        for p in [
            "/api/projects",
            "/realtime",
            "/metrics",
            "/assets/app.js",
            "/loginx",
        ] {
            assert!(!is_page(p), "{p}");
        }
    }

    #[test]
    fn the_index_and_assets_are_served_with_the_policy_and_nothing_else_is() {
        let config = Config::default();
        let r = serve(&config, &Method::GET, "/", &HeaderMap::new()).expect("index");
        assert_eq!(r.status(), 200);
        assert_eq!(
            r.headers()["content-security-policy"],
            CONTENT_SECURITY_POLICY
        );
        assert_eq!(r.headers()["x-frame-options"], "DENY");
        let mut revalidate = HeaderMap::new();
        revalidate.insert("if-none-match", r.headers()["etag"].clone());
        let again = serve(&config, &Method::GET, "/projects/x/sql", &revalidate).unwrap();
        assert_eq!(again.status(), 304);
        assert!(serve(&config, &Method::GET, "/assets/app.js", &HeaderMap::new()).is_some());
        assert!(serve(
            &config,
            &Method::GET,
            "/assets/../Cargo.toml",
            &HeaderMap::new()
        )
        .is_none());
        assert!(serve(&config, &Method::GET, "/assets/nope.js", &HeaderMap::new()).is_none());
        assert!(serve(&config, &Method::POST, "/", &HeaderMap::new()).is_none());
        assert!(serve(&config, &Method::GET, "/api/x", &HeaderMap::new()).is_none());
    }

    #[test]
    fn a_directory_override_serves_no_file_outside_it() {
        let config = Config {
            dashboard_dir: Some(concat!(env!("CARGO_MANIFEST_DIR"), "/dashboard").into()),
            ..Config::default()
        };
        assert!(serve(&config, &Method::GET, "/assets/app.js", &HeaderMap::new()).is_some());
        for p in [
            "/assets/../../Cargo.toml",
            "/assets//etc/passwd",
            "/assets/../index.html/..",
        ] {
            assert!(
                serve(&config, &Method::GET, p, &HeaderMap::new()).is_none(),
                "{p}"
            );
        }
    }

    #[test]
    fn cross_site_writes_are_refused_and_same_origin_ones_and_backends_pass() {
        let post = Method::POST;
        assert!(cross_site(&post, &headers(&[("sec-fetch-site", "cross-site")])).is_some());
        assert!(cross_site(&post, &headers(&[("sec-fetch-site", "same-site")])).is_some());
        assert!(cross_site(&post, &headers(&[("sec-fetch-site", "same-origin")])).is_none());
        assert!(cross_site(&Method::GET, &headers(&[("sec-fetch-site", "cross-site")])).is_none());
        assert!(cross_site(
            &post,
            &headers(&[("origin", "http://evil.test"), ("host", "127.0.0.1:8080")])
        )
        .is_some());
        assert!(cross_site(
            &post,
            &headers(&[
                ("origin", "http://127.0.0.1:8080"),
                ("host", "127.0.0.1:8080")
            ])
        )
        .is_none());
        assert!(cross_site(&post, &headers(&[("origin", "null"), ("host", "a")])).is_some());
        assert!(cross_site(&post, &headers(&[("host", "a")])).is_none());
    }
}
