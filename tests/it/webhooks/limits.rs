//! One tenant's webhooks cannot starve the others: the machinery's own control pool, drains
//! bounded and shared between projects, and the caps on what a webhook may hold.

use std::time::{Duration, Instant};

use serde_json::{json, Value};

use crate::support::poll;
use crate::support::receiver::{Receiver, TimedReceiver};
use crate::support::{spawn_app_with, Fixture, TestApp};

async fn app_with(tweak: impl FnOnce(&mut fluxbase::config::Config)) -> TestApp {
    spawn_app_with(|c| {
        c.webhook_allow_private = true;
        c.webhook_backoff_scale = 0.01;
        tweak(c);
    })
    .await
}

async fn register(app: &TestApp, f: &Fixture, body: Value) -> (u16, Value) {
    let mut body = body;
    body["projectId"] = json!(f.project);
    app.call("POST", "/api/webhooks", Some(&f.admin), Some(body))
        .await
}

async fn hook(app: &TestApp, f: &Fixture, body: Value) -> String {
    let (status, b) = register(app, f, body).await;
    assert_eq!(status, 201, "{b}");
    b["webhook"]["id"].as_str().unwrap().to_string()
}

/// Tenant A's everyday requests: a login, a bucket list, an execute-sql; each must succeed
/// (the client waits up to 60 s; the API's control pool gives up after 10 s with a 503).
async fn tenant_a_is_served(app: &TestApp, a: &Fixture) {
    let (status, body) = app
        .call(
            "POST",
            "/api/auth/login",
            None,
            Some(json!({ "email": a.email, "password": "correct horse battery" })),
        )
        .await;
    assert_eq!(status, 200, "login: {body}");
    let path = format!("/api/storage/buckets?projectId={}", a.project);
    let (status, body) = app.call("GET", &path, Some(&a.admin), None).await;
    assert_eq!(status, 200, "bucket list: {body}");
    let rows = app.rows(&a.readwrite, &a.project, "SELECT 1 AS one").await;
    assert_eq!(rows, vec![json!({ "one": 1 })]);
}

/// Backends of this server's control database waiting for a lock on the outbox table.
async fn waiting_on_outbox(watcher: &deadpool_postgres::Client) -> i64 {
    watcher
        .query_one(
            "SELECT count(*) FROM pg_locks l
             WHERE NOT l.granted AND l.relation = 'fluxbase.webhook_deliveries'::regclass
               AND l.database = (SELECT oid FROM pg_database WHERE datname = current_database())",
            &[],
        )
        .await
        .unwrap()
        .get(0)
}

