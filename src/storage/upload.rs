//! `POST /api/storage/upload`: a multipart/form-data body streamed to the backend.
//!
//! The body never sits in memory: multer yields the `file` part chunk by chunk and each chunk
//! goes to an [`ObjectWriter`](super::backend::ObjectWriter) at a staging key, counted against
//! the size limit as it arrives. Fields may come in any order (the guide's curl sends `file`
//! first); when `projectId` and `bucketId` come first, access and the bucket's limits are
//! checked before a byte of the file is read.

use std::collections::HashMap;

use bytes::Bytes;
use futures_util::Stream;
use serde_json::json;
use warp::http::{HeaderMap, StatusCode};

use super::{names, require_readwrite, Bucket, STAGING};
use crate::api::error::{ApiError, ApiResult};
use crate::app::App;
use crate::auth::{Access, Principal, Scope};

/// Longest accepted text field (`bucketId`, `projectId`, `path`, `upsert`).
const MAX_TEXT_FIELD: usize = 4096;
/// After a refusal mid-stream, read and discard at most this much more of the body so the
/// client sees the answer instead of a reset connection.
const DRAIN_LIMIT: u64 = 16 * 1024 * 1024;

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

fn parse_bool(field: &str, v: &str) -> ApiResult<bool> {
    match v.trim().to_ascii_lowercase().as_str() {
        "true" | "1" => Ok(true),
        "false" | "0" | "" => Ok(false),
        _ => Err(ApiError::BadRequest(format!(
            "{field}: expected true or false"
        ))),
    }
}

fn multipart_error(e: multer::Error, limit: u64) -> ApiError {
    match e {
        multer::Error::StreamSizeExceeded { .. } | multer::Error::FieldSizeExceeded { .. } => {
            ApiError::PayloadTooLarge(limit as usize)
        }
        other => ApiError::BadRequest(format!("invalid multipart body: {other}")),
    }
}

