//! Webhook egress against real HTTP receivers on loopback: the SSRF guard at connect time,
//! redirects, `Retry-After`, timeouts and the response-body cap.
//!
//! Every receiver here is a raw `TcpListener` on 127.0.0.1 that answers one fixed response; it
//! counts connections, so "refused before connecting" is checked as "no connection was ever
//! accepted". No test sends anywhere but loopback, even if the code under test misbehaves.

use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime};

use bytes::Bytes;
use fluxbase::webhooks::egress::{self, EgressError};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpListener;
use url::Url;

/// What a receiver got: method and target, lowercase header names, exact body bytes.
#[derive(Debug, Clone)]
struct Received {
    request_line: String,
    headers: Vec<(String, String)>,
    body: Vec<u8>,
}

impl Received {
    fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(n, _)| n == name)
            .map(|(_, v)| v.as_str())
    }
}

#[derive(Clone)]
struct Script {
    /// Written once the request is read; `None`: never answer.
    response: Option<Vec<u8>>,
    /// Then keep the connection open until the client closes it (a body that never ends).
    hold: bool,
}

struct Receiver {
    addr: SocketAddr,
    connections: Arc<Mutex<usize>>,
    received: Arc<Mutex<Vec<Received>>>,
    /// Connections the client closed while this receiver still held them open.
    hung_up: Arc<Mutex<usize>>,
}

impl Receiver {
    async fn start(script: Script) -> Receiver {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let connections = Arc::new(Mutex::new(0));
        let received = Arc::new(Mutex::new(Vec::new()));
        let hung_up = Arc::new(Mutex::new(0));
        let (c, r, h) = (connections.clone(), received.clone(), hung_up.clone());
        tokio::spawn(async move {
            loop {
                let Ok((mut socket, _)) = listener.accept().await else {
                    return;
                };
                *c.lock().unwrap() += 1;
                let (r, h, script) = (r.clone(), h.clone(), script.clone());
                tokio::spawn(async move {
                    let Some(request) = read_request(&mut socket).await else {
                        return;
                    };
                    r.lock().unwrap().push(request);
                    if let Some(response) = &script.response {
                        let _ = socket.write_all(response).await;
                    }
                    if script.hold || script.response.is_none() {
                        // Until the client hangs up (end of stream, or a reset).
                        let mut buf = [0u8; 1024];
                        while let Ok(n) = socket.read(&mut buf).await {
                            if n == 0 {
                                break;
                            }
                        }
                        *h.lock().unwrap() += 1;
                        return;
                    }
                    let _ = socket.shutdown().await;
                });
            }
        });
        Receiver {
            addr,
            connections,
            received,
            hung_up,
        }
    }

    async fn answering(response: String) -> Receiver {
        Receiver::start(Script {
            response: Some(response.into_bytes()),
            hold: false,
        })
        .await
    }

    fn url(&self, host: &str, path: &str) -> Url {
        Url::parse(&format!("http://{host}:{}{path}", self.addr.port())).unwrap()
    }

    fn connections(&self) -> usize {
        *self.connections.lock().unwrap()
    }

    fn received(&self) -> Vec<Received> {
        self.received.lock().unwrap().clone()
    }

    /// Waits until the client has closed `n` of the connections this receiver held open.
    async fn hung_up(&self, n: usize) {
        crate::support::poll::until(
            Duration::from_secs(60),
            Duration::from_millis(20),
            || async {
                match *self.hung_up.lock().unwrap() {
                    seen if seen >= n => Ok(()),
                    seen => Err(format!("the client closed {seen} of {n} held connections")),
                }
            },
        )
        .await
    }
}

/// A fixed HTTP/1.1 answer that closes the connection.
fn answer(status: &str, extra_headers: &[(&str, &str)], body: &str) -> String {
    let mut out = format!(
        "HTTP/1.1 {status}\r\ncontent-length: {}\r\nconnection: close\r\n",
        body.len()
    );
    for (name, value) in extra_headers {
        out.push_str(&format!("{name}: {value}\r\n"));
    }
    out.push_str("\r\n");
    out.push_str(body);
    out
}

