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
use crate::error::ApiError;

pub struct RateLimiter {
    limit: u32,
    window: Duration,
    hits: Mutex<HashMap<String, VecDeque<Instant>>>,
}

impl RateLimiter {
    /// `limit == 0` disables limiting.
    pub fn new(limit: u32, window_secs: u64) -> RateLimiter {
        RateLimiter {
            limit,
            window: Duration::from_secs(window_secs),
            hits: Mutex::new(HashMap::new()),
        }
    }

    /// Records a request by `caller`, or refuses it.
    pub fn check(&self, caller: &str) -> Result<(), ApiError> {
        self.check_at(caller, Instant::now())
    }

    /// Refuses `caller` if it is at the limit, without counting this as a request.
    pub fn peek(&self, caller: &str) -> Result<(), ApiError> {
        self.check_or_record(caller, Instant::now(), false)
    }

    /// Counts a request by `caller` (even past the limit).
    pub fn record(&self, caller: &str) {
        if self.limit == 0 {
            return;
        }
        let mut hits = self.hits.lock().expect("rate limiter poisoned");
        hits.entry(caller.to_string())
            .or_default()
            .push_back(Instant::now());
    }

    /// Takes back the latest request counted for `caller`.
    pub fn forget_one(&self, caller: &str) {
        let mut hits = self.hits.lock().expect("rate limiter poisoned");
        if let Some(q) = hits.get_mut(caller) {
            q.pop_back();
        }
    }

    fn check_at(&self, caller: &str, now: Instant) -> Result<(), ApiError> {
        self.check_or_record(caller, now, true)
    }

    fn check_or_record(&self, caller: &str, now: Instant, record: bool) -> Result<(), ApiError> {
        if self.limit == 0 {
            return Ok(());
        }
        let mut hits = self.hits.lock().expect("rate limiter poisoned");
        if hits.len() > 10_000 {
            let window = self.window;
            hits.retain(|_, q| q.back().is_some_and(|t| now.duration_since(*t) < window));
        }
        let q = hits.entry(caller.to_string()).or_default();
        while q
            .front()
            .is_some_and(|t| now.duration_since(*t) >= self.window)
        {
            q.pop_front();
        }
        if q.len() >= self.limit as usize {
            let oldest = *q.front().expect("non-empty at the limit");
            let wait = self.window.saturating_sub(now.duration_since(oldest));
            return Err(ApiError::RateLimited {
                limit: self.limit,
                window_secs: self.window.as_secs(),
                retry_after: wait.as_secs_f64().ceil().max(1.0) as u64,
            });
        }
        if record {
            q.push_back(now);
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
    per_account: RateLimiter,
    /// Jobs for the hashing threads; they end when this is dropped.
    hash_jobs: Mutex<std::sync::mpsc::Sender<HashJob>>,
    /// One permit per hashing thread: a request waits for one (bounded) before queueing.
    hashes: tokio::sync::Semaphore,
    hash_limit: usize,
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
            per_account: RateLimiter::new(
                config.auth_failures_per_account,
                config.auth_rate_window_secs,
            ),
            hashes: tokio::sync::Semaphore::new(config.max_concurrent_password_hashes),
            hash_limit: config.max_concurrent_password_hashes,
            creating: Mutex::new(HashMap::new()),
        }
    }

    /// Counts a login or sign-up attempt from `client` (unknown: not limited by address).
    pub fn attempt_from(&self, client: Option<IpAddr>) -> Result<(), ApiError> {
        match client {
            Some(ip) => self.per_address.check(&ip.to_string()),
            None => Ok(()),
        }
    }

    /// Refuses a login to `account` (a normalised email) that has failed too often lately;
    /// otherwise counts this attempt as a failure up front, so that concurrent attempts cannot
    /// all pass before the first of them fails. [`login_not_failed`] takes it back.
    pub fn login_allowed(&self, account: &str) -> Result<(), ApiError> {
        self.per_account.check(account)
    }

    /// The attempt [`login_allowed`] counted was no failure (the password was right, or it
    /// was never checked).
    pub fn login_not_failed(&self, account: &str) {
        self.per_account.forget_one(account);
    }

    /// Runs `job` (a password hash or check) on a hashing thread once one is free; waits up to
    /// [`HASH_WAIT`] for it, then 429.
    pub async fn hash<T: Send + 'static>(
        &self,
        job: impl FnOnce() -> T + Send + 'static,
    ) -> Result<T, ApiError> {
        let busy = || {
            ApiError::Busy(format!(
                "The server is busy checking passwords ({} at a time). Retry in a moment.",
                self.hash_limit
            ))
        };
        let _turn = tokio::time::timeout(HASH_WAIT, self.hashes.acquire())
            .await
            .map_err(|_| busy())?
            .map_err(|_| busy())?;
        let (tx, rx) = tokio::sync::oneshot::channel();
        self.hash_jobs
            .lock()
            .expect("poisoned")
            .send(Box::new(move || {
                let _ = tx.send(job());
            }))
            .map_err(|_| ApiError::Internal(anyhow::anyhow!("the hashing threads are gone")))?;
        rx.await
            .map_err(|_| ApiError::Internal(anyhow::anyhow!("a password hash panicked")))
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
            Err(ApiError::RateLimited { retry_after, .. }) => assert_eq!(retry_after, 7),
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
    fn a_zero_limit_disables_limiting() {
        let rl = RateLimiter::new(0, 10);
        for _ in 0..1000 {
            rl.check("k").unwrap();
        }
    }
}
