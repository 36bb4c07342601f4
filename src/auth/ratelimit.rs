//! Per-caller rate limit: at most N requests in any sliding window of W seconds, per API key or
//! session. Over the limit, the caller gets 429 `RATE_LIMIT` with the seconds until a slot frees.
//!
//! [`AccountLimits`] bounds what needs no credentials, or only an account's own: login and
//! sign-up attempts per client address, failed logins per account, the password hashes running
//! at once (Argon2 takes ~20 MB each), and one project creation at a time per user (so the
//! project quota cannot be raced).
//!
//! Password hashes run on a fixed set of `max_concurrent_password_hashes` threads, not on
//! tokio's blocking pool: the allocator keeps an arena per thread, and a hash on each of
//! hundreds of fresh blocking threads left hundreds of 20 MB arenas resident for good.

use std::collections::{HashMap, VecDeque};
use std::net::IpAddr;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use crate::config::Config;

/// Why a bounded request was refused.
#[derive(Debug, thiserror::Error)]
pub enum LimitError {
    #[error("Too many requests: {limit} per {window_secs} seconds. Retry after {retry_after} s.")]
    RateLimited {
        limit: u32,
        window_secs: u64,
        retry_after: u64,
    },
    /// Every password hasher stayed busy for the whole bounded wait.
    #[error("The server is busy checking passwords ({0} at a time). Retry in a moment.")]
    HashersBusy(usize),
    #[error("the hashing threads are gone")]
    HashersGone,
    #[error("a password hash panicked")]
    HashPanicked,
}

/// Callers are kept as a keyed 64-bit hash of their name (never the name itself, which may be a
/// client-chosen string such as an email address), an entry exists only while it holds a hit
/// inside the window, and expired entries are swept once per window on insert, so the map holds
/// at most the callers recorded in the last two windows, a few dozen bytes each.
pub struct RateLimiter {
    limit: u32,
    window: Duration,
    keys: std::collections::hash_map::RandomState,
    hits: Mutex<Hits>,
    /// Cluster mode: the hits this node counts go to the other nodes ([`RateLimiter::share`]).
    sharing: std::sync::OnceLock<Arc<Sharing>>,
}

/// Cluster mode: a limiter's hits shared with the other nodes (see `crate::cluster::limits`).
/// Every node hashes a caller with the same key (derived from the instance secret all nodes
/// share), so a hit announced by one node lands on the same entry on the others; the caller's
/// name (an API key id, a session token's hash) never leaves the node.
pub struct Sharing {
    key: ring::hmac::Key,
    /// Hits counted here and not announced yet (bounded: past [`Sharing::MAX_PENDING`] they are
    /// dropped, e.g. while NATS is unreachable).
    pending: Mutex<Vec<u64>>,
    /// Woken when `pending` gets its first hit.
    pub wake: tokio::sync::Notify,
    /// Hits announced to the other nodes, in how many messages, and hits heard from them
    /// (for `/metrics`).
    pub announced: std::sync::atomic::AtomicU64,
    pub messages: std::sync::atomic::AtomicU64,
    pub heard: std::sync::atomic::AtomicU64,
}

impl Sharing {
    /// At most this many hits wait for an announcement.
    pub const MAX_PENDING: usize = 1 << 16;

    pub fn new(key: &[u8]) -> Sharing {
        Sharing {
            key: ring::hmac::Key::new(ring::hmac::HMAC_SHA256, key),
            pending: Mutex::new(Vec::new()),
            wake: tokio::sync::Notify::new(),
            announced: Default::default(),
            messages: Default::default(),
            heard: Default::default(),
        }
    }

    /// The caller's key on every node: the first 64 bits of HMAC-SHA256(shared key, name).
    pub fn hash(&self, caller: &str) -> u64 {
        let tag = ring::hmac::sign(&self.key, caller.as_bytes());
        u64::from_be_bytes(tag.as_ref()[..8].try_into().expect("32-byte tag"))
    }

    fn push(&self, key: u64) {
        let mut pending = self.pending.lock().expect("poisoned");
        if pending.len() < Self::MAX_PENDING {
            pending.push(key);
        }
        if pending.len() == 1 {
            self.wake.notify_one();
        }
    }

