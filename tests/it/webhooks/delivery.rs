//! Webhooks: real HTTP receivers in the test, the real server, the change stream behind it.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use serde_json::{json, Value};
use warp::Filter;

use crate::support::fixtures::project;
use crate::support::http::{call, sql};
use crate::support::poll;
use crate::support::process::ServerProcess;
use crate::support::receiver::{Received, Receiver};
use crate::support::{spawn_app_with, spawn_webhook_app as app, Fixture, TestApp};

async fn register(app: &TestApp, f: &Fixture, body: Value) -> Value {
    let mut body = body;
    body["projectId"] = json!(f.project);
    let (status, b) = app
        .call("POST", "/api/webhooks", Some(&f.admin), Some(body))
        .await;
    assert_eq!(status, 201, "{b}");
    b
}

/// A receiver that answers 410 (gone) once, a webhook of `row.inserted` pointing at it, and
/// `sql` run in the project: the receiver and the webhook's id.
async fn run_for_a_gone_receiver(app: &TestApp, f: &Fixture, sql: &str) -> (Receiver, String) {
    let rx = Receiver::start().await;
    rx.answer(410, None);
    let hook = register(app, f, json!({ "url": rx.url, "events": ["row.inserted"] })).await;
    let wh = hook["webhook"]["id"].as_str().unwrap().to_string();
    app.rows(&f.admin, &f.project, sql).await;
    (rx, wh)
}

/// `PATCH /api/webhooks` with `enabled: true`; the answer.
async fn enable(app: &TestApp, f: &Fixture, webhook_id: &str) -> Value {
    let (status, b) = app
        .call(
            "PATCH",
            "/api/webhooks",
            Some(&f.admin),
            Some(json!({ "projectId": f.project, "webhookId": webhook_id, "enabled": true })),
        )
        .await;
    assert_eq!(status, 200, "{b}");
    b
}

/// `POST /api/webhooks/redeliver` of one delivery.
async fn redeliver(app: &TestApp, f: &Fixture, delivery_id: &str) {
    let (status, b) = app
        .call(
            "POST",
            "/api/webhooks/redeliver",
            Some(&f.admin),
            Some(json!({ "projectId": f.project, "deliveryId": delivery_id })),
        )
        .await;
    assert_eq!(status, 200, "{b}");
}

/// `GET /api/webhooks/deliveries?projectId=…&<filter>` until `done` holds for the answer (20 s
/// at most); that answer.
async fn deliveries_until(
    app: &TestApp,
    f: &Fixture,
    filter: &str,
    done: impl Fn(&Value) -> bool,
) -> Value {
    let path = format!("/api/webhooks/deliveries?projectId={}&{filter}", f.project);
    poll::until(
        Duration::from_secs(20),
        Duration::from_millis(50),
        || async {
            let (_, b) = app.call("GET", &path, Some(&f.admin), None).await;
            if done(&b) {
                Ok(b)
            } else {
                Err(b.to_string())
            }
        },
    )
    .await
}

/// The webhook's first delivery with status `failed`, once there is one.
async fn failed_delivery(app: &TestApp, f: &Fixture, webhook_id: &str) -> Value {
    let filter = format!("webhookId={webhook_id}&status=failed");
    let b = deliveries_until(app, f, &filter, |b| b["deliveries"][0].is_object()).await;
    b["deliveries"][0].clone()
}

fn hmac_hex(secret: &str, body: &str) -> String {
    let key = ring::hmac::Key::new(ring::hmac::HMAC_SHA256, secret.as_bytes());
    hex::encode(ring::hmac::sign(&key, body.as_bytes()).as_ref())
}

#[tokio::test]
async fn each_event_type_arrives_in_the_guides_shape_with_both_signatures() {
    let app = app().await;
    let f = app.fixture().await;
    let rx = Receiver::start().await;
    let hook = register(&app, &f, json!({ "url": rx.url, "events": ["row.inserted", "row.updated", "row.deleted", "schema.changed"] })).await;
    let secret = hook["secret"].as_str().unwrap().to_string();
    assert!(secret.starts_with("whsec_"));
    app.rows(
        &f.admin,
        &f.project,
        "CREATE TABLE orders (id int PRIMARY KEY, customer_id int, amount numeric, status text)",
    )
    .await;
    app.rows(
        &f.readwrite,
        &f.project,
        "INSERT INTO orders VALUES (123, 7, 59.99, 'pending')",
    )
    .await;
    app.rows(
        &f.readwrite,
        &f.project,
        "UPDATE orders SET status = 'paid' WHERE id = 123",
    )
    .await;
    app.rows(&f.admin, &f.project, "DELETE FROM orders WHERE id = 123")
        .await;
    let got = rx.wait_for(4).await;
    let bodies: Vec<Value> = got
        .iter()
        .map(|r| serde_json::from_str(&r.body).unwrap())
        .collect();
    assert_eq!(bodies[0]["event_type"], "schema.changed");
    assert_eq!(bodies[1]["event_type"], "row.inserted");
    assert_eq!(bodies[1]["project_id"], f.project.as_str());
    assert_eq!(bodies[1]["table_id"], "orders");
    assert_eq!(
        bodies[1]["data"],
        json!({ "new": { "id": 123, "customer_id": 7, "amount": 59.99, "status": "pending" }, "old": null })
    );
    assert!(bodies[1]["timestamp"].as_str().unwrap().ends_with('Z'));
    assert_eq!(bodies[2]["event_type"], "row.updated");
    assert_eq!(bodies[2]["data"]["old"]["status"], "pending");
    assert_eq!(bodies[2]["data"]["new"]["status"], "paid");
    assert_eq!(bodies[3]["event_type"], "row.deleted");
    assert_eq!(bodies[3]["data"]["new"], Value::Null);
    assert_eq!(bodies[3]["data"]["old"]["id"], 123);
    for r in &got {
        assert!(signed_by(r, &secret), "{r:?}");
    }
}

/// Whether both of the delivery's signatures are right for `secret` (a `whsec_…` one), and it
/// alone: the guide's Node check, exactly, and Standard Webhooks' (v1,<base64 HMAC of
/// id.timestamp.body> with the base64 secret), with no other signature beside it; and its ids
/// are the guide's.
fn signed_by(r: &Received, secret: &str) -> bool {
    signed_first_by(r, secret) && standard_signatures(r).len() == 1
}

/// Whether `X-Fluxbase-Signature` and the first of `webhook-signature`'s signatures are
/// `secret`'s.
fn signed_first_by(r: &Received, secret: &str) -> bool {
    let id = r.headers["webhook-id"].to_str().unwrap();
    assert_eq!(r.headers["x-fluxbase-delivery"].to_str().unwrap(), id);
    assert!(id.starts_with("dlv_"));
    r.headers["x-fluxbase-signature"].to_str().unwrap()
        == format!("sha256={}", hmac_hex(secret, &r.body))
        && standard_signatures(r).first() == Some(&standard_signature(r, secret))
}

/// The Standard Webhooks signature of a delivery with a `whsec_…` secret: `v1,<base64>`.
fn standard_signature(r: &Received, secret: &str) -> String {
    use base64::Engine;
    let b64 = base64::engine::general_purpose::STANDARD;
    let id = r.headers["webhook-id"].to_str().unwrap();
    let ts = r.headers["webhook-timestamp"].to_str().unwrap();
    let key = ring::hmac::Key::new(ring::hmac::HMAC_SHA256, &b64.decode(&secret[6..]).unwrap());
    let sig = ring::hmac::sign(&key, format!("{id}.{ts}.{}", r.body).as_bytes());
    format!("v1,{}", b64.encode(sig.as_ref()))
}

/// The space-delimited signatures of `webhook-signature`.
fn standard_signatures(r: &Received) -> Vec<String> {
    r.headers["webhook-signature"]
        .to_str()
        .unwrap()
        .split(' ')
        .map(str::to_string)
        .collect()
}

