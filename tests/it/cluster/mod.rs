//! Cluster mode (issue 18): three real `fluxbase serve` processes on one control database and
//! one `nats-server -js` (support/nodes.rs, support/nats.rs), on loopback.
//!
//! - `fanout`: a change made through node A reaches a socket on node C; a broadcast from node B
//!   (socket message and REST) reaches sockets on A and C, not the sender;
//! - `workload`: kill -9 of the node leading a project during a randomized workload (another
//!   node leads within 5 s; every subscriber that resumes with `since` on another node gets
//!   every committed change exactly once, in order; the webhook deliveries rebuild the table),
//!   and the same workload with NATS killed and restarted in its middle (nothing lost);
//! - `restart`: all three nodes restarted, a `since` resume gets what it missed;
//! - `rate_limit`: the per-key limit holds across nodes;
//! - `shares`: each node takes its share of an account's SQL connections;
//! - `mysql`: a MySQL project (binlog stream) on three nodes sharing one MariaDB: every
//!   subscriber on every node gets every change once, in order, under the same ids, through a
//!   kill -9 of its leader; a cluster without `mysql_url` refuses MySQL projects (and a node
//!   that has some refuses to start);
//! - `creation`: a project whose slot is slow to create (older transactions running) still
//!   streams: its leader neither starts before the slot exists nor fences its creator.
//! - `suspended`: a suspended project (both engines) is still led: its slot and binlog
//!   position follow the log, and after the resume a `since` subscriber misses nothing.
//!
//! Subscribers here ([`Subscriber`]) read in a task of their own (a socket left unread would
//! fall behind its send queue), reconnect with `since` (the last id they saw) when their
//! socket closes, and hop to the next node when the test says so.

mod creation;
mod fanout;
mod mysql;
mod rate_limit;
mod restart;
mod shares;
mod suspended;
mod workload;

use std::collections::BTreeSet;
use std::future::Future;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use futures_util::{SinkExt, StreamExt};
use serde_json::{json, Value};
use tokio_tungstenite::tungstenite::Message;

use crate::support::nodes::Nodes;
use crate::support::ws::room;

/// Runs a whole test under a hang guard: past `limit` it fails saying so, rather than hang.
pub async fn bounded<F: Future<Output = ()>>(limit: Duration, test: F) {
    if tokio::time::timeout(limit, test).await.is_err() {
        panic!("the test did not finish within {limit:?} (a hang guard)");
    }
}

/// One committed change of a table: its event type (`row.inserted`, …) and change number.
pub type ChangeKey = (String, i64);

/// The webhook event type of a realtime operation.
pub fn event_type(operation: &str) -> &'static str {
    match operation {
        "INSERT" => "row.inserted",
        "UPDATE" => "row.updated",
        "DELETE" => "row.deleted",
        other => panic!("unknown operation {other:?}"),
    }
}

/// A `db_event` as a subscriber got it.
#[derive(Clone, Debug)]
pub struct Got {
    pub id: String,
    pub table: String,
    /// The change number column `s` of the row (the new row's, the old one's for a DELETE).
    pub key: Option<ChangeKey>,
}

/// What a subscriber saw.
#[derive(Default, Debug)]
pub struct Feed {
    pub events: Vec<Got>,
    /// The id of the last event seen: what a reconnection resumes after.
    pub last: Option<String>,
    /// Each (re)subscription: the node's id and the `since` it asked for.
    pub connections: Vec<(String, Option<String>)>,
    /// Subscribed right now.
    pub live: bool,
    /// The sentinel (a row of table `done`) arrived: the subscriber stopped.
    pub done: bool,
    /// Why the subscriber gave up, if it did.
    pub failure: Option<String>,
    /// Messages other than `db_event`, `subscribed` and `pong` (errors, notices).
    pub other: Vec<Value>,
}

/// Where the subscribers connect: each node's base URL, `None` while it is down.
pub type Directory = Arc<Mutex<Vec<Option<String>>>>;

pub fn directory(nodes: &Nodes) -> Directory {
    let d = Arc::new(Mutex::new(Vec::new()));
    update_directory(&d, nodes);
    d
}