    /// The hits to announce now, oldest first.
    pub fn take(&self) -> Vec<u64> {
        std::mem::take(&mut *self.pending.lock().expect("poisoned"))
    }
}

struct Hits {
    by_caller: HashMap<u64, VecDeque<Instant>>,
    last_sweep: Instant,
}

impl RateLimiter {
    /// `limit == 0` disables limiting.
    pub fn new(limit: u32, window_secs: u64) -> RateLimiter {
        RateLimiter {
            limit,
            window: Duration::from_secs(window_secs),
            keys: std::collections::hash_map::RandomState::new(),
            hits: Mutex::new(Hits {
                by_caller: HashMap::new(),
                last_sweep: Instant::now(),
            }),
            sharing: std::sync::OnceLock::new(),
        }
    }

    fn key(&self, caller: &str) -> u64 {
        use std::hash::BuildHasher;
        match self.sharing.get() {
            Some(sharing) => sharing.hash(caller),
            None => self.keys.hash_one(caller),
        }
    }

    /// Cluster mode: from now on callers are hashed with `key` (the same on every node) and
    /// every request counted is handed to the returned [`Sharing`] for the other nodes. Called
    /// once, before the server serves; `None` if it was already called, or the limit is off.
    pub fn share(&self, key: &[u8]) -> Option<Arc<Sharing>> {
        if self.limit == 0 {
            return None;
        }
        let sharing = Arc::new(Sharing::new(key));
        self.sharing.set(sharing.clone()).ok()?;
        Some(sharing)
    }

    /// Cluster mode: counts a request another node counted (its caller's shared hash).
    pub fn record_shared(&self, key: u64) {
        self.record_key(key, Instant::now())
    }

    /// The limit (requests per window), for the cluster's documentation and tests.
    pub fn limit(&self) -> u32 {
        self.limit
    }

    /// Records a request by `caller`, or refuses it.
    pub fn check(&self, caller: &str) -> Result<(), LimitError> {
        self.check_at(caller, Instant::now())
    }

    /// Refuses `caller` if it is at the limit, without counting this as a request (and without
    /// remembering a caller it has not seen).
    pub fn peek(&self, caller: &str) -> Result<(), LimitError> {
        self.check_or_record(caller, Instant::now(), false)
    }

    /// Counts a request by `caller` (even past the limit; only the last `limit` are kept).
    pub fn record(&self, caller: &str) {
        self.record_at(caller, Instant::now())
    }

    fn record_at(&self, caller: &str, now: Instant) {
        if self.limit == 0 {
            return;
        }
        self.record_key(self.key(caller), now)
    }

    fn record_key(&self, key: u64, now: Instant) {
        if self.limit == 0 {
            return;
        }
        let mut hits = self.hits.lock().expect("rate limiter poisoned");
        self.sweep(&mut hits, now);
        let q = hits.by_caller.entry(key).or_default();
        q.push_back(now);
        while q.len() > self.limit as usize {
            q.pop_front();
        }
    }

    /// Forgets the callers with no hit inside the window, at most once per window.
    fn sweep(&self, hits: &mut Hits, now: Instant) {
        if now.saturating_duration_since(hits.last_sweep) < self.window {
            return;
        }
        let window = self.window;
        hits.by_caller.retain(|_, q| {
            q.back()
                .is_some_and(|t| now.saturating_duration_since(*t) < window)
        });
        hits.last_sweep = now;
    }

    /// How many callers are remembered (for tests).
    #[cfg(test)]
    fn callers(&self) -> usize {
        self.hits.lock().expect("poisoned").by_caller.len()
    }

    /// Takes back the latest request counted for `caller`.
    pub fn forget_one(&self, caller: &str) {
        let key = self.key(caller);
        let mut hits = self.hits.lock().expect("rate limiter poisoned");
        if let Some(q) = hits.by_caller.get_mut(&key) {
            q.pop_back();
        }
    }

    fn check_at(&self, caller: &str, now: Instant) -> Result<(), LimitError> {
        self.check_or_record(caller, now, true)
    }

