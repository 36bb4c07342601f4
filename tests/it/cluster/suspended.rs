//! A suspended project in cluster mode is streamed as a single server streams it (both
//! engines): its PostgreSQL slot is confirmed and its MySQL binlog position stored as its log
//! moves, so neither holds WAL nor pins binlog files for as long as the project stays
//! suspended, and after the resume a `since` subscriber on every node gets what was committed
//! meanwhile, once, in order. (Before: leadership took active projects only, so nobody
//! streamed a suspended one: its slot's confirmed position and its stored binlog position
//! stayed where the suspension found them.)

use std::time::Duration;

use mysql_async::prelude::Queryable;

use super::{assert_exactly_once_in_order, bounded, directory, ChangeKey, Subscriber};
use crate::support::cluster::slot_confirmed;
use crate::support::fixtures::{project_on, Project};
use crate::support::http::sql;
use crate::support::mariadb::mariadb;
use crate::support::nodes::Nodes;
use crate::support::{pg, poll};

/// The table every subscriber checks: `s` is the change number.
const TABLES: &str = "CREATE TABLE w (id int PRIMARY KEY, v int NOT NULL, s int NOT NULL); \
                      CREATE TABLE done (id int PRIMARY KEY)";

/// Writes row `s` of `w` behind the API's back (a suspended project's keys are refused), as
/// the server's own accounts; returns, for PostgreSQL, a WAL position inside the transaction
/// (its commit ends after it), for MySQL the end of the binary log after the commit.
async fn write(engine: &str, p: &Project, s: i64) -> (String, u64) {
    let db = format!("fx_{}", p.project);
    if engine == "postgresql" {
        let mut client = pg().await.client(&db).await;
        let tx = client.transaction().await.unwrap();
        tx.execute("INSERT INTO w VALUES ($1, $1, $1)", &[&(s as i32)])
            .await
            .unwrap();
        let at: i64 = tx
            .query_one("SELECT (pg_current_wal_insert_lsn() - '0/0')::int8", &[])
            .await
            .unwrap()
            .get(0);
        tx.commit().await.unwrap();
        (String::new(), at as u64)
    } else {
        let mut conn = mariadb().await.admin().await;
        conn.query_drop(format!("INSERT INTO {db}.w VALUES ({s}, {s}, {s})"))
            .await
            .unwrap();
        let row: mysql_async::Row = conn
            .query_first("SHOW MASTER STATUS")
            .await
            .unwrap()
            .unwrap();
        let file: String = row.get(0).unwrap();
        let offset: u64 = row.get(1).unwrap();
        (file, offset)
    }
}

