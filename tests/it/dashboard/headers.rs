//! What the server itself promises about the dashboard, without a browser: the page at `/` and
//! at its page paths, the policy headers on every dashboard response, the assets, the WebSocket
//! handshake still at `/`, and cross-site writes refused.

use serde_json::json;

use crate::support::app::spawn_app;

const CSP: &str = "default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self' data: blob:; font-src 'self'; connect-src 'self'; media-src 'self' blob:; manifest-src 'self'; form-action 'self'; frame-ancestors 'none'; base-uri 'none'";

#[tokio::test]
async fn the_page_is_served_at_its_paths_with_a_strict_policy_and_no_inline_script() {
    let app = spawn_app().await;
    for path in [
        "/",
        "/login",
        "/projects",
        "/projects/0123456789abcdef/sql",
        "/invitations",
    ] {
        let r = app.http.get(app.url(path)).send().await.unwrap();
        assert_eq!(r.status(), 200, "{path}");
        let h = r.headers().clone();
        assert_eq!(h["content-type"], "text/html; charset=utf-8", "{path}");
        assert_eq!(h["cache-control"], "no-store", "{path}");
        // Scripts: the nonced entry module only (and what it imports), not any file of this
        // origin; the rest as for the assets.
        let policy = h["content-security-policy"].to_str().unwrap().to_string();
        let nonce = policy
            .split("'nonce-")
            .nth(1)
            .and_then(|rest| rest.split('\'').next())
            .unwrap_or_else(|| panic!("{path}: no nonce in {policy}"))
            .to_string();
        assert!(nonce.len() >= 22, "{policy}");
        assert_eq!(
            policy,
            CSP.replace(
                "script-src 'self';",
                &format!("script-src 'nonce-{nonce}' 'strict-dynamic' 'self';")
            ),
            "{path}"
        );
        assert_eq!(h["x-frame-options"], "DENY", "{path}");
        assert_eq!(h["x-content-type-options"], "nosniff", "{path}");
        assert_eq!(h["referrer-policy"], "no-referrer", "{path}");
        let html = r.text().await.unwrap();
        assert!(
            html.contains(&format!(
                r#"<script type="module" src="/assets/app.js" nonce="{nonce}"></script>"#
            )),
            "{html}"
        );
        // Every script is a file of this origin: no inline code, no event attribute.
        assert_eq!(html.matches("<script").count(), 1, "{html}");
        assert!(!html.contains("__CSP_NONCE__"), "{html}");
        assert!(
            !html.contains(" on") || !html.contains("=\"javascript"),
            "{html}"
        );
        assert!(!html.contains("style="), "{html}");
        assert!(!html.contains("flx_"), "{html}");
    }
    // A fresh nonce per response (a page is never stored: a cached copy's nonce would not
    // match); assets are revalidated by their ETag, a 304 with the policy.
    let a = app.http.get(app.url("/")).send().await.unwrap();
    let b = app.http.get(app.url("/")).send().await.unwrap();
    assert_ne!(
        a.headers()["content-security-policy"],
        b.headers()["content-security-policy"]
    );
    let first = app
        .http
        .get(app.url("/assets/app.js"))
        .send()
        .await
        .unwrap();
    let etag = first.headers()["etag"].clone();
    let again = app
        .http
        .get(app.url("/assets/app.js"))
        .header("if-none-match", etag)
        .send()
        .await
        .unwrap();
    assert_eq!(again.status(), 304);
    assert_eq!(again.headers()["content-security-policy"], CSP);
    // HEAD answers the headers without the page.
    let head = app.http.head(app.url("/")).send().await.unwrap();
    assert_eq!(head.status(), 200);
    assert!(head.headers()["content-security-policy"]
        .to_str()
        .unwrap()
        .contains("'strict-dynamic'"));
}

