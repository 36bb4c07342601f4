//! Where objects live, through the `object_store` crate: the local filesystem under
//! `$FLUXBASE_DATA_DIR/storage` (the embedded default) or one S3 bucket (any S3-compatible
//! endpoint).
//!
//! Writes are streamed, so an upload holds a few parts in memory whatever its size. On S3,
//! [`ObjectWriter`] hands `object_store` parts of 5 MiB and waits for capacity; the object is
//! visible once the multipart upload completes. On the local disk it writes the file at the key
//! itself (uploads write to a staging key that nothing lists, and move it into place after), in
//! 1 MiB writes on the blocking pool whose pages are handed to the kernel's writeback at once, so
//! that the fsync ending the write finds little left to do; [`Backend::persist`] then makes its
//! move into place durable. A failed, aborted or dropped write leaves nothing.
//!
//! An object is stored under its key exactly as the API reports it (`s3_key`): `café [1].txt`
//! is that file on disk and that key in the bucket ([`path_of`]), not the percent-encoded form
//! `object_store`'s `Path::from` would make of it. Objects an earlier version stored under that
//! encoded form are moved to their key once, at start-up ([`Backend::migrate_legacy`], called
//! by the storage migration in `storage/sweep.rs`); nothing at run time guesses at an encoded
//! path, so an object never reads, signs or deletes another object stored under a key that
//! happens to be its encoded form (`caf%C3%A9.txt` is a name of its own, not `café.txt`).

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context, Result};
use bytes::Bytes;
use futures_util::stream::BoxStream;
use futures_util::StreamExt;
use object_store::aws::{AmazonS3, AmazonS3Builder};
use object_store::local::LocalFileSystem;
use object_store::path::Path;
use object_store::signer::Signer;
use object_store::{
    Attribute, Attributes, GetResultPayload, ObjectStore, PutMultipartOptions, WriteMultipart,
};

use super::buffers::{Buffers, Share, BIG_CHUNK, SMALL_CHUNK, STREAM_HOLD};
use super::ranges::{Conditions, Outcome, Validators};
use super::served::FileIdentity;
use super::StorageError;
use crate::config::Config;

/// The store's path of an object key: the key itself, character for character (`Path::parse`
/// keeps non-ASCII and `% ~ [ ]` as they are; names were validated, so it always takes them).
pub fn path_of(key: &str) -> Path {
    Path::parse(key).unwrap_or_else(|_| Path::from(key))
}

/// Where versions before this one stored `key` (`Path::from` percent-encodes non-ASCII and
/// characters such as `% ~ [ ]`), when that differs from [`path_of`]. Only the start-up
/// migration looks there: that path may be another object's own key.
pub fn legacy_path_of(key: &str) -> Option<Path> {
    let legacy = Path::from(key);
    (legacy != path_of(key)).then_some(legacy)
}

/// Why a move into place on the local disk failed. A file where a folder of the key should be,
/// or a folder (with something in it) at the key itself, is not a passing failure: the same
/// move fails the same way until one of them goes, so it is a conflict (409) naming what is in
/// the way, never the 503 that asks the client to retry. The reservation's check makes this
/// unreachable for files that have rows ([`crate::control::files::reserve_in_bucket`]); an
/// object on the disk that no row lists can still be in the way.
fn placing_error(key: &str, e: std::io::Error) -> StorageError {
    use std::io::ErrorKind::*;
    match e.kind() {
        NotADirectory | IsADirectory | DirectoryNotEmpty | AlreadyExists => {
            let name = key.splitn(3, '/').nth(2).unwrap_or(key);
            StorageError::PathInUse(name.to_string())
        }
        _ => StorageError::Unavailable(format!("placing {key}: {e}")),
    }
}

/// Parts in flight per upload.
const UPLOAD_CONCURRENCY: usize = 2;
/// A local file of at most this many bytes is read whole when it is opened and answered from
/// that one buffer (no stream, no task feeding it), if the read budget has that much free; a
/// larger one streams (four chunks ahead of the client at most,
/// `api::storage::response_body`). What downloads hold in all is bounded by the budget
/// ([`super::buffers`]).
pub const WHOLE_READ: u64 = 4 * 1024 * 1024;

/// A stored object as [`Backend::read`] hands it out.
pub struct Object {
    /// The body's bytes: the whole object, the range asked for, or none (not modified, an
    /// unsatisfiable range); the body is exactly this long (a shorter object cuts a stream off
    /// with an error).
    pub size: u64,
    /// The whole object's bytes.
    pub total: u64,
    /// What the request's range and preconditions make of it ([`super::ranges`]).
    pub outcome: Outcome,
    pub validators: Validators,
    pub body: ObjectBody,
    /// Which file it is (the local backend only).
    pub identity: Option<FileIdentity>,
}

/// An object's bytes.
pub enum ObjectBody {
    /// All of them, read already.
    Whole(Bytes),
    /// As they are read.
    Stream(BoxStream<'static, std::io::Result<Bytes>>),
}

/// Where objects live: the `storage` setting (`local` or `s3`).
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum StorageKind {
    /// Files under `<data_dir>/storage`.
    Local,
    /// One S3 bucket (any S3-compatible endpoint).
    S3,
}

impl std::str::FromStr for StorageKind {
    type Err = anyhow::Error;

