//! The `row` ordering's rules, over the pending deliveries one drain holds in memory (a window of
//! the webhook's oldest pending deliveries, in commit order).
//!
//! A delivery may start when
//! * it is due (its retry time has come), and fewer than the cap are in flight;
//! * no earlier delivery in the window shares one of its row keys, whatever that one's state (in
//!   flight, waiting for a retry, or not started): a row's deliveries never overlap and keep
//!   commit order, and a row whose delivery waits for a retry holds that row's later ones;
//! * it is a barrier (a schema change: no keys) only when it is the oldest pending delivery and
//!   nothing else is in flight; and nothing after a barrier starts before it has ended.
//!
//! The window is the oldest pending deliveries, so "earlier in the window" is "earlier pending".
//! It is bounded ([`super::worker`]'s `WINDOW`): when that many pending deliveries are all held,
//! later ones wait until a retry frees one (memory stays bounded; nothing is reordered).

use std::collections::{BTreeMap, HashSet};

use chrono::{DateTime, Utc};

use crate::control::deliveries::{Due, Queued};
use crate::control::webhooks::Secrets;

/// One pending delivery in the window.
pub(super) struct Entry {
    pub queued: Queued,
    pub in_flight: bool,
}

/// A webhook's oldest pending deliveries, in commit order.
#[derive(Default)]
pub(super) struct Window {
    /// By arrival in the window (commit order).
    entries: BTreeMap<u64, Entry>,
    next_seq: u64,
    /// The last delivery read from the outbox: the next page starts after it.
    position: Option<(DateTime<Utc>, String)>,
    in_flight: usize,
    /// The entries not in flight that were due later than when they were last looked at
    /// (retries), and when: [`Window::next_due`] looks at these only.
    waiting: BTreeMap<u64, DateTime<Utc>>,
}

impl Window {
    pub fn len(&self) -> usize {
        self.entries.len()
    }

    pub fn in_flight(&self) -> usize {
        self.in_flight
    }

    /// Where the next page of the outbox starts.
    pub fn position(&self) -> Option<(DateTime<Utc>, &str)> {
        self.position.as_ref().map(|(t, e)| (*t, e.as_str()))
    }

    /// Adds the next pending delivery (in commit order).
    pub fn push(&mut self, queued: Queued) {
        self.position = Some((queued.created_at, queued.event_id.clone()));
        if queued.next_attempt_at > Utc::now() {
            self.waiting.insert(self.next_seq, queued.next_attempt_at);
        }
        self.entries.insert(
            self.next_seq,
            Entry {
                queued,
                in_flight: false,
            },
        );
        self.next_seq += 1;
    }

    /// The deliveries that may start now under the rules above, oldest first, at most `room`.
    pub fn startable(&self, now: DateTime<Utc>, room: usize) -> Vec<u64> {
        let mut out = Vec::new();
        if room == 0 {
            return out;
        }
        let mut held: HashSet<&str> = HashSet::new();
        for (i, (seq, e)) in self.entries.iter().enumerate() {
            let ready = !e.in_flight && e.queued.next_attempt_at <= now;
            match &e.queued.row_keys {
                None => {
                    if i == 0 && ready {
                        out.push(*seq);
                    }
                    break;
                }
                Some(keys) => {
                    if ready && keys.iter().all(|k| !held.contains(k.as_str())) {
                        out.push(*seq);
                        if out.len() == room {
                            break;
                        }
                    }
                    held.extend(keys.iter().map(String::as_str));
                }
            }
        }
        out
    }

    /// Marks a delivery in flight; what sending it takes.
    pub fn start(&mut self, seq: u64, url: &str, secret: &Secrets) -> Due {
        let e = self.entries.get_mut(&seq).expect("a startable delivery");
        e.in_flight = true;
        self.waiting.remove(&seq);
        self.in_flight += 1;
        let q = &e.queued;
        Due {
            id: q.id.clone(),
            body: q.body.clone(),
            body_bytes: q.body_bytes,
            attempts: q.attempts,
            requeues: q.requeues,
            created_at: q.created_at,
            event_type: q.event_type.clone(),
            url: url.to_string(),
            secret: secret.clone(),
        }
    }

    /// The delivery is no longer pending (delivered, or given up).
    pub fn finish(&mut self, seq: u64) {
        self.waiting.remove(&seq);
        if let Some(e) = self.entries.remove(&seq) {
            if e.in_flight {
                self.in_flight -= 1;
            }
        }
    }

    /// The delivery waits for a retry at `next_attempt_at`, holding its row.
    pub fn retry(&mut self, seq: u64, attempts: i32, next_attempt_at: DateTime<Utc>) {
        if let Some(e) = self.entries.get_mut(&seq) {
            if e.in_flight {
                self.in_flight -= 1;
            }
            e.in_flight = false;
            e.queued.attempts = attempts;
            e.queued.next_attempt_at = next_attempt_at;
            self.waiting.insert(seq, next_attempt_at);
        }
    }