    fn check_or_record(&self, caller: &str, now: Instant, record: bool) -> Result<(), LimitError> {
        if self.limit == 0 {
            return Ok(());
        }
        let key = self.key(caller);
        let mut hits = self.hits.lock().expect("rate limiter poisoned");
        if record {
            self.sweep(&mut hits, now);
        }
        let Some(q) = (if record {
            Some(hits.by_caller.entry(key).or_default())
        } else {
            hits.by_caller.get_mut(&key)
        }) else {
            return Ok(());
        };
        while q
            .front()
            .is_some_and(|t| now.saturating_duration_since(*t) >= self.window)
        {
            q.pop_front();
        }
        if q.len() >= self.limit as usize {
            let oldest = *q.front().expect("non-empty at the limit");
            let wait = self
                .window
                .saturating_sub(now.saturating_duration_since(oldest));
            return Err(LimitError::RateLimited {
                limit: self.limit,
                window_secs: self.window.as_secs(),
                retry_after: wait.as_secs_f64().ceil().max(1.0) as u64,
            });
        }
        if record {
            q.push_back(now);
            drop(hits);
            if let Some(sharing) = self.sharing.get() {
                sharing.push(key);
            }
        } else if q.is_empty() {
            hits.by_caller.remove(&key);
        }
        Ok(())
    }
}

/// How long a request waits for a password hasher before it gets 429.
const HASH_WAIT: Duration = Duration::from_secs(10);

type HashJob = Box<dyn FnOnce() + Send>;

/// The bounds on login, sign-up and project creation (see the module docs).
pub struct AccountLimits {
    per_address: RateLimiter,
    /// Failed logins per (account, client network): what refuses a guesser.
    per_account_network: RateLimiter,
    /// Failed logins per account from anywhere: a much higher backstop against spread guessing.
    per_account: RateLimiter,
    /// Jobs for the hashing threads; they end when this is dropped.
    hash_jobs: Mutex<std::sync::mpsc::Sender<HashJob>>,
    /// One permit per hashing thread: a request waits for one (bounded) before queueing.
    /// Moved into the job, so it is released when the job has run, not when the request goes away.
    hashes: Arc<tokio::sync::Semaphore>,
    hash_limit: usize,
    /// Jobs sent to the hashing threads and not finished yet (never more than `hash_limit`).
    hashes_pending: Arc<std::sync::atomic::AtomicUsize>,
    creating: Mutex<HashMap<String, Arc<tokio::sync::Mutex<()>>>>,
}

impl AccountLimits {
    pub fn new(config: &Config) -> AccountLimits {
        let (tx, rx) = std::sync::mpsc::channel::<HashJob>();
        let rx = Arc::new(Mutex::new(rx));
        for i in 0..config.max_concurrent_password_hashes {
            let rx = rx.clone();
            let spawned = std::thread::Builder::new()
                .name(format!("fluxbase-hash-{i}"))
                .spawn(move || loop {
                    let job = rx.lock().expect("poisoned").recv();
                    match job {
                        Ok(job) => job(),
                        Err(_) => return,
                    }
                });
            if let Err(e) = spawned {
                tracing::error!(error = %e, "could not start a password hashing thread");
            }
        }
        AccountLimits {
            hash_jobs: Mutex::new(tx),
            per_address: RateLimiter::new(
                config.auth_attempts_per_address,
                config.auth_rate_window_secs,
            ),
            per_account_network: RateLimiter::new(
                config.auth_failures_per_account,
                config.auth_rate_window_secs,
            ),
            per_account: RateLimiter::new(
                config.auth_failures_per_account_total,
                config.auth_rate_window_secs,
            ),
            hashes: Arc::new(tokio::sync::Semaphore::new(
                config.max_concurrent_password_hashes,
            )),
            hash_limit: config.max_concurrent_password_hashes,
            hashes_pending: Arc::default(),
            creating: Mutex::new(HashMap::new()),
        }
    }

    /// Counts a login or sign-up attempt from `client` (unknown: not limited by address).
    pub fn attempt_from(&self, client: Option<IpAddr>) -> Result<(), LimitError> {
        match client {
            Some(ip) => self.per_address.check(&ip.to_string()),
            None => Ok(()),
        }
    }

