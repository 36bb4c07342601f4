//! Pre-signed download URLs of the local backend, served by Fluxbase itself.
//!
//! A URL carries the object key, an expiry (Unix seconds) and an HMAC-SHA256 over
//! `"<METHOD>\n<key>\n<expires>"` with a key derived from the instance secret. Changing the
//! key, the expiry or the method breaks the signature; the expiry is checked against
//! [`Clock`], which tests can move forward instead of waiting.

use std::sync::atomic::{AtomicI64, Ordering};
use std::time::Duration;

use chrono::{DateTime, Utc};
use ring::hmac;

use super::StorageError;

/// Wall-clock time with an adjustable offset: production never moves it; tests call
/// [`Clock::advance`] to reach an expiry without sleeping. One clock per app: download URLs and
/// login sessions expire by it.
#[derive(Default)]
pub struct Clock {
    offset_secs: AtomicI64,
}

impl Clock {
    pub fn now(&self) -> DateTime<Utc> {
        Utc::now() + chrono::Duration::seconds(self.offset_secs.load(Ordering::Relaxed))
    }

    pub fn advance(&self, by: Duration) {
        self.offset_secs
            .fetch_add(by.as_secs() as i64, Ordering::Relaxed);
    }
}

pub struct UrlSigner {
    key: hmac::Key,
}

impl UrlSigner {
    pub fn new(secret: &str) -> UrlSigner {
        UrlSigner {
            key: hmac::Key::new(hmac::HMAC_SHA256, secret.as_bytes()),
        }
    }

    fn message(method: &str, key: &str, expires: i64) -> String {
        format!("{method}\n{key}\n{expires}")
    }

    /// The hex signature for `method` on `key` until `expires` (Unix seconds).
    pub fn sign(&self, method: &str, key: &str, expires: i64) -> String {
        hex::encode(hmac::sign(&self.key, Self::message(method, key, expires).as_bytes()).as_ref())
    }

    /// Accepts an unexpired URL whose signature matches (compared in constant time).
    pub fn verify(
        &self,
        method: &str,
        key: &str,
        expires: &str,
        signature: &str,
        now: DateTime<Utc>,
    ) -> Result<(), StorageError> {
        let invalid = || StorageError::InvalidSignature;
        let expires: i64 = expires.parse().map_err(|_| invalid())?;
        let signature = hex::decode(signature).map_err(|_| invalid())?;
        hmac::verify(
            &self.key,
            Self::message(method, key, expires).as_bytes(),
            &signature,
        )
        .map_err(|_| invalid())?;
        if now.timestamp() > expires {
            return Err(StorageError::UrlExpired);
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn altered_or_expired_urls_are_refused() {
        let signer = UrlSigner::new("k");
        let now = Utc::now();
        let exp = now.timestamp() + 900;
        let sig = signer.sign("GET", "p/b/a.txt", exp);
        let e = exp.to_string();
        assert!(signer.verify("GET", "p/b/a.txt", &e, &sig, now).is_ok());
        assert!(signer.verify("GET", "p/b/b.txt", &e, &sig, now).is_err());
        assert!(signer.verify("PUT", "p/b/a.txt", &e, &sig, now).is_err());
        assert!(signer
            .verify("GET", "p/b/a.txt", &(exp + 1).to_string(), &sig, now)
            .is_err());
        assert!(signer.verify("GET", "p/b/a.txt", &e, "zz", now).is_err());
        let later = now + chrono::Duration::seconds(901);
        let err = signer
            .verify("GET", "p/b/a.txt", &e, &sig, later)
            .unwrap_err();
        assert!(err.to_string().contains("expired"));
    }

    #[test]
    fn the_clock_moves_only_when_told() {
        let clock = Clock::default();
        let before = clock.now();
        clock.advance(Duration::from_secs(3600));
        assert!(clock.now() - before >= chrono::Duration::seconds(3600));
    }
}
