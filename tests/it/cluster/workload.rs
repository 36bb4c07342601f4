//! A randomized workload through a cluster that loses a piece in its middle: the node leading
//! the project (kill -9), or NATS (kill -9 of nats-server, restarted on the same store). Every
//! subscriber (one per node) and a webhook receiver must get every committed change: the
//! oracle is an audit table a trigger writes in each change's own transaction.

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use serde_json::{json, Value};

use super::{
    assert_exactly_once_in_order, bounded, directory, subscribers_on_every_node, update_directory,
    workload_webhook, ChangeKey, Subscriber,
};
use crate::support::fixtures::{project, Project};
use crate::support::http::{call, sql};
use crate::support::nats::NatsServer;
use crate::support::nodes::Nodes;
use crate::support::pg;
use crate::support::poll;
use crate::support::receiver::{Received, Receiver};

/// `w`, whose every write takes a fresh change number `s`, so each committed change is one
/// (event type, `s`); `audit`, written by a trigger in the change's own transaction (so exactly
/// the committed changes, `n` in commit order: one session writes); `done` for the sentinel.
/// `workload(total, seed)` commits every 20 operations, rolls back one transaction in ten and
/// some subtransactions, and halfway waits for the advisory lock 1804 (the test's gate).
const SCHEMA: &str = "
    CREATE SEQUENCE change_no;
    CREATE TABLE w (id int PRIMARY KEY, v int, note text, s int NOT NULL DEFAULT nextval('change_no'));
    ALTER TABLE w REPLICA IDENTITY FULL;
    CREATE TABLE done (id int PRIMARY KEY);
    CREATE TABLE audit (n bigserial PRIMARY KEY, op text NOT NULL, s int NOT NULL, old jsonb, new jsonb);
    CREATE FUNCTION audit_change() RETURNS trigger LANGUAGE plpgsql AS $$
    BEGIN
      IF TG_OP = 'DELETE' THEN INSERT INTO audit (op, s, old, new) VALUES ('row.deleted', OLD.s, to_jsonb(OLD), NULL);
      ELSIF TG_OP = 'UPDATE' THEN INSERT INTO audit (op, s, old, new) VALUES ('row.updated', NEW.s, to_jsonb(OLD), to_jsonb(NEW));
      ELSE INSERT INTO audit (op, s, old, new) VALUES ('row.inserted', NEW.s, NULL, to_jsonb(NEW));
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
        k := floor(random() * 200); op := random();
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
          COMMIT;
          PERFORM pg_advisory_lock(1804);
          PERFORM pg_advisory_unlock(1804);
        END IF;
      END LOOP;
      COMMIT;
    END $$";

/// What the cluster loses in the middle of the workload.
#[derive(Clone, Copy, Debug, PartialEq)]
enum Loss {
    /// kill -9 of the node leading the project.
    Leader,
    /// kill -9 of nats-server, then a restart on the same port and store.
    Nats,
    /// kill -9 of nats-server, the newest messages of the project's stream cut from its files
    /// (what nats-server 2.9 was seen losing of what it had acknowledged), then a restart: the
    /// events must be published again from the slot. The nodes settle JetStream's
    /// acknowledgements for 5 minutes (`nats_publish_settle_ms`), so that the cut falls inside
    /// the window whatever the machine's speed.
    NatsTail,
}

const OPERATIONS: i32 = 4000;

/// At most this many webhook attempts of one node are sent with their answer not yet recorded:
/// what a kill -9 may leave to be sent again. Under the `row` ordering (the test's webhook's):
/// `webhook_max_in_flight` (64) in flight, and successes not yet recorded (one batch of 64 being
/// recorded, one filling).
const IN_FLIGHT: usize = 3 * 64;

/// The webhook deliveries of the test's webhook still pending in the outbox.
const PENDING: &str =
    "SELECT count(*) FROM fluxbase.webhook_deliveries WHERE webhook_id = $1 AND status = 'pending'";
const FAILED: &str =
    "SELECT count(*) FROM fluxbase.webhook_deliveries WHERE webhook_id = $1 AND status = 'failed'";

async fn count(client: &tokio_postgres::Client, query: &str, webhook: &str) -> i64 {
    client.query_one(query, &[&webhook]).await.unwrap().get(0)
}