    /// Refuses a login to `account` (a normalised email) from `client`'s network that has failed
    /// too often lately, or to an account that has failed very often from anywhere. A guesser
    /// locks out its own network for that account, not the owner logging in from elsewhere.
    /// Otherwise counts this attempt as a failure up front (in both), so that concurrent
    /// attempts cannot all pass before the first of them fails; [`Self::login_not_failed`] takes it
    /// back.
    pub fn login_allowed(&self, account: &str, client: Option<IpAddr>) -> Result<(), LimitError> {
        let network = account_network_key(account, client);
        self.per_account_network.check(&network)?;
        if let Err(e) = self.per_account.check(account) {
            self.per_account_network.forget_one(&network);
            return Err(e);
        }
        Ok(())
    }

    /// The attempt [`Self::login_allowed`] counted was no failure (the password was right, or it
    /// was never checked).
    pub fn login_not_failed(&self, account: &str, client: Option<IpAddr>) {
        self.per_account_network
            .forget_one(&account_network_key(account, client));
        self.per_account.forget_one(account);
    }

    /// Hash jobs sent to the threads and not finished.
    pub fn hashes_pending(&self) -> usize {
        self.hashes_pending
            .load(std::sync::atomic::Ordering::SeqCst)
    }

    /// Runs `job` (a password hash or check) on a hashing thread once one is free; waits up to
    /// [`HASH_WAIT`] for it, then 429.
    pub async fn hash<T: Send + 'static>(
        &self,
        job: impl FnOnce() -> T + Send + 'static,
    ) -> Result<T, LimitError> {
        let busy = || LimitError::HashersBusy(self.hash_limit);
        let turn = tokio::time::timeout(HASH_WAIT, self.hashes.clone().acquire_owned())
            .await
            .map_err(|_| busy())?
            .map_err(|_| busy())?;
        let (tx, rx) = tokio::sync::oneshot::channel();
        let pending = Pending::enter(&self.hashes_pending);
        let sent = self
            .hash_jobs
            .lock()
            .expect("poisoned")
            .send(Box::new(move || {
                // The turn goes with the job: a request dropped while its job waits or runs does not
                // free a turn for another job to queue behind it.
                let _turn = turn;
                let _pending = pending;
                let _ = tx.send(job());
            }));
        if sent.is_err() {
            return Err(LimitError::HashersGone);
        }
        rx.await.map_err(|_| LimitError::HashPanicked)
    }

    /// Held while `user_id` creates a project, so that two requests cannot both pass the quota.
    pub async fn creating_project(&self, user_id: &str) -> tokio::sync::OwnedMutexGuard<()> {
        let lock = {
            let mut map = self.creating.lock().expect("poisoned");
            map.retain(|_, l| Arc::strong_count(l) > 1);
            map.entry(user_id.to_string()).or_default().clone()
        };
        lock.lock_owned().await
    }
}

/// One job counted in [`AccountLimits::hashes_pending`] until dropped.
struct Pending(Arc<std::sync::atomic::AtomicUsize>);

impl Pending {
    fn enter(count: &Arc<std::sync::atomic::AtomicUsize>) -> Pending {
        count.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
        Pending(count.clone())
    }
}

impl Drop for Pending {
    fn drop(&mut self) {
        self.0.fetch_sub(1, std::sync::atomic::Ordering::SeqCst);
    }
}

/// The failure-count key of `account` seen from `client`: its /24 (IPv4) or /64 (IPv6).
fn account_network_key(account: &str, client: Option<IpAddr>) -> String {
    let network = match client.map(address_key) {
        Some(IpAddr::V4(v4)) => {
            let [a, b, c, _] = v4.octets();
            format!("{a}.{b}.{c}.0/24")
        }
        Some(ip) => format!("{ip}/64"),
        None => "unknown".into(),
    };
    format!("{network} {account}")
}

/// The address limits are keyed by: an IPv4 address, or the /64 of an IPv6 one (a single host
/// usually holds a whole /64).
pub fn address_key(ip: std::net::IpAddr) -> std::net::IpAddr {
    use std::net::{IpAddr, Ipv6Addr};
    match ip {
        IpAddr::V4(_) => ip,
        IpAddr::V6(v6) => match v6.to_ipv4_mapped() {
            Some(v4) => IpAddr::V4(v4),
            None => {
                let s = v6.segments();
                IpAddr::V6(Ipv6Addr::new(s[0], s[1], s[2], s[3], 0, 0, 0, 0))
            }
        },
    }
}

