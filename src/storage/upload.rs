//! `POST /api/storage/upload`: a multipart/form-data body streamed to the backend.
//!
//! The body never sits in memory: the multipart parser ([`super::multipart`]) yields the `file`
//! part as slices of the body's own chunks (no copy) and each goes to an
//! [`ObjectWriter`](super::backend::ObjectWriter) at a staging key, counted against the size
//! limit as it arrives. Fields may come in any order (the guide's curl sends `file`
//! first); when `projectId` and `bucketId` come first, access and the bucket are looked up
//! while the file's first bytes arrive, and a refusal (no access, no such bucket, a type the
//! bucket refuses, a size over its limit) ends the upload as soon as the answer is in: a few
//! chunks at most are staged, and removed.
//!
//! The caller's access to the project is resolved by the caller (the API layer knows who is
//! asking) through the `authorize` function it passes: called with the form's `projectId` once
//! it is known, and its error is the upload's error.

use std::future::Future;

use bytes::Bytes;
use futures_util::Stream;

use tokio_postgres::error::SqlState;

use super::multipart::{self, Multipart};
use super::{names, Bucket, Storage, StorageError, StoredFile};
use crate::auth::Access;
use crate::control;

/// Where uploads are staged before their destination is known.
pub(super) const STAGING: &str = ".uploads";
/// Longest accepted text field (`bucketId`, `projectId`, `path`, `upsert`).
const MAX_TEXT_FIELD: usize = 4096;
/// After a refusal mid-stream, read and discard at most this much more of the body so the
/// client sees the answer instead of a reset connection.
const DRAIN_LIMIT: u64 = 16 * 1024 * 1024;
/// With the fields before the file, the caller's access and the bucket are looked up while a
/// body declared larger than this arrives (or one of no declared length), so that a refusal
/// ends it early; a smaller body is read first and the bucket is looked up by the statement
/// that reserves its row (one round trip to the control database fewer; a refused body of at
/// most this much is staged, then removed).
const EARLY_LOOKUP_FROM: u64 = 4 * 1024 * 1024;
/// Multipart framing and the text fields add a little: a body declared beyond the limit plus
/// this is refused unread, and one that sends more is cut off there (413).
const FRAMING_ALLOWANCE: u64 = 64 * 1024;

/// What an upload request says besides its body.
#[derive(Clone, Copy, Debug, Default)]
pub struct UploadRequest<'a> {
    /// The `Content-Type` (`multipart/form-data; boundary=…`), empty if none.
    pub content_type: &'a str,
    /// The declared `Content-Length`, if any.
    pub content_length: Option<u64>,
    /// `upsert` from the query string (a form field of the same name overrides it).
    pub upsert: Option<&'a str>,
}

/// A stored file.
#[derive(Clone, Debug)]
pub struct Uploaded {
    pub file: StoredFile,
    /// A new file (not a replaced one).
    pub created: bool,
}

#[derive(Default)]
struct Form {
    bucket_id: Option<String>,
    project_id: Option<String>,
    path: Option<String>,
    upsert: Option<bool>,
}

/// The file part once it is in the staging area.
struct Staged {
    key: String,
    size: u64,
    filename: Option<String>,
    content_type: String,
}

/// When an upload's last steps ended, from the start of [`Storage::commit_upload`] (logged at
/// debug level with the time the body took to arrive: where an upload's time goes).
#[derive(Default)]
struct Steps {
    /// The staged bytes written and synced.
    synced: std::time::Duration,
    /// The reservation committed.
    reserved: std::time::Duration,
    /// The object moved into place and the move synced.
    placed: std::time::Duration,
    /// The file listed.
    recorded: std::time::Duration,
}

/// The staged file's write: made durable (`finish`) only once the form is read, at the same
/// time as the reservation of its row.
type Unfinished = Option<super::backend::ObjectWriter>;

fn parse_bool(field: &'static str, v: &str) -> Result<bool, StorageError> {
    match v.trim().to_ascii_lowercase().as_str() {
        "true" | "1" => Ok(true),
        "false" | "0" | "" => Ok(false),
        _ => Err(StorageError::NotABoolean(field)),
    }
}