/// A transaction of rows of 3 MB each to two webhooks (one `strict`, one `row`): every delivery
/// arrives once, whole and signed, the strict one's in commit order, and the server's peak memory
/// grows by a bounded amount, not with the transaction. Before, the outbox writer held a
/// transaction's events whole and copied each body per webhook and per attempt, a drain's page
/// held every pending body, and the stream handed a spilled transaction over 256 events at a
/// time: ten rows of 14 MB in one transaction took the peak from 77 MB to 1 GB.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_transaction_of_large_rows_is_delivered_whole_within_a_bounded_memory() {
    const ROWS: usize = 24;
    const ROW_BYTES: usize = 3_000_000;
    let server = ServerProcess::start(&[
        ("FLUXBASE_WEBHOOK_ALLOW_PRIVATE", "true"),
        ("FLUXBASE_WEBHOOK_LARGE_BODY_MEMORY_MB", "8"),
    ])
    .await;
    let p = project(&server.base).await;
    let rx = Receiver::start().await;
    let mut secrets = Vec::new();
    for ordering in ["strict", "row"] {
        let (status, hook) = call(
            &server.base,
            "POST",
            "/api/webhooks",
            Some(&p.admin),
            json!({ "projectId": p.project, "url": rx.url, "events": ["row.inserted"],
                    "ordering": ordering }),
        )
        .await;
        assert_eq!(status, 201, "{hook}");
        secrets.push(hook["secret"].as_str().unwrap().to_string());
    }
    sql(
        &server.base,
        &p.admin,
        &p.project,
        "CREATE TABLE big (id int PRIMARY KEY, v text)",
    )
    .await;
    // Warm up (pools, the HTTP client, allocator arenas), then take the baseline.
    sql(
        &server.base,
        &p.admin,
        &p.project,
        "INSERT INTO big VALUES (0, 'warm')",
    )
    .await;
    rx.wait_for(2).await;
    let baseline = server.peak_rss();
    sql(
        &server.base,
        &p.admin,
        &p.project,
        &format!(
            "INSERT INTO big SELECT g, repeat(lpad(g::text, 8, '0'), {}) FROM generate_series(1, {ROWS}) g",
            ROW_BYTES / 8
        ),
    )
    .await;
    let got = poll::until(
        Duration::from_secs(120),
        Duration::from_millis(100),
        || async {
            let got = rx.got.lock().unwrap().clone();
            if got.len() >= 2 + 2 * ROWS {
                Ok(got)
            } else {
                Err(format!(
                    "{} of {} deliveries arrived",
                    got.len(),
                    2 + 2 * ROWS
                ))
            }
        },
    )
    .await;
    let grew = server.peak_rss().saturating_sub(baseline);
    eprintln!("the peak grew by {} MB", grew >> 20);
    // Nothing more comes (each delivery once).
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert_eq!(rx.got.lock().unwrap().len(), 2 + 2 * ROWS);
    let mut ids: [Vec<i64>; 2] = Default::default();
    for r in &got {
        let hook = secrets
            .iter()
            .position(|s| signed_by(r, s))
            .unwrap_or_else(|| panic!("signed by neither webhook: {:?}", r.headers));
        let body: Value = serde_json::from_str(&r.body).unwrap();
        let id = body["data"]["new"]["id"].as_i64().unwrap();
        if id > 0 {
            let v = body["data"]["new"]["v"].as_str().unwrap();
            let unit = format!("{id:08}");
            assert_eq!(v.len(), ROW_BYTES, "row {id}");
            assert!(
                v.as_bytes().chunks(8).all(|c| c == unit.as_bytes()),
                "row {id}"
            );
        }
        ids[hook].push(id);
    }
    // Strict: commit order. Row: each row once, in any order.
    assert_eq!(ids[0], (0..=ROWS as i64).collect::<Vec<_>>());
    ids[1].sort();
    assert_eq!(ids[1], (0..=ROWS as i64).collect::<Vec<_>>());
    // 72 MB of rows, each delivered twice: the bounds (8 MiB runs and outbox batches, a 32 MiB
    // durable queue, 8 MiB of large bodies in flight) keep the growth near a few rows' worth.
    assert!(
        grew < 320 << 20,
        "the peak grew by {} MB for {} MB of rows",
        grew >> 20,
        (ROWS * ROW_BYTES) >> 20
    );
}

#[tokio::test]
async fn table_and_event_filters_apply_and_a_disabled_webhook_gets_nothing() {
    let app = app().await;
    let f = app.fixture().await;
    let only_orders = Receiver::start().await;
    let only_deletes = Receiver::start().await;
    let disabled = Receiver::start().await;
    register(
        &app,
        &f,
        json!({ "url": only_orders.url, "events": ["row.inserted"], "tables": ["orders"] }),
    )
    .await;
    register(
        &app,
        &f,
        json!({ "url": only_deletes.url, "events": ["row.deleted"] }),
    )
    .await;
    let off = register(
        &app,
        &f,
        json!({ "url": disabled.url, "events": ["row.inserted", "row.deleted"], "enabled": false }),
    )
    .await;
    app.rows(
        &f.admin,
        &f.project,
        "CREATE TABLE orders (id int); CREATE TABLE other (id int)",
    )
    .await;
    app.rows(
        &f.admin,
        &f.project,
        "INSERT INTO orders VALUES (1); INSERT INTO other VALUES (2); DELETE FROM other",
    )
    .await;
    // That transaction's deliveries are stored at once for every webhook (one INSERT): once
    // the two filtered webhooks got theirs, the disabled one's share of it is settled.
    only_orders.wait_for(1).await;
    only_deletes.wait_for(1).await;
    // Sentinels: a later transaction each webhook wants, the disabled one enabled first. Each
    // webhook is sent its deliveries one at a time, oldest first, so anything of the first
    // transaction that was stored for one would arrive before its sentinel.
    enable(&app, &f, off["webhook"]["id"].as_str().unwrap()).await;
    app.rows(
        &f.admin,
        &f.project,
        "INSERT INTO orders VALUES (3); DELETE FROM orders WHERE id = 3",
    )
    .await;
    let line = |v: &Value| {
        let row = if v["event_type"] == "row.deleted" {
            &v["data"]["old"]
        } else {
            &v["data"]["new"]
        };
        format!(
            "{} {} {}",
            v["event_type"].as_str().unwrap(),
            v["table_id"].as_str().unwrap(),
            row["id"]
        )
    };
    let sentinel = |rx: &Receiver, last: &'static str| {
        let rx = rx.got.clone();
        async move {
            poll::until(
                Duration::from_secs(20),
                Duration::from_millis(50),
                || async {
                    let got: Vec<String> = rx
                        .lock()
                        .unwrap()
                        .iter()
                        .map(|r| line(&serde_json::from_str(&r.body).unwrap()))
                        .collect();
                    if got.iter().any(|l| l == last) {
                        Ok(got)
                    } else {
                        Err(format!("the sentinel {last:?} never arrived; got {got:?}"))
                    }
                },
            )
            .await
        }
    };
    assert_eq!(
        sentinel(&only_orders, "row.inserted orders 3").await,
        ["row.inserted orders 1", "row.inserted orders 3"]
    );
    assert_eq!(
        sentinel(&only_deletes, "row.deleted orders 3").await,
        ["row.deleted other 2", "row.deleted orders 3"]
    );
    assert_eq!(
        sentinel(&disabled, "row.deleted orders 3").await,
        ["row.inserted orders 3", "row.deleted orders 3"],
        "the disabled webhook was sent what happened while it was disabled"
    );
}

#[tokio::test]
async fn a_receiver_failing_twice_gets_three_attempts_of_the_same_delivery() {
    let app = app().await;
    let f = app.fixture().await;
    let rx = Receiver::start().await;
    rx.answer(500, None);
    rx.answer(500, None);
    let hook = register(
        &app,
        &f,
        json!({ "url": rx.url, "events": ["row.inserted"] }),
    )
    .await;
    app.rows(
        &f.admin,
        &f.project,
        "CREATE TABLE t (x int); INSERT INTO t VALUES (1)",
    )
    .await;
    let got = rx.wait_for(3).await;
    let ids: Vec<&str> = got
        .iter()
        .map(|r| r.headers["webhook-id"].to_str().unwrap())
        .collect();
    assert!(ids.iter().all(|i| *i == ids[0]), "{ids:?}");
    assert!(got.iter().all(|r| r.body == got[0].body));
    // The third attempt's success is recorded just after the receiver answered it.
    let wh = hook["webhook"]["id"].as_str().unwrap();
    let b = deliveries_until(&app, &f, &format!("webhookId={wh}"), |b| {
        b["deliveries"][0]["status"] != "pending"
    })
    .await;
    let d = &b["deliveries"].as_array().unwrap();
    assert_eq!(d.len(), 1, "{b}");
    assert_eq!(d[0]["status"], "delivered");
    assert_eq!(d[0]["attempts"], 3);
    assert_eq!(d[0]["responseStatus"], 200);
    assert_eq!(d[0]["id"], ids[0]);
}