/// What each key holds now of something bounded per key: per client address (bytes of SQL
/// answers not yet read, shares of the storage read budget; keyed by [`address_key`], IPv6 by
/// its /64, `None` for a request with no known address) or per project (answer bytes). An
/// entry lives only while it holds something, so the map is never larger than the holds out.
pub struct Ledger<K>(Mutex<HashMap<K, u64>>);

/// The ledger of client addresses.
pub type AddressLedger = Ledger<Option<IpAddr>>;

impl<K> Default for Ledger<K> {
    fn default() -> Self {
        Ledger(Mutex::new(HashMap::new()))
    }
}

/// An amount a key holds in a [`Ledger`], given back when dropped.
pub struct Hold<K: std::hash::Hash + Eq> {
    ledger: Arc<Ledger<K>>,
    key: K,
    amount: u64,
}

impl<K: std::hash::Hash + Eq + Clone> Ledger<K> {
    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<K, u64>> {
        // Nothing under the lock can panic; a poisoned lock is still consistent.
        self.0.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// `amount` more for `key`, if what it holds stays within `cap`; else what it holds.
    pub fn hold(self: &Arc<Self>, key: K, amount: u64, cap: u64) -> Result<Hold<K>, u64> {
        let mut held = self.lock();
        let mine = held.get(&key).copied().unwrap_or(0);
        if mine + amount > cap {
            return Err(mine);
        }
        *held.entry(key.clone()).or_default() += amount;
        Ok(Hold {
            ledger: self.clone(),
            key,
            amount,
        })
    }

    /// What `key` holds now.
    pub fn held_by(&self, key: &K) -> u64 {
        self.lock().get(key).copied().unwrap_or(0)
    }

    /// Keys holding something now.
    pub fn keys(&self) -> usize {
        self.lock().len()
    }
}

impl<K: std::hash::Hash + Eq + Clone> Hold<K> {
    /// `more` for the same key, if what the key holds stays within `cap`; else what it holds
    /// (and this hold is unchanged).
    pub fn grow(&mut self, more: u64, cap: u64) -> Result<(), u64> {
        let mut held = self.ledger.lock();
        let mine = held.get(&self.key).copied().unwrap_or(0);
        if mine + more > cap {
            return Err(mine);
        }
        *held.entry(self.key.clone()).or_default() += more;
        self.amount += more;
        Ok(())
    }