    fn from_str(s: &str) -> Result<StorageKind> {
        match s {
            "local" => Ok(StorageKind::Local),
            "s3" => Ok(StorageKind::S3),
            other => anyhow::bail!("storage must be `local` or `s3`, not {other:?}"),
        }
    }
}

pub enum Backend {
    Local {
        store: Arc<LocalFileSystem>,
        root: PathBuf,
        durable: Arc<DurableDirs>,
        /// Read buffers (their budget) and upload parts, reused.
        buffers: Arc<Buffers>,
    },
    S3 {
        store: Arc<AmazonS3>,
        bucket: String,
    },
}

impl Backend {
    pub fn open(config: &Config, metrics: Arc<crate::metrics::Metrics>) -> Result<Backend> {
        match config.storage.parse()? {
            StorageKind::S3 => {
                let bucket = config
                    .s3_bucket
                    .clone()
                    .context("storage = s3 needs FLUXBASE_S3_BUCKET")?;
                let mut builder = AmazonS3Builder::from_env().with_bucket_name(&bucket);
                if let Some(region) = &config.s3_region {
                    builder = builder.with_region(region);
                }
                if let Some(endpoint) = &config.s3_endpoint {
                    builder = builder
                        .with_endpoint(endpoint)
                        .with_allow_http(endpoint.starts_with("http://"));
                }
                if let Some(id) = config.s3_access_key_id.as_ref().map(|id| id.expose()) {
                    builder = builder.with_access_key_id(id);
                }
                if let Some(secret) = &config.s3_secret_access_key {
                    builder = builder.with_secret_access_key(secret.expose());
                }
                let store = builder.build().context("configuring the S3 backend")?;
                tracing::info!(bucket, endpoint = ?config.s3_endpoint, "storage: S3");
                Ok(Backend::S3 {
                    store: Arc::new(store),
                    bucket,
                })
            }
            StorageKind::Local => {
                // Private to the server's user: objects are 0600 in directories of 0700, and the
                // root's own mode keeps out anyone else even from files an older version left 0644.
                let root = config.data_dir.join("storage");
                crate::secrets::create_private_dir(&root)
                    .with_context(|| format!("creating {}", root.display()))?;
                let root = root.canonicalize()?;
                let store = LocalFileSystem::new_with_prefix(&root)
                    .context("opening the local storage directory")?
                    .with_automatic_cleanup(true);
                tracing::info!(root = %root.display(), "storage: local filesystem");
                Ok(Backend::Local {
                    store: Arc::new(store),
                    root,
                    durable: Default::default(),
                    buffers: Buffers::new(
                        config.storage_read_budget_bytes,
                        config.storage_read_shares_per_client,
                        metrics,
                    ),
                })
            }
        }
    }

    /// Whether the backend can be used now: the S3 bucket is listed (it exists, the
    /// credentials are accepted, the endpoint answers); the local root is a directory. The
    /// error names the cause.
    pub async fn check(&self) -> Result<(), String> {
        match self {
            Backend::S3 { store, bucket } => {
                let probe = Path::from(".fluxbase-probe");
                match tokio::time::timeout(
                    Duration::from_secs(10),
                    store.list_with_delimiter(Some(&probe)),
                )
                .await
                {
                    Ok(Ok(_)) => Ok(()),
                    Ok(Err(e)) => Err(format!("S3 bucket {bucket:?}: {e}")),
                    Err(_) => Err(format!("S3 bucket {bucket:?}: no answer within 10 s")),
                }
            }
            Backend::Local { root, .. } => match std::fs::metadata(root) {
                Ok(m) if m.is_dir() => Ok(()),
                Ok(_) => Err(format!("{} is not a directory", root.display())),
                Err(e) => Err(format!("{}: {e}", root.display())),
            },
        }
    }

    pub fn store(&self) -> Arc<dyn ObjectStore> {
        match self {
            Backend::Local { store, .. } => store.clone(),
            Backend::S3 { store, .. } => store.clone(),
        }
    }

    /// The local backend's buffers (its read budget).
    pub fn buffers(&self) -> Option<&Arc<Buffers>> {
        match self {
            Backend::Local { buffers, .. } => Some(buffers),
            Backend::S3 { .. } => None,
        }
    }

    pub fn is_local(&self) -> bool {
        matches!(self, Backend::Local { .. })
    }

    pub fn describe(&self) -> String {
        match self {
            Backend::Local { root, .. } => format!("local:{}", root.display()),
            Backend::S3 { bucket, .. } => format!("s3:{bucket}"),
        }
    }

    /// S3 needs parts of at least 5 MiB (but the last).
    fn chunk_size(&self) -> usize {
        5 * 1024 * 1024
    }

    /// Starts a streamed write of `key`.
    /// `content_disposition` goes with the object on S3, so that its pre-signed URLs are
    /// served with it; the local store keeps no attributes (Fluxbase serves those files itself,
    /// from the metadata row).
    pub async fn writer(
        &self,
        key: &str,
        content_type: &str,
        content_disposition: &str,
    ) -> Result<ObjectWriter, StorageError> {
        if let Backend::Local { store, .. } = self {
            // The file is made by the first write, in the same trip to the blocking pool.
            let path = store
                .path_to_filesystem(&path_of(key))
                .map_err(unavailable)?;
            return Ok(ObjectWriter {
                inner: Inner::Local(LocalWriter {
                    path,
                    file: None,
                    in_flight: None,
                    part: Vec::new(),
                    part_len: 0,
                    offset: 0,
                    done: false,
                }),
                written: 0,
            });
        }
        let mut attributes = Attributes::new();
        {
            attributes.insert(Attribute::ContentType, content_type.to_string().into());
            attributes.insert(
                Attribute::ContentDisposition,
                content_disposition.to_string().into(),
            );
        }
        let upload = self
            .store()
            .put_multipart_opts(
                &path_of(key),
                PutMultipartOptions {
                    attributes,
                    ..Default::default()
                },
            )
            .await
            .map_err(unavailable)?;
        Ok(ObjectWriter {
            inner: Inner::Remote(WriteMultipart::new_with_chunk_size(
                upload,
                self.chunk_size(),
            )),
            written: 0,
        })
    }