/// `fluxbase project <action> <id>`: the operator's CLI on the cluster's control database
/// (and MariaDB, whose accounts it locks and unlocks).
async fn operator(nodes: &Nodes, action: &str, project: &str) {
    let mysql = mariadb().await.admin_url.clone();
    crate::support::process::operator(
        nodes.control_database(),
        &["project", action, project],
        &[("FLUXBASE_MYSQL_URL", &mysql)],
    )
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_suspended_project_is_streamed_by_the_cluster_and_its_resume_misses_nothing() {
    bounded(Duration::from_secs(600), async {
        let maria = mariadb().await;
        let nodes = Nodes::start(2, &[("FLUXBASE_MYSQL_URL", maria.admin_url.as_str())]).await;
        let engines = ["postgresql", "mysql"];
        let mut projects = Vec::new();
        for engine in engines {
            let p = project_on(nodes.base(0), engine).await;
            sql(nodes.base(0), &p.admin, &p.project, TABLES).await;
            nodes.wait_leader(&p, None, Duration::from_secs(60)).await;
            projects.push(p);
        }
        let dir = directory(&nodes);
        let subscribers: Vec<(usize, Subscriber)> = (0..projects.len())
            .flat_map(|k| (0..nodes.len()).map(move |i| (k, i)))
            .map(|(k, i)| {
                let name = format!("{}@{}", engines[k], nodes.ids[i]);
                let p = &projects[k];
                (
                    k,
                    Subscriber::start(&name, &p.project, &p.read, dir.clone(), i),
                )
            })
            .collect();
        for (_, s) in &subscribers {
            s.wait_subscribed(1, Duration::from_secs(60)).await;
        }
        for (k, engine) in engines.iter().enumerate() {
            write(engine, &projects[k], 1).await;
        }
        for (_, s) in &subscribers {
            s.wait_events(1, Duration::from_secs(60)).await;
        }

        for p in &projects {
            operator(&nodes, "suspend", &p.project).await;
        }
        // Every node heard it: its subscribers were told and removed from the room.
        poll::until(
            Duration::from_secs(30),
            Duration::from_millis(100),
            || async {
                let told = |s: &Subscriber| {
                    let f = s.feed.lock().unwrap();
                    f.other.iter().any(|m| m["code"] == "PROJECT_SUSPENDED")
                };
                match subscribers.iter().find(|(_, s)| !told(s)) {
                    None => Ok(()),
                    Some((_, s)) => Err(format!("subscriber {} was not told", s.name)),
                }
            },
        )
        .await;

        // Changes while suspended: the slot and the stored position follow them.
        let mut ends = Vec::new();
        for (k, engine) in engines.iter().enumerate() {
            let mut end = (String::new(), 0);
            for s in 2..=4 {
                end = write(engine, &projects[k], s).await;
            }
            ends.push(end);
        }
        let control = pg().await.client(nodes.control_database()).await;
        poll::until(
            Duration::from_secs(60),
            Duration::from_millis(250),
            || async {
                let mut behind = Vec::new();
                let confirmed = slot_confirmed(&projects[0].project).await;
                if confirmed <= ends[0].1 {
                    behind.push(format!(
                        "the suspended PostgreSQL project's slot is confirmed at {confirmed:#x}, \
                     before its last commit (after {:#x}): nobody streams it",
                        ends[0].1
                    ));
                }
                let row = control
                    .query_one(
                        "SELECT binlog_file, binlog_offset FROM fluxbase.binlog_positions \
                     WHERE project_id = $1",
                        &[&projects[1].project],
                    )
                    .await
                    .unwrap();
                let stored: (String, i64) = (row.get(0), row.get(1));
                let (file, offset) = &ends[1];
                if (stored.0.as_str(), stored.1 as u64) < (file.as_str(), *offset) {
                    behind.push(format!(
                        "the suspended MySQL project's stored position is {stored:?}, before its \
                     last commit ({file}, {offset}): nobody streams it"
                    ));
                }
                if behind.is_empty() {
                    Ok(())
                } else {
                    Err(behind.join("; "))
                }
            },
        )
        .await;

        for p in &projects {
            operator(&nodes, "resume", &p.project).await;
        }
        // The subscribers (their sockets open, no longer subscribed) subscribe again with
        // `since`, on the other node; then the sentinel.
        for (_, s) in &subscribers {
            s.hop();
        }
        for (_, s) in &subscribers {
            s.wait_subscribed(2, Duration::from_secs(60)).await;
        }
        for (k, engine) in engines.iter().enumerate() {
            let p = &projects[k];
            if *engine == "postgresql" {
                pg().await
                    .client(&format!("fx_{}", p.project))
                    .await
                    .batch_execute("INSERT INTO done VALUES (1)")
                    .await
                    .unwrap();
            } else {
                maria
                    .admin()
                    .await
                    .query_drop(format!("INSERT INTO fx_{}.done VALUES (1)", p.project))
                    .await
                    .unwrap();
            }
        }
        let expected: Vec<ChangeKey> = (1..=4).map(|s| ("row.inserted".to_string(), s)).collect();
        poll::until(
            Duration::from_secs(120),
            Duration::from_millis(100),
            || async {
                match subscribers.iter().find_map(|(_, s)| s.done().err()) {
                    None => Ok(()),
                    Some(waiting) => Err(format!("{waiting}\n{}", nodes.logs())),
                }
            },
        )
        .await;
        for (_, s) in &subscribers {
            let feed = s.feed.lock().unwrap();
            assert_exactly_once_in_order(&s.name, &feed, &expected);
        }
    })
    .await;
}