async fn read_request(socket: &mut tokio::net::TcpStream) -> Option<Received> {
    let mut buf = Vec::new();
    let head_end = loop {
        if let Some(i) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
            break i;
        }
        let mut chunk = [0u8; 4096];
        let n = socket.read(&mut chunk).await.ok()?;
        if n == 0 {
            return None;
        }
        buf.extend_from_slice(&chunk[..n]);
    };
    let head = String::from_utf8(buf[..head_end].to_vec()).ok()?;
    let mut lines = head.split("\r\n");
    let request_line = lines.next()?.to_owned();
    let headers: Vec<(String, String)> = lines
        .filter_map(|l| l.split_once(':'))
        .map(|(n, v)| (n.trim().to_ascii_lowercase(), v.trim().to_owned()))
        .collect();
    let length: usize = headers
        .iter()
        .find(|(n, _)| n == "content-length")
        .map_or(0, |(_, v)| v.parse().unwrap());
    let mut body = buf[head_end + 4..].to_vec();
    while body.len() < length {
        let mut chunk = [0u8; 4096];
        let n = socket.read(&mut chunk).await.ok()?;
        if n == 0 {
            return None;
        }
        body.extend_from_slice(&chunk[..n]);
    }
    Some(Received {
        request_line,
        headers,
        body,
    })
}

fn client(allow_private: bool) -> reqwest::Client {
    egress::client(
        allow_private,
        Duration::from_secs(5),
        Duration::from_secs(10),
    )
}

const NO_HEADERS: &[(&str, &str)] = &[];

async fn post(allow_private: bool, url: &Url, cap: usize) -> Result<egress::Response, EgressError> {
    egress::post(
        &client(allow_private),
        url,
        NO_HEADERS,
        Bytes::from_static(b"{}"),
        allow_private,
        cap,
    )
    .await
}

#[tokio::test]
async fn private_targets_are_refused_at_connect_time_before_the_receiver_sees_anything() {
    let receiver = Receiver::answering(answer("200 OK", &[], "ok")).await;
    let guarded = client(false);

    for host in [
        "127.0.0.1",
        "localhost",
        "[::ffff:127.0.0.1]",
        "[::ffff:0:127.0.0.1]",
        "[64:ff9b::127.0.0.1]",
        "[2002:7f00:1::1]",
        "2130706433",
        "127.1",
    ] {
        let url = receiver.url(host, "/hook");
        match egress::post(&guarded, &url, NO_HEADERS, Bytes::new(), false, 1024).await {
            Err(EgressError::Forbidden(_, reason)) => {
                assert!(reason.contains("loopback)"), "{host}: {reason}")
            }
            other => panic!("{host}: {other:?}"),
        }
    }
    // The name is refused by the resolver itself, whatever `post` is told.
    let url = receiver.url("localhost", "/hook");
    let err = egress::post(&guarded, &url, NO_HEADERS, Bytes::new(), true, 1024)
        .await
        .unwrap_err();
    assert!(
        matches!(&err, EgressError::Forbidden(target, reason)
            if target == "localhost" && reason.starts_with("resolves only to")),
        "{err:?}"
    );
    // A literal IP never reaches a resolver: `post` checks it even with a permissive client.
    let url = receiver.url("127.0.0.1", "/hook");
    let err = egress::post(&client(true), &url, NO_HEADERS, Bytes::new(), false, 1024)
        .await
        .unwrap_err();
    assert_eq!(
        err.to_string(),
        "webhook target 127.0.0.1 is not allowed: address 127.0.0.1 (loopback)"
    );

    // Sentinel: the same receiver does answer when allowed, and that was its first connection.
    let response = post(true, &receiver.url("127.0.0.1", "/hook"), 1024)
        .await
        .unwrap();
    assert_eq!(response.status, 200);
    assert_eq!(receiver.connections(), 1);
    assert_eq!(receiver.received().len(), 1);
}

#[tokio::test]
async fn with_allow_private_the_post_arrives_with_the_exact_body_and_headers() {
    let receiver = Receiver::answering(answer("204 No Content", &[], "")).await;
    let body = "{\"event_type\":\"row.inserted\",\"data\":{\"new\":{\"name\":\"Zoë ☃\"}}}";
    let headers = vec![
        ("content-type", "application/json".to_string()),
        ("x-fluxbase-signature", "sha256=00ff".to_string()),
        ("webhook-id", "dlv_123".to_string()),
    ];
    let client = client(true);

    for host in ["127.0.0.1", "localhost"] {
        let url = receiver.url(host, "/hooks/a?x=1");
        let response = egress::post(&client, &url, &headers, Bytes::from(body), true, 1024)
            .await
            .unwrap();
        assert_eq!(response.status, 204);
        assert_eq!(response.retry_after, None);
        assert_eq!(response.body, "");

        let got = receiver.received().pop().unwrap();
        assert_eq!(got.request_line, "POST /hooks/a?x=1 HTTP/1.1");
        assert_eq!(got.body, body.as_bytes());
        assert_eq!(got.header("content-type"), Some("application/json"));
        assert_eq!(got.header("x-fluxbase-signature"), Some("sha256=00ff"));
        assert_eq!(got.header("webhook-id"), Some("dlv_123"));
        assert_eq!(
            got.header("content-length"),
            Some(body.len().to_string().as_str())
        );
        assert_eq!(got.header("user-agent"), Some(egress::USER_AGENT));
        assert_eq!(
            got.header("host"),
            Some(format!("{host}:{}", receiver.addr.port()).as_str())
        );
    }
    assert!(egress::USER_AGENT.starts_with("Fluxbase-Webhooks/"));
    assert_eq!(receiver.received().len(), 2);
}