    /// Moves a complete object (atomic on the local disk; copy and delete on S3).
    pub async fn rename(&self, from: &str, to: &str) -> Result<(), StorageError> {
        self.rename_path(&path_of(from), &path_of(to)).await
    }

    async fn rename_path(&self, from: &Path, to: &Path) -> Result<(), StorageError> {
        if let Backend::Local { store, durable, .. } = self {
            // The store would make a missing directory with the default mode: make it private.
            let to_path = store.path_to_filesystem(to).map_err(unavailable)?;
            if let Some(dir) = to_path.parent().map(std::path::Path::to_path_buf) {
                let durable = durable.clone();
                tokio::task::spawn_blocking(move || durable.create(&dir))
                    .await
                    .map_err(StorageError::from)?
                    .map_err(|e| StorageError::Unavailable(format!("creating {to}: {e}")))?;
            }
        }
        self.store().rename(from, to).await.map_err(unavailable)
    }

    /// The size of the object stored at `key`, if there is one.
    pub async fn object_size(&self, key: &str) -> Result<Option<u64>, StorageError> {
        match self.store().head(&path_of(key)).await {
            Ok(meta) => Ok(Some(meta.size)),
            Err(object_store::Error::NotFound { .. }) => Ok(None),
            Err(e) => Err(unavailable(e)),
        }
    }

    /// Whether an object is stored at `path`.
    async fn exists(&self, path: &Path) -> Result<bool, StorageError> {
        match self.store().head(path).await {
            Ok(_) => Ok(true),
            Err(object_store::Error::NotFound { .. }) => Ok(false),
            Err(e) => Err(unavailable(e)),
        }
    }

    /// Moves the object an older version stored for `key` under its encoded path
    /// ([`legacy_path_of`]) to the key itself, when that is certain to be right: no object is
    /// at the key yet, one is at the encoded path, and the encoded path is not the key of
    /// another stored file (`is_key`), whose object it could be. Whether it moved anything.
    /// Idempotent, and safe to interrupt: a move never overwrites an object (on S3 a cut-off
    /// copy-and-delete leaves the object at its key, and the old copy is then left alone).
    pub async fn migrate_legacy(
        &self,
        key: &str,
        is_key: impl Fn(&str) -> bool,
    ) -> Result<bool, StorageError> {
        let Some(legacy) = legacy_path_of(key) else {
            return Ok(false);
        };
        if is_key(legacy.as_ref()) {
            return Ok(false);
        }
        let path = path_of(key);
        if self.exists(&path).await? || !self.exists(&legacy).await? {
            return Ok(false);
        }
        self.rename_path(&legacy, &path).await?;
        Ok(true)
    }

    /// Moves a complete staged object to `to` and makes the move survive a crash of the machine
    /// ([`Backend::persist`]), in one trip to the blocking pool on the local disk (the
    /// directories made private, the rename, the directories synced). Whether anything was
    /// synced, and which file the object now is (local only: what [`Backend::read`] will find).
    pub async fn place(
        &self,
        from: &str,
        to: &str,
    ) -> Result<(bool, Option<FileIdentity>), StorageError> {
        let Backend::Local {
            store,
            root,
            durable,
            ..
        } = self
        else {
            self.rename(from, to).await?;
            return Ok((self.persist(to).await?, None));
        };
        let durable = durable.clone();
        let from_path = store
            .path_to_filesystem(&path_of(from))
            .map_err(unavailable)?;
        let to_path = store
            .path_to_filesystem(&path_of(to))
            .map_err(unavailable)?;
        let root = root.clone();
        let identity = tokio::task::spawn_blocking(move || -> std::io::Result<FileIdentity> {
            if !to_path.starts_with(&root) || !from_path.starts_with(&root) {
                return Err(std::io::Error::other("outside the storage root"));
            }
            if let Some(dir) = to_path.parent() {
                durable.create(dir)?;
            }
            match std::fs::rename(&from_path, &to_path) {
                // An empty directory where the file goes, left by a move into it that failed
                // after making it: no object is in it, and the reservation found no row under
                // the name, so it goes (a directory with anything in it stays, and refuses).
                Err(e)
                    if e.kind() == std::io::ErrorKind::IsADirectory
                        && std::fs::remove_dir(&to_path).is_ok() =>
                {
                    std::fs::rename(&from_path, &to_path)?
                }
                moved => moved?,
            }
            durable.sync(&to_path, &root)?;
            Ok(FileIdentity::of(&std::fs::metadata(&to_path)?))
        })
        .await
        .map_err(StorageError::from)?
        .map_err(|e| placing_error(to, e))?;
        Ok((true, Some(identity)))
    }

