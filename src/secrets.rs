//! Random identifiers, tokens and the instance secrets kept in `$FLUXBASE_DATA_DIR/secrets.json`.
//!
//! The instance secret derives the passwords of the per-project PostgreSQL roles
//! (HMAC-SHA256, so nothing about them is stored anywhere) and will sign realtime tokens and
//! pre-signed URLs. The file is created once with mode 0600 and reused on every start.

use std::path::Path;

use anyhow::{Context, Result};
use ring::hmac;
use ring::rand::{SecureRandom, SystemRandom};
use serde::{Deserialize, Serialize};

const BASE62: &[u8] = b"0123456789ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz";

/// `n` random bytes from the operating system's CSPRNG.
pub fn random_bytes<const N: usize>() -> [u8; N] {
    let mut buf = [0u8; N];
    SystemRandom::new()
        .fill(&mut buf)
        .expect("the system random source failed");
    buf
}

/// `len` uniformly random base62 characters (rejection sampling, no modulo bias).
pub fn random_base62(len: usize) -> String {
    let mut out = String::with_capacity(len);
    while out.len() < len {
        for b in random_bytes::<64>() {
            if b < 248 && out.len() < len {
                out.push(BASE62[(b % 62) as usize] as char);
            }
        }
    }
    out
}

/// Lowercase hex of `N` random bytes.
pub fn random_hex<const N: usize>() -> String {
    hex::encode(random_bytes::<N>())
}

/// SHA-256 of a presented secret, the form stored at rest.
pub fn sha256(data: &[u8]) -> Vec<u8> {
    ring::digest::digest(&ring::digest::SHA256, data)
        .as_ref()
        .to_vec()
}

/// A credential held in memory (a database URL with its password, an S3 secret key, a bearer
/// token): `Debug` and `Display` print `[redacted]`, so a value that carries one (the
/// configuration, an error) can be logged whole. [`Secret::expose`] is the one way to the text,
/// so every place that uses it is easy to find.
#[derive(Clone, PartialEq, Eq, Deserialize)]
#[serde(transparent)]
pub struct Secret(String);

impl Secret {
    pub fn new(value: impl Into<String>) -> Secret {
        Secret(value.into())
    }

    /// The secret text, for the one place that needs it (a connection, a signature, a compare).
    pub fn expose(&self) -> &str {
        &self.0
    }
}

impl From<String> for Secret {
    fn from(value: String) -> Secret {
        Secret(value)
    }
}

impl From<&str> for Secret {
    fn from(value: &str) -> Secret {
        Secret(value.to_string())
    }
}

impl std::fmt::Debug for Secret {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("[redacted]")
    }
}

impl std::fmt::Display for Secret {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("[redacted]")
    }
}

#[derive(Clone, Serialize, Deserialize)]
pub struct Secrets {
    /// 32 random bytes, hex.
    pub instance_secret: String,
    /// Password of the embedded cluster's superuser.
    pub pg_password: String,
}

impl std::fmt::Debug for Secrets {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Secrets(***)")
    }
}

/// Creates `dir` and any missing parent with mode 0700 (only the server's user may enter), and
/// sets 0700 on `dir` itself if it already existed.
pub fn create_private_dir(dir: &Path) -> std::io::Result<()> {
    use std::os::unix::fs::{DirBuilderExt, PermissionsExt};
    std::fs::DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(dir)?;
    std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o700))
}

/// The data directory (cluster, objects, spill files, secrets), private to the server's user:
/// 0700, also when an older version left it open. One exception: run as root with the
/// embedded cluster, PostgreSQL runs as an unprivileged user who must pass through it to its
/// own directory, so it is 0711 then: nobody else can list it, and everything in it is itself
/// 0700 (directories) or 0600 (files).
pub fn create_data_dir(dir: &Path, embedded_cluster: bool) -> std::io::Result<()> {
    use std::os::unix::fs::{DirBuilderExt, MetadataExt, PermissionsExt};
    std::fs::DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(dir)?;
    // A CLI command attached to a running server's cluster has a database URL, but the
    // directory still hosts that embedded cluster (`pg/`): it must stay passable for it. The
    // mode is decided first and set once, so the cluster never sees it closed, not even briefly.
    let hosts_cluster = embedded_cluster || dir.join("pg").exists() || dir.join("mariadb").exists();
    let mode = if hosts_cluster && std::fs::metadata(dir)?.uid() == 0 {
        0o711
    } else {
        0o700
    };
    std::fs::set_permissions(dir, std::fs::Permissions::from_mode(mode))
}