/// After a kill or a restart: the nodes' current addresses.
pub fn update_directory(dir: &Directory, nodes: &Nodes) {
    *dir.lock().unwrap() = (0..nodes.len())
        .map(|i| nodes.is_alive(i).then(|| nodes.base(i).to_string()))
        .collect();
}

/// A socket subscribed to a project with its read key, read in a task of its own until the
/// sentinel (a row of table `done`) arrives, reconnecting with `since` when the socket closes;
/// stopped on drop.
pub struct Subscriber {
    pub name: String,
    pub feed: Arc<Mutex<Feed>>,
    hop: tokio::sync::watch::Sender<u64>,
    task: tokio::task::JoinHandle<()>,
}

impl Drop for Subscriber {
    fn drop(&mut self) {
        self.task.abort();
    }
}

impl Subscriber {
    /// A subscriber that prefers node `prefer` (the next running one while it is down).
    pub fn start(name: &str, project: &str, read_key: &str, dir: Directory, prefer: usize) -> Self {
        let feed: Arc<Mutex<Feed>> = Arc::default();
        let (hop, hops) = tokio::sync::watch::channel(0u64);
        let task = tokio::spawn(run_subscriber(
            name.to_string(),
            project.to_string(),
            read_key.to_string(),
            dir,
            prefer,
            hops,
            feed.clone(),
        ));
        Subscriber {
            name: name.to_string(),
            feed,
            hop,
            task,
        }
    }

    /// Closes the socket and resumes (with `since`) on the next running node.
    pub fn hop(&self) {
        self.hop.send_modify(|n| *n += 1);
    }

    /// Waits until the subscriber has subscribed `n` times in all (within `within`).
    pub async fn wait_subscribed(&self, n: usize, within: Duration) {
        self.wait(within, |f| {
            (f.live && f.connections.len() >= n)
                .then_some(())
                .ok_or_else(|| format!("{} subscriptions", f.connections.len()))
        })
        .await
    }

    /// Waits until it has seen `n` events (within `within`).
    pub async fn wait_events(&self, n: usize, within: Duration) {
        self.wait(within, |f| {
            (f.events.len() >= n)
                .then_some(())
                .ok_or_else(|| format!("{} of {n} events", f.events.len()))
        })
        .await
    }

    /// Waits until it got a `status` notice of this `state` (`degraded`, `live`).
    pub async fn wait_status(&self, state: &str, within: Duration) {
        self.wait(within, |f| {
            f.other
                .iter()
                .any(|m| m["type"] == "status" && m["state"] == state)
                .then_some(())
                .ok_or_else(|| format!("no {state} status notice; other messages {:?}", f.other))
        })
        .await
    }

    /// Whether the sentinel arrived; what it saw instead.
    pub fn done(&self) -> Result<(), String> {
        let f = self.feed.lock().unwrap();
        if let Some(failure) = &f.failure {
            return Err(format!("subscriber {} gave up: {failure}", self.name));
        }
        if f.done {
            return Ok(());
        }
        Err(format!(
            "subscriber {}: no sentinel; {} events, last {:?}, connections {:?}, other messages {:?}",
            self.name,
            f.events.len(),
            f.last,
            f.connections,
            f.other
        ))
    }

