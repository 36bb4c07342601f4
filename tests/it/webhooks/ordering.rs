//! Webhook ordering through the real server: `row` (the default) sends deliveries of different
//! rows concurrently but never two of one row at once, each row's in commit order, and a schema
//! change alone; `strict` sends one at a time. The receiver answers slowly, at random, and
//! sometimes 500, so retries are part of every run; it records when each request began and
//! ended. Nothing here is timed: only the order of the receiver's own instants is compared.

use std::collections::{BTreeMap, BTreeSet};
use std::time::Duration;

use serde_json::{json, Value};

use crate::support::poll;
use crate::support::receiver::{Timed, TimedReceiver};
use crate::support::{spawn_webhook_app, Fixture, TestApp};

const EVENTS: [&str; 4] = [
    "row.inserted",
    "row.updated",
    "row.deleted",
    "schema.changed",
];

async fn register(app: &TestApp, f: &Fixture, url: &str, ordering: Option<&str>) -> Value {
    let mut body = json!({ "projectId": f.project, "url": url, "events": EVENTS, "tables": ["t"] });
    if let Some(o) = ordering {
        body["ordering"] = json!(o);
    }
    let (status, b) = app
        .call("POST", "/api/webhooks", Some(&f.admin), Some(body))
        .await;
    assert_eq!(status, 201, "{b}");
    b["webhook"].clone()
}

/// Single-statement transactions on `t` (ids 1..=12): inserts, updates, deletes, an update
/// that changes a row's key, and two schema changes in the middle. The statements, in order.
async fn workload(app: &TestApp, f: &Fixture) -> usize {
    let pg = crate::support::pg().await;
    let db = pg.client(&format!("fx_{}", f.project)).await;
    db.batch_execute("CREATE TABLE t (id int PRIMARY KEY, v int NOT NULL DEFAULT 0)")
        .await
        .unwrap();
    // The webhook names `t`: created after the table, so that its schema event is known.
    let _ = app;
    let mut statements = Vec::new();
    let mut present = BTreeSet::new();
    let mut z: u64 = 7;
    for step in 0..360u64 {
        z = z
            .wrapping_mul(6364136223846793005)
            .wrapping_add(1442695040888963407);
        let id = 1 + (z >> 33) % 12;
        let sql = if step == 120 || step == 240 {
            format!("ALTER TABLE t ADD COLUMN c{step} int")
        } else if step == 180 && present.contains(&3) && !present.contains(&103) {
            present.remove(&3);
            present.insert(103);
            "UPDATE t SET id = 103 WHERE id = 3".to_string()
        } else if !present.contains(&id) {
            present.insert(id);
            format!("INSERT INTO t (id) VALUES ({id})")
        } else if (z >> 40).is_multiple_of(5) {
            present.remove(&id);
            format!("DELETE FROM t WHERE id = {id}")
        } else {
            format!("UPDATE t SET v = v + 1 WHERE id = {id}")
        };
        statements.push(sql);
    }
    for s in &statements {
        db.batch_execute(s).await.unwrap();
    }
    statements.len()
}

/// Waits until the webhook has no pending delivery and `n` delivered ones.
async fn all_delivered(app: &TestApp, webhook_id: &str, n: usize) {
    let control = app.app.control.get().await.unwrap();
    poll::until(
        Duration::from_secs(120),
        Duration::from_millis(100),
        || async {
            let row = control
                .query_one(
                    "SELECT count(*) FILTER (WHERE status = 'delivered'),
                            count(*) FILTER (WHERE status <> 'delivered')
                     FROM fluxbase.webhook_deliveries WHERE webhook_id = $1",
                    &[&webhook_id],
                )
                .await
                .unwrap();
            let (done, other): (i64, i64) = (row.get(0), row.get(1));
            if done as usize == n && other == 0 {
                Ok(())
            } else {
                Err(format!("{done} of {n} delivered, {other} not"))
            }
        },
    )
    .await
}

