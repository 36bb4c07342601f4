//! A project created while its replication slot takes a while to create (PostgreSQL's logical
//! slot waits for every transaction older than it to end: a busy database) still gets a
//! working change stream: the node that leads it must not start before the slot exists (it
//! would find no slot and stop for good) nor fence the creating backend as a previous leader.
//!
//! On a PostgreSQL cluster of its own: the transaction held open here would hold up every
//! other test's slot creation on the shared one.

use std::time::Duration;

use serde_json::json;

use super::bounded;
use crate::support::cluster::{unique, DedicatedCluster};
use crate::support::fixtures::Project;
use crate::support::http::{call, sql};
use crate::support::nodes::Nodes;
use crate::support::poll;
use crate::support::ws::{row, subscribed};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_project_whose_slot_waits_for_older_transactions_still_streams_on_every_node() {
    bounded(Duration::from_secs(600), async {
        let pg = DedicatedCluster::start(&[]).await;
        let url = pg.cluster.url(&unique("ctl"));
        let nodes = Nodes::start(3, &[("FLUXBASE_DATABASE_URL", &url)]).await;
        let a = nodes.base(0);
        let token = crate::support::fixtures::signup_on(a).await;

        // An older transaction with an id, open: the slot's creation waits for it.
        let holder = pg.client("postgres").await;
        holder
            .batch_execute("BEGIN; SELECT pg_current_xact_id()")
            .await
            .unwrap();
        let creation = {
            let (a, token) = (a.to_string(), token.clone());
            tokio::spawn(async move {
                call(
                    &a,
                    "POST",
                    "/api/projects",
                    Some(&token),
                    json!({ "name": "slow slot" }),
                )
                .await
            })
        };
        let watcher = pg.client("postgres").await;
        let creating_in: String = poll::until(
            Duration::from_secs(120),
            Duration::from_millis(20),
            || async {
                let rows = watcher
                    .query(
                        "SELECT datname::text FROM pg_stat_activity
                         WHERE query LIKE '%pg_create_logical_replication_slot%'
                           AND state = 'active' AND wait_event IS NOT NULL
                           AND pid <> pg_backend_pid()",
                        &[],
                    )
                    .await
                    .unwrap();
                rows.first()
                    .map(|r| r.get(0))
                    .ok_or_else(|| "the project's slot creation never waited".to_string())
            },
        )
        .await;
        // The window the race needs: a few of the leadership loop's 500 ms ticks while the
        // slot does not exist yet. What is asserted below does not depend on its length.
        tokio::time::sleep(Duration::from_secs(2)).await;
        holder.batch_execute("COMMIT").await.unwrap();
        let (status, body) = creation.await.unwrap();
        assert_eq!(
            status,
            201,
            "creating the project (its slot in {creating_in}) failed: {body}\n{}",
            nodes.logs()
        );
        let key = |s: &str| body["apiKeys"][s].as_str().unwrap().to_string();
        let p = Project {
            project: body["project"]["id"].as_str().unwrap().to_string(),
            read: key("read"),
            readwrite: key("readwrite"),
            admin: key("admin"),
        };
        sql(
            a,
            &p.admin,
            &p.project,
            "CREATE TABLE t (id int PRIMARY KEY)",
        )
        .await;
        nodes.wait_leader(&p, None, Duration::from_secs(60)).await;
        let mut sockets = Vec::new();
        for i in 0..nodes.len() {
            sockets.push(subscribed(nodes.base(i), &p, None).await);
        }
        sql(a, &p.readwrite, &p.project, "INSERT INTO t VALUES (1)").await;
        for (i, ws) in sockets.iter_mut().enumerate() {
            let got = tokio::time::timeout(Duration::from_secs(60), row(ws)).await;
            let status = nodes.cdc_status(i, &p).await.map(|(_, b)| b);
            match got {
                Ok((id, _)) => assert_eq!(id, 1),
                Err(_) => panic!(
                    "no change reached the socket on node {} in 60 s; its /api/cdc/status: \
                     {status:?}\n{}",
                    nodes.ids[i],
                    nodes.logs()
                ),
            }
        }
    })
    .await;
}

/// Red team rt18 MEDIUM: JetStream reserves each project stream's `nats_retention_bytes` when
/// the stream is made; once the reservations filled its store, a new project was still created
/// (201) and never had realtime (its sockets said `degraded` for good, its slot kept the WAL).
/// A project is now refused first (403, naming JetStream), as when the database cluster has no
/// free replication slot, and made again once there is room.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_project_jetstream_has_no_room_for_is_refused_before_anything_is_made() {
    bounded(Duration::from_secs(300), async {
        let nats = crate::support::nats::NatsServer::start().await;
        let nodes = Nodes::start_with_nats(&nats.url(), 1, &[]).await;
        let base = nodes.base(0);
        let token = crate::support::fixtures::signup_on(base).await;
        // Another stream takes all but 128 MiB of the store: less than a project's 256 MiB.
        let (max, reserved) = nats.store_room().await;
        let client = async_nats::connect(nats.url()).await.unwrap();
        let js = async_nats::jetstream::new(client);
        js.create_stream(async_nats::jetstream::stream::Config {
            name: "FILLER".into(),
            subjects: vec!["filler".into()],
            max_bytes: (max - reserved - (128 << 20)) as i64,
            storage: async_nats::jetstream::stream::StorageType::File,
            ..Default::default()
        })
        .await
        .expect("the filler stream");
        let create = || {
            call(
                base,
                "POST",
                "/api/projects",
                Some(&token),
                json!({ "name": "room", "engine": "postgresql" }),
            )
        };
        let (status, body) = create().await;
        assert_eq!(status, 403, "{body}");
        assert_eq!(body["error"]["code"], "INSUFFICIENT_PERMISSIONS", "{body}");
        let message = body["error"]["message"].as_str().unwrap();
        assert!(message.contains("NATS JetStream has no room"), "{message}");
        let (status, body) = call(base, "GET", "/api/projects", Some(&token), json!(null)).await;
        assert_eq!(status, 200, "{body}");
        assert_eq!(body["projects"], json!([]), "nothing made: {body}");
        // Room again: the project is made.
        js.delete_stream("FILLER").await.unwrap();
        let (status, body) = create().await;
        assert_eq!(status, 201, "{body}");
    })
    .await;
}
