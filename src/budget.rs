//! A memory budget shared by tenants and handed out fairly: [`FairBudget`].
//!
//! A plain semaphore serves its waiters first come, first served: one tenant that queues many
//! requests for room (a backlog of large webhook bodies to a receiver that never answers) makes
//! every other tenant wait behind all of them (red team rt11: a project's single 1 MB delivery
//! waited 117 s behind another project's 160). Here waiters are grouped by key (a project) and
//! the keys take turns: when room frees, the key whose turn it is gets it, then goes to the back
//! of the line. A key that already holds its share (a quarter of the budget, by default) is
//! passed over while a key holding less waits; with no one else waiting it may take the rest.
//! Within a key, first come, first served. The key whose turn it is waits for room even if
//! a smaller request behind it would fit: a large request is never starved by small ones.
//! Someone who stops waiting gives up their place (or the room granted meanwhile).

use std::collections::{HashMap, VecDeque};
use std::sync::{Arc, Mutex};

use tokio::sync::oneshot;

/// Room taken from a [`FairBudget`], given back when dropped.
#[must_use = "the room is given back when this is dropped"]
pub struct Room {
    state: Arc<Mutex<State>>,
    key: Arc<str>,
    bytes: usize,
}

impl Drop for Room {
    fn drop(&mut self) {
        let mut state = self.state.lock().expect("poisoned");
        state.give_back(&self.key, self.bytes);
        state.grant();
    }
}

impl std::fmt::Debug for Room {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Room({} bytes for {})", self.bytes, self.key)
    }
}

/// See the module docs.
#[derive(Clone)]
pub struct FairBudget {
    state: Arc<Mutex<State>>,
}

struct State {
    total: usize,
    free: usize,
    /// What one key may hold while another key waits.
    share: usize,
    held: HashMap<Arc<str>, usize>,
    /// Each key's waiters, oldest first.
    waiting: HashMap<Arc<str>, VecDeque<Waiter>>,
    /// Keys with waiters, in turn order.
    turn: VecDeque<Arc<str>>,
    next_id: u64,
}

struct Waiter {
    id: u64,
    bytes: usize,
    tx: oneshot::Sender<()>,
}

impl FairBudget {
    /// A budget of `total` bytes (at least 1); each key may hold `share` of it while others
    /// wait (at least one request's worth: a key holding nothing may always take room).
    pub fn new(total: usize, share: usize) -> FairBudget {
        let total = total.max(1);
        FairBudget {
            state: Arc::new(Mutex::new(State {
                total,
                free: total,
                share: share.clamp(1, total),
                held: HashMap::new(),
                waiting: HashMap::new(),
                turn: VecDeque::new(),
                next_id: 0,
            })),
        }
    }

    /// Room for `bytes` (a request larger than the whole budget takes all of it: it goes
    /// alone) for `key`, waiting for its turn. Cancel-safe: dropped while waiting, it gives up
    /// its place, or the room it was granted meanwhile.
    pub async fn room(&self, key: &str, bytes: usize) -> Room {
        let (id, rx, key, need) = {
            let mut state = self.state.lock().expect("poisoned");
            let need = bytes.clamp(1, state.total);
            let key: Arc<str> = match state.held.get_key_value(key) {
                Some((k, _)) => k.clone(),
                None => Arc::from(key),
            };
            if state.turn.is_empty() && state.free >= need {
                state.take(&key, need);
                return Room {
                    state: self.state.clone(),
                    key,
                    bytes: need,
                };
            }
            let (tx, rx) = oneshot::channel();
            let id = state.next_id;
            state.next_id += 1;
            if !state.waiting.contains_key(&key) {
                state.turn.push_back(key.clone());
            }
            state
                .waiting
                .entry(key.clone())
                .or_default()
                .push_back(Waiter {
                    id,
                    bytes: need,
                    tx,
                });
            // Room may be free for this key now (the key whose turn it is over its share).
            state.grant();
            (id, rx, key, need)
        };
        let mut pending = Pending {
            state: &self.state,
            key: &key,
            id,
            need,
            rx,
            done: false,
        };
        let granted = (&mut pending.rx).await;
        pending.done = true;
        // The sender lives in the queue until it is granted (or the budget is gone).
        granted.expect("a waiter's sender is dropped only when it is granted");
        Room {
            state: self.state.clone(),
            key: key.clone(),
            bytes: need,
        }
    }

    /// Bytes held now, by everyone.
    pub fn held(&self) -> usize {
        let state = self.state.lock().expect("poisoned");
        state.total - state.free
    }
}

/// A waiter's place: dropped before its grant arrived, it leaves the line, or gives back what
/// was granted meanwhile.
struct Pending<'a> {
    state: &'a Arc<Mutex<State>>,
    key: &'a Arc<str>,
    id: u64,
    need: usize,
    rx: oneshot::Receiver<()>,
    done: bool,
}

impl Drop for Pending<'_> {
    fn drop(&mut self) {
        if self.done {
            return;
        }
        let mut state = self.state.lock().expect("poisoned");
        // Under the lock: a grant is made under it too, so it either came already or never will.
        if self.rx.try_recv().is_ok() {
            state.give_back(self.key, self.need);
        } else {
            state.leave(self.key, self.id);
        }
        state.grant();
    }
}