/// Tenant E's webhooks stuck on the control database (every outbox write waits on a lock,
/// standing in for a flood of deliveries the database cannot keep up with) hold only the
/// webhook machinery's connections: tenant A logs in, lists buckets and runs SQL meanwhile.
/// Before the machinery had its own pool, twelve stuck drains held all eight of the API's
/// connections and each of these answered 503 after 10 s.
#[tokio::test]
async fn webhooks_stuck_on_the_control_database_leave_the_api_its_connections() {
    // Every webhook drains at once: the pool alone must keep them off the API's connections.
    let app = app_with(|c| c.webhook_max_drains_per_project = 16).await;
    let e = app.fixture().await;
    let a = app.fixture().await;
    let rx = Receiver::start().await;
    const HOOKS: usize = 12;
    for _ in 0..HOOKS {
        rx.hold();
    }
    for _ in 0..HOOKS {
        hook(
            &app,
            &e,
            json!({ "url": rx.url, "events": ["row.inserted"], "ordering": "strict" }),
        )
        .await;
    }
    app.rows(&e.admin, &e.project, "CREATE TABLE wt (v text)")
        .await;
    app.rows(&e.admin, &e.project, "INSERT INTO wt VALUES ('x')")
        .await;
    // Every webhook's first attempt is in flight, held by the receiver.
    rx.wait_held(HOOKS).await;

    let mut locker = app.app.control.get().await.unwrap();
    let watcher = app.app.control.get().await.unwrap();
    let lock = locker.transaction().await.unwrap();
    lock.batch_execute("LOCK TABLE fluxbase.webhook_deliveries IN EXCLUSIVE MODE")
        .await
        .unwrap();
    // The held attempts fail (503): each drain records the failure, and waits on the lock.
    rx.release();
    let stuck = poll::until(
        Duration::from_secs(20),
        Duration::from_millis(50),
        || async {
            let n = waiting_on_outbox(&watcher).await;
            if n >= 4 {
                Ok(n)
            } else {
                let activity: Vec<String> = watcher
                    .query(
                        "SELECT coalesce(wait_event_type, '') || ' ' || coalesce(wait_event, '') || ' ' || state || ' ' || left(query, 80)
                         FROM pg_stat_activity WHERE datname = current_database()",
                        &[],
                    )
                    .await
                    .unwrap()
                    .iter()
                    .map(|r| r.get(0))
                    .collect();
                Err(format!("{n} waiting on the outbox: {activity:#?}"))
            }
        },
    )
    .await;
    // The machinery's own pool (4 by default) is all it may hold.
    assert_eq!(
        stuck, 4,
        "the webhook machinery took more than its own pool"
    );
    for _ in 0..3 {
        tenant_a_is_served(&app, &a).await;
    }
    assert_eq!(waiting_on_outbox(&watcher).await, 4);
    lock.rollback().await.unwrap();
    drop((locker, watcher));
    // Then the failures are recorded, retried, and delivered.
    delivered(&app, &e, HOOKS).await;
}

/// Waits (60 s at most) until `f`'s project lists `n` delivered deliveries.
async fn delivered(app: &TestApp, f: &Fixture, n: usize) {
    poll::until(
        Duration::from_secs(60),
        Duration::from_millis(100),
        || async {
            let path = format!(
                "/api/webhooks/deliveries?projectId={}&status=delivered",
                f.project
            );
            let (_, b) = app.call("GET", &path, Some(&f.admin), None).await;
            let got = b["deliveries"].as_array().map_or(0, Vec::len);
            if got == n {
                Ok(())
            } else {
                Err(format!("{got} of {n} delivered: {b}"))
            }
        },
    )
    .await;
}

/// With every drain slot but one limited to a project, another project's delivery goes out
/// while one project's drains are all held by its receiver: it does not wait for them.
#[tokio::test]
async fn a_projects_held_drains_leave_slots_for_other_projects() {
    let app = app_with(|c| {
        c.webhook_max_drains = 3;
        c.webhook_max_drains_per_project = 2;
    })
    .await;
    let e = app.fixture().await;
    let a = app.fixture().await;
    let rx_e = Receiver::start().await;
    // Two held; a third drain of E would be answered at once (and counted below).
    rx_e.hold();
    rx_e.hold();
    for _ in 0..4 {
        hook(
            &app,
            &e,
            json!({ "url": rx_e.url, "events": ["row.inserted"], "ordering": "strict" }),
        )
        .await;
    }
    app.rows(&e.admin, &e.project, "CREATE TABLE wt (v text)")
        .await;
    app.rows(&e.admin, &e.project, "INSERT INTO wt VALUES ('x')")
        .await;
    rx_e.wait_held(2).await;

    let rx_a = Receiver::start().await;
    hook(
        &app,
        &a,
        json!({ "url": rx_a.url, "events": ["row.inserted"] }),
    )
    .await;
    app.rows(&a.admin, &a.project, "CREATE TABLE t (v text)")
        .await;
    app.rows(&a.admin, &a.project, "INSERT INTO t VALUES ('a')")
        .await;
    let got = rx_a.wait_for(1).await;
    assert!(got[0].body.contains("\"a\""), "{}", got[0].body);
    // E still has exactly its two drains, both held: A did not wait for either, and E did not
    // take a third slot.
    assert_eq!(rx_e.got.lock().unwrap().len(), 2);
    rx_e.release();
    // Then E's other two webhooks get their turn, and the held ones their retries.
    delivered(&app, &e, 4).await;
}

