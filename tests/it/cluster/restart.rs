//! Every node restarted: a client resumes with `since` on any node and gets exactly what it
//! missed (the history is JetStream's, not one node's).

use std::sync::atomic::{AtomicBool, AtomicI64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use super::bounded;
use crate::support::fixtures::project;
use crate::support::http::sql;
use crate::support::nodes::Nodes;
use crate::support::pg;
use crate::support::ws::{next, nothing_more, subscribed, Socket};

/// Commits one row per transaction into `audit` straight on the project's database (so it
/// goes on while no node runs) until `stop`; `committed` is the last id committed so far.
/// Returns how many.
fn steady_writer(
    project: &str,
    stop: Arc<AtomicBool>,
    committed: Arc<AtomicI64>,
) -> tokio::task::JoinHandle<i64> {
    let db = format!("fx_{project}");
    tokio::spawn(async move {
        let client = pg().await.client(&db).await;
        let mut i = 0i64;
        while !stop.load(Ordering::Acquire) {
            i += 1;
            client
                .execute("INSERT INTO audit VALUES ($1)", &[&i])
                .await
                .unwrap();
            committed.store(i, Ordering::Release);
            tokio::time::sleep(Duration::from_millis(3)).await;
        }
        i
    })
}

/// Waits until the writer has committed `rows` more rows than it had at the call.
async fn rows_committed(committed: &AtomicI64, rows: i64, what: &str) {
    let from = committed.load(Ordering::Acquire);
    crate::support::poll::until(
        Duration::from_secs(120),
        Duration::from_millis(20),
        || async {
            let now = committed.load(Ordering::Acquire);
            if now >= from + rows {
                Ok(())
            } else {
                Err(format!(
                    "the writer committed only {} of {rows} rows {what}",
                    now - from
                ))
            }
        },
    )
    .await
}

/// `(record.id, event id)` of the next row change; `status` notices (`degraded`/`live`, while
/// a room's events stop arriving, as while the nodes restart) are skipped.
async fn row(ws: &mut Socket) -> (i64, String) {
    loop {
        let m = next(ws).await;
        if m["type"] == "status" {
            eprintln!("status notice: {m}");
            continue;
        }
        assert_eq!(m["type"], "db_event", "{m}");
        return (
            m["payload"]["record"]["id"].as_i64().unwrap(),
            m["payload"]["id"].as_str().unwrap().to_string(),
        );
    }
}

/// Reads `ws` until the row `total` (ids of the rows), after `got`.
async fn read_to(ws: &mut Socket, mut got: Vec<i64>, total: i64, who: &str) -> Vec<i64> {
    let deadline = Instant::now() + Duration::from_secs(300);
    while got.last() != Some(&total) {
        assert!(
            Instant::now() < deadline,
            "{who}: only {} of {total} rows",
            got.len()
        );
        got.push(row(ws).await.0);
    }
    got
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn after_all_three_nodes_restarted_a_since_resume_on_any_node_gets_what_it_missed() {
    bounded(Duration::from_secs(900), async {
        let mut nodes = Nodes::start(3, &[]).await;
        let p = project(nodes.base(0)).await;
        sql(
            nodes.base(0),
            &p.admin,
            &p.project,
            "CREATE TABLE audit (id int8 PRIMARY KEY)",
        )
        .await;
        nodes.wait_leader(&p, None, Duration::from_secs(60)).await;
        let mut ws = subscribed(nodes.base(0), &p, None).await;
        let stop = Arc::new(AtomicBool::new(false));
        let committed = Arc::new(AtomicI64::new(0));
        let writer = steady_writer(&p.project, stop.clone(), committed.clone());
        let mut got = Vec::new();
        let mut last = String::new();
        while got.len() < 100 {
            let (id, event_id) = row(&mut ws).await;
            got.push(id);
            last = event_id;
        }
        drop(ws);
        for i in 0..nodes.len() {
            nodes.terminate(i).await;
        }
        // Rows committed while no node runs.
        rows_committed(&committed, 50, "while no node ran").await;
        for i in 0..nodes.len() {
            nodes.restart(i).await;
        }
        nodes.wait_leader(&p, None, Duration::from_secs(60)).await;
        // The client comes back on other nodes than the one it read from.
        let mut on_c = subscribed(nodes.base(2), &p, Some(&last)).await;
        let mut on_b = subscribed(nodes.base(1), &p, Some(&last)).await;
        // And rows committed after the resume, live ones.
        rows_committed(&committed, 50, "after the resume").await;
        stop.store(true, Ordering::Release);
        let total = writer.await.unwrap();
        let on_c_got = read_to(&mut on_c, got.clone(), total, "the resume on node c").await;
        let on_b_got = read_to(&mut on_b, got, total, "the resume on node b").await;
        let expected: Vec<i64> = pg()
            .await
            .client(&format!("fx_{}", p.project))
            .await
            .query("SELECT id FROM audit ORDER BY id", &[])
            .await
            .unwrap()
            .iter()
            .map(|r| r.get(0))
            .collect();
        for (who, got, ws) in [("c", on_c_got, &mut on_c), ("b", on_b_got, &mut on_b)] {
            nothing_more(ws).await;
            assert_eq!(
                got.len(),
                expected.len(),
                "node {who}: missing or repeated rows"
            );
            assert_eq!(got, expected, "node {who}");
        }
        // Live ones follow, everywhere.
        sql(
            nodes.base(0),
            &p.readwrite,
            &p.project,
            &format!("INSERT INTO audit VALUES ({})", total + 1),
        )
        .await;
        assert_eq!(row(&mut on_c).await.0, total + 1);
        assert_eq!(row(&mut on_b).await.0, total + 1);
    })
    .await;
}

/// Red team rt18 MEDIUM: a nats-server that hangs (stopped, its connections open and silent)
/// went unnoticed for about three minutes (the client's default ping interval): `/ready` said
/// `"nats": true` and the request limits were not shared meanwhile. The node now pings every
/// second and notices within seconds, and is ready again once NATS answers.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_hung_nats_server_is_noticed_within_seconds() {
    bounded(Duration::from_secs(300), async {
        let nats = crate::support::nats::NatsServer::start().await;
        let nodes = Nodes::start_with_nats(&nats.url(), 1, &[]).await;
        let ready = |base: String| async move {
            let (status, body) =
                crate::support::http::call(&base, "GET", "/ready", None, serde_json::json!(null))
                    .await;
            (status, body["cluster"]["nats"].as_bool())
        };
        let base = nodes.base(0).to_string();
        let deadline = Instant::now() + Duration::from_secs(60);
        while ready(base.clone()).await != (200, Some(true)) {
            assert!(Instant::now() < deadline, "never ready");
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
        nats.pause(true);
        let paused = Instant::now();
        let noticed = loop {
            let (status, connected) = ready(base.clone()).await;
            if status == 503 && connected == Some(false) {
                break paused.elapsed();
            }
            // The client's own default would take minutes; a minute is the test's patience.
            assert!(
                paused.elapsed() < Duration::from_secs(60),
                "/ready still {status} with nats {connected:?} after a minute"
            );
            tokio::time::sleep(Duration::from_millis(200)).await;
        };
        eprintln!("a hung nats-server was noticed after {noticed:?}");
        nats.pause(false);
        let deadline = Instant::now() + Duration::from_secs(60);
        while ready(base.clone()).await != (200, Some(true)) {
            assert!(
                Instant::now() < deadline,
                "not ready again after NATS resumed"
            );
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    })
    .await;
}