#[tokio::test]
async fn redirects_are_returned_and_never_followed() {
    // The redirect target is a second loopback receiver (a private address), so nothing would
    // leave the machine even if the client did follow.
    let target = Receiver::answering(answer("200 OK", &[], "followed")).await;
    let location = target.url("127.0.0.1", "/elsewhere").to_string();
    for status in [
        "301 Moved Permanently",
        "302 Found",
        "303 See Other",
        "307 Temporary Redirect",
        "308 Permanent Redirect",
    ] {
        let redirecting =
            Receiver::answering(answer(status, &[("location", &location)], "moved")).await;
        let response = post(true, &redirecting.url("127.0.0.1", "/"), 1024)
            .await
            .unwrap();
        assert_eq!(response.status.to_string(), status[..3], "{status}");
        assert_eq!(response.body, "moved");
        assert_eq!(redirecting.received().len(), 1);
    }
    // A redirect to a name that resolves to loopback is not followed either.
    let location = target.url("localhost", "/elsewhere").to_string();
    let redirecting =
        Receiver::answering(answer("302 Found", &[("location", &location)], "")).await;
    let response = post(true, &redirecting.url("127.0.0.1", "/"), 1024)
        .await
        .unwrap();
    assert_eq!(response.status, 302);
    assert_eq!(target.connections(), 0);
}

#[tokio::test]
async fn retry_after_is_read_as_seconds_and_as_an_http_date() {
    let seconds = Receiver::answering(answer(
        "503 Service Unavailable",
        &[("retry-after", "120")],
        "",
    ))
    .await;
    let response = post(true, &seconds.url("127.0.0.1", "/"), 1024)
        .await
        .unwrap();
    assert_eq!(response.status, 503);
    assert_eq!(response.retry_after, Some(Duration::from_secs(120)));

    // The wait is measured from the client's clock when the answer came: between `before` and
    // `after` (the date has whole seconds).
    let before = SystemTime::now();
    let at = httpdate::parse_http_date(&httpdate::fmt_http_date(before + Duration::from_secs(60)))
        .unwrap();
    let date = httpdate::fmt_http_date(at);
    let dated = Receiver::answering(answer(
        "429 Too Many Requests",
        &[("retry-after", &date)],
        "",
    ))
    .await;
    let response = post(true, &dated.url("127.0.0.1", "/"), 1024)
        .await
        .unwrap();
    assert_eq!(response.status, 429);
    let after = SystemTime::now();
    let wait = response.retry_after.unwrap();
    let (least, most) = (
        at.duration_since(after).unwrap(),
        at.duration_since(before).unwrap(),
    );
    assert!(
        least <= wait && wait <= most,
        "{wait:?} is not {date} seen between {least:?} and {most:?} before it"
    );

    let garbage = Receiver::answering(answer(
        "503 Service Unavailable",
        &[("retry-after", "soon")],
        "",
    ))
    .await;
    let response = post(true, &garbage.url("127.0.0.1", "/"), 1024)
        .await
        .unwrap();
    assert_eq!(response.retry_after, None);
}

/// A receiver that never answers: only the client's own total timeout can end the request, and
/// the client then hangs up.
#[tokio::test]
async fn a_slow_receiver_hits_the_total_timeout() {
    let slow = Receiver::start(Script {
        response: None,
        hold: true,
    })
    .await;
    let client = egress::client(true, Duration::from_secs(5), Duration::from_millis(300));
    let url = slow.url("127.0.0.1", "/");
    let post = egress::post(
        &client,
        &url,
        NO_HEADERS,
        Bytes::from_static(b"{}"),
        true,
        1024,
    );
    let err = tokio::time::timeout(Duration::from_secs(60), post)
        .await
        .expect("the total timeout never ended a request the receiver does not answer")
        .unwrap_err();
    assert!(matches!(err, EgressError::Timeout), "{err:?}");
    // It was the request that timed out, not the connection: the receiver read it whole.
    assert_eq!(slow.received().len(), 1);
    slow.hung_up(1).await;
}