/// A drain whose receiver never answers gives its slot up after its turn's time, not after
/// 512 attempts: with one drain slot, project E's 300 deliveries to a receiver that holds every
/// request, and 64 of them in flight until the 10 s request timeout, project A's delivery
/// arrives once those 64 are settled — before E's drain starts a second round (red team,
/// session 25: 512 attempts at 64 in flight were eight rounds of the timeout, 81 s).
#[tokio::test]
async fn a_drain_against_a_silent_receiver_yields_its_slot_after_its_turn() {
    // E's first round times out after 10 s; a second round would be another 10.
    another_projects_turn_behind_a_silent_receiver("row", 300, 64, 128).await;
}

/// The same for a `strict` webhook, which sends one delivery at a time: its drain gives its
/// slot up between two attempts once its turn's time has passed, not after its batch of 64.
/// With one drain slot, project E's strict webhook to a receiver that holds every request times
/// out its first attempt after 10 s; project A's delivery then goes out before E's second
/// attempt. Before (red team rt12), the turn was checked once per batch: A waited for all ten
/// of E's timeouts (100 s; with 16 such webhooks every slot was held for ≈ 11 minutes).
#[tokio::test]
async fn a_strict_drain_against_a_silent_receiver_yields_its_slot_between_attempts() {
    // E's first attempt times out after 10 s; its second would end 10 s later.
    another_projects_turn_behind_a_silent_receiver("strict", 10, 1, 2).await;
}

/// One drain slot; project E's webhook (`ordering`) has `rows` deliveries to a receiver that
/// holds every request; once `in_flight` of them are held, project A commits a row: its delivery
/// must arrive (within 20 s) with at most `most_to_e` requests sent to E before it.
async fn another_projects_turn_behind_a_silent_receiver(
    ordering: &str,
    rows: usize,
    in_flight: usize,
    most_to_e: usize,
) {
    let app = app_with(|c| {
        c.webhook_max_drains = 1;
        c.webhook_max_drains_per_project = 1;
    })
    .await;
    let e = app.fixture().await;
    let a = app.fixture().await;
    let rx_e = Receiver::start().await;
    for _ in 0..rows {
        rx_e.hold();
    }
    hook(
        &app,
        &e,
        json!({ "url": rx_e.url, "events": ["row.inserted"], "ordering": ordering }),
    )
    .await;
    app.rows(&e.admin, &e.project, "CREATE TABLE wt (id int PRIMARY KEY)")
        .await;
    app.rows(
        &e.admin,
        &e.project,
        &format!("INSERT INTO wt SELECT g FROM generate_series(1, {rows}) g"),
    )
    .await;
    rx_e.wait_held(in_flight).await;

    let rx_a = Receiver::start().await;
    hook(
        &app,
        &a,
        json!({ "url": rx_a.url, "events": ["row.inserted"] }),
    )
    .await;
    app.rows(&a.admin, &a.project, "CREATE TABLE t (v text)")
        .await;
    app.rows(&a.admin, &a.project, "INSERT INTO t VALUES ('a')")
        .await;
    let got = rx_a.wait_for(1).await;
    assert!(got[0].body.contains("\"a\""), "{}", got[0].body);
    let sent_to_e = rx_e.got.lock().unwrap().len();
    assert!(
        sent_to_e <= most_to_e,
        "{ordering}: {sent_to_e} requests to E before A's turn"
    );
    rx_e.release();
}