    /// Makes a stored object survive a crash of the machine before its metadata says it is
    /// stored. On the local disk its bytes were synced before the move into place (by the
    /// writer's `finish`); this syncs its directory (the rename that put it there), then each
    /// directory's entry up to the storage root that this process has not synced since it
    /// made it ([`DurableDirs`]: any directory made for it). Without it a power failure could keep the committed row and lose
    /// the bytes, which otherwise reach the disk only at the kernel's next writeback. S3 made the
    /// object durable when the upload completed: nothing to do. Whether anything was synced.
    pub async fn persist(&self, key: &str) -> Result<bool, StorageError> {
        let Backend::Local {
            store,
            root,
            durable,
            ..
        } = self
        else {
            return Ok(false);
        };
        let (root, durable) = (root.clone(), durable.clone());
        // The store's own mapping: it percent-encodes characters such as `%` or `{` on disk.
        let path = store
            .path_to_filesystem(&path_of(key))
            .map_err(unavailable)?;
        tokio::task::spawn_blocking(move || -> std::io::Result<()> {
            if !path.starts_with(&root) {
                return Err(std::io::Error::other("outside the storage root"));
            }
            durable.sync(&path, &root)
        })
        .await
        .map_err(StorageError::from)?
        .map_err(|e| StorageError::Unavailable(format!("making {key} durable: {e}")))?;
        Ok(true)
    }

    /// Deletes `key`; an object that is already gone is not an error.
    pub async fn delete(&self, key: &str) -> Result<(), StorageError> {
        match self.store().delete(&path_of(key)).await {
            Ok(()) | Err(object_store::Error::NotFound { .. }) => Ok(()),
            Err(e) => Err(unavailable(e)),
        }
    }

    /// Deletes every object under `prefix/`.
    pub async fn delete_prefix(&self, prefix: &str) -> Result<usize, StorageError> {
        let store = self.store();
        let prefix = Path::from(prefix);
        let locations = store
            .list(Some(&prefix))
            .map(|m| m.map(|m| m.location))
            .boxed();
        let mut deleted = 0;
        let mut results = store.delete_stream(locations);
        while let Some(r) = results.next().await {
            match r {
                Ok(_) => deleted += 1,
                Err(object_store::Error::NotFound { .. }) => {}
                Err(e) => return Err(unavailable(e)),
            }
        }
        drop(results);
        if let Backend::Local { root, .. } = self {
            // The local store lists an old encoded file name decoded, and so cannot delete it
            // by what it lists: the directory goes as a whole.
            let dir = root.join(prefix.as_ref());
            if dir.starts_with(root) && dir != *root {
                let removed = tokio::task::spawn_blocking(move || std::fs::remove_dir_all(dir))
                    .await
                    .map_err(StorageError::from)?;
                match removed {
                    Ok(()) => {}
                    Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
                    Err(e) => return Err(StorageError::Unavailable(e.to_string())),
                }
            }
        }
        Ok(deleted)
    }

    /// Objects under `prefix/` last modified before `before` (for sweeping abandoned uploads).
    pub async fn list_older_than(
        &self,
        prefix: &str,
        before: chrono::DateTime<chrono::Utc>,
    ) -> Result<Vec<String>, StorageError> {
        let mut out = Vec::new();
        let mut list = self.store().list(Some(&Path::from(prefix)));
        while let Some(meta) = list.next().await {
            let meta = meta.map_err(unavailable)?;
            if meta.last_modified < before {
                out.push(meta.location.to_string());
            }
        }
        Ok(out)
    }

    /// The object: its size, its bytes (a local file of at most [`WHOLE_READ`] bytes read
    /// whole, a larger one streamed in large reads) and, for a local file, which file it is. A
    /// local file is opened and read (its first chunk, or all of a small one) in one trip to
    /// the blocking pool, so that the response's headers and first bytes can leave together.
    /// Without `body` (a `HEAD`) a local file is only opened: its body is empty. `conditions`:
    /// the request's range and preconditions, judged against the object's validators before
    /// anything is read; only the bytes the outcome needs are read.
    /// `client`: the address the download goes to (its shares of the read budget are capped,
    /// [`super::buffers`]).
    pub async fn read(
        &self,
        key: &str,
        body: bool,
        conditions: &Conditions,
        client: Option<std::net::IpAddr>,
    ) -> Result<Object, StorageError> {
        if let Backend::Local { store, buffers, .. } = self {
            let path = store
                .path_to_filesystem(&path_of(key))
                .map_err(unavailable)?;
            let buffers = buffers.clone();
            let conditions = conditions.clone();
            let opened = tokio::task::spawn_blocking(move || {
                open_local(&path, body, &conditions, buffers, client)
            })
            .await
            .map_err(StorageError::from)?
            .map_err(|e| StorageError::Unavailable(format!("reading {key}: {e}")))?;
            let Some(Opened {
                file,
                size,
                total,
                outcome,
                first,
                identity,
                rest,
            }) = opened
            else {
                return Err(StorageError::NotServed);
            };
            let validators = identity.validators();
            let body = match rest {
                None => ObjectBody::Whole(first),
                Some(rest) => {
                    let rest = read_file(file, size - first.len() as u64, rest);
                    ObjectBody::Stream(
                        futures_util::stream::once(async move { Ok(first) })
                            .chain(rest)
                            .boxed(),
                    )
                }
            };
            return Ok(Object {
                size,
                total,
                outcome,
                validators,
                body,
                identity: Some(identity),
            });
        }
        let store = self.store();
        let path = path_of(key);
        let missing = |e: object_store::Error| match e {
            object_store::Error::NotFound { .. } => StorageError::NotServed,
            e => unavailable(e),
        };
        // With a range or a precondition, or for a `HEAD`, the object's metadata decides first
        // (one more round trip for a `GET`); the read that follows is of that very object
        // (`If-Match` its ETag, when S3 gives one), else the judgement is made again, once.
        let mut options = object_store::GetOptions::default();
        let mut judged = None;
        for attempt in 0..2 {
            if !conditions.is_empty() || !body {
                let meta = store.head(&path).await.map_err(missing)?;
                let validators = s3_validators(&meta);
                let outcome = conditions.judge(&validators, meta.size);
                let range = match outcome {
                    Outcome::Whole if !body => {
                        return Ok(Object {
                            size: meta.size,
                            total: meta.size,
                            outcome,
                            validators,
                            body: ObjectBody::Whole(Bytes::new()),
                            identity: None,
                        })
                    }
                    Outcome::Whole => None,
                    Outcome::Part { start, len } => {
                        Some(object_store::GetRange::Bounded(start..start + len))
                    }
                    Outcome::NotModified | Outcome::Unsatisfiable | Outcome::PreconditionFailed => {
                        return Ok(Object {
                            size: 0,
                            total: meta.size,
                            outcome,
                            validators,
                            body: ObjectBody::Whole(Bytes::new()),
                            identity: None,
                        })
                    }
                };
                options = object_store::GetOptions {
                    if_match: meta.e_tag.clone(),
                    range,
                    ..Default::default()
                };
                judged = Some((outcome, validators));
            }
            let got = match store.get_opts(&path, options.clone()).await {
                Ok(g) => g,
                Err(object_store::Error::Precondition { .. }) if attempt == 0 => continue,
                Err(e) => return Err(missing(e)),
            };
            let total = got.meta.size;
            let size = got.range.end - got.range.start;
            let (outcome, validators) = match judged {
                // What S3 sent (an object without an ETag may have changed since its
                // metadata was read, and a range is then cut to it).
                Some((Outcome::Part { .. }, validators)) => (
                    Outcome::Part {
                        start: got.range.start,
                        len: size,
                    },
                    validators,
                ),
                Some(judged) => judged,
                None => (Outcome::Whole, s3_validators(&got.meta)),
            };
            if matches!(outcome, Outcome::Part { .. }) && size == 0 {
                return Err(StorageError::Unavailable(format!(
                    "reading {key}: the object shrank while it was being read"
                )));
            }
            let stream = match got.payload {
                GetResultPayload::File(file, _) => read_file(file, size, Reads::plain(BIG_CHUNK)),
                GetResultPayload::Stream(s) => s.map(|r| r.map_err(std::io::Error::other)).boxed(),
            };
            return Ok(Object {
                size,
                total,
                outcome,
                validators,
                body: ObjectBody::Stream(stream),
                identity: None,
            });
        }
        Err(StorageError::Unavailable(format!(
            "reading {key}: the object changed twice while it was being read"
        )))
    }

