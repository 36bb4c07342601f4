//! Cluster mode's drain claims (`webhooks.drain_node`): two nodes' delivery workers on one
//! control database, in process (two `Webhooks` services with two node ids), draining the same
//! webhook at once.

use std::collections::HashMap;
use std::time::Duration;

use fluxbase::control::deliveries::{self, NewDeliveries};
use fluxbase::webhooks::{Settings, Webhooks};
use serde_json::json;

use crate::support::receiver::Receiver;
use crate::support::spawn_webhook_app;

fn node(app: &crate::support::TestApp, id: &str) -> Webhooks {
    let w = Webhooks::new(
        app.app.control.clone(),
        app.app.control.clone(),
        app.app.bus.clone(),
        Settings {
            allow_private: true,
            backoff_scale: 0.01,
            // Both scan all the time: every due webhook is fought over.
            scan_interval: Duration::from_millis(10),
            max_in_flight: 8,
            max_drains: 16,
            large_body_memory: 64 << 20,
            max_drains_per_project: 4,
            max_per_project: 25,
            node_id: Some(id.to_string()),
        },
    );
    // Cluster mode: no outbox writers here (the test stores the deliveries itself).
    w.set_led();
    w
}

/// Stores `n` deliveries of the webhook, numbered from `from` (event ids sort in that order).
async fn store(app: &crate::support::TestApp, project: &str, webhook: &str, from: usize, n: usize) {
    let mut d = NewDeliveries::default();
    for i in from..from + n {
        d.ids.push(format!("del_claims_{webhook}_{i:05}"));
        d.webhook_ids.push(webhook.to_string());
        d.event_ids.push(format!("evt_{i:05}"));
        d.event_types.push("row.inserted".into());
        d.bodies.push(d.texts.len());
        d.texts.push(json!({ "n": i }).to_string());
        d.row_keys.push(Some(format!("row{i}")));
    }
    let client = app.app.control.get().await.unwrap();
    assert_eq!(
        deliveries::insert_batch(&client, project, &d)
            .await
            .unwrap(),
        n as u64
    );
}

#[tokio::test]
async fn two_nodes_draining_one_webhook_never_send_a_first_attempt_twice() {
    let app = spawn_webhook_app().await;
    let f = app.fixture().await;
    let rx = Receiver::start().await;
    // Registered disabled, so that this single-node server's own worker never sends it; then
    // that worker is stopped, and the two nodes' workers start.
    let (status, hook) = app
        .call(
            "POST",
            "/api/webhooks",
            Some(&f.admin),
            Some(
                json!({ "projectId": f.project, "url": rx.url, "events": ["row.inserted"],
                         "enabled": false, "ordering": "strict" }),
            ),
        )
        .await;
    assert_eq!(status, 201, "{hook}");
    let wh = hook["webhook"]["id"].as_str().unwrap().to_string();
    app.app.webhooks.stop();
    let (a, b) = (node(&app, "node-a"), node(&app, "node-b"));
    a.start().await.unwrap();
    b.start().await.unwrap();

    let control = app.app.control.get().await.unwrap();
    store(&app, &f.project, &wh, 0, 150).await;
    control
        .execute(
            "UPDATE fluxbase.webhooks SET enabled = true WHERE id = $1",
            &[&wh],
        )
        .await
        .unwrap();
    // More while both drain.
    for wave in 1..4 {
        tokio::time::sleep(Duration::from_millis(30)).await;
        store(&app, &f.project, &wh, wave * 150, 150).await;
    }
    let total = 600;
    rx.wait_for(total).await;
    // Time for a duplicate to show up, if one were on its way.
    tokio::time::sleep(Duration::from_millis(500)).await;
    let got = rx.got.lock().unwrap().clone();
    let mut seen: HashMap<String, usize> = HashMap::new();
    for r in &got {
        *seen.entry(r.delivery_id().to_string()).or_default() += 1;
    }
    let twice: Vec<_> = seen.iter().filter(|(_, n)| **n > 1).collect();
    assert!(
        twice.is_empty(),
        "{} deliveries sent more than once, e.g. {:?}",
        twice.len(),
        &twice[..twice.len().min(3)]
    );
    assert_eq!(seen.len(), total);
    // One in flight at a time, oldest first, whichever node sent each.
    let order: Vec<&str> = got.iter().map(|r| r.delivery_id()).collect();
    let mut sorted = order.clone();
    sorted.sort();
    assert_eq!(order, sorted, "sent out of commit order");
    // Every claim given back.
    let row = control
        .query_one(
            "SELECT drain_node, drain_until FROM fluxbase.webhooks WHERE id = $1",
            &[&wh],
        )
        .await
        .unwrap();
    let holder: Option<String> = row.get(0);
    assert_eq!(holder, None);

    // A node that died holding the claim: nobody sends until it expires, then another does
    // (the same delivery ids).
    control
        .execute(
            "UPDATE fluxbase.webhooks SET drain_node = 'node-dead',
                 drain_until = now() + interval '1500 milliseconds' WHERE id = $1",
            &[&wh],
        )
        .await
        .unwrap();
    store(&app, &f.project, &wh, total, 5).await;
    tokio::time::sleep(Duration::from_millis(700)).await;
    assert_eq!(
        rx.got.lock().unwrap().len(),
        total,
        "sent under another node's claim"
    );
    let got = rx.wait_for(total + 5).await;
    assert_eq!(got.len(), total + 5);
    assert_eq!(
        got[total].delivery_id(),
        format!("del_claims_{wh}_{total:05}")
    );
    // Each is marked delivered after its receiver answered: soon after the last arrived.
    let deadline = std::time::Instant::now() + Duration::from_secs(20);
    loop {
        let pending: i64 = control
            .query_one(
                "SELECT count(*) FROM fluxbase.webhook_deliveries WHERE webhook_id = $1 AND status <> 'delivered'",
                &[&wh],
            )
            .await
            .unwrap()
            .get(0);
        if pending == 0 {
            break;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "{pending} deliveries never marked delivered"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }

    // A graceful stop hands the claim over at once: the drainer ends after its attempt in
    // flight (held here, then answered 503) and gives the claim back; the other node sends the
    // rest without waiting for the claim to expire.
    rx.hold();
    store(&app, &f.project, &wh, total + 5, 20).await;
    let (held, _) = rx.wait_held(1).await;
    let holder: String = control
        .query_one(
            "SELECT drain_node FROM fluxbase.webhooks WHERE id = $1",
            &[&wh],
        )
        .await
        .unwrap()
        .get(0);
    let stopping = if holder == "node-a" { &a } else { &b };
    let started = std::time::Instant::now();
    let (_, ()) = tokio::join!(stopping.hand_over(Duration::from_secs(12)), async {
        tokio::time::sleep(Duration::from_millis(200)).await;
        rx.release();
    });
    assert!(
        started.elapsed() < Duration::from_secs(5),
        "{:?}",
        started.elapsed()
    );
    let got = rx.wait_for(held + 1 + 20).await;
    let after: std::collections::HashSet<&str> =
        got[held + 1..].iter().map(|r| r.delivery_id()).collect();
    assert_eq!(
        after.len(),
        20,
        "the other node sent the rest, the held one again"
    );
    let now: Option<String> = control
        .query_one(
            "SELECT drain_node FROM fluxbase.webhooks WHERE id = $1",
            &[&wh],
        )
        .await
        .unwrap()
        .get(0);
    assert_ne!(now.as_deref(), Some(holder.as_str()));
    a.stop();
    b.stop();
    app.stop().await;
}