/// A large backlog (three webhooks × 2,000 rows, one drain slot) is sent in turns: the third
/// webhook's first delivery goes out before the first webhook's backlog is through, and another
/// tenant's API requests succeed while it drains.
#[tokio::test]
async fn a_backlog_is_drained_in_turns_while_other_tenants_are_served() {
    let app = app_with(|c| {
        c.webhook_max_drains = 1;
        c.webhook_max_drains_per_project = 1;
    })
    .await;
    let e = app.fixture().await;
    let a = app.fixture().await;
    // A receiver per webhook, answering at once: when each request arrived tells the turns.
    let mut receivers = Vec::new();
    for _ in 0..3 {
        let rx = TimedReceiver::start(0, u64::MAX).await;
        hook(
            &app,
            &e,
            json!({ "url": rx.url, "events": ["row.inserted"] }),
        )
        .await;
        receivers.push(rx);
    }
    app.rows(
        &e.admin,
        &e.project,
        "CREATE TABLE wt (id serial PRIMARY KEY, v text)",
    )
    .await;
    app.rows(
        &e.admin,
        &e.project,
        "INSERT INTO wt (v) SELECT 'x' FROM generate_series(1, 2000)",
    )
    .await;
    tenant_a_is_served(&app, &a).await;
    poll::until(
        Duration::from_secs(120),
        Duration::from_millis(200),
        || async {
            let n: usize = receivers.iter().map(|r| r.requests().len()).sum();
            if n >= 6000 {
                Ok(())
            } else {
                tenant_a_is_served(&app, &a).await;
                Err(format!("{n} of 6000 arrived"))
            }
        },
    )
    .await;
    let spans: Vec<(Instant, Instant)> = receivers
        .iter()
        .map(|r| {
            let got = r.requests();
            assert_eq!(got.len(), 2000);
            let first = got.iter().map(|t| t.start).min().unwrap();
            let last = got.iter().map(|t| t.start).max().unwrap();
            (first, last)
        })
        .collect();
    // The webhook that went first had not sent its last delivery when the one that went last
    // sent its first: the only slot changed hands before a backlog was through.
    let (_, first_end) = *spans.iter().min().unwrap();
    let last_start = spans.iter().map(|s| s.0).max().unwrap();
    assert!(
        last_start < first_end,
        "one webhook's backlog held the only slot to its end: {spans:?}"
    );
}

