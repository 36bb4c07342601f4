//! The dashboard: a single-page app (the files under `dashboard/`) built into the binary and
//! served at `/`, at its page paths and under `/assets/`, with the headers that keep it safe.
//!
//! - Every page path (`/`, `/login`, `/projects/…`) answers `index.html`; the app routes on the
//!   client. A WebSocket upgrade at `/` is still the realtime handshake (`super::realtime`).
//! - The page holds a session token (sent as `Authorization: Bearer`, kept in `sessionStorage`),
//!   never an API key; no cookie is ever read by the API, so a request another site makes the
//!   browser send carries no credential. Cross-site writes are refused anyway ([`cross_site`]).
//! - The page's Content-Security-Policy admits one script, the nonced entry module (fresh nonce
//!   per response), and what it imports (`'strict-dynamic'`): not any other file of this origin,
//!   such as a JavaScript file a project member uploaded to storage. Styles and connections come
//!   from this origin only; no inline script or style, no `eval`, no framing.

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

/// The policy of the assets (and the page's, but for `script-src`). `connect-src 'self'`
/// covers the page's own WebSocket (`ws:`/`wss:` on the same host and port).
pub const CONTENT_SECURITY_POLICY: &str = "default-src 'none'; script-src 'self'; \
    style-src 'self'; img-src 'self' data: blob:; font-src 'self'; connect-src 'self'; \
    media-src 'self' blob:; manifest-src 'self'; form-action 'self'; frame-ancestors 'none'; \
    base-uri 'none'";

/// The placeholder of the entry script's nonce in `index.html`.
const NONCE_PLACEHOLDER: &str = "__CSP_NONCE__";

/// The page's policy with `nonce`: scripts only from the nonced entry module and its imports
/// (`'self'` is ignored by browsers that know `'strict-dynamic'`, kept for older ones).
pub fn page_policy(nonce: &str) -> String {
    CONTENT_SECURITY_POLICY.replace(
        "script-src 'self';",
        &format!("script-src 'nonce-{nonce}' 'strict-dynamic' 'self';"),
    )
}

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
    if is_page(path) {
        return Some(page(config, method));
    }
    let file = format!("assets/{}", path.strip_prefix("/assets/")?);
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
    if let Ok(v) = HeaderValue::from_str(&content_type(&file)) {
        h.insert("content-type", v);
    }
    if let Ok(v) = HeaderValue::from_str(&etag) {
        h.insert("etag", v);
    }
    // Revalidated on every use (the ETag makes that a 304): a new binary's files are never
    // mixed with an old cached copy.
    h.insert("cache-control", HeaderValue::from_static("no-cache"));
    security_headers(h, CONTENT_SECURITY_POLICY);
    Some(response)
}

/// `index.html` with a fresh nonce on its entry script, and the policy naming it. Never
/// stored: a cached copy's nonce would not match the next response's policy.
fn page(config: &Config, method: &Method) -> Response {
    let nonce = crate::secrets::random_base62(22);
    let html = read(config, "index.html")
        .map(|(body, _)| String::from_utf8_lossy(&body).replace(NONCE_PLACEHOLDER, &nonce))
        .unwrap_or_else(|| {
            "<!doctype html><title>Fluxbase</title><p>The dashboard's files are missing.".into()
        });
    let mut response = if *method == Method::HEAD {
        Response::new(Bytes::new().into())
    } else {
        Response::new(Bytes::from(html).into())
    };
    let h = response.headers_mut();
    h.insert(
        "content-type",
        HeaderValue::from_static("text/html; charset=utf-8"),
    );
    h.insert("cache-control", HeaderValue::from_static("no-store"));
    let policy = page_policy(&nonce);
    security_headers(h, &policy);
    response
}

fn content_type(file: &str) -> String {
    let mime = mime_guess::from_path(file).first_or_octet_stream();
    match mime.type_() {
        mime_guess::mime::TEXT | mime_guess::mime::APPLICATION
            if mime.subtype() != mime_guess::mime::OCTET_STREAM =>
        {
            format!("{mime}; charset=utf-8")
        }
        _ => mime.to_string(),
    }
}

