//! MySQL projects in cluster mode (issue 20): the nodes share one control database, one NATS
//! and one MariaDB (`mysql_url`: the suite's, support/mariadb.rs). A node leads the project's
//! binlog stream like a PostgreSQL project's slot; its publisher lets the stored binlog position
//! move only past what JetStream holds, and a new leader resumes from that position with the
//! same event ids.
//!
//! The workload is written by the test on one MariaDB session, so the test knows every
//! committed change (and in which order): `w.s` takes a fresh change number at each write.

use std::collections::{BTreeMap, BTreeSet};
use std::time::{Duration, Instant};

use mysql_async::prelude::Queryable;
use serde_json::{json, Value};

use super::{
    assert_exactly_once_in_order, bounded, directory, subscribers_on_every_node, update_directory,
    workload_webhook, ChangeKey,
};
use crate::support::fixtures::project_on;
use crate::support::http::call;
use crate::support::mariadb::mariadb;
use crate::support::nodes::Nodes;
use crate::support::poll;
use crate::support::receiver::Received;

/// Transactions of the workload; the leader is killed halfway.
const TRANSACTIONS: u64 = 300;

/// A small xorshift: the workload is random but repeatable from its seed.
struct Rng(u64);

impl Rng {
    fn below(&mut self, n: u64) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0 % n
    }
}

