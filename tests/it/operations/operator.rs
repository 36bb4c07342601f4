//! What only the operator may see or reach: `/metrics`, the files under the data directory.

use std::time::{Duration, Instant};

use serde_json::Value;

use crate::support::fs::mode_of;
use crate::support::{pg, spawn_app_with};

async fn get(url: &str, headers: &[(&str, &str)]) -> (u16, String) {
    let client = reqwest::Client::new();
    let mut req = client.get(url);
    for (k, v) in headers {
        req = req.header(*k, *v);
    }
    let resp = req.send().await.expect("request");
    (resp.status().as_u16(), resp.text().await.unwrap())
}

fn error_code(body: &str) -> String {
    let v: Value = serde_json::from_str(body).unwrap_or_else(|_| panic!("not JSON: {body}"));
    assert_eq!(v["success"], false, "{v}");
    assert!(
        v["error"]["message"]
            .as_str()
            .is_some_and(|m| !m.is_empty()),
        "{v}"
    );
    v["error"]["code"].as_str().unwrap().to_string()
}

#[tokio::test]
async fn metrics_need_the_bearer_token_when_one_is_configured() {
    let app = spawn_app_with(|c| c.metrics_token = Some("metrics-token-for-tests".into())).await;
    let f = app.fixture().await;
    let url = app.url("/metrics");
    for headers in [
        vec![],
        vec![("authorization", "Bearer wrong")],
        vec![("authorization", "metrics-token-for-tests")],
    ] {
        let (status, body) = get(&url, &headers).await;
        assert_eq!(status, 401, "{headers:?}: {body}");
        assert_eq!(error_code(&body), "AUTH_REQUIRED");
        assert!(!body.contains(&f.project), "{body}");
    }
    // An API key, even an admin one, is not the operator's token.
    let (status, _) = get(&url, &[("authorization", &format!("Bearer {}", f.admin))]).await;
    assert_eq!(status, 401);
    let (status, body) = get(&url, &[("authorization", "Bearer metrics-token-for-tests")]).await;
    assert_eq!(status, 200, "{body}");
    assert!(body.contains("fluxbase_http_requests_total"), "{body}");
    app.stop().await;
}

/// A non-loopback address of this machine, if it has one.
fn outside_address() -> Option<std::net::IpAddr> {
    let socket = std::net::UdpSocket::bind("0.0.0.0:0").ok()?;
    socket.connect("192.0.2.1:9").ok()?; // no packet is sent
    let ip = socket.local_addr().ok()?.ip();
    (!ip.is_loopback() && !ip.is_unspecified()).then_some(ip)
}

#[tokio::test]
async fn without_a_token_or_address_metrics_answer_only_local_unproxied_requests() {
    let app = spawn_app_with(|c| c.listen = "0.0.0.0:0".parse().unwrap()).await;
    let port = app.app.config.listen.port();
    let port = if port == 0 {
        app.base.rsplit(':').next().unwrap().parse::<u16>().unwrap()
    } else {
        port
    };
    let local = format!("http://127.0.0.1:{port}/metrics");
    let (status, body) = get(&local, &[]).await;
    assert_eq!(status, 200, "{body}");
    // Relayed by a proxy on this machine: not local.
    for header in [
        ("x-forwarded-for", "203.0.113.7"),
        ("forwarded", "for=203.0.113.7"),
        ("x-real-ip", "203.0.113.7"),
    ] {
        let (status, body) = get(&local, &[header]).await;
        assert_eq!(status, 403, "{header:?}: {body}");
        assert_eq!(error_code(&body), "INSUFFICIENT_PERMISSIONS");
        assert!(body.contains("FLUXBASE_METRICS_TOKEN"), "{body}");
    }
    // Loopback names pass; a page on another name that resolves to 127.0.0.1 (DNS rebinding)
    // reaches the server from loopback but names itself in Host: refused.
    for host in ["localhost", "127.0.0.1:1", "[::1]:8080", "app.localhost"] {
        let (status, body) = get(&local, &[("host", host)]).await;
        assert_eq!(status, 200, "{host}: {body}");
    }
    for host in [
        "attacker.example",
        "attacker.example:8080",
        "127.0.0.1.nip.io",
    ] {
        let (status, body) = get(&local, &[("host", host)]).await;
        assert_eq!(status, 403, "{host}: {body}");
    }
    // From another address of this machine, as any other host would come.
    if let Some(ip) = outside_address() {
        let url = format!("http://{}/metrics", std::net::SocketAddr::new(ip, port));
        let (status, body) = get(&url, &[]).await;
        assert_eq!(status, 403, "{url}: {body}");
        assert_eq!(error_code(&body), "INSUFFICIENT_PERMISSIONS");
    } else {
        eprintln!("no non-loopback address here: checked the proxied requests only");
    }
    app.stop().await;
}