impl App {
    pub async fn upload<S, E>(
        &self,
        headers: &HeaderMap,
        query: &HashMap<String, String>,
        body: S,
    ) -> ApiResult<(StatusCode, serde_json::Value)>
    where
        S: Stream<Item = Result<Bytes, E>> + Send + 'static,
        E: Into<Box<dyn std::error::Error + Send + Sync>> + 'static,
    {
        let authorization = headers
            .get(warp::http::header::AUTHORIZATION)
            .and_then(|v| v.to_str().ok());
        let principal = self.auth.authenticate(authorization).await?;
        if let Principal::Key {
            scope: Scope::Read, ..
        } = principal
        {
            return Err(ApiError::ScopeMismatch(
                "Uploading files needs a readwrite or admin key.".into(),
            ));
        }
        let max = self.storage.max_upload_bytes;
        let declared = headers
            .get(warp::http::header::CONTENT_LENGTH)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.parse::<u64>().ok());
        // Multipart framing adds a little; a body far beyond the limit is refused unread.
        if declared.is_some_and(|n| n > max + 64 * 1024) {
            return Err(ApiError::PayloadTooLarge(max as usize));
        }
        let content_type = headers
            .get(warp::http::header::CONTENT_TYPE)
            .and_then(|v| v.to_str().ok())
            .unwrap_or_default();
        let boundary = multer::parse_boundary(content_type).map_err(|_| {
            ApiError::BadRequest(
                "Content-Type: expected multipart/form-data with a boundary".into(),
            )
        })?;
        let started = std::time::Instant::now();
        let mut multipart = multer::Multipart::new(body, boundary);
        let mut form = Form::default();
        if let Some(v) = query.get("upsert") {
            form.upsert = Some(parse_bool("upsert", v)?);
        }
        let mut staged: Option<Staged> = None;
        let mut early: Option<(Access, Bucket)> = None;
        let result = async {
            while let Some(mut field) = multipart
                .next_field()
                .await
                .map_err(|e| multipart_error(e, max))?
            {
                let name = field.name().unwrap_or_default().to_string();
                if name == "file" {
                    if staged.is_some() {
                        return Err(ApiError::BadRequest(
                            "file: send exactly one file per request".into(),
                        ));
                    }
                    if let (Some(p), Some(b)) = (&form.project_id, &form.bucket_id) {
                        let access = self.upload_access(&principal, p).await?;
                        let bucket = self.find_bucket(&access.project.id, b).await?;
                        early = Some((access, bucket));
                    }
                    let filename = field.file_name().map(str::to_string);
                    let content_type = names::normalize_content_type(
                        field.content_type().map(|m| m.as_ref()),
                        filename.as_deref().unwrap_or_default(),
                    )?;
                    let mut limit = max;
                    if let Some((_, bucket)) = &early {
                        check_mime(bucket, &content_type)?;
                        if let Some(m) = bucket.max_file_size {
                            limit = limit.min(m as u64);
                        }
                    }
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
                        .storage
                        .backend
                        .writer(&key, &content_type, &disposition)
                        .await?;
                    loop {
                        let chunk = match field.chunk().await {
                            Ok(Some(c)) => c,
                            Ok(None) => break,
                            Err(e) => {
                                writer.abort().await;
                                return Err(multipart_error(e, max));
                            }
                        };
                        if writer.written() + chunk.len() as u64 > limit {
                            writer.abort().await;
                            let mut drained = 0u64;
                            while let Ok(Some(c)) = field.chunk().await {
                                drained += c.len() as u64;
                                if drained > DRAIN_LIMIT {
                                    break;
                                }
                            }
                            return Err(ApiError::PayloadTooLarge(limit as usize));
                        }
                        if let Err(e) = writer.write(chunk).await {
                            writer.abort().await;
                            return Err(e);
                        }
                    }
                    let size = writer.finish().await?;
                    if let Some(s) = staged.as_mut() {
                        s.size = size;
                    }
                    continue;
                }
                let slot = match name.as_str() {
                    "bucketId" => &mut form.bucket_id,
                    "projectId" => &mut form.project_id,
                    "path" => &mut form.path,
                    "upsert" => {
                        let v = read_text(&mut field, &name).await?;
                        form.upsert = Some(parse_bool("upsert", &v)?);
                        continue;
                    }
                    other => {
                        return Err(ApiError::BadRequest(format!(
                            "{other}: unknown form field (expected file, bucketId, projectId, path, upsert)"
                        )))
                    }
                };
                *slot = Some(read_text(&mut field, &name).await?);
            }
            let staged_file = staged
                .as_ref()
                .ok_or_else(|| ApiError::BadRequest("file: missing file part".into()))?;
            let project_id = form
                .project_id
                .as_deref()
                .filter(|s| !s.is_empty())
                .ok_or_else(|| ApiError::BadRequest("projectId: missing form field".into()))?;
            let bucket_id = form
                .bucket_id
                .as_deref()
                .filter(|s| !s.is_empty())
                .ok_or_else(|| ApiError::BadRequest("bucketId: missing form field".into()))?;
            let received = started.elapsed();
            let (access, bucket) = match early.take() {
                Some(found) => found,
                None => {
                    let access = self.upload_access(&principal, project_id).await?;
                    let bucket = self.find_bucket(&access.project.id, bucket_id).await?;
                    (access, bucket)
                }
            };
            tracing::debug!(
                received_ms = received.as_secs_f64() * 1e3,
                resolved_ms = started.elapsed().as_secs_f64() * 1e3,
                "upload staged"
            );
            self.commit_upload(
                &access,
                &bucket,
                staged_file,
                form.path.as_deref(),
                form.upsert.unwrap_or(false),
                headers,
            )
            .await
        }
        .await;
        if result.is_err() {
            if let Some(s) = &staged {
                if let Err(e) = self.storage.backend.delete(&s.key).await {
                    tracing::warn!(key = s.key, error = %e, "removing a staged upload");
                }
            }
        }
        result
    }

    async fn upload_access(&self, principal: &Principal, project_id: &str) -> ApiResult<Access> {
        let access = self.auth.project_access(principal, project_id).await?;
        require_readwrite(&access, "Uploading files")?;
        Ok(access)
    }

    /// Reserves the row, moves the staged object into place, then records its size.
    async fn commit_upload(
        &self,
        access: &Access,
        bucket: &Bucket,
        staged: &Staged,
        path: Option<&str>,
        upsert: bool,
        headers: &HeaderMap,
    ) -> ApiResult<(StatusCode, serde_json::Value)> {
        let name = names::object_name(path, staged.filename.as_deref())?;
        check_mime(bucket, &staged.content_type)?;
        if let Some(m) = bucket.max_file_size {
            if staged.size > m as u64 {
                return Err(ApiError::PayloadTooLarge(m as usize));
            }
        }
        let key = format!("{}/{}/{}", access.project.id, bucket.id, name);
        let token = crate::secrets::random_hex::<16>();
        let client = self.control.get().await?;
        let conflict = || {
            ApiError::Conflict(format!(
                "A file named {name:?} already exists in bucket {:?}. Send upsert=true to replace it.",
                bucket.name
            ))
        };
        let insert = client
            .prepare_cached(if upsert {
                "INSERT INTO fluxbase.storage_files
                   (project_id, bucket_id, name, s3_key, content_type, upload_token, upload_started_at)
                 VALUES ($1, $2::text::uuid, $3, $4, $5, $6, now())
                 ON CONFLICT (bucket_id, name) DO UPDATE
                   SET upload_token = EXCLUDED.upload_token, upload_started_at = now()
                   WHERE storage_files.upload_token IS NULL AND storage_files.deleting_at IS NULL
                 RETURNING id::text, size IS NULL"
            } else {
                "INSERT INTO fluxbase.storage_files
                   (project_id, bucket_id, name, s3_key, content_type, upload_token, upload_started_at)
                 VALUES ($1, $2::text::uuid, $3, $4, $5, $6, now())
                 RETURNING id::text, true"
            })
            .await?;
        // The reservation need not wait for its WAL flush: the final UPDATE below is
        // synchronous and comes later in the WAL, so a crash never keeps a stored file whose
        // reservation was lost; at worst it loses the reservation of an unfinished upload.
        // Its transaction is pipelined (one round trip): the three requests are sent before
        // any answer is read, and a failed INSERT turns the COMMIT into a rollback.
        let (begun, inserted, committed) = futures_util::future::join3(
            client.batch_execute("BEGIN; SET LOCAL synchronous_commit = off"),
            client.query_opt(
                &insert,
                &[
                    &access.project.id,
                    &bucket.id,
                    &name,
                    &key,
                    &staged.content_type,
                    &token,
                ],
            ),
            client.batch_execute("COMMIT"),
        )
        .await;
        begun?;
        let reserved = inserted.map_err(|e| {
            if !upsert && e.code() == Some(&tokio_postgres::error::SqlState::UNIQUE_VIOLATION) {
                conflict()
            } else {
                bucket_gone(e, bucket)
            }
        })?;
        committed?;
        let reserved = reserved.ok_or_else(|| {
            ApiError::Conflict(format!(
                "Another upload or a delete of {name:?} is in progress; retry when it is done."
            ))
        })?;
        let (id, new): (String, bool) = (reserved.get(0), reserved.get(1));
        let release = || async {
            let sql = if new {
                "DELETE FROM fluxbase.storage_files WHERE id = $1::text::uuid AND upload_token = $2"
            } else {
                "UPDATE fluxbase.storage_files SET upload_token = NULL, upload_started_at = NULL
                 WHERE id = $1::text::uuid AND upload_token = $2"
            };
            if let Err(e) = client.execute(sql, &[&id, &token]).await {
                tracing::warn!(error = %e, file = id, "releasing an upload reservation");
            }
        };
        if let Err(e) = self.storage.backend.rename(&staged.key, &key).await {
            release().await;
            return Err(e);
        }
        // The bytes reach the disk before the row that lists them is committed.
        let syncing = std::time::Instant::now();
        match self.storage.backend.persist(&key).await {
            Ok(synced) => {
                if synced {
                    use std::sync::atomic::Ordering::Relaxed;
                    self.metrics.storage_fsyncs.fetch_add(1, Relaxed);
                    let micros = syncing.elapsed().as_micros() as u64;
                    self.metrics.storage_fsync_micros.fetch_add(micros, Relaxed);
                }
            }
            Err(e) => {
                // Not stored: a new file goes (unlisted), a replaced one keeps its row.
                if new {
                    let _ = self.storage.backend.delete(&key).await;
                }
                release().await;
                return Err(e);
            }
        }
        let size = staged.size as i64;
        let record = client
            .prepare_cached(&format!(
                "WITH f AS (
                   UPDATE fluxbase.storage_files SET size = $3, content_type = $4,
                     upload_token = NULL, upload_started_at = NULL, updated_at = now()
                   WHERE id = $1::text::uuid AND upload_token = $2 RETURNING *)
                 SELECT {} FROM f JOIN fluxbase.storage_buckets b ON b.id = f.bucket_id",
                super::FILE_COLUMNS
            ))
            .await?;
        let row = client
            .query_opt(&record, &[&id, &token, &size, &staged.content_type])
            .await?
            .ok_or_else(|| anyhow::anyhow!("upload reservation {id} vanished"))?;
        self.metrics
            .storage_uploaded_bytes
            .fetch_add(staged.size, std::sync::atomic::Ordering::Relaxed);
        let base = super::base_url(&self.config, headers);
        tracing::info!(project_id = %access.project.id, file = %id, key, size, "file uploaded");
        Ok((
            if new {
                StatusCode::CREATED
            } else {
                StatusCode::OK
            },
            json!({ "success": true, "file": super::file_json(&row, &base) }),
        ))
    }
}

