//! What a download needs of a file's row (its name, type and bucket's visibility), kept in
//! memory for the local backend, so that a download of a file this server just stored or
//! served reads no row from the control database: it opens the object (which it does anyway),
//! and the entry is used only when the open file is the very one the entry was made for.
//!
//! An entry names the object's file by its identity ([`FileIdentity`]: device, inode, size,
//! change and modification times in nanoseconds). Whatever replaces or removes the object
//! changes what the download opens: a new upload of the key is a new file moved into place
//! (another inode, another change time), a delete removes the file (the open fails, nothing is
//! served). What changes the row but not the object is made to forget here, by the code that
//! changes it, after the change committed:
//! * a file's delete mark (`deleting_at`): [`ServedFiles::forget`] before the object goes;
//! * a bucket's change (its visibility decides `public_only` and `Cache-Control`):
//!   [`ServedFiles::clear`].
//!
//! Entries read from the database race with those changes: a download that read the row
//! before a change committed must not store it after the change forgot it. Every forget and
//! clear moves a generation on; a row read from the database is stored only if the generation
//! is the one seen before the read began ([`ServedFiles::generation`], [`ServedFiles::offer`]).
//!
//! Only for the local backend of a single server: in cluster mode another node may change a
//! bucket without this one hearing of it, so the cache is off there (and with S3, where there
//! is no file to identify). Bounded: at most [`CAPACITY`] entries (past it an arbitrary entry
//! is dropped per insert).

use std::collections::HashMap;
use std::sync::Mutex;

/// Most entries kept (each a key, a name and a content type: a few hundred bytes).
pub const CAPACITY: usize = 4096;

/// Which file an open object is: two opens give the same identity only for the same file,
/// unchanged (a rename into place changes the moved file's change time).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct FileIdentity {
    dev: u64,
    ino: u64,
    size: u64,
    ctime_ns: i128,
    mtime_ns: i128,
}

impl FileIdentity {
    pub fn of(meta: &std::fs::Metadata) -> FileIdentity {
        use std::os::unix::fs::MetadataExt;
        let ns = |s: i64, n: i64| s as i128 * 1_000_000_000 + n as i128;
        FileIdentity {
            dev: meta.dev(),
            ino: meta.ino(),
            size: meta.size(),
            ctime_ns: ns(meta.ctime(), meta.ctime_nsec()),
            mtime_ns: ns(meta.mtime(), meta.mtime_nsec()),
        }
    }

    /// Its entity tag (a digest of all of it: a replaced or rewritten file gets another) and
    /// its modification time ([`super::ranges`]).
    pub fn validators(&self) -> super::ranges::Validators {
        let modified = u64::try_from(self.mtime_ns)
            .ok()
            .map(|ns| std::time::UNIX_EPOCH + std::time::Duration::from_nanos(ns));
        super::ranges::Validators::new(
            &[
                &self.dev.to_le_bytes(),
                &self.ino.to_le_bytes(),
                &self.size.to_le_bytes(),
                &self.ctime_ns.to_le_bytes(),
                &self.mtime_ns.to_le_bytes(),
            ],
            modified,
        )
    }
}

/// What a download answers about a file, besides its bytes.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Served {
    pub name: String,
    pub content_type: String,
    /// Its bucket is public.
    pub public: bool,
}

#[derive(Default)]
struct Inner {
    generation: u64,
    entries: HashMap<String, (FileIdentity, Served)>,
}

/// The cache (see the module docs); `enabled: false` keeps nothing.
pub struct ServedFiles {
    enabled: bool,
    inner: Mutex<Inner>,
}

