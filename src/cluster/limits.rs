//! Cluster-wide rate limits: each node keeps its own sliding-window limiter
//! ([`crate::auth::ratelimit::RateLimiter`]) and announces the requests it counted on core NATS;
//! every other node counts them too.
//!
//! ```text
//!  node A: request ─► limiter.check (local, no wait) ─► pending hits ─(every FLUSH, ≤ MAX_BATCH)─►
//!          NATS fluxbase.limits.<limiter>  [version, node id, caller hashes]
//!  node B, C: subscriber ─► not their own ─► limiter.record_shared(hash) for each
//! ```
//!
//! * A caller is announced as the first 64 bits of HMAC-SHA256 of its name under a key derived
//!   from the instance secret (which every node of a cluster shares): the same caller is the same
//!   entry on every node; the name itself (a key id, a session's token hash) never leaves the
//!   node, and the hash means nothing without the secret.
//! * Tolerance: a node learns of another's hits after at most [`FLUSH`] plus the NATS hop (a
//!   fraction of a millisecond on a LAN). Within that delay each node admits on what it knows,
//!   so across the cluster a caller gets at most the limit plus what it sent to the other nodes
//!   in the last few milliseconds: nothing for a steady client, and at worst one window's limit
//!   per node for a burst that lands on every node within the same few milliseconds.
//! * NATS down: announcements are dropped (not queued) and each node limits on its own, at most
//!   `nodes ×` the limit in all, until NATS is back.
//! * No announcement is sent for a node that has no hits to announce, and a burst costs one
//!   message per [`FLUSH`] per node, not one per request.

use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

use futures_util::StreamExt;

use super::Cluster;
use crate::auth::ratelimit::{RateLimiter, Sharing};

/// How long a node gathers hits before announcing them.
pub const FLUSH: Duration = Duration::from_millis(2);
/// At most this many hits per message (8 bytes each).
pub const MAX_BATCH: usize = 4096;
const VERSION: u8 = 1;

/// The subject a limiter's hits are announced on.
pub fn subject(limiter: &str) -> String {
    format!("fluxbase.limits.{limiter}")
}

/// `[version][node id length][node id][hash: u64 big-endian]…`
pub fn encode(node: &str, hashes: &[u64]) -> Vec<u8> {
    let node = &node.as_bytes()[..node.len().min(255)];
    let mut out = Vec::with_capacity(2 + node.len() + 8 * hashes.len());
    out.push(VERSION);
    out.push(node.len() as u8);
    out.extend_from_slice(node);
    for h in hashes {
        out.extend_from_slice(&h.to_be_bytes());
    }
    out
}

/// The announcing node and its hits, or `None` for a message this version cannot read.
pub fn decode(message: &[u8]) -> Option<(&str, Vec<u64>)> {
    let (&version, rest) = message.split_first()?;
    if version != VERSION {
        return None;
    }
    let (&len, rest) = rest.split_first()?;
    if rest.len() < len as usize {
        return None;
    }
    let (node, hashes) = rest.split_at(len as usize);
    let node = std::str::from_utf8(node).ok()?;
    if hashes.len() % 8 != 0 {
        return None;
    }
    Some((
        node,
        hashes
            .chunks_exact(8)
            .map(|c| u64::from_be_bytes(c.try_into().expect("8 bytes")))
            .collect(),
    ))
}

/// Shares `limiter`'s hits across the cluster under `name` (`keys`, `sessions`): hashes callers
/// with `key` (the same on every node), announces what this node counts and counts what the
/// others announce. The tasks end when the limiter is dropped.
pub fn share(
    cluster: &Arc<Cluster>,
    limiter: &Arc<RateLimiter>,
    name: &str,
    key: &[u8],
) -> Option<Arc<Sharing>> {
    let sharing = limiter.share(key)?;
    tokio::spawn(announce(
        cluster.clone(),
        sharing.clone(),
        Arc::downgrade(limiter),
        subject(name),
    ));
    tokio::spawn(listen(
        cluster.clone(),
        Arc::downgrade(limiter),
        Arc::downgrade(&sharing),
        subject(name),
    ));
    Some(sharing)
}

/// Announces this node's hits: a hit after a quiet spell goes out at once; while hits keep
/// coming, what gathered goes out every [`FLUSH`] (one message, not one per request).
async fn announce(
    cluster: Arc<Cluster>,
    sharing: Arc<Sharing>,
    limiter: std::sync::Weak<RateLimiter>,
    subject: String,
) {
    loop {
        sharing.wake.notified().await;
        loop {
            if limiter.strong_count() == 0 {
                return; // The server is gone.
            }
            let hits = sharing.take();
            if hits.is_empty() {
                break;
            }
            // NATS down: dropped; each node limits on its own until it is back.
            if cluster.connected() {
                for batch in hits.chunks(MAX_BATCH) {
                    let body = encode(&cluster.node_id, batch);
                    match cluster.nats.publish(subject.clone(), body.into()).await {
                        Ok(()) => {
                            sharing.messages.fetch_add(1, Ordering::Relaxed);
                            sharing
                                .announced
                                .fetch_add(batch.len() as u64, Ordering::Relaxed);
                        }
                        Err(e) => {
                            tracing::debug!(error = %e, subject, "announcing rate limit hits")
                        }
                    }
                }
            }
            tokio::time::sleep(FLUSH).await;
        }
    }
}