/// Runs transactions `range` of the workload on `conn` (database `fx_<id>`): each of 1–5 random
/// inserts, updates and deletes of 40 rows, one in six rolled back. Returns the committed changes
/// in commit order; `rows` is the table as committed.
async fn workload(
    conn: &mut mysql_async::Conn,
    rng: &mut Rng,
    range: std::ops::Range<u64>,
    rows: &mut BTreeMap<i64, i64>,
    next_s: &mut i64,
) -> Vec<ChangeKey> {
    let mut committed = Vec::new();
    for _ in range {
        let mut now = rows.clone();
        let mut changes = Vec::new();
        conn.query_drop("BEGIN").await.unwrap();
        for _ in 0..=rng.below(5) {
            let id = rng.below(40) as i64;
            *next_s += 1;
            let s = *next_s;
            let sql = match (now.get(&id).copied(), rng.below(3)) {
                (None, _) => {
                    now.insert(id, s);
                    changes.push(("row.inserted".to_string(), s));
                    format!("INSERT INTO w (id, v, s) VALUES ({id}, {s}, {s})")
                }
                (Some(old), 0) => {
                    now.remove(&id);
                    changes.push(("row.deleted".to_string(), old));
                    format!("DELETE FROM w WHERE id = {id}")
                }
                (Some(_), _) => {
                    now.insert(id, s);
                    changes.push(("row.updated".to_string(), s));
                    format!("UPDATE w SET v = v + 1, s = {s} WHERE id = {id}")
                }
            };
            conn.query_drop(sql).await.unwrap();
        }
        if rng.below(6) == 0 {
            conn.query_drop("ROLLBACK").await.unwrap();
        } else {
            conn.query_drop("COMMIT").await.unwrap();
            *rows = now;
            committed.extend(changes);
        }
    }
    committed
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_mysql_project_streams_through_the_cluster_and_a_kill_9_of_its_leader_loses_nothing() {
    bounded(Duration::from_secs(900), async {
        let maria = mariadb().await;
        let mut nodes = Nodes::start(3, &[("FLUXBASE_MYSQL_URL", maria.admin_url.as_str())]).await;
        let p = project_on(nodes.base(0), "mysql").await;
        let mut conn = maria.admin().await;
        conn.query_drop(format!("USE fx_{}", p.project))
            .await
            .unwrap();
        conn.query_drop(
            "CREATE TABLE w (id int PRIMARY KEY, v int NOT NULL, s int NOT NULL, note text)",
        )
        .await
        .unwrap();
        conn.query_drop("CREATE TABLE done (id int PRIMARY KEY)")
            .await
            .unwrap();
        let (rx, _) = workload_webhook(&nodes, &p).await;

        let (leader, _) = nodes.wait_leader(&p, None, Duration::from_secs(60)).await;
        let killed = nodes.index_of(&leader);
        eprintln!("MySQL project {} led by node {leader}", p.project);
        // The leader streams the binlog, and says so.
        let (status, body) = nodes.cdc_status(killed, &p).await.unwrap();
        assert_eq!(status, 200, "{body}");
        assert_eq!(
            body["stream"]["slot"],
            format!("binlog:fluxbase_{}", p.project),
            "{body}"
        );

        let dir = directory(&nodes);
        let subscribers = subscribers_on_every_node(&nodes, &p, &dir).await;

        let mut rng = Rng(0x9e37_79b9_7f4a_7c15 ^ u64::from(std::process::id()));
        let (mut rows, mut next_s) = (BTreeMap::new(), 0i64);
        let mut expected = workload(
            &mut conn,
            &mut rng,
            0..TRANSACTIONS / 2,
            &mut rows,
            &mut next_s,
        )
        .await;
        for s in &subscribers {
            s.wait_events(50, Duration::from_secs(120)).await;
        }
        // The second half commits while the leader dies and another takes over.
        let second = tokio::spawn(async move {
            let more = workload(
                &mut conn,
                &mut rng,
                TRANSACTIONS / 2..TRANSACTIONS,
                &mut rows,
                &mut next_s,
            )
            .await;
            (conn, more)
        });
        tokio::time::sleep(Duration::from_millis(30)).await;
        nodes.kill9(killed);
        let received_at_kill = rx.got.lock().unwrap().len();
        let killed_at = Instant::now();
        update_directory(&dir, &nodes);
        let (next, seen_at) = nodes
            .wait_leader(&p, Some(&leader), Duration::from_secs(120))
            .await;
        eprintln!(
            "node {leader} killed; node {next} leads after {:?}",
            seen_at - killed_at
        );
        let received_at_failover = rx.got.lock().unwrap().len();
        for s in &subscribers {
            s.hop();
        }
        let (mut conn, more) = second.await.unwrap();
        expected.extend(more);
        conn.query_drop("INSERT INTO done VALUES (1)")
            .await
            .unwrap();
        eprintln!("{} changes committed", expected.len());

        // Every subscriber, on every node, gets every committed change once, in order, under
        // the same ids.
        let deadline = Instant::now() + Duration::from_secs(300);
        loop {
            let waiting: Vec<String> = subscribers.iter().filter_map(|s| s.done().err()).collect();
            if waiting.is_empty() {
                break;
            }
            assert!(
                Instant::now() < deadline,
                "not every subscriber got the sentinel within 300 s:\n{}\n{}",
                waiting.join("\n"),
                nodes.logs()
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        let mut ids: Option<Vec<String>> = None;
        for s in &subscribers {
            let feed = s.feed.lock().unwrap();
            assert_exactly_once_in_order(&s.name, &feed, &expected);
            let mine: Vec<String> = feed.events.iter().map(|g| g.id.clone()).collect();
            match &ids {
                None => ids = Some(mine),
                Some(first) => assert_eq!(
                    first, &mine,
                    "subscriber {} got other event ids than the first",
                    s.name
                ),
            }
        }

        // Webhooks: every committed change delivered (at least once, always under one delivery
        // id), nothing that was not committed.
        let sentinel = |r: &Received| r.body.contains("\"table_id\":\"done\"");
        let want: BTreeSet<ChangeKey> = expected.iter().cloned().collect();
        let delivered = || {
            let mut by_key: BTreeMap<ChangeKey, BTreeSet<String>> = BTreeMap::new();
            for r in rx.got.lock().unwrap().iter().filter(|r| !sentinel(r)) {
                let v: Value = serde_json::from_str(&r.body).unwrap();
                let event_type = v["event_type"].as_str().unwrap().to_string();
                let row = if event_type == "row.deleted" {
                    &v["data"]["old"]
                } else {
                    &v["data"]["new"]
                };
                by_key
                    .entry((event_type, row["s"].as_i64().unwrap()))
                    .or_default()
                    .insert(r.delivery_id().to_string());
            }
            by_key
        };
        poll::until(
            Duration::from_secs(300),
            Duration::from_millis(250),
            || async {
                let got = delivered();
                let missing = want.iter().filter(|k| !got.contains_key(*k)).count();
                let has_sentinel = rx.got.lock().unwrap().iter().any(sentinel);
                if missing == 0 && has_sentinel {
                    Ok(())
                } else {
                    Err(format!("{missing} committed changes not delivered yet"))
                }
            },
        )
        .await;
        let got = delivered();
        let invented: Vec<_> = got.keys().filter(|k| !want.contains(*k)).take(5).collect();
        assert!(
            invented.is_empty(),
            "delivered, never committed: {invented:?}"
        );
        for (k, deliveries) in &got {
            assert_eq!(
                deliveries.len(),
                1,
                "{k:?} was delivered under several delivery ids: {deliveries:?}"
            );
        }
        let requests = rx.got.lock().unwrap().len();
        eprintln!(
            "{} webhook requests for {} changes; {received_at_kill} before the kill, \
             {received_at_failover} at the failover",
            requests,
            got.len()
        );

        // The new leader stored the position past the workload: nothing pins the log.
        let control = crate::support::pg()
            .await
            .client(nodes.control_database())
            .await;
        let end = maria.query("SHOW MASTER STATUS").await;
        let end_file = end[0][0].clone().unwrap();
        poll::until(
            Duration::from_secs(30),
            Duration::from_millis(250),
            || async {
                let row = control
                    .query_one(
                        "SELECT binlog_file FROM fluxbase.binlog_positions WHERE project_id = $1",
                        &[&p.project],
                    )
                    .await
                    .unwrap();
                let file: String = row.get(0);
                if file >= end_file {
                    Ok(())
                } else {
                    Err(format!(
                        "the stored position is still in {file}, the log at {end_file}"
                    ))
                }
            },
        )
        .await;
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_cluster_without_mysql_url_refuses_mysql_projects_saying_why() {
    bounded(Duration::from_secs(300), async {
        let nodes = Nodes::start(1, &[]).await;
        let p = project_on(nodes.base(0), "postgresql").await;
        let token = crate::support::fixtures::signup_on(nodes.base(0)).await;
        let (status, body) = call(
            nodes.base(0),
            "POST",
            "/api/projects",
            Some(&token),
            json!({ "name": "nope", "engine": "mysql" }),
        )
        .await;
        assert_eq!(status, 400, "{body}");
        assert_eq!(body["error"]["code"], "BAD_REQUEST", "{body}");
        let message = body["error"]["message"].as_str().unwrap_or_default();
        assert!(
            message.contains("mysql_url") && message.contains("cluster mode"),
            "{body}"
        );
        // PostgreSQL projects are unaffected.
        let (status, body) = nodes.cdc_status(0, &p).await.unwrap();
        assert_eq!(status, 200, "{body}");
    })
    .await;
}

/// A server that has MySQL projects and joins a cluster without `mysql_url` refuses to start,
/// saying why: its embedded MariaDB would be this node's alone.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_node_with_mysql_projects_and_no_mysql_url_refuses_to_start() {
    bounded(Duration::from_secs(300), async {
        let app = crate::support::mariadb::spawn_mysql_app().await;
        let _f = app.mysql_fixture().await;
        let mut config = app.app.config.clone();
        app.stop().await;
        config.mysql_url = None;
        config.nats_url = Some(crate::support::nats::nats().await.url().into());
        let err = match fluxbase::app::App::open(config, &[]).await {
            Ok(_) => panic!("a cluster node started with MySQL projects and no mysql_url"),
            Err(e) => format!("{e:#}"),
        };
        assert!(
            err.contains("cluster mode need mysql_url") && err.contains("embedded MariaDB"),
            "{err}"
        );
    })
    .await;
}
