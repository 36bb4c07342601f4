//! Several `fluxbase serve` processes as one cluster: one shared control database on the suite's
//! PostgreSQL, one NATS server (`FLUXBASE_NATS_URL`), each node its own data directory and node
//! id (`a`, `b`, `c`, …). Webhooks may reach loopback receivers and retry 100 times faster, as in
//! the other process tests. Who leads a project's change stream is read from
//! `/api/cdc/status` (its `cluster` object), polled with a deadline. Every node is killed on
//! drop (each is a [`ServerProcess`]); its log is `<data dir>/server.log` (`CLUSTER_TEST_LOG`
//! sets the nodes' `FLUXBASE_LOG`, e.g. `info,fluxbase::cluster=debug`).

use std::time::{Duration, Instant};

use serde_json::Value;

use super::fixtures::Project;
use super::nats::nats;
use super::process::ServerProcess;

/// The environment every node gets, before the test's own.
const BASE_ENV: &[(&str, &str)] = &[
    ("FLUXBASE_WEBHOOK_ALLOW_PRIVATE", "true"),
    ("FLUXBASE_WEBHOOK_BACKOFF_SCALE", "0.01"),
    ("FLUXBASE_MAX_CONNECTIONS_PER_ADDRESS", "0"),
];

/// `n` nodes of one cluster.
pub struct Nodes {
    nodes: Vec<ServerProcess>,
    /// Node ids, by index: `a`, `b`, `c`, ….
    pub ids: Vec<String>,
    /// False once a node was killed or terminated (until it is started again).
    alive: Vec<bool>,
    pub nats_url: String,
    http: reqwest::Client,
}

/// The node id of the `i`-th node: `a`, `b`, `c`, ….
pub fn node_id(i: usize) -> String {
    assert!(i < 26, "at most 26 nodes");
    ((b'a' + i as u8) as char).to_string()
}

impl Nodes {
    /// `n` nodes on the suite's shared NATS server, with `extra_env` added (after, so it can
    /// override, the defaults).
    pub async fn start(n: usize, extra_env: &[(&str, &str)]) -> Nodes {
        let url = nats().await.url();
        Self::start_with_nats(&url, n, extra_env).await
    }

    /// `n` nodes on the NATS server at `nats_url` (a test's own, which it may restart).
    pub async fn start_with_nats(nats_url: &str, n: usize, extra_env: &[(&str, &str)]) -> Nodes {
        assert!(n >= 1);
        let ids: Vec<String> = (0..n).map(node_id).collect();
        let env_of = |id: &str| -> Vec<(String, String)> {
            let mut env: Vec<(String, String)> = BASE_ENV
                .iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect();
            env.push(("FLUXBASE_NATS_URL".into(), nats_url.to_string()));
            env.push(("FLUXBASE_NODE_ID".into(), id.to_string()));
            // The nodes' log level (their `<data dir>/server.log`) when a run asks for more.
            if let Ok(level) = std::env::var("CLUSTER_TEST_LOG") {
                env.push(("FLUXBASE_LOG".into(), level));
            }
            env.extend(
                extra_env
                    .iter()
                    .map(|(k, v)| (k.to_string(), v.to_string())),
            );
            env
        };
        // The first node creates and migrates the control database; the others join it.
        let env = env_of(&ids[0]);
        let first = ServerProcess::start(&pairs(&env)).await;
        let control = first.control_database().to_string();
        let mut nodes = vec![first];
        let rest = futures_util::future::join_all(ids[1..].iter().map(|id| {
            let env = env_of(id);
            let control = control.clone();
            async move { ServerProcess::start_on(&control, &pairs(&env)).await }
        }))
        .await;
        nodes.extend(rest);
        Nodes {
            nodes,
            alive: vec![true; n],
            ids,
            nats_url: nats_url.to_string(),
            http: reqwest::Client::builder()
                .timeout(Duration::from_secs(10))
                .build()
                .unwrap(),
        }
    }

    pub fn len(&self) -> usize {
        self.nodes.len()
    }

    /// The base URL of node `i` (it changes when the node is started again).
    pub fn base(&self, i: usize) -> &str {
        &self.nodes[i].base
    }

    pub fn node(&self, i: usize) -> &ServerProcess {
        &self.nodes[i]
    }

    /// The index of the node with this id.
    pub fn index_of(&self, id: &str) -> usize {
        self.ids
            .iter()
            .position(|n| n == id)
            .unwrap_or_else(|| panic!("no node {id:?} among {:?}", self.ids))
    }

    pub fn is_alive(&self, i: usize) -> bool {
        self.alive[i]
    }

    /// The indexes of the nodes running.
    pub fn alive(&self) -> Vec<usize> {
        (0..self.len()).filter(|&i| self.alive[i]).collect()
    }

    /// The first running node at or after `i` (wrapping): where a client of node `i` goes
    /// when node `i` is down.
    pub fn alive_from(&self, i: usize) -> usize {
        (0..self.len())
            .map(|k| (i + k) % self.len())
            .find(|&j| self.alive[j])
            .expect("no node is running")
    }

