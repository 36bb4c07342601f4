//! Reading the in-process event bus directly (what the change stream published), each read
//! within a deadline.

use std::sync::Arc;
use std::time::Duration;

use fluxbase::bus::{Event, Subscription};
use serde_json::Value;

/// The next event, within 20 s.
pub async fn next_event(sub: &mut Subscription) -> Arc<Event> {
    next_event_within(sub, Duration::from_secs(20)).await
}

pub async fn next_event_within(sub: &mut Subscription, wait: Duration) -> Arc<Event> {
    tokio::time::timeout(wait, sub.recv())
        .await
        .unwrap_or_else(|_| panic!("no event within {wait:?}"))
        .expect("the bus closed the subscription")
}

/// The payloads of the next `n` events.
pub async fn events(sub: &mut Subscription, n: usize) -> Vec<Value> {
    let mut out = Vec::with_capacity(n);
    for _ in 0..n {
        let e = next_event(sub).await;
        out.push(serde_json::from_str(&e.payload).unwrap());
    }
    out
}

/// Nothing more arrives within `wait`.
pub async fn assert_quiet(sub: &mut Subscription, wait: Duration) {
    if let Ok(Some(e)) = tokio::time::timeout(wait, sub.recv()).await {
        panic!("unexpected event: {}", e.payload);
    }
}