    /// A real SigV4 pre-signed GET URL (S3 only; the local backend signs its own URLs).
    pub async fn presign_get(
        &self,
        key: &str,
        expires_in: Duration,
    ) -> Option<Result<url::Url, StorageError>> {
        match self {
            Backend::S3 { store, .. } => {
                let path = path_of(key);
                Some(
                    store
                        .signed_url(hyper::Method::GET, &path, expires_in)
                        .await
                        .map_err(unavailable),
                )
            }
            Backend::Local { .. } => None,
        }
    }
}

/// The directories under the local root whose own entry (in their parent) this process has
/// synced since it last made them: a file moved into one of them needs only its directory
/// synced, not every directory up to the root. A directory is forgotten before it is made
/// again (the store removes a directory once its last file is deleted), so a directory made
/// anew is synced into its parent by the first upload that lands in it, and by every upload
/// that lands in it until one of them has done so (each checks after its own move, so after
/// the directory exists). Empty at start-up: the first upload into each directory syncs it.
#[derive(Default)]
pub struct DurableDirs(std::sync::Mutex<std::collections::HashSet<PathBuf>>);

impl DurableDirs {
    /// Makes `dir` and its missing parents (mode 0700), forgetting each missing one first.
    fn create(&self, dir: &std::path::Path) -> std::io::Result<()> {
        let mut missing = Vec::new();
        let mut d = Some(dir);
        while let Some(p) = d.filter(|p| !p.exists()) {
            missing.push(p.to_path_buf());
            d = p.parent();
        }
        if !missing.is_empty() {
            let mut known = self.0.lock().expect("poisoned");
            for m in &missing {
                known.remove(m);
            }
        }
        private_dirs(dir)
    }

    /// Syncs `path`'s directory (the entry a rename put there), then each directory's entry in
    /// its parent up to `root`, stopping at one already synced.
    fn sync(&self, path: &std::path::Path, root: &std::path::Path) -> std::io::Result<()> {
        let Some(dir) = path.parent() else {
            return Ok(());
        };
        std::fs::File::open(dir)?.sync_all()?;
        let mut d = dir;
        while d != root && d.starts_with(root) {
            if self.0.lock().expect("poisoned").contains(d) {
                break;
            }
            let Some(parent) = d.parent() else {
                break;
            };
            std::fs::File::open(parent)?.sync_all()?;
            self.0.lock().expect("poisoned").insert(d.to_path_buf());
            d = parent;
        }
        Ok(())
    }
}

/// An opened local object: see [`open_local`].
struct Opened {
    file: std::fs::File,
    /// The bytes to send.
    size: u64,
    /// The file's.
    total: u64,
    outcome: Outcome,
    /// All of the file (read whole, or a `HEAD`'s empty body), else its first chunk.
    first: Bytes,
    identity: FileIdentity,
    /// How the rest streams, if anything is left.
    rest: Option<Reads>,
}

/// How a local file's chunks are read: their size, the buffers they come from and the share
/// of the read budget they hold (none: small chunks of plain memory).
#[derive(Clone)]
struct Reads {
    chunk: usize,
    buffers: Option<Arc<Buffers>>,
    share: Option<Arc<Share>>,
}

impl Reads {
    fn plain(chunk: usize) -> Reads {
        Reads {
            chunk,
            buffers: None,
            share: None,
        }
    }