    /// Gives back all of this hold but `keep` (no more than it holds).
    pub fn shrink_to(&mut self, keep: u64) {
        let give = self.amount.saturating_sub(keep);
        if give == 0 {
            return;
        }
        let mut held = self.ledger.lock();
        if let Some(n) = held.get_mut(&self.key) {
            *n -= give;
            if *n == 0 {
                held.remove(&self.key);
            }
        }
        self.amount -= give;
    }
}

impl<K: std::hash::Hash + Eq> Drop for Hold<K> {
    fn drop(&mut self) {
        let mut held = self.ledger.0.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(n) = held.get_mut(&self.key) {
            *n -= self.amount;
            if *n == 0 {
                held.remove(&self.key);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_request_past_the_limit_is_refused_until_the_window_slides() {
        let rl = RateLimiter::new(3, 10);
        let t0 = Instant::now();
        for i in 0..3 {
            rl.check_at("k", t0 + Duration::from_secs(i)).unwrap();
        }
        match rl.check_at("k", t0 + Duration::from_secs(3)) {
            Err(LimitError::RateLimited { retry_after, .. }) => assert_eq!(retry_after, 7),
            other => panic!("expected a rate limit, got {other:?}"),
        }
        rl.check_at("other", t0 + Duration::from_secs(3)).unwrap();
        rl.check_at("k", t0 + Duration::from_secs(10)).unwrap();
    }

    #[test]
    fn peeking_does_not_count_and_recording_does() {
        let rl = RateLimiter::new(2, 60);
        for _ in 0..5 {
            rl.peek("acct").unwrap();
        }
        rl.record("acct");
        rl.peek("acct").unwrap();
        rl.record("acct");
        assert!(rl.peek("acct").is_err());
        rl.peek("other").unwrap();
    }

    #[test]
    fn unknown_callers_are_not_remembered_and_old_ones_are_swept() {
        let rl = RateLimiter::new(10, 60);
        let long = "x".repeat(1 << 20);
        for i in 0..20_000 {
            rl.peek(&format!("{i}{long:.10}@example.com")).unwrap();
        }
        rl.peek(&long).unwrap();
        assert_eq!(rl.callers(), 0, "peeking must not insert");
        let t0 = Instant::now();
        for i in 0..1_000u64 {
            rl.record_at(
                &format!("failed{i}@example.com"),
                t0 + Duration::from_secs(i),
            );
        }
        // One sweep per window: only the callers of the last two windows remain.
        assert!(rl.callers() <= 120, "{} callers remembered", rl.callers());
        for _ in 0..100 {
            rl.record_at("same", t0 + Duration::from_secs(1_000));
        }
        assert!(rl
            .check_at("same", t0 + Duration::from_secs(1_000))
            .is_err());
        let hits = rl.hits.lock().unwrap();
        assert!(hits.by_caller.values().all(|q| q.len() <= 10));
    }

    #[test]
    fn failures_count_per_account_and_network_with_a_higher_backstop() {
        let config = Config {
            auth_failures_per_account: 2,
            auth_failures_per_account_total: 5,
            ..Config::default()
        };
        let limits = AccountLimits::new(&config);
        let attacker: Option<IpAddr> = Some("203.0.113.7".parse().unwrap());
        let neighbour: Option<IpAddr> = Some("203.0.113.200".parse().unwrap());
        let owner: Option<IpAddr> = Some("198.51.100.1".parse().unwrap());
        // Each allowed attempt counts as a failure until `login_not_failed` takes it back.
        let fail = |client: Option<IpAddr>| assert!(limits.login_allowed("a@b.co", client).is_ok());
        fail(attacker);
        fail(attacker);
        assert!(limits.login_allowed("a@b.co", attacker).is_err());
        assert!(
            limits.login_allowed("a@b.co", neighbour).is_err(),
            "same /24"
        );
        // The owner's right password: counted, then taken back.
        assert!(limits.login_allowed("a@b.co", owner).is_ok());
        limits.login_not_failed("a@b.co", owner);
        assert!(limits.login_allowed("c@d.co", attacker).is_ok());
        // 2 failures so far from all networks; 3 more reach the backstop of 5.
        for i in 0..3 {
            fail(Some(format!("192.0.{i}.1").parse().unwrap()));
        }
        assert!(
            limits.login_allowed("a@b.co", owner).is_err(),
            "the backstop"
        );
    }

    #[tokio::test]
    async fn cancelled_hash_requests_leave_no_more_jobs_than_threads() {
        let config = Config {
            max_concurrent_password_hashes: 1,
            ..Config::default()
        };
        let limits = Arc::new(AccountLimits::new(&config));
        let (open_tx, open_rx) = std::sync::mpsc::channel::<()>();
        let gate = Arc::new(Mutex::new(open_rx));
        // Each request sends a job that blocks until the gate opens, then goes away (a client
        // that disconnects right after sending its login).
        for _ in 0..20 {
            let gate = gate.clone();
            let _ = tokio::time::timeout(
                Duration::from_millis(20),
                limits.hash(move || {
                    let _ = gate.lock().unwrap().recv();
                }),
            )
            .await;
        }
        assert!(
            limits.hashes_pending() <= 1,
            "{} jobs queued or running for 1 thread",
            limits.hashes_pending()
        );
        drop(open_tx);
        let deadline = Instant::now() + Duration::from_secs(10);
        while limits.hashes_pending() > 0 {
            assert!(Instant::now() < deadline, "the hash jobs never finished");
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        // The turn came back: the next hash runs.
        assert_eq!(limits.hash(|| 7).await.unwrap(), 7);
    }

    #[test]
    fn a_zero_limit_disables_limiting() {
        let rl = RateLimiter::new(0, 10);
        for _ in 0..1000 {
            rl.check("k").unwrap();
        }
    }
}