#[tokio::test]
async fn retry_after_is_honoured_and_410_disables_the_endpoint() {
    let app = app().await;
    let f = app.fixture().await;
    let rx = Receiver::start().await;
    rx.answer(503, Some("2"));
    let first = register(
        &app,
        &f,
        json!({ "url": rx.url, "events": ["row.inserted"] }),
    )
    .await;
    app.rows(
        &f.admin,
        &f.project,
        "CREATE TABLE t (x int); INSERT INTO t VALUES (1)",
    )
    .await;
    let got = rx.wait_for(2).await;
    assert_eq!(got[0].delivery_id(), got[1].delivery_id());
    // The server's own clock, not the test's: each attempt signs the time it was sent
    // (`webhook-timestamp`, whole seconds), and the outbox row keeps the time the failed
    // attempt set for the next one (a success leaves it as it is). Retry-After: 2 puts it 2 s
    // after the first attempt (the backoff here would be 50 ms), and the retry is not sent
    // before it.
    let sent_at = |r: &Received| -> i64 {
        r.headers["webhook-timestamp"]
            .to_str()
            .unwrap()
            .parse()
            .unwrap()
    };
    let wh = first["webhook"]["id"].as_str().unwrap();
    let b = deliveries_until(&app, &f, &format!("webhookId={wh}&status=delivered"), |b| {
        b["deliveries"][0].is_object()
    })
    .await;
    let d = &b["deliveries"][0];
    assert_eq!(
        (d["attempts"].as_i64(), d["responseStatus"].as_i64()),
        (Some(2), Some(200)),
        "{b}"
    );
    let next_attempt_at =
        chrono::DateTime::parse_from_rfc3339(d["nextAttemptAt"].as_str().unwrap())
            .unwrap()
            .timestamp_millis();
    let scheduled = next_attempt_at - sent_at(&got[0]) * 1000;
    assert!(
        (2000..3000).contains(&scheduled),
        "the retry was scheduled {scheduled} ms after the first attempt's second, despite Retry-After: 2"
    );
    assert!(
        sent_at(&got[1]) * 1000 >= next_attempt_at - 999,
        "the retry was sent at {} s, before its time ({next_attempt_at} ms)",
        sent_at(&got[1])
    );

    let gone = Receiver::start().await;
    gone.answer(410, None);
    let hook = register(
        &app,
        &f,
        json!({ "url": gone.url, "events": ["row.inserted"] }),
    )
    .await;
    app.rows(&f.admin, &f.project, "INSERT INTO t VALUES (2)")
        .await;
    gone.wait_for(1).await;
    let w = poll::until(
        Duration::from_secs(20),
        Duration::from_millis(100),
        || async {
            let (_, b) = app
                .call(
                    "GET",
                    &format!("/api/webhooks?projectId={}", f.project),
                    Some(&f.admin),
                    None,
                )
                .await;
            let w = b["webhooks"]
                .as_array()
                .unwrap()
                .iter()
                .find(|w| w["id"] == hook["webhook"]["id"])
                .unwrap()
                .clone();
            if w["enabled"] == false {
                Ok(w)
            } else {
                Err(format!(
                    "the endpoint that answered 410 was not disabled: {w}"
                ))
            }
        },
    )
    .await;
    assert!(w["disabledReason"].as_str().unwrap().contains("410"), "{w}");
    app.rows(&f.admin, &f.project, "INSERT INTO t VALUES (3)")
        .await;
    // The first webhook's delivery of (3) is stored with the disabled one's, had it one (a
    // transaction's deliveries go in one INSERT): once it arrived, that is settled.
    let x =
        |r: &Received| serde_json::from_str::<Value>(&r.body).unwrap()["data"]["new"]["x"].clone();
    let got = rx.wait_for(4).await;
    assert_eq!(x(&got[3]), 3);
    // Sentinel: enabled again, the endpoint is sent its deliveries one at a time, oldest first;
    // a stored delivery of (3) would come before the one of (4).
    enable(&app, &f, hook["webhook"]["id"].as_str().unwrap()).await;
    app.rows(&f.admin, &f.project, "INSERT INTO t VALUES (4)")
        .await;
    let got: Vec<Value> = gone.wait_for(2).await.iter().map(x).collect();
    assert_eq!(got, [json!(2), json!(4)], "a disabled endpoint got more");
}

#[tokio::test]
async fn a_receiver_that_was_down_gets_everything_once_it_is_up() {
    let app = app().await;
    let f = app.fixture().await;
    // A port of the test's own, bound but not listening: connections to it are refused, and
    // no one else can take it before the receiver listens on it.
    let socket = socket2::Socket::new(socket2::Domain::IPV4, socket2::Type::STREAM, None).unwrap();
    socket
        .bind(&std::net::SocketAddr::from(([127, 0, 0, 1], 0)).into())
        .unwrap();
    let port = socket.local_addr().unwrap().as_socket().unwrap().port();
    let url = format!("http://127.0.0.1:{port}/hook");
    register(&app, &f, json!({ "url": url, "events": ["row.inserted"] })).await;
    app.rows(&f.admin, &f.project, "CREATE TABLE t (x int)")
        .await;
    for x in 1..=5 {
        app.rows(&f.admin, &f.project, &format!("INSERT INTO t VALUES ({x})"))
            .await;
    }
    // All five stored and pending, and attempts failing, while nobody listens.
    deliveries_until(&app, &f, "status=pending", |b| {
        let pending = b["deliveries"].as_array().unwrap();
        assert!(pending.len() <= 5, "{b}");
        pending.len() == 5 && pending.iter().any(|d| d["lastError"].as_str().is_some())
    })
    .await;
    // Now the receiver comes up on that port.
    let got: Arc<Mutex<Vec<String>>> = Arc::default();
    let g = got.clone();
    let route = warp::post()
        .and(warp::body::bytes())
        .map(move |b: bytes::Bytes| {
            g.lock()
                .unwrap()
                .push(String::from_utf8_lossy(&b).into_owned());
            "ok"
        });
    socket.listen(128).unwrap();
    socket.set_nonblocking(true).unwrap();
    let listener = tokio::net::TcpListener::from_std(socket.into()).unwrap();
    tokio::spawn(warp::serve(route).incoming(listener).run());
    poll::until(
        Duration::from_secs(60),
        Duration::from_millis(100),
        || async {
            match got.lock().unwrap().len() {
                n if n >= 5 => Ok(()),
                n => Err(format!(
                    "only {n} of 5 deliveries arrived once the receiver was up"
                )),
            }
        },
    )
    .await;
    let xs: Vec<i64> = got
        .lock()
        .unwrap()
        .iter()
        .map(|b| {
            serde_json::from_str::<Value>(b).unwrap()["data"]["new"]["x"]
                .as_i64()
                .unwrap()
        })
        .collect();
    let mut sorted = xs.clone();
    sorted.sort();
    assert_eq!(sorted, vec![1, 2, 3, 4, 5]);
}

#[tokio::test]
async fn forbidden_targets_are_refused_at_registration() {
    let app = spawn_app_with(|c| c.webhook_allow_private = false).await;
    let f = app.fixture().await;
    for url in [
        "http://127.0.0.1/",
        "http://localhost/",
        "http://2130706433/",
        "http://127.1/",
        "http://0/",
        "http://10.0.0.1/",
        "http://172.16.5.4/",
        "http://192.168.1.1/",
        "http://100.64.0.1/",
        "http://169.254.169.254/latest/meta-data/",
        "http://[::1]/",
        "http://[fe80::1]/",
        "http://[fc00::1]/",
        "http://[::ffff:127.0.0.1]/",
        "http://224.0.0.1/",
        "ftp://example.com/",
        "file:///etc/passwd",
        "not a url",
    ] {
        let (status, b) = app
            .call(
                "POST",
                "/api/webhooks",
                Some(&f.admin),
                Some(json!({ "projectId": f.project, "url": url, "events": ["row.inserted"] })),
            )
            .await;
        assert_eq!(status, 400, "{url} was accepted: {b}");
        assert_eq!(b["error"]["code"], "BAD_REQUEST");
    }
    let (status, _) = app
        .call("POST", "/api/webhooks", Some(&f.admin), Some(json!({ "projectId": f.project, "url": "https://example.com/hook", "events": ["nope"] })))
        .await;
    assert_eq!(status, 400);
    let (status, b) = app
        .call("POST", "/api/webhooks", Some(&f.read), Some(json!({ "projectId": f.project, "url": "https://example.com/hook", "events": ["row.inserted"] })))
        .await;
    assert_eq!(
        (status, b["error"]["code"].as_str()),
        (403, Some("SCOPE_MISMATCH"))
    );
}

