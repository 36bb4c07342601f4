//! Webhooks: real HTTP receivers in the test, the real server, the change stream behind it.

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use serde_json::{json, Value};
use warp::Filter;

use crate::support::poll;
use crate::support::process::{free_port, ChildGuard};
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
        // The guide's Node check, exactly.
        let sig = r.headers["x-fluxbase-signature"].to_str().unwrap();
        assert_eq!(sig, format!("sha256={}", hmac_hex(&secret, &r.body)));
        // Standard Webhooks: v1,<base64 HMAC of id.timestamp.body> with the base64 secret.
        use base64::Engine;
        let b64 = base64::engine::general_purpose::STANDARD;
        let id = r.headers["webhook-id"].to_str().unwrap();
        let ts = r.headers["webhook-timestamp"].to_str().unwrap();
        let key = ring::hmac::Key::new(ring::hmac::HMAC_SHA256, &b64.decode(&secret[6..]).unwrap());
        let expected =
            b64.encode(ring::hmac::sign(&key, format!("{id}.{ts}.{}", r.body).as_bytes()).as_ref());
        assert_eq!(
            r.headers["webhook-signature"].to_str().unwrap(),
            format!("v1,{expected}")
        );
        assert_eq!(r.headers["x-fluxbase-delivery"].to_str().unwrap(), id);
        assert!(id.starts_with("dlv_"));
    }
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
    register(
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
    let gap = got[1].at.duration_since(got[0].at);
    assert!(
        gap >= Duration::from_millis(1900),
        "retried after {gap:?} despite Retry-After: 2"
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
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
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
            assert!(w["disabledReason"].as_str().unwrap().contains("410"));
            break;
        }
        assert!(Instant::now() < deadline);
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
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
    // Reserve a port with nobody listening on it.
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let port = listener.local_addr().unwrap().port();
    drop(listener);
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
    let listener = tokio::net::TcpListener::bind(("127.0.0.1", port))
        .await
        .unwrap();
    tokio::spawn(warp::serve(route).incoming(listener).run());
    let deadline = Instant::now() + Duration::from_secs(30);
    while got.lock().unwrap().len() < 5 {
        assert!(
            Instant::now() < deadline,
            "only {} arrived",
            got.lock().unwrap().len()
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
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

/// `kill -9` of the server while deliveries are pending and changes are not yet stored: after a
/// restart, every change of a randomized 10,000-change workload arrives at least once, and
/// replaying the deliveries rebuilds the table.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn after_kill_9_every_change_of_a_random_workload_is_delivered_at_least_once() {
    use std::process::{Command, Stdio};
    let pg = crate::support::pg().await;
    let dir = crate::support::scratch_dir(&format!(
        "it-{}-{}",
        std::process::id(),
        crate::support::unique("kill9")
    ));
    let port = free_port();
    let base = format!("http://127.0.0.1:{port}");
    let env: Vec<(&str, String)> = vec![
        (
            "FLUXBASE_DATABASE_URL",
            pg.url(&crate::support::unique("ctl")),
        ),
        ("FLUXBASE_DATA_DIR", dir.display().to_string()),
        ("FLUXBASE_LISTEN", format!("127.0.0.1:{port}")),
        ("FLUXBASE_WEBHOOK_ALLOW_PRIVATE", "true".into()),
        ("FLUXBASE_WEBHOOK_BACKOFF_SCALE", "0.01".into()),
        ("FLUXBASE_RATE_LIMIT_REQUESTS", "0".into()),
        ("FLUXBASE_LOG", "warn".into()),
    ];
    let bin = env!("CARGO_BIN_EXE_fluxbase");
    let out = Command::new(bin)
        .args(["init", "--json"])
        .envs(env.clone())
        .current_dir(&dir)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let init: Value = serde_json::from_slice(&out.stdout).unwrap();
    let project = init["project"]["id"].as_str().unwrap().to_string();
    let admin = init["apiKeys"]["admin"].as_str().unwrap().to_string();
    let serve = || {
        ChildGuard(
            Command::new(bin)
                .arg("serve")
                .envs(env.clone())
                .current_dir(&dir)
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .spawn()
                .unwrap(),
        )
    };
    let http = reqwest::Client::new();
    let healthy = |http: reqwest::Client, base: String| async move {
        let deadline = Instant::now() + Duration::from_secs(60);
        while http.get(format!("{base}/health")).send().await.is_err() {
            assert!(Instant::now() < deadline, "server did not start");
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    };
    let mut server = serve();
    healthy(http.clone(), base.clone()).await;
    let api = |path: &str, body: Value| {
        http.post(format!("{base}{path}"))
            .bearer_auth(&admin)
            .json(&body)
            .send()
    };
    let rx = Receiver::start().await;
    let r = api("/api/webhooks", json!({ "projectId": project, "url": rx.url, "events": ["row.inserted", "row.updated", "row.deleted"] })).await.unwrap();
    assert_eq!(r.status(), 201);
    let r: Value = api("/api/execute-sql", json!({ "projectId": project, "query": "
        CREATE TABLE w (id int PRIMARY KEY, v int, note text);
        CREATE TABLE done (id int);
        CREATE PROCEDURE workload(total int, seed float8) LANGUAGE plpgsql AS $$
        DECLARE i int := 0; k int; op float8;
        BEGIN
          PERFORM setseed(seed);
          WHILE i < total LOOP
            k := floor(random() * 300); op := random();
            IF op < 0.5 THEN INSERT INTO w VALUES (k, i, md5(i::text)) ON CONFLICT (id) DO UPDATE SET v = excluded.v;
            ELSIF op < 0.8 THEN UPDATE w SET v = v + 1, note = md5(random()::text) WHERE id = k;
            ELSE DELETE FROM w WHERE id = k; END IF;
            i := i + 1;
            IF i % 20 = 0 THEN COMMIT; END IF;
          END LOOP;
          COMMIT;
        END $$" })).await.unwrap().json().await.unwrap();
    assert_eq!(r["success"], true, "{r}");

    let db = format!("fx_{project}");
    let client = pg.client(&db).await;
    let workload = tokio::spawn(async move {
        client
            .batch_execute("CALL workload(10000, 0.7)")
            .await
            .unwrap()
    });
    // Kill the server in the middle: deliveries pending, changes not yet stored.
    rx.wait_for(300).await;
    assert!(server.kill().is_ok());
    server.wait().unwrap();
    workload.await.unwrap();
    let mut server = serve();
    healthy(http.clone(), base.clone()).await;

    // Sentinel: a change committed after the whole workload. The outbox stores transactions in
    // commit order, so once its delivery arrived every change before it is stored; then no
    // pending delivery left means each was received (a delivery is recorded after its answer).
    let r: Value = api(
        "/api/execute-sql",
        json!({ "projectId": project, "query": "INSERT INTO done VALUES (1)" }),
    )
    .await
    .unwrap()
    .json()
    .await
    .unwrap();
    assert_eq!(r["success"], true, "{r}");
    let sentinel = |r: &Received| r.body.contains("\"table_id\":\"done\"");
    poll::until(
        Duration::from_secs(240),
        Duration::from_millis(250),
        || async {
            let n = rx.got.lock().unwrap().len();
            if !rx.got.lock().unwrap().iter().any(sentinel) {
                return Err(format!("the sentinel never arrived ({n} received)"));
            }
            let pending: Value = http
                .get(format!(
                    "{base}/api/webhooks/deliveries?projectId={project}&status=pending"
                ))
                .bearer_auth(&admin)
                .send()
                .await
                .unwrap()
                .json()
                .await
                .unwrap();
            if pending["deliveries"]
                .as_array()
                .is_some_and(|d| d.is_empty())
            {
                Ok(())
            } else {
                Err(format!(
                    "deliveries still pending ({n} received): {pending}"
                ))
            }
        },
    )
    .await;
    let _ = server.kill();
    let _ = server.wait();

    // Replay: one body per event id (duplicates must be identical), in commit order.
    let mut by_id = std::collections::BTreeMap::new();
    for r in rx.got.lock().unwrap().iter().filter(|r| !sentinel(r)) {
        let v: Value = serde_json::from_str(&r.body).unwrap();
        let id = v["event_id"].as_str().unwrap().to_string();
        if let Some(prev) = by_id.insert(id, v.clone()) {
            assert_eq!(prev, v, "a repeated delivery changed its body");
        }
    }
    let mut rows = std::collections::BTreeMap::new();
    for v in by_id.values() {
        match v["event_type"].as_str().unwrap() {
            "row.inserted" | "row.updated" => {
                rows.insert(
                    v["data"]["new"]["id"].as_i64().unwrap(),
                    v["data"]["new"].clone(),
                );
            }
            "row.deleted" => {
                rows.remove(&v["data"]["old"]["id"].as_i64().unwrap());
            }
            other => panic!("unexpected {other}"),
        }
    }
    assert!(
        by_id.len() > 5000,
        "only {} distinct changes delivered",
        by_id.len()
    );
    let table: Vec<Value> = pg
        .client(&db)
        .await
        .query(
            "SELECT json_build_object('id', id, 'v', v, 'note', note)::text FROM w ORDER BY id",
            &[],
        )
        .await
        .unwrap()
        .iter()
        .map(|r| serde_json::from_str(r.get::<_, &str>(0)).unwrap())
        .collect();
    let rebuilt: Vec<Value> = rows.into_values().collect();
    assert_eq!(rebuilt.len(), table.len());
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
    assert_eq!(got.len(), 4);
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
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
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
            break;
        }
        assert!(Instant::now() < deadline, "the outbox writer never waited");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    // Four more transactions reach the writer's queue meanwhile.
    let before = app.app.cdc.status(&f.project).unwrap().transactions;
    for x in 2..=5 {
        app.rows(&f.admin, &f.project, &format!("INSERT INTO t VALUES ({x})"))
            .await;
    }
    while app.app.cdc.status(&f.project).unwrap().transactions < before + 4 {
        assert!(Instant::now() < deadline, "the stream did not publish them");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
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
