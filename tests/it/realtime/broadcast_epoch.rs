//! A broadcast id is never issued twice, even when a power loss took the last broadcasts off
//! the history's tail (the seq carries a durable boot epoch).

use serde_json::Value;

use crate::support::fixtures::{project, Project};
use crate::support::http::{rest_broadcast, sql};
use crate::support::process::ServerProcess;
use crate::support::ws::{next, row, subscribed, Socket};

/// The next broadcast message's id (skipping anything else).
async fn broadcast_id(ws: &mut Socket) -> String {
    for _ in 0..100 {
        let m: Value = next(ws).await;
        if m["type"] == "broadcast" {
            return m["id"].as_str().expect("an id").to_string();
        }
    }
    panic!("no broadcast");
}

async fn watcher(server: &ServerProcess, p: &Project) -> Socket {
    subscribed(&server.base, p, None).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_broadcast_id_lost_with_the_history_tail_is_never_reissued() {
    let mut server = ServerProcess::start(&[]).await;
    let p = project(&server.base).await;
    sql(
        &server.base,
        &p.admin,
        &p.project,
        "CREATE TABLE t (id int)",
    )
    .await;
    let mut ws = watcher(&server, &p).await;
    sql(
        &server.base,
        &p.admin,
        &p.project,
        "INSERT INTO t VALUES (0)",
    )
    .await;
    row(&mut ws).await;
    rest_broadcast(&server.base, &p, "first").await;
    let b1 = broadcast_id(&mut ws).await;
    rest_broadcast(&server.base, &p, "second").await;
    let b2 = broadcast_id(&mut ws).await;
    assert!(b1 < b2);
    drop(ws);
    server.kill9();
    // A power loss: the page cache never reached the disk, the last record is gone.
    let dir = server.dir.join("realtime").join(&p.project);
    let newest = std::fs::read_dir(&dir)
        .unwrap()
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| p.extension().is_some_and(|x| x == "seg"))
        .max()
        .expect("a segment");
    let data = std::fs::read(&newest).unwrap();
    let mut at = 0usize;
    let mut last = 0usize;
    while at + 8 <= data.len() {
        last = at;
        at += 8 + u32::from_le_bytes(data[at..at + 4].try_into().unwrap()) as usize;
    }
    assert!(
        String::from_utf8_lossy(&data[last..]).contains(&b2),
        "the last record is the second broadcast"
    );
    std::fs::write(&newest, &data[..last]).unwrap();
    server.restart().await;
    let mut ws = watcher(&server, &p).await;
    rest_broadcast(&server.base, &p, "third").await;
    let b3 = broadcast_id(&mut ws).await;
    assert_ne!(b3, b2, "a lost broadcast's id was issued again");
    assert!(b3 > b2, "{b3} sorts after every id issued before ({b2})");
    assert_eq!(b3[..25], b1[..25], "same event position");
}