#[tokio::test]
async fn assets_have_their_types_and_the_policy_and_nothing_else_is_served() {
    let app = spawn_app().await;
    for (path, kind) in [
        ("/assets/app.js", "text/javascript; charset=utf-8"),
        ("/assets/app.css", "text/css; charset=utf-8"),
        ("/assets/lib/api.js", "text/javascript; charset=utf-8"),
        ("/assets/logo.svg", "image/svg+xml"),
    ] {
        let r = app.http.get(app.url(path)).send().await.unwrap();
        assert_eq!(r.status(), 200, "{path}");
        assert_eq!(r.headers()["content-type"], kind, "{path}");
        assert_eq!(r.headers()["content-security-policy"], CSP, "{path}");
        assert!(!r.text().await.unwrap().is_empty(), "{path}");
    }
    // Anything else is the API's 404 in its error shape; nothing outside dashboard/ is reachable.
    for path in [
        "/assets/nope.js",
        "/assets/../Cargo.toml",
        "/assets/%2e%2e/Cargo.toml",
        "/realtime",
        "/loginx",
        "/api/nope",
    ] {
        let (status, body) = app.call("GET", path, None, None).await;
        assert_eq!(status, 404, "{path}: {body}");
        assert_eq!(body["error"]["code"], "NOT_FOUND", "{path}: {body}");
    }
    // The API's own answers are unchanged by the page.
    let (status, body) = app.call("GET", "/health", None, None).await;
    assert_eq!((status, body), (200, json!({ "status": "ok" })));
}

#[tokio::test]
async fn writes_a_browser_says_another_site_made_are_refused() {
    let app = spawn_app().await;
    let f = app.fixture().await;
    let host = app.base.trim_start_matches("http://").to_string();
    let signup = json!({ "email": "csrf@example.com", "password": "correct horse battery" });
    // A form another site posts (Sec-Fetch-Site: cross-site), a fetch from a sibling site, and an
    // older browser's foreign Origin: refused before anything runs.
    for (name, value) in [
        ("sec-fetch-site", "cross-site".to_string()),
        ("sec-fetch-site", "same-site".to_string()),
        ("origin", "http://evil.example".to_string()),
        ("origin", "null".to_string()),
    ] {
        let r = app
            .http
            .post(app.url("/api/auth/signup"))
            .header(name, value.as_str())
            .header("content-type", "text/plain")
            .body(signup.to_string())
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 403, "{name}: {value}");
        let body: serde_json::Value = r.json().await.unwrap();
        assert_eq!(body["error"]["code"], "ACCESS_DENIED", "{body}");
        let r = app
            .http
            .post(app.url("/api/execute-sql"))
            .bearer_auth(&f.admin)
            .header(name, value.as_str())
            .json(&json!({ "projectId": f.project, "query": "CREATE TABLE pwned (id int)" }))
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 403, "{name}: {value}");
    }
    let (_, body) = app
        .call(
            "POST",
            "/api/execute-sql",
            Some(&f.admin),
            Some(json!({ "projectId": f.project, "query": "SELECT to_regclass('pwned') IS NULL AS absent" })),
        )
        .await;
    assert_eq!(body["result"]["rows"][0]["absent"], true, "{body}");
    // The dashboard's own requests (same origin) and backends (no browser headers) pass; reads
    // pass from anywhere.
    let r = app
        .http
        .post(app.url("/api/auth/signup"))
        .header("sec-fetch-site", "same-origin")
        .header("origin", format!("http://{host}"))
        .json(&signup)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 201);
    let r = app
        .http
        .post(app.url("/api/auth/login"))
        .header("origin", format!("http://{host}"))
        .json(&signup)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    let r = app
        .http
        .get(app.url("/health"))
        .header("sec-fetch-site", "cross-site")
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
}

#[tokio::test]
async fn behind_a_proxy_that_rewrites_host_the_dashboards_own_writes_pass() {
    // A proxy that sends its upstream's Host and the browser's in X-Forwarded-Host: with
    // trust_forwarded_for (or public_url) the page's own sign-in is not taken for another site.
    let app = crate::support::app::spawn_app_with(|c| c.trust_forwarded_for = true).await;
    let host = app.base.trim_start_matches("http://").to_string();
    let signup = json!({ "email": "proxied@example.com", "password": "correct horse battery" });
    let send = |origin: &str, forwarded: &str| {
        app.http
            .post(app.url("/api/auth/signup"))
            .header("host", host.as_str())
            .header("origin", origin)
            .header("x-forwarded-host", forwarded)
            .json(&signup)
            .send()
    };
    let r = send("http://evil.example", "fluxbase.test:8443")
        .await
        .unwrap();
    assert_eq!(r.status(), 403);
    let r = send("http://fluxbase.test:8443", "fluxbase.test:8443")
        .await
        .unwrap();
    assert_eq!(r.status(), 201);
}