async fn through_a_loss(loss: Loss) {
    let mut own_nats = match loss {
        Loss::Nats | Loss::NatsTail => Some(NatsServer::start().await),
        Loss::Leader => None,
    };
    let settle: &[(&str, &str)] = match loss {
        Loss::NatsTail => &[("FLUXBASE_NATS_PUBLISH_SETTLE_MS", "300000")],
        _ => &[],
    };
    let mut nodes = match &own_nats {
        Some(n) => Nodes::start_with_nats(&n.url(), 3, settle).await,
        None => Nodes::start(3, settle).await,
    };
    let p: Project = project(nodes.base(0)).await;
    let pg = pg().await;
    let db = format!("fx_{}", p.project);
    let control = pg.client(nodes.control_database()).await;
    sql(nodes.base(0), &p.admin, &p.project, SCHEMA).await;
    let (rx, webhook_id) = workload_webhook(&nodes, &p).await;
    let (leader, _) = nodes.wait_leader(&p, None, Duration::from_secs(60)).await;
    eprintln!("{loss:?}: project {} led by node {leader}", p.project);

    // One subscriber per node, each subscribed before the workload starts.
    let dir = directory(&nodes);
    let subscribers = subscribers_on_every_node(&nodes, &p, &dir).await;

    // The gate: the workload's second half waits until this session lets go of the lock.
    let gate = pg.client(&db).await;
    gate.batch_execute("SELECT pg_advisory_lock(1804)")
        .await
        .unwrap();
    let workload = {
        let client = pg.client(&db).await;
        tokio::spawn(async move {
            client
                .batch_execute(&format!("CALL workload({OPERATIONS}, 0.18)"))
                .await
                .unwrap()
        })
    };
    // Mid-stream: every subscriber has seen part of the first half.
    for s in &subscribers {
        s.wait_events(100, Duration::from_secs(120)).await;
    }
    // The second half commits while the piece is lost: released just before a leader's kill
    // (the kill lands among its commits), just after NATS's (all of it commits while NATS is
    // down).
    let release = || async {
        gate.batch_execute("SELECT pg_advisory_unlock(1804)")
            .await
            .unwrap()
    };
    let (mut received_at_kill, mut received_at_failover) = (0, usize::MAX);
    let finished = |workload: tokio::task::JoinHandle<()>| async move {
        tokio::time::timeout(Duration::from_secs(300), workload)
            .await
            .expect("the workload did not finish within 300 s")
            .unwrap()
    };
    match loss {
        Loss::Leader => {
            let killed = nodes.index_of(&leader);
            release().await;
            nodes.kill9(killed);
            received_at_kill = rx.got.lock().unwrap().len();
            let killed_at = Instant::now();
            update_directory(&dir, &nodes);
            let (next, seen_at) = nodes
                .wait_leader(&p, Some(&leader), Duration::from_secs(120))
                .await;
            let failover = seen_at - killed_at;
            received_at_failover = rx.got.lock().unwrap().len();
            eprintln!("node {leader} killed; node {next} leads after {failover:?}");
            // The 5 s target is measured by `make bench-cluster` (its failover rounds), never
            // asserted as a time here: under CI's load the same path took 5.06 s. What this
            // test holds is that a survivor takes over by itself (within the lease's bound,
            // 30 s, with room) and that nothing is lost.
            assert!(
                failover <= Duration::from_secs(45),
                "node {next} took over {failover:?} after the kill -9 of {leader}: past the \
                 lease's bound"
            );
            nodes.wait_agreed(&p, &next, Duration::from_secs(30)).await;
            // Every subscriber resumes with `since` on another node.
            for s in &subscribers {
                s.hop();
            }
            finished(workload).await;
        }
        Loss::Nats | Loss::NatsTail => {
            let nats = own_nats.as_mut().unwrap();
            let stream = format!("FLUXBASE_{}", p.project);
            // NatsTail: a node's room falls behind the stream (stopped, as an overloaded node
            // lags), so that what JetStream loses is what that room still has to read.
            let lagging = (loss == Loss::NatsTail)
                .then(|| (0..nodes.len()).find(|&i| nodes.ids[i] != leader).unwrap());
            if let Some(i) = lagging {
                nodes.node(i).pause();
                tokio::time::sleep(Duration::from_secs(2)).await;
            }
            let before = nats.last_sequence(&stream).await.unwrap_or(0);
            nats.kill9();
            if let Some(i) = lagging {
                let cut = nats.cut_stream_tail(&stream);
                eprintln!(
                    "node {} stopped behind the stream; the stream ended at {before} at the \
                     kill; {cut} bytes cut off its files",
                    nodes.ids[i]
                );
                nodes.node(i).resume();
            }
            release().await;
            // NATS down: HTTP serves on, every node's /ready says it cannot reach NATS, and
            // every subscriber is told its changes are delayed.
            sql(nodes.base(2), &p.readwrite, &p.project, "SELECT 1").await;
            for i in nodes.alive() {
                ready_until(&nodes, i, false).await;
            }
            for s in &subscribers {
                s.wait_status("degraded", Duration::from_secs(60)).await;
            }
            finished(workload).await;
            nats.restart().await;
            eprintln!("nats-server killed during the workload and restarted");
            if loss == Loss::NatsTail {
                // Read before the leader publishes again (it waits for its next term).
                let after = nats.last_sequence(&stream).await.unwrap_or(0);
                eprintln!("the stream ends at {after} after the restart");
                assert!(
                    after < before,
                    "cutting the stream's files lost nothing ({after} of {before}): the test \
                     would not exercise publishing again"
                );
            }
            for i in nodes.alive() {
                ready_until(&nodes, i, true).await;
            }
        }
    }
    finish(
        &nodes,
        &p,
        &db,
        &control,
        &webhook_id,
        &rx,
        &subscribers,
        loss,
        received_at_kill..received_at_failover,
        own_nats
            .as_ref()
            .unwrap_or(crate::support::nats::nats().await),
    )
    .await;
}

