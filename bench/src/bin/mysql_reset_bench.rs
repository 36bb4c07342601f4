//! The cost of a fresh session per MySQL request: the SQL API resets each pooled connection
//! (`COM_RESET_CONNECTION`, then the session's statement timeout is set again) before it serves
//! the next request. This measures a point query on one connection with that reset between
//! requests, beside the same query with no reset (the reference), in the same run, on a
//! throwaway embedded MariaDB.
//!
//! `BENCH_REQUESTS` (default 5,000) per round, `BENCH_ROUNDS` (default 5) alternating rounds;
//! it prints the median µs per request of each, the ratio, and the reset's own cost.

use std::time::{Duration, Instant};

use anyhow::Result;
use fluxbase::mysql::mysql_async::prelude::Queryable;
use fluxbase::mysql::mysql_async::{self, Conn, OptsBuilder};
use fluxbase_bench::{env_or, repo_root};

async fn round(conn: &mut Conn, n: u64, reset: bool) -> Result<Duration> {
    let started = Instant::now();
    for i in 0..n {
        if reset {
            conn.reset().await?;
        }
        let v: Option<u64> = conn.query_first(format!("SELECT {i} + 1")).await?;
        assert_eq!(v, Some(i + 1));
    }
    Ok(started.elapsed())
}

fn median(mut v: Vec<Duration>) -> Duration {
    v.sort();
    v[v.len() / 2]
}

#[tokio::main]
async fn main() -> Result<()> {
    let requests = env_or("BENCH_REQUESTS", 5_000);
    let rounds = env_or("BENCH_ROUNDS", 5);
    let root = repo_root()?.join("target/bench-mysql-reset");
    let _ = std::fs::remove_dir_all(&root);
    let password = fluxbase::secrets::random_base62(24);
    let server = tokio::task::spawn_blocking(move || {
        fluxbase::mysql::embedded::Server::start(&root, &password, &[])
    })
    .await??;
    let opts = OptsBuilder::from_opts(mysql_async::Opts::from_url(&server.admin_url())?)
        .tcp_nodelay(true)
        // What the SQL API's pools run after every reset.
        .setup(vec![
            "SET SESSION max_statement_time = 30, time_zone = '+00:00'",
        ]);
    let mut conn = Conn::new(opts).await?;
    round(&mut conn, requests / 10, true).await?;
    let (mut plain, mut reset) = (Vec::new(), Vec::new());
    for _ in 0..rounds {
        plain.push(round(&mut conn, requests, false).await?);
        reset.push(round(&mut conn, requests, true).await?);
    }
    let (plain, reset) = (median(plain), median(reset));
    let per = |d: Duration| d.as_secs_f64() * 1e6 / requests as f64;
    println!(
        "point query, no reset (reference): {:>8.1} µs per request",
        per(plain)
    );
    println!(
        "point query after a reset:         {:>8.1} µs per request",
        per(reset)
    );
    println!(
        "reset + setup cost: {:.1} µs per request; ratio {:.2}× the reference",
        per(reset) - per(plain),
        reset.as_secs_f64() / plain.as_secs_f64()
    );
    conn.disconnect().await?;
    tokio::task::spawn_blocking(move || server.stop()).await??;
    Ok(())
}
