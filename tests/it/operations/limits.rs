//! Bounded resources: one tenant cannot hurt another, and anonymous clients cannot hurt anyone.
//! Each test is an attack from issue 13 run against the real server.

use serde_json::{json, Value};

use crate::support::fixtures::{self, Project};
use crate::support::process::ServerProcess;
use crate::support::{spawn_app_with, unique};

const MIB: usize = 1024 * 1024;

async fn post(base: &str, path: &str, token: Option<&str>, body: Value) -> (u16, String) {
    let mut req = reqwest::Client::new()
        .post(format!("{base}{path}"))
        .json(&body);
    if let Some(t) = token {
        req = req.bearer_auth(t);
    }
    let resp = req.send().await.expect("request failed");
    (resp.status().as_u16(), resp.text().await.unwrap())
}

#[tokio::test]
async fn a_huge_result_answers_truncated_below_the_cap_and_the_server_memory_stays_flat() {
    let cap = 4 * MIB;
    let server = ServerProcess::start(&[("FLUXBASE_MAX_RESPONSE_BYTES", &cap.to_string())]).await;
    let Project { read, project, .. } = fixtures::project(&server.base).await;
    let sql = |query: &str| {
        post(
            &server.base,
            "/api/execute-sql",
            Some(&read),
            json!({ "projectId": project, "query": query }),
        )
    };
    let (status, body) = sql("SELECT 1 AS warm").await;
    assert_eq!(status, 200, "{body}");
    let before = server.peak_rss();

    // 400 MB of rows: without a byte cap the server keeps them all and renders them again.
    let (status, body) =
        sql("SELECT repeat('x', 1000000) AS blob FROM generate_series(1, 400)").await;
    assert_eq!(status, 200);
    assert!(body.len() <= cap, "the answer is {} bytes", body.len());
    let parsed: Value = serde_json::from_str(&body).unwrap();
    assert_eq!(parsed["success"], true, "{}", &body[..200.min(body.len())]);
    assert_eq!(parsed["result"]["truncated"], true);
    let rows = parsed["result"]["rows"].as_array().unwrap();
    assert!(!rows.is_empty() && rows.len() < 400, "{} rows", rows.len());
    assert_eq!(rows[0]["blob"].as_str().unwrap().len(), 1_000_000);
    assert_eq!(parsed["result"]["rowCount"], 400);

    let grown = server.peak_rss().saturating_sub(before);
    assert!(
        grown < 100 * MIB as u64,
        "the server's peak RSS grew by {} MiB for a capped answer",
        grown / MIB as u64
    );

    // The connection that dropped those rows serves the next request normally.
    let (status, body) = sql("SELECT 2 AS next").await;
    assert_eq!(status, 200);
    let parsed: Value = serde_json::from_str(&body).unwrap();
    assert_eq!(parsed["result"]["rows"], json!([{ "next": 2 }]), "{body}");
}

#[tokio::test]
async fn a_single_row_larger_than_the_cap_is_dropped_and_the_key_keeps_working() {
    let app = spawn_app_with(|c| c.max_response_bytes = MIB).await;
    let f = app.fixture().await;
    for query in [
        "SELECT repeat('y', 5000000) AS blob",
        "SELECT 1 AS a; SELECT repeat('y', 5000000) AS blob",
    ] {
        let (status, body) = app
            .call(
                "POST",
                "/api/execute-sql",
                Some(&f.read),
                Some(json!({ "projectId": f.project, "query": query })),
            )
            .await;
        assert_eq!(status, 200, "{body}");
        assert_eq!(body["success"], true, "{body}");
        assert_eq!(body["result"]["rows"], json!([]), "{query}");
        assert_eq!(body["result"]["truncated"], true, "{query}");
        assert_eq!(body["result"]["rowCount"], 1, "{query}");
    }
    // Small rows before the big one are kept; nothing after it is.
    let body = app
        .sql(
            &f.read,
            &f.project,
            "SELECT n, CASE WHEN n = 3 THEN repeat('z', 3000000) ELSE 'small' END AS v
             FROM generate_series(1, 5) n ORDER BY n",
        )
        .await;
    assert_eq!(body["result"]["truncated"], true, "{body}");
    assert_eq!(
        body["result"]["rows"],
        json!([{ "n": 1, "v": "small" }, { "n": 2, "v": "small" }])
    );
    assert_eq!(
        app.rows(&f.read, &f.project, "SELECT 'ok' AS fine").await,
        vec![json!({ "fine": "ok" })]
    );
    // JSON escapes count against the cap too: 400 KiB of quotes render as 800 KiB each.
    let body = app
        .sql(
            &f.read,
            &f.project,
            "SELECT repeat('\"', 400 * 1024) AS q FROM generate_series(1, 3)",
        )
        .await;
    assert_eq!(body["result"]["truncated"], true);
    assert_eq!(body["result"]["rows"].as_array().unwrap().len(), 1);
    app.stop().await;
}

async fn login_from(
    app: &crate::support::TestApp,
    email: &str,
    password: &str,
    forwarded_for: Option<&str>,
) -> (u16, Value) {
    let mut req = app
        .http
        .post(app.url("/api/auth/login"))
        .json(&json!({ "email": email, "password": password }));
    if let Some(ip) = forwarded_for {
        req = req.header("x-forwarded-for", ip);
    }
    let resp = req.send().await.unwrap();
    let status = resp.status().as_u16();
    if status == 429 {
        assert!(resp.headers().contains_key("retry-after"));
    }
    (status, resp.json().await.unwrap())
}

#[tokio::test]
async fn a_login_flood_from_one_address_gets_429_after_the_limit() {
    let app = spawn_app_with(|c| c.auth_attempts_per_address = 5).await;
    let (_, _, email) = app.signup().await; // the first attempt of this address
    for _ in 0..4 {
        let (status, body) = login_from(&app, &email, "wrong password", None).await;
        assert_eq!(status, 401, "{body}");
    }
    let (status, body) = login_from(&app, &email, "correct horse battery", None).await;
    assert_eq!(status, 429, "{body}");
    assert_eq!(body["error"]["code"], "RATE_LIMIT");
    // X-Forwarded-For is the client's own words unless the operator trusts a proxy.
    let (status, _) = login_from(&app, &email, "correct horse battery", Some("203.0.113.9")).await;
    assert_eq!(status, 429);
    let (status, body) = app
        .call(
            "POST",
            "/api/auth/signup",
            None,
            Some(json!({ "email": format!("{}@example.com", unique("u")), "password": "long enough pw" })),
        )
        .await;
    assert_eq!(status, 429, "{body}");
    app.stop().await;
}

