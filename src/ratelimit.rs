//! Per-caller rate limit: at most N requests in any sliding window of W seconds, per API key or
//! session. Over the limit, the caller gets 429 `RATE_LIMIT` with the seconds until a slot frees.

use std::collections::{HashMap, VecDeque};
use std::sync::Mutex;
use std::time::{Duration, Instant};

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

    fn check_at(&self, caller: &str, now: Instant) -> Result<(), ApiError> {
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
        q.push_back(now);
        Ok(())
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
    fn a_zero_limit_disables_limiting() {
        let rl = RateLimiter::new(0, 10);
        for _ in 0..1000 {
            rl.check("k").unwrap();
        }
    }
}