/// Counts the other nodes' hits.
async fn listen(
    cluster: Arc<Cluster>,
    limiter: std::sync::Weak<RateLimiter>,
    sharing: std::sync::Weak<Sharing>,
    subject: String,
) {
    loop {
        match cluster.nats.subscribe(subject.clone()).await {
            Ok(mut sub) => {
                while let Some(message) = sub.next().await {
                    let Some(limiter) = limiter.upgrade() else {
                        return;
                    };
                    match decode(&message.payload) {
                        Some((node, hashes)) if node != cluster.node_id => {
                            if let Some(s) = sharing.upgrade() {
                                s.heard.fetch_add(hashes.len() as u64, Ordering::Relaxed);
                            }
                            for h in hashes {
                                limiter.record_shared(h);
                            }
                        }
                        Some(_) => {}
                        None => tracing::debug!(subject, "an unreadable rate limit announcement"),
                    }
                }
            }
            Err(e) => tracing::debug!(error = %e, subject, "subscribing to rate limit hits"),
        }
        if limiter.strong_count() == 0 {
            return;
        }
        tokio::time::sleep(Duration::from_secs(1)).await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn announcements_read_back_and_refuse_what_they_cannot_read() {
        let body = encode("node-a", &[1, u64::MAX, 0x0102_0304_0506_0708]);
        assert_eq!(body.len(), 2 + 6 + 24);
        let (node, hashes) = decode(&body).unwrap();
        assert_eq!(node, "node-a");
        assert_eq!(hashes, vec![1, u64::MAX, 0x0102_0304_0506_0708]);
        assert_eq!(decode(&encode("n", &[])).unwrap().1, Vec::<u64>::new());
        for bad in [
            &b""[..],
            &[2, 1, b'a'][..],             // another version
            &[1, 9, b'a'][..],             // node id cut short
            &[1, 1, b'a', 1, 2, 3][..],    // a hash cut short
            &[1, 2, 0xff, 0xfe, 0, 0][..], // node id not UTF-8
        ] {
            assert!(decode(bad).is_none(), "{bad:?}");
        }
        assert_eq!(subject("keys"), "fluxbase.limits.keys");
    }

    #[test]
    fn callers_hash_alike_on_every_node_and_only_with_the_shared_key() {
        let a = RateLimiter::new(3, 10);
        let b = RateLimiter::new(3, 10);
        let sa = a.share(b"shared").unwrap();
        let sb = b.share(b"shared").unwrap();
        assert!(a.share(b"again").is_none(), "shared once");
        assert_eq!(sa.hash("key:k_1"), sb.hash("key:k_1"));
        assert_ne!(sa.hash("key:k_1"), sa.hash("key:k_2"));
        let other = Sharing::new(b"another cluster");
        assert_ne!(other.hash("key:k_1"), sa.hash("key:k_1"));
        // The announcement carries the hash, not the name.
        let body = encode("a", &[sa.hash("key:k_1")]);
        assert!(!body.windows(7).any(|w| w == b"key:k_1"));
        assert!(
            RateLimiter::new(0, 10).share(b"shared").is_none(),
            "no limit, nothing shared"
        );
    }

    #[test]
    fn hits_counted_on_one_node_count_on_the_others() {
        let a = RateLimiter::new(3, 10);
        let b = RateLimiter::new(3, 10);
        let sa = a.share(b"shared").unwrap();
        let sb = b.share(b"shared").unwrap();
        a.check("key:k_1").unwrap();
        a.check("key:k_1").unwrap();
        a.check("key:k_2").unwrap();
        // What a's announcer sends, b's listener counts.
        let body = encode("a", &sa.take());
        let (node, hits) = decode(&body).unwrap();
        assert_eq!(node, "a");
        assert_eq!(hits.len(), 3);
        assert!(sa.take().is_empty());
        for h in hits {
            b.record_shared(h);
        }
        b.check("key:k_1").unwrap();
        assert!(
            b.check("key:k_1").is_err(),
            "two on a, one on b: the limit of 3"
        );
        b.check("key:k_2").unwrap();
        b.check("key:k_2").unwrap();
        assert!(b.check("key:k_2").is_err());
        // What b admitted is announced; what it refused, and what it only heard of, is not.
        assert_eq!(sb.take().len(), 3);
    }
}