    /// The next `want` bytes of `file`: into a lent buffer of exactly the chunk's size (what
    /// the share paid for) with a share, else a plain one. `buf`: a buffer taken already.
    fn read(
        &self,
        file: &mut std::fs::File,
        want: u64,
        buf: Option<Vec<u8>>,
    ) -> std::io::Result<Bytes> {
        use std::io::Read;
        let mut buf = match (buf, &self.buffers) {
            (Some(buf), _) => buf,
            (None, Some(b)) if self.share.is_some() => b.get(self.chunk, self.chunk),
            _ => Vec::with_capacity(want as usize),
        };
        // Not zeroed first: `read_to_end` reads into the spare capacity.
        file.take(want).read_to_end(&mut buf)?;
        if (buf.len() as u64) < want {
            return Err(std::io::Error::new(
                std::io::ErrorKind::UnexpectedEof,
                "the file is shorter than its size",
            ));
        }
        Ok(match (&self.buffers, &self.share) {
            (Some(b), Some(share)) => b.bytes(buf, Some(share.clone())),
            _ => Bytes::from(buf),
        })
    }
}

/// A local object's file, the bytes to send (`size`: all of it, the range asked for, or none),
/// its first bytes and which file it is; `None` if there is no such file (a directory is none
/// either). `conditions` are judged against the file's validators first ([`Outcome`]); nothing
/// is read without `body`, for a `304` or for a `416`. A body of at most [`WHOLE_READ`] bytes is
/// read whole if the read budget has room for it; a larger one streams in [`BIG_CHUNK`]s if the
/// budget has room for [`STREAM_HOLD`]; otherwise it streams in [`SMALL_CHUNK`]s
/// ([`super::buffers`]). The first chunk is read here, so that the response's headers and
/// first bytes can leave together.
fn open_local(
    path: &std::path::Path,
    body: bool,
    conditions: &Conditions,
    buffers: Arc<Buffers>,
    client: Option<std::net::IpAddr>,
) -> std::io::Result<Option<Opened>> {
    use std::io::{Seek, SeekFrom};
    let mut file = match std::fs::File::open(path) {
        Ok(f) => f,
        // No such file, as far as a download may tell: also a path through a file
        // (`a.txt/x`: ENOTDIR), one too long for the disk (ENAMETOOLONG) or through a loop
        // (ELOOP). Anything else is the disk's failure. A private file is never told apart
        // from a missing one by the answer (red team rt17).
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
        Err(e)
            if matches!(
                e.raw_os_error(),
                Some(libc::ENOTDIR | libc::ENAMETOOLONG | libc::ELOOP)
            ) =>
        {
            return Ok(None)
        }
        Err(e) => return Err(e),
    };
    let meta = file.metadata()?;
    if !meta.is_file() {
        return Ok(None);
    }
    let total = meta.len();
    let identity = FileIdentity::of(&meta);
    let outcome = if conditions.is_empty() {
        Outcome::Whole
    } else {
        conditions.judge(&identity.validators(), total)
    };
    let (start, size) = match outcome {
        Outcome::Whole => (0, total),
        Outcome::Part { start, len } => (start, len),
        Outcome::NotModified | Outcome::Unsatisfiable | Outcome::PreconditionFailed => (0, 0),
    };
    if !body || size == 0 {
        return Ok(Some(Opened {
            file,
            size,
            total,
            outcome,
            first: Bytes::new(),
            identity,
            rest: None,
        }));
    }
    if start > 0 {
        file.seek(SeekFrom::Start(start))?;
    }
    // A whole read's share pays for its buffer's capacity (an idle one may be up to half as
    // big again as the body); a stream's for six chunks of exactly `BIG_CHUNK`.
    let whole = size <= WHOLE_READ;
    let (share, buf) = if whole {
        let buf = buffers.get(size as usize, size as usize + size as usize / 2);
        match buffers.take(client, buf.capacity() as u64) {
            Some(share) => (Some(share), Some(buf)),
            None => {
                buffers.give_back(buf);
                (None, None)
            }
        }
    } else {
        (buffers.take(client, STREAM_HOLD), None)
    };
    let reads = Reads {
        chunk: match (&share, whole) {
            (None, _) => SMALL_CHUNK,
            (Some(_), true) => size as usize,
            (Some(_), false) => BIG_CHUNK,
        },
        buffers: Some(buffers),
        share: share.map(Arc::new),
    };
    let first = reads.read(&mut file, size.min(reads.chunk as u64), buf)?;
    let rest = (first.len() as u64) < size;
    Ok(Some(Opened {
        file,
        size,
        total,
        outcome,
        first,
        identity,
        rest: rest.then_some(reads),
    }))
}

/// An S3 object's validators: from its own ETag, size and time (the same on every node).
fn s3_validators(meta: &object_store::ObjectMeta) -> Validators {
    let modified: std::time::SystemTime = meta.last_modified.into();
    let nanos = meta
        .last_modified
        .timestamp_nanos_opt()
        .unwrap_or_default()
        .to_le_bytes();
    Validators::new(
        &[
            b"s3",
            meta.e_tag.as_deref().unwrap_or_default().as_bytes(),
            &meta.size.to_le_bytes(),
            &nanos,
        ],
        Some(modified),
    )
}

/// Reads the `size` bytes of a file in chunks (`reads`) on the blocking pool. The chunks are
/// not zeroed before the read, and the stream ends after `size` bytes without asking the pool
/// for the end-of-file read (a file that turns out shorter is an error, so the response is cut
/// off rather than short).
fn read_file(
    file: std::fs::File,
    size: u64,
    reads: Reads,
) -> BoxStream<'static, std::io::Result<Bytes>> {
    futures_util::stream::try_unfold((file, size, reads), |(file, left, reads)| async move {
        if left == 0 {
            return Ok(None);
        }
        let (file, chunk, reads) = tokio::task::spawn_blocking(move || {
            let mut file = file;
            let chunk = reads.read(&mut file, left.min(reads.chunk as u64), None)?;
            Ok::<_, std::io::Error>((file, chunk, reads))
        })
        .await
        .map_err(std::io::Error::other)??;
        let left = left - chunk.len() as u64;
        Ok(Some((chunk, (file, left, reads))))
    })
    .boxed()
}