/// The headers every dashboard response carries.
pub fn security_headers(h: &mut HeaderMap, policy: &str) {
    if let Ok(v) = HeaderValue::from_str(policy) {
        h.insert("content-security-policy", v);
    }
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
/// (sign-up, login) from being driven by another site. Browsers send `Sec-Fetch-Site` to
/// trustworthy origins (HTTPS, loopback); elsewhere only `Origin`, which must then name this
/// server as its users reach it: the `Host` the request came with, the `X-Forwarded-Host` of a
/// trusted proxy (`trust_forwarded_for`), or `public_url`'s host. Requests without either header
/// (backends, curl) are not browsers' and pass.
pub fn cross_site(config: &Config, method: &Method, headers: &HeaderMap) -> Option<ApiError> {
    if matches!(*method, Method::GET | Method::HEAD | Method::OPTIONS) {
        return None;
    }
    let header = |name: &str| headers.get(name).and_then(|v| v.to_str().ok());
    let refused = match header("sec-fetch-site") {
        Some(site) => !matches!(site, "same-origin" | "none"),
        None => match header("origin") {
            None => false,
            Some(origin) => {
                let authority = origin
                    .split_once("://")
                    .map(|(_, a)| a.to_ascii_lowercase());
                let mut ours: Vec<String> = Vec::new();
                ours.extend(header("host").map(str::to_ascii_lowercase));
                if config.trust_forwarded_for {
                    // The first host a proxy chain names is the one the browser used.
                    ours.extend(
                        header("x-forwarded-host")
                            .and_then(|v| v.split(',').next())
                            .map(|v| v.trim().to_ascii_lowercase()),
                    );
                }
                ours.extend(
                    config
                        .public_url
                        .as_deref()
                        .and_then(|u| url::Url::parse(u).ok())
                        .and_then(|u| {
                            let host = u.host_str()?.to_ascii_lowercase();
                            Some(match u.port() {
                                Some(port) => format!("{host}:{port}"),
                                None => host,
                            })
                        }),
                );
                !authority.is_some_and(|a| ours.contains(&a))
            }
        },
    };
    refused.then(|| {
        ApiError::AccessDenied(
            "Cross-site requests that change state are refused: call the API from your backend \
             or from the dashboard's own origin (behind a proxy: pass the Host header, or set \
             public_url)."
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
        let policy = r.headers()["content-security-policy"]
            .to_str()
            .unwrap()
            .to_string();
        let other = serve(&config, &Method::GET, "/projects/x/sql", &HeaderMap::new()).unwrap();
        assert_ne!(
            other.headers()["content-security-policy"],
            policy.as_str(),
            "a nonce per response"
        );
        assert!(policy.contains("'strict-dynamic'"), "{policy}");
        assert_eq!(r.headers()["x-frame-options"], "DENY");
        assert_eq!(r.headers()["cache-control"], "no-store");
        let js = serve(&config, &Method::GET, "/assets/app.js", &HeaderMap::new()).unwrap();
        let mut revalidate = HeaderMap::new();
        revalidate.insert("if-none-match", js.headers()["etag"].clone());
        let again = serve(&config, &Method::GET, "/assets/app.js", &revalidate).unwrap();
        assert_eq!(again.status(), 304);
        assert_eq!(
            again.headers()["content-security-policy"],
            CONTENT_SECURITY_POLICY
        );
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
        let config = Config::default();
        let cross_site = |m: &Method, h: &HeaderMap| cross_site(&config, m, h);
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
        assert!(cross_site(
            &post,
            &headers(&[("origin", "http://A:1"), ("host", "a:1")])
        )
        .is_none());
    }

    #[test]
    fn behind_a_proxy_the_origin_may_name_the_forwarded_host_or_the_public_url() {
        let post = Method::POST;
        let proxied = headers(&[
            ("origin", "http://fluxbase.test:8106"),
            ("host", "127.0.0.1:8105"),
            ("x-forwarded-host", "fluxbase.test:8106"),
        ]);
        assert!(cross_site(&Config::default(), &post, &proxied).is_some());
        let trusting = Config {
            trust_forwarded_for: true,
            ..Config::default()
        };
        assert!(cross_site(&trusting, &post, &proxied).is_none());
        let public = Config {
            public_url: Some("http://fluxbase.test:8106/".into()),
            ..Config::default()
        };
        assert!(cross_site(&public, &post, &proxied).is_none());
        let evil = headers(&[
            ("origin", "http://evil.test"),
            ("host", "127.0.0.1:8105"),
            ("x-forwarded-host", "evil.test"),
        ]);
        assert!(cross_site(&public, &post, &evil).is_some());
    }
}
