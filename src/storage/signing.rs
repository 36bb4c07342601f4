//! Pre-signed download URLs of the local backend, served by Fluxbase itself.
//!
//! A URL carries the object key, an expiry (Unix seconds), the grant it was signed for and an
//! HMAC-SHA256 over `"<METHOD>\n<key>\n<expires>\n<grant>"` with a key derived from the
//! instance secret (URLs signed before grants existed have no grant and no fourth line).
//! Changing the key, the expiry, the grant or the method breaks the signature; the expiry is
//! checked against [`Clock`], which tests can move forward instead of waiting.
//!
//! The grant names who asked for the URL, so that the URL ends with their access rather than
//! outliving it by up to 15 minutes: `k.<key id>.<fingerprint of the key's secret>` (an API
//! key: deleted or rotated, its URLs are refused) or `u.<user id>` (a member: removed from the
//! project, their URLs are refused). The API layer checks it after the signature
//! ([`Grant`]).

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

    fn message(method: &str, key: &str, expires: i64, grant: Option<&str>) -> String {
        match grant {
            Some(grant) => format!("{method}\n{key}\n{expires}\n{grant}"),
            None => format!("{method}\n{key}\n{expires}"),
        }
    }

    /// The hex signature for `method` on `key` until `expires` (Unix seconds), for `grant`.
    pub fn sign(&self, method: &str, key: &str, expires: i64, grant: Option<&str>) -> String {
        hex::encode(
            hmac::sign(
                &self.key,
                Self::message(method, key, expires, grant).as_bytes(),
            )
            .as_ref(),
        )
    }

    /// A fingerprint of an API key's secret (from its SHA-256): another after a rotation, and
    /// nothing about the secret (an HMAC under the signing key).
    pub fn key_fingerprint(&self, key_hash: &[u8]) -> String {
        let tag = hmac::sign(&self.key, &[b"url-grant:".as_slice(), key_hash].concat());
        hex::encode(&tag.as_ref()[..12])
    }

    /// Accepts an unexpired URL whose signature matches (compared in constant time).
    pub fn verify(
        &self,
        method: &str,
        key: &str,
        expires: &str,
        grant: Option<&str>,
        signature: &str,
        now: DateTime<Utc>,
    ) -> Result<(), StorageError> {
        let invalid = || StorageError::InvalidSignature;
        let expires: i64 = expires.parse().map_err(|_| invalid())?;
        let signature = hex::decode(signature).map_err(|_| invalid())?;
        hmac::verify(
            &self.key,
            Self::message(method, key, expires, grant).as_bytes(),
            &signature,
        )
        .map_err(|_| invalid())?;
        if now.timestamp() > expires {
            return Err(StorageError::UrlExpired);
        }
        Ok(())
    }
}

/// Who a URL was signed for (see the module docs).
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Grant {
    /// An API key, and the fingerprint of the secret it had.
    Key { key_id: String, fingerprint: String },
    /// A member of the key's project.
    Member { user_id: String },
}

impl Grant {
    /// The URL's `grant` parameter.
    pub fn encode(&self) -> String {
        match self {
            Grant::Key {
                key_id,
                fingerprint,
            } => format!("k.{key_id}.{fingerprint}"),
            Grant::Member { user_id } => format!("u.{user_id}"),
        }
    }

    /// A `grant` parameter (its signature checked already), or `None` if it is no grant.
    pub fn decode(text: &str) -> Option<Grant> {
        match text.split_once('.')? {
            ("k", rest) => {
                let (key_id, fingerprint) = rest.rsplit_once('.')?;
                Some(Grant::Key {
                    key_id: key_id.to_string(),
                    fingerprint: fingerprint.to_string(),
                })
            }
            ("u", user_id) if !user_id.is_empty() => Some(Grant::Member {
                user_id: user_id.to_string(),
            }),
            _ => None,
        }
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
        let g = Some("k.key_1.abc");
        let sig = signer.sign("GET", "p/b/a.txt", exp, g);
        let e = exp.to_string();
        assert!(signer.verify("GET", "p/b/a.txt", &e, g, &sig, now).is_ok());
        assert!(signer.verify("GET", "p/b/b.txt", &e, g, &sig, now).is_err());
        assert!(signer.verify("PUT", "p/b/a.txt", &e, g, &sig, now).is_err());
        assert!(signer
            .verify("GET", "p/b/a.txt", &(exp + 1).to_string(), g, &sig, now)
            .is_err());
        assert!(signer.verify("GET", "p/b/a.txt", &e, g, "zz", now).is_err());
        // The grant is signed: another, or none, breaks the signature.
        for other in [Some("k.key_2.abc"), Some("u.someone"), None] {
            assert!(signer
                .verify("GET", "p/b/a.txt", &e, other, &sig, now)
                .is_err());
        }
        let later = now + chrono::Duration::seconds(901);
        let err = signer
            .verify("GET", "p/b/a.txt", &e, g, &sig, later)
            .unwrap_err();
        assert!(err.to_string().contains("expired"));
    }

    #[test]
    fn grants_read_back_as_written() {
        for grant in [
            Grant::Key {
                key_id: "key_AbC123".into(),
                fingerprint: "00ff".into(),
            },
            Grant::Member {
                user_id: "0b4f6a1e-8f0c-4e0e-9a55-2c9d1f1f3a10".into(),
            },
        ] {
            assert_eq!(Grant::decode(&grant.encode()), Some(grant));
        }
        for junk in ["", "k", "k.", "x.y", "u.", "k.nofingerprint"] {
            assert_eq!(Grant::decode(junk), None, "{junk}");
        }
    }

    #[test]
    fn the_clock_moves_only_when_told() {
        let clock = Clock::default();
        let before = clock.now();
        clock.advance(Duration::from_secs(3600));
        assert!(clock.now() - before >= chrono::Duration::seconds(3600));
    }
}