/// The row ids a request's change touches (both, for a key change); none for a schema change.
fn rows_of(r: &Timed) -> Vec<i64> {
    let data = &r.body["data"];
    let mut ids: Vec<i64> = [&data["new"]["id"], &data["old"]["id"]]
        .into_iter()
        .filter_map(Value::as_i64)
        .collect();
    ids.dedup();
    ids
}

fn event_id(r: &Timed) -> &str {
    r.body["event_id"].as_str().unwrap()
}

fn is_schema(r: &Timed) -> bool {
    r.body["event_type"] == "schema.changed"
}

/// Every delivery id came with one event (ids are stable across retries), each event under one
/// id, and every event answered 200 at least once: the events, in commit order.
fn check_ids(requests: &[Timed]) -> BTreeMap<String, String> {
    let mut id_of: BTreeMap<String, String> = BTreeMap::new();
    let mut ok: BTreeSet<&str> = BTreeSet::new();
    for r in requests {
        let id = id_of
            .entry(event_id(r).to_string())
            .or_insert_with(|| r.delivery_id.clone());
        assert_eq!(id, &r.delivery_id, "event {} under two ids", event_id(r));
        if r.status == 200 {
            ok.insert(event_id(r));
        }
    }
    assert_eq!(ok.len(), id_of.len(), "an event never answered 200");
    id_of
}

/// The most requests in flight at once.
fn most_in_flight(requests: &[Timed]) -> usize {
    let mut edges: Vec<(std::time::Instant, i32)> = requests
        .iter()
        .flat_map(|r| [(r.start, 1), (r.end, -1)])
        .collect();
    // An end before a start at the same instant.
    edges.sort();
    let (mut now, mut most) = (0i32, 0i32);
    for (_, d) in edges {
        now += d;
        most = most.max(now);
    }
    most as usize
}

#[tokio::test]
async fn row_ordering_keeps_each_rows_order_and_schema_barriers_and_sends_concurrently() {
    let app = spawn_webhook_app().await;
    let f = app.fixture().await;
    let rx = TimedReceiver::start(12, 8).await;
    let hook = register(&app, &f, &rx.url, None).await;
    assert_eq!(hook["ordering"], "row", "{hook}");
    let wh = hook["id"].as_str().unwrap().to_string();
    let n = workload(&app, &f).await;
    // The CREATE TABLE and every statement.
    all_delivered(&app, &wh, n + 1).await;
    let requests = rx.requests();
    let events = check_ids(&requests);
    assert_eq!(events.len(), n + 1);
    assert!(
        requests.iter().any(|r| r.status == 500),
        "no request failed: retries were not exercised"
    );

    // Per row: requests never overlap, and follow commit order (a retry before the next).
    let mut by_row: BTreeMap<i64, Vec<&Timed>> = BTreeMap::new();
    for r in &requests {
        for id in rows_of(r) {
            by_row.entry(id).or_default().push(r);
        }
    }
    assert!(
        by_row.contains_key(&103),
        "the key change was not delivered"
    );
    for (row, mut rs) in by_row {
        rs.sort_by_key(|r| r.start);
        for pair in rs.windows(2) {
            let (a, b) = (pair[0], pair[1]);
            assert!(
                a.end <= b.start,
                "row {row}: {} and {} overlapped",
                event_id(a),
                event_id(b)
            );
            assert!(
                event_id(a) <= event_id(b),
                "row {row}: {} was sent after {}",
                event_id(a),
                event_id(b)
            );
        }
    }

    // A schema change: after every earlier delivery ended, before any later one started.
    let schema: Vec<&str> = events
        .keys()
        .filter(|e| {
            requests
                .iter()
                .any(|r| event_id(r) == e.as_str() && is_schema(r))
        })
        .map(String::as_str)
        .collect();
    assert_eq!(schema.len(), 3, "CREATE TABLE and two ALTER TABLEs");
    for s in schema {
        let own: Vec<&Timed> = requests.iter().filter(|r| event_id(r) == s).collect();
        let first = own.iter().map(|r| r.start).min().unwrap();
        let last = own.iter().map(|r| r.end).max().unwrap();
        for r in &requests {
            if event_id(r) < s {
                assert!(
                    r.end <= first,
                    "{} overlapped schema change {s}",
                    event_id(r)
                );
            } else if event_id(r) > s {
                assert!(
                    r.start >= last,
                    "{} began before schema change {s} ended",
                    event_id(r)
                );
            }
        }
    }

    let most = most_in_flight(&requests);
    let keys: Vec<Option<Vec<String>>> = app
        .app
        .control
        .get()
        .await
        .unwrap()
        .query(
            "SELECT row_keys FROM fluxbase.webhook_deliveries WHERE webhook_id = $1
             ORDER BY event_id LIMIT 5",
            &[&wh],
        )
        .await
        .unwrap()
        .iter()
        .map(|r| r.get(0))
        .collect();
    assert!(
        most > 1,
        "never more than one request in flight (row keys: {keys:?})"
    );
    eprintln!(
        "{} requests for {} events, at most {most} in flight",
        requests.len(),
        n + 1
    );
}

