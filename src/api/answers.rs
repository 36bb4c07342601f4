//! The bytes of SQL answers in flight: a budget shared by the whole server, a cap per client
//! address, and a deadline for the client to take an answer.
//!
//! ```text
//!  execute-sql ─► answer built (String, at most about max_response_bytes)
//!        │ take(client, capacity) ──(budget or the address's cap spent)──► 429 RATE_LIMIT
//!        ▼ Answer { text, Reservation, DeadlineGuard } as Bytes::from_owner
//!  hyper writes it ──► every byte handed to the socket: Bytes dropped, reservation given back
//!        └─ not taken within sql_answer_send_timeout_secs: the listener drops the connection
//!           (listener::SendDeadline), which drops the body and gives the reservation back
//! ```
//!
//! An answer is reserved once it is built, for the capacity its text holds (shrunk to its
//! length first when much larger: for a large answer glibc shrinks an mmap'd block with
//! `mremap`, no copy). While an answer is being built it is bounded by `max_response_bytes`
//! and the number of requests that may run at once (each project's `sql_project_connections`,
//! the server's `sql_max_connections`); what this budget bounds is the answers *held* after
//! that, waiting for slow clients, which before were bounded only by the connection cap per
//! address (red-team finding: eight slow readers per wave, ~45 MB each, the server at 1.1 GB
//! after three waves).
//!
//! The same idea as the storage read budget (`storage::buffers`): the reservation lives in the
//! `Bytes` the HTTP layer sends, so it is given back exactly when hyper has dropped them (sent,
//! or the connection gone). Unlike a download, an answer cannot fall back to small chunks (it
//! already exists whole), so an answer that finds the budget spent is refused at once (never a
//! wait): 429 `RATE_LIMIT` with `Retry-After: 1`, like the project's other bounded shares.

use std::net::IpAddr;
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::sync::Arc;

use bytes::Bytes;

use crate::api::listener::{DeadlineGuard, SendDeadline};
use crate::auth::ratelimit::{AddressHold, AddressLedger};
use crate::metrics::Metrics;

// The defaults live with the settings (src/config.rs: a domain module may not import the
// HTTP layer); re-exported here for this module's readers.
pub use crate::config::{
    DEFAULT_SQL_ANSWER_BUDGET as DEFAULT_BUDGET,
    DEFAULT_SQL_ANSWER_PER_ADDRESS as DEFAULT_PER_ADDRESS,
    DEFAULT_SQL_ANSWER_SEND_TIMEOUT_SECS as DEFAULT_SEND_TIMEOUT_SECS,
};
/// A text whose capacity passes its length by more than this is shrunk before it is reserved.
const SLACK: usize = 64 * 1024;

/// Answer bytes held now, in total and per client address.
pub struct AnswerBudget {
    budget: u64,
    per_address: u64,
    total: AtomicU64,
    /// `None`: requests without a known client address share one entry.
    by_address: Arc<AddressLedger>,
    metrics: Arc<Metrics>,
}

/// Why an answer was not reserved.
#[derive(Debug, PartialEq, Eq)]
pub enum Refusal {
    /// The client's address holds `held` bytes of answers; this one would pass its cap.
    Address { held: u64, cap: u64 },
    /// The server's budget is spent.
    Server { budget: u64 },
}

impl std::fmt::Display for Refusal {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Refusal::Address { held, cap } => write!(
                f,
                "Too many SQL answer bytes in flight to this address ({held} bytes not yet read \
                 by the client; limit sql_answer_budget_per_address_bytes = {cap}). Read or close \
                 the earlier answers and retry."
            ),
            Refusal::Server { budget } => write!(
                f,
                "The server holds too many SQL answers its clients have not read yet (limit \
                 sql_answer_budget_bytes = {budget}). Retry shortly."
            ),
        }
    }
}

/// A share of the budget, given back when dropped.
pub struct Reservation {
    home: Arc<AnswerBudget>,
    _address: AddressHold,
    bytes: u64,
}

impl AnswerBudget {
    pub fn new(budget: u64, per_address: u64, metrics: Arc<Metrics>) -> Arc<AnswerBudget> {
        Arc::new(AnswerBudget {
            budget,
            per_address,
            total: AtomicU64::new(0),
            by_address: Default::default(),
            metrics,
        })
    }