    async fn wait(&self, within: Duration, check: impl Fn(&Feed) -> Result<(), String>) {
        let deadline = Instant::now() + within;
        loop {
            let seen = {
                let f = self.feed.lock().unwrap();
                if let Some(failure) = &f.failure {
                    panic!("subscriber {} gave up: {failure}", self.name);
                }
                match check(&f) {
                    Ok(()) => return,
                    Err(seen) => seen,
                }
            };
            assert!(
                Instant::now() < deadline,
                "subscriber {}: {seen} within {within:?}",
                self.name
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }
}

/// One subscriber per node (named by the node's id, preferring it), each subscribed before
/// this returns.
pub async fn subscribers_on_every_node(
    nodes: &Nodes,
    p: &crate::support::fixtures::Project,
    dir: &Directory,
) -> Vec<Subscriber> {
    let subscribers: Vec<Subscriber> = (0..nodes.len())
        .map(|i| Subscriber::start(&nodes.ids[i], &p.project, &p.read, dir.clone(), i))
        .collect();
    for s in &subscribers {
        s.wait_subscribed(1, Duration::from_secs(60)).await;
    }
    subscribers
}

/// A webhook receiver and a webhook of every row change of tables `w` and `done` (made through
/// node 1): what the workloads check deliveries against. Returns the receiver and the
/// webhook's id.
pub async fn workload_webhook(
    nodes: &Nodes,
    p: &crate::support::fixtures::Project,
) -> (crate::support::receiver::Receiver, String) {
    let rx = crate::support::receiver::Receiver::start().await;
    let (status, hook) = crate::support::http::call(
        nodes.base(1),
        "POST",
        "/api/webhooks",
        Some(&p.admin),
        json!({ "projectId": p.project, "url": rx.url, "tables": ["w", "done"],
                "events": ["row.inserted", "row.updated", "row.deleted"] }),
    )
    .await;
    assert_eq!(status, 201, "{hook}");
    let id = hook["webhook"]["id"].as_str().unwrap().to_string();
    (rx, id)
}

/// A subscriber's loop: connect to the preferred running node, subscribe (with `since` once it
/// has seen an event), read until the socket closes or the test asks for a hop, and again.
async fn run_subscriber(
    name: String,
    project: String,
    read_key: String,
    dir: Directory,
    prefer: usize,
    mut hops: tokio::sync::watch::Receiver<u64>,
    feed: Arc<Mutex<Feed>>,
) {
    let fail = |why: String| {
        eprintln!("subscriber {name}: {why}");
        feed.lock().unwrap().failure = Some(why);
    };
    let mut at = prefer;
    let mut attempts = 0u32;
    loop {
        attempts += 1;
        if attempts > 600 {
            return fail("could not subscribe in 600 attempts".into());
        }
        let found = {
            let d = dir.lock().unwrap();
            let n = d.len();
            (0..n)
                .map(|k| (at + k) % n)
                .find_map(|i| d[i].clone().map(|b| (i, b)))
        };
        let Some((index, base)) = found else {
            tokio::time::sleep(Duration::from_millis(200)).await;
            continue;
        };
        at = index;
        let node = crate::support::nodes::node_id(index);
        let url = format!("{}/", base.replacen("http", "ws", 1));
        let mut ws = match tokio::time::timeout(
            Duration::from_secs(15),
            tokio_tungstenite::connect_async(url),
        )
        .await
        {
            Ok(Ok((ws, _))) => ws,
            _ => {
                // Down (not yet known to be), or too busy: the next node.
                at += 1;
                tokio::time::sleep(Duration::from_millis(100)).await;
                continue;
            }
        };
        let since = feed.lock().unwrap().last.clone();
        let mut msg = json!({ "type": "subscribe", "roomId": room(&project), "token": read_key });
        if let Some(s) = &since {
            msg["since"] = json!(s);
        }
        if ws.send(Message::text(msg.to_string())).await.is_err() {
            continue;
        }
        // Its answer.
        let answer = loop {
            match tokio::time::timeout(Duration::from_secs(60), ws.next()).await {
                Ok(Some(Ok(Message::Text(t)))) => break Some(serde_json::from_str::<Value>(&t)),
                Ok(Some(Ok(Message::Close(_)))) | Ok(Some(Err(_))) | Ok(None) => break None,
                Ok(Some(Ok(_))) => continue,
                Err(_) => {
                    return fail(format!("no answer to the subscribe on node {node} in 60 s"))
                }
            }
        };
        match answer {
            Some(Ok(m)) if m["type"] == "subscribed" => {}
            Some(Ok(m)) => {
                // Refused: say so, try again a little later (a node still starting up its
                // room, say), a hang guard above.
                eprintln!("subscriber {name}: node {node} answered the subscribe with {m}");
                feed.lock().unwrap().other.push(m);
                tokio::time::sleep(Duration::from_millis(250)).await;
                continue;
            }
            _ => continue,
        }
        {
            let mut f = feed.lock().unwrap();
            f.connections.push((node.clone(), since));
            f.live = true;
        }
        attempts = 0;
        // Read until the socket ends or the test asks for a hop.
        loop {
            tokio::select! {
                changed = hops.changed() => {
                    if changed.is_ok() {
                        at = index + 1;
                    }
                    break;
                }
                m = tokio::time::timeout(Duration::from_secs(300), ws.next()) => {
                    let text = match m {
                        Err(_) => return fail(format!("nothing arrived on node {node} in 300 s")),
                        Ok(Some(Ok(Message::Text(t)))) => t,
                        Ok(Some(Ok(Message::Close(c)))) => {
                            eprintln!("subscriber {name}: node {node} closed the socket: {c:?}");
                            break;
                        }
                        Ok(Some(Ok(_))) => continue,
                        Ok(Some(Err(_))) | Ok(None) => break,
                    };
                    let m: Value = match serde_json::from_str(&text) {
                        Ok(m) => m,
                        Err(e) => return fail(format!("not JSON ({e}): {text}")),
                    };
                    if m["type"] != "db_event" {
                        if m["type"] != "pong" {
                            feed.lock().unwrap().other.push(m);
                        }
                        continue;
                    }
                    let got = parse_event(&m["payload"]);
                    let mut f = feed.lock().unwrap();
                    f.last = Some(got.id.clone());
                    let done = got.table == "done";
                    f.events.push(got);
                    if done {
                        f.done = true;
                        f.live = false;
                        return;
                    }
                }
            }
        }
        feed.lock().unwrap().live = false;
        let _ = ws.close(None).await;
    }
}

fn parse_event(payload: &Value) -> Got {
    let id = payload["id"]
        .as_str()
        .unwrap_or_else(|| panic!("an event without an id: {payload}"))
        .to_string();
    let table = payload["table"].as_str().unwrap_or_default().to_string();
    let operation = payload["operation"].as_str().unwrap_or_default();
    let row = if operation == "DELETE" {
        &payload["old"]
    } else {
        &payload["record"]
    };
    let key = row["s"]
        .as_i64()
        .map(|s| (event_type(operation).to_string(), s));
    Got { id, table, key }
}

/// Asserts a subscriber got exactly `expected` (the committed changes of table `w`, in commit
/// order), each once, and that its event ids only grow.
pub fn assert_exactly_once_in_order(name: &str, feed: &Feed, expected: &[ChangeKey]) {
    for pair in feed.events.windows(2) {
        assert!(
            pair[0].id < pair[1].id,
            "subscriber {name}: event {} came after {} (ids must grow: a repeat or a reorder); connections {:?}",
            pair[1].id,
            pair[0].id,
            feed.connections
        );
    }
    let got: Vec<ChangeKey> = feed
        .events
        .iter()
        .filter(|g| g.table == "w")
        .map(|g| {
            g.key
                .clone()
                .unwrap_or_else(|| panic!("subscriber {name}: an event of w without s: {g:?}"))
        })
        .collect();
    if got != expected {
        let want: BTreeSet<&ChangeKey> = expected.iter().collect();
        let have: BTreeSet<&ChangeKey> = got.iter().collect();
        let missing: Vec<_> = want.difference(&have).take(5).collect();
        let invented: Vec<_> = have.difference(&want).take(5).collect();
        let first_difference = got
            .iter()
            .zip(expected)
            .position(|(a, b)| a != b)
            .unwrap_or(got.len().min(expected.len()));
        panic!(
            "subscriber {name}: got {} changes of w, {} were committed ({} distinct received); \
             missing e.g. {missing:?}, never committed e.g. {invented:?}; the first difference \
             at #{first_difference}: got {:?}, committed {:?}; connections {:?}",
            got.len(),
            expected.len(),
            have.len(),
            got.get(first_difference),
            expected.get(first_difference),
            feed.connections
        );
    }
}