#[tokio::test]
async fn behind_a_trusted_proxy_metrics_need_the_token_even_from_loopback_without_headers() {
    // A proxy on this machine that adds no forwarding header looks like a local client.
    let app = spawn_app_with(|c| c.trust_forwarded_for = true).await;
    let (status, body) = get(&app.url("/metrics"), &[]).await;
    assert_eq!(status, 403, "{body}");
    assert_eq!(error_code(&body), "INSUFFICIENT_PERMISSIONS");
    assert!(body.contains("FLUXBASE_METRICS_TOKEN"), "{body}");
    app.stop().await;

    let app = spawn_app_with(|c| {
        c.trust_forwarded_for = true;
        c.metrics_token = Some("metrics-token-for-tests".into());
    })
    .await;
    let (status, body) = get(
        &app.url("/metrics"),
        &[("authorization", "Bearer metrics-token-for-tests")],
    )
    .await;
    assert_eq!(status, 200, "{body}");
    app.stop().await;
}

#[tokio::test]
async fn metrics_are_served_only_on_their_own_address_when_one_is_configured() {
    let app = spawn_app_with(|c| c.metrics_addr = Some("127.0.0.1:0".parse().unwrap())).await;
    let (status, body) = get(&app.url("/metrics"), &[]).await;
    assert_eq!(status, 404, "{body}");
    assert_eq!(error_code(&body), "NOT_FOUND");
    let addr = app.app.metrics.listen_addr().expect("the metrics listener");
    let (status, body) = get(&format!("http://{addr}/metrics"), &[]).await;
    assert_eq!(status, 200, "{body}");
    assert!(body.contains("fluxbase_http_requests_total"), "{body}");
    let (status, body) = get(&format!("http://{addr}/api/projects"), &[]).await;
    assert_eq!(status, 404, "{body}");
    app.stop().await;
}

/// A transaction larger than the change stream's memory bound spills to disk while it is still
/// open: the spill file is the server user's only.
#[tokio::test]
async fn spilled_transactions_are_private_files() {
    let app = spawn_app_with(|c| {
        c.cdc_decoding_work_mem_kb = Some(64);
        c.cdc_buffer_bytes = 64 * 1024;
    })
    .await;
    let f = app.fixture().await;
    app.rows(&f.admin, &f.project, "CREATE TABLE big (id int, pad text)")
        .await;
    let db = app.project_db(&f.project).await;
    let client = pg().await.client(&db).await;
    // Open, 2 MB: streamed to the server before it commits, and spilled there.
    client
        .batch_execute(
            "BEGIN; INSERT INTO big SELECT g, repeat(md5(g::text), 32) FROM generate_series(1, 2000) g",
        )
        .await
        .unwrap();
    let spill_dir = app.app.config.data_dir.join("cdc-spill").join(&f.project);
    let deadline = Instant::now() + Duration::from_secs(60);
    let file = loop {
        let found = std::fs::read_dir(&spill_dir)
            .into_iter()
            .flatten()
            .flatten()
            .map(|e| e.path())
            .find(|p| p.extension().is_some_and(|e| e == "jsonl"));
        if let Some(p) = found {
            break p;
        }
        assert!(Instant::now() < deadline, "no spill file appeared");
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    assert_eq!(mode_of(&file), 0o600, "{}", file.display());
    assert_eq!(mode_of(&spill_dir), 0o700);
    assert_eq!(mode_of(spill_dir.parent().unwrap()), 0o700);
    assert_eq!(mode_of(&app.app.config.data_dir), 0o700);
    client.batch_execute("ROLLBACK").await.unwrap();
    // Deleting the project takes its spill directory with it (red team rt7: an empty one stayed).
    app.delete_project(&f.project, &f.token).await;
    assert!(!spill_dir.exists(), "{} left behind", spill_dir.display());
    app.stop().await;
}

/// The start-up banner names the address bound, not the one asked for: with `listen` on port 0
/// it printed port 0 (red team rt8 L4).
#[tokio::test]
async fn the_start_up_banner_names_the_bound_address() {
    let server = crate::support::process::ServerProcess::start(&[]).await;
    let log = std::fs::read_to_string(server.dir.join("server.log")).unwrap();
    let addr = server.base.trim_start_matches("http://");
    assert!(
        log.contains(&format!("Base URL:      http://{addr}\n")),
        "{log}"
    );
    assert!(
        log.contains(&format!("WebSocket URL: ws://{addr}\n")),
        "{log}"
    );
    assert!(!log.contains(":0/") && !log.contains(":0\n"), "{log}");
}