    /// When the earliest delivery waiting for its retry comes due after `now` (`None`: none
    /// waits). Those due by `now` are forgotten here: [`Window::startable`] at that same `now`
    /// saw them, and one not started then waits for an earlier delivery of its row, whose end
    /// wakes the drain anyway.
    pub fn next_due(&mut self, now: DateTime<Utc>) -> Option<DateTime<Utc>> {
        self.waiting.retain(|_, at| *at > now);
        self.waiting.values().min().copied()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn queued(n: u32, keys: Option<&[&str]>, due_in_secs: i64) -> Queued {
        let now = Utc::now();
        Queued {
            id: format!("dlv_{n}"),
            body: Some(bytes::Bytes::new()),
            body_bytes: 0,
            attempts: 0,
            requeues: 0,
            created_at: now,
            event_id: format!("{n:08}"),
            event_type: "row.inserted".into(),
            next_attempt_at: now + chrono::Duration::seconds(due_in_secs),
            row_keys: keys.map(|k| k.iter().map(|s| s.to_string()).collect()),
        }
    }

    fn window(items: Vec<Queued>) -> Window {
        let mut w = Window::default();
        for q in items {
            w.push(q);
        }
        w
    }

    #[test]
    fn rows_go_concurrently_but_one_row_waits_for_its_earlier_delivery() {
        let w = window(vec![
            queued(0, Some(&["a"]), 0),
            queued(1, Some(&["b"]), 0),
            queued(2, Some(&["a"]), 0),
            queued(3, Some(&["c"]), 0),
        ]);
        assert_eq!(w.startable(Utc::now(), 10), vec![0, 1, 3]);
        assert_eq!(w.startable(Utc::now(), 2), vec![0, 1]);
    }

    #[test]
    fn a_row_waiting_for_a_retry_holds_its_later_deliveries_only() {
        let mut w = window(vec![
            queued(0, Some(&["a"]), 0),
            queued(1, Some(&["a"]), 0),
            queued(2, Some(&["b"]), 0),
        ]);
        let _ = w.start(0, "u", &Secrets::default());
        w.retry(0, 1, Utc::now() + chrono::Duration::seconds(60));
        assert_eq!(w.in_flight(), 0);
        assert_eq!(w.startable(Utc::now(), 10), vec![2]);
        w.retry(0, 1, Utc::now() - chrono::Duration::seconds(1));
        assert_eq!(w.startable(Utc::now(), 10), vec![0, 2]);
        w.finish(0);
        assert_eq!(w.startable(Utc::now(), 10), vec![1, 2]);
    }

    #[test]
    fn a_key_change_orders_after_both_rows() {
        let w = window(vec![
            queued(0, Some(&["a"]), 0),
            queued(1, Some(&["a", "b"]), 0),
            queued(2, Some(&["b"]), 0),
            queued(3, Some(&["c"]), 0),
        ]);
        assert_eq!(w.startable(Utc::now(), 10), vec![0, 3]);
    }

    #[test]
    fn a_barrier_waits_for_every_earlier_delivery_and_holds_every_later_one() {
        let mut w = window(vec![
            queued(0, Some(&["a"]), 0),
            queued(1, None, 0),
            queued(2, Some(&["b"]), 0),
        ]);
        assert_eq!(w.startable(Utc::now(), 10), vec![0]);
        let _ = w.start(0, "u", &Secrets::default());
        assert!(w.startable(Utc::now(), 10).is_empty());
        w.finish(0);
        assert_eq!(w.startable(Utc::now(), 10), vec![1]);
        let _ = w.start(1, "u", &Secrets::default());
        assert!(w.startable(Utc::now(), 10).is_empty());
        // A barrier waiting for its retry holds everything after it.
        w.retry(1, 1, Utc::now() + chrono::Duration::seconds(60));
        assert!(w.startable(Utc::now(), 10).is_empty());
        w.finish(1);
        assert_eq!(w.startable(Utc::now(), 10), vec![2]);
    }

    #[test]
    fn the_next_page_starts_after_the_last_delivery_read() {
        let mut w = Window::default();
        assert!(w.position().is_none());
        let q = queued(7, Some(&["a"]), 5);
        let at = q.created_at;
        w.push(q);
        assert_eq!(w.position(), Some((at, "00000007")));
        assert!(w.next_due(Utc::now()).is_some_and(|t| t > Utc::now()));
        assert!(w
            .next_due(Utc::now() + chrono::Duration::seconds(6))
            .is_none());
    }
}