impl ServedFiles {
    pub fn new(enabled: bool) -> ServedFiles {
        ServedFiles {
            enabled,
            inner: Default::default(),
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Inner> {
        self.inner.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Whether `key` has an entry (whatever file it names).
    pub fn holds(&self, key: &str) -> bool {
        self.enabled && self.lock().entries.contains_key(key)
    }

    /// The entry of `key` if it was made for the file `identity`.
    pub fn get(&self, key: &str, identity: &FileIdentity) -> Option<Served> {
        if !self.enabled {
            return None;
        }
        match self.lock().entries.get(key) {
            Some((id, served)) if id == identity => Some(served.clone()),
            _ => None,
        }
    }

    /// The generation to pass to [`ServedFiles::offer`]: read it before reading the row.
    pub fn generation(&self) -> u64 {
        self.lock().generation
    }

    /// Stores a row read from the database since `generation`, unless something was forgotten
    /// since (the row may be older than that).
    pub fn offer(&self, key: &str, identity: FileIdentity, served: Served, generation: u64) {
        if !self.enabled {
            return;
        }
        let mut inner = self.lock();
        if inner.generation == generation {
            insert(&mut inner, key, identity, served);
        }
    }

    /// Stores what an upload just committed for the file it moved into place (newer than any
    /// row a download is reading meanwhile, which the new generation keeps out), unless
    /// something was forgotten since `generation` (read before the upload's commit read the
    /// row: a bucket made private after that read must not be cached as public).
    pub fn stored(&self, key: &str, identity: FileIdentity, served: Served, generation: u64) {
        if !self.enabled {
            return;
        }
        let mut inner = self.lock();
        let unchanged = inner.generation == generation;
        inner.generation += 1;
        if unchanged {
            insert(&mut inner, key, identity, served);
        } else {
            inner.entries.remove(key);
        }
    }

    /// Drops the entries of every key under `prefix` (a project deleted: `"<project id>/"`).
    pub fn forget_under(&self, prefix: &str) {
        if !self.enabled {
            return;
        }
        let mut inner = self.lock();
        inner.generation += 1;
        inner.entries.retain(|key, _| !key.starts_with(prefix));
    }

    /// Drops `key`'s entry (its row changed).
    pub fn forget(&self, key: &str) {
        if !self.enabled {
            return;
        }
        let mut inner = self.lock();
        inner.generation += 1;
        inner.entries.remove(key);
    }

    /// Drops every entry (a bucket changed).
    pub fn clear(&self) {
        if !self.enabled {
            return;
        }
        let mut inner = self.lock();
        inner.generation += 1;
        inner.entries.clear();
    }

    #[cfg(test)]
    fn len(&self) -> usize {
        self.lock().entries.len()
    }
}

fn insert(inner: &mut Inner, key: &str, identity: FileIdentity, served: Served) {
    if inner.entries.len() >= CAPACITY && !inner.entries.contains_key(key) {
        if let Some(victim) = inner.entries.keys().next().cloned() {
            inner.entries.remove(&victim);
        }
    }
    inner.entries.insert(key.to_string(), (identity, served));
}

#[cfg(test)]
mod tests {
    use super::*;

    fn served(t: &str) -> Served {
        Served {
            name: "a.txt".into(),
            content_type: t.into(),
            public: false,
        }
    }

    fn identity_of(path: &std::path::Path) -> FileIdentity {
        FileIdentity::of(&std::fs::metadata(path).unwrap())
    }

    #[test]
    fn an_entry_serves_only_the_file_it_was_made_for() {
        let dir = std::env::temp_dir().join(format!(
            "fluxbase-served-{}",
            crate::secrets::random_hex::<8>()
        ));
        std::fs::create_dir_all(&dir).unwrap();
        let (key, staged) = (dir.join("key"), dir.join("staged"));
        std::fs::write(&key, b"one").unwrap();
        let first = identity_of(&key);
        let cache = ServedFiles::new(true);
        cache.stored("p/b/key", first, served("text/plain"), cache.generation());
        assert_eq!(cache.get("p/b/key", &first), Some(served("text/plain")));
        // Replaced by a file of the same size moved into place (as an upload does).
        std::fs::write(&staged, b"two").unwrap();
        std::fs::rename(&staged, &key).unwrap();
        let second = identity_of(&key);
        assert_ne!(first, second);
        assert_eq!(cache.get("p/b/key", &second), None);
        assert!(cache.holds("p/b/key"));
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn a_row_read_before_a_forget_is_not_stored_after_it() {
        let id = FileIdentity::of(&std::fs::metadata(std::env::temp_dir()).unwrap());
        let cache = ServedFiles::new(true);
        let seen = cache.generation();
        cache.forget("p/b/key");
        cache.offer("p/b/key", id, served("text/plain"), seen);
        assert_eq!(cache.get("p/b/key", &id), None);
        let seen = cache.generation();
        cache.offer("p/b/key", id, served("text/plain"), seen);
        assert!(cache.get("p/b/key", &id).is_some());
        // An upload's commit moves the generation on too: an older read stays out.
        let seen = cache.generation();
        cache.stored("p/b/key", id, served("image/png"), seen);
        cache.offer("p/b/key", id, served("text/plain"), seen);
        assert_eq!(cache.get("p/b/key", &id), Some(served("image/png")));
        cache.clear();
        assert_eq!(cache.get("p/b/key", &id), None);
        // An upload whose row was read before a bucket change is not stored after it (the
        // row may say "public" of a bucket made private), and drops an older entry.
        cache.stored("p/b/key", id, served("text/plain"), cache.generation());
        let before_commit = cache.generation();
        cache.clear();
        cache.stored("p/b/other", id, served("text/plain"), cache.generation());
        cache.stored("p/b/key", id, served("image/png"), before_commit);
        assert!(!cache.holds("p/b/key"));
        // A deleted project's entries go, others stay.
        cache.stored("q/b/key", id, served("text/plain"), cache.generation());
        cache.forget_under("p/");
        assert!(!cache.holds("p/b/other") && cache.holds("q/b/key"));
    }

    #[test]
    fn it_is_bounded_and_off_when_disabled() {
        let id = FileIdentity::of(&std::fs::metadata(std::env::temp_dir()).unwrap());
        let cache = ServedFiles::new(true);
        for i in 0..CAPACITY + 10 {
            cache.stored(
                &format!("p/b/{i}"),
                id,
                served("text/plain"),
                cache.generation(),
            );
        }
        assert_eq!(cache.len(), CAPACITY);
        assert!(cache.holds(&format!("p/b/{}", CAPACITY + 9)));
        let off = ServedFiles::new(false);
        off.stored("p/b/k", id, served("text/plain"), off.generation());
        assert!(!off.holds("p/b/k") && off.get("p/b/k", &id).is_none());
    }
}
