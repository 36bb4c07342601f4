//! Catch-up memory: members resuming from the same place share each decoded chunk of the
//! history (and its frames) instead of each decoding its own copy, and the room reads at most
//! `realtime_catch_up_reads` chunks from disk at once.

use std::time::Duration;

use serde_json::{json, Value};

use crate::support::fixtures::project;
use crate::support::http::{call, sql};
use crate::support::process::ServerProcess;
use crate::support::ws::{connect_to, next, room, row, send, subscribed};

fn metric(text: &str, name: &str) -> u64 {
    text.lines()
        .find_map(|l| l.strip_prefix(&format!("{name} ")))
        .and_then(|v| v.trim().parse().ok())
        .unwrap_or_else(|| panic!("no {name} in {text}"))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn members_resuming_from_the_same_place_share_the_decoded_backlog() {
    const SOCKETS: usize = 24;
    const ROWS: i64 = 8192;
    let server = ServerProcess::start(&[("FLUXBASE_REALTIME_SEND_QUEUE_BYTES", "65536")]).await;
    let p = project(&server.base).await;
    sql(
        &server.base,
        &p.admin,
        &p.project,
        "CREATE TABLE t (id int, note text)",
    )
    .await;
    let mut ws = subscribed(&server.base, &p, None).await;
    sql(
        &server.base,
        &p.admin,
        &p.project,
        "INSERT INTO t VALUES (0, '')",
    )
    .await;
    let (_, since) = row(&mut ws).await;
    // About 1 KiB per row, 8 MiB of backlog: 32 chunks of 256 events.
    sql(
        &server.base,
        &p.admin,
        &p.project,
        &format!(
            "INSERT INTO t SELECT g, repeat(md5(g::text), 32) FROM generate_series(1, {ROWS}) g"
        ),
    )
    .await;
    // The whole backlog is in the history before anyone resumes: resumers that reach its end
    // while the pump still stores it go live and fall behind again, which reads the growing
    // tail anew (not what this test measures).
    for want in 1..=ROWS {
        assert_eq!(row(&mut ws).await.0, want, "the live subscriber");
    }
    drop(ws);
    let reads_now = || async {
        let (_, metrics) = call(&server.base, "GET", "/metrics", None, Value::Null).await;
        metric(
            metrics["raw"].as_str().unwrap_or_default(),
            "fluxbase_realtime_catch_up_reads_total",
        )
    };
    // One resumer alone: how many chunk reads the backlog takes (chunks are bounded in events
    // and bytes, so this is what a member reading privately costs).
    let solo = {
        let start = reads_now().await;
        let mut ws = connect_to(&server.base, "/").await;
        send(
            &mut ws,
            json!({ "type": "subscribe", "roomId": room(&p.project), "token": p.read, "since": since }),
        )
        .await;
        assert_eq!(next(&mut ws).await["type"], "subscribed");
        for want in 1..=ROWS {
            assert_eq!(row(&mut ws).await.0, want, "the solo resumer");
        }
        reads_now().await - start
    };
    let reads_before = reads_now().await;
    let before = server.peak_rss();
    // The readers keep within one chunk of each other (as members resuming from the same place
    // at the same pace do), so that what is measured is the sharing, not the test's scheduling.
    let step = std::sync::Arc::new(tokio::sync::Barrier::new(SOCKETS));
    let mut readers = Vec::new();
    for i in 0..SOCKETS {
        let (base, since, room_id, read) = (
            server.base.clone(),
            since.clone(),
            room(&p.project),
            p.read.clone(),
        );
        let step = step.clone();
        readers.push(tokio::spawn(async move {
            let mut ws = connect_to(&base, "/").await;
            send(
                &mut ws,
                json!({ "type": "subscribe", "roomId": room_id, "token": read, "since": since }),
            )
            .await;
            assert_eq!(next(&mut ws).await["type"], "subscribed");
            for want in 1..=ROWS {
                assert_eq!(row(&mut ws).await.0, want, "socket {i}");
                if want % 256 == 0 {
                    step.wait().await;
                }
            }
        }));
    }
    for r in readers {
        tokio::time::timeout(Duration::from_secs(300), r)
            .await
            .expect("a resumer never finished")
            .unwrap();
    }
    let after = server.peak_rss();
    let (_, metrics) = call(&server.base, "GET", "/metrics", None, Value::Null).await;
    let text = metrics["raw"].as_str().unwrap_or_default().to_string();
    // The resumers' reads only (the live subscriber and the solo resumer came before).
    let reads = metric(&text, "fluxbase_realtime_catch_up_reads_total") - reads_before;
    let private = SOCKETS as u64 * solo;
    println!(
        "catch-up: {SOCKETS} sockets resuming together: {reads} chunk reads; one alone: {solo} (private copies would be {private}); peak RSS {} MiB -> {} MiB",
        before >> 20,
        after >> 20
    );
    assert!(solo >= 1 && reads >= solo, "{reads} {solo}");
    // At least a third of the private reads saved (measured: 60-75% saved here; members that
    // miss the same chunk at the same moment may each read it: up to the room's read bound).
    assert!(
        reads * 3 <= private * 2,
        "{reads} chunk reads for {SOCKETS} sockets x {solo} chunks: not shared"
    );
}