#[tokio::test]
async fn guessing_bearer_tokens_from_one_address_gets_429_before_any_lookup() {
    let app = spawn_app_with(|c| {
        c.auth_failures_per_address = 5;
        c.trust_forwarded_for = true;
    })
    .await;
    let f = app.fixture().await;
    let guess = |i: usize| {
        if i.is_multiple_of(2) {
            format!("flx_live_{}", unique("guess"))
        } else {
            format!("flx_sess_{}", unique("guess"))
        }
    };
    let keys = app.url(&format!("/api/keys?projectId={}", f.project));
    let from = |token: String, address: &'static str| {
        app.http
            .get(&keys)
            .bearer_auth(token)
            .header("x-forwarded-for", address)
            .send()
    };
    // A valid key from the address counts nothing; each bad token counts one.
    for _ in 0..3 {
        let ok = from(f.admin.clone(), "198.51.100.7").await.unwrap();
        assert_eq!(ok.status().as_u16(), 200);
    }
    for i in 0..5 {
        let r = from(guess(i), "198.51.100.7").await.unwrap();
        assert_eq!(r.status().as_u16(), 401);
    }
    // Past the limit: 429 with Retry-After for any bearer request of that address, the valid
    // key's too: the refusal comes before the token is looked up, so a guesser cannot make the
    // control database work for it.
    for token in [guess(9), f.admin.clone()] {
        let r = from(token, "198.51.100.7").await.unwrap();
        assert_eq!(r.status().as_u16(), 429);
        assert!(r.headers().contains_key("retry-after"));
        let body: Value = r.json().await.unwrap();
        assert_eq!(body["error"]["code"], "RATE_LIMIT", "{body}");
    }
    // Another address is not affected.
    let r = from(f.admin.clone(), "198.51.100.8").await.unwrap();
    assert_eq!(r.status().as_u16(), 200);
    let r = from(guess(10), "198.51.100.8").await.unwrap();
    assert_eq!(r.status().as_u16(), 401);
    app.stop().await;
}

#[tokio::test]
async fn behind_a_trusted_proxy_each_forwarded_address_has_its_own_budget() {
    let app = spawn_app_with(|c| {
        c.auth_attempts_per_address = 2;
        c.trust_forwarded_for = true;
    })
    .await;
    let (_, _, email) = app.signup().await; // counted against the socket address
    for ip in ["198.51.100.1", "198.51.100.2"] {
        for _ in 0..2 {
            let (status, _) = login_from(&app, &email, "wrong password", Some(ip)).await;
            assert_eq!(status, 401);
        }
        let (status, _) = login_from(&app, &email, "wrong password", Some(ip)).await;
        assert_eq!(status, 429, "{ip}");
    }
    // The proxy appends the address it saw: only the last entry counts.
    let (status, _) = login_from(
        &app,
        &email,
        "correct horse battery",
        Some("1.1.1.1, 198.51.100.1"),
    )
    .await;
    assert_eq!(status, 429);
    let (status, body) = login_from(
        &app,
        &email,
        "correct horse battery",
        Some("198.51.100.1, 198.51.100.3"),
    )
    .await;
    assert_eq!(status, 200, "{body}");
    app.stop().await;
}

#[tokio::test]
async fn a_guesser_locks_out_only_its_own_network_while_the_owner_still_logs_in() {
    let app = spawn_app_with(|c| {
        c.auth_failures_per_account = 3;
        c.auth_failures_per_account_total = 8;
        c.trust_forwarded_for = true;
    })
    .await;
    let (_, _, victim) = app.signup().await;
    let (_, _, bystander) = app.signup().await;
    for _ in 0..3 {
        let (status, _) = login_from(&app, &victim, "guess", Some("192.0.2.7")).await;
        assert_eq!(status, 401);
    }
    // The attacker's network (its /24) is refused for this account, even the right password.
    for (ip, password) in [
        ("192.0.2.7", "guess"),
        ("192.0.2.99", "correct horse battery"),
    ] {
        let (status, body) = login_from(&app, &victim, password, Some(ip)).await;
        assert_eq!(status, 429, "{ip}: {body}");
        assert_eq!(body["error"]["code"], "RATE_LIMIT");
    }
    // Another spelling of the same address is the same account.
    let (status, _) = login_from(&app, &victim.to_uppercase(), "guess", Some("192.0.2.7")).await;
    assert_eq!(status, 429);
    // The owner, elsewhere, still logs in with the right password; the attacker's network can
    // still log in to other accounts.
    let (status, body) =
        login_from(&app, &victim, "correct horse battery", Some("198.51.100.5")).await;
    assert_eq!(status, 200, "{body}");
    let (status, body) =
        login_from(&app, &bystander, "correct horse battery", Some("192.0.2.7")).await;
    assert_eq!(status, 200, "{body}");
    // Guessing spread over many networks hits the per-account backstop (8 failures in all).
    for i in 0..5 {
        let ip = format!("203.0.{i}.1");
        let (status, _) = login_from(&app, &victim, "guess", Some(&ip)).await;
        assert_eq!(status, 401, "{ip}");
    }
    let (status, body) =
        login_from(&app, &victim, "correct horse battery", Some("198.51.100.5")).await;
    assert_eq!(status, 429, "{body}");
    app.stop().await;
}