fn check_mime(bucket: &Bucket, content_type: &str) -> ApiResult<()> {
    match &bucket.allowed_mime_types {
        Some(allowed) if !names::mime_allowed(content_type, allowed) => {
            Err(ApiError::BadRequest(format!(
                "file: content type {content_type:?} is not allowed in bucket {:?} (allowed: {})",
                bucket.name,
                allowed.join(", ")
            )))
        }
        _ => Ok(()),
    }
}

/// The bucket was deleted between the lookup and the reservation.
fn bucket_gone(e: tokio_postgres::Error, bucket: &Bucket) -> ApiError {
    if e.code() == Some(&tokio_postgres::error::SqlState::FOREIGN_KEY_VIOLATION) {
        ApiError::NotFound(format!("Bucket {:?} was deleted.", bucket.name))
    } else {
        e.into()
    }
}

async fn read_text(field: &mut multer::Field<'_>, name: &str) -> ApiResult<String> {
    let mut buf = Vec::new();
    while let Some(chunk) = field
        .chunk()
        .await
        .map_err(|e| ApiError::BadRequest(format!("invalid multipart body: {e}")))?
    {
        if buf.len() + chunk.len() > MAX_TEXT_FIELD {
            return Err(ApiError::BadRequest(format!(
                "{name}: longer than {MAX_TEXT_FIELD} bytes"
            )));
        }
        buf.extend_from_slice(&chunk);
    }
    String::from_utf8(buf).map_err(|_| ApiError::BadRequest(format!("{name}: not UTF-8")))
}