/// The body stream's stall, wherever it is in the error's chain.
fn stalled(e: &(dyn std::error::Error + 'static)) -> Option<crate::error::BodyStalled> {
    std::iter::successors(Some(e), |e| e.source())
        .find_map(|e| e.downcast_ref::<crate::error::BodyStalled>().copied())
}

fn multipart_error(e: multipart::Error, limit: u64) -> StorageError {
    match e {
        multipart::Error::TooLarge(_) => StorageError::TooLarge(limit),
        multipart::Error::Body(e) => match stalled(&*e) {
            Some(s) => StorageError::BodyStalled(s),
            None => StorageError::InvalidMultipart(multipart::Error::Body(e)),
        },
        other => StorageError::InvalidMultipart(other),
    }
}

impl Storage {
    /// Stores the file of a multipart/form-data `body` (see the module docs). `authorize`
    /// resolves the caller's access to the form's project, refusing callers who may not
    /// upload there.
    pub async fn upload<S, E, A, F, Err>(
        &self,
        request: UploadRequest<'_>,
        body: S,
        authorize: A,
    ) -> Result<Uploaded, Err>
    where
        S: Stream<Item = Result<Bytes, E>> + Send + 'static,
        E: Into<Box<dyn std::error::Error + Send + Sync>> + 'static,
        A: Fn(String) -> F,
        F: Future<Output = Result<Access, Err>>,
        Err: From<StorageError>,
    {
        let max = self.max_upload_bytes;
        if request
            .content_length
            .is_some_and(|n| n > max + FRAMING_ALLOWANCE)
        {
            return Err(StorageError::TooLarge(max).into());
        }
        let boundary =
            multipart::boundary(request.content_type).ok_or(StorageError::NotMultipart)?;
        let started = std::time::Instant::now();
        let mut multipart = Multipart::new(body, &boundary, max + FRAMING_ALLOWANCE);
        let mut form = Form::default();
        if let Some(v) = request.upsert {
            form.upsert = Some(parse_bool("upsert", v)?);
        }
        let mut staged: Option<Staged> = None;
        let mut unfinished: Unfinished = None;
        let mut early: Option<(Access, Bucket)> = None;
        let result: Result<Uploaded, Err> = async {
            while let Some(part) = multipart
                .next_part()
                .await
                .map_err(|e| multipart_error(e, max))?
            {
                let name = part.name.unwrap_or_default();
                if name == "file" {
                    if staged.is_some() {
                        return Err(StorageError::SeveralFiles.into());
                    }
                    // Fields before the file: the caller's access and the bucket are looked up
                    // while the first bytes arrive (not before: that would be a round trip to
                    // the control database on every upload's path), and the bucket's limits
                    // apply from the moment they are known.
                    let small = request
                        .content_length
                        .is_some_and(|n| n <= EARLY_LOOKUP_FROM);
                    // The name, when the fields say it: a name already taken as a folder (or
                    // under a file) is refused then too.
                    let early_name =
                        names::object_name(form.path.as_deref(), part.filename.as_deref()).ok();
                    let lookup = match (&form.project_id, &form.bucket_id) {
                        (Some(p), Some(b)) if !small => {
                            let (p, b) = (p.clone(), b.clone());
                            let authorize = &authorize;
                            Some(async move {
                                let access = authorize(p).await?;
                                let bucket = self.find_bucket(&access.project.id, &b).await?;
                                if let Some(name) = early_name {
                                    self.check_name(&bucket, name).await?;
                                }
                                Ok::<_, Err>((access, bucket))
                            })
                        }
                        _ => None,
                    };
                    let mut looking = lookup.is_some();
                    let mut lookup =
                        std::pin::pin!(futures_util::future::OptionFuture::from(lookup));
                    let filename = part.filename;
                    // A type that is not a MIME type is as good as none (the file name's then).
                    let given = part
                        .content_type
                        .filter(|c| c.parse::<mime_guess::mime::Mime>().is_ok());
                    let content_type = names::normalize_content_type(
                        given.as_deref(),
                        filename.as_deref().unwrap_or_default(),
                    )?;
                    let mut limit = max;
                    let key = format!("{STAGING}/{}", crate::secrets::random_hex::<16>());
                    // Set before the first write, so an error on the way removes it.
                    staged = Some(Staged {
                        key: key.clone(),
                        size: 0,
                        filename,
                        content_type: content_type.clone(),
                    });
                    let shown_name = form
                        .path
                        .as_deref()
                        .filter(|p| !p.is_empty() && !p.ends_with('/'))
                        .or(staged.as_ref().and_then(|s| s.filename.as_deref()))
                        .unwrap_or("file");
                    let disposition = names::content_disposition(shown_name, &content_type);
                    let mut writer = self
                        .backend
                        .writer(&key, &content_type, &disposition)
                        .await?;
                    // The bucket's limits, once the lookup answered.
                    let found = |found: Option<Result<(Access, Bucket), Err>>,
                                 limit: &mut u64|
                     -> Result<Option<(Access, Bucket)>, Err> {
                        let Some(found) = found else {
                            return Ok(None);
                        };
                        let (access, bucket) = found?;
                        check_mime(&bucket, &content_type)?;
                        if let Some(m) = bucket.max_file_size {
                            *limit = (*limit).min(m as u64);
                        }
                        Ok(Some((access, bucket)))
                    };
                    loop {
                        let next = tokio::select! {
                            biased;
                            answer = &mut lookup, if looking => {
                                looking = false;
                                match found(answer, &mut limit) {
                                    Ok(f) => early = f,
                                    Err(e) => {
                                        writer.abort().await;
                                        return Err(e);
                                    }
                                }
                                None
                            }
                            chunk = multipart.chunk() => Some(chunk),
                        };
                        let chunk = match next {
                            None => Bytes::new(),
                            Some(Ok(Some(c))) => c,
                            Some(Ok(None)) => break,
                            Some(Err(e)) => {
                                writer.abort().await;
                                return Err(multipart_error(e, max).into());
                            }
                        };
                        if writer.written() + chunk.len() as u64 > limit {
                            writer.abort().await;
                            multipart.drain(DRAIN_LIMIT).await;
                            return Err(StorageError::TooLarge(limit).into());
                        }
                        if chunk.is_empty() {
                            continue;
                        }
                        if let Err(e) = writer.write(chunk).await {
                            writer.abort().await;
                            return Err(e.into());
                        }
                    }
                    if looking {
                        match found(lookup.await, &mut limit) {
                            Ok(f) => early = f,
                            Err(e) => {
                                writer.abort().await;
                                return Err(e);
                            }
                        }
                        if writer.written() > limit {
                            writer.abort().await;
                            return Err(StorageError::TooLarge(limit).into());
                        }
                    }
                    if let Some(s) = staged.as_mut() {
                        s.size = writer.written();
                    }
                    unfinished = Some(writer);
                    continue;
                }
                let slot = match name.as_str() {
                    "bucketId" => &mut form.bucket_id,
                    "projectId" => &mut form.project_id,
                    "path" => &mut form.path,
                    "upsert" => {
                        let v = read_text(&mut multipart, &name, max).await?;
                        form.upsert = Some(parse_bool("upsert", &v)?);
                        continue;
                    }
                    other => return Err(StorageError::UnknownField(other.to_string()).into()),
                };
                *slot = Some(read_text(&mut multipart, &name, max).await?);
            }
            let staged_file = staged.as_ref().ok_or(StorageError::NoFile)?;
            let project_id = form
                .project_id
                .as_deref()
                .filter(|s| !s.is_empty())
                .ok_or(StorageError::MissingField("projectId"))?;
            let bucket_id = form
                .bucket_id
                .as_deref()
                .filter(|s| !s.is_empty())
                .ok_or(StorageError::MissingField("bucketId"))?;
            let received = started.elapsed();
            let (access, bucket) = match early.take() {
                Some((access, bucket)) => (access, Some(bucket)),
                None => (authorize(project_id.to_string()).await?, None),
            };
            let resolved = started.elapsed();
            let writer = unfinished.take().ok_or(StorageError::NoFile)?;
            let mut steps = Steps::default();
            let uploaded = self
                .commit_upload(
                    &access.project.id,
                    (bucket_id, bucket.as_ref()),
                    (staged_file, writer),
                    form.path.as_deref(),
                    form.upsert.unwrap_or(false),
                    &mut steps,
                )
                .await?;
            tracing::debug!(
                size = staged_file.size,
                received_us = received.as_micros() as u64,
                resolved_us = resolved.as_micros() as u64,
                synced_us = steps.synced.as_micros() as u64,
                reserved_us = steps.reserved.as_micros() as u64,
                placed_us = steps.placed.as_micros() as u64,
                recorded_us = steps.recorded.as_micros() as u64,
                total_us = started.elapsed().as_micros() as u64,
                "upload steps"
            );
            Ok(uploaded)
        }
        .await;
        if let Some(writer) = unfinished {
            writer.abort().await;
        }
        if result.is_err() {
            if let Some(s) = &staged {
                if let Err(e) = self.backend.delete(&s.key).await {
                    tracing::warn!(key = s.key, error = %e, "removing a staged upload");
                }
            }
        }
        result
    }

    /// Makes the staged bytes durable while it reserves the row durably (at the same time:
    /// neither waits for the other; the reservation looks the bucket up and checks its limits
    /// in the same statement, [`control::files::reserve_in_bucket`]), moves the staged object
    /// into place and makes the move durable while it writes the file's listing, which it
    /// commits after the move is durable ([`control::files::Listing`], whose commit need not wait
    /// for its WAL flush: the reservation already says what the file is, see
    /// [`control::files::reserve_in_bucket`]). `bucket`: the form's `bucketId`, and the bucket if it
    /// was looked up while the file arrived.
    async fn commit_upload(
        &self,
        project_id: &str,
        (bucket_id, known): (&str, Option<&Bucket>),
        (staged, writer): (&Staged, super::backend::ObjectWriter),
        path: Option<&str>,
        upsert: bool,
        steps: &mut Steps,
    ) -> Result<Uploaded, StorageError> {
        let begun = std::time::Instant::now();
        let checked = names::object_name(path, staged.filename.as_deref()).and_then(|name| {
            if let Some(bucket) = known {
                check_limits(bucket, &staged.content_type, staged.size)?;
            }
            Ok(name)
        });
        let name = match checked {
            Ok(name) => name,
            Err(e) => {
                writer.abort().await;
                return Err(e);
            }
        };
        let needle = match known {
            Some(b) => b.id.clone(),
            None => bucket_id.trim().to_ascii_lowercase(),
        };
        let token = crate::secrets::random_hex::<16>();
        let reservation = control::files::BucketReservation {
            project_id,
            bucket: &needle,
            name: &name,
            content_type: &staged.content_type,
            size: staged.size as i64,
            staged: &staged.key,
            token: &token,
        };
        let reserve = async {
            let client = self.control.get().await?;
            let reserved = control::files::reserve_in_bucket(&client, &reservation, upsert).await;
            Ok::<_, StorageError>((client, reserved, begun.elapsed()))
        };
        let finish = async {
            let finished = writer.finish().await;
            (finished, begun.elapsed())
        };
        // The bytes reach the disk before the object is moved into place (so a crash never
        // leaves a half-written file at its key), the reservation meanwhile.
        let ((finished, synced), reserving) = tokio::join!(finish, reserve);
        let (client, reserved, reserved_after) = reserving?;
        (steps.synced, steps.reserved) = (synced, reserved_after);
        let shown = || known.map_or(bucket_id, |b| b.name.as_str()).to_string();
        let reserved = reserved.map_err(|e| match e.code() {
            // The bucket was deleted between the lookup and the reservation.
            Some(&SqlState::FOREIGN_KEY_VIOLATION) => StorageError::BucketDeleted(shown()),
            _ => e.into(),
        })?;
        use control::files::BucketReserved;
        let (reserved, key) = match reserved {
            BucketReserved::Reserved {
                reserved, s3_key, ..
            } => (reserved, s3_key),
            BucketReserved::NoBucket => {
                return Err(StorageError::NoSuchBucket(bucket_id.to_string()))
            }
            BucketReserved::Refused { bucket, .. } => {
                return Err(check_limits(&bucket, &staged.content_type, staged.size)
                    .err()
                    .unwrap_or_else(|| {
                        anyhow::anyhow!("the bucket's limits refused what they allow").into()
                    }))
            }
            BucketReserved::Conflict { bucket, existing } => {
                return Err(StorageError::NameConflict {
                    name,
                    bucket: bucket.name,
                    existing,
                })
            }
            BucketReserved::Taken(_) if upsert => return Err(StorageError::FileBusy(name)),
            BucketReserved::Taken(bucket) => {
                return Err(StorageError::FileExists {
                    name,
                    bucket: bucket.name,
                })
            }
        };
        let mut listing = control::files::Listing::new(client);
        if let Err(e) = finished {
            release(listing.client(), &reserved, &token).await;
            return Err(e);
        }
        // Read before the row is: a bucket change committed after the listing read the
        // bucket's visibility moves it on, and the entry is then not stored (see
        // `ServedFiles::stored`).
        let generation = self.served.generation();
        // Moved into place and the move made durable before the row that lists it is
        // committed; the row is written meanwhile, uncommitted (`Listing`).
        let placing = std::time::Instant::now();
        let place = async {
            let placed = self.backend.place(&staged.key, &key).await;
            (placed, placing.elapsed())
        };
        let ((placed, placed_in), written) =
            tokio::join!(place, listing.write(&reserved.id, &token, &staged.key));
        steps.placed = placing.duration_since(begun) + placed_in;
        let identity = match placed {
            Ok((synced, identity)) => {
                if synced {
                    use std::sync::atomic::Ordering::Relaxed;
                    self.metrics.storage_fsyncs.fetch_add(1, Relaxed);
                    let micros = placed_in.as_micros() as u64;
                    self.metrics.storage_fsync_micros.fetch_add(micros, Relaxed);
                }
                identity
            }
            Err(e) => {
                // Not stored: a new file goes (unlisted), a replaced one keeps its row.
                roll_back(&mut listing).await;
                if reserved.new {
                    let _ = self.backend.delete(&key).await;
                }
                release(listing.client(), &reserved, &token).await;
                return Err(e);
            }
        };
        let file = match written {
            Ok(Some(file)) => file,
            // In place but not listed: the reservation stays for the sweep (as a listing lost
            // to a crash would).
            Ok(None) => {
                roll_back(&mut listing).await;
                return Err(anyhow::anyhow!("upload reservation {} vanished", reserved.id).into());
            }
            Err(e) => {
                roll_back(&mut listing).await;
                return Err(e.into());
            }
        };
        listing.end(true).await?;
        steps.recorded = begun.elapsed();
        if let Some(identity) = identity {
            // The first download of it reads no row.
            let served = super::served::Served {
                name: file.name.clone(),
                content_type: file.content_type.clone(),
                public: file.bucket_is_public,
            };
            self.served.stored(&key, identity, served, generation);
        }
        self.metrics
            .storage_uploaded_bytes
            .fetch_add(staged.size, std::sync::atomic::Ordering::Relaxed);
        tracing::info!(project_id, file = %reserved.id, key, size = staged.size, "file uploaded");
        Ok(Uploaded {
            file,
            created: reserved.new,
        })
    }
}

impl Storage {
    /// Refuses `name` when a row of `bucket` is in its way ([`control::files::in_the_way`]).
    async fn check_name(&self, bucket: &Bucket, name: String) -> Result<(), StorageError> {
        let client = self.control.get().await?;
        match control::files::in_the_way(&client, &bucket.id, &name).await? {
            Some(existing) => Err(StorageError::NameConflict {
                name,
                bucket: bucket.name.clone(),
                existing,
            }),
            None => Ok(()),
        }
    }
}

/// The bucket's type and size limits.
fn check_limits(bucket: &Bucket, content_type: &str, size: u64) -> Result<(), StorageError> {
    check_mime(bucket, content_type)?;
    match bucket.max_file_size {
        Some(m) if size > m as u64 => Err(StorageError::TooLarge(m as u64)),
        _ => Ok(()),
    }
}

fn check_mime(bucket: &Bucket, content_type: &str) -> Result<(), StorageError> {
    match &bucket.allowed_mime_types {
        Some(allowed) if !names::mime_allowed(content_type, allowed) => {
            Err(StorageError::TypeNotAllowed {
                content_type: content_type.to_string(),
                bucket: bucket.name.clone(),
                allowed: allowed.clone(),
            })
        }
        _ => Ok(()),
    }
}

/// The rest of the current part as text.
async fn read_text(
    multipart: &mut Multipart,
    name: &str,
    limit: u64,
) -> Result<String, StorageError> {
    let mut buf = Vec::new();
    while let Some(chunk) = multipart
        .chunk()
        .await
        .map_err(|e| multipart_error(e, limit))?
    {
        if buf.len() + chunk.len() > MAX_TEXT_FIELD {
            return Err(StorageError::FieldTooLong {
                field: name.to_string(),
                limit: MAX_TEXT_FIELD,
            });
        }
        buf.extend_from_slice(&chunk);
    }
    String::from_utf8(buf).map_err(|_| StorageError::FieldNotUtf8(name.to_string()))
}

/// Gives an upload's reservation up ([`control::files::release`]); a failure is logged (the
/// start-up sweep drops reservations abandoned for an hour).
async fn release(
    client: &deadpool_postgres::Client,
    reserved: &control::files::Reserved,
    token: &str,
) {
    if let Err(e) = control::files::release(client, reserved, token).await {
        tracing::warn!(error = %e, file = reserved.id, "releasing an upload reservation");
    }
}

/// Rolls the listing's transaction back; a failure is logged (the connection is then closed,
/// not pooled: [`control::files::Listing`]).
async fn roll_back(listing: &mut control::files::Listing) {
    if let Err(e) = listing.end(false).await {
        tracing::warn!(error = %e, "rolling back an upload's listing");
    }
}