#[tokio::test]
async fn an_email_longer_than_254_bytes_is_refused_with_400_before_anything_else() {
    let app = spawn_app_with(|c| c.auth_attempts_per_address = 3).await;
    let f = app.fixture().await;
    let long = format!("{}@example.com", "a".repeat(512 * 1024));
    let (status, body) = login_from(&app, &long, "whatever pw", None).await;
    assert_eq!(status, 400, "{body}");
    assert_eq!(body["error"]["code"], "BAD_REQUEST");
    assert!(
        body["error"]["message"]
            .as_str()
            .unwrap()
            .starts_with("email:"),
        "{body}"
    );
    let (status, body) = app
        .call(
            "POST",
            "/api/auth/signup",
            None,
            Some(json!({ "email": long, "password": "correct horse battery" })),
        )
        .await;
    assert_eq!(status, 400, "{body}");
    assert!(
        body["error"]["message"]
            .as_str()
            .unwrap()
            .starts_with("email:"),
        "{body}"
    );
    let (status, body) = app
        .call(
            "POST",
            "/api/team",
            Some(&f.token),
            Some(json!({ "projectId": f.project, "email": long, "role": "viewer" })),
        )
        .await;
    assert_eq!(status, 400, "{body}");
    assert!(
        body["error"]["message"]
            .as_str()
            .unwrap()
            .starts_with("email:"),
        "{body}"
    );
    // 255 bytes is one too many; refused ones did not use up the address's attempts.
    let long = format!("{}@example.com", "a".repeat(255 - "@example.com".len()));
    let (status, _) = login_from(&app, &long, "whatever pw", None).await;
    assert_eq!(status, 400);
    let (status, body) = login_from(&app, &f.email, "correct horse battery", None).await;
    assert_eq!(status, 200, "{body}");
    app.stop().await;
}

#[tokio::test]
async fn behind_a_trusted_proxy_connections_past_the_per_address_cap_are_all_served() {
    use tokio::io::AsyncWriteExt;
    let app = spawn_app_with(|c| {
        c.max_connections_per_address = 3;
        c.trust_forwarded_for = true;
    })
    .await;
    let addr = app.base.trim_start_matches("http://").to_string();
    // The proxy (127.0.0.1) holds one connection per client, e.g. idle WebSockets.
    let mut held = Vec::new();
    for i in 0..8 {
        let mut conn = tokio::net::TcpStream::connect(&addr).await.unwrap();
        conn.write_all(
            format!("GET /health HTTP/1.1\r\nHost: x\r\nX-Forwarded-For: 198.51.100.{i}\r\n\r\n")
                .as_bytes(),
        )
        .await
        .unwrap();
        held.push(conn);
    }
    for (i, conn) in held.iter_mut().enumerate() {
        use tokio::io::AsyncReadExt;
        let mut buf = [0u8; 12];
        tokio::time::timeout(
            std::time::Duration::from_secs(10),
            conn.read_exact(&mut buf),
        )
        .await
        .expect("no answer")
        .expect("closed");
        assert_eq!(&buf, b"HTTP/1.1 200", "connection {i}");
    }
    app.stop().await;
}

#[tokio::test]
async fn concurrent_logins_hash_passwords_a_few_at_a_time_so_memory_stays_bounded() {
    let server = ServerProcess::start(&[("FLUXBASE_MAX_CONCURRENT_PASSWORD_HASHES", "2")]).await;
    let (status, body) = post(
        &server.base,
        "/api/auth/login",
        None,
        json!({ "email": "warm@example.com", "password": "whatever pw" }),
    )
    .await;
    assert_eq!(status, 401, "{body}");
    let before = server.peak_rss();
    let logins = (0..32).map(|i| {
        let base = server.base.clone();
        async move {
            post(
                &base,
                "/api/auth/login",
                None,
                json!({ "email": format!("nobody{i}@example.com"), "password": "whatever pw" }),
            )
            .await
        }
    });
    for (status, body) in futures_util::future::join_all(logins).await {
        assert_eq!(status, 401, "{body}");
    }
    let grown = server.peak_rss().saturating_sub(before);
    // Each Argon2 hash holds ~19 MiB: 32 at once would be ~600 MiB.
    assert!(
        grown < 150 * MIB as u64,
        "32 concurrent logins grew the peak RSS by {} MiB",
        grown / MIB as u64
    );
}

/// Reads from `stream` until the server closes it (EOF or reset), within `limit`; returns what
/// was read, or `None` if it stayed open.
async fn read_until_closed(
    stream: &mut tokio::net::TcpStream,
    limit: std::time::Duration,
) -> Option<Vec<u8>> {
    use tokio::io::AsyncReadExt;
    let mut seen = Vec::new();
    let deadline = tokio::time::Instant::now() + limit;
    let mut buf = [0u8; 4096];
    loop {
        match tokio::time::timeout_at(deadline, stream.read(&mut buf)).await {
            Err(_) => return None,
            Ok(Ok(0)) | Ok(Err(_)) => return Some(seen),
            Ok(Ok(n)) => seen.extend_from_slice(&buf[..n]),
        }
    }
}

#[tokio::test]
async fn a_slow_header_client_is_disconnected_after_the_header_timeout() {
    use tokio::io::AsyncWriteExt;
    let app = spawn_app_with(|c| c.header_read_timeout_secs = 1).await;
    let addr = app.base.trim_start_matches("http://").to_string();

    // Trickles one header line every 200 ms, never ending the head.
    let mut slow = tokio::net::TcpStream::connect(&addr).await.unwrap();
    slow.write_all(b"GET /health HTTP/1.1\r\nHost: x\r\n")
        .await
        .unwrap();
    let closed = async {
        use tokio::io::AsyncReadExt;
        let mut buf = [0u8; 1024];
        let deadline = tokio::time::Instant::now() + std::time::Duration::from_secs(20);
        let mut i = 0;
        loop {
            tokio::select! {
                r = slow.read(&mut buf) => match r {
                    Ok(0) | Err(_) => return true,
                    Ok(_) => {}
                },
                _ = tokio::time::sleep(std::time::Duration::from_millis(200)) => {
                    i += 1;
                    if slow.write_all(format!("X-Slow-{i}: y\r\n").as_bytes()).await.is_err() {
                        return true;
                    }
                }
            }
            if tokio::time::Instant::now() > deadline {
                return false;
            }
        }
    };
    assert!(closed.await, "a client trickling its headers was kept open");

    // A client that connects and says nothing is closed too.
    let mut silent = tokio::net::TcpStream::connect(&addr).await.unwrap();
    assert!(
        read_until_closed(&mut silent, std::time::Duration::from_secs(20))
            .await
            .is_some(),
        "a silent client was kept open"
    );
    // Ordinary requests are unaffected.
    let (status, _) = app.call("GET", "/health", None, None).await;
    assert_eq!(status, 200);
    app.stop().await;
}