impl Secrets {
    /// Loads the secrets file under `data_dir`, creating it on first use. The file is 0600,
    /// also when an older version left it open.
    pub fn load_or_create(data_dir: &Path) -> Result<Secrets> {
        let path = data_dir.join("secrets.json");
        if path.exists() {
            use std::os::unix::fs::PermissionsExt;
            std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o600))?;
            let text = std::fs::read_to_string(&path)?;
            return serde_json::from_str(&text).with_context(|| format!("{}", path.display()));
        }
        std::fs::create_dir_all(data_dir)?;
        let secrets = Secrets {
            instance_secret: random_hex::<32>(),
            pg_password: random_base62(32),
        };
        use std::io::Write;
        use std::os::unix::fs::OpenOptionsExt;
        let mut file = std::fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(0o600)
            .open(&path)
            .with_context(|| format!("creating {}", path.display()))?;
        file.write_all(serde_json::to_string_pretty(&secrets)?.as_bytes())?;
        Ok(secrets)
    }

    /// HMAC-SHA256 of `purpose` under the instance secret, hex: stable per instance, unguessable.
    pub fn derive(&self, purpose: &str) -> String {
        let key = hmac::Key::new(hmac::HMAC_SHA256, self.instance_secret.as_bytes());
        hex::encode(hmac::sign(&key, purpose.as_bytes()).as_ref())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn base62_tokens_have_the_requested_length_and_alphabet() {
        let t = random_base62(32);
        assert_eq!(t.len(), 32);
        assert!(t.bytes().all(|b| BASE62.contains(&b)));
        assert_ne!(t, random_base62(32));
    }

    #[test]
    fn a_root_owned_dir_hosting_the_cluster_is_never_closed_while_attaching() {
        use std::os::unix::fs::{MetadataExt, PermissionsExt};
        let dir = std::env::temp_dir().join(format!("fluxbase-dd-{}", random_hex::<8>()));
        std::fs::create_dir_all(dir.join("pg")).unwrap();
        if std::fs::metadata(&dir).unwrap().uid() != 0 {
            eprintln!("not root: the 0711 case does not arise");
            std::fs::remove_dir_all(&dir).unwrap();
            return;
        }
        create_data_dir(&dir, false).unwrap();
        let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
        let watcher = {
            let (dir, stop) = (dir.clone(), stop.clone());
            std::thread::spawn(move || {
                let mut seen = std::collections::BTreeSet::new();
                while !stop.load(std::sync::atomic::Ordering::SeqCst) {
                    seen.insert(std::fs::metadata(&dir).unwrap().permissions().mode() & 0o777);
                }
                seen
            })
        };
        for _ in 0..3000 {
            create_data_dir(&dir, false).unwrap();
        }
        stop.store(true, std::sync::atomic::Ordering::SeqCst);
        let seen = watcher.join().unwrap();
        std::fs::remove_dir_all(&dir).unwrap();
        assert_eq!(seen.into_iter().collect::<Vec<_>>(), vec![0o711]);
    }

    #[test]
    fn a_secret_prints_redacted_and_exposes_its_text() {
        let s = Secret::from("hunter2");
        assert_eq!(format!("{s:?} {s}"), "[redacted] [redacted]");
        assert_eq!(format!("{:?}", Some(s.clone())), "Some([redacted])");
        assert_eq!(s.expose(), "hunter2");
        let parsed: Secret = serde_json::from_str("\"pw\"").unwrap();
        assert_eq!(parsed.expose(), "pw");
    }

    #[test]
    fn derived_secrets_are_stable_and_distinct() {
        let s = Secrets {
            instance_secret: "a".repeat(64),
            pg_password: String::new(),
        };
        assert_eq!(s.derive("x"), s.derive("x"));
        assert_ne!(s.derive("x"), s.derive("y"));
        assert_eq!(s.derive("x").len(), 64);
    }
}