    /// `bytes` for an answer to `client`, if both the address's cap and the server's budget
    /// have room now (never waits).
    pub fn take(
        self: &Arc<Self>,
        client: Option<IpAddr>,
        bytes: u64,
    ) -> Result<Reservation, Refusal> {
        // The address first (given back if the budget is spent), so two answers to one
        // client cannot both pass its cap.
        let address = self
            .by_address
            .hold(client, bytes, self.per_address)
            .map_err(|held| Refusal::Address {
                held,
                cap: self.per_address,
            })?;
        self.total
            .fetch_update(Relaxed, Relaxed, |t| {
                (t + bytes <= self.budget).then_some(t + bytes)
            })
            .map_err(|_| Refusal::Server {
                budget: self.budget,
            })?;
        self.metrics
            .sql_answer_bytes_in_flight
            .fetch_add(bytes, Relaxed);
        Ok(Reservation {
            home: self.clone(),
            _address: address,
            bytes,
        })
    }

    /// Answer bytes held now.
    pub fn in_flight(&self) -> u64 {
        self.total.load(Relaxed)
    }

    /// Client addresses holding answers now.
    pub fn addresses(&self) -> usize {
        self.by_address.addresses()
    }

    /// `text` as the body of an answer to `client`: reserved for the capacity it holds, and
    /// with `deadline` (the connection's) running while it is held. The reservation and the
    /// deadline end when the last of the returned bytes is dropped.
    pub fn answer(
        self: &Arc<Self>,
        mut text: String,
        client: Option<IpAddr>,
        deadline: Option<(&SendDeadline, std::time::Duration)>,
    ) -> Result<Bytes, Refusal> {
        if text.capacity() - text.len() > SLACK {
            text.shrink_to_fit();
        }
        let reservation = match self.take(client, text.capacity() as u64) {
            Ok(r) => r,
            Err(refusal) => {
                self.metrics.sql_answers_refused.fetch_add(1, Relaxed);
                return Err(refusal);
            }
        };
        let guard = deadline.map(|(slot, within)| slot.set(within));
        Ok(Bytes::from_owner(Answer {
            text,
            _reservation: reservation,
            _deadline: guard,
        }))
    }
}

impl Drop for Reservation {
    fn drop(&mut self) {
        self.home.total.fetch_sub(self.bytes, Relaxed);
        self.home
            .metrics
            .sql_answer_bytes_in_flight
            .fetch_sub(self.bytes, Relaxed);
    }
}

/// An answer lent to the HTTP layer as `Bytes`.
struct Answer {
    text: String,
    _reservation: Reservation,
    _deadline: Option<DeadlineGuard>,
}

impl AsRef<[u8]> for Answer {
    fn as_ref(&self) -> &[u8] {
        self.text.as_bytes()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ip(s: &str) -> Option<IpAddr> {
        Some(s.parse().unwrap())
    }

    #[test]
    fn the_address_cap_and_the_budget_bound_what_is_held_and_come_back_with_the_bytes() {
        let budget = AnswerBudget::new(100, 60, Default::default());
        let a = budget.answer("x".repeat(50), ip("10.0.0.1"), None).unwrap();
        assert_eq!(budget.in_flight(), 50);
        assert_eq!(
            budget
                .answer("y".repeat(20), ip("10.0.0.1"), None)
                .unwrap_err(),
            Refusal::Address { held: 50, cap: 60 }
        );
        let b = budget.answer("z".repeat(45), ip("10.0.0.2"), None).unwrap();
        assert_eq!(
            budget
                .answer("w".repeat(10), ip("10.0.0.3"), None)
                .unwrap_err(),
            Refusal::Server { budget: 100 }
        );
        assert_eq!(budget.metrics.sql_answers_refused.load(Relaxed), 2);
        let slice = a.slice(10..20);
        drop(a);
        assert_eq!(budget.in_flight(), 95, "a slice still holds the answer");
        assert_eq!(&slice[..], b"xxxxxxxxxx");
        drop(slice);
        assert_eq!(budget.in_flight(), 45);
        assert_eq!(budget.metrics.sql_answer_bytes_in_flight.load(Relaxed), 45);
        drop(b);
        assert_eq!((budget.in_flight(), budget.addresses()), (0, 0));
        assert!(budget.answer("v".repeat(60), None, None).is_ok());
    }

    #[test]
    fn what_is_reserved_is_the_capacity_held_shrunk_when_far_larger() {
        let budget = AnswerBudget::new(1 << 30, 1 << 30, Default::default());
        let mut text = String::with_capacity(4 << 20);
        text.push_str("{}");
        let body = budget.answer(text, None, None).unwrap();
        assert!(
            budget.in_flight() < 2 * SLACK as u64,
            "{}",
            budget.in_flight()
        );
        drop(body);
        let mut text = String::with_capacity(1000);
        text.push_str("{}");
        let _body = budget.answer(text, None, None).unwrap();
        assert_eq!(budget.in_flight(), 1000, "small slack is kept and counted");
    }
}