/// Writes a request head and the first `sent` bytes of its body (declared longer), then
/// nothing: the answer read until the server closes, or `None` if it kept the connection
/// open for `limit`.
async fn stalled_body(
    addr: &str,
    head: &str,
    body: &[u8],
    limit: std::time::Duration,
) -> Option<String> {
    use tokio::io::AsyncWriteExt;
    let mut stream = tokio::net::TcpStream::connect(addr).await.unwrap();
    stream.write_all(head.as_bytes()).await.unwrap();
    stream.write_all(body).await.unwrap();
    read_until_closed(&mut stream, limit)
        .await
        .map(|b| String::from_utf8_lossy(&b).into_owned())
}

/// A request body that stops arriving (a JSON body, an upload's form) is answered 408
/// `REQUEST_TIMEOUT` in the guide's error shape once no byte came for `body_idle_timeout_secs`,
/// its connection closed and what it held freed (the upload's staged file); a body that keeps
/// arriving, however slowly, is not cut. Before, such a request held its connection, and an
/// upload its staged file, for as long as the client kept the socket open (docs/security.md's
/// known gap).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_request_body_that_stops_arriving_is_answered_408_and_frees_what_it_held() {
    use tokio::io::AsyncWriteExt;
    let app = spawn_app_with(|c| c.body_idle_timeout_secs = 1).await;
    let f = app.fixture().await;
    let addr = app.base.trim_start_matches("http://").to_string();
    let within = std::time::Duration::from_secs(15);

    let query =
        serde_json::json!({ "projectId": f.project, "query": "SELECT 1 AS one" }).to_string();
    let head = |len: usize| {
        format!(
            "POST /api/execute-sql HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {}\r\n\
             Content-Type: application/json\r\nContent-Length: {len}\r\n\r\n",
            f.read
        )
    };
    let began = std::time::Instant::now();
    let answer = stalled_body(&addr, &head(query.len()), &query.as_bytes()[..10], within)
        .await
        .expect("a stalled JSON body kept its connection open");
    assert!(answer.starts_with("HTTP/1.1 408"), "{answer}");
    assert!(answer.contains(r#""code":"REQUEST_TIMEOUT""#), "{answer}");
    assert!(answer.contains(r#""success":false"#), "{answer}");
    assert!(began.elapsed() < std::time::Duration::from_secs(10));

    // Slow but steady: four pieces 600 ms apart (2.4 s in all, past the idle bound) is served.
    let mut steady = tokio::net::TcpStream::connect(&addr).await.unwrap();
    steady
        .write_all(head(query.len()).as_bytes())
        .await
        .unwrap();
    for piece in query.as_bytes().chunks(query.len().div_ceil(4)) {
        tokio::time::sleep(std::time::Duration::from_millis(600)).await;
        steady.write_all(piece).await.unwrap();
    }
    let mut answer = Vec::new();
    let mut buf = [0u8; 4096];
    while !String::from_utf8_lossy(&answer).contains(r#""rowCount":1"#) {
        use tokio::io::AsyncReadExt;
        let n = tokio::time::timeout(within, steady.read(&mut buf))
            .await
            .expect("no answer to a steady body")
            .unwrap();
        assert!(n > 0, "closed: {}", String::from_utf8_lossy(&answer));
        answer.extend_from_slice(&buf[..n]);
    }
    assert!(
        answer.starts_with(b"HTTP/1.1 200"),
        "{}",
        String::from_utf8_lossy(&answer)
    );

    // An upload whose form stops mid-file: 408, and its staged file removed.
    crate::storage::create_bucket(&app, &f, "docs", serde_json::json!({})).await;
    let form = crate::support::multipart::Form::new(
        &[("projectId", f.project.as_str()), ("bucketId", "docs")],
        Some(("stuck.bin", "application/octet-stream")),
        &[],
    );
    let mut body = form.head.clone();
    body.extend(std::iter::repeat_n(7u8, 256 * 1024));
    let head = format!(
        "POST /api/storage/upload HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {}\r\n\
         Content-Type: {}\r\nContent-Length: {}\r\n\r\n",
        f.readwrite,
        form.content_type(),
        body.len() + 1024 * 1024 + form.tail.len()
    );
    let staging = app.app.config.data_dir.join("storage/.uploads");
    let answer = stalled_body(&addr, &head, &body, within)
        .await
        .expect("a stalled upload kept its connection open");
    assert!(answer.starts_with("HTTP/1.1 408"), "{answer}");
    assert!(answer.contains(r#""code":"REQUEST_TIMEOUT""#), "{answer}");
    let left: Vec<_> = std::fs::read_dir(&staging)
        .map(|d| d.flatten().map(|e| e.path()).collect())
        .unwrap_or_default();
    assert!(left.is_empty(), "staged files left: {left:?}");
    app.stop().await;
}

#[tokio::test]
async fn connections_past_the_per_address_cap_are_refused_with_429() {
    use tokio::io::AsyncWriteExt;
    let app = spawn_app_with(|c| c.max_connections_per_address = 3).await;
    let addr = app.base.trim_start_matches("http://").to_string();
    let mut held = Vec::new();
    for _ in 0..3 {
        held.push(tokio::net::TcpStream::connect(&addr).await.unwrap());
    }
    let mut extra = tokio::net::TcpStream::connect(&addr).await.unwrap();
    let _ = extra
        .write_all(b"GET /health HTTP/1.1\r\nHost: x\r\n\r\n")
        .await;
    let answer = read_until_closed(&mut extra, std::time::Duration::from_secs(10))
        .await
        .expect("the connection over the cap was neither answered nor closed");
    let answer = String::from_utf8_lossy(&answer);
    assert!(answer.starts_with("HTTP/1.1 429"), "{answer}");
    assert!(answer.contains("\"RATE_LIMIT\""), "{answer}");

    // Closing one frees a place (the server notices the close asynchronously; a hang guard).
    drop(held.pop());
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(60);
    loop {
        let mut again = tokio::net::TcpStream::connect(&addr).await.unwrap();
        again
            .write_all(b"GET /health HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
            .await
            .unwrap();
        let answer = read_until_closed(&mut again, std::time::Duration::from_secs(10))
            .await
            .unwrap_or_default();
        if answer.starts_with(b"HTTP/1.1 200") {
            break;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "no place freed: {}",
            String::from_utf8_lossy(&answer)
        );
        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
    }
    app.stop().await;
}

#[tokio::test]
async fn the_project_quota_per_user_gives_a_clear_error_and_cannot_be_raced() {
    let app = spawn_app_with(|c| c.max_projects_per_user = 2).await;
    let (token, _, _) = app.signup().await;
    let create = || {
        app.call(
            "POST",
            "/api/projects",
            Some(&token),
            Some(json!({ "name": "p" })),
        )
    };
    let (a, b, c) = tokio::join!(create(), create(), create());
    let mut statuses = vec![a.0, b.0, c.0];
    statuses.sort();
    assert_eq!(statuses, vec![201, 201, 403], "{a:?} {b:?} {c:?}");
    let (status, body) = create().await;
    assert_eq!(status, 403);
    assert_eq!(body["error"]["code"], "INSUFFICIENT_PERMISSIONS");
    let message = body["error"]["message"].as_str().unwrap();
    assert!(message.contains("at most 2 projects"), "{message}");

    let created = [a, b, c].into_iter().find(|(s, _)| *s == 201).unwrap().1;
    let id = created["project"]["id"].as_str().unwrap();
    app.delete_project(id, &token).await;
    let (status, body) = create().await;
    assert_eq!(status, 201, "{body}");
    app.stop().await;
}

/// Live API keys per project are capped (each key has its own request rate: keys without
/// bound multiply a project's; red team rt5 made 30): a clear 403 past it, racing creations
/// included; a revoked key gives its place back.
#[tokio::test]
async fn api_keys_per_project_are_capped_with_a_clear_error_and_cannot_be_raced() {
    let app = spawn_app_with(|c| c.max_api_keys_per_project = 5).await;
    let f = app.fixture().await;
    // Three keys come with the project: two more fit, of four asked at once.
    let ask = || {
        app.call(
            "POST",
            "/api/keys",
            Some(&f.admin),
            Some(json!({ "projectId": f.project, "scope": "read" })),
        )
    };
    let (a, b, c, d) = tokio::join!(ask(), ask(), ask(), ask());
    let mut statuses = vec![a.0, b.0, c.0, d.0];
    statuses.sort();
    assert_eq!(
        statuses,
        vec![201, 201, 403, 403],
        "{a:?} {b:?} {c:?} {d:?}"
    );
    let refused = [&a, &b, &c, &d]
        .into_iter()
        .find(|(s, _)| *s == 403)
        .unwrap();
    assert_eq!(refused.1["error"]["code"], "INSUFFICIENT_PERMISSIONS");
    let message = refused.1["error"]["message"].as_str().unwrap();
    assert!(message.contains("at most 5 live API keys"), "{message}");
    let id = [&a, &b, &c, &d]
        .into_iter()
        .find(|(s, _)| *s == 201)
        .unwrap()
        .1["key"]["id"]
        .as_str()
        .unwrap()
        .to_string();
    let (status, body) = app
        .call(
            "DELETE",
            &format!("/api/keys?projectId={}&keyId={id}", f.project),
            Some(&f.admin),
            None,
        )
        .await;
    assert_eq!(status, 200, "{body}");
    let (status, body) = ask().await;
    assert_eq!(status, 201, "{body}");
    app.stop().await;
}

async fn create(app: &crate::support::TestApp, token: String) -> (u16, Value) {
    create_as(app, token, "postgresql").await
}

async fn create_as(app: &crate::support::TestApp, token: String, engine: &str) -> (u16, Value) {
    app.call(
        "POST",
        "/api/projects",
        Some(&token),
        Some(json!({ "name": "p", "engine": engine })),
    )
    .await
}

/// The deployment's own cap (`max_projects`) and the database cluster's replication slots bound
/// projects across all owners: each PostgreSQL project keeps a slot and a walsender, so many
/// accounts creating their quota each could exhaust them. Refused with a clear 403 naming what
/// is full, before anything is made (no database, role or row left), racing creations
/// included; a project deleted gives its room back.
#[tokio::test]
async fn projects_of_all_owners_are_bounded_by_the_servers_room_with_a_clear_error() {
    use crate::support::cluster::DedicatedCluster;
    // Two slots in the whole cluster.
    let pg = DedicatedCluster::start(&[("max_replication_slots", "2")]).await;
    let control = unique("ctl");
    let app = spawn_app_with(|c| c.database_url = Some(pg.cluster.url(&control).into())).await;
    let owners = [
        app.signup().await.0,
        app.signup().await.0,
        app.signup().await.0,
    ];
    let (a, b, c) = tokio::join!(
        create(&app, owners[0].clone()),
        create(&app, owners[1].clone()),
        create(&app, owners[2].clone())
    );
    let mut statuses = vec![a.0, b.0, c.0];
    statuses.sort();
    assert_eq!(statuses, vec![201, 201, 403], "{a:?} {b:?} {c:?}");
    let refused = [&a, &b, &c].into_iter().find(|(s, _)| *s == 403).unwrap();
    assert_eq!(refused.1["error"]["code"], "INSUFFICIENT_PERMISSIONS");
    let message = refused.1["error"]["message"].as_str().unwrap();
    assert!(message.contains("max_replication_slots"), "{message}");
    // Nothing of the refused project was made.
    let watcher = pg.client("postgres").await;
    let databases: i64 = watcher
        .query_one(
            "SELECT count(*) FROM pg_database WHERE datname LIKE 'fx\\_%'",
            &[],
        )
        .await
        .unwrap()
        .get(0);
    assert_eq!(databases, 2);
    let control_rows: i64 = app
        .app
        .control
        .get()
        .await
        .unwrap()
        .query_one("SELECT count(*) FROM fluxbase.projects", &[])
        .await
        .unwrap()
        .get(0);
    assert_eq!(control_rows, 2);
    // A deleted project gives its slot back.
    let (owner, created) = [(0, &a), (1, &b), (2, &c)]
        .into_iter()
        .find(|(_, (s, _))| *s == 201)
        .unwrap();
    let id = created.1["project"]["id"].as_str().unwrap();
    app.delete_project(id, &owners[owner]).await;
    let (status, body) = create(&app, owners[owner].clone()).await;
    assert_eq!(status, 201, "{body}");
    app.stop().await;

    // The deployment's own cap, whatever the cluster could hold.
    let app = spawn_app_with(|c| c.max_projects = 1).await;
    let (first, second) = (app.signup().await.0, app.signup().await.0);
    assert_eq!(create(&app, first).await.0, 201);
    let (status, body) = create(&app, second).await;
    assert_eq!(status, 403, "{body}");
    let message = body["error"]["message"].as_str().unwrap();
    assert!(message.contains("max_projects = 1"), "{message}");
    app.stop().await;
}

/// MySQL projects keep one connection each for their binlog dumps: together at most a fifth of
/// the MySQL server's `max_connections` (read at each creation: an operator may change it),
/// the rest staying for SQL; past it a clear 403 naming the setting, nothing made.
#[tokio::test]
async fn mysql_projects_are_bounded_by_the_mysql_servers_connections() {
    use mysql_async::prelude::Queryable;
    // Its own embedded MariaDB (no mysql_url): the test changes its max_connections.
    let app = crate::support::spawn_app().await;
    let (token, _, _) = app.signup().await;
    let (status, body) = create_as(&app, token.clone(), "mysql").await;
    assert_eq!(status, 201, "{body}");
    let target = app.app.mysql.server().await.unwrap();
    let mut admin = target.admin_pool.get_conn().await.unwrap();
    admin
        .query_drop("SET GLOBAL max_connections = 10")
        .await
        .unwrap();
    let (status, body) = create_as(&app, token.clone(), "mysql").await;
    assert_eq!(status, 201, "{body}");
    let (status, body) = create_as(&app, token.clone(), "mysql").await;
    assert_eq!(status, 403, "{body}");
    let message = body["error"]["message"].as_str().unwrap();
    assert!(message.contains("max_connections = 10"), "{message}");
    let databases: Vec<String> = admin
        .query(
            "SELECT SCHEMA_NAME FROM information_schema.SCHEMATA WHERE SCHEMA_NAME LIKE 'fx\\_%'",
        )
        .await
        .unwrap();
    assert_eq!(databases.len(), 2, "{databases:?}");
    // PostgreSQL projects do not count against the MySQL server.
    let (status, body) = app
        .call(
            "POST",
            "/api/projects",
            Some(&token),
            Some(json!({ "name": "p" })),
        )
        .await;
    assert_eq!(status, 201, "{body}");
    drop(admin);
    app.stop().await;
}

/// SQL connections the server holds on `cluster`, by state.
async fn sql_connections(pg: &tokio_postgres::Client) -> (i64, i64) {
    let row = pg
        .query_one(
            "SELECT count(*) FILTER (WHERE query LIKE '%pg_sleep%' AND state = 'active'),
                    count(*)
             FROM pg_stat_activity WHERE application_name = 'fluxbase-sql'",
            &[],
        )
        .await
        .unwrap();
    (row.get(0), row.get(1))
}

#[tokio::test]
async fn a_project_flooding_pg_sleep_waits_on_its_share_while_another_is_served_and_idle_connections_close(
) {
    use crate::support::cluster::DedicatedCluster;
    let pg = DedicatedCluster::start(&[("max_connections", "40")]).await;
    let control = unique("ctl");
    let app = spawn_app_with(|c| {
        c.database_url = Some(pg.cluster.url(&control).into());
        c.sql_project_connections = 3;
        c.sql_queue_timeout_ms = 3_000;
        c.sql_idle_timeout_secs = 2;
    })
    .await;
    let noisy = app.fixture().await;
    let quiet = app.fixture().await;
    let watcher = pg.client("postgres").await;

    // Every key of the noisy project, 8 requests each, all sleeping.
    let attack: Vec<_> = [&noisy.read, &noisy.readwrite, &noisy.admin]
        .into_iter()
        .flat_map(|key| std::iter::repeat_n(key.clone(), 8))
        .map(|key| {
            let http = app.http.clone();
            let url = app.url("/api/execute-sql");
            let project = noisy.project.clone();
            tokio::spawn(async move {
                let resp = http
                    .post(url)
                    .bearer_auth(key)
                    .json(&json!({ "projectId": project, "query": "SELECT pg_sleep(4)" }))
                    .send()
                    .await
                    .unwrap();
                let status = resp.status().as_u16();
                (status, resp.json::<Value>().await.unwrap())
            })
        })
        .collect();
    // Until the noisy project's statements run.
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(60);
    while sql_connections(&watcher).await.0 < 3 {
        assert!(
            !attack.iter().all(|t| t.is_finished()),
            "the noisy project's requests were all answered before three of them ran"
        );
        assert!(
            std::time::Instant::now() < deadline,
            "the noisy project's statements never ran"
        );
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    }

    // Meanwhile the quiet project is answered, correctly.
    let (status, body) = app
        .call(
            "POST",
            "/api/execute-sql",
            Some(&quiet.read),
            Some(json!({ "projectId": quiet.project, "query": "SELECT 41 + 1 AS answer" })),
        )
        .await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(body["result"]["rows"], json!([{ "answer": 42 }]), "{body}");
    let (sleeping, _) = sql_connections(&watcher).await;
    assert!(
        sleeping <= 3,
        "{sleeping} statements of the noisy project run at once"
    );

    let mut answered = 0;
    let mut refused = 0;
    for task in attack {
        let (status, body) = task.await.unwrap();
        match status {
            200 => {
                assert_eq!(body["success"], true, "{body}");
                answered += 1;
            }
            429 => {
                assert_eq!(body["error"]["code"], "RATE_LIMIT");
                let message = body["error"]["message"].as_str().unwrap();
                assert!(message.contains("sql_project_connections"), "{message}");
                refused += 1;
            }
            other => panic!("the noisy project got {other}: {body}"),
        }
    }
    assert!(
        answered >= 3 && refused > 0,
        "{answered} answered, {refused} refused"
    );

    // Once it is over, the pools give their connections back to the cluster.
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(30);
    loop {
        let (_, open) = sql_connections(&watcher).await;
        if open == 0 {
            break;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "{open} idle SQL connections are still open"
        );
        tokio::time::sleep(std::time::Duration::from_millis(200)).await;
    }
    app.stop().await;
}

/// Sessions of the test cluster running `marker` (the watcher's own query excluded).
async fn running(pg: &tokio_postgres::Client, marker: &str) -> i64 {
    pg.query_one(
        "SELECT count(*) FROM pg_stat_activity
         WHERE state = 'active' AND usename LIKE 'fx\\_%' AND strpos(query, $1) > 0",
        &[&marker],
    )
    .await
    .unwrap()
    .get(0)
}

#[tokio::test]
async fn sessions_holding_their_own_role_locked_never_delay_other_tenants() {
    use std::time::{Duration, Instant};
    let app = crate::support::spawn_app().await;
    let quiet = app.fixture().await;
    let watcher = crate::support::pg().await.client("postgres").await;
    app.rows(&quiet.read, &quiet.project, "SELECT 1 AS warm")
        .await;

    // Three projects, every key: one request holds its role's catalog row (ALTER ROLE in a long
    // statement), a second one needs a new connection, whose login must repair that role.
    let marker = "PERFORM pg_sleep(20) /* holds */";
    let mut attackers = Vec::new();
    let mut holders = Vec::new();
    for _ in 0..3 {
        attackers.push(app.fixture().await);
    }
    for f in &attackers {
        for key in [f.read.clone(), f.readwrite.clone(), f.admin.clone()] {
            let query =
                format!("DO $$ BEGIN ALTER ROLE CURRENT_USER PASSWORD 'x'; {marker}; END $$");
            holders.push(app.spawn_sql(&key, &f.project, &query));
        }
    }
    let deadline = Instant::now() + Duration::from_secs(30);
    while running(&watcher, marker).await < 9 {
        if let Some(h) = holders.iter_mut().find(|h| h.is_finished()) {
            panic!("a holding request ended early: {:?}", h.await);
        }
        assert!(
            Instant::now() < deadline,
            "the sessions never started holding their roles"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let seconds: Vec<_> = attackers
        .iter()
        .flat_map(|f| {
            [f.read.clone(), f.readwrite.clone(), f.admin.clone()]
                .map(|key| (key, f.project.clone()))
        })
        .map(|(key, project)| app.spawn_sql(&key, &project, "SELECT 1 AS one"))
        .collect();
    // The logins of those second requests are under way. Before, each of them ran its role
    // repair on a control-pool session and waited 3 s there for the role's row, taking all 8
    // control connections: no control-pool session may be seen waiting on a lock now, from
    // here until every one of those requests has been answered (the sentinel: then no login
    // of theirs is left to wait).
    let control_db = app.app.cluster.control_db.clone();
    let deadline = Instant::now() + Duration::from_secs(60);
    while !seconds.iter().all(|t| t.is_finished()) {
        assert!(
            Instant::now() < deadline,
            "the second requests were never answered"
        );
        let waiting: i64 = watcher
            .query_one(
                "SELECT count(*) FROM pg_stat_activity
                 WHERE datname = $1 AND application_name = 'fluxbase' AND wait_event_type = 'Lock'",
                &[&control_db],
            )
            .await
            .unwrap()
            .get(0);
        assert_eq!(
            waiting, 0,
            "control-pool sessions wait on a role's catalog row"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }

    // Another tenant logs in and runs SQL as usual meanwhile.
    let (status, body) = app
        .call(
            "POST",
            "/api/auth/login",
            None,
            Some(json!({ "email": quiet.email, "password": "correct horse battery" })),
        )
        .await;
    assert_eq!(status, 200, "{body}");
    let rows = app
        .rows(&quiet.read, &quiet.project, "SELECT 41 + 1 AS answer")
        .await;
    assert_eq!(rows, vec![json!({ "answer": 42 })]);

    // The attacking projects are answered (or told to retry), never with an outage.
    for task in seconds {
        let (status, body) = task.await.unwrap();
        assert!(status == 200 || status == 429, "{status}: {body}");
    }
    // Their sessions holding the rows were ended, not waited for.
    let deadline = Instant::now() + Duration::from_secs(15);
    while running(&watcher, marker).await > 0 {
        assert!(
            Instant::now() < deadline,
            "the sessions holding their roles still run"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    for h in holders {
        let _ = h.await;
    }
    app.stop().await;
}

#[tokio::test]
async fn a_login_cancelled_midway_still_expires_the_role_password() {
    use fluxbase_replication::wire::ConnectConfig;
    use std::time::{Duration, Instant};
    let app = crate::support::spawn_app().await;
    let f = app.fixture().await;
    let role = format!("fx_{}_read", f.project);
    let watcher = crate::support::pg().await.client("postgres").await;
    // A database that accepts connections and never answers: the login hangs between opening
    // and expiring the password.
    let hole = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = hole.local_addr().unwrap().port();
    let held = tokio::spawn(async move {
        let mut sockets = Vec::new();
        while let Ok((s, _)) = hole.accept().await {
            sockets.push(s);
        }
    });
    let cfg = ConnectConfig {
        host: "127.0.0.1".into(),
        port,
        user: role.clone(),
        password: Some(app.app.projects.role_password(&role)),
        database: format!("fx_{}", f.project),
        connect_timeout: Duration::from_secs(3),
        ..Default::default()
    };
    let open = || async {
        watcher
            .query_one(
                "SELECT coalesce(rolvaliduntil > now(), false) FROM pg_authid WHERE rolname = $1",
                &[&role],
            )
            .await
            .unwrap()
            .get::<_, bool>(0)
    };
    let login = std::sync::Arc::new(app.app.projects.role_login(&role));
    {
        let connecting = login.connect(&cfg);
        tokio::pin!(connecting);
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            tokio::select! {
                r = &mut connecting => panic!("the login finished (ok: {})", r.is_ok()),
                _ = tokio::time::sleep(Duration::from_millis(10)) => {}
            }
            if open().await {
                break;
            }
            assert!(Instant::now() < deadline, "the login window never opened");
        }
        // The caller goes away mid-login (a client disconnecting, a pool's create timeout).
    }
    let deadline = Instant::now() + Duration::from_secs(30);
    while open().await {
        assert!(
            Instant::now() < deadline,
            "the role's password stayed valid after the caller went away"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let expired: bool = watcher
        .query_one(
            "SELECT rolvaliduntil = '-infinity' FROM pg_authid WHERE rolname = $1",
            &[&role],
        )
        .await
        .unwrap()
        .get(0);
    assert!(expired);
    held.abort();
    // The server's own logins still work.
    app.app.sql.forget_project(&f.project);
    app.rows(&f.read, &f.project, "SELECT 1 AS one").await;
    app.stop().await;
}

#[tokio::test]
async fn connections_going_idle_reach_requests_already_waiting_on_the_budget() {
    use std::time::{Duration, Instant};
    let app = spawn_app_with(|c| {
        c.sql_max_connections = 3;
        c.sql_queue_timeout_ms = 15_000;
        c.sql_idle_timeout_secs = 600;
    })
    .await;
    let mut busy = Vec::new();
    for _ in 0..3 {
        busy.push(app.fixture().await);
    }
    let quiet = app.fixture().await;
    let watcher = crate::support::pg().await.client("postgres").await;
    let marker = "pg_sleep(3) /* budget */";
    // Three projects take the whole budget for a moment; their connections then stay pooled.
    let tasks: Vec<_> = busy
        .iter()
        .map(|f| app.spawn_sql(&f.read, &f.project, &format!("SELECT {marker} AS slept")))
        .collect();
    let deadline = Instant::now() + Duration::from_secs(30);
    while running(&watcher, marker).await < 3 {
        assert!(Instant::now() < deadline, "the busy projects never ran");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    // A quiet project asks now: it waits on the budget while those finish and go idle.
    let (status, body) = app
        .call(
            "POST",
            "/api/execute-sql",
            Some(&quiet.read),
            Some(json!({ "projectId": quiet.project, "query": "SELECT 41 + 1 AS answer" })),
        )
        .await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(body["result"]["rows"], json!([{ "answer": 42 }]), "{body}");
    for task in tasks {
        let (status, body) = task.await.unwrap();
        assert_eq!(status, 200, "{body}");
    }
    app.stop().await;
}

#[tokio::test]
async fn the_connection_budget_leaves_out_what_other_clients_of_the_cluster_hold() {
    use crate::support::cluster::DedicatedCluster;
    let pg = DedicatedCluster::start(&[("max_connections", "60")]).await;
    // Another client of the cluster (another server, a CLI command, a tool) holds 20.
    let mut others = Vec::new();
    for _ in 0..20 {
        others.push(pg.client("postgres").await);
    }
    let control = unique("ctl");
    let app = spawn_app_with(|c| {
        c.database_url = Some(pg.cluster.url(&control).into());
        c.sql_project_connections = 30;
        c.sql_queue_timeout_ms = 1_000;
    })
    .await;
    let own = fluxbase::sql::own_connections(&app.app.config) as u64;
    let f = app.fixture().await;
    // More requests than the budget left (60 − 3 reserved − 20 − this server's own sessions,
    // ¾ of it) and fewer than one counting the 20 as free.
    let flood: Vec<_> = (0..24)
        .map(|_| app.spawn_sql(&f.read, &f.project, "SELECT pg_sleep(2)"))
        .collect();
    // The budget is what is left: requests past it are told to retry, none finds the cluster
    // full (which would be a 503 for every tenant, this server's own sessions included).
    let (mut answered, mut refused) = (0, 0);
    for task in flood {
        let (status, body) = task.await.unwrap();
        match status {
            200 => answered += 1,
            429 => {
                refused += 1;
                let v: Value = serde_json::from_str(&body).unwrap();
                let message = v["error"]["message"].as_str().unwrap();
                assert!(message.contains("(sql_max_connections)"), "{body}");
                let budget: u64 = message
                    .strip_prefix("All ")
                    .and_then(|m| m.split(' ').next())
                    .and_then(|n| n.parse().ok())
                    .unwrap_or_else(|| panic!("no budget in {body}"));
                assert!(
                    budget + 20 + own <= 60 - 3,
                    "budget {budget}, own {own}: {body}"
                );
            }
            other => panic!("{other}: {body}"),
        }
    }
    assert!(
        answered > 0 && refused > 0,
        "{answered} answered, {refused} refused"
    );
    // This server's own sessions still find room at their most.
    let (status, body) = app.call("GET", "/ready", None, None).await;
    assert_eq!(status, 200, "{body}");
    drop(others);
    app.stop().await;
}

/// Projects' change streams take nothing of the SQL connection budget: a stream holds only its
/// walsender, which PostgreSQL counts apart from `max_connections` (red team rt6 C1: after a
/// restart with 144 projects the budget was 3 for the whole server — each stream's walsender
/// and its catalog session counted as other clients — and on a budget sized before projects
/// were added, their sessions filled the cluster: 503 for idle tenants).
#[tokio::test]
async fn projects_change_streams_leave_the_sql_connection_budget_whole() {
    use crate::support::cluster::DedicatedCluster;
    const MAX: u64 = 60;
    let pg = DedicatedCluster::start(&[("max_connections", "60")]).await;
    let control = unique("ctl");
    let app = spawn_app_with(|c| c.database_url = Some(pg.cluster.url(&control).into())).await;
    let mut tenants = Vec::new();
    for _ in 0..12 {
        tenants.push(app.fixture().await);
    }
    crate::support::poll::until(
        std::time::Duration::from_secs(60),
        std::time::Duration::from_millis(200),
        || async {
            let streaming = app
                .app
                .cdc
                .all_status()
                .iter()
                .filter(|(_, s)| s.state == fluxbase::cdc::StreamState::Streaming)
                .count();
            if streaming == tenants.len() {
                Ok(())
            } else {
                Err(format!("{streaming} of {} streams started", tenants.len()))
            }
        },
    )
    .await;
    // The first SQL request sizes the budget, with every stream running.
    let f = &tenants[0];
    assert_eq!(
        app.rows(&f.read, &f.project, "SELECT 1 AS one").await,
        vec![json!({ "one": 1 })]
    );
    let metrics = app.metrics_text().await;
    let budget: u64 = metrics
        .lines()
        .find_map(|l| l.strip_prefix("fluxbase_sql_connection_budget "))
        .and_then(|n| n.parse().ok())
        .unwrap_or_else(|| panic!("no budget in {metrics}"));
    // ¾ of what is left after the 3 reserved places and this server's own sessions at their
    // most; of those, the webhook writer's and the role repairs' open now are counted among the
    // other clients too (at most 8 here): 12 walsenders and 12 catalog sessions are not.
    let own = fluxbase::sql::own_connections(&app.app.config) as u64;
    let whole = (MAX - 3 - own) * 3 / 4;
    let least = (MAX - 3 - own - 8) * 3 / 4;
    assert!(
        (least..=whole).contains(&budget),
        "budget {budget}, expected {least}..={whole}"
    );
    // Every tenant is served at once.
    for t in &tenants {
        assert_eq!(
            app.rows(&t.readwrite, &t.project, "SELECT 2 AS two").await,
            vec![json!({ "two": 2 })]
        );
    }
    app.stop().await;
}