    /// The control database all nodes share.
    pub fn control_database(&self) -> &str {
        self.nodes[0].control_database()
    }

    /// SIGKILL of node `i`, reaped.
    pub fn kill9(&mut self, i: usize) {
        self.nodes[i].kill9();
        self.alive[i] = false;
    }

    /// SIGTERM of node `i`; returns once it exited (successfully, asserted).
    pub async fn terminate(&mut self, i: usize) {
        let status = self.nodes[i].terminate(Duration::from_secs(120)).await;
        assert!(
            status.success(),
            "node {} exited with {status}",
            self.ids[i]
        );
        self.alive[i] = false;
    }

    /// Starts node `i` again (same data directory, node id and control database; a new port).
    pub async fn restart(&mut self, i: usize) {
        self.nodes[i].restart().await;
        self.alive[i] = true;
    }

    /// `GET /api/cdc/status` of the project on node `i`: (status, body), or `None` when the
    /// node does not answer (it is down, or the request failed).
    pub async fn cdc_status(&self, i: usize, p: &Project) -> Option<(u16, Value)> {
        let url = format!(
            "{}/api/cdc/status?projectId={}",
            self.nodes[i].base, p.project
        );
        let resp = self.http.get(url).bearer_auth(&p.read).send().await.ok()?;
        let status = resp.status().as_u16();
        let body = resp.json().await.unwrap_or(Value::Null);
        Some((status, body))
    }

    /// What node `i` says of the project's leader (`cluster.leader`): `Some(None)` for a null
    /// leader, `None` when the node does not answer or answers no `cluster` object.
    pub async fn leader_seen_by(&self, i: usize, p: &Project) -> Option<Option<String>> {
        let (status, body) = self.cdc_status(i, p).await?;
        if status != 200 || !body["cluster"].is_object() {
            return None;
        }
        Some(body["cluster"]["leader"].as_str().map(str::to_string))
    }

    /// The node leading the project, by the word of that node itself (its `/api/cdc/status`
    /// names itself: it holds the lock); `None` when no running node says it leads.
    pub async fn leader_of(&self, p: &Project) -> Option<String> {
        for i in self.alive() {
            if self.leader_seen_by(i, p).await == Some(Some(self.ids[i].clone())) {
                return Some(self.ids[i].clone());
            }
        }
        None
    }

    /// Polls until a running node other than `not` says it leads the project; its id and when
    /// that was seen. Fails after `within` with what each node said.
    pub async fn wait_leader(
        &self,
        p: &Project,
        not: Option<&str>,
        within: Duration,
    ) -> (String, Instant) {
        let deadline = Instant::now() + within;
        loop {
            if let Some(id) = self.leader_of(p).await {
                if Some(id.as_str()) != not {
                    return (id, Instant::now());
                }
            }
            if Instant::now() > deadline {
                let mut seen = Vec::new();
                for i in 0..self.len() {
                    let said = if self.alive[i] {
                        match self.cdc_status(i, p).await {
                            Some((status, body)) => format!("{status} {}", body["cluster"]),
                            None => "no answer".into(),
                        }
                    } else {
                        "down".into()
                    };
                    seen.push(format!("{}: {said}", self.ids[i]));
                }
                panic!(
                    "no node{} said it leads project {} within {within:?}; the nodes said: {}",
                    not.map(|n| format!(" but {n}")).unwrap_or_default(),
                    p.project,
                    seen.join("; ")
                );
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// Polls until every running node names `leader` as the project's leader (within
    /// `within`).
    pub async fn wait_agreed(&self, p: &Project, leader: &str, within: Duration) {
        let deadline = Instant::now() + within;
        loop {
            let mut said = Vec::new();
            for i in self.alive() {
                said.push((self.ids[i].clone(), self.leader_seen_by(i, p).await));
            }
            if said
                .iter()
                .all(|(_, l)| l.as_ref().and_then(|l| l.as_deref()) == Some(leader))
            {
                return;
            }
            assert!(
                Instant::now() < deadline,
                "the running nodes do not agree that {leader} leads {} within {within:?}: {said:?}",
                p.project
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    /// The last lines of each node's log (for a failure message).
    pub fn logs(&self) -> String {
        let mut out = String::new();
        for (i, n) in self.nodes.iter().enumerate() {
            let log = std::fs::read_to_string(n.dir.join("server.log")).unwrap_or_default();
            // Not the start-up banner (its login and keys).
            let lines: Vec<&str> = log
                .lines()
                .filter(|l| !l.starts_with("  ") && *l != "Fluxbase is ready.")
                .collect();
            out.push_str(&format!(
                "--- node {} ({}):\n{}\n",
                self.ids[i],
                n.dir.join("server.log").display(),
                lines[lines.len().saturating_sub(15)..].join("\n")
            ));
        }
        out
    }
}

fn pairs(env: &[(String, String)]) -> Vec<(&str, &str)> {
    env.iter().map(|(k, v)| (k.as_str(), v.as_str())).collect()
}
