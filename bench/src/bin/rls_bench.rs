//! Row-level security overhead through `POST /api/execute-sql`: a 100,000-row SELECT under a
//! `user_id = auth.uid()` policy created through the policy API, beside the same SELECT with an
//! equivalent WHERE clause on an identical table without RLS, in the same run.
//!
//! The server runs in-process on a throwaway cluster (rate limit off, `max_rows` above the result
//! size). Two identical tables of `BENCH_ROWS` rows (default 200,000), half of them alice's;
//! alice's half is the 100,000-row result. Each round (`BENCH_ROUNDS`, default 7) runs, with the
//! read key as alice, alternating:
//!
//! * rows: `SELECT * FROM items_rls` vs `SELECT * FROM items_plain WHERE user_id = 'alice'`,
//!   every row returned as JSON (the whole request);
//! * aggregate: `SELECT count(*), sum(n)` over the same rows, so the time is the scan and the
//!   policy's evaluation rather than the JSON;
//! * for reference, the aggregate under the same policy written by hand in SQL (`auth.uid()`
//!   called per row, no InitPlan): what the policy API's wrapping avoids.
//!
//! It prints the median of each and the ratios; the target is RLS ≤ 1.5× the plain query.

use std::path::Path;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use fluxbase::embedded::Cluster;
use fluxbase_bench::env_or;
use serde_json::{json, Value};

struct Api {
    http: reqwest::Client,
    base: String,
    project: String,
}

impl Api {
    async fn post(&self, path: &str, key: &str, body: Value) -> Result<Value> {
        let resp = self
            .http
            .post(format!("{}{path}", self.base))
            .bearer_auth(key)
            .json(&body)
            .send()
            .await?;
        let status = resp.status();
        let body: Value = resp.json().await?;
        if !status.is_success() || body["success"] != true {
            bail!("{path}: {status} {body}");
        }
        Ok(body)
    }

    async fn sql(&self, key: &str, uid: Option<&str>, query: &str) -> Result<Value> {
        let mut body = json!({ "projectId": self.project, "query": query });
        if let Some(uid) = uid {
            body["authUid"] = json!(uid);
        }
        self.post("/api/execute-sql", key, body).await
    }

    /// Runs `query` as alice; returns the wall time and the row count.
    async fn timed(&self, key: &str, query: &str) -> Result<(Duration, u64)> {
        let started = Instant::now();
        let body = self.sql(key, Some("alice"), query).await?;
        let elapsed = started.elapsed();
        Ok((elapsed, body["result"]["rowCount"].as_u64().unwrap_or(0)))
    }
}

fn median(mut v: Vec<Duration>) -> Duration {
    v.sort();
    v[v.len() / 2]
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1000.0
}

#[tokio::main]
async fn main() -> Result<()> {
    fluxbase_bench::init_tracing();
    fluxbase_bench::on_throwaway_cluster("rls-bench", fluxbase_bench::FAST.to_vec(), run).await
}

async fn run(cluster: &Cluster, dir: &Path) -> Result<()> {
    let rows = env_or("BENCH_ROWS", 200_000);
    let rounds = env_or("BENCH_ROUNDS", 7).max(1) as usize;
    let (app, running) = fluxbase_bench::start_app(cluster, dir, |c| {
        c.rate_limit_requests = 0;
        c.max_rows = rows as usize + 1;
    })
    .await?;
    let user = fluxbase_bench::bench_user(&app).await?;
    let (project, keys) = app
        .create_project(
            &user.id,
            "rls bench",
            fluxbase::projects::Engine::Postgresql,
        )
        .await
        .map_err(|e| anyhow::anyhow!("creating a project: {e}"))?;
    let key = |scope: &str| {
        keys.all()
            .into_iter()
            .find(|k| k.scope.as_str() == scope)
            .map(|k| k.secret.clone())
            .context("a default key is missing")
    };
    let (admin, read) = (key("admin")?, key("read")?);
    let api = Api {
        http: reqwest::Client::new(),
        base: format!("http://{}", running.addr),
        project: project.id.clone(),
    };
    let result = bench(&api, &admin, &read, rows, rounds).await;
    running.stop().await;
    result
}

async fn bench(api: &Api, admin: &str, read: &str, rows: u64, rounds: usize) -> Result<()> {
    eprintln!("[bench] loading 3 × {rows} rows");
    api.sql(
        admin,
        None,
        &format!(
            "CREATE TABLE items_rls (id int PRIMARY KEY, user_id text NOT NULL, n int, payload text);
             INSERT INTO items_rls
               SELECT g, CASE WHEN g % 2 = 0 THEN 'alice' ELSE 'bob' END, g % 1000, md5(g::text)
               FROM generate_series(1, {rows}) g;
             CREATE TABLE items_plain (LIKE items_rls INCLUDING ALL);
             INSERT INTO items_plain SELECT * FROM items_rls;
             CREATE TABLE items_hand (LIKE items_rls INCLUDING ALL);
             INSERT INTO items_hand SELECT * FROM items_rls;
             ALTER TABLE items_hand ENABLE ROW LEVEL SECURITY;
             CREATE POLICY own ON items_hand FOR SELECT USING (user_id = auth.uid());
             ANALYZE items_rls, items_plain, items_hand"
        ),
    )
    .await?;
    api.post(
        "/api/rls/policies",
        admin,
        json!({ "projectId": api.project, "table": "items_rls", "name": "own rows",
                "command": "SELECT", "using": "user_id = auth.uid()" }),
    )
    .await?;

    let cases = [
        (
            "rows (100k as JSON)",
            "SELECT * FROM items_rls",
            "SELECT * FROM items_plain WHERE user_id = 'alice'",
        ),
        (
            "aggregate",
            "SELECT count(*), sum(n) FROM items_rls",
            "SELECT count(*), sum(n) FROM items_plain WHERE user_id = 'alice'",
        ),
        (
            "aggregate, hand-written policy",
            "SELECT count(*), sum(n) FROM items_hand",
            "SELECT count(*), sum(n) FROM items_plain WHERE user_id = 'alice'",
        ),
    ];
    let expected = rows / 2;
    println!("RLS benchmark: {rows} rows per table, {expected} of them alice's; median of {rounds} rounds");
    println!(
        "{:<32} {:>12} {:>12} {:>8}",
        "case", "RLS ms", "WHERE ms", "ratio"
    );
    let mut verdict = Vec::new();
    for (name, with_rls, plain) in cases {
        // Warm-up: caches, plans, the connection's identity.
        for q in [with_rls, plain] {
            api.timed(read, q).await?;
        }
        let (mut a, mut b) = (Vec::new(), Vec::new());
        for round in 0..rounds {
            let order = if round % 2 == 0 {
                [(with_rls, true), (plain, false)]
            } else {
                [(plain, false), (with_rls, true)]
            };
            for (q, is_rls) in order {
                let (t, count) = api.timed(read, q).await?;
                let want = if q.contains("count(*)") { 1 } else { expected };
                if count != want {
                    bail!("{q}: {count} rows, expected {want}");
                }
                if is_rls { &mut a } else { &mut b }.push(t);
            }
        }
        let (ra, rb) = (median(a), median(b));
        let ratio = ra.as_secs_f64() / rb.as_secs_f64();
        println!("{name:<32} {:>12.1} {:>12.1} {ratio:>7.2}×", ms(ra), ms(rb));
        verdict.push((name, ratio));
    }
    for (name, ratio) in verdict.iter().take(2) {
        println!(
            "target ≤ 1.5× ({name}): {}",
            if *ratio <= 1.5 { "met" } else { "NOT met" }
        );
    }
    Ok(())
}