/// Creates `dir` and its missing parents with mode 0700.
fn private_dirs(dir: &std::path::Path) -> std::io::Result<()> {
    use std::os::unix::fs::DirBuilderExt;
    std::fs::DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(dir)
}

/// Creates (or truncates) a file only the server's user can read: mode 0600.
fn private_file(path: &std::path::Path) -> std::io::Result<std::fs::File> {
    use std::os::unix::fs::OpenOptionsExt;
    std::fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(0o600)
        .open(path)
}

pub fn unavailable(e: object_store::Error) -> StorageError {
    StorageError::Unavailable(e.to_string())
}

/// A streamed object write in progress: [`ObjectWriter::finish`] makes it complete,
/// [`ObjectWriter::abort`] (or an error) leaves nothing behind.
pub struct ObjectWriter {
    inner: Inner,
    written: u64,
}

enum Inner {
    /// S3: a multipart upload, visible once complete.
    Remote(WriteMultipart),
    /// The local disk: the file at the (staging) key itself.
    Local(LocalWriter),
}

/// Bytes per write of a local object.
const LOCAL_PART: usize = 1024 * 1024;

/// Writes a local object straight into its file: parts of [`LOCAL_PART`] bytes on the blocking
/// pool, one in flight while the next one fills, each handed to the kernel's writeback at once
/// ([`start_writeback`]), so that the fsync at the end finds little left to write. A part is the
/// received chunks themselves, not a copy: copying them into a reused buffer (so that the
/// multipart parser's buffer could be reused in place) cost more than the fresh pages it saved
/// (100 MiB uploads: 87 → 141 ms of server CPU per file; docs/benchmarks.md, session 23). The key is a
/// staging key that nothing lists until the upload moves it into place, so a partial file is
/// never seen as an object.
///
/// Trips to the blocking pool: the file is made by the first part's write, a full part leaves
/// only once the next chunk arrives (the last part is written by [`LocalWriter::finish`]), and
/// `finish` writes the last part and syncs in one trip: a file of up to one part (1 MiB) is
/// made, written and synced in a single trip.
struct LocalWriter {
    path: PathBuf,
    /// `None` before the first write (which makes the file) and while a part is being written
    /// (the task has it).
    file: Option<std::fs::File>,
    in_flight: Option<tokio::task::JoinHandle<std::io::Result<std::fs::File>>>,
    part: Vec<Bytes>,
    part_len: usize,
    /// Bytes handed to writes so far.
    offset: u64,
    /// Finished or aborted: dropping it then leaves the file alone.
    done: bool,
}

/// Makes the staged file (mode 0600) and its directories. The store removes a directory once
/// its last file is deleted (automatic cleanup), so another upload's clean-up may remove the
/// staging directory between the two calls: make it again and retry.
fn create_staged(path: &std::path::Path) -> std::io::Result<std::fs::File> {
    let mut attempts = 0;
    loop {
        if let Some(dir) = path.parent() {
            private_dirs(dir)?;
        }
        match private_file(path) {
            Ok(f) => return Ok(f),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound && attempts < 5 => {
                attempts += 1;
            }
            Err(e) => return Err(e),
        }
    }
}

/// Writes `part` at the end of `file` (made first if `None`); on the blocking pool.
fn write_part(
    file: Option<std::fs::File>,
    path: &std::path::Path,
    part: &[Bytes],
) -> std::io::Result<std::fs::File> {
    let mut file = match file {
        Some(f) => f,
        None => create_staged(path)?,
    };
    for chunk in part {
        std::io::Write::write_all(&mut file, chunk)?;
    }
    Ok(file)
}

impl LocalWriter {
    fn failed(&self, e: impl std::fmt::Display) -> StorageError {
        StorageError::Unavailable(format!("writing {}: {e}", self.path.display()))
    }

    /// The file once the part in flight (if any) is written; `None` if nothing made it yet.
    async fn file(&mut self) -> Result<Option<std::fs::File>, StorageError> {
        if let Some(task) = self.in_flight.as_mut() {
            // Awaited in place: a request cancelled meanwhile drops the writer with the task
            // still in `in_flight`, and the drop waits for it (it may be making the file)
            // before removing the file.
            let outcome = task.await;
            self.in_flight = None;
            return match outcome {
                Ok(Ok(file)) => Ok(Some(file)),
                Ok(Err(e)) => Err(self.failed(e)),
                Err(e) => Err(self.failed(e)),
            };
        }
        Ok(self.file.take())
    }

    /// Starts writing the collected part; waits for the previous one first.
    async fn send_part(&mut self) -> Result<(), StorageError> {
        let file = self.file().await?;
        let part = std::mem::take(&mut self.part);
        let (start, len) = (self.offset, self.part_len);
        self.offset += len as u64;
        self.part_len = 0;
        let path = self.path.clone();
        self.in_flight = Some(tokio::task::spawn_blocking(move || {
            let file = write_part(file, &path, &part)?;
            start_writeback(&file, start, len);
            Ok(file)
        }));
        Ok(())
    }