#[tokio::test]
async fn strict_ordering_sends_one_at_a_time_in_commit_order_with_retries() {
    let app = spawn_webhook_app().await;
    let f = app.fixture().await;
    let rx = TimedReceiver::start(3, 6).await;
    let hook = register(&app, &f, &rx.url, Some("strict")).await;
    assert_eq!(hook["ordering"], "strict", "{hook}");
    let wh = hook["id"].as_str().unwrap().to_string();
    let n = workload(&app, &f).await;
    all_delivered(&app, &wh, n + 1).await;
    let mut requests = rx.requests();
    let events = check_ids(&requests);
    assert_eq!(events.len(), n + 1);
    assert!(requests.iter().any(|r| r.status == 500), "no retries");
    requests.sort_by_key(|r| r.start);
    assert_eq!(
        most_in_flight(&requests),
        1,
        "two requests in flight at once"
    );
    // First attempts in commit order; a retry waits for its time and its turn.
    let mut seen = BTreeSet::new();
    let firsts: Vec<&str> = requests
        .iter()
        .filter(|r| seen.insert(event_id(r).to_string()))
        .map(event_id)
        .collect();
    let mut sorted = firsts.clone();
    sorted.sort();
    assert_eq!(firsts, sorted, "first attempts out of commit order");
}

#[tokio::test]
async fn an_unknown_ordering_is_refused_and_the_ordering_can_be_changed() {
    let app = spawn_webhook_app().await;
    let f = app.fixture().await;
    let (status, b) = app
        .call(
            "POST",
            "/api/webhooks",
            Some(&f.admin),
            Some(
                json!({ "projectId": f.project, "url": "http://127.0.0.1:9/h",
                         "events": ["row.inserted"], "ordering": "fifo" }),
            ),
        )
        .await;
    assert_eq!(status, 400, "{b}");
    assert_eq!(b["success"], false, "{b}");
    assert_eq!(b["error"]["code"], "BAD_REQUEST", "{b}");
    assert!(
        b["error"]["message"]
            .as_str()
            .unwrap()
            .contains("ordering: unknown ordering \"fifo\"; expected row, strict"),
        "{b}"
    );
    let hook = register(&app, &f, "http://127.0.0.1:9/h", None).await;
    let wh = hook["id"].as_str().unwrap();
    for (ordering, status) in [("strict", 200), ("row", 200), ("serial", 400)] {
        let (s, b) = app
            .call(
                "PATCH",
                "/api/webhooks",
                Some(&f.admin),
                Some(json!({ "projectId": f.project, "webhookId": wh, "ordering": ordering })),
            )
            .await;
        assert_eq!(s, status, "{b}");
        if status == 200 {
            assert_eq!(b["webhook"]["ordering"], ordering, "{b}");
        }
    }
    let (_, list) = app
        .call(
            "GET",
            &format!("/api/webhooks?projectId={}", f.project),
            Some(&f.admin),
            None,
        )
        .await;
    assert_eq!(list["webhooks"][0]["ordering"], "row", "{list}");
}