/// The caps: webhooks per project (also under concurrent registrations), URL length, events and
/// tables; in the API's error shape.
#[tokio::test]
async fn webhooks_per_project_url_length_events_and_tables_are_capped() {
    let app = app_with(|c| c.webhook_max_per_project = 3).await;
    let f = app.fixture().await;
    let url = "http://127.0.0.1:9/hook";
    let tries =
        (0..6).map(|_| register(&app, &f, json!({ "url": url, "events": ["row.inserted"] })));
    let answers = futures_util::future::join_all(tries).await;
    let created = answers.iter().filter(|(s, _)| *s == 201).count();
    assert_eq!(created, 3, "{answers:?}");
    for (status, body) in answers.iter().filter(|(s, _)| *s != 201) {
        assert_eq!(*status, 403, "{body}");
        assert_eq!(body["success"], false);
        assert_eq!(body["error"]["code"], "INSUFFICIENT_PERMISSIONS", "{body}");
        assert!(body["error"]["message"]
            .as_str()
            .unwrap()
            .contains("webhook_max_per_project"));
    }
    let (_, list) = app
        .call(
            "GET",
            &format!("/api/webhooks?projectId={}", f.project),
            Some(&f.admin),
            None,
        )
        .await;
    assert_eq!(list["webhooks"].as_array().unwrap().len(), 3);
    // Deleting one makes room.
    let id = list["webhooks"][0]["id"].as_str().unwrap().to_string();
    let path = format!("/api/webhooks?projectId={}&webhookId={id}", f.project);
    let (status, b) = app.call("DELETE", &path, Some(&f.admin), None).await;
    assert_eq!(status, 200, "{b}");
    hook(&app, &f, json!({ "url": url, "events": ["row.inserted"] })).await;

    // Another project has its own quota; there, the shapes of what one webhook may hold.
    let g = app.fixture().await;
    let at_most = format!("http://127.0.0.1:9/{}", "a".repeat(2048 - 19));
    assert_eq!(at_most.len(), 2048);
    let ok = hook(
        &app,
        &g,
        json!({ "url": at_most, "events": ["row.inserted"] }),
    )
    .await;
    let too_long = format!("{at_most}a");
    let bad = [
        (
            json!({ "url": too_long, "events": ["row.inserted"] }),
            "url",
        ),
        (
            json!({ "url": "http://127.0.0.1:9/".to_string() + &"a".repeat(100_000), "events": ["row.inserted"] }),
            "url",
        ),
        (
            json!({ "url": url, "events": vec!["row.inserted"; 5] }),
            "events",
        ),
        (
            json!({ "url": url, "events": ["row.inserted"], "tables": vec!["t"; 101] }),
            "tables",
        ),
        (
            json!({ "url": url, "events": ["row.inserted"], "tables": ["a".repeat(257)] }),
            "tables",
        ),
        (
            json!({ "url": url, "events": ["row.inserted"], "tables": [""] }),
            "tables",
        ),
    ];
    for (body, field) in bad {
        let (status, b) = register(&app, &g, body).await;
        assert_eq!(status, 400, "{b}");
        assert_eq!(b["error"]["code"], "BAD_REQUEST", "{b}");
        assert!(
            b["error"]["message"].as_str().unwrap().starts_with(field),
            "{b}"
        );
    }
    let patch = |body: Value| {
        let mut body = body;
        body["projectId"] = json!(g.project);
        body["webhookId"] = json!(ok);
        app.call("PATCH", "/api/webhooks", Some(&g.admin), Some(body))
    };
    let (status, b) = patch(json!({ "url": too_long })).await;
    assert_eq!(
        (status, b["error"]["code"].clone()),
        (400, json!("BAD_REQUEST")),
        "{b}"
    );
    let (status, b) = patch(json!({ "tables": vec!["t"; 101] })).await;
    assert_eq!(status, 400, "{b}");
    let (status, b) = patch(json!({ "events": vec!["row.inserted"; 5] })).await;
    assert_eq!(status, 400, "{b}");
    let (status, b) = patch(json!({ "tables": vec!["t"; 100] })).await;
    assert_eq!(status, 200, "{b}");
}

/// The delivery log filtered on another project's webhook answers 404, as every webhook route
/// does for a webhook the project does not have.
#[tokio::test]
async fn deliveries_of_another_projects_webhook_are_not_found() {
    let app = app_with(|_| {}).await;
    let f = app.fixture().await;
    let g = app.fixture().await;
    let theirs = hook(
        &app,
        &g,
        json!({ "url": "http://127.0.0.1:9/", "events": ["row.inserted"] }),
    )
    .await;
    let mine = hook(
        &app,
        &f,
        json!({ "url": "http://127.0.0.1:9/", "events": ["row.inserted"] }),
    )
    .await;
    for id in [theirs.as_str(), "wh_nope"] {
        let path = format!(
            "/api/webhooks/deliveries?projectId={}&webhookId={id}",
            f.project
        );
        let (status, b) = app.call("GET", &path, Some(&f.admin), None).await;
        assert_eq!(status, 404, "{b}");
        assert_eq!(b["error"]["code"], "NOT_FOUND", "{b}");
        // The same answer as the other routes give for it.
        let (status2, b2) = app
            .call(
                "PATCH",
                "/api/webhooks",
                Some(&f.admin),
                Some(json!({ "projectId": f.project, "webhookId": id, "enabled": false })),
            )
            .await;
        assert_eq!((status2, &b2["error"]["code"]), (404, &json!("NOT_FOUND")));
    }
    let path = format!(
        "/api/webhooks/deliveries?projectId={}&webhookId={mine}",
        f.project
    );
    let (status, b) = app.call("GET", &path, Some(&f.admin), None).await;
    assert_eq!(status, 200, "{b}");
    assert_eq!(b["deliveries"], json!([]));
}
