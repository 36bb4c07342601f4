//! Passwords are hashed with Argon2id (RFC 9106 defaults of the `argon2` crate), off the async
//! threads: a request's on the account limits' hashing threads
//! ([`crate::auth::ratelimit::AccountLimits::hash`]), in working memory reused per thread.

use argon2::password_hash::{Output, ParamsString, PasswordHash, SaltString};
use argon2::Argon2;

use crate::secrets::random_bytes;

/// Between 8 characters and 1024 bytes.
pub(super) fn password_length_ok(password: &str) -> bool {
    password.chars().count() >= 8 && password.len() <= 1024
}

thread_local! {
    /// Argon2's working memory (~19 MiB with the default parameters), allocated once per
    /// hashing thread and reused: a fresh allocation per hash made the allocator keep a new
    /// 19 MiB region resident after most logins (see [`crate::auth::ratelimit`]).
    static ARGON2_MEMORY: std::cell::RefCell<Vec<argon2::Block>> =
        const { std::cell::RefCell::new(Vec::new()) };
}

/// Argon2 of `password` and `salt` into `out`, in this thread's reused working memory.
fn argon2_into(argon: &Argon2, password: &[u8], salt: &[u8], out: &mut [u8]) -> anyhow::Result<()> {
    ARGON2_MEMORY.with(|memory| {
        let mut memory = memory.borrow_mut();
        let blocks = argon.params().block_count();
        if memory.len() < blocks {
            memory.resize(blocks, argon2::Block::default());
        }
        argon
            .hash_password_into_with_memory(password, salt, out, &mut memory[..blocks])
            .map_err(|e| anyhow::anyhow!("argon2: {e}"))
    })
}

/// Hashes a password into a PHC string (`$argon2id$v=19$m=19456,t=2,p=1$…`). Slow and
/// memory-hard: run it through [`crate::auth::ratelimit::AccountLimits::hash`].
pub fn hash_password(password: &str) -> anyhow::Result<String> {
    let argon = Argon2::default();
    let salt_bytes = random_bytes::<16>();
    let salt = SaltString::encode_b64(&salt_bytes).map_err(|e| anyhow::anyhow!("salt: {e}"))?;
    let mut out = [0u8; argon2::Params::DEFAULT_OUTPUT_LEN];
    argon2_into(&argon, password.as_bytes(), &salt_bytes, &mut out)?;
    let phc = PasswordHash {
        algorithm: argon2::Algorithm::Argon2id.ident(),
        version: Some(argon2::Version::V0x13.into()),
        params: ParamsString::try_from(argon.params()).map_err(|e| anyhow::anyhow!("{e}"))?,
        salt: Some(salt.as_salt()),
        hash: Some(Output::new(&out).map_err(|e| anyhow::anyhow!("{e}"))?),
    };
    Ok(phc.to_string())
}

/// Whether `password` matches the PHC string `stored` (any Argon2 variant and parameters).
fn password_matches(password: &str, stored: &str) -> anyhow::Result<bool> {
    let err = |e: argon2::password_hash::Error| anyhow::anyhow!("{e}");
    let phc = PasswordHash::new(stored).map_err(err)?;
    let params = argon2::Params::try_from(&phc).map_err(err)?;
    let algorithm = argon2::Algorithm::try_from(phc.algorithm).map_err(err)?;
    let version = phc
        .version
        .map(argon2::Version::try_from)
        .transpose()
        .map_err(|e| anyhow::anyhow!("{e}"))?
        .unwrap_or_default();
    let (Some(salt), Some(expected)) = (phc.salt, phc.hash) else {
        return Ok(false);
    };
    let mut salt_buf = [0u8; 64];
    let salt = salt.decode_b64(&mut salt_buf).map_err(err)?;
    let mut out = vec![0u8; expected.len()];
    argon2_into(
        &Argon2::new(algorithm, version, params),
        password.as_bytes(),
        salt,
        &mut out,
    )?;
    // `Output`'s equality is constant-time.
    Ok(Output::new(&out).map_err(err)? == expected)
}

/// Checks a password against a stored hash (as slow as [`hash_password`]).
pub(super) fn verify_password(password: &str, hash: Option<&str>) -> bool {
    // Unknown users are checked against a fixed hash so both paths take the same time.
    const DUMMY: &str = "$argon2id$v=19$m=19456,t=2,p=1$c29tZXNhbHRzb21lc2FsdA$2k9Ic3Mdg1xGv+xNkNu3fvWXyLBzKKWmXtYRtRbX3Co";
    let ok = password_matches(password, hash.unwrap_or(DUMMY)).unwrap_or(false);
    ok && hash.is_some()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn password_hashes_verify_and_differ_per_salt() {
        let h1 = hash_password("correct horse").unwrap();
        let h2 = hash_password("correct horse").unwrap();
        assert!(h1.starts_with("$argon2id$"));
        assert_ne!(h1, h2);
        assert!(verify_password("correct horse", Some(&h1)));
        assert!(!verify_password("wrong horse", Some(&h1)));
        assert!(!verify_password("correct horse", None));
    }

    #[test]
    fn hashes_are_compatible_with_the_argon2_crates_own() {
        use argon2::password_hash::{PasswordHasher, PasswordVerifier};
        let ours = hash_password("correct horse").unwrap();
        let parsed = PasswordHash::new(&ours).unwrap();
        assert!(Argon2::default()
            .verify_password(b"correct horse", &parsed)
            .is_ok());
        let salt = SaltString::encode_b64(b"sixteen byte salt").unwrap();
        let theirs = Argon2::default()
            .hash_password(b"correct horse", &salt)
            .unwrap()
            .to_string();
        assert!(verify_password("correct horse", Some(&theirs)));
        assert!(!verify_password("correct horsf", Some(&theirs)));
    }
}
