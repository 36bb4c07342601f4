//! The bytes of SQL answers in flight: a budget shared by the whole server, a cap per client
//! address and per project, a part of the budget only small answers may use, and a deadline
//! for the client to take an answer.
//!
//! ```text
//!  execute-sql ─► answer built (String, at most about max_response_bytes)
//!        │ take(asker, capacity) ──(a cap or the budget spent)──► read-only role: 429 RATE_LIMIT
//!        │                                                   └─► a role that writes: the answer
//!        │                                                        without its rows (truncated)
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
//!
//! **What one tenant can take** (red team, session 25: one read key from nine addresses held
//! the whole budget, and every tenant's `SELECT 1` got 429 for a minute): a project holds at
//! most `sql_answer_budget_per_project_bytes`, and an eighth of the budget is kept for answers
//! of at most [`SMALL`] bytes (the usual ones), which large answers may not use.
//!
//! **A request that may have written is never answered 429** (it ran; a client retrying on
//! 429 would write twice): when its answer does not fit, it goes out without its rows —
//! `rows: []`, `truncated: true`, the counts, message and `executionInfo` kept — a few hundred
//! bytes outside the budget. Only the read scope's answers, which cannot have written (a
//! `SECURITY DEFINER` routine an admin made aside), are refused.

use std::net::IpAddr;
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::sync::Arc;

use bytes::Bytes;

use crate::api::listener::{DeadlineGuard, SendDeadline};
use crate::auth::ratelimit::{address_key, AddressLedger, Hold, Ledger};
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
/// Answers of at most this many bytes may use the part of the budget kept for them.
pub const SMALL: u64 = 64 * 1024;
/// The part of the budget kept for small answers: one eighth.
const SMALL_PART: u64 = 8;

/// Who an answer is for.
#[derive(Clone, Copy, Debug)]
pub struct Asker<'a> {
    /// The client's address (`None`: unknown; such requests share one entry).
    pub client: Option<IpAddr>,
    pub project: &'a str,
    /// The request ran with a role that can write: it is never refused after it ran.
    pub may_write: bool,
}

/// Answer bytes held now, in total and per client address.
pub struct AnswerBudget {
    budget: u64,
    per_address: u64,
    per_project: u64,
    total: AtomicU64,
    by_address: Arc<AddressLedger>,
    by_project: Arc<Ledger<Arc<str>>>,
    metrics: Arc<Metrics>,
}

/// Why an answer was not reserved.
#[derive(Debug, PartialEq, Eq)]
pub enum Refusal {
    /// The client's address holds `held` bytes of answers; this one would pass its cap.
    Address { held: u64, cap: u64 },
    /// The project holds `held` bytes of answers; this one would pass its cap.
    Project { held: u64, cap: u64 },
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
            Refusal::Project { held, cap } => write!(
                f,
                "Too many SQL answer bytes of this project in flight ({held} bytes not yet read \
                 by its clients; limit sql_answer_budget_per_project_bytes = {cap}). Read or \
                 close the earlier answers and retry."
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
    _address: Hold<Option<IpAddr>>,
    _project: Hold<Arc<str>>,
    bytes: u64,
}

impl AnswerBudget {
    pub fn new(
        budget: u64,
        per_address: u64,
        per_project: u64,
        metrics: Arc<Metrics>,
    ) -> Arc<AnswerBudget> {
        Arc::new(AnswerBudget {
            budget,
            per_address,
            per_project,
            total: AtomicU64::new(0),
            by_address: Default::default(),
            by_project: Default::default(),
            metrics,
        })
    }

    /// `bytes` for an answer to `asker`, if its address's and its project's caps and the
    /// server's budget have room now (never waits).
    pub fn take(self: &Arc<Self>, asker: Asker<'_>, bytes: u64) -> Result<Reservation, Refusal> {
        // The caps first (given back if the budget is spent), so two answers to one client
        // or project cannot both pass its cap.
        let address = self
            .by_address
            .hold(asker.client.map(address_key), bytes, self.per_address)
            .map_err(|held| Refusal::Address {
                held,
                cap: self.per_address,
            })?;
        let project = self
            .by_project
            .hold(Arc::from(asker.project), bytes, self.per_project)
            .map_err(|held| Refusal::Project {
                held,
                cap: self.per_project,
            })?;
        let usable = if bytes <= SMALL {
            self.budget
        } else {
            self.budget - self.budget / SMALL_PART
        };
        self.total
            .fetch_update(Relaxed, Relaxed, |t| {
                (t + bytes <= usable).then_some(t + bytes)
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
            _project: project,
            bytes,
        })
    }