/// Polls node `i`'s `/ready` until it says NATS is reachable (`200`, `cluster.nats` true) or
/// not (`503 REALTIME_UNAVAILABLE`, `cluster.nats` false), within 60 s.
async fn ready_until(nodes: &Nodes, i: usize, nats: bool) {
    poll::until(
        Duration::from_secs(60),
        Duration::from_millis(100),
        || async {
            let (status, body) = call(nodes.base(i), "GET", "/ready", None, json!(null)).await;
            let want = if nats { 200 } else { 503 };
            if status == want && body["cluster"]["nats"] == nats {
                if !nats {
                    assert_eq!(body["error"]["code"], "REALTIME_UNAVAILABLE", "{body}");
                }
                Ok(())
            } else {
                Err(format!(
                    "node {}'s /ready never said NATS {}: {status} {body}",
                    nodes.ids[i],
                    if nats { "is back" } else { "is down" }
                ))
            }
        },
    )
    .await
}

/// After the workload: the sentinel through a running node, then every subscriber and the
/// receiver checked against the audit table.
#[allow(clippy::too_many_arguments)]
async fn finish(
    nodes: &Nodes,
    p: &Project,
    db: &str,
    control: &tokio_postgres::Client,
    webhook_id: &str,
    rx: &Receiver,
    subscribers: &[Subscriber],
    loss: Loss,
    around_the_kill: std::ops::Range<usize>,
    nats: &NatsServer,
) {
    let pg = pg().await;
    let some_node = nodes.alive()[0];
    sql(
        nodes.base(some_node),
        &p.readwrite,
        &p.project,
        "INSERT INTO done VALUES (1)",
    )
    .await;
    let project_db = pg.client(db).await;
    let expected: Vec<ChangeKey> = project_db
        .query("SELECT op, s::int8 FROM audit ORDER BY n", &[])
        .await
        .unwrap()
        .iter()
        .map(|r| (r.get(0), r.get(1)))
        .collect();
    eprintln!("{loss:?}: {} changes committed", expected.len());

    let deadline = Instant::now() + Duration::from_secs(300);
    loop {
        let waiting: Vec<String> = subscribers.iter().filter_map(|s| s.done().err()).collect();
        if waiting.is_empty() {
            break;
        }
        if Instant::now() > deadline {
            let mut status = Vec::new();
            for i in nodes.alive() {
                let said = nodes.cdc_status(i, p).await.map(|(_, body)| body);
                status.push(format!("node {}: {said:?}", nodes.ids[i]));
            }
            panic!(
                "{loss:?}: not every subscriber got the sentinel within 300 s:\n{}\n\
                 JetStream:\n{}\n/api/cdc/status:\n{}\n{}",
                waiting.join("\n"),
                nats.describe(Some(&format!("FLUXBASE_{}", p.project)))
                    .await,
                status.join("\n"),
                nodes.logs()
            );
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    eprintln!(
        "{loss:?}: JetStream:\n{}",
        nats.describe(Some(&format!("FLUXBASE_{}", p.project)))
            .await
    );
    for s in subscribers {
        let feed = s.feed.lock().unwrap();
        eprintln!(
            "subscriber {}: {} events over connections {:?}; other messages {:?}",
            s.name,
            feed.events.len(),
            feed.connections,
            feed.other
        );
        assert_exactly_once_in_order(&s.name, &feed, &expected);
        if loss != Loss::Leader {
            // Told when the changes were delayed, and when they flow again.
            let states: Vec<&Value> = feed
                .other
                .iter()
                .filter(|m| m["type"] == "status")
                .map(|m| &m["state"])
                .collect();
            assert_eq!(
                states.last(),
                Some(&&json!("live")),
                "subscriber {}: the last status notice is not live: {:?}",
                s.name,
                feed.other
            );
        }
        if loss == Loss::Leader {
            assert!(
                feed.connections.len() >= 2
                    && feed.connections[1..]
                        .iter()
                        .all(|(_, since)| since.is_some()),
                "subscriber {} never resumed with since: {:?}",
                s.name,
                feed.connections
            );
        }
    }

    // Webhooks: the sentinel delivered (the outbox stores in commit order), nothing pending.
    let sentinel = |r: &Received| r.body.contains("\"table_id\":\"done\"");
    poll::until(
        Duration::from_secs(300),
        Duration::from_millis(250),
        || async {
            let n = rx.got.lock().unwrap().len();
            if !rx.got.lock().unwrap().iter().any(sentinel) {
                return Err(format!("the sentinel was never delivered ({n} received)"));
            }
            let failed = count(control, FAILED, webhook_id).await;
            assert_eq!(failed, 0, "deliveries failed");
            let pending = count(control, PENDING, webhook_id).await;
            if pending == 0 {
                Ok(())
            } else {
                Err(format!("{pending} deliveries still pending ({n} received)"))
            }
        },
    )
    .await;
    let got = rx.got.lock().unwrap().clone();
    let requests: Vec<&Received> = got.iter().filter(|r| !sentinel(r)).collect();
    let mut delivered: BTreeMap<ChangeKey, Value> = BTreeMap::new();
    let mut delivery_of: BTreeMap<ChangeKey, String> = BTreeMap::new();
    let mut by_event: BTreeMap<String, Value> = BTreeMap::new();
    let mut first_seen: BTreeMap<String, usize> = BTreeMap::new();
    let mut repeated: Vec<(String, usize)> = Vec::new();
    for (index, r) in got.iter().enumerate() {
        if sentinel(r) {
            continue;
        }
        let v: Value = serde_json::from_str(&r.body).unwrap();
        let event_type = v["event_type"].as_str().unwrap().to_string();
        let row = if event_type == "row.deleted" {
            &v["data"]["old"]
        } else {
            &v["data"]["new"]
        };
        let key = (event_type, row["s"].as_i64().unwrap());
        if let Some(prev) = by_event.insert(v["event_id"].as_str().unwrap().to_string(), v.clone())
        {
            assert_eq!(prev, v, "a repeated delivery changed its body");
        }
        delivered.insert(key.clone(), v.clone());
        let id = delivery_of
            .entry(key.clone())
            .or_insert_with(|| r.delivery_id().to_string());
        assert_eq!(id, r.delivery_id(), "{key:?} came under two delivery ids");
        if let Some(first) = first_seen.get(r.delivery_id()) {
            repeated.push((r.delivery_id().to_string(), *first));
        } else {
            first_seen.insert(r.delivery_id().to_string(), index);
        }
    }
    let want: std::collections::BTreeSet<&ChangeKey> = expected.iter().collect();
    let missing: Vec<_> = want
        .iter()
        .filter(|k| !delivered.contains_key(**k))
        .take(5)
        .collect();
    let invented: Vec<_> = delivered
        .keys()
        .filter(|k| !want.contains(k))
        .take(5)
        .collect();
    assert!(
        missing.is_empty() && invented.is_empty() && delivered.len() == want.len(),
        "webhooks: {} changes delivered of {} committed; never delivered e.g. {missing:?}; \
         never committed e.g. {invented:?}",
        delivered.len(),
        want.len()
    );
    eprintln!(
        "{loss:?}: {} webhook requests for {} changes, {} repeated",
        requests.len(),
        delivered.len(),
        repeated.len()
    );
    // No duplicate first attempts: every node's worker sends, none the same delivery. The only
    // repeats allowed are of the attempts the killed node had in flight (sent, their answer
    // never recorded): their first copy is among the last requests received before the kill
    // (at most IN_FLIGHT) or between the kill and the new leader.
    let excused = around_the_kill.start.saturating_sub(IN_FLIGHT)..around_the_kill.end;
    let unexcused: Vec<_> = repeated
        .iter()
        .filter(|(_, first)| loss != Loss::Leader || !excused.contains(first))
        .collect();
    assert!(
        unexcused.is_empty(),
        "{} deliveries were sent twice though every answer was 200 (request index of the first \
         copy{}): e.g. {:?}",
        unexcused.len(),
        if loss == Loss::Leader {
            format!("; the kill came at request {}", around_the_kill.start)
        } else {
            String::new()
        },
        &unexcused[..unexcused.len().min(5)]
    );

    // Replaying the deliveries in event-id order rebuilds the table.
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
    assert!(
        rebuilt == table,
        "replaying the deliveries does not rebuild the table ({} rows rebuilt, {} in the table)",
        rebuilt.len(),
        table.len()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kill_9_of_the_leader_mid_workload_another_node_leads_and_nothing_is_lost() {
    bounded(Duration::from_secs(900), through_a_loss(Loss::Leader)).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn nats_killed_and_restarted_mid_workload_loses_nothing_for_subscribers_or_webhooks() {
    bounded(Duration::from_secs(900), through_a_loss(Loss::Nats)).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn nats_losing_the_tail_it_acknowledged_loses_nothing_for_subscribers_or_webhooks() {
    bounded(Duration::from_secs(900), through_a_loss(Loss::NatsTail)).await;
}