    async fn write(&mut self, chunk: Bytes) -> Result<(), StorageError> {
        // A full part leaves once more is coming: the last one goes with the sync.
        if self.part_len >= LOCAL_PART {
            self.send_part().await?;
        }
        self.part_len += chunk.len();
        self.part.push(chunk);
        Ok(())
    }

    /// Writes what is left and waits until the bytes are on the disk (one trip: the last
    /// part's write, the file made if no part made it, `fdatasync`): the object may then be
    /// renamed over an older one without a crash ever leaving a half-written file in its place.
    async fn finish(mut self) -> Result<(), StorageError> {
        let file = self.file().await?;
        let part = std::mem::take(&mut self.part);
        self.offset += self.part_len as u64;
        self.part_len = 0;
        let path = self.path.clone();
        // In `in_flight` while it runs: a drop meanwhile (the request cancelled) waits for it
        // before removing the file it makes.
        self.in_flight = Some(tokio::task::spawn_blocking(move || {
            let file = write_part(file, &path, &part)?;
            file.sync_data()?;
            Ok(file)
        }));
        // An error drops the writer, which removes the file; success keeps it.
        self.file().await?;
        self.done = true;
        Ok(())
    }

    async fn abort(mut self) {
        self.done = true;
        let _ = self.file().await;
        let path = self.path.clone();
        let _ = tokio::task::spawn_blocking(move || std::fs::remove_file(path)).await;
    }
}

/// A write dropped half-way (the client went away and the request with it): the partial file
/// is removed once the part in flight is written.
impl Drop for LocalWriter {
    fn drop(&mut self) {
        if self.done {
            return;
        }
        let (path, in_flight) = (self.path.clone(), self.in_flight.take());
        let remove = async move {
            if let Some(task) = in_flight {
                let _ = task.await;
            }
            let _ = tokio::task::spawn_blocking(move || std::fs::remove_file(path)).await;
        };
        match tokio::runtime::Handle::try_current() {
            Ok(runtime) => drop(runtime.spawn(remove)),
            Err(_) => {
                let _ = std::fs::remove_file(&self.path);
            }
        }
    }
}

/// Asks the kernel to start writing `len` bytes at `start` back to the disk, without waiting:
/// on Linux, `POSIX_FADV_DONTNEED` starts asynchronous writeback of the range's dirty pages
/// (and lets go of those already clean). Advice only: an error changes nothing.
/// (`sync_file_range` would say it more directly, but no safe binding offers it.)
#[cfg(target_os = "linux")]
fn start_writeback(file: &std::fs::File, start: u64, len: usize) {
    let len = std::num::NonZeroU64::new(len as u64);
    let _ = rustix::fs::fadvise(file, start, len, rustix::fs::Advice::DontNeed);
}

#[cfg(not(target_os = "linux"))]
fn start_writeback(_file: &std::fs::File, _start: u64, _len: usize) {}

impl ObjectWriter {
    /// Queues `chunk` for the backend without copying it (the parts are made of the
    /// received buffers themselves).
    pub async fn write(&mut self, chunk: Bytes) -> Result<(), StorageError> {
        self.written += chunk.len() as u64;
        match &mut self.inner {
            Inner::Remote(w) => {
                w.wait_for_capacity(UPLOAD_CONCURRENCY)
                    .await
                    .map_err(unavailable)?;
                w.put(chunk);
                Ok(())
            }
            Inner::Local(w) => w.write(chunk).await,
        }
    }

    pub fn written(&self) -> u64 {
        self.written
    }

    pub async fn finish(self) -> Result<u64, StorageError> {
        match self.inner {
            Inner::Remote(w) => {
                w.finish().await.map_err(unavailable)?;
            }
            Inner::Local(w) => w.finish().await?,
        }
        Ok(self.written)
    }

    pub async fn abort(self) {
        match self.inner {
            Inner::Remote(w) => {
                if let Err(e) = w.abort().await {
                    tracing::warn!(error = %e, "aborting an upload");
                }
            }
            Inner::Local(w) => w.abort().await,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::DurableDirs;

    #[test]
    fn a_directory_is_synced_into_its_parent_until_it_is_made_again() {
        let root = std::env::temp_dir().join(format!(
            "fluxbase-durable-dirs-{}",
            crate::secrets::random_hex::<8>()
        ));
        std::fs::create_dir_all(&root).unwrap();
        let bucket = root.join("p/b");
        let durable = DurableDirs::default();
        let known = |d: &std::path::Path| durable.0.lock().unwrap().contains(d);
        durable.create(&bucket).unwrap();
        std::fs::write(bucket.join("f"), b"x").unwrap();
        assert!(!known(&bucket) && !known(&root.join("p")));
        durable.sync(&bucket.join("f"), &root).unwrap();
        assert!(known(&bucket) && known(&root.join("p")));
        assert!(
            !known(&root),
            "the root's own entry is not this process's to sync"
        );
        // Emptied and removed (the store cleans up), then made again: forgotten until synced.
        std::fs::remove_dir_all(root.join("p")).unwrap();
        durable.create(&bucket).unwrap();
        assert!(!known(&bucket) && !known(&root.join("p")));
        std::fs::write(bucket.join("g"), b"y").unwrap();
        durable.sync(&bucket.join("g"), &root).unwrap();
        assert!(known(&bucket) && known(&root.join("p")));
        std::fs::remove_dir_all(&root).unwrap();
    }
}