    /// Answer bytes held now.
    pub fn in_flight(&self) -> u64 {
        self.total.load(Relaxed)
    }

    /// Client addresses holding answers now.
    pub fn addresses(&self) -> usize {
        self.by_address.keys()
    }

    /// Projects holding answers now.
    pub fn projects(&self) -> usize {
        self.by_project.keys()
    }

    /// `text` as the body of an answer to `asker`: reserved for the capacity it holds, and
    /// with `deadline` (the connection's) running while it is held. The reservation and the
    /// deadline end when the last of the returned bytes is dropped. An answer that does not fit
    /// is refused, or, for a role that may have written, sent without its rows.
    pub fn answer(
        self: &Arc<Self>,
        mut text: String,
        asker: Asker<'_>,
        deadline: Option<(&SendDeadline, std::time::Duration)>,
    ) -> Result<Bytes, Refusal> {
        if text.capacity() - text.len() > SLACK {
            text.shrink_to_fit();
        }
        let reservation = match self.take(asker, text.capacity() as u64) {
            Ok(r) => Some(r),
            Err(refusal) => match asker.may_write.then(|| without_rows(&text)).flatten() {
                Some(short) => {
                    self.metrics.sql_answers_shortened.fetch_add(1, Relaxed);
                    text = short;
                    None
                }
                None => {
                    self.metrics.sql_answers_refused.fetch_add(1, Relaxed);
                    return Err(refusal);
                }
            },
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

/// A success answer (both engines render `{"success":true,"result":{"rows":[…],"columns":[…],
/// …,"truncated":…},"executionInfo":{…}}`) with its rows left out and `truncated: true`; `None`
/// for any other text (an error answer is small and never refused for a writer's sake).
///
/// The rows end at the *last* `],"columns":[`: a row may hold that sequence (a JSON value
/// rendered as JSON), but what follows the rows holds only column names and type names, JSON
/// strings in which a `"` is always escaped.
fn without_rows(text: &str) -> Option<String> {
    const HEAD: &str = "{\"success\":true,\"result\":{\"rows\":[";
    const AFTER_ROWS: &str = "],\"columns\":[";
    const NOT_TRUNCATED: &str = "\"truncated\":false},\"executionInfo\":";
    if !text.starts_with(HEAD) {
        return None;
    }
    let rows_end = text.rfind(AFTER_ROWS)?;
    let mut short = String::with_capacity(text.len() - rows_end + HEAD.len());
    short.push_str(HEAD);
    let rest = &text[rows_end..];
    match rest.rfind(NOT_TRUNCATED) {
        Some(at) => {
            short.push_str(&rest[..at]);
            short.push_str("\"truncated\":true},\"executionInfo\":");
            short.push_str(&rest[at + NOT_TRUNCATED.len()..]);
        }
        None => short.push_str(rest),
    }
    Some(short)
}

/// An answer lent to the HTTP layer as `Bytes`.
struct Answer {
    text: String,
    _reservation: Option<Reservation>,
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

    fn from(client: &str) -> Asker<'static> {
        Asker {
            client: Some(client.parse().unwrap()),
            project: "p1",
            may_write: false,
        }
    }

    #[test]
    fn the_address_cap_and_the_budget_bound_what_is_held_and_come_back_with_the_bytes() {
        let budget = AnswerBudget::new(100, 60, 1000, Default::default());
        let a = budget
            .answer("x".repeat(50), from("10.0.0.1"), None)
            .unwrap();
        assert_eq!(budget.in_flight(), 50);
        assert_eq!(
            budget
                .answer("y".repeat(20), from("10.0.0.1"), None)
                .unwrap_err(),
            Refusal::Address { held: 50, cap: 60 }
        );
        let b = budget
            .answer("z".repeat(45), from("10.0.0.2"), None)
            .unwrap();
        assert_eq!(
            budget
                .answer("w".repeat(10), from("10.0.0.3"), None)
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
        assert_eq!(
            (budget.in_flight(), budget.addresses(), budget.projects()),
            (0, 0, 0)
        );
        let unknown = Asker {
            client: None,
            ..from("10.0.0.1")
        };
        assert!(budget.answer("v".repeat(60), unknown, None).is_ok());
    }

    /// One project cannot take the budget from many addresses, and large answers leave an
    /// eighth of it to small ones (red team, session 25).
    #[test]
    fn a_project_holds_at_most_its_cap_and_small_answers_keep_their_part() {
        const MIB: u64 = 1 << 20;
        let budget = AnswerBudget::new(64 * MIB, 64 * MIB, 24 * MIB, Default::default());
        let big = |n: u64| "x".repeat((n * MIB) as usize);
        let mut held = Vec::new();
        for i in 0..3 {
            let asker = from(&format!("10.0.1.{i}"));
            held.push(budget.answer(big(8), asker, None).unwrap());
        }
        let asker = from("10.0.1.9");
        assert_eq!(
            budget.answer(big(1), asker, None).unwrap_err(),
            Refusal::Project {
                held: 24 * MIB,
                cap: 24 * MIB
            }
        );
        // Other projects fill what large answers may use: 56 of the 64 MiB.
        for (i, project) in ["p2", "p3"].into_iter().enumerate() {
            let asker = Asker {
                project,
                ..from(&format!("10.0.2.{i}"))
            };
            held.push(budget.answer(big(16), asker, None).unwrap());
        }
        let p4 = |client| Asker {
            project: "p4",
            ..from(client)
        };
        assert_eq!(
            budget.answer(big(1), p4("10.0.3.1"), None).unwrap_err(),
            Refusal::Server { budget: 64 * MIB }
        );
        // A small answer still fits.
        let small = budget
            .answer("y".repeat(SMALL as usize), p4("10.0.3.1"), None)
            .unwrap();
        assert_eq!(budget.in_flight(), 56 * MIB + SMALL);
        drop((held, small));
        assert_eq!((budget.in_flight(), budget.projects()), (0, 0));
    }

    #[test]
    fn a_request_that_may_have_written_gets_its_answer_without_rows_instead_of_429() {
        // The large part and the small part both spent.
        let budget = AnswerBudget::new(8 * SMALL, 8 * SMALL, 8 * SMALL, Default::default());
        let large = budget
            .answer("h".repeat(7 * SMALL as usize), from("10.0.0.1"), None)
            .unwrap();
        let small = budget
            .answer("s".repeat(SMALL as usize - 100), from("10.0.0.1"), None)
            .unwrap();
        let text = r#"{"success":true,"result":{"rows":[{"j":{"a":[1],"columns":[2]}}],"columns":["j"],"columnTypes":["jsonb"],"rowCount":1,"message":"INSERT 0 1","truncated":false},"executionInfo":{"time":"1ms","rowCount":1,"operation":"INSERT"}}"#;
        let reader = from("10.0.0.2");
        assert!(budget.answer(text.into(), reader, None).is_err());
        let writer = Asker {
            may_write: true,
            ..reader
        };
        let body = budget.answer(text.into(), writer, None).unwrap();
        let v: serde_json::Value = serde_json::from_slice(&body).unwrap();
        assert_eq!(v["result"]["rows"], serde_json::json!([]));
        assert_eq!(v["result"]["truncated"], true);
        assert_eq!(v["result"]["columns"], serde_json::json!(["j"]));
        assert_eq!(v["result"]["message"], "INSERT 0 1");
        assert_eq!(v["executionInfo"]["operation"], "INSERT");
        assert_eq!(budget.metrics.sql_answers_shortened.load(Relaxed), 1);
        assert_eq!(budget.in_flight(), 8 * SMALL - 100, "outside the budget");
        // An answer that is not a success body is refused as before.
        let error = format!(
            r#"{{"success":false,"error":{{"code":"SQL_EXEC_ERROR","message":"{}"}}}}"#,
            "e".repeat(500)
        );
        assert!(budget.answer(error, writer, None).is_err());
        drop((large, small, body));
    }

    #[test]
    fn what_is_reserved_is_the_capacity_held_shrunk_when_far_larger() {
        let budget = AnswerBudget::new(1 << 30, 1 << 30, 1 << 30, Default::default());
        let mut text = String::with_capacity(4 << 20);
        text.push_str("{}");
        let body = budget.answer(text, from("10.0.0.1"), None).unwrap();
        assert!(
            budget.in_flight() < 2 * SLACK as u64,
            "{}",
            budget.in_flight()
        );
        drop(body);
        let mut text = String::with_capacity(1000);
        text.push_str("{}");
        let _body = budget.answer(text, from("10.0.0.1"), None).unwrap();
        assert_eq!(budget.in_flight(), 1000, "small slack is kept and counted");
    }
}