#[tokio::test]
async fn a_closed_port_is_a_connect_error() {
    // Bound by this test but not listening, for as long as the test runs: refused, and no one
    // else can take the port meanwhile.
    let socket = socket2::Socket::new(socket2::Domain::IPV4, socket2::Type::STREAM, None).unwrap();
    socket
        .bind(&SocketAddr::from(([127, 0, 0, 1], 0)).into())
        .unwrap();
    let port = socket.local_addr().unwrap().as_socket().unwrap().port();
    let url = Url::parse(&format!("http://127.0.0.1:{port}/")).unwrap();
    match post(true, &url, 1024).await {
        Err(EgressError::Connect(message)) => {
            assert!(message.contains("refused"), "{message}")
        }
        other => panic!("{other:?}"),
    }
}

#[tokio::test]
async fn response_bodies_are_truncated_to_the_cap() {
    let big = Receiver::answering(answer(
        "500 Internal Server Error",
        &[],
        &"x".repeat(64 * 1024),
    ))
    .await;
    let response = post(true, &big.url("127.0.0.1", "/"), 1000).await.unwrap();
    assert_eq!(response.status, 500);
    assert_eq!(response.body, "x".repeat(1000));

    // A multi-byte character cut by the cap is dropped, not turned into garbage.
    let euros = Receiver::answering(answer("200 OK", &[], "€€€")).await;
    let response = post(true, &euros.url("127.0.0.1", "/"), 4).await.unwrap();
    assert_eq!(response.body, "€");

    // A body announced as 10 MiB that stalls after 4 KiB, held open until the client hangs up:
    // the cap is reached and nothing waits for the rest. The client's total timeout is an hour,
    // so only the cap can end this read.
    let mut stalled = b"HTTP/1.1 200 OK\r\ncontent-length: 10485760\r\n\r\n".to_vec();
    stalled.extend_from_slice(&[b'y'; 4096]);
    let stalled = Receiver::start(Script {
        response: Some(stalled),
        hold: true,
    })
    .await;
    let patient = egress::client(true, Duration::from_secs(5), Duration::from_secs(3600));
    let url = stalled.url("127.0.0.1", "/");
    let read = egress::post(
        &patient,
        &url,
        NO_HEADERS,
        Bytes::from_static(b"{}"),
        true,
        1000,
    );
    let response = tokio::time::timeout(Duration::from_secs(60), read)
        .await
        .expect("the capped read waited for the rest of a stalled body")
        .unwrap();
    assert_eq!(response.body, "y".repeat(1000));
    // And the connection was closed, not kept to drain the rest.
    stalled.hung_up(1).await;
}

/// Every block of the IANA special-purpose registries that is not globally reachable, and
/// every IPv6 form embedding a private IPv4 address, is refused through the API.
#[tokio::test]
async fn special_purpose_targets_are_refused_at_registration() {
    let app = crate::support::spawn_app_with(|c| c.webhook_allow_private = false).await;
    let f = app.fixture().await;
    for url in [
        // IPv4-translated (::ffff:0:0:0/96), NAT64, 6to4 and IPv4-compatible forms of private
        // and metadata addresses.
        "http://[::ffff:0:7f00:1]/",
        "http://[::ffff:0:a9fe:a9fe]/",
        "http://[64:ff9b::a00:1]/",
        "http://[2002:c0a8:101::1]/",
        "http://[::a00:1]/",
        // Teredo and the rest of the IETF protocol block.
        "http://[2001:0:4136:e378:8000:63bf:3fff:fdd2]/",
        "http://[2001:1::1]/",
        // IPv6 documentation, SRv6, discard, unassigned space.
        "http://[3fff::1]/",
        "http://[5f00::1]/",
        "http://[100::1]/",
        "http://[4000::1]/",
        // IPv4 registry blocks.
        "http://192.0.0.9/",
        "http://192.88.99.1/",
        "http://198.18.0.1/",
        "http://240.0.0.1/",
        "http://255.255.255.255/",
    ] {
        let (status, b) = app
            .call(
                "POST",
                "/api/webhooks",
                Some(&f.admin),
                Some(serde_json::json!({ "projectId": f.project, "url": url, "events": ["row.inserted"] })),
            )
            .await;
        assert_eq!(status, 400, "{url} was accepted: {b}");
        assert_eq!(b["error"]["code"], "BAD_REQUEST", "{b}");
        assert!(
            b["error"]["message"]
                .as_str()
                .unwrap()
                .contains("not allowed"),
            "{b}"
        );
    }
    // Global unicast stays allowed.
    let (status, b) = app
        .call(
            "POST",
            "/api/webhooks",
            Some(&f.admin),
            Some(serde_json::json!({ "projectId": f.project, "url": "http://[2606:4700::1111]/hook", "events": ["row.inserted"] })),
        )
        .await;
    assert_eq!(status, 201, "{b}");
    app.stop().await;
}