impl State {
    fn take(&mut self, key: &Arc<str>, bytes: usize) {
        self.free -= bytes;
        *self.held.entry(key.clone()).or_default() += bytes;
    }

    fn give_back(&mut self, key: &str, bytes: usize) {
        self.free += bytes;
        if let Some(held) = self.held.get_mut(key) {
            *held -= bytes;
            if *held == 0 {
                self.held.remove(key);
            }
        }
    }

    fn leave(&mut self, key: &Arc<str>, id: u64) {
        if let Some(queue) = self.waiting.get_mut(key) {
            queue.retain(|w| w.id != id);
            if queue.is_empty() {
                self.waiting.remove(key);
                self.turn.retain(|k| k != key);
            }
        }
    }

    /// Grants room to waiters while it can, keys in turn (see the module docs).
    fn grant(&mut self) {
        loop {
            let Some(i) = self.next_to_serve() else {
                return;
            };
            let key = self.turn.remove(i).expect("in turn");
            let queue = self.waiting.get_mut(&key).expect("a key in turn waits");
            let waiter = queue.pop_front().expect("a key in turn has a waiter");
            if queue.is_empty() {
                self.waiting.remove(&key);
            } else {
                self.turn.push_back(key.clone());
            }
            self.take(&key, waiter.bytes);
            if waiter.tx.send(()).is_err() {
                // Gone meanwhile (its `Pending` removes itself under this lock, so only a
                // budget being dropped gets here): the room goes back.
                self.give_back(&key, waiter.bytes);
            }
        }
    }

    /// The place in `turn` of the key to serve now, if one can be: the first key not over its
    /// share (or, when every waiting key is, the first), if its oldest waiter fits.
    fn next_to_serve(&self) -> Option<usize> {
        let over_share = |key: &Arc<str>, bytes: usize| {
            let held = self.held.get(key).copied().unwrap_or(0);
            held > 0 && held + bytes > self.share
        };
        let head = |key: &Arc<str>| self.waiting[key].front().expect("a waiter").bytes;
        let i = self
            .turn
            .iter()
            .position(|k| !over_share(k, head(k)))
            .or(if self.turn.is_empty() { None } else { Some(0) })?;
        (head(&self.turn[i]) <= self.free).then_some(i)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    async fn granted_soon(f: impl std::future::Future<Output = Room>) -> Option<Room> {
        tokio::time::timeout(Duration::from_millis(100), f)
            .await
            .ok()
    }

    #[tokio::test]
    async fn another_key_is_served_before_a_backlog_and_a_key_over_its_share_waits() {
        let budget = FairBudget::new(100, 25);
        // Tenant a takes it all, then queues a backlog.
        let held: Vec<Room> =
            futures_util::future::join_all((0..4).map(|_| budget.room("a", 25))).await;
        assert_eq!(budget.held(), 100);
        let backlog = budget.clone();
        let a_waits = tokio::spawn(async move {
            let mut rooms = Vec::new();
            for _ in 0..10 {
                rooms.push(backlog.room("a", 25).await);
            }
            rooms
        });
        tokio::time::sleep(Duration::from_millis(20)).await;
        // Tenant b asks after a's backlog: served by the first room that frees.
        let b = budget.clone();
        let b_waits = tokio::spawn(async move { b.room("b", 10).await });
        tokio::time::sleep(Duration::from_millis(20)).await;
        assert!(!b_waits.is_finished());
        drop(held.into_iter().next());
        let b_room = tokio::time::timeout(Duration::from_secs(1), b_waits)
            .await
            .expect("b was not served by the room that freed")
            .unwrap();
        assert_eq!(b_room.bytes, 10);
        assert!(!a_waits.is_finished());
        a_waits.abort();
    }

    #[tokio::test]
    async fn a_request_larger_than_the_budget_goes_alone_and_is_not_starved() {
        let budget = FairBudget::new(100, 50);
        let small = budget.room("a", 30).await;
        let big_budget = budget.clone();
        let big = tokio::spawn(async move { big_budget.room("b", 1_000).await });
        tokio::time::sleep(Duration::from_millis(20)).await;
        // The big one's turn: smaller requests of other keys wait behind it.
        assert!(granted_soon(budget.room("c", 10)).await.is_none());
        drop(small);
        let big = tokio::time::timeout(Duration::from_secs(1), big)
            .await
            .expect("the big request was starved")
            .unwrap();
        assert_eq!(big.bytes, 100);
        assert_eq!(budget.held(), 100);
        drop(big);
        assert_eq!(budget.held(), 0);
    }

    #[tokio::test]
    async fn a_waiter_that_gives_up_leaves_nothing_held_or_queued() {
        let budget = FairBudget::new(10, 10);
        let all = budget.room("a", 10).await;
        assert!(granted_soon(budget.room("b", 5)).await.is_none());
        drop(all);
        assert_eq!(budget.held(), 0);
        // With no one else waiting, a key may take everything.
        let first = budget.room("c", 6).await;
        let second = granted_soon(budget.room("c", 4)).await.expect("free room");
        assert_eq!(budget.held(), 10);
        drop((first, second));
        assert_eq!(budget.held(), 0);
    }
}