/// `PATCH /api/webhooks` rotates the signing secret (`rotateSecret: true`: a fresh `whsec_…`,
/// shown once) or sets one (`secret`): deliveries after the answer, a retry of one that failed
/// before included, are signed with the new secret; the listing never shows it; both at once,
/// or a short secret, are a 400. Before, rotating meant deleting the webhook (and its pending
/// deliveries) and creating it again (red team rt12). The replaced secret goes on signing in
/// `webhook-signature` beside the new one for a day (`previousSecretUntil`), or as long as
/// `keepPreviousSecretSecs` says: 0 ends it, and it ends by itself when its time is up; the
/// guide's `X-Fluxbase-Signature` carries the new secret's alone.
#[tokio::test]
async fn a_webhooks_signing_secret_is_rotated_by_patch() {
    let app = app().await;
    let f = app.fixture().await;
    let rx = Receiver::start().await;
    let hook = register(
        &app,
        &f,
        json!({ "url": rx.url, "events": ["row.inserted"] }),
    )
    .await;
    let wh = hook["webhook"]["id"].as_str().unwrap().to_string();
    let first = hook["secret"].as_str().unwrap().to_string();
    app.rows(
        &f.admin,
        &f.project,
        "CREATE TABLE t (x int); INSERT INTO t VALUES (1)",
    )
    .await;
    assert!(signed_by(&rx.wait_for(1).await[0], &first));

    let patch = |body: Value| {
        let mut body = body;
        body["projectId"] = json!(f.project);
        body["webhookId"] = json!(wh);
        app.call("PATCH", "/api/webhooks", Some(&f.admin), Some(body))
    };
    // The next delivery fails once, then is retried after the rotation.
    rx.answer(500, Some("1"));
    app.rows(&f.admin, &f.project, "INSERT INTO t VALUES (2)")
        .await;
    rx.wait_for(2).await;
    let (status, b) = patch(json!({ "rotateSecret": true })).await;
    assert_eq!(status, 200, "{b}");
    let second = b["secret"].as_str().unwrap().to_string();
    assert!(second.starts_with("whsec_") && second != first, "{b}");
    assert_eq!(b["webhook"]["secret"], Value::Null, "{b}");
    let until =
        chrono::DateTime::parse_from_rfc3339(b["webhook"]["previousSecretUntil"].as_str().unwrap())
            .unwrap();
    let left = until
        .signed_duration_since(chrono::Utc::now())
        .num_seconds();
    assert!((86_300..=86_400).contains(&left), "a day: {b}");
    app.rows(&f.admin, &f.project, "INSERT INTO t VALUES (3)")
        .await;
    let got = rx.wait_for(4).await;
    for r in &got[2..] {
        assert!(
            signed_first_by(r, &second),
            "not signed with the rotated secret: {r:?}"
        );
        // A receiver still checking the replaced secret accepts it.
        assert_eq!(
            standard_signatures(r),
            [
                standard_signature(r, &second),
                standard_signature(r, &first)
            ],
            "{r:?}"
        );
    }
    let bodies: Vec<&str> = got[2..].iter().map(|r| r.body.as_str()).collect();
    assert!(
        bodies.iter().any(|b| b.contains(r#""x":2"#)),
        "the retry: {bodies:?}"
    );
    assert!(bodies.iter().any(|b| b.contains(r#""x":3"#)), "{bodies:?}");

    // The overlap ended early: the new secret's signature alone.
    let (status, b) = patch(json!({ "keepPreviousSecretSecs": 0 })).await;
    assert_eq!(status, 200, "{b}");
    assert_eq!(b["webhook"]["previousSecretUntil"], Value::Null, "{b}");
    assert_eq!(b.get("secret"), None, "{b}");
    app.rows(&f.admin, &f.project, "INSERT INTO t VALUES (30)")
        .await;
    let r = rx.wait_for(5).await.remove(4);
    assert!(signed_by(&r, &second), "{r:?}");

    // A secret of the caller's, the replaced one kept for 2 s: both, then the new one alone.
    let own = "my-own-secret-of-some-length";
    let (status, b) = patch(json!({ "secret": own, "keepPreviousSecretSecs": 2 })).await;
    assert_eq!((status, b["secret"].as_str()), (200, Some(own)), "{b}");
    app.rows(&f.admin, &f.project, "INSERT INTO t VALUES (4)")
        .await;
    let r = rx.wait_for(6).await.remove(5);
    assert_eq!(
        r.headers["x-fluxbase-signature"].to_str().unwrap(),
        format!("sha256={}", hmac_hex(own, &r.body))
    );
    assert_eq!(standard_signatures(&r)[1], standard_signature(&r, &second));
    tokio::time::sleep(Duration::from_millis(2_500)).await;
    let (_, list) = app
        .call(
            "GET",
            &format!("/api/webhooks?projectId={}", f.project),
            Some(&f.admin),
            None,
        )
        .await;
    assert_eq!(
        list["webhooks"][0]["previousSecretUntil"],
        Value::Null,
        "{list}"
    );
    app.rows(&f.admin, &f.project, "INSERT INTO t VALUES (5)")
        .await;
    let r = rx.wait_for(7).await.remove(6);
    assert_eq!(
        standard_signatures(&r).len(),
        1,
        "expired, still signing: {r:?}"
    );
    // The hourly sweep forgets it (it would otherwise stay in the control database).
    let ctl = app.app.control.get().await.unwrap();
    assert!(
        fluxbase::control::webhooks::forget_previous_secrets(&ctl)
            .await
            .unwrap()
            >= 1
    );
    let kept: Option<String> = ctl
        .query_one(
            "SELECT previous_secret FROM fluxbase.webhooks WHERE id = $1",
            &[&wh],
        )
        .await
        .unwrap()
        .get(0);
    assert_eq!(kept, None);
    // Extending an overlap that has ended brings nothing back.
    let (status, b) = patch(json!({ "keepPreviousSecretSecs": 600 })).await;
    assert_eq!(status, 200, "{b}");
    assert_eq!(b["webhook"]["previousSecretUntil"], Value::Null, "{b}");
    // A rotation that keeps nothing; then one that keeps a day, moved to ten minutes.
    let (status, b) = patch(json!({ "rotateSecret": true, "keepPreviousSecretSecs": 0 })).await;
    assert_eq!(status, 200, "{b}");
    assert_eq!(b["webhook"]["previousSecretUntil"], Value::Null, "{b}");
    let (status, b) = patch(json!({ "rotateSecret": true })).await;
    assert_eq!(status, 200, "{b}");
    assert!(b["webhook"]["previousSecretUntil"].is_string(), "{b}");
    let (status, b) = patch(json!({ "keepPreviousSecretSecs": 600 })).await;
    assert_eq!(status, 200, "{b}");
    let until =
        chrono::DateTime::parse_from_rfc3339(b["webhook"]["previousSecretUntil"].as_str().unwrap())
            .unwrap();
    let left = until
        .signed_duration_since(chrono::Utc::now())
        .num_seconds();
    assert!((500..=600).contains(&left), "moved to ten minutes: {b}");
    // Nothing else changed, and no secret in the listing.
    let (_, list) = app
        .call(
            "GET",
            &format!("/api/webhooks?projectId={}", f.project),
            Some(&f.admin),
            None,
        )
        .await;
    assert!(!list.to_string().contains(own) && !list.to_string().contains(&second));
    assert_eq!(list["webhooks"][0]["events"], json!(["row.inserted"]));

    for (body, why) in [
        (
            json!({ "secret": own, "rotateSecret": true }),
            "secret and rotateSecret",
        ),
        (json!({ "secret": "short" }), "secret: 16 to 256"),
        (
            json!({ "rotateSecret": true, "keepPreviousSecretSecs": 604_801 }),
            "keepPreviousSecretSecs: 0 to 604800",
        ),
        (
            json!({ "keepPreviousSecretSecs": -1 }),
            "keepPreviousSecretSecs: invalid value",
        ),
    ] {
        let (status, b) = patch(body).await;
        assert_eq!(
            (status, b["error"]["code"].as_str()),
            (400, Some("BAD_REQUEST")),
            "{b}"
        );
        assert!(b["error"]["message"].as_str().unwrap().contains(why), "{b}");
    }
    // The weaker scopes cannot.
    let (status, b) = app
        .call(
            "PATCH",
            "/api/webhooks",
            Some(&f.readwrite),
            Some(json!({ "projectId": f.project, "webhookId": wh, "rotateSecret": true })),
        )
        .await;
    assert_eq!(status, 403, "{b}");
}

/// A redelivery asked for while the delivery's attempt is in flight is sent again after that
/// attempt succeeds (both orderings): the attempt's success no longer overwrites the requeue.
/// Before (red team rt12), the success recorded ~100 ms later set the requeued row back to
/// `delivered` and the redelivery, answered `pending`, never went out.
#[tokio::test]
async fn a_redelivery_asked_for_while_its_attempt_is_in_flight_is_sent_after_it() {
    let app = app().await;
    for ordering in ["row", "strict"] {
        let f = app.fixture().await;
        let rx = Receiver::start().await;
        rx.hold();
        let hook = register(
            &app,
            &f,
            json!({ "url": rx.url, "events": ["row.inserted"], "ordering": ordering }),
        )
        .await;
        let wh = hook["webhook"]["id"].as_str().unwrap().to_string();
        app.rows(
            &f.admin,
            &f.project,
            "CREATE TABLE t (x int); INSERT INTO t VALUES (1)",
        )
        .await;
        rx.wait_held(1).await;
        let b = deliveries_until(&app, &f, &format!("webhookId={wh}"), |b| {
            b["deliveries"].as_array().unwrap().len() == 1
        })
        .await;
        let id = b["deliveries"][0]["id"].as_str().unwrap().to_string();
        redeliver(&app, &f, &id).await;
        // The attempt in flight succeeds after the redelivery was asked for.
        rx.release_with(200);
        let got = rx.wait_for(2).await;
        assert_eq!(
            got[1].headers["webhook-id"], got[0].headers["webhook-id"],
            "{ordering}"
        );
        assert_eq!(
            got[1].headers["webhook-id"].to_str().unwrap(),
            id,
            "{ordering}"
        );
        let filter = format!("webhookId={wh}&status=delivered");
        deliveries_until(&app, &f, &filter, |b| {
            b["deliveries"].as_array().unwrap().len() == 1
        })
        .await;
    }
}

#[tokio::test]
async fn a_failed_delivery_can_be_redelivered_and_webhooks_can_be_updated_and_deleted() {
    let app = app().await;
    let f = app.fixture().await;
    let (rx, wh) =
        run_for_a_gone_receiver(&app, &f, "CREATE TABLE t (x int); INSERT INTO t VALUES (1)").await;
    let delivery = failed_delivery(&app, &f, &wh).await;
    assert_eq!(delivery["responseStatus"], 410);
    assert_eq!(delivery["attempts"], 1);
    // The owner fixes the endpoint, enables the webhook again and asks for the delivery again.
    let b = enable(&app, &f, &wh).await;
    assert_eq!(b["webhook"]["disabledReason"], Value::Null);
    redeliver(&app, &f, delivery["id"].as_str().unwrap()).await;
    let got = rx.wait_for(2).await;
    assert_eq!(got[1].headers["webhook-id"], got[0].headers["webhook-id"]);
    let filter = format!("webhookId={wh}&status=delivered");
    let b = deliveries_until(&app, &f, &filter, |b| {
        b["deliveries"].as_array().unwrap().len() == 1
    })
    .await;
    assert_eq!(b["deliveries"][0]["id"], delivery["id"]);
    let (status, b) = app
        .call("PATCH", "/api/webhooks", Some(&f.admin), Some(json!({ "projectId": f.project, "webhookId": wh, "events": ["row.deleted"], "enabled": false })))
        .await;
    assert_eq!(status, 200, "{b}");
    assert_eq!(b["webhook"]["events"], json!(["row.deleted"]));
    assert_eq!(b["webhook"]["enabled"], false);
    let (status, _) = app
        .call(
            "DELETE",
            &format!("/api/webhooks?projectId={}&webhookId={wh}", f.project),
            Some(&f.admin),
            None,
        )
        .await;
    assert_eq!(status, 200);
    let (_, b) = app
        .call(
            "GET",
            &format!("/api/webhooks?projectId={}", f.project),
            Some(&f.admin),
            None,
        )
        .await;
    assert_eq!(b["webhooks"], json!([]));
}

/// The project tables of [`after_kill_9_every_change_of_a_random_workload_is_delivered_at_least_once`]:
/// `w`, whose every write takes a fresh change number `s` from a sequence, so that each committed
/// change is one (operation, `s`): the `s` of the new row, or of the deleted one; `audit`, where
/// a trigger records each change of `w` with its old and new rows, in the change's own
/// transaction (so exactly the committed ones); `done`, for the sentinel. The workload commits
/// every 20 operations, rolls back one transaction in ten and some subtransactions, and halfway
/// waits for the advisory lock 1604 (the test's gate).
const KILL9_SCHEMA: &str = "
    CREATE SEQUENCE change_no;
    CREATE TABLE w (id int PRIMARY KEY, v int, note text, s int NOT NULL DEFAULT nextval('change_no'));
    CREATE TABLE done (id int);
    CREATE TABLE audit (op text NOT NULL, s int NOT NULL, old jsonb, new jsonb);
    CREATE FUNCTION audit_change() RETURNS trigger LANGUAGE plpgsql AS $$
    BEGIN
      IF TG_OP = 'DELETE' THEN INSERT INTO audit VALUES ('row.deleted', OLD.s, to_jsonb(OLD), NULL);
      ELSIF TG_OP = 'UPDATE' THEN INSERT INTO audit VALUES ('row.updated', NEW.s, to_jsonb(OLD), to_jsonb(NEW));
      ELSE INSERT INTO audit VALUES ('row.inserted', NEW.s, NULL, to_jsonb(NEW));
      END IF;
      RETURN NULL;
    END $$;
    CREATE TRIGGER w_audit AFTER INSERT OR UPDATE OR DELETE ON w
      FOR EACH ROW EXECUTE FUNCTION audit_change();
    CREATE PROCEDURE workload(total int, seed float8) LANGUAGE plpgsql AS $$
    DECLARE i int := 0; k int; op float8;
    BEGIN
      PERFORM setseed(seed);
      WHILE i < total LOOP
        k := floor(random() * 300); op := random();
        IF op < 0.5 THEN
          INSERT INTO w (id, v, note) VALUES (k, i, md5(i::text))
            ON CONFLICT (id) DO UPDATE SET v = excluded.v, s = excluded.s;
        ELSIF op < 0.8 THEN
          UPDATE w SET v = v + 1, note = md5(random()::text), s = nextval('change_no') WHERE id = k;
        ELSIF op < 0.97 THEN
          DELETE FROM w WHERE id = k;
        ELSE
          BEGIN
            UPDATE w SET v = -1, s = nextval('change_no') WHERE id = k;
            INSERT INTO w (id, v, note) VALUES (1000 + k, -1, 'rolled back');
            RAISE EXCEPTION 'undo';
          EXCEPTION WHEN raise_exception THEN NULL;
          END;
        END IF;
        i := i + 1;
        IF i % 20 = 0 THEN
          IF random() < 0.1 THEN ROLLBACK; ELSE COMMIT; END IF;
        END IF;
        IF i = total / 2 THEN
          PERFORM pg_advisory_lock(1604);
          PERFORM pg_advisory_unlock(1604);
        END IF;
      END LOOP;
      COMMIT;
    END $$";

/// The `count(*)` a query answers.
async fn count(
    client: &tokio_postgres::Client,
    query: &str,
    params: &[&(dyn tokio_postgres::types::ToSql + Sync)],
) -> i64 {
    client.query_one(query, params).await.unwrap().get(0)
}

/// A webhook's deliveries in the outbox: pending, failed, all.
const PENDING: &str =
    "SELECT count(*) FROM fluxbase.webhook_deliveries WHERE webhook_id = $1 AND status = 'pending'";
const FAILED: &str =
    "SELECT count(*) FROM fluxbase.webhook_deliveries WHERE webhook_id = $1 AND status = 'failed'";
const STORED: &str = "SELECT count(*) FROM fluxbase.webhook_deliveries WHERE webhook_id = $1";

/// One change of `w`: its event type and change number (see [`KILL9_SCHEMA`]).
type ChangeKey = (String, i64);

/// `kill -9` of a real server process at a moment it is made to have work in every stage: a
/// delivery in flight (the receiver holds its request unanswered, and the outbox row shows no
/// outcome), others pending in the outbox, and committed changes not yet stored (the workload's
/// second half, committed while the server is frozen). After a restart, every change a
/// randomized 10,000-operation workload committed (read back from an audit table its
/// transactions wrote) is delivered at least once with its exact old and new rows, nothing that
/// was rolled back is, each change keeps one delivery id across duplicates, and replaying the
/// deliveries rebuilds the table.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn after_kill_9_every_change_of_a_random_workload_is_delivered_at_least_once() {
    kill_9_mid_run("strict").await;
}

/// The same under the `row` ordering (the default): other rows' deliveries go on while one is
/// held, so more are in flight and unrecorded at the kill.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn after_kill_9_under_row_ordering_every_change_is_delivered_with_stable_ids() {
    kill_9_mid_run("row").await;
}

/// The run of the two tests above; `ordering`: the webhook's.
async fn kill_9_mid_run(ordering: &str) {
    let mut server = ServerProcess::start(&[
        ("FLUXBASE_WEBHOOK_ALLOW_PRIVATE", "true"),
        ("FLUXBASE_WEBHOOK_BACKOFF_SCALE", "0.01"),
    ])
    .await;
    let p = project(&server.base).await;
    let pg = crate::support::pg().await;
    let db = format!("fx_{}", p.project);
    let control = pg.client(server.control_database()).await;
    let rx = Receiver::start().await;
    // The first 300 deliveries are answered; the next one is held.
    for _ in 0..300 {
        rx.answer(200, None);
    }
    rx.hold();
    let (status, hook) = call(
        &server.base,
        "POST",
        "/api/webhooks",
        Some(&p.admin),
        json!({ "projectId": p.project, "url": rx.url, "tables": ["w", "done"],
                "events": ["row.inserted", "row.updated", "row.deleted"], "ordering": ordering }),
    )
    .await;
    assert_eq!(status, 201, "{hook}");
    let webhook_id = hook["webhook"]["id"].as_str().unwrap().to_string();
    sql(&server.base, &p.admin, &p.project, KILL9_SCHEMA).await;
    // The gate: the workload's second half waits until this session lets go of the lock.
    let gate = pg.client(&db).await;
    gate.batch_execute("SELECT pg_advisory_lock(1604)")
        .await
        .unwrap();
    let workload = {
        let client = pg.client(&db).await;
        tokio::spawn(async move {
            client
                .batch_execute("CALL workload(10000, 0.7)")
                .await
                .unwrap()
        })
    };

    // A delivery in flight: its request held by the receiver, the server frozen (SIGSTOP)
    // while it waits for the answer. Its egress timeout (10 s) may have ended that attempt
    // before the freeze; then the retry is held instead.
    let mut holds = 0;
    let held = loop {
        holds += 1;
        let (index, held) = rx.wait_held(holds).await;
        let id = held.delivery_id().to_string();
        // Others pending behind it (the first half's changes keep being stored meanwhile).
        poll::until(
            Duration::from_secs(60),
            Duration::from_millis(20),
            || async {
                let pending = count(&control, PENDING, &[&webhook_id]).await;
                if pending > 1 {
                    Ok(())
                } else {
                    Err(format!("{pending} deliveries pending"))
                }
            },
        )
        .await;
        server.pause();
        let row = control
            .query_one(
                "SELECT status, attempts FROM fluxbase.webhook_deliveries WHERE id = $1",
                &[&id],
            )
            .await
            .unwrap();
        let (status, attempts): (String, i32) = (row.get(0), row.get(1));
        // Strict: nothing after it either (under `row`, other rows' deliveries go on).
        let later = rx.got.lock().unwrap().len() - index - 1;
        if (status.as_str(), attempts) == ("pending", 0) && (later == 0 || ordering == "row") {
            break id;
        }
        assert!(
            holds < 5,
            "no held attempt was still without an outcome once the server was frozen \
             (the last: {status}, {attempts} attempts, {later} requests after it)"
        );
        rx.hold();
        server.resume();
    };
    let pending = count(&control, PENDING, &[&webhook_id]).await;
    assert!(pending > 1, "{pending} deliveries pending at the kill");
    // Committed changes not yet stored: the second half, while the server is frozen.
    gate.batch_execute("SELECT pg_advisory_unlock(1604)")
        .await
        .unwrap();
    tokio::time::timeout(Duration::from_secs(300), workload)
        .await
        .expect("the workload did not finish")
        .unwrap();
    let project_db = pg.client(&db).await;
    let committed = count(&project_db, "SELECT count(*) FROM audit", &[]).await;
    let stored = count(&control, STORED, &[&webhook_id]).await;
    assert!(
        stored < committed,
        "{stored} deliveries stored of {committed} committed changes"
    );
    server.kill9();
    let row = control
        .query_one(
            "SELECT status, attempts FROM fluxbase.webhook_deliveries WHERE id = $1",
            &[&held],
        )
        .await
        .unwrap();
    assert_eq!(
        (row.get::<_, String>(0).as_str(), row.get::<_, i32>(1)),
        ("pending", 0),
        "the held attempt got an outcome"
    );
    rx.release();
    eprintln!("killed with delivery {held} in flight, {pending} pending, {stored} stored of {committed} committed changes");

    server.restart().await;
    // Sentinel: a change committed after the whole workload. The outbox stores transactions in
    // commit order, so once its delivery arrived every change before it is stored; then no
    // pending delivery left means each was received (a delivery is recorded after its answer).
    sql(
        &server.base,
        &p.admin,
        &p.project,
        "INSERT INTO done VALUES (1)",
    )
    .await;
    let sentinel = |r: &Received| r.body.contains("\"table_id\":\"done\"");
    poll::until(
        Duration::from_secs(240),
        Duration::from_millis(250),
        || async {
            let n = rx.got.lock().unwrap().len();
            if !rx.got.lock().unwrap().iter().any(sentinel) {
                return Err(format!("the sentinel never arrived ({n} received)"));
            }
            let failed = count(&control, FAILED, &[&webhook_id]).await;
            assert_eq!(failed, 0, "deliveries failed");
            let pending = count(&control, PENDING, &[&webhook_id]).await;
            if pending == 0 {
                Ok(())
            } else {
                Err(format!("{pending} deliveries still pending ({n} received)"))
            }
        },
    )
    .await;
    drop(server);

    // Expected: every committed change, as the audit table recorded it.
    let mut expected: BTreeMap<ChangeKey, (Value, Value)> = BTreeMap::new();
    for r in project_db
        .query("SELECT op, s::int8, coalesce(old::text, 'null'), coalesce(new::text, 'null') FROM audit", &[])
        .await
        .unwrap()
    {
        let rows = (
            serde_json::from_str(r.get(2)).unwrap(),
            serde_json::from_str(r.get(3)).unwrap(),
        );
        let key = (r.get::<_, String>(0), r.get::<_, i64>(1));
        assert!(expected.insert(key.clone(), rows).is_none(), "two changes {key:?}");
    }
    assert_eq!(expected.len() as i64, committed);

    // Delivered: each request's change, its old and new rows, and its delivery id.
    let got = rx.got.lock().unwrap().clone();
    let requests: Vec<&Received> = got.iter().filter(|r| !sentinel(r)).collect();
    let mut delivered: BTreeMap<ChangeKey, (Value, Value)> = BTreeMap::new();
    let mut delivery_of: BTreeMap<ChangeKey, String> = BTreeMap::new();
    let mut by_event: BTreeMap<String, Value> = BTreeMap::new();
    for r in &requests {
        let v: Value = serde_json::from_str(&r.body).unwrap();
        let event_type = v["event_type"].as_str().unwrap().to_string();
        let (old, new) = (v["data"]["old"].clone(), v["data"]["new"].clone());
        let s = if event_type == "row.deleted" {
            &old["s"]
        } else {
            &new["s"]
        };
        let key = (event_type, s.as_i64().unwrap());
        if let Some(prev) = by_event.insert(v["event_id"].as_str().unwrap().to_string(), v.clone())
        {
            assert_eq!(prev, v, "a repeated delivery changed its body");
        }
        if let Some(prev) = delivered.insert(key.clone(), (old, new)) {
            assert_eq!(
                prev, delivered[&key],
                "{key:?} was delivered with two bodies"
            );
        }
        let id = delivery_of
            .entry(key.clone())
            .or_insert_with(|| r.delivery_id().to_string());
        assert_eq!(id, r.delivery_id(), "{key:?} came under two delivery ids");
    }
    let missing: Vec<&ChangeKey> = expected
        .keys()
        .filter(|k| !delivered.contains_key(*k))
        .collect();
    let invented: Vec<&ChangeKey> = delivered
        .keys()
        .filter(|k| !expected.contains_key(*k))
        .collect();
    assert!(
        missing.is_empty(),
        "{} committed changes never delivered, e.g. {:?}",
        missing.len(),
        &missing[..missing.len().min(5)]
    );
    assert!(
        invented.is_empty(),
        "{} changes delivered that were never committed, e.g. {:?}",
        invented.len(),
        &invented[..invented.len().min(5)]
    );
    for (key, rows) in &expected {
        assert_eq!(
            &delivered[key], rows,
            "{key:?} was delivered with other rows"
        );
    }
    let duplicates = requests.len() - delivered.len();
    assert!(
        requests.iter().filter(|r| r.delivery_id() == held).count() >= 2,
        "the delivery in flight at the kill was not sent again"
    );
    eprintln!(
        "{} committed changes, {} requests, {duplicates} duplicates",
        expected.len(),
        requests.len()
    );

    // Replay in commit order (event ids sort so) rebuilds the table.
    let mut rows = BTreeMap::new();
    for v in by_event.values() {
        match v["event_type"].as_str().unwrap() {
            "row.deleted" => {
                rows.remove(&v["data"]["old"]["id"].as_i64().unwrap());
            }
            _ => {
                rows.insert(
                    v["data"]["new"]["id"].as_i64().unwrap(),
                    v["data"]["new"].clone(),
                );
            }
        }
    }
    let table: Vec<Value> = project_db
        .query("SELECT to_jsonb(w)::text FROM w ORDER BY id", &[])
        .await
        .unwrap()
        .iter()
        .map(|r| serde_json::from_str(r.get::<_, &str>(0)).unwrap())
        .collect();
    let rebuilt: Vec<Value> = rows.into_values().collect();
    assert!(rebuilt == table, "the deliveries do not rebuild the table");
}

#[tokio::test]
async fn new_and_redelivered_deliveries_go_out_without_waiting_for_the_periodic_scan() {
    // The worker looks for due deliveries once an hour here (once at start-up, before the
    // webhook exists): everything below must reach the receiver through the outbox writer's
    // and the API's own wake-ups, or not within the test's 20 s.
    let app = spawn_app_with(|c| {
        c.webhook_allow_private = true;
        c.webhook_backoff_scale = 0.01;
        c.webhook_scan_ms = 3_600_000;
    })
    .await;
    let f = app.fixture().await;
    // Two deliveries in one transaction: the first is answered 410, which disables the
    // webhook and leaves the second pending.
    let (rx, wh) = run_for_a_gone_receiver(
        &app,
        &f,
        "CREATE TABLE t (x int); INSERT INTO t VALUES (1), (2)",
    )
    .await;
    let x_of =
        |r: &Received| serde_json::from_str::<Value>(&r.body).unwrap()["data"]["new"]["x"].clone();
    let got = rx.wait_for(1).await;
    assert_eq!(x_of(&got[0]), 1);
    let first_id = got[0].headers["webhook-id"].to_str().unwrap().to_string();
    failed_delivery(&app, &f, &wh).await;
    // Enabling it again sends what was left pending, at once.
    enable(&app, &f, &wh).await;
    let got = rx.wait_for(2).await;
    assert_eq!(x_of(&got[1]), 2);
    // A redelivery goes out at once, with its id.
    redeliver(&app, &f, &first_id).await;
    let got = rx.wait_for(3).await;
    assert_eq!(got[2].headers["webhook-id"], first_id.as_str());
    assert_eq!(x_of(&got[2]), 1);
    // And a new change goes out as it is stored.
    app.rows(&f.admin, &f.project, "INSERT INTO t VALUES (3)")
        .await;
    let got = rx.wait_for(4).await;
    assert_eq!(x_of(&got[3]), 3);
    // Nothing was sent twice: a sentinel, stored after everything above and sent after
    // anything still due, comes next.
    app.rows(&f.admin, &f.project, "INSERT INTO t VALUES (4)")
        .await;
    let got: Vec<Value> = rx.wait_for(5).await.iter().map(x_of).collect();
    assert_eq!(got, [1, 2, 1, 3, 4].map(Value::from).to_vec());
}

#[tokio::test]
async fn transactions_queued_while_the_outbox_is_slow_are_stored_together_and_sent_in_order() {
    let app = app().await;
    let f = app.fixture().await;
    let rx = Receiver::start().await;
    let hook = register(
        &app,
        &f,
        json!({ "url": rx.url, "events": ["row.inserted"] }),
    )
    .await;
    let wh = hook["webhook"]["id"].as_str().unwrap().to_string();
    app.rows(&f.admin, &f.project, "CREATE TABLE t (x int)")
        .await;
    // The outbox table locked: the writer's INSERT for the first transaction waits.
    let mut control = app.app.control.get().await.unwrap();
    let lock = control.transaction().await.unwrap();
    lock.batch_execute("LOCK TABLE fluxbase.webhook_deliveries IN SHARE ROW EXCLUSIVE MODE")
        .await
        .unwrap();
    app.rows(&f.admin, &f.project, "INSERT INTO t VALUES (1)")
        .await;
    let probe = app.app.control.get().await.unwrap();
    poll::until(
        Duration::from_secs(60),
        Duration::from_millis(20),
        || async {
            let waiting: i64 = probe
                .query_one(
                    "SELECT count(*) FROM pg_stat_activity
                     WHERE wait_event_type = 'Lock' AND query LIKE 'INSERT INTO fluxbase.webhook_deliveries%'",
                    &[],
                )
                .await
                .unwrap()
                .get(0);
            if waiting > 0 {
                Ok(())
            } else {
                Err("the outbox writer never waited for the lock".to_string())
            }
        },
    )
    .await;
    // Four more transactions reach the writer's queue meanwhile.
    let before = app.app.cdc.status(&f.project).unwrap().transactions;
    for x in 2..=5 {
        app.rows(&f.admin, &f.project, &format!("INSERT INTO t VALUES ({x})"))
            .await;
    }
    poll::until(
        Duration::from_secs(60),
        Duration::from_millis(20),
        || async {
            let published = app.app.cdc.status(&f.project).unwrap().transactions - before;
            if published >= 4 {
                Ok(())
            } else {
                Err(format!(
                    "the stream published {published} of the 4 transactions"
                ))
            }
        },
    )
    .await;
    lock.commit().await.unwrap();
    let got = rx.wait_for(5).await;
    let xs: Vec<Value> = got
        .iter()
        .map(|r| serde_json::from_str::<Value>(&r.body).unwrap()["data"]["new"]["x"].clone())
        .collect();
    assert_eq!(xs, [1, 2, 3, 4, 5].map(Value::from).to_vec());
    // The four queued transactions went into the outbox with one INSERT (one transaction, so
    // one `created_at`); the first, alone, before them.
    let rows = probe
        .query(
            "SELECT created_at FROM fluxbase.webhook_deliveries WHERE webhook_id = $1
             ORDER BY event_id",
            &[&wh],
        )
        .await
        .unwrap();
    let at: Vec<chrono::DateTime<chrono::Utc>> = rows.iter().map(|r| r.get(0)).collect();
    assert_eq!(at.len(), 5);
    assert!(at[0] < at[1], "{at:?}");
    assert!(at[1..].iter().all(|t| *t == at[1]), "{at:?}");
}

/// A hook URL is often a credential (a Slack or Discord hook, a token in the query): callers who may not
/// manage webhooks see only where it goes, and no receiver's answer; managers see everything.
#[tokio::test]
async fn callers_who_may_not_manage_webhooks_see_no_hook_credentials() {
    let app = app().await;
    let f = app.fixture().await;
    let rx = Receiver::start().await; // answers 200 "ok"
    let port = rx
        .url
        .split(':')
        .nth(2)
        .unwrap()
        .split('/')
        .next()
        .unwrap()
        .to_string();
    // (Credentials in the URL itself are refused at registration.)
    let secret_url = format!(
        "{}/services/T0/B0/XXXX?token=s3cr3t",
        rx.url.trim_end_matches('/')
    );
    register(
        &app,
        &f,
        json!({ "url": secret_url, "events": ["row.inserted"] }),
    )
    .await;
    app.rows(
        &f.admin,
        &f.project,
        "CREATE TABLE t (id int); INSERT INTO t VALUES (1)",
    )
    .await;
    deliveries_until(&app, &f, "status=delivered", |b| {
        b["deliveries"][0]["responseBody"] == "ok"
    })
    .await;
    let (viewer, _) = app.member(&f.project, "viewer").await;
    let (developer, _) = app.member(&f.project, "developer").await;
    for (who, token, full) in [
        ("read key", &f.read, false),
        ("readwrite key", &f.readwrite, false),
        ("viewer", &viewer, false),
        ("developer", &developer, true),
        ("admin key", &f.admin, true),
    ] {
        let (status, list) = app
            .call(
                "GET",
                &format!("/api/webhooks?projectId={}", f.project),
                Some(token),
                None,
            )
            .await;
        assert_eq!(status, 200, "{who}: {list}");
        let url = list["webhooks"][0]["url"].as_str().unwrap();
        let (_, deliveries) = app
            .call(
                "GET",
                &format!("/api/webhooks/deliveries?projectId={}", f.project),
                Some(token),
                None,
            )
            .await;
        let body = &deliveries["deliveries"][0]["responseBody"];
        if full {
            assert_eq!(url, secret_url, "{who}");
            assert_eq!(body, "ok", "{who}: {deliveries}");
        } else {
            assert_eq!(url, format!("http://127.0.0.1:{port}/…"), "{who}");
            assert!(body.is_null(), "{who}: {deliveries}");
            assert_eq!(deliveries["deliveries"][0]["status"], "delivered", "{who}");
        }
    }
}

/// A webhook of the project's inserts to `url`, and its table `big (id, v)`: the webhook's id.
async fn hooked_big_table(app: &TestApp, f: &Fixture, url: &str) -> String {
    let hook = register(app, f, json!({ "url": url, "events": ["row.inserted"] })).await;
    app.rows(
        &f.admin,
        &f.project,
        "CREATE TABLE big (id int PRIMARY KEY, v text)",
    )
    .await;
    hook["webhook"]["id"].as_str().unwrap().to_string()
}

/// Inserts rows `1..=n` of ≈ 1.9 MB into the project's `big (id, v)` in one transaction.
async fn large_rows(app: &TestApp, f: &Fixture, n: usize) {
    let sql =
        format!("INSERT INTO big SELECT g, repeat('a', 1900000) FROM generate_series(1, {n}) g");
    app.rows(&f.admin, &f.project, &sql).await;
}

/// Projects take turns at the large-body budget (`webhook_large_body_memory_mb`): another
/// project's large delivery gets the first room that frees, not a place behind one project's
/// whole backlog. Project A's receiver holds every request; its first large bodies take the
/// whole budget (8 MiB here) and twenty more wait for room. Project B then commits one large
/// row. When A's held requests are answered, B's body is sent next; with a first-come queue A's
/// waiting bodies took the freed room (and were held again) and B's never went (red team rt11:
/// 117 s, minutes with more of A's webhooks).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn another_projects_large_delivery_is_not_queued_behind_a_backlog_of_large_bodies() {
    let app = spawn_app_with(|c| {
        c.webhook_allow_private = true;
        c.webhook_large_body_memory_mb = 8;
        // A's answered attempts are retried after minutes, not during the test.
        c.webhook_backoff_scale = 100.0;
    })
    .await;
    let (a, b) = (app.fixture().await, app.fixture().await);
    let (rx_a, rx_b) = (Receiver::start().await, Receiver::start().await);
    for _ in 0..64 {
        rx_a.hold();
    }
    hooked_big_table(&app, &a, &rx_a.url).await;
    hooked_big_table(&app, &b, &rx_b.url).await;
    // 24 bodies of ≈ 1.9 MB: four fit in the budget at once.
    large_rows(&app, &a, 24).await;
    rx_a.wait_held(4).await;
    // Give A's other attempts time to queue for room.
    tokio::time::sleep(Duration::from_millis(500)).await;
    let sent_to_a = rx_a.got.lock().unwrap().len();
    assert!(
        sent_to_a < 24,
        "the budget held back none of A's bodies: {sent_to_a} sent"
    );
    app.rows(
        &b.admin,
        &b.project,
        "INSERT INTO big VALUES (1, repeat('b', 1900000))",
    )
    .await;
    // B's body waits for room (A holds all of it)...
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert!(rx_b.got.lock().unwrap().is_empty(), "B's body found room");
    // ...and gets the first that frees.
    rx_a.release();
    let got = rx_b.wait_for(1).await;
    let body: Value = serde_json::from_str(&got[0].body).unwrap();
    assert_eq!(body["data"]["new"]["v"].as_str().unwrap().len(), 1_900_000);
    rx_a.release();
}

/// `PATCH` of a webhook's URL or `enabled` while its drain is busy: no attempt starts after the
/// change was answered (only those already in flight end). Before, a drain went on with its
/// page of up to 2,048 deliveries to the old URL, or to a disabled or deleted webhook (red team
/// rt11: 172 such requests over 5 s).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_webhook_pointed_elsewhere_or_disabled_mid_drain_gets_no_attempt_started_after_the_change(
) {
    let app = spawn_app_with(|c| {
        c.webhook_allow_private = true;
        c.webhook_max_in_flight = 2;
        c.webhook_backoff_scale = 0.01;
    })
    .await;
    let f = app.fixture().await;
    app.rows(&f.admin, &f.project, "CREATE TABLE t (id int PRIMARY KEY)")
        .await;
    let patch = |hook: String, change: Value| {
        let (app, f) = (&app, &f);
        async move {
            let mut body = json!({ "projectId": f.project, "webhookId": hook });
            for (k, v) in change.as_object().unwrap() {
                body[k] = v.clone();
            }
            let (status, b) = app
                .call("PATCH", "/api/webhooks", Some(&f.admin), Some(body))
                .await;
            assert_eq!(status, 200, "{b}");
        }
    };

    // A webhook of `t`'s inserts to `url`, and rows `ids` inserted: its id.
    let busy = |url: String, ids: (i32, i32)| {
        let (app, f) = (&app, &f);
        async move {
            let hook = register(
                app,
                f,
                json!({ "url": url, "events": ["row.inserted"], "tables": ["t"] }),
            )
            .await;
            let sql = format!(
                "INSERT INTO t SELECT g FROM generate_series({}, {}) g",
                ids.0, ids.1
            );
            app.rows(&f.admin, &f.project, &sql).await;
            hook["webhook"]["id"].as_str().unwrap().to_string()
        }
    };

    // Pointed elsewhere: the two attempts in flight end at the old URL; every later one,
    // their retries included, goes to the new.
    let (old, new) = (Receiver::start().await, Receiver::start().await);
    for _ in 0..100 {
        old.hold();
    }
    let hook = busy(old.url.clone(), (1, 20)).await;
    old.wait_held(2).await;
    patch(hook.clone(), json!({ "url": new.url })).await;
    old.release();
    new.wait_for(20).await;
    assert_eq!(
        old.got.lock().unwrap().len(),
        2,
        "sent to the old URL after the change"
    );

    // Disabled: the attempts in flight end; nothing more starts.
    let (status, b) = app
        .call(
            "DELETE",
            &format!("/api/webhooks?projectId={}&webhookId={hook}", f.project),
            Some(&f.admin),
            None,
        )
        .await;
    assert!(status == 200 || status == 204, "{b}");
    let rx = Receiver::start().await;
    for _ in 0..100 {
        rx.hold();
    }
    let hook = busy(rx.url.clone(), (21, 40)).await;
    rx.wait_held(2).await;
    patch(hook, json!({ "enabled": false })).await;
    rx.release();
    tokio::time::sleep(Duration::from_millis(1500)).await;
    assert_eq!(
        rx.got.lock().unwrap().len(),
        2,
        "sent to a disabled webhook"
    );
    rx.release();
}

/// A `strict` webhook's successes are recorded while its drain goes on, not only at the end of
/// its batch of up to 64: while the receiver holds the fourth request, the first three are
/// listed `delivered`. Before, a whole batch stayed `pending` until its last delivery was
/// answered, and a crash sent every answered one again (red team rt11: minutes of answered
/// large deliveries with a slow receiver).
#[tokio::test]
async fn a_strict_webhooks_successes_are_recorded_while_its_batch_goes_on() {
    let app = app().await;
    let f = app.fixture().await;
    let rx = Receiver::start().await;
    for _ in 0..3 {
        rx.answer(200, None);
    }
    rx.hold();
    let hook = register(
        &app,
        &f,
        json!({ "url": rx.url, "events": ["row.inserted"], "ordering": "strict" }),
    )
    .await;
    let hook = hook["webhook"]["id"].as_str().unwrap().to_string();
    app.rows(
        &f.admin,
        &f.project,
        "CREATE TABLE t (id int PRIMARY KEY); INSERT INTO t SELECT g FROM generate_series(1, 10) g",
    )
    .await;
    rx.wait_held(1).await;
    let listed = deliveries_until(&app, &f, &format!("webhookId={hook}"), |b| {
        b["deliveries"]
            .as_array()
            .is_some_and(|d| d.iter().filter(|d| d["status"] == "delivered").count() == 3)
    })
    .await;
    assert_eq!(
        listed["deliveries"].as_array().unwrap().len(),
        10,
        "{listed}"
    );
    rx.release();
}

/// A large body that waited for room goes where its webhook points when it is sent, not where it
/// pointed when its drain read it: after `PATCH url`, the bodies still waiting for room go to
/// the new URL (only the four already sent end at the old one).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn large_bodies_waiting_for_room_go_where_the_webhook_points_when_they_are_sent() {
    let app = spawn_app_with(|c| {
        c.webhook_allow_private = true;
        c.webhook_large_body_memory_mb = 8;
        c.webhook_backoff_scale = 0.01;
    })
    .await;
    let f = app.fixture().await;
    let (old, new) = (Receiver::start().await, Receiver::start().await);
    for _ in 0..100 {
        old.hold();
    }
    let hook = hooked_big_table(&app, &f, &old.url).await;
    // Ten bodies of ≈ 1.9 MB: four fit in the budget, six wait for room.
    large_rows(&app, &f, 10).await;
    old.wait_held(4).await;
    tokio::time::sleep(Duration::from_millis(300)).await;
    let (status, b) = app
        .call(
            "PATCH",
            "/api/webhooks",
            Some(&f.admin),
            Some(json!({ "projectId": f.project, "webhookId": hook, "url": new.url })),
        )
        .await;
    assert_eq!(status, 200, "{b}");
    old.release();
    new.wait_for(10).await;
    assert_eq!(
        old.got.lock().unwrap().len(),
        4,
        "bodies sent to the old URL after the change"
    );
}

/// A large body (read from the outbox when its attempt starts) answered 500 is read again and
/// sent whole on its retry, under the same `webhook-id`, and recorded with two attempts.
#[tokio::test]
async fn a_large_body_answered_500_is_sent_whole_again_on_its_retry() {
    let app = spawn_app_with(|c| {
        c.webhook_allow_private = true;
        c.webhook_backoff_scale = 0.01;
    })
    .await;
    let f = app.fixture().await;
    let rx = Receiver::start().await;
    rx.answer(500, None);
    let hook = hooked_big_table(&app, &f, &rx.url).await;
    large_rows(&app, &f, 1).await;
    let got = rx.wait_for(2).await;
    assert_eq!(got[0].delivery_id(), got[1].delivery_id());
    assert_eq!(got[0].body, got[1].body);
    let body: Value = serde_json::from_str(&got[1].body).unwrap();
    assert_eq!(body["data"]["new"]["v"].as_str().unwrap().len(), 1_900_000);
    let listed = deliveries_until(&app, &f, &format!("webhookId={hook}"), |b| {
        b["deliveries"][0]["status"] == "delivered"
    })
    .await;
    assert_eq!(listed["deliveries"][0]["attempts"], 2, "{listed}");
}
