//! Storage v2: buckets, files and pre-signed URLs (the guide's "Storage v2" section).
//!
//! ```text
//!  POST /api/storage/upload ──multipart stream──► backend  .uploads/<uuid>   (staging)
//!        │ fields known, access checked                │
//!        ▼                                             ▼ rename (atomic on disk; copy on S3)
//!  control db: storage_files row reserved ──────► <projectId>/<bucketUuid>/<name>
//!        │ size written once the object is in place
//!        ▼
//!  GET /api/storage/url ─► S3: SigV4 pre-signed URL  │  local: /api/storage/object?key&expires&signature
//! ```
//!
//! Bucket and file metadata live in the control database (`fluxbase.storage_buckets`,
//! `fluxbase.storage_files`); objects in the backend (see [`backend`]). The two never disagree
//! in a way a caller can see:
//! * **upload**: the file streams to a staging key first (the guide's curl sends `file` before
//!   `bucketId` and `projectId`, so where it goes is not known yet). Then, at the same time,
//!   the staged bytes are synced and the row is reserved durably (`size IS NULL`,
//!   `upload_token`, and what the file will be: `upload_size`, `upload_content_type`,
//!   `upload_staged`); the staged object is renamed into place and the directories synced
//!   while the row's listing (`size` set) is written in a transaction left open; that
//!   transaction commits once the move is durable. Only rows with a size are listed or signed.
//!   That commit does not wait for its WAL flush: a crash that loses it leaves a durable
//!   reservation whose staged object is gone and whose object is at its key with the reserved
//!   size, which the start-up sweep lists ([`sweep`]). Any failure removes the staged object
//!   and the reservation (or, for an `upsert` of an existing file, restores the old row: the
//!   old object is replaced atomically or not at all). Success is answered only after the
//!   bytes, the move and the reservation are on the disk.
//! * **delete**: the row is marked (`deleting_at`, hidden from then on), the object deleted,
//!   then the row. If the object cannot be deleted the mark is lifted (both stay); if the row
//!   cannot be removed afterwards it stays hidden and the start-up sweep finishes it.
//! * the sweep at start-up also lists uploads whose listing a crash lost (above), and drops
//!   reservations and staged objects older than an hour (uploads cut off by a crash).

//!
//! One job per file: [`buckets`] (create, change, list, delete), [`files`] (list, sign, delete),
//! [`download`] (what a signed or public URL serves; [`served`] keeps the rows it needs of
//! files just stored or served), [`upload`] (the multipart stream, parsed by [`multipart`]),
//! [`sweep`] (start-up repairs, a deleted project's objects); under them [`backend`] (where
//! objects live), [`names`] (what things may be called), [`signing`] (local URLs), and the
//! rows in `crate::control::{buckets, files}`. Nothing here knows HTTP: the API layer
//! (`src/api/storage.rs`) resolves the caller's access, turns headers into plain values, and
//! builds the responses; failures are [`StorageError`]s.

pub mod backend;
pub mod buckets;
pub mod buffers;
pub mod download;
mod error;
pub mod files;
pub mod multipart;
pub mod names;
pub mod ranges;
pub mod served;
pub mod signing;
pub mod sweep;
pub mod upload;

use std::sync::Arc;
use std::time::Duration;

use crate::config::Config;
use crate::metrics::Metrics;
use crate::secrets::Secrets;

pub use backend::{Backend, StorageKind};
pub use buckets::{Bucket, BucketChange, BucketUsage, NewBucket};
pub use download::Download;
pub use error::StorageError;
pub use files::{is_uuid, public_url, FileRef, SignedUrl, StoredFile};
pub use signing::Clock;
pub use upload::{UploadRequest, Uploaded};

/// How long a download URL is valid: the guide's 15 minutes.
pub const URL_TTL: Duration = Duration::from_secs(15 * 60);
/// How long a storage readiness check is reused.
pub const READY_CHECK_EVERY: Duration = Duration::from_secs(2);

/// The storage service: buckets and files (their rows in the control database), their objects
/// in the backend, and URL signing.
pub struct Storage {
    control: deadpool_postgres::Pool,
    /// Upload counters (bytes, fsyncs) for `/metrics`.
    metrics: Arc<Metrics>,
    pub backend: Backend,
    /// Time as seen by URL signing and expiry (and by login sessions: the app shares this
    /// clock with [`crate::auth::Auth`] and [`crate::accounts::Accounts`]); tests move it
    /// forward.
    pub clock: Arc<Clock>,
    signer: signing::UrlSigner,
    /// What downloads need of the rows of files this server stored or served (local backend,
    /// single server: [`served`]).
    served: served::ServedFiles,
    max_upload_bytes: u64,
    /// The last [`Storage::ready`] check and when it ran (checks are at most every few
    /// seconds, however often `/ready` is asked).
    checked: tokio::sync::Mutex<Option<(std::time::Instant, Result<(), String>)>>,
}

impl Storage {
    pub fn open(
        config: &Config,
        secrets: &Secrets,
        control: deadpool_postgres::Pool,
        metrics: Arc<Metrics>,
    ) -> anyhow::Result<Storage> {
        let backend = Backend::open(config, metrics.clone())?;
        let served = served::ServedFiles::new(backend.is_local() && config.nats_url.is_none());
        Ok(Storage {
            control,
            metrics,
            backend,
            served,
            clock: Arc::new(Clock::default()),
            signer: signing::UrlSigner::new(&secrets.derive("storage-url-signing")),
            max_upload_bytes: config.max_upload_bytes,
            checked: Default::default(),
        })
    }

    /// Bytes of the local backend's read budget not taken now ([`buffers`]); `None` on S3.
    pub fn read_budget_free(&self) -> Option<u64> {
        self.backend.buffers().map(|b| b.budget_free())
    }

    /// Whether the backend is usable (see [`Backend::check`]), with the cause if not; the
    /// answer is reused for [`READY_CHECK_EVERY`].
    pub async fn ready(&self) -> Result<(), String> {
        let mut checked = self.checked.lock().await;
        if let Some((at, result)) = &*checked {
            if at.elapsed() < READY_CHECK_EVERY {
                return result.clone();
            }
        }
        let result = self.backend.check().await;
        *checked = Some((std::time::Instant::now(), result.clone()));
        result
    }
}
